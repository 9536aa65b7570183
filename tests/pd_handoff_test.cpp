// The P/D handoff's state machines (src/pd/handoff.h) driven by a randomized discrete-event
// simulation of two instances and the network between them: random compute times, network
// delays, lost peers (kill -9 on either side), cancellations, deadlines and refused answers.
// The model checks what the protocol promises, on every run:
//   - every handoff ends in bounded time on both sides (decode's blocks freed or in use, prefill's
//     blocks released) and its end states are final;
//   - no KV write lands in decode's blocks after decode declared them quiesced (free to reuse);
//   - decode uses KV (Done) only when prefill answered success after all its writes completed,
//     the answer was verified and the request is still wanted;
//   - prefill frees its blocks only when no write reads them, and after the ack or the lease.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <random>

#include "kvcache/block_manager.h"
#include "pd/handoff.h"
#include "pd/pd.h"

namespace larder::pd {
namespace {

struct Sim {
  // Parameters (seconds).
  double timeout = 5, grace = 1, lease = 3, max_net = 0.2;
  std::mt19937_64 rng;
  explicit Sim(uint64_t seed) : rng(seed) {}
  double uni(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }
  bool coin(double p) { return uni(0, 1) < p; }
  double net() { return uni(0.001, max_net); }

  double t = 0;
  std::multimap<double, std::function<void()>> q;
  void at(double when, std::function<void()> f) { q.emplace(std::max(when, t), std::move(f)); }

  // Decode side.
  DecodeFsm d{DecodeFsm::Params{5, 1}};
  bool d_dead = false;
  double d_quiesced_at = -1;   // when decode first saw quiesced() (blocks may be reused from then)
  double d_done_at = -1;
  bool d_answer_verified = true;
  // Prefill side.
  PrefillFsm p{PrefillFsm::Params{3}};
  bool p_dead = false, p_got_request = false, p_ended = false, p_replied = false;
  double p_released_at = -1;
  int p_writes_total = 0, p_writes_posted = 0, p_writes_landed = 0, p_writes_failed = 0;
  double compute_s = 0;
  // What the checks need.
  std::vector<std::string> violations;
  int cancels_sent = 0;

  void violate(const std::string& v) { violations.push_back(v + " at t=" + std::to_string(t)); }

  void d_act(DecodeFsm::Act a) {
    if (d_dead) return;
    if (a == DecodeFsm::Act::SendCancel) {
      cancels_sent++;
      at(t + net(), [this] { p_on_cancel(); });
    }
    if (a == DecodeFsm::Act::SendAck) at(t + net(), [this] {
        if (!p_dead) p.on_ack();
      });
  }
  void d_observe() {
    if (d_dead) return;
    if (d.quiesced() && d_quiesced_at < 0) d_quiesced_at = t;
    if (d.done() && d_done_at < 0) {
      d_done_at = t;
      if (p_writes_landed != p_writes_total) violate("decode Done before every write landed");
      if (!d_answer_verified) violate("decode Done with an unverified answer");
      if (d.aborted()) violate("decode Done after the request was aborted");
    }
  }

  // A write lands in decode's pool (unless decode is dead).
  void land() {
    if (d_dead) return;
    p_writes_landed++;
    if (d_quiesced_at >= 0 && !d.done()) violate("a write landed after decode's blocks were quiesced");
  }

  void p_post_write() {
    if (p_dead || !p.may_write()) return;
    p.op_started();
    p_writes_posted++;
    const double dt = net();
    at(t + dt, [this] {
      // The write reaches decode (or not) and its completion comes back to prefill.
      const bool ok = !d_dead;
      if (ok) land();
      if (p_dead) return;
      p.op_finished(ok, ok ? "" : "peer gone", t);
      p_try_reply();
    });
  }

  void p_on_request() {
    if (p_dead) return;
    p_got_request = true;
    compute_s = uni(0.05, 8);
    p_writes_total = 1 + static_cast<int>(rng() % 12);
    // Writes are posted as layers/chunks finish, spread over the compute time.
    for (int i = 0; i < p_writes_total; ++i)
      at(t + compute_s * (i + 1) / p_writes_total, [this] { p_post_write(); });
    at(t + compute_s + 0.001, [this] {
      if (p_dead || p_ended) return;
      p_ended = true;
      p.on_end(true, t);
      p_try_reply();
    });
    // Prefill's own bound (pd.cpp: timeout + grace, then it cancels itself).
    at(t + timeout + grace, [this] {
      if (p_dead || p_replied) return;
      p_on_cancel_local();
    });
  }

  void p_on_cancel_local() {
    p.on_cancel();
    if (!p_ended) at(t + 0.01, [this] {  // the scheduler ends the cancelled sequence
        if (p_dead || p_ended) return;
        p_ended = true;
        p.on_end(false, t);
        p_try_reply();
      });
    p_try_reply();
  }

  void p_on_cancel() {
    if (p_dead) return;
    if (!p_got_request) {
      // The cancel overtook the request: pd.cpp keeps a tombstone and refuses the request later.
      tombstone = true;
      at(t + net(), [this] {
        if (!d_dead) {
          d_act(d.on_cancel_answered(t));
          d_observe();
        }
      });
      return;
    }
    p_on_cancel_local();
    // Answered once nothing is in flight (pd.cpp waits up to grace for that).
    wait_quiesced_then_answer(t + grace);
  }
  bool tombstone = false;

  void wait_quiesced_then_answer(double limit) {
    if (p_dead) return;
    if (p.quiesced()) {
      at(t + net(), [this] {
        if (!d_dead) {
          d_act(d.on_cancel_answered(t));
          d_observe();
        }
      });
      return;
    }
    if (t >= limit) return;  // answered "not quiesced": decode's grace covers it
    at(t + 0.01, [this, limit] { wait_quiesced_then_answer(limit); });
  }

  void p_try_reply() {
    if (p_dead || p_replied || !p.reply_ready() || !p_ended) return;
    p_replied = true;
    const bool ok = p.reply_ok();
    at(t + net(), [this, ok] {
      if (d_dead) return;
      if (ok) {
        d_answer_verified = !coin(0.1);  // a wrong name or layout now and then
        d_act(d.on_reply_ok(d_answer_verified, "name mismatch", t));
      } else {
        d_act(d.on_reply_error("failed", t));
      }
      d_observe();
    });
  }

  void p_tick() {
    if (p_dead) return;
    p.tick(t);
    if (p_ended && p.release_ready() && p_released_at < 0) {
      p_released_at = t;
      if (p.outstanding() != 0) violate("prefill released blocks with writes in flight");
    }
  }

  void kill_prefill() {
    if (p_dead) return;
    p_dead = true;
    // Writes already on the wire may still land, within the network delay.
    // Decode's connection breaks (if the request was sent and not answered).
    at(t + net(), [this] {
      if (d_dead) return;
      d_act(d.on_peer_lost("connection reset", t));
      d_observe();
    });
  }

  void run() {
    // Decode reserves and sends the request.
    d.start(0);
    const bool connect_refused = coin(0.05);
    if (connect_refused) {
      at(0.01, [this] {
        d_act(d.on_reply_error("connection refused", t));
        d_observe();
      });
    } else {
      at(net(), [this] {
        if (tombstone) {
          // pd.cpp refuses a request whose cancel came first: answered with an error.
          at(t + net(), [this] {
            if (!d_dead) {
              d_act(d.on_reply_error("cancelled", t));
              d_observe();
            }
          });
          return;
        }
        p_on_request();
      });
    }
    if (coin(0.2)) at(uni(0, 6), [this] { kill_prefill(); });
    if (coin(0.15)) at(uni(0, 10), [this] { d_dead = true; });
    if (coin(0.2)) at(uni(0, 6), [this] {
        if (!d_dead) {
          d_act(d.on_abort(t));
          d_observe();
        }
      });
    // Ticks on both sides (the scheduler polls every few ms; 10 ms here).
    for (double s = 0; s < 40; s += 0.01) at(s, [this] {
        if (!d_dead) {
          d_act(d.tick(t));
          d_observe();
        }
        p_tick();
      });
    while (!q.empty()) {
      auto it = q.begin();
      t = it->first;
      auto f = std::move(it->second);
      q.erase(it);
      f();
    }
  }
};

TEST(PdHandoff, RandomizedAgainstModel) {
  int done = 0, failed = 0, released = 0, lease_expired = 0;
  for (uint64_t seed = 1; seed <= 3000; ++seed) {
    Sim s(seed);
    s.run();
    for (auto& v : s.violations) ADD_FAILURE() << "seed " << seed << ": " << v;
    if (!s.d_dead) {
      // Every handoff ends on the decode side, in bounded time, in a final state.
      ASSERT_TRUE(s.d.done() || s.d.failed()) << "seed " << seed << ": decode stuck in " << state_name(s.d.state());
      ASSERT_GE(s.d_quiesced_at, 0) << "seed " << seed;
      EXPECT_LE(s.d_quiesced_at, s.timeout + 2 * s.grace + 4 * s.max_net + 0.05) << "seed " << seed;
      done += s.d.done();
      failed += s.d.failed();
    }
    if (!s.p_dead && s.p_got_request) {
      ASSERT_TRUE(s.p_ended) << "seed " << seed;
      ASSERT_GE(s.p_released_at, 0) << "seed " << seed << ": prefill never freed its blocks ("
                                     << state_name(s.p.state()) << ")";
      EXPECT_LE(s.p_released_at, s.timeout + 3 * s.grace + s.lease + 1) << "seed " << seed;
      released++;
      lease_expired += s.p.lease_expired();
    }
  }
  // The runs cover the interesting outcomes.
  EXPECT_GT(done, 500);
  EXPECT_GT(failed, 300);
  EXPECT_GT(released, 1000);
  EXPECT_GT(lease_expired, 0);
}

TEST(PdHandoff, DecodeDeadlineCancelsThenFailsAfterGrace) {
  DecodeFsm d(DecodeFsm::Params{2, 0.5});
  d.start(0);
  EXPECT_EQ(d.tick(1.0), DecodeFsm::Act::None);
  EXPECT_EQ(d.tick(2.1), DecodeFsm::Act::SendCancel);
  EXPECT_FALSE(d.quiesced());  // the prefill instance may still be writing
  EXPECT_EQ(d.tick(2.3), DecodeFsm::Act::None);
  EXPECT_FALSE(d.quiesced());
  d.tick(2.7);
  EXPECT_TRUE(d.failed());
  EXPECT_TRUE(d.timed_out());
  EXPECT_TRUE(d.quiesced());
}

TEST(PdHandoff, DecodeRefusesUnverifiedAnswer) {
  DecodeFsm d(DecodeFsm::Params{});
  d.start(0);
  EXPECT_EQ(d.on_reply_ok(false, "block 3 has another name", 0.1), DecodeFsm::Act::SendAck);
  EXPECT_TRUE(d.failed());
  EXPECT_NE(d.error().find("block 3"), std::string::npos);
}

TEST(PdHandoff, PrefillHoldsUntilAckOrLease) {
  PrefillFsm p(PrefillFsm::Params{3});
  p.op_started();
  p.on_end(true, 1.0);
  EXPECT_FALSE(p.reply_ready());  // a write is still reading the blocks
  p.op_finished(true, "", 1.1);
  EXPECT_TRUE(p.reply_ready());
  EXPECT_TRUE(p.reply_ok());
  p.tick(2.0);
  EXPECT_FALSE(p.release_ready());
  p.tick(4.2);
  EXPECT_TRUE(p.release_ready());
  EXPECT_TRUE(p.lease_expired());
  PrefillFsm q(PrefillFsm::Params{3});
  q.on_end(true, 1.0);
  q.tick(1.0);
  q.on_ack();
  EXPECT_TRUE(q.release_ready());
  EXPECT_FALSE(q.lease_expired());
}

TEST(PdHandoff, PrefillStopsWritingWhenCancelled) {
  PrefillFsm p(PrefillFsm::Params{3});
  EXPECT_TRUE(p.may_write());
  p.op_started();
  p.on_cancel();
  EXPECT_FALSE(p.may_write());
  EXPECT_FALSE(p.quiesced());
  p.op_finished(false, "cancelled", 0.5);
  EXPECT_TRUE(p.quiesced());
  p.on_end(false, 0.6);
  EXPECT_TRUE(p.release_ready());
  EXPECT_FALSE(p.reply_ok());
}

// What decode checks before any received block is used.
TEST(PdHandoff, VerifyAnswerChecksNamesLayoutAndToken) {
  kvcache::CacheIdentity id{"model#fp", "f16", 4};
  std::vector<int32_t> toks = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // two full blocks of 4, one partial
  std::vector<kvcache::BlockHash> names;
  kvcache::BlockHash h = kvcache::root_hash(id);
  for (int b = 0; b < 2; ++b) names.push_back(h = kvcache::chain_hash(h, std::span<const int32_t>(toks).subspan(b * 4, 4)));
  auto answer = [&](const std::string& layout, std::vector<std::string> nm, int tok) {
    std::string j = "{\"layout\":\"" + layout + "\",\"token\":" + std::to_string(tok) + ",\"logprob\":-0.5,\"top\":[[" +
                    std::to_string(tok) + ",-0.5]],\"names\":[";
    for (size_t i = 0; i < nm.size(); ++i) j += (i ? ",\"" : "\"") + nm[i] + "\"";
    return j + "]}";
  };
  RemoteFirst f;
  EXPECT_TRUE(verify_answer(answer("L", {names[0].hex(), names[1].hex()}, 7), "L", names, 10, 4, 100, &f).ok());
  EXPECT_EQ(f.token, 7);
  ASSERT_EQ(f.top.size(), 1u);
  // A block computed from other tokens (or another model, cache type or tenant salt) has another name.
  kvcache::BlockHash other = kvcache::chain_hash(names[0], std::span<const int32_t>(toks).subspan(0, 4));
  auto st = verify_answer(answer("L", {names[0].hex(), other.hex()}, 7), "L", names, 10, 4, 100, &f);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.error().find("block 1"), std::string::npos) << st.error();
  EXPECT_FALSE(verify_answer(answer("L2", {names[0].hex(), names[1].hex()}, 7), "L", names, 10, 4, 100, &f).ok());
  EXPECT_FALSE(verify_answer(answer("L", {names[0].hex()}, 7), "L", names, 10, 4, 100, &f).ok());  // a name missing
  EXPECT_FALSE(verify_answer(answer("L", {names[0].hex(), names[1].hex()}, 100), "L", names, 10, 4, 100, &f).ok());
  EXPECT_FALSE(verify_answer("not json", "L", names, 10, 4, 100, &f).ok());
  EXPECT_FALSE(verify_answer("{\"layout\":\"L\"}", "L", names, 10, 4, 100, &f).ok());
}


// What the prefill side checks in a decode instance's request before it computes or writes anything.
TEST(PdHandoff, PrefillRequestParsedAndItsBlocksChecked) {
  auto req = [](const std::string& tokens, int skip, int n_slots, const std::string& table) {
    return "{\"id\":\"a1\",\"layout\":\"L\",\"tokens\":" + tokens + ",\"sampling\":{\"temp\":0.5,\"top_k\":7,\"seed\":9}," +
           "\"n_logprobs\":2,\"salt\":\"s\",\"skip\":" + std::to_string(skip) + ",\"fetch\":true,\"dst\":{\"address\":" +
           "\"10.0.0.2:9000\",\"k\":\"K\",\"v\":\"V\",\"n_slots\":" + std::to_string(n_slots) + ",\"table\":" + table +
           "},\"fetch_from\":{\"api\":\"h:1\",\"tokens\":4}}";
  };
  PrefillRequest r;
  std::string code;
  ASSERT_TRUE(parse_prefill_request(req("[1,2,3,4,5,6]", 4, 64, "[3,9]"), &r, &code).ok());
  EXPECT_EQ(r.id, "a1");
  EXPECT_EQ(r.layout, "L");
  EXPECT_EQ(r.tokens, (std::vector<int32_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_FLOAT_EQ(r.sampling.temp, 0.5f);
  EXPECT_EQ(r.sampling.top_k, 7);
  EXPECT_EQ(r.n_logprobs, 2);
  EXPECT_EQ(r.salt, "s");
  EXPECT_EQ(r.peer, "10.0.0.2:9000");
  EXPECT_EQ(r.k_desc, "K");
  EXPECT_EQ(r.v_desc, "V");
  EXPECT_EQ(r.d_slots, 64);
  EXPECT_EQ(r.dst_table, (std::vector<int32_t>{3, 9}));
  EXPECT_EQ(r.skip, 4);
  EXPECT_TRUE(r.fetch);
  EXPECT_EQ(r.fetch_api, "h:1");
  EXPECT_EQ(r.fetch_tokens, 4);
  EXPECT_TRUE(check_prefill_blocks(r, 4).ok());

  auto blocks_ok = [&](const std::string& body, int bs) {
    PrefillRequest q;
    std::string c;
    EXPECT_TRUE(parse_prefill_request(body, &q, &c).ok()) << body;
    return check_prefill_blocks(q, bs).ok();
  };
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 4, 64, "[3]"), 4));       // the second block has no slot
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 4, 64, "[3,16]"), 4));    // past the decode pool's 16 blocks
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 4, 64, "[-1,2]"), 4));
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 2, 64, "[3,9]"), 4));     // skip is not whole blocks
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 8, 64, "[3,9]"), 4));     // skips the whole prompt
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", -4, 64, "[3,9]"), 4));
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 4, 62, "[3,9]"), 4));     // the decode pool is not whole blocks
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 4, 0, "[]"), 4));
  EXPECT_FALSE(blocks_ok(req("[]", 0, 64, "[]"), 4));                   // no prompt
  EXPECT_FALSE(blocks_ok(req("[1,2,3,4,5,6]", 4, 64, "[3,9]"), 8));     // another block size here

  EXPECT_FALSE(parse_prefill_request("not json", &r, &code).ok());
  EXPECT_EQ(code, "invalid_json");
  EXPECT_FALSE(parse_prefill_request("[1]", &r, &code).ok());
  EXPECT_EQ(code, "invalid_json");
  auto st = parse_prefill_request(req("[1,\"x\"]", 0, 64, "[0]"), &r, &code);
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(code, "invalid_value");
  EXPECT_NE(st.error().find("malformed handoff request"), std::string::npos) << st.error();
  EXPECT_FALSE(parse_prefill_request("{\"id\":\"a\",\"layout\":\"L\",\"tokens\":[1]}", &r, &code).ok());  // no dst
  // Integers only from JSON integers in range (a float or a huge number was a float-to-int overflow).
  EXPECT_FALSE(parse_prefill_request(req("[1,2.5,3]", 0, 64, "[0]"), &r, &code).ok());
  EXPECT_FALSE(parse_prefill_request(req("[1,8888888888888888888888888888888888888883]", 0, 64, "[0]"), &r, &code).ok());
  EXPECT_FALSE(parse_prefill_request(req("[1,4294967297]", 0, 64, "[0]"), &r, &code).ok());
  EXPECT_FALSE(parse_prefill_request(req("[1,2]", 0, 64, "[1e10]"), &r, &code).ok());
  st = parse_prefill_request(req("[1,2]", 0, 64, "[-5000000000]"), &r, &code);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.error().find("dst.table"), std::string::npos) << st.error();
}

}  // namespace
}  // namespace larder::pd
