"""BCCB (global, 2-D FFT) circulant attention against an explicit dense construction."""

from __future__ import annotations

import math

import pytest
import torch

from circatt_ops.bccb import BCCB, bccb_attention

SIZES = [(5, 7), (6, 4)]


def explicit_offsets(H: int, W: int) -> torch.Tensor:
    """off[n, m] = flat index of the offset ((i_m - i_n) mod H, (j_m - j_n) mod W), with n = i*W + j."""
    N = H * W
    return torch.tensor(
        [[((m // W - n // W) % H) * W + (m % W - n % W) % W for m in range(N)] for n in range(N)]
    )


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense q k^T / sqrt(d) per head, mean along each cyclic diagonal m - n, softmax, dense BCCB times v."""
    B, C, H, W = q.shape
    N, d, dv = H * W, C // heads, v.shape[1] // heads
    off = explicit_offsets(H, W)
    assert torch.equal(torch.bincount(off.flatten()), torch.full((N,), N))
    ys, ws = [], []
    for h in range(heads):
        qh = q[:, h * d : (h + 1) * d].reshape(B, d, N)
        kh = k[:, h * d : (h + 1) * d].reshape(B, d, N)
        vh = v[:, h * dv : (h + 1) * dv].reshape(B, dv, N)
        S = torch.einsum("bcn,bcm->bnm", qh, kh.conj()) / math.sqrt(d)
        S = S.real if S.is_complex() else S
        a = torch.zeros(B, N, dtype=S.dtype).index_add_(1, off.flatten(), S.flatten(1)) / N
        w = torch.softmax(a, dim=-1)
        M = w[:, off]
        ys.append(torch.einsum("bnm,bcm->bcn", M.to(vh.dtype), vh).reshape(B, dv, H, W))
        ws.append(w.reshape(B, H, W))
    return torch.cat(ys, 1), torch.stack(ws, 1)


def randn(*shape: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("H,W", SIZES)
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_matches_explicit_construction(H: int, W: int, heads: int, dtype: torch.dtype) -> None:
    q, k, v = (randn(2, 2 * heads, H, W, dtype=dtype) for _ in range(3))
    y, kernel = bccb_attention(q, k, v, heads=heads, return_kernel=True)
    y_ref, w_ref = explicit_attention(q, k, v, heads)
    assert y.dtype == dtype and kernel.dtype == torch.float64
    torch.testing.assert_close(kernel.kernel, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bccb_attention(q, k, v, heads=heads), y)


def test_value_channels_may_differ_from_query_channels() -> None:
    q, k, v = randn(2, 6, 5, 7), randn(2, 6, 5, 7), randn(2, 4, 5, 7)
    torch.testing.assert_close(bccb_attention(q, k, v, heads=2), explicit_attention(q, k, v, 2)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_single_precision(dtype: torch.dtype) -> None:
    q, k, v = (randn(2, 6, 6, 4, dtype=dtype) for _ in range(3))
    y = bccb_attention(q, k, v, heads=3)
    double = torch.complex128 if dtype.is_complex else torch.float64
    y_ref = explicit_attention(q.to(double), k.to(double), v.to(double), 3)[0]
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=1e-5, atol=1e-5)


def test_logit_direction_is_key_minus_query() -> None:
    """A query at pixel (0, 0) matching a key at (1, 2) makes offset (1, 2) -- not (-1, -2) -- the heaviest."""
    H, W = 5, 7
    q, k, v = torch.zeros(1, 1, H, W), torch.zeros(1, 1, H, W), randn(1, 1, H, W, dtype=torch.float32)
    q[0, 0, 0, 0], k[0, 0, 1, 2] = 10.0, 10.0
    w = bccb_attention(q, k, v, return_kernel=True)[1].kernel[0, 0]
    assert divmod(int(w.argmax()), W) == (1, 2)


def test_apply_direction_row_is_query() -> None:
    """A kernel that is a delta at offset (1, 2) makes y[:, i, j] = x[:, i + 1, j + 2] and M[n, n + (1, 2)] = 1."""
    H, W = 5, 7
    w = torch.zeros(1, 1, H, W, dtype=torch.float64)
    w[0, 0, 1, 2] = 1.0
    op, x = BCCB(w), randn(1, 3, H, W)
    torch.testing.assert_close(op.apply(x), torch.roll(x, shifts=(-1, -2), dims=(-2, -1)))
    dense = op.to_dense()[0, 0]
    for n in range(H * W):
        i, j = divmod(n, W)
        assert dense[n, ((i + 1) % H) * W + (j + 2) % W] == 1 and dense[n].sum() == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck(dtype: torch.dtype) -> None:
    q, k, v = (randn(1, 4, 3, 5, dtype=dtype).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: bccb_attention(a, b, c, heads=2), (q, k, v))


def test_gradcheck_apply_wrt_kernel_and_input() -> None:
    w = torch.rand(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    x = randn(1, 4, 3, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: BCCB(a).apply(b), (w, x))


@pytest.mark.parametrize("H,W", SIZES)
def test_dense_rows_sum_to_one_and_apply_matches_matmul(H: int, W: int) -> None:
    q, k = randn(2, 6, H, W), randn(2, 6, H, W)
    op = bccb_attention(q, k, randn(2, 6, H, W), heads=3, return_kernel=True)[1]
    dense = op.to_dense()
    assert dense.shape == (2, 3, H * W, H * W)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 3, H * W, dtype=torch.float64))
    for dtype in (torch.float64, torch.complex128):
        x = randn(2, 6, H, W, dtype=dtype)
        expected = (dense.to(dtype).unsqueeze(2) @ x.reshape(2, 3, 2, H * W, 1)).reshape(2, 6, H, W)
        torch.testing.assert_close(op.apply(x), expected)
        torch.testing.assert_close(op @ x, expected)


def test_kernel_object_properties_and_repr() -> None:
    op = BCCB(torch.rand(2, 4, 32, 48))
    assert (op.heads, op.batch, op.spatial_size, op.dtype) == (4, 2, (32, 48), torch.float32)
    lines = repr(op).splitlines()
    assert lines[0] == "BCCB attention kernel: 2 batch x 4 heads, 32x48 grid, float32 on cpu"
    assert len(lines) <= 12


def test_to_dense_refuses_large_grids() -> None:
    with pytest.raises(ValueError, match="4096"):
        BCCB(torch.zeros(1, 1, 65, 64)).to_dense()


Q = torch.zeros(1, 4, 3, 5)
ERRORS = [
    (lambda: bccb_attention(Q.numpy(), Q, Q), TypeError, "q must be a torch.Tensor"),
    (lambda: bccb_attention(Q[0], Q[0], Q[0]), ValueError, r"q must be 4-D.*q\[None\]"),
    (lambda: bccb_attention(Q, Q, Q[0]), ValueError, "v must be 4-D"),
    (lambda: bccb_attention(Q, Q[:, :2], Q), ValueError, "k must match the shape of q"),
    (lambda: bccb_attention(Q, Q, Q[..., :4]), ValueError, "v must match the batch and spatial size of q"),
    (lambda: bccb_attention(Q, Q.double(), Q), TypeError, r"k is torch.float64.*\.to\(torch.float32\)"),
    (lambda: bccb_attention(Q, Q, Q.double()), TypeError, "v is torch.float64"),
    (lambda: bccb_attention(Q, Q.to("meta"), Q), ValueError, "k is on meta.*move both"),
    (lambda: bccb_attention(Q.long(), Q.long(), Q.long()), TypeError, r"q has dtype torch.int64.*q\.float\(\)"),
    (lambda: bccb_attention(Q.half(), Q.half(), Q.half()), TypeError, "CUDA only"),
    (lambda: bccb_attention(Q, Q, Q, heads=3), ValueError, "q has 4 channels.*3 heads"),
    (lambda: bccb_attention(Q, Q, Q[:, :3], heads=2), ValueError, "v has 3 channels.*2 heads"),
    (lambda: bccb_attention(Q, Q, Q, heads=0), ValueError, "heads must be >= 1"),
    (lambda: bccb_attention(Q, Q, Q, heads=-2), ValueError, "heads must be >= 1"),
    (lambda: bccb_attention(Q, Q, Q, heads=2.0), TypeError, "heads must be a positive int"),
    (lambda: bccb_attention(Q, Q, Q, heads=True), TypeError, "heads must be a positive int"),
    (lambda: BCCB([1.0]), TypeError, "kernel must be a torch.Tensor"),
    (lambda: BCCB(torch.zeros(2, 3, 4)), ValueError, "kernel must be 4-D"),
    (lambda: BCCB(torch.zeros(1, 1, 3, 5, dtype=torch.complex64)), TypeError, "kernel must be float32 or float64"),
    (lambda: BCCB(torch.zeros(1, 2, 3, 5)).apply(Q[0]), ValueError, "x must be 4-D"),
    (lambda: BCCB(torch.zeros(1, 3, 3, 5)).apply(Q), ValueError, "x has 4 channels.*3 heads"),
    (lambda: BCCB(torch.zeros(2, 2, 3, 5)).apply(Q), ValueError, "batch 2 and grid 3x5"),
    (lambda: BCCB(torch.zeros(1, 2, 3, 4)).apply(Q), ValueError, "grid 3x4"),
    (lambda: BCCB(torch.zeros(1, 2, 3, 5)).apply(Q.double()), TypeError, r"x is torch.float64 but the kernel is torch.float32"),
    (lambda: BCCB(torch.zeros(1, 2, 3, 5)).apply(Q.to("meta")), ValueError, "x is on meta"),
]


@pytest.mark.parametrize("call,error,message", ERRORS)
def test_errors_name_the_argument_and_the_fix(call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    q, k, v = (randn(2, 6, 6, 10, dtype=dtype).requires_grad_() for _ in range(3))
    y_cpu, op_cpu = bccb_attention(q, k, v, heads=3, return_kernel=True)
    g_cpu = torch.autograd.grad(y_cpu.abs().square().sum(), (q, k, v))
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    y_cuda, op_cuda = bccb_attention(qc, kc, vc, heads=3, return_kernel=True)
    g_cuda = torch.autograd.grad(y_cuda.abs().square().sum(), (qc, kc, vc))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype in (torch.float32, torch.complex64) else {}
    assert y_cuda.device.type == "cuda" and op_cuda.device.type == "cuda"
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, **tol)
    torch.testing.assert_close(op_cuda.kernel.cpu(), op_cpu.kernel, **tol)
    for a, b in zip(g_cuda, g_cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)
    torch.testing.assert_close(op_cuda.to_dense().cpu(), op_cpu.to_dense(), **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_compute_in_float32(dtype: torch.dtype) -> None:
    q, k, v = (randn(2, 6, 6, 10, dtype=torch.float32, device="cuda") for _ in range(3))
    y, op = bccb_attention(q.to(dtype), k.to(dtype), v.to(dtype), heads=3, return_kernel=True)
    assert y.dtype == dtype and op.dtype == torch.float32
    y_ref = bccb_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), heads=3)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(op.apply(v.to(dtype)).float(), y_ref, rtol=2e-2, atol=2e-2)
