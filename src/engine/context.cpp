#include "engine/context.h"

#include "kernels/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unistd.h>

namespace larder {

Result<std::unique_ptr<Context>> Context::create(const Model& model, const ContextParams& p) {
  int n_ctx = p.n_ctx > 0 ? p.n_ctx : std::min(model.cfg.n_ctx_train, 4096);
  if (n_ctx <= 0) n_ctx = 2048;
  if (n_ctx > (1 << 20)) return make_error("context size %d is too large", n_ctx);
  int n_threads = p.n_threads > 0 ? p.n_threads : default_thread_count();
  if (n_threads > 256) return make_error("thread count %d is too large", n_threads);
  int n_batch = std::max(1, std::min(p.n_batch, n_ctx));
  const ModelConfig& c = model.cfg;
  // Refuse KV caches that cannot fit rather than dying inside the allocator.
  double kv_bytes = 2.0 * c.n_layer * n_ctx * c.n_head_kv * c.head_dim * sizeof(float);
  const double phys = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (kv_bytes > 0.75 * phys)
    return make_error("KV cache for context %d would need %.1f GiB of %.1f GiB memory; use a smaller -c", n_ctx,
                      kv_bytes / (1ull << 30), phys / (1ull << 30));
  try {
    return std::unique_ptr<Context>(new Context(model, n_ctx, n_threads, n_batch, p.w8a8));
  } catch (const std::bad_alloc&) {
    return make_error("out of memory allocating the context (ctx %d); use a smaller -c", n_ctx);
  }
}

Context::Context(const Model& m, int n_ctx, int n_threads, int n_batch, bool w8a8)
    : model_(m), n_ctx_(n_ctx), n_batch_(n_batch), pool_(n_threads) {
  const ModelConfig& c = m.cfg;
  const int hd = c.head_dim, q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd;
  inv_freq_.resize(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    double f = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / hd);
    if (!c.rope_freq_factors.empty()) f /= c.rope_freq_factors[i];
    inv_freq_[i] = static_cast<float>(f);
  }
  k_cache_.assign(static_cast<size_t>(c.n_layer) * n_ctx * kv_dim, 0.f);
  v_cache_.assign(static_cast<size_t>(c.n_layer) * n_ctx * kv_dim, 0.f);
  x_.resize(static_cast<size_t>(n_batch) * c.n_embd);
  xb_.resize(static_cast<size_t>(n_batch) * std::max(c.n_embd, q_dim));
  q_.resize(static_cast<size_t>(n_batch) * q_dim);
  k_.resize(static_cast<size_t>(n_batch) * kv_dim);
  v_.resize(static_cast<size_t>(n_batch) * kv_dim);
  att_.resize(static_cast<size_t>(n_batch) * q_dim);
  hb_.resize(static_cast<size_t>(n_batch) * c.n_ff);
  hb2_.resize(static_cast<size_t>(n_batch) * c.n_ff);
  cos_.resize(static_cast<size_t>(n_batch) * hd / 2);
  sin_.resize(static_cast<size_t>(n_batch) * hd / 2);
  scores_.resize(static_cast<size_t>(n_threads) * kQBlock * n_ctx);
  pos_.resize(n_batch);
  last_logits_.resize(c.n_vocab);
  if (w8a8) {
    auto q = [&](const Tensor& t) { return kernels::w8_from_tensor(t.type, t.data, t.rows(), t.cols(), pool_); };
    for (const LayerWeights& L : m.layers)
      w8_.push_back({q(L.wq), q(L.wk), q(L.wv), q(L.wo), q(L.ffn_gate), q(L.ffn_up), q(L.ffn_down)});
  }
  // Largest activation format is q8_0-like (34 bytes per 32 values); reserve once.
  scratch_.xq.reserve(static_cast<size_t>(n_batch) * (std::max(c.n_embd, c.n_ff) / 32 + 1) * 40);
}

void Context::truncate(int n) {
  LARDER_ASSERT(n >= 0 && n <= n_past_);
  n_past_ = n;
}

Status Context::decode(std::span<const int32_t> tokens, float* all_logits) {
  if (tokens.empty()) return make_error("decode: no tokens");
  if (n_past_ + static_cast<int64_t>(tokens.size()) > n_ctx_)
    return make_error("context is full: %d cached + %zu new tokens exceed the context size %d (use a larger -c)",
                      n_past_, tokens.size(), n_ctx_);
  for (int32_t t : tokens)
    if (t < 0 || t >= model_.cfg.n_vocab) return make_error("token id %d is out of range [0, %d)", t, model_.cfg.n_vocab);
  for (size_t off = 0; off < tokens.size(); off += n_batch_) {
    int n = static_cast<int>(std::min<size_t>(n_batch_, tokens.size() - off));
    forward(tokens.data() + off, n, all_logits ? all_logits + off * model_.cfg.n_vocab : nullptr);
  }
  return Status::Ok();
}

// Rotates q or k rows in place: x is [n_tok][n_heads][hd].
void Context::rope(float* x, int n_tok, int n_heads, const int* pos) {
  const int hd = model_.cfg.head_dim, half = hd / 2;
  const bool neox = model_.cfg.rope_type == RopeType::NEOX;
  for (int t = 0; t < n_tok; ++t) {
    const float* cs = cos_.data() + static_cast<size_t>(t) * half;
    const float* sn = sin_.data() + static_cast<size_t>(t) * half;
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (static_cast<size_t>(t) * n_heads + h) * hd;
      for (int i = 0; i < half; ++i) {
        int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * sn[i];
        v[b] = x0 * sn[i] + x1 * cs[i];
      }
    }
  }
}

// Causal attention of the batch's queries over the cache (which already holds the
// batch's keys/values), in tiles of kQBlock queries of one head: scores for the tile
// (never the full score matrix) come from the GEMM tiles, then softmax, then P.V.
void Context::attention(int layer, int n, const int* pos) {
  const ModelConfig& c = model_.cfg;
  const int hd = c.head_dim, n_head = c.n_head, q_dim = n_head * hd, kv_dim = c.n_head_kv * hd;
  const int group = c.n_head / c.n_head_kv;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float* kc = k_cache_.data() + static_cast<size_t>(layer) * n_ctx_ * kv_dim;
  const float* vc = v_cache_.data() + static_cast<size_t>(layer) * n_ctx_ * kv_dim;
  const int n_blocks = (n + kQBlock - 1) / kQBlock;
  const kernels::Isa isa = kernels::active_isa();
  pool_.parallel_for(static_cast<int64_t>(n_head) * n_blocks, [&](int64_t wb, int64_t we, int tid) {
    float* sc = scores_.data() + static_cast<size_t>(tid) * kQBlock * n_ctx_;  // [kQBlock][n_ctx]
    for (int64_t w = wb; w < we; ++w) {
      const int h = static_cast<int>(w % n_head), blk = static_cast<int>(w / n_head);
      const int kvh = h / group;
      const int t0 = blk * kQBlock, nt = std::min(kQBlock, n - t0);
      const int len = pos[t0 + nt - 1] + 1;  // keys needed by the last query of the tile
      const float* q = q_.data() + static_cast<size_t>(t0) * q_dim + h * hd;
      kernels::gemm_f32(kc + kvh * hd, kv_dim, len, q, q_dim, nt, hd, sc, n_ctx_, isa);
      for (int t = 0; t < nt; ++t) {
        float* row = sc + static_cast<size_t>(t) * n_ctx_;
        const int lt = pos[t0 + t] + 1;  // causal mask: later keys get zero weight
        for (int p = 0; p < lt; ++p) row[p] *= scale;
        kernels::softmax(row, lt);
        for (int p = lt; p < len; ++p) row[p] = 0.f;
      }
      float* out = att_.data() + static_cast<size_t>(t0) * q_dim + h * hd;
      for (int t = 0; t < nt; ++t) std::memset(out + static_cast<size_t>(t) * q_dim, 0, hd * sizeof(float));
      kernels::pv_accumulate(sc, n_ctx_, nt, vc + kvh * hd, kv_dim, len, hd, out, q_dim, isa);
    }
  });
}

void Context::mm(const Tensor& W, const kernels::W8Tensor* w8, const float* x, int n, float* y, int64_t ldy) {
  if (w8 && n >= kernels::kGemmMinTokens)
    kernels::matmul_w8a8(*w8, x, n, y, ldy, pool_, w8_scratch_, kernels::active_isa(), &w8a8_stats_);
  else
    kernels::matmul(W, x, n, y, ldy, pool_, scratch_);
}

void Context::forward(const int32_t* tokens, int n, float* out_logits) {
  const ModelConfig& c = model_.cfg;
  const int E = c.n_embd, hd = c.head_dim, q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, F = c.n_ff;
  const int half = hd / 2;
  for (int t = 0; t < n; ++t) {
    pos_[t] = n_past_ + t;
    double p = static_cast<double>(pos_[t]) * c.rope_freq_scale;
    for (int i = 0; i < half; ++i) {
      double ang = p * inv_freq_[i];
      cos_[static_cast<size_t>(t) * half + i] = static_cast<float>(std::cos(ang));
      sin_[static_cast<size_t>(t) * half + i] = static_cast<float>(std::sin(ang));
    }
  }
  // Embedding lookup: x [n][E]
  const size_t erb = row_bytes(model_.tok_embd.type, E);
  for (int t = 0; t < n; ++t)
    kernels::dequantize_row(model_.tok_embd.type, static_cast<const uint8_t*>(model_.tok_embd.data) + tokens[t] * erb,
                            x_.data() + static_cast<size_t>(t) * E, E);

  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& L = model_.layers[l];
    const LayerW8* W8 = w8_.empty() ? nullptr : &w8_[l];
    const float* an = static_cast<const float*>(L.attn_norm.data);
    for (int t = 0; t < n; ++t) kernels::rmsnorm(&xb_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E], an, E, c.rms_eps);
    mm(L.wq, W8 ? W8->wq.get() : nullptr, xb_.data(), n, q_.data(), q_dim);
    mm(L.wk, W8 ? W8->wk.get() : nullptr, xb_.data(), n, k_.data(), kv_dim);
    mm(L.wv, W8 ? W8->wv.get() : nullptr, xb_.data(), n, v_.data(), kv_dim);
    if (c.qkv_bias) {
      for (int t = 0; t < n; ++t) {
        kernels::axpy(&q_[static_cast<size_t>(t) * q_dim], static_cast<const float*>(L.bq.data), 1.f, q_dim);
        kernels::axpy(&k_[static_cast<size_t>(t) * kv_dim], static_cast<const float*>(L.bk.data), 1.f, kv_dim);
        kernels::axpy(&v_[static_cast<size_t>(t) * kv_dim], static_cast<const float*>(L.bv.data), 1.f, kv_dim);
      }
    }
    rope(q_.data(), n, c.n_head, pos_.data());
    rope(k_.data(), n, c.n_head_kv, pos_.data());
    float* kc = k_cache_.data() + static_cast<size_t>(l) * n_ctx_ * kv_dim;
    float* vc = v_cache_.data() + static_cast<size_t>(l) * n_ctx_ * kv_dim;
    std::memcpy(kc + static_cast<size_t>(n_past_) * kv_dim, k_.data(), static_cast<size_t>(n) * kv_dim * sizeof(float));
    std::memcpy(vc + static_cast<size_t>(n_past_) * kv_dim, v_.data(), static_cast<size_t>(n) * kv_dim * sizeof(float));
    attention(l, n, pos_.data());
    mm(L.wo, W8 ? W8->wo.get() : nullptr, att_.data(), n, xb_.data(), E);
    for (int t = 0; t < n; ++t) kernels::axpy(&x_[static_cast<size_t>(t) * E], &xb_[static_cast<size_t>(t) * E], 1.f, E);

    const float* fn = static_cast<const float*>(L.ffn_norm.data);
    for (int t = 0; t < n; ++t) kernels::rmsnorm(&xb_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E], fn, E, c.rms_eps);
    mm(L.ffn_gate, W8 ? W8->gate.get() : nullptr, xb_.data(), n, hb_.data(), F);
    mm(L.ffn_up, W8 ? W8->up.get() : nullptr, xb_.data(), n, hb2_.data(), F);
    kernels::swiglu(hb_.data(), hb_.data(), hb2_.data(), static_cast<int64_t>(n) * F);
    mm(L.ffn_down, W8 ? W8->down.get() : nullptr, hb_.data(), n, xb_.data(), E);
    for (int t = 0; t < n; ++t) kernels::axpy(&x_[static_cast<size_t>(t) * E], &xb_[static_cast<size_t>(t) * E], 1.f, E);
  }
  const float* on = static_cast<const float*>(model_.output_norm.data);
  if (out_logits) {
    for (int t = 0; t < n; ++t) kernels::rmsnorm(&xb_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E], on, E, c.rms_eps);
    kernels::matmul(model_.output, xb_.data(), n, out_logits, c.n_vocab, pool_, scratch_);
    std::memcpy(last_logits_.data(), out_logits + static_cast<size_t>(n - 1) * c.n_vocab, c.n_vocab * sizeof(float));
  } else {
    kernels::rmsnorm(xb_.data(), &x_[static_cast<size_t>(n - 1) * E], on, E, c.rms_eps);
    kernels::matmul(model_.output, xb_.data(), 1, last_logits_.data(), c.n_vocab, pool_, scratch_);
  }
  n_past_ += n;
}

}  // namespace larder
