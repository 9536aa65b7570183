// Helpers shared by the gtest files: where ../shared is, and the CPU paths to force.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "model/dtype.h"

namespace larder::testing {

inline std::string shared_dir() {
  if (const char* e = std::getenv("LARDER_SHARED"); e && *e) return e;
#ifdef LARDER_SOURCE_DIR
  return std::string(LARDER_SOURCE_DIR) + "/../shared";
#else
  return "../shared";
#endif
}

inline std::string shared_path(const std::string& rel) { return shared_dir() + "/" + rel; }

// How many times slower the sanitizer builds run (GCC defines these macros under -fsanitize; scripts/test
// --sanitize): the speed checks, there to catch quadratic work rather than a slow machine, scale their limits.
#if defined(__SANITIZE_THREAD__)
inline constexpr double kSanitizerSlowdown = 10;
#elif defined(__SANITIZE_ADDRESS__)
inline constexpr double kSanitizerSlowdown = 4;
#else
inline constexpr double kSanitizerSlowdown = 1;
#endif

// Every kernel path this CPU can run: scalar always, then AVX2 / AVX-512 when present.
inline std::vector<kernels::Isa> paths() {
  std::vector<kernels::Isa> v{kernels::Isa::Scalar};
  if (kernels::detected_isa() >= kernels::Isa::AVX2) v.push_back(kernels::Isa::AVX2);
  if (kernels::detected_isa() >= kernels::Isa::AVX512) v.push_back(kernels::Isa::AVX512);
  return v;
}

// Restores the active path when a test that forces one ends.
struct IsaGuard {
  kernels::Isa saved = kernels::active_isa();
  ~IsaGuard() { kernels::set_isa(saved); }
};

// Activations [nt][cols] rounded through q8_0, as the integer kernels consume them.
inline std::vector<float> q8_roundtrip(const std::vector<float>& x, int nt, int cols) {
  std::vector<float> out(x.size());
  std::vector<uint8_t> q(row_bytes(DType::Q8_0, cols));
  for (int t = 0; t < nt; ++t) {
    kernels::quantize_row(DType::Q8_0, &x[static_cast<size_t>(t) * cols], q.data(), cols);
    kernels::dequantize_row(DType::Q8_0, q.data(), &out[static_cast<size_t>(t) * cols], cols);
  }
  return out;
}

// y [nt][ldy] from an integer-kernel matmul against the double reference of the dequantized
// weights deq [rows][cols] times the q8_0-rounded activations xq [nt][cols]: |got - ref| <=
// 1e-5 * sum |w x| + 1e-6 (exact integer block sums; only f32 rounding of the per-block terms),
// and columns rows..ldy still hold the sentinel -7. Call with ASSERT_NO_FATAL_FAILURE.
inline void check_against_reference(const std::vector<float>& deq, int rows, int cols, const std::vector<float>& xq,
                                    int nt, const std::vector<float>& y, int ldy, const std::string& what) {
  for (int t = 0; t < nt; ++t) {
    for (int r = 0; r < rows; ++r) {
      double ref = 0, mag = 0;
      for (int c = 0; c < cols; ++c) {
        const double p = static_cast<double>(deq[static_cast<size_t>(r) * cols + c]) * xq[static_cast<size_t>(t) * cols + c];
        ref += p;
        mag += std::fabs(p);
      }
      const double got = y[static_cast<size_t>(t) * ldy + r];
      ASSERT_LE(std::fabs(got - ref), 1e-5 * mag + 1e-6)
          << what << " rows " << rows << " cols " << cols << " tokens " << nt << " t " << t << " r " << r << " got " << got
          << " ref " << ref;
    }
    for (int r = rows; r < ldy; ++r) ASSERT_EQ(y[static_cast<size_t>(t) * ldy + r], -7.f) << what << " wrote past rows";
  }
}

}  // namespace larder::testing
