// Matrix products from bfloat16 operands into float32 with the AVX-512 BF16 dot-product
// instruction (vdpbf16ps: 16 lanes, each the sum of two bfloat16 products added to a float32),
// for the native trunk's tiles when its inputs were bfloat16. Products of bfloat16 numbers are
// exact in float32, so only the float32 sums round. PyTorch's own bfloat16 products are out of
// reach of an extension here (cpublas::gemm is not exported, at::mm writes bfloat16) and MKL's
// bfloat16 GEMM runs at the float32 rate on AMD; this kernel, its packing included, runs
// 1.9-2.3x ATen's float32 products on a tile's shapes (one core of a 2-core AMD EPYC with
// AVX-512 BF16).
//
// C [M, N] (float32, row stride ldc) = or += A [M, K] x B [K, N]: A bfloat16 rows (stride lda,
// K even), B packed in pairs along K: element (k, n) at ((k / 2) * N + n) * 2 + k % 2. N must
// be a multiple of 16. Compiled for AVX-512 BF16 only (a target attribute); callers check
// cpu_has_avx512_bf16() first.

#pragma once

#include <cstdint>
#include <cstring>

namespace quietstar {

using bf16 = uint16_t;  // bfloat16 bits

bool cpu_has_avx512_bf16();

// C += A x B (accumulate) or C = A x B.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, float* C, int64_t ldc,
               bool accumulate);

// rows x cols floats of x (row stride ld) as bfloat16 rows of out_cols >= cols (zeros after),
// rounded to nearest even.
void rows_to_bf16(const float* x, int64_t rows, int64_t cols, int64_t ld, bf16* out, int64_t out_cols);

// B = x [k_rows, n] (row stride ld, n a multiple of 16) packed for gemm_bf16 with K = k_pad >=
// k_rows (zero rows after).
void pack_rows(const float* x, int64_t k_rows, int64_t n, int64_t ld, int64_t k_pad, bf16* out);

// B = the transpose of x [n_rows, k] (row stride ld, k even and at most 512) packed for
// gemm_bf16 with N = n_pad >= n_rows (zero columns after).
void pack_transposed(const float* x, int64_t n_rows, int64_t k, int64_t ld, int64_t n_pad, bf16* out);

// The transpose of x [rows, cols] as rows [cols, out_rows >= rows] (zeros after).
inline void transpose_bf16(const bf16* x, int64_t rows, int64_t cols, bf16* out, int64_t out_rows) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) out[c * out_rows + r] = x[r * cols + c];
    for (int64_t r = rows; r < out_rows; ++r) out[c * out_rows + r] = 0;
  }
}

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

}  // namespace quietstar
