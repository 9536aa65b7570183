// Membership of Larder instances in etcd.
//
// Each instance keeps one key, /larder/<cluster>/instances/<id>, whose value is its
// InstanceInfo as JSON, attached to a lease: when the process dies the lease runs out
// (ttl_s) and the key goes away; a clean stop revokes the lease so it goes at once.
// Routers read the prefix (list_instances) or follow it (Directory: one read, then a watch).
//
// Membership never stops an instance from serving: start() succeeds while etcd is down,
// and a background thread keeps (re)registering with a backoff of at most 1 s.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cluster/etcd.h"
#include "core/result.h"

namespace larder::cluster {

struct InstanceInfo {
  std::string id;                // unique per process (e.g. hostname-pid-random)
  std::string role;              // "prefill" | "decode" | "both"
  std::string model;             // model content fingerprint (only instances with equal ones exchange KV)
  std::string kv_layout;         // KV layout fingerprint (layers, kv dim, block size, K/V types)
  std::string api_address;       // host:port of its OpenAI/HTTP API
  std::string transfer_address;  // host:port of its KV transfer engine ("" = none)
  struct Capacity {
    int64_t kv_blocks = 0, dram_blocks = 0, disk_blocks = 0;
    int parallel = 0, threads = 0;
  } capacity;
  struct Load {
    int running = 0, waiting = 0;
    int64_t free_blocks = 0, queued_prefill_tokens = 0;
  } load;
  // KV events (src/kvevents): ZeroMQ PUB and replay endpoints, "tcp://HOST:PORT" ("" = none).
  std::string kv_events, kv_replay;
  // How its KV blocks are named (kvcache::root_hash): the conductor names prompts' blocks the same way.
  struct Cache {
    std::string identity;   // CacheIdentity.model (model content identity)
    std::string dtype;      // CacheIdentity.dtype
    int block_size = 0;     // tokens per block
    int64_t block_bytes = 0;  // bytes of one block, all layers
  } cache;
  // Measured speed: prompt tokens per second (0 = not measured yet); wall ms when it started.
  double prefill_tokens_per_s = 0;
  int64_t started_ms = 0;
  int64_t updated_ms = 0;  // wall clock of the last refresh (ms since epoch)

  bool can_prefill() const { return role == "prefill" || role == "both"; }
  bool can_decode() const { return role == "decode" || role == "both"; }
};

nlohmann::json to_json(const InstanceInfo& info);
// Unknown fields are ignored; id, role (prefill|decode|both) and api_address are required,
// the rest default to empty / 0; a field of the wrong type is an error naming it.
Result<InstanceInfo> instance_from_json(const std::string& text);

// "/larder/<cluster>/instances/<id>"
std::string instance_key(const std::string& cluster, const std::string& id);
// "/larder/<cluster>/instances/"
std::string instances_prefix(const std::string& cluster);

// "hostname-pid-random": unique per process.
std::string make_instance_id();
// Milliseconds since the epoch (wall clock).
int64_t wall_ms();

struct MembershipParams {
  std::vector<std::string> endpoints;
  std::string cluster = "default";
  int ttl_s = 10;          // the lease: the key outlives a dead process by at most this long
  double refresh_s = 1.0;  // how often the value (its load) is rewritten
  int timeout_ms = 1000;   // per etcd call
};

struct MembershipStats {
  bool registered = false;  // the last etcd call succeeded and the key is believed present
  int64_t registrations = 0, refreshes = 0, failures = 0;
  std::string last_error;
};

class Membership {  // registers itself and keeps the registration alive in the background
 public:
  // snapshot() is called from the membership thread every refresh_s to get the current
  // value (load changes); its id must stay the same; updated_ms is filled in here. Fails
  // only on bad parameters: an unreachable etcd is retried in the background.
  static Result<std::unique_ptr<Membership>> start(MembershipParams p, std::function<InstanceInfo()> snapshot);
  ~Membership();  // stop()
  Membership(const Membership&) = delete;
  Membership& operator=(const Membership&) = delete;
  // Revokes the lease (best effort, short timeout) so the instance leaves at once.
  void stop();
  MembershipStats stats() const;

  struct Impl;

 private:
  explicit Membership(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Instances of a cluster, read once (in key order). Values that are not an InstanceInfo
// are skipped; their keys and reasons go to *skipped when given.
Result<std::vector<InstanceInfo>> list_instances(EtcdClient& c, const std::string& cluster,
                                                 std::vector<std::string>* skipped = nullptr);

struct DirectoryParams {
  std::vector<std::string> endpoints;
  std::string cluster = "default";
  // The safety net: a re-read this often checks that etcd still answers and that the watch is
  // not stuck (see Directory). Not how changes are seen: the watch brings them in milliseconds.
  double check_s = 5.0;
  int timeout_ms = 1000;  // per etcd read (the watch stream itself has no such limit)
};

struct DirectoryStats {
  int64_t lists = 0;    // full reads of the prefix (start, and after every watch that ended)
  int64_t watches = 0;  // watches established
  int64_t events = 0;   // watch events applied
  int64_t stalls = 0;   // watches the safety net found stuck and restarted
  int64_t check_failures = 0;  // safety-net reads that failed
};

// The router's and conductor's view of the instances of a cluster. It reads the prefix once,
// then follows an etcd watch from that read's revision + 1, so instances coming and going are
// seen within milliseconds. When the watch ends (etcd down or restarted, connection lost, the
// revision compacted) it reads the prefix again and watches anew, retrying with a backoff of at
// most 1 s; while etcd is unreachable the last good list is kept and etcd_ok() is false.
//
// A watch can stall silently: a stopped or cut-off etcd (SIGSTOP, a hung host, a partition)
// keeps the connection open with nothing to say. So every check_s a second thread re-reads the
// prefix: when that fails, etcd_ok() turns false and the watch is restarted; when it shows a key
// that the watch-fed view had wrong at the previous check too (for check_s while etcd did not
// change it), the watch is restarted.
class Directory {
 public:
  // Reads once before returning (so the first instances() is populated when etcd is up);
  // fails only on bad parameters.
  static Result<std::unique_ptr<Directory>> start(DirectoryParams p);
  // Kept for callers of the polling Directory: poll_s is now the safety-net interval, at least 5 s.
  static Result<std::unique_ptr<Directory>> start(std::vector<std::string> endpoints, std::string cluster,
                                                  double poll_s = 0.5);
  // Returns within about 100 ms, even while the watch or a read is blocked (their connections
  // are shut down). Must not be called from an on_change callback.
  ~Directory();
  Directory(const Directory&) = delete;
  Directory& operator=(const Directory&) = delete;

  std::vector<InstanceInfo> instances() const;  // in key order
  std::optional<InstanceInfo> get(const std::string& id) const;
  // True while etcd answers: the last read succeeded and the watch runs (or is being renewed).
  bool etcd_ok() const;
  // Goes up by one with every change of instances() (never on a refresh that changed nothing).
  uint64_t generation() const;
  DirectoryStats stats() const;

  // Called with what changed: instances that joined or whose value changed (every refresh of
  // their load is one: expect one call per instance per refresh_s), and ids that left (key
  // deleted, lease expired or revoked, or a value no longer valid). Calls come one at a time,
  // in etcd's order, on the Directory's thread: keep them short and do not call on_change or
  // destroy the Directory from one. Replaces the previous callback (nullptr: none); with a
  // callback, it is first called at once on the caller's thread with every current instance as
  // added (if any), so that together with the later calls nothing is missed or seen twice.
  using ChangeFn =
      std::function<void(const std::vector<InstanceInfo>& added_or_updated, const std::vector<std::string>& removed_ids)>;
  void on_change(ChangeFn fn);

  struct Impl;

 private:
  explicit Directory(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::cluster
