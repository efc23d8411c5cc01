// RMSNorm over the last dimension, as the Llama family computes it in float32:
// out = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), one pass over memory each way.
// PyTorch runs it as six ops forward and about ten backward (each a pass over [tokens, d]) and
// keeps x, x^2's mean and the normalised x for the backward; these kernels keep x and one rstd
// per row.
//
// float32 x [N, d] and weight [d], contiguous; the output float32 or bfloat16 (rounded once: under
// autocast the norm's consumers are projections that would round it to bfloat16 each), the
// output's gradient of the output's dtype. Backward, per row with x_hat = x * rstd and
// g = grad * weight: d_x = rstd * (g - x_hat * mean(g * x_hat)); d_weight = sum over rows of
// grad * x_hat (each worker sums its rows, the workers' sums are added last).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "vector_math.h"

#if !defined(__GNUC__)
#error "quietstar's native kernels need GCC or Clang vector extensions"
#endif

namespace quietstar {
namespace {

// Rows per task in the forward: small rows (d = 576: 2.3 KB) need many per task to pay its start.
constexpr int64_t kRowsPerTask = 64;

// Sum of x[0 .. d) * y[0 .. d) with the vector loop's tail padded by zeros.
QUIETSTAR_INLINE float row_dot(const float* x, const float* y, int64_t d) {
  Floats acc = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) acc += load(x + j) * load(y + j);
  if (j < d) acc += load_first(x + j, d - j) * load_first(y + j, d - j);
  return lane_sum<float, kLanes>(acc);
}

template <typename Out>
QUIETSTAR_INLINE void forward_rows(const float* x, const float* weight, Out* out, float* rstd, int64_t d, float eps,
                                   int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* row = x + r * d;
    Out* y = out + r * d;
    const float inv = 1.0f / std::sqrt(row_dot(row, row, d) / static_cast<float>(d) + eps);
    rstd[r] = inv;
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes) store(y + j, load(weight + j) * (load(row + j) * inv));
    if (j < d) store_first(y + j, load_first(weight + j, d - j) * (load_first(row + j, d - j) * inv), d - j);
  }
}

// d_x of rows [begin, end), their grad * x_hat added into d_weight (a worker's own sums).
template <typename Grad>
QUIETSTAR_INLINE void backward_rows(const Grad* grad, const float* x, const float* weight, const float* rstd,
                                    float* d_x, float* d_weight, int64_t d, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const Grad* dy = grad + r * d;
    const float* row = x + r * d;
    float* dx = d_x + r * d;
    const float inv = rstd[r];
    Floats acc = {};
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes) acc += load(dy + j) * load(weight + j) * load(row + j);
    if (j < d) acc += load_first(dy + j, d - j) * load_first(weight + j, d - j) * load_first(row + j, d - j);
    const float mean = lane_sum<float, kLanes>(acc) * inv / static_cast<float>(d);  // of g * x_hat
    for (j = 0; j + kLanes <= d; j += kLanes) {
      const Floats g = load(dy + j), x_hat = load(row + j) * inv;
      store(dx + j, inv * (g * load(weight + j) - x_hat * mean));
      store(d_weight + j, load(d_weight + j) + g * x_hat);
    }
    if (j < d) {
      const int64_t n = d - j;
      const Floats g = load_first(dy + j, n), x_hat = load_first(row + j, n) * inv;
      store_first(dx + j, inv * (g * load_first(weight + j, n) - x_hat * mean), n);
      store_first(d_weight + j, load_first(d_weight + j, n) + g * x_hat, n);
    }
  }
}

#define QUIETSTAR_RMS_NORM_TASKS(T)                                                                           \
  QUIETSTAR_CLONES void forward_task(const float* x, const float* weight, T* out, float* rstd, int64_t d, float eps, \
                                     int64_t begin, int64_t end) {                                             \
    forward_rows(x, weight, out, rstd, d, eps, begin, end);                                                    \
  }                                                                                                            \
  QUIETSTAR_CLONES void backward_task(const T* grad, const float* x, const float* weight, const float* rstd,      \
                                      float* d_x, float* d_weight, int64_t d, int64_t begin, int64_t end) {     \
    backward_rows(grad, x, weight, rstd, d_x, d_weight, d, begin, end);                                        \
  }
QUIETSTAR_RMS_NORM_TASKS(float)
QUIETSTAR_RMS_NORM_TASKS(c10::BFloat16)
#undef QUIETSTAR_RMS_NORM_TASKS

void check_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rms_norm: out_dtype must be float32 or bfloat16, got ",
              dtype);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "quietstar native rms_norm runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm: x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [d] for x [..., d]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: x and weight must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                    at::ScalarType out_dtype) {
  check_inputs(x, weight);
  check_out_dtype(out_dtype);
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  at::Tensor out = at::empty_like(x, x.options().dtype(out_dtype));
  at::Tensor rstd = at::empty({rows}, x.options());
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* s = rstd.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    if (out_dtype == at::kFloat) {
      forward_task(xp, w, out.data_ptr<float>(), s, d, static_cast<float>(eps), begin, end);
    } else {
      forward_task(xp, w, out.data_ptr<c10::BFloat16>(), s, d, static_cast<float>(eps), begin, end);
    }
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_inputs(x, weight);
  check_out_dtype(grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous(), "rms_norm: grad must be contiguous with x's shape");
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == at::kFloat && rstd.is_contiguous(),
              "rms_norm: rstd must hold one float32 per row");
  at::Tensor d_x = at::empty_like(x);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  at::Tensor partial = at::zeros({workers, d}, x.options());
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>(), *s = rstd.data_ptr<float>();
  float *dx = d_x.data_ptr<float>(), *dw = partial.data_ptr<float>();
  const int64_t per_worker = (rows + workers - 1) / workers;
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * per_worker, last = std::min(rows, (k + 1) * per_worker);
      if (grad.scalar_type() == at::kFloat) {
        backward_task(grad.data_ptr<float>(), xp, w, s, dx, dw + k * d, d, first, last);
      } else {
        backward_task(grad.data_ptr<c10::BFloat16>(), xp, w, s, dx, dw + k * d, d, first, last);
      }
    }
  });
  return {d_x, partial.sum(0)};
}

}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("rms_norm_forward", &quietstar::rms_norm_forward);
  m.impl("rms_norm_backward", &quietstar::rms_norm_backward);
}
