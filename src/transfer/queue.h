// The engine's submission queue (internal to src/transfer): ops keep it, for cancel(), after the
// engine is gone.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <vector>

namespace larder::transfer::detail {

struct OpImpl;

struct Queue {
  struct Item {
    std::shared_ptr<OpImpl> op;                   // an op to start, or
    std::function<void()>* task = nullptr;        // a call to run on the engine thread (run_sync)
    std::promise<void>* task_done = nullptr;
    bool stop = false;
  };
  std::mutex mu;
  std::vector<Item> items;
  bool cancel_pending = false;
  bool sleeping = false;  // the engine thread is (about to be) in epoll_wait
  bool closed = false;
  int efd = -1;
  ~Queue() {
    if (efd >= 0) close(efd);
  }
  void wake_locked() {
    if (sleeping) {
      uint64_t one = 1;
      ssize_t r = ::write(efd, &one, sizeof one);
      (void)r;
      sleeping = false;
    }
  }
  bool push(Item it) {
    std::lock_guard l(mu);
    if (closed) return false;
    items.push_back(std::move(it));
    wake_locked();
    return true;
  }
};

}  // namespace larder::transfer::detail
