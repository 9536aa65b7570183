// Softmax and the gated FFN activations on every ISA path against double-precision formulas
// (GeGLU against the tanh form of GELU, not the sigmoid form the kernels use).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/kernels.h"

namespace larder::kernels {
namespace {

struct IsaGuard {
  Isa saved = active_isa();
  ~IsaGuard() { set_isa(saved); }
};

std::vector<float> randv(int64_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

const int64_t kSizes[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 255, 512, 1000, 4097};

TEST(Activations, SoftmaxMatchesDouble) {
  IsaGuard g;
  for (Isa isa : {Isa::Scalar, Isa::AVX2, Isa::AVX512}) {
    set_isa(isa);
    for (int64_t n : kSizes)
      for (float range : {1.f, 10.f, 100.f}) {
        std::vector<float> x = randv(n, -range, range, static_cast<uint32_t>(n * 31 + range));
        if (n > 4) x[3] = -1e4f;  // far below the max: exp underflows to 0
        const std::vector<float> x0 = x;
        std::vector<double> ref(n);
        double mx = -INFINITY, sum = 0;
        for (float v : x) mx = std::max(mx, static_cast<double>(v));
        for (int64_t i = 0; i < n; ++i) sum += ref[i] = std::exp(x[i] - mx);
        softmax(x.data(), n);
        double total = 0;
        for (int64_t i = 0; i < n; ++i) {
          ref[i] /= sum;
          total += x[i];
          // Float rounding of x - max is ~6e-8 |x - max| in the exponent (relative error of exp);
          // the float sum of n terms adds ~sqrt(n) ulp.
          const double tol = ref[i] * (2e-6 + 1e-7 * std::sqrt(double(n)) + 2e-7 * std::fabs(x0[i] - mx)) + 1e-30;
          ASSERT_NEAR(x[i], ref[i], tol) << isa_name(active_isa()) << " n=" << n << " i=" << i;
        }
        EXPECT_NEAR(total, 1.0, 1e-5);
      }
  }
}

TEST(Activations, GluMatchesDouble) {
  IsaGuard g;
  for (Isa isa : {Isa::Scalar, Isa::AVX2, Isa::AVX512}) {
    set_isa(isa);
    for (int64_t n : kSizes)
      for (float range : {0.5f, 6.f, 120.f}) {
        const std::vector<float> gate = randv(n, -range, range, static_cast<uint32_t>(n * 7 + range));
        const std::vector<float> up = randv(n, -2.f, 2.f, static_cast<uint32_t>(n * 13 + range));
        std::vector<float> sw(n), ge(n), inplace = gate;
        swiglu(sw.data(), gate.data(), up.data(), n);
        geglu_tanh(ge.data(), gate.data(), up.data(), n);
        geglu_tanh(inplace.data(), inplace.data(), up.data(), n);
        for (int64_t i = 0; i < n; ++i) {
          const double gd = gate[i], ud = up[i];
          const double rs = gd / (1 + std::exp(-gd)) * ud;
          const double rg = 0.5 * gd * (1 + std::tanh(std::sqrt(2 / M_PI) * (gd + 0.044715 * gd * gd * gd))) * ud;
          // Relative to the output, plus a term relative to |g u| for the far tail where the
          // float argument of exp (~g^3) carries its rounding into values near 0.
          const double floor = 1e-7 * std::fabs(gd * ud);
          ASSERT_NEAR(sw[i], rs, 3e-6 * std::fabs(rs) + floor) << isa_name(active_isa()) << " n=" << n << " g=" << gd;
          ASSERT_NEAR(ge[i], rg, 3e-6 * std::fabs(rg) + floor) << isa_name(active_isa()) << " n=" << n << " g=" << gd;
          ASSERT_EQ(inplace[i], ge[i]);
        }
      }
  }
}

}  // namespace
}  // namespace larder::kernels
