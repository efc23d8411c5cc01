// Tree attention on the CPU, the part PyTorch's kernels cannot do: each query's own chain keys
// (the Quiet-STaR tree rule, SPEC section 1), merged into the online-softmax state of its trunk
// part. The trunk (causal attention of every query slot over the text's keys, with padding and
// sliding window) runs through PyTorch's flash kernel, which returns its output and
// log-sum-exp; the forward here starts each query's softmax from that state
// (max = trunk lse, sum = 1, accumulator = trunk output) and folds in the query's chain keys.
// The backward takes the merged output and log-sum-exp (so the trunk's flash backward and this
// one each give their part of the gradients, which add): dQ of the chain per query row, dK/dV
// of the chain keys per position, from the queries of their own chain. GQA reads the shared K/V
// heads in place (no copies); no score matrix exists.
//
// Shapes (contiguous): q [B, Hq, Sq*L, D], k and v [B, Hkv, Sk*L, D], query slot j is key slot
// Sk - Sq + j; trunk_out like q, trunk_lse [B, Hq, Sq*L] (-inf where a query sees no text key).

#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace {

struct Tree {
  int64_t batch, q_heads, kv_heads, q_slots, k_slots, slot_len, dim, n_thoughts;
  double scale;

  int64_t group() const { return q_heads / kv_heads; }
  int64_t query_rows() const { return batch * q_heads * q_slots * slot_len; }
  // Key slot of query slot j.
  int64_t key_slot(int64_t j) const { return k_slots - q_slots + j; }
  // Whether chain key slot s2 (>= 1) is on the branch of key slot s (>= 1) and not after it.
  bool sees_chain(int64_t s, int64_t s2) const {
    return s >= 1 && s2 >= 1 && s2 <= s && (s - 1) % n_thoughts == (s2 - 1) % n_thoughts;
  }
  // Query row -> (query slot j, position i, flat row of its KV head's first key).
  struct Row {
    int64_t j, i, kv_base;
  };
  Row row(int64_t r) const {
    const int64_t i = r % slot_len, j = (r / slot_len) % q_slots, h = (r / (slot_len * q_slots)) % q_heads;
    const int64_t b = r / (slot_len * q_slots * q_heads);
    return {j, i, (b * kv_heads + h / group()) * k_slots * slot_len};
  }
};

// Vector loops. Float32 ones are compiled for AVX-512, AVX2 + FMA and baseline x86-64 and
// picked at load time by the CPU's features (GCC function multiversioning); float64 ones (the
// gradcheck path) are plain loops.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QUIETSTAR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define QUIETSTAR_CLONES
#endif

QUIETSTAR_CLONES float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

QUIETSTAR_CLONES void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

template <typename T>
void chain_forward_kernel(const Tree& t, const T* q, const T* k, const T* v, const T* trunk_out, const T* trunk_lse,
                          T* out, T* lse) {
  const int64_t L = t.slot_len, D = t.dim;
  const T neg_inf = -std::numeric_limits<T>::infinity(), scale = static_cast<T>(t.scale);
  at::parallel_for(0, t.query_rows(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto [j, i, kv_base] = t.row(r);
      const T* q_row = q + r * D;
      T* o = out + r * D;
      // The trunk's state: max = its lse, sum = 1 (0 if it saw nothing), accumulator = its output.
      T row_max = trunk_lse[r], row_sum = std::isinf(row_max) ? T(0) : T(1);
      std::copy(trunk_out + r * D, trunk_out + (r + 1) * D, o);
      const int64_t s_q = t.key_slot(j);
      for (int64_t s2 = 1; s2 <= s_q; ++s2) {
        if (!t.sees_chain(s_q, s2)) continue;
        const int64_t key = kv_base + s2 * L + i;
        const T score = dot(q_row, k + key * D, D) * scale;
        const T m = std::max(row_max, score);
        const T correction = std::exp(row_max - m), p = std::exp(score - m);
        for (int64_t d = 0; d < D; ++d) o[d] *= correction;
        axpy(p, v + key * D, o, D);
        row_sum = row_sum * correction + p;
        row_max = m;
      }
      if (row_sum == T(0)) {  // no visible key: zeros, and -inf so the backward gives 0
        std::fill(o, o + D, T(0));
        lse[r] = neg_inf;
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] /= row_sum;
        lse[r] = row_max + std::log(row_sum);
      }
    }
  });
}

template <typename T>
void chain_backward_kernel(const Tree& t, const T* q, const T* k, const T* v, const T* grad_out, const T* lse,
                           const T* delta, T* grad_q, T* grad_k, T* grad_v) {
  const int64_t L = t.slot_len, D = t.dim, G = t.group();
  const T scale = static_cast<T>(t.scale);
  // dQ: per query row, from its chain keys.
  at::parallel_for(0, t.query_rows(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (std::isinf(lse[r])) continue;
      const auto [j, i, kv_base] = t.row(r);
      const int64_t s_q = t.key_slot(j);
      for (int64_t s2 = 1; s2 <= s_q; ++s2) {
        if (!t.sees_chain(s_q, s2)) continue;
        const int64_t key = kv_base + s2 * L + i;
        const T p = std::exp(dot(q + r * D, k + key * D, D) * scale - lse[r]);
        const T ds = p * (dot(grad_out + r * D, v + key * D, D) - delta[r]) * scale;
        axpy(ds, k + key * D, grad_q + r * D, D);
      }
    }
  });
  // dK, dV of the chain keys: per position, from the queries of its own chain.
  at::parallel_for(0, t.batch * t.kv_heads * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % L, hk = (task / L) % t.kv_heads, b = task / (L * t.kv_heads);
      const int64_t kv_base = (b * t.kv_heads + hk) * t.k_slots * L;
      for (int64_t s2 = 1; s2 < t.k_slots; ++s2) {
        const int64_t key = kv_base + s2 * L + i;
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
          for (int64_t j = 0; j < t.q_slots; ++j) {
            if (!t.sees_chain(t.key_slot(j), s2)) continue;
            const int64_t row = ((b * t.q_heads + h) * t.q_slots * L) + j * L + i;
            if (std::isinf(lse[row])) continue;
            const T p = std::exp(dot(q + row * D, k + key * D, D) * scale - lse[row]);
            const T ds = p * (dot(grad_out + row * D, v + key * D, D) - delta[row]) * scale;
            axpy(p, grad_out + row * D, grad_v + key * D, D);
            axpy(ds, q + row * D, grad_k + key * D, D);
          }
      }
    }
  });
}

Tree make_tree(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t slot_len, int64_t n_thoughts,
               double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "quietstar native tree_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be [B, H, S*L, D]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k and v must be contiguous");
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k");
  TORCH_CHECK(slot_len > 0 && q.size(2) % slot_len == 0 && k.size(2) % slot_len == 0, "slot_len must divide q and k");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(3) == k.size(3), "q's heads must be a multiple of k's, same D");
  TORCH_CHECK(n_thoughts >= 1, "n_thoughts must be >= 1");
  return Tree{q.size(0), q.size(1), k.size(1), q.size(2) / slot_len, k.size(2) / slot_len, slot_len, q.size(3),
              n_thoughts, scale};
}

std::tuple<at::Tensor, at::Tensor> tree_attention_chain_forward(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& trunk_out,
                                                                const at::Tensor& trunk_lse, int64_t slot_len,
                                                                int64_t n_thoughts, double scale) {
  const Tree t = make_tree(q, k, v, slot_len, n_thoughts, scale);
  TORCH_CHECK(trunk_out.sizes() == q.sizes() && trunk_out.is_contiguous(), "trunk_out must be contiguous, shaped as q");
  TORCH_CHECK(trunk_lse.sizes() == q.sizes().slice(0, 3) && trunk_lse.is_contiguous(),
              "trunk_lse must be contiguous [B, Hq, Sq*L]");
  TORCH_CHECK(trunk_out.scalar_type() == q.scalar_type() && trunk_lse.scalar_type() == q.scalar_type(),
              "trunk_out and trunk_lse must have q's dtype");
  auto out = at::empty_like(q);
  auto lse = at::empty_like(trunk_lse);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tree_attention_chain_forward", [&] {
    chain_forward_kernel<scalar_t>(t, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                   trunk_out.data_ptr<scalar_t>(), trunk_lse.data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_chain_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t slot_len, int64_t n_thoughts, double scale) {
  const Tree t = make_tree(q, k, v, slot_len, n_thoughts, scale);
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.is_contiguous(), "lse must be contiguous [B, Hq, Sq*L]");
  auto grad = grad_out.contiguous();
  auto delta = (grad * out).sum(-1).contiguous();
  auto grad_q = at::zeros_like(q), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tree_attention_chain_backward", [&] {
    chain_backward_kernel<scalar_t>(t, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                    grad.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                                    grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                    grad_v.data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY(quietstar, m) {
  m.def(
      "tree_attention_chain_forward(Tensor q, Tensor k, Tensor v, Tensor trunk_out, Tensor trunk_lse, int slot_len, "
      "int n_thoughts, float scale) -> (Tensor, Tensor)");
  m.def(
      "tree_attention_chain_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int slot_len, int n_thoughts, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("tree_attention_chain_forward", &tree_attention_chain_forward);
  m.impl("tree_attention_chain_backward", &tree_attention_chain_backward);
}

// `import quietstar._C` loads the library, which registers the ops above under torch.ops.quietstar.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
