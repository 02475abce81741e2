"""Pictures of a circulant-sparse adjacency: sparsity pattern, per-pixel attention maps, effective neighbours.

Everything here works on one (batch 0, head 0) slice of a `Circulant` on the latent grid (h, w) and never
builds the dense hw x hw matrix of a large image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

import circatt_ops as ca

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

OVERVIEW_DOTS = 512
ZOOM_ROWS = 256


def _figure(width: float, height: float) -> Figure:
    """A matplotlib figure, imported here: matplotlib takes a quarter of a second to import, and every
    `circatt` command imports this module."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def occupancy(G: ca.Circulant, dots: int = OVERVIEW_DOTS) -> np.ndarray:
    """A dots x dots boolean picture of the whole hw x hw pattern: a cell is set if any entry falls in it.

    Rows are sampled (a few per cell), so the cost is O(dots * K), whatever the image size.
    """
    h, w = G.spatial_size
    n = h * w
    dots = min(dots, n)
    rows = torch.linspace(0, n - 1, steps=min(n, 4 * dots)).round().long()
    cols = ca.key_indices(h, w, G.window, rows=rows)
    picture = np.zeros((dots, dots), dtype=bool)
    picture[(rows * dots // n)[:, None].expand_as(cols).numpy(), (cols * dots // n).numpy()] = True
    return picture


def zoom_block(G: ca.Circulant, size: int = ZOOM_ROWS) -> np.ndarray:
    """The top-left size x size block of the matrix with its weights (0 off the pattern)."""
    h, w = G.spatial_size
    size = min(size, h * w)
    cols = ca.key_indices(h, w, G.window, rows=torch.arange(size))
    vals = G.flat_values[0, 0].reshape(h * w, -1)[:size].detach().float().cpu()
    block = np.zeros((size, size), dtype=np.float32)
    inside = cols < size
    block[np.nonzero(inside.numpy())[0], cols[inside].numpy()] = vals[inside].numpy()
    return block


def attention_map(G: ca.Circulant, i: int, j: int) -> np.ndarray:
    """The weights of latent query (i, j) over the latent grid (h, w), the window wrapping around."""
    h, w = G.spatial_size
    cols = ca.key_indices(h, w, G.window, rows=torch.tensor([i * w + j]))[0]
    vals = G.flat_values[0, 0, i, j].detach().float().cpu()
    out = np.zeros(h * w, dtype=np.float32)
    np.add.at(out, cols.numpy(), vals.numpy())
    return out.reshape(h, w)


def effective_neighbours(G: ca.Circulant) -> np.ndarray:
    """exp(entropy) of every row of batch 0, head 0: (h, w); 1 = one neighbour, K = uniform."""
    p = G.flat_values[0, 0].detach().double().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.exp(entropy).float().cpu().numpy()


def _local_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)[..., : x.shape[-2], : x.shape[-1]]


def pick_pixels(gray: np.ndarray) -> dict[str, tuple[int, int]]:
    """Image pixels (y, x) on an edge (strongest gradient), a texture (most mid-scale detail) and a flat
    area (least local variation), each away from the others and the borders. Scores are taken on a
    lightly smoothed image, so that pixel noise does not decide them."""
    x = _local_mean(torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None], 5)
    H, W = gray.shape
    # torch.gradient needs two samples along an axis: a side of one pixel has no gradient along it.
    slopes = torch.gradient(x[0, 0], dim=[d for d in (0, 1) if x.shape[2 + d] > 1])
    edge = _local_mean(sum((g**2 for g in slopes), torch.zeros_like(x)).sqrt(), 5)[0, 0]
    detail = _local_mean((x - _local_mean(x, 9)) ** 2, 9)[0, 0]
    spread = _local_mean(x**2, 15)[0, 0] - _local_mean(x, 15)[0, 0] ** 2
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    b = min(8, H // 4, W // 4)
    taken = (yy < b) | (yy >= H - b) | (xx < b) | (xx >= W - b)

    def best(score: torch.Tensor) -> tuple[int, int]:
        """The best-scoring free pixel; the square around it is then taken."""
        nonlocal taken
        y, x_ = divmod(int(score.masked_fill(taken, -float("inf")).argmax()), W)
        taken = taken | ((yy - y).abs().maximum((xx - x_).abs()) < max(H, W) // 8)
        return y, x_

    e = best(edge)
    t = best(detail)
    f = best(-spread)
    return {"edge": e, "texture": t, "flat": f}


def to_latent(y: int, x: int, image_size: tuple[int, int], stride: int = 2) -> tuple[int, int]:
    """Image pixel -> latent pixel; odd sides are padded by one pixel before, as the model does."""
    H, W = image_size
    return (y + H % 2) // stride, (x + W % 2) // stride


def save_pattern(G: ca.Circulant, path: Path) -> None:
    """The whole hw x hw pattern (downsampled occupancy) beside a zoomed top-left block of weights."""
    h, w = G.spatial_size
    n = h * w
    fig = _figure(12, 6)
    left, right = fig.subplots(1, 2)
    left.imshow(occupancy(G), cmap="Greys", interpolation="nearest", extent=(0, n, n, 0))
    left.set_title(f"{n:,} x {n:,} adjacency ({h}x{w} latent pixels), window {G.window}\n"
                   "band blocks and wrap-around corners; downsampled occupancy")
    left.set_xlabel("key (column)")
    left.set_ylabel("query (row)")
    block = zoom_block(G)
    shown = np.ma.masked_equal(block, 0)
    im = right.imshow(shown, cmap="viridis", interpolation="nearest")
    right.set_title(f"rows and columns 0..{block.shape[0] - 1}: weights (blank = not stored)")
    right.set_xlabel("key (column)")
    fig.colorbar(im, ax=right, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)


def _window_rects(center: tuple[int, int], window: int, size: tuple[int, int], stride: int) -> list[Rectangle]:
    """The window around a latent pixel, in image coordinates, split where it wraps around the edges."""
    from matplotlib.patches import Rectangle

    h, w = size
    r = window // 2
    rects = []
    for dy in (-h, 0, h):
        for dx in (-w, 0, w):
            y0, x0 = center[0] - r + dy, center[1] - r + dx
            if y0 + window > 0 and y0 < h and x0 + window > 0 and x0 < w:
                rects.append(Rectangle((x0 * stride - 0.5, y0 * stride - 0.5), window * stride, window * stride,
                                       fill=False, edgecolor="cyan", linewidth=1.2))
    return rects


def save_pixel_maps(G: ca.Circulant, gray: np.ndarray, pixels: dict[str, tuple[int, int]], path: Path, stride: int = 2) -> None:
    """One panel per chosen pixel: its attention weights over the image, the wrapped window outlined."""
    H, W = gray.shape
    fig = _figure(5 * len(pixels), 5.4)
    axes = np.atleast_1d(fig.subplots(1, len(pixels)))
    pad = (H % 2, W % 2)
    for ax, (name, (y, x)) in zip(axes, pixels.items()):
        li, lj = to_latent(y, x, (H, W), stride)
        heat = np.kron(attention_map(G, li, lj), np.ones((stride, stride), dtype=np.float32))[pad[0] : pad[0] + H, pad[1] : pad[1] + W]
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_equal(heat, 0), cmap="inferno", alpha=0.75)
        for rect in _window_rects((li, lj), G.window, G.spatial_size, stride):
            rect.set_xy((rect.get_x() - pad[1], rect.get_y() - pad[0]))
            ax.add_patch(rect)
        ax.plot([x], [y], marker="+", color="lime", markersize=12)
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_title(f"{name}: pixel ({y}, {x}) = latent ({li}, {lj})")
        ax.axis("off")
    fig.suptitle("attention of chosen pixels (latent grid at half resolution, drawn 2x2 per latent pixel)")
    fig.tight_layout()
    fig.savefig(path)


def save_neighbours(G: ca.Circulant, gray: np.ndarray, path: Path) -> np.ndarray:
    """The image beside exp(entropy) per latent pixel; returns that map."""
    eff = effective_neighbours(G)
    fig = _figure(11, 5)
    left, right = fig.subplots(1, 2)
    left.imshow(gray, cmap="gray", vmin=0, vmax=1)
    left.set_title("input")
    left.axis("off")
    im = right.imshow(eff, cmap="magma", vmin=1, vmax=G.window**2)
    right.set_title(f"effective neighbours exp(entropy), 1..{G.window**2} (latent pixels)")
    right.axis("off")
    fig.colorbar(im, ax=right, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    return eff


def save_kernel(kernel: torch.Tensor, path: Path) -> None:
    """A BCCB kernel (h, w) with offset (0, 0) at the centre, on a log scale."""
    h, w = kernel.shape
    centred = torch.roll(kernel.detach().float().cpu(), shifts=(h // 2, w // 2), dims=(0, 1)).numpy()
    fig = _figure(6, 5.4)
    ax = fig.subplots()
    im = ax.imshow(np.log10(np.maximum(centred, 1e-12)), cmap="viridis", extent=(-w // 2, w - w // 2, h - h // 2, -h // 2))
    ax.set_title("BCCB kernel of theta, phi: log10 weight per offset (latent)")
    ax.set_xlabel("column offset")
    ax.set_ylabel("row offset")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
