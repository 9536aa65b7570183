// Legacy 32-element GGML formats: q4_1, q5_0, q5_1 and the activation format q8_1.
// Reference converters (bit-exact with GGML's dequantize_row_* / quantize_row_*_ref) and
// dot products against activations quantized to q8_0 / q8_1, per ISA.
//
// The scalar reference dequantizers are baseline x86-64 code, so the compiler cannot contract
// d * q + m into an FMA (which would change the last bit); their AVX2 versions (for prefill and
// embeddings) do the same operations with contraction disabled and give the same bits.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "kernels/kernels_internal.h"
#include "kernels/quants.h"

namespace larder::kernels {

namespace {

// (int)v for v in (lo, hi) -- GGML's truncating casts -- saturating outside, NaN -> lo.
inline int trunc_clamp(float v, int lo, int hi) {
  if (!(v > static_cast<float>(lo))) return lo;
  if (v >= static_cast<float>(hi)) return hi;
  return static_cast<int>(v);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

}  // namespace

// ------------------------------------------------------------------ q4_1

void row_float_to_q4_1(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ4_1*>(dst);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = src + b * kQK;
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int j = 0; j < kQK; ++j) {
      if (x[j] < mn) mn = x[j];
      if (x[j] > mx) mx = x[j];
    }
    const float d = (mx - mn) / 15;
    const float id = d ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(mn);
    for (int j = 0; j < 16; ++j) {
      const int q0 = trunc_clamp((x[j] - mn) * id + 0.5f, 0, 15);
      const int q1 = trunc_clamp((x[j + 16] - mn) * id + 0.5f, 0, 15);
      y[b].qs[j] = static_cast<uint8_t>(q0 | q1 << 4);
    }
  }
}

static void q4_1_to_float_scalar(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ4_1*>(src);
  for (int64_t k = 0; k < n / kQK; ++k) {
    const float d = fp16_to_fp32(b[k].d), m = fp16_to_fp32(b[k].m);
    float* y = dst + k * kQK;
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>(b[k].qs[j] & 0xF) * d + m;
      y[j + 16] = static_cast<float>(b[k].qs[j] >> 4) * d + m;
    }
  }
}

// ------------------------------------------------------------------ q5_0

void row_float_to_q5_0(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ5_0*>(dst);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = src + b * kQK;
    float amax = 0, mx = 0;
    for (int j = 0; j < kQK; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        mx = x[j];
      }
    }
    // Like q4_0: the extreme value maps to -16, so the full range [-16, 15] is used.
    const float d = mx / -16;
    const float id = d ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int q0 = trunc_clamp(x[j] * id + 16.5f, 0, 31);
      const int q1 = trunc_clamp(x[j + 16] * id + 16.5f, 0, 31);
      y[b].qs[j] = static_cast<uint8_t>((q0 & 0xF) | (q1 & 0xF) << 4);
      qh |= static_cast<uint32_t>(q0 >> 4) << j;
      qh |= static_cast<uint32_t>(q1 >> 4) << (j + 16);
    }
    store_u32(y[b].qh, qh);
  }
}

static void q5_0_to_float_scalar(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ5_0*>(src);
  for (int64_t k = 0; k < n / kQK; ++k) {
    const float d = fp16_to_fp32(b[k].d);
    const uint32_t qh = load_u32(b[k].qh);
    float* y = dst + k * kQK;
    for (int j = 0; j < 16; ++j) {
      const int q0 = ((b[k].qs[j] & 0xF) | ((qh >> j) & 1) << 4) - 16;
      const int q1 = ((b[k].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16;
      y[j] = static_cast<float>(q0) * d;
      y[j + 16] = static_cast<float>(q1) * d;
    }
  }
}

// ------------------------------------------------------------------ q5_1

void row_float_to_q5_1(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ5_1*>(dst);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = src + b * kQK;
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int j = 0; j < kQK; ++j) {
      if (x[j] < mn) mn = x[j];
      if (x[j] > mx) mx = x[j];
    }
    const float d = (mx - mn) / 31;
    const float id = d ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(mn);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int q0 = trunc_clamp((x[j] - mn) * id + 0.5f, 0, 31);
      const int q1 = trunc_clamp((x[j + 16] - mn) * id + 0.5f, 0, 31);
      y[b].qs[j] = static_cast<uint8_t>((q0 & 0xF) | (q1 & 0xF) << 4);
      qh |= static_cast<uint32_t>(q0 >> 4) << j;
      qh |= static_cast<uint32_t>(q1 >> 4) << (j + 16);
    }
    store_u32(y[b].qh, qh);
  }
}

static void q5_1_to_float_scalar(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ5_1*>(src);
  for (int64_t k = 0; k < n / kQK; ++k) {
    const float d = fp16_to_fp32(b[k].d), m = fp16_to_fp32(b[k].m);
    const uint32_t qh = load_u32(b[k].qh);
    float* y = dst + k * kQK;
    for (int j = 0; j < 16; ++j) {
      const int q0 = (b[k].qs[j] & 0xF) | ((qh >> j) & 1) << 4;
      const int q1 = (b[k].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      y[j] = static_cast<float>(q0) * d + m;
      y[j + 16] = static_cast<float>(q1) * d + m;
    }
  }
}

// ------------------------------------------------------------------ q8_1 (activations)

namespace {
// The scalar quantizer below, 32 values at a time: same amax, same scale, and roundf's
// half-away-from-zero rounding rebuilt from truncation (exact for these magnitudes).
LARDER_TARGET_AVX512 void q8_1_row_avx512(const float* src, BlockQ8_1* y, int64_t nb) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u)), one = _mm512_castps_si512(_mm512_set1_ps(1.0f));
  const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 x0 = _mm512_loadu_ps(src + b * kQK), x1 = _mm512_loadu_ps(src + b * kQK + 16);
    // max(0, |x|) ignoring NaN, as std::max(amax, fabs(x)) does
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_max_ps(_mm512_abs_ps(x1), _mm512_setzero_ps())));
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_mul_ps(h ? x1 : x0, _mm512_set1_ps(id));
      const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      const __m512 step = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), one));
      const __m512 r = _mm512_mask_add_ps(t, up, t, step);
      __m512i q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvttps_epi32(r), hi), lo);
      q = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), q);  // NaN -> 0
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y[b].qs + 16 * h), _mm512_cvtepi32_epi8(q));
      sum += _mm512_reduce_add_epi32(q);
    }
    y[b].d = fp32_to_fp16(d);
    y[b].s = fp32_to_fp16(static_cast<float>(sum) * d);
  }
}
}  // namespace

void row_float_to_q8_1(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_1*>(dst);
  if (active_isa() == Isa::AVX512) return q8_1_row_avx512(src, y, n / kQK);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = src + b * kQK;
    float amax = 0;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < kQK; ++j) {
      const float v = std::roundf(x[j] * id);  // |v| <= 127 (NaN -> 0)
      const int q = v >= -127.f && v <= 127.f ? static_cast<int>(v) : v > 0 ? 127 : v < 0 ? -127 : 0;
      y[b].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    y[b].d = fp32_to_fp16(d);
    y[b].s = fp32_to_fp16(static_cast<float>(sum) * d);
  }
}

void row_q8_1_to_float(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ8_1*>(src);
  for (int64_t k = 0; k < n / kQK; ++k) {
    const float d = fp16_to_fp32(b[k].d);
    for (int j = 0; j < kQK; ++j) dst[k * kQK + j] = static_cast<float>(b[k].qs[j]) * d;
  }
}

// ------------------------------------------------------------------ scalar dot products

float vec_dot_q4_1_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ4_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  float s = 0;
  for (int64_t k = 0; k < n / kQK; ++k) {
    int sumi = 0, sumx = 0;
    for (int j = 0; j < 16; ++j) {
      sumi += (w[k].qs[j] & 0xF) * x[k].qs[j] + (w[k].qs[j] >> 4) * x[k].qs[j + 16];
      sumx += x[k].qs[j] + x[k].qs[j + 16];
    }
    const float dx = fp16_to_fp32(x[k].d);
    s += fp16_to_fp32(w[k].d) * dx * static_cast<float>(sumi) + fp16_to_fp32(w[k].m) * dx * static_cast<float>(sumx);
  }
  return s;
}

float vec_dot_q5_0_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_0*>(vw);
  auto* x = static_cast<const BlockQ8_0*>(vx);
  float s = 0;
  for (int64_t k = 0; k < n / kQK; ++k) {
    const uint32_t qh = load_u32(w[k].qh);
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      const int q0 = ((w[k].qs[j] & 0xF) | ((qh >> j) & 1) << 4) - 16;
      const int q1 = ((w[k].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16;
      sumi += q0 * x[k].qs[j] + q1 * x[k].qs[j + 16];
    }
    s += fp16_to_fp32(w[k].d) * fp16_to_fp32(x[k].d) * static_cast<float>(sumi);
  }
  return s;
}

float vec_dot_q5_1_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  float s = 0;
  for (int64_t k = 0; k < n / kQK; ++k) {
    const uint32_t qh = load_u32(w[k].qh);
    int sumi = 0, sumx = 0;
    for (int j = 0; j < 16; ++j) {
      const int q0 = (w[k].qs[j] & 0xF) | ((qh >> j) & 1) << 4;
      const int q1 = (w[k].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      sumi += q0 * x[k].qs[j] + q1 * x[k].qs[j + 16];
      sumx += x[k].qs[j] + x[k].qs[j + 16];
    }
    const float dx = fp16_to_fp32(x[k].d);
    s += fp16_to_fp32(w[k].d) * dx * static_cast<float>(sumi) + fp16_to_fp32(w[k].m) * dx * static_cast<float>(sumx);
  }
  return s;
}

float vec_dot_q8_1_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ8_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  float s = 0;
  for (int64_t k = 0; k < n / kQK; ++k) {
    int sumi = 0;
    for (int j = 0; j < kQK; ++j) sumi += w[k].qs[j] * x[k].qs[j];
    s += fp16_to_fp32(w[k].d) * fp16_to_fp32(x[k].d) * static_cast<float>(sumi);
  }
  return s;
}

// ------------------------------------------------------------------ AVX2

namespace {

LARDER_TARGET_AVX2 inline float hsum_ps_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of packed nibbles -> 32 bytes: low nibbles (elements 0..15), then high (16..31).
LARDER_TARGET_AVX2 inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// Bit j of `bits` -> byte j = 0xFF if set, else 0.
LARDER_TARGET_AVX2 inline __m256i bits_to_bytes(uint32_t bits) {
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
}

// u8 x s8 -> 8 x i32 partial sums (u <= 31 here, so maddubs cannot saturate).
LARDER_TARGET_AVX2 inline __m256i dot_u8s8_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// s8 x s8 (a >= -16 here) -> 8 x i32.
LARDER_TARGET_AVX2 inline __m256i dot_s8s8_avx2(__m256i a, __m256i b) {
  return dot_u8s8_avx2(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

}  // namespace

LARDER_TARGET_AVX2 float vec_dot_q4_1_avx2(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ4_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  const __m256i ones = _mm256_set1_epi8(1);
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t k = 0; k < n / kQK; ++k) {
    const __m256i qw = unpack_nibbles(w[k].qs);
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    const float dx = _cvtsh_ss(x[k].d);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].d) * dx), _mm256_cvtepi32_ps(dot_u8s8_avx2(qw, qx)), acc);
    accm = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].m) * dx), _mm256_cvtepi32_ps(dot_u8s8_avx2(ones, qx)), accm);
  }
  return hsum_ps_avx2(_mm256_add_ps(acc, accm));
}

LARDER_TARGET_AVX2 float vec_dot_q5_0_avx2(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_0*>(vw);
  auto* x = static_cast<const BlockQ8_0*>(vx);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < n / kQK; ++k) {
    // q - 16 = nibble when the 5th bit is set, else nibble | 0xF0 (as int8).
    const __m256i hi = _mm256_andnot_si256(bits_to_bytes(load_u32(w[k].qh)), _mm256_set1_epi8(static_cast<char>(0xF0)));
    const __m256i qw = _mm256_or_si256(unpack_nibbles(w[k].qs), hi);
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(w[k].d) * _cvtsh_ss(x[k].d));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_s8s8_avx2(qw, qx)), acc);
  }
  return hsum_ps_avx2(acc);
}

LARDER_TARGET_AVX2 float vec_dot_q5_1_avx2(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  const __m256i ones = _mm256_set1_epi8(1);
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t k = 0; k < n / kQK; ++k) {
    const __m256i hi = _mm256_and_si256(bits_to_bytes(load_u32(w[k].qh)), _mm256_set1_epi8(0x10));
    const __m256i qw = _mm256_or_si256(unpack_nibbles(w[k].qs), hi);
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    const float dx = _cvtsh_ss(x[k].d);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].d) * dx), _mm256_cvtepi32_ps(dot_u8s8_avx2(qw, qx)), acc);
    accm = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].m) * dx), _mm256_cvtepi32_ps(dot_u8s8_avx2(ones, qx)), accm);
  }
  return hsum_ps_avx2(_mm256_add_ps(acc, accm));
}

// ------------------------------------------------------------------ AVX-512 (VNNI)
// dpbusd multiplies unsigned by signed bytes, so the weights enter as unsigned quants (q5_0's
// offset of 16 is taken off with a second dpbusd against 16s); the activation sums needed for
// q4_1/q5_1's minimum term are a dpbusd against ones. The main loop handles 8 blocks: two blocks
// per 512-bit vector, the per-block i32 sums transposed into one vector, and the 8 blocks' f16
// scales gathered and converted together, so the float work is per 8 blocks instead of per block.

namespace {

// Per-block tails (and short rows), 256 bits at a time.
LARDER_TARGET_AVX512 inline float q4_1_blocks(const BlockQ4_1* w, const BlockQ8_1* x, int64_t k, int64_t nb) {
  const __m256i ones = _mm256_set1_epi8(1), zero = _mm256_setzero_si256();
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (; k < nb; ++k) {
    const __m256i qw = unpack_nibbles(w[k].qs);
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    const float dx = _cvtsh_ss(x[k].d);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].d) * dx), _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, qw, qx)), acc);
    accm = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].m) * dx), _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, ones, qx)), accm);
  }
  return hsum_ps_avx2(_mm256_add_ps(acc, accm));
}

LARDER_TARGET_AVX512 inline float q5_0_blocks(const BlockQ5_0* w, const BlockQ8_0* x, int64_t k, int64_t nb) {
  const __m256i zero = _mm256_setzero_si256(), b16 = _mm256_set1_epi8(16);
  __m256 acc = _mm256_setzero_ps();
  for (; k < nb; ++k) {
    const __m256i nib = unpack_nibbles(w[k].qs);
    const __m256i q = _mm256_mask_add_epi8(nib, static_cast<__mmask32>(load_u32(w[k].qh)), nib, b16);
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    const __m256i p = _mm256_sub_epi32(_mm256_dpbusd_epi32(zero, q, qx), _mm256_dpbusd_epi32(zero, b16, qx));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].d) * _cvtsh_ss(x[k].d)), _mm256_cvtepi32_ps(p), acc);
  }
  return hsum_ps_avx2(acc);
}

LARDER_TARGET_AVX512 inline float q5_1_blocks(const BlockQ5_1* w, const BlockQ8_1* x, int64_t k, int64_t nb) {
  const __m256i ones = _mm256_set1_epi8(1), zero = _mm256_setzero_si256(), b16 = _mm256_set1_epi8(16);
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (; k < nb; ++k) {
    const __m256i nib = unpack_nibbles(w[k].qs);
    const __m256i q = _mm256_mask_add_epi8(nib, static_cast<__mmask32>(load_u32(w[k].qh)), nib, b16);
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    const float dx = _cvtsh_ss(x[k].d);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].d) * dx), _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, q, qx)), acc);
    accm = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[k].m) * dx), _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, ones, qx)), accm);
  }
  return hsum_ps_avx2(_mm256_add_ps(acc, accm));
}

// Two blocks' packed nibbles (16 bytes each) -> 64 quant bytes: block a's 32, then block b's.
LARDER_TARGET_AVX512 inline __m512i nibbles_pair(const uint8_t* a, const uint8_t* b) {
  __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  // 128-bit lanes [a, a, b, b] -> low nibbles, high nibbles, low, high
  const __m512i shift = _mm512_setr_epi64(0, 0, 0x0004000400040004, 0x0004000400040004, 0, 0, 0x0004000400040004,
                                          0x0004000400040004);
  return _mm512_and_si512(_mm512_srlv_epi16(z, shift), _mm512_set1_epi8(0xF));
}

LARDER_TARGET_AVX512 inline __m512i bytes_pair(const int8_t* a, const int8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

// p[j] holds 8 i32 partial sums of block 2j (lanes 0..7) and of block 2j+1 (lanes 8..15).
// Returns the 8 block sums in the order 0, 2, 4, 6, 1, 3, 5, 7.
LARDER_TARGET_AVX512 inline __m256i reduce_8_blocks(__m512i p0, __m512i p1, __m512i p2, __m512i p3) {
  const __m512i q0 = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
  const __m512i q1 = _mm512_add_epi32(_mm512_unpacklo_epi32(p2, p3), _mm512_unpackhi_epi32(p2, p3));
  // 128-bit lane L of r = [sum of lanes 4L..4L+3 of p0, p1, p2, p3]
  const __m512i r = _mm512_add_epi32(_mm512_unpacklo_epi64(q0, q1), _mm512_unpackhi_epi64(q0, q1));
  const __m512i t = _mm512_shuffle_i64x2(r, r, _MM_SHUFFLE(3, 1, 2, 0));  // lanes [L0, L2, L1, L3]
  return _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
}

// The 32-bit words at the start of 8 consecutive blocks, in the order 0, 2, 4, 6, 1, 3, 5, 7: the f16 scale in the low half, the f16 after it in the high half.
template <class B>
LARDER_TARGET_AVX512 inline __m256i gather_heads(const B* b) {
  // (scalar loads: vpgatherdd is slower than this on Zen 4)
  const __m128i lo = _mm_setr_epi32(static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b))),
                                    static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 2))),
                                    static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 4))),
                                    static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 6))));
  const __m128i hi = _mm_setr_epi32(static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 1))),
                                    static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 3))),
                                    static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 5))),
                                    static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(b + 7))));
  return _mm256_set_m128i(hi, lo);
}
LARDER_TARGET_AVX512 inline __m256 f16_low(__m256i v) { return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(v)); }
LARDER_TARGET_AVX512 inline __m256 f16_high(__m256i v) {
  return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(v, 16)));
}

}  // namespace

LARDER_TARGET_AVX512 float vec_dot_q4_1_avx512(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ4_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  const int64_t nb = n / kQK;
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= nb; k += 8) {
    __m512i p[4], s[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i q = nibbles_pair(w[k + 2 * j].qs, w[k + 2 * j + 1].qs);
      const __m512i xv = bytes_pair(x[k + 2 * j].qs, x[k + 2 * j + 1].qs);
      p[j] = _mm512_dpbusd_epi32(zero, q, xv);
      s[j] = _mm512_dpbusd_epi32(zero, ones, xv);
    }
    const __m256i wdm = gather_heads(w + k), xds = gather_heads(x + k);
    const __m256 dx = f16_low(xds);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce_8_blocks(p[0], p[1], p[2], p[3])), _mm256_mul_ps(f16_low(wdm), dx), acc);
    accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce_8_blocks(s[0], s[1], s[2], s[3])), _mm256_mul_ps(f16_high(wdm), dx), accm);
  }
  return hsum_ps_avx2(_mm256_add_ps(acc, accm)) + q4_1_blocks(w, x, k, nb);
}

LARDER_TARGET_AVX512 float vec_dot_q5_0_avx512(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_0*>(vw);
  auto* x = static_cast<const BlockQ8_0*>(vx);
  const int64_t nb = n / kQK;
  const __m512i b16 = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= nb; k += 8) {
    __m512i p[4];
    for (int j = 0; j < 4; ++j) {
      const BlockQ5_0& a = w[k + 2 * j];
      const BlockQ5_0& b = w[k + 2 * j + 1];
      const __m512i nib = nibbles_pair(a.qs, b.qs);
      const __mmask64 hi = load_u32(a.qh) | static_cast<uint64_t>(load_u32(b.qh)) << 32;
      const __m512i q = _mm512_mask_add_epi8(nib, hi, nib, b16);  // q in [0, 31]; value = q - 16
      const __m512i xv = bytes_pair(x[k + 2 * j].qs, x[k + 2 * j + 1].qs);
      p[j] = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, q, xv), _mm512_dpbusd_epi32(zero, b16, xv));
    }
    const __m256 d = _mm256_mul_ps(f16_low(gather_heads(w + k)),
                                   f16_low(gather_heads(x + k)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce_8_blocks(p[0], p[1], p[2], p[3])), d, acc);
  }
  return hsum_ps_avx2(acc) + q5_0_blocks(w, x, k, nb);
}

LARDER_TARGET_AVX512 float vec_dot_q5_1_avx512(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_1*>(vw);
  auto* x = static_cast<const BlockQ8_1*>(vx);
  const int64_t nb = n / kQK;
  const __m512i ones = _mm512_set1_epi8(1), b16 = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= nb; k += 8) {
    __m512i p[4], s[4];
    for (int j = 0; j < 4; ++j) {
      const BlockQ5_1& a = w[k + 2 * j];
      const BlockQ5_1& b = w[k + 2 * j + 1];
      const __m512i nib = nibbles_pair(a.qs, b.qs);
      const __mmask64 hi = load_u32(a.qh) | static_cast<uint64_t>(load_u32(b.qh)) << 32;
      const __m512i q = _mm512_mask_add_epi8(nib, hi, nib, b16);
      const __m512i xv = bytes_pair(x[k + 2 * j].qs, x[k + 2 * j + 1].qs);
      p[j] = _mm512_dpbusd_epi32(zero, q, xv);
      s[j] = _mm512_dpbusd_epi32(zero, ones, xv);
    }
    const __m256i wdm = gather_heads(w + k), xds = gather_heads(x + k);
    const __m256 dx = f16_low(xds);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce_8_blocks(p[0], p[1], p[2], p[3])), _mm256_mul_ps(f16_low(wdm), dx), acc);
    accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce_8_blocks(s[0], s[1], s[2], s[3])), _mm256_mul_ps(f16_high(wdm), dx), accm);
  }
  return hsum_ps_avx2(_mm256_add_ps(acc, accm)) + q5_1_blocks(w, x, k, nb);
}


// ------------------------------------------------------------------ SIMD dequantization
// Used for prefill (weights are dequantized for the f32 GEMM) and embeddings. Bit-identical to
// the scalar code above: same operations in the same order, and no FMA contraction (GCC would
// otherwise fuse the multiply and the add of the intrinsics below).

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace {

LARDER_TARGET_AVX2 inline __m256 dq_u8x8(const uint8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
LARDER_TARGET_AVX2 inline __m256 dq_i8x8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
LARDER_TARGET_AVX2 inline __m256i dq_nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}
// Bit j of `bits` -> 0x10 in byte j.
LARDER_TARGET_AVX2 inline __m256i dq_fifth_bits(uint32_t bits) {
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_and_si256(_mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

LARDER_TARGET_AVX2 void q4_1_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ4_1*>(src);
  alignas(32) uint8_t q[32];
  for (int64_t k = 0; k < n / kQK; ++k) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), dq_nibbles(b[k].qs));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d)), m = _mm256_set1_ps(_cvtsh_ss(b[k].m));
    for (int i = 0; i < 32; i += 8) _mm256_storeu_ps(dst + k * kQK + i, _mm256_add_ps(_mm256_mul_ps(dq_u8x8(q + i), d), m));
  }
}

LARDER_TARGET_AVX2 void q5_0_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ5_0*>(src);
  alignas(32) int8_t q[32];
  for (int64_t k = 0; k < n / kQK; ++k) {
    const __m256i u = _mm256_or_si256(dq_nibbles(b[k].qs), dq_fifth_bits(load_u32(b[k].qh)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_sub_epi8(u, _mm256_set1_epi8(16)));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d));
    for (int i = 0; i < 32; i += 8) _mm256_storeu_ps(dst + k * kQK + i, _mm256_mul_ps(dq_i8x8(q + i), d));
  }
}

LARDER_TARGET_AVX2 void q5_1_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ5_1*>(src);
  alignas(32) uint8_t q[32];
  for (int64_t k = 0; k < n / kQK; ++k) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_or_si256(dq_nibbles(b[k].qs), dq_fifth_bits(load_u32(b[k].qh))));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d)), m = _mm256_set1_ps(_cvtsh_ss(b[k].m));
    for (int i = 0; i < 32; i += 8) _mm256_storeu_ps(dst + k * kQK + i, _mm256_add_ps(_mm256_mul_ps(dq_u8x8(q + i), d), m));
  }
}

}  // namespace

#pragma GCC pop_options

void row_q4_1_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q4_1_to_float_avx2(src, dst, n);
  q4_1_to_float_scalar(src, dst, n);
}
void row_q5_0_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q5_0_to_float_avx2(src, dst, n);
  q5_0_to_float_scalar(src, dst, n);
}
void row_q5_1_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q5_1_to_float_avx2(src, dst, n);
  q5_1_to_float_scalar(src, dst, n);
}

}  // namespace larder::kernels
