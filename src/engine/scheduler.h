// Continuous batching over the paged KV cache.
//
// One scheduler thread runs steps. Every step takes the next token of every running
// sequence plus chunks of waiting prompts under a per-step token budget (chunked
// prefill), so a long prompt never stalls other users' generation. Before memory
// changes, the block manager's prepare_*() says whether a step fits; when blocks run
// out the youngest running sequence is preempted (its blocks released; it is
// recomputed later, mostly from cached blocks) instead of failing. New requests first
// look up their longest cached prefix and prefill only the rest.
#pragma once
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/result.h"
#include "engine/context.h"
#include "engine/sampler.h"
#include "kvcache/block_manager.h"
#include "kvcache/kv_store.h"
#include "model/model.h"
#include "docs/docs.h"
#include "spec/spec.h"

namespace larder {

struct SchedulerParams {
  int n_threads = 0;
  // Sparse / SSD-streamed FFN (src/offload); its identity joins the KV blocks' (other values).
  std::shared_ptr<offload::SparseFfn> ffn;
  int kv_blocks = 0;          // 0: enough for `parallel` sequences of max_seq_len
  int block_size = 16;
  int max_seq_len = 0;        // prompt + completion limit per request (0 = model context, capped at 4096)
  int parallel = 4;           // max sequences generating at once
  int max_queue = 64;         // waiting requests beyond this are refused (server: 429/503)
  int step_tokens = 256;      // per-step token budget (decode tokens + prompt chunks)
  bool w8a8 = false;
  DType type_k = DType::F16;  // KV cache types of the pool (and of the tiers' payloads)
  DType type_v = DType::F16;
  // Tiers below the pool (L2 DRAM, L3 SSD); none when both are off.
  kvcache::KvStoreParams store;
  bool always_load = false;   // load every tier hit (skip the load-vs-recompute decision)
  // Told of every block named or dropped in the pool and the tiers (KV events); outlives the
  // scheduler. What the SSD tier already holds is announced at creation.
  kvcache::BlockListener* block_listener = nullptr;
  // Speculative decoding (none when null; outlives the scheduler): each step, decoding sequences
  // get draft tokens while a pass's predicted extra cost (a cost model fitted to this machine's
  // steps) buys more expected tokens than the step makes per second, so a compute-bound batch
  // drafts nothing and speculation never lowers throughput.
  spec::Drafter* drafter = nullptr;
  int spec_max = 8;        // draft nodes per sequence per pass
  bool spec_tree = false;  // several candidates (tree attention)
  bool spec_fixed = false; // always draft spec_max (no adaptive length, no cost model): tests, experiments
};

enum class FinishReason { None, Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);

// P/D disaggregation hooks: src/pd implements them over the network; the engine knows none.
//
// Prefill side: a KvSink receives the KV of a sequence's prompt as it lands in the pool, so it
// can be sent on while later layers and chunks compute. All calls on the scheduler thread.
class KvSink {
 public:
  virtual ~KvSink() = default;
  // Tokens [begin, end) of the prompt have K/V in the pool, in `table` (block ids, block_size
  // tokens each): layer >= 0 for one layer (during a forward pass; must be quick), -1 for every
  // layer (a cached prefix at admission, blocks loaded from a tier).
  virtual void on_kv(int layer, int begin, int end, std::span<const int32_t> table) = 0;
  // The sequence ended; names[j] = name of prompt block j (full blocks that were named).
  virtual void on_end(std::vector<kvcache::BlockHash> names) = 0;
  // Polled after on_end: true once the blocks may be freed (transfers finished and acknowledged,
  // or given up). Until then they stay referenced, so nothing overwrites what is being read.
  virtual bool release_ready() = 0;
};

// Decode side: the prompt's KV comes from elsewhere into the blocks admission reserved for it.
struct RemoteFirst {
  int32_t token = -1;                          // what the prefill instance sampled
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};
class KvSource {
 public:
  enum class State { Pending, Done, Failed };
  virtual ~KvSource() = default;
  // Blocks are reserved: prompt tokens [0, n_cached) are in the pool already (prefix hit); the
  // rest must arrive into `table`. names[j] = the chain name block j must have. Returns at once.
  virtual void start(int n_cached, std::vector<int32_t> table, std::vector<kvcache::BlockHash> names) = 0;
  // Polled every step. Done: every prompt token's KV is in the blocks and verified; *first is
  // the first generated token. Failed: nothing more will be written into the blocks.
  virtual State poll(RemoteFirst* first, std::string* error) = 0;
  // The sequence ended before Done (cancelled, shut down): stop the handoff.
  virtual void abort() = 0;
  // After abort(): true once no remote write can land in the blocks any more.
  virtual bool quiesced() = 0;
  // On Failed: compute the prompt here (true) or end the request with the error (false).
  virtual bool fallback_local() const = 0;
  // Admission computes the prompt here, without a handoff, when at most this many of its tokens
  // are not cached already (a short prompt or the next turn of a conversation: cheaper than the
  // round trip, and not queued behind long prompts at the prefill instance).
  virtual int local_prefill_tokens() const { return 0; }
  // -1: the whole prompt's KV and its first token come from elsewhere (P/D decode side). Else
  // only the KV of its first covers() tokens (whole blocks, fewer than the prompt's) comes
  // (fetched from an instance that holds it: the KV pool across instances) and the rest is
  // computed here; names then has one entry per covered block; a failure just means computing it.
  virtual int covers() const { return -1; }
};

// A RAG prompt: a shared prefix, documents, then the query (GenRequest::prompt is their tokens back
// to back). Each document's KV is stored once, as computed right after the prefix, in blocks
// named by the prefix and the document's tokens (in the pool and every tier below it), and
// composed into the prompt in the request's mode (src/docs) instead of being prefilled again.
struct DocRequest {
  docs::Params params;
  int prefix = 0;            // prefix tokens
  std::vector<int> doc_len;  // each document's tokens, in prompt order
};

struct GenRequest {
  std::vector<int32_t> prompt;
  SamplerParams sampling;
  int max_tokens = 16;
  bool ignore_eos = false;
  int n_logprobs = 0;         // top alternatives to report per token (0..20)
  std::string cache_salt;     // per-tenant salt for prefix-cache names
  std::shared_ptr<KvSink> kv_sink;      // prefill instance of a handoff (max_tokens 1)
  std::shared_ptr<KvSource> kv_source;  // decode instance of a handoff
  bool serves_fetch = false;  // another instance fetches this prompt's cached KV: admitted first
  int spec_max = -1;          // draft tokens per pass: -1 = the scheduler's, 0 = no speculation
  std::shared_ptr<const DocRequest> docs;  // the prompt is prefix + documents + query (null: plain)
  // Documents only: store their KV and end (max_tokens 0, no query).
};

struct TokenEvent {
  int32_t token = -1;                          // -1 on a final event without a token
  int32_t sampled = -1;                        // the sampled token, also when it ended generation
  float logprob = 0;                           // of the chosen token (when n_logprobs > 0)
  std::vector<std::pair<int32_t, float>> top;  // top alternatives, best first
  FinishReason finish = FinishReason::None;    // != None on the last event
  std::string error;                           // when finish == Error
  int prompt_tokens = 0;
  int cached_tokens = 0;                       // prompt tokens served from cached KV
  int completion_tokens = 0;
  // Documents (DocRequest): their tokens, how many came from stored KV (the rest were encoded now),
  // document token-layers recomputed by the composition's repair and its fraction of all of them.
  int doc_tokens = 0, doc_reused_tokens = 0, doc_recomputed_tokens = 0;
  double doc_recompute_fraction = 0;
};

// Called on the scheduler thread for each token; the last call has finish set. Return
// false to cancel (e.g. the client disconnected): the sequence and its blocks are freed
// at once and the callback is not called again.
using TokenCallback = std::function<bool(const TokenEvent&)>;

struct SchedulerStats {
  int waiting = 0, running = 0;
  int kv_blocks = 0, kv_used = 0, kv_cached = 0, kv_free = 0;
  int64_t prefix_hit_tokens = 0, prompt_tokens = 0;  // totals since start
  int64_t computed_prompt_tokens = 0;                // prompt tokens actually prefilled
  int64_t generated_tokens = 0, requests_done = 0, preemptions = 0, steps = 0;
  int64_t tier_hit_tokens = 0;      // prompt tokens whose KV came from L2/L3 (part of prefix_hit_tokens)
  double prefill_tokens_per_s = 0;  // measured, drives load-vs-recompute
  int64_t queued_prefill_tokens = 0; // prompt tokens not yet computed (waiting + running)
  int held = 0;                      // ended sequences whose blocks wait for a transfer to settle
  int remote_pending = 0;            // sequences waiting for their prompt's KV from a prefill instance
  int64_t remote_done = 0, remote_failed = 0, remote_fallbacks = 0;
  int64_t fetched_tokens = 0;        // prompt tokens whose KV was fetched from another instance
  // Documents: requests with documents, document tokens served from stored KV / encoded, document
  // token-layers recomputed by repairs.
  int64_t doc_requests = 0, doc_tokens_reused = 0, doc_tokens_encoded = 0, doc_token_layers_recomputed = 0;
  bool has_ffn = false;   // a sparse / SSD-streamed FFN (src/offload)
  offload::Stats ffn;
  bool has_store = false;
  kvcache::KvStoreStats store;
  // Speculative decoding (drafter empty when off): passes that verified a draft, draft nodes
  // verified, draft tokens accepted, accept_hist[k] = passes that kept k draft tokens.
  std::string drafter;
  int64_t spec_passes = 0, spec_proposed = 0, spec_accepted = 0;
  std::vector<int64_t> spec_accept_hist;
  double spec_row_cost_s = 0, spec_pass_cost_s = 0;  // the fitted cost model: pass = a + b * rows
};

class Scheduler {
 public:
  static Result<std::unique_ptr<Scheduler>> create(const Model& model, const SchedulerParams& p);
  ~Scheduler();

  // Queues a request. Errors: "queue full ..." (HTTP 429), "... shutting down" (503),
  // prompt empty or longer than the limit, bad parameters (400).
  Result<uint64_t> submit(GenRequest req, TokenCallback cb);
  void cancel(uint64_t id);
  // Stops accepting work; with drain, finishes running and queued requests first.
  void shutdown(bool drain);
  SchedulerStats stats() const;
  int max_seq_len() const { return max_seq_len_; }
  // Drains the write-back queue and makes the SSD tier durable (also done at destruction).
  Status flush_store();
  const Model& model() const { return model_; }
  // The KV pool's memory (for registering it with a transfer engine) and its layout name.
  Context::PoolView kv_pool() { return ctx_->pool_view(); }
  const std::string& blocks_identity() const { return blocks_identity_; }
  // What roots every block name (kvcache::root_hash): a conductor names prompts the same way.
  kvcache::CacheIdentity cache_identity() const;
  int block_size() const { return params_.block_size; }
  const SchedulerParams& params() const { return params_; }

 private:
  struct Seq;
  Scheduler(const Model& m, const SchedulerParams& p, std::unique_ptr<Context> ctx, int max_seq_len, int kv_blocks);
  void loop();
  bool step();  // returns false when idle
  void finish(Seq& s, FinishReason r, const std::string& err = {});
  void refresh_stats_locked();  // caller holds mu_ (or no other thread exists yet)
  void start_tier_load(Seq& s, const kvcache::BlockHash& root, int n_l1_cached);
  bool install_loaded(Seq& s);  // true while blocks are still loading
  void write_back(const std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>>& named);
  // Reports a sampled token and makes room for it (preempting the youngest when the pool is full).
  void emit(Seq* s, int32_t tok, const float* logits, const RemoteFirst* remote, std::vector<Seq*>& done,
            std::vector<Seq*>& evicted);
  void make_room(Seq* s, int32_t tok, std::vector<Seq*>& done, std::vector<Seq*>& evicted);
  // Reports a token without making room (its KV is in already: an accepted draft token); true
  // when it ended the sequence.
  bool report(Seq* s, int32_t tok, const float* logits, const RemoteFirst* remote, std::vector<Seq*>& done);
  void poll_remote(std::vector<Seq*>& done, std::vector<Seq*>& evicted);
  // Speculative decoding: draft for the step's decoding sequences (blocks reserved for the
  // drafts), and after the pass keep what verification accepted.
  void plan_drafts(const std::vector<Seq*>& order, int budget);
  void accept_drafts(Seq* s, std::vector<Seq*>& done, std::vector<Seq*>& evicted,
                     std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>>* named);
  void calibrate_cost();
  void observe_cost(int rows, double seconds);
  void release_held();
  // Admission of a prompt with documents: the prefix computed, every document's stored KV found
  // (pool, then tiers) or encoded and stored, copied into place and composed; the query is then
  // prefilled like any prompt.
  Status compose_docs(Seq& s, std::vector<std::pair<kvcache::BlockId, kvcache::BlockHash>>& named);
  kvcache::SeqId next_doc_seq_ = -2;  // block-manager ids of documents being stored (negative)
  // Blocks of ended sequences kept until a transfer reading or writing them has settled.
  struct Held {
    kvcache::SeqId id;
    std::function<bool()> ready;
  };
  std::vector<Held> held_;  // scheduler thread only

  const Model& model_;
  SchedulerParams params_;
  std::unique_ptr<Context> ctx_;
  std::string blocks_identity_;  // model content identity: roots every block name
  kvcache::BlockManager blocks_;
  int max_seq_len_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;
  std::vector<uint64_t> cancelled_;
  uint64_t next_id_ = 1;
  uint64_t admissions_ = 0;  // scheduler thread only
  bool stopping_ = false, draining_ = false;
  SchedulerStats st_;
  double prefill_rate_ = 0;  // prompt tokens/s measured on prefill-heavy steps (scheduler thread)
  spec::CostModel cost_;  // pass cost t = a + b * rows on this machine (scheduler thread)
  // Declared after cv_/mu_: destroyed (flushed) first, while what its callbacks touch lives.
  std::unique_ptr<kvcache::KvStore> store_;
  std::thread thread_;
};

}  // namespace larder
