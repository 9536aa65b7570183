// The sparse FFN at run time: active sets from the resident gate, the per-layer neuron cache, the
// reader pool, and the up dots / down accumulation over active neurons only.
#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>

#include "kernels/kernels.h"
#include "model/model.h"
#include "offload/offload.h"
#include "offload/offload_internal.h"

namespace larder::offload {

float activation(float g, bool gelu) {
  if (gelu) {
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
  }
  return g / (1.f + std::exp(-g));
}

namespace {
using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
uint8_t* alloc_aligned(size_t n) {
  void* p = std::aligned_alloc(4096, round_up(std::max<size_t>(n, 1), 4096));
  if (p) std::memset(p, 0, round_up(std::max<size_t>(n, 1), 4096));  // preallocated: fault every page in now
  return static_cast<uint8_t*>(p);
}
}  // namespace

// One layer's neuron cache: a preallocated [capacity][record] matrix; rows [0, n) hold neurons.
struct IoTicket {
  size_t pending = 0;
  std::string err;
};

struct SparseFfn::Layer {
  LayerLayout lay;
  IoTicket reads;                  // this step's reads of missing neurons
  IoTicket ahead;                  // a prefetch issued from the layer before (may be in flight)
  std::vector<int32_t> prefetched;  // neurons the last prefetch brought in
  bool ahead_issued = false;        // a prefetch was submitted and not yet waited for
  uint8_t* cache = nullptr;
  int n = 0;
  std::vector<int32_t> slot_of;    // [n_ff] slot or -1
  std::vector<int32_t> neuron_of;  // [capacity]
  std::vector<int64_t> last;       // [capacity] step the slot's neuron was last active
  int64_t step = 0;
  ~Layer() { std::free(cache); }
  void clear() {
    n = 0;
    std::fill(slot_of.begin(), slot_of.end(), -1);
  }
};

// A pool of reader threads: each job is one pread (a run of consecutive neurons' records), checked
// against the index by the thread that read it. Jobs belong to a ticket (one layer's reads, or one
// layer's prefetch); urgent jobs (what a layer waits for now) go before prefetches.
struct SparseFfn::IoPool {
  using Ticket = IoTicket;
  struct Job {
    uint64_t off;
    size_t len;
    uint8_t* dst;
    int layer;
    Ticket* ticket = nullptr;
  };
  // fd: the layout, O_DIRECT when direct; fd_buffered: the same file without it, for devices whose
  // logical block is larger than the records' 512-byte alignment (4Kn disks, 4K-sector LUKS): a direct
  // read that fails with EINVAL is done buffered instead (pages dropped after).
  IoPool(const SparseFfn* owner, int fd, int fd_buffered, int n, bool direct)
      : owner_(owner), fd_(fd), fd_buffered_(fd_buffered), direct_(direct) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { run(); });
  }
  ~IoPool() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void submit(std::vector<Job>& jobs, Ticket* t, bool urgent) {
    if (jobs.empty()) return;
    std::lock_guard<std::mutex> g(mu_);
    t->pending += jobs.size();
    for (Job& j : jobs) {
      j.ticket = t;
      (urgent ? urgent_ : later_).push_back(j);
    }
    cv_.notify_all();
  }
  // Waits for the ticket's jobs; returns their first error ("" = all read and checked) and resets it.
  std::string wait(Ticket* t) {
    std::unique_lock<std::mutex> g(mu_);
    done_cv_.wait(g, [&] { return t->pending == 0; });
    std::string e;
    e.swap(t->err);
    return e;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> g(mu_);
    for (;;) {
      cv_.wait(g, [&] { return stop_ || !urgent_.empty() || !later_.empty(); });
      if (stop_) return;
      auto& q = !urgent_.empty() ? urgent_ : later_;
      const Job j = q.front();
      q.pop_front();
      g.unlock();
      std::string e = read(j);
      g.lock();
      if (!e.empty() && j.ticket->err.empty()) j.ticket->err = e;
      if (--j.ticket->pending == 0) done_cv_.notify_all();
    }
  }
  std::string read(const Job& j) const {
    size_t got = 0;
    bool direct = direct_ && !unaligned_.load(std::memory_order_relaxed);
    while (got < j.len) {
      ssize_t r = pread(direct ? fd_ : fd_buffered_, j.dst + got, j.len - got, static_cast<off_t>(j.off + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && errno == EINVAL && direct) {
        unaligned_ = true;
        direct = false;
        continue;
      }
      if (r < 0) return std::string("read failed: ") + std::strerror(errno);
      if (r == 0) return "short read (file truncated)";
      got += static_cast<size_t>(r);
    }
    // Buffered: drop the pages so the next read of them comes from the disk again.
    if (!direct)
      posix_fadvise(fd_buffered_, static_cast<off_t>(j.off), static_cast<off_t>(j.len), POSIX_FADV_DONTNEED);
    const LayerLayout& ll = owner_->layers_[j.layer]->lay;
    const auto first = static_cast<int32_t>((j.off - ll.offset) / ll.record_bytes);
    for (size_t r = 0; r < j.len / ll.record_bytes; ++r)
      if (!owner_->verify(j.layer, first + static_cast<int32_t>(r), j.dst + r * ll.record_bytes))
        return "layer " + std::to_string(j.layer) + " neuron " + std::to_string(first + r) +
               " fails its checksum (file corrupt); run larder offload-prepare again";
    return "";
  }
  const SparseFfn* owner_;
  int fd_, fd_buffered_;
  bool direct_;
  mutable std::atomic<bool> unaligned_{false};
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Job> urgent_, later_;
  bool stop_ = false;
};

SparseFfn::~SparseFfn() {
  io_.reset();
  layers_.clear();
  std::free(scratch_);
  std::free(overflow_);
  if (fd_ >= 0) ::close(fd_);
  if (fd_buffered_ >= 0 && fd_buffered_ != fd_) ::close(fd_buffered_);
}

Result<std::unique_ptr<SparseFfn>> SparseFfn::open(const Model& m, const Params& p) {
  LARDER_CHECK_STATUS(check_gated_ffn(m));
  const ModelConfig& c = m.cfg;
  std::unique_ptr<SparseFfn> s(new SparseFfn());
  s->model_ = &m;
  s->n_layer_ = c.n_layer;
  s->E_ = c.n_embd;
  s->F_ = c.n_ff;
  s->gelu_ = c.ffn_act == FfnAct::GELU_TANH;
  s->window_ = std::max(1, p.window);
  s->static_ = p.static_cache;
  s->prefetch_ = p.prefetch;
  if (p.thresholds.empty()) s->thr_.assign(c.n_layer, 0.f);
  else if (static_cast<int>(p.thresholds.size()) != c.n_layer)
    return make_error("FFN thresholds: %zu values for %d layers", p.thresholds.size(), c.n_layer);
  else s->thr_ = p.thresholds;
  if (p.io_threads < 1 || p.io_threads > 256) return make_error("--ffn-io-threads must be 1..256");

  // Resident weights: everything but the up and down projections (and an untied embedding
  // table, whose rows are looked up one per token from the mapped file).
  int64_t resident = 0;
  auto add = [&](const Tensor& t) { resident += t.present() ? static_cast<int64_t>(t.nbytes) : 0; };
  if (m.tok_embd.data == m.output.data) add(m.output);
  else add(m.output);
  add(m.output_norm);
  for (const LayerWeights& L : m.layers)
    for (const Tensor* t : L.all())
      if (t != &L.ffn_up && t != &L.ffn_down) add(*t);
  s->resident_bytes_ = resident;

  std::vector<LayerLayout> lays(c.n_layer);
  if (!p.dir.empty()) {
    LARDER_TRY(info, read_layout(m, p.dir));
    lays = info.layers;
    s->sums_ = std::move(info.sums);
    const std::string path = (std::filesystem::path(p.dir) / "ffn.bin").string();
    s->direct_ = p.direct;
    s->fd_ = p.direct ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT) : -1;
    if (s->fd_ < 0) {
      s->direct_ = false;
      s->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    }
    if (s->fd_ < 0) return make_error("cannot open '%s': %s", path.c_str(), std::strerror(errno));
    s->fd_buffered_ = s->direct_ ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC) : s->fd_;
    if (s->fd_buffered_ < 0) return make_error("cannot open '%s': %s", path.c_str(), std::strerror(errno));
  } else {
    LARDER_CHECK_STATUS(check_down_type(m, p.down_type));
    s->in_memory_ = true;
    for (int l = 0; l < c.n_layer; ++l) lays[l] = layer_layout(m, l, layer_down_type(m, l, p.down_type));
  }
  size_t per_neuron = 0;  // one neuron of every layer
  for (const LayerLayout& ll : lays) per_neuron += ll.record_bytes, s->max_rec_ = std::max(s->max_rec_, ll.record_bytes);

  int cap = c.n_ff;
  if (!s->in_memory_ && p.dram_budget > 0) {
    const int64_t avail = p.dram_budget - resident;
    // The naive baseline reads the missing neurons of every step into a scratch matrix: its DRAM too.
    const double per = s->static_ ? static_cast<double>(per_neuron) - s->max_rec_ : static_cast<double>(per_neuron);
    // The window cache stages reads that span gaps in a scratch buffer of up to 8 MiB, and holds the
    // records no slot or scratch can take in a layer-sized overflow buffer: their DRAM too.
    const double stage = static_cast<double>(std::min<size_t>(static_cast<size_t>(c.n_ff) * s->max_rec_, 8u << 20));
    const double fixed = static_cast<double>(c.n_ff) * s->max_rec_ + (s->static_ ? 0.0 : stage);
    const double n = (static_cast<double>(avail) - fixed) / std::max(per, 1.0);
    if (avail <= 0 || n < 1)
      return make_error("weights DRAM budget of %.1f MiB is below what must stay resident (attention, norms, embeddings, "
                        "gates: %.1f MiB, plus read buffers and one neuron per layer: %.2f MiB)",
                        p.dram_budget / 1048576.0, resident / 1048576.0, (fixed + per_neuron) / 1048576.0);
    cap = static_cast<int>(std::min<double>(c.n_ff, n));
  }
  s->capacity_ = cap;
  ThreadPool build_pool(s->in_memory_ ? default_thread_count() : 1);
  for (int l = 0; l < c.n_layer; ++l) {
    auto L = std::make_unique<Layer>();
    L->lay = lays[l];
    L->cache = alloc_aligned(static_cast<size_t>(cap) * lays[l].record_bytes);
    if (!L->cache) return make_error("out of memory allocating the FFN neuron cache");
    s->cache_bytes_ += static_cast<int64_t>(round_up(static_cast<size_t>(cap) * lays[l].record_bytes, 4096));
    L->slot_of.assign(c.n_ff, -1);
    L->neuron_of.assign(cap, -1);
    L->last.assign(cap, 0);
    if (s->in_memory_) {  // every record built from the model: nothing is ever read
      build_records(m, l, lays[l], L->cache, build_pool);
      for (int j = 0; j < c.n_ff; ++j) L->slot_of[j] = j, L->neuron_of[j] = j;
      L->n = c.n_ff;
    }
    s->layers_.push_back(std::move(L));
  }
  if (!s->in_memory_) {
    s->io_ = std::make_unique<IoPool>(s.get(), s->fd_, s->fd_buffered_, p.io_threads, s->direct_);
    if (s->static_) {  // pin neurons [0, cap) of every layer, read once now
      for (int l = 0; l < c.n_layer; ++l) {
        Layer& L = *s->layers_[l];
        std::vector<IoPool::Job> jobs;
        const size_t chunk = std::max<size_t>(1, (4u << 20) / L.lay.record_bytes);
        for (size_t j = 0; j < static_cast<size_t>(cap); j += chunk) {
          const size_t k = std::min(chunk, static_cast<size_t>(cap) - j);
          jobs.push_back({L.lay.offset + j * L.lay.record_bytes, k * L.lay.record_bytes, L.cache + j * L.lay.record_bytes, l});
        }
        IoPool::Ticket t;
        s->io_->submit(jobs, &t, true);
        std::string e = s->io_->wait(&t);
        if (!e.empty()) return make_error("FFN offload layout '%s': %s", p.dir.c_str(), e.c_str());
        for (int j = 0; j < cap; ++j) L.slot_of[j] = j, L.neuron_of[j] = j;
        L.n = cap;
      }
      s->scratch_cap_ = static_cast<size_t>(c.n_ff - cap) * s->max_rec_;
    } else {
      s->scratch_cap_ = std::min<size_t>(static_cast<size_t>(c.n_ff) * s->max_rec_, 8u << 20);
      if (cap < c.n_ff) {
        s->overflow_ = alloc_aligned(static_cast<size_t>(c.n_ff) * s->max_rec_);
        if (!s->overflow_) return make_error("out of memory allocating the FFN read overflow");
        s->cache_bytes_ += static_cast<int64_t>(round_up(static_cast<size_t>(c.n_ff) * s->max_rec_, 4096));
      }
    }
    s->scratch_ = alloc_aligned(s->scratch_cap_);
    if (!s->scratch_) return make_error("out of memory allocating the FFN read scratch");
    s->cache_bytes_ += static_cast<int64_t>(round_up(s->scratch_cap_, 4096));
  }
  return s;
}

Status SparseFfn::prefetch(int l, const float* gate, int n) {
  if (!prefetch_ || in_memory_ || static_ || l < 0 || l >= n_layer_) return Status::Ok();
  Layer& L = *layers_[l];
  if (L.ahead_issued) return Status::Ok();  // one in flight already
  auto t0 = Clock::now();
  const LayerLayout& ll = L.lay;
  const int F = F_;
  const float thr = thr_[l];
  // The predicted set: neurons whose predicted |act| passes the threshold; those not cached are wanted.
  pred_.assign(F, 0);
  std::vector<int32_t> want;
  for (int j = 0; j < F; ++j) {
    bool a = thr <= 0;
    for (int t = 0; t < n && !a; ++t) a = std::abs(activation(gate[static_cast<size_t>(t) * F + j], gelu_)) > thr;
    pred_[j] = a;
    if (a && L.slot_of[j] < 0) want.push_back(j);
  }
  // Room: free slots, then the least recently active neurons the prediction does not want.
  const int room = capacity_ - L.n;
  if (static_cast<int>(want.size()) > room) {
    std::vector<int32_t> older;
    for (int sl = 0; sl < L.n; ++sl)
      if (L.neuron_of[sl] < 0 || !pred_[L.neuron_of[sl]]) older.push_back(sl);
    const int k = std::min<int>(static_cast<int>(want.size()) - room, static_cast<int>(older.size()));
    std::partial_sort(older.begin(), older.begin() + k, older.end(), [&](int a, int b) { return L.last[a] < L.last[b]; });
    older.resize(k);
    evict(L, older);
  }
  // Runs with gaps up to 16 KiB are one read into consecutive slots, as in forward() (gap neurons
  // come along; a copy of one already cached is a dead slot); runs that do not fit go tight.
  constexpr size_t kGapBytes = 16u << 10, kMaxRun = 1u << 20;
  const int64_t dead = std::numeric_limits<int64_t>::min() / 2;
  std::vector<IoPool::Job> jobs;
  std::vector<int32_t> got;
  int64_t bytes = 0;
  for (size_t i = 0; i < want.size() && L.n < capacity_;) {
    size_t i1 = i + 1;
    while (i1 < want.size() && static_cast<size_t>(want[i1] - want[i1 - 1] - 1) * ll.record_bytes <= kGapBytes &&
           static_cast<size_t>(want[i1] - want[i] + 1) * ll.record_bytes <= kMaxRun)
      ++i1;
    int span = want[i1 - 1] - want[i] + 1;
    if (span > capacity_ - L.n) {  // tight: just the wanted neurons, as many as fit
      i1 = i + 1;
      span = 1;
    }
    const int base = L.n;
    L.n += span;
    for (int j = want[i], k = 0; j <= want[i + (i1 - i) - 1]; ++j, ++k) {
      const int sl = base + k;
      if (L.slot_of[j] >= 0) {
        L.neuron_of[sl] = -1;
        L.last[sl] = dead;
        continue;
      }
      L.slot_of[j] = sl;
      L.neuron_of[sl] = j;
      L.last[sl] = L.step - window_ + 1;  // kept next step only if active then
      got.push_back(j);
    }
    uint8_t* dst = L.cache + static_cast<size_t>(base) * ll.record_bytes;
    const uint64_t off = ll.offset + static_cast<uint64_t>(want[i]) * ll.record_bytes;
    const size_t len = static_cast<size_t>(span) * ll.record_bytes;
    if (!jobs.empty() && jobs.back().off + jobs.back().len == off && jobs.back().dst + jobs.back().len == dst &&
        jobs.back().len + len <= kMaxRun)
      jobs.back().len += len;
    else
      jobs.push_back({off, len, dst, l});
    bytes += static_cast<int64_t>(len);
    i = i1;
  }
  want.swap(got);
  L.prefetched = want;
  stats_.prefetched += static_cast<int64_t>(want.size());
  stats_.prefetch_bytes += bytes;
  stats_.prefetch_reads += static_cast<int64_t>(jobs.size());
  io_->submit(jobs, &L.ahead, /*urgent=*/false);
  L.ahead_issued = true;
  stats_.cache_s += secs(t0, Clock::now());
  return Status::Ok();
}

void SparseFfn::evict(Layer& L, std::vector<int32_t>& holes) {
  // Each hole is filled by the last row (descending, so a moved row is never a later hole).
  std::sort(holes.begin(), holes.end(), std::greater<int>());
  const size_t rb = L.lay.record_bytes;
  for (int h : holes) {
    const int last = L.n - 1;
    if (L.neuron_of[h] >= 0) L.slot_of[L.neuron_of[h]] = -1;
    if (h != last) {
      std::memcpy(L.cache + static_cast<size_t>(h) * rb, L.cache + static_cast<size_t>(last) * rb, rb);
      L.neuron_of[h] = L.neuron_of[last];
      L.last[h] = L.last[last];
      if (L.neuron_of[h] >= 0) L.slot_of[L.neuron_of[h]] = h;
    }
    --L.n;
  }
}

bool SparseFfn::verify(int layer, int32_t neuron, const uint8_t* rec) const {
  if (sums_.empty()) return true;
  return XXH3_64bits(rec, layers_[layer]->lay.record_bytes) == sums_[static_cast<size_t>(layer) * F_ + neuron];
}

std::string SparseFfn::identity() const {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, thr_.data(), thr_.size() * sizeof(float));
  for (const auto& L : layers_) XXH3_64bits_update(st, &L->lay.down_type, sizeof L->lay.down_type);
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  char out[40];
  std::snprintf(out, sizeof out, "ffn-%016llx", static_cast<unsigned long long>(h));
  return out;
}

std::string SparseFfn::describe() const {
  char buf[512];
  double sp = 0;
  for (float t : thr_) sp += t > 0;
  std::snprintf(buf, sizeof buf,
                "ffn %s: %s, thresholds on %d of %d layers, cache %d of %d neurons per layer (%.1f MiB), resident "
                "weights %.1f MiB%s",
                in_memory_ ? "sparse (records in DRAM)" : "offload", static_ ? "static (naive)" : "window",
                static_cast<int>(sp), n_layer_, capacity_, F_, cache_bytes_ / 1048576.0, resident_bytes_ / 1048576.0,
                in_memory_ ? "" : direct_ ? ", O_DIRECT reads" : ", buffered reads (pages dropped)");
  return buf;
}

Status SparseFfn::forward(int l, float* x, float* gate, int n, ThreadPool& pool) {
  LARDER_ASSERT(l >= 0 && l < n_layer_ && n > 0);
  Layer& L = *layers_[l];
  const LayerLayout& ll = L.lay;
  const int E = E_, F = F_;
  const float thr = thr_[l];
  const bool gelu = gelu_;
  auto t0 = Clock::now();
  // Activations in place; a neuron is active for a token when |act| > thr (thr 0: all).
  mask_.resize(static_cast<size_t>(n) * F);
  pool.parallel_for(
      static_cast<int64_t>(n) * F,
      [&](int64_t b, int64_t e, int) {
        for (int64_t i = b; i < e; ++i) {
          const float a = activation(gate[i], gelu);
          gate[i] = a;
          mask_[i] = thr <= 0 || std::abs(a) > thr;
        }
      },
      4096);
  act_list_.clear();
  int64_t n_active = 0;
  for (int j = 0; j < F; ++j) {
    bool any = false;
    for (int t = 0; t < n; ++t) {
      const bool a = mask_[static_cast<size_t>(t) * F + j];
      n_active += a;
      any |= a;
    }
    if (any) act_list_.push_back(j);
  }
  const int A = static_cast<int>(act_list_.size());
  auto t1 = Clock::now();
  if (L.ahead_issued) {
    L.ahead_issued = false;
    // A prefetch from the layer before may still be landing in this cache: wait for it before
    // anything here reads or moves a slot.
    std::string e = io_->wait(&L.ahead);
    const double w = secs(t1, Clock::now());
    stats_.io_wait_s += w;
    stats_.prefetch_wait_s += w;
    t0 += Clock::now() - t1;  // (compute time excludes the wait)
    t1 = Clock::now();
    if (!e.empty()) {
      L.clear();
      L.prefetched.clear();
      return make_error("FFN offload: %s", e.c_str());
    }
    int64_t used = 0;
    for (int32_t j : L.prefetched) {
      bool act = false;
      for (int t = 0; t < n && !act; ++t) act = mask_[static_cast<size_t>(t) * F + j];
      used += act;
    }
    stats_.prefetch_used += used;
    L.prefetched.clear();
  }

  // Cache: hits refresh their step; out-of-window neurons leave (the last row moves into each
  // hole, descending, so a moved row is never a later hole); misses go to the end, the rest to scratch.
  ++L.step;
  std::vector<int32_t> miss;
  int64_t hits = 0;
  for (int j : act_list_) {
    const int s = L.slot_of[j];
    if (s >= 0) L.last[s] = L.step, ++hits;
    else miss.push_back(j);
  }
  if (!in_memory_ && !static_ && !miss.empty()) {
    std::vector<int32_t> holes;
    for (int s = 0; s < L.n; ++s)
      if (L.last[s] <= L.step - window_) holes.push_back(s);
    int over = L.n - static_cast<int>(holes.size()) + static_cast<int>(miss.size()) - capacity_;
    if (over > 0) {  // still too many: the least recently active of the window go too (never this step's)
      std::vector<int32_t> older;
      for (int s = 0; s < L.n; ++s)
        if (L.last[s] > L.step - window_ && L.last[s] < L.step) older.push_back(s);
      const int k = std::min<int>(over, static_cast<int>(older.size()));
      std::partial_sort(older.begin(), older.begin() + k, older.end(), [&](int a, int b) { return L.last[a] < L.last[b]; });
      holes.insert(holes.end(), older.begin(), older.begin() + k);
    }
    evict(L, holes);
  }
  // Reads: runs of missing neurons whose gaps are at most kGapBytes are one read (on this VM's disk
  // a read costs ~10-15 us plus its bytes at ~2 GB/s, so reading 16 KiB more beats issuing another
  // read; docs/BENCHMARKS.md). A run goes straight into consecutive free slots at the end of the
  // cache (ascending neuron ids), its gap neurons included: those not cached stay as read-ahead
  // (oldest, so the first to leave unless active next step), those already cached leave a dead
  // slot behind. Runs that do not fit go tight (consecutive missing neurons only) into the free
  // slots left, then into scratch.
  constexpr size_t kGapBytes = 16u << 10, kMaxRun = 1u << 20;
  const bool caching = !in_memory_ && !static_;
  std::vector<uint8_t*> dst(miss.size(), nullptr);
  std::vector<IoPool::Job> jobs;
  std::vector<std::pair<const uint8_t*, uint8_t*>> copies;  // staged record -> its slot, after the reads
  int64_t bytes = 0;
  size_t used = 0;  // bytes of scratch_ taken by this step
  size_t n_overflow = 0;  // records in overflow_
  auto take_scratch = [&](size_t n) -> uint8_t* {
    if (used + n > scratch_cap_) return nullptr;
    uint8_t* p = scratch_ + used;
    used += n;
    return p;
  };
  auto new_slot = [&](int32_t j) -> uint8_t* {
    const int sl = L.n++;
    L.slot_of[j] = sl;
    L.neuron_of[sl] = j;
    L.last[sl] = L.step;
    return L.cache + static_cast<size_t>(sl) * ll.record_bytes;
  };
  const int64_t dead = std::numeric_limits<int64_t>::min() / 2;
  for (size_t i = 0; i < miss.size();) {
    size_t i1 = i + 1;
    if (caching)
      while (i1 < miss.size() && static_cast<size_t>(miss[i1] - miss[i1 - 1] - 1) * ll.record_bytes <= kGapBytes &&
             static_cast<size_t>(miss[i1] - miss[i] + 1) * ll.record_bytes <= kMaxRun)
        ++i1;
    const int span = miss[i1 - 1] - miss[i] + 1;
    const uint64_t off = ll.offset + static_cast<uint64_t>(miss[i]) * ll.record_bytes;
    const size_t len = static_cast<size_t>(span) * ll.record_bytes;
    if (caching && span <= capacity_ - L.n) {  // straight into the cache, gap neurons as read-ahead
      const int base = L.n;
      L.n += span;
      for (int j = miss[i], k = 0; j <= miss[i1 - 1]; ++j, ++k) {
        const int sl = base + k;
        if (L.slot_of[j] >= 0) {  // cached elsewhere: this copy is a dead slot
          L.neuron_of[sl] = -1;
          L.last[sl] = dead;
          continue;
        }
        L.slot_of[j] = sl;
        L.neuron_of[sl] = j;
        L.last[sl] = L.step - window_ + 1;  // read-ahead; refreshed below when it is one of the missing
      }
      for (size_t m = i; m < i1; ++m) {
        dst[m] = L.cache + static_cast<size_t>(L.slot_of[miss[m]]) * ll.record_bytes;
        L.last[L.slot_of[miss[m]]] = L.step;
      }
      jobs.push_back({off, len, L.cache + static_cast<size_t>(base) * ll.record_bytes, l});
      bytes += static_cast<int64_t>(len);
    } else if (i1 - i > 1 && (static_cast<size_t>(span) != i1 - i || !caching) && used + len <= scratch_cap_) {
      // Through scratch: one read; the missing records move to free slots after it (or stay).
      uint8_t* buf = take_scratch(len);
      for (size_t m = i; m < i1; ++m) {
        uint8_t* src = buf + static_cast<size_t>(miss[m] - miss[i]) * ll.record_bytes;
        if (caching && L.n < capacity_) {
          dst[m] = new_slot(miss[m]);
          copies.emplace_back(src, dst[m]);
        } else {
          dst[m] = src;
        }
      }
      jobs.push_back({off, len, buf, l});
      bytes += static_cast<int64_t>(len);
    } else {  // tight: consecutive missing neurons, each into a free slot or scratch
      for (size_t m = i; m < i1; ++m) {
        if (caching && L.n < capacity_) dst[m] = new_slot(miss[m]);
        else if (!(dst[m] = take_scratch(ll.record_bytes))) {
          // Cache and scratch full (more active neurons than they hold, or scratch taken by staged
          // reads): a layer's worth of overflow records, allocated the first time it is needed.
          if (!overflow_ || n_overflow >= static_cast<size_t>(F)) {  // (allocated at open whenever capacity < n_ff)
            L.clear();  // slots assigned above were never read: none may stay
            return make_error("FFN offload: internal: no room for the records of layer %d", l);
          }
          dst[m] = overflow_ + (n_overflow++) * ll.record_bytes;
        }
        const uint64_t o = ll.offset + static_cast<uint64_t>(miss[m]) * ll.record_bytes;
        if (!jobs.empty() && jobs.back().off + jobs.back().len == o && jobs.back().dst + jobs.back().len == dst[m] &&
            jobs.back().len + ll.record_bytes <= kMaxRun)
          jobs.back().len += ll.record_bytes;
        else
          jobs.push_back({o, ll.record_bytes, dst[m], l});
        bytes += static_cast<int64_t>(ll.record_bytes);
      }
    }
    i = i1;
  }
  const size_t n_jobs = jobs.size();
  if (!jobs.empty()) io_->submit(jobs, &L.reads, true);
  // Record of each active neuron; missing ones after the cached ones so their compute waits last.
  rec_ptr_.assign(A, nullptr);
  std::vector<int32_t> order;  // indices into act_list_: cached first
  order.reserve(A);
  {
    size_t mi = 0;
    std::vector<int32_t> later;
    for (int k = 0; k < A; ++k) {
      const int j = act_list_[k];
      if (mi < miss.size() && miss[mi] == j) {
        rec_ptr_[k] = dst[mi++];
        later.push_back(k);
      } else {
        rec_ptr_[k] = L.cache + static_cast<size_t>(L.slot_of[j]) * ll.record_bytes;
        order.push_back(k);
      }
    }
    order.insert(order.end(), later.begin(), later.end());
  }
  const int n_cached = A - static_cast<int>(miss.size());
  auto t2 = Clock::now();

  // Up dots of the cached neurons while the reads run.
  const kernels::TypeTraits* tr = kernels::type_traits(ll.up_type);
  const DType vdt = tr->vec_dot_type;
  const size_t xrb = row_bytes(vdt, E);
  xq_.resize(static_cast<size_t>(n) * xrb);
  for (int t = 0; t < n; ++t) {
    if (vdt == DType::F32) std::memcpy(&xq_[t * xrb], x + static_cast<size_t>(t) * E, E * sizeof(float));
    else kernels::quantize_row(vdt, x + static_cast<size_t>(t) * E, &xq_[t * xrb], E);
  }
  const kernels::VecDotFn dot = kernels::vec_dot_fn(ll.up_type, kernels::active_isa());
  h_.assign(static_cast<size_t>(n) * A, 0.f);
  auto dots = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const int k = order[i], j = act_list_[k];
      for (int t = 0; t < n; ++t)
        if (mask_[static_cast<size_t>(t) * F + j])
          h_[static_cast<size_t>(t) * A + k] = gate[static_cast<size_t>(t) * F + j] * dot(rec_ptr_[k], &xq_[t * xrb], E);
    }
  };
  pool.parallel_for(n_cached, [&](int64_t b, int64_t e, int tid) { dots(b, e, tid); }, 16);
  auto t3 = Clock::now();
  double waited = 0, checked = 0;
  if (n_jobs > 0) {
    std::string e = io_->wait(&L.reads);
    auto t4 = Clock::now();
    waited = secs(t3, t4);
    stats_.io_wait_s += waited;
    if (!e.empty()) {
      L.clear();
      return make_error("FFN offload: %s", e.c_str());
    }
    for (auto [src, to] : copies) std::memcpy(to, src, ll.record_bytes);
    t3 = Clock::now();
    checked = secs(t4, t3);
    stats_.cache_s += checked;
    // Up dots of the neurons just read.
    pool.parallel_for(
        static_cast<int64_t>(miss.size()), [&](int64_t b, int64_t e2, int tid) { dots(n_cached + b, n_cached + e2, tid); }, 16);
  }
  // Down: y[t] = sum_k h[t][k] * down_k, split over block-aligned column ranges of the output.
  const int bs = dtype_info(ll.down_type)->block_size;
  const size_t bb = dtype_info(ll.down_type)->block_bytes;
  std::memset(x, 0, static_cast<size_t>(n) * E * sizeof(float));
  const int nblk = E / bs;
  const int segs = std::min(nblk, std::max(1, pool.size() * 2));
  const int per = (nblk + segs - 1) / segs;
  pool.parallel_for(segs, [&](int64_t b, int64_t e, int) {
    for (int64_t sg = b; sg < e; ++sg) {
      const int b0 = static_cast<int>(sg) * per, b1 = std::min(nblk, b0 + per);
      if (b0 >= b1) continue;
      const int e0 = b0 * bs, len = (b1 - b0) * bs;
      for (int k = 0; k < A; ++k) {
        const uint8_t* col = rec_ptr_[k] + ll.up_bytes + b0 * bb;
        for (int t = 0; t < n; ++t) {
          const float hv = h_[static_cast<size_t>(t) * A + k];
          if (hv != 0.f) kernels::axpy_row(ll.down_type, col, hv, x + static_cast<size_t>(t) * E + e0, len);
        }
      }
    }
  });
  auto t5 = Clock::now();
  stats_.compute_s += secs(t0, t1) + secs(t2, t5) - waited - checked;
  stats_.cache_s += secs(t1, t2);
  stats_.steps += l == 0;
  stats_.tokens += l == 0 ? n : 0;
  stats_.bytes_read += bytes;
  stats_.bytes_needed += static_cast<int64_t>(miss.size() * ll.record_bytes);
  stats_.reads += static_cast<int64_t>(n_jobs);
  stats_.active += n_active;
  stats_.neurons += static_cast<int64_t>(n) * F;
  stats_.hits += hits;
  stats_.misses += static_cast<int64_t>(miss.size());
  return Status::Ok();
}

}  // namespace larder::offload
