"""The `Circulant` matrix: a batched, multi-head circulant-sparse HW x HW matrix stored as K values per row."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from . import backends
from ._checks import check_operand, check_window, split_heads
from .autograd import ApplyFn
from .spy import braille, pattern_mask

_DENSE_LIMIT = 1 << 26  # entries of to_dense() before we refuse


def key_indices(
    height: int, width: int, window: int, device: torch.device | None = None, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """(HW, K) linear key index of every (query pixel, slot): the column of each stored entry; with
    `rows` (linear query indices) only those rows, (len(rows), K), at a cost independent of HW."""
    r = (window - 1) // 2
    off = torch.arange(window, device=device) - r
    n = torch.arange(height * width, device=device) if rows is None else torch.as_tensor(rows, device=device).reshape(-1)
    i, j = (n // width).view(-1, 1, 1), (n % width).view(-1, 1, 1)
    key_rows = (i + off.view(1, window, 1)) % height
    key_cols = (j + off.view(1, 1, window)) % width
    return (key_rows * width + key_cols).reshape(-1, window * window)


class Circulant:
    """A (B, heads, HW, HW) matrix whose rows each hold K = window^2 entries on a wrapped square window.

    Row n = i*W + j (a query pixel) has entries at the keys ((i+a-r) mod H, (j+c-r) mod W),
    stored in slot order (a, c). Arithmetic, softmax and products keep this compact form and are
    differentiable; gradients stay K values per row.
    """

    __array_priority__ = 1000

    def __init__(self, values: torch.Tensor, window: int, kind: str = "matrix") -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an odd int, got {window!r}")
        shape = tuple(values.shape)
        if values.dim() == 6 and shape[-2:] == (window, window):
            values = values.flatten(-2)
        if values.dim() != 5 or values.shape[-1] != window * window:
            raise ValueError(
                f"values must be (B, heads, H, W, {window}, {window}) or (B, heads, H, W, {window * window}), got {shape}"
            )
        check_window(window, values.shape[2], values.shape[3])
        if not values.is_floating_point():
            raise TypeError(
                f"Circulant values must be real floating point, got {values.dtype} "
                f"(complex q, k give a real similarity); use values.float()"
            )
        self._values = values
        self.window = window
        self.kind = kind

    # ----- shape and storage -------------------------------------------------------------------
    @property
    def values(self) -> torch.Tensor:
        """The stored entries viewed as (B, heads, H, W, window, window)."""
        return self._values.unflatten(-1, (self.window, self.window))

    @property
    def flat_values(self) -> torch.Tensor:
        """The stored entries as (B, heads, H, W, K)."""
        return self._values

    @property
    def batch(self) -> int:
        return self._values.shape[0]

    @property
    def heads(self) -> int:
        return self._values.shape[1]

    @property
    def spatial_size(self) -> tuple[int, int]:
        return tuple(self._values.shape[2:4])  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical shape (B, heads, HW, HW)."""
        n = self.spatial_size[0] * self.spatial_size[1]
        return (self.batch, self.heads, n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    @property
    def nnz(self) -> int:
        """Stored entries over every batch and head."""
        return self._values.numel()

    def _like(self, values: torch.Tensor, kind: str | None = None) -> Circulant:
        return Circulant(values, self.window, self.kind if kind is None else kind)

    def detach(self) -> Circulant:
        return self._like(self._values.detach())

    def to(self, *args, **kwargs) -> Circulant:
        """Move or cast the stored values, as Tensor.to does."""
        return self._like(self._values.to(*args, **kwargs))

    # ----- the operations ----------------------------------------------------------------------
    def softmax(self) -> Circulant:
        """Row-wise softmax over each row's K entries: a row-stochastic adjacency."""
        kind = self.kind.replace("similarity", "adjacency")
        return self._like(torch.softmax(self._values, dim=-1), kind if kind != self.kind else "adjacency")

    def _product(self, x: torch.Tensor, transposed: bool, backend: str | None) -> torch.Tensor:
        check_operand(
            "x", x, "the matrix", batch=self.batch, size=self.spatial_size, heads=self.heads, device=self.device,
            precision=self.dtype,
        )
        impl = backends.resolve(backend, x.device)
        y = ApplyFn.apply(self._values, split_heads(x, self.heads), self.window, transposed, impl)
        return y.reshape(x.shape)

    def apply(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """y = A x for x of shape (B, C, H, W): head h acts on its block of C / heads channels."""
        return self._product(x, False, backend)

    def apply_transposed(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """y = A^T x: each pixel gathers from the rows whose window contains it."""
        return self._product(x, True, backend)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    @property
    def T(self) -> _Transposed:
        """A lazy transpose, so that `A.T @ x` is `A.apply_transposed(x)`."""
        return _Transposed(self)

    # ----- arithmetic on the shared pattern --------------------------------------------------
    def _check_same_pattern(self, other: object) -> None:
        """`other` is a Circulant on the same pattern and device whose batch and heads equal ours or are 1."""
        if not isinstance(other, Circulant):
            raise TypeError(f"expected a Circulant, got {type(other).__name__}")
        if self.window != other.window or self.spatial_size != other.spatial_size:
            raise ValueError(
                f"matrices differ in pattern: window {self.window} on {self.spatial_size} vs "
                f"window {other.window} on {other.spatial_size}"
            )
        if self.device != other.device:
            raise ValueError(f"matrices are on {self.device} and {other.device}; move one with .to()")
        for dim in ("batch", "heads"):
            a, b = getattr(self, dim), getattr(other, dim)
            if a != b and 1 not in (a, b):
                raise ValueError(f"matrices differ in {dim} ({a} vs {b}); {dim} must match or be 1 to broadcast")

    def __add__(self, other: Circulant) -> Circulant:
        if not isinstance(other, Circulant):
            return NotImplemented
        self._check_same_pattern(other)
        return self._like(self._values + other._values, "matrix")

    def __sub__(self, other: Circulant) -> Circulant:
        if not isinstance(other, Circulant):
            return NotImplemented
        self._check_same_pattern(other)
        return self._like(self._values - other._values, "matrix")

    def __neg__(self) -> Circulant:
        return self._like(-self._values, "matrix")

    def _factor(self, factor: object) -> torch.Tensor | float:
        if isinstance(factor, numbers.Real):
            return float(factor)
        if isinstance(factor, torch.Tensor):
            if factor.dim() == 0:
                return factor
            if factor.dim() == 2 and factor.shape[0] in (1, self.batch) and factor.shape[1] in (1, self.heads):
                return factor.reshape(factor.shape[0], factor.shape[1], 1, 1, 1)
        shape = getattr(factor, "shape", type(factor).__name__)
        raise ValueError(f"a Circulant can be scaled by a number or a tensor of shape (B or 1, heads or 1), got {shape}")

    def __mul__(self, factor: object) -> Circulant:
        return self._like(self._values * self._factor(factor), "matrix")

    __rmul__ = __mul__

    def __truediv__(self, factor: object) -> Circulant:
        return self._like(self._values / self._factor(factor), "matrix")

    def lerp(self, end: Circulant, weight: object) -> Circulant:
        """self + weight * (end - self) in one pass over the values (torch.lerp), for blends such as
        GroupCDL's G + gamma (G_new - G); weight is a factor as for `*`."""
        self._check_same_pattern(end)
        return self._like(torch.lerp(self._values, end._values, self._factor(weight)), "matrix")

    def sum(self, dim: str) -> torch.Tensor | Circulant:
        """Sum over 'rows' (each row's entries -> (B, heads, H, W)), 'columns' (-> (B, heads, H, W)),
        'heads' or 'batch' (-> a Circulant with that dimension kept as size 1)."""
        if dim == "rows":
            return self._values.sum(-1)
        if dim in ("columns", "cols"):
            ones = self._values.new_ones(self.batch, self.heads, *self.spatial_size)
            return self.apply_transposed(ones).reshape(self.batch, self.heads, *self.spatial_size)
        if dim == "heads":
            return self._like(self._values.sum(1, keepdim=True), "matrix")
        if dim == "batch":
            return self._like(self._values.sum(0, keepdim=True), "matrix")
        raise ValueError(f"dim must be 'rows', 'columns', 'heads' or 'batch', got {dim!r}")

    # ----- conversions -------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The (B, heads, HW, HW) dense matrix (small sizes only; for tests and pictures)."""
        B, G, n, _ = self.shape
        if B * G * n * n > _DENSE_LIMIT:
            raise ValueError(f"to_dense() of a {B}x{G}x{n}x{n} matrix needs {B * G * n * n:,} entries; use to_sparse_csr()")
        cols = key_indices(*self.spatial_size, self.window, self.device)
        dense = self._values.new_zeros(B, G, n, n)
        index = cols.expand(B, G, n, cols.shape[1])
        return dense.scatter_add(-1, index, self._values.reshape(B, G, n, -1))

    def to_sparse_csr(self) -> torch.Tensor:
        """A torch.sparse_csr_tensor of shape (B, heads, HW, HW), columns sorted within each row."""
        B, G, n, _ = self.shape
        K = self.window * self.window
        cols = key_indices(*self.spatial_size, self.window, self.device)
        cols, order = cols.sort(dim=-1)
        vals = self._values.reshape(B, G, n, K).gather(-1, order.expand(B, G, n, K))
        crow = torch.arange(0, n * K + 1, K, device=self.device)
        return torch.sparse_csr_tensor(
            crow.expand(B, G, n + 1).contiguous(),
            cols.reshape(-1).expand(B, G, n * K).contiguous(),
            vals.reshape(B, G, n * K),
            size=(B, G, n, n),
        )

    def spy(self, batch: int = 0, head: int = 0, width: int = 32) -> str:
        """A braille picture of one (batch, head) slice's pattern, `width` characters wide."""
        H, W = self.spatial_size
        n = H * W
        dots = min(2 * width, n)
        cols = key_indices(H, W, self.window)
        rows = torch.linspace(0, n - 1, steps=min(n, 4 * dots)).round().long()
        vals = self._values[batch, head].detach().reshape(n, -1)[rows.to(self.device)].cpu()
        return braille(pattern_mask(cols[rows], vals != 0, n, dots))

    def __repr__(self) -> str:
        H, W = self.spatial_size
        n = H * W
        heads = f"{self.heads} head" + ("s" if self.heads != 1 else "")
        density = 100.0 * self.window**2 / n
        lines = [
            f"Circulant {self.kind}: {self.batch} x {heads} of {n}x{n} ({H}x{W} pixels), "
            f"window {self.window}x{self.window} wrapped, {self.dtype} on {self.device}",
            f"  {self.nnz:,} stored entries ({density:.3g}% of dense); pattern of [batch 0, head 0]:",
        ]
        lines += ["  " + line for line in self.spy(width=min(32, max(4, n // 2))).splitlines()]
        return "\n".join(lines)


class _Transposed:
    """`A.T`: supports `A.T @ x` without forming the transpose."""

    def __init__(self, matrix: Circulant) -> None:
        self.matrix = matrix

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix.apply_transposed(x)

    def __repr__(self) -> str:
        return "transpose of " + repr(self.matrix)


def cat(matrices: Sequence[Circulant], dim: str = "heads") -> Circulant:
    """Concatenate matrices of one pattern along 'heads' or 'batch'."""
    if dim not in ("heads", "batch"):
        raise ValueError(f"dim must be 'heads' or 'batch', got {dim!r}")
    if not matrices:
        raise ValueError("cat needs at least one Circulant")
    first = matrices[0]
    if not isinstance(first, Circulant):
        raise TypeError(f"cat takes Circulants, got {type(first).__name__}")
    other_dim = "batch" if dim == "heads" else "heads"
    for m in matrices[1:]:
        first._check_same_pattern(m)
        if m.dtype != first.dtype:
            raise TypeError(f"cat needs one dtype: {first.dtype} vs {m.dtype}; convert with .to({first.dtype})")
        if getattr(m, other_dim) != getattr(first, other_dim):
            raise ValueError(f"cat along {dim} needs equal {other_dim}: {getattr(first, other_dim)} vs {getattr(m, other_dim)}")
    values = torch.cat([m.flat_values for m in matrices], dim=1 if dim == "heads" else 0)
    kinds = {m.kind for m in matrices}
    return Circulant(values, first.window, kinds.pop() if len(kinds) == 1 else "matrix")
