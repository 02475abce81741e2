"""Backend selection: which implementation of the two kernel primitives serves a call.

Every backend offers ``similarity(q, k, window, distance)`` and ``apply(weights, x, window,
transposed)`` on real (B, G, Ch, H, W) tensors and (B, G, H, W, K) weights; the compiled ones may
also offer the fused ``attention_forward`` / ``attention_backward``.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from . import _extension, reference

BACKENDS = (None, "cuda", "cpu", "reference")
_warned: set[str] = set()


def _compiled(device: str, explicit: bool) -> ModuleType:
    """The compiled kernels for a device; without a toolchain, the reference with one warning."""
    try:
        module = _extension.load(device)
    except _extension.BuildUnavailable as err:
        if explicit:
            raise RuntimeError(f"backend={device!r} needs its kernels built, but {err}; use backend='reference'") from None
        if device not in _warned:
            _warned.add(device)
            warnings.warn(f"circatt: {err}; using the slow plain-PyTorch reference backend", RuntimeWarning, stacklevel=4)
        return reference
    module.name = device
    return module


def resolve(backend: str | None, device: torch.device) -> ModuleType:
    """Pick the backend module for tensors on `device`; None picks the compiled one of that device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of None, 'cuda', 'cpu', 'reference', got {backend!r}")
    if backend == "reference":
        return reference
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("backend='cuda' asked for, but CUDA is not available; use backend=None or 'cpu'")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, but the inputs are on {device}; move them with .cuda()")
        return _compiled("cuda", explicit=True)
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, but the inputs are on {device}; move them with .cpu()")
        return _compiled("cpu", explicit=True)
    if device.type in ("cpu", "cuda"):
        return _compiled(device.type, explicit=False)
    return reference
