// larder bench --spec-prompts F --spec A,B,...: generation tokens/s with each drafter against
// plain decoding on real prompts, interleaved (each prompt and repetition runs every drafter in
// turn, so drift in machine speed hits all alike). --spec-replay: the cost side of recorded
// traces on another model (random weights of a bigger shape): passes of the recorded sizes.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "engine/context.h"
#include "engine/sampler.h"
#include "kernels/kernels.h"
#include "spec/spec.h"

namespace larder::cli {

namespace {

using Clock = std::chrono::steady_clock;

struct Prompt {
  std::string category;
  std::string text;
};

struct Cell {  // one (category, drafter)
  double tokens = 0, seconds = 0;
  int64_t passes = 0, drafted = 0, accepted = 0;
};

void print_table(const std::vector<std::string>& specs, const std::map<std::string, std::map<std::string, Cell>>& cells,
                 const char* what) {
  std::printf("\n| category | %s |", what);
  for (const auto& sp : specs)
    if (sp != "none") std::printf(" %s tok/s | %s mean accepted | %s speed-up |", sp.c_str(), sp.c_str(), sp.c_str());
  std::printf("\n| --- | ---: |");
  for (const auto& sp : specs)
    if (sp != "none") std::printf(" ---: | ---: | ---: |");
  std::printf("\n");
  std::map<std::string, double> sum_ratio;
  int n_cat = 0;
  for (const auto& [cat, row] : cells) {
    const Cell& base = row.at("none");
    const double b = base.tokens / std::max(base.seconds, 1e-9);
    std::printf("| %s | %.2f |", cat.c_str(), b);
    for (const auto& sp : specs) {
      if (sp == "none") continue;
      const Cell& c = row.at(sp);
      const double t = c.tokens / std::max(c.seconds, 1e-9);
      std::printf(" %.2f | %.2f | %.2fx |", t, c.passes ? static_cast<double>(c.accepted) / c.passes : 0.0, t / b);
      sum_ratio[sp] += t / b;
    }
    std::printf("\n");
    ++n_cat;
  }
  std::printf("| **mean over categories** | |");
  for (const auto& sp : specs)
    if (sp != "none") std::printf(" | | %.2fx |", sum_ratio[sp] / std::max(1, n_cat));
  std::printf("\n");
}

// The one model of a spec bench and a context on it.
struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Context> ctx;
};
Result<Loaded> load_one(const Args& a, const char* flag, int n_ctx) {
  auto models = split(a.bench_models);
  if (models.size() != 1) return make_error("%s takes one model (-m)", flag);
  Loaded l;
  LARDER_TRY(m, load_model(models[0], "", !a.no_repack));
  l.model = std::move(m);
  ContextParams cp;
  cp.n_threads = std::atoi(a.bench_threads.c_str());
  cp.n_ctx = n_ctx;
  cp.w8a8 = a.w8a8;
  LARDER_TRY(c, Context::create(*l.model, cp));
  l.ctx = std::move(c);
  return l;
}

}  // namespace

int bench_spec_replay(Args& a);

int bench_spec(Args& a) {
  if (!a.spec_replay.empty()) return bench_spec_replay(a);
  std::vector<Prompt> prompts;
  {
    std::ifstream f(a.spec_prompts);
    if (!f) return fail("cannot read " + a.spec_prompts);
    std::string line;
    int ln = 0;
    while (std::getline(f, line)) {
      ++ln;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
        return fail(a.spec_prompts + ":" + std::to_string(ln) + ": expected {\"category\": ..., \"prompt\": \"...\"}");
      prompts.push_back({j.value("category", std::string("all")), j["prompt"].get<std::string>()});
    }
  }
  if (prompts.empty()) return fail(a.spec_prompts + " has no prompts");
  std::vector<std::string> specs = split(a.spec.empty() ? "ngram" : a.spec);
  if (std::find(specs.begin(), specs.end(), "none") == specs.end()) specs.insert(specs.begin(), "none");
  const int n_gen = std::atoi(a.bench_gen.c_str());
  if (n_gen <= 0) return fail("-n must be positive");
  auto lr = load_one(a, "--spec-prompts", 4096);
  if (!lr.ok()) return fail(lr.error());
  const Model& m = *lr->model;
  Context& ctx = *lr->ctx;
  spec::DrafterOptions o;
  o.n_threads = ctx.n_threads();
  o.max_seq_len = ctx.n_ctx();
  std::map<std::string, std::unique_ptr<spec::Drafter>> model_drafters;  // loaded once
  std::map<std::string, std::map<std::string, Cell>> cells;
  nlohmann::json runs = nlohmann::json::array();
  SamplerParams sp;
  sp.temp = a.temp;
  sp.top_k = 0;
  sp.top_p = 1.0f;
  sp.min_p = 0;
  std::fprintf(stderr, "larder bench: %s, %d threads, isa %s, %zu prompts x %d reps, %d tokens, temp %.2f, spec-max %d%s\n",
               m.path.c_str(), ctx.n_threads(), kernels::active_isa_name(), prompts.size(), a.reps, n_gen, a.temp,
               a.spec_max, a.spec_tree ? ", tree" : "");
  for (size_t pi = 0; pi < prompts.size(); ++pi) {
    const Prompt& pr = prompts[pi];
    const auto toks = m.tokenizer->encode(pr.text, true, true);
    if (static_cast<int>(toks.size()) + n_gen + 64 > ctx.n_ctx()) return fail("prompt " + std::to_string(pi) + " is too long");
    for (int r = -1; r < a.reps; ++r) {  // r = -1: warm-up, not counted
      std::vector<int32_t> ref;
      for (const auto& name : specs) {
        std::unique_ptr<spec::Drafter> fresh;
        spec::Drafter* d = nullptr;
        if (name != "none") {
          const bool heavy = name.rfind("draft:", 0) == 0 || name.rfind("self:", 0) == 0;
          if (heavy && model_drafters.count(name)) {
            d = model_drafters[name].get();
          } else {
            auto dr = spec::make_drafter(name, m, o);
            if (!dr.ok()) return fail(dr.error());
            if (heavy) d = (model_drafters[name] = std::move(*dr)).get();
            else d = (fresh = std::move(*dr)).get();  // per run: no memory of other runs
          }
        }
        sp.seed = 1000 + pi * 17 + (r + 1);
        Sampler sampler(sp, m.cfg.n_vocab);
        spec::SpecParams spp;
        spp.max_tokens = a.spec_max;
        spp.tree = a.spec_tree;
        spp.adaptive = !a.spec_fixed;
        spec::Generator gen(ctx, sampler, d, spp);
        Status st = gen.start(toks);
        if (!st.ok()) return fail(st.error());
        const auto t0 = Clock::now();
        std::vector<int32_t> out;
        for (;;) {
          bool stop = false;
          for (int32_t t : gen.take()) {
            if (m.tokenizer->is_eog(t) || static_cast<int>(out.size()) >= n_gen) {
              stop = true;
              break;
            }
            out.push_back(t);
          }
          if (stop || static_cast<int>(out.size()) >= n_gen) break;
          if (!(st = gen.advance()).ok()) return fail(st.error());
        }
        const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
        gen.finish(true);
        if (sp.temp <= 0) {
          if (name == "none") ref = out;
          else if (out != ref)
            return fail("greedy output with --spec " + name + " differs from plain decoding on prompt " + std::to_string(pi));
        }
        if (r < 0) continue;
        Cell& c = cells[pr.category][name];
        c.tokens += out.size();
        c.seconds += secs;
        c.passes += gen.stats().steps + gen.stats().plain;
        c.drafted += gen.stats().proposed;
        c.accepted += gen.stats().accepted;
        nlohmann::json tr = nlohmann::json::array();
        for (auto [p, acc] : gen.stats().trace) tr.push_back({p, acc});
        runs.push_back({{"category", pr.category}, {"prompt", pi}, {"rep", r}, {"spec", name}, {"tokens", out.size()},
                        {"seconds", secs}, {"drafted", gen.stats().proposed}, {"accepted", gen.stats().accepted},
                        {"trace", name == "none" ? nlohmann::json::array() : tr}});
      }
    }
    std::fprintf(stderr, "larder bench: prompt %zu/%zu done\n", pi + 1, prompts.size());
  }
  // Mean accepted = draft tokens kept per pass (tokens per pass = 1 + that).
  if (a.out_format == "json") {
    std::printf("%s\n", nlohmann::json{{"model", m.path}, {"threads", ctx.n_threads()}, {"isa", kernels::active_isa_name()},
                                       {"temp", a.temp}, {"spec_max", a.spec_max}, {"tree", a.spec_tree}, {"runs", runs}}
                            .dump(1)
                            .c_str());
    return 0;
  }
  print_table(specs, cells, "plain tok/s");
  return 0;
}

// Replays recorded (draft nodes, accepted) passes on this model: each pass runs 1 + nodes rows
// (chain, arbitrary tokens) and advances the context by 1 + accepted; plain decoding runs one
// row per token over the same tokens. Only cost is measured; acceptance comes from the trace.
int bench_spec_replay(Args& a) {
  std::ifstream f(a.spec_replay);
  if (!f) return fail("cannot read " + a.spec_replay);
  auto j = nlohmann::json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.contains("runs")) return fail(a.spec_replay + ": not the JSON of bench --spec-prompts -o json");
  auto lr = load_one(a, "--spec-replay", 2048);
  if (!lr.ok()) return fail(lr.error());
  const Model& m = *lr->model;
  Context& ctx = *lr->ctx;
  std::mt19937 rng(7);
  std::vector<int32_t> prefix(256);
  for (auto& x : prefix) x = static_cast<int32_t>(rng() % m.cfg.n_vocab);
  std::vector<float> logits(static_cast<size_t>(65) * m.cfg.n_vocab);
  std::map<std::string, std::map<std::string, Cell>> cells;
  std::vector<std::string> specs = {"none"};
  auto run_passes = [&](const std::vector<std::pair<int, int>>& passes, double* secs) -> Status {
    ctx.reset();
    LARDER_CHECK_STATUS(ctx.decode(prefix));
    int n_kv = static_cast<int>(prefix.size());
    std::vector<int32_t> toks(65);
    const auto t0 = Clock::now();
    for (auto [nodes, acc] : passes) {
      const int rows = 1 + nodes;
      if (n_kv + rows >= ctx.n_ctx()) break;
      for (int i = 0; i < rows; ++i) toks[i] = static_cast<int32_t>(rng() % m.cfg.n_vocab);
      SeqBatch sb;
      sb.tokens = std::span<const int32_t>(toks).first(rows);
      sb.block_table = ctx.identity_table();
      sb.n_kv = n_kv;
      sb.all_logits = true;
      sb.logits = logits.data();
      LARDER_CHECK_STATUS(ctx.decode_batch(std::span<const SeqBatch>(&sb, 1)));
      n_kv += 1 + acc;
    }
    *secs = std::chrono::duration<double>(Clock::now() - t0).count();
    return Status::Ok();
  };
  // Per prompt: plain decoding of as many tokens as the longest trace produced, then each trace.
  std::map<int, std::vector<const nlohmann::json*>> by_prompt;
  for (const auto& run : j["runs"])
    if (run["spec"] != "none" && run.value("rep", 0) == 0) by_prompt[run["prompt"].get<int>()].push_back(&run);
  for (int r = -1; r < a.reps; ++r)
    for (const auto& [pi, runs] : by_prompt) {
      struct One {
        std::string name, cat;
        std::vector<std::pair<int, int>> passes;
        int64_t produced = 0, acc = 0;
      };
      std::vector<One> ones;
      int64_t longest = 0;
      for (const nlohmann::json* run : runs) {
        One o;
        o.name = (*run)["spec"].get<std::string>();
        o.cat = (*run)["category"].get<std::string>();
        if (std::find(specs.begin(), specs.end(), o.name) == specs.end()) specs.push_back(o.name);
        for (const auto& p : (*run)["trace"]) {
          const int nodes = std::min(64, p[0].get<int>()), acc = std::min(nodes, p[1].get<int>());
          o.passes.emplace_back(nodes, acc);
          o.produced += 1 + acc;
          o.acc += acc;
        }
        longest = std::max(longest, o.produced);
        ones.push_back(std::move(o));
      }
      std::vector<std::pair<int, int>> plain(longest, {0, 0});
      double tp = 0;
      Status st = run_passes(plain, &tp);
      if (!st.ok()) return fail(st.error());
      for (const One& o : ones) {
        double ts = 0;
        if (!(st = run_passes(o.passes, &ts)).ok()) return fail(st.error());
        if (r < 0) continue;
        Cell& base = cells[o.cat]["none"];  // plain time prorated to this trace's tokens
        base.tokens += o.produced;
        base.seconds += tp * o.produced / std::max<int64_t>(1, longest);
        Cell& c = cells[o.cat][o.name];
        c.tokens += o.produced;
        c.seconds += ts;
        c.passes += o.passes.size();
        c.accepted += o.acc;
      }
    }
  std::printf("replayed on %s (%s, %d threads, isa %s): acceptance from %s\n", m.path.c_str(), m.cfg.arch.c_str(),
              ctx.n_threads(), kernels::active_isa_name(), a.spec_replay.c_str());
  print_table(specs, cells, "plain tok/s");
  return 0;
}

}  // namespace larder::cli
