// What the native tree-attention kernels share: a call's shapes (Tree) and the argument checks
// (the vector helpers are vector_math.h's). The chain part is in
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

#include "vector_math.h"

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

// Checks the arguments the ops share and reads their shapes; k and v's batch and head strides
// are free (a cache's filled part), their rows and positions contiguous.
Tree make_tree(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t slot_len, int64_t n_thoughts,
               double scale);

// Log-sum-exps and the keys' gradients are kept in float64 for float64 inputs, else float32.
inline c10::ScalarType acc_type(c10::ScalarType in) { return in == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace quietstar
