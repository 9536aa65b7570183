// larder offload-prepare / calibrate-sparsity, and the FFN options of run, chat, logits, perplexity,
// bench and serve (src/offload).
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "core/mmap_file.h"
#include "engine/context.h"

namespace larder::cli {

bool ffn_wanted(const Args& a) { return !a.ffn_offload.empty() || a.ffn_sparsity >= 0; }
// In DRAM too (--ffn-sparsity alone) the up/down matrices are read only to build the records.
bool ffn_on_disk(const Args& a) { return ffn_wanted(a); }

Result<std::shared_ptr<offload::SparseFfn>> open_ffn(const Args& a, const Model& m) {
  if (!ffn_wanted(a)) {
    if (!a.weights_budget.empty()) return make_error("--weights-dram-budget needs --ffn-offload DIR");
    return std::shared_ptr<offload::SparseFfn>();
  }
  if (a.spec.rfind("self", 0) == 0)
    return make_error("--spec %s and a sparse or offloaded FFN do not combine (the self-drafter runs the dense FFN)",
                      a.spec.c_str());
  offload::Params p;
  p.dir = a.ffn_offload;
  p.down_type = a.down_type;
  p.window = a.ffn_window;
  p.io_threads = a.ffn_io_threads;
  p.static_cache = a.ffn_naive;
  p.direct = !a.ffn_no_direct;
  p.prefetch = a.ffn_prefetch;
  if (a.ffn_window < 1 || a.ffn_window > 1000000) return make_error("--ffn-window must be at least 1");
  if (!a.weights_budget.empty()) {
    if (a.ffn_offload.empty()) return make_error("--weights-dram-budget needs --ffn-offload DIR");
    p.dram_budget = parse_size(a.weights_budget);
    if (p.dram_budget <= 0) return make_error("invalid --weights-dram-budget '%s' (e.g. 2G, 512M)", a.weights_budget.c_str());
  }
  if (!(a.ffn_sparsity < 1) || (a.ffn_sparsity < 0 && a.ffn_sparsity != -1)) return make_error("--ffn-sparsity must be in [0, 1)");
  if (a.ffn_sparsity > 0) {
    std::string f = a.ffn_thresholds;
    if (f.empty()) {
      const std::string in_dir = a.ffn_offload.empty() ? "" : (std::filesystem::path(a.ffn_offload) / "sparsity.json").string();
      f = !in_dir.empty() && std::filesystem::exists(in_dir) ? in_dir : m.path + ".sparsity.json";
    }
    LARDER_TRY(t, offload::load_sparsity(f));
    if (t.model != m.fingerprint() || t.n_layer != m.cfg.n_layer || t.n_ff != m.cfg.n_ff)
      return make_error("thresholds '%s' were calibrated on another model (run larder calibrate-sparsity for this one)", f.c_str());
    LARDER_TRY(th, offload::thresholds_for(t, a.ffn_sparsity));
    p.thresholds = std::move(th);
  }
  LARDER_TRY(s, offload::SparseFfn::open(m, p));
  return std::shared_ptr<offload::SparseFfn>(std::move(s));
}

std::string ffn_report(const offload::SparseFfn& f) {
  const offload::Stats& s = f.stats();
  const double n = static_cast<double>(std::max<int64_t>(1, s.tokens));
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "ffn: %" PRId64 " tokens in %" PRId64 " passes; per token: I/O wait %.2f ms, cache %.2f ms, compute %.2f "
                "ms, %.1f KiB read on demand (%.1f KiB of missing neurons, %.1f reads); active %.1f%%, cache hit rate %.1f%%; "
                "read ahead %.1f KiB, %.1f%% of it used, wait %.2f ms",
                s.tokens, s.steps, 1e3 * s.io_wait_s / n, 1e3 * s.cache_s / n, 1e3 * s.compute_s / n,
                s.bytes_read / 1024.0 / n, s.bytes_needed / 1024.0 / n, s.reads / n, 100.0 * s.active / std::max<int64_t>(1, s.neurons),
                100.0 * s.hits / std::max<int64_t>(1, s.hits + s.misses), s.prefetch_bytes / 1024.0 / n,
                100.0 * s.prefetch_used / std::max<int64_t>(1, s.prefetched), 1e3 * s.prefetch_wait_s / n);
  return buf;
}

namespace {
std::string model_arg(Args& a, size_t* next) {
  *next = 0;
  if (!a.model.empty()) return a.model;
  if (!a.pos_args.empty()) {
    *next = 1;
    return a.pos_args[0];
  }
  const char* e = std::getenv("LARDER_MODEL");
  return e ? e : "";
}
}  // namespace

int cmd_offload_prepare(Args& a) {
  size_t k = 0;
  const std::string model = model_arg(a, &k);
  if (model.empty() || a.pos_args.size() != k + 1) return fail("usage: larder offload-prepare MODEL DIR");
  const std::string dir = a.pos_args[k];
  auto mr = load_model(model, a.tokenizer, /*repack=*/false);
  if (!mr.ok()) return fail(mr.error());
  std::fprintf(stderr, "larder: writing the FFN offload layout of %s to %s\n", model.c_str(), dir.c_str());
  Status st = offload::prepare(**mr, dir, a.down_type, [](int done, int total) {
    std::fprintf(stderr, "\rlarder: layer %d/%d", done, total);
    if (done == total) std::fputc('\n', stderr);
  });
  if (!st.ok()) return fail(st.error());
  auto info = offload::read_layout(**mr, dir);
  if (!info.ok()) return fail(info.error());
  uint64_t rec = 0;
  for (const auto& l : info->layers) rec += l.record_bytes;
  std::printf("%s: %d layers x %d neurons, %s up rows + %s down columns, %.1f KiB per neuron of every layer, %.1f MiB\n",
              (std::filesystem::path(dir) / "ffn.bin").c_str(), info->n_layer, info->n_ff,
              dtype_name(info->layers[0].up_type), dtype_name(info->layers[0].down_type), rec / 1024.0,
              info->file_bytes / 1048576.0);
  return 0;
}

int cmd_calibrate_sparsity(Args& a) {
  size_t k = 0;
  const std::string model = model_arg(a, &k);
  if (model.empty() || a.pos_args.size() != k + 1) return fail("usage: larder calibrate-sparsity MODEL TEXT [-o FILE]");
  const std::string text_path = a.pos_args[k];
  auto text = read_file(text_path);
  if (!text.ok()) return fail(text.error());
  auto mr = load_model(model, a.tokenizer, !a.no_repack);
  if (!mr.ok()) return fail(mr.error());
  const Model& m = **mr;
  if (Status st = offload::check_gated_ffn(m); !st.ok()) return fail(st.error());
  std::vector<int32_t> toks = m.tokenizer->encode(*text, /*add_bos=*/false, false);
  const int C = a.n_ctx > 0 ? a.n_ctx : std::min(512, m.cfg.n_ctx_train > 0 ? m.cfg.n_ctx_train : 512);
  if (a.doc_limit > 0 && static_cast<int>(toks.size()) > a.doc_limit) toks.resize(a.doc_limit);
  if (static_cast<int>(toks.size()) < 16) return fail("the calibration text has too few tokens");
  ContextParams cp;
  cp.n_ctx = C;
  cp.n_threads = a.n_threads;
  cp.n_batch = C;
  auto cr = Context::create(m, cp);
  if (!cr.ok()) return fail(cr.error());
  Context& ctx = **cr;
  offload::SparsityCalibrator cal(m.cfg.n_layer, m.cfg.n_ff, m.cfg.ffn_act == FfnAct::GELU_TANH);
  ctx.set_gate_hook([&](int l, const float* g, int n, int64_t ld) { cal.add(l, g, n, ld); });
  const bool bos = m.tokenizer->vocab().add_bos && m.tokenizer->bos() >= 0;
  size_t used = 0;
  for (size_t off = 0; off < toks.size(); off += C - (bos ? 1 : 0)) {  // windows, each starting with BOS
    std::vector<int32_t> w;
    if (bos) w.push_back(m.tokenizer->bos());
    const size_t n = std::min<size_t>(toks.size() - off, C - w.size());
    w.insert(w.end(), toks.begin() + off, toks.begin() + off + n);
    ctx.reset();
    if (Status st = ctx.decode(w); !st.ok()) return fail(st.error());
    used += n;
    std::fprintf(stderr, "\rlarder: calibrating on %zu / %zu tokens", used, toks.size());
  }
  std::fputc('\n', stderr);
  std::vector<double> levels;
  for (int i = 1; i <= 19; ++i) levels.push_back(i / 20.0);
  offload::SparsityTable t = cal.finish(levels);
  t.model = m.fingerprint();
  t.tokens = static_cast<int64_t>(used);
  t.source = std::filesystem::path(text_path).filename().string();
  const std::string out = a.out.empty() ? model + ".sparsity.json" : a.out;
  if (Status st = offload::save_sparsity(t, out); !st.ok()) return fail(st.error());
  std::printf("%s: thresholds of %d layers at sparsity 0.05..0.95 from %zu tokens of %s\n", out.c_str(), t.n_layer, used,
              t.source.c_str());
  return 0;
}

}  // namespace larder::cli
