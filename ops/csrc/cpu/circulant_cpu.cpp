// CPU kernels of circulant-sparse attention (semantics: shared spec circulant-ops.md).
//
// Pixel (i, j) of an H x W image sees the K = window^2 pixels ((i + a - r) mod H, (j + c - r) mod W),
// slot s = a * window + c, r = (window - 1) / 2. Each kernel first rearranges its operands (one cheap
// pass) so that its inner loop reads contiguous memory, then accumulates a register tile of SIMD vectors:
//   apply:      x channels-last (H, W, Ch), vectorised over channels, summed over the K neighbours;
//   similarity: q and k as unrolled rows (H, Ch, padded W) with the wrap-around written out,
//               vectorised over queries, one accumulator per key, summed over channels.
// Neither needs horizontal sums or a modulo in the inner loops. Work is split over
// (batch, head, image row) with at::parallel_for; every task writes only its own output rows.
// The layouts and inner kernels live in window.h, shared with the fused attention (attention_cpu.cpp);
// the Python module is defined in bindings.cpp.

#include "window.h"

namespace circatt_cpu {

// Row i of S for one image: S[i, j, a*ws + c] = score(q[i, j], k[row[i + a], col[j + c]]).
// q_rows, k_rows are unrolled rows of padded_width columns (k shifted by r), so query j is column j of
// its row and its keys in window row a are columns j + c of key row row[i + a].
template <typename scalar_t, bool distance>
void similarity_row(const scalar_t* q_rows, const scalar_t* k_rows, int64_t padded_width, scalar_t* s, int64_t i,
                    const Window& win, const Shape& shape) {
  const int64_t w = shape.width, row_size = shape.channels * padded_width;
  for (int64_t a = 0; a < win.size; ++a) {
    score_window_row<scalar_t, distance>(q_rows + i * row_size, k_rows + win.row[i + a] * row_size, padded_width,
                                         shape.channels, w, win.size, s + i * w * win.slots + a * win.size,
                                         win.slots);
  }
}

// Row i of y = A x, or of y = A^T x, for one image; x, y channels-last (H, W, channels), y zeroed.
// Neighbour m = (row[i + a], col[j + c]) of pixel (i, j) takes the weight A[i, j, s], s = a*ws + c.
// For the transpose, (i, j) is neighbour (ws-1-a, ws-1-c) of m, so its weight is A[m, K-1-s]:
// a gather over the rows that contain (i, j), with no scatter and no races between rows.
template <typename scalar_t, bool transposed>
void apply_row(const scalar_t* A, const scalar_t* x, scalar_t* y, int64_t channels, int64_t i, const Window& win,
               const Shape& shape) {
  const int64_t w = shape.width, slots = win.slots;
  std::vector<scalar_t> gathered(transposed ? win.size : 0);
  for (int64_t a = 0; a < win.size; ++a) {
    const int64_t m_row = win.row[i + a];
    for (int64_t j = 0; j < w; ++j) {
      const int64_t* cols = win.col.data() + j;
      const scalar_t* weights = A + (i * w + j) * slots + a * win.size;
      if constexpr (transposed) {
        for (int64_t c = 0; c < win.size; ++c) {
          gathered[c] = A[(m_row * w + cols[c]) * slots + slots - 1 - (a * win.size + c)];
        }
        weights = gathered.data();
      }
      weighted_pixel_sum(y + (i * w + j) * channels, weights, x + m_row * w * channels, cols, win.size, channels);
    }
  }
}

Tensor similarity(const Tensor& q, const Tensor& k, int64_t window, bool distance) {
  check_operand(q, "q");
  check_operand(k, "k");
  TORCH_CHECK(q.sizes() == k.sizes(), "circatt cpu kernels: q and k shapes differ: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "circatt cpu kernels: q and k dtypes differ: ", q.scalar_type(),
              " vs ", k.scalar_type());
  const Shape shape = shape_of(q);
  check_window(window, shape);
  const Window win(window, shape);
  Tensor s = at::empty({shape.batch, shape.heads, shape.height, shape.width, win.slots}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circatt_similarity_cpu", [&] {
    const int64_t padded_width = unrolled_width<scalar_t>(shape, win);
    const Tensor q_rows = unrolled_rows(q, 0, padded_width), k_rows = unrolled_rows(k, win.radius, padded_width);
    const int64_t rows_size = shape.height * shape.channels * padded_width, s_size = shape.pixels() * win.slots;
    const scalar_t* q_ptr = q_rows.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_rows.const_data_ptr<scalar_t>();
    scalar_t* s_ptr = s.mutable_data_ptr<scalar_t>();
    dispatch_flag(distance, [&](auto distance_flag) {
      constexpr bool kDistance = decltype(distance_flag)::value;
      for_each_row(shape, shape.width * win.slots * shape.channels, [&](int64_t image, int64_t i) {
        similarity_row<scalar_t, kDistance>(q_ptr + image * rows_size, k_ptr + image * rows_size, padded_width,
                                            s_ptr + image * s_size, i, win, shape);
      });
    });
  });
  return s;
}

Tensor apply(const Tensor& A, const Tensor& x, int64_t window, bool transposed) {
  check_operand(A, "A");
  check_operand(x, "x");
  TORCH_CHECK(A.scalar_type() == x.scalar_type(), "circatt cpu kernels: A and x dtypes differ: ", A.scalar_type(),
              " vs ", x.scalar_type());
  const Shape shape = shape_of(x);
  check_window(window, shape);
  const Window win(window, shape);
  TORCH_CHECK(A.sizes() == at::IntArrayRef({shape.batch, shape.heads, shape.height, shape.width, win.slots}),
              "circatt cpu kernels: A must have shape (B, G, H, W, window^2) = (", shape.batch, ", ", shape.heads,
              ", ", shape.height, ", ", shape.width, ", ", win.slots, ") to match x ", x.sizes(), ", got ",
              A.sizes());
  const Tensor A_c = A.contiguous();
  Tensor y;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circatt_apply_cpu", [&] {
    // Channels padded to whole vectors, so the kernels need no scalar remainder.
    const int64_t channels = round_up(shape.channels, simd::kLanes<scalar_t>);
    const Tensor x_cl = channels_last(x, channels);
    Tensor y_cl = at::zeros_like(x_cl);
    const int64_t image_size = shape.pixels() * channels, a_size = shape.pixels() * win.slots;
    const scalar_t* a_ptr = A_c.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x_cl.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y_cl.mutable_data_ptr<scalar_t>();
    dispatch_flag(transposed, [&](auto transposed_flag) {
      constexpr bool kTransposed = decltype(transposed_flag)::value;
      for_each_row(shape, shape.width * win.slots * channels, [&](int64_t image, int64_t i) {
        apply_row<scalar_t, kTransposed>(a_ptr + image * a_size, x_ptr + image * image_size,
                                         y_ptr + image * image_size, channels, i, win, shape);
      });
    });
    y = channels_first(y_cl, shape.channels);
  });
  return y;
}

}  // namespace circatt_cpu
