// The conductor's global KV index: which instance holds which block, in which medium
// (L1 pool, DRAM tier, SSD tier), built from the instances' KV events (src/kvevents).
//
// An instance's entries are exactly what its events say it holds: BlockStored adds,
// BlockRemoved drops, AllBlocksCleared (also the start of a snapshot) drops all of the
// instance's entries. The subscriber delivers each instance's batches in sequence order
// (gaps replayed, restarts resynced); clear() purges an instance that left.
//
// Queries walk a prompt's chain of block names and report, for each instance, how many
// leading blocks it holds and where (conductor::Holding): the input of the routing policy.
#pragma once
#include <cstdint>
#include <map>
#include <shared_mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "conductor/policy.h"
#include "kvcache/block_manager.h"

namespace larder::kvevents {
struct EventBatch;
}

namespace larder::conductor {

// Medium bits of one entry.
enum : uint8_t { kL1 = 1, kDram = 2, kDisk = 4 };

// A KV-event medium name to its bit (kvevents::medium_of: nil/"GPU"/"L1" -> L1, "CPU"/"DRAM"
// -> DRAM, "DISK"/"SSD"/"STORAGE" -> SSD, case-insensitive; anything else counts as L1).
uint8_t medium_bit(const std::string& medium);

class KvIndex {
 public:
  void apply(const std::string& instance, const kvevents::EventBatch& batch);
  void stored(const std::string& instance, std::span<const kvcache::BlockHash> hashes, uint8_t medium);
  void removed(const std::string& instance, std::span<const kvcache::BlockHash> hashes, uint8_t medium);
  // Drops every entry of the instance and forgets it (cleared, resync, or it left the cluster).
  void clear(const std::string& instance);

  // holdings[i] for instances[i] along the chain `names` (block j's name is names[j]).
  std::vector<Holding> holdings(std::span<const kvcache::BlockHash> names,
                                const std::vector<std::string>& instances) const;

  struct Counts {
    int64_t l1 = 0, dram = 0, disk = 0;
  };
  std::map<std::string, Counts> counts() const;
  size_t n_blocks() const;  // distinct block names held anywhere
  // (name, medium bits) of one instance's entries, sorted: for tests.
  std::vector<std::pair<kvcache::BlockHash, uint8_t>> entries(const std::string& instance) const;

 private:
  int slot(const std::string& instance);  // under the write lock
  void set_bits(int inst, const kvcache::BlockHash& h, uint8_t bits, bool on);

  mutable std::shared_mutex mu_;
  std::unordered_map<std::string, int> slots_;
  std::vector<std::string> names_;  // slot -> instance id
  std::vector<Counts> counts_;      // per slot
  std::vector<int> free_slots_;     // of instances cleared (left): reused
  // name -> (slot, medium bits) of every instance holding it
  std::unordered_map<kvcache::BlockHash, std::vector<std::pair<int, uint8_t>>, kvcache::BlockHashHasher> map_;
};

}  // namespace larder::conductor
