// A small etcd v3 client over etcd's JSON gateway (POST /v3/kv/*, /v3/lease/*; keys and
// values base64), enough for cluster membership: leases, put with a lease, prefix reads.
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
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/result.h"

namespace larder::cluster {

// "etcd://HOST:PORT[,HOST:PORT]" or a bare "HOST:PORT[,HOST:PORT]" -> ["HOST:PORT", ...].
// IPv6 hosts go in brackets ("[::1]:2379").
Result<std::vector<std::string>> parse_etcd_url(const std::string& url);

// "HOST:PORT" (IPv6 host in brackets) -> host without brackets and port 1..65535; false when malformed.
bool split_host_port(const std::string& s, std::string& host, int& port);

std::string base64_encode(const std::string& in);
// Fails on characters outside the alphabet or a bad length (padding optional).
Result<std::string> base64_decode(const std::string& in);

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
  Status del(const std::string& key);

 private:
  Result<nlohmann::json> call(const char* path, const nlohmann::json& body);

  std::vector<std::string> endpoints_;
  int timeout_ms_;
  std::atomic<size_t> preferred_{0};
};

}  // namespace larder::cluster
