// Perplexity of a token sequence, and KL divergence of a model's next-token distributions
// from a base model's (llama.cpp `perplexity` / `--kl-divergence` conventions).
//
// Windows: the tokens (the text tokenized WITH BOS) are split into non-overlapping windows of
// n_ctx tokens; a trailing partial window is not used. When the vocabulary adds BOS, each
// window's first token is replaced by BOS, so every window starts like a fresh sequence.
// Scoring: the first n_ctx/2 tokens of a window are context only; the logits at window
// positions j = n_ctx/2 .. n_ctx-2 are scored against the token at j+1. That is
// n_ctx - 1 - n_ctx/2 scored tokens per window (255 for n_ctx = 512), every one of them
// predicted with at least n_ctx/2 tokens of context -- the same numbers llama.cpp reports.
// Each window is one sequence in a fresh KV cache: the context half is decoded without
// logits, the scored half in one batch with all logits (n_batch only chunks the work).
//
// All statistics use double precision and a max-shifted log-softmax:
//   NLL(t)  = logsumexp(l) - l[t]
//   KL(P_base || P_model) = sum_v p_base(v) (log p_base(v) - log p_model(v)),
//   perplexity = exp(mean NLL).
//
// The base may be the same model with another KV cache type (base_type_k/v): KL then measures
// what the cache type changes, like llama.cpp's --kl-divergence against an f32-cache run.
//
// Header-only so the CLI and tests can use it without another library source.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/result.h"
#include "engine/context.h"
#include "model/model.h"

namespace larder {

// ---------------------------------------------------------------- per-row math (double)

// log(sum_v exp(x[v])), shifted by the maximum so nothing overflows.
inline double log_sum_exp(const float* x, int n) {
  float mx = x[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - mx);
  return mx + std::log(s);
}

// Negative log-likelihood of `target` under softmax(logits).
inline double token_nll(const float* logits, int n_vocab, int32_t target) {
  return log_sum_exp(logits, n_vocab) - static_cast<double>(logits[target]);
}

// KL(P_base || P_model) between softmax(base) and softmax(model). Mathematically >= 0;
// rounding can give -1e-17 for identical rows, which is clamped to 0.
inline double kl_divergence(const float* base, const float* model, int n_vocab) {
  const double lz_b = log_sum_exp(base, n_vocab), lz_m = log_sum_exp(model, n_vocab);
  double kl = 0.0;
  for (int v = 0; v < n_vocab; ++v) {
    const double lp_b = static_cast<double>(base[v]) - lz_b;
    const double lp_m = static_cast<double>(model[v]) - lz_m;
    kl += std::exp(lp_b) * (lp_b - lp_m);
  }
  return std::max(kl, 0.0);
}

// Index of the largest logit (lowest index on ties).
inline int32_t argmax_logit(const float* x, int n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

// ---------------------------------------------------------------- windows

struct PerplexityParams {
  int n_ctx = 0;      // window size in tokens; 0 = the model's training context, capped at 512
  int n_threads = 0;  // 0 = all cores
  int n_batch = 512;  // max tokens per forward pass
  bool w8a8 = false;  // int8 prefill for the model under test (never for the base model)
  std::shared_ptr<offload::SparseFfn> ffn;  // sparse / offloaded FFN of the model under test
  DType type_k = DType::F16, type_v = DType::F16;            // KV cache types of the model under test
  DType base_type_k = DType::F16, base_type_v = DType::F16;  // ... and of the base run
};

struct PerplexityResult {
  int n_ctx = 0;             // window size used
  int n_windows = 0;
  int first_scored = 0;      // n_ctx / 2: logits rows before this are context only
  int64_t n_tokens = 0;      // scored tokens
  int64_t n_unused = 0;      // trailing tokens that do not fill a window
  double nll_sum = 0, nll_mean = 0, perplexity = 0;
  // With a base model:
  bool has_base = false;
  double base_nll_sum = 0, base_nll_mean = 0, base_perplexity = 0;
  double kl_sum = 0, kl_mean = 0, kl_max = 0;
  int64_t top1_agree_count = 0;
  double top1_agree = 0;     // fraction of scored positions where both argmaxes agree

  void finish() {
    if (n_tokens <= 0) return;
    nll_mean = nll_sum / static_cast<double>(n_tokens);
    perplexity = std::exp(nll_mean);
    if (has_base) {
      base_nll_mean = base_nll_sum / static_cast<double>(n_tokens);
      base_perplexity = std::exp(base_nll_mean);
      kl_mean = kl_sum / static_cast<double>(n_tokens);
      top1_agree = static_cast<double>(top1_agree_count) / static_cast<double>(n_tokens);
    }
  }
};

// Called after each window with the statistics so far (finish() already applied).
using PerplexityProgress = std::function<void(int window, const PerplexityResult& so_far, double seconds)>;

// Window size for a model and a requested size (0 = the model's context, capped at 512).
inline int perplexity_window(const Model& m, int requested) {
  if (requested > 0) return requested;
  int c = m.cfg.n_ctx_train > 0 ? m.cfg.n_ctx_train : 512;
  return std::min(c, 512);
}

// Same tokenizer and logit layout, or a clear error naming both files.
inline Status check_same_vocab(const Model& model, const Model& base) {
  const std::string names = "'" + base.path + "' and '" + model.path + "'";
  if (model.cfg.n_vocab != base.cfg.n_vocab)
    return make_error("--kl-base: %s have different vocabulary sizes (%d vs %d tokens)", names.c_str(),
                      base.cfg.n_vocab, model.cfg.n_vocab);
  if (!model.tokenizer || !base.tokenizer) return make_error("--kl-base: %s: a model has no tokenizer", names.c_str());
  const Vocab& a = base.tokenizer->vocab();
  const Vocab& b = model.tokenizer->vocab();
  if (a.tokens.size() != b.tokens.size())
    return make_error("--kl-base: %s have different tokenizers (%zu vs %zu tokens)", names.c_str(), a.tokens.size(),
                      b.tokens.size());
  if (a.kind != b.kind) return make_error("--kl-base: %s have different tokenizer types", names.c_str());
  for (size_t i = 0; i < a.tokens.size(); ++i)
    if (a.tokens[i] != b.tokens[i])
      return make_error("--kl-base: %s have different vocabularies (token %zu differs)", names.c_str(), i);
  if (a.bos != b.bos || a.add_bos != b.add_bos)
    return make_error("--kl-base: %s have different BOS settings", names.c_str());
  return Status::Ok();
}

// The input checks compute_perplexity() makes before any work (one-line errors).
inline Status check_perplexity_input(const Model& model, size_t n_tokens, const PerplexityParams& p) {
  if (p.n_ctx < 0) return make_error("context size (-c) must not be negative");
  if (p.n_batch <= 0) return make_error("batch size (-b) must be positive");
  if (p.n_threads < 0) return make_error("thread count (-t) must not be negative");
  const int C = perplexity_window(model, p.n_ctx);
  if (C < 3) return make_error("a window of %d tokens scores nothing; use -c 3 or more", C);
  if (n_tokens < static_cast<size_t>(C))
    return make_error("the text is %zu tokens (with BOS), fewer than one window of %d tokens; use a longer text or a "
                      "smaller -c",
                      n_tokens, C);
  return Status::Ok();
}

// Perplexity of `model` on `tokens` (already tokenized, normally with BOS); with `base`,
// also KL(P_base || P_model), the base perplexity and top-1 agreement on the same windows.
inline Result<PerplexityResult> compute_perplexity(const Model& model, const Model* base,
                                                   std::span<const int32_t> tokens, const PerplexityParams& p,
                                                   const PerplexityProgress& progress = {}) {
  LARDER_CHECK_STATUS(check_perplexity_input(model, tokens.size(), p));
  const int C = perplexity_window(model, p.n_ctx);
  if (base) LARDER_CHECK_STATUS(check_same_vocab(model, *base));
  const int V = model.cfg.n_vocab;
  for (int32_t t : tokens)
    if (t < 0 || t >= V) return make_error("token id %d is outside the vocabulary (%d)", t, V);

  ContextParams cp;
  cp.n_ctx = C;
  cp.n_threads = p.n_threads;
  cp.n_batch = p.n_batch;
  ContextParams mcp = cp;
  mcp.w8a8 = p.w8a8;
  mcp.ffn = p.ffn;
  mcp.type_k = p.type_k;
  mcp.type_v = p.type_v;
  LARDER_TRY(ctx, Context::create(model, mcp));
  std::unique_ptr<Context> bctx;
  if (base) {
    ContextParams bcp = cp;
    bcp.type_k = p.base_type_k;
    bcp.type_v = p.base_type_v;
    LARDER_TRY(bc, Context::create(*base, bcp));
    bctx = std::move(bc);
  }

  PerplexityResult r;
  r.n_ctx = C;
  r.n_windows = static_cast<int>(tokens.size() / C);
  r.first_scored = C / 2;
  r.n_unused = static_cast<int64_t>(tokens.size()) - static_cast<int64_t>(r.n_windows) * C;
  r.has_base = base != nullptr;
  const int first = r.first_scored;
  const int n_rows = C - first;  // logits rows first .. C-1; the last row predicts past the window
  const Vocab& vocab = model.tokenizer->vocab();
  const bool bos_first = vocab.add_bos && vocab.bos >= 0;

  std::vector<int32_t> win(C);
  std::vector<float> logits(static_cast<size_t>(n_rows) * V), blogits(base ? logits.size() : 0);
  auto eval = [&](Context& c, float* out) -> Status {
    c.reset();
    LARDER_CHECK_STATUS(c.decode(std::span<const int32_t>(win.data(), first)));
    return c.decode(std::span<const int32_t>(win.data() + first, n_rows), out);
  };
  const auto t0 = std::chrono::steady_clock::now();
  for (int w = 0; w < r.n_windows; ++w) {
    std::copy(tokens.begin() + static_cast<size_t>(w) * C, tokens.begin() + static_cast<size_t>(w + 1) * C, win.begin());
    if (bos_first) win[0] = vocab.bos;
    LARDER_CHECK_STATUS(eval(*ctx, logits.data()));
    if (base) LARDER_CHECK_STATUS(eval(*bctx, blogits.data()));
    for (int i = 0; i + 1 < n_rows; ++i) {  // row i is window position first + i
      const int32_t target = win[first + i + 1];
      const float* lm = logits.data() + static_cast<size_t>(i) * V;
      const double nll = token_nll(lm, V, target);
      if (!std::isfinite(nll))
        return make_error("non-finite log-likelihood in window %d at position %d (the model produced NaN/inf logits)",
                          w + 1, first + i);
      r.nll_sum += nll;
      if (base) {
        const float* lb = blogits.data() + static_cast<size_t>(i) * V;
        const double bnll = token_nll(lb, V, target);
        const double kl = kl_divergence(lb, lm, V);
        if (!std::isfinite(bnll) || !std::isfinite(kl))
          return make_error("non-finite statistics in window %d at position %d (NaN/inf logits)", w + 1, first + i);
        r.base_nll_sum += bnll;
        r.kl_sum += kl;
        r.kl_max = std::max(r.kl_max, kl);
        r.top1_agree_count += argmax_logit(lb, V) == argmax_logit(lm, V);
      }
      ++r.n_tokens;
    }
    r.finish();
    if (progress)
      progress(w, r, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  r.finish();
  return r;
}

}  // namespace larder
