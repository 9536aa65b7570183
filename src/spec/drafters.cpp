// Model drafters (a smaller model, or the target with layers skipped), suffix decoding's wrapper,
// and the factory that parses --spec.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "spec/spec.h"
#include "spec/suffix.h"

namespace larder::spec {

namespace {

// ---- A draft model --------------------------------------------------------------------------
//
// One Context holds every drafted sequence's KV (blocks handed out from a free list, as far as
// each sequence has got). Each propose() first brings a sequence's draft KV up to its context
// (longest common prefix kept: rejected guesses roll back for free), then runs the draft passes
// of all jobs together, one token per job per pass.
class ModelDrafter final : public Drafter {
 public:
  // owned: the draft model the context runs on (the context only refers to it).
  ModelDrafter(std::unique_ptr<Model> owned, std::unique_ptr<Context> ctx, std::string name)
      : owned_(std::move(owned)), ctx_(std::move(ctx)), name_(std::move(name)) {
    for (int b = ctx_->n_blocks() - 1; b >= 0; --b) free_.push_back(b);
  }
  std::string name() const override { return name_; }
  bool samples() const override { return true; }
  double seconds_per_token() const override { return per_token_s_; }

  int start(std::span<const int32_t>) override {
    for (size_t i = 0; i < reqs_.size(); ++i)
      if (!reqs_[i].live) {
        reqs_[i] = Req{};
        reqs_[i].live = true;
        return static_cast<int>(i);
      }
    reqs_.emplace_back();
    reqs_.back().live = true;
    return static_cast<int>(reqs_.size() - 1);
  }

  void finish(int h, std::span<const int32_t>, bool) override {
    if (h < 0 || h >= static_cast<int>(reqs_.size())) return;
    Req& r = reqs_[h];
    for (int32_t b : r.table) free_.push_back(b);
    r = Req{};
  }

  void propose(std::span<DraftJob> jobs) override {
    const auto t_start = std::chrono::steady_clock::now();
    int drafted = 0;
    propose_(jobs);
    for (const DraftJob& j : jobs) drafted += j.out->size();
    if (drafted > 0) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count() / drafted;
      per_token_s_ = per_token_s_ > 0 ? 0.8 * per_token_s_ + 0.2 * s : s;
    }
  }

 private:
  void propose_(std::span<DraftJob> jobs) {
    const int V = ctx_->n_vocab();
    const int bs = ctx_->block_size();
    struct Act {
      DraftJob* job;
      Req* r;
      std::span<const int32_t> ctx;  // the context from the request's window offset
      std::vector<int32_t> hist;   // context + drafted so far (penalties)
      std::vector<float> logits;   // [V] after the last fed token
      bool sampling;
      bool done = false;
      int chain = -1;              // the chain node the next guess follows
    };
    std::vector<Act> act;
    for (DraftJob& j : jobs) {
      j.out->clear();
      if (j.max_tokens <= 0 || j.handle < 0 || j.handle >= static_cast<int>(reqs_.size()) || j.context.empty()) continue;
      Req& r = reqs_[j.handle];
      // A draft model sees at most the last kWindow tokens it did not see before: its first call does
      // not prefill a long prompt (the guesses mostly depend on the recent text).
      if (r.kv.empty()) r.offset = std::max<int>(0, static_cast<int>(j.context.size()) - kWindow);
      if (r.offset >= static_cast<int>(j.context.size())) r.offset = 0;
      const std::span<const int32_t> ctx = j.context.subspan(r.offset);
      const int need = static_cast<int>(ctx.size()) + j.max_tokens;
      if (need > ctx_->n_ctx()) continue;
      while (static_cast<int>(r.table.size()) * bs < need && !free_.empty()) {
        r.table.push_back(free_.back());
        free_.pop_back();
      }
      if (static_cast<int>(r.table.size()) * bs < need) continue;  // the draft pool is full: no draft this time
      // Keep the longest common prefix of what the draft KV holds and the context.
      size_t keep = 0;
      while (keep < r.kv.size() && keep < ctx.size() && r.kv[keep] == ctx[keep]) ++keep;
      if (keep >= ctx.size()) keep = ctx.size() - 1;  // the last token's logits are needed
      r.kv.resize(keep);
      Act a{&j, &r, ctx, std::vector<int32_t>(j.context.begin(), j.context.end()), std::vector<float>(V),
            j.sampling && j.sampling->temp > 0 && !j.tree};
      act.push_back(std::move(a));
    }
    if (act.empty()) return;
    // Catch-up: every job's unfed context, chunked by the batch size.
    {
      std::vector<size_t> fed(act.size());
      for (size_t i = 0; i < act.size(); ++i) fed[i] = act[i].r->kv.size();
      for (;;) {
        std::vector<SeqBatch> batch;
        std::vector<size_t> who;
        std::vector<int> n_take;
        int budget = ctx_->n_batch();
        for (size_t i = 0; i < act.size() && budget > 0; ++i) {
          const int left = static_cast<int>(act[i].ctx.size() - fed[i]);
          if (left <= 0) continue;
          const int k = std::min(left, budget);
          budget -= k;
          SeqBatch sb;
          sb.tokens = act[i].ctx.subspan(fed[i], k);
          sb.block_table = act[i].r->table;
          sb.n_kv = static_cast<int>(fed[i]);
          sb.logits = k == left ? act[i].logits.data() : nullptr;
          batch.push_back(sb);
          who.push_back(i);
          n_take.push_back(k);
        }
        if (batch.empty()) break;
        if (!ctx_->decode_batch(batch).ok()) return;  // drafting is best effort: no draft
        for (size_t b = 0; b < who.size(); ++b) {
          Act& a = act[who[b]];
          a.r->kv.insert(a.r->kv.end(), a.ctx.begin() + fed[who[b]], a.ctx.begin() + fed[who[b]] + n_take[b]);
          fed[who[b]] += n_take[b];
        }
      }
    }
    std::vector<Sampler::TokenProb> dist;
    for (int depth = 0;; ++depth) {
      // Choose each job's next guess from its logits; then one pass for those that go on.
      std::vector<SeqBatch> batch;
      std::vector<int32_t> feed(act.size());
      std::vector<size_t> who;
      for (size_t i = 0; i < act.size(); ++i) {
        Act& a = act[i];
        if (a.done) continue;
        Draft& d = *a.job->out;
        Sampler& s = sampler_for(*a.r, a.job->sampling, V);
        s.distribution(a.logits.data(), a.hist, &dist);
        int32_t x;
        float px;
        if (a.sampling) {
          const double u = s.uniform();
          double acc = 0;
          x = dist.back().id;
          for (const auto& c : dist)
            if (u < (acc += c.p)) {
              x = c.id;
              break;
            }
          px = 0;
          for (const auto& c : dist)
            if (c.id == x) px = c.p;
          const size_t row = d.q.size();
          d.q.resize(row + V, 0.f);
          for (const auto& c : dist) d.q[row + c.id] = c.p;
        } else {
          // Greedy guesses: the draft's argmax (under the request's penalties); a tree adds the
          // runner-up as a sibling leaf (no extra draft pass).
          if (dist.size() == 1) {  // a greedy request: rank the raw logits for the runner-up
            x = dist[0].id;
            px = top_prob(a.logits.data(), V, x);
          } else {
            const auto best = std::max_element(dist.begin(), dist.end(), [](const auto& u, const auto& v) { return u.p < v.p; });
            x = best->id;
            px = best->p;
          }
        }
        const int parent = a.chain;
        d.push(x, parent);
        a.chain = d.size() - 1;
        if (a.job->tree && !a.sampling && d.size() < a.job->max_tokens) {
          const int32_t y = runner_up(a.logits.data(), V, x);
          if (y >= 0) d.push(y, parent);
        }
        a.hist.push_back(x);
        d.score += px;
        // Stop when the budget is spent or the draft itself is unsure (a guess it would likely lose).
        if (d.size() >= a.job->max_tokens || (!a.sampling && px < kMinConfidence)) {
          a.done = true;
          continue;
        }
        feed[i] = x;
        SeqBatch sb;
        sb.tokens = std::span<const int32_t>(&feed[i], 1);
        sb.block_table = a.r->table;
        sb.n_kv = static_cast<int>(a.r->kv.size());
        sb.logits = a.logits.data();
        batch.push_back(sb);
        who.push_back(i);
      }
      if (batch.empty()) break;
      if (!ctx_->decode_batch(batch).ok()) break;
      for (size_t i : who) act[i].r->kv.push_back(feed[i]);
    }
  }

 private:
  static constexpr float kMinConfidence = 0.3f;
  static constexpr int kWindow = 128;
  double per_token_s_ = 0;
  struct Req {
    bool live = false;
    int offset = 0;              // context tokens before the draft's window
    std::vector<int32_t> table;  // draft pool blocks
    std::vector<int32_t> kv;     // tokens whose draft KV is in the blocks
    std::unique_ptr<Sampler> sampler;
  };
  Sampler& sampler_for(Req& r, const SamplerParams* p, int V) {
    // A request's sampler settings are fixed for its life: one sampler, its own random stream.
    if (!r.sampler) {
      SamplerParams sp = p ? *p : SamplerParams{};
      if (!p) sp.temp = 0;
      if (sp.seed != 0xFFFFFFFFu) sp.seed ^= 0x5DEECE66Dull;
      r.sampler = std::make_unique<Sampler>(sp, V);
    }
    return *r.sampler;
  }
  static float top_prob(const float* lg, int V, int32_t x) {
    float mx = lg[x];
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v] - mx));
    return static_cast<float>(1.0 / sum);
  }
  static int32_t runner_up(const float* lg, int V, int32_t best) {
    int32_t r = -1;
    for (int v = 0; v < V; ++v)
      if (v != best && (r < 0 || lg[v] > lg[r])) r = v;
    return r;
  }
  std::unique_ptr<Model> owned_;
  std::unique_ptr<Context> ctx_;
  std::string name_;
  std::vector<Req> reqs_;
  std::vector<int32_t> free_;
};

// ---- Suffix decoding ------------------------------------------------------------------------

class SuffixWrap final : public Drafter {
 public:
  explicit SuffixWrap(const SuffixParams& p) : d_(p) {}
  std::string name() const override { return "suffix"; }
  int start(std::span<const int32_t> prompt) override {
    const int h = d_.start(prompt);
    if (static_cast<int>(known_.size()) <= h) known_.resize(h + 1, 0);
    known_[h] = prompt.size();
    return h;
  }
  void propose(std::span<DraftJob> jobs) override {
    for (DraftJob& j : jobs) {
      j.out->clear();
      if (j.max_tokens <= 0 || j.handle < 0 || j.handle >= static_cast<int>(known_.size())) continue;
      if (j.context.size() > known_[j.handle]) {
        d_.extend(j.handle, j.context.subspan(known_[j.handle]));
        known_[j.handle] = j.context.size();
      }
      *j.out = d_.propose(j.handle, j.context, j.max_tokens, !j.tree);
    }
  }
  void finish(int h, std::span<const int32_t> output, bool completed) override {
    if (completed)
      d_.finish(h, output);
    else
      d_.cancel(h);
  }

 private:
  SuffixDrafter d_;
  std::vector<size_t> known_;  // per handle: context tokens already in its local tree
};

// A view of the target with some layers left out: shares every tensor, copies nothing.
std::unique_ptr<Model> layer_view(const Model& t, const std::vector<int>& keep) {
  auto m = std::make_unique<Model>();
  m->cfg = t.cfg;
  m->format = t.format;
  m->path = t.path;
  m->tok_embd = t.tok_embd;
  m->output_norm = t.output_norm;
  m->output = t.output;
  m->gguf = t.gguf;
  m->keepalive = t.keepalive;
  m->cfg.n_layer = static_cast<int>(keep.size());
  m->cfg.swa_layers.clear();
  for (int l : keep) {
    m->layers.push_back(t.layers[l]);
    if (!t.cfg.swa_layers.empty()) m->cfg.swa_layers.push_back(t.cfg.swa_layers[l]);
  }
  return m;
}

Result<std::unique_ptr<Drafter>> model_drafter(std::unique_ptr<Model> owned, const DrafterOptions& o,
                                               std::string name) {
  ContextParams cp;
  cp.n_threads = o.n_threads;
  cp.max_seq_len = o.max_seq_len + 64;
  cp.n_ctx = std::max(1, o.parallel) * (o.max_seq_len + 64);
  cp.n_batch = 256;
  auto c = Context::create(*owned, cp);
  if (!c.ok()) return make_error("draft model: %s", c.error().c_str());
  return std::unique_ptr<Drafter>(new ModelDrafter(std::move(owned), std::move(*c), std::move(name)));
}

}  // namespace

Result<std::unique_ptr<Drafter>> make_drafter(const std::string& spec, const Model& target, const DrafterOptions& o) {
  const std::string forms = "ngram[:N], suffix, draft:FILE, self:skip=A-B[,C-D...] or self:keep=K";
  auto bad = [&](const std::string& why) -> Result<std::unique_ptr<Drafter>> {
    return make_error("--spec %s: %s (valid: %s)", spec.c_str(), why.c_str(), forms.c_str());
  };
  if (spec == "ngram" || spec.rfind("ngram:", 0) == 0) {
    NgramParams p;
    if (spec.size() > 6) {
      p.max_n = std::atoi(spec.c_str() + 6);
      if (p.max_n < 1 || p.max_n > 16) return bad("N must be 1..16");
    }
    return make_ngram_drafter(p);
  }
  if (spec == "suffix") return std::unique_ptr<Drafter>(new SuffixWrap(SuffixParams{}));
  if (spec.rfind("draft:", 0) == 0) {
    auto m = load_model(spec.substr(6));
    if (!m.ok()) return bad(m.error());
    if ((*m)->cfg.n_vocab != target.cfg.n_vocab)
      return bad("the draft model's vocabulary (" + std::to_string((*m)->cfg.n_vocab) + " tokens) is not the target's (" +
                 std::to_string(target.cfg.n_vocab) + ")");
    if ((*m)->tokenizer && target.tokenizer)
      for (int id : {0, 1, 2, 100, target.cfg.n_vocab / 2, target.cfg.n_vocab - 1})
        if ((*m)->tokenizer->vocab().tokens[id] != target.tokenizer->vocab().tokens[id])
          return bad("the draft model's token " + std::to_string(id) + " differs from the target's");
    return model_drafter(std::move(*m), o, "draft");
  }
  if (spec.rfind("self:", 0) == 0) {
    const std::string a = spec.substr(5);
    const int L = target.cfg.n_layer;
    std::vector<char> skip(L, 0);
    if (a.rfind("keep=", 0) == 0) {
      const int k = std::atoi(a.c_str() + 5);
      if (k < 1 || k >= L) return bad("K must be 1.." + std::to_string(L - 1));
      for (int l = k; l < L; ++l) skip[l] = 1;
    } else if (a.rfind("skip=", 0) == 0) {
      size_t i = 5;
      while (i < a.size()) {
        char* end = nullptr;
        const long lo = std::strtol(a.c_str() + i, &end, 10);
        long hi = lo;
        if (end == a.c_str() + i) return bad("expected a layer number");
        i = end - a.c_str();
        if (i < a.size() && a[i] == '-') {
          hi = std::strtol(a.c_str() + i + 1, &end, 10);
          i = end - a.c_str();
        }
        if (lo < 0 || hi >= L || lo > hi) return bad("layers must be within 0.." + std::to_string(L - 1));
        for (long l = lo; l <= hi; ++l) skip[l] = 1;
        if (i < a.size() && a[i] != ',') return bad("expected ',' between ranges");
        if (i < a.size()) ++i;
      }
    } else {
      return bad("unknown self-draft");
    }
    std::vector<int> keep;
    for (int l = 0; l < L; ++l)
      if (!skip[l]) keep.push_back(l);
    if (keep.empty() || static_cast<int>(keep.size()) == L) return bad("it must keep some layers and skip some");
    auto view = layer_view(target, keep);
    return model_drafter(std::move(view), o, "self");
  }
  return bad("unknown drafter");
}

}  // namespace larder::spec
