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
//   buffer  [p][L]                L = (kRJ-1) zeros | ws values | 1 zero, then kRJ-1 zeros after the
//                                 last pixel: a pixel's leading zeros are the trailing ones of the
//                                 pixel before it; L is odd (ws is), which spreads a warp's pixels over
//                                 the banks. A buffer (one channel part) is `part` elements.
// The apply has its own buffer and ring strides, for 16-byte loads (apply_geom).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
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
constexpr int kAP = 4;         // the apply's accumulate loop: consecutive pixels per thread
constexpr int kDJ = 4;         // dot loop: consecutive pixels per thread
constexpr int kDC = 8;         // dot loop: consecutive window columns per thread

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Channels per thread in the accumulate loop (registers: kRJ * RC accumulators).
template <typename T> struct AccumChannels { static constexpr int value = 4; };
template <> struct AccumChannels<double> { static constexpr int value = 2; };
// Channels per thread in the apply's accumulate loop (kAP * RC accumulators).
template <typename T> struct ApplyChannels { static constexpr int value = 8; };
template <> struct ApplyChannels<double> { static constexpr int value = 4; };

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
  int rs, ps;        // ring row stride and plane stride (odd: spreads banks; apply: see apply_geom)
  int L;             // buffer row length, ws + kRJ (odd; apply: see apply_geom)
  int part;          // buffer length, npix * L + kRJ - 1 (apply: see apply_geom)
  int tiles_j;       // tiles along W
  int ndot;          // dot tiles per window row
};

__host__ __device__ __forceinline__ int round_up(int x, int m) { return (x + m - 1) / m * m; }

// The apply's weight buffer holds one row per pixel, L elements: row p of a group of kAP pixels
// has the window row's ws weights at offsets p .. p+ws-1 and zeros elsewhere, so that offset t
// pairs with ring column jj0 + t for every pixel of the group. Rows and groups start on 16 bytes
// (four elements) for vector loads; a group is apply_group_stride elements, 4 past a multiple of
// 32, so that the groups a warp reads at once fall in distinct banks.
__host__ __device__ __forceinline__ int apply_group_stride(const Geom& g) {
  const int n = kAP * g.L;
  return n + (36 - n % 32) % 32;
}
// Where the group of kAP pixels that holds pixel `pix` starts in the buffer (16-byte aligned).
__host__ __device__ __forceinline__ int apply_group(const Geom& g, int pix) {
  return pix / kAP * apply_group_stride(g);
}
// Where pixel `pix`'s weight for window column 0 sits in the buffer (column c: + c).
__host__ __device__ __forceinline__ int apply_row(const Geom& g, int pix) {
  return apply_group(g, pix) + pix % kAP * (g.L + 1);
}

// The apply's layout (vector loads, four elements at a time): rows of L = kAP + ws - 1 rounded up
// to 4; ring rows of rs >= TJ - kAP + L elements (a thread's last load ends there; the columns past
// the halo stay zero), plane stride ps a multiple of 4 that is TJ past a multiple of 32 when a warp
// reads a 16-byte slice from 8 / (TJ / kAP) channels at once, so that those slices miss each other.
inline void apply_geom(Geom& g) {
  g.L = round_up(kAP + g.ws - 1, 4);
  g.rs = round_up(std::max(g.cols, g.TJ - kAP + g.L), 4);
  g.ps = round_up(g.nslots * g.rs, 4);
  if (g.TJ < 32) g.ps += ((g.TJ - g.ps) % 32 + 32) % 32;
  g.part = g.npix / kAP * apply_group_stride(g);
}

// The ring of a dot loop with 16-byte loads (dot_tile<true>): rows start on 16 bytes and are long
// enough for the last thread tile's 12 values; for tiles narrower than a warp's 8 lanes of pixel
// groups, rows are TJ past a multiple of 32 elements, so that the lanes of a quarter warp that
// differ in tile row read distinct banks.
inline void vector_ring_geom(Geom& g) {
  g.rs = round_up(g.TJ + kDC * ((g.ws + kDC - 1) / kDC), 4);
  if (g.TJ < 32) g.rs += ((g.TJ - g.rs) % 32 + 32) % 32;
  g.ps = round_up(g.nslots * g.rs, 4);
}

// dot_reads: a dot loop reads the ring, up to 6 columns past the halo; without one (the apply)
// the ring and the buffer take the apply's layout.
inline Geom make_geom(int H, int W, int ws, int TI, int TJ, bool dot_reads) {
  Geom g;
  g.H = H; g.W = W; g.ws = ws; g.r = (ws - 1) / 2;
  g.TI = TI; g.TJ = TJ; g.npix = TI * TJ;
  g.cols = TJ + ws - 1;
  g.nslots = TI + 1;
  g.rs = (g.cols + (dot_reads ? kDC - 1 : 0)) | 1;
  g.ps = (g.nslots * g.rs) | 1;
  g.L = ws + kRJ;
  g.part = g.npix * g.L + kRJ - 1;
  g.tiles_j = (W + TJ - 1) / TJ;
  g.ndot = TI * (TJ / kDJ) * ((ws + kDC - 1) / kDC);
  if (!dot_reads) apply_geom(g);
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
// Vec: the ring has vector_ring_geom's layout and the 11 ring values a channel come from three
// 16-byte loads (the scalar loads otherwise: 4 instead of 12 shared loads for 32 FMAs).
template <bool Vec, typename A>
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
    A kv[kDJ + kDC];  // the last one is read by the vector loads only
    const A* kc = kp + ch * g.ps;
    if constexpr (Vec) {
#pragma unroll
      for (int u = 0; u < kDJ + kDC; u += 4) load4<A>(*reinterpret_cast<A(*)[4]>(kv + u), kc + u);
    } else {
#pragma unroll
      for (int u = 0; u < kDJ + kDC - 1; ++u) kv[u] = kc[u];
    }
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

// Dot tile u of the ndot * splits tiles of window row a whose channels are cut into `splits`
// near-equal parts, so that more threads share the step: part s writes its partial sums to
// buf + s * g.part (the norms term goes with part 0). Readers add the parts with sum_parts().
template <bool Vec, typename A>
__device__ __forceinline__ void dot_part(int u, A* __restrict__ buf, int splits, const A* __restrict__ tile, int C,
                                         const A* __restrict__ ring, const A* __restrict__ rnorm, const Geom& g,
                                         int a) {
  const int s = u / g.ndot, per = (C + splits - 1) / splits, ch0 = s * per;
  dot_tile<Vec>(u - s * g.ndot, buf + s * g.part, tile, ch0, min(C, ch0 + per), ring, s == 0 ? rnorm : nullptr, g, a);
}

// All dot tiles of window row a, in `splits` channel parts (dot_part).
template <bool Vec = false, typename A>
__device__ __forceinline__ void dot_split(A* __restrict__ buf, int splits, const A* __restrict__ tile, int C,
                                          const A* __restrict__ ring, const A* __restrict__ rnorm, const Geom& g,
                                          int a) {
  for (int t = threadIdx.x; t < g.ndot * splits; t += blockDim.x) dot_part<Vec>(t, buf, splits, tile, C, ring, rnorm, g, a);
}

// The fused backward's two dot loops of window row a side by side (S into buf0 with the norms
// rnorm0, dP into buf1), each in `splits` channel parts: the threads share the tiles of both.
template <typename A>
__device__ __forceinline__ void dot_split_pair(A* __restrict__ buf0, const A* __restrict__ tile0, int C0,
                                               const A* __restrict__ ring0, const A* __restrict__ rnorm0,
                                               A* __restrict__ buf1, const A* __restrict__ tile1, int C1,
                                               const A* __restrict__ ring1, int splits, const Geom& g, int a) {
  const int n = g.ndot * splits;
  for (int t = threadIdx.x; t < 2 * n; t += blockDim.x) {
    if (t < n)
      dot_part<false>(t, buf0, splits, tile0, C0, ring0, rnorm0, g, a);
    else
      dot_part<false>(t - n, buf1, splits, tile1, C1, ring1, static_cast<const A*>(nullptr), g, a);
  }
}

template <typename A>
__device__ __forceinline__ A sum_parts(const A* at, int stride, int splits) {
  A v = at[0];
  for (int s = 1; s < splits; ++s) v += at[s * stride];
  return v;
}

// A block's thread in the accumulate loop: pixel group jg (kRJ pixels) of tile row ti, channel
// group grp of NG; the threads past TI * TJ/kRJ * NG own no accumulators.
struct AccumThread {
  bool owner;
  int jg, grp, ti;
};

__device__ __forceinline__ AccumThread accum_thread(const Geom& g, int NG) {
  const int ngj = g.TJ / kRJ, ng = NG > 0 ? NG : 1;
  const int tt = threadIdx.x;
  return AccumThread{tt < g.TI * ngj * NG, tt % ngj, (tt / ngj) % ng, tt / (ngj * ng)};
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

// What bounds the blocks resident on one multiprocessor; queried once per device.
struct SmLimits {
  int sms;             // multiprocessors
  int smem_per_sm;     // shared memory of a multiprocessor, bytes (H100: 228 KB)
  int smem_per_block;  // the most a block may opt in to (H100: 227 KB)
  int smem_reserved;   // taken by the driver from each block's share (1 KB since sm_80)
  int regs_per_sm;     // 32-bit registers
  int threads_per_sm;
  int blocks_per_sm;
  int major;           // compute capability
};

inline SmLimits query_sm_limits(int dev) {
  auto get = [dev](cudaDeviceAttr attr) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
    return v;
  };
  SmLimits d;
  d.sms = get(cudaDevAttrMultiProcessorCount);
  d.smem_per_sm = get(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  d.smem_per_block = get(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  d.smem_reserved = get(cudaDevAttrReservedSharedMemoryPerBlock);
  d.regs_per_sm = get(cudaDevAttrMaxRegistersPerMultiprocessor);
  d.threads_per_sm = get(cudaDevAttrMaxThreadsPerMultiProcessor);
  d.blocks_per_sm = get(cudaDevAttrMaxBlocksPerMultiprocessor);
  d.major = get(cudaDevAttrComputeCapabilityMajor);
  return d;
}

inline SmLimits sm_limits() {
  constexpr int kMaxDevices = 64;
  static SmLimits cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= kMaxDevices) return query_sm_limits(dev);
  std::call_once(once[dev], [dev] { cache[dev] = query_sm_limits(dev); });
  return cache[dev];
}

// Registers a thread of `kernel` uses (what bounds its residency besides shared memory).
template <typename Kernel>
inline int kernel_registers(Kernel kernel) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.numRegs;
}

// Blocks of `threads` threads, `smem` bytes of dynamic shared memory and `regs` registers a
// thread that one multiprocessor holds at once, by the rules of CUDA's occupancy calculator
// (cuda_occupancy.h): shared memory in 128-byte units plus the driver's reserve per block;
// registers in 256-register units per warp, each of the 4 schedulers holding whole warps.
inline int resident_blocks(const SmLimits& d, int threads, int smem, int regs) {
  const int warps = (threads + 31) / 32;
  int n = d.blocks_per_sm;
  n = std::min(n, d.threads_per_sm / (warps * 32));
  n = std::min(n, d.smem_per_sm / ((smem + d.smem_reserved + 127) / 128 * 128));
  const int regs_per_warp = (regs * 32 + 255) / 256 * 256;
  if (regs_per_warp > 0) n = std::min(n, d.regs_per_sm / 4 / regs_per_warp * 4 / warps);
  return n;
}

// A launch configuration: geometry, block size and dynamic shared memory.
struct Launch {
  Geom g;
  int threads;
  int smem;
  int accum_threads;  // threads owning accumulators: TI * TJ/kRJ * groups (the apply: TJ/kAP)
  int splits;         // channel parts of the dot loop (dot_split)
  int tiles;          // blocks per plane (grid x)
  int resident;       // blocks per multiprocessor (resident_blocks)
  int64_t waves;      // ceil(blocks / (multiprocessors * resident))
  int order;          // index of the tile shape in the candidate list (larger tiles first)
};

// The chooser's comparison: whether launch a is expected to run faster than b. First, two or more
// resident blocks over one (a block alone idles its multiprocessor at each of its barriers; as in
// v3, one block per multiprocessor only when nothing else fits). Then the estimate: the number of
// waves, ceil(blocks / (SMs * resident)); a partial last wave costs about a whole one (the kernels
// are latency-bound), and a block takes about as long whatever its tile (its threads grow with
// the tile). On equal waves, more resident threads per multiprocessor (more warps to hide the
// latency; measured at S1, both at 2 waves: a 1x32 tile in 3 parts, 3 x 64 threads, ran the fused
// forward 19% slower than a 2x32 tile in 2 parts, 2 x 128), then more dot-loop channel parts (each
// thread runs C / parts channels), then the larger tile (fewer re-reads of the halo rows).
// `tile_first` puts the larger tile before the resident threads: for the fused backward's kernels,
// which run two dot loops per window row over the staged halo (measured at S1 h=4, 2 x 128 threads
// of 4x32 tiles against 8 x 64 of 1x32, both 3 waves: the smaller tiles made fwd+bwd 14% slower).
inline bool faster(const Launch& a, const Launch& b, bool tile_first) {
  if ((a.resident >= 2) != (b.resident >= 2)) return a.resident >= 2;
  if (a.waves != b.waves) return a.waves < b.waves;
  if (tile_first && a.order != b.order) return a.order < b.order;
  const int threads_a = a.resident * a.threads, threads_b = b.resident * b.threads;
  if (threads_a != threads_b) return threads_a > threads_b;
  if (a.splits != b.splits) return a.splits > b.splits;
  return a.order < b.order;
}

// Dot-loop channel parts worth having for C channels: at least 8 channels a part, at most 4 parts.
inline int max_dot_splits(int64_t C) { return C >= 32 ? 4 : (C >= 16 ? int(C / 8) : 1); }

// Every tile shape and number of dot-loop channel parts (up to max_splits) whose threads
// (accumulating threads, dot threads) fit one block and whose shared memory fits the device, the
// one `faster` prefers. smem_of(Geom, splits) gives the bytes; `planes` the blocks per tile
// position (grid y * z); `groups` the channel groups of the accumulate loop (0: none); `dots` the
// dot loops per window row (2: the fused backward, which prefers larger tiles); `regs` the kernel's
// registers a thread (kernel_registers).
template <typename SmemOf>
Launch choose_launch(int H, int W, int ws, int64_t planes, int groups, int dots, int max_splits, int regs,
                     SmemOf smem_of, const char* op, bool vector_ring = false) {
  static const int cand[][2] = {{4, 32}, {2, 32}, {4, 16}, {1, 32}, {2, 16}, {4, 8}, {1, 16}, {2, 8}, {1, 8}};
  const SmLimits dev = sm_limits();
  Launch best{};
  bool found = false;
  for (int order = 0; order < int(sizeof(cand) / sizeof(cand[0])); ++order) {
    const int TI = cand[order][0], TJ = cand[order][1];
    if (TI > 1 && TI > H) continue;
    if (TJ > 8 && TJ / 2 >= W) continue;
    const int acc_threads = TI * (TJ / (dots > 0 ? kRJ : kAP)) * groups;
    if (acc_threads > kThreads) continue;
    Geom g = make_geom(H, W, ws, TI, TJ, dots > 0);
    if (vector_ring) vector_ring_geom(g);
    const int tiles = (H + TI - 1) / TI * g.tiles_j;
    for (int splits = 1; splits <= max_splits; ++splits) {
      const int dot_threads = g.ndot * dots * splits;
      if (splits > 1 && dot_threads > kThreads) break;
      const int bytes = smem_of(g, splits);
      if (bytes > dev.smem_per_block) break;
      const int threads = std::max(64, std::min(kThreads, (std::max(acc_threads, dot_threads) + 31) / 32 * 32));
      const int resident = resident_blocks(dev, threads, bytes, regs);
      if (resident < 1) break;
      const int64_t slots = int64_t(dev.sms) * resident;
      const Launch l{g, threads, bytes, acc_threads, splits, tiles, resident, (tiles * planes + slots - 1) / slots,
                     order};
      if (!found || faster(l, best, dots > 1)) best = l;
      found = true;
    }
  }
  TORCH_CHECK(found, "circatt cuda: ", op, ": window ", ws,
              " with these channel counts needs more shared memory than the device has; split the channels "
              "into more heads or use a smaller window");
  return best;
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
