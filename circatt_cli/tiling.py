"""Tiled inference for images too large to denoise at once.

The image is cut into overlapping output windows of `tile` pixels; each is run with `margin` extra
pixels of context on every side (taken periodically, as the model's wrap-around attention sees the
whole image), the margin is cropped, and overlaps are blended with raised-cosine weights. Every
tile's input starts on the untiled stride-2 phase, so its latent grid lines up with the untiled one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CPU_PIXEL_BUDGET = 768 * 768
MIN_TILE = 32
GPU_MEMORY_FRACTION = 0.6
DEFAULT_BYTES_PER_PIXEL = 8192


@dataclass(frozen=True)
class Window:
    """One output window [start, stop) along an axis, run on the input range [lo, hi) (periodic indices)."""

    start: int
    stop: int
    lo: int
    hi: int


def _even_down(n: int) -> int:
    return n - n % 2


def _context(start: int, stop: int, margin: int, parity: int) -> Window:
    """Add at least `margin` pixels each side, the range starting on the untiled stride phase, even long."""
    lo = start - margin
    lo -= (lo - parity) % 2
    hi = stop + margin
    hi += (hi - lo) % 2
    return Window(start, stop, lo, hi)


def axis_windows(length: int, tile: int, overlap: int, margin: int) -> list[Window]:
    """Output windows covering [0, length); one window with no extra context when the axis fits in a tile.

    The model pads an odd side by one pixel before, so its stride-2 grid starts at pixel `length % 2`;
    every tile's input starts on that phase too, so tiles see the untiled latent grid.
    """
    if length <= tile:
        return [Window(0, length, 0, length)]
    step = max(2, tile - overlap)
    starts = sorted(set(range(0, length - tile, step)) | {length - tile})
    return [_context(s, s + tile, margin, length % 2) for s in starts]


def blend_weights(window: Window, length: int, overlap: int, device: torch.device) -> Tensor:
    """Raised-cosine ramps over the first/last `overlap` pixels of a window, 1 elsewhere and at image edges."""
    size = window.stop - window.start
    weights = torch.ones(size, device=device, dtype=torch.float64)
    ramp_len = min(overlap, size // 2)
    if ramp_len == 0:
        return weights
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp_len, device=device, dtype=torch.float64) + 0.5) / ramp_len)
    if window.start > 0:
        weights[:ramp_len] = ramp
    if window.stop < length:
        weights[size - ramp_len :] = ramp.flip(0)
    return weights


def _periodic_index(window: Window, length: int, device: torch.device) -> Tensor:
    return torch.arange(window.lo, window.hi, device=device) % length


def run_tiled(
    fn: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int,
    margin: int,
    overlap: int | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Apply `fn` ((1, C, h, w) -> same shape) to `image` (1, C, H, W) tile by tile and blend the results.

    `on_tile(done, total)` is called after each tile.
    """
    _, _, H, W = image.shape
    tile = max(2, _even_down(tile))
    overlap = min(tile // 4, 64) if overlap is None else overlap
    rows, cols = axis_windows(H, tile, overlap, margin), axis_windows(W, tile, overlap, margin)
    total = len(rows) * len(cols)
    if total == 1:
        out = fn(image)
        if on_tile is not None:
            on_tile(1, 1)
        return out
    acc = torch.zeros(image.shape, dtype=torch.float64, device=image.device)
    norm = torch.zeros((H, W), dtype=torch.float64, device=image.device)
    done = 0
    for r in rows:
        ri, wr = _periodic_index(r, H, image.device), blend_weights(r, H, overlap, image.device)
        for c in cols:
            ci, wc = _periodic_index(c, W, image.device), blend_weights(c, W, overlap, image.device)
            out = fn(image[:, :, ri][:, :, :, ci])
            core = out[:, :, r.start - r.lo : r.stop - r.lo, c.start - c.lo : c.stop - c.lo]
            weight = wr[:, None] * wc[None, :]
            acc[:, :, r.start : r.stop, c.start : c.stop] += core.double() * weight
            norm[r.start : r.stop, c.start : c.stop] += weight
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    return (acc / norm).to(image.dtype)


def auto_tile(device: torch.device, margin: int, bytes_per_pixel: int = DEFAULT_BYTES_PER_PIXEL) -> int:
    """A tile side that fits: free GPU memory on CUDA, a fixed pixel budget on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        pixels = free * GPU_MEMORY_FRACTION / bytes_per_pixel
    else:
        pixels = CPU_PIXEL_BUDGET
    side = int(math.sqrt(pixels)) - 2 * margin
    return max(MIN_TILE, side - side % 16)


def run_with_retry(
    fn: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int,
    margin: int,
    on_tile: Callable[[int, int], None] | None = None,
    on_retry: Callable[[int], None] | None = None,
) -> tuple[Tensor, int]:
    """`run_tiled`, halving the tile after a CUDA out-of-memory error; returns (output, tile used)."""
    tile = min(tile, max(image.shape[-2:]))
    while True:
        try:
            return run_tiled(fn, image, tile, margin, on_tile=on_tile), tile
        except torch.OutOfMemoryError:
            if image.device.type == "cuda":
                torch.cuda.empty_cache()
            if tile // 2 < MIN_TILE:
                raise
            tile = _even_down(tile // 2)
            if on_retry is not None:
                on_retry(tile)
