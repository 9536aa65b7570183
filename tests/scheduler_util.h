// Helpers of the scheduler-level tests: prompts, plain greedy decoding as the reference, and
// a token collector.
#pragma once
#include <chrono>
#include <cmath>
#include <future>
#include <thread>
#include <vector>

#include "engine/context.h"
#include "engine/scheduler.h"
#include "test_model.h"

namespace larder::testing {

inline SmallModel& fx() { return small_model(); }

inline std::vector<int32_t> prompt(int n, int seed) {
  std::vector<int32_t> v(n);
  v[0] = 1;
  for (int i = 1; i < n; ++i) v[i] = 3 + (i * 31 + seed * 17) % 390;
  return v;
}

// Plain greedy with each chosen token's log-probability (a KV entry out of place changes those
// even where it does not flip an argmax).
inline std::pair<std::vector<int32_t>, std::vector<float>> greedy_logprobs(const std::vector<int32_t>& p, int n) {
  ContextParams cp;
  cp.n_ctx = 512;
  cp.n_threads = 2;
  auto c = Context::create(*fx().model, cp);
  EXPECT_TRUE((*c)->decode(p).ok());
  std::vector<int32_t> toks;
  std::vector<float> lps;
  const int V = (*c)->n_vocab();
  for (int i = 0; i < n; ++i) {
    const float* lg = (*c)->logits();
    int32_t b = 0;
    for (int v = 1; v < V; ++v)
      if (lg[v] > lg[b]) b = v;
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v] - lg[b]));
    toks.push_back(b);
    lps.push_back(static_cast<float>(-std::log(sum)));
    if (i + 1 < n) {
      EXPECT_TRUE((*c)->decode(std::span<const int32_t>(&b, 1)).ok());
    }
  }
  return {toks, lps};
}

inline std::vector<int32_t> greedy_alone(const std::vector<int32_t>& p, int n) { return greedy_logprobs(p, n).first; }

struct Collected {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::None;
  int cached = -1, prompt_tokens = 0, completion = 0;
  std::promise<void> done;
};

inline GenRequest greedy_req(std::vector<int32_t> p, int n) {
  GenRequest r;
  r.prompt = std::move(p);
  r.sampling.temp = 0;
  r.max_tokens = n;
  r.ignore_eos = true;
  return r;
}

inline TokenCallback collector(Collected* c, int cancel_after = -1) {
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

inline void wait_idle(Scheduler& s) {
  for (int i = 0; i < 200; ++i) {
    auto st = s.stats();
    if (st.running == 0 && st.waiting == 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace larder::testing
