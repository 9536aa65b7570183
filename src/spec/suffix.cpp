// SuffixDecoding's trees and drafter: see suffix.h for the structure and its costs.
#include "spec/suffix.h"

#include <algorithm>

#include "core/result.h"

namespace larder::spec {

namespace {

inline uint64_t mix(uint64_t x) {  // murmur3's finaliser: parent and token bits both reach the low bits
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

inline uint64_t key_of(int32_t parent, int32_t tok) {
  return (uint64_t{static_cast<uint32_t>(parent)} << 32) | static_cast<uint32_t>(tok);
}

}  // namespace

// ---- ChildMap -------------------------------------------------------------------------------

int32_t SuffixTree::ChildMap::find(int32_t parent, int32_t tok) const {
  if (keys_.empty()) return -1;
  const uint64_t k = key_of(parent, tok);
  const size_t mask = keys_.size() - 1;
  for (size_t i = mix(k) & mask;; i = (i + 1) & mask) {
    if (keys_[i] == k) return vals_[i];
    if (keys_[i] == kEmpty) return -1;
  }
}

void SuffixTree::ChildMap::put(int32_t parent, int32_t tok, int32_t child) {
  if ((n_ + 1) * 4 > keys_.size() * 3) grow();
  const uint64_t k = key_of(parent, tok);
  const size_t mask = keys_.size() - 1;
  for (size_t i = mix(k) & mask;; i = (i + 1) & mask) {
    if (keys_[i] == k) {
      vals_[i] = child;
      return;
    }
    if (keys_[i] == kEmpty) {
      keys_[i] = k;
      vals_[i] = child;
      ++n_;
      return;
    }
  }
}

void SuffixTree::ChildMap::erase(int32_t parent, int32_t tok) {
  if (keys_.empty()) return;
  const uint64_t k = key_of(parent, tok);
  const size_t mask = keys_.size() - 1;
  size_t i = mix(k) & mask;
  for (; keys_[i] != k; i = (i + 1) & mask)
    if (keys_[i] == kEmpty) return;
  // Backward-shift deletion keeps every probe chain unbroken without tombstones.
  for (size_t j = (i + 1) & mask; keys_[j] != kEmpty; j = (j + 1) & mask) {
    const size_t h = mix(keys_[j]) & mask;
    const bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
    if (stays) continue;
    keys_[i] = keys_[j];
    vals_[i] = vals_[j];
    i = j;
  }
  keys_[i] = kEmpty;
  --n_;
}

void SuffixTree::ChildMap::grow() {
  std::vector<uint64_t> old_k = std::move(keys_);
  std::vector<int32_t> old_v = std::move(vals_);
  const size_t cap = std::max<size_t>(16, old_k.size() * 2);
  keys_.assign(cap, kEmpty);
  vals_.assign(cap, -1);
  n_ = 0;
  for (size_t i = 0; i < old_k.size(); ++i)
    if (old_k[i] != kEmpty) put(static_cast<int32_t>(old_k[i] >> 32), static_cast<int32_t>(old_k[i]), old_v[i]);
}

// ---- SuffixTree: building -------------------------------------------------------------------

SuffixTree::SuffixTree(int max_depth) : depth_(max_depth) {
  LARDER_ASSERT(max_depth >= 1);
  nodes_.emplace_back();  // the root
}

int SuffixTree::add(std::span<const int32_t> tokens) {
  int id;
  if (!free_seqs_.empty()) {
    id = free_seqs_.back();
    free_seqs_.pop_back();
  } else {
    id = static_cast<int>(seqs_.size());
    seqs_.emplace_back();
  }
  Seq& q = seqs_[id];
  q = Seq{};
  q.live = true;
  q.active.assign(depth_ - 1, -1);
  ++n_live_;
  append(id, tokens);
  return id;
}

void SuffixTree::append(int id, std::span<const int32_t> more) {
  LARDER_ASSERT(id >= 0 && id < static_cast<int>(seqs_.size()) && seqs_[id].live);
  Seq& q = seqs_[id];  // steps never add slots, so this stays valid
  q.tok.reserve(q.tok.size() + more.size());
  const int cap = depth_ - 1;
  for (const int32_t t : more) {
    q.tok.push_back(t);
    const auto end = static_cast<int32_t>(q.tok.size());
    ++nodes_[0].count;
    // Every suffix of length 1..D-1 grows by t (oldest first), then t starts a new one at the root.
    for (int a = 0; a < q.n_active; ++a) {
      const int slot = (q.head + a) % cap;
      q.active[slot] = step(q.active[slot], t, id, end);
    }
    const int32_t fresh = step(0, t, id, end);
    if (cap == 0) continue;
    if (q.n_active == cap) {  // the oldest just reached depth D: it never grows again
      q.active[q.head] = fresh;
      q.head = (q.head + 1) % cap;
    } else {
      q.active[(q.head + q.n_active) % cap] = fresh;
      ++q.n_active;
    }
  }
  n_tokens_ += more.size();
}

// The suffix of sequence s that ends at node v grows by t (t = s.tok[end - 1]); returns the node it
// now ends at. Only this suffix's own occurrence changes, so counts stay exact.
int32_t SuffixTree::step(int32_t v, int32_t t, int32_t s, int32_t end) {
  const int32_t c = kids_.find(v, t);
  if (c < 0) {
    if (v != 0 && nodes_[v].count == 1) {  // no other occurrence: v is this suffix's own leaf
      LARDER_ASSERT(nodes_[v].child < 0);
      ++nodes_[v].len;
      set_ref(v, s, end);
      return v;
    }
    const int32_t m = new_node();
    nodes_[m].tok = t;
    nodes_[m].len = 1;
    nodes_[m].count = 1;
    set_ref(m, s, end);
    link_child(v, m);
    kids_.put(v, t, m);
    return m;
  }
  if (v != 0 && nodes_[v].count == nodes_[c].count + 1) {
    // Only this suffix stops at v and all else goes on into c: v's boundary moves one token down.
    LARDER_ASSERT(nodes_[v].child == c && nodes_[c].next < 0);
    kids_.erase(v, t);
    if (nodes_[c].len == 1) {  // it reaches c: c takes v's place
      nodes_[c].len += nodes_[v].len;
      nodes_[c].tok = nodes_[v].tok;
      ++nodes_[c].count;
      replace_child(v, c);
      kids_.put(nodes_[c].parent, nodes_[c].tok, c);
      set_ref(c, s, end);
      free_node(v);
      return c;
    }
    ++nodes_[v].len;
    set_ref(v, s, end);
    --nodes_[c].len;  // end-anchored: c's reference still holds
    nodes_[c].tok = edge_tok(nodes_[c], 0);
    kids_.put(v, nodes_[c].tok, c);
    return v;
  }
  if (nodes_[c].len == 1) {
    ++nodes_[c].count;
    set_ref(c, s, end);  // the latest sequence to reach a node becomes its reference
    return c;
  }
  // Split c after its first token; the new node is where this suffix stops.
  const int32_t m = new_node();
  nodes_[m].tok = t;
  nodes_[m].len = 1;
  nodes_[m].count = nodes_[c].count + 1;
  set_ref(m, s, end);
  replace_child(c, m);
  nodes_[m].child = c;
  nodes_[c].parent = m;
  nodes_[c].prev = nodes_[c].next = -1;
  --nodes_[c].len;
  nodes_[c].tok = edge_tok(nodes_[c], 0);
  kids_.put(v, t, m);
  kids_.put(m, nodes_[c].tok, c);
  return m;
}

void SuffixTree::remove(int id) {
  LARDER_ASSERT(id >= 0 && id < static_cast<int>(seqs_.size()) && seqs_[id].live);
  Seq& q = seqs_[id];
  q.live = false;
  --n_live_;
  n_tokens_ -= q.tok.size();
  ++q.refs;  // its tokens are walked below: keep them
  const auto n = static_cast<int32_t>(q.tok.size());
  for (int32_t j = 0; j < n; ++j) {
    // The window starting at j ends at an explicit node at depth min(D, n - j); each node on the way
    // loses this occurrence.
    const int32_t L = std::min(depth_, n - j);
    --nodes_[0].count;
    int32_t v = 0, d = 0;
    bool gone = false;
    while (d < L) {
      const int32_t c = kids_.find(v, q.tok[j + d]);
      LARDER_ASSERT(c > 0);
      if (--nodes_[c].count == 0) {  // this was its only occurrence (and its subtree's)
        drop_subtree(c);
        maybe_merge(v);
        gone = true;
        break;
      }
      d += nodes_[c].len;
      v = c;
    }
    if (!gone) {
      LARDER_ASSERT(d == L);
      maybe_merge(v);  // an occurrence stopped at v: v may now be redundant
    }
  }
  q.active = {};
  q.n_active = q.head = 0;
  unref(id);
}

int32_t SuffixTree::new_node() {
  if (free_nodes_.empty()) {
    nodes_.emplace_back();
    return static_cast<int32_t>(nodes_.size() - 1);
  }
  const int32_t v = free_nodes_.back();
  free_nodes_.pop_back();
  return v;
}

void SuffixTree::free_node(int32_t v) {
  if (nodes_[v].ref_seq >= 0) unref(nodes_[v].ref_seq);
  nodes_[v] = Node{};
  free_nodes_.push_back(v);
}

// Unlinks v from its parent and frees it with everything below.
void SuffixTree::drop_subtree(int32_t v) {
  unlink_child(v);
  kids_.erase(nodes_[v].parent, nodes_[v].tok);
  std::vector<int32_t> stack{v};
  while (!stack.empty()) {
    const int32_t x = stack.back();
    stack.pop_back();
    for (int32_t c = nodes_[x].child; c >= 0; c = nodes_[c].next) {
      kids_.erase(x, nodes_[c].tok);
      stack.push_back(c);
    }
    free_node(x);
  }
}

// A node with one child and no occurrence stopping at it is folded into that child.
void SuffixTree::maybe_merge(int32_t v) {
  if (v == 0) return;
  const int32_t c = nodes_[v].child;
  if (c < 0 || nodes_[c].next >= 0 || nodes_[c].count != nodes_[v].count) return;
  kids_.erase(v, nodes_[c].tok);
  nodes_[c].len += nodes_[v].len;  // c's end-anchored reference covers v's edge too
  nodes_[c].tok = nodes_[v].tok;
  replace_child(v, c);
  kids_.put(nodes_[c].parent, nodes_[c].tok, c);
  free_node(v);
}

void SuffixTree::link_child(int32_t p, int32_t c) {
  nodes_[c].parent = p;
  nodes_[c].prev = -1;
  nodes_[c].next = nodes_[p].child;
  if (nodes_[p].child >= 0) nodes_[nodes_[p].child].prev = c;
  nodes_[p].child = c;
}

void SuffixTree::unlink_child(int32_t c) {
  const Node& n = nodes_[c];
  if (n.prev >= 0)
    nodes_[n.prev].next = n.next;
  else
    nodes_[n.parent].child = n.next;
  if (n.next >= 0) nodes_[n.next].prev = n.prev;
}

// new_c takes old_c's place among old_c's parent's children.
void SuffixTree::replace_child(int32_t old_c, int32_t new_c) {
  const Node o = nodes_[old_c];
  Node& n = nodes_[new_c];
  n.parent = o.parent;
  n.prev = o.prev;
  n.next = o.next;
  if (o.prev >= 0)
    nodes_[o.prev].next = new_c;
  else
    nodes_[o.parent].child = new_c;
  if (o.next >= 0) nodes_[o.next].prev = new_c;
}

void SuffixTree::set_ref(int32_t v, int32_t s, int32_t end) {
  Node& n = nodes_[v];
  if (n.ref_seq != s) {
    if (n.ref_seq >= 0) unref(n.ref_seq);
    ++seqs_[s].refs;
    n.ref_seq = s;
  }
  n.ref_end = end;
}

void SuffixTree::unref(int32_t s) {
  Seq& q = seqs_[s];
  LARDER_ASSERT(q.refs > 0);
  if (--q.refs > 0 || q.live) return;
  q = Seq{};  // removed and no longer referred to: the slot and its tokens go
  free_seqs_.push_back(s);
}

// ---- SuffixTree: queries --------------------------------------------------------------------

SuffixTree::Point SuffixTree::walk(std::span<const int32_t> w) const {
  Point p{0, 0};
  for (const int32_t t : w) {
    const Node& v = nodes_[p.node];
    if (p.off < v.len) {
      if (edge_tok(v, p.off) != t) return {};
      ++p.off;
    } else {
      const int32_t c = kids_.find(p.node, t);
      if (c < 0) return {};
      p = {c, 1};
    }
  }
  return p;
}

int SuffixTree::count(std::span<const int32_t> w) const {
  if (w.size() > static_cast<size_t>(depth_)) return 0;
  const Point p = walk(w);
  return p.node < 0 ? 0 : nodes_[p.node].count;
}

int SuffixTree::longest_match(std::span<const int32_t> context) const {
  // Every suffix of an occurring string occurs too, so the lengths that match form a prefix of 1..hi.
  int lo = 0, hi = std::min(static_cast<int>(context.size()), depth_ - 1);
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (walk(context.last(mid)).node >= 0)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

Draft SuffixTree::propose(std::span<const int32_t> context, const ProposeOptions& o, int* match_len) const {
  Draft best;
  int best_m = 0;
  for (int m = o.max_tokens > 0 ? longest_match(context) : 0; m >= 1; --m) {
    const int budget = std::min(o.max_tokens, static_cast<int>(o.alpha * static_cast<float>(m) + 1e-4f));
    if (budget <= 0 || static_cast<float>(budget) <= best.score) break;  // a shorter match cannot win now
    Draft d = grow(walk(context.last(m)), budget, o);
    if (d.score > best.score) {  // ties keep the longer match
      best = std::move(d);
      best_m = m;
    }
  }
  if (match_len) *match_len = best_m;
  return best;
}

// Greedy expansion from point p: the most probable candidate first (SuffixDecoding's speculation tree).
Draft SuffixTree::grow(Point p, int budget, const ProposeOptions& o) const {
  struct Cand {
    float prob;
    int32_t order;  // ties: the earlier candidate
    int32_t node, off, parent;
  };
  const auto lower = [](const Cand& a, const Cand& b) {
    return a.prob != b.prob ? a.prob < b.prob : a.order > b.order;
  };
  std::vector<Cand> heap;
  int32_t order = 0;
  const auto push = [&](const Cand& c) {
    heap.push_back(c);
    std::push_heap(heap.begin(), heap.end(), lower);
  };
  const auto expand = [&](Point at, float prob, int32_t parent, bool first) {
    const Node& v = nodes_[at.node];
    if (at.off < v.len) {  // inside an edge no occurrence stops: the next token is certain
      push({prob, order++, at.node, at.off + 1, parent});
      return;
    }
    int64_t denom = v.count;
    if (first && o.exclude_self) {
      int64_t through = 0;
      for (int32_t c = v.child; c >= 0; c = nodes_[c].next) through += nodes_[c].count;
      if (denom > through) --denom;  // the context's own occurrence stops here
    }
    if (denom <= 0) return;
    for (int32_t c = v.child; c >= 0; c = nodes_[c].next) {
      const float q = prob * static_cast<float>(nodes_[c].count) / static_cast<float>(denom);
      if (q >= o.min_prob) push({q, order++, c, 1, parent});
    }
  };
  Draft d;
  expand(p, 1.0f, -1, true);
  while (d.size() < budget && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), lower);
    const Cand c = heap.back();
    heap.pop_back();
    const int32_t idx = d.size();
    d.push(edge_tok(nodes_[c.node], c.off - 1), c.parent);
    d.score += c.prob;
    if (o.chain_only) heap.clear();  // only the new node's children compete
    expand({c.node, c.off}, c.prob, idx, false);
  }
  return d;
}

std::span<const int32_t> SuffixTree::tokens(int id) const {
  LARDER_ASSERT(id >= 0 && id < static_cast<int>(seqs_.size()) && seqs_[id].live);
  return seqs_[id].tok;
}

size_t SuffixTree::memory_bytes() const {
  size_t b = nodes_.capacity() * sizeof(Node) + free_nodes_.capacity() * sizeof(int32_t) + kids_.bytes();
  for (const Seq& q : seqs_) b += sizeof(Seq) + (q.tok.capacity() + q.active.capacity()) * sizeof(int32_t);
  return b;
}

size_t SuffixTree::n_strings() const {
  size_t n = 0;
  for (const Node& v : nodes_) n += v.len;  // free nodes and the root have len 0
  return n;
}

std::string SuffixTree::validate() const {
  const auto at = [](const char* what, int64_t v) { return std::string(what) + " (node " + std::to_string(v) + ")"; };
  // The string of node v, gathered edge by edge from each ancestor's own reference.
  const auto str = [&](int32_t v) {
    std::vector<int32_t> s;
    for (; v > 0; v = nodes_[v].parent)
      for (int k = nodes_[v].len - 1; k >= 0; --k) s.push_back(edge_tok(nodes_[v], k));
    std::reverse(s.begin(), s.end());
    return s;
  };
  std::vector<int32_t> refs(seqs_.size(), 0);
  std::vector<int32_t> stack{0};
  size_t seen = 0;
  while (!stack.empty()) {
    const int32_t v = stack.back();
    stack.pop_back();
    ++seen;
    const Node& n = nodes_[v];
    int64_t through = 0, kids = 0;
    for (int32_t c = n.child; c >= 0; c = nodes_[c].next) {
      const Node& cn = nodes_[c];
      if (cn.parent != v) return at("child's parent is wrong", c);
      if (cn.next >= 0 && nodes_[cn.next].prev != c) return at("sibling links disagree", c);
      if (kids_.find(v, cn.tok) != c) return at("child map disagrees", c);
      through += cn.count;
      ++kids;
      stack.push_back(c);
    }
    if (through > n.count) return at("children count more than their parent", v);
    if (v == 0) continue;
    if (n.len < 1 || n.count < 1) return at("empty edge or zero count", v);
    if (kids == 1 && through == n.count) return at("redundant node (one child, nothing stops)", v);
    if (n.ref_seq < 0 || n.ref_seq >= static_cast<int32_t>(seqs_.size())) return at("bad reference", v);
    ++refs[n.ref_seq];
    const std::vector<int32_t> s = str(v);
    const std::vector<int32_t>& rt = seqs_[n.ref_seq].tok;
    if (s.size() > static_cast<size_t>(depth_)) return at("deeper than max_depth", v);
    if (n.ref_end > static_cast<int32_t>(rt.size()) || n.ref_end < static_cast<int32_t>(s.size()))
      return at("reference out of range", v);
    if (!std::equal(s.begin(), s.end(), rt.begin() + (n.ref_end - static_cast<int32_t>(s.size()))))
      return at("reference does not hold the node's string", v);
    if (n.tok != edge_tok(n, 0)) return at("first token is stale", v);
  }
  if (seen != n_nodes()) return "unreachable or leaked nodes";
  if (kids_.size() + 1 != n_nodes()) return "child map size differs from the node count";
  if (static_cast<size_t>(nodes_[0].count) != n_tokens_) return "root count differs from the token count";
  for (size_t s = 0; s < seqs_.size(); ++s) {
    const Seq& q = seqs_[s];
    if (q.refs != refs[s]) return at("reference count is wrong for sequence", static_cast<int64_t>(s));
    if (!q.live) continue;
    const auto n = static_cast<int32_t>(q.tok.size());
    if (q.n_active != std::min(n, depth_ - 1)) return at("active suffix count is wrong for sequence", s);
    for (int a = 0; a < q.n_active; ++a) {
      const std::vector<int32_t> w = str(q.active[(q.head + a) % (depth_ - 1)]);
      if (static_cast<int32_t>(w.size()) != q.n_active - a || !std::equal(w.begin(), w.end(), q.tok.end() - w.size()))
        return at("active node is not the sequence's suffix, sequence", s);
    }
  }
  return "";
}

// ---- SuffixDrafter --------------------------------------------------------------------------

SuffixDrafter::SuffixDrafter(SuffixParams p) : p_(p), global_(p.max_depth) {}

const SuffixDrafter::Local& SuffixDrafter::local(int req) const {
  LARDER_ASSERT(req >= 0 && req < static_cast<int>(locals_.size()) && locals_[req].tree);
  return locals_[req];
}

int SuffixDrafter::start(std::span<const int32_t> prompt) {
  int h;
  if (!free_.empty()) {
    h = free_.back();
    free_.pop_back();
  } else {
    h = static_cast<int>(locals_.size());
    locals_.emplace_back();
  }
  locals_[h].tree = std::make_unique<SuffixTree>(p_.max_depth);
  locals_[h].seq = locals_[h].tree->add(prompt);
  ++n_live_;
  return h;
}

void SuffixDrafter::extend(int req, std::span<const int32_t> accepted) {
  const Local& l = local(req);
  l.tree->append(l.seq, accepted);
}

Draft SuffixDrafter::propose(int req, std::span<const int32_t> context, int max_tokens) const {
  return propose(req, context, max_tokens, p_.chain_only);
}

Draft SuffixDrafter::propose(int req, std::span<const int32_t> context, int max_tokens, bool chain_only) const {
  const Local& l = local(req);
  ProposeOptions o;
  o.max_tokens = max_tokens < 0 ? p_.max_tokens : std::min(max_tokens, p_.max_tokens);
  o.alpha = p_.alpha;
  o.min_prob = p_.min_prob;
  o.chain_only = chain_only;
  // When the context is the local sequence, its final occurrence of every matched suffix is itself.
  const std::span<const int32_t> mine = l.tree->tokens(l.seq);
  const size_t tail = std::min<size_t>(mine.size(), p_.max_depth - 1);
  o.exclude_self = mine.size() == context.size() && std::equal(mine.end() - tail, mine.end(), context.end() - tail);
  Draft a = l.tree->propose(context, o);
  if (global_.n_tokens() == 0) return a;
  o.exclude_self = false;
  Draft b = global_.propose(context, o);
  return b.score > a.score ? b : a;
}

void SuffixDrafter::finish(int req, std::span<const int32_t> output) {
  cancel(req);
  if (output.empty() || output.size() > p_.global_max_tokens) return;
  fifo_.push_back(global_.add(output));
  while (global_.n_tokens() > p_.global_max_tokens) {
    global_.remove(fifo_.front());
    fifo_.pop_front();
  }
}

void SuffixDrafter::cancel(int req) {
  local(req);
  locals_[req].tree.reset();
  free_.push_back(req);
  --n_live_;
}

}  // namespace larder::spec
