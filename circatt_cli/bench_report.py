"""The `circatt bench` report: rich tables on the terminal, and JSON, CSV and a log-log plot on disk."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.table import Table

from .console import escape

if TYPE_CHECKING:
    from .bench import Row
    from .timing import Ceilings


# What identifies a row across runs: the same measurement of the same implementation.
ROW_KEY = ("section", "case", "shape", "op", "mode", "dtype", "impl")


@dataclass(frozen=True)
class Baseline:
    """A previous run's --json: where and when it ran, and the median of each row it timed."""

    path: Path
    device: str
    date: str
    medians: dict[tuple[str, ...], float]


def read_baseline(path: Path) -> Baseline:
    """Reads a `circatt bench --json` file; ValueError with a one-line reason for anything else."""
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not JSON") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(ROW_KEY) <= r.keys() for r in rows):
        raise ValueError(f"{path} is not the JSON of `circatt bench --json` (no rows of results)")
    medians = {}
    for r in rows:
        median = r.get("median_ms")
        if isinstance(median, (int, float)) and median > 0:
            medians[tuple(str(r[k]) for k in ROW_KEY)] = float(median)
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    return Baseline(path, str(meta.get("device", "an unknown device")), str(meta.get("date", "an unknown date")), medians)


def add_baseline(rows: Sequence[Row], baseline: Baseline) -> None:
    """Each timed row that the baseline timed too gets its median there and the ratio (above 1: faster now)."""
    for r in rows:
        before = baseline.medians.get(tuple(str(getattr(r, k)) for k in ROW_KEY))
        if before is not None and r.median_ms:
            r.baseline_ms, r.vs_baseline = before, before / r.median_ms


def baseline_summary(rows: Sequence[Row], baseline: Baseline, device_name: str, ours: str) -> str:
    """One line: how many rows matched, and our rows' (ops and denoiser) geometric-mean ratio with its range."""
    where = escape(f"against {baseline.path} ({baseline.device}, {baseline.date})")
    if baseline.device != device_name:
        where += f" [yellow](another device than this run's {escape(device_name)})[/]"
    matched = [r for r in rows if r.vs_baseline is not None]
    if not matched:
        return f"{where}: no row of this run was timed there"
    line = f"{where}: {len(matched)} of {len(rows)} rows matched"
    ratios = [r.vs_baseline for r in matched if r.impl == ours or r.section == "model"]
    if ratios:
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        line += f"; ours {mean:.3g}x as fast as there (geometric mean of {len(ratios)}, {min(ratios):.3g}-{max(ratios):.3g}x)"
    return line


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
    compared = any(r.vs_baseline is not None for r in rows)  # the --baseline column only where it says something
    for name, justify in [
        ("op", "left"), ("pass", "left"), ("impl", "left"), ("status", "left"), ("median ms", "right"),
        ("min-max ms", "right"), ("TFLOP/s", "right"), ("GB/s", "right"), ("x floor", "right"),
        ("peak MiB", "right"), ("ours x", "right"), *([("vs base", "right")] if compared else []), ("note", "left"),
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
            *([_fmt(r.vs_baseline, ".3g", "x")] if compared else []),
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
