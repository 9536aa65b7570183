// `larder perplexity -m MODEL -f TEXT [-c CTX] [-b BATCH] [-t N] [-ctk T] [-ctv T] [--kl-base BASE
//   [--kl-base-cache-type T]] [--json]`
// KV cache types against the f32 cache: -m M -ctk q8_0 -ctv q8_0 --kl-base M --kl-base-cache-type f32.
//
// The text is tokenized with BOS and split into non-overlapping windows of CTX tokens (default:
// the model's context, capped at 512); each window starts with BOS and only its SECOND HALF is
// scored (the first CTX/2 tokens are context), as llama.cpp's perplexity does. See
// engine/perplexity.h for the exact definitions. Progress goes to stderr; the result to stdout:
//   perplexity: X over N tokens
// or, with --json, one object:
//   {"perplexity", "n_tokens", "nll_mean", "kl_mean", "kl_max", "top1_agree", ...}
// (the KL fields are null without --kl-base).
#include <cmath>
#include <cstdio>
#include <string>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/mmap_file.h"
#include "engine/perplexity.h"
#include "model/model.h"

namespace larder::cli {

namespace {
// Fixed notation for ordinary values; random-weight models can give astronomically large ones.
std::string num(double x, int prec = 6) {
  char b[64];
  std::snprintf(b, sizeof b, std::fabs(x) < 1e7 ? "%.*f" : "%.*e", prec, x);
  return b;
}
}  // namespace

int cmd_perplexity(Args& a) {
  if (a.model.empty()) return fail("perplexity needs a model (-m PATH or LARDER_MODEL)");
  if (a.file.empty()) return fail("perplexity needs a text file (-f TEXT)");
  auto kvt = cache_types(a);
  if (!kvt.ok()) return fail(kvt.error());
  DType base_k = kvt->first, base_v = kvt->second;
  if (!a.kl_base_cache_type.empty()) {
    auto t = parse_kv_type(a.kl_base_cache_type);
    if (!t.ok()) return fail("--kl-base-cache-type: " + t.error());
    if (a.kl_base.empty()) return fail("--kl-base-cache-type needs --kl-base BASE (which may be the model itself)");
    base_k = base_v = *t;
  }
  auto text = read_file(a.file);
  if (!text.ok()) return fail(text.error());

  auto mr = load_model(a.model, a.tokenizer, !a.no_repack, ffn_on_disk(a));
  if (!mr.ok()) return fail(mr.error());
  const Model& m = **mr;
  auto ffn = open_ffn(a, m);
  if (!ffn.ok()) return fail(ffn.error());
  std::unique_ptr<Model> base;
  const Model* basep = nullptr;
  if (a.kl_base == a.model && !ffn_wanted(a)) {  // the same model, e.g. with another KV cache type: load it once
    basep = &m;
  } else if (!a.kl_base.empty()) {
    auto br = load_model(a.kl_base, a.tokenizer, !a.no_repack);
    if (!br.ok()) return fail("--kl-base: " + br.error());
    base = std::move(*br);
    Status st = check_same_vocab(m, *base);
    if (!st.ok()) return fail(st.error());
    basep = base.get();
  }

  std::vector<int32_t> toks = m.tokenizer->encode(*text, /*add_bos=*/true, /*parse_special=*/false);
  PerplexityParams pp;
  pp.n_ctx = a.n_ctx;
  pp.n_threads = a.n_threads;
  pp.n_batch = a.n_batch;
  pp.ffn = *ffn;
  pp.w8a8 = a.w8a8;  // the model under test only: --kl-base BASE then measures what int8 prefill changes
  pp.type_k = kvt->first;
  pp.type_v = kvt->second;
  pp.base_type_k = base_k;
  pp.base_type_v = base_v;
  if (Status st = check_perplexity_input(m, toks.size(), pp); !st.ok()) return fail(st.error());
  const int C = perplexity_window(m, a.n_ctx);
  const bool bos = m.tokenizer->vocab().add_bos && m.tokenizer->bos() >= 0;
  const char* bos_note = bos ? ", each starting with BOS" : "";
  if (C > m.cfg.n_ctx_train && m.cfg.n_ctx_train > 0)
    std::fprintf(stderr, "larder: warning: window of %d tokens is longer than the model's training context (%d)\n", C,
                 m.cfg.n_ctx_train);
  std::fprintf(stderr,
               "perplexity: %s: %zu tokens from %s; windows of %d tokens%s, scoring its second half (window tokens %d..%d, 0-based, each predicted from at least %d tokens)%s\n",
               m.path.c_str(), toks.size(), a.file.c_str(), C, bos_note, C / 2 + 1, C - 1, C / 2 + 1,
               a.w8a8 ? "; --w8a8 int8 prefill for the model (not the base)" : "");

  if (basep)
    std::fprintf(stderr, "perplexity: KV cache %s; base %s with KV cache %s\n", kv_types_name(pp.type_k, pp.type_v).c_str(),
                 basep->path.c_str(), kv_types_name(base_k, base_v).c_str());
  auto res = compute_perplexity(m, basep, toks, pp, [&](int w, const PerplexityResult& r, double s) {
    if (r.has_base)
      std::fprintf(stderr, "perplexity: window %d/%d: ppl %s (base %s), mean KL %.6g, top-1 %.2f%% (%.2f s)\n", w + 1,
                   r.n_windows, num(r.perplexity, 4).c_str(), num(r.base_perplexity, 4).c_str(), r.kl_mean,
                   100.0 * r.top1_agree, s);
    else
      std::fprintf(stderr, "perplexity: window %d/%d: ppl %s (%.2f s)\n", w + 1, r.n_windows, num(r.perplexity, 4).c_str(), s);
  });
  if (!res.ok()) return fail(res.error());
  const PerplexityResult& r = *res;

  if (a.json) {
    nlohmann::json j;
    j["perplexity"] = r.perplexity;
    j["n_tokens"] = r.n_tokens;
    j["nll_mean"] = r.nll_mean;
    j["kl_mean"] = r.has_base ? nlohmann::json(r.kl_mean) : nlohmann::json(nullptr);
    j["kl_max"] = r.has_base ? nlohmann::json(r.kl_max) : nlohmann::json(nullptr);
    j["top1_agree"] = r.has_base ? nlohmann::json(r.top1_agree) : nlohmann::json(nullptr);
    j["base_perplexity"] = r.has_base ? nlohmann::json(r.base_perplexity) : nlohmann::json(nullptr);
    j["n_ctx"] = r.n_ctx;
    j["cache_type_k"] = dtype_name(pp.type_k);
    j["cache_type_v"] = dtype_name(pp.type_v);
    j["n_windows"] = r.n_windows;
    j["n_unused"] = r.n_unused;
    j["scored"] = "second-half";
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("perplexity: %s over %lld tokens\n", num(r.perplexity).c_str(), static_cast<long long>(r.n_tokens));
  std::printf("  %d windows of %d tokens%s; scored: the second half of each window (%d tokens "
              "per window, after %d tokens of context); mean NLL %.6f; %lld trailing tokens unused\n",
              r.n_windows, r.n_ctx, bos_note, r.n_ctx - 1 - r.first_scored, r.first_scored, r.nll_mean,
              static_cast<long long>(r.n_unused));
  if (r.has_base)
    std::printf("KL(base || model): mean %.6g, max %.6g over %lld tokens; top-1 agreement %.2f%%; base perplexity %s\n",
                r.kl_mean, r.kl_max, static_cast<long long>(r.n_tokens), 100.0 * r.top1_agree,
                num(r.base_perplexity).c_str());
  return 0;
}

}  // namespace larder::cli
