"""Shared fixtures: the backends to run on this machine and an allocator poisoner."""

from __future__ import annotations

import zlib

import pytest
import torch
from typer.testing import CliRunner

from circatt_cli.app import app
from synthetic import save_tiny_models

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
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A folder with tiny gray and color models under the shipped names."""
    return save_tiny_models(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def cli(tiny_weights, monkeypatch, tmp_path):
    """Run `circatt ARGS` in tmp_path with the tiny weights; returns the click Result."""
    monkeypatch.setenv("CIRCATT_WEIGHTS", str(tiny_weights))
    monkeypatch.chdir(tmp_path)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
