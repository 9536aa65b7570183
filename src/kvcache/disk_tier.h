// SSD tier of the KV store: blocks keyed by their prefix-chain hash, kept in a
// directory of append-only segment files.
//
// Record = header {magic, version, key (128 bit), layout fingerprint, payload length,
// payload checksum (XXH3-64), header checksum} + payload. A record becomes visible
// only after it has been written completely (two-phase put: write, then index), and on
// open the index is rebuilt by scanning the segment headers: a torn or corrupt header
// (bad length, bad checksum, truncated tail after a crash) ends that segment's scan and
// is counted; a payload's checksum is verified on every read, and a corrupt one is a
// miss (counted, dropped from the index), never served. A block written under another
// layout (model, dtype, shape) is a miss.
// Capacity is enforced by dropping whole oldest segments (log-structured: the oldest
// writes go first; promotion of hot blocks is the tier manager's job).
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <memory>
#include <vector>

#include "core/result.h"
#include "kvcache/block_manager.h"

namespace larder::kvcache {

struct DiskTierStats {
  int64_t blocks = 0, bytes = 0, segments = 0;
  int64_t puts = 0, hits = 0, misses = 0, evicted_blocks = 0;
  int64_t corrupt_records = 0;  // found at open or on read
  int64_t write_errors = 0;
  bool disabled = false;        // the tier turned itself off (disk full / unwritable) until its next retry
};

class DiskTier {
 public:
  // Opens (creating if needed) the directory; rebuilds the index from the segments.
  static Result<std::unique_ptr<DiskTier>> open(const std::string& dir, uint64_t capacity_bytes,
                                                uint64_t layout_fingerprint, uint64_t segment_bytes = 64 << 20);
  ~DiskTier();

  // Appends a block. Errors (disk full, I/O error) disable the tier for retry_after() and are
  // counted; the caller keeps serving without it. The first put after that tries again (space
  // may have been freed) and re-enables the tier if it succeeds.
  Status put(const BlockHash& key, std::span<const uint8_t> payload);
  // Reads a block into out (resized). false = miss (absent, other layout, corrupt).
  bool get(const BlockHash& key, std::vector<uint8_t>& out);
  bool exists(const BlockHash& key) const;
  std::vector<BlockHash> keys() const;  // every block it holds
  void set_listener(BlockListener* l);
  void remove(const BlockHash& key);
  // Makes everything written so far durable (fsync of the open segment).
  Status flush();
  DiskTierStats stats() const;
  // True while a write error's back-off lasts (a put then fails without touching the disk).
  bool disabled() const {
    std::lock_guard<std::mutex> lk(mu_);
    return st_.disabled && std::chrono::steady_clock::now() < retry_at_;
  }
  void set_retry_after(std::chrono::milliseconds d) {
    std::lock_guard<std::mutex> lk(mu_);
    retry_after_ = d;
  }
  // Walks every record of every segment and checks its checksums.
  Result<DiskTierStats> verify() const;
  // The same walk over a directory without opening it as a tier (no index, nothing
  // changed): records (blocks), bytes, segments, corrupt/torn records; with
  // check_payloads the payload checksums too. layouts: records per layout fingerprint.
  static Result<DiskTierStats> inspect(const std::string& dir, bool check_payloads,
                                       std::map<uint64_t, int64_t>* layouts = nullptr);
  // Deletes all segments.
  Status clear();

 private:
  struct Loc {
    uint32_t segment;
    uint64_t offset;  // of the payload
    uint32_t length;
    uint64_t checksum;
  };
  DiskTier(std::string dir, uint64_t cap, uint64_t layout, uint64_t seg_bytes)
      : dir_(std::move(dir)), capacity_(cap), layout_(layout), segment_bytes_(seg_bytes) {}
  Status scan();
  Status roll_segment();
  Status append(const BlockHash& key, std::span<const uint8_t> payload, uint16_t flags);
  void evict_to(uint64_t bytes);
  std::string seg_path(uint32_t id) const;
  static std::string segment_name(uint32_t id);  // "/seg-NNNNNNNN.lkv"
  // Segment ids present in a directory, ascending.
  static Result<std::vector<uint32_t>> segment_ids(const std::string& dir);

  std::string dir_;
  uint64_t capacity_, layout_, segment_bytes_;
  mutable std::mutex mu_;
  BlockListener* listener_ = nullptr;
  std::unordered_map<BlockHash, Loc, BlockHashHasher> index_;
  std::map<uint32_t, uint64_t> segments_;  // id -> bytes
  uint32_t cur_seg_ = 0;
  int cur_fd_ = -1;
  uint64_t cur_size_ = 0;
  mutable DiskTierStats st_;
  std::chrono::milliseconds retry_after_{30000};
  std::chrono::steady_clock::time_point retry_at_{};
  Status fail_write(Error e);
};

}  // namespace larder::kvcache
