// larder-bench-gemm: prefill GEMM throughput (GFLOP/s) of Larder's f32 kernel on real
// model shapes, side by side with OpenBLAS sgemm and oneDNN's dnnl_sgemm when they were found at
// build time (each with the same thread count; oneDNN with its own OpenMP team), and what
// Larder's matmul does for the shape (oneDNN called from each pool thread for large matrices).
//   larder-bench-gemm [-t THREADS] [-n TOKENS] [-r REPS]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/model.h"
#ifdef LARDER_HAVE_OPENBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);
#endif
#ifdef LARDER_HAVE_DNNL
#include <dnnl.h>
#include <omp.h>
#endif

using namespace larder;

int main(int argc, char** argv) {
  int threads = 2, T = 512, reps = 5;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "-t") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "-n") && i + 1 < argc) T = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "-r") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: larder-bench-gemm [-t THREADS] [-n TOKENS] [-r REPS]\n");
      return 2;
    }
  }
  if (threads < 1 || T < 1 || reps < 1) {
    std::fprintf(stderr, "larder-bench-gemm: error: arguments must be positive\n");
    return 2;
  }
  struct Shape {
    const char* what;
    int rows, cols;
  } shapes[] = {{"stories110M q/k/v/o", 768, 768}, {"stories110M gate/up", 2048, 768},
                {"stories110M down", 768, 2048}, {"llama-3.2-1B gate/up", 8192, 2048}, {"llama-3.2-1B down", 2048, 8192}};
  ThreadPool pool(threads);

#ifdef LARDER_HAVE_OPENBLAS
  openblas_set_num_threads(threads);
#endif
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::printf("| shape | rows x cols | tokens | Larder tiles GFLOP/s | OpenBLAS GFLOP/s | oneDNN (OpenMP team) GFLOP/s | Larder matmul GFLOP/s |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Shape& sh : shapes) {
    std::vector<float> w(static_cast<size_t>(sh.rows) * sh.cols), x(static_cast<size_t>(T) * sh.cols),
        y(static_cast<size_t>(T) * sh.rows);
    for (auto& v : w) v = nd(rng);
    for (auto& v : x) v = nd(rng);
    Tensor W;
    W.type = DType::F32;
    W.ne[0] = sh.cols;
    W.ne[1] = sh.rows;
    W.data = w.data();
    W.nbytes = w.size() * 4;
    kernels::MatmulScratch sc;
    auto best = [&](auto f) {
      f();
      double b = 1e30;
      for (int i = 0; i < reps; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        f();
        b = std::min(b, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      return b;
    };
    const double flop = 2.0 * T * sh.rows * sh.cols;
    kernels::set_onednn(false);  // the own register tiles
    const double ours = best([&] { kernels::matmul(W, x.data(), T, y.data(), sh.rows, pool, sc); });
    // What matmul does for this shape (oneDNN per pool thread where it is loadable and the matrix large).
    kernels::set_onednn(true);
    const bool uses = kernels::matmul_uses_onednn(DType::F32, sh.rows, sh.cols, T, kernels::active_isa());
    const double used = best([&] { kernels::matmul(W, x.data(), T, y.data(), sh.rows, pool, sc); });
    std::printf("| %s | %d x %d | %d | %.1f |", sh.what, sh.rows, sh.cols, T, flop / ours / 1e9);
#ifdef LARDER_HAVE_OPENBLAS
    const double blas = best([&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, sh.rows, sh.cols, 1.f, x.data(), sh.cols, w.data(),
                  sh.cols, 0.f, y.data(), sh.rows);
    });
    std::printf(" %.1f |", flop / blas / 1e9);
#else
    std::printf(" (not built) |");
#endif
#ifdef LARDER_HAVE_DNNL
    omp_set_num_threads(threads);
    const double dnnl = best([&] {
      dnnl_sgemm('N', 'T', T, sh.rows, sh.cols, 1.f, x.data(), sh.cols, w.data(), sh.cols, 0.f, y.data(), sh.rows);
    });
    std::printf(" %.1f |", flop / dnnl / 1e9);
#else
    std::printf(" (not built) |");
#endif
    std::printf(" %.1f (%s) |\n", flop / used / 1e9, uses ? "oneDNN" : "tiles");
  }
  return 0;
}
