"""scripts/model_diff.py: saves the shipped models' outputs and says whether a later build moved them."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "model_diff.py"


def run_script(monkeypatch, capsys, *args: object) -> tuple[int | str | None, str]:
    """Run the script in this process; (exit status, stdout and stderr)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
    code = 0
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as done:
        code = done.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_same_build_matches_and_a_moved_output_fails(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "old.pt"
    assert run_script(monkeypatch, capsys, "save", saved, "--device", "cpu", "--small")[0] == 0
    code, out = run_script(monkeypatch, capsys, "compare", saved, "--device", "cpu", "--small")
    assert code == 0 and "gray 64x64: largest |now - saved| = 0.000e+00" in out
    doc = torch.load(saved)
    doc["outputs"]["color"] += 2e-4  # as if a kernel change had moved the color output
    torch.save(doc, saved)
    code, out = run_script(monkeypatch, capsys, "compare", saved, "--device", "cpu", "--small")
    assert code == 1 and "color 64x64: largest |now - saved| = 2.000e-04" in out


def test_sizes_that_differ_from_the_saved_run_are_refused(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "old.pt"
    torch.save({"sizes": {"gray": "512x512", "color": "1080x1920"}, "outputs": {}}, saved)
    code, out = run_script(monkeypatch, capsys, "compare", saved, "--device", "cpu", "--small")
    assert code == 2 and "holds sizes" in out


def test_a_file_that_is_not_a_saved_run_is_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "old.pt"
    bad.write_bytes(b"not a torch file")
    code, out = run_script(monkeypatch, capsys, "compare", bad, "--device", "cpu", "--small")
    assert code == 2 and "cannot read" in out and "Traceback" not in out
