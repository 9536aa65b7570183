// Per-document KV (src/docs) and what it needs from the Context: layer ranges, scattered KV
// writes, APE segment attention, attention mass, key re-rotation. The methods' numbers are checked
// against an independent PyTorch reference in tests/docs_reference_test.py; these are the
// engine-internal identities, on a random 4-layer model with an f32 cache.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>

#include "docs/docs.h"
#include "engine/context.h"
#include "test_model.h"

using namespace larder;

namespace {

// 4 layers: blend's two full layers leave layers to select for.
larder::testing::SmallModel& fx() {
  static larder::testing::SmallModel f(4, 300, "docs");
  return f;
}

std::unique_ptr<Context> make_ctx() {
  ContextParams p;
  p.n_ctx = 1024;
  p.n_threads = 2;
  p.n_batch = 64;
  p.type_k = p.type_v = DType::F32;
  auto c = Context::create(*fx().model, p);
  EXPECT_TRUE(c.ok()) << c.error();
  return std::move(c).value();
}

std::vector<int32_t> toks(int n, int seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> v(n);
  for (auto& t : v) t = static_cast<int32_t>(g() % 290 + 5);
  return v;
}

std::vector<float> last_logits(Context& c) { return std::vector<float>(c.logits(), c.logits() + c.n_vocab()); }

// Equal up to f32 rounding: the masked attention path and the one-row matmuls of f32 weights group
// sums differently from a plain prefill (on the quantized real models the paths are bit-identical:
// tests/docs_reference_test.py and tests/batch_invariance_test.py).
::testing::AssertionResult close(const std::vector<float>& a, const std::vector<float>& b, double rel = 2e-6) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes differ";
  double mx = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    mx = std::max(mx, std::fabs(static_cast<double>(b[i])));
    d = std::max(d, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  if (d <= rel * mx) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max difference " << d << " > " << rel << " * " << mx;
}

}  // namespace

TEST(Docs, LayerRangesComposeToTheFullPass) {
  auto a = make_ctx(), b = make_ctx();
  const auto t = toks(40, 1);
  ASSERT_TRUE(a->decode(t).ok());
  const int E = fx().model->cfg.n_embd;
  std::vector<float> h(t.size() * E), logits(a->n_vocab());
  SeqBatch sb;
  sb.tokens = t;
  sb.block_table = b->identity_table();
  LayerRange r1{0, 1, nullptr, h.data()};
  ASSERT_TRUE(b->decode_batch(std::span<const SeqBatch>(&sb, 1), &r1).ok());
  LayerRange r2{1, 3, h.data(), h.data()};
  ASSERT_TRUE(b->decode_batch(std::span<const SeqBatch>(&sb, 1), &r2).ok());
  sb.logits = logits.data();
  LayerRange r3{3, -1, h.data(), nullptr};
  ASSERT_TRUE(b->decode_batch(std::span<const SeqBatch>(&sb, 1), &r3).ok());
  EXPECT_EQ(logits, last_logits(*a));
  LayerRange bad{2, 4, nullptr, nullptr};
  EXPECT_FALSE(b->decode_batch(std::span<const SeqBatch>(&sb, 1), &bad).ok());  // no input for layer 2
}

TEST(Docs, ScatteredRecomputeInPlaceChangesNothing) {
  // Recomputing some entries with the same context writes the same KV: the next token's logits stay.
  auto a = make_ctx();
  const auto t = toks(50, 2);
  ASSERT_TRUE(a->decode(std::span<const int32_t>(t).first(49)).ok());
  std::vector<int32_t> idx = {3, 17, 18, 30, 48}, sub, pos;
  for (int e : idx) sub.push_back(t[e]);
  SeqBatch sb;
  sb.tokens = sub;
  sb.positions = idx;
  sb.kv_index = idx;
  sb.block_table = a->identity_table();
  sb.n_kv = 49;
  ASSERT_TRUE(a->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  auto b = make_ctx();
  ASSERT_TRUE(b->decode(t).ok());
  ASSERT_TRUE(a->decode(std::span<const int32_t>(t).subspan(49)).ok());
  EXPECT_TRUE(close(last_logits(*a), last_logits(*b)));
  std::vector<int32_t> dup = {3, 3};
  sb.kv_index = dup;
  sb.positions = dup;
  sb.tokens = std::span<const int32_t>(sub).first(2);
  EXPECT_FALSE(a->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());  // two tokens, one entry
}

TEST(Docs, ApeWithUnitTemperatureAndScaleIsPlainAttention) {
  const auto t = toks(30, 3);
  auto a = make_ctx(), b = make_ctx(), c = make_ctx();
  ASSERT_TRUE(a->decode(t).ok());
  ASSERT_TRUE(b->decode(std::span<const int32_t>(t).first(25)).ok());
  ASSERT_TRUE(c->decode(std::span<const int32_t>(t).first(25)).ok());
  std::vector<float> lb(b->n_vocab()), lc(c->n_vocab());
  SegAttn unit{5, 20, 1.f, 1.f}, sharp{5, 20, 0.9f, 0.9f};
  for (auto [ctx, seg, out] : {std::tuple{b.get(), &unit, &lb}, std::tuple{c.get(), &sharp, &lc}}) {
    SeqBatch sb;
    sb.tokens = std::span<const int32_t>(t).subspan(25);
    sb.block_table = ctx->identity_table();
    sb.n_kv = 25;
    sb.seg = seg;
    sb.logits = out->data();
    ASSERT_TRUE(ctx->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  }
  EXPECT_TRUE(close(lb, last_logits(*a)));
  EXPECT_FALSE(close(lc, last_logits(*a), 1e-3));
}

TEST(Docs, AttentionMassSumsToHeadsTimesLayers) {
  auto a = make_ctx();
  const auto t = toks(20, 4);
  ASSERT_TRUE(a->decode(std::span<const int32_t>(t).first(19)).ok());
  std::vector<float> mass(20, 0.f);
  SeqBatch sb;
  sb.tokens = std::span<const int32_t>(t).subspan(19);
  sb.block_table = a->identity_table();
  sb.n_kv = 19;
  sb.attn_mass = mass.data();
  ASSERT_TRUE(a->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  const double sum = std::accumulate(mass.begin(), mass.end(), 0.0);
  EXPECT_NEAR(sum, fx().model->cfg.n_layer * fx().model->cfg.n_head, 1e-3);
}

TEST(Docs, RotateKeysThereAndBack) {
  auto a = make_ctx();
  const auto t = toks(24, 5);
  ASSERT_TRUE(a->decode(t).ok());
  const int kvd = fx().model->cfg.n_head_kv * fx().model->cfg.head_dim;
  std::vector<float> k0(kvd), k1(kvd);
  a->read_k(a->identity_table(), 10, 2, k0.data());
  a->rotate_k(a->identity_table(), 4, 12, 37);
  a->read_k(a->identity_table(), 10, 2, k1.data());
  EXPECT_NE(k0, k1);
  a->rotate_k(a->identity_table(), 4, 12, -37);
  a->read_k(a->identity_table(), 10, 2, k1.data());
  for (int i = 0; i < kvd; ++i) EXPECT_NEAR(k0[i], k1[i], 1e-4f * (1.f + std::fabs(k0[i])));
}

// Composition: documents encoded alone after the prefix, copied into place and composed.
static std::vector<float> composed(const docs::Params& p, const std::vector<int32_t>& prefix,
                                   const std::vector<std::vector<int32_t>>& ds, const std::vector<int32_t>& q,
                                   docs::Stats* st) {
  auto c = make_ctx();
  docs::Layout lay{static_cast<int>(prefix.size()), {}};
  std::vector<int32_t> all = prefix;
  for (auto& d : ds) {
    lay.doc_len.push_back(static_cast<int>(d.size()));
    all.insert(all.end(), d.begin(), d.end());
  }
  all.insert(all.end(), q.begin(), q.end());
  // Work table: blocks 0..31; scratch for encoding: blocks 32..63.
  std::vector<int32_t> work(32), scratch(32);
  std::iota(work.begin(), work.end(), 0);
  std::iota(scratch.begin(), scratch.end(), 32);
  EXPECT_TRUE(docs::encode(*c, work, 0, prefix).ok());
  c->copy_kv(work, 0, scratch, 0, lay.prefix);
  for (int i = 0; i < lay.n_docs(); ++i) {
    EXPECT_TRUE(docs::encode(*c, scratch, lay.prefix, ds[i]).ok());
    c->copy_kv(scratch, lay.prefix, work, lay.doc_begin(i), lay.doc_len[i]);
  }
  EXPECT_TRUE(docs::compose(*c, work, lay, all, p, st).ok());
  std::vector<int32_t> pos;
  for (int i = 0; i < static_cast<int>(q.size()); ++i) pos.push_back(lay.position(p.mode, lay.end() + i));
  const SegAttn seg = docs::seg_attn(lay, p);
  std::vector<float> out(c->n_vocab());
  SeqBatch sb;
  sb.tokens = q;
  sb.positions = pos;
  sb.block_table = work;
  sb.n_kv = lay.end();
  sb.seg = p.mode == docs::Mode::Parallel ? &seg : nullptr;
  sb.logits = out.data();
  EXPECT_TRUE(c->decode_batch(std::span<const SeqBatch>(&sb, 1)).ok());
  return out;
}

TEST(Docs, CompositionLimits) {
  const auto prefix = toks(7, 6), q = toks(5, 7);
  const std::vector<std::vector<int32_t>> ds = {toks(23, 8), toks(19, 9), toks(9, 10)};
  std::vector<int32_t> all = prefix;
  for (auto& d : ds) all.insert(all.end(), d.begin(), d.end());
  all.insert(all.end(), q.begin(), q.end());
  auto c = make_ctx();
  ASSERT_TRUE(c->decode(all).ok());
  const auto seq = last_logits(*c);
  docs::Stats st;
  docs::Params p;
  // Blend with every token selected = sequential prefill, exactly.
  p.mode = docs::Mode::Blend;
  p.blend_ratio = 1.f;
  EXPECT_TRUE(close(composed(p, prefix, ds, q, &st), seq));
  EXPECT_EQ(st.full_layers, 2);
  EXPECT_EQ(st.selected.size(), 51u);
  EXPECT_DOUBLE_EQ(st.fraction(), 1.0);
  // One document needs no repositioning or repair (parallel differs: APE's temperature and scale).
  for (auto m : {docs::Mode::Reposition, docs::Mode::Link, docs::Mode::Focus}) {
    p.mode = m;
    auto c1 = make_ctx();
    std::vector<int32_t> one = prefix;
    one.insert(one.end(), ds[0].begin(), ds[0].end());
    one.insert(one.end(), q.begin(), q.end());
    ASSERT_TRUE(c1->decode(one).ok());
    EXPECT_TRUE(close(composed(p, prefix, {ds[0]}, q, &st), last_logits(*c1))) << docs::mode_name(m);
  }
  // Several documents: an approximation (well beyond rounding), and link recomputes the first k of
  // documents 1 and 2.
  p.mode = docs::Mode::Reposition;
  EXPECT_FALSE(close(composed(p, prefix, ds, q, &st), seq, 1e-4));
  p.mode = docs::Mode::Link;
  p.link_k = 4;
  EXPECT_FALSE(close(composed(p, prefix, ds, q, &st), seq, 1e-4));
  EXPECT_EQ(st.selected, (std::vector<int32_t>{30, 31, 32, 33, 49, 50, 51, 52}));
  // Focus stays inside its budget.
  p.mode = docs::Mode::Focus;
  p.focus_budget = 0.2f;
  composed(p, prefix, ds, q, &st);
  EXPECT_EQ(st.selected.size(), 10u);  // round(0.2 * 51)
  EXPECT_GT(st.probe_tokens, 0);
  // Bad parameters are errors, not crashes.
  p.mode = docs::Mode::Blend;
  p.blend_layers = 1;
  EXPECT_FALSE(p.validate().ok());
  EXPECT_FALSE(docs::parse_mode("nope").ok());
  EXPECT_EQ(*docs::parse_mode("ape"), docs::Mode::Parallel);
}
