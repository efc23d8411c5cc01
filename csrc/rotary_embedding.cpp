// Rotary position embedding (RoPE) as the Llama family applies it, with the head transpose
// folded in: x [B, T, H, D] as the projection gives it (float32 or bfloat16) in,
// out [B, H, T, D] float32 (as the attention reads it) out, one pass each way. PyTorch's
// composition (q * cos + rotate_half(q) * sin on the transposed view) runs six ops forward and
// about eight backward, and the attention then copies the strided result to contiguous rows.
//
// With x = [x1, x2] and cos = [c1, c2], sin = [s1, s2] split at D / 2 (cos and sin
// [B, T, D] float32): out = [x1 * c1 - x2 * s1, x2 * c2 + x1 * s2].
// Backward, from grad [B, H, T, D] float32: d_x = [g1 * c1 + g2 * s2, g2 * c2 - g1 * s1], stored
// [B, T, H, D] in x's dtype (bfloat16 rounded once).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "error_text.h"
#include "vector_math.h"

#if !defined(__GNUC__)
#error "quietstar's native kernels need GCC or Clang vector extensions"
#endif

namespace quietstar {
namespace {

// Positions per task: each is H * D values (576 floats at SmolLM2's sizes).
constexpr int64_t kPositionsPerTask = 32;

struct Rotary {
  int64_t batch, length, heads, dim;
  const float *cos, *sin;  // [B, T, D]
  int64_t half() const { return dim / 2; }
  // x / d_x element (b, t, h, j) and out / grad element (b, h, t, j)
  int64_t bthd(int64_t b, int64_t t, int64_t h) const { return ((b * length + t) * heads + h) * dim; }
  int64_t bhtd(int64_t b, int64_t t, int64_t h) const { return ((b * heads + h) * length + t) * dim; }
};

template <typename T>
QUIETSTAR_INLINE Floats load_n(const T* p, int64_t n) {
  return n == kLanes ? load(p) : load_first(p, n);
}
template <typename T>
QUIETSTAR_INLINE void store_n(T* p, Floats x, int64_t n) {
  if (n == kLanes) {
    store(p, x);
  } else {
    store_first(p, x, n);
  }
}

// Rotates every head of positions [begin, end) (flattened b * T + t); `forward` picks the
// signs: forward (x -> out) or its transpose (grad -> d_x).
template <typename In, typename Out, bool kForward>
QUIETSTAR_INLINE void rotate_positions(const Rotary& r, const In* in, Out* out, int64_t begin, int64_t end) {
  const int64_t half = r.half();
  for (int64_t p = begin; p < end; ++p) {
    const int64_t b = p / r.length, t = p % r.length;
    const float *c = r.cos + p * r.dim, *s = r.sin + p * r.dim;
    for (int64_t h = 0; h < r.heads; ++h) {
      const In* src = in + (kForward ? r.bthd(b, t, h) : r.bhtd(b, t, h));
      Out* dst = out + (kForward ? r.bhtd(b, t, h) : r.bthd(b, t, h));
      for (int64_t j = 0; j < half; j += kLanes) {
        const int64_t n = std::min(kLanes, half - j);
        const Floats a = load_n(src + j, n), z = load_n(src + half + j, n);
        const Floats c1 = load_n(c + j, n), c2 = load_n(c + half + j, n);
        const Floats s1 = load_n(s + j, n), s2 = load_n(s + half + j, n);
        if constexpr (kForward) {
          store_n(dst + j, a * c1 - z * s1, n);
          store_n(dst + half + j, z * c2 + a * s2, n);
        } else {
          store_n(dst + j, a * c1 + z * s2, n);
          store_n(dst + half + j, z * c2 - a * s1, n);
        }
      }
    }
  }
}

QUIETSTAR_CLONES void forward_task(const Rotary& r, const float* x, float* out, int64_t begin, int64_t end) {
  rotate_positions<float, float, true>(r, x, out, begin, end);
}
QUIETSTAR_CLONES void forward_task(const Rotary& r, const c10::BFloat16* x, float* out, int64_t begin, int64_t end) {
  rotate_positions<c10::BFloat16, float, true>(r, x, out, begin, end);
}
QUIETSTAR_CLONES void backward_task(const Rotary& r, const float* grad, float* d_x, int64_t begin, int64_t end) {
  rotate_positions<float, float, false>(r, grad, d_x, begin, end);
}
QUIETSTAR_CLONES void backward_task(const Rotary& r, const float* grad, c10::BFloat16* d_x, int64_t begin,
                                    int64_t end) {
  rotate_positions<float, c10::BFloat16, false>(r, grad, d_x, begin, end);
}

Rotary make_rotary(const at::Tensor& cos, const at::Tensor& sin, int64_t batch, int64_t length, int64_t heads,
                   int64_t dim) {
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu(), "quietstar native rotary_embedding runs on CPU tensors");
  TORCH_CHECK(dim % 2 == 0, "rotary_embedding: the head size must be even, got ", number_text(dim));
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == batch &&
                    t->size(1) == length && t->size(2) == dim,
                "rotary_embedding: cos and sin must be contiguous float32 [B, T, D]");
  }
  return Rotary{batch, length, heads, dim, cos.data_ptr<float>(), sin.data_ptr<float>()};
}

}  // namespace

at::Tensor rotary_embedding_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "rotary_embedding: x must be contiguous [B, T, H, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rotary_embedding: x must be float32 or bfloat16, got ", x.scalar_type());
  const Rotary r = make_rotary(cos, sin, x.size(0), x.size(1), x.size(2), x.size(3));
  at::Tensor out = at::empty({r.batch, r.heads, r.length, r.dim}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, r.batch * r.length, kPositionsPerTask, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      forward_task(r, x.data_ptr<float>(), o, begin, end);
    } else {
      forward_task(r, x.data_ptr<c10::BFloat16>(), o, begin, end);
    }
  });
  return out;
}

at::Tensor rotary_embedding_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin,
                                     at::ScalarType x_dtype) {
  TORCH_CHECK(grad.dim() == 4 && grad.is_contiguous() && grad.scalar_type() == at::kFloat,
              "rotary_embedding: grad must be contiguous float32 [B, H, T, D]");
  TORCH_CHECK(x_dtype == at::kFloat || x_dtype == at::kBFloat16, "rotary_embedding: x_dtype must be float32 or bfloat16");
  const Rotary r = make_rotary(cos, sin, grad.size(0), grad.size(2), grad.size(1), grad.size(3));
  at::Tensor d_x = at::empty({r.batch, r.length, r.heads, r.dim}, grad.options().dtype(x_dtype));
  const float* g = grad.data_ptr<float>();
  at::parallel_for(0, r.batch * r.length, kPositionsPerTask, [&](int64_t begin, int64_t end) {
    if (x_dtype == at::kFloat) {
      backward_task(r, g, d_x.data_ptr<float>(), begin, end);
    } else {
      backward_task(r, g, d_x.data_ptr<c10::BFloat16>(), begin, end);
    }
  });
  return d_x;
}

}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def("rotary_embedding_forward(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rotary_embedding_backward(Tensor grad, Tensor cos, Tensor sin, ScalarType x_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("rotary_embedding_forward", &quietstar::rotary_embedding_forward);
  m.impl("rotary_embedding_backward", &quietstar::rotary_embedding_backward);
}
