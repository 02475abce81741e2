// Portable SIMD vectors for the CPU kernels, on the GCC/Clang vector extensions.
//
// Vec<T> is as wide as the widest registers the build flags enable (16 bytes for SSE2 or NEON,
// 32 for AVX, 64 for AVX-512); the compiler turns each arithmetic operator on it into one
// instruction and a * b + c into a fused multiply-add where the target has one. Explicit vectors
// let a kernel keep a tile of independent accumulators in registers, which the auto-vectoriser
// does not reliably do (it is then bound by the latency of one accumulator chain).
#pragma once

#include <cstdint>
#include <cstring>

namespace simd {

#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif

template <typename scalar_t>
struct VectorOf;

template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};

template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

template <typename scalar_t>
using Vec = typename VectorOf<scalar_t>::type;

template <typename scalar_t>
constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(scalar_t));

// Unaligned load and store of kLanes consecutive scalars.
template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* p) {
  Vec<scalar_t> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename scalar_t>
inline void store(scalar_t* p, const Vec<scalar_t>& v) {
  std::memcpy(p, &v, sizeof v);
}

}  // namespace simd
