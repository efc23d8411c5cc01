// The AVX-512 BF16 products of bf16_gemm.h. Everything here is compiled for AVX-512 BF16 (a
// target attribute, so the rest of the library keeps the build's baseline ISA) and runs only
// where cpu_has_avx512_bf16() says the CPU has it.

#include "bf16_gemm.h"

#include <algorithm>

#if !(defined(__GNUC__) && defined(__x86_64__))

#include <c10/util/Exception.h>

// Other CPUs: no AVX-512 BF16, and callers never get here (cpu_has_avx512_bf16() is false).
namespace quietstar {
bool cpu_has_avx512_bf16() { return false; }
void gemm_bf16(int64_t, int64_t, int64_t, const bf16*, int64_t, const bf16*, float*, int64_t, bool) {
  TORCH_CHECK(false, "bfloat16 products need AVX-512 BF16");
}
void rows_to_bf16(const float*, int64_t, int64_t, int64_t, bf16*, int64_t) {
  TORCH_CHECK(false, "bfloat16 products need AVX-512 BF16");
}
void pack_rows(const float*, int64_t, int64_t, int64_t, int64_t, bf16*) {
  TORCH_CHECK(false, "bfloat16 products need AVX-512 BF16");
}
void pack_transposed(const float*, int64_t, int64_t, int64_t, int64_t, bf16*) {
  TORCH_CHECK(false, "bfloat16 products need AVX-512 BF16");
}
}  // namespace quietstar

#else

#include <immintrin.h>

#define QUIETSTAR_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace quietstar {

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

namespace {

// Rows r of 16 * NV output columns: the accumulators stay in registers over the whole K.
template <int MR, int NV>
QUIETSTAR_AVX512_BF16 inline void micro_tile(int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t N, float* C,
                                             int64_t ldc, bool accumulate) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t pair = 0; pair < K / 2; ++pair) {
    __m512i b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_si512(B + (pair * N + 16 * j) * 2);
    for (int r = 0; r < MR; ++r) {
      int32_t two;
      std::memcpy(&two, A + r * lda + 2 * pair, sizeof(two));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(two);
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], a, (__m512bh)b[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + r * ldc + 16 * j, c[r][j]);
}

template <int NV>
QUIETSTAR_AVX512_BF16 void column_block(int64_t M, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t N,
                                        float* C, int64_t ldc, bool accumulate) {
  constexpr int kRows = 6;  // 6 x 4 accumulators + 4 of B + 1 of A: within the 32 registers
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) micro_tile<kRows, NV>(K, A + m * lda, lda, B, N, C + m * ldc, ldc, accumulate);
  for (; m < M; ++m) micro_tile<1, NV>(K, A + m * lda, lda, B, N, C + m * ldc, ldc, accumulate);
}

QUIETSTAR_AVX512_BF16 inline __m256i to_bf16x16(const float* x) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x));
}

}  // namespace

QUIETSTAR_AVX512_BF16 void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
                                     float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const bf16* block = B + n0 * 2;
    float* out = C + n0;
    switch (std::min<int64_t>(64, N - n0) / 16) {
      case 4: column_block<4>(M, K, A, lda, block, N, out, ldc, accumulate); break;
      case 3: column_block<3>(M, K, A, lda, block, N, out, ldc, accumulate); break;
      case 2: column_block<2>(M, K, A, lda, block, N, out, ldc, accumulate); break;
      default: column_block<1>(M, K, A, lda, block, N, out, ldc, accumulate); break;
    }
  }
}

QUIETSTAR_AVX512_BF16 void rows_to_bf16(const float* x, int64_t rows, int64_t cols, int64_t ld, bf16* out,
                                        int64_t out_cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    bf16* dest = out + r * out_cols;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dest + c), to_bf16x16(row + c));
    if (c < cols) {
      alignas(64) float tail[16] = {};
      std::copy(row + c, row + cols, tail);
      alignas(32) bf16 packed[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(packed), to_bf16x16(tail));
      std::copy(packed, packed + (cols - c), dest + c);
    }
    std::fill(dest + cols, dest + out_cols, bf16{0});
  }
}

QUIETSTAR_AVX512_BF16 void pack_rows(const float* x, int64_t k_rows, int64_t n, int64_t ld, int64_t k_pad, bf16* out) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t pair = 0; pair < k_pad / 2; ++pair) {
    const float *even = x + 2 * pair * ld, *odd = even + ld;
    const bool has_even = 2 * pair < k_rows, has_odd = 2 * pair + 1 < k_rows;
    for (int64_t c = 0; c < n; c += 16) {
      // (the maskz forms: GCC warns about the unmasked ones' undefined pass-through operand)
      const __m512i lo = _mm512_maskz_cvtepu16_epi32(0xffff, has_even ? to_bf16x16(even + c) : zero);
      const __m512i hi =
          _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, has_odd ? to_bf16x16(odd + c) : zero), 16);
      _mm512_storeu_si512(out + (pair * n + c) * 2, _mm512_or_si512(lo, hi));
    }
  }
}

QUIETSTAR_AVX512_BF16 void pack_transposed(const float* x, int64_t n_rows, int64_t k, int64_t ld, int64_t n_pad,
                                           bf16* out) {
  alignas(64) bf16 row[512];
  int32_t* words = reinterpret_cast<int32_t*>(out);  // one word per (pair of k, column)
  for (int64_t n = 0; n < n_pad; ++n) {
    if (n < n_rows)
      rows_to_bf16(x + n * ld, 1, k, k, row, k);
    else
      std::fill(row, row + k, bf16{0});
    for (int64_t pair = 0; pair < k / 2; ++pair) std::memcpy(words + pair * n_pad + n, row + 2 * pair, 4);
  }
}

}  // namespace quietstar

#endif  // x86-64
