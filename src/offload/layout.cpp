// The neuron-bundled on-disk layout of the FFN's up rows and down columns (larder offload-prepare).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "kernels/kernels.h"
#include "model/model.h"
#include "offload/offload.h"
#include "offload/offload_internal.h"

namespace larder::offload {

namespace {
constexpr char kMagic[8] = {'L', 'A', 'R', 'D', 'F', 'F', 'N', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kAlign = 4096;

// Fixed header, then n_layer LayerRecs; the whole padded to kAlign.
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t n_layer, n_embd, n_ff;
  char model[32];           // fingerprint, NUL-terminated
  uint64_t index_offset, data_offset, file_bytes;
  uint64_t index_sum;       // XXH3-64 of the index
  uint64_t header_sum;      // XXH3-64 of this struct (this field 0) and the layer table
};
struct LayerRec {
  uint32_t up_type, down_type;
  uint64_t up_bytes, down_bytes, record_bytes, offset;
};

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

bool simple_block_ok(DType t, int n) {
  const DTypeInfo* in = dtype_info(t);
  const kernels::TypeTraits* tr = kernels::type_traits(t);
  return in && tr && tr->from_float && tr->to_float && in->computable && n % in->block_size == 0 &&
         t != DType::Q8_1 && t != DType::Q8_K;
}

std::string path_of(const std::string& dir) { return (std::filesystem::path(dir) / "ffn.bin").string(); }

Status write_all(int fd, const void* p, size_t n, uint64_t off, const std::string& path) {
  const auto* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    ssize_t w = pwrite(fd, b, n, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return make_error("writing '%s' failed: %s", path.c_str(), w < 0 ? std::strerror(errno) : "no space");
    b += w, n -= static_cast<size_t>(w), off += static_cast<uint64_t>(w);
  }
  return Status::Ok();
}
}  // namespace

Status check_gated_ffn(const Model& m) {
  const ModelConfig& c = m.cfg;
  if (c.n_layer <= 0 || c.n_ff <= 0) return make_error("the model has no FFN layers");
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& L = m.layers[l];
    if (!L.ffn_gate.present() || !L.ffn_up.present() || !L.ffn_down.present())
      return make_error("layer %d has no gated FFN (gate, up, down): FFN offloading needs one", l);
    if (!kernels::type_traits(L.ffn_up.type) || !kernels::type_traits(L.ffn_down.type))
      return make_error("layer %d: FFN weights of type %s/%s have no kernels", l, dtype_name(L.ffn_up.type),
                        dtype_name(L.ffn_down.type));
  }
  return Status::Ok();
}

Status check_down_type(const Model& m, const std::string& name) {
  DType t;
  if (name != "auto" && (!parse_dtype(name, &t) || !simple_block_ok(t, m.cfg.n_embd)))
    return make_error("invalid down type '%s' for the offload layout (auto, f32, f16, bf16, q8_0, q5_0, q4_1, q4_0, ...; "
                      "its block must divide n_embd %d)", name.c_str(), m.cfg.n_embd);
  return Status::Ok();
}

DType layer_down_type(const Model& m, int l, const std::string& name) {
  if (name != "auto") {
    DType t;
    parse_dtype(name, &t);
    return t;
  }
  // Re-quantizing a column of a 4-6 bit matrix to 4-6 bits again compounds two roundings (SmolLM2
  // Q4_1 with q4_1 columns: KL 0.090 to the dense model, top-1 84%; q8_0 columns: 0.0063, 95.4%;
  // docs/BENCHMARKS.md), so those get q8_0; 8-16-32 bit types keep their own.
  const DType t = m.layers[l].ffn_down.type;
  const bool wide = t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::Q8_0;
  return wide && simple_block_ok(t, m.cfg.n_embd) ? t : DType::Q8_0;
}

LayerLayout layer_layout(const Model& m, int l, DType down_type) {
  LayerLayout ll;
  ll.up_type = m.layers[l].ffn_up.type;
  ll.down_type = down_type;
  ll.up_bytes = row_bytes(ll.up_type, m.cfg.n_embd);
  ll.down_bytes = row_bytes(down_type, m.cfg.n_embd);
  ll.record_bytes = round_up(ll.up_bytes + ll.down_bytes, 512);
  return ll;
}

void build_records(const Model& m, int l, const LayerLayout& ll, uint8_t* out, ThreadPool& pool) {
  const int E = m.cfg.n_embd, F = m.cfg.n_ff;
  const Tensor& up = m.layers[l].ffn_up;
  const Tensor& down = m.layers[l].ffn_down;  // [E rows][F cols]
  // down as floats, transposed: [F][E]
  std::vector<float> dt(static_cast<size_t>(F) * E);
  const size_t drb = row_bytes(down.type, F);
  pool.parallel_for(E, [&](int64_t b, int64_t e, int) {
    std::vector<float> row(F);
    for (int64_t r = b; r < e; ++r) {
      kernels::dequantize_row(down.type, static_cast<const uint8_t*>(down.data) + r * drb, row.data(), F);
      for (int j = 0; j < F; ++j) dt[static_cast<size_t>(j) * E + r] = row[j];
    }
  });
  pool.parallel_for(F, [&](int64_t b, int64_t e, int) {
    for (int64_t j = b; j < e; ++j) {
      uint8_t* rec = out + j * ll.record_bytes;
      std::memcpy(rec, static_cast<const uint8_t*>(up.data) + j * ll.up_bytes, ll.up_bytes);
      kernels::quantize_row(ll.down_type, &dt[static_cast<size_t>(j) * E], rec + ll.up_bytes, E);
      std::memset(rec + ll.up_bytes + ll.down_bytes, 0, ll.record_bytes - ll.up_bytes - ll.down_bytes);
    }
  });
}

Status prepare(const Model& m, const std::string& dir, const std::string& down_name, void (*progress)(int, int)) {
  LARDER_CHECK_STATUS(check_gated_ffn(m));
  LARDER_CHECK_STATUS(check_down_type(m, down_name));
  const ModelConfig& c = m.cfg;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return make_error("cannot create '%s': %s", dir.c_str(), ec.message().c_str());
  std::vector<LayerLayout> lays(c.n_layer);
  const size_t head = round_up(sizeof(Header) + c.n_layer * sizeof(LayerRec), kAlign);
  const size_t index_bytes = static_cast<size_t>(c.n_layer) * c.n_ff * 8;
  uint64_t off = head + round_up(index_bytes, kAlign);
  for (int l = 0; l < c.n_layer; ++l) {
    lays[l] = layer_layout(m, l, layer_down_type(m, l, down_name));
    lays[l].offset = off;
    off = round_up(off + static_cast<uint64_t>(c.n_ff) * lays[l].record_bytes, kAlign);
  }
  const uint64_t file_bytes = round_up(off, kAlign);
  const std::string path = path_of(dir), tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return make_error("cannot create '%s': %s", tmp.c_str(), std::strerror(errno));
  auto fail = [&](Status st) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return st;
  };
  std::vector<uint64_t> sums(static_cast<size_t>(c.n_layer) * c.n_ff);
  ThreadPool pool(default_thread_count());
  std::vector<uint8_t> buf;
  for (int l = 0; l < c.n_layer; ++l) {
    buf.resize(static_cast<size_t>(c.n_ff) * lays[l].record_bytes);
    build_records(m, l, lays[l], buf.data(), pool);
    for (int j = 0; j < c.n_ff; ++j)
      sums[static_cast<size_t>(l) * c.n_ff + j] = XXH3_64bits(buf.data() + static_cast<size_t>(j) * lays[l].record_bytes,
                                                              lays[l].record_bytes);
    if (Status st = write_all(fd, buf.data(), buf.size(), lays[l].offset, tmp); !st.ok()) return fail(st);
    if (progress) progress(l + 1, c.n_layer);
  }
  if (Status st = write_all(fd, sums.data(), index_bytes, head, tmp); !st.ok()) return fail(st);
  std::vector<uint8_t> hb(head, 0);
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.n_layer = static_cast<uint32_t>(c.n_layer);
  h.n_embd = static_cast<uint32_t>(c.n_embd);
  h.n_ff = static_cast<uint32_t>(c.n_ff);
  std::snprintf(h.model, sizeof h.model, "%s", m.fingerprint().c_str());
  h.index_offset = head;
  h.data_offset = lays[0].offset;
  h.file_bytes = file_bytes;
  h.index_sum = XXH3_64bits(sums.data(), index_bytes);
  std::memcpy(hb.data(), &h, sizeof h);
  for (int l = 0; l < c.n_layer; ++l) {
    LayerRec r{static_cast<uint32_t>(lays[l].up_type), static_cast<uint32_t>(lays[l].down_type), lays[l].up_bytes,
               lays[l].down_bytes, lays[l].record_bytes, lays[l].offset};
    std::memcpy(hb.data() + sizeof h + l * sizeof r, &r, sizeof r);
  }
  h.header_sum = XXH3_64bits(hb.data(), sizeof h + c.n_layer * sizeof(LayerRec));
  std::memcpy(hb.data(), &h, sizeof h);
  if (Status st = write_all(fd, hb.data(), hb.size(), 0, tmp); !st.ok()) return fail(st);
  if (ftruncate(fd, static_cast<off_t>(file_bytes)) != 0 || fsync(fd) != 0)
    return fail(make_error("writing '%s' failed: %s", tmp.c_str(), std::strerror(errno)));
  ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    return make_error("cannot rename '%s': %s", tmp.c_str(), std::strerror(errno));
  }
  return Status::Ok();
}

Result<LayoutInfo> read_layout(const Model& m, const std::string& dir) {
  const std::string path = path_of(dir);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return make_error("cannot open the FFN offload layout '%s': %s (write it with larder offload-prepare MODEL DIR)",
                      path.c_str(), std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st{};
  fstat(fd, &st);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto bad = [&](const char* why) {
    return make_error("FFN offload layout '%s' is corrupt or truncated (%s); run larder offload-prepare again",
                      path.c_str(), why);
  };
  Header h{};
  if (size < sizeof h || pread(fd, &h, sizeof h, 0) != static_cast<ssize_t>(sizeof h)) return bad("short header");
  if (std::memcmp(h.magic, kMagic, 8) != 0) return bad("bad magic");
  if (h.version != kVersion) return bad("unknown version");
  if (h.n_layer == 0 || h.n_layer > 4096 || h.n_ff == 0 || h.n_ff > (1u << 24) || h.n_embd == 0 || h.n_embd > (1u << 20))
    return bad("implausible sizes");
  const size_t tab = sizeof h + h.n_layer * sizeof(LayerRec);
  std::vector<uint8_t> hb(tab);
  if (size < tab || pread(fd, hb.data(), tab, 0) != static_cast<ssize_t>(tab)) return bad("short header");
  Header hz = h;
  hz.header_sum = 0;
  std::memcpy(hb.data(), &hz, sizeof hz);
  if (XXH3_64bits(hb.data(), tab) != h.header_sum) return bad("header checksum");
  if (h.file_bytes != size) return bad("file size differs from its header");
  h.model[sizeof h.model - 1] = 0;
  const std::string fp = m.fingerprint();
  if (fp != h.model || static_cast<int>(h.n_layer) != m.cfg.n_layer || static_cast<int>(h.n_embd) != m.cfg.n_embd ||
      static_cast<int>(h.n_ff) != m.cfg.n_ff)
    return make_error("FFN offload layout '%s' was prepared for another model (fingerprint %s, this model %s); run larder "
                      "offload-prepare for this one", path.c_str(), h.model, fp.c_str());
  LayoutInfo info;
  info.model = h.model;
  info.n_layer = static_cast<int>(h.n_layer);
  info.n_embd = static_cast<int>(h.n_embd);
  info.n_ff = static_cast<int>(h.n_ff);
  info.index_offset = h.index_offset;
  info.file_bytes = size;
  for (uint32_t l = 0; l < h.n_layer; ++l) {
    LayerRec r;
    std::memcpy(&r, hb.data() + sizeof h + l * sizeof r, sizeof r);
    LayerLayout ll;
    ll.up_type = static_cast<DType>(r.up_type);
    ll.down_type = static_cast<DType>(r.down_type);
    ll.up_bytes = r.up_bytes;
    ll.down_bytes = r.down_bytes;
    ll.record_bytes = r.record_bytes;
    ll.offset = r.offset;
    if (ll.up_type != m.layers[l].ffn_up.type || ll.up_bytes != row_bytes(ll.up_type, m.cfg.n_embd) ||
        !simple_block_ok(ll.down_type, m.cfg.n_embd) || ll.down_bytes != row_bytes(ll.down_type, m.cfg.n_embd) ||
        ll.record_bytes < ll.up_bytes + ll.down_bytes || ll.record_bytes % 512 != 0 || ll.offset % kAlign != 0 ||
        ll.offset + static_cast<uint64_t>(h.n_ff) * ll.record_bytes > size)
      return bad("layer table");
    info.layers.push_back(ll);
  }
  const size_t index_bytes = static_cast<size_t>(h.n_layer) * h.n_ff * 8;
  info.sums.resize(static_cast<size_t>(h.n_layer) * h.n_ff);
  if (h.index_offset + index_bytes > size ||
      pread(fd, info.sums.data(), index_bytes, static_cast<off_t>(h.index_offset)) != static_cast<ssize_t>(index_bytes))
    return bad("short index");
  if (XXH3_64bits(info.sums.data(), index_bytes) != h.index_sum) return bad("index checksum");
  return info;
}

}  // namespace larder::offload
