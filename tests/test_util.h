// Helpers shared by the gtest files: where ../shared is, and the CPU paths to force.
#pragma once
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/kernels.h"

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

}  // namespace larder::testing
