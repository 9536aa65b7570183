#include "cluster/membership.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <tuple>
#include <unordered_map>

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
  // One key of the prefix as last seen: a valid instance, or a value that is not one.
  struct Entry {
    int64_t mod_revision = 0;
    std::string value;
    std::optional<InstanceInfo> info;
    std::string bad;  // why value is not an InstanceInfo
  };
  using Changes = std::map<std::string, std::optional<Entry>>;  // key -> new state (nullopt: gone)

  DirectoryParams p;
  std::string prefix;
  EtcdClient etcd;
  // Shut down by ~Directory: the watch thread's reads, its watch (also by the safety net when
  // stuck), and the safety net's reads.
  EtcdCancel list_cancel, watch_cancel, check_cancel;

  // Lock order: cb_mu, then mu. cb_mu is held from applying a change until its callback
  // returned, so that on_change's first call and the later ones neither miss nor repeat one.
  std::mutex cb_mu;
  Directory::ChangeFn cb;

  mutable std::mutex mu;  // guards everything below but the atomics
  std::condition_variable cv;
  bool stopping = false;
  std::map<std::string, Entry> entries;          // by key
  std::vector<InstanceInfo> list;                // the valid entries in key order (instances())
  std::unordered_map<std::string, size_t> by_id;  // id -> index in list
  int64_t revision = 0;                          // of the last full read
  DirectoryStats st;
  bool down_reported = false, watch_reported = false;
  std::atomic<bool> ok{false};
  std::atomic<uint64_t> generation{0};

  std::thread watch_th, check_th;

  explicit Impl(DirectoryParams params)
      : p(std::move(params)), prefix(instances_prefix(p.cluster)), etcd(p.endpoints, p.timeout_ms) {}

  static Entry entry_of(KeyValue& kv) {
    Entry e;
    e.mod_revision = kv.mod_revision;
    auto info = instance_from_json(kv.value);
    if (info.ok()) e.info = std::move(info.value());
    else e.bad = info.error();
    e.value = std::move(kv.value);
    return e;
  }

  bool is_stopping() {
    std::lock_guard<std::mutex> lk(mu);
    return stopping;
  }

  // Applies changes to the view and tells the callback what they changed for instances().
  void commit(Changes& changes, int64_t events) {
    std::lock_guard<std::mutex> cbl(cb_mu);
    std::vector<InstanceInfo> updated;
    std::vector<std::string> removed;
    {
      std::lock_guard<std::mutex> lk(mu);
      std::set<std::string> gone;  // ids of entries replaced or deleted
      bool changed = false;
      for (auto& [key, ne] : changes) {
        auto it = entries.find(key);
        Entry* old = it != entries.end() ? &it->second : nullptr;
        if (!old && !ne) continue;
        if (old && ne && old->mod_revision == ne->mod_revision && old->value == ne->value) continue;
        changed = true;
        if (old && old->info) gone.insert(old->info->id);
        if (ne && ne->info) updated.push_back(*ne->info);
        // A bad value is reported once per change of it, not on every re-read.
        if (ne && !ne->info && (!old || old->bad != ne->bad))
          std::fprintf(stderr, "larder: cluster: skipping %s: %s\n", key.c_str(), ne->bad.c_str());
        if (ne) entries[key] = std::move(*ne);
        else entries.erase(it);
      }
      st.events += events;
      if (!changed) return;
      list.clear();
      by_id.clear();
      for (auto& [key, e] : entries)
        if (e.info) {
          by_id.emplace(e.info->id, list.size());  // the first key wins a duplicated id
          list.push_back(*e.info);
        }
      for (const std::string& id : gone)
        if (!by_id.count(id)) removed.push_back(id);
      if (updated.empty() && removed.empty()) return;  // only bad values changed
      generation.fetch_add(1);
    }
    if (cb) cb(updated, removed);
  }

  // Reads the whole prefix and makes the view equal to it; remembers its revision.
  bool relist() {
    auto r = etcd.range_prefix(prefix, &list_cancel);
    if (!r.ok()) {
      if (list_cancel.cancelled()) return false;  // stopping
      ok = false;
      std::lock_guard<std::mutex> lk(mu);
      if (!down_reported) {
        std::fprintf(stderr, "larder: cluster: cannot read instances from etcd: %s (keeping the last %zu)\n",
                     r.error().c_str(), list.size());
        std::fflush(stderr);
        down_reported = true;
      }
      return false;
    }
    Changes changes;
    {
      std::lock_guard<std::mutex> lk(mu);
      for (auto& [key, e] : entries) changes[key] = std::nullopt;
    }
    for (KeyValue& kv : r->kvs) {
      std::string key = kv.key;
      changes[key] = entry_of(kv);
    }
    commit(changes, 0);
    size_t n;
    {
      std::lock_guard<std::mutex> lk(mu);
      revision = r->revision;
      st.lists++;
      n = list.size();
      if (down_reported) {
        std::fprintf(stderr, "larder: cluster: etcd reachable again (%zu instance(s))\n", n);
        std::fflush(stderr);
        down_reported = false;
      }
    }
    ok = true;
    return true;
  }

  bool on_watch(const WatchResponse& wr) {
    if (wr.created) {
      ok = true;
      std::lock_guard<std::mutex> lk(mu);
      st.watches++;
      watch_reported = false;
      return !stopping;
    }
    if (wr.events.empty()) return true;  // progress notification
    Changes changes;
    for (const WatchEvent& ev : wr.events) {
      if (ev.type == WatchEvent::Type::Delete) {
        changes[ev.kv.key] = std::nullopt;
      } else {
        KeyValue kv = ev.kv;
        changes[kv.key] = entry_of(kv);
      }
    }
    commit(changes, static_cast<int64_t>(wr.events.size()));
    return true;
  }

  void wait(std::chrono::milliseconds d) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait_for(lk, d, [&] { return stopping; });
  }

  // The watch thread: read, watch from that revision + 1, and again whenever the watch ends.
  void run_watch(bool listed) {
    using std::chrono::milliseconds;
    const milliseconds first_backoff(50), max_backoff(1000);
    milliseconds backoff = first_backoff;
    while (!is_stopping()) {
      if (!listed) {
        if (!relist()) {
          wait(backoff);
          backoff = std::min(backoff * 2, max_backoff);
          continue;
        }
        listed = true;
      }
      watch_cancel.reset();
      int64_t from;
      {
        std::lock_guard<std::mutex> lk(mu);
        if (stopping) break;  // ~Directory set this before cancelling: a cancel lost to reset() is caught here
        from = revision + 1;
      }
      const auto t0 = Clock::now();
      auto r = etcd.watch_prefix(prefix, from, [this](const WatchResponse& wr) { return on_watch(wr); },
                                 &watch_cancel);
      listed = false;  // whatever ended it, the view may have missed changes since
      if (is_stopping()) break;
      if (!r.ok()) {
        std::lock_guard<std::mutex> lk(mu);
        if (!watch_reported && !down_reported) {
          std::fprintf(stderr, "larder: cluster: etcd watch ended: %s (reading the instances again)\n",
                       r.error().c_str());
          std::fflush(stderr);
        }
        watch_reported = true;
      }
      // A watch that keeps failing at once must not spin: back off unless it had lasted.
      if (!r.ok() && Clock::now() - t0 < std::chrono::seconds(1)) {
        wait(backoff);
        backoff = std::min(backoff * 2, max_backoff);
      } else {
        backoff = first_backoff;
      }
    }
  }

  // The safety net (see the class comment). A difference is (key, mod_revision in etcd or 0 if
  // absent, mod_revision in the view or 0 if absent); one seen at two checks in a row means the
  // view kept a state etcd had replaced at least check_s earlier: the watch is stuck. (A view
  // ahead of the read cannot repeat: the next read is linearizable, so it includes what the
  // view had.)
  void run_check() {
    using Diff = std::tuple<std::string, int64_t, int64_t>;
    const auto every = std::chrono::milliseconds(std::max<int64_t>(50, static_cast<int64_t>(p.check_s * 1000)));
    std::set<Diff> prev;
    std::unique_lock<std::mutex> lk(mu);
    while (!cv.wait_for(lk, every, [&] { return stopping; })) {
      lk.unlock();
      auto r = etcd.range_prefix(prefix, &check_cancel);
      lk.lock();
      if (stopping) break;
      if (!r.ok()) {
        // etcd does not answer (the watch may not know yet): say so, and restart the watch so
        // that it re-reads (and keeps the last good list) until etcd is back.
        st.check_failures++;
        prev.clear();
        ok = false;
        lk.unlock();
        watch_cancel.cancel();
        lk.lock();
        continue;
      }
      std::set<Diff> cur;
      std::set<std::string> seen;
      for (const KeyValue& kv : r->kvs) {
        seen.insert(kv.key);
        auto it = entries.find(kv.key);
        const int64_t mine = it == entries.end() ? 0 : it->second.mod_revision;
        if (mine != kv.mod_revision) cur.emplace(kv.key, kv.mod_revision, mine);
      }
      for (const auto& [key, e] : entries)
        if (!seen.count(key)) cur.emplace(key, 0, e.mod_revision);
      bool stuck = false;
      for (const Diff& d : cur)
        if (prev.count(d)) stuck = true;
      prev = std::move(cur);
      if (stuck) {
        st.stalls++;
        prev.clear();
        std::fprintf(stderr, "larder: cluster: the etcd watch fell behind for %.1f s; restarting it\n", p.check_s);
        std::fflush(stderr);
        lk.unlock();
        watch_cancel.cancel();
        lk.lock();
      }
    }
  }
};

Directory::Directory(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<Directory>> Directory::start(DirectoryParams p) {
  if (p.endpoints.empty()) return make_error("directory: no etcd endpoint");
  LARDER_CHECK_STATUS(check_cluster_name(p.cluster));
  if (!(p.check_s > 0)) return make_error("directory: the check interval must be positive");
  auto impl = std::make_unique<Impl>(std::move(p));
  Impl* I = impl.get();
  const bool listed = I->relist();
  std::unique_ptr<Directory> d(new Directory(std::move(impl)));
  I->watch_th = std::thread([I, listed] { I->run_watch(listed); });
  I->check_th = std::thread([I] { I->run_check(); });
  return d;
}

Result<std::unique_ptr<Directory>> Directory::start(std::vector<std::string> endpoints, std::string cluster,
                                                    double poll_s) {
  if (!(poll_s > 0)) return make_error("directory: the poll interval must be positive");
  DirectoryParams p;
  p.endpoints = std::move(endpoints);
  p.cluster = std::move(cluster);
  p.check_s = std::max(poll_s, 5.0);
  return start(std::move(p));
}

Directory::~Directory() {
  Impl& I = *impl_;
  {
    std::lock_guard<std::mutex> lk(I.mu);
    I.stopping = true;
  }
  I.cv.notify_all();
  // After stopping is set: see run_watch.
  I.list_cancel.cancel();
  I.watch_cancel.cancel();
  I.check_cancel.cancel();
  if (I.watch_th.joinable()) I.watch_th.join();
  if (I.check_th.joinable()) I.check_th.join();
}

std::vector<InstanceInfo> Directory::instances() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->list;
}

std::optional<InstanceInfo> Directory::get(const std::string& id) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  auto it = impl_->by_id.find(id);
  if (it == impl_->by_id.end()) return std::nullopt;
  return impl_->list[it->second];
}

bool Directory::etcd_ok() const { return impl_->ok.load(); }

uint64_t Directory::generation() const { return impl_->generation.load(); }

DirectoryStats Directory::stats() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->st;
}

void Directory::on_change(ChangeFn fn) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> cbl(I.cb_mu);
  if (fn) {
    std::vector<InstanceInfo> now = instances();
    if (!now.empty()) fn(now, {});
  }
  I.cb = std::move(fn);
}

}  // namespace larder::cluster
