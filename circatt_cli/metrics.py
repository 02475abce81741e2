"""Image quality metrics on [0, 1] data, one value per image: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """10 log10(1 / MSE) per image (B,), MSE over channels and pixels, peak 1 (inf where identical)."""
    _check_pair(x, ref)
    mse = (x.double() - ref.double()).square().flatten(1).mean(dim=1)
    return (-10.0 * torch.log10(mse)).float()


def _gaussian(size: int, sigma: float, like: Tensor) -> Tensor:
    t = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-t.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, ref: Tensor) -> Tensor:
    """Mean SSIM per image (B,): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, peak 1, over the
    'valid' positions only (no padding), computed per channel and averaged over channels (color: RGB mean).

    Images smaller than 11 pixels on a side use the largest odd window that fits.
    """
    _check_pair(x, ref)
    x, ref = x.double(), ref.double()
    C = x.shape[1]
    size = min(SSIM_WINDOW, *x.shape[-2:])
    size -= 1 - size % 2
    g = _gaussian(size, SSIM_SIGMA, x)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, size, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=C)

    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(ref * ref) - mu_y.square()
    cov = blur(x * ref) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(2).mean(dim=2).mean(dim=1).float()
