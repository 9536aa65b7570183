// Scalar conversions and row (de)quantization. These are also the plain references
// the fast paths are tested against.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/result.h"

#include "kernels/kernels.h"

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

void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    float d = amax / 127.f;
    float id = d != 0 ? 1.f / d : 0.f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < 32; ++j) y[b].qs[j] = static_cast<int8_t>(std::nearbyint(xb[j] * id));
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
