"""Synthetic test images: the tests never touch real image data (the tiny models are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noisy(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth pattern plus noise, uint8 (h, w, channels) or (h, w) for one channel."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    base = np.stack([0.5 + 0.3 * np.sin(6 * xx + k) * np.cos(4 * yy) for k in range(channels)], -1)
    data = base + np.random.default_rng(seed).normal(0, 0.08, base.shape)
    out = np.clip(np.rint(data * 255), 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    """Write a uint8/uint16 array as an image file."""
    Image.fromarray(array).save(path, **kwargs)
    return path


def smooth_images(folder: Path, count: int, height: int, width: int, channels: int, prefix: str = "") -> Path:
    """`count` clean, smooth sinusoid images (uint8 PNG, `prefix`0.png ...) in a new `folder`."""
    folder.mkdir()
    yy, xx = np.mgrid[:height, :width]
    for i in range(count):
        planes = [127 + 100 * np.sin(xx / (4 + i + c) + yy / 9) for c in range(channels)]
        pixels = np.stack(planes, axis=-1).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"{prefix}{i}.png")
    return folder
