// q4_0 matmul with integer dot products (TypeTraits::matmul of q4_0).
//
// Activations are quantized once per call to q8_0 values -- the same bytes and f16-rounded
// scales as quantize_row_q8_0 -- but stored in a layout made for these kernels ("x4"): per
// token, groups of 4 blocks (128 elements), 256 bytes each:
//   [  0,  64)  int8   lo:   byte 16j + i = q[block 4g+j][i]        (i < 16)
//   [ 64, 128)  int8   hi:   byte 16j + i = q[block 4g+j][16 + i]
//   [128, 192)  float  d:    lane 4j + l  = scale of block 4g+j     (l < 4)
//   [192, 256)  int32  corr: lane 4j      = -corr_mul * sum(q[block 4g+j]), other lanes 0 (corr_mul:
//                      8 here, for q4_0's nibbles q - 8; 128 for packed q8_0 stored as q + 128)
// Blocks past the end of the row are all zero. The lo/hi split matches q4_0's nibbles: the low
// nibble of qs[i] is element i, the high nibble element 16 + i, so one 16-byte qs load gives
// both halves without shuffling across the block, and vpdpbusd (unsigned x signed bytes) can
// take the raw nibbles: dot(q - 8, x) = dot(q, x) + corr.
//
// Decode (one token): one weight row at a time straight from the GGUF
// bytes, lanes = 4 blocks x 4 bytes; one vpermt2w pulls 4 blocks' qs out of 72 raw bytes, one
// vpermw their 4 scales.
// Prefill: weight panels of 32 rows are unpacked once to bytes in VNNI order (lanes = rows),
// then reused for every token: each vpdpbusd is 16 rows x 4 k for one token, the activation
// dword broadcast from memory; per 32-block the int32 sums are scaled into f32 accumulators.
// AVX2 uses the same layouts (vpmaddubsw + vpmaddwd instead of vpdpbusd, 8-row vectors); the
// scalar path spells the layouts out and is the reference the tests hold the others to.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace {

constexpr int kGroupBytes = kX4GroupBytes;
constexpr int kPanelRows = 32;        // prefill weight panel: 2 vectors of 16 rows
constexpr int kPanelVecs = kPanelRows / 16;
constexpr int kPanelBlockBytes = 8 * kPanelVecs * 64;  // one 32-block of a panel: 8 k-steps x 2 x 64 bytes
constexpr int kTokTile = 6;           // prefill tokens per register tile
// The panel kernels beat the row-at-a-time decode kernel from 2 tokens on (2048 x 768 in cache,
// 2 threads: 17 vs 22 us AVX-512, 28 vs 68 us AVX2), since a row's unpacking is shared.
constexpr int64_t kPrefillMinTokens = 2;

// Rounds x * id to an int8 quant exactly as quantize_row_q8_0 does for finite values
// (nearbyint, default rounding); NaN -> 0.
inline int quant_q8(float v) {
  const float r = std::nearbyint(v);
  if (r >= -127.f && r <= 127.f) return static_cast<int>(r);
  return r > 0 ? 127 : r < 0 ? -127 : 0;
}

// ------------------------------------------------------------------ scalar (reference layouts)

void quantize_x4_scalar(const float* x, uint8_t* out, int64_t nb, int corr_mul) {
  std::memset(out, 0, x4_row_bytes(nb));
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    uint8_t* g = out + (b / 4) * kGroupBytes;
    const int j = static_cast<int>(b % 4);
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    const float id = d != 0 ? 1.f / d : 0.f;
    const float dh = fp16_to_fp32(fp32_to_fp16(d));
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int q = quant_q8(xb[i] * id);
      sum += q;
      g[(i < 16 ? 0 : 64) + 16 * j + (i & 15)] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
    for (int l = 0; l < 4; ++l) std::memcpy(g + 128 + 4 * (4 * j + l), &dh, 4);
    const int32_t corr = -corr_mul * sum;
    std::memcpy(g + 192 + 16 * j, &corr, 4);
  }
}

// W row . x (x in the x4 layout).
float decode_scalar(const uint8_t* w, const uint8_t* x, int64_t nb) {
  const auto* blk = reinterpret_cast<const BlockQ4_0*>(w);
  float s = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = x + (b / 4) * kGroupBytes + 16 * (b % 4);
    int32_t acc = load_i32(g + 192);
    for (int i = 0; i < 16; ++i)
      acc += (blk[b].qs[i] & 0xF) * static_cast<int8_t>(g[i]) + (blk[b].qs[i] >> 4) * static_cast<int8_t>(g[64 + i]);
    s += fp16_to_fp32(blk[b].d) * load_f32(g + 128) * static_cast<float>(acc);
  }
  return s;
}

// Prefill panel layout, per 32-block b: k-step s (0..7) and vector v (rows 16v..16v+15) at
// pk + b*kPanelBlockBytes + (s*kPanelVecs + v)*64, lane i = 4 nibbles of row 16v+i: steps 0..3
// are the low nibbles of qs[4s..4s+3] (elements 4s..4s+3), steps 4..7 the high nibbles of
// qs[4(s-4)..] (elements 16+4(s-4)..). Scales at ds[b*kPanelRows + 16v + i]. Rows past nrows: 0.
void pack_vec_scalar(const uint8_t* w, size_t rb, int nrows, int64_t nb, int v, uint8_t* pk, float* ds) {
  for (int64_t b = 0; b < nb; ++b) {
    for (int s = 0; s < 8; ++s) {
      uint8_t* dst = pk + b * kPanelBlockBytes + (s * kPanelVecs + v) * 64;
      for (int i = 0; i < 16; ++i)
        for (int l = 0; l < 4; ++l) {
          uint8_t q = 0;
          if (i < nrows) {
            const uint8_t byte = reinterpret_cast<const BlockQ4_0*>(w + i * rb)[b].qs[4 * (s & 3) + l];
            q = s < 4 ? byte & 0xF : byte >> 4;
          }
          dst[4 * i + l] = q;
        }
    }
    for (int i = 0; i < 16; ++i)
      ds[b * kPanelRows + 16 * v + i] = i < nrows ? fp16_to_fp32(reinterpret_cast<const BlockQ4_0*>(w + i * rb)[b].d) : 0.f;
  }
}

// y[t*ldy + 16v + i] for t < nt, rows 16v + i < nrows.
void tile_scalar(const uint8_t* pk, const float* ds, int64_t nb, int nrows, const uint8_t* x, int64_t xs, int nt,
                 float* y, int64_t ldy) {
  for (int t = 0; t < nt; ++t)
    for (int r = 0; r < nrows; ++r) {
      const int v = r / 16, i = r % 16;
      float s = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* g = x + t * xs + (b / 4) * kGroupBytes + 16 * (b % 4);
        int32_t acc = load_i32(g + 192);
        for (int st = 0; st < 8; ++st) {
          const uint8_t* wq = pk + b * kPanelBlockBytes + (st * kPanelVecs + v) * 64 + 4 * i;
          const uint8_t* xq = g + (st < 4 ? 0 : 64) + 4 * (st & 3);
          for (int l = 0; l < 4; ++l) acc += wq[l] * static_cast<int8_t>(xq[l]);
        }
        s += ds[b * kPanelRows + r] * load_f32(g + 128) * static_cast<float>(acc);
      }
      y[t * ldy + r] = s;
    }
}

// ------------------------------------------------------------------ AVX-512

// quantize_x4_scalar, 32 values at a time (same operations, so the same bytes).
LARDER_TARGET_AVX512 void quantize_x4_avx512(const float* x, uint8_t* out, int64_t nb, int corr_mul) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const int64_t ng = (nb + 3) / 4;
  for (int64_t gi = 0; gi < ng; ++gi) {
    uint8_t* g = out + gi * kGroupBytes;
    alignas(64) float da[16] = {};
    alignas(64) int32_t corr[16] = {};
    for (int j = 0; j < 4; ++j) {
      const int64_t b = gi * 4 + j;
      if (b >= nb) {
        _mm_store_si128(reinterpret_cast<__m128i*>(g + 16 * j), _mm_setzero_si128());
        _mm_store_si128(reinterpret_cast<__m128i*>(g + 64 + 16 * j), _mm_setzero_si128());
        continue;
      }
      const __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
      // std::max(amax, |x|) keeps amax when |x| is NaN; vmaxps returns its second operand then.
      const __m512 m = _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps()));
      const float amax = _mm512_reduce_max_ps(m);
      const float d = amax / 127.f;
      const float id = d != 0 ? 1.f / d : 0.f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512 v0 = _mm512_mul_ps(x0, vid), v1 = _mm512_mul_ps(x1, vid);
      // cvtps rounds to nearest even like nearbyint; NaN -> 0 and the clamp as in quant_q8.
      __m512i q0 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(v0), hi), lo);
      __m512i q1 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(v1), hi), lo);
      q0 = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v0, v0, _CMP_ORD_Q), q0);
      q1 = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v1, v1, _CMP_ORD_Q), q1);
      const float dh = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
      for (int l = 0; l < 4; ++l) da[4 * j + l] = dh;
      corr[4 * j] = -corr_mul * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      _mm_store_si128(reinterpret_cast<__m128i*>(g + 16 * j), _mm512_cvtepi32_epi8(q0));
      _mm_store_si128(reinterpret_cast<__m128i*>(g + 64 + 16 * j), _mm512_cvtepi32_epi8(q1));
    }
    _mm512_store_ps(reinterpret_cast<float*>(g + 128), _mm512_load_ps(da));
    _mm512_store_si512(g + 192, _mm512_load_si512(corr));
  }
}

// One group of 4 blocks of one weight row: a = its first 64 bytes, b = bytes 64..71 in the low
// lanes; xg = the group in the x4 layout. Returns acc + the group's dot product, lane 4j+l
// holding part of block j.
LARDER_TARGET_AVX512 inline __m512 q4_group(__m512 acc, __m512i a, __m512i b, __m512i qidx, __m512i didx, __m512i m4,
                                            const uint8_t* xg) {
  const __m512i q = _mm512_permutex2var_epi16(a, qidx, b);
  __m512i s = _mm512_dpbusd_epi32(_mm512_load_si512(xg + 192), _mm512_and_si512(q, m4), _mm512_load_si512(xg));
  s = _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi16(q, 4), m4), _mm512_load_si512(xg + 64));
  const __m512 wd = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(didx, a)));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wd, _mm512_load_ps(reinterpret_cast<const float*>(xg + 128))), acc);
}

LARDER_TARGET_AVX512 inline __m512i load_tail8(const uint8_t* p) {
  return _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// W row . x: lanes 4j..4j+3 of the accumulators hold block j of each group; two groups per
// iteration. One row at a time: a single sequential stream per thread reads DRAM faster than
// several rows interleaved (measured: ~40 vs ~31 GB/s on 2 threads), and the activations are
// in L1 anyway.
LARDER_TARGET_AVX512 float decode_avx512(const uint8_t* w, const uint8_t* x, int64_t nb) {
  // qs of block j (words 9j+1 .. 9j+8 of the group's 72 bytes) -> words 8j .. 8j+7 (vpermt2w:
  // the offsets are even, so no VBMI needed).
  alignas(64) static const uint16_t kQsIdx[32] = {1,  2,  3,  4,  5,  6,  7,  8,  10, 11, 12, 13, 14, 15, 16, 17,
                                                  19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35};
  // f16 scale of block j (word 9j) -> words 4j .. 4j+3.
  alignas(64) static const uint16_t kDIdx[32] = {0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27,
                                                 0, 0, 0, 0, 0, 0, 0, 0, 0,  0,  0,  0,  0,  0,  0,  0};
  const __m512i qidx = _mm512_load_si512(kQsIdx), didx = _mm512_load_si512(kDIdx);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int64_t full = nb / 4;
  int64_t g = 0;
  for (; g + 2 <= full; g += 2) {
    const uint8_t* p = w + g * 72;
    acc0 = q4_group(acc0, _mm512_loadu_si512(p), load_tail8(p + 64), qidx, didx, m4, x + g * kGroupBytes);
    acc1 = q4_group(acc1, _mm512_loadu_si512(p + 72), load_tail8(p + 136), qidx, didx, m4, x + (g + 1) * kGroupBytes);
  }
  if (g < full)
    acc0 = q4_group(acc0, _mm512_loadu_si512(w + g * 72), load_tail8(w + g * 72 + 64), qidx, didx, m4, x + g * kGroupBytes);
  if (full * 4 < nb)  // 1..3 blocks left: masked load (only here: slow if the masked-off part crosses a page)
    acc1 = q4_group(acc1, _mm512_maskz_loadu_epi8((1ull << ((nb - 4 * full) * 18)) - 1, w + full * 72),
                    _mm512_setzero_si512(), qidx, didx, m4, x + full * kGroupBytes);
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// Packs rows w[0..nrows) (nrows <= 16) of every block into vector v of a panel (layout above).
LARDER_TARGET_AVX512 void pack_vec_avx512(const uint8_t* w, size_t rb, int nrows, int64_t nb, int v, uint8_t* pk,
                                          float* ds) {
  if (nrows < 16) return pack_vec_scalar(w, rb, nrows, nb, v, pk, ds);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * 18 + 2;
    auto ld = [&](int r) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * rb)); };
    // z[j] = rows j, 4+j, 8+j, 12+j in its 128-bit lanes; a 4x4 dword transpose per lane then
    // leaves dword s of rows 4L..4L+3 in lane L of t[s].
    __m512i z[4];
    for (int j = 0; j < 4; ++j)
      z[j] = _mm512_inserti32x4(
          _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(ld(j)), ld(4 + j), 1), ld(8 + j), 2), ld(12 + j), 3);
    const __m512i u0 = _mm512_unpacklo_epi32(z[0], z[1]), u1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i u2 = _mm512_unpacklo_epi32(z[2], z[3]), u3 = _mm512_unpackhi_epi32(z[2], z[3]);
    const __m512i t[4] = {_mm512_unpacklo_epi64(u0, u2), _mm512_unpackhi_epi64(u0, u2), _mm512_unpacklo_epi64(u1, u3),
                          _mm512_unpackhi_epi64(u1, u3)};
    uint8_t* dst = pk + b * kPanelBlockBytes + v * 64;
    for (int s = 0; s < 4; ++s) {
      _mm512_store_si512(dst + s * kPanelVecs * 64, _mm512_and_si512(t[s], m4));
      _mm512_store_si512(dst + (s + 4) * kPanelVecs * 64, _mm512_and_si512(_mm512_srli_epi16(t[s], 4), m4));
    }
    alignas(32) uint16_t dh[16];
    for (int i = 0; i < 16; ++i) dh[i] = load_u16(w + i * rb + b * 18);
    _mm512_storeu_ps(ds + b * kPanelRows + 16 * v, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(dh))));
  }
}

// y[t*ldy + 16v + i] = panel row 16v+i . token t, for t < T, v < RV (lanes masked by m[v]).
template <int RV, int T>
LARDER_TARGET_AVX512 void tile_avx512(const uint8_t* pk, const float* ds, int64_t nb, const __mmask16* m,
                                      const uint8_t* x, int64_t xs, float* y, int64_t ldy) {
  __m512 acc[RV][T];
  for (int v = 0; v < RV; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* xb = x + (b >> 2) * kGroupBytes + 16 * (b & 3);
    const uint8_t* wb = pk + b * kPanelBlockBytes;
    __m512i s[RV][T];
    for (int t = 0; t < T; ++t) {
      const __m512i c = _mm512_set1_epi32(load_i32(xb + t * xs + 192));
      for (int v = 0; v < RV; ++v) s[v][t] = c;
    }
    for (int st = 0; st < 8; ++st) {
      __m512i wv[RV];
      for (int v = 0; v < RV; ++v) wv[v] = _mm512_load_si512(wb + (st * kPanelVecs + v) * 64);
      const int off = (st < 4 ? 0 : 64) + 4 * (st & 3);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_set1_epi32(load_i32(xb + t * xs + off));
        for (int v = 0; v < RV; ++v) s[v][t] = _mm512_dpbusd_epi32(s[v][t], wv[v], xv);
      }
    }
    __m512 dv[RV];
    for (int v = 0; v < RV; ++v) dv[v] = _mm512_loadu_ps(ds + b * kPanelRows + 16 * v);
    for (int t = 0; t < T; ++t) {
      const __m512 xd = _mm512_set1_ps(load_f32(xb + t * xs + 128));
      for (int v = 0; v < RV; ++v) acc[v][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[v][t]), _mm512_mul_ps(dv[v], xd), acc[v][t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v) _mm512_mask_storeu_ps(y + t * ldy + 16 * v, m[v], acc[v][t]);
}

using TileFn = void (*)(const uint8_t*, const float*, int64_t, const __mmask16*, const uint8_t*, int64_t, float*, int64_t);
TileFn avx512_tile(int rv, int nt) {
  static const TileFn tb[2][kTokTile] = {
      {tile_avx512<1, 1>, tile_avx512<1, 2>, tile_avx512<1, 3>, tile_avx512<1, 4>, tile_avx512<1, 5>, tile_avx512<1, 6>},
      {tile_avx512<2, 1>, tile_avx512<2, 2>, tile_avx512<2, 3>, tile_avx512<2, 4>, tile_avx512<2, 5>, tile_avx512<2, 6>},
  };
  return tb[rv - 1][nt - 1];
}

// ------------------------------------------------------------------ AVX2
// Same layouts. Without VNNI the u8 x s8 products go through vpmaddubsw (pairs to i16) and
// vpmaddwd (to i32); at most 16 products of 15 * 127 meet in an i16 lane, so no saturation.

// quantize_x4_scalar, 32 values at a time (same operations, so the same bytes).
LARDER_TARGET_AVX2 void quantize_x4_avx2(const float* x, uint8_t* out, int64_t nb, int corr_mul) {
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::memset(out, 0, x4_row_bytes(nb));
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* g = out + (b / 4) * kGroupBytes;
    const int j = static_cast<int>(b % 4);
    __m256 v[4];
    // std::max(amax, |x|) keeps amax when |x| is NaN; vmaxps returns its second operand then.
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + b * 32 + 8 * i);
      m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.f;
    const __m256 id = _mm256_set1_ps(d != 0 ? 1.f / d : 0.f);
    __m256i q[4], sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const __m256 s = _mm256_mul_ps(v[i], id);
      q[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(s), hi), lo);
      q[i] = _mm256_and_si256(q[i], _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_ORD_Q)));  // NaN -> 0
      sum = _mm256_add_epi32(sum, q[i]);
    }
    const __m256i b16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i bytes = _mm256_permutevar8x32_epi32(b16, order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 16 * j), _mm256_castsi256_si128(bytes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 64 + 16 * j), _mm256_extracti128_si256(bytes, 1));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const int32_t corr = -corr_mul * _mm_cvtsi128_si32(s4);
    const float dh = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_ps(reinterpret_cast<float*>(g + 128 + 16 * j), _mm_set1_ps(dh));
    std::memcpy(g + 192 + 16 * j, &corr, 4);
  }
}

LARDER_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// W row . x, one 32-block at a time (lanes: 8 partial sums of the block), two accumulators.
LARDER_TARGET_AVX2 float decode_avx2(const uint8_t* w, const uint8_t* x, int64_t nb) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const auto* blk = reinterpret_cast<const BlockQ4_0*>(w);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* xb = x + (b >> 2) * kGroupBytes + 16 * (b & 3);
    const __m256i xv = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(xb + 64), reinterpret_cast<const __m128i*>(xb));
    const __m256i corr = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 192)));
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[b].qs));
    const __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wq, xv), ones), corr);
    acc[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(_cvtsh_ss(blk[b].d) * load_f32(xb + 128)), acc[b & 1]);
  }
  return hsum_avx2(_mm256_add_ps(acc[0], acc[1]));
}

// Packs 16 rows (nrows <= 16) into vector v of a panel (the AVX-512 layout: 8-row halves here).
LARDER_TARGET_AVX2 void pack_vec_avx2(const uint8_t* w, size_t rb, int nrows, int64_t nb, int v, uint8_t* pk, float* ds) {
  if (nrows < 16) return pack_vec_scalar(w, rb, nrows, nb, v, pk, ds);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * 18 + 2;
    auto ld = [&](int r) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * rb)); };
    uint8_t* dst = pk + b * kPanelBlockBytes + v * 64;
    for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h+7
      __m256i z[4];
      for (int j = 0; j < 4; ++j) z[j] = _mm256_set_m128i(ld(8 * h + 4 + j), ld(8 * h + j));
      const __m256i u0 = _mm256_unpacklo_epi32(z[0], z[1]), u1 = _mm256_unpackhi_epi32(z[0], z[1]);
      const __m256i u2 = _mm256_unpacklo_epi32(z[2], z[3]), u3 = _mm256_unpackhi_epi32(z[2], z[3]);
      const __m256i t[4] = {_mm256_unpacklo_epi64(u0, u2), _mm256_unpackhi_epi64(u0, u2), _mm256_unpacklo_epi64(u1, u3),
                            _mm256_unpackhi_epi64(u1, u3)};
      for (int s = 0; s < 4; ++s) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + s * kPanelVecs * 64 + 32 * h), _mm256_and_si256(t[s], m4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (s + 4) * kPanelVecs * 64 + 32 * h),
                           _mm256_and_si256(_mm256_srli_epi16(t[s], 4), m4));
      }
    }
    alignas(32) uint16_t dh[16];
    for (int i = 0; i < 16; ++i) dh[i] = load_u16(w + i * rb + b * 18);
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(ds + b * kPanelRows + 16 * v + 8 * h,
                       _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(dh + 8 * h))));
  }
}

// y[t*ldy + 8h + i] = panel row 8h+i . token t for the 8-row vectors h in [h0, h0+RV), t < T;
// all 8 rows of each vector are stored (the caller passes a scratch y for ragged rows).
template <int RV, int T>
LARDER_TARGET_AVX2 void tile_avx2(const uint8_t* pk, const float* ds, int64_t nb, int h0, const uint8_t* x, int64_t xs,
                                  float* y, int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RV][T];
  for (int v = 0; v < RV; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* xb = x + (b >> 2) * kGroupBytes + 16 * (b & 3);
    const uint8_t* wb = pk + b * kPanelBlockBytes + 32 * h0;
    __m256i s[RV][T];
    for (int st = 0; st < 8; ++st) {
      const int off = (st < 4 ? 0 : 64) + 4 * (st & 3);
      __m256i wv[RV];
      for (int v = 0; v < RV; ++v) wv[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + st * kPanelVecs * 64 + 32 * v));
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_set1_epi32(load_i32(xb + t * xs + off));
        for (int v = 0; v < RV; ++v) {
          const __m256i p = _mm256_maddubs_epi16(wv[v], xv);
          s[v][t] = st == 0 ? p : _mm256_add_epi16(s[v][t], p);
        }
      }
    }
    __m256 dv[RV];
    for (int v = 0; v < RV; ++v) dv[v] = _mm256_loadu_ps(ds + b * kPanelRows + 8 * (h0 + v));
    for (int t = 0; t < T; ++t) {
      const __m256i c = _mm256_set1_epi32(load_i32(xb + t * xs + 192));
      const __m256 xd = _mm256_set1_ps(load_f32(xb + t * xs + 128));
      for (int v = 0; v < RV; ++v) {
        const __m256i i32 = _mm256_add_epi32(_mm256_madd_epi16(s[v][t], ones), c);
        acc[v][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(dv[v], xd), acc[v][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v) _mm256_storeu_ps(y + t * ldy + 8 * v, acc[v][t]);
}

// ------------------------------------------------------------------ driver

struct Paths {
  void (*quantize)(const float*, uint8_t*, int64_t, int);
  float (*decode)(const uint8_t* w, const uint8_t* x, int64_t nb);
  void (*pack)(const uint8_t* w, size_t rb, int nrows, int64_t nb, int v, uint8_t* pk, float* ds);
  // Panel rows [0, nrows) x tokens [0, nt).
  void (*panel)(const uint8_t* pk, const float* ds, int64_t nb, int nrows, const uint8_t* x, int64_t xs, int64_t nt,
                float* y, int64_t ldy);
};

void panel_scalar(const uint8_t* pk, const float* ds, int64_t nb, int nrows, const uint8_t* x, int64_t xs, int64_t nt,
                  float* y, int64_t ldy) {
  tile_scalar(pk, ds, nb, nrows, x, xs, static_cast<int>(nt), y, ldy);
}

LARDER_TARGET_AVX512 void panel_avx512(const uint8_t* pk, const float* ds, int64_t nb, int nrows, const uint8_t* x,
                                       int64_t xs, int64_t nt, float* y, int64_t ldy) {
  const int rv = (nrows + 15) / 16;
  __mmask16 m[2];
  for (int v = 0; v < 2; ++v) {
    const int left = std::clamp(nrows - 16 * v, 0, 16);
    m[v] = static_cast<__mmask16>((1u << left) - 1);
  }
  for (int64_t t0 = 0; t0 < nt; t0 += kTokTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTokTile, nt - t0));
    avx512_tile(rv, n)(pk, ds, nb, m, x + t0 * xs, xs, y + t0 * ldy, ldy);
  }
}

// 8-row vectors two at a time, 2 tokens per tile; ragged rows go through a scratch tile.
constexpr int kTokTileAvx2 = 2;
LARDER_TARGET_AVX2 void panel_avx2(const uint8_t* pk, const float* ds, int64_t nb, int nrows, const uint8_t* x,
                                   int64_t xs, int64_t nt, float* y, int64_t ldy) {
  using Fn = void (*)(const uint8_t*, const float*, int64_t, int, const uint8_t*, int64_t, float*, int64_t);
  static const Fn fns[2][kTokTileAvx2] = {{tile_avx2<1, 1>, tile_avx2<1, 2>}, {tile_avx2<2, 1>, tile_avx2<2, 2>}};
  alignas(32) float tmp[kTokTileAvx2 * 16];
  for (int h0 = 0; h0 * 8 < nrows; h0 += 2) {
    const int rv = std::min(2, (nrows - 8 * h0 + 7) / 8), n_out = std::min(16, nrows - 8 * h0);
    for (int64_t t0 = 0; t0 < nt; t0 += kTokTileAvx2) {
      const int n = static_cast<int>(std::min<int64_t>(kTokTileAvx2, nt - t0));
      if (n_out == 8 * rv) {
        fns[rv - 1][n - 1](pk, ds, nb, h0, x + t0 * xs, xs, y + t0 * ldy + 8 * h0, ldy);
      } else {
        fns[rv - 1][n - 1](pk, ds, nb, h0, x + t0 * xs, xs, tmp, 16);
        for (int t = 0; t < n; ++t) std::memcpy(y + (t0 + t) * ldy + 8 * h0, tmp + 16 * t, n_out * sizeof(float));
      }
    }
  }
}

void matmul_q4_0(const Paths& P, const uint8_t* w, size_t rb, int64_t rows, int64_t cols, const float* x,
                 int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch) {
  LARDER_ASSERT(cols % 32 == 0);
  const int64_t nb = cols / 32, xs = x4_row_bytes(nb);
  uint8_t* xq = aligned_bytes(scratch.xq, static_cast<size_t>(n_tokens * xs));
  pool.parallel_for(n_tokens, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) P.quantize(x + t * cols, xq + t * xs, nb, 8);
  });
  if (n_tokens < kPrefillMinTokens) {
    // Rows split across threads in blocks of 16 (the loop also serves batches if
    // kPrefillMinTokens is raised: each row is then reused from L1 for every token).
    constexpr int64_t kRowBlock = 16;
    const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
    pool.parallel_for(nblocks, [&](int64_t b, int64_t e, int) {
      for (int64_t r = b * kRowBlock; r < std::min(rows, e * kRowBlock); ++r)
        for (int64_t t = 0; t < n_tokens; ++t) y[t * ldy + r] = P.decode(w + r * rb, xq + t * xs, nb);
    });
    return;
  }
  // Prefill: each thread unpacks a 32-row panel into its scratch, then runs all tokens over it.
  const int64_t npanels = (rows + kPanelRows - 1) / kPanelRows;
  if (static_cast<int>(scratch.wbuf.size()) < pool.size()) scratch.wbuf.resize(pool.size());
  const size_t pk_bytes = static_cast<size_t>(nb) * kPanelBlockBytes, ds_bytes = static_cast<size_t>(nb) * kPanelRows * 4;
  for (auto& buf : scratch.wbuf) aligned_bytes(buf, pk_bytes + ds_bytes);
  pool.parallel_for(npanels, [&](int64_t b, int64_t e, int tid) {
    uint8_t* pk = aligned_bytes(scratch.wbuf[tid], pk_bytes + ds_bytes);
    float* ds = reinterpret_cast<float*>(pk + pk_bytes);
    for (int64_t p = b; p < e; ++p) {
      const int64_t r0 = p * kPanelRows;
      const int nrows = static_cast<int>(std::min<int64_t>(kPanelRows, rows - r0));
      for (int v = 0; v < (nrows + 15) / 16; ++v)
        P.pack(w + (r0 + 16 * v) * rb, rb, std::min(nrows - 16 * v, 16), nb, v, pk, ds);
      P.panel(pk, ds, nb, nrows, xq, xs, n_tokens, y + r0, ldy);
    }
  });
}

const Paths kScalar = {quantize_x4_scalar, decode_scalar, pack_vec_scalar, panel_scalar};
const Paths kAvx2 = {quantize_x4_avx2, decode_avx2, pack_vec_avx2, panel_avx2};
const Paths kAvx512 = {quantize_x4_avx512, decode_avx512, pack_vec_avx512, panel_avx512};

}  // namespace

void quantize_x4(const float* x, uint8_t* out, int64_t nb, int corr_mul, Isa isa) {
  const Paths& P = isa == Isa::AVX512 ? kAvx512 : isa == Isa::AVX2 ? kAvx2 : kScalar;
  P.quantize(x, out, nb, corr_mul);
}

// d * (q - 8): one rounding, as in the scalar code.
LARDER_TARGET_AVX2 void q4_0_to_float_avx2(const void* src, float* dst, int64_t n) {
  auto* b = static_cast<const BlockQ4_0*>(src);
  const __m128i m4 = _mm_set1_epi8(0x0F), off = _mm_set1_epi8(8);
  for (int64_t k = 0; k < n / 32; ++k) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[k].qs));
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), off), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), off);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d));
    float* y = dst + k * 32;
    _mm256_storeu_ps(y, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
  }
}

void matmul_q4_0_scalar(const void* w, size_t rb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                        float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch) {
  matmul_q4_0(kScalar, static_cast<const uint8_t*>(w), rb, rows, cols, x, n_tokens, y, ldy, pool, scratch);
}
void matmul_q4_0_avx2(const void* w, size_t rb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                      float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch) {
  matmul_q4_0(kAvx2, static_cast<const uint8_t*>(w), rb, rows, cols, x, n_tokens, y, ldy, pool, scratch);
}
void matmul_q4_0_avx512(const void* w, size_t rb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                        float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch) {
  matmul_q4_0(kAvx512, static_cast<const uint8_t*>(w), rb, rows, cols, x, n_tokens, y, ldy, pool, scratch);
}

}  // namespace larder::kernels
