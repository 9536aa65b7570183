#include "model/gguf.h"

#include <cinttypes>
#include <cstring>
#include <limits>

namespace larder {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kMaxTensors = 1u << 20;
constexpr uint64_t kMaxKV = 1u << 20;
constexpr int kMaxArrayDepth = 4;

// Bounds-checked reader; throws LoadError (caught at the parse boundary).
class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return n_ - pos_; }
  template <class T>
  T get(const char* what) {
    if (remaining() < sizeof(T)) fail("truncated file while reading %s", what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(const char* what) {
    uint64_t len = get<uint64_t>(what);
    if (len > remaining()) fail("string length %" PRIu64 " exceeds file size while reading %s", len, what);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  template <class... A>
  [[noreturn]] static void fail(const char* fmt, A... a) {
    throw LoadError{make_error(fmt, a...).msg};
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
    case GgufType::UINT16: case GgufType::INT16: return 2;
    case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
    case GgufType::UINT64: case GgufType::INT64: case GgufType::FLOAT64: return 8;
    default: return 0;
  }
}

bool valid_type(uint32_t t) { return t <= 12; }

void read_scalar(Cursor& c, GgufType t, int64_t* iv, double* fv) {
  switch (t) {
    case GgufType::UINT8: *iv = c.get<uint8_t>("u8"); break;
    case GgufType::INT8: *iv = c.get<int8_t>("i8"); break;
    case GgufType::UINT16: *iv = c.get<uint16_t>("u16"); break;
    case GgufType::INT16: *iv = c.get<int16_t>("i16"); break;
    case GgufType::UINT32: *iv = c.get<uint32_t>("u32"); break;
    case GgufType::INT32: *iv = c.get<int32_t>("i32"); break;
    case GgufType::UINT64: *iv = static_cast<int64_t>(c.get<uint64_t>("u64")); break;
    case GgufType::INT64: *iv = c.get<int64_t>("i64"); break;
    case GgufType::BOOL: {
      uint8_t b = c.get<uint8_t>("bool");
      if (b > 1) Cursor::fail("invalid bool value %u", b);
      *iv = b;
      break;
    }
    case GgufType::FLOAT32: *fv = c.get<float>("f32"); break;
    case GgufType::FLOAT64: *fv = c.get<double>("f64"); break;
    default: Cursor::fail("not a scalar type");
  }
}

GgufValue read_value(Cursor& c, GgufType t, int depth) {
  GgufValue v;
  v.type = t;
  if (t == GgufType::STRING) {
    v.s = c.str("string value");
  } else if (t == GgufType::ARRAY) {
    if (depth >= kMaxArrayDepth) Cursor::fail("arrays nested too deeply");
    uint32_t et = c.get<uint32_t>("array type");
    if (!valid_type(et)) Cursor::fail("unknown array element type %u", et);
    v.elem_type = static_cast<GgufType>(et);
    uint64_t n = c.get<uint64_t>("array length");
    // Every element takes at least one byte (strings and arrays at least 8).
    size_t min_el = scalar_size(v.elem_type);
    if (min_el == 0) min_el = 8;
    if (n > c.remaining() / min_el) Cursor::fail("array length %" PRIu64 " exceeds file size", n);
    if (v.elem_type == GgufType::STRING) {
      v.arr_str.reserve(n);
      for (uint64_t k = 0; k < n; ++k) v.arr_str.push_back(c.str("array string"));
    } else if (v.elem_type == GgufType::ARRAY) {
      v.arr_arr.reserve(n);
      for (uint64_t k = 0; k < n; ++k) v.arr_arr.push_back(read_value(c, GgufType::ARRAY, depth + 1));
    } else if (v.elem_type == GgufType::FLOAT32 || v.elem_type == GgufType::FLOAT64) {
      v.arr_float.resize(n);
      int64_t dummy;
      for (uint64_t k = 0; k < n; ++k) read_scalar(c, v.elem_type, &dummy, &v.arr_float[k]);
    } else {
      v.arr_int.resize(n);
      double dummy;
      for (uint64_t k = 0; k < n; ++k) read_scalar(c, v.elem_type, &v.arr_int[k], &dummy);
    }
  } else {
    read_scalar(c, t, &v.i, &v.f);
  }
  return v;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                "bool", "str", "arr", "u64", "i64", "f64"};
  auto i = static_cast<uint32_t>(t);
  return i <= 12 ? names[i] : "?";
}

size_t GgufValue::arr_len() const {
  return arr_int.size() + arr_float.size() + arr_str.size() + arr_arr.size();
}
bool GgufValue::is_int() const {
  return type != GgufType::FLOAT32 && type != GgufType::FLOAT64 && type != GgufType::STRING &&
         type != GgufType::ARRAY;
}
bool GgufValue::is_float() const { return type == GgufType::FLOAT32 || type == GgufType::FLOAT64; }

std::string GgufValue::to_string(size_t max_items) const {
  char buf[64];
  switch (type) {
    case GgufType::STRING: {
      std::string s = this->s;
      if (s.size() > 60) s = s.substr(0, 57) + "...";
      std::string out = "\"";
      for (char ch : s) out += (ch == '\n') ? std::string("\\n") : std::string(1, ch);
      return out + "\"";
    }
    case GgufType::FLOAT32: case GgufType::FLOAT64:
      std::snprintf(buf, sizeof buf, "%g", f);
      return buf;
    case GgufType::BOOL: return i ? "true" : "false";
    case GgufType::ARRAY: {
      std::string out = std::string("[") + gguf_type_name(elem_type) + " x " + std::to_string(arr_len()) + "] [";
      size_t n = std::min(arr_len(), max_items);
      for (size_t k = 0; k < n; ++k) {
        if (k) out += ", ";
        if (!arr_str.empty()) {
          std::string s = arr_str[k];
          if (s.size() > 20) s = s.substr(0, 17) + "...";
          out += "\"" + s + "\"";
        } else if (!arr_float.empty()) {
          std::snprintf(buf, sizeof buf, "%g", arr_float[k]);
          out += buf;
        } else if (!arr_int.empty()) {
          out += std::to_string(arr_int[k]);
        } else {
          out += arr_arr[k].to_string(2);
        }
      }
      if (arr_len() > n) out += ", ...";
      return out + "]";
    }
    default:
      if (type == GgufType::UINT64) return std::to_string(static_cast<uint64_t>(i));
      return std::to_string(i);
  }
}

Result<std::shared_ptr<GgufFile>> GgufFile::open(const std::string& path) {
  LARDER_TRY(map, MappedFile::open(path));
  auto g = std::shared_ptr<GgufFile>(new GgufFile());
  g->map_ = map;
  g->base_ = map->data();
  g->size_ = map->size();
  g->path_ = path;
  Status st = g->parse_impl();
  if (!st.ok()) return make_error("%s: %s", path.c_str(), st.error().c_str());
  return g;
}

Result<std::shared_ptr<GgufFile>> GgufFile::parse(const uint8_t* data, size_t size) {
  auto g = std::shared_ptr<GgufFile>(new GgufFile());
  g->base_ = data;
  g->size_ = size;
  g->path_ = "<memory>";
  Status st = g->parse_impl();
  if (!st.ok()) return st.take_error();
  return g;
}

Status GgufFile::parse_impl() {
  try {
    Cursor c(base_, size_);
    if (size_ < 4) return make_error("not a GGUF file (too small: %zu bytes)", size_);
    uint32_t magic = c.get<uint32_t>("magic");
    if (magic != kMagic) return make_error("not a GGUF file (bad magic 0x%08x)", magic);
    version_ = c.get<uint32_t>("version");
    if (version_ != 2 && version_ != 3)
      return make_error("unsupported GGUF version %u (supported: 2, 3)", version_);
    uint64_t n_tensors = c.get<uint64_t>("tensor count");
    uint64_t n_kv = c.get<uint64_t>("metadata count");
    if (n_tensors > kMaxTensors) return make_error("absurd tensor count %" PRIu64, n_tensors);
    if (n_kv > kMaxKV) return make_error("absurd metadata count %" PRIu64, n_kv);
    if (n_tensors > c.remaining() / 24 || n_kv > c.remaining() / 12)
      return make_error("truncated file: %" PRIu64 " tensors and %" PRIu64 " metadata keys declared but only %zu bytes remain",
                        n_tensors, n_kv, c.remaining());
    for (uint64_t k = 0; k < n_kv; ++k) {
      std::string key = c.str("metadata key");
      uint32_t t = c.get<uint32_t>("metadata type");
      if (!valid_type(t)) return make_error("metadata '%s' has unknown type %u", key.c_str(), t);
      GgufValue v = read_value(c, static_cast<GgufType>(t), 0);
      if (kv_index_.count(key)) return make_error("duplicate metadata key '%s'", key.c_str());
      kv_index_[key] = kv_.size();
      kv_.emplace_back(std::move(key), std::move(v));
    }
    if (auto a = get_int("general.alignment")) {
      if (*a <= 0 || *a > (1 << 16) || (*a & (*a - 1)) != 0)
        return make_error("invalid general.alignment %" PRId64, *a);
      alignment_ = static_cast<size_t>(*a);
    }
    tensors_.reserve(n_tensors);
    for (uint64_t k = 0; k < n_tensors; ++k) {
      GgufTensorInfo ti;
      ti.name = c.str("tensor name");
      uint32_t nd = c.get<uint32_t>("tensor dims");
      if (nd < 1 || nd > 4) return make_error("tensor '%s' has %u dimensions (1..4 allowed)", ti.name.c_str(), nd);
      ti.n_dims = static_cast<int>(nd);
      for (uint32_t d = 0; d < nd; ++d) {
        int64_t ne = c.get<int64_t>("tensor shape");
        if (ne <= 0 || ne > (int64_t{1} << 40))
          return make_error("tensor '%s' has invalid dimension %" PRId64, ti.name.c_str(), ne);
        ti.ne[d] = ne;
      }
      uint32_t t = c.get<uint32_t>("tensor type");
      const DTypeInfo* info = dtype_info(t);
      if (!info) return make_error("tensor '%s' has unknown type id %u", ti.name.c_str(), t);
      ti.type = static_cast<DType>(t);
      ti.offset = c.get<uint64_t>("tensor offset");
      // Overflow-safe element count.
      // Checked after every factor: four 2^40 dimensions would overflow even 128 bits.
      int64_t n = 1;
      for (int d = 0; d < 4; ++d) {
        if (ti.ne[d] > (int64_t{1} << 42) / n) return make_error("tensor '%s' is absurdly large", ti.name.c_str());
        n *= ti.ne[d];
      }
      if (ti.ne[0] % info->block_size != 0)
        return make_error("tensor '%s': row length %" PRId64 " is not a multiple of %s block size %d",
                          ti.name.c_str(), ti.ne[0], info->name, info->block_size);
      ti.nbytes = static_cast<size_t>(n / info->block_size * info->block_bytes);
      if (tensor_index_.count(ti.name)) return make_error("duplicate tensor name '%s'", ti.name.c_str());
      tensor_index_[ti.name] = tensors_.size();
      tensors_.push_back(std::move(ti));
    }
    size_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
    if (n_tensors > 0 && data_start > size_) return make_error("truncated file: no tensor data section");
    for (auto& ti : tensors_) {
      if (ti.offset % alignment_ != 0)
        return make_error("tensor '%s' offset %" PRIu64 " is not aligned to %zu", ti.name.c_str(), ti.offset, alignment_);
      if (ti.offset > size_ - data_start || ti.nbytes > size_ - data_start - ti.offset)
        return make_error("truncated file: tensor '%s' (%zu bytes at offset %" PRIu64 ") extends past end of file",
                          ti.name.c_str(), ti.nbytes, ti.offset);
      ti.data = base_ + data_start + ti.offset;
    }
  } catch (const LoadError& e) {
    return Error{e.msg};
  } catch (const std::bad_alloc&) {
    return make_error("out of memory while parsing GGUF metadata");
  }
  return Status::Ok();
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensorInfo* GgufFile::tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::optional<int64_t> GgufFile::get_int(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v || !v->is_int()) return std::nullopt;
  return v->i;
}
std::optional<double> GgufFile::get_float(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_float()) return v->f;
  if (v->is_int()) return static_cast<double>(v->i);
  return std::nullopt;
}
std::optional<bool> GgufFile::get_bool(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v || !v->is_int()) return std::nullopt;
  return v->i != 0;
}
std::optional<std::string> GgufFile::get_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v || v->type != GgufType::STRING) return std::nullopt;
  return v->s;
}
const std::vector<std::string>* GgufFile::get_str_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v || v->type != GgufType::ARRAY || v->elem_type != GgufType::STRING) return nullptr;
  return &v->arr_str;
}
const std::vector<double>* GgufFile::get_float_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v || v->type != GgufType::ARRAY || (v->elem_type != GgufType::FLOAT32 && v->elem_type != GgufType::FLOAT64))
    return nullptr;
  return &v->arr_float;
}
const std::vector<int64_t>* GgufFile::get_int_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v || v->type != GgufType::ARRAY || v->elem_type == GgufType::STRING || v->elem_type == GgufType::ARRAY ||
      v->elem_type == GgufType::FLOAT32 || v->elem_type == GgufType::FLOAT64)
    return nullptr;
  return &v->arr_int;
}

// ---------------------------------------------------------------- writer

void GgufWriter::put(const std::string& k, GgufValue v) {
  for (auto& kv : kv_)
    if (kv.first == k) {
      kv.second = std::move(v);
      return;
    }
  kv_.emplace_back(k, std::move(v));
}
void GgufWriter::set_u32(const std::string& k, uint32_t x) { GgufValue v; v.type = GgufType::UINT32; v.i = x; put(k, v); }
void GgufWriter::set_i32(const std::string& k, int32_t x) { GgufValue v; v.type = GgufType::INT32; v.i = x; put(k, v); }
void GgufWriter::set_u64(const std::string& k, uint64_t x) { GgufValue v; v.type = GgufType::UINT64; v.i = static_cast<int64_t>(x); put(k, v); }
void GgufWriter::set_f32(const std::string& k, float x) { GgufValue v; v.type = GgufType::FLOAT32; v.f = x; put(k, v); }
void GgufWriter::set_bool(const std::string& k, bool x) { GgufValue v; v.type = GgufType::BOOL; v.i = x; put(k, v); }
void GgufWriter::set_str(const std::string& k, const std::string& x) { GgufValue v; v.type = GgufType::STRING; v.s = x; put(k, v); }
void GgufWriter::set_arr_str(const std::string& k, const std::vector<std::string>& x) {
  GgufValue v; v.type = GgufType::ARRAY; v.elem_type = GgufType::STRING; v.arr_str = x; put(k, v);
}
void GgufWriter::set_arr_f32(const std::string& k, const std::vector<float>& x) {
  GgufValue v; v.type = GgufType::ARRAY; v.elem_type = GgufType::FLOAT32; v.arr_float.assign(x.begin(), x.end()); put(k, v);
}
void GgufWriter::set_arr_i32(const std::string& k, const std::vector<int32_t>& x) {
  GgufValue v; v.type = GgufType::ARRAY; v.elem_type = GgufType::INT32; v.arr_int.assign(x.begin(), x.end()); put(k, v);
}
void GgufWriter::set_value(const std::string& k, const GgufValue& v) { put(k, v); }

void GgufWriter::add_tensor(const std::string& name, DType type, std::vector<int64_t> ne, const void* data,
                            size_t nbytes) {
  tensors_.push_back({name, type, std::move(ne), data, nbytes, nullptr});
}
void GgufWriter::add_tensor_copy(const std::string& name, DType type, std::vector<int64_t> ne,
                                 std::vector<uint8_t> bytes) {
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  tensors_.push_back({name, type, std::move(ne), owned->data(), owned->size(), owned});
}

namespace {
struct Out {
  FILE* f;
  bool ok = true;
  uint64_t pos = 0;
  void raw(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f) != n) ok = false;
    pos += n;
  }
  template <class T>
  void pod(T v) { raw(&v, sizeof v); }
  void str(const std::string& s) { pod<uint64_t>(s.size()); raw(s.data(), s.size()); }
  void scalar(GgufType t, int64_t i, double fl) {
    switch (t) {
      case GgufType::UINT8: pod<uint8_t>(i); break;
      case GgufType::INT8: pod<int8_t>(i); break;
      case GgufType::UINT16: pod<uint16_t>(i); break;
      case GgufType::INT16: pod<int16_t>(i); break;
      case GgufType::UINT32: pod<uint32_t>(i); break;
      case GgufType::INT32: pod<int32_t>(i); break;
      case GgufType::UINT64: pod<uint64_t>(i); break;
      case GgufType::INT64: pod<int64_t>(i); break;
      case GgufType::BOOL: pod<uint8_t>(i ? 1 : 0); break;
      case GgufType::FLOAT32: pod<float>(static_cast<float>(fl)); break;
      case GgufType::FLOAT64: pod<double>(fl); break;
      default: ok = false;
    }
  }
  void value(const GgufValue& v) {
    if (v.type == GgufType::STRING) {
      str(v.s);
    } else if (v.type == GgufType::ARRAY) {
      pod<uint32_t>(static_cast<uint32_t>(v.elem_type));
      pod<uint64_t>(v.arr_len());
      for (const auto& s : v.arr_str) str(s);
      for (auto x : v.arr_int) scalar(v.elem_type, x, 0);
      for (auto x : v.arr_float) scalar(v.elem_type, 0, x);
      for (const auto& a : v.arr_arr) value(a);
    } else {
      scalar(v.type, v.i, v.f);
    }
  }
  void pad_to(size_t a) {
    static const uint8_t zeros[64] = {};
    while (pos % a) raw(zeros, std::min<size_t>(a - pos % a, sizeof zeros));
  }
};
}  // namespace

Status GgufWriter::write(const std::string& path, size_t alignment) const {
  std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) return make_error("cannot create '%s': %s", tmp.c_str(), std::strerror(errno));
  Out o{f};
  o.pod<uint32_t>(kMagic);
  o.pod<uint32_t>(3);
  o.pod<uint64_t>(tensors_.size());
  bool has_align = false;
  for (auto& kv : kv_) has_align |= kv.first == "general.alignment";
  o.pod<uint64_t>(kv_.size() + (alignment != 32 && !has_align ? 1 : 0));
  for (auto& kv : kv_) {
    o.str(kv.first);
    o.pod<uint32_t>(static_cast<uint32_t>(kv.second.type));
    o.value(kv.second);
  }
  if (alignment != 32 && !has_align) {
    o.str("general.alignment");
    o.pod<uint32_t>(static_cast<uint32_t>(GgufType::UINT32));
    o.pod<uint32_t>(static_cast<uint32_t>(alignment));
  }
  uint64_t off = 0;
  for (auto& t : tensors_) {
    o.str(t.name);
    o.pod<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (auto n : t.ne) o.pod<int64_t>(n);
    o.pod<uint32_t>(static_cast<uint32_t>(t.type));
    o.pod<uint64_t>(off);
    off += (t.nbytes + alignment - 1) / alignment * alignment;
  }
  o.pad_to(alignment);
  for (auto& t : tensors_) {
    o.raw(t.data, t.nbytes);
    o.pad_to(alignment);
  }
  bool closed = std::fclose(f) == 0;
  if (!o.ok || !closed) {
    std::remove(tmp.c_str());
    return make_error("error writing '%s' (disk full?)", path.c_str());
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return make_error("cannot rename '%s' to '%s': %s", tmp.c_str(), path.c_str(), std::strerror(errno));
  }
  return Status::Ok();
}

}  // namespace larder
