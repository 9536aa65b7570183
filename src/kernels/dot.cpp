// Row dot products per weight type, in scalar / AVX2 / AVX-512 variants, and the
// run-time choice between them.
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/result.h"
#include "kernels/kernels_internal.h"

#define TARGET_AVX2 LARDER_TARGET_AVX2
#define TARGET_AVX512 LARDER_TARGET_AVX512

namespace larder::kernels {

// ------------------------------------------------------------------ scalar

static float dot_f32_scalar(const float* a, const float* b, int64_t n) {
  float s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) s[k] += a[i + k] * b[i + k];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

static float dot_f16_scalar(const void* w, const float* x, int64_t n) {
  auto* h = static_cast<const uint16_t*>(w);
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += fp16_to_fp32(h[i]) * x[i];
  return s;
}

static float dot_bf16_scalar(const void* w, const float* x, int64_t n) {
  auto* h = static_cast<const uint16_t*>(w);
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += bf16_to_fp32(h[i]) * x[i];
  return s;
}

static float dot_q8_0_scalar(const void* w, const BlockQ8_0* x, int64_t n) {
  auto* b = static_cast<const BlockQ8_0*>(w);
  float s = 0;
  for (int64_t k = 0; k < n / 32; ++k) {
    int32_t acc = 0;
    for (int j = 0; j < 32; ++j) acc += b[k].qs[j] * x[k].qs[j];
    s += fp16_to_fp32(b[k].d) * fp16_to_fp32(x[k].d) * static_cast<float>(acc);
  }
  return s;
}

static float dot_q4_0_scalar(const void* w, const BlockQ8_0* x, int64_t n) {
  auto* b = static_cast<const BlockQ4_0*>(w);
  float s = 0;
  for (int64_t k = 0; k < n / 32; ++k) {
    int32_t acc = 0;
    for (int j = 0; j < 16; ++j) {
      acc += ((b[k].qs[j] & 0xf) - 8) * x[k].qs[j];
      acc += ((b[k].qs[j] >> 4) - 8) * x[k].qs[j + 16];
    }
    s += fp16_to_fp32(b[k].d) * fp16_to_fp32(x[k].d) * static_cast<float>(acc);
  }
  return s;
}

static void axpy_scalar(float* y, const float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// ------------------------------------------------------------------ AVX2

TARGET_AVX2 static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TARGET_AVX2 static float dot_f32_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Signed int8 x int8 -> 8 x int32 partial sums (maddubs needs an unsigned operand).
TARGET_AVX2 static inline __m256 mul_sum_i8_avx2(__m256i a, __m256i b) {
  __m256i ax = _mm256_sign_epi8(a, a);
  __m256i sy = _mm256_sign_epi8(b, a);
  __m256i dot16 = _mm256_maddubs_epi16(ax, sy);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)));
}

TARGET_AVX2 static inline __m256i unpack_q4_avx2(const uint8_t* qs) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0xf));
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0xf));
  __m256i v = _mm256_set_m128i(hi, lo);
  return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

TARGET_AVX2 static float dot_q8_0_avx2(const void* w, const BlockQ8_0* x, int64_t n) {
  auto* b = static_cast<const BlockQ8_0*>(w);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < n / 32; ++k) {
    __m256i qw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[k].qs));
    __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d) * _cvtsh_ss(x[k].d));
    acc = _mm256_fmadd_ps(d, mul_sum_i8_avx2(qw, qx), acc);
  }
  return hsum256(acc);
}

TARGET_AVX2 static float dot_q4_0_avx2(const void* w, const BlockQ8_0* x, int64_t n) {
  auto* b = static_cast<const BlockQ4_0*>(w);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < n / 32; ++k) {
    __m256i qw = unpack_q4_avx2(b[k].qs);
    __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d) * _cvtsh_ss(x[k].d));
    acc = _mm256_fmadd_ps(d, mul_sum_i8_avx2(qw, qx), acc);
  }
  return hsum256(acc);
}

TARGET_AVX2 static void axpy_avx2(float* y, const float* x, float a, int64_t n) {
  __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// ------------------------------------------------------------------ AVX-512

TARGET_AVX512 static float dot_f32_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// VNNI: dpbusd takes u8 x s8, so feed |w| and x with w's sign.
TARGET_AVX512 static inline __m256 mul_sum_i8_vnni(__m256i a, __m256i b) {
  __m256i ax = _mm256_sign_epi8(a, a);
  __m256i sy = _mm256_sign_epi8(b, a);
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
}

TARGET_AVX512 static float dot_q8_0_avx512(const void* w, const BlockQ8_0* x, int64_t n) {
  auto* b = static_cast<const BlockQ8_0*>(w);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t nb = n / 32, k = 0;
  for (; k + 2 <= nb; k += 2) {
    __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[k].qs));
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[k + 1].qs));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k + 1].qs));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(b[k].d) * _cvtsh_ss(x[k].d)), mul_sum_i8_vnni(w0, x0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(b[k + 1].d) * _cvtsh_ss(x[k + 1].d)), mul_sum_i8_vnni(w1, x1), acc1);
  }
  for (; k < nb; ++k) {
    __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[k].qs));
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(b[k].d) * _cvtsh_ss(x[k].d)), mul_sum_i8_vnni(w0, x0), acc0);
  }
  return hsum256(_mm256_add_ps(acc0, acc1));
}

TARGET_AVX512 static float dot_q4_0_avx512(const void* w, const BlockQ8_0* x, int64_t n) {
  auto* b = static_cast<const BlockQ4_0*>(w);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < n / 32; ++k) {
    __m256i qw = unpack_q4_avx2(b[k].qs);
    __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[k].qs));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(b[k].d) * _cvtsh_ss(x[k].d)), mul_sum_i8_vnni(qw, qx), acc);
  }
  return hsum256(acc);
}

TARGET_AVX512 static void axpy_avx512(float* y, const float* x, float a, int64_t n) {
  __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// ------------------------------------------------------------------ exported per-ISA entry points
// (f32 / f16 / bf16 on the SIMD paths: gemm.cpp, the 1 x 1 tile of the prefill GEMM.)

float vec_dot_f32_scalar(const void* w, const void* x, int64_t n) { return dot_f32_scalar(static_cast<const float*>(w), static_cast<const float*>(x), n); }
float vec_dot_f16_scalar(const void* w, const void* x, int64_t n) { return dot_f16_scalar(w, static_cast<const float*>(x), n); }
float vec_dot_bf16_scalar(const void* w, const void* x, int64_t n) { return dot_bf16_scalar(w, static_cast<const float*>(x), n); }
float vec_dot_q8_0_scalar(const void* w, const void* x, int64_t n) { return dot_q8_0_scalar(w, static_cast<const BlockQ8_0*>(x), n); }
float vec_dot_q4_0_scalar(const void* w, const void* x, int64_t n) { return dot_q4_0_scalar(w, static_cast<const BlockQ8_0*>(x), n); }
float vec_dot_q8_0_avx2(const void* w, const void* x, int64_t n) { return dot_q8_0_avx2(w, static_cast<const BlockQ8_0*>(x), n); }
float vec_dot_q4_0_avx2(const void* w, const void* x, int64_t n) { return dot_q4_0_avx2(w, static_cast<const BlockQ8_0*>(x), n); }
float vec_dot_q8_0_avx512(const void* w, const void* x, int64_t n) { return dot_q8_0_avx512(w, static_cast<const BlockQ8_0*>(x), n); }
float vec_dot_q4_0_avx512(const void* w, const void* x, int64_t n) { return dot_q4_0_avx512(w, static_cast<const BlockQ8_0*>(x), n); }

// ------------------------------------------------------------------ ISA choice

namespace {
Isa cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::AVX2;
  return Isa::Scalar;
}

// Which 256-bit vpdpbusd this CPU has: the VEX one (avx_vnni flag) or the EVEX one of AVX-512 VNNI
// with VL (same operation, so an AVX-512 machine runs and tests the VNNI kernels of the AVX2 path).
Vnni256 cpu_vnni256() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avxvnni")) return Vnni256::Vex;
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return Vnni256::Evex;
  return Vnni256::None;
}

// LARDER_CPU: scalar | avx2 (no VNNI) | avxvnni (AVX2 + 256-bit VNNI) | avx512; never above the CPU.
struct IsaChoice {
  Isa isa;
  Vnni256 vnni;
};
IsaChoice initial_isa() {
  Isa isa = cpu_isa();
  // Unforced, the AVX2 path uses VNNI only where the CPU has the VEX form (AVX-VNNI machines
  // without AVX-512); the EVEX form needs LARDER_CPU=avxvnni.
  Vnni256 vnni = cpu_vnni256() == Vnni256::Vex ? Vnni256::Vex : Vnni256::None;
  if (const char* e = std::getenv("LARDER_CPU")) {
    Isa want = isa;
    if (!std::strcmp(e, "scalar")) want = Isa::Scalar;
    else if (!std::strcmp(e, "avx2")) want = Isa::AVX2, vnni = Vnni256::None;
    else if (!std::strcmp(e, "avxvnni")) want = Isa::AVX2, vnni = cpu_vnni256();
    else if (!std::strcmp(e, "avx512")) want = Isa::AVX512;
    if (want < isa) isa = want;
  }
  return {isa, isa == Isa::AVX2 ? vnni : Vnni256::None};
}

std::atomic<int> g_isa{-1};
std::atomic<int> g_vnni{0};
}  // namespace

Isa detected_isa() { return cpu_isa(); }
Isa active_isa() {
  int i = g_isa.load(std::memory_order_relaxed);
  if (i < 0) {
    const IsaChoice c = initial_isa();
    g_vnni.store(static_cast<int>(c.vnni));
    i = static_cast<int>(c.isa);
    g_isa.store(i);
  }
  return static_cast<Isa>(i);
}
void set_isa(Isa isa) {
  if (isa > cpu_isa()) isa = cpu_isa();
  g_isa.store(static_cast<int>(isa));
  if (isa != Isa::AVX2) g_vnni.store(static_cast<int>(Vnni256::None));
}
Vnni256 active_vnni256() {
  if (active_isa() != Isa::AVX2) return Vnni256::None;
  return static_cast<Vnni256>(g_vnni.load(std::memory_order_relaxed));
}
Vnni256 detected_vnni256() { return cpu_vnni256(); }
void set_vnni256(bool use) {
  g_vnni.store(static_cast<int>(use && active_isa() == Isa::AVX2 ? cpu_vnni256() : Vnni256::None));
}
const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "scalar";
  }
}
const char* active_isa_name() {
  const Isa isa = active_isa();
  if (isa == Isa::AVX2 && active_vnni256() != Vnni256::None)
    return active_vnni256() == Vnni256::Vex ? "avx2+avxvnni" : "avx2+vnni(evex)";
  return isa_name(isa);
}

float dot_f32(const float* a, const float* b, int64_t n) {
  switch (active_isa()) {
    case Isa::AVX512: return dot_f32_avx512(a, b, n);
    case Isa::AVX2: return dot_f32_avx2(a, b, n);
    default: return dot_f32_scalar(a, b, n);
  }
}
void axpy(float* y, const float* x, float a, int64_t n) {
  switch (active_isa()) {
    case Isa::AVX512: return axpy_avx512(y, x, a, n);
    case Isa::AVX2: return axpy_avx2(y, x, a, n);
    default: return axpy_scalar(y, x, a, n);
  }
}

}  // namespace larder::kernels
