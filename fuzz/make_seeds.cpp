// Writes small valid seed inputs for the fuzz targets: make_seeds OUT_DIR creates
// OUT_DIR/gguf/*.gguf (via the project's GgufWriter) and OUT_DIR/safetensors/*.safetensors.
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "model/gguf.h"

using namespace larder;

namespace {

std::vector<uint8_t> bytes(size_t n, uint8_t seed) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 37);
  return b;
}

bool write(const GgufWriter& w, const std::string& path, size_t align = 32) {
  Status st = w.write(path, align);
  if (!st.ok()) std::fprintf(stderr, "make_seeds: %s\n", st.error().c_str());
  return st.ok();
}

GgufValue arr_int(GgufType t, std::vector<int64_t> v) {
  GgufValue a;
  a.type = GgufType::ARRAY;
  a.elem_type = t;
  a.arr_int = std::move(v);
  return a;
}

bool gguf_seeds(const std::string& dir) {
  bool ok = true;
  {  // metadata only, every scalar type and nested arrays
    GgufWriter w;
    const GgufType ints[] = {GgufType::UINT8, GgufType::INT8, GgufType::UINT16, GgufType::INT16, GgufType::UINT32,
                             GgufType::INT32, GgufType::BOOL, GgufType::UINT64, GgufType::INT64};
    int k = 0;
    for (GgufType t : ints) {
      GgufValue v;
      v.type = t;
      v.i = 1;
      w.set_value("s." + std::to_string(k++), v);
      w.set_value("a." + std::to_string(k++), arr_int(t, {0, 1, 1}));
    }
    w.set_f32("f32", 1.5f);
    GgufValue d;
    d.type = GgufType::FLOAT64;
    d.f = -2.25;
    w.set_value("f64", d);
    w.set_str("str", "hello");
    w.set_arr_str("astr", {"a", "", "bc"});
    w.set_arr_f32("af32", {1, 2, 3});
    GgufValue nested;
    nested.type = GgufType::ARRAY;
    nested.elem_type = GgufType::ARRAY;
    nested.arr_arr = {arr_int(GgufType::INT32, {1, 2}), arr_int(GgufType::UINT8, {3})};
    w.set_value("nested", nested);
    ok &= write(w, dir + "/metadata.gguf");
  }
  {  // tiny llama model, alignment 64, mixed tensor types
    GgufWriter w;
    w.set_str("general.architecture", "llama");
    w.set_u32("llama.embedding_length", 32);
    w.set_u32("llama.block_count", 1);
    w.set_u32("llama.attention.head_count", 2);
    w.add_tensor_copy("token_embd.weight", DType::F32, {32, 4}, bytes(32 * 4 * 4, 1));
    w.add_tensor_copy("output_norm.weight", DType::F16, {32}, bytes(64, 2));
    w.add_tensor_copy("blk.0.attn_q.weight", DType::Q8_0, {32, 2}, bytes(2 * 34, 3));
    w.add_tensor_copy("blk.0.attn_k.weight", DType::Q4_0, {32, 1}, bytes(18, 4));
    w.add_tensor_copy("blk.0.attn_v.weight", DType::BF16, {2, 2, 2}, bytes(16, 5));
    ok &= write(w, dir + "/model.gguf", 64);
  }
  {  // SentencePiece vocabulary with a few byte-fallback tokens
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "llama");
    std::vector<std::string> toks = {"<unk>", "<s>", "</s>", "<0x0A>", "<0x41>", "<0xE2>", "\xe2\x96\x81", "a",
                                     "b", "\xe2\x96\x81" "a", "ab", "\xe2\x96\x81" "ab", "<|special|>"};
    std::vector<float> scores;
    std::vector<int32_t> types;
    for (size_t i = 0; i < toks.size(); ++i) {
      scores.push_back(-static_cast<float>(i));
      types.push_back(i == 0 ? 2 : i < 3 ? 3 : i < 6 ? 6 : i == 12 ? 4 : 1);
    }
    w.set_arr_str("tokenizer.ggml.tokens", toks);
    w.set_arr_f32("tokenizer.ggml.scores", scores);
    w.set_arr_i32("tokenizer.ggml.token_type", types);
    w.set_u32("tokenizer.ggml.bos_token_id", 1);
    w.set_u32("tokenizer.ggml.eos_token_id", 2);
    w.set_u32("tokenizer.ggml.unknown_token_id", 0);
    w.set_bool("tokenizer.ggml.add_bos_token", true);
    ok &= write(w, dir + "/spm.gguf");
  }
  // Byte-level BPE vocabularies with each pre-tokenizer family.
  for (const char* pre : {"gpt-2", "llama-bpe", "qwen2", "default"}) {
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "gpt2");
    w.set_str("tokenizer.ggml.pre", pre);
    std::vector<std::string> toks = {"a", "b", "c", "\xc4\xa0", "ab", "\xc4\xa0" "a", "\xc4\xa0" "ab", "!", "1",
                                     "<|endoftext|>"};
    w.set_arr_str("tokenizer.ggml.tokens", toks);
    std::vector<int32_t> types(toks.size(), 1);
    types.back() = 3;
    w.set_arr_i32("tokenizer.ggml.token_type", types);
    w.set_arr_str("tokenizer.ggml.merges", {"a b", "\xc4\xa0 a", "\xc4\xa0" "a b"});
    w.set_u32("tokenizer.ggml.bos_token_id", 9);
    w.set_u32("tokenizer.ggml.eos_token_id", 9);
    ok &= write(w, dir + "/bpe-" + std::string(pre) + ".gguf");
  }
  return ok;
}

bool write_raw(const std::string& path, const std::string& header_json, const std::vector<uint8_t>& data) {
  std::string h = header_json;
  while ((8 + h.size()) % 8) h += ' ';  // the format pads the header with spaces
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  uint64_t n = h.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size() &&
            std::fwrite(data.data(), 1, data.size(), f) == data.size();
  return (std::fclose(f) == 0) && ok;
}

bool safetensors_seeds(const std::string& dir) {
  bool ok = true;
  ok &= write_raw(dir + "/basic.safetensors",
                  R"({"__metadata__":{"format":"pt"},)"
                  R"("model.embed_tokens.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                  R"("model.norm.weight":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}})",
                  bytes(32, 7));
  ok &= write_raw(dir + "/types.safetensors",
                  R"({"a":{"dtype":"F16","shape":[2,2,2],"data_offsets":[0,16]},)"
                  R"("b":{"dtype":"I64","shape":[1],"data_offsets":[16,24]},)"
                  R"("c":{"dtype":"F32","shape":[],"data_offsets":[24,28]},)"
                  R"("d":{"dtype":"U8","shape":[0],"data_offsets":[28,28]}})",
                  bytes(28, 9));
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  for (const std::string& d : {out, out + "/gguf", out + "/safetensors"}) ::mkdir(d.c_str(), 0755);
  bool ok = gguf_seeds(out + "/gguf") && safetensors_seeds(out + "/safetensors");
  return ok ? 0 : 1;
}
