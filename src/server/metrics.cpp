#include "server/metrics.h"

#include <algorithm>
#include <cstdio>

#include "engine/scheduler.h"

using larder::prom::fmt_double;
using larder::prom::header;
using larder::prom::scalar;
using larder::prom::escape_label;

namespace larder::server {

namespace {

// Per-tier series of the KV store (L2 DRAM, L3 SSD), labelled tier="dram"|"disk".
void render_store(std::string& out, const SchedulerStats& st) {
  const auto& k = st.store;
  struct Row {
    const char* tier;
    bool on;
    double blocks, bytes, cap, hits, misses, evictions, load_bytes, load_s;
  };
  const Row rows[] = {
      {"dram", k.has_dram, double(k.dram.blocks), double(k.dram.bytes), double(k.dram.capacity), double(k.dram.hits),
       double(k.dram.misses), double(k.dram.evictions), double(k.dram_load_bytes), k.dram_load_seconds},
      {"disk", k.has_disk, double(k.disk.blocks), double(k.disk.bytes), 0, double(k.disk.hits), double(k.disk.misses),
       double(k.disk.evicted_blocks), double(k.disk_load_bytes), k.disk_load_seconds},
  };
  auto series = [&](const char* name, const char* type, const char* help, double Row::*field) {
    header(out, name, type, help);
    for (const Row& r : rows)
      if (r.on) out += std::string(name) + "{tier=\"" + r.tier + "\"} " + fmt_double(r.*field) + "\n";
  };
  series("larder_kv_tier_blocks", "gauge", "KV blocks held by a tier below the engine's pool.", &Row::blocks);
  series("larder_kv_tier_bytes", "gauge", "Bytes held by a tier (SSD: segment files).", &Row::bytes);
  series("larder_kv_tier_hits_total", "counter", "Blocks read from a tier.", &Row::hits);
  series("larder_kv_tier_misses_total", "counter", "Lookups a tier could not serve.", &Row::misses);
  series("larder_kv_tier_evictions_total", "counter", "Blocks dropped by a tier for capacity.", &Row::evictions);
  series("larder_kv_tier_load_bytes_total", "counter", "Bytes loaded from a tier into the pool.", &Row::load_bytes);
  series("larder_kv_tier_load_seconds_total", "counter", "Time spent reading those bytes (bandwidth = bytes / seconds).",
         &Row::load_s);
  if (k.has_dram) scalar(out, "larder_kv_dram_capacity_bytes", "gauge", "Capacity of the DRAM tier.", double(k.dram.capacity));
  if (k.has_disk) {
    scalar(out, "larder_kv_disk_store_bytes_total", "counter", "Bytes written back to the SSD tier.",
           double(k.disk_store_bytes));
    scalar(out, "larder_kv_disk_store_seconds_total", "counter", "Time spent writing them.", k.disk_store_seconds);
    scalar(out, "larder_kv_disk_writeback_dropped_total", "counter", "Completed blocks not written (SSD behind).",
           double(k.write_dropped));
    scalar(out, "larder_kv_disk_writeback_queue_hits_total", "counter",
           "SSD-tier blocks loaded from the write-back queue (not written yet).", double(k.write_queue_hits));
    scalar(out, "larder_kv_disk_corrupt_records_total", "counter", "Corrupt or torn SSD records found (served as misses).",
           double(k.disk.corrupt_records));
    scalar(out, "larder_kv_disk_write_errors_total", "counter", "SSD write errors.", double(k.disk.write_errors));
    scalar(out, "larder_kv_disk_disabled", "gauge", "1 when the SSD tier turned itself off (disk full or unwritable).",
           k.disk.disabled ? 1 : 0);
  }
  header(out, "larder_kv_load_decisions_total", "counter", "Per block found in a tier: loaded or recomputed.");
  out += "larder_kv_load_decisions_total{decision=\"load\"} " + fmt_double(double(k.decide_load)) + "\n";
  out += "larder_kv_load_decisions_total{decision=\"recompute\"} " + fmt_double(double(k.decide_recompute)) + "\n";
  scalar(out, "larder_kv_load_failed_total", "counter", "Tier blocks that could not be read back (recomputed).",
         double(k.load_failed));
  scalar(out, "larder_kv_tier_hit_tokens_total", "counter", "Prompt tokens whose KV was loaded from DRAM/SSD tiers.",
         double(st.tier_hit_tokens));
  scalar(out, "larder_prefill_tokens_per_second", "gauge", "Measured prefill speed (drives load-vs-recompute).",
         st.prefill_tokens_per_s);
}

}  // namespace

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      tpot_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      start_(Clock::now()) {
  for (auto& p : per_second_) p = {-1, 0};
}

void Metrics::count_request(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lk(mu_);
  requests_[{endpoint, status}]++;
}

void Metrics::add_generated(int n) {
  int64_t sec = std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - start_).count();
  std::lock_guard<std::mutex> lk(mu_);
  auto& slot = per_second_[static_cast<size_t>(sec) % per_second_.size()];
  if (slot.first != sec) slot = {sec, 0};
  slot.second += n;
}

double Metrics::tokens_per_second() const {
  double up = std::chrono::duration<double>(Clock::now() - start_).count();
  int64_t now = static_cast<int64_t>(up);
  int64_t total = 0;
  // The current (partial) second plus the kWindow-1 before it.
  for (auto& [sec, n] : per_second_)
    if (sec >= 0 && sec > now - kWindow && sec <= now) total += n;
  double window = std::min<double>(kWindow - 1 + (up - static_cast<double>(now)), up);
  return window > 0.05 ? static_cast<double>(total) / window : 0.0;
}

std::string Metrics::render(const SchedulerStats* st, int active_requests) const {
  SchedulerStats z;
  if (!st) st = &z;
  std::string out;
  out.reserve(4096);
  {
    std::lock_guard<std::mutex> lk(mu_);
    header(out, "larder_requests_total", "counter", "HTTP responses by endpoint and status code.");
    for (auto& [k, n] : requests_)
      out += "larder_requests_total{endpoint=\"" + escape_label(k.first) + "\",status=\"" + std::to_string(k.second) +
             "\"} " + std::to_string(n) + "\n";
  }
  scalar(out, "larder_queue_length", "gauge", "Requests waiting to be scheduled.", st->waiting);
  scalar(out, "larder_running_sequences", "gauge", "Sequences being prefilled or generated.", st->running);
  scalar(out, "larder_requests_active", "gauge", "Generation requests in flight over HTTP.", active_requests);
  scalar(out, "larder_kv_blocks_used", "gauge", "KV blocks referenced by sequences.", st->kv_used);
  scalar(out, "larder_kv_blocks_cached", "gauge", "Unreferenced KV blocks kept for prefix reuse.", st->kv_cached);
  scalar(out, "larder_kv_blocks_total", "gauge", "KV blocks in the pool.", st->kv_blocks);
  scalar(out, "larder_prefix_hit_tokens_total", "counter", "Prompt tokens served from cached KV.",
         static_cast<double>(st->prefix_hit_tokens));
  scalar(out, "larder_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
         static_cast<double>(st->prompt_tokens));
  scalar(out, "larder_prompt_tokens_computed_total", "counter", "Prompt tokens actually prefilled.",
         static_cast<double>(st->computed_prompt_tokens));
  scalar(out, "larder_generated_tokens_total", "counter", "Generated tokens.", static_cast<double>(st->generated_tokens));
  scalar(out, "larder_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
         static_cast<double>(st->preemptions));
  scalar(out, "larder_scheduler_steps_total", "counter", "Batched forward passes (steps) run by the scheduler.",
         static_cast<double>(st->steps));
  scalar(out, "larder_document_requests_total", "counter", "Requests whose documents were composed from stored KV.",
         static_cast<double>(st->doc_requests));
  scalar(out, "larder_document_tokens_reused_total", "counter", "Document tokens whose KV came from a stored encoding.",
         static_cast<double>(st->doc_tokens_reused));
  scalar(out, "larder_document_tokens_encoded_total", "counter", "Document tokens encoded (first use, or evicted).",
         static_cast<double>(st->doc_tokens_encoded));
  scalar(out, "larder_document_token_layers_recomputed_total", "counter",
         "Document token-layers recomputed by composition repairs (blend, link, focus).",
         static_cast<double>(st->doc_token_layers_recomputed));
  if (st->has_ffn) {  // sparse / SSD-streamed FFN
    const auto& f = st->ffn;
    scalar(out, "larder_ffn_tokens_total", "counter", "Token rows through the sparse FFN.", static_cast<double>(f.tokens));
    scalar(out, "larder_ffn_io_wait_seconds_total", "counter", "Time waiting for FFN neuron reads from SSD.", f.io_wait_s);
    scalar(out, "larder_ffn_cache_seconds_total", "counter", "Time managing the FFN neuron cache (active sets, moves, checksums).",
           f.cache_s);
    scalar(out, "larder_ffn_compute_seconds_total", "counter", "Time computing the FFN over active neurons.", f.compute_s);
    scalar(out, "larder_ffn_read_bytes_total", "counter", "Bytes of FFN neuron records read from SSD.",
           static_cast<double>(f.bytes_read));
    scalar(out, "larder_ffn_needed_bytes_total", "counter", "Bytes of the missing neurons' records (reads also span small gaps).",
           static_cast<double>(f.bytes_needed));
    scalar(out, "larder_ffn_reads_total", "counter", "FFN read operations (runs of consecutive neurons).",
           static_cast<double>(f.reads));
    scalar(out, "larder_ffn_active_neurons_total", "counter", "Active FFN neurons, summed over layers and tokens.",
           static_cast<double>(f.active));
    scalar(out, "larder_ffn_neurons_total", "counter", "FFN neurons, summed over layers and tokens (active fraction = active / this).",
           static_cast<double>(f.neurons));
    scalar(out, "larder_ffn_cache_hits_total", "counter", "Active neurons found in the DRAM neuron cache.", static_cast<double>(f.hits));
    scalar(out, "larder_ffn_cache_misses_total", "counter", "Active neurons read from SSD.", static_cast<double>(f.misses));
  }
  if (!st->drafter.empty()) {
    // Speculative decoding, per drafter (one per server).
    const std::string lab = "{drafter=\"" + escape_label(st->drafter) + "\"}";
    header(out, "larder_spec_passes_total", "counter", "Verify passes that checked a draft.");
    out += "larder_spec_passes_total" + lab + " " + std::to_string(st->spec_passes) + "\n";
    header(out, "larder_spec_proposed_tokens_total", "counter", "Draft tokens verified.");
    out += "larder_spec_proposed_tokens_total" + lab + " " + std::to_string(st->spec_proposed) + "\n";
    header(out, "larder_spec_accepted_tokens_total", "counter", "Draft tokens accepted (kept without a pass of their own).");
    out += "larder_spec_accepted_tokens_total" + lab + " " + std::to_string(st->spec_accepted) + "\n";
    header(out, "larder_spec_accepted_length", "histogram", "Draft tokens accepted per verify pass.");
    int64_t cum = 0, sum = 0;
    for (size_t k = 0; k < st->spec_accept_hist.size(); ++k) {
      cum += st->spec_accept_hist[k];
      sum += static_cast<int64_t>(k) * st->spec_accept_hist[k];
      out += "larder_spec_accepted_length_bucket{drafter=\"" + escape_label(st->drafter) + "\",le=\"" + std::to_string(k) +
             "\"} " + std::to_string(cum) + "\n";
    }
    out += "larder_spec_accepted_length_bucket{drafter=\"" + escape_label(st->drafter) + "\",le=\"+Inf\"} " +
           std::to_string(cum) + "\n";
    out += "larder_spec_accepted_length_sum" + lab + " " + std::to_string(sum) + "\n";
    out += "larder_spec_accepted_length_count" + lab + " " + std::to_string(cum) + "\n";
    scalar(out, "larder_spec_row_cost_seconds", "gauge", "Fitted cost of one more row in a forward pass.", st->spec_row_cost_s);
    scalar(out, "larder_spec_pass_cost_seconds", "gauge", "Fitted fixed cost of a forward pass.", st->spec_pass_cost_s);
  }
  if (st->has_store) render_store(out, *st);
  header(out, "larder_ttft_seconds", "histogram", "Time from request to first generated token.");
  ttft_.render(out, "larder_ttft_seconds");
  header(out, "larder_tpot_seconds", "histogram", "Mean time per output token after the first, per request.");
  tpot_.render(out, "larder_tpot_seconds");
  double tps;
  {
    std::lock_guard<std::mutex> lk(mu_);
    tps = tokens_per_second();
  }
  scalar(out, "larder_tokens_per_second", "gauge", "Generated tokens per second over the last 10 seconds.", tps);
  return out;
}

}  // namespace larder::server
