// Materialised circulant ops: the windowed similarity S (B, G, H, W, K) of two feature maps and
// the apply of such a weight tensor to a feature map, in both directions.
#include <ATen/Dispatch.h>

#include "common.cuh"

namespace circatt {

// ---------------------------------------------------------------- similarity

struct SimSmem {
  int q, k, kn, qn, buf, cmap, bytes;
};

template <typename A>
__host__ __device__ SimSmem sim_smem(const Geom& g, int C, bool dist, int splits) {
  Bump b;
  SimSmem s;
  s.q = b.take((long long)C * g.npix * sizeof(A));
  s.k = b.take((long long)(C > 0 ? C : 1) * g.ps * sizeof(A));
  s.kn = b.take(dist ? (long long)g.nslots * g.rs * sizeof(A) : 0);
  s.qn = b.take(dist ? (long long)g.npix * sizeof(A) : 0);
  s.buf = b.take((long long)splits * g.part * sizeof(A));
  s.cmap = b.take((long long)g.cols * sizeof(int));
  s.bytes = b.bytes;
  return s;
}

// S[p, a*ws + c] = q_p . k_{p + (a-r, c-r)}   (distance: -|q_p - k_.|^2 / 2, expanded as
// q.k - |q|^2/2 - |k|^2/2 with the norms taken once per pixel, those of k by pixel_norms).
// One window row per step; the step's (pixel, column) buffers (one per channel part) are added
// and written out by warps, one pixel's ws values at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    similarity_kernel(const T* __restrict__ q, const T* __restrict__ k, const acc_t<T>* __restrict__ knorm,
                      T* __restrict__ S, int C, Geom g, bool dist, int splits) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const SimSmem lay = sim_smem<A>(g, C, dist, splits);
  A* qs = reinterpret_cast<A*>(smem + lay.q);
  A* ks = reinterpret_cast<A*>(smem + lay.k);
  A* kn = dist ? reinterpret_cast<A*>(smem + lay.kn) : nullptr;
  A* qn = reinterpret_cast<A*>(smem + lay.qn);
  A* buf = reinterpret_cast<A*>(smem + lay.buf);
  int* cmap = reinterpret_cast<int*>(smem + lay.cmap);

  int i0, j0;
  tile_origin(g, i0, j0);
  const int64_t HW = int64_t(g.H) * g.W, K = int64_t(g.ws) * g.ws;
  const int64_t plane = blockIdx.y;
  const T* qb = q + plane * C * HW;
  const T* kb = k + plane * C * HW;
  const A* knb = dist ? knorm + plane * HW : nullptr;
  T* Sb = S + plane * HW * K;

  halo_columns(cmap, g, j0);
  stage_tile(qs, qb, C, g, i0, j0);
  if (dist) tile_norms(qn, qb, C, g, i0, j0);
  __syncthreads();
  auto stage_row = [&](int rr) {
    const int grow = wrap(i0 - g.r + rr, g.H), slot = rr % g.nslots;
    stage_ring_row(ks, kb, C, g, grow, slot, cmap);
    if (dist) stage_ring_scalar(kn, knb, g, grow, slot, cmap);
  };
  for (int rr = 0; rr < g.TI; ++rr) stage_row(rr);
  cp_async_wait();
  __syncthreads();

  for (int a = 0; a < g.ws; ++a) {
    if (a + 1 < g.ws) stage_row(a + g.TI);
    dot_split<true>(buf, splits, qs, C, ks, kn, g, a);
    __syncthreads();
    for (int p = warp_id(); p < g.npix; p += num_warps()) {
      const int i = p / g.TJ, jj = p - i * g.TJ;
      if (i0 + i >= g.H || j0 + jj >= g.W) continue;
      const A sub = dist ? A(0.5) * qn[p] : A(0);
      const A* src = buf + p * g.L + (kRJ - 1);
      T* dst = Sb + (int64_t(i0 + i) * g.W + (j0 + jj)) * K + int64_t(a) * g.ws;
      for (int c = lane_id(); c < g.ws; c += 32)
        dst[c] = static_cast<T>(sum_parts(src + c, g.part, splits) - sub);
    }
    cp_async_wait();
    __syncthreads();
  }
}

// ---------------------------------------------------------------- apply

struct ApplySmem {
  int x, buf, cmap, pix, bytes;
};

template <typename A>
__host__ __device__ ApplySmem apply_smem(const Geom& g, int CB) {
  Bump b;
  ApplySmem s;
  s.x = b.take((long long)(CB > 0 ? CB : 1) * g.ps * sizeof(A));
  s.buf = b.take(2LL * g.part * sizeof(A));
  s.cmap = b.take((long long)g.cols * sizeof(int));
  s.pix = b.take((long long)g.npix * sizeof(int));
  s.bytes = b.bytes;
  return s;
}

// pix[p] = the plane offset of tile pixel p (wrapped), so that staging a weight row costs no division.
__device__ __forceinline__ void tile_pixels(int* pix, const Geom& g, int i0, int j0) {
  for (int p = threadIdx.x; p < g.npix; p += blockDim.x) {
    const int i = p / g.TJ, jj = p - i * g.TJ;
    pix[p] = wrap(i0 + i, g.H) * g.W + wrap(j0 + jj, g.W);
  }
}

// Weights of window row a into the buffer: w_p(a, c) at apply_row(p) + c, see apply_kernel.
// Not transposed: the block walks the tile's (pixel, column) pairs in order, one element a thread,
// so that consecutive threads copy consecutive values and every lane has one. Transposed: position (i, u)
// is the source pixel (i0+i+a-r, halo column u); lanes walk the output columns jj, whose window
// column is cp = u - jj, i.e. the source's slot (ws-1-a, ws-1-cp): consecutive addresses.
template <typename T, typename A>
__device__ void stage_weights(A* __restrict__ buf, const T* __restrict__ Ab, const Geom& g, int i0, int j0, int a,
                              bool transposed, const int* __restrict__ cmap, const int* __restrict__ pix) {
  const int64_t K = int64_t(g.ws) * g.ws;
  if (!transposed) {
    const int step = blockDim.x, dp = step / g.ws, dc = step - dp * g.ws;
    int p = threadIdx.x / g.ws, c = threadIdx.x - p * g.ws;
    for (int idx = threadIdx.x; idx < g.npix * g.ws; idx += step) {
      put(buf + apply_row(g, p) + c, Ab + pix[p] * K + int64_t(a) * g.ws + c);
      p += dp;
      c += dc;
      if (c >= g.ws) {
        c -= g.ws;
        ++p;
      }
    }
  } else {
    const int per = 32 / g.TJ;
    const int slot_row = (g.ws - 1 - a) * g.ws + (g.ws - 1);
    const int npos = g.TI * g.cols;
    const int jj = lane_id() % g.TJ;
    for (int pos = warp_id() * per + lane_id() / g.TJ; pos < npos; pos += num_warps() * per) {
      const int i = pos / g.cols, u = pos - i * g.cols;
      const int cp = u - jj;
      if (cp < 0 || cp >= g.ws) continue;
      const int srow = wrap(i0 + i + a - g.r, g.H);
      put(buf + apply_row(g, i * g.TJ + jj) + cp, Ab + (int64_t(srow) * g.W + cmap[u]) * K + slot_row - cp);
    }
  }
}

// The apply's accumulate loop, one thread: pixels jj0 .. jj0+kAP-1 of tile row i, channels
// grp + rc*NG:  acc[p][rc] += sum_t row_p[t] * ring[ch][(i+a) mod (TI+1)][jj0 + t], where row_p is
// pixel p's buffer row (its weights shifted by p, zeros around them). Four offsets t a step, each
// operand from one 16-byte load: RC + kAP loads for 4 * kAP * RC FMAs.
template <int RC, typename A>
__device__ __forceinline__ void accumulate_apply(A (&acc)[kAP][RC], const A* __restrict__ rows,
                                                 const A* __restrict__ ring, int grp, int NG, const Geom& g, int i,
                                                 int jg, int a) {
  const A* xp = ring + grp * g.ps + ((i + a) % g.nslots) * g.rs + jg * kAP;
  const int cs = NG * g.ps;
#pragma unroll 2
  for (int t = 0; t < g.L; t += 4) {
    A xv[RC][4];
#pragma unroll
    for (int rc = 0; rc < RC; ++rc) load4<A>(xv[rc], xp + rc * cs + t);
#pragma unroll
    for (int p = 0; p < kAP; ++p) {
      A w[4];
      load4<A>(w, rows + p * g.L + t);
#pragma unroll
      for (int v = 0; v < 4; ++v)
#pragma unroll
        for (int rc = 0; rc < RC; ++rc) acc[p][rc] = fma(w[v], xv[rc][v], acc[p][rc]);
    }
  }
}

// y[ch, p] = sum_{a,c} w_p(a, c) * x[ch, p + (a-r, c-r)], where w_p(a, c) is
//   A[p, a, c]                                   (not transposed), or
//   A[p + (a-r, c-r), ws-1-a, ws-1-c]            (transposed: the rows whose window holds p).
// Per window row the weights sit in one of two buffers (the other receives the next row's
// weights meanwhile) and are accumulated against the x ring: one barrier per step. The ring and
// the buffers start zeroed: the zeros around each weight row, the ring columns past the halo and
// the channels past C (block z takes channels [z*NG*RC, (z+1)*NG*RC)) are never written after.
template <typename T, int RC>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ Aw, const T* __restrict__ x, T* __restrict__ y, int C, int NG, Geom g,
                 bool transposed) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int CB = NG * RC;
  const ApplySmem lay = apply_smem<A>(g, CB);
  A* xs = reinterpret_cast<A*>(smem + lay.x);
  A* bufs = reinterpret_cast<A*>(smem + lay.buf);
  int* cmap = reinterpret_cast<int*>(smem + lay.cmap);
  int* pix = reinterpret_cast<int*>(smem + lay.pix);

  int i0, j0;
  tile_origin(g, i0, j0);
  const int64_t HW = int64_t(g.H) * g.W, K = int64_t(g.ws) * g.ws;
  const int64_t plane = blockIdx.y;
  const int cb0 = blockIdx.z * CB;
  const int cbn = min(CB, C - cb0);
  const T* Ab = Aw + plane * HW * K;
  const T* xb = x + (plane * C + cb0) * HW;
  T* yb = y + (plane * C + cb0) * HW;
  const int bufsize = g.part;

  for (int idx = threadIdx.x; idx < CB * g.ps; idx += blockDim.x) xs[idx] = A(0);
  for (int idx = threadIdx.x; idx < 2 * bufsize; idx += blockDim.x) bufs[idx] = A(0);
  halo_columns(cmap, g, j0);
  tile_pixels(pix, g, i0, j0);
  __syncthreads();
  auto stage_row = [&](int rr) {
    stage_ring_row(xs, xb, cbn, g, wrap(i0 - g.r + rr, g.H), rr % g.nslots, cmap);
  };
  for (int rr = 0; rr < g.TI; ++rr) stage_row(rr);
  stage_weights(bufs, Ab, g, i0, j0, 0, transposed, cmap, pix);
  cp_async_wait();
  __syncthreads();

  const int ngj = g.TJ / kAP;
  const int tt = threadIdx.x;
  const bool owner = tt < g.TI * ngj * NG;
  const int jg = tt % ngj, grp = (tt / ngj) % NG, ti = tt / (ngj * NG);
  const int rows = apply_group(g, ti * g.TJ + jg * kAP);
  A acc[kAP][RC] = {};

  for (int a = 0; a < g.ws; ++a) {
    if (a + 1 < g.ws) {
      stage_row(a + g.TI);
      stage_weights(bufs + ((a + 1) & 1) * bufsize, Ab, g, i0, j0, a + 1, transposed, cmap, pix);
    }
    if (owner) accumulate_apply<RC>(acc, bufs + (a & 1) * bufsize + rows, xs, grp, NG, g, ti, jg, a);
    cp_async_wait();
    __syncthreads();
  }

  if (owner) {
#pragma unroll
    for (int rc = 0; rc < RC; ++rc) {
      const int ch = grp + NG * rc;
      if (ch >= cbn) continue;
#pragma unroll
      for (int p = 0; p < kAP; ++p) {
        const int jj = jg * kAP + p;
        if (i0 + ti < g.H && j0 + jj < g.W)
          yb[ch * HW + int64_t(i0 + ti) * g.W + (j0 + jj)] = static_cast<T>(acc[p][rc]);
      }
    }
  }
}

// ---------------------------------------------------------------- host entry points

at::Tensor similarity(const at::Tensor& q_, const at::Tensor& k_, int64_t window, bool distance) {
  check_real_cuda(q_, "q");
  check_like(k_, "k", q_, "q");
  check_dims(q_, "q", 5, "(B, heads, C, H, W)");
  TORCH_CHECK(q_.sizes() == k_.sizes(), "circatt cuda: similarity needs q and k of one shape, got ", q_.sizes(),
              " and ", k_.sizes());
  const int64_t B = q_.size(0), G = q_.size(1), C = q_.size(2), H = q_.size(3), W = q_.size(4);
  check_window(window, H, W);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous();
  at::Tensor S = new_output({B, G, H, W, window * window}, q.options());
  if (S.numel() == 0) return S;
  check_planes(B * G, 1);
  const int ws = int(window);
  const at::Tensor knorm = distance ? pixel_norms(k) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "circatt_similarity", [&] {
    using A = acc_t<scalar_t>;
    auto kernel = similarity_kernel<scalar_t>;
    const Launch l = choose_launch(
        int(H), int(W), ws, B * G, 0, 1, max_dot_splits(C), kernel_registers(kernel),
        [&](const Geom& g, int splits) { return sim_smem<A>(g, int(C), distance, splits).bytes; }, "similarity",
        true);
    allow_smem(kernel, l.smem);
    const dim3 grid(unsigned(l.tiles), unsigned(B * G));
    kernel<<<grid, l.threads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), distance ? knorm.data_ptr<A>() : nullptr,
        S.data_ptr<scalar_t>(), int(C), l.g, distance, l.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return S;
}

at::Tensor apply(const at::Tensor& A_, const at::Tensor& x_, int64_t window, bool transposed) {
  check_real_cuda(x_, "x");
  check_like(A_, "A", x_, "x");
  check_dims(x_, "x", 5, "(B, heads, C, H, W)");
  check_dims(A_, "A", 5, "(B, heads, H, W, window*window)");
  const int64_t B = x_.size(0), G = x_.size(1), C = x_.size(2), H = x_.size(3), W = x_.size(4);
  check_window(window, H, W);
  TORCH_CHECK(A_.size(0) == B && A_.size(1) == G && A_.size(2) == H && A_.size(3) == W &&
                  A_.size(4) == window * window,
              "circatt cuda: apply needs A of shape (", B, ", ", G, ", ", H, ", ", W, ", ", window * window,
              ") for x of shape ", x_.sizes(), " and window ", window, ", got ", A_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor Aw = A_.contiguous(), x = x_.contiguous();
  at::Tensor y = new_output(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const int ws = int(window);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "circatt_apply", [&] {
    using A = acc_t<scalar_t>;
    constexpr int RC = ApplyChannels<scalar_t>::value;
    constexpr int kMaxGroups = 512 / int(sizeof(A)) / RC;  // at most 512 bytes of channels a ring column
    const int groups_needed = int((C + RC - 1) / RC);
    const int NG = groups_needed < kMaxGroups ? groups_needed : kMaxGroups;
    const int chunks = int((C + NG * RC - 1) / (NG * RC));
    check_planes(B * G, chunks);
    auto kernel = apply_kernel<scalar_t, RC>;
    const Launch l = choose_launch(
        int(H), int(W), ws, B * G * chunks, NG, 0, 1, kernel_registers(kernel),
        [&](const Geom& g, int) { return apply_smem<A>(g, NG * RC).bytes; }, "apply");
    allow_smem(kernel, l.smem);
    const dim3 grid(unsigned(l.tiles), unsigned(B * G), unsigned(chunks));
    kernel<<<grid, l.threads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
        Aw.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), int(C), NG, l.g, transposed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

void set_poison_outputs(bool on) { poison_outputs() = on; }

}  // namespace circatt
