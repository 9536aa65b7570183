// Read bandwidth of this machine's disk by read size and thread count: random, aligned preads of a
// file with O_DIRECT (no page cache), as the FFN offload's reader pool issues them.
//
//   larder-bench-ssd FILE [--sizes 4096,16384,...] [--threads 1,2,4,...] [--seconds 2]
// One JSON object per (size, threads) on stdout: {"size", "threads", "mb_s", "iops", "lat_us"}.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <vector>

namespace {
std::vector<long> list(const char* s) {
  std::vector<long> v;
  for (const char* p = s; *p;) {
    char* e = nullptr;
    v.push_back(std::strtol(p, &e, 10));
    p = *e ? e + 1 : e;
  }
  return v;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE [--sizes a,b,..] [--threads a,b,..] [--seconds S]\n", argv[0]);
    return 2;
  }
  const char* path = argv[1];
  std::vector<long> sizes = {512, 4096, 16384, 65536, 262144, 1048576}, threads = {1, 2, 4, 8, 16, 32};
  double seconds = 2;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--sizes") sizes = list(argv[i + 1]);
    else if (k == "--threads") threads = list(argv[i + 1]);
    else if (k == "--seconds") seconds = std::atof(argv[i + 1]);
  }
  int fd = open(path, O_RDONLY | O_DIRECT);
  if (fd < 0) {
    std::fprintf(stderr, "larder-bench-ssd: cannot open %s with O_DIRECT: %s\n", path, std::strerror(errno));
    return 1;
  }
  struct stat st{};
  fstat(fd, &st);
  const long long fsize = st.st_size;
  for (long sz : sizes)
    for (long nt : threads) {
      std::atomic<long long> ops{0};
      std::atomic<bool> stop{false}, failed{false};
      std::vector<std::thread> ts;
      const auto t0 = std::chrono::steady_clock::now();
      for (long t = 0; t < nt; ++t)
        ts.emplace_back([&, t] {
          void* buf = std::aligned_alloc(4096, (sz + 4095) / 4096 * 4096);
          std::mt19937_64 rng(1234 + t);
          const long long slots = fsize / sz;
          while (!stop.load(std::memory_order_relaxed)) {
            const long long off = static_cast<long long>(rng() % slots) * sz;
            if (pread(fd, buf, sz, off) != sz) {
              failed = true;
              break;
            }
            ops.fetch_add(1, std::memory_order_relaxed);
          }
          std::free(buf);
        });
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
      stop = true;
      for (auto& t : ts) t.join();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (failed) {
        std::fprintf(stderr, "larder-bench-ssd: read failed (size %ld not aligned for O_DIRECT?)\n", sz);
        continue;
      }
      const double iops = ops / s;
      std::printf("{\"size\": %ld, \"threads\": %ld, \"mb_s\": %.1f, \"iops\": %.0f, \"lat_us\": %.1f}\n", sz, nt,
                  iops * sz / 1e6, iops, 1e6 * nt / std::max(iops, 1.0));
      std::fflush(stdout);
    }
  close(fd);
  return 0;
}
