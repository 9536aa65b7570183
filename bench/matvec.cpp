// larder-bench-matvec: decode (one-token) matmul throughput per weight type, as weight bytes
// streamed per second, for a matrix that stays in cache (the kernel's compute ceiling) and one
// far larger than the caches (what DRAM allows). Decode is memory-bound only when the first
// is well above larder-membw's figure.
//   larder-bench-matvec [-t THREADS] [--types f32,q8_0,...] [--cols K] [--isa scalar|avx2|avxvnni|avx512] [--packed]
// --packed: q8_0/q4_0/q4_1/q5_0/q4_K/q5_K/q6_K matrices repacked into panels first where the path
// has packed kernels (what model loading does on the AVX-512 and AVX2 paths).
#include <sys/mman.h>

#include <algorithm>
#include <memory>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/model.h"

using namespace larder;

// Weights live in transparent huge pages, as model loading puts them (4 KiB pages cap DRAM reads).
struct HugeBuf {
  uint8_t* p = nullptr;
  size_t n = 0;
  explicit HugeBuf(size_t bytes) : n(bytes) {
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "larder-bench-matvec: error: cannot map %zu bytes\n", n);
      std::exit(1);
    }
    madvise(m, n, MADV_HUGEPAGE);
    p = static_cast<uint8_t*>(m);
  }
  ~HugeBuf() { munmap(p, n); }
  HugeBuf(const HugeBuf&) = delete;
  HugeBuf& operator=(const HugeBuf&) = delete;
};

int main(int argc, char** argv) {
  int threads = 2;
  int64_t cols = 2048;
  std::string types = "f32,f16,bf16,q8_0,q4_0,q4_1,q5_0,q5_1,q4_K,q5_K,q6_K";
  bool packed = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "-t") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--types") && i + 1 < argc) types = argv[++i];
    else if (!std::strcmp(argv[i], "--cols") && i + 1 < argc) cols = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--packed")) packed = true;
    else if (!std::strcmp(argv[i], "--isa") && i + 1 < argc) {
      std::string s = argv[++i];
      kernels::set_isa(s == "scalar" ? kernels::Isa::Scalar
                       : s == "avx2" || s == "avxvnni" ? kernels::Isa::AVX2
                                                       : kernels::Isa::AVX512);
      kernels::set_vnni256(s == "avxvnni");
    } else {
      std::fprintf(stderr, "usage: larder-bench-matvec [-t THREADS] [--types f32,q8_0,...] [--cols K] [--isa PATH] [--packed]\n");
      return 2;
    }
  }
  if (threads < 1 || cols < 256 || cols % 256) {
    std::fprintf(stderr, "larder-bench-matvec: error: need threads >= 1 and --cols a multiple of 256\n");
    return 2;
  }
  ThreadPool pool(threads);
  kernels::MatmulScratch scratch;
  std::printf("path %s, %d threads, %lld columns%s\n", kernels::active_isa_name(), threads,
              static_cast<long long>(cols), packed ? ", packable types packed" : "");
  std::printf("| type | in cache (%s) | from DRAM (%s) |\n|---|---:|---:|\n", "2,048 rows", "~1 GiB");
  std::stringstream ss(types);
  for (std::string name; std::getline(ss, name, ',');) {
    DType t;
    if (!parse_dtype(name, &t)) {
      std::fprintf(stderr, "larder-bench-matvec: error: unknown type '%s'\n", name.c_str());
      return 2;
    }
    const size_t rb = row_bytes(t, cols);
    double gbs[2];
    for (int big = 0; big < 2; ++big) {
      const int64_t rows = big ? std::max<int64_t>(2048, (int64_t{1} << 30) / static_cast<int64_t>(rb)) : 2048;
      HugeBuf w(rb * rows);
      std::mt19937 rng(1);
      std::normal_distribution<float> nd;
      std::vector<float> row(cols), x(cols), y(rows);
      // 512 distinct random rows, repeated: the values do not change the work.
      for (int64_t r = 0; r < std::min<int64_t>(rows, 512); ++r) {
        for (auto& v : row) v = nd(rng);
        kernels::quantize_row(t, row.data(), w.p + r * rb, cols);
      }
      for (int64_t r = 512; r < rows; ++r) std::memcpy(w.p + r * rb, w.p + (r % 512) * rb, rb);
      for (auto& v : x) v = nd(rng);
      Tensor W;
      W.type = t;
      W.ne[0] = cols;
      W.ne[1] = rows;
      W.data = w.p;
      W.nbytes = w.n;
      std::unique_ptr<HugeBuf> pk;
      if (packed && kernels::packed_bytes(t, rows, cols) && kernels::packed_kernels(t, kernels::active_isa())) {
        pk = std::make_unique<HugeBuf>(kernels::packed_bytes(t, rows, cols));
        kernels::pack_weights(t, w.p, rb, rows, cols, pk->p, pool);
        W.packed = pk->p;
      }
      const double bytes = static_cast<double>(w.n);
      const int reps = std::max(3, static_cast<int>(2e9 / bytes));
      double best = 1e30;
      for (int k = 0; k < 5; ++k) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) kernels::matmul(W, x.data(), 1, y.data(), rows, pool, scratch);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
      }
      gbs[big] = bytes / best / 1e9;
    }
    std::printf("| %s | %.1f GB/s | %.1f GB/s |\n", dtype_name(t), gbs[0], gbs[1]);
    std::fflush(stdout);
  }
  return 0;
}
