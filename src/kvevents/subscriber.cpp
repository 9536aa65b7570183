// SubscriberSet: one thread, one zmq poll over every instance's SUB socket, the monitor of that
// socket (to notice a reconnect) and the DEALER of its replay request in flight (see subscriber.h).
#include "kvevents/subscriber.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace larder::kvevents {

namespace {

using Clock = std::chrono::steady_clock;

int64_t get_be64(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b[i];
  return static_cast<int64_t>(v);
}

Clock::duration secs(double s) { return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); }

std::atomic<uint64_t> g_monitor_id{0};

}  // namespace

struct SubscriberSet::Impl {
  struct Inst {
    std::string id, pub_ep, replay_ep;
    zmq::socket_t sub, mon, dealer;  // dealer: a fresh socket per request, so a late answer to
                                     // an abandoned request can never be mistaken for the current one
    Sequencer seq;
    Clock::time_point deadline, last_heard;
    bool disconnected = false;
    bool dead = false;  // removed from a callback: no more callbacks, gone next round
    explicit Inst(SequencerParams p) : seq(p) {}
  };
  struct Command {
    std::function<Status()> fn;
    std::shared_ptr<std::promise<Status>> done;  // null when issued from the thread itself
  };

  SubscriberParams p;
  BatchFn on_batch;
  ResetFn on_reset;
  zmq::context_t ctx{1};
  int wake_fd = -1;
  std::thread thread;
  std::thread::id thread_id;

  mutable std::mutex mu;  // commands, stop, and what the API reads
  std::deque<Command> commands;
  bool stop = false;
  struct Public {
    SequencerStats st;
    bool synced = false;
    std::shared_ptr<Inst> inst;  // to mark it dead from a callback
  };
  std::map<std::string, Public> pub_view;

  std::map<std::string, std::shared_ptr<Inst>> insts;  // the thread's own

  void wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd, &one, sizeof one);
  }
  Status run_command(std::function<Status()> fn);
  Status do_add(const std::string& id, const std::string& pub_ep, const std::string& replay_ep);
  void do_remove(const std::string& id);
  void close(Inst& in);
  void handle(Inst& in, Sequencer::Step step);
  void send_request(Inst& in, int64_t from);
  void publish(const Inst& in);
  void read_sub(Inst& in);
  void read_monitor(Inst& in);
  void read_dealer(Inst& in);
  void run();
};

void SubscriberSet::Impl::publish(const Inst& in) {
  std::lock_guard<std::mutex> lk(mu);
  auto it = pub_view.find(in.id);
  if (it == pub_view.end() || it->second.inst.get() != &in) return;
  it->second.st = in.seq.stats();
  it->second.synced = in.seq.synced();
}

void SubscriberSet::Impl::send_request(Inst& in, int64_t from) {
  if (in.dealer) in.dealer.close();
  in.deadline = Clock::now() + secs(p.replay_timeout_s);
  if (in.replay_ep.empty()) return;  // (the Sequencer does not ask then)
  try {
    in.dealer = zmq::socket_t(ctx, zmq::socket_type::dealer);
    in.dealer.set(zmq::sockopt::linger, 0);
    in.dealer.set(zmq::sockopt::rcvhwm, 0);  // an answer can be the whole replay buffer
    in.dealer.connect(in.replay_ep);
    char sb[8];
    for (int i = 0; i < 8; ++i) sb[i] = static_cast<char>(static_cast<uint64_t>(from) >> (56 - 8 * i));
    // Queued until the connection is up (ZMQ_IMMEDIATE is off); the deadline covers the rest.
    in.dealer.send(zmq::const_buffer(), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
    in.dealer.send(zmq::buffer(sb, 8), zmq::send_flags::dontwait);
  } catch (const zmq::error_t&) {
    // A bad endpoint or a full queue: the deadline retries it.
  }
}

void SubscriberSet::Impl::handle(Inst& in, Sequencer::Step step) {
  if (!in.dead && step.reset && on_reset) on_reset(in.id);
  for (const auto& [seq, batch] : step.apply) {
    if (in.dead) break;
    if (on_batch) on_batch(in.id, seq, batch);
  }
  if (!in.dead && step.replay_from) send_request(in, *step.replay_from);
  publish(in);
}

void SubscriberSet::Impl::close(Inst& in) {
  if (in.sub) zmq_socket_monitor(in.sub.handle(), nullptr, 0);
  if (in.mon) in.mon.close();
  if (in.dealer) in.dealer.close();
  if (in.sub) in.sub.close();
}

Status SubscriberSet::Impl::do_add(const std::string& id, const std::string& pub_ep, const std::string& replay_ep) {
  do_remove(id);
  SequencerParams sp = p.sequencer;
  sp.can_replay = !replay_ep.empty();
  auto in = std::make_shared<Inst>(sp);
  in->id = id;
  in->pub_ep = pub_ep;
  in->replay_ep = replay_ep;
  try {
    in->sub = zmq::socket_t(ctx, zmq::socket_type::sub);
    in->sub.set(zmq::sockopt::linger, 0);
    in->sub.set(zmq::sockopt::rcvhwm, 100000);
    in->sub.set(zmq::sockopt::subscribe, "");  // every topic: a topic change is a new epoch
    const std::string mon_ep = "inproc://larder-kvevents-monitor-" + std::to_string(g_monitor_id++);
    if (zmq_socket_monitor(in->sub.handle(), mon_ep.c_str(), ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) != 0)
      throw zmq::error_t();
    in->mon = zmq::socket_t(ctx, zmq::socket_type::pair);
    in->mon.set(zmq::sockopt::linger, 0);
    in->mon.connect(mon_ep);
    in->sub.connect(pub_ep);
    if (!replay_ep.empty()) {  // a bad replay endpoint is an error now rather than retries forever
      zmq::socket_t probe(ctx, zmq::socket_type::dealer);
      probe.set(zmq::sockopt::linger, 0);
      probe.connect(replay_ep);
    }
  } catch (const zmq::error_t& e) {
    close(*in);
    return Error{"kv events: cannot follow " + id + " at " + pub_ep + " / " + replay_ep + ": " + e.what()};
  }
  in->last_heard = Clock::now();
  insts[id] = in;
  {
    std::lock_guard<std::mutex> lk(mu);
    pub_view[id] = Public{in->seq.stats(), in->seq.synced(), in};
  }
  // Subscribed first, then asked for everything: what the SUB misses while it connects is in
  // the answer.
  handle(*in, in->seq.start());
  return Status::Ok();
}

void SubscriberSet::Impl::do_remove(const std::string& id) {
  auto it = insts.find(id);
  if (it != insts.end()) {
    it->second->dead = true;
    close(*it->second);
    insts.erase(it);
  }
  std::lock_guard<std::mutex> lk(mu);
  pub_view.erase(id);
}

void SubscriberSet::Impl::read_sub(Inst& in) {
  for (int n = 0; n < 256 && !in.dead; ++n) {  // then the other instances get their turn
    std::vector<zmq::message_t> msg;
    if (!zmq::recv_multipart(in.sub, std::back_inserter(msg), zmq::recv_flags::dontwait)) return;
    in.last_heard = Clock::now();
    if (msg.size() != 3 || msg[1].size() != 8) continue;  // not a KV event message: no seq to go by
    handle(in, in.seq.feed(Sequencer::Source::Live, get_be64(msg[1].data()), msg[2].to_string_view(),
                           msg[0].to_string_view()));
  }
}

void SubscriberSet::Impl::read_dealer(Inst& in) {
  for (int n = 0; n < 256 && in.dealer && !in.dead; ++n) {
    std::vector<zmq::message_t> msg;
    if (!zmq::recv_multipart(in.dealer, std::back_inserter(msg), zmq::recv_flags::dontwait)) return;
    in.last_heard = Clock::now();
    if (msg.size() != 3 || msg[0].size() != 0 || msg[1].size() != 8) continue;
    int64_t seq = get_be64(msg[1].data());
    if (seq == -1) {
      in.dealer.close();
      handle(in, in.seq.replay_end());
      return;
    }
    in.deadline = Clock::now() + secs(p.replay_timeout_s);  // a long answer is still an answer
    handle(in, in.seq.feed(Sequencer::Source::Replay, seq, msg[2].to_string_view()));
  }
}

void SubscriberSet::Impl::read_monitor(Inst& in) {
  for (;;) {
    std::vector<zmq::message_t> msg;
    if (!zmq::recv_multipart(in.mon, std::back_inserter(msg), zmq::recv_flags::dontwait)) return;
    if (msg.empty() || msg[0].size() < 2) continue;
    uint16_t event;
    std::memcpy(&event, msg[0].data(), 2);
    if (event == ZMQ_EVENT_DISCONNECTED) {
      in.disconnected = true;
    } else if (event == ZMQ_EVENT_CONNECTED && in.disconnected) {
      in.disconnected = false;  // it came back: maybe a new process on the same port
      handle(in, in.seq.reconnected());
    }
  }
}

void SubscriberSet::Impl::run() {
  std::vector<zmq::pollitem_t> items;
  std::vector<std::pair<std::shared_ptr<Inst>, int>> owners;  // per poll item: instance, kind
  for (;;) {
    std::deque<Command> cmds;
    {
      std::lock_guard<std::mutex> lk(mu);
      if (stop) break;
      cmds.swap(commands);
    }
    for (auto& c : cmds) {
      Status st = c.fn();
      if (c.done) c.done->set_value(st);
    }
    for (auto it = insts.begin(); it != insts.end();) it = it->second->dead ? (close(*it->second), insts.erase(it)) : std::next(it);

    items.assign(1, zmq::pollitem_t{nullptr, wake_fd, ZMQ_POLLIN, 0});
    owners.assign(1, {nullptr, 0});
    auto now = Clock::now();
    auto next = now + std::chrono::seconds(1);
    for (auto& [id, in] : insts) {
      items.push_back({in->sub.handle(), 0, ZMQ_POLLIN, 0}), owners.emplace_back(in, 0);
      items.push_back({in->mon.handle(), 0, ZMQ_POLLIN, 0}), owners.emplace_back(in, 1);
      if (in->dealer) items.push_back({in->dealer.handle(), 0, ZMQ_POLLIN, 0}), owners.emplace_back(in, 2);
      next = std::min(next, in->seq.replay_in_flight() ? in->deadline : in->last_heard + secs(p.idle_poll_s));
    }
    auto wait = std::chrono::ceil<std::chrono::milliseconds>(std::max(next - now, Clock::duration::zero()));
    try {
      zmq::poll(items, wait);
    } catch (const zmq::error_t&) {
      continue;  // EINTR
    }
    if (items[0].revents & ZMQ_POLLIN) {
      uint64_t v;
      [[maybe_unused]] ssize_t n = ::read(wake_fd, &v, sizeof v);
    }
    for (size_t i = 1; i < items.size(); ++i) {
      if (!(items[i].revents & ZMQ_POLLIN)) continue;
      Inst& in = *owners[i].first;
      if (in.dead) continue;
      if (owners[i].second == 0) read_sub(in);
      else if (owners[i].second == 1) read_monitor(in);
      else if (in.dealer && in.dealer.handle() == items[i].socket) read_dealer(in);
    }
    now = Clock::now();
    for (auto& [id, in] : insts) {
      if (in->dead) continue;
      if (in->seq.replay_in_flight()) {
        if (now >= in->deadline) handle(*in, in->seq.replay_failed());
      } else if (now >= in->last_heard + secs(p.idle_poll_s)) {
        in->last_heard = now;  // one poll per quiet period
        handle(*in, in->seq.idle());
      }
    }
  }
  for (auto& [id, in] : insts) close(*in);
  insts.clear();
}

Status SubscriberSet::Impl::run_command(std::function<Status()> fn) {
  if (std::this_thread::get_id() == thread_id) {  // from a callback: after this round
    std::lock_guard<std::mutex> lk(mu);
    commands.push_back(Command{std::move(fn), nullptr});
    return Status::Ok();
  }
  auto done = std::make_shared<std::promise<Status>>();
  auto fut = done->get_future();
  {
    std::lock_guard<std::mutex> lk(mu);
    if (stop) return Error{"kv events: subscriber stopped"};
    commands.push_back(Command{std::move(fn), done});
  }
  wake();
  return fut.get();
}

SubscriberSet::SubscriberSet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<SubscriberSet>> SubscriberSet::start(SubscriberParams p, BatchFn on_batch, ResetFn on_reset) {
  if (!(p.replay_timeout_s > 0) || !(p.idle_poll_s > 0)) return Error{"kv events: timeouts must be positive"};
  auto impl = std::make_unique<Impl>();
  impl->p = p;
  impl->on_batch = std::move(on_batch);
  impl->on_reset = std::move(on_reset);
  impl->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->wake_fd < 0) return Error{std::string("kv events: eventfd: ") + std::strerror(errno)};
  Impl* raw = impl.get();
  std::promise<void> started;
  auto fut = started.get_future();
  impl->thread = std::thread([raw, &started] {
    raw->thread_id = std::this_thread::get_id();
    started.set_value();
    raw->run();
  });
  fut.wait();  // thread_id is set before anyone can call add()
  return std::unique_ptr<SubscriberSet>(new SubscriberSet(std::move(impl)));
}

SubscriberSet::~SubscriberSet() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stop = true;
  }
  impl_->wake();
  impl_->thread.join();
  for (auto& c : impl_->commands)
    if (c.done) c.done->set_value(Error{"kv events: subscriber stopped"});
  impl_->ctx.close();
  ::close(impl_->wake_fd);
}

Status SubscriberSet::add(const std::string& id, const std::string& pub_endpoint, const std::string& replay_endpoint) {
  if (pub_endpoint.find("://") == std::string::npos) return Error{"kv events: bad endpoint '" + pub_endpoint + "'"};
  Impl* impl = impl_.get();
  return impl_->run_command([impl, id, pub_endpoint, replay_endpoint] { return impl->do_add(id, pub_endpoint, replay_endpoint); });
}

Status SubscriberSet::remove(const std::string& id) {
  if (std::this_thread::get_id() == impl_->thread_id) {
    std::lock_guard<std::mutex> lk(impl_->mu);  // no more callbacks for it from now on
    if (auto it = impl_->pub_view.find(id); it != impl_->pub_view.end()) it->second.inst->dead = true;
  }
  Impl* impl = impl_.get();
  return impl_->run_command([impl, id] {
    impl->do_remove(id);
    return Status::Ok();
  });
}

bool SubscriberSet::synced(const std::string& id) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  auto it = impl_->pub_view.find(id);
  return it != impl_->pub_view.end() && it->second.synced;
}

std::optional<SequencerStats> SubscriberSet::stats(const std::string& id) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  auto it = impl_->pub_view.find(id);
  if (it == impl_->pub_view.end()) return std::nullopt;
  return it->second.st;
}

std::vector<std::string> SubscriberSet::ids() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  std::vector<std::string> v;
  for (const auto& [id, pv] : impl_->pub_view) v.push_back(id);
  return v;
}

}  // namespace larder::kvevents
