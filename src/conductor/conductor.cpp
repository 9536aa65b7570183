#include "conductor/conductor.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "chat/chat_template.h"
#include "core/prom.h"
#include "kvevents/events.h"
#include "kvevents/subscriber.h"
#include "model/gguf.h"
#include "model/model.h"
#include "server/openai_api.h"
#include "server/prompt_cache.h"
#include "tokenizer/tokenizer.h"

namespace larder::conductor {

namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
using cluster::InstanceInfo;

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

// An instance's key in the conductor's tables: its registered id, or its address when static.
std::string key_of(const InstanceInfo& i) { return i.id.empty() ? i.api_address : i.id; }

struct InstState {
  int running = 0;             // ours: requests dispatched to it for decoding, not ended
  int64_t prefill_tokens = 0;  // ours: prompt tokens dispatched to it, first token not seen yet
  CostFitter fitter;
  CostModel model;
  bool fitted = false;
  double suspect_until = 0;    // failed mid-answer: no new requests until then
  CountHistory ours;           // `running` over the last seconds (wall ms), see view_of()
  CountHistory ours_prefill;   // `prefill_tokens` likewise
};

constexpr int kMaxAttempts = 8;
constexpr double kTrustRegistrationS = 5;  // see view_of()

struct Req : router::Hooks::Ticket, std::enable_shared_from_this<Req> {
  // Set by plan(), then read-only.
  bool chat = false, stream = false, tokens_ok = false;
  json body;                     // the client's request
  std::vector<int32_t> prompt;   // as the instances will see it (sent to them verbatim)
  // The prompt cache's view of a text prompt (so the next turn tokenizes as an instance would).
  bool cacheable = false, add_bos = false, parse_special = false;
  std::string prompt_text;
  server::PromptCache::Encoded enc;
  int max_tokens = 16;
  int block_size = 16;
  int cached_tokens = 0;         // predicted: not computed by the prefill instance
  bool fetch = false;
  bool planned_reject = false;   // answered 429/503 by plan(): counted there
  double predicted_ttft = 0, predicted_tbt = 0;
  double t_start = 0;
  bool queue_empty = false;      // nothing of ours was queued at the prefill instance
  int batch = 0;                 // decode batch it joined (predicted)
  // Relay thread (under mu).
  std::mutex mu;
  std::string prefill_key, decode_key;  // where it is counted
  int64_t counted_prefill = 0;          // its tokens in prefill_key's queue (0 once the first token came)
  bool counted_decode = false;
  std::vector<int32_t> gen;             // generated ids (from the instances' "larder" fields)
  size_t text_bytes = 0;                // reply text the client got
  bool resumed = false;
  int attempts = 1;
  double t_first = 0, t_last = 0;
  int n_tokens = 0;
  std::atomic<int> live_tokens{0};      // n_tokens, readable without mu (slot-wait estimates)
  std::string id;                       // the first attempt's completion id (kept across re-issues)
  std::set<std::string> failed;         // ids of the instances that failed it (a restarted one at the
                                        // same address is a new instance, with a new id)
};

}  // namespace

struct Conductor::Impl : router::Hooks, std::enable_shared_from_this<Conductor::Impl> {
  ConductorParams p;
  std::shared_ptr<GgufFile> gguf;
  std::unique_ptr<Model> model;  // llama2.c / HF models: the tokenizer comes with the model
  const Tokenizer* tok = nullptr;
  std::unique_ptr<Tokenizer> tok_own;
  std::optional<ChatTemplate> tmpl;
  // Like each instance's own: a conversation's next turn reuses the ids generated for the last
  // one instead of re-tokenizing their text (which can differ), so it names the same blocks.
  std::unique_ptr<server::PromptCache> pcache;
  std::optional<CostModel> calibration;  // --calibration: the prior of every instance
  bool template_has_tools = false;
  KvIndex index;
  std::unique_ptr<kvevents::SubscriberSet> subs;
  std::unique_ptr<router::Router> router;
  std::thread sync_thread;
  std::atomic<bool> stopping{false};
  double started_s = now_s();
  std::mutex sync_mu;
  std::condition_variable sync_cv;

  mutable std::mutex mu;  // guards what follows
  std::map<std::string, InstState> inst;
  std::map<std::string, std::set<std::shared_ptr<Req>>> decoding;  // ours, per instance (slot-wait estimates)
  std::map<std::string, std::string> subscribed;  // id -> events endpoint
  uint64_t rr = 0;
  std::mt19937_64 rng{std::random_device{}()};
  int64_t n_ok = 0, n_failed = 0, n_rejected = 0, n_unavailable = 0, n_cancelled = 0, n_goodput = 0;
  int64_t n_fetch = 0, n_resumes = 0, prompt_tokens = 0, predicted_cached = 0;
  double ttft_abs_err_sum = 0;
  int64_t ttft_err_n = 0;
  std::deque<double> goodput_times;  // completion times of requests that met the SLOs (last 60 s)
  prom::Histogram ttft_hist{{0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30}};
  prom::Histogram tbt_hist{{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}};
  prom::Histogram ttft_err{{0.1, 0.25, 0.5, 1, 2, 4}};  // |predicted - measured| / measured

  // ------------------------------------------------------------------ naming
  struct Identity {
    kvcache::CacheIdentity id;
    int64_t block_bytes = 0;
    bool ok = false;
  };
  static Identity identity_of(const InstanceInfo& i) {
    Identity r;
    if (i.cache.identity.empty() || i.cache.block_size <= 0) return r;
    r.id = kvcache::CacheIdentity{i.cache.identity, i.cache.dtype, i.cache.block_size};
    r.block_bytes = i.cache.block_bytes;
    r.ok = true;
    return r;
  }
  // Names of the prompt's blocks the engine could reuse (whole blocks before its last token).
  static std::vector<kvcache::BlockHash> chain(const kvcache::CacheIdentity& id, const std::vector<int32_t>& tokens) {
    std::vector<kvcache::BlockHash> out;
    const int bs = id.block_size;
    if (bs <= 0 || tokens.empty()) return out;
    kvcache::BlockHash h = kvcache::root_hash(id);
    const int n = (static_cast<int>(tokens.size()) - 1) / bs;
    for (int j = 0; j < n; ++j) {
      h = kvcache::chain_hash(h, std::span<const int32_t>(tokens).subspan(static_cast<size_t>(j) * bs, bs));
      out.push_back(h);
    }
    return out;
  }

  // The prompt as `larder serve` builds it (without its prompt cache: the instance gets these
  // ids verbatim). False: leave the request to the instance (it answers any error).
  std::vector<int32_t> encode(Req* t, const std::string& text, bool add_bos, bool parse_special) {
    if (!pcache || !t) return tok->encode(text, add_bos, parse_special);
    t->cacheable = true;
    t->add_bos = add_bos;
    t->parse_special = parse_special;
    t->prompt_text = text;
    t->enc = pcache->encode(text, add_bos, parse_special);
    return t->enc.ids;
  }

  bool build_prompt(const json& body, bool chat, std::vector<int32_t>& tokens, int& max_tokens, bool& stream,
                    Req* t = nullptr) {
    if (!tok || !body.is_object()) return false;
    server::ParsedRequest pr;
    auto err = chat ? server::parse_chat_request(body, pr) : server::parse_completion_request(body, pr);
    if (err) return false;
    stream = pr.stream;
    max_tokens = pr.max_tokens.value_or(chat ? 256 : 16);
    if (!chat) {
      if (pr.prompt_is_tokens) {
        for (int32_t t : pr.prompt_tokens)
          if (t < 0 || t >= tok->n_vocab()) return false;
        tokens = pr.prompt_tokens;
      } else {
        tokens = encode(t, pr.prompt_text, /*add_bos=*/true, /*parse_special=*/false);
      }
      return !tokens.empty();
    }
    if (!tmpl || (!pr.tools.is_null() && !template_has_tools)) return false;
    const Vocab& v = tok->vocab();
    std::string bos = v.bos >= 0 && v.bos < tok->n_vocab() ? v.tokens[v.bos] : "";
    std::string eos = v.eos >= 0 && v.eos < tok->n_vocab() ? v.tokens[v.eos] : "";
    json extra = json::object();
    extra["bos_token"] = bos;
    extra["eos_token"] = eos;
    if (!pr.tools.is_null()) extra["tools"] = pr.tools;
    auto r = tmpl->apply(pr.messages, /*add_generation_prompt=*/true, extra);
    if (!r.ok()) return false;
    const bool has_bos_text = !bos.empty() && r.value().rfind(bos, 0) == 0;
    tokens = encode(t, r.value(), /*add_bos=*/!has_bos_text, /*parse_special=*/true);
    return !tokens.empty();
  }

  // ------------------------------------------------------------------ the instances
  static std::vector<InstanceInfo> candidates(const router::View& v) {
    std::vector<InstanceInfo> out;
    std::set<std::string> seen;
    for (const auto* list : {&v.decode, &v.prefill})
      for (const auto& i : *list)
        if (seen.insert(i.api_address).second) out.push_back(i);
    return out;
  }

  InstanceView view_of(const InstanceInfo& i, double t, const CostModel* peer) {  // under mu
    InstState& s = inst[key_of(i)];
    InstanceView iv;
    iv.id = key_of(i);
    iv.can_prefill = i.can_prefill();
    iv.can_decode = i.can_decode();
    iv.parallel = i.capacity.parallel > 0 ? i.capacity.parallel : 4;
    // Our own count is exact for what we sent and changes the moment a request starts or ends;
    // the registration is up to a second old (a finished burst would still look queued there,
    // and requests would be rejected for work already done). So the registration counts only
    // while we know nothing better: the first seconds after this conductor started (work sent
    // by its previous run).
    // Sequences are different: requests sent to the instance by others (clients, other conductors)
    // hold its slots too. The registration counts ours as they were when it was written, so
    // others' = registered - ours then, and running = ours now + others'. (Taking the larger of
    // the registered and our own count kept a request that had just ended looking busy for up
    // to a refresh, and sent the next request for its prefix to the other instance.)
    iv.running = s.running + static_cast<int>(s.ours.others(i.load.running, i.updated_ms));
    iv.waiting = i.load.waiting;
    iv.queued_prefill_tokens = s.prefill_tokens;
    // Early on, the registration's queue less ours when it was written (the larger of the two
    // counted a prompt ours had finished as queued for up to a refresh).
    if (t - started_s < kTrustRegistrationS)
      iv.queued_prefill_tokens += s.ours_prefill.others(i.load.queued_prefill_tokens, i.updated_ms);
    iv.free_blocks = i.load.free_blocks;
    iv.total_blocks = i.capacity.kv_blocks;
    iv.decode_ctx_tokens = 0;
    // Its own fit, else the calibration, else its measured prefill speed, else a peer's model
    // (just started: as fast as the others running the same model).
    if (s.fitted) {
      iv.cost = s.model;
    } else if (calibration) {
      iv.cost = *calibration;
    } else if (i.prefill_tokens_per_s > 0) {
      iv.cost.b = 1.0 / i.prefill_tokens_per_s;
    } else if (peer) {
      iv.cost = *peer;
    }
    iv.weight = 1.0;
    if (i.started_ms > 0) iv.weight = ramp_weight((cluster::wall_ms() - i.started_ms) / 1000.0, p.ramp_s);
    if (s.suspect_until > t) iv.weight = 0;
    iv.slot_wait_s = slot_wait(key_of(i), iv);
    return iv;
  }

  void count_prefill(Req& t, const std::string& key, int64_t tokens) {  // under mu + t.mu
    t.prefill_key = key;
    t.counted_prefill = tokens;
    inst[key].prefill_tokens += tokens;
    inst[key].ours_prefill.set(cluster::wall_ms(), inst[key].prefill_tokens);
  }
  void uncount_prefill(Req& t) {
    if (t.counted_prefill > 0) {
      InstState& s = inst[t.prefill_key];
      s.prefill_tokens -= t.counted_prefill;
      s.ours_prefill.set(cluster::wall_ms(), s.prefill_tokens);
    }
    t.counted_prefill = 0;
  }
  void count_decode(Req& t, const std::string& key) {
    t.decode_key = key;
    t.counted_decode = true;
    inst[key].running++;
    inst[key].ours.set(cluster::wall_ms(), inst[key].running);
    decoding[key].insert(t.shared_from_this());
  }
  void uncount_decode(Req& t) {
    if (t.counted_decode) {
      inst[t.decode_key].running--;
      inst[t.decode_key].ours.set(cluster::wall_ms(), inst[t.decode_key].running);
      auto it = decoding.find(t.decode_key);
      if (it != decoding.end()) {
        it->second.erase(t.shared_from_this());
        if (it->second.empty()) decoding.erase(it);
      }
    }
    t.counted_decode = false;
  }

  // All slots taken: when the k-th sequence (k = how many are ahead of a new one) should end,
  // from what is left of ours there (max_tokens - generated), others assumed like ours.
  double slot_wait(const std::string& key, const InstanceView& iv) {
    const int ahead = iv.running + iv.waiting - iv.parallel + 1;
    if (ahead <= 0) return 0;
    std::vector<int> left;
    if (auto it = decoding.find(key); it != decoding.end())
      for (const auto& r : it->second) left.push_back(std::max(1, r->max_tokens - r->live_tokens.load()));
    std::sort(left.begin(), left.end());
    const int fallback = left.empty() ? 32 : left.back();
    const int k = std::min(ahead, iv.parallel);
    const int tokens = k <= static_cast<int>(left.size()) ? left[k - 1] : fallback;
    const double rounds = std::ceil(static_cast<double>(ahead) / std::max(1, iv.parallel));
    return rounds * tokens * iv.cost.decode_step_s(iv.running, static_cast<double>(iv.decode_ctx_tokens));
  }

  // ------------------------------------------------------------------ Hooks
  std::string body_for(const Req& t, bool resume) {
    if (!t.tokens_ok) return "";  // the client's body as it is
    json b = t.body;
    json l = json::object();
    l["prompt_tokens"] = t.prompt;
    l["token_ids"] = true;
    if (resume) l["resume"] = json{{"tokens", t.gen}, {"text_bytes", t.text_bytes}};
    b["larder"] = std::move(l);
    return b.dump();
  }

  // Routes `t` (its prompt plus `extra` generated tokens) among `cands`, leaving out `exclude`.
  Decision decide(Req& t, const std::vector<InstanceInfo>& cands, const std::set<std::string>& exclude,
                  std::vector<InstanceView>& views) {
    const double now = now_s();
    std::vector<int32_t> toks = t.prompt;
    toks.insert(toks.end(), t.gen.begin(), t.gen.end());
    // Holdings per identity group (instances of one model with other cache types name blocks differently).
    std::vector<Holding> holds(cands.size());
    std::map<std::string, std::vector<size_t>> groups;
    std::map<std::string, Identity> ids;
    for (size_t i = 0; i < cands.size(); ++i) {
      Identity id = identity_of(cands[i]);
      if (!id.ok) continue;
      const std::string g = id.id.model + "|" + id.id.dtype + "|" + std::to_string(id.id.block_size);
      groups[g].push_back(i);
      ids[g] = id;
    }
    RequestView rv;
    rv.n_prompt = static_cast<int>(toks.size());
    rv.max_tokens = std::max(1, t.max_tokens - static_cast<int>(t.gen.size()));
    for (auto& [g, members] : groups) {
      const Identity& id = ids[g];
      rv.block_size = id.id.block_size;
      rv.block_bytes = id.block_bytes;
      if (!t.tokens_ok) continue;
      std::vector<kvcache::BlockHash> names = chain(id.id, toks);
      if (!names.empty()) rv.key = names[0].lo;
      std::vector<std::string> keys;
      for (size_t i : members) keys.push_back(key_of(cands[i]));
      std::vector<Holding> h = index.holdings(names, keys);
      for (size_t k = 0; k < members.size(); ++k)
        if (subs && subs->synced(key_of(cands[members[k]]))) holds[members[k]] = h[k];
    }
    if (rv.key == 0 && !toks.empty()) rv.key = static_cast<uint64_t>(toks[0]) * 0x9E3779B97F4A7C15ull + toks.size();
    t.block_size = rv.block_size;
    std::lock_guard<std::mutex> lk(mu);
    views.clear();
    // A cost model for instances with no measurement of their own: a fitted peer's, else one
    // from a peer's measured prefill speed (instances of a cluster run the same model).
    std::optional<CostModel> peer;
    for (const auto& c : cands)
      if (auto it = inst.find(key_of(c)); it != inst.end() && it->second.fitted) {
        peer = it->second.model;
        break;
      }
    if (!peer)
      for (const auto& c : cands)
        if (c.prefill_tokens_per_s > 0) {
          peer = calibration ? *calibration : CostModel{};
          peer->b = 1.0 / c.prefill_tokens_per_s;
          break;
        }
    if (!peer && calibration) peer = *calibration;
    for (const auto& c : cands) {
      views.push_back(view_of(c, now, peer ? &*peer : nullptr));
      if (exclude.count(key_of(c))) views.back().weight = 0;
    }
    return route(p.policy, rv, views, holds, rr, rng());
  }

  Plan plan(const router::RouteRequest& r, const router::View& v) override {
    auto t = std::make_shared<Req>();
    t->t_start = now_s();
    t->chat = r.path.find("chat") != std::string::npos;
    t->body = json::parse(r.body, nullptr, false);
    if (t->body.is_object()) t->stream = t->body.value("stream", false) == true;
    t->tokens_ok = build_prompt(t->body, t->chat, t->prompt, t->max_tokens, t->stream, t.get());
    Plan plan;
    plan.ticket = t;
    const std::vector<InstanceInfo> cands = candidates(v);
    std::vector<InstanceView> views;
    Decision d = decide(*t, cands, {}, views);
    if (d.reject || d.prefill < 0 || d.decode < 0) {
      std::lock_guard<std::mutex> lk(mu);
      plan.reject = true;
      t->planned_reject = true;
      if (d.reject) {
        n_rejected++;
        plan.status = 429;
        plan.code = "slo_unattainable";
        char buf[300];
        std::snprintf(buf, sizeof buf,
                      "No instance can serve this request within the SLO now (best predicted TTFT %.0f ms, TBT %.0f "
                      "ms); retry later.",
                      d.predicted_ttft_s * 1e3, d.predicted_tbt_s * 1e3);
        plan.message = buf;
      } else {
        n_unavailable++;
        plan.status = 503;
        plan.code = "no_instance";
        plan.message = "No instance can take this request: " + (d.reason.empty() ? std::string("none available") : d.reason);
      }
      plan.retry_after_s = std::max(1.0, d.retry_after_s);
      return plan;
    }
    const InstanceInfo& pre = cands[d.prefill];
    const InstanceInfo& dec = cands[d.decode];
    router::Attempt a;
    a.decode = dec.api_address;
    a.prefill = d.prefill != d.decode ? pre.api_address : "";
    if (d.fetch_from >= 0 && d.fetch_blocks > 0 && t->tokens_ok)
      a.fetch = cands[d.fetch_from].api_address + ";" + std::to_string(d.fetch_blocks * t->block_size);
    a.body = body_for(*t, false);
    plan.attempts.push_back(a);
    // If the pick cannot be reached, the least loaded others (computing the prompt themselves).
    std::vector<size_t> rest;
    for (size_t i = 0; i < cands.size(); ++i)
      if (static_cast<int>(i) != d.decode && cands[i].can_decode()) rest.push_back(i);
    std::sort(rest.begin(), rest.end(), [&](size_t x, size_t y) { return views[x].running < views[y].running; });
    for (size_t i : rest) plan.attempts.push_back(router::Attempt{cands[i].api_address, "", "", a.body});
    {
      std::lock_guard<std::mutex> lk(mu);
      std::lock_guard<std::mutex> lk2(t->mu);
      t->predicted_ttft = d.predicted_ttft_s;
      t->predicted_tbt = d.predicted_tbt_s;
      t->cached_tokens = d.cached_blocks * t->block_size;
      t->fetch = !a.fetch.empty();
      t->queue_empty = inst[key_of(pre)].prefill_tokens == 0 && pre.load.queued_prefill_tokens == 0;
      t->batch = views[d.decode].running;
      count_prefill(*t, key_of(pre), std::max<int64_t>(0, static_cast<int64_t>(t->prompt.size()) - t->cached_tokens));
      count_decode(*t, key_of(dec));
      prompt_tokens += static_cast<int64_t>(t->prompt.size());
      predicted_cached += t->cached_tokens;
      n_fetch += t->fetch;
    }
    return plan;
  }

  void on_start(router::Hooks::Ticket& tb, const router::Attempt& a, int status) override {
    auto& t = static_cast<Req&>(tb);
    router::View v = router->view();
    std::lock_guard<std::mutex> lk(mu);
    std::lock_guard<std::mutex> lk2(t.mu);
    for (const auto& i : candidates(v))
      if (i.api_address == a.decode && key_of(i) != t.decode_key) {
        // Another instance than planned answered (the pick could not be reached): it computes the prompt too.
        uncount_decode(t);
        count_decode(t, key_of(i));
        if (t.counted_prefill > 0) {
          const int64_t n = t.counted_prefill;
          uncount_prefill(t);
          count_prefill(t, key_of(i), n);
        }
      }
  }

  void first_token(Req& t, double now) {  // under t.mu
    if (t.t_first > 0) return;
    t.t_first = now;
    std::lock_guard<std::mutex> lk(mu);
    uncount_prefill(t);
  }

  std::string on_event(router::Hooks::Ticket& tb, const std::string& data) override {
    auto& t = static_cast<Req&>(tb);
    json j = json::parse(data, nullptr, false);
    if (!j.is_object()) return data;
    const double now = now_s();
    std::lock_guard<std::mutex> lk(t.mu);
    if (auto it = j.find("larder"); it != j.end()) {
      if (it->is_object() && it->contains("token_ids") && (*it)["token_ids"].is_array()) {
        for (const auto& id : (*it)["token_ids"])
          if (id.is_number_integer()) t.gen.push_back(id.get<int32_t>());
        const int n = static_cast<int>((*it)["token_ids"].size());
        if (n > 0) {
          first_token(t, now);
          t.t_last = now;
          t.n_tokens += n;
          t.live_tokens = t.n_tokens;
        }
      }
      j.erase(it);
    }
    bool role_only = false;
    if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty() && j["choices"][0].is_object()) {
      const json& c = j["choices"][0];
      if (t.chat && c.contains("delta") && c["delta"].is_object()) {
        const json& d = c["delta"];
        if (d.contains("content") && d["content"].is_string()) t.text_bytes += d["content"].get_ref<const std::string&>().size();
        role_only = d.contains("role") && (!d.contains("content") || d["content"] == "") && c["finish_reason"].is_null();
      } else if (c.contains("text") && c["text"].is_string()) {
        t.text_bytes += c["text"].get_ref<const std::string&>().size();
      }
    }
    if (t.resumed && role_only) return "";  // the client had the role chunk from the first attempt
    if (j.contains("id") && j["id"].is_string()) {
      if (t.id.empty()) t.id = j["id"].get<std::string>();
      else j["id"] = t.id;
    }
    return j.dump();
  }

  std::string on_json(router::Hooks::Ticket& tb, const std::string& body) override {
    auto& t = static_cast<Req&>(tb);
    json j = json::parse(body, nullptr, false);
    if (!j.is_object()) return body;
    std::lock_guard<std::mutex> lk(t.mu);
    if (auto it = j.find("larder"); it != j.end()) {
      if (it->is_object() && it->contains("token_ids") && (*it)["token_ids"].is_array()) {
        for (const auto& id : (*it)["token_ids"])
          if (id.is_number_integer()) t.gen.push_back(id.get<int32_t>());
        t.n_tokens = static_cast<int>((*it)["token_ids"].size());
      }
      j.erase(it);
    }
    first_token(t, now_s());  // a whole answer: its "first token" is its end
    return j.dump();
  }

  std::optional<router::Attempt> reissue(router::Hooks::Ticket& tb, const router::Attempt& failed,
                                         const std::string& why) override {
    auto& t = static_cast<Req&>(tb);
    if (!p.failover) return std::nullopt;
    const double now = now_s();
    router::View v = router->view();
    const std::vector<InstanceInfo> cands = candidates(v);
    std::set<std::string> exclude;
    {
      std::lock_guard<std::mutex> lk(t.mu);
      // A request that brought down (or met the death of) this many instances stops here.
      if (t.attempts >= kMaxAttempts) return std::nullopt;
      // The instance that failed is the one the request was counted on (by id: a process
      // restarted at the same address is healthy and has another id).
      const std::string failed_id = t.decode_key;
      if (!failed_id.empty()) {
        t.failed.insert(failed_id);
        std::lock_guard<std::mutex> lk2(mu);
        inst[failed_id].suspect_until = now + 5;
      }
      exclude = t.failed;
      // A stream that already sent text continues only where the instance can resume it.
      if (t.stream && (t.text_bytes > 0 || !t.gen.empty()) && !t.tokens_ok) return std::nullopt;
    }
    if (p.verbose)
      std::fprintf(stderr, "larder conductor: %s failed (%s): re-issuing\n", failed.decode.c_str(), why.c_str());
    std::vector<InstanceView> views;
    Decision d;
    {
      std::lock_guard<std::mutex> lk(t.mu);
      d = decide(t, cands, exclude, views);
    }
    if (d.decode < 0 || d.prefill < 0) return std::nullopt;
    std::lock_guard<std::mutex> lk(mu);
    std::lock_guard<std::mutex> lk2(t.mu);
    router::Attempt a;
    a.decode = cands[d.decode].api_address;
    if (exclude.count(key_of(cands[d.decode]))) return std::nullopt;
    a.prefill = d.prefill != d.decode && !exclude.count(key_of(cands[d.prefill])) ? cands[d.prefill].api_address : "";
    const bool resume = t.stream && t.tokens_ok;
    a.body = body_for(t, resume);
    t.resumed = true;
    t.attempts++;
    n_resumes++;
    uncount_decode(t);
    uncount_prefill(t);
    count_decode(t, key_of(cands[d.decode]));
    if (t.t_first == 0)
      count_prefill(t, key_of(cands[d.prefill]), static_cast<int64_t>(t.prompt.size()) - d.cached_blocks * t.block_size);
    return a;
  }

  void on_end(router::Hooks::Ticket& tb, bool ok, int status, const std::string& error) override {
    auto& t = static_cast<Req&>(tb);
    const double now = now_s();
    std::lock_guard<std::mutex> lk(mu);
    std::lock_guard<std::mutex> lk2(t.mu);
    uncount_prefill(t);
    uncount_decode(t);
    if (t.planned_reject) return;  // counted in plan()
    if (!ok) {
      if (status == 499) n_cancelled++;
      else n_failed++;
      return;
    }
    n_ok++;
    if (pcache && t.cacheable && !t.gen.empty()) {
      // As the instances do: the reply's ids without the end-of-generation token.
      std::vector<int32_t> gen = t.gen;
      if (!gen.empty() && tok->is_eog(gen.back())) gen.pop_back();
      pcache->insert(t.prompt_text, t.enc, gen, t.add_bos, t.parse_special, /*strip_first_space=*/t.chat);
    }
    const double ttft = (t.t_first > 0 ? t.t_first : now) - t.t_start;
    const double tbt = t.n_tokens >= 2 && t.t_last > t.t_first ? (t.t_last - t.t_first) / (t.n_tokens - 1) : 0;
    ttft_hist.observe(ttft);
    if (tbt > 0) tbt_hist.observe(tbt);
    if (t.predicted_ttft > 0 && t.attempts == 1) {
      ttft_err.observe(std::abs(t.predicted_ttft - ttft) / std::max(ttft, 1e-3));
      ttft_abs_err_sum += std::abs(t.predicted_ttft - ttft);
      ttft_err_n++;
    }
    if (p.verbose)
      std::fprintf(stderr, "larder conductor: done on %s: prompt %zu (cached %d%s), TTFT predicted %.0f ms, measured %.0f ms; TBT %.1f ms\n",
                   t.prefill_key.c_str(), t.prompt.size(), t.cached_tokens, t.fetch ? ", fetched" : "",
                   t.predicted_ttft * 1e3, ttft * 1e3, tbt * 1e3);
    const bool met = (p.policy.slo.ttft_s <= 0 || ttft <= p.policy.slo.ttft_s) &&
                     (p.policy.slo.tbt_s <= 0 || tbt <= p.policy.slo.tbt_s);
    if (met) {
      n_goodput++;
      goodput_times.push_back(now);
    }
    while (!goodput_times.empty() && goodput_times.front() < now - 60) goodput_times.pop_front();
    // Refit the prefill instance's cost model on clean samples: nothing of ours queued ahead,
    // no fetch, the first attempt, streamed (so the first token's time is the prefill's).
    if (t.stream && t.queue_empty && !t.fetch && t.attempts == 1 && t.t_first > 0 && !t.prefill_key.empty()) {
      InstState& s = inst[t.prefill_key];
      const double n_new = std::max<double>(1, static_cast<double>(t.prompt.size()) - t.cached_tokens);
      s.fitter.add_prefill(n_new, t.cached_tokens, ttft);
      if (tbt > 0) s.fitter.add_decode(t.batch + 1, 0, tbt);
      s.model = s.fitter.fit(s.fitted ? s.model : CostModel{});
      s.fitted = s.fitter.n_prefill() >= 8;
    }
    (void)error;
  }

  void render_metrics(std::string& out) override {
    std::lock_guard<std::mutex> lk(mu);
    prom::header(out, "larder_conductor_requests_total", "counter", "generation requests by outcome");
    out += "larder_conductor_requests_total{outcome=\"ok\"} " + std::to_string(n_ok) + "\n";
    out += "larder_conductor_requests_total{outcome=\"failed\"} " + std::to_string(n_failed) + "\n";
    out += "larder_conductor_requests_total{outcome=\"cancelled\"} " + std::to_string(n_cancelled) + "\n";
    out += "larder_conductor_requests_total{outcome=\"rejected\"} " + std::to_string(n_rejected) + "\n";
    out += "larder_conductor_requests_total{outcome=\"unavailable\"} " + std::to_string(n_unavailable) + "\n";
    prom::scalar(out, "larder_conductor_rejections_total", "counter",
                 "requests rejected at once (429) because no instance could meet the SLO", n_rejected);
    prom::scalar(out, "larder_conductor_goodput_requests_total", "counter",
                 "completed requests that met both SLOs (TTFT and TBT)", n_goodput);
    prom::scalar(out, "larder_conductor_goodput_per_second", "gauge",
                 "requests per second that met both SLOs, over the last 60 s", goodput_times.size() / 60.0);
    prom::scalar(out, "larder_conductor_resumes_total", "counter",
                 "requests re-issued to another instance after theirs failed (streams resumed)", n_resumes);
    prom::scalar(out, "larder_conductor_fetch_routes_total", "counter",
                 "requests routed with a fetch of leading blocks from another instance", n_fetch);
    prom::scalar(out, "larder_conductor_prompt_tokens_total", "counter", "prompt tokens routed", prompt_tokens);
    prom::scalar(out, "larder_conductor_predicted_cached_tokens_total", "counter",
                 "prompt tokens the routing expected not to compute (held by the instance or fetched)", predicted_cached);
    prom::header(out, "larder_conductor_ttft_seconds", "histogram", "measured time to first token");
    ttft_hist.render(out, "larder_conductor_ttft_seconds");
    prom::header(out, "larder_conductor_tbt_seconds", "histogram", "measured mean time between tokens per request");
    tbt_hist.render(out, "larder_conductor_tbt_seconds");
    prom::header(out, "larder_conductor_ttft_prediction_error_ratio", "histogram",
                 "|predicted - measured| / measured TTFT");
    ttft_err.render(out, "larder_conductor_ttft_prediction_error_ratio");
    prom::scalar(out, "larder_conductor_ttft_prediction_abs_error_seconds", "gauge",
                 "mean |predicted - measured| TTFT", ttft_err_n ? ttft_abs_err_sum / ttft_err_n : 0);
    prom::header(out, "larder_conductor_instance_inflight", "gauge", "requests of ours decoding on each instance");
    for (auto& [k, s] : inst)
      out += "larder_conductor_instance_inflight{instance=\"" + prom::escape_label(k) + "\"} " +
             std::to_string(s.running) + "\n";
    prom::header(out, "larder_conductor_instance_queued_prefill_tokens", "gauge",
                 "prompt tokens of ours queued on each instance");
    for (auto& [k, s] : inst)
      out += "larder_conductor_instance_queued_prefill_tokens{instance=\"" + prom::escape_label(k) + "\"} " +
             std::to_string(s.prefill_tokens) + "\n";
    prom::header(out, "larder_conductor_index_blocks", "gauge", "KV blocks the index says each instance holds, by medium");
    for (auto& [k, c] : index.counts())
      for (auto [m, n] : {std::pair{"L1", c.l1}, std::pair{"DRAM", c.dram}, std::pair{"SSD", c.disk}})
        out += "larder_conductor_index_blocks{instance=\"" + prom::escape_label(k) + "\",medium=\"" + m + "\"} " +
               std::to_string(n) + "\n";
    if (subs) {
      prom::header(out, "larder_conductor_kv_event_batches_total", "counter", "KV event batches applied, per instance");
      std::string gaps, replays, resets, lost;
      for (const auto& id : subs->ids()) {
        auto st = subs->stats(id);
        if (!st) continue;
        const std::string l = "{instance=\"" + prom::escape_label(id) + "\"} ";
        out += "larder_conductor_kv_event_batches_total" + l + std::to_string(st->batches) + "\n";
        gaps += "larder_conductor_kv_event_gaps_total" + l + std::to_string(st->gaps) + "\n";
        replays += "larder_conductor_kv_event_replays_total" + l + std::to_string(st->replays) + "\n";
        resets += "larder_conductor_kv_event_resets_total" + l + std::to_string(st->resets) + "\n";
        lost += "larder_conductor_kv_event_lost_total" + l + std::to_string(st->lost) + "\n";
      }
      prom::header(out, "larder_conductor_kv_event_gaps_total", "counter", "holes seen in an instance's event stream");
      out += gaps;
      prom::header(out, "larder_conductor_kv_event_replays_total", "counter", "replay requests to an instance");
      out += replays;
      prom::header(out, "larder_conductor_kv_event_resets_total", "counter", "instance restarts seen (index resynced)");
      out += resets;
      prom::header(out, "larder_conductor_kv_event_lost_total", "counter", "event batches an instance could no longer replay");
      out += lost;
    }
  }

  void health(nlohmann::json& j) override {
    nlohmann::json ix = nlohmann::json::object();
    ix["blocks"] = index.n_blocks();
    int synced = 0, total = 0;
    {
      std::lock_guard<std::mutex> lk(mu);
      for (auto& [id, ep] : subscribed) {
        total++;
        synced += subs && subs->synced(id);
      }
    }
    ix["instances"] = total;
    ix["synced"] = synced;
    j["index"] = ix;
    j["policy"] = policy_name(p.policy.kind);
  }

  // POST /internal/conductor/explain {"path": "/v1/completions", "request": {...}}: the prompt's
  // token count and block names, what each instance holds of it, and the decision (nothing is
  // dispatched or counted).
  bool internal(const std::string& what, const std::string& body, int& status, std::string& out) override {
    if (what != "explain") return false;
    nlohmann::json in = nlohmann::json::parse(body, nullptr, false);
    if (!in.is_object() || !in.contains("request")) {
      status = 400;
      out = R"({"error":{"message":"want {\"path\": ..., \"request\": {...}}","type":"invalid_request_error","param":null,"code":null}})";
      return true;
    }
    Req t;
    t.chat = in.value("path", std::string("/v1/completions")).find("chat") != std::string::npos;
    t.body = json::parse(in["request"].dump());
    t.tokens_ok = build_prompt(t.body, t.chat, t.prompt, t.max_tokens, t.stream);
    router::View v = router->view();
    const std::vector<InstanceInfo> cands = candidates(v);
    std::vector<InstanceView> views;
    Decision d = decide(t, cands, {}, views);
    nlohmann::json j = nlohmann::json::object();
    j["tokenized"] = t.tokens_ok;
    j["prompt_tokens"] = t.prompt.size();
    nlohmann::json names = nlohmann::json::array();
    for (const auto& i : cands) {
      Identity id = identity_of(i);
      if (!id.ok) continue;
      for (const auto& h : chain(id.id, t.prompt)) names.push_back(h.hex());
      break;
    }
    j["names"] = names;
    nlohmann::json inst_j = nlohmann::json::object();
    std::vector<kvcache::BlockHash> chain0;
    for (size_t i = 0; i < cands.size(); ++i) {
      Identity id = identity_of(cands[i]);
      std::vector<Holding> h;
      if (id.ok) h = index.holdings(chain(id.id, t.prompt), {key_of(cands[i])});
      nlohmann::json e = nlohmann::json::object();
      e["api"] = cands[i].api_address;
      e["l1"] = h.empty() ? 0 : h[0].l1;
      e["dram"] = h.empty() ? 0 : h[0].dram;
      e["disk"] = h.empty() ? 0 : h[0].disk;
      e["synced"] = subs && subs->synced(key_of(cands[i]));
      e["weight"] = views[i].weight;
      // The load terms of its prediction: sequences (ours and others'), prompt tokens queued,
      // and the wait those make.
      e["running"] = views[i].running;
      e["waiting"] = views[i].waiting;
      e["queued_prefill_tokens"] = views[i].queued_prefill_tokens;
      e["queue_s"] = predict_queue_s(views[i]);
      const CostModel& cm = views[i].cost;  // what routing uses now (fitted from this run's requests once it has enough)
      e["cost"] = {{"a", cm.a}, {"b", cm.b}, {"c", cm.c}, {"d0", cm.d0}, {"d1", cm.d1}, {"d2", cm.d2}};
      {
        std::lock_guard<std::mutex> lk(mu);
        auto it = inst.find(key_of(cands[i]));
        e["cost_fitted"] = it != inst.end() && it->second.fitted;
        e["cost_samples"] = it != inst.end() ? it->second.fitter.n_prefill() : 0;
      }
      e["predicted_ttft_s"] = views[i].can_prefill ? predict_ttft(p.policy, RequestView{static_cast<int>(t.prompt.size()),
                                                     t.max_tokens, t.block_size, id.block_bytes, 0},
                                                     views[i], h.empty() ? 0 : h[0].total(), 0,
                                                     h.empty() ? 0 : h[0].dram, h.empty() ? 0 : h[0].disk)
                                                : 0.0;
      inst_j[key_of(cands[i])] = e;
    }
    j["instances"] = inst_j;
    nlohmann::json dj = nlohmann::json::object();
    auto name_of = [&](int k) { return k >= 0 ? nlohmann::json(key_of(cands[k])) : nlohmann::json(nullptr); };
    dj["prefill"] = name_of(d.prefill);
    dj["decode"] = name_of(d.decode);
    dj["fetch_from"] = name_of(d.fetch_from);
    dj["fetch_blocks"] = d.fetch_blocks;
    dj["cached_blocks"] = d.cached_blocks;
    dj["predicted_ttft_s"] = d.predicted_ttft_s;
    dj["predicted_tbt_s"] = d.predicted_tbt_s;
    dj["reject"] = d.reject;
    dj["reason"] = d.reason;
    j["decision"] = dj;
    status = 200;
    out = j.dump();
    return true;
  }

  // ------------------------------------------------------------------ membership -> subscriptions
  void sync_once() {
    if (!router || !subs) return;
    router::View v = router->view();
    std::map<std::string, InstanceInfo> now;
    for (const auto& i : candidates(v))
      if (!i.id.empty() && !i.kv_events.empty()) now[i.id] = i;
    std::vector<std::string> gone;
    {
      std::lock_guard<std::mutex> lk(mu);
      for (auto& [id, ep] : subscribed)
        if (!now.count(id) || now[id].kv_events != ep) gone.push_back(id);
    }
    for (const auto& id : gone) {
      (void)subs->remove(id);
      index.clear(id);  // its lease ended (or it moved): its blocks are no longer reachable
      std::lock_guard<std::mutex> lk(mu);
      subscribed.erase(id);
      if (p.verbose) std::fprintf(stderr, "larder conductor: instance %s left; index entries purged\n", id.c_str());
    }
    for (auto& [id, i] : now) {
      {
        std::lock_guard<std::mutex> lk(mu);
        if (subscribed.count(id)) continue;
        subscribed[id] = i.kv_events;
      }
      if (Status st = subs->add(id, i.kv_events, i.kv_replay); !st.ok()) {
        std::fprintf(stderr, "larder conductor: cannot follow KV events of %s (%s): %s\n", id.c_str(),
                     i.kv_events.c_str(), st.error().c_str());
        std::lock_guard<std::mutex> lk(mu);
        subscribed.erase(id);  // retried on the next pass
        continue;
      }
      if (p.verbose) std::fprintf(stderr, "larder conductor: following KV events of %s at %s\n", id.c_str(), i.kv_events.c_str());
    }
    // Instances gone from the view: drop their accounting once nothing of ours is there.
    std::lock_guard<std::mutex> lk(mu);
    std::set<std::string> keys;
    for (const auto& i : candidates(v)) keys.insert(key_of(i));
    for (auto it = inst.begin(); it != inst.end();)
      if (!keys.count(it->first) && it->second.running == 0 && it->second.prefill_tokens == 0) it = inst.erase(it);
      else ++it;
  }

  void sync_loop() {
    while (!stopping.load()) {
      sync_once();
      std::unique_lock<std::mutex> lk(sync_mu);
      sync_cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return stopping.load(); });
    }
  }

  bool all_synced() {
    std::lock_guard<std::mutex> lk(mu);
    for (auto& [id, ep] : subscribed)
      if (!subs->synced(id)) return false;
    return true;
  }
};

Result<std::unique_ptr<Conductor>> Conductor::start(ConductorParams p) {
  auto shared = std::make_shared<Impl>();
  Impl& I = *shared;
  I.p = std::move(p);
  if (!I.p.model_path.empty()) {
    const std::string& mp = I.p.model_path;
    const bool is_gguf = mp.size() > 5 && mp.substr(mp.size() - 5) == ".gguf";
    if (is_gguf) {
      // Only the tokenizer and the chat template: the weights are never read.
      auto g = GgufFile::open(mp);
      if (!g.ok()) return make_error("--model %s: %s", mp.c_str(), g.error().c_str());
      I.gguf = g.value();
      auto t = load_tokenizer_gguf(*I.gguf);
      if (!t.ok()) return make_error("--model %s: tokenizer: %s", mp.c_str(), t.error().c_str());
      I.tok_own = std::move(t.value());
      I.tok = I.tok_own.get();
      std::string arch = I.gguf->get_string("general.architecture").value_or("llama");
      auto ct = model_chat_template(I.gguf->get_string("tokenizer.chat_template"), arch);
      if (ct.ok()) {
        I.tmpl.emplace(std::move(ct->tmpl));
        auto src = I.gguf->get_string("tokenizer.chat_template");
        I.template_has_tools = !ct->builtin && src && src->find("tools") != std::string::npos;
      }
    } else {
      auto m = load_model(mp, I.p.tokenizer_path);
      if (!m.ok()) return make_error("--model %s: %s", mp.c_str(), m.error().c_str());
      I.model = std::move(m.value());
      I.tok = I.model->tokenizer.get();
      auto ct = model_chat_template(std::nullopt, I.model->cfg.arch);
      if (ct.ok()) I.tmpl.emplace(std::move(ct->tmpl));
    }
    if (I.tok && I.p.prompt_cache_entries > 0) {
      server::PromptCacheParams pc;
      pc.max_entries = I.p.prompt_cache_entries;
      pc.echo_replies = I.p.prompt_cache_echo;
      I.pcache = std::make_unique<server::PromptCache>(*I.tok, pc);
      if (!I.pcache->enabled()) I.pcache.reset();
    }
  }
  I.calibration = I.p.prior;
  Impl* raw = &I;
  auto subs = kvevents::SubscriberSet::start(
      kvevents::SubscriberParams{},
      [raw](const std::string& id, int64_t, const kvevents::EventBatch& b) { raw->index.apply(id, b); },
      [raw](const std::string& id) { raw->index.clear(id); });
  if (!subs.ok()) return make_error("KV events: %s", subs.error().c_str());
  I.subs = std::move(subs.value());
  auto r = router::Router::start(I.p.http, nullptr, shared);
  if (!r.ok()) return r.take_error();
  I.router = std::move(r.value());
  I.sync_once();
  // Route by the index only once it has caught up (snapshot + replay of every instance).
  const double deadline = now_s() + I.p.sync_wait_s;
  while (!I.all_synced() && now_s() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  I.sync_thread = std::thread([raw] { raw->sync_loop(); });
  auto c = std::unique_ptr<Conductor>(new Conductor());
  c->keep_ = shared;
  c->impl_raw_ = raw;
  return c;
}

Conductor::~Conductor() { stop(); }

int Conductor::port() const { return impl_raw_->router->port(); }
void Conductor::begin_drain() { impl_raw_->router->begin_drain(); }
int Conductor::active() const { return impl_raw_->router->active(); }

void Conductor::stop() {
  Impl& I = *impl_raw_;
  if (I.stopping.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lk(I.sync_mu);
  }
  I.sync_cv.notify_all();
  if (I.sync_thread.joinable()) I.sync_thread.join();
  if (I.router) I.router->stop();
  I.subs.reset();
  I.router.reset();  // it holds the hooks (this Impl): break the cycle
}

std::vector<kvcache::BlockHash> Conductor::names(const std::vector<int32_t>& tokens) const {
  Impl& I = *impl_raw_;
  for (const auto& i : Impl::candidates(I.router->view())) {
    auto id = Impl::identity_of(i);
    if (id.ok) return Impl::chain(id.id, tokens);
  }
  return {};
}

const KvIndex& Conductor::index() const { return impl_raw_->index; }

}  // namespace larder::conductor
