// Random-weight GGUF models in the shapes of real models (for throughput work and
// reference tests). Files load in other GGUF readers too.
#pragma once
#include <cstdint>
#include <string>

#include "core/result.h"
#include "model/dtype.h"

namespace larder {

struct SynthShape {
  std::string name = "custom";
  std::string arch = "llama";  // llama | qwen2 (qwen2: QKV bias, NeoX RoPE)
  int n_embd = 128, n_ff = 320, n_layer = 2, n_head = 8, n_head_kv = 8, n_vocab = 512, n_ctx = 256;
  bool tied = false;
  bool llama3_rope = false;  // write rope_freqs.weight (llama3 scaling)
  float rope_theta = 10000.f;
  float rms_eps = 1e-5f;
};

// Known names: stories15M, stories42M, stories110M, llama-3.2-1b, qwen2.5-0.5b.
Result<SynthShape> synth_shape(const std::string& name);

struct SynthOptions {
  DType dtype = DType::F32;     // type of 2-D weights (norms/biases stay f32)
  uint64_t seed = 42;
  float scale = 1.0f;           // multiplies the init std (larger = more peaked outputs)
  std::string vocab_from;       // copy tokenizer.* metadata from this GGUF (vocab size must match)
  bool progress = true;
};

Status synth_model(const SynthShape& shape, const SynthOptions& opt, const std::string& out_path);

}  // namespace larder
