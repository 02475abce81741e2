"""circatt_cli.imageio: formats, bit depths, alpha, EXIF orientation, metadata, atomic writes, errors."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from PIL import Image, ImageCms

from circatt_cli.imageio import ImageData, ImageError, luma, quantize, read_image, to_channels, write_image


def _rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp", ".webp", ".jpg"])
def test_rgb_round_trip(tmp_path, ext):
    src = tmp_path / f"a{ext}"
    Image.fromarray(_rgb()).save(src, **({"lossless": True} if ext == ".webp" else {}))
    img = read_image(src)
    assert img.pixels.shape == (12, 10, 3) and img.pixels.dtype == np.float32 and img.bits == 8
    write_image(img, tmp_path / f"b{ext}", jpeg_quality=100)
    back = np.asarray(Image.open(tmp_path / f"b{ext}").convert("RGB")).astype(int)
    tolerance = 6 if ext == ".jpg" else 0
    assert np.abs(back - np.asarray(Image.open(src).convert("RGB")).astype(int)).max() <= tolerance


def test_luma_is_bt601_rounded_to_eight_bits():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [255, 255, 255]]], dtype=np.uint8)
    y = luma(rgb.astype(np.float32) / 255.0)
    assert y.shape == (1, 5, 1) and y.dtype == np.float32
    levels = np.array([[76, 150, 29, 18, 255]], dtype=np.float32)  # rint(0.299 R + 0.587 G + 0.114 B)
    assert np.array_equal(y[..., 0], levels / 255.0)


def test_to_channels_matches_a_model():
    rgb = _rgb().astype(np.float32) / 255.0
    assert np.array_equal(to_channels(rgb, 1), luma(rgb))
    assert to_channels(rgb, 3) is rgb
    gray = rgb[..., :1]
    assert np.array_equal(to_channels(gray, 3), np.repeat(gray, 3, axis=2))


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_sixteen_bit_gray_stays_sixteen_bit(tmp_path, ext):
    data = np.random.default_rng(1).integers(0, 65536, (9, 7), dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / f"a{ext}")
    img = read_image(tmp_path / f"a{ext}")
    assert img.bits == 16 and img.channels == 1
    write_image(img, tmp_path / f"b{ext}")
    out = Image.open(tmp_path / f"b{ext}")
    assert out.mode == "I;16"
    assert np.array_equal(np.asarray(out), data)


def test_alpha_passes_through_untouched(tmp_path):
    rgba = np.concatenate([_rgb(), np.random.default_rng(2).integers(0, 256, (12, 10, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.channels == 3 and np.array_equal(img.alpha, rgba[..., 3])
    write_image(img.with_pixels(np.zeros_like(img.pixels)), tmp_path / "b.png")
    out = np.asarray(Image.open(tmp_path / "b.png"))
    assert out.shape == (12, 10, 4) and np.array_equal(out[..., 3], rgba[..., 3]) and out[..., :3].max() == 0


def test_gray_alpha(tmp_path):
    la = np.random.default_rng(3).integers(0, 256, (5, 6, 2), dtype=np.uint8)
    Image.fromarray(la).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.channels == 1 and np.array_equal(img.alpha, la[..., 1])
    write_image(img, tmp_path / "b.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), la)


def test_alpha_to_jpeg_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="alpha"):
        write_image(read_image(tmp_path / "a.png"), tmp_path / "b.jpg")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_exif_orientation_applied_and_exif_icc_carried(tmp_path, ext):
    rgb = _rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "circatt test camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(rgb).save(tmp_path / f"a{ext}", exif=exif.tobytes(), icc_profile=icc, quality=100)
    img = read_image(tmp_path / f"a{ext}")
    assert img.size == (6, 4)
    if ext == ".png":
        assert np.array_equal(np.rint(img.pixels * 255).astype(np.uint8), np.rot90(rgb, k=-1))
    write_image(img, tmp_path / f"b{ext}")
    out = Image.open(tmp_path / f"b{ext}")
    assert out.size == (4, 6)  # (width, height): stored upright
    assert out.getexif().get(0x0112, 1) == 1 and out.getexif()[0x010F] == "circatt test camera"
    assert out.info.get("icc_profile") == icc


def test_errors_are_one_line(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(_rgb()).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    cases = {
        "missing.png": "no such file",
        "corrupt.png": "not a readable image",
        "notes.txt": "unsupported extension",
        "truncated.png": "corrupt|truncated|not a readable",
    }
    for name, message in cases.items():
        with pytest.raises(ImageError, match=message) as info:
            read_image(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(ImageError, match="folder"):
        read_image(tmp_path)


def test_sixteen_bit_colour_is_refused_not_truncated(tmp_path):
    import struct
    import zlib

    h, w = 3, 4
    rows = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    (tmp_path / "c16.png").write_bytes(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="16-bit colour"):
        read_image(tmp_path / "c16.png")


def test_write_is_atomic_and_respects_overwrite(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    target = tmp_path / "b.png"
    target.write_bytes(b"keep me")
    with pytest.raises(ImageError, match="already exists"):
        write_image(img, target)
    assert target.read_bytes() == b"keep me"
    write_image(img, target, overwrite=True)
    assert Image.open(target).size == (10, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary file left


def test_non_finite_output_is_never_written(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    bad = img.pixels.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        write_image(img.with_pixels(bad), tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()
    assert list(quantize(np.array([-0.5, 0.5, 1.5]), 8)) == [0, 128, 255]


def test_an_output_folder_that_refuses_files_names_the_output(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # a read-only folder, also when the tests run as root
    image = ImageData(pixels=np.zeros((4, 4, 1), np.float32), alpha=None, bits=8, format="PNG")
    with pytest.raises(ImageError, match=r"out\.png: cannot be written \(Permission denied\)"):
        write_image(image, tmp_path / "out.png")
