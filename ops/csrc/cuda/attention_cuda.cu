// Fused circulant attention: forward with an online softmax (the (B, G, H, W, K) weights are never
// written), backward that recomputes the weights from q, k and the saved log-sum-exp.
//
// Distance similarity is handled as q.k - |k|^2/2 inside the kernels: the -|q|^2/2 term is
// constant along a softmax row, so it only shifts the log-sum-exp, which is corrected on output
// (forward) and folded into the per-row terms (backward).
#include <ATen/Dispatch.h>

#include <vector>

#include "common.cuh"

namespace circatt {

// The tensor-core kernels (attention_mma.cu): dot attention of some head sizes in float16, bfloat16,
// and float32 as TF32 when allowed.
bool attention_uses_tensor_cores(const at::Tensor& q, const at::Tensor& v, int64_t window, bool distance);
bool attention_forward_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& y,
                           at::Tensor& lse, int64_t window, double scale);
bool attention_backward_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dy,
                            const at::Tensor& L2, const at::Tensor& D, at::Tensor& dq, at::Tensor& dk,
                            at::Tensor& dv, int64_t window, double scale);

template <typename A> __host__ __device__ constexpr A log2e() { return A(1.4426950408889634); }
template <typename A> __host__ __device__ constexpr A ln2() { return A(0.6931471805599453); }

// The key and value rings of the query-centric kernels (forward, dq): per halo row, k and v over
// all their channels and, for distance (dist), |k|^2. Halo row rr is image row i0 - r + rr
// (wrapped), kept in ring slot rr mod (TI + 1).
template <typename T, typename A>
struct KvRings {
  A* ks;
  A* vs;
  A* kn;
  const T* kb;
  const T* vb;
  const A* knb;
  int C, Cv, i0;
  const int* cmap;
  bool dist;

  // Halo row rr into its slot (asynchronous for float and double: lands at cp_async_wait()).
  __device__ __forceinline__ void stage(const Geom& g, int rr) const {
    const int grow = wrap(i0 - g.r + rr, g.H), slot = rr % g.nslots;
    stage_ring_row(ks, kb, C, g, grow, slot, cmap);
    stage_ring_row(vs, vb, Cv, g, grow, slot, cmap);
    if (dist) stage_ring_scalar(kn, knb, g, grow, slot, cmap);
  }

  // The rows of window row 0 (halo rows 0 .. TI-1), landed and visible to the block. Called by
  // all threads once cmap is written (halo_columns): the first barrier publishes it.
  __device__ __forceinline__ void prime(const Geom& g) const {
    __syncthreads();
    for (int rr = 0; rr < g.TI; ++rr) stage(g, rr);
    cp_async_wait();
    __syncthreads();
  }
};

// ---------------------------------------------------------------- forward

struct FwdSmem {
  int q, k, v, kn, qn, buf, m, l, al, cmap, bytes;
};

template <typename A>
__host__ __device__ FwdSmem fwd_smem(const Geom& g, int C, int Cv, bool dist, int splits) {
  Bump b;
  FwdSmem s;
  s.q = b.take((long long)C * g.npix * sizeof(A));
  s.k = b.take((long long)(C > 0 ? C : 1) * g.ps * sizeof(A));
  s.v = b.take((long long)(Cv > 0 ? Cv : 1) * g.ps * sizeof(A));
  s.kn = b.take(dist ? (long long)g.nslots * g.rs * sizeof(A) : 0);
  s.qn = b.take(dist ? (long long)g.npix * sizeof(A) : 0);
  s.buf = b.take((long long)splits * g.part * sizeof(A));
  s.m = b.take((long long)g.npix * sizeof(A));
  s.l = b.take((long long)g.npix * sizeof(A));
  s.al = b.take((long long)g.npix * sizeof(A));
  s.cmap = b.take((long long)g.cols * sizeof(int));
  s.bytes = b.bytes;
  return s;
}

// Per window row: logits of the tile's pixels (dot loop, its channel parts added by the softmax
// warps), an online-softmax update by a warp per pixel (running max m, running sum l, rescale
// factor for the accumulators), then
// rescaling and accumulation of P . v over the v ring. At the end y = acc / l and
// lse = ln2 * (m + log2 l) (log2 domain inside).
template <typename T, int RC>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const acc_t<T>* __restrict__ knorm, T* __restrict__ y, acc_t<T>* __restrict__ lse, int C, int Cv,
                    int NG, Geom g, bool dist, acc_t<T> scale, int splits) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const FwdSmem lay = fwd_smem<A>(g, C, Cv, dist, splits);
  A* qs = reinterpret_cast<A*>(smem + lay.q);
  A* ks = reinterpret_cast<A*>(smem + lay.k);
  A* vs = reinterpret_cast<A*>(smem + lay.v);
  A* kn = dist ? reinterpret_cast<A*>(smem + lay.kn) : nullptr;
  A* qn = reinterpret_cast<A*>(smem + lay.qn);
  A* buf = reinterpret_cast<A*>(smem + lay.buf);
  A* ms = reinterpret_cast<A*>(smem + lay.m);
  A* ls = reinterpret_cast<A*>(smem + lay.l);
  A* als = reinterpret_cast<A*>(smem + lay.al);
  int* cmap = reinterpret_cast<int*>(smem + lay.cmap);

  int i0, j0;
  tile_origin(g, i0, j0);
  const int64_t HW = int64_t(g.H) * g.W;
  const int64_t plane = blockIdx.y;
  const T* qb = q + plane * C * HW;
  const T* kb = k + plane * C * HW;
  const T* vb = v + plane * Cv * HW;
  const A* knb = dist ? knorm + plane * HW : nullptr;
  T* yb = y + plane * Cv * HW;
  A* lb = lse + plane * HW;
  const A sl2 = scale * log2e<A>();

  const int part = g.part;
  for (int idx = threadIdx.x; idx < splits * part; idx += blockDim.x) buf[idx] = A(0);
  for (int p = threadIdx.x; p < g.npix; p += blockDim.x) {
    ms[p] = -INFINITY;
    ls[p] = A(0);
  }
  halo_columns(cmap, g, j0);
  stage_tile(qs, qb, C, g, i0, j0);
  if (dist) tile_norms(qn, qb, C, g, i0, j0);
  const KvRings<T, A> rings{ks, vs, kn, kb, vb, knb, C, Cv, i0, cmap, dist};
  rings.prime(g);

  const auto [owner, jg, grp, ti] = accum_thread(g, NG);
  A acc[kRJ][RC] = {};

  for (int a = 0; a < g.ws; ++a) {
    if (a + 1 < g.ws) rings.stage(g, a + g.TI);
    dot_split(buf, splits, qs, C, ks, kn, g, a);
    __syncthreads();
    for (int p = warp_id(); p < g.npix; p += num_warps()) {
      A* row = buf + p * g.L + (kRJ - 1);
      A mx = -INFINITY;
      for (int c = lane_id(); c < g.ws; c += 32) {
        row[c] = sum_parts(row + c, part, splits);
        const A s = row[c] * sl2;
        mx = s > mx ? s : mx;
      }
      mx = warp_max(mx);
      const A m_old = ms[p];
      const A m_new = m_old > mx ? m_old : mx;
      A sum = A(0);
      for (int c = lane_id(); c < g.ws; c += 32) {
        const A e = ex2(row[c] * sl2 - m_new);
        row[c] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane_id() == 0) {
        const A al = ex2(m_old - m_new);
        als[p] = al;
        ls[p] = ls[p] * al + sum;
        ms[p] = m_new;
      }
    }
    __syncthreads();
    if (owner) {
#pragma unroll
      for (int p = 0; p < kRJ; ++p) {
        const A al = als[ti * g.TJ + jg * kRJ + p];
#pragma unroll
        for (int rc = 0; rc < RC; ++rc) acc[p][rc] *= al;
      }
      accumulate<RC>(acc, buf, vs, Cv, grp, NG, g, ti, jg, a);
    }
    cp_async_wait();
    __syncthreads();
  }

  if (owner && i0 + ti < g.H) {
#pragma unroll
    for (int p = 0; p < kRJ; ++p) {
      const int jj = jg * kRJ + p;
      if (j0 + jj >= g.W) continue;
      const A inv = A(1) / ls[ti * g.TJ + jj];
#pragma unroll
      for (int rc = 0; rc < RC; ++rc) {
        const int ch = grp + NG * rc;
        if (ch < Cv) yb[ch * HW + int64_t(i0 + ti) * g.W + (j0 + jj)] = static_cast<T>(acc[p][rc] * inv);
      }
    }
  }
  for (int p = threadIdx.x; p < g.npix; p += blockDim.x) {
    const int i = p / g.TJ, jj = p - i * g.TJ;
    if (i0 + i >= g.H || j0 + jj >= g.W) continue;
    A out = (ms[p] + lg2(ls[p])) * ln2<A>();
    if (dist) out -= A(0.5) * scale * qn[p];
    lb[int64_t(i0 + i) * g.W + (j0 + jj)] = out;
  }
}

// ---------------------------------------------------------------- backward

// Per query pixel: D = dy . y and the log2-domain row offset L2 = log2e * lse (+ scale |q|^2 / 2
// for distance, matching the q.k - |k|^2/2 logits the kernels recompute).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rowterms_kernel(const T* __restrict__ q, const T* __restrict__ y, const T* __restrict__ dy,
                    const acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ L2, acc_t<T>* __restrict__ D, int C,
                    int Cv, int64_t HW, int64_t total, bool dist, acc_t<T> scale) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / HW, n = idx - plane * HW;
    A d = A(0);
    const T* yp = y + plane * Cv * HW + n;
    const T* dyp = dy + plane * Cv * HW + n;
#pragma unroll 8  // eight load pairs in flight: a thread a pixel is latency-bound on this loop
    for (int c = 0; c < Cv; ++c) d += static_cast<A>(dyp[c * HW]) * static_cast<A>(yp[c * HW]);
    A l2 = lse[idx] * log2e<A>();
    if (dist) {
      const T* qp = q + plane * C * HW + n;
      A nq = A(0);
#pragma unroll 8
      for (int c = 0; c < C; ++c) {
        const A t = static_cast<A>(qp[c * HW]);
        nq += t * t;
      }
      l2 += A(0.5) * scale * log2e<A>() * nq;
    }
    L2[idx] = l2;
    D[idx] = d;
  }
}

struct DqSmem {
  int q, dy, k, v, kn, bs, bp, l2, d, rsum, cmap, bytes;
};

template <typename A>
__host__ __device__ DqSmem dq_smem(const Geom& g, int C, int Cv, bool dist, int splits) {
  Bump b;
  DqSmem s;
  s.q = b.take((long long)C * g.npix * sizeof(A));
  s.dy = b.take((long long)Cv * g.npix * sizeof(A));
  s.k = b.take((long long)(C > 0 ? C : 1) * g.ps * sizeof(A));
  s.v = b.take((long long)(Cv > 0 ? Cv : 1) * g.ps * sizeof(A));
  s.kn = b.take(dist ? (long long)g.nslots * g.rs * sizeof(A) : 0);
  s.bs = b.take((long long)splits * g.part * sizeof(A));
  s.bp = b.take((long long)splits * g.part * sizeof(A));
  s.l2 = b.take((long long)g.npix * sizeof(A));
  s.d = b.take((long long)g.npix * sizeof(A));
  s.rsum = b.take((long long)g.npix * sizeof(A));
  s.cmap = b.take((long long)g.cols * sizeof(int));
  s.bytes = b.bytes;
  return s;
}

// Query-centric pass: for each query pixel n of the tile and each window row,
// S = q_n . k_m (- |k_m|^2/2), dP = dy_n . v_m (two dot loops), then
// dS = exp2(sl2 * S - L2_n) * (dP - D_n), accumulated against the k ring into dq;
// dq = scale * (sum dS k  [- rowsum(dS) q_n for distance]).
template <typename T, int RC>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dy, const acc_t<T>* __restrict__ knorm, const acc_t<T>* __restrict__ L2,
                       const acc_t<T>* __restrict__ D, T* __restrict__ dq, int C, int Cv, int NG, Geom g, bool dist,
                       acc_t<T> scale, int splits) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const DqSmem lay = dq_smem<A>(g, C, Cv, dist, splits);
  A* qs = reinterpret_cast<A*>(smem + lay.q);
  A* dys = reinterpret_cast<A*>(smem + lay.dy);
  A* ks = reinterpret_cast<A*>(smem + lay.k);
  A* vs = reinterpret_cast<A*>(smem + lay.v);
  A* kn = dist ? reinterpret_cast<A*>(smem + lay.kn) : nullptr;
  A* bs = reinterpret_cast<A*>(smem + lay.bs);
  A* bp = reinterpret_cast<A*>(smem + lay.bp);
  A* l2s = reinterpret_cast<A*>(smem + lay.l2);
  A* ds = reinterpret_cast<A*>(smem + lay.d);
  A* rsum = reinterpret_cast<A*>(smem + lay.rsum);
  int* cmap = reinterpret_cast<int*>(smem + lay.cmap);

  int i0, j0;
  tile_origin(g, i0, j0);
  const int64_t HW = int64_t(g.H) * g.W;
  const int64_t plane = blockIdx.y;
  const T* qb = q + plane * C * HW;
  const T* kb = k + plane * C * HW;
  const T* vb = v + plane * Cv * HW;
  const T* dyb = dy + plane * Cv * HW;
  const A* knb = dist ? knorm + plane * HW : nullptr;
  T* dqb = dq + plane * C * HW;
  const A sl2 = scale * log2e<A>();

  for (int idx = threadIdx.x; idx < splits * g.part; idx += blockDim.x) bs[idx] = A(0);
  for (int p = threadIdx.x; p < g.npix; p += blockDim.x) {
    const int i = p / g.TJ, jj = p - i * g.TJ;
    const int64_t n = plane * HW + int64_t(wrap(i0 + i, g.H)) * g.W + wrap(j0 + jj, g.W);
    l2s[p] = L2[n];
    ds[p] = D[n];
    rsum[p] = A(0);
  }
  halo_columns(cmap, g, j0);
  stage_tile(qs, qb, C, g, i0, j0);
  stage_tile(dys, dyb, Cv, g, i0, j0);
  const KvRings<T, A> rings{ks, vs, kn, kb, vb, knb, C, Cv, i0, cmap, dist};
  rings.prime(g);

  const auto [owner, jg, grp, ti] = accum_thread(g, NG);
  A acc[kRJ][RC] = {};

  for (int a = 0; a < g.ws; ++a) {
    if (a + 1 < g.ws) rings.stage(g, a + g.TI);
    dot_split_pair(bs, qs, C, ks, kn, bp, dys, Cv, vs, splits, g, a);
    __syncthreads();
    for (int p = warp_id(); p < g.npix; p += num_warps()) {
      A* srow = bs + p * g.L + (kRJ - 1);
      const A* prow = bp + p * g.L + (kRJ - 1);
      const A l2 = l2s[p], d = ds[p];
      A sum = A(0);
      for (int c = lane_id(); c < g.ws; c += 32) {
        const A P = ex2(sum_parts(srow + c, g.part, splits) * sl2 - l2);
        const A dS = P * (sum_parts(prow + c, g.part, splits) - d);
        srow[c] = dS;
        sum += dS;
      }
      if (dist) {
        sum = warp_sum(sum);
        if (lane_id() == 0) rsum[p] += sum;
      }
    }
    __syncthreads();
    if (owner) accumulate<RC>(acc, bs, ks, C, grp, NG, g, ti, jg, a);
    cp_async_wait();
    __syncthreads();
  }

  if (owner && i0 + ti < g.H) {
#pragma unroll
    for (int p = 0; p < kRJ; ++p) {
      const int jj = jg * kRJ + p;
      if (j0 + jj >= g.W) continue;
      const int pix = ti * g.TJ + jj;
#pragma unroll
      for (int rc = 0; rc < RC; ++rc) {
        const int ch = grp + NG * rc;
        if (ch >= C) continue;
        A val = acc[p][rc];
        if (dist) val -= rsum[pix] * qs[ch * g.npix + pix];
        dqb[ch * HW + int64_t(i0 + ti) * g.W + (j0 + jj)] = static_cast<T>(scale * val);
      }
    }
  }
}

struct DkvSmem {
  int k, v, q, dy, l2, d, bs, bp, kn, csum, cmap, bytes;
};

template <typename A>
__host__ __device__ DkvSmem dkv_smem(const Geom& g, int C, int Cv, bool dist, int splits) {
  Bump b;
  DkvSmem s;
  s.k = b.take((long long)C * g.npix * sizeof(A));
  s.v = b.take((long long)Cv * g.npix * sizeof(A));
  s.q = b.take((long long)(C > 0 ? C : 1) * g.ps * sizeof(A));
  s.dy = b.take((long long)(Cv > 0 ? Cv : 1) * g.ps * sizeof(A));
  s.l2 = b.take((long long)g.nslots * g.rs * sizeof(A));
  s.d = b.take((long long)g.nslots * g.rs * sizeof(A));
  s.bs = b.take((long long)splits * g.part * sizeof(A));
  s.bp = b.take((long long)splits * g.part * sizeof(A));
  s.kn = b.take(dist ? (long long)g.npix * sizeof(A) : 0);
  s.csum = b.take((long long)g.npix * sizeof(A));
  s.cmap = b.take((long long)g.cols * sizeof(int));
  s.bytes = b.bytes;
  return s;
}

// Key-centric pass: the tile holds key pixels m; the queries whose windows contain m are
// n = m + (a-r, c-r) over the same window offsets, so the halo rings hold q, dy, L2 and D of
// those queries. Per window row: S = k_m . q_n, dP = v_m . dy_n, P = exp2(sl2 (S - |k_m|^2/2)
// - L2_n), dS = P (dP - D_n); dk += dS q_n, dv += P dy_n.
// dk = scale * (sum dS q  [- colsum(dS) k_m for distance]), dv = sum P dy.
template <typename T, int RC>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dy, const acc_t<T>* __restrict__ L2, const acc_t<T>* __restrict__ D,
                         T* __restrict__ dk, T* __restrict__ dv, int C, int Cv, int NG, Geom g, bool dist,
                         acc_t<T> scale, int splits) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const DkvSmem lay = dkv_smem<A>(g, C, Cv, dist, splits);
  A* ks = reinterpret_cast<A*>(smem + lay.k);
  A* vs = reinterpret_cast<A*>(smem + lay.v);
  A* qr = reinterpret_cast<A*>(smem + lay.q);
  A* dyr = reinterpret_cast<A*>(smem + lay.dy);
  A* l2r = reinterpret_cast<A*>(smem + lay.l2);
  A* dr = reinterpret_cast<A*>(smem + lay.d);
  A* bs = reinterpret_cast<A*>(smem + lay.bs);
  A* bp = reinterpret_cast<A*>(smem + lay.bp);
  A* kn = reinterpret_cast<A*>(smem + lay.kn);
  A* csum = reinterpret_cast<A*>(smem + lay.csum);
  int* cmap = reinterpret_cast<int*>(smem + lay.cmap);

  int i0, j0;
  tile_origin(g, i0, j0);
  const int64_t HW = int64_t(g.H) * g.W;
  const int64_t plane = blockIdx.y;
  const T* qb = q + plane * C * HW;
  const T* kb = k + plane * C * HW;
  const T* vb = v + plane * Cv * HW;
  const T* dyb = dy + plane * Cv * HW;
  const A* l2b = L2 + plane * HW;
  const A* db = D + plane * HW;
  T* dkb = dk + plane * C * HW;
  T* dvb = dv + plane * Cv * HW;
  const A sl2 = scale * log2e<A>();

  for (int idx = threadIdx.x; idx < splits * g.part; idx += blockDim.x) {
    bs[idx] = A(0);
    bp[idx] = A(0);
  }
  for (int p = threadIdx.x; p < g.npix; p += blockDim.x) csum[p] = A(0);
  halo_columns(cmap, g, j0);
  stage_tile(ks, kb, C, g, i0, j0);
  stage_tile(vs, vb, Cv, g, i0, j0);
  if (dist) tile_norms(kn, kb, C, g, i0, j0);
  __syncthreads();
  auto stage_row = [&](int rr) {
    const int grow = wrap(i0 - g.r + rr, g.H), slot = rr % g.nslots;
    stage_ring_row(qr, qb, C, g, grow, slot, cmap);
    stage_ring_row(dyr, dyb, Cv, g, grow, slot, cmap);
    stage_ring_scalar(l2r, l2b, g, grow, slot, cmap);
    stage_ring_scalar(dr, db, g, grow, slot, cmap);
  };
  for (int rr = 0; rr < g.TI; ++rr) stage_row(rr);
  cp_async_wait();
  __syncthreads();

  const auto [owner, jg, grp, ti] = accum_thread(g, NG);
  A acck[kRJ][RC] = {}, accv[kRJ][RC] = {};

  for (int a = 0; a < g.ws; ++a) {
    if (a + 1 < g.ws) stage_row(a + g.TI);
    dot_split_pair(bs, ks, C, qr, static_cast<const A*>(nullptr), bp, vs, Cv, dyr, splits, g, a);
    __syncthreads();
    for (int p = warp_id(); p < g.npix; p += num_warps()) {
      const int i = p / g.TJ, jj = p - i * g.TJ;
      const int off = ((i + a) % g.nslots) * g.rs + jj;
      const A* l2row = l2r + off;
      const A* drow = dr + off;
      A* srow = bs + p * g.L + (kRJ - 1);
      A* prow = bp + p * g.L + (kRJ - 1);
      const A sub = dist ? A(0.5) * kn[p] : A(0);
      A sum = A(0);
      for (int c = lane_id(); c < g.ws; c += 32) {
        const A P = ex2((sum_parts(srow + c, g.part, splits) - sub) * sl2 - l2row[c]);
        const A dS = P * (sum_parts(prow + c, g.part, splits) - drow[c]);
        srow[c] = dS;
        prow[c] = P;
        sum += dS;
      }
      if (dist) {
        sum = warp_sum(sum);
        if (lane_id() == 0) csum[p] += sum;
      }
    }
    __syncthreads();
    if (owner) {
      if (grp < C) accumulate<RC>(acck, bs, qr, C, grp, NG, g, ti, jg, a);
      if (grp < Cv) accumulate<RC>(accv, bp, dyr, Cv, grp, NG, g, ti, jg, a);
    }
    cp_async_wait();
    __syncthreads();
  }

  if (owner && i0 + ti < g.H) {
#pragma unroll
    for (int p = 0; p < kRJ; ++p) {
      const int jj = jg * kRJ + p;
      if (j0 + jj >= g.W) continue;
      const int pix = ti * g.TJ + jj;
      const int64_t at = int64_t(i0 + ti) * g.W + (j0 + jj);
#pragma unroll
      for (int rc = 0; rc < RC; ++rc) {
        const int ch = grp + NG * rc;
        if (ch < C) {
          A val = acck[p][rc];
          if (dist) val -= csum[pix] * ks[ch * g.npix + pix];
          dkb[ch * HW + at] = static_cast<T>(scale * val);
        }
        if (ch < Cv) dvb[ch * HW + at] = static_cast<T>(accv[p][rc]);
      }
    }
  }
}

// ---------------------------------------------------------------- host entry points

namespace {

struct AttnShape {
  int64_t B, G, C, Cv, H, W;
};

AttnShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
  check_real_cuda(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_dims(q, "q", 5, "(B, heads, C, H, W)");
  check_dims(v, "v", 5, "(B, heads, Cv, H, W)");
  TORCH_CHECK(q.sizes() == k.sizes(), "circatt cuda: attention needs q and k of one shape, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(3) == q.size(3) && v.size(4) == q.size(4),
              "circatt cuda: v must match q in batch, heads, H and W, got ", v.sizes(), " for q ", q.sizes());
  AttnShape s{q.size(0), q.size(1), q.size(2), v.size(2), q.size(3), q.size(4)};
  check_window(window, s.H, s.W);
  check_planes(s.B * s.G, 1);
  return s;
}

at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

int groups_for(int64_t channels, int RC) { return int((channels + RC - 1) / RC); }

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                          int64_t window, bool distance, double scale) {
  const AttnShape s = check_attention(q_, k_, v_, window);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor y = new_output(v.sizes(), v.options());
  at::Tensor lse = new_output({s.B, s.G, s.H, s.W}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (lse.numel() == 0) return {y, lse};
  if (attention_uses_tensor_cores(q, v, window, distance) && attention_forward_mma(q, k, v, y, lse, window, scale))
    return {y, lse};
  const int ws = int(window);
  const at::Tensor knorm = distance ? pixel_norms(k) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "circatt_attention_forward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int RC = AccumChannels<scalar_t>::value;
    const int NG = groups_for(s.Cv, RC);
    auto kernel = attn_fwd_kernel<scalar_t, RC>;
    const Launch l = choose_launch(
        int(s.H), int(s.W), ws, s.B * s.G, NG, 1, max_dot_splits(s.C), kernel_registers(kernel),
        [&](const Geom& g, int splits) { return fwd_smem<A>(g, int(s.C), int(s.Cv), distance, splits).bytes; },
        "attention_forward");
    allow_smem(kernel, l.smem);
    const dim3 grid(unsigned(l.tiles), unsigned(s.B * s.G));
    kernel<<<grid, l.threads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        distance ? knorm.data_ptr<A>() : nullptr, y.data_ptr<scalar_t>(), lse.data_ptr<A>(), int(s.C), int(s.Cv), NG,
        l.g, distance, A(scale), l.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, lse};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                           const at::Tensor& y_, const at::Tensor& lse_, const at::Tensor& dy_,
                                           int64_t window, bool distance, double scale) {
  const AttnShape s = check_attention(q_, k_, v_, window);
  check_like(y_, "y", v_, "v");
  check_like(dy_, "dy", v_, "v");
  TORCH_CHECK(y_.sizes() == v_.sizes() && dy_.sizes() == v_.sizes(),
              "circatt cuda: y and dy must have the shape of v ", v_.sizes(), ", got ", y_.sizes(), " and ",
              dy_.sizes());
  TORCH_CHECK(lse_.is_cuda() && lse_.device() == q_.device(), "circatt cuda: lse must be on ", q_.device());
  TORCH_CHECK(lse_.dim() == 4 && lse_.size(0) == s.B && lse_.size(1) == s.G && lse_.size(2) == s.H &&
                  lse_.size(3) == s.W,
              "circatt cuda: lse must have shape (", s.B, ", ", s.G, ", ", s.H, ", ", s.W, "), got ", lse_.sizes());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::ScalarType acc = acc_dtype(q_.scalar_type());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), y = y_.contiguous(),
                   dy = dy_.contiguous(), lse = lse_.to(acc).contiguous();
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  if (lse.numel() == 0) return {dq, dk, dv};
  const int ws = int(window);
  const int64_t HW = s.H * s.W, total = s.B * s.G * HW;
  at::Tensor L2 = at::empty({s.B, s.G, s.H, s.W}, q.options().dtype(acc));
  at::Tensor D = at::empty({s.B, s.G, s.H, s.W}, q.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor knorm = distance && dq.numel() > 0 ? pixel_norms(k) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "circatt_attention_backward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int RC = AccumChannels<scalar_t>::value;
    const int splits = max_dot_splits(std::min(s.C, s.Cv));  // S and dP share the parts
    {
      rowterms_kernel<scalar_t><<<grid_stride_blocks(total), kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), lse.data_ptr<A>(),
          L2.data_ptr<A>(), D.data_ptr<A>(), int(s.C), int(s.Cv), HW, total, distance, A(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (attention_uses_tensor_cores(q, v, window, distance) &&
        attention_backward_mma(q, k, v, dy, L2, D, dq, dk, dv, window, scale))
      return;
    if (dq.numel() > 0) {
      const int NG = groups_for(s.C, RC);
      auto kernel = attn_bwd_dq_kernel<scalar_t, RC>;
      const Launch l = choose_launch(
          int(s.H), int(s.W), ws, s.B * s.G, NG, 2, splits, kernel_registers(kernel),
          [&](const Geom& g, int parts) { return dq_smem<A>(g, int(s.C), int(s.Cv), distance, parts).bytes; },
          "attention_backward (dq)");
      allow_smem(kernel, l.smem);
      const dim3 grid(unsigned(l.tiles), unsigned(s.B * s.G));
      kernel<<<grid, l.threads, l.smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
          distance ? knorm.data_ptr<A>() : nullptr, L2.data_ptr<A>(), D.data_ptr<A>(), dq.data_ptr<scalar_t>(),
          int(s.C), int(s.Cv), NG, l.g, distance, A(scale), l.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (dk.numel() > 0 || dv.numel() > 0) {
      const int ngk = groups_for(s.C, RC), ngv = groups_for(s.Cv, RC);
      const int NG = ngk > ngv ? ngk : ngv;
      auto kernel = attn_bwd_dkdv_kernel<scalar_t, RC>;
      const Launch l = choose_launch(
          int(s.H), int(s.W), ws, s.B * s.G, NG, 2, splits, kernel_registers(kernel),
          [&](const Geom& g, int parts) { return dkv_smem<A>(g, int(s.C), int(s.Cv), distance, parts).bytes; },
          "attention_backward (dk, dv)");
      allow_smem(kernel, l.smem);
      const dim3 grid(unsigned(l.tiles), unsigned(s.B * s.G));
      kernel<<<grid, l.threads, l.smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
          L2.data_ptr<A>(), D.data_ptr<A>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), int(s.C),
          int(s.Cv), NG, l.g, distance, A(scale), l.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv};
}

}  // namespace circatt
