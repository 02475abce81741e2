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

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using torch::Tensor;

// Multiply-adds a parallel task gets at least, so that small problems do not pay for threads.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// similarity: keys per register tile (one accumulator vector each, enough to hide the FMA latency).
constexpr int64_t kKeyTile = 8;

// apply: bytes of channels per register tile (16 SSE/NEON, 8 AVX or 4 AVX-512 accumulators).
constexpr int64_t kChannelTileBytes = 256;

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Sizes of a (B, G, Ch, H, W) operand.
struct Shape {
  int64_t batch, heads, channels, height, width;

  int64_t images() const { return batch * heads; }
  int64_t pixels() const { return height * width; }
};

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(4)}; }

void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "circatt cpu kernels: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "circatt cpu kernels: ", name,
              " must be float32 or float64, got ", t.scalar_type(),
              " (float16/bfloat16 are CUDA-only; complex tensors must be viewed as real by the caller)");
  TORCH_CHECK(t.dim() == 5, "circatt cpu kernels: ", name, " must have 5 dims, got shape ", t.sizes());
}

void check_window(int64_t window, const Shape& shape) {
  TORCH_CHECK(window >= 1 && window % 2 == 1, "circatt cpu kernels: window must be a positive odd number, got ",
              window);
  TORCH_CHECK(window <= shape.height && window <= shape.width, "circatt cpu kernels: window ", window,
              " exceeds the image size ", shape.height, "x", shape.width, " (the window would overlap itself)");
}

// table[u] = (u - shift) mod n for u < length. With shift r, the neighbour at window offset a of
// position i is table[i + a]; length n + window - 1 covers every i and a.
std::vector<int64_t> wrapped_indices(int64_t n, int64_t shift, int64_t length) {
  std::vector<int64_t> table(length);
  for (int64_t u = 0; u < length; ++u) {
    table[u] = ((u - shift) % n + n) % n;
  }
  return table;
}

// The window geometry: neighbour (a, c) of pixel (i, j) is (row[i + a], col[j + c]).
struct Window {
  int64_t size, radius, slots;
  std::vector<int64_t> row, col;

  Window(int64_t window, const Shape& shape)
      : size(window),
        radius((window - 1) / 2),
        slots(window * window),
        row(wrapped_indices(shape.height, radius, shape.height + window - 1)),
        col(wrapped_indices(shape.width, radius, shape.width + window - 1)) {}
};

// (B, G, Ch, H, W) -> contiguous (B, G, H, W, padded_channels), zero-filled beyond Ch.
Tensor channels_last(const Tensor& x, int64_t padded_channels) {
  return at::constant_pad_nd(x.permute({0, 1, 3, 4, 2}), {0, padded_channels - x.size(2)}).contiguous();
}

// (B, G, Ch, H, W) -> contiguous (B, G, H, Ch, width) holding x[b, g, ch, i, (u - shift) mod W] at
// column u: every image row channels-first with the wrap-around written out, so that with shift r the
// keys (i, j + c - r), c = 0 .. window-1, of pixel j are the side-by-side columns j .. j + window - 1.
Tensor unrolled_rows(const Tensor& x, int64_t shift, int64_t width) {
  const std::vector<int64_t> cols = wrapped_indices(x.size(4), shift, width);
  const Tensor index = at::tensor(at::IntArrayRef(cols), x.options().dtype(at::kLong));
  return x.permute({0, 1, 3, 2, 4}).index_select(4, index).contiguous();
}

// Calls body(image, i) for every row i of every (batch, head) image, in parallel;
// work_per_row sizes the grain.
template <typename F>
void for_each_row(const Shape& shape, int64_t work_per_row, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, shape.images() * shape.height, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      body(task / shape.height, task % shape.height);
    }
  });
}

// Turns a runtime flag into a compile-time one: calls f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void dispatch_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// One register tile of S: the scores of kLanes queries (side by side at q) against their keys at
// kKeyTile offsets (key c of query l at k[c + l]), over n channels that lie stride apart. Stores
// out[l * out_stride + c] for the first queries x keys of the tile. The score is the dot product, or
// minus half the squared distance (from the differences, which do not cancel).
template <typename scalar_t, bool distance>
void score_tile(const scalar_t* q, const scalar_t* k, int64_t stride, int64_t n, scalar_t* out,
                int64_t out_stride, int64_t queries, int64_t keys) {
  using V = simd::Vec<scalar_t>;
  constexpr int64_t lanes = simd::kLanes<scalar_t>;
  V acc[kKeyTile] = {};
  for (int64_t ch = 0; ch < n; ++ch) {
    const V q_ch = simd::load(q + ch * stride);
    for (int64_t c = 0; c < kKeyTile; ++c) {
      const V k_ch = simd::load(k + ch * stride + c);
      if constexpr (distance) {
        const V d = q_ch - k_ch;
        acc[c] += d * d;
      } else {
        acc[c] += q_ch * k_ch;
      }
    }
  }
  scalar_t tile[kKeyTile][lanes];
  std::memcpy(tile, acc, sizeof tile);
  for (int64_t l = 0; l < queries; ++l) {
    for (int64_t c = 0; c < keys; ++c) {
      out[l * out_stride + c] = distance ? scalar_t(-0.5) * tile[c][l] : tile[c][l];
    }
  }
}

// Row i of S for one image: S[i, j, a*ws + c] = score(q[i, j], k[row[i + a], col[j + c]]).
// q_rows, k_rows are unrolled rows of padded_width columns (k shifted by r), so query j is column j of
// its row and its keys in window row a are columns j + c of key row row[i + a].
template <typename scalar_t, bool distance>
void similarity_row(const scalar_t* q_rows, const scalar_t* k_rows, int64_t padded_width, scalar_t* s, int64_t i,
                    const Window& win, const Shape& shape) {
  constexpr int64_t lanes = simd::kLanes<scalar_t>;
  const int64_t ch = shape.channels, w = shape.width, row_size = ch * padded_width;
  const scalar_t* q_row = q_rows + i * row_size;
  for (int64_t a = 0; a < win.size; ++a) {
    const scalar_t* k_row = k_rows + win.row[i + a] * row_size;
    for (int64_t j = 0; j < w; j += lanes) {
      for (int64_t c = 0; c < win.size; c += kKeyTile) {
        score_tile<scalar_t, distance>(q_row + j, k_row + j + c, padded_width, ch,
                                       s + (i * w + j) * win.slots + a * win.size + c, win.slots,
                                       std::min(lanes, w - j), std::min(kKeyTile, win.size - c));
      }
    }
  }
}

// y[0 .. vectors * kLanes) += sum_m weights[m] * x[cols[m] * stride + ...] over count neighbours,
// the partial sums held in vectors accumulator registers.
template <typename scalar_t, int64_t vectors>
void weighted_sum(scalar_t* y, const scalar_t* weights, const scalar_t* x, const int64_t* cols, int64_t count,
                  int64_t stride) {
  using V = simd::Vec<scalar_t>;
  constexpr int64_t lanes = simd::kLanes<scalar_t>;
  V acc[vectors];
  for (int64_t v = 0; v < vectors; ++v) {
    acc[v] = simd::load(y + v * lanes);
  }
  for (int64_t m = 0; m < count; ++m) {
    const scalar_t weight = weights[m];
    const scalar_t* x_m = x + cols[m] * stride;
    for (int64_t v = 0; v < vectors; ++v) {
      acc[v] += weight * simd::load(x_m + v * lanes);
    }
  }
  for (int64_t v = 0; v < vectors; ++v) {
    simd::store(y + v * lanes, acc[v]);
  }
}

// y[0 .. channels) += sum_m weights[m] * x[cols[m] * channels + ...], channels a multiple of kLanes:
// full register tiles, then single vectors.
template <typename scalar_t>
void weighted_pixel_sum(scalar_t* y, const scalar_t* weights, const scalar_t* x, const int64_t* cols, int64_t count,
                        int64_t channels) {
  constexpr int64_t lanes = simd::kLanes<scalar_t>, tile = kChannelTileBytes / simd::kVectorBytes;
  int64_t e = 0;
  for (; e + tile * lanes <= channels; e += tile * lanes) {
    weighted_sum<scalar_t, tile>(y + e, weights, x + e, cols, count, channels);
  }
  for (; e < channels; e += lanes) {
    weighted_sum<scalar_t, 1>(y + e, weights, x + e, cols, count, channels);
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
    // Query and key tiles read up to a vector of queries and a key tile past the row's end.
    const int64_t padded_width = round_up(shape.width, simd::kLanes<scalar_t>) + round_up(win.size, kKeyTile);
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
    y = y_cl.narrow(4, 0, shape.channels).permute({0, 1, 4, 2, 3}).contiguous();
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "circatt: CPU kernels of circulant-sparse (wrap-around sliding-window) attention";
  m.def("similarity", &similarity, "S = windowed dot product or -1/2 squared distance of q and k, (B, G, H, W, K)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("window"), pybind11::arg("distance"));
  m.def("apply", &apply, "y = A x or y = A^T x for A of shape (B, G, H, W, K) and x of shape (B, G, Ch, H, W)",
        pybind11::arg("A"), pybind11::arg("x"), pybind11::arg("window"), pybind11::arg("transposed"));
}
