// Speculative decoding: drafters guess the next tokens cheaply, the target model checks all the
// guesses in one forward pass (decode reads every weight once per pass, so each accepted guess is
// nearly free), and verification keeps exactly what the target would have produced.
//
// - Drafter: one interface for prompt lookup (n-gram), suffix decoding, a draft model and a
//   self-draft (the target with layers skipped); batched, so a draft model runs every
//   sequence's draft passes together.
// - verify(): greedy = longest path agreeing with the target's argmax plus one token (output
//   identical to plain greedy); sampling = lossless rejection sampling (accept with
//   min(1, p/q), else resample from norm(max(0, p - q)); q one-hot for deterministic guesses,
//   siblings of a tree tried in turn), so the output distribution is the target's.
// - Generator: one sequence on a Context (larder run / bench); the scheduler drives the same
//   pieces for continuous batches.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/result.h"
#include "engine/context.h"
#include "engine/sampler.h"
#include "model/model.h"
#include "spec/draft.h"

namespace larder::spec {

// ---- Verification ---------------------------------------------------------------------------

struct Verdict {
  std::vector<int> path;  // accepted nodes, root first (each a child of the previous)
  int32_t next = -1;      // the target's token after the path (correction or bonus)
};
// Exact is the only correct rule; AcceptAll exists so a test can show the statistics catch a
// broken rule.
enum class Rule { Exact, AcceptAll };

// logits: [1 + d.size()][V]; row 0 follows the sequence's last real token, row 1 + i follows node
// i. history: the sequence so far (for penalties); restored on return. Draws from sampler's RNG.
Verdict verify(const Draft& d, const float* logits, int V, Sampler& sampler, std::vector<int32_t>& history,
               Rule rule = Rule::Exact);

// The verify pass's inputs after n_kv cached entries: tokens [last, nodes...], positions
// (node i at n_kv + depth(i)) and the mask (row 0 causal; node i sees [0, n_kv + 1), its
// ancestors and itself). A chain needs no mask (nullptr would do); it is filled anyway.
void verify_inputs(const Draft& d, int32_t last, int n_kv, std::vector<int32_t>* tokens, std::vector<int32_t>* positions,
                   AttnMask* mask);

// ---- Drafters -------------------------------------------------------------------------------

struct DraftJob {
  int handle = -1;                    // from Drafter::start
  std::span<const int32_t> context;   // prompt + output so far (its last token is not yet in the target's KV)
  int max_tokens = 0;                 // node budget (0: skip this job)
  bool tree = false;                  // several candidates allowed
  const SamplerParams* sampling = nullptr;  // the request's sampler (sampling drafters draw from q with it)
  Draft* out = nullptr;
};

class Drafter {
 public:
  virtual ~Drafter() = default;
  virtual std::string name() const = 0;
  // A request begins (prompt known); returns its handle.
  virtual int start(std::span<const int32_t> prompt) = 0;
  // Fills each job's draft (possibly empty). Batched: a draft model runs all jobs together.
  virtual void propose(std::span<DraftJob> jobs) = 0;
  // The request ended; completed: its output is final (suffix decoding indexes it).
  virtual void finish(int handle, std::span<const int32_t> output, bool completed) = 0;
  // Whether guesses carry q and follow the sampler (draft models) or are deterministic.
  virtual bool samples() const { return false; }
  // Seconds a drafted token costs the drafter itself (a draft model's passes; ~0 for lookups),
  // measured: the draft length weighs it like the target's rows.
  virtual double seconds_per_token() const { return 0; }
};

// Prompt lookup: the most recent earlier occurrence of the last n tokens (n = max_n .. min_n) in
// the prompt and output; proposes what followed it. Tree: continuations of up to `width`
// distinct earlier occurrences, merged into a trie.
struct NgramParams {
  int max_n = 3, min_n = 1;
  int width = 3;  // tree: continuations considered
};
std::unique_ptr<Drafter> make_ngram_drafter(const NgramParams& p = {});

struct DrafterOptions {
  int n_threads = 0;
  int max_seq_len = 4096;  // longest context a draft model must hold per sequence
  int parallel = 1;        // sequences drafted at once (draft model KV)
};
// "ngram[:N]", "suffix", "draft:FILE" (a smaller model with the same vocabulary),
// "self:skip=A-B[,C-D]" (the target without those layers), "self:keep=K" (its first K layers
// and the output head). Errors name the valid forms.
Result<std::unique_ptr<Drafter>> make_drafter(const std::string& spec, const Model& target, const DrafterOptions& o);

// ---- Length control -------------------------------------------------------------------------

// A forward pass's cost on this machine: t = a + b * rows, least squares over recent passes
// (forgotten at 1% a pass) plus a start-up measurement of 1 and R rows as a fixed prior (passes
// of a steady load all have about the same size and cannot pin the slope alone). Without one,
// the first pass sets a prior of a row at 12% of a pass (what decode measures on CPUs here).
class CostModel {
 public:
  void prior(double t1, double tr, int r);
  // Times a 1-row and an R-row pass with `pass(rows)` (best of 3) and sets the prior.
  template <class F>
  void calibrate(int r, F&& pass);
  void observe(int rows, double seconds);
  double a() const { return a_; }  // fixed cost of a pass (s)
  double b() const { return b_; }  // cost of one more row (s)

 private:
  double a_ = 1e-3, b_ = 1e-4;
  double n_ = 0, x_ = 0, y_ = 0, xx_ = 0, xy_ = 0;
  double p1_ = 0, pr_ = 0, r_ = 0;
};

// The draft length that maximises expected tokens per second of a pass: a chain of k guesses each
// kept with probability `rate` (given the previous) yields 1 + rate + ... + rate^k tokens for
// a + b (k + 1) seconds. 0 when no k beats plain decoding (1 token for a + b).
// draft_s: what each guess costs the drafter (seconds).
int best_length(double rate, double a, double b, int kmax, double draft_s = 0);

// Per sequence: the probability that a guess is kept, given the ones before it were. Each
// verified draft is a run of kept guesses ended by a rejection (or by the draft's end): kept
// and rejected counts, forgotten at 15% a draft, with a weak prior of 0.6.
class LengthControl {
 public:
  explicit LengthControl(int max) : max_(max) {}
  // Guesses to draft next under `cost`; 0 = none (after 8 passes without, one probe).
  int next(const CostModel& cost, double draft_s = 0);
  void observe(int depth, int accepted);
  double rate() const { return (kept_ + 0.3) / (kept_ + lost_ + 1.0); }
  int max() const { return max_; }
  bool probing() const { return probing_; }  // the last next() was a probe

 private:
  int max_;
  double kept_ = 0, lost_ = 0;
  int idle_ = 0;  // passes since the last draft when turned down
  bool probing_ = false;
};

template <class F>
void CostModel::calibrate(int r, F&& pass) {
  auto best = [&](int n) {
    double t = 1e30;
    for (int i = 0; i < 3; ++i) t = std::min(t, pass(n));
    return t;
  };
  const double t1 = best(1), tr = r > 1 ? best(r) : t1;
  prior(t1, tr, r);
}

// Longest root-to-leaf path of a draft (what a perfect verification would keep).
int max_depth(const Draft& d);

// ---- Statistics -----------------------------------------------------------------------------

struct SpecStats {
  int64_t steps = 0;      // verify passes with a draft
  int64_t plain = 0;      // passes without one
  int64_t proposed = 0;   // draft nodes verified
  int64_t accepted = 0;   // draft tokens kept
  std::vector<int64_t> accept_hist;  // [k] passes that kept k draft tokens
  std::vector<std::pair<int, int>> trace;  // per pass: (draft nodes, accepted); bench replays it
  void add(int prop, int acc);
  double mean_accepted() const { return steps ? static_cast<double>(accepted) / steps : 0; }
};

// ---- One sequence on a Context --------------------------------------------------------------

struct SpecParams {
  int max_tokens = 8;  // --spec-max: draft nodes per pass
  bool tree = false;
  bool adaptive = true;
};

class Generator {
 public:
  // drafter may be null (plain decoding through the same loop).
  Generator(Context& ctx, Sampler& sampler, Drafter* drafter, const SpecParams& p);
  ~Generator();
  // Computes the prompt (the context must be empty) and samples the first token.
  Status start(std::span<const int32_t> prompt);
  // The tokens produced so far that were not yet taken: after start() the first one; each
  // advance() adds one or more.
  std::vector<int32_t> take();
  // One target pass: verifies a draft (or decodes the pending token) and appends the kept tokens.
  Status advance();
  const std::vector<int32_t>& history() const { return history_; }
  const SpecStats& stats() const { return stats_; }
  // Ends the request for the drafter (suffix decoding learns the output).
  void finish(bool completed);

 private:
  Context& ctx_;
  Sampler& sampler_;
  Drafter* drafter_;
  SpecParams p_;
  LengthControl len_;
  CostModel cost_;
  int handle_ = -1;
  int n_prompt_ = 0;
  int n_kv_ = 0;                  // target KV entries (history_ minus the pending last token)
  std::vector<int32_t> history_;  // prompt + generated; the last one not yet in the KV
  size_t taken_ = 0;
  std::vector<float> logits_;     // [1 + nodes][V]
  SpecStats stats_;
  bool finished_ = false;
};

}  // namespace larder::spec
