"""`--device auto|cpu|cuda|cuda:N`: resolve it, and refuse CUDA when there is none (no silent fallback)."""

from __future__ import annotations

import re

import torch
import typer

_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def describe(device: torch.device) -> str:
    """A short human name: 'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def resolve_device(spec: str) -> tuple[torch.device, str]:
    """(device, a line saying what was chosen and why); raises typer.BadParameter for an unusable spec."""
    spec = spec.strip().lower()
    if not _PATTERN.match(spec):
        raise typer.BadParameter(f"{spec!r} is not one of auto, cpu, cuda, cuda:N", param_hint="--device")
    if spec == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            return device, f"device: auto -> {describe(device)}"
        return torch.device("cpu"), "device: auto -> cpu (no CUDA device found)"
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter("CUDA was asked for but no CUDA device is available; use --device cpu", param_hint="--device")
        if device.index is not None and device.index >= count:
            raise typer.BadParameter(f"{spec} does not exist: {count} CUDA device(s), cuda:0..cuda:{count - 1}", param_hint="--device")
        if device.index is None:  # always indexed, so that it equals the .device of the tensors made on it
            device = torch.device("cuda", torch.cuda.current_device())
    return device, f"device: {describe(device)}"
