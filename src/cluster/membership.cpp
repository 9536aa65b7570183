#include "cluster/membership.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>
#include <set>
#include <thread>

namespace larder::cluster {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// Field access for instance_from_json: a missing optional field keeps its default; a present
// field of the wrong type (or a missing required one) records the first error.
struct FieldReader {
  std::string err;

  const json* find(const json& obj, const char* key, const std::string& path, bool required) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      if (required && err.empty()) err = "missing required field '" + path + "'";
      return nullptr;
    }
    return &*it;
  }
  void str(const json& obj, const char* key, std::string& out, bool required = false) {
    const json* v = find(obj, key, key, required);
    if (!v) return;
    if (!v->is_string()) {
      if (err.empty()) err = std::string("field '") + key + "' must be a string";
      return;
    }
    out = v->get<std::string>();
  }
  template <class T>
  void num(const json& obj, const char* key, const std::string& path, T& out) {
    const json* v = find(obj, key, path, false);
    if (!v) return;
    if (!v->is_number_integer()) {
      if (err.empty()) err = "field '" + path + "' must be an integer";
      return;
    }
    out = static_cast<T>(v->get<int64_t>());
  }
  const json* object(const json& obj, const char* key) {
    const json* v = find(obj, key, key, false);
    if (v && !v->is_object()) {
      if (err.empty()) err = std::string("field '") + key + "' must be an object";
      return nullptr;
    }
    return v;
  }
};

}  // namespace

json to_json(const InstanceInfo& i) {
  json j = json::object();
  j["id"] = i.id;
  j["role"] = i.role;
  j["model"] = i.model;
  j["kv_layout"] = i.kv_layout;
  j["api_address"] = i.api_address;
  j["transfer_address"] = i.transfer_address;
  j["capacity"] = json{{"kv_blocks", i.capacity.kv_blocks},
                       {"dram_blocks", i.capacity.dram_blocks},
                       {"disk_blocks", i.capacity.disk_blocks},
                       {"parallel", i.capacity.parallel},
                       {"threads", i.capacity.threads}};
  j["load"] = json{{"running", i.load.running},
                   {"waiting", i.load.waiting},
                   {"free_blocks", i.load.free_blocks},
                   {"queued_prefill_tokens", i.load.queued_prefill_tokens}};
  j["kv_events"] = i.kv_events;
  j["kv_replay"] = i.kv_replay;
  j["cache"] = json{{"identity", i.cache.identity},
                    {"dtype", i.cache.dtype},
                    {"block_size", i.cache.block_size},
                    {"block_bytes", i.cache.block_bytes}};
  j["prefill_tokens_per_s"] = i.prefill_tokens_per_s;
  j["started_ms"] = i.started_ms;
  j["updated_ms"] = i.updated_ms;
  return j;
}

Result<InstanceInfo> instance_from_json(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return make_error("instance: not valid JSON");
  if (!j.is_object()) return make_error("instance: not a JSON object");
  InstanceInfo i;
  FieldReader r;
  r.str(j, "id", i.id, true);
  r.str(j, "role", i.role, true);
  r.str(j, "api_address", i.api_address, true);
  r.str(j, "model", i.model);
  r.str(j, "kv_layout", i.kv_layout);
  r.str(j, "transfer_address", i.transfer_address);
  if (const json* c = r.object(j, "capacity")) {
    r.num(*c, "kv_blocks", "capacity.kv_blocks", i.capacity.kv_blocks);
    r.num(*c, "dram_blocks", "capacity.dram_blocks", i.capacity.dram_blocks);
    r.num(*c, "disk_blocks", "capacity.disk_blocks", i.capacity.disk_blocks);
    r.num(*c, "parallel", "capacity.parallel", i.capacity.parallel);
    r.num(*c, "threads", "capacity.threads", i.capacity.threads);
  }
  if (const json* l = r.object(j, "load")) {
    r.num(*l, "running", "load.running", i.load.running);
    r.num(*l, "waiting", "load.waiting", i.load.waiting);
    r.num(*l, "free_blocks", "load.free_blocks", i.load.free_blocks);
    r.num(*l, "queued_prefill_tokens", "load.queued_prefill_tokens", i.load.queued_prefill_tokens);
  }
  r.str(j, "kv_events", i.kv_events);
  r.str(j, "kv_replay", i.kv_replay);
  if (const json* c = r.object(j, "cache")) {
    r.str(*c, "identity", i.cache.identity);
    r.str(*c, "dtype", i.cache.dtype);
    r.num(*c, "block_size", "cache.block_size", i.cache.block_size);
    r.num(*c, "block_bytes", "cache.block_bytes", i.cache.block_bytes);
  }
  if (auto it = j.find("prefill_tokens_per_s"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) {
      if (r.err.empty()) r.err = "field 'prefill_tokens_per_s' must be a number";
    } else {
      i.prefill_tokens_per_s = it->get<double>();
    }
  }
  r.num(j, "started_ms", "started_ms", i.started_ms);
  r.num(j, "updated_ms", "updated_ms", i.updated_ms);
  if (!r.err.empty()) return make_error("instance: %s", r.err.c_str());
  if (i.id.empty()) return make_error("instance: field 'id' is empty");
  if (i.api_address.empty()) return make_error("instance '%s': field 'api_address' is empty", i.id.c_str());
  if (!i.can_prefill() && !i.can_decode())
    return make_error("instance '%s': role '%s' is not prefill, decode or both", i.id.c_str(), i.role.c_str());
  return i;
}

std::string instances_prefix(const std::string& cluster) { return "/larder/" + cluster + "/instances/"; }

std::string instance_key(const std::string& cluster, const std::string& id) { return instances_prefix(cluster) + id; }

std::string make_instance_id() {
  char host[256] = {0};
  if (gethostname(host, sizeof host - 1) != 0 || !host[0]) std::snprintf(host, sizeof host, "host");
  std::mt19937_64 rng(std::random_device{}() ^ static_cast<uint64_t>(Clock::now().time_since_epoch().count()));
  char buf[384];
  std::snprintf(buf, sizeof buf, "%s-%d-%06llx", host, static_cast<int>(getpid()),
                static_cast<unsigned long long>(rng() & 0xffffff));
  return buf;
}

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

namespace {

// A cluster name becomes part of a key: keep it one plain path segment.
Status check_cluster_name(const std::string& c) {
  if (c.empty()) return make_error("cluster name is empty");
  for (char ch : c)
    if (ch == '/' || static_cast<unsigned char>(ch) < 0x20)
      return make_error("cluster name '%s' must not contain '/' or control characters", c.c_str());
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Membership

struct Membership::Impl {
  MembershipParams p;
  std::function<InstanceInfo()> snapshot;
  EtcdClient etcd;

  mutable std::mutex mu;  // guards st and stopping
  std::condition_variable cv;
  bool stopping = false;
  MembershipStats st;

  // Membership-thread state (stop() reads lease after the join).
  int64_t lease = 0;
  bool failing = false;     // a failure was reported on stderr and nothing succeeded since
  bool lease_lost = false;  // the last step found the lease gone (not a transport failure)
  std::thread th;

  Impl(MembershipParams params, std::function<InstanceInfo()> snap)
      : p(std::move(params)), snapshot(std::move(snap)), etcd(p.endpoints, p.timeout_ms) {}

  std::string value(std::string& key) {
    InstanceInfo info = snapshot();
    info.updated_ms = wall_ms();
    key = instance_key(p.cluster, info.id);
    return to_json(info).dump();
  }

  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lk(mu);
      st.failures++;
      st.last_error = msg;
      st.registered = false;
    }
    // One line per outage, not one per retry.
    if (!failing) {
      std::fprintf(stderr, "larder: cluster: not registered in etcd: %s (retrying in the background)\n", msg.c_str());
      std::fflush(stderr);
      failing = true;
    }
  }

  void succeeded(bool registration, const std::string& key) {
    {
      std::lock_guard<std::mutex> lk(mu);
      st.registered = true;
      if (registration) st.registrations++;
      else st.refreshes++;
    }
    if (failing) {
      std::fprintf(stderr, "larder: cluster: registered in etcd again (%s)\n", key.c_str());
      std::fflush(stderr);
      failing = false;
    }
  }

  // A new lease and the key under it.
  bool register_once() {
    auto l = etcd.lease_grant(p.ttl_s);
    if (!l.ok()) {
      fail(l.error());
      return false;
    }
    std::string key;
    std::string v = value(key);
    if (Status s = etcd.put(key, v, *l); !s.ok()) {
      fail(s.error());
      (void)etcd.lease_revoke(*l);  // best effort; it would expire anyway
      return false;
    }
    lease = *l;
    succeeded(true, key);
    return true;
  }

  bool keepalive() {
    auto ttl = etcd.lease_keepalive(lease);
    if (!ttl.ok()) {
      fail(ttl.error());
      return false;
    }
    if (*ttl <= 0) {  // expired meanwhile (etcd was away longer than the TTL): register anew
      lease = 0;
      lease_lost = true;
      fail("the lease expired");
      return false;
    }
    return true;
  }

  bool refresh() {
    std::string key;
    std::string v = value(key);
    if (Status s = etcd.put(key, v, lease); !s.ok()) {
      if (s.error().find("lease not found") != std::string::npos) {
        lease = 0;
        lease_lost = true;
      }
      fail(s.error());
      return false;
    }
    succeeded(false, key);
    return true;
  }

  void run() {
    const auto keepalive_every = std::chrono::milliseconds(std::max(200, p.ttl_s * 1000 / 3));
    const auto refresh_every =
        std::chrono::milliseconds(std::max<int64_t>(50, static_cast<int64_t>(p.refresh_s * 1000)));
    auto backoff = std::chrono::milliseconds(100);
    auto next_keepalive = Clock::now(), next_refresh = Clock::now();
    std::unique_lock<std::mutex> lk(mu);
    while (!stopping) {
      lk.unlock();
      bool ok = true;
      if (lease == 0) {
        ok = register_once();
        if (ok) {
          next_keepalive = Clock::now() + keepalive_every;
          next_refresh = Clock::now() + refresh_every;
        }
      } else {
        auto now = Clock::now();
        if (now >= next_keepalive) {
          ok = keepalive();
          if (ok) next_keepalive = now + keepalive_every;
        }
        if (ok && now >= next_refresh) {
          ok = refresh();
          if (ok) next_refresh = now + refresh_every;
        }
      }
      Clock::time_point until;
      if (ok) {
        backoff = std::chrono::milliseconds(100);
        until = std::min(next_keepalive, next_refresh);
      } else if (lease == 0 && lease_lost) {
        until = Clock::now();  // etcd answers but the lease is gone: register anew at once
      } else {
        until = Clock::now() + backoff;
        backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::milliseconds(1000));
      }
      lease_lost = false;
      lk.lock();
      cv.wait_until(lk, until, [&] { return stopping; });
    }
  }
};

Membership::Membership(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<Membership>> Membership::start(MembershipParams p, std::function<InstanceInfo()> snapshot) {
  if (p.endpoints.empty()) return make_error("membership: no etcd endpoint");
  if (!snapshot) return make_error("membership: no snapshot function");
  LARDER_CHECK_STATUS(check_cluster_name(p.cluster));
  if (p.ttl_s < 2) return make_error("membership: the lease TTL must be at least 2 s (got %d)", p.ttl_s);
  if (!(p.refresh_s > 0)) return make_error("membership: the refresh interval must be positive");
  auto impl = std::make_unique<Impl>(std::move(p), std::move(snapshot));
  Impl* I = impl.get();
  std::unique_ptr<Membership> m(new Membership(std::move(impl)));
  I->th = std::thread([I] { I->run(); });
  return m;
}

Membership::~Membership() { stop(); }

void Membership::stop() {
  Impl& I = *impl_;
  {
    std::lock_guard<std::mutex> lk(I.mu);
    if (I.stopping && !I.th.joinable()) return;
    I.stopping = true;
  }
  I.cv.notify_all();
  if (I.th.joinable()) I.th.join();
  if (I.lease != 0) {
    (void)I.etcd.lease_revoke(I.lease);  // best effort: otherwise the key lasts until the TTL
    I.lease = 0;
  }
  std::lock_guard<std::mutex> lk(I.mu);
  I.st.registered = false;
}

MembershipStats Membership::stats() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->st;
}

// ---------------------------------------------------------------------------------------------
// Reading the cluster

Result<std::vector<InstanceInfo>> list_instances(EtcdClient& c, const std::string& cluster,
                                                 std::vector<std::string>* skipped) {
  LARDER_TRY(kvs, c.get_prefix(instances_prefix(cluster)));
  std::vector<InstanceInfo> out;
  out.reserve(kvs.size());
  for (auto& [key, value] : kvs) {
    auto info = instance_from_json(value);
    if (!info.ok()) {
      if (skipped) skipped->push_back(key + ": " + info.error());
      continue;
    }
    out.push_back(std::move(info.value()));
  }
  return out;
}

struct Directory::Impl {
  EtcdClient etcd;
  std::string cluster;
  double poll_s;

  mutable std::mutex mu;  // guards list, stopping
  std::condition_variable cv;
  bool stopping = false;
  std::vector<InstanceInfo> list;
  std::atomic<bool> ok{false};

  // Poll-thread state: what was already said on stderr.
  std::set<std::string> warned;
  bool down_reported = false;
  std::thread th;

  Impl(std::vector<std::string> eps, std::string c, double poll)
      : etcd(std::move(eps)), cluster(std::move(c)), poll_s(poll) {}

  void poll_once() {
    std::vector<std::string> skipped;
    auto r = list_instances(etcd, cluster, &skipped);
    if (!r.ok()) {
      ok = false;
      if (!down_reported) {
        size_t n;
        {
          std::lock_guard<std::mutex> lk(mu);
          n = list.size();
        }
        std::fprintf(stderr, "larder: cluster: cannot read instances from etcd: %s (keeping the last %zu)\n",
                     r.error().c_str(), n);
        std::fflush(stderr);
        down_reported = true;
      }
      return;
    }
    if (down_reported) {
      std::fprintf(stderr, "larder: cluster: etcd reachable again (%zu instance(s))\n", r->size());
      std::fflush(stderr);
      down_reported = false;
    }
    // A bad value is reported once (and again only if it changes); the rest are used.
    std::set<std::string> now(skipped.begin(), skipped.end());
    for (const auto& s : now)
      if (!warned.count(s)) std::fprintf(stderr, "larder: cluster: skipping %s\n", s.c_str());
    warned = std::move(now);
    {
      std::lock_guard<std::mutex> lk(mu);
      list = std::move(r.value());
    }
    ok = true;
  }

  void run() {
    const auto every = std::chrono::milliseconds(std::max<int64_t>(20, static_cast<int64_t>(poll_s * 1000)));
    std::unique_lock<std::mutex> lk(mu);
    while (!cv.wait_for(lk, every, [&] { return stopping; })) {
      lk.unlock();
      poll_once();
      lk.lock();
    }
  }
};

Directory::Directory(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<Directory>> Directory::start(std::vector<std::string> endpoints, std::string cluster,
                                                    double poll_s) {
  if (endpoints.empty()) return make_error("directory: no etcd endpoint");
  LARDER_CHECK_STATUS(check_cluster_name(cluster));
  if (!(poll_s > 0)) return make_error("directory: the poll interval must be positive");
  auto impl = std::make_unique<Impl>(std::move(endpoints), std::move(cluster), poll_s);
  Impl* I = impl.get();
  I->poll_once();
  std::unique_ptr<Directory> d(new Directory(std::move(impl)));
  I->th = std::thread([I] { I->run(); });
  return d;
}

Directory::~Directory() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->th.joinable()) impl_->th.join();
}

std::vector<InstanceInfo> Directory::instances() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->list;
}

bool Directory::etcd_ok() const { return impl_->ok.load(); }

}  // namespace larder::cluster
