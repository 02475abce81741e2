"""Where the time of one fused attention call goes: the extension's calls alone against the public op.

    python scripts/attention_timeline.py [DTYPE] [HEADS]      (default bfloat16 1; S1: B=2, C=64, 128x96, ws 15)

For each layer -- the compiled forward and backward called directly, `ca.attention` without grad,
an empty autograd Function with `torch.autograd.grad` (the floor of any autograd call), the Python
`AttentionFn` and `ca.attention` (the C++ node) with it, the last also with autograd's device threads
off -- prints the CUDA-event time per call of 50 back-to-back calls (the way `circatt bench` times
them) and the host time per call; then torch.profiler's table of one batch of fwd+bwd calls. Where a
layer's host time is above its GPU time, the host (checks, autograd, allocations, launches) bounds it
(docs/kernels.md, open problem 13).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import circatt_ops as ca
from circatt_ops import backends
from circatt_ops.autograd import AttentionFn

CALLS = 50


def per_call(fn: Callable[[], object]) -> tuple[float, float]:
    """(GPU us, host us) per call of `fn` over CALLS back-to-back calls after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    for _ in range(CALLS):
        fn()
    end.record()
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    return start.elapsed_time(end) / CALLS * 1e3, host / CALLS * 1e6


class Empty(torch.autograd.Function):
    """An autograd Function that only allocates its outputs: what any autograd call costs at least."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(v)

    @staticmethod
    def backward(ctx, dy):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def without_device_threads(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` with autograd's backward on the calling thread instead of its per-device threads."""

    def run() -> object:
        torch.autograd.set_multithreading_enabled(False)
        try:
            return fn()
        finally:
            torch.autograd.set_multithreading_enabled(True)

    return run


def main() -> None:
    dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.bfloat16
    heads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    B, C, H, W, ws = 2, 64, 128, 96, 15
    q, k, v = (torch.randn(B, C, H, W, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dy = torch.randn(B, C, H, W, device="cuda", dtype=dtype)
    ext = backends.resolve(None, q.device)
    split = [t.detach().reshape(B, heads, C // heads, H, W) for t in (q, k, v, dy)]
    scale = (C // heads) ** -0.5
    y, lse = ext.attention_forward(*split[:3], ws, False, scale)

    def fwd_grad() -> None:
        torch.autograd.grad(ca.attention(q, k, v, ws, heads=heads), (q, k, v), dy)

    def fwd_nograd() -> None:
        with torch.no_grad():
            ca.attention(q, k, v, ws, heads=heads)

    def python_fn_grad() -> None:
        torch.autograd.grad(AttentionFn.apply(q, k, v, ws, False, scale, heads, ext), (q, k, v), dy)

    layers = {
        "extension forward": lambda: ext.attention_forward(*split[:3], ws, False, scale),
        "extension backward": lambda: ext.attention_backward(*split[:3], y, lse, split[3], ws, False, scale),
        "ca.attention, no grad": fwd_nograd,
        "empty Function + autograd.grad": lambda: torch.autograd.grad(Empty.apply(q, k, v), (q, k, v), dy),
        "AttentionFn (Python) + grad": python_fn_grad,
        "ca.attention + autograd.grad": fwd_grad,
        "the same, no device threads": without_device_threads(fwd_grad),
    }
    print(f"{dtype}, {heads} head(s), tf32 {torch.backends.cuda.matmul.allow_tf32}")
    for name, fn in layers.items():
        gpu, host = per_call(fn)
        print(f"  {name:32s} {gpu:8.1f} us a call on the GPU, {host:8.1f} us on the host")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fwd_grad()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=24, max_name_column_width=60))


if __name__ == "__main__":
    main()
