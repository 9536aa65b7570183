// An instance's KV-event publisher, on vLLM's ZmqEventPublisher protocol:
//  - PUB socket: every batch as (topic, seq as 8 bytes big-endian, msgpack payload), seq 0, 1, ...
//  - ROUTER replay socket: a client (DEALER) sends (b"", start_seq as 8 bytes big-endian); the
//    answer is (b"", seq, payload) for each buffered batch with seq >= start_seq, then
//    (b"", END_SEQ = -1 as 8 bytes, b"").
// One addition (vLLM has none: it just replays what its buffer still has): when start_seq is
// older than the oldest buffered batch, the answer begins with a snapshot instead, under the
// newest published seq S: the batch [AllBlocksCleared, BlockStored per medium (all the blocks
// held in it, no tokens, no parent)], i.e. exactly the state after batch S; the batches after S
// follow (none: S is the newest) and END. A follower that applies the snapshot and then the live
// batches from S + 1 ends in the publisher's state. The publisher keeps that state (HeldBlocks)
// from the very events it publishes.
//
// The event queue is unbounded on purpose: dropping an event would make every follower's view
// wrong until a snapshot, while the queue only grows if the publisher thread (which encodes and
// sends without ever blocking: ZeroMQ queues or drops per subscriber) cannot keep up with the
// engine, which does far more work per event. stats().queued_max shows how deep it got.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/result.h"
#include "kvevents/events.h"

namespace larder::kvevents {

struct PublisherParams {
  std::string bind_host = "127.0.0.1";  // "0.0.0.0" / "*": every interface (the endpoints then
                                        // say 0.0.0.0: advertise a reachable address instead)
  int pub_port = 0;     // 0: any free port (pub_endpoint() says which)
  int replay_port = 0;  // 0: any free port
  std::string topic;
  size_t buffer_batches = 10000;  // batches kept for replay
  double flush_ms = 5;            // batching window: events queued within it share a batch
  size_t max_batch_events = 512;  // a batch is sent at once when it has this many
  // Fault tests: this fraction of PUB sends is dropped (the batch still goes to the replay
  // buffer). The environment's LARDER_KV_EVENTS_DROP, when set, overrides it.
  double test_drop_rate = 0;
};

struct PublisherStats {
  int64_t batches = 0, events = 0;
  int64_t dropped_sends = 0;     // by test_drop_rate
  int64_t replays_served = 0, snapshots_served = 0;
  int64_t bad_requests = 0;      // replay requests not of the form (b"", 8 bytes)
  int64_t last_seq = -1;
  size_t queued = 0, queued_max = 0;  // events waiting for the publisher thread
  size_t buffered = 0;                // batches in the replay buffer
  size_t held = 0;                    // blocks in the snapshot state, all media
};

class Publisher {
 public:
  static Result<std::unique_ptr<Publisher>> start(PublisherParams p);
  // Publishes what is still queued, then closes the sockets (without lingering).
  ~Publisher();
  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  // Thread-safe; they only queue (a lock and, when the queue was empty, a wake-up write).
  void stored(std::vector<BlockHash> hashes, std::optional<BlockHash> parent, std::vector<int32_t> token_ids,
              int block_size, std::string medium);
  void removed(std::vector<BlockHash> hashes, std::string medium);
  void cleared();

  // Waits until everything queued before the call has been published; false on timeout.
  bool flush(double timeout_s = 5);

  const std::string& pub_endpoint() const;     // "tcp://HOST:PORT", the bound port
  const std::string& replay_endpoint() const;  // likewise
  PublisherStats stats() const;

 private:
  struct Impl;
  explicit Publisher(std::unique_ptr<Impl> impl);
  void push(Event e);
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::kvevents
