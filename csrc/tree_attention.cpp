// Tree attention on the CPU: the Quiet-STaR tree rule (SPEC section 1) in one pass per block
// of queries, FlashAttention-2 style. A query block runs an online softmax over the trunk key
// blocks it can see (causal, sliding window, padding; blocks above the diagonal or outside the
// window are skipped), then over each query's own chain keys, and keeps only its output and
// log-sum-exp. The backward recomputes the probabilities from the log-sum-exp: dQ per query
// block, dK/dV of the trunk per key block (every query slot and head of its group reads it),
// dK/dV of the chain per position. Products of blocks go through the BLAS that PyTorch links
// (its exported Fortran sgemm_/dgemm_; a build without them fails to link, and quietstar then
// uses its torch backend); GQA reads the shared K/V heads in place (no copies).
//
// Shapes (contiguous): q [B, Hq, Sq*L, D], k and v [B, Hkv, Sk*L, D], query slot j is key slot
// Sk - Sq + j; key_padding_mask [B, L] bool (True = real token) or empty; window <= 0: none.

#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

enum class TransposeType { NoTranspose, Transpose };

// Column-major BLAS gemm: c[m x n] = alpha * op(a) . op(b) + beta * c.
void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char tra = ta == TransposeType::Transpose ? 'T' : 'N', trb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int m_ = m, n_ = n, k_ = k, lda_ = lda, ldb_ = ldb, ldc_ = ldc;
  sgemm_(&tra, &trb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
}

void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const char tra = ta == TransposeType::Transpose ? 'T' : 'N', trb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int m_ = m, n_ = n, k_ = k, lda_ = lda, ldb_ = ldb, ldc_ = ldc;
  dgemm_(&tra, &trb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
}

constexpr int64_t kBlockM = 64;  // queries per block
constexpr int64_t kBlockN = 64;  // trunk keys per block

// One task of the per-query-block passes: batch row, query head, query slot, first query and
// row count, and the flat row of its first query and of its KV head's first key.
struct QueryBlock {
  int64_t b, h, j, i0, rows, q_row0, kv_base;
};

struct Tree {
  int64_t batch, q_heads, kv_heads, q_slots, k_slots, slot_len, dim, n_thoughts, window;
  double scale;
  const bool* padding;  // [B, L] or nullptr

  int64_t group() const { return q_heads / kv_heads; }
  int64_t query_block_tasks() const { return batch * q_heads * q_slots * q_blocks(); }
  QueryBlock query_block(int64_t task) const {
    const int64_t block = task % q_blocks();
    task /= q_blocks();
    const int64_t j = task % q_slots, h = (task / q_slots) % q_heads, b = task / (q_slots * q_heads);
    const int64_t i0 = block * kBlockM;
    return {b, h, j, i0, std::min(kBlockM, slot_len - i0), (b * q_heads + h) * q_slots * slot_len + j * slot_len + i0,
            (b * kv_heads + h / group()) * k_slots * slot_len};
  }
  int64_t q_blocks() const { return (slot_len + kBlockM - 1) / kBlockM; }
  int64_t k_blocks() const { return (slot_len + kBlockN - 1) / kBlockN; }
  // Key slot of query slot j.
  int64_t key_slot(int64_t j) const { return k_slots - q_slots + j; }
  // Whether chain key slot s2 (>= 1) is on the branch of key slot s (>= 1) and not after it.
  bool sees_chain(int64_t s, int64_t s2) const {
    return s >= 1 && s2 >= 1 && s2 <= s && (s - 1) % n_thoughts == (s2 - 1) % n_thoughts;
  }
  bool trunk_visible(int64_t b, int64_t i, int64_t k) const {
    if (k > i) return false;
    if (window > 0 && i - k >= window) return false;
    return padding == nullptr || padding[b * slot_len + k];
  }
  // First trunk key any query in [i0, i1) can see.
  int64_t first_key(int64_t i0) const { return window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0; }
  // Whether a block of keys [k0, k1) is fully visible to every query in [i0, i1) of row b.
  bool block_unmasked(int64_t b, int64_t i0, int64_t i1, int64_t k0, int64_t k1) const {
    if (k1 - 1 > i0) return false;
    if (window > 0 && (i1 - 1) - k0 >= window) return false;
    if (padding != nullptr)
      for (int64_t k = k0; k < k1; ++k)
        if (!padding[b * slot_len + k]) return false;
    return true;
  }
};

// c[m x n] (row-major, ldc) = alpha * a[m x kk] (row-major, lda) . b[n x kk]^T (row-major, ldb) + beta * c
template <typename T>
void rows_times_rows_t(int64_t m, int64_t n, int64_t kk, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                       int64_t ldc, T alpha, T beta) {
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, n, m, kk, alpha, b, ldb, a, lda, beta, c, ldc);
}

// c[m x n] = alpha * a[m x kk] . b[kk x n] + beta * c (all row-major)
template <typename T>
void rows_times(int64_t m, int64_t n, int64_t kk, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                int64_t ldc, T alpha, T beta) {
  gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, n, m, kk, alpha, b, ldb, a, lda, beta, c, ldc);
}

// c[m x n] = alpha * a[kk x m]^T . b[kk x n] + beta * c (all row-major)
template <typename T>
void rows_t_times(int64_t m, int64_t n, int64_t kk, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                  int64_t ldc, T alpha, T beta) {
  gemm(TransposeType::NoTranspose, TransposeType::Transpose, n, m, kk, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Vector loops. Float32 ones are compiled for AVX-512, AVX2 + FMA and baseline x86-64 and
// picked at load time by the CPU's features (GCC function multiversioning); float64 ones (the
// gradcheck path) are plain loops.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QUIETSTAR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define QUIETSTAR_CLONES
#endif

// exp(x) for x <= 88 to within a few ulp, 0 below -87 (so -inf gives 0): 2^n * e^f with
// n = round(x / ln 2) and |f| <= ln(2) / 2, e^f by its Taylor series to degree 7 (error 6e-9).
static inline float fast_exp(float x) {
  const float t = std::min(std::max(x, -87.0f), 88.0f) * 1.4426950408889634f;
  const float n = std::nearbyint(t);
  const float f = (t - n) * 0.6931471805599453f;
  float p = 1.9841270e-4f;
  p = p * f + 1.3888889e-3f;
  p = p * f + 8.3333333e-3f;
  p = p * f + 4.1666667e-2f;
  p = p * f + 1.6666667e-1f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

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

QUIETSTAR_CLONES float max_of(const float* x, int64_t n, float init) {
  float m = init;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

double max_of(const double* x, int64_t n, double init) {
  double m = init;
  for (int64_t c = 0; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x = exp(x - shift) in place; returns the sum.
QUIETSTAR_CLONES float exp_shifted(float* x, int64_t n, float shift) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    x[c] = fast_exp(x[c] - shift);
    sum += x[c];
  }
  return sum;
}

double exp_shifted(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    x[c] = std::exp(x[c] - shift);
    sum += x[c];
  }
  return sum;
}

// Scores of a trunk block, masked where the tree rule hides a key (-inf).
template <typename T>
void trunk_scores(const Tree& t, int64_t b, int64_t i0, int64_t rows, int64_t k0, int64_t cols, const T* q,
                  const T* k, T* scores) {
  rows_times_rows_t<T>(rows, cols, t.dim, q, t.dim, k, t.dim, scores, kBlockN, static_cast<T>(t.scale), 0);
  if (t.block_unmasked(b, i0, i0 + rows, k0, k0 + cols)) return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (!t.trunk_visible(b, i0 + r, k0 + c)) scores[r * kBlockN + c] = neg_inf;
}

template <typename T>
void forward_kernel(const Tree& t, const T* q, const T* k, const T* v, T* out, T* lse) {
  const int64_t L = t.slot_len, D = t.dim;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, t.query_block_tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kBlockM * kBlockN), acc(kBlockM * D), row_max(kBlockM), row_sum(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, j, i0, rows, q_row0, kv_base] = t.query_block(task);
      const T* qb_ptr = q + q_row0 * D;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      // Trunk: key blocks from the window's start to the block's last query.
      for (int64_t k0 = t.first_key(i0) / kBlockN * kBlockN; k0 <= i0 + rows - 1; k0 += kBlockN) {
        const int64_t cols = std::min(kBlockN, L - k0);
        trunk_scores<T>(t, b, i0, rows, k0, cols, qb_ptr, k + (kv_base + k0) * D, scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          T* s = scores.data() + r * kBlockN;
          T m = row_max[r];
          m = max_of(s, cols, m);
          if (m == neg_inf) {  // nothing visible yet in this row
            std::fill(s, s + cols, T(0));
            continue;
          }
          const T correction = std::exp(row_max[r] - m);
          const T sum = exp_shifted(s, cols, m);
          row_sum[r] = row_sum[r] * correction + sum;
          row_max[r] = m;
          if (correction != T(1))
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= correction;
        }
        rows_times<T>(rows, D, cols, scores.data(), kBlockN, v + (kv_base + k0) * D, D, acc.data(), D, 1, 1);
      }
      // Chain: each query's own chain keys at its position.
      const int64_t s_q = t.key_slot(j);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const T* q_row = qb_ptr + r * D;
        T* a = acc.data() + r * D;
        for (int64_t s2 = 1; s2 <= s_q; ++s2) {
          if (!t.sees_chain(s_q, s2)) continue;
          const int64_t key = kv_base + s2 * L + i;
          const T score = dot(q_row, k + key * D, D) * static_cast<T>(t.scale);
          const T m = std::max(row_max[r], score);
          const T correction = std::exp(row_max[r] - m), p = std::exp(score - m);
          for (int64_t d = 0; d < D; ++d) a[d] *= correction;
          axpy(p, v + key * D, a, D);
          row_sum[r] = row_sum[r] * correction + p;
          row_max[r] = m;
        }
        T* o = out + (q_row0 + r) * D;
        if (row_sum[r] == T(0)) {  // no visible key: zeros, and -inf so the backward gives 0
          std::fill(o, o + D, T(0));
          lse[q_row0 + r] = neg_inf;
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = a[d] / row_sum[r];
          lse[q_row0 + r] = row_max[r] + std::log(row_sum[r]);
        }
      }
    }
  });
}

// P = exp(S - lse) of a trunk block (0 where masked or where the row saw nothing), then
// dS = P * (dP - delta) * scale in place of dP. Returns nothing; fills probs and grad_scores.
template <typename T>
void trunk_probabilities(const Tree& t, int64_t rows, int64_t cols, const T* lse, const T* delta, T* probs,
                         T* grad_scores) {
  for (int64_t r = 0; r < rows; ++r) {
    T* p = probs + r * kBlockN;
    T* ds = grad_scores + r * kBlockN;
    if (std::isinf(lse[r]))
      std::fill(p, p + cols, T(0));
    else
      exp_shifted(p, cols, lse[r]);
    const T d = delta[r], scale = static_cast<T>(t.scale);
    for (int64_t c = 0; c < cols; ++c) ds[c] = p[c] * (ds[c] - d) * scale;
  }
}

template <typename T>
void backward_kernel(const Tree& t, const T* q, const T* k, const T* v, const T* grad_out, const T* lse,
                     const T* delta, T* grad_q, T* grad_k, T* grad_v) {
  const int64_t L = t.slot_len, D = t.dim, kb = t.k_blocks(), G = t.group();
  // dQ: per query block, trunk then chain.
  at::parallel_for(0, t.query_block_tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBlockM * kBlockN), grad_scores(kBlockM * kBlockN);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, j, i0, rows, q_row0, kv_base] = t.query_block(task);
      for (int64_t k0 = t.first_key(i0) / kBlockN * kBlockN; k0 <= i0 + rows - 1; k0 += kBlockN) {
        const int64_t cols = std::min(kBlockN, L - k0);
        trunk_scores<T>(t, b, i0, rows, k0, cols, q + q_row0 * D, k + (kv_base + k0) * D, probs.data());
        rows_times_rows_t<T>(rows, cols, D, grad_out + q_row0 * D, D, v + (kv_base + k0) * D, D, grad_scores.data(),
                             kBlockN, 1, 0);
        trunk_probabilities<T>(t, rows, cols, lse + q_row0, delta + q_row0, probs.data(), grad_scores.data());
        rows_times<T>(rows, D, cols, grad_scores.data(), kBlockN, k + (kv_base + k0) * D, D, grad_q + q_row0 * D, D, 1, 1);
      }
      const int64_t s_q = t.key_slot(j);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = q_row0 + r, i = i0 + r;
        if (std::isinf(lse[row])) continue;
        for (int64_t s2 = 1; s2 <= s_q; ++s2) {
          if (!t.sees_chain(s_q, s2)) continue;
          const int64_t key = kv_base + s2 * L + i;
          const T p = std::exp(dot(q + row * D, k + key * D, D) * static_cast<T>(t.scale) - lse[row]);
          const T ds = p * (dot(grad_out + row * D, v + key * D, D) - delta[row]) * static_cast<T>(t.scale);
          axpy(ds, k + key * D, grad_q + row * D, D);
        }
      }
    }
  });
  // dK, dV of the trunk: per key block, every query slot, head of the group and query block
  // that sees it.
  at::parallel_for(0, t.batch * t.kv_heads * kb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBlockM * kBlockN), grad_scores(kBlockM * kBlockN);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % kb, hk = (task / kb) % t.kv_heads, b = task / (kb * t.kv_heads);
      const int64_t k0 = block * kBlockN, cols = std::min(kBlockN, L - k0);
      const int64_t key0 = (b * t.kv_heads + hk) * t.k_slots * L + k0;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
        for (int64_t j = 0; j < t.q_slots; ++j)
          for (int64_t i0 = k0 / kBlockM * kBlockM; i0 < L; i0 += kBlockM) {
            const int64_t rows = std::min(kBlockM, L - i0);
            if (t.window > 0 && i0 - (k0 + cols - 1) >= t.window) break;  // all later queries too far
            const int64_t q_row0 = ((b * t.q_heads + h) * t.q_slots * L) + j * L + i0;
            trunk_scores<T>(t, b, i0, rows, k0, cols, q + q_row0 * D, k + key0 * D, probs.data());
            rows_times_rows_t<T>(rows, cols, D, grad_out + q_row0 * D, D, v + key0 * D, D, grad_scores.data(), kBlockN, 1, 0);
            trunk_probabilities<T>(t, rows, cols, lse + q_row0, delta + q_row0, probs.data(), grad_scores.data());
            // dV += P^T dO, dK += dS^T Q
            rows_t_times<T>(cols, D, rows, probs.data(), kBlockN, grad_out + q_row0 * D, D, grad_v + key0 * D, D, 1, 1);
            rows_t_times<T>(cols, D, rows, grad_scores.data(), kBlockN, q + q_row0 * D, D, grad_k + key0 * D, D, 1, 1);
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
            const T p = std::exp(dot(q + row * D, k + key * D, D) * static_cast<T>(t.scale) - lse[row]);
            const T ds = p * (dot(grad_out + row * D, v + key * D, D) - delta[row]) * static_cast<T>(t.scale);
            axpy(p, grad_out + row * D, grad_v + key * D, D);
            axpy(ds, q + row * D, grad_k + key * D, D);
          }
      }
    }
  });
}

Tree make_tree(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& padding, int64_t slot_len,
               int64_t n_thoughts, int64_t window, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "quietstar native tree_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be [B, H, S*L, D]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "q, k and v must be contiguous");
  TORCH_CHECK(slot_len > 0 && q.size(2) % slot_len == 0 && k.size(2) % slot_len == 0, "slot_len must divide q and k");
  const bool* pad = nullptr;
  if (padding.has_value() && padding->defined()) {
    TORCH_CHECK(padding->scalar_type() == at::kBool && padding->is_contiguous(), "key_padding_mask must be contiguous bool");
    pad = padding->data_ptr<bool>();
  }
  return Tree{q.size(0), q.size(1), k.size(1), q.size(2) / slot_len, k.size(2) / slot_len, slot_len, q.size(3),
              n_thoughts, window, scale, pad};
}

std::tuple<at::Tensor, at::Tensor> tree_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          int64_t slot_len, int64_t n_thoughts,
                                                          const std::optional<at::Tensor>& key_padding_mask,
                                                          int64_t window, double scale) {
  const Tree t = make_tree(q, k, key_padding_mask, slot_len, n_thoughts, window, scale);
  TORCH_CHECK(v.is_contiguous() && v.sizes() == k.sizes(), "v must be contiguous with the shape of k");
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tree_attention_forward", [&] {
    forward_kernel<scalar_t>(t, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t slot_len, int64_t n_thoughts, const std::optional<at::Tensor>& key_padding_mask,
    int64_t window, double scale) {
  const Tree t = make_tree(q, k, key_padding_mask, slot_len, n_thoughts, window, scale);
  auto grad = grad_out.contiguous();
  auto delta = (grad * out).sum(-1).contiguous();
  auto grad_q = at::zeros_like(q), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "tree_attention_backward", [&] {
    backward_kernel<scalar_t>(t, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              grad.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                              grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY(quietstar, m) {
  m.def(
      "tree_attention_forward(Tensor q, Tensor k, Tensor v, int slot_len, int n_thoughts, Tensor? key_padding_mask, "
      "int window, float scale) -> (Tensor, Tensor)");
  m.def(
      "tree_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int slot_len, "
      "int n_thoughts, Tensor? key_padding_mask, int window, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("tree_attention_forward", &tree_attention_forward);
  m.impl("tree_attention_backward", &tree_attention_backward);
}

// `import quietstar._C` loads the library, which registers the ops above under torch.ops.quietstar.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
