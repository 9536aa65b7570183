// `larder replay`: drives an OpenAI-compatible server with a published request trace and
// reports prefix-cache hit rate, TTFT/TPOT and throughput (bench/replay/README.md).
//
// Trace: JSONL, one request a line: {"timestamp": ms, "input_length": tokens,
// "output_length": tokens, "hash_ids": [...]}, hash_ids being prefix-chained ids of
// 512-token blocks (len == ceil(input_length / 512)).
//
// Scaling by K (--scale, a divisor of 512): every hash block becomes B = 512/K tokens, the
// last (partial) block ceil(rem/K) tokens where rem = input_length - 512*(n-1), so the
// prompt has (n-1)*B + ceil(rem/K) tokens; max_tokens = max(1, ceil(output_length/K)).
// A request whose prompt + max_tokens exceeds the server's context (max_model_len of
// /v1/models) is clipped: max_tokens to at most ctx/2, then the prompt to its first
// ctx - max_tokens tokens (a prefix, so sharing is kept); such requests are counted.
//
// (Loading, scaling, clipping and the token mapping are src/sim/trace.h, shared with
// `larder simulate`, so a simulated and a real replay see the same requests.)
//
// Tokens: hash id h becomes the run t_j = 3 + splitmix64_j(h) mod (V - 3), j = 0..B-1,
// splitmix64_j(h) being the (j+1)-th output of the standard splitmix64 generator seeded
// with h; V is the server's vocabulary size (or --vocab). A partial block is a prefix of
// the id's run. Equal hash-id prefixes therefore give equal token prefixes, and a run is
// a pure function of (id, V).
//
// Requests: POST /v1/completions {prompt: [ids], max_tokens, temperature: 0, ignore_eos:
// true, stream: true, stream_options: {include_usage: true}}, each on its own connection
// and thread, sent at timestamp / --speed after the start. TTFT: send -> first streamed
// chunk with text (or the final chunk); TPOT: (last chunk - first chunk) /
// (completion_tokens - 1). Usage (prompt, cached, completion tokens) comes from the final
// usage chunk.
//
// Rejections: a 429 answer is the server's (or conductor's) early rejection, not an error: it
// is counted apart (with its Retry-After) and the request is left out of the figures below.
// Goodput (--ttft-slo / --tbt-slo, ms; 0 = no limit): the requests that succeeded with TTFT
// and TPOT within both, per second of trace time (the arrivals' span / --speed; the wall
// time when every request arrived at once).
//
// Offline bounds over the same scaled, clipped, limited requests in trace order (those that
// succeeded: a failed request is neither cached nor counted, as in the measured rate):
//  - unbounded_hit_rate: a server with an unbounded prefix cache of 16-token blocks (as
//    Larder's, blocks named by a hash chain over their tokens): request r reuses
//    min(floor(L/16)*16, floor((P-1)/16)*16) tokens, L being the longest common token
//    prefix with any earlier request and P its prompt length (at least one prompt token is
//    always computed). Concurrency and a finite cache can only lower the server's figure
//    (up to reordering of simultaneous arrivals: see the README).
//  - trace_hit_rate: the trace's own definition, in scaled tokens: block i of a request is
//    a hit when the same hash-id prefix ids[0..i] occurred in an earlier request (at
//    scale 1 over the whole published trace: 65%).
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "sim/trace.h"

namespace larder::cli {

namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

using sim::kFirstToken;
using sim::kTraceBlock;
using sim::Planned;
using sim::percentile;
using sim::prompt_tokens;
using sim::TraceReq;
constexpr int kServerBlock = 16;   // the server's KV block (prefix-cache granularity)

struct Outcome {
  std::atomic<bool> done{false};
  bool ok = false;
  int status = 0;
  std::string error;
  int prompt_tokens = 0, cached_tokens = 0, completion_tokens = 0;
  double ttft = -1, tpot = -1;
  double retry_after = -1;  // a 429's Retry-After header, seconds
};

std::atomic<bool> g_interrupted{false};
void on_sigint(int) {
  g_interrupted.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process
}

struct Target {
  std::string base;  // scheme://host:port
  std::string prefix;  // path prefix before /v1 (usually empty)
  std::string api_key;
  std::unique_ptr<httplib::Client> client(int read_timeout_s) const {
    auto c = std::make_unique<httplib::Client>(base);
    c->set_connection_timeout(10, 0);
    c->set_read_timeout(read_timeout_s, 0);
    c->set_write_timeout(60, 0);
    c->set_keep_alive(false);
    if (!api_key.empty()) c->set_bearer_token_auth(api_key);
    return c;
  }
};

bool parse_url(const std::string& url, Target& t, std::string& err) {
  std::smatch m;
  static const std::regex re(R"(^(https?)://([^/:]+|\[[^\]]+\])(:\d+)?(/.*)?$)");
  if (!std::regex_match(url, m, re)) {
    err = "--url must look like http://HOST:PORT (got '" + url + "')";
    return false;
  }
  t.base = m[1].str() + "://" + m[2].str() + m[3].str();
  t.prefix = m[4].str();
  while (!t.prefix.empty() && t.prefix.back() == '/') t.prefix.pop_back();
  if (t.prefix.size() >= 3 && t.prefix.compare(t.prefix.size() - 3, 3, "/v1") == 0) t.prefix.resize(t.prefix.size() - 3);
  return true;
}

std::string error_message(int status, const std::string& body) {
  json j = json::parse(body, nullptr, false);
  if (!j.is_discarded() && j.is_object() && j.contains("error")) {
    const json& e = j["error"];
    if (e.is_object() && e.contains("message") && e["message"].is_string()) return e["message"].get<std::string>();
    if (e.is_string()) return e.get<std::string>();
  }
  std::string b = body.substr(0, 200);
  for (char& c : b)
    if (c == '\n' || c == '\r') c = ' ';
  return "HTTP " + std::to_string(status) + (b.empty() ? "" : ": " + b);
}

// Counters of a Larder /metrics page (absent on other servers).
std::optional<std::map<std::string, double>> scrape_metrics(const Target& t) {
  auto c = t.client(10);
  auto res = c->Get((t.prefix + "/metrics").c_str());
  if (!res || res->status != 200) return std::nullopt;
  std::map<std::string, double> out;
  size_t pos = 0;
  const std::string& b = res->body;
  while (pos < b.size()) {
    size_t e = b.find('\n', pos);
    if (e == std::string::npos) e = b.size();
    std::string line = b.substr(pos, e - pos);
    pos = e + 1;
    if (line.empty() || line[0] == '#') continue;
    size_t sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    try {
      out[line.substr(0, sp)] = std::stod(line.substr(sp + 1));
    } catch (...) {
    }
  }
  if (!out.count("larder_prefix_hit_tokens_total")) return std::nullopt;
  return out;
}

struct Shared {
  std::atomic<int> done{0}, failed{0}, rejected{0}, in_flight{0};
  std::atomic<int64_t> prompt{0}, cached{0};
};

void run_one(const Target& t, const std::string& model, const std::vector<int32_t>& toks, int max_tokens, Outcome& o,
             Shared& sh) {
  json body = json::object();
  if (!model.empty()) body["model"] = model;
  body["prompt"] = toks;
  body["max_tokens"] = max_tokens;
  body["temperature"] = 0;
  body["ignore_eos"] = true;
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};

  auto cli = t.client(3600);
  httplib::Request req;
  req.method = "POST";
  req.path = t.prefix + "/v1/completions";
  req.headers = {{"Content-Type", "application/json"}, {"Accept", "text/event-stream"}};
  req.body = body.dump();
  std::string buf, raw;
  Clock::time_point t_send, t_first, t_last;
  bool have_first = false, finished = false;
  std::string stream_error;
  req.response_handler = [&](const httplib::Response& r) {
    o.status = r.status;
    return true;
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    if (o.status != 200) {
      if (raw.size() < 65536) raw.append(data, n);
      return true;
    }
    buf.append(data, n);
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind("data:", 0) != 0) continue;
      std::string payload = line.substr(5);
      if (!payload.empty() && payload[0] == ' ') payload.erase(0, 1);
      if (payload == "[DONE]") {
        finished = true;
        continue;
      }
      json j = json::parse(payload, nullptr, false);
      if (j.is_discarded() || !j.is_object()) continue;
      if (j.contains("error")) {
        stream_error = error_message(200, payload);
        continue;
      }
      auto now = Clock::now();
      if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty()) {
        const json& c = j["choices"][0];
        bool has_text = c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty();
        bool has_finish = c.contains("finish_reason") && !c["finish_reason"].is_null();
        if (has_text || has_finish) {
          if (!have_first) {
            have_first = true;
            t_first = now;
          }
          t_last = now;
        }
      }
      if (j.contains("usage") && j["usage"].is_object()) {
        const json& u = j["usage"];
        o.prompt_tokens = u.value("prompt_tokens", 0);
        o.completion_tokens = u.value("completion_tokens", 0);
        if (u.contains("prompt_tokens_details") && u["prompt_tokens_details"].is_object())
          o.cached_tokens = u["prompt_tokens_details"].value("cached_tokens", 0);
      }
    }
    return true;
  };
  sh.in_flight++;
  t_send = Clock::now();
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  bool sent = cli->send(req, res, err);
  if (!sent) {
    o.error = std::string("request failed: ") + httplib::to_string(err);
  } else if (res.status != 200) {
    o.status = res.status;
    o.error = error_message(res.status, raw.empty() ? res.body : raw);
    if (res.status == 429 && res.has_header("Retry-After")) {
      try {
        o.retry_after = std::stod(res.get_header_value("Retry-After"));
      } catch (...) {
      }
    }
  } else if (!stream_error.empty()) {
    o.error = stream_error;
  } else if (!finished) {
    o.error = "the stream ended without [DONE]";
  } else if (o.prompt_tokens <= 0) {
    o.error = "no usage in the stream (the server ignores stream_options.include_usage)";
  } else {
    o.ok = true;
    if (have_first) {
      o.ttft = std::chrono::duration<double>(t_first - t_send).count();
      if (o.completion_tokens >= 2)
        o.tpot = std::chrono::duration<double>(t_last - t_first).count() / (o.completion_tokens - 1);
    }
  }
  if (o.ok) {
    sh.prompt += o.prompt_tokens;
    sh.cached += o.cached_tokens;
  } else if (o.status == 429) {
    sh.rejected++;
  } else {
    sh.failed++;
  }
  o.done = true;
  sh.in_flight--;
  sh.done++;
}

json stats_json(const std::vector<double>& v) {
  json j = json::object();
  auto num = [](double x) { return std::isnan(x) ? json(nullptr) : json(x); };
  j["p50"] = num(percentile(v, 0.50));
  j["p90"] = num(percentile(v, 0.90));
  j["p99"] = num(percentile(v, 0.99));
  double s = 0;
  for (double x : v) s += x;
  j["mean"] = v.empty() ? json(nullptr) : json(s / v.size());
  j["n"] = v.size();
  return j;
}

std::string pct(double num, double den) {
  char b[32];
  if (den <= 0) return "n/a";
  std::snprintf(b, sizeof b, "%.1f%%", 100.0 * num / den);
  return b;
}

std::string slo_text(double ms) {
  if (!(ms > 0)) return "(no limit)";
  char b[32];
  std::snprintf(b, sizeof b, "%g ms", ms);
  return b;
}

std::string ms3(const std::vector<double>& v) {
  if (v.empty()) return "n/a";
  char b[96];
  std::snprintf(b, sizeof b, "p50 %.1f  p90 %.1f  p99 %.1f ms", 1e3 * percentile(v, 0.5), 1e3 * percentile(v, 0.9),
                1e3 * percentile(v, 0.99));
  return b;
}

}  // namespace

int cmd_replay(Args& a) {
  if (a.trace.empty()) return fail("replay needs --trace FILE (JSONL: timestamp, input_length, output_length, hash_ids)");
  const int K = a.replay_scale;
  if (std::string why = sim::check_scale(K); !why.empty()) return fail(why);
  if (!(a.replay_speed > 0) || !std::isfinite(a.replay_speed)) return fail("--speed must be a positive number");
  if (a.replay_limit < 0) return fail("--limit must be >= 0");
  if (a.replay_vocab != 0 && a.replay_vocab <= kFirstToken) return fail("--vocab must be > 3");
  Target tgt;
  std::string err;
  if (!parse_url(a.url, tgt, err)) return fail(err);
  tgt.api_key = a.api_key;

  auto loaded = sim::load_trace(a.trace, a.replay_limit, a.replay_skip);
  if (!loaded.ok()) return fail(loaded.error());
  std::vector<TraceReq> trace = std::move(*loaded);

  // The server: model id, context (/v1/models), vocabulary size (probe), waiting while it loads.
  std::string model;
  int n_ctx = 0, server_vocab = 0;  // server_vocab: /v1/models "n_vocab" if given, else probed
  {
    auto c = tgt.client(30);
    auto t0 = Clock::now();
    bool warned = false;
    for (;;) {
      auto res = c->Get((tgt.prefix + "/v1/models").c_str());
      if (!res)
        return fail("cannot reach the server at " + a.url + ": " + httplib::to_string(res.error()));
      if (res->status == 401)
        return fail("the server at " + a.url + " wants an API key (--api-key or LARDER_API_KEY)");
      if (res->status != 200)
        return fail("GET /v1/models at " + a.url + ": " + error_message(res->status, res->body));
      json j = json::parse(res->body, nullptr, false);
      if (j.is_discarded() || !j.contains("data") || !j["data"].is_array() || j["data"].empty())
        return fail("GET /v1/models at " + a.url + " did not return a model list");
      const json& m = j["data"][0];
      if (m.contains("id") && m["id"].is_string()) model = m["id"].get<std::string>();
      if (m.contains("max_model_len") && m["max_model_len"].is_number_integer()) n_ctx = m["max_model_len"].get<int>();
      for (const char* k : {"n_vocab", "vocab_size"})
        if (m.contains(k) && m[k].is_number_integer()) server_vocab = m[k].get<int>();
      auto h = c->Get((tgt.prefix + "/health").c_str());
      bool loading = h && h->status == 503 && h->body.find("loading") != std::string::npos;
      if (!loading) break;
      if (std::chrono::duration<double>(Clock::now() - t0).count() > 300)
        return fail("the server at " + a.url + " is still loading its model after 300 s");
      if (!warned) std::fprintf(stderr, "larder replay: waiting for the server to load its model...\n");
      warned = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  }
  if (n_ctx <= 0)
    std::fprintf(stderr, "larder replay: warning: the server does not report max_model_len; requests are not clipped\n");
  int vocab = a.replay_vocab;
  if (server_vocab == 0) {
    // Larder answers an out-of-range token id with "... (vocabulary size N)".
    json probe = json::object();
    if (!model.empty()) probe["model"] = model;
    probe["prompt"] = json::array({2147483647});
    probe["max_tokens"] = 1;
    auto c = tgt.client(30);
    auto res = c->Post((tgt.prefix + "/v1/completions").c_str(), probe.dump(), "application/json");
    if (!res) return fail("cannot reach the server at " + a.url + ": " + httplib::to_string(res.error()));
    std::smatch m;
    static const std::regex re(R"(vocabulary size (\d+))");
    if (res->status == 400 && std::regex_search(res->body, m, re)) server_vocab = std::stoi(m[1].str());
  }
  if (vocab == 0) vocab = server_vocab;
  if (vocab == 0) return fail("cannot tell the server's vocabulary size; pass --vocab N (token ids are drawn from [3, N))");
  if (server_vocab > 0 && vocab > server_vocab)
    return fail("--vocab " + std::to_string(vocab) + " exceeds the server's vocabulary (" + std::to_string(server_vocab) + ")");
  if (vocab <= kFirstToken) return fail("the vocabulary (" + std::to_string(vocab) + " tokens) is too small");

  std::vector<Planned> plans = sim::plan_trace(trace, K, n_ctx);
  const size_t N = trace.size();
  if (!a.replay_dump.empty()) {
    std::FILE* f = std::fopen(a.replay_dump.c_str(), "w");
    if (!f) return fail("cannot write " + a.replay_dump + ": " + std::strerror(errno));
    for (size_t i = 0; i < N; ++i) {
      json j = json::object();
      j["index"] = i;
      j["line"] = trace[i].line;
      j["max_tokens"] = plans[i].max_tokens;
      j["clipped"] = plans[i].clipped;
      j["prompt"] = prompt_tokens(trace[i], plans[i], vocab);
      std::string s = j.dump() + "\n";
      std::fwrite(s.data(), 1, s.size(), f);
    }
    if (std::fclose(f) != 0) return fail("cannot write " + a.replay_dump);
  }

  auto m0 = scrape_metrics(tgt);
  std::vector<Outcome> outs(N);
  Shared sh;
  std::vector<std::pair<size_t, std::thread>> threads;  // (request, its thread), joined once done
  g_interrupted = false;
  auto old_handler = std::signal(SIGINT, on_sigint);
  const double t_first_ms = trace.front().ts_ms;
  const auto t0 = Clock::now();
  auto last_progress = t0;
  auto progress = [&](size_t sent) {
    std::erase_if(threads, [&](auto& t) {
      if (!outs[t.first].done.load()) return false;
      t.second.join();
      return true;
    });
    auto now = Clock::now();
    if (now - last_progress < std::chrono::seconds(5)) return;
    last_progress = now;
    std::fprintf(stderr, "larder replay: %6.1f s  sent %zu/%zu  done %d (failed %d, rejected %d)  in flight %d  hit rate %s\n",
                 std::chrono::duration<double>(now - t0).count(), sent, N, sh.done.load(), sh.failed.load(),
                 sh.rejected.load(),
                 sh.in_flight.load(), pct(static_cast<double>(sh.cached.load()), static_cast<double>(sh.prompt.load())).c_str());
  };
  size_t sent = 0;
  for (; sent < N && !g_interrupted; ++sent) {
    auto due = t0 + std::chrono::duration_cast<Clock::duration>(
                        std::chrono::duration<double, std::milli>((trace[sent].ts_ms - t_first_ms) / a.replay_speed));
    while (!g_interrupted && Clock::now() < due) {
      progress(sent);
      std::this_thread::sleep_until(std::min(due, Clock::now() + std::chrono::milliseconds(200)));
    }
    if (g_interrupted) break;
    auto toks = prompt_tokens(trace[sent], plans[sent], vocab);
    threads.emplace_back(sent, std::thread([&, i = sent, toks = std::move(toks)] {
                           run_one(tgt, model, toks, plans[i].max_tokens, outs[i], sh);
                         }));
  }
  if (g_interrupted)
    std::fprintf(stderr, "larder replay: interrupted: %zu of %zu requests sent; waiting for them (Ctrl-C again to quit)\n",
                 sent, N);
  while (sh.done.load() < static_cast<int>(sent)) {
    progress(sent);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  for (auto& t : threads) t.second.join();
  std::signal(SIGINT, old_handler == SIG_ERR ? SIG_DFL : old_handler);
  auto m1 = scrape_metrics(tgt);

  // Aggregate. The offline bounds cover the requests that succeeded, like the measured rate.
  std::vector<bool> use(N, false);
  for (size_t i = 0; i < sent; ++i) use[i] = outs[i].ok;
  sim::offline_hits(trace, plans, use, kServerBlock);
  int ok = 0, failed = 0, rejected = 0, clipped = 0, good = 0;
  const double ttft_slo = a.ttft_slo / 1e3, tbt_slo = a.tbt_slo / 1e3;
  std::vector<double> retry_after;
  int64_t prompt = 0, cached = 0, completion = 0, planned_prompt = 0, ub_hit = 0, tr_hit = 0;
  std::vector<double> ttft, tpot;
  std::map<std::string, int> errors;
  std::string first_error;
  for (size_t i = 0; i < sent; ++i) {
    const Outcome& o = outs[i];
    if (plans[i].clipped) clipped++;
    if (o.ok) {
      planned_prompt += plans[i].prompt_len;
      ub_hit += plans[i].unbounded_hit;
      tr_hit += plans[i].trace_hit;
      ok++;
      prompt += o.prompt_tokens;
      cached += o.cached_tokens;
      completion += o.completion_tokens;
      if (o.ttft >= 0) ttft.push_back(o.ttft);
      if (o.tpot >= 0) tpot.push_back(o.tpot);
      if ((ttft_slo <= 0 || (o.ttft >= 0 && o.ttft <= ttft_slo)) && (tbt_slo <= 0 || o.tpot <= tbt_slo)) good++;
    } else if (o.status == 429) {
      rejected++;
      if (o.retry_after >= 0) retry_after.push_back(o.retry_after);
    } else {
      failed++;
      errors[o.status ? std::to_string(o.status) : "transport"]++;
      if (first_error.empty()) first_error = o.error;
    }
  }
  auto rate = [](int64_t n, int64_t d) { return d > 0 ? json(static_cast<double>(n) / d) : json(nullptr); };

  json r = json::object();
  r["trace"] = a.trace;
  r["url"] = a.url;
  r["model"] = model;
  r["n_ctx"] = n_ctx > 0 ? json(n_ctx) : json(nullptr);
  r["vocab"] = vocab;
  r["scale"] = K;
  r["block_tokens"] = kTraceBlock / K;
  r["speed"] = a.replay_speed;
  r["limit"] = a.replay_limit;
  r["interrupted"] = static_cast<bool>(g_interrupted);
  r["requests"] = N;
  r["sent"] = sent;
  r["ok"] = ok;
  r["failed"] = failed;
  r["rejected"] = rejected;
  r["retry_after_s"] = stats_json(retry_after);
  r["clipped"] = clipped;
  r["errors"] = errors;
  r["first_error"] = first_error.empty() ? json(nullptr) : json(first_error);
  r["prompt_tokens"] = prompt;
  r["cached_tokens"] = cached;
  r["computed_tokens"] = prompt - cached;
  r["completion_tokens"] = completion;
  r["hit_rate"] = rate(cached, prompt);
  r["planned_prompt_tokens"] = planned_prompt;
  r["unbounded_hit_tokens"] = ub_hit;
  r["unbounded_hit_rate"] = rate(ub_hit, planned_prompt);
  r["trace_hit_rate"] = rate(tr_hit, planned_prompt);
  r["server_block"] = kServerBlock;
  r["ttft_s"] = stats_json(ttft);
  r["tpot_s"] = stats_json(tpot);
  r["output_tokens_per_s"] = wall > 0 ? completion / wall : 0.0;
  r["wall_s"] = wall;
  // Goodput per second of trace time (the sent arrivals' span at --speed).
  const double span = sent > 1 ? (trace[sent - 1].ts_ms - t_first_ms) / 1e3 / a.replay_speed : 0.0;
  const double trace_s = span > 0 ? span : wall;
  r["ttft_slo_s"] = ttft_slo > 0 ? json(ttft_slo) : json(nullptr);
  r["tbt_slo_s"] = tbt_slo > 0 ? json(tbt_slo) : json(nullptr);
  r["good"] = good;
  r["trace_s"] = trace_s;
  r["goodput_rps"] = trace_s > 0 ? good / trace_s : 0.0;
  if (m0 && m1) {
    auto d = [&](const char* k) {
      auto a0 = m0->find(k), a1 = m1->find(k);
      return a0 != m0->end() && a1 != m1->end() ? json(static_cast<int64_t>(std::llround(a1->second - a0->second)))
                                                : json(nullptr);
    };
    json s = json::object();
    s["prefix_hit_tokens"] = d("larder_prefix_hit_tokens_total");
    s["prompt_tokens"] = d("larder_prompt_tokens_total");
    s["prompt_tokens_computed"] = d("larder_prompt_tokens_computed_total");
    s["preemptions"] = d("larder_preemptions_total");
    s["hit_rate"] = s["prefix_hit_tokens"].is_number() && s["prompt_tokens"].is_number()
                        ? rate(s["prefix_hit_tokens"].get<int64_t>(), s["prompt_tokens"].get<int64_t>())
                        : json(nullptr);
    r["server_metrics"] = s;
  } else {
    r["server_metrics"] = nullptr;
  }

  if (cached > ub_hit + 4 * kServerBlock)
    std::fprintf(stderr,
                 "larder replay: note: the server reused more than the offline unbounded bound: its cache was warm "
                 "(an earlier run?); restart it for comparable figures\n");
  if (a.json) {
    std::printf("%s\n", r.dump().c_str());
  } else {
    std::printf("replay of %s: %zu requests at scale 1/%d (%d-token blocks), speed %gx, against %s (model %s, context %s, vocab %d)%s\n",
                a.trace.c_str(), N, K, kTraceBlock / K, a.replay_speed, a.url.c_str(), model.empty() ? "?" : model.c_str(),
                n_ctx > 0 ? std::to_string(n_ctx).c_str() : "?", vocab, g_interrupted ? " [interrupted]" : "");
    std::printf("requests:   sent %zu  ok %d  failed %d  clipped %d  rejected (429) %d\n", sent, ok, failed, clipped,
                rejected);
    if (!first_error.empty()) std::printf("first error: %s\n", first_error.c_str());
    std::printf("prompt:     %lld tokens, reused %lld, computed %lld: hit rate %s (offline unbounded %s; trace blocks %s)\n",
                static_cast<long long>(prompt), static_cast<long long>(cached), static_cast<long long>(prompt - cached),
                pct(cached, prompt).c_str(), pct(ub_hit, planned_prompt).c_str(), pct(tr_hit, planned_prompt).c_str());
    std::printf("TTFT:       %s\n", ms3(ttft).c_str());
    std::printf("TPOT:       %s\n", ms3(tpot).c_str());
    std::printf("goodput:    %d requests within TTFT %s and TPOT %s: %.3f requests/s over %.1f s of trace time\n", good,
                slo_text(a.ttft_slo).c_str(), slo_text(a.tbt_slo).c_str(), trace_s > 0 ? good / trace_s : 0.0, trace_s);
    std::printf("output:     %lld tokens in %.2f s wall: %.1f tokens/s\n", static_cast<long long>(completion), wall,
                wall > 0 ? completion / wall : 0.0);
    if (r["server_metrics"].is_object()) {
      const json& s = r["server_metrics"];
      std::printf("/metrics:   prefix hit tokens +%s, prompt tokens +%s, computed +%s, preemptions +%s\n",
                  s["prefix_hit_tokens"].dump().c_str(), s["prompt_tokens"].dump().c_str(),
                  s["prompt_tokens_computed"].dump().c_str(), s["preemptions"].dump().c_str());
    }
  }
  // Only rejections is an answer (an overloaded cluster), not a failure.
  if (sent > 0 && ok == 0 && failed > 0)
    return fail("no request succeeded: " + std::to_string(failed) + " failed, " + std::to_string(rejected) +
                " rejected; first error: " + first_error);
  return 0;
}

}  // namespace larder::cli
