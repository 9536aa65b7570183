// The event-driven HTTP/1.1 server (see http.h). One io_context run by a few threads; each
// connection's operations run on its own strand. Handlers run on a worker pool; a chunked
// response's provider writes through a sink that hands each chunk to the connection's strand
// and waits for it to be written.
#include <sys/socket.h>

#include <utility>  // before Boost 1.74's asio (awaitable.hpp uses std::exchange unincluded under C++20)

#include <array>
#include <atomic>
#include <cstdio>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <regex>
#include <thread>
#include <unordered_map>

#include "core/prom.h"
#include "http/http.h"

namespace larder::http {

bool fill_request(boost::beast::http::request<boost::beast::http::string_body>&& m, Request& r);  // message.cpp

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

// A fixed set of threads over a FIFO of tasks; shutdown() runs what is queued, then joins.
class WorkQueue {
 public:
  void start(int n) {
    for (int i = 0; i < n; i++) threads_.emplace_back([this] { loop(); });
  }
  void post(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      q_.push_back(std::move(f));
    }
    cv_.notify_one();
  }
  void shutdown() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        f = std::move(q_.front());
        q_.pop_front();
      }
      f();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
};

struct Route {
  std::string method;
  std::string exact;
  std::optional<std::regex> re;
  Handler h;
  bool inline_io = false;
};

bool is_regex(const std::string& p) { return p.find_first_of("([.*+?\\") != std::string::npos; }

int seconds_of(std::chrono::milliseconds ms) { return static_cast<int>(std::max<int64_t>(1, ms.count() / 1000)); }

}  // namespace

struct ConnWatch {
  std::mutex mu;
  bool gone = false;
  std::vector<std::function<void()>> callbacks;
};

bool Request::client_gone() const {
  if (!watch) return false;
  std::lock_guard<std::mutex> lk(watch->mu);
  return watch->gone;
}

void Request::on_disconnect(std::function<void()> f) const {
  if (!watch || !f) return;
  {
    std::lock_guard<std::mutex> lk(watch->mu);
    if (!watch->gone) {
      watch->callbacks.push_back(std::move(f));
      return;
    }
  }
  f();
}

struct Conn;

struct Server::Impl {
  ServerOptions o;
  asio::io_context ioc;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
  tcp::acceptor acceptor{ioc};
  asio::steady_timer accept_retry{ioc};
  std::vector<std::thread> io;
  WorkQueue workers, notifier;
  std::vector<Route> routes;
  std::function<bool(const Request&, Response&)> pre;
  std::function<void(const Request&, Response&, const std::string&)> not_allowed;
  Handler error_handler;
  std::function<void(const Request&, const Response&)> logger;
  int bound_port = -1;
  int max_conns = 0;
  std::atomic<bool> stopping{false};
  bool started = false;

  std::mutex conn_mu;
  std::unordered_map<std::string, int> per_client;
  std::unordered_map<Conn*, std::weak_ptr<Conn>> live;

  std::atomic<int64_t> n_conns{0}, n_accepted{0}, n_refused{0}, n_timeouts{0}, n_disconnects{0}, n_requests{0};

  explicit Impl(ServerOptions opt) : o(std::move(opt)), ioc(std::max(1, o.io_threads)) {}

  void do_accept();
  void on_accept(tcp::socket sock);
  // Routing, handler, errors: fills res. Runs on a worker (or the I/O thread for inline routes).
  void handle(Request& req, Response& res, const Route* r);
  const Route* find(Request& req, Response& res);
  void fill_error(const Request& req, Response& res) {
    if (res.status < 400 || !res.body.empty() || res.provider) return;
    if (error_handler) {
      try {
        error_handler(req, res);
      } catch (...) {
      }
    }
    if (res.body.empty()) {
      std::string msg = res.reason.empty() ? "HTTP error " + std::to_string(res.status) : res.reason;
      std::string esc;
      for (char c : msg) esc += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
      res.set_content("{\"error\":{\"message\":\"" + esc + "\",\"type\":\"invalid_request_error\"}}",
                      "application/json");
    }
  }
  void log(const Request& req, const Response& res) {
    if (!logger) return;
    try {
      logger(req, res);
    } catch (...) {
    }
  }
};

namespace {

// One write handed to the strand by a worker; the worker waits for its result.
struct WriteWait {
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false, ok = false;
  void set(bool v) {
    std::lock_guard<std::mutex> lk(mu);
    finished = true;
    ok = v;
    cv.notify_all();
  }
  bool wait() {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return finished; });
    return ok;
  }
};

}  // namespace

struct Conn : std::enable_shared_from_this<Conn> {
  Server::Impl& s;
  beast::tcp_stream stream;
  beast::flat_buffer buf;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser;
  std::string ip;
  int rport = 0;
  bool counted = false;  // in per_client / n_conns
  int n_req = 0;
  bool keep_alive = true;
  bool closed = false;  // strand
  std::atomic<bool> dead{false};  // closed, failed or the client gone: writes fail at once
  std::shared_ptr<ConnWatch> watch;  // the current request's
  bool watching = false;
  std::array<char, 256> drain_buf{};

  Conn(Server::Impl& srv, tcp::socket sock) : s(srv), stream(std::move(sock)) {}

  ~Conn() {
    std::lock_guard<std::mutex> lk(s.conn_mu);
    s.live.erase(this);
    if (counted) {
      s.n_conns--;
      auto it = s.per_client.find(ip);
      if (it != s.per_client.end() && --it->second <= 0) s.per_client.erase(it);
    }
  }

  void close() {
    if (closed) return;
    closed = true;
    dead = true;
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream.socket().close(ec);
  }

  // After a response that ends the connection: stop sending, let the client read what was
  // sent (an immediate close with unread request bytes would reset it), then close.
  void close_gracefully() {
    if (closed) return;
    dead = true;
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream.expires_after(std::chrono::seconds(2));
    drain();
  }
  void drain() {
    stream.async_read_some(asio::buffer(drain_buf), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->close();
      self->drain();
    });
  }

  // --- reading a request ---
  void wait_request() {
    if (s.stopping) return close();
    if (buf.size() > 0) return read_header();
    if (buf.capacity() > 8192) buf = beast::flat_buffer();  // do not keep a large body's buffer while idle
    stream.expires_after(s.o.idle_timeout);
    stream.async_read_some(buf.prepare(512), [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec) return self->close();  // idle past the keep-alive timeout, or closed by the client
      self->buf.commit(n);
      self->read_header();
    });
  }

  void read_header() {
    parser.emplace();
    parser->header_limit(static_cast<std::uint32_t>(std::min<size_t>(s.o.max_header_bytes, UINT32_MAX)));
    parser->body_limit(s.o.max_body_bytes);
    stream.expires_after(s.o.header_timeout);
    bhttp::async_read_header(stream, buf, *parser, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->on_header(ec);
    });
  }

  void on_read_error(beast::error_code ec) {
    if (ec == beast::error::timeout) {
      s.n_timeouts++;  // the stream closed the socket: nothing can be answered
      return close();
    }
    if (ec == bhttp::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset ||
        ec == asio::error::operation_aborted || closed)
      return close();
    int status = 400;
    std::string why = "Malformed HTTP request.";
    if (ec == bhttp::error::header_limit) {
      status = 431;
      why = "The request header is too large (limit " + std::to_string(s.o.max_header_bytes) + " bytes).";
    } else if (ec == bhttp::error::body_limit) {
      status = 413;
      why = "The request body is too large (limit " + std::to_string(s.o.max_body_bytes) + " bytes).";
    }
    reply_and_close(status, why);
  }

  void on_header(beast::error_code ec) {
    if (ec) return on_read_error(ec);
    auto& m = parser->get();
    if (!parser->is_done()) {
      auto expect = m[bhttp::field::expect];
      if (beast::iequals(expect, "100-continue")) {
        auto msg = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
        stream.expires_after(s.o.write_timeout);
        asio::async_write(stream, asio::buffer(*msg), [self = shared_from_this(), msg](beast::error_code e, size_t) {
          if (e) return self->close();
          self->read_body();
        });
        return;
      }
      return read_body();
    }
    dispatch();
  }

  void read_body() {
    stream.expires_after(s.o.body_timeout);
    bhttp::async_read(stream, buf, *parser, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->on_read_error(ec);
      self->dispatch();
    });
  }

  // --- handling ---
  void dispatch() {
    stream.expires_never();
    n_req++;
    s.n_requests++;
    auto req = std::make_shared<Request>();
    auto res = std::make_shared<Response>();
    const bool client_keep_alive = parser->get().keep_alive();
    if (!fill_request(parser->release(), *req)) {
      parser.reset();
      return reply_and_close(400, "Malformed request target.");
    }
    parser.reset();
    req->remote_addr = ip;
    req->remote_port = rport;
    keep_alive = client_keep_alive && n_req < s.o.keep_alive_max_requests && !s.stopping;
    watch = std::make_shared<ConnWatch>();
    req->watch = watch;
    const Route* r = s.find(*req, *res);
    if (r && r->inline_io) {
      s.handle(*req, *res, r);
      return respond(req, res);
    }
    start_watch();
    s.workers.post([self = shared_from_this(), req, res, r] {
      self->s.handle(*req, *res, r);
      asio::post(self->stream.get_executor(), [self, req, res] { self->respond(req, res); });
    });
  }

  // While a handler runs the connection has nothing to read: a readable socket then means the
  // client closed it (EOF) or sent its next request early (pipelining: left for later).
  void start_watch() {
    if (buf.size() > 0 || closed) return;
    watching = true;
    stream.socket().async_wait(tcp::socket::wait_read, [self = shared_from_this(), w = watch](beast::error_code ec) {
      if (w != self->watch) return;  // an earlier request's watch
      self->watching = false;
      if (ec || self->closed) return;  // cancelled: the response is complete
      char c;
      const ssize_t r = ::recv(self->stream.socket().native_handle(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
      if (r > 0) return;
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return self->start_watch();
      self->client_gone();
    });
  }

  void client_gone(bool count = true) {
    if (closed) return;
    dead = true;
    if (count && watch) s.n_disconnects++;
    keep_alive = false;
    std::vector<std::function<void()>> cbs;
    if (watch) {
      std::lock_guard<std::mutex> lk(watch->mu);
      watch->gone = true;
      cbs.swap(watch->callbacks);
    }
    for (auto& f : cbs) s.notifier.post(std::move(f));
    close();  // a pending write fails at once; the fd is freed now
  }

  void end_request() {
    if (watching) {
      watching = false;
      beast::error_code ec;
      stream.socket().cancel(ec);  // only the watch is pending here
    }
    watch.reset();
    if (!keep_alive || dead) return close_gracefully();
    wait_request();
  }

  void respond(std::shared_ptr<Request> req, std::shared_ptr<Response> res) {
    const bool head = req->method == "HEAD";
    if (dead) {
      const int st = res->status;
      res->status = 499;  // as nginx logs it: the client closed the connection first
      s.log(*req, *res);
      res->status = st;
      if (res->provider) {
        // The releaser runs once whatever happened (it ends the stream's sequence).
        if (res->releaser) s.workers.post([res] { res->releaser(false); });
      }
      return close();
    }
    if (res->provider && !head) return respond_chunked(std::move(req), std::move(res));
    auto out = std::make_shared<std::string>(serialize_head(*res, head, keep_alive, seconds_of(s.o.idle_timeout), false));
    if (!head) *out += res->body;
    if (res->provider && res->releaser) s.workers.post([res] { res->releaser(false); });
    stream.expires_after(s.o.write_timeout);
    asio::async_write(stream, asio::buffer(*out),
                      [self = shared_from_this(), out, req, res](beast::error_code ec, size_t) {
                        self->stream.expires_never();
                        if (ec) {
                          if (ec == beast::error::timeout) self->s.n_timeouts++;
                          res->status = 499;
                          self->s.log(*req, *res);
                          return self->close();
                        }
                        self->s.log(*req, *res);
                        self->end_request();
                      });
  }

  // Hands bytes to the strand and waits until they are written (false: they were not).
  bool write_blocking(std::string bytes) {
    if (dead) return false;
    auto w = std::make_shared<WriteWait>();
    auto data = std::make_shared<std::string>(std::move(bytes));
    asio::post(stream.get_executor(), [self = shared_from_this(), w, data] {
      if (self->dead) return w->set(false);
      self->stream.expires_after(self->s.o.write_timeout);
      asio::async_write(self->stream, asio::buffer(*data), [self, w, data](beast::error_code ec, size_t) {
        self->stream.expires_never();
        if (ec) {
          if (ec == beast::error::timeout) self->s.n_timeouts++;
          self->dead = true;
        }
        w->set(!ec);
      });
    });
    return w->wait();
  }

  class Sink : public DataSink {
   public:
    explicit Sink(Conn& c) : c_(c) {}
    bool write(const char* data, size_t n) override {
      if (failed_ || done_) return false;
      if (n == 0) return true;  // an empty chunk would end the response
      char len[24];
      std::snprintf(len, sizeof len, "%zx\r\n", n);
      std::string frame = len;
      frame.append(data, n);
      frame += "\r\n";
      if (!c_.write_blocking(std::move(frame))) failed_ = true;
      offset += n;
      return !failed_;
    }
    void done() override {
      if (done_ || failed_) return;
      done_ = true;
      if (!c_.write_blocking("0\r\n\r\n")) failed_ = true;
    }
    bool is_writable() const override { return !failed_ && !c_.dead; }
    size_t offset = 0;
    bool failed_ = false, done_ = false;

   private:
    Conn& c_;
  };

  void respond_chunked(std::shared_ptr<Request> req, std::shared_ptr<Response> res) {
    auto head = std::make_shared<std::string>(serialize_head(*res, false, keep_alive, seconds_of(s.o.idle_timeout), true));
    stream.expires_after(s.o.write_timeout);
    asio::async_write(stream, asio::buffer(*head), [self = shared_from_this(), head, req, res](beast::error_code ec, size_t) {
      self->stream.expires_never();
      if (ec) self->dead = true;
      self->s.workers.post([self, req, res] {
        Sink sink(*self);
        bool ok = !self->dead;
        while (ok && !sink.done_ && !sink.failed_) {
          try {
            ok = res->provider(sink.offset, sink);
          } catch (...) {
            ok = false;
          }
        }
        const bool success = ok && sink.done_ && !sink.failed_;
        if (res->releaser) res->releaser(success);
        asio::post(self->stream.get_executor(), [self, req, res, success] {
          if (!success) {
            if (self->dead) res->status = 499;
            self->s.log(*req, *res);
            return self->close();
          }
          self->s.log(*req, *res);
          self->end_request();
        });
      });
    });
  }

  // The server's own error answer, before or instead of a handler.
  void reply_and_close(int status, const std::string& why) {
    Request req;
    req.remote_addr = ip;
    Response res;
    res.status = status;
    res.reason = why;
    s.fill_error(req, res);
    keep_alive = false;
    auto out = std::make_shared<std::string>(serialize_head(res, false, false, 0, false) + res.body);
    stream.expires_after(s.o.write_timeout);
    asio::async_write(stream, asio::buffer(*out), [self = shared_from_this(), out](beast::error_code ec, size_t) {
      if (ec) return self->close();
      self->close_gracefully();
    });
  }
};

const Route* Server::Impl::find(Request& req, Response& res) {
  const std::string method = req.method == "HEAD" ? "GET" : req.method;
  std::string allow;
  for (const Route& r : routes) {
    std::smatch m;
    bool hit;
    if (r.re) {
      hit = std::regex_match(req.path, m, *r.re);
    } else {
      hit = r.exact == req.path;
    }
    if (!hit) continue;
    if (r.method == method) {
      req.matches.clear();
      if (r.re)
        for (const auto& g : m) req.matches.push_back(g.str());
      else
        req.matches.push_back(req.path);
      return &r;
    }
    if (allow.find(r.method) == std::string::npos) allow += (allow.empty() ? "" : ", ") + r.method;
  }
  res.status = allow.empty() ? 404 : 405;
  if (!allow.empty()) res.set_header("Allow", allow);
  return nullptr;
}

void Server::Impl::handle(Request& req, Response& res, const Route* r) {
  try {
    if (pre && pre(req, res)) {
      fill_error(req, res);
      return;
    }
    if (!r) {
      if (res.status == 405 && not_allowed) not_allowed(req, res, res.get_header_value("Allow"));
      fill_error(req, res);
      return;
    }
    res.status = -1;
    r->h(req, res);
    if (res.status == -1) res.status = 200;
  } catch (const std::exception& e) {
    res = Response();
    res.status = 500;
    res.reason = e.what();
  } catch (...) {
    res = Response();
    res.status = 500;
    res.reason = "internal error";
  }
  fill_error(req, res);
}

void Server::Impl::do_accept() {
  acceptor.async_accept(asio::make_strand(ioc), [this](beast::error_code ec, tcp::socket sock) {
    if (stopping || !acceptor.is_open()) return;
    if (ec) {
      // Out of file descriptors (or memory): retry shortly instead of spinning.
      accept_retry.expires_after(std::chrono::milliseconds(50));
      accept_retry.async_wait([this](beast::error_code) {
        if (!stopping) do_accept();
      });
      return;
    }
    on_accept(std::move(sock));
    // Take what else is already queued without a round trip through the event loop: a burst of
    // thousands of connections must not overflow the listen backlog (dropped SYNs cost 1 s each).
    for (int i = 0; i < 256; i++) {
      beast::error_code e2;
      tcp::socket more = acceptor.accept(asio::make_strand(ioc), e2);
      if (e2) break;  // would_block: the queue is empty
      on_accept(std::move(more));
    }
    do_accept();
  });
}

void Server::Impl::on_accept(tcp::socket sock) {
  beast::error_code ec;
  auto rep = sock.remote_endpoint(ec);
  if (ec) return;
  if (o.tcp_nodelay) sock.set_option(tcp::no_delay(true), ec);
  auto c = std::make_shared<Conn>(*this, std::move(sock));
  c->ip = rep.address().to_string();
  c->rport = rep.port();
  n_accepted++;
  int refuse = 0;
  std::string why;
  {
    std::lock_guard<std::mutex> lk(conn_mu);
    live[c.get()] = c;
    if (max_conns > 0 && n_conns.load() >= max_conns) {
      refuse = 503;
      why = "The server has too many open connections (limit " + std::to_string(max_conns) + "); retry shortly.";
    } else if (o.max_connections_per_client > 0 && per_client[c->ip] >= o.max_connections_per_client) {
      refuse = 429;
      why = "Too many connections from " + c->ip + " (limit " + std::to_string(o.max_connections_per_client) + ").";
    } else {
      per_client[c->ip]++;
      n_conns++;
      c->counted = true;
    }
    if (!c->counted && per_client.count(c->ip) && per_client[c->ip] == 0) per_client.erase(c->ip);
  }
  if (refuse) {
    n_refused++;
    asio::post(c->stream.get_executor(), [c, refuse, why] { c->reply_and_close(refuse, why); });
    return;
  }
  asio::post(c->stream.get_executor(), [c] { c->wait_request(); });
}

Server::Server(ServerOptions o) : impl_(std::make_unique<Impl>(std::move(o))) {}

Server::~Server() { stop(); }

void Server::route(const std::string& method, const std::string& pattern, Handler h, bool inline_io) {
  Route r;
  r.method = method;
  if (is_regex(pattern))
    r.re.emplace(pattern);
  else
    r.exact = pattern;
  r.h = std::move(h);
  r.inline_io = inline_io;
  impl_->routes.push_back(std::move(r));
}

void Server::set_pre_routing(std::function<bool(const Request&, Response&)> f) { impl_->pre = std::move(f); }
void Server::set_method_not_allowed(std::function<void(const Request&, Response&, const std::string&)> f) {
  impl_->not_allowed = std::move(f);
}
void Server::set_error_handler(Handler f) { impl_->error_handler = std::move(f); }
void Server::set_logger(std::function<void(const Request&, const Response&)> f) { impl_->logger = std::move(f); }

Status Server::listen() {
  Impl& I = *impl_;
  if (I.started) return make_error("the server is already listening");
  const std::string where = I.o.host + ":" + std::to_string(I.o.port);
  beast::error_code ec;
  tcp::resolver resolver(I.ioc);
  auto results = resolver.resolve(I.o.host, std::to_string(I.o.port), tcp::resolver::passive, ec);
  if (ec || results.empty()) return make_error("cannot resolve %s: %s", I.o.host.c_str(), ec.message().c_str());
  tcp::endpoint ep = results.begin()->endpoint();
  I.acceptor.open(ep.protocol(), ec);
  if (!ec) I.acceptor.set_option(asio::socket_base::reuse_address(true), ec);  // not SO_REUSEPORT: a taken port fails
  if (!ec) I.acceptor.bind(ep, ec);
  if (!ec) I.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    beast::error_code ig;
    I.acceptor.close(ig);
    return make_error("cannot listen on %s (%s)", where.c_str(), ec.message().c_str());
  }
  I.acceptor.non_blocking(true, ec);  // for the synchronous accepts that drain a burst (do_accept)
  I.bound_port = I.acceptor.local_endpoint().port();
  const long files = raise_open_files_limit();
  // Leave descriptors for everything else the process opens (model, KV files, peers).
  I.max_conns = I.o.max_connections > 0 ? I.o.max_connections
                                        : static_cast<int>(std::max<long>(64, files - std::max<long>(256, files / 8)));
  I.guard.emplace(I.ioc.get_executor());
  I.workers.start(std::max(1, I.o.worker_threads));
  I.notifier.start(1);
  I.do_accept();
  for (int i = 0; i < std::max(1, I.o.io_threads); i++) I.io.emplace_back([&I] { I.ioc.run(); });
  I.started = true;
  return Status::Ok();
}

int Server::port() const { return impl_->bound_port; }

void Server::stop() {
  Impl& I = *impl_;
  if (!I.started || I.stopping.exchange(true)) return;
  asio::post(I.ioc, [&I] {
    beast::error_code ec;
    I.acceptor.close(ec);
    I.accept_retry.cancel();
  });
  std::vector<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard<std::mutex> lk(I.conn_mu);
    for (auto& [p, w] : I.live)
      if (auto c = w.lock()) conns.push_back(std::move(c));
  }
  // Pending reads and writes fail; watched requests see their client gone (their sequences end).
  for (auto& c : conns) asio::post(c->stream.get_executor(), [c] { c->client_gone(false); });
  conns.clear();
  I.workers.shutdown();
  I.notifier.shutdown();
  // Let the I/O threads run the connections' handlers (each fails at once now), so no
  // connection outlives stop() in the io_context's queue (bounded: 2 s).
  for (int i = 0; i < 400 && I.n_conns.load() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  I.guard.reset();
  I.ioc.stop();
  for (auto& t : I.io)
    if (t.joinable()) t.join();
  I.io.clear();
}

Server::Stats Server::stats() const {
  const Impl& I = *impl_;
  Stats s;
  s.connections = I.n_conns.load();
  s.accepted = I.n_accepted.load();
  s.refused = I.n_refused.load();
  s.timeouts = I.n_timeouts.load();
  s.disconnects = I.n_disconnects.load();
  s.requests = I.n_requests.load();
  return s;
}

void Server::render_metrics(std::string& out, const std::string& prefix) const {
  const Stats s = stats();
  auto line = [&](const char* name, const char* type, const char* help, int64_t v) {
    const std::string n = prefix + name;
    prom::scalar(out, n.c_str(), type, help, static_cast<double>(v));
  };
  line("_connections", "gauge", "Open client connections.", s.connections);
  line("_connections_accepted_total", "counter", "Connections accepted.", s.accepted);
  line("_connections_refused_total", "counter", "Connections refused over a connection limit (429 or 503).",
       s.refused);
  line("_timeouts_total", "counter", "Connections closed by a deadline (idle, header, body or write).", s.timeouts);
  line("_client_disconnects_total", "counter", "Clients that closed their connection while their request was handled.",
       s.disconnects);
  line("_requests_total", "counter", "Requests read.", s.requests);
}

}  // namespace larder::http
