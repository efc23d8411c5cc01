// The lm_head's softmax over the vocabulary, for scores stored vocabulary-major ([V, C]: one
// column per scored row, as linear_cross_entropy's CPU path and the thought sampler keep them).
// PyTorch runs the softmax of such a chunk as four or five ops (column maxima, subtract, exp,
// column sums, scale), each a pass over V * C values, which at V = 49,152 do not fit any cache.
// Here each task takes 16 columns (one vector) down the whole vocabulary: the first pass reads
// them from memory, the later ones find them in the last-level cache (16 columns of 49,152
// floats are 3 MB), and exp is a vector polynomial (vexp).
//
// float32 scores (head_softmax_gradient_ also bfloat16: the half-precision head's products, rounded
// once more, to bfloat16, on the way out), unit column stride, any row stride; results float32.
// * head_logsumexp(scores) -> lse [C]: log(sum_v exp(scores[v, c])); scores unchanged.
// * head_softmax_gradient_(scores, targets, scale, multiplier) -> lse [C] of z = multiplier *
//   scores, and in place scores[v, c] = scale[c] * (softmax(z[:, c])[v] - (v == targets[c])):
//   the gradient of sum_c scale[c] * (lse[c] - z[targets[c], c]) with respect to z.
// * head_exp_block_sums_(scores, block) -> sums [ceil(V / block), C], and in place
//   scores[v, c] = exp(scores[v, c] - max_v scores[v, c]); sums[b, c] the sum of block b's
//   entries of column c (the thought sampler's inverse CDF).
// Non-finite columns as PyTorch's ops: one of -inf scores or holding a NaN is NaN throughout; a
// +inf gives NaN where it is (inf - inf), the other weights 0, and so a NaN log-sum-exp and
// gradient. exp results below float32's normal range (e^-87.3) are 0 where PyTorch keeps
// subnormals.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>

#include "vector_math.h"

#if !defined(__GNUC__)
#error "quietstar's native kernels need GCC or Clang vector extensions"
#endif

namespace quietstar {
namespace {

// Rows a pass handles per step with independent accumulators (the max and sum chains' latency).
constexpr int64_t kUnroll = 4;  // the reductions below combine exactly four
// Rows whose exponentials are summed in float32 before their sum joins a float64 total.
constexpr int64_t kSumBlock = 64;

// Scores stored as T: float, or bfloat16 (head_softmax_gradient_ only), computed in float.
template <typename T>
struct ColumnsOf {
  T* scores;
  int64_t vocab, stride;  // rows and the row stride, in elements
  int64_t first, count;   // this task's columns: [first, first + count), count <= kLanes
};
using Columns = ColumnsOf<float>;

template <typename T>
QUIETSTAR_INLINE Floats load_columns(const ColumnsOf<T>& c, int64_t v) {
  const T* p = c.scores + v * c.stride + c.first;
  return c.count == kLanes ? load(p) : load_first(p, c.count);
}

template <typename T>
QUIETSTAR_INLINE void store_columns(const ColumnsOf<T>& c, int64_t v, Floats x) {
  T* p = c.scores + v * c.stride + c.first;
  if (c.count == kLanes) {
    store(p, x);
  } else {
    store_first(p, x, c.count);
  }
}

QUIETSTAR_INLINE Floats max_of(Floats a, Floats b) { return a > b ? a : b; }

// Column maxima. A NaN score may be passed over here (torch.amax would return NaN): the exp
// pass turns it into a NaN sum, and each op below makes such a column NaN throughout.
template <typename T>
QUIETSTAR_INLINE Floats column_max(const ColumnsOf<T>& c, Floats multiplier = splat(1.0f)) {
  Floats m[kUnroll];
  for (auto& x : m) x = splat(-INFINITY);
  int64_t v = 0;
  for (; v + kUnroll <= c.vocab; v += kUnroll) {
    for (int64_t u = 0; u < kUnroll; ++u) m[u] = max_of(m[u], load_columns(c, v + u) * multiplier);
  }
  for (; v < c.vocab; ++v) m[0] = max_of(m[0], load_columns(c, v) * multiplier);
  return max_of(max_of(m[0], m[1]), max_of(m[2], m[3]));
}

// Sum over v of exp(scores[v] - top), with the exponentials written back when `store`.
template <bool kStore, typename T>
QUIETSTAR_INLINE Floats exp_sum(const ColumnsOf<T>& c, Floats top, int64_t begin, int64_t end,
                                Floats multiplier = splat(1.0f)) {
  Floats s[kUnroll] = {};
  int64_t v = begin;
  for (; v + kUnroll <= end; v += kUnroll) {
    for (int64_t u = 0; u < kUnroll; ++u) {
      const Floats e = vexp(load_columns(c, v + u) * multiplier - top);
      if constexpr (kStore) store_columns(c, v + u, e);
      s[u] += e;
    }
  }
  for (; v < end; ++v) {
    const Floats e = vexp(load_columns(c, v) * multiplier - top);
    if constexpr (kStore) store_columns(c, v, e);
    s[0] += e;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// exp_sum over all rows: float32 sums of kSumBlock rows, added up in float64 (one float32 sum
// over 49,152 rows would lose about 1e-5 of it; PyTorch's sums are pairwise).
template <bool kStore, typename T>
QUIETSTAR_INLINE Floats exp_total(const ColumnsOf<T>& c, Floats top, Floats multiplier = splat(1.0f)) {
  using Doubles = Vector<double, kLanes / 2>;
  Doubles low = {}, high = {};
  for (int64_t v = 0; v < c.vocab; v += kSumBlock) {
    const Floats s = exp_sum<kStore>(c, top, v, std::min(c.vocab, v + kSumBlock), multiplier);
    Vector<float, kLanes / 2> half;
    std::memcpy(&half, &s, sizeof(half));
    low += __builtin_convertvector(half, Doubles);
    std::memcpy(&half, reinterpret_cast<const char*>(&s) + sizeof(half), sizeof(half));
    high += __builtin_convertvector(half, Doubles);
  }
  const Vector<float, kLanes / 2> low_f = __builtin_convertvector(low, Vector<float, kLanes / 2>),
                                  high_f = __builtin_convertvector(high, Vector<float, kLanes / 2>);
  Floats total;
  std::memcpy(&total, &low_f, sizeof(low_f));
  std::memcpy(reinterpret_cast<char*>(&total) + sizeof(low_f), &high_f, sizeof(high_f));
  return total;
}

QUIETSTAR_INLINE Floats vlog(Floats x) {
  float lanes[kLanes];
  store(lanes, x);
  for (float& l : lanes) l = std::log(l);
  return load(lanes);
}

QUIETSTAR_CLONES void logsumexp_task(Columns c, float* lse) {
  const Floats top = column_max(c);
  const Floats lse_c = vlog(exp_total<false>(c, top)) + top;
  store_first(lse + c.first, lse_c, c.count);
}

QUIETSTAR_CLONES void softmax_gradient_task(Columns c, const int64_t* targets, const float* scale, float multiplier,
                                            float* lse) {
  const Floats times = splat(multiplier), top = column_max(c, times);
  const Floats total = exp_total<true>(c, top, times);
  store_first(lse + c.first, vlog(total) + top, c.count);
  const Floats factor = load_first(scale + c.first, c.count) / total;
  for (int64_t v = 0; v < c.vocab; ++v) store_columns(c, v, load_columns(c, v) * factor);
  for (int64_t j = 0; j < c.count; ++j) {
    c.scores[targets[c.first + j] * c.stride + c.first + j] -= scale[c.first + j];
  }
}

// bfloat16 scores, the same arithmetic rounded once: the exponentials are not stored between the
// passes (that would round them) but computed again for the last one, and each target's entry
// is formed from its score, kept before that pass overwrites it.
QUIETSTAR_CLONES void softmax_gradient_bf16_task(ColumnsOf<c10::BFloat16> c, const int64_t* targets, const float* scale,
                                                 float multiplier, float* lse) {
  const Floats times = splat(multiplier), top = column_max(c, times);
  const Floats total = exp_total<false>(c, top, times);
  store_first(lse + c.first, vlog(total) + top, c.count);
  float picked[kLanes] = {};
  for (int64_t j = 0; j < c.count; ++j) picked[j] = c.scores[targets[c.first + j] * c.stride + c.first + j];
  const Floats factor = load_first(scale + c.first, c.count) / total;
  for (int64_t v = 0; v < c.vocab; ++v) store_columns(c, v, vexp(load_columns(c, v) * times - top) * factor);
  float at_target[kLanes];
  store(at_target, vexp(load(picked) * times - top) * factor);
  for (int64_t j = 0; j < c.count; ++j) {
    const float gradient = at_target[j] - scale[c.first + j];
    c.scores[targets[c.first + j] * c.stride + c.first + j] = c10::BFloat16(gradient);
  }
}

QUIETSTAR_CLONES void exp_block_sums_task(Columns c, int64_t block, float* sums, int64_t sums_stride) {
  const Floats top = column_max(c);
  Floats nan_seen = {};  // NaN in the lanes of a column holding a NaN score
  const int64_t blocks = (c.vocab + block - 1) / block;
  for (int64_t b = 0; b < blocks; ++b) {
    const Floats s = exp_sum<true>(c, top, b * block, std::min(c.vocab, (b + 1) * block));
    nan_seen += s * 0.0f;  // s is NaN or finite: the weights are at most 1
    store_first(sums + b * sums_stride + c.first, s, c.count);
  }
  // A NaN sum comes from a NaN score, from a column of -inf, or from +inf (inf - inf: NaN at
  // that entry only, as in PyTorch's ops). In the first two cases PyTorch's column maximum is
  // NaN or -inf and its weights NaN throughout: so here too (rare: a scalar loop). A column
  // with both +inf and NaN is NaN only in the blocks holding them.
  float lanes[kLanes], tops[kLanes];
  store(lanes, nan_seen);
  store(tops, top);
  for (int64_t j = 0; j < c.count; ++j) {
    if (!std::isnan(lanes[j]) || tops[j] == INFINITY) continue;
    for (int64_t v = 0; v < c.vocab; ++v) c.scores[v * c.stride + c.first + j] = NAN;
    for (int64_t b = 0; b < blocks; ++b) sums[b * sums_stride + c.first + j] = NAN;
  }
}

void check_scores(const at::Tensor& scores, const char* op, bool bf16 = false) {
  TORCH_CHECK(scores.device().is_cpu(), op, ": scores must be a CPU tensor");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || (bf16 && scores.scalar_type() == at::kBFloat16), op,
              bf16 ? ": scores must be float32 or bfloat16, got " : ": scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) > 0, op, ": scores must be [V, C] with V > 0, got ",
              scores.sizes());
  TORCH_CHECK(scores.size(1) <= 1 || scores.stride(1) == 1, op, ": scores' columns must be adjacent (stride 1)");
  TORCH_CHECK(scores.size(0) <= 1 || scores.stride(0) >= std::max<int64_t>(1, scores.size(1)), op,
              ": scores' rows must not overlap (row stride at least C), got stride ", scores.stride(0));
}

// Runs task(columns) for each group of kLanes columns, in parallel.
template <typename T = float, typename Task>
void for_each_column_group(const at::Tensor& scores, const Task& task) {
  const int64_t columns = scores.size(1), groups = (columns + kLanes - 1) / kLanes;
  T* data = scores.data_ptr<T>();
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kLanes;
      task(ColumnsOf<T>{data, scores.size(0), scores.stride(0), first, std::min(kLanes, columns - first)});
    }
  });
}

}  // namespace

at::Tensor head_logsumexp(const at::Tensor& scores) {
  check_scores(scores, "head_logsumexp");
  at::Tensor lse = at::empty({scores.size(1)}, scores.options());
  float* out = lse.data_ptr<float>();
  for_each_column_group(scores, [&](Columns c) { logsumexp_task(c, out); });
  return lse;
}

at::Tensor head_softmax_gradient_(const at::Tensor& scores, const at::Tensor& targets, const at::Tensor& scale,
                                  double multiplier) {
  check_scores(scores, "head_softmax_gradient_", /*bf16=*/true);
  const int64_t columns = scores.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == columns &&
                  targets.is_contiguous() && targets.device().is_cpu(),
              "head_softmax_gradient_: targets must be contiguous int64 [C] for scores [V, C]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == columns &&
                  scale.is_contiguous() && scale.device().is_cpu(),
              "head_softmax_gradient_: scale must be contiguous float32 [C] for scores [V, C]");
  if (columns > 0) {
    const auto [low, high] = at::aminmax(targets);
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < scores.size(0),
                "head_softmax_gradient_: targets must lie in [0, V)");
  }
  at::Tensor lse = at::empty({columns}, scores.options().dtype(at::kFloat));
  const int64_t* t = targets.data_ptr<int64_t>();
  const float* s = scale.data_ptr<float>();
  float* out = lse.data_ptr<float>();
  const float times = static_cast<float>(multiplier);
  if (scores.scalar_type() == at::kBFloat16) {
    for_each_column_group<c10::BFloat16>(
        scores, [&](ColumnsOf<c10::BFloat16> c) { softmax_gradient_bf16_task(c, t, s, times, out); });
  } else {
    for_each_column_group(scores, [&](Columns c) { softmax_gradient_task(c, t, s, times, out); });
  }
  return lse;
}

at::Tensor head_exp_block_sums_(const at::Tensor& scores, int64_t block) {
  check_scores(scores, "head_exp_block_sums_");
  TORCH_CHECK(block > 0, "head_exp_block_sums_: block must be > 0, got ", block);
  const int64_t blocks = (scores.size(0) + block - 1) / block;
  at::Tensor sums = at::empty({blocks, scores.size(1)}, scores.options());
  float* out = sums.data_ptr<float>();
  for_each_column_group(scores, [&](Columns c) { exp_block_sums_task(c, block, out, scores.size(1)); });
  return sums;
}

}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def("head_logsumexp(Tensor scores) -> Tensor");
  m.def("head_softmax_gradient_(Tensor(a!) scores, Tensor targets, Tensor scale, float multiplier=1.0) -> Tensor");
  m.def("head_exp_block_sums_(Tensor(a!) scores, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("head_logsumexp", &quietstar::head_logsumexp);
  m.impl("head_softmax_gradient_", &quietstar::head_softmax_gradient_);
  m.impl("head_exp_block_sums_", &quietstar::head_exp_block_sums_);
}
