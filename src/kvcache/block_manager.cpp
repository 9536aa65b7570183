#include "kvcache/block_manager.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>

#include <algorithm>
#include <cstring>

namespace larder::kvcache {

const char* medium_name(Medium m) {
  switch (m) {
    case Medium::L1: return "L1";
    case Medium::Dram: return "DRAM";
    case Medium::Disk: return "SSD";
  }
  return "L1";
}

std::string BlockHash::hex() const {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(hi), static_cast<unsigned long long>(lo));
  return buf;
}

BlockHash root_hash(const CacheIdentity& id, std::string_view tenant_salt) {
  std::string s = "larder-kv-v1\n" + id.model + "\n" + id.dtype + "\n" + std::to_string(id.block_size) + "\n";
  s.append(tenant_salt.data(), tenant_salt.size());
  XXH128_hash_t h = XXH3_128bits(s.data(), s.size());
  return {h.low64, h.high64};
}

BlockHash chain_hash(const BlockHash& parent, std::span<const int32_t> tokens) {
  XXH3_state_t st;
  XXH3_128bits_reset(&st);
  XXH3_128bits_update(&st, &parent.lo, sizeof parent.lo);
  XXH3_128bits_update(&st, &parent.hi, sizeof parent.hi);
  XXH3_128bits_update(&st, tokens.data(), tokens.size_bytes());
  XXH128_hash_t h = XXH3_128bits_digest(&st);
  return {h.low64, h.high64};
}

BlockManager::BlockManager(int n_blocks, const CacheIdentity& identity)
    : block_size_(identity.block_size), identity_root_(root_hash(identity)), identity_(identity) {
  LARDER_ASSERT(n_blocks > 0 && identity.block_size > 0);
  blocks_.resize(n_blocks);
  free_.reserve(n_blocks);
  for (int i = n_blocks - 1; i >= 0; --i) free_.push_back(i);
}

int BlockManager::cached_prefix_tokens(std::span<const int32_t> tokens, std::string_view salt) const {
  BlockHash h = salt.empty() ? identity_root_ : root_hash(identity_, salt);
  int n = 0;
  // Leave at least one token to compute: its logits start generation.
  while (n + block_size_ < static_cast<int>(tokens.size())) {
    h = chain_hash(h, tokens.subspan(n, block_size_));
    if (!by_hash_.count(h)) break;
    n += block_size_;
  }
  return n;
}

Result<int> BlockManager::blocks_needed(const Seq& s, size_t n_more) const {
  const size_t total = s.tokens.size() + n_more;
  const size_t need = (total + block_size_ - 1) / block_size_;
  return static_cast<int>(need > s.table.size() ? need - s.table.size() : 0);
}

Result<BlockManager::Plan> BlockManager::prepare_add(SeqId seq, std::span<const int32_t> prompt,
                                                     std::string_view salt, int name_limit, bool reuse_all) const {
  if (seqs_.count(seq)) return make_error("sequence %lld already exists", static_cast<long long>(seq));
  if (prompt.empty()) return make_error("empty prompt");
  Plan p;
  p.kind = Plan::ADD;
  p.seq = seq;
  p.tokens.assign(prompt.begin(), prompt.end());
  p.generation = generation_;
  BlockHash h = salt.empty() ? identity_root_ : root_hash(identity_, salt);
  p.root = h;
  p.name_limit = name_limit;
  int n = 0;
  int reused_from_lru = 0;
  const int size = static_cast<int>(prompt.size());
  while ((reuse_all ? n + block_size_ <= size : n + block_size_ < size) &&
         (name_limit < 0 || n + block_size_ <= name_limit)) {
    h = chain_hash(h, prompt.subspan(n, block_size_));
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    p.reuse.push_back(it->second);
    if (blocks_[it->second].refs == 0) ++reused_from_lru;
    n += block_size_;
  }
  p.n_cached_tokens = n;
  const int total_blocks = static_cast<int>((prompt.size() + block_size_ - 1) / block_size_);
  p.n_new_blocks = total_blocks - static_cast<int>(p.reuse.size());
  // Reused blocks that sit in the LRU stop being evictable.
  if (p.n_new_blocks > available_blocks() - reused_from_lru)
    return make_error("not enough KV blocks: need %d, %d available", p.n_new_blocks, available_blocks() - reused_from_lru);
  return p;
}

Result<BlockManager::Plan> BlockManager::prepare_append(SeqId seq, std::span<const int32_t> tokens) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return make_error("unknown sequence %lld", static_cast<long long>(seq));
  const Seq& s = it->second;
  Plan p;
  p.kind = Plan::APPEND;
  p.seq = seq;
  p.tokens.assign(tokens.begin(), tokens.end());
  p.generation = generation_;
  LARDER_TRY(need, blocks_needed(s, tokens.size()));
  p.n_new_blocks = need;
  // Writing into a partial tail that another sequence also references needs a copy.
  const bool partial = s.tokens.size() % block_size_ != 0;
  if (partial && !tokens.empty() && blocks_[s.table.back()].refs > 1) {
    p.cow_tail = true;
    p.n_new_blocks += 1;
  }
  if (p.n_new_blocks > available_blocks())
    return make_error("not enough KV blocks: need %d, %d available", p.n_new_blocks, available_blocks());
  return p;
}

Result<BlockManager::Plan> BlockManager::prepare_fork(SeqId child, SeqId parent) const {
  if (seqs_.count(child)) return make_error("sequence %lld already exists", static_cast<long long>(child));
  if (!seqs_.count(parent)) return make_error("unknown sequence %lld", static_cast<long long>(parent));
  Plan p;
  p.kind = Plan::FORK;
  p.seq = child;
  p.parent = parent;
  p.generation = generation_;
  return p;
}

Result<BlockManager::Plan> BlockManager::prepare_truncate(SeqId seq, int n_keep, std::span<const int32_t> tail) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return make_error("unknown sequence %lld", static_cast<long long>(seq));
  const Seq& s = it->second;
  const int base = n_keep - static_cast<int>(tail.size());
  if (base < s.n_computed || n_keep > static_cast<int>(s.tokens.size()))
    return make_error("truncate to %d tokens (tail %zu) would change computed tokens or grow the sequence (%zu, %d computed)",
                      n_keep, tail.size(), s.tokens.size(), s.n_computed);
  Plan p;
  p.kind = Plan::TRUNCATE;
  p.seq = seq;
  p.n_keep = n_keep;
  p.tokens.assign(tail.begin(), tail.end());
  p.generation = generation_;
  return p;
}

BlockId BlockManager::take_block() {
  BlockId b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    // Evict the least recently released cached block; its name goes with it.
    LARDER_ASSERT(!lru_.empty());
    b = lru_.front();
    lru_.pop_front();
    Block& blk = blocks_[b];
    blk.in_lru = false;
    LARDER_ASSERT(blk.named);
    if (evict_hook_) evict_hook_(b, blk.hash);
    if (listener_) listener_->removed(Medium::L1, blk.hash);
    by_hash_.erase(blk.hash);
    blk.named = false;
    ++evictions_;
  }
  LARDER_ASSERT(blocks_[b].refs == 0);
  blocks_[b].refs = 1;
  return b;
}

Status BlockManager::apply(const Plan& p, const std::function<void(BlockId, BlockId)>& copy_block) {
  if (p.generation != generation_) return make_error("stale plan: the cache changed since prepare");
  ++generation_;
  switch (p.kind) {
    case Plan::ADD: {
      Seq s;
      s.root = p.root;
      s.name_limit = p.name_limit;
      for (BlockId b : p.reuse) {
        Block& blk = blocks_[b];
        if (blk.in_lru) {
          lru_.erase(blk.lru_it);
          blk.in_lru = false;
        }
        blk.refs++;
        s.table.push_back(b);
      }
      for (int i = 0; i < p.n_new_blocks; ++i) s.table.push_back(take_block());
      s.tokens = p.tokens;
      s.n_computed = p.n_cached_tokens;
      s.n_named = static_cast<int>(p.reuse.size());
      s.tail_hash = p.reuse.empty() ? p.root : blocks_[p.reuse.back()].hash;
      lookup_tokens_ += static_cast<int64_t>(p.tokens.size());
      hit_tokens_ += p.n_cached_tokens;
      seqs_.emplace(p.seq, std::move(s));
      break;
    }
    case Plan::APPEND: {
      Seq& s = seqs_.at(p.seq);
      if (p.cow_tail) {
        BlockId old = s.table.back();
        BlockId fresh = take_block();
        if (copy_block) copy_block(old, fresh);
        unref(old);
        s.table.back() = fresh;
      }
      for (int i = 0; i < p.n_new_blocks - (p.cow_tail ? 1 : 0); ++i) s.table.push_back(take_block());
      s.tokens.insert(s.tokens.end(), p.tokens.begin(), p.tokens.end());
      break;
    }
    case Plan::TRUNCATE: {
      Seq& s = seqs_.at(p.seq);
      s.tokens.resize(p.n_keep);
      std::copy(p.tokens.begin(), p.tokens.end(), s.tokens.end() - p.tokens.size());
      const size_t n_blocks = (static_cast<size_t>(p.n_keep) + block_size_ - 1) / block_size_;
      while (s.table.size() > n_blocks) {
        unref(s.table.back());  // past the computed tokens: never named, so freed
        s.table.pop_back();
      }
      break;
    }
    case Plan::FORK: {
      Seq child = seqs_.at(p.parent);
      for (BlockId b : child.table) blocks_[b].refs++;
      seqs_.emplace(p.seq, std::move(child));
      break;
    }
  }
  return Status::Ok();
}

void BlockManager::mark_computed(SeqId seq, int n_computed, std::vector<std::pair<BlockId, BlockHash>>* named) {
  Seq& s = seqs_.at(seq);
  LARDER_ASSERT(n_computed >= 0 && n_computed <= static_cast<int>(s.tokens.size()));
  s.n_computed = std::max(s.n_computed, n_computed);
  // Name every block that is now full and computed.
  BlockHash h = s.tail_hash;  // name of the last named block (or the root): no re-hash from block 0
  while ((s.n_named + 1) * block_size_ <= s.n_computed &&
         (s.name_limit < 0 || (s.n_named + 1) * block_size_ <= s.name_limit)) {
    const int i = s.n_named;
    const BlockHash parent = h;
    h = chain_hash(h, std::span<const int32_t>(s.tokens).subspan(i * block_size_, block_size_));
    Block& blk = blocks_[s.table[i]];
    if (!blk.named) {
      auto it = by_hash_.find(h);
      if (it == by_hash_.end()) {
        blk.named = true;
        blk.hash = h;
        by_hash_.emplace(h, s.table[i]);
        if (named) named->emplace_back(s.table[i], h);
        if (listener_)
          listener_->stored(Medium::L1, h, i > 0 ? &parent : nullptr,
                            std::span<const int32_t>(s.tokens).subspan(i * block_size_, block_size_));
      }
      // else: an identical block exists already (computed concurrently); ours stays
      // anonymous and is freed on release.
    }
    s.n_named++;
    s.tail_hash = h;
  }
}

void BlockManager::unref(BlockId b) {
  Block& blk = blocks_[b];
  LARDER_ASSERT(blk.refs > 0);
  if (--blk.refs > 0) return;
  if (blk.named) {
    blk.lru_it = lru_.insert(lru_.end(), b);
    blk.in_lru = true;
  } else {
    free_.push_back(b);
  }
}

void BlockManager::release(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  ++generation_;
  // Release tail first so the LRU evicts a prefix's later blocks before its earlier
  // ones (earlier blocks are shared by more future requests).
  for (auto b = it->second.table.rbegin(); b != it->second.table.rend(); ++b) unref(*b);
  seqs_.erase(it);
}

const std::vector<BlockId>& BlockManager::block_table(SeqId seq) const { return seqs_.at(seq).table; }
int BlockManager::n_tokens(SeqId seq) const { return static_cast<int>(seqs_.at(seq).tokens.size()); }
int BlockManager::n_computed(SeqId seq) const { return seqs_.at(seq).n_computed; }

std::optional<BlockHash> BlockManager::block_hash(BlockId b) const {
  if (b < 0 || b >= n_blocks() || !blocks_[b].named) return std::nullopt;
  return blocks_[b].hash;
}

BlockManagerStats BlockManager::stats() const {
  BlockManagerStats st;
  st.n_blocks = n_blocks();
  st.free = static_cast<int>(free_.size());
  st.cached = static_cast<int>(lru_.size());
  st.used = st.n_blocks - st.free - st.cached;
  st.evictions = evictions_;
  st.hit_tokens = hit_tokens_;
  st.lookup_tokens = lookup_tokens_;
  return st;
}

Status BlockManager::check_consistency() const {
  std::vector<int> refs(blocks_.size(), 0);
  for (const auto& [id, s] : seqs_) {
    const size_t need = (s.tokens.size() + block_size_ - 1) / block_size_;
    if (s.table.size() != need) return make_error("seq %lld has %zu blocks for %zu tokens", (long long)id, s.table.size(), s.tokens.size());
    for (BlockId b : s.table) refs[b]++;
  }
  std::vector<int> where(blocks_.size(), 0);
  for (BlockId b : free_) where[b] |= 1;
  for (BlockId b : lru_) where[b] |= 2;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& blk = blocks_[b];
    if (blk.refs != refs[b]) return make_error("block %zu refcount %d but %d references", b, blk.refs, refs[b]);
    if (blk.refs > 0 && where[b]) return make_error("referenced block %zu is on a free/LRU list", b);
    if (blk.refs == 0 && where[b] != 1 && where[b] != 2) return make_error("unreferenced block %zu is on %d lists", b, where[b]);
    if (where[b] == 2 && !blk.named) return make_error("anonymous block %zu in the LRU", b);
    if (where[b] == 1 && blk.named) return make_error("named block %zu on the free list", b);
    if (blk.named) {
      auto it = by_hash_.find(blk.hash);
      if (it == by_hash_.end() || it->second != static_cast<BlockId>(b)) return make_error("block %zu name not indexed", b);
    }
  }
  for (const auto& [h, b] : by_hash_)
    if (!blocks_[b].named || !(blocks_[b].hash == h)) return make_error("index points to block %d with another name", b);
  return Status::Ok();
}

}  // namespace larder::kvcache
