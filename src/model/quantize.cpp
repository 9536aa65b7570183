#include "model/quantize.h"

#include <strings.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/gguf.h"

namespace larder {

namespace {

// llama.cpp's LLAMA_FTYPE_* numbers.
enum LlamaFtype {
  kFtypeF32 = 0, kFtypeF16 = 1, kFtypeQ4_0 = 2, kFtypeQ4_1 = 3, kFtypeQ8_0 = 7, kFtypeQ5_0 = 8, kFtypeQ5_1 = 9,
  kFtypeQ4_K_S = 14, kFtypeQ4_K_M = 15, kFtypeQ5_K_S = 16, kFtypeQ5_K_M = 17, kFtypeQ6_K = 18, kFtypeBF16 = 32,
};

constexpr uint32_t kQuantizationVersion = 2;  // GGML_QNT_VERSION

const QuantFileType kFileTypes[] = {
    {"f32", DType::F32, kFtypeF32},         {"f16", DType::F16, kFtypeF16},         {"bf16", DType::BF16, kFtypeBF16},
    {"q8_0", DType::Q8_0, kFtypeQ8_0},      {"q4_0", DType::Q4_0, kFtypeQ4_0},      {"q4_1", DType::Q4_1, kFtypeQ4_1},
    {"q5_0", DType::Q5_0, kFtypeQ5_0},      {"q5_1", DType::Q5_1, kFtypeQ5_1},      {"Q4_K_S", DType::Q4_K, kFtypeQ4_K_S},
    {"Q4_K_M", DType::Q4_K, kFtypeQ4_K_M},  {"Q5_K_S", DType::Q5_K, kFtypeQ5_K_S},  {"Q5_K_M", DType::Q5_K, kFtypeQ5_K_M},
    {"q6_K", DType::Q6_K, kFtypeQ6_K},
};

bool contains(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }
bool ends_with(const std::string& s, const char* suf) {
  size_t n = std::strlen(suf);
  return s.size() >= n && s.compare(s.size() - n, n, suf) == 0;
}

int layer_of(const std::string& name) {
  int l = -1;
  if (std::sscanf(name.c_str(), "blk.%d.", &l) != 1) return -1;
  return l;
}

// ggml_n_dims: dimensions up to the last one larger than 1.
int effective_dims(const GgufTensorInfo& t) {
  for (int d = 3; d >= 1; --d)
    if (t.ne[d] > 1) return d + 1;
  return 1;
}

bool is_float_type(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
int block_size(DType t) { return dtype_info(t)->block_size; }

// llama.cpp's "use_more_bits": first and last eighth of the layers and every third in between.
bool use_more_bits(int i_layer, int n_layers) {
  return i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2;
}

// Which tensors llama-quantize converts at all (the others are copied unchanged).
bool should_quantize(const GgufTensorInfo& t) {
  const std::string& n = t.name;
  if (!ends_with(n, "weight") || effective_dims(t) < 2) return false;
  for (const char* skip : {"_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d.weight", "time_mix_first.weight",
                           "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_decay_w1.weight",
                           "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight"})
    if (contains(n, skip)) return false;
  return n != "position_embd.weight" && n != "token_types.weight";
}

struct RecipeState {
  int ftype = 0;
  bool has_output = false;
  bool is_70b = false;
  int n_attention_wv = 0, i_attention_wv = 0;
  int n_ffn_down = 0, i_ffn_down = 0;
};

// llama.cpp's llama_tensor_get_type for the file types Larder writes (dense models).
DType recipe_type(RecipeState& qs, DType new_type, const GgufTensorInfo& t, std::string* note, bool* fallback) {
  const std::string& name = t.name;
  const int64_t nx = t.ne[0];
  const int ft = qs.ftype;
  if (name == "output.weight" || (!qs.has_output && name == "token_embd.weight")) {
    if (nx % block_size(new_type) != 0) new_type = DType::Q8_0;
    else if (new_type != DType::Q8_0) new_type = DType::Q6_K;
  } else if (name == "token_embd.weight") {
    // follows the file type
  } else if (contains(name, "attn_v.weight")) {
    if ((ft == kFtypeQ4_K_M || ft == kFtypeQ5_K_M) && use_more_bits(qs.i_attention_wv, qs.n_attention_wv))
      new_type = DType::Q6_K;
    else if (ft == kFtypeQ4_K_S && qs.i_attention_wv < 4)
      new_type = DType::Q5_K;
    if (qs.is_70b && (new_type == DType::Q3_K || new_type == DType::Q4_K)) new_type = DType::Q5_K;
    ++qs.i_attention_wv;
  } else if (contains(name, "ffn_down")) {
    const int i_layer = qs.i_ffn_down, n_layer = qs.n_ffn_down;
    if (ft == kFtypeQ4_K_M) {
      if (use_more_bits(i_layer, n_layer)) new_type = DType::Q6_K;
    } else if (ft == kFtypeQ5_K_M && use_more_bits(i_layer, n_layer)) {
      new_type = DType::Q6_K;
    } else if (ft == kFtypeQ4_K_S && i_layer < n_layer / 8) {
      new_type = DType::Q5_K;
    }
    ++qs.i_ffn_down;
  } else if (contains(name, "attn_qkv.weight")) {
    if (ft == kFtypeQ4_K_M) new_type = DType::Q5_K;
    else if (ft == kFtypeQ5_K_M) new_type = DType::Q6_K;
  }
  // Rows that are not a whole number of blocks: llama.cpp's fallback table, then f16.
  if (nx % block_size(new_type) != 0) {
    const DType wanted = new_type;
    switch (new_type) {
      case DType::Q4_K: new_type = DType::Q5_0; break;
      case DType::Q5_K: new_type = DType::Q5_1; break;
      case DType::Q6_K: new_type = DType::Q8_0; break;
      default: new_type = DType::F16; break;  // (llama.cpp refuses these; f16 always fits)
    }
    if (nx % block_size(new_type) != 0) new_type = DType::F16;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%lld columns are not a multiple of the %s block size %d: using %s instead",
                  (long long)nx, dtype_name(wanted), block_size(wanted), dtype_name(new_type));
    *note = buf;
    *fallback = true;
  }
  return new_type;
}

}  // namespace

Result<QuantFileType> parse_quant_file_type(const std::string& s) {
  std::string k = s;
  if (strcasecmp(k.c_str(), "q4_K") == 0) k = "Q4_K_S";
  if (strcasecmp(k.c_str(), "q5_K") == 0) k = "Q5_K_S";
  for (const QuantFileType& t : kFileTypes)
    if (strcasecmp(t.name, k.c_str()) == 0) return t;
  return make_error("unknown quantization type '%s' (choose from: %s)", s.c_str(), quant_file_type_list().c_str());
}

std::string quant_file_type_list() {
  return "f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_K (= Q4_K_S) q5_K (= Q5_K_S) q6_K Q4_K_M Q5_K_M";
}

std::vector<TensorPlan> plan_quantization(const GgufFile& file, const QuantFileType& ft) {
  const auto& ts = file.tensors();
  RecipeState qs;
  qs.ftype = ft.llama_ftype;
  qs.has_output = file.tensor("output.weight") != nullptr;
  int max_layer = -1;
  for (const auto& t : ts) {
    if (contains(t.name, "attn_v.weight") || contains(t.name, "attn_qkv.weight") || contains(t.name, "attn_kv_b.weight"))
      ++qs.n_attention_wv;
    max_layer = std::max(max_layer, layer_of(t.name));
  }
  const std::string arch = file.get_string("general.architecture").value_or("");
  qs.n_ffn_down = static_cast<int>(file.get_int(arch + ".block_count").value_or(max_layer + 1));
  if (arch == "llama" && qs.n_ffn_down == 80) {  // llama.cpp's LLM_TYPE_70B: 80 layers with grouped-query attention
    auto nh = file.get_int("llama.attention.head_count"), nkv = file.get_int("llama.attention.head_count_kv");
    qs.is_70b = nh && nkv && *nh != *nkv;
  }
  // llama.cpp visits tensors ordered by layer, then name; its counters depend on that order.
  std::vector<size_t> order(ts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const int la = layer_of(ts[a].name), lb = layer_of(ts[b].name);
    if (la != lb) return la < lb;
    return ts[a].name < ts[b].name;
  });
  std::vector<TensorPlan> plan(ts.size());
  for (size_t idx : order) {
    const GgufTensorInfo& t = ts[idx];
    TensorPlan& p = plan[idx];
    p.name = t.name;
    p.from = p.to = t.type;
    if (!should_quantize(t)) continue;
    DType to = ft.base;
    bool fallback = false;
    if (!is_float_type(ft.base)) {
      to = recipe_type(qs, to, t, &p.note, &fallback);
    } else if (t.ne[0] % block_size(to) != 0) {
      to = DType::F16;  // unreachable for float targets (block size 1); kept for safety
    }
    p.to = to;
    p.convert = to != t.type;
  }
  return plan;
}

Result<QuantizeReport> quantize_gguf(const std::string& in, const std::string& out, const QuantFileType& ft,
                                     const QuantizeOptions& opt) {
  LARDER_TRY(g, GgufFile::open(in));
  auto log = [&](const std::string& s) {
    if (opt.log) opt.log(s);
  };
  const std::vector<TensorPlan> plan = plan_quantization(*g, ft);
  GgufWriter w;
  for (const auto& kv : g->kv()) {
    if (kv.first == "split.no" || kv.first == "split.count" || kv.first == "split.tensors.count") continue;
    w.set_value(kv.first, kv.second);
  }
  w.set_u32("general.quantization_version", kQuantizationVersion);
  w.set_u32("general.file_type", static_cast<uint32_t>(ft.llama_ftype));

  int n_requant = 0;
  for (const TensorPlan& p : plan) n_requant += p.convert && !is_float_type(p.from);
  if (n_requant > 0)
    log("note: " + std::to_string(n_requant) +
        " tensor(s) are already quantized; requantizing them adds error (quantize from f32/f16/bf16 when you can)");
  ThreadPool pool(opt.n_threads > 0 ? opt.n_threads : default_thread_count());
  QuantizeReport rep;
  const auto& ts = g->tensors();
  const int n = static_cast<int>(ts.size());
  for (int i = 0; i < n; ++i) {
    const GgufTensorInfo& t = ts[i];
    const TensorPlan& p = plan[i];
    std::vector<int64_t> ne(t.ne, t.ne + t.n_dims);
    rep.bytes_in += t.nbytes;
    rep.n_elements += static_cast<uint64_t>(t.n_elements());
    ++rep.n_tensors;
    char line[512];
    if (!p.convert) {
      w.add_tensor(t.name, t.type, ne, t.data, t.nbytes);
      rep.bytes_out += t.nbytes;
      std::snprintf(line, sizeof line, "[%4d/%4d] %-32s %-6s %10.3f MiB (copied)", i + 1, n, t.name.c_str(),
                    dtype_name(t.type), t.nbytes / 1048576.0);
      log(line);
      continue;
    }
    const kernels::TypeTraits* src_tr = kernels::type_traits(p.from);
    const kernels::TypeTraits* dst_tr = kernels::type_traits(p.to);
    if (!src_tr || !src_tr->to_float)
      return make_error("tensor '%s': cannot convert from %s (Larder has no dequantizer for it)", t.name.c_str(),
                        dtype_name(p.from));
    if (!dst_tr || !dst_tr->from_float)
      return make_error("tensor '%s': cannot quantize to %s", t.name.c_str(), dtype_name(p.to));
    const int64_t cols = t.ne[0], rows = t.n_elements() / cols;
    const size_t in_rb = row_bytes(p.from, cols), out_rb = row_bytes(p.to, cols);
    std::vector<uint8_t> buf(out_rb * rows);
    std::vector<std::vector<float>> scratch(pool.size(), std::vector<float>(2 * cols));
    std::atomic<int64_t> bad_row{INT64_MAX};
    std::atomic<int> bad_kind{0};  // 1: non-finite input, 2: not representable in the output type
    const bool check_out = p.to != DType::F32;
    pool.parallel_for(rows, [&](int64_t b, int64_t e, int tid) {
      float* xf = scratch[tid].data();
      float* yf = xf + cols;
      for (int64_t r = b; r < e; ++r) {
        src_tr->to_float(t.data + r * in_rb, xf, cols);
        for (int64_t c = 0; c < cols; ++c)
          if (!std::isfinite(xf[c])) {
            bad_kind.store(1);
            bad_row.store(std::min(bad_row.load(), r));
            return;
          }
        uint8_t* dst = buf.data() + r * out_rb;
        dst_tr->from_float(xf, dst, cols);
        if (check_out) {
          dst_tr->to_float(dst, yf, cols);
          for (int64_t c = 0; c < cols; ++c)
            if (!std::isfinite(yf[c])) {
              if (bad_kind.load() == 0) bad_kind.store(2);
              bad_row.store(std::min(bad_row.load(), r));
              return;
            }
        }
      }
    });
    if (bad_kind.load() == 1)
      return make_error("tensor '%s' has NaN or infinite values (row %lld); refusing to quantize it", t.name.c_str(),
                        (long long)bad_row.load());
    if (bad_kind.load() == 2)
      return make_error("tensor '%s' (row %lld) has values too large for %s", t.name.c_str(),
                        (long long)bad_row.load(), dtype_name(p.to));
    rep.bytes_out += buf.size();
    ++rep.n_converted;
    if (!p.note.empty()) ++rep.n_fallback;
    std::snprintf(line, sizeof line, "[%4d/%4d] %-32s %-6s -> %-6s %10.3f MiB -> %8.3f MiB%s%s", i + 1, n,
                  t.name.c_str(), dtype_name(p.from), dtype_name(p.to), t.nbytes / 1048576.0, buf.size() / 1048576.0,
                  p.note.empty() ? "" : "  (", p.note.empty() ? "" : (p.note + ")").c_str());
    log(line);
    w.add_tensor_copy(t.name, p.to, ne, std::move(buf));
  }
  Status st = w.write(out, g->alignment());
  if (!st.ok()) return st.take_error();
  return rep;
}

}  // namespace larder
