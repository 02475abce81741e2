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
_failures: dict[str, str] = {}  # device -> why its kernels could not be built (tried once per process)


def _compiled(device: str, explicit: bool) -> ModuleType:
    """The compiled kernels for a device; where they cannot be built, the reference with one warning
    (or, for an explicitly requested backend, an error)."""
    if device not in _failures:
        try:
            module = _extension.load(device)
            module.name = device
            return module
        except Exception as err:  # no toolchain, a failed compile, a broken cached build: never the user's fault
            _failures[device] = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not explicit:
                warnings.warn(
                    f"circatt: {_failures[device]}; using the slow plain-PyTorch reference backend",
                    RuntimeWarning,
                    stacklevel=4,
                )
    if explicit:
        raise RuntimeError(f"backend={device!r} needs its kernels built, but {_failures[device]}; use backend='reference'")
    return reference


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
