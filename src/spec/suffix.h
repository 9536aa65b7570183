// SuffixDecoding (Oliaro et al. 2024, "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
// Applications"; the same design as Snowflake Arctic Inference's suffix decoding): model-free drafts
// from suffix trees over earlier tokens, with per-continuation frequencies as probabilities.
//
// SuffixTree. Conceptually a trie of every window s[j..j+l) (l <= D = max_depth) of the sequences it
// holds, where count(w) = the number of places w occurs. Stored path-compressed: an edge carries a
// run of tokens as a reference (ref_seq, ref_end) into a stored sequence, end-anchored so that the
// node's whole string is seq[ref_end - depth, ref_end) (splits, merges and edges shortened from the
// top keep their reference). Every place an occurrence stops (at depth D or at its sequence's end) is
// an explicit node, so all points on one edge share one count; a node is kept only where it branches
// or where an occurrence stops, which bounds the nodes by 2 per token whatever D is.
//
// Appending (Arctic's active nodes): each sequence keeps the D-1 nodes where its last D-1 suffixes
// end; a new token moves every one of them one token down (lengthen a leaf, add a child, land on a
// child, split an edge, or move a node's boundary one token into its only child) and starts a new
// one-token suffix at the root: O(D) hash look-ups per token, no rebuild. Removing a sequence walks
// its windows and takes its occurrences back out (O(D) per token), freeing nodes whose count reaches
// 0 and merging nodes left with one child and no stopping occurrence.
//
// Memory: a node is 36 bytes plus its entry in one open-addressing child map (12 bytes a slot at
// load 3/8..3/4: 16-32 bytes), at most 2 nodes per token: <= ~140 bytes per token independent of D
// (a plain depth-D trie needs up to D nodes per token: ~2.5 KB at D = 64), plus the 4-byte token
// itself and 4 (D - 1) bytes of active nodes per sequence. A removed sequence's tokens stay stored
// while some surviving node still refers to them (its strings also occur elsewhere); references move
// to the latest sequence that reaches a node, so with oldest-first eviction this is rare and brief.
//
// Proposing: for each suffix of the context still found in the tree (longest first, at most D - 1
// tokens), grow a speculation tree from the matched point greedily: a candidate's probability is
// count(child) / count(parent) multiplied down its path; add the most probable candidate until
// floor(alpha * match_len) (capped at max_tokens) nodes are taken or the best is below min_prob.
// The draft with the highest score (sum of the nodes' path probabilities = expected accepted
// length) wins; shorter matches are tried while they could still beat it, which covers a longest
// match that has no continuation. Finding a match walks from the root (O(m) for m tokens), so a call
// is O(D^2) look-ups at worst: about 10 us at D = 64 on a 100k-token tree, and not growing with it.
//
// Not thread-safe: one thread (the scheduler's) owns a tree or a drafter.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "spec/draft.h"

namespace larder::spec {

struct ProposeOptions {
  int max_tokens = 16;        // most nodes in a draft
  float alpha = 1.0f;         // a match of m tokens allows floor(alpha * m) nodes (Arctic's max_spec_factor)
  float min_prob = 0.1f;      // stop when the best candidate's path probability is lower (min_token_prob)
  bool chain_only = false;    // one path: the most likely child at each step
  bool exclude_self = false;  // the context is a sequence of this tree: its own (final) occurrence
                              // of the matched suffix is not evidence of what follows
};

class SuffixTree {
 public:
  explicit SuffixTree(int max_depth = 64);

  // Adds a sequence and returns its id (ids of removed sequences are reused).
  int add(std::span<const int32_t> tokens);
  // Extends sequence `id`: O(D) amortised per token.
  void append(int id, std::span<const int32_t> more);
  // Takes every occurrence in sequence `id` back out.
  void remove(int id);

  // The best draft after `context` (empty when nothing matches); *match_len: the suffix it used.
  Draft propose(std::span<const int32_t> context, const ProposeOptions& o, int* match_len = nullptr) const;
  // The longest suffix of `context` (at most D - 1 tokens) that occurs in the tree.
  int longest_match(std::span<const int32_t> context) const;
  // Occurrences of w (0 when |w| > D; the number of tokens when w is empty).
  int count(std::span<const int32_t> w) const;

  int max_depth() const { return depth_; }
  size_t n_tokens() const { return n_tokens_; }  // tokens of the live sequences
  size_t n_nodes() const { return nodes_.size() - free_nodes_.size(); }  // root included
  size_t n_seqs() const { return n_live_; }
  std::span<const int32_t> tokens(int id) const;
  size_t memory_bytes() const;
  // For tests: distinct strings held (the uncompressed trie's nodes less the root), and "" when
  // every structural invariant holds (else what broke).
  size_t n_strings() const;
  std::string validate() const;

 private:
  struct Node {
    int32_t tok = -1;     // first token of the edge into this node (the child map's key)
    int32_t len = 0;      // edge length in tokens (0: root)
    int32_t count = 0;    // occurrences of the node's string (every point on its edge shares it)
    int32_t parent = -1;
    int32_t ref_seq = -1;  // the node's whole string is seqs_[ref_seq].tok[ref_end - depth, ref_end)
    int32_t ref_end = 0;
    int32_t child = -1;  // first child; siblings form a doubly linked list (for enumeration)
    int32_t next = -1, prev = -1;
  };
  struct Seq {
    std::vector<int32_t> tok;     // [n]
    std::vector<int32_t> active;  // [D - 1] ring, oldest first: nodes where the last suffixes end
    int32_t head = 0, n_active = 0;
    int32_t refs = 0;  // nodes whose ref_seq is this one: tokens kept while > 0
    bool live = false;
  };
  // (parent, first token) -> child, open addressing with linear probing.
  class ChildMap {
   public:
    int32_t find(int32_t parent, int32_t tok) const;
    void put(int32_t parent, int32_t tok, int32_t child);  // insert or overwrite
    void erase(int32_t parent, int32_t tok);
    size_t size() const { return n_; }
    size_t bytes() const { return keys_.capacity() * sizeof(uint64_t) + vals_.capacity() * sizeof(int32_t); }

   private:
    static constexpr uint64_t kEmpty = ~uint64_t{0};
    std::vector<uint64_t> keys_;  // [cap] parent << 32 | token, kEmpty when free
    std::vector<int32_t> vals_;   // [cap]
    size_t n_ = 0;
    void grow();
  };
  struct Point {
    int32_t node = -1;
    int32_t off = 0;  // tokens of the node's edge consumed (1..len; == len: at the node)
  };

  int32_t edge_tok(const Node& v, int k) const { return seqs_[v.ref_seq].tok[v.ref_end - v.len + k]; }
  int32_t step(int32_t v, int32_t t, int32_t s, int32_t end);
  Point walk(std::span<const int32_t> w) const;
  Draft grow(Point p, int budget, const ProposeOptions& o) const;
  int32_t new_node();
  void free_node(int32_t v);
  void drop_subtree(int32_t v);
  void maybe_merge(int32_t v);
  void link_child(int32_t p, int32_t c);
  void unlink_child(int32_t c);
  void replace_child(int32_t old_c, int32_t new_c);
  void set_ref(int32_t v, int32_t s, int32_t end);
  void unref(int32_t s);

  int depth_;
  std::vector<Node> nodes_;  // [capacity] node 0 is the root
  std::vector<int32_t> free_nodes_;
  ChildMap kids_;
  std::vector<Seq> seqs_;  // [slots]
  std::vector<int32_t> free_seqs_;
  size_t n_tokens_ = 0, n_live_ = 0;
};

struct SuffixParams {
  int max_depth = 64;
  int max_tokens = 16;  // nodes per draft (a call's own budget is capped by it)
  float alpha = 1.0f;
  float min_prob = 0.1f;
  size_t global_max_tokens = 1 << 20;  // outputs kept in the global tree (oldest evicted first)
  bool chain_only = false;
};

// Per request a tree over its prompt and output so far; one global tree over finished requests'
// outputs. A draft comes from whichever tree scores higher. Handles of ended requests are reused.
// Single-threaded (the scheduler thread): no locking.
class SuffixDrafter {
 public:
  explicit SuffixDrafter(SuffixParams p = {});
  int start(std::span<const int32_t> prompt);
  void extend(int req, std::span<const int32_t> accepted);
  // context: the request's prompt and output so far. max_tokens < 0: params.max_tokens.
  Draft propose(int req, std::span<const int32_t> context, int max_tokens = -1) const;
  Draft propose(int req, std::span<const int32_t> context, int max_tokens, bool chain_only) const;
  // The request ended: its output joins the global tree (oldest outputs leave beyond global_max_tokens;
  // an output longer than that is not kept). cancel: ends it without learning anything.
  void finish(int req, std::span<const int32_t> output);
  void cancel(int req);

  const SuffixTree& global() const { return global_; }
  size_t n_requests() const { return n_live_; }

 private:
  struct Local {
    std::unique_ptr<SuffixTree> tree;  // null: a free handle
    int seq = -1;
  };
  const Local& local(int req) const;

  SuffixParams p_;
  SuffixTree global_;
  std::deque<int> fifo_;  // global sequence ids, oldest first
  std::vector<Local> locals_;  // [handles]
  std::vector<int> free_;
  size_t n_live_ = 0;
};

}  // namespace larder::spec
