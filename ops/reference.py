"""Plain-PyTorch backend: the oracle of the tests and the fallback where no compiler is found.

Each function loops over the K window offsets and shifts whole images with torch.roll, so it
holds nothing larger than one image per step. Shapes follow the kernel contract: q, k, x are
(B, G, Ch, H, W) real tensors and weights are (B, G, H, W, K) with slot s = a * window + c.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

name = "reference"


def _offsets(window: int) -> Iterator[tuple[int, int, int]]:
    """(slot, di, dj): slot s = a*window + c looks at the key (i + di, j + dj), di = a - r, dj = c - r."""
    r = (window - 1) // 2
    for a in range(window):
        for c in range(window):
            yield a * window + c, a - r, c - r


def _gather(x: torch.Tensor, di: int, dj: int) -> torch.Tensor:
    """The image whose pixel (i, j) holds x at ((i + di) mod H, (j + dj) mod W)."""
    return torch.roll(x, shifts=(-di, -dj), dims=(-2, -1))


def similarity(q: torch.Tensor, k: torch.Tensor, window: int, distance: bool) -> torch.Tensor:
    """Windowed dot product or halved negative squared distance, (B, G, H, W, K)."""
    B, G, _, H, W = q.shape
    out = q.new_empty(B, G, H, W, window * window)
    for s, di, dj in _offsets(window):
        ks = _gather(k, di, dj)
        if distance:
            out[..., s] = (q - ks).square().sum(2).mul_(-0.5)
        else:
            out[..., s] = (q * ks).sum(2)
    return out


def apply(weights: torch.Tensor, x: torch.Tensor, window: int, transposed: bool) -> torch.Tensor:
    """y = A x (gather over each row's keys) or y = A^T x (scatter of each row onto its keys)."""
    y = torch.zeros_like(x)
    for s, di, dj in _offsets(window):
        w = weights[..., s].unsqueeze(2)
        if transposed:
            y += torch.roll(w * x, shifts=(di, dj), dims=(-2, -1))
        else:
            y += w * _gather(x, di, dj)
    return y
