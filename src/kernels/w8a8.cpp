#include "kernels/w8a8.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

std::unique_ptr<W8Tensor> w8_from_tensor(const DType type, const void* data, int64_t rows, int64_t cols,
                                         ThreadPool& pool) {
  const TypeTraits* tr = type_traits(type);
  LARDER_ASSERT(tr && tr->to_float);
  auto w = std::make_unique<W8Tensor>();
  w->rows = rows;
  w->cols = cols;
  w->rows_pad = (rows + 15) / 16 * 16;
  w->k4 = (cols + 3) / 4;
  w->packed.assign(static_cast<size_t>(w->rows_pad) * w->k4 * 4, 0);
  w->scale.assign(w->rows_pad, 0.f);
  w->rowsum.assign(w->rows_pad, 0);
  const size_t rb = row_bytes(type, cols);
  const int64_t k4 = w->k4;
  pool.parallel_for(rows, [&](int64_t b, int64_t e, int) {
    std::vector<float> row(cols);
    for (int64_t r = b; r < e; ++r) {
      tr->to_float(static_cast<const uint8_t*>(data) + r * rb, row.data(), cols);
      float amax = 0;
      for (float v : row) amax = std::max(amax, std::fabs(v));
      const float s = amax / 127.f, inv = s > 0 ? 1.f / s : 0.f;
      int32_t sum = 0;
      int8_t* blk = w->packed.data() + (r / 16) * k4 * 64 + (r % 16) * 4;
      for (int64_t c = 0; c < cols; ++c) {
        const int8_t q = static_cast<int8_t>(std::lrintf(row[c] * inv));
        blk[(c / 4) * 64 + c % 4] = q;
        sum += q;
      }
      w->scale[r] = s;
      w->rowsum[r] = sum;
    }
  });
  return w;
}

namespace {

// acc[t][v*16 + i] = sum_k W[row0 + v*16 + i][k] * xu[t][k] over RV blocks of 16 rows.
template <int RV, int T>
LARDER_TARGET_AVX512 void i8_tile_avx512(const int8_t* w, int64_t blk_stride, const uint8_t* x, int64_t ldx, int64_t k4,
                                         int32_t* out) {
  __m512i acc[RV][T];
  for (int v = 0; v < RV; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = _mm512_setzero_si512();
  for (int64_t k = 0; k < k4; ++k) {
    __m512i wv[RV];
    for (int v = 0; v < RV; ++v) wv[v] = _mm512_loadu_si512(w + v * blk_stride + k * 64);
    for (int t = 0; t < T; ++t) {
      int32_t x4;
      std::memcpy(&x4, x + t * ldx + k * 4, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      for (int v = 0; v < RV; ++v) acc[v][t] = _mm512_dpbusd_epi32(acc[v][t], xb, wv[v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v) _mm512_storeu_si512(out + t * 64 + v * 16, acc[v][t]);
}

void i8_tile_scalar(const int8_t* w, int64_t blk_stride, int rv, const uint8_t* x, int64_t ldx, int nt, int64_t k4,
                    int32_t* out) {
  for (int t = 0; t < nt; ++t)
    for (int v = 0; v < rv; ++v)
      for (int i = 0; i < 16; ++i) {
        int32_t s = 0;
        for (int64_t k = 0; k < k4; ++k)
          for (int j = 0; j < 4; ++j)
            s += static_cast<int32_t>(w[v * blk_stride + (k * 16 + i) * 4 + j]) * x[t * ldx + k * 4 + j];
        out[t * 64 + v * 16 + i] = s;
      }
}

LARDER_TARGET_AVX512 void absmax_update_avx512(float* ca, const float* x, int64_t K) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm512_storeu_ps(ca + k, _mm512_max_ps(_mm512_loadu_ps(ca + k), _mm512_abs_ps(_mm512_loadu_ps(x + k))));
  for (; k < K; ++k) ca[k] = std::max(ca[k], std::fabs(x[k]));
}

// xu[k] = round(clamp(x[k] * inv * keep[k])) + 128 where keep is 0 for outlier channels.
LARDER_TARGET_AVX512 void quantize_u8_avx512(uint8_t* xu, const float* x, const float* keep, float inv, int64_t K) {
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i off = _mm512_set1_epi32(128);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv), _mm512_loadu_ps(keep + k));
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);  // round to nearest even, like lrintf
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xu + k), _mm512_cvtepi32_epi8(q));
  }
  for (; k < K; ++k) {
    const float v = std::clamp(x[k] * inv * keep[k], -127.f, 127.f);
    xu[k] = static_cast<uint8_t>(static_cast<int>(std::lrintf(v)) + 128);
  }
}

using I8Tile = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t*);
I8Tile avx512_i8_tile(int rv, int t) {
  static const I8Tile tb[4][6] = {
      {i8_tile_avx512<1, 1>, i8_tile_avx512<1, 2>, i8_tile_avx512<1, 3>, i8_tile_avx512<1, 4>, i8_tile_avx512<1, 5>, i8_tile_avx512<1, 6>},
      {i8_tile_avx512<2, 1>, i8_tile_avx512<2, 2>, i8_tile_avx512<2, 3>, i8_tile_avx512<2, 4>, i8_tile_avx512<2, 5>, i8_tile_avx512<2, 6>},
      {i8_tile_avx512<3, 1>, i8_tile_avx512<3, 2>, i8_tile_avx512<3, 3>, i8_tile_avx512<3, 4>, i8_tile_avx512<3, 5>, i8_tile_avx512<3, 6>},
      {i8_tile_avx512<4, 1>, i8_tile_avx512<4, 2>, i8_tile_avx512<4, 3>, i8_tile_avx512<4, 4>, i8_tile_avx512<4, 5>, i8_tile_avx512<4, 6>},
  };
  return tb[rv - 1][t - 1];
}

}  // namespace

void matmul_w8a8(const W8Tensor& W, const float* x, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool,
                 W8A8Scratch& s, Isa isa, W8A8Stats* stats) {
  const int64_t K = W.cols, rows = W.rows, k4 = W.k4, ldx = k4 * 4;
  // 1. Per-channel absmax over the chunk; outlier channels far above the median.
  std::vector<float>& ca = s.chan_absmax;
  ca.assign(K, 0.f);
  const bool vnni = isa == Isa::AVX512;
  for (int64_t t = 0; t < n_tokens; ++t) {
    if (vnni) {
      absmax_update_avx512(ca.data(), x + t * K, K);
    } else {
      for (int64_t k = 0; k < K; ++k) ca[k] = std::max(ca[k], std::fabs(x[t * K + k]));
    }
  }
  s.wcol.assign(ca.begin(), ca.end());  // sort buffer
  std::nth_element(s.wcol.begin(), s.wcol.begin() + K / 2, s.wcol.end());
  const float median = s.wcol[K / 2];
  s.outliers.clear();
  for (int64_t k = 0; k < K; ++k)
    if (ca[k] > kOutlierRatio * median && ca[k] > 0) s.outliers.push_back(static_cast<int32_t>(k));
  const size_t max_out = std::max<int64_t>(1, K / kMaxOutlierFrac);
  if (s.outliers.size() > max_out) {
    std::partial_sort(s.outliers.begin(), s.outliers.begin() + max_out, s.outliers.end(),
                      [&](int32_t a, int32_t b) { return ca[a] > ca[b]; });
    s.outliers.resize(max_out);
  }
  for (int32_t k : s.outliers) ca[k] = -1.f;  // mark: excluded from the int8 tensor
  float inlier_max = 0;
  for (int64_t k = 0; k < K; ++k) inlier_max = std::max(inlier_max, ca[k]);
  const float sx = inlier_max / 127.f, inv = sx > 0 ? 1.f / sx : 0.f;
  const int64_t n_out = static_cast<int64_t>(s.outliers.size());
  if (stats) {
    stats->calls++;
    stats->outlier_channels += n_out;
    stats->channels += K;
  }
  // 2. One per-tensor scale for the whole chunk; offset to u8 for vpdpbusd.
  if (s.xu.size() < static_cast<size_t>(n_tokens * ldx)) s.xu.resize(n_tokens * ldx);
  s.keep.resize(K);
  for (int64_t k = 0; k < K; ++k) s.keep[k] = ca[k] < 0 ? 0.f : 1.f;
  s.xo.resize(n_tokens * std::max<int64_t>(n_out, 1));
  pool.parallel_for(n_tokens, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
      uint8_t* xu = s.xu.data() + t * ldx;
      const float* xt = x + t * K;
      if (vnni) {
        quantize_u8_avx512(xu, xt, s.keep.data(), inv, K);
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const float v = std::clamp(xt[k] * inv * s.keep[k], -127.f, 127.f);
          xu[k] = static_cast<uint8_t>(static_cast<int>(std::lrintf(v)) + 128);
        }
      }
      for (int64_t k = K; k < ldx; ++k) xu[k] = 128;  // pad: weights there are 0
      for (int64_t o = 0; o < n_out; ++o) s.xo[t * n_out + o] = xt[s.outliers[o]];
    }
  });
  // 3. Shadow outliers in float: y = Wout . xout (a small f32 GEMM with K = n_out).
  if (n_out > 0) {
    s.wcol.resize(rows * n_out);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < n_out; ++o) s.wcol[r * n_out + o] = W.scale[r] * W.at(r, s.outliers[o]);
    gemm_f32(s.wcol.data(), n_out, rows, s.xo.data(), n_out, n_tokens, n_out, y, ldy, isa);
  }
  // 4. Integer GEMM over blocks of 64 rows x 6 tokens, rescaled and added.
  const int64_t blk_stride = k4 * 64;
  const int64_t n_chunks = W.rows_pad / 64 + (W.rows_pad % 64 ? 1 : 0);
  pool.parallel_for(n_chunks, [&](int64_t b, int64_t e, int) {
    alignas(64) int32_t acc[6 * 64];
    for (int64_t c = b; c < e; ++c) {
      const int64_t r0 = c * 64;
      const int rv = static_cast<int>(std::min<int64_t>(4, (W.rows_pad - r0) / 16));
      const int8_t* wp = W.packed.data() + (r0 / 16) * blk_stride;
      const int64_t r1 = std::min(rows, r0 + 16 * rv);
      for (int64_t t0 = 0; t0 < n_tokens; t0 += 6) {
        const int nt = static_cast<int>(std::min<int64_t>(6, n_tokens - t0));
        const uint8_t* xp = s.xu.data() + t0 * ldx;
        if (vnni) avx512_i8_tile(rv, nt)(wp, blk_stride, xp, ldx, k4, acc);
        else i8_tile_scalar(wp, blk_stride, rv, xp, ldx, nt, k4, acc);
        for (int t = 0; t < nt; ++t) {
          float* yt = y + (t0 + t) * ldy;
          for (int64_t r = r0; r < r1; ++r) {
            const float v = W.scale[r] * sx * static_cast<float>(acc[t * 64 + (r - r0)] - 128 * W.rowsum[r]);
            yt[r] = n_out > 0 ? yt[r] + v : v;
          }
        }
      }
    }
  });
}

}  // namespace larder::kernels
