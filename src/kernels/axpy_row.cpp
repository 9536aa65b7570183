// y += a * dequantize(row): a weight row scaled into an accumulator without a dequantized copy.
// The sparse FFN's down projection over active neurons (src/offload) is one of these per neuron
// and token; fusing the dequantization halves its passes over memory.
#include <immintrin.h>

#include <vector>

#include "core/result.h"
#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace {

void axpy_row_generic(DType t, const void* row, float a, float* y, int64_t n) {
  thread_local std::vector<float> buf;
  buf.resize(n);
  dequantize_row(t, row, buf.data(), n);
  for (int64_t i = 0; i < n; ++i) y[i] += a * buf[i];
}

void axpy_row_scalar(DType t, const void* row, float a, float* y, int64_t n) {
  switch (t) {
    case DType::F32: {
      auto* x = static_cast<const float*>(row);
      for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
      return;
    }
    case DType::Q8_0: {
      auto* b = static_cast<const BlockQ8_0*>(row);
      for (int64_t k = 0; k < n / 32; ++k, y += 32) {
        const float s = a * fp16_to_fp32(b[k].d);
        for (int j = 0; j < 32; ++j) y[j] += s * static_cast<float>(b[k].qs[j]);
      }
      return;
    }
    case DType::Q4_0: {
      auto* b = static_cast<const BlockQ4_0*>(row);
      for (int64_t k = 0; k < n / 32; ++k, y += 32) {
        const float s = a * fp16_to_fp32(b[k].d);
        for (int j = 0; j < 16; ++j) {
          y[j] += s * static_cast<float>((b[k].qs[j] & 0xf) - 8);
          y[j + 16] += s * static_cast<float>((b[k].qs[j] >> 4) - 8);
        }
      }
      return;
    }
    default:
      axpy_row_generic(t, row, a, y, n);
  }
}

LARDER_TARGET_AVX2 void axpy_row_avx2(DType t, const void* row, float a, float* y, int64_t n) {
  switch (t) {
    case DType::F32: return axpy(y, static_cast<const float*>(row), a, n);
    case DType::F16: {
      auto* h = static_cast<const uint16_t*>(row);
      const __m256 av = _mm256_set1_ps(a);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, x, _mm256_loadu_ps(y + i)));
      }
      for (; i < n; ++i) y[i] += a * fp16_to_fp32(h[i]);
      return;
    }
    case DType::Q8_0: {
      auto* b = static_cast<const BlockQ8_0*>(row);
      for (int64_t k = 0; k < n / 32; ++k, y += 32) {
        const __m256 s = _mm256_set1_ps(a * _cvtsh_ss(b[k].d));
        for (int j = 0; j < 32; j += 8) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b[k].qs + j))));
          _mm256_storeu_ps(y + j, _mm256_fmadd_ps(s, q, _mm256_loadu_ps(y + j)));
        }
      }
      return;
    }
    case DType::Q4_0: {
      auto* b = static_cast<const BlockQ4_0*>(row);
      const __m128i lo = _mm_set1_epi8(0xf), eight = _mm_set1_epi8(8);
      for (int64_t k = 0; k < n / 32; ++k, y += 32) {
        const __m256 s = _mm256_set1_ps(a * _cvtsh_ss(b[k].d));
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[k].qs));
        const __m128i q0 = _mm_sub_epi8(_mm_and_si128(v, lo), eight);                     // elements 0..15
        const __m128i q1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), lo), eight);  // 16..31
        const __m128i qs[4] = {q0, _mm_srli_si128(q0, 8), q1, _mm_srli_si128(q1, 8)};
        for (int j = 0; j < 4; ++j) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qs[j]));
          _mm256_storeu_ps(y + 8 * j, _mm256_fmadd_ps(s, q, _mm256_loadu_ps(y + 8 * j)));
        }
      }
      return;
    }
    default:
      axpy_row_generic(t, row, a, y, n);
  }
}

LARDER_TARGET_AVX512 void axpy_row_avx512(DType t, const void* row, float a, float* y, int64_t n) {
  switch (t) {
    case DType::Q8_0: {
      auto* b = static_cast<const BlockQ8_0*>(row);
      for (int64_t k = 0; k < n / 32; ++k, y += 32) {
        const __m512 s = _mm512_set1_ps(a * _cvtsh_ss(b[k].d));
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[k].qs))));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[k].qs + 16))));
        _mm512_storeu_ps(y, _mm512_fmadd_ps(s, q0, _mm512_loadu_ps(y)));
        _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(s, q1, _mm512_loadu_ps(y + 16)));
      }
      return;
    }
    case DType::Q4_0: {
      auto* b = static_cast<const BlockQ4_0*>(row);
      const __m128i lo = _mm_set1_epi8(0xf), eight = _mm_set1_epi8(8);
      for (int64_t k = 0; k < n / 32; ++k, y += 32) {
        const __m512 s = _mm512_set1_ps(a * _cvtsh_ss(b[k].d));
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[k].qs));
        const __m128i q0 = _mm_sub_epi8(_mm_and_si128(v, lo), eight);
        const __m128i q1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), lo), eight);
        _mm512_storeu_ps(y, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_loadu_ps(y)));
        _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), _mm512_loadu_ps(y + 16)));
      }
      return;
    }
    default:
      axpy_row_avx2(t, row, a, y, n);
  }
}

}  // namespace

void axpy_row(DType t, const void* row, float a, float* y, int64_t n) {
  switch (active_isa()) {
    case Isa::AVX512: return axpy_row_avx512(t, row, a, y, n);
    case Isa::AVX2: return axpy_row_avx2(t, row, a, y, n);
    default: return axpy_row_scalar(t, row, a, y, n);
  }
}

}  // namespace larder::kernels
