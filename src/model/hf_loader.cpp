// Hugging Face folder loader: config.json + *.safetensors (single or sharded) + tokenizer.json
// (or tokenizer.model). 2-D weights are zero-copy views into the mapped shards; 1-D norms and
// biases become owned f32 buffers because the engine reads them as f32.
#include <dirent.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "kernels/kernels.h"
#include "model/model.h"
#include "model/safetensors.h"

namespace larder {

namespace {

using json = nlohmann::json;

template <class... A>
[[noreturn]] void fail(const char* fmt, A... a) {
  throw LoadError{make_error(fmt, a...).msg};
}

// config.json accessors: absent keys (or null) give the default; wrong types are errors.
bool has(const json& c, const char* k) { return c.contains(k) && !c.at(k).is_null(); }

int64_t get_int(const json& c, const char* k, int64_t lo, int64_t hi) {
  if (!has(c, k)) fail("config.json: missing \"%s\"", k);
  const json& v = c.at(k);
  if (!v.is_number_integer()) fail("config.json: \"%s\" must be an integer", k);
  int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) fail("config.json: \"%s\" = %lld is out of range [%lld, %lld]", k, (long long)x, (long long)lo, (long long)hi);
  return x;
}
int64_t get_int(const json& c, const char* k, int64_t lo, int64_t hi, int64_t def) {
  return has(c, k) ? get_int(c, k, lo, hi) : def;
}
double get_num(const json& c, const char* k, double def) {
  if (!has(c, k)) return def;
  const json& v = c.at(k);
  if (!v.is_number()) fail("config.json: \"%s\" must be a number", k);
  double x = v.get<double>();
  if (!std::isfinite(x)) fail("config.json: \"%s\" is not finite", k);
  return x;
}
bool get_bool(const json& c, const char* k, bool def) {
  if (!has(c, k)) return def;
  if (!c.at(k).is_boolean()) fail("config.json: \"%s\" must be true or false", k);
  return c.at(k).get<bool>();
}
std::string get_str(const json& c, const char* k) {
  if (!has(c, k)) return "";
  if (!c.at(k).is_string()) fail("config.json: \"%s\" must be a string", k);
  return c.at(k).get<std::string>();
}

// Maps model_type / architectures onto the engine's architectures.
std::string detect_arch(const json& c) {
  std::string mt = get_str(c, "model_type");
  std::string a0;
  if (has(c, "architectures")) {
    const json& a = c.at("architectures");
    if (!a.is_array() || (!a.empty() && !a[0].is_string()))
      fail("config.json: \"architectures\" must be a list of strings");
    if (!a.empty()) a0 = a[0].get<std::string>();
  }
  if (mt == "llama" || mt == "mistral" || mt == "smollm" || mt == "tinyllama") return "llama";
  if (mt == "qwen2") return "qwen2";
  if (mt.empty()) {
    if (a0 == "LlamaForCausalLM" || a0 == "MistralForCausalLM") return "llama";
    if (a0 == "Qwen2ForCausalLM") return "qwen2";
  }
  std::string what = !mt.empty() ? "model_type '" + mt + "'" : !a0.empty() ? "architecture '" + a0 + "'" : "no model_type";
  fail("config.json: unsupported architecture (%s); supported: llama, mistral, qwen2", what.c_str());
}

std::vector<std::string> list_safetensors(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (!d) fail("cannot read folder '%s': %s", dir.c_str(), std::strerror(errno));
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

struct Weights {
  std::map<std::string, std::pair<const SafetensorsTensor*, std::string>> by_name;  // -> tensor, shard file

  const SafetensorsTensor* find(const std::string& n) const {
    auto it = by_name.find(n);
    return it == by_name.end() ? nullptr : it->second.first;
  }
};

Tensor to_tensor(const SafetensorsView& v) {
  Tensor t;
  t.name = v.name;
  t.type = v.type;
  t.ne[0] = v.ne[0];
  t.ne[1] = v.ne[1] * v.ne[2] * v.ne[3];
  t.data = v.data;
  t.nbytes = v.nbytes;
  return t;
}

// Copies a tensor into an owned buffer (same type) when the mapped bytes are misaligned for
// the element type; safetensors only promises alignment of the data section as a whole.
void ensure_aligned(Tensor& t, Model& m) {
  size_t el = t.type == DType::F32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(t.data) % el == 0) return;
  auto buf = std::make_shared<std::vector<uint64_t>>((t.nbytes + 7) / 8);
  std::memcpy(buf->data(), t.data, t.nbytes);
  t.data = buf->data();
  m.keepalive.push_back(buf);
}

Tensor weight(const Weights& w, const std::string& name, Model& m, bool required = true) {
  const SafetensorsTensor* st = w.find(name);
  if (!st) {
    if (required) fail("missing tensor '%s'", name.c_str());
    return Tensor{};
  }
  auto v = SafetensorsFile::view(*st);
  if (!v.ok()) fail("%s", v.error().c_str());
  if (v->n_dims != 2) fail("tensor '%s' has %d dimensions, expected 2", name.c_str(), v->n_dims);
  Tensor t = to_tensor(v.value());
  ensure_aligned(t, m);
  return t;
}

// Norm weights and biases: always f32 in the Model.
Tensor vector_f32(const Weights& w, const std::string& name, Model& m) {
  const SafetensorsTensor* st = w.find(name);
  if (!st) fail("missing tensor '%s'", name.c_str());
  auto v = SafetensorsFile::view(*st);
  if (!v.ok()) fail("%s", v.error().c_str());
  if (v->n_dims != 1) fail("tensor '%s' has %d dimensions, expected 1", name.c_str(), v->n_dims);
  Tensor t = to_tensor(v.value());
  const int64_t n = t.ne[0];
  auto buf = std::make_shared<std::vector<float>>(n);
  if (t.type == DType::F32) std::memcpy(buf->data(), t.data, n * 4);  // also fixes alignment
  else kernels::dequantize_row(t.type, t.data, buf->data(), n);
  m.keepalive.push_back(buf);
  t.type = DType::F32;
  t.data = buf->data();
  t.nbytes = n * 4;
  return t;
}

void parse_config(const json& c, ModelConfig& cfg) {
  cfg.arch = detect_arch(c);
  cfg.n_embd = static_cast<int>(get_int(c, "hidden_size", 1, 1 << 17));
  cfg.n_ff = static_cast<int>(get_int(c, "intermediate_size", 1, 1 << 20));
  cfg.n_layer = static_cast<int>(get_int(c, "num_hidden_layers", 1, 1024));
  cfg.n_head = static_cast<int>(get_int(c, "num_attention_heads", 1, 1024));
  cfg.n_head_kv = static_cast<int>(get_int(c, "num_key_value_heads", 1, 1024, cfg.n_head));
  if (cfg.n_embd % cfg.n_head != 0 && !has(c, "head_dim"))
    fail("config.json: hidden_size %d is not divisible by num_attention_heads %d", cfg.n_embd, cfg.n_head);
  cfg.head_dim = static_cast<int>(get_int(c, "head_dim", 2, 1024, cfg.n_embd / cfg.n_head));
  cfg.n_vocab = static_cast<int>(get_int(c, "vocab_size", 1, 10'000'000));
  cfg.n_ctx_train = static_cast<int>(get_int(c, "max_position_embeddings", 1, int64_t{1} << 30, 2048));
  cfg.rms_eps = static_cast<float>(get_num(c, "rms_norm_eps", 1e-6));
  cfg.rope_theta = static_cast<float>(get_num(c, "rope_theta", 10000.0));
  if (!(cfg.rms_eps > 0) || !(cfg.rope_theta > 0)) fail("config.json: rms_norm_eps and rope_theta must be positive");
  cfg.tied_embeddings = get_bool(c, "tie_word_embeddings", false);
  // Variants the engine does not implement must fail loudly rather than compute nonsense.
  if (std::string act = get_str(c, "hidden_act"); !act.empty() && act != "silu" && act != "swish")
    fail("config.json: unsupported hidden_act '%s' (only silu)", act.c_str());
  if (get_bool(c, "mlp_bias", false)) fail("config.json: MLP biases (mlp_bias) are not supported");
  // Sliding-window attention equals full attention while the context fits in the window.
  const bool swa = cfg.arch == "qwen2" ? get_bool(c, "use_sliding_window", false) : has(c, "sliding_window");
  if (swa && has(c, "sliding_window")) {
    int64_t win = get_int(c, "sliding_window", 1, int64_t{1} << 30);
    if (win < cfg.n_ctx_train) cfg.n_ctx_train = static_cast<int>(win);
  }
  cfg.qkv_bias = cfg.arch == "qwen2" || get_bool(c, "attention_bias", false);
  // HF checkpoints keep Q/K in rotate_half order, i.e. NeoX-style RoPE, so no permutation.
  cfg.rope_type = RopeType::NEOX;
  if (has(c, "rope_scaling")) {
    const json& rs = c.at("rope_scaling");
    if (!rs.is_object()) fail("config.json: \"rope_scaling\" must be an object or null");
    std::string type = get_str(rs, "rope_type");
    if (type.empty()) type = get_str(rs, "type");
    if (type == "llama3") {
      double factor = get_num(rs, "factor", 0), lo = get_num(rs, "low_freq_factor", 0),
             hi = get_num(rs, "high_freq_factor", 0);
      int64_t orig = get_int(rs, "original_max_position_embeddings", 1, int64_t{1} << 30);
      if (!(factor > 0) || !(lo > 0) || !(hi > lo))
        fail("config.json: llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0");
      cfg.rope_freq_factors = llama3_rope_factors(cfg.head_dim, cfg.rope_theta, static_cast<float>(factor),
                                                  static_cast<float>(lo), static_cast<float>(hi), static_cast<int>(orig));
    } else if (type == "linear") {
      double factor = get_num(rs, "factor", 0);
      if (!(factor > 0)) fail("config.json: linear rope_scaling needs factor > 0");
      cfg.rope_freq_scale = static_cast<float>(1.0 / factor);
    } else if (type != "default" && !type.empty()) {
      fail("config.json: unsupported rope_scaling type '%s' (supported: llama3, linear)", type.c_str());
    }
  }
  if (has(c, "_name_or_path") && c.at("_name_or_path").is_string()) cfg.name = c.at("_name_or_path").get<std::string>();
}

void load_impl(const std::string& dir, Model& m) {
  // --- config
  const std::string cfg_path = dir + "/config.json";
  if (!file_exists(cfg_path)) fail("not a Hugging Face model folder (no config.json)");
  auto text = read_file(cfg_path);
  if (!text.ok()) fail("%s", text.error().c_str());
  if (!json_nesting_ok(text->data(), text->size())) fail("config.json is nested too deeply");
  json c = json::parse(text.value(), nullptr, /*allow_exceptions=*/false);
  if (c.is_discarded()) fail("config.json is not valid JSON");
  if (!c.is_object()) fail("config.json is not a JSON object");
  ModelConfig& cfg = m.cfg;
  parse_config(c, cfg);
  if (cfg.name.empty()) cfg.name = dir.substr(dir.find_last_of('/') == std::string::npos ? 0 : dir.find_last_of('/') + 1);

  // --- weights: every *.safetensors in the folder (the index, when present, must be satisfied)
  std::vector<std::string> files = list_safetensors(dir);
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (file_exists(index_path)) {
    auto itext = read_file(index_path);
    if (!itext.ok()) fail("%s", itext.error().c_str());
    json idx;
    if (json_nesting_ok(itext->data(), itext->size())) idx = json::parse(itext.value(), nullptr, false);
    if (idx.is_discarded() || !idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
      fail("model.safetensors.index.json: invalid (expected an object with \"weight_map\")");
    for (auto& [name, shard] : idx["weight_map"].items()) {
      if (!shard.is_string()) fail("model.safetensors.index.json: weight_map entry '%s' is not a file name", name.c_str());
      if (!std::binary_search(files.begin(), files.end(), shard.get<std::string>()))
        fail("missing shard '%s' (listed in model.safetensors.index.json)", shard.get<std::string>().c_str());
    }
  }
  if (files.empty()) fail("no *.safetensors files in '%s'", dir.c_str());
  Weights w;
  for (const auto& f : files) {
    auto st = SafetensorsFile::open(dir + "/" + f);
    if (!st.ok()) fail("%s", st.error().c_str());
    auto file = st.value();
    m.keepalive.push_back(file);
    for (const auto& t : file->tensors()) {
      auto [it, inserted] = w.by_name.emplace(t.name, std::make_pair(&t, f));
      if (!inserted)
        fail("tensor '%s' appears in both %s and %s", t.name.c_str(), it->second.second.c_str(), f.c_str());
    }
  }

  m.tok_embd = weight(w, "model.embed_tokens.weight", m);
  if (m.tok_embd.rows() != cfg.n_vocab)
    fail("model.embed_tokens.weight has %lld rows but config.json vocab_size is %d", (long long)m.tok_embd.rows(),
         cfg.n_vocab);
  m.output_norm = vector_f32(w, "model.norm.weight", m);
  if (!cfg.tied_embeddings && w.find("lm_head.weight")) {
    m.output = weight(w, "lm_head.weight", m);
  } else {
    cfg.tied_embeddings = true;
    m.output = m.tok_embd;
  }
  m.layers.resize(cfg.n_layer);
  for (int i = 0; i < cfg.n_layer; ++i) {
    LayerWeights& l = m.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    l.attn_norm = vector_f32(w, p + "input_layernorm.weight", m);
    l.ffn_norm = vector_f32(w, p + "post_attention_layernorm.weight", m);
    l.wq = weight(w, p + "self_attn.q_proj.weight", m);
    l.wk = weight(w, p + "self_attn.k_proj.weight", m);
    l.wv = weight(w, p + "self_attn.v_proj.weight", m);
    l.wo = weight(w, p + "self_attn.o_proj.weight", m);
    l.ffn_gate = weight(w, p + "mlp.gate_proj.weight", m);
    l.ffn_up = weight(w, p + "mlp.up_proj.weight", m);
    l.ffn_down = weight(w, p + "mlp.down_proj.weight", m);
    if (cfg.qkv_bias) {
      l.bq = vector_f32(w, p + "self_attn.q_proj.bias", m);
      l.bk = vector_f32(w, p + "self_attn.k_proj.bias", m);
      l.bv = vector_f32(w, p + "self_attn.v_proj.bias", m);
    }
  }

  // --- tokenizer
  const std::string tj = dir + "/tokenizer.json", tm = dir + "/tokenizer.model";
  Result<std::unique_ptr<Tokenizer>> tok = make_error("unreachable");
  if (file_exists(tj)) tok = load_tokenizer_hf_json(tj);
  else if (file_exists(tm)) tok = load_tokenizer_spm_model(tm);
  else fail("no tokenizer in '%s' (looked for tokenizer.json and tokenizer.model)", dir.c_str());
  if (!tok.ok()) fail("%s", tok.error().c_str());
  m.tokenizer = std::move(tok).value();
}

}  // namespace

Result<std::unique_ptr<Model>> load_model_hf(const std::string& dir_in) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  auto m = std::make_unique<Model>();
  m->format = "safetensors";
  m->path = dir;
  try {
    load_impl(dir, *m);
  } catch (const LoadError& e) {
    return make_error("%s: %s", dir.c_str(), e.msg.c_str());
  } catch (const nlohmann::json::exception& e) {
    return make_error("%s: config.json: %s", dir.c_str(), e.what());
  } catch (const std::bad_alloc&) {
    return make_error("%s: out of memory while loading", dir.c_str());
  }
  Status st = validate_model(*m);
  if (!st.ok()) return make_error("%s: %s", dir.c_str(), st.error().c_str());
  return m;
}

}  // namespace larder
