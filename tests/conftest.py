"""Shared fixtures: the backends to run on this machine, an allocator poisoner, the tests' tiny GroupCDL
(config, model and shipped-style weights) and the CLI runner."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from typer.testing import CliRunner

from circatt_cli.app import app
from circatt_cli.model import PRESETS, GroupCDL, GroupCDLConfig
from circatt_cli.weights import preset_weights, save_model

CPU_BACKENDS = ("reference", "cpu")
# The tests' GroupCDL: milliseconds per image, one adjacency refresh (at iteration 5), a 5x5 window.
TINY = {"iterations": 5, "filters": 8, "attn_channels": 4, "window": 5}


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
def tiny_config() -> Callable[..., GroupCDLConfig]:
    """tiny_config(channels=1, **changes): the TINY config, with any field changed."""
    return lambda channels=1, **changes: GroupCDLConfig(channels=channels, **{**TINY, **changes})


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> Callable[..., GroupCDL]:
    """tiny_model(channels=1, **changes): a GroupCDL of tiny_config, initialised the same way every time."""

    def make(channels: int = 1, **changes) -> GroupCDL:
        model = GroupCDL(tiny_config(channels, **changes), init=False)
        model.reset_parameters(generator=torch.Generator().manual_seed(0))
        return model

    return make


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_model):
    """A folder with a tiny model per preset under the shipped names (for CIRCATT_WEIGHTS)."""
    folder = tmp_path_factory.mktemp("weights")
    for name, preset in PRESETS.items():
        save_model(tiny_model(preset.channels), preset_weights(name, folder))
    return folder


@pytest.fixture
def cli(tiny_weights, monkeypatch, tmp_path):
    """Run `circatt ARGS` in tmp_path with the tiny weights; returns the click Result."""
    monkeypatch.setenv("CIRCATT_WEIGHTS", str(tiny_weights))
    monkeypatch.chdir(tmp_path)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
