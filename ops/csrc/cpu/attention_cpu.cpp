// Fused CPU attention over the circulant window (semantics: shared spec circulant-ops.md, "fused
// attention"): y = softmax(scale * S) v with the per-pixel log-sum-exp, and its FlashAttention-style
// backward, never holding the (H, W, K) weights. A task owns one image row and walks the window one
// window row at a time: score_window_row gives the scores of the row's W pixels against that window
// row (a W x window tile that stays in cache), weighted_pixel_sum adds the weighted channels-last
// neighbours (both in window.h).
//   forward:  online softmax: a running max and sum per query, whose accumulator is rescaled when the
//             max grows, so each score is exponentiated once;
//   backward: two passes that both recompute P = exp(scale * S - lse) and dS = scale * P * (dP - D):
//             a query-centric one gathers dq over each query's keys, a key-centric one gathers dk and
//             dv over the queries whose windows hold each key. The window is symmetric, so those
//             queries are the key's own window (row[p + a], col[t + c]); no scatter, no atomics.

#include "window.h"

#include <cmath>
#include <limits>

namespace circatt_cpu {
namespace {

// Forward, row i of one image: q_rows (shift 0) and k_rows (shift r) unrolled rows of padded_width
// columns; v and y channels-last with value_channels (y zeroed). Writes y[i, :] and lse[i, :].
template <typename scalar_t, bool distance>
void attention_forward_row(const scalar_t* q_rows, const scalar_t* k_rows, int64_t padded_width, const scalar_t* v,
                           scalar_t* y, int64_t value_channels, scalar_t* lse, scalar_t scale, int64_t i,
                           const Window& win, const Shape& shape) {
  const int64_t w = shape.width, ws = win.size, row_size = shape.channels * padded_width;
  std::vector<scalar_t> logits(w * ws), running_max(w, -std::numeric_limits<scalar_t>::infinity()), running_sum(w);
  for (int64_t a = 0; a < ws; ++a) {
    const int64_t key_row = win.row[i + a];
    score_window_row<scalar_t, distance>(q_rows + i * row_size, k_rows + key_row * row_size, padded_width,
                                         shape.channels, w, ws, logits.data(), ws);
    for (int64_t j = 0; j < w; ++j) {
      scalar_t* weights = logits.data() + j * ws;
      scalar_t* y_j = y + (i * w + j) * value_channels;
      scalar_t new_max = running_max[j];
      for (int64_t c = 0; c < ws; ++c) {
        weights[c] *= scale;
        new_max = std::max(new_max, weights[c]);
      }
      if (new_max > running_max[j]) {
        const scalar_t rescale = std::exp(running_max[j] - new_max);
        running_sum[j] *= rescale;
        for (int64_t e = 0; e < value_channels; ++e) {
          y_j[e] *= rescale;
        }
        running_max[j] = new_max;
      }
      scalar_t sum = 0;
      for (int64_t c = 0; c < ws; ++c) {
        weights[c] = std::exp(weights[c] - new_max);
        sum += weights[c];
      }
      running_sum[j] += sum;
      weighted_pixel_sum(y_j, weights, v + key_row * w * value_channels, win.col.data() + j, ws, value_channels);
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    scalar_t* y_j = y + (i * w + j) * value_channels;
    const scalar_t inverse = scalar_t(1) / running_sum[j];
    for (int64_t e = 0; e < value_channels; ++e) {
      y_j[e] *= inverse;
    }
    lse[i * w + j] = running_max[j] + std::log(running_sum[j]);
  }
}

// The operands of one backward pass, seen from its centre pixels (the queries, or the keys) and their
// window neighbours (their keys, or the queries whose windows hold them). Base pointers of image 0.
template <typename scalar_t>
struct BackwardPass {
  // S: unrolled rows (shift 0 for the centres, r for the neighbours) of q and k, channels each.
  const scalar_t *centre_rows, *neighbour_rows;
  int64_t channels;
  // dP: unrolled rows of dy and v, value_channels each.
  const scalar_t *centre_grad_rows, *neighbour_grad_rows;
  int64_t value_channels;
  int64_t padded_width;
  // lse and D of the queries, unrolled rows (shift r) of one channel.
  const scalar_t *lse_rows, *d_rows;
  // Channels-last (padded_channels): the centres (for the distance term) and the neighbours that dS
  // weighs into grad; key-centric only, the neighbours' dy that P weighs into value_grad.
  const scalar_t *centres, *neighbours;
  int64_t padded_channels;
  const scalar_t* neighbour_dy;
  int64_t padded_value_channels;
  scalar_t *grad, *value_grad;
};

// Row i of one backward pass for one image. Query-centric: grad = dq, from the scores of query (i, j)
// against its keys. Key-centric: grad = dk and value_grad = dv, from the scores of key (i, j) against
// the queries n = (row[i + a], col[j + c]) (dot and distance are symmetric), whose lse and D are read
// at that neighbour; for the query-centric pass they are the centre's own, column j + r of row i.
template <typename scalar_t, bool distance, bool key_centric>
void attention_backward_row(const BackwardPass<scalar_t>& pass, int64_t image, int64_t i, scalar_t scale,
                            const Window& win, const Shape& shape) {
  const int64_t h = shape.height, w = shape.width, ws = win.size, pw = pass.padded_width;
  const int64_t score_row = pass.channels * pw, grad_row = pass.value_channels * pw;
  const int64_t pc = pass.padded_channels, pvc = pass.padded_value_channels;
  const scalar_t* centre_rows = pass.centre_rows + image * h * score_row;
  const scalar_t* neighbour_rows = pass.neighbour_rows + image * h * score_row;
  const scalar_t* centre_grad_rows = pass.centre_grad_rows + image * h * grad_row;
  const scalar_t* neighbour_grad_rows = pass.neighbour_grad_rows + image * h * grad_row;
  const scalar_t* neighbours = pass.neighbours + image * h * w * pc;
  scalar_t* grad = pass.grad + image * h * w * pc;
  std::vector<scalar_t> probabilities(w * ws), score_grads(w * ws), row_sums(w);
  for (int64_t a = 0; a < ws; ++a) {
    const int64_t row = win.row[i + a];
    score_window_row<scalar_t, distance>(centre_rows + i * score_row, neighbour_rows + row * score_row, pw,
                                         pass.channels, w, ws, probabilities.data(), ws);
    score_window_row<scalar_t, false>(centre_grad_rows + i * grad_row, neighbour_grad_rows + row * grad_row, pw,
                                      pass.value_channels, w, ws, score_grads.data(), ws);
    const int64_t stats_row = (image * h + (key_centric ? row : i)) * pw;
    const scalar_t* lse = pass.lse_rows + stats_row;
    const scalar_t* d = pass.d_rows + stats_row;
    for (int64_t j = 0; j < w; ++j) {
      scalar_t* p = probabilities.data() + j * ws;
      scalar_t* ds = score_grads.data() + j * ws;
      scalar_t sum = 0;
      for (int64_t c = 0; c < ws; ++c) {
        const int64_t u = key_centric ? j + c : j + win.radius;
        p[c] = std::exp(scale * p[c] - lse[u]);
        ds[c] = scale * p[c] * (ds[c] - d[u]);
        sum += ds[c];
      }
      row_sums[j] += sum;
      weighted_pixel_sum(grad + (i * w + j) * pc, ds, neighbours + row * w * pc, win.col.data() + j, ws, pc);
      if constexpr (key_centric) {
        weighted_pixel_sum(pass.value_grad + ((image * h + i) * w + j) * pvc, p,
                           pass.neighbour_dy + (image * h + row) * w * pvc, win.col.data() + j, ws, pvc);
      }
    }
  }
  if constexpr (distance) {
    const scalar_t* centres = pass.centres + image * h * w * pc;
    for (int64_t j = 0; j < w; ++j) {
      for (int64_t e = 0; e < pc; ++e) {
        grad[(i * w + j) * pc + e] -= row_sums[j] * centres[(i * w + j) * pc + e];
      }
    }
  }
}

// Checks q, k (B, G, Ch, H, W) and v (B, G, Cv, H, W) and returns the window of q.
Window attention_window(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window) {
  check_operand(q, "q");
  check_operand(k, "k");
  check_operand(v, "v");
  TORCH_CHECK(q.sizes() == k.sizes(), "circatt cpu kernels: q and k shapes differ: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(3) == q.size(3) && v.size(4) == q.size(4),
              "circatt cpu kernels: v ", v.sizes(), " must match q ", q.sizes(), " in all but the channels");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "circatt cpu kernels: q, k and v dtypes differ: ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const Shape shape = shape_of(q);
  check_window(window, shape);
  return Window(window, shape);
}

}  // namespace

std::vector<Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window,
                                      bool distance, double scale) {
  const Window win = attention_window(q, k, v, window);
  const Shape shape = shape_of(q), values = shape_of(v);
  Tensor y, lse = at::empty({shape.batch, shape.heads, shape.height, shape.width}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circatt_attention_forward_cpu", [&] {
    const int64_t padded_width = unrolled_width<scalar_t>(shape, win);
    const int64_t value_channels = round_up(values.channels, simd::kLanes<scalar_t>);
    const Tensor q_rows = unrolled_rows(q, 0, padded_width), k_rows = unrolled_rows(k, win.radius, padded_width);
    const Tensor v_cl = channels_last(v, value_channels);
    Tensor y_cl = at::zeros_like(v_cl);
    const int64_t rows_size = shape.height * shape.channels * padded_width, image_size = shape.pixels() * value_channels;
    const scalar_t* q_ptr = q_rows.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_rows.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cl.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y_cl.mutable_data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.mutable_data_ptr<scalar_t>();
    dispatch_flag(distance, [&](auto distance_flag) {
      constexpr bool kDistance = decltype(distance_flag)::value;
      for_each_row(shape, shape.width * win.slots * (shape.channels + value_channels), [&](int64_t image, int64_t i) {
        attention_forward_row<scalar_t, kDistance>(q_ptr + image * rows_size, k_ptr + image * rows_size, padded_width,
                                                   v_ptr + image * image_size, y_ptr + image * image_size,
                                                   value_channels, lse_ptr + image * shape.pixels(),
                                                   static_cast<scalar_t>(scale), i, win, shape);
      });
    });
    y = channels_first(y_cl, values.channels);
  });
  return {y, lse};
}

std::vector<Tensor> attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                                       const Tensor& lse, const Tensor& dy, int64_t window, bool distance,
                                       double scale) {
  const Window win = attention_window(q, k, v, window);
  const Shape shape = shape_of(q), values = shape_of(v);
  check_operand(y, "y");
  check_operand(dy, "dy");
  TORCH_CHECK(y.sizes() == v.sizes() && dy.sizes() == v.sizes(), "circatt cpu kernels: y ", y.sizes(), " and dy ",
              dy.sizes(), " must have the shape of v ", v.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({shape.batch, shape.heads, shape.height, shape.width}),
              "circatt cpu kernels: lse must have shape (B, G, H, W) = (", shape.batch, ", ", shape.heads, ", ",
              shape.height, ", ", shape.width, "), got ", lse.sizes());
  TORCH_CHECK(y.scalar_type() == q.scalar_type() && dy.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == q.scalar_type(),
              "circatt cpu kernels: y, dy and lse must have the dtype of q, ", q.scalar_type());
  const Tensor d = (dy * y).sum(2, true);
  Tensor dq, dk, dv;

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circatt_attention_backward_cpu", [&] {
    const int64_t padded_width = unrolled_width<scalar_t>(shape, win), r = win.radius;
    const int64_t channels = round_up(shape.channels, simd::kLanes<scalar_t>);
    const int64_t value_channels = round_up(values.channels, simd::kLanes<scalar_t>);
    const Tensor q_rows = unrolled_rows(q, 0, padded_width), q_shifted = unrolled_rows(q, r, padded_width);
    const Tensor k_rows = unrolled_rows(k, 0, padded_width), k_shifted = unrolled_rows(k, r, padded_width);
    const Tensor dy_rows = unrolled_rows(dy, 0, padded_width), dy_shifted = unrolled_rows(dy, r, padded_width);
    const Tensor v_rows = unrolled_rows(v, 0, padded_width), v_shifted = unrolled_rows(v, r, padded_width);
    const Tensor lse_rows = unrolled_rows(lse.unsqueeze(2), r, padded_width);
    const Tensor d_rows = unrolled_rows(d, r, padded_width);
    const Tensor q_cl = channels_last(q, channels), k_cl = channels_last(k, channels);
    const Tensor dy_cl = channels_last(dy, value_channels);
    Tensor dq_cl = at::zeros_like(q_cl), dk_cl = at::zeros_like(k_cl), dv_cl = at::zeros_like(dy_cl);
    auto ptr = [](const Tensor& t) { return t.const_data_ptr<scalar_t>(); };
    const BackwardPass<scalar_t> queries{ptr(q_rows),   ptr(k_shifted), shape.channels, ptr(dy_rows),
                                         ptr(v_shifted), values.channels, padded_width, ptr(lse_rows),
                                         ptr(d_rows),   ptr(q_cl),       ptr(k_cl),      channels,
                                         nullptr,       value_channels, dq_cl.mutable_data_ptr<scalar_t>(),
                                         nullptr};
    const BackwardPass<scalar_t> keys{ptr(k_rows),    ptr(q_shifted),  shape.channels, ptr(v_rows),
                                      ptr(dy_shifted), values.channels, padded_width,  ptr(lse_rows),
                                      ptr(d_rows),    ptr(k_cl),       ptr(q_cl),      channels,
                                      ptr(dy_cl),     value_channels,  dk_cl.mutable_data_ptr<scalar_t>(),
                                      dv_cl.mutable_data_ptr<scalar_t>()};
    const int64_t work = shape.width * win.slots * (shape.channels + values.channels + channels + value_channels);
    const scalar_t s = static_cast<scalar_t>(scale);
    dispatch_flag(distance, [&](auto distance_flag) {
      constexpr bool kDistance = decltype(distance_flag)::value;
      for_each_row(shape, work, [&](int64_t image, int64_t i) {
        attention_backward_row<scalar_t, kDistance, false>(queries, image, i, s, win, shape);
      });
      for_each_row(shape, work, [&](int64_t image, int64_t i) {
        attention_backward_row<scalar_t, kDistance, true>(keys, image, i, s, win, shape);
      });
    });
    dq = channels_first(dq_cl, shape.channels);
    dk = channels_first(dk_cl, shape.channels);
    dv = channels_first(dv_cl, values.channels);
  });
  return {dq, dk, dv};
}

}  // namespace circatt_cpu
