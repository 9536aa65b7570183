// src/cluster against a real etcd: each test starts its own etcd (free loopback ports, a
// temporary data dir) and removes it afterwards. Skipped when /usr/bin/etcd is missing.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "cluster/etcd.h"
#include "cluster/membership.h"

extern char** environ;

namespace larder::cluster {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

const char* kEtcd = "/usr/bin/etcd";

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

// Polls cond every 50 ms until it holds or timeout_s passes.
bool wait_for(const std::function<bool()>& cond, double timeout_s) {
  auto end = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (Clock::now() < end) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return cond();
}

// One single-member etcd on loopback; restartable on the same ports and data dir.
class EtcdServer {
 public:
  EtcdServer() {
    char tmpl[] = "/tmp/larder-etcd-XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    dir_ = d ? d : "";
    client_port_ = free_port();
    peer_port_ = free_port();
    while (peer_port_ == client_port_) peer_port_ = free_port();
  }
  ~EtcdServer() {
    kill();
    if (!dir_.empty()) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(client_port_); }
  int port() const { return client_port_; }

  // Starts etcd and waits until it answers /health (false after 20 s).
  bool start() {
    std::string client = "http://127.0.0.1:" + std::to_string(client_port_);
    std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    std::string initial = "default=" + peer;
    std::string data = dir_ + "/data";
    std::string log = dir_ + "/etcd.log";
    std::vector<std::string> args = {kEtcd, "--data-dir", data, "--listen-client-urls", client,
                                     "--advertise-client-urls", client, "--listen-peer-urls", peer,
                                     "--initial-advertise-peer-urls", peer, "--initial-cluster", initial,
                                     "--name", "default"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    int rc = posix_spawn(&pid_, kEtcd, &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      pid_ = -1;
      return false;
    }
    return wait_for(
        [&] {
          httplib::Client c("127.0.0.1", client_port_);
          c.set_connection_timeout(0, 200000);
          c.set_read_timeout(0, 500000);
          auto r = c.Get("/health");
          return r && r->status == 200 && r->body.find("true") != std::string::npos;
        },
        20);
  }

  void kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGCONT);  // a paused etcd dies as well
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  // A hung etcd: connections stay open, nothing answers.
  void pause() {
    if (pid_ > 0) ::kill(pid_, SIGSTOP);
  }
  void resume() {
    if (pid_ > 0) ::kill(pid_, SIGCONT);
  }
  // Its data gone (kill first): the next start() is a new, empty cluster on the same ports.
  void wipe() {
    std::error_code ec;
    fs::remove_all(dir_ + "/data", ec);
  }

 private:
  std::string dir_;
  int client_port_ = -1, peer_port_ = -1;
  pid_t pid_ = -1;
};

#define SKIP_WITHOUT_ETCD()                                                                     \
  do {                                                                                          \
    if (::access(kEtcd, X_OK) != 0)                                                             \
      GTEST_SKIP() << kEtcd << " not found (Debian: apt-get install etcd-server); CI installs it"; \
  } while (0)

#define START_ETCD(srv) \
  EtcdServer srv;       \
  ASSERT_TRUE(srv.start()) << "etcd did not start"

InstanceInfo sample(const std::string& id, const std::string& role, int port) {
  InstanceInfo i;
  i.id = id;
  i.role = role;
  i.model = "model-fp";
  i.kv_layout = "layout-fp";
  i.api_address = "127.0.0.1:" + std::to_string(port);
  i.transfer_address = "127.0.0.1:" + std::to_string(port + 1);
  i.capacity.kv_blocks = 1000;
  i.capacity.parallel = 4;
  i.capacity.threads = 2;
  return i;
}

MembershipParams params(const EtcdServer& e, int ttl_s = 10) {
  MembershipParams p;
  p.endpoints = {e.endpoint()};
  p.cluster = "test";
  p.ttl_s = ttl_s;
  p.refresh_s = 0.2;
  return p;
}

std::vector<InstanceInfo> list(EtcdClient& c, const std::string& cluster = "test") {
  auto r = list_instances(c, cluster);
  return r.ok() ? r.value() : std::vector<InstanceInfo>{};
}

// Every lease etcd holds, straight from the gateway (the test stands in for an operator).
std::vector<std::string> all_leases(const EtcdServer& e) {
  httplib::Client c("127.0.0.1", e.port());
  auto r = c.Post("/v3/lease/leases", "{}", "application/json");
  std::vector<std::string> out;
  if (!r || r->status != 200) return out;
  auto j = nlohmann::json::parse(r->body, nullptr, false);
  if (j.is_object() && j.contains("leases"))
    for (auto& l : j["leases"]) out.push_back(l.value("ID", std::string()));
  return out;
}

// POST to the gateway directly (what the client has no call for, e.g. compaction).
nlohmann::json gateway_post(const EtcdServer& e, const char* path, const nlohmann::json& body) {
  httplib::Client c("127.0.0.1", e.port());
  auto r = c.Post(path, body.dump(), "application/json");
  if (!r) return nlohmann::json();
  return nlohmann::json::parse(r->body, nullptr, false);
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Polls cond every 1 ms; returns the seconds it took, or -1 after timeout_s.
double latency(const std::function<bool()>& cond, double timeout_s) {
  auto t0 = Clock::now();
  while (seconds_since(t0) < timeout_s) {
    if (cond()) return seconds_since(t0);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return -1;
}

// Records what a Directory's on_change reports, and the view that follows from applying it.
struct ChangeLog {
  std::mutex mu;
  std::map<std::string, InstanceInfo> view;
  std::vector<std::string> added, removed;  // every id in the order reported
  int calls = 0;

  Directory::ChangeFn fn() {
    return [this](const std::vector<InstanceInfo>& up, const std::vector<std::string>& gone) {
      std::lock_guard<std::mutex> lk(mu);
      calls++;
      for (const auto& i : up) {
        view[i.id] = i;
        added.push_back(i.id);
      }
      for (const auto& id : gone) {
        view.erase(id);
        removed.push_back(id);
      }
    };
  }
  std::set<std::string> ids() {
    std::lock_guard<std::mutex> lk(mu);
    std::set<std::string> out;
    for (auto& [id, i] : view) out.insert(id);
    return out;
  }
  bool was_removed(const std::string& id) {
    std::lock_guard<std::mutex> lk(mu);
    return std::find(removed.begin(), removed.end(), id) != removed.end();
  }
  bool was_added(const std::string& id) {
    std::lock_guard<std::mutex> lk(mu);
    return std::find(added.begin(), added.end(), id) != added.end();
  }
};

std::set<std::string> ids_of(const std::vector<InstanceInfo>& v) {
  std::set<std::string> out;
  for (const auto& i : v) out.insert(i.id);
  return out;
}

DirectoryParams dir_params(const std::string& endpoint, double check_s = 5.0) {
  DirectoryParams p;
  p.endpoints = {endpoint};
  p.cluster = "test";
  p.check_s = check_s;
  return p;
}

Status put_instance(EtcdClient& c, const InstanceInfo& i) { return c.put(instance_key("test", i.id), to_json(i).dump()); }

// A TCP forwarder in front of etcd whose open connections can be frozen (bytes stop flowing
// both ways, the sockets stay open) while new ones work: a watch stuck with etcd healthy.
class FreezingProxy {
 public:
  explicit FreezingProxy(int target_port) : target_(target_port) {
    lfd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(lfd_, 64) == 0 &&
        ::getsockname(lfd_, reinterpret_cast<sockaddr*>(&a), &len) == 0)
      port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~FreezingProxy() {
    stop_ = true;
    acceptor_.join();
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& c : conns_) c->th.join();
    ::close(lfd_);
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }
  void freeze_open_connections() {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& c : conns_) c->frozen = true;
  }

 private:
  struct Conn {
    int a = -1, b = -1;
    std::atomic<bool> frozen{false};
    std::thread th;
  };

  void accept_loop() {
    while (!stop_) {
      pollfd p{lfd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      int a = ::accept(lfd_, nullptr, nullptr);
      if (a < 0) continue;
      int b = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in t{};
      t.sin_family = AF_INET;
      t.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      t.sin_port = htons(static_cast<uint16_t>(target_));
      if (::connect(b, reinterpret_cast<sockaddr*>(&t), sizeof t) != 0) {
        ::close(a);
        ::close(b);
        continue;
      }
      auto c = std::make_unique<Conn>();
      c->a = a;
      c->b = b;
      Conn* cp = c.get();
      c->th = std::thread([this, cp] { pump(*cp); });
      std::lock_guard<std::mutex> lk(mu_);
      conns_.push_back(std::move(c));
    }
  }

  void pump(Conn& c) {
    char buf[16384];
    while (!stop_) {
      if (c.frozen) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      pollfd p[2] = {{c.a, POLLIN, 0}, {c.b, POLLIN, 0}};
      if (::poll(p, 2, 20) <= 0 || c.frozen) continue;  // frozen meanwhile: not even this read
      bool done = false;
      for (int k = 0; k < 2 && !done; ++k) {
        if (!(p[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        ssize_t n = ::read(p[k].fd, buf, sizeof buf);
        if (n <= 0 || ::write(p[1 - k].fd, buf, static_cast<size_t>(n)) != n) done = true;
      }
      if (done) break;
    }
    ::close(c.a);
    ::close(c.b);
  }

  int target_, lfd_ = -1, port_ = -1;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::unique_ptr<Conn>> conns_;
};

// ---------------------------------------------------------------------------------------------

TEST(ClusterUrl, Parse) {
  auto a = parse_etcd_url("etcd://127.0.0.1:2379");
  ASSERT_TRUE(a.ok()) << a.error();
  EXPECT_EQ(a.value(), std::vector<std::string>{"127.0.0.1:2379"});
  auto b = parse_etcd_url("etcd://h1:2379,h2.example.com:12379");
  ASSERT_TRUE(b.ok()) << b.error();
  EXPECT_EQ(b.value(), (std::vector<std::string>{"h1:2379", "h2.example.com:12379"}));
  auto c = parse_etcd_url("localhost:2379,[::1]:2380");
  ASSERT_TRUE(c.ok()) << c.error();
  EXPECT_EQ(c.value(), (std::vector<std::string>{"localhost:2379", "[::1]:2380"}));
  for (const char* bad : {"", "etcd://", "http://h:2379", "etcd://h", "etcd://h:", "etcd://:2379", "etcd://h:0",
                          "etcd://h:65536", "etcd://h:12x", "etcd://h:1,,h:2", "etcd://h:1,", "etcd://h:1/path",
                          "::1:2379"}) {
    auto r = parse_etcd_url(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "' was accepted";
    if (!r.ok()) {
      EXPECT_NE(r.error().find("etcd"), std::string::npos) << r.error();
      EXPECT_EQ(r.error().find('\n'), std::string::npos);
    }
  }
  EXPECT_NE(parse_etcd_url("http://h:2379").error().find("scheme"), std::string::npos);
}

TEST(ClusterUrl, Base64) {
  const std::vector<std::string> samples = {"",      "f",      "fo", "foo", "foob",
                                            "fooba", "foobar", std::string("\0\xff\x10", 3)};
  for (const std::string& s : samples) {
    auto d = base64_decode(base64_encode(s));
    ASSERT_TRUE(d.ok()) << d.error();
    EXPECT_EQ(d.value(), s);
  }
  EXPECT_EQ(base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(base64_encode("fo"), "Zm8=");
  EXPECT_FALSE(base64_decode("Zm9v!").ok());
  EXPECT_FALSE(base64_decode("Z").ok());
}

TEST(ClusterInstance, JsonRoundTripAndErrors) {
  InstanceInfo i = sample("a-1-x", "decode", 9000);
  i.load.running = 3;
  i.load.waiting = 2;
  i.load.free_blocks = 77;
  i.load.queued_prefill_tokens = 1234;
  i.updated_ms = 1700000000123;
  auto back = instance_from_json(to_json(i).dump());
  ASSERT_TRUE(back.ok()) << back.error();
  EXPECT_EQ(to_json(back.value()), to_json(i));

  // Unknown fields are fine; optional ones default.
  auto m = instance_from_json(R"({"id":"x","role":"both","api_address":"h:1","future":{"a":1},"load":{"running":5}})");
  ASSERT_TRUE(m.ok()) << m.error();
  EXPECT_EQ(m->load.running, 5);
  EXPECT_EQ(m->model, "");
  EXPECT_TRUE(m->can_prefill() && m->can_decode());

  struct Bad {
    const char* text;
    const char* want;
  };
  for (const Bad& b : {Bad{"not json", "JSON"}, Bad{"[1]", "object"},
                       Bad{R"({"role":"decode","api_address":"h:1"})", "'id'"},
                       Bad{R"({"id":"x","api_address":"h:1"})", "'role'"},
                       Bad{R"({"id":"x","role":"decode"})", "'api_address'"},
                       Bad{R"({"id":"x","role":"chef","api_address":"h:1"})", "chef"},
                       Bad{R"({"id":7,"role":"decode","api_address":"h:1"})", "'id' must be a string"},
                       Bad{R"({"id":"x","role":"decode","api_address":"h:1","load":{"running":"many"}})",
                           "load.running"},
                       Bad{R"({"id":"x","role":"decode","api_address":"h:1","capacity":3})", "capacity"}}) {
    auto r = instance_from_json(b.text);
    ASSERT_FALSE(r.ok()) << b.text;
    EXPECT_NE(r.error().find(b.want), std::string::npos) << b.text << " -> " << r.error();
  }
  EXPECT_EQ(instance_key("prod", "h-1-a"), "/larder/prod/instances/h-1-a");
  EXPECT_NE(make_instance_id(), make_instance_id());
}

TEST(ClusterEtcd, PutGetDeleteAndLeaseExpiry) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  // The dead endpoint first: calls fall through to the live one.
  EtcdClient c({"127.0.0.1:" + std::to_string(free_port()), etcd.endpoint()});
  ASSERT_TRUE(c.put("/p/a", "1").ok());
  ASSERT_TRUE(c.put("/p/b", std::string("two\0bytes", 9)).ok());
  ASSERT_TRUE(c.put("/p0", "outside").ok());  // shares the characters, not the prefix
  ASSERT_TRUE(c.put("/q/a", "other").ok());
  auto g = c.get_prefix("/p/");
  ASSERT_TRUE(g.ok()) << g.error();
  ASSERT_EQ(g->size(), 2u);
  EXPECT_EQ((*g)[0], (std::pair<std::string, std::string>{"/p/a", "1"}));
  EXPECT_EQ((*g)[1].second, std::string("two\0bytes", 9));
  ASSERT_TRUE(c.del("/p/a").ok());
  EXPECT_EQ(c.get_prefix("/p/")->size(), 1u);
  EXPECT_EQ(c.get_prefix("/none/")->size(), 0u);

  // A leased key lives while the lease is kept alive and goes when it runs out.
  auto lease = c.lease_grant(2);
  ASSERT_TRUE(lease.ok()) << lease.error();
  ASSERT_TRUE(c.put("/l/k", "v", *lease).ok());
  auto ttl = c.lease_keepalive(*lease);
  ASSERT_TRUE(ttl.ok()) << ttl.error();
  EXPECT_GT(*ttl, 0);
  EXPECT_EQ(c.get_prefix("/l/")->size(), 1u);
  auto t0 = Clock::now();
  EXPECT_TRUE(wait_for([&] { return c.get_prefix("/l/")->empty(); }, 5));
  EXPECT_GE(std::chrono::duration<double>(Clock::now() - t0).count(), 1.0);
  auto gone = c.lease_keepalive(*lease);
  EXPECT_TRUE(!gone.ok() || *gone <= 0);
  // Putting under a dead lease is an error from etcd (not a transport failure).
  Status s = c.put("/l/k", "v", *lease);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().find("lease not found"), std::string::npos) << s.error();

  // Revoking deletes the key at once.
  auto l2 = c.lease_grant(30);
  ASSERT_TRUE(l2.ok());
  ASSERT_TRUE(c.put("/l/r", "v", *l2).ok());
  ASSERT_TRUE(c.lease_revoke(*l2).ok());
  EXPECT_TRUE(c.get_prefix("/l/")->empty());

  // Nothing reachable: a quick, one-line error.
  etcd.kill();
  t0 = Clock::now();
  auto dead = c.get_prefix("/p/");
  EXPECT_FALSE(dead.ok());
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);
  EXPECT_NE(dead.error().find("unreachable"), std::string::npos) << dead.error();
}

TEST(ClusterMembership, RegistersAndRefreshesLoad) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  std::atomic<int> running{1};
  auto m = Membership::start(params(etcd), [&] {
    InstanceInfo i = sample("inst-a", "decode", 9000);
    i.load.running = running.load();
    return i;
  });
  ASSERT_TRUE(m.ok()) << m.error();
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(wait_for([&] { return list(c).size() == 1; }, 5));
  auto l = list(c);
  EXPECT_EQ(l[0].id, "inst-a");
  EXPECT_EQ(l[0].role, "decode");
  EXPECT_EQ(l[0].load.running, 1);
  EXPECT_GT(l[0].updated_ms, 0);
  running = 7;
  EXPECT_TRUE(wait_for([&] { auto v = list(c); return v.size() == 1 && v[0].load.running == 7; }, 3));
  int64_t t1 = list(c)[0].updated_ms;
  EXPECT_TRUE(wait_for([&] { auto v = list(c); return v.size() == 1 && v[0].updated_ms > t1; }, 3));
  MembershipStats st = (*m)->stats();
  EXPECT_TRUE(st.registered);
  EXPECT_EQ(st.registrations, 1);
  EXPECT_GT(st.refreshes, 0);
  EXPECT_EQ(st.failures, 0);
}

TEST(ClusterMembership, TwoInstancesListedAndStopLeavesAtOnce) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  auto a = Membership::start(params(etcd), [] { return sample("inst-a", "prefill", 9000); });
  auto b = Membership::start(params(etcd), [] { return sample("inst-b", "decode", 9100); });
  ASSERT_TRUE(a.ok() && b.ok());
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(wait_for([&] { return list(c).size() == 2; }, 5));
  auto l = list(c);
  EXPECT_EQ(l[0].id, "inst-a");
  EXPECT_TRUE(l[0].can_prefill() && !l[0].can_decode());
  EXPECT_EQ(l[1].id, "inst-b");
  EXPECT_EQ(l[1].api_address, "127.0.0.1:9100");
  EXPECT_TRUE(list(c, "other").empty());  // another cluster's prefix

  auto d = Directory::start({etcd.endpoint()}, "test", 0.1);
  ASSERT_TRUE(d.ok()) << d.error();
  EXPECT_EQ((*d)->instances().size(), 2u);  // read once before start() returns
  EXPECT_TRUE((*d)->etcd_ok());

  auto t0 = Clock::now();
  (*a)->stop();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 2.0);
  l = list(c);  // no wait: the lease was revoked
  ASSERT_EQ(l.size(), 1u);
  EXPECT_EQ(l[0].id, "inst-b");
  EXPECT_FALSE((*a)->stats().registered);
  EXPECT_TRUE(wait_for([&] { return (*d)->instances().size() == 1; }, 2));
  b->reset();  // the destructor stops too
  EXPECT_TRUE(list(c).empty());
  EXPECT_TRUE(wait_for([&] { return (*d)->instances().empty(); }, 2));
}

TEST(ClusterMembership, KilledInstanceVanishesAfterTtl) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  // A child process registers with a 2 s lease and is then SIGKILLed (no revoke, no keepalive).
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto m = Membership::start(params(etcd, 2), [] { return sample("doomed", "both", 9000); });
    if (!m.ok()) ::_exit(2);
    ::pause();
    ::_exit(0);
  }
  bool up = wait_for([&] { return list(c).size() == 1; }, 5);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  ASSERT_TRUE(up);
  auto t0 = Clock::now();
  EXPECT_TRUE(wait_for([&] { return list(c).empty(); }, 6));
  double gone_s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LE(gone_s, 4.0);
}

TEST(ClusterMembership, ReRegistersAfterEtcdRestartAndLostLease) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  auto m = Membership::start(params(etcd, 3), [] { return sample("survivor", "decode", 9000); });
  ASSERT_TRUE(m.ok());
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(wait_for([&] { return list(c).size() == 1; }, 5));
  auto d = Directory::start({etcd.endpoint()}, "test", 0.1);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ((*d)->instances().size(), 1u);

  etcd.kill();
  EXPECT_TRUE(wait_for([&] { return (*m)->stats().failures > 0; }, 3));
  EXPECT_FALSE((*m)->stats().registered);
  EXPECT_TRUE(wait_for([&] { return !(*d)->etcd_ok(); }, 3));
  EXPECT_EQ((*d)->instances().size(), 1u);  // the last good list stays
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));

  ASSERT_TRUE(etcd.start());
  auto t0 = Clock::now();
  EXPECT_TRUE(wait_for([&] { return (*m)->stats().registered; }, 5));
  int64_t since = wall_ms();
  EXPECT_TRUE(wait_for([&] { auto v = list(c); return v.size() == 1 && v[0].updated_ms >= since; }, 5));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 6.0);
  EXPECT_TRUE(wait_for([&] { return (*d)->etcd_ok(); }, 3));

  // The lease vanishes behind its back (an operator revokes it): the next keepalive or
  // refresh notices and a new lease and key follow within about a second.
  int64_t regs = (*m)->stats().registrations;
  for (const auto& id : all_leases(etcd)) ASSERT_TRUE(c.lease_revoke(std::stoll(id)).ok());
  EXPECT_TRUE(wait_for([&] { return (*m)->stats().registrations > regs && list(c).size() == 1; }, 4));
}

TEST(ClusterMembership, StartWhileEtcdDownRegistersOnceItIsUp) {
  SKIP_WITHOUT_ETCD();
  EtcdServer etcd;  // not started yet
  auto t0 = Clock::now();
  auto m = Membership::start(params(etcd), [] { return sample("early", "prefill", 9000); });
  ASSERT_TRUE(m.ok()) << m.error();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 0.5);  // never blocks the caller
  auto d = Directory::start({etcd.endpoint()}, "test", 0.1);
  ASSERT_TRUE(d.ok()) << d.error();
  EXPECT_FALSE((*d)->etcd_ok());
  EXPECT_TRUE(wait_for([&] { return (*m)->stats().failures >= 2; }, 3));
  EXPECT_FALSE((*m)->stats().registered);
  EXPECT_NE((*m)->stats().last_error.find("unreachable"), std::string::npos) << (*m)->stats().last_error;

  ASSERT_TRUE(etcd.start());
  EXPECT_TRUE(wait_for([&] { return (*m)->stats().registered; }, 5));
  EtcdClient c({etcd.endpoint()});
  EXPECT_TRUE(wait_for([&] { return list(c).size() == 1; }, 2));
  EXPECT_TRUE(wait_for([&] { return (*d)->etcd_ok() && (*d)->instances().size() == 1; }, 3));
}

TEST(ClusterDirectory, GarbageValuesAreSkipped) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(c.put(instance_key("test", "aaa-garbage"), "{not json").ok());
  ASSERT_TRUE(c.put(instance_key("test", "bbb-good"), to_json(sample("bbb-good", "decode", 9000)).dump()).ok());
  ASSERT_TRUE(c.put(instance_key("test", "ccc-no-role"), R"({"id":"ccc","api_address":"h:1"})").ok());
  std::vector<std::string> skipped;
  auto l = list_instances(c, "test", &skipped);
  ASSERT_TRUE(l.ok()) << l.error();
  ASSERT_EQ(l->size(), 1u);
  EXPECT_EQ((*l)[0].id, "bbb-good");
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_NE(skipped[0].find("aaa-garbage"), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[1].find("'role'"), std::string::npos) << skipped[1];
  auto d = Directory::start({etcd.endpoint()}, "test", 0.1);
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE((*d)->etcd_ok());
  ASSERT_EQ((*d)->instances().size(), 1u);
  EXPECT_EQ((*d)->instances()[0].id, "bbb-good");
}

TEST(ClusterMembership, BadParameters) {
  auto snap = [] { return sample("x", "both", 1); };
  MembershipParams p;
  EXPECT_FALSE(Membership::start(p, snap).ok());  // no endpoint
  p.endpoints = {"127.0.0.1:1"};
  p.cluster = "a/b";
  EXPECT_FALSE(Membership::start(p, snap).ok());
  p.cluster = "ok";
  p.ttl_s = 1;
  EXPECT_FALSE(Membership::start(p, snap).ok());
  EXPECT_FALSE(Directory::start({}, "ok").ok());
  EXPECT_FALSE(Directory::start({"127.0.0.1:1"}, "").ok());
}

// ---------------------------------------------------------------------------------------------
// Watch

TEST(ClusterWatch, ListAtRevisionThenWatchSeesEachLaterChangeOnce) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(c.put("/w/a", "a1").ok());
  ASSERT_TRUE(c.put("/w/b", "b1").ok());
  auto r = c.range_prefix("/w/");
  ASSERT_TRUE(r.ok()) << r.error();
  ASSERT_EQ(r->kvs.size(), 2u);
  EXPECT_EQ(r->kvs[0].key, "/w/a");
  EXPECT_EQ(r->kvs[1].value, "b1");
  EXPECT_GT(r->kvs[1].mod_revision, r->kvs[0].mod_revision);
  EXPECT_GE(r->revision, r->kvs[1].mod_revision);
  // Changes after the read, one outside the prefix.
  ASSERT_TRUE(c.put("/w/c", "c1").ok());
  ASSERT_TRUE(c.put("/x/a", "other").ok());
  ASSERT_TRUE(c.put("/w/a", "a2").ok());
  ASSERT_TRUE(c.del("/w/b").ok());

  std::vector<WatchEvent> got;
  int created = 0;
  int64_t last_rev = 0;
  bool ordered = true;
  auto end = c.watch_prefix("/w/", r->revision + 1, [&](const WatchResponse& wr) {
    if (wr.created) created++;
    for (const auto& e : wr.events) {
      ordered = ordered && e.kv.mod_revision > last_rev;
      last_rev = e.kv.mod_revision;
      got.push_back(e);
    }
    return got.size() < 3;
  });
  ASSERT_TRUE(end.ok()) << end.error();
  EXPECT_FALSE(end->compacted);
  EXPECT_EQ(created, 1);
  EXPECT_TRUE(ordered);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0].type, WatchEvent::Type::Put);
  EXPECT_EQ(got[0].kv.key, "/w/c");
  EXPECT_EQ(got[0].kv.value, "c1");
  EXPECT_FALSE(got[0].has_prev);
  EXPECT_GT(got[0].kv.mod_revision, r->revision);
  EXPECT_EQ(got[1].kv.key, "/w/a");
  EXPECT_EQ(got[1].kv.value, "a2");
  ASSERT_TRUE(got[1].has_prev);
  EXPECT_EQ(got[1].prev_kv.value, "a1");
  EXPECT_EQ(got[2].type, WatchEvent::Type::Delete);
  EXPECT_EQ(got[2].kv.key, "/w/b");
  ASSERT_TRUE(got[2].has_prev);
  EXPECT_EQ(got[2].prev_kv.value, "b1");

  // A watch from now sees what happens while it runs (events come as they happen).
  std::atomic<bool> seen{false};
  std::thread th([&] {
    auto e = c.watch_prefix("/w/", 0, [&](const WatchResponse& wr) {
      for (const auto& ev : wr.events)
        if (ev.kv.key == "/w/live") seen = true;
      return !seen;
    });
    EXPECT_TRUE(e.ok()) << e.error();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_TRUE(c.put("/w/live", "x").ok());
  th.join();
  EXPECT_TRUE(seen);
}

TEST(ClusterWatch, CompactedRevisionSaysSo) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(c.put("/w/k", std::to_string(i)).ok());
  auto r = c.range_prefix("/w/");
  ASSERT_TRUE(r.ok());
  auto j = gateway_post(etcd, "/v3/kv/compaction", {{"revision", std::to_string(r->revision)}});
  ASSERT_TRUE(j.is_object() && !j.contains("error")) << j.dump();
  int calls = 0;
  auto t0 = Clock::now();
  auto end = c.watch_prefix("/w/", 2, [&](const WatchResponse& wr) {
    calls += wr.created ? 0 : 1;
    return true;
  });
  ASSERT_TRUE(end.ok()) << end.error();
  EXPECT_TRUE(end->compacted);
  EXPECT_EQ(end->compact_revision, r->revision);
  EXPECT_EQ(calls, 0);  // no event came before the cancellation
  EXPECT_LT(seconds_since(t0), 1.0);
}

TEST(ClusterWatch, CancelIsPromptAndErrorsAreQuick) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  // A dead endpoint first: the watch falls through to the live one.
  EtcdClient c({"127.0.0.1:" + std::to_string(free_port()), etcd.endpoint()});
  EtcdCancel cancel;
  std::atomic<bool> created{false};
  Result<WatchEnd> end = WatchEnd{};
  std::thread th([&] {
    end = c.watch_prefix("/w/", 0, [&](const WatchResponse& wr) {
      if (wr.created) created = true;
      return true;
    }, &cancel);
  });
  ASSERT_TRUE(wait_for([&] { return created.load(); }, 3));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto t0 = Clock::now();
  cancel.cancel();
  th.join();
  EXPECT_LT(seconds_since(t0), 0.2);
  EXPECT_TRUE(end.ok()) << end.error();

  // Cancelled before it starts: returns at once, until reset.
  t0 = Clock::now();
  auto again = c.watch_prefix("/w/", 0, [](const WatchResponse&) { return true; }, &cancel);
  EXPECT_TRUE(again.ok());
  EXPECT_LT(seconds_since(t0), 0.1);
  cancel.reset();
  EXPECT_FALSE(cancel.cancelled());

  // A hung etcd: the watch waits silently (nothing to notice) until cancelled; a read is
  // cancelled as promptly.
  created = false;
  th = std::thread([&] {
    end = c.watch_prefix("/w/", 0, [&](const WatchResponse& wr) {
      if (wr.created) created = true;
      return true;
    }, &cancel);
  });
  ASSERT_TRUE(wait_for([&] { return created.load(); }, 3));
  etcd.pause();
  EtcdCancel read_cancel;
  Result<RangeResult> read = RangeResult{};
  std::thread reader([&] { read = c.range_prefix("/w/", &read_cancel); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  t0 = Clock::now();
  cancel.cancel();
  read_cancel.cancel();
  th.join();
  reader.join();
  EXPECT_LT(seconds_since(t0), 0.2);
  EXPECT_TRUE(end.ok());
  EXPECT_FALSE(read.ok());
  etcd.resume();

  // etcd dies under a running watch: an error, at once.
  cancel.reset();
  created = false;
  th = std::thread([&] {
    end = c.watch_prefix("/w/", 0, [&](const WatchResponse& wr) {
      if (wr.created) created = true;
      return true;
    }, &cancel);
  });
  ASSERT_TRUE(wait_for([&] { return created.load(); }, 3));
  t0 = Clock::now();
  etcd.kill();
  th.join();
  EXPECT_LT(seconds_since(t0), 0.5);
  ASSERT_FALSE(end.ok());
  EXPECT_NE(end.error().find("watch"), std::string::npos) << end.error();
  // Nothing to connect to: a quick error naming every endpoint.
  t0 = Clock::now();
  auto dead = c.watch_prefix("/w/", 0, [](const WatchResponse&) { return true; });
  ASSERT_FALSE(dead.ok());
  EXPECT_NE(dead.error().find("unreachable"), std::string::npos) << dead.error();
  EXPECT_LT(seconds_since(t0), 3.0);
}

// ---------------------------------------------------------------------------------------------
// Directory following the watch

TEST(ClusterDirectory, PutAndDeleteSeenWithin200ms) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(put_instance(c, sample("early", "decode", 9000)).ok());
  auto d = Directory::start(dir_params(etcd.endpoint()));
  ASSERT_TRUE(d.ok()) << d.error();
  Directory& dir = **d;
  ASSERT_EQ(dir.instances().size(), 1u);
  EXPECT_TRUE(dir.etcd_ok());
  ChangeLog log;
  dir.on_change(log.fn());  // called at once with what is there
  EXPECT_EQ(log.ids(), std::set<std::string>{"early"});
  uint64_t gen = dir.generation();

  // Join.
  ASSERT_TRUE(put_instance(c, sample("late", "prefill", 9100)).ok());
  double t = latency([&] { return dir.get("late").has_value(); }, 2);
  EXPECT_GE(t, 0);
  EXPECT_LT(t, 0.2);
  EXPECT_TRUE(log.was_added("late"));
  EXPECT_GT(dir.generation(), gen);
  EXPECT_EQ(dir.get("late")->api_address, "127.0.0.1:9100");
  EXPECT_FALSE(dir.get("nobody").has_value());

  // Update: the new value replaces the old one.
  InstanceInfo busy = sample("late", "prefill", 9100);
  busy.load.running = 9;
  ASSERT_TRUE(put_instance(c, busy).ok());
  t = latency([&] { auto i = dir.get("late"); return i && i->load.running == 9; }, 2);
  EXPECT_GE(t, 0);
  EXPECT_LT(t, 0.2);
  EXPECT_TRUE(wait_for([&] { std::lock_guard<std::mutex> lk(log.mu); return log.view["late"].load.running == 9; }, 1));

  // Leave by deletion.
  ASSERT_TRUE(c.del(instance_key("test", "early")).ok());
  t = latency([&] { return !dir.get("early").has_value(); }, 2);
  EXPECT_GE(t, 0);
  EXPECT_LT(t, 0.2);
  EXPECT_TRUE(wait_for([&] { return log.was_removed("early"); }, 1));

  // Join and leave through Membership: the lease revoked on stop.
  auto m = Membership::start(params(etcd), [] { return sample("member", "both", 9200); });
  ASSERT_TRUE(m.ok());
  t = latency([&] { return dir.get("member").has_value(); }, 3);
  EXPECT_GE(t, 0);
  auto t0 = Clock::now();
  (*m)->stop();
  t = latency([&] { return !dir.get("member").has_value(); }, 2);
  EXPECT_GE(t, 0);
  EXPECT_LT(seconds_since(t0), 0.5);  // the revoke itself plus the watch
  EXPECT_TRUE(wait_for([&] { return log.was_removed("member"); }, 1));
  EXPECT_EQ(log.ids(), ids_of(dir.instances()));
  EXPECT_EQ(ids_of(dir.instances()), std::set<std::string>{"late"});

  // A value turning bad is a removal; a key changing nothing else is not an instance.
  ASSERT_TRUE(c.put(instance_key("test", "late"), "{broken").ok());
  EXPECT_TRUE(wait_for([&] { return log.was_removed("late"); }, 1));
  EXPECT_TRUE(dir.instances().empty());
  DirectoryStats st = dir.stats();
  EXPECT_EQ(st.lists, 1);  // everything came by the watch
  EXPECT_EQ(st.watches, 1);
  EXPECT_GT(st.events, 0);
  EXPECT_EQ(st.stalls, 0);
}

TEST(ClusterDirectory, RecoversAfterEtcdRestartAndReLists) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(put_instance(c, sample("a", "decode", 9000)).ok());
  ASSERT_TRUE(put_instance(c, sample("b", "decode", 9100)).ok());
  auto d = Directory::start(dir_params(etcd.endpoint()));
  ASSERT_TRUE(d.ok());
  Directory& dir = **d;
  ChangeLog log;
  dir.on_change(log.fn());
  ASSERT_EQ(dir.instances().size(), 2u);
  ASSERT_TRUE(wait_for([&] { return dir.stats().watches == 1; }, 2));

  // Down: noticed at once (the watch breaks), the last good list stays.
  etcd.kill();
  EXPECT_TRUE(wait_for([&] { return !dir.etcd_ok(); }, 1));
  EXPECT_EQ(dir.instances().size(), 2u);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // a few failed re-reads
  EXPECT_EQ(dir.instances().size(), 2u);

  // Back with the same data: re-read, watching again.
  int64_t lists = dir.stats().lists;
  ASSERT_TRUE(etcd.start());
  EXPECT_TRUE(wait_for([&] { return dir.etcd_ok(); }, 2.5));  // backoff is at most 1 s
  EXPECT_GT(dir.stats().lists, lists);
  EXPECT_TRUE(wait_for([&] { return dir.stats().watches >= 2; }, 1));
  ASSERT_TRUE(put_instance(c, sample("c", "prefill", 9200)).ok());
  double t = latency([&] { return dir.get("c").has_value(); }, 2);
  EXPECT_GE(t, 0);
  EXPECT_LT(t, 0.2);
  EXPECT_EQ(ids_of(dir.instances()), (std::set<std::string>{"a", "b", "c"}));

  // Back empty (data lost, revisions start over): the re-read empties the view and the
  // callback says who left.
  etcd.kill();
  etcd.wipe();
  ASSERT_TRUE(wait_for([&] { return !dir.etcd_ok(); }, 1));
  ASSERT_TRUE(etcd.start());
  EXPECT_TRUE(wait_for([&] { return dir.etcd_ok() && dir.instances().empty(); }, 2.5));
  EXPECT_TRUE(wait_for([&] { return log.was_removed("a") && log.was_removed("b") && log.was_removed("c"); }, 1));
  ASSERT_TRUE(put_instance(c, sample("d", "both", 9300)).ok());
  EXPECT_TRUE(wait_for([&] { return dir.get("d").has_value(); }, 1));
  EXPECT_EQ(log.ids(), std::set<std::string>{"d"});
}

TEST(ClusterDirectory, RapidChangesEndInTheExactSet) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  auto d = Directory::start(dir_params(etcd.endpoint()));
  ASSERT_TRUE(d.ok());
  Directory& dir = **d;
  ChangeLog log;
  dir.on_change(log.fn());
  // Two writers, each with its own ids, adding and removing at random as fast as etcd takes it.
  std::map<std::string, bool> expect[2];
  std::atomic<int> failures{0};
  auto writer = [&](int w) {
    EtcdClient c({etcd.endpoint()});
    std::mt19937 rng(1234 + w);
    for (int op = 0; op < 300; ++op) {
      char id_buf[32];  // (not string concatenation: GCC 12 warns falsely about it here)
      std::snprintf(id_buf, sizeof id_buf, "w%d-%u", w, static_cast<unsigned>(rng() % 40));
      const std::string id = id_buf;
      bool add = rng() % 3 != 0;
      Status s = add ? put_instance(c, sample(id, "decode", 9000 + op)) : c.del(instance_key("test", id));
      if (!s.ok()) failures++;
      expect[w][id] = add;
    }
  };
  std::thread w0(writer, 0), w1(writer, 1);
  w0.join();
  w1.join();
  ASSERT_EQ(failures.load(), 0);
  std::set<std::string> want;
  for (auto& e : expect)
    for (auto& [id, present] : e)
      if (present) want.insert(id);
  EXPECT_TRUE(wait_for([&] { return ids_of(dir.instances()) == want; }, 2));
  EXPECT_EQ(ids_of(dir.instances()), want);
  EXPECT_EQ(log.ids(), want);  // the callbacks add up to the same
  EtcdClient c({etcd.endpoint()});
  EXPECT_EQ(ids_of(list(c)), want);
  EXPECT_EQ(dir.stats().lists, 1);
  EXPECT_EQ(dir.stats().stalls, 0);
}

TEST(ClusterDirectory, SafetyNetRestartsAStuckWatchAndNoticesAHungEtcd) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  FreezingProxy proxy(etcd.port());
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(put_instance(c, sample("a", "decode", 9000)).ok());
  auto d = Directory::start(dir_params(proxy.endpoint(), 0.3));
  ASSERT_TRUE(d.ok());
  Directory& dir = **d;
  ASSERT_TRUE(wait_for([&] { return dir.stats().watches == 1; }, 2));

  // The watch's connection goes silent while etcd is fine: the safety net sees the view miss a
  // change at two checks in a row and restarts the watch.
  proxy.freeze_open_connections();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the pumps see it
  ASSERT_TRUE(put_instance(c, sample("b", "decode", 9100)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(dir.get("b").has_value());
  EXPECT_TRUE(wait_for([&] { return dir.get("b").has_value(); }, 3));
  EXPECT_GE(dir.stats().stalls, 1);
  EXPECT_TRUE(dir.etcd_ok());
  EXPECT_TRUE(wait_for([&] { return dir.stats().watches >= 2; }, 1));
  ASSERT_TRUE(c.del(instance_key("test", "a")).ok());
  EXPECT_TRUE(wait_for([&] { return !dir.get("a").has_value(); }, 0.5));  // by the new watch

  // A hung etcd (connections open, nothing answers): etcd_ok() turns false, the list stays.
  etcd.pause();
  EXPECT_TRUE(wait_for([&] { return !dir.etcd_ok(); }, 3));
  EXPECT_EQ(ids_of(dir.instances()), std::set<std::string>{"b"});
  etcd.resume();
  EXPECT_TRUE(wait_for([&] { return dir.etcd_ok(); }, 4));
  ASSERT_TRUE(put_instance(c, sample("c", "decode", 9200)).ok());
  EXPECT_TRUE(wait_for([&] { return dir.get("c").has_value(); }, 2));

  // The destructor does not wait for the hung etcd.
  etcd.pause();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto t0 = Clock::now();
  d->reset();
  EXPECT_LT(seconds_since(t0), 1.0);
  etcd.resume();
}

TEST(ClusterDirectory, DestructorIsPrompt) {
  SKIP_WITHOUT_ETCD();
  START_ETCD(etcd);
  EtcdClient c({etcd.endpoint()});
  ASSERT_TRUE(put_instance(c, sample("a", "decode", 9000)).ok());
  // Watching (blocked on an idle stream).
  for (int i = 0; i < 3; ++i) {
    auto d = Directory::start(dir_params(etcd.endpoint()));
    ASSERT_TRUE(d.ok());
    ASSERT_TRUE(wait_for([&] { return (*d)->stats().watches == 1; }, 2));
    std::this_thread::sleep_for(std::chrono::milliseconds(50 * i));
    auto t0 = Clock::now();
    d->reset();
    EXPECT_LT(seconds_since(t0), 0.2);
  }
  // Right after start (the watch may be connecting).
  for (int i = 0; i < 5; ++i) {
    auto d = Directory::start(dir_params(etcd.endpoint()));
    ASSERT_TRUE(d.ok());
    auto t0 = Clock::now();
    d->reset();
    EXPECT_LT(seconds_since(t0), 0.2);
  }
  // etcd down: re-reading with a backoff.
  auto d = Directory::start(dir_params(etcd.endpoint()));
  ASSERT_TRUE(d.ok());
  etcd.kill();
  ASSERT_TRUE(wait_for([&] { return !(*d)->etcd_ok(); }, 1));
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  auto t0 = Clock::now();
  d->reset();
  EXPECT_LT(seconds_since(t0), 0.2);
}

}  // namespace
}  // namespace larder::cluster
