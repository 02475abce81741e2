"""`circatt eval`: fixed noise per image, scores, tables and files (tiny model, synthetic images)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from circatt_cli.app import app
from circatt_cli.evaluate import available_peers, load_image, run_eval
from circatt_cli.metrics import psnr
from circatt_cli.model import preset_for
from circatt_cli.noise import add_noise
from circatt_cli.weights import preset_weights
from synthetic import smooth_images


def invoke(args: list[str]) -> tuple[int, str]:
    """Run the CLI; the output with rich's box drawing and line wrapping flattened to single spaces."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.fixture
def folder(tmp_path):
    return smooth_images(tmp_path / "clean", 2, 20, 24, channels=1)


@pytest.fixture
def weights(tiny_weights):
    """The tiny gray model's weights file."""
    return preset_weights(preset_for(1), tiny_weights)


def test_noise_is_fixed_per_image_and_sigma():
    clean = torch.zeros(1, 1, 8, 8)
    a, b = add_noise(clean, "x.png", 25), add_noise(clean, "x.png", 25)
    assert torch.equal(a, b)
    assert not torch.equal(a, add_noise(clean, "y.png", 25))
    assert not torch.equal(a, add_noise(clean, "x.png", 15))
    assert torch.equal(add_noise(clean, "x.png", 25, seed=3), add_noise(clean, "y.png", 25, seed=3))
    assert not torch.equal(a, add_noise(clean, "x.png", 25, seed=3))
    assert a.std().item() == pytest.approx(25 / 255, rel=0.3)
    assert a.min() < 0


def test_run_eval_scores(folder, weights):
    from circatt_cli.weights import load_model

    results = run_eval(load_model(weights), [folder], [25.0], estimate=True)
    pairs = [(r.image, r.method) for r in results]
    assert pairs == [(f"{i}.png", m) for i in range(2) for m in ("groupcdl", "groupcdl-est")]
    assert all(np.isfinite(r.psnr) and 0 < r.ssim <= 1 for r in results)
    assert results[1].sigma_used != 25.0


def test_eval_command_writes_files(folder, weights, tmp_path):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    args = ["eval", "--model", str(weights), "--data", str(folder), "--sigma", "15,50"]
    code, out = invoke(args + ["--json", str(out_json), "--csv", str(out_csv), "--device", "cpu"])
    assert code == 0, out
    assert "groupcdl PSNR / SSIM" in out
    data = json.loads(out_json.read_text())
    assert len(data["images"]) == 4 and {m["sigma"] for m in data["means"]} == {15.0, 50.0}
    assert len(list(csv.DictReader(out_csv.open()))) == 4


def test_eval_errors(folder, tmp_path):
    code, out = invoke(["eval", "--data", str(tmp_path / "nope")])
    assert code == 2 and "not a folder" in out
    code, out = invoke(["eval", "--model", str(tmp_path / "none.safetensors"), "--data", str(folder)])
    assert code == 2 and "no weights file" in out and "Traceback" not in out
    code, out = invoke(["eval", "--data", str(folder), "--peers", "foo"])
    assert code == 2 and "unknown peer" in out


def test_a_bad_image_is_left_out_and_the_rest_scored(folder, weights, tmp_path):
    (folder / "zz.png").write_bytes(b"not an image")
    (folder / "0_denoised.png").write_bytes((folder / "0.png").read_bytes())  # our own output: not a test image
    out_json = tmp_path / "r.json"
    code, out = invoke(["eval", "--model", str(weights), "--data", str(folder), "--sigma", "25", "--json", str(out_json)])
    assert code == 1 and "zz.png: not a readable image" in out and "Traceback" not in out
    assert sorted(r["image"] for r in json.loads(out_json.read_text())["images"]) == ["0.png", "1.png"]
    code, out = invoke(["eval", "--model", str(weights), "--data", str(folder), "--json", str(tmp_path / "no" / "r.json")])
    assert code == 2 and "does not exist" in out


def test_missing_peer_gives_a_note(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kw):
        if name in ("cv2", "bm3d"):
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    found, notes = available_peers(["nlm", "bm3d"])
    assert found == {} and len(notes) == 2 and "pip install" in notes[0]


@pytest.mark.skipif(
    importlib.util.find_spec("cv2") is None or importlib.util.find_spec("bm3d") is None,
    reason="the optional peers (pip install circatt[peers]) are not installed",
)
def test_classical_peers_denoise_the_same_noisy_images(folder, weights):
    from circatt_cli.weights import load_model

    peers, notes = available_peers(["nlm", "bm3d"])
    assert set(peers) == {"nlm", "bm3d"} and not notes
    results = run_eval(load_model(weights), [folder], [25.0], peers=peers)
    noisy_psnr = {
        r.image: float(psnr(add_noise(load_image(folder / r.image, 1), r.image, 25.0).clamp(0, 1), load_image(folder / r.image, 1)))
        for r in results
    }
    for method in ("nlm", "bm3d"):
        rows = [r for r in results if r.method == method]
        assert len(rows) == 2 and all(r.psnr > noisy_psnr[r.image] + 3 for r in rows), rows


def test_file_names_are_printed_as_they_are(folder, weights):
    (folder / "smile:a:[b].png").write_bytes(b"not an image")
    (folder / "x[bold]y.png").write_bytes((folder / "0.png").read_bytes())
    code, out = invoke(["eval", "--model", str(weights), "--data", str(folder), "--sigma", "25", "--per-image"])
    assert code == 1 and "smile:a:[b].png: not a readable image" in out and "x[bold]y.png" in out, out


def test_results_files_that_cannot_be_written_are_refused_first(folder, weights, tmp_path):
    base = ["eval", "--model", str(weights), "--data", str(folder), "--sigma", "25"]
    code, out = invoke(base + ["--json", str(folder)])
    assert code == 2 and "is a folder" in out and "Traceback" not in out, out
    code, out = invoke(base + ["--csv", str(tmp_path / ("x" * 300 + ".csv"))])
    assert code == 2 and "cannot be written" in out and "Traceback" not in out, out
    code, out = invoke(base + ["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    assert code == 0 and (tmp_path / "r.json").exists() and (tmp_path / "r.csv").exists()


def test_datasets_are_named_and_told_apart(folder, weights, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    other = smooth_images(tmp_path / "elsewhere" / folder.name, 1, 20, 24, channels=1)
    code, out = invoke(["eval", "--model", str(weights), "--data", str(folder), "--data", str(other), "--sigma", "25"])
    assert code == 2 and f"two --data folders are named '{folder.name}'" in out, out
    from circatt_cli.weights import load_model

    monkeypatch.chdir(folder)
    results = run_eval(load_model(weights), [Path(".")], [25.0])
    assert {r.dataset for r in results} == {folder.name}  # was '' for `--data .`
