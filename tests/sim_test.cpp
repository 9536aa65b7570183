// The cluster simulator (src/sim): tiny traces whose answers are known from the cost model
// (TTFT and TBT of a lone request exactly), prefix hits, eviction to and hits from DRAM, P/D
// handoffs, fetches, policies on an obvious trace, SLO rejection, determinism; and the
// trace unit shared with `larder replay` (scaling, block names, the offline bound).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "sim/calibration.h"
#include "sim/sim.h"
#include "sim/trace.h"
#include "test_util.h"

using namespace larder;
using namespace larder::sim;
using conductor::PolicyKind;

namespace {

Calibration calib() {
  Calibration c;
  c.cost.a = 0.01, c.cost.b = 1e-3, c.cost.c = 1e-6;
  c.cost.d0 = 0.005, c.cost.d1 = 1e-3, c.cost.d2 = 1e-6;
  c.parallel = 4;
  c.step_tokens = 256;
  c.block_size = 16;
  c.kv_blocks = 1000;
  c.block_bytes = 1000;
  c.transfer_bw = 1e9;
  c.transfer_latency_s = 0.001;
  return c;
}

// A prompt of n tokens whose first `shared` full blocks belong to prefix `group` and the
// rest to this request alone (`uid`).
SimRequest request(double t, int n, int max_tokens, int group, int shared, int uid) {
  SimRequest r;
  r.arrival_s = t;
  r.n_prompt = n;
  r.max_tokens = max_tokens;
  for (int j = 0; j < n / 16; ++j)
    r.blocks.push_back(j < shared ? 1000000ull * (group + 1) + j : 1000000000ull * (uid + 1) + j);
  return r;
}

SimConfig colocated(int n, PolicyKind k = PolicyKind::Conductor) {
  SimConfig c;
  c.n_both = n;
  c.calib = calib();
  c.policy = k;
  return c;
}

SimReport run(const SimConfig& c, const std::vector<SimRequest>& reqs) {
  auto r = simulate(c, reqs);
  EXPECT_TRUE(r.ok()) << r.error();
  return r.ok() ? *r : SimReport{};
}

}  // namespace

TEST(Sim, LoneRequestsCostExactlyTheCostModel) {
  const Calibration cal = calib();
  // Sequential (each long done before the next): TTFT is one prefill pass, TBT one decode step.
  std::vector<SimRequest> reqs = {request(0, 200, 3, 0, 0, 0), request(100, 100, 1, 1, 0, 1)};
  const SimReport r = run(colocated(1), reqs);
  ASSERT_EQ(r.completed, 2);
  EXPECT_DOUBLE_EQ(r.ttft_s[0], cal.cost.prefill_s(200, 0));
  // Tokens 2 and 3: one sequence with 201, then 202 tokens in the pool.
  EXPECT_NEAR(r.tbt_s[0], (cal.cost.decode_step_s(1, 201) + cal.cost.decode_step_s(1, 202)) / 2, 1e-12);
  EXPECT_NEAR(r.ttft_s[1], cal.cost.prefill_s(100, 0), 1e-12);
  EXPECT_EQ(r.tbt_s.size(), 1u);  // a one-token answer has no TBT
  EXPECT_EQ(r.hit_tokens, 0);
  EXPECT_EQ(r.prompt_tokens, 300);
  EXPECT_NEAR(r.queue_s[0], 0, 1e-12);
  // The conductor's prediction for an idle instance is what happened.
  for (double e : r.ttft_error_s) EXPECT_NEAR(e, 0, 1e-12);
  // A prompt over the step budget runs in chunks: each pays the fixed cost.
  const SimReport l = run(colocated(1), {request(0, 600, 1, 0, 0, 0)});
  EXPECT_NEAR(l.ttft_s[0], cal.cost.prefill_s(600, 0) + 2 * cal.cost.a, 1e-12);
}

TEST(Sim, RepeatedPromptHits) {
  const Calibration cal = calib();
  // 200 tokens: 12 full blocks; the second computes only what is not cached (at least one token).
  const SimReport r = run(colocated(1), {request(0, 200, 1, 7, 12, 0), request(10, 200, 1, 7, 12, 1),
                                         request(20, 200, 1, 8, 12, 2)});
  ASSERT_EQ(r.completed, 3);
  EXPECT_EQ(r.hit_tokens, 192);
  EXPECT_EQ(r.hit_l1, 192);
  EXPECT_NEAR(r.ttft_s[1], cal.cost.prefill_s(8, 192), 1e-12);
  EXPECT_NEAR(r.ttft_s[2], cal.cost.prefill_s(200, 0), 1e-12);
  // A prompt of exactly 12 blocks reuses 11: its last token is computed.
  const SimReport e = run(colocated(1), {request(0, 192, 1, 7, 12, 0), request(10, 192, 1, 7, 12, 1)});
  EXPECT_EQ(e.hit_tokens, 176);
}

TEST(Sim, CapacityEvictsAndDramKeepsWhatThePoolDropped) {
  SimConfig c = colocated(1);
  c.calib.kv_blocks = 20;  // one 200-token prompt (13 blocks) at a time
  const std::vector<SimRequest> reqs = {request(0, 200, 1, 1, 12, 0), request(10, 200, 1, 2, 12, 1),
                                        request(20, 200, 1, 1, 12, 2)};
  const SimReport r = run(c, reqs);
  // B's 13 blocks evicted A's last 5 (a sequence's blocks are released tail first, as the
  // engine does): the third reuses A's first 7.
  EXPECT_EQ(r.hit_tokens, 112);
  EXPECT_EQ(r.evictions, 10);  // 5 of A for B, 5 of B for the third
  c.calib.kv_blocks = 40;
  EXPECT_EQ(run(c, reqs).hit_tokens, 192);  // room for both
  // With a DRAM tier the evicted blocks come back from it (loading beats recomputing here).
  c.calib.kv_blocks = 20;
  c.calib.dram_blocks = 100;
  c.calib.dram_load_bw = 1e9;
  // Those 5 now come back from DRAM.
  const SimReport d = run(c, reqs);
  EXPECT_EQ(d.hit_l1, 112);
  EXPECT_EQ(d.hit_dram, 80);
  EXPECT_EQ(d.hit_tokens, 192);
  EXPECT_NEAR(d.ttft_s[2], 5 * 1000 / 1e9 + c.calib.cost.prefill_s(8, 192), 1e-12);
  // Too slow a tier: recomputed.
  c.calib.dram_load_bw = 1e3;
  EXPECT_EQ(run(c, reqs).hit_dram, 0);
  // A prompt larger than the pool fails; the others go on.
  c = colocated(1);
  c.calib.kv_blocks = 10;
  const SimReport f = run(c, {request(0, 50, 1, 0, 0, 0), request(1, 400, 1, 1, 0, 1), request(2, 50, 1, 2, 0, 2)});
  EXPECT_EQ(f.failed, 1);
  EXPECT_EQ(f.completed, 2);
  EXPECT_NE(f.first_failure.find("too small"), std::string::npos);
}

TEST(Sim, CacheAwareBeatsRoundRobinOnAnObviousTrace) {
  // 8 prefixes cycled 5 times on 5 instances: round robin sends each repeat of a prefix to an
  // instance that has not seen it (8 and 5 are coprime), cache-aware back to its holder.
  std::vector<SimRequest> reqs;
  for (int m = 0; m < 5; ++m)
    for (int k = 0; k < 8; ++k) reqs.push_back(request((m * 8 + k) * 10.0, 160, 1, k, 9, m * 8 + k));
  const SimReport rr = run(colocated(5, PolicyKind::RoundRobin), reqs);
  const SimReport ca = run(colocated(5, PolicyKind::CacheAware), reqs);
  const SimReport co = run(colocated(5, PolicyKind::Conductor), reqs);
  EXPECT_EQ(rr.hit_tokens, 0);
  EXPECT_EQ(ca.hit_tokens, 32 * 144);  // every repeat reuses its 9 blocks
  EXPECT_EQ(co.hit_tokens, 32 * 144);
  EXPECT_EQ(rr.prompt_tokens, 40 * 160);
}

TEST(Sim, ConductorFetchesAHotPrefixFromABusyHolder) {
  SimConfig c = colocated(2);
  c.calib.parallel = 1;
  // A prefix is computed on instance 0, which then takes a long job; the prefix is wanted
  // again while it works: instance 1 fetches it (62 blocks in ~0.1 ms) instead of
  // recomputing it (~1.5 s), and keeps it for the next one.
  const std::vector<SimRequest> reqs = {request(0, 1000, 1, 5, 62, 0), request(5, 4000, 1, 9, 0, 1),
                                        request(6, 1000, 1, 5, 62, 2), request(7, 1000, 1, 5, 62, 3)};
  const SimReport r = run(c, reqs);
  ASSERT_EQ(r.completed, 4);
  EXPECT_EQ(r.fetches, 1);
  EXPECT_EQ(r.fetched_blocks, 62);
  EXPECT_EQ(r.hit_fetched, 62 * 16);
  EXPECT_EQ(r.hit_l1, 62 * 16);  // the fourth, from the fetched copy
  EXPECT_EQ(r.instances[1].prompts, 2);
  const double fetch = c.calib.transfer_latency_s + 62 * 1000 / 1e9;
  // (ttft_s is in completion order: the long job ends last.)
  EXPECT_NEAR(r.ttft_s[1], fetch + c.calib.cost.prefill_s(8, 992), 1e-9);
  EXPECT_NEAR(r.ttft_s[2], c.calib.cost.prefill_s(8, 992), 1e-9);
  // The baselines recompute it.
  EXPECT_EQ(run(colocated(2, PolicyKind::LeastLoad), reqs).hit_fetched, 0);
}

TEST(Sim, DisaggregatedHandoffAndLocalPrefill) {
  SimConfig c = colocated(1);
  c.n_both = 0;
  c.n_prefill = 1;
  c.n_decode = 1;
  const Calibration& cal = c.calib;
  // The prompt goes to the prefill instance, its KV back to decode; the second one's prompt
  // is cached at decode (it kept the handed-off blocks) but for 8 tokens: computed there.
  const SimReport r = run(c, {request(0, 200, 3, 1, 12, 0), request(10, 200, 2, 1, 12, 1)});
  ASSERT_EQ(r.completed, 2);
  EXPECT_EQ(r.handoffs, 1);
  EXPECT_EQ(r.handoff_blocks, 13);
  EXPECT_EQ(r.local_prefills, 1);
  // The KV streams while the prompt computes (13 KB at 1 GB/s): only the latency shows.
  EXPECT_NEAR(r.ttft_s[0], cal.cost.prefill_s(200, 0) + cal.transfer_latency_s, 1e-12);
  EXPECT_NEAR(r.tbt_s[0], (cal.cost.decode_step_s(1, 201) + cal.cost.decode_step_s(1, 202)) / 2, 1e-12);
  EXPECT_NEAR(r.ttft_s[1], cal.cost.prefill_s(8, 192), 1e-12);
  EXPECT_EQ(r.hit_tokens, 192);
  EXPECT_EQ(r.instances[0].role, "prefill");
  EXPECT_EQ(r.instances[1].role, "decode");
  EXPECT_EQ(r.instances[0].prompts, 1);
  EXPECT_EQ(r.instances[1].prompts, 1);
  // A slow link: the handoff ends when the bytes are across.
  c.calib.transfer_bw = 1e3;  // 13 s for 13 blocks of 1000 bytes
  const SimReport s = run(c, {request(0, 200, 1, 1, 12, 0)});
  EXPECT_NEAR(s.ttft_s[0], 13.0 + cal.transfer_latency_s, 1e-9);
}

TEST(Sim, RejectsWhenTheSloCannotBeMet) {
  std::vector<SimRequest> burst;
  for (int i = 0; i < 20; ++i) burst.push_back(request(0.01 * i, 500, 4, i, 0, i));
  SimConfig c = colocated(1);
  c.slo.ttft_s = 1e-6;  // impossible: the first is served best effort (the instance is idle),
                        // the others rejected until it would be idle again
  const SimReport none = run(c, burst);
  EXPECT_EQ(none.completed, 1);
  EXPECT_EQ(none.rejected, 19);
  EXPECT_EQ(none.good, 0);
  ASSERT_EQ(none.retry_after_s.size(), 19u);
  // Retry when the first prompt's compute (two chunks, as the instance reports it between
  // steps) is done.
  for (double t : none.retry_after_s) EXPECT_NEAR(t, c.calib.cost.prefill_s(500, 0) + c.calib.cost.a, 0.01);
  // Overload: the first ones fit, the queue then makes the rest miss 3 s: rejected with a
  // Retry-After that the queue's drain justifies.
  c.slo.ttft_s = 3;
  const SimReport r = run(c, burst);
  EXPECT_GT(r.completed, 0);
  EXPECT_GT(r.rejected, 0);
  EXPECT_EQ(r.completed + r.rejected, 20);
  for (double t : r.retry_after_s) {
    EXPECT_GT(t, 0);
    EXPECT_LT(t, 20 * c.calib.cost.prefill_s(500, 0));
  }
  EXPECT_EQ(r.good, r.completed);  // what was admitted met the SLO
  // The baselines admit everything; only some meet the SLO.
  c.policy = PolicyKind::LeastLoad;
  const SimReport b = run(c, burst);
  EXPECT_EQ(b.completed, 20);
  EXPECT_LT(b.good, 20);
  EXPECT_NEAR(b.goodput_rps, b.good / (0.01 * 19), 1e-9);
}

TEST(Sim, SameSeedSameResult) {
  std::mt19937_64 g(3);
  std::vector<SimRequest> reqs;
  double t = 0;
  for (int i = 0; i < 80; ++i) {
    t += std::uniform_real_distribution<double>(0, 0.3)(g);
    reqs.push_back(request(t, 64 + static_cast<int>(g() % 400), 1 + static_cast<int>(g() % 8), static_cast<int>(g() % 5),
                           static_cast<int>(g() % 4), i));
  }
  SimConfig c = colocated(4, PolicyKind::Random);
  c.seed = 11;
  const SimReport a = run(c, reqs), b = run(c, reqs);
  EXPECT_EQ(a.ttft_s, b.ttft_s);
  EXPECT_EQ(a.tbt_s, b.tbt_s);
  EXPECT_EQ(a.hit_tokens, b.hit_tokens);
  EXPECT_EQ(a.events, b.events);
  c.seed = 12;
  EXPECT_NE(run(c, reqs).ttft_s, a.ttft_s);
}

TEST(Sim, BadConfigurations) {
  SimConfig c = colocated(0);
  EXPECT_FALSE(simulate(c, {}).ok());
  c = colocated(1);
  c.n_prefill = 1;  // both kinds at once
  EXPECT_FALSE(simulate(c, {}).ok());
  c = colocated(1);
  EXPECT_FALSE(simulate(c, {request(5, 100, 1, 0, 0, 0), request(1, 100, 1, 0, 0, 1)}).ok());  // unsorted
}

TEST(SimCalibration, RoundTripAndErrors) {
  Calibration c = calib();
  c.model = "m.gguf";
  c.dram_blocks = 77;
  c.extra_json = R"({"samples": {"prefill": [[16, 0, 0.01]]}})";
  auto back = parse_calibration(calibration_json(c));
  ASSERT_TRUE(back.ok()) << back.error();
  EXPECT_EQ(back->model, "m.gguf");
  EXPECT_EQ(back->dram_blocks, 77);
  EXPECT_DOUBLE_EQ(back->cost.c, c.cost.c);
  EXPECT_NE(back->extra_json.find("prefill"), std::string::npos);
  EXPECT_FALSE(parse_calibration("[]").ok());
  auto e = parse_calibration(R"({"cost": {"a": 0, "b": 1e-3, "c": 0, "d0": 0, "d1": 0, "d2": 0}, "block_size": 16,
                                 "kv_blocks": 0, "block_bytes": 10})");
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().find("kv_blocks"), std::string::npos) << e.error();
  e = parse_calibration(R"({"cost": {"a": 0, "b": 1e-3, "c": 0, "d0": 0, "d1": 0}, "block_size": 16,
                            "kv_blocks": 10, "block_bytes": 10})");
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().find("d2"), std::string::npos) << e.error();
}

TEST(SimTrace, ScalingClippingAndBlockNames) {
  TraceReq r;
  r.input_length = 1300;  // 3 hash blocks: 512, 512, 276
  r.output_length = 100;
  r.hash_ids = {1, 2, 3};
  auto p = plan_trace({r}, 32, 0);
  EXPECT_EQ(p[0].prompt_len, 2 * 16 + 9);
  EXPECT_EQ(p[0].max_tokens, 4);
  EXPECT_FALSE(p[0].clipped);
  p = plan_trace({r}, 32, 40);
  EXPECT_TRUE(p[0].clipped);
  EXPECT_EQ(p[0].prompt_len, 36);
  EXPECT_EQ(p[0].max_tokens, 4);
  EXPECT_NE(check_scale(3), "");
  EXPECT_EQ(check_scale(64), "");
  // Names follow the hash-id prefix: K=32 (a block per id), K=64 (two ids a block), K=16
  // (two blocks an id).
  auto names = [](std::vector<uint64_t> ids, int K) {
    TraceReq t;
    t.input_length = 512 * static_cast<int64_t>(ids.size());
    t.hash_ids = ids;
    return block_names(t, plan_trace({t}, K, 0)[0], K, 16);
  };
  auto a = names({1, 2, 3, 4}, 32), b = names({1, 2, 9, 4}, 32);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_EQ(a[1], b[1]);
  EXPECT_NE(a[2], b[2]);
  EXPECT_NE(a[3], b[3]);  // a different prefix, even with the same id after it
  a = names({1, 2, 3, 4}, 64), b = names({1, 9, 3, 4}, 64);
  ASSERT_EQ(a.size(), 2u);
  EXPECT_NE(a[0], b[0]);  // id 2 is inside block 0
  a = names({1, 2}, 16), b = names({1, 3}, 16);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a[1], b[1]);
  EXPECT_NE(a[0], a[1]);
  EXPECT_NE(a[2], b[2]);
}

TEST(SimTrace, LoadErrorsNameTheLine) {
  const std::string path = ::testing::TempDir() + "/sim_trace_test.jsonl";
  {
    std::ofstream f(path);
    f << R"({"timestamp": 30, "input_length": 600, "output_length": 2, "hash_ids": [5, 6]})" << "\n\n"
      << R"({"timestamp": 10, "input_length": 10, "output_length": 0, "hash_ids": [7]})" << "\n";
  }
  auto t = load_trace(path, 0);
  ASSERT_TRUE(t.ok()) << t.error();
  ASSERT_EQ(t->size(), 2u);
  EXPECT_EQ((*t)[0].line, 3);  // sorted by time
  EXPECT_EQ(load_trace(path, 1)->size(), 1u);
  {
    std::ofstream f(path);
    f << R"({"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [5, 6]})" << "\n"
      << R"({"timestamp": 1, "input_length": 600, "output_length": 2, "hash_ids": [5]})" << "\n";
  }
  t = load_trace(path, 0);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().find("line 2"), std::string::npos) << t.error();
  EXPECT_FALSE(load_trace(path + ".absent", 0).ok());
}

// One instance with a pool that never evicts, requests far apart: the simulator reuses
// exactly what replay's offline unbounded bound says (the same scaling, names that match
// exactly when the tokens do).
TEST(SimTrace, SequentialUnboundedRunMeetsTheOfflineBound) {
  const std::string path = larder::testing::shared_path("traces/synthetic_trace.jsonl");
  if (!std::ifstream(path)) GTEST_SKIP() << "no trace at " << path;
  auto trace = load_trace(path, 400);
  ASSERT_TRUE(trace.ok()) << trace.error();
  for (int K : {32, 64}) {
    auto plans = plan_trace(*trace, K, 0);
    offline_hits(*trace, plans, std::vector<bool>(trace->size(), true), 16);
    int64_t bound = 0, prompt = 0;
    for (const auto& p : plans) bound += p.unbounded_hit, prompt += p.prompt_len;
    auto reqs = requests_from_trace(*trace, plans, K, 1.0, 16);
    for (size_t i = 0; i < reqs.size(); ++i) reqs[i].arrival_s = 1e4 * i;
    SimConfig c = colocated(1, PolicyKind::RoundRobin);
    c.calib.kv_blocks = 1 << 22;
    const SimReport r = run(c, reqs);
    EXPECT_EQ(r.prompt_tokens, prompt) << "K=" << K;
    EXPECT_GT(bound, 0);
    EXPECT_EQ(r.hit_tokens, bound) << "K=" << K;
  }
}
