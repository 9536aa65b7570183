// src/cluster against a real etcd: each test starts its own etcd (free loopback ports, a
// temporary data dir) and removes it afterwards. Skipped when /usr/bin/etcd is missing.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
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
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
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

}  // namespace
}  // namespace larder::cluster
