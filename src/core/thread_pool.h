#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace larder {

// One persistent pool for the process: workers are started once and reused for
// every op of every token, so there is no per-op thread start.
class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(thread_index, n_threads) on every thread (the caller is thread 0)
  // and returns when all have finished.
  void run(const std::function<void(int, int)>& fn);

  // Splits [0, n) into contiguous chunks, one per thread.
  template <class F>
  void parallel_for(int64_t n, F&& f) {
    if (n_threads_ == 1 || n <= 1) {
      f(int64_t{0}, n);
      return;
    }
    run([&](int ith, int nth) {
      int64_t per = (n + nth - 1) / nth;
      int64_t b = ith * per, e = std::min<int64_t>(n, b + per);
      if (b < e) f(b, e);
    });
  }

 private:
  void worker(int idx);

  int n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
};

int default_thread_count();

}  // namespace larder
