#include "core/thread_pool.h"

#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

namespace larder {

namespace {
inline uint32_t gen_of(uint64_t v) { return static_cast<uint32_t>(v >> 32); }
inline uint32_t next_of(uint64_t v) { return static_cast<uint32_t>(v); }
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

uint32_t ThreadPool::work(uint32_t gen, int tid) {
  const Slot& s = slots_[gen % kSlots];
  uint32_t ran = 0;
  for (;;) {
    uint64_t v = counter_.load(std::memory_order_acquire);
    if (gen_of(v) != gen) return ran;
    // Read the job before claiming: a successful claim proves the job was still live,
    // so these values belong to it.
    const uint32_t n_chunks = s.n_chunks.load(std::memory_order_relaxed);
    const uint32_t k = next_of(v);
    if (k >= n_chunks) return ran;
    Tramp fn = s.fn.load(std::memory_order_relaxed);
    void* ctx = s.ctx.load(std::memory_order_relaxed);
    const int64_t n = s.n.load(std::memory_order_relaxed), chunk = s.chunk.load(std::memory_order_relaxed);
    if (!counter_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
    const int64_t b = static_cast<int64_t>(k) * chunk, e = std::min(n, b + chunk);
    fn(ctx, b, e, tid);
    ++ran;
    done_.fetch_add(1, std::memory_order_release);
  }
}

void ThreadPool::dispatch(int64_t n, int64_t min_chunk, Tramp fn, void* ctx) {
  // A few chunks per thread balance load without much claiming overhead.
  int64_t chunk = std::max<int64_t>(min_chunk, (n + 4 * n_threads_ - 1) / (4 * n_threads_));
  const uint32_t n_chunks = static_cast<uint32_t>((n + chunk - 1) / chunk);
  const uint32_t gen = gen_of(counter_.load(std::memory_order_relaxed)) + 1;
  Slot& s = slots_[gen % kSlots];
  s.fn.store(fn, std::memory_order_relaxed);
  s.ctx.store(ctx, std::memory_order_relaxed);
  s.n.store(n, std::memory_order_relaxed);
  s.chunk.store(chunk, std::memory_order_relaxed);
  s.n_chunks.store(n_chunks, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  counter_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  work(gen, 0);
  // Only chunks a worker has already claimed can be outstanding here.
  int spins = 0;
  while (done_.load(std::memory_order_acquire) != n_chunks) {
    if (++spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }
}

void ThreadPool::worker(int tid) {
  uint32_t seen = 0;
  using Clock = std::chrono::steady_clock;
  for (;;) {
    // Spin briefly: ops arrive back to back during a forward pass.
    auto t0 = Clock::now();
    int spins = 0;
    while (gen_of(counter_.load(std::memory_order_acquire)) == seen && !stop_.load(std::memory_order_relaxed)) {
      _mm_pause();
      if (++spins % 256 == 0 && Clock::now() - t0 > std::chrono::microseconds(500)) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lk, [&] {
          return gen_of(counter_.load(std::memory_order_seq_cst)) != seen || stop_.load();
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        break;
      }
    }
    if (stop_.load()) return;
    seen = gen_of(counter_.load(std::memory_order_acquire));
    work(seen, tid);
  }
}

int default_thread_count() {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n <= 0 ? 1 : static_cast<int>(n);
}

}  // namespace larder
