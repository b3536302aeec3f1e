// AVX-512 BF16 micro-kernels (vdpbf16ps: 32 bfloat16 products per instruction into float lanes). They are built in
// an object of their own with -mavx512bf16 and raw intrinsics only, so that no inline function of another header
// is ever compiled with those flags; the avx512 build calls them when active_isa() is avx512_bf16.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace netmerge::cpu {

#if defined(__AVX512F__)
// The four horizontal sums of a, b, c, d into out[0..3]: one reduction per output costs as much as a short dot
// product itself; reducing four at once shares the shuffles.
static inline void reduce4_avx512(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));
  q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, q);
  out[0] = lanes[0], out[1] = lanes[4], out[2] = lanes[8], out[3] = lanes[12];
}
#endif

namespace avx512_bf16 {

// res[j * 4 + r] = sum_h w[r][h] * x[j * ldx + h] for `rows` (1..4) rows of x and 4 weight rows (row stride
// ldw), all bfloat16 bit patterns. Prefetches the weights 16 rows ahead, as the float streaming kernel does.
void dot_rows(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* const* w, int64_t ldw, int rows, float* res);

}  // namespace avx512_bf16
}  // namespace netmerge::cpu
