// CPU kernels of circulant-sparse attention (semantics: shared spec circulant-ops.md).
//
// Pixel (i, j) of an H x W image sees the K = window^2 pixels ((i + a - r) mod H, (j + c - r) mod W),
// slot s = a * window + c, r = (window - 1) / 2. The kernels work channels-last, so that the innermost
// loop runs over contiguous channels and vectorises, and they resolve the wrap-around through index
// tables built once per call, never with a modulo in the inner loops. Work is split over
// (batch, head, image row) with at::parallel_for; every task writes only its own output rows.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using torch::Tensor;

// Multiply-adds a parallel task gets at least, so that small problems do not pay for threads.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// Sizes of a (B, G, Ch, H, W) operand.
struct Shape {
  int64_t batch, heads, channels, height, width;

  int64_t images() const { return batch * heads; }
  int64_t pixels() const { return height * width; }
};

void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "circatt cpu kernels: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "circatt cpu kernels: ", name, " must be float32 or float64, got ", t.scalar_type(),
              " (float16/bfloat16 are CUDA-only; complex tensors must be viewed as real by the caller)");
  TORCH_CHECK(t.dim() == 5, "circatt cpu kernels: ", name, " must have 5 dims, got shape ", t.sizes());
}

Shape shape_of(const Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(4)};
}

void check_window(int64_t window, const Shape& shape) {
  TORCH_CHECK(window >= 1 && window % 2 == 1, "circatt cpu kernels: window must be a positive odd number, got ",
              window);
  TORCH_CHECK(window <= shape.height && window <= shape.width, "circatt cpu kernels: window ", window,
              " exceeds the image size ", shape.height, "x", shape.width, " (the window would overlap itself)");
}

// (B, G, Ch, H, W) -> contiguous (B, G, H, W, Ch), and back.
Tensor to_channels_last(const Tensor& x) { return x.permute({0, 1, 3, 4, 2}).contiguous(); }
Tensor to_channels_first(const Tensor& x) { return x.permute({0, 1, 4, 2, 3}).contiguous(); }

// table[u] = (u - r) mod n for u in [0, n + window - 1): the wrapped index of window offset u - r,
// so that the neighbour at offset a of position i is table[i + a].
std::vector<int64_t> wrapped_indices(int64_t n, int64_t window) {
  const int64_t r = (window - 1) / 2;
  std::vector<int64_t> table(n + window - 1);
  for (int64_t u = 0; u < static_cast<int64_t>(table.size()); ++u) {
    table[u] = (u - r + n) % n;
  }
  return table;
}

// The window geometry: neighbour (a, c) of pixel (i, j) is (row[i + a], col[j + c]).
struct Window {
  int64_t size, slots;
  std::vector<int64_t> row, col;

  Window(int64_t window, const Shape& shape)
      : size(window),
        slots(window * window),
        row(wrapped_indices(shape.height, window)),
        col(wrapped_indices(shape.width, window)) {}
};

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

// Similarity of one query and one key over n channels: the dot product, or minus half the squared
// distance (computed from the differences, not from norms, to avoid cancellation).
template <typename scalar_t, bool distance>
inline scalar_t score(const scalar_t* __restrict q, const scalar_t* __restrict k, int64_t n) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = 0; e < n; ++e) {
    if constexpr (distance) {
      const scalar_t d = q[e] - k[e];
      acc += d * d;
    } else {
      acc += q[e] * k[e];
    }
  }
  return distance ? scalar_t(-0.5) * acc : acc;
}

// Row i of S for one image: S[i, j, a*ws + c] = score(q[i, j], k[row[i + a], col[j + c]]).
// q, k are channels-last (H, W, Ch). Looping over window rows outside the pixels keeps one key row
// hot in cache while a whole query row passes over it.
template <typename scalar_t, bool distance>
void similarity_row(const scalar_t* q, const scalar_t* k, scalar_t* s, int64_t i, const Window& win,
                    const Shape& shape) {
  const int64_t ch = shape.channels, w = shape.width;
  const scalar_t* q_row = q + i * w * ch;
  scalar_t* s_row = s + i * w * win.slots;
  for (int64_t a = 0; a < win.size; ++a) {
    const scalar_t* k_row = k + win.row[i + a] * w * ch;
    for (int64_t j = 0; j < w; ++j) {
      scalar_t* s_out = s_row + j * win.slots + a * win.size;
      for (int64_t c = 0; c < win.size; ++c) {
        s_out[c] = score<scalar_t, distance>(q_row + j * ch, k_row + win.col[j + c] * ch, ch);
      }
    }
  }
}

// y[0..n) += alpha * x[0..n)
template <typename scalar_t>
inline void axpy(scalar_t* __restrict y, scalar_t alpha, const scalar_t* __restrict x, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    y[e] += alpha * x[e];
  }
}

// Row i of y = A x, or of y = A^T x, for one image; x, y channels-last (H, W, Ch), y zeroed.
// Neighbour m = (row[i + a], col[j + c]) of pixel (i, j) takes the weight A[i, j, s], s = a*ws + c.
// For the transpose, (i, j) is neighbour (ws-1-a, ws-1-c) of m, so its weight is A[m, K-1-s]:
// a gather over the rows that contain (i, j), with no scatter and no races between rows.
template <typename scalar_t, bool transposed>
void apply_row(const scalar_t* A, const scalar_t* x, scalar_t* y, int64_t i, const Window& win,
               const Shape& shape) {
  const int64_t ch = shape.channels, w = shape.width, slots = win.slots;
  scalar_t* y_row = y + i * w * ch;
  for (int64_t a = 0; a < win.size; ++a) {
    const int64_t m_row = win.row[i + a];
    const scalar_t* x_row = x + m_row * w * ch;
    for (int64_t j = 0; j < w; ++j) {
      for (int64_t c = 0; c < win.size; ++c) {
        const int64_t m_col = win.col[j + c];
        const int64_t s = a * win.size + c;
        const scalar_t weight = transposed ? A[(m_row * w + m_col) * slots + slots - 1 - s]
                                           : A[(i * w + j) * slots + s];
        axpy(y_row + j * ch, weight, x_row + m_col * ch, ch);
      }
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

  const Tensor q_cl = to_channels_last(q), k_cl = to_channels_last(k);
  Tensor s = at::empty({shape.batch, shape.heads, shape.height, shape.width, win.slots}, q.options());
  const int64_t image_size = shape.pixels() * shape.channels, s_size = shape.pixels() * win.slots;

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "circatt_similarity_cpu", [&] {
    const scalar_t* q_ptr = q_cl.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cl.const_data_ptr<scalar_t>();
    scalar_t* s_ptr = s.mutable_data_ptr<scalar_t>();
    dispatch_flag(distance, [&](auto distance_flag) {
      constexpr bool kDistance = decltype(distance_flag)::value;
      for_each_row(shape, shape.width * win.slots * shape.channels, [&](int64_t image, int64_t i) {
        similarity_row<scalar_t, kDistance>(q_ptr + image * image_size, k_ptr + image * image_size,
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

  const Tensor A_c = A.contiguous(), x_cl = to_channels_last(x);
  Tensor y_cl = at::zeros_like(x_cl);
  const int64_t image_size = shape.pixels() * shape.channels, a_size = shape.pixels() * win.slots;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circatt_apply_cpu", [&] {
    const scalar_t* a_ptr = A_c.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x_cl.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y_cl.mutable_data_ptr<scalar_t>();
    dispatch_flag(transposed, [&](auto transposed_flag) {
      constexpr bool kTransposed = decltype(transposed_flag)::value;
      for_each_row(shape, shape.width * win.slots * shape.channels, [&](int64_t image, int64_t i) {
        apply_row<scalar_t, kTransposed>(a_ptr + image * a_size, x_ptr + image * image_size,
                                         y_ptr + image * image_size, i, win, shape);
      });
    });
  });
  return to_channels_first(y_cl);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "circatt: CPU kernels of circulant-sparse (wrap-around sliding-window) attention";
  m.def("similarity", &similarity, "S = windowed dot product or -1/2 squared distance of q and k, (B, G, H, W, K)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("window"), pybind11::arg("distance"));
  m.def("apply", &apply, "y = A x or y = A^T x for A of shape (B, G, H, W, K) and x of shape (B, G, Ch, H, W)",
        pybind11::arg("A"), pybind11::arg("x"), pybind11::arg("window"), pybind11::arg("transposed"));
}
