#include "engine/context.h"

#include "kernels/attention_kv.h"
#include "kernels/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unistd.h>

namespace larder {

static void rotate_heads(const float* src, float* dst, const float* cs, const float* sn, int n_heads, int hd,
                         bool neox);

Result<DType> parse_kv_type(const std::string& s) {
  DType t;
  if (parse_dtype(s, &t) && kernels::kv_type_supported(t)) return t;
  return make_error("invalid KV cache type '%s' (valid: f32, f16, bf16, q8_0)", s.c_str());
}

std::string kv_types_name(DType k, DType v) {
  return k == v ? std::string(dtype_name(k)) : std::string(dtype_name(k)) + "/" + dtype_name(v);
}

Result<std::unique_ptr<Context>> Context::create(const Model& model, const ContextParams& p) {
  int n_ctx = p.n_ctx > 0 ? p.n_ctx : std::min(model.cfg.n_ctx_train, 4096);
  if (n_ctx <= 0) n_ctx = 2048;
  if (n_ctx > (1 << 20)) return make_error("context size %d is too large", n_ctx);
  int n_threads = p.n_threads > 0 ? p.n_threads : default_thread_count();
  if (n_threads > 256) return make_error("thread count %d is too large", n_threads);
  int n_batch = std::max(1, std::min(p.n_batch, n_ctx));
  if (p.block_size <= 0 || p.block_size > 4096) return make_error("invalid KV block size %d", p.block_size);
  if (p.w8a8 && p.ffn) return make_error("--w8a8 and a sparse or offloaded FFN do not combine");
  if (p.max_seq_len < 0) return make_error("invalid max sequence length %d", p.max_seq_len);
  const ModelConfig& c = model.cfg;
  for (auto [t, which] : {std::pair{p.type_k, "K"}, std::pair{p.type_v, "V"}}) {
    if (!kernels::kv_type_supported(t))
      return make_error("KV cache type %s of %s is not supported (valid: f32, f16, bf16, q8_0)", dtype_name(t), which);
    if (t == DType::Q8_0 && c.head_dim % 32 != 0)
      return make_error("a q8_0 %s cache needs a head size that is a multiple of 32; this model's is %d (use f16 or bf16)",
                        which, c.head_dim);
  }
  // Refuse KV caches that cannot fit rather than dying inside the allocator.
  double kv_bytes = static_cast<double>(c.n_layer) * n_ctx * c.n_head_kv *
                    static_cast<double>(kernels::kv_row_bytes(p.type_k, c.head_dim) + kernels::kv_row_bytes(p.type_v, c.head_dim));
  const double phys = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (kv_bytes > 0.75 * phys)
    return make_error("KV cache for context %d would need %.1f GiB of %.1f GiB memory; use a smaller -c", n_ctx,
                      kv_bytes / (1ull << 30), phys / (1ull << 30));
  try {
    return std::unique_ptr<Context>(new Context(model, p, n_ctx, n_threads, n_batch));
  } catch (const std::bad_alloc&) {
    return make_error("out of memory allocating the context (ctx %d); use a smaller -c", n_ctx);
  }
}

Context::Context(const Model& m, const ContextParams& p, int n_ctx, int n_threads, int n_batch)
    : model_(m), n_batch_(n_batch), block_size_(p.block_size), pool_(n_threads), type_k_(p.type_k), type_v_(p.type_v),
      ffn_(p.ffn) {
  const ModelConfig& c = m.cfg;
  n_blocks_ = (n_ctx + block_size_ - 1) / block_size_;
  n_ctx_ = n_ctx;
  n_slots_ = n_blocks_ * block_size_;
  max_seq_len_ = p.max_seq_len > 0 ? std::min(p.max_seq_len, n_ctx_) : n_ctx_;
  const int hd = c.head_dim, q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd;
  inv_freq_.resize(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    double f = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / hd);
    if (!c.rope_freq_factors.empty()) f /= c.rope_freq_factors[i];
    inv_freq_[i] = static_cast<float>(f * c.rope_freq_scale);
  }
  if (c.sliding_window > 0) {  // local layers: their own base, no scaling (as HF's rope_local_base_freq)
    inv_freq_swa_.resize(hd / 2);
    for (int i = 0; i < hd / 2; ++i)
      inv_freq_swa_[i] = static_cast<float>(std::pow(static_cast<double>(c.rope_theta_swa), -2.0 * i / hd));
    cos_swa_.resize(static_cast<size_t>(n_batch) * hd / 2);
    sin_swa_.resize(static_cast<size_t>(n_batch) * hd / 2);
  }
  k_head_ = kernels::kv_row_bytes(type_k_, hd);
  v_head_ = kernels::kv_row_bytes(type_v_, hd);
  k_row_ = k_head_ * c.n_head_kv;
  v_row_ = v_head_ * c.n_head_kv;
  k_cache_.assign(static_cast<size_t>(c.n_layer) * n_slots_ * k_row_, 0);
  v_cache_.assign(static_cast<size_t>(c.n_layer) * n_slots_ * v_row_, 0);
  identity_table_.resize(n_blocks_);
  for (int i = 0; i < n_blocks_; ++i) identity_table_[i] = i;
  x_.resize(static_cast<size_t>(n_batch) * c.n_embd);
  xb_.resize(static_cast<size_t>(n_batch) * std::max(c.n_embd, q_dim));
  q_.resize(static_cast<size_t>(n_batch) * q_dim);
  att_.resize(static_cast<size_t>(n_batch) * q_dim);
  // [n_batch][2 * n_ff]: gate then up (fused or not); before that k and v (or the fused q|k|v
  // rows) on their way into the KV cache, so they need no buffers of their own.
  hb_.resize(static_cast<size_t>(n_batch) * std::max(2 * c.n_ff, q_dim + 2 * kv_dim));
  cos_.resize(static_cast<size_t>(n_batch) * hd / 2);
  sin_.resize(static_cast<size_t>(n_batch) * hd / 2);
  scores_.resize(static_cast<size_t>(n_threads) * kQBlock * max_seq_len_);
  pos_.resize(n_batch);
  tok_seq_.resize(n_batch);
  tiles_.reserve(n_batch);
  mask_scratch_.resize(n_threads);
  last_logits_.resize(c.n_vocab);
  if (ffn_ && ffn_->prefetching()) {
    pred_in_.resize(static_cast<size_t>(kPrefetchMaxTokens) * c.n_embd);
    pred_gate_.resize(static_cast<size_t>(kPrefetchMaxTokens) * c.n_ff);
  }
  // Largest activation format is q8_0-like (34 bytes per 32 values); reserve once.
  scratch_.xq.reserve(static_cast<size_t>(n_batch) * (std::max(c.n_embd, c.n_ff) / 32 + 1) * 40);
  if (p.w8a8 && !ffn_) {  // (the sparse FFN keeps its own records; w8a8 then covers nothing of it)
    auto q = [&](const Tensor& t) { return kernels::w8_from_tensor(t.type, t.data, t.rows(), t.cols(), pool_); };
    for (const LayerWeights& L : m.layers)
      w8_.push_back({q(L.wq), q(L.wk), q(L.wv), q(L.wo), q(L.ffn_gate), q(L.ffn_up), q(L.ffn_down)});
  }
}

void Context::truncate(int n) {
  LARDER_ASSERT(n >= 0 && n <= n_past_);
  n_past_ = n;
}

void Context::copy_block(int32_t src, int32_t dst) {
  LARDER_ASSERT(src >= 0 && src < n_blocks_ && dst >= 0 && dst < n_blocks_);
  const size_t nk = block_size_ * k_row_, nv = block_size_ * v_row_;
  for (int l = 0; l < model_.cfg.n_layer; ++l) {
    uint8_t* kb = &k_cache_[static_cast<size_t>(l) * n_slots_ * k_row_];
    uint8_t* vb = &v_cache_[static_cast<size_t>(l) * n_slots_ * v_row_];
    std::memcpy(kb + dst * nk, kb + src * nk, nk);
    std::memcpy(vb + dst * nv, vb + src * nv, nv);
  }
}

void Context::move_kv(std::span<const int32_t> table, int from, int to) {
  LARDER_ASSERT(from >= 0 && to >= 0 && static_cast<size_t>(std::max(from, to) / block_size_) < table.size());
  if (from == to) return;
  const size_t a = static_cast<size_t>(table[from / block_size_]) * block_size_ + from % block_size_;
  const size_t b = static_cast<size_t>(table[to / block_size_]) * block_size_ + to % block_size_;
  for (int l = 0; l < model_.cfg.n_layer; ++l) {
    uint8_t* kb = &k_cache_[static_cast<size_t>(l) * n_slots_ * k_row_];
    uint8_t* vb = &v_cache_[static_cast<size_t>(l) * n_slots_ * v_row_];
    std::memcpy(kb + b * k_row_, kb + a * k_row_, k_row_);
    std::memcpy(vb + b * v_row_, vb + a * v_row_, v_row_);
  }
}

Context::PoolView Context::pool_view() {
  PoolView v;
  v.k_base = k_cache_.data();
  v.v_base = v_cache_.data();
  v.k_bytes = k_cache_.size();
  v.v_bytes = v_cache_.size();
  v.k_row = k_row_;
  v.v_row = v_row_;
  v.n_layer = model_.cfg.n_layer;
  v.n_slots = n_slots_;
  v.block_size = block_size_;
  return v;
}

size_t Context::block_bytes() const {
  return static_cast<size_t>(model_.cfg.n_layer) * block_size_ * (k_row_ + v_row_);
}

void Context::read_block(int32_t b, uint8_t* out) const {
  LARDER_ASSERT(b >= 0 && b < n_blocks_);
  const size_t nk = block_size_ * k_row_, nv = block_size_ * v_row_;
  for (int l = 0; l < model_.cfg.n_layer; ++l, out += nk + nv) {
    std::memcpy(out, &k_cache_[static_cast<size_t>(l) * n_slots_ * k_row_ + b * nk], nk);
    std::memcpy(out + nk, &v_cache_[static_cast<size_t>(l) * n_slots_ * v_row_ + b * nv], nv);
  }
}

void Context::write_block(int32_t b, const uint8_t* in) {
  LARDER_ASSERT(b >= 0 && b < n_blocks_);
  const size_t nk = block_size_ * k_row_, nv = block_size_ * v_row_;
  for (int l = 0; l < model_.cfg.n_layer; ++l, in += nk + nv) {
    std::memcpy(&k_cache_[static_cast<size_t>(l) * n_slots_ * k_row_ + b * nk], in, nk);
    std::memcpy(&v_cache_[static_cast<size_t>(l) * n_slots_ * v_row_ + b * nv], in + nk, nv);
  }
}

Status Context::decode(std::span<const int32_t> tokens, float* all_logits, const AttnMask* mask) {
  if (tokens.empty()) return make_error("decode: no tokens");
  if (mask && static_cast<int>(tokens.size()) > n_batch_)
    return make_error("decode: a masked input of %zu tokens exceeds the batch size %d", tokens.size(), n_batch_);
  if (n_past_ + static_cast<int64_t>(tokens.size()) > n_ctx_)
    return make_error("context is full: %d cached + %zu new tokens exceed the context size %d (use a larger -c)",
                      n_past_, tokens.size(), n_ctx_);
  for (size_t off = 0; off < tokens.size(); off += n_batch_) {
    const size_t n = std::min<size_t>(n_batch_, tokens.size() - off);
    SeqBatch sb;
    sb.tokens = tokens.subspan(off, n);
    sb.block_table = identity_table_;
    sb.n_kv = n_past_;
    sb.mask = mask;
    sb.all_logits = all_logits != nullptr;
    sb.logits = all_logits ? all_logits + off * model_.cfg.n_vocab : last_logits_.data();
    LARDER_CHECK_STATUS(decode_batch(std::span<const SeqBatch>(&sb, 1)));
    n_past_ += static_cast<int>(n);
  }
  if (all_logits)
    std::memcpy(last_logits_.data(), all_logits + (tokens.size() - 1) * model_.cfg.n_vocab, model_.cfg.n_vocab * sizeof(float));
  return Status::Ok();
}

Status Context::validate(std::span<const SeqBatch> batch, int* n_total) const {
  int64_t total = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SeqBatch& s = batch[i];
    const int n = static_cast<int>(s.tokens.size());
    if (n == 0) return make_error("sequence %zu of the batch has no tokens", i);
    total += n;
    if (!s.positions.empty() && s.positions.size() != s.tokens.size())
      return make_error("sequence %zu: %zu positions for %d tokens", i, s.positions.size(), n);
    int n_entries = s.n_kv + n;  // logical entries the batch may touch
    if (!s.kv_index.empty()) {
      if (s.kv_index.size() != s.tokens.size())
        return make_error("sequence %zu: %zu KV indices for %d tokens", i, s.kv_index.size(), n);
      n_entries = s.n_kv;
      for (int32_t e : s.kv_index) {
        if (e < 0 || e >= max_seq_len_) return make_error("sequence %zu: KV index %d is out of range", i, e);
        n_entries = std::max(n_entries, e + 1);
      }
      std::vector<int32_t> sorted(s.kv_index.begin(), s.kv_index.end());
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
        return make_error("sequence %zu: two tokens write the same KV entry", i);
    }
    if (s.seg && (s.seg->begin < 0 || s.seg->end < s.seg->begin || !(s.seg->t > 0.f) || !(s.seg->s > 0.f)))
      return make_error("sequence %zu: bad segment attention [%d, %d) t %g s %g", i, s.seg->begin, s.seg->end,
                        s.seg->t, s.seg->s);
    if (s.n_kv < 0 || n_entries > max_seq_len_)
      return make_error("sequence %zu: %d cached + %d new tokens exceed the maximum sequence length %d", i, s.n_kv, n,
                        max_seq_len_);
    const size_t need_blocks = (static_cast<size_t>(n_entries) + block_size_ - 1) / block_size_;
    if (s.block_table.size() < need_blocks)
      return make_error("sequence %zu: block table has %zu blocks, %zu needed", i, s.block_table.size(), need_blocks);
    for (size_t b = 0; b < need_blocks; ++b)
      if (s.block_table[b] < 0 || s.block_table[b] >= n_blocks_) return make_error("sequence %zu: bad block id %d", i, s.block_table[b]);
    for (int32_t t : s.tokens)
      if (t < 0 || t >= model_.cfg.n_vocab) return make_error("token id %d is out of range [0, %d)", t, model_.cfg.n_vocab);
    for (int32_t p : s.positions)
      if (p < 0 || p >= (1 << 24)) return make_error("position %d is out of range", p);
    if (s.mask) {
      if (s.mask->visible.size() != s.tokens.size()) return make_error("sequence %zu: mask has the wrong number of rows", i);
      for (const auto& row : s.mask->visible) {
        bool any = false;
        for (auto [b, e] : row) {
          if (b < 0 || e > n_entries || b > e) return make_error("sequence %zu: mask range [%d, %d) is out of bounds", i, b, e);
          any |= e > b;
        }
        if (!any) return make_error("sequence %zu: a token sees no KV entry", i);
      }
    }
  }
  int n_mass = 0;
  for (const SeqBatch& s : batch) n_mass += s.attn_mass != nullptr;
  if (n_mass > 1) return make_error("attention mass is collected for one sequence of a batch at most");
  if (total > n_batch_) return make_error("batch of %lld tokens exceeds the batch size %d", static_cast<long long>(total), n_batch_);
  *n_total = static_cast<int>(total);
  return Status::Ok();
}

Status Context::decode_batch(std::span<const SeqBatch> batch, const LayerRange* layers) {
  if (batch.empty()) return make_error("decode: empty batch");
  int n = 0;
  LARDER_CHECK_STATUS(validate(batch, &n));
  int l0 = 0, l1 = model_.cfg.n_layer;
  if (layers) {
    l0 = layers->begin;
    l1 = layers->end < 0 ? model_.cfg.n_layer : layers->end;
    if (l0 < 0 || l1 > model_.cfg.n_layer || l0 >= l1)
      return make_error("layer range [%d, %d) is out of [0, %d)", l0, l1, model_.cfg.n_layer);
    if (l0 > 0 && !layers->x_in) return make_error("a layer range starting at %d needs its input hidden states", l0);
  }
  ffn_status_ = Status::Ok();
  forward(batch, n, l0, l1, layers ? layers->x_in : nullptr, layers ? layers->x_out : nullptr);
  return ffn_status_;
}

void Context::copy_kv(std::span<const int32_t> src_table, int src0, std::span<const int32_t> dst_table, int dst0,
                      int n) {
  LARDER_ASSERT(n >= 0 && src0 >= 0 && dst0 >= 0);
  LARDER_ASSERT(static_cast<size_t>((src0 + n + block_size_ - 1) / block_size_) <= src_table.size());
  LARDER_ASSERT(static_cast<size_t>((dst0 + n + block_size_ - 1) / block_size_) <= dst_table.size());
  auto at = [&](std::span<const int32_t> t, int e) {
    return static_cast<size_t>(t[e / block_size_]) * block_size_ + e % block_size_;
  };
  for (int l = 0; l < model_.cfg.n_layer; ++l) {
    uint8_t* kb = &k_cache_[static_cast<size_t>(l) * n_slots_ * k_row_];
    uint8_t* vb = &v_cache_[static_cast<size_t>(l) * n_slots_ * v_row_];
    for (int i = 0; i < n;) {  // runs within one source and one destination block
      const int a = src0 + i, b = dst0 + i;
      const int run = std::min({n - i, block_size_ - a % block_size_, block_size_ - b % block_size_});
      std::memmove(kb + at(dst_table, b) * k_row_, kb + at(src_table, a) * k_row_, run * k_row_);
      std::memmove(vb + at(dst_table, b) * v_row_, vb + at(src_table, a) * v_row_, run * v_row_);
      i += run;
    }
  }
}

void Context::rotate_k(std::span<const int32_t> table, int begin, int n, int delta) {
  const ModelConfig& c = model_.cfg;
  const int hd = c.head_dim, half = hd / 2, kv_dim = c.n_head_kv * hd;
  LARDER_ASSERT(begin >= 0 && n >= 0 && static_cast<size_t>((begin + n + block_size_ - 1) / block_size_) <= table.size());
  if (delta == 0 || n == 0) return;
  const bool neox = c.rope_type == RopeType::NEOX;
  const kernels::Isa isa = kernels::active_isa();
  for (int local = 0; local < 2; ++local) {
    const std::vector<float>& f = local ? inv_freq_swa_ : inv_freq_;
    if (f.empty()) continue;
    std::vector<float> cs(half), sn(half);
    for (int i = 0; i < half; ++i) {
      const double ang = static_cast<double>(delta) * f[i];
      cs[i] = static_cast<float>(std::cos(ang));
      sn[i] = static_cast<float>(std::sin(ang));
    }
    pool_.parallel_for(
        static_cast<int64_t>(c.n_layer) * n,
        [&](int64_t b, int64_t e, int) {
          std::vector<float> row(kv_dim);
          for (int64_t w = b; w < e; ++w) {
            const int l = static_cast<int>(w / n), ent = begin + static_cast<int>(w % n);
            if (c.is_swa(l) != (local == 1)) continue;
            const size_t sl = static_cast<size_t>(table[ent / block_size_]) * block_size_ + ent % block_size_;
            uint8_t* kr = &k_cache_[(static_cast<size_t>(l) * n_slots_ + sl) * k_row_];
            kernels::kv_to_float(type_k_, kr, row.data(), kv_dim);
            rotate_heads(row.data(), row.data(), cs.data(), sn.data(), c.n_head_kv, hd, neox);
            kernels::kv_from_float(type_k_, row.data(), kr, kv_dim, isa);
          }
        },
        64);
  }
}

void Context::read_k(std::span<const int32_t> table, int entry, int layer, float* out) const {
  const ModelConfig& c = model_.cfg;
  LARDER_ASSERT(entry >= 0 && static_cast<size_t>(entry / block_size_) < table.size() && layer >= 0 && layer < c.n_layer);
  const size_t sl = static_cast<size_t>(table[entry / block_size_]) * block_size_ + entry % block_size_;
  kernels::kv_to_float(type_k_, &k_cache_[(static_cast<size_t>(layer) * n_slots_ + sl) * k_row_], out,
                       static_cast<int64_t>(c.n_head_kv) * c.head_dim);
}

// x += xb, then xb = rmsnorm(x) * w, row by row while the row is in L1.
void Context::add_rmsnorm(int n, const float* w) {
  const int E = model_.cfg.n_embd;
  const float eps = model_.cfg.rms_eps;
  pool_.parallel_for(
      n,
      [&](int64_t b, int64_t e, int) {
        for (int64_t t = b; t < e; ++t) {
          float* x = &x_[static_cast<size_t>(t) * E];
          float* y = &xb_[static_cast<size_t>(t) * E];
          kernels::axpy(x, y, 1.f, E);
          kernels::rmsnorm(y, x, w, E, eps);
        }
      },
      32);
}

// xb = rmsnorm(xb) * w in place (Gemma's norms of the attention and FFN outputs).
void Context::post_norm(int n, const float* w) {
  const int E = model_.cfg.n_embd;
  pool_.parallel_for(
      n,
      [&](int64_t b, int64_t e, int) {
        for (int64_t t = b; t < e; ++t) kernels::rmsnorm(&xb_[t * E], &xb_[t * E], w, E, model_.cfg.rms_eps);
      },
      32);
}

// Rotates n_heads heads of hd values from src into dst (may alias) by the angles whose cosines and
// sines are cs, sn [hd/2]: RoPE at a position, or by a difference of positions (rotate_k).
static void rotate_heads(const float* src, float* dst, const float* cs, const float* sn, int n_heads, int hd,
                         bool neox) {
  const int half = hd / 2;
  for (int h = 0; h < n_heads; ++h) {
    const float* v = src + static_cast<size_t>(h) * hd;
    float* o = dst + static_cast<size_t>(h) * hd;
    for (int i = 0; i < half; ++i) {
      const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
      const float x0 = v[a], x1 = v[b];
      o[a] = x0 * cs[i] - x1 * sn[i];
      o[b] = x0 * sn[i] + x1 * cs[i];
    }
  }
}

// RoPE of one token's heads (position of batch token t), from src into dst (may alias).
void Context::rope_row(const float* src, float* dst, int t, int n_heads, bool local) const {
  const int half = model_.cfg.head_dim / 2;
  rotate_heads(src, dst, (local ? cos_swa_ : cos_).data() + static_cast<size_t>(t) * half,
               (local ? sin_swa_ : sin_).data() + static_cast<size_t>(t) * half, n_heads, model_.cfg.head_dim,
               model_.cfg.rope_type == RopeType::NEOX);
}

// Softmax of one row's scaled scores g[0, m) (entry(k): the logical entry of g[k]) with APE's
// segment attention: the entries in [seg.begin, seg.end) scored with temperature t, their group's
// log-sum-exp weighed by s * t, merged with the others' by log-sum-exp. t = s = 1: plain softmax.
template <class Entry>
static void ape_softmax(float* g, int m, Entry entry, const SegAttn& sg) {
  if (sg.t == 1.f && sg.s == 1.f) {
    kernels::softmax(g, m);
    return;
  }
  auto in_doc = [&](int k) { return entry(k) >= sg.begin && entry(k) < sg.end; };
  double mo = -INFINITY, md = -INFINITY;
  for (int k = 0; k < m; ++k) {
    if (in_doc(k)) md = std::max(md, static_cast<double>(g[k]) / sg.t);
    else mo = std::max(mo, static_cast<double>(g[k]));
  }
  double so = 0, sd = 0;
  for (int k = 0; k < m; ++k) {
    if (in_doc(k)) sd += std::exp(static_cast<double>(g[k]) / sg.t - md);
    else so += std::exp(static_cast<double>(g[k]) - mo);
  }
  const double lse_o = so > 0 ? mo + std::log(so) : -INFINITY;
  const double w_d = sd > 0 ? static_cast<double>(sg.s) * sg.t * (md + std::log(sd)) : -INFINITY;
  const double top = std::max(lse_o, w_d);
  const double z = (so > 0 ? std::exp(lse_o - top) : 0.0) + (sd > 0 ? std::exp(w_d - top) : 0.0);
  const double fo = so > 0 ? std::exp(lse_o - top) / z / so : 0.0;  // per exp(g - mo)
  const double fd = sd > 0 ? std::exp(w_d - top) / z / sd : 0.0;   // per exp(g/t - md)
  for (int k = 0; k < m; ++k)
    g[k] = in_doc(k) ? static_cast<float>(fd * std::exp(static_cast<double>(g[k]) / sg.t - md))
                     : static_cast<float>(fo * std::exp(static_cast<double>(g[k]) - mo));
}

// Attention of each sequence's new queries over its KV (already holding the new
// keys/values), read through its block table, in tiles of kQBlock queries of one head:
// scores for the tile come from GEMM tiles over runs of consecutive blocks (never the
// full score matrix), then the mask and softmax, then P.V over the same runs.
void Context::attention(int layer, std::span<const SeqBatch> batch) {
  const ModelConfig& c = model_.cfg;
  const int hd = c.head_dim, n_head = c.n_head, q_dim = n_head * hd;
  const int group = c.n_head / c.n_head_kv;
  const float scale = c.attn_scale > 0 ? c.attn_scale : 1.f / std::sqrt(static_cast<float>(hd));
  // Sliding-window layers: query at logical index i sees keys [i - W + 1, i]; keys before the
  // tile's first window are neither scored nor read.
  const int W = c.is_swa(layer) ? c.sliding_window : 0;
  const uint8_t* kc = k_cache_.data() + static_cast<size_t>(layer) * n_slots_ * k_row_;
  const uint8_t* vc = v_cache_.data() + static_cast<size_t>(layer) * n_slots_ * v_row_;
  const int64_t k_row = static_cast<int64_t>(k_row_), v_row = static_cast<int64_t>(v_row_);
  const kernels::Isa isa = kernels::active_isa();
  // Work items: (sequence, query tile, head); the tiles are the same for every layer.
  const std::vector<int>& seq_off = seq_off_;
  const std::vector<std::pair<int, int>>& tiles = tiles_;
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * n_head;
  const int ld = max_seq_len_;
  pool_.parallel_for(n_items, [&](int64_t wb, int64_t we, int tid) {
    float* sc = scores_.data() + static_cast<size_t>(tid) * kQBlock * ld;  // [kQBlock][max_seq_len]
    for (int64_t w = wb; w < we; ++w) {
      const int h = static_cast<int>(w % n_head);
      const auto [si, lt0] = tiles[w / n_head];
      const SeqBatch& s = batch[si];
      const int kvh = h / group;
      const int ntok = std::min(kQBlock, static_cast<int>(s.tokens.size()) - lt0);
      // A one-token tile (decode) over an f16/bf16/q8_0 cache: the group's query heads share their KV
      // head, so they run as one tile of `group` score rows and its K/V is read and converted once
      // instead of once per head (SmolLM2 shape at 4096 tokens, one thread: q8_0 21.5 -> 8.5 ms per
      // token, f16 ~30 -> ~24). Not for f32, where it measured slower (52-57 -> 66 ms).
      const bool grouped = !s.mask && !s.seg && !s.attn_mass && s.kv_index.empty() && ntok == 1 && group > 1 && group <= kQBlock && !(type_k_ == DType::F32 && type_v_ == DType::F32);
      if (grouped && h % group != 0) continue;  // done by the group's first head
      const int nt = grouped ? group : ntok;     // score rows of the tile
      const int64_t ldq = grouped ? hd : q_dim;  // row stride of its queries and outputs
      auto tok = [&](int i) { return grouped ? 0 : i; };  // row i's token within the tile
      const int t0 = seq_off[si] + lt0;  // batch row of the tile's first token
      if (s.mask) {
        masked_tile(layer, s, t0, lt0, ntok, h, tid);
        continue;
      }
      // Row i is causal over its own entry (the next after the cached ones, or kv_index's).
      auto entry = [&](int i) { return entry_of(s, lt0 + tok(i)); };
      int len = 0, lo = INT32_MAX;  // logical KV range the tile needs
      auto win_lo = [&](int i) { return W > 0 ? std::max(0, entry(i) - W + 1) : 0; };
      for (int i = 0; i < nt; ++i) {
        len = std::max(len, entry(i) + 1);
        lo = std::min(lo, win_lo(i));
      }
      const float* q = q_.data() + static_cast<size_t>(t0) * q_dim + h * hd;
      // Scores over runs of physically consecutive blocks.
      for (int j0 = lo; j0 < len;) {
        int blk = j0 / block_size_, j1 = std::min(len, (blk + 1) * block_size_);
        while (j1 < len && s.block_table[j1 / block_size_] == s.block_table[blk] + (j1 / block_size_ - blk))
          j1 = std::min(len, j1 + block_size_);
        kernels::attn_scores(type_k_, kc + slot(s, j0) * k_row_ + kvh * k_head_, k_row, j1 - j0, q, ldq, nt, hd, sc + j0,
                             ld, isa);
        j0 = j1;
      }
      for (int i = 0; i < nt; ++i) {
        float* row = sc + static_cast<size_t>(i) * ld;
        const int wlo = win_lo(i);
        const int lt = entry(i) + 1;  // causal
        for (int p = wlo; p < lt; ++p) row[p] *= scale;
        if (s.seg) ape_softmax(row + wlo, lt - wlo, [&](int k) { return wlo + k; }, *s.seg);
        else kernels::softmax(row + wlo, lt - wlo);
        if (s.attn_mass) {
          float* mass = mass_[tid].data();
          for (int p = wlo; p < lt; ++p) mass[p] += row[p];
        }
        for (int p = lo; p < wlo; ++p) row[p] = 0.f;
        for (int p = lt; p < len; ++p) row[p] = 0.f;
      }
      float* out = att_.data() + static_cast<size_t>(t0) * q_dim + h * hd;
      for (int i = 0; i < nt; ++i) std::memset(out + static_cast<size_t>(i) * ldq, 0, hd * sizeof(float));
      // One call per logical block (not per run of physically consecutive ones): the sums then
      // group the same way wherever the blocks sit in the pool, so a sequence's output does not
      // depend on which blocks it got (two instances, or a prefix cache hit, give the same tokens).
      for (int j0 = lo; j0 < len;) {
        const int j1 = std::min(len, (j0 / block_size_ + 1) * block_size_);
        kernels::attn_pv(type_v_, sc + j0, ld, nt, vc + slot(s, j0) * v_row_ + kvh * v_head_, v_row, j1 - j0, hd, out, ldq,
                         isa);
        j0 = j1;
      }
    }
  });
}

// A tile of a sequence with a visibility mask (tree verification, parallel context encoding). Each
// query row sees its visible entries as if they were one causal sequence (its "virtual" order:
// the entries sorted by index; a sliding window keeps the last W of them), and computes exactly
// what that sequence would: scores of the same entries, one softmax over them laid out
// contiguously, P.V grouped by blocks of the virtual order, with kernels whose rounding does not
// depend on the tile's shape. So a draft tree's node gives the logits plain decoding of its path
// gives, bit for bit (greedy verification stays exact).
void Context::masked_tile(int layer, const SeqBatch& s, int t0, int lt0, int ntok, int h, int tid) {
  const ModelConfig& c = model_.cfg;
  const int hd = c.head_dim, q_dim = c.n_head * hd, kvh = h / (c.n_head / c.n_head_kv);
  const float scale = c.attn_scale > 0 ? c.attn_scale : 1.f / std::sqrt(static_cast<float>(hd));
  const int W = c.is_swa(layer) ? c.sliding_window : 0;
  const uint8_t* kc = k_cache_.data() + static_cast<size_t>(layer) * n_slots_ * k_row_;
  const uint8_t* vc = v_cache_.data() + static_cast<size_t>(layer) * n_slots_ * v_row_;
  const kernels::Isa isa = kernels::active_isa();
  const int ld = max_seq_len_;
  float* sc = scores_.data() + static_cast<size_t>(tid) * kQBlock * ld;  // [kQBlock][max_seq_len]
  MaskScratch& ms = mask_scratch_[tid];
  ms.idx.resize(kQBlock);
  int v0[kQBlock];  // virtual index of each row's first kept entry
  int lo = INT32_MAX, len = 0;
  for (int i = 0; i < ntok; ++i) {
    std::vector<int>& ix = ms.idx[i];
    ix.clear();
    if (s.mask) {
      for (auto [b, e] : s.mask->visible[lt0 + i])
        for (int p = b; p < e; ++p) ix.push_back(p);
    } else {  // causal by the token's own entry
      for (int p = 0, e = entry_of(s, lt0 + i); p <= e; ++p) ix.push_back(p);
    }
    std::sort(ix.begin(), ix.end());
    ix.erase(std::unique(ix.begin(), ix.end()), ix.end());
    const int all = static_cast<int>(ix.size());
    if (W > 0 && all > W) ix.erase(ix.begin(), ix.begin() + (all - W));
    v0[i] = all - static_cast<int>(ix.size());
    if (!ix.empty()) {
      lo = std::min(lo, ix.front());
      len = std::max(len, ix.back() + 1);
    }
  }
  // Scores (per entry the same in every tile shape) over runs of physically consecutive blocks.
  const float* q = q_.data() + static_cast<size_t>(t0) * q_dim + h * hd;
  for (int j0 = lo; j0 < len;) {
    int blk = j0 / block_size_, j1 = std::min(len, (blk + 1) * block_size_);
    while (j1 < len && s.block_table[j1 / block_size_] == s.block_table[blk] + (j1 / block_size_ - blk))
      j1 = std::min(len, j1 + block_size_);
    kernels::attn_scores(type_k_, kc + slot(s, j0) * k_row_ + kvh * k_head_, static_cast<int64_t>(k_row_), j1 - j0, q,
                         q_dim, ntok, hd, sc + j0, ld, isa);
    j0 = j1;
  }
  if (ms.g.size() < static_cast<size_t>(ld)) ms.g.resize(ld);
  if (ms.v.size() < static_cast<size_t>(block_size_) * v_head_) ms.v.resize(static_cast<size_t>(block_size_) * v_head_);
  for (int i = 0; i < ntok; ++i) {
    float* out = att_.data() + static_cast<size_t>(t0 + i) * q_dim + h * hd;
    std::memset(out, 0, hd * sizeof(float));
    const std::vector<int>& ix = ms.idx[i];
    const int m = static_cast<int>(ix.size());
    if (m == 0) continue;  // nothing visible: a zero output
    const float* row = sc + static_cast<size_t>(i) * ld;
    float* g = ms.g.data();
    for (int k = 0; k < m; ++k) g[k] = row[ix[k]] * scale;
    if (s.seg) ape_softmax(g, m, [&](int k) { return ix[k]; }, *s.seg);
    else kernels::softmax(g, m);
    if (s.attn_mass) {
      float* mass = mass_[tid].data();
      for (int k = 0; k < m; ++k) mass[ix[k]] += g[k];
    }
    // P.V in blocks of the virtual order (rows round alike in every tile shape: the kernels).
    for (int k0 = 0; k0 < m;) {
      const int k1 = std::min(m, ((v0[i] + k0) / block_size_ + 1) * block_size_ - v0[i]);
      const bool direct = ix[k1 - 1] - ix[k0] == k1 - 1 - k0 && ix[k0] / block_size_ == ix[k1 - 1] / block_size_;
      const uint8_t* vr = vc + slot(s, ix[k0]) * v_row_ + kvh * v_head_;
      int64_t ldv = static_cast<int64_t>(v_row_);
      if (!direct) {  // entries from elsewhere (a draft's ancestors): gathered into virtual order
        for (int k = k0; k < k1; ++k)
          std::memcpy(ms.v.data() + static_cast<size_t>(k - k0) * v_head_, vc + slot(s, ix[k]) * v_row_ + kvh * v_head_,
                      v_head_);
        vr = ms.v.data();
        ldv = static_cast<int64_t>(v_head_);
      }
      kernels::attn_pv(type_v_, g + k0, ld, 1, vr, ldv, k1 - k0, hd, out, q_dim, isa);
      k0 = k1;
    }
  }
}

void Context::mm(const Tensor& W, const kernels::W8Tensor* w8, const float* x, int n, float* y, int64_t ldy) {
  if (w8 && n >= kernels::kGemmMinTokens)
    kernels::matmul_w8a8(*w8, x, n, y, ldy, pool_, w8_scratch_, kernels::active_isa(), &w8a8_stats_);
  else
    kernels::matmul(W, x, n, y, ldy, pool_, scratch_);
}

namespace {
// Weights packed back to back at load (pack_model_weights keeps a layer's tensors in order) are
// one matrix: a single product, one pass and one activation quantization for q|k|v or gate|up.
bool packed_concat(std::initializer_list<const Tensor*> ts, Tensor* out) {
  const Tensor* first = *ts.begin();
  const auto* next = static_cast<const uint8_t*>(first->packed);
  int64_t rows = 0;
  for (const Tensor* t : ts) {
    if (!t->packed || t->packed != next || t->type != first->type || t->cols() != first->cols()) return false;
    if (t != *(ts.end() - 1) && t->rows() % 64) return false;  // packed row groups are 64 rows
    next += kernels::packed_bytes(t->type, t->rows(), t->cols());
    rows += t->rows();
  }
  *out = Tensor{};
  out->type = first->type;
  out->ne[0] = first->cols();
  out->ne[1] = rows;
  out->packed = first->packed;
  return true;
}
}  // namespace

void Context::forward(std::span<const SeqBatch> batch, int n, int l0, int l1, const float* x_in, float* x_out) {
  const ModelConfig& c = model_.cfg;
  const int E = c.n_embd, hd = c.head_dim, q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, F = c.n_ff;
  const int half = hd / 2;
  seq_off_.assign(batch.size() + 1, 0);
  for (size_t s = 0; s < batch.size(); ++s) seq_off_[s + 1] = seq_off_[s] + static_cast<int>(batch[s].tokens.size());
  tiles_.clear();
  for (size_t s = 0; s < batch.size(); ++s)
    for (int t = 0; t < static_cast<int>(batch[s].tokens.size()); t += kQBlock) tiles_.emplace_back(static_cast<int>(s), t);
  for (size_t s = 0; s < batch.size(); ++s) {
    const SeqBatch& sb = batch[s];
    for (int i = 0; i < static_cast<int>(sb.tokens.size()); ++i) {
      const int t = seq_off_[s] + i;
      tok_seq_[t] = static_cast<int>(s);
      pos_[t] = sb.positions.empty() ? sb.n_kv + i : sb.positions[i];
      const double p = static_cast<double>(pos_[t]);
      for (int k = 0; k < half; ++k) {
        const double ang = p * inv_freq_[k];
        cos_[static_cast<size_t>(t) * half + k] = static_cast<float>(std::cos(ang));
        sin_[static_cast<size_t>(t) * half + k] = static_cast<float>(std::sin(ang));
      }
      for (int k = 0; k < static_cast<int>(inv_freq_swa_.size()); ++k) {
        const double ang = p * inv_freq_swa_[k];
        cos_swa_[static_cast<size_t>(t) * half + k] = static_cast<float>(std::cos(ang));
        sin_swa_[static_cast<size_t>(t) * half + k] = static_cast<float>(std::sin(ang));
      }
      // Embedding lookup: x [n][E]
      if (x_in) continue;
      const Tensor& te = model_.tok_embd;
      float* xr = x_.data() + static_cast<size_t>(t) * E;
      if (!te.packed || !kernels::packed_row_to_float(te.type, te.packed, te.rows(), E, sb.tokens[i], xr))
        kernels::dequantize_row(te.type, static_cast<const uint8_t*>(te.data) + sb.tokens[i] * row_bytes(te.type, E), xr, E);
      if (c.embd_scale != 1.f)
        for (int k = 0; k < E; ++k) xr[k] *= c.embd_scale;
    }
  }

  if (x_in) std::memcpy(x_.data(), x_in, static_cast<size_t>(n) * E * sizeof(float));
  const SeqBatch* mass_seq = nullptr;
  for (const SeqBatch& sb : batch)
    if (sb.attn_mass) mass_seq = &sb;
  if (mass_seq) {
    mass_.resize(pool_.size());
    for (auto& m : mass_) m.assign(max_seq_len_, 0.f);
  }
  // The gated activation of the FFN: out = act(gate) * up (may alias gate).
  auto glu = [&](float* out, const float* gate, const float* up, int64_t m) {
    if (c.ffn_act == FfnAct::GELU_TANH) kernels::geglu_tanh(out, gate, up, m);
    else kernels::swiglu(out, gate, up, m);
  };
  bool fused_norm = false;  // xb_ already holds this layer's normed input
  for (int l = l0; l < l1; ++l) {
    const LayerWeights& L = model_.layers[l];
    const LayerW8* W8 = w8_.empty() ? nullptr : &w8_[l];
    const float* an = static_cast<const float*>(L.attn_norm.data);
    if (!fused_norm)
      for (int t = 0; t < n; ++t) kernels::rmsnorm(&xb_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E], an, E, c.rms_eps);
    fused_norm = false;
    const bool w8_now = W8 && n >= kernels::kGemmMinTokens;
    // Rows of q, k, v before RoPE; k and v only pass through hb_ on their way to the cache.
    float *qs = q_.data(), *ks = hb_.data(), *vs = hb_.data() + static_cast<size_t>(n) * kv_dim;
    size_t qld = q_dim, kld = kv_dim, vld = kv_dim;
    Tensor fused;
    if (!w8_now && packed_concat({&L.wq, &L.wk, &L.wv}, &fused)) {
      kernels::matmul(fused, xb_.data(), n, hb_.data(), q_dim + 2 * kv_dim, pool_, scratch_);
      qs = hb_.data();
      ks = qs + q_dim;
      vs = ks + kv_dim;
      qld = kld = vld = q_dim + 2 * kv_dim;
    } else if (!w8_now && packed_concat({&L.wq, &L.wk}, &fused)) {
      // v of another type (Gemma 3's Q4_K_M has q8_0 attn_v in some layers): q|k still one product.
      kernels::matmul(fused, xb_.data(), n, hb_.data(), q_dim + kv_dim, pool_, scratch_);
      qs = hb_.data();
      ks = qs + q_dim;
      qld = kld = q_dim + kv_dim;
      vs = hb_.data() + static_cast<size_t>(n) * (q_dim + kv_dim);
      mm(L.wv, nullptr, xb_.data(), n, vs, kv_dim);
    } else {
      mm(L.wq, W8 ? W8->wq.get() : nullptr, xb_.data(), n, q_.data(), q_dim);
      mm(L.wk, W8 ? W8->wk.get() : nullptr, xb_.data(), n, ks, kv_dim);
      mm(L.wv, W8 ? W8->wv.get() : nullptr, xb_.data(), n, vs, kv_dim);
    }
    if (c.qkv_bias) {
      for (int t = 0; t < n; ++t) {
        kernels::axpy(qs + t * qld, static_cast<const float*>(L.bq.data), 1.f, q_dim);
        kernels::axpy(ks + t * kld, static_cast<const float*>(L.bk.data), 1.f, kv_dim);
        kernels::axpy(vs + t * vld, static_cast<const float*>(L.bv.data), 1.f, kv_dim);
      }
    }
    // Fused, per token: RoPE of q, RoPE of k in place then converted once into its cache slot's
    // type, v converted — one pass instead of three.
    uint8_t* kc = k_cache_.data() + static_cast<size_t>(l) * n_slots_ * k_row_;
    uint8_t* vc = v_cache_.data() + static_cast<size_t>(l) * n_slots_ * v_row_;
    const kernels::Isa isa = kernels::active_isa();
    const bool local = c.is_swa(l);
    const float* qn = static_cast<const float*>(L.attn_q_norm.data);
    const float* kn = static_cast<const float*>(L.attn_k_norm.data);
    pool_.parallel_for(
        n,
        [&](int64_t b, int64_t e, int) {
          for (int t = static_cast<int>(b); t < e; ++t) {
            const SeqBatch& sb = batch[tok_seq_[t]];
            const size_t sl = slot(sb, entry_of(sb, t - seq_off_[tok_seq_[t]]));
            const size_t r = static_cast<size_t>(t);
            if (c.qk_norm) {  // per-head RMSNorm before RoPE (in place: q/k rows are this token's own)
              float* qr = qs + r * qld;
              float* kr = ks + r * kld;
              for (int h = 0; h < c.n_head; ++h) kernels::rmsnorm(qr + h * hd, qr + h * hd, qn, hd, c.rms_eps);
              for (int h = 0; h < c.n_head_kv; ++h) kernels::rmsnorm(kr + h * hd, kr + h * hd, kn, hd, c.rms_eps);
            }
            rope_row(qs + r * qld, &q_[r * q_dim], t, c.n_head, local);
            if (type_k_ == DType::F32) {
              rope_row(ks + r * kld, reinterpret_cast<float*>(kc + sl * k_row_), t, c.n_head_kv, local);
            } else {
              rope_row(ks + r * kld, ks + r * kld, t, c.n_head_kv, local);
              kernels::kv_from_float(type_k_, ks + r * kld, kc + sl * k_row_, kv_dim, isa);
            }
            kernels::kv_from_float(type_v_, vs + r * vld, vc + sl * v_row_, kv_dim, isa);
          }
        },
        32);
    if (layer_hook_) layer_hook_(l);
    attention(l, batch);
    mm(L.wo, W8 ? W8->wo.get() : nullptr, att_.data(), n, xb_.data(), E);
    if (c.post_norms) post_norm(n, static_cast<const float*>(L.post_attn_norm.data));
    add_rmsnorm(n, static_cast<const float*>(L.ffn_norm.data));
    if (ffn_) {  // sparse / streamed: the gate here, the rest over the active neurons only
      if (ffn_->prefetching() && l + 1 < l1 && n <= kPrefetchMaxTokens) {
        // The next layer's gate applied to this layer's residual stream (its FFN input will be this
        // plus two more blocks' outputs): a prediction of which of its neurons to read ahead.
        const LayerWeights& N = model_.layers[l + 1];
        for (int t = 0; t < n; ++t)
          kernels::rmsnorm(&pred_in_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E],
                           static_cast<const float*>(N.ffn_norm.data), E, c.rms_eps);
        mm(N.ffn_gate, nullptr, pred_in_.data(), n, pred_gate_.data(), F);
        if (Status st = ffn_->prefetch(l + 1, pred_gate_.data(), n); !st.ok() && ffn_status_.ok()) ffn_status_ = st;
      }
      mm(L.ffn_gate, nullptr, xb_.data(), n, hb_.data(), F);
      if (Status st = ffn_->forward(l, xb_.data(), hb_.data(), n, pool_); !st.ok()) {
        if (ffn_status_.ok()) ffn_status_ = st;
        return;  // nothing after a failed layer is worth computing (the caller gets the error)
      }
    } else if (!w8_now && packed_concat({&L.ffn_gate, &L.ffn_up}, &fused)) {
      kernels::matmul(fused, xb_.data(), n, hb_.data(), 2 * F, pool_, scratch_);
      if (gate_hook_) gate_hook_(l, hb_.data(), n, 2 * F);
      // In place, row by row: row t's result [tF, tF + F) only covers inputs of rows < t.
      for (int t = 0; t < n; ++t)
        glu(&hb_[static_cast<size_t>(t) * F], &hb_[static_cast<size_t>(t) * 2 * F], &hb_[static_cast<size_t>(t) * 2 * F + F], F);
    } else {
      float* up = hb_.data() + static_cast<size_t>(n) * F;
      mm(L.ffn_gate, W8 ? W8->gate.get() : nullptr, xb_.data(), n, hb_.data(), F);
      mm(L.ffn_up, W8 ? W8->up.get() : nullptr, xb_.data(), n, up, F);
      if (gate_hook_) gate_hook_(l, hb_.data(), n, F);
      glu(hb_.data(), hb_.data(), up, static_cast<int64_t>(n) * F);
    }
    if (!ffn_) mm(L.ffn_down, W8 ? W8->down.get() : nullptr, hb_.data(), n, xb_.data(), E);
    if (c.post_norms) post_norm(n, static_cast<const float*>(L.post_ffn_norm.data));
    if (l + 1 < l1) {
      // The residual add fused with the next layer's attention norm (one pass per row).
      add_rmsnorm(n, static_cast<const float*>(model_.layers[l + 1].attn_norm.data));
      fused_norm = true;
    } else {
      for (int t = 0; t < n; ++t) kernels::axpy(&x_[static_cast<size_t>(t) * E], &xb_[static_cast<size_t>(t) * E], 1.f, E);
    }
  }
  if (mass_seq) {  // up to the last entry any of its tokens sees
    int lim = 0;
    const SeqBatch& sb = *mass_seq;
    for (int i = 0; i < static_cast<int>(sb.tokens.size()); ++i) {
      if (sb.mask)
        for (auto [b, e] : sb.mask->visible[i]) lim = std::max(lim, e);
      else
        lim = std::max(lim, entry_of(sb, i) + 1);
    }
    for (const auto& m : mass_)
      for (int e = 0; e < lim; ++e) sb.attn_mass[e] += m[e];
  }
  if (x_out) std::memcpy(x_out, x_.data(), static_cast<size_t>(n) * E * sizeof(float));
  if (l1 < c.n_layer) return;
  // Output: all rows of all_logits sequences go straight to their buffers; the last
  // rows of the others are gathered into one product.
  const float* on = static_cast<const float*>(model_.output_norm.data);
  const int V = c.n_vocab;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SeqBatch& sb = batch[s];
    if (!sb.logits || !sb.all_logits) continue;
    const int t0 = seq_off_[s], nt = static_cast<int>(sb.tokens.size());
    for (int t = 0; t < nt; ++t)
      kernels::rmsnorm(&xb_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t0 + t) * E], on, E, c.rms_eps);
    kernels::matmul(model_.output, xb_.data(), nt, sb.logits, V, pool_, scratch_);
  }
  int n_last = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SeqBatch& sb = batch[s];
    if (!sb.logits || sb.all_logits) continue;
    kernels::rmsnorm(&xb_[static_cast<size_t>(n_last) * E], &x_[static_cast<size_t>(seq_off_[s + 1] - 1) * E], on, E, c.rms_eps);
    ++n_last;
  }
  if (n_last > 0) {
    if (out_rows_.size() < static_cast<size_t>(n_last) * V) out_rows_.resize(static_cast<size_t>(n_last) * V);
    kernels::matmul(model_.output, xb_.data(), n_last, out_rows_.data(), V, pool_, scratch_);
    int k = 0;
    for (const SeqBatch& sb : batch)
      if (sb.logits && !sb.all_logits) std::memcpy(sb.logits, &out_rows_[static_cast<size_t>(k++) * V], V * sizeof(float));
  }
}

}  // namespace larder
