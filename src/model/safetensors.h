// safetensors reader (mmap, zero-copy): 8-byte little-endian header length, a JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {...}}, then raw
// little-endian tensor bytes. Every field is validated against the file size.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/mmap_file.h"
#include "core/result.h"
#include "model/dtype.h"

namespace larder {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;            // as written in the file: "F32", "BF16", "I64", ...
  size_t elem_size = 0;         // bytes per element of `dtype`
  std::vector<int64_t> shape;   // outermost first (row-major, like PyTorch)
  uint64_t begin = 0, end = 0;  // byte range relative to the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};

// A tensor as the model sees it: GGML order, ne[0] innermost. A safetensors
// [rows, cols] matrix becomes ne {cols, rows}.
struct SafetensorsView {
  std::string name;
  DType type = DType::F32;
  int n_dims = 0;
  int64_t ne[4] = {1, 1, 1, 1};
  const void* data = nullptr;
  size_t nbytes = 0;
};

// True when JSON text nests objects/arrays at most max_depth deep (checked before parsing,
// because nlohmann's parser and destructor recurse).
bool json_nesting_ok(const char* text, size_t n, int max_depth = 64);

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100u << 20;

  // Maps and parses a file; tensor data pointers stay valid while the object lives.
  static Result<std::shared_ptr<SafetensorsFile>> open(const std::string& path);
  // Parses an in-memory image (used by the fuzzer and tests); the buffer must outlive the result.
  static Result<std::shared_ptr<SafetensorsFile>> parse(const uint8_t* data, size_t size);

  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsTensor* find(const std::string& name) const;
  // Typed view for loading: F32/F16/BF16 with 1..4 dims; other dtypes give a clear error.
  Result<SafetensorsView> get(const std::string& name) const;
  static Result<SafetensorsView> view(const SafetensorsTensor& t);

  size_t file_size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;
  Status parse_impl();

  std::shared_ptr<MappedFile> map_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::string path_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace larder
