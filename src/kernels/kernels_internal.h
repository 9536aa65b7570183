// Declarations shared by the kernel translation units (not part of the public API).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/kernels.h"

#define LARDER_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LARDER_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
// The AVX2 path's VNNI kernels, compiled for each form of the 256-bit vpdpbusd (kernels.h Vnni256):
// the VEX form (_mm256_dpbusd_avx_epi32) and the EVEX form (_mm256_dpbusd_epi32).
#define LARDER_TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define LARDER_TARGET_AVX2_EVEX_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

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


// Unaligned little-endian loads from the packed byte layouts.
inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline int16_t load_i16(const uint8_t* p) {
  int16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

// "x4" activation layout of the integer kernels (q4_0.cpp describes it): q8_0 values of a
// row in groups of 4 blocks, 256 bytes each, with the scales and a per-block correction
// -corr_mul * sum(q) for weights stored as unsigned q + corr_mul.
constexpr int kX4GroupBytes = 256;
inline int64_t x4_row_bytes(int64_t nb) { return (nb + 3) / 4 * kX4GroupBytes; }
void quantize_x4(const float* x, uint8_t* out, int64_t nb, int corr_mul, Isa isa);

// Panel-packed q4_K / q6_K (packed_k.cpp), dispatched to by packed_bytes / pack_weights /
// matmul_packed (packed.cpp); packed_k_bytes is 0 for other types and shapes.
// The K-quant types whose packed forms packed_k.cpp owns (packed.cpp forwards them there).
inline bool packed_k_type(DType t) { return t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K; }
size_t packed_k_bytes(DType t, int64_t rows, int64_t cols);
bool packed_k_kernels(DType t, Isa isa);  // packed_kernels for the K-quants
void pack_weights_k(DType t, const void* w, size_t wrb, int64_t rows, int64_t cols, uint8_t* out, ThreadPool& pool);
void matmul_packed_k(DType t, const void* packed, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                     int64_t ldy, ThreadPool& pool, MatmulScratch& scratch, Isa isa);
// q6_K's AVX-512 kernels use GFNI where the CPU has it (and LARDER_NO_GFNI is unset); tests force
// the shift-based fallback with false. Returns the previous setting.
bool set_packed_k_gfni(bool use);
bool packed_k_row_to_float(DType t, const void* packed, int64_t rows, int64_t cols, int64_t r, float* out);

// Lane masks (__mmask16) of the rv 16-row panels of a unit starting at row r0: rows past `rows`
// are not stored.
inline void unit_masks(int64_t r0, int64_t rows, int rv, uint16_t* m) {  // rv <= 16
  for (int v = 0; v < rv; ++v) {
    const int64_t left = std::clamp<int64_t>(rows - r0 - 16 * v, 0, 16);
    m[v] = static_cast<uint16_t>((1u << left) - 1);
  }
}

// Runs f(p0, rv, masks) over units of `unit` 16-row panels starting at panel p0 (rv panels, the
// last unit may be short; masks as unit_masks), units split across the pool: the drivers of the
// packed kernels (unit 1 for the scalar layout references).
template <class F>
void for_each_unit(ThreadPool& pool, int64_t rows, int unit, F&& f) {
  const int64_t npanels = (rows + 15) / 16, nunits = (npanels + unit - 1) / unit;
  pool.parallel_for(nunits, [&](int64_t b, int64_t e, int) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t p0 = u * unit;
      const int rv = static_cast<int>(std::min<int64_t>(unit, npanels - p0));
      uint16_t m[16];
      unit_masks(16 * p0, rows, rv, m);
      f(p0, rv, m);
    }
  });
}

// Scratch memory aligned to 64 bytes inside a vector.
template <class T>
uint8_t* aligned_bytes(std::vector<T>& v, size_t bytes) {
  const size_t n = (bytes + 64 + sizeof(T) - 1) / sizeof(T);
  if (v.size() < n) v.resize(n);
  auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~static_cast<uintptr_t>(63));
}

}  // namespace larder::kernels
