// Attention over a KV cache stored as f32, f16, bf16 or q8_0 (llama.cpp's --cache-type-k/-v).
//
// A cache row of one head holds hd values in the cache's type: f32/f16/bf16 element by element,
// q8_0 as hd/32 blocks of {f16 scale, 32 int8} (hd must be a multiple of 32). The kernels read
// rows in that type directly and convert in registers (F16C vcvtph2ps, bf16 by a 16-bit shift,
// q8_0 by its block scale): the cache is never copied to f32.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/kernels.h"

namespace larder::kernels {

// The KV cache types: F32, F16, BF16, Q8_0.
bool kv_type_supported(DType t);
// Bytes of one head row of n values (q8_0: n % 32 == 0).
size_t kv_row_bytes(DType t, int64_t n);
// n floats -> one cache row (q8_0: n % 32 == 0; f16/bf16 round to nearest even), and back.
void kv_from_float(DType t, const float* src, void* dst, int64_t n, Isa isa);
void kv_to_float(DType t, const void* src, float* dst, int64_t n);

// Scores: y[t*ldy + r] = sum_{k < hd} K_r[k] * q[t*ldq + k] for r < rows, t < nt, where row r
// of K starts at (const uint8_t*)K + r*ldk (ldk in bytes).
void attn_scores(DType kt, const void* K, int64_t ldk, int64_t rows, const float* q, int64_t ldq, int64_t nt, int hd,
                 float* y, int64_t ldy, Isa isa);
// P.V: out[t*ldo + d] += sum_{p < len} P[t*ldp + p] * V_p[d] for t < nt, d < hd, where row p of
// V starts at (const uint8_t*)V + p*ldv (ldv in bytes).
void attn_pv(DType vt, const float* P, int64_t ldp, int64_t nt, const void* V, int64_t ldv, int64_t len, int hd,
             float* out, int64_t ldo, Isa isa);

}  // namespace larder::kernels
