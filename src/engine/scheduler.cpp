#include "engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace larder {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
    default: return "none";
  }
}

struct Scheduler::Seq {
  uint64_t id = 0;
  GenRequest req;
  TokenCallback cb;
  std::vector<int32_t> tokens;  // prompt + generated; KV of [0, n_computed) is in the cache
  int n_prompt = 0;
  int n_generated = 0;
  int n_computed = 0;
  int cached_tokens = 0;        // prefix hit at first admission (reported in usage)
  bool admitted_once = false;
  bool in_cache = false;        // has blocks in the block manager
  std::unique_ptr<Sampler> sampler;
  std::vector<float> logits;    // [vocab] logits after the last computed token
  uint64_t arrival = 0;         // admission order for "youngest"
  // Blocks coming from L2/L3: job->keys[i] goes into block load_block0 + i.
  std::shared_ptr<kvcache::LoadJob> load;
  size_t load_next = 0;
  int load_block0 = 0;
  bool count_hits = false;      // first admission: loaded tokens count as cached
  bool remote = false;          // waiting for the prompt's KV from a prefill instance (req.kv_source)
  // Speculative decoding: the drafter's handle (-1 = not started), this step's draft (its nodes'
  // blocks reserved; empty = none) and the verify pass's inputs.
  int spec_handle = -1;
  std::unique_ptr<spec::LengthControl> spec_len;
  int spec_k = 0;
  spec::Draft draft;
  std::vector<int32_t> v_tokens, v_pos;
  AttnMask v_mask;
  // Documents (req.docs, a mode other than sequential): the layout, APE's attention and positions
  // of the tokens after them (parallel mode), what the composition reused and recomputed.
  bool composed = false;
  docs::Layout lay;
  SegAttn seg;
  std::vector<int32_t> d_pos;
  int doc_reused = 0, doc_recomputed = 0;
  double doc_fraction = 0;
  bool composes() const { return req.docs && req.docs->params.mode != docs::Mode::Sequential; }
  bool parallel() const { return req.docs && req.docs->params.mode == docs::Mode::Parallel; }
  void fill(TokenEvent& ev) const {
    if (!req.docs) return;
    ev.doc_tokens = lay.doc_tokens();
    ev.doc_reused_tokens = doc_reused;
    ev.doc_recomputed_tokens = doc_recomputed;
    ev.doc_recompute_fraction = doc_fraction;
  }
};

Result<std::unique_ptr<Scheduler>> Scheduler::create(const Model& model, const SchedulerParams& p) {
  if (p.parallel <= 0 || p.parallel > 1024) return make_error("--parallel must be in 1..1024");
  if (p.max_queue < 0) return make_error("queue size must be >= 0");
  if (p.step_tokens <= 0) return make_error("step token budget must be positive");
  if (p.block_size <= 0 || p.block_size > 1024) return make_error("invalid KV block size %d", p.block_size);
  int max_seq = p.max_seq_len > 0 ? p.max_seq_len : std::min(model.cfg.n_ctx_train, 4096);
  const int blocks_per_seq = (max_seq + p.block_size - 1) / p.block_size;
  int kv_blocks = p.kv_blocks > 0 ? p.kv_blocks : p.parallel * blocks_per_seq;
  if (kv_blocks < blocks_per_seq)
    return make_error("%d KV blocks of %d tokens cannot hold one sequence of %d tokens", kv_blocks, p.block_size, max_seq);
  ContextParams cp;
  cp.n_ctx = kv_blocks * p.block_size;
  cp.block_size = p.block_size;
  cp.max_seq_len = max_seq;
  cp.n_batch = std::max(p.step_tokens, p.parallel);
  cp.n_threads = p.n_threads;
  cp.w8a8 = p.w8a8;
  cp.type_k = p.type_k;
  cp.type_v = p.type_v;
  cp.ffn = p.ffn;
  LARDER_TRY(ctx, Context::create(model, cp));
  auto s = std::unique_ptr<Scheduler>(new Scheduler(model, p, std::move(ctx), max_seq, kv_blocks));
  if (p.store.dram_bytes > 0 || !p.store.disk_dir.empty()) {
    kvcache::KvLayout layout;
    layout.model_id = s->blocks_identity_;
    layout.n_layer = model.cfg.n_layer;
    layout.kv_dim = model.cfg.n_head_kv * model.cfg.head_dim;
    layout.block_size = p.block_size;
    layout.group = model.cfg.head_dim;
    layout.k_type = p.type_k;
    layout.v_type = p.type_v;
    LARDER_ASSERT(layout.block_bytes() == s->ctx_->block_bytes());
    LARDER_TRY(store, kvcache::KvStore::open(layout, p.store));
    s->store_ = std::move(store);
    Scheduler* raw = s.get();
    s->store_->set_notify([raw] { raw->cv_.notify_all(); });
    if (s->store_->has_dram())
      s->blocks_.set_evict_hook([raw](kvcache::BlockId b, const kvcache::BlockHash& h) {
        std::vector<uint8_t> payload(raw->ctx_->block_bytes());
        raw->ctx_->read_block(b, payload.data());
        raw->store_->put_evicted(h, payload);
      });
    s->refresh_stats_locked();
  }
  if (p.block_listener) {
    s->blocks_.set_listener(p.block_listener);
    if (s->store_) s->store_->set_listener(p.block_listener);
  }
  if (p.drafter) {
    if (p.spec_max < 1 || p.spec_max > 64) return make_error("--spec-max must be 1..64");
    s->st_.drafter = p.drafter->name();
    s->calibrate_cost();
  }
  s->thread_ = std::thread([raw = s.get()] { raw->loop(); });
  return s;
}

kvcache::CacheIdentity Scheduler::cache_identity() const {
  return kvcache::CacheIdentity{blocks_identity_, kv_types_name(params_.type_k, params_.type_v), params_.block_size};
}

Scheduler::Scheduler(const Model& m, const SchedulerParams& p, std::unique_ptr<Context> ctx, int max_seq_len,
                     int kv_blocks)
    : model_(m),
      params_(p),
      ctx_(std::move(ctx)),
      blocks_identity_(m.cfg.name + "#" + m.fingerprint() + "#" + std::to_string(m.weight_bytes()) +
                       (p.ffn ? "#" + p.ffn->identity() : std::string())),
      blocks_(kv_blocks, kvcache::CacheIdentity{blocks_identity_, kv_types_name(p.type_k, p.type_v), p.block_size}),
      max_seq_len_(max_seq_len) {
  params_.step_tokens = std::max(p.step_tokens, p.parallel);
  refresh_stats_locked();  // so /metrics is right before the first request (no other thread yet)
}

Scheduler::~Scheduler() { shutdown(false); }

Result<uint64_t> Scheduler::submit(GenRequest req, TokenCallback cb) {
  if (req.prompt.empty()) return make_error("the prompt is empty");
  for (int32_t t : req.prompt)
    if (t < 0 || t >= model_.cfg.n_vocab) return make_error("token id %d is out of range", t);
  if (req.max_tokens < 0) return make_error("max_tokens must be >= 0");
  if (req.n_logprobs < 0 || req.n_logprobs > 20) return make_error("logprobs must be in 0..20");
  if (static_cast<int64_t>(req.prompt.size()) + std::max(req.max_tokens, 1) > max_seq_len_)
    return make_error("this request needs %zu prompt + %d completion tokens, more than the context of %d tokens",
                      req.prompt.size(), req.max_tokens, max_seq_len_);
  if (req.docs) {
    const DocRequest& d = *req.docs;
    LARDER_CHECK_STATUS(d.params.validate());
    int64_t n = d.prefix;
    for (int len : d.doc_len) {
      if (len <= 0) return make_error("a document is empty");
      n += len;
    }
    if (d.prefix < 0 || n > static_cast<int64_t>(req.prompt.size()))
      return make_error("the documents' layout does not fit the prompt");
    if (n == static_cast<int64_t>(req.prompt.size()) && req.max_tokens > 0)
      return make_error("a prompt with documents needs a query after them (or max_tokens 0 to only store them)");
    if (d.params.mode == docs::Mode::Parallel) req.spec_max = 0;  // drafts would need APE positions
  }
  auto s = std::make_unique<Seq>();
  s->tokens = req.prompt;
  s->n_prompt = static_cast<int>(req.prompt.size());
  s->sampler = std::make_unique<Sampler>(req.sampling, model_.cfg.n_vocab);
  s->logits.resize(model_.cfg.n_vocab);
  s->req = std::move(req);
  s->cb = std::move(cb);
  std::lock_guard<std::mutex> lk(mu_);
  if (stopping_) return make_error("the server is shutting down");
  if (static_cast<int>(waiting_.size()) >= params_.max_queue)
    return make_error("queue full: %zu requests waiting", waiting_.size());
  s->id = next_id_++;
  const uint64_t id = s->id;
  // Serving another instance's fetch is short (its KV is cached here) and holds that
  // instance's request up: it goes first and does not wait for a free slot.
  if (s->req.serves_fetch) waiting_.push_front(std::move(s));
  else waiting_.push_back(std::move(s));
  st_.waiting = static_cast<int>(waiting_.size());
  cv_.notify_all();
  return id;
}

void Scheduler::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancelled_.push_back(id);
  cv_.notify_all();
}

void Scheduler::shutdown(bool drain) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    draining_ = drain;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  {
    std::lock_guard<std::mutex> lk(mu_);
    s = st_;
  }
  // Read when asked (e.g. /metrics), not on every step: the tiers have their own locks.
  if (store_) s.store = store_->stats();
  return s;
}

void Scheduler::finish(Seq& s, FinishReason r, const std::string& err) {
  if (r != FinishReason::None && s.cb) {
    TokenEvent ev;
    ev.finish = r;
    ev.error = err;
    ev.prompt_tokens = s.n_prompt;
    ev.cached_tokens = s.cached_tokens;
    ev.completion_tokens = s.n_generated;
    s.fill(ev);
    s.cb(ev);
  }
  if (s.load) {
    s.load->cancelled = true;
    s.load.reset();
  }
  if (s.spec_handle >= 0 && params_.drafter) {
    params_.drafter->finish(s.spec_handle, std::span<const int32_t>(s.tokens).subspan(s.n_prompt), r == FinishReason::None);
    s.spec_handle = -1;
  }
  const auto id = static_cast<kvcache::SeqId>(s.id);
  if (s.req.kv_sink) {
    // Prefill side of a handoff: the blocks stay until what reads them has finished.
    std::vector<kvcache::BlockHash> names;
    if (s.in_cache) {
      const auto& table = blocks_.block_table(id);
      const int n_full = std::min(s.n_computed, s.n_prompt) / params_.block_size;
      for (int j = 0; j < n_full; ++j) {
        auto h = blocks_.block_hash(table[j]);
        if (!h) break;
        names.push_back(*h);
      }
    }
    auto sink = s.req.kv_sink;
    s.req.kv_sink.reset();
    sink->on_end(std::move(names));
    if (s.in_cache) held_.push_back({id, [sink] { return sink->release_ready(); }});
  } else if (s.remote) {
    // Decode side, handoff unfinished: blocks stay until no remote write can land in them.
    auto src = s.req.kv_source;
    s.req.kv_source.reset();
    s.remote = false;
    src->abort();
    if (s.in_cache) held_.push_back({id, [src] { return src->quiesced(); }});
  } else if (s.in_cache) {
    blocks_.release(id);
  }
  s.in_cache = false;
}

void Scheduler::release_held() {
  for (size_t i = 0; i < held_.size();) {
    if (held_[i].ready()) {
      blocks_.release(held_[i].id);
      held_[i] = std::move(held_.back());
      held_.pop_back();
    } else {
      ++i;
    }
  }
}

void Scheduler::poll_remote(std::vector<Seq*>& done, std::vector<Seq*>& evicted) {
  for (size_t i = 0; i < running_.size(); ++i) {
    Seq* s = running_[i].get();
    if (!s->remote) continue;
    RemoteFirst first;
    std::string err;
    const KvSource::State state = s->req.kv_source->poll(&first, &err);
    if (state == KvSource::State::Pending) continue;
    auto src = std::move(s->req.kv_source);
    s->req.kv_source.reset();
    s->remote = false;
    const int covers = src->covers();
    if (covers >= 0) {
      // A fetch of leading blocks: on success they count as cached; either way the rest of
      // the prompt is computed here (a failed fetch only costs the time it took).
      if (state == KvSource::State::Done && covers > s->n_computed) {
        const auto& table = blocks_.block_table(static_cast<kvcache::SeqId>(s->id));
        if (s->req.kv_sink) s->req.kv_sink->on_kv(-1, s->n_computed, covers, table);
        const int got = covers - s->n_computed;
        s->n_computed = covers;
        std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>> named;
        blocks_.mark_computed(static_cast<kvcache::SeqId>(s->id), s->n_computed, store_ ? &named : nullptr);
        if (store_ && !named.empty()) write_back(named);
        std::lock_guard<std::mutex> lk(mu_);
        st_.remote_done++;
        st_.fetched_tokens += got;
        if (s->count_hits) {
          s->cached_tokens += got;
          st_.prefix_hit_tokens += got;
        }
      } else {
        std::lock_guard<std::mutex> lk(mu_);
        st_.remote_failed++;
        st_.remote_fallbacks++;
      }
      continue;
    }
    if (state == KvSource::State::Failed) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        st_.remote_failed++;
        if (src->fallback_local()) st_.remote_fallbacks++;
      }
      if (!src->fallback_local()) {
        finish(*s, FinishReason::Error, "the prefill instance failed: " + err);
        done.push_back(s);
      }
      continue;  // else: computed here from its cached prefix on, in the reserved blocks
    }
    s->n_computed = s->n_prompt;
    std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>> named;
    blocks_.mark_computed(static_cast<kvcache::SeqId>(s->id), s->n_computed, store_ ? &named : nullptr);
    if (store_ && !named.empty()) write_back(named);
    {
      std::lock_guard<std::mutex> lk(mu_);
      st_.remote_done++;
    }
    s->sampler->skip_draw();  // the prefill instance drew the first token
    const size_t before = running_.size();
    emit(s, first.token, nullptr, &first, done, evicted);
    if (running_.size() < before) i = static_cast<size_t>(-1);  // a preemption reordered running_: rescan
  }
}

void Scheduler::loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto work = [&] { return stopping_ || !waiting_.empty() || !running_.empty() || !cancelled_.empty(); };
      if (held_.empty()) cv_.wait(lk, work);
      else cv_.wait_for(lk, std::chrono::milliseconds(5), work);  // held blocks are polled
      if (!held_.empty() && !work()) {
        lk.unlock();
        release_held();
        std::lock_guard<std::mutex> lk2(mu_);
        refresh_stats_locked();
        continue;
      }
      if (stopping_ && !draining_) break;
      if (stopping_ && waiting_.empty() && running_.empty()) break;
    }
    step();
  }
  // Not draining: everything still queued or running ends as cancelled.
  std::deque<std::unique_ptr<Seq>> rest;
  {
    std::lock_guard<std::mutex> lk(mu_);
    rest.swap(waiting_);
  }
  for (auto& s : rest) finish(*s, FinishReason::Cancelled, "server shutting down");
  for (auto& s : running_) finish(*s, FinishReason::Cancelled, "server shutting down");
  running_.clear();
}

bool Scheduler::step() {
  if (!held_.empty()) release_held();
  // 1. Cancellations.
  // Callbacks never run under mu_: a callback may call stats().
  std::vector<uint64_t> cancelled;
  std::vector<std::unique_ptr<Seq>> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    cancelled.swap(cancelled_);
    for (uint64_t id : cancelled)
      for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
        if ((*it)->id == id) {
          dropped.push_back(std::move(*it));
          waiting_.erase(it);
          break;
        }
  }
  for (auto& d : dropped) finish(*d, FinishReason::Cancelled);
  dropped.clear();
  for (uint64_t id : cancelled)
    for (auto it = running_.begin(); it != running_.end(); ++it)
      if ((*it)->id == id) {
        finish(**it, FinishReason::Cancelled);
        running_.erase(it);
        break;
      }
  // 2. Admission: longest cached prefix reused, blocks for the rest reserved up front. Composed
  // documents' KV is not what prefill of their tokens gives: only the prefix is named or reused.
  auto name_limit = [](const Seq& q) { return q.composes() ? q.req.docs->prefix : -1; };
  std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>> doc_named;
  for (;;) {
    std::unique_ptr<Seq> s;
    std::string refuse;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (waiting_.empty()) break;
      if (static_cast<int>(running_.size()) >= params_.parallel + (waiting_.front()->req.serves_fetch ? 4 : 0)) break;
      auto plan = blocks_.prepare_add(static_cast<kvcache::SeqId>(waiting_.front()->id), waiting_.front()->tokens,
                                      waiting_.front()->req.cache_salt, name_limit(*waiting_.front()));
      if (!plan.ok()) {
        if (!running_.empty()) break;  // wait for running sequences to free blocks
        s = std::move(waiting_.front());
        waiting_.pop_front();
        refuse = "the KV cache is too small for this request: " + plan.error();
      }
    }
    if (!refuse.empty()) {
      finish(*s, FinishReason::Error, refuse);
      continue;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto plan = blocks_.prepare_add(static_cast<kvcache::SeqId>(waiting_.front()->id), waiting_.front()->tokens,
                                      waiting_.front()->req.cache_salt, name_limit(*waiting_.front()));
      LARDER_ASSERT(plan.ok());
      s = std::move(waiting_.front());
      waiting_.pop_front();
      Status st = blocks_.apply(*plan, [&](kvcache::BlockId a, kvcache::BlockId b) { ctx_->copy_block(a, b); });
      LARDER_ASSERT(st.ok());
      s->in_cache = true;
      s->n_computed = plan->n_cached_tokens;
      s->count_hits = !s->admitted_once;
      if (!s->admitted_once) {
        s->cached_tokens = plan->n_cached_tokens;
        s->admitted_once = true;
        st_.prefix_hit_tokens += plan->n_cached_tokens;
        st_.prompt_tokens += s->n_prompt;
      }
      s->arrival = ++admissions_;
      const auto& table = blocks_.block_table(static_cast<kvcache::SeqId>(s->id));
      const int covers = s->req.kv_source ? s->req.kv_source->covers() : -1;
      const bool fetch = covers >= 0 && covers > plan->n_cached_tokens && covers < s->n_prompt &&
                         covers % params_.block_size == 0;
      if (s->composes()) {
        s->req.kv_source.reset();  // composed here, at admission (below)
      } else if (s->req.kv_source && (covers < 0 ? s->n_prompt - plan->n_cached_tokens >
                                                s->req.kv_source->local_prefill_tokens()
                                          : fetch)) {
        // The rest of the prompt's KV (or of its first `covers` tokens) comes from another
        // instance into the reserved blocks.
        std::vector<kvcache::BlockHash> names;
        kvcache::BlockHash h = plan->root;
        const int bs = params_.block_size;
        for (int j = 0; j < (fetch ? covers : s->n_prompt) / bs; ++j) {
          h = kvcache::chain_hash(h, std::span<const int32_t>(s->tokens).subspan(j * bs, bs));
          names.push_back(h);
        }
        s->remote = true;
        s->req.kv_source->start(plan->n_cached_tokens, std::vector<int32_t>(table.begin(), table.end()),
                                std::move(names));
      } else {
        s->req.kv_source.reset();  // all here already
        if (store_) start_tier_load(*s, plan->root, plan->n_cached_tokens);
      }
      if (s->req.kv_sink && plan->n_cached_tokens > 0) s->req.kv_sink->on_kv(-1, 0, plan->n_cached_tokens, table);
    }
    if (s->req.docs && !s->composes()) s->lay = docs::Layout{s->req.docs->prefix, s->req.docs->doc_len};
    if (s->composes()) {
      Status st = compose_docs(*s, doc_named);
      if (!st.ok()) {
        finish(*s, FinishReason::Error, st.error());
        continue;
      }
      if (s->n_computed >= static_cast<int>(s->tokens.size())) {  // documents only: stored
        finish(*s, FinishReason::Length);
        continue;
      }
    }
    running_.push_back(std::move(s));
  }
  if (store_ && !doc_named.empty()) write_back(doc_named);
  if (running_.empty()) {
    std::lock_guard<std::mutex> lk(mu_);
    refresh_stats_locked();
    return false;
  }
  // Blocks that arrived from L2/L3 go into the pool; sequences still loading sit out.
  bool loading = false;
  for (auto& s : running_)
    if (s->load) loading |= install_loaded(*s);
  // Prompts whose KV came from a prefill instance continue with its first token.
  std::vector<Seq*> done;
  std::vector<Seq*> evicted;  // preempted during this step: their results are void
  poll_remote(done, evicted);
  auto is_done = [&](Seq* s) { return std::find(done.begin(), done.end(), s) != done.end(); };
  auto erase_done = [&] {
    running_.erase(std::remove_if(running_.begin(), running_.end(), [&](auto& r) { return is_done(r.get()); }),
                   running_.end());
  };
  // 3. The batch: decode tokens first, then prompt chunks by age, under the budget.
  std::vector<Seq*> order;
  for (auto& s : running_) {
    loading |= s->remote;
    if (!s->load && !s->remote && !is_done(s.get())) order.push_back(s.get());
  }
  std::stable_sort(order.begin(), order.end(), [](Seq* a, Seq* b) {
    const bool da = a->tokens.size() - a->n_computed == 1, db = b->tokens.size() - b->n_computed == 1;
    if (da != db) return da;
    return a->arrival < b->arrival;
  });
  int budget = params_.step_tokens;
  if (params_.drafter) plan_drafts(order, budget);
  std::vector<SeqBatch> batch;
  std::vector<Seq*> in_batch;
  std::vector<int> n_take;
  for (Seq* s : order) {
    if (!s->draft.empty()) {  // decode token + draft nodes, verified together (budget reserved by plan_drafts)
      const int k = static_cast<int>(s->v_tokens.size());
      budget -= k;
      SeqBatch sb;
      sb.tokens = s->v_tokens;
      sb.positions = s->v_pos;
      sb.mask = s->draft.is_chain() ? nullptr : &s->v_mask;
      sb.n_kv = s->n_computed;
      sb.block_table = blocks_.block_table(static_cast<kvcache::SeqId>(s->id));
      s->logits.resize(static_cast<size_t>(k) * model_.cfg.n_vocab);
      sb.logits = s->logits.data();
      sb.all_logits = true;
      batch.push_back(sb);
      in_batch.push_back(s);
      n_take.push_back(k);
      continue;
    }
    const int pending = static_cast<int>(s->tokens.size()) - s->n_computed;
    if (pending <= 0 || budget <= 0) continue;
    const int k = std::min(pending, budget);
    budget -= k;
    SeqBatch sb;
    sb.tokens = std::span<const int32_t>(s->tokens).subspan(s->n_computed, k);
    sb.n_kv = s->n_computed;
    if (s->parallel()) {  // after documents encoded in parallel: their positions, APE's attention
      s->d_pos.resize(k);
      for (int i = 0; i < k; ++i) s->d_pos[i] = s->lay.position(docs::Mode::Parallel, s->n_computed + i);
      sb.positions = s->d_pos;
      sb.seg = &s->seg;
    }
    sb.block_table = blocks_.block_table(static_cast<kvcache::SeqId>(s->id));
    sb.logits = k == pending ? s->logits.data() : nullptr;
    batch.push_back(sb);
    in_batch.push_back(s);
    n_take.push_back(k);
  }
  if (batch.empty()) {
    // Everything runnable is waiting for loads: sleep until a reader reports.
    erase_done();
    std::unique_lock<std::mutex> lk(mu_);
    if (loading) cv_.wait_for(lk, std::chrono::milliseconds(2));
    refresh_stats_locked();
    return true;
  }
  int batch_tokens = 0, batch_prompt = 0;
  for (size_t i = 0; i < in_batch.size(); ++i) {
    batch_tokens += n_take[i];
    if (in_batch[i]->n_computed < in_batch[i]->n_prompt) batch_prompt += n_take[i];
  }
  // A prefill instance's sequences send each layer's KV as soon as it is in the pool.
  bool any_sink = false;
  for (Seq* s : in_batch) any_sink |= s->req.kv_sink != nullptr;
  if (any_sink)
    ctx_->set_layer_hook([&](int layer) {
      for (size_t i = 0; i < in_batch.size(); ++i)
        if (in_batch[i]->req.kv_sink)
          in_batch[i]->req.kv_sink->on_kv(layer, in_batch[i]->n_computed, in_batch[i]->n_computed + n_take[i],
                                          batch[i].block_table);
    });
  const auto t_step = std::chrono::steady_clock::now();
  Status st = ctx_->decode_batch(batch);
  if (any_sink) ctx_->set_layer_hook({});
  if (st.ok() && params_.drafter)
    observe_cost(batch_tokens, std::chrono::duration<double>(std::chrono::steady_clock::now() - t_step).count());
  if (st.ok() && batch_tokens >= 32 && 2 * batch_prompt >= batch_tokens) {
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_step).count();
    const double rate = batch_tokens / std::max(dt, 1e-6);
    prefill_rate_ = prefill_rate_ > 0 ? 0.8 * prefill_rate_ + 0.2 * rate : rate;
  }
  std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>> named;
  if (st.ok()) {
    // Counted before any callback runs, so a client that reads /metrics right after its
    // answer sees its own prompt tokens.
    int computed_prompt = 0;
    for (size_t i = 0; i < in_batch.size(); ++i)
      computed_prompt += std::max(0, std::min(in_batch[i]->n_computed + n_take[i], in_batch[i]->n_prompt) -
                                         in_batch[i]->n_computed);
    std::lock_guard<std::mutex> lk(mu_);
    st_.computed_prompt_tokens += computed_prompt;
  }
  for (size_t i = 0; i < in_batch.size(); ++i) {
    Seq* s = in_batch[i];
    if (std::find(evicted.begin(), evicted.end(), s) != evicted.end()) continue;
    if (!st.ok()) {
      finish(*s, FinishReason::Error, st.error());
      done.push_back(s);
      continue;
    }
    if (!s->draft.empty()) {
      accept_drafts(s, done, evicted, store_ ? &named : nullptr);
      continue;
    }
    s->n_computed += n_take[i];
    blocks_.mark_computed(static_cast<kvcache::SeqId>(s->id), s->n_computed, store_ ? &named : nullptr);
    if (s->n_computed < static_cast<int>(s->tokens.size())) continue;  // still prefilling
    // 4. Sample, report, and make room for the new token.
    emit(s, s->sampler->sample(s->logits.data(), s->tokens), s->logits.data(), nullptr, done, evicted);
  }
  erase_done();
  if (store_) write_back(named);
  std::lock_guard<std::mutex> lk(mu_);
  st_.steps++;
  if (params_.ffn) {
    st_.has_ffn = true;
    st_.ffn = params_.ffn->stats();
  }
  refresh_stats_locked();
  return true;
}

void Scheduler::emit(Seq* s, int32_t tok, const float* logits, const RemoteFirst* remote, std::vector<Seq*>& done,
                     std::vector<Seq*>& evicted) {
  if (report(s, tok, logits, remote, done)) return;
  make_room(s, tok, done, evicted);
}

bool Scheduler::report(Seq* s, int32_t tok, const float* logits, const RemoteFirst* remote, std::vector<Seq*>& done) {
  TokenEvent ev;
  ev.prompt_tokens = s->n_prompt;
  ev.cached_tokens = s->cached_tokens;
  ev.sampled = tok;
  s->fill(ev);
  if (s->req.n_logprobs > 0 && remote) {
    ev.logprob = remote->logprob;
    ev.top = remote->top;
  } else if (s->req.n_logprobs > 0) {
    const float* lg = logits;
    const int V = model_.cfg.n_vocab;
    float mx = lg[0];
    for (int v = 1; v < V; ++v) mx = std::max(mx, lg[v]);
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v] - mx));
    const float lse = mx + static_cast<float>(std::log(sum));
    ev.logprob = lg[tok] - lse;
    std::vector<int32_t> idx(V);
    for (int v = 0; v < V; ++v) idx[v] = v;
    const int k = std::min(s->req.n_logprobs, V);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) { return lg[a] > lg[b]; });
    for (int j = 0; j < k; ++j) ev.top.emplace_back(idx[j], lg[idx[j]] - lse);
  }
  const bool eog = model_.tokenizer->is_eog(tok) && !s->req.ignore_eos;
  if (eog) {
    ev.finish = FinishReason::Stop;
  } else {
    ev.token = tok;
    s->n_generated++;
    if (s->n_generated >= s->req.max_tokens || static_cast<int>(s->tokens.size()) + 1 >= max_seq_len_)
      ev.finish = FinishReason::Length;
  }
  ev.completion_tokens = s->n_generated;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (ev.token >= 0) st_.generated_tokens++;
  }
  const bool keep = s->cb ? s->cb(ev) : true;
  if (ev.finish != FinishReason::None || !keep) {
    s->cb = TokenCallback();  // final event delivered, or the client declined more
    finish(*s, keep ? FinishReason::None : FinishReason::Cancelled);
    done.push_back(s);
    std::lock_guard<std::mutex> lk(mu_);
    st_.requests_done++;
    return true;
  }
  return false;
}

void Scheduler::make_room(Seq* s, int32_t tok, std::vector<Seq*>& done, std::vector<Seq*>& evicted) {
  // Room for the new token; preempt the youngest others when the pool is full.
  for (;;) {
    auto plan = blocks_.prepare_append(static_cast<kvcache::SeqId>(s->id), std::span<const int32_t>(&tok, 1));
    if (plan.ok()) {
      Status ap = blocks_.apply(*plan, [&](kvcache::BlockId a, kvcache::BlockId b) { ctx_->copy_block(a, b); });
      LARDER_ASSERT(ap.ok());
      s->tokens.push_back(tok);
      break;
    }
    // Only sequences not yet finished this step may be preempted, never this one, nor one whose
    // blocks a transfer is reading (prefill side) or writing (decode side).
    uint64_t youngest = 0;
    Seq* victim = nullptr;
    for (auto& r : running_)
      if (r.get() != s && !r->remote && !r->req.kv_sink && std::find(done.begin(), done.end(), r.get()) == done.end() &&
          r->arrival > youngest) {
        youngest = r->arrival;
        victim = r.get();
      }
    if (!victim) {
      finish(*s, FinishReason::Error, "out of KV cache blocks");
      done.push_back(s);
      break;
    }
    auto it = std::find_if(running_.begin(), running_.end(), [&](auto& r) { return r.get() == victim; });
    evicted.push_back(victim);
    std::unique_ptr<Seq> v = std::move(*it);
    running_.erase(it);
    blocks_.release(static_cast<kvcache::SeqId>(v->id));
    if (v->load) {
      v->load->cancelled = true;
      v->load.reset();
    }
    v->in_cache = false;
    v->n_computed = 0;
    std::lock_guard<std::mutex> lk(mu_);
    st_.preemptions++;
    waiting_.push_front(std::move(v));
  }
}

void Scheduler::start_tier_load(Seq& s, const kvcache::BlockHash& root, int n_l1_cached) {
  const int bs = params_.block_size;
  const int n_blocks = (static_cast<int>(s.tokens.size()) - 1) / bs;  // at least one token is left to compute
  const int b0 = n_l1_cached / bs;
  kvcache::BlockHash h = root;
  for (int j = 0; j < b0; ++j) h = kvcache::chain_hash(h, std::span<const int32_t>(s.tokens).subspan(j * bs, bs));
  // Load while a block comes back faster than it is recomputed; the first block that
  // does not (or is in no tier) ends the loaded run, and the rest is computed.
  const double compute_s = prefill_rate_ > 0 ? bs / prefill_rate_ : 1e30;
  std::vector<kvcache::BlockHash> keys;
  int64_t recompute = 0;
  for (int j = b0; j < n_blocks; ++j) {
    h = kvcache::chain_hash(h, std::span<const int32_t>(s.tokens).subspan(j * bs, bs));
    const kvcache::Tier t = store_->where(h);
    if (t == kvcache::Tier::None) break;
    if (recompute > 0 || (!params_.always_load && store_->load_seconds(t) >= compute_s)) {
      recompute++;
      continue;
    }
    keys.push_back(h);
  }
  if (!keys.empty()) store_->count_decision(true, static_cast<int64_t>(keys.size()));
  if (recompute > 0) store_->count_decision(false, recompute);
  if (keys.empty()) return;
  s.load_block0 = b0;
  s.load_next = 0;
  s.load = store_->get_async(std::move(keys));
}

bool Scheduler::install_loaded(Seq& s) {
  kvcache::LoadJob& job = *s.load;
  const auto& table = blocks_.block_table(static_cast<kvcache::SeqId>(s.id));
  const int bs = params_.block_size;
  int loaded = 0;
  bool failed = false;
  while (s.load_next < job.keys.size()) {
    const int state = job.state[s.load_next].load();
    if (state == 0) break;
    if (state == 2) {
      failed = true;  // unreadable or gone: this block and the rest are recomputed
      break;
    }
    ctx_->write_block(table[s.load_block0 + s.load_next], job.data[s.load_next].data());
    std::vector<uint8_t>().swap(job.data[s.load_next]);
    s.load_next++;
    loaded += bs;
  }
  if (loaded > 0) {
    if (s.req.kv_sink) s.req.kv_sink->on_kv(-1, s.n_computed, s.n_computed + loaded, table);
    s.n_computed += loaded;
    std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>> named;
    blocks_.mark_computed(static_cast<kvcache::SeqId>(s.id), s.n_computed, &named);
    if (!named.empty()) write_back(named);  // e.g. from DRAM, not yet on SSD
    std::lock_guard<std::mutex> lk(mu_);
    if (s.count_hits) {
      s.cached_tokens += loaded;
      st_.prefix_hit_tokens += loaded;
      st_.tier_hit_tokens += loaded;
    }
  }
  if (failed || s.load_next == job.keys.size()) {
    job.cancelled = true;
    s.load.reset();
    return false;
  }
  return true;
}

Status Scheduler::compose_docs(Seq& s, std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>>& named) {
  const DocRequest& d = *s.req.docs;
  const auto id = static_cast<kvcache::SeqId>(s.id);
  const int bs = params_.block_size, P = d.prefix;
  s.lay = docs::Layout{P, d.doc_len};
  s.seg = docs::seg_attn(s.lay, d.params);
  // The table is copied: the block manager's own may move while documents are registered.
  const std::vector<int32_t> table = blocks_.block_table(id);
  const std::span<const int32_t> toks(s.tokens);
  // 1. The prefix (usually cached: the system prompt or the template's header).
  if (s.n_computed < P) {
    LARDER_CHECK_STATUS(docs::encode(*ctx_, table, s.n_computed, toks.subspan(s.n_computed, P - s.n_computed)));
    s.n_computed = P;
    blocks_.mark_computed(id, P, store_ ? &named : nullptr);
  }
  // 2. Every document's stored KV: named by the prefix and its tokens (padded to whole blocks
  // with -1, never a token, so a document is not a prefix of a longer one), found in the pool,
  // else in the tiers, else encoded right after the prefix (in this sequence's own blocks, which
  // the composition overwrites later) and stored.
  const kvcache::BlockHash doc_root =
      kvcache::chain_hash(kvcache::root_hash(cache_identity(), s.req.cache_salt), toks.first(P));
  const std::string salt = "doc:" + doc_root.hex();
  std::vector<kvcache::SeqId> doc_seqs;
  std::vector<std::vector<int32_t>> doc_tables;
  auto release_docs = [&] {
    for (kvcache::SeqId q : doc_seqs) blocks_.release(q);
    doc_seqs.clear();
  };
  struct Guard {  // documents' blocks go back to the cache on every way out
    std::function<void()> f;
    ~Guard() { f(); }
  } guard{release_docs};
  int reused = 0, encoded = 0, off = P;
  for (int i = 0; i < s.lay.n_docs(); ++i) {
    const int n = d.doc_len[i];
    std::vector<int32_t> padded(toks.begin() + off, toks.begin() + off + n);
    padded.resize((n + bs - 1) / bs * bs, -1);
    const kvcache::SeqId q = next_doc_seq_--;
    auto plan = blocks_.prepare_add(q, padded, salt, -1, /*reuse_all=*/true);
    if (!plan.ok()) {
      release_docs();
      return make_error("the KV cache is too small for these documents: %s", plan.error().c_str());
    }
    Status ap = blocks_.apply(*plan, [&](kvcache::BlockId a, kvcache::BlockId b) { ctx_->copy_block(a, b); });
    LARDER_ASSERT(ap.ok());
    doc_seqs.push_back(q);
    doc_tables.push_back(blocks_.block_table(q));
    const std::vector<int32_t>& dt = doc_tables.back();
    int have = std::min(plan->n_cached_tokens, n);
    if (have < n && store_) {
      // The rest from DRAM / SSD when every remaining block is there (waited for: a document is
      // one short read, and the composition needs all of it).
      kvcache::BlockHash h = plan->root;
      std::vector<kvcache::BlockHash> keys;
      for (int j = 0; j < static_cast<int>(padded.size()) / bs; ++j) {
        h = kvcache::chain_hash(h, std::span<const int32_t>(padded).subspan(j * bs, bs));
        if (j * bs >= have) keys.push_back(h);
      }
      bool all = true;
      for (const auto& k : keys) all &= store_->exists(k);
      if (all) {
        auto job = store_->get_async(keys);
        const auto t0 = std::chrono::steady_clock::now();
        int got = 0;
        for (size_t j = 0; j < keys.size();) {
          const int state = job->state[j].load();
          if (state == 2) break;
          if (state == 1) {
            ctx_->write_block(dt[have / bs + j], job->data[j].data());
            ++j;
            ++got;
            continue;
          }
          if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(30)) break;
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        job->cancelled = true;
        if (got == static_cast<int>(keys.size())) {
          std::lock_guard<std::mutex> lk(mu_);
          st_.tier_hit_tokens += n - have;
          have = n;
        }
      }
    }
    if (have < n) {
      LARDER_CHECK_STATUS(docs::encode(*ctx_, table, P, toks.subspan(off, n)));
      ctx_->copy_kv(table, P + have, dt, have, n - have);
      encoded += n - have;
    } else {
      reused += n;
    }
    blocks_.mark_computed(q, static_cast<int>(padded.size()), store_ ? &named : nullptr);
    off += n;
  }
  // 3. Into place, then repositioned and repaired for the mode.
  for (int i = 0; i < s.lay.n_docs(); ++i) ctx_->copy_kv(doc_tables[i], 0, table, s.lay.doc_begin(i), d.doc_len[i]);
  release_docs();  // named: cached for the next request (and evictable)
  docs::Stats st;
  LARDER_CHECK_STATUS(docs::compose(*ctx_, table, s.lay, toks, d.params, &st));
  s.n_computed = s.lay.end();
  blocks_.mark_computed(id, s.n_computed, store_ ? &named : nullptr);
  s.doc_reused = reused;
  s.doc_recomputed = st.recomputed_tokens;
  s.doc_fraction = st.fraction();
  std::lock_guard<std::mutex> lk(mu_);
  if (!s.composed) {
    st_.doc_requests++;
    st_.doc_tokens_reused += reused;
    st_.doc_token_layers_recomputed += st.recomputed_token_layers;
    st_.computed_prompt_tokens += encoded;
  }
  st_.doc_tokens_encoded += encoded;
  s.composed = true;
  return Status::Ok();
}

void Scheduler::write_back(const std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>>& named) {
  for (const auto& [b, h] : named) {
    if (!store_->wants_write(h)) continue;
    std::vector<uint8_t> payload(ctx_->block_bytes());
    ctx_->read_block(b, payload.data());
    store_->put_async(h, std::move(payload));
  }
}

Status Scheduler::flush_store() { return store_ ? store_->flush() : Status::Ok(); }

void Scheduler::refresh_stats_locked() {
  st_.running = static_cast<int>(running_.size());
  st_.waiting = static_cast<int>(waiting_.size());
  const auto bs = blocks_.stats();
  st_.kv_blocks = bs.n_blocks;
  st_.kv_used = bs.used;
  st_.kv_cached = bs.cached;
  st_.kv_free = bs.free;
  st_.prefill_tokens_per_s = prefill_rate_;
  int64_t queued = 0;
  for (const auto& w : waiting_) queued += static_cast<int64_t>(w->tokens.size());
  int remote = 0;
  for (const auto& r : running_) {
    queued += std::max(0, r->n_prompt - r->n_computed);
    remote += r->remote;
  }
  st_.queued_prefill_tokens = queued;
  st_.remote_pending = remote;
  st_.held = static_cast<int>(held_.size());
  st_.has_store = store_ != nullptr;
}

// ---- Speculative decoding -------------------------------------------------------------------

void Scheduler::calibrate_cost() {
  // One pass of 1 and of R rows on scratch KV (blocks nothing holds yet).
  const int big = std::min({32, ctx_->n_batch(), ctx_->n_blocks() * params_.block_size});
  std::vector<int32_t> table((big + params_.block_size - 1) / params_.block_size);
  for (size_t b = 0; b < table.size(); ++b) table[b] = static_cast<int32_t>(b);
  std::vector<int32_t> toks(big, model_.tokenizer && model_.tokenizer->bos() >= 0 ? model_.tokenizer->bos() : 0);
  std::vector<float> logits(model_.cfg.n_vocab);
  cost_.calibrate(big, [&](int n) {
    SeqBatch sb;
    sb.tokens = std::span<const int32_t>(toks).first(n);
    sb.block_table = table;
    sb.logits = logits.data();
    const auto t0 = std::chrono::steady_clock::now();
    (void)ctx_->decode_batch(std::span<const SeqBatch>(&sb, 1));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  st_.spec_row_cost_s = cost_.b();
  st_.spec_pass_cost_s = cost_.a();
}

void Scheduler::observe_cost(int rows, double seconds) {
  cost_.observe(rows, seconds);
  std::lock_guard<std::mutex> lk(mu_);
  st_.spec_row_cost_s = cost_.b();
  st_.spec_pass_cost_s = cost_.a();
}

void Scheduler::plan_drafts(const std::vector<Seq*>& order, int budget) {
  // The pass as it would be without drafts: rows and generated tokens.
  int rows = 0, left = budget;
  std::vector<Seq*> cand;
  std::vector<int> cap;
  for (Seq* s : order) {
    s->draft.clear();
    s->spec_k = 0;
    const int pending = static_cast<int>(s->tokens.size()) - s->n_computed;
    if (pending <= 0 || left <= 0) continue;
    const int take = std::min(pending, left);
    left -= take;
    rows += take;
    if (pending != 1 || s->req.kv_sink || s->req.spec_max == 0) continue;
    const int want = s->req.spec_max > 0 ? std::min(s->req.spec_max, 64) : params_.spec_max;
    const int kmax = std::min({want, s->req.max_tokens - s->n_generated - 1,
                               max_seq_len_ - static_cast<int>(s->tokens.size()) - 1});
    if (kmax <= 0) continue;
    if (!s->spec_len) s->spec_len = std::make_unique<spec::LengthControl>(want);
    const int k = params_.spec_fixed ? kmax : std::min(kmax, s->spec_len->next(cost_, params_.drafter->seconds_per_token()));
    if (k <= 0) continue;
    cand.push_back(s);
    cap.push_back(k);
  }
  if (cand.empty()) return;
  int decoding = 0;
  for (Seq* s : order) decoding += static_cast<int>(s->tokens.size()) - s->n_computed == 1;
  // Rows go where they buy the most expected tokens (the j-th guess of a sequence accepted with
  // about rate^j) while that beats the pass's tokens per second: a memory-bound pass takes many,
  // a compute-bound one (large batch, prompt chunks) few or none.
  const double cost_b = cost_.b() + params_.drafter->seconds_per_token();  // a verify row and its guess
  double gen = decoding, time = cost_.a() + cost_b * rows;
  std::vector<double> next(cand.size());
  // A probe (a sequence turned down tries one guess now and then) is worth a row where a guess
  // kept half the time would be: not in a compute-bound pass.
  for (size_t i = 0; i < cand.size(); ++i)
    next[i] = cand[i]->spec_len->probing() ? std::max(0.5, cand[i]->spec_len->rate()) : cand[i]->spec_len->rate();
  int extra = 0;
  if (params_.spec_fixed)
    for (size_t i = 0; i < cand.size() && extra < left; ++i) {
      cand[i]->spec_k = std::min(cap[i], left - extra);
      extra += cand[i]->spec_k;
    }
  while (!params_.spec_fixed && extra < left) {
    size_t best = cand.size();
    for (size_t i = 0; i < cand.size(); ++i)
      if (cand[i]->spec_k < cap[i] && (best == cand.size() || next[i] > next[best])) best = i;
    if (best == cand.size()) break;
    const double g = next[best];
    if (g / cost_b <= gen / time) break;
    gen += g;
    time += cost_b;
    cand[best]->spec_k++;
    next[best] *= cand[best]->spec_len->rate();
    ++extra;
  }
  std::vector<spec::DraftJob> jobs;
  for (Seq* s : cand) {
    if (s->spec_k <= 0) continue;
    if (s->spec_handle < 0) s->spec_handle = params_.drafter->start(std::span<const int32_t>(s->tokens).first(s->n_prompt));
    spec::DraftJob j;
    j.handle = s->spec_handle;
    j.context = s->tokens;
    j.max_tokens = s->spec_k;
    j.tree = params_.spec_tree;
    j.sampling = &s->req.sampling;
    j.out = &s->draft;
    jobs.push_back(j);
  }
  if (jobs.empty()) return;
  params_.drafter->propose(jobs);
  const int V = model_.cfg.n_vocab;
  for (Seq* s : cand) {
    spec::Draft& d = s->draft;
    if (d.empty()) continue;
    if (d.size() > s->spec_k) {  // over budget: cut (parents come before children)
      d.tokens.resize(s->spec_k);
      d.parent.resize(s->spec_k);
      if (!d.q.empty()) d.q.resize(static_cast<size_t>(s->spec_k) * V);
    }
    // The draft nodes' KV slots; no room now means no draft this step.
    auto plan = blocks_.prepare_append(static_cast<kvcache::SeqId>(s->id), d.tokens);
    if (!plan.ok() || !blocks_.apply(*plan, [&](kvcache::BlockId a, kvcache::BlockId b) { ctx_->copy_block(a, b); }).ok()) {
      d.clear();
      continue;
    }
    spec::verify_inputs(d, s->tokens.back(), s->n_computed, &s->v_tokens, &s->v_pos, &s->v_mask);
  }
}

void Scheduler::accept_drafts(Seq* s, std::vector<Seq*>& done, std::vector<Seq*>& evicted,
                              std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>>* named) {
  const int V = model_.cfg.n_vocab;
  spec::Draft d = std::move(s->draft);
  s->draft.clear();
  const spec::Verdict v = spec::verify(d, s->logits.data(), V, *s->sampler, s->tokens);
  const auto id = static_cast<kvcache::SeqId>(s->id);
  const int base = s->n_computed + 1;  // the pending token's KV is in
  // Accepted nodes' KV moves to consecutive entries; the rest of the draft is dropped.
  std::vector<int32_t> tail;
  {
    const auto& table = blocks_.block_table(id);
    for (size_t j = 0; j < v.path.size(); ++j) {
      ctx_->move_kv(table, base + v.path[j], base + static_cast<int>(j));
      tail.push_back(d.tokens[v.path[j]]);
    }
  }
  auto plan = blocks_.prepare_truncate(id, base + static_cast<int>(tail.size()), tail);
  LARDER_ASSERT(plan.ok());
  LARDER_ASSERT(blocks_.apply(*plan).ok());
  blocks_.mark_computed(id, base + static_cast<int>(tail.size()), named);
  s->n_computed = base;
  const int acc = static_cast<int>(tail.size());
  s->spec_len->observe(spec::max_depth(d), acc);
  {
    std::lock_guard<std::mutex> lk(mu_);
    st_.spec_passes++;
    st_.spec_proposed += d.size();
    st_.spec_accepted += acc;
    if (st_.spec_accept_hist.size() <= static_cast<size_t>(acc)) st_.spec_accept_hist.resize(acc + 1, 0);
    st_.spec_accept_hist[acc]++;
  }
  // Each kept token is reported with the logits row that predicted it.
  int row = 0;
  for (size_t j = 0; j < tail.size(); ++j) {
    if (report(s, tail[j], s->logits.data() + static_cast<size_t>(row) * V, nullptr, done)) return;
    s->tokens.push_back(tail[j]);
    s->n_computed++;
    row = 1 + v.path[j];
  }
  // The correction / bonus token is pending like any sampled one. Its logits row moves to the
  // front so a later step (logprobs) finds it where it expects.
  if (row > 0) std::memmove(s->logits.data(), s->logits.data() + static_cast<size_t>(row) * V, V * sizeof(float));
  emit(s, v.next, s->logits.data(), nullptr, done, evicted);
}

}  // namespace larder
