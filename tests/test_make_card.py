"""scripts/make_card.py: ships exported weights and regenerates their card, keeping hand-written fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from circatt_cli.weights import load_model, save_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_card.py"


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
