// Routing policy of the conductor, shared by the live conductor (src/conductor/conductor.cpp)
// and the cluster simulator (src/sim): pure functions of what the conductor knows about the
// instances (their load, their cost models, which blocks of a prompt each one holds); no I/O,
// no clocks, no threads.
//
// The paper's Algorithm 1 (Mooncake, FAST '25), made concrete:
//   for each prefill candidate i:
//     local_i  = leading blocks of the prompt that i holds (L1 pool, DRAM or SSD tier)
//     best     = the largest leading run any instance j holds (the holder)
//     fetch_i  = best - local_i blocks, fetched from j when  transfer(fetch_i) < prefill(fetch_i)
//     TTFT_i   = queue_i + prefill_i(new tokens, prefix) + load_i(tier blocks) [+ fetch time]
//     queue_i  = predicted time to work off the prompt tokens already queued on i
//   prefill = argmin TTFT_i; decode = the decode candidate with the lowest predicted TBT that
//   has room (free blocks for the whole sequence, running < parallel).
//   SLO: no candidate with TTFT <= ttft_slo and TBT <= tbt_slo -> reject (429, Retry-After:
//   when the best candidate's queue should have drained enough). A prompt that misses the
//   TTFT SLO even on an idle instance is served best effort while some instance is idle
//   (rejecting it cannot help it, and its blocks serve the requests sharing its prefix).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace larder::conductor {

// Measured speed of one instance. prefill_s(n, p) = a + b*n + c*n*(p + n/2): a fixed cost per
// pass, a per-token cost (weights), and attention over the prefix and the new tokens.
// decode_step_s(batch, ctx) = d0 + d1*batch + d2*ctx (ctx: KV tokens summed over the batch).
struct CostModel {
  double a = 0.002, b = 2e-4, c = 1e-9;
  double d0 = 0.004, d1 = 0.002, d2 = 1e-8;
  double prefill_s(double new_tokens, double prefix) const;
  double decode_step_s(double batch, double ctx_tokens) const;
};

// Refits a CostModel from observations as they come (a sliding window of the last samples,
// least squares on relative error with non-negative coefficients). Not thread-safe.
class CostFitter {
 public:
  explicit CostFitter(size_t window = 256);
  void add_prefill(double new_tokens, double prefix, double seconds);
  void add_decode(double batch, double ctx_tokens, double seconds);
  // The fit of the samples so far; `prior` for coefficients with too few samples to fit.
  CostModel fit(const CostModel& prior) const;
  size_t n_prefill() const;
  size_t n_decode() const;
 private:
  size_t window_;
  struct P { double n, p, s; };
  struct D { double b, c, s; };
  std::vector<P> pre_;
  std::vector<D> dec_;
  size_t pre_next_ = 0, dec_next_ = 0;
};

enum class PolicyKind { Random, RoundRobin, LeastLoad, CacheAware, Conductor };
const char* policy_name(PolicyKind k);
bool parse_policy(const std::string& s, PolicyKind* out);  // "random", "round-robin", ...

// What the conductor knows of one instance now.
struct InstanceView {
  std::string id;
  bool can_prefill = true, can_decode = true;
  int parallel = 4;                  // sequences it decodes at once
  int running = 0, waiting = 0;      // sequences (reported + routed here and not yet reported)
  int64_t queued_prefill_tokens = 0; // prompt tokens queued, not yet computed
  int64_t free_blocks = 0, total_blocks = 0;  // its L1 pool
  int64_t decode_ctx_tokens = 0;     // KV tokens of its running sequences (for TBT)
  CostModel cost;
  double dram_load_bw = 4e9, disk_load_bw = 5e8;  // bytes/s, its tiers -> its pool
  double weight = 1.0;               // 0..1: a rejoining instance ramps up (see ramp_weight)
  int step_tokens = 256;             // its per-step token budget (prompt chunks + decode tokens)
  // Attention work of the queued prompts: sum of new * (prefix + new/2) over them, in tokens^2.
  // 0 = unknown: estimated from queued_prefill_tokens as prompts of equal length.
  double queued_prefill_attn = 0;
  // Every sequence slot is taken (running + waiting >= parallel): the time until one frees up
  // (the caller's estimate from what it knows of the running sequences; 0 = a slot is free).
  double slot_wait_s = 0;
};

// Leading blocks of a prompt that one instance holds, by where they are.
struct Holding {
  int l1 = 0;    // leading blocks in its pool (free to reuse)
  int dram = 0;  // the next blocks in its DRAM tier
  int disk = 0;  // the next blocks on its SSD tier
  int total() const { return l1 + dram + disk; }
};

struct RequestView {
  int n_prompt = 0;        // prompt tokens
  int max_tokens = 16;     // completion limit
  int block_size = 16;     // tokens per KV block
  int64_t block_bytes = 0; // bytes of one KV block (all layers)
  uint64_t key = 0;        // a hash of the prompt's first block (random/round-robin ignore it)
};

struct Slo {
  double ttft_s = 0;  // 0: none
  double tbt_s = 0;   // 0: none
};

struct PolicyParams {
  PolicyKind kind = PolicyKind::Conductor;
  Slo slo;
  double transfer_bw = 1e9;        // bytes/s between instances (fetching blocks from a holder)
  double transfer_latency_s = 0.002;
  int min_fetch_blocks = 2;        // fetch only runs at least this long
};

struct Decision {
  int prefill = -1;          // index into the instances: computes the prompt
  int decode = -1;           // index: generates (== prefill when colocated)
  int fetch_from = -1;       // index of the instance to fetch leading blocks from (-1: none)
  int fetch_blocks = 0;      // leading blocks to fetch (from block 0; the prefill instance's own are skipped)
  int cached_blocks = 0;     // leading blocks the prefill instance will not compute (own + fetched)
  int fetched_blocks = 0;    // of those, how many come from fetch_from (cached_blocks - its own)
  double predicted_ttft_s = 0, predicted_tbt_s = 0;
  bool reject = false;       // SLO admission: nobody can serve it in time
  double retry_after_s = 0;  // when rejected: when the best candidate's queue should allow it
  std::string reason;        // when rejected or nothing fits
};

// Picks prefill and decode instances for one request. holdings[i] describes instances[i].
// `rr` is the round-robin counter (incremented by the call), `rnd` a random 64-bit value
// (the caller's generator). Instances with weight 0, or without the role, are never picked.
// No candidate at all -> prefill/decode -1 with a reason.
Decision route(const PolicyParams& p, const RequestView& r, const std::vector<InstanceView>& instances,
               const std::vector<Holding>& holdings, uint64_t& rr, uint64_t rnd);

// Predicted TTFT of the request on prefill instance i with `cached` leading blocks it does
// not compute (of which `fetched` come from another instance, `dram`/`disk` from its tiers).
double predict_ttft(const PolicyParams& p, const RequestView& r, const InstanceView& i, int cached, int fetched,
                    int dram, int disk);
// Seconds instance i needs to work off the prompt tokens queued on it (the queue part of TTFT).
double predict_queue_s(const InstanceView& i);
// Seconds to bring `blocks` KV blocks from another instance (latency + bytes / bandwidth).
double transfer_s(const PolicyParams& p, const RequestView& r, int blocks);
// Whether a block from a tier (load_bw bytes/s) comes back faster than instance i recomputes it at
// position `block` of the prompt (the engine's load-or-recompute rule, on the cost model).
bool tier_load_pays(const RequestView& r, const InstanceView& i, double load_bw, int block);
// Predicted time between tokens on decode instance i once this request joins its batch.
double predict_tbt(const RequestView& r, const InstanceView& i);

// Weight of an instance that (re)joined `age_s` seconds ago: grows linearly from 0.1 to 1
// over `ramp_s`, so an empty newcomer takes a growing share instead of every new request.
double ramp_weight(double age_s, double ramp_s);

// The conductor's own count of something on an instance (its sequences, its queued prompt
// tokens) over the last seconds, so a registered load (written up to a refresh earlier, and
// counting ours as they were then) can be split into ours then and others':
// others = registered - ours at the registration's time.
class CountHistory {
 public:
  explicit CountHistory(int64_t keep_ms = 10000) : keep_ms_(keep_ms) {}
  void set(int64_t ms, int64_t value);  // the count became `value` at wall time ms
  int64_t now() const { return now_; }
  int64_t at(int64_t ms) const;         // the count at wall time ms (as far back as kept)
  // Others' part of a registered `registered` written at `registered_ms`: never negative
  // (ours may have ended, or been partly computed, at the instance before we saw it).
  int64_t others(int64_t registered, int64_t registered_ms) const;

 private:
  struct Change {
    int64_t ms;
    int64_t before;
  };
  int64_t keep_ms_;
  int64_t now_ = 0;
  std::vector<Change> changes_;  // oldest first, within keep_ms_ of the newest
};

}  // namespace larder::conductor
