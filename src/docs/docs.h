// Per-document KV for RAG prompts: each document's KV is computed once, right after a shared
// prefix (the system prompt or the chat template's header: the common attention sink), and later
// prompts put any documents in any order after that prefix, reusing the stored KV with a small
// repair instead of prefilling them again.
//
// A composed sequence is laid out as: prefix [0, P), document i at [P + off_i, P + off_i + n_i)
// (off_i = the lengths of the documents before it), then the query and what is generated. The
// modes (selectable per request) differ in where the documents sit and what is recomputed:
//   sequential  ordinary prefill of everything (the reference; nothing reused);
//   parallel    (APE) stored KV used as is: every document at positions P.. (they overlap), the
//               query at P + the longest document; the query attends to the documents with a
//               temperature and a scale merged by log-sum-exp (SegAttn);
//   reposition  stored keys re-rotated to their place in the concatenation (RoPE by delta), no
//               repair (KVLink without its trained link tokens);
//   blend       reposition + CacheBlend's repair: every document token recomputed in the first
//               F layers, then only the fraction R whose keys deviate most from the stored ones;
//   link        reposition + EPIC's repair: the first k tokens of every document but the first
//               recomputed in every layer;
//   focus       ours: reposition, a probe pass of the query over the repositioned cache measures
//               the attention mass each document token gets, and the tokens that get the most
//               (plus the first k of every document but the first: the boundaries where stale
//               KV starts) are recomputed in every layer, in context, within a token budget.
// Recomputing a token in layer l: its hidden state entering l computes q, k, v at its place in
// the concatenation, overwrites its KV entry and attends causally over the layer's cache (where
// the other recomputed tokens' entries are already new).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/result.h"
#include "engine/context.h"

namespace larder::docs {

enum class Mode { Sequential, Parallel, Reposition, Blend, Link, Focus };
const char* mode_name(Mode m);
// "sequential", "parallel" (or "ape"), "reposition", "blend", "link", "focus".
Result<Mode> parse_mode(const std::string& s);

struct Params {
  Mode mode = Mode::Focus;
  // parallel: APE's temperature and scale; tuned on SmolLM2 (docs/BENCHMARKS.md; APE's paper: 0.9, 0.9)
  float ape_t = 0.8f, ape_s = 1.0f;
  float blend_ratio = 0.15f;         // blend: fraction of document tokens recomputed after the full layers
  int blend_layers = 2;              // blend: first layers recomputed for every token (>= 2)
  int link_k = 16;                   // link: first tokens of every document but the first
  float focus_budget = 0.2f;         // focus: fraction of document tokens recomputed (every layer)
  int focus_k = 0;                   // focus: first tokens of every document but the first (in the budget)
  int focus_rounds = 1;              // focus: probe-then-recompute rounds (the budget split between them)
  int focus_last = 0;                // focus: only the last this many query tokens' attention counts (0: all)
  // Checks ranges; the error names the field.
  Status validate() const;
  // Identity of what composition produces (mode and every parameter that changes the KV).
  std::string key() const;
};

struct Layout {
  int prefix = 0;            // P: shared prefix tokens
  std::vector<int> doc_len;  // n_i
  int n_docs() const { return static_cast<int>(doc_len.size()); }
  int doc_tokens() const;    // N = sum n_i
  int doc_begin(int i) const;  // P + off_i
  int max_len() const;
  int end() const { return prefix + doc_tokens(); }  // first entry after the documents
  // RoPE position of logical entry e (any entry, also the query's and generated ones).
  int position(Mode m, int e) const;
};

struct Stats {
  int64_t recomputed_token_layers = 0;  // document token-layers computed again
  int64_t doc_token_layers = 0;         // N * n_layer
  int recomputed_tokens = 0;            // document tokens recomputed in at least one layer
  int probe_tokens = 0;                 // focus: query tokens run once more for the probe
  int full_layers = 0;                  // layers where every document token was recomputed
  std::vector<int32_t> selected;        // entries recomputed in the layers after full_layers
  double seconds = 0;
  double fraction() const { return doc_token_layers ? double(recomputed_token_layers) / doc_token_layers : 0.0; }
};

// Computes a document's KV into `table` at entries [P, P + doc.size()), after the prefix whose KV
// is at [0, P) of the same table (ordinary causal prefill, chunked by the context's batch size).
Status encode(Context& ctx, std::span<const int32_t> table, int prefix_len, std::span<const int32_t> doc);

// The documents' stored KV is in `table` at their entries (copied there, each still at positions
// P..P+n_i-1 as encoded) and the prefix's at [0, P): repositions and repairs it for the mode.
// tokens: the whole sequence's tokens (prefix, documents, then the query: focus probes with the
// query; others need only the documents'). Not for sequential (nothing to compose).
Status compose(Context& ctx, std::span<const int32_t> table, const Layout& lay, std::span<const int32_t> tokens,
               const Params& p, Stats* st);

// APE's attention for the tokens after the documents (parallel mode; nullopt-like: begin == end otherwise).
SegAttn seg_attn(const Layout& lay, const Params& p);

}  // namespace larder::docs
