// The fused attention as one C++ autograd node over (B, C, H, W) tensors, shared by the CPU and CUDA
// modules: the heads are split inside (views, no Python), and the backward runs without Python, so
// autograd's device thread never takes the GIL. Real dtypes only; complex inputs take the Python
// Function (ops/autograd.py), which splits them into real channels first.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <string>
#include <vector>

namespace circatt {

using AttentionForward = std::vector<at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      int64_t, bool, double);
using AttentionBackward = std::vector<at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       int64_t, bool, double);

// (B, C, H, W) -> (B, heads, C / heads, H, W), a view where the layout allows.
inline at::Tensor split_heads(const at::Tensor& x, int64_t heads) {
  return x.reshape({x.size(0), heads, x.size(1) / heads, x.size(2), x.size(3)});
}

// (B, G, Ch, H, W) -> (B, G * Ch, H, W).
inline at::Tensor merge_heads(const at::Tensor& x) {
  return x.reshape({x.size(0), x.size(1) * x.size(2), x.size(3), x.size(4)});
}

// softmax(scale * S) v with the per-row log-sum-exp saved; the backward recomputes the weights.
// Fwd and Bwd are one module's attention_forward and attention_backward on (B, G, Ch, H, W) tensors.
template <AttentionForward Fwd, AttentionBackward Bwd>
struct AttentionFunction : public torch::autograd::Function<AttentionFunction<Fwd, Bwd>> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, int64_t window, bool distance, double scale, int64_t heads) {
    const at::Tensor qh = split_heads(q, heads), kh = split_heads(k, heads), vh = split_heads(v, heads);
    std::vector<at::Tensor> y_lse = Fwd(qh, kh, vh, window, distance, scale);
    ctx->save_for_backward({qh, kh, vh, y_lse[0], y_lse[1]});
    ctx->saved_data["window"] = window;
    ctx->saved_data["distance"] = distance;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["heads"] = heads;
    return merge_heads(y_lse[0]);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::vector<at::Tensor> s = ctx->get_saved_variables();
    const int64_t heads = ctx->saved_data["heads"].toInt();
    std::vector<at::Tensor> d = Bwd(s[0], s[1], s[2], s[3], s[4], split_heads(grads[0], heads),
                                    ctx->saved_data["window"].toInt(), ctx->saved_data["distance"].toBool(),
                                    ctx->saved_data["scale"].toDouble());
    torch::autograd::variable_list out = {merge_heads(d[0]), merge_heads(d[1]), merge_heads(d[2])};
    if (at::GradMode::is_enabled()) out = refuse_double_backward(std::move(out));  // create_graph
    out.resize(7);  // window, distance, scale, heads: no gradient
    return out;
  }

  // Under create_graph, gradients that would raise when differentiated again (as @once_differentiable
  // does in Python): the kernels' outputs carry no graph, so a second derivative would be silently zero.
  static torch::autograd::variable_list refuse_double_backward(torch::autograd::variable_list grads) {
    auto error = std::make_shared<torch::autograd::DelayedError>(
        "circatt: the fused attention has no second derivative (its backward is not differentiable)",
        int64_t(grads.size()));
    for (at::Tensor& g : grads) g = g.detach().requires_grad_(true);
    return (*error)(std::move(grads));
  }
};

// The autograd entry point a module binds as `attention`.
template <AttentionForward Fwd, AttentionBackward Bwd>
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, bool distance,
                     double scale, int64_t heads) {
  return AttentionFunction<Fwd, Bwd>::apply(q, k, v, window, distance, scale, heads);
}

}  // namespace circatt
