#include "server/server.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "http/http.h"
#include "engine/scheduler.h"
#include "model/gguf.h"
#include "model/model.h"
#include "chat/chat_template.h"
#include "server/metrics.h"
#include "server/openai_api.h"
#include "server/prompt_cache.h"
#include "server/documents.h"
#include <future>
#include "pd/pd.h"
#include "tokenizer/tokenizer.h"

namespace larder::server {

namespace {

using Clock = std::chrono::steady_clock;

enum class State { Loading, Ready, Draining };

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}() ^
                                          static_cast<uint64_t>(Clock::now().time_since_epoch().count()));
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  std::string s = prefix;
  for (int i = 0; i < 24; ++i) s += alphabet[rng() % 62];
  return s;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

void reply_json(http::Response& res, int status, const ojson& j) {
  res.status = status;
  res.set_content(dump_json(j), "application/json");
}

void reply_error(http::Response& res, const ApiError& e) {
  reply_json(res, e.status, error_body(e));
  if (e.status == 429) res.set_header("Retry-After", "1");
}

ApiError make_api_error(int status, std::string msg, std::string type, std::string code = "", std::string param = "") {
  ApiError e;
  e.status = status;
  e.message = std::move(msg);
  e.type = std::move(type);
  e.code = std::move(code);
  e.param = std::move(param);
  return e;
}

// The text sent so far and the tokens behind it, in order.
struct Piece {
  std::string text;
  std::vector<TokenInfo> toks;
  std::vector<int32_t> ids;  // larder.token_ids: generated since the previous piece (may run ahead of text)
};

// One generation request, shared by its HTTP handler and the scheduler callback.
struct Job {
  // Set before submit, then read-only.
  Endpoint kind = Endpoint::Completions;
  bool stream = false, include_usage = false;
  int n_top = -1;  // logprobs: -1 off, else top alternatives to report
  std::string id, model_id;
  int64_t created = 0;
  const Tokenizer* tok = nullptr;
  Metrics* metrics = nullptr;
  int prompt_tokens = 0;
  size_t text_base = 0;  // completions text_offset of the first generated character
  // Prompt cache: the prompt text, its tokenization and how it was made (text prompts only).
  bool cacheable = false, add_bos = false, parse_special = false;
  std::string prompt_text;
  PromptCache::Encoded prompt_enc;
  std::atomic<bool> remembered{false};
  Clock::time_point t_start;
  // "larder" extension (openai_api.h LarderExt).
  bool want_ids = false;
  bool cache_ids = false;           // the prompt cache learns prompt_ids + generated (conductor's ids)
  std::vector<int32_t> prompt_ids;  // the prompt as used (want_ids or cache_ids)
  size_t skip_bytes = 0;            // resume.text_bytes: text the client already has
  int n_resumed = 0;                // resumed ids (in the submitted prompt, counted as completion tokens)

  // Scheduler-thread state.
  std::optional<StreamDecoder> dec;
  StopMatcher stop;
  bool ended = false;
  size_t offset = 0;
  std::vector<TokenInfo> pend;  // tokens whose text has not been sent yet
  std::vector<int32_t> pend_ids;  // want_ids: ids not yet put in a piece
  int n_gen = 0;
  Clock::time_point t_first, t_last;

  // Shared, under mu.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Piece> out;
  bool finished = false;
  std::string finish_reason;
  std::string error;
  Usage usage;
  // Every generated token (resumed ones first); not the end-of-generation token, which
  // the scheduler reports only as TokenEvent::sampled (unless ignore_eos).
  std::vector<int32_t> gen_ids;
  std::vector<int32_t> tail_ids;  // want_ids: ids of the end not carried by a piece (final chunk)

  std::atomic<bool> cancelled{false};
  std::atomic<uint64_t> sched_id{0};

  void publish(std::string text, bool final, const std::string& reason, const std::string& err = {}) {
    std::lock_guard<std::mutex> lk(mu);
    if (finished) return;
    if (!text.empty() || (final && !pend.empty())) {
      out.push_back(Piece{std::move(text), std::move(pend), std::move(pend_ids)});
      pend.clear();
      pend_ids.clear();
    }
    usage.completion_tokens = std::max(usage.completion_tokens, n_resumed + n_gen);
    if (final) {
      tail_ids = std::move(pend_ids);
      pend_ids.clear();
      finished = true;
      finish_reason = reason;
      error = err;
    }
    cv.notify_all();
  }

  // Ends the request from outside the scheduler thread (forced shutdown).
  void force_finish() {
    std::lock_guard<std::mutex> lk(mu);
    if (finished) return;
    finished = true;
    finish_reason = "stop";
    cv.notify_all();
  }

  void end_timing() {
    if (n_gen >= 2 && metrics)
      metrics->observe_tpot(std::chrono::duration<double>(t_last - t_first).count() / (n_gen - 1));
  }

  // The text a generated token releases to the client: UTF-8 assembly, then stop strings.
  std::string feed(int32_t id) {
    std::string raw = dec->push(id);
    offset += raw.size();
    return stop.push(raw);
  }
  // The held-back rest when generation ends; `matched` if a stop string completes in it.
  std::string drain(bool& matched) {
    std::string tail = stop.push(dec->flush());
    matched = stop.matched();
    if (!matched) tail += stop.flush();
    return tail;
  }

  // Resume: the ids an earlier stream generated go through the same path as new tokens
  // (UTF-8 partials, held-back stop prefixes and chat's stripped first space come out as
  // they did there), and the first `skip` bytes of their text, which the client has, are
  // dropped. Before submit. Returns an error message, or "" with `done` set if these ids
  // already end the reply (end-of-generation, a stop string, max_tokens).
  std::string replay(const std::vector<int32_t>& ids, size_t skip, int max_tokens, bool ignore_eos, bool& done) {
    std::string text, reason;
    for (int32_t id : ids) {
      if (n_resumed >= max_tokens) {
        reason = "length";
        break;
      }
      if (tok->is_eog(id) && !ignore_eos) {
        reason = "stop";
        break;
      }
      gen_ids.push_back(id);
      n_resumed++;
      if (tok->is_eog(id)) continue;  // ignore_eos: a token without text, as in on_event
      text += feed(id);
      if (stop.matched()) {
        reason = "stop";
        break;
      }
    }
    if (reason.empty() && n_resumed >= max_tokens) reason = "length";
    if (!reason.empty() && !stop.matched()) {
      bool matched;
      text += drain(matched);
      if (matched) reason = "stop";
    }
    if (skip > text.size())
      return "'larder.resume.text_bytes' is " + std::to_string(skip) + " but the resumed tokens give only " +
             std::to_string(text.size()) + " bytes of text.";
    if (skip < text.size() && (static_cast<unsigned char>(text[skip]) & 0xC0) == 0x80)
      return "'larder.resume.text_bytes' does not fall on a character boundary of the resumed text.";
    skip_bytes = skip;
    done = !reason.empty();
    text.erase(0, skip);
    if (done) ended = true;
    if (done || !text.empty()) publish(std::move(text), done, reason);
    return {};
  }

  // The "larder" field of a chunk or answer.
  ojson larder_json(const std::vector<int32_t>& ids, size_t text_bytes, bool with_prompt) const {
    ojson l = ojson::object();
    l["token_ids"] = ids;
    l["text_bytes"] = text_bytes;
    if (with_prompt) l["prompt_tokens"] = prompt_ids;
    return l;
  }

  // Runs on the scheduler thread.
  bool on_event(const TokenEvent& ev) {
    if (ended) return false;
    {
      std::lock_guard<std::mutex> lk(mu);
      // Resumed: the scheduler's prompt holds the resumed ids; usage counts them as completion.
      if (ev.prompt_tokens > 0) usage.prompt_tokens = ev.prompt_tokens - n_resumed;
      if (ev.cached_tokens > 0)
        usage.cached_tokens = n_resumed ? std::min(ev.cached_tokens, usage.prompt_tokens) : ev.cached_tokens;
      if (ev.completion_tokens > 0)
        usage.completion_tokens = std::max(usage.completion_tokens, n_resumed + ev.completion_tokens);
      if (usage.doc_tokens >= 0 && ev.doc_tokens > 0) {
        usage.doc_tokens = ev.doc_tokens;
        usage.doc_reused = ev.doc_reused_tokens;
        usage.doc_recomputed = ev.doc_recomputed_tokens;
        usage.doc_fraction = ev.doc_recompute_fraction;
      }
      if (ev.token >= 0) gen_ids.push_back(ev.token);
    }
    if (want_ids) {
      if (ev.token >= 0)
        pend_ids.push_back(ev.token);
      else if (ev.finish == FinishReason::Stop && ev.sampled >= 0)
        pend_ids.push_back(ev.sampled);  // the end-of-generation token is reported too
    }
    if (cancelled.load()) {
      ended = true;
      end_timing();
      publish({}, true, "stop");
      return false;
    }
    std::string text;
    if (ev.token >= 0) {
      auto now = Clock::now();
      if (n_gen == 0) {
        t_first = now;
        if (metrics) metrics->observe_ttft(std::chrono::duration<double>(now - t_start).count());
      }
      t_last = now;
      n_gen++;
      if (metrics) metrics->add_generated(1);
      if (!tok->is_eog(ev.token)) {
        if (n_top >= 0) {
          TokenInfo ti;
          ti.id = ev.token;
          ti.logprob = ev.logprob;
          ti.top = ev.top;
          ti.text_offset = text_base + offset;
          pend.push_back(std::move(ti));
        }
        text = feed(ev.token);
        if (stop.matched()) {
          ended = true;
          end_timing();
          publish(std::move(text), true, "stop");
          return false;  // cancels the sequence: its blocks are freed now
        }
      }
    }
    if (ev.finish != FinishReason::None) {
      bool matched;
      text += drain(matched);
      ended = true;
      end_timing();
      std::string reason = matched ? "stop"
                           : ev.finish == FinishReason::Length ? "length"
                                                               : "stop";
      if (ev.finish == FinishReason::Error)
        publish(std::move(text), true, "error", ev.error.empty() ? "generation failed" : ev.error);
      else
        publish(std::move(text), true, reason);
      return false;
    }
    if (!text.empty()) publish(std::move(text), false, {});
    return true;
  }
};

// How a text prompt was tokenized (for the prompt cache).
struct PromptMode {
  bool cacheable = false, add_bos = false, parse_special = false;
  bool ids_only = false;  // larder.prompt_tokens differ from enc.ids but stand for the same text
  std::string text;
  PromptCache::Encoded enc;
};

const char* kKnownRoutes[] = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                              "/models", "/completions", "/chat/completions", "/internal/pd/prefill",
                              "/internal/pd/ack", "/internal/pd/cancel"};

std::string endpoint_label(const std::string& path) {
  for (const char* r : kKnownRoutes)
    if (path == r) return r;
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  return "other";
}

}  // namespace

struct Server::Impl {
  ServerParams p;
  std::unique_ptr<http::Server> http;
  std::atomic<int> state{static_cast<int>(State::Loading)};
  std::atomic<const Model*> model{nullptr};
  std::atomic<Scheduler*> sched{nullptr};
  std::atomic<pd::PdNode*> pd{nullptr};
  std::function<void(std::string&)> metrics_extra;  // set before start()
  std::optional<ChatTemplate> chat_template;
  bool template_has_tools = false;
  std::string model_id;
  std::vector<std::string> aliases;      // fixed at construction
  std::vector<std::string> model_names;  // general.name etc., set by attach()
  int64_t created = unix_now();
  Metrics metrics;
  std::atomic<int> n_active{0};
  std::mutex jobs_mu;
  std::set<std::shared_ptr<Job>> jobs;
  std::unique_ptr<PromptCache> prompt_cache;  // set by attach() unless disabled
  std::unique_ptr<DocumentStore> documents;   // set by start()
  int bound_port = -1;

  explicit Impl(ServerParams params) : p(std::move(params)) {
    namespace fs = std::filesystem;
    fs::path mp(p.model_path);
    std::string stem = mp.has_stem() ? mp.stem().string() : mp.filename().string();
    if (fs::is_directory(mp)) stem = mp.filename().empty() ? mp.parent_path().filename().string() : mp.filename().string();
    model_id = p.alias.empty() ? stem : p.alias;
    aliases = {model_id, stem, mp.filename().string(), p.model_path};
  }

  State st() const { return static_cast<State>(state.load()); }

  bool model_matches(const std::string& m) const {
    if (std::find(aliases.begin(), aliases.end(), m) != aliases.end()) return true;
    // Names from the model file: written by attach() before the state leaves Loading.
    return st() != State::Loading && std::find(model_names.begin(), model_names.end(), m) != model_names.end();
  }

  void cancel_job(const std::shared_ptr<Job>& job) {
    job->cancelled = true;
    uint64_t id = job->sched_id.load();
    Scheduler* s = sched.load();
    if (id && s) s->cancel(id);
  }

  void finish_job(const std::shared_ptr<Job>& job) {
    remember(*job);
    {
      std::lock_guard<std::mutex> lk(jobs_mu);
      jobs.erase(job);
    }
    n_active--;
  }

  // A finished request's prompt + generated ids go to the prompt cache, so that the next
  // turn of the conversation reuses them (and their KV blocks) instead of re-tokenizing.
  // Runs before the client gets the end of the reply (it may send the next turn at once).
  void remember(Job& job) {
    if (!prompt_cache || !job.cacheable || job.remembered.exchange(true)) return;
    std::vector<int32_t> gen;
    {
      std::lock_guard<std::mutex> lk(job.mu);
      if (!job.finished || job.finish_reason == "error") return;
      gen = job.gen_ids;
    }
    if (job.cache_ids) {
      gen.insert(gen.begin(), job.prompt_ids.begin(), job.prompt_ids.end());
      prompt_cache->insert(gen, job.add_bos, job.parse_special);
      return;
    }
    // Chat replies reach the client without their first space (see the StreamDecoder).
    prompt_cache->insert(job.prompt_text, job.prompt_enc, gen, job.add_bos, job.parse_special,
                         /*strip_first_space=*/job.kind == Endpoint::Chat);
  }

  // tok.encode(text, add_bos, parse_special), through the prompt cache when there is one.
  std::vector<int32_t> encode_prompt(const Tokenizer& tok, const std::string& text, bool add_bos, bool parse_special,
                                     PromptMode& mode) {
    if (!prompt_cache) return tok.encode(text, add_bos, parse_special);
    mode.cacheable = true;
    mode.add_bos = add_bos;
    mode.parse_special = parse_special;
    mode.text = text;
    mode.enc = prompt_cache->encode(text, add_bos, parse_special);
    return mode.enc.ids;
  }

  void setup_routes();
  void handle_generate(const http::Request& req, http::Response& res, Endpoint kind);
  void handle_models(const http::Request& req, http::Response& res);
  ojson model_card() const;
  std::optional<ApiError> build_prompt(const ParsedRequest& pr, std::vector<int32_t>& tokens, size_t& text_base,
                                      PromptMode& mode);
  std::optional<ApiError> use_prompt_tokens(const ParsedRequest& pr, std::vector<int32_t>& tokens, size_t& text_base,
                                           PromptMode& mode);
  // Documents: the prompt's tokens as prefix + documents + query, and its layout.
  std::optional<ApiError> build_doc_prompt(const ParsedRequest& pr, const DocsField& df, std::vector<int32_t>& tokens,
                                           DocRequest& dr, size_t& text_base);
  // Chat: the rendered conversation cut where the documents go (the start of the last user
  // message's content): prefix tokens and query tokens.
  std::optional<ApiError> chat_split(const ojson& messages, const ojson& tools, std::vector<int32_t>& prefix,
                                     std::vector<int32_t>* query);
  // The conversation through the chat template (with the generation prompt); has_bos_text: it
  // starts with the BOS text (so no BOS token is added).
  std::optional<ApiError> render_chat(const ojson& messages, const ojson& tools, std::string& text, bool& has_bos_text);
  void handle_documents(const http::Request& req, http::Response& res);
  std::string chunk_json(const Job& job, const Piece* piece, const std::string* finish, bool first_chat,
                         const ojson* larder = nullptr) const;
};

ojson Server::Impl::model_card() const {
  ojson m = ojson::object();
  m["id"] = model_id;
  m["object"] = "model";
  m["created"] = created;
  m["owned_by"] = "larder";
  if (Scheduler* s = sched.load()) m["max_model_len"] = s->max_seq_len();
  return m;
}

void Server::Impl::handle_models(const http::Request& req, http::Response& res) {
  if (req.matches.size() > 1) {
    std::string want = req.matches[1];
    if (!model_matches(want)) {
      reply_error(res, make_api_error(404, "The model '" + want + "' does not exist.", "invalid_request_error",
                                      "model_not_found", "model"));
      return;
    }
    reply_json(res, 200, model_card());
    return;
  }
  ojson j = ojson::object();
  j["object"] = "list";
  j["data"] = ojson::array({model_card()});
  reply_json(res, 200, j);
}

// A 400 naming `param` when some id is outside the vocabulary.
static std::optional<ApiError> check_ids(const Tokenizer& tok, const std::vector<int32_t>& ids, const char* param) {
  for (int32_t t : ids)
    if (t >= tok.n_vocab())
      return make_api_error(400, "Token id " + std::to_string(t) + " is out of range (vocabulary size " +
                                     std::to_string(tok.n_vocab()) + ").",
                            "invalid_request_error", "invalid_value", param);
  return std::nullopt;
}

std::optional<ApiError> Server::Impl::render_chat(const ojson& messages, const ojson& tools, std::string& text,
                                                  bool& has_bos_text) {
  const Tokenizer& tok = *model.load()->tokenizer;
  const Vocab& v = tok.vocab();
  std::string bos = v.bos >= 0 && v.bos < tok.n_vocab() ? v.tokens[v.bos] : "";
  std::string eos = v.eos >= 0 && v.eos < tok.n_vocab() ? v.tokens[v.eos] : "";
  if (!tools.is_null() && !(chat_template && template_has_tools))
    return make_api_error(400, "This model's chat template does not support tools.", "invalid_request_error",
                          "unsupported_parameter", "tools");
  if (!chat_template)  // attach() always sets one
    return make_api_error(500, "The server has no chat template.", "server_error", "internal_error", "messages");
  ojson extra = ojson::object();
  extra["bos_token"] = bos;
  extra["eos_token"] = eos;
  if (!tools.is_null()) extra["tools"] = tools;
  auto r = chat_template->apply(messages, /*add_generation_prompt=*/true, extra);
  if (!r.ok())
    return make_api_error(400, "The chat template could not be applied to these messages: " + r.error(),
                          "invalid_request_error", "invalid_value", "messages");
  text = std::move(r.value());
  // Templates usually write the BOS text themselves; add the token only when they don't.
  has_bos_text = !bos.empty() && text.rfind(bos, 0) == 0;
  return std::nullopt;
}

std::optional<ApiError> Server::Impl::build_prompt(const ParsedRequest& pr, std::vector<int32_t>& tokens,
                                                   size_t& text_base, PromptMode& mode) {
  const Model& m = *model.load();
  const Tokenizer& tok = *m.tokenizer;
  if (pr.kind == Endpoint::Completions) {
    if (pr.prompt_is_tokens) {
      if (auto e = check_ids(tok, pr.prompt_tokens, "prompt")) return e;
      tokens = pr.prompt_tokens;
      text_base = tok.decode(tokens).size();
    } else {
      tokens = encode_prompt(tok, pr.prompt_text, /*add_bos=*/true, /*parse_special=*/false, mode);
      text_base = pr.prompt_text.size();
    }
    return std::nullopt;
  }
  std::string text;
  bool has_bos_text = false;
  if (auto e = render_chat(pr.messages, pr.tools, text, has_bos_text)) return e;
  tokens = encode_prompt(tok, text, /*add_bos=*/!has_bos_text, /*parse_special=*/true, mode);
  text_base = 0;
  return std::nullopt;
}

// larder.prompt_tokens: the conductor's ids replace the prompt build_prompt made (it still
// ran: messages and prompt fail as they would without them). The prompt cache learns from
// the request only where these ids stand for the prompt text.
std::optional<ApiError> Server::Impl::use_prompt_tokens(const ParsedRequest& pr, std::vector<int32_t>& tokens,
                                                        size_t& text_base, PromptMode& mode) {
  const std::vector<int32_t>& ids = *pr.larder.prompt_tokens;
  const Tokenizer& tok = *model.load()->tokenizer;
  if (auto e = check_ids(tok, ids, "larder.prompt_tokens")) return e;
  if (mode.cacheable && mode.enc.ids != ids) {
    std::string text;
    mode.ids_only = prompt_cache->decode(ids, mode.add_bos, mode.parse_special, text) && text == mode.text;
    mode.cacheable = mode.ids_only;
  }
  if (pr.kind == Endpoint::Completions && pr.prompt_is_tokens) text_base = tok.decode(ids).size();
  tokens = ids;
  return std::nullopt;
}

// Where the documents go in a rendered chat: no text a client sends contains this (a control
// character the templates copy through untouched).
static const std::string kDocMark = "\x1f<larder:documents>\x1f";

std::optional<ApiError> Server::Impl::chat_split(const ojson& messages, const ojson& tools,
                                                 std::vector<int32_t>& prefix, std::vector<int32_t>* query) {
  const Tokenizer& tok = *model.load()->tokenizer;
  ojson msgs = messages;
  int last = -1;
  for (size_t i = 0; i < msgs.size(); ++i)
    if (msgs[i].is_object() && msgs[i].value("role", "") == "user") last = static_cast<int>(i);
  if (last < 0)
    return make_api_error(400, "Documents go at the start of the last user message, and there is none.",
                          "invalid_request_error", "invalid_value", "messages");
  if (!msgs[last].contains("content") || !msgs[last]["content"].is_string())
    return make_api_error(400, "The last user message's content must be text to put documents before it.",
                          "invalid_request_error", "invalid_value", "messages");
  msgs[last]["content"] = kDocMark + msgs[last]["content"].get<std::string>();
  std::string text;
  bool has_bos_text = false;
  if (auto e = render_chat(msgs, tools, text, has_bos_text)) return e;
  const size_t pos = text.find(kDocMark);
  if (pos == std::string::npos || text.find(kDocMark, pos + 1) != std::string::npos)
    return make_api_error(400, "This model's chat template does not keep the user message's text as it is, so documents "
                               "cannot be placed in it.",
                          "invalid_request_error", "invalid_value", "documents");
  prefix = tok.encode(std::string_view(text).substr(0, pos), !has_bos_text, true);
  if (query) *query = tok.encode(std::string_view(text).substr(pos + kDocMark.size()), false, true);
  return std::nullopt;
}

std::optional<ApiError> Server::Impl::build_doc_prompt(const ParsedRequest& pr, const DocsField& df,
                                                       std::vector<int32_t>& tokens, DocRequest& dr, size_t& text_base) {
  const Tokenizer& tok = *model.load()->tokenizer;
  std::vector<int32_t> prefix, query;
  const char* qparam = pr.kind == Endpoint::Chat ? "messages" : "prompt";
  if (pr.kind == Endpoint::Completions) {
    prefix = tok.encode(df.prefix, /*add_bos=*/true, /*parse_special=*/false);
    if (pr.prompt_is_tokens) {
      if (auto e = check_ids(tok, pr.prompt_tokens, "prompt")) return e;
      query = pr.prompt_tokens;
      text_base = tok.decode(query).size();
    } else {
      query = tok.encode(pr.prompt_text, false, false);
      text_base = pr.prompt_text.size();
    }
  } else {
    if (auto e = chat_split(pr.messages, pr.tools, prefix, &query)) return e;
    text_base = 0;
  }
  if (query.empty())
    return make_api_error(400, "Documents need a question after them: the prompt is empty.", "invalid_request_error",
                          "invalid_value", qparam);
  tokens = prefix;
  dr.prefix = static_cast<int>(prefix.size());
  dr.params = df.params;
  for (size_t i = 0; i < df.texts.size(); ++i) {
    std::vector<int32_t> ids = tok.encode(df.texts[i], false, false);
    if (ids.empty())
      return make_api_error(400, "Document " + std::to_string(i) + " has no tokens.", "invalid_request_error",
                            "invalid_value", "documents[" + std::to_string(i) + "]");
    dr.doc_len.push_back(static_cast<int>(ids.size()));
    tokens.insert(tokens.end(), ids.begin(), ids.end());
  }
  tokens.insert(tokens.end(), query.begin(), query.end());
  return std::nullopt;
}

void Server::Impl::handle_documents(const http::Request& req, http::Response& res) {
  if (req.method == "GET" || req.method == "DELETE") {
    const std::string id = req.matches.size() > 1 ? req.matches[1] : "";
    auto text = documents ? documents->get(id) : std::nullopt;
    if (!text) {
      reply_error(res, make_api_error(404, "The document '" + id + "' does not exist.", "invalid_request_error",
                                      "document_not_found", "id"));
      return;
    }
    ojson j = ojson::object();
    j["id"] = id;
    j["object"] = "document";
    j["bytes"] = text->size();
    if (req.method == "DELETE") {
      documents->remove(id);
      j["deleted"] = true;
    } else {
      j["text"] = *text;
    }
    reply_json(res, 200, j);
    return;
  }
  if (st() != State::Ready) {
    reply_error(res, make_api_error(503, st() == State::Loading ? "The model is loading; try again shortly."
                                                                 : "The server is shutting down.",
                                    "unavailable_error", st() == State::Loading ? "model_loading" : "shutting_down"));
    return;
  }
  ojson body = ojson::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded() || !body.is_object()) {
    reply_error(res, make_api_error(400, "The body must be a JSON object {\"text\": ...}.", "invalid_request_error",
                                    "invalid_json"));
    return;
  }
  if (!body.contains("text") || !body["text"].is_string() || body["text"].get<std::string>().empty()) {
    reply_error(res, make_api_error(400, "'text' must be a non-empty string.", "invalid_request_error", "invalid_value",
                                    "text"));
    return;
  }
  const bool encode = !body.contains("encode") || body["encode"] == true;
  const std::string text = body["text"].get<std::string>();
  const Tokenizer& tok = *model.load()->tokenizer;
  std::vector<int32_t> prefix;
  if (encode) {
    if (body.contains("document_prefix")) {
      if (!body["document_prefix"].is_string()) {
        reply_error(res, make_api_error(400, "'document_prefix' must be a string", "invalid_request_error",
                                        "invalid_value", "document_prefix"));
        return;
      }
      prefix = tok.encode(body["document_prefix"].get<std::string>(), true, false);
    } else {
      // The prefix a chat request with these earlier messages (default: none) gives its documents.
      ojson msgs = ojson::array();
      if (body.contains("messages")) {
        const ojson& m = body["messages"];
        bool ok = m.is_array();
        for (size_t i = 0; ok && i < m.size(); ++i)
          ok = m[i].is_object() && m[i].contains("role") && m[i]["role"].is_string() && m[i].contains("content") &&
               m[i]["content"].is_string();
        if (!ok) {
          reply_error(res, make_api_error(400, "'messages' must be an array of {\"role\": string, \"content\": string}",
                                          "invalid_request_error", "invalid_value", "messages"));
          return;
        }
        msgs = m;
      }
      msgs.push_back(ojson{{"role", "user"}, {"content", ""}});
      if (auto e = chat_split(msgs, nullptr, prefix, nullptr)) {
        reply_error(res, *e);
        return;
      }
    }
  }
  auto id = documents->put(text);
  if (!id.ok()) {
    reply_error(res, make_api_error(500, id.error(), "server_error", "storage_error"));
    return;
  }
  ojson j = ojson::object();
  j["id"] = *id;
  j["object"] = "document";
  j["bytes"] = text.size();
  const std::vector<int32_t> ids = tok.encode(text, false, false);
  j["tokens"] = ids.size();
  if (encode && !ids.empty()) {
    Scheduler& sch = *sched.load();
    if (static_cast<int64_t>(prefix.size() + ids.size()) >= sch.max_seq_len()) {
      reply_error(res, make_api_error(400,
                                      "The document is " + std::to_string(ids.size()) +
                                          " tokens: with its prefix it exceeds this model's maximum context length of " +
                                          std::to_string(sch.max_seq_len()) + " tokens.",
                                      "invalid_request_error", "context_length_exceeded", "text"));
      return;
    }
    GenRequest g;
    g.prompt = prefix;
    g.prompt.insert(g.prompt.end(), ids.begin(), ids.end());
    g.max_tokens = 0;
    auto dr = std::make_shared<DocRequest>();
    dr->prefix = static_cast<int>(prefix.size());
    dr->doc_len = {static_cast<int>(ids.size())};
    dr->params.mode = docs::Mode::Reposition;  // any composing mode stores; one document needs no repair
    g.docs = dr;
    auto done = std::make_shared<std::promise<TokenEvent>>();
    auto fut = done->get_future();
    auto sid = sch.submit(std::move(g), [done](const TokenEvent& ev) {
      if (ev.finish != FinishReason::None) done->set_value(ev);
      return true;
    });
    if (!sid.ok()) {
      reply_error(res, make_api_error(503, "The document could not be encoded now: " + sid.error(), "unavailable_error",
                                      "overloaded"));
      return;
    }
    const TokenEvent ev = fut.get();
    if (ev.finish == FinishReason::Error) {
      reply_error(res, make_api_error(500, "The document could not be encoded: " + ev.error, "server_error",
                                      "internal_error"));
      return;
    }
    j["encoded"] = true;
    j["prefix_tokens"] = prefix.size();
    j["reused_tokens"] = ev.doc_reused_tokens;
  } else {
    j["encoded"] = false;
  }
  reply_json(res, 200, j);
}

std::string Server::Impl::chunk_json(const Job& job, const Piece* piece, const std::string* finish,
                                     bool first_chat, const ojson* larder) const {
  ojson j = ojson::object();
  j["id"] = job.id;
  j["object"] = job.kind == Endpoint::Chat ? "chat.completion.chunk" : "text_completion";
  j["created"] = job.created;
  j["model"] = job.model_id;
  ojson c = ojson::object();
  c["index"] = 0;
  const Tokenizer& tok = *job.tok;
  ojson lp = nullptr;
  if (piece && job.n_top >= 0 && !piece->toks.empty())
    lp = job.kind == Endpoint::Chat ? chat_logprobs_json(tok, piece->toks, job.n_top)
                                    : completion_logprobs_json(tok, piece->toks, job.n_top);
  if (job.kind == Endpoint::Chat) {
    ojson d = ojson::object();
    if (first_chat) {
      d["role"] = "assistant";
      d["content"] = "";
    } else if (piece) {
      d["content"] = piece->text;
    }
    c["delta"] = std::move(d);
  } else {
    c["text"] = piece ? piece->text : std::string();
  }
  c["logprobs"] = std::move(lp);
  c["finish_reason"] = finish ? ojson(*finish) : ojson();
  j["choices"] = ojson::array({std::move(c)});
  if (job.include_usage) j["usage"] = nullptr;
  if (larder) j["larder"] = *larder;
  return "data: " + dump_json(j) + "\n\n";
}

void Server::Impl::handle_generate(const http::Request& req, http::Response& res, Endpoint kind) {
  State s = st();
  if (s == State::Loading) {
    reply_error(res, make_api_error(503, "The model is loading; try again shortly.", "unavailable_error",
                                    "model_loading"));
    res.set_header("Retry-After", "1");
    return;
  }
  if (s == State::Draining) {
    reply_error(res, make_api_error(503, "The server is shutting down.", "unavailable_error", "shutting_down"));
    return;
  }
  Scheduler& sch = *sched.load();
  const Model& mdl = *model.load();

  ojson body = ojson::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    reply_error(res, make_api_error(400,
                                    "We could not parse the JSON body of your request. (HINT: This likely means you "
                                    "aren't using your HTTP library correctly.)",
                                    "invalid_request_error", "invalid_json"));
    return;
  }
  ParsedRequest pr;
  auto perr = kind == Endpoint::Chat ? parse_chat_request(body, pr) : parse_completion_request(body, pr);
  if (perr) {
    reply_error(res, *perr);
    return;
  }
  if (!pr.model.empty() && !model_matches(pr.model)) {
    reply_error(res, make_api_error(404, "The model '" + pr.model + "' does not exist or you do not have access to it.",
                                    "invalid_request_error", "model_not_found", "model"));
    return;
  }
  std::vector<int32_t> tokens;
  size_t text_base = 0;
  PromptMode mode;
  DocsField df;
  if (auto e = parse_documents(body, documents.get(), df)) {
    reply_error(res, *e);
    return;
  }
  if (df.present && kind == Endpoint::Completions && pr.larder.prompt_tokens) {
    reply_error(res, make_api_error(400, "'documents' cannot be combined with larder.prompt_tokens",
                                    "invalid_request_error", "invalid_value", "documents"));
    return;
  }
  auto doc_req = std::make_shared<DocRequest>();
  if (df.present) {
    if (auto e = build_doc_prompt(pr, df, tokens, *doc_req, text_base)) {
      reply_error(res, *e);
      return;
    }
  } else if (auto e = build_prompt(pr, tokens, text_base, mode)) {
    reply_error(res, *e);
    return;
  }
  if (pr.larder.prompt_tokens && !df.present)
    if (auto e = use_prompt_tokens(pr, tokens, text_base, mode)) {
      reply_error(res, *e);
      return;
    }
  const int n_prompt = static_cast<int>(tokens.size());
  const int max_seq = sch.max_seq_len();
  auto ctx_error = [&](int requested) {
    char buf[400];
    if (requested > 0)
      std::snprintf(buf, sizeof buf,
                    "This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the "
                    "prompt, %d for the completion). Please reduce the prompt or the completion length.",
                    max_seq, n_prompt + requested, n_prompt, requested);
    else
      std::snprintf(buf, sizeof buf,
                    "This model's maximum context length is %d tokens. However, your prompt is %d tokens, which "
                    "leaves no room for a completion. Please reduce the prompt.",
                    max_seq, n_prompt);
    reply_error(res, make_api_error(400, buf, "invalid_request_error", "context_length_exceeded",
                                    kind == Endpoint::Chat ? "messages" : "prompt"));
  };
  if (n_prompt == 0) {
    reply_error(res, make_api_error(400, "The prompt is empty.", "invalid_request_error", "invalid_value", "prompt"));
    return;
  }
  if (n_prompt >= max_seq) {
    ctx_error(pr.max_tokens.value_or(0));
    return;
  }
  int max_tokens;
  if (pr.max_tokens) {
    if (static_cast<int64_t>(n_prompt) + *pr.max_tokens > max_seq) {
      ctx_error(*pr.max_tokens);
      return;
    }
    max_tokens = *pr.max_tokens;
  } else {
    max_tokens = kind == Endpoint::Completions ? std::min(16, max_seq - n_prompt) : max_seq - n_prompt;
  }
  const LarderExt& ext = pr.larder;
  if (auto e = check_ids(*mdl.tokenizer, ext.resume_tokens, "larder.resume.tokens")) {
    reply_error(res, *e);
    return;
  }

  auto job = std::make_shared<Job>();
  job->kind = kind;
  job->stream = pr.stream;
  job->include_usage = pr.include_usage;
  job->n_top = pr.logprobs;
  job->id = random_id(kind == Endpoint::Chat ? "chatcmpl-" : "cmpl-");
  job->model_id = model_id;
  job->created = unix_now();
  job->tok = mdl.tokenizer.get();
  job->metrics = &metrics;
  job->prompt_tokens = n_prompt;
  job->usage.prompt_tokens = n_prompt;
  job->text_base = text_base;
  job->cacheable = mode.cacheable && prompt_cache != nullptr;
  job->add_bos = mode.add_bos;
  job->parse_special = mode.parse_special;
  if (job->cacheable) {
    job->prompt_text = std::move(mode.text);
    job->prompt_enc = std::move(mode.enc);
  }
  if (df.present) {
    job->usage.doc_tokens = 0;
    job->usage.doc_mode = docs::mode_name(doc_req->params.mode);
  }
  job->want_ids = ext.token_ids;
  job->cache_ids = job->cacheable && mode.ids_only;
  if (job->want_ids || job->cache_ids) job->prompt_ids = tokens;
  job->t_start = Clock::now();
  // Completions continue the prompt (keep the leading space); chat replies start fresh.
  job->dec.emplace(*mdl.tokenizer, /*strip_first_space=*/kind == Endpoint::Chat);
  job->stop = StopMatcher(pr.stop);
  // Resume: the resumed ids extend the prompt (its KV may be cached) and count against max_tokens.
  bool done = false;
  if (ext.resume) {
    std::string err = job->replay(ext.resume_tokens, ext.resume_text_bytes, max_tokens, pr.ignore_eos, done);
    if (!err.empty()) {
      reply_error(res, make_api_error(400, err, "invalid_request_error", "invalid_value", "larder.resume.text_bytes"));
      return;
    }
    tokens.insert(tokens.end(), job->gen_ids.begin(), job->gen_ids.end());
  }

  GenRequest g;
  g.prompt = std::move(tokens);
  g.sampling = pr.sampling;
  g.max_tokens = max_tokens - job->n_resumed;
  g.ignore_eos = pr.ignore_eos;
  g.n_logprobs = pr.logprobs < 0 ? 0 : std::max(1, pr.logprobs);
  g.spec_max = pr.larder.spec_max;
  if (df.present) g.docs = doc_req;
  // Disaggregated: the router named the prefill instance that computes this prompt.
  // X-Larder-Fetch: HOST:PORT;N (the conductor's KV pool): the first N prompt tokens' KV is
  // fetched from that instance, which holds it, instead of computed here.
  if (pd::PdNode* node = pd.load(); node && node->params().role != "prefill" && !df.present) {
    std::string fetch_api;
    int fetch_tokens = 0;
    if (std::string f = req.get_header_value("X-Larder-Fetch"); !f.empty()) {
      const size_t semi = f.find(';');
      if (semi != std::string::npos) {
        fetch_api = f.substr(0, semi);
        fetch_tokens = std::atoi(f.c_str() + semi + 1);
      }
    }
    if (std::string pf = req.get_header_value("X-Larder-Prefill"); !pf.empty())
      g.kv_source = node->make_source(pf, g, fetch_api, fetch_tokens);
    if (!g.kv_source && !fetch_api.empty() && fetch_tokens > 0)
      g.kv_source = node->make_fetch_source(fetch_api, g, fetch_tokens);
  }

  n_active++;
  {
    std::lock_guard<std::mutex> lk(jobs_mu);
    jobs.insert(job);
  }
  // A resume whose ids already ended the reply has nothing to generate.
  if (!done) {
    auto id = sch.submit(std::move(g), [job](const TokenEvent& ev) { return job->on_event(ev); });
    if (!id.ok()) {
      finish_job(job);
      std::string msg = lower(id.error());
      if (st() == State::Draining || msg.find("shut") != std::string::npos || msg.find("stopp") != std::string::npos)
        reply_error(res, make_api_error(503, "The server is shutting down.", "unavailable_error", "shutting_down"));
      else if (msg.find("queue") != std::string::npos || msg.find("full") != std::string::npos)
        reply_error(res, make_api_error(429, "The server is busy: the request queue is full. Retry shortly.",
                                        "rate_limit_error", "rate_limit_exceeded"));
      else
        reply_error(res, make_api_error(400, id.error(), "invalid_request_error", "invalid_value"));
      return;
    }
    job->sched_id = id.value();
  }

  if (!job->stream) {
    // A client that closes its connection now will not read the answer: stop computing it.
    req.on_disconnect([this, job] { cancel_job(job); });
    {
      std::unique_lock<std::mutex> lk(job->mu);
      job->cv.wait(lk, [&] { return job->finished; });
    }
    Piece all;
    for (auto& p : job->out) {
      all.text += p.text;
      for (auto& t : p.toks) all.toks.push_back(std::move(t));
      all.ids.insert(all.ids.end(), p.ids.begin(), p.ids.end());
    }
    all.ids.insert(all.ids.end(), job->tail_ids.begin(), job->tail_ids.end());
    Usage u = job->usage;
    std::string reason = job->finish_reason, err = job->error;
    finish_job(job);
    if (reason == "error") {
      reply_error(res, make_api_error(500, "Generation failed: " + err, "server_error", "internal_error"));
      return;
    }
    ojson j = ojson::object();
    j["id"] = job->id;
    j["object"] = kind == Endpoint::Chat ? "chat.completion" : "text_completion";
    j["created"] = job->created;
    j["model"] = job->model_id;
    ojson c = ojson::object();
    c["index"] = 0;
    ojson lp = nullptr;
    if (job->n_top >= 0)
      lp = kind == Endpoint::Chat ? chat_logprobs_json(*job->tok, all.toks, job->n_top)
                                  : completion_logprobs_json(*job->tok, all.toks, job->n_top);
    if (kind == Endpoint::Chat) {
      ojson msg = ojson::object();
      msg["role"] = "assistant";
      msg["content"] = all.text;
      msg["refusal"] = nullptr;
      c["message"] = std::move(msg);
    } else {
      c["text"] = all.text;
    }
    c["logprobs"] = std::move(lp);
    c["finish_reason"] = reason;
    j["choices"] = ojson::array({std::move(c)});
    j["usage"] = usage_json(u);
    if (job->want_ids) j["larder"] = job->larder_json(all.ids, job->skip_bytes + all.text.size(), true);
    reply_json(res, 200, j);
    return;
  }

  // Streaming: server-sent events, one `data: {...}` per piece of text, then [DONE].
  struct StreamState {
    bool started = false;
    bool prompt_sent = false;  // larder.prompt_tokens goes with the first chunk
    size_t text_bytes = 0;     // reply text the client has (a resume's text_bytes included)
  };
  auto ss = std::make_shared<StreamState>();
  ss->text_bytes = job->skip_bytes;
  // want_ids: the "larder" field of the next chunk.
  auto ext_of = [job, ss](const std::vector<int32_t>& ids, size_t n_text) {
    ss->text_bytes += n_text;
    ojson l = job->larder_json(ids, ss->text_bytes, !ss->prompt_sent);
    ss->prompt_sent = true;
    return l;
  };
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, job, ss, ext_of](size_t, http::DataSink& sink) -> bool {
        std::string buf;
        const std::vector<int32_t> no_ids;
        if (!ss->started) {
          ss->started = true;
          if (job->kind == Endpoint::Chat) {
            ojson l;
            if (job->want_ids) l = ext_of(no_ids, 0);
            buf = chunk_json(*job, nullptr, nullptr, /*first_chat=*/true, job->want_ids ? &l : nullptr);
            if (!sink.write(buf.data(), buf.size())) {
              cancel_job(job);
              return false;
            }
            return true;
          }
        }
        std::deque<Piece> pieces;
        bool fin;
        std::vector<int32_t> tail_ids;
        {
          std::unique_lock<std::mutex> lk(job->mu);
          job->cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return job->finished || !job->out.empty(); });
          pieces.swap(job->out);
          fin = job->finished;
          if (fin) tail_ids = job->tail_ids;
        }
        if (pieces.empty() && !fin) {
          if (!sink.is_writable()) {
            cancel_job(job);
            return false;
          }
          return true;
        }
        if (fin) remember(*job);
        for (auto& p : pieces)
          if (!p.text.empty() || !p.toks.empty()) {
            ojson l;
            if (job->want_ids) l = ext_of(p.ids, p.text.size());
            buf += chunk_json(*job, &p, nullptr, false, job->want_ids ? &l : nullptr);
          }
        if (fin) {
          if (job->finish_reason == "error") {
            ApiError e = make_api_error(500, "Generation failed: " + job->error, "server_error", "internal_error");
            buf += "data: " + dump_json(error_body(e)) + "\n\n";
          } else {
            ojson l;
            if (job->want_ids) l = ext_of(tail_ids, 0);
            buf += chunk_json(*job, nullptr, &job->finish_reason, false, job->want_ids ? &l : nullptr);
            if (job->include_usage) {
              ojson u = ojson::object();
              u["id"] = job->id;
              u["object"] = job->kind == Endpoint::Chat ? "chat.completion.chunk" : "text_completion";
              u["created"] = job->created;
              u["model"] = job->model_id;
              u["choices"] = ojson::array();
              u["usage"] = usage_json(job->usage);
              buf += "data: " + dump_json(u) + "\n\n";
            }
          }
          buf += "data: [DONE]\n\n";
        }
        if (!buf.empty() && !sink.write(buf.data(), buf.size())) {
          cancel_job(job);
          return false;
        }
        if (fin) sink.done();
        return true;
      },
      [this, job](bool /*success*/) {
        bool done;
        {
          std::lock_guard<std::mutex> lk(job->mu);
          done = job->finished;
        }
        if (!done) cancel_job(job);  // the client went away mid-stream
        finish_job(job);
      });
}

void Server::Impl::setup_routes() {
  http::ServerOptions o = p.http_opts;
  o.host = p.host;
  o.port = p.port;
  o.max_body_bytes = p.max_body_bytes;
  // Workers run handlers only (idle and slow connections cost none): every running and
  // queued request, with room for /metrics, /v1/models and documents beside them.
  int n_threads = p.http_threads > 0 ? p.http_threads : std::max(64, p.parallel + p.max_queue + 32);
  o.worker_threads = std::min(n_threads, 2048);
  http = std::make_unique<http::Server>(o);

  http->set_pre_routing([this](const http::Request& req, http::Response& res) {
    if (p.api_key.empty()) return false;
    const std::string& path = req.path;
    bool protected_path = path.rfind("/v1/", 0) == 0 || path == "/completions" || path == "/chat/completions" ||
                          path == "/models" || path.rfind("/internal/", 0) == 0;
    if (!protected_path) return false;
    if (req.get_header_value("Authorization") == "Bearer " + p.api_key) return false;
    reply_error(res, make_api_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"));
    return true;
  });

  // The body of every error answered without one (the HTTP layer's own, a handler's status only).
  http->set_error_handler([](const http::Request& req, http::Response& res) {
    ApiError e;
    e.status = res.status;
    switch (res.status) {
      case 404:
        e.message = "Invalid URL (" + req.method + " " + req.path + ")";
        e.code = "unknown_url";
        break;
      case 413:
        e.message = res.reason.empty() ? "The request body is too large." : res.reason;
        e.code = "request_too_large";
        break;
      case 431:
        e.message = res.reason.empty() ? "The request header is too large." : res.reason;
        e.code = "header_too_large";
        break;
      case 400:
        e.message = res.reason.empty() ? "Malformed HTTP request." : res.reason;
        break;
      case 429:
        e.message = res.reason;
        e.type = "rate_limit_error";
        e.code = "too_many_connections";
        break;
      case 503:
        e.message = res.reason;
        e.type = "unavailable_error";
        e.code = "too_many_connections";
        break;
      default:
        e.message = res.reason.empty() ? "HTTP error " + std::to_string(res.status) + "." : res.reason;
        if (res.status >= 500) {
          e.type = "server_error";
          e.code = "internal_error";
        }
    }
    reply_json(res, e.status, error_body(e));
  });

  http->set_logger([this](const http::Request& req, const http::Response& res) {
    metrics.count_request(endpoint_label(req.path), res.status);
  });

  http->set_method_not_allowed([](const http::Request& req, http::Response& res, const std::string& allow) {
    reply_error(res, make_api_error(405, "Method " + req.method + " is not allowed for " + req.path + ".",
                                    "invalid_request_error", "method_not_allowed"));
    res.set_header("Allow", allow);
  });
  auto get_only = [&](const std::string& path, http::Handler h) { http->route("GET", path, std::move(h)); };
  auto post_only = [&](const std::string& path, http::Handler h) { http->route("POST", path, std::move(h)); };

  // Answered on the I/O thread: never behind busy workers.
  http->route("GET", "/health", [this](const http::Request&, http::Response& res) {
    State s = st();
    ojson j = ojson::object();
    j["status"] = s == State::Ready ? "ok" : s == State::Loading ? "loading" : "draining";
    reply_json(res, s == State::Ready ? 200 : 503, j);
  }, /*inline_io=*/true);
  get_only("/metrics", [this](const http::Request&, http::Response& res) {
    std::optional<SchedulerStats> stats;
    if (Scheduler* s = sched.load()) stats = s->stats();
    res.status = 200;
    std::string text = metrics.render(stats ? &*stats : nullptr, n_active.load());
    if (pd::PdNode* node = pd.load()) node->render_metrics(text);
    if (metrics_extra) metrics_extra(text);
    http->render_metrics(text);
    res.set_content(text, "text/plain; version=0.0.4");
  });
  auto internal = [this](void (pd::PdNode::*fn)(const http::Request&, http::Response&)) {
    return [this, fn](const http::Request& req, http::Response& res) {
      pd::PdNode* node = pd.load();
      if (!node || st() != State::Ready) {
        reply_error(res, make_api_error(503, "This instance takes no KV handoffs (start it with --role or --cluster).",
                                        "unavailable_error", "no_handoff"));
        return;
      }
      (node->*fn)(req, res);
    };
  };
  post_only("/internal/pd/prefill", internal(&pd::PdNode::handle_prefill));
  post_only("/internal/pd/ack", internal(&pd::PdNode::handle_ack));
  post_only("/internal/pd/cancel", internal(&pd::PdNode::handle_cancel));
  for (const char* path : {"/v1/models", "/models", R"(/v1/models/(.+))"})
    get_only(path, [this](const http::Request& req, http::Response& res) { handle_models(req, res); });
  for (const char* path : {"/v1/completions", "/completions"})
    post_only(path, [this](const http::Request& req, http::Response& res) {
      handle_generate(req, res, Endpoint::Completions);
    });
  for (const char* path : {"/v1/chat/completions", "/chat/completions"})
    post_only(path, [this](const http::Request& req, http::Response& res) {
      handle_generate(req, res, Endpoint::Chat);
    });
  auto docs_handler = [this](const http::Request& req, http::Response& res) { handle_documents(req, res); };
  http->route("POST", "/v1/documents", docs_handler);
  http->route("GET", R"(/v1/documents/([^/]+))", docs_handler);
  http->route("DELETE", R"(/v1/documents/([^/]+))", docs_handler);
}

Server::Server(ServerParams p) : impl_(std::make_unique<Impl>(std::move(p))) {}

Server::~Server() { stop(); }

Status Server::start() {
  Impl& I = *impl_;
  auto docs = DocumentStore::open(I.p.documents_dir);
  if (!docs.ok()) return make_error("documents: %s", docs.error().c_str());
  I.documents = std::move(*docs);
  I.setup_routes();
  if (Status st = I.http->listen(); !st.ok()) return st;
  I.bound_port = I.http->port();
  return Status::Ok();
}

int Server::port() const { return impl_->bound_port; }

void Server::attach(const Model& model, Scheduler& sched) {
  Impl& I = *impl_;
  // The same choice as `larder chat`: the model's template, else the built-in one for its architecture.
  std::optional<std::string> src;
  if (model.gguf) src = model.gguf->get_string("tokenizer.chat_template");
  if (auto t = model_chat_template(src, model.cfg.arch); t.ok()) {
    I.chat_template.emplace(std::move(t->tmpl));
    I.template_has_tools = !t->builtin && src->find("tools") != std::string::npos;
    if (!t->note.empty()) std::fprintf(stderr, "larder serve: %s\n", t->note.c_str());
  } else {
    std::fprintf(stderr, "larder serve: warning: %s\n", t.error().c_str());
  }
  if (model.gguf) {
    if (auto name = model.gguf->get_string("general.name"); name && !name->empty()) I.model_names.push_back(*name);
  }
  if (!model.cfg.name.empty()) I.model_names.push_back(model.cfg.name);
  if (I.p.prompt_cache_entries > 0 && model.tokenizer) {
    PromptCacheParams pc;
    pc.max_entries = I.p.prompt_cache_entries;
    pc.echo_replies = I.p.prompt_cache_echo;
    I.prompt_cache = std::make_unique<PromptCache>(*model.tokenizer, pc);
    if (!I.prompt_cache->enabled()) I.prompt_cache.reset();
  }
  I.model.store(&model);
  I.sched.store(&sched);
  I.state.store(static_cast<int>(State::Ready));
}

void Server::attach_pd(pd::PdNode* node) { impl_->pd.store(node); }

void Server::set_metrics_extra(std::function<void(std::string&)> f) { impl_->metrics_extra = std::move(f); }

void Server::begin_drain() { impl_->state.store(static_cast<int>(State::Draining)); }

int Server::active() const { return impl_->n_active.load(); }

void Server::cancel_all() {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    std::lock_guard<std::mutex> lk(impl_->jobs_mu);
    jobs.assign(impl_->jobs.begin(), impl_->jobs.end());
  }
  for (auto& j : jobs) {
    impl_->cancel_job(j);
    // The scheduler may be gone or never call back: end the request ourselves.
    j->force_finish();
  }
}

void Server::stop() {
  Impl& I = *impl_;
  if (I.http) I.http->stop();
}

}  // namespace larder::server
