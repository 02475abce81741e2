"""Tiled inference for images too large to denoise at once.

The image is cut into overlapping output windows of `tile` pixels; each is run with up to `margin`
extra pixels of context on every side (clipped at the image edges), the context is cropped, and
overlaps are blended with raised-cosine weights. Every tile's input starts on the untiled stride-2
phase, so its latent grid lines up with the untiled one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CPU_PIXEL_BUDGET = 1024 * 1024
MIN_TILE = 32
GPU_MEMORY_FRACTION = 0.6
DEFAULT_BYTES_PER_PIXEL = 8192


@dataclass(frozen=True)
class Window:
    """One output window [start, stop) along an axis, run on the input range [lo, hi)."""

    start: int
    stop: int
    lo: int
    hi: int


def _even_down(n: int) -> int:
    return n - n % 2


def _context(start: int, stop: int, margin: int, length: int) -> Window:
    """Add up to `margin` pixels each side, clipped to the image, so that the model's stride-2 grid on the
    tile is the untiled one: an odd side is padded by one pixel before, so the grid starts at `length % 2`."""
    parity = length % 2
    lo = max(0, start - margin)
    if lo > 0:
        lo -= (lo - parity) % 2
    hi = min(length, stop + margin)
    hi += (hi - parity) % 2
    return Window(start, stop, lo, hi)


def axis_windows(length: int, tile: int, overlap: int, margin: int) -> list[Window]:
    """Output windows covering [0, length), overlapping by at least `overlap`.

    One window when the axis fits in a tile, or when every tile's input (tile plus margins) would span
    the whole axis anyway. Each input range [lo, hi) adds context on the untiled stride-2 phase.
    """
    if length <= tile + margin:
        return [Window(0, length, 0, length)]
    step = max(2, tile - overlap)
    starts = sorted(set(range(0, length - tile, step)) | {length - tile})
    return [_context(s, s + tile, margin, length) for s in starts]


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
        wr = blend_weights(r, H, overlap, image.device)
        for c in cols:
            wc = blend_weights(c, W, overlap, image.device)
            out = fn(image[:, :, r.lo : r.hi, c.lo : c.hi])
            core = out[:, :, r.start - r.lo : r.stop - r.lo, c.start - c.lo : c.stop - c.lo]
            weight = wr[:, None] * wc[None, :]
            acc[:, :, r.start : r.stop, c.start : c.stop] += core.double() * weight
            norm[r.start : r.stop, c.start : c.stop] += weight
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    return (acc / norm).to(image.dtype)


def auto_tile(device: torch.device, margin: int, bytes_per_pixel: int = DEFAULT_BYTES_PER_PIXEL) -> int:
    """A tile side from free GPU memory on CUDA, a fixed pixel budget on the CPU. The budget covers tile plus
    margins, unless the margins would take more than half of it: then the tile alone gets the budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        pixels = free * GPU_MEMORY_FRACTION / bytes_per_pixel
    else:
        pixels = CPU_PIXEL_BUDGET
    side = int(math.sqrt(pixels))
    tile = side - 2 * margin if side - 2 * margin >= side // 2 else side
    return max(MIN_TILE, tile - tile % 16)


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
