// llama2.c checkpoint loader (legacy version-0 export): a 7 x int32 header, then float32
// arrays back to back. Weights are zero-copy views into the mapped file.
#include <cinttypes>
#include <cstring>

#include "core/mmap_file.h"
#include "model/model.h"

namespace larder {

namespace {

constexpr uint32_t kMagicV1 = 0x616b3432;  // "ak42": llama2.c export.py version 1/2 files

struct Header {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

std::string dirname_of(const std::string& p) {
  size_t s = p.find_last_of('/');
  return s == std::string::npos ? "." : s == 0 ? "/" : p.substr(0, s);
}

Status check_header(const Header& h) {
  auto bad = [&](const char* what, int32_t v) {
    return make_error("not a llama2.c checkpoint (header has %s = %d)", what, v);
  };
  if (h.dim <= 0 || h.dim > 65536) return bad("dim", h.dim);
  if (h.hidden_dim <= 0 || h.hidden_dim > (1 << 20)) return bad("hidden_dim", h.hidden_dim);
  if (h.n_layers <= 0 || h.n_layers > 1024) return bad("n_layers", h.n_layers);
  if (h.n_heads <= 0 || h.n_heads > 1024) return bad("n_heads", h.n_heads);
  if (h.n_kv_heads <= 0 || h.n_kv_heads > h.n_heads) return bad("n_kv_heads", h.n_kv_heads);
  if (h.vocab_size == 0 || h.vocab_size < -(1 << 22) || h.vocab_size > (1 << 22)) return bad("vocab_size", h.vocab_size);
  if (h.seq_len <= 0 || h.seq_len > (1 << 20)) return bad("seq_len", h.seq_len);
  if (h.dim % h.n_heads != 0)
    return make_error("invalid llama2.c header: dim %d is not divisible by n_heads %d", h.dim, h.n_heads);
  if (h.n_heads % h.n_kv_heads != 0)
    return make_error("invalid llama2.c header: n_heads %d is not a multiple of n_kv_heads %d", h.n_heads, h.n_kv_heads);
  if ((h.dim / h.n_heads) % 2 != 0)
    return make_error("invalid llama2.c header: head size %d must be even", h.dim / h.n_heads);
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<Model>> load_model_llama2c(const std::string& path, const std::string& tokenizer_path) {
  LARDER_TRY(map, MappedFile::open(path));
  const uint8_t* base = map->data();
  const size_t size = map->size();
  if (size >= 4) {
    uint32_t magic;
    std::memcpy(&magic, base, 4);
    if (magic == kMagicV1) {
      int32_t version = -1;
      if (size >= 8) std::memcpy(&version, base + 4, 4);
      return make_error("%s: llama2.c checkpoint version %d (magic \"ak42\") is not supported; "
                        "export it with --version 0 or convert it to GGUF", path.c_str(), version);
    }
  }
  if (size < sizeof(Header))
    return make_error("%s: truncated llama2.c checkpoint (%zu bytes, the header alone is %zu)", path.c_str(), size,
                      sizeof(Header));
  Header h;
  std::memcpy(&h, base, sizeof h);
  Status hs = check_header(h);
  if (!hs.ok()) return make_error("%s: %s", path.c_str(), hs.error().c_str());

  // Header values are bounded above, so every product below fits in 64 bits.
  const bool shared = h.vocab_size > 0;
  const uint64_t vocab = shared ? h.vocab_size : -static_cast<int64_t>(h.vocab_size);
  const uint64_t dim = h.dim, hid = h.hidden_dim, L = h.n_layers, hs_ = h.dim / h.n_heads;
  const uint64_t kv_dim = dim * h.n_kv_heads / h.n_heads;
  // Float offsets (in elements, after the header) of each array.
  uint64_t off = 0;
  auto take = [&off](uint64_t n) { uint64_t o = off; off += n; return o; };
  const uint64_t o_emb = take(vocab * dim);
  const uint64_t o_rms_att = take(L * dim);
  const uint64_t o_wq = take(L * dim * dim);
  const uint64_t o_wk = take(L * kv_dim * dim);
  const uint64_t o_wv = take(L * kv_dim * dim);
  const uint64_t o_wo = take(L * dim * dim);
  const uint64_t o_rms_ffn = take(L * dim);
  const uint64_t o_w1 = take(L * hid * dim);
  const uint64_t o_w2 = take(L * dim * hid);
  const uint64_t o_w3 = take(L * hid * dim);
  const uint64_t o_rms_final = take(dim);
  take(static_cast<uint64_t>(h.seq_len) * hs_ / 2);  // freq_cis_real (unused: RoPE is computed)
  take(static_cast<uint64_t>(h.seq_len) * hs_ / 2);  // freq_cis_imag
  const uint64_t o_wcls = shared ? o_emb : take(vocab * dim);
  const uint64_t expect = sizeof(Header) + off * 4;
  if (size < expect)
    return make_error("%s: truncated llama2.c checkpoint: the header implies %" PRIu64 " bytes, the file has %zu",
                      path.c_str(), expect, size);
  if (size > expect)
    return make_error("%s: llama2.c checkpoint size mismatch: the header implies %" PRIu64
                      " bytes, the file has %zu (only the legacy version-0 layout is supported)",
                      path.c_str(), expect, size);

  auto m = std::make_unique<Model>();
  m->format = "llama2c";
  m->path = path;
  m->keepalive.push_back(map);
  ModelConfig& c = m->cfg;
  c.arch = "llama";
  c.name = path.substr(path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/') + 1);
  c.n_vocab = static_cast<int>(vocab);
  c.n_embd = h.dim;
  c.n_ff = h.hidden_dim;
  c.n_layer = h.n_layers;
  c.n_head = h.n_heads;
  c.n_head_kv = h.n_kv_heads;
  c.head_dim = static_cast<int>(hs_);
  c.n_ctx_train = h.seq_len;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.f;
  c.rope_type = RopeType::NORM;  // llama2.c keeps Meta's interleaved-pair layout
  c.tied_embeddings = shared;

  const float* f = reinterpret_cast<const float*>(base + sizeof(Header));
  auto view = [&](const std::string& name, uint64_t elem_off, uint64_t cols, uint64_t rows) {
    Tensor t;
    t.name = name;
    t.type = DType::F32;
    t.ne[0] = static_cast<int64_t>(cols);
    t.ne[1] = static_cast<int64_t>(rows);
    t.data = f + elem_off;
    t.nbytes = cols * rows * 4;
    return t;
  };
  m->tok_embd = view("token_embedding", o_emb, dim, vocab);
  m->output = view(shared ? "token_embedding" : "wcls", o_wcls, dim, vocab);
  m->output_norm = view("rms_final", o_rms_final, dim, 1);
  m->layers.resize(L);
  for (uint64_t i = 0; i < L; ++i) {
    LayerWeights& l = m->layers[i];
    const std::string p = "layers." + std::to_string(i) + ".";
    l.attn_norm = view(p + "rms_att", o_rms_att + i * dim, dim, 1);
    l.wq = view(p + "wq", o_wq + i * dim * dim, dim, dim);
    l.wk = view(p + "wk", o_wk + i * kv_dim * dim, dim, kv_dim);
    l.wv = view(p + "wv", o_wv + i * kv_dim * dim, dim, kv_dim);
    l.wo = view(p + "wo", o_wo + i * dim * dim, dim, dim);
    l.ffn_norm = view(p + "rms_ffn", o_rms_ffn + i * dim, dim, 1);
    l.ffn_gate = view(p + "w1", o_w1 + i * hid * dim, dim, hid);
    l.ffn_down = view(p + "w2", o_w2 + i * dim * hid, hid, dim);
    l.ffn_up = view(p + "w3", o_w3 + i * hid * dim, dim, hid);
  }

  // Tokenizer: explicit path, else tokenizer.bin or tok<vocab>.bin beside the checkpoint.
  std::string tok_path = tokenizer_path;
  if (tok_path.empty()) {
    const std::string dir = dirname_of(path);
    const std::string a = dir + "/tokenizer.bin", b = dir + "/tok" + std::to_string(vocab) + ".bin";
    if (file_exists(a)) tok_path = a;
    else if (file_exists(b)) tok_path = b;
    else
      return make_error("%s: no tokenizer found for this llama2.c checkpoint (tried %s and %s); pass one explicitly",
                        path.c_str(), a.c_str(), b.c_str());
  }
  auto tok = load_tokenizer_llama2c(tok_path, static_cast<int32_t>(vocab));
  if (!tok.ok()) return make_error("%s: %s", path.c_str(), tok.error().c_str());
  m->tokenizer = std::move(tok).value();

  Status st = validate_model(*m);
  if (!st.ok()) return make_error("%s: %s", path.c_str(), st.error().c_str());
  return m;
}

}  // namespace larder
