"""`circatt inspect-attention` writes readable PNGs, exports the adjacency, and prints the summary."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import circatt_ops as ca
from circatt_cli import attention_plots as plots
from circatt_cli.evaluate import load_image
from circatt_cli.weights import load_model
from synthetic import noisy

PNGS = ("adjacency_pattern.png", "attention_pixels.png", "effective_neighbours.png")


def test_writes_valid_pngs_export_and_summary(cli, tmp_path):
    Image.fromarray(noisy(41, 50)).save(tmp_path / "img.png")
    result = cli("inspect-attention", "img.png", "--out", "pics", "--layer", "5", "--export", "adj.pt", "--bccb", "--sigma", "20")
    assert result.exit_code == 0, result.output
    for name in (*PNGS, "bccb_kernel.png"):
        with Image.open(tmp_path / "pics" / name) as png:
            png.verify()
            assert png.format == "PNG" and png.size[0] > 100
    saved = torch.load(tmp_path / "adj.pt", weights_only=False)
    h, w = saved["latent_size"]
    assert (h, w) == (21, 25) and saved["window"] == 5 and saved["layer"] == 5
    assert saved["values"].shape == (1, 1, h, w, 5, 5)
    csr = saved["csr"]
    assert csr.layout == torch.sparse_csr and csr.shape == (1, 1, h * w, h * w)
    assert torch.allclose(csr.to_dense().sum(-1), torch.ones(1, 1, h * w), atol=1e-5)  # rows are stochastic
    for text in ("layer", "window", "sparsity", "stored entries", "half resolution", "\u28ff"):
        assert text in result.output or text.replace("\u28ff", "") in result.output
    assert any(0x2800 <= ord(ch) <= 0x28FF for ch in result.output)  # the braille spy plot


def test_chosen_pixels_and_tiny_image(cli, tmp_path):
    Image.fromarray(noisy(8, 8, 1)).save(tmp_path / "tiny.png")
    result = cli("inspect-attention", "tiny.png", "--out", "o", "--pixel", "3,4", "--pixel", "7,7")
    assert result.exit_code == 0, result.output
    assert "(3, 4) -> latent (1, 2)" in result.output
    for name in PNGS:
        assert (tmp_path / "o" / name).stat().st_size > 0


def test_images_with_a_side_of_one_or_two_pixels(cli, tmp_path):
    """denoise takes them, so inspect-attention draws them too (no gradient along a side of one pixel)."""
    for h, w in ((1, 1), (1, 9), (9, 1), (2, 2)):
        Image.fromarray(noisy(h, w)).save(tmp_path / f"{h}x{w}.png")
        result = cli("inspect-attention", f"{h}x{w}.png", "--out", f"o{h}x{w}")
        assert result.exit_code == 0, result.output
        assert all((tmp_path / f"o{h}x{w}" / name).stat().st_size > 0 for name in PNGS)


def test_a_gray_model_sees_the_gray_image_that_eval_scores(cli, tmp_path):
    """--model gray on a colour image shows the attention on the 8-bit luma that `circatt eval` uses."""
    Image.fromarray(noisy(24, 30)).save(tmp_path / "rgb.png")
    result = cli("inspect-attention", "rgb.png", "--model", "gray", "--out", "o", "--sigma", "25", "--export", "adj.pt")
    assert result.exit_code == 0, result.output
    net = load_model("gray")
    G, _, _ = net.attention_at(load_image(tmp_path / "rgb.png", 1), torch.tensor([25 / 255]), net.config.iterations)
    assert torch.equal(torch.load(tmp_path / "adj.pt", weights_only=False)["values"], G.values)


def test_bad_pixel_layer_and_file(cli, tmp_path):
    Image.fromarray(noisy(16, 16)).save(tmp_path / "a.png")
    assert cli("inspect-attention", "a.png", "--out", "o", "--pixel", "99,1").exit_code == 2
    assert cli("inspect-attention", "a.png", "--out", "o", "--pixel", "x").exit_code == 2
    assert cli("inspect-attention", "a.png", "--out", "o", "--layer", "99").exit_code == 2
    result = cli("inspect-attention", "missing.png", "--out", "o")
    assert result.exit_code == 1 and "no such file" in result.output and "Traceback" not in result.output
    result = cli("inspect-attention", "a.png", "--out", "a.png")
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


def test_an_unwritable_export_is_one_line(cli, tmp_path):
    Image.fromarray(noisy(16, 16)).save(tmp_path / "a.png")
    (tmp_path / "folder").mkdir()
    result = cli("inspect-attention", "a.png", "--out", "o", "--export", "a.png/adj.pt")
    assert result.exit_code == 2 and "--export" in result.output and "does not exist" in result.output, result.output
    assert not (tmp_path / "o").exists()  # refused before the model ran
    result = cli("inspect-attention", "a.png", "--out", "o", "--export", "folder")
    assert result.exit_code == 2 and "--export" in result.output and "folder is a folder" in result.output, result.output
    assert isinstance(result.exception, SystemExit)  # a one-line error, not an uncaught exception
    assert not (tmp_path / "o").exists()  # refused before the model ran


def test_a_failing_model_run_is_one_line_and_its_traceback_comes_with_debug(cli, tmp_path, monkeypatch):
    from circatt_cli.model import GroupCDL

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory (simulated)")

    Image.fromarray(noisy(16, 16)).save(tmp_path / "a.png")
    monkeypatch.setattr(GroupCDL, "attention_at", fail)
    result = cli("inspect-attention", "a.png", "--out", "o")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "error: a.png: RuntimeError: DefaultCPUAllocator" in result.output and "Traceback" not in result.output
    assert "Traceback" in cli("inspect-attention", "a.png", "--out", "o", "--debug").output


def test_missing_weights_is_one_line(cli, tmp_path, monkeypatch):
    Image.fromarray(noisy(16, 16)).save(tmp_path / "a.png")
    monkeypatch.setenv("CIRCATT_WEIGHTS", str(tmp_path / "empty"))
    for command in (["inspect-attention", "a.png", "--out", "o"], ["denoise", "a.png", "--sigma", "10"]):
        result = cli(*command)
        assert result.exit_code == 1 and "no weights file" in result.output, result.output
        assert "Traceback" not in result.output and "WeightsError" not in result.output


def test_occupancy_shows_band_and_wrap_corners():
    G = ca.Circulant(torch.rand(1, 1, 30, 40, 9), window=3)
    picture = plots.occupancy(G, dots=60)
    assert picture.diagonal().all()  # the band
    assert picture[0, -1] and picture[-1, 0]  # the wrap-around corners
    assert not picture[0, 30] and picture.mean() < 0.2


def test_maps_match_the_dense_matrix():
    G = ca.Circulant(torch.rand(1, 1, 6, 7, 9).softmax(-1), window=3)
    dense = G.to_dense()[0, 0]
    assert np.allclose(plots.attention_map(G, 0, 6).ravel(), dense[6].numpy())
    block = plots.zoom_block(G, size=10)
    assert np.allclose(block, dense[:10, :10].numpy())
    p = dense.double()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    assert np.allclose(plots.effective_neighbours(G).ravel(), torch.exp(entropy).numpy(), rtol=1e-4)


def test_the_cli_does_not_import_matplotlib_until_it_draws():
    """matplotlib takes a quarter of a second to import; commands that draw nothing do not pay it."""
    code = "import sys, circatt_cli.app; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
