// Panel-packed q4_K / q5_K / q6_K weights (src/kernels/packed_k.cpp): matmul on the packed bytes, on
// every ISA path (AVX-512 and AVX2 kernels, the latter with vpmaddubsw and with 256-bit VNNI where
// the CPU has it; the layout's scalar reference on the scalar path), against a
// double-precision reference from the dequantized GGUF rows and the activations rounded through
// q8_K (the packed layout's activations are the q8_K quantizer's bytes) -- never against the
// kernels themselves.
//
// Error bound. The kernels' integer super-block sums are exact; what remains is f32 rounding:
// per super-block the conversion of the int32 sum(s), the product d_w * d_x and one fma into the
// accumulator (q4_K: a second one for the minimums), each a relative 2^-24 of a term bounded by
// M_b = sum over the super-block of (|d * sc * q| + |dmin * mn|) * |x| (q6_K: |d * sc * (q - 32)| *
// |x|), plus the accumulation over nsb super-blocks; the reference rows themselves carry
// dequantize_row's f32 rounding (<= 2^-23 of the same magnitudes). So
//   |got - ref| <= (nsb + 6) * 2^-24 * M, M = sum_b M_b,
// which for the rows tested here (nsb <= 61) is below 1e-5 * M; the check is
//   |got - ref| <= 1e-5 * M + 1e-6.
// (M, not sum |w * x|: a q4_K weight d*sc*q - dmin*mn can be much smaller than its two terms.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/thread_pool.h"
#include "engine/context.h"
#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants.h"
#include "model/model.h"
#include "model/synth.h"
#include "test_util.h"

using namespace larder;
using namespace larder::kernels;

using larder::testing::IsaGuard;
using larder::testing::paths;

namespace {

struct KMatrix {
  DType type;
  int rows, cols;
  std::vector<uint8_t> q;      // GGUF rows
  std::vector<uint8_t> store;  // packed bytes (aligned inside)
  uint8_t* packed = nullptr;
  std::vector<float> deq;      // [rows][cols]
  std::vector<float> mag;      // [rows][cols]: |d*sc*q| + |dmin*mn| (q4_K), |w| (q6_K)
  Tensor tensor(bool use_packed) const {
    Tensor W;
    W.type = type;
    W.ne[0] = cols;
    W.ne[1] = rows;
    W.data = q.data();
    W.nbytes = q.size();
    W.packed = use_packed ? packed : nullptr;
    return W;
  }
};

// Per-element magnitude of the terms the kernels round (see the bound above).
void magnitudes(DType t, const uint8_t* row, int cols, const float* deq, float* out) {
  if (t == DType::Q6_K) {
    for (int c = 0; c < cols; ++c) out[c] = std::fabs(deq[c]);
    return;
  }
  const bool q5 = t == DType::Q5_K;
  const auto* b4 = reinterpret_cast<const BlockQ4_K*>(row);
  const auto* b5 = reinterpret_cast<const BlockQ5_K*>(row);
  for (int s = 0; s < cols / kQK_K; ++s) {
    const double d = fp16_to_fp32(q5 ? b5[s].d : b4[s].d), dmin = fp16_to_fp32(q5 ? b5[s].dmin : b4[s].dmin);
    const uint8_t* scales = q5 ? b5[s].scales : b4[s].scales;
    const uint8_t* qs = q5 ? b5[s].qs : b4[s].qs;
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(j, scales, &sc, &mn);
      for (int l = 0; l < 32; ++l) {
        const int q = ((qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 0xF) + (q5 ? (b5[s].qh[l] >> j & 1) * 16 : 0);
        out[s * kQK_K + 32 * j + l] = static_cast<float>(std::fabs(d * sc * q) + std::fabs(dmin * mn));
      }
    }
  }
}

KMatrix make(DType t, int rows, int cols, std::mt19937& rng, ThreadPool& pool, int pattern = 0) {
  const size_t rb = row_bytes(t, cols);
  KMatrix m{t, rows, cols, std::vector<uint8_t>(rb * rows), {}, nullptr,
            std::vector<float>(static_cast<size_t>(rows) * cols), std::vector<float>(static_cast<size_t>(rows) * cols)};
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> w(cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      switch (pattern) {
        case 1: w[c] = (c + r) % 2 ? 1.f : -1.f; break;      // quants at both ends of the range
        case 2: w[c] = (c % 64) / 63.f - 0.25f; break;       // every level, asymmetric
        case 3: w[c] = c % 7 == 0 ? -3.f : 2.f + (c % 3); break;  // large, same-signed
        default: w[c] = nd(rng) * (1 + r % 3) + (r % 4 == 1 ? 0.7f : 0.f);  // scales and offsets vary
      }
    }
    quantize_row(t, w.data(), m.q.data() + r * rb, cols);
    float* dr = m.deq.data() + static_cast<size_t>(r) * cols;
    dequantize_row(t, m.q.data() + r * rb, dr, cols);
    magnitudes(t, m.q.data() + r * rb, cols, dr, m.mag.data() + static_cast<size_t>(r) * cols);
  }
  const size_t n = packed_bytes(t, rows, cols);
  EXPECT_GT(n, 0u);
  EXPECT_EQ(n % 64, 0u);
  m.store.assign(n + 64, 0xA5);  // garbage around: the packer must write every byte it owns
  m.packed = m.store.data() + (64 - reinterpret_cast<uintptr_t>(m.store.data()) % 64) % 64;
  pack_weights(t, m.q.data(), rb, rows, cols, m.packed, pool);
  return m;
}

std::vector<float> q8k_roundtrip(const std::vector<float>& x, int nt, int cols) {
  std::vector<float> out(x.size());
  std::vector<uint8_t> q(row_bytes(DType::Q8_K, cols));
  for (int t = 0; t < nt; ++t) {
    quantize_row(DType::Q8_K, &x[static_cast<size_t>(t) * cols], q.data(), cols);
    dequantize_row(DType::Q8_K, q.data(), &out[static_cast<size_t>(t) * cols], cols);
  }
  return out;
}

void check(const KMatrix& W, const std::vector<float>& xq, int nt, const std::vector<float>& y, int ldy,
           const std::string& what) {
  for (int t = 0; t < nt; ++t) {
    for (int r = 0; r < W.rows; ++r) {
      double ref = 0, mag = 0;
      for (int c = 0; c < W.cols; ++c) {
        const size_t wi = static_cast<size_t>(r) * W.cols + c;
        const double xv = xq[static_cast<size_t>(t) * W.cols + c];
        ref += static_cast<double>(W.deq[wi]) * xv;
        mag += W.mag[wi] * std::fabs(xv);
      }
      const double got = y[static_cast<size_t>(t) * ldy + r];
      ASSERT_LE(std::fabs(got - ref), 1e-5 * mag + 1e-6)
          << what << " " << dtype_name(W.type) << " rows " << W.rows << " cols " << W.cols << " tokens " << nt << " t "
          << t << " r " << r << " got " << got << " ref " << ref;
    }
    for (int r = W.rows; r < ldy; ++r) ASSERT_EQ(y[static_cast<size_t>(t) * ldy + r], -7.f) << what << " wrote past rows";
  }
}

// Restores the GFNI setting of the q6_K kernels.
struct GfniGuard {
  bool saved = set_packed_k_gfni(true);
  ~GfniGuard() { set_packed_k_gfni(saved); }
};

// Restores the active path and its 256-bit VNNI choice (set_isa alone keeps a stale choice).
struct PathGuard {
  Isa isa = active_isa();
  bool vnni = active_vnni256() != Vnni256::None;
  ~PathGuard() {
    set_isa(isa);
    set_vnni256(vnni);
  }
};

// One kernel variant: the path, q6_K's GFNI (AVX-512) and the AVX2 path's int8 dot product
// (vpmaddubsw, or vpdpbusd where the CPU has a 256-bit form).
struct Variant {
  Isa isa;
  bool gfni = true;
  bool vnni = false;
  void apply() const {
    set_isa(isa);
    set_vnni256(vnni);
    set_packed_k_gfni(gfni);
  }
  std::string name() const {
    std::string n = isa_name(isa);
    if (isa == Isa::AVX512 && !gfni) n += " (no gfni)";
    if (isa == Isa::AVX2) n += vnni ? (detected_vnni256() == Vnni256::Vex ? "+avxvnni" : "+vnni(evex)") : " (maddubs)";
    return n;
  }
};

// Every variant this CPU runs: scalar, AVX2 with and without VNNI, AVX-512 with and without GFNI.
std::vector<Variant> variants() {
  std::vector<Variant> v;
  for (Isa isa : paths()) {
    v.push_back({isa});
    if (isa == Isa::AVX512) v.push_back({isa, false});
    if (isa == Isa::AVX2 && detected_vnni256() != Vnni256::None) v.push_back({isa, true, true});
  }
  return v;
}

}  // namespace

TEST(PackedK, SizesAndTypes) {
  EXPECT_GT(packed_bytes(DType::Q4_K, 64, 2048), 0u);
  EXPECT_GT(packed_bytes(DType::Q6_K, 1, 256), 0u);
  EXPECT_EQ(packed_bytes(DType::Q4_K, 64, 128), 0u);
  EXPECT_EQ(packed_bytes(DType::Q6_K, 64, 300), 0u);
  EXPECT_EQ(packed_bytes(DType::Q5_K, 64, 300), 0u);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    EXPECT_TRUE(packed_kernels(t, Isa::AVX512));
    EXPECT_TRUE(packed_kernels(t, Isa::AVX2));
    EXPECT_FALSE(packed_kernels(t, Isa::Scalar));
  }
  // Whole 64-row groups: q6_K exactly the GGUF bytes (even super-block counts), q4_K +64 bytes
  // per 16 rows x 256 columns (the scales and minimums as bytes): 2368 / 2304.
  EXPECT_EQ(packed_bytes(DType::Q6_K, 128, 2048), row_bytes(DType::Q6_K, 2048) * 128);
  EXPECT_EQ(packed_bytes(DType::Q4_K, 128, 2048), row_bytes(DType::Q4_K, 2048) * 128 / 2304 * 2368);
  // q5_K: q4_K's record and the GGUF rows' 5th bits (32 bytes per row and super-block): 2880 / 2816.
  EXPECT_EQ(packed_bytes(DType::Q5_K, 128, 2048), row_bytes(DType::Q5_K, 2048) * 128 / 2816 * 2880);
  // Linear in whole groups (model loading packs 64-row slabs at packed_bytes(t, r0, cols)).
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K})
    EXPECT_EQ(packed_bytes(t, 192, 1280), packed_bytes(t, 64, 1280) + packed_bytes(t, 128, 1280));
}

// Ragged everything: rows around the 16-row panels and 64-row groups, 1..5 super-blocks (q6_K's
// odd super-block counts), one token (decode tiles) and counts
// around the 3-token prefill tile.
TEST(PackedK, GridAllPathsAgainstReference) {
  PathGuard guard;
  GfniGuard gguard;
  ThreadPool pool(2);
  std::mt19937 rng(31);
  std::normal_distribution<float> nd(0, 1);
  const int rows_grid[] = {1, 5, 16, 17, 31, 48, 63, 64, 65, 100, 130};
  const int cols_grid[] = {256, 512, 768, 1280};
  const int toks_grid[] = {1, 2, 5, 6, 7, 13};
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (int cols : cols_grid)
      for (int rows : rows_grid) {
        const KMatrix W = make(t, rows, cols, rng, pool);
        const Tensor T = W.tensor(true);
        for (int nt : toks_grid) {
          std::vector<float> x(static_cast<size_t>(nt) * cols);
          for (auto& v : x) v = nd(rng);
          const std::vector<float> xq = q8k_roundtrip(x, nt, cols);
          const int ldy = rows + 3;
          for (const Variant& var : variants()) {
            var.apply();
            std::vector<float> y(static_cast<size_t>(nt) * ldy, -7.f);
            MatmulScratch sc;
            matmul(T, x.data(), nt, y.data(), ldy, pool, sc);
            check(W, xq, nt, y, ldy, var.name());
            if (HasFatalFailure()) return;
          }
        }
      }
}

// The AVX-512 and AVX2 tiles do the scalar reference's arithmetic in the same order (exact
// integer super-block sums, the same fmas): identical floats, decode and prefill (token counts
// around both prefill tiles), every variant; and the packed product agrees with the GGUF-layout
// q8_K dot products (decode).
TEST(PackedK, KernelsEqualScalarLayoutReference) {
  if (detected_isa() < Isa::AVX2) GTEST_SKIP() << "no SIMD path on this CPU";
  PathGuard guard;
  GfniGuard gguard;
  ThreadPool pool(2);
  std::mt19937 rng(32);
  std::normal_distribution<float> nd(0, 1);
  int compared = 0;
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    const int rows = 141, cols = 256 * 7, nt = 23;
    const KMatrix W = make(t, rows, cols, rng, pool);
    std::vector<float> x(static_cast<size_t>(nt) * cols);
    for (auto& v : x) v = nd(rng);
    for (int n : {1, 2, 3, 4, 5, 9, nt}) {
      std::vector<float> ys(static_cast<size_t>(n) * rows), ya(ys.size()), yu(ys.size());
      MatmulScratch sc;
      set_isa(Isa::Scalar);
      matmul(W.tensor(true), x.data(), n, ys.data(), rows, pool, sc);
      for (const Variant& var : variants()) {
        if (var.isa == Isa::Scalar) continue;
        var.apply();
        std::fill(ya.begin(), ya.end(), -7.f);
        matmul(W.tensor(true), x.data(), n, ya.data(), rows, pool, sc);
        if (n == 1) matmul(W.tensor(false), x.data(), n, yu.data(), rows, pool, sc);
        for (size_t i = 0; i < ys.size(); ++i) {
          ASSERT_EQ(ya[i], ys[i]) << dtype_name(t) << " " << var.name() << " tokens " << n << " i " << i;
          // The GGUF-layout prefill multiplies f32 activations: compared in the grid test.
          if (n == 1) {
            ASSERT_NEAR(ya[i], yu[i], 1e-4 * (1 + std::fabs(yu[i]))) << dtype_name(t) << " " << var.name() << " i " << i;
          }
        }
        ++compared;
      }
    }
  }
  EXPECT_GE(compared, 3 * 7 * 2);  // at least AVX2 with and without VNNI, or AVX2 and AVX-512
}

// Quants at the ends of their ranges with activations at +-127 (and all one sign) over long
// rows: int32 headroom of the sub-block sums (q4_K: 16 x high nibble, up to 240 per byte; q6_K:
// 4q up to 252 plus the -128 * sum correction) and of the scaled super-block sums.
TEST(PackedK, ExtremeValuesLongRows) {
  PathGuard guard;
  GfniGuard gguard;
  ThreadPool pool(2);
  std::mt19937 rng(33);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (int pattern : {1, 2, 3}) {
      const int rows = 20, cols = 256 * 61, nt = 7;
      const KMatrix W = make(t, rows, cols, rng, pool, pattern);
      std::vector<float> x(static_cast<size_t>(nt) * cols);
      for (size_t i = 0; i < x.size(); ++i) {
        const size_t tok = i / cols;
        x[i] = tok % 2 ? ((i / 3) % 2 ? 4.f : -4.f) : (tok % 4 == 0 ? 4.f : -4.f);
      }
      const std::vector<float> xq = q8k_roundtrip(x, nt, cols);
      for (const Variant& var : variants()) {
        var.apply();
        for (int n : {1, nt}) {
          std::vector<float> y(static_cast<size_t>(n) * rows, -7.f);
          MatmulScratch sc;
          matmul(W.tensor(true), x.data(), n, y.data(), rows, pool, sc);
          check(W, xq, n, y, rows, var.name() + " pattern " + std::to_string(pattern));
          if (HasFatalFailure()) return;
        }
      }
    }
}

// Row lookup from the packed bytes (tied embeddings): the same floats as dequantize_row.
TEST(PackedK, RowLookupEqualsDequantizedRow) {
  ThreadPool pool(2);
  std::mt19937 rng(34);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (int cols : {256, 768}) {
      const int rows = 83;
      const KMatrix W = make(t, rows, cols, rng, pool);
      std::vector<float> got(cols);
      for (int r = 0; r < rows; ++r) {
        ASSERT_TRUE(packed_row_to_float(t, W.packed, rows, cols, r, got.data()));
        for (int c = 0; c < cols; ++c)
          ASSERT_EQ(got[c], W.deq[static_cast<size_t>(r) * cols + c]) << dtype_name(t) << " r " << r << " c " << c;
      }
      EXPECT_FALSE(packed_row_to_float(t, W.packed, rows, cols, rows, got.data()));
    }
}

// A whole model: loading packs the q4_K / q5_K / q6_K weights (on AVX2 and AVX-512, every variant) and
// the logits match the
// same file loaded without packing, prompt and decode. The packed prefill rounds activations
// through q8_K (as every K-quant decode step does), the GGUF-layout prefill multiplies them in
// f32: so against the unpacked model fed the prompt token by token (decode kernels, the same
// q8_K activations) the logits agree to float rounding, and against its batched prefill to the
// activation rounding (~1% of the logits here; near-ties may then swap the argmax).
TEST(PackedK, PackedModelMatchesUnpacked) {
  if (detected_isa() < Isa::AVX2) GTEST_SKIP() << "packing happens only on the AVX2 and AVX-512 paths";
  PathGuard guard;
  GfniGuard gguard;
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SynthShape s;
    s.n_embd = 256; s.n_ff = 512; s.n_layer = 2; s.n_head = 4; s.n_head_kv = 2; s.n_vocab = 320; s.n_ctx = 256;
    s.tied = t == DType::Q6_K;  // embedding rows then come from the packed output matrix
    const std::string path = ::testing::TempDir() + "larder_packed_k_" + dtype_name(t) + ".gguf";
    SynthOptions o;
    o.progress = false;
    o.dtype = t;
    o.scale = 3.0f;
    ASSERT_TRUE(synth_model(s, o, path).ok());
    for (const Variant& var : variants()) {
      if (var.isa == Isa::Scalar) continue;
      var.apply();
      SCOPED_TRACE(var.name());
      auto packed = load_model(path, "", true);
      auto plain = load_model(path, "", false);
      ASSERT_TRUE(packed.ok() && plain.ok());
      EXPECT_GT((*packed)->packed_bytes, 0u);
      EXPECT_NE((*packed)->layers[0].ffn_down.packed, nullptr);
      EXPECT_NE((*packed)->layers[1].wq.packed, nullptr);
      EXPECT_NE((*packed)->output.packed, nullptr);
      EXPECT_EQ((*plain)->packed_bytes, 0u);
      const std::vector<int32_t> prompt = {1, 17, 45, 230, 99, 3, 310, 7, 8, 150, 42};
      // [0]: packed, batched prompt; [1]: unpacked, batched; [2]: unpacked, token by token.
      std::vector<std::vector<float>> logits[3];
      for (int k = 0; k < 3; ++k) {
        ContextParams cp;
        cp.n_ctx = 64;
        cp.n_threads = 2;
        // f32 KV cache: with the default f16 one the AVX-512 path's batched prompt and token-by-token
        // logits differ beyond the 1e-5 bound below (the test is of the weights' kernels).
        cp.type_k = cp.type_v = DType::F32;
        auto c = Context::create(k == 0 ? **packed : **plain, cp);
        ASSERT_TRUE(c.ok()) << c.error();
        Context& ctx = **c;
        if (k < 2) {
          ASSERT_TRUE(ctx.decode(prompt).ok());  // prefill kernels
        } else {
          for (int32_t tok : prompt) {
            const int32_t one[1] = {tok};
            ASSERT_TRUE(ctx.decode(one).ok());
          }
        }
        logits[k].emplace_back(ctx.logits(), ctx.logits() + s.n_vocab);
        for (int32_t tok : {5, 77, 301}) {  // decode kernels
          const int32_t one[1] = {tok};
          ASSERT_TRUE(ctx.decode(one).ok());
          logits[k].emplace_back(ctx.logits(), ctx.logits() + s.n_vocab);
        }
      }
      for (int k : {1, 2}) {
        const double tol = k == 2 ? 1e-5 : 0.02;
        for (size_t i = 0; i < logits[0].size(); ++i) {
          double diff = 0, mag = 0;
          int a0 = 0, a1 = 0;
          for (int v = 0; v < s.n_vocab; ++v) {
            diff += std::fabs(logits[0][i][v] - logits[k][i][v]);
            mag += std::fabs(logits[k][i][v]);
            if (logits[0][i][v] > logits[0][i][a0]) a0 = v;
            if (logits[k][i][v] > logits[k][i][a1]) a1 = v;
          }
          EXPECT_LT(diff, tol * mag) << dtype_name(t) << (k == 2 ? " vs token by token" : " vs batched") << " step " << i;
          if (k == 2) {
            EXPECT_EQ(a0, a1) << dtype_name(t) << " vs token by token step " << i;
          }
        }
      }
    }
    std::remove(path.c_str());
  }
}
