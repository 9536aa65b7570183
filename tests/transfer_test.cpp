// KV transfer engine (src/transfer): two engines in one process and in two processes (the test binary
// re-executes itself as a target when LARDER_TRANSFER_CHILD is set). Writes and reads of many segments
// verified byte for byte, notify ordered after writes, deadlines, cancel, a peer that dies mid-transfer,
// and bad input. Whatever transport UCX picks runs here (UCX_TLS=tcp forces TCP).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "transfer/transfer.h"

using namespace larder;
using namespace larder::transfer;
using Clock = std::chrono::steady_clock;

namespace {

Clock::time_point in(double s) { return Clock::now() + std::chrono::microseconds(static_cast<int64_t>(s * 1e6)); }

void fill(std::vector<uint8_t>& v, uint64_t seed) {
  std::mt19937_64 r(seed);
  for (size_t i = 0; i + 8 <= v.size(); i += 8) {
    uint64_t x = r();
    std::memcpy(&v[i], &x, 8);
  }
}

uint64_t fnv(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// Non-overlapping segments of 1 B .. 64 KiB at scattered offsets in both regions (64 KiB slots).
std::vector<Segment> scatter(size_t region_bytes, int n, uint64_t seed) {
  std::mt19937_64 r(seed);
  size_t slots = region_bytes >> 16;
  std::vector<size_t> ls(slots), rs(slots);
  for (size_t i = 0; i < slots; i++) ls[i] = rs[i] = i;
  std::shuffle(ls.begin(), ls.end(), r);
  std::shuffle(rs.begin(), rs.end(), r);
  std::vector<Segment> segs;
  for (int i = 0; i < n && static_cast<size_t>(i) < slots; i++) {
    uint64_t bytes = 1 + r() % (1u << 16);
    if (i % 5 == 0) bytes = 1u << 16;  // whole blocks too
    uint64_t lo = r() % ((1u << 16) - bytes + 1), ro = r() % ((1u << 16) - bytes + 1);
    segs.push_back({(ls[i] << 16) + lo, (rs[i] << 16) + ro, bytes});
  }
  return segs;
}

std::unique_ptr<Engine> engine() {
  auto e = Engine::create({});
  EXPECT_TRUE(e.ok()) << e.error();
  return std::move(e.value());
}

int reg(Engine& e, std::vector<uint8_t>& v) {
  auto r = e.register_memory(v.data(), v.size());
  EXPECT_TRUE(r.ok()) << r.error();
  return r.ok() ? r.value() : -1;
}

std::string desc(Engine& e, int region) {
  auto d = e.describe(region);
  EXPECT_TRUE(d.ok()) << d.error();
  return d.ok() ? d.value() : "";
}

// ---- the child process: a target engine with a region of pattern 7; prints "address desc";
// notify key 1 (payload "parent_address expected_hash") -> replies key 2 "ok" or "mismatch"; exits on
// stdin EOF.
int child_main(size_t bytes) {
  std::vector<uint8_t> mem(bytes);  // before the engine: its notify handler reads it
  fill(mem, 7);
  auto e = Engine::create({});
  if (!e.ok()) {
    std::fprintf(stderr, "child: %s\n", e.error().c_str());
    return 2;
  }
  auto& eng = *e.value();
  auto id = eng.register_memory(mem.data(), mem.size());
  if (!id.ok()) return 3;
  eng.set_notify_handler([&](uint64_t key, std::string payload) {
    if (key != 1) return;
    char addr[256];
    unsigned long long want = 0;
    if (std::sscanf(payload.c_str(), "%255s %llu", addr, &want) != 2) return;
    bool ok = fnv(mem.data(), mem.size()) == want;
    eng.notify(addr, 2, ok ? "ok" : "mismatch", in(5));
  });
  // UCX logs to stdout too: the parent looks for this line.
  std::printf("LARDER_CHILD %s %s\n", eng.address().c_str(), eng.describe(id.value()).value().c_str());
  std::fflush(stdout);
  char c;
  while (::read(0, &c, 1) > 0) {
  }
  return 0;
}

[[maybe_unused]] const int g_child = [] {
  if (const char* m = std::getenv("LARDER_TRANSFER_CHILD")) _exit(child_main(std::strtoull(m, nullptr, 10)));
  return 0;
}();

struct Child {
  pid_t pid = -1;
  int to = -1, from = -1;
  std::string address, desc;

  bool spawn(size_t bytes) {
    int in_p[2], out_p[2];
    if (pipe2(in_p, O_CLOEXEC) || pipe2(out_p, O_CLOEXEC)) return false;
    std::vector<std::string> env_s;
    for (char** e = environ; *e; e++) env_s.push_back(*e);
    env_s.push_back("LARDER_TRANSFER_CHILD=" + std::to_string(bytes));
    std::vector<char*> envp;
    for (auto& s : env_s) envp.push_back(s.data());
    envp.push_back(nullptr);
    char self[] = "/proc/self/exe";
    char* argv[] = {self, nullptr};
    pid = fork();
    if (pid == 0) {  // only async-signal-safe calls until exec
      dup2(in_p[0], 0);
      dup2(out_p[1], 1);
      execve(self, argv, envp.data());
      _exit(127);
    }
    close(in_p[0]);
    close(out_p[1]);
    to = in_p[1];
    from = out_p[0];
    std::string line;
    const std::string tag = "LARDER_CHILD ";
    for (auto until = in(10); Clock::now() < until && line.compare(0, tag.size(), tag) != 0;) {
      line.clear();
      for (char c = 0; c != '\n' && Clock::now() < until;) {
        pollfd p{from, POLLIN, 0};
        if (poll(&p, 1, 100) <= 0) continue;
        if (::read(from, &c, 1) != 1) return false;
        if (c != '\n') line += c;
      }
    }
    if (line.compare(0, tag.size(), tag) != 0) return false;
    line = line.substr(tag.size());
    size_t sp = line.find(' ');
    if (sp == std::string::npos) return false;
    address = line.substr(0, sp);
    desc = line.substr(sp + 1);
    return true;
  }
  void kill9() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      pid = -1;
    }
  }
  ~Child() {
    if (to >= 0) close(to);  // EOF: the child exits
    if (from >= 0) close(from);
    if (pid > 0) {
      for (int i = 0; i < 50 && waitpid(pid, nullptr, WNOHANG) == 0; i++) usleep(100000);
      kill9();
    }
  }
};

}  // namespace

TEST(TransferLoopback, WriteAndReadManySegmentsOfVariedSizes) {
  auto a = engine(), b = engine();
  const size_t n = 8 << 20;
  std::vector<uint8_t> src(n), dst(n), back(n);
  fill(src, 1);
  fill(dst, 2);
  int rs = reg(*a, src), rb = reg(*a, back), rd = reg(*b, dst);
  auto segs = scatter(n, 100, 3);
  std::vector<uint8_t> want = dst;
  for (auto& s : segs) std::memcpy(&want[s.remote_offset], &src[s.local_offset], s.bytes);

  auto w = a->write(b->address(), desc(*b, rd), rs, segs, in(5));
  ASSERT_TRUE(w->wait().ok()) << w->status().error();
  EXPECT_TRUE(dst == want);
  uint64_t total = 0;
  for (auto& s : segs) total += s.bytes;
  EXPECT_EQ(w->bytes(), total);
  EXPECT_GT(w->seconds(), 0);

  // Read them back into other places: swap the roles of the offsets.
  std::vector<Segment> rsegs;
  for (auto& s : segs) rsegs.push_back({s.local_offset, s.remote_offset, s.bytes});
  auto r = a->read(b->address(), desc(*b, rd), rb, rsegs, in(5));
  ASSERT_TRUE(r->wait().ok()) << r->status().error();
  for (auto& s : segs) ASSERT_EQ(0, std::memcmp(&back[s.local_offset], &src[s.local_offset], s.bytes));

  // Segments larger than the engine's 4 MiB chunk, and many ops in flight at once.
  std::vector<std::shared_ptr<Op>> ops;
  fill(src, 4);
  ops.push_back(a->write(b->address(), desc(*b, rd), rs, {{0, 0, 6 << 20}}, in(5)));
  for (uint64_t off = 6 << 20; off < n; off += 256 << 10)
    ops.push_back(a->write(b->address(), desc(*b, rd), rs, {{off, off, 256 << 10}}, in(5)));
  for (auto& op : ops) ASSERT_TRUE(op->wait().ok()) << op->status().error();
  EXPECT_TRUE(src == dst);
  auto st = a->stats();
  EXPECT_EQ(st.ops, 2 + static_cast<int64_t>(ops.size()));
  EXPECT_EQ(st.in_flight, 0);
  EXPECT_EQ(st.failures, 0);
  EXPECT_EQ(st.peers, 1);
}

TEST(TransferLoopback, ContiguousRunsAndOddSegments) {
  auto a = engine(), b = engine();
  const size_t n = 16 << 20;
  std::vector<uint8_t> src(n), dst(n, 0), back(n, 0);
  fill(src, 12);
  int rs = reg(*a, src), rb = reg(*a, back), rd = reg(*b, dst);
  std::vector<Segment> segs;
  uint64_t lo = 0, ro = 0;
  auto add = [&](uint64_t l, uint64_t r, uint64_t bytes) {
    segs.push_back({l, r, bytes});
    lo = l + bytes;
    ro = r + bytes;
  };
  for (int i = 0; i < 10; i++) add(lo, ro, 1000 + i);  // a run, contiguous on both sides
  add(lo, ro + 4096, 777);                             // contiguous here, not there
  add(lo + 8192, ro, 555);                             // and the other way round
  add(lo, ro, 0);                                      // empty
  add(lo, ro, 6 << 20);                                // more than one request's worth
  add(lo, ro, 3 << 20);                                // contiguous with it
  for (int i = 0; i < 300; i++) add(lo, ro, 4096);     // many blocks in a row
  ASSERT_LE(std::max(lo, ro), n);
  std::vector<uint8_t> want(n, 0);
  for (auto& sg : segs) std::memcpy(&want[sg.remote_offset], &src[sg.local_offset], sg.bytes);
  auto w = a->write(b->address(), desc(*b, rd), rs, segs, in(5));
  ASSERT_TRUE(w->wait().ok()) << w->status().error();
  EXPECT_TRUE(dst == want);
  auto r = a->read(b->address(), desc(*b, rd), rb, segs, in(5));  // the same places back
  ASSERT_TRUE(r->wait().ok()) << r->status().error();
  for (auto& sg : segs) ASSERT_EQ(0, std::memcmp(&back[sg.local_offset], &src[sg.local_offset], sg.bytes));
}

TEST(TransferLoopback, MemoryAllocatedByTheEngine) {
  auto a = engine(), b = engine();
  const size_t n = 4 << 20;
  auto al = b->allocate_memory(n);
  ASSERT_TRUE(al.ok()) << al.error();
  auto* dst = static_cast<uint8_t*>(al.value().base);
  std::memset(dst, 0, n);
  std::vector<uint8_t> src(n), back(n, 0), want(n, 0);
  fill(src, 8);
  int rs = reg(*a, src), rb = reg(*a, back);
  auto segs = scatter(n, 40, 10);
  for (auto& s : segs) std::memcpy(&want[s.remote_offset], &src[s.local_offset], s.bytes);
  std::string d = desc(*b, al.value().region);
  auto w = a->write(b->address(), d, rs, segs, in(5));
  ASSERT_TRUE(w->wait().ok()) << w->status().error();
  EXPECT_EQ(0, std::memcmp(dst, want.data(), n));
  auto r = a->read(b->address(), d, rb, {{0, 0, n}}, in(5));
  ASSERT_TRUE(r->wait().ok()) << r->status().error();
  EXPECT_TRUE(back == want);
  EXPECT_TRUE(b->unregister_memory(al.value().region).ok());
  EXPECT_FALSE(b->allocate_memory(0).ok());
}

TEST(TransferLoopback, NotifyArrivesAfterEveryEarlierWrite) {
  const size_t n = 16 << 20;
  std::vector<uint8_t> src(n), dst(n, 0);
  fill(src, 5);
  std::atomic<int> got{0};
  std::atomic<bool> complete{false};
  auto a = engine(), b = engine();  // after what b's notify handler uses
  int rs = reg(*a, src), rd = reg(*b, dst);
  std::string d = desc(*b, rd);
  b->set_notify_handler([&](uint64_t key, std::string payload) {
    // Runs on b's engine thread as soon as the message lands: every byte must be there already.
    complete = key == 42 && payload == "layer-done" && std::memcmp(src.data(), dst.data(), n) == 0;
    got++;
  });
  std::vector<std::shared_ptr<Op>> ops;
  for (size_t layer = 0; layer < 16; layer++) {  // one op per "layer", not waited for
    std::vector<Segment> segs;
    for (size_t blk = 0; blk < 64; blk++) {
      uint64_t off = (layer * 64 + blk) * 16384;
      segs.push_back({off, off, 16384});
    }
    ops.push_back(a->write(b->address(), d, rs, std::move(segs), in(10)));
  }
  auto note = a->notify(b->address(), 42, "layer-done", in(10));
  ASSERT_TRUE(note->wait().ok()) << note->status().error();
  for (auto& op : ops) EXPECT_TRUE(op->done() && op->status().ok());
  auto until = in(5);
  while (got == 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(got, 1);
  EXPECT_TRUE(complete);
}

TEST(TransferLoopback, DeadlineExpiresAndEngineStaysUsable) {
  auto a = engine(), b = engine();
  const size_t n = 64 << 20;
  std::vector<uint8_t> src(n, 1), dst(n, 0);
  int rs = reg(*a, src), rd = reg(*b, dst);
  std::string d = desc(*b, rd);
  std::vector<Segment> segs, huge;
  for (size_t off = 0; off < n; off += 65536) segs.push_back({off, off, 65536});
  for (int rep = 0; rep < 16; rep++) huge.insert(huge.end(), segs.begin(), segs.end());  // 1 GiB
  auto t0 = Clock::now();
  auto w = a->write(b->address(), d, rs, huge, in(0.002));
  Status st = w->wait();
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().find("timed out"), std::string::npos) << st.error();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);
  EXPECT_EQ(a->stats().timeouts, 1);
  // wait_until: the op keeps running past the waiter's time.
  auto w2 = a->write(b->address(), d, rs, segs, in(30));
  Status early = w2->wait_until(Clock::now());
  if (!w2->done()) {
    EXPECT_EQ(early.error(), "timed out waiting");
  }
  EXPECT_TRUE(w2->wait().ok()) << w2->status().error();
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), n));
}

TEST(TransferLoopback, CancelCompletesWithCancelled) {
  auto a = engine(), b = engine();
  const size_t n = 64 << 20;
  std::vector<uint8_t> src(n, 1), dst(n, 0);
  int rs = reg(*a, src), rd = reg(*b, dst);
  std::vector<Segment> segs;
  for (size_t rep = 0; rep < 16; rep++)  // 1 GiB
    for (size_t off = 0; off < n; off += 1 << 20) segs.push_back({off, off, 1 << 20});
  auto w = a->write(b->address(), desc(*b, rd), rs, segs, in(30));
  std::atomic<int> calls{0};
  std::string seen;
  w->on_done([&](const Status& s) {
    seen = s.error();
    calls++;
  });
  w->cancel();
  Status st = w->wait();
  EXPECT_EQ(st.error(), "cancelled");
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen, "cancelled");
  w->on_done([&](const Status&) { calls++; });  // already done: runs at once
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(a->stats().cancelled, 1);
  // The region is free again and the engine works.
  auto ok = a->write(b->address(), desc(*b, rd), rs, {{0, 0, 4096}}, in(5));
  EXPECT_TRUE(ok->wait().ok()) << ok->status().error();
}

TEST(TransferLoopback, PeerDestroyedMidTransferFailsTheOp) {
  auto a = engine();
  auto b = engine();
  const size_t n = 64 << 20;
  std::vector<uint8_t> src(n, 1), dst(n, 0);
  int rs = reg(*a, src), rd = reg(*b, dst);
  std::string addr = b->address(), d = desc(*b, rd);
  ASSERT_TRUE(a->write(addr, d, rs, {{0, 0, 4096}}, in(5))->wait().ok());
  std::vector<Segment> segs;
  for (size_t rep = 0; rep < 64; rep++) segs.push_back({0, 0, n});  // 4 GiB: seconds of work
  auto w = a->write(addr, d, rs, segs, in(60));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto t0 = Clock::now();
  b.reset();
  Status st = w->wait_until(in(10));
  ASSERT_TRUE(w->done()) << "no error after the peer went away";
  EXPECT_FALSE(st.ok());
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);
  // A new peer works (and the dead one fails fast rather than hanging).
  auto c = engine();
  std::vector<uint8_t> dst2(1 << 20, 0);
  int rc = reg(*c, dst2);
  auto ok = a->write(c->address(), desc(*c, rc), rs, {{0, 0, 1 << 20}}, in(5));
  EXPECT_TRUE(ok->wait().ok()) << ok->status().error();
  EXPECT_EQ(0, std::memcmp(src.data(), dst2.data(), dst2.size()));
  auto dead = a->write(addr, d, rs, {{0, 0, 4096}}, in(5));
  EXPECT_FALSE(dead->wait().ok());
}

TEST(TransferErrors, BadDescriptorsSegmentsRegionsAndPeers) {
  auto a = engine(), b = engine();
  std::vector<uint8_t> src(1 << 20, 1), dst(1 << 20, 0);
  int rs = reg(*a, src), rd = reg(*b, dst);
  std::string d = desc(*b, rd);
  auto err = [&](const std::string& peer, const std::string& dd, int region, std::vector<Segment> segs) {
    auto op = a->write(peer, dd, region, std::move(segs), in(5));
    Status st = op->wait();
    EXPECT_FALSE(st.ok());
    return st.error();
  };
  std::string addr = b->address();
  EXPECT_NE(err(addr, "hello", rs, {{0, 0, 8}}).find("not a Larder transfer descriptor"), std::string::npos);
  EXPECT_NE(err(addr, "", rs, {{0, 0, 8}}).find("not a Larder"), std::string::npos);
  std::string flipped = d;
  flipped[flipped.size() - 12] = flipped[flipped.size() - 12] == 'A' ? 'B' : 'A';  // in the rkey
  EXPECT_NE(err(addr, flipped, rs, {{0, 0, 8}}).find("corrupt"), std::string::npos);
  EXPECT_NE(err(addr, d.substr(0, d.size() - 7), rs, {{0, 0, 8}}).find("corrupt"), std::string::npos);
  EXPECT_NE(err(addr, d + "!", rs, {{0, 0, 8}}).find("corrupt"), std::string::npos);
  EXPECT_NE(err(addr, d, rs, {{(1 << 20) - 4, 0, 8}}).find("local range"), std::string::npos);
  EXPECT_NE(err(addr, d, rs, {{0, 1 << 20, 1}}).find("remote range"), std::string::npos);
  EXPECT_NE(err(addr, d, rs, {{0, 8, ~0ull}}).find("outside"), std::string::npos);
  EXPECT_NE(err(addr, d, 999, {{0, 0, 8}}).find("unknown local region"), std::string::npos);
  EXPECT_NE(err("nonsense", d, rs, {{0, 0, 8}}).find("bad peer address"), std::string::npos);
  // Nobody listens there: fails, quickly.
  auto t0 = Clock::now();
  err("127.0.0.1:1", d, rs, {{0, 0, 8}});
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 4.0);
  EXPECT_FALSE(a->describe(999).ok());
  EXPECT_FALSE(a->unregister_memory(999).ok());
  EXPECT_FALSE(a->register_memory(nullptr, 10).ok());
  EXPECT_NE(a->notify(addr, 1, std::string(2 << 20, 'x'), in(5))->wait().error().find("exceeds"), std::string::npos);
  // An unregistered region is unknown afterwards; nothing is wedged.
  std::vector<uint8_t> tmp(4096, 3);
  int rt = reg(*a, tmp);
  EXPECT_TRUE(a->unregister_memory(rt).ok());
  EXPECT_NE(err(addr, d, rt, {{0, 0, 8}}).find("unknown local region"), std::string::npos);
  auto ok = a->write(addr, d, rs, {{0, 0, 1 << 20}}, in(5));
  EXPECT_TRUE(ok->wait().ok()) << ok->status().error();
  EXPECT_EQ(dst, src);
  EXPECT_GE(a->stats().failures, 12);
}

TEST(TransferProcess, WriteReadAndNotifyAcrossProcesses) {
  const size_t n = 4 << 20;
  Child child;
  ASSERT_TRUE(child.spawn(n)) << "child did not start";
  std::atomic<int> answer{0};
  std::string reply;
  auto a = engine();  // after what its notify handler uses
  std::vector<uint8_t> mine(n), back(n, 0), expect(n);
  fill(mine, 11);
  fill(expect, 7);  // the child's initial contents
  int rm = reg(*a, mine), rb = reg(*a, back);
  // Read all of the child's region in scattered pieces.
  std::vector<Segment> all;
  for (size_t off = 0; off < n; off += 65536) all.push_back({off, off, 65536});
  std::shuffle(all.begin(), all.end(), std::mt19937_64(1));
  auto r = a->read(child.address, child.desc, rb, all, in(5));
  ASSERT_TRUE(r->wait().ok()) << r->status().error();
  EXPECT_TRUE(back == expect);
  // Write scattered segments, then notify; the child checks its memory and answers.
  auto segs = scatter(n, 50, 9);
  for (auto& s : segs) std::memcpy(&expect[s.remote_offset], &mine[s.local_offset], s.bytes);
  a->set_notify_handler([&](uint64_t key, std::string payload) {
    reply = payload;
    answer = static_cast<int>(key);
  });
  auto w = a->write(child.address, child.desc, rm, segs, in(5));
  std::string msg = a->address() + " " + std::to_string(fnv(expect.data(), n));
  auto note = a->notify(child.address, 1, msg, in(5));
  ASSERT_TRUE(note->wait().ok()) << note->status().error();
  EXPECT_TRUE(w->done() && w->status().ok());
  auto until = in(5);
  while (answer == 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(answer, 2);
  EXPECT_EQ(reply, "ok");
}

TEST(TransferProcess, KilledPeerFailsTheOpWithinSeconds) {
  const size_t n = 64 << 20;
  Child child;
  ASSERT_TRUE(child.spawn(n)) << "child did not start";
  auto a = engine();
  std::vector<uint8_t> mine(n, 5);
  int rm = reg(*a, mine);
  ASSERT_TRUE(a->write(child.address, child.desc, rm, {{0, 0, 4096}}, in(5))->wait().ok());
  std::vector<Segment> segs;
  for (size_t rep = 0; rep < 64; rep++) segs.push_back({0, 0, n});  // 4 GiB
  auto w = a->write(child.address, child.desc, rm, segs, in(60));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  auto t0 = Clock::now();
  child.kill9();
  Status st = w->wait_until(in(10));
  ASSERT_TRUE(w->done()) << "op hangs after the peer was killed";
  EXPECT_FALSE(st.ok());
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);
  // The next op to a new peer works.
  Child second;
  ASSERT_TRUE(second.spawn(1 << 20));
  auto ok = a->write(second.address, second.desc, rm, {{0, 0, 1 << 20}}, in(5));
  EXPECT_TRUE(ok->wait().ok()) << ok->status().error();
}

TEST(TransferProcess, StoppedPeerTimesOutAndOtherPeersKeepWorking) {
  const size_t n = 64 << 20;
  Child stuck, fine;
  ASSERT_TRUE(stuck.spawn(n) && fine.spawn(1 << 20)) << "child did not start";
  auto a = engine();
  std::vector<uint8_t> mine(n, 5);
  int rm = reg(*a, mine);
  ASSERT_TRUE(a->write(stuck.address, stuck.desc, rm, {{0, 0, 4096}}, in(5))->wait().ok());
  kill(stuck.pid, SIGSTOP);  // alive, connected, but never answers
  std::vector<Segment> segs;
  for (int rep = 0; rep < 4; rep++) segs.push_back({0, 0, n});
  auto t0 = Clock::now();
  auto w = a->write(stuck.address, stuck.desc, rm, segs, in(0.5));
  auto other = a->write(fine.address, fine.desc, rm, {{0, 0, 1 << 20}}, in(5));
  EXPECT_TRUE(other->wait().ok()) << other->status().error();
  Status st = w->wait_until(in(10));
  ASSERT_TRUE(w->done()) << "op hangs on a stopped peer";
  EXPECT_NE(st.error().find("timed out"), std::string::npos) << st.error();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 4.0);
  kill(stuck.pid, SIGCONT);
  stuck.kill9();
}
