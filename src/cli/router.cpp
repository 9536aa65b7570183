// `larder router`: the OpenAI-compatible front door of a P/D cluster (src/router).
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
#include "router/router.h"

namespace larder::cli {

int cmd_router(Args& a) {
  if (a.port < 0 || a.port > 65535) return fail("--port must be 0..65535");
  router::RouterParams p;
  p.host = a.host;
  p.port = a.port;
  p.api_key = a.api_key;
  auto hopt = http_options(a);
  if (!hopt.ok()) return fail(hopt.error());
  p.http_opts = *hopt;
  if (a.threads_http > 0) p.http_threads = a.threads_http;
  p.cluster_name = a.cluster_name;
  auto prefill = router::parse_instance_list(a.prefill_urls);
  if (!prefill.ok()) return fail("--prefill: " + prefill.error());
  auto decode = router::parse_instance_list(a.decode_urls);
  if (!decode.ok()) return fail("--decode: " + decode.error());
  p.prefill = std::move(prefill.value());
  p.decode = std::move(decode.value());
  if (!a.cluster.empty()) {
    auto eps = cluster::parse_etcd_url(a.cluster);
    if (!eps.ok()) return fail("--cluster: " + eps.error());
    p.etcd_endpoints = std::move(eps.value());
  }
  if (p.decode.empty() && p.etcd_endpoints.empty())
    return fail("no decode instance: give --decode HOST:PORT[,HOST:PORT] or --cluster etcd://HOST:PORT");

  // Signals are taken by sigwait below; every thread started from here inherits the mask.
  sigset_t sigs = block_stop_signals();

  const size_t n_prefill = p.prefill.size(), n_decode = p.decode.size();
  const bool with_cluster = !p.etcd_endpoints.empty();
  auto r = router::Router::start(std::move(p));
  if (!r.ok()) return fail(r.error());
  router::Router& rt = **r;
  std::fprintf(stderr, "larder router: listening on http://%s:%d\n", a.host.c_str(), rt.port());
  std::string found = with_cluster ? "; discovering cluster '" + a.cluster_name + "' in " + a.cluster : "";
  std::fprintf(stderr, "larder router: %zu prefill and %zu decode instance(s) given%s\n", n_prefill, n_decode,
               found.c_str());
  std::fflush(stderr);

  int sig = 0;
  while (sigwait(&sigs, &sig) != 0) {
  }
  std::fprintf(stderr, "larder router: %s: draining %d request(s)\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
               rt.active());
  std::fflush(stderr);
  rt.begin_drain();
  while (rt.active() > 0) {
    timespec ts{0, 50 * 1000 * 1000};
    int s = sigtimedwait(&sigs, nullptr, &ts);
    if (s == SIGINT || s == SIGTERM) {
      std::fprintf(stderr, "larder router: second signal: closing %d request(s)\n", rt.active());
      break;
    }
  }
  rt.stop();
  std::fprintf(stderr, "larder router: stopped\n");
  return 0;
}

}  // namespace larder::cli
