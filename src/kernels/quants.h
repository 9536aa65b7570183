// Block layouts and kernels of the GGML quantization formats beyond q8_0/q4_0:
// legacy 32-element formats (q4_1, q5_0, q5_1 and the activation format q8_1) and
// the 256-element K-quants (q4_K, q5_K, q6_K and the activation format q8_K).
//
// Layouts are byte-for-byte GGML's (ggml-common.h), so GGUF files interoperate with
// llama.cpp, and dequantization reproduces GGML's floats exactly.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "model/dtype.h"

namespace larder {

constexpr int kQK = 32;    // elements per legacy block
constexpr int kQK_K = 256;  // elements per K-quant super-block

// x = d * q + m, q in [0, 15]; element j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j-16].
struct BlockQ4_1 {
  uint16_t d;  // f16 scale
  uint16_t m;  // f16 minimum
  uint8_t qs[16];
};
// x = d * (q - 16), q in [0, 31]; low 4 bits as in q4_0, bit 4 of element j is bit j of qh (little-endian u32).
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};
// x = d * q + m, q in [0, 31]; bits as in q5_0.
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[16];
};
// Activation format of q4_1/q5_1: x = d * q; s = d * sum(q) (f16, informative: Larder's
// kernels sum the quants exactly instead of trusting the rounded s).
struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;
  int8_t qs[32];
};

// 8 sub-blocks of 32: x = d * sc[j] * q - dmin * mn[j], q in [0, 15], sc/mn 6-bit packed in
// scales[12] (see get_scale_min_k4). qs: for each 64-element chunk c, 32 bytes whose low
// nibbles are elements 64c..64c+31 and high nibbles 64c+32..64c+63.
struct BlockQ4_K {
  uint16_t d;     // f16 super-block scale for the sub-block scales
  uint16_t dmin;  // f16 super-block scale for the sub-block minimums
  uint8_t scales[12];
  uint8_t qs[128];
};
// As q4_K with a 5th bit: element 64c + l (l < 32) has bit 2c of qh[l], element 64c + 32 + l bit 2c+1.
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
// 16 sub-blocks of 16: x = d * scales[j] * (q - 32), q in [0, 63]. For each 128-element half h
// (ql += 64h, qh += 32h), l < 32: element l: ql[l] & 15 | (qh[l] & 3) << 4; element 32 + l:
// ql[32 + l] & 15 | (qh[l] >> 2 & 3) << 4; element 64 + l: ql[l] >> 4 | (qh[l] >> 4 & 3) << 4;
// element 96 + l: ql[32 + l] >> 4 | (qh[l] >> 6) << 4.
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
// Activation format of the K-quants: x = d * q; bsums[g] = sum of qs[16g .. 16g+15].
struct BlockQ8_K {
  float d;
  int8_t qs[256];
  int16_t bsums[16];
};

static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

}  // namespace larder

namespace larder::kernels {

// Unpacks the 6-bit scale and minimum of sub-block j (0..7) of a q4_K/q5_K block.
inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// GGML's nearest_int: round to nearest, ties to even (|f| < 2^22). Out-of-range values and NaN
// saturate instead of returning garbage, so hostile inputs stay within the clamps that follow.
inline int quant_nearest_int(float f) {
  if (!(std::fabs(f) <= 4194303.f)) return f > 0 ? 4194303 : -4194303;
  float v = f + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// Row converters (n a multiple of the block size). The quantizers follow GGML's reference
// algorithms (quantize_row_*_ref), so they produce the same bytes as llama-quantize without an
// importance matrix.
void row_q4_1_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q4_1(const float* src, void* dst, int64_t n);
void row_q5_0_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q5_0(const float* src, void* dst, int64_t n);
void row_q5_1_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q5_1(const float* src, void* dst, int64_t n);
void row_q8_1_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q8_1(const float* src, void* dst, int64_t n);
void row_q4_K_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q4_K(const float* src, void* dst, int64_t n);
void row_q5_K_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q5_K(const float* src, void* dst, int64_t n);
void row_q6_K_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q6_K(const float* src, void* dst, int64_t n);
void row_q8_K_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q8_K(const float* src, void* dst, int64_t n);

// Dot products: weight row x activation row in the weight's vec_dot_type
// (q4_1, q5_1 -> q8_1; q5_0 -> q8_0; q4_K, q5_K, q6_K -> q8_K; q8_1 -> q8_1; q8_K -> q8_K).
#define LARDER_DECLARE_VEC_DOT(T)                                  \
  float vec_dot_##T##_scalar(const void* w, const void* x, int64_t n); \
  float vec_dot_##T##_avx2(const void* w, const void* x, int64_t n);   \
  float vec_dot_##T##_avx512(const void* w, const void* x, int64_t n);
LARDER_DECLARE_VEC_DOT(q4_1)
LARDER_DECLARE_VEC_DOT(q5_0)
LARDER_DECLARE_VEC_DOT(q5_1)
LARDER_DECLARE_VEC_DOT(q4_K)
LARDER_DECLARE_VEC_DOT(q5_K)
LARDER_DECLARE_VEC_DOT(q6_K)
#undef LARDER_DECLARE_VEC_DOT
// The activation formats as weights (only so every type with a quantizer also has a dot
// product; the engine never stores weights in them). Scalar only.
float vec_dot_q8_1_scalar(const void* w, const void* x, int64_t n);
float vec_dot_q8_K_scalar(const void* w, const void* x, int64_t n);

}  // namespace larder::kernels
