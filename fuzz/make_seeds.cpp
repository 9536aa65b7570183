// Writes small valid seed inputs for the fuzz targets: make_seeds OUT_DIR creates
// OUT_DIR/gguf/*.gguf (via the project's GgufWriter), OUT_DIR/safetensors/*.safetensors and
// OUT_DIR/tokenizer_files/* (tokenizer.json, tokenizer.bin and tokenizer.model images).
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

bool write_seed(const std::string& path, uint8_t kind, uint16_t n_vocab, const std::string& body) {
  std::string b;
  b += static_cast<char>(kind);
  b += static_cast<char>(n_vocab & 0xff);
  b += static_cast<char>(n_vocab >> 8);
  b += body;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  bool ok = std::fwrite(b.data(), 1, b.size(), f) == b.size();
  return (std::fclose(f) == 0) && ok;
}

void put_u32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
void put_varint(std::string& s, uint64_t v) {
  while (v >= 0x80) {
    s += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  s += static_cast<char>(v);
}
void put_bytes_field(std::string& s, int field, const std::string& b) {
  put_varint(s, (field << 3) | 2);
  put_varint(s, b.size());
  s += b;
}

// Seeds for fuzz_tokenizer_files: byte 0 = loader (0 json, 1 tokenizer.bin, 2 tokenizer.model),
// bytes 1-2 = vocabulary size for tokenizer.bin, then the file.
bool tokenizer_seeds(const std::string& dir) {
  const std::string sp = "\xe2\x96\x81";
  bool ok = true;
  ok &= write_seed(dir + "/spm.json", 0, 0,
                   R"({"added_tokens":[{"id":0,"content":"<unk>","special":true},{"id":1,"content":"<s>","special":true},)"
                   R"({"id":2,"content":"</s>","special":true}],)"
                   R"("normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":")" + sp +
                       R"("},{"type":"Replace","pattern":{"String":" "},"content":")" + sp + R"("}]},)"
                   R"("pre_tokenizer":null,"decoder":{"type":"Sequence","decoders":[{"type":"ByteFallback"}]},)"
                   R"("model":{"type":"BPE","unk_token":"<unk>","byte_fallback":true,"vocab":{"<unk>":0,"<s>":1,"</s>":2,)"
                   R"("<0x41>":3,")" + sp + R"(":4,"a":5,"b":6,")" + sp + R"(a":7,"ab":8},"merges":[")" + sp +
                       R"( a","a b"]}})");
  ok &= write_seed(dir + "/bpe.json", 0, 0,
                   R"({"added_tokens":[{"id":6,"content":"<|endoftext|>","special":true}],"normalizer":null,)"
                   R"("pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"\\p{L}+| ?\\p{N}"},)"
                   R"("behavior":"Isolated"},{"type":"ByteLevel","add_prefix_space":false,"use_regex":false}]},)"
                   R"("decoder":{"type":"ByteLevel"},"model":{"type":"BPE","vocab":{"a":0,"b":1,"\u0120":2,"ab":3,)"
                   R"("\u0120a":4,"!":5,"<|endoftext|>":6},"merges":[["a","b"],["\u0120","a"]]}})");
  std::string l2c;
  put_u32(l2c, 8);
  const char* pieces[] = {"<unk>", "\n<s>\n", "\n</s>\n", "<0x41>", " ", "a", "b", " a", "ab"};
  float score = 0;
  for (const char* p : pieces) {
    l2c.append(reinterpret_cast<const char*>(&score), 4);
    put_u32(l2c, static_cast<uint32_t>(std::strlen(p)));
    l2c += p;
    score -= 1;
  }
  ok &= write_seed(dir + "/llama2c.bin", 1, 9, l2c);
  ok &= write_seed(dir + "/llama2c-eof.bin", 1, 0, l2c);
  std::string model;
  const std::pair<const char*, int> mp[] = {{"<unk>", 2}, {"<s>", 3}, {"</s>", 3}, {"<0x41>", 6},
                                            {"\xe2\x96\x81", 1}, {"a", 1}, {"\xe2\x96\x81" "a", 1}, {"<user>", 4}};
  score = 0;
  for (const auto& [p, type] : mp) {
    std::string piece;
    put_bytes_field(piece, 1, p);
    piece += '\x15';  // field 2, fixed32
    piece.append(reinterpret_cast<const char*>(&score), 4);
    put_varint(piece, 3 << 3);
    put_varint(piece, static_cast<uint64_t>(type));
    put_bytes_field(model, 1, piece);
    score -= 1;
  }
  std::string trainer;
  put_varint(trainer, 3 << 3);
  put_varint(trainer, 2);  // BPE
  put_bytes_field(model, 2, trainer);
  std::string norm;
  put_varint(norm, 3 << 3);
  put_varint(norm, 1);  // add_dummy_prefix
  put_bytes_field(model, 3, norm);
  ok &= write_seed(dir + "/tokenizer.model", 2, 0, model);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  for (const std::string& d : {out, out + "/gguf", out + "/safetensors", out + "/tokenizer_files"})
    ::mkdir(d.c_str(), 0755);
  bool ok = gguf_seeds(out + "/gguf") && safetensors_seeds(out + "/safetensors") &&
            tokenizer_seeds(out + "/tokenizer_files");
  return ok ? 0 : 1;
}
