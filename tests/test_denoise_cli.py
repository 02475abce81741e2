"""`circatt denoise` driven through Typer's CliRunner with tiny GroupCDL models on synthetic images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from circatt_cli.denoise import noisy_pixels, to_pixels
from circatt_cli.evaluate import load_image
from circatt_cli.imageio import read_image
from circatt_cli.noise import add_noise
from circatt_cli.tiling import MIN_TILE, axis_windows, run_tiled, run_with_retry

from synthetic import noisy, save, smooth_images

def test_gray_rgb_odd_and_tiny(cli, tmp_path):
    save(tmp_path / "gray.png", noisy(33, 47, 1))
    save(tmp_path / "rgb.jpg", noisy(40, 31))
    save(tmp_path / "tiny.png", noisy(8, 8))
    result = cli("denoise", "gray.png", "rgb.jpg", "tiny.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for name, size, mode in (("gray_denoised.png", (47, 33), "L"), ("rgb_denoised.jpg", (31, 40), "RGB"), ("tiny_denoised.png", (8, 8), "RGB")):
        out = Image.open(tmp_path / name)
        assert out.size == size and out.mode == mode
        assert np.asarray(out).std() > 0  # not a blank image
    assert "estimated" in result.output and "device: cpu" in result.output
    assert "rgb_denoised.jpg" in result.output  # summary table


def test_rgba_16bit_and_exif(cli, tmp_path):
    rgba = np.concatenate([noisy(20, 26), np.arange(20 * 26, dtype=np.uint8).reshape(20, 26, 1)], -1)
    save(tmp_path / "rgba.png", rgba)
    save(tmp_path / "deep.png", (noisy(21, 18, 1).astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 8
    save(tmp_path / "rot.png", noisy(12, 30), exif=exif.tobytes())
    result = cli("denoise", "rgba.png", "deep.png", "rot.png", "--sigma", "20")
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(tmp_path / "rgba_denoised.png"))
    assert out.shape == (20, 26, 4) and np.array_equal(out[..., 3], rgba[..., 3])
    deep = Image.open(tmp_path / "deep_denoised.png")
    assert deep.mode == "I;16"
    assert Image.open(tmp_path / "rot_denoised.png").size == (12, 30)
    assert "20.00 (given" in result.output


def test_tiled_matches_untiled_within_tolerance(cli, tmp_path):
    save(tmp_path / "big.png", noisy(80, 97, 1))
    assert cli("denoise", "big.png", "-o", "whole.png", "--sigma", "25").exit_code == 0
    result = cli("denoise", "big.png", "-o", "tiled.png", "--sigma", "25", "--tile", "40")
    assert result.exit_code == 0, result.output
    whole = np.asarray(Image.open(tmp_path / "whole.png")).astype(int)
    tiled = np.asarray(Image.open(tmp_path / "tiled.png")).astype(int)
    # Tolerance (docs/cli.md): with the margin covering the receptive field and every tile using the
    # whole image's mean, tiles differ from the untiled result by 8-bit rounding alone.
    diff = np.abs(whole - tiled)
    assert "tiles" in result.output
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_tiler_is_exact_for_a_local_operator():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 9, padding=4, bias=False)
    x = torch.rand(1, 2, 101, 130)
    with torch.no_grad():
        for margin in (4, 10):
            assert torch.allclose(run_tiled(conv, x, 48, margin), conv(x), atol=1e-6)
    windows = axis_windows(101, 48, 12, 10)
    assert windows[0].start == 0 and windows[-1].stop == 101
    assert all(w.lo == 0 or w.lo % 2 == 1 for w in windows)  # odd side: tiles start on the model's stride phase


def test_a_side_spanned_by_one_tile_and_its_margin_is_not_cut():
    assert len(axis_windows(1100, 1024, 64, 656)) == 1  # each tile's input would be the whole side anyway
    assert len(axis_windows(2048, 1024, 64, 656)) == 3


def test_out_of_memory_retries_with_smaller_tiles():
    """A denoiser that runs out of memory on inputs over 90 px a side: the tiler halves the tile until it
    fits, and the result still matches the untiled operator."""
    conv = torch.nn.Conv2d(1, 1, 5, padding=2, bias=False)
    x = torch.rand(1, 1, 150, 170)

    def limited(tile: torch.Tensor) -> torch.Tensor:
        if max(tile.shape[-2:]) > 90:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return conv(tile)

    def never_fits(tile: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    retries = []
    with torch.no_grad():
        out, used = run_with_retry(limited, x, 256, 6, on_retry=retries.append)
        assert used == retries[-1] and used + 2 * 6 <= 90 and len(retries) >= 2
        assert torch.allclose(out, conv(x), atol=1e-6)
    with pytest.raises(torch.OutOfMemoryError):  # down to the smallest tile, then the error is the user's
        run_with_retry(never_fits, x, 256, 6)
    assert used >= MIN_TILE


def test_bad_inputs_one_line_each_and_nonzero_exit(cli, tmp_path):
    save(tmp_path / "good.png", noisy(16, 16))
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    (tmp_path / "doc.txt").write_text("text")
    result = cli("denoise", "good.png", "corrupt.png", "missing.png", "doc.txt", "--sigma", "10")
    assert result.exit_code == 1
    assert (tmp_path / "good_denoised.png").exists()
    for name in ("corrupt.png", "missing.png", "doc.txt"):
        assert f"error: {name}:" in result.output
    assert "Traceback" not in result.output


def test_file_names_print_as_they_are(cli, tmp_path):
    save(tmp_path / "a[b]:smile:.png", noisy(16, 16))
    (tmp_path / "x[red]y.png").write_bytes(b"not an image")
    result = cli("denoise", "a[b]:smile:.png", "x[red]y.png", "--sigma", "10")
    assert result.exit_code == 1
    assert "error: x[red]y.png:" in result.output
    assert "a[b]:smile:.png: sigma 10.00" in result.output


def test_overwrite_protection(cli, tmp_path):
    save(tmp_path / "a.png", noisy(16, 16))
    (tmp_path / "a_denoised.png").write_bytes(b"precious")
    result = cli("denoise", "a.png", "--sigma", "10")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (tmp_path / "a_denoised.png").read_bytes() == b"precious"
    assert cli("denoise", "a.png", "--sigma", "10", "--overwrite").exit_code == 0
    assert Image.open(tmp_path / "a_denoised.png").size == (16, 16)
    before = (tmp_path / "a.png").read_bytes()
    result = cli("denoise", "a.png", "-o", "a.png", "--overwrite")
    assert result.exit_code == 1 and "is an input" in result.output
    assert (tmp_path / "a.png").read_bytes() == before


def test_an_output_option_that_cannot_work_is_a_usage_error(cli, tmp_path):
    save(tmp_path / "a.png", noisy(16, 16))
    save(tmp_path / "b.png", noisy(16, 16))
    (tmp_path / "notes").write_text("text")
    for args, words in ((["a.png", "-o", "result.txt"], "cannot write '.txt'"),
                        (["a.png", "b.png", "-o", "out.png"], "2 inputs"),
                        (["a.png", "-o", "notes"], "not a folder"),
                        (["a.png", "b.png", "-o", "notes/out"], "notes is a file"),
                        (["a.png", "-o", "notes/out.png"], "notes is a file")):
        result = cli("denoise", *args, "--sigma", "10")
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "result.txt").exists() and (tmp_path / "notes").read_text() == "text"


def test_folders_globs_and_output_folder(cli, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    save(tmp_path / "in" / "a.png", noisy(16, 18))
    save(tmp_path / "in" / "sub" / "b.png", noisy(14, 12, 1))
    result = cli("denoise", "in", "--recursive", "-o", "out", "--sigma", "15")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a_denoised.png").exists() and (tmp_path / "out" / "sub" / "b_denoised.png").exists()
    result = cli("denoise", "in/*.png", "--sigma", "15")
    assert result.exit_code == 0 and (tmp_path / "in" / "a_denoised.png").exists()
    assert cli("denoise", "nothing/*.png").exit_code == 1
    (tmp_path / "in" / "notes.txt").write_text("text")
    result = cli("denoise", "in/*.txt", "--sigma", "15")
    assert result.exit_code == 1 and "in/*.txt: matches no image file" in result.output, result.output


def test_usage_errors(cli, tmp_path):
    save(tmp_path / "a.png", noisy(16, 16))
    save(tmp_path / "b.png", noisy(16, 16))
    for args, text in (
        (("--device", "cuda:7"), "--device"),
        (("--device", "tpu"), "--device"),
        (("--sigma", "-3"), "--sigma"),
        (("--model", "nowhere.safetensors"), "--model"),
        (("--jpeg-quality", "0"), "--jpeg-quality"),
        (("--seed", "3"), "--add-noise"),
    ):
        result = cli("denoise", "a.png", *args)
        assert result.exit_code == 2 and text in result.output and "Traceback" not in result.output
    assert cli("denoise", "a.png", "b.png", "-o", "one.png").exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_absent_is_an_error_not_a_fallback(cli, tmp_path):
    save(tmp_path / "a.png", noisy(16, 16))
    result = cli("denoise", "a.png", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not (tmp_path / "a_denoised.png").exists()
    assert "auto -> cpu" in cli("denoise", "a.png", "--sigma", "5").output


def test_add_noise_and_reference(cli, tmp_path):
    save(tmp_path / "clean.png", noisy(24, 24))
    result = cli("denoise", "clean.png", "--add-noise", "25", "--seed", "3", "--reference", "clean.png", "-o", "out.png")
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "SSIM" in result.output
    first = (tmp_path / "out.png").read_bytes()
    cli("denoise", "clean.png", "--add-noise", "25", "--seed", "3", "-o", "out.png", "--overwrite")
    assert (tmp_path / "out.png").read_bytes() == first  # the seed makes it reproducible


def test_add_noise_is_evals_noisy_image(tmp_path):
    """For an 8-bit file and a sigma, --add-noise without --seed gives eval's noisy image of that file."""
    path = save(tmp_path / "a.png", noisy(20, 24))
    from_eval = to_pixels(add_noise(load_image(path, 3), "a.png", 25.0))
    assert np.array_equal(noisy_pixels(read_image(path).pixels, "a.png", 25.0, seed=None), from_eval)
    assert not np.array_equal(noisy_pixels(read_image(path).pixels, "a.png", 25.0, seed=1), from_eval)


def test_denoise_reproduces_an_eval_score(cli, tmp_path):
    """`denoise FILE --add-noise S --sigma S --reference FILE` prints the PSNR / SSIM that eval gives FILE at S."""
    smooth_images(tmp_path / "set", 1, 24, 28, channels=3)
    result = cli("eval", "--model", "color", "--data", "set", "--sigma", "25", "--json", "e.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "e.json").read_text())["images"][0]
    result = cli("denoise", "set/0.png", "--add-noise", "25", "--sigma", "25", "--reference", "set/0.png", "-o", "out.png")
    assert result.exit_code == 0, result.output
    assert f"-> {scored['psnr']:.2f}" in result.output and f"-> {scored['ssim']:.4f}" in result.output, result.output


def test_forced_gray_model_on_colour_image(cli, tmp_path):
    save(tmp_path / "c.png", noisy(20, 22))
    result = cli("denoise", "c.png", "--model", "gray", "--sigma", "10")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "c_denoised.png").mode == "RGB"


def test_a_warning_is_one_line_from_the_console_command(tiny_weights, tmp_path):
    """Weights without a model card warn: the user sees the message, not the source line that raised it."""
    save(tmp_path / "a.png", noisy(12, 12))
    shutil.copy(tiny_weights / "groupcdl-gray.safetensors", tmp_path / "mine.safetensors")
    args = ["denoise", "a.png", "--model", "mine.safetensors", "--sigma", "10", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "circatt_cli.app", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning: no model card mine.json" in done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr, done.stderr


def test_an_amplified_pattern_is_flagged_and_a_natural_image_is_not(cli, tmp_path):
    """The shipped gray model amplifies hard-edged stripes at sigma 0 (measured at period 2.5 px: PSNR 6.1 dB
    against the input); denoise says so. A smooth image at the same sigma passes quietly."""
    y, x = np.mgrid[0:96, 0:96]
    stripes = np.where(np.sin(2 * np.pi * (x * np.cos(0.5) + y * np.sin(0.5)) / 2.5) > 0, 242, 13).astype(np.uint8)
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    smooth_images(tmp_path / "s", 1, 96, 96, channels=1)
    shipped = Path(__file__).resolve().parents[1] / "weights" / "groupcdl-gray.safetensors"
    result = cli("denoise", "stripes.png", "s/0.png", "--sigma", "0", "--model", shipped, "--device", "cpu", "-o", "out")
    assert result.exit_code == 0, result.output
    flagged = [line for line in result.output.splitlines() if "differs from the input" in line]
    assert len(flagged) == 1 and "stripes.png" in flagged[0], result.output
    assert "check: changed by" in result.output
