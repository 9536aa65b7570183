#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace larder {

// Tensor element types; values are GGML's type ids so GGUF files map directly.
enum class DType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
};

struct DTypeInfo {
  const char* name;
  int block_size;     // elements per block
  int block_bytes;    // bytes per block
  bool computable;    // the engine can run matmuls in this type
};

// Returns nullptr for unknown type ids.
const DTypeInfo* dtype_info(uint32_t id);
inline const DTypeInfo* dtype_info(DType t) { return dtype_info(static_cast<uint32_t>(t)); }
const char* dtype_name(DType t);
// Parses "f32", "q8_0", ... (case-insensitive); returns false if unknown.
bool parse_dtype(const std::string& s, DType* out);
// Bytes for one row of n elements; n must be a multiple of the block size.
size_t row_bytes(DType t, int64_t n);

// Quantized block layouts (identical to GGML's, so files interoperate).
struct BlockQ8_0 {
  uint16_t d;      // f16 scale
  int8_t qs[32];
};
struct BlockQ4_0 {
  uint16_t d;        // f16 scale
  uint8_t qs[16];    // low nibble: elements 0..15, high nibble: 16..31; value = (q - 8) * d
};
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_0) == 18);

}  // namespace larder
