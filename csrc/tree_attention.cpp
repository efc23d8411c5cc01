// Tree attention on the CPU, the part that follows the trunk: each query's own chain keys (the
// Quiet-STaR tree rule, SPEC section 1), merged into the online-softmax state of its trunk part.
// The trunk (causal attention of every query slot over the text's keys, with padding and sliding
// window) runs first (tree_attention_trunk.cpp, or PyTorch's flash kernel for float64 and half
// precision as stored) and leaves its output and log-sum-exp; the forward here starts each
// query's softmax from that state (max = trunk lse, sum = 1, accumulator = trunk output) and
// folds in the query's chain keys. The backward takes the merged output and log-sum-exp (so the
// trunk's backward and this one each give their part of the gradients, which add): dQ of the
// chain per query row, dK/dV of the chain keys per position, from the queries of their own
// chain. GQA reads the shared K/V heads in place (no copies); no score matrix exists.
//
// Both ops work in place on the trunk's results, which the caller owns: the forward turns the
// trunk's output and log-sum-exp into the merged ones, the backward adds the chain's share to the
// trunk's dQ (and writes the chain keys' dK/dV into zeroed gradients). A fresh tensor of q's
// size costs its page faults on every call; these are already resident.
//
// Shapes: q [B, Hq, Sq*L, D] (contiguous, as out, grad_out, grad_q), k and v [B, Hkv, Sk*L, D]
// (rows and positions contiguous, batch and head strides free: a cache's filled part), grad_k
// and grad_v contiguous; query slot j is key slot Sk - Sq + j; lse [B, Hq, Sq*L] (the trunk's:
// -inf where a query sees no text key).

#include "error_text.h"
#include "tree_attention.h"

#include <Python.h>
#include <torch/library.h>

namespace quietstar {
namespace {

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

// The work is split by (batch row, KV head, block of positions): every query head of the group
// and every query slot at a position read the same chain keys (those of the position), so a task
// reads its block's chain keys once into L2 and owns their gradients and its queries' (no
// atomics). Inside a task the positions are the innermost loop, so each query head and slot
// streams through consecutive rows of q, the outputs and the keys (one row per position, every
// slot's rows L rows apart).
struct Positions {
  int64_t b, hk, begin, end;
};

// Positions per task: the block's chain keys and values (2 * (Sk - 1) * 16 rows of D values,
// about 230 KB at Sk = 29, D = 64 in float32) stay in a core's L2.
constexpr int64_t kPositionsPerTask = 16;

// Tensors are stored as In (float, double, bfloat16 or float16) and computed in Acc: float, or
// double for double. Log-sum-exps and the chain keys' gradients are stored as Acc.
template <typename In>
using AccOf = std::conditional_t<std::is_same_v<In, double>, double, float>;

// Arguments of one call, as raw pointers.
template <typename In>
struct ChainForward {
  const In *q, *k, *v;
  In* out;              // in: the trunk's output; out: merged
  AccOf<In>* lse;       // in: the trunk's log-sum-exp; out: merged
};

template <typename In>
struct ChainBackward {
  const In *q, *k, *v, *grad_out, *out;
  const AccOf<In>* lse;
  In* grad_q;                     // in: the trunk's share; out: with the chain's added
  AccOf<In> *grad_k, *grad_v;     // zeroed; out: the chain keys' rows
};

// A row as Acc: the row itself when it is stored as Acc, else converted into `buffer`. A row of
// const In comes back read-only when it is returned itself; a mutable row stays mutable (write
// the converted copy back with store_row).
template <typename Acc, typename In>
QUIETSTAR_INLINE auto acc_row(In* row, Acc* buffer, int64_t n) {
  if constexpr (std::is_same_v<std::remove_const_t<In>, Acc>) {
    return row;
  } else {
    for (int64_t d = 0; d < n; ++d) buffer[d] = static_cast<Acc>(row[d]);
    return buffer;
  }
}

// Writes back a mutable row that acc_row converted (nothing to do when it was the row itself).
template <typename Acc, typename In>
QUIETSTAR_INLINE void store_row(const Acc* values, In* row, int64_t n) {
  if constexpr (!std::is_same_v<In, Acc>)
    for (int64_t d = 0; d < n; ++d) row[d] = static_cast<In>(values[d]);
}

// The chain keys (or values) of one task's KV head and positions, as Acc rows: in place when
// stored as Acc, else converted once per task into scratch (each is read by every query of the
// group and its branch at that position).
template <typename Acc>
struct KeyRows {
  const Acc* base;
  int64_t slot_stride, first, dim;

  const Acc* at(int64_t slot, int64_t i) const { return base + (slot * slot_stride + i - first) * dim; }
};

template <typename Acc, typename In>
QUIETSTAR_INLINE KeyRows<Acc> key_rows(const Tree& t, const In* keys, Positions p, Acc* scratch) {
  const In* head = keys + p.b * t.kv_batch_stride + p.hk * t.kv_head_stride;
  if constexpr (std::is_same_v<In, Acc>) {
    return {head, t.slot_len, 0, t.dim};
  } else {
    const int64_t n = p.end - p.begin;
    for (int64_t s = 1; s < t.k_slots; ++s)
      for (int64_t i = p.begin; i < p.end; ++i)
        acc_row(head + (s * t.slot_len + i) * t.dim, scratch + (s * n + i - p.begin) * t.dim, t.dim);
    return {scratch, n, p.begin, t.dim};
  }
}

// Scratch one worker thread needs, in Acc values: one score per key slot, four rows (the
// converted or updated rows of one query), and the converted chain keys and values of a task
// when the inputs are not stored as Acc.
template <typename In>
int64_t scratch_size(const Tree& t) {
  const int64_t keys = std::is_same_v<In, AccOf<In>> ? 0 : 2 * t.k_slots * kPositionsPerTask * t.dim;
  return t.k_slots + 4 * t.dim + keys;
}

// The parts of one thread's scratch (laid out as scratch_size counts them); keys and values
// are null when the inputs are stored as Acc (read in place).
template <typename In, typename Acc = AccOf<In>>
struct Scratch {
  Acc *scores, *rows, *keys = nullptr, *values = nullptr;

  Scratch(const Tree& t, Acc* base) : scores(base), rows(base + t.k_slots) {
    if constexpr (!std::is_same_v<In, Acc>) {
      keys = rows + 4 * t.dim;
      values = keys + t.k_slots * kPositionsPerTask * t.dim;
    }
  }
};

// Forward of a block of positions: each query's softmax starts from its trunk's state (one more
// "key" with score trunk_lse and value trunk_out) and takes in its chain keys.
template <typename In, typename Acc = AccOf<In>>
QUIETSTAR_INLINE void forward_positions(const Tree& t, const ChainForward<In>& a, Positions p, Acc* scratch) {
  const int64_t L = t.slot_len, D = t.dim, G = t.group();
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity(), scale = static_cast<Acc>(t.scale);
  const Scratch<In> parts(t, scratch);
  Acc *scores = parts.scores, *q_buffer = parts.rows, *o_buffer = q_buffer + D;
  const KeyRows<Acc> keys = key_rows(t, a.k, p, parts.keys), values = key_rows(t, a.v, p, parts.values);
  for (int64_t h = p.hk * G; h < (p.hk + 1) * G; ++h)
    for (int64_t j = 0; j < t.q_slots; ++j) {
      const int64_t *first = t.chain.data() + t.chain_begin[j], *last = t.chain.data() + t.chain_begin[j + 1];
      for (int64_t i = p.begin; i < p.end; ++i) {
        const int64_t r = ((p.b * t.q_heads + h) * t.q_slots + j) * L + i;
        const Acc* q_row = acc_row(a.q + r * D, q_buffer, D);
        const Acc trunk_lse = a.lse[r];
        Acc m = trunk_lse;
        for (const int64_t* s2 = first; s2 != last; ++s2) {
          scores[*s2] = dot(q_row, keys.at(*s2, i), D) * scale;
          m = std::max(m, scores[*s2]);
        }
        In* out_row = a.out + r * D;
        if (m == neg_inf) {  // no visible key: zeros, and -inf so the backward gives 0
          std::fill(out_row, out_row + D, In(0));
          a.lse[r] = neg_inf;
          continue;
        }
        Acc* o = acc_row(out_row, o_buffer, D);
        Acc sum = std::exp(trunk_lse - m);
        if (sum > Acc(0))
          scaled_copy(sum, o, o, D);
        else  // the trunk saw nothing (or counts for nothing): its output is not read
          std::fill(o, o + D, Acc(0));
        for (const int64_t* s2 = first; s2 != last; ++s2) {
          const Acc prob = std::exp(scores[*s2] - m);
          axpy(prob, values.at(*s2, i), o, D);
          sum += prob;
        }
        scaled_copy(Acc(1) / sum, o, o, D);
        store_row(o, out_row, D);
        a.lse[r] = m + std::log(sum);
      }
    }
}

// Backward of a block of positions from the merged output and lse: dQ of its queries (the
// trunk's share plus their chain keys'), dK/dV of its chain keys from their queries.
template <typename In, typename Acc = AccOf<In>>
QUIETSTAR_INLINE void backward_positions(const Tree& t, const ChainBackward<In>& a, Positions p, Acc* scratch) {
  const int64_t L = t.slot_len, D = t.dim, G = t.group();
  const Acc scale = static_cast<Acc>(t.scale);
  const int64_t grad_base = (p.b * t.kv_heads + p.hk) * t.k_slots * L;  // grad_k, grad_v: contiguous
  const Scratch<In> parts(t, scratch);
  Acc *q_buffer = parts.rows, *do_buffer = q_buffer + D, *out_buffer = do_buffer + D, *dq_buffer = out_buffer + D;
  const KeyRows<Acc> keys = key_rows(t, a.k, p, parts.keys), values = key_rows(t, a.v, p, parts.values);
  for (int64_t h = p.hk * G; h < (p.hk + 1) * G; ++h)
    for (int64_t j = 0; j < t.q_slots; ++j) {
      const int64_t *first = t.chain.data() + t.chain_begin[j], *last = t.chain.data() + t.chain_begin[j + 1];
      if (first == last) continue;  // no chain keys: dQ is the trunk's
      for (int64_t i = p.begin; i < p.end; ++i) {
        const int64_t r = ((p.b * t.q_heads + h) * t.q_slots + j) * L + i;
        if (std::isinf(a.lse[r])) continue;
        const Acc *q_row = acc_row(a.q + r * D, q_buffer, D), *do_row = acc_row(a.grad_out + r * D, do_buffer, D);
        const Acc delta = dot(do_row, acc_row(a.out + r * D, out_buffer, D), D);
        Acc* dq_row = acc_row(a.grad_q + r * D, dq_buffer, D);
        for (const int64_t* s2 = first; s2 != last; ++s2) {
          const Acc *k_row = keys.at(*s2, i), *v_row = values.at(*s2, i);
          const int64_t key = grad_base + *s2 * L + i;
          Acc score = dot(q_row, k_row, D) * scale;  // rounded, as the forward's scores were
          keep_rounded(score);
          const Acc prob = std::exp(score - a.lse[r]);
          const Acc ds = prob * (dot(do_row, v_row, D) - delta) * scale;
          axpy(ds, k_row, dq_row, D);
          axpy(prob, do_row, a.grad_v + key * D, D);
          axpy(ds, q_row, a.grad_k + key * D, D);
        }
        store_row(dq_row, a.grad_q + r * D, D);
      }
    }
}

// One task per storage type, compiled once per vector clone (float64 once).
#define QUIETSTAR_TASKS(In, CLONES)                                                                         \
  CLONES void forward_task(const Tree& t, const ChainForward<In>& a, Positions p, AccOf<In>* scratch) {    \
    forward_positions(t, a, p, scratch);                                                                    \
  }                                                                                                         \
  CLONES void backward_task(const Tree& t, const ChainBackward<In>& a, Positions p, AccOf<In>* scratch) {  \
    backward_positions(t, a, p, scratch);                                                                   \
  }
QUIETSTAR_TASKS(float, QUIETSTAR_CLONES)
QUIETSTAR_TASKS(c10::BFloat16, QUIETSTAR_CLONES)
QUIETSTAR_TASKS(c10::Half, QUIETSTAR_CLONES)
QUIETSTAR_TASKS(double, )
#undef QUIETSTAR_TASKS

// Runs `body(positions, scratch)` over every task, in parallel; scratch is one buffer per thread.
template <typename In, typename F>
void for_each_block(const Tree& t, F&& body) {
  const int64_t blocks = (t.slot_len + kPositionsPerTask - 1) / kPositionsPerTask;
  at::parallel_for(0, t.batch * t.kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<AccOf<In>> scratch(scratch_size<In>(t));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks, hk = (task / blocks) % t.kv_heads, b = task / (blocks * t.kv_heads);
      const int64_t first = block * kPositionsPerTask;
      body(Positions{b, hk, first, std::min(first + kPositionsPerTask, t.slot_len)}, scratch.data());
    }
  });
}

template <typename In>
void chain_forward_kernel(const Tree& t, const ChainForward<In>& a) {
  for_each_block<In>(t, [&](Positions p, AccOf<In>* scratch) { forward_task(t, a, p, scratch); });
}

template <typename In>
void chain_backward_kernel(const Tree& t, const ChainBackward<In>& a) {
  for_each_block<In>(t, [&](Positions p, AccOf<In>* scratch) { backward_task(t, a, p, scratch); });
}


void tree_attention_chain_forward_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                   at::Tensor& lse, int64_t slot_len, int64_t n_thoughts, double scale) {
  const Tree t = make_tree(q, k, v, slot_len, n_thoughts, scale);
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "out (the trunk's output) must be contiguous, shaped and typed as q");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.is_contiguous() && lse.scalar_type() == acc_type(q.scalar_type()),
              "lse (the trunk's log-sum-exp) must be contiguous [B, Hq, Sq*L], float64 for float64 q, else float32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_attention_chain_forward_", [&] {
    chain_forward_kernel<scalar_t>(t, {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                       out.data_ptr<scalar_t>(), lse.data_ptr<AccOf<scalar_t>>()});
  });
}

void tree_attention_chain_backward_(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v, int64_t slot_len,
                                    int64_t n_thoughts, double scale) {
  const Tree t = make_tree(q, k, v, slot_len, n_thoughts, scale);
  const c10::ScalarType acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.is_contiguous() && lse.scalar_type() == acc,
              "lse must be contiguous [B, Hq, Sq*L], float64 for float64 q, else float32");
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&grad_out, &out, &grad_q})
    TORCH_CHECK(x->sizes() == q.sizes() && x->is_contiguous() && x->scalar_type() == q.scalar_type(),
                "grad_out, out and grad_q must be contiguous, shaped and typed as q");
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&grad_k, &grad_v})
    TORCH_CHECK(x->sizes() == k.sizes() && x->is_contiguous() && x->scalar_type() == acc,
                "grad_k and grad_v must be contiguous, shaped as k, float64 for float64 q, else float32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_attention_chain_backward_", [&] {
    using Acc = AccOf<scalar_t>;
    chain_backward_kernel<scalar_t>(
        t, {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), lse.data_ptr<Acc>(), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<Acc>(),
            grad_v.data_ptr<Acc>()});
  });
}

}  // namespace

Tree make_tree(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t slot_len, int64_t n_thoughts,
               double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "quietstar native tree_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be [B, H, S*L, D]");
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  // A dimension of size 1 is only ever indexed at 0, so its stride is not read (PyTorch leaves
  // any stride there: a view of one token or one head, which is contiguous all the same).
  const auto stride_matters = [&](int64_t dim, int64_t stride, int64_t expected) {
    return k.size(dim) == 1 || stride == expected;
  };
  bool same_strides = v.sizes() == k.sizes();
  for (int64_t dim = 0; same_strides && dim < 4; ++dim) same_strides = stride_matters(dim, v.stride(dim), k.stride(dim));
  TORCH_CHECK(same_strides, "v must have the shape and strides of k");
  TORCH_CHECK(stride_matters(3, k.stride(3), 1) && stride_matters(2, k.stride(2), k.size(3)),
              "k and v must have contiguous rows and positions (strides [*, *, D, 1])");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k and v must have q's dtype");
  TORCH_CHECK(slot_len > 0 && q.size(2) % slot_len == 0 && k.size(2) % slot_len == 0, "slot_len must divide q and k");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(3) == k.size(3), "q's heads must be a multiple of k's, same D");
  TORCH_CHECK(k.size(0) == q.size(0), "k and v must have q's batch size");
  TORCH_CHECK(q.size(2) <= k.size(2), "q must have no more slots than k (its slots are k's last ones)");
  TORCH_CHECK(n_thoughts >= 1, "n_thoughts must be >= 1");
  // The kernels divide by the batch times KV heads and by the query heads per KV head.
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0 && k.size(1) > 0 && q.size(3) > 0,
              "q and k must have at least one batch row, head and head dimension, got q ", shape_text(q.sizes()),
              " and k ", shape_text(k.sizes()));
  Tree t(q.size(0), q.size(1), k.size(1), q.size(2) / slot_len, k.size(2) / slot_len, slot_len, q.size(3),
         n_thoughts, scale);
  t.kv_batch_stride = k.stride(0);
  t.kv_head_stride = k.stride(1);
  return t;
}

}  // namespace quietstar

TORCH_LIBRARY(quietstar, m) {
  m.def(
      "tree_attention_chain_forward_(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, int slot_len, "
      "int n_thoughts, float scale) -> ()");
  m.def(
      "tree_attention_chain_backward_(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v, int slot_len, int n_thoughts, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("tree_attention_chain_forward_", &quietstar::tree_attention_chain_forward_);
  m.impl("tree_attention_chain_backward_", &quietstar::tree_attention_chain_backward_);
}

// `import quietstar._C` loads the library, which registers the ops above under torch.ops.quietstar.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
