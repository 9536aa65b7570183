// Inference context: one sequence's KV cache plus preallocated activation buffers.
// decode() takes a batch of tokens; prefill runs as matrix-matrix work.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/result.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kernels/w8a8.h"
#include "model/model.h"

namespace larder {

struct ContextParams {
  int n_ctx = 0;      // 0 = the model's training context, capped at 4096
  int n_threads = 0;  // 0 = all cores
  int n_batch = 512;  // max tokens per forward pass (longer inputs are chunked)
  bool w8a8 = false;  // int8 prefill with shadow outliers (weights repacked to int8 at create)
};

class Context {
 public:
  static Result<std::unique_ptr<Context>> create(const Model& model, const ContextParams& p);

  // Appends tokens at positions n_past.. and runs the forward pass. If all_logits is
  // non-null it receives [tokens.size()][n_vocab] logits; the last token's logits are
  // always available from logits() afterwards.
  Status decode(std::span<const int32_t> tokens, float* all_logits = nullptr);

  const float* logits() const { return last_logits_.data(); }
  int n_vocab() const { return model_.cfg.n_vocab; }
  int n_past() const { return n_past_; }
  int n_ctx() const { return n_ctx_; }
  int n_threads() const { return pool_.size(); }
  // Forgets cached positions >= n (n <= n_past).
  void truncate(int n);
  void reset() { truncate(0); }
  const Model& model() const { return model_; }
  const kernels::W8A8Stats& w8a8_stats() const { return w8a8_stats_; }
  size_t kv_bytes() const { return (k_cache_.size() + v_cache_.size()) * sizeof(float); }

 private:
  Context(const Model& m, int n_ctx, int n_threads, int n_batch, bool w8a8);
  void forward(const int32_t* tokens, int n, float* out_logits);
  void rope(float* x, int n_tok, int n_heads, const int* pos);
  void attention(int layer, int n, const int* pos);
  // One way into every weight product: picks W8A8, GEMM or dot-product kernels.
  void mm(const Tensor& W, const kernels::W8Tensor* w8, const float* x, int n, float* y, int64_t ldy);

  const Model& model_;
  int n_ctx_, n_batch_;
  int n_past_ = 0;
  ThreadPool pool_;
  kernels::MatmulScratch scratch_;
  std::vector<float> inv_freq_;   // [head_dim/2] RoPE inverse frequencies (scaling applied)
  std::vector<float> k_cache_;    // [n_layer][n_ctx][n_kv*hd] f32
  std::vector<float> v_cache_;    // [n_layer][n_ctx][n_kv*hd] f32
  // Activations, [n_batch][...] f32.
  std::vector<float> x_, xb_, q_, k_, v_, att_, hb_, hb2_;
  std::vector<float> cos_, sin_;  // [n_batch][head_dim/2]
  static constexpr int kQBlock = 12;  // queries per attention tile
  std::vector<float> scores_;     // [n_threads][kQBlock][n_ctx]
  std::vector<int> pos_;          // [n_batch]
  std::vector<float> last_logits_;  // [n_vocab]
  struct LayerW8 {
    std::unique_ptr<kernels::W8Tensor> wq, wk, wv, wo, gate, up, down;
  };
  std::vector<LayerW8> w8_;  // empty unless w8a8
  kernels::W8A8Scratch w8_scratch_;
  kernels::W8A8Stats w8a8_stats_;
};

}  // namespace larder
