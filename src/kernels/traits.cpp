// The per-type kernel table. Adding a weight format = adding its converters and dot
// products in their own file and one row here.
#include "core/result.h"
#include "kernels/kernels_internal.h"
#include "kernels/quants.h"

namespace larder::kernels {

namespace {

struct Entry {
  DType type;
  TypeTraits traits;
};

const Entry kEntries[] = {
    {DType::F32, {DType::F32, row_f32_to_float, row_float_to_f32, {vec_dot_f32_scalar, vec_dot_f32_avx2, vec_dot_f32_avx512}}},
    {DType::F16, {DType::F32, row_f16_to_float, row_float_to_f16, {vec_dot_f16_scalar, vec_dot_f16_avx2, vec_dot_f16_avx512}}},
    {DType::BF16, {DType::F32, row_bf16_to_float, row_float_to_bf16, {vec_dot_bf16_scalar, vec_dot_bf16_avx2, vec_dot_bf16_avx512}}},
    {DType::Q8_0, {DType::Q8_0, row_q8_0_to_float, row_float_to_q8_0, {vec_dot_q8_0_scalar, vec_dot_q8_0_avx2, vec_dot_q8_0_avx512}}},
    {DType::Q4_0, {DType::Q8_0, row_q4_0_to_float, row_float_to_q4_0, {vec_dot_q4_0_scalar, vec_dot_q4_0_avx2, vec_dot_q4_0_avx512},
                   {}, {matmul_q4_0_scalar, matmul_q4_0_avx2, matmul_q4_0_avx512}}},
    {DType::Q4_1, {DType::Q8_1, row_q4_1_to_float, row_float_to_q4_1, {vec_dot_q4_1_scalar, vec_dot_q4_1_avx2, vec_dot_q4_1_avx512}}},
    {DType::Q5_0, {DType::Q8_0, row_q5_0_to_float, row_float_to_q5_0, {vec_dot_q5_0_scalar, vec_dot_q5_0_avx2, vec_dot_q5_0_avx512}}},
    {DType::Q5_1, {DType::Q8_1, row_q5_1_to_float, row_float_to_q5_1, {vec_dot_q5_1_scalar, vec_dot_q5_1_avx2, vec_dot_q5_1_avx512}}},
    {DType::Q4_K, {DType::Q8_K, row_q4_K_to_float, row_float_to_q4_K, {vec_dot_q4_K_scalar, vec_dot_q4_K_avx2, vec_dot_q4_K_avx512}}},
    {DType::Q5_K, {DType::Q8_K, row_q5_K_to_float, row_float_to_q5_K, {vec_dot_q5_K_scalar, vec_dot_q5_K_avx2, vec_dot_q5_K_avx512}}},
    {DType::Q6_K, {DType::Q8_K, row_q6_K_to_float, row_float_to_q6_K, {vec_dot_q6_K_scalar, vec_dot_q6_K_avx2, vec_dot_q6_K_avx512}}},
    // Activation formats (from_float quantizes activations for matmul).
    {DType::Q8_1, {DType::Q8_1, row_q8_1_to_float, row_float_to_q8_1, {vec_dot_q8_1_scalar, nullptr, nullptr}}},
    {DType::Q8_K, {DType::Q8_K, row_q8_K_to_float, row_float_to_q8_K, {vec_dot_q8_K_scalar, nullptr, nullptr}}},
};

}  // namespace

const TypeTraits* type_traits(DType t) {
  for (const Entry& e : kEntries)
    if (e.type == t) return &e.traits;
  return nullptr;
}

VecDotFn vec_dot_fn(DType t, Isa isa) {
  const TypeTraits* tr = type_traits(t);
  LARDER_ASSERT(tr != nullptr);
  for (int i = static_cast<int>(isa); i >= 0; --i)
    if (tr->vec_dot[i]) return tr->vec_dot[i];
  LARDER_ASSERT(!"type has no dot product");
  return nullptr;
}

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  const TypeTraits* tr = type_traits(t);
  LARDER_ASSERT(tr && tr->to_float);
  tr->to_float(src, dst, n);
}

void quantize_row(DType t, const float* src, void* dst, int64_t n) {
  const TypeTraits* tr = type_traits(t);
  LARDER_ASSERT(tr && tr->from_float);
  tr->from_float(src, dst, n);
}

DType matmul_activation_type(DType t, int64_t n_tokens, Isa isa) {
  const TypeTraits* tr = type_traits(t);
  LARDER_ASSERT(tr != nullptr);
  if (tr->matmul[static_cast<int>(isa)] || n_tokens < kGemmMinTokens) return tr->vec_dot_type;
  return DType::F32;
}

float dot_row(DType t, const void* w, const void* x, int64_t n) { return vec_dot_fn(t, active_isa())(w, x, n); }

}  // namespace larder::kernels
