// Engine invariants on small synthesized models: batched prefill equals token-by-token
// decoding, chunking is invisible, bad input gives errors, sampling is reproducible.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "engine/context.h"
#include "engine/sampler.h"
#include "model/synth.h"
#include "test_util.h"

using namespace larder;

namespace {

std::string tmp_model(const std::string& tag, SynthShape s, DType dt = DType::F32) {
  std::string path = std::filesystem::temp_directory_path() / ("larder_engine_" + tag + "_" + std::to_string(getpid()) + ".gguf");
  SynthOptions o;
  o.dtype = dt;
  o.progress = false;
  o.scale = 3.0f;
  Status st = synth_model(s, o, path);
  EXPECT_TRUE(st.ok()) << st.error();
  return path;
}

SynthShape small(const std::string& arch, int kv) {
  SynthShape s;
  s.arch = arch;
  s.n_embd = 64; s.n_ff = 96; s.n_layer = 2; s.n_head = 4; s.n_head_kv = kv; s.n_vocab = 300; s.n_ctx = 128;
  return s;
}

}  // namespace

TEST(Engine, BatchedPrefillEqualsTokenByToken) {
  for (const char* arch : {"llama", "qwen2"}) {
    std::string path = tmp_model(arch, small(arch, 2));
    auto m = load_model(path);
    ASSERT_TRUE(m.ok()) << m.error();
    const int n = 40, V = (*m)->cfg.n_vocab;
    std::vector<int32_t> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = (i * 37 + 5) % V;
    ContextParams p;
    p.n_ctx = 64;
    p.n_threads = 2;
    auto a = Context::create(**m, p);
    auto b = Context::create(**m, p);
    ASSERT_TRUE(a.ok() && b.ok());
    std::vector<float> all(static_cast<size_t>(n) * V), one(static_cast<size_t>(n) * V);
    ASSERT_TRUE((*a)->decode(ids, all.data()).ok());
    for (int i = 0; i < n; ++i) ASSERT_TRUE((*b)->decode(std::span<const int32_t>(&ids[i], 1), &one[static_cast<size_t>(i) * V]).ok());
    float mx = 0, diff = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      mx = std::max(mx, std::fabs(all[i]));
      diff = std::max(diff, std::fabs(all[i] - one[i]));
    }
    EXPECT_LE(diff, 1e-5f * mx) << arch;
    // Small batch size forces internal chunking; results must not change.
    p.n_batch = 7;
    auto c = Context::create(**m, p);
    std::vector<float> chunked(static_cast<size_t>(n) * V);
    ASSERT_TRUE((*c)->decode(ids, chunked.data()).ok());
    for (size_t i = 0; i < all.size(); ++i) ASSERT_NEAR(all[i], chunked[i], 1e-5f * mx);
    std::filesystem::remove(path);
  }
}

TEST(Engine, TruncateAndRedecodeIsDeterministic) {
  std::string path = tmp_model("trunc", small("llama", 4));
  auto m = load_model(path);
  ASSERT_TRUE(m.ok()) << m.error();
  ContextParams p;
  p.n_ctx = 64;
  auto c = Context::create(**m, p);
  std::vector<int32_t> ids = {1, 10, 20, 30, 40};
  ASSERT_TRUE((*c)->decode(ids).ok());
  std::vector<float> first((*c)->logits(), (*c)->logits() + (*c)->n_vocab());
  (*c)->truncate(3);
  ASSERT_TRUE((*c)->decode(std::span<const int32_t>(ids.data() + 3, 2)).ok());
  for (int i = 0; i < (*c)->n_vocab(); ++i) ASSERT_FLOAT_EQ(first[i], (*c)->logits()[i]);
  std::filesystem::remove(path);
}

TEST(Engine, ContextOverflowAndBadTokensAreErrors) {
  std::string path = tmp_model("overflow", small("llama", 4));
  auto m = load_model(path);
  ASSERT_TRUE(m.ok()) << m.error();
  ContextParams p;
  p.n_ctx = 8;
  auto c = Context::create(**m, p);
  std::vector<int32_t> ids(9, 5);
  Status st = (*c)->decode(ids);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.error().find("context"), std::string::npos);
  std::vector<int32_t> bad = {1, 100000};
  EXPECT_FALSE((*c)->decode(bad).ok());
  EXPECT_EQ((*c)->n_past(), 0);  // nothing half-applied
  std::filesystem::remove(path);
}

TEST(Engine, QuantizedModelsLoadAndRun) {
  for (DType t : {DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0}) {
    std::string path = tmp_model(std::string("q_") + dtype_name(t), small("llama", 2), t);
    auto m = load_model(path);
    ASSERT_TRUE(m.ok()) << m.error();
    ContextParams p;
    p.n_ctx = 32;
    auto c = Context::create(**m, p);
    std::vector<int32_t> ids = {1, 2, 3, 4};
    ASSERT_TRUE((*c)->decode(ids).ok());
    for (int i = 0; i < (*c)->n_vocab(); ++i) ASSERT_TRUE(std::isfinite((*c)->logits()[i]));
    std::filesystem::remove(path);
  }
}

TEST(Sampler, GreedyAndTopK1PickArgmax) {
  std::vector<float> lg = {0.1f, 2.0f, 1.9f, -1.f};
  SamplerParams g;
  g.temp = 0;
  EXPECT_EQ(Sampler(g, 4).sample(lg.data(), {}), 1);
  SamplerParams k;
  k.temp = 1.0f;
  k.top_k = 1;
  k.seed = 7;
  Sampler s(k, 4);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s.sample(lg.data(), {}), 1);
}

TEST(Sampler, SameSeedSameSequence) {
  std::vector<float> lg(100);
  for (int i = 0; i < 100; ++i) lg[i] = std::sin(i * 0.7f);
  SamplerParams p;
  p.temp = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0;
  p.seed = 1234;
  Sampler a(p, 100), b(p, 100);
  std::vector<int32_t> ha, hb;
  for (int i = 0; i < 200; ++i) {
    ha.push_back(a.sample(lg.data(), ha));
    hb.push_back(b.sample(lg.data(), hb));
  }
  EXPECT_EQ(ha, hb);
  p.seed = 99;
  Sampler c(p, 100);
  std::vector<int32_t> hc;
  for (int i = 0; i < 200; ++i) hc.push_back(c.sample(lg.data(), hc));
  EXPECT_NE(ha, hc);
}

TEST(Sampler, FiltersRestrictTheCandidates) {
  std::vector<float> lg = {5.f, 4.f, 0.f, -5.f};
  SamplerParams p;
  p.temp = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.2f;  // p(2)/p(0) = e^-5 < 0.2 -> only ids 0 and 1 survive
  p.seed = 3;
  Sampler s(p, 4);
  for (int i = 0; i < 200; ++i) EXPECT_LT(s.sample(lg.data(), {}), 2);
  p.min_p = 0;
  p.top_p = 0.5f;  // id 0 alone holds > 0.5 of the mass
  Sampler t(p, 4);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(t.sample(lg.data(), {}), 0);
}

TEST(Sampler, PenaltiesDiscourageRepeats) {
  std::vector<float> lg = {2.0f, 1.9f};
  SamplerParams p;
  p.temp = 0;
  p.repeat_penalty = 1.5f;
  EXPECT_EQ(Sampler(p, 2).sample(lg.data(), {0}), 1);  // 2.0/1.5 < 1.9
  p.repeat_penalty = 1.0f;
  p.presence_penalty = 0.5f;
  EXPECT_EQ(Sampler(p, 2).sample(lg.data(), {0}), 1);
  p.presence_penalty = 0;
  p.freq_penalty = 0.06f;  // applied per occurrence: 2 * 0.06 > 0.1
  EXPECT_EQ(Sampler(p, 2).sample(lg.data(), {0}), 0);
  EXPECT_EQ(Sampler(p, 2).sample(lg.data(), {0, 0}), 1);
}

namespace {
int argmax(const float* v, int n) {
  int b = 0;
  for (int i = 1; i < n; ++i)
    if (v[i] > v[b]) b = i;
  return b;
}
}  // namespace

// Several sequences in one batch, with scrambled (non-contiguous, interleaved) block
// tables, give the same greedy tokens and logits as each sequence run alone with a
// contiguous cache: paged attention equals contiguous attention.
TEST(Engine, PagedBatchEqualsEachSequenceAlone) {
  std::string path = tmp_model("paged", small("llama", 2));
  auto m = load_model(path);
  ASSERT_TRUE(m.ok()) << m.error();
  const int V = (*m)->cfg.n_vocab, bs = 4, n_gen = 12;
  std::vector<std::vector<int32_t>> prompts = {{1, 5, 9, 13, 17, 21, 25}, {1, 100, 3}, {1, 42, 42, 42, 7, 8, 9, 10, 11, 12, 13}};
  // Alone.
  std::vector<std::vector<int32_t>> alone;
  std::vector<std::vector<float>> alone_last;
  for (auto& p : prompts) {
    ContextParams cp;
    cp.n_ctx = 64;
    cp.n_threads = 2;
    auto c = Context::create(**m, cp);
    ASSERT_TRUE((*c)->decode(p).ok());
    std::vector<int32_t> gen;
    for (int i = 0; i < n_gen; ++i) {
      int32_t t = argmax((*c)->logits(), V);
      gen.push_back(t);
      ASSERT_TRUE((*c)->decode(std::span<const int32_t>(&t, 1)).ok());
    }
    alone.push_back(gen);
    alone_last.emplace_back((*c)->logits(), (*c)->logits() + V);
  }
  // Together, paged: blocks handed out round-robin so every table is scattered.
  ContextParams cp;
  cp.n_ctx = 32 * bs;
  cp.block_size = bs;
  cp.n_threads = 2;
  auto c = Context::create(**m, cp);
  ASSERT_TRUE(c.ok()) << c.error();
  const int S = static_cast<int>(prompts.size());
  std::vector<std::vector<int32_t>> tables(S);
  for (int b = 0, s = 0; b < 30; ++b, s = (s + 1) % S) tables[s].push_back(29 - b);
  std::vector<std::vector<float>> logits(S, std::vector<float>(V));
  std::vector<int> n_kv(S, 0);
  std::vector<std::vector<int32_t>> gen(S), next(S);
  // Prefill all prompts in one batch.
  std::vector<SeqBatch> batch(S);
  for (int s = 0; s < S; ++s) {
    batch[s].tokens = prompts[s];
    batch[s].block_table = tables[s];
    batch[s].logits = logits[s].data();
  }
  ASSERT_TRUE((*c)->decode_batch(batch).ok());
  for (int s = 0; s < S; ++s) n_kv[s] = static_cast<int>(prompts[s].size());
  for (int step = 0; step < n_gen; ++step) {
    for (int s = 0; s < S; ++s) {
      next[s] = {argmax(logits[s].data(), V)};
      gen[s].push_back(next[s][0]);
      batch[s].tokens = next[s];
      batch[s].n_kv = n_kv[s];
    }
    ASSERT_TRUE((*c)->decode_batch(batch).ok());
    for (int s = 0; s < S; ++s) n_kv[s]++;
  }
  for (int s = 0; s < S; ++s) {
    EXPECT_EQ(gen[s], alone[s]) << "sequence " << s;
    float mx = 0, diff = 0;
    for (int i = 0; i < V; ++i) {
      mx = std::max(mx, std::fabs(alone_last[s][i]));
      diff = std::max(diff, std::fabs(alone_last[s][i] - logits[s][i]));
    }
    EXPECT_LE(diff, 1e-4f * mx) << "sequence " << s;
  }
  std::filesystem::remove(path);
}

// A sequence's logits are bit for bit the same alone and in a batch with other sequences (the
// server's continuous batching): its prompt beside other prompts' chunks, its decode rows beside
// other decode rows and prompt chunks, in passes below and above kGemmMinTokens, with other
// sequences' rows before and after its own, on each SIMD path (the scalar one is not
// batch-invariant, see tests/batch_invariance_test.py). Greedy answers otherwise change with the
// server's load. The shapes reach what went wrong: f32/f16/bf16 weights, whose one-row products
// took the dot product (another summation order than the prefill tiles), and an n_ff that is no
// multiple of 16, where SwiGLU over all tokens' [n][n_ff] rows at once ran a token's last units
// through glibc's expf or the vector exp depending on its row's place in the batch. K = 1100 >
// 1024 for ffn_down: the tiles' K slices.
TEST(Engine, SequenceLogitsIndependentOfTheBatch) {
  larder::testing::IsaGuard guard;
  for (DType wt : {DType::F32, DType::F16, DType::BF16, DType::Q8_0}) {
    SynthShape sh = small("llama", 2);
    sh.n_ff = wt == DType::Q8_0 ? 96 : 1100;  // q8_0: rows not a multiple of 64, so gate and up apart
    const std::string path = tmp_model(std::string("batchinv_") + dtype_name(wt), sh, wt);
    for (kernels::Isa isa : larder::testing::paths()) {
      if (isa == kernels::Isa::Scalar) continue;
      kernels::set_isa(isa);
      SCOPED_TRACE(std::string(dtype_name(wt)) + " weights, " + kernels::isa_name(isa));
      auto m = load_model(path);  // packed for this path
      ASSERT_TRUE(m.ok()) << m.error();
      const int V = (*m)->cfg.n_vocab, bs = 4, steps = 6;
      auto seq = [&](int n, int seed) {
        std::vector<int32_t> v(n);
        for (int i = 0; i < n; ++i) v[i] = 1 + (i * 37 + seed * 101) % (V - 1);
        return v;
      };
      const std::vector<int32_t> a = seq(21, 1), b = seq(13 + 9 * steps, 2), c = seq(5, 3);
      ContextParams cp;
      cp.n_ctx = 64 * bs;
      cp.block_size = bs;
      cp.n_threads = 2;
      // Alone: A's prompt, then greedy decoding.
      std::vector<std::vector<float>> ref;
      std::vector<int32_t> gen;
      {
        auto ctx = Context::create(**m, cp);
        ASSERT_TRUE(ctx.ok()) << ctx.error();
        std::vector<float> lg(V);
        SeqBatch sa;
        sa.tokens = a;
        sa.block_table = (*ctx)->identity_table();
        sa.logits = lg.data();
        ASSERT_TRUE((*ctx)->decode_batch(std::span<const SeqBatch>(&sa, 1)).ok());
        ref.push_back(lg);
        for (int s = 0; s < steps; ++s) {
          gen.push_back(argmax(lg.data(), V));
          sa.tokens = std::span<const int32_t>(&gen.back(), 1);
          sa.n_kv = static_cast<int>(a.size()) + s;
          ASSERT_TRUE((*ctx)->decode_batch(std::span<const SeqBatch>(&sa, 1)).ok());
          ref.push_back(lg);
        }
      }
      // Together: B's prompt in 13- then 9-token chunks, C's prompt then decode rows.
      auto ctx = Context::create(**m, cp);
      ASSERT_TRUE(ctx.ok()) << ctx.error();
      std::vector<int32_t> ta, tb, tc;  // interleaved blocks
      for (int i = 0; i < 60; ++i) (i % 3 == 0 ? ta : i % 3 == 1 ? tb : tc).push_back(59 - i);
      std::vector<float> la(V), lb(V), lc(V);
      SeqBatch sa, sb, sc;
      sa.block_table = ta;
      sb.block_table = tb;
      sc.block_table = tc;
      sa.logits = la.data();
      sb.logits = lb.data();
      sc.logits = lc.data();
      int nb = 13, nc = 5;
      sa.tokens = a;
      sb.tokens = std::span<const int32_t>(b).subspan(0, nb);
      sc.tokens = c;
      std::vector<int32_t> c_next(steps);
      for (int s = 0; s <= steps; ++s) {
        std::vector<SeqBatch> batch;
        if (s == 0) {
          batch = {sb, sc, sa};  // 39 rows, A's last
        } else {
          sa.tokens = std::span<const int32_t>(&gen[s - 1], 1);
          sa.n_kv = static_cast<int>(a.size()) + s - 1;
          c_next[s - 1] = argmax(lc.data(), V);
          sc.tokens = std::span<const int32_t>(&c_next[s - 1], 1);
          sc.n_kv = nc++;
          if (s % 2) {
            batch = {sc, sa};  // two decode rows: the one-row kernels' batch sizes
          } else {
            sb.tokens = std::span<const int32_t>(b).subspan(nb, 9);
            sb.n_kv = nb;
            nb += 9;
            batch = {sc, sa, sb};  // 11 rows: the prefill kernels', A's in the middle
          }
        }
        ASSERT_TRUE((*ctx)->decode_batch(batch).ok());
        if (std::memcmp(la.data(), ref[s].data(), V * sizeof(float)) != 0) {
          int i = 0;
          while (la[i] == ref[s][i]) ++i;
          ADD_FAILURE() << "step " << s << " (" << batch.size() << " sequences): logit " << i << " is " << la[i]
                        << " in the batch, " << ref[s][i] << " alone";
          break;
        }
      }
    }
    std::filesystem::remove(path);
  }
}

// A sequence's logits do not depend on where its blocks sit in the pool: bit for bit the same
// with consecutive blocks and with scattered ones (P/D handoffs and prefix hits rely on it:
// two instances, or one at different times, give the same tokens).
TEST(Engine, OutputIndependentOfBlockPlacement) {
  std::string path = tmp_model("placement", small("llama", 2));
  auto m = load_model(path);
  ASSERT_TRUE(m.ok()) << m.error();
  const int V = (*m)->cfg.n_vocab, bs = 16;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 100; ++i) prompt.push_back(1 + (i * 37) % 290);
  for (DType t : {DType::F32, DType::F16, DType::Q8_0}) {
    if (t == DType::Q8_0 && (*m)->cfg.head_dim % 32) continue;
    std::vector<std::vector<float>> runs;
    for (int layout = 0; layout < 2; ++layout) {
      ContextParams cp;
      cp.n_ctx = 16 * bs;
      cp.block_size = bs;
      cp.n_threads = 2;
      cp.type_k = cp.type_v = t;
      auto c = Context::create(**m, cp);
      ASSERT_TRUE(c.ok()) << c.error();
      std::vector<int32_t> table;
      for (int b = 0; b < 8; ++b) table.push_back(layout == 0 ? b : (b * 5 + 3) % 16);  // consecutive / scattered
      std::vector<float> all;
      std::vector<float> lg(V);
      SeqBatch sb;
      sb.block_table = table;
      int n_kv = 0;
      for (int chunk : {40, 60}) {  // prefill in two chunks, then decode
        sb.tokens = std::span<const int32_t>(prompt).subspan(n_kv, chunk);
        sb.n_kv = n_kv;
        sb.logits = lg.data();
        ASSERT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
        n_kv += chunk;
        all.insert(all.end(), lg.begin(), lg.end());
      }
      for (int step = 0; step < 20; ++step) {
        int32_t tok = argmax(lg.data(), V);
        sb.tokens = std::span<const int32_t>(&tok, 1);
        sb.n_kv = n_kv++;
        ASSERT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
        all.insert(all.end(), lg.begin(), lg.end());
      }
      runs.push_back(all);
    }
    ASSERT_EQ(runs[0].size(), runs[1].size());
    for (size_t i = 0; i < runs[0].size(); ++i)
      if (runs[0][i] != runs[1][i]) {
        ADD_FAILURE() << "first difference at step " << i / V << " logit " << i % V << ": " << runs[0][i] << " vs " << runs[1][i];
        break;
      }
    EXPECT_EQ(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)), 0)
        << "cache type " << dtype_name(t) << ": logits depend on block placement";
  }
  std::filesystem::remove(path);
}

// An explicit causal mask and explicit positions are the same as the defaults; a mask
// that hides the prompt from a token changes its output; bad masks are errors.
TEST(Engine, ExplicitMaskAndPositions) {
  std::string path = tmp_model("mask", small("qwen2", 2));
  auto m = load_model(path);
  ASSERT_TRUE(m.ok()) << m.error();
  const int V = (*m)->cfg.n_vocab;
  ContextParams cp;
  cp.n_ctx = 64;
  cp.block_size = 8;
  auto c = Context::create(**m, cp);
  std::vector<int32_t> toks = {1, 20, 30, 40, 50, 60};
  std::vector<int32_t> table = {3, 1};
  std::vector<float> a(toks.size() * V), b(toks.size() * V), d(toks.size() * V);
  SeqBatch sb;
  sb.tokens = toks;
  sb.block_table = table;
  sb.logits = a.data();
  sb.all_logits = true;
  ASSERT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  AttnMask causal;
  std::vector<int32_t> pos = {0, 1, 2, 3, 4, 5};
  for (int i = 0; i < 6; ++i) causal.visible.push_back({{0, i + 1}});
  sb.mask = &causal;
  sb.positions = pos;
  sb.logits = b.data();
  ASSERT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-4f * (1 + std::fabs(a[i])));
  AttnMask own_only = causal;
  own_only.visible[5] = {{5, 6}};  // the last token sees only itself
  sb.mask = &own_only;
  sb.logits = d.data();
  ASSERT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  float change = 0;
  for (int i = 0; i < V; ++i) change = std::max(change, std::fabs(d[5 * V + i] - a[5 * V + i]));
  EXPECT_GT(change, 1e-3f);
  for (int i = 0; i < 5 * V; ++i) ASSERT_NEAR(a[i], d[i], 1e-4f * (1 + std::fabs(a[i])));
  AttnMask bad = causal;
  bad.visible[2] = {{0, 9}};  // beyond the KV
  sb.mask = &bad;
  EXPECT_FALSE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  std::vector<int32_t> short_table = {3};
  sb.mask = nullptr;
  sb.block_table = short_table;  // 6 tokens need 1 block of 8: fine; 10 would not
  EXPECT_TRUE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  sb.n_kv = 4;
  EXPECT_FALSE((*c)->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  std::filesystem::remove(path);
}

// KV cache types: each type's logits stay within its stated bound of the f32 cache's (relative to
// max|logit|), on every kernel path; batched prefill equals token by token for each type (both
// write the same rounded rows); a q8_0 cache with a head size that is not a multiple of 32 is a
// clear error from Context::create.
TEST(Engine, KvCacheTypesAgainstTheF32Cache) {
  SynthShape s = small("llama", 2);
  s.n_embd = 128;  // head_dim 32: q8_0 works
  const std::string path = tmp_model("kvtypes", s);
  auto m = load_model(path);
  ASSERT_TRUE(m.ok()) << m.error();
  const int n = 60, V = (*m)->cfg.n_vocab;
  ASSERT_EQ((*m)->cfg.head_dim, 32);
  std::vector<int32_t> ids(n);
  for (int i = 0; i < n; ++i) ids[i] = (i * 53 + 7) % V;
  struct Case { DType k, v; float tol; };
  // Bounds: f16 rounds K/V to 2^-11 relative, bf16 to 2^-8, q8_0 to half a step of the block's
  // absmax/127 (~2^-8 of the block's largest value). Measured: f16 2.6e-5, bf16 2.4e-4, q8_0 7.9e-4.
  const Case cases[] = {{DType::F16, DType::F16, 5e-4f}, {DType::BF16, DType::BF16, 4e-3f},
                        {DType::Q8_0, DType::Q8_0, 8e-3f}, {DType::Q8_0, DType::F16, 8e-3f},
                        {DType::F32, DType::BF16, 4e-3f}};
  larder::testing::IsaGuard guard;
  for (kernels::Isa isa : larder::testing::paths()) {
    kernels::set_isa(isa);
    ContextParams p;
    p.n_ctx = 64;
    p.n_threads = 2;
    p.type_k = p.type_v = DType::F32;
    auto base = Context::create(**m, p);
    ASSERT_TRUE(base.ok());
    std::vector<float> ref(static_cast<size_t>(n) * V);
    ASSERT_TRUE((*base)->decode(ids, ref.data()).ok());
    float mx = 0;
    for (float x : ref) mx = std::max(mx, std::fabs(x));
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(kernels::isa_name(isa)) + " " + kv_types_name(c.k, c.v));
      p.type_k = c.k;
      p.type_v = c.v;
      auto a = Context::create(**m, p);
      auto b = Context::create(**m, p);
      ASSERT_TRUE(a.ok() && b.ok()) << (a.ok() ? b.error() : a.error());
      EXPECT_EQ((*a)->type_k(), c.k);
      EXPECT_LT((*a)->kv_bytes(), (*base)->kv_bytes());
      std::vector<float> all(ref.size()), one(ref.size());
      ASSERT_TRUE((*a)->decode(ids, all.data()).ok());
      for (int i = 0; i < n; ++i)
        ASSERT_TRUE((*b)->decode(std::span<const int32_t>(&ids[i], 1), &one[static_cast<size_t>(i) * V]).ok());
      float diff = 0, diff_tok = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        diff = std::max(diff, std::fabs(all[i] - ref[i]));
        diff_tok = std::max(diff_tok, std::fabs(all[i] - one[i]));
      }
      EXPECT_LE(diff, c.tol * mx);
      EXPECT_GT(diff, 0.f) << "the cache type made no difference: is it used?";
      EXPECT_LE(diff_tok, c.tol * mx) << "batched vs token by token";
      std::printf("%s %s: max|logit - f32 cache| / max|logit| = %.2e (bound %.0e)\n", kernels::isa_name(isa),
                  kv_types_name(c.k, c.v).c_str(), diff / mx, c.tol);
    }
  }
  std::filesystem::remove(path);
  // head_dim 16: q8_0 is refused with a message naming the reason; f16/bf16 work.
  const std::string p16 = tmp_model("kvtypes16", small("llama", 2));
  auto m16 = load_model(p16);
  ASSERT_TRUE(m16.ok());
  ContextParams p;
  p.n_ctx = 32;
  p.type_v = DType::Q8_0;
  auto bad = Context::create(**m16, p);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().find("multiple of 32"), std::string::npos) << bad.error();
  p.type_k = p.type_v = DType::BF16;
  EXPECT_TRUE(Context::create(**m16, p).ok());
  p.type_k = DType::Q4_0;
  EXPECT_FALSE(Context::create(**m16, p).ok());
  EXPECT_FALSE(parse_kv_type("q4_0").ok());
  EXPECT_EQ(*parse_kv_type("Q8_0"), DType::Q8_0);
  std::filesystem::remove(p16);
}
