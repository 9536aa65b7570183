// q4_K, q5_K and q6_K weights repacked once at load into 16-row panels (the K-quant side of
// packed.cpp, whose header explains panels, groups and why decode reads one stream).
//
// Panel p = rows 16p .. 16p+15 (rows past the end are zero). Its super-blocks (256 columns) are
// stored in records; a group of 4 panels (64 rows) keeps its 4 records of a super-block together,
// arranged in the order decode reads them, so decode reads one ascending stream. In every
// 64-byte "step" vector lane i holds 4 bytes of row i for 4 consecutive columns: one vpdpbusd
// is 16 rows x 4 columns of one token against an activation dword broadcast from memory.
//
// q4_K (2368 bytes per panel and super-block = 37 x 64, +2.8% over the GGUF rows' 2304), at
// offsets q4q / q4sc / q4mn / q4d / q4dmin of the group's record (quants of sub-block pair c for
// panels 0..3, pair by pair, then each panel's scales, minimums, d, dmin; from DRAM at ~77 GB/s
// ~71 GB/s, panel by panel ~68):
//   qs: vector (v, c, s) (c = 0..3 pairs of sub-blocks, s = 0..7) lane i = row i's
//                 qs[32c + 4s .. +3] as stored: low nibbles are columns 64c + 4s.. (sub-block 2c),
//                 high nibbles columns 64c + 32 + 4s.. (sub-block 2c + 1);
//   scales: byte 16j + i = row i's 6-bit scale of sub-block j;
//   minimums: byte 32p + 2i + h = row i's minimum of sub-block 2p + h (vpmovzxbw
//                 makes lane i the int16 pair of sub-blocks 2p, 2p + 1 for one vpdpwssd);
//   d, dmin: f16 per row.
//   Decode prefetches the next super-block's records (hardware prefetch alone read DRAM at ~41
//   of 50 GB/s, with it ~48). q6_K decode prefetched the sub-block 6 on of the 4 panels (from
//   DRAM at ~83 GB/s: ~74, where a whole super-block ahead read ~63, the panel-by-panel records
//   ~58 and the GGUF rows ~64); it now prefetches the next record in shares (prefetch_share).
//   The kernel masks the bytes with 0x0F (low nibble) and 0xF0 (16 x high nibble, so no shift):
//   per pair c two int32 sums, the even sub-block's exact and the odd one's times 16, each
//   multiplied by its sub-block's scale (vpmulld); the odd sums are divided by 16 (exact) once
//   per super-block. The minimum term is a vpdpwssd of the minimums with the activations'
//   per-32 sums.
// q5_K (2880 bytes per panel and super-block = 45 x 64, +2.3% over the GGUF rows' 2816): q4_K's
// group record (the same offsets, kQ5Q = 2048 bytes on) after the 5th bits of the 4 panels,
//   hq: vector (v, s) at q5h(v, s) = 512v + 64s, lane i = row i's qh[4s .. 4s + 3] as stored (bit j
//                 of byte l: the 5th bit of column 32j + 4s + l, sub-block j).
//   One stream as q4_K's: decode reads panel v's hq vectors with its quants of pair 0 and again
//   (from L1) for pairs 1..3; the kernels shift the hq vector right by 2c and move bits 0 / 1 to
//   bit 4 of the low nibble / of the shifted-down high nibble (no 16 x trick: 16 x 31 exceeds a
//   byte), so both sums of a pair are exact.
// q6_K (one record per super-block, 3360 bytes per panel, exactly the GGUF rows' bytes). A
// group's record of the 4 panels (13440 bytes = 210 x 64) is in decode's read order:
//   quants of panel v, sub-block g (16 columns, 4 steps) at q6_q(v, g): 3
//                 vectors, vector s (0..2) byte (i, l) = q(column 16g + 4s + l) << 2 |
//                 bits 2s, 2s+1 of q(column 16g + 12 + l) (q = the unsigned 6-bit quant);
//   scales at q6_s(v, g): byte i = row i's int8 scale of sub-block g;
//   d at q6_d(v): f16 per row.
//   Steps 0..2 are the vectors masked with 0xFC (4q); step 3's 4q is built from the three low
//   bit pairs (GFNI affine moves each into place; shifts where GFNI is missing) and ORed. The
//   -32 offset comes back through the activations' per-16 correction -128 * sum(x) that starts
//   each sub-block's sum, the factor 4 through the float scale.
//
// Activations (every type): one 384-byte record per super-block per token, from the q8_K
// quantizer (same bytes, so results are exact for q8_K-rounded activations, |q| <= 127):
//   [0, 256) int8 quants; [256, 320) int32 per-16 corrections -128 * bsum (q6_K);
//   [320, 324) f32 scale; [324, 340) int16 per-32 sums (q4_K minimums); [340, 372) int16 per-16
//   sums bsum (q6_K on AVX2 without VNNI).
//
// AVX2 (the same bytes): a 64-byte step is two ymm halves, rows 0-7 and rows 8-15; the kernels are
// written once (the end of this file) for an int8 dot policy and compiled three times: vpmaddubsw +
// vpmaddwd, and vpdpbusd in its VEX (AVX-VNNI) and EVEX (AVX-512 VNNI + VL) forms. vpdpbusd takes
// the AVX-512 tiles' weight bytes (q4_K 16 x high nibble, q6_K 4q). vpmaddubsw saturates its int16
// pairs, so there the weights stay below 64 (q4_K's high nibble shifted down, q6_K's plain q): a
// sub-block's pairs (q4_K: 8 steps, |sum| <= 8*2*15*127; q6_K: 2 steps, <= 2*2*63*127) summed in
// int16 and scaled by one vpmaddwd with (sc, sc) pairs; q6_K's -32 offset comes once per
// super-block, -32 * sum_g sc_g * bsum_g (vpmaddwd of the scales of sub-blocks g, g + 1 with the
// record's int16 bsums), and the sum times 4 is the VNNI one. So every variant reaches
// panel_scalar's int32 super-block sums and does its float operations in its order: the same bits.
// Decode reads a group's 4 panels in stored order (pair by pair / sub-block by sub-block, panel by
// panel, one half after the other) and prefetches the next super-block's group record in equal
// shares over the current one (prefetch_share); prefill runs 2 panels x up to 4 tokens per tile.
#ifndef LARDER_PK_AVX2_BODY  // (the AVX2 kernels' body at the end of this file is included 3 times)
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants.h"

namespace larder::kernels {

namespace {

#define LARDER_TARGET_AVX512_GFNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,gfni")))

constexpr int kGroupPanels = 4;  // panels stored interleaved (64 rows)
constexpr int kDecodePanels = 4;
constexpr int kPrefillPanels = 2;
constexpr int kTokTile = 3;
constexpr int kTokTile2 = 4;  // AVX2 prefill tokens per tile

constexpr int kXRec = 384;  // activation bytes per super-block
constexpr int kXCorr = 256, kXD = 320, kXSum32 = 324, kXSum16 = 340;

// q4_K record
constexpr size_t kQ4Rec = 2368;
// A group's record (4 panels, 9472 bytes) in decode's read order: the quants of sub-block pair c
// of panels 0..3, pair by pair, then the scales, minimums, d and dmin of panels 0..3.
constexpr size_t q4q(int v, int c, int s) { return 2048 * c + 512 * v + 64 * s; }
constexpr size_t q4sc(int v) { return 8192 + 128 * v; }
constexpr size_t q4mn(int v) { return 8704 + 128 * v; }
constexpr size_t q4d(int v) { return 9216 + 32 * v; }
constexpr size_t q4dmin(int v) { return 9344 + 32 * v; }
static_assert(q4dmin(3) + 32 == kGroupPanels * kQ4Rec);
// q6_K record (2 super-blocks)
constexpr size_t kQ6Rec = 3360;  // per panel and super-block
constexpr size_t q6_q(int v, int g) { return 768 * g + 192 * v; }
constexpr size_t q6_s(int v, int g) { return 12288 + 64 * g + 16 * v; }
constexpr size_t q6_d(int v) { return 13312 + 32 * v; }
static_assert(q6_d(3) + 32 == kGroupPanels * kQ6Rec && kGroupPanels * kQ6Rec % 64 == 0);

// q5_K record: q4_K's after the 5th bits, [hq: panels 0..3][q4_K's record]
constexpr size_t kQ5Rec = 2880;  // per panel and super-block (GGUF rows: 2816)
constexpr size_t kQ5Q = 2048;    // q4_K's offsets from here
constexpr size_t q5h(int v, int s) { return 512 * v + 64 * s; }
static_assert(kQ5Q + kGroupPanels * kQ4Rec == kGroupPanels * kQ5Rec);

struct KLayout {
  bool q6;
  size_t rec;   // bytes per record per panel
  bool q5 = false;
};
KLayout klayout_of(DType t) {
  if (t == DType::Q6_K) return {true, kQ6Rec};
  if (t == DType::Q5_K) return {false, kQ5Rec, true};
  return {false, kQ4Rec};
}
inline size_t group_bytes(const KLayout& L, int64_t cols) { return (cols / kQK_K) * kGroupPanels * L.rec; }
inline const uint8_t* group_of(const uint8_t* pw, size_t gb, int64_t p) { return pw + (p / kGroupPanels) * gb; }

// ------------------------------------------------------------------ packing

void pack_q4k_row(const BlockQ4_K* row, int64_t nsb, int i, uint8_t* grp, int v, size_t rec_stride) {
  for (int64_t b = 0; b < nsb; ++b) {
    const BlockQ4_K& blk = row[b];
    uint8_t* rec = grp + b * rec_stride;
    for (int c = 0; c < 4; ++c)
      for (int s = 0; s < 8; ++s) std::memcpy(rec + q4q(v, c, s) + 4 * i, blk.qs + 32 * c + 4 * s, 4);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(j, blk.scales, &sc, &mn);
      rec[q4sc(v) + 16 * j + i] = sc;
      rec[q4mn(v) + 32 * (j / 2) + 2 * i + (j & 1)] = mn;
    }
    std::memcpy(rec + q4d(v) + 2 * i, &blk.d, 2);
    std::memcpy(rec + q4dmin(v) + 2 * i, &blk.dmin, 2);
  }
}

// q5_K: q4_K's bytes (qs, scales, minimums, d, dmin) kQ5Q on, and the 5th bits: vector (v, s) lane
// i = row i's qh[4s .. 4s + 3] (bit j of byte l: the 5th bit of column 32j + 4s + l).
void pack_q5k_row(const BlockQ5_K* row, int64_t nsb, int i, uint8_t* grp, int v, size_t rec_stride) {
  for (int64_t b = 0; b < nsb; ++b) {
    const BlockQ5_K& blk = row[b];
    uint8_t* rec = grp + b * rec_stride;
    uint8_t* r4 = rec + kQ5Q;
    for (int c = 0; c < 4; ++c)
      for (int s = 0; s < 8; ++s) std::memcpy(r4 + q4q(v, c, s) + 4 * i, blk.qs + 32 * c + 4 * s, 4);
    for (int s = 0; s < 8; ++s) std::memcpy(rec + q5h(v, s) + 4 * i, blk.qh + 4 * s, 4);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(j, blk.scales, &sc, &mn);
      r4[q4sc(v) + 16 * j + i] = sc;
      r4[q4mn(v) + 32 * (j / 2) + 2 * i + (j & 1)] = mn;
    }
    std::memcpy(r4 + q4d(v) + 2 * i, &blk.d, 2);
    std::memcpy(r4 + q4dmin(v) + 2 * i, &blk.dmin, 2);
  }
}

void pack_q6k_row(const BlockQ6_K* row, int64_t nsb, int i, uint8_t* grp, int v, size_t rec_stride) {
  for (int64_t b = 0; b < nsb; ++b) {
    const BlockQ6_K& blk = row[b];
    uint8_t* rec = grp + b * rec_stride;
    uint8_t q[kQK_K];
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = blk.ql + 64 * half;
      const uint8_t* qh = blk.qh + 32 * half;
      uint8_t* y = q + 128 * half;
      for (int l = 0; l < 32; ++l) {
        y[l] = static_cast<uint8_t>((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4);
        y[l + 32] = static_cast<uint8_t>((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4);
        y[l + 64] = static_cast<uint8_t>((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4);
        y[l + 96] = static_cast<uint8_t>((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4);
      }
    }
    for (int g = 0; g < 16; ++g) {
      for (int s = 0; s < 3; ++s)
        for (int l = 0; l < 4; ++l)
          rec[q6_q(v, g) + 64 * s + 4 * i + l] =
              static_cast<uint8_t>(q[16 * g + 4 * s + l] << 2 | ((q[16 * g + 12 + l] >> (2 * s)) & 3));
      rec[q6_s(v, g) + i] = static_cast<uint8_t>(blk.scales[g]);
    }
    std::memcpy(rec + q6_d(v) + 2 * i, &blk.d, 2);
  }
}

void pack_groups(const KLayout& L, const uint8_t* w, size_t wrb, int64_t rows, int64_t cols, uint8_t* out, int64_t g0,
                 int64_t g1) {
  const int64_t nsb = cols / kQK_K;
  const size_t gb = group_bytes(L, cols);
  std::memset(out + g0 * gb, 0, (g1 - g0) * gb);
  for (int64_t p = g0 * kGroupPanels; p < g1 * kGroupPanels; ++p) {
    uint8_t* grp = const_cast<uint8_t*>(group_of(out, gb, p));
    const int v = static_cast<int>(p % kGroupPanels);
    for (int i = 0; i < 16; ++i) {
      const int64_t r = p * 16 + i;
      if (r >= rows) break;
      if (L.q6)
        pack_q6k_row(reinterpret_cast<const BlockQ6_K*>(w + r * wrb), nsb, i, grp, v, kGroupPanels * L.rec);
      else if (L.q5)
        pack_q5k_row(reinterpret_cast<const BlockQ5_K*>(w + r * wrb), nsb, i, grp, v, kGroupPanels * L.rec);
      else
        pack_q4k_row(reinterpret_cast<const BlockQ4_K*>(w + r * wrb), nsb, i, grp, v, kGroupPanels * L.rec);
    }
  }
}

// ------------------------------------------------------------------ activations

// One token's row (nsb super-blocks) into the activation records.
void quantize_xk(const float* x, uint8_t* out, int64_t nsb) {
  BlockQ8_K blk;
  for (int64_t b = 0; b < nsb; ++b) {
    row_float_to_q8_K(x + b * kQK_K, &blk, kQK_K);
    uint8_t* r = out + b * kXRec;
    std::memcpy(r, blk.qs, kQK_K);
    for (int g = 0; g < 16; ++g) {
      const int32_t c = -128 * blk.bsums[g];
      std::memcpy(r + kXCorr + 4 * g, &c, 4);
    }
    std::memcpy(r + kXD, &blk.d, 4);
    for (int j = 0; j < 8; ++j) {
      const int16_t s = static_cast<int16_t>(blk.bsums[2 * j] + blk.bsums[2 * j + 1]);
      std::memcpy(r + kXSum32 + 2 * j, &s, 2);
    }
    std::memcpy(r + kXSum16, blk.bsums, 32);
    std::memset(r + kXSum16 + 32, 0, kXRec - kXSum16 - 32);
  }
}

// ------------------------------------------------------------------ scalar (reference)

// Rows [16p, 16p + nrows) x tokens [0, nt) of one panel; the AVX-512 tiles' exact arithmetic
// (integer super-block sums, then one or two fma per super-block in the same order).
void panel_scalar(const KLayout& L, const uint8_t* grp, int v, int64_t nsb, int nrows, const uint8_t* x, int64_t xs,
                  int64_t nt, float* y, int64_t ldy) {
  const size_t stride = kGroupPanels * L.rec;
  for (int64_t t = 0; t < nt; ++t)
    for (int i = 0; i < nrows; ++i) {
      float acc = 0;
      for (int64_t b = 0; b < nsb; ++b) {
        const uint8_t* xb = x + t * xs + b * kXRec;
        const auto* xq = reinterpret_cast<const int8_t*>(xb);
        const float dx = load_f32(xb + kXD);
        if (!L.q6) {
          // q5_K: the 5th bits add 16 to the low nibbles and 256 to the high ones (16 x 16).
          const uint8_t* rh = grp + b * stride;
          const uint8_t* rec = rh + (L.q5 ? kQ5Q : 0);
          int32_t sumi_e = 0, sumi_o = 0, summ = 0;
          for (int c = 0; c < 4; ++c) {
            int32_t lo = 0, hi16 = 0;
            for (int s = 0; s < 8; ++s)
              for (int l = 0; l < 4; ++l) {
                const uint8_t byte = rec[q4q(v, c, s) + 4 * i + l];
                const int h = L.q5 ? rh[q5h(v, s) + 4 * i + l] >> (2 * c) : 0;
                lo += ((byte & 0x0F) | (h & 1) << 4) * xq[64 * c + 4 * s + l];
                hi16 += ((byte & 0xF0) | (h & 2) << 7) * xq[64 * c + 32 + 4 * s + l];
              }
            sumi_e += rec[q4sc(v) + 16 * (2 * c) + i] * lo;
            sumi_o += rec[q4sc(v) + 16 * (2 * c + 1) + i] * hi16;
          }
          for (int j = 0; j < 8; ++j) summ += rec[q4mn(v) + 32 * (j / 2) + 2 * i + (j & 1)] * load_i16(xb + kXSum32 + 2 * j);
          const int32_t sumi = sumi_e + (sumi_o >> 4);
          const float d = fp16_to_fp32(load_u16(rec + q4d(v) + 2 * i));
          const float dmin = fp16_to_fp32(load_u16(rec + q4dmin(v) + 2 * i));
          acc = std::fma(static_cast<float>(sumi), d * dx, acc);
          acc = std::fma(-static_cast<float>(summ), dmin * dx, acc);
        } else {
          const uint8_t* rec = grp + b * stride;
          int32_t sumi = 0;
          for (int g = 0; g < 16; ++g) {
            const uint8_t* qs = rec + q6_q(v, g);
            int32_t s4 = load_i32(xb + kXCorr + 4 * g);
            for (int l = 0; l < 4; ++l) {
              int q3 = 0;
              for (int s = 0; s < 3; ++s) {
                const uint8_t byte = qs[64 * s + 4 * i + l];
                s4 += (byte & 0xFC) * xq[16 * g + 4 * s + l];
                q3 |= (byte & 3) << (2 * s);
              }
              s4 += 4 * q3 * xq[16 * g + 12 + l];
            }
            sumi += static_cast<int8_t>(rec[q6_s(v, g) + i]) * s4;
          }
          const float d = fp16_to_fp32(load_u16(rec + q6_d(v) + 2 * i));
          acc = std::fma(static_cast<float>(sumi), d * (dx * 0.25f), acc);
        }
      }
      y[t * ldy + i] = acc;
    }
}

// ------------------------------------------------------------------ AVX-512

// Decode's software prefetch (the AVX2 tiles and q5_K's AVX-512 tile): the next super-block's
// group record (bytes) in n equal shares, share k now, so that it arrives evenly while this record
// is read. (From DRAM on a busy machine, one thread, AVX2: q4_K ~23 GB/s where the q4_K AVX-512
// tile's quarter record per pair of sub-blocks read ~12 and the GGUF rows ~14; q6_K ~20 where a
// sub-block 6 ahead read ~12, the rows ~19.)
inline void prefetch_share(const uint8_t* next, size_t bytes, int k, int n) {
  const size_t share = bytes / n;
  const char* p = reinterpret_cast<const char*>(next) + k * share;
  for (size_t l = 0; l < share + 64; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
}

// y[t*ldy + 16v + i] for panels v0 + v (v < RV) of group grp, tokens t < T, lanes masked by m[v].
// Q5 (q5_K): the 5th bits of pair c (bits 2c, 2c + 1 of the hq bytes) moved to bit 4 of the low and
// of the shifted-down high nibbles; the odd sums then exact too.
template <bool Q5, int RV, int T>
LARDER_TARGET_AVX512 void tile_q4k(const uint8_t* grp, int v0, int64_t nsb, const __mmask16* m, const uint8_t* x,
                                   int64_t xs, float* y, int64_t ldy) {
  constexpr size_t STRIDE = kGroupPanels * (Q5 ? kQ5Rec : kQ4Rec);
  const __m512i m4 = _mm512_set1_epi8(0x0F), m10 = _mm512_set1_epi8(0x10);
  __m512 acc[RV][T];
  for (int v = 0; v < RV; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* rh = grp + b * STRIDE;
    const uint8_t* rec = rh + (Q5 ? kQ5Q : 0);
    const uint8_t* xb = x + b * kXRec;
    __m512i se[RV][T], so[RV][T];
    for (int v = 0; v < RV; ++v)
      for (int t = 0; t < T; ++t) se[v][t] = so[v][t] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      if constexpr (T == 1 && !Q5) {  // the next super-block's records, a quarter per pair of sub-blocks
        const char* ahead = reinterpret_cast<const char*>(rh + STRIDE + c * (STRIDE / 4));
        for (size_t l = 0; l < STRIDE / 4; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
      }
      __m512i sl[RV][T], sh[RV][T];
      for (int v = 0; v < RV; ++v)
        for (int t = 0; t < T; ++t) sl[v][t] = sh[v][t] = _mm512_setzero_si512();
      for (int s = 0; s < 8; ++s) {
        if constexpr (T == 1 && Q5) prefetch_share(rh + STRIDE, STRIDE, 8 * c + s, 32);
        __m512i lo[RV], hi[RV];
        for (int v = 0; v < RV; ++v) {
          const __m512i raw = _mm512_load_si512(rec + q4q(v0 + v, c, s));
          if constexpr (Q5) {  // (A & C) | B = 0xEC
            const __m512i sh = _mm512_srl_epi16(_mm512_load_si512(rh + q5h(v0 + v, s)), _mm_cvtsi32_si128(2 * c));
            lo[v] = _mm512_ternarylogic_epi32(raw, _mm512_and_si512(_mm512_slli_epi16(sh, 4), m10), m4, 0xEC);
            hi[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), _mm512_and_si512(_mm512_slli_epi16(sh, 3), m10), m4,
                                              0xEC);
          } else {
            lo[v] = _mm512_and_si512(raw, m4);
            hi[v] = _mm512_andnot_si512(m4, raw);
          }
        }
        for (int t = 0; t < T; ++t) {
          const __m512i xl = _mm512_set1_epi32(load_i32(xb + t * xs + 64 * c + 4 * s));
          const __m512i xh = _mm512_set1_epi32(load_i32(xb + t * xs + 64 * c + 32 + 4 * s));
          for (int v = 0; v < RV; ++v) {
            sl[v][t] = _mm512_dpbusd_epi32(sl[v][t], lo[v], xl);
            sh[v][t] = _mm512_dpbusd_epi32(sh[v][t], hi[v], xh);
          }
        }
      }
      for (int v = 0; v < RV; ++v) {
        const __m512i sce = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + q4sc(v0 + v) + 32 * c)));
        const __m512i sco =
            _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + q4sc(v0 + v) + 32 * c + 16)));
        for (int t = 0; t < T; ++t) {
          se[v][t] = _mm512_add_epi32(se[v][t], _mm512_mullo_epi32(sl[v][t], sce));
          so[v][t] = _mm512_add_epi32(so[v][t], _mm512_mullo_epi32(sh[v][t], sco));
        }
      }
    }
    for (int v = 0; v < RV; ++v) {
      __m512i mn[4];
      for (int p = 0; p < 4; ++p)
        mn[p] = _mm512_cvtepu8_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(rec + q4mn(v0 + v) + 32 * p)));
      const __m512 dv = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(rec + q4d(v0 + v))));
      const __m512 dm = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(rec + q4dmin(v0 + v))));
      for (int t = 0; t < T; ++t) {
        const uint8_t* xt = xb + t * xs;
        __m512i summ = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p) summ = _mm512_dpwssd_epi32(summ, mn[p], _mm512_set1_epi32(load_i32(xt + kXSum32 + 4 * p)));
        const __m512i sumi = _mm512_add_epi32(se[v][t], Q5 ? so[v][t] : _mm512_srai_epi32(so[v][t], 4));
        const __m512 xd = _mm512_set1_ps(load_f32(xt + kXD));
        acc[v][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(dv, xd), acc[v][t]);
        acc[v][t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dm, xd), acc[v][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v) _mm512_mask_storeu_ps(y + t * ldy + 16 * v, m[v], acc[v][t]);
}

// 4q of step 3 of a q6_K sub-block from the low bit pairs of the three stored vectors.
template <bool GFNI>
LARDER_TARGET_AVX512_GFNI inline __m512i q6_step3(__m512i v0, __m512i v1, __m512i v2) {
  if constexpr (GFNI) {
    // Output bit k of a byte = parity(matrix byte 7-k & input): bits 0,1 -> 2,3 / 4,5 / 6,7.
    const __m512i a0 = _mm512_set1_epi64(0x0000010200000000LL);
    const __m512i a1 = _mm512_set1_epi64(0x0000000001020000LL);
    const __m512i a2 = _mm512_set1_epi64(0x0000000000000102LL);
    return _mm512_ternarylogic_epi32(_mm512_gf2p8affine_epi64_epi8(v0, a0, 0), _mm512_gf2p8affine_epi64_epi8(v1, a1, 0),
                                     _mm512_gf2p8affine_epi64_epi8(v2, a2, 0), 0xFE);
  } else {
    const __m512i t0 = _mm512_slli_epi16(v0, 2), t1 = _mm512_slli_epi16(v1, 4), t2 = _mm512_slli_epi16(v2, 6);
    // bits 2-3 from t0, 4-5 from t1, 6-7 from t2, then clear 0-1.
    const __m512i u = _mm512_ternarylogic_epi32(_mm512_set1_epi8(0x0C), t0, t1, 0xCA);  // a ? b : c
    const __m512i w = _mm512_ternarylogic_epi32(_mm512_set1_epi8(0x3C), u, t2, 0xCA);
    return _mm512_and_si512(w, _mm512_set1_epi8(static_cast<char>(0xFC)));
  }
}

template <bool GFNI, int RV, int T>
LARDER_TARGET_AVX512_GFNI void tile_q6k(const uint8_t* grp, int v0, int64_t nsb, const __mmask16* m, const uint8_t* x,
                                        int64_t xs, float* y, int64_t ldy) {
  constexpr size_t STRIDE = kGroupPanels * kQ6Rec;  // one group record
  const __m512i mfc = _mm512_set1_epi8(static_cast<char>(0xFC));
  __m512 acc[RV][T];
  for (int v = 0; v < RV; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* rec = grp + b * STRIDE;
    const uint8_t* xb = x + b * kXRec;
    __m512i sumi[RV][T];
    for (int v = 0; v < RV; ++v)
      for (int t = 0; t < T; ++t) sumi[v][t] = _mm512_setzero_si512();
    for (int g = 0; g < 16; ++g) {
      __m512i q[RV][4];
      for (int v = 0; v < RV; ++v) {
        // The next record in shares (prefetch_share). Sub-block 6 ahead of the 4 panels, quants and
        // scales (74 GB/s from DRAM at ~83 on a quiet machine, where 4 ahead read 62, 8: 71, 16: 63),
        // read ~11 GB/s on one thread of the busy machine where this reads ~22 and the GGUF rows ~21.
        if constexpr (T == 1) prefetch_share(rec + STRIDE, STRIDE, g * RV + v, 16 * RV);
        const uint8_t* qs = rec + q6_q(v0 + v, g);
        const __m512i v0 = _mm512_load_si512(qs), v1 = _mm512_load_si512(qs + 64), v2 = _mm512_load_si512(qs + 128);
        q[v][0] = _mm512_and_si512(v0, mfc);
        q[v][1] = _mm512_and_si512(v1, mfc);
        q[v][2] = _mm512_and_si512(v2, mfc);
        q[v][3] = q6_step3<GFNI>(v0, v1, v2);
      }
      __m512i sc[RV];
      for (int v = 0; v < RV; ++v)
        sc[v] = _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + q6_s(v0 + v, g))));
      for (int t = 0; t < T; ++t) {
        const uint8_t* xt = xb + t * xs + 16 * g;
        const __m512i c = _mm512_set1_epi32(load_i32(xb + t * xs + kXCorr + 4 * g));
        for (int v = 0; v < RV; ++v) {
          __m512i s = c;
          for (int k = 0; k < 4; ++k) s = _mm512_dpbusd_epi32(s, q[v][k], _mm512_set1_epi32(load_i32(xt + 4 * k)));
          sumi[v][t] = _mm512_add_epi32(sumi[v][t], _mm512_mullo_epi32(s, sc[v]));
        }
      }
    }
    for (int v = 0; v < RV; ++v) {
      const __m512 dv = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(rec + q6_d(v0 + v))));
      for (int t = 0; t < T; ++t) {
        const __m512 xd = _mm512_set1_ps(load_f32(xb + t * xs + kXD) * 0.25f);
        acc[v][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[v][t]), _mm512_mul_ps(dv, xd), acc[v][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v) _mm512_mask_storeu_ps(y + t * ldy + 16 * v, m[v], acc[v][t]);
}

using TileFn = void (*)(const uint8_t*, int, int64_t, const __mmask16*, const uint8_t*, int64_t, float*, int64_t);

template <bool Q5, int RV>
TileFn q4k_tile_t(int nt) {
  static const TileFn tb[kTokTile] = {tile_q4k<Q5, RV, 1>, tile_q4k<Q5, RV, 2>, tile_q4k<Q5, RV, 3>};
  return tb[nt - 1];
}
template <bool G, int RV>
TileFn q6k_tile_t(int nt) {
  static const TileFn tb[kTokTile] = {tile_q6k<G, RV, 1>, tile_q6k<G, RV, 2>, tile_q6k<G, RV, 3>};
  return tb[nt - 1];
}
TileFn pick_tile(const KLayout& L, bool gfni, int rv, int nt) {
  if (L.q5) {
    switch (rv) {
      case 1: return q4k_tile_t<true, 1>(nt);
      case 2: return q4k_tile_t<true, 2>(nt);
      case 3: return tile_q4k<true, 3, 1>;
      default: return tile_q4k<true, 4, 1>;
    }
  }
  if (!L.q6) {
    switch (rv) {
      case 1: return q4k_tile_t<false, 1>(nt);
      case 2: return q4k_tile_t<false, 2>(nt);
      case 3: return tile_q4k<false, 3, 1>;
      default: return tile_q4k<false, 4, 1>;
    }
  }
  if (gfni) {
    switch (rv) {
      case 1: return q6k_tile_t<true, 1>(nt);
      case 2: return q6k_tile_t<true, 2>(nt);
      case 3: return tile_q6k<true, 3, 1>;
      default: return tile_q6k<true, 4, 1>;
    }
  }
  switch (rv) {
    case 1: return q6k_tile_t<false, 1>(nt);
    case 2: return q6k_tile_t<false, 2>(nt);
    case 3: return tile_q6k<false, 3, 1>;
    default: return tile_q6k<false, 4, 1>;
  }
}

std::atomic<bool> g_gfni{__builtin_cpu_supports("gfni") && std::getenv("LARDER_NO_GFNI") == nullptr};

// ------------------------------------------------------------------ AVX2

// The int8 dot step of the AVX2 kernels (kernels.h Vnni256), a policy of the kernel body below:
//   dot(acc, w, x): acc + w (u8) . x (s8) per dword lane; first(w, x) = dot(0, w, x);
//   scaled(acc, sc): the int32 lanes of acc times the lanes' sub-block scales, sc from scale_u8 /
//   scale_i8 (the 8 scale bytes of a half's rows);
//   kWide: whether weight bytes up to 255 are exact (vpdpbusd: yes; vpmaddubsw saturates int16
//   pairs at 32767, so weights there stay below 64 and acc holds int16 pairs, summed and scaled by
//   one vpmaddwd with (sc, sc) pairs).
#define LARDER_PK_ALWAYS_INLINE __attribute__((always_inline)) static inline
struct DotMaddubs {
  static constexpr bool kWide = false;
  LARDER_TARGET_AVX2 LARDER_PK_ALWAYS_INLINE __m256i first(__m256i w, __m256i x) { return _mm256_maddubs_epi16(w, x); }
  // (The barrier keeps the chain a chain: reassociated into a tree, the products of a whole
  // sub-block were live at once and spilled.)
  LARDER_TARGET_AVX2 LARDER_PK_ALWAYS_INLINE __m256i dot(__m256i acc, __m256i w, __m256i x) {
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x));
    asm("" : "+x"(acc));
    return acc;
  }
  LARDER_TARGET_AVX2 LARDER_PK_ALWAYS_INLINE __m256i scaled(__m256i acc, __m256i sc) { return _mm256_madd_epi16(acc, sc); }
  LARDER_TARGET_AVX2 LARDER_PK_ALWAYS_INLINE __m256i scale_u8(__m128i b) {
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(b, b));
  }
  LARDER_TARGET_AVX2 LARDER_PK_ALWAYS_INLINE __m256i scale_i8(__m128i b) {
    return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b, b));
  }
};
#define LARDER_PK_DOT_VNNI(NAME, TARGET, DPBUSD)                                                                   \
  struct NAME {                                                                                                    \
    static constexpr bool kWide = true;                                                                            \
    TARGET LARDER_PK_ALWAYS_INLINE __m256i dot(__m256i acc, __m256i w, __m256i x) { return DPBUSD(acc, w, x); }    \
    TARGET LARDER_PK_ALWAYS_INLINE __m256i first(__m256i w, __m256i x) { return DPBUSD(_mm256_setzero_si256(), w, x); } \
    TARGET LARDER_PK_ALWAYS_INLINE __m256i scaled(__m256i acc, __m256i sc) { return _mm256_mullo_epi32(acc, sc); } \
    TARGET LARDER_PK_ALWAYS_INLINE __m256i scale_u8(__m128i b) { return _mm256_cvtepu8_epi32(b); }                 \
    TARGET LARDER_PK_ALWAYS_INLINE __m256i scale_i8(__m128i b) { return _mm256_cvtepi8_epi32(b); }                 \
  };
LARDER_PK_DOT_VNNI(DotVex, LARDER_TARGET_AVXVNNI, _mm256_dpbusd_avx_epi32)
LARDER_PK_DOT_VNNI(DotEvex, LARDER_TARGET_AVX2_EVEX_VNNI, _mm256_dpbusd_epi32)

// The AVX2 kernels are written once (the end of this file) and compiled for each policy with its
// target: a template cannot take its target attribute from a template argument, and the
// intrinsics only inline into functions compiled for their instructions.
#define LARDER_PK_AVX2_BODY 1
#define LARDER_PK_NS avx2_maddubs
#define LARDER_PK_DOT DotMaddubs
#define LARDER_PK_TARGET LARDER_TARGET_AVX2
#include "packed_k.cpp"
#undef LARDER_PK_NS
#undef LARDER_PK_DOT
#undef LARDER_PK_TARGET
#define LARDER_PK_NS avx2_vex
#define LARDER_PK_DOT DotVex
#define LARDER_PK_TARGET LARDER_TARGET_AVXVNNI
#include "packed_k.cpp"
#undef LARDER_PK_NS
#undef LARDER_PK_DOT
#undef LARDER_PK_TARGET
#define LARDER_PK_NS avx2_evex
#define LARDER_PK_DOT DotEvex
#define LARDER_PK_TARGET LARDER_TARGET_AVX2_EVEX_VNNI
#include "packed_k.cpp"
#undef LARDER_PK_NS
#undef LARDER_PK_DOT
#undef LARDER_PK_TARGET
#undef LARDER_PK_AVX2_BODY

TileFn pick_tile_avx2(Vnni256 vn, const KLayout& L, int rv, int nt) {
  const int kind = L.q6 ? 1 : L.q5 ? 2 : 0;
  switch (vn) {
    case Vnni256::Vex: return avx2_vex::pick(kind, rv, nt);
    case Vnni256::Evex: return avx2_evex::pick(kind, rv, nt);
    default: return avx2_maddubs::pick(kind, rv, nt);
  }
}


}  // namespace

bool set_packed_k_gfni(bool use) { return g_gfni.exchange(use && __builtin_cpu_supports("gfni")); }

size_t packed_k_bytes(DType t, int64_t rows, int64_t cols) {
  if (!packed_k_type(t) || cols <= 0 || cols % kQK_K || rows <= 0) return 0;
  return static_cast<size_t>((rows + 16 * kGroupPanels - 1) / (16 * kGroupPanels)) * group_bytes(klayout_of(t), cols);
}

bool packed_k_kernels(DType t, Isa isa) { return packed_k_type(t) && isa >= Isa::AVX2; }

void pack_weights_k(DType t, const void* w, size_t wrb, int64_t rows, int64_t cols, uint8_t* out, ThreadPool& pool) {
  LARDER_ASSERT(packed_k_bytes(t, rows, cols) > 0);
  LARDER_ASSERT(reinterpret_cast<uintptr_t>(out) % 64 == 0);
  const KLayout L = klayout_of(t);
  pool.parallel_for((rows + 16 * kGroupPanels - 1) / (16 * kGroupPanels), [&](int64_t b, int64_t e, int) {
    pack_groups(L, static_cast<const uint8_t*>(w), wrb, rows, cols, out, b, e);
  });
}

bool packed_k_row_to_float(DType t, const void* packed, int64_t rows, int64_t cols, int64_t r, float* out) {
  if (r < 0 || r >= rows || !packed_k_bytes(t, rows, cols)) return false;
  const KLayout L = klayout_of(t);
  const uint8_t* grp = group_of(static_cast<const uint8_t*>(packed), group_bytes(L, cols), r / 16);
  const int v = static_cast<int>((r / 16) % kGroupPanels), i = static_cast<int>(r % 16);
  const size_t stride = kGroupPanels * L.rec;
  // The float operations of the GGUF dequantizers (q4_K: d * sc * q - dmin * mn; q6_K:
  // d * sc * (q - 32)), so the values are the same bits.
  for (int64_t b = 0; b < cols / kQK_K; ++b) {
    float* y = out + b * kQK_K;
    if (!L.q6) {  // q4_K, q5_K (d * sc * (q + 16 h) - dmin * mn)
      const uint8_t* rh = grp + b * stride;
      const uint8_t* rec = rh + (L.q5 ? kQ5Q : 0);
      const float d = fp16_to_fp32(load_u16(rec + q4d(v) + 2 * i)), mn = fp16_to_fp32(load_u16(rec + q4dmin(v) + 2 * i));
      for (int j = 0; j < 8; ++j) {
        const float d1 = d * rec[q4sc(v) + 16 * j + i], m1 = mn * rec[q4mn(v) + 32 * (j / 2) + 2 * i + (j & 1)];
        for (int s = 0; s < 8; ++s)
          for (int l = 0; l < 4; ++l) {
            const uint8_t byte = rec[q4q(v, j / 2, s) + 4 * i + l];
            const int h = L.q5 ? (rh[q5h(v, s) + 4 * i + l] >> j & 1) << 4 : 0;
            y[32 * j + 4 * s + l] = d1 * static_cast<float>(((j & 1) ? byte >> 4 : byte & 0xF) + h) - m1;
          }
      }
    } else {
      const uint8_t* rec = grp + b * stride;
      const float d = fp16_to_fp32(load_u16(rec + q6_d(v) + 2 * i));
      for (int g = 0; g < 16; ++g) {
        const uint8_t* qs = rec + q6_q(v, g);
        const float dsc = d * static_cast<int8_t>(rec[q6_s(v, g) + i]);
        for (int l = 0; l < 4; ++l) {
          int q3 = 0;
          for (int s = 0; s < 3; ++s) {
            const uint8_t byte = qs[64 * s + 4 * i + l];
            y[16 * g + 4 * s + l] = dsc * static_cast<float>((byte >> 2) - 32);
            q3 |= (byte & 3) << (2 * s);
          }
          y[16 * g + 12 + l] = dsc * static_cast<float>(q3 - 32);
        }
      }
    }
  }
  return true;
}

void matmul_packed_k(DType t, const void* packed, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                     int64_t ldy, ThreadPool& pool, MatmulScratch& scratch, Isa isa) {
  LARDER_ASSERT(packed_k_bytes(t, rows, cols) > 0);
  const KLayout L = klayout_of(t);
  const auto* pw = static_cast<const uint8_t*>(packed);
  const int64_t nsb = cols / kQK_K, xs = nsb * kXRec;
  const size_t gb = group_bytes(L, cols);
  uint8_t* xq = aligned_bytes(scratch.xq, static_cast<size_t>(n_tokens * xs));
  pool.parallel_for(n_tokens, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) quantize_xk(x + i * cols, xq + i * xs, nsb);
  });
  if (isa == Isa::AVX2) {
    const Vnni256 vn = active_vnni256();
    for_each_unit(pool, rows, n_tokens == 1 ? kDecodePanels : kPrefillPanels, [&](int64_t p0, int rv, const uint16_t* m) {
      const uint8_t* grp = group_of(pw, gb, p0);
      const int v0 = static_cast<int>(p0 % kGroupPanels);
      for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokTile2) {
        const int n = static_cast<int>(std::min<int64_t>(kTokTile2, n_tokens - t0));
        pick_tile_avx2(vn, L, rv, n)(grp, v0, nsb, m, xq + t0 * xs, xs, y + t0 * ldy + 16 * p0, ldy);
      }
    });
    return;
  }
  if (isa != Isa::AVX512) {  // the layout's reference
    for_each_unit(pool, rows, 1, [&](int64_t p, int, const uint16_t*) {
      panel_scalar(L, group_of(pw, gb, p), static_cast<int>(p % kGroupPanels), nsb,
                   static_cast<int>(std::min<int64_t>(16, rows - 16 * p)), xq, xs, n_tokens, y + 16 * p, ldy);
    });
    return;
  }
  const bool gfni = g_gfni.load(std::memory_order_relaxed);
  for_each_unit(pool, rows, n_tokens == 1 ? kDecodePanels : kPrefillPanels, [&](int64_t p0, int rv, const uint16_t* m) {
    const uint8_t* grp = group_of(pw, gb, p0);  // units never cross a group
    const int v0 = static_cast<int>(p0 % kGroupPanels);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokTile) {
      const int n = static_cast<int>(std::min<int64_t>(kTokTile, n_tokens - t0));
      pick_tile(L, gfni, rv, n)(grp, v0, nsb, m, xq + t0 * xs, xs, y + t0 * ldy + 16 * p0, ldy);
    }
  });
}

}  // namespace larder::kernels

#else  // LARDER_PK_AVX2_BODY: the AVX2 kernels, compiled once per int8 dot policy (see "AVX2" above)

// A 64-byte step vector is two ymm halves: rows 0-7 and rows 8-15 of the panel. The arithmetic is
// panel_scalar's: exact int32 super-block sums (where the dot policy is narrow, the same integers
// reached another way), then the same fmas per lane.
namespace LARDER_PK_NS {

using P = LARDER_PK_DOT;

// The lanes of half h of a panel whose bits in the unit mask are set (prefix masks).
LARDER_PK_TARGET inline void store_half(float* y, unsigned mask8, __m256 v) {
  if (mask8 == 0xFF) return _mm256_storeu_ps(y, v);
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int i = 0; i < 8; ++i)
    if (mask8 >> i & 1) y[i] = tmp[i];
}

// The activations again for each panel half: without this the compiler keeps the broadcasts of a
// pair of sub-blocks (16 ymm) live across the panels and spills (ymm0-15 only).
inline const uint8_t* opaque(const uint8_t* p) {
  asm volatile("" : "+r"(p));
  return p;
}

template <class V>
LARDER_PK_TARGET inline __m256i load256(const V* p) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
}

// q4_K. Per pair of sub-blocks c, panel, half: the even sub-block's sum (low nibbles) and the odd
// one's into one int32 sum per lane: wide, the odd one's bytes masked with 0xF0 (16 q) and the even
// scale times 16, so the super-block sum is 16 sumi, divided back once (exact, as in panel_scalar);
// narrow, the odd nibbles shifted down and the sums exact.
// Q5 (q5_K): the 5th bits (bits 2c, 2c + 1 of the hq bytes) moved to bit 4 of the low and of the
// shifted-down high nibbles, in every variant (16 x 31 does not fit a byte); narrow, the sub-block's
// int16 pairs in two halves of 4 steps (|sum| <= 4*2*31*127).
template <bool Q5, int RV, int T>
LARDER_PK_TARGET void tile_q4k(const uint8_t* grp, int v0, int64_t nsb, const uint16_t* m, const uint8_t* x,
                               int64_t xs, float* y, int64_t ldy) {
  constexpr size_t STRIDE = kGroupPanels * (Q5 ? kQ5Rec : kQ4Rec);
  constexpr bool kSplit = Q5 && !P::kWide;  // two int16 partials per sub-block
  constexpr bool k16 = P::kWide && !Q5;     // odd sums 16x (bytes masked with 0xF0)
  // Offsets of panel v0 (runtime) apart, so that every offset below is a constant.
  const size_t oq = q4q(v0, 0, 0) + (Q5 ? kQ5Q : 0), osc = q4sc(v0) - q4sc(0) + (Q5 ? kQ5Q : 0),
               omn = q4mn(v0) - q4mn(0) + (Q5 ? kQ5Q : 0), od = q4d(v0) - q4d(0) + (Q5 ? kQ5Q : 0),
               oh = q5h(v0, 0);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10);
  __m256 acc[RV][2][T];
#pragma GCC unroll 4
  for (int v = 0; v < RV; ++v)
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < T; ++t) acc[v][h][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* rec = grp + b * STRIDE;
    const uint8_t* xb = x + b * kXRec;
    __m256i si[RV][2][T];
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v)
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < T; ++t) si[v][h][t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          if constexpr (T == 1) prefetch_share(rec + STRIDE, STRIDE, (c * RV + v) * 2 + h, 4 * RV * 2);
          const uint8_t* xt[T];
          for (int t = 0; t < T; ++t) xt[t] = opaque(xb + t * xs + 64 * c);
          const uint8_t* sc = rec + osc + q4sc(v) + 32 * c + 8 * h;
          __m256i sce = P::scale_u8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc)));
          const __m256i sco = P::scale_u8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 16)));
          if constexpr (k16) sce = _mm256_slli_epi32(sce, 4);
          const __m128i cnt = _mm_cvtsi32_si128(2 * c);
          __m256i pl[T], ph[T];
#pragma GCC unroll 8
          for (int s = 0; s < 8; ++s) {
            const __m256i raw = load256(rec + oq + q4q(v, c, s) + 32 * h);
            __m256i lo = _mm256_and_si256(raw, m4);
            __m256i hi = k16 ? _mm256_andnot_si256(m4, raw) : _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if constexpr (Q5) {
              const __m256i sh = _mm256_srl_epi16(load256(rec + oh + q5h(v, s) + 32 * h), cnt);
              lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(sh, 4), m10));
              hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(sh, 3), m10));
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) {
              const __m256i xl = _mm256_set1_epi32(load_i32(xt[t] + 4 * s));
              const __m256i xh = _mm256_set1_epi32(load_i32(xt[t] + 32 + 4 * s));
              const bool start = s == 0 || (kSplit && s == 4);
              pl[t] = start ? P::first(lo, xl) : P::dot(pl[t], lo, xl);
              ph[t] = start ? P::first(hi, xh) : P::dot(ph[t], hi, xh);
            }
            if constexpr (kSplit) {
              if (s == 3) {
#pragma GCC unroll 8
                for (int t = 0; t < T; ++t)
                  si[v][h][t] = _mm256_add_epi32(si[v][h][t], _mm256_add_epi32(P::scaled(pl[t], sce), P::scaled(ph[t], sco)));
              }
            }
          }
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t)
            si[v][h][t] = _mm256_add_epi32(si[v][h][t], _mm256_add_epi32(P::scaled(pl[t], sce), P::scaled(ph[t], sco)));
        }
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256i mn[4];
        for (int p = 0; p < 4; ++p)
          mn[p] = _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + omn + q4mn(v) + 32 * p + 16 * h)));
        const __m256 dv = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + od + q4d(v) + 16 * h)));
        const __m256 dm = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + od + q4dmin(v) + 16 * h)));
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          const uint8_t* xt = xb + t * xs;
          __m256i summ = _mm256_madd_epi16(mn[0], _mm256_set1_epi32(load_i32(xt + kXSum32)));
          for (int p = 1; p < 4; ++p)
            summ = _mm256_add_epi32(summ, _mm256_madd_epi16(mn[p], _mm256_set1_epi32(load_i32(xt + kXSum32 + 4 * p))));
          const __m256i sumi = k16 ? _mm256_srai_epi32(si[v][h][t], 4) : si[v][h][t];
          const __m256 xd = _mm256_set1_ps(load_f32(xt + kXD));
          acc[v][h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_mul_ps(dv, xd), acc[v][h][t]);
          acc[v][h][t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(summ), _mm256_mul_ps(dm, xd), acc[v][h][t]);
        }
      }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v)
      for (int h = 0; h < 2; ++h) store_half(y + t * ldy + 16 * v + 8 * h, (m[v] >> (8 * h)) & 0xFF, acc[v][h][t]);
}

// q6_K. Wide: 4q (bytes masked with 0xFC, step 3 assembled from the low bit pairs by shifts), each
// sub-block's sum starting at the activations' correction -128 * bsum, times its scale (the
// AVX-512 tile's integers). Narrow: the plain 6-bit q (below 64), int16 pairs of two steps each
// scaled by vpmaddwd; the -32 offset once per super-block, -32 * sum_g sc_g * bsum_g from
// vpmaddwd of (sc_g, sc_g+1) with the activations' int16 per-16 sums; then times 4, the wide sum.
template <int RV, int T>
LARDER_PK_TARGET void tile_q6k(const uint8_t* grp, int v0, int64_t nsb, const uint16_t* m, const uint8_t* x,
                               int64_t xs, float* y, int64_t ldy) {
  constexpr size_t STRIDE = kGroupPanels * kQ6Rec;  // one group record
  const size_t oq = q6_q(v0, 0), osc = q6_s(v0, 0) - q6_s(0, 0), od = q6_d(v0) - q6_d(0);
  const __m256i m03 = _mm256_set1_epi8(0x03), m0c = _mm256_set1_epi8(0x0C), m30 = _mm256_set1_epi8(0x30);
  const __m256i mhi = _mm256_set1_epi8(static_cast<char>(P::kWide ? 0xFC : 0x3F));
  const __m256i mc0 = _mm256_set1_epi8(static_cast<char>(0xC0));
  __m256 acc[RV][2][T];
#pragma GCC unroll 4
  for (int v = 0; v < RV; ++v)
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < T; ++t) acc[v][h][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* rec = grp + b * STRIDE;
    const uint8_t* xb = x + b * kXRec;
    __m256i si[RV][2][T];
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v)
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < T; ++t) si[v][h][t] = _mm256_setzero_si256();
    for (int g = 0; g < 16; ++g) {
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) {
        if constexpr (T == 1) prefetch_share(rec + STRIDE, STRIDE, g * RV + v, 16 * RV);
        const uint8_t* qs = rec + oq + q6_q(v, g);
        const __m128i scb = _mm_load_si128(reinterpret_cast<const __m128i*>(rec + osc + q6_s(v, g)));
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i r0 = load256(qs + 32 * h), r1 = load256(qs + 64 + 32 * h), r2 = load256(qs + 128 + 32 * h);
          __m256i q[4];
          if constexpr (P::kWide) {
            q[0] = _mm256_and_si256(r0, mhi);
            q[1] = _mm256_and_si256(r1, mhi);
            q[2] = _mm256_and_si256(r2, mhi);
            q[3] = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(r0, 2), m0c),
                                                   _mm256_and_si256(_mm256_slli_epi16(r1, 4), m30)),
                                   _mm256_and_si256(_mm256_slli_epi16(r2, 6), mc0));
          } else {
            q[0] = _mm256_and_si256(_mm256_srli_epi16(r0, 2), mhi);
            q[1] = _mm256_and_si256(_mm256_srli_epi16(r1, 2), mhi);
            q[2] = _mm256_and_si256(_mm256_srli_epi16(r2, 2), mhi);
            q[3] = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(r0, m03), _mm256_and_si256(_mm256_slli_epi16(r1, 2), m0c)),
                                   _mm256_and_si256(_mm256_slli_epi16(r2, 4), m30));
          }
          const __m256i sc = P::scale_i8(h ? _mm_unpackhi_epi64(scb, scb) : scb);
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) {
            const uint8_t* xt = opaque(xb + t * xs + 16 * g);
            __m256i xv[4];
            for (int k = 0; k < 4; ++k) xv[k] = _mm256_set1_epi32(load_i32(xt + 4 * k));
            __m256i s;
            if constexpr (P::kWide) {
              s = _mm256_set1_epi32(load_i32(xt + kXCorr - 12 * g));
              for (int k = 0; k < 4; ++k) s = P::dot(s, q[k], xv[k]);
              s = P::scaled(s, sc);
            } else {
              s = _mm256_add_epi32(P::scaled(P::dot(P::first(q[0], xv[0]), q[1], xv[1]), sc),
                                   P::scaled(P::dot(P::first(q[2], xv[2]), q[3], xv[3]), sc));
            }
            si[v][h][t] = _mm256_add_epi32(si[v][h][t], s);
          }
        }
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        if constexpr (!P::kWide) {
          __m256i scp[8];
          for (int k = 0; k < 8; ++k) {
            const __m128i sa = _mm_load_si128(reinterpret_cast<const __m128i*>(rec + osc + q6_s(v, 2 * k)));
            const __m128i sb = _mm_load_si128(reinterpret_cast<const __m128i*>(rec + osc + q6_s(v, 2 * k + 1)));
            scp[k] = _mm256_cvtepi8_epi16(h ? _mm_unpackhi_epi8(sa, sb) : _mm_unpacklo_epi8(sa, sb));
          }
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) {
            const uint8_t* xt = xb + t * xs + kXSum16;
            __m256i corr = _mm256_madd_epi16(scp[0], _mm256_set1_epi32(load_i32(xt)));
            for (int k = 1; k < 8; ++k)
              corr = _mm256_add_epi32(corr, _mm256_madd_epi16(scp[k], _mm256_set1_epi32(load_i32(xt + 4 * k))));
            si[v][h][t] = _mm256_slli_epi32(_mm256_sub_epi32(si[v][h][t], _mm256_slli_epi32(corr, 5)), 2);
          }
        }
        const __m256 dv = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(rec + od + q6_d(v) + 16 * h)));
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          const __m256 xd = _mm256_set1_ps(load_f32(xb + t * xs + kXD) * 0.25f);
          acc[v][h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si[v][h][t]), _mm256_mul_ps(dv, xd), acc[v][h][t]);
        }
      }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v)
      for (int h = 0; h < 2; ++h) store_half(y + t * ldy + 16 * v + 8 * h, (m[v] >> (8 * h)) & 0xFF, acc[v][h][t]);
}

// Decode: a group's 4 panels (one stream); prefill: kPrefillPanels panels x up to kTokTile2 tokens.
// kind: 0 q4_K, 1 q6_K, 2 q5_K.
TileFn pick(int kind, int rv, int nt) {
  static const TileFn decode[3][4] = {
      {tile_q4k<false, 1, 1>, tile_q4k<false, 2, 1>, tile_q4k<false, 3, 1>, tile_q4k<false, 4, 1>},
      {tile_q6k<1, 1>, tile_q6k<2, 1>, tile_q6k<3, 1>, tile_q6k<4, 1>},
      {tile_q4k<true, 1, 1>, tile_q4k<true, 2, 1>, tile_q4k<true, 3, 1>, tile_q4k<true, 4, 1>}};
  static const TileFn prefill[3][2][kTokTile2] = {
      {{tile_q4k<false, 1, 1>, tile_q4k<false, 1, 2>, tile_q4k<false, 1, 3>, tile_q4k<false, 1, 4>},
       {tile_q4k<false, 2, 1>, tile_q4k<false, 2, 2>, tile_q4k<false, 2, 3>, tile_q4k<false, 2, 4>}},
      {{tile_q6k<1, 1>, tile_q6k<1, 2>, tile_q6k<1, 3>, tile_q6k<1, 4>},
       {tile_q6k<2, 1>, tile_q6k<2, 2>, tile_q6k<2, 3>, tile_q6k<2, 4>}},
      {{tile_q4k<true, 1, 1>, tile_q4k<true, 1, 2>, tile_q4k<true, 1, 3>, tile_q4k<true, 1, 4>},
       {tile_q4k<true, 2, 1>, tile_q4k<true, 2, 2>, tile_q4k<true, 2, 3>, tile_q4k<true, 2, 4>}}};
  if (nt == 1) return decode[kind][rv - 1];
  return prefill[kind][rv - 1][nt - 1];
}
static_assert(kPrefillPanels == 2 && kDecodePanels == 4);

}  // namespace LARDER_PK_NS
#endif  // LARDER_PK_AVX2_BODY
