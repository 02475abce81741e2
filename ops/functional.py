"""The public ops: windowed similarity, adjacency and attention over a wrapped square window."""

from __future__ import annotations

import math
import numbers

import torch

from . import backends
from ._checks import check_inputs, check_operand, split_heads
from .autograd import SimilarityFn, fused_attention
from .circulant import Circulant


def similarity(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    kind: str = "dot",
    heads: int = 1,
    backend: str | None = None,
) -> Circulant:
    """Unscaled similarity of every query pixel with the keys of its wrapped window.

    dot: Re(sum_c q_c conj(k_c)); distance: -1/2 sum_c |q_c - k_c|^2.

    Args:
        q, k: (B, C, H, W) queries and keys; complex inputs give a real similarity.
        window: odd side of the square window, at most min(H, W).
        kind: "dot" or "distance".
        heads: split the C channels into this many contiguous blocks, one matrix per block.
        backend: None (by device), "cuda", "cpu" or "reference".
    """
    check_inputs(q, k, window, kind, heads)
    impl = backends.resolve(backend, q.device)
    values = SimilarityFn.apply(split_heads(q, heads), split_heads(k, heads), window, kind == "distance", impl)
    return Circulant(values, window, f"{kind} similarity")


def adjacency(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    kind: str = "dot",
    heads: int = 1,
    backend: str | None = None,
) -> Circulant:
    """Row softmax of `similarity(q, k, ...)`: a row-stochastic circulant-sparse adjacency."""
    return similarity(q, k, window, kind, heads, backend).softmax()


def _check_scale(scale: object, head_dim: int) -> float | torch.Tensor:
    """The default 1/sqrt(head_dim), a real number, or a real 0-d tensor (kept as is: it may be learned)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.is_floating_point():
        return scale
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return float(scale)
    raise TypeError(f"scale must be a real number or a 0-d float tensor, got {scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    kind: str = "dot",
    heads: int = 1,
    scale: float | None = None,
    return_adjacency: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Circulant]:
    """softmax(scale * similarity(q, k)) applied to v, per head.

    Without `return_adjacency` the weights are never stored: the backward recomputes them from the
    saved per-row log-sum-exp (FlashAttention's recipe). With it, returns `(y, A)`. On CUDA (sm_80+)
    dot attention runs on tensor cores, forward and backward, for float16 and bfloat16 heads of 16,
    32, 64 or 128 channels, and for float32 heads of up to 64: as TF32 when
    `torch.backends.cuda.matmul.allow_tf32` is on, else with every operand split into two TF32 parts
    (errors 4-7x the IEEE kernels', 3e-6 to 5e-6 of the largest value at S1); float32 accumulation
    throughout. The width must be divisible by 8 and the window at most 49. Other cases take the
    scalar kernels.

    Args:
        q, k: (B, C, H, W); v: (B, Cv, H, W), Cv divisible by heads (may be complex).
        scale: multiplies the similarity; default 1/sqrt(C / heads). A 0-d tensor that requires grad is
            learned: that call goes through the stored adjacency, as the fused kernels take a constant.
    """
    check_inputs(q, k, window, kind, heads)
    check_operand(
        "v", v, "q", batch=q.shape[0], size=q.shape[2:], heads=heads, device=q.device, precision=q.dtype.to_real()
    )
    scale = _check_scale(scale, q.shape[1] // heads)
    learned = isinstance(scale, torch.Tensor) and scale.requires_grad
    if return_adjacency or learned:  # the fused kernels take scale as a constant; a learned one needs autograd
        A = (similarity(q, k, window, kind, heads, backend) * scale).softmax()
        A.kind = f"attention ({kind})"
        y = A.apply(v, backend)
        return (y, A) if return_adjacency else y
    impl = backends.resolve(backend, q.device)
    return fused_attention(q, k, v, window, kind == "distance", float(scale), heads, impl)
