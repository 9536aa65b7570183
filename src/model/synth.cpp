#include "model/synth.h"

#include <cmath>
#include <cstring>
#include <cstdio>
#include <vector>

#include "kernels/kernels.h"
#include "model/gguf.h"
#include "model/model.h"

namespace larder {

Result<SynthShape> synth_shape(const std::string& name) {
  SynthShape s;
  s.name = name;
  if (name == "stories15M") {
    s.n_embd = 288; s.n_ff = 768; s.n_layer = 6; s.n_head = 6; s.n_head_kv = 6; s.n_vocab = 32000; s.n_ctx = 256; s.tied = true;
  } else if (name == "stories42M") {
    s.n_embd = 512; s.n_ff = 1376; s.n_layer = 8; s.n_head = 8; s.n_head_kv = 8; s.n_vocab = 32000; s.n_ctx = 1024; s.tied = true;
  } else if (name == "stories110M") {
    s.n_embd = 768; s.n_ff = 2048; s.n_layer = 12; s.n_head = 12; s.n_head_kv = 12; s.n_vocab = 32000; s.n_ctx = 1024; s.tied = true;
  } else if (name == "llama-3.2-1b") {
    s.n_embd = 2048; s.n_ff = 8192; s.n_layer = 16; s.n_head = 32; s.n_head_kv = 8; s.n_vocab = 128256; s.n_ctx = 131072;
    s.tied = true; s.llama3_rope = true; s.rope_theta = 500000.f;
  } else if (name == "qwen2.5-0.5b") {
    s.arch = "qwen2"; s.n_embd = 896; s.n_ff = 4864; s.n_layer = 24; s.n_head = 14; s.n_head_kv = 2; s.n_vocab = 151936;
    s.n_ctx = 32768; s.tied = true; s.rope_theta = 1000000.f; s.rms_eps = 1e-6f;
  } else {
    return make_error("unknown shape '%s' (known: stories15M, stories42M, stories110M, llama-3.2-1b, qwen2.5-0.5b, custom)",
                      name.c_str());
  }
  return s;
}

namespace {

// Small fast RNG: the models are for throughput and reference tests, not statistics.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
    return s;
  }
  float uniform() { return (next() >> 40) * (1.0f / 16777216.0f); }
  float normal() {  // sum of 4 uniforms: cheap, bell-shaped, unit variance after scaling
    return (uniform() + uniform() + uniform() + uniform() - 2.0f) * 1.7320508f;
  }
};

// Synthetic SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then
// unique letter pieces. Enough for any GGUF reader to build a tokenizer.
void synth_vocab(GgufWriter& w, int n_vocab) {
  std::vector<std::string> toks;
  std::vector<float> scores;
  std::vector<int32_t> types;
  toks.reserve(n_vocab);
  auto add = [&](std::string t, float sc, int ty) { toks.push_back(std::move(t)); scores.push_back(sc); types.push_back(ty); };
  add("<unk>", 0, 2);
  add("<s>", 0, 3);
  add("</s>", 0, 3);
  for (int b = 0; b < 256 && static_cast<int>(toks.size()) < n_vocab; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    add(buf, 0, 6);
  }
  const std::string space = "\xE2\x96\x81";
  for (int64_t k = 0; static_cast<int>(toks.size()) < n_vocab; ++k) {
    std::string word;
    int64_t v = k / 2;
    do {
      word += static_cast<char>('a' + v % 26);
      v = v / 26 - 1;
    } while (v >= 0);
    add(k % 2 == 0 ? space + word : word, -static_cast<float>(k), 1);
  }
  w.set_str("tokenizer.ggml.model", "llama");
  w.set_arr_str("tokenizer.ggml.tokens", toks);
  w.set_arr_f32("tokenizer.ggml.scores", scores);
  w.set_arr_i32("tokenizer.ggml.token_type", types);
  w.set_u32("tokenizer.ggml.unknown_token_id", 0);
  w.set_u32("tokenizer.ggml.bos_token_id", 1);
  w.set_u32("tokenizer.ggml.eos_token_id", 2);
  w.set_bool("tokenizer.ggml.add_bos_token", true);
}

}  // namespace

Status synth_model(const SynthShape& s, const SynthOptions& opt, const std::string& out_path) {
  if (s.n_embd <= 0 || s.n_ff <= 0 || s.n_layer <= 0 || s.n_head <= 0 || s.n_head_kv <= 0 || s.n_vocab < 259 ||
      s.n_ctx <= 0)
    return make_error("synth: invalid shape (all sizes must be positive, vocab >= 259)");
  if (s.n_embd % s.n_head != 0 || s.n_head % s.n_head_kv != 0 || (s.n_embd / s.n_head) % 2 != 0)
    return make_error("synth: n_embd must divide into an even head size and heads into KV heads");
  const DTypeInfo* info = dtype_info(opt.dtype);
  if (!info || !info->computable) return make_error("synth: unsupported dtype");
  if (s.n_embd % info->block_size != 0 || s.n_ff % info->block_size != 0)
    return make_error("synth: n_embd and n_ff must be multiples of %d for %s", info->block_size, info->name);
  const int hd = s.n_embd / s.n_head;
  GgufWriter w;
  const std::string a = s.arch + ".";
  w.set_str("general.architecture", s.arch);
  w.set_str("general.name", s.name + "-synthetic");
  w.set_u32(a + "context_length", s.n_ctx);
  w.set_u32(a + "embedding_length", s.n_embd);
  w.set_u32(a + "feed_forward_length", s.n_ff);
  w.set_u32(a + "block_count", s.n_layer);
  w.set_u32(a + "attention.head_count", s.n_head);
  w.set_u32(a + "attention.head_count_kv", s.n_head_kv);
  w.set_f32(a + "attention.layer_norm_rms_epsilon", s.rms_eps);
  w.set_f32(a + "rope.freq_base", s.rope_theta);
  w.set_u32(a + "rope.dimension_count", hd);
  w.set_u32(a + "vocab_size", s.n_vocab);
  if (!opt.vocab_from.empty()) {
    LARDER_TRY(src, GgufFile::open(opt.vocab_from));
    const auto* toks = src->get_str_array("tokenizer.ggml.tokens");
    if (!toks) return make_error("%s has no tokenizer", opt.vocab_from.c_str());
    if (static_cast<int>(toks->size()) != s.n_vocab)
      return make_error("%s has %zu tokens but the shape needs %d", opt.vocab_from.c_str(), toks->size(), s.n_vocab);
    for (const auto& kv : src->kv())
      if (kv.first.rfind("tokenizer.", 0) == 0) w.set_value(kv.first, kv.second);
  } else {
    synth_vocab(w, s.n_vocab);
  }

  Rng rng(opt.seed);
  const float std_w = 0.02f * opt.scale;
  int64_t done = 0, total = 0;
  auto count = [&](int64_t r, int64_t c) { total += r * c; };
  count(s.n_vocab, s.n_embd);
  if (!s.tied) count(s.n_vocab, s.n_embd);
  count(s.n_layer, int64_t{2} * s.n_embd * (s.n_head + s.n_head_kv) * hd + int64_t{3} * s.n_embd * s.n_ff);
  int last_pct = -1;
  std::vector<float> row;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, float stddev) {
    std::vector<uint8_t> bytes(row_bytes(opt.dtype, cols) * rows);
    row.resize(cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) row[c] = rng.normal() * stddev;
      kernels::quantize_row(opt.dtype, row.data(), bytes.data() + r * row_bytes(opt.dtype, cols), cols);
    }
    done += rows * cols;
    int pct = static_cast<int>(100 * done / std::max<int64_t>(total, 1));
    if (opt.progress && pct / 10 != last_pct / 10) {
      std::fprintf(stderr, "\rsynth: generating weights %3d%%", pct);
      last_pct = pct;
    }
    w.add_tensor_copy(name, opt.dtype, {cols, rows}, std::move(bytes));
  };
  auto vec = [&](const std::string& name, int64_t n, float base, float noise) {
    std::vector<uint8_t> bytes(n * 4);
    auto* f = reinterpret_cast<float*>(bytes.data());
    for (int64_t i = 0; i < n; ++i) f[i] = base + rng.normal() * noise;
    w.add_tensor_copy(name, DType::F32, {n}, std::move(bytes));
  };
  // Embedding rows have unit-ish scale so activations are O(1) like trained models.
  matrix("token_embd.weight", s.n_vocab, s.n_embd, 1.0f * opt.scale);
  vec("output_norm.weight", s.n_embd, 1.0f, 0.1f);
  if (!s.tied) matrix("output.weight", s.n_vocab, s.n_embd, std_w);
  if (s.llama3_rope) {
    std::vector<float> f = llama3_rope_factors(hd, s.rope_theta, 32.f, 1.f, 4.f, 8192);
    std::vector<uint8_t> bytes(f.size() * 4);
    std::memcpy(bytes.data(), f.data(), bytes.size());
    w.add_tensor_copy("rope_freqs.weight", DType::F32, {static_cast<int64_t>(f.size())}, std::move(bytes));
  }
  for (int l = 0; l < s.n_layer; ++l) {
    std::string p = "blk." + std::to_string(l) + ".";
    vec(p + "attn_norm.weight", s.n_embd, 1.0f, 0.1f);
    matrix(p + "attn_q.weight", int64_t{s.n_head} * hd, s.n_embd, std_w);
    matrix(p + "attn_k.weight", int64_t{s.n_head_kv} * hd, s.n_embd, std_w);
    matrix(p + "attn_v.weight", int64_t{s.n_head_kv} * hd, s.n_embd, std_w);
    if (s.arch == "qwen2") {
      vec(p + "attn_q.bias", int64_t{s.n_head} * hd, 0.f, std_w);
      vec(p + "attn_k.bias", int64_t{s.n_head_kv} * hd, 0.f, std_w);
      vec(p + "attn_v.bias", int64_t{s.n_head_kv} * hd, 0.f, std_w);
    }
    matrix(p + "attn_output.weight", s.n_embd, int64_t{s.n_head} * hd, std_w);
    vec(p + "ffn_norm.weight", s.n_embd, 1.0f, 0.1f);
    matrix(p + "ffn_gate.weight", s.n_ff, s.n_embd, std_w);
    matrix(p + "ffn_up.weight", s.n_ff, s.n_embd, std_w);
    matrix(p + "ffn_down.weight", s.n_embd, s.n_ff, std_w);
  }
  if (opt.progress) std::fprintf(stderr, "\rsynth: writing %s\n", out_path.c_str());
  return w.write(out_path);
}

}  // namespace larder
