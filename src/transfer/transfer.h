// KV transfer engine: moves blocks between registered memory of two processes (a prefill instance
// pushes KV into a decode instance's pool) with one-sided UCX (ucp) puts and gets, zero-copy from and
// into the registered pools. UCX chooses the transport (shared memory / CMA between local processes,
// TCP, RDMA where present; UCX_TLS forces one). Knows nothing of models.
//
// Threading: one engine thread owns the ucp worker; every public call may come from any thread and
// only queues work (submission is cheap: one allocation and a queue push). Ops complete on the engine
// thread; Op::on_done callbacks and the notify handler run there and must be short.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/result.h"

namespace larder::transfer {

struct EngineParams {
  std::string host = "127.0.0.1";  // listener address for peers' connections (UCX sockaddr listener)
  int port = 0;                    // 0 = any free port
};

// One contiguous piece of a batched op: `bytes` at `local_offset` of the local region and at
// `remote_offset` of the remote region.
struct Segment {
  uint64_t local_offset = 0, remote_offset = 0, bytes = 0;
};

// ops: finished ops; bytes: bytes of successful ops; failures: errors other than timeouts and
// cancellations; in_flight: submitted, not finished; peers: connected outgoing endpoints.
struct EngineStats {
  int64_t ops = 0, bytes = 0, failures = 0, timeouts = 0, cancelled = 0, in_flight = 0, peers = 0;
};

// Memory from Engine::allocate_memory: region id and where it is mapped in this process.
struct Allocation {
  int region = -1;
  void* base = nullptr;
};

namespace detail {
struct Queue;
}

// One batched operation; thread-safe. When it is done (success or error) the engine no longer
// touches the local memory of its segments. on_done functions run before done() turns true, so a
// thread that wait()ed sees their effects; inside them status() and seconds() are already final.
class Op {
 public:
  virtual ~Op() = default;
  bool done() const { return done_.load(std::memory_order_acquire); }
  Status wait();                                               // blocks until done; returns status()
  Status wait_until(std::chrono::steady_clock::time_point t);  // "timed out waiting" if not done by t
  Status status() const;                                       // valid once done()
  void cancel();                                               // completes with error "cancelled"
  uint64_t bytes() const { return bytes_; }                    // bytes of the op
  double seconds() const;                                      // submit -> completion (0 until done)
  void on_done(std::function<void(const Status&)> f);          // exactly once (engine thread, or now)

 protected:
  Op() = default;
  // Engine side: publishes the result, wakes waiters, runs the callback (once).
  void finish(Status st);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> done_{false};
  bool finishing_ = false;  // status_ is final; callbacks are running or ran
  std::atomic<bool> cancel_requested_{false};
  Status status_;
  std::function<void(const Status&)> on_done_;
  uint64_t bytes_ = 0;
  std::chrono::steady_clock::time_point start_, end_;
  std::shared_ptr<detail::Queue> queue_;  // to wake the engine on cancel(); outlives the engine
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> create(const EngineParams& p);
  ~Engine();  // cancels everything in flight, closes endpoints, joins its thread
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::string address() const;  // "host:port" that peers pass as peer_address (host as given in params)

  // Registers [base, base+bytes) for one-sided remote access (and as a zero-copy source/target);
  // returns a local region id.
  Result<int> register_memory(void* base, size_t bytes);
  // Allocates and registers `bytes` through UCX (ucp_mem_map ALLOCATE: a System V / POSIX shared
  // memory segment where UCX has those). Peers on the same host then put and get into it directly
  // (one memcpy by the initiator), where registered heap memory gets UCX 1.13's software RMA over a
  // message lane (copied through a fifo or TCP, the target's engine thread taking part).
  // unregister_memory frees it.
  Result<Allocation> allocate_memory(size_t bytes);
  // Fails while ops that use the region are in flight.
  Status unregister_memory(int region);
  // Printable description of a region (format tag "lxd1." + base64url of base, size, packed rkey,
  // checksum) that a peer passes as remote_desc.
  Result<std::string> describe(int region) const;

  // Batched one-sided WRITE of `segs` of local region `local_region` into the peer's region described
  // by `remote_desc`, over the endpoint to `peer_address` (connected on first use and cached; a broken
  // endpoint is dropped and reconnected on next use). Returns at once; every error (bad desc,
  // out-of-range segment, unreachable or dead peer) completes the op with an error. Done when every
  // byte is visible in the remote memory, on failure, or at `deadline` ("timed out"). A failed op
  // reports once its requests in flight (at most 16 MiB) drained; if they do not within 1 s (a stuck
  // peer) the endpoint is closed, which fails the other ops on it too.
  std::shared_ptr<Op> write(const std::string& peer_address, const std::string& remote_desc, int local_region,
                            std::vector<Segment> segs, std::chrono::steady_clock::time_point deadline);
  // The same as one-sided READ: remote -> local.
  std::shared_ptr<Op> read(const std::string& peer_address, const std::string& remote_desc, int local_region,
                           std::vector<Segment> segs, std::chrono::steady_clock::time_point deadline);
  // A small message (payload up to 1 MiB) to the peer's notify handler, delivered after every
  // earlier write to that peer completed. Done when the message has left (send completion).
  std::shared_ptr<Op> notify(const std::string& peer_address, uint64_t key, std::string payload,
                             std::chrono::steady_clock::time_point deadline);
  // Runs on the engine thread; keep it short and never wait() on an op there. Not called once the
  // engine is being destroyed; objects it uses must outlive the engine (or the handler be replaced).
  void set_notify_handler(std::function<void(uint64_t key, std::string payload)> f);

  EngineStats stats() const;

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::transfer
