#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace larder {

// One persistent pool for the process: workers start once and are reused for every
// op of every token (no per-op thread start, no allocation per job).
//
// Work is split into chunks that threads claim from a shared counter, so the calling
// thread never waits for a worker that the OS has not scheduled yet: it simply does
// the remaining chunks itself and only waits for chunks a worker has already started.
// This matters on small machines where other processes share the cores.
class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls f(begin, end, tid) over chunks covering [0, n); tid < size() identifies the
  // executing thread (for per-thread scratch). Returns when every chunk is done.
  template <class F>
  void parallel_for(int64_t n, F&& f, int64_t min_chunk = 1) {
    if (n <= 0) return;
    if (n_threads_ == 1 || n <= min_chunk) {
      f(int64_t{0}, n, 0);
      return;
    }
    auto tramp = [](void* ctx, int64_t b, int64_t e, int tid) { (*static_cast<F*>(ctx))(b, e, tid); };
    dispatch(n, min_chunk, tramp, &f);
  }

 private:
  using Tramp = void (*)(void*, int64_t, int64_t, int);
  struct Slot {  // one job's parameters; indexed by generation so a late worker never mixes jobs
    std::atomic<Tramp> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> n{0};
    std::atomic<int64_t> chunk{1};
    std::atomic<uint32_t> n_chunks{0};
  };
  static constexpr uint32_t kSlots = 1024;

  void dispatch(int64_t n, int64_t min_chunk, Tramp fn, void* ctx);
  // Claims and runs chunks of generation `gen` until none are left; returns chunks run.
  uint32_t work(uint32_t gen, int tid);
  void worker(int tid);

  int n_threads_;
  std::vector<std::thread> threads_;
  Slot slots_[kSlots];
  std::atomic<uint64_t> counter_{0};  // (generation << 32) | next chunk index
  std::atomic<uint32_t> done_{0};     // chunks finished in the current generation
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

int default_thread_count();

}  // namespace larder
