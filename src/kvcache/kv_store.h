// The KV store between the engine and storage: blocks by prefix-chain key in tiers
// below the engine's own pool (L1):
//   L2  DRAM (DramTier): blocks L1 evicted (exclusive: a hit moves the block up to L1);
//   L3  SSD  (DiskTier): every completed block, written back asynchronously soon after
//       it is complete, flushed on a clean shutdown, kept across restarts. A block whose
//       write is still queued counts as on SSD and is read from the queue (a slow or busy
//       disk must not make a block evicted from L1 just after it completed a miss).
// Reads are batched and asynchronous (get_async -> LoadJob), served by a small reader
// pool so loads overlap the engine's compute; the engine installs each block as it
// arrives. Every payload carries the layout fingerprint (model identity, layers, KV
// width, block size, dtype) in the SSD record, and DRAM tiers live inside one process
// and one model, so a block is never applied to the wrong model.
//
// Load or recompute: load_seconds(tier) estimates, from the bandwidth measured on
// earlier loads, how long one block takes to come back; the engine compares it with its
// own measured prefill time for a block and recomputes when that is faster.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/result.h"
#include "kvcache/block_manager.h"
#include "kvcache/disk_tier.h"
#include "kvcache/dram_tier.h"
#include "kernels/attention_kv.h"

namespace larder::kvcache {

struct KvLayout {
  std::string model_id;  // content fingerprint of the model
  DType k_type = DType::F32, v_type = DType::F32;  // the engine pool's K/V cache types
  int n_layer = 0, kv_dim = 0, block_size = 16, group = 64;  // group: head_dim (8-bit L2 scales)
  // A payload: per layer, block_size K rows then block_size V rows in their types.
  size_t k_bytes() const { return block_size * kernels::kv_row_bytes(k_type, kv_dim); }
  size_t v_bytes() const { return block_size * kernels::kv_row_bytes(v_type, kv_dim); }
  size_t block_bytes() const { return static_cast<size_t>(n_layer) * (k_bytes() + v_bytes()); }
  std::string dtype() const;  // "f16", or "q8_0/f16" (K/V) when they differ
  // Hash of model identity, K/V types, layers, KV width and block size: SSD records of
  // another layout (another model, or a pool of other cache types) are never served.
  uint64_t fingerprint() const;
  PayloadFormat payload_format() const {
    return {n_layer, k_type, v_type, static_cast<size_t>(block_size) * kv_dim, static_cast<size_t>(block_size) * kv_dim};
  }
};

struct KvStoreParams {
  uint64_t dram_bytes = 0;        // 0 = no L2
  bool dram_q8 = false;
  std::string disk_dir;           // empty = no L3
  uint64_t disk_bytes = 16ull << 30;
  EvictPolicy policy = EvictPolicy::LRU;
  int readers = 2;                // reader threads
  uint64_t write_queue_bytes = 256ull << 20;  // write-back backlog beyond this is dropped (counted)
  // Bandwidth assumed for a tier until loads from it have been measured (bytes/s).
  double guess_dram_bw = 4e9, guess_disk_bw = 5e8;
};

enum class Tier { None = 0, Dram = 1, Disk = 2 };

struct KvStoreStats {
  DramTierStats dram;
  DiskTierStats disk;
  bool has_dram = false, has_disk = false;
  int64_t dram_load_bytes = 0, disk_load_bytes = 0;
  double dram_load_seconds = 0, disk_load_seconds = 0;
  int64_t disk_store_bytes = 0;
  double disk_store_seconds = 0;
  int64_t write_queued = 0, write_dropped = 0, write_skipped = 0;  // skipped: already on disk or queued
  int64_t write_queue_hits = 0;   // SSD-tier blocks read from the write-back queue (not yet written)
  int64_t load_failed = 0;        // a block announced by a tier could not be read (corrupt/evicted): recomputed
  int64_t decide_load = 0, decide_recompute = 0;  // per block, by the engine
};

// A batch of blocks being read. state[i]: 0 pending, 1 ready (data[i] holds the
// payload, in the pool's types), 2 failed (recompute it and everything after it).
struct LoadJob {
  std::vector<BlockHash> keys;
  std::vector<std::vector<uint8_t>> data;
  std::unique_ptr<std::atomic<int>[]> state;
  std::atomic<bool> cancelled{false};
};

class KvStore {
 public:
  static Result<std::unique_ptr<KvStore>> open(const KvLayout& layout, const KvStoreParams& p);
  ~KvStore();  // flushes (write-back queue drained, segment fsynced)

  const KvLayout& layout() const { return layout_; }
  bool has_dram() const { return dram_ != nullptr; }
  bool has_disk() const { return disk_ != nullptr; }

  // Which tier would serve this block (DRAM first), without reading it.
  Tier where(const BlockHash& key) const;
  bool exists(const BlockHash& key) const { return where(key) != Tier::None; }
  // L1 evicted a block: keep it in DRAM (synchronous copy; the payload is in the pool's types).
  void put_evicted(const BlockHash& key, std::span<const uint8_t> payload);
  // A block is complete: write it to SSD in the background (if not there already).
  void put_async(const BlockHash& key, std::vector<uint8_t> payload);
  bool wants_write(const BlockHash& key) const;  // disk tier on and block not on it
  // Reads the blocks in the background; notify() is called after each one finishes.
  std::shared_ptr<LoadJob> get_async(std::vector<BlockHash> keys);
  void remove(const BlockHash& key);
  // Drains the write-back queue and makes SSD contents durable.
  Status flush();

  // Estimated seconds to bring one block back from a tier (measured bandwidth).
  double load_seconds(Tier t) const;
  void count_decision(bool load, int64_t n);
  KvStoreStats stats() const;
  void set_notify(std::function<void()> f) { notify_ = std::move(f); }
  // Tells l of every block the tiers gain or lose from now on, after announcing what the SSD
  // tier holds already (blocks kept across a restart).
  void set_listener(BlockListener* l);

 private:
  KvStore(const KvLayout& l, const KvStoreParams& p) : layout_(l), params_(p) {}
  void reader_loop();
  bool pending(const BlockHash& key) const;  // its SSD write is queued or in progress
  void writer_loop();

  KvLayout layout_;
  KvStoreParams params_;
  std::unique_ptr<DramTier> dram_;
  std::unique_ptr<DiskTier> disk_;
  std::function<void()> notify_;

  mutable std::mutex mu_;
  std::condition_variable cv_read_, cv_write_, cv_idle_;
  std::deque<std::pair<std::shared_ptr<LoadJob>, size_t>> reads_;
  using Payload = std::shared_ptr<const std::vector<uint8_t>>;
  std::deque<std::pair<BlockHash, Payload>> writes_;
  // Blocks queued or being written (until disk_->put returns): the SSD tier's blocks too.
  std::unordered_map<BlockHash, Payload, BlockHashHasher> pending_;
  uint64_t write_bytes_queued_ = 0;
  int writes_in_flight_ = 0;
  bool stop_ = false;
  std::vector<std::thread> readers_;
  std::thread writer_;
  KvStoreStats st_;  // counters kept here (tier stats are read from the tiers)
};

}  // namespace larder::kvcache
