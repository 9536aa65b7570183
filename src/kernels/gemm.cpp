// Register-blocked GEMM tiles for prefill, in "dot-product form": both operands
// are contiguous along K (weights [rows][K], activations [tokens][K]), so one tile of
// R weight rows x T tokens keeps R*T accumulators in registers and loads each weight
// and activation vector once per K step.
//
// One summation order per path for every product of a row with a token: one vector
// accumulator over K in order (16 lanes on AVX-512, 8 on AVX2), the last partial vector
// zero-padded into it, then the path's horizontal sum. It does not depend on R, T, the row or
// token counts or the other rows' values, and the dot products of f32, f16 and bf16 weights
// (vec_dot: decode, on f32 activations) are the 1 x 1 tile, on the rows as stored (f16 / bf16
// converted in registers, exactly as dequantize does before the tiles of a prefill): a token's
// products round the same alone, in a prompt chunk, or beside other sequences' rows in the
// server's batches (batch invariance). The dot products used to keep two accumulator chains
// (f32) or add the last K % 8 products one by one (AVX2), and the tiles cut rows longer than
// 1024 into slices, so decode rows and prefill rows rounded differently and a sequence's
// greedy answer changed with the server's load. The scalar path's dot products are its own.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/gemm.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace {

enum class WT { F32, F16, BF16 };
template <WT W>
using Elem = std::conditional_t<W == WT::F32, float, uint16_t>;

template <WT W>
inline float get_w(const Elem<W>* w, int64_t k) {
  if constexpr (W == WT::F32) return w[k];
  else if constexpr (W == WT::F16) return fp16_to_fp32(w[k]);
  else return bf16_to_fp32(w[k]);
}

template <WT W, int R, int T>
void tile_scalar(const Elem<W>* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y, int64_t ldy) {
  float acc[R][T] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float wv = get_w<W>(w + r * ldw, k);
      for (int t = 0; t < T; ++t) acc[r][t] += wv * x[t * ldx + k];
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * ldy + r] = acc[r][t];
}

template <WT W>
LARDER_TARGET_AVX2 inline __m256 load_w8(const Elem<W>* p) {
  if constexpr (W == WT::F32) return _mm256_loadu_ps(p);
  else if constexpr (W == WT::F16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
// The first n < 8 elements, zeros after them (nothing past them is read).
template <WT W>
LARDER_TARGET_AVX2 inline __m256 load_w8_part(const Elem<W>* p, int n, __m256i mask) {
  if constexpr (W == WT::F32) {
    return _mm256_maskload_ps(p, mask);
  } else {
    alignas(16) uint16_t b[8] = {};
    std::memcpy(b, p, n * sizeof(uint16_t));
    return load_w8<W>(b);
  }
}

// (always_inline: the 1 x 1 tiles are the types' dot products, called once per row in decode.)
template <WT W, int R, int T>
LARDER_TARGET_AVX2 __attribute__((always_inline)) inline void tile_avx2(const Elem<W>* w, int64_t ldw, const float* x,
                                                                        int64_t ldx, int64_t K, float* y, int64_t ldy) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w8<W>(w + r * ldw + k);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (k < K) {  // the last n < 8: zero-padded, into the same accumulators
    const int n = static_cast<int>(K - k);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w8_part<W>(w + r * ldw + k, n, m);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_maskload_ps(x + t * ldx + k, m);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[t * ldy + r] = _mm_cvtss_f32(s);
    }
}

template <WT W>
LARDER_TARGET_AVX512 inline __m512 load_w16(const Elem<W>* p) {
  if constexpr (W == WT::F32) return _mm512_loadu_ps(p);
  else if constexpr (W == WT::F16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
template <WT W>
LARDER_TARGET_AVX512 inline __m512 load_w16(const Elem<W>* p, __mmask16 m) {
  if constexpr (W == WT::F32) return _mm512_maskz_loadu_ps(m, p);
  else if constexpr (W == WT::F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <WT W, int R, int T>
LARDER_TARGET_AVX512 __attribute__((always_inline)) inline void tile_avx512(const Elem<W>* w, int64_t ldw, const float* x,
                                                                            int64_t ldx, int64_t K, float* y, int64_t ldy) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w16<W>(w + r * ldw + k);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (k < K) {  // the last n < 16 (masked lanes are 0), into the same accumulators
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w16<W>(w + r * ldw + k, m);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <WT W>
using TileFn = void (*)(const Elem<W>*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

// Explicit tables (R x T edge cases) for each path.
template <WT W>
TileFn<W> scalar_tile(int r, int t) {
  static const TileFn<W> tb[4][6] = {
      {tile_scalar<W, 1, 1>, tile_scalar<W, 1, 2>, tile_scalar<W, 1, 3>, tile_scalar<W, 1, 4>, tile_scalar<W, 1, 5>, tile_scalar<W, 1, 6>},
      {tile_scalar<W, 2, 1>, tile_scalar<W, 2, 2>, tile_scalar<W, 2, 3>, tile_scalar<W, 2, 4>, tile_scalar<W, 2, 5>, tile_scalar<W, 2, 6>},
      {tile_scalar<W, 3, 1>, tile_scalar<W, 3, 2>, tile_scalar<W, 3, 3>, tile_scalar<W, 3, 4>, tile_scalar<W, 3, 5>, tile_scalar<W, 3, 6>},
      {tile_scalar<W, 4, 1>, tile_scalar<W, 4, 2>, tile_scalar<W, 4, 3>, tile_scalar<W, 4, 4>, tile_scalar<W, 4, 5>, tile_scalar<W, 4, 6>},
  };
  return tb[r - 1][t - 1];
}
template <WT W>
TileFn<W> avx2_tile(int r, int t) {
  static const TileFn<W> tb[3][4] = {
      {tile_avx2<W, 1, 1>, tile_avx2<W, 1, 2>, tile_avx2<W, 1, 3>, tile_avx2<W, 1, 4>},
      {tile_avx2<W, 2, 1>, tile_avx2<W, 2, 2>, tile_avx2<W, 2, 3>, tile_avx2<W, 2, 4>},
      {tile_avx2<W, 3, 1>, tile_avx2<W, 3, 2>, tile_avx2<W, 3, 3>, tile_avx2<W, 3, 4>},
  };
  return tb[r - 1][t - 1];
}
template <WT W>
TileFn<W> avx512_tile(int r, int t) {
  static const TileFn<W> tb[4][6] = {
      {tile_avx512<W, 1, 1>, tile_avx512<W, 1, 2>, tile_avx512<W, 1, 3>, tile_avx512<W, 1, 4>, tile_avx512<W, 1, 5>, tile_avx512<W, 1, 6>},
      {tile_avx512<W, 2, 1>, tile_avx512<W, 2, 2>, tile_avx512<W, 2, 3>, tile_avx512<W, 2, 4>, tile_avx512<W, 2, 5>, tile_avx512<W, 2, 6>},
      {tile_avx512<W, 3, 1>, tile_avx512<W, 3, 2>, tile_avx512<W, 3, 3>, tile_avx512<W, 3, 4>, tile_avx512<W, 3, 5>, tile_avx512<W, 3, 6>},
      {tile_avx512<W, 4, 1>, tile_avx512<W, 4, 2>, tile_avx512<W, 4, 3>, tile_avx512<W, 4, 4>, tile_avx512<W, 4, 5>, tile_avx512<W, 4, 6>},
  };
  return tb[r - 1][t - 1];
}

// Rows are not cut along K (the dot products' order). Slices of 512 for rows longer than 1024,
// which kept a tile's operands in L1, measured slower anyway: 64 tokens x 2048 x 2048 f32 took
// 0.93x (AVX-512) / 0.82x (AVX2) the sliced time unsliced, x 8192 0.83x / 0.89x.
template <WT W>
void gemm_t(const Elem<W>* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t n_tok, int64_t K, float* y,
            int64_t ldy, Isa isa) {
  int RM, TM;
  TileFn<W> (*get)(int, int);
  switch (isa) {
    case Isa::AVX512: RM = 4; TM = 6; get = avx512_tile<W>; break;
    case Isa::AVX2: RM = 3; TM = 4; get = avx2_tile<W>; break;
    default: RM = 4; TM = 6; get = scalar_tile<W>; break;
  }
  for (int64_t t0 = 0; t0 < n_tok; t0 += TM) {
    const int nt = static_cast<int>(std::min<int64_t>(TM, n_tok - t0));
    for (int64_t r0 = 0; r0 < rows; r0 += RM) {
      const int nr = static_cast<int>(std::min<int64_t>(RM, rows - r0));
      get(nr, nt)(w + r0 * ldw, ldw, x + t0 * ldx, ldx, K, y + t0 * ldy + r0, ldy);
    }
  }
}

}  // namespace

void gemm_f32(const float* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t n_tok, int64_t K,
              float* y, int64_t ldy, Isa isa) {
  gemm_t<WT::F32>(w, ldw, rows, x, ldx, n_tok, K, y, ldy, isa);
}

// The types' dot products on the SIMD paths (traits.cpp's vec_dot): the 1 x 1 tile.
#define LARDER_DOT(name, wt, target, tile)                                                     \
  target float name(const void* w, const void* x, int64_t n) {                                 \
    float y;                                                                                   \
    tile<wt, 1, 1>(static_cast<const Elem<wt>*>(w), 0, static_cast<const float*>(x), 0, n, &y, 0); \
    return y;                                                                                  \
  }
LARDER_DOT(vec_dot_f32_avx2, WT::F32, LARDER_TARGET_AVX2, tile_avx2)
LARDER_DOT(vec_dot_f16_avx2, WT::F16, LARDER_TARGET_AVX2, tile_avx2)
LARDER_DOT(vec_dot_bf16_avx2, WT::BF16, LARDER_TARGET_AVX2, tile_avx2)
LARDER_DOT(vec_dot_f32_avx512, WT::F32, LARDER_TARGET_AVX512, tile_avx512)
LARDER_DOT(vec_dot_f16_avx512, WT::F16, LARDER_TARGET_AVX512, tile_avx512)
LARDER_DOT(vec_dot_bf16_avx512, WT::BF16, LARDER_TARGET_AVX512, tile_avx512)
#undef LARDER_DOT

}  // namespace larder::kernels

namespace larder::kernels {

namespace {
// out[t][d] += sum_p P[t][p] * V[p][d], T queries at once, 64 dims per pass.
template <int T>
LARDER_TARGET_AVX512 void pv_tile_avx512(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t len, int hd,
                                         float* out, int64_t ldo) {
  for (int d0 = 0; d0 < hd; d0 += 64) {
    const int nd = std::min(64, hd - d0);
    __mmask16 m[4];
    for (int j = 0; j < 4; ++j) {
      int left = std::clamp(nd - 16 * j, 0, 16);
      m[j] = static_cast<__mmask16>((1u << left) - 1);
    }
    __m512 acc[T][4];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < len; ++p) {
      const float* v = V + p * ldv + d0;
      __m512 vv[4];
      for (int j = 0; j < 4; ++j) vv[j] = _mm512_maskz_loadu_ps(m[j], v + 16 * j);
      for (int t = 0; t < T; ++t) {
        __m512 s = _mm512_set1_ps(P[t * ldp + p]);
        for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_fmadd_ps(s, vv[j], acc[t][j]);
      }
    }
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 4; ++j) {
        float* o = out + t * ldo + d0 + 16 * j;
        _mm512_mask_storeu_ps(o, m[j], _mm512_add_ps(acc[t][j], _mm512_maskz_loadu_ps(m[j], o)));
      }
  }
}
}  // namespace

void pv_accumulate(const float* P, int64_t ldp, int64_t nt, const float* V, int64_t ldv, int64_t len, int hd,
                   float* out, int64_t ldo, Isa isa) {
  if (isa == Isa::AVX512) {
    using Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int, float*, int64_t);
    static const Fn fns[6] = {pv_tile_avx512<1>, pv_tile_avx512<2>, pv_tile_avx512<3>,
                              pv_tile_avx512<4>, pv_tile_avx512<5>, pv_tile_avx512<6>};
    for (int64_t t0 = 0; t0 < nt; t0 += 6) {
      const int n = static_cast<int>(std::min<int64_t>(6, nt - t0));
      fns[n - 1](P + t0 * ldp, ldp, V, ldv, len, hd, out + t0 * ldo, ldo);
    }
    return;
  }
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t p = 0; p < len; ++p) axpy(out + t * ldo, V + p * ldv, P[t * ldp + p], hd);
}

}  // namespace larder::kernels
