#include "model/model.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>

#include <cmath>
#include <cstring>

#include "core/mmap_file.h"

namespace larder {

size_t Model::weight_bytes() const {
  size_t n = tok_embd.nbytes + output_norm.nbytes + (output.data != tok_embd.data ? output.nbytes : 0);
  for (const auto& l : layers)
    for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.ffn_norm, &l.ffn_gate,
                            &l.ffn_up, &l.ffn_down})
      n += t->nbytes;
  return n;
}

std::string Model::fingerprint() const {
  // Weights decide what a KV block means: hash the config and a sample of every tensor
  // (first and last 4 KiB), so a re-synthesized or re-quantized file at the same path
  // never reuses another model's blocks, while hashing stays cheap for large files.
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  char cfgs[256];
  int n = std::snprintf(cfgs, sizeof cfgs, "%s|%d|%d|%d|%d|%d|%d|%d|%g|%g", cfg.arch.c_str(), cfg.n_vocab, cfg.n_embd,
                        cfg.n_ff, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.rope_theta, cfg.rms_eps);
  XXH3_64bits_update(st, cfgs, static_cast<size_t>(n));
  auto add = [&](const Tensor& t) {
    if (!t.data) return;
    const auto* p = static_cast<const uint8_t*>(t.data);
    const size_t k = std::min<size_t>(t.nbytes, 4096);
    XXH3_64bits_update(st, &t.type, sizeof t.type);
    XXH3_64bits_update(st, p, k);
    XXH3_64bits_update(st, p + t.nbytes - k, k);
  };
  add(tok_embd);
  add(output_norm);
  add(output);
  for (const auto& l : layers)
    for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.ffn_norm, &l.ffn_gate,
                            &l.ffn_up, &l.ffn_down})
      add(*t);
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  char out[32];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

namespace {
Status check_tensor(const Tensor& t, const char* what, int layer, int64_t cols, int64_t rows, bool must_f32) {
  char name[96];
  if (layer >= 0) std::snprintf(name, sizeof name, "layer %d %s", layer, what);
  else std::snprintf(name, sizeof name, "%s", what);
  if (!t.present()) return make_error("missing tensor: %s", name);
  const DTypeInfo* info = dtype_info(t.type);
  if (!info) return make_error("tensor %s has unknown type", name);
  if (must_f32 && t.type != DType::F32) return make_error("tensor %s must be f32, got %s", name, info->name);
  if (!info->computable)
    return make_error("tensor %s has type %s, which this engine cannot compute with yet (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_K q5_K q6_K)",
                      name, info->name);
  if (t.cols() != cols || t.rows() != rows)
    return make_error("tensor %s has shape [%lld x %lld], expected [%lld x %lld]", name, (long long)t.rows(),
                      (long long)t.cols(), (long long)rows, (long long)cols);
  if (cols % info->block_size != 0)
    return make_error("tensor %s: %lld columns is not a multiple of the %s block size", name, (long long)cols, info->name);
  if (t.nbytes != row_bytes(t.type, cols) * rows) return make_error("tensor %s has the wrong byte size", name);
  return Status::Ok();
}
}  // namespace

Status validate_model(const Model& m) {
  const ModelConfig& c = m.cfg;
  if (c.n_vocab <= 0 || c.n_embd <= 0 || c.n_ff <= 0 || c.n_layer <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 ||
      c.head_dim <= 0)
    return make_error("invalid model hyper-parameters (vocab %d, embd %d, ff %d, layers %d, heads %d/%d, head_dim %d)",
                      c.n_vocab, c.n_embd, c.n_ff, c.n_layer, c.n_head, c.n_head_kv, c.head_dim);
  if (c.n_vocab > 10'000'000 || c.n_embd > 1 << 17 || c.n_ff > 1 << 20 || c.n_layer > 1024 || c.n_head > 1024 ||
      c.head_dim > 1024)
    return make_error("absurd model hyper-parameters");
  if (c.n_head % c.n_head_kv != 0)
    return make_error("head count %d is not a multiple of the KV head count %d", c.n_head, c.n_head_kv);
  if (c.head_dim % 2 != 0) return make_error("head dimension %d must be even for RoPE", c.head_dim);
  if (!c.rope_freq_factors.empty() && static_cast<int>(c.rope_freq_factors.size()) != c.head_dim / 2)
    return make_error("rope frequency factors have %zu entries, expected %d", c.rope_freq_factors.size(), c.head_dim / 2);
  if (!(c.rms_eps > 0) || !(c.rope_theta > 0)) return make_error("invalid rms epsilon or rope theta");
  if (m.layers.size() != static_cast<size_t>(c.n_layer)) return make_error("layer count mismatch");
  if (!m.tokenizer) return make_error("model has no tokenizer");
  if (m.tokenizer->n_vocab() > c.n_vocab)
    return make_error("tokenizer has %d tokens but the model's vocabulary is %d", m.tokenizer->n_vocab(), c.n_vocab);
  const int64_t q = int64_t{c.n_head} * c.head_dim, kv = int64_t{c.n_head_kv} * c.head_dim;
  LARDER_CHECK_STATUS(check_tensor(m.tok_embd, "token_embd", -1, c.n_embd, c.n_vocab, false));
  LARDER_CHECK_STATUS(check_tensor(m.output_norm, "output_norm", -1, c.n_embd, 1, true));
  LARDER_CHECK_STATUS(check_tensor(m.output, "output", -1, c.n_embd, c.n_vocab, false));
  for (int i = 0; i < c.n_layer; ++i) {
    const LayerWeights& l = m.layers[i];
    LARDER_CHECK_STATUS(check_tensor(l.attn_norm, "attn_norm", i, c.n_embd, 1, true));
    LARDER_CHECK_STATUS(check_tensor(l.wq, "attn_q", i, c.n_embd, q, false));
    LARDER_CHECK_STATUS(check_tensor(l.wk, "attn_k", i, c.n_embd, kv, false));
    LARDER_CHECK_STATUS(check_tensor(l.wv, "attn_v", i, c.n_embd, kv, false));
    LARDER_CHECK_STATUS(check_tensor(l.wo, "attn_output", i, q, c.n_embd, false));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_norm, "ffn_norm", i, c.n_embd, 1, true));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_gate, "ffn_gate", i, c.n_embd, c.n_ff, false));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_up, "ffn_up", i, c.n_embd, c.n_ff, false));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_down, "ffn_down", i, c.n_ff, c.n_embd, false));
    if (c.qkv_bias) {
      LARDER_CHECK_STATUS(check_tensor(l.bq, "attn_q.bias", i, q, 1, true));
      LARDER_CHECK_STATUS(check_tensor(l.bk, "attn_k.bias", i, kv, 1, true));
      LARDER_CHECK_STATUS(check_tensor(l.bv, "attn_v.bias", i, kv, 1, true));
    }
  }
  return Status::Ok();
}

std::vector<float> llama3_rope_factors(int head_dim, float theta, float factor, float low_freq_factor,
                                       float high_freq_factor, int original_max_pos) {
  // Meta's apply_scaling: long wavelengths are divided by `factor`, short ones kept,
  // the band between interpolated smoothly. Returned as per-frequency divisors.
  std::vector<float> out(head_dim / 2);
  const double low_wavelen = original_max_pos / low_freq_factor;
  const double high_wavelen = original_max_pos / high_freq_factor;
  for (int i = 0; i < head_dim / 2; ++i) {
    double freq = 1.0 / std::pow(static_cast<double>(theta), 2.0 * i / head_dim);
    double wavelen = 2 * M_PI / freq;
    double div;
    if (wavelen < high_wavelen) {
      div = 1;
    } else if (wavelen > low_wavelen) {
      div = factor;
    } else {
      double smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      div = 1.0 / ((1 - smooth) / factor + smooth);
    }
    out[i] = static_cast<float>(div);
  }
  return out;
}

static bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

Result<std::unique_ptr<Model>> load_model(const std::string& path, const std::string& tokenizer_path) {
  if (path.empty()) return make_error("no model given (use -m PATH or set LARDER_MODEL)");
  if (!file_exists(path)) return make_error("model file not found: %s", path.c_str());
  if (is_directory(path)) return load_model_hf(path);
  // Sniff the magic rather than trusting the extension.
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return make_error("cannot open '%s'", path.c_str());
  uint8_t magic[4] = {0, 0, 0, 0};
  size_t got = std::fread(magic, 1, 4, f);
  std::fclose(f);
  if (got == 4 && std::memcmp(magic, "GGUF", 4) == 0) return load_model_gguf(path);
  if (ends_with(path, ".gguf")) return load_model_gguf(path);  // reports the bad magic
  if (ends_with(path, ".safetensors")) {
    std::string dir = path.substr(0, path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/'));
    return load_model_hf(dir.empty() ? "." : dir);
  }
  return load_model_llama2c(path, tokenizer_path);
}

}  // namespace larder
