#include "model/model.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>

#include <cmath>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>

#include "core/mmap_file.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/gguf.h"

namespace larder {

static Result<std::unique_ptr<Model>> load_model_any(const std::string& path, const std::string& tokenizer_path);

size_t Model::weight_bytes() const {
  size_t n = tok_embd.nbytes + output_norm.nbytes + (output.data != tok_embd.data ? output.nbytes : 0);
  for (const auto& l : layers)
    for (const Tensor* t : l.all()) n += t->nbytes;
  return n;
}

std::string Model::fingerprint() const {
  // Weights decide what a KV block means: hash the config and a sample of every tensor
  // (first and last 4 KiB), so a re-synthesized or re-quantized file at the same path
  // never reuses another model's blocks, while hashing stays cheap for large files.
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  char cfgs[256];
  int n = std::snprintf(cfgs, sizeof cfgs, "%s|%d|%d|%d|%d|%d|%d|%d|%g|%g|%g|%g|%d|%g", cfg.arch.c_str(), cfg.n_vocab,
                        cfg.n_embd, cfg.n_ff, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.rope_theta,
                        cfg.rms_eps, cfg.embd_scale, cfg.attn_scale, cfg.sliding_window, cfg.rope_theta_swa);
  XXH3_64bits_update(st, cfgs, static_cast<size_t>(n));
  auto add = [&](const Tensor& t) {
    if (!t.data) return;
    const auto* p = static_cast<const uint8_t*>(t.data);
    const size_t k = std::min<size_t>(t.nbytes, 4096);
    XXH3_64bits_update(st, &t.type, sizeof t.type);
    XXH3_64bits_update(st, p, k);
    XXH3_64bits_update(st, p + t.nbytes - k, k);
  };
  add(tok_embd);
  add(output_norm);
  add(output);
  for (const auto& l : layers)
    for (const Tensor* t : l.all()) add(*t);
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  char out[32];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

namespace {
Status check_tensor(const Tensor& t, const char* what, int layer, int64_t cols, int64_t rows, bool must_f32) {
  char name[96];
  if (layer >= 0) std::snprintf(name, sizeof name, "layer %d %s", layer, what);
  else std::snprintf(name, sizeof name, "%s", what);
  if (!t.present()) return make_error("missing tensor: %s", name);
  const DTypeInfo* info = dtype_info(t.type);
  if (!info) return make_error("tensor %s has unknown type", name);
  if (must_f32 && t.type != DType::F32) return make_error("tensor %s must be f32, got %s", name, info->name);
  if (!info->computable)
    return make_error("tensor %s has type %s, which this engine cannot compute with yet (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_K q5_K q6_K)",
                      name, info->name);
  if (t.cols() != cols || t.rows() != rows)
    return make_error("tensor %s has shape [%lld x %lld], expected [%lld x %lld]", name, (long long)t.rows(),
                      (long long)t.cols(), (long long)rows, (long long)cols);
  if (cols % info->block_size != 0)
    return make_error("tensor %s: %lld columns is not a multiple of the %s block size", name, (long long)cols, info->name);
  if (t.nbytes != row_bytes(t.type, cols) * rows) return make_error("tensor %s has the wrong byte size", name);
  return Status::Ok();
}
}  // namespace

Status validate_model(const Model& m) {
  const ModelConfig& c = m.cfg;
  if (c.n_vocab <= 0 || c.n_embd <= 0 || c.n_ff <= 0 || c.n_layer <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 ||
      c.head_dim <= 0)
    return make_error("invalid model hyper-parameters (vocab %d, embd %d, ff %d, layers %d, heads %d/%d, head_dim %d)",
                      c.n_vocab, c.n_embd, c.n_ff, c.n_layer, c.n_head, c.n_head_kv, c.head_dim);
  if (c.n_vocab > 10'000'000 || c.n_embd > 1 << 17 || c.n_ff > 1 << 20 || c.n_layer > 1024 || c.n_head > 1024 ||
      c.head_dim > 1024)
    return make_error("absurd model hyper-parameters");
  if (c.n_head % c.n_head_kv != 0)
    return make_error("head count %d is not a multiple of the KV head count %d", c.n_head, c.n_head_kv);
  if (c.head_dim % 2 != 0) return make_error("head dimension %d must be even for RoPE", c.head_dim);
  if (!c.rope_freq_factors.empty() && static_cast<int>(c.rope_freq_factors.size()) != c.head_dim / 2)
    return make_error("rope frequency factors have %zu entries, expected %d", c.rope_freq_factors.size(), c.head_dim / 2);
  if (!(c.rms_eps > 0) || !(c.rope_theta > 0)) return make_error("invalid rms epsilon or rope theta");
  if (m.layers.size() != static_cast<size_t>(c.n_layer)) return make_error("layer count mismatch");
  if (!m.tokenizer) return make_error("model has no tokenizer");
  if (m.tokenizer->n_vocab() > c.n_vocab)
    return make_error("tokenizer has %d tokens but the model's vocabulary is %d", m.tokenizer->n_vocab(), c.n_vocab);
  const int64_t q = int64_t{c.n_head} * c.head_dim, kv = int64_t{c.n_head_kv} * c.head_dim;
  LARDER_CHECK_STATUS(check_tensor(m.tok_embd, "token_embd", -1, c.n_embd, c.n_vocab, false));
  LARDER_CHECK_STATUS(check_tensor(m.output_norm, "output_norm", -1, c.n_embd, 1, true));
  LARDER_CHECK_STATUS(check_tensor(m.output, "output", -1, c.n_embd, c.n_vocab, false));
  for (int i = 0; i < c.n_layer; ++i) {
    const LayerWeights& l = m.layers[i];
    LARDER_CHECK_STATUS(check_tensor(l.attn_norm, "attn_norm", i, c.n_embd, 1, true));
    LARDER_CHECK_STATUS(check_tensor(l.wq, "attn_q", i, c.n_embd, q, false));
    LARDER_CHECK_STATUS(check_tensor(l.wk, "attn_k", i, c.n_embd, kv, false));
    LARDER_CHECK_STATUS(check_tensor(l.wv, "attn_v", i, c.n_embd, kv, false));
    LARDER_CHECK_STATUS(check_tensor(l.wo, "attn_output", i, q, c.n_embd, false));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_norm, "ffn_norm", i, c.n_embd, 1, true));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_gate, "ffn_gate", i, c.n_embd, c.n_ff, false));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_up, "ffn_up", i, c.n_embd, c.n_ff, false));
    LARDER_CHECK_STATUS(check_tensor(l.ffn_down, "ffn_down", i, c.n_ff, c.n_embd, false));
    if (c.qkv_bias) {
      LARDER_CHECK_STATUS(check_tensor(l.bq, "attn_q.bias", i, q, 1, true));
      LARDER_CHECK_STATUS(check_tensor(l.bk, "attn_k.bias", i, kv, 1, true));
      LARDER_CHECK_STATUS(check_tensor(l.bv, "attn_v.bias", i, kv, 1, true));
    }
    if (c.qk_norm) {
      LARDER_CHECK_STATUS(check_tensor(l.attn_q_norm, "attn_q_norm", i, c.head_dim, 1, true));
      LARDER_CHECK_STATUS(check_tensor(l.attn_k_norm, "attn_k_norm", i, c.head_dim, 1, true));
    }
    if (c.post_norms) {
      LARDER_CHECK_STATUS(check_tensor(l.post_attn_norm, "post_attention_norm", i, c.n_embd, 1, true));
      LARDER_CHECK_STATUS(check_tensor(l.post_ffn_norm, "post_ffw_norm", i, c.n_embd, 1, true));
    }
  }
  if (c.sliding_window < 0 || (c.sliding_window > 0 && c.swa_layers.size() != static_cast<size_t>(c.n_layer)))
    return make_error("invalid sliding window configuration");
  if (!(c.embd_scale > 0) || !(c.attn_scale >= 0) || !(c.rope_theta_swa > 0))
    return make_error("invalid embedding scale, attention scale or local RoPE base");
  return Status::Ok();
}

std::vector<float> llama3_rope_factors(int head_dim, float theta, float factor, float low_freq_factor,
                                       float high_freq_factor, int original_max_pos) {
  // Meta's apply_scaling: long wavelengths are divided by `factor`, short ones kept,
  // the band between interpolated smoothly. Returned as per-frequency divisors.
  std::vector<float> out(head_dim / 2);
  const double low_wavelen = original_max_pos / low_freq_factor;
  const double high_wavelen = original_max_pos / high_freq_factor;
  for (int i = 0; i < head_dim / 2; ++i) {
    double freq = 1.0 / std::pow(static_cast<double>(theta), 2.0 * i / head_dim);
    double wavelen = 2 * M_PI / freq;
    double div;
    if (wavelen < high_wavelen) {
      div = 1;
    } else if (wavelen > low_wavelen) {
      div = factor;
    } else {
      double smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      div = 1.0 / ((1 - smooth) / factor + smooth);
    }
    out[i] = static_cast<float>(div);
  }
  return out;
}

static bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

size_t pack_model_weights(Model& m, bool skip_ffn_up_down) {
  const kernels::Isa isa = kernels::active_isa();
  if (isa == kernels::Isa::Scalar) return 0;  // the scalar path reads the file's rows
  std::vector<Tensor*> ts;
  for (auto& l : m.layers)
    for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down})
      if (!skip_ffn_up_down || (t != &l.ffn_up && t != &l.ffn_down)) ts.push_back(t);
  ts.push_back(&m.output);
  // The 1-D norms and biases too: they sit between the big tensors in the file, and reading one
  // faults in the whole large folio around it (2 MiB on this ext4), which would bring back much
  // of what was given back below.
  for (auto& l : m.layers)
    for (Tensor* t : {&l.attn_norm, &l.ffn_norm, &l.bq, &l.bk, &l.bv, &l.attn_q_norm, &l.attn_k_norm, &l.post_attn_norm,
                      &l.post_ffn_norm})
      ts.push_back(t);
  ts.push_back(&m.output_norm);
  // Packable types get the panel layout; other matrices in the mapped file are copied as they
  // are (moved, with the file pages given back below) so that they too sit in huge pages.
  auto packed_size = [isa](const Tensor* t) {
    return t->data && !t->packed && kernels::packed_kernels(t->type, isa) ? kernels::packed_bytes(t->type, t->rows(), t->cols())
                                                                          : size_t{0};
  };
  auto copy_size = [&](const Tensor* t) {
    return t->data && !t->packed && !packed_size(t) && m.gguf && m.gguf->mapped(t->data, t->nbytes)
               ? (t->nbytes + 63) / 64 * 64
               : size_t{0};
  };
  size_t total = 0, panels = 0;
  for (Tensor* t : ts) total += packed_size(t) + copy_size(t), panels += packed_size(t);
  if (total == 0) return 0;
  // One anonymous mapping for all of them, in transparent huge pages where the kernel allows:
  // decode streams every weight once per token, and with 4 KiB file pages it reached ~0.8 of
  // the read bandwidth where huge pages reach ~0.9 (llama-3.2-1b f32, 12.0 vs 14.7 t/s).
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return 0;  // keep the GGUF layout; the kernels handle both
  madvise(base, total, MADV_HUGEPAGE);
  m.keepalive.push_back(std::shared_ptr<void>(base, [total](void* p) { munmap(p, total); }));
  ThreadPool pool(default_thread_count());
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  auto* out = static_cast<uint8_t*>(base);
  std::vector<std::pair<const uint8_t*, size_t>> moved;  // file ranges now held in the buffer
  for (Tensor* t : ts) {
    const size_t np = packed_size(t), nc = copy_size(t);
    if (!np && !nc) continue;
    // Slabs of 64-row groups, each slab's file pages given back as soon as it is done, so the
    // peak stays near one copy even for the output matrix (a quarter of a 1B model).
    const size_t rb = row_bytes(t->type, t->cols());
    const bool mapped = m.gguf && m.gguf->mapped(t->data, t->nbytes);
    const int64_t slab = std::max<int64_t>(64, static_cast<int64_t>((16u << 20) / rb) / 64 * 64);
    const auto* src = static_cast<const uint8_t*>(t->data);
    if (mapped) moved.emplace_back(src, t->nbytes);
    for (int64_t r0 = 0; r0 < t->rows(); r0 += slab) {
      const int64_t nr = std::min(slab, t->rows() - r0);
      if (np)
        kernels::pack_weights(t->type, src + r0 * rb, rb, nr, t->cols(), out + kernels::packed_bytes(t->type, r0, t->cols()),
                              pool);
      else
        std::memcpy(out + r0 * rb, src + r0 * rb, nr * rb);
      if (mapped) {
        const auto a = reinterpret_cast<uintptr_t>(src + r0 * rb);
        const uintptr_t lo = (a + page - 1) / page * page, hi = (a + nr * rb) / page * page;
        if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
      }
    }
    if (np) {
      // Tied: the embedding rows are read from the packed copy too (where the type allows), so
      // lookups never fault the file's pages back in.
      if (t == &m.output && m.tok_embd.data == t->data) m.tok_embd.packed = out;
      t->packed = out;
    } else {
      if (t == &m.output && m.tok_embd.data == t->data) m.tok_embd.data = out;  // tied: look rows up in the copy
      t->data = out;
    }
    out += np + nc;  // multiples of 64, so every tensor stays 64-byte aligned
  }
  // Again over each moved tensor as a whole: where the file is mapped in large folios, a slab's
  // range only partly covers the folios at its ends, and reading the next slab maps them again.
  for (const auto& [p, n] : moved) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t lo = (a + page - 1) / page * page, hi = (a + n) / page * page;
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }
  m.packed_bytes = total;
  m.panel_bytes = panels;
  return total;
}

Result<std::unique_ptr<Model>> load_model(const std::string& path, const std::string& tokenizer_path, bool repack,
                                          bool ffn_on_disk) {
  auto r = load_model_any(path, tokenizer_path);
  if (r.ok() && repack) pack_model_weights(**r, ffn_on_disk);
  return r;
}

Result<std::unique_ptr<Model>> load_model_any(const std::string& path, const std::string& tokenizer_path) {
  if (path.empty()) return make_error("no model given (use -m PATH or set LARDER_MODEL)");
  if (!file_exists(path)) return make_error("model file not found: %s", path.c_str());
  if (is_directory(path)) return load_model_hf(path);
  // Sniff the magic rather than trusting the extension.
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return make_error("cannot open '%s'", path.c_str());
  uint8_t magic[4] = {0, 0, 0, 0};
  size_t got = std::fread(magic, 1, 4, f);
  std::fclose(f);
  if (got == 4 && std::memcmp(magic, "GGUF", 4) == 0) return load_model_gguf(path);
  if (ends_with(path, ".gguf")) return load_model_gguf(path);  // reports the bad magic
  if (ends_with(path, ".safetensors")) {
    std::string dir = path.substr(0, path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/'));
    return load_model_hf(dir.empty() ? "." : dir);
  }
  return load_model_llama2c(path, tokenizer_path);
}

}  // namespace larder
