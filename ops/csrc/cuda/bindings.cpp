// Python bindings of the CUDA kernels (one dispatch place: the host functions in the .cu files
// check their inputs, pick a tile and launch).
#include <torch/extension.h>

#include "attention_autograd.h"

#include <vector>

namespace circatt {
at::Tensor similarity(const at::Tensor& q, const at::Tensor& k, int64_t window, bool distance);
at::Tensor apply(const at::Tensor& A, const at::Tensor& x, int64_t window, bool transposed);
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          int64_t window, bool distance, double scale);
std::vector<at::Tensor> attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& y, const at::Tensor& lse, const at::Tensor& dy,
                                           int64_t window, bool distance, double scale);
void set_poison_outputs(bool on);
void set_tensor_cores(bool on);
bool attention_uses_tensor_cores(const at::Tensor& q, const at::Tensor& v, int64_t window, bool distance);
}  // namespace circatt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "circatt CUDA kernels: circulant-sparse (wrapped sliding window) similarity, apply and fused attention";
  m.def("similarity", &circatt::similarity,
        "S (B, G, H, W, K) of q, k (B, G, C, H, W): dot, or -|q-k|^2/2 with distance=True",
        py::arg("q"), py::arg("k"), py::arg("window"), py::arg("distance"));
  m.def("apply", &circatt::apply, "y = A x (or A^T x with transposed=True), A (B, G, H, W, K), x (B, G, C, H, W)",
        py::arg("A"), py::arg("x"), py::arg("window"), py::arg("transposed"));
  m.def("attention_forward", &circatt::attention_forward,
        "fused softmax(scale * S) applied to v; returns [y, lse] (lse in float32, float64 for float64 inputs)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("window"), py::arg("distance"), py::arg("scale"));
  m.def("attention_backward", &circatt::attention_backward,
        "gradients [dq, dk, dv] of the fused attention, recomputing the weights from q, k and lse", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("y"), py::arg("lse"), py::arg("dy"), py::arg("window"),
        py::arg("distance"), py::arg("scale"));
  m.def("attention", &circatt::attention<&circatt::attention_forward, &circatt::attention_backward>,
        "fused softmax(scale * S) v of (B, C, H, W) q, k, v split into heads, as one autograd node (real dtypes)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("window"), py::arg("distance"), py::arg("scale"),
        py::arg("heads"));
  m.def("_set_tensor_cores", &circatt::set_tensor_cores,
        "testing and benchmarking aid: allow (default) or forbid the tensor-core attention kernels", py::arg("on"));
  m.def("_attention_uses_tensor_cores", &circatt::attention_uses_tensor_cores,
        "whether the fused attention of these (B, G, C, H, W) q and (B, G, Cv, H, W) v takes the tensor-core kernels",
        py::arg("q"), py::arg("v"), py::arg("window"), py::arg("distance"));
  m.def("_set_poison_outputs", &circatt::set_poison_outputs,
        "testing aid: allocate every output filled with NaN, so that unwritten entries show", py::arg("on"));
}
