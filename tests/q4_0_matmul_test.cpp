// q4_0 whole-matmul kernels (src/kernels/q4_0.cpp): decode (< kGemmMinTokens tokens) and the
// integer prefill GEMM, on every ISA path, against a double-precision reference built from the
// dequantized weights and the activations rounded through q8_0 (the format the kernels consume).
//
// Error bound: |got - ref| <= 1e-5 * sum_c |w_c * x_c| + 1e-6 per output. The kernels' integer
// dot products are exact, so the only error is f32 rounding of the per-block scale products and
// of the running sum (~K/32 terms), far below this bound; an activation quantized one step off
// anywhere, or a block, row or token mixed up, is far above it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "test_util.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/model.h"

using namespace larder;
using namespace larder::kernels;

using larder::testing::IsaGuard;
using larder::testing::paths;
using larder::testing::q8_roundtrip;

namespace {


struct Q4Matrix {
  int rows, cols;
  std::vector<uint8_t> q;
  std::vector<float> deq;  // [rows][cols]
  Tensor tensor() {
    Tensor W;
    W.type = DType::Q4_0;
    W.ne[0] = cols;
    W.ne[1] = rows;
    W.data = q.data();
    W.nbytes = q.size();
    return W;
  }
};

Q4Matrix make_weights(int rows, int cols, std::mt19937& rng, int pattern = 0) {
  Q4Matrix m{rows, cols, std::vector<uint8_t>(row_bytes(DType::Q4_0, cols) * rows), std::vector<float>(static_cast<size_t>(rows) * cols)};
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> w(cols);
  const size_t rb = row_bytes(DType::Q4_0, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      switch (pattern) {
        case 1: w[c] = (c + r) % 2 ? 1.f : -1.f; break;  // quants at both ends (-8 and 7 or 8->clamped)
        case 2: w[c] = (c % 32) / 31.f - 0.5f; break;    // every quant level
        case 3: w[c] = c % 32 ? 0.9f : -1.f; break;       // quant 15 everywhere but the block's first
        default: w[c] = nd(rng) * (1 + r % 3);           // rows with different scales
      }
    }
    quantize_row(DType::Q4_0, w.data(), m.q.data() + r * rb, cols);
    dequantize_row(DType::Q4_0, m.q.data() + r * rb, m.deq.data() + static_cast<size_t>(r) * cols, cols);
  }
  return m;
}


// Checks y (stride ldy) against the reference; columns rows..ldy must still hold the sentinel.
void check(const Q4Matrix& W, const std::vector<float>& xq, int nt, const std::vector<float>& y, int ldy,
           const std::string& what) {
  larder::testing::check_against_reference(W.deq, W.rows, W.cols, xq, nt, y, ldy, what);
}

}  // namespace

// Q4_0 takes activations as q8_0 for every batch size on the paths with its own matmul.
TEST(Q4_0Matmul, ActivationFormat) {
  for (Isa isa : paths())
    for (int64_t n : {1, 7, 8, 512}) {
      const DType at = matmul_activation_type(DType::Q4_0, n, isa);
      if (type_traits(DType::Q4_0)->matmul[static_cast<int>(isa)] || n < kGemmMinTokens)
        EXPECT_EQ(at, DType::Q8_0) << isa_name(isa) << " " << n;
      else
        EXPECT_EQ(at, DType::F32) << isa_name(isa) << " " << n;
    }
  EXPECT_NE(type_traits(DType::Q4_0)->matmul[static_cast<int>(Isa::Scalar)], nullptr);
  EXPECT_NE(type_traits(DType::Q4_0)->matmul[static_cast<int>(Isa::AVX512)], nullptr);
}

// Ragged everything: rows around the 8/16-row vectors and 32-row panels of the prefill kernels,
// columns with 1..4 blocks in the last group of 4, one token (decode kernel) and token counts
// around the 6-token (AVX-512) and 2-token (AVX2) tiles.
TEST(Q4_0Matmul, GridAllPathsAgainstReference) {
  IsaGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0, 1);
  const int rows_grid[] = {1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 47, 70};
  const int cols_grid[] = {32, 64, 96, 128, 160, 224, 416};
  const int toks_grid[] = {1, 2, 3, 7, 8, 9, 12, 13, 19};
  for (int cols : cols_grid)
    for (int rows : rows_grid) {
      Q4Matrix W = make_weights(rows, cols, rng);
      Tensor T = W.tensor();
      for (int nt : toks_grid) {
        std::vector<float> x(static_cast<size_t>(nt) * cols);
        for (auto& v : x) v = nd(rng);
        const std::vector<float> xq = q8_roundtrip(x, nt, cols);
        const int ldy = rows + 3;
        for (Isa isa : paths()) {
          set_isa(isa);
          if (matmul_activation_type(DType::Q4_0, nt, isa) != DType::Q8_0) continue;  // generic f32 path: kernels_test
          std::vector<float> y(static_cast<size_t>(nt) * ldy, -7.f);
          MatmulScratch sc;
          matmul(T, x.data(), nt, y.data(), ldy, pool, sc);
          check(W, xq, nt, y, ldy, isa_name(isa));
          if (HasFatalFailure()) return;
        }
      }
    }
}

// Prefill and decode of the same tokens compute the same integer sums; only the f32 order of the
// per-block terms differs. Also: each path agrees with the scalar one far inside the bound above.
TEST(Q4_0Matmul, PrefillMatchesDecodeAndScalar) {
  IsaGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0, 1);
  const int rows = 77, cols = 32 * 27, nt = 23;
  Q4Matrix W = make_weights(rows, cols, rng);
  Tensor T = W.tensor();
  std::vector<float> x(static_cast<size_t>(nt) * cols);
  for (auto& v : x) v = nd(rng);
  std::vector<float> ys;
  for (Isa isa : paths()) {
    set_isa(isa);
    if (matmul_activation_type(DType::Q4_0, nt, isa) != DType::Q8_0) continue;
    MatmulScratch sc;
    std::vector<float> yp(static_cast<size_t>(nt) * rows), yd(rows);
    matmul(T, x.data(), nt, yp.data(), rows, pool, sc);
    if (ys.empty()) ys = yp;  // scalar first
    for (int t = 0; t < nt; ++t) {
      matmul(T, &x[static_cast<size_t>(t) * cols], 1, yd.data(), rows, pool, sc);
      for (int r = 0; r < rows; ++r) {
        double mag = 0;
        for (int c = 0; c < cols; ++c) mag += std::fabs(W.deq[static_cast<size_t>(r) * cols + c] * x[static_cast<size_t>(t) * cols + c]);
        const float p = yp[static_cast<size_t>(t) * rows + r];
        ASSERT_LE(std::fabs(p - yd[r]), 2e-6 * mag) << isa_name(isa) << " t " << t << " r " << r;
        ASSERT_LE(std::fabs(p - ys[static_cast<size_t>(t) * rows + r]), 2e-6 * mag) << isa_name(isa) << " t " << t << " r " << r;
      }
    }
  }
}

// Quants at the ends of their ranges, activations at +-127 and long rows (the int32 block sums
// stay far from overflow: |sum| <= 32 * 15 * 127 per block, converted to f32 per block; the
// AVX2 path adds 16 products of at most 15 * 127 in i16 lanes: 30480 < 32767).
TEST(Q4_0Matmul, ExtremeValuesLongRows) {
  IsaGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(13);
  for (int pattern : {1, 2, 3}) {
    const int rows = 20, cols = 32 * 259, nt = 9;
    Q4Matrix W = make_weights(rows, cols, rng, pattern);
    Tensor T = W.tensor();
    std::vector<float> x(static_cast<size_t>(nt) * cols);
    // pattern 3: 15 * 127 in (nearly) every product, the most the AVX2 path's i16 sums meet
    for (size_t i = 0; i < x.size(); ++i) x[i] = pattern == 3 || (i / 3) % 2 ? 4.f : -4.f;
    const std::vector<float> xq = q8_roundtrip(x, nt, cols);
    for (Isa isa : paths()) {
      set_isa(isa);
      for (int n : {1, nt}) {
        if (matmul_activation_type(DType::Q4_0, n, isa) != DType::Q8_0) continue;
        std::vector<float> y(static_cast<size_t>(n) * rows, -7.f);
        MatmulScratch sc;
        matmul(T, x.data(), n, y.data(), rows, pool, sc);
        check(W, xq, n, y, rows, std::string(isa_name(isa)) + " pattern " + std::to_string(pattern));
      }
    }
  }
}

// One scratch reused across shapes (larger, smaller, ragged) and thread counts: nothing stale from
// an earlier call leaks into a later one (the zero padding of a ragged last group in particular).
TEST(Q4_0Matmul, ScratchReuseAcrossShapesAndThreads) {
  IsaGuard guard;
  std::mt19937 rng(14);
  std::normal_distribution<float> nd(0, 1);
  struct Case {
    int rows, cols, nt;
  } cases[] = {{64, 32 * 12, 20}, {17, 32 * 5, 9}, {40, 32 * 3, 2}, {33, 32 * 7, 14}, {5, 32 * 13, 1}};
  for (Isa isa : paths()) {
    set_isa(isa);
    for (int threads : {1, 3}) {
      ThreadPool pool(threads);
      MatmulScratch sc;
      for (const Case& c : cases) {
        Q4Matrix W = make_weights(c.rows, c.cols, rng);
        Tensor T = W.tensor();
        if (matmul_activation_type(DType::Q4_0, c.nt, isa) != DType::Q8_0) continue;
        std::vector<float> x(static_cast<size_t>(c.nt) * c.cols);
        for (auto& v : x) v = nd(rng);
        std::vector<float> y(static_cast<size_t>(c.nt) * c.rows, -7.f);
        matmul(T, x.data(), c.nt, y.data(), c.rows, pool, sc);
        check(W, q8_roundtrip(x, c.nt, c.cols), c.nt, y, c.rows, std::string(isa_name(isa)) + " threads " + std::to_string(threads));
      }
    }
  }
}

// Rows whose activations are all zero (and a zero weight row) give exact zeros, not NaN.
TEST(Q4_0Matmul, ZeroBlocks) {
  IsaGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(15);
  const int rows = 18, cols = 32 * 6, nt = 10;
  Q4Matrix W = make_weights(rows, cols, rng);
  std::fill(W.q.begin(), W.q.begin() + row_bytes(DType::Q4_0, cols), 0);  // row 0: d = 0
  Tensor T = W.tensor();
  std::vector<float> x(static_cast<size_t>(nt) * cols, 0.f);
  for (int c = 0; c < cols; ++c) x[static_cast<size_t>(nt - 1) * cols + c] = c % 64 < 32 ? 0.f : 1.f;  // last token: zero blocks
  for (Isa isa : paths()) {
    set_isa(isa);
    for (int n : {1, nt}) {
      std::vector<float> y(static_cast<size_t>(n) * rows, -7.f);
      MatmulScratch sc;
      matmul(T, n == 1 ? &x[static_cast<size_t>(nt - 1) * cols] : x.data(), n, y.data(), rows, pool, sc);
      for (int t = 0; t + 1 < n; ++t)
        for (int r = 0; r < rows; ++r) ASSERT_EQ(y[static_cast<size_t>(t) * rows + r], 0.f) << isa_name(isa);
      EXPECT_EQ(y[static_cast<size_t>(n - 1) * rows], 0.f) << isa_name(isa);
      for (int r = 1; r < rows; ++r) EXPECT_TRUE(std::isfinite(y[static_cast<size_t>(n - 1) * rows + r])) << isa_name(isa);
    }
  }
}

// The SIMD q4_0 dequantizer (generic prefill path, embeddings) and q8_0 activation quantizer
// give the scalar reference's bits on every path, for random block bytes and awkward inputs.
TEST(Q4_0Matmul, DequantizeAndQ8QuantizeSameBitsOnEveryPath) {
  IsaGuard guard;
  std::mt19937 rng(16);
  const int n = 32 * 37;
  std::vector<uint8_t> q(row_bytes(DType::Q4_0, n));
  for (auto& b : q) b = static_cast<uint8_t>(rng());
  for (size_t k = 0; k < q.size(); k += 18) q[k + 1] &= 0x7b;  // finite f16 scales (random otherwise)
  std::vector<float> ref(n), got(n);
  set_isa(Isa::Scalar);
  dequantize_row(DType::Q4_0, q.data(), ref.data(), n);
  for (Isa isa : paths()) {
    set_isa(isa);
    dequantize_row(DType::Q4_0, q.data(), got.data(), n);
    EXPECT_EQ(std::memcmp(ref.data(), got.data(), n * 4), 0) << isa_name(isa);
  }
  std::normal_distribution<float> nd(0, 1);
  for (int kind = 0; kind < 5; ++kind) {
    std::vector<float> x(n);
    for (int i = 0; i < n; ++i) {
      x[i] = nd(rng);
      if (kind == 1) x[i] *= 1e-30f;                                  // subnormal scales
      if (kind == 2) x[i] = std::round(x[i] * 127) / 127 * 3;         // exact ties of x * id
      if (kind == 3 && i % 50 == 0) x[i] = i % 100 ? INFINITY : NAN;  // non-finite in some blocks
      if (kind == 4 && (i / 32) % 3 == 0) x[i] = 0.f;                 // zero blocks
    }
    std::vector<uint8_t> qr(row_bytes(DType::Q8_0, n)), qg(qr.size());
    set_isa(Isa::Scalar);
    quantize_row(DType::Q8_0, x.data(), qr.data(), n);
    for (Isa isa : paths()) {
      set_isa(isa);
      quantize_row(DType::Q8_0, x.data(), qg.data(), n);
      EXPECT_EQ(std::memcmp(qr.data(), qg.data(), qr.size()), 0) << isa_name(isa) << " kind " << kind;
    }
  }
}
