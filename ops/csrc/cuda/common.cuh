// Shared pieces of the circulant-sparse attention CUDA kernels.
//
// Every kernel follows one scheme. A block owns a tile of TI x TJ query pixels of one
// (batch, head) plane and walks the ws window rows a = 0..ws-1. For window row a, tile row i
// needs the halo row i0 + i + a - r (wrapped), TJ + ws - 1 columns wide (wrapped). These rows
// live in a ring of TI + 1 rows in shared memory, all channels of each: while step a computes on
// rows a .. a+TI-1, the spare slot receives row a+TI by asynchronous copies (cp.async), waited
// for at the step's closing barrier. Every key/value element is read from global memory about
// (TI + ws - 1) / TI times per tile. Within a step a "dot" loop fills a (pixel, window column)
// buffer from the tile and the ring, and an "accumulate" loop sums such a buffer of weights
// against the ring. Shared memory holds the accumulation type (float, or double for double).
//
// Layout conventions (elements of the accumulation type A):
//   tile    [ch][npix]            pixel p = i * TJ + jj
//   ring    [ch][slot][col]       slot = (halo row) mod (TI+1), row stride rs, plane stride ps
//   buffer  [p][L]                L = (kRJ-1) zeros | ws values | (kRJ-1) zeros
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace circatt {

constexpr int kThreads = 256;  // block size cap; every kernel has __launch_bounds__(kThreads)
constexpr int kRJ = 8;         // accumulate loop: consecutive pixels per thread
constexpr int kDJ = 4;         // dot loop: consecutive pixels per thread
constexpr int kDC = 8;         // dot loop: consecutive window columns per thread

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Channels per thread in the accumulate loop (registers: kRJ * RC accumulators).
template <typename T> struct AccumChannels { static constexpr int value = 4; };
template <> struct AccumChannels<double> { static constexpr int value = 2; };

__host__ __device__ __forceinline__ int wrap(int x, int n) {
  x %= n;
  return x < 0 ? x + n : x;
}

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Tile and halo geometry of one launch (identical for all blocks).
struct Geom {
  int H, W, ws, r;   // image, window, radius
  int TI, TJ, npix;  // tile of TI x TJ pixels
  int cols;          // halo columns, TJ + ws - 1
  int nslots;        // ring rows, TI + 1
  int rs, ps;        // ring row stride and plane stride (odd: spreads banks)
  int L;             // buffer row length, ws + 2 * (kRJ - 1)
  int tiles_j;       // tiles along W
  int ndot;          // dot tiles per window row
};

inline Geom make_geom(int H, int W, int ws, int TI, int TJ) {
  Geom g;
  g.H = H; g.W = W; g.ws = ws; g.r = (ws - 1) / 2;
  g.TI = TI; g.TJ = TJ; g.npix = TI * TJ;
  g.cols = TJ + ws - 1;
  g.nslots = TI + 1;
  g.rs = (g.cols + 7) | 1;  // the dot loop reads up to 6 columns past the halo
  g.ps = (g.nslots * g.rs) | 1;
  g.L = ws + 2 * (kRJ - 1);
  g.tiles_j = (W + TJ - 1) / TJ;
  g.ndot = TI * (TJ / kDJ) * ((ws + kDC - 1) / kDC);
  return g;
}

// Bump allocator for the dynamic shared memory; the host and the kernel run the same calls.
struct Bump {
  int bytes = 0;
  __host__ __device__ int take(long long n) {
    const int at = bytes;
    bytes += int((n + 15) & ~15LL);
    return at;
  }
};

// Asynchronous global -> shared copy of one 4- or 8-byte element (sm_80+); lands by cp_async_wait().
template <int N>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(src), "n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// One element into shared memory: asynchronously when no conversion is needed, else converted.
template <typename T, typename A>
__device__ __forceinline__ void put(A* dst, const T* src) {
  if constexpr (std::is_same<T, A>::value)
    cp_async<sizeof(A)>(dst, src);
  else
    *dst = static_cast<A>(*src);
}

__device__ __forceinline__ void tile_origin(const Geom& g, int& i0, int& j0) {
  i0 = int(blockIdx.x / g.tiles_j) * g.TI;
  j0 = int(blockIdx.x % g.tiles_j) * g.TJ;
}

// cmap[u] = image column of halo column u.
__device__ __forceinline__ void halo_columns(int* cmap, const Geom& g, int j0) {
  for (int u = threadIdx.x; u < g.cols; u += blockDim.x) cmap[u] = wrap(j0 - g.r + u, g.W);
}

__device__ __forceinline__ int warp_id() { return int(threadIdx.x >> 5); }
__device__ __forceinline__ int lane_id() { return int(threadIdx.x & 31); }
__device__ __forceinline__ int num_warps() { return int(blockDim.x >> 5); }

// The tile's own pixels, all C channels: dst[ch][p] = src[ch][(i0+i) mod H][(j0+jj) mod W].
// A warp per (channel, tile row); lanes walk the row.
template <typename T, typename A>
__device__ void stage_tile(A* __restrict__ dst, const T* __restrict__ src, int C, const Geom& g, int i0, int j0) {
  const int64_t HW = int64_t(g.H) * g.W;
  for (int row = warp_id(); row < C * g.TI; row += num_warps()) {
    const int ch = row / g.TI, i = row - ch * g.TI;
    const T* s = src + ch * HW + int64_t(wrap(i0 + i, g.H)) * g.W;
    A* d = dst + ch * g.npix + i * g.TJ;
    for (int jj = lane_id(); jj < g.TJ; jj += 32) d[jj] = static_cast<A>(s[wrap(j0 + jj, g.W)]);
  }
}

// Squared norm over C channels of each tile pixel.
template <typename T, typename A>
__device__ void tile_norms(A* __restrict__ dst, const T* __restrict__ src, int C, const Geom& g, int i0, int j0) {
  const int64_t HW = int64_t(g.H) * g.W;
  for (int p = threadIdx.x; p < g.npix; p += blockDim.x) {
    const int i = p / g.TJ, jj = p - i * g.TJ;
    const T* s = src + int64_t(wrap(i0 + i, g.H)) * g.W + wrap(j0 + jj, g.W);
    A acc = 0;
    for (int ch = 0; ch < C; ++ch) {
      const A v = static_cast<A>(s[ch * HW]);
      acc += v * v;
    }
    dst[p] = acc;
  }
}

// Image row `grow` (wrapped already), all C channels, halo columns, into ring slot `slot`
// (asynchronous for float and double).
template <typename T, typename A>
__device__ void stage_ring_row(A* __restrict__ ring, const T* __restrict__ src, int C, const Geom& g, int grow,
                               int slot, const int* __restrict__ cmap) {
  const int64_t HW = int64_t(g.H) * g.W;
  const T* s = src + int64_t(grow) * g.W;
  A* d = ring + slot * g.rs;
  for (int ch = warp_id(); ch < C; ch += num_warps()) {
    const T* sc = s + ch * HW;
    A* dc = d + ch * g.ps;
#pragma unroll 4
    for (int u = lane_id(); u < g.cols; u += 32) put(dc + u, sc + cmap[u]);
  }
}

// One value per pixel (a (H, W) plane in the accumulation type) into ring slot `slot`.
template <typename A>
__device__ void stage_ring_scalar(A* __restrict__ ring, const A* __restrict__ src, const Geom& g, int grow, int slot,
                                  const int* __restrict__ cmap) {
  const A* s = src + int64_t(grow) * g.W;
  for (int u = threadIdx.x; u < g.cols; u += blockDim.x) put(ring + slot * g.rs + u, s + cmap[u]);
}

template <typename A> __device__ __forceinline__ void load4(A (&d)[4], const A* p);
template <> __device__ __forceinline__ void load4<float>(float (&d)[4], const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
}
template <> __device__ __forceinline__ void load4<double>(double (&d)[4], const double* p) {
  const double2 v0 = reinterpret_cast<const double2*>(p)[0];
  const double2 v1 = reinterpret_cast<const double2*>(p)[1];
  d[0] = v0.x; d[1] = v0.y; d[2] = v1.x; d[3] = v1.y;
}

// Dot loop, one thread tile: pixels jj0..jj0+3 of tile row i against window columns
// c0..c0+7 of window row a, over channels [ch0, ch1):
//   buf[p][c] = sum_ch tile[ch][p] * ring[ch][(i+a) mod (TI+1)][jj + c]
// (minus norms/2 of the ring column when `rnorm` is given). Tiles are numbered with the pixel
// group fastest, then the tile row, so that a warp reads 32 distinct banks of the ring.
template <typename A>
__device__ __forceinline__ void dot_tile(int t, A* __restrict__ buf, const A* __restrict__ tile, int ch0, int ch1,
                                         const A* __restrict__ ring, const A* __restrict__ rnorm, const Geom& g,
                                         int a) {
  const int ngj = g.TJ / kDJ;
  const int jg = t % ngj, rest = t / ngj;
  const int i = rest % g.TI, cg = rest / g.TI;
  const int jj0 = jg * kDJ, c0 = cg * kDC;
  const int slot = (i + a) % g.nslots;
  const A* qp = tile + i * g.TJ + jj0;
  const A* kp = ring + slot * g.rs + jj0 + c0;
  A acc[kDJ][kDC];
#pragma unroll
  for (int p = 0; p < kDJ; ++p)
#pragma unroll
    for (int c = 0; c < kDC; ++c) acc[p][c] = A(0);
#pragma unroll 2
  for (int ch = ch0; ch < ch1; ++ch) {
    A qv[kDJ];
    load4<A>(qv, qp + ch * g.npix);
    A kv[kDJ + kDC - 1];
    const A* kc = kp + ch * g.ps;
#pragma unroll
    for (int u = 0; u < kDJ + kDC - 1; ++u) kv[u] = kc[u];
#pragma unroll
    for (int p = 0; p < kDJ; ++p)
#pragma unroll
      for (int c = 0; c < kDC; ++c) acc[p][c] = fma(qv[p], kv[p + c], acc[p][c]);
  }
#pragma unroll
  for (int p = 0; p < kDJ; ++p) {
    A* dst = buf + (i * g.TJ + jj0 + p) * g.L + (kRJ - 1) + c0;
#pragma unroll
    for (int c = 0; c < kDC; ++c) {
      if (c0 + c < g.ws) {
        A v = acc[p][c];
        if (rnorm != nullptr) v -= A(0.5) * rnorm[slot * g.rs + jj0 + p + c0 + c];
        dst[c] = v;
      }
    }
  }
}

// All dot tiles of window row a, with the channels cut into `splits` near-equal parts so that
// more threads share the step: part s writes its partial sums to buf + s * stride (the norms
// term goes with part 0). Readers add the parts with sum_parts().
template <typename A>
__device__ __forceinline__ void dot_split(A* __restrict__ buf, int stride, int splits, const A* __restrict__ tile,
                                          int C, const A* __restrict__ ring, const A* __restrict__ rnorm,
                                          const Geom& g, int a) {
  const int per = (C + splits - 1) / splits;
  for (int t = threadIdx.x; t < g.ndot * splits; t += blockDim.x) {
    const int s = t / g.ndot, ch0 = s * per;
    dot_tile(t - s * g.ndot, buf + s * stride, tile, ch0, min(C, ch0 + per), ring, s == 0 ? rnorm : nullptr, g, a);
  }
}

template <typename A>
__device__ __forceinline__ A sum_parts(const A* at, int stride, int splits) {
  A v = at[0];
  for (int s = 1; s < splits; ++s) v += at[s * stride];
  return v;
}

// Accumulate loop of one thread: pixels jj0..jj0+7 of tile row i, channels chbase + rc*chstride:
//   acc[p][rc] += sum_c buf[p][c] * ring[ch][(i+a) mod (TI+1)][jj + c]
// run over halo columns t = jj0 + p + c with the zero-padded buffer, so that each ring value
// is loaded once for all kRJ pixels. Channels >= C read plane 0 and are never written out.
template <int RC, typename A>
__device__ __forceinline__ void accumulate(A (&acc)[kRJ][RC], const A* __restrict__ buf, const A* __restrict__ ring,
                                           int C, int chbase, int chstride, const Geom& g, int i, int jg, int a) {
  const int jj0 = jg * kRJ;
  const int slot = (i + a) % g.nslots;
  const A* wp = buf + (i * g.TJ + jj0) * g.L + (kRJ - 1);
  const A* xp[RC];
#pragma unroll
  for (int rc = 0; rc < RC; ++rc) {
    const int ch = chbase + rc * chstride;
    xp[rc] = ring + (ch < C ? ch : 0) * g.ps + slot * g.rs + jj0;
  }
  const int nt = kRJ + g.ws - 1;
#pragma unroll 2
  for (int t = 0; t < nt; ++t) {
    A xv[RC];
#pragma unroll
    for (int rc = 0; rc < RC; ++rc) xv[rc] = xp[rc][t];
#pragma unroll
    for (int p = 0; p < kRJ; ++p) {
      const A w = wp[p * (g.L - 1) + t];
#pragma unroll
      for (int rc = 0; rc < RC; ++rc) acc[p][rc] = fma(w, xv[rc], acc[p][rc]);
    }
  }
}

// |x[plane, :, n]|^2 for every pixel: the per-key term of the distance similarity, staged as a
// scalar ring row next to the keys.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pixel_norms_kernel(const T* __restrict__ x, acc_t<T>* __restrict__ out, int C, int64_t HW, int64_t total) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / HW, n = idx - plane * HW;
    const T* p = x + plane * C * HW + n;
    A acc = A(0);
    for (int c = 0; c < C; ++c) {
      const A v = static_cast<A>(p[c * HW]);
      acc += v * v;
    }
    out[idx] = acc;
  }
}

// ---------------------------------------------------------------- host helpers

inline bool& poison_outputs() {
  static bool flag = false;
  return flag;
}

// Output allocation; filled with NaN when poisoning is on (tests check every entry is written).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (poison_outputs()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
  return at::empty(sizes, opts);
}

inline void check_real_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "circatt cuda: ", name, " must be a CUDA tensor, got one on ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "circatt cuda: ",
              name, " must be float32, float64, float16 or bfloat16, got ", st,
              " (complex tensors are viewed as real with doubled channels before they get here)");
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* refname) {
  check_real_cuda(t, name);
  TORCH_CHECK(t.device() == ref.device(), "circatt cuda: ", name, " is on ", t.device(), " but ", refname, " on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "circatt cuda: ", name, " has dtype ", t.scalar_type(), " but ",
              refname, " has ", ref.scalar_type());
}

inline void check_dims(const at::Tensor& t, const char* name, int64_t dims, const char* layout) {
  TORCH_CHECK(t.dim() == dims, "circatt cuda: ", name, " must be ", dims, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_window(int64_t ws, int64_t H, int64_t W) {
  TORCH_CHECK(ws >= 1 && ws % 2 == 1, "circatt cuda: window must be a positive odd integer, got ", ws);
  TORCH_CHECK(ws <= H && ws <= W, "circatt cuda: window ", ws, " is larger than the image (", H, " x ", W,
              "): the window would overlap itself");
  TORCH_CHECK(H * W < (int64_t(1) << 31) && H * W * ws * ws < (int64_t(1) << 62),
              "circatt cuda: image too large");
}

inline void check_planes(int64_t planes, int64_t chunks) {
  TORCH_CHECK(planes <= 65535 && chunks <= 65535, "circatt cuda: batch * heads must be at most 65535, got ", planes);
}

inline int smem_optin() {
  int dev = 0, v = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

// A launch configuration: geometry, block size and dynamic shared memory.
struct Launch {
  Geom g;
  int threads;
  int smem;
  int accum_threads;  // threads owning accumulators: TI * TJ/kRJ * groups
  int splits;         // channel parts of the dot loop (dot_split)
};

// Dot-loop channel parts worth having for C channels: at least 8 channels a part, at most 4 parts.
inline int max_dot_splits(int64_t C) { return C >= 32 ? 4 : (C >= 16 ? int(C / 8) : 1); }

// Picks the largest tile whose shared memory lets two blocks share a multiprocessor (else the
// largest that fits at all) and whose accumulating threads fit one block; for that tile, the most
// dot-loop channel parts (up to max_splits) whose threads and shared memory still fit.
// smem_of(Geom, splits) gives the bytes; `groups` is the number of channel groups of the
// accumulate loop (0: none); `dots` the number of dot loops per window row.
template <typename SmemOf>
Launch choose_launch(int H, int W, int ws, int groups, int dots, int max_splits, SmemOf smem_of, const char* op) {
  static const int cand[][2] = {{4, 32}, {2, 32}, {4, 16}, {1, 32}, {2, 16}, {4, 8}, {1, 16}, {2, 8}, {1, 8}};
  const int hard = smem_optin();
  const int soft = hard / 2 - 1024;
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& c : cand) {
      const int TI = c[0], TJ = c[1];
      if (TI > 1 && TI > H) continue;
      if (TJ > 8 && TJ / 2 >= W) continue;
      const int acc_threads = TI * (TJ / kRJ) * groups;
      if (acc_threads > kThreads) continue;
      const Geom g = make_geom(H, W, ws, TI, TJ);
      for (int splits = max_splits; splits >= 1; --splits) {
        if (splits > 1 && g.ndot * dots * splits > kThreads) continue;
        const int bytes = smem_of(g, splits);
        if (bytes > (pass == 0 ? soft : hard)) continue;
        const int dot_threads = g.ndot * dots * splits;
        int threads = acc_threads > dot_threads ? acc_threads : dot_threads;
        threads = (threads + 31) / 32 * 32;
        if (threads > kThreads) threads = kThreads;
        if (threads < 64) threads = 64;
        if (threads < acc_threads) continue;
        return Launch{g, threads, bytes, acc_threads, splits};
      }
    }
  }
  TORCH_CHECK(false, "circatt cuda: ", op, ": window ", ws,
              " with these channel counts needs more shared memory than the device has; split the channels "
              "into more heads or use a smaller window");
  return Launch{};
}

inline unsigned grid_stride_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return unsigned(b < 8192 ? (b > 0 ? b : 1) : 8192);
}

// Per-pixel squared norms of a contiguous (B, G, C, H, W) tensor, in the accumulation type.
inline at::Tensor pixel_norms(const at::Tensor& x) {
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(3), x.size(4)}, x.options().dtype(acc));
  const int64_t HW = x.size(3) * x.size(4), total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "circatt_pixel_norms", [&] {
    pixel_norms_kernel<scalar_t><<<grid_stride_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<acc_t<scalar_t>>(), int(x.size(2)), HW, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename Kernel>
inline void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace circatt
