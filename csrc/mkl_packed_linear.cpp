// MKL's packed float32 GEMM, called directly: x W^T for a weight W [n, k] packed once
// (cblas_sgemm_pack) and multiplied many times (cblas_sgemm_compute), each product written
// straight into rows the caller gives. The thought sampling multiplies every decoder weight
// T + 1 times and keeps each product in a slice of the projection record; PyTorch's own ops for
// the same GEMM (mkl::_mkl_reorder_linear_weight, mkl::_mkl_linear) return a fresh tensor,
// which the record then copied. Same arithmetic as those ops (the same MKL calls).
//
// The three MKL functions are declared weak: PyTorch's x86 builds export them from
// libtorch_cpu (its MKL is linked in statically), and where a build does not, they stay null
// and mkl_packed_gemm_available() says so (the Python side then multiplies unpacked).

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "error_text.h"

extern "C" {
// MKL's LP64 interface (MKL_INT is int; its enums are ints).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace quietstar {
namespace {

// MKL's CBLAS constants.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
// A packed copy starts with a header holding the weight's shape (n, k as int64), 64 bytes so that
// MKL's part keeps the allocation's 64-byte alignment: a product checks that it is given the
// copy of the weight it is told of (MKL reads a copy of another shape without complaint).
constexpr int64_t kHeaderFloats = 16;

bool available() { return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute; }

int as_int(int64_t value, const char* what) {
  TORCH_CHECK(value <= std::numeric_limits<int>::max(), what, " must fit MKL's 32-bit sizes, got ", number_text(value));
  return static_cast<int>(value);
}

// A matrix [rows, cols] as MKL reads it: contiguous columns and rows at least `cols` apart
// (rows that overlap, an expanded tensor's, are copied first).
at::Tensor with_row_layout(const at::Tensor& t) {
  const int64_t rows = t.size(-2), cols = t.size(-1);
  const bool readable = (t.stride(-1) == 1 || cols <= 1) && (rows <= 1 || t.stride(-2) >= cols);
  return readable ? t : t.contiguous();
}

// The leading dimension MKL is given for `t` (with_row_layout's): its row stride, or its width
// for a single row (whose stride MKL never uses).
int leading_dimension(const at::Tensor& t, const char* what) {
  return as_int(t.size(-2) > 1 ? t.stride(-2) : std::max<int64_t>(t.size(-1), 1), what);
}

// The addresses [first, last] a non-empty float tensor's elements span.
std::pair<const float*, const float*> span(const at::Tensor& t) {
  const float* first = t.data_ptr<float>();
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {first, first + last};
}

// Bytes of W [n, k]'s packed copy (MKL's size does not depend on the row count).
int64_t packed_bytes(int64_t n, int64_t k) {
  if (n == 0 || k == 0) return 0;
  return static_cast<int64_t>(cblas_sgemm_pack_get_size(kBMatrix, 1, as_int(n, "out_features"), as_int(k, "in_features")));
}

void check_available() {
  TORCH_CHECK(available(), "this PyTorch build does not export MKL's packed GEMM (cblas_sgemm_pack, cblas_sgemm_compute)");
}

bool mkl_packed_gemm_available() { return available(); }

// weight [n, k] float32 (rows contiguous) -> its packed copy, a 1-D float32 tensor (the header,
// then MKL's layout), for products of about `rows` rows (any row count multiplies right).
at::Tensor mkl_pack_weight(const at::Tensor& weight, int64_t rows) {
  check_available();
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "weight must be a 2-D float32 CPU tensor, got ", weight.scalar_type(), " of shape ", shape_text(weight.sizes()),
              " on ", weight.device().str());
  TORCH_CHECK(rows > 0, "rows must be > 0, got ", number_text(rows));
  const at::Tensor w = with_row_layout(weight);
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t floats = kHeaderFloats + (packed_bytes(n, k) + 3) / 4;
  at::Tensor packed = at::empty({floats}, w.options());
  const int64_t shape[2] = {n, k};
  std::memcpy(packed.data_ptr<float>(), shape, sizeof(shape));
  if (n > 0 && k > 0) {
    cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, as_int(rows, "rows"), static_cast<int>(n), static_cast<int>(k), 1.0f,
                     w.data_ptr<float>(), leading_dimension(w, "weight's row stride"),
                     packed.data_ptr<float>() + kHeaderFloats);
  }
  return packed;
}

// out [..., m, n] = x [..., m, k] W^T from W's packed copy; x and out 2-D or 3-D (then one
// product per leading index). x of any strides (copied where MKL cannot read it as it is); out
// with contiguous rows that do not overlap each other, nor span memory that x spans (rows of a
// larger buffer, say).
void mkl_packed_linear_(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, at::Tensor& out) {
  check_available();
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && (x.dim() == 2 || x.dim() == 3),
              "x must be a 2-D or 3-D float32 CPU tensor, got ", x.scalar_type(), " of shape ", shape_text(x.sizes()), " on ",
              x.device().str());
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == x.dim(),
              "out must be a float32 CPU tensor with x's ", number_text(x.dim()), " dimensions, got ",
              out.scalar_type(), " of shape ", shape_text(out.sizes()));
  const int64_t k = x.size(-1);
  TORCH_CHECK(out.size(-1) == out_features && out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "out must have shape [..., ", number_text(x.size(-2)), ", ", number_text(out_features),
              "] for x of shape ", shape_text(x.sizes()), ", got ", shape_text(out.sizes()));
  int64_t shape[2] = {-1, -1};
  const bool is_packed = packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.dim() == 1 &&
                         packed.is_contiguous() && packed.numel() >= kHeaderFloats;
  if (is_packed) std::memcpy(shape, packed.data_ptr<float>(), sizeof(shape));
  TORCH_CHECK(is_packed && shape[0] == out_features && shape[1] == k && packed.numel() * 4 >= 4 * kHeaderFloats + packed_bytes(out_features, k),
              "packed must be mkl_pack_weight's copy of a [", number_text(out_features), ", ", number_text(k),
              "] weight, got one of a [", number_text(shape[0]), ", ", number_text(shape[1]), "] weight");
  const int64_t m = x.size(-2);
  const int64_t batch = x.dim() == 3 ? x.size(0) : 1;
  if (m == 0 || out_features == 0 || batch == 0) return;
  const bool contiguous_rows = out_features <= 1 || out.stride(-1) == 1;
  const bool rows_apart = m <= 1 || out.stride(-2) >= out_features;
  const bool batches_apart = batch <= 1 || out.stride(0) >= (m - 1) * out.stride(-2) + out_features;
  TORCH_CHECK(contiguous_rows && rows_apart && batches_apart,
              "out's rows must be contiguous and must not overlap each other, got strides ", shape_text(out.strides()),
              " for shape ", shape_text(out.sizes()));
  if (k == 0) {  // an empty sum; x holds nothing that out could overlap
    out.zero_();
    return;
  }
  const auto [out_first, out_last] = span(out);
  const auto [x_first, x_last] = span(x);
  TORCH_CHECK(out_last < x_first || x_last < out_first, "out must not overlap x (the product would read what it wrote)");
  const at::Tensor a = with_row_layout(x);
  const int64_t a_batch = a.dim() == 3 ? a.stride(0) : 0, c_batch = out.dim() == 3 ? out.stride(0) : 0;
  const int lda = leading_dimension(a, "x's row stride"), ldc = leading_dimension(out, "out's row stride");
  for (int64_t b = 0; b < batch; ++b) {
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, as_int(m, "rows"), static_cast<int>(out_features),
                        static_cast<int>(k), a.data_ptr<float>() + b * a_batch, lda, packed.data_ptr<float>() + kHeaderFloats,
                        static_cast<int>(k), 0.0f, out.data_ptr<float>() + b * c_batch, ldc);
  }
}

}  // namespace
}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def("mkl_packed_gemm_available() -> bool", &quietstar::mkl_packed_gemm_available);
  m.def("mkl_pack_weight(Tensor weight, int rows) -> Tensor");
  m.def("mkl_packed_linear_(Tensor x, Tensor packed, int out_features, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(quietstar, CPU, m) {
  m.impl("mkl_pack_weight", &quietstar::mkl_pack_weight);
  m.impl("mkl_packed_linear_", &quietstar::mkl_packed_linear_);
}
