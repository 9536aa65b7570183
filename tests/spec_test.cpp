// Speculative decoding: verification is lossless (greedy: identical tokens; sampling: the
// output distribution is the target's, checked by chi-square with a stated false-alarm rate,
// and the same check catches a deliberately broken acceptance rule), drafters, KV rollback.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <algorithm>
#include <map>
#include <random>

#include <unistd.h>

#include <filesystem>

#include "engine/context.h"
#include "model/synth.h"
#include "engine/sampler.h"
#include "spec/spec.h"
#include "test_model.h"

namespace larder {
namespace {

using spec::Draft;

// Chi-square critical value at false-alarm rate 1e-4 (z = 3.719) for df degrees of freedom
// (Wilson-Hilferty: within 1% of the exact quantile for df >= 1 at this tail).
double chi2_critical(int df) {
  const double z = 3.719, a = 2.0 / (9.0 * df);
  return df * std::pow(1 - a + z * std::sqrt(a), 3);
}

// Pearson's statistic of observed counts against expected probabilities; bins expected below 5
// are merged. Returns (statistic, degrees of freedom).
std::pair<double, int> chi2(const std::map<int32_t, int>& obs, const std::vector<Sampler::TokenProb>& p, int n) {
  double stat = 0, pool_e = 0, pool_o = 0;
  int bins = 0, seen = 0;
  for (const auto& c : p) {
    const double e = c.p * n;
    const auto it = obs.find(c.id);
    const int o = it == obs.end() ? 0 : it->second;
    seen += o;
    if (e < 5) {
      pool_e += e;
      pool_o += o;
      continue;
    }
    stat += (o - e) * (o - e) / e;
    ++bins;
  }
  pool_o += n - seen;  // draws outside p's support land here
  if (pool_e > 0 || pool_o > 0) {
    stat += (pool_o - pool_e) * (pool_o - pool_e) / std::max(pool_e, 1e-3);
    ++bins;
  }
  return {stat, std::max(1, bins - 1)};
}

struct Case {
  const char* name;
  SamplerParams sp;
};

std::vector<Case> cases() {
  SamplerParams plain;
  plain.temp = 1.0f;
  plain.top_k = 0;
  plain.top_p = 1.0f;
  plain.min_p = 0;
  SamplerParams shaped = plain;  // temperature, top-k/p and penalties, applied to p and q alike
  shaped.temp = 0.7f;
  shaped.top_k = 6;
  shaped.top_p = 0.9f;
  shaped.repeat_penalty = 1.3f;
  shaped.presence_penalty = 0.4f;
  return {{"plain", plain}, {"shaped", shaped}};
}

// Target logits for the root and each node, random but fixed.
std::vector<float> target_logits(int rows, int V, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0, 1.5f);
  std::vector<float> l(static_cast<size_t>(rows) * V);
  for (auto& x : l) x = n(g);
  return l;
}

// Runs `draws` verifications of draft d and checks that the first emitted token follows the
// target's distribution at the root and the second one, given the first is node c's token,
// follows the target's distribution at c. Returns the worst statistic / critical value ratio.
double lossless_ratio(const std::function<Draft(std::mt19937&)>& make, const std::vector<float>& logits, int V,
                      const SamplerParams& sp, spec::Rule rule, int draws) {
  std::mt19937 g(99);
  std::vector<int32_t> history = {1, 3, 3};
  SamplerParams s2 = sp;
  s2.seed = 1234;
  Sampler s(s2, V);
  std::vector<Sampler::TokenProb> p0;
  {
    Sampler ref(sp, V);
    ref.distribution(logits.data(), history, &p0);
  }
  std::map<int32_t, int> first;
  std::map<std::pair<int, int32_t>, std::map<int32_t, int>> second;  // by (root child node, its token)
  std::map<std::pair<int, int32_t>, int> n_second;
  for (int i = 0; i < draws; ++i) {
    const Draft d = make(g);
    auto v = spec::verify(d, logits.data(), V, s, history, rule);
    const int32_t t1 = v.path.empty() ? v.next : d.tokens[v.path[0]];
    first[t1]++;
    if (!v.path.empty()) {
      const int32_t t2 = v.path.size() > 1 ? d.tokens[v.path[1]] : v.next;
      second[{v.path[0], t1}][t2]++;
      n_second[{v.path[0], t1}]++;
    }
  }
  auto [st, df] = chi2(first, p0, draws);
  double worst = st / chi2_critical(df);
  for (auto& [key, obs] : second) {
    const auto [node, tok] = key;
    if (n_second[key] < 200) continue;
    std::vector<int32_t> h = history;
    h.push_back(tok);
    std::vector<Sampler::TokenProb> p1;
    Sampler ref(sp, V);
    ref.distribution(logits.data() + static_cast<size_t>(node + 1) * V, h, &p1);
    auto [s1, df1] = chi2(obs, p1, n_second[key]);
    worst = std::max(worst, s1 / chi2_critical(df1));
  }
  return worst;
}

TEST(SpecVerify, SamplingIsLosslessForChainsTreesAndDraftDistributions) {
  const int V = 12;
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    // One-hot chain of the two most likely tokens, a tree with siblings, a chain drawn from q.
    auto logits = target_logits(4, V, 7);
    Draft chain;
    chain.push(3, -1);
    chain.push(5, 0);
    Draft tree;
    tree.push(3, -1);
    tree.push(1, -1);
    tree.push(5, 0);
    // A sampling drafter's chain: each token drawn from its q row (q need not resemble p).
    std::vector<float> q(2 * V);
    std::mt19937 g(3);
    for (int r = 0; r < 2; ++r) {
      double sum = 0;
      for (int v = 0; v < V; ++v) sum += q[r * V + v] = std::uniform_real_distribution<float>(0.05f, 1)(g);
      for (int v = 0; v < V; ++v) q[r * V + v] /= sum;
    }
    auto qchain = [&](std::mt19937& rng) {
      Draft d;
      d.q = q;
      for (int r = 0; r < 2; ++r) {
        std::discrete_distribution<int> dist(q.begin() + r * V, q.begin() + (r + 1) * V);
        d.push(dist(rng), r - 1);
      }
      return d;
    };
    auto fixed = [](const Draft& d) { return [d](std::mt19937&) { return d; }; };
    const int draws = 20000;
    // False-alarm rate: 1e-4 per chi-square check; at most ~8 checks per draft, 3 drafts x 2 cases:
    // below 5e-3 for the whole test (the seeds are fixed, so a run is deterministic anyway).
    EXPECT_LT(lossless_ratio(fixed(chain), logits, V, c.sp, spec::Rule::Exact, draws), 1.0) << "chain";
    EXPECT_LT(lossless_ratio(fixed(tree), logits, V, c.sp, spec::Rule::Exact, draws), 1.0) << "tree";
    EXPECT_LT(lossless_ratio(qchain, logits, V, c.sp, spec::Rule::Exact, draws), 1.0) << "q chain";
    // The same statistics reject a rule that accepts every guess.
    EXPECT_GT(lossless_ratio(fixed(chain), logits, V, c.sp, spec::Rule::AcceptAll, draws), 1.0) << "broken chain";
    EXPECT_GT(lossless_ratio(qchain, logits, V, c.sp, spec::Rule::AcceptAll, draws), 1.0) << "broken q chain";
  }
}

TEST(SpecVerify, GreedyKeepsTheLongestAgreeingPathPlusOne) {
  const int V = 10;
  std::vector<float> l(4 * V, 0.f);
  l[0 * V + 4] = 5;  // root -> 4
  l[1 * V + 7] = 5;  // after node 0 (token 4) -> 7
  l[2 * V + 2] = 5;  // after node 1
  l[3 * V + 9] = 5;  // after node 2 (token 7, child of node 0) -> 9
  Draft d;
  d.push(4, -1);
  d.push(6, 0);
  d.push(7, 0);
  SamplerParams sp;
  sp.temp = 0;
  Sampler s(sp, V);
  std::vector<int32_t> h = {1};
  auto v = spec::verify(d, l.data(), V, s, h);
  ASSERT_EQ(v.path, (std::vector<int>{0, 2}));
  EXPECT_EQ(v.next, 9);
  EXPECT_EQ(h.size(), 1u);  // history restored
}

TEST(SpecVerify, TreeInputsMaskAncestorsOnly) {
  Draft d;
  d.push(10, -1);  // 0
  d.push(11, -1);  // 1
  d.push(12, 0);   // 2
  d.push(13, 2);   // 3
  std::vector<int32_t> toks, pos;
  AttnMask m;
  spec::verify_inputs(d, 99, 20, &toks, &pos, &m);
  EXPECT_EQ(toks, (std::vector<int32_t>{99, 10, 11, 12, 13}));
  EXPECT_EQ(pos, (std::vector<int32_t>{20, 21, 21, 22, 23}));
  using R = std::vector<std::pair<int, int>>;
  EXPECT_EQ(m.visible[0], (R{{0, 21}}));
  EXPECT_EQ(m.visible[2], (R{{0, 21}, {22, 23}}));            // node 1 sees itself only
  EXPECT_EQ(m.visible[4], (R{{0, 22}, {23, 25}}));            // node 3: nodes 0, 2, 3
}

TEST(SpecNgram, ProposesWhatFollowedTheLastMatch) {
  auto d = spec::make_ngram_drafter();
  std::vector<int32_t> ctx = {5, 6, 7, 8, 9, 1, 2, 5, 6, 7};
  Draft out;
  spec::DraftJob j;
  j.context = ctx;
  j.max_tokens = 3;
  j.out = &out;
  d->propose(std::span<spec::DraftJob>(&j, 1));
  EXPECT_EQ(out.tokens, (std::vector<int32_t>{8, 9, 1}));
  EXPECT_TRUE(out.is_chain());
  // Tree: two earlier continuations of "7" become siblings.
  std::vector<int32_t> c2 = {7, 1, 1, 7, 2, 2, 4, 7};
  j.context = c2;
  j.tree = true;
  j.max_tokens = 4;
  d->propose(std::span<spec::DraftJob>(&j, 1));
  ASSERT_GE(out.size(), 2);
  EXPECT_EQ(out.tokens[0], 2);  // the most recent continuation first
  bool sib = false;
  for (int i = 1; i < out.size(); ++i) sib |= out.parent[i] == -1 && out.tokens[i] == 1;
  EXPECT_TRUE(sib);
}

// A draft tree's verify pass gives every node exactly (bit for bit) the logits that plain decoding
// of its path gives: what keeps greedy speculation identical to plain greedy on real models,
// whose outputs turn on tiny differences. Grouped-query and plain multi-head models (their
// decode kernels round differently), f16 / f32 / q8_0 caches, trees over block boundaries.
TEST(SpecTree, NodeLogitsEqualPlainDecodingBitForBit) {
  struct Shape {
    const char* name;
    int n_head, n_head_kv, head_dim_mult;
  };
  for (Shape sh : {Shape{"gqa", 4, 2, 1}, Shape{"mha", 4, 4, 1}, Shape{"gqa hd32", 4, 1, 2}})
    for (DType kv : {DType::F16, DType::F32, DType::Q8_0}) {
      SCOPED_TRACE(std::string(sh.name) + " " + dtype_name(kv));
      SynthShape ss;
      ss.n_embd = 64 * sh.head_dim_mult;
      ss.n_ff = 128;
      ss.n_layer = 2;
      ss.n_head = sh.n_head;
      ss.n_head_kv = sh.n_head_kv;
      ss.n_vocab = 300;
      ss.n_ctx = 256;
      if (kv == DType::Q8_0 && ss.n_embd / ss.n_head % 32) continue;  // q8_0 needs head_dim % 32
      const std::string path = std::filesystem::temp_directory_path() / ("larder_spec_tree_" + std::to_string(getpid()) + ".gguf");
      SynthOptions so;
      so.progress = false;
      so.scale = 3.0f;
      // Quantized like the real models: their integer kernels give a row the same result in a
      // batch of any size (f32 weights do not: GEMM and GEMV round differently).
      so.dtype = DType::Q4_0;
      ASSERT_TRUE(synth_model(ss, so, path).ok());
      auto m = load_model(path);
      std::filesystem::remove(path);
      ASSERT_TRUE(m.ok()) << m.error();
      const int V = (*m)->cfg.n_vocab;
      ContextParams cp;
      cp.n_ctx = 256;
      cp.n_threads = 2;
      cp.block_size = 8;
      cp.type_k = cp.type_v = kv;
      auto c = Context::create(**m, cp);
      ASSERT_TRUE(c.ok()) << c.error();
      std::vector<int32_t> prompt;
      for (int i = 0; i < 29; ++i) prompt.push_back(1 + (i * 37) % 290);  // ends mid-block
      const int32_t last = 77;
      Draft d;  // two branches, the second deeper; 9 nodes span two blocks past the prompt
      d.push(5, -1);
      d.push(6, 0);
      d.push(7, 1);
      d.push(15, -1);
      d.push(16, 3);
      d.push(17, 4);
      d.push(18, 5);
      d.push(19, 6);
      d.push(8, 2);
      auto logits_of = [&](const std::vector<int32_t>& seq) {  // plain: prompt at once, then one by one
        (*c)->reset();
        EXPECT_TRUE((*c)->decode(std::span<const int32_t>(seq).first(prompt.size())).ok());
        for (size_t i = prompt.size(); i < seq.size(); ++i) EXPECT_TRUE((*c)->decode(std::span<const int32_t>(&seq[i], 1)).ok());
        return std::vector<float>((*c)->logits(), (*c)->logits() + V);
      };
      std::vector<std::vector<float>> ref;
      {
        std::vector<int32_t> seq = prompt;
        seq.push_back(last);
        ref.push_back(logits_of(seq));
        for (int i = 0; i < d.size(); ++i) {
          std::vector<int32_t> path;
          for (int j = i; j >= 0; j = d.parent[j]) path.insert(path.begin(), d.tokens[j]);
          std::vector<int32_t> s2 = seq;
          s2.insert(s2.end(), path.begin(), path.end());
          ref.push_back(logits_of(s2));
        }
      }
      (*c)->reset();
      ASSERT_TRUE((*c)->decode(prompt).ok());
      std::vector<int32_t> toks, pos;
      AttnMask mask;
      spec::verify_inputs(d, last, static_cast<int>(prompt.size()), &toks, &pos, &mask);
      std::vector<float> out(toks.size() * V);
      SeqBatch sb;
      sb.tokens = toks;
      sb.positions = pos;
      sb.mask = &mask;
      sb.block_table = (*c)->identity_table();
      sb.n_kv = static_cast<int>(prompt.size());
      sb.all_logits = true;
      sb.logits = out.data();
      ASSERT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
      for (size_t r = 0; r < toks.size(); ++r) {
        float worst = 0;
        for (int v = 0; v < V; ++v) worst = std::max(worst, std::fabs(out[r * V + v] - ref[r][v]));
        EXPECT_EQ(worst, 0.f) << "row " << r;
      }
    }
}

// The first n tokens a Generator produces for `prompt` (empty when a pass failed).
std::vector<int32_t> generate(spec::Generator& g, const std::vector<int32_t>& prompt, size_t n) {
  std::vector<int32_t> out;
  if (!g.start(prompt).ok()) return {};
  for (;;) {
    for (int32_t t : g.take()) out.push_back(t);
    if (out.size() >= n) break;
    if (!g.advance().ok()) return {};
  }
  out.resize(n);
  return out;
}

std::vector<int32_t> testing_greedy(const Model& m, const std::vector<int32_t>& prompt, int n) {
  ContextParams cp;
  cp.n_ctx = 512;
  cp.n_threads = 2;
  auto c = Context::create(m, cp);
  EXPECT_TRUE(c.ok());
  SamplerParams sp;
  sp.temp = 0;
  Sampler s(sp, m.cfg.n_vocab);
  EXPECT_TRUE((*c)->decode(prompt).ok());
  std::vector<int32_t> h = prompt, out;
  for (int i = 0; i < n; ++i) {
    const int32_t t = s.sample((*c)->logits(), h);
    h.push_back(t);
    out.push_back(t);
    EXPECT_TRUE((*c)->decode(std::span<const int32_t>(&t, 1)).ok());
  }
  return out;
}

// Greedy generation through the Generator is token-for-token plain greedy decoding, with every
// drafter, chain and tree (the small random model loops, so n-gram guesses get accepted).
TEST(SpecGenerator, GreedyOutputIdenticalToPlainDecoding) {
  const Model& m = *testing::small_model().model;
  ContextParams cp;
  cp.n_ctx = 512;
  cp.n_threads = 2;
  std::vector<int32_t> prompt = {1, 20, 30, 40, 20, 30, 40, 50, 60, 20, 30};
  SamplerParams sp;
  sp.temp = 0;
  const std::vector<int32_t> ref = testing_greedy(m, prompt, 120);
  for (std::string name : {"ngram", "suffix", "self:keep=1"})
    for (bool tree : {false, true}) {
      SCOPED_TRACE(name + (tree ? " tree" : " chain"));
      auto c = Context::create(m, cp);
      ASSERT_TRUE(c.ok());
      spec::DrafterOptions o;
      o.n_threads = 2;
      o.max_seq_len = 512;
      auto d = spec::make_drafter(name, m, o);
      ASSERT_TRUE(d.ok()) << d.error();
      Sampler s(sp, m.cfg.n_vocab);
      spec::SpecParams p;
      p.max_tokens = 6;
      p.tree = tree;
      spec::Generator g(**c, s, d->get(), p);
      EXPECT_EQ(generate(g, prompt, ref.size()), ref);
      EXPECT_GT(g.stats().accepted, 0) << "no guess was ever accepted: the test proves little";
    }
}

// draft:FILE — a separate, smaller model with the same vocabulary drafts for the target; another
// vocabulary is refused with a clear error.
TEST(SpecGenerator, DraftModelFromAFile) {
  const auto& sm = testing::small_model();
  const Model& m = *sm.model;
  const std::string dir = std::filesystem::temp_directory_path();
  const std::string draft = dir + "/larder_spec_draft_" + std::to_string(getpid()) + ".gguf";
  const std::string other = dir + "/larder_spec_other_" + std::to_string(getpid()) + ".gguf";
  SynthShape ss;  // half the width, one layer, the same 400-token vocabulary
  ss.n_embd = 32;
  ss.n_ff = 64;
  ss.n_layer = 1;
  ss.n_head = 2;
  ss.n_head_kv = 1;
  ss.n_vocab = m.cfg.n_vocab;
  ss.n_ctx = 512;
  SynthOptions so;
  so.progress = false;
  so.scale = 3.0f;
  so.vocab_from = sm.path;
  ASSERT_TRUE(synth_model(ss, so, draft).ok());
  ss.n_vocab = 300;
  so.vocab_from.clear();
  ASSERT_TRUE(synth_model(ss, so, other).ok());
  spec::DrafterOptions o;
  o.n_threads = 2;
  o.max_seq_len = 512;
  auto bad = spec::make_drafter("draft:" + other, m, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().find("vocabulary"), std::string::npos) << bad.error();
  EXPECT_FALSE(spec::make_drafter("draft:/nonexistent.gguf", m, o).ok());
  auto d = spec::make_drafter("draft:" + draft, m, o);
  ASSERT_TRUE(d.ok()) << d.error();
  std::filesystem::remove(draft);
  std::filesystem::remove(other);
  ContextParams cp;
  cp.n_ctx = 512;
  cp.n_threads = 2;
  auto c = Context::create(m, cp);
  ASSERT_TRUE(c.ok());
  const std::vector<int32_t> prompt = {1, 20, 30, 40, 20, 30, 40, 50, 60, 20, 30};
  SamplerParams sp;
  sp.temp = 0;
  Sampler s(sp, m.cfg.n_vocab);
  spec::SpecParams gp;
  gp.max_tokens = 4;
  gp.adaptive = false;
  spec::Generator g(**c, s, d->get(), gp);
  EXPECT_EQ(generate(g, prompt, 60), testing_greedy(m, prompt, 60));
  EXPECT_GT(g.stats().proposed, 0);
}

// End to end on a model: seeded speculative generations' first two tokens follow the model's
// exact distributions (computed from its logits), for a sampling drafter (self-draft chain: q
// from the skipped-layer model) and deterministic guesses (self-draft tree: its two best tokens
// per position, one-hot q). (Prompt lookup's guesses are rarely right at this temperature on a
// random model; its rule is the deterministic one, covered here and in SpecVerify.)
TEST(SpecGenerator, SamplingFollowsTheModelsDistribution) {
  const Model& m = *testing::small_model().model;
  const int V = m.cfg.n_vocab;
  ContextParams cp;
  cp.n_ctx = 128;
  cp.n_threads = 1;
  auto c = Context::create(m, cp);
  ASSERT_TRUE(c.ok());
  SamplerParams sp;
  sp.temp = 0.1f;  // the random model is nearly flat at 1: peaked enough that guesses are often right
  sp.top_k = 0;
  sp.top_p = 1.0f;
  sp.min_p = 0;
  const std::vector<int32_t> prompt = {1, 20, 30, 40, 20, 30, 40, 20, 30};
  // Exact first-token distribution, and the second given each first token.
  std::vector<Sampler::TokenProb> p0;
  ASSERT_TRUE((*c)->decode(prompt).ok());
  Sampler(sp, V).distribution((*c)->logits(), prompt, &p0);
  auto second_dist = [&](int32_t t1) {
    (*c)->reset();
    std::vector<int32_t> h = prompt;
    h.push_back(t1);
    EXPECT_TRUE((*c)->decode(h).ok());
    std::vector<Sampler::TokenProb> p1;
    Sampler(sp, V).distribution((*c)->logits(), h, &p1);
    return p1;
  };
  for (bool tree : {false, true}) {
    SCOPED_TRACE(tree ? "tree" : "chain");
    spec::DrafterOptions o;
    o.n_threads = 1;
    o.max_seq_len = 128;
    auto d = spec::make_drafter("self:keep=1", m, o);
    ASSERT_TRUE(d.ok());
    std::map<int32_t, int> first;
    std::map<int32_t, std::map<int32_t, int>> second;
    const int draws = 4000;
    int64_t accepted = 0;
    for (int i = 0; i < draws; ++i) {
      SamplerParams si = sp;
      si.seed = 77 + i;
      Sampler smp(si, V);
      spec::SpecParams gp;
      gp.max_tokens = 3;
      gp.adaptive = false;
      gp.tree = tree;
      spec::Generator g(**c, smp, d->get(), gp);
      ASSERT_TRUE(g.start(prompt).ok());
      std::vector<int32_t> out = g.take();
      while (out.size() < 2) {
        ASSERT_TRUE(g.advance().ok());
        for (int32_t t : g.take()) out.push_back(t);
      }
      accepted += g.stats().accepted;
      first[out[0]]++;
      second[out[0]][out[1]]++;
    }
    EXPECT_GT(accepted, 400) << "drafts were hardly ever accepted: the test proves little";
    std::printf("%s: %lld draft tokens accepted in %d draws, %zu distinct first tokens\n", tree ? "tree" : "chain",
                static_cast<long long>(accepted), draws, first.size());
    // False alarms: 1e-4 per check, at most 4 checks per drafter.
    auto [st, df] = chi2(first, p0, draws);
    EXPECT_LT(st, chi2_critical(df)) << "first token";
    std::vector<std::pair<int, int32_t>> by_count;
    for (auto& [t, n] : first) by_count.push_back({-n, t});
    std::sort(by_count.begin(), by_count.end());
    for (size_t k = 0; k < std::min<size_t>(3, by_count.size()); ++k) {
      const int32_t t1 = by_count[k].second;
      if (first[t1] < 300) continue;
      auto [s2, df2] = chi2(second[t1], second_dist(t1), first[t1]);
      EXPECT_LT(s2, chi2_critical(df2)) << "second token after " << t1;
    }
  }
}

}  // namespace
}  // namespace larder

// ---- In the scheduler: continuous batches --------------------------------------------------

#include "scheduler_util.h"

namespace {

using namespace larder;
using namespace larder::testing;

// A prompt that repeats itself, so prompt lookup and suffix decoding have something to copy.
std::vector<int32_t> looping_prompt(int n, int seed) {
  std::vector<int32_t> v = {1};
  for (int i = 1; i < n; ++i) v.push_back(3 + ((i % 11) * 31 + seed * 17) % 390);
  return v;
}

// Greedy through speculative sequences in one batch with plain ones (spec_max 0) equals greedy
// alone, for every drafter, chain and tree; blocks all come back; accepted tokens' blocks are
// named correctly (a later request extending the answer reuses them and answers identically).
// Both with the cost model (whether drafting pays depends on this machine's speeds: on a slow or
// instrumented build, ASan, the tiny model's pass is compute-bound and it may draft nothing) and
// with fixed drafts, which must get guesses accepted, or the test proves little.
TEST(SpecScheduler, GreedyBatchesEqualPlainDecodingAndLeakNothing) {
  const Model& m = *fx().model;
  for (std::string name : {"ngram", "suffix", "self:keep=1"})
    for (bool tree : {false, true})
      for (bool fixed : {false, true}) {
        SCOPED_TRACE(name + (tree ? " tree" : " chain") + (fixed ? " fixed" : " adaptive"));
        spec::DrafterOptions o;
        o.n_threads = 2;
        o.max_seq_len = 256;
        o.parallel = 4;
        auto d = spec::make_drafter(name, m, o);
        ASSERT_TRUE(d.ok()) << d.error();
        SchedulerParams p;
        p.parallel = 4;
        p.max_seq_len = 256;
        p.step_tokens = 48;
        p.n_threads = 2;
        p.drafter = d->get();
        p.spec_max = 6;
        p.spec_tree = tree;
        p.spec_fixed = fixed;
        auto s = Scheduler::create(m, p);
        ASSERT_TRUE(s.ok()) << s.error();
        std::vector<std::vector<int32_t>> prompts = {looping_prompt(60, 1), prompt(9, 2), looping_prompt(30, 3),
                                                     prompt(80, 4), looping_prompt(45, 5)};
        std::vector<std::unique_ptr<Collected>> res;
        for (size_t i = 0; i < prompts.size(); ++i) {
          res.push_back(std::make_unique<Collected>());
          GenRequest r = greedy_req(prompts[i], 40);
          if (i == 1) r.spec_max = 0;  // a plain sequence in the same batches
          ASSERT_TRUE((*s)->submit(std::move(r), collector(res.back().get())).ok());
        }
        for (size_t i = 0; i < prompts.size(); ++i) {
          ASSERT_EQ(res[i]->done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
          EXPECT_EQ(res[i]->finish, FinishReason::Length);
          EXPECT_EQ(res[i]->tokens, greedy_alone(prompts[i], 40)) << "request " << i;
          EXPECT_EQ(res[i]->completion, 40);
        }
        wait_idle(**s);
        auto st = (*s)->stats();
        EXPECT_EQ(st.kv_used, 0);
        if (fixed) EXPECT_GT(st.spec_accepted, 0) << "no guess accepted: the test proves little";
        EXPECT_EQ(st.drafter, (*d)->name());
        // The next turn: prompt + answer + 2 tokens reuses the answer's blocks.
        auto turn2 = prompts[0];
        turn2.insert(turn2.end(), res[0]->tokens.begin(), res[0]->tokens.end());
        turn2.push_back(5);
        turn2.push_back(6);
        Collected next;
        ASSERT_TRUE((*s)->submit(greedy_req(turn2, 8), collector(&next)).ok());
        next.done.get_future().wait();
        EXPECT_GE(next.cached, 80);
        EXPECT_EQ(next.tokens, greedy_alone(turn2, 8));
        wait_idle(**s);
        EXPECT_EQ((*s)->stats().kv_used, 0);
      }
}

// Knows the right answer (plain greedy's) and puts it in a tree's second branch, behind a wrong
// first branch: the accepted path's KV must move (nodes 1.. to consecutive entries).
class OracleDrafter final : public spec::Drafter {
 public:
  OracleDrafter(std::vector<std::vector<int32_t>> full) : full_(std::move(full)) {}
  std::string name() const override { return "oracle"; }
  int start(std::span<const int32_t> prompt) override {
    for (size_t i = 0; i < full_.size(); ++i)
      if (full_[i].size() >= prompt.size() && std::equal(prompt.begin(), prompt.end(), full_[i].begin()))
        return static_cast<int>(i);
    return -1;
  }
  void propose(std::span<spec::DraftJob> jobs) override {
    for (auto& j : jobs) {
      j.out->clear();
      if (j.handle < 0) continue;
      const auto& f = full_[j.handle];
      const size_t at = j.context.size();
      const int n = std::min<int>((j.max_tokens - 1), static_cast<int>(f.size()) - static_cast<int>(at));
      if (n <= 0) continue;
      const int V = 400;
      j.out->push((f[at] + 1) % V, -1);  // a wrong first branch
      for (int i = 0; i < n; ++i) j.out->push(f[at + i], i == 0 ? -1 : j.out->size() - 1);
      if (n > 1 && j.out->size() < j.max_tokens) j.out->push((f[at + 1] + 3) % V, 1);  // a wrong sibling deeper
    }
  }
  void finish(int, std::span<const int32_t>, bool) override {}

 private:
  std::vector<std::vector<int32_t>> full_;
};

TEST(SpecScheduler, AcceptedSecondBranchKeepsItsKv) {
  const Model& m = *fx().model;
  std::vector<std::vector<int32_t>> prompts = {prompt(20, 1), prompt(37, 2)}, full;
  std::vector<std::pair<std::vector<int32_t>, std::vector<float>>> ref;
  for (auto& pr : prompts) {
    ref.push_back(greedy_logprobs(pr, 30));
    full.push_back(pr);
    full.back().insert(full.back().end(), ref.back().first.begin(), ref.back().first.end());
  }
  OracleDrafter oracle(full);
  SchedulerParams p;
  p.parallel = 2;
  p.max_seq_len = 256;
  p.n_threads = 2;
  p.drafter = &oracle;
  p.spec_max = 6;
  p.spec_tree = true;
  p.spec_fixed = true;
  auto s = Scheduler::create(m, p);
  ASSERT_TRUE(s.ok()) << s.error();
  std::vector<std::unique_ptr<Collected>> res;
  std::vector<std::vector<float>> lps(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    res.push_back(std::make_unique<Collected>());
    GenRequest r = greedy_req(prompts[i], 30);
    r.n_logprobs = 1;
    auto inner = collector(res.back().get());
    ASSERT_TRUE((*s)->submit(std::move(r), [inner, out = &lps[i]](const TokenEvent& ev) {
                    if (ev.token >= 0) out->push_back(ev.logprob);
                    return inner(ev);
                  }).ok());
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(res[i]->done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_EQ(res[i]->tokens, ref[i].first) << "request " << i;
    ASSERT_EQ(lps[i].size(), ref[i].second.size());
    for (size_t t = 0; t < lps[i].size(); ++t) EXPECT_NEAR(lps[i][t], ref[i].second[t], 2e-4) << "request " << i << " token " << t;
  }
  wait_idle(**s);
  EXPECT_EQ((*s)->stats().kv_used, 0);
  EXPECT_GT((*s)->stats().spec_accepted, 20);
  // The same through the single-sequence Generator.
  ContextParams cp;
  cp.n_ctx = 512;
  cp.n_threads = 2;
  auto c = Context::create(m, cp);
  ASSERT_TRUE(c.ok());
  SamplerParams sp;
  sp.temp = 0;
  Sampler smp(sp, m.cfg.n_vocab);
  spec::SpecParams gp;
  gp.max_tokens = 6;
  gp.tree = true;
  gp.adaptive = false;
  spec::Generator g(**c, smp, &oracle, gp);
  EXPECT_EQ(generate(g, prompts[1], 30), ref[1].first);
  EXPECT_GT(g.stats().accepted, 10);
}

// A pool too small for every sequence's drafts: drafts go without (or preempt), results stay
// exact, nothing leaks.
TEST(SpecScheduler, TinyPoolKeepsResultsExact) {
  const Model& m = *fx().model;
  auto d = spec::make_drafter("ngram", m, {});
  ASSERT_TRUE(d.ok());
  SchedulerParams p;
  p.parallel = 3;
  p.max_seq_len = 128;
  p.kv_blocks = 9;  // 144 tokens for three sequences of up to ~100
  p.n_threads = 2;
  p.drafter = d->get();
  p.spec_max = 8;
  auto s = Scheduler::create(m, p);
  ASSERT_TRUE(s.ok()) << s.error();
  std::vector<std::vector<int32_t>> prompts = {looping_prompt(40, 1), looping_prompt(35, 2), looping_prompt(30, 3)};
  std::vector<std::unique_ptr<Collected>> res;
  for (auto& pr : prompts) {
    res.push_back(std::make_unique<Collected>());
    ASSERT_TRUE((*s)->submit(greedy_req(pr, 50), collector(res.back().get())).ok());
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(res[i]->done.get_future().wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_EQ(res[i]->tokens, greedy_alone(prompts[i], 50)) << "request " << i;
  }
  wait_idle(**s);
  EXPECT_EQ((*s)->stats().kv_used, 0);
}

}  // namespace
