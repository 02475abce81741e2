"""Argument validation shared by the public ops: every message names the argument and the fix."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
CUDA_ONLY_DTYPES = (torch.float16, torch.bfloat16)
KINDS = ("dot", "distance")


def check_4d(name: str, t: object) -> None:
    """Require a (B, C, H, W) tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}; "
            f"add missing dimensions with {name}[None] or reshape it"
        )
    if 0 in t.shape[1:]:
        raise ValueError(f"{name} has an empty dimension, shape {tuple(t.shape)}; C, H and W must be at least 1")


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Allow the float and complex dtypes everywhere and half types on CUDA."""
    if t.dtype in SUPPORTED_DTYPES:
        return
    if t.dtype in CUDA_ONLY_DTYPES:
        if t.device.type != "cuda":
            raise TypeError(f"{name} is {t.dtype}, which is supported on CUDA only; use {name}.float() on the CPU")
        return
    raise TypeError(
        f"{name} has dtype {t.dtype}; use float32, float64, complex64 or complex128 "
        f"(float16/bfloat16 on CUDA), e.g. {name}.float()"
    )


def check_window(window: object, height: int, width: int) -> int:
    """An odd window no larger than the image, so that no window overlaps itself."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an odd int, got {window!r}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1 (the window is centred on its pixel), got {window}; try {max(1, window - 1) if window > 1 else 1} or {window + 1}")
    if window > height or window > width:
        raise ValueError(
            f"window {window} is larger than the image ({height}x{width}): a wrapped window would overlap itself; "
            f"use a window of at most {min(height, width) - (1 - min(height, width) % 2)} or a larger image"
        )
    return window


def check_kind(kind: object) -> str:
    """One of the two similarity kinds."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind  # type: ignore[return-value]


def check_heads(heads: object, channels: int, name: str = "q") -> int:
    if isinstance(heads, bool) or not isinstance(heads, int):
        raise TypeError(f"heads must be a positive int, got {heads!r}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}; use heads=1 for single-head attention")
    if channels % heads:
        raise ValueError(
            f"{name} has {channels} channels, which do not split into {heads} heads; "
            f"use a number of heads that divides {channels}"
        )
    return heads


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, same_channels: bool = True) -> None:
    """Two (B, C, H, W) inputs that must agree in batch, size, device and dtype."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device with .to()")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; convert one with .to({a.dtype})")
    want = tuple(a.shape) if same_channels else (a.shape[0], a.shape[2], a.shape[3])
    got = tuple(b.shape) if same_channels else (b.shape[0], b.shape[2], b.shape[3])
    if want != got:
        what = "shape" if same_channels else "batch and spatial size"
        raise ValueError(f"{name_b} must match the {what} of {name_a}: {tuple(a.shape)} vs {tuple(b.shape)}")


def check_operand(
    name: str,
    x: torch.Tensor,
    of: str,
    *,
    batch: int,
    size: tuple[int, int],
    heads: int,
    device: torch.device,
    precision: torch.dtype | None,
) -> None:
    """A (B, C, H, W) tensor that meets `of` (q, a matrix, a kernel): same batch, grid and device, C split
    into `heads`, and real precision `precision` (complex allowed; None leaves the precision to the caller)."""
    check_4d(name, x)
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {of} is on {device}; move {name} with {name}.to({str(device)!r})")
    if (x.shape[0], *x.shape[2:]) != (batch, *size):
        raise ValueError(
            f"{name} must match the batch and spatial size of {of} (batch {batch} and grid {size[0]}x{size[1]}), "
            f"got shape {tuple(x.shape)}"
        )
    if precision is not None and x.dtype.to_real() != precision:
        raise TypeError(
            f"{name} is {x.dtype} but {of} is {precision}; use the same precision for both "
            f"({name}.to({precision}) or its complex counterpart)"
        )
    check_heads(heads, x.shape[1], name=name)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, C // heads, H, W): head h holds a contiguous block of channels."""
    B, C, H, W = x.shape
    return x.reshape(B, heads, C // heads, H, W)


def check_inputs(q: torch.Tensor, k: torch.Tensor, window: int, kind: str, heads: int) -> None:
    """Validate the common (q, k, window, kind, heads) arguments of similarity/adjacency/attention."""
    check_4d("q", q)
    check_4d("k", k)
    check_dtype("q", q)
    check_pair("q", q, "k", k)
    check_kind(kind)
    check_heads(heads, q.shape[1])
    check_window(window, q.shape[2], q.shape[3])
