#include "pd/handoff.h"

namespace larder::pd {

const char* state_name(DecodeFsm::St s) {
  switch (s) {
    case DecodeFsm::St::Idle: return "idle";
    case DecodeFsm::St::Requesting: return "requesting";
    case DecodeFsm::St::Cancelling: return "cancelling";
    case DecodeFsm::St::Draining: return "draining";
    case DecodeFsm::St::Done: return "done";
    case DecodeFsm::St::Failed: return "failed";
  }
  return "?";
}

const char* state_name(PrefillFsm::St s) {
  switch (s) {
    case PrefillFsm::St::Computing: return "computing";
    case PrefillFsm::St::Flushing: return "flushing";
    case PrefillFsm::St::AwaitAck: return "await_ack";
    case PrefillFsm::St::Released: return "released";
    case PrefillFsm::St::Failed: return "failed";
  }
  return "?";
}

DecodeFsm::Act DecodeFsm::fail(const std::string& why) {
  st_ = St::Failed;
  if (err_.empty()) err_ = why;
  return Act::None;
}

void DecodeFsm::start(double now) {
  if (st_ != St::Idle) return;
  st_ = St::Requesting;
  t0_ = now;
}

DecodeFsm::Act DecodeFsm::on_reply_ok(bool verified, const std::string& why, double now) {
  if (st_ != St::Requesting && st_ != St::Cancelling) return Act::None;
  // An answer means the prefill instance has no write left in flight, whatever we asked since.
  if (!verified) {
    fail("refused the handed-off KV: " + why);
    return Act::SendAck;  // lets the prefill instance free its copy now
  }
  if (aborted_) {
    fail("the request ended before its KV arrived");
    return Act::SendAck;
  }
  st_ = St::Done;
  return Act::SendAck;
}

DecodeFsm::Act DecodeFsm::on_reply_error(const std::string& why, double now) {
  if (st_ != St::Requesting && st_ != St::Cancelling) return Act::None;
  return fail(why);
}

DecodeFsm::Act DecodeFsm::on_peer_lost(const std::string& why, double now) {
  if (st_ != St::Requesting && st_ != St::Cancelling) return Act::None;
  if (err_.empty()) err_ = why;
  st_ = St::Draining;
  t_wait_ = now;
  return Act::None;
}

DecodeFsm::Act DecodeFsm::on_abort(double now) {
  aborted_ = true;
  if (st_ == St::Idle) return fail("the request ended before its handoff started");
  if (st_ != St::Requesting) return Act::None;
  if (err_.empty()) err_ = "the request ended before its KV arrived";
  st_ = St::Cancelling;
  t_wait_ = now;
  return Act::SendCancel;
}

DecodeFsm::Act DecodeFsm::on_cancel_answered(double now) {
  if (st_ != St::Cancelling) return Act::None;
  return fail(timed_out_ ? "the prefill instance did not finish in time" : "cancelled");
}

DecodeFsm::Act DecodeFsm::tick(double now) {
  if (st_ == St::Requesting && now - t0_ > p_.timeout_s) {
    timed_out_ = true;
    err_ = "the prefill instance did not finish in time";
    st_ = St::Cancelling;
    t_wait_ = now;
    return Act::SendCancel;
  }
  // No answer to the cancel, or the peer died: after the grace nothing more can arrive.
  if ((st_ == St::Cancelling || st_ == St::Draining) && now - t_wait_ > p_.grace_s)
    return fail(st_ == St::Cancelling ? "the prefill instance does not answer" : "the prefill instance is gone");
  return Act::None;
}

void PrefillFsm::op_finished(bool ok, const std::string& why, double now) {
  if (outstanding_ > 0) outstanding_--;
  if (!ok && (st_ == St::Computing || st_ == St::Flushing)) {
    st_ = St::Failed;
    if (err_.empty()) err_ = why;
  }
  tick(now);
}

void PrefillFsm::on_end(bool ok, double now) {
  ended_ = true;
  if (st_ != St::Computing) return;
  if (!ok || cancelled_) {
    st_ = St::Failed;
    if (err_.empty()) err_ = cancelled_ ? "cancelled" : "the prompt could not be computed";
    return;
  }
  st_ = St::Flushing;
  tick(now);
}

void PrefillFsm::on_cancel() {
  cancelled_ = true;
  if (st_ == St::AwaitAck) st_ = St::Released;  // answered already: decode does not want it
  if (st_ == St::Computing || st_ == St::Flushing) {
    st_ = St::Failed;
    if (err_.empty()) err_ = "cancelled by the decode instance";
  }
}

void PrefillFsm::on_ack() {
  acked_ = true;
  if (st_ == St::AwaitAck) st_ = St::Released;
}

bool PrefillFsm::reply_ready() const {
  return outstanding_ == 0 && (st_ == St::AwaitAck || st_ == St::Released || st_ == St::Failed);
}

void PrefillFsm::tick(double now) {
  if (st_ == St::Flushing && outstanding_ == 0) {
    st_ = St::AwaitAck;
    t_reply_ = now;
  }
  if (st_ == St::AwaitAck && (acked_ || now - t_reply_ > p_.lease_s)) {
    lease_expired_ = !acked_;
    st_ = St::Released;
  }
}

}  // namespace larder::pd
