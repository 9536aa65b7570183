// Continuous batching: results equal running each request alone, prefix reuse is
// invisible in the output and reported exactly, preemption and cancellation leak no
// blocks, the queue is bounded.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <thread>

#include "engine/context.h"
#include "engine/scheduler.h"
#include "model/synth.h"
#include "test_model.h"

using namespace larder;

namespace {

larder::testing::SmallModel& fx() { return larder::testing::small_model(); }

std::vector<int32_t> prompt(int n, int seed) {
  std::vector<int32_t> v(n);
  v[0] = 1;
  for (int i = 1; i < n; ++i) v[i] = 3 + (i * 31 + seed * 17) % 390;
  return v;
}

std::vector<int32_t> greedy_alone(const std::vector<int32_t>& p, int n) {
  ContextParams cp;
  cp.n_ctx = 512;
  cp.n_threads = 2;
  auto c = Context::create(*fx().model, cp);
  EXPECT_TRUE((*c)->decode(p).ok());
  std::vector<int32_t> out;
  const int V = (*c)->n_vocab();
  for (int i = 0; i < n; ++i) {
    const float* lg = (*c)->logits();
    int32_t b = 0;
    for (int v = 1; v < V; ++v)
      if (lg[v] > lg[b]) b = v;
    out.push_back(b);
    if (i + 1 < n) {
      EXPECT_TRUE((*c)->decode(std::span<const int32_t>(&b, 1)).ok());
    }
  }
  return out;
}

struct Collected {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::None;
  int cached = -1, prompt_tokens = 0, completion = 0;
  std::promise<void> done;
};

GenRequest greedy_req(std::vector<int32_t> p, int n) {
  GenRequest r;
  r.prompt = std::move(p);
  r.sampling.temp = 0;
  r.max_tokens = n;
  r.ignore_eos = true;
  return r;
}

TokenCallback collector(Collected* c, int cancel_after = -1) {
  return [c, cancel_after](const TokenEvent& ev) {
    if (ev.token >= 0) c->tokens.push_back(ev.token);
    if (c->cached < 0) c->cached = ev.cached_tokens;
    c->prompt_tokens = ev.prompt_tokens;
    c->completion = ev.completion_tokens;
    if (ev.finish != FinishReason::None) {
      c->finish = ev.finish;
      c->done.set_value();
      return true;
    }
    if (cancel_after >= 0 && static_cast<int>(c->tokens.size()) >= cancel_after) {
      c->finish = FinishReason::Cancelled;
      c->done.set_value();
      return false;
    }
    return true;
  };
}

void wait_idle(Scheduler& s) {
  for (int i = 0; i < 200; ++i) {
    auto st = s.stats();
    if (st.running == 0 && st.waiting == 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace

TEST(Scheduler, BatchedRequestsEqualEachAlone) {
  SchedulerParams p;
  p.parallel = 4;
  p.max_seq_len = 256;
  p.step_tokens = 32;  // forces chunked prefill of the longer prompts
  p.n_threads = 2;
  auto s = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s.ok()) << s.error();
  std::vector<std::vector<int32_t>> prompts = {prompt(70, 1), prompt(5, 2), prompt(33, 3), prompt(100, 4), prompt(17, 5), prompt(48, 6)};
  std::vector<std::unique_ptr<Collected>> res;
  for (auto& pr : prompts) {
    res.push_back(std::make_unique<Collected>());
    ASSERT_TRUE((*s)->submit(greedy_req(pr, 12), collector(res.back().get())).ok());
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(res[i]->done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_EQ(res[i]->finish, FinishReason::Length);
    EXPECT_EQ(res[i]->tokens, greedy_alone(prompts[i], 12)) << "request " << i;
    EXPECT_EQ(res[i]->completion, 12);
  }
  wait_idle(**s);
  EXPECT_EQ((*s)->stats().kv_used, 0);
}

TEST(Scheduler, PrefixReuseIsInvisibleAndReportedExactly) {
  SchedulerParams p;
  p.parallel = 2;
  p.max_seq_len = 256;
  p.block_size = 16;
  auto s = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s.ok()) << s.error();
  auto pr = prompt(70, 9);
  Collected cold, warm;
  ASSERT_TRUE((*s)->submit(greedy_req(pr, 10), collector(&cold)).ok());
  cold.done.get_future().wait();
  ASSERT_TRUE((*s)->submit(greedy_req(pr, 10), collector(&warm)).ok());
  warm.done.get_future().wait();
  EXPECT_EQ(cold.cached, 0);
  EXPECT_EQ(warm.cached, 64);  // whole blocks, at least one token left to compute
  EXPECT_EQ(cold.tokens, warm.tokens);
  // A follow-up turn that extends prompt + answer reuses everything but the tail.
  auto turn2 = pr;
  turn2.insert(turn2.end(), cold.tokens.begin(), cold.tokens.end());
  turn2.push_back(5);
  turn2.push_back(6);
  Collected next;
  ASSERT_TRUE((*s)->submit(greedy_req(turn2, 4), collector(&next)).ok());
  next.done.get_future().wait();
  // The previous answer's last token was sampled but never fed back, so its KV (and
  // the block it would complete) is not there: whole blocks of the 79 computed tokens.
  const size_t computed_before = pr.size() + cold.tokens.size() - 1;
  EXPECT_EQ(next.cached, static_cast<int>(std::min(turn2.size() - 1, computed_before) / 16 * 16));
  EXPECT_EQ(next.tokens, greedy_alone(turn2, 4));
  wait_idle(**s);
  auto st = (*s)->stats();
  EXPECT_EQ(st.kv_used, 0);
  EXPECT_GT(st.kv_cached, 0);
  EXPECT_EQ(st.prefix_hit_tokens, 64 + next.cached);
}

TEST(Scheduler, PreemptionUnderATinyPoolKeepsResultsAndLeaksNothing) {
  SchedulerParams p;
  p.parallel = 3;
  p.max_seq_len = 64;
  p.block_size = 8;
  p.kv_blocks = 12;  // 96 slots: three sequences of ~50 tokens cannot all fit
  p.step_tokens = 64;
  auto s = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s.ok()) << s.error();
  std::vector<std::vector<int32_t>> prompts = {prompt(20, 11), prompt(21, 12), prompt(22, 13)};
  std::vector<std::unique_ptr<Collected>> res;
  for (auto& pr : prompts) {
    res.push_back(std::make_unique<Collected>());
    ASSERT_TRUE((*s)->submit(greedy_req(pr, 30), collector(res.back().get())).ok());
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(res[i]->done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_EQ(res[i]->tokens, greedy_alone(prompts[i], 30)) << "request " << i;
  }
  wait_idle(**s);
  auto st = (*s)->stats();
  EXPECT_GT(st.preemptions, 0);
  EXPECT_EQ(st.kv_used, 0);
}

TEST(Scheduler, CancelFreesBlocksAndQueueIsBounded) {
  SchedulerParams p;
  p.parallel = 1;
  p.max_queue = 2;
  p.max_seq_len = 128;
  auto s = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s.ok()) << s.error();
  Collected c;
  ASSERT_TRUE((*s)->submit(greedy_req(prompt(40, 1), 80), collector(&c, 3)).ok());
  c.done.get_future().wait();
  EXPECT_EQ(c.finish, FinishReason::Cancelled);
  wait_idle(**s);
  EXPECT_EQ((*s)->stats().kv_used, 0);
  // Too long for the context: refused up front.
  EXPECT_FALSE((*s)->submit(greedy_req(prompt(120, 2), 20), collector(new Collected)).ok());
  EXPECT_FALSE((*s)->submit(greedy_req({}, 5), collector(new Collected)).ok());
  // Fill: one running, two waiting, the next refused.
  std::vector<std::unique_ptr<Collected>> res;
  int refused = 0;
  for (int i = 0; i < 6; ++i) {
    res.push_back(std::make_unique<Collected>());
    if (!(*s)->submit(greedy_req(prompt(30, i), 60), collector(res.back().get())).ok()) ++refused;
  }
  EXPECT_GE(refused, 1);
  (*s)->shutdown(/*drain=*/true);
  EXPECT_EQ((*s)->stats().kv_used, 0);
}
