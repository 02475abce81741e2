"""`circatt bench`: time our circulant attention ops and their peers in one run, on the same inputs.

For every shape, op, pass (forward, forward + backward) and dtype, each implementation is first
checked against the plain-PyTorch reference (float32) and marked WRONG, untimed, if it differs;
then timed (see timing.py) and reported with TFLOP/s and GB/s from `op_cost`, their fraction of
the ceilings measured in the same run, its distance to the roofline floor, peak memory, and how
many times faster ours is. docs/bench.md explains how to read the report.
"""

from __future__ import annotations

import datetime
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import typer
from rich.console import Console

import circatt_ops
from circatt_ops import backends

from . import __version__, tiling
from .bench_report import Baseline, add_baseline, baseline_summary, print_report, read_baseline, write_csv, write_json, write_plot
from .console import print_error
from .denoise import bytes_per_pixel, denoiser, tile_margin
from .devices import resolve_device
from .model import DEFAULT_PRESET, PRESETS, GroupCDL, GroupCDLConfig
from .paths import check_result_file
from .peers import INPUT_ROLES, OPS, OUTPUT_ROLE, STEP_APPLIES, Case, CirculantPeer, Peer, Unavailable, all_peers
from .timing import MIN_RUNS, Ceilings, Timing, dtype_name, input_sets_needed, measure, measure_ceilings, synchronize
from .weights import WeightsError, load_model

SHAPES = ("S1", "S2", "train", "sweep")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 5e-2}
SWEEP_SIZES = {"cuda": "64,128,256,512,1024,2048", "cpu": "64,128,256"}
QUICK = {"shapes": "sweep", "sizes": "32,48", "windows": "7", "repeat": 5, "warmup": 1, "budget": 0.3, "model_sizes": "32"}
MODEL_SIZES = {"cuda": "256,512,1024,1920x1080", "cpu": "64,128"}
NOT_COMPARED = ("bccb",)
_CHUNK = 1 << 24  # a different op: timed beside ours, never in the speed-up columns


# ----- FLOP and byte counts: the one place ---------------------------------------------------------
def _similarity_flops(case: Case, pixels_x_slots: int) -> int:
    """2 per channel for dot (multiply-add), 3 for distance (subtract, square, add)."""
    return (2 if case.kind == "dot" else 3) * case.batch * pixels_x_slots * case.channels


def op_cost(op: str, case: Case, itemsize: int, backward: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of the op's useful work, forward or forward + backward; the convention of docs/bench.md.

    With R = B*G*N*K stored entries, I = B*C*N image elements (C = channels of q, k and v), s = itemsize:
    similarity  fwd 2|3*B*N*K*C, bytes (2I + R)s;     bwd 4*B*N*K*C (+2R distance), bytes (4I + R)s
    softmax     fwd 5R,          bytes 2Rs;           bwd 4R,                       bytes 3Rs
    adjacency   similarity + softmax FLOPs, bytes of one fused kernel: fwd (2I + R)s, bwd (4I + 2R)s
    apply       fwd 2*B*N*K*C,   bytes (R + 2I)s;     bwd 4*B*N*K*C,                bytes (2R + 3I)s
    attention   fwd sim + 5R + 2*B*N*K*C, bytes 4Is;  bwd sim + 5R + 8*B*N*K*C,     bytes 8Is
    step        adjacency + 5 applies (GroupCDL's work per adjacency refresh), forward and backward alike
    A peer that does more work (dense SDPA does N^2) is still credited with these counts only.
    """
    R = case.batch * case.heads * case.pixels * case.slots
    I = case.batch * case.channels * case.pixels
    nk = case.pixels * case.slots
    sim = _similarity_flops(case, nk)
    matvec = 2 * case.batch * nk * case.channels
    distance_extra = 2 * R if case.kind == "distance" else 0
    table = {
        "similarity": ((sim, 2 * I + R), (2 * matvec + distance_extra, 4 * I + R)),
        "softmax": ((5 * R, 2 * R), (4 * R, 3 * R)),
        "adjacency": ((sim + 5 * R, 2 * I + R), (2 * matvec + distance_extra + 4 * R, 4 * I + 2 * R)),
        "apply": ((matvec, R + 2 * I), (2 * matvec, 2 * R + 3 * I)),
        "attention": ((sim + 5 * R + matvec, 4 * I), (sim + 5 * R + 4 * matvec + distance_extra, 8 * I)),
    }
    table["step"] = tuple(
        (adj_flops + STEP_APPLIES * app_flops, adj_elems + STEP_APPLIES * app_elems)
        for (adj_flops, adj_elems), (app_flops, app_elems) in zip(table["adjacency"], table["apply"])
    )
    (f_flops, f_elems), (b_flops, b_elems) = table[op]
    if backward:
        return f_flops + b_flops, (f_elems + b_elems) * itemsize
    return f_flops, f_elems * itemsize


def bccb_cost(case: Case, itemsize: int, backward: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of global BCCB attention: 2.5 N log2 N per real 2-D FFT, 2(C + C + G) of them, plus
    the complex products and the softmax; bytes 4Is like attention. Backward counted as twice the forward."""
    n = case.pixels
    transforms = case.batch * 2 * (2 * case.channels + case.heads)
    flops = int(2.5 * n * math.log2(max(n, 2)) * transforms) + 3 * case.batch * 2 * case.channels * n + 5 * case.batch * case.heads * n
    nbytes = 4 * case.batch * case.channels * n * itemsize
    return (3 * flops, 2 * nbytes) if backward else (flops, nbytes)


def cost_of(impl: str, op: str, case: Case, itemsize: int, backward: bool) -> tuple[int, int]:
    return bccb_cost(case, itemsize, backward) if impl == "bccb" else op_cost(op, case, itemsize, backward)


# ----- the report ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One implementation on one (shape, op, pass, dtype), timed or with the reason it was not."""

    section: str
    case: str
    shape: str
    op: str
    mode: str
    dtype: str
    impl: str
    status: str
    note: str = ""
    pixels: int = 0
    window: int = 0
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    runs: int = 0
    flops: int | None = None
    bytes: int | None = None
    tflops: float | None = None
    gbps: float | None = None
    frac_flops_peak: float | None = None
    frac_copy_peak: float | None = None
    floor_ms: float | None = None
    x_floor: float | None = None
    peak_mem_mb: float | None = None
    max_rel_err: float | None = None
    ours_speedup: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)
    baseline_ms: float | None = None  # the same row's median in the --baseline run
    vs_baseline: float | None = None  # baseline_ms / median_ms: above 1, faster now

    def flat(self) -> dict:
        """The row for CSV: speed-ups as one `vs_<impl>` column each."""
        d = asdict(self)
        for name, x in d.pop("speedups").items():
            d[f"vs_{name}"] = x
        return d


@dataclass(frozen=True)
class Settings:
    """What one bench run does, after validation."""

    device: torch.device
    ops: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    windows: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    modes: tuple[str, ...]
    impls: tuple[str, ...] | None
    repeat: int
    warmup: int
    budget_s: float
    seed: int
    model: bool
    model_sizes: tuple[tuple[int, int], ...]
    model_kinds: tuple[str, ...]
    model_tiled: bool
    model_min_runs: int
    quick: bool
    tf32: bool


def cases_for(settings: Settings) -> list[Case]:
    """The issue-5 shapes asked for, and the scaling sweep (dot, one head, B=1, C=64)."""
    named = {
        "S1": [Case("S1", 2, 64, 128, 96, 15, 1, "dot"), Case("S1", 2, 64, 128, 96, 15, 4, "dot")],
        "S2": [Case("S2", 1, 64, 256, 256, 35, 1, "distance")],
        "train": [Case("train", 12, 64, 64, 64, 35, 1, "distance")],
    }
    cases = [c for name in settings.shapes if name != "sweep" for c in named[name]]
    if "sweep" in settings.shapes:
        for window in settings.windows:
            cases += [Case("sweep", 1, 64, h, w, window) for h, w in settings.sizes if window <= min(h, w)]
    return cases


def memory_budget(device: torch.device) -> int:
    """Bytes a row may use: 80% of the free GPU memory, or half the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.8 * (free + cached))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30


def _role_numel(role: str, case: Case) -> int:
    if role == "image":
        return case.batch * case.channels * case.pixels
    return case.batch * case.heads * case.pixels * case.slots


def footprint(peer: Peer, op: str, case: Case, itemsize: int, backward: bool) -> int:
    """Rough bytes one run needs: inputs and output (and their gradients), plus the peer's own extra."""
    elems = sum(_role_numel(r, case) for r in INPUT_ROLES[op]) + _role_numel(OUTPUT_ROLE[op], case)
    return elems * itemsize * (3 if backward else 1) + peer.extra_bytes(op, case, itemsize, backward)


# ----- inputs, oracle and checks -------------------------------------------------------------------
def make_inputs(op: str, case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """The op's inputs in our layout: random q, k, v; S and A computed from them where the op takes weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.batch, case.channels, case.height, case.width)
    q, k, v = (torch.randn(shape, generator=gen).to(device) for _ in range(3))
    if op == "softmax":
        inputs = (circatt_ops.similarity(q, k, case.window, case.kind, case.heads).flat_values,)
    elif op == "apply":
        inputs = (circatt_ops.adjacency(q, k, case.window, case.kind, case.heads).flat_values, v)
    elif op in ("attention", "step"):
        inputs = (q, k, v)
    else:
        inputs = (q, k)
    return tuple(t.to(dtype).contiguous() for t in inputs)


def grad_output(op: str, case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A fixed random cotangent for the op's output, in our layout."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    if OUTPUT_ROLE[op] == "image":
        shape = (case.batch, case.channels, case.height, case.width)
    else:
        shape = (case.batch, case.heads, case.height, case.width, case.slots)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _native_inputs(peer: Peer, op: str, case: Case, inputs: Sequence[torch.Tensor], grad: torch.Tensor | None) -> list[torch.Tensor]:
    """The inputs in the peer's layout, as leaves that require grad when a backward is wanted."""
    return [peer.native(t, r, case).detach().requires_grad_(grad is not None) for t, r in zip(inputs, INPUT_ROLES[op])]


def run_once(peer: Peer, op: str, case: Case, inputs: Sequence[torch.Tensor], grad: torch.Tensor | None) -> list[torch.Tensor]:
    """The peer's output (and the gradients of its inputs when `grad` is given), all in our layout."""
    native = _native_inputs(peer, op, case, inputs, grad)
    with torch.set_grad_enabled(grad is not None):
        out = peer.run(op, case, *native)
        results = [peer.standard(out, OUTPUT_ROLE[op], case).detach()]
        if grad is not None:
            grads = torch.autograd.grad(out, native, peer.native(grad, OUTPUT_ROLE[op], case))
            results += [peer.standard(g, r, case) for g, r in zip(grads, INPUT_ROLES[op])]
    return results


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """max |a - b| (or max |a|), chunk by chunk so that a 20 GB output needs no 20 GB temporary; inf on NaN."""
    worst = 0.0
    chunks = b.reshape(-1).split(_CHUNK) if b is not None else [None] * math.ceil(a.numel() / _CHUNK)
    for x, y in zip(a.reshape(-1).split(_CHUNK), chunks):
        d = x.float() if y is None else x.float() - y.float()
        m = d.abs().max().item() if d.numel() else 0.0
        if not math.isfinite(m):
            return math.inf
        worst = max(worst, m)
    return worst


def max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The largest max|got - want| / max|want| over the outputs (inf for a NaN, a wrong shape or a wrong count).

    An output whose reference is (near) zero -- e.g. the q, k gradients at window 1 -- is measured against
    1e-3 of the largest output instead, so that rounding noise on it is not an error."""
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return math.inf
    scales = [_max_abs_diff(b) for b in want]
    floor = max(1e-3 * max(scales, default=0.0), 1e-30)
    return max((_max_abs_diff(a, b) / max(scale, floor) for a, b, scale in zip(got, want, scales)), default=0.0)


def timed_call(peer: Peer, op: str, case: Case, inputs: Sequence[torch.Tensor], grad: torch.Tensor | None) -> Callable[[], object]:
    """A closure running the op once on native inputs prepared now (outside the timed region)."""
    native = _native_inputs(peer, op, case, inputs, grad)
    if grad is None:

        def forward() -> object:
            with torch.no_grad():
                return peer.run(op, case, *native)

        return forward
    native_grad = peer.native(grad, OUTPUT_ROLE[op], case)

    def forward_backward() -> object:
        return torch.autograd.grad(peer.run(op, case, *native), native, native_grad)

    return forward_backward


# ----- one group of rows ------------------------------------------------------------------------
@dataclass
class Group:
    """One (case, op, pass, dtype): the rows of every implementation on the same inputs."""

    case: Case
    op: str
    mode: str
    dtype: torch.dtype

    def row(self, impl: str, status: str, note: str = "") -> Row:
        return Row(
            "op", self.case.label, self.case.describe(), self.op, self.mode, dtype_name(self.dtype), impl, status, note,
            self.case.pixels, self.case.window,
        )


def _oracle(group: Group, inputs: Sequence[torch.Tensor], grad: torch.Tensor | None, budget: int) -> tuple[list[torch.Tensor] | None, str]:
    """The reference's float32 outputs on the same inputs, or None and why not."""
    ref = CirculantPeer("reference")
    need = footprint(ref, group.op, group.case, 4, grad is not None)
    if need > budget:
        return None, f"unchecked: the reference needs ~{need / 2**30:.1f} GiB"
    up = [t.float() for t in inputs]
    return run_once(ref, group.op, group.case, up, None if grad is None else grad.float()), ""


def _measure_row(row: Row, group: Group, peer: Peer, sets: list, settings: Settings, ceilings: Ceilings | None) -> None:
    """Time the peer on the rotated input sets and fill the row's numbers."""
    calls = [timed_call(peer, group.op, group.case, inputs, grad) for inputs, grad in sets]
    timing = measure(calls, settings.device, settings.warmup, settings.repeat, settings.budget_s)
    itemsize = torch.tensor([], dtype=group.dtype).element_size()
    flops, nbytes = cost_of(peer.name, group.op, group.case, itemsize, group.mode == "fwd+bwd")
    rate = "tf32" if settings.tf32 and group.dtype == torch.float32 else dtype_name(group.dtype)
    fill_numbers(row, timing, flops, nbytes, ceilings, rate)


def fill_numbers(row: Row, timing: Timing, flops: int | None, nbytes: int | None, ceilings: Ceilings | None, dtype: str) -> None:
    """Time, rates, fractions of the measured ceilings and the roofline floor."""
    t = timing.median_s
    row.median_ms, row.min_ms, row.max_ms, row.runs = t * 1e3, timing.min_s * 1e3, timing.max_s * 1e3, timing.runs
    row.peak_mem_mb = None if timing.peak_bytes is None else timing.peak_bytes / 2**20
    if flops is None or nbytes is None:
        return
    row.flops, row.bytes = flops, nbytes
    row.tflops, row.gbps = flops / t / 1e12, nbytes / t / 1e9
    if ceilings is None:
        return
    peak_flops = ceilings.matmul_flops_per_s.get(dtype)
    row.frac_copy_peak = nbytes / t / ceilings.copy_bytes_per_s
    floor = nbytes / ceilings.copy_bytes_per_s
    if peak_flops:
        row.frac_flops_peak = flops / t / peak_flops
        floor = max(floor, flops / peak_flops)
    row.floor_ms, row.x_floor = floor * 1e3, t / floor


def _skip_reason(peer: Peer, group: Group, settings: Settings, budget: int) -> str | None:
    reason = peer.unavailable(group.op, group.case, settings.device, group.dtype)
    if reason:
        return reason
    itemsize = torch.tensor([], dtype=group.dtype).element_size()
    need = footprint(peer, group.op, group.case, itemsize, group.mode == "fwd+bwd")
    if need > budget:
        return f"needs ~{need / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB limit"
    return None


def _bench_peer(peer: Peer, group: Group, sets: list, oracle: list | None, note: str, settings: Settings, ceilings: Ceilings | None) -> Row:
    """Check one implementation against the oracle, then time it; WRONG rows stay untimed."""
    row = group.row(peer.name, "ok", note if peer.comparable else "global op, not comparable: unchecked")
    peer.prepare(group.op, group.case, settings.device)
    row.note = "; ".join(n for n in (row.note, peer.note(group.case, settings.device)) if n)
    inputs, grad = sets[0]
    is_oracle = type(peer) is CirculantPeer and peer.backend == "reference" and group.dtype == torch.float32
    got = oracle if is_oracle and oracle is not None else run_once(peer, group.op, group.case, inputs, grad)
    if peer.comparable and oracle is not None:
        row.max_rel_err = max_rel_err(got, oracle)
        if not row.max_rel_err <= TOLERANCE[group.dtype]:
            row.status = "WRONG"
            row.note = f"max rel. error {row.max_rel_err:.2g} > {TOLERANCE[group.dtype]:g} vs the reference; not timed"
            return row
    elif peer.comparable:
        row.status = "unchecked"
    del got
    _measure_row(row, group, peer, sets, settings, ceilings)
    return row


def bench_group(group: Group, peers: Sequence[Peer], settings: Settings, ceilings: Ceilings | None) -> list[Row]:
    """Every implementation on one group's inputs: skipped, WRONG, error, unchecked or ok."""
    budget = memory_budget(settings.device)
    todo, rows = [], []
    for peer in (p for p in peers if group.op in p.ops):
        reason = _skip_reason(peer, group, settings, budget)
        if reason:
            rows.append(group.row(peer.name, "skipped", reason))
        else:
            todo.append(peer)
    if not todo:
        return rows
    try:
        sets = _input_sets(group, settings)
        oracle, note = _oracle(group, *sets[0], budget)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return rows + [group.row(peer.name, "skipped", "out of memory for the inputs and the reference") for peer in todo]
    for peer in todo:
        rows.append(_guarded(lambda p=peer: _bench_peer(p, group, sets, oracle, note, settings, ceilings), group.row(peer.name, "error")))
    return rows


def _input_sets(group: Group, settings: Settings) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
    """(inputs, output cotangent or None) per set; several sets when one fits in the cache (see timing.py)."""
    backward = group.mode == "fwd+bwd"

    def one(seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        inputs = make_inputs(group.op, group.case, settings.device, group.dtype, seed)
        return inputs, grad_output(group.op, group.case, settings.device, group.dtype, seed) if backward else None

    sets = [one(settings.seed)]
    n_sets = input_sets_needed(sum(t.numel() * t.element_size() for t in sets[0][0]), settings.device)
    return sets + [one(settings.seed + 1000 * i) for i in range(1, n_sets)]


def _guarded(work: Callable[[], Row], fallback: Row) -> Row:
    """Run one row's work; an out-of-memory or any other failure becomes the row's status, not a crash."""
    try:
        return work()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        fallback.status, fallback.note = "skipped", "out of memory"
    except Exception as err:  # a peer failing must not stop the bench; the row says why
        first_line = str(err).splitlines()[0][:160] if str(err) else ""
        fallback.status, fallback.note = "error", f"{type(err).__name__}: {first_line}"
    return fallback


def add_speedups(rows: list[Row], ours: str) -> None:
    """On each peer row, how many times faster ours is; on ours, the same per peer."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.section, r.case, r.shape, r.op, r.mode, r.dtype), []).append(r)
    for members in groups.values():
        base = next((r for r in members if r.impl == ours and r.status in ("ok", "unchecked")), None)
        if base is None or not base.median_ms:
            continue
        for r in members:
            if r is base or r.impl in NOT_COMPARED or r.median_ms is None:
                continue
            r.ours_speedup = r.median_ms / base.median_ms
            base.speedups[r.impl] = r.ours_speedup


# ----- model level ----------------------------------------------------------------------------------
def _load_denoiser(kind: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The GroupCDL model with its weights, else randomly initialised (timing does not depend on them)."""
    try:
        return load_model(kind, device), "trained weights"
    except WeightsError as err:  # absent or unreadable weights: time a random-init model instead
        why = (str(err).splitlines() or [type(err).__name__])[0].split(" (")[0]
    return GroupCDL(GroupCDLConfig.preset(kind)).to(device).eval(), f"random init ({why})"


def _tiled(model: torch.nn.Module, height: int, width: int, device: torch.device) -> tuple[Callable | None, str]:
    """The denoise command's tiled runner with its margin and its automatic tile, capped at half the image
    so that it tiles; or None and why not."""
    margin = tile_margin(model)
    tile = min(tiling.auto_tile(device, margin, bytes_per_pixel(model)), max(tiling.MIN_TILE, max(height, width) // 2))
    if max(height, width) <= tile + margin:
        return None, f"one tile with its {margin} px margin covers the image: denoise runs it untiled"
    return lambda fn, y: tiling.run_tiled(fn, y, tile, margin), f"tile {tile}, margin {margin}"


def _model_row(kind: str, height: int, width: int, mode: str, status: str, note: str) -> Row:
    size = f"{height}x{width}"
    return Row("model", size, f"B=1 {kind} {size}", "denoise", mode, "float32", f"groupcdl-{kind}", status, note, height * width)


def bench_model(settings: Settings) -> list[Row]:
    """Denoise one image per size (forward, inference mode, float32): untiled, and tiled as `denoise` does."""
    rows: list[Row] = []
    device = settings.device
    modes = ("untiled", "tiled") if settings.model_tiled else ("untiled",)
    for kind in settings.model_kinds:
        model, source = _load_denoiser(kind, device)
        for h, w in settings.model_sizes:
            y = torch.rand(1, model.config.channels, h, w, generator=torch.Generator().manual_seed(settings.seed)).to(device)
            denoise = denoiser(model, y, 25 / 255)  # exactly what `circatt denoise` runs, whole-image mean included
            for mode in modes:
                runner, how = (lambda fn, t: fn(t)), ""
                if mode == "tiled":
                    runner, how = _tiled(model, h, w, device)
                if runner is None:
                    rows.append(_model_row(kind, h, w, mode, "skipped", how))
                    continue
                row = _model_row(kind, h, w, mode, "ok", f"{source}; {how}" if how else source)
                rows.append(_guarded(lambda: _time_model(row, lambda: runner(denoise, y), settings), row))
    return rows


def _time_model(row: Row, call: Callable[[], object], settings: Settings) -> Row:
    def run() -> object:
        with torch.inference_mode():
            return call()

    timing = measure([run], settings.device, 1, settings.repeat, settings.budget_s * 2, settings.model_min_runs)
    fill_numbers(row, timing, None, None, None, "float32")
    return row


# ----- options -------------------------------------------------------------------------------------
def _choices(value: str, allowed: Sequence[str], option: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise typer.BadParameter(f"{', '.join(bad) or 'nothing'} not in {', '.join(allowed)}", param_hint=option)
    return items


def _sizes(value: str, option: str) -> tuple[tuple[int, int], ...]:
    """'64,128x96' -> ((64, 64), (128, 96)); 'WxH' is not ambiguous: we write HxW."""
    sizes = []
    for item in (v.strip().lower() for v in value.split(",") if v.strip()):
        parts = item.split("x")
        if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise typer.BadParameter(f"{item!r} is not a size; use N or HxW, e.g. 64,128x96", param_hint=option)
        sizes.append((int(parts[0]), int(parts[-1])))
    if not sizes:
        raise typer.BadParameter("give at least one size", param_hint=option)
    return tuple(sizes)


def _windows(value: str) -> tuple[int, ...]:
    """'15,35' -> (15, 35): odd positive window sides."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or not all(v.isdigit() and int(v) % 2 == 1 for v in items):
        raise typer.BadParameter(f"{value!r}: give odd window sides, e.g. 15,35", param_hint="--windows")
    return tuple(dict.fromkeys(int(v) for v in items))


def _settings(**o) -> Settings:
    """Validate the options into Settings; --quick fills what the user did not set."""
    device, _ = resolve_device(o["device"])
    quick = o["quick"]

    def pick(name: str, default: object) -> object:
        """The user's value, else the --quick value, else the default."""
        if o[name] is not None:
            return o[name]
        return QUICK[name] if quick and name in QUICK else default

    ops = _choices(o["ops"], OPS + ("model",), "--ops")
    dtypes = tuple(DTYPES[d] for d in _choices(pick("dtype", "float32,bfloat16" if device.type == "cuda" else "float32"), tuple(DTYPES), "--dtype"))
    if device.type == "cpu" and o["tf32"]:
        raise typer.BadParameter("TF32 is a CUDA matmul mode; drop --tf32 on the CPU", param_hint="--tf32")
    if device.type == "cpu" and torch.bfloat16 in dtypes:
        raise typer.BadParameter("bfloat16 is CUDA-only in circatt_ops; use --dtype float32 on the CPU", param_hint="--dtype")
    windows = _windows(pick("windows", "15,35"))
    names = [p.name for p in all_peers(device)]
    impls = None if o["impls"] is None else _choices(o["impls"], names, "--impls")
    for name, value, low in (("--repeat", pick("repeat", 20), 1), ("--warmup", pick("warmup", 3), 0)):
        if value < low:
            raise typer.BadParameter(f"must be at least {low}, got {value}", param_hint=name)
    return Settings(
        device=device, ops=tuple(op for op in ops if op != "model"), shapes=_choices(pick("shapes", ",".join(SHAPES)), SHAPES, "--shapes"),
        sizes=_sizes(pick("sizes", SWEEP_SIZES[device.type]), "--sizes"), windows=windows, dtypes=dtypes,
        modes=_choices(o["modes"], MODES, "--modes"), impls=impls, repeat=pick("repeat", 20), warmup=pick("warmup", 3),
        budget_s=QUICK["budget"] if quick else 2.0, seed=o["seed"], model="model" in ops,
        model_sizes=_sizes(pick("model_sizes", MODEL_SIZES[device.type]), "--model-sizes"),
        model_kinds=(DEFAULT_PRESET,) if quick else tuple(PRESETS), model_tiled=not quick,
        model_min_runs=1 if quick else MIN_RUNS, quick=quick, tf32=o["tf32"],
    )


def _check_selection(settings: Settings) -> None:
    """Refuse options that select nothing to time, rather than printing an empty report."""
    if settings.ops and not cases_for(settings):
        raise typer.BadParameter(
            "no shape left: every --windows value is larger than every --sizes value (or --shapes has no sweep)",
            param_hint="--sizes/--windows",
        )
    if settings.impls is not None and settings.ops:
        chosen = [p for p in all_peers(settings.device) if p.name in settings.impls]
        served = {op for p in chosen if settings.device.type in p.devices for op in p.ops}
        if not served & set(settings.ops):
            elsewhere = [f"{p.name} runs on {' / '.join(p.devices)} only" for p in chosen if settings.device.type not in p.devices]
            raise typer.BadParameter(
                f"none of {', '.join(settings.impls)} implements {', '.join(settings.ops)} on {settings.device.type}"
                + (f" ({'; '.join(elsewhere)})" if elsewhere else ""),
                param_hint="--impls",
            )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _progress_line(row: Row) -> str:
    """One row as a short line, printed as soon as it is measured (a run cut off still leaves its numbers)."""
    if row.median_ms is None:
        return f"{row.impl:>10}  {row.status}: {row.note}"
    err = "" if row.max_rel_err is None else f"  err {row.max_rel_err:.1e}"
    return f"{row.impl:>10}  {row.median_ms:10.4f} ms  (min {row.min_ms:.4f}, max {row.max_ms:.4f}, {row.runs} runs){err}  {row.status}"


def run_bench(
    settings: Settings, console: Console, after_group: Callable[[list[Row], Ceilings], None] | None = None
) -> tuple[list[Row], Ceilings]:
    """Build the kernels, measure the ceilings, then every group and the model rows; `after_group` gets
    the rows so far after each group (the command saves them, so that a run cut off keeps its rows).
    TF32 is allowed for the whole run exactly when `settings.tf32` (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    try:
        return _run_bench(settings, console, after_group)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _run_bench(
    settings: Settings, console: Console, after_group: Callable[[list[Row], Ceilings], None] | None
) -> tuple[list[Row], Ceilings]:
    peers = [p for p in all_peers(settings.device) if settings.impls is None or p.name in settings.impls]
    t0 = time.perf_counter()
    try:
        backends.resolve(None, settings.device)  # builds our kernels on first use (cached), outside the timings
    except Exception as err:  # a broken build skips our rows (saying why) instead of stopping the bench
        reason = f"our {settings.device.type} kernels are unavailable: {str(err).splitlines()[-1] if str(err) else type(err).__name__}"
        print_error(console, reason)
        peers = [Unavailable(p, reason) if getattr(p, "backend", None) == settings.device.type else p for p in peers]
    if time.perf_counter() - t0 > 1:
        console.print(f"kernels ready in {time.perf_counter() - t0:.0f} s (built once, cached)")
    ceilings = measure_ceilings(settings.device, settings.dtypes, settings.quick)
    rows: list[Row] = []
    groups = [Group(c, op, m, dt) for c in cases_for(settings) for op in settings.ops for m in settings.modes for dt in settings.dtypes]
    for i, group in enumerate(groups, 1):
        console.print(f"[dim]({i}/{len(groups)}) {group.case.label} {group.case.describe()} {group.op} {group.mode} {dtype_name(group.dtype)}[/]", highlight=False)
        done = bench_group(group, peers, settings, ceilings)
        for row in done:
            console.print(f"[dim]    {_progress_line(row)}[/]", highlight=False)
        rows += done
        synchronize(settings.device)
        if after_group is not None:
            after_group(rows, ceilings)
    if settings.model:
        rows += bench_model(settings)
    add_speedups(rows, "cuda" if settings.device.type == "cuda" else "cpu")
    return rows, ceilings


def bench(
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (CUDA asked for and absent is an error)."),
    ops: str = typer.Option(",".join(OPS + ("model",)), help="Comma list of: " + ", ".join(OPS + ("model",)) + "."),
    shapes: str = typer.Option(None, help="Comma list of S1, S2, train, sweep (default all; --quick: sweep)."),
    sizes: str = typer.Option(None, help="Sweep image sizes, N or HxW (default 64..2048 on CUDA, 64..256 on the CPU)."),
    windows: str = typer.Option(None, help="Sweep windows (default 15,35)."),
    dtype: str = typer.Option(None, help="float32 and/or bfloat16 (CUDA only); default both on CUDA, float32 on the CPU."),
    modes: str = typer.Option("fwd,fwd+bwd", help="fwd and/or fwd+bwd."),
    impls: str = typer.Option(None, help="Only these implementations (default all that apply)."),
    model_sizes: str = typer.Option(None, "--model-sizes", help=f"Denoise sizes (default {MODEL_SIZES['cuda']} on CUDA, {MODEL_SIZES['cpu']} on the CPU)."),
    repeat: int = typer.Option(None, help="Timed runs per row: at most this, at least 3, fewer when a row would exceed its time budget; default 20."),
    warmup: int = typer.Option(None, help="Untimed runs before timing (at least 1); default 3."),
    seed: int = typer.Option(0, help="Seed of the random inputs."),
    quick: bool = typer.Option(False, "--quick", help="A small subset: the sweep at 32 and 48 px, window 7, one 32 px gray denoise."),
    json_path: Path = typer.Option(None, "--json", help="Write every row and the ceilings as JSON; rewritten after each group, so a run cut off keeps its rows (meta.complete says whether it finished).", dir_okay=False),
    csv_path: Path = typer.Option(None, "--csv", help="Write every row as CSV.", dir_okay=False),
    plot_path: Path = typer.Option(None, "--plot", help="Write a log-log PNG of time against image size.", dir_okay=False),
    baseline_path: Path = typer.Option(None, "--baseline", help="A previous run's --json (another build, say): each row it also timed (same shape, op, pass, dtype and implementation) shows its time there over ours now.", dir_okay=False),
    tf32: bool = typer.Option(False, "--tf32", help="Allow TF32 in float32 matmuls for every implementation alike (torch.backends.cuda.matmul.allow_tf32: our fused attention, Flex, SDPA, the reference); float32 floors then use the TF32 rate."),
) -> None:
    """Time the circulant attention ops, the peers and the denoiser; tables, JSON, CSV and a plot."""
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise typer.BadParameter("the plot is a PNG; give a path ending in .png", param_hint="--plot")
    for option, path in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path)):
        check_result_file(path, option)  # now, not after an hour of timing
    baseline = _baseline(baseline_path)
    settings = _settings(
        device=device, ops=ops, shapes=shapes, sizes=sizes, windows=windows, dtype=dtype, modes=modes, impls=impls,
        model_sizes=model_sizes, repeat=repeat, warmup=warmup, seed=seed, quick=quick, tf32=tf32,
    )
    _check_selection(settings)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    started = time.perf_counter()
    name = _device_name(settings.device)

    def save(rows: list[Row], ceilings: Ceilings, complete: bool = False) -> None:
        """The JSON and CSV of the rows so far (`meta.complete` says whether the run got to its end)."""
        meta = {
            "device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "circatt": __version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 2), "tf32": settings.tf32,
            "complete": complete, "settings": {k: str(v) for k, v in asdict(settings).items()},
        }
        if baseline is not None:
            add_baseline(rows, baseline)
        try:
            if json_path:
                write_json(json_path, meta, ceilings, rows)
            if csv_path:
                write_csv(csv_path, rows)
        except OSError as err:
            print_error(console, f"cannot write the results: {err}")
            raise typer.Exit(1) from None

    rows, ceilings = run_bench(settings, console, save)
    save(rows, ceilings, complete=True)
    print_report(rows, ceilings, name, console)
    if baseline is not None:
        console.print(baseline_summary(rows, baseline, name, "cuda" if settings.device.type == "cuda" else "cpu"), highlight=False)
    if plot_path:
        try:
            write_plot(plot_path, rows, name)
        except OSError as err:
            print_error(console, f"cannot write the plot: {err}")
            raise typer.Exit(1) from None
    seconds = time.perf_counter() - started
    ours = "cuda" if settings.device.type == "cuda" else "cpu"
    failed = [r for r in rows if r.status == "WRONG" or (r.status == "error" and r.impl == ours)]
    console.print(f"{len(rows)} rows in {seconds:.0f} s" + (f"; [bold red]{len(failed)} WRONG or failed[/]" if failed else ""))
    if failed:
        raise typer.Exit(1)


def _baseline(path: Path | None) -> Baseline | None:
    """The --baseline file read before any timing; a usage error naming the option if it is not a bench JSON."""
    if path is None:
        return None
    try:
        return read_baseline(path)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--baseline") from None


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
