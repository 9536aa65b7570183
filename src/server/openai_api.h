// OpenAI API shapes: request validation for /v1/completions and /v1/chat/completions,
// error bodies, logprobs/usage JSON, the stop-string matcher and the fallback chat format.
//
// Accepted parameters (OpenAI): model, prompt | messages, max_tokens (chat also
// max_completion_tokens), temperature [0,2], top_p [0,1], seed, stop (string or up to 4
// strings), n (1 only), best_of (1 only), echo (false only), logprobs (completions:
// integer 0..5; chat: bool, with top_logprobs 0..5), frequency_penalty and
// presence_penalty [-2,2], stream, stream_options {include_usage}, user (ignored),
// logit_bias (empty only), response_format (type "text" only), tools (only when the
// chat template uses them), tool_choice, parallel_tool_calls (ignored).
// Extensions (llama.cpp names): top_k, min_p, repeat_penalty, ignore_eos.
// Other unknown fields are ignored.
//
// Vendor extension (for the conductor in front of several instances; plain OpenAI clients
// never send or see it): "larder": {"prompt_tokens": [ids], "token_ids": bool,
// "resume": {"tokens": [ids], "text_bytes": n}}; see LarderExt. Unlike the OpenAI fields,
// unknown keys inside it are rejected: a conductor newer than this instance must not get a
// silently different answer (e.g. a resume ignored).
//
// Sampling defaults follow OpenAI: temperature 1, top_p 1, top_k and min_p off.
// max_tokens defaults to 16 for completions (clamped to the context) and to the rest of
// the context for chat.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"

namespace larder {
class Tokenizer;
}

namespace larder::server {

using ojson = nlohmann::ordered_json;

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
};

// {"error":{"message","type","param","code"}}
ojson error_body(const ApiError& e);

enum class Endpoint { Completions, Chat };

// The "larder" request field. Only the shape is checked here; ids against the vocabulary,
// the context and resume.text_bytes against the replayed text are checked by the server.
struct LarderExt {
  // Used verbatim as the prompt instead of the template / tokenizer (the conductor names
  // KV blocks from them); messages / prompt are still parsed and validated.
  std::optional<std::vector<int32_t>> prompt_tokens;
  // Report token ids: every chunk gets "larder": {"token_ids": [ids since the previous
  // chunk], "text_bytes": reply bytes sent so far, this chunk included}, the first chunk also
  // "prompt_tokens" (as used; without resumed ids); a non-streamed answer gets all three at
  // the top level. Ids may run ahead of text (UTF-8 assembly, stop-string hold-back); the
  // final chunk carries the rest, and the end-of-generation token when one was sampled.
  bool token_ids = false;
  // Failover: these ids were already generated and the client got the first text_bytes
  // bytes of their text; the answer continues the reply after them, as the original would
  // have. They count as completion tokens and against max_tokens; their logprobs and ids
  // are not sent again, but text_bytes above counts the resumed bytes too.
  bool resume = false;
  std::vector<int32_t> resume_tokens;
  // Speculative decoding for this request: draft tokens per pass (0 = off; -1 = the server's).
  int spec_max = -1;
  size_t resume_text_bytes = 0;
};

struct ParsedRequest {
  Endpoint kind = Endpoint::Completions;
  std::string model;  // empty: not given
  bool stream = false;
  bool include_usage = false;
  // Completions: a text prompt or token ids.
  bool prompt_is_tokens = false;
  std::string prompt_text;
  std::vector<int32_t> prompt_tokens;
  // Chat: messages normalized to {role, content: string, ...}; tools (null if none).
  ojson messages;
  ojson tools;
  std::optional<int> max_tokens;
  SamplerParams sampling;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  int logprobs = -1;  // -1: not requested; else number of top alternatives (0..5)
  LarderExt larder;
};

// Validate a request body (already parsed JSON); fill `out` or return the error.
std::optional<ApiError> parse_completion_request(const ojson& body, ParsedRequest& out);
std::optional<ApiError> parse_chat_request(const ojson& body, ParsedRequest& out);

// Holds back text that could be the beginning of a stop string. push() returns the
// text that is safe to send; once a stop string appears, matched() is true, the text
// before it is returned and everything after it is dropped.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops = {}) : stops_(std::move(stops)) {}
  std::string push(const std::string& text);
  std::string flush();  // the held-back rest, when generation ends without a match
  bool matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool matched_ = false;
};

struct TokenInfo {
  int32_t id = -1;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
  size_t text_offset = 0;
};

struct Usage {
  int prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
  // Requests with documents (-1: none): "documents": {mode, tokens, reused_tokens, recomputed_tokens,
  // recompute_fraction} (tokens reused from stored KV; recomputed by the mode's repair).
  int doc_tokens = -1, doc_reused = 0, doc_recomputed = 0;
  double doc_fraction = 0;
  std::string doc_mode;
};
ojson usage_json(const Usage& u);

// Completions: {tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}.
ojson completion_logprobs_json(const Tokenizer& tok, const std::vector<TokenInfo>& toks, int n_top);
// Chat: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal: null}.
ojson chat_logprobs_json(const Tokenizer& tok, const std::vector<TokenInfo>& toks, int n_top);

// JSON text with invalid UTF-8 replaced (token pieces can be partial characters).
std::string dump_json(const ojson& j);

}  // namespace larder::server
