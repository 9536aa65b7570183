#pragma once
#include <cstdint>

#include "kernels/kernels.h"

namespace larder::kernels {

// y[t*ldy + r] = sum_k w[r*ldw + k] * x[t*ldx + k] for r < rows, t < n_tok (f32).
// Each (r, t) rounds the same way whatever rows, n_tok and the other rows' or tokens' values are,
// and as the f32 / f16 / bf16 dot products (vec_dot) on the AVX2 / AVX-512 paths (one summation
// order per path, gemm.cpp): a token's products do not depend on the batch it is in.
void gemm_f32(const float* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t n_tok, int64_t K,
              float* y, int64_t ldy, Isa isa);

}  // namespace larder::kernels

namespace larder::kernels {
// out[t*ldo + d] += sum_{p < len} P[t*ldp + p] * V[p*ldv + d] for t < nt, d < hd.
void pv_accumulate(const float* P, int64_t ldp, int64_t nt, const float* V, int64_t ldv, int64_t len, int hd,
                   float* out, int64_t ldo, Isa isa);
}  // namespace larder::kernels
