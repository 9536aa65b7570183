// The HTTP front door of a cluster: `larder router` (round-robin, answers passed through) and,
// with Hooks, `larder conductor` (src/conductor: routing by cached prefixes and load, SLO
// admission, failover). `larder router` is kept for its simple use; the conductor replaces it.
//
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
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cluster/membership.h"
#include "core/result.h"
#include "http/http.h"

namespace larder::router {

struct RouterParams {
  std::string host = "127.0.0.1";
  int port = 8080;                          // 0: any free port (see Router::port())
  std::string api_key;                      // non-empty: /v1/* need "Authorization: Bearer KEY"
  std::vector<std::string> prefill;         // static instances, HOST:PORT
  std::vector<std::string> decode;
  std::vector<std::string> etcd_endpoints;  // non-empty: discover instances (cluster::Directory)
  std::string cluster_name = "default";
  double poll_s = 5;                        // Directory: it watches etcd; this is its safety-net re-list interval
  size_t max_body_bytes = 8u << 20;         // larger request bodies get 413
  int http_threads = 256;                   // a streaming request holds one for its duration
  // Deadlines and connection limits of the HTTP layer (host, port, body size and threads are
  // taken from the fields here).
  http::ServerOptions http_opts;
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

// The instances a request may go to now (role both counts in each list).
struct View {
  std::vector<cluster::InstanceInfo> prefill, decode;
};

// One attempt of a request at a decode instance.
struct Attempt {
  std::string decode;        // API host:port
  std::string prefill;       // X-Larder-Prefill ("" = none)
  std::string fetch;         // X-Larder-Fetch ("" = none)
  std::string body;          // what to send ("" = the client's body)
};

// A conductor's hooks: it plans each request, sees every event of the answer (and may rewrite
// it), re-issues a request whose decode instance failed, and hears how every request ended.
// Without hooks the Router routes with its Picker and passes answers through.
class Hooks {
 public:
  struct Ticket {  // per request; the hooks' own state derives from it
    virtual ~Ticket() = default;
  };
  struct Plan {
    bool reject = false;          // answer `status` with an OpenAI-style error, not routed
    int status = 429;
    double retry_after_s = 1;
    std::string message, code;
    std::vector<Attempt> attempts;  // tried in order until one answers (before any byte)
    std::shared_ptr<Ticket> ticket;
  };
  virtual ~Hooks() = default;
  virtual Plan plan(const RouteRequest& r, const View& v) = 0;
  // The instance of the current attempt answered (status, before the body). `attempt` indexes
  // Plan.attempts (re-issued ones continue the count).
  virtual void on_start(Ticket& t, const Attempt& a, int status) {}
  // One SSE event's data (a JSON text, not "[DONE]"): returns what to send instead ("" = drop
  // it). Resumed attempts' events pass here too.
  virtual std::string on_event(Ticket& t, const std::string& data) { return data; }
  // A whole JSON answer (non-streamed): returns what to send.
  virtual std::string on_json(Ticket& t, const std::string& body) { return body; }
  // The attempt failed after it started answering (stream cut, instance died, 5xx on a JSON
  // answer): another attempt to continue it, or nullopt (the client's answer is then cut).
  virtual std::optional<Attempt> reissue(Ticket& t, const Attempt& failed, const std::string& why) { return std::nullopt; }
  // The request ended: ok (complete answer sent), status, error text.
  virtual void on_end(Ticket& t, bool ok, int status, const std::string& error) {}
  // Extra Prometheus text for /metrics.
  virtual void render_metrics(std::string& out) {}
  // Extra fields for /health.
  virtual void health(nlohmann::json& j) {}
  // POST /internal/conductor/NAME (NAME = `what`): status and JSON answer; false = 404.
  virtual bool internal(const std::string& what, const std::string& body, int& status, std::string& out) {
    return false;
  }
};

// "HOST:PORT,HOST:PORT" (an http:// prefix is allowed) -> ["HOST:PORT", ...]; "" -> [].
Result<std::vector<std::string>> parse_instance_list(const std::string& list);

class Router {
 public:
  // Binds host:port, starts the Directory when etcd endpoints are given, and serves on a
  // background thread. picker null: RoundRobinPicker.
  static Result<std::unique_ptr<Router>> start(RouterParams p, std::unique_ptr<Picker> picker = nullptr,
                                               std::shared_ptr<Hooks> hooks = nullptr);
  ~Router();  // stop()
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  int port() const;
  // The instances requests may go to now (static ones and the registered ones).
  View view() const;
  cluster::Directory* directory() const;
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
