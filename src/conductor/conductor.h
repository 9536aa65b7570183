// `larder conductor`: the KV-cache-centric front door of a cluster (Mooncake's conductor,
// made concrete). The HTTP layer is src/router (same API, streaming and errors as `larder
// serve`); this supplies its hooks:
//   - follows the instances (etcd, through cluster::Directory) and their KV events
//     (kvevents::SubscriberSet) into a global index (KvIndex);
//   - names each prompt's blocks exactly as the instances do (their tokenizer, chat template,
//     block size and identity root from their registrations), asks the index who holds what,
//     and routes with conductor::route (policy.h): prefill by predicted TTFT (queue + compute of
//     the missing tokens + tier loads + fetching a holder's extra blocks when that beats
//     recomputing), decode by load;
//   - SLO admission: a request nobody can serve within --ttft-slo/--tbt-slo gets 429 with
//     Retry-After at once;
//   - sends the instance the prompt's token ids (so both sides name the same blocks) and asks
//     for the generated ids back (stripped before the client sees them), so that when a decode
//     instance dies mid-stream the request is re-issued elsewhere with what was generated so
//     far and the client's stream goes on;
//   - counts load on every path (its own in-flight accounting, never reset by registrations),
//     ramps up instances that just (re)started, refits each instance's cost model as it runs,
//     and reports goodput, rejections and the predicted-vs-measured TTFT error on /metrics.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "conductor/index.h"
#include "conductor/policy.h"
#include "core/result.h"
#include "router/router.h"

namespace larder::conductor {

struct ConductorParams {
  router::RouterParams http;   // listen address, api key, static instances, etcd
  std::string model_path;      // tokenizer + chat template for naming blocks ("" = no cache-aware routing)
  std::string tokenizer_path;  // for llama2.c models
  PolicyParams policy;
  double ramp_s = 10;          // a (re)started instance reaches its full share after this long
  double sync_wait_s = 3;      // at start: wait this long at most for the index to catch up
  bool failover = true;
  // Each instance's cost model until its own measurements replace it (`larder calibrate`).
  std::optional<CostModel> prior;
  // Like `larder serve --prompt-cache N` (0 = off): must match the instances' setting, so the
  // conductor tokenizes a conversation's next turn exactly as they would.
  size_t prompt_cache_entries = 256;
  bool prompt_cache_echo = true;
  bool verbose = false;
};

class Conductor {
 public:
  static Result<std::unique_ptr<Conductor>> start(ConductorParams p);
  ~Conductor();
  int port() const;
  void begin_drain();
  int active() const;
  void stop();
  // Block names of a prompt as the conductor computes them (for tests: they must equal the
  // instances'). Empty without a tokenizer or before an instance registered its cache identity.
  std::vector<kvcache::BlockHash> names(const std::vector<int32_t>& tokens) const;
  const KvIndex& index() const;

  struct Impl;

 private:
  Conductor() = default;
  std::shared_ptr<Impl> keep_;  // shared with the router, which holds it as its hooks
  Impl* impl_raw_ = nullptr;
};

}  // namespace larder::conductor
