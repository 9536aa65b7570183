// Op: the user's side of an operation (see transfer.h); the engine thread completes it with finish().
#include <chrono>

#include "transfer/queue.h"
#include "transfer/transfer.h"

namespace larder::transfer {

Status Op::wait() {
  std::unique_lock l(mu_);
  cv_.wait(l, [&] { return done(); });
  return status_;
}

Status Op::wait_until(std::chrono::steady_clock::time_point t) {
  std::unique_lock l(mu_);
  if (!cv_.wait_until(l, t, [&] { return done(); })) return make_error("timed out waiting");
  return status_;
}

Status Op::status() const {
  std::lock_guard l(mu_);
  if (!finishing_) return make_error("op not done yet");
  return status_;
}

void Op::cancel() {
  if (done()) return;
  cancel_requested_.store(true, std::memory_order_release);
  if (auto q = queue_) {
    std::lock_guard l(q->mu);
    q->cancel_pending = true;
    if (!q->closed) q->wake_locked();
  }
}

double Op::seconds() const {
  std::lock_guard l(mu_);
  if (!finishing_) return 0;
  return std::chrono::duration<double>(end_ - start_).count();
}

void Op::on_done(std::function<void(const Status&)> f) {
  std::unique_lock l(mu_);
  if (finishing_) {
    Status st = status_;
    l.unlock();
    f(st);
    return;
  }
  if (on_done_) {
    on_done_ = [a = std::move(on_done_), b = std::move(f)](const Status& s) {
      a(s);
      b(s);
    };
  } else {
    on_done_ = std::move(f);
  }
}

// Callbacks run before done() turns true, so a waiter sees their effects.
void Op::finish(Status st) {
  std::function<void(const Status&)> cb;
  {
    std::lock_guard l(mu_);
    LARDER_ASSERT(!finishing_);
    status_ = st;
    end_ = std::chrono::steady_clock::now();
    finishing_ = true;  // on_done() from now on runs its function at once
    cb = std::move(on_done_);
  }
  if (cb) cb(st);
  {
    std::lock_guard l(mu_);
    done_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

}  // namespace larder::transfer
