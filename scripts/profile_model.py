"""Where a denoise spends its GPU time: the shipped model on one random image under torch.profiler,
the CUDA kernels grouped by name, as a table of total ms and share (docs/kernels.md, "Model time").

    python3 scripts/profile_model.py gray 512x512
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from circatt_cli.weights import WeightsError, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="gray, color, or a .safetensors path")
    parser.add_argument("size", help="HxW of the random image, e.g. 512x512")
    parser.add_argument("--rows", type=int, default=15, help="kernels to list")
    args = parser.parse_args()
    parts = args.size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        parser.error(f"size {args.size!r}: give HxW, e.g. 512x512")
    h, w = (int(p) for p in parts)
    if not torch.cuda.is_available():
        parser.error("profiles the CUDA kernels: no CUDA device here")
    device = torch.device("cuda")
    try:
        model = load_model(args.model, device)
    except WeightsError as err:
        parser.error(str(err))
    x = torch.rand(1, model.config.channels, h, w, device=device)
    sigma = torch.tensor([25 / 255], device=device)
    with torch.inference_mode():
        model(x, sigma)  # build and warm up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x, sigma)
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time / 1000
            totals[event.name][1] += 1
    grand = sum(ms for ms, _ in totals.values())
    print(f"{args.model} {h}x{w}: {grand:.2f} ms of kernels in {sum(n for _, n in totals.values())} launches")
    print(f"{'ms':>8} {'share':>6} {'calls':>5}  kernel")
    for name, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.rows]:
        print(f"{ms:8.2f} {100 * ms / grand:5.1f}% {calls:5d}  {name[:110]}")


if __name__ == "__main__":
    main()
