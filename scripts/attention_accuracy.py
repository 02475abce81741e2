"""Errors of the CUDA fused attention's float32 paths against float64, at S1 (B=2, C=64, 128x96, ws 15).

    python scripts/attention_accuracy.py [HEADS]

For the scalar IEEE kernels, the tensor cores with split TF32 operands (float32 without
allow_tf32) and plain TF32 (allow_tf32): the largest absolute and relative error of y, dq, dk and
dv of one forward + backward on random float32 inputs, against the float64 reference on the CPU.
"""

from __future__ import annotations

import sys

import torch

import circatt_ops as ca
from circatt_ops import _extension


def errors(leaves: list[torch.Tensor], dy: torch.Tensor, heads: int, want: list[torch.Tensor]) -> list[tuple[float, float]]:
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    y = ca.attention(*xs, 15, heads=heads, backend="cuda")
    y.backward(dy)
    got = [y.detach()] + [t.grad for t in xs]
    return [((g.double().cpu() - w).abs().max().item(), ((g.double().cpu() - w).abs().max() / w.abs().max()).item())
            for g, w in zip(got, want)]


def main() -> None:
    heads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(0)
    q, k, v, dy = (torch.randn(2, 64, 128, 96, device="cuda") for _ in range(4))
    ref_leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref = ca.attention(*ref_leaves, 15, heads=heads, backend="reference")
    ref.backward(dy.double().cpu())
    want = [ref.detach()] + [t.grad for t in ref_leaves]
    kernels = _extension.load("cuda")
    modes = {"IEEE (scalar kernels)": (False, False), "split TF32 (tensor cores)": (True, False), "TF32 (tensor cores)": (True, True)}
    saved = torch.backends.cuda.matmul.allow_tf32
    print(f"S1, {heads} head(s): largest |error| (relative to the largest |value|) against float64")
    print(f"{'path':28s}" + "".join(f"{n:>22s}" for n in ("y", "dq", "dk", "dv")))
    try:
        for name, (cores, tf32) in modes.items():
            kernels._set_tensor_cores(cores)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            row = errors([q, k, v], dy, heads, want)
            print(f"{name:28s}" + "".join(f"{a:>12.2e} ({r:.1e})" for a, r in row))
    finally:
        kernels._set_tensor_cores(True)
        torch.backends.cuda.matmul.allow_tf32 = saved


if __name__ == "__main__":
    main()
