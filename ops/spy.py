"""Braille pictures of a sparsity pattern, as the Julia package's `spy` prints them."""

from __future__ import annotations

import torch

# Dot bit of each (row, column) cell inside a 4 x 2 braille character.
_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


def braille(mask: torch.Tensor) -> str:
    """Render a boolean (rows, cols) mask, 4 x 2 dots per character."""
    rows, cols = mask.shape
    pad = (0, (-cols) % 2, 0, (-rows) % 4)
    m = torch.nn.functional.pad(mask.to(torch.uint8), pad).view((rows + pad[3]) // 4, 4, (cols + pad[1]) // 2, 2)
    weights = torch.tensor(_BITS, dtype=torch.int32)
    codes = (m.to(torch.int32) * weights.view(1, 4, 1, 2)).sum(dim=(1, 3))
    return "\n".join("".join(chr(0x2800 + int(c)) for c in line) for line in codes.tolist())


def pattern_mask(columns: torch.Tensor, nonzero: torch.Tensor, n: int, dots: int) -> torch.Tensor:
    """Downsample an n x n pattern onto a dots x dots grid; a dot is on if any entry in its cell is.

    `columns` (R, K) are the column indices of R sampled rows spread evenly over the n rows and
    `nonzero` (R, K) says which of those entries are stored nonzeros.
    """
    rows = columns.shape[0]
    row_dot = (torch.arange(rows) * n // rows) * dots // n
    col_dot = columns * dots // n
    mask = torch.zeros(dots, dots, dtype=torch.bool)
    mask[row_dot.unsqueeze(1).expand_as(col_dot)[nonzero], col_dot[nonzero]] = True
    return mask
