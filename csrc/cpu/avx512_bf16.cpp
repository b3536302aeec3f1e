// AVX-512 BF16 micro-kernels (see avx512_bf16.h).
#include "cpu/avx512_bf16.h"

namespace netmerge::cpu::avx512_bf16 {
namespace {

template <int TB>
void dot_block(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* const* w, int64_t ldw, float* res) {
  __m512 acc[4][TB];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < TB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < K; h += 32) {
    const __mmask32 m = K - h >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (K - h)) - 1);
    __m512i xv[TB];
    for (int j = 0; j < TB; ++j) xv[j] = _mm512_maskz_loadu_epi16(m, x + j * ldx + h);
    for (int r = 0; r < 4; ++r) {
      __builtin_prefetch(w[r] + 16 * ldw + h, 0, 1);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[r] + h);
      for (int j = 0; j < TB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)xv[j], wv);
    }
  }
  for (int j = 0; j < TB; ++j) reduce4_avx512(acc[0][j], acc[1][j], acc[2][j], acc[3][j], res + j * 4);
}

}  // namespace

void dot_rows(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* const* w, int64_t ldw, int rows,
              float* res) {
  switch (rows) {
    case 1: return dot_block<1>(x, ldx, K, w, ldw, res);
    case 2: return dot_block<2>(x, ldx, K, w, ldw, res);
    case 3: return dot_block<3>(x, ldx, K, w, ldw, res);
    default: return dot_block<4>(x, ldx, K, w, ldw, res);
  }
}

}  // namespace netmerge::cpu::avx512_bf16
