// The cluster simulator (sim.h): one event loop, instances as plain state, the conductor's
// policy deciding every arrival.
#include "sim/sim.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <list>
#include <queue>
#include <unordered_map>

namespace larder::sim {

std::vector<SimRequest> requests_from_trace(const std::vector<TraceReq>& trace, const std::vector<Planned>& plans,
                                            int K, double speed, int block_size) {
  std::vector<SimRequest> out(trace.size());
  const double t0 = trace.empty() ? 0 : trace.front().ts_ms;
  for (size_t i = 0; i < trace.size(); ++i) {
    out[i].arrival_s = (trace[i].ts_ms - t0) / 1e3 / speed;
    out[i].n_prompt = plans[i].prompt_len;
    out[i].max_tokens = plans[i].max_tokens;
    out[i].blocks = block_names(trace[i], plans[i], K, block_size);
  }
  return out;
}

namespace {

using conductor::Decision;
using conductor::Holding;
using conductor::InstanceView;
using conductor::RequestView;

constexpr double kInf = std::numeric_limits<double>::infinity();

// A bounded LRU set of block names (the DRAM and SSD tiers).
class LruSet {
 public:
  explicit LruSet(int64_t cap = 0) : cap_(cap) {}
  bool on() const { return cap_ > 0; }
  bool has(uint64_t k) const { return map_.count(k) != 0; }
  void put(uint64_t k) {
    if (!on()) return;
    auto it = map_.find(k);
    if (it != map_.end()) {
      list_.splice(list_.end(), list_, it->second);
      return;
    }
    list_.push_back(k);
    map_[k] = std::prev(list_.end());
    if (static_cast<int64_t>(map_.size()) > cap_) {
      map_.erase(list_.front());
      list_.pop_front();
    }
  }
  void erase(uint64_t k) {
    auto it = map_.find(k);
    if (it == map_.end()) return;
    list_.erase(it->second);
    map_.erase(it);
  }

 private:
  int64_t cap_;
  std::list<uint64_t> list_;
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> map_;
};

// Colo: computes and decodes on one instance. Prefill: a P/D prompt job (ends with a handoff).
// Decode: a P/D request at its decode instance, before admission decides local or handoff.
enum class Kind { Colo, Prefill, Decode };

struct Seq {
  int req = -1, inst = -1;
  Kind kind = Kind::Colo;
  int tokens = 0;      // tokens of the sequence (prompt + generated)
  int n_computed = 0;  // of them, with KV in the pool
  int generated = 0, max_tokens = 1;
  uint64_t order = 0;  // admission order on its instance: chunks by age, the youngest preempted
  uint32_t epoch = 0;  // bumped on preemption: a step in flight then leaves it alone
  bool running = false, remote = false, done = false, hits_counted = false;
  double ready_at = 0;         // tier loads / fetch arrive then
  std::vector<uint64_t> refs;  // named blocks it pins
  int64_t anon = 0;            // blocks it holds without a name
  int next_name = 0;           // next prompt block to name once computed
  int expect_cached = 0;       // blocks the policy expected cached (the queue view)
  int fetch_end = 0;           // blocks [.., fetch_end) may come from the fetch
  double fetch_done = 0;
  int peer = -1;               // Decode <-> its Prefill job
  int prefill_inst = -1;       // Decode: where its prompt goes
  double compute_start = -1;   // Prefill: first step with a chunk of it
  int decode_cached = 0;       // Prefill: blocks decode already held (not sent)
};

struct Blk {
  int refs = 0;
  std::list<uint64_t>::iterator lru;
};

struct Inst {
  bool can_prefill = true, can_decode = true;
  std::deque<int> waiting;
  std::vector<int> running;
  std::unordered_map<uint64_t, Blk> named;
  std::list<uint64_t> lru;  // unreferenced named blocks, oldest first
  int64_t used = 0;         // blocks referenced by sequences
  LruSet dram, disk;
  bool busy = false;
  double wake_at = kInf;
  struct Item {
    int seq, k;
    uint32_t epoch;
  };
  std::vector<Item> batch;
  uint64_t admissions = 0;
  int inflight_n = 0;  // P/D prompts routed here whose decode side has not handed them over yet
  int64_t inflight_tokens = 0;
  double inflight_attn = 0;
  InstanceReport rep;
};

enum EvType { kArrival, kStepDone, kWake, kHandoff };
struct Ev {
  double t;
  uint64_t n;
  int type, a;
};
struct EvLater {
  bool operator()(const Ev& x, const Ev& y) const { return x.t > y.t || (x.t == y.t && x.n > y.n); }
};

struct ReqState {
  double first_tok = -1, last_tok = -1, started = -1, predicted_ttft = 0;
  int generated = 0;
};

class Sim {
 public:
  Sim(const SimConfig& c, const std::vector<SimRequest>& r) : c_(c), cal_(c.calib), reqs_(r), st_(r.size()) {}
  Result<SimReport> run();

 private:
  void push(double t, EvType type, int a) { events_.push(Ev{t, next_ev_++, type, a}); }
  int bs() const { return cal_.block_size; }
  int64_t blocks_of(int tokens) const { return (tokens + bs() - 1) / bs(); }
  RequestView request_view(const SimRequest& r) const {
    RequestView v;
    v.n_prompt = r.n_prompt;
    v.max_tokens = r.max_tokens;
    v.block_size = bs();
    v.block_bytes = cal_.block_bytes;
    v.key = r.blocks.empty() ? 0 : r.blocks[0];
    return v;
  }
  InstanceView cost_view() const {
    InstanceView v;
    v.cost = cal_.cost;
    v.step_tokens = cal_.step_tokens;
    v.dram_load_bw = cal_.dram_load_bw;
    v.disk_load_bw = cal_.disk_load_bw;
    return v;
  }

  // Pool.
  void make_room(Inst& in, int64_t n);
  void pin(Inst& in, Seq& s, uint64_t k);
  void release(Inst& in, Seq& s);
  void name_block(Inst& in, Seq& s, uint64_t k);
  void name_computed(Inst& in, Seq& s);

  void arrival(int r, double now);
  void build_views(const SimRequest& r, std::vector<InstanceView>& views, std::vector<Holding>& holds);
  void try_start(int i, double now);
  void admit(int i, double now);
  bool admit_one(int i, int sid, double now);  // false: the head waits
  void step_done(int i, double now);
  void emit(int i, int sid, double now);
  void prefill_done(int sid, double now);
  void handoff(int job, double now);
  void finish(int i, int sid, double now);
  void fail(int sid, const std::string& why, double now);
  // The P/D prompt routed to its prefill instance is no longer on the way there.
  void settle_inflight(const Seq& s) {
    Inst& p = inst_[s.prefill_inst];
    const int prefix = std::min(s.expect_cached * bs(), s.tokens - 1);
    p.inflight_n--;
    p.inflight_tokens -= s.tokens - prefix;
    p.inflight_attn -= (s.tokens - prefix) * (prefix + (s.tokens - prefix) / 2.0);
  }
  void drop_running(Inst& in, int sid) {
    in.running.erase(std::find(in.running.begin(), in.running.end(), sid));
    seqs_[sid].running = false;
  }

  const SimConfig& c_;
  const Calibration& cal_;
  const std::vector<SimRequest>& reqs_;
  std::vector<ReqState> st_;
  std::vector<Inst> inst_;
  std::vector<Seq> seqs_;
  std::priority_queue<Ev, std::vector<Ev>, EvLater> events_;
  uint64_t next_ev_ = 0, rr_ = 0, rng_ = 0;
  conductor::PolicyParams pp_;
  SimReport rep_;
  double waiting_sum_ = 0;
  int64_t waiting_n_ = 0;
};

// --- the pool ----------------------------------------------------------------------------

void Sim::make_room(Inst& in, int64_t n) {
  while (cal_.kv_blocks - in.used - static_cast<int64_t>(in.lru.size()) < n && !in.lru.empty()) {
    const uint64_t k = in.lru.front();
    in.lru.pop_front();
    in.named.erase(k);
    in.dram.put(k);  // L1 evictions go to DRAM
    rep_.evictions++;
  }
}

void Sim::pin(Inst& in, Seq& s, uint64_t k) {
  Blk& b = in.named.at(k);
  if (b.refs++ == 0) {
    in.lru.erase(b.lru);
    in.used++;
  }
  s.refs.push_back(k);
}

void Sim::release(Inst& in, Seq& s) {
  // Tail first, as the engine: the LRU evicts a prefix's later blocks before its earlier ones.
  for (auto r = s.refs.rbegin(); r != s.refs.rend(); ++r) {
    const uint64_t k = *r;
    Blk& b = in.named.at(k);
    if (--b.refs == 0) {
      in.lru.push_back(k);
      b.lru = std::prev(in.lru.end());
      in.used--;
    }
  }
  s.refs.clear();
  in.used -= s.anon;
  s.anon = 0;
}

// One of the sequence's anonymous blocks now holds block `k`: it takes the name, or, when
// another copy is named already, the sequence shares that one and frees its own.
void Sim::name_block(Inst& in, Seq& s, uint64_t k) {
  if (s.anon <= 0) return;
  auto [it, fresh] = in.named.try_emplace(k);
  if (fresh) {
    it->second.refs = 1;
    s.refs.push_back(k);
    in.disk.put(k);  // every completed block is written to SSD
  } else {
    pin(in, s, k);
    in.used--;
  }
  s.anon--;
}

void Sim::name_computed(Inst& in, Seq& s) {
  const auto& names = reqs_[s.req].blocks;
  const int n_full = std::min(static_cast<int>(names.size()), reqs_[s.req].n_prompt / bs());
  while (s.next_name < n_full && (s.next_name + 1) * bs() <= s.n_computed) name_block(in, s, names[s.next_name++]);
}

// --- arrivals and the conductor's view ---------------------------------------------------

void Sim::build_views(const SimRequest& r, std::vector<InstanceView>& views, std::vector<Holding>& holds) {
  const int cap = std::min(static_cast<int>(r.blocks.size()), std::max(0, (r.n_prompt - 1) / bs()));
  for (size_t i = 0; i < inst_.size(); ++i) {
    const Inst& in = inst_[i];
    InstanceView v = cost_view();
    v.id = std::to_string(i);
    v.can_prefill = in.can_prefill;
    v.can_decode = in.can_decode;
    v.parallel = cal_.parallel;
    v.running = static_cast<int>(in.running.size());
    v.waiting = static_cast<int>(in.waiting.size()) + in.inflight_n;
    v.total_blocks = cal_.kv_blocks;
    v.free_blocks = cal_.kv_blocks - in.used;  // free or evictable
    int64_t q = in.inflight_tokens, ctx = 0;
    double attn = in.inflight_attn;
    for (int sid : in.running) {
      const Seq& s = seqs_[sid];
      if (s.remote) continue;
      const int pend = s.tokens - s.n_computed;
      if (s.generated > 0 && pend <= 1) {
        ctx += s.tokens;
      } else if (pend > 0) {
        q += pend;
        attn += pend * (s.n_computed + pend / 2.0);
      }
    }
    for (int sid : in.waiting) {
      const Seq& s = seqs_[sid];
      if (s.kind == Kind::Decode) continue;  // its prompt is counted where it will be computed
      const int prefix = std::min(s.expect_cached * bs(), s.tokens - 1);
      const int pend = s.tokens - prefix;
      q += pend;
      attn += pend * (prefix + pend / 2.0);
    }
    v.queued_prefill_tokens = q;
    v.queued_prefill_attn = attn;
    v.decode_ctx_tokens = ctx;
    views[i] = std::move(v);
    // Holding: the pool's leading run, then blocks the tiers hold (DRAM before any SSD one).
    Holding h;
    int j = 0;
    while (j < cap && in.named.count(r.blocks[j])) ++j, ++h.l1;
    for (; j < cap; ++j) {
      if (in.dram.has(r.blocks[j]) && h.disk == 0) ++h.dram;
      else if (in.disk.has(r.blocks[j]) || in.dram.has(r.blocks[j])) ++h.disk;
      else break;
    }
    holds[i] = h;
  }
}

void Sim::arrival(int r, double now) {
  const SimRequest& req = reqs_[r];
  std::vector<InstanceView> views(inst_.size());
  std::vector<Holding> holds(inst_.size());
  build_views(req, views, holds);
  int64_t waiting = 0;
  for (const auto& in : inst_) waiting += static_cast<int64_t>(in.waiting.size());
  waiting_sum_ += static_cast<double>(waiting) / inst_.size();
  waiting_n_++;
  const RequestView rv = request_view(req);
  const Decision d = conductor::route(pp_, rv, views, holds, rr_, splitmix64(rng_));
  st_[r].predicted_ttft = d.predicted_ttft_s;
  if (d.reject) {
    rep_.rejected++;
    rep_.retry_after_s.push_back(d.retry_after_s);
    return;
  }
  if (d.prefill < 0 || d.decode < 0) {
    rep_.failed++;
    if (rep_.first_failure.empty()) rep_.first_failure = "routing: " + d.reason;
    return;
  }
  Seq s;
  s.req = r;
  s.tokens = req.n_prompt;
  s.max_tokens = std::max(1, req.max_tokens);
  s.expect_cached = d.cached_blocks;
  if (d.fetch_from >= 0 && d.fetched_blocks > 0) {
    s.fetch_end = d.fetch_blocks;
    s.fetch_done = now + conductor::transfer_s(pp_, rv, d.fetched_blocks);
    rep_.fetches++;
    rep_.fetched_blocks += d.fetched_blocks;
  }
  const int sid = static_cast<int>(seqs_.size());
  if (d.decode == d.prefill) {
    s.kind = Kind::Colo;
    s.inst = d.prefill;
  } else {
    s.kind = Kind::Decode;
    s.inst = d.decode;
    s.prefill_inst = d.prefill;
    Inst& p = inst_[d.prefill];
    const int prefix = std::min(d.cached_blocks * bs(), req.n_prompt - 1);
    p.inflight_n++;
    p.inflight_tokens += req.n_prompt - prefix;
    p.inflight_attn += (req.n_prompt - prefix) * (prefix + (req.n_prompt - prefix) / 2.0);
  }
  seqs_.push_back(std::move(s));
  inst_[seqs_[sid].inst].waiting.push_back(sid);
  try_start(seqs_[sid].inst, now);
}

// --- admission ---------------------------------------------------------------------------

void Sim::admit(int i, double now) {
  Inst& in = inst_[i];
  while (!in.waiting.empty() && static_cast<int>(in.running.size()) < cal_.parallel) {
    const int sid = in.waiting.front();
    if (!admit_one(i, sid, now)) break;
  }
}

bool Sim::admit_one(int i, int sid, double now) {
  Inst& in = inst_[i];
  Seq& s = seqs_[sid];
  const SimRequest& req = reqs_[s.req];
  const auto& names = req.blocks;
  const int cap = std::min(static_cast<int>(names.size()), std::max(0, (s.tokens - 1) / bs()));
  // The pool's leading run.
  int l1 = 0, reused_lru = 0;
  while (l1 < cap) {
    auto it = in.named.find(names[l1]);
    if (it == in.named.end()) break;
    reused_lru += it->second.refs == 0;
    ++l1;
  }
  // A P/D request computes its prompt here only when little of it is missing.
  const bool decode_side = s.kind == Kind::Decode;
  const bool local = !decode_side || s.tokens - l1 * bs() <= c_.local_prefill_tokens;
  // Then the tiers while a load beats recomputing, then the fetch the policy ordered.
  int dram = 0, disk = 0, fetched = 0;
  if (local) {
    const RequestView rv = request_view(req);
    const InstanceView cv = cost_view();
    const int fetch_end = decode_side ? 0 : s.fetch_end;
    bool tiers = true;
    for (int j = l1; j < cap; ++j) {
      const uint64_t k = names[j];
      if (tiers && in.dram.has(k) && conductor::tier_load_pays(rv, cv, cal_.dram_load_bw, j)) {
        ++dram;
      } else if (tiers && in.disk.has(k) && conductor::tier_load_pays(rv, cv, cal_.disk_load_bw, j)) {
        ++disk;
      } else if (j < fetch_end) {
        tiers = false;
        ++fetched;
      } else {
        break;
      }
    }
  }
  const int cached = l1 + dram + disk + fetched;
  const int64_t need = blocks_of(s.tokens) - l1;
  if (need > cal_.kv_blocks - in.used - reused_lru) {
    if (!in.running.empty()) return false;  // wait for running sequences to free blocks
    in.waiting.pop_front();
    if (decode_side) settle_inflight(s);
    fail(sid, "the KV pool (" + std::to_string(cal_.kv_blocks) + " blocks) is too small for a " +
                  std::to_string(s.tokens) + "-token prompt", now);
    return true;
  }
  in.waiting.pop_front();
  for (int j = 0; j < l1; ++j) pin(in, s, names[j]);
  make_room(in, need);
  in.used += need;
  s.anon += need;
  for (int j = l1; j < cached; ++j) {
    if (j < l1 + dram) in.dram.erase(names[j]);  // exclusive: the block moves up
    name_block(in, s, names[j]);
  }
  s.n_computed = cached * bs();
  s.next_name = cached;
  s.order = ++in.admissions;
  s.running = true;
  in.running.push_back(sid);
  const double tier_s =
      cal_.block_bytes > 0 ? (dram * static_cast<double>(cal_.block_bytes) / cal_.dram_load_bw +
                              disk * static_cast<double>(cal_.block_bytes) / cal_.disk_load_bw)
                           : 0.0;
  s.ready_at = now + tier_s;
  if (fetched > 0) s.ready_at = std::max(s.ready_at, s.fetch_done);
  if (decode_side) {
    settle_inflight(s);
    if (local) {
      s.kind = Kind::Colo;
      rep_.local_prefills++;
    } else {
      // Hand the prompt to the prefill instance; this sequence waits for its KV.
      s.remote = true;
      s.hits_counted = true;  // the prefill job counts them
      Seq job;
      job.req = s.req;
      job.kind = Kind::Prefill;
      job.inst = s.prefill_inst;
      job.tokens = req.n_prompt;
      job.max_tokens = 1;
      job.expect_cached = s.expect_cached;
      job.fetch_end = s.fetch_end;
      job.fetch_done = s.fetch_done;
      job.peer = sid;
      job.decode_cached = l1;
      const int jid = static_cast<int>(seqs_.size());
      seqs_[sid].peer = jid;
      seqs_.push_back(std::move(job));  // `s` is not used past this point
      inst_[seqs_[jid].inst].waiting.push_back(jid);
      rep_.handoffs++;
      try_start(seqs_[jid].inst, now);
      return true;
    }
  }
  Seq& t = seqs_[sid];
  if (!t.hits_counted) {  // the instance that computes the prompt counts its hits, once
    t.hits_counted = true;
    rep_.prompt_tokens += req.n_prompt;
    rep_.hit_tokens += cached * bs();
    rep_.hit_l1 += l1 * bs();
    rep_.hit_dram += dram * bs();
    rep_.hit_disk += disk * bs();
    rep_.hit_fetched += fetched * bs();
    in.rep.prompts++;
    in.rep.prompt_tokens += req.n_prompt;
    in.rep.hit_tokens += cached * bs();
  }
  return true;
}

// --- steps -------------------------------------------------------------------------------

void Sim::try_start(int i, double now) {
  Inst& in = inst_[i];
  if (in.busy) return;
  admit(i, now);
  std::vector<int> order;
  double next_ready = kInf;
  for (int sid : in.running) {
    const Seq& s = seqs_[sid];
    if (s.remote || s.tokens <= s.n_computed) continue;
    if (s.ready_at > now) {
      next_ready = std::min(next_ready, s.ready_at);
      continue;
    }
    order.push_back(sid);
  }
  if (order.empty()) {
    if (next_ready < in.wake_at) {
      in.wake_at = next_ready;
      push(next_ready, kWake, i);
    }
    return;
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const bool da = seqs_[a].tokens - seqs_[a].n_computed == 1, db = seqs_[b].tokens - seqs_[b].n_computed == 1;
    if (da != db) return da;
    return seqs_[a].order < seqs_[b].order;
  });
  const conductor::CostModel& m = cal_.cost;
  int budget = cal_.step_tokens;
  int n_dec = 0, chunks = 0;
  double ctx = 0, work = 0;
  in.batch.clear();
  for (int sid : order) {
    if (budget <= 0) break;
    Seq& s = seqs_[sid];
    const int pend = s.tokens - s.n_computed;
    const int k = std::min(pend, budget);
    budget -= k;
    in.batch.push_back({sid, k, s.epoch});
    if (st_[s.req].started < 0) st_[s.req].started = now;  // its prompt's first step: the queue ends
    if (pend == 1) {
      n_dec++;
      ctx += s.tokens;
    } else {
      chunks++;
      work += m.b * k + m.c * k * (s.n_computed + k / 2.0);
      if (s.compute_start < 0) s.compute_start = now;
    }
  }
  const double fixed = std::max(chunks ? m.a : 0.0, n_dec ? m.d0 : 0.0);
  const double dt = fixed + m.d1 * n_dec + m.d2 * ctx + work;
  in.busy = true;
  in.rep.busy_s += dt;
  rep_.steps++;
  push(now + dt, kStepDone, i);
}

void Sim::step_done(int i, double now) {
  Inst& in = inst_[i];
  in.busy = false;
  const std::vector<Inst::Item> batch = std::move(in.batch);
  in.batch.clear();
  for (const auto& it : batch) {
    Seq& s = seqs_[it.seq];
    if (s.epoch != it.epoch || s.done || !s.running) continue;  // preempted during this step
    s.n_computed += it.k;
    name_computed(in, s);
    if (s.n_computed < s.tokens) continue;  // still prefilling
    if (s.kind == Kind::Prefill) prefill_done(it.seq, now);
    else emit(i, it.seq, now);
  }
  try_start(i, now);
}

// A sampled token: reported, then room made for it (preempting the youngest when the pool is full).
void Sim::emit(int i, int sid, double now) {
  Inst& in = inst_[i];
  {
    Seq& s = seqs_[sid];
    ReqState& rs = st_[s.req];
    s.generated++;
    rs.generated = s.generated;
    if (rs.first_tok < 0) rs.first_tok = now;
    rs.last_tok = now;
    if (s.generated >= s.max_tokens || (cal_.max_seq_len > 0 && s.tokens + 1 >= cal_.max_seq_len)) {
      finish(i, sid, now);
      return;
    }
    s.tokens++;
  }
  for (;;) {
    Seq& s = seqs_[sid];
    if (blocks_of(s.tokens) <= static_cast<int64_t>(s.refs.size()) + s.anon) return;
    if (cal_.kv_blocks - in.used > 0) {
      make_room(in, 1);
      in.used++;
      s.anon++;
      return;
    }
    int victim = -1;
    for (int r : in.running) {
      const Seq& v = seqs_[r];
      if (r == sid || v.remote || v.kind == Kind::Prefill || v.done) continue;
      if (victim < 0 || v.order > seqs_[victim].order) victim = r;
    }
    if (victim < 0) {
      drop_running(in, sid);
      release(in, s);
      fail(sid, "out of KV cache blocks", now);
      return;
    }
    Seq& v = seqs_[victim];
    drop_running(in, victim);
    release(in, v);
    v.n_computed = 0;
    v.next_name = 0;
    v.epoch++;
    v.ready_at = 0;
    in.waiting.push_front(victim);
    rep_.preemptions++;
  }
}

void Sim::finish(int i, int sid, double now) {
  Inst& in = inst_[i];
  Seq& s = seqs_[sid];
  drop_running(in, sid);
  release(in, s);
  s.done = true;
  in.rep.decoded++;
  const ReqState& rs = st_[s.req];
  const SimRequest& req = reqs_[s.req];
  const double ttft = rs.first_tok - req.arrival_s;
  rep_.completed++;
  rep_.ttft_s.push_back(ttft);
  rep_.ttft_error_s.push_back(ttft - rs.predicted_ttft);
  rep_.queue_s.push_back(std::max(0.0, rs.started - req.arrival_s));
  double tbt = -1;
  if (rs.generated >= 2) {
    tbt = (rs.last_tok - rs.first_tok) / (rs.generated - 1);
    rep_.tbt_s.push_back(tbt);
  }
  const bool ttft_ok = !(c_.slo.ttft_s > 0) || ttft <= c_.slo.ttft_s;
  const bool tbt_ok = !(c_.slo.tbt_s > 0) || tbt <= c_.slo.tbt_s;
  if (ttft_ok && tbt_ok) rep_.good++;
}

void Sim::fail(int sid, const std::string& why, double now) {
  Seq& s = seqs_[sid];
  s.done = true;
  rep_.failed++;
  if (rep_.first_failure.empty()) rep_.first_failure = why;
  if (s.kind == Kind::Prefill && s.peer >= 0) {
    // Its decode side, waiting with blocks reserved, goes with it.
    Seq& d = seqs_[s.peer];
    if (d.running) {
      drop_running(inst_[d.inst], s.peer);
      release(inst_[d.inst], d);
      push(now, kWake, d.inst);
    }
    d.done = true;
  }
}

// --- P/D handoff -------------------------------------------------------------------------

void Sim::prefill_done(int sid, double now) {
  Seq& job = seqs_[sid];
  Inst& p = inst_[job.inst];
  drop_running(p, sid);  // its slot is free; its blocks stay until the KV is across
  const int64_t blocks = std::max<int64_t>(0, blocks_of(job.tokens) - job.decode_cached);
  rep_.handoff_blocks += blocks;
  const double bytes = static_cast<double>(blocks) * static_cast<double>(cal_.block_bytes);
  const double start = job.compute_start >= 0 ? job.compute_start : now;
  push(std::max(now, start + bytes / cal_.transfer_bw) + cal_.transfer_latency_s, kHandoff, sid);
  p.rep.decoded++;
}

void Sim::handoff(int jid, double now) {
  const int pi = seqs_[jid].inst;
  release(inst_[pi], seqs_[jid]);
  seqs_[jid].done = true;
  const int did = seqs_[jid].peer;
  Seq& d = seqs_[did];
  const int di = d.inst;
  if (!d.done && d.running) {
    d.remote = false;
    d.kind = Kind::Colo;  // from here on an ordinary decoding sequence
    d.n_computed = d.tokens;
    name_computed(inst_[di], d);
    emit(di, did, now);
  }
  try_start(pi, now);
  try_start(di, now);
}

// --- the loop ----------------------------------------------------------------------------

Result<SimReport> Sim::run() {
  const int n = c_.n_both + c_.n_prefill + c_.n_decode;
  if (n <= 0) return Error{"simulate: no instances"};
  if (c_.n_both > 0 && (c_.n_prefill > 0 || c_.n_decode > 0)) return Error{"simulate: colocated or P/D, not both"};
  if ((c_.n_prefill > 0) != (c_.n_decode > 0)) return Error{"simulate: P/D needs prefill and decode instances"};
  if (cal_.block_size <= 0 || cal_.kv_blocks <= 0 || cal_.step_tokens <= 0 || cal_.parallel <= 0)
    return Error{"simulate: the calibration needs positive block_size, kv_blocks, step_tokens and parallel"};
  if (!(cal_.transfer_bw > 0) || !(cal_.dram_load_bw > 0) || !(cal_.disk_load_bw > 0))
    return Error{"simulate: bandwidths must be positive"};
  for (size_t r = 1; r < reqs_.size(); ++r)
    if (reqs_[r].arrival_s < reqs_[r - 1].arrival_s) return Error{"simulate: requests must be sorted by arrival"};
  for (const SimRequest& r : reqs_)
    if (r.n_prompt < 1 || static_cast<int64_t>(r.blocks.size()) > r.n_prompt / cal_.block_size)
      return Error{"simulate: a request needs a prompt and at most one name per full block"};
  pp_.kind = c_.policy;
  pp_.slo = c_.slo;
  pp_.transfer_bw = cal_.transfer_bw;
  pp_.transfer_latency_s = cal_.transfer_latency_s;
  pp_.min_fetch_blocks = c_.min_fetch_blocks;
  rng_ = c_.seed;
  inst_.resize(n);
  for (int i = 0; i < n; ++i) {
    Inst& in = inst_[i];
    in.dram = LruSet(cal_.dram_blocks);
    in.disk = LruSet(cal_.disk_blocks);
    if (c_.n_both > 0) {
      in.rep.role = "both";
    } else {
      const bool pre = i < c_.n_prefill;
      in.can_prefill = pre;
      in.can_decode = !pre;
      in.rep.role = pre ? "prefill" : "decode";
    }
  }
  seqs_.reserve(reqs_.size() * 2);
  for (size_t r = 0; r < reqs_.size(); ++r) push(reqs_[r].arrival_s, kArrival, static_cast<int>(r));
  double now = 0;
  while (!events_.empty()) {
    const Ev e = events_.top();
    events_.pop();
    now = e.t;
    rep_.events++;
    switch (e.type) {
      case kArrival: arrival(e.a, now); break;
      case kStepDone: step_done(e.a, now); break;
      case kWake:
        if (e.t >= inst_[e.a].wake_at) inst_[e.a].wake_at = kInf;
        try_start(e.a, now);
        break;
      case kHandoff: handoff(e.a, now); break;
    }
  }
  rep_.requests = static_cast<int64_t>(reqs_.size());
  const int64_t lost = rep_.requests - rep_.completed - rep_.rejected - rep_.failed;
  if (lost != 0) return Error{"simulate: internal error: " + std::to_string(lost) + " requests neither completed nor failed"};
  rep_.makespan_s = now;
  rep_.trace_s = reqs_.empty() ? 0 : reqs_.back().arrival_s - reqs_.front().arrival_s;
  const double span = rep_.trace_s > 0 ? rep_.trace_s : rep_.makespan_s;
  rep_.goodput_rps = span > 0 ? rep_.good / span : 0;
  rep_.mean_waiting = waiting_n_ ? waiting_sum_ / waiting_n_ : 0;
  for (const Inst& in : inst_) rep_.instances.push_back(in.rep);
  return std::move(rep_);
}

}  // namespace

Result<SimReport> simulate(const SimConfig& cfg, const std::vector<SimRequest>& requests) {
  Sim s(cfg, requests);
  return s.run();
}

}  // namespace larder::sim
