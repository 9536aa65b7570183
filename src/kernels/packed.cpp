// q8_0, q4_0, q4_1 and q5_0 weights repacked once at load into row panels for the integer kernels.
//
// In GGUF a row's blocks follow one another, so a one-token product must gather every block's
// quants and scale into vector lanes and reduce each row horizontally, on every token; on this
// CPU that caps the row dot product near DRAM speed (in cache ~85-90 GB/s on 2 threads), so
// decode cannot be memory-bound. Packed, 16 rows sit side by side in the lanes of a vector:
//   panel p = rows 16p .. 16p+15 (rows past the end are zero); its blocks in pairs, each pair
//   64-byte aligned pieces: qs of block 2q, qs of block 2q+1, 16 f16 scales of 2q and of 2q+1
//   (an odd block count ends with a zero block); groups of 4 panels (64 rows) store the pieces of
//   a pair together, so decode, which reads the 4 panels side by side, reads one stream (4
//   streams per thread read DRAM ~25% slower here). Within a group's pair record:
//     q4_0: panel by panel, [panel 0: qs 2q, qs 2q+1, scales][panel 1: ...] (576 bytes each);
//     q4_1: panel by panel, [qs 2q, qs 2q+1, scales d, minimums m (16 f16 of 2q, of 2q+1)]
//       (640 bytes each);
//     q5_0: panel by panel, [qs 2q, qs 2q+1, high bits 2q, high bits 2q+1, scales] (704 bytes);
//     q8_0: in read order, [qs 2q: panels 0..3][qs 2q+1: panels 0..3][scales: panel 0's two
//     blocks, panel 1's, ...].
//   Every layout takes as many bytes as the GGUF rows (whole 64-row groups, even block counts):
//   q4_0 18, q4_1 20, q5_0 22, q8_0 34 bytes per row and block.
//   Measured side by side from DRAM at ~84 GB/s: q8_0 72 vs 66 GB/s in read order, q4_0 77 vs
//   66 GB/s panel by panel (each with its best software prefetch distance below). q4_1 and q5_0
//   copy q4_0's arrangement and prefetch. In cache, one thread's CPU time for 1024 x 1024
//   (busy shared machine, so CPU time rather than wall time): decode q4_0 8.2 us, q4_1 9.3, q5_0
//   13.6 (GGUF-layout kernels: 23.6, 50.9, 49.0); 64 tokens q4_0 397 us, q4_1 434, q5_0 458
//   (GGUF layout: 429, 1615, 1608). q5_0's 5th bit costs its decode ~5 us of the 13.6 (without
//   it: 8.4); masks from vptestmb, bits moved by GFNI and merged by vpternlog, or a zero-masked
//   vmovdqu8 merged by vpternlog, instead of the masked vpaddb, measured no better.
//   q8_0 qs (512 bytes): step s (0..7) at 64s; lane i = row i's 4 quants + 128 (unsigned) for
//     elements 4s..4s+3 (s < 4) or 16+4(s-4)..16+4(s-4)+3 (s >= 4), the x4 layout's lo/hi order;
//   q4_0 / q4_1 / q5_0 qs (256 bytes): part s (0..3) at 64s; lane i = row i's qs[4s..4s+3] as
//     stored (low nibbles are step s, high nibbles step s + 4).
//   q5_0 high bits (64 bytes): step s (0..7) at 8s, a 64-bit mask whose bit 4i + l is bit 4s + l
//     of row i's qh, the 5th bit of the quant in byte l of lane i of step s (the kernel adds 16
//     under the mask: vpaddb with a byte mask loaded straight from memory).
// Each vpdpbusd is then 16 rows x 4 k of one token against an activation dword broadcast from
// memory; the unsigned offset (128, 8 or 16) comes back through the x4 layout's per-block
// correction. q4_1's quants are unsigned already (x = d q + m): its integer sum starts at 0 and
// the minimum adds m * (d_x * sum(q_x)) per block, one more fma, with d_x * sum(q_x) written
// next to the correction (lane 4j + 1 of the x4 layout's corr vector, see matmul_packed). The
// same bytes serve decode (4 panels, two partial sums each, so 8 independent chains) and
// prefill (2 panels x 6 tokens per register tile) with no per-call unpacking. The AVX2 path runs
// packed_avx2.cpp's tiles on the same bytes (a 64-byte step as two 256-bit halves).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/kernels_internal.h"

namespace larder::kernels {

namespace {

// Lambdas do not inherit their function's target; the block body below is one.
#define LARDER_TARGET_AVX512_LAMBDA __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"), always_inline))

constexpr int kGroupPanels = 4;    // panels stored interleaved (64 rows)
constexpr int kDecodePanels = 4;   // panels per decode call: one group
constexpr int kPrefillPanels = 2;  // panels per prefill tile (32 rows)
constexpr int kTokTile = 6;        // prefill tokens per register tile
// Decode prefetches each block's pieces 2 pairs ahead (from DRAM at ~84 GB/s, huge pages:
// without it q4_0 read ~52 GB/s, q8_0 ~67; with it ~77 and ~75; 1 or 4 pairs were no better).
constexpr int kPrefetchQ4 = 2, kPrefetchQ8 = 2;

// The packed formats; Q8 is read in read order, the 4-bit ones panel by panel.
enum class Kind { Q8_0, Q4_0, Q4_1, Q5_0 };
constexpr int qs_bytes(Kind k) { return k == Kind::Q8_0 ? 512 : 256; }  // one block's quants in a panel
constexpr int qh_bytes(Kind k) { return k == Kind::Q5_0 ? 64 : 0; }     // one block's high-bit masks
constexpr int mn_bytes(Kind k) { return k == Kind::Q4_1 ? 64 : 0; }     // a pair's minimums
constexpr size_t pair_bytes(Kind k) { return 2 * qs_bytes(k) + 2 * qh_bytes(k) + 64 + mn_bytes(k); }
static_assert(pair_bytes(Kind::Q4_0) == 2 * 16 * 18 && pair_bytes(Kind::Q4_1) == 2 * 16 * 20 &&
              pair_bytes(Kind::Q5_0) == 2 * 16 * 22 && pair_bytes(Kind::Q8_0) == 2 * 16 * 34);

struct Layout {
  Kind kind;
  int qs;       // bytes of one block's quants in a panel
  int qh;       // bytes of one block's high-bit masks in a panel (q5_0)
  size_t pair;  // bytes of one record (2 blocks)
  int corr_mul; // the x4 correction's factor (q4_1: -1, so the slot holds +sum(q_x))
  int bb;       // GGUF block bytes
  bool read_order;  // pair record in read order (q8_0) or panel by panel (the 4-bit ones)
};
bool packable(DType t) { return t == DType::Q8_0 || t == DType::Q4_0 || t == DType::Q4_1 || t == DType::Q5_0; }
Layout layout_of(DType t) {
  switch (t) {
    case DType::Q8_0: return {Kind::Q8_0, 512, 0, pair_bytes(Kind::Q8_0), 128, 34, true};
    case DType::Q4_1: return {Kind::Q4_1, 256, 0, pair_bytes(Kind::Q4_1), -1, 20, false};
    case DType::Q5_0: return {Kind::Q5_0, 256, 64, pair_bytes(Kind::Q5_0), 16, 22, false};
    default: return {Kind::Q4_0, 256, 0, pair_bytes(Kind::Q4_0), 8, 18, false};
  }
}
inline int64_t n_pairs(int64_t cols) { return (cols / 32 + 1) / 2; }
// Bytes of one group of 4 panels (group p / 4 holds panel p as its panel p % 4).
inline size_t group_bytes(const Layout& L, int64_t cols) { return n_pairs(cols) * kGroupPanels * L.pair; }
inline const uint8_t* group_of(const uint8_t* pw, size_t gb, int64_t p) { return pw + (p / kGroupPanels) * gb; }
// Quants, high-bit masks, scales and minimums of block b of panel v in group g.
inline size_t rec_of(const Layout& L, int64_t b) { return static_cast<size_t>(b >> 1) * kGroupPanels * L.pair; }
inline const uint8_t* qs_at(const Layout& L, const uint8_t* g, int v, int64_t b) {
  if (L.read_order) return g + rec_of(L, b) + (b & 1) * kGroupPanels * L.qs + v * L.qs;
  return g + rec_of(L, b) + v * L.pair + (b & 1) * L.qs;
}
inline const uint8_t* qh_at(const Layout& L, const uint8_t* g, int v, int64_t b) {
  return g + rec_of(L, b) + v * L.pair + 2 * L.qs + (b & 1) * L.qh;
}
inline const uint8_t* sc_at(const Layout& L, const uint8_t* g, int v, int64_t b) {
  if (L.read_order) return g + rec_of(L, b) + 2 * kGroupPanels * L.qs + 64 * v + 32 * (b & 1);
  return g + rec_of(L, b) + v * L.pair + 2 * L.qs + 2 * L.qh + 32 * (b & 1);
}
inline const uint8_t* mn_at(const Layout& L, const uint8_t* g, int v, int64_t b) { return sc_at(L, g, v, b) + 64; }

// Groups [g0, g1) of w (rows x cols, row stride wrb) into out.
void pack_groups(const Layout& L, const uint8_t* w, size_t wrb, int64_t rows, int64_t cols, uint8_t* out, int64_t g0,
                 int64_t g1) {
  const int64_t nb = cols / 32;
  const size_t gb = group_bytes(L, cols);
  std::memset(out + g0 * gb, 0, (g1 - g0) * gb);
  auto at = [](const uint8_t* p) { return const_cast<uint8_t*>(p); };
  for (int64_t p = g0 * kGroupPanels; p < g1 * kGroupPanels; ++p) {
    uint8_t* g = at(group_of(out, gb, p));
    const int v = static_cast<int>(p % kGroupPanels);
    for (int i = 0; i < 16; ++i) {
      const int64_t r = p * 16 + i;
      if (r >= rows) break;
      const uint8_t* row = w + r * wrb;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * L.bb;
        uint8_t* qs = at(qs_at(L, g, v, b));
        std::memcpy(at(sc_at(L, g, v, b)) + 2 * i, blk, 2);  // f16 scale d
        switch (L.kind) {
          case Kind::Q8_0:
            for (int s = 0; s < 8; ++s) {
              uint32_t q;
              std::memcpy(&q, blk + 2 + (s < 4 ? 4 * s : 16 + 4 * (s - 4)), 4);
              q ^= 0x80808080u;  // q + 128 in every byte
              std::memcpy(qs + 64 * s + 4 * i, &q, 4);
            }
            break;
          case Kind::Q4_0:
            for (int s = 0; s < 4; ++s) std::memcpy(qs + 64 * s + 4 * i, blk + 2 + 4 * s, 4);
            break;
          case Kind::Q4_1:
            std::memcpy(at(mn_at(L, g, v, b)) + 2 * i, blk + 2, 2);  // f16 minimum m
            for (int s = 0; s < 4; ++s) std::memcpy(qs + 64 * s + 4 * i, blk + 4 + 4 * s, 4);
            break;
          case Kind::Q5_0: {
            for (int s = 0; s < 4; ++s) std::memcpy(qs + 64 * s + 4 * i, blk + 6 + 4 * s, 4);
            uint32_t qh;
            std::memcpy(&qh, blk + 2, 4);
            uint8_t* hm = at(qh_at(L, g, v, b));
            // Step s's mask: bit 4i + l = bit 4s + l of qh (elements 4s + l, s < 4; 16 + 4(s - 4) + l).
            for (int s = 0; s < 8; ++s) hm[8 * s + i / 2] |= static_cast<uint8_t>(((qh >> (4 * s)) & 0xF) << (4 * (i & 1)));
            break;
          }
        }
      }
    }
  }
}

// The x4 activations of q4_1: lane 4j + 1 of each group's corr vector (zero from quantize_x4)
// gets d_x * sum(q_x) of block 4g + j as a float, the minimum's factor (quantize_x4 wrote
// sum(q_x) into lane 4j with corr_mul -1).
void add_block_sums(uint8_t* xq, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* c = xq + (b >> 2) * kX4GroupBytes + 16 * (b & 3) + 192;
    const float s = load_f32(c - 64) * static_cast<float>(load_i32(c));
    std::memcpy(c + 4, &s, 4);
  }
}

// ------------------------------------------------------------------ scalar (reference)

// Rows [16p, 16p + nrows) x tokens [0, nt) from panel v of group g; the AVX-512 tiles' exact
// arithmetic (integer block sums, then acc = fma(sum, d_w * d_x, acc) per block, and for q4_1
// acc = fma(m_w, d_x * sum(q_x), acc) after it).
void panel_scalar(const Layout& L, const uint8_t* gp, int v, int64_t nb, int nrows, const uint8_t* x, int64_t xs,
                  int64_t nt, float* y, int64_t ldy) {
  for (int64_t t = 0; t < nt; ++t)
    for (int i = 0; i < nrows; ++i) {
      float acc = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qs = qs_at(L, gp, v, b);
        const uint8_t* g = x + t * xs + (b >> 2) * kX4GroupBytes + 16 * (b & 3);
        int32_t s = L.kind == Kind::Q4_1 ? 0 : load_i32(g + 192);
        for (int st = 0; st < 8; ++st)
          for (int l = 0; l < 4; ++l) {
            int wq;
            if (L.kind == Kind::Q8_0) {
              wq = qs[64 * st + 4 * i + l];
            } else {
              const uint8_t byte = qs[64 * (st & 3) + 4 * i + l];
              wq = st < 4 ? byte & 0xF : byte >> 4;
              if (L.kind == Kind::Q5_0) wq |= ((qh_at(L, gp, v, b)[8 * st + i / 2] >> (4 * (i & 1) + l)) & 1) << 4;
            }
            s += wq * static_cast<int8_t>(g[(st < 4 ? 0 : 64) + 4 * (st & 3) + l]);
          }
        const float dw = fp16_to_fp32(load_u16(sc_at(L, gp, v, b) + 2 * i));
        acc = std::fma(static_cast<float>(s), dw * load_f32(g + 128), acc);
        if (L.kind == Kind::Q4_1) acc = std::fma(fp16_to_fp32(load_u16(mn_at(L, gp, v, b) + 2 * i)), load_f32(g + 196), acc);
      }
      y[t * ldy + i] = acc;
    }
}

// ------------------------------------------------------------------ AVX-512

// y[t*ldy + 16v + i] for panels v0 + v (v < RV) of a group, tokens t < T, lanes masked by m[v];
// gq / gs: the group's start moved to panel v0's quants / scales (unit_bases).
// Decode (T == 1) keeps two partial sums per panel so 2 * RV dpbusd chains run side by side.
template <Kind K, int RV, int T>
LARDER_TARGET_AVX512 void tile_avx512(const uint8_t* gq, const uint8_t* gs, int64_t nb, const __mmask16* m, const uint8_t* x,
                                      int64_t xs, float* y, int64_t ldy) {
  constexpr bool Q4 = K != Kind::Q8_0;
  constexpr int NS = T == 1 ? 2 : 1;
  constexpr int QS = qs_bytes(K), QH = qh_bytes(K);
  constexpr size_t PAIR = pair_bytes(K);
  constexpr size_t GREC = kGroupPanels * PAIR;  // one pair's record of a group
  constexpr bool RO = !Q4;                      // Layout::read_order
  constexpr size_t VQ = RO ? QS : PAIR, VS = RO ? 64 : PAIR;  // panel to panel: quants, scales
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i c16 = _mm512_set1_epi8(16);
  __m512 acc[RV][T];
  for (int v = 0; v < RV; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = _mm512_setzero_ps();
  // Block b (its pair's H-th); called with constant H so every load has a fixed stride from one
  // pair to the next, which the hardware prefetchers follow (measured: ~45 vs ~64 GB/s for q4_0).
  auto block = [&](int64_t b, auto hc) LARDER_TARGET_AVX512_LAMBDA {
    constexpr int H = decltype(hc)::value;
    // Panel v0 + v's quants at qs + v * VQ, its scales at sc + v * VS.
    const uint8_t* rec = gq + (b >> 1) * GREC;
    const uint8_t* qs = rec + H * (RO ? kGroupPanels * QS : QS);
    const uint8_t* qh = rec + 2 * QS + H * QH;  // q5_0 (panel by panel: gq == gs)
    const uint8_t* sc = gs + (b >> 1) * GREC + (RO ? 2 * kGroupPanels * QS : 2 * QS + 2 * QH) + 32 * H;
    const uint8_t* xb = x + (b >> 2) * kX4GroupBytes + 16 * (b & 3);
    if constexpr (T == 1) {  // decode: the same piece a few pairs on (rec + PF * GREC)
      constexpr int PF = Q4 ? kPrefetchQ4 : kPrefetchQ8;
      if constexpr (RO) {  // this block's quants of the 4 panels; the scales with the first block
        const char* ahead = reinterpret_cast<const char*>(rec + PF * GREC + H * kGroupPanels * QS);
        for (int l = 0; l < kGroupPanels * QS; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
        if constexpr (H == 0)
          for (int l = 0; l < kGroupPanels * 64; l += 64) _mm_prefetch(ahead + 2 * kGroupPanels * QS + l, _MM_HINT_T0);
      } else {  // half the group's record per block
        const char* ahead = reinterpret_cast<const char*>(rec + PF * GREC + H * (GREC / 2));
        for (int l = 0; l < static_cast<int>(GREC / 2); l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
      }
    }
    __m512i s[NS][RV][T];
    for (int t = 0; t < T; ++t) {
      const __m512i c = K == Kind::Q4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(load_i32(xb + t * xs + 192));
      for (int v = 0; v < RV; ++v) {
        s[0][v][t] = c;
        if constexpr (NS == 2) s[NS - 1][v][t] = _mm512_setzero_si512();
      }
    }
    if constexpr (Q4) {
      for (int st = 0; st < 4; ++st) {
        __m512i lo[RV], hi[RV];
        for (int v = 0; v < RV; ++v) {
          const __m512i raw = _mm512_load_si512(qs + v * VQ + 64 * st);
          lo[v] = _mm512_and_si512(raw, m4);
          hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
          if constexpr (K == Kind::Q5_0) {  // + 16 where the 5th bit is set
            const __mmask64 klo = _cvtu64_mask64(load_u64(qh + v * VQ + 8 * st));
            const __mmask64 khi = _cvtu64_mask64(load_u64(qh + v * VQ + 8 * (st + 4)));
            lo[v] = _mm512_mask_add_epi8(lo[v], klo, lo[v], c16);
            hi[v] = _mm512_mask_add_epi8(hi[v], khi, hi[v], c16);
          }
        }
        for (int t = 0; t < T; ++t) {
          const __m512i xl = _mm512_set1_epi32(load_i32(xb + t * xs + 4 * st));
          const __m512i xh = _mm512_set1_epi32(load_i32(xb + t * xs + 64 + 4 * st));
          for (int v = 0; v < RV; ++v) {
            s[0][v][t] = _mm512_dpbusd_epi32(s[0][v][t], lo[v], xl);
            s[NS - 1][v][t] = _mm512_dpbusd_epi32(s[NS - 1][v][t], hi[v], xh);
          }
        }
      }
    } else {
      for (int st = 0; st < 8; ++st) {
        __m512i wv[RV];
        for (int v = 0; v < RV; ++v) wv[v] = _mm512_load_si512(qs + v * VQ + 64 * st);
        const int off = (st < 4 ? 0 : 64) + 4 * (st & 3), k = NS == 2 ? (st & 1) : 0;
        for (int t = 0; t < T; ++t) {
          const __m512i xv = _mm512_set1_epi32(load_i32(xb + t * xs + off));
          for (int v = 0; v < RV; ++v) s[k][v][t] = _mm512_dpbusd_epi32(s[k][v][t], wv[v], xv);
        }
      }
    }
    __m512 dv[RV], mv[RV];
    for (int v = 0; v < RV; ++v) {
      dv[v] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sc + v * VS)));
      if constexpr (K == Kind::Q4_1) mv[v] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sc + 64 + v * VS)));
    }
    for (int t = 0; t < T; ++t) {
      const __m512 xd = _mm512_set1_ps(load_f32(xb + t * xs + 128));
      for (int v = 0; v < RV; ++v) {
        const __m512i si = NS == 2 ? _mm512_add_epi32(s[0][v][t], s[NS - 1][v][t]) : s[0][v][t];
        acc[v][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(dv[v], xd), acc[v][t]);
      }
      if constexpr (K == Kind::Q4_1) {
        const __m512 xm = _mm512_set1_ps(load_f32(xb + t * xs + 196));
        for (int v = 0; v < RV; ++v) acc[v][t] = _mm512_fmadd_ps(mv[v], xm, acc[v][t]);
      }
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, std::integral_constant<int, 0>{});
    block(b + 1, std::integral_constant<int, 1>{});
  }
  if (b < nb) block(b, std::integral_constant<int, 0>{});
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < RV; ++v) _mm512_mask_storeu_ps(y + t * ldy + 16 * v, m[v], acc[v][t]);
}

using TileFn = void (*)(const uint8_t*, const uint8_t*, int64_t, const __mmask16*, const uint8_t*, int64_t, float*, int64_t);

template <Kind K>
TileFn decode_tile_k(int rv) {
  static const TileFn tb[kDecodePanels] = {tile_avx512<K, 1, 1>, tile_avx512<K, 2, 1>, tile_avx512<K, 3, 1>,
                                           tile_avx512<K, 4, 1>};
  return tb[rv - 1];
}
template <Kind K>
TileFn prefill_tile_k(int rv, int nt) {
  static const TileFn tb[kPrefillPanels][kTokTile] = {
      {tile_avx512<K, 1, 1>, tile_avx512<K, 1, 2>, tile_avx512<K, 1, 3>, tile_avx512<K, 1, 4>, tile_avx512<K, 1, 5>,
       tile_avx512<K, 1, 6>},
      {tile_avx512<K, 2, 1>, tile_avx512<K, 2, 2>, tile_avx512<K, 2, 3>, tile_avx512<K, 2, 4>, tile_avx512<K, 2, 5>,
       tile_avx512<K, 2, 6>},
  };
  return tb[rv - 1][nt - 1];
}
TileFn decode_tile(Kind k, int rv) {
  switch (k) {
    case Kind::Q8_0: return decode_tile_k<Kind::Q8_0>(rv);
    case Kind::Q4_0: return decode_tile_k<Kind::Q4_0>(rv);
    case Kind::Q4_1: return decode_tile_k<Kind::Q4_1>(rv);
    case Kind::Q5_0: return decode_tile_k<Kind::Q5_0>(rv);
  }
  return nullptr;
}
TileFn prefill_tile(Kind k, int rv, int nt) {
  switch (k) {
    case Kind::Q8_0: return prefill_tile_k<Kind::Q8_0>(rv, nt);
    case Kind::Q4_0: return prefill_tile_k<Kind::Q4_0>(rv, nt);
    case Kind::Q4_1: return prefill_tile_k<Kind::Q4_1>(rv, nt);
    case Kind::Q5_0: return prefill_tile_k<Kind::Q5_0>(rv, nt);
  }
  return nullptr;
}

}  // namespace

// The AVX2 tiles (packed_avx2.cpp), on these bytes: xq holds the activations in the x4 layout.
void matmul_packed_avx2(DType t, Vnni256 vnni, const uint8_t* pw, int64_t rows, int64_t cols, const uint8_t* xq,
                        int64_t xs, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool);

size_t packed_bytes(DType t, int64_t rows, int64_t cols) {
  if (packed_k_type(t)) return packed_k_bytes(t, rows, cols);
  if (!packable(t) || cols <= 0 || cols % 32 || rows <= 0) return 0;
  return static_cast<size_t>((rows + 16 * kGroupPanels - 1) / (16 * kGroupPanels)) * group_bytes(layout_of(t), cols);
}

bool packed_kernels(DType t, Isa isa) {
  if (packed_k_type(t)) return packed_k_kernels(t, isa);
  return packable(t) && (isa == Isa::AVX512 || isa == Isa::AVX2);
}

void pack_weights(DType t, const void* w, size_t wrb, int64_t rows, int64_t cols, uint8_t* out, ThreadPool& pool) {
  if (packed_k_type(t)) return pack_weights_k(t, w, wrb, rows, cols, out, pool);
  LARDER_ASSERT(packed_bytes(t, rows, cols) > 0);
  LARDER_ASSERT(reinterpret_cast<uintptr_t>(out) % 64 == 0);
  const Layout L = layout_of(t);
  pool.parallel_for((rows + 16 * kGroupPanels - 1) / (16 * kGroupPanels), [&](int64_t b, int64_t e, int) {
    pack_groups(L, static_cast<const uint8_t*>(w), wrb, rows, cols, out, b, e);
  });
}

void matmul_packed(DType t, const void* packed, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                   int64_t ldy, ThreadPool& pool, MatmulScratch& scratch, Isa isa) {
  if (packed_k_type(t))
    return matmul_packed_k(t, packed, rows, cols, x, n_tokens, y, ldy, pool, scratch, isa);
  LARDER_ASSERT(packed_bytes(t, rows, cols) > 0);
  const Layout L = layout_of(t);
  const auto* pw = static_cast<const uint8_t*>(packed);
  const int64_t nb = cols / 32, xs = x4_row_bytes(nb);
  const size_t gb = group_bytes(L, cols);
  uint8_t* xq = aligned_bytes(scratch.xq, static_cast<size_t>(n_tokens * xs));
  const Isa qisa = isa == Isa::AVX512 || isa == Isa::AVX2 ? isa : Isa::Scalar;  // the same bytes on each
  pool.parallel_for(n_tokens, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      quantize_x4(x + i * cols, xq + i * xs, nb, L.corr_mul, qisa);
      if (L.kind == Kind::Q4_1) add_block_sums(xq + i * xs, nb);
    }
  });
  if (isa == Isa::AVX2)
    return matmul_packed_avx2(t, active_vnni256(), pw, rows, cols, xq, xs, n_tokens, y, ldy, pool);
  if (isa != Isa::AVX512) {  // the layout's reference (the loader packs only where the kernels run)
    for_each_unit(pool, rows, 1, [&](int64_t p, int, const uint16_t*) {
      panel_scalar(L, group_of(pw, gb, p), static_cast<int>(p % kGroupPanels), nb,
                   static_cast<int>(std::min<int64_t>(16, rows - 16 * p)), xq, xs, n_tokens, y + 16 * p, ldy);
    });
    return;
  }
  for_each_unit(pool, rows, n_tokens == 1 ? kDecodePanels : kPrefillPanels, [&](int64_t p0, int rv, const uint16_t* m) {
    const uint8_t* g = group_of(pw, gb, p0);  // units never cross a group
    const int v0 = static_cast<int>(p0 % kGroupPanels);
    const uint8_t* gq = g + v0 * (L.read_order ? L.qs : L.pair);
    const uint8_t* gs = g + v0 * (L.read_order ? 64 : L.pair);
    if (n_tokens == 1) return decode_tile(L.kind, rv)(gq, gs, nb, m, xq, xs, y + 16 * p0, ldy);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokTile) {
      const int n = static_cast<int>(std::min<int64_t>(kTokTile, n_tokens - t0));
      prefill_tile(L.kind, rv, n)(gq, gs, nb, m, xq + t0 * xs, xs, y + t0 * ldy + 16 * p0, ldy);
    }
  });
}

bool packed_row_to_float(DType t, const void* packed, int64_t rows, int64_t cols, int64_t r, float* out) {
  if (packed_k_type(t)) return packed_k_row_to_float(t, packed, rows, cols, r, out);
  if (!packable(t) || r < 0 || r >= rows || !packed_bytes(t, rows, cols)) return false;
  const Layout L = layout_of(t);
  const uint8_t* g = group_of(static_cast<const uint8_t*>(packed), group_bytes(L, cols), r / 16);
  const int v = static_cast<int>((r / 16) % kGroupPanels), i = static_cast<int>(r % 16);
  for (int64_t b = 0; b < cols / 32; ++b) {
    const uint8_t* qs = qs_at(L, g, v, b);
    const float d = fp16_to_fp32(load_u16(sc_at(L, g, v, b) + 2 * i));
    for (int st = 0; st < 8; ++st)
      for (int l = 0; l < 4; ++l) {
        float val;  // as dequantize_row computes it
        if (L.kind == Kind::Q8_0) {
          val = d * static_cast<float>(qs[64 * st + 4 * i + l] - 128);
        } else {
          const uint8_t byte = qs[64 * (st & 3) + 4 * i + l];
          const int q = st < 4 ? byte & 0xF : byte >> 4;
          if (L.kind == Kind::Q4_0) {
            val = d * static_cast<float>(q - 8);
          } else if (L.kind == Kind::Q5_0) {
            const int h = (qh_at(L, g, v, b)[8 * st + i / 2] >> (4 * (i & 1) + l)) & 1;
            val = static_cast<float>((q | h << 4) - 16) * d;
          } else {
            const float p = static_cast<float>(q) * d;
            val = p + fp16_to_fp32(load_u16(mn_at(L, g, v, b) + 2 * i));
          }
        }
        out[b * 32 + (st < 4 ? 4 * st : 16 + 4 * (st - 4)) + l] = val;
      }
  }
  return true;
}

}  // namespace larder::kernels
