// Attention kernels over a typed KV cache (see attention_kv.h): scores (q . K rows) and P.V,
// each with a scalar reference and AVX2 / AVX-512 paths that convert cache values in registers.
//
// Scores use register tiles of R K rows x NT queries in dot-product form (K rows and queries are
// both contiguous along head_dim), like gemm_f32: each K vector is loaded and converted once per
// tile and used NT times. Decode (one query) takes 8 rows per tile: 8 independent FMA chains.
// P.V keeps [NT queries][64 (AVX-512) / 32 (AVX2) dims] of the output in registers and streams
// the V rows once per tile; with one query two rows are in flight (two sets of accumulators).
#include "kernels/attention_kv.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "core/result.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

bool kv_type_supported(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::Q8_0; }

size_t kv_row_bytes(DType t, int64_t n) {
  switch (t) {
    case DType::F32: return static_cast<size_t>(n) * 4;
    case DType::F16:
    case DType::BF16: return static_cast<size_t>(n) * 2;
    case DType::Q8_0: return static_cast<size_t>(n / 32) * sizeof(BlockQ8_0);
    default: LARDER_ASSERT(false && "unsupported KV cache type"); return 0;
  }
}

namespace {
LARDER_TARGET_AVX2 void f32_to_f16_f16c(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = fp32_to_fp16(s[i]);
}
}  // namespace

void kv_from_float(DType t, const float* src, void* dst, int64_t n, Isa isa) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::F16:
      if (isa != Isa::Scalar) f32_to_f16_f16c(src, static_cast<uint16_t*>(dst), n);
      else for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = fp32_to_fp16(src[i]);
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = fp32_to_bf16(src[i]);
      return;
    case DType::Q8_0:
      LARDER_ASSERT(n % 32 == 0);
      quantize_row_q8_0(src, static_cast<BlockQ8_0*>(dst), n);
      return;
    default: LARDER_ASSERT(false && "unsupported KV cache type");
  }
}

void kv_to_float(DType t, const void* src, float* dst, int64_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(static_cast<const uint16_t*>(src)[i]);
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(static_cast<const uint16_t*>(src)[i]);
      return;
    case DType::Q8_0: {
      LARDER_ASSERT(n % 32 == 0);
      const auto* b = static_cast<const BlockQ8_0*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(b[i / 32].d) * static_cast<float>(b[i / 32].qs[i % 32]);
      return;
    }
    default: LARDER_ASSERT(false && "unsupported KV cache type");
  }
}

namespace {

// ------------------------------------------------------------------ element access (scalar)

template <DType T>
inline float get(const uint8_t* row, int k) {
  if constexpr (T == DType::F32) {
    float v;
    std::memcpy(&v, row + 4 * k, 4);
    return v;
  } else if constexpr (T == DType::F16 || T == DType::BF16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    return T == DType::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
  } else {
    const uint8_t* b = row + (k >> 5) * sizeof(BlockQ8_0);
    uint16_t d;
    std::memcpy(&d, b, 2);
    return fp16_to_fp32(d) * static_cast<float>(static_cast<int8_t>(b[2 + (k & 31)]));
  }
}

template <DType T>
void scores_scalar(const uint8_t* K, int64_t ldk, int64_t rows, const float* q, int64_t ldq, int64_t nt, int hd,
                   float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = K + r * ldk;
    for (int64_t t = 0; t < nt; ++t) {
      float acc = 0.f;
      for (int k = 0; k < hd; ++k) acc += get<T>(row, k) * q[t * ldq + k];
      y[t * ldy + r] = acc;
    }
  }
}

template <DType T>
void pv_scalar(const float* P, int64_t ldp, int64_t nt, const uint8_t* V, int64_t ldv, int64_t len, int hd,
               float* out, int64_t ldo) {
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t p = 0; p < len; ++p) {
      const float s = P[t * ldp + p];
      if (s == 0.f) continue;  // masked / outside the window
      const uint8_t* row = V + p * ldv;
      for (int d = 0; d < hd; ++d) out[t * ldo + d] += s * get<T>(row, d);
    }
}

// ------------------------------------------------------------------ AVX2 (8 lanes)

template <DType T>
LARDER_TARGET_AVX2 inline __m256 load8(const uint8_t* row, int k) {  // k % 8 == 0, k + 8 <= hd
  if constexpr (T == DType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  } else if constexpr (T == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  } else if constexpr (T == DType::BF16) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    const uint8_t* b = row + (k >> 5) * sizeof(BlockQ8_0);
    uint16_t d;
    std::memcpy(&d, b, 2);
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + (k & 31))));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(_cvtsh_ss(d)));
  }
}

LARDER_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <DType T, int R, int NT>
LARDER_TARGET_AVX2 void sc_tile_avx2(const uint8_t* K, int64_t ldk, const float* q, int64_t ldq, int hd, float* y,
                                     int64_t ldy) {
  __m256 acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= hd; k += 8) {
    __m256 kv[R];
    for (int r = 0; r < R; ++r) kv[r] = load8<T>(K + r * ldk, k);
    for (int t = 0; t < NT; ++t) {
      const __m256 qv = _mm256_loadu_ps(q + t * ldq + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(kv[r], qv, acc[r][t]);
    }
  }
  float tail[R][NT] = {};
  for (; k < hd; ++k)
    for (int r = 0; r < R; ++r) {
      const float kv = get<T>(K + r * ldk, k);
      for (int t = 0; t < NT; ++t) tail[r][t] += kv * q[t * ldq + k];
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ldy + r] = hsum8(acc[r][t]) + tail[r][t];
}

// out[t][d0 .. d0+32) for NT queries; nj = 8-lane chunks of this pass (1..4).
template <DType T, int NT>
LARDER_TARGET_AVX2 void pv_tile_avx2(const float* P, int64_t ldp, const uint8_t* V, int64_t ldv, int64_t len, int d0,
                                     int nj, float* out, int64_t ldo) {
  __m256 acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < 4; ++j) acc[t][j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < len; ++p) {
    const uint8_t* row = V + p * ldv;
    __m256 vv[4];
    for (int j = 0; j < 4; ++j)
      if (j < nj) vv[j] = load8<T>(row, d0 + 8 * j);
    for (int t = 0; t < NT; ++t) {
      const __m256 s = _mm256_broadcast_ss(P + t * ldp + p);
      for (int j = 0; j < 4; ++j)
        if (j < nj) acc[t][j] = _mm256_fmadd_ps(s, vv[j], acc[t][j]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < 4; ++j)
      if (j < nj) {
        float* o = out + t * ldo + d0 + 8 * j;
        _mm256_storeu_ps(o, _mm256_add_ps(acc[t][j], _mm256_loadu_ps(o)));
      }
}

template <DType T>
LARDER_TARGET_AVX2 void scores_avx2(const uint8_t* K, int64_t ldk, int64_t rows, const float* q, int64_t ldq,
                                    int64_t nt, int hd, float* y, int64_t ldy) {
  if (nt == 1) {
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) sc_tile_avx2<T, 8, 1>(K + r * ldk, ldk, q, ldq, hd, y + r, ldy);
    for (; r < rows; ++r) sc_tile_avx2<T, 1, 1>(K + r * ldk, ldk, q, ldq, hd, y + r, ldy);
    return;
  }
  using Fn = void (*)(const uint8_t*, int64_t, const float*, int64_t, int, float*, int64_t);
  static const Fn full[4] = {sc_tile_avx2<T, 3, 1>, sc_tile_avx2<T, 3, 2>, sc_tile_avx2<T, 3, 3>, sc_tile_avx2<T, 3, 4>};
  static const Fn one[4] = {sc_tile_avx2<T, 1, 1>, sc_tile_avx2<T, 1, 2>, sc_tile_avx2<T, 1, 3>, sc_tile_avx2<T, 1, 4>};
  for (int64_t t0 = 0; t0 < nt; t0 += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, nt - t0));
    int64_t r = 0;
    for (; r + 3 <= rows; r += 3) full[n - 1](K + r * ldk, ldk, q + t0 * ldq, ldq, hd, y + t0 * ldy + r, ldy);
    for (; r < rows; ++r) one[n - 1](K + r * ldk, ldk, q + t0 * ldq, ldq, hd, y + t0 * ldy + r, ldy);
  }
}

template <DType T>
LARDER_TARGET_AVX2 void pv_avx2(const float* P, int64_t ldp, int64_t nt, const uint8_t* V, int64_t ldv, int64_t len,
                                int hd, float* out, int64_t ldo) {
  using Fn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, int, int, float*, int64_t);
  static const Fn fns[3] = {pv_tile_avx2<T, 1>, pv_tile_avx2<T, 2>, pv_tile_avx2<T, 3>};
  const int hd8 = hd & ~7;
  for (int64_t t0 = 0; t0 < nt; t0 += 3) {
    const int n = static_cast<int>(std::min<int64_t>(3, nt - t0));
    for (int d0 = 0; d0 < hd8; d0 += 32)
      fns[n - 1](P + t0 * ldp, ldp, V, ldv, len, d0, std::min(4, (hd8 - d0) / 8), out + t0 * ldo, ldo);
  }
  if (hd8 < hd)  // the last hd % 8 dims
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t p = 0; p < len; ++p) {
        const float s = P[t * ldp + p];
        for (int d = hd8; d < hd; ++d) out[t * ldo + d] += s * get<T>(V + p * ldv, d);
      }
}

// ------------------------------------------------------------------ AVX-512 (16 lanes)

// Lanes k .. k+15 of a row (k % 16 == 0); lanes outside m read nothing and are 0.
template <DType T>
LARDER_TARGET_AVX512 inline __m512 load16(const uint8_t* row, int k, __mmask16 m) {
  if constexpr (T == DType::F32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + k);
  } else if constexpr (T == DType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * k));
  } else if constexpr (T == DType::BF16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row + 2 * k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {  // q8_0: hd % 32 == 0, so a 16-lane chunk is always whole and in one block
    const uint8_t* b = row + (k >> 5) * sizeof(BlockQ8_0);
    uint16_t d;
    std::memcpy(&d, b, 2);
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + (k & 31))));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(_cvtsh_ss(d)));
  }
}
template <DType T>
LARDER_TARGET_AVX512 inline __m512 load16(const uint8_t* row, int k) {
  if constexpr (T == DType::F32) return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
  else if constexpr (T == DType::F16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  else if constexpr (T == DType::BF16)
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k))), 16));
  else return load16<T>(row, k, 0xFFFF);
}

template <DType T, int R, int NT>
LARDER_TARGET_AVX512 void sc_tile_avx512(const uint8_t* K, int64_t ldk, const float* q, int64_t ldq, int hd, float* y,
                                         int64_t ldy) {
  __m512 acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= hd; k += 16) {
    __m512 kv[R];
    for (int r = 0; r < R; ++r) kv[r] = load16<T>(K + r * ldk, k);
    for (int t = 0; t < NT; ++t) {
      const __m512 qv = _mm512_loadu_ps(q + t * ldq + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(kv[r], qv, acc[r][t]);
    }
  }
  if (k < hd) {
    const __mmask16 m = static_cast<__mmask16>((1u << (hd - k)) - 1);
    __m512 kv[R];
    for (int r = 0; r < R; ++r) kv[r] = load16<T>(K + r * ldk, k, m);
    for (int t = 0; t < NT; ++t) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + t * ldq + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(kv[r], qv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// out[t][d0 .. d0+64) for NT queries; nj = 16-lane chunks of this pass (1..4), m their masks.
template <DType T, int NT>
LARDER_TARGET_AVX512 void pv_tile_avx512(const float* P, int64_t ldp, const uint8_t* V, int64_t ldv, int64_t len, int d0,
                                         int nj, const __mmask16* m, float* out, int64_t ldo) {
  // One accumulator chain per row, whatever NT is: a row's sum then rounds the same in every tile
  // shape (a decode row, the 7th row of a prefill tile, a draft node), so outputs do not depend on
  // how prompts were chunked or batched. (Two interleaved chains for NT == 1 were faster for
  // one-row decode but made such a row round differently: greedy answers changed with the load.)
  __m512 acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < len; ++p) {
    const uint8_t* row = V + p * ldv;
    __m512 vv[4];
    for (int j = 0; j < 4; ++j)
      if (j < nj) vv[j] = load16<T>(row, d0 + 16 * j, m[j]);
    for (int t = 0; t < NT; ++t) {
      const __m512 s = _mm512_set1_ps(P[t * ldp + p]);
      for (int j = 0; j < 4; ++j)
        if (j < nj) acc[t][j] = _mm512_fmadd_ps(s, vv[j], acc[t][j]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < 4; ++j)
      if (j < nj) {
        float* o = out + t * ldo + d0 + 16 * j;
        _mm512_mask_storeu_ps(o, m[j], _mm512_add_ps(acc[t][j], _mm512_maskz_loadu_ps(m[j], o)));
      }
}

template <DType T>
void scores_avx512(const uint8_t* K, int64_t ldk, int64_t rows, const float* q, int64_t ldq, int64_t nt, int hd,
                   float* y, int64_t ldy) {
  if (nt == 1) {
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) sc_tile_avx512<T, 8, 1>(K + r * ldk, ldk, q, ldq, hd, y + r, ldy);
    for (; r < rows; ++r) sc_tile_avx512<T, 1, 1>(K + r * ldk, ldk, q, ldq, hd, y + r, ldy);
    return;
  }
  using Fn = void (*)(const uint8_t*, int64_t, const float*, int64_t, int, float*, int64_t);
  static const Fn full[6] = {sc_tile_avx512<T, 4, 1>, sc_tile_avx512<T, 4, 2>, sc_tile_avx512<T, 4, 3>,
                             sc_tile_avx512<T, 4, 4>, sc_tile_avx512<T, 4, 5>, sc_tile_avx512<T, 4, 6>};
  static const Fn one[6] = {sc_tile_avx512<T, 1, 1>, sc_tile_avx512<T, 1, 2>, sc_tile_avx512<T, 1, 3>,
                            sc_tile_avx512<T, 1, 4>, sc_tile_avx512<T, 1, 5>, sc_tile_avx512<T, 1, 6>};
  for (int64_t t0 = 0; t0 < nt; t0 += 6) {
    const int n = static_cast<int>(std::min<int64_t>(6, nt - t0));
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) full[n - 1](K + r * ldk, ldk, q + t0 * ldq, ldq, hd, y + t0 * ldy + r, ldy);
    for (; r < rows; ++r) one[n - 1](K + r * ldk, ldk, q + t0 * ldq, ldq, hd, y + t0 * ldy + r, ldy);
  }
}

template <DType T>
void pv_avx512(const float* P, int64_t ldp, int64_t nt, const uint8_t* V, int64_t ldv, int64_t len, int hd, float* out,
               int64_t ldo) {
  using Fn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, int, int, const __mmask16*, float*, int64_t);
  static const Fn fns[6] = {pv_tile_avx512<T, 1>, pv_tile_avx512<T, 2>, pv_tile_avx512<T, 3>,
                            pv_tile_avx512<T, 4>, pv_tile_avx512<T, 5>, pv_tile_avx512<T, 6>};
  for (int d0 = 0; d0 < hd; d0 += 64) {
    const int nd = std::min(64, hd - d0);
    const int nj = (nd + 15) / 16;
    __mmask16 m[4];
    for (int j = 0; j < 4; ++j) m[j] = static_cast<__mmask16>((1u << std::clamp(nd - 16 * j, 0, 16)) - 1);
    for (int64_t t0 = 0; t0 < nt; t0 += 6) {
      const int n = static_cast<int>(std::min<int64_t>(6, nt - t0));
      fns[n - 1](P + t0 * ldp, ldp, V, ldv, len, d0, nj, m, out + t0 * ldo, ldo);
    }
  }
}

template <DType T>
void scores_t(const uint8_t* K, int64_t ldk, int64_t rows, const float* q, int64_t ldq, int64_t nt, int hd, float* y,
              int64_t ldy, Isa isa) {
  switch (isa) {
    case Isa::AVX512: scores_avx512<T>(K, ldk, rows, q, ldq, nt, hd, y, ldy); return;
    case Isa::AVX2: scores_avx2<T>(K, ldk, rows, q, ldq, nt, hd, y, ldy); return;
    default: scores_scalar<T>(K, ldk, rows, q, ldq, nt, hd, y, ldy); return;
  }
}

template <DType T>
void pv_t(const float* P, int64_t ldp, int64_t nt, const uint8_t* V, int64_t ldv, int64_t len, int hd, float* out,
          int64_t ldo, Isa isa) {
  switch (isa) {
    case Isa::AVX512: pv_avx512<T>(P, ldp, nt, V, ldv, len, hd, out, ldo); return;
    case Isa::AVX2: pv_avx2<T>(P, ldp, nt, V, ldv, len, hd, out, ldo); return;
    default: pv_scalar<T>(P, ldp, nt, V, ldv, len, hd, out, ldo); return;
  }
}

}  // namespace

void attn_scores(DType kt, const void* K, int64_t ldk, int64_t rows, const float* q, int64_t ldq, int64_t nt, int hd,
                 float* y, int64_t ldy, Isa isa) {
  if (rows <= 0 || nt <= 0) return;
  const auto* k = static_cast<const uint8_t*>(K);
  switch (kt) {
    case DType::F32: scores_t<DType::F32>(k, ldk, rows, q, ldq, nt, hd, y, ldy, isa); return;
    case DType::F16: scores_t<DType::F16>(k, ldk, rows, q, ldq, nt, hd, y, ldy, isa); return;
    case DType::BF16: scores_t<DType::BF16>(k, ldk, rows, q, ldq, nt, hd, y, ldy, isa); return;
    case DType::Q8_0:
      LARDER_ASSERT(hd % 32 == 0);
      scores_t<DType::Q8_0>(k, ldk, rows, q, ldq, nt, hd, y, ldy, isa);
      return;
    default: LARDER_ASSERT(false && "unsupported KV cache type");
  }
}

void attn_pv(DType vt, const float* P, int64_t ldp, int64_t nt, const void* V, int64_t ldv, int64_t len, int hd,
             float* out, int64_t ldo, Isa isa) {
  if (len <= 0 || nt <= 0) return;
  const auto* v = static_cast<const uint8_t*>(V);
  switch (vt) {
    case DType::F32: pv_t<DType::F32>(P, ldp, nt, v, ldv, len, hd, out, ldo, isa); return;
    case DType::F16: pv_t<DType::F16>(P, ldp, nt, v, ldv, len, hd, out, ldo, isa); return;
    case DType::BF16: pv_t<DType::BF16>(P, ldp, nt, v, ldv, len, hd, out, ldo, isa); return;
    case DType::Q8_0:
      LARDER_ASSERT(hd % 32 == 0);
      pv_t<DType::Q8_0>(P, ldp, nt, v, ldv, len, hd, out, ldo, isa);
      return;
    default: LARDER_ASSERT(false && "unsupported KV cache type");
  }
}

}  // namespace larder::kernels
