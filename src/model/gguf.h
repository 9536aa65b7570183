// GGUF v2/v3 reader (mmap, zero-copy tensor data) and writer.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/mmap_file.h"
#include "core/result.h"
#include "model/dtype.h"

namespace larder {

enum class GgufType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);

struct GgufValue {
  GgufType type = GgufType::UINT8;
  GgufType elem_type = GgufType::UINT8;  // for arrays
  // Scalars: integers/bools in i (u64 values above INT64_MAX wrap), floats in f.
  int64_t i = 0;
  double f = 0;
  std::string s;
  // Arrays: exactly one of these is filled, by element kind.
  std::vector<int64_t> arr_int;    // integer and bool elements
  std::vector<double> arr_float;   // float32/float64 elements
  std::vector<std::string> arr_str;
  std::vector<GgufValue> arr_arr;  // nested arrays
  size_t arr_len() const;
  bool is_int() const;
  bool is_float() const;
  // Short human-readable rendering (arrays abbreviated).
  std::string to_string(size_t max_items = 8) const;
};

struct GgufTensorInfo {
  std::string name;
  DType type = DType::F32;
  int n_dims = 0;
  int64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the innermost (contiguous) dimension
  uint64_t offset = 0;           // relative to the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

class GgufFile {
 public:
  // Maps and parses a file. Tensor data pointers stay valid while the GgufFile lives.
  static Result<std::shared_ptr<GgufFile>> open(const std::string& path);
  // Parses an in-memory image (used by the fuzzer); the buffer must outlive the result.
  static Result<std::shared_ptr<GgufFile>> parse(const uint8_t* data, size_t size);

  uint32_t version() const { return version_; }
  size_t alignment() const { return alignment_; }
  const std::vector<std::pair<std::string, GgufValue>>& kv() const { return kv_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufValue* find(const std::string& key) const;
  const GgufTensorInfo* tensor(const std::string& name) const;

  std::optional<int64_t> get_int(const std::string& key) const;
  std::optional<double> get_float(const std::string& key) const;  // accepts ints too
  std::optional<bool> get_bool(const std::string& key) const;
  std::optional<std::string> get_string(const std::string& key) const;
  const std::vector<std::string>* get_str_array(const std::string& key) const;
  const std::vector<double>* get_float_array(const std::string& key) const;
  const std::vector<int64_t>* get_int_array(const std::string& key) const;

  size_t file_size() const { return size_; }
  const std::string& path() const { return path_; }
  // True when [p, p + n) lies in this file's read-only mapping (not an in-memory image).
  bool mapped(const void* p, size_t n) const {
    const auto* b = static_cast<const uint8_t*>(p);
    return map_ && b >= base_ && n <= size_ && b - base_ <= static_cast<std::ptrdiff_t>(size_ - n);
  }

 private:
  GgufFile() = default;
  Status parse_impl();

  std::shared_ptr<MappedFile> map_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::string path_;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Builds a GGUF v3 file. Metadata keys keep insertion order.
class GgufWriter {
 public:
  void set_u32(const std::string& k, uint32_t v);
  void set_i32(const std::string& k, int32_t v);
  void set_u64(const std::string& k, uint64_t v);
  void set_f32(const std::string& k, float v);
  void set_bool(const std::string& k, bool v);
  void set_str(const std::string& k, const std::string& v);
  void set_arr_str(const std::string& k, const std::vector<std::string>& v);
  void set_arr_f32(const std::string& k, const std::vector<float>& v);
  void set_arr_i32(const std::string& k, const std::vector<int32_t>& v);
  // Copies a generic value (e.g. from another GGUF file).
  void set_value(const std::string& k, const GgufValue& v);
  // ne[0] is the innermost dimension; data must hold exactly the tensor's bytes
  // and stay alive until write().
  void add_tensor(const std::string& name, DType type, std::vector<int64_t> ne, const void* data,
                  size_t nbytes);
  // Same, but the writer keeps its own copy of the bytes.
  void add_tensor_copy(const std::string& name, DType type, std::vector<int64_t> ne,
                       std::vector<uint8_t> bytes);
  Status write(const std::string& path, size_t alignment = 32) const;

 private:
  struct T {
    std::string name;
    DType type;
    std::vector<int64_t> ne;
    const void* data;
    size_t nbytes;
    std::shared_ptr<std::vector<uint8_t>> owned;
  };
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<T> tensors_;
  void put(const std::string& k, GgufValue v);
};

}  // namespace larder
