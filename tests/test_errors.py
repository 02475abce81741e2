"""Every bad input gets a ValueError or TypeError naming the argument and the fix."""

from __future__ import annotations

import pytest
import torch

import circatt_ops as ca

q = torch.randn(1, 4, 8, 9)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: ca.similarity(q, q, 4), ValueError, ["window", "odd"]),
        (lambda: ca.similarity(q, q, 0), ValueError, ["window", "odd"]),
        (lambda: ca.similarity(q, q, 9), ValueError, ["window 9", "larger than the image", "at most 7"]),
        (lambda: ca.similarity(q, q, 3.0), TypeError, ["window", "int"]),
        (lambda: ca.similarity(q, torch.randn(1, 4, 8, 10), 3), ValueError, ["k", "shape"]),
        (lambda: ca.similarity(q, q.double(), 3), TypeError, ["k", "float64", ".to("]),
        (lambda: ca.similarity(q, q, 3, heads=3), ValueError, ["4 channels", "3 heads"]),
        (lambda: ca.similarity(q, q, 3, heads=0), ValueError, ["heads"]),
        (lambda: ca.similarity(q[0], q[0], 3), ValueError, ["q", "4-D"]),
        (lambda: ca.similarity(q.numpy(), q, 3), TypeError, ["q", "torch.Tensor"]),
        (lambda: ca.similarity(q.int(), q.int(), 3), TypeError, ["q", "dtype", "float32"]),
        (lambda: ca.similarity(q.half(), q.half(), 3), TypeError, ["CUDA only", ".float()"]),
        (lambda: ca.similarity(q, q, 3, kind="cosine"), ValueError, ["kind", "dot", "distance"]),
        (lambda: ca.similarity(q, q, 3, backend="gpu"), ValueError, ["backend", "reference"]),
        (lambda: ca.attention(q, q, torch.randn(1, 4, 8, 8), 3), ValueError, ["v", "spatial size"]),
        (lambda: ca.attention(q, q, torch.randn(1, 3, 8, 9), 3, heads=2), ValueError, ["v", "3 channels", "2 heads"]),
        (lambda: ca.attention(q, q, q.double(), 3), TypeError, ["v", "precision"]),
        (lambda: ca.adjacency(q, q, 3).apply(torch.randn(1, 4, 9, 8)), ValueError, ["x", "match"]),
        (lambda: ca.adjacency(q, q, 3).apply(q.double()), TypeError, ["x", "precision"]),
        (lambda: ca.adjacency(q, q, 3) + ca.adjacency(q, q, 5), ValueError, ["pattern", "window"]),
        (lambda: ca.adjacency(q, q, 3) * torch.ones(3, 1), ValueError, ["(B or 1, heads or 1)"]),
        (lambda: ca.adjacency(q, q, 3).sum("diagonal"), ValueError, ["dim", "rows", "columns"]),
        (lambda: ca.cat([ca.adjacency(q, q, 3), ca.adjacency(q, q, 5)]), ValueError, ["pattern"]),
        (lambda: ca.Circulant(torch.randn(1, 1, 4, 4, 8), 3), ValueError, ["values", "9"]),
        (lambda: ca.Circulant(torch.randn(1, 1, 4, 4, 16), 4), ValueError, ["window", "odd"]),
        (lambda: ca.Circulant(torch.randn(1, 1, 4, 4, 25), 5), ValueError, ["window 5", "larger than the image"]),
        (lambda: ca.Circulant(torch.randn(1, 1, 4, 4, 9).long(), 3), TypeError, ["values", "float"]),
        (lambda: ca.Circulant([1.0], 3), TypeError, ["values", "torch.Tensor"]),
        (lambda: ca.adjacency(q, q, 3) + ca.adjacency(q, q, 3).to("meta"), ValueError, ["meta", ".to()"]),
        (lambda: ca.Circulant(torch.rand(2, 1, 8, 9, 9), 3) + ca.Circulant(torch.rand(3, 1, 8, 9, 9), 3), ValueError,
         ["batch", "2 vs 3"]),
        (lambda: ca.cat([ca.adjacency(q, q, 3), q]), TypeError, ["Circulant", "Tensor"]),
        (lambda: ca.cat([ca.adjacency(q, q, 3), ca.adjacency(q, q, 3).to(torch.float64)]), TypeError, ["dtype", ".to("]),
        (lambda: ca.attention(q, q, q, 3, scale="a"), TypeError, ["scale", "real number"]),
        (lambda: ca.similarity(torch.randn(1, 0, 8, 9), torch.randn(1, 0, 8, 9), 3), ValueError, ["q", "empty"]),
    ],
)
def test_bad_input_names_argument_and_fix(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_backend_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        ca.similarity(q, q, 3, backend="cuda")


def test_cpu_backend_on_wrong_device_names_the_fix(monkeypatch):
    meta = torch.randn(1, 2, 5, 5, device="meta")
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors.*\.cpu\(\)"):
        ca.similarity(meta, meta, 3, backend="cpu")


@pytest.mark.parametrize(
    "failure, words",
    [
        ("toolchain", "no C\\+\\+ compiler"),
        (RuntimeError("Error building extension 'circatt_cpu_0123'"), "Error building extension"),
        (ImportError("circatt_cpu_0123.so: undefined symbol: attention_backward"), "undefined symbol"),
    ],
)
def test_unbuildable_kernels_fall_back_to_reference_with_one_warning(monkeypatch, failure, words):
    from circatt_ops import _extension, backends

    def broken(device):
        raise _extension.BuildUnavailable("no C++ compiler found ('c++' is not on PATH)") if failure == "toolchain" else failure

    monkeypatch.setattr(_extension, "load", broken)
    monkeypatch.setattr(backends, "_failures", {})
    with pytest.warns(RuntimeWarning, match=words + ".*reference") as caught:
        A = ca.adjacency(q, q, 3)
        ca.adjacency(q, q, 3)
    assert len(caught) == 1
    torch.testing.assert_close(A.flat_values, ca.adjacency(q, q, 3, backend="reference").flat_values)
    with pytest.raises(RuntimeError, match="backend='cpu' needs its kernels built"):
        ca.adjacency(q, q, 3, backend="cpu")


def test_a_learned_scale_gets_its_gradient():
    """A 0-d scale that requires grad goes through autograd (the fused kernels take a constant)."""
    scale = torch.tensor(0.5, requires_grad=True)
    y = ca.attention(q, q, q, 3, scale=scale)
    y.square().sum().backward()
    assert scale.grad is not None and scale.grad != 0
    torch.testing.assert_close(y, ca.attention(q, q, q, 3, scale=0.5))
