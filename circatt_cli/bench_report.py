"""The `circatt bench` report: rich tables on the terminal, and JSON, CSV and a log-log plot on disk."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.table import Table

from .console import escape

if TYPE_CHECKING:
    from .bench import Row
    from .timing import Ceilings


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{unit}"


def print_report(rows: Sequence[Row], ceilings: Ceilings | None, device_name: str, console: Console) -> None:
    """A rich table per (shape, dtype), then the model table."""
    if ceilings is not None:
        rates = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceilings.matmul_flops_per_s.items())
        console.print(f"[bold]{device_name}[/]: measured ceilings: copy {ceilings.copy_bytes_per_s / 1e9:.4g} GB/s; matmul {rates}")
    keys = list(dict.fromkeys((r.section, r.case, r.shape, r.dtype) for r in rows))
    for section, case, shape, dtype in keys:
        members = [r for r in rows if (r.section, r.case, r.shape, r.dtype) == (section, case, shape, dtype)]
        console.print(_table(f"{case}: {shape}, {dtype}" if section == "op" else f"model: {shape}", members))


_STATUS_STYLE = {"ok": "green", "WRONG": "bold red", "error": "red", "skipped": "dim", "unchecked": "yellow"}


def _table(title: str, rows: Sequence[Row]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name, justify in [
        ("op", "left"), ("pass", "left"), ("impl", "left"), ("status", "left"), ("median ms", "right"),
        ("min-max ms", "right"), ("TFLOP/s", "right"), ("GB/s", "right"), ("x floor", "right"),
        ("peak MiB", "right"), ("ours x", "right"), ("note", "left"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        style = _STATUS_STYLE.get(r.status, "")
        table.add_row(
            r.op, r.mode, r.impl, f"[{style}]{r.status}[/]",
            _fmt(r.median_ms, ".4g"),
            "" if r.min_ms is None else f"{r.min_ms:.3g}-{r.max_ms:.3g}",
            _fmt(r.tflops, ".3g") + ("" if r.frac_flops_peak is None else f" ({r.frac_flops_peak:.0%})"),
            _fmt(r.gbps, ".4g") + ("" if r.frac_copy_peak is None else f" ({r.frac_copy_peak:.0%})"),
            _fmt(r.x_floor, ".3g"),
            _fmt(r.peak_mem_mb, ".4g"),
            _fmt(r.ours_speedup, ".3g", "x"),
            escape(r.note),  # may quote an exception's message
        )
    return table


def _replace(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write through a temporary file beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_json(path: Path, meta: dict, ceilings: Ceilings | None, rows: Sequence[Row]) -> None:
    doc = {"meta": meta, "ceilings": None if ceilings is None else ceilings.as_dict(), "rows": [asdict(r) for r in rows]}
    _replace(path, lambda f: f.write(json.dumps(doc, indent=2, default=str) + "\n"))


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    flat = [r.flat() for r in rows]
    fields = list(dict.fromkeys(k for d in flat for k in d))

    def write(f: TextIO) -> None:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)

    _replace(path, write)


def write_plot(path: Path, rows: Sequence[Row], device_name: str) -> None:
    """Log-log time against pixels per implementation, one panel per (op, pass) of the sweep, with slope guides."""
    from matplotlib.figure import Figure

    sweep = [r for r in rows if r.case == "sweep" and r.median_ms]
    panels = list(dict.fromkeys((r.op, r.mode, r.dtype) for r in sweep)) or [("no sweep rows", "", "")]
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.5 * cols, 4.5 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (op, mode, dtype) in zip(axes.flat, panels):
        members = [r for r in sweep if (r.op, r.mode, r.dtype) == (op, mode, dtype)]
        for impl, window in dict.fromkeys((r.impl, r.window) for r in members):
            line = sorted((r.pixels, r.median_ms) for r in members if (r.impl, r.window) == (impl, window))
            style = "-" if window == max(r.window for r in members) else "--"
            ax.plot(*zip(*line), marker="o", linestyle=style, color=_impl_color(impl), label=f"{impl} ws={window}")
        _slope_guides(ax, members)
        ax.set(xscale="log", yscale="log", xlabel="pixels N = H*W", ylabel="median time (ms)", title=f"{op} {mode} {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        if members:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"circatt bench on {device_name}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)


def _impl_color(impl: str) -> str:
    """One colour per implementation across every panel."""
    order = ["cuda", "cpu", "reference", "csr", "flex", "sdpa", "bccb"]
    return f"C{order.index(impl) if impl in order else len(order)}"


def _slope_guides(ax, members: Sequence[Row]) -> None:
    """Grey N, N log N and N^2 lines through the smallest point, for reading the curves' orders."""
    if not members:
        return
    n0, t0 = min((r.pixels, r.median_ms) for r in members)
    ns = sorted({r.pixels for r in members})
    for label, f in (("~N", lambda n: n), ("~N log N", lambda n: n * math.log2(n)), ("~N^2", lambda n: n * n)):
        ax.plot(ns, [t0 * f(n) / f(n0) for n in ns], color="grey", alpha=0.4, linewidth=0.8, linestyle=":")
        ax.annotate(label, (ns[-1], t0 * f(ns[-1]) / f(n0)), fontsize=7, color="grey")
