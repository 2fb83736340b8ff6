// Vectors of float32 lanes for the kernels: 16 on AVX-512, 8 on AVX2. The library is compiled
// for one of the two (builder.py picks), so each kernel is written once against these.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace tokenmill::simd {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load_int8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// bfloat16 is float32's upper half: widen to 32 bits, shift into place.
inline Vec load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vec load_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec broadcast(float v) { return _mm512_set1_ps(v); }
inline Vec zeros() { return _mm512_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
// if_negative's lanes where v < 0, otherwise's elsewhere
inline Vec select_negative(Vec v, Vec if_negative, Vec otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_negative);
}
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec round(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for whole-number n in float32's normal range: n + 127 moved into the exponent bits.
inline Vec pow2(Vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load_int8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vec load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec broadcast(float v) { return _mm256_set1_ps(v); }
inline Vec zeros() { return _mm256_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec select_negative(Vec v, Vec if_negative, Vec otherwise) {
  return _mm256_blendv_ps(otherwise, if_negative, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
}
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float sum(Vec v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}
#endif

// float32 lanes of a model dtype's values, for kernels templated on it.
inline Vec load(const c10::BFloat16* p) { return load_bf16(reinterpret_cast<const uint16_t*>(p)); }
inline Vec load(const c10::Half* p) { return load_fp16(reinterpret_cast<const uint16_t*>(p)); }

// e^x for x <= 0, as a softmax takes it (x - max), within 2 ulp of expf; below -87.3 it is
// e^-87.3 (~1e-38), not 0. Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so r is
// exact), e^r by a degree-7 polynomial, times 2^n.
inline Vec exp_nonpositive(Vec x) {
  x = max(x, broadcast(-87.3f));
  const Vec n = round(mul(x, broadcast(1.44269504088896341f)));
  Vec r = fma(n, broadcast(-0.693359375f), x);
  r = fma(n, broadcast(2.12194440e-4f), r);
  Vec p = broadcast(1.9875691500e-4f);
  p = fma(p, r, broadcast(1.3981999507e-3f));
  p = fma(p, r, broadcast(8.3334519073e-3f));
  p = fma(p, r, broadcast(4.1665795894e-2f));
  p = fma(p, r, broadcast(1.6666665459e-1f));
  p = fma(p, r, broadcast(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, broadcast(1.0f)));
  return mul(p, pow2(n));
}

}  // namespace tokenmill::simd
