"""Where the time of one fused attention call goes on the GPU: our kernels against the whole call.

    python scripts/attention_timeline.py [DTYPE] [HEADS]      (default bfloat16 1; S1: B=2, C=64, 128x96, ws 15)

Prints the CUDA-event time per call of 50 back-to-back forwards and forward + backwards (the way
`circatt bench` times them), the host time per call, and torch.profiler's table of one batch of
calls: when the kernels' sum is well below the time per call, the host (autograd, checks,
allocations, launches) is what bounds it (docs/kernels.md, open problem 13).
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import circatt_ops as ca


def main() -> None:
    dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.bfloat16
    heads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    q, k, v = (torch.randn(2, 64, 128, 96, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, 64, 128, 96, device="cuda", dtype=dtype)

    def call(backward: bool) -> None:
        if backward:
            torch.autograd.grad(ca.attention(q, k, v, 15, heads=heads), (q, k, v), dy)
        else:
            with torch.no_grad():
                ca.attention(q, k, v, 15, heads=heads)

    for backward in (False, True):
        for _ in range(5):
            call(backward)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        for _ in range(50):
            call(backward)
        end.record()
        host = time.perf_counter() - host
        torch.cuda.synchronize()
        name = "fwd+bwd" if backward else "fwd"
        print(f"{dtype}, {heads} head(s), {name}: {start.elapsed_time(end) / 50 * 1e3:.1f} us a call on the GPU, "
              f"{host / 50 * 1e6:.1f} us a call on the host")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            call(True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))


if __name__ == "__main__":
    main()
