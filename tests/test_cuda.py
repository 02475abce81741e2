"""CUDA kernels against the reference backend: fresh random inputs, poisoned outputs, gradcheck.

Skipped without a GPU; run on the device machine whenever kernels change.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import circatt_ops as ca
from conftest import poison_allocator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def poisoned_outputs():
    """Make every kernel output start as NaN, so that an entry a kernel fails to write fails the test."""
    from circatt_ops import _extension

    kernels = _extension.load("cuda")
    kernels._set_poison_outputs(True)
    yield
    kernels._set_poison_outputs(False)

# (B, C, H, W, window, heads)
SHAPES = [(2, 8, 20, 28, 5, 1), (1, 16, 33, 17, 15, 4), (2, 64, 64, 64, 35, 1), (1, 6, 9, 11, 1, 2)]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.complex64: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _pair(shape, dtype, scale=1.0):
    B, C, H, W, window, heads = shape
    q = torch.randn(B, C, H, W, device="cuda", dtype=torch.float64) * scale
    k = torch.randn(B, C, H, W, device="cuda", dtype=torch.float64) * scale
    return q, k


def _close(got, want, dtype):
    assert torch.isfinite(got).all(), "an output was left unwritten (NaN from the poisoned allocator)"
    torch.testing.assert_close(got.to(want.dtype), want, **TOL[dtype])


def _hi(t):
    """The float64 / complex128 CPU copy the reference runs on."""
    return t.cpu().to(torch.complex128 if t.is_complex() else torch.float64)


def _cast(t, dtype):
    return t.to(dtype) if not dtype.is_complex else torch.complex(t, torch.randn_like(t)).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["dot", "distance"])
@pytest.mark.parametrize("dtype", list(TOL))
def test_similarity_and_apply(shape, kind, dtype):
    window, heads = shape[4], shape[5]
    scale = 0.3 if dtype in (torch.float16, torch.bfloat16) else 1.0
    q, k = (_cast(t, dtype) for t in _pair(shape, dtype, scale))
    want = ca.similarity(_hi(q), _hi(k), window, kind=kind, heads=heads, backend="reference")
    poison_allocator("cuda")
    got = ca.similarity(q, k, window, kind=kind, heads=heads, backend="cuda")
    _close(got.flat_values.cpu(), want.flat_values, dtype)

    A = want.softmax()
    x = _cast(torch.randn(shape[0], 2 * heads, *shape[2:4], dtype=torch.float64), dtype)
    real = x.real.dtype if x.is_complex() else x.dtype
    Ad = A.to(device="cuda", dtype=real)
    for transposed in (False, True):
        ref = (A.apply_transposed if transposed else A.apply)(_hi(x))
        poison_allocator("cuda")
        out = (Ad.apply_transposed if transposed else Ad.apply)(x.cuda(), backend="cuda")
        _close(out.cpu(), ref, dtype)


# (B, C, H, W, window) for the apply alone: several channel groups, a second and partial block of
# channels (C > 128), several tiles along a row.
APPLY_SHAPES = [(1, 24, 12, 96, 7), (1, 136, 35, 96, 35), (2, 64, 9, 20, 9)]


@pytest.mark.parametrize("shape", APPLY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_many_channels(shape, dtype):
    B, C, H, W, window = shape
    q, k = (torch.randn(B, 4, H, W, dtype=torch.float64) for _ in range(2))
    A = ca.adjacency(q, k, window, backend="reference")
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    Ad = A.to(device="cuda", dtype=dtype)
    inputs = [x.to("cuda", dtype)]
    if dtype == torch.float32:  # a contiguous view 4 bytes off 16-byte alignment: no kernel may assume more
        inputs.append(torch.empty(x.numel() + 1, device="cuda", dtype=dtype)[1:].view(x.shape).copy_(x))
    for transposed in (False, True):
        ref = (A.apply_transposed if transposed else A.apply)(x, backend="reference")
        for xd in inputs:
            poison_allocator("cuda")
            out = (Ad.apply_transposed if transposed else Ad.apply)(xd, backend="cuda")
            _close(out.cpu(), ref, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["dot", "distance"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fused_attention_forward_and_backward(shape, kind, dtype):
    B, C, H, W, window, heads = shape
    scale = 0.3 if dtype in (torch.float16, torch.bfloat16) else 1.0
    q, k = (t.to(dtype) for t in _pair(shape, dtype, scale))
    v = torch.randn(B, 2 * heads, H, W, device="cuda").to(dtype)
    dy = torch.randn_like(v)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = ca.attention(*leaves, window, kind=kind, heads=heads, backend="reference")
    ref.backward(dy.double().cpu())
    got_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    poison_allocator("cuda")
    y = ca.attention(*got_leaves, window, kind=kind, heads=heads, backend="cuda")
    _close(y.detach().cpu(), ref.detach(), dtype)
    poison_allocator("cuda")
    y.backward(dy)
    for got, want in zip(got_leaves, leaves):
        _close(got.grad.cpu(), want.grad, dtype)


@pytest.mark.parametrize("kind", ["dot", "distance"])
def test_gradcheck_cuda(kind):
    q, k = (t.requires_grad_() for t in _pair((1, 4, 6, 7, 3, 2), torch.float64))
    v = torch.randn(1, 2, 6, 7, device="cuda", dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 2, 6, 7, device="cuda", dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda q, k, v: ca.attention(q, k, v, 3, kind=kind, heads=2, backend="cuda"), (q, k, v), fast_mode=True)
    assert gradcheck(lambda q, k, x: ca.adjacency(q, k, 3, kind=kind, heads=2, backend="cuda").apply(x, backend="cuda"), (q, k, x), fast_mode=True)
    assert gradcheck(lambda q, k, x: ca.adjacency(q, k, 3, kind=kind, heads=2, backend="cuda").apply_transposed(x, backend="cuda"), (q, k, x), fast_mode=True)


def test_complex_on_cuda_matches_reference():
    q, k = (torch.randn(1, 4, 9, 10, dtype=torch.complex64, device="cuda") for _ in range(2))
    v = torch.randn(1, 4, 9, 10, dtype=torch.complex64, device="cuda")
    want = ca.attention(_hi(q), _hi(k), _hi(v), 5, heads=2, backend="reference")
    _close(ca.attention(q, k, v, 5, heads=2, backend="cuda").cpu(), want, torch.complex64)


# (B, heads, channels per head, H, W, window): shapes the tensor-core kernels take. A partial last
# tile row (H % 4) and column (W % 16 == 8), a halo wider than the image (W = 16), one to four 16-key
# chunks per halo row (window 1 to 49), and every head size it has (16, 32, 64, 128).
MMA_SHAPES = [
    (2, 1, 64, 24, 32, 15),
    (1, 4, 16, 18, 40, 7),
    (1, 2, 32, 9, 16, 9),
    (1, 1, 128, 35, 48, 35),
    (2, 1, 64, 5, 8, 1),
    (1, 1, 16, 50, 56, 49),
]


def _kernels():
    from circatt_ops import _extension

    return _extension.load("cuda")


@pytest.mark.parametrize("shape", MMA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_attention(shape, dtype):
    B, heads, ch, H, W, window = shape
    kernels = _kernels()
    q, k, v = (torch.randn(B, heads, ch, H, W, device="cuda", dtype=torch.float64).to(dtype).double() for _ in range(3))
    q, k = (t.mul(0.3).to(dtype).double() for t in (q, k))  # inputs exact in dtype: the reference sees them too
    assert kernels._attention_uses_tensor_cores(q.to(dtype), v.to(dtype), window, False)
    assert not kernels._attention_uses_tensor_cores(q.to(dtype), v.to(dtype), window, True)  # distance: not yet

    flat = [t.reshape(B, heads * ch, H, W) for t in (q, k, v)]
    dy = torch.randn_like(flat[2])
    leaves = [t.detach().cpu().requires_grad_() for t in flat]
    ref = ca.attention(*leaves, window, heads=heads, backend="reference")
    ref.backward(dy.cpu())
    got_leaves = [t.detach().to(dtype).requires_grad_() for t in flat]
    poison_allocator("cuda")
    y = ca.attention(*got_leaves, window, heads=heads, backend="cuda")
    _close(y.detach().cpu(), ref.detach(), dtype)
    poison_allocator("cuda")
    y.backward(dy.to(dtype))  # the backward recomputes the weights from this forward's log-sum-exp
    for got, want in zip(got_leaves, leaves):
        _close(got.grad.cpu(), want.grad, dtype)

    # The log-sum-exp itself, against the scalar kernel's on the same inputs.
    args = [t.to(dtype) for t in (q, k, v)] + [window, False, ch**-0.5]
    poison_allocator("cuda")
    y_mma, lse_mma = kernels.attention_forward(*args)
    kernels._set_tensor_cores(False)
    try:
        y_simt, lse_simt = kernels.attention_forward(*args)
    finally:
        kernels._set_tensor_cores(True)
    assert torch.isfinite(lse_mma).all()
    torch.testing.assert_close(lse_mma, lse_simt, rtol=1e-4, atol=1e-4)
    _close(y_mma.cpu(), y_simt.double().cpu(), dtype)


def _reference_grads(flat, dy, window, heads):
    """The float64 reference's y and (dq, dk, dv) for (B, C, H, W) inputs and upstream gradient dy."""
    leaves = [_hi(t).requires_grad_() for t in flat]
    ref = ca.attention(*leaves, window, heads=heads, backend="reference")
    ref.backward(_hi(dy))
    return ref.detach(), [t.grad for t in leaves]


@pytest.fixture
def tf32():
    """torch.backends.cuda.matmul.allow_tf32 on for the test, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("shape", [s for s in MMA_SHAPES if s[2] <= 64])
def test_tf32_attention(shape, tf32):
    """float32 with TF32 allowed, forward and backward: inputs exact in bfloat16 (so in TF32), so only
    the rounding of P and dS to TF32 remains."""
    B, heads, ch, H, W, window = shape
    kernels = _kernels()
    q, k, v = (torch.randn(B, heads, ch, H, W, device="cuda").to(torch.bfloat16).float() for _ in range(3))
    q, k = (t.mul(0.3).to(torch.bfloat16).float() for t in (q, k))
    assert kernels._attention_uses_tensor_cores(q, v, window, False)

    flat = [t.reshape(B, heads * ch, H, W) for t in (q, k, v)]
    dy = torch.randn_like(flat[2])
    ref, ref_grads = _reference_grads(flat, dy, window, heads)
    got_leaves = [t.detach().clone().requires_grad_() for t in flat]
    poison_allocator("cuda")
    y = ca.attention(*got_leaves, window, heads=heads, backend="cuda")
    tol = dict(rtol=2e-3, atol=2e-3)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(_hi(y.detach()), ref, **tol)
    poison_allocator("cuda")
    y.backward(dy)
    for got, want in zip(got_leaves, ref_grads):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(_hi(got.grad), want, **tol)

    args = [q, k, v, window, False, ch**-0.5]
    y_tf32, lse_tf32 = kernels.attention_forward(*args)
    torch.backends.cuda.matmul.allow_tf32 = False  # the flag alone switches float32 to the split path
    assert kernels._attention_uses_tensor_cores(q, v, window, False)
    y_split, lse_split = kernels.attention_forward(*args)
    torch.testing.assert_close(lse_tf32, lse_split, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_tf32, y_split, **tol)
    if window > 1:  # the two paths differ where P is not exactly 1: TF32 rounding shows
        assert not torch.equal(y_tf32, y_split)


def _attention_errors(flat, dy, window, heads, ref, ref_grads):
    """Largest absolute error of y, dq, dk and dv of one CUDA fwd+bwd against the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in flat]
    poison_allocator("cuda")
    y = ca.attention(*leaves, window, heads=heads, backend="cuda")
    poison_allocator("cuda")
    y.backward(dy)
    outs = [y.detach()] + [t.grad for t in leaves]
    assert all(torch.isfinite(o).all() for o in outs), "an output was left unwritten"
    return [(_hi(o) - w).abs().max().item() for o, w in zip(outs, [ref] + ref_grads)]


@pytest.mark.parametrize("shape", [s for s in MMA_SHAPES if s[2] <= 64])
def test_split_tf32_attention(shape):
    """float32 without TF32 runs on tensor cores with each operand split into two TF32 parts: on
    random float32 inputs its errors against float64 stay within 10x the scalar IEEE kernel's, or
    2e-5 of the output's size (measured at S1: 4-7x, 3e-6-5e-6; TF32 alone: 1e-3-2e-3)."""
    B, heads, ch, H, W, window = shape
    kernels = _kernels()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        q, k, v = (torch.randn(B, heads, ch, H, W, device="cuda") for _ in range(3))
        assert kernels._attention_uses_tensor_cores(q, v, window, False)
        flat = [t.reshape(B, heads * ch, H, W) for t in (q, k, v)]
        dy = torch.randn_like(flat[2])
        ref, ref_grads = _reference_grads(flat, dy, window, heads)
        split = _attention_errors(flat, dy, window, heads, ref, ref_grads)
        kernels._set_tensor_cores(False)
        try:
            ieee = _attention_errors(flat, dy, window, heads, ref, ref_grads)
        finally:
            kernels._set_tensor_cores(True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for name, got, base, want in zip(("y", "dq", "dk", "dv"), split, ieee, [ref] + ref_grads):
        size = want.abs().max().item()
        assert got <= max(10 * base, 2e-5 * size), f"{name}: split TF32 error {got:.3g}, IEEE kernel {base:.3g}"
        assert base <= 1e-4 * size, f"{name}: IEEE kernel error {base:.3g}"


def test_tensor_core_attention_declines():
    """Shapes the tensor-core kernel does not take go to the scalar kernels (tested above)."""
    kernels = _kernels()
    x = torch.randn(1, 1, 64, 20, 56, device="cuda", dtype=torch.bfloat16)
    assert kernels._attention_uses_tensor_cores(x, x, 15, False)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):  # float32 takes them either way: TF32, or split into two TF32 parts
            torch.backends.cuda.matmul.allow_tf32 = tf32
            assert kernels._attention_uses_tensor_cores(x.float(), x.float(), 15, False)
            wide = torch.randn(1, 1, 128, 8, 8, device="cuda")
            assert not kernels._attention_uses_tensor_cores(wide, wide, 15, False)  # float32 heads of 128
        assert not kernels._attention_uses_tensor_cores(x.double(), x.double(), 15, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert not kernels._attention_uses_tensor_cores(x[..., :52].contiguous(), x[..., :52].contiguous(), 15, False)  # W % 8
    assert not kernels._attention_uses_tensor_cores(x[:, :, :48], x[:, :, :48], 15, False)  # head size 48
    assert not kernels._attention_uses_tensor_cores(x, x[:, :, :32], 15, False)  # v's channels differ
    assert not kernels._attention_uses_tensor_cores(x, x, 51, False)  # five 16-key chunks
