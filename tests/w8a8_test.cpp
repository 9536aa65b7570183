// W8A8 with shadow outliers: every path against an exact emulation of the documented
// arithmetic, and against float matmul within a stated bound, with planted outliers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/thread_pool.h"
#include "kernels/w8a8.h"

using namespace larder;
using namespace larder::kernels;

namespace {

struct Case {
  int rows, cols, tokens;
};

// Independent emulation: per-row int8 weights, one activation scale over the inlier
// channels of the whole chunk, outlier channels (rule from w8a8.h) computed in float.
std::vector<double> emulate(const std::vector<float>& w, const std::vector<float>& x, int R, int K, int T,
                            int* n_out) {
  std::vector<float> ca(K, 0.f);
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) ca[k] = std::max(ca[k], std::fabs(x[t * K + k]));
  std::vector<float> sorted = ca;
  std::nth_element(sorted.begin(), sorted.begin() + K / 2, sorted.end());
  const float median = sorted[K / 2];
  std::vector<int> out;
  for (int k = 0; k < K; ++k)
    if (ca[k] > kOutlierRatio * median && ca[k] > 0) out.push_back(k);
  const size_t max_out = std::max(1, K / kMaxOutlierFrac);
  if (out.size() > max_out) {
    std::partial_sort(out.begin(), out.begin() + max_out, out.end(), [&](int a, int b) { return ca[a] > ca[b]; });
    out.resize(max_out);
  }
  std::vector<bool> is_out(K, false);
  for (int k : out) is_out[k] = true;
  *n_out = static_cast<int>(out.size());
  float inl = 0;
  for (int k = 0; k < K; ++k)
    if (!is_out[k]) inl = std::max(inl, ca[k]);
  const float sx = inl / 127.f;
  std::vector<double> y(static_cast<size_t>(T) * R);
  for (int r = 0; r < R; ++r) {
    float amax = 0;
    for (int k = 0; k < K; ++k) amax = std::max(amax, std::fabs(w[r * K + k]));
    const float sw = amax / 127.f;
    std::vector<int> qw(K);
    for (int k = 0; k < K; ++k) qw[k] = sw > 0 ? static_cast<int>(std::lrintf(w[r * K + k] / sw)) : 0;
    for (int t = 0; t < T; ++t) {
      double acc = 0, flo = 0;
      for (int k = 0; k < K; ++k) {
        if (is_out[k]) {
          flo += static_cast<double>(sw) * qw[k] * x[t * K + k];
        } else {
          int qx = sx > 0 ? static_cast<int>(std::lrintf(std::clamp(x[t * K + k] / sx, -127.f, 127.f))) : 0;
          acc += static_cast<double>(qw[k]) * qx;
        }
      }
      y[static_cast<size_t>(t) * R + r] = static_cast<double>(sw) * sx * acc + flo;
    }
  }
  return y;
}

}  // namespace

TEST(W8A8, MatchesEmulationAndFloatWithPlantedOutliers) {
  ThreadPool pool(2);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0, 1);
  std::vector<Isa> isas = {Isa::Scalar};
  if (detected_isa() >= Isa::AVX512) isas.push_back(Isa::AVX512);
  for (Isa isa : isas)
    for (Case c : {Case{16, 64, 8}, Case{37, 172, 13}, Case{70, 256, 23}, Case{130, 768, 9}}) {
      std::vector<float> w(static_cast<size_t>(c.rows) * c.cols), x(static_cast<size_t>(c.tokens) * c.cols);
      for (auto& v : w) v = nd(rng);
      for (auto& v : x) v = nd(rng);
      // Two outlier channels 40x larger than the rest, as in real LLM activations.
      for (int t = 0; t < c.tokens; ++t) {
        x[t * c.cols + 3] *= 40.f;
        x[t * c.cols + c.cols - 2] *= 40.f;
      }
      auto W = w8_from_tensor(DType::F32, w.data(), c.rows, c.cols, pool);
      std::vector<float> y(static_cast<size_t>(c.tokens) * c.rows);
      W8A8Scratch sc;
      W8A8Stats st;
      matmul_w8a8(*W, x.data(), c.tokens, y.data(), c.rows, pool, sc, isa, &st);
      int n_out = 0;
      std::vector<double> ref = emulate(w, x, c.rows, c.cols, c.tokens, &n_out);
      EXPECT_GE(n_out, 2);
      EXPECT_EQ(st.outlier_channels, n_out);
      double worst_emul = 0, worst_float = 0;
      for (int t = 0; t < c.tokens; ++t)
        for (int r = 0; r < c.rows; ++r) {
          double exact = 0, mag = 0;
          for (int k = 0; k < c.cols; ++k) {
            exact += static_cast<double>(w[r * c.cols + k]) * x[t * c.cols + k];
            mag += std::fabs(static_cast<double>(w[r * c.cols + k]) * x[t * c.cols + k]);
          }
          const double got = y[static_cast<size_t>(t) * c.rows + r];
          worst_emul = std::max(worst_emul, std::fabs(got - ref[static_cast<size_t>(t) * c.rows + r]) / mag);
          worst_float = std::max(worst_float, std::fabs(got - exact) / mag);
        }
      // The kernel is the emulated arithmetic up to float rounding...
      EXPECT_LT(worst_emul, 1e-5) << isa_name(isa) << " " << c.rows << "x" << c.cols;
      // ...and close to float: int8 error stays small because outliers are kept out.
      EXPECT_LT(worst_float, 0.02) << isa_name(isa) << " " << c.rows << "x" << c.cols;
    }
}
