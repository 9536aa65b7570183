// Inference context: a paged KV pool plus preallocated activation buffers.
//
// decode_batch() runs one forward pass over several sequences at once (continuous
// batching): each brings its new tokens, their positions, the block table that maps
// its logical KV indices to blocks of the pool, and optionally a visibility mask.
// decode() is the single-sequence convenience used by the CLI: it owns sequence 0
// with an identity block table.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kernels/w8a8.h"
#include "model/model.h"
#include "offload/offload.h"

namespace larder {

struct ContextParams {
  int n_ctx = 0;          // KV pool size in tokens (0 = the model's training context, capped at 4096)
  int n_threads = 0;      // 0 = all cores
  int n_batch = 512;      // max tokens per forward pass (decode() chunks longer inputs)
  int block_size = 16;    // tokens per KV block
  int max_seq_len = 0;    // longest sequence attention must handle (0 = n_ctx)
  bool w8a8 = false;      // int8 prefill with shadow outliers (weights repacked to int8 at create)
  // KV cache element types (llama.cpp's --cache-type-k/-v): F32, F16, BF16 or Q8_0 (blocks of 32
  // along each head's row: head_dim must be a multiple of 32). f16 halves the cache and the bytes
  // attention streams per token at no measurable accuracy cost (see docs/ARCHITECTURE.md).
  DType type_k = DType::F16;
  DType type_v = DType::F16;
  // Sparse / SSD-streamed FFN (src/offload): every layer's FFN goes through it (the gate product
  // stays here). nullptr = the dense FFN.
  std::shared_ptr<offload::SparseFfn> ffn;
};

// Parses a KV cache type name (f32, f16, bf16, q8_0); the error lists the valid ones.
Result<DType> parse_kv_type(const std::string& s);
// "f16" when K and V share a type, else "q8_0/f16" (K/V): names cache layouts in block
// identities and the tiers' layout fingerprints.
std::string kv_types_name(DType k, DType v);

// Which logical KV entries each new token may attend to. Empty = causal (token i of a
// sequence sees entries [0, n_kv + i]). Otherwise one list of [begin, end) ranges per
// token (parallel context encoding and tree verification need non-causal shapes).
struct AttnMask {
  std::vector<std::vector<std::pair<int, int>>> visible;
};

// APE's attention (Yang et al., ICLR'25) of tokens that follow documents encoded in parallel: the
// visible entries in [begin, end) (the documents) are scored with temperature t, their group's
// log-sum-exp is weighed by s*t, and merged with the other visible entries' attention by
// log-sum-exp. t = s = 1 is plain attention.
struct SegAttn {
  int begin = 0, end = 0;
  float t = 1.f, s = 1.f;
};

struct SeqBatch {
  std::span<const int32_t> tokens;       // new tokens
  std::span<const int32_t> positions;    // RoPE positions; empty = n_kv, n_kv+1, ...
  std::span<const int32_t> block_table;  // pool blocks holding logical KV [0, n_kv + tokens)
  int n_kv = 0;                          // KV entries already stored for this sequence
  const AttnMask* mask = nullptr;        // nullptr = causal
  float* logits = nullptr;               // [tokens][vocab] if all_logits, else [vocab] for the last token
  bool all_logits = false;
  // Logical KV entry each new token's K/V goes to (distinct); empty = n_kv, n_kv+1, ... With it, a
  // token without a mask sees entries [0, kv_index[i]] (recomputing scattered tokens in place).
  std::span<const int32_t> kv_index;
  const SegAttn* seg = nullptr;          // APE attention for these tokens (nullptr = none)
  // += the attention probability each logical entry gets from these tokens, summed over heads
  // and the layers run ([entries] floats, at least the largest visible entry + 1). At most one
  // sequence of a batch.
  float* attn_mass = nullptr;
};

// Runs only layers [begin, end) (end -1 = all): x_in (when set) is the residual stream entering
// layer begin ([tokens][n_embd], instead of the embeddings), x_out receives it after layer end-1.
// Logits are computed only when the last layer runs.
struct LayerRange {
  int begin = 0, end = -1;
  const float* x_in = nullptr;
  float* x_out = nullptr;
};

class Context {
 public:
  static Result<std::unique_ptr<Context>> create(const Model& model, const ContextParams& p);

  // Multi-sequence forward pass. Writes each token's K/V into its slot, then attends.
  // The total number of tokens must not exceed n_batch().
  Status decode_batch(std::span<const SeqBatch> batch, const LayerRange* layers = nullptr);

  // Single sequence (sequence 0, identity block table): appends tokens at n_past and
  // runs the forward pass, chunked by n_batch. all_logits receives [tokens][n_vocab];
  // the last token's logits are always available from logits().
  // mask: visibility of the new tokens (logical indices), for inputs of at most n_batch() tokens.
  Status decode(std::span<const int32_t> tokens, float* all_logits = nullptr, const AttnMask* mask = nullptr);
  const float* logits() const { return last_logits_.data(); }
  int n_past() const { return n_past_; }
  // Forgets cached positions >= n (n <= n_past).
  void truncate(int n);
  void reset() { truncate(0); }

  // Copies the K/V (all layers) of logical entry `from` of a sequence to entry `to` (speculative
  // decoding keeps the accepted path of a draft tree: its nodes move to consecutive entries).
  void move_kv(std::span<const int32_t> table, int from, int to);
  std::span<const int32_t> identity_table() const { return identity_table_; }
  // Copies the K/V (all layers) of n logical entries from one sequence's table to another's.
  void copy_kv(std::span<const int32_t> src_table, int src0, std::span<const int32_t> dst_table, int dst0, int n);
  // Re-rotates the stored keys of logical entries [begin, begin + n) from position p to p + delta
  // (RoPE composes: R(p + d) = R(d) R(p)), every layer; documents moved to another place.
  void rotate_k(std::span<const int32_t> table, int begin, int n, int delta);
  // One entry's K row of a layer (all KV heads, post-RoPE) as floats: [n_head_kv * head_dim].
  void read_k(std::span<const int32_t> table, int entry, int layer, float* out) const;
  // Copies one pool block's K/V (all layers) to another (copy-on-write).
  void copy_block(int32_t src, int32_t dst);
  // A block's K/V as one payload for lower tiers: per layer, K [block_size] rows then V
  // [block_size] rows, each row in the cache's type (k_row_bytes() / v_row_bytes() long).
  // block_bytes() long.
  size_t block_bytes() const;
  void read_block(int32_t b, uint8_t* out) const;
  void write_block(int32_t b, const uint8_t* in);

  // The pool as raw memory, for zero-copy KV transfer between instances (src/transfer registers
  // it): K of (layer l, slot s) is at k_base + (l * n_slots + s) * k_row_bytes(), V likewise; a
  // slot is block * block_size + offset. Never reallocated after create().
  struct PoolView {
    uint8_t* k_base = nullptr;
    uint8_t* v_base = nullptr;
    size_t k_bytes = 0, v_bytes = 0, k_row = 0, v_row = 0;
    int n_layer = 0, n_slots = 0, block_size = 0;
  };
  PoolView pool_view();
  // Called on the calling thread of decode_batch() right after each layer's K/V rows of the
  // batch are in the pool (before attention reads them): lets a prefill instance send a
  // layer's KV while the next layers compute. Empty = none.
  void set_layer_hook(std::function<void(int layer)> f) { layer_hook_ = std::move(f); }
  // Called with each layer's FFN gate pre-activations ([n] rows of n_ff floats, ld apart) on the
  // dense path (calibrate-sparsity). Empty = none.
  void set_gate_hook(std::function<void(int layer, const float* gate, int n, int64_t ld)> f) { gate_hook_ = std::move(f); }
  offload::SparseFfn* ffn() const { return ffn_.get(); }

  int n_vocab() const { return model_.cfg.n_vocab; }
  int n_ctx() const { return n_ctx_; }
  int n_batch() const { return n_batch_; }
  int n_blocks() const { return n_blocks_; }
  int block_size() const { return block_size_; }
  int n_threads() const { return pool_.size(); }
  const Model& model() const { return model_; }
  size_t kv_bytes() const { return k_cache_.size() + v_cache_.size(); }
  DType type_k() const { return type_k_; }
  DType type_v() const { return type_v_; }
  size_t k_row_bytes() const { return k_row_; }  // one slot of one layer, all KV heads
  size_t v_row_bytes() const { return v_row_; }
  const kernels::W8A8Stats& w8a8_stats() const { return w8a8_stats_; }

 private:
  Context(const Model& m, const ContextParams& p, int n_ctx, int n_threads, int n_batch);
  Status validate(std::span<const SeqBatch> batch, int* n_total) const;
  void forward(std::span<const SeqBatch> batch, int n, int l0, int l1, const float* x_in, float* x_out);
  // RoPE of one token's heads from src into dst (may alias); local = the sliding-window layers' base.
  void rope_row(const float* src, float* dst, int t, int n_heads, bool local) const;
  void add_rmsnorm(int n, const float* w);
  void post_norm(int n, const float* w);
  void attention(int layer, std::span<const SeqBatch> batch);
  void masked_tile(int layer, const SeqBatch& s, int t0, int lt0, int ntok, int h, int tid);
  int entry_of(const SeqBatch& s, int i) const { return s.kv_index.empty() ? s.n_kv + i : s.kv_index[i]; }
  // One way into every weight product: picks W8A8, GEMM or dot-product kernels.
  void mm(const Tensor& W, const kernels::W8Tensor* w8, const float* x, int n, float* y, int64_t ldy);
  size_t slot(const SeqBatch& s, int kv_index) const {
    return static_cast<size_t>(s.block_table[kv_index / block_size_]) * block_size_ + kv_index % block_size_;
  }

  const Model& model_;
  int n_ctx_, n_batch_, block_size_, n_blocks_, n_slots_, max_seq_len_;
  int n_past_ = 0;
  ThreadPool pool_;
  kernels::MatmulScratch scratch_;
  std::vector<float> inv_freq_;   // [head_dim/2] RoPE inverse frequencies (scaling applied)
  std::vector<float> inv_freq_swa_;  // [head_dim/2] the same for local layers (empty: none)
  DType type_k_, type_v_;
  size_t k_row_ = 0, v_row_ = 0;    // bytes of one slot's row (all KV heads) per layer
  size_t k_head_ = 0, v_head_ = 0;  // bytes of one head's part of that row
  std::vector<uint8_t> k_cache_;  // [n_layer][n_slots = n_blocks*block_size][k_row_ bytes]
  std::vector<uint8_t> v_cache_;  // [n_layer][n_slots][v_row_ bytes]
  std::vector<int32_t> identity_table_;  // blocks 0..n_blocks-1, for decode()
  // Activations, [n_batch][...] f32.
  std::vector<float> x_, xb_, q_, att_, hb_;
  std::vector<float> cos_, sin_;  // [n_batch][head_dim/2]
  std::vector<float> cos_swa_, sin_swa_;  // [n_batch][head_dim/2] local layers' (empty: none)
  static constexpr int kQBlock = 12;  // queries per attention tile
  std::vector<float> scores_;     // [n_threads][kQBlock][max_seq_len]
  std::vector<int> pos_;          // [n_batch] positions of the batch's tokens
  std::vector<int> tok_seq_;      // [n_batch] index of the sequence each token belongs to
  std::vector<int> seq_off_;      // [batch size + 1] first token of each sequence
  std::vector<std::pair<int, int>> tiles_;  // attention tiles of the batch: (sequence, first local token)
  struct MaskScratch {
    std::vector<std::vector<int>> idx;  // [kQBlock] visible entries of each row, sorted
    std::vector<float> g;               // [max_seq_len] one row's probabilities in virtual order
    std::vector<uint8_t> v;             // [block_size][one head's V bytes] gathered rows
  };
  std::vector<MaskScratch> mask_scratch_;  // [n_threads] scratch for masked attention
  std::vector<std::vector<float>> mass_;   // [n_threads][max_seq_len] attention mass (SeqBatch::attn_mass)
  std::vector<float> out_rows_;   // [n_batch][n_vocab] logits staging when rows are gathered
  std::vector<float> last_logits_;  // [n_vocab]
  struct LayerW8 {
    std::unique_ptr<kernels::W8Tensor> wq, wk, wv, wo, gate, up, down;
  };
  std::vector<LayerW8> w8_;  // empty unless w8a8
  std::function<void(int)> layer_hook_;
  std::function<void(int, const float*, int, int64_t)> gate_hook_;
  std::shared_ptr<offload::SparseFfn> ffn_;
  static constexpr int kPrefetchMaxTokens = 4;  // read ahead for decode-sized passes only (prefill needs all)
  std::vector<float> pred_in_, pred_gate_;      // [kPrefetchMaxTokens][n_embd] / [..][n_ff] next layer's predicted gate
  Status ffn_status_;  // the first error of the sparse FFN in this forward pass
  kernels::W8A8Scratch w8_scratch_;
  kernels::W8A8Stats w8a8_stats_;
};

}  // namespace larder
