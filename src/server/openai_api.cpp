#include "server/openai_api.h"

#include <cmath>
#include <initializer_list>
#include <limits>

#include "tokenizer/tokenizer.h"

namespace larder::server {

namespace {

// Validation failures inside this file unwind to the parse_* boundary as ApiError.
struct Bad {
  ApiError e;
};

[[noreturn]] void bad(const std::string& param, const std::string& msg, const std::string& code = "") {
  ApiError e;
  e.status = 400;
  e.message = msg;
  e.param = param;
  e.code = code;
  throw Bad{e};
}

const char* type_name(const ojson& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "integer";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "array";
  return "object";
}

[[noreturn]] void bad_type(const std::string& param, const ojson& v, const char* want) {
  bad(param, "Invalid type for '" + param + "': expected " + want + ", but got " + type_name(v) + ".",
      "invalid_type");
}

// Present and not null.
const ojson* field(const ojson& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<double> get_number(const ojson& body, const char* name, double lo, double hi) {
  const ojson* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad_type(name, *v, "a number");
  double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "'%s' must be between %g and %g, got %g.", name, lo, hi, d);
    bad(name, buf, "invalid_value");
  }
  return d;
}

std::optional<int64_t> get_int(const ojson& body, const char* name, int64_t lo, int64_t hi) {
  const ojson* v = field(body, name);
  if (!v) return std::nullopt;
  int64_t x;
  if (v->is_number_integer()) {
    x = v->get<int64_t>();
  } else if (v->is_number_unsigned()) {
    uint64_t u = v->get<uint64_t>();
    x = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                                        : static_cast<int64_t>(u);
  } else if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>() &&
             std::fabs(v->get<double>()) < 9e15) {
    x = static_cast<int64_t>(v->get<double>());
  } else {
    bad_type(name, *v, "an integer");
  }
  if (x < lo || x > hi) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "'%s' must be between %lld and %lld, got %lld.", name,
                  static_cast<long long>(lo), static_cast<long long>(hi), static_cast<long long>(x));
    bad(name, buf, "invalid_value");
  }
  return x;
}

std::optional<bool> get_bool(const ojson& body, const char* name) {
  const ojson* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad_type(name, *v, "a boolean");
  return v->get<bool>();
}

std::optional<std::string> get_string(const ojson& body, const char* name) {
  const ojson* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_string()) bad_type(name, *v, "a string");
  return v->get<std::string>();
}

// Parameters shared by both endpoints.
void parse_common(const ojson& body, ParsedRequest& out) {
  if (!body.is_object()) bad("", "The request body must be a JSON object.");
  if (auto m = get_string(body, "model")) out.model = *m;
  if (auto n = get_int(body, "n", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()); n && *n != 1)
    bad("n", "Only n=1 is supported.", "unsupported_value");
  out.stream = get_bool(body, "stream").value_or(false);
  if (const ojson* so = field(body, "stream_options")) {
    if (!so->is_object()) bad_type("stream_options", *so, "an object");
    if (!out.stream)
      bad("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.");
    out.include_usage = get_bool(*so, "include_usage").value_or(false);
  }
  SamplerParams& s = out.sampling;
  s.temp = static_cast<float>(get_number(body, "temperature", 0.0, 2.0).value_or(1.0));
  s.top_p = static_cast<float>(get_number(body, "top_p", 0.0, 1.0).value_or(1.0));
  s.top_k = static_cast<int>(get_int(body, "top_k", 0, 1 << 24).value_or(0));
  s.min_p = static_cast<float>(get_number(body, "min_p", 0.0, 1.0).value_or(0.0));
  s.repeat_penalty = static_cast<float>(get_number(body, "repeat_penalty", 0.0, 10.0).value_or(1.0));
  s.freq_penalty = static_cast<float>(get_number(body, "frequency_penalty", -2.0, 2.0).value_or(0.0));
  s.presence_penalty = static_cast<float>(get_number(body, "presence_penalty", -2.0, 2.0).value_or(0.0));
  if (auto seed = get_int(body, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()))
    s.seed = static_cast<uint64_t>(*seed);
  out.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
  if (auto mt = get_int(body, "max_tokens", 1, std::numeric_limits<int32_t>::max())) out.max_tokens = static_cast<int>(*mt);

  if (const ojson* st = field(body, "stop")) {
    if (st->is_string()) {
      out.stop.push_back(st->get<std::string>());
    } else if (st->is_array()) {
      if (st->size() > 4) bad("stop", "'stop' may hold at most 4 sequences.", "invalid_value");
      for (auto& x : *st) {
        if (!x.is_string()) bad_type("stop", x, "a string or an array of strings");
        out.stop.push_back(x.get<std::string>());
      }
    } else {
      bad_type("stop", *st, "a string or an array of strings");
    }
    for (auto& x : out.stop)
      if (x.empty()) bad("stop", "Stop sequences must not be empty.", "invalid_value");
  }
  if (const ojson* lb = field(body, "logit_bias")) {
    if (!lb->is_object()) bad_type("logit_bias", *lb, "an object");
    if (!lb->empty()) bad("logit_bias", "'logit_bias' is not supported.", "unsupported_parameter");
  }
  if (const ojson* u = field(body, "user"); u && !u->is_string()) bad_type("user", *u, "a string");
}

void parse_token_array(const ojson& arr, std::vector<int32_t>& ids, const std::string& param = "prompt") {
  for (auto& t : arr) {
    if (!t.is_number_integer() && !t.is_number_unsigned()) bad_type(param, t, "an integer token id");
    int64_t v = t.is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(t.get<uint64_t>(), 1ull << 40))
                                       : t.get<int64_t>();
    if (v < 0 || v > std::numeric_limits<int32_t>::max()) bad(param, "Token ids must be non-negative.", "invalid_value");
    ids.push_back(static_cast<int32_t>(v));
  }
}

// Rejects keys of a "larder" object other than `known` (see the header: no silent ignoring).
void only_known(const ojson& obj, const std::string& where, std::initializer_list<const char*> known) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool ok = false;
    for (const char* k : known) ok = ok || it.key() == k;
    if (!ok) bad(where + "." + it.key(), "Unknown parameter '" + where + "." + it.key() + "'.", "unknown_parameter");
  }
}

void parse_larder(const ojson& body, LarderExt& out) {
  const ojson* l = field(body, "larder");
  if (!l) return;
  if (!l->is_object()) bad_type("larder", *l, "an object");
  only_known(*l, "larder", {"prompt_tokens", "token_ids", "resume", "spec_max"});
  if (const ojson* sm = field(*l, "spec_max")) {
    if (!sm->is_number_integer() && !sm->is_number_unsigned()) bad_type("larder.spec_max", *sm, "an integer");
    const int64_t v = sm->get<int64_t>();
    if (v < 0 || v > 64) bad("larder.spec_max", "'larder.spec_max' must be in 0..64 (0 = no speculative decoding).", "invalid_value");
    out.spec_max = static_cast<int>(v);
  }
  if (const ojson* pt = field(*l, "prompt_tokens")) {
    if (!pt->is_array()) bad_type("larder.prompt_tokens", *pt, "an array of token ids");
    if (pt->empty()) bad("larder.prompt_tokens", "'larder.prompt_tokens' must not be empty.", "invalid_value");
    out.prompt_tokens.emplace();
    parse_token_array(*pt, *out.prompt_tokens, "larder.prompt_tokens");
  }
  if (const ojson* ti = field(*l, "token_ids")) {
    if (!ti->is_boolean()) bad_type("larder.token_ids", *ti, "a boolean");
    out.token_ids = ti->get<bool>();
  }
  const ojson* r = field(*l, "resume");
  if (!r) return;
  if (!r->is_object()) bad_type("larder.resume", *r, "an object");
  only_known(*r, "larder.resume", {"tokens", "text_bytes"});
  const ojson* toks = field(*r, "tokens");
  const ojson* nb = field(*r, "text_bytes");
  // Both required: a resume that defaulted either would silently repeat or lose text.
  if (!toks) bad("larder.resume.tokens", "Missing required parameter: 'larder.resume.tokens'.", "missing_required_parameter");
  if (!nb)
    bad("larder.resume.text_bytes", "Missing required parameter: 'larder.resume.text_bytes'.",
        "missing_required_parameter");
  if (!toks->is_array()) bad_type("larder.resume.tokens", *toks, "an array of token ids");
  parse_token_array(*toks, out.resume_tokens, "larder.resume.tokens");
  if (!nb->is_number_integer() && !nb->is_number_unsigned()) bad_type("larder.resume.text_bytes", *nb, "an integer");
  if (!nb->is_number_unsigned() && nb->get<int64_t>() < 0)
    bad("larder.resume.text_bytes", "'larder.resume.text_bytes' must not be negative.", "invalid_value");
  out.resume = true;
  out.resume_text_bytes = static_cast<size_t>(std::min<uint64_t>(nb->get<uint64_t>(), uint64_t{1} << 48));
}

std::string content_text(const ojson& content, size_t i) {
  const std::string param = "messages[" + std::to_string(i) + "].content";
  if (content.is_null()) return "";
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) bad_type(param, content, "a string or an array of content parts");
  std::string text;
  for (auto& part : content) {
    if (!part.is_object()) bad_type(param, part, "a content part object");
    auto type = get_string(part, "type");
    if (!type) bad(param, "Content parts need a 'type'.");
    if (*type != "text") bad(param, "Content parts of type '" + *type + "' are not supported.", "unsupported_value");
    auto t = get_string(part, "text");
    if (!t) bad(param, "Text content parts need a 'text' string.");
    text += *t;
  }
  return text;
}

}  // namespace

ojson error_body(const ApiError& e) {
  ojson err = ojson::object();
  err["message"] = e.message;
  err["type"] = e.type;
  err["param"] = e.param.empty() ? ojson() : ojson(e.param);
  err["code"] = e.code.empty() ? ojson() : ojson(e.code);
  ojson j = ojson::object();
  j["error"] = std::move(err);
  return j;
}

std::optional<ApiError> parse_completion_request(const ojson& body, ParsedRequest& out) {
  try {
    out.kind = Endpoint::Completions;
    parse_common(body, out);
    auto pit = body.find("prompt");
    if (pit == body.end() || pit->is_null()) bad("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter");
    const ojson& p = *pit;
    if (p.is_string()) {
      out.prompt_text = p.get<std::string>();
    } else if (p.is_array()) {
      if (p.empty()) bad("prompt", "The prompt must not be empty.", "invalid_value");
      if (p[0].is_string() || p[0].is_array()) {
        if (p.size() != 1) bad("prompt", "Only one prompt per request is supported.", "unsupported_value");
        if (p[0].is_string()) {
          out.prompt_text = p[0].get<std::string>();
        } else {
          out.prompt_is_tokens = true;
          parse_token_array(p[0], out.prompt_tokens);
        }
      } else {
        out.prompt_is_tokens = true;
        parse_token_array(p, out.prompt_tokens);
      }
    } else {
      bad_type("prompt", p, "a string or an array of token ids");
    }
    if (out.prompt_is_tokens ? out.prompt_tokens.empty() : out.prompt_text.empty())
      bad("prompt", "The prompt must not be empty.", "invalid_value");
    if (auto lp = get_int(body, "logprobs", 0, 5)) out.logprobs = static_cast<int>(*lp);
    if (auto echo = get_bool(body, "echo"); echo && *echo) bad("echo", "'echo' is not supported.", "unsupported_parameter");
    if (auto bo = get_int(body, "best_of", 1, 1 << 20); bo && *bo != 1)
      bad("best_of", "Only best_of=1 is supported.", "unsupported_value");
    if (auto sfx = get_string(body, "suffix"); sfx && !sfx->empty())
      bad("suffix", "'suffix' is not supported.", "unsupported_parameter");
    parse_larder(body, out.larder);
    return std::nullopt;
  } catch (const Bad& b) {
    return b.e;
  }
}

std::optional<ApiError> parse_chat_request(const ojson& body, ParsedRequest& out) {
  try {
    out.kind = Endpoint::Chat;
    parse_common(body, out);
    if (auto mct = get_int(body, "max_completion_tokens", 1, std::numeric_limits<int32_t>::max()))
      out.max_tokens = static_cast<int>(*mct);
    auto mit = body.find("messages");
    if (mit == body.end() || mit->is_null())
      bad("messages", "Missing required parameter: 'messages'.", "missing_required_parameter");
    if (!mit->is_array()) bad_type("messages", *mit, "an array");
    if (mit->empty()) bad("messages", "'messages' must contain at least one message.", "invalid_value");
    out.messages = ojson::array();
    size_t i = 0;
    for (auto& m : *mit) {
      const std::string param = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) bad_type(param, m, "an object");
      auto rit = m.find("role");
      if (rit == m.end() || !rit->is_string()) bad(param + ".role", "Each message needs a 'role' string.");
      const std::string role = rit->get<std::string>();
      if (role != "system" && role != "developer" && role != "user" && role != "assistant" && role != "tool")
        bad(param + ".role", "Invalid role '" + role + "': expected system, developer, user, assistant or tool.",
            "invalid_value");
      auto cit = m.find("content");
      const bool has_tool_calls = m.contains("tool_calls") && m["tool_calls"].is_array() && !m["tool_calls"].empty();
      if ((cit == m.end() || cit->is_null()) && !(role == "assistant" && has_tool_calls))
        bad(param + ".content", "Missing required parameter: '" + param + ".content'.", "missing_required_parameter");
      ojson nm = m;  // keep name, tool_calls, tool_call_id for templates that use them
      nm["content"] = cit == m.end() ? std::string() : content_text(*cit, i);
      out.messages.push_back(std::move(nm));
      ++i;
    }
    bool lp = get_bool(body, "logprobs").value_or(false);
    auto top = get_int(body, "top_logprobs", 0, 5);
    if (top && !lp) bad("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.");
    if (lp) out.logprobs = static_cast<int>(top.value_or(0));
    if (const ojson* rf = field(body, "response_format")) {
      if (!rf->is_object()) bad_type("response_format", *rf, "an object");
      auto t = get_string(*rf, "type");
      if (t && *t != "text") bad("response_format", "response_format type '" + *t + "' is not supported.", "unsupported_value");
    }
    if (const ojson* tools = field(body, "tools")) {
      if (!tools->is_array()) bad_type("tools", *tools, "an array");
      if (!tools->empty()) out.tools = *tools;
    }
    parse_larder(body, out.larder);
    return std::nullopt;
  } catch (const Bad& b) {
    return b.e;
  }
}

std::string StopMatcher::push(const std::string& text) {
  if (matched_) return {};
  if (stops_.empty()) return text;
  held_ += text;
  size_t best = std::string::npos;
  for (auto& s : stops_) {
    size_t p = held_.find(s);
    if (p < best) best = p;
  }
  if (best != std::string::npos) {
    matched_ = true;
    std::string out = held_.substr(0, best);
    held_.clear();
    return out;
  }
  // Keep the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (auto& s : stops_) {
    size_t max_k = std::min(s.size() - 1, held_.size());
    for (size_t k = max_k; k > keep; --k)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  if (matched_) return {};
  std::string out;
  out.swap(held_);
  return out;
}

ojson usage_json(const Usage& u) {
  ojson j = ojson::object();
  j["prompt_tokens"] = u.prompt_tokens;
  j["completion_tokens"] = u.completion_tokens;
  j["total_tokens"] = u.prompt_tokens + u.completion_tokens;
  ojson d = ojson::object();
  d["cached_tokens"] = u.cached_tokens;
  j["prompt_tokens_details"] = std::move(d);
  if (u.doc_tokens >= 0) {
    ojson k = ojson::object();
    k["mode"] = u.doc_mode;
    k["tokens"] = u.doc_tokens;
    k["reused_tokens"] = u.doc_reused;
    k["recomputed_tokens"] = u.doc_recomputed;
    k["recompute_fraction"] = u.doc_fraction;
    j["documents"] = std::move(k);
  }
  return j;
}

namespace {

std::string piece(const Tokenizer& tok, int32_t id) {
  if (id < 0 || id >= tok.n_vocab()) return {};
  return tok.token_bytes(id, true);
}

ojson bytes_json(const std::string& s) {
  ojson b = ojson::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

// JSON cannot carry -inf: report the most negative finite float instead.
double finite_lp(float lp) { return std::isfinite(lp) ? lp : -9999.0; }

}  // namespace

ojson completion_logprobs_json(const Tokenizer& tok, const std::vector<TokenInfo>& toks, int n_top) {
  ojson tokens = ojson::array(), lps = ojson::array(), tops = ojson::array(), offs = ojson::array();
  for (auto& t : toks) {
    tokens.push_back(piece(tok, t.id));
    lps.push_back(finite_lp(t.logprob));
    ojson d = ojson::object();
    for (int i = 0; i < n_top && i < static_cast<int>(t.top.size()); ++i) {
      std::string k = piece(tok, t.top[i].first);
      if (!d.contains(k)) d[k] = finite_lp(t.top[i].second);
    }
    tops.push_back(std::move(d));
    offs.push_back(t.text_offset);
  }
  ojson j = ojson::object();
  j["tokens"] = std::move(tokens);
  j["token_logprobs"] = std::move(lps);
  j["top_logprobs"] = std::move(tops);
  j["text_offset"] = std::move(offs);
  return j;
}

ojson chat_logprobs_json(const Tokenizer& tok, const std::vector<TokenInfo>& toks, int n_top) {
  ojson content = ojson::array();
  for (auto& t : toks) {
    ojson e = ojson::object();
    std::string p = piece(tok, t.id);
    e["token"] = p;
    e["logprob"] = finite_lp(t.logprob);
    e["bytes"] = bytes_json(p);
    ojson top = ojson::array();
    for (int i = 0; i < n_top && i < static_cast<int>(t.top.size()); ++i) {
      ojson a = ojson::object();
      std::string q = piece(tok, t.top[i].first);
      a["token"] = q;
      a["logprob"] = finite_lp(t.top[i].second);
      a["bytes"] = bytes_json(q);
      top.push_back(std::move(a));
    }
    e["top_logprobs"] = std::move(top);
    content.push_back(std::move(e));
  }
  ojson j = ojson::object();
  j["content"] = std::move(content);
  j["refusal"] = nullptr;
  return j;
}

std::string dump_json(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

}  // namespace larder::server
