// Scalar conversions and row (de)quantization. These are also the plain references
// the fast paths are tested against (the AVX-512 q8_0 quantizer here and the AVX2 q4_0
// dequantizer in q4_0.cpp give the same bits).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/result.h"

#include "kernels/kernels_internal.h"

namespace larder::kernels {

float fp16_to_fp32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while (!(mant & 0x400));
      mant &= 0x3ff;
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | mant << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffff;
  if (absx > 0x7f800000) return static_cast<uint16_t>(sign | 0x7e00);  // NaN
  if (absx >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);  // overflow -> inf
  if (absx < 0x38800000) {  // subnormal or zero in half
    if (absx < 0x33000000) return static_cast<uint16_t>(sign);
    uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e;  // half subnormal = mantissa * 2^-24
    uint32_t half_m = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_m & 1))) ++half_m;
    return static_cast<uint16_t>(sign | half_m);
  }
  uint32_t e = (absx >> 23) - 127 + 15;
  uint32_t m = absx & 0x7fffff;
  uint32_t h = e << 10 | m >> 13;
  uint32_t rem = m & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float bf16_to_fp32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t fp32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 64);  // quiet NaN
  x += 0x7fff + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

namespace {
// quantize_row_q8_0 below, 32 values at a time: the same float operations, so the same bytes
// (cvtps rounds to nearest even like nearbyint; NaN -> 0).
LARDER_TARGET_AVX512 void quantize_row_q8_0_avx512(const float* x, BlockQ8_0* y, int64_t n) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b = 0; b < n / 32; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
    // std::max(amax, |x|) keeps amax when |x| is NaN; vmaxps returns its second operand then.
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps())));
    const float d = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d != 0 ? 1.f / d : 0.f);
    y[b].d = fp32_to_fp16(d);
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_mul_ps(h ? x1 : x0, id);
      __m512i q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(v), hi), lo);
      q = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y[b].qs + 16 * h), _mm512_cvtepi32_epi8(q));
    }
  }
}
}  // namespace

void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t n) {
  if (active_isa() == Isa::AVX512) return quantize_row_q8_0_avx512(x, y, n);
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    float d = amax / 127.f;
    float id = d != 0 ? 1.f / d : 0.f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < 32; ++j) {
      const float v = std::nearbyint(xb[j] * id);  // |v| <= 127 for finite x; NaN -> 0
      y[b].qs[j] = static_cast<int8_t>(v >= -127.f && v <= 127.f ? static_cast<int>(v) : v > 0 ? 127 : v < 0 ? -127 : 0);
    }
  }
}

static void quantize_row_q4_0(const float* x, BlockQ4_0* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0, maxv = 0;
    for (int j = 0; j < 32; ++j) {
      if (std::fabs(xb[j]) > amax) {
        amax = std::fabs(xb[j]);
        maxv = xb[j];
      }
    }
    // Same convention as GGML: the extreme value maps to -8 so the full range is used.
    float d = maxv / -8.f;
    float id = d != 0 ? 1.f / d : 0.f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < 16; ++j) {
      int q0 = std::min(15, static_cast<int>(xb[j] * id + 8.5f));
      int q1 = std::min(15, static_cast<int>(xb[j + 16] * id + 8.5f));
      y[b].qs[j] = static_cast<uint8_t>(q0 | q1 << 4);
    }
  }
}

void row_f32_to_float(const void* src, float* dst, int64_t n) { std::memcpy(dst, src, n * 4); }
void row_float_to_f32(const float* src, void* dst, int64_t n) { std::memcpy(dst, src, n * 4); }
void row_f16_to_float(const void* src, float* dst, int64_t n) {
  auto* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(s[i]);
}
void row_float_to_f16(const float* src, void* dst, int64_t n) {
  auto* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_fp16(src[i]);
}
void row_bf16_to_float(const void* src, float* dst, int64_t n) {
  auto* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(s[i]);
}
void row_float_to_bf16(const float* src, void* dst, int64_t n) {
  auto* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_bf16(src[i]);
}
void row_q8_0_to_float(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ8_0*>(src);
  for (int64_t k = 0; k < n / 32; ++k) {
    float d = fp16_to_fp32(b[k].d);
    for (int j = 0; j < 32; ++j) dst[k * 32 + j] = d * b[k].qs[j];
  }
}
void row_float_to_q8_0(const float* src, void* dst, int64_t n) { quantize_row_q8_0(src, static_cast<BlockQ8_0*>(dst), n); }
void row_q4_0_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q4_0_to_float_avx2(src, dst, n);
  auto* b = static_cast<const BlockQ4_0*>(src);
  for (int64_t k = 0; k < n / 32; ++k) {
    float d = fp16_to_fp32(b[k].d);
    for (int j = 0; j < 16; ++j) {
      dst[k * 32 + j] = d * ((b[k].qs[j] & 0xf) - 8);
      dst[k * 32 + j + 16] = d * ((b[k].qs[j] >> 4) - 8);
    }
  }
}
void row_float_to_q4_0(const float* src, void* dst, int64_t n) { quantize_row_q4_0(src, static_cast<BlockQ4_0*>(dst), n); }

}  // namespace larder::kernels
