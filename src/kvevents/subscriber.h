// The conductor's side of KV events: it follows every instance's publisher (ours or vLLM's)
// and hands each instance's batches to the index exactly once, in sequence order.
//
// Sequencer is the pure core (no sockets, no clocks): it is fed frames from the live stream
// (PUB) and from replay answers, and says what to apply, when to ask for a replay and when to
// forget an instance's state. SubscriberSet runs one Sequencer per instance over real sockets
// on one background thread.
//
// How it stays right:
//  - start: subscribe, then ask for a replay from 0. The answer (every buffered batch, or our
//    publisher's snapshot when its buffer no longer goes back to 0) rebuilds the instance's
//    state; live batches that arrive meanwhile wait in `pending` and are applied after it, each
//    seq once. This also covers ZeroMQ's slow joiner (batches published before the SUB connected).
//  - gap (a live seq beyond the next expected one): the later batches wait, a replay from the
//    first missing seq fills the hole. An answer that starts past what was asked for means the
//    publisher no longer has those batches: with a snapshot (a batch that starts with
//    AllBlocksCleared) nothing is lost; without one (vLLM) they are skipped and counted `lost`.
//  - any batch that starts with AllBlocksCleared is a barrier: the state after it does not
//    depend on what came before, so a gap before it needs no replay.
//  - duplicates (replay overlapping the live stream) are recognised by seq and by a fingerprint
//    of the payload bytes: a publisher sends the same bytes live and in replay.
//  - new epoch (the publisher restarted and counts from 0 again): a seq we already applied
//    arriving with other bytes (or, in an answer, a seq we never had), two different batches
//    under one waiting seq, a seq older than the fingerprint window, or a topic change.
//    The Sequencer then says `reset` (drop the instance's state) and resyncs from 0. A restart
//    whose new seqs are all still ahead of ours cannot be seen in the seqs; SubscriberSet
//    watches the SUB connection and, after a reconnect, verifies with a replay from 0.
//  - a lost tail (the last batches dropped, nothing after them): when an instance has been
//    quiet for a while, a replay from the next expected seq (usually answered with END alone).
//  - an answer's END also checks the past: if we asked from below what we had applied (from 0)
//    and the publisher's newest seq is older than ours, or a batch that came before the request
//    is newer than everything in the answer, the publisher that sent those is gone: reset.
// SubscriberSet sends each replay request on a fresh DEALER socket (closing the previous one),
// so a late answer to an abandoned request can never be taken for the current one.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/result.h"
#include "kvevents/events.h"

namespace larder::kvevents {

struct SequencerParams {
  bool can_replay = true;      // false: the publisher has no replay endpoint; gaps are skipped
  size_t max_pending = 65536;  // batches held behind a gap (the highest are dropped past it)
  size_t window = 16384;       // applied seqs whose fingerprints are kept; >= the publisher's buffer
};

struct SequencerStats {
  int64_t batches = 0;        // applied
  int64_t gaps = 0;           // holes seen in the live stream
  int64_t replays = 0;        // replay requests (start, gap, retry, reset, reconnect)
  int64_t polls = 0;          // replay requests made because the instance was quiet
  int64_t resets = 0;         // new epochs
  int64_t duplicates = 0;
  int64_t decode_errors = 0;  // payloads that are not a batch (skipped, counted once per seq)
  int64_t lost = 0;           // batches the publisher could no longer replay (skipped)
  int64_t barriers = 0;       // jumps over a hole to a batch that starts with AllBlocksCleared
  int64_t last_seq = -1;      // last applied
};

class Sequencer {
 public:
  enum class Source { Live, Replay };
  struct Step {
    bool reset = false;  // drop the instance's state, before applying `apply`
    std::vector<std::pair<int64_t, EventBatch>> apply;  // in seq order
    std::optional<int64_t> replay_from;  // send a replay request from this seq, replacing any in flight
  };

  explicit Sequencer(SequencerParams p = {});
  Step start();
  // A frame: from the live stream (with its topic), or from the answer to the replay in flight.
  Step feed(Source src, int64_t seq, std::string_view payload, std::string_view topic = {});
  Step replay_end();     // END_SEQ of the answer in flight
  Step replay_failed();  // no answer in time: ask again
  Step idle();           // the instance has been quiet: look for a lost tail
  Step reconnected();    // the live connection came back: the publisher may have restarted

  // The initial replay (or the resync after a reset) completed and no gap is open.
  bool synced() const { return initial_done_ && pending_.empty(); }
  bool replay_in_flight() const { return in_flight_; }
  int64_t expected() const { return expected_; }
  const SequencerStats& stats() const { return st_; }

 private:
  struct Pending {
    uint64_t fp;
    std::optional<EventBatch> batch;  // nullopt: not decodable
    uint64_t gen;                     // requests made before it came
  };
  struct Slot {
    int64_t seq = -1;
    uint64_t fp = 0;
    bool wild = false;  // a snapshot / barrier: other bytes for this seq are not a new epoch
  };
  void request(Step& s, int64_t from);
  void reset_epoch(Step& s);
  void apply(Step& s, int64_t seq, uint64_t fp, std::optional<EventBatch> b, bool wild);
  void drain(Step& s);
  void skip_to(Step& s, int64_t seq);
  bool is_duplicate(int64_t seq, uint64_t fp, bool replayed) const;
  static bool barrier(const std::optional<EventBatch>& b);

  SequencerParams p_;
  SequencerStats st_;
  int64_t expected_ = 0;
  std::map<int64_t, Pending> pending_;
  std::vector<Slot> ring_;
  bool in_flight_ = false, first_reply_ = false, verify_ = false, initial_done_ = false;
  int64_t req_start_ = 0, answer_from_ = 0;  // the request's start; expected_ when it was sent
  int64_t answer_last_ = -1;                  // the newest seq in the answer so far
  uint64_t requests_ = 0;
  int fruitless_ = 0;                         // answers in a row that did not close the hole
  std::optional<std::string> topic_;
};

struct SubscriberParams {
  double replay_timeout_s = 2.0;  // no END by then: the request is retried on a fresh socket
  double idle_poll_s = 1.0;       // quiet this long: replay from the next expected seq
  SequencerParams sequencer;
};

class SubscriberSet {
 public:
  // Called on the subscriber thread, in seq order per instance (a snapshot may restate the seq
  // last applied: it then describes the state already held); they may call synced()/stats()
  // but must not block for long (every instance waits).
  using BatchFn = std::function<void(const std::string& id, int64_t seq, const EventBatch& b)>;
  using ResetFn = std::function<void(const std::string& id)>;  // drop the instance's entries

  static Result<std::unique_ptr<SubscriberSet>> start(SubscriberParams p, BatchFn on_batch, ResetFn on_reset);
  ~SubscriberSet();
  SubscriberSet(const SubscriberSet&) = delete;
  SubscriberSet& operator=(const SubscriberSet&) = delete;

  // Subscribes to pub_endpoint ("tcp://host:port") and asks replay_endpoint ("" = none) for
  // everything from seq 0. An id already followed is replaced (as if removed first).
  Status add(const std::string& id, const std::string& pub_endpoint, const std::string& replay_endpoint);
  // Stops following; once it returns no callback for this id runs any more (the caller drops
  // the instance's index entries itself).
  Status remove(const std::string& id);
  bool synced(const std::string& id) const;
  std::optional<SequencerStats> stats(const std::string& id) const;
  std::vector<std::string> ids() const;

 private:
  struct Impl;
  explicit SubscriberSet(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::kvevents
