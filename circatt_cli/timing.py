"""The bench's timer and the device ceilings it is measured against.

A timed callable is warmed up, then run `repeat` times (fewer if each run is slow, see `measure`);
we keep the median, min and max. On CUDA every run sits between two CUDA events, on the CPU
between two perf_counter reads. When one input set fits in the last-level cache, the caller
passes several sets and the runs rotate among them, so that no run finds its inputs cache-hot.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MAX_INPUT_SETS = 32
MIN_RUNS = 3
_FALLBACK_CACHE = 32 << 20


@dataclass(frozen=True)
class Timing:
    """Seconds per run over `runs` timed runs, and the peak extra memory of one run (None on the CPU)."""

    median_s: float
    min_s: float
    max_s: float
    runs: int
    peak_bytes: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the key of a dtype in the ceilings and the report."""
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a rotation must defeat: the GPU's L2, or the CPU's largest cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=_FALLBACK_CACHE)


def input_sets_needed(nbytes: int, device: torch.device) -> int:
    """How many distinct input sets to rotate so that together they cover twice the cache."""
    cache = cache_bytes(device)
    if nbytes <= 0 or nbytes >= cache:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(2 * cache / nbytes))


def _run_times(fns: Sequence[Callable[[], object]], device: torch.device, runs: int, start: int) -> list[float]:
    """Seconds of each of `runs` calls, rotating through `fns` from index `start`."""
    picks = [fns[(start + i) % len(fns)] for i in range(runs)]
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in picks]
        for fn, (begin, end) in zip(picks, events):
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) / 1e3 for begin, end in events]
    times = []
    for fn in picks:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated by one call above what was allocated before it (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def measure(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    repeat: int = 20,
    budget_s: float = 2.0,
    min_runs: int = MIN_RUNS,
) -> Timing:
    """Warm up (at least once, at most `warmup` runs or `budget_s`; the warm-up sizes the run count),
    then time up to `repeat` runs: at least `min_runs`, fewer when they would exceed `budget_s`."""
    if not fns:
        raise ValueError("measure needs at least one callable")
    warm = _run_times(fns, device, 1, 0)
    while len(warm) < warmup and sum(warm) < budget_s:
        warm += _run_times(fns, device, 1, len(warm))
    runs = max(min_runs, min(repeat, int(budget_s / max(min(warm), 1e-9))))
    times = _run_times(fns, device, runs, len(warm))
    return Timing(statistics.median(times), min(times), max(times), runs, peak_memory(fns[0], device))


@dataclass(frozen=True)
class Ceilings:
    """What the device reached in this run: copy bandwidth (read + write bytes) and matmul rate per dtype."""

    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float]

    def as_dict(self) -> dict:
        return {"copy_GBps": self.copy_bytes_per_s / 1e9, "matmul_TFLOPs": {k: v / 1e12 for k, v in self.matmul_flops_per_s.items()}}


def _copy_rate(device: torch.device) -> float:
    """Bytes per second of a copy far larger than the cache, counting the read and the write."""
    nbytes = max(8 * cache_bytes(device), (1 << 30) if device.type == "cuda" else (128 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure([lambda: dst.copy_(src)], device, warmup=2, repeat=10, budget_s=1.0)
    return 2 * src.numel() * src.element_size() / timing.median_s


def _matmul_rate(device: torch.device, dtype: torch.dtype, quick: bool, tf32: bool = False) -> float:
    """FLOP per second of a large square matmul in `dtype` (TF32 only when asked)."""
    n = 8192 if device.type == "cuda" else (768 if quick else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        timing = measure([lambda: a @ b], device, warmup=2, repeat=10, budget_s=1.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * n**3 / timing.median_s


def measure_ceilings(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool = False) -> Ceilings:
    """The copy bandwidth and the matmul rate of each dtype (plus TF32 on CUDA), measured now."""
    rates = {dtype_name(dt): _matmul_rate(device, dt, quick) for dt in dtypes}
    if device.type == "cuda" and torch.float32 in dtypes:
        rates["tf32"] = _matmul_rate(device, torch.float32, quick, tf32=True)
    return Ceilings(_copy_rate(device), rates)
