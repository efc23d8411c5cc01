// The lm_head's softmax over the vocabulary, for scores stored vocabulary-major ([V, C]: one
// column per scored row, as linear_cross_entropy's CPU path and the thought sampler keep them).
// PyTorch runs the softmax of such a chunk as four or five ops (column maxima, subtract, exp,
// column sums, scale), each a pass over V * C values, which at V = 49,152 do not fit any cache.
// Here the chunk is cut into tiles of up to kPartRows rows by kSlabColumns columns, one task
// each, read row by row (contiguous memory, as the prefetchers and the TLB want it; walking 16
// columns down the whole vocabulary touched a new page every row and ran 3-6x slower on an Intel
// Xeon). Each tile keeps, per column, a running maximum and the sum of exponentials under it,
// updated a block of kSumBlock rows at a time (the block's maximum first, then its exponentials
// from cache), and the tiles' results are combined in a fixed order: so the softmax gradient
// reads the scores from memory twice and writes them once, and the results do not depend on the
// thread count. exp is a vector polynomial (vexp).
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

#include <algorithm>
#include <cmath>
#include <vector>

#include "error_text.h"
#include "vector_math.h"

#if !defined(__GNUC__)
#error "quietstar's native kernels need GCC or Clang vector extensions"
#endif

namespace quietstar {
namespace {

// Rows a pass handles per step with independent sums (the add chains' latency).
constexpr int64_t kUnroll = 4;  // the reductions below combine exactly four
// Rows whose exponentials are summed in float32 before their sum joins a float64 total; also the
// rows whose maximum is taken before their exponentials (a block of a slab stays in L2).
constexpr int64_t kSumBlock = 64;
// A task's tile: up to kPartRows rows (whose results are combined across tiles in a fixed order)
// by up to kSlabColumns columns (kSlabVectors vectors of per-column state, in L1).
constexpr int64_t kPartRows = 4096;
constexpr int64_t kSlabColumns = 512;
constexpr int64_t kSlabVectors = kSlabColumns / kLanes;

using Doubles = Vector<double, kLanes / 2>;

// Scores stored as T: float, or bfloat16 (head_softmax_gradient_ only), computed in float.
template <typename T>
struct ScoresOf {
  T* data;
  int64_t vocab, columns, stride;  // rows, columns and the row stride, in elements
};

// One task's share of the scores: rows [row_begin, row_end), columns [column_begin, column_end).
struct Tile {
  int64_t part;  // which row part: the index of its partial results
  int64_t row_begin, row_end, column_begin, column_end;
  QUIETSTAR_INLINE int64_t vectors() const { return (column_end - column_begin + kLanes - 1) / kLanes; }
  // Columns in vector j of the tile (kLanes but in the last).
  QUIETSTAR_INLINE int64_t width(int64_t j) const { return std::min(kLanes, column_end - column_begin - j * kLanes); }
};

// Vector j of the tile's columns in `row` (a row of scores, or per-column values).
template <typename T>
QUIETSTAR_INLINE Floats load_tile(const T* row, const Tile& t, int64_t j) {
  const T* p = row + t.column_begin + j * kLanes;
  return t.width(j) == kLanes ? load(p) : load_first(p, t.width(j));
}

template <typename T>
QUIETSTAR_INLINE Floats load_at(const ScoresOf<T>& s, const Tile& t, int64_t v, int64_t j) {
  return load_tile(s.data + v * s.stride, t, j);
}

template <typename T>
QUIETSTAR_INLINE void store_at(const ScoresOf<T>& s, const Tile& t, int64_t v, int64_t j, Floats x) {
  T* p = s.data + v * s.stride + t.column_begin + j * kLanes;
  if (t.width(j) == kLanes) {
    store(p, x);
  } else {
    store_first(p, x, t.width(j));
  }
}

// Maxima that may pass over a NaN (torch.amax would return NaN; a select that keeps it, GCC
// 12 compiles to scalar code in the vector clones, 3x slower): a NaN score still makes its
// exponential, and so its column's sum, NaN.
QUIETSTAR_INLINE Floats max_of(Floats a, Floats b) { return a > b ? a : b; }
QUIETSTAR_INLINE float max_of(float a, float b) { return a > b ? a : b; }

QUIETSTAR_INLINE void widen(Floats x, Doubles& low, Doubles& high) {
  Vector<float, kLanes / 2> half;
  std::memcpy(&half, &x, sizeof(half));
  low = __builtin_convertvector(half, Doubles);
  std::memcpy(&half, reinterpret_cast<const char*>(&x) + sizeof(half), sizeof(half));
  high = __builtin_convertvector(half, Doubles);
}

// Per column of the tile: the maximum m of z = multiplier * scores over its rows and the sum of
// exp(z - m) (float32 within blocks of kSumBlock rows, float64 across), into part_max and
// part_sum at the tile's columns. A NaN score makes the sum NaN; a column of -inf has maximum
// -inf and sum 0.
template <typename T>
QUIETSTAR_INLINE void max_and_sum(const ScoresOf<T>& s, const Tile& t, float multiplier, float* part_max,
                                  double* part_sum) {
  const int64_t vectors = t.vectors();
  const Floats times = splat(multiplier), minus_infinity = splat(-INFINITY);
  Floats top[kSlabVectors], block_top[kSlabVectors], sums[kUnroll][kSlabVectors];
  Doubles low[kSlabVectors] = {}, high[kSlabVectors] = {};
  for (int64_t j = 0; j < vectors; ++j) top[j] = minus_infinity;
  for (int64_t begin = t.row_begin; begin < t.row_end; begin += kSumBlock) {
    const int64_t end = std::min(t.row_end, begin + kSumBlock);
    for (int64_t j = 0; j < vectors; ++j) block_top[j] = top[j];
    for (int64_t v = begin; v < end; ++v) {
      for (int64_t j = 0; j < vectors; ++j) block_top[j] = max_of(block_top[j], load_at(s, t, v, j) * times);
    }
    for (int64_t j = 0; j < vectors; ++j) {
      // Exponentials under a -inf maximum are taken under 0 instead (all 0, not NaN).
      const Floats under = block_top[j] == minus_infinity ? Floats{} : block_top[j];
      Doubles rescale_low, rescale_high;
      widen(vexp(top[j] - under), rescale_low, rescale_high);
      low[j] *= rescale_low;
      high[j] *= rescale_high;
      top[j] = block_top[j];
      block_top[j] = under;
      for (auto& sum : sums) sum[j] = Floats{};
    }
    for (int64_t v = begin; v < end; ++v) {
      Floats* sum = sums[(v - begin) % kUnroll];
      for (int64_t j = 0; j < vectors; ++j) sum[j] += vexp(load_at(s, t, v, j) * times - block_top[j]);
    }
    for (int64_t j = 0; j < vectors; ++j) {
      Doubles add_low, add_high;
      widen((sums[0][j] + sums[1][j]) + (sums[2][j] + sums[3][j]), add_low, add_high);
      low[j] += add_low;
      high[j] += add_high;
    }
  }
  for (int64_t j = 0; j < vectors; ++j) {
    const int64_t first = t.column_begin + j * kLanes;
    store_first(part_max + first, top[j], t.width(j));
    double lanes[kLanes];
    std::memcpy(lanes, &low[j], sizeof(low[j]));
    std::memcpy(lanes + kLanes / 2, &high[j], sizeof(high[j]));
    std::memcpy(part_sum + first, lanes, t.width(j) * sizeof(double));
  }
}

QUIETSTAR_CLONES void max_and_sum_task(ScoresOf<float> s, Tile t, float multiplier, float* part_max, double* part_sum) {
  max_and_sum(s, t, multiplier, part_max, part_sum);
}
QUIETSTAR_CLONES void max_and_sum_bf16_task(ScoresOf<c10::BFloat16> s, Tile t, float multiplier, float* part_max,
                                            double* part_sum) {
  max_and_sum(s, t, multiplier, part_max, part_sum);
}

// scores[v, c] = exp(multiplier * scores[v, c] - top[c]) * factor[c] over the tile.
template <typename T>
QUIETSTAR_INLINE void scaled_softmax(const ScoresOf<T>& s, const Tile& t, float multiplier, const float* top,
                                     const float* factor_of) {
  const int64_t vectors = t.vectors();
  const Floats times = splat(multiplier);
  Floats shift[kSlabVectors], factor[kSlabVectors];
  for (int64_t j = 0; j < vectors; ++j) {
    shift[j] = load_tile(top, t, j);
    factor[j] = load_tile(factor_of, t, j);
  }
  for (int64_t v = t.row_begin; v < t.row_end; ++v) {
    for (int64_t j = 0; j < vectors; ++j) store_at(s, t, v, j, vexp(load_at(s, t, v, j) * times - shift[j]) * factor[j]);
  }
}

QUIETSTAR_CLONES void scaled_softmax_task(ScoresOf<float> s, Tile t, float multiplier, const float* top,
                                          const float* factor) {
  scaled_softmax(s, t, multiplier, top, factor);
}
QUIETSTAR_CLONES void scaled_softmax_bf16_task(ScoresOf<c10::BFloat16> s, Tile t, float multiplier, const float* top,
                                               const float* factor) {
  scaled_softmax(s, t, multiplier, top, factor);
}

// Per column of the tile, the maximum of its scores.
QUIETSTAR_CLONES void max_task(ScoresOf<float> s, Tile t, float* part_max) {
  const int64_t vectors = t.vectors();
  Floats top[kSlabVectors];
  for (int64_t j = 0; j < vectors; ++j) top[j] = splat(-INFINITY);
  for (int64_t v = t.row_begin; v < t.row_end; ++v) {
    for (int64_t j = 0; j < vectors; ++j) top[j] = max_of(top[j], load_at(s, t, v, j));
  }
  for (int64_t j = 0; j < vectors; ++j) store_first(part_max + t.column_begin + j * kLanes, top[j], t.width(j));
}

// scores[v, c] = exp(scores[v, c] - top[c]) over the tile (its rows whole blocks), and the sums
// of each block's rows into sums[v / block, c].
QUIETSTAR_CLONES void exp_block_sums_task(ScoresOf<float> s, Tile t, int64_t block, const float* top, float* sums) {
  const int64_t vectors = t.vectors();
  Floats under[kSlabVectors], block_sums[kUnroll][kSlabVectors];
  for (int64_t j = 0; j < vectors; ++j) under[j] = load_tile(top, t, j);
  for (int64_t begin = t.row_begin; begin < t.row_end; begin += block) {
    const int64_t end = std::min(t.row_end, begin + block);
    for (auto& sum : block_sums) {
      for (int64_t j = 0; j < vectors; ++j) sum[j] = Floats{};
    }
    for (int64_t v = begin; v < end; ++v) {
      Floats* sum = block_sums[(v - begin) % kUnroll];
      for (int64_t j = 0; j < vectors; ++j) {
        const Floats e = vexp(load_at(s, t, v, j) - under[j]);
        store_at(s, t, v, j, e);
        sum[j] += e;
      }
    }
    float* row = sums + (begin / block) * s.columns;
    for (int64_t j = 0; j < vectors; ++j) {
      const Floats sum = (block_sums[0][j] + block_sums[1][j]) + (block_sums[2][j] + block_sums[3][j]);
      store_first(row + t.column_begin + j * kLanes, sum, t.width(j));
    }
  }
}

void check_scores(const at::Tensor& scores, const char* op, bool bf16 = false) {
  TORCH_CHECK(scores.device().is_cpu(), op, ": scores must be a CPU tensor");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || (bf16 && scores.scalar_type() == at::kBFloat16), op,
              bf16 ? ": scores must be float32 or bfloat16, got " : ": scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) > 0, op, ": scores must be [V, C] with V > 0, got ",
              shape_text(scores.sizes()));
  TORCH_CHECK(scores.size(1) <= 1 || scores.stride(1) == 1, op, ": scores' columns must be adjacent (stride 1)");
  TORCH_CHECK(scores.size(0) <= 1 || scores.stride(0) >= std::max<int64_t>(1, scores.size(1)), op,
              ": scores' rows must not overlap (row stride at least C), got stride ", number_text(scores.stride(0)));
}

template <typename T>
ScoresOf<T> scores_of(const at::Tensor& scores) {
  return ScoresOf<T>{scores.data_ptr<T>(), scores.size(0), scores.size(1), scores.stride(0)};
}

// Row parts of `rows_per_part` rows (the last shorter).
int64_t parts_of(int64_t vocab, int64_t rows_per_part) { return (vocab + rows_per_part - 1) / rows_per_part; }

// Runs task(tile) for every tile of row parts of `rows_per_part` rows and slabs of kSlabColumns
// columns, in parallel.
template <typename Task>
void for_each_tile(int64_t vocab, int64_t columns, int64_t rows_per_part, const Task& task) {
  const int64_t parts = parts_of(vocab, rows_per_part), slabs = (columns + kSlabColumns - 1) / kSlabColumns;
  at::parallel_for(0, parts * slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t part = i / slabs, slab = i % slabs;
      task(Tile{part, part * rows_per_part, std::min(vocab, (part + 1) * rows_per_part), slab * kSlabColumns,
                std::min(columns, (slab + 1) * kSlabColumns)});
    }
  });
}

// Per column of multiplier * scores: the maximum (float32, as computed from the scores) and the
// sum of exponentials under it (float64), from every row part's combined in order.
struct ColumnTotals {
  std::vector<float> top;
  std::vector<double> total;
  // log(sum exp): NaN for a column holding a NaN or +inf (a NaN total), or all -inf.
  float logsumexp(int64_t c) const {
    return top[c] == -INFINITY ? NAN : static_cast<float>(top[c] + std::log(total[c]));
  }
};

// Each column's maximum over the row parts' maxima ([parts, columns]), in order.
std::vector<float> combined_max(const std::vector<float>& part_max, int64_t columns) {
  std::vector<float> top(columns, -INFINITY);
  for (size_t i = 0; i < part_max.size(); ++i) top[i % columns] = max_of(top[i % columns], part_max[i]);
  return top;
}

template <typename T>
ColumnTotals column_totals(const ScoresOf<T>& s, float multiplier) {
  const int64_t parts = parts_of(s.vocab, kPartRows);
  std::vector<float> part_max(parts * s.columns);
  std::vector<double> part_sum(parts * s.columns);
  for_each_tile(s.vocab, s.columns, kPartRows, [&](const Tile& t) {
    float* m = part_max.data() + t.part * s.columns;
    double* sum = part_sum.data() + t.part * s.columns;
    if constexpr (std::is_same_v<T, float>) {
      max_and_sum_task(s, t, multiplier, m, sum);
    } else {
      max_and_sum_bf16_task(s, t, multiplier, m, sum);
    }
  });
  ColumnTotals totals{combined_max(part_max, s.columns), std::vector<double>(s.columns, 0.0)};
  for (int64_t c = 0; c < s.columns; ++c) {
    // A part of -inf adds 0 under a finite maximum (NaN if it held a NaN).
    for (int64_t p = 0; p < parts; ++p) {
      const double m = part_max[p * s.columns + c];
      totals.total[c] += part_sum[p * s.columns + c] * std::exp(m - totals.top[c]);
    }
  }
  return totals;
}

at::Tensor logsumexp_of(const ColumnTotals& totals, const at::Tensor& scores) {
  at::Tensor lse = at::empty({static_cast<int64_t>(totals.top.size())}, scores.options().dtype(at::kFloat));
  float* out = lse.data_ptr<float>();
  for (size_t c = 0; c < totals.top.size(); ++c) out[c] = totals.logsumexp(c);
  return lse;
}

// In place, scores = scale * (softmax(multiplier * scores) - onehot(targets)) per column, each
// probability exp(z - top) * (scale / total): exp(z - lse) would carry lse's float32 rounding
// (relative 6e-8 of lse, not of the probability) into every probability of the column.
// Returns the columns' log-sum-exps.
template <typename T>
at::Tensor softmax_gradient(const at::Tensor& scores, const int64_t* targets, const float* scale, float multiplier) {
  const ScoresOf<T> s = scores_of<T>(scores);
  const ColumnTotals totals = column_totals(s, multiplier);
  std::vector<float> factor(s.columns);
  for (int64_t c = 0; c < s.columns; ++c) {
    factor[c] = totals.top[c] == -INFINITY ? NAN : static_cast<float>(scale[c] / totals.total[c]);
  }
  // Each target's entry, formed from its score kept before the pass below overwrites it, so that
  // bfloat16 scores are rounded once.
  std::vector<float> picked(s.columns);
  for (int64_t c = 0; c < s.columns; ++c) picked[c] = static_cast<float>(s.data[targets[c] * s.stride + c]);
  for_each_tile(s.vocab, s.columns, kPartRows, [&](const Tile& t) {
    if constexpr (std::is_same_v<T, float>) {
      scaled_softmax_task(s, t, multiplier, totals.top.data(), factor.data());
    } else {
      scaled_softmax_bf16_task(s, t, multiplier, totals.top.data(), factor.data());
    }
  });
  for (int64_t c = 0; c < s.columns; ++c) {
    float at_target[kLanes];
    store(at_target, vexp(splat(picked[c]) * splat(multiplier) - splat(totals.top[c])) * splat(factor[c]));
    s.data[targets[c] * s.stride + c] = T(at_target[0] - scale[c]);
  }
  return logsumexp_of(totals, scores);
}

}  // namespace

at::Tensor head_logsumexp(const at::Tensor& scores) {
  check_scores(scores, "head_logsumexp");
  return logsumexp_of(column_totals(scores_of<float>(scores), 1.0f), scores);
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
  const float times = static_cast<float>(multiplier);
  const int64_t* t = targets.data_ptr<int64_t>();
  const float* s = scale.data_ptr<float>();
  if (scores.scalar_type() == at::kBFloat16) return softmax_gradient<c10::BFloat16>(scores, t, s, times);
  return softmax_gradient<float>(scores, t, s, times);
}

at::Tensor head_exp_block_sums_(const at::Tensor& scores, int64_t block) {
  check_scores(scores, "head_exp_block_sums_");
  TORCH_CHECK(block > 0, "head_exp_block_sums_: block must be > 0, got ", number_text(block));
  const ScoresOf<float> s = scores_of<float>(scores);
  const int64_t parts = parts_of(s.vocab, kPartRows);
  std::vector<float> part_max(parts * s.columns);
  for_each_tile(s.vocab, s.columns, kPartRows,
                [&](const Tile& t) { max_task(s, t, part_max.data() + t.part * s.columns); });
  const std::vector<float> top = combined_max(part_max, s.columns);
  const int64_t blocks = (s.vocab + block - 1) / block;
  at::Tensor sums = at::empty({blocks, s.columns}, scores.options());
  float* out = sums.data_ptr<float>();
  // Parts of whole blocks, about kPartRows rows each.
  for_each_tile(s.vocab, s.columns, std::max<int64_t>(1, kPartRows / block) * block,
                [&](const Tile& t) { exp_block_sums_task(s, t, block, top.data(), out); });
  // A NaN sum comes from a NaN score, from a column of -inf, or from +inf (inf - inf: NaN at that
  // entry only, as in PyTorch's ops). In the first two cases PyTorch's column maximum is NaN or
  // -inf and its weights NaN throughout: so here too (rare: a scalar loop). A column holding both
  // +inf and NaN is NaN throughout or only in the blocks holding them, depending on which the
  // maximum passed over.
  for (int64_t c = 0; c < s.columns; ++c) {
    if (top[c] == INFINITY) continue;
    bool nan_seen = false;
    for (int64_t b = 0; b < blocks && !nan_seen; ++b) nan_seen = std::isnan(out[b * s.columns + c]);
    if (!nan_seen) continue;
    for (int64_t v = 0; v < s.vocab; ++v) s.data[v * s.stride + c] = NAN;
    for (int64_t b = 0; b < blocks; ++b) out[b * s.columns + c] = NAN;
  }
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
