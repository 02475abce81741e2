"""The public ops: windowed similarity, adjacency and attention over a wrapped square window."""

from __future__ import annotations

import math

import torch

from . import backends
from ._checks import check_4d, check_heads, check_inputs
from .autograd import AttentionFn, SimilarityFn
from .circulant import Circulant


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.reshape(B, heads, C // heads, H, W)


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
    values = SimilarityFn.apply(_split_heads(q, heads), _split_heads(k, heads), window, kind == "distance", impl)
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


def _check_values(q: torch.Tensor, v: torch.Tensor, heads: int) -> None:
    check_4d("v", v)
    if v.device != q.device:
        raise ValueError(f"v is on {v.device} but q is on {q.device}; move v with .to({str(q.device)!r})")
    if (v.shape[0], v.shape[2], v.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"v must match the batch and spatial size of q: {tuple(q.shape)} vs {tuple(v.shape)}")
    q_real = q.real.dtype if q.is_complex() else q.dtype
    v_real = v.real.dtype if v.is_complex() else v.dtype
    if v_real != q_real:
        raise TypeError(f"v is {v.dtype} but q is {q.dtype}; use the same precision for both")
    check_heads(heads, v.shape[1], name="v")


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
    saved per-row log-sum-exp (FlashAttention's recipe). With it, returns `(y, A)`.

    Args:
        q, k: (B, C, H, W); v: (B, Cv, H, W), Cv divisible by heads (may be complex).
        scale: multiplies the similarity; default 1/sqrt(C / heads).
    """
    check_inputs(q, k, window, kind, heads)
    _check_values(q, v, heads)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[1] // heads)
    if return_adjacency:
        A = (similarity(q, k, window, kind, heads, backend) * scale).softmax()
        A.kind = f"attention ({kind})"
        return A.apply(v, backend), A
    impl = backends.resolve(backend, q.device)
    y = AttentionFn.apply(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), window, kind == "distance", float(scale), impl
    )
    return y.reshape(v.shape)
