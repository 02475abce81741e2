// Tensor-core kernels of the fused attention (dot similarity, sm_80+), float32 accumulation:
// mma.sync m16n8k16 for float16 and bfloat16, and m16n8k8 TF32 for float32: plain TF32 when
// torch.backends.cuda.matmul.allow_tf32 is on (q and P rounded to TF32, ring operands read as TF32,
// that is truncated), else every operand split into two TF32 parts (Tf32Mma<true>: three mmas a
// product, float32's accuracy within a few times). The forward (FlashAttention's online softmax per
// window row), dq, and dk/dv.
//
// A block of kWarps warps owns kWarps x 16 pixels (a warp: 16 consecutive pixels of one image row,
// the M of the mma). For window row a, warp w needs halo row w + a: image row i0 + w + a - r
// (wrapped), columns j0 - r .. j0 - r + NK - 1 (wrapped), NK = 16 * chunks >= 16 + ws - 1. Against
// such a row the window is a band of a dense 16 x NK product (window column c = halo column -
// pixel column, 0 <= c < ws), masked. Halo rows live in a ring of kWarps + 1 slots, filled by
// 16-byte cp.async one row ahead. The forward and dq kernels own queries and ring k and v; the dk/dv
// kernel owns keys and rings q, dy, L2 and D: by the window's symmetry, the queries that see a key
// lie in the same halo rows and the same band.
//
// Alignment: the halo starts at a multiple of 8 columns (j0 = r mod 8 + 16 t, W a multiple of 8),
// so every 16-byte piece of a row (8 or 4 columns) is one aligned copy even where the row wraps.
// The tiles wrap too: the last one covers the first r mod 8 columns. Shared rows hold [ch][NK + 8]
// elements: the pad puts the rows that one fragment load reads on distinct banks.
//
// TF32 fragments: the A operand of m16n8k8 holds keys t and t + 4 where the S accumulator holds
// keys 2t and 2t + 1, so P v sums over the keys of each 8-key tile in the order (0, 2, 4, 6, 1, 3,
// 5, 7): P needs no shuffle, and v's B fragment is one 8-byte load of keys 2t, 2t + 1.
//
// Outputs match the scalar kernels': y (B, G, Cv, H, W) and the float32 natural log-sum-exp of
// scale * S per query (so either backward can follow either forward), and dq, dk, dv.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>

#include "common.cuh"

namespace circatt {

namespace {

constexpr int kWarps = 4;                  // image rows of a block
constexpr int kMmaThreads = kWarps * 32;
constexpr int kSlots = kWarps + 1;         // ring slots
constexpr int kMaxChunks = 4;              // 16-key chunks of a halo row: ws <= 49
constexpr int kPad = 8;                    // elements after each shared row

bool& tensor_cores_enabled() {
  static bool on = true;
  return on;
}

__host__ __device__ inline int chunks_for(int ws) { return (16 + ws - 1 + 15) / 16; }

// Shared memory of the forward and dq kernels (rings of two operands), and of the dk/dv kernel (two
// operands and the float L2 and D rows).
int mma_smem_bytes(int C, int Cv, int ws, int elem_size) {
  return kSlots * (C + Cv) * (16 * chunks_for(ws) + kPad) * elem_size;
}
int dkdv_smem_bytes(int C, int Cv, int ws, int elem_size) {
  return mma_smem_bytes(C, Cv, ws, elem_size) + kSlots * 2 * (16 * chunks_for(ws) + kPad) * int(sizeof(float));
}

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// d += a * b for a 16x16 (row) by 16x8 (col) tile of T, float accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, at::BFloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values of T in one 32-bit register, the first in the low half (the mma fragment order).
template <typename T>
__device__ __forceinline__ unsigned pack(T lo, T hi) {
  const unsigned short l = *reinterpret_cast<const unsigned short*>(&lo);
  const unsigned short h = *reinterpret_cast<const unsigned short*>(&hi);
  return unsigned(l) | (unsigned(h) << 16);
}
template <typename T>
__device__ __forceinline__ unsigned pack_float(float lo, float hi) {
  return pack(static_cast<T>(lo), static_cast<T>(hi));
}

// d += a * b for a 16x8 (row) by 8x8 (col) tile of TF32, float accumulators.
__device__ __forceinline__ void mma1688(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// float to TF32, rounded to nearest (ties away), as cuBLAS rounds its operands.
__device__ __forceinline__ unsigned tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// ---------------------------------------------------------------- the two operand types

// The per-dtype steps of the kernel: q as A fragments (kK channels an mma), one 16-key chunk c of
// S = q k^T, and one 16-key chunk of o += P v. k and v rows are [ch][rs] in shared memory.
template <typename T>
struct HalfMma {
  using Elem = T;
  static constexpr int kK = 16;

  template <int C>
  static __device__ __forceinline__ void load_q(unsigned (&qa)[C / kK][4], const T* qb, int64_t HW, int64_t p0,
                                                int c0, int c1, int t) {
#pragma unroll
    for (int s = 0; s < C / kK; ++s) {
      const T* a = qb + int64_t(16 * s + 2 * t) * HW + p0;
      qa[s][0] = pack(a[c0], a[HW + c0]);
      qa[s][1] = pack(a[c1], a[HW + c1]);
      qa[s][2] = pack(a[8 * HW + c0], a[9 * HW + c0]);
      qa[s][3] = pack(a[8 * HW + c1], a[9 * HW + c1]);
    }
  }

  template <int C>
  static __device__ __forceinline__ void scores(float (&s)[2][4], const unsigned (&qa)[C / kK][4], const T* kr,
                                                int rs, int c, int lane) {
    // matrices: (ch 0-7, keys 0-7), (ch 8-15, keys 0-7), (ch 0-7, keys 8-15), (ch 8-15, keys 8-15)
    const int mi = lane >> 3;
#pragma unroll
    for (int st = 0; st < C / kK; ++st) {
      unsigned b[4];
      ldmatrix_x4<true>(b, kr + (16 * st + (lane & 7) + 8 * (mi & 1)) * rs + 16 * c + 8 * (mi >> 1));
      mma16816<T>(s[0], qa[st], b[0], b[1]);
      mma16816<T>(s[1], qa[st], b[2], b[3]);
    }
  }

  template <int CV>
  static __device__ __forceinline__ void accumulate(float (&o)[CV / 8][4], const float (&p)[2][4], const T* vr, int rs,
                                                    int c, int lane) {
    const unsigned pa[4] = {pack_float<T>(p[0][0], p[0][1]), pack_float<T>(p[0][2], p[0][3]),
                            pack_float<T>(p[1][0], p[1][1]), pack_float<T>(p[1][2], p[1][3])};
    // matrices: (ch 0-7, keys 0-7), (ch 0-7, keys 8-15), (ch 8-15, keys 0-7), (ch 8-15, keys 8-15)
    const int mi = lane >> 3;
#pragma unroll
    for (int n = 0; n < CV / 16; ++n) {
      unsigned b[4];
      ldmatrix_x4<false>(b, vr + (16 * n + (lane & 7) + 8 * (mi >> 1)) * rs + 16 * c + 8 * (mi & 1));
      mma16816<T>(o[2 * n], pa, b[0], b[1]);
      mma16816<T>(o[2 * n + 1], pa, b[2], b[3]);
    }
  }
};

// float32 on tensor cores, m16n8k8 TF32. Split = false (allow_tf32): q and P rounded to TF32, the
// ring operands read as TF32 (truncated). Split = true: every operand x is hi + lo, both TF32, and a b
// sums lo_a hi_b + hi_a lo_b + hi_a hi_b (lo_a lo_b is below float32's rounding): float32's accuracy
// for three mmas a product. Fragments then hold the raw float32 bits, split where they are used.
template <bool Split>
struct Tf32Mma {
  using Elem = float;
  static constexpr int kK = 8;

  // A fragment register as it is kept: TF32, or float32 bits to split at each use.
  static __device__ __forceinline__ unsigned keep(float x) { return Split ? __float_as_uint(x) : tf32(x); }

  static __device__ __forceinline__ void split(float x, unsigned& hi, unsigned& lo) {
    hi = tf32(x);
    lo = tf32(x - __uint_as_float(hi));
  }
  // The same, kept where it is written: an A fragment is reused across every window row, and a split
  // hoisted out of those loops would hold twice its registers (and spill at 64 channels).
  static __device__ __forceinline__ void split_here(float x, unsigned& hi, unsigned& lo) {
    asm volatile("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(x));
    const float rest = x - __uint_as_float(hi);
    asm volatile("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(rest));
  }

  // An A fragment ready for the mmas: its hi and lo parts (lo only when split).
  struct A {
    unsigned hi[4], lo[4];
  };
  static __device__ __forceinline__ A prepare(const unsigned (&a)[4]) {
    A r;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (Split)
        split_here(__uint_as_float(a[i]), r.hi[i], r.lo[i]);
      else
        r.hi[i] = r.lo[i] = a[i];
    }
    return r;
  }

  // d += a b for one 8x8 B tile given as two float32 values a thread.
  static __device__ __forceinline__ void mma(float (&d)[4], const A& a, float b0, float b1) {
    if constexpr (Split) {
      unsigned h0, l0, h1, l1;
      split(b0, h0, l0);
      split(b1, h1, l1);
      mma1688(d, a.lo, h0, h1);
      mma1688(d, a.hi, l0, l1);
      mma1688(d, a.hi, h0, h1);
    } else {
      mma1688(d, a.hi, __float_as_uint(b0), __float_as_uint(b1));
    }
  }

  template <int C>
  static __device__ __forceinline__ void load_q(unsigned (&qa)[C / kK][4], const float* qb, int64_t HW, int64_t p0,
                                                int c0, int c1, int t) {
#pragma unroll
    for (int s = 0; s < C / kK; ++s) {
      const float* a = qb + int64_t(8 * s + t) * HW + p0;
      qa[s][0] = keep(a[c0]);
      qa[s][1] = keep(a[c1]);
      qa[s][2] = keep(a[4 * HW + c0]);
      qa[s][3] = keep(a[4 * HW + c1]);
    }
  }

  template <int C>
  static __device__ __forceinline__ void scores(float (&s)[2][4], const unsigned (&qa)[C / kK][4], const float* kr,
                                                int rs, int c, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int st = 0; st < C / kK; ++st) {
      const A a = prepare(qa[st]);
      const float* b = kr + (8 * st + t) * rs + 16 * c + g;
      mma(s[0], a, b[0], b[4 * rs]);
      mma(s[1], a, b[8], b[4 * rs + 8]);
    }
  }

  template <int CV>
  static __device__ __forceinline__ void accumulate(float (&o)[CV / 8][4], const float (&p)[2][4], const float* vr,
                                                    int rs, int c, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const unsigned pk[4] = {keep(p[n][0]), keep(p[n][2]), keep(p[n][1]), keep(p[n][3])};
      const A a = prepare(pk);
#pragma unroll
      for (int m = 0; m < CV / 8; ++m) {
        const float2 b = *reinterpret_cast<const float2*>(vr + (8 * m + g) * rs + 16 * c + 8 * n + 2 * t);
        mma(o[m], a, b.x, b.y);
      }
    }
  }
};

// ---------------------------------------------------------------- the kernel

// One halo row of a plane's x (C channels) into ring slot `slot`: 16-byte pieces, wrapped columns.
template <typename T>
__device__ __forceinline__ void stage_row(T* ring, const T* x, int C, int H, int W, int grow, int col0, int NK,
                                          int slot) {
  constexpr int per = 16 / int(sizeof(T));  // elements of a 16-byte piece
  const int pieces = NK / per, rs = NK + kPad;
  T* dst = ring + slot * C * rs;
  const T* src = x + int64_t(grow) * W;
  const int64_t HW = int64_t(H) * W;
  for (int idx = threadIdx.x; idx < C * pieces; idx += kMmaThreads) {
    const int ch = idx / pieces, p = idx - ch * pieces;
    cp_async16(dst + ch * rs + per * p, src + ch * HW + wrap(col0 + per * p, W));
  }
}

// A warp's 16 x CH accumulator tile, row half h (pixels g and g + 8) times f[h], into the (CH, H, W)
// plane `out` at image row `row`, for the tile's pixels that exist (jt + pixel < W).
template <typename T, int CH>
__device__ __forceinline__ void store_tile(T* out, const float (&o)[CH / 8][4], const float (&f)[2], int64_t HW,
                                           int row, int W, int j0, int jt, int g, int t) {
  T* base = out + int64_t(row) * W;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int qm = g + 8 * h;
    if (jt + qm >= W) continue;
    const int col = wrap(j0 + qm, W);
#pragma unroll
    for (int n = 0; n < CH / 8; ++n) {
      const int ch = 8 * n + 2 * t;
      base[int64_t(ch) * HW + col] = static_cast<T>(o[n][2 * h] * f[h]);
      base[int64_t(ch + 1) * HW + col] = static_cast<T>(o[n][2 * h + 1] * f[h]);
    }
  }
}

// Where a block's tile lies: kWarps image rows (a warp each) of 16 pixels from column j0 (wrapped),
// and the halo that their windows cover: NK columns from col0 = j0 - r, rows i0 - r .. i0 + kWarps - 2 + r.
struct Tile {
  int r, nc, NK, rs, i0, jt, j0, col0, warp, lane, g, t, row;
  bool row_ok;  // a warp past the last image row computes, never stores

  __device__ Tile(int H, int ws, int tiles_j) {
    r = (ws - 1) / 2;
    nc = chunks_for(ws);
    NK = 16 * nc;
    rs = NK + kPad;
    const int ti = int(blockIdx.x) / tiles_j, tj = int(blockIdx.x) - ti * tiles_j;
    i0 = ti * kWarps;
    jt = 16 * tj;
    j0 = r % 8 + jt;
    col0 = j0 - r;
    warp = int(threadIdx.x >> 5);
    lane = int(threadIdx.x & 31);
    g = lane >> 2;  // mma fragment coordinates: row group, thread in group
    t = lane & 3;
    row = i0 + warp;
    row_ok = row < H;
  }
  // Image columns of the warp's pixels g and g + 8.
  __device__ int col(int h, int W) const { return wrap(j0 + g + 8 * h, W); }
  // Whether halo column h is in the window of the warp's pixel g + 8 * half (the band of the product).
  __device__ bool in_window(int h, int half, int ws) const { return unsigned(h - g - 8 * half) < unsigned(ws); }
};

// The window-row loop every kernel shares: stage(image_row, slot) puts a halo row into a ring slot
// (cp.async, kWarps rows ahead of use); body(slot) then runs for window row a, whose halo row a + warp
// sits in `slot`. Warps past the image's last row only stage.
template <typename Stage, typename Body>
__device__ __forceinline__ void walk_window_rows(const Tile& tl, int H, int ws, Stage stage, Body body) {
  for (int rr = 0; rr < kWarps; ++rr) stage(wrap(tl.i0 - tl.r + rr, H), rr);
  cp_async_commit();
  for (int a = 0; a < ws; ++a) {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();  // halo row a + kWarps - 1 landed; every warp is past step a - 1
    if (a + 1 < ws) {
      const int rr = a + kWarps;
      stage(wrap(tl.i0 - tl.r + rr, H), rr % kSlots);
      cp_async_commit();
    }
    if (tl.row_ok) body((a + tl.warp) % kSlots);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

template <typename Ops, int C, int CV, typename T = typename Ops::Elem>
__global__ void __launch_bounds__(kMmaThreads)
    attn_fwd_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        T* __restrict__ y, float* __restrict__ lse, int H, int W, int ws, int tiles_j, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile tl(H, ws, tiles_j);
  const int rs = tl.rs, g = tl.g, t = tl.t;
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kSlots * C * rs;
  const int64_t HW = int64_t(H) * W, plane = blockIdx.y;
  const T* kb = k + plane * C * HW;
  const T* vb = v + plane * CV * HW;

  // q as mma A fragments, straight from global memory: pixels g and g+8 of the warp's 16.
  unsigned qa[C / Ops::kK][4];
  Ops::template load_q<C>(qa, q + plane * C * HW, HW, int64_t(tl.row_ok ? tl.row : 0) * W, tl.col(0, W),
                          tl.col(1, W), t);

  const float sl2 = scale * 1.4426950408889634f;
  float o[CV / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  auto stage = [&](int grow, int slot) {
    stage_row(ks, kb, C, H, W, grow, tl.col0, tl.NK, slot);
    stage_row(vs, vb, CV, H, W, grow, tl.col0, tl.NK, slot);
  };
  walk_window_rows(tl, H, ws, stage, [&](int slot) {
    const T* kr = ks + slot * C * rs;
    const T* vr = vs + slot * CV * rs;

    // S = q k^T over the chunks, masked to the window band in log2 units: s[chunk][8-key tile][fragment].
    float s[kMaxChunks][2][4];
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
#pragma unroll
      for (int n = 0; n < 2; ++n) s[c][n][0] = s[c][n][1] = s[c][n][2] = s[c][n][3] = 0.f;
      if (c < tl.nc) Ops::template scores<C>(s[c], qa, kr, rs, c, tl.lane);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool in = c < tl.nc && tl.in_window(16 * c + 8 * n + 2 * t + (e & 1), e >> 1, ws);
          s[c][n][e] = in ? s[c][n][e] * sl2 : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[c][n][e]);
        }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);  // finite: every query has ws keys in every halo row
      alpha[h] = exp2f(m[h] - m_new);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int n = 0; n < CV / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // P v, chunk by chunk: the S fragments of a chunk are the A fragment of its 16 keys.
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      if (c >= tl.nc) continue;
      float p[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[n][e] = exp2f(s[c][n][e] - m[e >> 1]);
          l[e >> 1] += p[n][e];
        }
      Ops::template accumulate<CV>(o, p, vr, rs, c, tl.lane);
    }
  });
  if (!tl.row_ok) return;

  // y = o / l and lse = ln 2 (m + log2 l).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  const float inv[2] = {1.f / l[0], 1.f / l[1]};
  store_tile<T, CV>(y + plane * CV * HW, o, inv, HW, tl.row, W, tl.j0, tl.jt, g, t);
  if (t == 0)
    for (int h = 0; h < 2; ++h)
      if (tl.jt + g + 8 * h < W)
        lse[plane * HW + int64_t(tl.row) * W + tl.col(h, W)] = 0.6931471805599453f * (m[h] + log2f(l[h]));
#endif
}

// dq = scale * sum over the window of dS k, with P = exp2(log2e scale S - L2) and dS = P (dP - D),
// dP = dy v^T: the forward's tiling (a warp: 16 queries), one 16-key chunk at a time (no running max).
template <typename Ops, int C, int CV, typename T = typename Ops::Elem>
__global__ void __launch_bounds__(kMmaThreads)
    attn_bwd_dq_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const T* __restrict__ dy, const float* __restrict__ L2, const float* __restrict__ D,
                           T* __restrict__ dq, int H, int W, int ws, int tiles_j, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile tl(H, ws, tiles_j);
  const int rs = tl.rs, g = tl.g, t = tl.t;
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kSlots * C * rs;
  const int64_t HW = int64_t(H) * W, plane = blockIdx.y;
  const T* kb = k + plane * C * HW;
  const T* vb = v + plane * CV * HW;

  const int64_t p0 = int64_t(tl.row_ok ? tl.row : 0) * W;
  const int c0 = tl.col(0, W), c1 = tl.col(1, W);
  unsigned qa[C / Ops::kK][4], da[CV / Ops::kK][4];
  Ops::template load_q<C>(qa, q + plane * C * HW, HW, p0, c0, c1, t);
  Ops::template load_q<CV>(da, dy + plane * CV * HW, HW, p0, c0, c1, t);
  const float l2[2] = {L2[plane * HW + p0 + c0], L2[plane * HW + p0 + c1]};
  const float dd[2] = {D[plane * HW + p0 + c0], D[plane * HW + p0 + c1]};

  const float sl2 = scale * 1.4426950408889634f;
  float acc[C / 8][4] = {};
  auto stage = [&](int grow, int slot) {
    stage_row(ks, kb, C, H, W, grow, tl.col0, tl.NK, slot);
    stage_row(vs, vb, CV, H, W, grow, tl.col0, tl.NK, slot);
  };
  walk_window_rows(tl, H, ws, stage, [&](int slot) {
    const T* kr = ks + slot * C * rs;
    const T* vr = vs + slot * CV * rs;
    for (int c = 0; c < tl.nc; ++c) {
      float s[2][4] = {}, dp[2][4] = {}, ds[2][4];
      Ops::template scores<C>(s, qa, kr, rs, c, tl.lane);
      Ops::template scores<CV>(dp, da, vr, rs, c, tl.lane);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = tl.in_window(16 * c + 8 * n + 2 * t + (e & 1), e >> 1, ws)
                              ? exp2f(s[n][e] * sl2 - l2[e >> 1]) : 0.f;
          ds[n][e] = p * (dp[n][e] - dd[e >> 1]);
        }
      Ops::template accumulate<C>(acc, ds, kr, rs, c, tl.lane);
    }
  });
  if (!tl.row_ok) return;
  const float f[2] = {scale, scale};
  store_tile<T, C>(dq + plane * C * HW, acc, f, HW, tl.row, W, tl.j0, tl.jt, g, t);
#endif
}

// dk = scale * sum of dS^T q and dv = sum of P^T dy over the queries whose windows hold the key: a
// warp owns 16 keys, and by the window's symmetry its halo rows of q, dy, L2 and D are the forward's
// rows and columns with the same band.
template <typename Ops, int C, int CV, typename T = typename Ops::Elem>
__global__ void __launch_bounds__(kMmaThreads)
    attn_bwd_dkdv_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const T* __restrict__ dy, const float* __restrict__ L2, const float* __restrict__ D,
                             T* __restrict__ dk, T* __restrict__ dv, int H, int W, int ws, int tiles_j, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile tl(H, ws, tiles_j);
  const int rs = tl.rs, g = tl.g, t = tl.t;
  T* qs = reinterpret_cast<T*>(smem);
  T* ds_ring = qs + kSlots * C * rs;
  float* l2s = reinterpret_cast<float*>(ds_ring + kSlots * CV * rs);
  float* dds = l2s + kSlots * rs;
  const int64_t HW = int64_t(H) * W, plane = blockIdx.y;
  const T* qb = q + plane * C * HW;
  const T* dyb = dy + plane * CV * HW;

  const int64_t p0 = int64_t(tl.row_ok ? tl.row : 0) * W;
  const int c0 = tl.col(0, W), c1 = tl.col(1, W);
  unsigned ka[C / Ops::kK][4], va[CV / Ops::kK][4];
  Ops::template load_q<C>(ka, k + plane * C * HW, HW, p0, c0, c1, t);
  Ops::template load_q<CV>(va, v + plane * CV * HW, HW, p0, c0, c1, t);

  const float sl2 = scale * 1.4426950408889634f;
  float dka[C / 8][4] = {}, dva[CV / 8][4] = {};
  auto stage = [&](int grow, int slot) {
    stage_row(qs, qb, C, H, W, grow, tl.col0, tl.NK, slot);
    stage_row(ds_ring, dyb, CV, H, W, grow, tl.col0, tl.NK, slot);
    stage_row(l2s, L2 + plane * HW, 1, H, W, grow, tl.col0, tl.NK, slot);
    stage_row(dds, D + plane * HW, 1, H, W, grow, tl.col0, tl.NK, slot);
  };
  walk_window_rows(tl, H, ws, stage, [&](int slot) {
    const T* qr = qs + slot * C * rs;
    const T* dyr = ds_ring + slot * CV * rs;
    const float* l2r = l2s + slot * rs;
    const float* ddr = dds + slot * rs;
    for (int c = 0; c < tl.nc; ++c) {
      float st[2][4] = {}, dpt[2][4] = {}, pt[2][4], dst[2][4];
      Ops::template scores<C>(st, ka, qr, rs, c, tl.lane);
      Ops::template scores<CV>(dpt, va, dyr, rs, c, tl.lane);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = 16 * c + 8 * n + 2 * t + (e & 1);  // the query's halo column
          pt[n][e] = tl.in_window(h, e >> 1, ws) ? exp2f(st[n][e] * sl2 - l2r[h]) : 0.f;
          dst[n][e] = pt[n][e] * (dpt[n][e] - ddr[h]);
        }
      Ops::template accumulate<CV>(dva, pt, dyr, rs, c, tl.lane);
      Ops::template accumulate<C>(dka, dst, qr, rs, c, tl.lane);
    }
  });
  if (!tl.row_ok) return;
  const float fk[2] = {scale, scale}, fv[2] = {1.f, 1.f};
  store_tile<T, C>(dk + plane * C * HW, dka, fk, HW, tl.row, W, tl.j0, tl.jt, g, t);
  store_tile<T, CV>(dv + plane * CV * HW, dva, fv, HW, tl.row, W, tl.j0, tl.jt, g, t);
#endif
}

template <typename T>
const T* in(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* out(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// Launches one of the kernels above over q's (B, G, C, H, W) planes in tiles of kWarps x 16 pixels.
template <typename Kernel, typename... Args>
void launch_tiles(Kernel kernel, int smem, const at::Tensor& q, int ws, double scale, Args... args) {
  const int B = int(q.size(0) * q.size(1)), H = int(q.size(3)), W = int(q.size(4));
  const int tiles_i = (H + kWarps - 1) / kWarps, tiles_j = (W + 15) / 16;
  allow_smem(kernel, smem);
  const dim3 grid(unsigned(tiles_i * tiles_j), unsigned(B));
  kernel<<<grid, kMmaThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args..., H, W, ws, tiles_j, float(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool tf32_allowed() { return at::globalContext().allowTF32CuBLAS(); }

// fn(Ops{}, std::integral_constant<int, C>{}) for q's dtype (float32: TF32 when allowed, else split) and
// head size C.
template <typename Fn>
void dispatch(const at::Tensor& q, const Fn& fn) {
  auto heads = [&](auto ops) {
    switch (q.size(2)) {
      case 16: return fn(ops, std::integral_constant<int, 16>{});
      case 32: return fn(ops, std::integral_constant<int, 32>{});
      case 64: return fn(ops, std::integral_constant<int, 64>{});
      default:
        if constexpr (!std::is_same_v<typename decltype(ops)::Elem, float>)  // float32 takes heads of at most 64
          return fn(ops, std::integral_constant<int, 128>{});
    }
  };
  switch (q.scalar_type()) {
    case at::kBFloat16: return heads(HalfMma<at::BFloat16>{});
    case at::kHalf: return heads(HalfMma<at::Half>{});
    default: return tf32_allowed() ? heads(Tf32Mma<false>{}) : heads(Tf32Mma<true>{});
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

bool attention_uses_tensor_cores(const at::Tensor& q, const at::Tensor& v, int64_t window, bool distance) {
  const auto st = q.scalar_type();
  const int64_t C = q.size(2), W = q.size(4);
  if (!tensor_cores_enabled() || distance || !(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat))
    return false;
  if (v.size(2) != C || (C != 16 && C != 32 && C != 64 && C != 128) || W % 8 != 0) return false;
  if (st == at::kFloat && C > 64) return false;  // 128 channels of float32 fragments spill the dk/dv kernel
  if (chunks_for(int(window)) > kMaxChunks) return false;
  const SmLimits d = sm_limits();
  if (dkdv_smem_bytes(int(C), int(C), int(window), int(q.element_size())) > d.smem_per_block) return false;
  return d.major >= 8;
}

// q, k, v contiguous (B, G, C, H, W) with attention_uses_tensor_cores true; k and v 16-byte aligned
// (checked here: the caller's copies are fresh allocations, a view may not be).
bool attention_forward_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& y,
                           at::Tensor& lse, int64_t window, double scale) {
  if (!aligned16(k) || !aligned16(v)) return false;
  const int ws = int(window);
  dispatch(q, [&](auto ops, auto heads) {
    using Ops = decltype(ops);
    using T = typename Ops::Elem;
    constexpr int C = decltype(heads)::value;
    launch_tiles(attn_fwd_mma_kernel<Ops, C, C>, mma_smem_bytes(C, C, ws, int(sizeof(T))), q, ws, scale, in<T>(q),
                 in<T>(k), in<T>(v), out<T>(y), lse.data_ptr<float>());
  });
  return true;
}

// The same inputs as the forward, plus dy and the float32 row terms L2 = log2e lse and D = dy . y
// (B, G, H, W); q, k, v and dy 16-byte aligned (checked here).
bool attention_backward_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dy,
                            const at::Tensor& L2, const at::Tensor& D, at::Tensor& dq, at::Tensor& dk,
                            at::Tensor& dv, int64_t window, double scale) {
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(dy)) return false;
  const int ws = int(window);
  dispatch(q, [&](auto ops, auto heads) {
    using Ops = decltype(ops);
    using T = typename Ops::Elem;
    constexpr int C = decltype(heads)::value;
    const float* l2 = L2.data_ptr<float>();
    const float* d = D.data_ptr<float>();
    launch_tiles(attn_bwd_dq_mma_kernel<Ops, C, C>, mma_smem_bytes(C, C, ws, int(sizeof(T))), q, ws, scale, in<T>(q),
                 in<T>(k), in<T>(v), in<T>(dy), l2, d, out<T>(dq));
    launch_tiles(attn_bwd_dkdv_mma_kernel<Ops, C, C>, dkdv_smem_bytes(C, C, ws, int(sizeof(T))), q, ws, scale,
                 in<T>(q), in<T>(k), in<T>(v), in<T>(dy), l2, d, out<T>(dk), out<T>(dv));
  });
  return true;
}

void set_tensor_cores(bool on) { tensor_cores_enabled() = on; }

}  // namespace circatt
