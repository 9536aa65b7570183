// larder_http: the HTTP/1.1 server under every front end of the project (`larder serve`, the
// router/conductor, the P/D instances' internal endpoints).
//
// Event-driven (Boost.Asio + Boost.Beast's parser): a connection that is idle, or sends its
// request slowly, costs a socket and a few hundred bytes, never a thread. Only a complete
// request reaches a handler, which runs on a worker pool (handlers may block: a generation
// waits for its tokens). Deadlines: the first byte of a request (keep-alive idle), the rest
// of its header, its body, each write; limits on connections in all and per client address,
// on requests per connection, on header and body size. While a handler runs, the connection
// is watched: a client that closes it is noticed at once (Request::on_disconnect), so that a
// generation nobody will read is cancelled instead of computed.
//
// The handler interface follows cpp-httplib's (Request, Response, set_chunked_content_provider
// with a DataSink), which the handlers were written for.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.h"

namespace larder::http {

struct CaseLess {
  bool operator()(const std::string& a, const std::string& b) const;
};
using Headers = std::multimap<std::string, std::string, CaseLess>;

struct ConnWatch;  // the connection's disconnect state (server.cpp)

struct Request {
  std::string method;   // as sent ("GET", "POST", ...)
  std::string target;   // as sent, e.g. "/v1/models?x=1"
  std::string path;     // target without the query, percent-decoded
  std::multimap<std::string, std::string> params;  // the query, decoded
  Headers headers;
  std::string body;
  int version = 11;     // 10 or 11
  std::string remote_addr;
  int remote_port = 0;
  std::vector<std::string> matches;  // a regex route's groups ([0]: the whole path)

  bool has_header(const std::string& key) const;
  std::string get_header_value(const std::string& key) const;  // "" when absent

  // True once the client has closed its connection (noticed while the handler runs).
  bool client_gone() const;
  // Calls f once, on a worker thread, when the client closes the connection before the response is
  // complete; at once if it already has. f must not block for long.
  void on_disconnect(std::function<void()> f) const;

  std::shared_ptr<ConnWatch> watch;  // set by the server; empty in tests
};

// Where a chunked response's provider writes. write() blocks until the bytes are on their way
// (backpressure) and returns false once the client is gone or the write deadline passed.
class DataSink {
 public:
  virtual ~DataSink() = default;
  virtual bool write(const char* data, size_t n) = 0;
  virtual void done() = 0;              // the last chunk; the provider is not called again
  virtual bool is_writable() const = 0;  // false once the client is gone
};

// Called repeatedly (offset: bytes written so far) until it calls sink.done() or returns false
// (which aborts the connection).
using ContentProvider = std::function<bool(size_t offset, DataSink& sink)>;
// Called once when the provider will not be called again; success: done() was reached.
using ContentProviderReleaser = std::function<void(bool success)>;

struct Response {
  int status = -1;  // -1: not set (200 if a body is set, else 404)
  Headers headers;
  std::string body;
  ContentProvider provider;  // set: a chunked response
  ContentProviderReleaser releaser;
  std::string reason;  // the server's own errors: a one-line cause for the error handler's body

  bool has_header(const std::string& key) const;
  std::string get_header_value(const std::string& key) const;
  void set_header(const std::string& key, const std::string& value);  // replaces
  void set_content(std::string body, const std::string& content_type);
  void set_chunked_content_provider(const std::string& content_type, ContentProvider p,
                                    ContentProviderReleaser r = {});
};

using Handler = std::function<void(const Request&, Response&)>;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (Server::port() says which)
  int worker_threads = 64;  // handlers running at once (a streaming response holds one)
  int io_threads = 2;
  size_t max_header_bytes = 64u << 10;  // 431 beyond
  size_t max_body_bytes = 8u << 20;     // 413 beyond
  std::chrono::milliseconds idle_timeout{30000};    // keep-alive: first byte of the next request
  std::chrono::milliseconds header_timeout{10000};  // first byte -> end of the header (408 after)
  std::chrono::milliseconds body_timeout{60000};    // end of the header -> end of the body
  std::chrono::milliseconds write_timeout{60000};   // each write of a response
  int keep_alive_max_requests = 1000;
  int max_connections = 0;             // 0: from the open-files limit (raised to its hard limit)
  int max_connections_per_client = 1024;  // per remote address; 0: no limit
  bool tcp_nodelay = true;
};

// What the server answers itself (no handler): the status and a one-line message; the
// front end turns it into its error body (see Server::set_error_handler).
class Server {
 public:
  explicit Server(ServerOptions o);
  ~Server();  // stop()
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // method: "GET", "POST", "PUT", "PATCH", "DELETE" (HEAD is served by GET). pattern: an exact
  // path, or a regular expression (std::regex, whole path) when it has one of ( [ . * + ? \.
  // inline_io: a handler that never blocks (e.g. /health) runs on the I/O thread, so that it is
  // answered even while every worker is busy.
  void route(const std::string& method, const std::string& pattern, Handler h, bool inline_io = false);
  // Runs before routing; returns true when it answered (e.g. 401).
  void set_pre_routing(std::function<bool(const Request&, Response&)> f);
  // A path some route serves, with another method: f(req, res, allowed methods "GET, POST").
  void set_method_not_allowed(std::function<void(const Request&, Response&, const std::string& allow)> f);
  // Fills the body of any response with status >= 400 and no body: the server's own (400 bad
  // request, 404, 408, 413, 429 and 503 limits, 431) and handlers' (res.status only). The
  // default writes {"error": {"message": ...}}.
  void set_error_handler(Handler f);
  // Called after each response (status as sent; 499 if the client was gone).
  void set_logger(std::function<void(const Request&, const Response&)> f);

  Status listen();  // bind and start serving (threads started here)
  int port() const;
  void stop();  // closes the listener and every connection; waits for handlers

  struct Stats {
    int64_t connections = 0;   // open now
    int64_t accepted = 0;      // since start
    int64_t refused = 0;       // over a connection limit
    int64_t timeouts = 0;      // closed by a deadline
    int64_t disconnects = 0;   // clients gone while their request was handled
    int64_t requests = 0;
  };
  Stats stats() const;
  // Prometheus lines (larder_http_*) under `prefix` for the metrics endpoint.
  void render_metrics(std::string& out, const std::string& prefix = "larder_http") const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// --- Pieces the server is made of, exposed for tests and fuzzing ---

// target -> path (percent-decoded; false if the target is not origin-form or absolute-form,
// or decodes to a NUL) and query params.
bool split_target(std::string_view target, std::string& path, std::multimap<std::string, std::string>& params);
std::string percent_decode(std::string_view s, bool plus_is_space);

// Parses one request from bytes (what the server does incrementally): 0 = complete (req set),
// 1 = needs more bytes, or the HTTP status of the error (400, 413, 431).
int parse_request(std::string_view bytes, size_t max_header, size_t max_body, Request& req);

// The header block of a response (status line, headers, Content-Length or chunked, Connection).
std::string serialize_head(const Response& res, bool head_only, bool keep_alive, int keep_alive_timeout_s,
                           bool chunked);

// Raises the soft open-files limit to the hard one; returns the new soft limit.
long raise_open_files_limit();

}  // namespace larder::http
