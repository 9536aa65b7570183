// The P/D handoff protocol's two state machines, free of I/O so a randomized test can drive
// them against a model (tests/pd_handoff_test.cpp). src/pd/pd.cpp performs what they decide.
//
// Push: the decode instance reserves blocks, then asks the prefill instance to compute the
// prompt; the prefill instance writes each layer's KV of each computed chunk straight into the
// reserved blocks (one-sided writes into the decode pool), waits until every write is complete,
// and answers with the first token and the names of the blocks it sent. The decode instance
// checks the names and the layout before the blocks are used, acknowledges, and decodes.
//
// Every handoff ends in bounded time on both sides:
//   decode:  the answer, an error, the deadline (-> cancel, answered once no write is left), or
//            the prefill instance gone (-> a short drain grace for bytes already on the wire);
//            blocks are freed (or recomputed locally) only once no remote write can land.
//   prefill: the blocks it reads stay referenced until its writes have finished and decode has
//            acknowledged, or the lease ran out, or the handoff failed or was cancelled.
#pragma once
#include <string>

namespace larder::pd {

// Decode side. Times are seconds on one monotonic clock.
class DecodeFsm {
 public:
  enum class St { Idle, Requesting, Cancelling, Draining, Done, Failed };
  enum class Act { None, SendCancel, SendAck };
  struct Params {
    double timeout_s = 30;  // the whole handoff
    double grace_s = 2;     // a cancel's answer / bytes in flight after the peer died
  };
  explicit DecodeFsm(Params p) : p_(p) {}

  void start(double now);  // Idle -> Requesting (the request goes out)
  // The prefill instance answered 200; verified = names and layout are what was asked for.
  Act on_reply_ok(bool verified, const std::string& why, double now);
  // The prefill instance answered an error: it has no write left in flight (it waits for them).
  Act on_reply_error(const std::string& why, double now);
  // The connection broke or was refused: the peer may be dead with bytes still on the wire.
  Act on_peer_lost(const std::string& why, double now);
  Act on_abort(double now);             // the sequence ended first (client gone, shutdown)
  Act on_cancel_answered(double now);   // the prefill instance confirmed: nothing left to write
  Act tick(double now);                 // deadlines

  St state() const { return st_; }
  bool done() const { return st_ == St::Done; }
  bool failed() const { return st_ == St::Failed; }
  // Nothing can be written into the reserved blocks any more.
  bool quiesced() const { return st_ == St::Done || st_ == St::Failed || st_ == St::Idle; }
  bool aborted() const { return aborted_; }
  bool timed_out() const { return timed_out_; }
  const std::string& error() const { return err_; }

 private:
  Act fail(const std::string& why);
  Params p_;
  St st_ = St::Idle;
  double t0_ = 0, t_wait_ = 0;  // start; when Cancelling/Draining began
  bool aborted_ = false, timed_out_ = false;
  std::string err_;
};

// Prefill side.
class PrefillFsm {
 public:
  enum class St { Computing, Flushing, AwaitAck, Released, Failed };
  struct Params {
    double lease_s = 30;  // how long handed-off blocks wait for the acknowledgement
  };
  explicit PrefillFsm(Params p) : p_(p) {}

  // Writes are counted by the caller: op_started() when one is posted, op_finished(ok) when done.
  bool may_write() const { return st_ == St::Computing && !cancelled_; }
  void op_started() { outstanding_++; }
  void op_finished(bool ok, const std::string& why, double now);
  void on_end(bool ok, double now);  // the sequence ended (ok: its first token was sampled)
  void on_cancel();                  // decode asked to stop
  void on_ack();
  // Flushing -> AwaitAck once the writes are done; true when the answer is ready to go out
  // (reply_ok() then tells success or failure).
  bool reply_ready() const;
  bool reply_ok() const { return st_ == St::AwaitAck || st_ == St::Released; }
  void tick(double now);
  // The blocks may be freed: no write in flight and the handoff is over.
  bool release_ready() const { return outstanding_ == 0 && (st_ == St::Released || st_ == St::Failed); }
  bool quiesced() const { return outstanding_ == 0 && !may_write(); }
  St state() const { return st_; }
  int outstanding() const { return outstanding_; }
  bool cancelled() const { return cancelled_; }
  bool lease_expired() const { return lease_expired_; }
  const std::string& error() const { return err_; }

 private:
  Params p_;
  St st_ = St::Computing;
  int outstanding_ = 0;
  bool cancelled_ = false, acked_ = false, lease_expired_ = false, ended_ = false;
  double t_reply_ = 0;
  std::string err_;
};

const char* state_name(DecodeFsm::St s);
const char* state_name(PrefillFsm::St s);

}  // namespace larder::pd
