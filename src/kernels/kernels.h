// CPU kernels: conversions, quantization, matmul, norms, RoPE, attention helpers.
// Each hot kernel has a scalar reference and AVX2 / AVX-512 paths picked at run time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/dtype.h"

namespace larder {
class ThreadPool;
struct Tensor;
}

namespace larder::kernels {

enum class Isa { Scalar = 0, AVX2 = 1, AVX512 = 2 };
// Best path this CPU supports, capped by env LARDER_CPU=scalar|avx2|avxvnni|avx512.
Isa detected_isa();
Isa active_isa();
void set_isa(Isa isa);  // tests force each path; clamps to what the CPU supports
const char* isa_name(Isa isa);
// The AVX2 path's 256-bit int8 dot product (vpdpbusd): none (maddubs + madd), the VEX form of
// AVX-VNNI, or the EVEX form of AVX-512 VNNI + VL (the same instruction; lets AVX-512 machines run
// and test the VNNI kernels of the AVX2 path). Used unforced only where the CPU has the VEX form;
// LARDER_CPU=avxvnni asks for whichever the CPU has, LARDER_CPU=avx2 for none.
enum class Vnni256 { None = 0, Vex = 1, Evex = 2 };
Vnni256 active_vnni256();    // None unless the active path is AVX2
Vnni256 detected_vnni256();  // what the CPU has
void set_vnni256(bool use);  // tests: on = whatever the CPU has (needs the AVX2 path active)
const char* active_isa_name();  // "avx512", "avx2", "avx2+avxvnni", "avx2+vnni(evex)", "scalar"

float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
float bf16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);  // round to nearest even

// Row conversions (n elements; n a multiple of the type's block size); dispatch
// through the type traits table.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);
void quantize_row(DType t, const float* src, void* dst, int64_t n);

// q8_0 quantizer (also the activation format of q8_0/q4_0 weights); every path gives the
// bytes of the scalar reference.
void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t n);

// Per-type kernels, like GGML's type traits. A weight type names the format its
// activations are converted to (vec_dot_type) and a dot product per ISA.
using VecDotFn = float (*)(const void* w, const void* x, int64_t n);
// Optional register-blocked tile for prefill: y[t*ldy + r] = dot(W row r, x row t) for
// r < nr, t < nt (small nr/nt); w/x are row-major with byte strides wrb/xrb.
using GemmTileFn = void (*)(const uint8_t* w, size_t wrb, int nr, const uint8_t* x, size_t xrb, int nt, int64_t n,
                            float* y, int64_t ldy);
struct MatmulScratch;
// Optional whole-matmul kernel (see matmul below for the contract; w: rows x cols, row stride
// wrb bytes). It converts the f32 activations itself, to vec_dot_type's values for every batch
// size, in whatever layout its dot products want.
using MatmulFn = void (*)(const void* w, size_t wrb, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                          float* y, int64_t ldy, ThreadPool& pool, MatmulScratch& scratch);
struct TypeTraits {
  DType vec_dot_type = DType::F32;
  void (*to_float)(const void* src, float* dst, int64_t n) = nullptr;
  void (*from_float)(const float* src, void* dst, int64_t n) = nullptr;
  VecDotFn vec_dot[3] = {nullptr, nullptr, nullptr};  // indexed by Isa; nullptr = use a lower path
  GemmTileFn gemm_tile[3] = {nullptr, nullptr, nullptr};  // optional; nullptr = vec_dot loop
  // Used on exactly the path it is given for (no fallback to a lower path, whose generic
  // kernels may be faster); nullptr = the generic matmul below.
  MatmulFn matmul[3] = {nullptr, nullptr, nullptr};
};
// nullptr when the engine has no kernels for the type.
const TypeTraits* type_traits(DType t);
// The dot product used for type t on the given path (falls back to lower paths).
VecDotFn vec_dot_fn(DType t, Isa isa);

// Dot product of one weight row (type t, n elements) with one activation row that is
// already in type_traits(t)->vec_dot_type.
float dot_row(DType t, const void* w, const void* x, int64_t n);

// Scratch that matmul reuses between calls (no per-token allocation).
struct MatmulScratch {
  std::vector<uint8_t> xq;                // activations converted to the weight's vec_dot_type
  std::vector<std::vector<float>> wbuf;   // [thread] weight rows dequantized to f32 for prefill
                                          // (q4_0: a panel of weight rows unpacked to bytes)
};

// Batches of at least this many tokens use the GEMM path: weight rows are dequantized
// to f32 chunk by chunk and multiplied with unquantized f32 activations by register
// tiles. Smaller batches (decode) use the type's dot product on quantized activations
// (f32 / f16 / bf16: on f32 activations, and on the AVX2 / AVX-512 paths their dot product is
// the GEMM's 1 x 1 tile, so their products round alike at every batch size).
// Types with their own TypeTraits::matmul on the active path choose for themselves and
// quantize activations to vec_dot_type for every batch size (q4_0: integer GEMM from 2 tokens).
constexpr int64_t kGemmMinTokens = 8;

// The format matmul converts a weight type's activations to for a batch of n_tokens on the
// given path (F32 = used as they are): what the result is exact for, up to rounding.
DType matmul_activation_type(DType t, int64_t n_tokens, Isa isa);

// Panel-packed weights (packed.cpp, packed_k.cpp; AVX2 kernels in packed_avx2.cpp): q8_0, q4_0,
// q4_1, q5_0, q4_K, q5_K, q6_K rows repacked once at load so that the integer kernels read 16 rows
// per 512-bit vector (two 256-bit halves on AVX2) with no per-token gathering (about the bytes of
// the GGUF rows, 64-byte aligned). packed_bytes is 0 for types/shapes without a packed form.
size_t packed_bytes(DType t, int64_t rows, int64_t cols);
// Whether the given path has fast kernels for type t's packed layout (elsewhere matmul_packed runs
// the layout's scalar reference, so the loader keeps the file's rows).
bool packed_kernels(DType t, Isa isa);
// w: rows x cols of type t, row stride wrb; out: packed_bytes(t, rows, cols), 64-byte aligned.
void pack_weights(DType t, const void* w, size_t wrb, int64_t rows, int64_t cols, uint8_t* out, ThreadPool& pool);
// Row r of packed weights as floats, the same values dequantize_row gives for the GGUF row
// (embedding lookups when the output matrix is tied to the embedding); false when the type's
// packed form has no row access.
bool packed_row_to_float(DType t, const void* packed, int64_t rows, int64_t cols, int64_t r, float* out);
// matmul (below) on packed weights, activations quantized for every batch size (q8_0 "x4" or
// q8_K records); the AVX-512 or AVX2 kernels (plain / VNNI, active_vnni256) on those paths, the
// layout's scalar reference on the scalar path.
void matmul_packed(DType t, const void* packed, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                   int64_t ldy, ThreadPool& pool, MatmulScratch& scratch, Isa isa);

// Whether matmul hands this product to oneDNN's sgemm: f32 prefill of a large matrix on the
// AVX2 or AVX-512 path (oneDNN capped to AVX2 on the former), when libdnnl.so.2 can be loaded and LARDER_NO_DNNL is unset.
bool matmul_uses_onednn(DType t, int64_t rows, int64_t cols, int64_t n_tokens, Isa isa);
// Turns that off (false: the own tiles) or back on where it can be loaded; returns the previous
// setting. Starts as !LARDER_NO_DNNL. For tests and benchmarks that compare both paths.
bool set_onednn(bool use);

// y[t][r] = sum_c W[r][c] * x[t][c] for t < n_tokens, r < W.rows().
// Uses W.packed when it is set.
// x: [n_tokens][W.cols()] f32, y: [n_tokens][ldy] f32 (ldy >= W.rows()).
void matmul(const Tensor& W, const float* x, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool,
            MatmulScratch& scratch);

// out = x / sqrt(mean(x^2) + eps) * w
void rmsnorm(float* out, const float* x, const float* w, int64_t n, float eps);
// In-place softmax over n values; returns nothing.
void softmax(float* x, int64_t n);
// out[i] = silu(gate[i]) * up[i]
void swiglu(float* out, const float* gate, const float* up, int64_t n);
// out = gelu_tanh(gate) * up (GeGLU with the tanh approximation of GELU); out may alias gate.
void geglu_tanh(float* out, const float* gate, const float* up, int64_t n);
float dot_f32(const float* a, const float* b, int64_t n);
// y += a * x
void axpy(float* y, const float* x, float a, int64_t n);
// y += a * dequantize_row(t, row, n) without the dequantized copy (fused for f32, f16, q8_0, q4_0;
// other types through a per-thread buffer). n: a multiple of t's block size.
void axpy_row(DType t, const void* row, float a, float* y, int64_t n);

}  // namespace larder::kernels
