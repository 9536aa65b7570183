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
#include "scheduler_util.h"
#include "test_model.h"

using namespace larder;
using namespace larder::testing;

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
  Collected too_long, empty;
  EXPECT_FALSE((*s)->submit(greedy_req(prompt(120, 2), 20), collector(&too_long)).ok());
  EXPECT_FALSE((*s)->submit(greedy_req({}, 5), collector(&empty)).ok());
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
