// Shared pieces of the CPU kernels (semantics: shared spec circulant-ops.md): operand checks, the
// window geometry with its wrap-around index tables, the two operand layouts, the parallel row loop,
// and the two register-tiled inner kernels that every circulant kernel is built from:
//   score_tile:          scores of a vector of queries against a tile of keys, summed over channels;
//   weighted_pixel_sum:  a weighted sum of channels-last pixels, vectorised over channels.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace circatt_cpu {

using torch::Tensor;

// Multiply-adds a parallel task gets at least, so that small problems do not pay for threads.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// score_tile: keys per register tile (one accumulator vector each, enough to hide the FMA latency).
constexpr int64_t kKeyTile = 8;

// weighted_pixel_sum: bytes of channels per register tile (16 SSE/NEON, 8 AVX or 4 AVX-512 accumulators).
constexpr int64_t kChannelTileBytes = 256;

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Sizes of a (B, G, Ch, H, W) operand.
struct Shape {
  int64_t batch, heads, channels, height, width;

  int64_t images() const { return batch * heads; }
  int64_t pixels() const { return height * width; }
};

inline Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(4)}; }

inline void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "circatt cpu kernels: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "circatt cpu kernels: ", name,
              " must be float32 or float64, got ", t.scalar_type(),
              " (float16/bfloat16 are CUDA-only; complex tensors must be viewed as real by the caller)");
  TORCH_CHECK(t.dim() == 5, "circatt cpu kernels: ", name, " must have 5 dims, got shape ", t.sizes());
}

inline void check_window(int64_t window, const Shape& shape) {
  TORCH_CHECK(window >= 1 && window % 2 == 1, "circatt cpu kernels: window must be a positive odd number, got ",
              window);
  TORCH_CHECK(window <= shape.height && window <= shape.width, "circatt cpu kernels: window ", window,
              " exceeds the image size ", shape.height, "x", shape.width, " (the window would overlap itself)");
}

// table[u] = (u - shift) mod n for u < length. With shift r, the neighbour at window offset a of
// position i is table[i + a]; length n + window - 1 covers every i and a.
inline std::vector<int64_t> wrapped_indices(int64_t n, int64_t shift, int64_t length) {
  std::vector<int64_t> table(length);
  for (int64_t u = 0; u < length; ++u) {
    table[u] = ((u - shift) % n + n) % n;
  }
  return table;
}

// The window geometry: neighbour (a, c) of pixel (i, j) is (row[i + a], col[j + c]). The window is
// symmetric: pixel (i, j) is neighbour (size-1-a, size-1-c) of its neighbour (a, c), so the same
// tables also list the pixels whose windows hold a given pixel.
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
inline Tensor channels_last(const Tensor& x, int64_t padded_channels) {
  return at::constant_pad_nd(x.permute({0, 1, 3, 4, 2}), {0, padded_channels - x.size(2)}).contiguous();
}

// Inverse of channels_last: (B, G, H, W, padded) -> contiguous (B, G, channels, H, W).
inline Tensor channels_first(const Tensor& x, int64_t channels) {
  return x.narrow(4, 0, channels).permute({0, 1, 4, 2, 3}).contiguous();
}

// (B, G, Ch, H, W) -> contiguous (B, G, H, Ch, width) holding x[b, g, ch, i, (u - shift) mod W] at
// column u: every image row channels-first with the wrap-around written out, so that with shift r the
// keys (i, j + c - r), c = 0 .. window-1, of pixel j are the side-by-side columns j .. j + window - 1.
inline Tensor unrolled_rows(const Tensor& x, int64_t shift, int64_t width) {
  const std::vector<int64_t> cols = wrapped_indices(x.size(4), shift, width);
  const Tensor index = at::tensor(at::IntArrayRef(cols), x.options().dtype(at::kLong));
  return x.permute({0, 1, 3, 2, 4}).index_select(4, index).contiguous();
}

// Columns of the unrolled rows of a window-size problem: score tiles read up to a vector of queries
// and a key tile past the row's end.
template <typename scalar_t>
int64_t unrolled_width(const Shape& shape, const Window& win) {
  return round_up(shape.width, simd::kLanes<scalar_t>) + round_up(win.size, kKeyTile);
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

// One window row of scores for a whole image row: out[j * out_stride + c] = score(q[j], k[j + c]) for
// j < width, c < window, where q_row and k_row are unrolled rows (channels padded_width apart) and
// k_row is the key row of that window row, unrolled with shift r.
template <typename scalar_t, bool distance>
void score_window_row(const scalar_t* q_row, const scalar_t* k_row, int64_t padded_width, int64_t channels,
                      int64_t width, int64_t window, scalar_t* out, int64_t out_stride) {
  constexpr int64_t lanes = simd::kLanes<scalar_t>;
  for (int64_t j = 0; j < width; j += lanes) {
    for (int64_t c = 0; c < window; c += kKeyTile) {
      score_tile<scalar_t, distance>(q_row + j, k_row + j + c, padded_width, channels, out + j * out_stride + c,
                                     out_stride, std::min(lanes, width - j), std::min(kKeyTile, window - c));
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

}  // namespace circatt_cpu
