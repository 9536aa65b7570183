// Softmax and the gated FFN activations (SwiGLU, GeGLU-tanh) with a vector exp.
//
// These run once per score of attention and once per FFN hidden unit of every token: for a
// 512-token prefill of SmolLM2-135M that is ~60M exp calls, which glibc's scalar expf took
// ~0.3 s of a ~1 s prefill. The vector exp is Cephes' expf (range reduction by ln 2 in two
// parts, degree-6 polynomial, 2^n by exponent arithmetic): within 2 ulp of expf over the
// float range, 0 below -87.3 (where expf is denormal or 0), +inf above 88.7.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace {

constexpr float kExpHi = 88.3762626647949f, kExpLo = -87.3365478515625f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500E-4f, kP1 = 1.3981999507E-3f, kP2 = 8.3334519073E-3f, kP3 = 4.1665795894E-2f,
                kP4 = 1.6666665459E-1f, kP5 = 5.0000001201E-1f;
constexpr float kGeluK = 2.f * 0.7978845608028654f;  // 2 sqrt(2/pi): gelu_tanh(g) = g * sigmoid(k (g + c g^3))
constexpr float kGeluC = 0.044715f;

LARDER_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(kExpHi));
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);
}

LARDER_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(kExpHi));
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n: n in [-126, 128) after the clamp; n = 128 (x near kExpHi) is split in two factors.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  const __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  return _mm256_andnot_ps(under, y);
}

// f(g, u) = g * sigmoid(k * h(g)) * u: SwiGLU (h = g, k = 1) or GeGLU-tanh.
template <bool kGelu>
inline float glu1(float g, float u) {
  const float z = kGelu ? kGeluK * (g + kGeluC * g * g * g) : g;
  return g / (1.f + std::exp(-z)) * u;
}

// The vector paths compute every element with the vector exp, the last partial vector too (masked
// lanes, or a padded copy on AVX2), never glibc's expf: an element's result then does not depend on
// where it sits in the array. The FFN applies this to all tokens' rows at once ([n][n_ff] flat)
// when gate and up are separate products, so with a scalar tail a token's activations changed with
// the number of tokens before it in the batch (stories260K's n_ff 172: a decode row's greedy answer
// changed with the server's load).
template <bool kGelu>
LARDER_TARGET_AVX512 inline __m512 glu16(__m512 g, __m512 u) {
  __m512 z = g;
  if (kGelu) z = _mm512_mul_ps(_mm512_set1_ps(kGeluK), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(kGeluC), g), _mm512_mul_ps(g, g), g));
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), z));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

template <bool kGelu>
LARDER_TARGET_AVX512 void glu_avx512(float* out, const float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, glu16<kGelu>(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, glu16<kGelu>(_mm512_maskz_loadu_ps(m, gate + i), _mm512_maskz_loadu_ps(m, up + i)));
  }
}

template <bool kGelu>
LARDER_TARGET_AVX2 inline __m256 glu8(__m256 g, __m256 u) {
  __m256 z = g;
  if (kGelu) z = _mm256_mul_ps(_mm256_set1_ps(kGeluK), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluC), g), _mm256_mul_ps(g, g), g));
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

template <bool kGelu>
LARDER_TARGET_AVX2 void glu_avx2(float* out, const float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, glu8<kGelu>(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < n) {
    alignas(32) float g[8] = {}, u[8] = {};
    std::copy(gate + i, gate + n, g);
    std::copy(up + i, up + n, u);
    _mm256_store_ps(g, glu8<kGelu>(_mm256_load_ps(g), _mm256_load_ps(u)));
    std::copy(g, g + (n - i), out + i);
  }
}

template <bool kGelu>
void glu(float* out, const float* gate, const float* up, int64_t n) {
  switch (active_isa()) {
    case Isa::AVX512: return glu_avx512<kGelu>(out, gate, up, n);
    case Isa::AVX2: return glu_avx2<kGelu>(out, gate, up, n);
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = glu1<kGelu>(gate[i], up[i]);
  }
}

void softmax_scalar(float* x, int64_t n) {
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

LARDER_TARGET_AVX512 void softmax_avx512(float* x, int64_t n) {
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(x + i));
  float mx = _mm512_reduce_max_ps(vmx);
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 vs = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
    _mm512_storeu_ps(x + i, e);
    vs = _mm512_add_ps(vs, e);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m));
    _mm512_mask_storeu_ps(x + i, k, e);
    vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vs));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
  }
}

LARDER_TARGET_AVX2 void softmax_avx2(float* x, int64_t n) {
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(x + i));
  alignas(32) float t[8];
  _mm256_store_ps(t, vmx);
  float mx = *std::max_element(t, t + 8);
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  const __m256 m = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(x + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  _mm256_store_ps(t, vs);
  float sum = 0;
  for (float v : t) sum += v;
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float invs = 1.f / sum;
  const __m256 inv = _mm256_set1_ps(invs);
  for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  for (; i < n; ++i) x[i] *= invs;
}

}  // namespace

void softmax(float* x, int64_t n) {
  switch (active_isa()) {
    case Isa::AVX512: return softmax_avx512(x, n);
    case Isa::AVX2: return softmax_avx2(x, n);
    default: return softmax_scalar(x, n);
  }
}

void swiglu(float* out, const float* gate, const float* up, int64_t n) { glu<false>(out, gate, up, n); }

void geglu_tanh(float* out, const float* gate, const float* up, int64_t n) { glu<true>(out, gate, up, n); }

}  // namespace larder::kernels
