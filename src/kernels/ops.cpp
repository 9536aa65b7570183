#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <dlfcn.h>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/kernels.h"
#include "model/model.h"

namespace larder::kernels {

namespace {
// Large f32 prefill products go to oneDNN's sgemm: 1.5-1.9x the own register tiles on the 1B
// shapes (larder-bench-gemm). It is loaded with dlopen on first use, from Debian's libdnnl2, and
// only for matrices of at least kDnnlMinWeights: mapping the 40 MB library and its first calls
// cost ~3-15 MB of resident memory, which small models would notice (stories15M f32 +17%) and
// which buys little there (768-wide shapes: 349-486 vs 351-414 GFLOP/s). Called single-threaded
// from each pool thread on its share of the rows, so no OpenMP team competes with the pool for
// the cores. LARDER_NO_DNNL=1 (or set_onednn(false)) keeps the own tiles.
constexpr int64_t kDnnlMinWeights = int64_t{1} << 22;  // 2048 x 2048
using SgemmFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
                        float*, int64_t);  // dnnl_sgemm (row-major); returns dnnl_success = 0
using OmpSetFn = void (*)(int);

std::atomic<bool> g_onednn{[] {
  const char* e = std::getenv("LARDER_NO_DNNL");
  return !e || !*e || *e == '0';
}()};

struct Dnnl {
  SgemmFn sgemm = nullptr;
  OmpSetFn omp_set_num_threads = nullptr;
};
const Dnnl* dnnl() {
  static const Dnnl d = [] {
    Dnnl r;
    // oneDNN picks its own ISA from the CPU; on the AVX2 path (LARDER_CPU=avx2 on an AVX-512
    // machine) it must not use AVX-512 either, or the path would not measure an AVX2 machine.
    if (active_isa() != Isa::AVX512) setenv("ONEDNN_MAX_CPU_ISA", "AVX2", 0);
    void* h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!h) return r;
    auto sg = reinterpret_cast<SgemmFn>(dlsym(h, "dnnl_sgemm"));
    void* g = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);  // libdnnl's OpenMP runtime, already mapped
    auto os = g ? reinterpret_cast<OmpSetFn>(dlsym(g, "omp_set_num_threads")) : nullptr;
    if (sg && os) {
      r.sgemm = sg;
      r.omp_set_num_threads = os;
    }
    return r;
  }();
  return d.sgemm ? &d : nullptr;
}

void gemm_dnnl(const Dnnl& d, const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
               int64_t ldy, ThreadPool& pool, Isa isa) {
  const int64_t parts = pool.size();
  pool.parallel_for(parts, [&](int64_t b, int64_t e, int) {
    d.omp_set_num_threads(1);  // this thread's OpenMP setting
    for (int64_t i = b; i < e; ++i) {
      const int64_t r0 = rows * i / parts / 16 * 16, r1 = i + 1 == parts ? rows : rows * (i + 1) / parts / 16 * 16;
      if (r1 <= r0) continue;
      const int st = d.sgemm('N', 'T', n_tokens, r1 - r0, cols, 1.f, x, cols, w + r0 * cols, cols, 0.f, y + r0, ldy);
      if (st != 0)  // e.g. out of memory for its packing buffers: the own tiles need none
        gemm_f32(w + r0 * cols, cols, r1 - r0, x, cols, n_tokens, cols, y + r0, ldy, isa);
    }
  });
}
}  // namespace

bool set_onednn(bool use) { return g_onednn.exchange(use); }

bool matmul_uses_onednn(DType t, int64_t rows, int64_t cols, int64_t n_tokens, Isa isa) {
  return t == DType::F32 && n_tokens >= kGemmMinTokens && isa != Isa::Scalar && rows * cols >= kDnnlMinWeights &&
         g_onednn.load(std::memory_order_relaxed) && dnnl() != nullptr;
}

void matmul(const Tensor& W, const float* x, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool,
            MatmulScratch& scratch) {
  const int64_t rows = W.rows(), cols = W.cols();
  const TypeTraits* tr = type_traits(W.type);
  LARDER_ASSERT(tr != nullptr);
  const size_t rb = row_bytes(W.type, cols);
  const auto* wbase = static_cast<const uint8_t*>(W.data);
  const Isa isa = active_isa();
  if (W.packed) return matmul_packed(W.type, W.packed, rows, cols, x, n_tokens, y, ldy, pool, scratch, isa);
  if (const MatmulFn fn = tr->matmul[static_cast<int>(isa)]) return fn(W.data, rb, rows, cols, x, n_tokens, y, ldy, pool, scratch);
  if (matmul_uses_onednn(W.type, rows, cols, n_tokens, isa))
    return gemm_dnnl(*dnnl(), static_cast<const float*>(W.data), rows, cols, x, n_tokens, y, ldy, pool, isa);
  if (n_tokens >= kGemmMinTokens) {
    // Chunks of rows sized to stay in L2 (f32) are reused for every token.
    int64_t chunk = std::clamp<int64_t>((256 * 1024) / (cols * 4), 4, 64) / 4 * 4;
    const int64_t nchunks = (rows + chunk - 1) / chunk;
    const bool direct = W.type == DType::F32;
    if (!direct) {
      if (static_cast<int>(scratch.wbuf.size()) < pool.size()) scratch.wbuf.resize(pool.size());
      for (auto& b : scratch.wbuf)
        if (static_cast<int64_t>(b.size()) < chunk * cols) b.resize(chunk * cols);
    }
    pool.parallel_for(nchunks, [&](int64_t b, int64_t e, int tid) {
      for (int64_t c = b; c < e; ++c) {
        const int64_t r0 = c * chunk, nr = std::min(rows, r0 + chunk) - r0;
        const float* wf;
        if (direct) {
          wf = reinterpret_cast<const float*>(wbase + r0 * rb);
        } else {
          float* buf = scratch.wbuf[tid].data();
          for (int64_t r = 0; r < nr; ++r) tr->to_float(wbase + (r0 + r) * rb, buf + r * cols, cols);
          wf = buf;
        }
        gemm_f32(wf, cols, nr, x, cols, n_tokens, cols, y + r0, ldy, isa);
      }
    });
    return;
  }
  // Activations in the format the weight type's dot product consumes.
  const uint8_t* xa = reinterpret_cast<const uint8_t*>(x);
  size_t xrb = cols * sizeof(float);
  if (tr->vec_dot_type != DType::F32) {
    const TypeTraits* xt = type_traits(tr->vec_dot_type);
    LARDER_ASSERT(xt && xt->from_float);
    xrb = row_bytes(tr->vec_dot_type, cols);
    if (scratch.xq.size() < n_tokens * xrb) scratch.xq.resize(n_tokens * xrb);
    uint8_t* q = scratch.xq.data();
    pool.parallel_for(n_tokens, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) xt->from_float(x + t * cols, q + t * xrb, cols);
    });
    xa = q;
  }
  const VecDotFn dot = vec_dot_fn(W.type, isa);
  // Rows are split across threads; within a chunk a small block of weight rows is
  // reused for every token so prefill reads each weight once from memory.
  constexpr int64_t kRowBlock = 16;
  const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
  pool.parallel_for(nblocks, [&](int64_t b, int64_t e, int) {
    for (int64_t blk = b; blk < e; ++blk) {
      int64_t r0 = blk * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      for (int64_t t = 0; t < n_tokens; ++t) {
        const uint8_t* xt = xa + t * xrb;
        float* yt = y + t * ldy;
        for (int64_t r = r0; r < r1; ++r) yt[r] = dot(wbase + r * rb, xt, cols);
      }
    }
  });
}

void rmsnorm(float* out, const float* x, const float* w, int64_t n, float eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  float scale = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

}  // namespace larder::kernels
