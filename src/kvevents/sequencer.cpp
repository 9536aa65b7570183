// Sequencer: the socket-free core of following one publisher (see subscriber.h).
#include <xxhash.h>

#include <algorithm>

#include "kvevents/subscriber.h"

namespace larder::kvevents {

namespace {
// Seqs count batches from 0; anything near the int64 limit is not one (and seq + 1 must not overflow).
constexpr int64_t kMaxSeq = int64_t(1) << 62;
}  // namespace

Sequencer::Sequencer(SequencerParams p) : p_(p) {
  if (p_.window == 0) p_.window = 1;
  ring_.resize(p_.window);
}

bool Sequencer::barrier(const std::optional<EventBatch>& b) {
  return b && !b->events.empty() && std::holds_alternative<AllBlocksCleared>(b->events.front());
}

void Sequencer::request(Step& s, int64_t from) {
  if (verify_) from = 0;  // a reconnect's check from 0 is not done until an answer from 0 ends
  s.replay_from = from;
  ++requests_;
  in_flight_ = true;
  first_reply_ = true;
  req_start_ = from;
  answer_from_ = expected_;
  answer_last_ = -1;
}

void Sequencer::reset_epoch(Step& s) {
  s.reset = true;
  s.apply.clear();  // batches of the old epoch not yet handed out are moot
  ++st_.resets;
  expected_ = 0;
  st_.last_seq = -1;
  pending_.clear();
  for (auto& slot : ring_) slot = Slot{};
  initial_done_ = false;
  answer_from_ = 0;
}

void Sequencer::apply(Step& s, int64_t seq, uint64_t fp, std::optional<EventBatch> b, bool wild) {
  ring_[static_cast<size_t>(seq) % ring_.size()] = Slot{seq, fp, wild};
  expected_ = seq + 1;
  if (b) {
    s.apply.emplace_back(seq, std::move(*b));
    ++st_.batches;
    st_.last_seq = seq;
  }
  // Nothing before a barrier matters any more.
  if (wild) pending_.erase(pending_.begin(), pending_.lower_bound(expected_));
}

// Applies what waits, in order, jumping to a waiting barrier. Not while an answer is on its
// way: it may begin with a snapshot, and only its END tells whether what waits is of the
// publisher that answers or of one that is gone; its own frames fill the seqs meanwhile.
void Sequencer::drain(Step& s) {
  if (in_flight_) return;
  while (!pending_.empty()) {
    auto it = pending_.begin();
    if (it->first < expected_) {  // the answer brought it too
      ++st_.duplicates;
      pending_.erase(it);
      continue;
    }
    bool jump = it->first > expected_ && barrier(it->second.batch);
    if (it->first != expected_ && !jump) break;
    if (jump) ++st_.barriers;
    int64_t seq = it->first;
    Pending pd = std::move(it->second);
    pending_.erase(it);
    apply(s, seq, pd.fp, std::move(pd.batch), jump);
  }
}

// Gives up on the seqs before `seq` that nobody can deliver any more, applying what waits.
void Sequencer::skip_to(Step& s, int64_t seq) {
  while (expected_ < seq) {
    auto it = pending_.begin();
    if (it != pending_.end() && it->first < expected_) {
      pending_.erase(it);
      continue;
    }
    int64_t next = it != pending_.end() && it->first < seq ? it->first : seq;
    st_.lost += std::min(next - expected_, kMaxSeq - std::min(st_.lost, kMaxSeq));  // saturates
    expected_ = next;
    if (next == seq) break;
    Pending pd = std::move(it->second);
    pending_.erase(it);
    apply(s, next, pd.fp, std::move(pd.batch), false);
  }
}

// A seq below the next expected one: the same bytes (or a snapshot's seq) is a duplicate;
// other bytes, or a seq too old to remember, is a publisher that restarted. A seq we jumped
// over (snapshot, barrier, lost) is a duplicate when live (the live copy of what the snapshot
// covered) but not in an answer: answers reach below what we applied only when we ask from 0,
// and a publisher whose buffer has the seqs we jumped over is not the one we jumped with.
bool Sequencer::is_duplicate(int64_t seq, uint64_t fp, bool replayed) const {
  if (expected_ - seq > static_cast<int64_t>(ring_.size())) return false;
  const Slot& slot = ring_[static_cast<size_t>(seq) % ring_.size()];
  if (slot.seq != seq) return !replayed;
  return slot.wild || slot.fp == fp;
}

Sequencer::Step Sequencer::start() {
  Step s;
  if (p_.can_replay) {
    ++st_.replays;
    request(s, 0);
  } else {
    initial_done_ = true;
  }
  return s;
}

Sequencer::Step Sequencer::feed(Source src, int64_t seq, std::string_view payload, std::string_view topic) {
  Step s;
  if (seq < 0 || seq > kMaxSeq) return s;  // END_SEQ is handled by the caller; the rest is garbage
  if (src == Source::Replay && !in_flight_) return s;  // an answer nobody waits for any more
  const uint64_t fp = XXH3_64bits(payload.data(), payload.size());
  auto decoded = decode(payload);
  std::optional<EventBatch> batch;
  if (decoded.ok()) batch = std::move(decoded.value());
  const bool first = src == Source::Replay && first_reply_;
  if (src == Source::Replay) first_reply_ = false, answer_last_ = std::max(answer_last_, seq);

  // An answer that starts past what we asked for: the publisher's buffer no longer goes back
  // that far. Ours then answers with a snapshot (a barrier) of its newest seq.
  if (first && seq > req_start_) {
    if (barrier(batch)) {
      if (seq < expected_ - 1) reset_epoch(s);  // its newest seq is behind ours: it restarted
      ++st_.barriers;
      apply(s, seq, fp, std::move(batch), true);
      drain(s);
      return s;
    }
    if (seq > expected_) skip_to(s, seq);  // vLLM: those batches are gone
  }

  bool restarted = false;
  if (src == Source::Live) {
    if (topic_ && *topic_ != topic) restarted = true;
    topic_ = std::string(topic);
  }
  if (!restarted && seq >= expected_) {
    auto it = pending_.find(seq);
    restarted = it != pending_.end() && it->second.fp != fp;  // two batches under one seq
  }
  if (!restarted && seq < expected_) {
    if (is_duplicate(seq, fp, src == Source::Replay)) {
      ++st_.duplicates;
      return s;
    }
    restarted = true;
  }
  if (!decoded.ok()) ++st_.decode_errors;

  if (restarted) {
    reset_epoch(s);
    // Inside an answer from 0 the publisher is already the new one: go on with it.
    if (!(src == Source::Replay && req_start_ == 0)) {
      pending_[seq] = Pending{fp, std::move(batch), requests_};
      if (p_.can_replay) {
        ++st_.replays;
        request(s, 0);
      } else {
        initial_done_ = true;
        skip_to(s, seq);
        drain(s);
      }
      return s;
    }
  }

  if (seq == expected_ && (src == Source::Replay || !in_flight_)) {
    apply(s, seq, fp, std::move(batch), false);
    drain(s);
    return s;
  }
  // Ahead of a hole, or live while an answer is on its way: wait.
  pending_.emplace(seq, Pending{fp, std::move(batch), requests_});
  if (pending_.size() > p_.max_pending) pending_.erase(std::prev(pending_.end()));
  if (src == Source::Live && !in_flight_ && seq > expected_ && !barrier(pending_.begin()->second.batch)) {
    ++st_.gaps;
    if (p_.can_replay) {
      ++st_.replays;
      request(s, expected_);
      return s;
    }
    skip_to(s, pending_.begin()->first);  // no replay: the hole stays a hole
  }
  // (A hole inside an answer waits for replay_end, which asks again.)
  drain(s);
  return s;
}

Sequencer::Step Sequencer::replay_end() {
  Step s;
  if (!in_flight_) return s;
  in_flight_ = false;
  verify_ = false;
  // We asked for seqs we had applied (a check from 0) and the publisher's newest is older than
  // ours: a new process that has published less (or nothing) yet.
  if (req_start_ < answer_from_ && answer_last_ < answer_from_ - 1) {
    reset_epoch(s);
    ++st_.replays;
    request(s, 0);
    return s;
  }
  // A batch that came before the request, past the newest seq of the (complete) answer: the
  // process that sent it is gone and the one answering has not got that far.
  for (const auto& [seq, pd] : pending_) {
    if (pd.gen < requests_ && seq > answer_last_) {
      reset_epoch(s);
      ++st_.replays;
      request(s, 0);
      return s;
    }
  }
  drain(s);
  if (pending_.empty()) {
    initial_done_ = true;
    fruitless_ = 0;
    return s;
  }
  // The live stream lost what came after the answer: ask again, unless answers keep bringing
  // nothing (a publisher that no longer has it): then skip the hole.
  fruitless_ = expected_ == answer_from_ ? fruitless_ + 1 : 0;
  if (fruitless_ >= 3 || !p_.can_replay) {
    fruitless_ = 0;
    skip_to(s, pending_.begin()->first);
    drain(s);
    if (pending_.empty()) initial_done_ = true;
    return s;
  }
  ++st_.replays;
  request(s, expected_);
  return s;
}

Sequencer::Step Sequencer::replay_failed() {
  Step s;
  if (!in_flight_) return s;
  ++st_.replays;
  request(s, expected_);
  return s;
}

Sequencer::Step Sequencer::idle() {
  Step s;
  if (in_flight_ || !p_.can_replay) return s;
  ++st_.polls;
  request(s, expected_);
  return s;
}

Sequencer::Step Sequencer::reconnected() {
  Step s;
  if (!p_.can_replay) return s;
  verify_ = true;
  ++st_.replays;
  request(s, 0);
  return s;
}

}  // namespace larder::kvevents
