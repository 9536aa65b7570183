// P/D disaggregation on one instance: the transfer engine over its KV pool, the decode side
// of handoffs (a KvSource per request whose prompt a prefill instance computes) and the
// prefill side (the /internal/pd/* endpoints the server routes here). Protocol: handoff.h.
//
// Wire (HTTP + JSON between the instances' API addresses; KV bytes go through src/transfer):
//   POST /internal/pd/prefill  decode -> prefill: tokens, sampling, layout, where to write;
//                              answered once every write is complete: first token, block names
//   POST /internal/pd/ack      decode -> prefill: the KV was checked and is in use
//   POST /internal/pd/cancel   decode -> prefill: stop writing; answered when nothing is in flight
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/prom.h"
#include "core/result.h"
#include "engine/scheduler.h"

namespace larder::http {
struct Request;
struct Response;
}  // namespace larder::http

namespace larder::transfer {
class Engine;
}

namespace larder::pd {

struct PdParams {
  std::string role = "both";       // prefill | decode | both
  std::string transfer_host = "127.0.0.1";  // the transfer listener binds this (0.0.0.0: every interface)
  std::string advertise_host;      // what peers connect to ("" = transfer_host)
  int transfer_port = 0;
  std::string self_api;            // this instance's advertised API address (a handoff to itself is skipped)
  std::string api_key;             // sent to prefill instances (a cluster shares its key)
  double timeout_s = 120;          // decode: a handoff's deadline
  double grace_s = 2;              // decode: after a cancel or a lost peer, before blocks are reused
  double lease_s = 30;             // prefill: handed-off blocks wait this long for the acknowledgement
  bool fallback_local = true;      // decode: recompute the prompt when the prefill instance fails
  int local_prefill = 64;          // decode: prompts with at most this many uncached tokens are computed here
};

struct PdStats {
  int64_t handoffs_ok = 0, handoffs_failed = 0, handoffs_timeout = 0, handoffs_refused = 0;  // decode side
  int64_t served_ok = 0, served_failed = 0, lease_expired = 0;                             // prefill side
  int64_t ops = 0, bytes = 0, op_failures = 0;                                              // writes posted here
  int64_t fetches_ok = 0, fetches_failed = 0, fetched_tokens = 0;  // KV pool: leading blocks fetched from holders
  double transfer_seconds = 0;     // prefill side: first write posted -> last write complete, summed
  int in_flight_decode = 0, in_flight_prefill = 0;
};

// The layout fingerprint two instances must share to exchange KV blocks.
std::string layout_fingerprint(Scheduler& s);

// A decode instance's request to a prefill instance (POST /internal/pd/prefill, JSON): the prompt, how to
// sample its first token, and where its KV blocks go (the decode instance's registered K/V regions and the
// slot table). Parsed apart from the handler so the fuzz target (fuzz/fuzz_wire.cpp) reaches it.
struct PrefillRequest {
  std::string id, layout;
  std::vector<int32_t> tokens;        // [n] the prompt
  SamplerParams sampling;
  int n_logprobs = 0;
  bool ignore_eos = false;
  std::string salt;
  std::string peer, k_desc, v_desc;   // the decode instance's transfer address and region descriptors
  int d_slots = 0;                    // KV slots in the decode instance's pool (block_size each)
  std::vector<int32_t> dst_table;     // [>= ceil(n / block_size)] decode-side block of each prompt block
  int skip = 0;                       // leading tokens the decode instance already holds (whole blocks)
  bool fetch = false;                 // the prompt's leading blocks may be fetched from this instance
  std::string fetch_api;              // fetch leading blocks first from this holder ("" = none)
  int fetch_tokens = 0;
};

// Parses a prefill request; an error names the field (its code: invalid_json or invalid_value in *code).
Status parse_prefill_request(const std::string& body, PrefillRequest* out, std::string* code);
// Checks that the request's destination blocks cover its prompt on a pool of block_size-token blocks.
Status check_prefill_blocks(const PrefillRequest& r, int block_size);

// Decode side: checks a prefill instance's answer before any received block is used: its layout,
// the names of the prompt's full blocks (expected[j] for block j), and the first token (< n_vocab).
// On success *first holds the first token and its logprobs.
Status verify_answer(const std::string& answer_json, const std::string& layout,
                     const std::vector<kvcache::BlockHash>& expected, int n_prompt, int block_size, int n_vocab,
                     RemoteFirst* first);

class PdNode {
 public:
  static Result<std::unique_ptr<PdNode>> create(Scheduler& sched, const PdParams& p);
  ~PdNode();  // cancels handoffs and stops the transfer engine (call before the scheduler goes)

  const PdParams& params() const { return p_; }
  std::string transfer_address() const;
  const std::string& layout() const { return layout_; }
  // Decode side: the source for a request whose prompt the prefill instance at `prefill_api`
  // (host:port) computes; null when `prefill_api` is this instance.
  // fetch_api/fetch_tokens: the prefill instance first fetches that many leading tokens' KV
  // from the instance at fetch_api (the KV pool; see make_fetch_source).
  std::shared_ptr<KvSource> make_source(const std::string& prefill_api, const GenRequest& req,
                                        const std::string& fetch_api = {}, int fetch_tokens = 0);
  // The KV pool across instances: a source that fetches the KV of the prompt's first n_tokens
  // (rounded down to whole blocks) from the instance at `holder_api`, which holds them in its
  // pool or tiers; the rest is computed here. Null when there is nothing to fetch.
  std::shared_ptr<KvSource> make_fetch_source(const std::string& holder_api, const GenRequest& req, int n_tokens);
  // Prefill side endpoints.
  void handle_prefill(const http::Request& req, http::Response& res);
  void handle_ack(const http::Request& req, http::Response& res);
  void handle_cancel(const http::Request& req, http::Response& res);
  PdStats stats() const;
  // Prometheus lines (larder_pd_*).
  void render_metrics(std::string& out) const;

  struct Impl;

 private:
  PdNode() = default;
  PdParams p_;
  std::string layout_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::pd
