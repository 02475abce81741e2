"""Shared fixtures: the backends to run on this machine and an allocator poisoner."""

from __future__ import annotations

import pytest
import torch

CPU_BACKENDS = ("reference", "cpu")


def poison_allocator(device: str, numel: int = 1 << 22) -> None:
    """Fill memory with NaN and free it, so that an output a kernel leaves unwritten reads as NaN.

    The CUDA caching allocator hands the block straight back to the next allocation; on the CPU
    the C allocator usually does.
    """
    torch.full((numel,), float("nan"), dtype=torch.float64, device=device)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh inputs, seeded by its id so that a failure reproduces."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
