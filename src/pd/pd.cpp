#include "pd/pd.h"

#include <httplib.h>

#include "http/http.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "engine/context.h"
#include "pd/handoff.h"
#include "transfer/transfer.h"

namespace larder::pd {

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

std::string random_hex(int n) {
  static thread_local std::mt19937_64 rng(std::random_device{}() ^ static_cast<uint64_t>(now_s() * 1e9));
  static const char* d = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s += d[rng() % 16];
  return s;
}

void reply(http::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(j.dump(), "application/json");
}

void reply_error(http::Response& res, int status, const std::string& msg, const std::string& code) {
  json e = {{"error", {{"message", msg}, {"type", status >= 500 ? "server_error" : "invalid_request_error"},
                       {"code", code}}}};
  reply(res, status, e);
}

json sampling_json(const SamplerParams& s) {
  return {{"temp", s.temp},
          {"top_k", s.top_k},
          {"top_p", s.top_p},
          {"min_p", s.min_p},
          {"repeat_penalty", s.repeat_penalty},
          {"repeat_last_n", s.repeat_last_n},
          {"freq_penalty", s.freq_penalty},
          {"presence_penalty", s.presence_penalty},
          {"seed", s.seed}};
}

}  // namespace

std::string layout_fingerprint(Scheduler& s) {
  const auto v = s.kv_pool();
  const auto& c = s.model().cfg;
  char buf[256];
  std::snprintf(buf, sizeof buf, ";layers=%d;kv_dim=%d;block=%d;k=%s;v=%s;k_row=%zu;v_row=%zu", c.n_layer,
                c.n_head_kv * c.head_dim, v.block_size, dtype_name(s.params().type_k), dtype_name(s.params().type_v),
                v.k_row, v.v_row);
  return s.blocks_identity() + buf;
}

struct DecodeHandoff;
struct PrefillHandoff;

struct PdNode::Impl {
  PdNode* node = nullptr;
  Scheduler* sched = nullptr;
  PdParams p;
  std::string layout;
  std::unique_ptr<transfer::Engine> engine;
  Context::PoolView pool;
  int k_region = -1, v_region = -1;
  std::string k_desc, v_desc;
  std::string address;  // transfer address peers connect to (advertised host, bound port)

  mutable std::mutex mu;
  PdStats st;
  std::unordered_map<std::string, std::shared_ptr<PrefillHandoff>> serving;  // prefill side, by id
  std::unordered_map<std::string, double> tombstones;                       // cancelled ids -> when
  std::vector<std::weak_ptr<DecodeHandoff>> decoding;
  prom::Histogram handoff_s{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  prom::Histogram transfer_s{{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5}};
  prom::Histogram share{{0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1}};
  double sum_queue_s = 0, sum_prefill_s = 0, sum_transfer_wait_s = 0, last_gbps = 0;

  // Helper threads (HTTP calls to peers): joined at destruction.
  std::mutex threads_mu;
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>> threads;
  std::atomic<bool> stopping{false};

  void spawn(std::function<void()> f) {
    std::lock_guard<std::mutex> lk(threads_mu);
    for (size_t i = 0; i < threads.size();) {
      if (threads[i].second->load()) {
        threads[i].first.join();
        threads[i] = std::move(threads.back());
        threads.pop_back();
      } else {
        ++i;
      }
    }
    auto flag = std::make_shared<std::atomic<bool>>(false);
    threads.emplace_back(std::thread([f = std::move(f), flag] {
                           f();
                           flag->store(true);
                         }),
                         flag);
  }

  void reap_serving();
};

// ---------------------------------------------------------------- prefill side

struct PrefillHandoff : KvSink, std::enable_shared_from_this<PrefillHandoff> {
  PdNode::Impl* node = nullptr;
  std::string id;
  std::string peer;    // decode instance's transfer address
  std::string k_desc, v_desc;
  int d_slots = 0;     // decode pool's slots per layer
  std::vector<int32_t> dst_table;
  int skip = 0;        // prompt tokens decode has already
  uint64_t sched_id = 0;

  std::mutex mu;
  std::condition_variable cv;
  PrefillFsm fsm{PrefillFsm::Params{}};
  bool have_first = false, ended = false, replied = false;
  RemoteFirst first;
  std::vector<kvcache::BlockHash> names;
  std::vector<std::shared_ptr<transfer::Op>> ops;
  double t_submit = 0, t_first_write = 0, t_end = 0, t_last_done = 0;
  int64_t bytes = 0;

  void on_kv(int layer, int begin, int end, std::span<const int32_t> table) override {
    begin = std::max(begin, skip);
    if (begin >= end) return;
    const auto& pv = node->pool;
    const int bs = pv.block_size;
    std::vector<transfer::Segment> ks, vs;
    const int l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? pv.n_layer : layer + 1;
    for (int l = l0; l < l1; ++l)
      for (int a = begin; a < end;) {
        const int j = a / bs, b = std::min(end, (j + 1) * bs);
        if (j >= static_cast<int>(dst_table.size()) || j >= static_cast<int>(table.size())) break;
        const uint64_t ls = static_cast<uint64_t>(l) * pv.n_slots + static_cast<uint64_t>(table[j]) * bs + a % bs;
        const uint64_t rs = static_cast<uint64_t>(l) * d_slots + static_cast<uint64_t>(dst_table[j]) * bs + a % bs;
        ks.push_back({ls * pv.k_row, rs * pv.k_row, static_cast<uint64_t>(b - a) * pv.k_row});
        vs.push_back({ls * pv.v_row, rs * pv.v_row, static_cast<uint64_t>(b - a) * pv.v_row});
        a = b;
      }
    if (ks.empty()) return;
    {
      std::lock_guard<std::mutex> lk(mu);
      if (!fsm.may_write()) return;
      fsm.op_started();
      fsm.op_started();
      if (t_first_write == 0) t_first_write = now_s();
    }
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(node->p.timeout_s + node->p.grace_s));
    auto self = shared_from_this();
    for (int kv = 0; kv < 2; ++kv) {
      auto op = node->engine->write(peer, kv == 0 ? k_desc : v_desc, kv == 0 ? node->k_region : node->v_region,
                                    std::move(kv == 0 ? ks : vs), deadline);
      {
        std::lock_guard<std::mutex> lk(mu);
        ops.push_back(op);
      }
      op->on_done([self, op](const Status& st) { self->op_done(*op, st); });
    }
  }

  void op_done(const transfer::Op& op, const Status& st) {
    bool cancel_seq = false;
    {
      std::lock_guard<std::mutex> lk(mu);
      const bool was_failed = fsm.state() == PrefillFsm::St::Failed;
      fsm.op_finished(st.ok(), st.ok() ? std::string() : "KV transfer failed: " + st.error(), now_s());
      if (st.ok()) bytes += static_cast<int64_t>(op.bytes());
      t_last_done = now_s();
      cancel_seq = !was_failed && fsm.state() == PrefillFsm::St::Failed && !ended;
      cv.notify_all();
    }
    {
      std::lock_guard<std::mutex> lk(node->mu);
      node->st.ops++;
      if (st.ok()) node->st.bytes += static_cast<int64_t>(op.bytes());
      else node->st.op_failures++;
    }
    if (cancel_seq && sched_id) node->sched->cancel(sched_id);  // decode is gone: stop computing
  }

  void on_end(std::vector<kvcache::BlockHash> n) override {
    std::lock_guard<std::mutex> lk(mu);
    ended = true;
    names = std::move(n);
    t_end = now_s();
    fsm.on_end(have_first, t_end);
    cv.notify_all();
  }

  bool release_ready() override {
    std::lock_guard<std::mutex> lk(mu);
    const bool was_expired = fsm.lease_expired();
    fsm.tick(now_s());
    if (!was_expired && fsm.lease_expired()) {
      std::lock_guard<std::mutex> lk2(node->mu);
      node->st.lease_expired++;
    }
    return fsm.release_ready();
  }

  void on_token(const TokenEvent& ev) {
    std::lock_guard<std::mutex> lk(mu);
    if (!have_first && ev.sampled >= 0) {
      have_first = true;
      first.token = ev.sampled;
      first.logprob = ev.logprob;
      first.top = ev.top;
    }
    cv.notify_all();
  }

  void cancel() {
    std::vector<std::shared_ptr<transfer::Op>> to_cancel;
    {
      std::lock_guard<std::mutex> lk(mu);
      fsm.on_cancel();
      to_cancel = ops;
      cv.notify_all();
    }
    for (auto& op : to_cancel)
      if (!op->done()) op->cancel();
    if (sched_id) node->sched->cancel(sched_id);
  }
};

// Forgets handoffs that are over. Takes mu itself; never holds it while locking a handoff (the
// handoffs lock theirs first, then mu).
void PdNode::Impl::reap_serving() {
  std::vector<std::shared_ptr<PrefillHandoff>> all;
  {
    std::lock_guard<std::mutex> lk(mu);
    for (auto& [id, h] : serving) all.push_back(h);
    const double t = now_s();
    for (auto it = tombstones.begin(); it != tombstones.end();)
      it = t - it->second > 600 ? tombstones.erase(it) : std::next(it);
  }
  std::vector<std::string> gone;
  for (auto& h : all) {
    std::lock_guard<std::mutex> lk(h->mu);
    if (h->replied && h->fsm.release_ready()) gone.push_back(h->id);
  }
  std::lock_guard<std::mutex> lk(mu);
  for (auto& id : gone) serving.erase(id);
}

void PdNode::handle_prefill(const http::Request& req, http::Response& res) {
  Impl& I = *impl_;
  PrefillRequest r;
  std::string code;
  if (Status st = parse_prefill_request(req.body, &r, &code); !st.ok()) return reply_error(res, 400, st.error(), code);
  if (r.layout != layout_)
    return reply_error(res, 409, "KV layout mismatch: this instance has " + layout_ + ", the request wants " + r.layout,
                       "layout_mismatch");
  if (Status st = check_prefill_blocks(r, I.pool.block_size); !st.ok())
    return reply_error(res, 400, st.error(), "invalid_value");
  auto h = std::make_shared<PrefillHandoff>();
  h->id = std::move(r.id);
  h->peer = std::move(r.peer);
  h->k_desc = std::move(r.k_desc);
  h->v_desc = std::move(r.v_desc);
  h->d_slots = r.d_slots;
  h->dst_table = std::move(r.dst_table);
  h->skip = r.skip;
  GenRequest g;
  g.prompt = std::move(r.tokens);
  g.sampling = r.sampling;
  g.n_logprobs = r.n_logprobs;
  g.ignore_eos = r.ignore_eos;
  g.cache_salt = std::move(r.salt);
  g.serves_fetch = r.fetch;
  const std::string fetch_api = std::move(r.fetch_api);
  const int fetch_tokens = r.fetch_tokens;
  const double t0 = now_s();
  I.reap_serving();
  {
    std::lock_guard<std::mutex> lk(I.mu);
    if (I.tombstones.count(h->id))
      return reply_error(res, 409, "handoff " + h->id + " was cancelled", "cancelled");
    if (I.serving.count(h->id)) return reply_error(res, 409, "handoff " + h->id + " exists", "duplicate");
    I.serving[h->id] = h;
    I.st.in_flight_prefill = static_cast<int>(I.serving.size());
  }
  h->node = &I;
  h->fsm = PrefillFsm(PrefillFsm::Params{I.p.lease_s});
  h->t_submit = t0;
  g.max_tokens = 1;
  g.kv_sink = h;
  if (!fetch_api.empty()) g.kv_source = make_fetch_source(fetch_api, g, fetch_tokens);
  auto id = I.sched->submit(std::move(g), [h](const TokenEvent& ev) {
    h->on_token(ev);
    return true;
  });
  if (!id.ok()) {
    {
      std::lock_guard<std::mutex> lk(I.mu);
      I.serving.erase(h->id);
      I.st.served_failed++;
    }
    const bool busy = id.error().find("queue") != std::string::npos;
    return reply_error(res, busy ? 429 : 400, "prefill refused: " + id.error(), busy ? "rate_limit_exceeded" : "invalid_value");
  }
  {
    std::lock_guard<std::mutex> lk(h->mu);
    h->sched_id = id.value();
  }
  // Bounded by this instance's own deadline too: a decode instance that vanished without a word.
  const double limit = t0 + I.p.timeout_s + I.p.grace_s;
  // The decode instance hung up (it gave up or died): end the prefill now, not at the deadline.
  req.on_disconnect([h] {
    bool replied;
    {
      std::lock_guard<std::mutex> lk(h->mu);
      replied = h->replied;
    }
    if (!replied) h->cancel();
  });
  bool ok;
  {
    std::unique_lock<std::mutex> lk(h->mu);
    for (;;) {
      h->fsm.tick(now_s());
      if (h->fsm.reply_ready() && h->ended) break;
      if (now_s() > limit && !h->fsm.cancelled()) {
        lk.unlock();
        h->cancel();
        lk.lock();
        continue;
      }
      if (now_s() > limit + I.p.grace_s) break;
      h->cv.wait_for(lk, std::chrono::milliseconds(20));
    }
    ok = h->fsm.reply_ok() && h->fsm.outstanding() == 0;
  }
  std::lock_guard<std::mutex> lk(h->mu);
  h->replied = true;
  {
    std::lock_guard<std::mutex> lk2(I.mu);
    if (ok) {
      I.st.served_ok++;
      const double tr = h->t_last_done > h->t_first_write && h->t_first_write > 0 ? h->t_last_done - h->t_first_write : 0;
      I.st.transfer_seconds += tr;
      I.transfer_s.observe(tr);
      if (tr > 0) I.last_gbps = h->bytes / tr / 1e9;
    } else {
      I.st.served_failed++;
    }
  }
  if (!ok) {
    const bool cancelled = h->fsm.cancelled();
    return reply_error(res, cancelled ? 409 : 503,
                       h->fsm.error().empty() ? "the handoff failed" : h->fsm.error(), cancelled ? "cancelled" : "handoff_failed");
  }
  json top = json::array();
  for (auto& [t, lp] : h->first.top) top.push_back({t, lp});
  json names = json::array();
  for (auto& nm : h->names) names.push_back(nm.hex());
  const double t_end = h->t_end > 0 ? h->t_end : now_s();
  reply(res, 200,
        {{"id", h->id},
         {"token", h->first.token},
         {"logprob", h->first.logprob},
         {"top", top},
         {"names", names},
         {"layout", layout_},
         {"bytes", h->bytes},
         {"prefill_s", t_end - h->t_submit},
         {"transfer_wait_s", std::max(0.0, now_s() - t_end)}});
}

void PdNode::handle_ack(const http::Request& req, http::Response& res) {
  json j = json::parse(req.body, nullptr, false);
  const std::string id = j.is_object() ? j.value("id", std::string()) : std::string();
  std::shared_ptr<PrefillHandoff> h;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->serving.find(id);
    if (it != impl_->serving.end()) h = it->second;
  }
  if (h) {
    std::lock_guard<std::mutex> lk(h->mu);
    h->fsm.on_ack();
  }
  reply(res, 200, {{"id", id}, {"known", h != nullptr}});
}

void PdNode::handle_cancel(const http::Request& req, http::Response& res) {
  json j = json::parse(req.body, nullptr, false);
  const std::string id = j.is_object() ? j.value("id", std::string()) : std::string();
  if (id.empty()) return reply_error(res, 400, "cancel needs the handoff id", "invalid_value");
  std::shared_ptr<PrefillHandoff> h;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->tombstones[id] = now_s();  // a request that arrives after its cancel is refused
    auto it = impl_->serving.find(id);
    if (it != impl_->serving.end()) h = it->second;
  }
  bool quiesced = true;
  if (h) {
    h->cancel();
    std::unique_lock<std::mutex> lk(h->mu);
    quiesced = h->cv.wait_for(lk, std::chrono::duration<double>(impl_->p.grace_s), [&] { return h->fsm.quiesced(); });
  }
  reply(res, 200, {{"id", id}, {"quiesced", quiesced}});
}

// ---------------------------------------------------------------- decode side

struct DecodeHandoff : KvSource, std::enable_shared_from_this<DecodeHandoff> {
  PdNode::Impl* node = nullptr;
  std::string id, peer;  // peer: prefill instance's API host:port
  json body;             // the request, less what start() adds
  int n_prompt = 0;
  std::mutex mu;
  DecodeFsm fsm{DecodeFsm::Params{}};
  RemoteFirst first;
  std::vector<kvcache::BlockHash> expected;
  int n_cached = 0;
  double t_created = 0, t_start = 0;
  bool counted = false;
  int n_cover = -1;  // a fetch of the first n_cover tokens' KV (the KV pool), else -1 (a P/D handoff)

  void start(int cached, std::vector<int32_t> table, std::vector<kvcache::BlockHash> names) override {
    std::lock_guard<std::mutex> lk(mu);
    n_cached = cached;
    expected = std::move(names);
    t_start = now_s();
    fsm.start(t_start);
    {
      std::lock_guard<std::mutex> lk2(node->mu);
      node->sum_queue_s += t_start - t_created;
    }
    body["skip"] = cached;
    body["dst"] = {{"address", node->address},
                   {"k", node->k_desc},
                   {"v", node->v_desc},
                   {"n_slots", node->pool.n_slots},
                   {"table", table}};
    auto self = shared_from_this();
    node->spawn([self] { self->run(); });
  }

  void run() {
    std::string payload;
    {
      std::lock_guard<std::mutex> lk(mu);
      payload = body.dump();
    }
    httplib::Client cli(peer);
    cli.set_connection_timeout(2, 0);
    const double rt = node->p.timeout_s + 2 * node->p.grace_s + 1;
    cli.set_read_timeout(static_cast<time_t>(rt), 0);
    cli.set_write_timeout(10, 0);
    if (!node->p.api_key.empty()) cli.set_bearer_token_auth(node->p.api_key.c_str());
    auto r = cli.Post("/internal/pd/prefill", payload, "application/json");
    DecodeFsm::Act act = DecodeFsm::Act::None;
    std::lock_guard<std::mutex> lk(mu);
    const double t = now_s();
    if (!r) {
      const auto e = r.error();
      const std::string why = "prefill instance " + peer + ": " + httplib::to_string(e);
      // Never connected: nothing was asked, nothing can arrive.
      act = e == httplib::Error::Connection ? fsm.on_reply_error(why, t) : fsm.on_peer_lost(why, t);
    } else if (r->status != 200) {
      json e = json::parse(r->body, nullptr, false);
      std::string msg = "prefill instance " + peer + " answered " + std::to_string(r->status);
      if (e.is_object() && e.contains("error") && e["error"].is_object())
        msg += ": " + e["error"].value("message", std::string());
      act = fsm.on_reply_error(msg, t);
    } else {
      std::string why;
      const bool ok = verify(r->body, &why);
      act = fsm.on_reply_ok(ok, why, t);
    }
    if (act == DecodeFsm::Act::SendAck) send(std::string("/internal/pd/ack"));
  }

  bool verify(const std::string& text, std::string* why) {
    Status st = verify_answer(text, node->layout, expected, n_prompt, node->pool.block_size,
                              node->sched->model().cfg.n_vocab, &first);
    if (!st.ok()) {
      *why = st.error();
      return false;
    }
    json j = json::parse(text, nullptr, false);
    std::lock_guard<std::mutex> lk(node->mu);
    const double prefill = j.value("prefill_s", 0.0), wait = j.value("transfer_wait_s", 0.0);
    const double total = now_s() - t_start;
    node->sum_prefill_s += prefill;
    node->sum_transfer_wait_s += wait;
    node->share.observe(total > 0 ? wait / total : 0);
    return true;
  }

  // Fire-and-forget control message (ack, cancel) to the prefill instance.
  void send(const std::string& path) {
    auto self = shared_from_this();
    node->spawn([self, path] {
      // Fault injection for tests (a decode instance that dies between the answer and its ack).
      static const int ack_delay_ms = [] {
        const char* e = std::getenv("LARDER_PD_TEST_ACK_DELAY_MS");
        return e ? std::atoi(e) : 0;
      }();
      if (ack_delay_ms > 0 && path == "/internal/pd/ack")
        std::this_thread::sleep_for(std::chrono::milliseconds(ack_delay_ms));
      httplib::Client cli(self->peer);
      cli.set_connection_timeout(1, 0);
      cli.set_read_timeout(static_cast<time_t>(self->node->p.grace_s) + 1, 0);
      if (!self->node->p.api_key.empty()) cli.set_bearer_token_auth(self->node->p.api_key.c_str());
      json j = {{"id", self->id}};
      auto r = cli.Post(path.c_str(), j.dump(), "application/json");
      if (path == "/internal/pd/cancel") {
        std::lock_guard<std::mutex> lk(self->mu);
        json a = r && r->status == 200 ? json::parse(r->body, nullptr, false) : json();
        // Answered "quiesced", or the peer is unreachable (then the grace covers bytes on the wire).
        if (a.is_object() && a.value("quiesced", false)) self->fsm.on_cancel_answered(now_s());
      }
    });
  }

  void act(DecodeFsm::Act a) {
    if (a == DecodeFsm::Act::SendCancel) send("/internal/pd/cancel");
    if (a == DecodeFsm::Act::SendAck) send("/internal/pd/ack");
  }

  void count_end() {  // under mu
    if (counted || !(fsm.done() || fsm.failed())) return;
    counted = true;
    std::lock_guard<std::mutex> lk(node->mu);
    if (n_cover >= 0) {
      if (fsm.done()) {
        node->st.fetches_ok++;
        node->st.fetched_tokens += n_cover - n_cached;
      } else {
        node->st.fetches_failed++;
      }
    } else if (fsm.done()) {
      node->st.handoffs_ok++;
      node->handoff_s.observe(now_s() - t_start);
    } else if (fsm.timed_out()) {
      node->st.handoffs_timeout++;
    } else if (fsm.error().find("refused") != std::string::npos) {
      node->st.handoffs_refused++;
    } else {
      node->st.handoffs_failed++;
    }
  }

  State poll(RemoteFirst* out, std::string* error) override {
    std::lock_guard<std::mutex> lk(mu);
    act(fsm.tick(now_s()));
    count_end();
    if (fsm.done()) {
      *out = first;
      return State::Done;
    }
    if (fsm.failed()) {
      *error = fsm.error();
      return State::Failed;
    }
    return State::Pending;
  }

  void abort() override {
    std::lock_guard<std::mutex> lk(mu);
    act(fsm.on_abort(now_s()));
    count_end();
  }

  bool quiesced() override {
    std::lock_guard<std::mutex> lk(mu);
    act(fsm.tick(now_s()));
    count_end();
    return fsm.quiesced();
  }

  bool fallback_local() const override { return n_cover >= 0 || node->p.fallback_local; }
  int local_prefill_tokens() const override { return n_cover >= 0 ? 0 : node->p.local_prefill; }
  int covers() const override { return n_cover; }
};

std::shared_ptr<KvSource> PdNode::make_source(const std::string& prefill_api, const GenRequest& req,
                                              const std::string& fetch_api, int fetch_tokens) {
  Impl& I = *impl_;
  if (prefill_api.empty() || prefill_api == I.p.self_api) return nullptr;
  auto h = std::make_shared<DecodeHandoff>();
  h->node = &I;
  h->id = random_hex(24);
  h->peer = prefill_api;
  h->n_prompt = static_cast<int>(req.prompt.size());
  h->t_created = now_s();
  h->fsm = DecodeFsm(DecodeFsm::Params{I.p.timeout_s, I.p.grace_s});
  h->body = {{"id", h->id},
             {"layout", layout_},
             {"tokens", req.prompt},
             {"sampling", sampling_json(req.sampling)},
             {"n_logprobs", req.n_logprobs},
             {"ignore_eos", req.ignore_eos},
             {"salt", req.cache_salt}};
  if (!fetch_api.empty() && fetch_api != prefill_api && fetch_tokens > 0)
    h->body["fetch_from"] = {{"api", fetch_api}, {"tokens", fetch_tokens}};
  std::lock_guard<std::mutex> lk(I.mu);
  I.decoding.erase(std::remove_if(I.decoding.begin(), I.decoding.end(), [](auto& w) { return w.expired(); }),
                   I.decoding.end());
  I.decoding.push_back(h);
  return h;
}

std::shared_ptr<KvSource> PdNode::make_fetch_source(const std::string& holder_api, const GenRequest& req,
                                                    int n_tokens) {
  Impl& I = *impl_;
  const int bs = I.pool.block_size;
  n_tokens -= n_tokens % std::max(bs, 1);
  if (holder_api.empty() || holder_api == I.p.self_api || n_tokens <= 0 ||
      n_tokens >= static_cast<int>(req.prompt.size()))
    return nullptr;
  auto src = make_source(holder_api, req);
  auto h = std::static_pointer_cast<DecodeHandoff>(src);
  // The holder computes one token past the blocks (at least one prompt token is always
  // computed), so all n_tokens come from its cache; that token's row lands in our next block,
  // which we compute ourselves anyway.
  std::vector<int32_t> head(req.prompt.begin(), req.prompt.begin() + n_tokens + 1);
  std::lock_guard<std::mutex> lk(h->mu);
  h->n_cover = n_tokens;
  h->n_prompt = n_tokens + 1;
  h->body["tokens"] = head;
  h->body["fetch"] = true;
  return h;
}

// ---------------------------------------------------------------- node

Result<std::unique_ptr<PdNode>> PdNode::create(Scheduler& sched, const PdParams& p) {
  if (p.role != "prefill" && p.role != "decode" && p.role != "both")
    return make_error("--role must be prefill, decode or both, not '%s'", p.role.c_str());
  auto n = std::unique_ptr<PdNode>(new PdNode());
  n->p_ = p;
  n->layout_ = layout_fingerprint(sched);
  n->impl_ = std::make_unique<Impl>();
  Impl& I = *n->impl_;
  I.node = n.get();
  I.sched = &sched;
  I.p = p;
  I.layout = n->layout_;
  I.pool = sched.kv_pool();
  transfer::EngineParams ep;
  ep.host = p.transfer_host;
  ep.port = p.transfer_port;
  LARDER_TRY(engine, transfer::Engine::create(ep));
  I.engine = std::move(engine);
  I.address = I.engine->address();
  if (!p.advertise_host.empty()) {
    const auto colon = I.address.rfind(':');
    I.address = p.advertise_host + I.address.substr(colon == std::string::npos ? I.address.size() : colon);
  }
  LARDER_TRY(kr, I.engine->register_memory(I.pool.k_base, I.pool.k_bytes));
  LARDER_TRY(vr, I.engine->register_memory(I.pool.v_base, I.pool.v_bytes));
  I.k_region = kr;
  I.v_region = vr;
  LARDER_TRY(kd, I.engine->describe(kr));
  LARDER_TRY(vd, I.engine->describe(vr));
  I.k_desc = kd;
  I.v_desc = vd;
  return n;
}

PdNode::~PdNode() {
  if (!impl_) return;
  Impl& I = *impl_;
  I.stopping = true;
  {
    std::vector<std::shared_ptr<PrefillHandoff>> serving;
    {
      std::lock_guard<std::mutex> lk(I.mu);
      for (auto& [id, h] : I.serving) serving.push_back(h);
    }
    for (auto& h : serving) h->cancel();
  }
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>> threads;
  {
    std::lock_guard<std::mutex> lk(I.threads_mu);
    threads.swap(I.threads);
  }
  for (auto& t : threads) t.first.join();
  I.engine.reset();  // no transfer touches the pool after this
}

std::string PdNode::transfer_address() const { return impl_->address; }

PdStats PdNode::stats() const {
  impl_->reap_serving();
  PdStats s;
  std::vector<std::shared_ptr<DecodeHandoff>> decoding;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    s = impl_->st;
    s.in_flight_prefill = static_cast<int>(impl_->serving.size());
    for (auto& w : impl_->decoding)
      if (auto h = w.lock()) decoding.push_back(h);
  }
  int dec = 0;
  for (auto& h : decoding) {
    std::lock_guard<std::mutex> lk2(h->mu);
    dec += h->fsm.state() == DecodeFsm::St::Requesting || h->fsm.state() == DecodeFsm::St::Cancelling ||
           h->fsm.state() == DecodeFsm::St::Draining;
  }
  s.in_flight_decode = dec;
  return s;
}

void PdNode::render_metrics(std::string& out) const {
  const PdStats s = stats();
  using prom::fmt_double;
  prom::header(out, "larder_pd_handoffs_total", "counter", "KV handoffs by side and result");
  auto row = [&](const char* side, const char* result, int64_t v) {
    out += std::string("larder_pd_handoffs_total{side=\"") + side + "\",result=\"" + result + "\"} " +
           std::to_string(v) + "\n";
  };
  row("decode", "ok", s.handoffs_ok);
  row("decode", "failed", s.handoffs_failed);
  row("decode", "timeout", s.handoffs_timeout);
  row("decode", "refused", s.handoffs_refused);
  row("prefill", "ok", s.served_ok);
  row("prefill", "failed", s.served_failed);
  prom::header(out, "larder_kv_fetches_total", "counter", "KV pool: fetches of leading blocks from other instances, by result");
  out += "larder_kv_fetches_total{result=\"ok\"} " + std::to_string(s.fetches_ok) + "\n";
  out += "larder_kv_fetches_total{result=\"failed\"} " + std::to_string(s.fetches_failed) + "\n";
  prom::scalar(out, "larder_kv_fetched_tokens_total", "counter", "KV pool: prompt tokens whose KV was fetched",
               s.fetched_tokens);
  prom::header(out, "larder_pd_handoffs_in_flight", "gauge", "handoffs not yet settled, by side");
  out += "larder_pd_handoffs_in_flight{side=\"decode\"} " + std::to_string(s.in_flight_decode) + "\n";
  out += "larder_pd_handoffs_in_flight{side=\"prefill\"} " + std::to_string(s.in_flight_prefill) + "\n";
  prom::scalar(out, "larder_pd_transfers_total", "counter", "batched KV writes posted by this instance", s.ops);
  prom::scalar(out, "larder_pd_transfer_bytes_total", "counter", "KV bytes written to decode instances", s.bytes);
  prom::scalar(out, "larder_pd_transfer_failures_total", "counter", "KV writes that failed", s.op_failures);
  prom::scalar(out, "larder_pd_lease_expired_total", "counter",
               "handed-off KV freed because decode never acknowledged it", s.lease_expired);
  std::lock_guard<std::mutex> lk(impl_->mu);
  prom::scalar(out, "larder_pd_transfer_gbps", "gauge", "GB/s of the last handoff's KV writes", impl_->last_gbps);
  prom::header(out, "larder_pd_transfer_seconds", "histogram", "prefill side: first KV write posted -> last complete");
  impl_->transfer_s.render(out, "larder_pd_transfer_seconds");
  prom::header(out, "larder_pd_handoff_seconds", "histogram", "decode side: blocks reserved -> KV verified");
  impl_->handoff_s.render(out, "larder_pd_handoff_seconds");
  prom::header(out, "larder_pd_ttft_transfer_share", "histogram",
               "decode side: share of a handoff spent waiting for KV writes after the prompt was computed");
  impl_->share.render(out, "larder_pd_ttft_transfer_share");
  prom::scalar(out, "larder_pd_queue_seconds_total", "counter",
               "decode side: request received -> its blocks reserved, summed over handoffs", impl_->sum_queue_s);
  prom::scalar(out, "larder_pd_prefill_seconds_total", "counter", "decode side: prefill time reported by prefill instances",
               impl_->sum_prefill_s);
  prom::scalar(out, "larder_pd_transfer_wait_seconds_total", "counter",
               "decode side: transfer time not hidden behind prefill", impl_->sum_transfer_wait_s);
}

}  // namespace larder::pd
