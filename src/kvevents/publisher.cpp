// Publisher: one thread batches the queued events, publishes them on PUB, keeps the replay
// ring buffer and the snapshot state, and answers replay requests (see publisher.h).
#include "kvevents/publisher.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace larder::kvevents {

namespace {

using Clock = std::chrono::steady_clock;

void put_be64(char* b, int64_t v) {
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(static_cast<uint64_t>(v) >> (56 - 8 * i));
}

int64_t get_be64(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b[i];
  return static_cast<int64_t>(v);
}

std::string tcp_endpoint(const std::string& host, int port) {
  std::string h = host.find(':') != std::string::npos && host.front() != '[' ? "[" + host + "]" : host;
  return "tcp://" + h + ":" + (port > 0 ? std::to_string(port) : std::string("*"));
}

}  // namespace

struct Publisher::Impl {
  PublisherParams p;
  double drop = 0;
  zmq::context_t ctx{1};
  zmq::socket_t pub, router;
  std::string pub_ep, replay_ep;
  int wake_fd = -1;
  std::thread thread;

  // Shared with the callers, under mu.
  mutable std::mutex mu;
  std::condition_variable published_cv;
  std::deque<Event> queue;
  Clock::time_point first_at;  // when the oldest queued event came
  uint64_t enqueued = 0, published = 0;
  bool stop = false, force = false;
  PublisherStats st;

  // The publisher thread's own.
  int64_t next_seq = 0;
  std::deque<std::pair<int64_t, std::string>> ring;
  HeldBlocks held;
  std::mt19937_64 rng{std::random_device{}()};

  void wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd, &one, sizeof one);
  }

  void run();
  void publish(std::vector<Event> events);
  void serve_replays();
};

void Publisher::Impl::publish(std::vector<Event> events) {
  EventBatch b;
  b.ts = wall_seconds();
  b.events = std::move(events);
  held.apply(b);
  std::string payload = encode(b);
  const int64_t seq = next_seq++;
  bool dropped = drop > 0 && std::uniform_real_distribution<double>(0, 1)(rng) < drop;
  if (!dropped) {
    char sb[8];
    put_be64(sb, seq);
    // PUB never blocks: past the high-water mark ZeroMQ drops for that subscriber, which the
    // subscriber sees as a gap and replays.
    pub.send(zmq::buffer(p.topic), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
    pub.send(zmq::buffer(sb, 8), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
    pub.send(zmq::buffer(payload), zmq::send_flags::dontwait);
  }
  ring.emplace_back(seq, std::move(payload));
  while (ring.size() > p.buffer_batches) ring.pop_front();
  std::lock_guard<std::mutex> lk(mu);
  ++st.batches;
  st.events += static_cast<int64_t>(b.events.size());
  if (dropped) ++st.dropped_sends;
  st.last_seq = seq;
  st.buffered = ring.size();
  st.held = held.size();
}

void Publisher::Impl::serve_replays() {
  for (int n = 0; n < 64; ++n) {  // then back to publishing; the rest wait in the socket
    std::vector<zmq::message_t> req;
    if (!zmq::recv_multipart(router, std::back_inserter(req), zmq::recv_flags::dontwait)) return;
    if (req.size() != 3 || req[1].size() != 0 || req[2].size() != 8) {
      std::lock_guard<std::mutex> lk(mu);
      ++st.bad_requests;
      continue;
    }
    const std::string id = req[0].to_string();
    int64_t start = get_be64(req[2].data());
    if (start < 0) start = 0;
    auto send = [&](int64_t seq, const std::string& payload) {
      char sb[8];
      put_be64(sb, seq);
      router.send(zmq::buffer(id), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      router.send(zmq::const_buffer(), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      router.send(zmq::buffer(sb, 8), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      router.send(zmq::buffer(payload), zmq::send_flags::dontwait);
    };
    const int64_t last = next_seq - 1;
    bool snapshot = false;
    if (start <= last && (ring.empty() || start < ring.front().first)) {
      snapshot = true;  // the buffer no longer goes back that far: the state after `last` instead
      send(last, encode(held.snapshot(wall_seconds())));
    } else {
      for (const auto& [seq, payload] : ring)
        if (seq >= start) send(seq, payload);
    }
    send(-1, std::string());  // END_SEQ
    std::lock_guard<std::mutex> lk(mu);
    ++st.replays_served;
    if (snapshot) ++st.snapshots_served;
  }
}

void Publisher::Impl::run() {
  zmq::pollitem_t items[2] = {{router.handle(), 0, ZMQ_POLLIN, 0}, {nullptr, wake_fd, ZMQ_POLLIN, 0}};
  const auto window = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(p.flush_ms));
  for (;;) {
    long timeout_ms = -1;  // nothing queued: sleep until a request or an event comes
    {
      std::lock_guard<std::mutex> lk(mu);
      if (stop || force) {
        timeout_ms = 0;
      } else if (!queue.empty()) {
        auto left = first_at + window - Clock::now();
        timeout_ms = left <= Clock::duration::zero()
                         ? 0
                         : static_cast<long>(std::chrono::ceil<std::chrono::milliseconds>(left).count());
      }
    }
    try {
      zmq::poll(items, 2, std::chrono::milliseconds(timeout_ms));
    } catch (const zmq::error_t&) {
      continue;  // EINTR
    }
    if (items[1].revents & ZMQ_POLLIN) {
      uint64_t v;
      [[maybe_unused]] ssize_t n = ::read(wake_fd, &v, sizeof v);
    }
    serve_replays();

    std::vector<Event> take;
    bool stopping;
    {
      std::lock_guard<std::mutex> lk(mu);
      stopping = stop;
      bool due = !queue.empty() && (stop || force || queue.size() >= p.max_batch_events ||
                                    Clock::now() >= first_at + window);
      if (due) {
        take.assign(std::make_move_iterator(queue.begin()), std::make_move_iterator(queue.end()));
        queue.clear();
      }
      force = false;
      st.queued = queue.size();
    }
    for (size_t i = 0; i < take.size(); i += p.max_batch_events) {
      size_t end = std::min(take.size(), i + p.max_batch_events);
      publish(std::vector<Event>(std::make_move_iterator(take.begin() + i), std::make_move_iterator(take.begin() + end)));
    }
    if (!take.empty()) {
      std::lock_guard<std::mutex> lk(mu);
      published += take.size();
      published_cv.notify_all();
    }
    if (stopping && take.empty()) return;
  }
}

Publisher::Publisher(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<Publisher>> Publisher::start(PublisherParams p) {
  double drop = p.test_drop_rate;
  if (const char* e = std::getenv("LARDER_KV_EVENTS_DROP"); e && *e) {
    char* endp = nullptr;
    drop = std::strtod(e, &endp);
    if (endp == e || *endp != '\0') return Error{"LARDER_KV_EVENTS_DROP: not a number: " + std::string(e)};
  }
  if (!(drop >= 0 && drop <= 1)) return make_error("kv events: drop rate %g is not in [0, 1]", drop);
  if (!(p.flush_ms >= 0 && p.flush_ms <= 60000)) return make_error("kv events: flush_ms %g is not in [0, 60000]", p.flush_ms);
  if (p.max_batch_events == 0) return Error{"kv events: max_batch_events must be at least 1"};
  if (p.pub_port < 0 || p.pub_port > 65535 || p.replay_port < 0 || p.replay_port > 65535)
    return Error{"kv events: port out of range"};

  auto impl = std::make_unique<Impl>();
  impl->p = p;
  impl->drop = drop;
  const bool v6 = p.bind_host.find(':') != std::string::npos;
  std::string ep;
  try {
    impl->pub = zmq::socket_t(impl->ctx, zmq::socket_type::pub);
    impl->pub.set(zmq::sockopt::linger, 0);
    impl->pub.set(zmq::sockopt::sndhwm, 100000);  // vLLM's default
    impl->pub.set(zmq::sockopt::ipv6, v6);
    ep = tcp_endpoint(p.bind_host, p.pub_port);
    impl->pub.bind(ep);
    impl->pub_ep = impl->pub.get(zmq::sockopt::last_endpoint);
    impl->router = zmq::socket_t(impl->ctx, zmq::socket_type::router);
    impl->router.set(zmq::sockopt::linger, 0);
    impl->router.set(zmq::sockopt::sndhwm, 0);  // an answer is up to buffer_batches messages: never drop one
    impl->router.set(zmq::sockopt::ipv6, v6);
    ep = tcp_endpoint(p.bind_host, p.replay_port);
    impl->router.bind(ep);
    impl->replay_ep = impl->router.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return Error{"kv events: cannot bind " + ep + ": " + e.what()};
  }
  impl->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->wake_fd < 0) return Error{"kv events: eventfd failed"};
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->run(); });
  return std::unique_ptr<Publisher>(new Publisher(std::move(impl)));
}

Publisher::~Publisher() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stop = true;
  }
  impl_->wake();
  impl_->thread.join();
  impl_->pub.close();
  impl_->router.close();
  impl_->ctx.close();
  ::close(impl_->wake_fd);
}

void Publisher::push(Event e) {
  bool wake;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    if (impl_->queue.empty()) impl_->first_at = Clock::now();
    impl_->queue.push_back(std::move(e));
    ++impl_->enqueued;
    impl_->st.queued = impl_->queue.size();
    impl_->st.queued_max = std::max(impl_->st.queued_max, impl_->queue.size());
    // Only the first event of a window and a full batch need the thread's attention.
    wake = impl_->queue.size() == 1 || impl_->queue.size() == impl_->p.max_batch_events;
  }
  if (wake) impl_->wake();
}

void Publisher::stored(std::vector<BlockHash> hashes, std::optional<BlockHash> parent, std::vector<int32_t> token_ids,
                       int block_size, std::string medium) {
  push(BlockStored{std::move(hashes), parent, std::move(token_ids), block_size, std::nullopt, std::move(medium)});
}

void Publisher::removed(std::vector<BlockHash> hashes, std::string medium) {
  push(BlockRemoved{std::move(hashes), std::move(medium)});
}

void Publisher::cleared() { push(AllBlocksCleared{}); }

bool Publisher::flush(double timeout_s) {
  std::unique_lock<std::mutex> lk(impl_->mu);
  const uint64_t target = impl_->enqueued;
  if (impl_->published >= target) return true;
  impl_->force = true;
  lk.unlock();
  impl_->wake();
  lk.lock();
  return impl_->published_cv.wait_for(lk, std::chrono::duration<double>(timeout_s),
                                      [&] { return impl_->published >= target; });
}

const std::string& Publisher::pub_endpoint() const { return impl_->pub_ep; }
const std::string& Publisher::replay_endpoint() const { return impl_->replay_ep; }

PublisherStats Publisher::stats() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->st;
}

}  // namespace larder::kvevents
