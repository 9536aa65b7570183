// K-quants (256-element super-blocks): q4_K, q5_K, q6_K and their activation format q8_K.
// Reference converters follow GGML's quantize_row_*_ref / dequantize_row_* step for step,
// so quantization produces the same bytes as llama-quantize (without an importance matrix)
// and dequantization the same floats. Dot products per ISA against q8_K activations.
//
// The scalar (de)quantizers are baseline code, so no FMA contraction changes GGML's rounding;
// their AVX2 / AVX-512 versions (dequantization, the scale searches of the quantizers, the q8_K
// activation quantizer) perform the same float operations in the same order with contraction
// disabled, and the tests check that every path gives the same bits.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kernels_internal.h"
#include "kernels/quants.h"

namespace larder::kernels {

namespace {

constexpr float kGroupMaxEps = 1e-15f;

// GGML's make_qkx2_quants: asymmetric quantization of n values to [0, nmax] minimizing a
// weighted error over a small grid of candidate scales. Returns the scale; *the_min receives
// the (non-negative) offset so that x ~ scale * L - the_min.
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep, bool use_mad) {
  float mn = x[0], mx = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < mn) mn = x[i];
    if (x[i] > mx) mx = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx == mn) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -mn;
    return 0.f;
  }
  float iscale = nmax / (mx - mn);
  float scale = 1 / iscale;
  float best_mad = 0;
  for (int i = 0; i < n; ++i) {
    const int l = quant_nearest_int(iscale * (x[i] - mn));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + mn - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_mad += weights[i] * diff;
  }
  if (nstep < 1) {
    *the_min = -mn;
    return scale;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (mx - mn);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = quant_nearest_int(iscale * (x[i] - mn));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float mad = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        mad += weights[i] * diff;
      }
      if (mad < best_mad) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_mad = mad;
        scale = this_scale;
        mn = this_min;
      }
    }
  }
  *the_min = -mn;
  return scale;
}

// GGML's make_qx_quants with rmse_type 1 and no importance weights (what q6_K uses):
// symmetric quantization to [-nmax, nmax-1], stored as L = l + nmax; returns the scale.
float make_qx_quants_rmse1(int n, int nmax, const float* x, int8_t* L) {
  float mx = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      mx = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = quant_nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / mx;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = quant_nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = quant_nearest_int(iscale * x[i]);
        L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// ---- The same two searches with AVX-512, bit-identical to the scalar versions above.
// Each candidate scale is one vector lane: a lane performs exactly the scalar float operations
// in the same order (sums over elements stay sequential), and no FMA contraction is allowed.
// make_qkx2_quants' candidates depend on each other through `mn` (updated whenever a candidate
// wins), so the lanes after a winner are evaluated again with the new minimum.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// For 16 candidate inverse scales: D, scale, min and weighted squared error (make_qkx2_quants'
// loop body with minimum mn).
LARDER_TARGET_AVX512 void qkx2_eval16(const float* x, const float* w, int n, int nmax, float mn, float sum_w, float sum_x,
                                      const float* isc, float* oD, float* oS, float* oM, float* oMad) {
  const __m512 is = _mm512_loadu_ps(isc);
  const __m512i vmax = _mm512_set1_epi32(nmax), vzero = _mm512_setzero_si512();
  __m512 sl = _mm512_setzero_ps(), sl2 = _mm512_setzero_ps(), sxl = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) {
    const __m512i li = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(is, _mm512_set1_ps(x[i] - mn))), vzero), vmax);
    const __m512 lf = _mm512_cvtepi32_ps(li);
    const __m512 wl = _mm512_mul_ps(_mm512_set1_ps(w[i]), lf);
    sl = _mm512_add_ps(sl, wl);
    sl2 = _mm512_add_ps(sl2, _mm512_mul_ps(wl, lf));
    sxl = _mm512_add_ps(sxl, _mm512_mul_ps(wl, _mm512_set1_ps(x[i])));
  }
  const __m512 vsw = _mm512_set1_ps(sum_w), vsx = _mm512_set1_ps(sum_x);
  const __m512 D = _mm512_sub_ps(_mm512_mul_ps(vsw, sl2), _mm512_mul_ps(sl, sl));
  __m512 ts = _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(vsw, sxl), _mm512_mul_ps(vsx, sl)), D);
  __m512 tm = _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(sl2, vsx), _mm512_mul_ps(sl, sxl)), D);
  const __mmask16 pos = _mm512_cmp_ps_mask(tm, _mm512_setzero_ps(), _CMP_GT_OQ);
  tm = _mm512_mask_mov_ps(tm, pos, _mm512_setzero_ps());
  ts = _mm512_mask_div_ps(ts, pos, sxl, sl2);
  __m512 mad = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) {
    const __m512i li = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(is, _mm512_set1_ps(x[i] - mn))), vzero), vmax);
    const __m512 diff = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(ts, _mm512_cvtepi32_ps(li)), tm), _mm512_set1_ps(x[i]));
    mad = _mm512_add_ps(mad, _mm512_mul_ps(_mm512_set1_ps(w[i]), _mm512_mul_ps(diff, diff)));
  }
  _mm512_storeu_ps(oD, D);
  _mm512_storeu_ps(oS, ts);
  _mm512_storeu_ps(oM, tm);
  _mm512_storeu_ps(oMad, mad);
}

// make_qkx2_quants (use_mad = false, nstep < 32, n <= 32) with the candidate loop vectorized.
LARDER_TARGET_AVX512 float make_qkx2_quants_avx512(int n, int nmax, const float* x, const float* weights, uint8_t* L,
                                                   float* the_min, float rmin, float rdelta, int nstep) {
  float mn = x[0], mx = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < mn) mn = x[i];
    if (x[i] > mx) mx = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx == mn) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -mn;
    return 0.f;
  }
  float iscale = nmax / (mx - mn);
  float scale = 1 / iscale;
  float best_mad = 0;
  for (int i = 0; i < n; ++i) {
    const int l = quant_nearest_int(iscale * (x[i] - mn));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + mn - x[i];
    diff = diff * diff;
    best_mad += weights[i] * diff;
  }
  if (nstep < 1) {
    *the_min = -mn;
    return scale;
  }
  const int C = nstep + 1;
  alignas(64) float isc[48], D[48], S[48], M[48], MAD[48];  // lanes up to start + 31 < 48
  int start = 0;
  float best_isc = 0, best_mn = 0;
  bool found = false;
  while (start < C) {
    for (int is = start; is < C; ++is) isc[is] = (rmin + rdelta * is + nmax) / (mx - mn);
    for (int is = C; is < 48; ++is) isc[is] = isc[C - 1];  // padding lanes (results ignored)
    for (int v = start; v < C; v += 16) qkx2_eval16(x, weights, n, nmax, mn, sum_w, sum_x, isc + v, D + v, S + v, M + v, MAD + v);
    int k = start;
    while (k < C && !(D[k] > 0 && MAD[k] < best_mad)) ++k;
    if (k == C) break;
    best_mad = MAD[k];
    scale = S[k];
    best_isc = isc[k];
    best_mn = mn;  // the winner's quants were computed with the minimum before this update
    mn = M[k];
    found = true;
    start = k + 1;
  }
  if (found)
    for (int i = 0; i < n; ++i)
      L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, quant_nearest_int(best_isc * (x[i] - best_mn)))));
  *the_min = -mn;
  return scale;
}

// make_qx_quants_rmse1 with its 18 alternative scales evaluated in two vectors; the sequential
// choice between them is then replayed on the stored sums.
LARDER_TARGET_AVX512 float make_qx_quants_rmse1_avx512(int n, int nmax, const float* x, int8_t* L) {
  float mx = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      mx = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = quant_nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  alignas(64) float isc[32], SLX[32], SL2[32];
  int C = 0;
  for (int is = -9; is <= 9; ++is)
    if (is != 0) isc[C++] = -(nmax + 0.1f * is) / mx;
  for (int k = C; k < 32; ++k) isc[k] = isc[C - 1];
  const __m512i hi = _mm512_set1_epi32(nmax - 1), lo = _mm512_set1_epi32(-nmax);
  for (int v = 0; v < C; v += 16) {
    const __m512 is = _mm512_load_ps(isc + v);
    __m512 slx = _mm512_setzero_ps(), sl2 = _mm512_setzero_ps();
    for (int i = 0; i < n; ++i) {
      const __m512i li = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(is, _mm512_set1_ps(x[i]))), lo), hi);
      const __m512 lf = _mm512_cvtepi32_ps(li);
      const float w = x[i] * x[i];
      slx = _mm512_add_ps(slx, _mm512_mul_ps(_mm512_set1_ps(w * x[i]), lf));
      sl2 = _mm512_add_ps(sl2, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(w), lf), lf));
    }
    _mm512_store_ps(SLX + v, slx);
    _mm512_store_ps(SL2 + v, sl2);
  }
  int win = -1;
  for (int k = 0; k < C; ++k) {
    if (SL2[k] > 0 && SLX[k] * SLX[k] > best * SL2[k]) {
      win = k;
      scale = SLX[k] / SL2[k];
      best = scale * SLX[k];
    }
  }
  if (win >= 0)
    for (int i = 0; i < n; ++i)
      L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, quant_nearest_int(isc[win] * x[i]))));
  return scale;
}

#pragma GCC pop_options

// Packs 8 six-bit scales and minimums into the 12-byte q4_K/q5_K layout.
void pack_scales_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* s) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] = ls[j];
      s[j + 4] = lm[j];
    } else {
      s[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      s[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
      s[j] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
    }
  }
}

// Shared by q4_K (nmax 15) and q5_K (nmax 31): per-sub-block scales/minimums by
// make_qkx2_quants, 6-bit super-block quantization of both, then the final quants L.
void quantize_superblock_k(const float* x, int nmax, float rmin, float rdelta, int nstep, uint8_t* scales_out,
                           uint16_t* d_out, uint16_t* dmin_out, uint8_t* L) {
  uint8_t Laux[32];
  float weights[32], mins[8], scales[8];
  const bool simd = active_isa() == Isa::AVX512;
  float max_scale = 0, max_min = 0;  // scales are positive once the minimum is taken out
  for (int j = 0; j < 8; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = simd ? make_qkx2_quants_avx512(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], rmin, rdelta, nstep)
                     : make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, rdelta, nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    // GGML stores nearest_int into a uint8_t before clamping; keep that exactly.
    ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(quant_nearest_int(inv_scale * scales[j])));
    lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(quant_nearest_int(inv_min * mins[j])));
  }
  std::memset(scales_out, 0, 12);
  pack_scales_k4(ls, lm, scales_out);
  *d_out = fp32_to_fp16(max_scale / 63.f);
  *dmin_out = fp32_to_fp16(max_min / 63.f);
  const float d_all = fp16_to_fp32(*d_out), dmin_all = fp16_to_fp32(*dmin_out);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    get_scale_min_k4(j, scales_out, &sc, &m);
    const float d = d_all * sc;
    if (!d) continue;  // (GGML keeps make_qkx2_quants' L here; the decoded values are -dm either way)
    const float dm = dmin_all * m;
    for (int ii = 0; ii < 32; ++ii) {
      const int l = quant_nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ q4_K

void row_float_to_q4_K(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ4_K*>(dst);
  uint8_t L[kQK_K];
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const float* x = src + i * kQK_K;
    quantize_superblock_k(x, 15, -1.f, 0.1f, 20, y[i].scales, &y[i].d, &y[i].dmin, L);
    uint8_t* q = y[i].qs;
    for (int j = 0; j < kQK_K; j += 64) {
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
      q += 32;
    }
  }
}

static void q4_K_to_float_scalar(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ4_K*>(src);
  float* y = dst;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const uint8_t* q = b[i].qs;
    const float d = fp16_to_fp32(b[i].d), mn = fp16_to_fp32(b[i].dmin);
    for (int j = 0; j < 8; j += 2) {
      uint8_t sc, m;
      get_scale_min_k4(j, b[i].scales, &sc, &m);
      const float d1 = d * sc, m1 = mn * m;
      get_scale_min_k4(j + 1, b[i].scales, &sc, &m);
      const float d2 = d * sc, m2 = mn * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
      q += 32;
    }
  }
}

// ------------------------------------------------------------------ q5_K

void row_float_to_q5_K(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ5_K*>(dst);
  uint8_t L[kQK_K];
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const float* x = src + i * kQK_K;
    quantize_superblock_k(x, 31, -0.5f, 0.1f, 15, y[i].scales, &y[i].d, &y[i].dmin, L);
    uint8_t* qh = y[i].qh;
    uint8_t* ql = y[i].qs;
    std::memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n0 = 0; n0 < kQK_K; n0 += 64) {
      for (int j = 0; j < 32; ++j) {
        int l1 = L[n0 + j];
        if (l1 > 15) {
          l1 -= 16;
          qh[j] |= m1;
        }
        int l2 = L[n0 + j + 32];
        if (l2 > 15) {
          l2 -= 16;
          qh[j] |= m2;
        }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
      m1 = static_cast<uint8_t>(m1 << 2);
      m2 = static_cast<uint8_t>(m2 << 2);
      ql += 32;
    }
  }
}

static void q5_K_to_float_scalar(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ5_K*>(src);
  float* y = dst;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const uint8_t* ql = b[i].qs;
    const uint8_t* qh = b[i].qh;
    const float d = fp16_to_fp32(b[i].d), mn = fp16_to_fp32(b[i].dmin);
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 8; j += 2) {
      uint8_t sc, m;
      get_scale_min_k4(j, b[i].scales, &sc, &m);
      const float d1 = d * sc, m1 = mn * m;
      get_scale_min_k4(j + 1, b[i].scales, &sc, &m);
      const float d2 = d * sc, m2 = mn * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
      ql += 32;
      u1 = static_cast<uint8_t>(u1 << 2);
      u2 = static_cast<uint8_t>(u2 << 2);
    }
  }
}

// ------------------------------------------------------------------ q6_K

void row_float_to_q6_K(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ6_K*>(dst);
  int8_t L[kQK_K];
  float scales[16];
  const bool simd = active_isa() == Isa::AVX512;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const float* x = src + i * kQK_K;
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      const float scale = simd ? make_qx_quants_rmse1_avx512(16, 32, x + 16 * ib, L + 16 * ib)
                               : make_qx_quants_rmse1(16, 32, x + 16 * ib, L + 16 * ib);
      scales[ib] = scale;
      if (std::fabs(scale) > max_abs_scale) {
        max_abs_scale = std::fabs(scale);
        max_scale = scale;
      }
    }
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&y[i], 0, sizeof(BlockQ6_K));
      continue;
    }
    const float iscale = -128.f / max_scale;
    y[i].d = fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < 16; ++ib)
      y[i].scales[ib] = static_cast<int8_t>(std::min(127, quant_nearest_int(iscale * scales[ib])));
    const float dall = fp16_to_fp32(y[i].d);
    for (int j = 0; j < 16; ++j) {
      const float d = dall * y[i].scales[j];
      if (!d) continue;
      for (int ii = 0; ii < 16; ++ii) {
        const int l = quant_nearest_int(x[16 * j + ii] / d);
        L[16 * j + ii] = static_cast<int8_t>(std::max(-32, std::min(31, l)) + 32);
      }
    }
    uint8_t* ql = y[i].ql;
    uint8_t* qh = y[i].qh;
    for (int j = 0; j < kQK_K; j += 128) {
      for (int l = 0; l < 32; ++l) {
        const int q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
        ql[l] = static_cast<uint8_t>(q1 | (q3 << 4));
        ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
        qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                     ((L[j + l + 96] >> 4) << 6));
      }
      ql += 64;
      qh += 32;
    }
  }
}

static void q6_K_to_float_scalar(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ6_K*>(src);
  float* y = dst;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const float d = fp16_to_fp32(b[i].d);
    const uint8_t* ql = b[i].ql;
    const uint8_t* qh = b[i].qh;
    const int8_t* sc = b[i].scales;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32;
        const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
        const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
        y[l] = d * sc[is] * static_cast<float>(q1);
        y[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
        y[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
        y[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

// ------------------------------------------------------------------ q8_K (activations)

namespace {
// Same result as the scalar loop below (cvtps rounds to nearest even like quant_nearest_int;
// NaN -> INT_MIN -> -127 like the saturating scalar path), for activations on every token.
LARDER_TARGET_AVX512 void q8_K_row_avx512(const float* src, BlockQ8_K* y, int64_t nb) {
  const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
  for (int64_t i = 0; i < nb; ++i) {
    const float* x = src + i * kQK_K;
    __m512 am = _mm512_setzero_ps();
    for (int c = 0; c < 16; ++c) am = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * c)), am);
    const float amax = _mm512_reduce_max_ps(am);
    if (!amax) {
      std::memset(&y[i], 0, sizeof(BlockQ8_K));
      continue;
    }
    float mx = amax;  // the first element of largest magnitude sets the sign, as in the scalar loop
    for (int c = 0; c < 16; ++c) {
      const __mmask16 m = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * c)), _mm512_set1_ps(amax), _CMP_EQ_OQ);
      if (m) {
        mx = x[16 * c + __builtin_ctz(m)];
        break;
      }
    }
    const float iscale = -127.f / mx;
    const __m512 vs = _mm512_set1_ps(iscale);
    for (int c = 0; c < 16; ++c) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * c), vs));
      q = _mm512_max_epi32(_mm512_min_epi32(q, hi), lo);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y[i].qs + 16 * c), _mm512_cvtepi32_epi8(q));
      y[i].bsums[c] = static_cast<int16_t>(_mm512_reduce_add_epi32(q));
    }
    y[i].d = 1 / iscale;
  }
}
}  // namespace

void row_float_to_q8_K(const float* src, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_K*>(dst);
  if (active_isa() == Isa::AVX512) return q8_K_row_avx512(src, y, n / kQK_K);
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const float* x = src + i * kQK_K;
    float mx = 0, amax = 0;
    for (int j = 0; j < kQK_K; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) {
        amax = ax;
        mx = x[j];
      }
    }
    if (!amax) {
      std::memset(&y[i], 0, sizeof(BlockQ8_K));
      continue;
    }
    const float iscale = -127.f / mx;
    for (int j = 0; j < kQK_K; ++j)
      y[i].qs[j] = static_cast<int8_t>(std::max(-127, std::min(127, quant_nearest_int(iscale * x[j]))));
    for (int g = 0; g < 16; ++g) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += y[i].qs[16 * g + l];
      y[i].bsums[g] = static_cast<int16_t>(sum);
    }
    y[i].d = 1 / iscale;
  }
}

void row_q8_K_to_float(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ8_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i)
    for (int j = 0; j < kQK_K; ++j) dst[i * kQK_K + j] = b[i].d * b[i].qs[j];
}

// ------------------------------------------------------------------ scalar dot products

namespace {
// The 8 scales (bytes 0..7) and 8 minimums (bytes 8..15) of a q4_K/q5_K block.
inline void unpack_scales_k4(const uint8_t* s, uint32_t u[4]) {
  constexpr uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  std::memcpy(u, s, 12);
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const uint32_t aux = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = aux;
  u[0] &= kmask1;
}
}  // namespace

float vec_dot_q4_K_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ4_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  float s = 0;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    uint32_t u[4];
    unpack_scales_k4(w[i].scales, u);
    const auto* sc = reinterpret_cast<const uint8_t*>(u);
    const uint8_t* mn = sc + 8;
    int32_t sumi = 0, summ = 0;
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = w[i].qs + 32 * (j / 2);
      const int8_t* xq = x[i].qs + 32 * j;
      const int shift = (j & 1) * 4;
      int32_t t = 0;
      for (int l = 0; l < 32; ++l) t += ((q[l] >> shift) & 0xF) * xq[l];
      sumi += sc[j] * t;
      summ += mn[j] * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]);
    }
    s += fp16_to_fp32(w[i].d) * x[i].d * static_cast<float>(sumi) - fp16_to_fp32(w[i].dmin) * x[i].d * static_cast<float>(summ);
  }
  return s;
}

float vec_dot_q5_K_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  float s = 0;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    uint32_t u[4];
    unpack_scales_k4(w[i].scales, u);
    const auto* sc = reinterpret_cast<const uint8_t*>(u);
    const uint8_t* mn = sc + 8;
    int32_t sumi = 0, summ = 0;
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = w[i].qs + 32 * (j / 2);
      const int8_t* xq = x[i].qs + 32 * j;
      const int shift = (j & 1) * 4;
      int32_t t = 0;
      for (int l = 0; l < 32; ++l) t += (((q[l] >> shift) & 0xF) | ((w[i].qh[l] >> j) & 1) << 4) * xq[l];
      sumi += sc[j] * t;
      summ += mn[j] * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]);
    }
    s += fp16_to_fp32(w[i].d) * x[i].d * static_cast<float>(sumi) - fp16_to_fp32(w[i].dmin) * x[i].d * static_cast<float>(summ);
  }
  return s;
}

float vec_dot_q6_K_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ6_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  float s = 0;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    int8_t q[kQK_K];
    const uint8_t* ql = w[i].ql;
    const uint8_t* qh = w[i].qh;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        q[128 * h + l] = static_cast<int8_t>(((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32);
        q[128 * h + l + 32] = static_cast<int8_t>(((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32);
        q[128 * h + l + 64] = static_cast<int8_t>(((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
        q[128 * h + l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
      }
      ql += 64;
      qh += 32;
    }
    int32_t sumi = 0;
    for (int g = 0; g < 16; ++g) {
      int32_t t = 0;
      for (int l = 0; l < 16; ++l) t += q[16 * g + l] * x[i].qs[16 * g + l];
      sumi += w[i].scales[g] * t;
    }
    s += fp16_to_fp32(w[i].d) * x[i].d * static_cast<float>(sumi);
  }
  return s;
}

float vec_dot_q8_K_scalar(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ8_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  float s = 0;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    int32_t sumi = 0;
    for (int j = 0; j < kQK_K; ++j) sumi += w[i].qs[j] * x[i].qs[j];
    s += w[i].d * x[i].d * static_cast<float>(sumi);
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

LARDER_TARGET_AVX2 inline float hsum_ps_sse(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_j mn[j] * (bsums[2j] + bsums[2j+1]) as 4 x i32 (mins: 8 x u8 in the low 8 bytes).
LARDER_TARGET_AVX2 inline __m128i mins_dot_bsums(const uint32_t* mins_u32, const int16_t* bsums) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums));
  const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mins_u32)));
  return _mm_madd_epi16(mins, pairs);
}

// Bytes 0..7: the 8 six-bit scales, bytes 8..15: the 8 minimums of a q4_K/q5_K block, in
// vector registers (no store/reload). Reads 16 bytes at `scales`: the 12 scale bytes and the
// first 4 bytes that follow them in the block.
LARDER_TARGET_AVX2 inline __m128i unpack_scales_k4_vec(const uint8_t* scales) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales));
  const __m128i a = _mm_shuffle_epi8(q, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
  const __m128i b = _mm_shuffle_epi8(q, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
  const __m128i low = _mm_or_si128(_mm_and_si128(a, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0)),
                                   _mm_and_si128(_mm_srli_epi16(a, 4), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15)));
  return _mm_or_si128(low, _mm_and_si128(_mm_srli_epi16(b, 2), _mm_set1_epi8(0x30)));  // top 2 bits of 4..7
}

// sum_j mn[j] * (bsums[2j] + bsums[2j+1]) as 4 x i32, minimums in bytes 8..15 of `scmn`.
LARDER_TARGET_AVX2 inline __m128i mins_dot_bsums_vec(__m128i scmn, const int16_t* bsums) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums));
  const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  return _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_unpackhi_epi64(scmn, scmn)), pairs);
}

}  // namespace

LARDER_TARGET_AVX2 float vec_dot_q4_K_avx2(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ4_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  const __m256i m4 = _mm256_set1_epi8(0xF);
  __m256 acc = _mm256_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    uint32_t u[4];
    unpack_scales_k4(w[i].scales, u);
    const float dx = x[i].d;
    accm = _mm_fmadd_ps(_mm_set1_ps(_cvtsh_ss(w[i].dmin) * dx), _mm_cvtepi32_ps(mins_dot_bsums(u + 2, x[i].bsums)), accm);
    alignas(16) uint16_t sc[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(sc), _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u))));
    __m256i sumi = _mm256_setzero_si256();
    const uint8_t* q = w[i].qs;
    const int8_t* xq = x[i].qs;
    for (int c = 0; c < 4; ++c) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c));
      const __m256i lo = _mm256_and_si256(bits, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * c));
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * c + 32));
      const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_set1_epi16(static_cast<short>(sc[2 * c])));
      const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), _mm256_set1_epi16(static_cast<short>(sc[2 * c + 1])));
      sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[i].d) * dx), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps_avx2(acc) - hsum_ps_sse(accm);
}

LARDER_TARGET_AVX2 float vec_dot_q5_K_avx2(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  const __m256i m4 = _mm256_set1_epi8(0xF), m1 = _mm256_set1_epi8(1);
  __m256 acc = _mm256_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    uint32_t u[4];
    unpack_scales_k4(w[i].scales, u);
    const float dx = x[i].d;
    accm = _mm_fmadd_ps(_mm_set1_ps(_cvtsh_ss(w[i].dmin) * dx), _mm_cvtepi32_ps(mins_dot_bsums(u + 2, x[i].bsums)), accm);
    alignas(16) uint16_t sc[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(sc), _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u))));
    __m256i sumi = _mm256_setzero_si256();
    __m256i hbits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i].qh));
    const uint8_t* q = w[i].qs;
    const int8_t* xq = x[i].qs;
    for (int c = 0; c < 4; ++c) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c));
      const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hbits, m1), 4);
      const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 1), m1), 4);
      hbits = _mm256_srli_epi16(hbits, 2);
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(bits, m4), h0);
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h1);
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * c));
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * c + 32));
      const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_set1_epi16(static_cast<short>(sc[2 * c])));
      const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), _mm256_set1_epi16(static_cast<short>(sc[2 * c + 1])));
      sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[i].d) * dx), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps_avx2(acc) - hsum_ps_sse(accm);
}

LARDER_TARGET_AVX2 float vec_dot_q6_K_avx2(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ6_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  const __m256i m4 = _mm256_set1_epi8(0xF), m3 = _mm256_set1_epi8(3);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    // Quants are stored as q + 32 (unsigned, for maddubs); take 32 * sum(sc * bsums) off at the end.
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[i].scales)));
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].bsums));
    __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
    alignas(32) int16_t sc[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc), sc16);
    const uint8_t* ql = w[i].ql;
    const uint8_t* qh = w[i].qh;
    const int8_t* xq = x[i].qs;
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4));
      for (int c = 0; c < 4; ++c) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * c));
        const __m256i p = _mm256_maddubs_epi16(q[c], xv);  // 16 x i16: lanes 0..7 group 2c, 8..15 group 2c+1
        const int g = 8 * h + 2 * c;
        const __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
      }
      ql += 64;
      qh += 32;
      xq += 128;
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[i].d) * x[i].d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps_avx2(acc);
}

// ------------------------------------------------------------------ AVX-512 (VNNI)
// Each 512-bit step handles 64 consecutive elements: two q4_K/q5_K sub-blocks or four q6_K
// groups. q6_K: maddubs (u8 x s8 -> pairs of i16; cannot saturate as quants are <= 63) then
// dpwssd against the sub-block scales spread over the i16 lanes by vpermw, accumulating in i32.
// q4_K/q5_K: dpbusd (u8 x s8, four products per i32 lane, |lane| <= 4 * 31 * 127 fits i16),
// two steps packed to i16 and one madd against the scales: 6 multiplies per super-block, not 8.

namespace {

// Constant vectors, built at compile time (loading them beats composing them on every call
// for rows of only a few super-blocks).
struct alignas(64) V512 {
  int16_t v[32];
};
// lanes [8k, 8k+8) <- a + k, k < 4 (four groups of 16 elements).
constexpr V512 idx_quads(int a) {
  V512 r{};
  for (int i = 0; i < 32; ++i) r.v[i] = static_cast<int16_t>(a + i / 8);
  return r;
}
// i16 lanes: lo in the low 256 bits, hi in the high 256 bits.
constexpr V512 halves(int lo, int hi) {
  V512 r{};
  for (int i = 0; i < 32; ++i) r.v[i] = static_cast<int16_t>(i < 16 ? lo : hi);
  return r;
}
// q5_K chunk c tests bit 2c of qh in the low 256 bits and bit 2c+1 in the high 256 bits.
constexpr V512 hmask(int c) {
  const int lo = 1 << (2 * c), hi = 1 << (2 * c + 1);
  return halves(lo | lo << 8, static_cast<int16_t>(hi | hi << 8));
}
struct alignas(64) B512 {
  int8_t v[64];
};
// pshufb indices (the 16 scale/min bytes repeated in every 128-bit lane) giving the i16 scale
// of each lane of packs(dpbusd of step c, dpbusd of step c + 1): 128-bit lane k holds lanes
// 4k..4k+3 of step c then of step c + 1, and step c's i32 lanes 0..7 are sub-block 2c, 8..15 2c+1.
constexpr B512 sc_pack_idx(int c) {
  B512 r{};
  for (int k = 0; k < 4; ++k)
    for (int p = 0; p < 8; ++p) {
      r.v[16 * k + 2 * p] = static_cast<int8_t>(2 * (c + p / 4) + k / 2);
      r.v[16 * k + 2 * p + 1] = -1;  // zero high byte
    }
  return r;
}
// Words mn0, mn0, mn1, mn1, .., mn7, mn7 (the minimums are bytes 8..15) over 256 bits, for a
// madd against the 16 bsums.
constexpr B512 mins_dup_idx() {
  B512 r{};
  for (int k = 0; k < 4; ++k)
    for (int p = 0; p < 8; ++p) {
      r.v[16 * k + 2 * p] = static_cast<int8_t>(8 + 4 * (k & 1) + p / 2);
      r.v[16 * k + 2 * p + 1] = -1;
    }
  return r;
}
constexpr B512 kScPack[2] = {sc_pack_idx(0), sc_pack_idx(2)};
constexpr B512 kMinsDup = mins_dup_idx();
constexpr V512 kQuads[4] = {idx_quads(0), idx_quads(4), idx_quads(8), idx_quads(12)};
constexpr V512 kHmask[4] = {hmask(0), hmask(1), hmask(2), hmask(3)};
constexpr V512 kShift04 = halves(0, 4), kShift42 = halves(4, 2), kShift02 = halves(0, 2);

LARDER_TARGET_AVX512 inline __m512i vload(const V512& v) { return _mm512_load_si512(v.v); }
LARDER_TARGET_AVX512 inline __m512i vload(const B512& v) { return _mm512_load_si512(v.v); }

LARDER_TARGET_AVX512 inline __m512i bcast256(const void* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

LARDER_TARGET_AVX512 inline __m512i xv64(const int8_t* xq, int c) { return _mm512_loadu_si512(xq + 64 * c); }

// Elements 64c .. 64c+63 of a q4_K block as bytes 0..15.
LARDER_TARGET_AVX512 inline __m512i q4k_quants(const uint8_t* q, int c, __m512i shift, __m512i m4) {
  return _mm512_and_si512(_mm512_srlv_epi16(bcast256(q + 32 * c), shift), m4);
}

// The same for q5_K, adding 16 where the chunk's high bit (selected by hm) is set.
LARDER_TARGET_AVX512 inline __m512i q5k_quants(const uint8_t* q, int c, __m512i qh, __m512i hm, __m512i shift, __m512i m4,
                                               __m512i b4) {
  const __m512i lo4 = q4k_quants(q, c, shift, m4);
  return _mm512_mask_add_epi8(lo4, _mm512_test_epi8_mask(qh, hm), lo4, b4);
}

// The per-super-block parts shared by q4_K and q5_K. scb: the 16 scale/min bytes in every
// 128-bit lane; q[c]: the quants of elements 64c .. 64c+63 (u8). Accumulates d * dx * sum_j sc_j *
// (q . x over sub-block j) into acc and dmin * dx * sum_j mn_j * bsums_j into accm.
struct K4Consts {
  __m512i sc01, sc23;
  __m256i mins;
};
LARDER_TARGET_AVX512 inline void k4_block(const uint16_t* dm, const BlockQ8_K& x, __m512i scb, const __m512i q[4], const K4Consts& k,
                                         __m512& acc, __m256& accm) {
  const __m512i z = _mm512_setzero_si512();
  // 16 x i32 per step: lanes 0..7 sub-block 2c, 8..15 sub-block 2c+1
  const __m512i a0 = _mm512_dpbusd_epi32(z, q[0], xv64(x.qs, 0)), a1 = _mm512_dpbusd_epi32(z, q[1], xv64(x.qs, 1));
  const __m512i a2 = _mm512_dpbusd_epi32(z, q[2], xv64(x.qs, 2)), a3 = _mm512_dpbusd_epi32(z, q[3], xv64(x.qs, 3));
  const __m512i s = _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_packs_epi32(a0, a1), _mm512_shuffle_epi8(scb, k.sc01)),
                                        _mm512_packs_epi32(a2, a3), _mm512_shuffle_epi8(scb, k.sc23));
  const __m256i m = _mm256_madd_epi16(_mm256_shuffle_epi8(_mm512_castsi512_si256(scb), k.mins),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.bsums)));
  // d, dmin (adjacent f16) times dx, converted together
  uint32_t dbits;
  std::memcpy(&dbits, dm, 4);
  const __m128 dd = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dbits))), _mm_set1_ps(x.d));
  acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dd), _mm512_cvtepi32_ps(s), acc);
  accm = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)), _mm256_cvtepi32_ps(m), accm);
}

}  // namespace

LARDER_TARGET_AVX512 float vec_dot_q4_K_avx512(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ4_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  const __m512i m4 = _mm512_set1_epi8(0xF);
  // low 256 bits: low nibbles (shift 0), high 256 bits: high nibbles (shift 4)
  const __m512i shift = vload(kShift04);
  const K4Consts k{vload(kScPack[0]), vload(kScPack[1]), _mm512_castsi512_si256(vload(kMinsDup))};
  __m512 acc = _mm512_setzero_ps();
  __m256 accm = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const __m512i scb = _mm512_broadcast_i32x4(unpack_scales_k4_vec(w[i].scales));
    const __m512i q[4] = {q4k_quants(w[i].qs, 0, shift, m4), q4k_quants(w[i].qs, 1, shift, m4),
                          q4k_quants(w[i].qs, 2, shift, m4), q4k_quants(w[i].qs, 3, shift, m4)};
    k4_block(&w[i].d, x[i], scb, q, k, acc, accm);
  }
  return _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(_mm512_castps256_ps512(accm));
}

LARDER_TARGET_AVX512 float vec_dot_q5_K_avx512(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ5_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  const __m512i m4 = _mm512_set1_epi8(0xF), b4 = _mm512_set1_epi8(0x10);
  const __m512i shift = vload(kShift04);
  // chunk c tests bit 2c of qh in the low half and bit 2c+1 in the high half
  const __m512i hm0 = vload(kHmask[0]), hm1 = vload(kHmask[1]), hm2 = vload(kHmask[2]), hm3 = vload(kHmask[3]);
  const K4Consts k{vload(kScPack[0]), vload(kScPack[1]), _mm512_castsi512_si256(vload(kMinsDup))};
  __m512 acc = _mm512_setzero_ps();
  __m256 accm = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const __m512i scb = _mm512_broadcast_i32x4(unpack_scales_k4_vec(w[i].scales));
    const __m512i qh = bcast256(w[i].qh);
    const uint8_t* q = w[i].qs;
    const __m512i qv[4] = {q5k_quants(q, 0, qh, hm0, shift, m4, b4), q5k_quants(q, 1, qh, hm1, shift, m4, b4),
                           q5k_quants(q, 2, qh, hm2, shift, m4, b4), q5k_quants(q, 3, qh, hm3, shift, m4, b4)};
    k4_block(&w[i].d, x[i], scb, qv, k, acc, accm);
  }
  return _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(_mm512_castps256_ps512(accm));
}

LARDER_TARGET_AVX512 float vec_dot_q6_K_avx512(const void* vw, const void* vx, int64_t n) {
  auto* w = static_cast<const BlockQ6_K*>(vw);
  auto* x = static_cast<const BlockQ8_K*>(vx);
  const __m512i m4 = _mm512_set1_epi8(0xF), m30 = _mm512_set1_epi8(0x30);
  // Elements 0..63 of a half: high bits (qh >> 0 | qh >> 2) & 3, moved to bits 4..5 -> shift left 4 | 2.
  // Elements 64..127: (qh >> 4 | qh >> 6) & 3 at bits 4..5 -> shift right 0 | 2.
  const __m512i shl = vload(kShift42), shr = vload(kShift02);
  const __m512i idx0 = vload(kQuads[0]), idx1 = vload(kQuads[1]), idx2 = vload(kQuads[2]), idx3 = vload(kQuads[3]);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[i].scales)));
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].bsums));
    const __m512i corr = _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
    const __m512i sc = _mm512_castsi256_si512(sc16);
    const int8_t* xq = x[i].qs;
    const __m512i l0 = _mm512_loadu_si512(w[i].ql), l1 = _mm512_loadu_si512(w[i].ql + 64);
    const __m512i h0 = bcast256(w[i].qh), h1 = bcast256(w[i].qh + 32);
    const __m512i qa0 = _mm512_or_si512(_mm512_and_si512(l0, m4), _mm512_and_si512(_mm512_sllv_epi16(h0, shl), m30));
    const __m512i qb0 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l0, 4), m4), _mm512_and_si512(_mm512_srlv_epi16(h0, shr), m30));
    const __m512i qa1 = _mm512_or_si512(_mm512_and_si512(l1, m4), _mm512_and_si512(_mm512_sllv_epi16(h1, shl), m30));
    const __m512i qb1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l1, 4), m4), _mm512_and_si512(_mm512_srlv_epi16(h1, shr), m30));
    __m512i s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(qa0, _mm512_loadu_si512(xq)), _mm512_permutexvar_epi16(idx0, sc));
    __m512i s1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(qb0, _mm512_loadu_si512(xq + 64)), _mm512_permutexvar_epi16(idx1, sc));
    s0 = _mm512_dpwssd_epi32(s0, _mm512_maddubs_epi16(qa1, _mm512_loadu_si512(xq + 128)), _mm512_permutexvar_epi16(idx2, sc));
    s1 = _mm512_dpwssd_epi32(s1, _mm512_maddubs_epi16(qb1, _mm512_loadu_si512(xq + 192)), _mm512_permutexvar_epi16(idx3, sc));
    const __m512i sumi = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), corr);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[i].d) * x[i].d), _mm512_cvtepi32_ps(sumi), acc);
  }
  return _mm512_reduce_add_ps(acc);
}


// ------------------------------------------------------------------ SIMD dequantization
// Used for prefill (weights are dequantized for the f32 GEMM) and embeddings. Bit-identical to
// the scalar code above: the quants are expanded to bytes, then each value is computed with the
// same float operations in the same order, without FMA contraction.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace {

LARDER_TARGET_AVX2 inline __m256 dqk_u8x8(const uint8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
LARDER_TARGET_AVX2 inline __m256 dqk_i8x8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// y = d1 * q - m1 over 8 sub-blocks of 32 quant bytes, scales from the packed q4_K/q5_K layout.
LARDER_TARGET_AVX2 inline void dqk_affine_subblocks(const uint8_t* q, const uint8_t* scales, float d, float mn, float* y) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    get_scale_min_k4(j, scales, &sc, &m);
    const __m256 d1 = _mm256_set1_ps(d * sc), m1 = _mm256_set1_ps(mn * m);
    for (int i = 0; i < 32; i += 8)
      _mm256_storeu_ps(y + 32 * j + i, _mm256_sub_ps(_mm256_mul_ps(d1, dqk_u8x8(q + 32 * j + i)), m1));
  }
}

LARDER_TARGET_AVX2 void q4_K_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ4_K*>(src);
  const __m256i m4 = _mm256_set1_epi8(0xF);
  alignas(32) uint8_t q[kQK_K];
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    for (int c = 0; c < 4; ++c) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qs + 32 * c));
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64 * c), _mm256_and_si256(bits, m4));
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4));
    }
    dqk_affine_subblocks(q, b[i].scales, _cvtsh_ss(b[i].d), _cvtsh_ss(b[i].dmin), dst + i * kQK_K);
  }
}

LARDER_TARGET_AVX2 void q5_K_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ5_K*>(src);
  const __m256i m4 = _mm256_set1_epi8(0xF), m1 = _mm256_set1_epi8(1);
  alignas(32) uint8_t q[kQK_K];
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qh));
    for (int c = 0; c < 4; ++c) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qs + 32 * c));
      const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hb, m1), 4);
      const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), m1), 4);
      hb = _mm256_srli_epi16(hb, 2);
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64 * c), _mm256_or_si256(_mm256_and_si256(bits, m4), h0));
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 64 * c + 32),
                         _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h1));
    }
    dqk_affine_subblocks(q, b[i].scales, _cvtsh_ss(b[i].d), _cvtsh_ss(b[i].dmin), dst + i * kQK_K);
  }
}

LARDER_TARGET_AVX2 void q6_K_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ6_K*>(src);
  const __m256i m4 = _mm256_set1_epi8(0xF), m3 = _mm256_set1_epi8(3), b32 = _mm256_set1_epi8(32);
  alignas(32) int8_t q[kQK_K];
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].ql + 64 * h));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].ql + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qh + 32 * h));
      const __m256i v[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4)),
          _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4))};
      for (int k = 0; k < 4; ++k)
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 128 * h + 32 * k), _mm256_sub_epi8(v[k], b32));
    }
    const float d = _cvtsh_ss(b[i].d);
    float* y = dst + i * kQK_K;
    for (int g = 0; g < 16; ++g) {
      const __m256 ds = _mm256_set1_ps(d * b[i].scales[g]);
      _mm256_storeu_ps(y + 16 * g, _mm256_mul_ps(ds, dqk_i8x8(q + 16 * g)));
      _mm256_storeu_ps(y + 16 * g + 8, _mm256_mul_ps(ds, dqk_i8x8(q + 16 * g + 8)));
    }
  }
}

}  // namespace

#pragma GCC pop_options

void row_q4_K_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q4_K_to_float_avx2(src, dst, n);
  q4_K_to_float_scalar(src, dst, n);
}
void row_q5_K_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q5_K_to_float_avx2(src, dst, n);
  q5_K_to_float_scalar(src, dst, n);
}
void row_q6_K_to_float(const void* src, float* dst, int64_t n) {
  if (active_isa() >= Isa::AVX2) return q6_K_to_float_avx2(src, dst, n);
  q6_K_to_float_scalar(src, dst, n);
}

}  // namespace larder::kernels
