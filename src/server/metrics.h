// Prometheus metrics of `larder serve` (text exposition format 0.0.4).
//
//   larder_requests_total{endpoint,status}     counter, every HTTP response
//   larder_queue_length                        gauge, requests waiting for the scheduler
//   larder_running_sequences                   gauge
//   larder_kv_blocks_used / _cached / _total   gauges (used: referenced by a sequence;
//                                              cached: unreferenced, reusable prefix blocks)
//   larder_prefix_hit_tokens_total             counter, prompt tokens served from cached KV
//   larder_prompt_tokens_total                 counter, prompt tokens of admitted requests
//   larder_prompt_tokens_computed_total        counter, prompt tokens actually prefilled
//   larder_generated_tokens_total              counter
//   larder_preemptions_total                   counter
//   larder_scheduler_steps_total               counter, batched forward passes
//   larder_requests_active                     gauge, HTTP generation requests in flight
//   larder_ttft_seconds                        histogram, request received -> first token
//   larder_tpot_seconds                        histogram, mean time per output token after the first
//   larder_tokens_per_second                   gauge, generated tokens/s over the last 10 s
//   larder_ffn_*                               counters of a sparse / SSD-streamed FFN (--ffn-offload,
//                                              --ffn-sparsity): tokens, I/O wait / cache / compute
//                                              seconds, bytes read and needed, reads, active and total
//                                              neurons, cache hits and misses
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/prom.h"

namespace larder {
struct SchedulerStats;
}

namespace larder::server {

using prom::Histogram;

class Metrics {
 public:
  Metrics();
  void count_request(const std::string& endpoint, int status);
  void observe_ttft(double seconds) { ttft_.observe(seconds); }
  void observe_tpot(double seconds) { tpot_.observe(seconds); }
  void add_generated(int n);  // feeds the tokens/s window
  // stats may be null (model still loading): scheduler gauges read 0.
  std::string render(const SchedulerStats* stats, int active_requests) const;

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr int kWindow = 10;  // seconds
  double tokens_per_second() const;

  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  Histogram ttft_, tpot_;
  Clock::time_point start_;
  std::array<std::pair<int64_t, int64_t>, kWindow + 2> per_second_{};  // (second since start, tokens)
};

}  // namespace larder::server
