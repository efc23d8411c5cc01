// SwiGLU, the Llama-family MLP's gate: out = silu(gate) * up, one pass over memory each way.
// PyTorch runs it as two ops forward (silu, mul) and four backward (two muls, silu_backward and
// the gradient's sum), each a pass over [tokens, intermediate] values, and keeps silu(gate) for
// the backward as well as gate and up; these kernels read gate and up (and the output's
// gradient) once, keep nothing extra, and recompute the sigmoid in the backward.
//
// float32 or bfloat16 storage (gate and up the same dtype, contiguous, the same shape), float32
// arithmetic; bfloat16 results rounded once (PyTorch rounds silu(gate) and then the product).
// Backward: s = sigmoid(gate), d_gate = grad * up * s * (1 + gate * (1 - s)), d_up = grad * silu(gate).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <functional>

#include "vector_math.h"

#if !defined(__GNUC__)
#error "quietstar's native kernels need GCC or Clang vector extensions"
#endif

namespace quietstar {
namespace {

// Values per task: a task's three or five streams (about 320 KB) stay in a core's L2.
constexpr int64_t kValuesPerTask = 16384;

// 1 / (1 + e^-x), exactly 0 where e^-x overflows (vexp stops at e^88.3), as PyTorch's: silu of a
// very negative gate is then -0, and of -inf NaN, not a finite multiple of the gate.
QUIETSTAR_INLINE Floats sigmoid(Floats x) {
  const Floats s = 1.0f / (1.0f + vexp(-x));
  return x < -88.3f ? Floats{} : s;
}

template <typename T>
QUIETSTAR_INLINE void forward_lanes(const T* gate, const T* up, T* out, int64_t i, int64_t n) {
  if (n == kLanes) {
    const Floats g = load(gate + i);
    store(out + i, g * sigmoid(g) * load(up + i));
  } else {
    const Floats g = load_first(gate + i, n);
    store_first(out + i, g * sigmoid(g) * load_first(up + i, n), n);
  }
}

template <typename T>
QUIETSTAR_INLINE void backward_lanes(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up, int64_t i,
                                     int64_t n) {
  const bool full = n == kLanes;
  const Floats dy = full ? load(grad + i) : load_first(grad + i, n);
  const Floats g = full ? load(gate + i) : load_first(gate + i, n);
  const Floats u = full ? load(up + i) : load_first(up + i, n);
  const Floats s = sigmoid(g);
  const Floats dg = dy * u * s * (1.0f + g * (1.0f - s)), du = dy * g * s;
  if (full) {
    store(d_gate + i, dg);
    store(d_up + i, du);
  } else {
    store_first(d_gate + i, dg, n);
    store_first(d_up + i, du, n);
  }
}

#define QUIETSTAR_SWIGLU_TASKS(T)                                                                          \
  QUIETSTAR_CLONES void forward_task(const T* gate, const T* up, T* out, int64_t begin, int64_t end) {     \
    for (int64_t i = begin; i < end; i += kLanes) forward_lanes(gate, up, out, i, std::min(kLanes, end - i)); \
  }                                                                                                        \
  QUIETSTAR_CLONES void backward_task(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up,       \
                                      int64_t begin, int64_t end) {                                        \
    for (int64_t i = begin; i < end; i += kLanes)                                                          \
      backward_lanes(grad, gate, up, d_gate, d_up, i, std::min(kLanes, end - i));                          \
  }
QUIETSTAR_SWIGLU_TASKS(float)
QUIETSTAR_SWIGLU_TASKS(c10::BFloat16)
#undef QUIETSTAR_SWIGLU_TASKS

// Task boundaries on whole vectors, so only the last task has a tail.
void for_each_block(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, (n + kLanes - 1) / kLanes, kValuesPerTask / kLanes, [&](int64_t begin, int64_t end) {
    body(begin * kLanes, std::min(end * kLanes, n));
  });
}

void check_inputs(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "quietstar native swiglu runs on CPU tensors");
  TORCH_CHECK(gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16,
              "swiglu: gate must be float32 or bfloat16, got ", gate.scalar_type());
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), "swiglu: up must have gate's dtype");
  TORCH_CHECK(up.sizes() == gate.sizes(), "swiglu: up must have gate's shape");
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "swiglu: gate and up must be contiguous");
}

template <typename T>
void forward_all(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const T *g = gate.data_ptr<T>(), *u = up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for_each_block(gate.numel(), [&](int64_t begin, int64_t end) { forward_task(g, u, o, begin, end); });
}

template <typename T>
void backward_all(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, at::Tensor& d_gate,
                  at::Tensor& d_up) {
  const T *dy = grad.data_ptr<T>(), *g = gate.data_ptr<T>(), *u = up.data_ptr<T>();
  T *dg = d_gate.data_ptr<T>(), *du = d_up.data_ptr<T>();
  for_each_block(gate.numel(), [&](int64_t begin, int64_t end) { backward_task(dy, g, u, dg, du, begin, end); });
}

}  // namespace

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_inputs(gate, up);
  at::Tensor out = at::empty_like(gate);
  if (gate.scalar_type() == at::kFloat) {
    forward_all<float>(gate, up, out);
  } else {
    forward_all<c10::BFloat16>(gate, up, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_inputs(gate, up);
  TORCH_CHECK(grad.sizes() == gate.sizes() && grad.scalar_type() == gate.scalar_type() && grad.is_contiguous(),
              "swiglu: grad must be contiguous, with gate's shape and dtype");
  at::Tensor d_gate = at::empty_like(gate), d_up = at::empty_like(up);
  if (gate.scalar_type() == at::kFloat) {
    backward_all<float>(grad, gate, up, d_gate, d_up);
  } else {
    backward_all<c10::BFloat16>(grad, gate, up, d_gate, d_up);
  }
  return {d_gate, d_up};
}

}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("swiglu_forward", &quietstar::swiglu_forward);
  m.impl("swiglu_backward", &quietstar::swiglu_backward);
}
