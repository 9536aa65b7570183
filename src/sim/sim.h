// A discrete-event simulator of a Larder cluster serving a request trace, routed by the
// conductor's own policy (conductor::route) on a view built from the simulator's exact state.
//
// The model, per instance (mirroring src/engine/scheduler.cpp):
//  - admission, oldest first, while fewer than `parallel` sequences run and the pool has
//    blocks for the whole prompt: the prompt's leading blocks found in the L1 pool are
//    reused; the next ones in the DRAM / SSD tier are loaded while a block loads faster than
//    it is recomputed (the engine's rule, on the cost model); the next ones covered by a fetch
//    the policy ordered come from the holder. The sequence sits out until its loads and fetch
//    have arrived. At least one prompt token is always computed. A prompt larger than the pool
//    fails once nothing else runs (the engine's "KV cache is too small").
//  - steps: decode tokens first, then prompt chunks by age under `step_tokens`; a step costs
//    max(a if it has chunks, d0 if it has decode tokens) + d1*decode tokens + d2*their KV
//    tokens + sum over chunks of b*k + c*k*(prefix + k/2). One prompt alone in one chunk
//    therefore takes exactly CostModel::prefill_s, one sequence alone decodes in exactly
//    decode_step_s(1, its tokens).
//  - blocks: a sequence holds ceil(tokens / block_size) blocks; full prompt blocks are named
//    (trace.h's block names) as they are computed or arrive, and written to the SSD tier;
//    unreferenced named blocks stay in the pool as an LRU and are evicted (to the DRAM tier)
//    only when blocks are needed; a DRAM hit moves the block up (exclusive), SSD keeps it.
//    When a decode token finds no block, the youngest other sequence is preempted (blocks
//    released, recomputed later, mostly from its cached blocks).
//  - P/D: the decode instance admits the request first (blocks reserved), then computes it
//    itself when at most local_prefill_tokens are uncached there, else hands the prompt to
//    the prefill instance, which computes it and streams its KV back: the handoff ends at
//    max(prompt done, compute start + bytes / transfer_bw) + latency (bytes: the blocks decode
//    did not hold); the prefill instance keeps its blocks (now cached there) until then.
//  - fetches: started when the policy routes the request (latency + bytes / transfer_bw);
//    the fetcher then holds those blocks like its own (hot prefixes replicate).
// Simplifications: transfers do not contend for links; a holder's copy is assumed readable
// at link speed wherever it sits; a fetch's blocks are taken as of the routing decision;
// tier writes are free; no stop tokens (every request generates its max_tokens).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "conductor/policy.h"
#include "core/result.h"
#include "sim/calibration.h"
#include "sim/trace.h"

namespace larder::sim {

struct SimRequest {
  double arrival_s = 0;
  int n_prompt = 1, max_tokens = 1;
  std::vector<uint64_t> blocks;  // names of the prompt's full KV blocks, in order
};

// The planned trace as simulator requests: arrivals relative to the first one, / speed.
std::vector<SimRequest> requests_from_trace(const std::vector<TraceReq>& trace, const std::vector<Planned>& plans,
                                            int K, double speed, int block_size);

struct SimConfig {
  int n_both = 0, n_prefill = 0, n_decode = 0;  // colocated instances, or P/D
  Calibration calib;
  conductor::PolicyKind policy = conductor::PolicyKind::Conductor;
  conductor::Slo slo;             // the conductor policy rejects on it; goodput counts against it
  int min_fetch_blocks = 2;
  int local_prefill_tokens = 64;  // P/D: decode computes prompts with at most this many uncached tokens
  uint64_t seed = 1;
};

struct InstanceReport {
  std::string role;  // both | prefill | decode
  int64_t prompts = 0, prompt_tokens = 0, hit_tokens = 0, decoded = 0;
  double busy_s = 0;
};

struct SimReport {
  int64_t requests = 0, completed = 0, rejected = 0, failed = 0;
  std::string first_failure;
  // Prompt tokens of the requests admitted, and those not computed, by where they came from.
  int64_t prompt_tokens = 0, hit_tokens = 0, hit_l1 = 0, hit_dram = 0, hit_disk = 0, hit_fetched = 0;
  int64_t fetches = 0, fetched_blocks = 0, handoffs = 0, handoff_blocks = 0, local_prefills = 0;
  int64_t preemptions = 0, evictions = 0, steps = 0, events = 0;
  // Per completed request: TTFT; TBT (mean gap, requests of >= 2 tokens); queue (arrival to
  // the first step that computes its prompt).
  std::vector<double> ttft_s, tbt_s, queue_s;
  std::vector<double> retry_after_s;           // per rejected request
  std::vector<double> ttft_error_s;            // actual - predicted TTFT, per completed request
  int64_t good = 0;            // completed within both SLOs
  double trace_s = 0;          // span of the arrivals
  double makespan_s = 0;       // last event
  double goodput_rps = 0;      // good / trace_s
  double mean_waiting = 0;     // requests waiting per instance, seen by arrivals
  std::vector<InstanceReport> instances;
};

Result<SimReport> simulate(const SimConfig& cfg, const std::vector<SimRequest>& requests);

}  // namespace larder::sim
