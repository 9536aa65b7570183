// `larder conductor`: the KV-cache-centric front door of a cluster (src/conductor).
//
// SIGTERM / SIGINT: new requests get 503 while those in flight (streams included) finish,
// then exit 0. A second signal closes what is left (the instances cancel those requests).
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <ctime>
#include <string>

#include "cli/commands.h"
#include "cluster/etcd.h"
#include "conductor/conductor.h"
#include "sim/calibration.h"

namespace larder::cli {

int cmd_conductor(Args& a) {
  if (a.port < 0 || a.port > 65535) return fail("--port must be 0..65535");
  conductor::ConductorParams p;
  p.http.host = a.host;
  p.http.port = a.port;
  p.http.api_key = a.api_key;
  auto hopt = http_options(a);
  if (!hopt.ok()) return fail(hopt.error());
  p.http.http_opts = *hopt;
  if (a.threads_http > 0) p.http.http_threads = a.threads_http;
  p.http.cluster_name = a.cluster_name;
  auto prefill = router::parse_instance_list(a.prefill_urls);
  if (!prefill.ok()) return fail("--prefill: " + prefill.error());
  auto decode = router::parse_instance_list(a.decode_urls);
  if (!decode.ok()) return fail("--decode: " + decode.error());
  p.http.prefill = std::move(prefill.value());
  p.http.decode = std::move(decode.value());
  if (!a.cluster.empty()) {
    auto eps = cluster::parse_etcd_url(a.cluster);
    if (!eps.ok()) return fail("--cluster: " + eps.error());
    p.http.etcd_endpoints = std::move(eps.value());
  }
  if (p.http.decode.empty() && p.http.etcd_endpoints.empty())
    return fail("no instance: give --cluster etcd://HOST:PORT (or static --decode HOST:PORT[,HOST:PORT])");
  if (!conductor::parse_policy(a.policy, &p.policy.kind))
    return fail("--policy '" + a.policy + "': want conductor, cache-aware, least-load, round-robin or random");
  if (a.ttft_slo < 0 || a.tbt_slo < 0) return fail("--ttft-slo and --tbt-slo must not be negative");
  p.policy.slo.ttft_s = a.ttft_slo / 1000.0;
  p.policy.slo.tbt_s = a.tbt_slo / 1000.0;
  if (a.transfer_gbps <= 0) return fail("--transfer-gbps must be positive");
  p.policy.transfer_bw = a.transfer_gbps * 1e9;
  p.ramp_s = a.ramp_s;
  if (!a.calibration.empty()) {
    auto cal = sim::load_calibration(a.calibration);
    if (!cal.ok()) return fail("--calibration: " + cal.error());
    p.prior = cal->cost;
    p.policy.transfer_bw = a.transfer_gbps != 1.0 ? a.transfer_gbps * 1e9 : cal->transfer_bw;
    p.policy.transfer_latency_s = cal->transfer_latency_s;
  }
  p.failover = !a.no_failover;
  p.model_path = a.model;
  p.tokenizer_path = a.tokenizer;
  p.verbose = a.verbose;
  if (a.prompt_cache < 0) return fail("--prompt-cache must not be negative");
  p.prompt_cache_entries = static_cast<size_t>(a.prompt_cache);
  p.prompt_cache_echo = !a.prompt_cache_strict;
  if (a.model.empty())
    std::fprintf(stderr, "larder conductor: no --model: prompts are not tokenized, so routing cannot see cached "
                         "prefixes and streams cannot be resumed on another instance\n");

  // Signals are taken by sigwait below; every thread started from here inherits the mask.
  sigset_t sigs = block_stop_signals();
  auto c = conductor::Conductor::start(std::move(p));
  if (!c.ok()) return fail(c.error());
  conductor::Conductor& cd = **c;
  std::fprintf(stderr, "larder conductor: listening on http://%s:%d (policy %s%s)\n", a.host.c_str(), cd.port(),
               a.policy.c_str(),
               a.ttft_slo > 0 || a.tbt_slo > 0
                   ? (", SLO TTFT " + std::to_string(static_cast<int>(a.ttft_slo)) + " ms, TBT " +
                      std::to_string(static_cast<int>(a.tbt_slo)) + " ms")
                         .c_str()
                   : "");
  std::fflush(stderr);

  int sig = 0;
  while (sigwait(&sigs, &sig) != 0) {
  }
  std::fprintf(stderr, "larder conductor: %s: draining %d request(s)\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
               cd.active());
  std::fflush(stderr);
  cd.begin_drain();
  while (cd.active() > 0) {
    timespec ts{0, 50 * 1000 * 1000};
    int s = sigtimedwait(&sigs, nullptr, &ts);
    if (s == SIGINT || s == SIGTERM) {
      std::fprintf(stderr, "larder conductor: second signal: closing %d request(s)\n", cd.active());
      break;
    }
  }
  cd.stop();
  std::fprintf(stderr, "larder conductor: stopped\n");
  return 0;
}

}  // namespace larder::cli
