"""Global circulant attention: the nearest BCCB matrix to q k^T / sqrt(d), applied by 2-D FFT.

A block-circulant-with-circulant-blocks (BCCB) matrix on an H x W grid is fixed by one H x W kernel
and is diagonalised by the 2-D DFT, so projecting full attention onto such matrices ("Vision
Transformers are Circulant Attention Learners", Han et al., AAAI 2026) costs O(N log N), N = H*W.

Convention. Pixel (i, j) has the linear index n = i*W + j; rows of a matrix are queries n, columns
are keys m, and the offset of an entry is (u, v) = ((i_m - i_n) mod H, (j_m - j_n) mod W). A BCCB
matrix with kernel w is ``M_w[n, m] = w[(m - n) mod (H, W)]``, so ``(M_w x)[:, n] = sum over (u, v)
of w[u, v] * x[:, n + (u, v)]`` and every row of M_w holds every entry of w once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_4d, check_dtype, check_heads, check_operand, check_pair, split_heads

__all__ = ["BCCB", "bccb_attention"]

DENSE_LIMIT = 4096
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float64)
_SHADES = " .:-=+*#%@"
_PICTURE_MAX = (8, 32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the FFTs run in: half types are lifted to float32, the rest kept."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _correlation_logits(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """a[b, h, u, v] = sum_c sum_n Re(conj(q_c[n]) k_c[n + (u, v)]) / (N sqrt(d)), via conj(F q) * F k."""
    H, W = q.shape[-2:]
    d = q.shape[1] // heads
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    if q.is_complex():
        spectrum = (torch.fft.fft2(qh).conj() * torch.fft.fft2(kh)).sum(2)
        a = torch.fft.ifft2(spectrum).real
    else:
        spectrum = (torch.fft.rfft2(qh).conj() * torch.fft.rfft2(kh)).sum(2)
        a = torch.fft.irfft2(spectrum, s=(H, W))
    return a / (H * W * math.sqrt(d))


def _grid_softmax(a: Tensor) -> Tensor:
    """Softmax over all H*W offsets of each (batch, head) map."""
    return torch.softmax(a.flatten(2), dim=-1).view_as(a)


def _bccb_apply(w: Tensor, x: Tensor) -> Tensor:
    """y = M_w x per channel: y_c = F^-1(conj(F w) * F x_c), i.e. y[:, n] = sum_(u,v) w[u, v] x[:, n + (u, v)]."""
    B, C, H, W = x.shape
    heads = w.shape[1]
    xh = split_heads(x, heads)
    if x.is_complex():
        y = torch.fft.ifft2(torch.fft.fft2(w).conj().unsqueeze(2) * torch.fft.fft2(xh))
    else:
        y = torch.fft.irfft2(torch.fft.rfft2(w).conj().unsqueeze(2) * torch.fft.rfft2(xh), s=(H, W))
    return y.reshape(B, C, H, W)


def _offset_index(H: int, W: int, device: torch.device) -> Tensor:
    """(N, N) long tensor: entry [n, m] is the flat offset ((i_m - i_n) mod H) * W + (j_m - j_n) mod W."""
    i = torch.arange(H, device=device).repeat_interleave(W)
    j = torch.arange(W, device=device).repeat(H)
    return ((i[None, :] - i[:, None]) % H) * W + (j[None, :] - j[:, None]) % W


def _picture(w: Tensor) -> list[str]:
    """A few lines of shaded text showing one kernel with offset (0, 0) at the centre, pooled to fit."""
    H, W = w.shape
    image = torch.roll(w.detach().to("cpu", torch.float64), shifts=(H // 2, W // 2), dims=(0, 1))
    rows, cols = min(H, _PICTURE_MAX[0]), min(W, _PICTURE_MAX[1])
    image = torch.nn.functional.adaptive_avg_pool2d(image[None, None], (rows, cols))[0, 0]
    low, high = image.min(), image.max()
    level = torch.zeros_like(image) if high <= low else (image - low) / (high - low)
    shade = (level * (len(_SHADES) - 1)).round().long()
    return ["  |" + "".join(_SHADES[s] for s in row) + "|" for row in shade.tolist()]


class BCCB:
    """A batched, multi-head BCCB matrix of logical shape (B, heads, N, N), stored as its kernel.

    ``kernel[b, h, u, v]`` is the weight of offset (u, v): ``M[b, h, n, m] = kernel[b, h, (m - n) mod (H, W)]``
    with n, m row-major pixel indices (row = query, column = key). A kernel from ``bccb_attention``
    is a softmax over all N offsets, so every row of M sums to 1.

    Args:
        kernel: real float32/float64 tensor of shape (B, heads, H, W); may require grad.
    """

    def __init__(self, kernel: Tensor) -> None:
        if not isinstance(kernel, Tensor):
            raise TypeError(f"kernel must be a torch.Tensor of shape (B, heads, H, W), got {type(kernel).__name__}")
        if kernel.dim() != 4:
            raise ValueError(f"kernel must be 4-D (B, heads, H, W), got shape {tuple(kernel.shape)}")
        if kernel.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"kernel must be float32 or float64, got {kernel.dtype}; use kernel.real or kernel.float()")
        self._kernel = kernel

    @property
    def kernel(self) -> Tensor:
        """The (B, heads, H, W) kernel w."""
        return self._kernel

    @property
    def heads(self) -> int:
        return self._kernel.shape[1]

    @property
    def batch(self) -> int:
        return self._kernel.shape[0]

    @property
    def spatial_size(self) -> tuple[int, int]:
        """The grid (H, W)."""
        return tuple(self._kernel.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        return self._kernel.dtype

    @property
    def device(self) -> torch.device:
        return self._kernel.device

    def apply(self, x: Tensor) -> Tensor:
        """y = M x: the head's matrix applied to every channel of that head, by 2-D FFT in O(N log N).

        Args:
            x: (B, C, H, W) with C divisible by heads, the kernel's precision (real or complex);
                float16/bfloat16 on CUDA with a float32 kernel, returned in x's dtype.
        """
        check_operand(
            "x", x, "the kernel", batch=self.batch, size=self.spatial_size, heads=self.heads, device=self.device,
            precision=None,
        )
        check_dtype("x", x)
        compute = _compute_dtype(x.dtype)
        if compute.to_real() != self.dtype:
            raise TypeError(
                f"x is {x.dtype} but the kernel is {self.dtype}; convert x with x.to({self.dtype}) "
                f"(or its complex counterpart)"
            )
        return _bccb_apply(self._kernel, x.to(compute)).to(x.dtype)

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def to_dense(self) -> Tensor:
        """The (B, heads, N, N) matrix M[b, h, n, m] = kernel[b, h, (m - n) mod (H, W)], for small grids (tests)."""
        H, W = self.spatial_size
        if H * W > DENSE_LIMIT:
            raise ValueError(
                f"to_dense() builds an N x N matrix per head and refuses N = {H}x{W} = {H * W} > {DENSE_LIMIT}; "
                f"use apply(x), or crop the grid for inspection"
            )
        return self._kernel.flatten(2)[..., _offset_index(H, W, self.device)]

    def __repr__(self) -> str:
        H, W = self.spatial_size
        head = (
            f"BCCB attention kernel: {self.batch} batch x {self.heads} heads, {H}x{W} grid, "
            f"{str(self.dtype).removeprefix('torch.')} on {self.device}"
        )
        if self._kernel.numel() == 0 or self.device.type == "meta":
            return head
        pooled = H > _PICTURE_MAX[0] or W > _PICTURE_MAX[1]
        caption = "  kernel[0, 0], offset (0, 0) at the centre" + (", pooled:" if pooled else ":")
        return "\n".join([head, caption, *_picture(self._kernel[0, 0])])


def bccb_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int = 1, return_kernel: bool = False
) -> Tensor | tuple[Tensor, BCCB]:
    """Global attention through the BCCB matrix nearest to q k^T / sqrt(d), in O(N log N) by 2-D FFT.

    Per head, the logits a[u, v] are the mean of S / sqrt(d) along the cyclic diagonal
    {(n, m): m - n = (u, v) mod (H, W)}, with S[n, m] = Re(sum_c q_c[n] conj(k_c[m])) summed over the
    head's d channels; equivalently a = F^-1(sum_c conj(F q_c) * F k_c) / (N sqrt(d)). Then
    w = softmax(a) over all N offsets and y = M_w v, M_w[n, m] = w[(m - n) mod (H, W)]
    (row = query n, column = key m), i.e. y_c = F^-1(conj(F w) * F v_c) for every channel of the head.

    Args:
        q, k: (B, C, H, W) queries and keys of one shape, dtype and device; float32/64, complex64/128
            (float16/bfloat16 on CUDA, computed in float32). Any H and W.
        v: (B, C_v, H, W) values, same dtype, device, batch and grid; C_v divisible by heads.
        heads: number of heads; each takes a contiguous block of C // heads channels of q, k and v.
        return_kernel: also return the ``BCCB`` of the softmax kernel w (real, (B, heads, H, W)).

    Returns:
        y of v's shape and dtype, or ``(y, BCCB)`` when ``return_kernel``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_4d(name, t)
    check_dtype("q", q)
    check_pair("q", q, "k", k, same_channels=True)
    check_pair("q", q, "v", v, same_channels=False)
    check_heads(heads, q.shape[1], "q")
    check_heads(heads, v.shape[1], "v")
    compute = _compute_dtype(q.dtype)
    w = _grid_softmax(_correlation_logits(q.to(compute), k.to(compute), heads))
    kernel = BCCB(w)
    y = _bccb_apply(w, v.to(compute)).to(v.dtype)
    return (y, kernel) if return_kernel else y
