// The conductor's routing policy (src/conductor/policy.h): the cost-model fit against known
// coefficients, every policy's choice on hand-made clusters, SLO rejection and its
// Retry-After, ramp weights, role and weight filtering.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "conductor/policy.h"

using namespace larder::conductor;

namespace {

CostModel truth() {
  CostModel m;
  m.a = 0.012, m.b = 8e-4, m.c = 3e-7;
  m.d0 = 0.006, m.d1 = 0.0015, m.d2 = 2e-6;
  return m;
}

InstanceView idle(bool pre = true, bool dec = true) {
  InstanceView v;
  v.can_prefill = pre;
  v.can_decode = dec;
  v.cost = truth();
  v.parallel = 4;
  v.total_blocks = v.free_blocks = 1000;
  v.step_tokens = 256;
  return v;
}

RequestView req(int n_prompt, int max_tokens = 8) {
  RequestView r;
  r.n_prompt = n_prompt;
  r.max_tokens = max_tokens;
  r.block_size = 16;
  r.block_bytes = 100000;
  return r;
}

PolicyParams params(PolicyKind k) {
  PolicyParams p;
  p.kind = k;
  p.transfer_bw = 1e9;
  p.transfer_latency_s = 0.002;
  return p;
}

Decision route1(const PolicyParams& p, const RequestView& r, const std::vector<InstanceView>& in,
                const std::vector<Holding>& h, uint64_t rnd = 1) {
  uint64_t rr = 0;
  return route(p, r, in, h, rr, rnd);
}

}  // namespace

TEST(CostModel, Formulas) {
  const CostModel m = truth();
  EXPECT_DOUBLE_EQ(m.prefill_s(100, 50), 0.012 + 8e-4 * 100 + 3e-7 * 100 * (50 + 50));
  EXPECT_DOUBLE_EQ(m.prefill_s(0, 50), 0);
  EXPECT_DOUBLE_EQ(m.decode_step_s(4, 1000), 0.006 + 0.0015 * 4 + 2e-6 * 1000);
  EXPECT_DOUBLE_EQ(m.decode_step_s(0, 1000), 0);
}

TEST(CostFitter, RecoversCoefficientsFromNoisySamples) {
  const CostModel t = truth();
  CostFitter f(512);
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> noise(0.97, 1.03);
  for (int rep = 0; rep < 3; ++rep)
    for (int n : {16, 64, 128, 256, 512})
      for (int p : {0, 256, 1024, 2048}) f.add_prefill(n, p, t.prefill_s(n, p) * noise(rng));
  for (int rep = 0; rep < 5; ++rep)
    for (int b : {1, 2, 4, 8, 16})
      for (int ctx : {64, 1024, 4096}) f.add_decode(b, b * ctx, t.decode_step_s(b, b * ctx) * noise(rng));
  const CostModel m = f.fit(CostModel{});
  EXPECT_NEAR(m.a, t.a, 0.15 * t.a);
  EXPECT_NEAR(m.b, t.b, 0.10 * t.b);
  EXPECT_NEAR(m.c, t.c, 0.10 * t.c);
  EXPECT_NEAR(m.d0, t.d0, 0.15 * t.d0);
  EXPECT_NEAR(m.d1, t.d1, 0.15 * t.d1);
  EXPECT_NEAR(m.d2, t.d2, 0.10 * t.d2);
  EXPECT_EQ(f.n_prefill(), 60u);
  EXPECT_EQ(f.n_decode(), 75u);
}

TEST(CostFitter, ExactSamplesGiveExactCoefficients) {
  const CostModel t = truth();
  CostFitter f;
  for (int n : {10, 100, 1000})
    for (int p : {0, 500}) f.add_prefill(n, p, t.prefill_s(n, p));
  const CostModel m = f.fit(CostModel{});
  EXPECT_NEAR(m.a, t.a, 1e-9);
  EXPECT_NEAR(m.b, t.b, 1e-10);
  EXPECT_NEAR(m.c, t.c, 1e-13);
}

TEST(CostFitter, TooFewDistinctSamplesKeepThePrior) {
  CostModel prior;
  prior.a = 1e-3, prior.b = 1e-4, prior.c = 1e-8, prior.d0 = 7, prior.d1 = 8, prior.d2 = 9;
  CostFitter f;
  EXPECT_EQ(f.fit(prior).a, prior.a);  // nothing at all
  for (int i = 0; i < 10; ++i) f.add_prefill(64, 0, 0.1);  // one point: a, b, c cannot be told apart
  const CostModel m = f.fit(prior);
  EXPECT_EQ(m.a, prior.a);
  EXPECT_EQ(m.c, prior.c);
  EXPECT_NE(m.b, prior.b);
  EXPECT_NEAR(m.prefill_s(64, 0), 0.1, 1e-9);  // what was fitted explains the point
  EXPECT_EQ(m.d0, prior.d0);                    // no decode samples: decode is the prior's
  EXPECT_EQ(m.d2, prior.d2);
}

TEST(CostFitter, CoefficientsStayNonNegative) {
  CostFitter f;
  // Data from a negative fixed cost: unconstrained least squares would return a < 0.
  for (int n : {100, 200, 400, 800}) f.add_prefill(n, 0, -0.05 + 1e-3 * n);
  const CostModel m = f.fit(CostModel{});
  EXPECT_EQ(m.a, 0);  // the constraint is active
  EXPECT_GE(m.b, 0);
  EXPECT_GE(m.c, 0);
  EXPECT_NEAR(m.prefill_s(800, 0), 0.75, 0.075);
}

TEST(CostFitter, SlidingWindowForgetsOldSamples) {
  CostFitter f(32);
  CostModel slow = truth(), fast = truth();
  slow.d0 *= 10, slow.d1 *= 10, slow.d2 *= 10;
  for (int i = 0; i < 64; ++i) f.add_decode(1 + i % 8, 100 * (i % 5 + 1) * (1 + i % 8), slow.decode_step_s(1 + i % 8, 100 * (i % 5 + 1) * (1 + i % 8)));
  for (int i = 0; i < 32; ++i) f.add_decode(1 + i % 8, 100 * (i % 5 + 1) * (1 + i % 8), fast.decode_step_s(1 + i % 8, 100 * (i % 5 + 1) * (1 + i % 8)));
  EXPECT_EQ(f.n_decode(), 32u);
  const CostModel m = f.fit(CostModel{});
  EXPECT_NEAR(m.d0, fast.d0, 1e-6);
  EXPECT_NEAR(m.d1, fast.d1, 1e-6);
  // Unusable samples are dropped.
  f.add_decode(0, 10, 1);
  f.add_decode(2, 10, NAN);
  f.add_prefill(10, -1, 1);
  EXPECT_EQ(f.n_decode(), 32u);
  EXPECT_EQ(f.n_prefill(), 0u);
}

TEST(Policy, NamesAndRampWeights) {
  for (PolicyKind k : {PolicyKind::Random, PolicyKind::RoundRobin, PolicyKind::LeastLoad, PolicyKind::CacheAware,
                       PolicyKind::Conductor}) {
    PolicyKind back = PolicyKind::Random;
    EXPECT_TRUE(parse_policy(policy_name(k), &back));
    EXPECT_EQ(back, k);
  }
  PolicyKind x;
  EXPECT_FALSE(parse_policy("fastest", &x));
  EXPECT_DOUBLE_EQ(ramp_weight(0, 10), 0.1);
  EXPECT_DOUBLE_EQ(ramp_weight(5, 10), 0.55);
  EXPECT_DOUBLE_EQ(ramp_weight(10, 10), 1.0);
  EXPECT_DOUBLE_EQ(ramp_weight(100, 10), 1.0);
  EXPECT_DOUBLE_EQ(ramp_weight(3, 0), 1.0);  // no ramp
}

TEST(Policy, NoCandidates) {
  std::vector<InstanceView> in = {idle(), idle()};
  in[0].weight = 0, in[1].weight = 0;
  for (PolicyKind k : {PolicyKind::Random, PolicyKind::RoundRobin, PolicyKind::LeastLoad, PolicyKind::CacheAware,
                       PolicyKind::Conductor}) {
    const Decision d = route1(params(k), req(100), in, {});
    EXPECT_EQ(d.prefill, -1);
    EXPECT_EQ(d.decode, -1);
    EXPECT_FALSE(d.reject);
    EXPECT_NE(d.reason.find("prefill"), std::string::npos) << d.reason;
  }
  // Prefill instances only: nobody decodes.
  const Decision d = route1(params(PolicyKind::Conductor), req(100), {idle(true, false)}, {});
  EXPECT_EQ(d.prefill, -1);
  EXPECT_NE(d.reason.find("decode"), std::string::npos) << d.reason;
  EXPECT_EQ(route1(params(PolicyKind::LeastLoad), req(100), {}, {}).prefill, -1);
}

TEST(Policy, RoundRobinCyclesOverLiveInstancesWithTheRole) {
  std::vector<InstanceView> in = {idle(), idle(), idle(), idle()};
  in[2].weight = 0;                            // down
  in[3].can_prefill = in[3].can_decode = false;  // neither role
  uint64_t rr = 0;
  std::vector<int> got;
  for (int i = 0; i < 6; ++i) got.push_back(route(params(PolicyKind::RoundRobin), req(10), in, {}, rr, i).prefill);
  EXPECT_EQ(got, (std::vector<int>{0, 1, 0, 1, 0, 1}));
  EXPECT_EQ(rr, 6u);
}

TEST(Policy, RandomIsWeightedAndNeverPicksWeightZero) {
  std::vector<InstanceView> in = {idle(), idle(), idle()};
  in[1].weight = 0;
  in[2].weight = 0.25;
  std::map<int, int> n;
  uint64_t rr = 0;
  for (uint64_t r = 0; r < 4000; ++r) n[route(params(PolicyKind::Random), req(10), in, {}, rr, r * 0x9E3779B97F4A7C15ull).prefill]++;
  EXPECT_EQ(n[1], 0);
  EXPECT_NEAR(n[2] / 4000.0, 0.2, 0.03);  // 0.25 / (1 + 0.25)
  EXPECT_EQ(n[0] + n[2], 4000);
  // The same random value, the same choice.
  EXPECT_EQ(route1(params(PolicyKind::Random), req(10), in, {}, 42).prefill,
            route1(params(PolicyKind::Random), req(10), in, {}, 42).prefill);
}

TEST(Policy, LeastLoadTakesTheShortestPrefillQueue) {
  std::vector<InstanceView> in = {idle(), idle(), idle()};
  in[0].queued_prefill_tokens = 5000;
  in[1].queued_prefill_tokens = 300;
  in[2].queued_prefill_tokens = 2000;
  EXPECT_EQ(route1(params(PolicyKind::LeastLoad), req(100), in, {}).prefill, 1);
  // A ramping instance counts its load divided by its weight.
  in[1].weight = 0.1;  // (300 + 100) / 0.1 = 4000 > 2100
  EXPECT_EQ(route1(params(PolicyKind::LeastLoad), req(100), in, {}).prefill, 2);
  // P/D: decode on the least busy decode instance.
  std::vector<InstanceView> pd = {idle(true, false), idle(false, true), idle(false, true)};
  pd[1].running = 4;
  pd[2].running = 1;
  const Decision d = route1(params(PolicyKind::LeastLoad), req(100), pd, {});
  EXPECT_EQ(d.prefill, 0);
  EXPECT_EQ(d.decode, 2);
}

TEST(Policy, CacheAwareTakesTheLongestPrefixTiesByLoad) {
  std::vector<InstanceView> in = {idle(), idle(), idle()};
  std::vector<Holding> h(3);
  h[1].l1 = 3;
  h[2].l1 = 2, h[2].disk = 3;  // tiers count: 5 blocks
  in[2].queued_prefill_tokens = 100000;  // load does not matter while prefixes differ
  EXPECT_EQ(route1(params(PolicyKind::CacheAware), req(200), in, h).prefill, 2);
  h[1].l1 = 5;  // a tie: the less loaded
  EXPECT_EQ(route1(params(PolicyKind::CacheAware), req(200), in, h).prefill, 1);
  // Holdings past the cacheable blocks (one prompt token is always computed) do not count.
  h[1].l1 = 7, h[2].l1 = 6, h[2].disk = 0;
  EXPECT_EQ(route1(params(PolicyKind::CacheAware), req(100), in, h).prefill, 1);  // both capped at 6: load decides
  in[1].queued_prefill_tokens = 200000;
  EXPECT_EQ(route1(params(PolicyKind::CacheAware), req(100), in, h).prefill, 2);
  // Nothing cached anywhere: least load.
  in[0].queued_prefill_tokens = 10;
  EXPECT_EQ(route1(params(PolicyKind::CacheAware), req(100), in, std::vector<Holding>(3)).prefill, 0);
}

TEST(Policy, PredictedTtftOnAnIdleInstanceIsThePrefillCost) {
  const InstanceView v = idle();
  const PolicyParams p = params(PolicyKind::Conductor);
  EXPECT_DOUBLE_EQ(predict_ttft(p, req(200), v, 0, 0, 0, 0), truth().prefill_s(200, 0));
  EXPECT_DOUBLE_EQ(predict_ttft(p, req(200), v, 4, 0, 0, 0), truth().prefill_s(136, 64));
  // Chunks of 256 pay the fixed cost once each.
  EXPECT_DOUBLE_EQ(predict_ttft(p, req(600), v, 0, 0, 0, 0), truth().prefill_s(600, 0) + 2 * truth().a);
  // A queue: its tokens' work before this one.
  InstanceView q = idle();
  q.queued_prefill_tokens = 256;
  q.queued_prefill_attn = 256 * 128;
  q.waiting = 1;
  EXPECT_DOUBLE_EQ(predict_queue_s(q), truth().prefill_s(256, 0));
  EXPECT_DOUBLE_EQ(predict_ttft(p, req(200), q, 0, 0, 0, 0), truth().prefill_s(256, 0) + truth().prefill_s(200, 0));
  // The fetch overlaps the queue; the longer of the two counts.
  const double fetch = transfer_s(p, req(200), 10);
  EXPECT_DOUBLE_EQ(fetch, 0.002 + 10 * 100000 / 1e9);
  EXPECT_DOUBLE_EQ(predict_ttft(p, req(200), v, 10, 10, 0, 0), fetch + truth().prefill_s(40, 160));
}

TEST(Policy, ConductorWeighsCacheAgainstQueue) {
  const PolicyParams p = params(PolicyKind::Conductor);
  std::vector<InstanceView> in = {idle(), idle()};
  std::vector<Holding> h(2);
  h[0].l1 = 60;  // 960 of 1000 tokens cached on 0
  // No fetch: the second instance cannot fetch (transfer is slower than recomputing).
  PolicyParams slow = p;
  slow.transfer_bw = 1e3;
  EXPECT_EQ(route1(slow, req(1000), in, h).prefill, 0);
  EXPECT_EQ(route1(slow, req(1000), in, h).cached_blocks, 60);
  // A long queue on the holder: recomputing on the idle one is sooner.
  in[0].queued_prefill_tokens = 20000;
  const Decision d = route1(slow, req(1000), in, h);
  EXPECT_EQ(d.prefill, 1);
  EXPECT_EQ(d.fetch_from, -1);
  EXPECT_NEAR(d.predicted_ttft_s, predict_ttft(slow, req(1000), in[1], 0, 0, 0, 0), 1e-12);
}

TEST(Policy, ConductorFetchesFromABusyHolderWhenTransferBeatsRecompute) {
  const PolicyParams p = params(PolicyKind::Conductor);  // 1 GB/s: 0.1 ms a block
  std::vector<InstanceView> in = {idle(), idle(), idle()};
  std::vector<Holding> h(3);
  h[0].l1 = 60;
  h[2].l1 = 10;
  in[0].queued_prefill_tokens = 20000;
  in[2].queued_prefill_tokens = 20000;
  const Decision d = route1(p, req(1000), in, h);
  EXPECT_EQ(d.prefill, 1);
  EXPECT_EQ(d.decode, 1);
  EXPECT_EQ(d.fetch_from, 0);
  EXPECT_EQ(d.fetch_blocks, 60);
  EXPECT_EQ(d.fetched_blocks, 60);
  EXPECT_EQ(d.cached_blocks, 60);
  EXPECT_NEAR(d.predicted_ttft_s, transfer_s(p, req(1000), 60) + truth().prefill_s(40, 960), 1e-12);
  // Runs below min_fetch_blocks are not worth a transfer.
  PolicyParams q = p;
  q.min_fetch_blocks = 100;
  EXPECT_EQ(route1(q, req(1000), in, h).fetch_from, -1);
  // A candidate never fetches from itself: the holder of 1's fetch is 0 even when 1 leads.
  h[1].l1 = 60;
  h[0].l1 = 20;
  in[1].queued_prefill_tokens = 30000;
  const Decision e = route1(p, req(1000), in, h);
  EXPECT_NE(e.prefill, 1);
  EXPECT_EQ(e.fetch_from, 1);
}

TEST(Policy, ConductorLoadsTiersOnlyWhenLoadingBeatsRecompute) {
  PolicyParams p = params(PolicyKind::Conductor);
  std::vector<InstanceView> in = {idle()};
  std::vector<Holding> h(1);
  h[0].dram = 30;
  in[0].dram_load_bw = 1e10;  // 10 us a block: loads
  EXPECT_EQ(route1(p, req(1000), in, h).cached_blocks, 30);
  in[0].dram_load_bw = 1e6;  // 0.1 s a block: recomputes
  EXPECT_EQ(route1(p, req(1000), in, h).cached_blocks, 0);
  EXPECT_TRUE(tier_load_pays(req(1000), idle(), 1e10, 0));
  EXPECT_FALSE(tier_load_pays(req(1000), idle(), 1e6, 0));
}

TEST(Policy, ConductorRejectsWhenTheTtftSloCannotBeMet) {
  PolicyParams p = params(PolicyKind::Conductor);
  std::vector<InstanceView> in = {idle(), idle()};
  in[0].queued_prefill_tokens = in[1].queued_prefill_tokens = 5000;
  in[0].waiting = in[1].waiting = 10;
  const double queue = predict_queue_s(in[0]);
  const double ttft = predict_ttft(p, req(200), in[0], 0, 0, 0, 0);
  p.slo.ttft_s = ttft - 0.5 * queue;  // met once half of the queue is gone
  const Decision d = route1(p, req(200), in, {});
  EXPECT_TRUE(d.reject);
  EXPECT_EQ(d.prefill, -1);
  EXPECT_NEAR(d.retry_after_s, 0.5 * queue, 1e-9);
  EXPECT_NEAR(d.predicted_ttft_s, ttft, 1e-12);
  EXPECT_NE(d.reason.find("TTFT"), std::string::npos);
  // Within the SLO: admitted.
  p.slo.ttft_s = ttft + 0.01;
  EXPECT_FALSE(route1(p, req(200), in, {}).reject);
  // Not even an idle instance is fast enough: waiting cannot help; rejected while no
  // instance is idle (retry when one should be), served best effort when one is.
  p.slo.ttft_s = truth().prefill_s(200, 0) / 2;
  const Decision e = route1(p, req(200), in, {});
  EXPECT_TRUE(e.reject);
  EXPECT_NEAR(e.retry_after_s, queue, 1e-9);
  EXPECT_NE(e.reason.find("idle"), std::string::npos);
  in.push_back(idle());
  const Decision f = route1(p, req(200), in, {});
  EXPECT_FALSE(f.reject);
  EXPECT_EQ(f.prefill, 2);
  // The baselines never reject.
  EXPECT_FALSE(route1(params(PolicyKind::LeastLoad), req(200), in, {}).reject);
}

TEST(Policy, ConductorTbtSloAndDecodeRoom) {
  PolicyParams p = params(PolicyKind::Conductor);
  std::vector<InstanceView> pd = {idle(true, false), idle(false, true), idle(false, true), idle(false, true)};
  pd[1].running = 4;  // full
  pd[2].running = 2, pd[2].decode_ctx_tokens = 4000;
  pd[3].running = 1, pd[3].decode_ctx_tokens = 500;
  pd[3].free_blocks = 3;  // no room for a 200 + 8 token sequence (13 blocks)
  Decision d = route1(p, req(200), pd, {});
  EXPECT_EQ(d.prefill, 0);
  EXPECT_EQ(d.decode, 2);  // the only one with room
  EXPECT_NEAR(d.predicted_tbt_s, predict_tbt(req(200), pd[2]), 1e-15);
  // A P/D handoff adds the link's latency to the predicted TTFT.
  EXPECT_NEAR(d.predicted_ttft_s, truth().prefill_s(200, 0) + p.transfer_latency_s, 1e-12);
  p.slo.tbt_s = predict_tbt(req(200), pd[2]) * 0.9;
  d = route1(p, req(200), pd, {});
  EXPECT_TRUE(d.reject);
  EXPECT_NE(d.reason.find("between tokens"), std::string::npos);
  EXPECT_GT(d.retry_after_s, 0);
  // Colocated: a TBT-feasible instance wins over a faster-TTFT one whose batch is slow.
  std::vector<InstanceView> co = {idle(), idle()};
  co[0].running = 3, co[0].decode_ctx_tokens = 30000;
  co[1].cost.b *= 4;  // slow prompts, quick tokens
  PolicyParams c = params(PolicyKind::Conductor);
  EXPECT_EQ(route1(c, req(200), co, {}).prefill, 0);  // no SLO: the lowest TTFT
  c.slo.tbt_s = (predict_tbt(req(200), co[0]) + predict_tbt(req(200), co[1])) / 2;
  ASSERT_LT(predict_tbt(req(200), co[1]), predict_tbt(req(200), co[0]));
  EXPECT_EQ(route1(c, req(200), co, {}).prefill, 1);
}

TEST(Policy, ConductorRampWeightSteersAwayFromNewcomers) {
  const PolicyParams p = params(PolicyKind::Conductor);
  std::vector<InstanceView> in = {idle(), idle()};
  in[0].queued_prefill_tokens = 300;  // a little slower than the empty newcomer
  in[1].weight = ramp_weight(0, 30);
  EXPECT_EQ(route1(p, req(200), in, {}).prefill, 0);
  in[1].weight = ramp_weight(30, 30);
  EXPECT_EQ(route1(p, req(200), in, {}).prefill, 1);
}

TEST(Policy, CountHistorySplitsARegisteredLoadIntoOursThenAndOthers) {
  CountHistory h(10000);
  EXPECT_EQ(h.at(500), 0);
  h.set(1000, 1);  // ours starts on the instance
  h.set(1000, 1);  // no change: nothing recorded
  h.set(3000, 0);  // and ends
  EXPECT_EQ(h.now(), 0);
  EXPECT_EQ(h.at(999), 0);
  EXPECT_EQ(h.at(1000), 1);
  EXPECT_EQ(h.at(2500), 1);
  EXPECT_EQ(h.at(3000), 0);
  EXPECT_EQ(h.at(9999), 0);
  // Written at 2500 while ours ran: it counted ours only, and ours has ended since.
  EXPECT_EQ(h.others(1, 2500), 0);
  // Two others' beside ours then; a registration after ours ended counts others' only.
  EXPECT_EQ(h.others(3, 2500), 2);
  EXPECT_EQ(h.others(2, 3500), 2);
  // Ours ended at the instance before we saw it end: never negative.
  EXPECT_EQ(h.others(0, 2500), 0);
  // Before anything of ours (e.g. a conductor that just started): all registered are others'.
  EXPECT_EQ(h.others(4, 100), 4);
  // A clock that steps back keeps the history ordered.
  h.set(2000, 2);
  EXPECT_EQ(h.now(), 2);
  EXPECT_EQ(h.at(2999), 1);
  EXPECT_EQ(h.at(3000), 2);
  // Changes older than the window are forgotten except the newest of them.
  for (int i = 0; i < 100; ++i) h.set(20000 + i * 1000, i % 2);
  EXPECT_EQ(h.at(118000), 0);  // i = 98
  EXPECT_EQ(h.at(119000), 1);  // i = 99
  EXPECT_EQ(h.now(), 1);
}
