"""The x8 geometric self-ensemble (circatt_cli.ensemble) and its --ensemble options in denoise and eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from circatt_cli.ensemble import TRANSFORMS, forward, inverse, self_ensemble
from circatt_cli.evaluate import run_eval
from circatt_cli.model import preset_for
from circatt_cli.weights import load_model, preset_weights
from synthetic import smooth_images


def test_the_eight_transforms_are_distinct_and_each_inverse_undoes_its_own():
    x = torch.randn(2, 3, 5, 7)  # not square: a quarter turn swaps the sizes
    seen = []
    for turns, mirror in TRANSFORMS:
        y = forward(x, turns, mirror)
        assert y.shape[-2:] == ((7, 5) if turns % 2 else (5, 7))
        assert torch.equal(inverse(y, turns, mirror), x)
        seen.append(y)
    square = torch.randn(1, 1, 6, 6)
    images = [forward(square, t, m) for t, m in TRANSFORMS]
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


def test_a_function_that_commutes_with_the_transforms_is_unchanged():
    x = torch.randn(1, 2, 9, 6)
    pointwise = lambda t: t.square() + 1  # noqa: E731
    assert torch.allclose(self_ensemble(pointwise)(x), pointwise(x), rtol=1e-6, atol=0)


def test_what_a_function_adds_by_position_is_averaged_over_all_eight():
    """A function adding its column index: on an n x n image the eight orientations of that ramp
    (j, n-1-j, i, n-1-i, each twice) average to the constant (n-1)/2."""
    n = 6
    x = torch.randn(1, 1, n, n)
    ramp = lambda t: t + torch.arange(t.shape[-1], dtype=t.dtype)  # noqa: E731
    assert torch.allclose(self_ensemble(ramp)(x), x + (n - 1) / 2, atol=1e-6)


def test_eval_scores_the_ensemble_beside_the_model(tmp_path, tiny_weights):
    folder = smooth_images(tmp_path / "clean", 2, 20, 24, channels=1)
    model = load_model(preset_weights(preset_for(1), tiny_weights))
    results = run_eval(model, [folder], [25.0], ensemble=True)
    assert [(r.image, r.method) for r in results] == [(f"{i}.png", m) for i in range(2) for m in ("groupcdl", "groupcdl-x8")]
    plain, x8 = results[0], results[1]
    assert x8.sigma_used == 25.0 and np.isfinite(x8.psnr) and x8.psnr != plain.psnr


def test_denoise_with_ensemble_commutes_with_a_mirror_where_the_model_alone_does_not(cli, tmp_path):
    """The mean over the eight orientations is the same eight runs for a mirrored input, so the result
    of the mirror is the mirror of the result (to the 8-bit rounding); the tests' untrained model alone
    is far from that."""
    smooth_images(tmp_path / "in", 1, 30, 44, channels=1)
    image = np.asarray(Image.open(tmp_path / "in" / "0.png"))
    Image.fromarray(image[:, ::-1].copy()).save(tmp_path / "in" / "mirrored.png")
    out = {}
    for flag, tag in (([], "plain"), (["--ensemble"], "x8")):
        result = cli("denoise", "in/0.png", "in/mirrored.png", "--sigma", "20", "--device", "cpu", "-o", tag, *flag)
        assert result.exit_code == 0, result.output
        out[tag] = [np.asarray(Image.open(tmp_path / tag / name), dtype=float) for name in ("0_denoised.png", "mirrored_denoised.png")]
    gap = {tag: np.abs(a - b[:, ::-1]).max() for tag, (a, b) in out.items()}
    assert gap["x8"] <= 1 and gap["plain"] > 5
    assert np.abs(out["x8"][0] - out["plain"][0]).mean() > 0
