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
#include <limits>
#include <type_traits>
#include <vector>

namespace {

struct Tree {
  int64_t batch, q_heads, kv_heads, q_slots, k_slots, slot_len, dim, n_thoughts;
  double scale;

  int64_t group() const { return q_heads / kv_heads; }
  // Key slot of query slot j.
  int64_t key_slot(int64_t j) const { return k_slots - q_slots + j; }
  // Whether chain key slot s2 (>= 1) is on the branch of key slot s (>= 1) and not after it.
  bool sees_chain(int64_t s, int64_t s2) const {
    return s >= 1 && s2 >= 1 && s2 <= s && (s - 1) % n_thoughts == (s2 - 1) % n_thoughts;
  }
};

// Vector loops, inlined into the per-position task functions below. The float32 tasks are
// compiled for AVX-512, AVX2 + FMA and baseline x86-64 and picked at load time by the CPU's
// features (GCC function multiversioning); float64 (the gradcheck path) is compiled once.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QUIETSTAR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#define QUIETSTAR_INLINE inline __attribute__((always_inline))
#else
#define QUIETSTAR_CLONES
#define QUIETSTAR_INLINE inline
#endif

template <typename T>
QUIETSTAR_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
QUIETSTAR_INLINE void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// y = alpha * x (x may be y).
template <typename T>
QUIETSTAR_INLINE void scaled_copy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] = alpha * x[d];
}

// The work is split by (batch row, KV head, position): every query head of the group and every
// query slot at that position read the same chain keys (those of the position), so a task reads
// them once while they sit in L1, and owns their gradients and its queries' (no atomics).
struct Position {
  int64_t b, hk, i;
};

// Arguments of one call, as raw pointers.
template <typename T>
struct ChainForward {
  const T *q, *k, *v, *trunk_out, *trunk_lse;
  T *out, *lse;
};

template <typename T>
struct ChainBackward {
  const T *q, *k, *v, *grad_out, *out, *lse, *trunk_grad_q;
  T *grad_q, *grad_k, *grad_v;
};

// Forward of one position: each query's softmax starts from its trunk's state (one more "key"
// with score trunk_lse and value trunk_out) and takes in its chain keys; scores is scratch of
// k_slots values.
template <typename T>
QUIETSTAR_INLINE void forward_position(const Tree& t, const ChainForward<T>& a, Position p, T* scores) {
  const int64_t L = t.slot_len, D = t.dim, G = t.group();
  const T neg_inf = -std::numeric_limits<T>::infinity(), scale = static_cast<T>(t.scale);
  const int64_t kv_base = (p.b * t.kv_heads + p.hk) * t.k_slots * L;
  for (int64_t h = p.hk * G; h < (p.hk + 1) * G; ++h)
    for (int64_t j = 0; j < t.q_slots; ++j) {
      const int64_t r = ((p.b * t.q_heads + h) * t.q_slots + j) * L + p.i, s_q = t.key_slot(j);
      const T* q_row = a.q + r * D;
      T m = a.trunk_lse[r];
      for (int64_t s2 = 1; s2 <= s_q; ++s2)
        if (t.sees_chain(s_q, s2)) {
          scores[s2] = dot(q_row, a.k + (kv_base + s2 * L + p.i) * D, D) * scale;
          m = std::max(m, scores[s2]);
        }
      T* o = a.out + r * D;
      if (m == neg_inf) {  // no visible key: zeros, and -inf so the backward gives 0
        std::fill(o, o + D, T(0));
        a.lse[r] = neg_inf;
        continue;
      }
      T sum = std::exp(a.trunk_lse[r] - m);
      if (sum > T(0))
        scaled_copy(sum, a.trunk_out + r * D, o, D);
      else  // the trunk saw nothing (or counts for nothing): its output is not read
        std::fill(o, o + D, T(0));
      for (int64_t s2 = 1; s2 <= s_q; ++s2)
        if (t.sees_chain(s_q, s2)) {
          const T prob = std::exp(scores[s2] - m);
          axpy(prob, a.v + (kv_base + s2 * L + p.i) * D, o, D);
          sum += prob;
        }
      scaled_copy(T(1) / sum, o, o, D);
      a.lse[r] = m + std::log(sum);
    }
}

// Backward of one position from the merged output and lse: dQ of its queries (the trunk's
// share plus their chain keys'), dK/dV of its chain keys from their queries.
template <typename T>
QUIETSTAR_INLINE void backward_position(const Tree& t, const ChainBackward<T>& a, Position p) {
  const int64_t L = t.slot_len, D = t.dim, G = t.group();
  const T scale = static_cast<T>(t.scale);
  const int64_t kv_base = (p.b * t.kv_heads + p.hk) * t.k_slots * L;
  for (int64_t h = p.hk * G; h < (p.hk + 1) * G; ++h)
    for (int64_t j = 0; j < t.q_slots; ++j) {
      const int64_t r = ((p.b * t.q_heads + h) * t.q_slots + j) * L + p.i, s_q = t.key_slot(j);
      std::copy(a.trunk_grad_q + r * D, a.trunk_grad_q + (r + 1) * D, a.grad_q + r * D);
      if (std::isinf(a.lse[r])) continue;
      const T *q_row = a.q + r * D, *do_row = a.grad_out + r * D;
      const T delta = dot(do_row, a.out + r * D, D);
      for (int64_t s2 = 1; s2 <= s_q; ++s2) {
        if (!t.sees_chain(s_q, s2)) continue;
        const int64_t key = kv_base + s2 * L + p.i;
        const T prob = std::exp(dot(q_row, a.k + key * D, D) * scale - a.lse[r]);
        const T ds = prob * (dot(do_row, a.v + key * D, D) - delta) * scale;
        axpy(ds, a.k + key * D, a.grad_q + r * D, D);
        axpy(prob, do_row, a.grad_v + key * D, D);
        axpy(ds, q_row, a.grad_k + key * D, D);
      }
    }
}

QUIETSTAR_CLONES void forward_position_f32(const Tree& t, const ChainForward<float>& a, Position p, float* scores) {
  forward_position(t, a, p, scores);
}
void forward_position_f64(const Tree& t, const ChainForward<double>& a, Position p, double* scores) {
  forward_position(t, a, p, scores);
}
QUIETSTAR_CLONES void backward_position_f32(const Tree& t, const ChainBackward<float>& a, Position p) {
  backward_position(t, a, p);
}
void backward_position_f64(const Tree& t, const ChainBackward<double>& a, Position p) { backward_position(t, a, p); }

template <typename F>
void for_each_position(const Tree& t, F&& body) {
  at::parallel_for(0, t.batch * t.kv_heads * t.slot_len, 8, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % t.slot_len, hk = (task / t.slot_len) % t.kv_heads, b = task / (t.slot_len * t.kv_heads);
      body(Position{b, hk, i});
    }
  });
}

template <typename T>
void chain_forward_kernel(const Tree& t, const ChainForward<T>& a) {
  for_each_position(t, [&](Position p) {
    std::vector<T> scores(t.k_slots);
    if constexpr (std::is_same_v<T, float>)
      forward_position_f32(t, a, p, scores.data());
    else
      forward_position_f64(t, a, p, scores.data());
  });
}

template <typename T>
void chain_backward_kernel(const Tree& t, const ChainBackward<T>& a) {
  for_each_position(t, [&](Position p) {
    if constexpr (std::is_same_v<T, float>)
      backward_position_f32(t, a, p);
    else
      backward_position_f64(t, a, p);
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
    chain_forward_kernel<scalar_t>(
        t, {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), trunk_out.data_ptr<scalar_t>(),
            trunk_lse.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()});
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_chain_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& trunk_grad_q, int64_t slot_len, int64_t n_thoughts, double scale) {
  const Tree t = make_tree(q, k, v, slot_len, n_thoughts, scale);
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.is_contiguous(), "lse must be contiguous [B, Hq, Sq*L]");
  for (const auto* x : {&grad_out, &out, &trunk_grad_q})
    TORCH_CHECK(x->sizes() == q.sizes() && x->is_contiguous() && x->scalar_type() == q.scalar_type(),
                "grad_out, out and trunk_grad_q must be contiguous, shaped and typed as q");
  auto grad_q = at::empty_like(q), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tree_attention_chain_backward", [&] {
    chain_backward_kernel<scalar_t>(
        t, {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), trunk_grad_q.data_ptr<scalar_t>(),
            grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>()});
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
      "Tensor trunk_grad_q, int slot_len, int n_thoughts, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("tree_attention_chain_forward", &tree_attention_chain_forward);
  m.impl("tree_attention_chain_backward", &tree_attention_chain_backward);
}

// `import quietstar._C` loads the library, which registers the ops above under torch.ops.quietstar.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
