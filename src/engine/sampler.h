// Token sampling: greedy, temperature, top-k, top-p, min-p and repetition /
// frequency / presence penalties, with a seeded RNG (same seed, same text).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace larder {

struct SamplerParams {
  float temp = 0.8f;            // <= 0: greedy
  int top_k = 40;               // <= 0: off
  float top_p = 0.95f;          // >= 1: off
  float min_p = 0.05f;          // <= 0: off
  float repeat_penalty = 1.0f;  // 1: off (llama.cpp semantics: divide positive logits, multiply negative)
  int repeat_last_n = 64;       // window for all penalties
  float freq_penalty = 0.0f;    // OpenAI: subtract count * freq_penalty
  float presence_penalty = 0.0f;
  uint64_t seed = 0xFFFFFFFFu;  // 0xFFFFFFFF = random seed
};

class Sampler {
 public:
  Sampler(const SamplerParams& p, int n_vocab);
  // Picks the next token from raw logits [n_vocab]; `history` is the tokens so far
  // (prompt + generated), used by the penalties.
  int32_t sample(const float* logits, const std::vector<int32_t>& history);
  // Consumes the random draw one sample() would (none when greedy): a decode instance
  // continuing a stream whose first token was sampled by a prefill instance.
  void skip_draw();
  // The distribution sample() draws from (penalties, temperature, top-k, min-p, top-p applied),
  // renormalised, in no particular order; greedy: the argmax alone with p = 1. Speculative verification
  // compares it with a drafter's proposal.
  struct TokenProb {
    int32_t id;
    float p;
  };
  void distribution(const float* logits, const std::vector<int32_t>& history, std::vector<TokenProb>* out);
  // One uniform draw in [0, 1) from the sampler's generator (acceptance tests of verification).
  double uniform();
  bool greedy() const { return p_.temp <= 0.f; }
  uint64_t seed() const { return seed_; }
  const SamplerParams& params() const { return p_; }

 private:
  struct Cand {
    int32_t id;
    float logit;
    float p;
  };
  // Fills cands_ (kept candidates, unnormalised p; sorted best first only where top-k/top-p need it)
  // or, when greedy, returns the argmax.
  int32_t prepare(const float* logits, const std::vector<int32_t>& history);
  SamplerParams p_;
  int n_vocab_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  std::vector<Cand> cands_;          // reused every call
  std::vector<float> adjusted_;      // [n_vocab]
  std::vector<int32_t> counts_;      // [n_vocab]
};

}  // namespace larder
