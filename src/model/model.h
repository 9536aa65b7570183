// In-memory Llama-family model: config + weight views (zero-copy into mmapped
// files where the format allows) + tokenizer.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"
#include "model/dtype.h"
#include "tokenizer/tokenizer.h"

namespace larder {

class GgufFile;

enum class RopeType { NORM, NEOX };
enum class FfnAct { SILU, GELU_TANH };  // SwiGLU (Llama) or GeGLU with tanh-approximated GELU (Gemma)  // NORM: rotate pairs (2i, 2i+1); NEOX: (i, i + d/2)

struct ModelConfig {
  std::string arch = "llama";  // llama | qwen2 | mistral | gemma3 (mistral/smollm/tinyllama load as llama)
  std::string name;
  int n_vocab = 0;
  int n_embd = 0;       // model width
  int n_ff = 0;         // FFN hidden width
  int n_layer = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;     // usually n_embd / n_head
  int n_ctx_train = 2048;
  float rms_eps = 1e-5f;
  float rope_theta = 10000.f;
  float rope_freq_scale = 1.f;         // linear RoPE scaling (positions multiplied by this)
  RopeType rope_type = RopeType::NORM;
  std::vector<float> rope_freq_factors;  // [head_dim/2] divisors of each frequency (llama3 scaling); empty = none
  bool tied_embeddings = false;
  bool qkv_bias = false;
  // Gemma-style extras (all off for Llama-family models).
  float embd_scale = 1.f;    // token embeddings multiplied by this (Gemma: sqrt(n_embd))
  float attn_scale = 0.f;    // query scale; 0 = 1/sqrt(head_dim) (Gemma 3: 1/sqrt(query_pre_attn_scalar))
  FfnAct ffn_act = FfnAct::SILU;
  bool qk_norm = false;      // per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm)
  bool post_norms = false;   // RMSNorm of the attention and FFN outputs before the residual add
  // Sliding-window (local) attention: layer l is local when swa_layers[l]; a query at logical
  // index i then sees keys i - sliding_window + 1 .. i. Local layers rotate with rope_theta_swa.
  int sliding_window = 0;
  float rope_theta_swa = 10000.f;
  std::vector<uint8_t> swa_layers;  // [n_layer]; empty = every layer global
  bool is_swa(int layer) const { return sliding_window > 0 && !swa_layers.empty() && swa_layers[layer]; }
};

// A 1-D or 2-D weight. ne[0] = columns (contiguous), ne[1] = rows.
struct Tensor {
  std::string name;
  DType type = DType::F32;
  int64_t ne[2] = {0, 1};
  const void* data = nullptr;
  size_t nbytes = 0;
  const void* packed = nullptr;  // panel-packed copy of data (kernels::pack_weights), used by matmul when set
  bool present() const { return data != nullptr; }
  int64_t cols() const { return ne[0]; }
  int64_t rows() const { return ne[1]; }
};

struct LayerWeights {
  Tensor attn_norm;                   // [n_embd] f32
  Tensor wq, wk, wv, wo;              // wq [n_embd -> n_head*hd], wk/wv [n_embd -> n_head_kv*hd], wo [n_head*hd -> n_embd]
  Tensor bq, bk, bv;                  // optional biases (qwen2), f32
  Tensor ffn_norm;                    // [n_embd] f32
  Tensor ffn_gate, ffn_up, ffn_down;  // gate/up [n_embd -> n_ff], down [n_ff -> n_embd]
  Tensor attn_q_norm, attn_k_norm;    // optional [head_dim] f32 (qk_norm)
  Tensor post_attn_norm, post_ffn_norm;  // optional [n_embd] f32 (post_norms)
  // Every tensor of the layer, optional ones included (absent ones have no data).
  std::array<const Tensor*, 16> all() const {
    return {&attn_norm, &wq, &wk, &wv, &wo, &bq, &bk, &bv, &ffn_norm, &ffn_gate, &ffn_up, &ffn_down,
            &attn_q_norm, &attn_k_norm, &post_attn_norm, &post_ffn_norm};
  }
};

struct Model {
  ModelConfig cfg;
  std::string format;       // gguf | llama2c | safetensors
  std::string path;
  Tensor tok_embd;          // [n_vocab rows x n_embd cols]
  Tensor output_norm;       // [n_embd]
  Tensor output;            // [n_vocab rows x n_embd cols]; aliases tok_embd when tied
  std::vector<LayerWeights> layers;
  std::unique_ptr<Tokenizer> tokenizer;
  std::shared_ptr<GgufFile> gguf;                // set for GGUF models
  std::vector<std::shared_ptr<void>> keepalive;  // mmaps and owned buffers backing the tensors
  size_t packed_bytes = 0;  // weights moved / repacked at load (pack_model_weights)
  size_t panel_bytes = 0;   // of which repacked into the integer kernels' panels (the rest copied as is)
  size_t weight_bytes() const;
  // Content fingerprint (config + sampled tensor bytes), hex: the identity of KV blocks.
  std::string fingerprint() const;
};

// Checks every tensor against the config (shapes, types, sizes); a clear error otherwise.
Status validate_model(const Model& m);

// Opens a GGUF file, a llama2.c checkpoint (.bin; tokenizer.bin looked up beside it unless
// tokenizer_path is given) or a Hugging Face folder (config.json + *.safetensors + tokenizer.json).
// repack: pack_model_weights after loading (the CLI's --no-repack turns it off).
// ffn_on_disk: the FFN's up and down projections are served by src/offload (streamed from SSD):
// they are neither packed nor copied, and stay untouched in the mapped file.
Result<std::unique_ptr<Model>> load_model(const std::string& path, const std::string& tokenizer_path = "",
                                          bool repack = true, bool ffn_on_disk = false);

// Moves the matmul weights into one huge-page-backed buffer when the AVX-512 path is active:
// q8_0/q4_0 repacked into panels for the integer kernels (kernels::pack_weights, Tensor::packed),
// other matrices of the mapped file copied as they are (Tensor::data then points at the copy).
// The file's pages of those tensors are given back to the kernel as each slab is done, so
// resident memory stays one copy (embedding rows are faulted in again as they are looked up).
// Returns the bytes moved.
size_t pack_model_weights(Model& m, bool skip_ffn_up_down = false);

// Format-specific loaders (used by load_model).
Result<std::unique_ptr<Model>> load_model_gguf(const std::string& path);
Result<std::unique_ptr<Model>> load_model_llama2c(const std::string& path, const std::string& tokenizer_path);
Result<std::unique_ptr<Model>> load_model_hf(const std::string& dir);

// llama3-style RoPE frequency factors from HF rope_scaling parameters.
std::vector<float> llama3_rope_factors(int head_dim, float theta, float factor, float low_freq_factor,
                                       float high_freq_factor, int original_max_pos);

}  // namespace larder
