// AVX2 kernels of the panel-packed q8_0 / q4_0 / q4_1 / q5_0 weights, on the byte layout that
// packed.cpp describes and writes (and that its AVX-512 tiles and packed_row_to_float read): a
// 64-byte step vector of a 16-row panel is two 256-bit halves here, rows 0-7 and rows 8-15.
//
// The int8 dot step comes in three forms (kernels.h Vnni256): maddubs + madd (None), the VEX
// vpdpbusd of AVX-VNNI and the EVEX vpdpbusd of AVX-512 VNNI + VL. The tiles are written once
// (the template below the #else) and compiled three times, each inside a `#pragma GCC target`
// region that matches its dot step's LARDER_TARGET_* macro: this file includes itself, as
// Highway's foreach_target does (a template cannot take its target attribute from a template
// argument, and an always_inline callee with a wider target than its caller does not inline).
//
// Results are bit-exact with packed.cpp's panel_scalar: exact int32 block sums, then per lane
// acc = fma(float(sum), d_w * d_x, acc) per block (q4_1: then acc = fma(m_w, d_x * sum(q_x), acc)).
// maddubs adds two u8 x s8 products with int16 saturation: the 4-bit quants (0..15, q5_0 0..31)
// times activations in -127..127 never saturate, and sums of up to 8 (q4_0 / q4_1: 8 * 3810) or
// 4 (q5_0: 4 * 7874) maddubs results stay below 32768, so those add as int16 and widen once.
// q8_0 is stored as q + 128 (0..255) and would saturate: the None form restores the signed value
// (xor 0x80) and multiplies |w| by sign(w) * x (psignb), with no x4 correction: the same
// integer sum the VNNI forms get from the unsigned bytes plus the correction.
//
// Decode (1 token): the 4 panels of a group, one ascending stream per thread with packed.cpp's
// software prefetch distances; 8 float accumulators (4 panels x 2 halves), each panel-half's
// block sum its own dependency chain. Prefill: one half panel (8 rows) x up to kTokTile2 tokens
// per register tile, 4 blocks (one activation group) per iteration; the two halves of a panel
// one after the other (the panel's blocks stay in L1/L2 between them).
//
// Measured (Zen 4 EPYC, one thread's CPU time, 1024 x 1024 in cache, busy shared machine, best of
// 3; in us for 1 token / 64 tokens): q4_0 13.1 / 732 (VNNI form 13.2 / 555; AVX-512 tiles
// 8.2 / 403; the GGUF-row AVX2 kernels 63.9 / 876), q4_1 14.0 / 746 (VNNI 14.3 / 571; AVX-512
// 9.2 / 440; GGUF rows 65.6 / 1725 in f32), q5_0 29.5 / 1070 (VNNI 24.8 / 729; AVX-512 13.6 / 463;
// GGUF rows 69.1 / 1718), q8_0 23.1 / 1137 (VNNI 14.5 / 578; AVX-512 11.8 / 410; GGUF rows
// 44.2 / 1676). So the None form's decode computes ~45-48 GB/s of weights per thread (q5_0 24:
// its high bits cost 6 operations per 32 quants here, one masked add on AVX-512), about what
// DRAM gives each of 2 threads. Decode's panel-half loop is left rolled: unrolled, GCC keeps the
// activations in registers and spills the accumulators (measured slower).
#ifndef LARDER_PACKED_AVX2_DOT
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <type_traits>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace packed_avx2 {

// packed.cpp's layout constants (its header comment and static_asserts; kept in step with them).
enum class Kind { Q8_0, Q4_0, Q4_1, Q5_0 };
constexpr int kGroupPanels = 4;
constexpr int qs_bytes(Kind k) { return k == Kind::Q8_0 ? 512 : 256; }
constexpr int qh_bytes(Kind k) { return k == Kind::Q5_0 ? 64 : 0; }
constexpr int mn_bytes(Kind k) { return k == Kind::Q4_1 ? 64 : 0; }
constexpr size_t pair_bytes(Kind k) { return 2 * qs_bytes(k) + 2 * qh_bytes(k) + 64 + mn_bytes(k); }
static_assert(pair_bytes(Kind::Q4_0) == 2 * 16 * 18 && pair_bytes(Kind::Q4_1) == 2 * 16 * 20 &&
              pair_bytes(Kind::Q5_0) == 2 * 16 * 22 && pair_bytes(Kind::Q8_0) == 2 * 16 * 34);
constexpr int kPrefetchQ4 = 2, kPrefetchQ8 = 2;  // pairs ahead, as packed.cpp's AVX-512 decode
constexpr int kDecodePanels = 4;                 // one group
constexpr int kTokTile2 = 5;                     // prefill tokens per register tile (of one half panel)

// h0: the first half panel (rows 8 h0 ..) of the tile.
using TileFn = void (*)(const uint8_t* gq, const uint8_t* gs, int64_t nb, const uint16_t* m, const uint8_t* x,
                        int64_t xs, float* y, int64_t ldy, int h0);
struct TileSet {
  TileFn decode[4][kDecodePanels];  // [kind][panels - 1]: both halves of each
  TileFn prefill[4][kTokTile2];     // [kind][tokens - 1]: one half of one panel
};

#define LARDER_AVX2_INLINE __attribute__((always_inline)) static inline

// The int8 dot steps: dp(acc, w, x) = acc + per dword sum of 4 products u8 w x s8 x.
struct DotNone {
  static constexpr bool kVnni = false;
  static constexpr int kRegs = 16;  // ymm registers
  LARDER_TARGET_AVX2 LARDER_AVX2_INLINE __m256i mul16(__m256i w, __m256i x) { return _mm256_maddubs_epi16(w, x); }
  LARDER_TARGET_AVX2 LARDER_AVX2_INLINE __m256i widen(__m256i acc, __m256i p16) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  LARDER_TARGET_AVX2 LARDER_AVX2_INLINE __m256i dp(__m256i acc, __m256i w, __m256i x) { return widen(acc, mul16(w, x)); }
};
struct DotVex {
  static constexpr bool kVnni = true;
  static constexpr int kRegs = 16;
  LARDER_TARGET_AVXVNNI LARDER_AVX2_INLINE __m256i dp(__m256i acc, __m256i w, __m256i x) {
    return _mm256_dpbusd_avx_epi32(acc, w, x);
  }
};
struct DotEvex {
  static constexpr bool kVnni = true;
  static constexpr int kRegs = 32;  // ymm16-31 too
  LARDER_TARGET_AVX2_EVEX_VNNI LARDER_AVX2_INLINE __m256i dp(__m256i acc, __m256i w, __m256i x) {
    return _mm256_dpbusd_epi32(acc, w, x);
  }
};

// Each region's target string is its dot step's LARDER_TARGET_* macro (kernels_internal.h). GCC
// takes `#pragma GCC target`, clang (the fuzz build) `#pragma clang attribute`.
#if defined(__clang__)
#define LARDER_AVX2_REGION_END _Pragma("clang attribute pop")
#else
#define LARDER_AVX2_REGION_END _Pragma("GCC pop_options")
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace none {
using Dot = DotNone;
#define LARDER_PACKED_AVX2_DOT 0
#include "kernels/packed_avx2.cpp"  // NOLINT(build/include): the tiles, for this dot step
#undef LARDER_PACKED_AVX2_DOT
}  // namespace none
LARDER_AVX2_REGION_END

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#endif
namespace vex {
using Dot = DotVex;
#define LARDER_PACKED_AVX2_DOT 1
#include "kernels/packed_avx2.cpp"  // NOLINT(build/include): the tiles, for this dot step
#undef LARDER_PACKED_AVX2_DOT
}  // namespace vex
LARDER_AVX2_REGION_END

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
#endif
namespace evex {
using Dot = DotEvex;
#define LARDER_PACKED_AVX2_DOT 2
#include "kernels/packed_avx2.cpp"  // NOLINT(build/include): the tiles, for this dot step
#undef LARDER_PACKED_AVX2_DOT
}  // namespace evex
LARDER_AVX2_REGION_END

Kind kind_of(DType t) {
  switch (t) {
    case DType::Q8_0: return Kind::Q8_0;
    case DType::Q4_1: return Kind::Q4_1;
    case DType::Q5_0: return Kind::Q5_0;
    default: return Kind::Q4_0;
  }
}

}  // namespace packed_avx2

// matmul_packed's AVX2 path (packed.cpp): xq holds the n_tokens activation rows in the x4 layout
// (q4_1: with the block sums added), row stride xs.
void matmul_packed_avx2(DType t, Vnni256 vnni, const uint8_t* pw, int64_t rows, int64_t cols, const uint8_t* xq,
                        int64_t xs, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  using namespace packed_avx2;
  const Kind k = kind_of(t);
  const int ki = static_cast<int>(k);
  const int64_t nb = cols / 32;
  const size_t gb = static_cast<size_t>((nb + 1) / 2) * kGroupPanels * pair_bytes(k);
  const bool ro = k == Kind::Q8_0;  // q8_0's pair records are in read order
  const TileSet& ts = vnni == Vnni256::Vex ? vex::tiles() : vnni == Vnni256::Evex ? evex::tiles() : none::tiles();
  for_each_unit(pool, rows, n_tokens == 1 ? kDecodePanels : 1, [&](int64_t p0, int rv, const uint16_t* m) {
    const uint8_t* g = pw + (p0 / kGroupPanels) * gb;  // units never cross a group
    const int v0 = static_cast<int>(p0 % kGroupPanels);
    const uint8_t* gq = g + v0 * (ro ? qs_bytes(k) : pair_bytes(k));
    const uint8_t* gs = g + v0 * (ro ? 64 : pair_bytes(k));
    if (n_tokens == 1) return ts.decode[ki][rv - 1](gq, gs, nb, m, xq, xs, y + 16 * p0, ldy, 0);
    for (int h = 0; h < 2; ++h) {
      if (!((m[0] >> (8 * h)) & 0xFF)) continue;
      for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokTile2) {
        const int n = static_cast<int>(std::min<int64_t>(kTokTile2, n_tokens - t0));
        ts.prefill[ki][n - 1](gq, gs, nb, m, xq + t0 * xs, xs, y + t0 * ldy + 16 * p0, ldy, h);
      }
    }
  });
}

}  // namespace larder::kernels

#else  // LARDER_PACKED_AVX2_DOT: the tiles, once per dot step (namespace and target set above)

// q5_0: 16 in byte 4i + l of a half step where bit 4i + l of its 32 high bits (at p) is set.
LARDER_AVX2_INLINE __m256i fifth_bits(const uint8_t* p) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3,
                                          3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i bb = _mm256_shuffle_epi8(_mm256_set1_epi32(load_i32(p)), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bb, bit), bit), _mm256_set1_epi8(16));
}

// A block sum's start: the x4 correction, except where the None form multiplies signed q8_0 and
// for q4_1 (unsigned, its minimum apart).
template <class D, Kind K>
LARDER_AVX2_INLINE __m256i start(const uint8_t* xb) {
  if constexpr (K == Kind::Q4_1 || (K == Kind::Q8_0 && !D::kVnni)) return _mm256_setzero_si256();
  return _mm256_set1_epi32(load_i32(xb + 192));
}

// VNNI prefill: the low and high nibbles' dpbusd in two chains per token (latency), where the
// registers allow (T accumulators, 2T chains, quants, activations and the nibble mask).
// The None form's sums are chains of adds, which GCC reassociates into trees of products that it
// computes first and spills; this keeps each add where the source has it.
LARDER_AVX2_INLINE void keep(__m256i& v) { __asm__("" : "+x"(v)); }

template <class D, int T>
constexpr bool kSplit = D::kVnni && T > 1 && 3 * T + 4 <= D::kRegs;

// One block, its pair's H-th (a constant, so that every load has a fixed stride from pair to
// pair), of panels v < RV, halves h0 + hh (hh < NH), tokens t < T into acc[v][hh][t]; rq / rs: the
// pair's record moved to the first panel's quants / scales; the block's activations of token t
// at xt[t] + xo.
template <class D, Kind K, int RV, int NH, int T, int H>
LARDER_AVX2_INLINE void block(__m256 (&acc)[RV][NH][T], const uint8_t* rq, const uint8_t* rs,
                              const uint8_t* const (&xt)[T], int64_t xo, int h0) {
  constexpr bool Q4 = K != Kind::Q8_0;
  constexpr int QS = qs_bytes(K), QH = qh_bytes(K);
  constexpr size_t PAIR = pair_bytes(K);
  constexpr size_t GREC = kGroupPanels * PAIR;  // one pair's record of a group
  constexpr bool RO = !Q4;                      // read order (q8_0) or panel by panel
  constexpr size_t VQ = RO ? QS : PAIR, VS = RO ? 64 : PAIR;  // panel to panel: quants, scales
  const uint8_t* rec = rq;
  const uint8_t* qs = rec + H * (RO ? kGroupPanels * QS : QS);
  const uint8_t* qh = rec + 2 * QS + H * QH;  // q5_0 (panel by panel: rq == rs)
  const uint8_t* sc = rs + (RO ? 2 * kGroupPanels * QS : 2 * QS + 2 * QH) + 32 * H;
  if constexpr (T == 1) {  // decode: the same piece a few pairs on, as the AVX-512 tile
    constexpr int PF = Q4 ? kPrefetchQ4 : kPrefetchQ8;
    if constexpr (RO) {
      const char* ahead = reinterpret_cast<const char*>(rec + PF * GREC + H * kGroupPanels * QS);
      _Pragma("GCC unroll 64")
      for (int l = 0; l < kGroupPanels * QS; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
      if constexpr (H == 0) {
        _Pragma("GCC unroll 64")
        for (int l = 0; l < kGroupPanels * 64; l += 64) _mm_prefetch(ahead + 2 * kGroupPanels * QS + l, _MM_HINT_T0);
      }
    } else {
      const char* ahead = reinterpret_cast<const char*>(rec + PF * GREC + H * (GREC / 2));
      _Pragma("GCC unroll 64")
      for (int l = 0; l < static_cast<int>(GREC / 2); l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
    }
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  // Decode's 8 panel halves stay a loop (see the header).
  for (int v = 0; v < RV; ++v)
    for (int hh = 0; hh < NH; ++hh) {
      const int h = h0 + hh;
      const uint8_t* wq = qs + v * VQ + 32 * h;
      __m256i s[T];
      // None, 4-bit: the int16 sums widen onto the correction (set there: fewer live registers).
      if constexpr (D::kVnni || !Q4) {
        _Pragma("GCC unroll 64")
        for (int t = 0; t < T; ++t) s[t] = start<D, K>(xt[t] + xo);
      }
      if constexpr (Q4) {
        __m256i p[T];  // None: int16 partial sums (see the header for the bounds)
        __m256i s2[T];  // VNNI prefill: the high nibbles' chain (dpbusd latency)
        if constexpr (kSplit<D, T>) {
          _Pragma("GCC unroll 64")
          for (int t = 0; t < T; ++t) s2[t] = _mm256_setzero_si256();
        }
        _Pragma("GCC unroll 64")
        for (int st = 0; st < 4; ++st) {
          const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(wq + 64 * st));
          __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
          if constexpr (K == Kind::Q5_0) {  // | 16 where the 5th bit is set
            lo = _mm256_or_si256(lo, fifth_bits(qh + v * VQ + 8 * st + 4 * h));
            hi = _mm256_or_si256(hi, fifth_bits(qh + v * VQ + 8 * (st + 4) + 4 * h));
          }
          _Pragma("GCC unroll 64")
          for (int t = 0; t < T; ++t) {
            const __m256i xl = _mm256_set1_epi32(load_i32(xt[t] + xo + 4 * st));
            const __m256i xh = _mm256_set1_epi32(load_i32(xt[t] + xo + 64 + 4 * st));
            if constexpr (kSplit<D, T>) {
              s[t] = D::dp(s[t], lo, xl);
              s2[t] = D::dp(s2[t], hi, xh);
            } else if constexpr (D::kVnni) {
              s[t] = D::dp(D::dp(s[t], lo, xl), hi, xh);
            } else {
              constexpr int chunk = K == Kind::Q5_0 ? 2 : 4;  // steps (2 maddubs each) per int16 sum
              const __m256i q = _mm256_add_epi16(D::mul16(lo, xl), D::mul16(hi, xh));
              p[t] = st % chunk == 0 ? q : _mm256_add_epi16(p[t], q);
              keep(p[t]);
              if (st % chunk == chunk - 1) {
                s[t] = D::widen(st < chunk ? start<D, K>(xt[t] + xo) : s[t], p[t]);
                keep(s[t]);
              }
            }
          }
        }
        if constexpr (kSplit<D, T>) {
          _Pragma("GCC unroll 64")
          for (int t = 0; t < T; ++t) s[t] = _mm256_add_epi32(s[t], s2[t]);
        }
      } else {
        _Pragma("GCC unroll 64")
        for (int st = 0; st < 8; ++st) {
          const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(wq + 64 * st));
          const int off = (st < 4 ? 0 : 64) + 4 * (st & 3);
          if constexpr (D::kVnni) {
            _Pragma("GCC unroll 64")
            for (int t = 0; t < T; ++t) s[t] = D::dp(s[t], w, _mm256_set1_epi32(load_i32(xt[t] + xo + off)));
          } else {  // signed q times x: |q| x sign(q) * x (maddubs pairs stay within 2 * 128 * 127)
            const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
            const __m256i wa = _mm256_abs_epi8(ws);
            _Pragma("GCC unroll 64")
            for (int t = 0; t < T; ++t) {
              s[t] = D::dp(s[t], wa, _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xt[t] + xo + off)), ws));
              keep(s[t]);
            }
          }
        }
      }
      const __m256 dv = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(sc + v * VS + 16 * h)));
      _Pragma("GCC unroll 64")
      for (int t = 0; t < T; ++t) {
        const __m256 xd = _mm256_set1_ps(load_f32(xt[t] + xo + 128));
        acc[v][hh][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(dv, xd), acc[v][hh][t]);
      }
      if constexpr (K == Kind::Q4_1) {
        const __m256 mv = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(sc + 64 + v * VS + 16 * h)));
        _Pragma("GCC unroll 64")
        for (int t = 0; t < T; ++t)
          acc[v][hh][t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(load_f32(xt[t] + xo + 196)), acc[v][hh][t]);
      }
    }
}

// y[t*ldy + 16v + i] for panels v < RV, halves h0 .. h0 + NH - 1 (rows 8h..8h+7), tokens t < T,
// rows where bit i of m[v] is set.
template <class D, Kind K, int RV, int NH, int T>
void tile(const uint8_t* gq, const uint8_t* gs, int64_t nb, const uint16_t* m, const uint8_t* x, int64_t xs, float* y,
          int64_t ldy, int h0) {
  __m256 acc[RV][NH][T];
  _Pragma("GCC unroll 64")
  for (int v = 0; v < RV; ++v)
    _Pragma("GCC unroll 64")
    for (int hh = 0; hh < NH; ++hh)
      _Pragma("GCC unroll 64")
      for (int t = 0; t < T; ++t) acc[v][hh][t] = _mm256_setzero_ps();
  const uint8_t* xt[T];
  _Pragma("GCC unroll 64")
  for (int t = 0; t < T; ++t) xt[t] = x + t * xs;
  constexpr size_t GREC = kGroupPanels * pair_bytes(K);  // one pair's record of a group
  int64_t b = 0;
  if constexpr (T == 1) {  // decode: a pair per iteration (4 blocks: slower, measured; code size)
    for (; b + 2 <= nb; b += 2) {
      const uint8_t *rq = gq + (b >> 1) * GREC, *rs = gs + (b >> 1) * GREC;
      const int64_t xo = (b >> 2) * kX4GroupBytes + 16 * (b & 3);
      block<D, K, RV, NH, T, 0>(acc, rq, rs, xt, xo, h0);
      block<D, K, RV, NH, T, 1>(acc, rq, rs, xt, xo + 16, h0);
    }
  }
  for (; b + 4 <= nb; b += 4) {  // one group of the activations, two pair records
    const uint8_t *rq = gq + (b >> 1) * GREC, *rs = gs + (b >> 1) * GREC;
    const int64_t xo = (b >> 2) * kX4GroupBytes;
    block<D, K, RV, NH, T, 0>(acc, rq, rs, xt, xo, h0);
    block<D, K, RV, NH, T, 1>(acc, rq, rs, xt, xo + 16, h0);
    block<D, K, RV, NH, T, 0>(acc, rq + GREC, rs + GREC, xt, xo + 32, h0);
    block<D, K, RV, NH, T, 1>(acc, rq + GREC, rs + GREC, xt, xo + 48, h0);
  }
  for (; b < nb; ++b) {
    const uint8_t *rq = gq + (b >> 1) * GREC, *rs = gs + (b >> 1) * GREC;
    const int64_t xo = (b >> 2) * kX4GroupBytes + 16 * (b & 3);
    if (b & 1)
      block<D, K, RV, NH, T, 1>(acc, rq, rs, xt, xo, h0);
    else
      block<D, K, RV, NH, T, 0>(acc, rq, rs, xt, xo, h0);
  }
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  _Pragma("GCC unroll 64")
  for (int v = 0; v < RV; ++v)
    _Pragma("GCC unroll 64")
    for (int hh = 0; hh < NH; ++hh) {
      const int h = h0 + hh, mh = (m[v] >> (8 * h)) & 0xFF;
      if (!mh) continue;
      const __m256i mk = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(mh), bits), bits);
      _Pragma("GCC unroll 64")
      for (int t = 0; t < T; ++t) {
        float* dst = y + t * ldy + 16 * v + 8 * h;
        if (mh == 0xFF)
          _mm256_storeu_ps(dst, acc[v][hh][t]);
        else
          _mm256_maskstore_ps(dst, mk, acc[v][hh][t]);
      }
    }
}

template <Kind K, size_t... I>
constexpr std::array<TileFn, sizeof...(I)> decode_row(std::index_sequence<I...>) {
  return {tile<Dot, K, static_cast<int>(I) + 1, 2, 1>...};
}
template <Kind K, size_t... I>
constexpr std::array<TileFn, sizeof...(I)> prefill_row(std::index_sequence<I...>) {
  return {tile<Dot, K, 1, 1, static_cast<int>(I) + 1>...};
}

template <Kind K>
void fill(TileSet& ts) {
  const int k = static_cast<int>(K);
  const auto d = decode_row<K>(std::make_index_sequence<kDecodePanels>{});
  std::copy(d.begin(), d.end(), ts.decode[k]);
  const auto p = prefill_row<K>(std::make_index_sequence<kTokTile2>{});
  std::copy(p.begin(), p.end(), ts.prefill[k]);
}

const TileSet& tiles() {
  static const TileSet ts = [] {
    TileSet s{};
    fill<Kind::Q8_0>(s);
    fill<Kind::Q4_0>(s);
    fill<Kind::Q4_1>(s);
    fill<Kind::Q5_0>(s);
    return s;
  }();
  return ts;
}

#endif  // LARDER_PACKED_AVX2_DOT
