#include "spec/spec.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace larder::spec {

// ---- Verification ---------------------------------------------------------------------------

namespace {

// Draws from a distribution given as (id, p) pairs (not necessarily normalised).
int32_t draw(const std::vector<Sampler::TokenProb>& d, Sampler& s) {
  double total = 0;
  for (const auto& c : d) total += c.p;
  if (total <= 0) return d.empty() ? -1 : d.front().id;
  const double r = s.uniform() * total;
  double acc = 0;
  for (const auto& c : d) {
    acc += c.p;
    if (r < acc && c.p > 0) return c.id;
  }
  for (auto it = d.rbegin(); it != d.rend(); ++it)
    if (it->p > 0) return it->id;
  return d.front().id;
}

float prob_of(const std::vector<Sampler::TokenProb>& d, int32_t id) {
  for (const auto& c : d)
    if (c.id == id) return c.p;
  return 0.f;
}

}  // namespace

Verdict verify(const Draft& d, const float* logits, int V, Sampler& sampler, std::vector<int32_t>& history,
               Rule rule) {
  Verdict v;
  const size_t base = history.size();
  const bool with_q = !d.q.empty();
  LARDER_ASSERT(!with_q || (d.is_chain() && d.q.size() == static_cast<size_t>(d.size()) * V));
  std::vector<Sampler::TokenProb> p;
  std::vector<int> kids;
  int node = -1;  // current position: -1 = after the last real token
  for (;;) {
    const float* row = logits + static_cast<size_t>(node + 1) * V;
    kids.clear();
    for (int i = node + 1; i < d.size(); ++i)
      if (d.parent[i] == node) kids.push_back(i);
    if (sampler.greedy()) {
      const int32_t t = sampler.sample(row, history);
      int next = -1;
      for (int c : kids)
        if (d.tokens[c] == t) {
          next = c;
          break;
        }
      if (next < 0 || rule == Rule::AcceptAll) {
        if (rule == Rule::AcceptAll && !kids.empty()) next = kids[0];
        if (next < 0) {
          v.next = t;
          break;
        }
      }
      v.path.push_back(next);
      history.push_back(d.tokens[next]);
      node = next;
      continue;
    }
    sampler.distribution(row, history, &p);
    int next = -1;
    if (with_q && !kids.empty()) {
      // A chain drawn from q: accept x with min(1, p(x)/q(x)), else resample from norm(max(0, p - q)).
      const int c = kids[0];
      const int32_t x = d.tokens[c];
      const float* q = &d.q[static_cast<size_t>(c) * V];
      const float px = prob_of(p, x), qx = q[x];
      if (rule == Rule::AcceptAll || (qx > 0 && sampler.uniform() < std::min(1.0, static_cast<double>(px) / qx))) {
        next = c;
      } else {
        for (auto& e : p) e.p = std::max(0.f, e.p - q[e.id]);
        double rest = 0;
        for (const auto& e : p) rest += e.p;
        if (rest <= 0) sampler.distribution(row, history, &p);  // p == q: any draw from p is exact
      }
    } else {
      // Deterministic guesses (q one-hot): accept child x with p(x); on rejection p(x) = 0 and
      // the rest renormalised, then the next sibling is tried against that residual.
      for (int c : kids) {
        const int32_t x = d.tokens[c];
        double total = 0;
        for (const auto& e : p) total += e.p;
        const float px = total > 0 ? static_cast<float>(prob_of(p, x) / total) : 0.f;
        if (rule == Rule::AcceptAll || (px > 0 && sampler.uniform() < px)) {
          next = c;
          break;
        }
        for (auto& e : p)
          if (e.id == x) e.p = 0;
      }
    }
    if (next < 0) {
      v.next = draw(p, sampler);
      break;
    }
    v.path.push_back(next);
    history.push_back(d.tokens[next]);
    node = next;
  }
  history.resize(base);
  return v;
}

void verify_inputs(const Draft& d, int32_t last, int n_kv, std::vector<int32_t>* tokens, std::vector<int32_t>* positions,
                   AttnMask* mask) {
  const int n = d.size();
  tokens->assign(1, last);
  tokens->insert(tokens->end(), d.tokens.begin(), d.tokens.end());
  positions->assign(1, n_kv);
  mask->visible.assign(1 + n, {});
  mask->visible[0].push_back({0, n_kv + 1});
  std::vector<int> depth(n);
  for (int i = 0; i < n; ++i) {
    LARDER_ASSERT(d.parent[i] < i);
    depth[i] = d.parent[i] < 0 ? 1 : depth[d.parent[i]] + 1;
    positions->push_back(n_kv + depth[i]);
    // Ancestors (and the node itself) at entries n_kv + 1 + j, merged into ranges.
    std::vector<int> idx;
    for (int j = i; j >= 0; j = d.parent[j]) idx.push_back(n_kv + 1 + j);
    std::sort(idx.begin(), idx.end());
    auto& row = mask->visible[1 + i];
    row.push_back({0, n_kv + 1});
    for (int e : idx) {
      if (row.back().second == e)
        row.back().second = e + 1;
      else
        row.push_back({e, e + 1});
    }
  }
}

// ---- Prompt lookup --------------------------------------------------------------------------

namespace {

class NgramDrafter final : public Drafter {
 public:
  explicit NgramDrafter(const NgramParams& p) : p_(p) {}
  std::string name() const override { return "ngram"; }
  int start(std::span<const int32_t>) override { return 0; }
  void finish(int, std::span<const int32_t>, bool) override {}

  void propose(std::span<DraftJob> jobs) override {
    for (DraftJob& j : jobs) {
      j.out->clear();
      if (j.max_tokens > 0) one(j);
    }
  }

 private:
  void one(DraftJob& j) {
    const auto& c = j.context;
    const int N = static_cast<int>(c.size());
    const int width = j.tree ? std::max(1, p_.width) : 1;
    // Starts (index after a match) of the continuations, most recent first, distinct.
    std::vector<int> starts;
    for (int n = std::min(p_.max_n, N - 1); n >= p_.min_n && static_cast<int>(starts.size()) < width; --n) {
      const int32_t* tail = c.data() + N - n;
      for (int i = N - n - 1; i >= 0 && static_cast<int>(starts.size()) < width; --i) {
        if (c[i] != tail[0] || std::memcmp(c.data() + i, tail, n * sizeof(int32_t)) != 0) continue;
        const int s = i + n;
        if (s >= N) continue;
        if (std::find(starts.begin(), starts.end(), s) == starts.end()) starts.push_back(s);
      }
    }
    if (starts.empty()) return;
    Draft& d = *j.out;
    // First continuation gets most of the budget (most recent match), the others share the rest.
    for (size_t k = 0; k < starts.size() && d.size() < j.max_tokens; ++k) {
      const int budget = k == 0 ? (starts.size() == 1 ? j.max_tokens : std::max(1, j.max_tokens * 2 / 3))
                                : std::max(1, (j.max_tokens - d.size()) / static_cast<int>(starts.size() - k));
      int parent = -1, added = 0;
      for (int s = starts[k]; s < N && added < budget && d.size() < j.max_tokens; ++s, ++added) {
        int found = -1;
        for (int i = 0; i < d.size(); ++i)
          if (d.parent[i] == parent && d.tokens[i] == c[s]) found = i;
        if (found >= 0) {
          parent = found;  // shared prefix with an earlier continuation
          continue;
        }
        d.push(c[s], parent);
        parent = d.size() - 1;
      }
    }
    d.score = static_cast<float>(d.size()) * 0.5f;
  }
  NgramParams p_;
};

}  // namespace

std::unique_ptr<Drafter> make_ngram_drafter(const NgramParams& p) { return std::make_unique<NgramDrafter>(p); }

// ---- Length control, statistics -------------------------------------------------------------

void CostModel::prior(double t1, double tr, int r) {
  p1_ = t1;
  pr_ = tr;
  r_ = r;
  b_ = r > 1 ? std::max(1e-7, (tr - t1) / (r - 1)) : 1e-4;
  a_ = std::max(1e-6, t1 - b_);
}

void CostModel::observe(int rows, double seconds) {
  if (r_ == 0) {  // no start-up measurement: a prior from this pass, a row at 12% of a pass
    const double a = seconds / (1 + 0.12 * rows);
    prior(a * 1.12, a * (1 + 0.12 * 16), 16);
  }
  const double f = 0.99, x = rows, y = seconds;
  n_ = f * n_ + 1;
  x_ = f * x_ + x;
  y_ = f * y_ + y;
  xx_ = f * xx_ + x * x;
  xy_ = f * xy_ + x * y;
  const double w = r_ > 0 ? 5 : 0;  // weight of each prior point
  const double n = n_ + 2 * w, sx = x_ + w * (1 + r_), sy = y_ + w * (p1_ + pr_);
  const double sxx = xx_ + w * (1 + r_ * r_), sxy = xy_ + w * (p1_ + r_ * pr_);
  const double den = n * sxx - sx * sx;
  if (den <= 1e-12) return;
  const double b = (n * sxy - sx * sy) / den, a = (sy - b * sx) / n;
  if (b > 0 && a > 0) {
    a_ = a;
    b_ = b;
  }
}

int best_length(double rate, double a, double b, int kmax, double draft_s) {
  double best = 1.0 / (a + b), tokens = 1, term = 1;
  int k_best = 0;
  for (int k = 1; k <= kmax; ++k) {
    term *= rate;
    tokens += term;
    const double v = tokens / (a + b * (k + 1) + draft_s * k);
    if (v > best * 1.05) {  // a margin: noise in rate and cost should not make drafting a loss
      best = v;
      k_best = k;
    }
  }
  return k_best;
}

int LengthControl::next(const CostModel& cost, double draft_s) {
  const int k = best_length(rate(), cost.a(), cost.b(), max_, draft_s);
  probing_ = false;
  if (k > 0) {
    idle_ = 0;
    return k;
  }
  // Probes are rare where a guess costs the drafter a good part of a pass (a draft model catches up
  // on everything since its last guess): every 8 passes, else every 64.
  if (++idle_ < (draft_s > 0.1 * (cost.a() + cost.b()) ? 64 : 8)) return 0;
  idle_ = 0;
  probing_ = true;
  return 1;  // a probe: acceptance may have changed (a copy-heavy stretch began)
}

void LengthControl::observe(int depth, int accepted) {
  if (depth <= 0) return;
  kept_ = 0.85 * kept_ + accepted;
  lost_ = 0.85 * lost_ + (accepted < depth ? 1 : 0);
}

void SpecStats::add(int prop, int acc) {
  trace.emplace_back(prop, acc);
  if (prop <= 0) {
    ++plain;
    return;
  }
  ++steps;
  proposed += prop;
  accepted += acc;
  if (accept_hist.size() <= static_cast<size_t>(acc)) accept_hist.resize(acc + 1, 0);
  accept_hist[acc]++;
}

int max_depth(const Draft& d) {
  int m = 0;
  for (int i = 0; i < d.size(); ++i) m = std::max(m, d.depth(i));
  return m;
}

// ---- Generator ------------------------------------------------------------------------------

Generator::Generator(Context& ctx, Sampler& sampler, Drafter* drafter, const SpecParams& p)
    : ctx_(ctx), sampler_(sampler), drafter_(drafter), p_(p), len_(std::max(1, p.max_tokens)) {}

Generator::~Generator() {
  if (!finished_) finish(false);
}

void Generator::finish(bool completed) {
  if (finished_) return;
  finished_ = true;
  if (drafter_ && handle_ >= 0)
    drafter_->finish(handle_, std::span<const int32_t>(history_).subspan(n_prompt_), completed);
}

Status Generator::start(std::span<const int32_t> prompt) {
  if (prompt.empty()) return make_error("the prompt is empty");
  const int V = ctx_.n_vocab();
  history_.assign(prompt.begin(), prompt.end());
  n_prompt_ = static_cast<int>(prompt.size());
  ctx_.reset();
  LARDER_CHECK_STATUS(ctx_.decode(prompt));
  n_kv_ = n_prompt_;
  logits_.assign(static_cast<size_t>(V), 0.f);
  history_.push_back(sampler_.sample(ctx_.logits(), history_));
  if (drafter_) {
    handle_ = drafter_->start(prompt);
  }
  return Status::Ok();
}

std::vector<int32_t> Generator::take() {
  std::vector<int32_t> out(history_.begin() + n_prompt_ + taken_, history_.end());
  taken_ += out.size();
  return out;
}

Status Generator::advance() {
  const int V = ctx_.n_vocab();
  const int room = ctx_.n_ctx() - n_kv_ - 1;  // entries left after the pending token
  if (room < 0) return make_error("context is full (%d tokens)", ctx_.n_ctx());
  Draft d;
  if (drafter_) {
    int k = p_.adaptive ? len_.next(cost_, drafter_->seconds_per_token()) : p_.max_tokens;
    k = std::min({k, room, ctx_.n_batch() - 1});
    if (k > 0) {
      DraftJob j;
      j.handle = handle_;
      j.context = history_;
      j.max_tokens = k;
      j.tree = p_.tree;
      j.sampling = &sampler_.params();
      j.out = &d;
      drafter_->propose(std::span<DraftJob>(&j, 1));
      if (d.size() > k) {  // a drafter over budget is cut to it (parents come first)
        d.tokens.resize(k);
        d.parent.resize(k);
        if (!d.q.empty()) d.q.resize(static_cast<size_t>(k) * V);
      }
    }
  }
  std::vector<int32_t> toks, pos;
  AttnMask mask;
  verify_inputs(d, history_.back(), n_kv_, &toks, &pos, &mask);
  logits_.resize(toks.size() * static_cast<size_t>(V));
  SeqBatch sb;
  sb.tokens = toks;
  sb.positions = pos;
  sb.block_table = ctx_.identity_table();
  sb.n_kv = n_kv_;
  sb.mask = d.is_chain() ? nullptr : &mask;
  sb.all_logits = true;
  sb.logits = logits_.data();
  const auto t0 = std::chrono::steady_clock::now();
  LARDER_CHECK_STATUS(ctx_.decode_batch(std::span<const SeqBatch>(&sb, 1)));
  cost_.observe(static_cast<int>(toks.size()),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  std::vector<int32_t> hist(history_);
  Verdict v = verify(d, logits_.data(), V, sampler_, hist);
  // The pending token's KV is in; the accepted nodes' KV moves to consecutive entries.
  int at = n_kv_ + 1;
  for (int node : v.path) {
    ctx_.move_kv(ctx_.identity_table(), n_kv_ + 1 + node, at++);
    history_.push_back(d.tokens[node]);
  }
  n_kv_ = at;
  history_.push_back(v.next);
  const int acc = static_cast<int>(v.path.size());
  if (!d.empty()) len_.observe(max_depth(d), acc);
  stats_.add(d.size(), acc);
  return Status::Ok();
}

}  // namespace larder::spec
