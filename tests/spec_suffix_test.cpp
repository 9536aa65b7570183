// SuffixDecoding (src/spec/suffix.h): the tree's counts against a brute-force count of every window
// while sequences are added, extended and removed (several depths, tiny vocabularies so that windows
// repeat); drafts against brute-force continuation counts (chains, trees, adaptive length, a shorter
// match when the longest has no continuation); the drafter's local and global trees and eviction.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "spec/suffix.h"

using namespace larder::spec;
using Tokens = std::vector<int32_t>;

namespace {

Tokens random_tokens(std::mt19937& rng, int n, int vocab) {
  Tokens t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

Tokens range(int32_t from, int n) {
  Tokens t(n);
  for (int i = 0; i < n; ++i) t[i] = from + i;
  return t;
}

Tokens cat(Tokens a, const Tokens& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Occurrences of w in the sequences, as the tree counts them (0 beyond depth D).
int brute_count(const std::vector<Tokens>& seqs, const Tokens& w, int D) {
  if (w.size() > static_cast<size_t>(D)) return 0;
  int n = 0;
  for (const Tokens& s : seqs)
    for (size_t j = 0; j + w.size() <= s.size(); ++j) n += std::equal(w.begin(), w.end(), s.begin() + j);
  return n;
}

// The tree holds exactly the windows of length 1..D of the live sequences, each with its count.
void expect_exact(const SuffixTree& t, const std::map<int, Tokens>& live, int D) {
  ASSERT_EQ(t.validate(), "");
  std::map<Tokens, int> windows;
  size_t n = 0;
  for (const auto& [id, s] : live) {
    n += s.size();
    for (size_t j = 0; j < s.size(); ++j)
      for (size_t l = 1; l <= static_cast<size_t>(D) && j + l <= s.size(); ++l)
        ++windows[Tokens(s.begin() + j, s.begin() + j + l)];
  }
  EXPECT_EQ(t.n_tokens(), n);
  EXPECT_EQ(t.count({}), static_cast<int>(n));
  EXPECT_EQ(t.n_strings(), windows.size());  // nothing else is stored...
  EXPECT_LE(t.n_nodes(), 2 * n + 1);         // ...in at most 2 nodes per token
  for (const auto& [w, c] : windows) ASSERT_EQ(t.count(w), c) << "window of length " << w.size();
}

// The string of draft node i (its ancestors' tokens, root first).
Tokens path_of(const Draft& d, int i) {
  Tokens p;
  for (; i >= 0; i = d.parent[i]) p.push_back(d.tokens[i]);
  std::reverse(p.begin(), p.end());
  return p;
}

}  // namespace

TEST(SuffixTree, CountsMatchBruteForceThroughAddAppendRemove) {
  for (int D : {1, 2, 3, 5, 8, 64}) {
    for (int vocab : {2, 3, 6}) {
      SCOPED_TRACE("D=" + std::to_string(D) + " vocab=" + std::to_string(vocab));
      std::mt19937 rng(D * 100 + vocab);
      SuffixTree t(D);
      std::map<int, Tokens> live;
      const auto pick = [&] { return std::next(live.begin(), rng() % live.size())->first; };
      for (int round = 0; round < 80; ++round) {
        const int op = rng() % 7;  // add, append, remove: 2 : 4 : 1
        if (op < 2 || live.empty()) {
          const Tokens s = random_tokens(rng, rng() % 40, vocab);
          const int id = t.add(s);
          ASSERT_EQ(live.count(id), 0u);
          live[id] = s;
        } else if (op < 6) {
          // A few tokens at a time (like decode steps), sometimes copying a piece of another sequence.
          const int id = pick();
          Tokens more = random_tokens(rng, 1 + rng() % 8, vocab);
          const Tokens& src = live[pick()];
          if (rng() % 2 && src.size() > 10) {
            const size_t a = rng() % (src.size() - 10);
            more.assign(src.begin() + a, src.begin() + std::min(src.size(), a + 10 + rng() % 20));
          }
          for (size_t i = 0; i < more.size();) {
            const size_t k = std::min<size_t>(more.size() - i, 1 + rng() % 3);
            t.append(id, std::span(more).subspan(i, k));
            i += k;
          }
          live[id].insert(live[id].end(), more.begin(), more.end());
        } else {
          const int id = pick();
          t.remove(id);
          live.erase(id);
        }
        if (round % 12 == 11) {
          ASSERT_NO_FATAL_FAILURE(expect_exact(t, live, D));
        }
      }
      ASSERT_NO_FATAL_FAILURE(expect_exact(t, live, D));
      while (!live.empty()) {
        t.remove(live.begin()->first);
        live.erase(live.begin());
      }
      EXPECT_EQ(t.validate(), "");
      EXPECT_EQ(t.n_nodes(), 1u);  // every count went back to 0 and every node was freed
      EXPECT_EQ(t.n_tokens(), 0u);
    }
  }
}

TEST(SuffixTree, ChainFollowsRepeatedSentence) {
  const Tokens sent = range(10, 20);
  const Tokens ctx = cat(cat(cat(sent, sent), sent), Tokens(sent.begin(), sent.begin() + 5));
  SuffixTree t;
  t.add(ctx);
  ProposeOptions o;
  o.chain_only = true;
  o.exclude_self = true;
  int m = 0;
  const Draft d = t.propose(ctx, o, &m);
  ASSERT_EQ(d.size(), 16);
  EXPECT_TRUE(d.is_chain());
  for (int i = 0; i < d.size(); ++i) EXPECT_EQ(d.tokens[i], sent[(5 + i) % 20]) << i;
  EXPECT_NEAR(d.score, 16.0f, 1e-4);  // every earlier occurrence went on the same way
  EXPECT_EQ(m, 45);  // the longest suffix seen before (the last 63 tokens occur only at the end)
  // Counting the context's own occurrence (it stops at the end) halves the first step's odds.
  o.exclude_self = false;
  const Draft d2 = t.propose(ctx, o);
  ASSERT_EQ(d2.size(), 16);
  for (int i = 0; i < d2.size(); ++i) EXPECT_EQ(d2.tokens[i], sent[(5 + i) % 20]) << i;
  EXPECT_LT(d2.score, 12.0f);
}

TEST(SuffixTree, DraftIsTheMostProbableSubtree) {
  const int D = 16, vocab = 4;
  std::mt19937 rng(7);
  std::vector<Tokens> seqs;
  SuffixTree t(D);
  for (int i = 0; i < 4; ++i) {
    seqs.push_back(random_tokens(rng, 300, vocab));
    t.add(seqs.back());
  }
  int drafted = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const Tokens ctx = random_tokens(rng, 30, vocab);
    ProposeOptions o;
    o.max_tokens = 12;
    o.alpha = 100;
    o.min_prob = 0.02f;
    o.chain_only = trial % 2;
    int m = 0;
    const Draft d = t.propose(ctx, o, &m);
    if (d.empty()) continue;
    ++drafted;
    ASSERT_GE(m, 1);
    ASSERT_LE(m, t.longest_match(ctx));
    const Tokens w(ctx.end() - m, ctx.end());
    const int cw = brute_count(seqs, w, D);
    ASSERT_GT(cw, 0);
    // P(path | w) = count(w + path) / count(w): the product of count ratios telescopes.
    const auto prob = [&](const Tokens& u) { return static_cast<float>(brute_count(seqs, cat(w, u), D)) / cw; };
    float score = 0, lowest = 2;
    std::map<Tokens, int> in_draft;
    for (int i = 0; i < d.size(); ++i) {
      ASSERT_LT(d.parent[i], i);
      const Tokens p = path_of(d, i);
      ASSERT_EQ(in_draft.count(p), 0u) << "two siblings with one token";
      in_draft[p] = i;
      const float q = prob(p);
      EXPECT_GE(q, o.min_prob);
      score += q;
      lowest = std::min(lowest, q);
    }
    EXPECT_NEAR(d.score, score, 1e-4);
    if (o.chain_only) {
      ASSERT_TRUE(d.is_chain());
      for (int i = 0; i <= d.size(); ++i) {  // each node is its parent's likeliest child
        const Tokens base = i == 0 ? Tokens{} : path_of(d, i - 1);
        float best = 0;
        for (int32_t x = 0; x < vocab; ++x) best = std::max(best, prob(cat(base, {x})));
        if (i < d.size()) {
          EXPECT_NEAR(prob(path_of(d, i)), best, 1e-6);
        } else if (d.size() < o.max_tokens) {
          EXPECT_LT(best, o.min_prob);  // it stopped because nothing likely enough was left
        }
      }
    } else {
      // Greedy = the top-k subtree: no candidate left out (a child of the root or of a draft node)
      // beats the least likely node taken, and when the draft is short nothing left reaches min_prob.
      const float bar = d.size() == std::min(o.max_tokens, m * 100) ? lowest : o.min_prob;
      for (int i = -1; i < d.size(); ++i) {
        const Tokens base = i < 0 ? Tokens{} : path_of(d, i);
        for (int32_t x = 0; x < vocab; ++x) {
          const Tokens c = cat(base, {x});
          if (!in_draft.count(c)) {
            EXPECT_LE(prob(c), bar + 1e-6) << "trial " << trial;
          }
        }
      }
    }
  }
  EXPECT_GT(drafted, 30);
}

TEST(SuffixTree, DraftLengthFollowsMatchLength) {
  SuffixTree t;
  t.add(range(100, 40));
  ProposeOptions o;
  int m = 0;
  Draft d = t.propose(Tokens{7, 8, 102, 103}, o, &m);  // "102 103" matches: 2 tokens allowed
  EXPECT_EQ(m, 2);
  EXPECT_EQ(d.tokens, (Tokens{104, 105}));
  o.alpha = 2;
  d = t.propose(Tokens{7, 8, 102, 103}, o);
  EXPECT_EQ(d.tokens, range(104, 4));
  o.alpha = 1;
  d = t.propose(range(100, 10), o);
  EXPECT_EQ(d.tokens, range(110, 10));
  d = t.propose(range(100, 30), o);
  EXPECT_EQ(d.tokens, range(130, 10));  // capped by max_tokens = 16, then by the sequence's end
  o.max_tokens = 5;
  EXPECT_EQ(t.propose(range(100, 30), o).tokens, range(130, 5));
  EXPECT_TRUE(t.propose(Tokens{1, 2, 3}, o).empty());
}

TEST(SuffixTree, ShorterMatchWhenLongestHasNoContinuation) {
  SuffixTree t;
  t.add(Tokens{1, 2, 3, 4});
  t.add(Tokens{9, 3, 4, 5, 6});
  int m = 0;
  const Draft d = t.propose(Tokens{1, 2, 3, 4}, ProposeOptions{}, &m);
  EXPECT_EQ(t.longest_match(Tokens{1, 2, 3, 4}), 4);  // it ends where its only occurrence ends
  EXPECT_EQ(m, 2);                                     // "3 4" goes on in the second sequence
  EXPECT_EQ(d.tokens, (Tokens{5, 6}));
  EXPECT_EQ(d.parent, (Tokens{-1, 0}));
  EXPECT_NEAR(d.score, 1.0f, 1e-6);  // "3 4" stops once of twice: 1/2 + 1/2
}

TEST(SuffixTree, MinProbPrunesUnlikelyBranches) {
  SuffixTree t;
  for (int i = 0; i < 9; ++i) t.add(Tokens{1, 2, 3});
  t.add(Tokens{1, 2, 4});
  ProposeOptions o;
  o.alpha = 8;
  o.min_prob = 0.05f;
  Draft d = t.propose(Tokens{1, 2}, o);  // both branches: siblings under the root
  EXPECT_EQ(d.tokens, (Tokens{3, 4}));
  EXPECT_EQ(d.parent, (Tokens{-1, -1}));
  EXPECT_NEAR(d.score, 1.0f, 1e-6);
  o.min_prob = 0.15f;  // "4" follows "1 2" once in ten
  d = t.propose(Tokens{1, 2}, o);
  EXPECT_EQ(d.tokens, (Tokens{3}));
  EXPECT_NEAR(d.score, 0.9f, 1e-6);
}

TEST(SuffixDrafter, CopiesFromThePrompt) {
  SuffixDrafter dr;
  const Tokens doc = range(200, 30);
  const Tokens prompt = cat(doc, {1, 2, 3});
  const int h = dr.start(prompt);
  dr.extend(h, range(200, 10));
  const Tokens ctx = cat(prompt, range(200, 10));
  const Draft d = dr.propose(h, ctx, 8);
  EXPECT_EQ(d.tokens, range(210, 8));
  EXPECT_TRUE(d.is_chain());
  EXPECT_NEAR(d.score, 8.0f, 1e-4);  // the context's own occurrence is not counted against it
  EXPECT_EQ(dr.propose(h, ctx, 50).size(), 10);  // capped: min(16, alpha * 10)
  dr.cancel(h);
  EXPECT_EQ(dr.n_requests(), 0u);
  EXPECT_EQ(dr.global().n_tokens(), 0u);  // cancelled: nothing learnt
  EXPECT_EQ(dr.start(Tokens{5}), h);      // handles are reused
}

TEST(SuffixDrafter, GlobalTreeServesARepeatedOutput) {
  const Tokens out = range(300, 60);
  const Tokens prompt2{4, 5, 6, 7};
  const Tokens ctx = cat(prompt2, Tokens(out.begin(), out.begin() + 20));
  for (bool learn : {false, true}) {
    SuffixDrafter dr;
    const int h1 = dr.start(Tokens{1, 2, 3});
    dr.extend(h1, out);
    if (learn)
      dr.finish(h1, out);
    else
      dr.cancel(h1);
    const int h2 = dr.start(prompt2);
    dr.extend(h2, Tokens(out.begin(), out.begin() + 20));
    const Draft d = dr.propose(h2, ctx, 16);
    if (!learn) {
      EXPECT_TRUE(d.empty());
      continue;
    }
    EXPECT_EQ(dr.global().n_tokens(), out.size());
    EXPECT_EQ(d.tokens, Tokens(out.begin() + 20, out.begin() + 36));
    EXPECT_NEAR(d.score, 16.0f, 1e-4);
  }
}

TEST(SuffixDrafter, EvictionBoundsTheGlobalTree) {
  SuffixParams p;
  p.global_max_tokens = 100;
  SuffixDrafter dr(p);
  const auto output = [](int r) { return range(1000 * (r + 1), 30); };
  for (int r = 0; r < 10; ++r) {
    dr.finish(dr.start(Tokens{1, 2}), output(r));
    EXPECT_LE(dr.global().n_tokens(), 100u);
    EXPECT_EQ(dr.global().validate(), "");
  }
  EXPECT_EQ(dr.global().n_tokens(), 90u);  // the last three outputs
  EXPECT_LE(dr.global().n_nodes(), 2 * 90 + 1u);
  for (int r = 0; r < 10; ++r) {
    const Tokens o = output(r), w(o.begin(), o.begin() + 5);
    EXPECT_EQ(dr.global().count(w), r >= 7 ? 1 : 0) << r;  // evicted outputs' counts are gone
  }
  dr.finish(dr.start(Tokens{1}), range(5000, 150));  // longer than the whole budget: not kept
  EXPECT_EQ(dr.global().n_tokens(), 90u);
  EXPECT_EQ(dr.n_requests(), 0u);
}
