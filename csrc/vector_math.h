// Vector helpers the native kernels share, inlined into their task functions: 512-bit vectors of
// float (GCC/Clang vector extensions), lane sums, dot products, exp, and bfloat16 loads and
// stores. The task functions that use them are compiled for the x86-64 feature levels v4
// (AVX-512), v3 (AVX2 + FMA) and the baseline and picked at load time by the CPU's features
// (GCC function multiversioning, QUIETSTAR_CLONES). Levels, not CPU names: a clone for
// "arch=skylake-avx512" is picked only on that Intel model, so an AMD EPYC with AVX-512 ran the
// baseline SSE2 clone.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QUIETSTAR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define QUIETSTAR_INLINE inline __attribute__((always_inline))
#else
#define QUIETSTAR_CLONES
#define QUIETSTAR_INLINE inline
#endif

namespace quietstar {

#if defined(__GNUC__)
// One 512-bit vector of T (AVX-512 in the v4 clone, two or four narrower registers in the others).
template <typename T, int N>
struct VectorOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T, int N>
using Vector = typename VectorOf<T, N>::type;

// Sum of a vector's lanes as a tree of register halves (an `omp simd` reduction spills the
// vector and adds its lanes one after another).
template <typename T, int N>
QUIETSTAR_INLINE T lane_sum(const Vector<T, N>& x) {
  if constexpr (N == 2) {
    return x[0] + x[1];
  } else {
    Vector<T, N / 2> low, high;
    std::memcpy(&low, &x, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&x) + sizeof(low), sizeof(high));
    return lane_sum<T, N / 2>(low + high);
  }
}

template <typename T>
QUIETSTAR_INLINE T dot(const T* a, const T* b, int64_t n) {
  constexpr int kVectorLanes = 64 / sizeof(T);
  Vector<T, kVectorLanes> acc = {}, x, y;
  int64_t d = 0;
  for (; d + kVectorLanes <= n; d += kVectorLanes) {
    std::memcpy(&x, a + d, sizeof(x));
    std::memcpy(&y, b + d, sizeof(y));
    acc += x * y;
  }
  T s = lane_sum<T, kVectorLanes>(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

using Floats = Vector<float, 16>;
using Ints = Vector<int32_t, 16>;
constexpr int64_t kLanes = 16;

QUIETSTAR_INLINE Floats splat(float x) { return Floats{} + x; }

// Makes x, a product just computed, be rounded to its type before it is used: the compiler may
// not fuse it into a following subtraction. An FMA keeps the exact product, so exp(score * scale -
// max) would get the product's rounding error (up to half an ulp of the score) on top of the
// true exponent, where max is a rounded product; past scaled scores of about 2^31 that error
// passes the exponent's range and exp gives inf (then NaN) or 0.
template <typename T>
QUIETSTAR_INLINE void keep_rounded(T& x) {
  asm volatile("" : "+m"(x));
}

// exp of 16 floats: x = n ln2 + r with |r| <= ln2 / 2 (n rounded through the 1.5 * 2^23 trick),
// e^r by Cephes's degree-6 polynomial, 2^n written into the exponent bits. Relative error about
// 2e-7. Inputs above 88.3 give e^88.3; below -87.3 (the result's normal range), -inf included,
// exactly 0; NaN stays NaN.
QUIETSTAR_INLINE Floats vexp(Floats in) {
  const Floats lo = splat(-87.3f), hi = splat(88.3f), magic = splat(12582912.0f);
  Floats x = in < lo ? lo : in;
  x = x > hi ? hi : x;
  const Floats t = x * 1.44269504088896341f + magic;
  const Floats n = t - magic;
  Floats r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Floats p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  using Words = Vector<uint32_t, 16>;  // unsigned: shifting a NaN's bits left is defined
  Words t_bits, magic_bits;
  std::memcpy(&t_bits, &t, sizeof(t));
  std::memcpy(&magic_bits, &magic, sizeof(magic));
  const Words exponent = (t_bits - magic_bits + 127u) << 23;
  Floats two_n;
  std::memcpy(&two_n, &exponent, sizeof(two_n));
  return in < lo ? splat(0.0f) : p * two_n;
}

// 16 values of float or bfloat16 storage as floats, and back (bfloat16 rounded to nearest even,
// NaN kept a quiet NaN).
QUIETSTAR_INLINE Floats load(const float* p) {
  Floats x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
QUIETSTAR_INLINE void store(float* p, Floats x) { std::memcpy(p, &x, sizeof(x)); }
QUIETSTAR_INLINE Floats load(const c10::BFloat16* p) {
  Vector<uint16_t, 16> half;
  std::memcpy(&half, p, sizeof(half));
  const Ints bits = __builtin_convertvector(half, Ints) << 16;
  Floats x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
QUIETSTAR_INLINE void store(c10::BFloat16* p, Floats x) {
  using Words = Vector<uint32_t, 16>;
  Words bits;
  std::memcpy(&bits, &x, sizeof(bits));
  Words rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  rounded = x != x ? Words{} + 0x7fc0u : rounded;
  const Vector<uint16_t, 16> half = __builtin_convertvector(rounded, Vector<uint16_t, 16>);
  std::memcpy(p, &half, sizeof(half));
}

// The first n < kLanes values (zeros after), and their store: a row's tail through the same
// vector code as its body.
template <typename T>
QUIETSTAR_INLINE Floats load_first(const T* p, int64_t n) {
  T padded[kLanes] = {};
  std::memcpy(padded, p, n * sizeof(T));
  return load(padded);
}
template <typename T>
QUIETSTAR_INLINE void store_first(T* p, Floats x, int64_t n) {
  T padded[kLanes];
  store(padded, x);
  std::memcpy(p, padded, n * sizeof(T));
}
#else
template <typename T>
QUIETSTAR_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}
#endif

}  // namespace quietstar
