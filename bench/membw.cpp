// larder-membw: sustained memory read bandwidth, to put decode tokens/s against the
// machine's limit (model bytes per token / bandwidth). Reads a buffer much larger than
// the caches with AVX-512/AVX2 loads from N threads (persistent pool), best of R runs.
// The buffer is in transparent huge pages (madvise), as Larder's weights are; with 4 KiB
// pages (--small-pages) TLB misses cap the figure well below what DRAM delivers.
//   larder-membw [-t THREADS] [--mib SIZE] [-r REPS] [--small-pages]
#include <immintrin.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/kernels.h"

using namespace larder;

__attribute__((target("avx512f"))) static double sum_avx512(const float* p, size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (size_t i = 0; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

__attribute__((target("avx2"))) static double sum_avx2(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (size_t i = 0; i + 16 <= n; i += 16) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
  }
  float t[8];
  _mm256_storeu_ps(t, _mm256_add_ps(a0, a1));
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

int main(int argc, char** argv) {
  int threads = 2, reps = 10;
  size_t mib = 1024;
  bool small_pages = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "-t") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--mib") && i + 1 < argc) mib = std::strtoul(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "-r") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--small-pages")) small_pages = true;
    else {
      std::fprintf(stderr, "usage: larder-membw [-t THREADS] [--mib SIZE] [-r REPS] [--small-pages]\n");
      return 2;
    }
  }
  if (threads < 1 || reps < 1 || mib < 64) {
    std::fprintf(stderr, "larder-membw: error: need threads >= 1, reps >= 1, --mib >= 64\n");
    return 2;
  }
  const size_t n = mib * 1024 * 1024 / sizeof(float);
  const size_t bytes = n * sizeof(float);
  void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  float* buf = map == MAP_FAILED ? nullptr : static_cast<float*>(map);
  if (buf) madvise(buf, bytes, small_pages ? MADV_NOHUGEPAGE : MADV_HUGEPAGE);
  if (!buf) {
    std::fprintf(stderr, "larder-membw: error: cannot allocate %zu MiB\n", mib);
    return 1;
  }
  ThreadPool pool(threads);
  pool.parallel_for(static_cast<int64_t>(n / 4096), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b * 4096; i < e * 4096; ++i) buf[i] = 1.0f;  // fault pages in
  });
  const bool avx512 = kernels::detected_isa() >= kernels::Isa::AVX512;
  const int64_t chunks = threads * 64;
  const size_t per = n / chunks / 64 * 64;
  double best = 0, sink = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<double> part(chunks);
    auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(chunks, [&](int64_t b, int64_t e, int) {
      for (int64_t c = b; c < e; ++c) part[c] = avx512 ? sum_avx512(buf + c * per, per) : sum_avx2(buf + c * per, per);
    });
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (double x : part) sink += x;
    best = std::max(best, per * chunks * sizeof(float) / s / 1e9);
  }
  std::printf("read bandwidth: %.2f GB/s (best of %d, %d threads, %zu MiB buffer in %s pages, %s loads)%s\n", best,
              reps, threads, mib, small_pages ? "4 KiB" : "huge", avx512 ? "avx512" : "avx2", sink < 0 ? " " : "");
  munmap(buf, bytes);
  return 0;
}
