// `larder simulate`: a trace replayed on a simulated cluster (src/sim/sim.h) whose instances
// cost what `larder calibrate` measured, routed by the conductor's policies.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/commands.h"
#include "sim/sim.h"

namespace larder::cli {

namespace {

using json = nlohmann::ordered_json;

// "N" (colocated) or "P,D".
bool parse_instances(const std::string& s, sim::SimConfig& c) {
  auto num = [](const std::string& x, int* out) {
    if (x.empty() || x.size() > 6 || x.find_first_not_of("0123456789") != std::string::npos) return false;
    *out = std::stoi(x);
    return true;
  };
  const size_t comma = s.find(',');
  if (comma == std::string::npos) return num(s, &c.n_both) && c.n_both > 0;
  return num(s.substr(0, comma), &c.n_prefill) && num(s.substr(comma + 1), &c.n_decode) && c.n_prefill > 0 &&
         c.n_decode > 0;
}

json stats(const std::vector<double>& v) {
  auto num = [](double x) { return std::isnan(x) ? json(nullptr) : json(x); };
  double s = 0;
  for (double x : v) s += x;
  return {{"p50", num(sim::percentile(v, 0.5))}, {"p90", num(sim::percentile(v, 0.9))},
          {"p99", num(sim::percentile(v, 0.99))}, {"mean", v.empty() ? json(nullptr) : json(s / v.size())},
          {"n", v.size()}};
}

std::string ms3(const std::vector<double>& v) {
  if (v.empty()) return "n/a";
  char b[96];
  std::snprintf(b, sizeof b, "p50 %.1f  p90 %.1f  p99 %.1f ms", 1e3 * sim::percentile(v, 0.5),
                1e3 * sim::percentile(v, 0.9), 1e3 * sim::percentile(v, 0.99));
  return b;
}

double frac(int64_t n, int64_t d) { return d > 0 ? static_cast<double>(n) / d : 0.0; }

}  // namespace

int cmd_simulate(Args& a) {
  if (a.trace.empty()) return fail("simulate needs --trace FILE");
  if (a.calibration.empty()) return fail("simulate needs --calibration FILE (from `larder calibrate`)");
  if (std::string why = sim::check_scale(a.replay_scale); !why.empty()) return fail(why);
  if (!(a.replay_speed > 0) || !std::isfinite(a.replay_speed)) return fail("--speed must be a positive number");
  if (a.replay_limit < 0) return fail("--limit must be >= 0");
  if (!(a.ttft_slo >= 0) || !(a.tbt_slo >= 0)) return fail("--ttft-slo and --tbt-slo must be >= 0 (ms)");
  sim::SimConfig cfg;
  if (!parse_instances(a.instances, cfg))
    return fail("--instances must be N (colocated) or P,D (prefill, decode), each positive; got '" + a.instances + "'");
  if (!conductor::parse_policy(a.policy, &cfg.policy))
    return fail("--policy must be random, round-robin, least-load, cache-aware or conductor; got '" + a.policy + "'");
  auto cal = sim::load_calibration(a.calibration);
  if (!cal.ok()) return fail(cal.error());
  cfg.calib = *cal;
  cfg.slo.ttft_s = a.ttft_slo / 1e3;
  cfg.slo.tbt_s = a.tbt_slo / 1e3;
  cfg.local_prefill_tokens = std::max(0, a.pd_local_prefill);
  cfg.seed = static_cast<uint64_t>(a.sim_seed);

  auto trace = sim::load_trace(a.trace, a.replay_limit, a.replay_skip);
  if (!trace.ok()) return fail(trace.error());
  const auto plans = sim::plan_trace(*trace, a.replay_scale, cfg.calib.max_seq_len);
  int clipped = 0;
  for (const auto& p : plans) clipped += p.clipped;
  const auto reqs = sim::requests_from_trace(*trace, plans, a.replay_scale, a.replay_speed, cfg.calib.block_size);
  const auto t0 = std::chrono::steady_clock::now();
  auto res = sim::simulate(cfg, reqs);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!res.ok()) return fail(res.error());
  const sim::SimReport& r = *res;

  const std::string shape = cfg.n_both > 0 ? std::to_string(cfg.n_both) + " colocated"
                                           : std::to_string(cfg.n_prefill) + " prefill + " +
                                                 std::to_string(cfg.n_decode) + " decode";
  if (a.json) {
    json j = json::object();
    j["trace"] = a.trace;
    j["calibration"] = a.calibration;
    j["model"] = cfg.calib.model;
    j["instances"] = {{"both", cfg.n_both}, {"prefill", cfg.n_prefill}, {"decode", cfg.n_decode}};
    j["policy"] = conductor::policy_name(cfg.policy);
    j["scale"] = a.replay_scale;
    j["speed"] = a.replay_speed;
    j["limit"] = a.replay_limit;
    j["seed"] = a.sim_seed;
    j["ttft_slo_s"] = cfg.slo.ttft_s > 0 ? json(cfg.slo.ttft_s) : json(nullptr);
    j["tbt_slo_s"] = cfg.slo.tbt_s > 0 ? json(cfg.slo.tbt_s) : json(nullptr);
    j["requests"] = r.requests;
    j["completed"] = r.completed;
    j["rejected"] = r.rejected;
    j["failed"] = r.failed;
    j["first_failure"] = r.first_failure.empty() ? json(nullptr) : json(r.first_failure);
    j["clipped"] = clipped;
    j["prompt_tokens"] = r.prompt_tokens;
    j["hit_tokens"] = r.hit_tokens;
    j["hit_rate"] = frac(r.hit_tokens, r.prompt_tokens);
    j["hit_rate_by_tier"] = {{"l1", frac(r.hit_l1, r.prompt_tokens)},
                             {"dram", frac(r.hit_dram, r.prompt_tokens)},
                             {"disk", frac(r.hit_disk, r.prompt_tokens)},
                             {"fetched", frac(r.hit_fetched, r.prompt_tokens)}};
    j["ttft_s"] = stats(r.ttft_s);
    j["tbt_s"] = stats(r.tbt_s);
    j["queue_s"] = stats(r.queue_s);
    j["ttft_error_s"] = stats(r.ttft_error_s);
    j["retry_after_s"] = stats(r.retry_after_s);
    j["good"] = r.good;
    j["goodput_rps"] = r.goodput_rps;
    j["trace_s"] = r.trace_s;
    j["makespan_s"] = r.makespan_s;
    j["mean_waiting"] = r.mean_waiting;
    j["fetches"] = r.fetches;
    j["fetched_blocks"] = r.fetched_blocks;
    j["handoffs"] = r.handoffs;
    j["handoff_blocks"] = r.handoff_blocks;
    j["local_prefills"] = r.local_prefills;
    j["preemptions"] = r.preemptions;
    j["evictions"] = r.evictions;
    j["steps"] = r.steps;
    j["events"] = r.events;
    j["wall_s"] = wall;
    json per = json::array();
    for (const auto& in : r.instances)
      per.push_back({{"role", in.role}, {"prompts", in.prompts}, {"prompt_tokens", in.prompt_tokens},
                     {"hit_tokens", in.hit_tokens}, {"decoded", in.decoded},
                     {"utilization", r.makespan_s > 0 ? in.busy_s / r.makespan_s : 0.0}});
    j["per_instance"] = per;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("simulated %s: %lld requests at scale 1/%d, speed %gx, on %s instances, policy %s (calibration: %s)\n",
              a.trace.c_str(), static_cast<long long>(r.requests), a.replay_scale, a.replay_speed, shape.c_str(),
              conductor::policy_name(cfg.policy), cfg.calib.model.empty() ? a.calibration.c_str() : cfg.calib.model.c_str());
  std::printf("requests:   completed %lld  rejected %lld  failed %lld  clipped %d\n", static_cast<long long>(r.completed),
              static_cast<long long>(r.rejected), static_cast<long long>(r.failed), clipped);
  if (!r.first_failure.empty()) std::printf("first failure: %s\n", r.first_failure.c_str());
  std::printf("hit rate:   %.1f%% of %lld prompt tokens (pool %.1f%%, DRAM %.1f%%, SSD %.1f%%, fetched %.1f%%)\n",
              100 * frac(r.hit_tokens, r.prompt_tokens), static_cast<long long>(r.prompt_tokens),
              100 * frac(r.hit_l1, r.prompt_tokens), 100 * frac(r.hit_dram, r.prompt_tokens),
              100 * frac(r.hit_disk, r.prompt_tokens), 100 * frac(r.hit_fetched, r.prompt_tokens));
  std::printf("TTFT:       %s\n", ms3(r.ttft_s).c_str());
  std::printf("TBT:        %s\n", ms3(r.tbt_s).c_str());
  double q = 0;
  for (double x : r.queue_s) q += x;
  std::printf("queue:      mean %.1f ms until its prompt's first step, %.2f requests waiting per instance (seen by arrivals)\n",
              r.queue_s.empty() ? 0.0 : 1e3 * q / r.queue_s.size(), r.mean_waiting);
  char slo[96] = "no SLO";
  if (cfg.slo.ttft_s > 0 || cfg.slo.tbt_s > 0)
    std::snprintf(slo, sizeof slo, "TTFT <= %g ms, TBT <= %g ms", a.ttft_slo, a.tbt_slo);
  std::printf("goodput:    %lld requests within %s: %.3f requests/s over %.1f s of trace time\n",
              static_cast<long long>(r.good), slo, r.goodput_rps, r.trace_s);
  if (r.rejected > 0) std::printf("rejected:   Retry-After %s\n", ms3(r.retry_after_s).c_str());
  std::printf("transfers:  %lld fetches (%lld blocks), %lld handoffs (%lld blocks), %lld local prefills; %lld preemptions\n",
              static_cast<long long>(r.fetches), static_cast<long long>(r.fetched_blocks),
              static_cast<long long>(r.handoffs), static_cast<long long>(r.handoff_blocks),
              static_cast<long long>(r.local_prefills), static_cast<long long>(r.preemptions));
  std::printf("simulated:  %.1f s of cluster time, %lld steps, %lld events in %.2f s\n", r.makespan_s,
              static_cast<long long>(r.steps), static_cast<long long>(r.events), wall);
  return 0;
}

}  // namespace larder::cli
