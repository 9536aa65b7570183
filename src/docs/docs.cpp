#include "docs/docs.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

namespace larder::docs {

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::Sequential: return "sequential";
    case Mode::Parallel: return "parallel";
    case Mode::Reposition: return "reposition";
    case Mode::Blend: return "blend";
    case Mode::Link: return "link";
    case Mode::Focus: return "focus";
  }
  return "?";
}

Result<Mode> parse_mode(const std::string& s) {
  if (s == "sequential") return Mode::Sequential;
  if (s == "parallel" || s == "ape") return Mode::Parallel;
  if (s == "reposition") return Mode::Reposition;
  if (s == "blend") return Mode::Blend;
  if (s == "link") return Mode::Link;
  if (s == "focus") return Mode::Focus;
  return make_error("unknown document_mode '%s' (valid: sequential, parallel, ape, reposition, blend, link, focus)",
                    s.c_str());
}

Status Params::validate() const {
  if (!(ape_t > 0.f && ape_t <= 10.f)) return make_error("ape temperature must be in (0, 10]");
  if (!(ape_s > 0.f && ape_s <= 10.f)) return make_error("ape scale must be in (0, 10]");
  if (!(blend_ratio >= 0.f && blend_ratio <= 1.f)) return make_error("blend ratio must be in [0, 1]");
  // The first layer's keys depend on nothing but the token and its position: a deviation is only
  // measurable from the second layer on.
  if (blend_layers < 2 || blend_layers > 1024)
    return make_error("blend layers must be >= 2 (the first layer's keys do not depend on the context)");
  if (link_k < 0 || link_k > 1 << 20) return make_error("link k must be >= 0");
  if (!(focus_budget >= 0.f && focus_budget <= 1.f)) return make_error("focus budget must be in [0, 1]");
  if (focus_k < 0 || focus_k > 1 << 20) return make_error("focus k must be >= 0");
  if (focus_rounds < 1 || focus_rounds > 16) return make_error("focus rounds must be 1..16");
  if (focus_last < 0) return make_error("focus last must be >= 0");
  return Status::Ok();
}

std::string Params::key() const {
  char buf[160];
  switch (mode) {
    case Mode::Parallel: std::snprintf(buf, sizeof buf, "parallel:t=%g:s=%g", ape_t, ape_s); break;
    case Mode::Blend: std::snprintf(buf, sizeof buf, "blend:r=%g:f=%d", blend_ratio, blend_layers); break;
    case Mode::Link: std::snprintf(buf, sizeof buf, "link:k=%d", link_k); break;
    case Mode::Focus: std::snprintf(buf, sizeof buf, "focus:b=%g:k=%d:r=%d", focus_budget, focus_k, focus_rounds); break;
    default: std::snprintf(buf, sizeof buf, "%s", mode_name(mode));
  }
  return buf;
}

int Layout::doc_tokens() const { return std::accumulate(doc_len.begin(), doc_len.end(), 0); }
int Layout::doc_begin(int i) const {
  int b = prefix;
  for (int j = 0; j < i; ++j) b += doc_len[j];
  return b;
}
int Layout::max_len() const { return doc_len.empty() ? 0 : *std::max_element(doc_len.begin(), doc_len.end()); }

int Layout::position(Mode m, int e) const {
  if (m != Mode::Parallel || e < prefix) return e;
  const int n = doc_tokens();
  if (e >= prefix + n) return e - n + max_len();  // after the documents: after the longest one
  int b = prefix;
  for (int len : doc_len) {
    if (e < b + len) return prefix + (e - b);
    b += len;
  }
  return e;
}

SegAttn seg_attn(const Layout& lay, const Params& p) {
  SegAttn s;
  if (p.mode != Mode::Parallel) return s;
  s.begin = lay.prefix;
  s.end = lay.end();
  s.t = p.ape_t;
  s.s = p.ape_s;
  return s;
}

Status encode(Context& ctx, std::span<const int32_t> table, int prefix_len, std::span<const int32_t> doc) {
  for (size_t off = 0; off < doc.size(); off += ctx.n_batch()) {
    SeqBatch sb;
    sb.tokens = doc.subspan(off, std::min<size_t>(ctx.n_batch(), doc.size() - off));
    sb.block_table = table;
    sb.n_kv = prefix_len + static_cast<int>(off);
    LARDER_CHECK_STATUS(ctx.decode_batch(std::span<const SeqBatch>(&sb, 1)));
  }
  return Status::Ok();
}

namespace {

// Recomputes the tokens at `entries` (ascending) in layers [l0, l1), each causal over its own
// entry, in chunks of the batch size (a later chunk sees an earlier one's new entries, as one pass
// would). x_in / x_out: [entries][n_embd] hidden states entering l0 / after l1 - 1 (may be null
// for l0 == 0 / when not wanted).
Status recompute(Context& ctx, std::span<const int32_t> table, const Layout& lay, Mode mode,
                 std::span<const int32_t> tokens, std::span<const int32_t> entries, int l0, int l1, const float* x_in,
                 float* x_out) {
  const int E = ctx.model().cfg.n_embd;
  std::vector<int32_t> tok, pos;
  for (size_t off = 0; off < entries.size(); off += ctx.n_batch()) {
    const size_t n = std::min<size_t>(ctx.n_batch(), entries.size() - off);
    const auto idx = entries.subspan(off, n);
    tok.resize(n);
    pos.resize(n);
    for (size_t i = 0; i < n; ++i) {
      tok[i] = tokens[idx[i]];
      pos[i] = lay.position(mode, idx[i]);
    }
    SeqBatch sb;
    sb.tokens = tok;
    sb.positions = pos;
    sb.kv_index = idx;
    sb.block_table = table;
    sb.n_kv = lay.end();
    LayerRange lr;
    lr.begin = l0;
    lr.end = l1;
    lr.x_in = x_in ? x_in + off * E : nullptr;
    lr.x_out = x_out ? x_out + off * E : nullptr;
    LARDER_CHECK_STATUS(ctx.decode_batch(std::span<const SeqBatch>(&sb, 1), &lr));
  }
  return Status::Ok();
}

}  // namespace

Status compose(Context& ctx, std::span<const int32_t> table, const Layout& lay, std::span<const int32_t> tokens,
               const Params& p, Stats* st) {
  LARDER_CHECK_STATUS(p.validate());
  if (p.mode == Mode::Sequential) return make_error("sequential documents are prefilled, not composed");
  if (static_cast<int>(tokens.size()) < lay.end()) return make_error("compose: fewer tokens than the layout");
  const auto t0 = std::chrono::steady_clock::now();
  const int L = ctx.model().cfg.n_layer, N = lay.doc_tokens();
  Stats s;
  s.doc_token_layers = static_cast<int64_t>(N) * L;
  if (p.mode != Mode::Parallel) {
    // Stored at P..P+n_i-1; document i belongs at P + off_i.
    for (int i = 1; i < lay.n_docs(); ++i)
      ctx.rotate_k(table, lay.doc_begin(i), lay.doc_len[i], lay.doc_begin(i) - lay.prefix);
  }
  // Document 0 sits where it was encoded: its KV is exact, never recomputed.
  const int first = lay.n_docs() > 0 ? lay.doc_begin(0) + lay.doc_len[0] : lay.prefix;
  std::vector<int32_t> sel;
  if (p.mode == Mode::Blend && N > 0) {
    const int F = std::min(p.blend_layers, L);
    const int kvd = ctx.model().cfg.n_head_kv * ctx.model().cfg.head_dim, E = ctx.model().cfg.n_embd;
    std::vector<int32_t> all(N);
    std::iota(all.begin(), all.end(), lay.prefix);
    std::vector<float> old_k(static_cast<size_t>(N) * kvd), new_k(kvd), hidden(static_cast<size_t>(N) * E);
    for (int j = 0; j < N; ++j) ctx.read_k(table, all[j], F - 1, &old_k[static_cast<size_t>(j) * kvd]);
    LARDER_CHECK_STATUS(recompute(ctx, table, lay, p.mode, tokens, all, 0, F, nullptr, hidden.data()));
    s.full_layers = F;
    s.recomputed_token_layers += static_cast<int64_t>(N) * F;
    s.recomputed_tokens = N;
    if (F < L) {
      std::vector<std::pair<float, int>> dev(N);
      for (int j = 0; j < N; ++j) {
        ctx.read_k(table, all[j], F - 1, new_k.data());
        double d = 0;
        for (int k = 0; k < kvd; ++k) {
          const double x = new_k[k] - old_k[static_cast<size_t>(j) * kvd + k];
          d += x * x;
        }
        dev[j] = {static_cast<float>(d), j};
      }
      const int m = std::min(N, static_cast<int>(std::lround(p.blend_ratio * N)));
      std::partial_sort(dev.begin(), dev.begin() + m, dev.end(),
                        [](auto& a, auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
      for (int j = 0; j < m; ++j) sel.push_back(all[dev[j].second]);
      std::sort(sel.begin(), sel.end());
      std::vector<float> xin(sel.size() * E);
      for (size_t j = 0; j < sel.size(); ++j)
        std::copy_n(&hidden[static_cast<size_t>(sel[j] - lay.prefix) * E], E, &xin[j * E]);
      if (!sel.empty())
        LARDER_CHECK_STATUS(recompute(ctx, table, lay, p.mode, tokens, sel, F, L, xin.data(), nullptr));
      s.recomputed_token_layers += static_cast<int64_t>(sel.size()) * (L - F);
    }
  } else if (p.mode == Mode::Link || p.mode == Mode::Focus) {
    const int k = p.mode == Mode::Link ? p.link_k : p.focus_k;
    for (int i = 1; i < lay.n_docs(); ++i)
      for (int j = 0; j < std::min(k, lay.doc_len[i]); ++j) sel.push_back(lay.doc_begin(i) + j);
    const int budget = p.mode == Mode::Focus ? static_cast<int>(std::lround(p.focus_budget * N)) : 0;
    if (p.mode == Mode::Focus && static_cast<int>(sel.size()) > budget) sel.resize(budget);
    std::sort(sel.begin(), sel.end());
    if (!sel.empty()) LARDER_CHECK_STATUS(recompute(ctx, table, lay, p.mode, tokens, sel, 0, L, nullptr, nullptr));
    const int q0 = lay.end(), nq = static_cast<int>(tokens.size()) - q0;
    std::vector<char> taken(tokens.size(), 0);
    for (int32_t e : sel) taken[e] = 1;
    // Focus: rounds of probe (the query over the current cache: which document tokens does it
    // read?) then recompute of the most-read ones, in context; later rounds see the earlier ones fixed.
    const int rounds = p.mode == Mode::Focus && nq > 0 && first < lay.end() ? p.focus_rounds : 0;
    for (int r = 0; r < rounds && static_cast<int>(sel.size()) < budget; ++r) {
      std::vector<float> mass(tokens.size(), 0.f);
      // Only the last focus_last query tokens' attention counts (0: all of them).
      const int counted = p.focus_last > 0 ? std::min(p.focus_last, nq) : nq;
      for (int off = 0; off < nq;) {
        const int end = off < nq - counted ? nq - counted : nq;
        const int n = std::min(ctx.n_batch(), end - off);
        SeqBatch sb;
        sb.tokens = tokens.subspan(q0 + off, n);
        sb.block_table = table;
        sb.n_kv = q0 + off;
        sb.attn_mass = off >= nq - counted ? mass.data() : nullptr;
        LARDER_CHECK_STATUS(ctx.decode_batch(std::span<const SeqBatch>(&sb, 1)));
        off += n;
      }
      s.probe_tokens += nq;
      std::vector<std::pair<float, int>> cand;
      for (int e = first; e < lay.end(); ++e)
        if (!taken[e]) cand.emplace_back(mass[e], e);
      const int want = (budget - static_cast<int>(sel.size())) / (rounds - r);
      const int m = std::min<int>(want, static_cast<int>(cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + m, cand.end(),
                        [](auto& a, auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
      std::vector<int32_t> now;
      for (int j = 0; j < m; ++j) {
        now.push_back(cand[j].second);
        taken[cand[j].second] = 1;
      }
      std::sort(now.begin(), now.end());
      if (!now.empty()) LARDER_CHECK_STATUS(recompute(ctx, table, lay, p.mode, tokens, now, 0, L, nullptr, nullptr));
      sel.insert(sel.end(), now.begin(), now.end());
    }
    std::sort(sel.begin(), sel.end());
    s.recomputed_token_layers = static_cast<int64_t>(sel.size()) * L;
    s.recomputed_tokens = static_cast<int>(sel.size());
  }
  s.selected = std::move(sel);
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (st) *st = std::move(s);
  return Status::Ok();
}

}  // namespace larder::docs
