// larder-bench-kvload: time to first token for a long prompt computed from scratch vs
// with its prefix loaded from the SSD tier after a restart (page cache dropped), through
// the real scheduler and KV store.
//
//   larder-bench-kvload -m MODEL [-n 4096] [-t 2] [--dir DIR]
//
// 1. scheduler with an SSD tier in DIR (emptied first): a prompt of n+1 tokens, one
//    output token: TTFT = prefill of n+1 tokens (blocks written back as they complete);
// 2. the scheduler is destroyed (write-back drained, segments fsynced) and the segment
//    files are evicted from the page cache (posix_fadvise DONTNEED), so reads hit the device;
// 3. a new scheduler on DIR, the same prompt: TTFT = loading n tokens of KV + computing 1.
// Prints both, the ratio, the bytes loaded and the load bandwidth; checks the two runs
// produce the same token.
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <string>

#include "engine/scheduler.h"
#include "model/model.h"

using namespace larder;
using Clock = std::chrono::steady_clock;

namespace {

struct Run {
  double ttft = 0;
  int32_t token = -1;
  int cached = 0;
};

Run once(Scheduler& s, const std::vector<int32_t>& prompt) {
  GenRequest r;
  r.prompt = prompt;
  r.sampling.temp = 0;
  r.max_tokens = 1;
  r.ignore_eos = true;
  Run out;
  std::promise<void> done;
  const auto t0 = Clock::now();
  bool first = true;
  auto st = s.submit(r, [&](const TokenEvent& ev) {
    if (first) {
      out.ttft = std::chrono::duration<double>(Clock::now() - t0).count();
      out.token = ev.token;
      out.cached = ev.cached_tokens;
      first = false;
    }
    if (ev.finish != FinishReason::None) done.set_value();
    return true;
  });
  if (!st.ok()) {
    std::fprintf(stderr, "larder-bench-kvload: error: %s\n", st.error().c_str());
    std::exit(1);
  }
  done.get_future().wait();
  return out;
}

void drop_page_cache(const std::string& dir) {
  for (auto& e : std::filesystem::directory_iterator(dir)) {
    int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, dir = "/tmp/larder-bench-kvload";
  int n = 4096, threads = 2;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "larder-bench-kvload: error: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "-m") model_path = next();
    else if (a == "-n") n = std::atoi(next().c_str());
    else if (a == "-t") threads = std::atoi(next().c_str());
    else if (a == "--dir") dir = next();
    else {
      std::fprintf(stderr, "usage: larder-bench-kvload -m MODEL [-n TOKENS] [-t THREADS] [--dir DIR]\n");
      return 2;
    }
  }
  if (model_path.empty() || n < 16) {
    std::fprintf(stderr, "usage: larder-bench-kvload -m MODEL [-n TOKENS] [-t THREADS] [--dir DIR]\n");
    return 2;
  }
  auto m = load_model(model_path);
  if (!m.ok()) {
    std::fprintf(stderr, "larder-bench-kvload: error: %s\n", m.error().c_str());
    return 1;
  }
  std::filesystem::remove_all(dir);
  std::vector<int32_t> prompt(n + 1);
  prompt[0] = 1;
  for (int i = 1; i <= n; ++i) prompt[i] = 3 + (i * 7919) % ((*m)->cfg.n_vocab - 3);

  SchedulerParams p;
  p.n_threads = threads;
  p.parallel = 1;
  p.max_seq_len = n + 16;
  p.step_tokens = 512;
  p.store.disk_dir = dir;
  p.store.disk_bytes = 64ull << 30;
  Run cold, warm;
  {
    auto s = Scheduler::create(**m, p);
    if (!s.ok()) {
      std::fprintf(stderr, "larder-bench-kvload: error: %s\n", s.error().c_str());
      return 1;
    }
    std::fprintf(stderr, "computing %d prompt tokens...\n", n + 1);
    cold = once(**s, prompt);
    auto fl = (*s)->flush_store();
    if (!fl.ok()) std::fprintf(stderr, "flush: %s\n", fl.error().c_str());
  }
  drop_page_cache(dir);
  kvcache::KvStoreStats ks;
  {
    auto s = Scheduler::create(**m, p);
    if (!s.ok()) return 1;
    warm = once(**s, prompt);
    ks = (*s)->stats().store;
  }
  const double bw = ks.disk_load_seconds > 0 ? ks.disk_load_bytes / ks.disk_load_seconds : 0;
  std::printf("model %s, prompt %d tokens, %d threads\n", model_path.c_str(), n + 1, threads);
  std::printf("recompute: TTFT %.3f s (%.1f prompt tokens/s)\n", cold.ttft, (n + 1) / cold.ttft);
  std::printf("load from SSD after restart: TTFT %.3f s, %d tokens cached, %.1f MiB read, %.2f GB/s per reader\n",
              warm.ttft, warm.cached, ks.disk_load_bytes / 1048576.0, bw / 1e9);
  std::printf("speed-up: %.1fx; same next token: %s\n", cold.ttft / warm.ttft, cold.token == warm.token ? "yes" : "NO");
  std::filesystem::remove_all(dir);
  return cold.token == warm.token ? 0 : 1;
}
