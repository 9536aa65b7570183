// `larder docs`: per-document KV (src/docs) from the command line.
//   --tokens-json IN --dump OUT   one prompt given as token ids, composed in --mode; writes the
//                                 positions, the recomputed entries and the query's logits (the
//                                 PyTorch reference test reads them);
//   --cases F --methods M -o R    the fidelity benchmark: every case (bench/docs_fidelity.py gen) in
//                                 every method against sequential prefill: exact match, KL at the
//                                 answer and over 32 teacher-forced tokens, top-1 agreement,
//                                 recomputed fraction, time to first token. Documents are encoded
//                                 once (each after its case's prefix) and reused by every case.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "docs/docs.h"
#include "engine/context.h"
#include "tokenizer/tokenizer.h"

namespace larder::cli {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Blocks of one Context handed out from a free list: the CLI's stand-in for the block manager.
class Blocks {
 public:
  Blocks(int n, int bs) : bs_(bs) {
    for (int i = n - 1; i >= 0; --i) free_.push_back(i);
  }
  Result<std::vector<int32_t>> take(int tokens) {
    const size_t n = (static_cast<size_t>(tokens) + bs_ - 1) / bs_;
    if (n > free_.size()) return make_error("KV pool too small: %zu blocks wanted, %zu free (use a larger -c)", n, free_.size());
    std::vector<int32_t> t(free_.end() - n, free_.end());
    free_.resize(free_.size() - n);
    return t;
  }
  bool can_take(int tokens) const { return (static_cast<size_t>(tokens) + bs_ - 1) / bs_ <= free_.size(); }
  void give(std::vector<int32_t>& t) {
    free_.insert(free_.end(), t.begin(), t.end());
    t.clear();
  }

 private:
  int bs_;
  std::vector<int32_t> free_;
};

// Prefixes computed once, documents encoded once after their prefix, and composition into a
// working table (what the server does with the block manager and the tiers).
class Composer {
 public:
  Composer(Context& ctx) : ctx_(ctx), blocks_(ctx.n_blocks(), ctx.block_size()) {}

  // KV of [prefix] at [0, P) of table t (computed once per distinct prefix).
  Status prefix_into(const std::vector<int32_t>& prefix, std::span<const int32_t> t) {
    auto& pt = prefixes_[prefix];
    if (pt.empty() && !prefix.empty()) {
      LARDER_TRY(b, blocks_.take(static_cast<int>(prefix.size())));
      pt = std::move(b);
      LARDER_CHECK_STATUS(docs::encode(ctx_, pt, 0, prefix));
    }
    ctx_.copy_kv(pt, 0, t, 0, static_cast<int>(prefix.size()));
    return Status::Ok();
  }
  // The document's stored KV (entries [0, n), encoded at positions P..P+n-1 after `prefix`).
  Result<const std::vector<int32_t>*> doc(const std::vector<int32_t>& prefix, const std::vector<int32_t>& d,
                                          double* encode_s) {
    std::vector<int32_t> key = prefix;
    key.push_back(-1);
    key.insert(key.end(), d.begin(), d.end());
    auto it = docs_.find(key);
    if (it != docs_.end()) return &it->second;
    const auto t0 = Clock::now();
    const int P = static_cast<int>(prefix.size()), n = static_cast<int>(d.size());
    LARDER_TRY(scratch, blocks_.take(P + n));
    LARDER_CHECK_STATUS(prefix_into(prefix, scratch));
    LARDER_CHECK_STATUS(docs::encode(ctx_, scratch, P, d));
    LARDER_TRY(store, blocks_.take(n));
    ctx_.copy_kv(scratch, P, store, 0, n);
    blocks_.give(scratch);
    if (encode_s) *encode_s += since(t0);
    return &(docs_[key] = std::move(store));
  }
  Blocks& blocks() { return blocks_; }
  // Room for a prompt of `work` tokens with these documents (stored or not): when the pool cannot
  // hold them, it forgets every stored document first (encoded again when they recur).
  void make_room(const std::vector<int32_t>& prefix, const std::vector<std::vector<int32_t>>& ds, int work) {
    int need = work + static_cast<int>(prefix.size()), longest = 0;
    for (const auto& d : ds) {
      need += static_cast<int>(d.size()) + ctx_.block_size();  // stored copy, rounded up
      longest = std::max(longest, static_cast<int>(d.size()));
    }
    need += static_cast<int>(prefix.size()) + longest;  // encoding scratch
    if (blocks_.can_take(need)) return;
    for (auto& [k, t] : docs_) blocks_.give(t);
    docs_.clear();
  }

 private:
  Context& ctx_;
  Blocks blocks_;
  std::map<std::vector<int32_t>, std::vector<int32_t>> prefixes_, docs_;
};

// Tokens after the documents (query, then generated or teacher-forced ones) from entry n_kv on:
// their positions and, in parallel mode, APE's attention. logits: [tokens][vocab] when all, else the last.
Status decode_after(Context& ctx, std::span<const int32_t> table, const docs::Layout& lay, const docs::Params& p,
                    std::span<const int32_t> toks, int n_kv, float* logits, bool all) {
  const SegAttn seg = docs::seg_attn(lay, p);
  std::vector<int32_t> pos;
  const int V = ctx.n_vocab();
  for (size_t off = 0; off < toks.size(); off += ctx.n_batch()) {
    const size_t n = std::min<size_t>(ctx.n_batch(), toks.size() - off);
    pos.resize(n);
    for (size_t i = 0; i < n; ++i) pos[i] = lay.position(p.mode, n_kv + static_cast<int>(off + i));
    SeqBatch sb;
    sb.tokens = toks.subspan(off, n);
    sb.positions = pos;
    sb.block_table = table;
    sb.n_kv = n_kv + static_cast<int>(off);
    sb.seg = p.mode == docs::Mode::Parallel ? &seg : nullptr;
    sb.all_logits = all;
    sb.logits = all ? logits + off * V : (off + n == toks.size() ? logits : nullptr);
    LARDER_CHECK_STATUS(ctx.decode_batch(std::span<const SeqBatch>(&sb, 1)));
  }
  return Status::Ok();
}

struct Composed {
  docs::Layout lay;
  std::vector<int32_t> tokens;  // prefix, documents, query
  docs::Stats st;
};

// Puts prefix + documents (stored KV, composed for the mode; sequential: prefilled) into `table`
// and runs the query: `first` receives the logits after its last token ([nq][vocab] when all).
Status run_prompt(Context& ctx, Composer& comp, std::span<const int32_t> table, const std::vector<int32_t>& prefix,
                  const std::vector<std::vector<int32_t>>& ds, const std::vector<int32_t>& query, const docs::Params& p,
                  float* first, bool all, Composed* out, double* encode_s) {
  Composed c;
  c.lay.prefix = static_cast<int>(prefix.size());
  c.tokens = prefix;
  for (const auto& d : ds) {
    c.lay.doc_len.push_back(static_cast<int>(d.size()));
    c.tokens.insert(c.tokens.end(), d.begin(), d.end());
  }
  c.tokens.insert(c.tokens.end(), query.begin(), query.end());
  const int end = c.lay.end();
  // Stored documents first (their encoding is not part of this prompt's time).
  std::vector<const std::vector<int32_t>*> stored;
  if (p.mode != docs::Mode::Sequential)
    for (const auto& d : ds) {
      LARDER_TRY(s, comp.doc(prefix, d, encode_s));
      stored.push_back(s);
    }
  const auto t0 = Clock::now();
  LARDER_CHECK_STATUS(comp.prefix_into(prefix, table));
  if (p.mode == docs::Mode::Sequential) {
    std::vector<int32_t> rest(c.tokens.begin() + c.lay.prefix, c.tokens.end());
    if (all && !query.empty()) {
      LARDER_CHECK_STATUS(docs::encode(ctx, table, c.lay.prefix, std::span<const int32_t>(rest).first(end - c.lay.prefix)));
      LARDER_CHECK_STATUS(decode_after(ctx, table, c.lay, p, query, end, first, true));
    } else {
      LARDER_CHECK_STATUS(decode_after(ctx, table, c.lay, p, rest, c.lay.prefix, first, false));
    }
  } else {
    for (int i = 0; i < c.lay.n_docs(); ++i) ctx.copy_kv(*stored[i], 0, table, c.lay.doc_begin(i), c.lay.doc_len[i]);
    LARDER_CHECK_STATUS(docs::compose(ctx, table, c.lay, c.tokens, p, &c.st));
    if (!query.empty()) LARDER_CHECK_STATUS(decode_after(ctx, table, c.lay, p, query, end, first, all));
  }
  c.st.seconds = since(t0);
  *out = std::move(c);
  return Status::Ok();
}

Result<docs::Params> params_from(const Args& a) {
  docs::Params p;
  LARDER_TRY(m, docs::parse_mode(a.doc_mode));
  p.mode = m;
  p.ape_t = a.ape_t;
  p.ape_s = a.ape_s;
  p.blend_ratio = a.blend_ratio;
  p.blend_layers = a.blend_layers;
  p.link_k = a.link_k;
  p.focus_budget = a.focus_budget;
  p.focus_k = a.focus_k;
  p.focus_rounds = a.focus_rounds;
  LARDER_CHECK_STATUS(p.validate());
  return p;
}

// "blend:r=0.15:f=2" -> Params (keys: t, s for parallel; r, f for blend; k for link/focus; b for focus).
Result<std::pair<std::string, docs::Params>> method_from(const std::string& spec, const docs::Params& base) {
  std::vector<std::string> parts;
  size_t i = 0;
  for (size_t j; (j = spec.find(':', i)) != std::string::npos; i = j + 1) parts.push_back(spec.substr(i, j - i));
  parts.push_back(spec.substr(i));
  docs::Params p = base;
  LARDER_TRY(m, docs::parse_mode(parts[0]));
  p.mode = m;
  for (size_t k = 1; k < parts.size(); ++k) {
    const auto eq = parts[k].find('=');
    if (eq == std::string::npos) return make_error("method '%s': '%s' is not key=value", spec.c_str(), parts[k].c_str());
    const std::string key = parts[k].substr(0, eq);
    char* e = nullptr;
    const double v = std::strtod(parts[k].c_str() + eq + 1, &e);
    if (*e) return make_error("method '%s': bad number in '%s'", spec.c_str(), parts[k].c_str());
    if (key == "t") p.ape_t = static_cast<float>(v);
    else if (key == "s") p.ape_s = static_cast<float>(v);
    else if (key == "r") p.blend_ratio = static_cast<float>(v);
    else if (key == "f") p.blend_layers = static_cast<int>(v);
    else if (key == "k") (m == docs::Mode::Link ? p.link_k : p.focus_k) = static_cast<int>(v);
    else if (key == "b") p.focus_budget = static_cast<float>(v);
    else if (key == "n") p.focus_rounds = static_cast<int>(v);
    else if (key == "q") p.focus_last = static_cast<int>(v);
    else return make_error("method '%s': unknown key '%s' (t, s, r, f, k, b, n, q)", spec.c_str(), key.c_str());
  }
  LARDER_CHECK_STATUS(p.validate());
  return std::make_pair(spec, p);
}

// log-softmax of a logits row (doubles: KL of close distributions).
std::vector<double> log_softmax(const float* x, int V) {
  double m = x[0];
  for (int v = 1; v < V; ++v) m = std::max(m, static_cast<double>(x[v]));
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(x[v] - m);
  const double l = m + std::log(s);
  std::vector<double> o(V);
  for (int v = 0; v < V; ++v) o[v] = x[v] - l;
  return o;
}
double kl(const std::vector<double>& lp, const std::vector<double>& lq) {
  double k = 0;
  for (size_t v = 0; v < lp.size(); ++v) k += std::exp(lp[v]) * (lp[v] - lq[v]);
  return std::max(0.0, k);
}
int32_t argmax(const float* x, int V) {
  int32_t b = 0;
  for (int v = 1; v < V; ++v)
    if (x[v] > x[b]) b = v;
  return b;
}

int tokens_mode(Args& a, Context& ctx, Composer& comp) {
  auto pr = params_from(a);
  if (!pr.ok()) return fail(pr.error());
  nlohmann::json in;
  try {
    std::ifstream f(a.tokens_json);
    if (!f) return fail("cannot open " + a.tokens_json);
    in = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    return fail(a.tokens_json + ": " + e.what());
  }
  std::vector<int32_t> prefix, query;
  std::vector<std::vector<int32_t>> ds;
  try {
    prefix = in.at("prefix").get<std::vector<int32_t>>();
    ds = in.at("docs").get<std::vector<std::vector<int32_t>>>();
    query = in.at("query").get<std::vector<int32_t>>();
  } catch (const std::exception& e) {
    return fail(a.tokens_json + ": needs prefix, docs and query as token id arrays (" + e.what() + ")");
  }
  for (const auto& d : ds)
    if (d.empty()) return fail("a document is empty");
  if (query.empty()) return fail("the query is empty");
  int total = static_cast<int>(prefix.size() + query.size());
  for (const auto& d : ds) total += static_cast<int>(d.size());
  auto tr = comp.blocks().take(total);
  if (!tr.ok()) return fail(tr.error());
  const int V = ctx.n_vocab();
  std::vector<float> logits(query.size() * static_cast<size_t>(V));
  Composed c;
  Status st = run_prompt(ctx, comp, *tr, prefix, ds, query, *pr, logits.data(), true, &c, nullptr);
  if (!st.ok()) return fail(st.error());
  nlohmann::json out;
  out["mode"] = docs::mode_name(pr->mode);
  out["prefix_len"] = c.lay.prefix;
  out["doc_lens"] = c.lay.doc_len;
  std::vector<int> pos;
  for (int e = 0; e < static_cast<int>(c.tokens.size()); ++e) pos.push_back(c.lay.position(pr->mode, e));
  out["positions"] = pos;
  out["full_layers"] = c.st.full_layers;
  out["recomputed"] = c.st.selected;
  out["ape"] = pr->mode == docs::Mode::Parallel ? nlohmann::json{{"t", pr->ape_t}, {"s", pr->ape_s}} : nlohmann::json();
  out["recompute_fraction"] = c.st.fraction();
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < query.size(); ++i)
    rows.push_back(std::vector<float>(logits.begin() + i * V, logits.begin() + (i + 1) * V));
  out["logits"] = std::move(rows);
  std::ofstream f(a.dump);
  if (!f) return fail("cannot create " + a.dump);
  f << out.dump();
  if (!f.good()) return fail("error writing " + a.dump);
  std::fprintf(stderr, "docs: %s, %d prefix + %d document + %zu query tokens, recomputed %.3f of token-layers\n",
               docs::mode_name(pr->mode), c.lay.prefix, c.lay.doc_tokens(), query.size(), c.st.fraction());
  return 0;
}

int bench_mode(Args& a, const Model& m, Context& ctx, Composer& comp) {
  auto base = params_from(a);
  if (!base.ok()) return fail(base.error());
  std::vector<std::pair<std::string, docs::Params>> methods;
  for (const std::string& s : split(a.doc_methods.empty() ? "parallel,reposition,blend,link,focus" : a.doc_methods)) {
    auto r = method_from(s, *base);
    if (!r.ok()) return fail(r.error());
    if (r->second.mode != docs::Mode::Sequential) methods.push_back(*r);
  }
  std::ifstream in(a.doc_cases);
  if (!in) return fail("cannot open " + a.doc_cases);
  FILE* out = a.out.empty() ? stdout : std::fopen(a.out.c_str(), "w");
  if (!out) return fail("cannot create " + a.out);
  const Tokenizer& tok = *m.tokenizer;
  const int V = ctx.n_vocab(), n_tf = 32, n_gen = std::max(1, a.doc_gen);
  std::string line;
  int n_case = 0;
  double encode_s = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (a.doc_limit > 0 && n_case >= a.doc_limit) break;
    nlohmann::json c;
    try {
      c = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      return fail(a.doc_cases + ": " + e.what());
    }
    ++n_case;
    const bool text = c.value("continuation", false);
    const std::vector<int32_t> prefix = tok.encode(c.value("prefix", ""), tok.vocab().add_bos, true);
    std::vector<std::vector<int32_t>> ds;
    for (const auto& d : c.at("docs")) ds.push_back(tok.encode(d.get<std::string>(), false, false));
    const std::vector<int32_t> query = tok.encode(c.value("query", ""), false, !text);
    const std::string answer = c.value("answer", "");
    int total = static_cast<int>(prefix.size() + query.size()) + n_tf + n_gen;
    for (const auto& d : ds) total += static_cast<int>(d.size());
    comp.make_room(prefix, ds, total);
    auto tr = comp.blocks().take(total);
    if (!tr.ok()) return fail(tr.error());
    std::vector<int32_t> table = *tr;
    // Sequential: the reference distributions (teacher forcing: its own greedy tokens; text: the continuation).
    docs::Params seq;
    seq.mode = docs::Mode::Sequential;
    const int nq = static_cast<int>(query.size());
    std::vector<float> ql(static_cast<size_t>(nq) * V);
    Composed ref;
    Status st = run_prompt(ctx, comp, table, prefix, ds, query, seq, ql.data(), true, &ref, &encode_s);
    if (!st.ok()) return fail(st.error());
    const double ttft_seq = ref.st.seconds;
    std::vector<std::vector<double>> ref_lp;  // answer position + teacher-forced ones
    std::vector<int32_t> forced;
    const int end = ref.lay.end();
    auto ppl_of = [&](const std::vector<float>& lg) {
      double nll = 0;
      for (int i = 0; i + 1 < nq; ++i) nll -= log_softmax(&lg[static_cast<size_t>(i) * V], V)[query[i + 1]];
      return nq > 1 ? std::exp(nll / (nq - 1)) : 0.0;
    };
    if (text) {
      for (int i = 0; i < nq; ++i) ref_lp.push_back(log_softmax(&ql[static_cast<size_t>(i) * V], V));
    } else {
      std::vector<float> lg(ql.end() - V, ql.end());
      for (int i = 0; i < n_tf; ++i) {
        ref_lp.push_back(log_softmax(lg.data(), V));
        forced.push_back(argmax(lg.data(), V));
        if (i + 1 < n_tf) {
          st = decode_after(ctx, table, ref.lay, seq, std::span<const int32_t>(&forced.back(), 1), end + nq + i, lg.data(), false);
          if (!st.ok()) return fail(st.error());
        }
      }
    }
    auto answer_of = [&](const std::vector<int32_t>& gen) {
      std::vector<int32_t> g;
      for (int32_t t : gen) {
        if (tok.is_eog(t)) break;
        g.push_back(t);
      }
      return tok.decode(g);
    };
    auto em_of = [&](const std::string& s) {
      auto strip = [](std::string x) {
        std::string o;
        for (char ch : x)
          if (!std::isspace(static_cast<unsigned char>(ch))) o += ch;
        return o;
      };
      const std::string g = strip(s), w = strip(answer);
      return !w.empty() && g.compare(0, w.size(), w) == 0 ? 1 : 0;
    };
    auto emit = [&](const std::string& name, const docs::Params& p, const std::vector<std::vector<double>>& lp,
                    const std::vector<int32_t>& gen, double ttft, const docs::Stats& s, double ppl) {
      nlohmann::json r;
      r["id"] = c.value("id", std::to_string(n_case));
      r["kind"] = c.value("kind", "");
      r["needle_pos"] = c.value("needle_pos", "");
      r["method"] = name;
      r["mode"] = docs::mode_name(p.mode);
      double k0 = kl(ref_lp[0], lp[0]), ksum = 0;
      int agree = 0;
      for (size_t i = 0; i < lp.size(); ++i) {
        ksum += kl(ref_lp[i], lp[i]);
        agree += std::max_element(ref_lp[i].begin(), ref_lp[i].end()) - ref_lp[i].begin() ==
                 std::max_element(lp[i].begin(), lp[i].end()) - lp[i].begin();
      }
      r["kl_first"] = k0;
      r["kl_mean32"] = ksum / lp.size();
      r["top1_agree"] = static_cast<double>(agree) / lp.size();
      r["recompute"] = p.mode == docs::Mode::Sequential ? 1.0 : s.fraction();  // sequential computes everything
      r["ttft_s"] = ttft;
      r["doc_tokens"] = ref.lay.doc_tokens();
      if (text) {
        r["ppl"] = ppl;
      } else {
        const std::string ans = answer_of(gen);
        r["em"] = em_of(ans);
        r["output"] = ans;
      }
      std::fprintf(out, "%s\n", r.dump().c_str());
      std::fflush(out);
    };
    docs::Stats none;
    emit("sequential", seq, ref_lp, std::vector<int32_t>(forced.begin(), forced.begin() + std::min<int>(n_gen, forced.size())),
         ttft_seq, none, text ? ppl_of(ql) : 0.0);
    for (const auto& [name, p] : methods) {
      Composed mc;
      std::vector<float> ml(static_cast<size_t>(text ? nq : 1) * V);
      st = run_prompt(ctx, comp, table, prefix, ds, query, p, ml.data(), text, &mc, &encode_s);
      if (!st.ok()) return fail(name + ": " + st.error());
      const double ttft = mc.st.seconds;
      std::vector<std::vector<double>> lp;
      std::vector<int32_t> gen;
      if (text) {
        for (int i = 0; i < nq; ++i) lp.push_back(log_softmax(&ml[static_cast<size_t>(i) * V], V));
        emit(name, p, lp, gen, ttft, mc.st, ppl_of(ml));
        continue;
      }
      lp.push_back(log_softmax(ml.data(), V));
      // Teacher forcing with the reference's tokens, all at once.
      std::vector<float> tf(static_cast<size_t>(n_tf - 1) * V);
      st = decode_after(ctx, table, mc.lay, p, std::span<const int32_t>(forced).first(n_tf - 1), end + nq, tf.data(), true);
      if (!st.ok()) return fail(st.error());
      for (int i = 0; i + 1 < n_tf; ++i) lp.push_back(log_softmax(&tf[static_cast<size_t>(i) * V], V));
      // Its own greedy answer.
      std::vector<float> lg(ml.begin(), ml.begin() + V);
      for (int i = 0; i < n_gen; ++i) {
        gen.push_back(argmax(lg.data(), V));
        if (tok.is_eog(gen.back())) break;
        if (i + 1 < n_gen) {
          st = decode_after(ctx, table, mc.lay, p, std::span<const int32_t>(&gen.back(), 1), end + nq + i, lg.data(), false);
          if (!st.ok()) return fail(st.error());
        }
      }
      emit(name, p, lp, gen, ttft, mc.st, 0.0);
    }
    comp.blocks().give(table);
    std::fprintf(stderr, "\rdocs bench: %d cases (%.0f s encoding documents)", n_case, encode_s);
  }
  std::fprintf(stderr, "\n");
  if (out != stdout) std::fclose(out);
  return 0;
}

}  // namespace

int cmd_docs(Args& a) {
  if (a.tokens_json.empty() == a.doc_cases.empty())
    return fail("docs needs either --tokens-json IN --dump OUT or --cases FILE");
  if (!a.tokens_json.empty() && a.dump.empty()) return fail("--tokens-json needs --dump OUT");
  auto kvt = cache_types(a);
  if (!kvt.ok()) return fail(kvt.error());
  auto mr = open_model(a);
  if (!mr.ok()) return fail(mr.error());
  const Model& m = **mr;
  ContextParams cp;
  cp.n_threads = a.n_threads;
  cp.n_batch = 512;
  // Room for the working prompt plus every stored document (the benchmark's corpus).
  cp.max_seq_len = std::min(m.cfg.n_ctx_train > 0 ? m.cfg.n_ctx_train : 4096, 8192);
  cp.n_ctx = a.n_ctx > 0 ? a.n_ctx : (a.doc_cases.empty() ? cp.max_seq_len * 2 : 65536);
  cp.type_k = kvt->first;
  cp.type_v = kvt->second;
  auto cr = Context::create(m, cp);
  if (!cr.ok()) return fail(cr.error());
  Composer comp(**cr);
  return a.tokens_json.empty() ? bench_mode(a, m, **cr, comp) : tokens_mode(a, **cr, comp);
}

}  // namespace larder::cli
