// KV transfer engine over UCX ucp (see transfer.h).
//
// One engine thread owns the ucp worker (UCS_THREAD_MODE_SINGLE): every UCX call after create() runs
// there, including memory registration (run_sync), so UCX needs no locks of its own. Other threads push
// items onto a queue and wake the thread through an eventfd that sits in one epoll set with the
// worker's event fd; the thread spins briefly after activity and then sleeps (see run()).
//
// Endpoints use UCP_ERR_HANDLING_MODE_PEER so that a dead peer fails ops instead of hanging them. UCX
// 1.13 then drops its shared-memory transports unless they claim error handling (MM_ERROR_HANDLING,
// off by default), and two local processes would talk TCP: init() turns it on unless the environment
// says otherwise (and deepens the shared-memory fifo, see there). Puts and gets on registered heap
// memory are still UCX's software RMA over a message lane (shared memory fifo or TCP), acknowledged
// by the target's engine thread; memory from allocate_memory() is written directly by the peer.
// LARDER_TRANSFER_VERBOSE=1 prints each new endpoint's transports (ucp_ep_print_info) to stderr.
//
// An op posts its segments in chunks of at most kChunk bytes with at most kMaxReqs / kMaxBytes
// outstanding, so a cancel or deadline only waits for that window to drain: UCX cannot cancel a posted
// put or get (ucp_request_cancel is for receives), and the op must not report done while UCX may still
// touch its local memory. A window that does not drain within kGrace (a stalled peer) force-closes the
// endpoint, which completes its requests with an error. Writes end with one ucp_ep_flush_nbx (remote
// visibility); reads end when every get completed locally.
#include "transfer/transfer.h"

#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <future>
#include <set>
#include <thread>
#include <unordered_map>

#include "transfer/queue.h"
#include "transfer/wire.h"

namespace larder::transfer {
using namespace wire;

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kChunk = 4ull << 20;      // largest single put/get
constexpr int kMaxReqs = 256;                // outstanding data requests per op
constexpr uint64_t kMaxBytes = 16ull << 20;  // outstanding data bytes per op
constexpr size_t kMaxPayload = 1u << 20;     // notify payload
constexpr auto kGrace = std::chrono::seconds(1);  // for a failed op's window to drain
constexpr auto kSpin = std::chrono::microseconds(200);  // busy polling after the last event
constexpr auto kWarm = std::chrono::milliseconds(100);  // then 1 ms polls for this long (and while busy)
constexpr uint16_t kAmId = 0x4c;  // notify active messages

enum class Kind { Write, Read, Notify };
enum class FailKind { Error, Timeout, Cancel };

std::string ucs_err(ucs_status_t st) { return ucs_status_string(st); }

}  // namespace

namespace detail {
struct RKey {
  ucp_rkey_h h = nullptr;
  ~RKey() {
    if (h) ucp_rkey_destroy(h);
  }
};

struct Peer {
  std::string addr;
  ucp_ep_h ep = nullptr;
  bool ready = false, failed = false;
  std::string err;
  int reqs = 0;  // our own requests on it (the connect flush)
  std::unordered_map<std::string, std::shared_ptr<RKey>> rkeys;
  uint64_t next_seq = 0;
  std::set<uint64_t> active_writes;  // for notify's ordering
  int notifies = 0;                  // notifies in flight (they wait for active_writes)
};

struct OpImpl final : Op {
  using Op::bytes_;
  using Op::cancel_requested_;
  using Op::finish;
  using Op::queue_;
  using Op::start_;
  Kind kind = Kind::Write;
  std::string peer_addr, desc_str;
  int region = -1;
  std::vector<Segment> segs;
  Clock::time_point deadline;
  uint64_t key = 0;
  std::string payload;
  // engine thread only
  Desc desc;
  std::shared_ptr<Peer> peer;
  std::shared_ptr<RKey> rkey;
  char* lbase = nullptr;
  ucp_mem_h memh = nullptr;
  bool holds_region = false;
  size_t next_seg = 0;
  uint64_t seg_off = 0;
  int data_out = 0, ctrl_out = 0;
  uint64_t data_bytes_out = 0;
  bool flush_posted = false, flush_done = false, am_posted = false, am_done = false;
  bool failed = false, user_done = false, retired = false, dirty = false;
  FailKind fail_kind = FailKind::Error;
  std::string fail_msg;
  Clock::time_point fail_time;
  uint64_t seq = 0;  // writes: order on the peer; notify: barrier

  void fail(FailKind k, std::string msg) {
    if (failed) return;
    failed = true;
    fail_kind = k;
    fail_msg = std::move(msg);
    fail_time = Clock::now();
  }
};

struct ServerEp {
  ucp_ep_h ep = nullptr;
  bool failed = false;
};
}  // namespace detail

using detail::OpImpl;
using detail::Peer;

// ---------------------------------------------------------------- Engine::Impl

struct Engine::Impl {
  struct Region {
    char* base = nullptr;
    size_t size = 0;
    ucp_mem_h memh = nullptr;
    std::string desc;
    int busy = 0;  // ops in flight that use it
  };

  std::string host;
  int port = 0;
  ucp_context_h ctx = nullptr;
  ucp_worker_h worker = nullptr;
  ucp_listener_h listener = nullptr;
  int epfd = -1;
  std::shared_ptr<detail::Queue> q = std::make_shared<detail::Queue>();
  std::thread thread;

  mutable std::mutex reg_mu;
  std::unordered_map<int, Region> regions;
  int next_region = 1;

  std::mutex handler_mu;
  std::shared_ptr<std::function<void(uint64_t, std::string)>> handler;

  std::atomic<int64_t> st_ops{0}, st_bytes{0}, st_failures{0}, st_timeouts{0}, st_cancelled{0}, st_in_flight{0},
      st_peers{0};

  // engine thread only
  std::unordered_map<std::string, std::shared_ptr<Peer>> peers;
  struct Closing {
    void* req;
    std::shared_ptr<Peer> peer;
  };
  std::vector<Closing> closing;
  std::vector<std::unique_ptr<detail::ServerEp>> server_eps;
  std::vector<std::shared_ptr<OpImpl>> active;
  std::vector<OpImpl*> dirty;
  bool all_dirty = false;
  std::vector<std::pair<uint64_t, std::string>> inbox;  // notifies received during progress
  bool stopping = false;

  ~Impl() {
    if (worker) ucp_worker_destroy(worker);
    if (ctx) ucp_cleanup(ctx);
    if (epfd >= 0) close(epfd);
  }

  Status init();
  void run();
  void submit(std::shared_ptr<OpImpl> op);
  Status run_sync(std::function<void()> fn);

  // engine thread
  bool drain_queue();
  bool housekeeping();
  void start(const std::shared_ptr<OpImpl>& op);
  void advance(OpImpl* op);
  void pump(OpImpl* op);
  void post_ctrl(OpImpl* op);
  void complete_user(OpImpl* op, Status st);
  void mark(OpImpl* op) {
    if (!op->dirty && !op->retired) {
      op->dirty = true;
      dirty.push_back(op);
    }
  }
  Result<std::shared_ptr<Peer>> get_peer(const std::string& addr);
  void peer_failed(const std::shared_ptr<Peer>& p, const std::string& why);
  void close_ep(ucp_ep_h ep, std::shared_ptr<Peer> p);
  void check_deadlines(Clock::time_point now);
  void sleep(Clock::time_point now, int timeout_ms);
  void shutdown();

  // UCX callbacks
  static void on_data(void* req, ucs_status_t st, void* arg);
  static void on_ctrl(void* req, ucs_status_t st, void* arg);
  static void on_connect_flush(void* req, ucs_status_t st, void* arg);
  static void on_client_error(void* arg, ucp_ep_h ep, ucs_status_t st);
  static void on_server_error(void* arg, ucp_ep_h ep, ucs_status_t st);
  static void on_conn_request(ucp_conn_request_h req, void* arg);
  static ucs_status_t on_am(void* arg, const void* header, size_t header_len, void* data, size_t len,
                            const ucp_am_recv_param_t* param);
};

// Each data request carries its byte count in the request's reserved space (request_size).
struct ReqInfo {
  uint64_t bytes;
  Engine::Impl* eng;
};

Status Engine::Impl::init() {
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);  // UCX_* from the environment (UCX_TLS ...)
  if (st != UCS_OK) return make_error("UCX config: %s", ucs_status_string(st));
  // Error handling (UCP_ERR_HANDLING_MODE_PEER) rules out UCX's shared-memory transports unless they
  // advertise it, which UCX 1.13 leaves off by default: without this, local peers talk TCP.
  const char* tls = std::getenv("UCX_TLS");
  bool shm = !tls || *tls == '^' || std::strstr(tls, "sm") || std::strstr(tls, "mm") || std::strstr(tls, "posix") ||
             std::strstr(tls, "sysv") || std::strstr(tls, "all");
  auto unset = [](const char* opt) {  // neither UCX_MM_<opt> nor UCX_POSIX_<opt> nor UCX_SYSV_<opt>
    for (const char* tl : {"MM", "POSIX", "SYSV"})
      if (std::getenv(("UCX_" + std::string(tl) + "_" + opt).c_str())) return false;
    return true;
  };
  if (shm && unset("ERROR_HANDLING")) (void)ucp_config_modify(cfg, "MM_ERROR_HANDLING", "y");
  // Software RMA over shared memory moves at most a fifo's worth (64 x 8 KiB by default) per round
  // trip between the two engine threads; on a loaded machine each round trip waits for the scheduler
  // (64 KiB..1 MiB writes: 0.1-0.3 GB/s with 64 entries, 1-2.5 GB/s with 1024; 8 MiB per transport).
  if (shm && unset("FIFO_SIZE")) (void)ucp_config_modify(cfg, "MM_FIFO_SIZE", "1024");
  ucp_params_t pp{};
  pp.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_REQUEST_SIZE | UCP_PARAM_FIELD_NAME;
  pp.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  pp.request_size = sizeof(ReqInfo);
  pp.name = "larder";
  st = ucp_init(&pp, cfg, &ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) return make_error("UCX init: %s", ucs_status_string(st));

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(ctx, &wp, &worker);
  if (st != UCS_OK) return make_error("UCX worker: %s", ucs_status_string(st));

  int wfd = -1;
  st = ucp_worker_get_efd(worker, &wfd);
  if (st != UCS_OK) return make_error("UCX worker event fd: %s", ucs_status_string(st));
  q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (q->efd < 0 || epfd < 0) return make_error("eventfd/epoll: %s", std::strerror(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wfd;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, wfd, &ev) != 0) return make_error("epoll_ctl: %s", std::strerror(errno));
  ev.data.fd = q->efd;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, q->efd, &ev) != 0) return make_error("epoll_ctl: %s", std::strerror(errno));

  ucp_am_handler_param_t hp{};
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG |
                  UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  hp.id = kAmId;
  hp.cb = on_am;
  hp.arg = this;
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  st = ucp_worker_set_am_recv_handler(worker, &hp);
  if (st != UCS_OK) return make_error("UCX am handler: %s", ucs_status_string(st));

  socklen_t len = 0;
  auto sa = resolve(host, port, true, &len);
  if (!sa.ok()) return make_error("listener address: %s", sa.error().c_str());
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa.value());
  lp.sockaddr.addrlen = len;
  lp.conn_handler.cb = on_conn_request;
  lp.conn_handler.arg = this;
  st = ucp_listener_create(worker, &lp, &listener);
  if (st != UCS_OK) return make_error("UCX listener on %s:%d: %s", host.c_str(), port, ucs_status_string(st));
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  st = ucp_listener_query(listener, &la);
  if (st != UCS_OK) return make_error("UCX listener query: %s", ucs_status_string(st));
  port = la.sockaddr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&la.sockaddr)->sin6_port)
                                           : ntohs(reinterpret_cast<sockaddr_in*>(&la.sockaddr)->sin_port);
  return Status::Ok();
}

void Engine::Impl::submit(std::shared_ptr<OpImpl> op) {
  op->queue_ = q;
  op->start_ = Clock::now();
  st_in_flight++;
  OpImpl* raw = op.get();
  if (!q->push({std::move(op)})) {
    st_in_flight--;
    st_cancelled++;
    st_ops++;
    raw->finish(make_error("cancelled (engine shut down)"));
  }
}

Status Engine::Impl::run_sync(std::function<void()> fn) {
  if (std::this_thread::get_id() == thread.get_id()) {  // from an on_done callback or the notify handler
    fn();
    return Status::Ok();
  }
  std::promise<void> done;
  auto fut = done.get_future();
  detail::Queue::Item it;
  it.task = &fn;
  it.task_done = &done;
  if (!q->push(std::move(it))) return make_error("transfer engine is shut down");
  fut.wait();
  return Status::Ok();
}

// ---------------------------------------------------------------- UCX callbacks (inside progress)

void Engine::Impl::on_data(void* req, ucs_status_t st, void* arg) {
  auto* op = static_cast<OpImpl*>(arg);
  auto* info = static_cast<ReqInfo*>(req);
  op->data_out--;
  op->data_bytes_out -= info->bytes;
  LARDER_ASSERT(op->data_out >= 0);
  if (st != UCS_OK) op->fail(FailKind::Error, "transfer with " + op->peer_addr + " failed: " + ucs_err(st));
  Impl* eng = info->eng;
  ucp_request_free(req);
  eng->mark(op);
}

// A notify's or write's flush, or a notify's message: one at a time per op.
void Engine::Impl::on_ctrl(void* req, ucs_status_t st, void* arg) {
  auto* op = static_cast<OpImpl*>(arg);
  op->ctrl_out--;
  if (st != UCS_OK) op->fail(FailKind::Error, "transfer with " + op->peer_addr + " failed: " + ucs_err(st));
  (op->am_posted ? op->am_done : op->flush_done) = true;
  Impl* eng = static_cast<ReqInfo*>(req)->eng;
  ucp_request_free(req);
  eng->mark(op);
}

void Engine::Impl::on_connect_flush(void* req, ucs_status_t st, void* arg) {
  auto* p = static_cast<Peer*>(arg);
  Impl* eng = static_cast<ReqInfo*>(req)->eng;
  p->reqs--;
  if (st == UCS_OK) {
    p->ready = true;
    if (std::getenv("LARDER_TRANSFER_VERBOSE")) ucp_ep_print_info(p->ep, stderr);  // the transports UCX chose
  } else if (!p->failed) {  // housekeeping() closes it
    p->failed = true;
    p->err = ucs_err(st);
  }
  ucp_request_free(req);
  eng->all_dirty = true;
}

void Engine::Impl::on_client_error(void* arg, ucp_ep_h, ucs_status_t st) {
  auto* p = static_cast<Peer*>(arg);
  // The thread is inside progress: only record; housekeeping() closes the endpoint.
  if (!p->failed) {
    p->failed = true;
    p->err = ucs_err(st);
  }
}

void Engine::Impl::on_server_error(void* arg, ucp_ep_h, ucs_status_t) {
  auto* s = static_cast<detail::ServerEp*>(arg);
  s->failed = true;
}

void Engine::Impl::on_conn_request(ucp_conn_request_h req, void* arg) {
  auto* eng = static_cast<Impl*>(arg);
  auto s = std::make_unique<detail::ServerEp>();
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.conn_request = req;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = on_server_error;
  ep.err_handler.arg = s.get();
  if (eng->stopping || ucp_ep_create(eng->worker, &ep, &s->ep) != UCS_OK) {
    ucp_listener_reject(eng->listener, req);
    return;
  }
  eng->server_eps.push_back(std::move(s));
}

ucs_status_t Engine::Impl::on_am(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                 const ucp_am_recv_param_t* param) {
  auto* eng = static_cast<Impl*>(arg);
  // Notifies are sent eager (UCP_AM_SEND_FLAG_EAGER), so the data is always here; anything else is foreign.
  if (header_len != sizeof(uint64_t) || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    eng->st_failures++;
    return UCS_OK;
  }
  uint64_t key;
  std::memcpy(&key, header, sizeof key);
  eng->inbox.emplace_back(key, std::string(static_cast<const char*>(data), len));
  return UCS_OK;
}

// ---------------------------------------------------------------- peers

Result<std::shared_ptr<Peer>> Engine::Impl::get_peer(const std::string& addr) {
  auto it = peers.find(addr);
  if (it != peers.end()) {
    if (!it->second->failed) return it->second;
    peer_failed(std::shared_ptr<Peer>(it->second), it->second->err);  // drops it from the map
  }
  std::string h;
  int p = 0;
  if (!split_address(addr, &h, &p)) return make_error("bad peer address '%s' (expected host:port)", addr.c_str());
  socklen_t len = 0;
  auto sa = resolve(h, p, false, &len);
  if (!sa.ok()) return make_error("peer %s: %s", addr.c_str(), sa.error().c_str());
  auto peer = std::make_shared<Peer>();
  peer->addr = addr;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa.value());
  ep.sockaddr.addrlen = len;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // a dead peer fails our requests instead of hanging them
  ep.err_handler.cb = on_client_error;
  ep.err_handler.arg = peer.get();
  ucs_status_t st = ucp_ep_create(worker, &ep, &peer->ep);
  if (st != UCS_OK) return make_error("connect to %s: %s", addr.c_str(), ucs_status_string(st));
  peers[addr] = peer;
  st_peers++;
  // Rkeys are unpacked against the endpoint's final transports, so ops wait for wire-up: a flush
  // completes once the endpoint is connected.
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  rp.cb.send = on_connect_flush;
  rp.user_data = peer.get();
  ucs_status_ptr_t sp = ucp_ep_flush_nbx(peer->ep, &rp);
  if (sp == nullptr) {
    peer->ready = true;
  } else if (UCS_PTR_IS_ERR(sp)) {
    peer_failed(peer, ucs_err(UCS_PTR_STATUS(sp)));
  } else {
    static_cast<ReqInfo*>(sp)->eng = this;
    peer->reqs++;
  }
  return peer;
}

void Engine::Impl::close_ep(ucp_ep_h ep, std::shared_ptr<Peer> p) {
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  rp.flags = UCP_EP_CLOSE_FLAG_FORCE;  // no goodbye: the peer is dead, stuck, or we are shutting down
  ucs_status_ptr_t sp = ucp_ep_close_nbx(ep, &rp);
  if (sp != nullptr && !UCS_PTR_IS_ERR(sp)) closing.push_back({sp, std::move(p)});
  else if (p) closing.push_back({nullptr, std::move(p)});  // keep it until its own requests are gone
}

void Engine::Impl::peer_failed(const std::shared_ptr<Peer>& p, const std::string& why) {
  if (!p->failed) {
    p->failed = true;
    p->err = why;
  }
  if (!p->ep) return;
  auto it = peers.find(p->addr);
  if (it != peers.end() && it->second == p) {
    peers.erase(it);
    st_peers--;
  }
  ucp_ep_h ep = p->ep;
  p->ep = nullptr;
  close_ep(ep, p);  // purges its requests: their callbacks fail the ops
  all_dirty = true;
}

// ---------------------------------------------------------------- ops

void Engine::Impl::start(const std::shared_ptr<OpImpl>& op) {
  active.push_back(op);
  mark(op.get());
  if (stopping) return op->fail(FailKind::Cancel, "cancelled (engine shut down)");
  if (op->cancel_requested_) return op->fail(FailKind::Cancel, "cancelled");
  if (Clock::now() >= op->deadline) return op->fail(FailKind::Timeout, "timed out before start");
  if (op->kind != Kind::Notify) {
    size_t lsize = 0;
    {
      std::lock_guard l(reg_mu);
      auto it = regions.find(op->region);
      if (it == regions.end()) return op->fail(FailKind::Error, "unknown local region " + std::to_string(op->region));
      it->second.busy++;
      op->holds_region = true;
      op->lbase = it->second.base;
      op->memh = it->second.memh;
      lsize = it->second.size;
    }
    auto d = decode_desc(op->desc_str);
    if (!d.ok()) return op->fail(FailKind::Error, d.error());
    op->desc = std::move(d.value());
    for (size_t i = 0; i < op->segs.size(); i++) {
      const Segment& s = op->segs[i];
      char buf[200];
      if (s.local_offset > lsize || s.bytes > lsize - s.local_offset) {
        std::snprintf(buf, sizeof buf, "segment %zu: local range [%llu, +%llu) outside region %d of %zu bytes", i,
                      (unsigned long long)s.local_offset, (unsigned long long)s.bytes, op->region, lsize);
        return op->fail(FailKind::Error, buf);
      }
      if (s.remote_offset > op->desc.size || s.bytes > op->desc.size - s.remote_offset) {
        std::snprintf(buf, sizeof buf, "segment %zu: remote range [%llu, +%llu) outside remote region of %llu bytes", i,
                      (unsigned long long)s.remote_offset, (unsigned long long)s.bytes,
                      (unsigned long long)op->desc.size);
        return op->fail(FailKind::Error, buf);
      }
    }
  } else if (op->payload.size() > kMaxPayload) {
    return op->fail(FailKind::Error, "notify payload of " + std::to_string(op->payload.size()) + " bytes exceeds 1 MiB");
  }
  auto p = get_peer(op->peer_addr);
  if (!p.ok()) return op->fail(FailKind::Error, p.error());
  op->peer = p.value();
  if (op->kind == Kind::Write) {
    op->seq = op->peer->next_seq++;
    op->peer->active_writes.insert(op->seq);
  } else if (op->kind == Kind::Notify) {
    op->seq = op->peer->next_seq;  // waits for every write started before it
    op->peer->notifies++;
  }
}

void Engine::Impl::pump(OpImpl* op) {
  Peer& p = *op->peer;
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  if (op->memh) {
    rp.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    rp.memh = op->memh;
  }
  rp.cb.send = on_data;
  rp.user_data = op;
  // Shared memory completes in the call, so the window never fills: a budget per round keeps
  // deadlines, cancels and other ops going between rounds.
  uint64_t budget = kMaxBytes;
  while (op->next_seg < op->segs.size() && op->data_out < kMaxReqs && op->data_bytes_out < kMaxBytes) {
    if (budget == 0) return mark(op);
    const Segment& s = op->segs[op->next_seg];
    uint64_t n = std::min(s.bytes - op->seg_off, kChunk);
    char* local = op->lbase + s.local_offset + op->seg_off;
    uint64_t remote = op->desc.base + s.remote_offset + op->seg_off;
    // Segments that continue this one on both sides (consecutive KV blocks) go as one request: UCX's
    // software RMA acknowledges every put, so fewer and larger requests are what moves the needle.
    size_t last = op->next_seg;
    if (op->seg_off + n == s.bytes) {
      for (; last + 1 < op->segs.size(); last++) {
        const Segment &u = op->segs[last], &t = op->segs[last + 1];
        if (t.local_offset != u.local_offset + u.bytes || t.remote_offset != u.remote_offset + u.bytes ||
            n + t.bytes > kChunk)
          break;
        n += t.bytes;
      }
    }
    budget -= std::min(budget, std::max<uint64_t>(n, 4096));
    if (n > 0) {
      ucs_status_ptr_t sp = op->kind == Kind::Write ? ucp_put_nbx(p.ep, local, n, remote, op->rkey->h, &rp)
                                                    : ucp_get_nbx(p.ep, local, n, remote, op->rkey->h, &rp);
      if (UCS_PTR_IS_ERR(sp)) {
        return op->fail(FailKind::Error, "transfer with " + op->peer_addr + " failed: " + ucs_err(UCS_PTR_STATUS(sp)));
      } else if (sp != nullptr) {
        *static_cast<ReqInfo*>(sp) = {n, this};
        op->data_out++;
        op->data_bytes_out += n;
      }
    }
    if (last > op->next_seg || op->seg_off + n >= s.bytes) {
      op->next_seg = last + 1;
      op->seg_off = 0;
    } else {
      op->seg_off += n;
    }
  }
}

// The op's flush (first) or its notify message (after the flush completed).
void Engine::Impl::post_ctrl(OpImpl* op) {
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  rp.cb.send = on_ctrl;
  rp.user_data = op;
  ucs_status_ptr_t sp;
  if (!op->flush_posted) {
    op->flush_posted = true;
    sp = ucp_ep_flush_nbx(op->peer->ep, &rp);
  } else {
    op->am_posted = true;
    rp.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = UCP_AM_SEND_FLAG_EAGER;  // the receiver's handler always gets the whole payload at once
    sp = ucp_am_send_nbx(op->peer->ep, kAmId, &op->key, sizeof op->key, op->payload.data(), op->payload.size(), &rp);
  }
  if (sp == nullptr) {
    (op->am_posted ? op->am_done : op->flush_done) = true;
  } else if (UCS_PTR_IS_ERR(sp)) {
    op->fail(FailKind::Error, "transfer with " + op->peer_addr + " failed: " + ucs_err(UCS_PTR_STATUS(sp)));
  } else {
    static_cast<ReqInfo*>(sp)->eng = this;
    op->ctrl_out++;
  }
}

void Engine::Impl::advance(OpImpl* op) {
  if (op->retired) return;
  if (!op->failed && !op->user_done) {
    if (op->cancel_requested_) op->fail(FailKind::Cancel, "cancelled");
    else if (op->peer && op->peer->failed) op->fail(FailKind::Error, "peer " + op->peer_addr + " failed: " + op->peer->err);
  }
  if (!op->failed && !op->user_done && op->peer->ready) {
    Peer& p = *op->peer;
    if (op->kind == Kind::Notify) {
      bool prior_done = p.active_writes.empty() || *p.active_writes.begin() >= op->seq;
      if (prior_done && !op->flush_posted) post_ctrl(op);  // also covers failed writes' stragglers
      if (!op->failed && op->flush_done && !op->am_posted) post_ctrl(op);
      if (!op->failed && op->am_done) complete_user(op, Status::Ok());
    } else {
      if (!op->rkey) {
        auto it = p.rkeys.find(op->desc_str);
        if (it != p.rkeys.end()) {
          op->rkey = it->second;
        } else {
          auto rk = std::make_shared<detail::RKey>();
          ucs_status_t st = ucp_ep_rkey_unpack(p.ep, op->desc.rkey.data(), &rk->h);
          if (st != UCS_OK) {
            rk->h = nullptr;
            op->fail(FailKind::Error, "remote_desc: cannot unpack its rkey: " + ucs_err(st));
          } else {
            if (p.rkeys.size() >= 256) std::erase_if(p.rkeys, [](auto& kv) { return kv.second.use_count() == 1; });
            p.rkeys.emplace(op->desc_str, rk);
            op->rkey = std::move(rk);
          }
        }
      }
      if (!op->failed) pump(op);
      bool posted = op->next_seg >= op->segs.size();
      if (!op->failed && posted && op->kind == Kind::Write && !op->flush_posted) post_ctrl(op);
      if (!op->failed && posted && op->data_out == 0 && (op->kind == Kind::Read || op->flush_done))
        complete_user(op, Status::Ok());
    }
  }
  // Done for the user only once UCX no longer touches the op's local memory.
  if (op->failed && !op->user_done && op->data_out == 0) complete_user(op, make_error("%s", op->fail_msg.c_str()));
  if (op->user_done && op->data_out == 0 && op->ctrl_out == 0) {
    op->retired = true;
    op->peer.reset();
    op->rkey.reset();
  }
}

void Engine::Impl::complete_user(OpImpl* op, Status st) {
  op->user_done = true;
  if (op->holds_region) {
    std::lock_guard l(reg_mu);
    auto it = regions.find(op->region);
    LARDER_ASSERT(it != regions.end() && it->second.busy > 0);
    it->second.busy--;
    op->holds_region = false;
  }
  if (op->peer && op->kind == Kind::Write) {
    op->peer->active_writes.erase(op->seq);
    if (op->peer->notifies > 0) all_dirty = true;  // a notify may wait for this write
  }
  if (op->peer && op->kind == Kind::Notify) op->peer->notifies--;
  st_in_flight--;
  st_ops++;
  if (st.ok()) st_bytes += static_cast<int64_t>(op->bytes());
  else if (op->fail_kind == FailKind::Timeout) st_timeouts++;
  else if (op->fail_kind == FailKind::Cancel) st_cancelled++;
  else st_failures++;
  op->finish(std::move(st));
}

void Engine::Impl::check_deadlines(Clock::time_point now) {
  for (auto& op : active) {
    if (op->user_done) continue;
    if (!op->failed && now >= op->deadline) {
      op->fail(FailKind::Timeout, "timed out (deadline reached)");
      mark(op.get());
    }
    // A window that does not drain: the peer is stuck; closing the endpoint cancels its requests.
    if (op->failed && now - op->fail_time > kGrace && op->peer && op->peer->ep)
      peer_failed(op->peer, "stalled: requests did not complete after the op failed");
  }
}

// ---------------------------------------------------------------- the engine thread

bool Engine::Impl::drain_queue() {
  std::vector<detail::Queue::Item> items;
  bool cancel = false;
  {
    std::lock_guard l(q->mu);
    items.swap(q->items);
    std::swap(cancel, q->cancel_pending);
  }
  for (auto& it : items) {
    if (it.op) {
      start(it.op);
    } else if (it.task) {
      (*it.task)();
      it.task_done->set_value();
    } else if (it.stop) {
      stopping = true;
    }
  }
  if (cancel)
    for (auto& op : active)
      if (op->cancel_requested_) mark(op.get());
  return !items.empty() || cancel;
}

bool Engine::Impl::housekeeping() {
  bool did = false;
  // Peers whose error handler ran during progress.
  for (auto it = peers.begin(); it != peers.end();) {
    auto p = (it++)->second;
    if (p->failed) {
      peer_failed(p, p->err);
      did = true;
    }
  }
  for (auto& s : server_eps) {
    if (s->failed && s->ep) {
      close_ep(s->ep, nullptr);
      s->ep = nullptr;
      did = true;
    }
  }
  std::erase_if(server_eps, [](auto& s) { return s->ep == nullptr; });
  std::erase_if(closing, [](Closing& c) {
    if (c.req) {
      if (ucp_request_check_status(c.req) == UCS_INPROGRESS) return false;
      ucp_request_free(c.req);
      c.req = nullptr;
    }
    return !c.peer || c.peer->reqs == 0;
  });
  if (stopping) inbox.clear();  // the handler's objects may be gone already
  if (!inbox.empty()) {
    std::shared_ptr<std::function<void(uint64_t, std::string)>> h;
    {
      std::lock_guard l(handler_mu);
      h = handler;
    }
    auto msgs = std::move(inbox);
    inbox.clear();
    for (auto& [k, v] : msgs)
      if (h && *h) (*h)(k, std::move(v));
    did = true;
  }
  if (all_dirty) {
    all_dirty = false;
    for (auto& op : active) mark(op.get());
  }
  if (!dirty.empty()) {  // one round: ops marked again meanwhile wait for the next loop
    auto d = std::move(dirty);
    dirty.clear();
    for (OpImpl* op : d) op->dirty = false;
    for (OpImpl* op : d) advance(op);
    did = true;
  }
  std::erase_if(active, [](auto& op) { return op->retired && !op->dirty; });  // dirty: still in `dirty`
  return did;
}

void Engine::Impl::sleep(Clock::time_point now, int timeout_ms) {
  {
    std::lock_guard l(q->mu);
    if (!q->items.empty() || q->cancel_pending) return;
    q->sleeping = true;
  }
  ucs_status_t st = ucp_worker_arm(worker);  // UCS_ERR_BUSY: events arrived meanwhile, go progress them
  for (auto& op : active) {
    if (op->user_done) continue;
    auto t = op->failed ? op->fail_time + kGrace : op->deadline;
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t - now).count() + 1;
    timeout_ms = static_cast<int>(std::clamp<int64_t>(ms, 0, timeout_ms));
  }
  if (st == UCS_OK) {
    epoll_event evs[4];
    int n = epoll_wait(epfd, evs, 4, timeout_ms);
    for (int i = 0; i < n; i++) {
      if (evs[i].data.fd == q->efd) {
        uint64_t v;
        ssize_t r = ::read(q->efd, &v, sizeof v);
        (void)r;
      }
    }
  } else if (st != UCS_ERR_BUSY) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));  // no wakeup support: poll gently
  }
  std::lock_guard l(q->mu);
  q->sleeping = false;
}

void Engine::Impl::run() {
  auto last = Clock::now();
  while (!stopping) {
    bool did = drain_queue();
    if (stopping) break;
    for (int i = 0; i < 64 && ucp_worker_progress(worker); i++) did = true;
    did |= housekeeping();
    auto now = Clock::now();
    if (!active.empty()) check_deadlines(now);
    if (did) {
      last = now;
    } else if (now - last > kSpin) {
      // Not every UCX event wakes the worker's fd (a sleep of 100 ms with ops in flight stalled them),
      // so while busy the thread also polls each ms; spinning longer only takes the CPU from the peer
      // process on a small machine.
      sleep(now, !active.empty() || now - last < kWarm ? 1 : 100);
    }
  }
  shutdown();
}

void Engine::Impl::shutdown() {
  if (listener) ucp_listener_destroy(listener);
  listener = nullptr;
  {
    std::lock_guard l(q->mu);
    q->closed = true;
  }
  drain_queue();  // ops queued until now start cancelled
  for (auto& op : active) {
    op->fail(FailKind::Cancel, "cancelled (engine shut down)");
    mark(op.get());
  }
  housekeeping();
  // Let data already handed to UCX (e.g. a notify just sent) leave before the endpoints close.
  int pending = 0;
  auto on_done = [](void* req, ucs_status_t, void* arg) {
    --*static_cast<int*>(arg);
    ucp_request_free(req);
  };
  std::vector<ucp_ep_h> eps;
  for (auto& [a, p] : peers)
    if (!p->failed && p->ready) eps.push_back(p->ep);
  for (auto& s : server_eps)  // replies of UCX's own (e.g. software RMA acks) still queued there
    if (!s->failed && s->ep) eps.push_back(s->ep);
  for (ucp_ep_h ep : eps) {
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    rp.cb.send = on_done;
    rp.user_data = &pending;
    ucs_status_ptr_t sp = ucp_ep_flush_nbx(ep, &rp);
    if (sp != nullptr && !UCS_PTR_IS_ERR(sp)) pending++;
  }
  auto until = Clock::now() + std::chrono::milliseconds(500);
  while (pending > 0 && Clock::now() < until) {
    ucp_worker_progress(worker);
    housekeeping();
  }
  for (auto& [a, p] : peers) {
    if (p->ep) close_ep(p->ep, p);
    p->ep = nullptr;
  }
  peers.clear();
  st_peers = 0;
  for (auto& s : server_eps)
    if (s->ep) close_ep(s->ep, nullptr);
  server_eps.clear();
  until = Clock::now() + std::chrono::seconds(2);
  do {
    ucp_worker_progress(worker);
    housekeeping();
  } while ((!closing.empty() || pending > 0 || !active.empty()) && Clock::now() < until);
  for (auto& op : active) {  // only if UCX never completed a request: give up on it
    if (!op->user_done) complete_user(op.get(), make_error("cancelled (engine shut down)"));
    op->peer.reset();
    op->rkey.reset();
  }
  active.clear();
  for (auto& c : closing)
    if (c.req) ucp_request_free(c.req);
  closing.clear();
  std::lock_guard l(reg_mu);
  for (auto& [id, r] : regions) ucp_mem_unmap(ctx, r.memh);
  regions.clear();
}

// ---------------------------------------------------------------- Engine

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<Engine>> Engine::create(const EngineParams& p) {
  auto impl = std::make_unique<Impl>();
  impl->host = p.host;
  impl->port = p.port;
  Status st = impl->init();
  if (!st.ok()) {
    if (impl->listener) ucp_listener_destroy(impl->listener);
    return make_error("transfer engine: %s", st.error().c_str());
  }
  Impl* raw = impl.get();
  raw->thread = std::thread([raw] { raw->run(); });  // from here on only this thread calls UCX
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::~Engine() {
  detail::Queue::Item it;
  it.stop = true;
  impl_->q->push(std::move(it));
  impl_->thread.join();
}

std::string Engine::address() const {
  bool v6 = impl_->host.find(':') != std::string::npos;
  return (v6 ? "[" + impl_->host + "]" : impl_->host) + ":" + std::to_string(impl_->port);
}

// Maps (registers, or with base == nullptr allocates through UCX) on the engine thread.
static Result<Allocation> map_region(Engine::Impl* m, void* base, size_t bytes);

Result<int> Engine::register_memory(void* base, size_t bytes) {
  if (!base || bytes == 0) return make_error("register_memory: empty range");
  auto r = map_region(impl_.get(), base, bytes);
  if (!r.ok()) return r.take_error();
  return r.value().region;
}

Result<Allocation> Engine::allocate_memory(size_t bytes) {
  if (bytes == 0) return make_error("allocate_memory: zero bytes");
  return map_region(impl_.get(), nullptr, bytes);
}

static Result<Allocation> map_region(Engine::Impl* m, void* base, size_t bytes) {
  const char* what = base ? "register_memory" : "allocate_memory";
  Result<Allocation> out = make_error("%s: not run", what);
  Status st = m->run_sync([&] {
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    mp.address = base;
    mp.length = bytes;
    mp.flags = base ? 0 : UCP_MEM_MAP_ALLOCATE;
    ucp_mem_h memh = nullptr;
    ucs_status_t s = ucp_mem_map(m->ctx, &mp, &memh);
    if (s != UCS_OK) {
      out = make_error("%s of %zu bytes: %s", what, bytes, ucs_status_string(s));
      return;
    }
    ucp_mem_attr_t ma{};
    ma.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS;
    if (!base && ucp_mem_query(memh, &ma) == UCS_OK) base = ma.address;
    void* rk = nullptr;
    size_t rk_len = 0;
    s = base ? ucp_rkey_pack(m->ctx, memh, &rk, &rk_len) : UCS_ERR_NO_MEMORY;
    if (s != UCS_OK) {
      ucp_mem_unmap(m->ctx, memh);
      out = make_error("%s: rkey pack: %s", what, ucs_status_string(s));
      return;
    }
    Engine::Impl::Region r;
    r.base = static_cast<char*>(base);
    r.size = bytes;
    r.memh = memh;
    r.desc = encode_desc(reinterpret_cast<uint64_t>(base), bytes, rk, rk_len);
    ucp_rkey_buffer_release(rk);
    std::lock_guard l(m->reg_mu);
    int id = m->next_region++;
    m->regions.emplace(id, std::move(r));
    out = Allocation{id, base};
  });
  if (!st.ok()) return st.take_error();
  return out;
}

Status Engine::unregister_memory(int region) {
  Impl* m = impl_.get();
  Status out;
  Status st = m->run_sync([&] {
    std::lock_guard l(m->reg_mu);
    auto it = m->regions.find(region);
    if (it == m->regions.end()) {
      out = make_error("unregister_memory: unknown region %d", region);
    } else if (it->second.busy > 0) {
      out = make_error("unregister_memory: region %d is used by %d ops in flight", region, it->second.busy);
    } else {
      ucp_mem_unmap(m->ctx, it->second.memh);
      m->regions.erase(it);
    }
  });
  return st.ok() ? out : st;
}

Result<std::string> Engine::describe(int region) const {
  std::lock_guard l(impl_->reg_mu);
  auto it = impl_->regions.find(region);
  if (it == impl_->regions.end()) return make_error("describe: unknown region %d", region);
  return it->second.desc;
}

static std::shared_ptr<OpImpl> make_op(Kind k, const std::string& peer, std::chrono::steady_clock::time_point deadline) {
  auto op = std::make_shared<OpImpl>();
  op->kind = k;
  op->peer_addr = peer;
  op->deadline = deadline;
  return op;
}

static std::shared_ptr<Op> data_op(Engine::Impl* m, Kind k, const std::string& peer, const std::string& desc,
                                   int region, std::vector<Segment> segs, Clock::time_point deadline) {
  auto op = make_op(k, peer, deadline);
  op->desc_str = desc;
  op->region = region;
  for (auto& s : segs) op->bytes_ += s.bytes;
  op->segs = std::move(segs);
  m->submit(op);
  return op;
}

std::shared_ptr<Op> Engine::write(const std::string& peer_address, const std::string& remote_desc, int local_region,
                                  std::vector<Segment> segs, std::chrono::steady_clock::time_point deadline) {
  return data_op(impl_.get(), Kind::Write, peer_address, remote_desc, local_region, std::move(segs), deadline);
}

std::shared_ptr<Op> Engine::read(const std::string& peer_address, const std::string& remote_desc, int local_region,
                                 std::vector<Segment> segs, std::chrono::steady_clock::time_point deadline) {
  return data_op(impl_.get(), Kind::Read, peer_address, remote_desc, local_region, std::move(segs), deadline);
}

std::shared_ptr<Op> Engine::notify(const std::string& peer_address, uint64_t key, std::string payload,
                                   std::chrono::steady_clock::time_point deadline) {
  auto op = make_op(Kind::Notify, peer_address, deadline);
  op->key = key;
  op->bytes_ = payload.size();
  op->payload = std::move(payload);
  impl_->submit(op);
  return op;
}

void Engine::set_notify_handler(std::function<void(uint64_t key, std::string payload)> f) {
  auto h = std::make_shared<std::function<void(uint64_t, std::string)>>(std::move(f));
  std::lock_guard l(impl_->handler_mu);
  impl_->handler = std::move(h);
}

EngineStats Engine::stats() const {
  const Impl& m = *impl_;
  return {m.st_ops.load(),       m.st_bytes.load(),     m.st_failures.load(), m.st_timeouts.load(),
          m.st_cancelled.load(), m.st_in_flight.load(), m.st_peers.load()};
}

}  // namespace larder::transfer
