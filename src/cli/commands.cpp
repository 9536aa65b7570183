#include "cli/commands.h"

#include <cctype>
#include <tuple>

#include <pthread.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/mmap_file.h"
#include "engine/context.h"
#include "engine/sampler.h"
#include "spec/spec.h"
#include "kernels/kernels.h"
#include "model/gguf.h"
#include "model/model.h"
#include "model/synth.h"

namespace larder::cli {

Result<http::ServerOptions> http_options(const Args& a) {
  http::ServerOptions o;
  auto secs = [](double s, const char* flag, std::chrono::milliseconds& out) -> Status {
    if (!(s > 0) || s > 86400) return make_error("%s must be more than 0 and at most 86400 seconds", flag);
    out = std::chrono::milliseconds(static_cast<int64_t>(s * 1000));
    return Status::Ok();
  };
  for (auto [v, flag, out] : {std::tuple{a.timeout_keep_alive, "--timeout-keep-alive", &o.idle_timeout},
                              std::tuple{a.timeout_header, "--timeout-header", &o.header_timeout},
                              std::tuple{a.timeout_body, "--timeout-body", &o.body_timeout},
                              std::tuple{a.timeout_write, "--timeout", &o.write_timeout}})
    if (Status st = secs(v, flag, *out); !st.ok()) return st.take_error();
  if (a.max_connections < 0) return make_error("--max-connections must not be negative");
  if (a.max_connections_per_client < 0) return make_error("--max-connections-per-client must not be negative");
  if (a.threads_http < 0) return make_error("--threads-http must not be negative");
  o.max_connections = a.max_connections;
  o.max_connections_per_client = a.max_connections_per_client;
  return o;
}

Result<std::pair<DType, DType>> cache_types(const Args& a) {
  auto k = parse_kv_type(a.cache_type_k);
  if (!k.ok()) return make_error("--cache-type-k: %s", k.error().c_str());
  auto v = parse_kv_type(a.cache_type_v);
  if (!v.ok()) return make_error("--cache-type-v: %s", v.error().c_str());
  return std::pair{*k, *v};
}

sigset_t block_stop_signals() {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  return sigs;
}

int fail(const std::string& msg) {
  std::string m = msg;
  for (char& c : m)
    if (c == '\n') c = ' ';
  std::fprintf(stderr, "larder: error: %s\n", m.c_str());
  return 1;
}

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

std::string model_path(const Args& a) {
  if (!a.model.empty()) return a.model;
  return a.positional;
}

}  // namespace

Result<std::vector<int32_t>> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ',' || s[i] == ' ' || s[i] == '[' || s[i] == ']')) ++i;
    if (i >= s.size()) break;
    char* end = nullptr;
    long v = std::strtol(s.c_str() + i, &end, 10);
    if (end == s.c_str() + i || v < 0 || v > INT32_MAX) return make_error("invalid token id list '%s'", s.c_str());
    ids.push_back(static_cast<int32_t>(v));
    i = end - s.c_str();
  }
  return ids;
}

Result<std::unique_ptr<Model>> open_model(const Args& a) {
  std::string p = model_path(a);
  if (p.empty()) return make_error("no model given (use -m PATH or set LARDER_MODEL)");
  return load_model(p, a.tokenizer, !a.no_repack, ffn_on_disk(a));
}

SamplerParams sampler_params(const Args& a) {
  SamplerParams sp;
  sp.temp = a.temp;
  sp.top_k = a.top_k;
  sp.top_p = a.top_p;
  sp.min_p = a.min_p;
  sp.repeat_penalty = a.repeat_penalty;
  sp.repeat_last_n = a.repeat_last_n;
  sp.freq_penalty = a.freq_penalty;
  sp.presence_penalty = a.presence_penalty;
  sp.seed = a.seed < 0 ? 0xFFFFFFFFu : static_cast<uint64_t>(a.seed);
  return sp;
}

int cmd_run(Args& a) {
  auto kvt = cache_types(a);
  if (!kvt.ok()) return fail(kvt.error());
  auto t_load0 = Clock::now();
  auto mr = open_model(a);
  if (!mr.ok()) return fail(mr.error());
  Model& m = **mr;
  std::string prompt = a.prompt;
  if (!a.file.empty()) {
    auto f = read_file(a.file);
    if (!f.ok()) return fail(f.error());
    prompt = *f;
  }
  ContextParams cp;
  cp.n_ctx = a.n_ctx;
  cp.n_threads = a.n_threads;
  cp.n_batch = a.n_batch;
  cp.w8a8 = a.w8a8;
  cp.type_k = kvt->first;
  cp.type_v = kvt->second;
  if (a.n_ctx < 0 || a.n_threads < 0 || a.n_batch <= 0) return fail("context size, threads and batch size must be positive");
  auto ffn = open_ffn(a, m);
  if (!ffn.ok()) return fail(ffn.error());
  cp.ffn = *ffn;
  auto cr = Context::create(m, cp);
  if (!cr.ok()) return fail(cr.error());
  Context& ctx = **cr;
  double t_load = secs(t_load0, Clock::now());

  std::vector<int32_t> toks = m.tokenizer->encode(prompt, true, false);
  if (toks.empty()) return fail("the prompt is empty and the model has no BOS token");
  if (static_cast<int>(toks.size()) >= ctx.n_ctx())
    return fail("the prompt is " + std::to_string(toks.size()) + " tokens, which does not fit the context of " +
                std::to_string(ctx.n_ctx()) + " tokens (use a larger -c or a shorter prompt)");
  Sampler sampler(sampler_params(a), ctx.n_vocab());

  std::fprintf(stderr, "larder: model %s (%s, %s, %d layers, %.1f MiB), %d threads, ctx %d, isa %s, load %.2f s\n",
               m.path.c_str(), m.format.c_str(), m.cfg.arch.c_str(), m.cfg.n_layer, m.weight_bytes() / 1048576.0,
               ctx.n_threads(), ctx.n_ctx(), kernels::active_isa_name(), t_load);
  if (cp.ffn) std::fprintf(stderr, "larder: %s\n", cp.ffn->describe().c_str());
  if (!a.no_display_prompt) {
    std::fputs(prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  std::unique_ptr<spec::Drafter> drafter;
  if (!a.spec.empty() && a.spec != "none") {
    if (a.spec_max < 1 || a.spec_max > 64) return fail("--spec-max must be 1..64");
    spec::DrafterOptions o;
    o.n_threads = a.n_threads;
    o.max_seq_len = ctx.n_ctx();
    auto d = spec::make_drafter(a.spec, m, o);
    if (!d.ok()) return fail(d.error());
    drafter = std::move(*d);
  }
  spec::SpecParams spp;
  spp.max_tokens = a.spec_max;
  spp.tree = a.spec_tree;
  spp.adaptive = !a.spec_fixed;
  spec::Generator gen(ctx, sampler, drafter.get(), spp);
  auto t0 = Clock::now();
  Status st = gen.start(toks);
  if (!st.ok()) return fail(st.error());
  auto t1 = Clock::now();
  if (cp.ffn) {  // the prompt's figures, then the generation's alone
    std::fprintf(stderr, "\nlarder: prompt %s\n", ffn_report(*cp.ffn).c_str());
    cp.ffn->reset_stats();
  }
  StreamDecoder dec(*m.tokenizer, /*strip_first_space=*/prompt.empty());
  int n_gen = 0;
  const int limit = a.n_predict < 0 ? INT32_MAX : a.n_predict;
  bool stop = limit == 0;
  while (!stop) {
    for (int32_t next : gen.take()) {
      if (m.tokenizer->is_eog(next) && !a.ignore_eos) {
        stop = true;
        break;
      }
      ++n_gen;
      std::string piece = dec.push(next);
      if (!piece.empty()) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      }
      if (n_gen == limit) {
        stop = true;
        break;
      }
    }
    if (stop) break;
    if (static_cast<int>(gen.history().size()) >= ctx.n_ctx()) {
      std::fprintf(stderr, "\nlarder: context full (%d tokens), stopping\n", ctx.n_ctx());
      break;
    }
    st = gen.advance();
    if (!st.ok()) return fail(st.error());
  }
  gen.finish(true);
  std::string rest = dec.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  auto t2 = Clock::now();
  double pp = secs(t0, t1), tg = secs(t1, t2);
  std::fprintf(stderr, "larder: prompt %zu tokens in %.3f s (%.2f tok/s); generation %d tokens in %.3f s (%.2f tok/s); seed %" PRIu64 "\n",
               toks.size(), pp, toks.size() / std::max(pp, 1e-9), n_gen, tg, n_gen / std::max(tg, 1e-9), sampler.seed());
  if (cp.ffn) std::fprintf(stderr, "larder: generation %s\n", ffn_report(*cp.ffn).c_str());
  if (drafter) {
    const auto& ss = gen.stats();
    std::fprintf(stderr, "larder: spec %s: %" PRId64 " verify passes (%" PRId64 " without a draft), %" PRId64
                         " drafted, %" PRId64 " accepted (%.0f%%), %.2f tokens per pass\n",
                 drafter->name().c_str(), ss.steps + ss.plain, ss.plain, ss.proposed, ss.accepted,
                 100.0 * ss.accepted / std::max<int64_t>(1, ss.proposed),
                 static_cast<double>(n_gen) / std::max<int64_t>(1, ss.steps + ss.plain + 1));
  }
  return 0;
}

int cmd_info(Args& a) {
  std::string p = model_path(a);
  if (p.empty()) return fail("no model given (larder info FILE)");
  if (!file_exists(p)) return fail("file not found: " + p);
  bool is_gguf = false;
  if (!is_directory(p)) {
    FILE* f = std::fopen(p.c_str(), "rb");
    char mg[4] = {0};
    if (f) {
      is_gguf = std::fread(mg, 1, 4, f) == 4 && std::memcmp(mg, "GGUF", 4) == 0;
      std::fclose(f);
    }
  }
  if (is_gguf) {
    auto g = GgufFile::open(p);
    if (!g.ok()) return fail(g.error());
    const GgufFile& gf = **g;
    std::printf("file: %s\nformat: GGUF v%u, %zu bytes, alignment %zu\n", p.c_str(), gf.version(), gf.file_size(), gf.alignment());
    std::printf("metadata (%zu keys):\n", gf.kv().size());
    for (const auto& [k, v] : gf.kv()) std::printf("  %-45s %s\n", k.c_str(), v.to_string().c_str());
    std::printf("tensors (%zu):\n", gf.tensors().size());
    size_t total = 0;
    for (const auto& t : gf.tensors()) {
      std::string shape;
      for (int d = 0; d < t.n_dims; ++d) shape += (d ? " x " : "") + std::to_string(t.ne[d]);
      std::printf("  %-36s %-6s [%s] %zu bytes\n", t.name.c_str(), dtype_name(t.type), shape.c_str(), t.nbytes);
      total += t.nbytes;
    }
    std::printf("total tensor data: %.2f MiB\n", total / 1048576.0);
    if (!gf.get_string("general.architecture")) return 0;  // tokenizer-only file
  }
  auto mr = load_model(p, a.tokenizer, false);
  if (!mr.ok()) return fail(mr.error());
  const Model& m = **mr;
  const ModelConfig& c = m.cfg;
  std::printf("model: %s (%s)\n  arch %s, vocab %d, embd %d, ff %d, layers %d, heads %d (kv %d), head_dim %d, ctx %d\n",
              m.path.c_str(), m.format.c_str(), c.arch.c_str(), c.n_vocab, c.n_embd, c.n_ff, c.n_layer, c.n_head,
              c.n_head_kv, c.head_dim, c.n_ctx_train);
  std::printf("  rms_eps %g, rope %s theta %g%s, %s embeddings%s\n", c.rms_eps, c.rope_type == RopeType::NEOX ? "neox" : "normal",
              c.rope_theta, c.rope_freq_factors.empty() ? "" : " (llama3 scaling)", c.tied_embeddings ? "tied" : "untied",
              c.qkv_bias ? ", qkv bias" : "");
  std::printf("  weights %.2f MiB, tokenizer %s with %d tokens (bos %d, eos %d)\n", m.weight_bytes() / 1048576.0,
              m.tokenizer->vocab().kind == TokenizerKind::SPM ? "spm" : "bpe", m.tokenizer->n_vocab(), m.tokenizer->bos(),
              m.tokenizer->eos());
  if (!is_gguf) {
    std::printf("tensors:\n");
    auto pr = [](const Tensor& t) {
      if (t.present()) std::printf("  %-36s %-6s [%lld x %lld] %zu bytes\n", t.name.c_str(), dtype_name(t.type),
                                   (long long)t.rows(), (long long)t.cols(), t.nbytes);
    };
    pr(m.tok_embd);
    pr(m.output_norm);
    if (!c.tied_embeddings) pr(m.output);
    for (const auto& l : m.layers)
      for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.bq, &l.bk, &l.bv, &l.wo, &l.ffn_norm, &l.ffn_gate,
                              &l.ffn_up, &l.ffn_down})
        pr(*t);
  }
  return 0;
}

namespace {
Result<std::unique_ptr<Tokenizer>> open_tokenizer(const Args& a) {
  std::string p = a.model;
  if (p.empty()) return make_error("no model or tokenizer given (use -m PATH)");
  if (!file_exists(p)) return make_error("file not found: %s", p.c_str());
  if (!is_directory(p)) {
    FILE* f = std::fopen(p.c_str(), "rb");
    char mg[4] = {0};
    bool gg = false;
    if (f) {
      gg = std::fread(mg, 1, 4, f) == 4 && std::memcmp(mg, "GGUF", 4) == 0;
      std::fclose(f);
    }
    if (gg) {
      LARDER_TRY(g, GgufFile::open(p));
      return load_tokenizer_gguf(*g);
    }
    // A llama2.c checkpoint carries no vocabulary: load it as a model to find its tokenizer.
    std::string base = p.substr(p.find_last_of('/') + 1);
    if (base.size() > 4 && base.compare(base.size() - 4, 4, ".bin") == 0 && base.find("tok") == std::string::npos) {
      LARDER_TRY(m, load_model(p, a.tokenizer, false));
      return std::move(m->tokenizer);
    }
  } else if (file_exists(p + "/config.json") && !file_exists(p + "/tokenizer.json") &&
             !file_exists(p + "/tokenizer.model")) {
    return make_error("%s has no tokenizer.json or tokenizer.model", p.c_str());
  }
  return load_tokenizer_any(p);
}

std::string show_piece(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else out += static_cast<char>(c);
  }
  return out;
}
}  // namespace

int cmd_tokenize(Args& a) {
  auto tr = open_tokenizer(a);
  if (!tr.ok()) return fail(tr.error());
  const Tokenizer& tok = **tr;
  if (!a.json_batch.empty()) {
    auto f = read_file(a.json_batch);
    if (!f.ok()) return fail(f.error());
    auto j = nlohmann::json::parse(*f, nullptr, false);
    if (j.is_discarded() || !j.is_array()) return fail(a.json_batch + ": expected a JSON array of strings");
    nlohmann::json out = nlohmann::json::array();
    for (const auto& s : j) {
      if (a.decode) {
        if (!s.is_array()) return fail(a.json_batch + ": --decode expects a JSON array of id lists");
        std::vector<int32_t> ids;
        for (const auto& id : s) {
          if (!id.is_number_integer()) return fail(a.json_batch + ": --decode expects a JSON array of id lists");
          ids.push_back(id.get<int32_t>());
        }
        out.push_back(tok.decode(ids, a.parse_special));
        continue;
      }
      if (!s.is_string()) return fail(a.json_batch + ": expected a JSON array of strings");
      out.push_back(tok.encode(s.get<std::string>(), !a.no_bos, a.parse_special));
    }
    // Decoded bytes that are not valid UTF-8 (a cut multi-byte character) print as U+FFFD.
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  if (a.decode) return fail("--decode needs --json-batch FILE");
  std::string text = a.prompt.empty() ? a.positional : a.prompt;
  std::vector<int32_t> ids = tok.encode(text, !a.no_bos, a.parse_special);
  if (a.ids_only) {
    std::string s = "[";
    for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
    std::printf("%s]\n", s.c_str());
    return 0;
  }
  for (int32_t id : ids) {
    const std::string& piece = tok.vocab().tokens[id];
    std::printf("%6d -> '%s'\n", id, show_piece(piece).c_str());
  }
  std::printf("%zu tokens\n", ids.size());
  return 0;
}

int cmd_synth(Args& a) {
  if (a.shape.empty()) return fail("synth needs --shape NAME (stories15M, stories42M, stories110M, llama-3.2-1b, qwen2.5-0.5b, custom)");
  if (a.out.empty()) return fail("synth needs -o FILE");
  SynthShape s;
  if (a.shape == "custom") {
    s.arch = a.arch;
    if (s.arch != "llama" && s.arch != "qwen2") return fail("synth: --arch must be llama or qwen2");
    s.n_embd = a.n_embd; s.n_ff = a.n_ff; s.n_layer = a.n_layer; s.n_head = a.n_head; s.n_head_kv = a.n_head_kv;
    s.n_vocab = a.n_vocab; s.n_ctx = a.n_ctx_train; s.tied = a.tied != 0; s.llama3_rope = a.llama3_rope;
    if (s.arch == "qwen2") { s.rope_theta = 1000000.f; s.rms_eps = 1e-6f; }
    if (s.llama3_rope) s.rope_theta = 500000.f;
  } else {
    auto r = synth_shape(a.shape);
    if (!r.ok()) return fail(r.error());
    s = *r;
  }
  SynthOptions o;
  if (!parse_dtype(a.dtype, &o.dtype)) return fail("unknown dtype '" + a.dtype + "'");
  o.seed = a.seed < 0 ? 42 : static_cast<uint64_t>(a.seed);
  o.scale = static_cast<float>(a.scale);
  o.vocab_from = a.vocab_from;
  Status st = synth_model(s, o, a.out);
  if (!st.ok()) return fail(st.error());
  std::fprintf(stderr, "synth: wrote %s (%s, %s)\n", a.out.c_str(), s.name.c_str(), a.dtype.c_str());
  return 0;
}

int cmd_logits(Args& a) {
  auto kvt = cache_types(a);
  if (!kvt.ok()) return fail(kvt.error());
  auto idr = parse_ids(a.ids);
  if (!idr.ok()) return fail(idr.error());
  std::vector<int32_t> ids = *idr;
  if (ids.empty()) return fail("logits needs --ids");
  auto mr = open_model(a);
  if (!mr.ok()) return fail(mr.error());
  Model& m = **mr;
  ContextParams cp;
  cp.n_threads = a.n_threads;
  cp.n_batch = a.n_batch;
  cp.n_ctx = a.n_ctx > 0 ? a.n_ctx : static_cast<int>(ids.size()) + std::max(a.greedy, 0) + 1;
  cp.w8a8 = a.w8a8;
  cp.type_k = kvt->first;
  cp.type_v = kvt->second;
  auto ffn = open_ffn(a, m);
  if (!ffn.ok()) return fail(ffn.error());
  cp.ffn = *ffn;
  auto cr = Context::create(m, cp);
  if (!cr.ok()) return fail(cr.error());
  Context& ctx = **cr;
  const int V = ctx.n_vocab();
  std::vector<float> logits;
  if (!a.out.empty()) logits.resize(ids.size() * static_cast<size_t>(V));
  size_t chunk = a.chunk > 0 ? static_cast<size_t>(a.chunk) : ids.size();
  for (size_t off = 0; off < ids.size(); off += chunk) {
    size_t n = std::min(chunk, ids.size() - off);
    Status st = ctx.decode(std::span<const int32_t>(ids.data() + off, n), logits.empty() ? nullptr : logits.data() + off * V);
    if (!st.ok()) return fail(st.error());
  }
  if (!a.out.empty()) {
    FILE* f = std::fopen(a.out.c_str(), "wb");
    if (!f) return fail("cannot create " + a.out);
    bool ok = std::fwrite(logits.data(), sizeof(float), logits.size(), f) == logits.size();
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) return fail("error writing " + a.out);
  }
  if (a.greedy > 0) {
    std::vector<int32_t> gen;
    for (int i = 0; i < a.greedy; ++i) {
      const float* lg = ctx.logits();
      int32_t best = 0;
      for (int32_t v = 1; v < V; ++v)
        if (lg[v] > lg[best]) best = v;
      gen.push_back(best);
      if (i + 1 < a.greedy) {
        int32_t one[1] = {best};
        Status st = ctx.decode(one);
        if (!st.ok()) return fail(st.error());
      }
    }
    std::printf("%s\n", nlohmann::json(gen).dump().c_str());
  }
  return 0;
}

// "512M", "1G", "64MiB", "1048576" -> bytes (binary units); -1 when malformed.
int64_t parse_size(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  if (i == 0 || i > 15) return -1;
  int64_t v = std::stoll(s.substr(0, i));
  std::string unit;
  for (size_t j = i; j < s.size(); ++j) unit += static_cast<char>(std::toupper(static_cast<unsigned char>(s[j])));
  if (unit.empty() || unit == "B") return v;
  const char* units[] = {"K", "M", "G", "T"};
  int64_t mul = 1;
  for (const char* u : units) {
    mul *= 1024;
    std::string U = u;
    if (unit == U || unit == U + "B" || unit == U + "IB") return v * mul;
  }
  return -1;
}

}  // namespace larder::cli
