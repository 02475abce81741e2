"""Custom autograd Functions over the backend primitives.

Backends see only real (B, G, Ch, H, W) tensors: a complex tensor travels as its real view with
the real and imaginary parts as two channels, which turns Re<q, k> into a real dot product and
lets a real weight act on both parts. Gradients of weights stay (B, G, H, W, K): each backward
is again a `similarity` or an `apply` of the same backend, so nothing HW x HW is ever formed.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from ._checks import split_heads


def as_real(x: torch.Tensor) -> torch.Tensor:
    """(B, G, Ch, H, W) complex -> (B, G, 2*Ch, H, W) real, parts interleaved per channel."""
    if not x.is_complex():
        return x.contiguous()
    B, G, C, H, W = x.shape
    return torch.view_as_real(x).permute(0, 1, 2, 5, 3, 4).reshape(B, G, 2 * C, H, W).contiguous()


def from_real(y: torch.Tensor, is_complex: bool) -> torch.Tensor:
    """Inverse of as_real, where the original tensor was complex."""
    if not is_complex:
        return y
    B, G, C2, H, W = y.shape
    return torch.view_as_complex(y.view(B, G, C2 // 2, 2, H, W).permute(0, 1, 2, 4, 5, 3).contiguous())


def apply_any(backend: ModuleType, weights: torch.Tensor, x: torch.Tensor, window: int, transposed: bool) -> torch.Tensor:
    """Apply real weights to a real or complex x through the backend."""
    return from_real(backend.apply(weights.contiguous(), as_real(x), window, transposed), x.is_complex())


def dot_any(backend: ModuleType, a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """Windowed Re<a_n, b_m>: the weight-gradient of an apply."""
    return backend.similarity(as_real(a), as_real(b), window, False)


def _column_sums(backend: ModuleType, weights: torch.Tensor, window: int) -> torch.Tensor:
    """(B, G, 1, H, W) sums of each column of a weight matrix, as A^T applied to ones."""
    B, G, H, W, _ = weights.shape
    ones = weights.new_ones(B, G, 1, H, W)
    return backend.apply(weights.contiguous(), ones, window, True)


def similarity_backward(
    backend: ModuleType,
    dS: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    distance: bool,
    need: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk) for dS on the pattern: dq = dS k - rowsum(dS) q, dk = dS^T q - colsum(dS) k; None where not needed."""
    dq = dk = None
    if need[0]:
        dq = apply_any(backend, dS, k, window, False)
        if distance:
            dq = dq - dS.sum(-1).unsqueeze(2) * q
    if need[1]:
        dk = apply_any(backend, dS, q, window, True)
        if distance:
            dk = dk - _column_sums(backend, dS, window) * k
    return dq, dk


class SimilarityFn(torch.autograd.Function):
    """S = sim(q, k) on the windowed pattern; q, k are (B, G, Ch, H, W)."""

    @staticmethod
    def forward(ctx, q, k, window: int, distance: bool, backend: ModuleType):
        ctx.save_for_backward(q, k)
        ctx.args = (window, distance, backend)
        return backend.similarity(as_real(q), as_real(k), window, distance)

    @staticmethod
    @once_differentiable
    def backward(ctx, dS):
        q, k = ctx.saved_tensors
        window, distance, backend = ctx.args
        dq, dk = similarity_backward(backend, dS.contiguous(), q, k, window, distance, ctx.needs_input_grad[:2])
        return dq, dk, None, None, None


class ApplyFn(torch.autograd.Function):
    """y = A x or y = A^T x for weights (B, G, H, W, K) and x (B, G, Ch, H, W)."""

    @staticmethod
    def forward(ctx, weights, x, window: int, transposed: bool, backend: ModuleType):
        ctx.save_for_backward(weights, x)
        ctx.args = (window, transposed, backend)
        return apply_any(backend, weights, x, window, transposed)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        weights, x = ctx.saved_tensors
        window, transposed, backend = ctx.args
        dy = dy.contiguous()
        dx = apply_any(backend, weights, dy, window, not transposed) if ctx.needs_input_grad[1] else None
        dw = None
        if ctx.needs_input_grad[0]:
            dw = dot_any(backend, x, dy, window) if transposed else dot_any(backend, dy, x, window)
        return dw, dx, None, None, None


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: float32 for half types, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _attention_forward_composed(
    backend: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, distance: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward through the primitives: the weights exist only inside this call."""
    logits = backend.similarity(q, k, window, distance).to(_accumulate(q.dtype)).mul_(scale)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.unsqueeze(-1)).to(q.dtype)
    return backend.apply(p, v, window, False), lse


def _attention_backward_composed(
    backend: ModuleType,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    dy: torch.Tensor,
    window: int,
    distance: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention's backward through the primitives: recompute P, dS = P (dP - D)."""
    acc = _accumulate(q.dtype)
    logits = backend.similarity(q, k, window, distance).to(acc).mul_(scale)
    p = torch.exp(logits - lse.unsqueeze(-1))
    d = (dy.to(acc) * y.to(acc)).sum(2)
    dp = backend.similarity(dy, v, window, False).to(acc)
    ds = (p * (dp - d.unsqueeze(-1))).mul_(scale).to(q.dtype)
    dq, dk = similarity_backward(backend, ds, q, k, window, distance)
    dv = backend.apply(p.to(q.dtype), dy, window, True)
    return dq, dk, dv


def _fused_forward(
    backend: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, distance: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, lse) for real (B, G, Ch, H, W) operands: the backend's fused kernels, or the composed primitives."""
    if hasattr(backend, "attention_forward"):
        return backend.attention_forward(q, k, v, window, distance, scale)
    return _attention_forward_composed(backend, q, k, v, window, distance, scale)


def _split_real(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, H, W), real or complex -> real (B, heads, C // heads or twice that, H, W)."""
    return as_real(split_heads(x, heads))


def _merge(x: torch.Tensor, like: tuple[torch.Size, bool]) -> torch.Tensor:
    """Inverse of _split_real, for a result of `like` = (shape, is_complex) of the (B, C, H, W) original."""
    shape, is_complex = like
    return from_real(x, is_complex).reshape(shape)


def _like(x: torch.Tensor) -> tuple[torch.Size, bool]:
    return x.shape, x.is_complex()


class AttentionFn(torch.autograd.Function):
    """Fused softmax(scale * S) v on (B, C, H, W) inputs split into heads: keeps the per-row log-sum-exp
    and recomputes the weights in the backward. The heads are split inside, so that a call is one
    autograd node (views outside would add a node each to every backward)."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, distance: bool, scale: float, heads: int, backend: ModuleType):
        rq, rk, rv = (_split_real(t, heads) for t in (q, k, v))
        y, lse = _fused_forward(backend, rq, rk, rv, window, distance, scale)
        ctx.save_for_backward(rq, rk, rv, y, lse)
        ctx.args = (window, distance, scale, heads, backend)
        ctx.likes = (_like(q), _like(v))
        return _merge(y, _like(v))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        rq, rk, rv, y, lse = ctx.saved_tensors
        window, distance, scale, heads, backend = ctx.args
        q, v = ctx.likes
        rdy = _split_real(dy, heads)
        if hasattr(backend, "attention_backward"):
            dq, dk, dv = backend.attention_backward(rq, rk, rv, y, lse, rdy, window, distance, scale)
        else:
            dq, dk, dv = _attention_backward_composed(backend, rq, rk, rv, y, lse, rdy, window, distance, scale)
        return _merge(dq, q), _merge(dk, q), _merge(dv, v), None, None, None, None, None


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, distance: bool, scale: float, heads: int,
    backend: ModuleType,
) -> torch.Tensor:
    """softmax(scale * S) v for (B, C, H, W) inputs. Real inputs on a compiled backend take its C++
    autograd node (`attention`: no Python in the call's backward); complex inputs, and backends without
    one, AttentionFn -- or, where no gradient may be asked for, the kernels directly."""
    if hasattr(backend, "attention") and not (q.is_complex() or k.is_complex() or v.is_complex()):
        return backend.attention(q, k, v, window, distance, scale, heads)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return AttentionFn.apply(q, k, v, window, distance, scale, heads, backend)
    y, _ = _fused_forward(backend, *(_split_real(t, heads) for t in (q, k, v)), window, distance, scale)
    return _merge(y, _like(v))
