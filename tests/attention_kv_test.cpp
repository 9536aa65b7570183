// Attention kernels over a typed KV cache (kernels/attention_kv.h): every path (scalar, AVX2,
// AVX-512) against a plain double reference over ragged shapes, and the row conversions.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention_kv.h"
#include "test_util.h"

namespace larder {
namespace {

using kernels::Isa;

const DType kTypes[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0};

// Rows [n][hd] of random values stored in type t at a byte stride of ld (>= the row's bytes;
// the gap is filled with garbage so a kernel reading past a row changes the result), and
// their exact values as the cache holds them.
struct Rows {
  std::vector<uint8_t> bytes;
  std::vector<float> values;  // [n][hd], what the cache holds (dequantized)
  int64_t ld = 0;
};

Rows make_rows(DType t, int n, int hd, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Rows r;
  const size_t rb = kernels::kv_row_bytes(t, hd);
  r.ld = static_cast<int64_t>(rb) + 40;  // e.g. the other heads of a row
  r.bytes.resize(static_cast<size_t>(r.ld) * n + 64);
  for (auto& b : r.bytes) b = static_cast<uint8_t>(rng() & 0x7f);  // finite garbage in any type
  r.values.resize(static_cast<size_t>(n) * hd);
  std::vector<float> src(hd);
  for (int i = 0; i < n; ++i) {
    for (int k = 0; k < hd; ++k) src[k] = nd(rng) * (k % 7 == 0 ? 4.f : 1.f);
    kernels::kv_from_float(t, src.data(), r.bytes.data() + i * r.ld, hd, Isa::Scalar);
    kernels::kv_to_float(t, r.bytes.data() + i * r.ld, &r.values[static_cast<size_t>(i) * hd], hd);
  }
  return r;
}

std::vector<int> head_dims(DType t) {
  if (t == DType::Q8_0) return {32, 64, 96, 128, 160, 256};
  return {8, 12, 16, 20, 24, 32, 40, 48, 64, 72, 80, 96, 100, 112, 128, 160, 200, 256};
}

// Every product is exact in double; f32 accumulation of n terms errs by at most (n+1)u of the sum
// of magnitudes (u = 2^-24), whatever the order.
double bound(int n_terms, double mag) { return (n_terms + 2) * std::ldexp(1.0, -24) * mag + 1e-30; }

TEST(AttentionKv, ScoresAllPathsAllTypesRaggedShapes) {
  testing::IsaGuard guard;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> ud(-1.f, 1.f);
  const int row_counts[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 17, 33, 100};
  const int queries[] = {1, 2, 3, 4, 5, 6, 7, 11, 12};
  int64_t checked = 0;
  for (DType t : kTypes)
    for (int hd : head_dims(t))
      for (int rows : row_counts) {
        Rows K = make_rows(t, rows, hd, rng);
        for (int nt : queries) {
          const int ldq = hd + 3, ldy = rows + 5;
          std::vector<float> q(static_cast<size_t>(nt) * ldq);
          for (auto& v : q) v = ud(rng);
          for (Isa isa : testing::paths()) {
            std::vector<float> y(static_cast<size_t>(nt) * ldy, -7.f);
            kernels::attn_scores(t, K.bytes.data(), K.ld, rows, q.data(), ldq, nt, hd, y.data(), ldy, isa);
            for (int ti = 0; ti < nt; ++ti) {
              for (int r = 0; r < rows; ++r) {
                double ref = 0, mag = 0;
                for (int k = 0; k < hd; ++k) {
                  const double p = static_cast<double>(K.values[static_cast<size_t>(r) * hd + k]) * q[ti * ldq + k];
                  ref += p;
                  mag += std::fabs(p);
                }
                const double got = y[static_cast<size_t>(ti) * ldy + r];
                ASSERT_LE(std::fabs(got - ref), bound(hd, mag))
                    << dtype_name(t) << " " << kernels::isa_name(isa) << " hd " << hd << " rows " << rows << " nt "
                    << nt << " at (" << ti << "," << r << ")";
                ++checked;
              }
              for (int r = rows; r < ldy; ++r) ASSERT_EQ(y[static_cast<size_t>(ti) * ldy + r], -7.f) << "wrote past rows";
            }
          }
        }
      }
  EXPECT_GT(checked, 100000);
}

TEST(AttentionKv, PvAllPathsAllTypesRaggedShapes) {
  testing::IsaGuard guard;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  const int lens[] = {1, 2, 3, 5, 16, 17, 31, 64, 130, 300};
  const int queries[] = {1, 2, 3, 4, 6, 7, 12};
  int64_t checked = 0;
  for (DType t : kTypes)
    for (int hd : head_dims(t))
      for (int len : lens) {
        Rows V = make_rows(t, len, hd, rng);
        for (int nt : queries) {
          const int ldp = len + 2, ldo = hd + 5;
          std::vector<float> P(static_cast<size_t>(nt) * ldp);
          for (auto& v : P) v = ud(rng) < 0.1f ? 0.f : ud(rng);  // some masked entries
          std::vector<float> init(static_cast<size_t>(nt) * ldo);
          for (auto& v : init) v = ud(rng) - 0.5f;
          for (Isa isa : testing::paths()) {
            std::vector<float> out = init;
            kernels::attn_pv(t, P.data(), ldp, nt, V.bytes.data(), V.ld, len, hd, out.data(), ldo, isa);
            for (int ti = 0; ti < nt; ++ti) {
              for (int d = 0; d < hd; ++d) {
                double ref = init[static_cast<size_t>(ti) * ldo + d], mag = std::fabs(ref);
                for (int p = 0; p < len; ++p) {
                  const double x = static_cast<double>(P[ti * ldp + p]) * V.values[static_cast<size_t>(p) * hd + d];
                  ref += x;
                  mag += std::fabs(x);
                }
                const double got = out[static_cast<size_t>(ti) * ldo + d];
                ASSERT_LE(std::fabs(got - ref), bound(len + 1, mag))
                    << dtype_name(t) << " " << kernels::isa_name(isa) << " hd " << hd << " len " << len << " nt " << nt
                    << " at (" << ti << "," << d << ")";
                ++checked;
              }
              for (int d = hd; d < ldo; ++d)
                ASSERT_EQ(out[static_cast<size_t>(ti) * ldo + d], init[static_cast<size_t>(ti) * ldo + d])
                    << "wrote past hd";
            }
          }
        }
      }
  EXPECT_GT(checked, 100000);
}

// Conversions into the cache: f16/bf16 round to nearest (relative error <= 2^-11 / 2^-8), every
// path gives the scalar reference's bytes, and q8_0 errs by at most half a step of its block.
TEST(AttentionKv, RowConversions) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 3.f);
  const int n = 256;
  std::vector<float> x(n), back(n);
  for (auto& v : x) v = nd(rng);
  x[5] = 0.f;
  x[6] = 1e-3f;
  for (DType t : kTypes) {
    std::vector<uint8_t> ref(kernels::kv_row_bytes(t, n)), got(ref.size());
    kernels::kv_from_float(t, x.data(), ref.data(), n, Isa::Scalar);
    for (Isa isa : testing::paths()) {
      kernels::kv_from_float(t, x.data(), got.data(), n, isa);
      EXPECT_EQ(got, ref) << dtype_name(t) << " " << kernels::isa_name(isa);
    }
    kernels::kv_to_float(t, ref.data(), back.data(), n);
    for (int b = 0; b < n; b += 32) {
      float amax = 0;
      for (int i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(x[i]));
      for (int i = b; i < b + 32; ++i) {
        const double err = std::fabs(static_cast<double>(back[i]) - x[i]);
        double lim = 0;
        switch (t) {
          case DType::F32: lim = 0; break;
          case DType::F16: lim = std::ldexp(std::fabs(x[i]), -11) + 1e-7; break;  // 1e-7: subnormal step
          case DType::BF16: lim = std::ldexp(std::fabs(x[i]), -8); break;
          default: lim = 0.5 * amax / 127 * (1 + 1e-3) + amax * std::ldexp(1.0, -10); break;  // + f16 scale rounding
        }
        EXPECT_LE(err, lim) << dtype_name(t) << " value " << i << " = " << x[i];
      }
    }
  }
  EXPECT_EQ(kernels::kv_row_bytes(DType::F32, 64), 256u);
  EXPECT_EQ(kernels::kv_row_bytes(DType::F16, 64), 128u);
  EXPECT_EQ(kernels::kv_row_bytes(DType::BF16, 64), 128u);
  EXPECT_EQ(kernels::kv_row_bytes(DType::Q8_0, 64), 68u);
}

}  // namespace
}  // namespace larder
