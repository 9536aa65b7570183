#include "router/router.h"

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "http/http.h"
#include "cluster/etcd.h"

namespace larder::router {

using cluster::InstanceInfo;
using nlohmann::json;

namespace {

// A slow client holds the instance back (TCP backpressure) instead of the router queueing
// an unbounded amount of its answer.
constexpr size_t kMaxQueuedBytes = 4u << 20;

json error_body(const std::string& message, const std::string& type, const std::string& code) {
  json e = json::object();
  e["message"] = message;
  e["type"] = type;
  e["param"] = nullptr;
  e["code"] = code.empty() ? json(nullptr) : json(code);
  return json{{"error", e}};
}

void reply_json(http::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(j.dump(), "application/json");
}

void reply_error(http::Response& res, int status, const std::string& message, const std::string& type,
                 const std::string& code) {
  reply_json(res, status, error_body(message, type, code));
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Request headers not passed to the instance: this hop's framing, what the client library
// sets itself, cpp-httplib's REMOTE_ADDR-style entries, and the header only the router sets.
bool drop_request_header(const std::string& name) {
  static const std::set<std::string> drop = {
      "host", "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "content-length",
      "accept-encoding", "expect", "proxy-authorization", "proxy-connection", "remote_addr", "remote_port",
      "local_addr", "local_port", "x-larder-prefill"};
  return drop.count(lower(name)) > 0;
}

// Response headers not passed back: framing of the upstream hop (our server frames its own).
bool drop_response_header(const std::string& name) {
  static const std::set<std::string> drop = {"connection", "keep-alive", "transfer-encoding", "content-length",
                                             "content-type", "content-encoding", "trailer", "upgrade", "date",
                                             "server"};
  return drop.count(lower(name)) > 0;
}

std::string describe(httplib::Error e) {
  switch (e) {
    case httplib::Error::Connection: return "cannot connect";
    case httplib::Error::Read: return "connection closed or timed out while reading";
    case httplib::Error::Write: return "write failed";
    case httplib::Error::Canceled: return "cancelled";
    default: return httplib::to_string(e);
  }
}

// One request to an instance, on its own thread: the HTTP handler returns (and the stream
// starts) as soon as the status line and headers are in, while the body keeps arriving.
struct Upstream {
  std::mutex mu;
  std::condition_variable cv;
  bool headers_in = false, done = false;
  httplib::Error err = httplib::Error::Success;
  int status = 0;
  httplib::Headers headers;
  std::deque<std::string> chunks;
  size_t queued = 0;
  std::atomic<bool> cancelled{false};
  httplib::Client cli;
  std::thread th;

  Upstream(const std::string& host, int port, const RouterParams& p) : cli(host, port) {
    cli.set_connection_timeout(p.connect_timeout_ms / 1000, (p.connect_timeout_ms % 1000) * 1000);
    cli.set_read_timeout(p.upstream_read_timeout_s, 0);
    cli.set_write_timeout(30, 0);
    cli.set_keep_alive(false);  // one connection per request: closing it is how a request is cancelled
    cli.set_tcp_nodelay(true);
  }
  Upstream(const Upstream&) = delete;
  Upstream& operator=(const Upstream&) = delete;
  ~Upstream() {
    cancel();
    if (th.joinable()) th.join();
  }

  void start(httplib::Request req) {
    req.response_handler = [this](const httplib::Response& r) {
      std::lock_guard<std::mutex> lk(mu);
      status = r.status;
      headers = r.headers;
      headers_in = true;
      cv.notify_all();
      return !cancelled.load();
    };
    req.content_receiver = [this](const char* d, size_t n, uint64_t, uint64_t) {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return queued < kMaxQueuedBytes || cancelled.load(); });
      if (cancelled.load()) return false;
      chunks.emplace_back(d, n);
      queued += n;
      cv.notify_all();
      return true;
    };
    th = std::thread([this, req = std::move(req)] {
      httplib::Error e = httplib::Error::Canceled;
      if (!cancelled.load()) {
        auto r = cli.send(req);
        e = r ? httplib::Error::Success : r.error();
      }
      std::lock_guard<std::mutex> lk(mu);
      err = e;
      done = true;
      cv.notify_all();
    });
  }

  // Closes the connection: the instance sees the client gone and cancels the request.
  void cancel() {
    if (cancelled.exchange(true)) return;
    { std::lock_guard<std::mutex> lk(mu); }  // a waiter checks `cancelled` under mu: no lost wakeup
    cv.notify_all();
    cli.stop();
  }

  // True once the headers are in; false when the request failed before them.
  bool wait_headers() {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return headers_in || done; });
    return headers_in;
  }

  httplib::Error error() {
    std::lock_guard<std::mutex> lk(mu);
    return err;
  }

  std::string content_type() {
    std::lock_guard<std::mutex> lk(mu);
    auto it = headers.find("Content-Type");
    return it == headers.end() ? std::string() : it->second;
  }
};

bool is_event_stream(const std::string& ct) { return lower(ct).rfind("text/event-stream", 0) == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------

size_t RoundRobinPicker::pick_decode(const RouteRequest&, const std::vector<InstanceInfo>& c) {
  LARDER_ASSERT(!c.empty());
  return static_cast<size_t>(next_decode_.fetch_add(1) % c.size());
}

size_t RoundRobinPicker::pick_prefill(const RouteRequest&, const std::vector<InstanceInfo>& c) {
  LARDER_ASSERT(!c.empty());
  return static_cast<size_t>(next_prefill_.fetch_add(1) % c.size());
}

Result<std::vector<std::string>> parse_instance_list(const std::string& list) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= list.size() && !list.empty()) {
    size_t comma = list.find(',', pos);
    std::string item = list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    if (item.rfind("http://", 0) == 0) item = item.substr(7);
    while (!item.empty() && item.back() == '/') item.pop_back();
    std::string host;
    int port = 0;
    if (item.empty()) return make_error("'%s': an empty entry (want HOST:PORT,HOST:PORT)", list.c_str());
    if (!cluster::split_host_port(item, host, port))
      return make_error("'%s' is not HOST:PORT with a port 1..65535", item.c_str());
    out.push_back(item);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

struct Router::Impl {
  RouterParams p;
  std::unique_ptr<Picker> picker;
  std::shared_ptr<Hooks> hooks;
  std::vector<InstanceInfo> statics;
  std::unique_ptr<cluster::Directory> directory;
  std::unique_ptr<http::Server> http;
  int bound_port = -1;
  std::atomic<bool> draining{false}, stopping{false};

  mutable std::mutex mu;  // guards everything below
  std::set<std::shared_ptr<Upstream>> inflight;
  std::map<int, int64_t> requests_by_status;
  mutable std::set<std::string> warned_model;  // instance ids already reported as skipped
  std::atomic<int64_t> upstream_errors{0}, failovers{0};


  // The instances to route to now: static ones, then the registered ones of the same model.
  View view() const {
    std::vector<InstanceInfo> all = statics;
    if (directory) {
      std::vector<InstanceInfo> reg = directory->instances();
      const InstanceInfo* ref = nullptr;
      for (const auto& i : reg)
        if (i.can_decode()) {
          ref = &i;
          break;
        }
      for (const auto& i : reg) {
        // Only instances of one model can hand KV to each other.
        if (ref && i.model != ref->model) {
          std::lock_guard<std::mutex> lk(mu);
          if (warned_model.insert(i.id).second)
            std::fprintf(stderr,
                         "larder router: skipping instance %s (%s): its model fingerprint '%s' differs from '%s' of "
                         "decode instance %s\n",
                         i.id.c_str(), i.api_address.c_str(), i.model.c_str(), ref->model.c_str(), ref->id.c_str());
          continue;
        }
        all.push_back(i);
      }
    }
    View v;
    std::set<std::string> seen_p, seen_d;  // an address listed twice (static and registered) counts once
    for (auto& i : all) {
      if (i.can_prefill() && seen_p.insert(i.api_address).second) v.prefill.push_back(i);
      if (i.can_decode() && seen_d.insert(i.api_address).second) v.decode.push_back(i);
    }
    return v;
  }

  void track(const std::shared_ptr<Upstream>& up) {
    std::lock_guard<std::mutex> lk(mu);
    inflight.insert(up);
  }
  void untrack(const std::shared_ptr<Upstream>& up) {
    std::lock_guard<std::mutex> lk(mu);
    inflight.erase(up);
  }

  // The client's headers for the instance (Authorization included: instances check the key too).
  static httplib::Headers forward_headers(const http::Request& req) {
    httplib::Headers h;
    for (const auto& [k, v] : req.headers)
      if (!drop_request_header(k)) h.emplace(k, v);
    h.emplace("Accept-Encoding", "identity");  // the stream must not sit in a compressor
    return h;
  }

  static void copy_response_headers(const httplib::Headers& from, http::Response& res) {
    for (const auto& [k, v] : from)
      if (!drop_response_header(k)) res.set_header(k.c_str(), v);
  }

  struct Flight;
  void setup_routes();
  void handle_generate(const http::Request& req, http::Response& res);
  std::shared_ptr<Upstream> launch(const http::Request& req, const Attempt& a);
  bool start_attempt(const http::Request& req, Flight& f, std::vector<Attempt> attempts, std::string& errors);
  bool failover(const http::Request& req, Flight& f, const std::string& why);
  std::string filter_events(Flight& f, const std::string& chunk);
  void end_flight(Flight& f, bool ok, int status, const std::string& err);
  void relay(const http::Request& req, http::Response& res, const std::shared_ptr<Flight>& f);
  void handle_get_proxy(const http::Request& req, http::Response& res);
  std::string render_metrics();
  void cancel_all();
};

// A request's life across attempts (re-issues continue it), shared by the handler and the
// stream provider.
struct Router::Impl::Flight {
  std::shared_ptr<Hooks::Ticket> ticket;
  std::shared_ptr<Upstream> up;
  Attempt attempt;
  std::string buf;        // SSE bytes not yet split into events
  bool saw_done = false;  // "data: [DONE]" went out
  bool ended = false;     // on_end called
  int status = 0;
};

std::shared_ptr<Upstream> Router::Impl::launch(const http::Request& req, const Attempt& a) {
  std::string host;
  int port = 0;
  if (!cluster::split_host_port(a.decode, host, port)) return nullptr;
  httplib::Request ureq;
  ureq.method = "POST";
  ureq.path = req.target.empty() ? req.path : req.target;
  ureq.body = a.body.empty() ? req.body : a.body;
  ureq.headers = forward_headers(req);
  if (!ureq.has_header("Content-Type")) ureq.set_header("Content-Type", "application/json");
  // A "both" instance picked as its own prefill needs no handoff.
  if (!a.prefill.empty() && a.prefill != a.decode) ureq.set_header("X-Larder-Prefill", a.prefill);
  if (!a.fetch.empty()) ureq.set_header("X-Larder-Fetch", a.fetch);
  auto up = std::make_shared<Upstream>(host, port, p);
  track(up);
  if (stopping.load()) up->cancel();  // stop() may have swept the in-flight set just before track()
  up->start(std::move(ureq));
  return up;
}

void Router::Impl::end_flight(Flight& f, bool ok, int status, const std::string& err) {
  if (f.ended) return;
  f.ended = true;
  if (hooks && f.ticket) hooks->on_end(*f.ticket, ok, status, err);
}

// Starts attempts until one answers; the answering one is f.up. Returns false (with errors)
// when none did.
bool Router::Impl::start_attempt(const http::Request& req, Flight& f, std::vector<Attempt> attempts,
                                 std::string& errors) {
  for (auto& a : attempts) {
    auto up = launch(req, a);
    if (!up) {
      errors += (errors.empty() ? "" : "; ") + a.decode + ": not HOST:PORT";
      continue;
    }
    if (up->wait_headers()) {
      f.up = up;
      f.attempt = std::move(a);
      {
        std::lock_guard<std::mutex> lk(up->mu);
        f.status = up->status;
      }
      if (hooks && f.ticket) hooks->on_start(*f.ticket, f.attempt, f.status);
      return true;
    }
    untrack(up);
    if (stopping.load() || up->cancelled.load()) {
      errors = "shutting down";
      return false;
    }
    // Nothing was sent to the client yet: the next instance may take it.
    upstream_errors++;
    errors += (errors.empty() ? "" : "; ") + a.decode + ": " + describe(up->error());
  }
  return false;
}

void Router::Impl::handle_generate(const http::Request& req, http::Response& res) {
  if (draining.load()) {
    reply_error(res, 503, "The router is shutting down.", "unavailable_error", "shutting_down");
    return;
  }
  View v = view();
  if (v.decode.empty()) {
    reply_error(res, 503, "No decode instance is available.", "unavailable_error", "no_decode_instance");
    res.set_header("Retry-After", "1");
    return;
  }
  RouteRequest rr{req.path, req.body};
  auto f = std::make_shared<Flight>();
  std::vector<Attempt> attempts;
  if (hooks) {
    Hooks::Plan plan = hooks->plan(rr, v);
    f->ticket = plan.ticket;
    if (plan.reject) {
      reply_error(res, plan.status, plan.message, plan.status == 429 ? "rate_limit_exceeded" : "unavailable_error",
                  plan.code);
      if (plan.status == 429 || plan.status == 503)
        res.set_header("Retry-After", std::to_string(std::max(1, static_cast<int>(std::ceil(plan.retry_after_s)))));
      end_flight(*f, false, plan.status, plan.message);
      return;
    }
    attempts = std::move(plan.attempts);
  } else {
    std::string prefill_addr;
    if (!v.prefill.empty()) prefill_addr = v.prefill[picker->pick_prefill(rr, v.prefill) % v.prefill.size()].api_address;
    const size_t n = v.decode.size();
    const size_t first = picker->pick_decode(rr, v.decode) % n;
    for (size_t k = 0; k < n; ++k) attempts.push_back(Attempt{v.decode[(first + k) % n].api_address, prefill_addr, "", ""});
  }
  std::string errors;
  if (start_attempt(req, *f, std::move(attempts), errors)) {
    relay(req, res, f);
    return;
  }
  if (errors == "shutting down") {
    reply_error(res, 503, "The router is shutting down.", "unavailable_error", "shutting_down");
    end_flight(*f, false, 503, errors);
    return;
  }
  reply_error(res, 503, "No decode instance could be reached (" + errors + ").", "unavailable_error",
              "upstream_unavailable");
  res.set_header("Retry-After", "1");
  end_flight(*f, false, 503, errors);
}

// Re-issues a failed attempt through the hooks (failover). True: f.up is the new attempt.
bool Router::Impl::failover(const http::Request& req, Flight& f, const std::string& why) {
  if (!hooks || !f.ticket || stopping.load()) return false;
  for (int tries = 0; tries < 4; ++tries) {
    std::optional<Attempt> alt = hooks->reissue(*f.ticket, f.attempt, why);
    if (!alt) return false;
    std::string errors;
    auto old = f.up;
    if (start_attempt(req, f, {*alt}, errors)) {
      if (old) untrack(old);
      failovers++;
      return true;
    }
    f.attempt = *alt;  // it failed too: the next reissue excludes it
  }
  return false;
}

// Cuts SSE bytes into events; each data event goes through the hooks.
std::string Router::Impl::filter_events(Flight& f, const std::string& chunk) {
  f.buf += chunk;
  std::string out;
  size_t pos;
  while ((pos = f.buf.find("\n\n")) != std::string::npos) {
    std::string ev = f.buf.substr(0, pos);
    f.buf.erase(0, pos + 2);
    if (ev.rfind("data: ", 0) != 0) {
      out += ev + "\n\n";  // comments, other fields: as they are
      continue;
    }
    std::string data = ev.substr(6);
    if (data == "[DONE]") {
      f.saw_done = true;
      out += "data: [DONE]\n\n";
      continue;
    }
    std::string sent = hooks->on_event(*f.ticket, data);
    if (!sent.empty()) out += "data: " + sent + "\n\n";
  }
  return out;
}

void Router::Impl::relay(const http::Request& req, http::Response& res, const std::shared_ptr<Flight>& f) {
  std::shared_ptr<Upstream> up = f->up;
  std::string ct = up->content_type();
  {
    std::lock_guard<std::mutex> lk(up->mu);
    res.status = up->status;
    copy_response_headers(up->headers, res);
  }
  if (!is_event_stream(ct)) {
    // A JSON answer: complete it here (it is sent whole by the instance too). With hooks, a
    // failed one (cut, or 5xx) is re-issued: nothing has reached the client yet.
    for (;;) {
      up = f->up;
      std::string body;
      bool ok;
      {
        std::unique_lock<std::mutex> lk(up->mu);
        while (true) {
          up->cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return up->done || !up->chunks.empty(); });
          if (!up->done && up->chunks.empty() && req.client_gone()) {
            // The client hung up: closing the upstream connection cancels the instance's work.
            lk.unlock();
            up->cancel();
            lk.lock();
            continue;
          }
          for (auto& c : up->chunks) body += c;
          up->chunks.clear();
          up->queued = 0;
          up->cv.notify_all();
          if (up->done) break;
        }
        ok = up->err == httplib::Error::Success;
      }
      const bool retry = hooks && (!ok || f->status >= 500) && !req.client_gone();
      if (retry) {
        upstream_errors++;
        std::string why = !ok ? describe(up->error()) : "answered " + std::to_string(f->status);
        if (failover(req, *f, why)) {
          std::lock_guard<std::mutex> lk(f->up->mu);
          res.headers.clear();
          res.status = f->up->status;
          copy_response_headers(f->up->headers, res);
          ct = f->up->headers.count("Content-Type") ? f->up->headers.find("Content-Type")->second : ct;
          continue;
        }
      }
      untrack(up);
      if (!ok) {
        if (!retry) upstream_errors++;
        res.headers.clear();
        reply_error(res, 502, "Decode instance " + f->attempt.decode + " failed while answering (" +
                                  describe(up->error()) + ").", "server_error", "upstream_error");
        end_flight(*f, false, 502, describe(up->error()));
        return;
      }
      if (hooks && f->ticket && f->status == 200) body = hooks->on_json(*f->ticket, body);
      res.set_content(body, ct.empty() ? "application/json" : ct);
      end_flight(*f, f->status < 400, f->status, f->status < 400 ? "" : body.substr(0, 300));
      return;
    }
  }
  // Server-sent events: each piece goes out as it arrives. (The bare type, parameters
  // dropped: cpp-httplib leaves exactly "text/event-stream" uncompressed.)
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, f, &req](size_t, http::DataSink& sink) -> bool {
        std::shared_ptr<Upstream> up = f->up;
        std::deque<std::string> got;
        bool fin, ok;
        {
          std::unique_lock<std::mutex> lk(up->mu);
          up->cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return up->done || !up->chunks.empty(); });
          got.swap(up->chunks);
          up->queued = 0;
          fin = up->done;
          ok = up->err == httplib::Error::Success;
        }
        up->cv.notify_all();
        for (const auto& c : got) {
          const std::string out = hooks && f->ticket ? filter_events(*f, c) : c;
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            up->cancel();  // the client went away
            end_flight(*f, false, 499, "client disconnected");
            return false;
          }
        }
        // The client has the whole answer with [DONE] and may send its next turn at once: the
        // request ends now for the hooks (the conductor's counts), not when the instance closes.
        if (f->saw_done) end_flight(*f, true, 200, "");
        if (fin) {
          // With hooks, a stream is complete only with its [DONE] (an instance killed between
          // events may close the connection cleanly).
          if (ok && (!hooks || !f->ticket || f->saw_done)) {
            end_flight(*f, true, 200, "");
            sink.done();
            return true;
          }
          upstream_errors++;
          const std::string why = ok ? "the stream ended without [DONE]" : describe(up->error());
          if (!f->saw_done && failover(req, *f, why)) {
            f->buf.clear();
            if (f->status == 200 && is_event_stream(f->up->content_type())) return true;
            f->up->cancel();
          }
          // Cut the client's connection too: an incomplete stream must not look finished.
          end_flight(*f, false, 502, why);
          return false;
        }
        if (got.empty() && !sink.is_writable()) {
          up->cancel();
          end_flight(*f, false, 499, "client disconnected");
          return false;
        }
        return true;
      },
      [this, f](bool) {
        if (f->up) {
          f->up->cancel();  // a no-op when the answer is complete
          untrack(f->up);
        }
        end_flight(*f, false, 499, "client disconnected");
      });
}

void Router::Impl::handle_get_proxy(const http::Request& req, http::Response& res) {
  View v = view();
  std::string errors;
  for (const auto& d : v.decode) {
    std::string host;
    int port = 0;
    if (!cluster::split_host_port(d.api_address, host, port)) continue;
    httplib::Client cli(host, port);
    cli.set_connection_timeout(p.connect_timeout_ms / 1000, (p.connect_timeout_ms % 1000) * 1000);
    cli.set_read_timeout(10, 0);
    cli.set_keep_alive(false);
    auto r = cli.Get((req.target.empty() ? req.path : req.target).c_str(), forward_headers(req));
    if (!r) {
      upstream_errors++;
      errors += (errors.empty() ? "" : "; ") + d.api_address + ": " + describe(r.error());
      continue;
    }
    res.status = r->status;
    copy_response_headers(r->headers, res);
    std::string ct = r->get_header_value("Content-Type");
    res.set_content(r->body, ct.empty() ? "application/json" : ct);
    return;
  }
  if (v.decode.empty())
    reply_error(res, 503, "No decode instance is available.", "unavailable_error", "no_decode_instance");
  else
    reply_error(res, 503, "No decode instance could be reached (" + errors + ").", "unavailable_error",
                "upstream_unavailable");
}

std::string Router::Impl::render_metrics() {
  View v = view();
  std::string out;
  char buf[256];
  out += "# HELP larder_router_requests_total HTTP requests answered by the router, by status code.\n";
  out += "# TYPE larder_router_requests_total counter\n";
  size_t n_inflight;
  {
    std::lock_guard<std::mutex> lk(mu);
    for (const auto& [status, n] : requests_by_status) {
      std::snprintf(buf, sizeof buf, "larder_router_requests_total{status=\"%d\"} %lld\n", status,
                    static_cast<long long>(n));
      out += buf;
    }
    n_inflight = inflight.size();
  }
  out += "# HELP larder_router_upstream_errors_total Instances that could not be reached or failed mid-answer.\n";
  out += "# TYPE larder_router_upstream_errors_total counter\n";
  out += "larder_router_upstream_errors_total " + std::to_string(upstream_errors.load()) + "\n";
  out += "# HELP larder_router_instances Instances the router routes to, by role (role both counts in each).\n";
  out += "# TYPE larder_router_instances gauge\n";
  out += "larder_router_instances{role=\"prefill\"} " + std::to_string(v.prefill.size()) + "\n";
  out += "larder_router_instances{role=\"decode\"} " + std::to_string(v.decode.size()) + "\n";
  out += "# HELP larder_router_etcd_up 1 when the last read of the cluster from etcd succeeded "
         "(0 without --cluster).\n";
  out += "# TYPE larder_router_etcd_up gauge\n";
  out += std::string("larder_router_etcd_up ") + (directory && directory->etcd_ok() ? "1" : "0") + "\n";
  out += "# HELP larder_router_requests_in_flight Generation requests being relayed.\n";
  out += "# TYPE larder_router_requests_in_flight gauge\n";
  out += "larder_router_requests_in_flight " + std::to_string(n_inflight) + "\n";
  out += "# HELP larder_router_failovers_total Requests re-issued to another instance after theirs failed mid-answer.\n";
  out += "# TYPE larder_router_failovers_total counter\n";
  out += "larder_router_failovers_total " + std::to_string(failovers.load()) + "\n";
  if (hooks) hooks->render_metrics(out);
  return out;
}

void Router::Impl::cancel_all() {
  std::vector<std::shared_ptr<Upstream>> ups;
  {
    std::lock_guard<std::mutex> lk(mu);
    ups.assign(inflight.begin(), inflight.end());
  }
  for (auto& u : ups) u->cancel();
}

void Router::Impl::setup_routes() {
  http::ServerOptions o = p.http_opts;
  o.host = p.host;
  o.port = p.port;
  o.max_body_bytes = p.max_body_bytes;
  o.worker_threads = std::clamp(p.http_threads, 8, 4096);
  http = std::make_unique<http::Server>(o);

  http->set_pre_routing([this](const http::Request& req, http::Response& res) {
    if (p.api_key.empty()) return false;
    const std::string& path = req.path;
    bool protected_path = path.rfind("/v1/", 0) == 0 || path == "/completions" || path == "/chat/completions" ||
                          path == "/models" || path.rfind("/internal/", 0) == 0;
    if (!protected_path || req.get_header_value("Authorization") == "Bearer " + p.api_key) return false;
    reply_error(res, 401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key");
    return true;
  });

  http->set_error_handler([](const http::Request& req, http::Response& res) {
    const std::string why = res.reason;
    switch (res.status) {
      case 404:
        reply_error(res, 404, "Invalid URL (" + req.method + " " + req.path + ")", "invalid_request_error",
                    "unknown_url");
        break;
      case 413:
        reply_error(res, 413, why.empty() ? "The request body is too large." : why, "invalid_request_error",
                    "request_too_large");
        break;
      case 431:
        reply_error(res, 431, why.empty() ? "The request header is too large." : why, "invalid_request_error",
                    "header_too_large");
        break;
      case 400:
        reply_error(res, 400, why.empty() ? "Malformed HTTP request." : why, "invalid_request_error", "");
        break;
      case 429:
        reply_error(res, 429, why, "rate_limit_error", "too_many_connections");
        break;
      case 503:
        reply_error(res, 503, why, "unavailable_error", "too_many_connections");
        break;
      default:
        reply_error(res, res.status, why.empty() ? "HTTP error " + std::to_string(res.status) + "." : why,
                    res.status >= 500 ? "server_error" : "invalid_request_error",
                    res.status >= 500 ? "internal_error" : "");
    }
  });

  http->set_logger([this](const http::Request&, const http::Response& res) {
    std::lock_guard<std::mutex> lk(mu);
    requests_by_status[res.status]++;
  });

  http->set_method_not_allowed([](const http::Request& req, http::Response& res, const std::string& allow) {
    reply_error(res, 405, "Method " + req.method + " is not allowed for " + req.path + ".", "invalid_request_error",
                "method_not_allowed");
    res.set_header("Allow", allow);
  });
  auto get_only = [&](const std::string& path, http::Handler h) { http->route("GET", path, std::move(h)); };
  auto post_only = [&](const std::string& path, http::Handler h) { http->route("POST", path, std::move(h)); };

  // Answered on the I/O thread: never behind busy workers.
  http->route("GET", "/health", [this](const http::Request&, http::Response& res) {
    View v = view();
    const bool ok = !draining.load() && !v.decode.empty();
    json j = json::object();
    j["status"] = draining.load() ? "draining" : v.decode.empty() ? "no_decode_instance" : "ok";
    j["prefill"] = v.prefill.size();
    j["decode"] = v.decode.size();
    j["etcd"] = !directory ? "off" : directory->etcd_ok() ? "up" : "down";
    if (hooks) hooks->health(j);
    reply_json(res, ok ? 200 : 503, j);
  }, /*inline_io=*/true);
  get_only("/metrics", [this](const http::Request&, http::Response& res) {
    res.status = 200;
    std::string text = render_metrics();
    http->render_metrics(text);
    res.set_content(text, "text/plain; version=0.0.4");
  });
  for (const char* path : {"/v1/models", "/models", R"(/v1/models/(.+))"})
    get_only(path, [this](const http::Request& req, http::Response& res) { handle_get_proxy(req, res); });
  post_only(R"(/internal/conductor/([a-z_]+))", [this](const http::Request& req, http::Response& res) {
    int status = 404;
    std::string out;
    if (!hooks || !hooks->internal(req.matches[1], req.body, status, out)) {
      reply_error(res, 404, "Invalid URL (" + req.method + " " + req.path + ")", "invalid_request_error", "unknown_url");
      return;
    }
    res.status = status;
    res.set_content(out, "application/json");
  });
  for (const char* path : {"/v1/completions", "/v1/chat/completions", "/completions", "/chat/completions"})
    post_only(path, [this](const http::Request& req, http::Response& res) { handle_generate(req, res); });
}

// ---------------------------------------------------------------------------------------------

Router::Router(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<Router>> Router::start(RouterParams p, std::unique_ptr<Picker> picker,
                                              std::shared_ptr<Hooks> hooks) {
  if (p.port < 0 || p.port > 65535) return make_error("port %d is not 0..65535", p.port);
  auto impl = std::make_unique<Impl>();
  Impl& I = *impl;
  I.p = std::move(p);
  I.picker = picker ? std::move(picker) : std::make_unique<RoundRobinPicker>();
  I.hooks = std::move(hooks);
  for (const auto& [list, role] : {std::pair{&I.p.prefill, "prefill"}, std::pair{&I.p.decode, "decode"}})
    for (const auto& addr : *list) {
      std::string host;
      int port = 0;
      if (!cluster::split_host_port(addr, host, port))
        return make_error("%s instance '%s' is not HOST:PORT", role, addr.c_str());
      InstanceInfo i;
      i.id = std::string("static-") + role + "-" + addr;
      i.role = role;
      i.api_address = addr;
      I.statics.push_back(std::move(i));
    }
  if (!I.p.etcd_endpoints.empty()) {
    auto d = cluster::Directory::start(I.p.etcd_endpoints, I.p.cluster_name, I.p.poll_s);
    if (!d.ok()) return d.take_error();
    I.directory = std::move(d.value());
  }
  I.setup_routes();
  if (Status st = I.http->listen(); !st.ok()) return st.take_error();
  I.bound_port = I.http->port();
  return std::unique_ptr<Router>(new Router(std::move(impl)));
}

Router::~Router() { stop(); }

int Router::port() const { return impl_->bound_port; }

View Router::view() const { return impl_->view(); }

cluster::Directory* Router::directory() const { return impl_->directory.get(); }

void Router::begin_drain() { impl_->draining = true; }

int Router::active() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return static_cast<int>(impl_->inflight.size());
}

void Router::cancel_all() { impl_->cancel_all(); }

void Router::stop() {
  Impl& I = *impl_;
  I.stopping = true;
  I.draining = true;
  I.cancel_all();
  if (I.http) I.http->stop();
  I.directory.reset();
}

}  // namespace larder::router
