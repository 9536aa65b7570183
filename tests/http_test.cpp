// larder_http: request parsing, and a live server against idle, slow, greedy and vanishing clients.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "http/http.h"

namespace larder::http {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

TEST(HttpParse, RequestsAndErrors) {
  Request r;
  ASSERT_EQ(parse_request("GET /v1/models/a%20b?x=1&y=a+b&z HTTP/1.1\r\nHost: h\r\nX-Key: V\r\n\r\n", 1024, 1024, r), 0);
  EXPECT_EQ(r.method, "GET");
  EXPECT_EQ(r.path, "/v1/models/a b");
  EXPECT_EQ(r.params.find("x")->second, "1");
  EXPECT_EQ(r.params.find("y")->second, "a b");
  EXPECT_EQ(r.params.count("z"), 1u);
  EXPECT_EQ(r.get_header_value("x-key"), "V");  // names are case-insensitive
  EXPECT_TRUE(r.has_header("HOST"));
  EXPECT_EQ(r.version, 11);

  ASSERT_EQ(parse_request("POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 1024, 1024, r), 0);
  EXPECT_EQ(r.body, "hello");
  ASSERT_EQ(parse_request("POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 1024,
                          1024, r),
            0);
  EXPECT_EQ(r.body, "abcde");
  ASSERT_EQ(parse_request("GET http://example.com:8080/health HTTP/1.1\r\n\r\n", 1024, 1024, r), 0);
  EXPECT_EQ(r.path, "/health");

  EXPECT_EQ(parse_request("GET /a HTTP/1.1\r\nHost: h\r\n", 1024, 1024, r), 1);  // incomplete
  EXPECT_EQ(parse_request("POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 1024, 1024, r), 1);
  EXPECT_EQ(parse_request("GET /a HTTP/1.1\r\nX: " + std::string(2000, 'a') + "\r\n\r\n", 1024, 1024, r), 431);
  EXPECT_EQ(parse_request("POST /a HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 1024, 1024, r), 413);
  EXPECT_EQ(parse_request("BLAH\r\n\r\n", 1024, 1024, r), 400);
  EXPECT_EQ(parse_request("GET relative HTTP/1.1\r\n\r\n", 1024, 1024, r), 400);
  EXPECT_EQ(parse_request("GET /a%00b HTTP/1.1\r\n\r\n", 1024, 1024, r), 400);
  EXPECT_EQ(parse_request("POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 1024, 1024, r), 400);
}

TEST(HttpParse, ResponseHead) {
  Response res;
  res.status = 404;
  res.set_content("{}", "application/json");
  res.set_header("X-Evil", "a\r\nInjected: 1");  // a CR/LF in a value must not start a header
  res.set_header("Content-Length", "999");        // framing is the server's
  std::string h = serialize_head(res, false, true, 30, false);
  EXPECT_EQ(h.rfind("HTTP/1.1 404 Not Found\r\n", 0), 0u);
  EXPECT_NE(h.find("Content-Length: 2\r\n"), std::string::npos);
  EXPECT_EQ(h.find("999"), std::string::npos);
  EXPECT_EQ(h.find("\r\nInjected"), std::string::npos);
  EXPECT_NE(h.find("Keep-Alive: timeout=30\r\n"), std::string::npos);
  EXPECT_NE(serialize_head(res, false, false, 30, true).find("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"),
            std::string::npos);
}

// --- a live server ---

int connect_to(int port, const char* src = nullptr) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (src) {
    sockaddr_in s{};
    s.sin_family = AF_INET;
    ::inet_pton(AF_INET, src, &s.sin_addr);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&s), sizeof s) != 0) {
      ::close(fd);
      return -1;
    }
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

// Reads until the peer closes or `until` appears (or the timeout); returns what came.
std::string recv_until(int fd, const std::string& until, int timeout_ms, bool* closed = nullptr) {
  std::string out;
  auto t0 = Clock::now();
  if (closed) *closed = false;
  while (ms_since(t0) < timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    int left = static_cast<int>(timeout_ms - ms_since(t0));
    if (::poll(&p, 1, std::max(1, left)) <= 0) continue;
    char buf[8192];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) {
      if (closed) *closed = true;
      break;
    }
    out.append(buf, static_cast<size_t>(n));
    if (!until.empty() && out.find(until) != std::string::npos) break;
  }
  return out;
}

std::string get(int port, const std::string& path, int timeout_ms = 5000) {
  int fd = connect_to(port);
  if (fd < 0) return "";
  send_all(fd, "GET " + path + " HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
  std::string r = recv_until(fd, "", timeout_ms);
  ::close(fd);
  return r;
}

struct LiveServer {
  std::unique_ptr<Server> s;
  int port = 0;
  explicit LiveServer(ServerOptions o) {
    o.host = "127.0.0.1";
    o.port = 0;
    s = std::make_unique<Server>(o);
  }
  void start() {
    Status st = s->listen();
    ASSERT_TRUE(st.ok()) << st.error();
    port = s->port();
  }
};

TEST(HttpServer, RoutesMethodsErrorsKeepAlive) {
  ServerOptions o;
  o.worker_threads = 2;
  o.keep_alive_max_requests = 3;
  LiveServer L(o);
  L.s->route("GET", "/a", [](const Request&, Response& res) { res.set_content("A", "text/plain"); });
  L.s->route("POST", "/echo", [](const Request& req, Response& res) { res.set_content(req.body, "text/plain"); });
  L.s->route("GET", R"(/item/([^/]+))", [](const Request& req, Response& res) {
    res.set_content(req.matches.size() > 1 ? req.matches[1] : "?", "text/plain");
  });
  L.s->route("GET", "/throw", [](const Request&, Response&) { throw std::runtime_error("boom"); });
  L.start();

  std::string r = get(L.port, "/a");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
  EXPECT_EQ(r.substr(r.size() - 1), "A");
  r = get(L.port, "/item/a%20b");
  EXPECT_NE(r.find("\r\n\r\na b"), std::string::npos) << r;  // routes see the decoded path
  EXPECT_EQ(get(L.port, "/nope").rfind("HTTP/1.1 404", 0), 0u);
  r = get(L.port, "/echo");
  EXPECT_EQ(r.rfind("HTTP/1.1 405", 0), 0u) << r;
  EXPECT_NE(r.find("Allow: POST"), std::string::npos);
  r = get(L.port, "/throw");
  EXPECT_EQ(r.rfind("HTTP/1.1 500", 0), 0u);
  EXPECT_NE(r.find("boom"), std::string::npos);

  // Keep-alive: three requests on one connection (pipelined), the third answered with close.
  int fd = connect_to(L.port);
  send_all(fd, "POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /a HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\n");
  bool closed = false;
  r = recv_until(fd, "", 3000, &closed);
  EXPECT_TRUE(closed);
  EXPECT_NE(r.find("\r\n\r\nhi"), std::string::npos) << r;
  EXPECT_NE(r.find("Connection: close"), std::string::npos);
  size_t n_ok = 0;
  for (size_t p = r.find("HTTP/1.1 200"); p != std::string::npos; p = r.find("HTTP/1.1 200", p + 1)) n_ok++;
  EXPECT_EQ(n_ok, 3u);
  ::close(fd);

  // Expect: 100-continue, then the body.
  fd = connect_to(L.port);
  send_all(fd, "POST /echo HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n");
  r = recv_until(fd, "100 Continue\r\n\r\n", 2000);
  EXPECT_NE(r.find("HTTP/1.1 100 Continue"), std::string::npos);
  send_all(fd, "xyz");
  r = recv_until(fd, "", 2000);
  EXPECT_NE(r.find("\r\n\r\nxyz"), std::string::npos) << r;
  ::close(fd);

  // HEAD: the GET's headers, no body.
  fd = connect_to(L.port);
  send_all(fd, "HEAD /a HTTP/1.1\r\nConnection: close\r\n\r\n");
  r = recv_until(fd, "", 2000);
  EXPECT_NE(r.find("Content-Length: 1\r\n"), std::string::npos);
  EXPECT_EQ(r.substr(r.size() - 4), "\r\n\r\n");
  ::close(fd);
}

TEST(HttpServer, LimitsAndDeadlines) {
  ServerOptions o;
  o.worker_threads = 2;
  o.max_header_bytes = 1024;
  o.max_body_bytes = 100;
  o.header_timeout = 800ms;
  o.idle_timeout = 600ms;
  o.body_timeout = 800ms;
  LiveServer L(o);
  L.s->route("POST", "/echo", [](const Request& req, Response& res) { res.set_content(req.body, "text/plain"); });
  L.start();

  int fd = connect_to(L.port);
  send_all(fd, "POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n");
  std::string r = recv_until(fd, "", 3000);
  EXPECT_EQ(r.rfind("HTTP/1.1 413", 0), 0u) << r;
  EXPECT_NE(r.find("too large"), std::string::npos);
  ::close(fd);

  fd = connect_to(L.port);
  send_all(fd, "GET /echo HTTP/1.1\r\nX: " + std::string(4000, 'a') + "\r\n\r\n");
  r = recv_until(fd, "", 3000);
  EXPECT_EQ(r.rfind("HTTP/1.1 431", 0), 0u) << r.substr(0, 100);
  ::close(fd);

  fd = connect_to(L.port);
  send_all(fd, "\x01\x02garbage\r\n\r\n");
  r = recv_until(fd, "", 3000);
  EXPECT_EQ(r.rfind("HTTP/1.1 400", 0), 0u) << r;
  ::close(fd);

  // An idle connection is closed after the keep-alive timeout; a header sent one byte at a time
  // after the header deadline; a body that stops after the body deadline.
  auto closed_after = [&](const std::string& first, int drip_ms) {
    int c = connect_to(L.port);
    auto t0 = Clock::now();
    send_all(c, first);
    bool closed = false;
    while (!closed && ms_since(t0) < 5000) {
      if (drip_ms) send_all(c, "a");
      recv_until(c, "", drip_ms ? drip_ms : 5000, &closed);
    }
    ::close(c);
    return closed ? ms_since(t0) : 1e9;
  };
  double t_idle = closed_after("", 0);
  EXPECT_GT(t_idle, 400);
  EXPECT_LT(t_idle, 2000);
  double t_header = closed_after("GET / HTTP/1.1\r\nX: ", 100);
  EXPECT_GT(t_header, 600);
  EXPECT_LT(t_header, 2500);
  double t_body = closed_after("POST /echo HTTP/1.1\r\nContent-Length: 99\r\n\r\n", 300);
  EXPECT_GT(t_body, 600);
  EXPECT_LT(t_body, 2500);
  std::this_thread::sleep_for(100ms);  // the server counts after the client saw the close
  EXPECT_GE(L.s->stats().timeouts, 2);
}

TEST(HttpServer, SlowClientsDoNotStallOthers) {
  ServerOptions o;
  o.worker_threads = 2;  // far fewer than the slow clients
  o.header_timeout = 20s;
  LiveServer L(o);
  L.s->route("GET", "/ping", [](const Request&, Response& res) { res.set_content("pong", "text/plain"); });
  L.start();
  std::vector<int> slow;
  for (int i = 0; i < 300; i++) {
    int fd = connect_to(L.port);
    ASSERT_GE(fd, 0);
    send_all(fd, "POST /ping HTTP/1.1\r\nHost: x\r\n");  // half a header, then nothing
    slow.push_back(fd);
  }
  int fd = connect_to(L.port);
  send_all(fd, "POST /ping HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");  // half a body
  slow.push_back(fd);
  for (int i = 0; i < 10; i++) {
    auto t0 = Clock::now();
    std::string r = get(L.port, "/ping", 5000);
    EXPECT_NE(r.find("pong"), std::string::npos);
    EXPECT_LT(ms_since(t0), 500);
  }
  EXPECT_GE(L.s->stats().connections, 300);
  for (int s : slow) ::close(s);
}

TEST(HttpServer, ConnectionLimits) {
  ServerOptions o;
  o.worker_threads = 1;
  o.max_connections_per_client = 3;
  o.max_connections = 5;
  LiveServer L(o);
  L.s->route("GET", "/a", [](const Request&, Response& res) { res.set_content("A", "text/plain"); });
  L.start();
  std::vector<int> held;
  for (int i = 0; i < 3; i++) held.push_back(connect_to(L.port, "127.0.0.1"));
  std::string r = get(L.port, "/a");  // a 4th from 127.0.0.1
  EXPECT_EQ(r.rfind("HTTP/1.1 429", 0), 0u) << r;
  EXPECT_NE(r.find("127.0.0.1"), std::string::npos);
  // Other addresses still get in, up to the total.
  for (int i = 0; i < 2; i++) {
    int fd = connect_to(L.port, "127.0.0.2");
    ASSERT_GE(fd, 0) << "cannot bind 127.0.0.2";
    held.push_back(fd);
  }
  int fd = connect_to(L.port, "127.0.0.3");
  send_all(fd, "GET /a HTTP/1.1\r\n\r\n");
  r = recv_until(fd, "", 3000);
  EXPECT_EQ(r.rfind("HTTP/1.1 503", 0), 0u) << r;
  ::close(fd);
  for (int h : held) ::close(h);
  // The counts come back down: a new connection is served.
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(get(L.port, "/a").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_GE(L.s->stats().refused, 2);
}

TEST(HttpServer, DisconnectNoticeAndStreams) {
  ServerOptions o;
  o.worker_threads = 4;
  LiveServer L(o);
  std::mutex mu;
  std::condition_variable cv;
  bool notified = false, released = false, release_ok = true;
  L.s->route("POST", "/slow", [&](const Request& req, Response& res) {
    req.on_disconnect([&] {
      std::lock_guard<std::mutex> lk(mu);
      notified = true;
      cv.notify_all();
    });
    std::unique_lock<std::mutex> lk(mu);
    cv.wait_for(lk, 5s, [&] { return notified; });
    res.set_content(req.client_gone() ? "gone" : "here", "text/plain");
  });
  L.s->route("GET", "/stream", [&](const Request& req, Response& res) {
    const bool endless = req.params.count("endless") > 0;
    auto n = std::make_shared<int>(0);
    res.set_chunked_content_provider(
        "text/event-stream",
        [n, endless](size_t, DataSink& sink) {
          std::string ev = "data: " + std::to_string((*n)++) + "\n\n";
          if (!sink.write(ev.data(), ev.size())) return false;
          if (!endless && *n == 3) sink.done();
          std::this_thread::sleep_for(10ms);
          return true;
        },
        [&](bool ok) {
          std::lock_guard<std::mutex> lk(mu);
          released = true;
          release_ok = ok;
          cv.notify_all();
        });
  });
  L.start();

  // A client that hangs up while its request is handled: noticed within a fraction of a second.
  int fd = connect_to(L.port);
  send_all(fd, "POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
  std::this_thread::sleep_for(100ms);
  auto t0 = Clock::now();
  ::close(fd);
  {
    std::unique_lock<std::mutex> lk(mu);
    EXPECT_TRUE(cv.wait_for(lk, 2s, [&] { return notified; }));
  }
  EXPECT_LT(ms_since(t0), 1000);
  EXPECT_GE(L.s->stats().disconnects, 1);

  // A whole stream, chunked, then the connection is reused.
  fd = connect_to(L.port);
  send_all(fd, "GET /stream HTTP/1.1\r\n\r\n");
  std::string r = recv_until(fd, "\r\n0\r\n\r\n", 3000);
  EXPECT_NE(r.find("Transfer-Encoding: chunked"), std::string::npos);
  EXPECT_NE(r.find("data: 0\n\n"), std::string::npos);
  EXPECT_NE(r.find("data: 2\n\n\r\n0\r\n\r\n"), std::string::npos) << r;
  {
    std::unique_lock<std::mutex> lk(mu);
    EXPECT_TRUE(cv.wait_for(lk, 2s, [&] { return released; }));
    EXPECT_TRUE(release_ok);
    released = false;
  }
  send_all(fd, "GET /stream HTTP/1.1\r\nConnection: close\r\n\r\n");
  bool closed = false;
  r = recv_until(fd, "", 3000, &closed);
  EXPECT_TRUE(closed);
  EXPECT_NE(r.find("data: 2"), std::string::npos);
  ::close(fd);
  {
    std::unique_lock<std::mutex> lk(mu);
    EXPECT_TRUE(cv.wait_for(lk, 2s, [&] { return released; }));
    released = false;
  }

  // An endless stream whose client leaves: the provider's writes fail, the releaser says so.
  fd = connect_to(L.port);
  send_all(fd, "GET /stream?endless=1 HTTP/1.1\r\n\r\n");
  recv_until(fd, "data: 5", 3000);
  ::close(fd);
  {
    std::unique_lock<std::mutex> lk(mu);
    EXPECT_TRUE(cv.wait_for(lk, 2s, [&] { return released; }));
    EXPECT_FALSE(release_ok);
  }
  L.s->stop();
  EXPECT_EQ(L.s->stats().connections, 0);
}

}  // namespace
}  // namespace larder::http
