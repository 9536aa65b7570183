// `larder serve`: the OpenAI-compatible HTTP server (src/server) over the scheduler.
//
// SIGTERM / SIGINT: stop accepting (new requests and /health get 503), let running
// and queued requests finish, then exit 0. A second signal while draining cancels
// what is left.
//
// LARDER_WITH_SERVER comes from linking larder_server (a PUBLIC compile definition of
// src/server/CMakeLists.txt): the CLI globs src/cli/*.cpp, so until the server library is
// linked in, this file compiles to nothing instead of breaking the build.
#ifdef LARDER_WITH_SERVER
#include <pthread.h>

#include <cctype>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <algorithm>
#include <memory>
#include <string>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <unistd.h>

#include "cli/commands.h"
#include "cluster/etcd.h"
#include "cluster/membership.h"
#include "pd/pd.h"
#include "kvevents/publisher.h"
#include "kernels/attention_kv.h"
#include "engine/scheduler.h"
#include "model/model.h"
#include "server/server.h"

namespace larder::cli {

namespace {

// The engine's block events, published as KV events (the conductor's index follows them).
class EventsOut final : public kvcache::BlockListener {
 public:
  EventsOut(kvevents::Publisher& pub, int block_size) : pub_(pub), bs_(block_size) {}
  void stored(kvcache::Medium m, const kvcache::BlockHash& h, const kvcache::BlockHash* parent,
              std::span<const int32_t> tokens) override {
    pub_.stored({h}, parent ? std::optional<kvcache::BlockHash>(*parent) : std::nullopt,
                std::vector<int32_t>(tokens.begin(), tokens.end()), bs_, kvcache::medium_name(m));
  }
  void removed(kvcache::Medium m, const kvcache::BlockHash& h) override { pub_.removed({h}, kvcache::medium_name(m)); }

 private:
  kvevents::Publisher& pub_;
  int bs_;
};

}  // namespace

namespace {


// The first IPv4 address of an interface that is up and not loopback ("" = none).
std::string first_ipv4() {
  ifaddrs* ifs = nullptr;
  if (::getifaddrs(&ifs) != 0) return {};
  std::string out;
  for (ifaddrs* i = ifs; i && out.empty(); i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || (i->ifa_flags & IFF_LOOPBACK) || !(i->ifa_flags & IFF_UP))
      continue;
    char buf[INET_ADDRSTRLEN] = {0};
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, buf, sizeof buf);
    out = buf;
  }
  ::freeifaddrs(ifs);
  return out;
}

}  // namespace

int cmd_serve(Args& a) {
  if (a.model.empty()) return fail("no model given (use -m PATH or set LARDER_MODEL)");
  if (a.port < 0 || a.port > 65535) return fail("--port must be 0..65535");
  if (a.parallel < 1) return fail("--parallel must be at least 1");
  if (a.queue < 0) return fail("--queue must not be negative");
  if (a.n_ctx < 0) return fail("--ctx-size must not be negative");
  if (a.role != "prefill" && a.role != "decode" && a.role != "both")
    return fail("--role must be prefill, decode or both, not '" + a.role + "'");
  if (a.pd_fallback != "local" && a.pd_fallback != "error") return fail("--pd-fallback must be local or error");
  if (a.pd_timeout <= 0 || a.pd_lease <= 0) return fail("--pd-timeout and --pd-lease must be positive");
  if (a.cluster_ttl < 2) return fail("--cluster-ttl must be at least 2 seconds");
  if (a.transfer_port < 0 || a.transfer_port > 65535) return fail("--transfer-port must be 0..65535");
  std::vector<std::string> etcd;
  if (!a.cluster.empty()) {
    auto e = cluster::parse_etcd_url(a.cluster);
    if (!e.ok()) return fail("--cluster: " + e.error());
    etcd = *e;
  }
  if (a.kv_blocks < 0) return fail("--kv-blocks must not be negative");
  if (a.kv_blocks > 0 && !a.kv_mem.empty()) return fail("give --kv-blocks or --kv-mem, not both");
  auto kvt = cache_types(a);
  if (!kvt.ok()) return fail(kvt.error());
  int64_t kv_mem = 0;
  if (!a.kv_mem.empty()) {
    kv_mem = parse_size(a.kv_mem);
    if (kv_mem <= 0) return fail("--kv-mem: cannot read size '" + a.kv_mem + "' (e.g. 512M, 2G)");
  }

  // Signals are taken by sigwait below; every thread started from here inherits the mask.
  sigset_t sigs = block_stop_signals();
  std::signal(SIGXFSZ, SIG_IGN);  // a file-size limit must fail the write (the SSD tier turns off), not kill us

  server::ServerParams sp;
  sp.host = a.host;
  sp.port = a.port;
  sp.api_key = a.api_key;
  sp.model_path = a.model;
  sp.alias = a.alias;
  sp.parallel = a.parallel;
  sp.max_queue = a.queue;
  auto hopt = http_options(a);
  if (!hopt.ok()) return fail(hopt.error());
  sp.http_opts = *hopt;
  sp.http_threads = a.threads_http;
  if (a.prompt_cache < 0) return fail("--prompt-cache must not be negative");
  sp.prompt_cache_entries = static_cast<size_t>(a.prompt_cache);
  sp.prompt_cache_echo = !a.prompt_cache_strict;
  sp.documents_dir = a.kv_disk;  // document texts live beside the SSD tier's KV
  server::Server srv(sp);
  if (Status st = srv.start(); !st.ok()) return fail(st.error());
  std::fprintf(stderr, "larder serve: listening on http://%s:%d\n", a.host.c_str(), srv.port());
  std::fflush(stderr);

  auto model = load_model(a.model, a.tokenizer, !a.no_repack, ffn_on_disk(a));
  if (!model.ok()) return fail(model.error());
  const Model& m = **model;
  auto ffn = open_ffn(a, m);
  if (!ffn.ok()) return fail(ffn.error());
  if (*ffn) std::fprintf(stderr, "larder serve: %s\n", (*ffn)->describe().c_str());

  SchedulerParams p;
  p.n_threads = a.n_threads;
  p.max_seq_len = a.n_ctx;
  p.parallel = a.parallel;
  p.max_queue = a.queue;
  p.w8a8 = a.w8a8;
  p.ffn = *ffn;
  p.kv_blocks = a.kv_blocks;
  p.type_k = kvt->first;
  p.type_v = kvt->second;
  if (kv_mem > 0) {
    // The real bytes of a block in the chosen types (f16 holds twice the tokens of f32).
    const ModelConfig& c = m.cfg;
    if (p.type_k == DType::Q8_0 || p.type_v == DType::Q8_0)
      if (c.head_dim % 32) return fail("a q8_0 KV cache needs a head size that is a multiple of 32; this model's is " +
                                       std::to_string(c.head_dim) + " (use f16 or bf16)");
    const int64_t per_block = static_cast<int64_t>(c.n_layer) * c.n_head_kv * p.block_size *
                              static_cast<int64_t>(kernels::kv_row_bytes(p.type_k, c.head_dim) +
                                                   kernels::kv_row_bytes(p.type_v, c.head_dim));
    int64_t n = kv_mem / per_block;
    if (n < 1) return fail("--kv-mem " + a.kv_mem + " is less than one KV block (" + std::to_string(per_block) + " bytes)");
    p.kv_blocks = static_cast<int>(std::min<int64_t>(n, 1 << 30));
  }
  if (!a.kv_dram.empty()) {
    const int64_t n = parse_size(a.kv_dram);
    if (n <= 0) return fail("--kv-dram: cannot read size '" + a.kv_dram + "' (e.g. 512M, 2G)");
    p.store.dram_bytes = static_cast<uint64_t>(n);
    p.store.dram_q8 = a.kv_dram_q8;
  } else if (a.kv_dram_q8) {
    return fail("--kv-dram-q8 needs --kv-dram SIZE");
  }
  if (!a.kv_disk.empty()) {
    const int64_t n = parse_size(a.kv_disk_size);
    if (n <= 0) return fail("--kv-disk-size: cannot read size '" + a.kv_disk_size + "' (e.g. 512M, 20G)");
    p.store.disk_dir = a.kv_disk;
    p.store.disk_bytes = static_cast<uint64_t>(n);
  }
  auto pol = kvcache::parse_policy(a.kv_policy);
  if (!pol.ok()) return fail("--kv-policy: " + pol.error());
  p.store.policy = *pol;
  p.always_load = a.kv_no_load_decision;
  // KV events for a conductor: on with --cluster (any free ports) or --kv-events-port.
  const bool any_host0 = a.host == "0.0.0.0" || a.host == "::";
  std::unique_ptr<kvevents::Publisher> events;
  std::unique_ptr<EventsOut> events_out;
  if (a.kv_events_port >= 0 || !etcd.empty()) {
    kvevents::PublisherParams ep;
    ep.bind_host = any_host0 ? "0.0.0.0" : a.host;
    ep.pub_port = std::max(0, a.kv_events_port);
    ep.replay_port = a.kv_events_port > 0 ? a.kv_events_port + 1 : 0;
    ep.topic = "kv";
    auto pub = kvevents::Publisher::start(ep);
    if (!pub.ok()) return fail("KV events: " + pub.error());
    events = std::move(*pub);
    events_out = std::make_unique<EventsOut>(*events, p.block_size);
    events->cleared();  // a new epoch: nothing held before what follows (the SSD tier is announced next)
    p.block_listener = events_out.get();
  }
  std::unique_ptr<spec::Drafter> drafter;  // outlives the scheduler (declared first)
  if (!a.spec.empty() && a.spec != "none") {
    spec::DrafterOptions o;
    o.n_threads = a.n_threads;
    o.max_seq_len = a.n_ctx > 0 ? a.n_ctx : std::min(m.cfg.n_ctx_train, 4096);
    o.parallel = a.parallel;
    auto d = spec::make_drafter(a.spec, m, o);
    if (!d.ok()) return fail(d.error());
    drafter = std::move(*d);
    p.drafter = drafter.get();
    p.spec_max = a.spec_max;
    p.spec_tree = a.spec_tree;
    p.spec_fixed = a.spec_fixed;
  }
  auto sched = Scheduler::create(m, p);
  if (!sched.ok()) return fail(sched.error());
  Scheduler& s = **sched;
  // P/D: a transfer engine over the pool and the handoff endpoints, for instances that may
  // hand KV over (a role, a cluster, or an explicit transfer port).
  std::unique_ptr<pd::PdNode> pdn;
  // What others reach this instance at: --advertise-host, else --host, else (listening on every
  // interface) this machine's first non-loopback IPv4 address; never the host name, which
  // /etc/hosts often maps to a loopback address.
  const bool any_host = a.host == "0.0.0.0" || a.host == "::";
  std::string advertise = a.advertise_host;
  if (advertise.empty()) advertise = any_host ? first_ipv4() : a.host;
  if (advertise.empty()) advertise = "127.0.0.1";
  const std::string self_api = advertise + ":" + std::to_string(srv.port());
  if (a.role != "both" || !etcd.empty() || a.transfer_port != 0) {
    pd::PdParams pp;
    pp.role = a.role;
    pp.transfer_host = any_host ? "0.0.0.0" : a.host;  // binds where the API listens
    pp.advertise_host = advertise;
    pp.transfer_port = a.transfer_port;
    pp.self_api = self_api;
    pp.api_key = a.api_key;
    pp.timeout_s = a.pd_timeout;
    pp.lease_s = a.pd_lease;
    pp.fallback_local = a.pd_fallback == "local";
    pp.local_prefill = std::max(0, a.pd_local_prefill);
    auto node = pd::PdNode::create(s, pp);
    if (!node.ok()) return fail("KV transfer: " + node.error());
    pdn = std::move(*node);
    srv.attach_pd(pdn.get());
    std::fprintf(stderr, "larder serve: role %s, KV transfer on %s\n", a.role.c_str(), pdn->transfer_address().c_str());
  }
  srv.attach(m, s);
  // Membership: registered in etcd with a lease, refreshed with the load every second.
  std::unique_ptr<cluster::Membership> member;
  if (!etcd.empty()) {
    char hn[256] = {0};
    ::gethostname(hn, sizeof hn - 1);
    cluster::InstanceInfo base;
    base.id = std::string(hn) + "-" + std::to_string(::getpid()) + "-" + std::to_string(srv.port());
    base.role = a.role;
    base.model = s.blocks_identity();
    base.kv_layout = pdn->layout();
    base.api_address = self_api;
    base.transfer_address = pdn->transfer_address();
    base.capacity.parallel = a.parallel;
    base.capacity.threads = a.n_threads;
    const kvcache::CacheIdentity cid = s.cache_identity();
    base.cache.identity = cid.model;
    base.cache.dtype = cid.dtype;
    base.cache.block_size = cid.block_size;
    base.started_ms = cluster::wall_ms();
    if (events) {
      // Peers connect to the advertised address, not to the bind address.
      auto readdress = [&](const std::string& ep) {
        const size_t colon = ep.rfind(':');
        return "tcp://" + advertise + (colon == std::string::npos ? std::string() : ep.substr(colon));
      };
      base.kv_events = readdress(events->pub_endpoint());
      base.kv_replay = readdress(events->replay_endpoint());
    }
    cluster::MembershipParams mp;
    mp.endpoints = etcd;
    mp.cluster = a.cluster_name;
    mp.ttl_s = a.cluster_ttl;
    const auto pv = s.kv_pool();
    const int64_t block_bytes = static_cast<int64_t>(pv.n_layer) * pv.block_size * (pv.k_row + pv.v_row);
    base.capacity.dram_blocks = static_cast<int64_t>(p.store.dram_bytes) / std::max<int64_t>(block_bytes, 1);
    base.capacity.disk_blocks = static_cast<int64_t>(p.store.disk_bytes) / std::max<int64_t>(block_bytes, 1);
    base.cache.block_bytes = block_bytes;
    Scheduler* sp_ = &s;
    auto mem = cluster::Membership::start(mp, [base, sp_] {
      cluster::InstanceInfo i = base;
      const SchedulerStats st = sp_->stats();
      i.capacity.kv_blocks = st.kv_blocks;
      i.load.running = st.running;
      i.load.waiting = st.waiting;
      i.load.free_blocks = st.kv_free + st.kv_cached;
      i.load.queued_prefill_tokens = st.queued_prefill_tokens;
      i.prefill_tokens_per_s = st.prefill_tokens_per_s;
      return i;
    });
    if (!mem.ok()) return fail("--cluster: " + mem.error());
    member = std::move(*mem);
    std::fprintf(stderr, "larder serve: cluster '%s' in etcd %s as %s (%s)\n", a.cluster_name.c_str(), a.cluster.c_str(),
                 base.id.c_str(), a.role.c_str());
  }
  cluster::Membership* mem_raw = member.get();
  const std::string role = a.role, cluster_name = a.cluster_name;
  srv.set_metrics_extra([mem_raw, role, cluster_name](std::string& out) {
    out += "# HELP larder_instance_info this instance's role in a P/D cluster\n# TYPE larder_instance_info gauge\n";
    out += "larder_instance_info{role=\"" + role + "\",cluster=\"" + (mem_raw ? cluster_name : std::string()) + "\"} 1\n";
    if (!mem_raw) return;
    const auto ms = mem_raw->stats();
    out += "# HELP larder_cluster_registered 1 while this instance's registration in etcd is live\n"
           "# TYPE larder_cluster_registered gauge\n";
    out += "larder_cluster_registered " + std::to_string(ms.registered ? 1 : 0) + "\n";
    out += "# HELP larder_cluster_registrations_total registrations in etcd (a new lease each)\n"
           "# TYPE larder_cluster_registrations_total counter\n";
    out += "larder_cluster_registrations_total " + std::to_string(ms.registrations) + "\n";
    out += "# HELP larder_cluster_errors_total failed calls to etcd\n# TYPE larder_cluster_errors_total counter\n";
    out += "larder_cluster_errors_total " + std::to_string(ms.failures) + "\n";
  });
  SchedulerStats st0 = s.stats();
  const int blocks_per_seq = (s.max_seq_len() + p.block_size - 1) / p.block_size;
  const int kv_blocks = st0.kv_blocks > 0 ? st0.kv_blocks : p.kv_blocks > 0 ? p.kv_blocks : p.parallel * blocks_per_seq;
  std::fprintf(stderr,
               "larder serve: ready: model %s, %d KV blocks of %d tokens (cache %s, %.1f MiB), up to %d tokens per "
               "request, %d parallel, queue %d\n",
               a.model.c_str(), kv_blocks, p.block_size, kv_types_name(p.type_k, p.type_v).c_str(),
               static_cast<double>(kv_blocks) * p.block_size * m.cfg.n_layer * m.cfg.n_head_kv *
                   (kernels::kv_row_bytes(p.type_k, m.cfg.head_dim) + kernels::kv_row_bytes(p.type_v, m.cfg.head_dim)) /
                   1048576.0,
               s.max_seq_len(), p.parallel, p.max_queue);
  if (events)
    std::fprintf(stderr, "larder serve: KV events on %s (replay %s)\n", events->pub_endpoint().c_str(),
                 events->replay_endpoint().c_str());
  if (st0.has_store)
    std::fprintf(stderr, "larder serve: kv tiers: DRAM %s%s, SSD %s (%lld blocks found)\n",
                 a.kv_dram.empty() ? "off" : a.kv_dram.c_str(), a.kv_dram_q8 ? " (8-bit)" : "",
                 a.kv_disk.empty() ? "off" : a.kv_disk.c_str(), static_cast<long long>(st0.store.disk.blocks));
  std::fflush(stderr);

  int sig = 0;
  while (sigwait(&sigs, &sig) != 0) {
  }
  std::fprintf(stderr, "larder serve: %s: draining %d request(s)\n", sig == SIGINT ? "SIGINT" : "SIGTERM", srv.active());
  std::fflush(stderr);
  srv.begin_drain();
  bool forced = false;
  while (srv.active() > 0) {
    timespec ts{0, 50 * 1000 * 1000};
    int r = sigtimedwait(&sigs, nullptr, &ts);
    if ((r == SIGINT || r == SIGTERM) && !forced) {
      std::fprintf(stderr, "larder serve: second signal: cancelling %d request(s)\n", srv.active());
      forced = true;
      srv.cancel_all();
    }
  }
  member.reset();  // leaves the cluster at once (lease revoked)
  s.shutdown(/*drain=*/!forced);
  if (Status fl = s.flush_store(); !fl.ok()) std::fprintf(stderr, "larder serve: kv store: %s\n", fl.error().c_str());
  srv.stop();
  pdn.reset();  // no transfer touches the pool after this; the scheduler goes last
  std::fprintf(stderr, "larder serve: stopped\n");
  return 0;
}

}  // namespace larder::cli

#endif  // LARDER_WITH_SERVER
