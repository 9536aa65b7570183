// KV-cache events: which blocks an instance holds, per tier, as a stream of "stored" /
// "removed" / "cleared" events that the conductor follows to keep its global index.
//
// Wire format: vLLM's KV events (vllm/distributed/kv_events.py), so the conductor can follow
// vLLM instances too. One ZeroMQ PUB message is three frames: topic, the batch's sequence
// number (8 bytes, big-endian), and a msgpack payload:
//   batch = [ts (float64), [event...], data_parallel_rank (int or nil)]   (msgspec array_like)
//   ["BlockStored", [hash...], parent_hash|nil, [token_id...], block_size, lora_id|nil,
//    medium|nil, lora_name|nil]
//   ["BlockRemoved", [hash...], medium|nil]
//   ["AllBlocksCleared"]
// msgspec writes every field of an array_like struct, defaults included (vLLM <= 0.23 sends
// 12 fields per BlockStored, 0.9 sent 6); we write the 8 that every vLLM since lora_name was
// added requires (msgspec fills the later defaulted ones) and older decoders ignore the extra.
//
// Differences from vLLM, on purpose:
//  - block hashes are 128-bit (kvcache::BlockHash): msgpack bin of 16 bytes, lo then hi, each
//    little-endian (a consumer that types them as int, like vLLM <= 0.10's own structs, rejects
//    them; newer vLLM types them bytes | int). vLLM sends ints (<= 0.10, or with
//    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES) or bytes (its sha256 digests, 32 bytes). The decoder
//    takes all: an int v (uint64 or negative int64) -> {lo = v, hi = 0}; bin of 16 bytes ->
//    lo/hi as above; bin of any other length (1..64) -> {lo = its last 8 bytes big-endian,
//    hi = 0}, exactly the int vLLM's int mode sends for the same block, so one vLLM instance
//    maps the same either way.
//  - data_parallel_rank: nil unless set (vLLM's publisher always sets its rank, 0 by default).
//  - medium: we publish "L1" (the engine's pool), "DRAM" (DRAM tier), "SSD" (disk tier);
//    vLLM publishes "GPU", "CPU", later "STORAGE", or nil. medium_of() folds them all.
//  - lora_name, extra_keys, group_idx, ... are written nil / not written and skipped on decode.
//
// The decoder also takes what newer vLLM sends (after vLLM PR 42892): events as tagged maps
// {"type": "BlockStored", "block_hashes": ..., ...}, unknown keys skipped, and a batch as a
// map {"ts", "events", "data_parallel_rank"}. It never throws and never trusts a length:
// anything malformed is one line of error.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <variant>
#include <vector>

#include "core/result.h"
#include "kvcache/block_manager.h"

namespace larder::kvevents {

using kvcache::BlockHash;
using kvcache::BlockHashHasher;
using kvcache::Medium;

struct BlockStored {
  std::vector<BlockHash> hashes;    // a chain: hashes[i] is the parent of hashes[i+1]
  std::optional<BlockHash> parent;  // parent of hashes[0] (nil: a sequence's first block / unknown)
  std::vector<int32_t> token_ids;   // tokens of all the blocks (empty: not known, e.g. a snapshot)
  int block_size = 0;
  std::optional<int64_t> lora_id;
  std::string medium;  // empty = nil
};
struct BlockRemoved {
  std::vector<BlockHash> hashes;
  std::string medium;  // empty = nil
};
struct AllBlocksCleared {};
using Event = std::variant<BlockStored, BlockRemoved, AllBlocksCleared>;

struct EventBatch {
  double ts = 0;  // seconds since the epoch, when the batch was made
  std::vector<Event> events;
  std::optional<int> dp_rank;  // vLLM's data_parallel_rank
};

std::string encode(const EventBatch& b);
Result<EventBatch> decode(std::string_view payload);

// Case-insensitive: "L1"/"GPU"/nil -> L1, "DRAM"/"CPU" -> Dram, "SSD"/"DISK"/"STORAGE" -> Disk,
// anything else -> L1. The wire names we publish are kvcache::medium_name().
Medium medium_of(std::string_view s);

// What one instance holds, per medium, as its events say: stored adds the hashes, removed
// erases them, cleared empties every medium (set semantics: storing a held block is a no-op).
// The publisher keeps one (the snapshot it answers late subscribers with), the conductor one
// per instance.
class HeldBlocks {
 public:
  void apply(const Event& e);
  void apply(const EventBatch& b);
  void clear();
  bool holds(Medium m, const BlockHash& h) const { return sets_[idx(m)].count(h) != 0; }
  const std::unordered_set<BlockHash, BlockHashHasher>& blocks(Medium m) const { return sets_[idx(m)]; }
  size_t size() const { return sets_[0].size() + sets_[1].size() + sets_[2].size(); }
  // The block size of the last BlockStored seen for a medium (0: none yet).
  int block_size(Medium m) const { return block_size_[idx(m)]; }
  // A batch that, applied to anything, leaves exactly this state: [AllBlocksCleared, then one
  // BlockStored per non-empty medium (no tokens, no parent)].
  EventBatch snapshot(double ts) const;
  // Same blocks in the same media (block sizes are not compared).
  bool operator==(const HeldBlocks& o) const;

 private:
  static size_t idx(Medium m) { return static_cast<size_t>(m) < 3 ? static_cast<size_t>(m) : 0; }
  std::unordered_set<BlockHash, BlockHashHasher> sets_[3];
  int block_size_[3] = {0, 0, 0};
};

// Seconds since the Unix epoch (what vLLM puts in ts: time.time()).
double wall_seconds();

}  // namespace larder::kvevents
