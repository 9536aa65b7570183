// Declarations shared by the kernel translation units (not part of the public API).
#pragma once
#include "kernels/kernels.h"

#define LARDER_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LARDER_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace larder::kernels {

// Reference row converters (convert.cpp).
void row_f32_to_float(const void* src, float* dst, int64_t n);
void row_float_to_f32(const float* src, void* dst, int64_t n);
void row_f16_to_float(const void* src, float* dst, int64_t n);
void row_float_to_f16(const float* src, void* dst, int64_t n);
void row_bf16_to_float(const void* src, float* dst, int64_t n);
void row_float_to_bf16(const float* src, void* dst, int64_t n);
void row_q8_0_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q8_0(const float* src, void* dst, int64_t n);
void row_q4_0_to_float(const void* src, float* dst, int64_t n);
void row_float_to_q4_0(const float* src, void* dst, int64_t n);

// Dot products (dot.cpp): weight row x activation row (in the type's vec_dot_type).
float vec_dot_f32_scalar(const void* w, const void* x, int64_t n);
float vec_dot_f32_avx2(const void* w, const void* x, int64_t n);
float vec_dot_f32_avx512(const void* w, const void* x, int64_t n);
float vec_dot_f16_scalar(const void* w, const void* x, int64_t n);
float vec_dot_f16_avx2(const void* w, const void* x, int64_t n);
float vec_dot_f16_avx512(const void* w, const void* x, int64_t n);
float vec_dot_bf16_scalar(const void* w, const void* x, int64_t n);
float vec_dot_bf16_avx2(const void* w, const void* x, int64_t n);
float vec_dot_bf16_avx512(const void* w, const void* x, int64_t n);
float vec_dot_q8_0_scalar(const void* w, const void* x, int64_t n);
float vec_dot_q8_0_avx2(const void* w, const void* x, int64_t n);
float vec_dot_q8_0_avx512(const void* w, const void* x, int64_t n);
float vec_dot_q4_0_scalar(const void* w, const void* x, int64_t n);
float vec_dot_q4_0_avx2(const void* w, const void* x, int64_t n);
float vec_dot_q4_0_avx512(const void* w, const void* x, int64_t n);

// Same bits as the scalar row_q4_0_to_float (q4_0.cpp).
void q4_0_to_float_avx2(const void* src, float* dst, int64_t n);

// Whole-matmul kernels of q4_0 (q4_0.cpp): q8_0 activations for every batch size.
void matmul_q4_0_scalar(const void* w, size_t wrb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                        float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch);
void matmul_q4_0_avx2(const void* w, size_t wrb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                      float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch);
void matmul_q4_0_avx512(const void* w, size_t wrb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                        float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch);

}  // namespace larder::kernels
