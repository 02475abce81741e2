// The Python module of the CPU kernels: circulant_cpu.cpp (similarity, apply) and attention_cpu.cpp
// (the fused attention forward and backward).

#include <torch/extension.h>

#include "attention_autograd.h"

#include <vector>

namespace circatt_cpu {

torch::Tensor similarity(const torch::Tensor& q, const torch::Tensor& k, int64_t window, bool distance);
torch::Tensor apply(const torch::Tensor& A, const torch::Tensor& x, int64_t window, bool transposed);
std::vector<torch::Tensor> attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             int64_t window, bool distance, double scale);
std::vector<torch::Tensor> attention_backward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const torch::Tensor& y, const torch::Tensor& lse,
                                              const torch::Tensor& dy, int64_t window, bool distance, double scale);

}  // namespace circatt_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.doc() = "circatt: CPU kernels of circulant-sparse (wrap-around sliding-window) attention";
  m.def("similarity", &circatt_cpu::similarity,
        "S = windowed dot product or -1/2 squared distance of q and k, (B, G, H, W, K)", arg("q"), arg("k"),
        arg("window"), arg("distance"));
  m.def("apply", &circatt_cpu::apply,
        "y = A x or y = A^T x for A of shape (B, G, H, W, K) and x of shape (B, G, Ch, H, W)", arg("A"), arg("x"),
        arg("window"), arg("transposed"));
  m.def("attention_forward", &circatt_cpu::attention_forward,
        "Fused softmax(scale * S) v over the window: (y (B, G, Cv, H, W), lse (B, G, H, W))", arg("q"), arg("k"),
        arg("v"), arg("window"), arg("distance"), arg("scale"));
  m.def("attention_backward", &circatt_cpu::attention_backward,
        "(dq, dk, dv) of the fused attention from its inputs, y, lse and dy; recomputes the weights", arg("q"),
        arg("k"), arg("v"), arg("y"), arg("lse"), arg("dy"), arg("window"), arg("distance"), arg("scale"));
  m.def("attention", &circatt::attention<&circatt_cpu::attention_forward, &circatt_cpu::attention_backward>,
        "Fused softmax(scale * S) v of (B, C, H, W) q, k, v split into heads, as one autograd node (real dtypes)",
        arg("q"), arg("k"), arg("v"), arg("window"), arg("distance"), arg("scale"), arg("heads"));
}
