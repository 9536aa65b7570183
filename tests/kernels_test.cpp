// Every kernel path (scalar, AVX2, AVX-512) against a plain double-precision
// reference over a grid of shapes, including ragged edges.
#include <gtest/gtest.h>
#include <immintrin.h>

#include <cmath>
#include <random>
#include <thread>
#include <cstring>

#include "test_util.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/model.h"

using namespace larder;
using namespace larder::kernels;

using larder::testing::IsaGuard;
using larder::testing::paths;

namespace {


__attribute__((target("f16c"))) float hw_h2f(uint16_t h) { return _cvtsh_ss(h); }
__attribute__((target("f16c"))) uint16_t hw_f2h(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// Random weights [rows][cols] stored in type t, as a Tensor, and random activations [nt][cols].
struct RandomProduct {
  std::vector<uint8_t> wq;
  std::vector<float> x;
  Tensor W;
  RandomProduct(DType t, int rows, int cols, int nt, std::mt19937& rng, std::normal_distribution<float>& nd) {
    std::vector<float> wf(static_cast<size_t>(rows) * cols);
    x.resize(static_cast<size_t>(nt) * cols);
    for (auto& v : wf) v = nd(rng);
    for (auto& v : x) v = nd(rng);
    wq.resize(row_bytes(t, cols) * rows);
    for (int r = 0; r < rows; ++r) quantize_row(t, &wf[static_cast<size_t>(r) * cols], wq.data() + r * row_bytes(t, cols), cols);
    W.type = t;
    W.ne[0] = cols;
    W.ne[1] = rows;
    W.data = wq.data();
    W.nbytes = wq.size();
  }
};

}  // namespace

TEST(Kernels, Fp16ConversionMatchesHardware) {
  if (detected_isa() < Isa::AVX2) GTEST_SKIP() << "no F16C on this CPU";
  for (uint32_t h = 0; h < 65536; ++h) {
    float a = fp16_to_fp32(static_cast<uint16_t>(h)), b = hw_h2f(static_cast<uint16_t>(h));
    if (std::isnan(b)) ASSERT_TRUE(std::isnan(a)) << h;
    else ASSERT_EQ(std::memcmp(&a, &b, 4), 0) << "half " << h;
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp32_to_fp16(f), hw_f2h(f)) << f;
  }
}

TEST(Kernels, Bf16RoundTrip) {
  for (float f : {0.f, 1.f, -2.5f, 3.14159f, 1e-30f, 65504.f}) {
    float g = bf16_to_fp32(fp32_to_bf16(f));
    EXPECT_LE(std::fabs(f - g), std::fabs(f) / 128) << f;
  }
  EXPECT_EQ(fp32_to_bf16(1.0f + 1.0f / 256), 0x3f80);  // tie rounds to even
}

TEST(Kernels, QuantizeDequantizeError) {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> x(1024), y(1024);
  for (auto& v : x) v = nd(rng);
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::F16, DType::BF16}) {
    std::vector<uint8_t> q(row_bytes(t, 1024));
    quantize_row(t, x.data(), q.data(), 1024);
    dequantize_row(t, q.data(), y.data(), 1024);
    double err = 0, norm = 0;
    for (int i = 0; i < 1024; ++i) {
      err += (x[i] - y[i]) * (x[i] - y[i]);
      norm += x[i] * x[i];
    }
    double rel = std::sqrt(err / norm);
    double bound = t == DType::Q4_0 ? 0.12 : t == DType::Q8_0 ? 0.01 : t == DType::BF16 ? 0.005 : 0.001;
    EXPECT_LT(rel, bound) << dtype_name(t);
  }
}

// Every weight type the engine has kernels for (new formats join automatically).
std::vector<DType> kernel_types() {
  std::vector<DType> v;
  for (uint32_t id = 0; id < 64; ++id)
    if (dtype_info(id) && type_traits(static_cast<DType>(id)) && type_traits(static_cast<DType>(id))->from_float)
      v.push_back(static_cast<DType>(id));
  return v;
}

TEST(Kernels, MatmulAllPathsAllTypes) {
  IsaGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 1);
  const int rows_grid[] = {1, 3, 16, 17, 37, 70};
  // Below kGemmMinTokens: dot products on converted activations; from it on: f32 GEMM tiles,
  // except for types with their own matmul (matmul_activation_type says which format).
  const int toks_grid[] = {1, 2, 5, static_cast<int>(kGemmMinTokens), 13, 23};
  ASSERT_GE(kernel_types().size(), 5u);
  for (Isa isa : paths()) {
    set_isa(isa);
    for (DType t : kernel_types()) {
      const int bs = dtype_info(t)->block_size;
      std::vector<int> cols_grid;
      if (bs == 1) cols_grid = {1, 7, 16, 17, 33, 64, 172, 288};
      else for (int m : {1, 2, 3, 9, 43}) cols_grid.push_back(m * bs);
      for (int rows : rows_grid)
        for (int cols : cols_grid)
          for (int nt : toks_grid) {
            RandomProduct p(t, rows, cols, nt, rng, nd);
            const Tensor& W = p.W;
            const std::vector<float>& x = p.x;
            const std::vector<uint8_t>& wq = p.wq;
            std::vector<float> y(static_cast<size_t>(nt) * rows);
            MatmulScratch sc;
            matmul(W, x.data(), nt, y.data(), rows, pool, sc);
            // Reference: dequantized weights times the activations as the kernel contract
            // says they are consumed (converted to the type's activation format and back).
            const DType at = matmul_activation_type(t, nt, isa);
            std::vector<float> wd(cols), xd(cols);
            std::vector<uint8_t> xq(row_bytes(at, cols));
            for (int tk = 0; tk < nt; ++tk) {
              const float* xt = &x[static_cast<size_t>(tk) * cols];
              if (at != DType::F32) {
                quantize_row(at, xt, xq.data(), cols);
                dequantize_row(at, xq.data(), xd.data(), cols);
              } else {
                std::copy(xt, xt + cols, xd.begin());
              }
              for (int r = 0; r < rows; ++r) {
                dequantize_row(t, wq.data() + r * row_bytes(t, cols), wd.data(), cols);
                double ref = 0, mag = 0;
                for (int c = 0; c < cols; ++c) {
                  ref += static_cast<double>(wd[c]) * xd[c];
                  mag += std::fabs(static_cast<double>(wd[c]) * xd[c]);
                }
                double got = y[static_cast<size_t>(tk) * rows + r];
                ASSERT_LE(std::fabs(got - ref), 1e-5 * mag + 1e-6)
                    << isa_name(isa) << " " << dtype_name(t) << " rows " << rows << " cols " << cols << " tok " << tk;
              }
            }
          }
    }
  }
}

// Batch invariance of f32 / f16 / bf16 weights on the SIMD paths: a token's products are bit
// for bit the same through the dot products (decode, fewer than kGemmMinTokens tokens) and the
// GEMM tiles (prefill), whatever the token's place in the batch: one summation order (gemm.cpp).
// Rows with K % 16 and K % 8 tails and longer than 1024 (the tiles used to cut those into
// slices of 512; the dot products kept two chains for f32 and added the AVX2 tail one by one).
TEST(Kernels, DotProductsRoundAsTheGemmTiles) {
  IsaGuard guard;
  ThreadPool pool(2);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0, 1);
  for (Isa isa : paths()) {
    if (isa == Isa::Scalar) continue;  // (its dot products and tiles sum in different orders)
    set_isa(isa);
    for (DType t : {DType::F32, DType::F16, DType::BF16}) {
      for (int cols : {5, 16, 43, 172, 1100, 2053}) {
        const int rows = 21, nt = 13;
        const RandomProduct p(t, rows, cols, nt, rng, nd);
        const std::vector<float>& x = p.x;
        MatmulScratch sc;
        std::vector<float> all(static_cast<size_t>(nt) * rows);
        matmul(p.W, x.data(), nt, all.data(), rows, pool, sc);  // the tiles
        for (int n : {1, 2, 7}) {  // the dot products, from each token on
          for (int t0 = 0; t0 + n <= nt; t0 += n) {
            std::vector<float> part(static_cast<size_t>(n) * rows);
            matmul(p.W, &x[static_cast<size_t>(t0) * cols], n, part.data(), rows, pool, sc);
            ASSERT_EQ(std::memcmp(part.data(), &all[static_cast<size_t>(t0) * rows], part.size() * sizeof(float)), 0)
                << isa_name(isa) << " " << dtype_name(t) << " cols " << cols << ": tokens " << t0 << ".." << t0 + n - 1
                << " in a batch of " << n << " vs " << nt;
          }
        }
      }
    }
  }
}

TEST(Kernels, DotAndAxpyRaggedAllPaths) {
  IsaGuard guard;
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0, 1);
  for (Isa isa : paths()) {
    set_isa(isa);
    for (int n : {1, 2, 7, 8, 15, 16, 17, 31, 33, 64, 100}) {
      std::vector<float> a(n), b(n), y(n), y0;
      for (int i = 0; i < n; ++i) {
        a[i] = nd(rng);
        b[i] = nd(rng);
        y[i] = nd(rng);
      }
      double ref = 0, mag = 0;
      for (int i = 0; i < n; ++i) {
        ref += static_cast<double>(a[i]) * b[i];
        mag += std::fabs(static_cast<double>(a[i]) * b[i]);
      }
      EXPECT_LE(std::fabs(dot_f32(a.data(), b.data(), n) - ref), 1e-5 * mag) << isa_name(isa) << " n " << n;
      y0 = y;
      axpy(y.data(), a.data(), 0.5f, n);
      for (int i = 0; i < n; ++i) EXPECT_NEAR(y[i], y0[i] + 0.5 * a[i], 1e-5 * (1 + std::fabs(y0[i]))) << n;
    }
  }
}

// axpy_row (the sparse FFN's fused dequantize-and-accumulate) against dequantize_row + a double
// accumulation, every path, every weight type, several lengths.
TEST(Kernels, AxpyRowAllPathsAllTypes) {
  IsaGuard guard;
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0, 1);
  for (Isa isa : paths()) {
    set_isa(isa);
    for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q4_K,
                    DType::Q6_K}) {
      const int bs = dtype_info(t)->block_size;
      for (int blocks : {1, 2, 3, 8}) {
        const int n = blocks * std::max(bs, 32);
        std::vector<float> w(n), y(n), y0, deq(n);
        for (auto& v : w) v = nd(rng);
        for (auto& v : y) v = nd(rng);
        std::vector<uint8_t> row(row_bytes(t, n));
        quantize_row(t, w.data(), row.data(), n);
        dequantize_row(t, row.data(), deq.data(), n);
        y0 = y;
        const float a = -0.37f;
        axpy_row(t, row.data(), a, y.data(), n);
        for (int i = 0; i < n; ++i)
          ASSERT_NEAR(y[i], y0[i] + static_cast<double>(a) * deq[i], 1e-5 * (1 + std::fabs(y0[i]) + std::fabs(deq[i])))
              << isa_name(isa) << " " << dtype_name(t) << " n " << n << " i " << i;
      }
    }
  }
}

TEST(Kernels, RmsnormSoftmaxSwiglu) {
  std::vector<float> x = {1, -2, 3, -4}, w = {1, 1, 2, 0.5f}, out(4);
  rmsnorm(out.data(), x.data(), w.data(), 4, 1e-5f);
  double rms = std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-5);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], x[i] / rms * w[i], 1e-6);
  std::vector<float> s = {1000, 1001, 999};
  softmax(s.data(), 3);
  EXPECT_NEAR(s[0] + s[1] + s[2], 1.0, 1e-6);
  EXPECT_GT(s[1], s[0]);
  float g[2] = {0.5f, -1.f}, u[2] = {2.f, 3.f}, o[2];
  swiglu(o, g, u, 2);
  EXPECT_NEAR(o[0], 0.5 / (1 + std::exp(-0.5)) * 2, 1e-6);
  EXPECT_NEAR(o[1], -1.0 / (1 + std::exp(1.0)) * 3, 1e-6);
}

TEST(ThreadPoolTest, RunsEveryIndexOnce) {
  ThreadPool pool(2);
  for (int n : {0, 1, 2, 3, 100, 1001}) {
    std::vector<std::atomic<int>> hit(n);
    pool.parallel_for(n, [&](int64_t b, int64_t e, int tid) {
      ASSERT_TRUE(tid >= 0 && tid < 2);
      for (int64_t i = b; i < e; ++i) hit[i]++;
    });
    for (int i = 0; i < n; ++i) ASSERT_EQ(hit[i].load(), 1);
  }
}

TEST(ThreadPoolTest, ManySmallJobsBackToBackAndAfterIdle) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  for (int j = 0; j < 20000; ++j)
    pool.parallel_for(7, [&](int64_t b, int64_t e, int) { sum += e - b; });
  EXPECT_EQ(sum.load(), 7 * 20000);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // workers go to sleep
  pool.parallel_for(1000, [&](int64_t b, int64_t e, int) { sum += e - b; });
  EXPECT_EQ(sum.load(), 7 * 20000 + 1000);
}

// f32 prefill of a matrix large enough for oneDNN's sgemm, through oneDNN (when libdnnl.so.2 loads)
// and through the own tiles, with ragged row split and token counts, against the double reference.
TEST(Kernels, LargeF32PrefillAgainstReference) {
  IsaGuard guard;
  set_isa(Isa::AVX512);  // clamps to what the CPU has
  ThreadPool pool(2);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 1);
  const int rows = 2056, cols = 2048;  // rows: not a multiple of the 16-row split
  std::vector<float> w(static_cast<size_t>(rows) * cols);
  for (auto& v : w) v = nd(rng);
  Tensor W;
  W.type = DType::F32;
  W.ne[0] = cols;
  W.ne[1] = rows;
  W.data = w.data();
  W.nbytes = w.size() * 4;
  struct OnednnGuard {
    bool saved = set_onednn(true);
    ~OnednnGuard() { set_onednn(saved); }
  } og;
  for (bool onednn : {true, false}) {
    set_onednn(onednn);
    if (onednn && !matmul_uses_onednn(DType::F32, rows, cols, 9, active_isa()))
      std::printf("note: oneDNN not loadable here (not installed or no AVX-512): own tiles checked twice\n");
    if (!onednn) {
      EXPECT_FALSE(matmul_uses_onednn(DType::F32, rows, cols, 9, active_isa()));
    }
    for (int nt : {8, 9, 37}) {
      std::vector<float> x(static_cast<size_t>(nt) * cols);
      for (auto& v : x) v = nd(rng);
      const int ldy = rows + 5;
      std::vector<float> y(static_cast<size_t>(nt) * ldy, -7.f);
      MatmulScratch sc;
      matmul(W, x.data(), nt, y.data(), ldy, pool, sc);
      for (int t = 0; t < nt; ++t) {
        std::vector<int> check_rows;  // every 13th row, a run at each multiple of 97, and the last
        for (int r = 0; r < rows; r += (r % 97 == 0 ? 1 : 13)) check_rows.push_back(r);
        check_rows.push_back(rows - 1);
        for (int r : check_rows) {
          double ref = 0, mag = 0;
          for (int c = 0; c < cols; ++c) {
            const double p = static_cast<double>(w[static_cast<size_t>(r) * cols + c]) * x[static_cast<size_t>(t) * cols + c];
            ref += p;
            mag += std::fabs(p);
          }
          ASSERT_LE(std::fabs(y[static_cast<size_t>(t) * ldy + r] - ref), 1e-5 * mag + 1e-6) << "tokens " << nt << " t " << t << " r " << r;
        }
        for (int r = rows; r < ldy; ++r) ASSERT_EQ(y[static_cast<size_t>(t) * ldy + r], -7.f) << "wrote past rows";
      }
    }
  }
}
