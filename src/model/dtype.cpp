#include "model/dtype.h"

#include <strings.h>

namespace larder {

namespace {
struct Entry {
  uint32_t id;
  DTypeInfo info;
};
const Entry kTypes[] = {
    {0, {"f32", 1, 4, true}},      {1, {"f16", 1, 2, true}},      {2, {"q4_0", 32, 18, true}},
    {3, {"q4_1", 32, 20, true}},  {6, {"q5_0", 32, 22, true}},  {7, {"q5_1", 32, 24, true}},
    {8, {"q8_0", 32, 34, true}},   {9, {"q8_1", 32, 36, false}},  {10, {"q2_K", 256, 84, false}},
    {11, {"q3_K", 256, 110, false}}, {12, {"q4_K", 256, 144, true}}, {13, {"q5_K", 256, 176, true}},
    {14, {"q6_K", 256, 210, true}}, {15, {"q8_K", 256, 292, false}}, {24, {"i8", 1, 1, false}},
    {25, {"i16", 1, 2, false}},    {26, {"i32", 1, 4, false}},    {27, {"i64", 1, 8, false}},
    {28, {"f64", 1, 8, false}},    {30, {"bf16", 1, 2, true}},
};
}  // namespace

const DTypeInfo* dtype_info(uint32_t id) {
  for (const auto& e : kTypes)
    if (e.id == id) return &e.info;
  return nullptr;
}

const char* dtype_name(DType t) {
  const DTypeInfo* i = dtype_info(t);
  return i ? i->name : "unknown";
}

bool parse_dtype(const std::string& s, DType* out) {
  for (const auto& e : kTypes) {
    if (strcasecmp(e.info.name, s.c_str()) == 0) {
      *out = static_cast<DType>(e.id);
      return true;
    }
  }
  return false;
}

size_t row_bytes(DType t, int64_t n) {
  const DTypeInfo* i = dtype_info(t);
  return static_cast<size_t>(n / i->block_size) * i->block_bytes;
}

}  // namespace larder
