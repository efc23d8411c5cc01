// What the native tree-attention kernels share: a call's shapes (Tree), the vector helpers and
// the clones that compile them for the CPU's feature level. The chain part is in
// tree_attention.cpp, the trunk part in tree_attention_trunk.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace quietstar {

struct Tree {
  int64_t batch, q_heads, kv_heads, q_slots, k_slots, slot_len, dim, n_thoughts;
  double scale;
  // Strides of k and v's batch rows and heads (their rows are contiguous: a cache's filled part
  // is read in place).
  int64_t kv_batch_stride = 0, kv_head_stride = 0;
  // The chain key slots query slot j sees: chain[chain_begin[j] .. chain_begin[j + 1]).
  std::vector<int64_t> chain, chain_begin;

  Tree(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t q_slots, int64_t k_slots, int64_t slot_len,
       int64_t dim, int64_t n_thoughts, double scale)
      : batch(batch), q_heads(q_heads), kv_heads(kv_heads), q_slots(q_slots), k_slots(k_slots), slot_len(slot_len),
        dim(dim), n_thoughts(n_thoughts), scale(scale) {
    // Key slot s >= 1 is thought (s - 1) % N's chain step; a query sees the chain keys of its
    // own thought up to its own slot (SPEC section 1). The base slot (0) sees none.
    for (int64_t j = 0; j < q_slots; ++j) {
      chain_begin.push_back(static_cast<int64_t>(chain.size()));
      const int64_t s = key_slot(j);
      for (int64_t s2 = 1; s >= 1 && s2 <= s; ++s2)
        if ((s - 1) % n_thoughts == (s2 - 1) % n_thoughts) chain.push_back(s2);
    }
    chain_begin.push_back(static_cast<int64_t>(chain.size()));
  }

  int64_t group() const { return q_heads / kv_heads; }
  // Key slot of query slot j.
  int64_t key_slot(int64_t j) const { return k_slots - q_slots + j; }
};

// Vector loops, inlined into the task functions below. The tasks that compute in float32
// (float32, bfloat16 and float16 storage) are compiled for the x86-64 feature levels v4
// (AVX-512), v3 (AVX2 + FMA) and the baseline, and picked at load time by the CPU's features
// (GCC function multiversioning); float64 (the gradcheck path) is compiled once. Levels, not CPU names: a clone for "arch=skylake-avx512" is picked only on that Intel
// model, so an AMD EPYC with AVX-512 ran the baseline SSE2 clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QUIETSTAR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define QUIETSTAR_INLINE inline __attribute__((always_inline))
#else
#define QUIETSTAR_CLONES
#define QUIETSTAR_INLINE inline
#endif

#if defined(__GNUC__)
// One 512-bit vector of T (GCC/Clang vector extensions: AVX-512 in the v4 clone, two or four
// narrower registers in the others).
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
  constexpr int kLanes = 64 / sizeof(T);
  Vector<T, kLanes> acc = {}, x, y;
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    std::memcpy(&x, a + d, sizeof(x));
    std::memcpy(&y, b + d, sizeof(y));
    acc += x * y;
  }
  T s = lane_sum<T, kLanes>(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}
#else
template <typename T>
QUIETSTAR_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}
#endif

// Checks the arguments the ops share and reads their shapes; k and v's batch and head strides
// are free (a cache's filled part), their rows and positions contiguous.
Tree make_tree(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t slot_len, int64_t n_thoughts,
               double scale);

// Log-sum-exps and the keys' gradients are kept in float64 for float64 inputs, else float32.
inline c10::ScalarType acc_type(c10::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace quietstar
