"""The raw C++ CPU kernels (ops/csrc/cpu) against the plain-PyTorch reference backend (ops/reference.py).

Calls the extension directly, below the dispatch and autograd layers, with shapes that reach every
path of the kernels: H != W, windows 1 to 9, channel counts that are not whole SIMD vectors or
register tiles, images wider than one vector of queries, several heads, strided inputs. The reference
itself is checked against the independent dense oracle (tests/dense.py) in test_ops.py.
"""

from __future__ import annotations

import pytest
import torch

from circatt_ops import _extension, reference


@pytest.fixture(scope="module")
def ext():
    try:
        return _extension.load("cpu")
    except _extension.BuildUnavailable as err:
        pytest.skip(f"CPU kernels cannot be built here: {err}")


def assert_close(actual, expected):
    rtol = 1e-5 if expected.dtype == torch.float32 else 1e-12
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale.item())


CASES = [  # (H, W, window, heads, channels)
    (7, 10, 1, 1, 3),
    (7, 10, 3, 2, 3),
    (13, 9, 5, 1, 37),
    (13, 9, 7, 2, 80),
    (9, 40, 9, 1, 5),
    (5, 5, 5, 2, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("H", "W", "window", "heads", "C"), CASES)
def test_similarity_matches_reference(ext, dtype, H, W, window, heads, C):
    q, k = (torch.randn(2, heads, C, H, W, dtype=dtype) for _ in range(2))
    for distance in (False, True):
        assert_close(ext.similarity(q, k, window, distance), reference.similarity(q, k, window, distance))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("H", "W", "window", "heads", "C"), CASES)
def test_apply_matches_reference(ext, dtype, H, W, window, heads, C):
    x = torch.randn(2, heads, C, H, W, dtype=dtype)
    A = torch.randn(2, heads, H, W, window * window, dtype=dtype)
    for transposed in (False, True):
        assert_close(ext.apply(A, x, window, transposed), reference.apply(A, x, window, transposed))


def test_strided_inputs(ext):
    q, k, x = (torch.randn(1, 2, 4, 11, 6).transpose(-1, -2) for _ in range(3))
    A = torch.randn(1, 2, 6, 11, 18)[..., ::2]
    assert_close(ext.similarity(q, k, 3, False), reference.similarity(q, k, 3, False))
    assert_close(ext.apply(A, x, 3, True), reference.apply(A, x, 3, True))


def test_results_do_not_depend_on_the_thread_count(ext):
    q, k, x = (torch.randn(2, 2, 8, 12, 14) for _ in range(3))
    A = torch.randn(2, 2, 12, 14, 25)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ext.similarity(q, k, 5, True), ext.apply(A, x, 5, False), ext.apply(A, x, 5, True)
        torch.set_num_threads(max(2, threads))
        parallel = ext.similarity(q, k, 5, True), ext.apply(A, x, 5, False), ext.apply(A, x, 5, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.similarity(torch.randn(1, 1, 2, 5, 5).half(), torch.randn(1, 1, 2, 5, 5).half(), 3, False),
         "float32 or float64"),
        (lambda e: e.similarity(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5), 3, False), "5 dims"),
        (lambda e: e.similarity(torch.randn(1, 1, 2, 5, 5), torch.randn(1, 1, 2, 5, 6), 3, False), "shapes differ"),
        (lambda e: e.similarity(torch.randn(1, 1, 2, 5, 5), torch.randn(1, 1, 2, 5, 5).double(), 3, False),
         "dtypes differ"),
        (lambda e: e.similarity(torch.randn(1, 1, 2, 5, 5), torch.randn(1, 1, 2, 5, 5), 4, False), "odd"),
        (lambda e: e.similarity(torch.randn(1, 1, 2, 5, 9), torch.randn(1, 1, 2, 5, 9), 7, True), "exceeds"),
        (lambda e: e.apply(torch.randn(1, 1, 5, 5, 4), torch.randn(1, 1, 2, 5, 5), 3, False), "must have shape"),
        (lambda e: e.apply(torch.randn(1, 1, 5, 5, 9).int(), torch.randn(1, 1, 2, 5, 5).int(), 3, False),
         "float32 or float64"),
    ],
)
def test_bad_arguments_raise(ext, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(ext)


ATTENTION_CASES = [  # (H, W, window, heads, Ch, Cv)
    (7, 10, 1, 1, 3, 5),
    (9, 20, 3, 2, 5, 3),
    (11, 9, 7, 1, 37, 18),
    (8, 13, 7, 2, 16, 33),
]


def composed():
    """The composed forward and backward on the plain-PyTorch reference backend."""
    from circatt_ops import autograd

    return (lambda *a: autograd._attention_forward_composed(reference, *a),
            lambda *a: autograd._attention_backward_composed(reference, *a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("H", "W", "window", "heads", "Ch", "Cv"), ATTENTION_CASES)
@pytest.mark.parametrize("distance", [False, True])
def test_fused_attention_matches_composed(ext, dtype, H, W, window, heads, Ch, Cv, distance):
    forward, backward = composed()
    q, k = (torch.randn(2, heads, Ch, H, W, dtype=dtype) for _ in range(2))
    v, dy = (torch.randn(2, heads, Cv, H, W, dtype=dtype) for _ in range(2))
    scale = 0.7 / Ch ** 0.5
    y, lse = ext.attention_forward(q, k, v, window, distance, scale)
    y_ref, lse_ref = forward(q, k, v, window, distance, scale)
    assert y.shape == v.shape and lse.shape == (2, heads, H, W) and lse.dtype == dtype
    assert_close(y, y_ref)
    assert_close(lse, lse_ref)
    grads = ext.attention_backward(q, k, v, y_ref, lse_ref, dy, window, distance, scale)
    for got, expected in zip(grads, backward(q, k, v, y_ref, lse_ref, dy, window, distance, scale)):
        assert got.shape == expected.shape and got.dtype == dtype
        assert_close(got, expected)


def test_fused_attention_strided_inputs_and_thread_count(ext):
    q, k, v, dy = (torch.randn(1, 2, 4, 11, 6, dtype=torch.float64).transpose(-1, -2) for _ in range(4))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y, lse = ext.attention_forward(q, k, v, 3, True, 0.5)
            results.append((y, lse, *ext.attention_backward(q, k, v, y, lse.mT.contiguous().mT, dy, 3, True, 0.5)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    forward, backward = composed()
    y_ref, lse_ref = forward(q.contiguous(), k.contiguous(), v.contiguous(), 3, True, 0.5)
    assert_close(results[0][0], y_ref)
    assert_close(results[0][1], lse_ref)
    for got, expected in zip(results[0][2:], backward(q, k, v, y_ref, lse_ref, dy, 3, True, 0.5)):
        assert_close(got, expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.attention_forward(torch.randn(1, 1, 2, 5, 5), torch.randn(1, 1, 2, 5, 5),
                                       torch.randn(1, 1, 3, 5, 6), 3, False, 1.0), "in all but the channels"),
        (lambda e: e.attention_forward(torch.randn(1, 1, 2, 5, 5), torch.randn(1, 1, 2, 5, 5),
                                       torch.randn(1, 1, 3, 5, 5).double(), 3, False, 1.0), "dtypes differ"),
        (lambda e: e.attention_backward(*(torch.randn(1, 1, 2, 5, 5) for _ in range(4)), torch.randn(1, 1, 5, 4),
                                        torch.randn(1, 1, 2, 5, 5), 3, False, 1.0), "lse must have shape"),
    ],
)
def test_fused_attention_bad_arguments_raise(ext, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(ext)
