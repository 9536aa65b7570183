// A speculative draft: guessed tokens after a sequence's last token, as a tree.
//
// Node i holds tokens[i]; parent[i] is the node it follows (-1: it follows the sequence's last
// real token). Parents come before their children. A chain has parent[i] = i - 1. The target
// verifies all nodes in one forward pass (a tree attention mask: each node sees the sequence
// and its ancestors) and keeps the longest path it agrees with.
#pragma once
#include <cstdint>
#include <vector>

namespace larder::spec {

struct Draft {
  std::vector<int32_t> tokens;  // [n] guessed tokens
  std::vector<int32_t> parent;  // [n] -1 = after the last real token, else an earlier node
  // Proposal distributions of a sampling drafter (a draft model at temperature > 0): [n][n_vocab],
  // row i = q(. | ancestors of i) that tokens[i] was drawn from. Empty = deterministic guesses
  // (q one-hot at the guessed token). Only chains carry q.
  std::vector<float> q;
  float score = 0;  // the drafter's expected accepted length (for ranking / adaptive length)

  int size() const { return static_cast<int>(tokens.size()); }
  bool empty() const { return tokens.empty(); }
  void clear() {
    tokens.clear();
    parent.clear();
    q.clear();
    score = 0;
  }
  void push(int32_t tok, int32_t par) {
    tokens.push_back(tok);
    parent.push_back(par);
  }
  bool is_chain() const {
    for (int i = 0; i < size(); ++i)
      if (parent[i] != i - 1) return false;
    return true;
  }
  // Depth of node i (1 for a child of the root).
  int depth(int i) const {
    int d = 0;
    for (; i >= 0; i = parent[i]) ++d;
    return d;
  }
};

}  // namespace larder::spec
