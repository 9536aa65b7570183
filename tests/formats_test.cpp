// File formats: GGUF writer/reader round trips and corruption handling, safetensors parsing,
// the llama2.c checkpoint loader and the Hugging Face folder loader.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/mmap_file.h"
#include "kernels/kernels.h"
#include "model/gguf.h"
#include "model/model.h"
#include "model/safetensors.h"

namespace fs = std::filesystem;
using namespace larder;

namespace {

std::string shared_dir() {
  if (const char* s = std::getenv("LARDER_SHARED"); s && *s) return s;
  return std::string(LARDER_SOURCE_DIR) + "/../shared";
}
std::string stories(const char* f) { return shared_dir() + "/models/stories260K/" + f; }

#define REQUIRE_FILE(p)                                                   \
  do {                                                                    \
    if (!file_exists(p)) GTEST_SKIP() << "shared data missing: " << (p);  \
  } while (0)

struct TempDir {
  fs::path p;
  TempDir() {
    char t[] = "/tmp/larder_formats_XXXXXX";
    p = mkdtemp(t);
  }
  ~TempDir() { fs::remove_all(p); }
  std::string operator/(const std::string& f) const { return (p / f).string(); }
};

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}
void write_bytes(const std::string& path, const uint8_t* p, size_t n) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n));
}
void write_bytes(const std::string& path, const std::vector<uint8_t>& b) { write_bytes(path, b.data(), b.size()); }
void write_text(const std::string& path, const std::string& s) {
  write_bytes(path, reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    b[i] = static_cast<uint8_t>(seed >> 24);
  }
  return b;
}

// ---------------------------------------------------------------- GGUF round trip

GgufValue scalar_i(GgufType t, int64_t i) {
  GgufValue v;
  v.type = t;
  v.i = i;
  return v;
}
GgufValue scalar_f(GgufType t, double f) {
  GgufValue v;
  v.type = t;
  v.f = f;
  return v;
}
GgufValue array_of(GgufType et) {
  GgufValue v;
  v.type = GgufType::ARRAY;
  v.elem_type = et;
  return v;
}

void expect_same(const GgufValue& a, const GgufValue& b, const std::string& key) {
  SCOPED_TRACE(key);
  ASSERT_EQ(a.type, b.type);
  switch (a.type) {
    case GgufType::STRING: EXPECT_EQ(a.s, b.s); break;
    case GgufType::FLOAT32: case GgufType::FLOAT64: EXPECT_EQ(a.f, b.f); break;
    case GgufType::ARRAY:
      ASSERT_EQ(a.elem_type, b.elem_type);
      ASSERT_EQ(a.arr_len(), b.arr_len());
      EXPECT_EQ(a.arr_int, b.arr_int);
      EXPECT_EQ(a.arr_float, b.arr_float);
      EXPECT_EQ(a.arr_str, b.arr_str);
      for (size_t k = 0; k < a.arr_arr.size(); ++k) expect_same(a.arr_arr[k], b.arr_arr[k], key + "[" + std::to_string(k) + "]");
      break;
    default: EXPECT_EQ(a.i, b.i);
  }
}

std::vector<std::pair<std::string, GgufValue>> all_value_kinds() {
  std::vector<std::pair<std::string, GgufValue>> kv;
  kv.push_back({"u8", scalar_i(GgufType::UINT8, 250)});
  kv.push_back({"i8", scalar_i(GgufType::INT8, -128)});
  kv.push_back({"u16", scalar_i(GgufType::UINT16, 65535)});
  kv.push_back({"i16", scalar_i(GgufType::INT16, -32768)});
  kv.push_back({"u32", scalar_i(GgufType::UINT32, 4294967295LL)});
  kv.push_back({"i32", scalar_i(GgufType::INT32, std::numeric_limits<int32_t>::min())});
  kv.push_back({"u64", scalar_i(GgufType::UINT64, -1)});  // UINT64_MAX wraps to -1 by contract
  kv.push_back({"i64", scalar_i(GgufType::INT64, std::numeric_limits<int64_t>::min())});
  kv.push_back({"bool", scalar_i(GgufType::BOOL, 1)});
  kv.push_back({"f32", scalar_f(GgufType::FLOAT32, -3.25)});
  kv.push_back({"f64", scalar_f(GgufType::FLOAT64, 1e300)});
  GgufValue s;
  s.type = GgufType::STRING;
  s.s = std::string("h\xc3\xa9llo\0world", 12);
  kv.push_back({"str", s});
  GgufValue empty_s;
  empty_s.type = GgufType::STRING;
  kv.push_back({"str.empty", empty_s});
  const std::pair<GgufType, std::vector<int64_t>> int_arrays[] = {
      {GgufType::UINT8, {0, 255}},       {GgufType::INT8, {-128, 127}},
      {GgufType::UINT16, {0, 65535}},    {GgufType::INT16, {-32768, 32767}},
      {GgufType::UINT32, {0, 4294967295LL}}, {GgufType::INT32, {-5, 2147483647}},
      {GgufType::UINT64, {0, -1}},       {GgufType::INT64, {std::numeric_limits<int64_t>::max(), -7}},
      {GgufType::BOOL, {1, 0, 1}},
  };
  for (const auto& [t, vals] : int_arrays) {
    GgufValue a = array_of(t);
    a.arr_int = vals;
    kv.push_back({std::string("arr.") + gguf_type_name(t), a});
  }
  GgufValue af = array_of(GgufType::FLOAT32);
  af.arr_float = {1.5, -0.0, 1e-3f};
  kv.push_back({"arr.f32", af});
  GgufValue ad = array_of(GgufType::FLOAT64);
  ad.arr_float = {1e-300, 2.0};
  kv.push_back({"arr.f64", ad});
  GgufValue as = array_of(GgufType::STRING);
  as.arr_str = {"", "x", "\xe2\x96\x81unicode"};
  kv.push_back({"arr.str", as});
  kv.push_back({"arr.empty", array_of(GgufType::UINT32)});
  // Nested: [[1,2],[3]] of i32, [["a"],[]] of str, and three levels deep.
  GgufValue n1 = array_of(GgufType::ARRAY);
  GgufValue x = array_of(GgufType::INT32), y = array_of(GgufType::INT32);
  x.arr_int = {1, 2};
  y.arr_int = {3};
  n1.arr_arr = {x, y};
  kv.push_back({"arr.nested.i32", n1});
  GgufValue n2 = array_of(GgufType::ARRAY);
  GgufValue sa = array_of(GgufType::STRING), sb = array_of(GgufType::STRING);
  sa.arr_str = {"a"};
  n2.arr_arr = {sa, sb};
  kv.push_back({"arr.nested.str", n2});
  GgufValue n3 = array_of(GgufType::ARRAY);
  GgufValue mid = array_of(GgufType::ARRAY);
  GgufValue leaf = array_of(GgufType::UINT8);
  leaf.arr_int = {9};
  mid.arr_arr = {leaf};
  n3.arr_arr = {mid, mid};
  kv.push_back({"arr.nested.3", n3});
  return kv;
}

struct TestTensor {
  std::string name;
  DType type;
  std::vector<int64_t> ne;
  std::vector<uint8_t> bytes;
};

std::vector<TestTensor> all_tensor_kinds() {
  return {
      {"t.f32", DType::F32, {7, 3}, pattern(7 * 3 * 4, 1)},
      {"t.f16", DType::F16, {5, 2}, pattern(5 * 2 * 2, 2)},
      {"t.bf16", DType::BF16, {3, 2, 2}, pattern(3 * 2 * 2 * 2, 3)},
      {"t.q8_0", DType::Q8_0, {64, 2}, pattern(4 * 34, 4)},
      {"t.q4_0", DType::Q4_0, {32, 3}, pattern(3 * 18, 5)},
      {"t.f32.1d", DType::F32, {1}, pattern(4, 6)},
  };
}

TEST(GgufFormat, RoundTripEveryValueTypeAndTensorType) {
  for (size_t align : {size_t{32}, size_t{64}}) {
    SCOPED_TRACE("alignment " + std::to_string(align));
    TempDir d;
    GgufWriter w;
    auto kv = all_value_kinds();
    for (const auto& [k, v] : kv) w.set_value(k, v);
    auto tensors = all_tensor_kinds();
    for (const auto& t : tensors) w.add_tensor(t.name, t.type, t.ne, t.bytes.data(), t.bytes.size());
    ASSERT_TRUE(w.write(d / "rt.gguf", align).ok());

    auto r = GgufFile::open(d / "rt.gguf");
    ASSERT_TRUE(r.ok()) << r.error();
    const GgufFile& g = *r.value();
    EXPECT_EQ(g.version(), 3u);
    EXPECT_EQ(g.alignment(), align);
    for (const auto& [k, v] : kv) {
      const GgufValue* got = g.find(k);
      ASSERT_NE(got, nullptr) << k;
      expect_same(v, *got, k);
    }
    EXPECT_EQ(g.get_string("str").value(), std::string("h\xc3\xa9llo\0world", 12));
    EXPECT_EQ(g.find("u64")->to_string(), "18446744073709551615");
    EXPECT_FALSE(g.get_int("str").has_value());
    EXPECT_EQ(g.get_float("u8").value(), 250.0);
    ASSERT_EQ(g.tensors().size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TestTensor& want = tensors[i];
      SCOPED_TRACE(want.name);
      const GgufTensorInfo* ti = g.tensor(want.name);
      ASSERT_NE(ti, nullptr);
      EXPECT_EQ(ti->type, want.type);
      EXPECT_EQ(ti->n_dims, static_cast<int>(want.ne.size()));
      for (size_t k = 0; k < 4; ++k) EXPECT_EQ(ti->ne[k], k < want.ne.size() ? want.ne[k] : 1);
      ASSERT_EQ(ti->nbytes, want.bytes.size());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(ti->data) % align, 0u);  // the mapping is page-aligned
      EXPECT_EQ(0, std::memcmp(ti->data, want.bytes.data(), want.bytes.size()));
    }
    // The in-memory parser sees the same file.
    auto bytes = read_bytes(d / "rt.gguf");
    auto p = GgufFile::parse(bytes.data(), bytes.size());
    ASSERT_TRUE(p.ok()) << p.error();
    EXPECT_EQ(p.value()->tensors().size(), tensors.size());
    EXPECT_EQ(p.value()->kv().size(), g.kv().size());
  }
}

TEST(GgufFormat, ReadsStories260K) {
  const std::string path = stories("stories260K-f32.gguf");
  REQUIRE_FILE(path);
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.error();
  const GgufFile& g = *r.value();
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.tensors().size(), 48u);
  EXPECT_EQ(g.get_string("general.architecture").value_or(""), "llama");
  EXPECT_EQ(g.get_int("llama.embedding_length").value_or(0), 64);
  EXPECT_EQ(g.get_int("llama.block_count").value_or(0), 5);
  ASSERT_NE(g.get_str_array("tokenizer.ggml.tokens"), nullptr);
  EXPECT_EQ(g.get_str_array("tokenizer.ggml.tokens")->size(), 512u);
  const GgufTensorInfo* emb = g.tensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->type, DType::F32);
  EXPECT_EQ(emb->ne[0], 64);
  EXPECT_EQ(emb->ne[1], 512);
}

// ---------------------------------------------------------------- GGUF corruption

// Hand-assembled GGUF that records where each patchable field lives.
struct GgufImage {
  std::vector<uint8_t> b;
  size_t n_tensors, n_kv, key_len, val_len, arr_type, arr_len, kv_type, align_val;
  size_t t0_ndims, t0_ne0, t0_ne1, t0_type, t0_off, t1_name, t1_off;
  size_t data_end;

  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void raw(const void* p, size_t n) {
    auto c = static_cast<const uint8_t*>(p);
    b.insert(b.end(), c, c + n);
  }
  void str(const std::string& s) { u64(s.size()); raw(s.data(), s.size()); }

  GgufImage() {
    u32(0x46554747);
    u32(3);
    n_tensors = b.size(); u64(2);
    n_kv = b.size(); u64(3);
    key_len = b.size(); str("general.architecture");
    kv_type = b.size(); u32(8);
    val_len = b.size(); str("llama");
    str("arr"); u32(9);
    arr_type = b.size(); u32(4);
    arr_len = b.size(); u64(3);
    u32(1); u32(2); u32(3);
    str("general.alignment"); u32(4);
    align_val = b.size(); u32(32);
    str("a");
    t0_ndims = b.size(); u32(2);
    t0_ne0 = b.size(); u64(8);
    t0_ne1 = b.size(); u64(2);
    t0_type = b.size(); u32(0);  // f32, 64 bytes
    t0_off = b.size(); u64(0);
    t1_name = b.size(); str("b");
    u32(1); u64(32);
    u32(1);  // f16, 64 bytes
    t1_off = b.size(); u64(64);
    while (b.size() % 32) b.push_back(0);
    auto data = pattern(128, 42);
    raw(data.data(), data.size());
    data_end = b.size();
  }
  template <class T>
  GgufImage& set(size_t pos, T v) {
    std::memcpy(&b[pos], &v, sizeof v);
    return *this;
  }
};

std::string parse_error(const std::vector<uint8_t>& b) {
  auto r = GgufFile::parse(b.data(), b.size());
  if (r.ok()) return "";
  EXPECT_FALSE(r.error().empty());
  EXPECT_EQ(r.error().find('\n'), std::string::npos) << r.error();
  return r.error().empty() ? "(empty error)" : r.error();
}

TEST(GgufFormat, HandBuiltImageParses) {
  GgufImage img;
  auto r = GgufFile::parse(img.b.data(), img.b.size());
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r.value()->tensors().size(), 2u);
  EXPECT_EQ(r.value()->tensor("b")->data, img.b.data() + img.data_end - 64);
}

TEST(GgufFormat, CorruptFilesGiveCleanErrors) {
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
    const char* expect;  // substring of the error
  };
  std::vector<Case> cases;
  auto patched = [](auto fn) {
    GgufImage g;
    fn(g);
    return g.b;
  };
  cases.push_back({"bad magic", patched([](GgufImage& g) { g.b[0] = 'X'; }), "magic"});
  cases.push_back({"version 99", patched([](GgufImage& g) { g.set<uint32_t>(4, 99); }), "version"});
  cases.push_back({"version 1", patched([](GgufImage& g) { g.set<uint32_t>(4, 1); }), "version"});
  cases.push_back({"absurd tensor count", patched([](GgufImage& g) { g.set<uint64_t>(g.n_tensors, 1ull << 40); }), "tensor count"});
  cases.push_back({"absurd kv count", patched([](GgufImage& g) { g.set<uint64_t>(g.n_kv, ~0ull); }), "metadata count"});
  cases.push_back({"absurd array length", patched([](GgufImage& g) { g.set<uint64_t>(g.arr_len, 1ull << 60); }), "array length"});
  cases.push_back({"array length past end", patched([](GgufImage& g) { g.set<uint64_t>(g.arr_len, 1000); }), ""});
  cases.push_back({"absurd key length", patched([](GgufImage& g) { g.set<uint64_t>(g.key_len, 1ull << 62); }), "string length"});
  cases.push_back({"absurd value length", patched([](GgufImage& g) { g.set<uint64_t>(g.val_len, ~0ull); }), "string length"});
  cases.push_back({"unknown kv type", patched([](GgufImage& g) { g.set<uint32_t>(g.kv_type, 99); }), "type"});
  cases.push_back({"unknown array type", patched([](GgufImage& g) { g.set<uint32_t>(g.arr_type, 13); }), "type"});
  cases.push_back({"unknown tensor type", patched([](GgufImage& g) { g.set<uint32_t>(g.t0_type, 99); }), "type"});
  cases.push_back({"removed tensor type 4", patched([](GgufImage& g) { g.set<uint32_t>(g.t0_type, 4); }), "type"});
  cases.push_back({"row not a block multiple", patched([](GgufImage& g) { g.set<uint32_t>(g.t0_type, 8); }), "block"});
  cases.push_back({"zero dims", patched([](GgufImage& g) { g.set<uint32_t>(g.t0_ndims, 0); }), "dimensions"});
  cases.push_back({"five dims", patched([](GgufImage& g) { g.set<uint32_t>(g.t0_ndims, 5); }), "dimensions"});
  cases.push_back({"zero extent", patched([](GgufImage& g) { g.set<int64_t>(g.t0_ne0, 0); }), "dimension"});
  cases.push_back({"negative extent", patched([](GgufImage& g) { g.set<int64_t>(g.t0_ne1, -2); }), "dimension"});
  cases.push_back({"overflowing shape", patched([](GgufImage& g) {
                     g.set<int64_t>(g.t0_ne0, int64_t{1} << 40).set<int64_t>(g.t0_ne1, int64_t{1} << 40);
                   }), "large"});
  cases.push_back({"misaligned offset", patched([](GgufImage& g) { g.set<uint64_t>(g.t1_off, 65); }), "align"});
  cases.push_back({"tensor past EOF (offset)", patched([](GgufImage& g) { g.set<uint64_t>(g.t1_off, 1ull << 40); }), "past end"});
  cases.push_back({"tensor past EOF (offset wraps)", patched([](GgufImage& g) { g.set<uint64_t>(g.t1_off, ~0ull - 31); }), "past end"});
  cases.push_back({"tensor past EOF (shape)", patched([](GgufImage& g) { g.set<int64_t>(g.t0_ne1, 1 << 20); }), "past end"});
  cases.push_back({"alignment not a power of two", patched([](GgufImage& g) { g.set<uint32_t>(g.align_val, 48); }), "alignment"});
  cases.push_back({"alignment zero", patched([](GgufImage& g) { g.set<uint32_t>(g.align_val, 0); }), "alignment"});
  cases.push_back({"duplicate tensor name", patched([](GgufImage& g) { g.b[g.t1_name + 8] = 'a'; }), "duplicate"});
  cases.push_back({"empty", {}, ""});
  cases.push_back({"three bytes", {'G', 'G', 'U'}, ""});
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    std::string err = parse_error(c.bytes);
    ASSERT_FALSE(err.empty()) << "corrupt file was accepted";
    EXPECT_NE(err.find(c.expect), std::string::npos) << err;
  }
}

TEST(GgufFormat, FourDimShapeOverflowIsAnError) {
  // Four extents of 2^40 overflow even a 128-bit product unless it is checked per dimension
  // (a wrapped product of 0 would make the tensor look empty and valid).
  GgufImage img;
  img.b.clear();
  img.u32(0x46554747);
  img.u32(3);
  img.u64(1);
  img.u64(0);
  img.str("x");
  img.u32(4);
  for (int d = 0; d < 4; ++d) img.u64(uint64_t{1} << 40);
  img.u32(0);
  img.u64(0);
  while (img.b.size() % 32) img.b.push_back(0);
  std::string err = parse_error(img.b);
  ASSERT_FALSE(err.empty()) << "4-D tensor with 2^160 elements was accepted";
  EXPECT_NE(err.find("large"), std::string::npos) << err;
}

TEST(GgufFormat, EveryTruncationIsAnError) {
  GgufImage img;
  for (size_t n = 0; n < img.b.size(); ++n) {
    // Copy into an exact-size buffer so a read past the end is caught by sanitizers too.
    std::vector<uint8_t> cut(img.b.begin(), img.b.begin() + n);
    auto r = GgufFile::parse(cut.data(), cut.size());
    ASSERT_FALSE(r.ok()) << "prefix of " << n << " bytes accepted";
    ASSERT_FALSE(r.error().empty());
  }
}

TEST(GgufFormat, TruncatedRealFileIsAnError) {
  const std::string path = stories("stories260K-f32.gguf");
  REQUIRE_FILE(path);
  auto full = read_bytes(path);
  auto r = GgufFile::parse(full.data(), full.size());
  ASSERT_TRUE(r.ok()) << r.error();
  size_t need = 0;  // end of the last tensor's bytes; anything shorter must fail
  for (const auto& t : r.value()->tensors()) need = std::max<size_t>(need, t.data - full.data() + t.nbytes);
  TempDir d;
  for (size_t n : {size_t{0}, size_t{4}, size_t{23}, size_t{24}, size_t{100}, size_t{5000}, size_t{20000}, need / 2,
                   need - 1}) {
    SCOPED_TRACE(n);
    write_bytes(d / "cut.gguf", full.data(), n);
    auto c = GgufFile::open(d / "cut.gguf");
    ASSERT_FALSE(c.ok());
    EXPECT_FALSE(c.error().empty());
  }
}

// ---------------------------------------------------------------- safetensors

std::vector<uint8_t> st_image(const std::string& header, const std::vector<uint8_t>& data, bool pad = true) {
  std::string h = header;
  while (pad && h.size() % 8) h += ' ';
  std::vector<uint8_t> b(8 + h.size() + data.size());
  uint64_t n = h.size();
  std::memcpy(b.data(), &n, 8);
  if (!h.empty()) std::memcpy(b.data() + 8, h.data(), h.size());
  if (!data.empty()) std::memcpy(b.data() + 8 + h.size(), data.data(), data.size());
  return b;
}

const char* kStHeader =
    R"({"__metadata__":{"format":"pt"},)"
    R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
    R"("n":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
    R"("i":{"dtype":"I64","shape":[1],"data_offsets":[32,40]},)"
    R"("z":{"dtype":"U8","shape":[0],"data_offsets":[40,40]}})";

TEST(SafetensorsFormat, ParsesHandBuiltFile) {
  auto data = pattern(40, 7);
  auto img = st_image(kStHeader, data);
  auto r = SafetensorsFile::parse(img.data(), img.size());
  ASSERT_TRUE(r.ok()) << r.error();
  const SafetensorsFile& f = *r.value();
  EXPECT_EQ(f.tensors().size(), 4u);
  ASSERT_EQ(f.metadata().count("format"), 1u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const size_t data_start = img.size() - data.size();

  auto w = f.get("w");
  ASSERT_TRUE(w.ok()) << w.error();
  EXPECT_EQ(w->type, DType::F32);
  EXPECT_EQ(w->n_dims, 2);
  EXPECT_EQ(w->ne[0], 3);  // [rows, cols] = [2, 3] -> ne {3, 2}
  EXPECT_EQ(w->ne[1], 2);
  EXPECT_EQ(w->nbytes, 24u);
  EXPECT_EQ(w->data, img.data() + data_start);
  ASSERT_NE(f.find("w"), nullptr);
  EXPECT_EQ(f.find("w")->shape, (std::vector<int64_t>{2, 3}));

  auto n = f.get("n");
  ASSERT_TRUE(n.ok()) << n.error();
  EXPECT_EQ(n->type, DType::BF16);
  EXPECT_EQ(n->n_dims, 1);
  EXPECT_EQ(n->ne[0], 4);
  EXPECT_EQ(n->data, img.data() + data_start + 24);

  auto i = f.get("i");
  ASSERT_FALSE(i.ok());
  EXPECT_NE(i.error().find("I64"), std::string::npos) << i.error();
  EXPECT_FALSE(f.get("z").ok());  // empty tensors cannot be model weights
  EXPECT_FALSE(f.get("missing").ok());

  TempDir d;
  write_bytes(d / "x.safetensors", img);
  auto o = SafetensorsFile::open(d / "x.safetensors");
  ASSERT_TRUE(o.ok()) << o.error();
  auto ow = o.value()->get("w");
  ASSERT_TRUE(ow.ok());
  EXPECT_EQ(0, std::memcmp(ow->data, data.data(), 24));
}

TEST(SafetensorsFormat, CorruptFilesGiveCleanErrors) {
  auto data = pattern(40, 7);
  auto with_header = [&](const std::string& h) { return st_image(h, data); };
  auto one = [&](const std::string& entry) { return with_header("{\"w\":" + entry + "}"); };
  std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
  };
  std::vector<Case> cases = {
      {"empty", {}},
      {"seven bytes", {1, 0, 0, 0, 0, 0, 0}},
      {"header length past EOF", [&] { auto b = with_header(kStHeader); b[0] += 100; return b; }()},
      {"header length huge", [&] { auto b = with_header(kStHeader); b[7] = 0x80; return b; }()},
      {"header length 200 MB", [&] { auto b = with_header(kStHeader); uint64_t n = 200u << 20; std::memcpy(b.data(), &n, 8); return b; }()},
      {"zero header length", [&] { auto b = with_header(kStHeader); std::memset(b.data(), 0, 8); return b; }()},
      {"not JSON", with_header("{garbage")},
      {"JSON array", with_header("[1,2]")},
      {"JSON not object at top", with_header("\"str\"")},
      {"deeply nested", with_header(deep)},
      {"entry not an object", one("5")},
      {"missing dtype", one(R"({"shape":[2],"data_offsets":[0,8]})")},
      {"missing shape", one(R"({"dtype":"F32","data_offsets":[0,8]})")},
      {"missing offsets", one(R"({"dtype":"F32","shape":[2]})")},
      {"dtype not a string", one(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})")},
      {"unknown dtype", one(R"({"dtype":"Q9","shape":[2],"data_offsets":[0,8]})")},
      {"negative dim", one(R"({"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]})")},
      {"fractional dim", one(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,8]})")},
      {"size mismatch", one(R"({"dtype":"F32","shape":[2,4],"data_offsets":[0,24]})")},
      {"reversed offsets", one(R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})")},
      {"offsets past data", one(R"({"dtype":"F32","shape":[250],"data_offsets":[0,1000]})")},
      {"offset near 2^64", one(R"({"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551615]})")},
      {"three offsets", one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4,8]})")},
      {"negative offset", one(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})")},
      {"overflowing shape", one(R"({"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]})")},
      {"product wraps to zero", one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]})")},
      {"too many dims", one(R"({"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]})")},
      {"metadata not an object", with_header(R"({"__metadata__":[1]})")},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    auto r = SafetensorsFile::parse(c.bytes.data(), c.bytes.size());
    ASSERT_FALSE(r.ok()) << "corrupt file was accepted";
    EXPECT_FALSE(r.error().empty());
    EXPECT_EQ(r.error().find('\n'), std::string::npos) << r.error();
  }
}

TEST(SafetensorsFormat, EveryTruncationIsAnError) {
  auto img = st_image(kStHeader, pattern(40, 7));
  for (size_t n = 0; n < img.size(); ++n) {
    std::vector<uint8_t> cut(img.begin(), img.begin() + n);
    auto r = SafetensorsFile::parse(cut.data(), cut.size());
    ASSERT_FALSE(r.ok()) << "prefix of " << n << " bytes accepted";
    ASSERT_FALSE(r.error().empty());
  }
}

// ---------------------------------------------------------------- llama2.c

struct L2Header {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

TEST(Llama2cModel, LoadsStories260K) {
  const std::string bin = stories("stories260K.bin");
  REQUIRE_FILE(bin);
  auto r = load_model_llama2c(bin, "");  // finds tok512.bin beside it
  ASSERT_TRUE(r.ok()) << r.error();
  const Model& m = *r.value();
  EXPECT_EQ(m.format, "llama2c");
  EXPECT_EQ(m.cfg.arch, "llama");
  EXPECT_EQ(m.cfg.n_embd, 64);
  EXPECT_EQ(m.cfg.n_ff, 172);
  EXPECT_EQ(m.cfg.n_layer, 5);
  EXPECT_EQ(m.cfg.n_head, 8);
  EXPECT_EQ(m.cfg.n_head_kv, 4);
  EXPECT_EQ(m.cfg.head_dim, 8);
  EXPECT_EQ(m.cfg.n_vocab, 512);
  EXPECT_EQ(m.cfg.n_ctx_train, 512);
  EXPECT_EQ(m.cfg.rope_type, RopeType::NORM);
  EXPECT_FLOAT_EQ(m.cfg.rope_theta, 10000.f);
  EXPECT_TRUE(m.cfg.tied_embeddings);
  EXPECT_EQ(m.output.data, m.tok_embd.data);
  ASSERT_TRUE(m.tokenizer);
  EXPECT_EQ(m.tokenizer->n_vocab(), 512);

  // Every weight must match the GGUF conversion of the same checkpoint byte for byte.
  const std::string gg = stories("stories260K-f32.gguf");
  if (!file_exists(gg)) return;
  auto g = GgufFile::open(gg);
  ASSERT_TRUE(g.ok()) << g.error();
  auto same = [&](const Tensor& t, const std::string& name) {
    SCOPED_TRACE(name);
    const GgufTensorInfo* ti = g.value()->tensor(name);
    ASSERT_NE(ti, nullptr);
    ASSERT_EQ(t.nbytes, ti->nbytes);
    EXPECT_EQ(t.cols(), ti->ne[0]);
    EXPECT_EQ(0, std::memcmp(t.data, ti->data, t.nbytes));
  };
  same(m.tok_embd, "token_embd.weight");
  same(m.output_norm, "output_norm.weight");
  same(m.output, "output.weight");
  for (int i = 0; i < 5; ++i) {
    const LayerWeights& l = m.layers[i];
    const std::string p = "blk." + std::to_string(i) + ".";
    same(l.attn_norm, p + "attn_norm.weight");
    same(l.wq, p + "attn_q.weight");
    same(l.wk, p + "attn_k.weight");
    same(l.wv, p + "attn_v.weight");
    same(l.wo, p + "attn_output.weight");
    same(l.ffn_norm, p + "ffn_norm.weight");
    same(l.ffn_gate, p + "ffn_gate.weight");
    same(l.ffn_up, p + "ffn_up.weight");
    same(l.ffn_down, p + "ffn_down.weight");
  }
}

TEST(Llama2cModel, UnsharedClassifierAndExplicitTokenizer) {
  const std::string bin = stories("stories260K.bin"), tok = stories("tok512.bin");
  REQUIRE_FILE(bin);
  REQUIRE_FILE(tok);
  auto b = read_bytes(bin);
  L2Header h;
  std::memcpy(&h, b.data(), sizeof h);
  // Negative vocab_size: a separate classifier follows the weights; append a scaled copy.
  h.vocab_size = -h.vocab_size;
  std::memcpy(b.data(), &h, sizeof h);
  const size_t emb = size_t(-h.vocab_size) * h.dim;
  std::vector<float> wcls(emb);
  std::memcpy(wcls.data(), b.data() + sizeof h, emb * 4);
  for (float& x : wcls) x *= 2;
  b.insert(b.end(), reinterpret_cast<uint8_t*>(wcls.data()), reinterpret_cast<uint8_t*>(wcls.data() + emb));
  TempDir d;
  write_bytes(d / "model.bin", b);  // no tokenizer beside it
  auto missing = load_model_llama2c(d / "model.bin", "");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().find("tokenizer.bin"), std::string::npos) << missing.error();
  EXPECT_NE(missing.error().find("tok512.bin"), std::string::npos) << missing.error();

  auto r = load_model_llama2c(d / "model.bin", tok);
  ASSERT_TRUE(r.ok()) << r.error();
  const Model& m = *r.value();
  EXPECT_FALSE(m.cfg.tied_embeddings);
  EXPECT_EQ(m.cfg.n_vocab, 512);
  ASSERT_NE(m.output.data, m.tok_embd.data);
  EXPECT_EQ(0, std::memcmp(m.output.data, wcls.data(), emb * 4));
}

TEST(Llama2cModel, BadCheckpointsGiveCleanErrors) {
  const std::string bin = stories("stories260K.bin"), tok = stories("tok512.bin");
  REQUIRE_FILE(bin);
  REQUIRE_FILE(tok);
  const auto full = read_bytes(bin);
  TempDir d;
  fs::copy_file(tok, d / "tok512.bin");
  const std::string path = d / "model.bin";
  auto expect_error = [&](const std::vector<uint8_t>& bytes, const char* needle) {
    write_bytes(path, bytes);
    auto r = load_model_llama2c(path, "");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().find('\n'), std::string::npos) << r.error();
    EXPECT_NE(r.error().find(needle), std::string::npos) << r.error();
  };
  for (size_t n : {size_t{0}, size_t{3}, size_t{27}, size_t{28}, size_t{1000}, full.size() / 2, full.size() - 4,
                   full.size() - 1}) {
    SCOPED_TRACE(n);
    expect_error(std::vector<uint8_t>(full.begin(), full.begin() + n), "truncated");
  }
  {
    auto extra = full;
    extra.resize(full.size() + 4);
    expect_error(extra, "size mismatch");
  }
  auto with_header = [&](auto fn) {
    auto b = full;
    L2Header h;
    std::memcpy(&h, b.data(), sizeof h);
    fn(h);
    std::memcpy(b.data(), &h, sizeof h);
    return b;
  };
  expect_error(with_header([](L2Header& h) { h.n_heads = 0; }), "n_heads");
  expect_error(with_header([](L2Header& h) { h.n_heads = 7; h.n_kv_heads = 7; }), "divisible");
  expect_error(with_header([](L2Header& h) { h.n_kv_heads = 3; }), "n_kv_heads");
  expect_error(with_header([](L2Header& h) { h.dim = 1 << 30; }), "dim");
  expect_error(with_header([](L2Header& h) { h.n_layers = -5; }), "n_layers");
  expect_error(with_header([](L2Header& h) { h.vocab_size = 0; }), "vocab_size");
  expect_error(with_header([](L2Header& h) { h.n_layers = 1000; }), "truncated");
  {
    auto v1 = full;
    const uint32_t magic = 0x616b3432, version = 1;
    std::memcpy(v1.data(), &magic, 4);
    std::memcpy(v1.data() + 4, &version, 4);
    expect_error(v1, "not supported");
  }
}

// ---------------------------------------------------------------- Hugging Face folders

struct StEntry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

void write_safetensors(const std::string& path, const std::vector<StEntry>& entries) {
  nlohmann::json h = nlohmann::json::object();
  h["__metadata__"] = {{"format", "pt"}};
  std::vector<uint8_t> data;
  for (const auto& e : entries) {
    h[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {data.size(), data.size() + e.bytes.size()}}};
    data.insert(data.end(), e.bytes.begin(), e.bytes.end());
  }
  write_bytes(path, st_image(h.dump(), data));
}

std::vector<float> values(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    v[i] = static_cast<float>(static_cast<int32_t>(seed >> 8) % 1000) / 4096.f;
  }
  return v;
}

StEntry make_entry(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, uint32_t seed) {
  size_t n = 1;
  for (auto s : shape) n *= static_cast<size_t>(s);
  auto v = values(n, seed);
  StEntry e{name, dtype, shape, {}};
  if (dtype == "F32") {
    e.bytes.resize(n * 4);
    std::memcpy(e.bytes.data(), v.data(), n * 4);
  } else {
    e.bytes.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      uint16_t h = dtype == "BF16" ? kernels::fp32_to_bf16(v[i]) : kernels::fp32_to_fp16(v[i]);
      std::memcpy(&e.bytes[2 * i], &h, 2);
    }
  }
  return e;
}

// A tiny random-weight model in HF layout. The vocabulary matches the Llama 2 tokenizer.model
// from shared/ (32000 pieces), which the folder uses as its tokenizer.
struct HfFolder {
  int n_embd = 32, n_head = 4, n_kv = 2, n_ff = 48, n_layer = 2, n_vocab = 32000;
  std::string wdtype = "BF16", ndtype = "F16";
  bool bias = false, lm_head = false;
  std::vector<StEntry> entries() const {
    const int hd = n_embd / n_head;
    std::vector<StEntry> e;
    uint32_t s = 1;
    e.push_back(make_entry("model.embed_tokens.weight", wdtype, {n_vocab, n_embd}, s++));
    e.push_back(make_entry("model.norm.weight", ndtype, {n_embd}, s++));
    if (lm_head) e.push_back(make_entry("lm_head.weight", wdtype, {n_vocab, n_embd}, s++));
    for (int i = 0; i < n_layer; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      e.push_back(make_entry(p + "input_layernorm.weight", ndtype, {n_embd}, s++));
      e.push_back(make_entry(p + "post_attention_layernorm.weight", ndtype, {n_embd}, s++));
      e.push_back(make_entry(p + "self_attn.q_proj.weight", wdtype, {n_head * hd, n_embd}, s++));
      e.push_back(make_entry(p + "self_attn.k_proj.weight", wdtype, {n_kv * hd, n_embd}, s++));
      e.push_back(make_entry(p + "self_attn.v_proj.weight", wdtype, {n_kv * hd, n_embd}, s++));
      e.push_back(make_entry(p + "self_attn.o_proj.weight", wdtype, {n_embd, n_head * hd}, s++));
      e.push_back(make_entry(p + "mlp.gate_proj.weight", wdtype, {n_ff, n_embd}, s++));
      e.push_back(make_entry(p + "mlp.up_proj.weight", wdtype, {n_ff, n_embd}, s++));
      e.push_back(make_entry(p + "mlp.down_proj.weight", wdtype, {n_embd, n_ff}, s++));
      if (bias) {
        e.push_back(make_entry(p + "self_attn.q_proj.bias", ndtype, {n_head * hd}, s++));
        e.push_back(make_entry(p + "self_attn.k_proj.bias", ndtype, {n_kv * hd}, s++));
        e.push_back(make_entry(p + "self_attn.v_proj.bias", ndtype, {n_kv * hd}, s++));
      }
    }
    return e;
  }
  nlohmann::json config(const std::string& model_type) const {
    return {{"model_type", model_type},   {"hidden_size", n_embd},      {"intermediate_size", n_ff},
            {"num_hidden_layers", n_layer}, {"num_attention_heads", n_head}, {"num_key_value_heads", n_kv},
            {"vocab_size", n_vocab},      {"rms_norm_eps", 1e-5},       {"rope_theta", 500000.0},
            {"max_position_embeddings", 4096}, {"tie_word_embeddings", !lm_head}};
  }
};

std::string spm_model() { return shared_dir() + "/models/llama2-tokenizer/tokenizer.model"; }

TEST(HfFolderModel, LlamaBf16TiedWithLlama3Rope) {
  REQUIRE_FILE(spm_model());
  TempDir d;
  HfFolder f;
  auto entries = f.entries();
  write_safetensors(d / "model.safetensors", entries);
  auto cfg = f.config("llama");
  cfg["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  write_text(d / "config.json", cfg.dump());
  fs::copy_file(spm_model(), d / "tokenizer.model");
  auto r = load_model_hf(d.p.string() + "/");
  ASSERT_TRUE(r.ok()) << r.error();
  const Model& m = *r.value();
  EXPECT_EQ(m.format, "safetensors");
  EXPECT_EQ(m.cfg.arch, "llama");
  EXPECT_EQ(m.cfg.n_embd, 32);
  EXPECT_EQ(m.cfg.n_head_kv, 2);
  EXPECT_EQ(m.cfg.head_dim, 8);
  EXPECT_EQ(m.cfg.n_ctx_train, 4096);
  EXPECT_EQ(m.cfg.rope_type, RopeType::NEOX);
  EXPECT_FLOAT_EQ(m.cfg.rope_theta, 500000.f);
  EXPECT_FALSE(m.cfg.qkv_bias);
  EXPECT_TRUE(m.cfg.tied_embeddings);
  EXPECT_EQ(m.output.data, m.tok_embd.data);
  EXPECT_EQ(m.cfg.rope_freq_factors, llama3_rope_factors(8, 500000.f, 8, 1, 4, 8192));
  EXPECT_EQ(m.tokenizer->n_vocab(), 32000);
  // 2-D weights stay bf16 with the file's bytes; f16 norms become f32.
  EXPECT_EQ(m.layers[1].wk.type, DType::BF16);
  EXPECT_EQ(m.layers[1].wk.cols(), 32);
  EXPECT_EQ(m.layers[1].wk.rows(), 16);
  const StEntry* wk = nullptr;
  const StEntry* norm = nullptr;
  for (const auto& e : entries) {
    if (e.name == "model.layers.1.self_attn.k_proj.weight") wk = &e;
    if (e.name == "model.layers.1.post_attention_layernorm.weight") norm = &e;
  }
  ASSERT_TRUE(wk && norm);
  EXPECT_EQ(0, std::memcmp(m.layers[1].wk.data, wk->bytes.data(), wk->bytes.size()));
  ASSERT_EQ(m.layers[1].ffn_norm.type, DType::F32);
  const float* nf = static_cast<const float*>(m.layers[1].ffn_norm.data);
  for (int i = 0; i < 32; ++i) {
    uint16_t h;
    std::memcpy(&h, &norm->bytes[2 * i], 2);
    EXPECT_EQ(nf[i], kernels::fp16_to_fp32(h));
  }
}

TEST(HfFolderModel, Qwen2ShardedWithBiasesAndLinearRope) {
  REQUIRE_FILE(spm_model());
  TempDir d;
  HfFolder f;
  f.wdtype = "F32";
  f.ndtype = "BF16";
  f.bias = true;
  f.lm_head = true;
  auto entries = f.entries();
  // Two shards plus the index that maps tensors to them.
  std::vector<StEntry> a(entries.begin(), entries.begin() + entries.size() / 2), b(entries.begin() + entries.size() / 2, entries.end());
  write_safetensors(d / "model-00001-of-00002.safetensors", a);
  write_safetensors(d / "model-00002-of-00002.safetensors", b);
  nlohmann::json idx;
  for (const auto& e : a) idx["weight_map"][e.name] = "model-00001-of-00002.safetensors";
  for (const auto& e : b) idx["weight_map"][e.name] = "model-00002-of-00002.safetensors";
  write_text(d / "model.safetensors.index.json", idx.dump());
  auto cfg = f.config("qwen2");
  cfg["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  write_text(d / "config.json", cfg.dump());
  fs::copy_file(spm_model(), d / "tokenizer.model");
  auto r = load_model_hf(d.p.string());
  ASSERT_TRUE(r.ok()) << r.error();
  const Model& m = *r.value();
  EXPECT_EQ(m.cfg.arch, "qwen2");
  EXPECT_TRUE(m.cfg.qkv_bias);
  EXPECT_FALSE(m.cfg.tied_embeddings);
  EXPECT_NE(m.output.data, m.tok_embd.data);
  EXPECT_FLOAT_EQ(m.cfg.rope_freq_scale, 0.25f);
  EXPECT_TRUE(m.cfg.rope_freq_factors.empty());
  ASSERT_TRUE(m.layers[1].bv.present());
  EXPECT_EQ(m.layers[1].bv.type, DType::F32);
  EXPECT_EQ(m.layers[1].bv.cols(), 16);
  EXPECT_EQ(m.layers[0].wq.type, DType::F32);

  // A shard named in the index but absent is reported by name.
  fs::remove(d / "model-00002-of-00002.safetensors");
  auto missing = load_model_hf(d.p.string());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().find("model-00002-of-00002.safetensors"), std::string::npos) << missing.error();
}

TEST(HfFolderModel, MistralLoadsAsLlamaWithSlidingWindowContext) {
  REQUIRE_FILE(spm_model());
  TempDir d;
  HfFolder f;
  f.wdtype = "F16";
  f.ndtype = "F32";
  write_safetensors(d / "model.safetensors", f.entries());
  auto cfg = f.config("mistral");
  cfg["sliding_window"] = 1024;
  cfg["head_dim"] = 8;
  cfg["hidden_act"] = "silu";
  write_text(d / "config.json", cfg.dump());
  fs::copy_file(spm_model(), d / "tokenizer.model");
  auto r = load_model_hf(d.p.string());
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r.value()->cfg.arch, "llama");
  EXPECT_EQ(r.value()->cfg.n_ctx_train, 1024);  // full attention is exact within the window
  EXPECT_EQ(r.value()->layers[0].ffn_down.type, DType::F16);
}

TEST(HfFolderModel, BadFoldersGiveCleanErrors) {
  REQUIRE_FILE(spm_model());
  HfFolder f;
  auto good = f.entries();
  struct Case {
    const char* what;
    std::string config;
    std::vector<StEntry> entries;
    bool tokenizer;
    const char* expect;
  };
  auto drop = [&](const std::string& name) {
    auto e = good;
    e.erase(std::remove_if(e.begin(), e.end(), [&](const StEntry& x) { return x.name == name; }), e.end());
    return e;
  };
  auto replace = [&](const std::string& name, StEntry with) {
    auto e = drop(name);
    with.name = name;
    e.push_back(with);
    return e;
  };
  auto cfg_with = [&](const char* k, nlohmann::json v) {
    auto c = f.config("llama");
    c[k] = v;
    return c.dump();
  };
  std::vector<Case> cases = {
      {"malformed config", "{\"model_type\": \"llama\", ", good, true, "not valid JSON"},
      {"config not an object", "[1]", good, true, "not a JSON object"},
      {"unsupported architecture", f.config("gpt2").dump(), good, true, "unsupported architecture"},
      {"no model_type", [&] { auto c = f.config("llama"); c.erase("model_type"); c["architectures"] = {"GPTJForCausalLM"}; return c.dump(); }(),
       good, true, "unsupported architecture"},
      {"missing hidden_size", [&] { auto c = f.config("llama"); c.erase("hidden_size"); return c.dump(); }(), good, true, "hidden_size"},
      {"hidden_size a string", cfg_with("hidden_size", "32"), good, true, "hidden_size"},
      {"negative layers", cfg_with("num_hidden_layers", -1), good, true, "num_hidden_layers"},
      {"unsupported rope scaling", cfg_with("rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}), good, true, "yarn"},
      {"vocab mismatch", cfg_with("vocab_size", 100), good, true, "vocab_size"},
      {"missing tensor", f.config("llama").dump(), drop("model.layers.1.mlp.up_proj.weight"), true,
       "model.layers.1.mlp.up_proj.weight"},
      {"wrong shape", f.config("llama").dump(),
       replace("model.layers.0.self_attn.q_proj.weight", make_entry("", "BF16", {16, 32}, 9)), true, "attn_q"},
      {"integer weights", f.config("llama").dump(),
       replace("model.layers.0.mlp.gate_proj.weight", make_entry("", "F32", {48, 32}, 9)), true, ""},
      {"no tokenizer", f.config("llama").dump(), good, false, "tokenizer"},
      {"gelu activation", cfg_with("hidden_act", "gelu"), good, true, "hidden_act"},
      {"MLP biases", cfg_with("mlp_bias", true), good, true, "mlp_bias"},
  };
  // The "integer weights" case stores F32 bytes but declares I32.
  cases[11].entries.back().dtype = "I32";
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    TempDir d;
    write_safetensors(d / "model.safetensors", c.entries);
    write_text(d / "config.json", c.config);
    if (c.tokenizer) fs::copy_file(spm_model(), d / "tokenizer.model");
    auto r = load_model_hf(d.p.string());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().find('\n'), std::string::npos) << r.error();
    EXPECT_NE(r.error().find(c.expect), std::string::npos) << r.error();
  }
  {  // a tensor in two shards
    TempDir d;
    write_safetensors(d / "a.safetensors", good);
    write_safetensors(d / "b.safetensors", {good[0]});
    write_text(d / "config.json", f.config("llama").dump());
    fs::copy_file(spm_model(), d / "tokenizer.model");
    auto r = load_model_hf(d.p.string());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().find("both"), std::string::npos) << r.error();
  }
  {  // no weights at all
    TempDir d;
    write_text(d / "config.json", f.config("llama").dump());
    auto r = load_model_hf(d.p.string());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().find("safetensors"), std::string::npos) << r.error();
  }
}

}  // namespace
