// DRAM tier (L2) of the KV store: a bounded cache of blocks in memory, keyed by their
// prefix-chain hash. It holds blocks the engine's pool (L1) had to evict, so a later
// hit loads them instead of recomputing. Optionally blocks are kept as 8-bit (one
// int8 per value plus an f32 scale per group of `group` values, i.e. ~27% of f32 or
// ~53% of f16 for head_dim 64), so the same budget holds more blocks at a small accuracy
// cost. Payloads are in the pool's types (PayloadFormat): f32/f16/bf16 parts are quantized
// from their type and rounded back to it on a hit; q8_0 parts are already 8-bit and are
// kept as they are.
//
// Eviction: LRU, or LFU (hit counts with aging; ties broken by recency). Counts
// survive a block's removal for a while (a bounded ghost table), so a block that keeps
// coming back ranks as hot.
#pragma once
#include <cstdint>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvcache/block_manager.h"
#include "model/dtype.h"

namespace larder::kvcache {

enum class EvictPolicy { LRU, LFU };
Result<EvictPolicy> parse_policy(const std::string& s);

struct DramTierStats {
  int64_t blocks = 0, bytes = 0, capacity = 0;
  int64_t puts = 0, hits = 0, misses = 0, evictions = 0;
};

// A block payload: n_layer x (k_values of k_type, then v_values of v_type). n_layer 0 = plain
// f32 values (tests of the tier alone).
struct PayloadFormat {
  int n_layer = 0;
  DType k_type = DType::F32, v_type = DType::F32;
  size_t k_values = 0, v_values = 0;
};

class DramTier {
 public:
  // group: values per 8-bit scale (only used when q8).
  DramTier(uint64_t capacity_bytes, EvictPolicy policy, bool q8, int group = 64, PayloadFormat fmt = {});

  // Stores a block's payload (f32 bytes, a multiple of 4, when q8 without a format). Evicts as needed;
  // a block larger than the whole capacity is not stored.
  void put(const BlockHash& key, std::span<const uint8_t> payload);
  // Copies the block's payload into out. take = remove it on hit (exclusive
  // caching: the block moves up to L1 and comes back here when L1 evicts it again).
  bool get(const BlockHash& key, std::vector<uint8_t>& out, bool take);
  bool exists(const BlockHash& key) const;
  void remove(const BlockHash& key);
  DramTierStats stats() const;
  void set_listener(BlockListener* l) { listener_ = l; }  // before any put
  bool q8() const { return q8_; }

 private:
  struct Entry {
    std::vector<uint8_t> data;  // f32 bytes, or the 8-bit encoding
    uint32_t raw_bytes = 0;
    uint64_t rank_freq = 0, rank_tick = 0;
  };
  using Rank = std::pair<uint64_t, uint64_t>;  // (frequency or 0, last-use tick)
  void touch(const BlockHash& key, Entry& e, bool hit);
  void erase(std::unordered_map<BlockHash, Entry, BlockHashHasher>::iterator it);
  std::vector<uint8_t> encode(std::span<const uint8_t> payload) const;
  void decode(const std::vector<uint8_t>& enc, std::vector<uint8_t>& out) const;

  uint64_t capacity_;
  EvictPolicy policy_;
  bool q8_;
  int group_;
  PayloadFormat fmt_;
  mutable std::mutex mu_;
  BlockListener* listener_ = nullptr;
  std::unordered_map<BlockHash, Entry, BlockHashHasher> map_;
  std::set<std::pair<Rank, BlockHash>, bool (*)(const std::pair<Rank, BlockHash>&, const std::pair<Rank, BlockHash>&)> order_;
  std::unordered_map<BlockHash, uint32_t, BlockHashHasher> freq_;  // LFU counts, incl. ghosts
  uint64_t tick_ = 0, bytes_ = 0;
  DramTierStats st_;
};

// 8-bit block codec (exposed for tests).
std::vector<uint8_t> q8_encode(std::span<const float> x, int group);
void q8_decode(std::span<const uint8_t> enc, std::span<float> x, int group);

}  // namespace larder::kvcache
