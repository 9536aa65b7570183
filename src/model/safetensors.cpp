#include "model/safetensors.h"

#include <cinttypes>
#include <cstring>
#include <nlohmann/json.hpp>

namespace larder {

namespace {

using json = nlohmann::json;

struct StDtype {
  const char* name;
  size_t size;
  bool loadable;
  DType type;
};
// Every dtype the format defines, so files with integer buffers (e.g. position ids) still
// parse; only the float types map onto model tensors.
const StDtype kDtypes[] = {
    {"F32", 4, true, DType::F32},    {"F16", 2, true, DType::F16},     {"BF16", 2, true, DType::BF16},
    {"F64", 8, false, DType::F64},   {"I64", 8, false, DType::I64},    {"I32", 4, false, DType::I32},
    {"I16", 2, false, DType::I16},   {"I8", 1, false, DType::I8},      {"U64", 8, false, DType::F32},
    {"U32", 4, false, DType::F32},   {"U16", 2, false, DType::F32},    {"U8", 1, false, DType::F32},
    {"BOOL", 1, false, DType::F32},  {"F8_E4M3", 1, false, DType::F32}, {"F8_E5M2", 1, false, DType::F32},
};
constexpr int kMaxDims = 8;

const StDtype* find_dtype(const std::string& s) {
  for (const auto& d : kDtypes)
    if (s == d.name) return &d;
  return nullptr;
}

}  // namespace

bool json_nesting_ok(const char* p, size_t n, int max_depth) {
  int depth = 0;
  bool in_str = false, esc = false;
  for (size_t i = 0; i < n; ++i) {
    char ch = p[i];
    if (in_str) {
      if (esc) esc = false;
      else if (ch == '\\') esc = true;
      else if (ch == '"') in_str = false;
    } else if (ch == '"') {
      in_str = true;
    } else if (ch == '{' || ch == '[') {
      if (++depth > max_depth) return false;
    } else if (ch == '}' || ch == ']') {
      if (--depth < 0) return false;  // unbalanced: invalid JSON anyway
    }
  }
  return true;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

Result<std::shared_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  LARDER_TRY(map, MappedFile::open(path));
  auto f = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  f->map_ = map;
  f->base_ = map->data();
  f->size_ = map->size();
  f->path_ = path;
  Status st = f->parse_impl();
  if (!st.ok()) return make_error("%s: %s", path.c_str(), st.error().c_str());
  return f;
}

Result<std::shared_ptr<SafetensorsFile>> SafetensorsFile::parse(const uint8_t* data, size_t size) {
  auto f = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  f->base_ = data;
  f->size_ = size;
  f->path_ = "<memory>";
  Status st = f->parse_impl();
  if (!st.ok()) return st.take_error();
  return f;
}

Status SafetensorsFile::parse_impl() {
  if (size_ < 8) return make_error("not a safetensors file (too small: %zu bytes)", size_);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | base_[i];  // little-endian regardless of host
  if (hlen > kMaxHeaderBytes)
    return make_error("safetensors header length %" PRIu64 " is absurd (limit %" PRIu64 " bytes)", hlen,
                      kMaxHeaderBytes);
  if (hlen > size_ - 8)
    return make_error("truncated safetensors file: header needs %" PRIu64 " bytes, file has %zu", hlen + 8, size_);
  if (hlen < 2) return make_error("safetensors header is empty");
  const char* hp = reinterpret_cast<const char*>(base_ + 8);
  const uint8_t* data = base_ + 8 + hlen;
  const uint64_t data_size = size_ - 8 - hlen;
  if (hp[0] != '{') return make_error("not a safetensors file (header does not start with '{')");
  if (!json_nesting_ok(hp, hlen)) return make_error("safetensors header JSON is unbalanced or nested too deeply");

  try {
    json h = json::parse(hp, hp + hlen, nullptr, /*allow_exceptions=*/false);
    if (h.is_discarded()) return make_error("safetensors header is not valid JSON");
    if (!h.is_object()) return make_error("safetensors header is not a JSON object");
    tensors_.reserve(h.size());
    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) return make_error("safetensors __metadata__ is not an object");
        // The format says string values; keep others in their JSON spelling rather than fail.
        for (auto m = v.begin(); m != v.end(); ++m)
          metadata_[m.key()] = m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
        continue;
      }
      const char* nm = name.c_str();
      if (!v.is_object()) return make_error("safetensors entry '%s' is not an object", nm);
      auto dt = v.find("dtype");
      auto sh = v.find("shape");
      auto off = v.find("data_offsets");
      if (dt == v.end() || !dt->is_string()) return make_error("tensor '%s': missing or invalid \"dtype\"", nm);
      if (sh == v.end() || !sh->is_array()) return make_error("tensor '%s': missing or invalid \"shape\"", nm);
      if (off == v.end() || !off->is_array() || off->size() != 2)
        return make_error("tensor '%s': \"data_offsets\" must be [begin, end]", nm);
      SafetensorsTensor t;
      t.name = name;
      t.dtype = dt->get<std::string>();
      const StDtype* info = find_dtype(t.dtype);
      if (!info) return make_error("tensor '%s': unknown dtype \"%.32s\"", nm, t.dtype.c_str());
      t.elem_size = info->size;
      if (sh->size() > static_cast<size_t>(kMaxDims))
        return make_error("tensor '%s' has %zu dimensions (at most %d allowed)", nm, sh->size(), kMaxDims);
      __int128 n_el = 1;
      for (const auto& d : *sh) {
        if (!d.is_number_unsigned()) return make_error("tensor '%s': shape entries must be non-negative integers", nm);
        uint64_t dv = d.get<uint64_t>();
        if (dv > (uint64_t{1} << 40)) return make_error("tensor '%s' has absurd dimension %" PRIu64, nm, dv);
        t.shape.push_back(static_cast<int64_t>(dv));
        n_el *= dv;
        if (n_el > (__int128{1} << 50)) return make_error("tensor '%s' is absurdly large", nm);
      }
      const json& b = (*off)[0];
      const json& e = (*off)[1];
      if (!b.is_number_unsigned() || !e.is_number_unsigned())
        return make_error("tensor '%s': data_offsets must be non-negative integers", nm);
      t.begin = b.get<uint64_t>();
      t.end = e.get<uint64_t>();
      if (t.begin > t.end)
        return make_error("tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 ") are reversed", nm, t.begin, t.end);
      if (t.end > data_size)
        return make_error("truncated safetensors file: tensor '%s' [%" PRIu64 ", %" PRIu64
                          ") extends past the data section (%" PRIu64 " bytes)",
                          nm, t.begin, t.end, data_size);
      const __int128 want = n_el * static_cast<__int128>(t.elem_size);
      if (want != static_cast<__int128>(t.end - t.begin))
        return make_error("tensor '%s': %s %s needs %lld bytes but data_offsets span %" PRIu64, nm,
                          t.dtype.c_str(), shape_str(t.shape).c_str(), static_cast<long long>(want),
                          t.end - t.begin);
      t.data = data + t.begin;
      t.nbytes = static_cast<size_t>(t.end - t.begin);
      index_[t.name] = tensors_.size();
      tensors_.push_back(std::move(t));
    }
  } catch (const json::exception& e) {
    return make_error("safetensors header: %s", e.what());
  } catch (const std::bad_alloc&) {
    return make_error("out of memory while parsing the safetensors header");
  }
  return Status::Ok();
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Result<SafetensorsView> SafetensorsFile::view(const SafetensorsTensor& t) {
  const StDtype* info = find_dtype(t.dtype);
  if (!info || !info->loadable)
    return make_error("tensor '%s' has dtype %s; only F32, F16 and BF16 can be loaded", t.name.c_str(),
                      t.dtype.c_str());
  if (t.shape.empty() || t.shape.size() > 4)
    return make_error("tensor '%s' has %zu dimensions; 1 to 4 are supported", t.name.c_str(), t.shape.size());
  SafetensorsView v;
  v.name = t.name;
  v.type = info->type;
  v.n_dims = static_cast<int>(t.shape.size());
  for (int d = 0; d < v.n_dims; ++d) {
    v.ne[d] = t.shape[v.n_dims - 1 - d];  // reverse: innermost first
    if (v.ne[d] == 0) return make_error("tensor '%s' is empty (shape %s)", t.name.c_str(), shape_str(t.shape).c_str());
  }
  v.data = t.data;
  v.nbytes = t.nbytes;
  return v;
}

Result<SafetensorsView> SafetensorsFile::get(const std::string& name) const {
  const SafetensorsTensor* t = find(name);
  if (!t) return make_error("tensor '%s' not found", name.c_str());
  return view(*t);
}

}  // namespace larder
