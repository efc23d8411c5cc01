// Tree attention's trunk on the CPU: every query slot's causal attention over the text's keys
// (key slot 0), float32, with the text's padding (a key padding mask) and a sliding window.
// All G * Sq query rows of a KV head (its G query heads in every query slot) read the
// same text keys, so a tile stacks them for a few consecutive positions: G * Sq * n rows (about
// kTileRows) against blocks of kKeyBlock keys make matrix products large enough to run near
// the GEMM rate, where a flash kernel over each (query head, slot) pair multiplies tiles of one
// sequence's rows. The causal mask cuts only the last n columns; a window skips the key blocks
// before its start. The products are ATen's (MKL or the build's BLAS, one thread per tile);
// the softmax between them is a vector loop.
//
// Forward: out and lse (the trunk's, -inf and zeros where a query sees no text key; the chain
// forward then merges its keys in place).
// Backward: from the merged output and log-sum-exp, dQ (written; the chain backward adds its
// share) and the text keys' dK/dV (added into the zeroed slot-0 rows of grad_k and grad_v).
// Each worker thread sums dK/dV over its tiles of a KV head; the workers' sums are added last.
//
// Shapes as tree_attention.cpp's: q, out, grad_out, grad_q [B, Hq, Sq*L, D] contiguous; k, v
// [B, Hkv, Sk*L, D] with contiguous rows; lse [B, Hq, Sq*L]; grad_k, grad_v contiguous.

#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "bf16_gemm.h"
#include "error_text.h"
#include "tree_attention.h"

namespace quietstar {
namespace {

// Query rows per tile: G * Sq rows for each of n positions, n = max(1, kTileRows / (G * Sq));
// with kKeyBlock keys, a tile's scores (384 x 128 floats) and its rows stay in a core's L2.
constexpr int64_t kTileRows = 384;
constexpr int64_t kKeyBlock = 128;
// Tiles per thread at least, where the positions allow (TrunkGeometry::tile_positions; the
// backward deals each KV head's tiles apart, so it counts one head's). Four of them, dealt by
// cost (for_each_task), split the one-slot calls of the thought sampling (128 positions, three
// KV heads, two threads) 9:9 where two in turn split them 5:4: those calls ran 7-8% faster
// (2-core AMD EPYC, float32).
constexpr int64_t kTilesPerThread = 4;

// The tiles of one call: positions [begin, end) of batch row b, KV head hk.
struct TrunkTile {
  int64_t b, hk, begin, end;
};

struct TrunkGeometry {
  const Tree& t;
  int64_t positions;  // per tile

  explicit TrunkGeometry(const Tree& tree) : t(tree), positions(tile_positions(tree)) {}

  // kTileRows query rows per tile, but at least kTilesPerThread tiles per thread where the
  // positions allow: one slot of queries (a sampling step through the cache) over three KV heads
  // would otherwise be three tiles, leaving one of two threads idle for a third of the call, and
  // a few causal tiles of unequal cost cannot be shared evenly (for_each_task).
  static int64_t tile_positions(const Tree& t) {
    const int64_t by_rows = std::max<int64_t>(1, kTileRows / (t.group() * t.q_slots));
    const int64_t heads = t.batch * t.kv_heads;
    const int64_t per_head = (kTilesPerThread * at::get_num_threads() + heads - 1) / heads;
    return std::min(by_rows, std::max<int64_t>(1, (t.slot_len + per_head - 1) / per_head));
  }

  int64_t stacked() const { return t.group() * t.q_slots; }  // query rows per position
  int64_t tiles_per_head() const { return (t.slot_len + positions - 1) / positions; }
  int64_t max_rows() const { return stacked() * positions; }

  // The task'th tile of KV head `head` (b * Hkv + hk), the latest positions first.
  TrunkTile tile(int64_t head, int64_t task) const {
    const int64_t first = (tiles_per_head() - 1 - task) * positions;
    return {head / t.kv_heads, head % t.kv_heads, first, std::min(first + positions, t.slot_len)};
  }

  // Row of q (and out, grad_out, lse) of stacked row `s` (g * Sq + j) at position `i`.
  int64_t q_row(const TrunkTile& p, int64_t s, int64_t i) const {
    return ((p.b * t.q_heads + p.hk * t.group()) * t.q_slots + s) * t.slot_len + i;
  }

  const float* text_rows(const float* keys, const TrunkTile& p) const {
    return keys + p.b * t.kv_batch_stride + p.hk * t.kv_head_stride;
  }
};

// A float matrix over memory the kernel owns (no copy): rows x cols, row stride ld.
at::Tensor matrix(const float* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

#if defined(__GNUC__)
QUIETSTAR_INLINE float lane_max(const Floats& x) {
  float m = x[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, x[l]);
  return m;
}
#endif

// max of row[begin .. end)
QUIETSTAR_INLINE float row_max(const float* row, int64_t begin, int64_t end) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t c = begin;
#if defined(__GNUC__)
  Floats acc = splat(m), x;
  for (; c + kLanes <= end; c += kLanes) {
    std::memcpy(&x, row + c, sizeof(x));
    acc = x > acc ? x : acc;
  }
  m = lane_max(acc);
#endif
  for (; c < end; ++c) m = std::max(m, row[c]);
  return m;
}

QUIETSTAR_INLINE float scalar_exp(float x) { return x < -87.3f ? 0.0f : std::exp(x); }

// row[c] = exp(row[c] * scale - shift) for begin <= c < end (0 for a score of -inf: a padded
// key), 0 for the other c < n; returns the sum. The product is rounded before the subtraction,
// as the shift (a maximum times scale, or a log-sum-exp from it) was (keep_rounded).
QUIETSTAR_INLINE float exp_row(float* row, int64_t begin, int64_t end, int64_t n, float scale, float shift) {
  float sum = 0;
  std::fill(row, row + begin, 0.0f);
  int64_t c = begin;
#if defined(__GNUC__)
  Floats acc = {}, x;
  for (; c + kLanes <= end; c += kLanes) {
    std::memcpy(&x, row + c, sizeof(x));
    Floats product = x * scale;
    keep_rounded(product);
    x = vexp(product - shift);
    acc += x;
    std::memcpy(row + c, &x, sizeof(x));
  }
  sum = lane_sum<float, kLanes>(acc);
#endif
  for (; c < end; ++c) {
    float product = row[c] * scale;
    keep_rounded(product);
    row[c] = scalar_exp(product - shift);
    sum += row[c];
  }
  std::fill(row + end, row + n, 0.0f);
  return sum;
}

// What the text keys look like to one call: the padding mask's row per batch row (null: none)
// and the window (0: none).
struct TextKeys {
  const bool* real;  // [B, L], true for a real token
  int64_t window;

  // The keys [first, last) of a block [k0, k0 + kb) that position i may see (causal, window),
  // relative to k0; empty when first >= last.
  std::pair<int64_t, int64_t> range(int64_t i, int64_t k0, int64_t kb) const {
    const int64_t first = window > 0 ? std::max<int64_t>(0, i - window + 1 - k0) : 0;
    return {std::min(first, kb), std::max<int64_t>(0, std::min(kb, i + 1 - k0))};
  }

  // First key any of positions [begin, end) sees: the key blocks before it are skipped.
  int64_t first_key(int64_t begin) const {
    return window > 0 ? std::max<int64_t>(0, begin - window + 1) / kKeyBlock * kKeyBlock : 0;
  }

  // Scores of padded keys in a block of batch row b to -inf (their probabilities come out 0).
  void hide_padding(float* scores, int64_t rows, int64_t b, int64_t slot_len, int64_t k0, int64_t kb,
                    int64_t ld) const {
    if (real == nullptr) return;
    const bool* keys = real + b * slot_len + k0;
    for (int64_t c = 0; c < kb; ++c)
      if (!keys[c])
        for (int64_t m = 0; m < rows; ++m) scores[m * ld + c] = -std::numeric_limits<float>::infinity();
  }
};

// A tile's work for for_each_task: its rows times the keys its products cover (from the first
// key block it reads), plus its rows once (the gathers, the softmax's per-row work).
int64_t tile_cost(const TrunkGeometry& g, const TextKeys& text, const TrunkTile& p) {
  return g.stacked() * (p.end - p.begin) * (p.end - text.first_key(p.begin) + 1);
}

// Copies the stacked rows of a tile out of x (a [B, Hq, Sq*L, D] tensor) into rows [M, D].
QUIETSTAR_INLINE void gather(const TrunkGeometry& g, const TrunkTile& p, const float* x, float* rows) {
  const int64_t n = p.end - p.begin, D = g.t.dim;
  for (int64_t s = 0; s < g.stacked(); ++s)
    std::memcpy(rows + s * n * D, x + g.q_row(p, s, p.begin) * D, n * D * sizeof(float));
}

QUIETSTAR_INLINE void scatter(const TrunkGeometry& g, const TrunkTile& p, const float* rows, float* x) {
  const int64_t n = p.end - p.begin, D = g.t.dim;
  for (int64_t s = 0; s < g.stacked(); ++s)
    std::memcpy(x + g.q_row(p, s, p.begin) * D, rows + s * n * D, n * D * sizeof(float));
}

struct TrunkForward {
  const float *q, *k, *v;
  float *out, *lse;
  TextKeys text;
  bool bf16;  // the inputs hold bfloat16 values: multiply them with AVX-512 BF16 (bf16_gemm.h)
};

struct TrunkBackward {
  const float *grad_out, *q, *k, *v, *out, *lse;
  float* grad_q;
  TextKeys text;
  bool bf16;  // as TrunkForward's; the workers' dK/dV sums are then transposed, [D, L]
};

// One tile's output and log-sum-exp: online softmax over blocks of text keys.
QUIETSTAR_CLONES void trunk_forward_tile(const TrunkGeometry& g, const TrunkForward& a, TrunkTile p, float* scratch,
                                         bf16* half_scratch) {
  const int64_t D = g.t.dim, n = p.end - p.begin, M = g.stacked() * n;
  const float scale = static_cast<float>(g.t.scale), neg_inf = -std::numeric_limits<float>::infinity();
  float *rows = scratch, *acc = rows + M * D, *scores = acc + M * D, *maxes = scores + M * kKeyBlock,
        *sums = maxes + M;
  // With bfloat16 products: the query rows, a block's keys and values packed, its probabilities.
  bf16 *rows16 = half_scratch, *keys16 = rows16 + M * D, *values16 = keys16 + kKeyBlock * D,
       *probs16 = values16 + kKeyBlock * D;
  gather(g, p, a.q, rows);
  if (a.bf16) rows_to_bf16(rows, M, D, D, rows16, D);
  std::fill(acc, acc + M * D, 0.0f);
  std::fill(maxes, maxes + M, neg_inf);
  std::fill(sums, sums + M, 0.0f);
  const float *keys = g.text_rows(a.k, p), *values = g.text_rows(a.v, p);
  const at::Tensor q_tile = matrix(rows, M, D, D);
  at::Tensor out_tile = matrix(acc, M, D, D);
  for (int64_t k0 = a.text.first_key(p.begin); k0 < p.end; k0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, p.end - k0);
    const int64_t ld = a.bf16 ? round_up(kb, 16) : kb;  // row stride of the block's scores
    at::Tensor block_scores = matrix(scores, M, kb, ld);
    if (a.bf16) {
      pack_transposed(keys + k0 * D, kb, D, D, ld, keys16);
      gemm_bf16(M, ld, D, rows16, D, keys16, scores, ld, /*accumulate=*/false);
    } else {
      at::cpu::mm_out(block_scores, q_tile, matrix(keys + k0 * D, kb, D, D).t());
    }
    a.text.hide_padding(scores, M, p.b, g.t.slot_len, k0, kb, ld);
    for (int64_t m = 0; m < M; ++m) {
      float* row = scores + m * ld;
      const auto [first, last] = a.text.range(p.begin + m % n, k0, kb);
      const float top = first < last ? std::max(maxes[m], row_max(row, first, last) * scale) : neg_inf;
      if (top == neg_inf) {  // nothing visible yet: no probabilities, nothing to rescale
        std::fill(row, row + kb, 0.0f);
        continue;
      }
      const float rescale = scalar_exp(maxes[m] - top);  // 0 while the max was -inf
      sums[m] = sums[m] * rescale + exp_row(row, first, last, kb, scale, top);
      maxes[m] = top;
      if (rescale != 1.0f)
        for (float *o = acc + m * D, *o_end = o + D; o != o_end; ++o) *o *= rescale;
    }
    if (a.bf16) {  // the probabilities rounded to bfloat16, as PyTorch's bfloat16 flash kernel does
      const int64_t pairs = round_up(kb, 2);
      rows_to_bf16(scores, M, kb, ld, probs16, pairs);
      pack_rows(values + k0 * D, kb, D, D, pairs, values16);
      gemm_bf16(M, D, pairs, probs16, pairs, values16, acc, D, /*accumulate=*/true);
    } else {
      at::cpu::addmm_(out_tile, block_scores, matrix(values + k0 * D, kb, D, D));
    }
  }
  for (int64_t m = 0; m < M; ++m) {  // a query that saw no key keeps its zeros
    const float inverse = sums[m] > 0.0f ? 1.0f / sums[m] : 0.0f;
    for (float *o = acc + m * D, *o_end = o + D; o != o_end; ++o) *o *= inverse;
  }
  scatter(g, p, acc, a.out);
  for (int64_t s = 0; s < g.stacked(); ++s)
    for (int64_t i = p.begin; i < p.end; ++i) {
      const int64_t m = s * n + i - p.begin;
      a.lse[g.q_row(p, s, i)] = sums[m] > 0.0f ? maxes[m] + std::log(sums[m]) : neg_inf;
    }
}

// One tile's dQ (written) and its share of the text keys' dK/dV (added to the worker's sums:
// [L, D], or [D, L] with bfloat16 products, which give dK and dV transposed).
QUIETSTAR_CLONES void trunk_backward_tile(const TrunkGeometry& g, const TrunkBackward& a, TrunkTile p, float* scratch,
                                          bf16* half_scratch, float* grad_k, float* grad_v) {
  const int64_t D = g.t.dim, L = g.t.slot_len, n = p.end - p.begin, M = g.stacked() * n, M2 = round_up(M, 2);
  const float scale = static_cast<float>(g.t.scale);
  float *rows = scratch, *grad_rows = rows + M * D, *grad_q = grad_rows + M * D, *probs = grad_q + M * D,
        *grad_scores = probs + M * kKeyBlock, *lse = grad_scores + M * kKeyBlock, *delta = lse + M,
        *block_grad = delta + M;  // a block's dK or dV, transposed [D, columns]
  // With bfloat16 products: q and dO rows and their transposes, a block's keys and values packed
  // both ways, P or dS packed along the rows, dS rows.
  bf16 *rows16 = half_scratch, *grad16 = rows16 + M * D, *rows_t16 = grad16 + M * D, *grad_t16 = rows_t16 + D * M2,
       *keys_t16 = grad_t16 + D * M2, *values_t16 = keys_t16 + D * kKeyBlock, *keys16 = values_t16 + D * kKeyBlock,
       *packed16 = keys16 + kKeyBlock * D, *grad_scores16 = packed16 + M2 * kKeyBlock;
  gather(g, p, a.q, rows);
  gather(g, p, a.grad_out, grad_rows);
  std::fill(grad_q, grad_q + M * D, 0.0f);
  if (a.bf16) {
    rows_to_bf16(rows, M, D, D, rows16, D);
    rows_to_bf16(grad_rows, M, D, D, grad16, D);
    transpose_bf16(rows16, M, D, rows_t16, M2);
    transpose_bf16(grad16, M, D, grad_t16, M2);
  }
  for (int64_t s = 0; s < g.stacked(); ++s)
    for (int64_t i = p.begin; i < p.end; ++i) {
      const int64_t m = s * n + i - p.begin, r = g.q_row(p, s, i);
      lse[m] = a.lse[r];
      delta[m] = dot(grad_rows + m * D, a.out + r * D, D);
    }
  const float *keys = g.text_rows(a.k, p), *values = g.text_rows(a.v, p);
  const at::Tensor q_tile = matrix(rows, M, D, D), grad_tile = matrix(grad_rows, M, D, D);
  at::Tensor grad_q_tile = matrix(grad_q, M, D, D);
  // Adds a block's transposed dK or dV [D, columns] into the worker's transposed sums.
  auto add_transposed = [&](float* sums, int64_t k0, int64_t kb, int64_t columns) {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < kb; ++c) sums[d * L + k0 + c] += block_grad[d * columns + c];
  };
  for (int64_t k0 = a.text.first_key(p.begin); k0 < p.end; k0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, p.end - k0);
    const int64_t ld = a.bf16 ? round_up(kb, 16) : kb;  // row stride of the block's scores
    const at::Tensor block_keys = matrix(keys + k0 * D, kb, D, D), block_values = matrix(values + k0 * D, kb, D, D);
    at::Tensor block_probs = matrix(probs, M, kb, ld), block_grad_scores = matrix(grad_scores, M, kb, ld);
    if (a.bf16) {
      pack_transposed(keys + k0 * D, kb, D, D, ld, keys_t16);
      gemm_bf16(M, ld, D, rows16, D, keys_t16, probs, ld, /*accumulate=*/false);
    } else {
      at::cpu::mm_out(block_probs, q_tile, block_keys.t());
    }
    a.text.hide_padding(probs, M, p.b, g.t.slot_len, k0, kb, ld);
    for (int64_t m = 0; m < M; ++m) {
      const auto [first, last] = a.text.range(p.begin + m % n, k0, kb);
      if (lse[m] == -std::numeric_limits<float>::infinity())  // the query saw nothing at all
        std::fill(probs + m * ld, probs + (m + 1) * ld, 0.0f);
      else
        exp_row(probs + m * ld, first, last, kb, scale, lse[m]);
      std::fill(probs + m * ld + kb, probs + (m + 1) * ld, 0.0f);  // the kernel's padding columns
    }
    if (a.bf16) {  // dV^T = dO^T P, dP = dO V^T
      pack_rows(probs, M, ld, ld, M2, packed16);
      gemm_bf16(D, ld, M2, grad_t16, M2, packed16, block_grad, ld, /*accumulate=*/false);
      add_transposed(grad_v, k0, kb, ld);
      pack_transposed(values + k0 * D, kb, D, D, ld, values_t16);
      gemm_bf16(M, ld, D, grad16, D, values_t16, grad_scores, ld, /*accumulate=*/false);
    } else {
      at::Tensor block_grad_v = matrix(grad_v + k0 * D, kb, D, D);
      at::cpu::addmm_(block_grad_v, block_probs.t(), grad_tile);
      at::cpu::mm_out(block_grad_scores, grad_tile, block_values.t());
    }
    // dS = P * (dP - delta), times the scale with bfloat16 products (the float32 products take it)
    const float ds_scale = a.bf16 ? scale : 1.0f;
    for (int64_t m = 0; m < M; ++m) {
      const float *prob = probs + m * ld, row_delta = delta[m];
      float* ds = grad_scores + m * ld;
#pragma omp simd
      for (int64_t c = 0; c < ld; ++c) ds[c] = prob[c] * (ds[c] - row_delta) * ds_scale;
    }
    if (a.bf16) {  // dQ += dS K, dK^T = Q^T dS
      rows_to_bf16(grad_scores, M, ld, ld, grad_scores16, ld);
      pack_rows(keys + k0 * D, kb, D, D, ld, keys16);
      gemm_bf16(M, D, ld, grad_scores16, ld, keys16, grad_q, D, /*accumulate=*/true);
      pack_rows(grad_scores, M, ld, ld, M2, packed16);
      gemm_bf16(D, ld, M2, rows_t16, M2, packed16, block_grad, ld, /*accumulate=*/false);
      add_transposed(grad_k, k0, kb, ld);
    } else {
      at::cpu::addmm_(grad_q_tile, block_grad_scores, block_keys, 1.0, scale);
      at::Tensor block_grad_k = matrix(grad_k + k0 * D, kb, D, D);
      at::cpu::addmm_(block_grad_k, block_grad_scores.t(), q_tile, 1.0, scale);
    }
  }
  scatter(g, p, grad_q, a.grad_q);
}

// Runs body(task, worker) for tasks [0, n) on the intra-op threads, each task once. Tasks are
// dealt costliest first (cost(task): an estimate of its work), each to the worker with the least
// work so far (the lowest such index on a tie): the workers' shares stay even where the tiles of
// a call differ in cost (a causal tile of late positions sees more keys than an early one; round
// robin over a few such tiles left one of two cores idle for a fifth of a sampling step's
// call). The plan depends only on the costs and the thread count, so which worker sums which
// tile's dK/dV is fixed and the backward repeats bit for bit (for a given thread count).
template <typename Cost, typename F>
void for_each_task(int64_t n, Cost&& cost, F&& body) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> order(n), costs(n), load(workers, 0);
  for (int64_t task = 0; task < n; ++task) {
    order[task] = task;
    costs[task] = cost(task);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return costs[x] > costs[y]; });
  std::vector<std::vector<int64_t>> plan(workers);
  for (const int64_t task : order) {
    const int64_t worker = std::min_element(load.begin(), load.end()) - load.begin();
    plan[worker].push_back(task);
    load[worker] += costs[task];
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (const int64_t task : plan[worker]) body(task, worker);
  });
}

int64_t forward_scratch(const TrunkGeometry& g) {
  const int64_t M = g.max_rows();
  return 2 * M * g.t.dim + M * kKeyBlock + 2 * M;
}

// bfloat16 elements: the query rows, a block's packed keys and values, its probabilities.
int64_t forward_half_scratch(const TrunkGeometry& g) {
  const int64_t M = g.max_rows();
  return M * g.t.dim + 2 * kKeyBlock * g.t.dim + M * kKeyBlock;
}

int64_t backward_scratch(const TrunkGeometry& g) {
  const int64_t M = g.max_rows();
  return 3 * M * g.t.dim + 2 * M * kKeyBlock + 2 * M + g.t.dim * kKeyBlock;
}

// bfloat16 elements: q and dO rows and transposes, a block's keys and values packed, P or dS
// packed along the rows, dS rows.
int64_t backward_half_scratch(const TrunkGeometry& g) {
  const int64_t M = g.max_rows(), M2 = round_up(M, 2), D = g.t.dim;
  return 2 * M * D + 2 * D * M2 + 3 * kKeyBlock * D + M2 * kKeyBlock + M * kKeyBlock;
}

void check_bf16_products(const Tree& t, bool bf16_products) {
  TORCH_CHECK(!bf16_products || (cpu_has_avx512_bf16() && t.dim % 16 == 0 && t.dim <= 512),
              "bf16_products needs a CPU with AVX-512 BF16 and a head size that is a multiple of 16 (at most 512)");
}

void check_float(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kFloat, "the native trunk computes float32 q, k and v; got ", q.scalar_type());
}

TextKeys text_keys(const Tree& t, const std::optional<at::Tensor>& key_padding_mask, int64_t sliding_window) {
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none), got ", number_text(sliding_window));
  if (!key_padding_mask.has_value()) return {nullptr, sliding_window};
  const at::Tensor& mask = *key_padding_mask;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2 && mask.size(0) == t.batch &&
                  mask.size(1) == t.slot_len,
              "key_padding_mask must be a contiguous bool [B, slot_len] tensor");
  return {mask.data_ptr<bool>(), sliding_window};
}

void tree_attention_trunk_forward_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                   at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
                                   int64_t sliding_window, int64_t slot_len, double scale, bool bf16_products) {
  const Tree t = make_tree(q, k, v, slot_len, 1, scale);
  check_float(q);
  check_bf16_products(t, bf16_products);
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "out must be contiguous, shaped as q, float32");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "lse must be contiguous [B, Hq, Sq*L], float32");
  const TrunkGeometry g(t);
  const TrunkForward a{q.data_ptr<float>(),   k.data_ptr<float>(),   v.data_ptr<float>(),
                       out.data_ptr<float>(), lse.data_ptr<float>(), text_keys(t, key_padding_mask, sliding_window),
                       bf16_products};
  const int64_t per_head = g.tiles_per_head(), heads = t.batch * t.kv_heads;
  std::vector<std::vector<float>> scratch(at::get_num_threads(), std::vector<float>());
  std::vector<std::vector<bf16>> half_scratch(at::get_num_threads(), std::vector<bf16>());
  // Heads interleaved: task % heads is the head, task / heads its tile.
  const auto tile = [&](int64_t task) { return g.tile(task % heads, task / heads); };
  const auto cost = [&](int64_t task) { return tile_cost(g, a.text, tile(task)); };
  for_each_task(heads * per_head, cost, [&](int64_t task, int64_t worker) {
    std::vector<float>& own = scratch[worker];
    if (own.empty()) own.resize(forward_scratch(g));
    std::vector<bf16>& own_half = half_scratch[worker];
    if (bf16_products && own_half.empty()) own_half.resize(forward_half_scratch(g));
    trunk_forward_tile(g, a, tile(task), own.data(), own_half.data());
  });
}

void tree_attention_trunk_backward_(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                                    const std::optional<at::Tensor>& key_padding_mask, int64_t sliding_window,
                                    int64_t slot_len, double scale, bool bf16_products) {
  const Tree t = make_tree(q, k, v, slot_len, 1, scale);
  check_float(q);
  check_bf16_products(t, bf16_products);
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "lse must be contiguous [B, Hq, Sq*L], float32");
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&grad_out, &out, &grad_q})
    TORCH_CHECK(x->sizes() == q.sizes() && x->is_contiguous() && x->scalar_type() == at::kFloat,
                "grad_out, out and grad_q must be contiguous, shaped as q, float32");
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&grad_k, &grad_v})
    TORCH_CHECK(x->sizes() == k.sizes() && x->is_contiguous() && x->scalar_type() == at::kFloat,
                "grad_k and grad_v must be contiguous, shaped as k, float32");
  const TrunkGeometry g(t);
  const TrunkBackward a{grad_out.data_ptr<float>(), q.data_ptr<float>(),    k.data_ptr<float>(),
                        v.data_ptr<float>(),        out.data_ptr<float>(), lse.data_ptr<float>(),
                        grad_q.data_ptr<float>(),   text_keys(t, key_padding_mask, sliding_window),
                        bf16_products};
  const int64_t L = t.slot_len, D = t.dim, text = L * D;
  const int64_t workers = at::get_num_threads();
  // Per worker: its tile scratch, then its sums of the text keys' dK and dV for the current head.
  std::vector<std::vector<float>> scratch(workers, std::vector<float>());
  std::vector<std::vector<bf16>> half_scratch(workers, std::vector<bf16>());
  for (int64_t head = 0; head < t.batch * t.kv_heads; ++head) {
    std::vector<char> used(workers, 0);
    const auto cost = [&](int64_t task) { return tile_cost(g, a.text, g.tile(head, task)); };
    for_each_task(g.tiles_per_head(), cost, [&](int64_t task, int64_t worker) {
      std::vector<float>& own = scratch[worker];
      if (own.empty()) own.resize(backward_scratch(g) + 2 * text);
      std::vector<bf16>& own_half = half_scratch[worker];
      if (bf16_products && own_half.empty()) own_half.resize(backward_half_scratch(g));
      float* sums = own.data() + backward_scratch(g);
      if (!used[worker]) std::fill(sums, sums + 2 * text, 0.0f);
      used[worker] = 1;
      trunk_backward_tile(g, a, g.tile(head, task), own.data(), own_half.data(), sums, sums + text);
    });
    // The text keys are key slot 0 of grad_k and grad_v's head.
    float *dk = grad_k.data_ptr<float>() + head * t.k_slots * text, *dv = grad_v.data_ptr<float>() + head * t.k_slots * text;
    at::parallel_for(0, text, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t w = 0; w < workers; ++w) {
        if (!used[w]) continue;
        const float* sums = scratch[w].data() + backward_scratch(g);
        for (int64_t x = begin; x < end; ++x) {
          const int64_t sum = bf16_products ? (x % D) * L + x / D : x;  // the sums are [D, L] then
          dk[x] += sums[sum];
          dv[x] += sums[text + sum];
        }
      }
    });
  }
}

}  // namespace
}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def(
      "tree_attention_trunk_forward_(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, "
      "Tensor? key_padding_mask, int sliding_window, int slot_len, float scale, bool bf16_products) -> ()");
  m.def("cpu_has_avx512_bf16() -> bool", &quietstar::cpu_has_avx512_bf16);
  m.def(
      "tree_attention_trunk_backward_(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v, Tensor? key_padding_mask, int sliding_window, "
      "int slot_len, float scale, bool bf16_products) -> ()");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("tree_attention_trunk_forward_", &quietstar::tree_attention_trunk_forward_);
  m.impl("tree_attention_trunk_backward_", &quietstar::tree_attention_trunk_backward_);
}
