"""`circatt train`: the loop, exact resume, DDP over gloo, backtracking and user errors (tiny, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from typer.testing import CliRunner

from circatt_cli.app import app
from circatt_cli.data import CropSampler, augment, load_images, sigma_quantile
from circatt_cli.train import Dist, StopSignal, Trainer, TrainOptions, crop_loss, learning_rate, loss_weights, run
from synthetic import smooth_images


def invoke(args: list[str]) -> tuple[int, str]:
    """Run the CLI; the output with rich's box drawing and line wrapping flattened to single spaces."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.fixture
def images(tmp_path):
    return smooth_images(tmp_path / "images", 3, 40, 48, channels=3, prefix="im")


@pytest.fixture
def options(images, tiny_config):
    """options(out, **changes): a short CPU run of the tiny gray model on the synthetic images."""
    base = dict(data=images, config=tiny_config(), steps=6, batch=2, crop=16, progress=False, epoch_steps=3)
    return lambda out, **changes: TrainOptions(**{**base, "out": out, **changes})


def test_sampler_and_augment(images):
    imgs = load_images(images, 1)
    assert len(imgs) == 3 and imgs[0].shape == (1, 40, 48) and imgs[0].dtype == torch.uint8
    noisy, clean, sigma = CropSampler(imgs, 16, (0.0, 0.2), seed=0).batch(5)
    assert noisy.shape == clean.shape == (5, 1, 16, 16) and sigma.shape == (5,)
    assert 0 <= clean.min() and clean.max() <= 1 and (sigma <= 0.2).all()
    x = torch.arange(16.0).reshape(1, 4, 4)
    assert len({tuple(augment(x, c).flatten().tolist()) for c in range(8)}) == 8


def test_sigma_law_puts_its_share_in_the_lower_half():
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    assert torch.equal(sigma_quantile(u, 0.0, 0.2), 0.2 * u)  # 0.5: the uniform law, as before the option
    s = sigma_quantile(u, 0.0, 0.2, low_share=0.75)
    assert (s[1:] > s[:-1]).all() and 0 < s.min() and s.max() < 0.2  # increasing, no jump past mid
    assert (s < 0.1).double().mean().item() == pytest.approx(0.75, abs=1e-4)
    assert (s < 0.05).double().mean().item() == pytest.approx(0.375, abs=1e-4)  # uniform inside each half
    assert (s > 0.15).double().mean().item() == pytest.approx(0.125, abs=1e-4)


def test_schedule():
    opts = TrainOptions(data=None, out=None, steps=100, lr=1e-3, lr_min=1e-5, hold=0.5)
    assert learning_rate(0, opts) == learning_rate(49, opts) == 1e-3
    assert learning_rate(100, opts) == pytest.approx(1e-5)
    assert 1e-5 < learning_rate(75, opts) < 1e-3


def test_balanced_loss_weighs_low_sigma_more_and_keeps_the_mse_scale():
    opts = TrainOptions(data=None, out=None, sigma_min=0.0, sigma_max=55.0, loss="balanced")
    assert loss_weights(torch.tensor([0.1]), TrainOptions(data=None, out=None)) is None
    sigma = torch.linspace(0, 55, 100001) / 255
    w = loss_weights(sigma, opts)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-3)  # the mean over the uniform training range
    assert (w[1:] < w[:-1]).all() and w[0] / w[-1] == pytest.approx(60 / 5)
    out, clean = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    out[1] = 0.5  # crop MSEs 1 and 0.25
    assert crop_loss(out, clean, None).item() == pytest.approx(0.625)
    assert crop_loss(out, clean, torch.tensor([2.0, 4.0])).item() == pytest.approx((2 + 1) / 2)
    low = TrainOptions(data=None, out=None, sigma_max=55.0, loss="balanced", sigma_low_share=0.8)
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    assert loss_weights(sigma_quantile(u, 0.0, 55 / 255, 0.8), low).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_an_unknown_loss_is_refused_by_the_options_too():
    with pytest.raises(ValueError, match="loss must be one of mse, balanced, got 'l1'"):
        TrainOptions(data=None, out=None, loss="l1")
    with pytest.raises(ValueError, match="sigma_low_share must be in"):
        TrainOptions(data=None, out=None, sigma_low_share=1.0)


def test_a_balanced_run_resumed_from_mse_restarts_the_blowup_check(options, tmp_path):
    run(options(tmp_path / "r", stop_at=3))  # an epoch ends at step 3: best_epoch is an MSE
    assert math.isfinite(torch.load(tmp_path / "r" / "last.pt", weights_only=False)["count"]["best_epoch"])
    summary = run(options(tmp_path / "r", resume=True, loss="balanced", stop_at=5))  # no epoch end in 4-5
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert summary["step"] == 5 and state["options"]["loss"] == "balanced"
    assert state["count"]["best_epoch"] == math.inf
    run(options(tmp_path / "r", resume=True, loss="balanced", stop_at=6))  # an epoch ends at step 6
    assert math.isfinite(torch.load(tmp_path / "r" / "last.pt", weights_only=False)["count"]["best_epoch"])
    run(options(tmp_path / "r", resume=True, loss="balanced", sigma_low_share=0.75, steps=7))
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=False)["count"]["best_epoch"] == math.inf


def test_resume_is_bit_identical(options, tmp_path):
    straight = run(options(tmp_path / "a"))
    run(options(tmp_path / "b", stop_at=3))
    resumed = run(options(tmp_path / "b", resume=True))
    assert straight["step"] == resumed["step"] == 6 and resumed["steps_this_run"] == 3
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    assert torch.equal(a["samplers"][0]["generator"], b["samplers"][0]["generator"])
    events = [json.loads(line)["event"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert events.count("start") == 2 and events[-1] == "end"


def test_ddp_world_size_one_over_gloo(options, tmp_path, monkeypatch):
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    summary = run(options(tmp_path / "ddp", steps=2, device="cpu"))
    assert summary["world"] == 1 and summary["step"] == 2
    assert (tmp_path / "ddp" / "last.pt").exists()
    assert not torch.distributed.is_initialized()


def test_backtrack_on_nan(options, tmp_path):
    trainer = Trainer(options(tmp_path), Dist(), console=None)
    trainer.step()
    with torch.no_grad():
        trainer.model.dictionary.fill_(math.nan)
    loss, _ = trainer.step()
    assert not math.isfinite(loss) and trainer.count.step == 1
    trainer.backtrack()
    assert trainer.count.step == 0 and trainer.count.lr_scale == pytest.approx(0.9)
    assert torch.isfinite(trainer.model.dictionary).all()


def test_a_backtrack_returns_to_the_last_healthy_epoch_end(options, tmp_path):
    """Not to the last checkpoint: a save can fall on a step that is already going bad."""
    trainer = Trainer(options(tmp_path), Dist(), console=None)
    for _ in range(3):
        trainer.step()
    assert not trainer.end_of_epoch()
    healthy = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.step()
    trainer.save()
    trainer.backtrack()
    assert trainer.count.step == 3 and trainer.count.backtracks == 1
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in healthy.items())


def test_a_backtrack_draws_new_batches(options, tmp_path):
    def after_backtrack():
        trainer = Trainer(options(tmp_path), Dist(), console=None)
        replay = trainer.sampler.batch(2)[1]  # the batch the anchor's stream would give
        trainer.sampler.load_state_dict(trainer.anchor["sampler"])
        trainer.step()
        trainer.backtrack()
        return replay, trainer.sampler.batch(2)[1]

    replay, fresh = after_backtrack()
    assert not torch.equal(replay, fresh)
    assert torch.equal(fresh, after_backtrack()[1])  # and reproducibly so


def test_sigterm_sets_the_stop_flag():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.raised
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_user_errors_are_one_line(tmp_path):
    code, out = invoke(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert code == 2 and "does not exist" in out and "Traceback" not in out
    code, out = invoke(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "sepia"])
    assert code == 2 and "not a preset" in out
    code, out = invoke(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--loss", "l7"])
    assert code == 2 and "not a loss" in out
    code, out = invoke(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--sigma-low-share", "1"])
    assert code == 2 and "not a share" in out and "Traceback" not in out


def test_bad_data_is_one_line_and_leaves_no_run_folder(images, tmp_path):
    (images / "zz.png").write_bytes(b"not an image")
    code, out = invoke(["train", str(images), "--out", str(tmp_path / "r1"), "--steps", "1", "--device", "cpu"])
    assert code == 2 and "zz.png: not a readable image" in out and "Traceback" not in out
    assert not (tmp_path / "r1").exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    code, out = invoke(["train", str(notes), "--out", str(tmp_path / "r2"), "--steps", "1", "--device", "cpu"])
    assert code == 2 and ".npz pack" in out


def test_sixteen_bit_images_keep_their_range(tmp_path):
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 40).reshape(32, 40).astype(np.uint16)
    (tmp_path / "d").mkdir()
    Image.fromarray(ramp).save(tmp_path / "d" / "ramp.png")
    (img,) = load_images(tmp_path / "d", 1)
    assert img.shape == (1, 32, 40) and img.min() == 0 and img.max() == 255 and (img == 255).float().mean() < 0.01


def test_a_damaged_checkpoint_is_one_line(images, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    args = ["train", str(images), "--out", str(run_dir), "--steps", "1", "--crop", "16", "--batch", "1",
            "--device", "cpu", "--resume"]
    (run_dir / "last.pt").write_text("garbage\n")
    code, out = invoke(args)
    assert code == 2 and "last.pt: not a readable circatt train checkpoint" in out and "Traceback" not in out
    torch.save({"model": {}}, run_dir / "last.pt")
    code, out = invoke(args)
    assert code == 2 and "not a circatt train checkpoint (no config, count" in out


def test_out_and_val_dir_errors_are_one_line(images, tmp_path):
    base = ["train", str(images), "--steps", "1", "--crop", "16", "--batch", "1", "--device", "cpu"]
    (tmp_path / "file").write_text("x")
    code, out = invoke(base + ["--out", str(tmp_path / "file")])
    assert code == 2 and "exists and is not a folder" in out
    code, out = invoke(base + ["--out", str(tmp_path / "file" / "run")])
    assert code == 2 and "cannot create the run folder" in out and "Traceback" not in out
    (tmp_path / "empty").mkdir()
    code, out = invoke(base + ["--out", str(tmp_path / "r"), "--val-dir", str(tmp_path / "empty")])
    assert code == 2 and "no images in" in out and not (tmp_path / "r").exists()


def test_an_unreadable_validation_image_is_left_out(images, tmp_path):
    (images / "zz.png").write_bytes(b"not an image")
    code, out = invoke(["train", str(images), "--out", str(tmp_path / "r"), "--steps", "1", "--crop", "16",
                        "--batch", "1", "--device", "cpu", "--val-dir", str(images)])
    assert code == 2  # training refuses the bad image; as a validation image it is only left out:
    good = tmp_path / "train"
    good.mkdir()
    (good / "a.png").write_bytes((images / "im0.png").read_bytes())
    code, out = invoke(["train", str(good), "--out", str(tmp_path / "r"), "--steps", "1", "--crop", "16",
                        "--batch", "1", "--device", "cpu", "--val-dir", str(images)])
    assert code == 0 and "zz.png: not a readable image" in out and "validation PSNR" in out, out


def test_giving_up_after_the_backtracks_is_one_line(images, tmp_path, monkeypatch):
    from circatt_cli import train

    monkeypatch.setattr(train.Trainer, "step", lambda self: (math.nan, math.nan))
    code, out = invoke(["train", str(images), "--out", str(tmp_path / "r"), "--steps", "5", "--crop", "16",
                        "--batch", "1", "--device", "cpu"])
    assert code == 1 and "diverged 21 times" in out and "Traceback" not in out, out


def test_a_new_run_does_not_overwrite_a_checkpoint(options, images, tmp_path):
    run(options(tmp_path / "r", steps=1))
    before = (tmp_path / "r" / "last.pt").read_bytes()
    args = ["train", str(images), "--out", str(tmp_path / "r"), "--steps", "2", "--crop", "16", "--device", "cpu"]
    code, out = invoke(args)
    assert code == 2 and "add --resume" in out and (tmp_path / "r" / "last.pt").read_bytes() == before
    code, out = invoke(args + ["--resume"])  # past the guard: the tiny run is not a gray-preset run
    assert code == 2 and "holds a different model config" in out, out


def test_a_damaged_pack_is_one_line(tmp_path):
    for name, data in (("empty.npz", b""), ("cut.npz", b"PK\x03\x04 cut short")):
        (tmp_path / name).write_bytes(data)
        code, out = invoke(["train", str(tmp_path / name), "--out", str(tmp_path / "r3"), "--steps", "1", "--device", "cpu"])
        assert code == 2 and f"{name}: not a readable .npz pack" in out and "Traceback" not in out, out


def test_file_names_in_errors_are_printed_as_they_are(images, tmp_path):
    (images / "smile:a:[b].png").write_bytes(b"not an image")
    code, out = invoke(["train", str(images), "--out", str(tmp_path / "r"), "--steps", "1", "--device", "cpu"])
    assert code == 2 and "smile:a:[b].png: not a readable image" in out, out
