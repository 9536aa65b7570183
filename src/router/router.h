// `larder router`: a thin OpenAI-compatible front door of a prefill/decode cluster.
//
// Each generation request (POST /v1/completions, /v1/chat/completions and their un-prefixed
// aliases) goes to a decode instance (role decode or both) with the header
//   X-Larder-Prefill: HOST:PORT
// naming the API address of a prefill instance (role prefill or both); the decode instance
// runs the handoff with it and answers. No prefill instance known (or the pick is the decode
// instance itself) -> no header: the decode instance does it all. The answer is passed
// through: status, JSON body, or the SSE stream chunk by chunk as it arrives.
//
// Instances: the static --prefill/--decode lists plus, with --cluster, the etcd Directory
// (roles from the registrations). Registered instances whose model fingerprint differs from
// the first registered decode instance's are left out (one stderr line each).
//
// Failures: a decode instance that cannot be reached (before any byte of the answer) ->
// the next one; none left -> 503. A client that disconnects mid-stream -> the upstream
// connection is closed, so the instance cancels the request.
//
// Also: GET /health (200 with instance counts; 503 without a decode instance or while
// draining), GET /v1/models (from the first reachable decode instance), GET /metrics
// (Prometheus text), --api-key like `larder serve` (checked here and forwarded), 404/405/413
// as OpenAI-style JSON errors.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cluster/membership.h"
#include "core/result.h"

namespace larder::router {

struct RouterParams {
  std::string host = "127.0.0.1";
  int port = 8080;                          // 0: any free port (see Router::port())
  std::string api_key;                      // non-empty: /v1/* need "Authorization: Bearer KEY"
  std::vector<std::string> prefill;         // static instances, HOST:PORT
  std::vector<std::string> decode;
  std::vector<std::string> etcd_endpoints;  // non-empty: discover instances (cluster::Directory)
  std::string cluster_name = "default";
  double poll_s = 0.5;                      // Directory poll interval
  size_t max_body_bytes = 8u << 20;         // larger request bodies get 413
  int http_threads = 256;                   // a streaming request holds one for its duration
  int connect_timeout_ms = 1000;            // to an instance; a dead one is skipped after this
  int upstream_read_timeout_s = 3600;       // a non-streamed answer arrives only when it is complete
};

// What the picker sees of a request (for a conductor that weighs prompts and cached prefixes).
struct RouteRequest {
  const std::string& path;
  const std::string& body;
};

// Chooses the instances of a request. Round-robin for now (RoundRobinPicker); a conductor
// that weighs load and cached prefixes replaces it. Called concurrently.
class Picker {
 public:
  virtual ~Picker() = default;
  // Index into candidates (never empty) of the decode instance to try first; the router
  // tries the following ones in order when it cannot reach it.
  virtual size_t pick_decode(const RouteRequest& r, const std::vector<cluster::InstanceInfo>& candidates) = 0;
  // Index into candidates (never empty) of the prefill instance to name.
  virtual size_t pick_prefill(const RouteRequest& r, const std::vector<cluster::InstanceInfo>& candidates) = 0;
};

class RoundRobinPicker final : public Picker {
 public:
  size_t pick_decode(const RouteRequest& r, const std::vector<cluster::InstanceInfo>& candidates) override;
  size_t pick_prefill(const RouteRequest& r, const std::vector<cluster::InstanceInfo>& candidates) override;

 private:
  std::atomic<uint64_t> next_decode_{0}, next_prefill_{0};
};

// "HOST:PORT,HOST:PORT" (an http:// prefix is allowed) -> ["HOST:PORT", ...]; "" -> [].
Result<std::vector<std::string>> parse_instance_list(const std::string& list);

class Router {
 public:
  // Binds host:port, starts the Directory when etcd endpoints are given, and serves on a
  // background thread. picker null: RoundRobinPicker.
  static Result<std::unique_ptr<Router>> start(RouterParams p, std::unique_ptr<Picker> picker = nullptr);
  ~Router();  // stop()
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  int port() const;
  // New generation requests get 503 and /health 503 "draining"; in-flight ones go on.
  void begin_drain();
  // Generation requests in flight (streams included).
  int active() const;
  // Closes every upstream connection (their instances cancel) and ends those requests.
  void cancel_all();
  // cancel_all(), then closes the listener and joins the HTTP threads.
  void stop();

  struct Impl;

 private:
  explicit Router(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::router
