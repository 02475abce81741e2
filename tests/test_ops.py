"""Every backend against the dense masked-softmax oracle of tests/dense.py, and gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import circatt_ops as ca
from conftest import CPU_BACKENDS, poison_allocator
from dense import dense_adjacency, dense_apply, dense_similarity, window_mask

# (H, W, window, heads, C): non-square everywhere, one window of 15.
SHAPES = [(5, 7, 1, 1, 3), (5, 7, 3, 4, 8), (6, 9, 5, 1, 2), (8, 6, 5, 4, 4), (16, 17, 15, 2, 4)]
DTYPES = [torch.float64, torch.complex128]


def _inputs(B, C, H, W, dtype, cv=None):
    q = torch.randn(B, C, H, W, dtype=dtype)
    k = torch.randn(B, C, H, W, dtype=dtype)
    v = torch.randn(B, cv or C, H, W, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("H,W,window,heads,C", SHAPES)
@pytest.mark.parametrize("kind", ["dot", "distance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_and_adjacency_match_dense(backend, H, W, window, heads, C, kind, dtype):
    q, k, _ = _inputs(2, C, H, W, dtype)
    poison_allocator("cpu")
    S = ca.similarity(q, k, window, kind=kind, heads=heads, backend=backend)
    assert S.values.shape == (2, heads, H, W, window, window)
    assert not S.values.is_complex()
    torch.testing.assert_close(S.to_dense(), dense_similarity(q, k, window, kind, heads))
    A = ca.adjacency(q, k, window, kind=kind, heads=heads, backend=backend)
    torch.testing.assert_close(A.to_dense(), dense_adjacency(q, k, window, kind, heads))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("H,W,window,heads,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_and_transposed_match_dense(backend, H, W, window, heads, C, dtype):
    q, k, x = _inputs(2, C, H, W, dtype, cv=2 * heads)
    A = ca.adjacency(q, k, window, heads=heads, backend="reference")
    dense = A.to_dense()
    poison_allocator("cpu")
    torch.testing.assert_close(A.apply(x, backend=backend), dense_apply(dense, x))
    torch.testing.assert_close(A.apply_transposed(x, backend=backend), dense_apply(dense, x, transposed=True))
    torch.testing.assert_close(A @ x, dense_apply(dense, x))
    torch.testing.assert_close(A.T @ x, dense_apply(dense, x, transposed=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["dot", "distance"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_dense(backend, kind, dtype, heads):
    H, W, window, C = 7, 10, 5, 8
    q, k, v = _inputs(2, C, H, W, dtype, cv=4)
    scale = 0.7
    want = dense_apply(dense_adjacency(q, k, window, kind, heads, scale=scale), v)
    poison_allocator("cpu")
    y = ca.attention(q, k, v, window, kind=kind, heads=heads, scale=scale, backend=backend)
    torch.testing.assert_close(y, want)
    y2, A = ca.attention(q, k, v, window, kind=kind, heads=heads, scale=scale, return_adjacency=True, backend=backend)
    torch.testing.assert_close(y2, want)
    assert isinstance(A, ca.Circulant)


def test_attention_default_scale_is_inverse_sqrt_head_channels():
    q, k, v = _inputs(1, 8, 6, 7, torch.float64)
    y = ca.attention(q, k, v, 3, heads=2, backend="reference")
    want = dense_apply(dense_adjacency(q, k, 3, "dot", 2, scale=0.5), v)
    torch.testing.assert_close(y, want)


def test_real_adjacency_applies_to_complex_values():
    q, k, _ = _inputs(1, 4, 5, 6, torch.float64)
    x = torch.randn(1, 4, 5, 6, dtype=torch.complex128)
    A = ca.adjacency(q, k, 3, backend="reference")
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(A.apply(x, backend=backend), dense_apply(A.to_dense(), x))


def test_float32_matches_float64_oracle():
    q, k, v = _inputs(2, 8, 9, 12, torch.float64)
    want = dense_apply(dense_adjacency(q, k, 5, "distance", 2, scale=0.3), v)
    for backend in CPU_BACKENDS:
        y = ca.attention(q.float(), k.float(), v.float(), 5, kind="distance", heads=2, scale=0.3, backend=backend)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)


# ----- gradients -----------------------------------------------------------------------------
def _leaf(*tensors):
    return tuple(t.detach().requires_grad_() for t in tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["dot", "distance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradcheck_similarity(backend, kind, dtype):
    q, k = _leaf(*_inputs(1, 4, 5, 6, dtype)[:2])
    assert gradcheck(lambda q, k: ca.similarity(q, k, 3, kind=kind, heads=2, backend=backend).flat_values, (q, k), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["dot", "distance"])
def test_gradcheck_adjacency(backend, kind):
    q, k = _leaf(*_inputs(1, 3, 5, 7, torch.float64)[:2])
    assert gradcheck(lambda q, k: ca.adjacency(q, k, 5, kind=kind, backend=backend).flat_values, (q, k), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradcheck_apply(backend, transposed, dtype):
    values = torch.randn(2, 2, 5, 6, 9, dtype=torch.float64, requires_grad=True)
    (x,) = _leaf(torch.randn(2, 4, 5, 6, dtype=dtype))

    def f(values, x):
        A = ca.Circulant(values, 3)
        return A.apply_transposed(x, backend=backend) if transposed else A.apply(x, backend=backend)

    assert gradcheck(f, (values, x), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["dot", "distance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradcheck_fused_attention(backend, kind, dtype):
    q, k, v = _leaf(*_inputs(1, 4, 5, 6, dtype, cv=2))
    assert gradcheck(lambda q, k, v: ca.attention(q, k, v, 3, kind=kind, heads=2, backend=backend), (q, k, v), fast_mode=True)


def test_compiled_attention_is_one_autograd_node():
    """On a compiled backend a real call is one C++ node: no Python in its backward, heads split inside,
    strided inputs taken, and a second derivative refused with a message instead of a silent zero."""
    q, k, v = _leaf(*_inputs(2, 8, 6, 10, torch.float64, cv=4))
    y = ca.attention(q, k, v, 3, heads=2, backend="cpu")
    assert type(y.grad_fn).__name__ == "CppFunction"
    assert {type(edge[0]).__name__ for edge in y.grad_fn.next_functions} == {"AccumulateGrad"}
    qt = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # same values, other strides
    want = ca.attention(q, k, v, 3, heads=2, backend="reference")
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(ca.attention(qt, k, v, 3, heads=2, backend="cpu"), want)
    (dq,) = torch.autograd.grad(y.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        dq.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_arithmetic_and_sums(backend):
    q, k, x = _leaf(*_inputs(2, 2, 5, 6, torch.float64))
    gamma = torch.rand(2, 1, dtype=torch.float64, requires_grad=True)

    def f(q, k, x, gamma):
        G = ca.adjacency(q, k, 3, kind="distance", backend=backend)
        N = ca.adjacency(k, q, 3, backend=backend)
        B = G + gamma * (N - G) - 0.5 * G.lerp(N, gamma)
        return B.apply(x, backend=backend), B.sum("rows"), B.sum("columns"), B.sum("batch").flat_values

    assert gradcheck(f, (q, k, x, gamma), fast_mode=True)


def test_gradients_stay_k_values_per_row():
    q, k, x = _leaf(*_inputs(1, 2, 6, 7, torch.float64))
    A = ca.adjacency(q, k, 3, backend="reference")
    values = A.flat_values
    values.retain_grad()
    A.apply(x).sum().backward()
    assert values.grad.shape == (1, 1, 6, 7, 9)


# ----- the Circulant object ------------------------------------------------------------------
def _circulant(B=2, heads=2, H=5, W=6, window=3):
    return ca.Circulant(torch.randn(B, heads, H, W, window, window, dtype=torch.float64), window)


def test_circulant_properties_and_storage():
    A = _circulant()
    assert (A.batch, A.heads, A.spatial_size, A.window) == (2, 2, (5, 6), 3)
    assert A.shape == (2, 2, 30, 30) and A.nnz == 2 * 2 * 30 * 9
    assert A.values.shape == (2, 2, 5, 6, 3, 3)
    rows = A.to_dense().ne(0).sum(-1)
    assert bool((rows == 9).all())


def test_circulant_arithmetic_matches_dense():
    A, B = _circulant(), _circulant()
    f = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    torch.testing.assert_close((A + B).to_dense(), A.to_dense() + B.to_dense())
    torch.testing.assert_close((A - B).to_dense(), A.to_dense() - B.to_dense())
    torch.testing.assert_close((2.5 * A).to_dense(), 2.5 * A.to_dense())
    torch.testing.assert_close((A * f).to_dense(), A.to_dense() * f[:, :, None, None])
    torch.testing.assert_close(A.lerp(B, 0.8).to_dense(), A.to_dense() + 0.8 * (B.to_dense() - A.to_dense()))
    torch.testing.assert_close(A.lerp(B, f).to_dense(), A.to_dense() + f[:, :, None, None] * (B.to_dense() - A.to_dense()))
    with pytest.raises(ValueError, match="differ in pattern"):
        A.lerp(_circulant(window=5), 0.5)
    torch.testing.assert_close(A.sum("rows").flatten(2), A.to_dense().sum(-1))
    torch.testing.assert_close(A.sum("columns").flatten(2), A.to_dense().sum(-2))
    torch.testing.assert_close(A.sum("heads").to_dense(), A.to_dense().sum(1, keepdim=True))
    torch.testing.assert_close(A.sum("batch").to_dense(), A.to_dense().sum(0, keepdim=True))


def test_cat_and_softmax():
    A, B = _circulant(heads=1), _circulant(heads=3)
    C = ca.cat([A, B], dim="heads")
    assert C.heads == 4
    torch.testing.assert_close(C.to_dense(), torch.cat([A.to_dense(), B.to_dense()], 1))
    torch.testing.assert_close(ca.cat([A, A], dim="batch").to_dense(), torch.cat([A.to_dense()] * 2, 0))
    torch.testing.assert_close(A.softmax().to_dense().sum(-1), torch.ones(2, 1, 30, dtype=torch.float64))


def test_sparse_csr_matches_dense_with_sorted_columns():
    A = _circulant(H=4, W=7, window=3)
    csr = A.to_sparse_csr()
    assert csr.layout == torch.sparse_csr
    torch.testing.assert_close(csr.to_dense(), A.to_dense())
    cols = csr.col_indices()[0, 0].view(28, 9)
    assert bool((cols[:, 1:] > cols[:, :-1]).all())


def test_repr_and_spy():
    A = ca.adjacency(torch.randn(1, 2, 8, 12), torch.randn(1, 2, 8, 12), 3, backend="reference")
    text = repr(A)
    for part in ("Circulant", "window 3x3", "8x12", "1 x 1 head", "float32", "cpu", "864 stored"):
        assert part in text
    assert all(0x2800 <= ord(ch) <= 0x28FF for ch in A.spy().replace("\n", ""))


def test_spy_shows_band_and_wrap_corners():
    A = _circulant(B=1, heads=1, H=16, W=16, window=3)
    pic = A.spy(width=16)
    lines = pic.splitlines()
    assert lines[0][0] != "\u2800" and lines[0][-1] != "\u2800"   # diagonal, and the wrap at the top right
    assert lines[len(lines) // 2][0] == "\u2800"                 # nothing far from the band


@pytest.mark.parametrize("H, W, window", [(7, 9, 5), (20, 13, 3), (5, 5, 5)])
def test_key_indices_match_the_window_and_a_row_subset(H, W, window):
    full = ca.key_indices(H, W, window)
    mask = torch.zeros(H * W, H * W, dtype=torch.bool)
    mask[torch.arange(H * W).unsqueeze(1), full] = True
    assert torch.equal(mask, window_mask(H, W, window))
    rows = torch.tensor([0, H * W - 1, W + 2, 3])
    assert torch.equal(ca.key_indices(H, W, window, rows=rows), full[rows])
