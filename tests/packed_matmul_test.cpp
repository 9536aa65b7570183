// Panel-packed q8_0 / q4_0 / q4_1 / q5_0 weights (src/kernels/packed.cpp): matmul on the packed bytes, on
// every ISA path (AVX-512 kernels, the AVX2 kernels with each 256-bit int8 dot step this CPU runs,
// the layout's scalar reference), against a
// double-precision reference from the dequantized GGUF rows and the activations rounded
// through q8_0 -- never against the kernels themselves.
//
// Error bound: |got - ref| <= 1e-5 * sum_c |w_c * x_c| + 1e-6 per output, as for the q4_0
// kernels: the integer block sums are exact, only f32 rounding of the per-block terms remains.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kernels/kernels_internal.h"
#include "model/model.h"
#include "model/quantize.h"
#include "model/synth.h"
#include "engine/context.h"
#include "test_util.h"

using namespace larder;
using namespace larder::kernels;

using larder::testing::paths;
using larder::testing::q8_roundtrip;

namespace {

const DType kTypes[] = {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0};

// A kernel path to force: an ISA, and on AVX2 whether its int8 dot step is vpdpbusd.
struct Path {
  Isa isa;
  bool vnni;
  std::string name;
  void set() const {
    set_isa(isa);
    set_vnni256(vnni);
  }
};
// Every path this CPU runs: scalar, AVX2 (maddubs), AVX2 + VNNI (the VEX or EVEX vpdpbusd, where
// the CPU has one), AVX-512.
std::vector<Path> all_paths() {
  std::vector<Path> v;
  for (Isa isa : paths()) {
    v.push_back({isa, false, isa_name(isa)});
    if (isa == Isa::AVX2 && detected_vnni256() != Vnni256::None)
      v.push_back({isa, true, detected_vnni256() == Vnni256::Vex ? "avx2+avxvnni" : "avx2+vnni(evex)"});
  }
  return v;
}
// The paths with packed kernels (all but scalar).
std::vector<Path> fast_paths() {
  std::vector<Path> v = all_paths();
  v.erase(v.begin());
  return v;
}
// Restores the active path and the AVX2 path's dot step.
struct PathGuard {
  Isa isa = active_isa();
  Vnni256 vnni = active_vnni256();
  ~PathGuard() {
    set_isa(isa);
    set_vnni256(vnni != Vnni256::None);  // only kept on the AVX2 path
  }
};

struct QMatrix {
  DType type;
  int rows, cols;
  std::vector<uint8_t> q;      // GGUF rows
  std::vector<uint8_t> store;  // packed bytes (aligned inside)
  uint8_t* packed = nullptr;
  std::vector<float> deq;      // [rows][cols]
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

QMatrix make(DType t, int rows, int cols, std::mt19937& rng, ThreadPool& pool, int pattern = 0) {
  const size_t rb = row_bytes(t, cols);
  QMatrix m{t, rows, cols, std::vector<uint8_t>(rb * rows), {}, nullptr, std::vector<float>(static_cast<size_t>(rows) * cols)};
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> w(cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      switch (pattern) {
        case 1: w[c] = (c + r) % 2 ? 1.f : -1.f; break;  // quants at both ends of the range
        case 2: w[c] = (c % 32) / 31.f - 0.5f; break;    // every level
        case 3: w[c] = (c % 32) / 31.f + 0.5f * (r % 3); break;  // q4_1: minimums far from 0
        // One element of a block against the rest: every other quant at the top of its range
        // (q4_0 15, q5_0 31, q8_0 -127; pattern 5 for q4_1's 15).
        case 4: w[c] = c % 32 == r % 32 ? 1.f : -1.f; break;
        case 5: w[c] = c % 32 == r % 32 ? -1.f : 1.f; break;
        default: w[c] = nd(rng) * (1 + r % 3);           // rows with different scales
      }
    }
    quantize_row(t, w.data(), m.q.data() + r * rb, cols);
    dequantize_row(t, m.q.data() + r * rb, m.deq.data() + static_cast<size_t>(r) * cols, cols);
  }
  const size_t n = packed_bytes(t, rows, cols);
  EXPECT_GT(n, 0u);
  EXPECT_EQ(n % 64, 0u);
  m.store.assign(n + 64, 0xA5);  // garbage around: the packer must write every byte it owns
  m.packed = m.store.data() + (64 - reinterpret_cast<uintptr_t>(m.store.data()) % 64) % 64;
  pack_weights(t, m.q.data(), rb, rows, cols, m.packed, pool);
  return m;
}


void check(const QMatrix& W, const std::vector<float>& xq, int nt, const std::vector<float>& y, int ldy,
           const std::string& what) {
  larder::testing::check_against_reference(W.deq, W.rows, W.cols, xq, nt, y, ldy, what + " " + dtype_name(W.type));
}

}  // namespace

TEST(PackedMatmul, OnlyBlockTypesWithWholeBlocks) {
  EXPECT_GT(packed_bytes(DType::Q8_0, 64, 2048), 0u);
  EXPECT_GT(packed_bytes(DType::Q4_0, 1, 32), 0u);
  EXPECT_EQ(packed_bytes(DType::F32, 64, 2048), 0u);
  EXPECT_GT(packed_bytes(DType::Q4_1, 1, 32), 0u);
  EXPECT_GT(packed_bytes(DType::Q5_0, 1, 32), 0u);
  EXPECT_EQ(packed_bytes(DType::Q5_1, 64, 2048), 0u);
  EXPECT_EQ(packed_bytes(DType::Q8_0, 64, 48), 0u);
  EXPECT_EQ(packed_bytes(DType::Q4_1, 64, 48), 0u);
  EXPECT_EQ(packed_bytes(DType::Q5_0, 64, 16), 0u);
  // Whole 64-row groups and an even block count: the same bytes as the GGUF rows there.
  for (DType t : kTypes) {
    EXPECT_EQ(packed_bytes(t, 128, 2048), row_bytes(t, 2048) * 128) << dtype_name(t);
    EXPECT_EQ(packed_bytes(t, 64, 640), row_bytes(t, 640) * 64) << dtype_name(t);  // Gemma 3 270M's q5_0 width
  }
}

// Ragged everything: rows around the 16-row panels and 64-row groups, odd block counts (a zero
// block ends each pair record), one token (decode tiles) and counts around the 6-token tile.
TEST(PackedMatmul, GridAllPathsAgainstReference) {
  PathGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(21);
  std::normal_distribution<float> nd(0, 1);
  const int rows_grid[] = {1, 5, 16, 17, 31, 48, 63, 64, 65, 100, 130};
  const int cols_grid[] = {32, 64, 96, 160, 416};
  const int toks_grid[] = {1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 31};
  for (DType t : kTypes)
    for (int cols : cols_grid)
      for (int rows : rows_grid) {
        const QMatrix W = make(t, rows, cols, rng, pool);
        const Tensor T = W.tensor(true);
        for (int nt : toks_grid) {
          std::vector<float> x(static_cast<size_t>(nt) * cols);
          for (auto& v : x) v = nd(rng);
          const std::vector<float> xq = q8_roundtrip(x, nt, cols);
          const int ldy = rows + 3;
          for (const Path& path : all_paths()) {
            path.set();
            ASSERT_EQ(active_isa(), path.isa);
            std::vector<float> y(static_cast<size_t>(nt) * ldy, -7.f);
            MatmulScratch sc;
            matmul(T, x.data(), nt, y.data(), ldy, pool, sc);
            check(W, xq, nt, y, ldy, path.name);
            if (HasFatalFailure()) return;
          }
        }
      }
}

// The AVX-512 and AVX2 tiles do the scalar reference's arithmetic in the same order (exact
// integer block sums, one fma per block): identical floats, for decode and prefill (1..13 tokens:
// every tile width and remainder, and 23); and the packed product agrees with the GGUF-layout
// kernels within the bound.
TEST(PackedMatmul, FastPathsEqualScalarLayoutReference) {
  const std::vector<Path> fast = fast_paths();
  if (fast.empty()) GTEST_SKIP() << "no AVX2 on this CPU";
  PathGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(22);
  std::normal_distribution<float> nd(0, 1);
  for (DType t : kTypes)
    for (int cols : {32 * 27, 32 * 2, 32 * 1}) {
      const int rows = 141, nt = 23;
      const QMatrix W = make(t, rows, cols, rng, pool);
      std::vector<float> x(static_cast<size_t>(nt) * cols);
      for (auto& v : x) v = nd(rng);
      for (int n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, nt}) {
        std::vector<float> ys(static_cast<size_t>(n) * rows);
        MatmulScratch sc;
        set_isa(Isa::Scalar);
        matmul(W.tensor(true), x.data(), n, ys.data(), rows, pool, sc);
        for (const Path& path : fast) {
          path.set();
          std::vector<float> ya(ys.size(), -7.f), yu(ys.size());
          matmul(W.tensor(true), x.data(), n, ya.data(), rows, pool, sc);
          matmul(W.tensor(false), x.data(), n, yu.data(), rows, pool, sc);
          // The GGUF-layout prefill of q8_0 / q4_1 / q5_0 runs in f32 (no activation rounding):
          // compared in the grid test. (q4_1's decode rounds activations through q8_1, the same quants.)
          const bool same_inputs = n == 1 || t == DType::Q4_0;
          for (size_t i = 0; i < ys.size(); ++i) {
            ASSERT_EQ(ya[i], ys[i]) << path.name << " " << dtype_name(t) << " cols " << cols << " tokens " << n << " i " << i;
            if (same_inputs) {
              ASSERT_NEAR(ya[i], yu[i], 1e-4 * (1 + std::fabs(yu[i])))
                  << path.name << " " << dtype_name(t) << " cols " << cols << " tokens " << n << " i " << i;
            }
          }
        }
      }
    }
}

// The x4 activation rows that the packed kernels read: the AVX2 and AVX-512 quantizers write the
// scalar reference's bytes (zeros, NaN, huge and tiny values, a partial last group).
TEST(PackedMatmul, QuantizeX4SameBytesOnEveryPath) {
  std::mt19937 rng(25);
  std::normal_distribution<float> nd(0, 1);
  for (int64_t nb : {1, 2, 3, 4, 5, 7, 9, 64}) {
    std::vector<float> x(static_cast<size_t>(nb) * 32);
    for (size_t i = 0; i < x.size(); ++i) x[i] = nd(rng) * (i % 97 == 0 ? 1e6f : 1.f);
    for (int i = 32; i < 64 && i < static_cast<int>(x.size()); ++i) x[i] = 0;  // an all-zero block
    if (nb > 2) x[70] = std::nanf(""), x[71] = 1e-30f, x[72] = -3e38f;
    for (int corr : {128, 8, 16, -1}) {
      const size_t n = x4_row_bytes(nb);
      std::vector<uint8_t> rs, gs;  // 64-byte aligned inside (the AVX-512 quantizer stores aligned)
      uint8_t* ref = aligned_bytes(rs, n);
      std::memset(ref, 0x5A, n);
      quantize_x4(x.data(), ref, nb, corr, Isa::Scalar);
      for (Isa isa : paths()) {
        uint8_t* got = aligned_bytes(gs, n);
        std::memset(got, 0xA5, n);
        quantize_x4(x.data(), got, nb, corr, isa);
        ASSERT_EQ(std::vector<uint8_t>(got, got + n), std::vector<uint8_t>(ref, ref + n))
            << isa_name(isa) << " blocks " << nb << " corr " << corr;
      }
    }
  }
}

// Quants at the ends of their ranges with activations at +-127 over long rows: q8_0 stores
// q + 128 (up to 255), so a block's int32 sum reaches 32 * 255 * 127 before the correction; the
// AVX2 maddubs form adds 8 (q4_0 / q4_1) or 4 (q5_0) products of 2 quants at their maximum and
// activations at 127 of one sign in int16 (patterns 4 and 5), at most 30480 and 31496.
TEST(PackedMatmul, ExtremeValuesLongRows) {
  PathGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(23);
  for (DType t : kTypes)
    for (int pattern : {1, 2, 3, 4, 5}) {
      const int rows = 20, cols = 32 * 259, nt = 7;
      const QMatrix W = make(t, rows, cols, rng, pool, pattern);
      std::vector<float> x(static_cast<size_t>(nt) * cols);
      for (size_t i = 0; i < x.size(); ++i)  // patterns 4, 5: one sign per token
        x[i] = pattern >= 4 ? ((i / cols) % 2 ? -4.f : 4.f) : (i / 3) % 2 ? 4.f : -4.f;
      const std::vector<float> xq = q8_roundtrip(x, nt, cols);
      for (const Path& path : all_paths()) {
        path.set();
        for (int n : {1, nt}) {
          std::vector<float> y(static_cast<size_t>(n) * rows, -7.f);
          MatmulScratch sc;
          matmul(W.tensor(true), x.data(), n, y.data(), rows, pool, sc);
          check(W, xq, n, y, rows, path.name + " pattern " + std::to_string(pattern));
          if (HasFatalFailure()) return;
        }
      }
    }
}

namespace {

// Loads `path` packed and unpacked, runs a prompt (prefill kernels) and three single tokens
// (decode kernels) through both, and compares the logits. Packed prefill rounds activations to
// 8 bits where the GGUF-layout path multiplies them in f32 (q8_0, q4_1, q5_0 from 8 tokens), and
// the decode steps attend to those K/V: close, not identical. Same argmax, mean absolute
// difference under 1% of the mean absolute logit.
void expect_packed_matches_unpacked(const std::string& path, int n_vocab, const std::string& what) {
  auto packed = load_model(path, "", true);
  auto plain = load_model(path, "", false);
  ASSERT_TRUE(packed.ok() && plain.ok()) << what;
  EXPECT_GT((*packed)->packed_bytes, 0u) << what;
  EXPECT_EQ((*plain)->packed_bytes, 0u) << what;
  const std::vector<int32_t> prompt = {1, 17, 45, 230, 99, 3, 310, 7, 8, 150, 42};
  std::vector<std::vector<float>> logits[2];
  int k = 0;
  for (Model* m : {packed->get(), plain->get()}) {
    ContextParams cp;
    cp.n_ctx = 64;
    cp.n_threads = 2;
    auto c = Context::create(*m, cp);
    ASSERT_TRUE(c.ok()) << c.error();
    Context& ctx = **c;
    ASSERT_TRUE(ctx.decode(prompt).ok());  // prefill kernels
    logits[k].emplace_back(ctx.logits(), ctx.logits() + n_vocab);
    for (int32_t tok : {5, 77, 301}) {  // decode kernels
      const int32_t one[1] = {tok};
      ASSERT_TRUE(ctx.decode(one).ok());
      logits[k].emplace_back(ctx.logits(), ctx.logits() + n_vocab);
    }
    ++k;
  }
  for (size_t i = 0; i < logits[0].size(); ++i) {
    double diff = 0, mag = 0;
    int a0 = 0, a1 = 0;
    for (int v = 0; v < n_vocab; ++v) {
      diff += std::fabs(logits[0][i][v] - logits[1][i][v]);
      mag += std::fabs(logits[1][i][v]);
      if (logits[0][i][v] > logits[0][i][a0]) a0 = v;
      if (logits[1][i][v] > logits[1][i][a1]) a1 = v;
    }
    EXPECT_LT(diff, 0.01 * mag) << what << " step " << i;
    EXPECT_EQ(a0, a1) << what << " step " << i;
  }
}

SynthShape small_shape() {
  SynthShape s;
  s.n_embd = 128; s.n_ff = 256; s.n_layer = 2; s.n_head = 4; s.n_head_kv = 2; s.n_vocab = 320; s.n_ctx = 256;
  return s;
}

}  // namespace

// A whole model, on each path with packed kernels (AVX-512, AVX2, AVX2 + VNNI): loading packs the
// q8_0/q4_0/q4_1/q5_0 weights, q|k|v and gate|up run fused (64-row multiples of one type), and the
// logits match the same file loaded without packing.
TEST(PackedMatmul, PackedModelMatchesUnpacked) {
  const std::vector<Path> fast = fast_paths();
  if (fast.empty()) GTEST_SKIP() << "no AVX2 on this CPU";
  PathGuard guard;
  for (DType t : kTypes) {
    const SynthShape s = small_shape();
    const std::string file = ::testing::TempDir() + "larder_packed_" + dtype_name(t) + ".gguf";
    SynthOptions o;
    o.progress = false;
    o.dtype = t;
    o.scale = 3.0f;
    ASSERT_TRUE(synth_model(s, o, file).ok());
    for (const Path& path : fast) {
      path.set();
      SCOPED_TRACE(path.name);
      {
        auto m = load_model(file, "", true);
        ASSERT_TRUE(m.ok());
        for (const Tensor* w : {&(*m)->layers[0].wq, &(*m)->layers[0].wv, &(*m)->layers[1].ffn_up, &(*m)->layers[1].ffn_down})
          EXPECT_NE(w->packed, nullptr) << dtype_name(t);
      }
      expect_packed_matches_unpacked(file, s.n_vocab, dtype_name(t));
    }
    std::remove(file.c_str());
  }
}

// Gemma 3 270M's mix in small: `larder quantize ... Q4_K_M` of a 128-wide model gives q5_0 for the
// 128-column matrices (not a multiple of 256; layer 0's q|k|v all q5_0, so fused, layer 1's v
// q8_0, so q, k, v apart), q5_0 gate|up (fused), q4_K / q6_K down, q8_0 output: packed wherever
// the path has packed kernels for the type (all of them on AVX-512), logits as unpacked.
TEST(PackedMatmul, PackedQ4KMMixMatchesUnpacked) {
  const std::vector<Path> fast = fast_paths();
  if (fast.empty()) GTEST_SKIP() << "no AVX2 on this CPU";
  PathGuard guard;
  const SynthShape s = small_shape();
  const std::string f32 = ::testing::TempDir() + "larder_packed_mix_f32.gguf";
  const std::string q = ::testing::TempDir() + "larder_packed_mix_q4km.gguf";
  SynthOptions o;
  o.progress = false;
  o.dtype = DType::F32;
  o.scale = 3.0f;
  ASSERT_TRUE(synth_model(s, o, f32).ok());
  auto ft = parse_quant_file_type("Q4_K_M");
  ASSERT_TRUE(ft.ok());
  ASSERT_TRUE(quantize_gguf(f32, q, *ft).ok());
  for (const Path& path : fast) {
    path.set();
    SCOPED_TRACE(path.name);
    auto m = load_model(q, "", true);
    ASSERT_TRUE(m.ok());
    const Model& mm = **m;
    EXPECT_EQ(mm.layers[0].wq.type, DType::Q5_0);
    EXPECT_EQ(mm.layers[0].wv.type, DType::Q5_0);
    EXPECT_EQ(mm.layers[1].wv.type, DType::Q8_0);
    EXPECT_EQ(mm.layers[1].ffn_gate.type, DType::Q5_0);
    EXPECT_EQ(mm.layers[0].ffn_down.type, DType::Q4_K);
    for (const auto& l : mm.layers)
      for (const Tensor* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down}) {
        const bool fast_kernels = packed_kernels(w->type, path.isa);
        EXPECT_TRUE(fast_kernels || (path.isa == Isa::AVX2 && packed_k_type(w->type))) << dtype_name(w->type);
        EXPECT_EQ(w->packed != nullptr, fast_kernels) << dtype_name(w->type);
      }
    expect_packed_matches_unpacked(q, s.n_vocab, "Q4_K_M mix");
  }
  std::remove(f32.c_str());
  std::remove(q.c_str());
}

// Embedding lookups of a tied output matrix read rows back from the packed bytes: the same
// floats as dequantizing the GGUF row, for every row of a ragged matrix.
TEST(PackedMatmul, RowLookupEqualsDequantizedRow) {
  ThreadPool pool(2);
  std::mt19937 rng(24);
  for (DType t : kTypes) {
    const int rows = 83, cols = 32 * 7;
    const QMatrix W = make(t, rows, cols, rng, pool);
    std::vector<float> got(cols);
    for (int r = 0; r < rows; ++r) {
      ASSERT_TRUE(packed_row_to_float(t, W.packed, rows, cols, r, got.data()));
      for (int c = 0; c < cols; ++c) ASSERT_EQ(got[c], W.deq[static_cast<size_t>(r) * cols + c]) << dtype_name(t) << " r " << r << " c " << c;
    }
    EXPECT_FALSE(packed_row_to_float(t, W.packed, rows, cols, rows, got.data()));
  }
}
