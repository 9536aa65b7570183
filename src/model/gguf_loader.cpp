// GGUF model loader: zero-copy weight views into the mapped file.
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "model/gguf.h"
#include "model/model.h"

namespace larder {

namespace {

Tensor view(const GgufTensorInfo* ti) {
  Tensor t;
  if (!ti) return t;
  t.name = ti->name;
  t.type = ti->type;
  t.ne[0] = ti->ne[0];
  t.ne[1] = ti->n_elements() / ti->ne[0];
  t.data = ti->data;
  t.nbytes = ti->nbytes;
  return t;
}

// 1-D tensors (norms, biases) are used as f32; convert other float types once at load.
Result<Tensor> view_f32(const GgufTensorInfo* ti, Model& m) {
  Tensor t = view(ti);
  if (!ti || ti->type == DType::F32) return t;
  const DTypeInfo* info = dtype_info(ti->type);
  if (!info || !info->computable)
    return make_error("tensor '%s' has type %s, expected f32", ti->name.c_str(), info ? info->name : "unknown");
  auto buf = std::make_shared<std::vector<float>>(ti->n_elements());
  kernels::dequantize_row(ti->type, ti->data, buf->data(), ti->n_elements());
  m.keepalive.push_back(buf);
  t.type = DType::F32;
  t.data = buf->data();
  t.nbytes = buf->size() * 4;
  return t;
}

}  // namespace

Result<std::unique_ptr<Model>> load_model_gguf(const std::string& path) {
  LARDER_TRY(g, GgufFile::open(path));
  auto m = std::make_unique<Model>();
  m->format = "gguf";
  m->path = path;
  m->gguf = g;
  ModelConfig& c = m->cfg;
  auto arch = g->get_string("general.architecture");
  if (!arch) return make_error("%s: missing general.architecture (tokenizer-only GGUF?)", path.c_str());
  if (*arch != "llama" && *arch != "qwen2" && *arch != "mistral" && *arch != "gemma3")
    return make_error("%s: unsupported architecture '%s' (supported: llama, mistral, qwen2, gemma3)", path.c_str(),
                      arch->c_str());
  const bool gemma3 = *arch == "gemma3";
  c.arch = *arch;
  c.name = g->get_string("general.name").value_or("");
  const std::string a = *arch + ".";
  auto req_int = [&](const std::string& k, int* out) -> Status {
    auto v = g->get_int(a + k);
    if (!v) return make_error("%s: missing metadata '%s'", path.c_str(), (a + k).c_str());
    if (*v <= 0 || *v > (int64_t{1} << 31) - 1) return make_error("%s: invalid value for '%s'", path.c_str(), (a + k).c_str());
    *out = static_cast<int>(*v);
    return Status::Ok();
  };
  LARDER_CHECK_STATUS(req_int("embedding_length", &c.n_embd));
  LARDER_CHECK_STATUS(req_int("feed_forward_length", &c.n_ff));
  LARDER_CHECK_STATUS(req_int("block_count", &c.n_layer));
  LARDER_CHECK_STATUS(req_int("attention.head_count", &c.n_head));
  c.n_head_kv = c.n_head;
  if (g->find(a + "attention.head_count_kv")) LARDER_CHECK_STATUS(req_int("attention.head_count_kv", &c.n_head_kv));
  if (g->find(a + "context_length")) LARDER_CHECK_STATUS(req_int("context_length", &c.n_ctx_train));
  c.head_dim = c.n_embd / c.n_head;
  if (g->find(a + "attention.key_length")) LARDER_CHECK_STATUS(req_int("attention.key_length", &c.head_dim));
  c.rms_eps = static_cast<float>(g->get_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  c.rope_theta = static_cast<float>(g->get_float(a + "rope.freq_base").value_or(c.arch == "qwen2" ? 1e6 : 1e4));
  if (auto st = g->get_string(a + "rope.scaling.type"); st && *st == "linear") {
    double f = g->get_float(a + "rope.scaling.factor").value_or(1.0);
    if (f > 0) c.rope_freq_scale = static_cast<float>(1.0 / f);
  }
  if (auto rd = g->get_int(a + "rope.dimension_count"); rd && *rd != c.head_dim)
    return make_error("%s: partial rotary embeddings (rope dims %lld of %d) are not supported", path.c_str(),
                      (long long)*rd, c.head_dim);
  c.rope_type = c.arch == "qwen2" || gemma3 ? RopeType::NEOX : RopeType::NORM;
  if (gemma3) {
    // Gemma 3 (HF Gemma3TextModel): embeddings scaled by sqrt(width); q/k RMSNorm per head; norms
    // after attention and FFN too (GGUF stores Gemma's norm weights with the +1 already added);
    // GeGLU with tanh GELU; 5 local (sliding-window) layers per global one, local layers with
    // RoPE base 10000. The query scale is 1/sqrt(query_pre_attn_scalar), which GGUF does not
    // store: HF's configs set it to head_dim for every size but 27B (n_embd / n_head there), as
    // llama.cpp also assumes.
    c.embd_scale = std::sqrt(static_cast<float>(c.n_embd));
    const bool is_27b = c.n_layer == 62 && c.n_embd == 5376;
    c.attn_scale = 1.f / std::sqrt(static_cast<float>(is_27b ? c.n_embd / c.n_head : c.head_dim));
    c.ffn_act = FfnAct::GELU_TANH;
    c.qk_norm = true;
    c.post_norms = true;
    auto sw = g->get_int(a + "attention.sliding_window");
    if (!sw || *sw <= 0 || *sw > (1 << 24)) return make_error("%s: missing or invalid %sattention.sliding_window", path.c_str(), a.c_str());
    c.sliding_window = static_cast<int>(*sw);
    c.rope_theta_swa = static_cast<float>(g->get_float(a + "rope.freq_base_swa").value_or(10000.0));
    int pattern = 6;
    if (auto pt = g->get_int(a + "attention.sliding_window_pattern"); pt && *pt > 0 && *pt <= 1024) pattern = static_cast<int>(*pt);
    if (c.n_layer > 1024) return make_error("%s: absurd block_count %d", path.c_str(), c.n_layer);
    c.swa_layers.assign(c.n_layer, 0);
    for (int l = 0; l < c.n_layer; ++l) c.swa_layers[l] = (l + 1) % pattern != 0;
  }
  c.qkv_bias = g->tensor("blk.0.attn_q.bias") != nullptr;

  m->tok_embd = view(g->tensor("token_embd.weight"));
  if (!m->tok_embd.present()) return make_error("%s: missing tensor token_embd.weight", path.c_str());
  c.n_vocab = static_cast<int>(m->tok_embd.rows());
  LARDER_TRY(onorm, view_f32(g->tensor("output_norm.weight"), *m));
  m->output_norm = onorm;
  if (const GgufTensorInfo* o = g->tensor("output.weight")) {
    m->output = view(o);
  } else {
    m->output = m->tok_embd;
    c.tied_embeddings = true;
  }
  if (const GgufTensorInfo* rf = g->tensor("rope_freqs.weight")) {
    if (rf->type != DType::F32 || rf->n_elements() > 4096)
      return make_error("%s: rope_freqs.weight must be a small f32 tensor", path.c_str());
    const float* p = reinterpret_cast<const float*>(rf->data);
    c.rope_freq_factors.assign(p, p + rf->n_elements());
  }
  if (c.n_layer > 1024) return make_error("%s: absurd block_count %d", path.c_str(), c.n_layer);
  m->layers.resize(c.n_layer);
  for (int i = 0; i < c.n_layer; ++i) {
    LayerWeights& l = m->layers[i];
    std::string p = "blk." + std::to_string(i) + ".";
    auto t = [&](const char* n) { return g->tensor(p + n); };
    LARDER_TRY(an, view_f32(t("attn_norm.weight"), *m));
    LARDER_TRY(fn, view_f32(t("ffn_norm.weight"), *m));
    l.attn_norm = an;
    l.ffn_norm = fn;
    l.wq = view(t("attn_q.weight"));
    l.wk = view(t("attn_k.weight"));
    l.wv = view(t("attn_v.weight"));
    l.wo = view(t("attn_output.weight"));
    l.ffn_gate = view(t("ffn_gate.weight"));
    l.ffn_up = view(t("ffn_up.weight"));
    l.ffn_down = view(t("ffn_down.weight"));
    if (c.qk_norm) {
      LARDER_TRY(qn, view_f32(t("attn_q_norm.weight"), *m));
      LARDER_TRY(kn, view_f32(t("attn_k_norm.weight"), *m));
      l.attn_q_norm = qn;
      l.attn_k_norm = kn;
    }
    if (c.post_norms) {
      LARDER_TRY(pa, view_f32(t("post_attention_norm.weight"), *m));
      LARDER_TRY(pf, view_f32(t("post_ffw_norm.weight"), *m));
      l.post_attn_norm = pa;
      l.post_ffn_norm = pf;
    }
    if (c.qkv_bias) {
      LARDER_TRY(bq, view_f32(t("attn_q.bias"), *m));
      LARDER_TRY(bk, view_f32(t("attn_k.bias"), *m));
      LARDER_TRY(bv, view_f32(t("attn_v.bias"), *m));
      l.bq = bq;
      l.bk = bk;
      l.bv = bv;
    }
  }
  auto tok = load_tokenizer_gguf(*g);
  if (!tok.ok()) return make_error("%s: %s", path.c_str(), tok.error().c_str());
  m->tokenizer = std::move(tok).value();
  Status st = validate_model(*m);
  if (!st.ok()) return make_error("%s: %s", path.c_str(), st.error().c_str());
  return m;
}

}  // namespace larder
