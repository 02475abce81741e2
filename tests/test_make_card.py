"""scripts/make_card.py: ships exported weights and regenerates their card, keeping hand-written fields;
scripts/export_weights.py: exports a training checkpoint for it; scripts/pack_data.py: packs training images."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import torch

from circatt_cli.evaluate import run_eval, write_json
from circatt_cli.train import TrainOptions, run
from circatt_cli.weights import card_path, load_model, save_model
from synthetic import smooth_images

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_card.py"
EXPORT = SCRIPT.with_name("export_weights.py")


def run_script(script: Path, monkeypatch, capsys, *args: object) -> tuple[int | str, str]:
    """Run a script in this process (no second torch import); (exit status or SystemExit message, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return done.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def export(monkeypatch, capsys, *args: object) -> tuple[int | str, str]:
    """Run scripts/export_weights.py in this process; (exit status, stderr)."""
    return run_script(EXPORT, monkeypatch, capsys, *args)


def result(dataset: str, image: str, sigma: float, method: str, value: float) -> dict:
    return {"dataset": dataset, "image": image, "sigma": sigma, "method": method, "sigma_used": sigma,
            "psnr": value, "ssim": value / 100}


def test_make_card(tiny_model, tmp_path):
    model = tiny_model()
    exported = tmp_path / "export" / "groupcdl-gray.safetensors"
    config = save_model(model, exported, {"steps": 20})["config"]
    images = [result("A", "1.png", 25.0, "groupcdl", 30.0), result("A", "2.png", 25.0, "groupcdl", 31.0),
              result("A", "1.png", 25.0, "groupcdl-est", 29.0), result("A", "2.png", 25.0, "groupcdl-est", 30.0)]
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"model": "x", "config": config, "means": [], "images": images}))
    small = tmp_path / "cpu.json"
    small.write_text(json.dumps({"config": config, "images": [{**images[0], "psnr": 30.00002}]}))
    shipped = tmp_path / "weights"
    shipped.mkdir()
    old = {"name": "groupcdl-gray", "steps": 10, "recipe": "by hand", "commands": ["one"],
           "eval": {"peers": {"kept": True}}}
    (shipped / "groupcdl-gray.json").write_text(json.dumps(old))

    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(exported), str(evaluation), "--into", str(shipped),
         "--without", "A/2.png", "--crosscheck", str(small), "--set", "status=ok", "--set", "gpu_hours=0.5",
         "--append", "commands=two"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    card = json.loads((shipped / "groupcdl-gray.json").read_text())
    assert card["steps"] == 20 and card["recipe"] == "by hand" and card["commands"] == ["one", "two"]
    assert card["status"] == "ok" and card["gpu_hours"] == 0.5 and card["eval"]["peers"] == {"kept": True}
    means = card["eval"]["means"]
    assert means["A sigma 25"]["true sigma"] == {"psnr": 30.5, "ssim": 0.305, "images": 2}
    assert means["A without 2.png sigma 25"]["estimated sigma"]["images"] == 1
    assert "2.0e-05 dB" in card["eval"]["cpu_crosscheck"]
    assert (shipped / "groupcdl-gray.eval.json").read_text() == evaluation.read_text()
    load_model(shipped / "groupcdl-gray.safetensors")

    exported.write_bytes(exported.read_bytes()[:-1] + b"\0")  # no longer the file its export card describes
    run = subprocess.run([sys.executable, str(SCRIPT), str(exported), str(evaluation), "--into", str(shipped)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "does not match" in run.stderr


def test_export_then_make_card(tiny_config, tmp_path, monkeypatch, capsys):
    """A checkpoint goes out through export_weights.py (weights and export card only) and ships through make_card.py."""
    images = smooth_images(tmp_path / "images", 2, 24, 24, channels=1)
    options = TrainOptions(data=images, out=tmp_path / "run", config=tiny_config(), steps=2, batch=1, crop=16,
                           device="cpu", progress=False)
    run(options)
    checkpoint, exported = tmp_path / "run" / "last.pt", tmp_path / "export" / "tiny.safetensors"
    assert export(monkeypatch, capsys, checkpoint, exported) == (0, "")
    assert set(json.loads(card_path(exported).read_text())) == {"steps", "config", "weights", "sha256"}
    model = load_model(exported)
    evaluation = tmp_path / "eval.json"
    write_json(evaluation, run_eval(model, [images], [25.0]), {"config": model.config.to_dict()})
    done = subprocess.run([sys.executable, str(SCRIPT), str(exported), str(evaluation), "--into", str(tmp_path / "weights")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["steps"] == 2 and card["eval"]["means"]["images sigma 25"]["true sigma"]["images"] == 2

    code, err = export(monkeypatch, capsys, checkpoint, exported, "--card", tmp_path / "card.json")
    assert code == 2 and "unrecognized arguments: --card" in err
    code, err = export(monkeypatch, capsys, tmp_path / "none.pt", exported)
    assert code == 2 and "none.pt: no such file" in err


def test_make_card_refuses_bad_inputs_in_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    exported = tmp_path / "export" / "tiny.safetensors"
    config = save_model(tiny_model(), exported, {"steps": 3})["config"]
    evaluation, wrong = tmp_path / "eval.json", tmp_path / "wrong.json"
    evaluation.write_text(json.dumps({"config": config, "images": [result("A", "1.png", 25.0, "groupcdl", 30.0)]}))
    wrong.write_text(json.dumps({"config": config, "means": []}))
    (tmp_path / "file").write_text("x")

    def make_card(*args: object) -> str:
        code, _ = run_script(SCRIPT, monkeypatch, capsys, exported, *args)
        assert isinstance(code, str), code  # SystemExit with a message: one line, no traceback
        return code

    assert "wrong.json is not the output of `circatt eval --json`" in make_card(wrong)
    assert "wrong.json is not the output" in make_card(evaluation, "--crosscheck", wrong)
    assert "card field 'a' is not an object" in make_card(evaluation, "--set", "a=1", "--set", "a.b=2")
    assert "field 'status' is not a list" in make_card(evaluation, "--set", "status=x", "--append", "status=y")
    assert "cannot write into" in make_card(evaluation, "--into", tmp_path / "file")


def test_export_and_pack_errors_are_one_line(tiny_config, tmp_path, monkeypatch, capsys):
    from circatt_cli.data import load_images

    images = smooth_images(tmp_path / "images", 2, 24, 24, channels=1)
    run(TrainOptions(data=images, out=tmp_path / "run", config=tiny_config(), steps=1, batch=1, crop=16,
                     device="cpu", progress=False))
    (tmp_path / "file").write_text("x")
    code, _ = export(monkeypatch, capsys, tmp_path / "run" / "last.pt", tmp_path / "file" / "w.safetensors")
    assert isinstance(code, str) and code.startswith("cannot write"), code

    pack = SCRIPT.with_name("pack_data.py")
    assert run_script(pack, monkeypatch, capsys, images, tmp_path / "p.npz") == (0, "")
    packed, folder = load_images(tmp_path / "p.npz", 1), load_images(images, 1)
    assert len(packed) == 2 and all(torch.equal(a, b) for a, b in zip(packed, folder))
    code, err = run_script(pack, monkeypatch, capsys, images, tmp_path / "p.pack")
    assert code == 2 and "must end in .npz" in err and not (tmp_path / "p.pack.npz").exists()
    code, _ = run_script(pack, monkeypatch, capsys, images, tmp_path / "file" / "p.npz")
    assert isinstance(code, str) and code.startswith("cannot write"), code
