// Model quantization: GGUF in, GGUF out, with llama.cpp's per-tensor type recipes
// (llama_tensor_get_type) so Q4_K_M etc. files match what llama-quantize produces.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/result.h"
#include "model/dtype.h"

namespace larder {

class GgufFile;

// A target file type: the default tensor type plus llama.cpp's LLAMA_FTYPE number
// (written to general.file_type).
struct QuantFileType {
  const char* name;     // canonical spelling, e.g. "Q4_K_M"
  DType base;           // type of most 2-D weights
  int llama_ftype;      // LLAMA_FTYPE_* value
};

// Accepts f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_K (= Q4_K_S) q5_K (= Q5_K_S) q6_K Q4_K_M
// Q5_K_M Q4_K_S Q5_K_S, case-insensitively.
Result<QuantFileType> parse_quant_file_type(const std::string& s);
// "f32, f16, ..." for messages.
std::string quant_file_type_list();

// What happens to one tensor.
struct TensorPlan {
  std::string name;
  DType from = DType::F32;
  DType to = DType::F32;
  bool convert = false;   // false: bytes copied unchanged
  std::string note;       // e.g. "172 columns not a multiple of 256: q4_K -> q5_0 fallback"
};

// The per-tensor types llama.cpp's recipe gives `file` for `ft` (in the file's tensor order).
std::vector<TensorPlan> plan_quantization(const GgufFile& file, const QuantFileType& ft);

struct QuantizeOptions {
  int n_threads = 0;  // 0 = all cores
  // Called with one line per tensor (progress) and per notable event; may be empty.
  std::function<void(const std::string&)> log;
};

struct QuantizeReport {
  size_t bytes_in = 0, bytes_out = 0;  // tensor data
  uint64_t n_elements = 0;
  int n_tensors = 0, n_converted = 0, n_fallback = 0;
};

// Reads `in`, converts every tensor per plan_quantization, copies all metadata (general.file_type
// and general.quantization_version updated) and writes `out` atomically (no partial file on error).
Result<QuantizeReport> quantize_gguf(const std::string& in, const std::string& out, const QuantFileType& ft,
                                     const QuantizeOptions& opt = {});

}  // namespace larder
