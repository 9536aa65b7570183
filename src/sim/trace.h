// A published request trace, scaled for a small model: read by `larder replay` (which sends
// it to a server) and `larder simulate` (which runs it on a simulated cluster), so both see
// the same requests.
//
// Trace: JSONL, one request a line: {"timestamp": ms, "input_length": tokens,
// "output_length": tokens, "hash_ids": [...]}, hash_ids being prefix-chained ids of
// 512-token blocks (len == ceil(input_length / 512)). Requests are sorted by timestamp
// (stable).
//
// Scaling by K (a divisor of 512): every hash block becomes B = 512/K tokens, the last
// (partial) block ceil(rem/K) tokens where rem = input_length - 512*(n-1), so the prompt has
// (n-1)*B + ceil(rem/K) tokens; max_tokens = max(1, ceil(output_length/K)). With a context
// limit n_ctx > 0, a request whose prompt + max_tokens exceeds it is clipped: max_tokens to at
// most n_ctx/2, then the prompt to its first n_ctx - max_tokens tokens (a prefix, so sharing
// is kept).
//
// Tokens: hash id h becomes the run t_j = 3 + splitmix64_j(h) mod (V - 3), j = 0..B-1,
// splitmix64_j(h) being the (j+1)-th output of the standard splitmix64 generator seeded with
// h. A partial block is a prefix of the id's run, so equal hash-id prefixes give equal token
// prefixes.
//
// KV block names (the simulator's, block_size tokens each): block j of a prompt is named by
// the chain of every hash id up to the one holding its last token, and j. Two prompts share
// the name exactly when they share those tokens, so simulated hits are exact.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/result.h"

namespace larder::sim {

constexpr int kTraceBlock = 512;  // tokens per hash id in the published trace
constexpr int kFirstToken = 3;    // token ids below are special (unk, bos, eos in Llama vocabularies)

struct TraceReq {
  int line = 0;
  double ts_ms = 0;
  int64_t input_length = 0, output_length = 0;
  std::vector<uint64_t> hash_ids;
};

// One request after scaling and clipping.
struct Planned {
  int prompt_len = 0, max_tokens = 0;
  bool clipped = false;
  std::vector<int> block_len;  // scaled length of each hash block actually sent
  int64_t unbounded_hit = 0, trace_hit = 0;  // filled by offline_hits
};

// Reads the trace (the first `limit` requests when limit > 0, after the first `skip`, their
// timestamps then counted from the first one read). Errors name the file and line.
Result<std::vector<TraceReq>> load_trace(const std::string& path, int limit, int skip = 0);
// "" when K divides 512, else why not.
std::string check_scale(int K);
std::vector<Planned> plan_trace(const std::vector<TraceReq>& trace, int K, int n_ctx);

// Offline hit counts of the requests with use[i], in trace order (the others are left out):
//  - unbounded_hit: a server with an unbounded prefix cache of `block`-token blocks reuses
//    min(floor(L/block)*block, floor((P-1)/block)*block) tokens, L being the longest common
//    token prefix with any earlier request and P its prompt length;
//  - trace_hit: the trace's own definition in scaled tokens: block i is a hit when the same
//    hash-id prefix ids[0..i] occurred in an earlier request.
void offline_hits(const std::vector<TraceReq>& trace, std::vector<Planned>& plans, const std::vector<bool>& use,
                  int block);

uint64_t splitmix64(uint64_t& state);
// The prompt's token ids for a vocabulary of `vocab` tokens (see the top).
std::vector<int32_t> prompt_tokens(const TraceReq& r, const Planned& p, int vocab);
// Names of the prompt's full `block_size`-token KV blocks, in order (see the top).
std::vector<uint64_t> block_names(const TraceReq& r, const Planned& p, int K, int block_size);

// Linear-interpolated quantile q in [0, 1] (NaN when empty).
double percentile(std::vector<double> v, double q);

}  // namespace larder::sim
