"""An independent dense oracle for the circulant ops, written from the spec without the library.

Every pair (query n, key m) is formed explicitly on the full HW x HW grid, and a boolean mask keeps
the wrapped window, so a slot-ordering or flattening bug in the library cannot hide here.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def window_mask(height: int, width: int, window: int) -> torch.Tensor:
    """(HW, HW) bool: key m lies in the wrapped window of query n (row-major n = i*W + j).

    Key (p, t) is in the window of query (i, j) iff (p - i + r) mod H <= 2r and likewise for columns.
    """
    r = (window - 1) // 2
    i = torch.arange(height).repeat_interleave(width)
    j = torch.arange(width).repeat(height)
    rows_ok = (i.view(1, -1) - i.view(-1, 1) + r) % height <= 2 * r
    cols_ok = (j.view(1, -1) - j.view(-1, 1) + r) % width <= 2 * r
    return rows_ok & cols_ok


def dense_similarity(q: torch.Tensor, k: torch.Tensor, window: int, kind: str, heads: int) -> torch.Tensor:
    """(B, heads, HW, HW) similarity on the window, zero elsewhere."""
    B, C, H, W = q.shape
    qf = q.reshape(B, heads, C // heads, H * W)
    kf = k.reshape(B, heads, C // heads, H * W)
    if kind == "dot":
        s = torch.einsum("bgcn,bgcm->bgnm", qf, kf.conj()).real
    else:
        diff = qf.unsqueeze(-1) - kf.unsqueeze(-2)
        s = -0.5 * (diff.abs() ** 2).sum(2)
    return s * window_mask(H, W, window).to(s.device)


def dense_adjacency(q, k, window, kind, heads, scale=1.0):
    """Masked softmax over each row's window: (B, heads, HW, HW)."""
    H, W = q.shape[-2:]
    s = dense_similarity(q, k, window, kind, heads) * scale
    mask = window_mask(H, W, window).to(s.device)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)


def dense_apply(A: torch.Tensor, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """y = A x per head for x (B, C, H, W); A (B, heads, HW, HW) real."""
    B, C, H, W = x.shape
    heads = A.shape[1]
    xf = x.reshape(B, heads, C // heads, H * W)
    mat = A.transpose(-1, -2) if transposed else A
    y = torch.einsum("bgnm,bgcm->bgcn", mat.to(x.dtype), xf)
    return y.reshape(B, C, H, W)
