// Paged KV-cache bookkeeping: a pool of fixed-size blocks, a block table per sequence,
// and names for full blocks given by a hash chain, so any later sequence with the same
// prefix finds them. Storage (the KV tensors) lives elsewhere: this class hands out
// block ids and tells the owner of the storage when to copy one (copy-on-write).
//
// Naming: hash(block) = XXH3-128(parent hash, token ids of the block) where the root
// parent is XXH3-128(model identity, cache dtype, block size, tenant salt). 128 bits
// make accidental collisions out of the question.
//
// Mutation has one way in: prepare_*() checks that a step fits and returns a plan
// without changing anything; apply() performs it (llama.cpp's prepare-then-apply).
#pragma once
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/result.h"

namespace larder::kvcache {

using BlockId = int32_t;
using SeqId = int64_t;

struct BlockHash {
  uint64_t lo = 0, hi = 0;
  bool operator==(const BlockHash& o) const { return lo == o.lo && hi == o.hi; }
  std::string hex() const;
};
struct BlockHashHasher {
  size_t operator()(const BlockHash& h) const { return static_cast<size_t>(h.lo ^ (h.hi * 0x9E3779B97F4A7C15ull)); }
};

// Where a named block lives: the engine's pool (L1), the DRAM tier (L2), the SSD tier (L3).
enum class Medium : uint8_t { L1 = 0, Dram = 1, Disk = 2 };
const char* medium_name(Medium m);  // "L1", "DRAM", "SSD" (the KV-event wire names)

// Told when a block gets or loses a name in a medium (KV events for the conductor's index).
// Called on the thread that changes the medium, sometimes under its lock: must only queue.
class BlockListener {
 public:
  virtual ~BlockListener() = default;
  // parent: the previous block of the chain (null for a sequence's first block or when not
  // known); tokens: the block's tokens when known (empty otherwise).
  virtual void stored(Medium m, const BlockHash& h, const BlockHash* parent, std::span<const int32_t> tokens) = 0;
  virtual void removed(Medium m, const BlockHash& h) = 0;
};

// Identity of what a block's contents mean: blocks are never shared across these.
struct CacheIdentity {
  std::string model;      // e.g. model file name + content fingerprint
  std::string dtype;      // cache element type, e.g. "f32"
  int block_size = 16;
};

BlockHash root_hash(const CacheIdentity& id, std::string_view tenant_salt = {});
BlockHash chain_hash(const BlockHash& parent, std::span<const int32_t> tokens);

struct BlockManagerStats {
  int n_blocks = 0;
  int used = 0;         // referenced by at least one sequence
  int cached = 0;       // unreferenced but named: reusable, evictable
  int free = 0;         // never used or evicted
  int64_t evictions = 0;
  int64_t hit_tokens = 0;     // prompt tokens served from cached blocks
  int64_t lookup_tokens = 0;  // prompt tokens looked up
};

class BlockManager {
 public:
  BlockManager(int n_blocks, const CacheIdentity& identity);

  int block_size() const { return block_size_; }
  int n_blocks() const { return static_cast<int>(blocks_.size()); }

  // Longest cached prefix of `tokens` in whole blocks (read-only; touches nothing).
  // Only whole blocks strictly before the last token count, so at least one token is
  // always left to compute (its logits are needed).
  int cached_prefix_tokens(std::span<const int32_t> tokens, std::string_view salt = {}) const;

  // A plan for a step; apply() performs it. Plans are invalidated by any other apply().
  struct Plan {
    enum Kind { ADD, APPEND, FORK, TRUNCATE } kind = ADD;
    SeqId seq = -1;
    SeqId parent = -1;                 // FORK
    std::vector<int32_t> tokens;       // ADD: prompt; APPEND: new tokens; TRUNCATE: the new tail
    int n_keep = 0;                    // TRUNCATE: tokens the sequence keeps
    std::vector<BlockId> reuse;        // ADD: cached blocks taken over
    int n_new_blocks = 0;              // fresh blocks to take (free list first, then evict LRU)
    bool cow_tail = false;             // the shared partial tail must be copied first
    int n_cached_tokens = 0;           // ADD: tokens whose KV is already there
    BlockHash root;                    // ADD: root of the name chain (identity + salt)
    int name_limit = -1;               // ADD: only blocks within the first name_limit tokens are reused or named (-1: all)
    uint64_t generation = 0;
  };

  // Registers a new sequence for a prompt: reuses its longest cached prefix and
  // reserves blocks for the rest. Error if it cannot fit even after evicting.
  // name_limit >= 0: blocks past the first name_limit tokens are neither reused nor ever named (their
  // KV is not what plain prefill of the tokens gives: composed documents). reuse_all: every whole
  // cached block counts, the last one too (stored payloads that need no logits: documents).
  Result<Plan> prepare_add(SeqId seq, std::span<const int32_t> prompt, std::string_view salt = {}, int name_limit = -1,
                           bool reuse_all = false) const;
  // Makes room for n more tokens at the end of a sequence.
  Result<Plan> prepare_append(SeqId seq, std::span<const int32_t> tokens) const;
  // A new sequence sharing all of parent's blocks (partial tail copied on first write).
  Result<Plan> prepare_fork(SeqId child, SeqId parent) const;

  // Shortens a sequence to n_keep tokens whose last tail.size() are replaced by `tail` (speculative
  // decoding: the draft's accepted tokens stay, the rest go); blocks past the end are freed.
  // Computed tokens cannot change: n_keep - tail.size() must be >= the sequence's computed count.
  Result<Plan> prepare_truncate(SeqId seq, int n_keep, std::span<const int32_t> tail) const;

  // copy_block(src, dst) is called when a shared partial tail must be copied.
  Status apply(const Plan& plan, const std::function<void(BlockId src, BlockId dst)>& copy_block = {});

  // Call after the KV of a sequence's tokens [0, n_computed) has been written: names
  // the blocks that became full so other sequences can find them.
  // Blocks named by this call are appended to *named (for write-back to lower tiers).
  void mark_computed(SeqId seq, int n_computed, std::vector<std::pair<BlockId, BlockHash>>* named = nullptr);

  // Called with a cached block about to be evicted (inside apply(), before the block is
  // reused), so its KV can be kept by a lower tier.
  void set_evict_hook(std::function<void(BlockId, const BlockHash&)> f) { evict_hook_ = std::move(f); }
  // Told of every name given (mark_computed) and taken (eviction) in the pool.
  void set_listener(BlockListener* l) { listener_ = l; }

  // Drops a sequence; its named blocks stay cached (evictable), others become free.
  void release(SeqId seq);

  bool has_sequence(SeqId seq) const { return seqs_.count(seq) != 0; }
  const std::vector<BlockId>& block_table(SeqId seq) const;
  int n_tokens(SeqId seq) const;
  // Tokens whose KV is known to be in the blocks (cached prefix + computed).
  int n_computed(SeqId seq) const;
  // Number of blocks a prepare could obtain right now (free + evictable).
  int available_blocks() const { return static_cast<int>(free_.size() + lru_.size()); }
  BlockManagerStats stats() const;
  std::optional<BlockHash> block_hash(BlockId b) const;
  int ref_count(BlockId b) const { return blocks_[b].refs; }

  // Invariant check (refcounts vs tables, lists disjoint); used by tests.
  Status check_consistency() const;

 private:
  struct Block {
    int refs = 0;
    bool named = false;
    BlockHash hash;
    std::list<BlockId>::iterator lru_it;
    bool in_lru = false;
  };
  struct Seq {
    std::vector<BlockId> table;
    std::vector<int32_t> tokens;
    int n_computed = 0;
    int n_named = 0;  // leading blocks already named
    BlockHash root;
    BlockHash tail_hash;  // chain hash of block n_named-1 (root when none)
    int name_limit = -1;  // blocks past this many tokens stay anonymous (-1: none)
  };

  Result<int> blocks_needed(const Seq& s, size_t n_more) const;
  BlockId take_block();
  void unref(BlockId b);

  int block_size_;
  BlockHash identity_root_;
  CacheIdentity identity_;
  std::vector<Block> blocks_;
  std::vector<BlockId> free_;                       // LIFO
  std::list<BlockId> lru_;                          // unreferenced named blocks, oldest first
  std::unordered_map<BlockHash, BlockId, BlockHashHasher> by_hash_;
  std::unordered_map<SeqId, Seq> seqs_;
  uint64_t generation_ = 0;
  std::function<void(BlockId, const BlockHash&)> evict_hook_;
  BlockListener* listener_ = nullptr;
  int64_t evictions_ = 0, hit_tokens_ = 0, lookup_tokens_ = 0;
};

}  // namespace larder::kvcache
