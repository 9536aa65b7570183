// Register-blocked f32 GEMM tiles for prefill, in "dot-product form": both operands
// are contiguous along K (weights [rows][K], activations [tokens][K]), so one tile of
// R weight rows x T tokens keeps R*T accumulators in registers and loads each weight
// and activation vector once per K step.
#include <immintrin.h>

#include <algorithm>

#include "kernels/gemm.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace {

template <int R, int T>
void tile_scalar(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y, int64_t ldy, bool accum) {
  float acc[R][T] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] += w[r * ldw + k] * x[t * ldx + k];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * ldy + r] = (accum ? y[t * ldy + r] : 0.f) + acc[r][t];
}

template <int R, int T>
LARDER_TARGET_AVX2 void tile_avx2(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y,
                                  int64_t ldy, bool accum) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * ldw + k);
    for (int t = 0; t < T; ++t) {
      __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  float tail[R][T] = {};
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) tail[r][t] += w[r * ldw + k] * x[t * ldx + k];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[t * ldy + r] = (accum ? y[t * ldy + r] : 0.f) + _mm_cvtss_f32(s) + tail[r][t];
    }
}

template <int R, int T>
LARDER_TARGET_AVX512 void tile_avx512(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y,
                                      int64_t ldy, bool accum) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * ldw + k);
    for (int t = 0; t < T; ++t) {
      __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(m, w + r * ldw + k);
    for (int t = 0; t < T; ++t) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * ldy + r] = (accum ? y[t * ldy + r] : 0.f) + _mm512_reduce_add_ps(acc[r][t]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

// Explicit tables (R x T edge cases) for each path.
TileFn scalar_tile(int r, int t) {
  static const TileFn tb[4][6] = {
      {tile_scalar<1, 1>, tile_scalar<1, 2>, tile_scalar<1, 3>, tile_scalar<1, 4>, tile_scalar<1, 5>, tile_scalar<1, 6>},
      {tile_scalar<2, 1>, tile_scalar<2, 2>, tile_scalar<2, 3>, tile_scalar<2, 4>, tile_scalar<2, 5>, tile_scalar<2, 6>},
      {tile_scalar<3, 1>, tile_scalar<3, 2>, tile_scalar<3, 3>, tile_scalar<3, 4>, tile_scalar<3, 5>, tile_scalar<3, 6>},
      {tile_scalar<4, 1>, tile_scalar<4, 2>, tile_scalar<4, 3>, tile_scalar<4, 4>, tile_scalar<4, 5>, tile_scalar<4, 6>},
  };
  return tb[r - 1][t - 1];
}
TileFn avx2_tile(int r, int t) {
  static const TileFn tb[3][4] = {
      {tile_avx2<1, 1>, tile_avx2<1, 2>, tile_avx2<1, 3>, tile_avx2<1, 4>},
      {tile_avx2<2, 1>, tile_avx2<2, 2>, tile_avx2<2, 3>, tile_avx2<2, 4>},
      {tile_avx2<3, 1>, tile_avx2<3, 2>, tile_avx2<3, 3>, tile_avx2<3, 4>},
  };
  return tb[r - 1][t - 1];
}
TileFn avx512_tile(int r, int t) {
  static const TileFn tb[4][6] = {
      {tile_avx512<1, 1>, tile_avx512<1, 2>, tile_avx512<1, 3>, tile_avx512<1, 4>, tile_avx512<1, 5>, tile_avx512<1, 6>},
      {tile_avx512<2, 1>, tile_avx512<2, 2>, tile_avx512<2, 3>, tile_avx512<2, 4>, tile_avx512<2, 5>, tile_avx512<2, 6>},
      {tile_avx512<3, 1>, tile_avx512<3, 2>, tile_avx512<3, 3>, tile_avx512<3, 4>, tile_avx512<3, 5>, tile_avx512<3, 6>},
      {tile_avx512<4, 1>, tile_avx512<4, 2>, tile_avx512<4, 3>, tile_avx512<4, 4>, tile_avx512<4, 5>, tile_avx512<4, 6>},
  };
  return tb[r - 1][t - 1];
}
}  // namespace

void gemm_f32(const float* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t n_tok, int64_t K,
              float* y, int64_t ldy, Isa isa) {
  int RM, TM;
  TileFn (*get)(int, int);
  switch (isa) {
    case Isa::AVX512: RM = 4; TM = 6; get = avx512_tile; break;
    case Isa::AVX2: RM = 3; TM = 4; get = avx2_tile; break;
    default: RM = 4; TM = 6; get = scalar_tile; break;
  }
  // For long rows K is cut into slices so a tile's weight and activation rows stay in
  // L1; later slices add to the partial sums already in y. Short rows are not sliced:
  // each slice repeats the tile's horizontal reductions.
  const int64_t KC = K <= 1024 ? K : 512;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kn = std::min(KC, K - k0);
    const bool accum = k0 > 0;
    for (int64_t t0 = 0; t0 < n_tok; t0 += TM) {
      const int nt = static_cast<int>(std::min<int64_t>(TM, n_tok - t0));
      for (int64_t r0 = 0; r0 < rows; r0 += RM) {
        const int nr = static_cast<int>(std::min<int64_t>(RM, rows - r0));
        get(nr, nt)(w + r0 * ldw + k0, ldw, x + t0 * ldx + k0, ldx, kn, y + t0 * ldy + r0, ldy, accum);
      }
    }
  }
}

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
