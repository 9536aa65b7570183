// A small etcd v3 client over etcd's JSON gateway (POST /v3/kv/*, /v3/lease/*, /v3/watch; keys
// and values base64), enough for cluster membership: leases, put with a lease, prefix reads
// and prefix watches.
//
// Why the gateway and not gRPC: etcd serves it on the client port by default, and
// cpp-httplib is already a dependency (no protobuf/gRPC toolchain for a dozen calls).
//
// Every call has short connect/read timeouts (1 s by default) so that a dead etcd never
// blocks a caller for long; with several endpoints a call that cannot reach one (transport
// error, or etcd answering "unavailable") tries the next, starting from the last that worked.
// An answer from etcd itself (e.g. "requested lease not found") is returned as it is.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/result.h"

namespace httplib {
class Client;
}

namespace larder::cluster {

// "etcd://HOST:PORT[,HOST:PORT]" or a bare "HOST:PORT[,HOST:PORT]" -> ["HOST:PORT", ...].
// IPv6 hosts go in brackets ("[::1]:2379").
Result<std::vector<std::string>> parse_etcd_url(const std::string& url);

// "HOST:PORT" (IPv6 host in brackets) -> host without brackets and port 1..65535; false when malformed.
bool split_host_port(const std::string& s, std::string& host, int& port);

std::string base64_encode(const std::string& in);
// Fails on characters outside the alphabet or a bad length (padding optional).
Result<std::string> base64_decode(const std::string& in);

struct KeyValue {
  std::string key, value;
  int64_t create_revision = 0, mod_revision = 0, version = 0, lease = 0;
};

// A prefix read and the store revision it saw: watching from revision + 1 then misses no
// change and repeats none.
struct RangeResult {
  std::vector<KeyValue> kvs;  // in key order
  int64_t revision = 0;
};

struct WatchEvent {
  enum class Type { Put, Delete } type = Type::Put;
  KeyValue kv;  // a Delete carries only key and mod_revision (the deletion's revision)
  bool has_prev = false;
  KeyValue prev_kv;  // the value before this event, when etcd still had it
};

// One message of a watch stream: the watch was created, events happened, or (events empty)
// a progress notification. revision: the store revision etcd reports; for `created` that is
// merely its current revision (events from an older start_revision follow), otherwise the
// watcher has been sent every event up to it.
struct WatchResponse {
  int64_t revision = 0;
  bool created = false;
  std::vector<WatchEvent> events;
};

// How a watch ended without an error.
struct WatchEnd {
  // start_revision is older than etcd's compaction: nothing was delivered; read the prefix again
  // (its revision is >= compact_revision) and watch from there.
  bool compacted = false;
  int64_t compact_revision = 0;
  int64_t revision = 0;  // the last revision a message brought (0: none came)
};

// Cancels calls running on another thread: cancel() makes a watch_prefix or a call given this
// token return promptly whether it is connecting, waiting or reading (it shuts the connection's
// socket down). Sticky: it also stops calls that start later, until reset().
class EtcdCancel {
 public:
  void cancel();
  bool cancelled() const { return cancelled_.load(); }
  void reset();

 private:
  friend class EtcdClient;
  std::mutex mu_;                      // guards active_; held while stopping it
  std::atomic<bool> cancelled_{false};  // atomic: read inside httplib's socket callback, where mu_ must not be taken
  httplib::Client* active_ = nullptr;  // the connection in use, if any
};

// Thread-safe: every call opens its own connection (no state shared between calls except
// which endpoint answered last).
class EtcdClient {
 public:
  explicit EtcdClient(std::vector<std::string> endpoints, int timeout_ms = 1000);

  const std::vector<std::string>& endpoints() const { return endpoints_; }

  // A new lease of ttl_s seconds; returns its id.
  Result<int64_t> lease_grant(int ttl_s);
  // Renews the lease; returns its remaining TTL in seconds (<= 0: the lease is gone).
  Result<int64_t> lease_keepalive(int64_t id);
  // Ends the lease now, deleting every key attached to it.
  Status lease_revoke(int64_t id);
  // lease 0: the key does not expire.
  Status put(const std::string& key, const std::string& value, int64_t lease = 0);
  // Every key starting with prefix, in key order, with its value.
  Result<std::vector<std::pair<std::string, std::string>>> get_prefix(const std::string& prefix);
  // The same with revisions, and the store revision of the read (linearizable).
  Result<RangeResult> range_prefix(const std::string& prefix, EtcdCancel* cancel = nullptr);
  Status del(const std::string& key);

  // Watches every key starting with prefix from start_revision (0: from now) on the caller's
  // thread, calling on_response for each message in order (returning false ends the watch).
  // Ends Ok when cancelled, when on_response returns false, or when start_revision was compacted
  // (WatchEnd::compacted); an error when no endpoint accepts the watch or when the stream breaks
  // (etcd stopped, connection lost, the member lost its leader). A watch has no end of its own:
  // it asks etcd for progress notifications (every 10 min by default) and gives up after 15 min
  // of silence; TCP keepalive notices a vanished peer in about 30 s. A stopped-but-connected etcd
  // (SIGSTOP, a hung host) is not noticed here: callers that care check etcd otherwise.
  Result<WatchEnd> watch_prefix(const std::string& prefix, int64_t start_revision,
                                const std::function<bool(const WatchResponse&)>& on_response,
                                EtcdCancel* cancel = nullptr);

 private:
  struct Attached;
  Result<nlohmann::json> call(const char* path, const nlohmann::json& body, EtcdCancel* cancel = nullptr);

  std::vector<std::string> endpoints_;
  int timeout_ms_;
  std::atomic<size_t> preferred_{0};
};

}  // namespace larder::cluster
