// Helpers shared by the gtest files: where ../shared is, and the CPU paths to force.
#pragma once
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

}  // namespace larder::testing
