"""Geometric self-ensemble: a denoiser run on the 8 flips and quarter-turns of an image, each result
turned back and the 8 averaged. The field's usual x8 test-time trick: 8 times the work for a little
PSNR (measured in docs/cli.md), at no cost in memory beyond one more image."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

# (quarter turns, mirror): the dihedral group of the square, the identity first.
TRANSFORMS = tuple((turns, mirror) for turns in range(4) for mirror in (False, True))


def forward(x: Tensor, turns: int, mirror: bool) -> Tensor:
    """Turn the last two dims of x by `turns` quarter turns, then mirror it left-right if asked."""
    y = x.rot90(turns, dims=(-2, -1))
    return y.flip(-1) if mirror else y


def inverse(y: Tensor, turns: int, mirror: bool) -> Tensor:
    """Undo `forward`: mirror back first, then turn back."""
    y = y.flip(-1) if mirror else y
    return y.rot90(-turns, dims=(-2, -1))


def self_ensemble(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """x -> the mean over TRANSFORMS of inverse(fn(forward(x))), summed in place one result at a time."""

    def run(x: Tensor) -> Tensor:
        total = None
        for turns, mirror in TRANSFORMS:
            out = inverse(fn(forward(x, turns, mirror)), turns, mirror)
            total = out.clone() if total is None else total.add_(out)
        return total / len(TRANSFORMS)

    return run
