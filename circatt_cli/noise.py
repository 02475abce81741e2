"""Noise: the seeded white Gaussian noise that `circatt eval` and `circatt denoise --add-noise` add, and blind
noise-level estimation (the median absolute deviation of the finest diagonal wavelet band)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

MAD_TO_STD = 0.6745


def file_seed(name: str, sigma255: float) -> int:
    """A seed from a file name and a noise level (0-255 scale), the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(f"{name}|{sigma255:g}".encode()).digest()[:8], "little") >> 1


def add_noise(clean: Tensor, name: str, sigma255: float, seed: int | None = None) -> Tensor:
    """clean (B, C, H, W) + white Gaussian noise of std sigma255 / 255, not clipped, drawn on the CPU.

    The generator is seeded with `seed`, or without one with `file_seed(name, sigma255)`: eval's noise for
    that file, so that `circatt denoise FILE --add-noise SIGMA` gives eval's noisy image of FILE."""
    generator = torch.Generator().manual_seed(file_seed(name, sigma255) if seed is None else seed)
    return clean + torch.randn(clean.shape, generator=generator) * (sigma255 / 255.0)


def haar_diagonal(img: Tensor) -> Tensor:
    """The orthonormal Haar HH band (B, C, H//2, W//2) of img (B, C, H, W); white noise keeps its std."""
    B, C, H, W = img.shape
    kernel = img.new_tensor([[0.5, -0.5], [-0.5, 0.5]]).expand(C, 1, 2, 2)
    return F.conv2d(img, kernel, stride=2, groups=C)


def estimate_sigma(img: Tensor) -> Tensor:
    """Per-image noise std (B,) on the [0, 1] scale: median(|HH|) / 0.6745 over every channel.

    Images smaller than 2x2 give 0 (no diagonal band to measure).
    """
    if img.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(img.shape)}")
    if min(img.shape[-2:]) < 2:
        return img.new_zeros(img.shape[0])
    band = haar_diagonal(img.to(torch.float32)).flatten(1)
    return (band.abs().median(dim=1).values / MAD_TO_STD).to(img.dtype)
