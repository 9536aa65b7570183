// larder-bench-transfer: KV transfer engine throughput and op latency between two processes.
// By default it forks a target process (before any UCX state exists) and drives it from the parent;
// --server / --client ADDR run the two sides on two hosts or network namespaces. For every op kind,
// block size, batch (blocks per op) and number of submitting threads it reports GB/s and p50/p99 op
// latency (submit -> completion, up to `--depth` ops and `--inflight` bytes in flight per thread),
// next to memcpy of the same blocks in one process. Blocks sit at the same offsets on both sides,
// scattered over --region (or --contiguous: an op's blocks back to back, which the engine sends as
// one request). --ucx-alloc: the target's region comes from Engine::allocate_memory (UCX's shared
// memory: peers on the host write it directly) instead of registered heap memory.
//   larder-bench-transfer [--sizes 4K,16K,64K,256K,1M,4M] [--batches 1,16,64] [--threads 1,2]
//                         [--ops write,read] [--depth 8] [--inflight 64M] [--seconds 0.25] [--region 256M]
//                         [--contiguous] [--ucx-alloc] [--json]
//   larder-bench-transfer --server [--host IP] [--port P] [--region 256M] [--ucx-alloc]
//   larder-bench-transfer --client IP:PORT [--host MY_IP] [options as above]
// UCX_TLS (UCX's own) chooses the transport, e.g. UCX_TLS=tcp.
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transfer/transfer.h"

using namespace larder;
using namespace larder::transfer;
using Clock = std::chrono::steady_clock;

namespace {

enum : uint64_t { kHello = 1, kDesc = 2, kBye = 3 };

struct Opts {
  std::vector<uint64_t> sizes{4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20};
  std::vector<int> batches{1, 16, 64}, threads{1, 2};
  std::vector<std::string> ops{"write", "read"};
  int depth = 8;
  double seconds = 0.25;
  uint64_t region = 256ull << 20, inflight = 64ull << 20;
  bool json = false, server = false, ucx_alloc = false, contiguous = false;
  FILE* json_out = stdout;
  std::string client, host = "127.0.0.1";
  int port = 0;
};

uint64_t parse_size(const std::string& s) {
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  switch (*end) {
    case 'K': case 'k': v *= 1024; break;
    case 'M': case 'm': v *= 1024 * 1024; break;
    case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
    default: break;
  }
  return static_cast<uint64_t>(v);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    size_t e = s.find(',', b);
    if (e == std::string::npos) e = s.size();
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

std::string human(uint64_t b) {
  char buf[32];
  if (b >= (1u << 20) && b % (1u << 20) == 0) std::snprintf(buf, sizeof buf, "%lluM", (unsigned long long)(b >> 20));
  else if (b >= 1024 && b % 1024 == 0) std::snprintf(buf, sizeof buf, "%lluK", (unsigned long long)(b >> 10));
  else std::snprintf(buf, sizeof buf, "%llu", (unsigned long long)b);
  return buf;
}

char* alloc(uint64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 0x5a, bytes);  // fault in: the first op should not pay for it
  return static_cast<char*>(p);
}

// The target: a registered region; answers hello with its descriptor, exits on bye.
int run_server(const Opts& o, int line_fd) {
  std::mutex mu;  // before the engine: its notify handler uses them
  std::condition_variable cv;
  bool bye = false;
  std::string desc;
  auto e = Engine::create({o.host, o.port});
  if (!e.ok()) {
    std::fprintf(stderr, "larder-bench-transfer: %s\n", e.error().c_str());
    return 1;
  }
  Engine& eng = *e.value();
  Result<int> id = make_error("no region");
  if (o.ucx_alloc) {
    auto a = eng.allocate_memory(o.region);
    if (a.ok()) {
      std::memset(a.value().base, 0x5a, o.region);
      id = a.value().region;
    } else {
      id = a.take_error();
    }
  } else if (char* mem = alloc(o.region)) {
    id = eng.register_memory(mem, o.region);
  }
  if (!id.ok()) {
    std::fprintf(stderr, "larder-bench-transfer: %s\n", id.error().c_str());
    return 1;
  }
  desc = eng.describe(id.value()).value();
  eng.set_notify_handler([&](uint64_t key, std::string payload) {
    if (key == kHello) eng.notify(payload, kDesc, desc, Clock::now() + std::chrono::seconds(10));
    if (key == kBye) {
      std::lock_guard l(mu);
      bye = true;
      cv.notify_all();
    }
  });
  std::string line = "LARDER_SERVER " + eng.address() + " " + desc + "\n";
  if (::write(line_fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return 1;
  if (line_fd != 1) close(line_fd);
  std::unique_lock l(mu);
  cv.wait(l, [&] { return bye; });
  return 0;
}

struct Row {
  std::string op;
  uint64_t block = 0;
  int batch = 0, threads = 0, depth = 0;
  int64_t n_ops = 0;
  double seconds = 0, gbps = 0, p50_us = 0, p99_us = 0, memcpy_gbps = 0;
  std::string error;
};

// Block k = op_index * batch + j sits in slot k (contiguous: an op's blocks follow each other, and the
// engine sends each run as one request) or in slot k * 2654435761 (a prime) mod slots: scattered, as
// the blocks of a sequence in a used pool are.
std::vector<Segment> segments(uint64_t op_index, uint64_t block, int batch, uint64_t region, bool contiguous) {
  std::vector<Segment> v(batch);
  const uint64_t slots = region / block;
  for (int j = 0; j < batch; j++) {
    uint64_t k = op_index * batch + j;
    uint64_t off = (contiguous ? k % slots : k * 2654435761ull % slots) * block;
    v[j] = {off, off, block};
  }
  return v;
}

double memcpy_gbps(char* src, char* dst, uint64_t block, int batch, const Opts& o) {
  uint64_t bytes = 0, i = 0;
  auto t0 = Clock::now();
  double dt = 0;
  do {
    for (auto& s : segments(i++, block, batch, o.region, o.contiguous))
      std::memcpy(dst + s.remote_offset, src + s.local_offset, s.bytes);
    bytes += block * batch;
    dt = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (dt < o.seconds / 2);
  return bytes / dt / 1e9;
}

Row run_row(Engine& eng, const std::string& peer, const std::string& desc, int local, const Opts& o,
            const std::string& kind, uint64_t block, int batch, int threads) {
  Row row{kind, block, batch, threads};
  const uint64_t op_bytes = block * batch;
  // At most --inflight bytes in flight per thread, so that rows of large ops (and slow links) drain fast.
  const int depth = static_cast<int>(std::clamp<uint64_t>(o.inflight / op_bytes, 1, o.depth));
  row.depth = depth;
  std::atomic<uint64_t> next{0};
  std::mutex mu;
  std::vector<double> lat;
  std::string err;
  auto submit = [&](uint64_t i) {
    auto segs = segments(i, block, batch, o.region, o.contiguous);
    auto deadline = Clock::now() + std::chrono::seconds(60);
    return kind == "write" ? eng.write(peer, desc, local, std::move(segs), deadline)
                           : eng.read(peer, desc, local, std::move(segs), deadline);
  };
  // Warm-up: connection, rkey cache, first touch.
  for (int i = 0; i < 2; i++) {
    Status st = submit(next++)->wait();
    if (!st.ok()) {
      row.error = st.error();
      return row;
    }
  }
  std::atomic<int64_t> done_ops{0};
  auto t0 = Clock::now();
  auto until = t0 + std::chrono::microseconds(static_cast<int64_t>(o.seconds * 1e6));
  auto worker = [&] {
    std::deque<std::shared_ptr<Op>> inflight;
    std::vector<double> mine;
    int64_t count = 0;
    bool stop = false;
    while (!stop || !inflight.empty()) {
      while (!stop && static_cast<int>(inflight.size()) < depth) inflight.push_back(submit(next++));
      auto op = inflight.front();
      inflight.pop_front();
      Status st = op->wait();
      if (!st.ok()) {
        std::lock_guard l(mu);
        err = st.error();
        stop = true;
        continue;
      }
      mine.push_back(op->seconds());
      count++;
      if (Clock::now() >= until && count >= 2) stop = true;
    }
    done_ops += count;
    std::lock_guard l(mu);
    lat.insert(lat.end(), mine.begin(), mine.end());
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) ts.emplace_back(worker);
  for (auto& t : ts) t.join();
  row.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  row.error = err;
  row.n_ops = done_ops;
  row.gbps = row.n_ops * static_cast<double>(op_bytes) / row.seconds / 1e9;
  std::sort(lat.begin(), lat.end());
  if (!lat.empty()) {
    row.p50_us = lat[lat.size() / 2] * 1e6;
    row.p99_us = lat[std::min(lat.size() - 1, static_cast<size_t>(std::ceil(lat.size() * 0.99)) - 1)] * 1e6;
  }
  return row;
}

int run_client(const Opts& o, std::string peer, std::string desc) {
  std::mutex mu;  // before the engine: its notify handler uses them
  std::condition_variable cv;
  auto e = Engine::create({o.host, 0});
  if (!e.ok()) {
    std::fprintf(stderr, "larder-bench-transfer: %s\n", e.error().c_str());
    return 1;
  }
  Engine& eng = *e.value();
  if (desc.empty()) {  // --client: ask the server for its descriptor
    eng.set_notify_handler([&](uint64_t key, std::string payload) {
      std::lock_guard l(mu);
      if (key == kDesc) desc = payload;
      cv.notify_all();
    });
    Status st = eng.notify(peer, kHello, eng.address(), Clock::now() + std::chrono::seconds(10))->wait();
    std::unique_lock l(mu);
    if (!st.ok() || !cv.wait_for(l, std::chrono::seconds(10), [&] { return !desc.empty(); })) {
      std::fprintf(stderr, "larder-bench-transfer: no answer from %s: %s\n", peer.c_str(), st.ok() ? "timeout" : st.error().c_str());
      return 1;
    }
  }
  char* local = alloc(o.region);
  char* scratch = alloc(o.region);
  if (!local || !scratch) return 1;
  auto id = eng.register_memory(local, o.region);
  if (!id.ok()) {
    std::fprintf(stderr, "larder-bench-transfer: %s\n", id.error().c_str());
    return 1;
  }
  const char* tls = std::getenv("UCX_TLS");
  if (!o.json) {
    std::printf("peer %s, UCX_TLS=%s, up to %d ops (%s) in flight per thread, region %s, %s blocks\n\n",
                peer.c_str(), tls ? tls : "(default)", o.depth, human(o.inflight).c_str(), human(o.region).c_str(),
                o.contiguous ? "contiguous" : "scattered");
    std::printf("| op    |  block | batch | thr | depth |   ops |   GB/s | p50 us | p99 us | memcpy GB/s |\n");
    std::printf("|-------|-------:|------:|----:|------:|------:|-------:|-------:|-------:|------------:|\n");
  }
  std::vector<Row> rows;
  for (auto& kind : o.ops)
    for (uint64_t block : o.sizes)
      for (int batch : o.batches) {
        if (block > o.region) continue;
        double mc = memcpy_gbps(local, scratch, block, batch, o);
        for (int thr : o.threads) {
          Row r = run_row(eng, peer, desc, id.value(), o, kind, block, batch, thr);
          r.memcpy_gbps = mc;
          rows.push_back(r);
          if (!o.json) {
            std::printf("| %-5s | %6s | %5d | %3d | %5d | %5lld | %6.2f | %6.0f | %6.0f | %11.2f |%s%s\n", kind.c_str(),
                        human(block).c_str(), batch, thr, r.depth, (long long)r.n_ops, r.gbps, r.p50_us, r.p99_us, mc,
                        r.error.empty() ? "" : " error: ", r.error.c_str());
            std::fflush(stdout);
          }
        }
      }
  if (o.json) {
    std::fprintf(o.json_out, "{\"peer\": \"%s\", \"ucx_tls\": \"%s\", \"depth\": %d, \"region\": %llu, \"contiguous\": %s, "
                "\"rows\": [\n",
                peer.c_str(), tls ? tls : "", o.depth, (unsigned long long)o.region, o.contiguous ? "true" : "false");
    for (size_t i = 0; i < rows.size(); i++) {
      const Row& r = rows[i];
      std::fprintf(o.json_out, "  {\"op\": \"%s\", \"block\": %llu, \"batch\": %d, \"threads\": %d, \"depth\": %d, \"ops\": %lld, "
                  "\"seconds\": %.4f, \"gbps\": %.4f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"memcpy_gbps\": %.3f, "
                  "\"error\": \"%s\"}%s\n",
                  r.op.c_str(), (unsigned long long)r.block, r.batch, r.threads, r.depth, (long long)r.n_ops, r.seconds, r.gbps,
                  r.p50_us, r.p99_us, r.memcpy_gbps, r.error.c_str(), i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(o.json_out, "]}\n");
    std::fflush(o.json_out);
  }
  auto st = eng.stats();
  if (!o.json) std::printf("\nengine: %lld ops, %.2f GB, %lld failures, %lld timeouts\n", (long long)st.ops, st.bytes / 1e9,
                           (long long)st.failures, (long long)st.timeouts);
  (void)eng.notify(peer, kBye, "", Clock::now() + std::chrono::seconds(5))->wait();
  for (const Row& r : rows)
    if (!r.error.empty()) return 1;
  return 0;
}

int usage() {
  std::fprintf(stderr,
               "usage: larder-bench-transfer [--sizes LIST] [--batches LIST] [--threads LIST] [--ops write,read]\n"
               "         [--depth N] [--inflight SIZE] [--seconds S] [--region SIZE] [--contiguous] [--ucx-alloc]\n"
               "         [--json]\n"
               "       larder-bench-transfer --server [--host IP] [--port P] [--region SIZE] [--ucx-alloc]\n"
               "       larder-bench-transfer --client IP:PORT [--host MY_IP] [options]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto val = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--sizes") {
      o.sizes.clear();
      for (auto& s : split(val())) o.sizes.push_back(parse_size(s));
    } else if (a == "--batches") {
      o.batches.clear();
      for (auto& s : split(val())) o.batches.push_back(std::atoi(s.c_str()));
    } else if (a == "--threads") {
      o.threads.clear();
      for (auto& s : split(val())) o.threads.push_back(std::atoi(s.c_str()));
    } else if (a == "--ops") {
      o.ops = split(val());
    } else if (a == "--depth") {
      o.depth = std::atoi(val().c_str());
    } else if (a == "--seconds") {
      o.seconds = std::atof(val().c_str());
    } else if (a == "--inflight") {
      o.inflight = parse_size(val());
    } else if (a == "--region") {
      o.region = parse_size(val());
    } else if (a == "--contiguous") {
      o.contiguous = true;
    } else if (a == "--ucx-alloc") {
      o.ucx_alloc = true;
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--server") {
      o.server = true;
    } else if (a == "--client") {
      o.client = val();
    } else if (a == "--host") {
      o.host = val();
    } else if (a == "--port") {
      o.port = std::atoi(val().c_str());
    } else {
      return usage();
    }
  }
  for (auto& k : o.ops)
    if (k != "write" && k != "read") return usage();
  if (o.depth < 1 || o.seconds <= 0 || o.region < 4096 || o.inflight == 0 || o.sizes.empty() || o.batches.empty() || o.threads.empty())
    return usage();
  if (o.server) return run_server(o, 1);
  if (o.json) {  // UCX logs to stdout: keep the JSON alone there, everything else goes to stderr
    o.json_out = fdopen(dup(1), "w");
    if (!o.json_out || dup2(2, 1) < 0) return 1;
  }
  if (!o.client.empty()) return run_client(o, o.client, "");

  // Fork the target first: UCX state must not cross a fork.
  int fds[2];
  if (pipe(fds) != 0) return 1;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    _exit(run_server(o, fds[1]));
  }
  close(fds[1]);
  std::string line;
  char c;
  while (::read(fds[0], &c, 1) == 1 && c != '\n') line += c;
  close(fds[0]);
  const std::string tag = "LARDER_SERVER ";
  size_t sp = line.find(' ', tag.size());
  if (line.compare(0, tag.size(), tag) != 0 || sp == std::string::npos) {
    std::fprintf(stderr, "larder-bench-transfer: the target process did not start\n");
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return 1;
  }
  int rc = run_client(o, line.substr(tag.size(), sp - tag.size()), line.substr(sp + 1));
  int status = 0;
  for (int i = 0; i < 50 && waitpid(pid, &status, WNOHANG) == 0; i++) usleep(100000);
  if (waitpid(pid, &status, WNOHANG) == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  return rc;
}
