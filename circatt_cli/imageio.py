"""Read and write images with Pillow: 8/16-bit, gray/RGB with an optional alpha, EXIF orientation
applied, ICC profile and EXIF carried over, atomic writes, and one-line errors."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Output format of each file extension (lower case, with the dot).
FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".bmp": "BMP",
}
SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}
ALPHA_FORMATS = {"PNG", "TIFF", "WEBP"}
ICC_FORMATS = {"PNG", "JPEG", "TIFF", "WEBP"}
EXIF_FORMATS = {"PNG", "JPEG", "TIFF", "WEBP"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# ITU-R BT.601 weights of R, G and B in luma.
LUMA = (0.299, 0.587, 0.114)


class ImageError(Exception):
    """A file that cannot be read or written as an image; the message is one line for the user."""


@dataclass(frozen=True)
class ImageData:
    """An image as the network sees it, plus what is needed to write it back the same way.

    `pixels` is float32 (H, W, C) in [0, 1] with C = 1 (gray) or 3 (RGB); `alpha` is the untouched
    alpha plane (H, W) in its stored dtype, or None.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    bits: int
    format: str
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]

    def with_pixels(self, pixels: np.ndarray) -> ImageData:
        """The same image (alpha, depth, metadata) with new (H, W, C) float pixels."""
        return replace(self, pixels=pixels)


def format_for(path: Path) -> str:
    """The Pillow format name for an output path, from its extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unsupported extension {path.suffix or '(none)'!r}; use one of {', '.join(sorted(FORMATS))}")
    return fmt


def is_supported(path: Path) -> bool:
    """Whether the path has an image extension this module reads."""
    return path.suffix.lower() in FORMATS


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image (use --recursive to denoise a folder)")
    format_for(path)
    return _open_image(path, str(path))


def _open_image(source: Path | io.BytesIO, name: str) -> Image.Image:
    """Image.open of a file or of encoded bytes, in one of the formats this module reads; `name` labels the errors."""
    try:
        img = Image.open(source)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (corrupt, or not a PNG/JPEG/TIFF/WebP/BMP file)") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as err:
        raise ImageError(f"{name}: cannot be read ({err})") from None
    if img.format not in FORMATS.values():
        img.close()
        raise ImageError(f"{name}: {img.format} images are not supported; use PNG, JPEG, TIFF, WebP or BMP")
    return img


def _wide_color(img: Image.Image) -> bool:
    """True for colour images stored with 16 bits per sample, which Pillow would cut to 8."""
    if img.mode not in ("LA", "RGB", "RGBA"):
        return False
    rawmodes = [str(tile.args[0] if isinstance(tile.args, tuple) else tile.args) for tile in img.tile]
    bits = img.tag_v2.get(258) if hasattr(img, "tag_v2") else None
    return any(";16" in raw for raw in rawmodes) or (isinstance(bits, tuple) and max(bits) > 8)


def _split(img: Image.Image, path: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(float pixels (H, W, C), alpha or None, bits) of a loaded image."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        data = np.asarray(img).astype(np.float32)
        if data.max(initial=0) > 65535 or data.min(initial=0) < 0:
            raise ImageError(f"{path}: 32-bit integer samples are not supported; save it with 8 or 16 bits")
        return (data / 65535.0)[..., None], None, 16
    if mode == "1":
        img, mode = img.convert("L"), "L"
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        mode = "RGBA" if has_alpha else "RGB"
        img = img.convert(mode)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img, mode = img.convert("RGB"), "RGB"
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageError(f"{path}: pixel mode {mode!r} is not supported; save it as 8/16-bit gray or RGB")
    data = np.asarray(img)
    data = data[..., None] if data.ndim == 2 else data
    alpha = data[..., -1].copy() if mode in ("LA", "RGBA") else None
    color = data[..., :-1] if alpha is not None else data
    return color.astype(np.float32) / 255.0, alpha, 8


def read_image(path: str | Path) -> ImageData:
    """Read an image file as float pixels in [0, 1], EXIF orientation applied; raises ImageError."""
    path = Path(path)
    return _read(_open(path), str(path))


def decode_image(data: bytes, name: str) -> ImageData:
    """`read_image` for a file's encoded bytes (e.g. from a training pack); `name` labels the errors."""
    return _read(_open_image(io.BytesIO(data), name), name)


def _read(img: Image.Image, name: str) -> ImageData:
    """Pixels, alpha, depth and metadata of an opened image (closed afterwards)."""
    try:
        with img:
            if _wide_color(img):
                raise ImageError(
                    f"{name}: 16-bit colour is not supported (Pillow reads it at 8 bits); "
                    "use 16-bit gray or 8-bit colour"
                )
            fmt = img.format
            icc = img.info.get("icc_profile")
            img.load()
            upright = ImageOps.exif_transpose(img)
            exif = upright.getexif().tobytes() if len(upright.getexif()) else None
            pixels, alpha, bits = _split(upright, name)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{name}: corrupt or truncated image ({err})") from None
    return ImageData(pixels=pixels, alpha=alpha, bits=bits, format=fmt, icc_profile=icc or None, exif=exif)


def quantize(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Clip float pixels to [0, 1] and round them to uint8 or uint16; refuses non-finite values."""
    if not np.isfinite(pixels).all():
        raise ImageError("the result has NaN or infinite values; nothing was written")
    top = 65535 if bits == 16 else 255
    return np.rint(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16 if bits == 16 else np.uint8)


def luma(pixels: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (H, W, 1) of (H, W, 3) float pixels in [0, 1], at 8 bits: the luma of the 8-bit
    samples rounded to an 8-bit level, the way the gray benchmarks were made (BSD68 from CBSD68)."""
    levels = np.rint(quantize(pixels, 8).astype(np.float64) @ np.asarray(LUMA))
    return (levels.astype(np.float32) / 255.0)[..., None]


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) pixels with `channels` channels for a model: RGB becomes its `luma` for one channel and
    gray is repeated for three (pixels that already fit are returned as they are)."""
    if pixels.shape[2] == channels:
        return pixels
    return luma(pixels) if channels == 1 else np.repeat(pixels, channels, axis=2)


def _alpha_at(alpha: np.ndarray, bits: int) -> np.ndarray:
    """The alpha plane in the sample type of `bits` (unchanged when it already is)."""
    if bits == 8 and alpha.dtype == np.uint8:
        return alpha
    return quantize(alpha.astype(np.float32) / float(np.iinfo(alpha.dtype).max), bits)


def to_pil(image: ImageData, fmt: str, path: Path) -> Image.Image:
    """The Pillow image to save in `fmt` (L, I;16, LA, RGB or RGBA): 16-bit only for gray PNG/TIFF."""
    bits = 16 if image.bits == 16 and fmt in SIXTEEN_BIT_FORMATS else 8
    samples = quantize(image.pixels, bits)
    if image.alpha is not None:
        if fmt not in ALPHA_FORMATS:
            raise ImageError(f"{path}: {fmt} cannot store the alpha channel; write PNG, TIFF or WebP instead")
        if bits == 16:
            bits, samples = 8, quantize(image.pixels, 8)
        samples = np.concatenate([samples, _alpha_at(image.alpha, bits)[..., None]], axis=-1)
    return Image.fromarray(samples[..., 0] if samples.shape[2] == 1 else samples)


def _save_options(image: ImageData, fmt: str, jpeg_quality: int) -> dict:
    options: dict = {}
    if fmt == "JPEG":
        options.update(quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    if fmt == "WEBP":
        options.update(lossless=True)
    if fmt == "TIFF":
        options.update(compression="tiff_deflate")
    if image.icc_profile and fmt in ICC_FORMATS:
        options["icc_profile"] = image.icc_profile
    if image.exif and fmt in EXIF_FORMATS:
        options["exif"] = image.exif
    return options


def _new_file_mode(path: Path) -> int:
    """The permissions a plain open() would give: the replaced file's, else 0o666 less the umask."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_image(image: ImageData, path: str | Path, jpeg_quality: int = 95, overwrite: bool = False) -> None:
    """Write atomically (a temporary file in the target folder, then a rename); raises ImageError."""
    path = Path(path)
    fmt = format_for(path)
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: already exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise ImageError(f"{path.parent}: output folder does not exist")
    pil = to_pil(image, fmt, path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only folder: name the output, not the temporary file
        raise ImageError(f"{path}: cannot be written ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            pil.save(handle, format=fmt, **_save_options(image, fmt, jpeg_quality))
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ImageError(f"{path}: cannot be written ({err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
