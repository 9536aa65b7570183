// `larder bench`: llama-bench-style throughput measurement. JSON output uses
// llama-bench's field names where they overlap so one script can read both.
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <tuple>

#include "cli/commands.h"
#include "engine/context.h"
#include "kernels/kernels.h"
#include "model/model.h"

namespace larder::cli {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ','))
    if (!x.empty()) out.push_back(x);
  return out;
}

namespace {
Result<std::vector<int>> split_ints(const std::string& s, const char* what) {
  std::vector<int> v;
  for (auto& x : split(s)) {
    char* end = nullptr;
    long n = std::strtol(x.c_str(), &end, 10);
    if (*end || n < 0 || n > 1000000) return make_error("invalid %s '%s'", what, x.c_str());
    v.push_back(static_cast<int>(n));
  }
  if (v.empty()) return make_error("no %s given", what);
  return v;
}
long peak_rss_bytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss * 1024L;
}
}  // namespace

int cmd_bench(Args& a) {
  if (!a.spec_prompts.empty() || !a.spec_replay.empty()) return bench_spec(a);
  auto models = split(a.bench_models);
  if (models.empty()) return fail("bench needs -m MODEL[,MODEL]");
  auto pp = split_ints(a.bench_prompt, "prompt length");
  auto tg = split_ints(a.bench_gen, "generation length");
  auto th = split_ints(a.bench_threads, "thread count");
  auto dp = split_ints(a.bench_depth, "depth");
  if (!dp.ok()) return fail(dp.error());
  if (!pp.ok()) return fail(pp.error());
  if (!tg.ok()) return fail(tg.error());
  if (!th.ok()) return fail(th.error());
  if (a.reps <= 0) return fail("repetitions must be positive");
  if (a.out_format != "md" && a.out_format != "json") return fail("output must be md or json");
  // KV cache types: every K type with every V type (llama-bench's -ctk/-ctv lists).
  std::vector<std::pair<DType, DType>> kv_types;
  {
    std::vector<DType> ks, vs;
    for (auto [list, out, flag] : {std::tuple{&a.cache_type_k, &ks, "--cache-type-k"}, std::tuple{&a.cache_type_v, &vs, "--cache-type-v"}}) {
      for (const auto& x : split(*list)) {
        auto t = parse_kv_type(x);
        if (!t.ok()) return fail(std::string(flag) + ": " + t.error());
        out->push_back(*t);
      }
      if (out->empty()) return fail(std::string(flag) + ": no type given");
    }
    for (DType k : ks)
      for (DType v : vs) kv_types.emplace_back(k, v);
  }
  nlohmann::json results = nlohmann::json::array();
  if (a.out_format == "md") {
    std::printf("| model | size | params | threads | isa | repacked | type_k | type_v | test | t/s | peak RSS |\n");
    std::printf("| --- | ---: | ---: | ---: | --- | ---: | --- | --- | --- | ---: | ---: |\n");
  }
  for (const auto& path : models) {
    auto mr = load_model(path, "", !a.no_repack, ffn_on_disk(a));
    if (!mr.ok()) return fail(mr.error());
    const Model& m = **mr;
    auto ffn = open_ffn(a, m);
    if (!ffn.ok()) return fail(ffn.error());
    if (*ffn) std::fprintf(stderr, "larder bench: %s\n", (*ffn)->describe().c_str());
    size_t n_params = 0;
    for (const Tensor* t : {&m.tok_embd, &m.output_norm}) n_params += t->cols() * t->rows();
    if (!m.cfg.tied_embeddings) n_params += m.output.cols() * m.output.rows();
    for (const auto& l : m.layers)
      for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.ffn_norm, &l.ffn_gate, &l.ffn_up, &l.ffn_down})
        if (t->present()) n_params += t->cols() * t->rows();
    // "panels P MiB (+C copied)": P MiB repacked for the integer kernels, C MiB moved as they are
    // into huge pages; "no": the file's rows as mapped.
    char rp[64] = "no";
    if (m.packed_bytes)
      std::snprintf(rp, sizeof rp, "panels %.0f MiB (+%.0f copied)", m.panel_bytes / 1048576.0,
                    (m.packed_bytes - m.panel_bytes) / 1048576.0);
    const std::string repacked = rp;
    for (int nt : *th) {
      struct Test { int n_prompt, n_gen, depth; };
      std::vector<Test> tests;
      for (int d : *dp) {
        for (int p : *pp) if (p > 0) tests.push_back({p, 0, d});
        for (int g : *tg) if (g > 0) tests.push_back({0, g, d});
      }
      for (auto [type_k, type_v] : kv_types)
      for (const Test& t : tests) {
        ContextParams cp;
        cp.type_k = type_k;
        cp.type_v = type_v;
        cp.n_threads = nt;
        cp.n_ctx = t.depth + t.n_prompt + t.n_gen + 1;
        cp.n_batch = std::max({1, t.n_prompt, std::min(t.depth, 512)});
        cp.w8a8 = a.w8a8;
        cp.ffn = *ffn;
        auto cr = Context::create(m, cp);
        if (!cr.ok()) return fail(cr.error());
        Context& ctx = **cr;
        std::mt19937 rng(1);
        std::vector<int32_t> toks(std::max(t.n_prompt, 1)), depth(t.depth);
        for (auto& x : toks) x = static_cast<int32_t>(rng() % m.cfg.n_vocab);
        for (auto& x : depth) x = static_cast<int32_t>(rng() % m.cfg.n_vocab);
        if (t.depth > 0) {  // the context every repetition starts from (kept; only what follows is timed)
          Status st = ctx.decode(depth);
          if (!st.ok()) return fail(st.error());
        }
        std::vector<double> ts;
        for (int r = -1; r < a.reps; ++r) {  // r = -1 is a warm-up run
          ctx.truncate(t.depth);
          if (cp.ffn && r == 0) cp.ffn->reset_stats();  // the timed runs' figures
          auto t0 = std::chrono::steady_clock::now();
          if (t.n_prompt > 0) {
            Status st = ctx.decode(toks);
            if (!st.ok()) return fail(st.error());
          } else {
            int32_t tok = m.tokenizer->bos() >= 0 ? m.tokenizer->bos() : 0;
            for (int i = 0; i < t.n_gen; ++i) {
              Status st = ctx.decode(std::span<const int32_t>(&tok, 1));
              if (!st.ok()) return fail(st.error());
              tok = static_cast<int32_t>(rng() % m.cfg.n_vocab);
            }
          }
          double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          if (r >= 0) ts.push_back((t.n_prompt + t.n_gen) / s);
        }
        double mean = 0, var = 0;
        for (double x : ts) mean += x;
        mean /= ts.size();
        for (double x : ts) var += (x - mean) * (x - mean);
        double sd = ts.size() > 1 ? std::sqrt(var / (ts.size() - 1)) : 0;
        std::string test = t.n_prompt ? "pp" + std::to_string(t.n_prompt) : "tg" + std::to_string(t.n_gen);
        if (t.depth > 0) test += " @ d" + std::to_string(t.depth);  // llama-bench's notation
        long rss = peak_rss_bytes();
        if (cp.ffn) std::fprintf(stderr, "larder bench: %s: %s\n", test.c_str(), ffn_report(*cp.ffn).c_str());
        if (a.out_format == "md") {
          // repacked: the weights pack_model_weights moved into panels / huge pages (no = the file's rows).
          std::printf("| %s%s | %.2f MiB | %.2f M | %d | %s | %s | %s | %s | %s | %.2f ± %.2f | %.1f MiB |\n", path.c_str(),
                      a.w8a8 ? " (w8a8)" : "", m.weight_bytes() / 1048576.0, n_params / 1e6, nt,
                      kernels::active_isa_name(), repacked.c_str(), dtype_name(type_k), dtype_name(type_v),
                      test.c_str(), mean, sd, rss / 1048576.0);
          std::fflush(stdout);
        }
        results.push_back({{"model_filename", path}, {"model_type", m.cfg.arch}, {"model_size", m.weight_bytes()},
                           {"model_n_params", n_params}, {"n_threads", nt}, {"n_prompt", t.n_prompt},
                           {"n_gen", t.n_gen}, {"n_depth", t.depth}, {"avg_ts", mean}, {"stddev_ts", sd}, {"samples_ts", ts},
                           {"cpu_info", kernels::active_isa_name()}, {"w8a8", a.w8a8}, {"peak_rss_bytes", rss},
                           {"repacked_bytes", m.panel_bytes},
                           {"type_k", dtype_name(type_k)}, {"type_v", dtype_name(type_v)}, {"copied_bytes", m.packed_bytes - m.panel_bytes}});
        if (cp.ffn) {
          const offload::Stats& f = cp.ffn->stats();
          const double nt_ = static_cast<double>(std::max<int64_t>(1, f.tokens));
          results.back()["ffn"] = {{"io_wait_ms_per_token", 1e3 * f.io_wait_s / nt_}, {"cache_ms_per_token", 1e3 * f.cache_s / nt_},
                                   {"compute_ms_per_token", 1e3 * f.compute_s / nt_}, {"bytes_per_token", f.bytes_read / nt_},
                                   {"needed_bytes_per_token", f.bytes_needed / nt_},
                                   {"reads_per_token", f.reads / nt_},
                                   {"prefetch_bytes_per_token", f.prefetch_bytes / nt_},
                                   {"prefetch_used_fraction", static_cast<double>(f.prefetch_used) / std::max<int64_t>(1, f.prefetched)},
                                   {"prefetch_wait_ms_per_token", 1e3 * f.prefetch_wait_s / nt_},
                                   {"active_fraction", static_cast<double>(f.active) / std::max<int64_t>(1, f.neurons)},
                                   {"hit_rate", static_cast<double>(f.hits) / std::max<int64_t>(1, f.hits + f.misses)},
                                   {"cache_bytes", cp.ffn->cache_bytes()}, {"resident_bytes", cp.ffn->resident_bytes()}};
        }
      }
    }
  }
  if (a.out_format == "json") std::printf("%s\n", results.dump(2).c_str());
  return 0;
}

}  // namespace larder::cli
