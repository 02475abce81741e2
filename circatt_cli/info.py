"""`circatt info`: versions, devices, and where the kernels are built and cached."""

from __future__ import annotations

import platform

import torch
import typer
from rich.console import Console
from rich.table import Table

import circatt_ops
from circatt_ops import _extension

from . import __version__


def _kernel_state(device: str) -> str:
    try:
        built = _extension.is_built(device)
        where = _extension.build_dir(device)
    except RuntimeError as err:  # e.g. no CUDA device to read the arch from
        return f"not available ({err})"
    return f"{'built' if built else 'not built yet (built on first use)'} -- {where}"


def info() -> None:
    """Show versions, devices, and whether the C++/CUDA kernels are built and where they are cached."""
    table = Table(show_header=False, box=None)
    table.add_row("circatt", __version__)
    table.add_row("circatt_ops", circatt_ops.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    table.add_row("CPU threads", str(torch.get_num_threads()))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            table.add_row(f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        table.add_row("CUDA", "no CUDA device")
    table.add_row("kernel cache", str(_extension.cache_root()))
    table.add_row("CPU kernels", _kernel_state("cpu"))
    table.add_row("CUDA kernels", _kernel_state("cuda") if torch.cuda.is_available() else "no CUDA device")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
