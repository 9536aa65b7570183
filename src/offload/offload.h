// FFN weights streamed from SSD by active neurons ("LLM in a flash", Alizadeh et al., ACL'24) with
// training-free activation sparsity for gated FFNs (CATS, Lee et al. 2024): models bigger than DRAM.
//
// A gated FFN computes y = sum_j act(g_j) * u_j * down[:, j] with g = gate x and u = up x. Neuron j
// is *active* for a token when |act(g_j)| exceeds its layer's threshold (calibrated per layer for a
// target sparsity). The gate stays resident, so the active set is known exactly before any of its
// up row or down column is read: no predictor, no predictor error. Up row j and down column j are
// one record on disk (down transposed and re-quantized, so a neuron is one contiguous read); the
// records of neurons active in the last `window` tokens stay in a preallocated per-layer DRAM matrix
// (insert at the end, delete by moving the last row into the hole); only newly active ones are read.
//
// Threshold 0 is the dense model through the same code (every neuron active).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"
#include "core/thread_pool.h"
#include "model/dtype.h"

namespace larder {
struct Model;
}

namespace larder::offload {

// Every layer has a gated FFN (gate, up, down) of types the kernels handle.
Status check_gated_ffn(const Model& m);

// ---- Calibrated thresholds (larder calibrate-sparsity) ----------------------------------------
struct SparsityTable {
  std::string model;                   // Model::fingerprint() of the model calibrated
  std::string activation;              // silu | gelu_tanh
  int n_layer = 0, n_ff = 0;
  int64_t tokens = 0;                  // calibration tokens
  std::string source;                  // calibration text (file name)
  std::vector<double> levels;          // target sparsities, ascending, in (0, 1)
  std::vector<std::vector<float>> thr; // [level][layer] thresholds on |act(gate)|
};
Result<SparsityTable> load_sparsity(const std::string& path);
Status save_sparsity(const SparsityTable& t, const std::string& path);
// Per-layer thresholds for a target sparsity: 0 -> all zero (dense); a calibrated level exactly;
// between two levels linearly interpolated; outside the calibrated range an error.
Result<std::vector<float>> thresholds_for(const SparsityTable& t, double sparsity);

// Collects |act(gate)| samples per layer during dense forward passes (Context's FFN hook) and turns
// them into thresholds at the given levels (the level-quantile of each layer's samples).
class SparsityCalibrator {
 public:
  SparsityCalibrator(int n_layer, int n_ff, bool gelu, int64_t max_samples_per_layer = 4'000'000);
  // gate: [n] rows of n_ff pre-activations of layer `layer`, ld floats apart.
  void add(int layer, const float* gate, int n, int64_t ld);
  SparsityTable finish(const std::vector<double>& levels);
  int64_t tokens(int layer) const { return tokens_[layer]; }

 private:
  int n_layer_, n_ff_;
  bool gelu_;
  int64_t max_;
  std::vector<std::vector<float>> samples_;  // [layer] |act| values (strided when full)
  std::vector<int64_t> tokens_, seen_;
  uint64_t rng_ = 0x9E3779B97F4A7C15ull;
};

// ---- On-disk layout (larder offload-prepare) --------------------------------------------------
// DIR/ffn.bin: a 4 KiB header, per (layer, neuron) XXH3-64 checksums, then per layer n_ff records
// of record_bytes (a multiple of 512: O_DIRECT reads straight into the cache's slots):
//   [up row j: n_embd values in up's type][down column j: n_embd values in down_type][zero pad]
struct LayerLayout {
  DType up_type = DType::F32, down_type = DType::F32;
  size_t up_bytes = 0, down_bytes = 0, record_bytes = 0;
  uint64_t offset = 0;   // file offset of neuron 0's record
};
struct LayoutInfo {
  std::string model;     // fingerprint of the model it was prepared from
  int n_layer = 0, n_embd = 0, n_ff = 0;
  std::vector<LayerLayout> layers;
  uint64_t index_offset = 0, file_bytes = 0;
  std::vector<uint64_t> sums;  // [layer * n_ff + neuron] XXH3-64 of each record
};
// down_type: "auto" = down's own type for f32/f16/bf16/q8_0, else q8_0 (a 4-6 bit column
// re-quantized to 4-6 bits loses too much); or an explicit type name (f32, f16, q8_0, q4_0, ...).
Status check_down_type(const Model& m, const std::string& name);
// Writes DIR/ffn.bin (to a temporary name, then renamed). progress(done_layers, n_layer) may be empty.
Status prepare(const Model& m, const std::string& dir, const std::string& down_type,
               void (*progress)(int, int) = nullptr);
// Reads and checks the header and index of DIR/ffn.bin against the model.
Result<LayoutInfo> read_layout(const Model& m, const std::string& dir);

// ---- Runtime ----------------------------------------------------------------------------------
struct Params {
  std::string dir;            // prepared layout; empty = records built in memory (all resident)
  std::string down_type = "auto";  // for the in-memory records
  int64_t dram_budget = 0;    // bytes of weights in DRAM, resident ones included (0 = all records cached)
  std::vector<float> thresholds;  // [n_layer]; empty = dense
  int window = 5;             // keep neurons active in the last `window` steps
  bool static_cache = false;  // naive baseline: the first neurons pinned, the rest read every step
  int io_threads = 16;        // parallel reads
  bool direct = true;         // O_DIRECT (falls back to buffered reads + dropping the pages)
  // Read ahead the neurons a prediction of the next layer's gate says will be active (Context
  // computes it from the residual stream before this layer's FFN): the reads overlap this layer's
  // compute and the next one's attention. Only what is read changes, never what is computed. Off by
  // default: on this VM's disk it saved reads but not time (docs/BENCHMARKS.md).
  bool prefetch = false;
};

struct Stats {
  int64_t steps = 0;           // forward passes (a decode step = one token)
  int64_t tokens = 0;          // token rows through the FFN, summed over passes
  double io_wait_s = 0;        // waiting for reads after the cached neurons' compute
  double cache_s = 0;          // active sets, eviction, slot moves
  double compute_s = 0;        // gate activation, up dots, down accumulation
  int64_t bytes_read = 0, reads = 0;
  int64_t bytes_needed = 0;    // records of the missing neurons (reads span small gaps: bytes_read >= this)
  int64_t active = 0;          // sum over (layer, token) of active neurons
  int64_t neurons = 0;         // sum over (layer, token) of n_ff
  int64_t hits = 0, misses = 0;  // per layer and step: union-active neurons found cached / read
  int64_t prefetched = 0, prefetch_used = 0;  // neurons read ahead, and of those active when their layer ran
  int64_t prefetch_bytes = 0, prefetch_reads = 0;
  double prefetch_wait_s = 0;  // part of io_wait_s spent waiting for read-ahead to land
};

class SparseFfn {
 public:
  static Result<std::unique_ptr<SparseFfn>> open(const Model& m, const Params& p);
  ~SparseFfn();

  // x: [n][n_embd] the FFN's normed input; on return its output (before any post-norm).
  // gate: [n][n_ff] gate pre-activations; used as scratch.
  Status forward(int layer, float* x, float* gate, int n, ThreadPool& pool);

  // Reads ahead for layer l the neurons whose predicted gate pre-activations ([n][n_ff]) pass its
  // threshold and are not cached (no-op unless offloading with prefetch on).
  Status prefetch(int l, const float* gate, int n);
  bool prefetching() const { return prefetch_ && !in_memory_ && !static_; }
  const Stats& stats() const { return stats_; }
  void reset_stats() { stats_ = Stats{}; }
  // Weights this keeps in DRAM (cache matrices and read scratch), and the resident rest of the model.
  int64_t cache_bytes() const { return cache_bytes_; }
  int64_t resident_bytes() const { return resident_bytes_; }
  int capacity() const { return capacity_; }  // neurons per layer the cache holds
  bool direct_io() const { return direct_; }
  const std::vector<float>& thresholds() const { return thr_; }
  std::string describe() const;
  // Names what the FFN computes (thresholds, down columns' types): KV computed with it is only
  // valid for the same identity ("" never: dense through re-quantized down columns differs too).
  std::string identity() const;

 private:
  SparseFfn() = default;
  struct Layer;
  struct IoPool;
  void evict(Layer& L, std::vector<int32_t>& holes);
  bool verify(int layer, int32_t neuron, const uint8_t* rec) const;

  const Model* model_ = nullptr;
  int n_layer_ = 0, E_ = 0, F_ = 0;
  bool gelu_ = false;
  size_t max_rec_ = 0;
  std::vector<float> thr_;
  int window_ = 5;
  bool static_ = false, direct_ = false, in_memory_ = false, prefetch_ = false;
  int fd_ = -1, fd_buffered_ = -1;
  std::vector<uint64_t> sums_;  // [layer][neuron] XXH3-64 of each record
  int capacity_ = 0;
  int64_t cache_bytes_ = 0, resident_bytes_ = 0;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::unique_ptr<IoPool> io_;
  uint8_t* scratch_ = nullptr;  // reads spanning gaps, and records no slot holds; aligned
  size_t scratch_cap_ = 0;
  uint8_t* overflow_ = nullptr;  // [n_ff] records when cache and scratch are full (allocated on need)
  int64_t step_ = 0;
  // per-forward scratch
  std::vector<uint8_t> xq_;                  // [n][quantized row] activations for the up dots
  std::vector<uint8_t> mask_;                // [n][n_ff] active flags
  std::vector<uint8_t> pred_;                // [n_ff] predicted active (prefetch)
  std::vector<int32_t> act_list_;            // union-active neurons
  std::vector<const uint8_t*> rec_ptr_;      // [active] record of each
  std::vector<float> h_;                     // [n][active] act(g) * u (0 where inactive)
  Stats stats_;
};

}  // namespace larder::offload
