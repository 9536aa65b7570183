// Routing policies and the cost-model fit (policy.h). Everything here is a pure function of
// its arguments: the live conductor and the simulator get the same choices from the same view.
#include "conductor/policy.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>

namespace larder::conductor {

double CostModel::prefill_s(double new_tokens, double prefix) const {
  if (new_tokens <= 0) return 0;
  return a + b * new_tokens + c * new_tokens * (prefix + new_tokens / 2);
}

double CostModel::decode_step_s(double batch, double ctx_tokens) const {
  if (batch <= 0) return 0;
  return d0 + d1 * batch + d2 * ctx_tokens;
}

// --- CostFitter --------------------------------------------------------------------------

CostFitter::CostFitter(size_t window) : window_(std::max<size_t>(window, 1)) {}

namespace {

template <class V, class T>
void ring_push(V& v, size_t& next, size_t window, const T& x) {
  if (v.size() < window) {
    v.push_back(x);
  } else {
    v[next] = x;
    next = (next + 1) % window;
  }
}

bool usable(double x) { return std::isfinite(x) && x >= 0; }

using Row = std::array<double, 3>;

// Least squares on the columns in `cols` (a bitmask of 0..2) of the column-normalised Gram
// system G w = g. Returns false when that subsystem is (nearly) singular.
bool solve_subset(const double G[3][3], const double g[3], unsigned cols, double w[3]) {
  int idx[3], k = 0;
  for (int j = 0; j < 3; ++j)
    if (cols & (1u << j)) idx[k++] = j;
  double A[3][4];
  for (int r = 0; r < k; ++r) {
    for (int c = 0; c < k; ++c) A[r][c] = G[idx[r]][idx[c]];
    A[r][k] = g[idx[r]];
  }
  // Gaussian elimination with partial pivoting; columns have unit norm, so a pivot this small
  // means two features are (nearly) proportional over the samples.
  for (int c = 0; c < k; ++c) {
    int piv = c;
    for (int r = c + 1; r < k; ++r)
      if (std::fabs(A[r][c]) > std::fabs(A[piv][c])) piv = r;
    if (std::fabs(A[piv][c]) < 1e-9) return false;
    if (piv != c)
      for (int j = 0; j <= k; ++j) std::swap(A[c][j], A[piv][j]);
    for (int r = 0; r < k; ++r) {
      if (r == c) continue;
      const double f = A[r][c] / A[c][c];
      for (int j = c; j <= k; ++j) A[r][j] -= f * A[c][j];
    }
  }
  for (int j = 0; j < 3; ++j) w[j] = 0;
  for (int r = 0; r < k; ++r) w[idx[r]] = A[r][k] / A[r][r];
  return true;
}

// Fits y ~ X * coef with coef >= 0, minimising relative errors (timings span 10 ms to 10 s:
// absolute least squares would fit the longest ones only). Coefficients the samples cannot
// separate (features that are constant multiples of others over the window, e.g. one prompt
// length only) keep their prior value; `order` lists the subsets of free coefficients to
// try, preferred first.
Row nnls3(std::vector<Row> X, std::vector<double> y, const Row& prior, const std::vector<unsigned>& order) {
  if (X.empty()) return prior;
  double mean = 0;
  for (double v : y) mean += v / y.size();
  const double floor = std::max(1e-12, 0.01 * mean);
  for (size_t i = 0; i < X.size(); ++i) {
    const double w = 1.0 / std::max(y[i], floor);
    for (double& x : X[i]) x *= w;
    y[i] *= w;
  }
  // Column scales (RMS), so the singularity test does not depend on units.
  Row scale{0, 0, 0};
  for (const Row& x : X)
    for (int j = 0; j < 3; ++j) scale[j] += x[j] * x[j];
  for (int j = 0; j < 3; ++j) scale[j] = std::sqrt(scale[j]);
  for (unsigned free : order) {
    bool ok = true;
    for (int j = 0; j < 3; ++j)
      if ((free & (1u << j)) && !(scale[j] > 0)) ok = false;
    if (!ok) continue;
    // y' = y minus the fixed (prior) coefficients' part.
    double G[3][3] = {}, g[3] = {}, yy = 0;
    for (size_t i = 0; i < X.size(); ++i) {
      double r = y[i];
      for (int j = 0; j < 3; ++j)
        if (!(free & (1u << j))) r -= prior[j] * X[i][j];
      yy += r * r;
      for (int j = 0; j < 3; ++j) {
        if (!(free & (1u << j))) continue;
        const double zj = X[i][j] / scale[j];
        g[j] += zj * r;
        for (int l = 0; l < 3; ++l)
          if (free & (1u << l)) G[j][l] += zj * X[i][l] / scale[l];
      }
    }
    double w[3];
    if (!solve_subset(G, g, free, w)) continue;  // not identifiable: try a smaller set
    // Exact NNLS: the optimum is the unconstrained fit on its own support, so try every
    // support within `free` and keep the best feasible one (at most 7 solves).
    double best_rss = yy;  // the empty support: every free coefficient 0
    double best_w[3] = {0, 0, 0};
    for (unsigned s = free; s; s = (s - 1) & free) {
      double v[3];
      if (!solve_subset(G, g, s, v)) continue;
      bool feasible = true;
      for (int j = 0; j < 3; ++j)
        if ((s & (1u << j)) && v[j] < 0) feasible = false;
      if (!feasible) continue;
      // rss = yy - 2 v.g + v.G.v over the support.
      double rss = yy;
      for (int j = 0; j < 3; ++j) {
        rss -= 2 * v[j] * g[j];
        for (int l = 0; l < 3; ++l) rss += v[j] * G[j][l] * v[l];
      }
      if (rss < best_rss - 1e-18 * (1 + std::fabs(best_rss))) {
        best_rss = rss;
        for (int j = 0; j < 3; ++j) best_w[j] = v[j];
      }
    }
    Row out = prior;
    for (int j = 0; j < 3; ++j)
      if (free & (1u << j)) out[j] = best_w[j] / scale[j];
    return out;
  }
  return prior;
}

}  // namespace

void CostFitter::add_prefill(double new_tokens, double prefix, double seconds) {
  if (!(new_tokens > 0) || !usable(prefix) || !usable(seconds)) return;
  ring_push(pre_, pre_next_, window_, P{new_tokens, prefix, seconds});
}

void CostFitter::add_decode(double batch, double ctx_tokens, double seconds) {
  if (!(batch > 0) || !usable(ctx_tokens) || !usable(seconds)) return;
  ring_push(dec_, dec_next_, window_, D{batch, ctx_tokens, seconds});
}

size_t CostFitter::n_prefill() const { return pre_.size(); }
size_t CostFitter::n_decode() const { return dec_.size(); }

CostModel CostFitter::fit(const CostModel& prior) const {
  CostModel m = prior;
  // Bit j = coefficient j free. Prefill: a (per pass), b (per token), c (attention);
  // without enough spread the per-token and attention costs are fitted before the fixed one.
  static const std::vector<unsigned> kPrefillOrder = {7, 6, 3, 5, 2, 4, 1};
  // Decode: d0 (per step), d1 (per sequence), d2 (per KV token).
  static const std::vector<unsigned> kDecodeOrder = {7, 3, 6, 5, 2, 1, 4};
  if (!pre_.empty()) {
    std::vector<Row> X;
    std::vector<double> y;
    for (const P& s : pre_) {
      X.push_back({1.0, s.n, s.n * (s.p + s.n / 2)});
      y.push_back(s.s);
    }
    Row r = nnls3(X, y, {prior.a, prior.b, prior.c}, kPrefillOrder);
    m.a = r[0], m.b = r[1], m.c = r[2];
  }
  if (!dec_.empty()) {
    std::vector<Row> X;
    std::vector<double> y;
    for (const D& s : dec_) {
      X.push_back({1.0, s.b, s.c});
      y.push_back(s.s);
    }
    Row r = nnls3(X, y, {prior.d0, prior.d1, prior.d2}, kDecodeOrder);
    m.d0 = r[0], m.d1 = r[1], m.d2 = r[2];
  }
  return m;
}

// --- names -------------------------------------------------------------------------------

const char* policy_name(PolicyKind k) {
  switch (k) {
    case PolicyKind::Random: return "random";
    case PolicyKind::RoundRobin: return "round-robin";
    case PolicyKind::LeastLoad: return "least-load";
    case PolicyKind::CacheAware: return "cache-aware";
    case PolicyKind::Conductor: return "conductor";
  }
  return "?";
}

bool parse_policy(const std::string& s, PolicyKind* out) {
  for (PolicyKind k : {PolicyKind::Random, PolicyKind::RoundRobin, PolicyKind::LeastLoad, PolicyKind::CacheAware,
                       PolicyKind::Conductor})
    if (s == policy_name(k)) {
      *out = k;
      return true;
    }
  return false;
}

double ramp_weight(double age_s, double ramp_s) {
  if (!(ramp_s > 0)) return 1.0;
  if (!(age_s > 0)) return 0.1;
  return std::min(1.0, 0.1 + 0.9 * age_s / ramp_s);
}

void CountHistory::set(int64_t ms, int64_t value) {
  if (value == now_) return;
  if (!changes_.empty()) ms = std::max(ms, changes_.back().ms);  // the wall clock may step back
  changes_.push_back({ms, now_});
  now_ = value;
  size_t drop = 0;
  while (drop + 1 < changes_.size() && changes_[drop].ms < ms - keep_ms_) ++drop;
  if (drop > 0) changes_.erase(changes_.begin(), changes_.begin() + static_cast<std::ptrdiff_t>(drop));
}

int64_t CountHistory::at(int64_t ms) const {
  // The value before the first change after ms; none after it: the current one.
  auto it = std::upper_bound(changes_.begin(), changes_.end(), ms,
                             [](int64_t t, const Change& c) { return t < c.ms; });
  return it == changes_.end() ? now_ : it->before;
}

int64_t CountHistory::others(int64_t registered, int64_t registered_ms) const {
  return std::max<int64_t>(0, registered - at(registered_ms));
}

// --- predictions -------------------------------------------------------------------------

namespace {

int cacheable_blocks(const RequestView& r) {
  return r.block_size > 0 && r.n_prompt > 0 ? (r.n_prompt - 1) / r.block_size : 0;
}

int step_of(const InstanceView& i, double fallback) {
  return i.step_tokens > 0 ? i.step_tokens : std::max(1, static_cast<int>(std::ceil(fallback)));
}

// Extra time per step that the instance's running decode batch adds to a prompt chunk.
double decode_share_s(const InstanceView& i) {
  if (!i.can_decode || i.running <= 0) return 0;
  return i.cost.d1 * i.running + i.cost.d2 * static_cast<double>(i.decode_ctx_tokens);
}

}  // namespace

double predict_queue_s(const InstanceView& i) {
  const double Q = static_cast<double>(i.queued_prefill_tokens);
  if (!(Q > 0)) return std::max(0.0, i.slot_wait_s);
  const int step = step_of(i, Q);
  const double attn = i.queued_prefill_attn > 0 ? i.queued_prefill_attn : Q * Q / 2 / std::max(1, i.waiting + i.running);
  const double steps = std::ceil(Q / step);
  // Queued prompts compute while the slots are still taken; a new one also waits for a slot.
  return std::max(i.slot_wait_s, steps * (i.cost.a + decode_share_s(i)) + i.cost.b * Q + i.cost.c * attn);
}

double transfer_s(const PolicyParams& p, const RequestView& r, int blocks) {
  if (blocks <= 0) return 0;
  const double bw = p.transfer_bw > 0 ? p.transfer_bw : 1e9;
  return p.transfer_latency_s + static_cast<double>(blocks) * static_cast<double>(r.block_bytes) / bw;
}

bool tier_load_pays(const RequestView& r, const InstanceView& i, double load_bw, int block) {
  if (r.block_bytes <= 0) return true;
  if (!(load_bw > 0)) return false;
  const double bs = r.block_size;
  const double load = static_cast<double>(r.block_bytes) / load_bw;
  const double compute = i.cost.b * bs + i.cost.c * bs * (block * bs + bs / 2);
  return load < compute;
}

double predict_ttft(const PolicyParams& p, const RequestView& r, const InstanceView& i, int cached, int fetched,
                    int dram, int disk) {
  const int cap = cacheable_blocks(r);
  cached = std::clamp(cached, 0, cap);
  const double prefix = static_cast<double>(cached) * r.block_size;
  const double n_new = r.n_prompt - prefix;
  const int step = step_of(i, n_new);
  const double chunks = std::max(1.0, std::ceil(n_new / step));
  const double own = i.cost.prefill_s(n_new, prefix) + (chunks - 1) * i.cost.a + chunks * decode_share_s(i);
  const double queue = predict_queue_s(i);
  const double fetch = transfer_s(p, r, fetched);
  double tier = 0;
  if (r.block_bytes > 0) {
    if (dram > 0 && i.dram_load_bw > 0) tier += dram * static_cast<double>(r.block_bytes) / i.dram_load_bw;
    if (disk > 0 && i.disk_load_bw > 0) tier += disk * static_cast<double>(r.block_bytes) / i.disk_load_bw;
  }
  // A fetch starts when the request is routed and tier loads when it is admitted: both run
  // while earlier prompts compute, so the wait is the longest of the three.
  return std::max({queue, fetch, tier}) + own;
}

double predict_tbt(const RequestView& r, const InstanceView& i) {
  const double batch = i.running + 1;
  const double ctx = static_cast<double>(i.decode_ctx_tokens) + r.n_prompt + r.max_tokens / 2.0;
  double tbt = i.cost.decode_step_s(batch, ctx);
  // Prompts queued there now are not counted: chunked prefill takes prompts oldest first, so
  // they are computed before this request's own prompt and are done by its first token. What
  // slows its steps is prompts that arrive later, which their own routing weighs (and which no
  // one can know now). Counting the queue here made an instance with any queued prompt look
  // unable to meet a TBT SLO and turned away requests that then met it elsewhere.
  return tbt;
}

// --- routing -----------------------------------------------------------------------------

namespace {

uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
double unit(uint64_t x) { return static_cast<double>(mix64(x) >> 11) * 0x1.0p-53; }

bool live(const InstanceView& v) { return v.weight > 0 && std::isfinite(v.weight); }
double w_of(const InstanceView& v) { return std::min(1.0, v.weight); }

// Weighted random choice.
int pick_random(const std::vector<int>& c, const std::vector<InstanceView>& in, uint64_t rnd) {
  double total = 0;
  for (int i : c) total += w_of(in[i]);
  double x = unit(rnd) * total;
  for (int i : c) {
    x -= w_of(in[i]);
    if (x < 0) return i;
  }
  return c.back();
}

// Round robin; an instance ramping up (weight < 1) takes its turn with probability = weight.
int pick_rr(const std::vector<int>& c, const std::vector<InstanceView>& in, uint64_t rr, uint64_t rnd) {
  const size_t n = c.size();
  for (size_t t = 0; t < n; ++t) {
    const int i = c[(rr + t) % n];
    if (w_of(in[i]) >= 1.0 || unit(rnd + 0x51ED27ull * (t + 1)) < w_of(in[i])) return i;
  }
  int best = c[rr % n];
  for (int i : c)
    if (w_of(in[i]) > w_of(in[best])) best = i;
  return best;
}

double prefill_load(const RequestView& r, const InstanceView& v) {
  return static_cast<double>(v.queued_prefill_tokens + r.n_prompt) / w_of(v);
}
double decode_load(const InstanceView& v) {
  return (v.running + v.waiting + 1.0) / std::max(1, v.parallel) / w_of(v);
}

int pick_least_prefill(const std::vector<int>& c, const RequestView& r, const std::vector<InstanceView>& in) {
  int best = -1;
  for (int i : c) {
    if (best < 0) {
      best = i;
      continue;
    }
    const double a = prefill_load(r, in[i]), b = prefill_load(r, in[best]);
    if (a < b || (a == b && in[i].running + in[i].waiting < in[best].running + in[best].waiting)) best = i;
  }
  return best;
}

int pick_least_decode(const std::vector<int>& c, const std::vector<InstanceView>& in) {
  int best = -1;
  for (int i : c) {
    if (best < 0) {
      best = i;
      continue;
    }
    const double a = decode_load(in[i]), b = decode_load(in[best]);
    if (a < b || (a == b && in[i].decode_ctx_tokens < in[best].decode_ctx_tokens)) best = i;
  }
  return best;
}

int64_t blocks_for(const RequestView& r) {
  const int bs = std::max(1, r.block_size);
  return (static_cast<int64_t>(r.n_prompt) + r.max_tokens + bs - 1) / bs;
}

bool has_room(const RequestView& r, const InstanceView& v) {
  return v.running < v.parallel && v.free_blocks >= blocks_for(r);
}

// The conductor's prefill option on one instance: its own leading blocks (pool, then tiers
// where loading beats recomputing), optionally the holder's longer run fetched over the network.
// Candidates predicted within this share of the TTFT SLO count as meeting it (predictions err).
constexpr double kSloMargin = 0.7;

struct Option {
  double ttft = std::numeric_limits<double>::infinity();
  int cached = 0, fetched = 0, dram = 0, disk = 0, from = -1;
};

// Leading blocks instance i will not compute without a fetch: its pool's run, then its tiers'
// while loading beats recomputing (the engine's rule: the first block that does not pay ends it).
Option own_option(const RequestView& r, const InstanceView& v, const std::vector<Holding>& hold, int i, int cap) {
  const Holding h = static_cast<size_t>(i) < hold.size() ? hold[i] : Holding{};
  Option o;
  const int l1 = std::clamp(h.l1, 0, cap);
  o.dram = std::clamp(h.dram, 0, cap - l1);
  o.disk = std::clamp(h.disk, 0, cap - l1 - o.dram);
  if (o.dram > 0 && !tier_load_pays(r, v, v.dram_load_bw, l1)) o.dram = o.disk = 0;
  if (o.disk > 0 && !tier_load_pays(r, v, v.disk_load_bw, l1 + o.dram)) o.disk = 0;
  o.cached = l1 + o.dram + o.disk;
  return o;
}

Option best_option(const PolicyParams& p, const RequestView& r, const std::vector<InstanceView>& in,
                   const std::vector<Holding>& hold, int i, int top1, int top2, int cap, double extra_s) {
  const InstanceView& v = in[i];
  Option o = own_option(r, v, hold, i, cap);
  o.ttft = predict_ttft(p, r, v, o.cached, 0, o.dram, o.disk) + extra_s;
  const int holder = top1 == i ? top2 : top1;
  if (holder < 0) return o;
  const int run = std::min(hold[holder].total(), cap);
  const int fetched = run - o.cached;
  if (fetched < std::max(1, p.min_fetch_blocks)) return o;
  // Fetch when the transfer beats recomputing those blocks (TTFT with it is lower).
  const double t = predict_ttft(p, r, v, run, fetched, o.dram, o.disk) + extra_s;
  if (t < o.ttft) {
    o.ttft = t;
    o.fetched = fetched;
    o.cached = run;
    o.from = holder;
  }
  return o;
}

}  // namespace

Decision route(const PolicyParams& p, const RequestView& r, const std::vector<InstanceView>& in,
               const std::vector<Holding>& hold, uint64_t& rr, uint64_t rnd) {
  Decision d;
  const uint64_t turn = rr++;
  std::vector<int> pre, dec;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!live(in[i])) continue;
    if (in[i].can_prefill) pre.push_back(static_cast<int>(i));
    if (in[i].can_decode) dec.push_back(static_cast<int>(i));
  }
  if (pre.empty() || dec.empty()) {
    d.reason = pre.empty() ? "no instance can prefill (none with the role and a weight above 0)"
                           : "no instance can decode (none with the role and a weight above 0)";
    return d;
  }
  const int cap = cacheable_blocks(r);
  auto held = [&](int i) { return static_cast<size_t>(i) < hold.size() ? std::min(hold[i].total(), cap) : 0; };
  auto finish = [&](int prefill, int decode) {
    d.prefill = prefill;
    d.decode = in[prefill].can_decode ? prefill : decode;
    const Option o = own_option(r, in[prefill], hold, prefill, cap);
    d.cached_blocks = o.cached;
    d.predicted_ttft_s = predict_ttft(p, r, in[prefill], o.cached, 0, o.dram, o.disk) +
                         (d.decode != prefill ? p.transfer_latency_s : 0.0);
    d.predicted_tbt_s = predict_tbt(r, in[d.decode]);
    return d;
  };

  switch (p.kind) {
    case PolicyKind::Random:
      return finish(pick_random(pre, in, rnd), pick_random(dec, in, mix64(rnd ^ 0xDEC0DEull)));
    case PolicyKind::RoundRobin:
      return finish(pick_rr(pre, in, turn, rnd), pick_rr(dec, in, turn, mix64(rnd ^ 0xDEC0DEull)));
    case PolicyKind::LeastLoad:
      return finish(pick_least_prefill(pre, r, in), pick_least_decode(dec, in));
    case PolicyKind::CacheAware: {
      // Longest prefix held (pool or tiers), ties by load (SGLang's cache-aware router).
      int best = -1;
      for (int i : pre) {
        if (best < 0) {
          best = i;
          continue;
        }
        const int a = held(i), b = held(best);
        if (a > b || (a == b && prefill_load(r, in[i]) < prefill_load(r, in[best]))) best = i;
      }
      return finish(best, pick_least_decode(dec, in));
    }
    case PolicyKind::Conductor:
      break;
  }

  // Conductor. Holders: the two instances with the longest runs (a candidate never fetches
  // from itself, so the second is its holder when it is the first).
  int top1 = -1, top2 = -1;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!live(in[i]) || held(static_cast<int>(i)) <= 0) continue;
    const int ii = static_cast<int>(i);
    auto better = [&](int a, int b) {
      return b < 0 || held(a) > held(b) || (held(a) == held(b) && hold[a].l1 > hold[b].l1);
    };
    if (better(ii, top1)) {
      top2 = top1;
      top1 = ii;
    } else if (better(ii, top2)) {
      top2 = ii;
    }
  }
  // Decode for prefill-only candidates: the lowest predicted TBT among those with room.
  int dsel = -1;
  double dsel_tbt = 0, dsel_score = std::numeric_limits<double>::infinity();
  for (int j : dec) {
    if (!has_room(r, in[j])) continue;
    const double t = predict_tbt(r, in[j]);
    if (t / w_of(in[j]) < dsel_score) {
      dsel = j;
      dsel_tbt = t;
      dsel_score = t / w_of(in[j]);
    }
  }
  if (dsel < 0) {  // nobody has room: the least loaded queues it
    dsel = pick_least_decode(dec, in);
    dsel_tbt = predict_tbt(r, in[dsel]);
  }
  const bool tbt_slo = p.slo.tbt_s > 0, ttft_slo = p.slo.ttft_s > 0;
  int best = -1;
  Option bo, bo_any;
  double best_score = std::numeric_limits<double>::infinity(), any_score = best_score;
  double best_tbt = 0, any_tbt = 0;
  int fit = -1, fit_work = 0;
  double fit_score = 0, fit_tbt = 0;
  Option fo;
  for (int i : pre) {
    const bool colo = in[i].can_decode;
    // A P/D handoff adds the link's latency once the last layer is computed.
    const Option o = best_option(p, r, in, hold, i, top1, top2, cap, colo ? 0.0 : p.transfer_latency_s);
    const double tbt = colo ? predict_tbt(r, in[i]) : dsel_tbt;
    const double score = o.ttft / w_of(in[i]);
    if (score < any_score) {
      any_score = score;
      bo_any = o;
      any_tbt = tbt;
    }
    if (tbt_slo && tbt > p.slo.tbt_s) continue;
    if (score < best_score) {
      best_score = score;
      best = i;
      bo = o;
      best_tbt = tbt;
    }
    // With a TTFT SLO the objective is goodput: of the candidates that meet it with a margin,
    // the one that computes the fewest new tokens (the most reuse, the least work taken from
    // later requests); the fastest one only decides among equals. Spreading for the lowest TTFT
    // would trade cache locality for nothing the SLO rewards.
    if (ttft_slo && o.ttft <= kSloMargin * p.slo.ttft_s) {
      const int work = r.n_prompt - (o.cached - o.fetched) * r.block_size;
      if (fit < 0 || work < fit_work || (work == fit_work && score < fit_score)) {
        fit = i;
        fit_work = work;
        fit_score = score;
        fo = o;
        fit_tbt = tbt;
      }
    }
  }
  if (fit >= 0) {
    best = fit;
    bo = fo;
    best_tbt = fit_tbt;
  }
  char why[200];
  if (best < 0) {
    // Every candidate's decode batch is too slow: retry once about one request's worth of
    // tokens has been generated there (its batch turns over).
    d.reject = true;
    d.predicted_ttft_s = bo_any.ttft;
    d.predicted_tbt_s = any_tbt;
    d.retry_after_s = std::max(0.0, any_tbt * std::max(1, r.max_tokens));
    std::snprintf(why, sizeof why, "predicted time between tokens %.1f ms exceeds the SLO of %.1f ms on every instance",
                  1e3 * any_tbt, 1e3 * p.slo.tbt_s);
    d.reason = why;
    return d;
  }
  d.predicted_ttft_s = bo.ttft;
  d.predicted_tbt_s = best_tbt;
  if (ttft_slo && bo.ttft > p.slo.ttft_s) {
    // The queue drains one second per second: after (TTFT - SLO) the prediction meets the SLO.
    // A prompt too long to meet it even on an idle instance cannot be helped by waiting: it is
    // served, best effort, while some instance is idle (its blocks then serve the requests
    // that share its prefix), and otherwise asked to come back when one should be.
    const double queue = predict_queue_s(in[best]);
    const double over = bo.ttft - p.slo.ttft_s;
    const bool hopeless = over > queue;
    double idle_in = std::numeric_limits<double>::infinity();
    for (int i : pre) idle_in = std::min(idle_in, predict_queue_s(in[i]));
    if (!hopeless || idle_in > 0) {
      d.reject = true;
      d.retry_after_s = hopeless ? idle_in : over;
      std::snprintf(why, sizeof why, "predicted TTFT %.3f s exceeds the SLO of %.3f s%s", bo.ttft, p.slo.ttft_s,
                    hopeless ? " even on an idle instance, and none is idle" : "");
      d.reason = why;
      return d;
    }
  }
  d.prefill = best;
  d.decode = in[best].can_decode ? best : dsel;
  d.cached_blocks = bo.cached;
  if (bo.from >= 0) {
    d.fetch_from = bo.from;
    d.fetch_blocks = bo.cached;
    d.fetched_blocks = bo.fetched;
  }
  return d;
}

}  // namespace larder::conductor
