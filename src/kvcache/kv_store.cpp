#include "kvcache/kv_store.h"

#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace larder::kvcache {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

std::string KvLayout::dtype() const {
  return k_type == v_type ? std::string(dtype_name(k_type)) : std::string(dtype_name(k_type)) + "/" + dtype_name(v_type);
}

uint64_t KvLayout::fingerprint() const {
  std::string s = model_id + "|" + dtype() + "|" + std::to_string(n_layer) + "|" + std::to_string(kv_dim) + "|" +
                  std::to_string(block_size);
  return XXH3_64bits(s.data(), s.size());
}

Result<std::unique_ptr<KvStore>> KvStore::open(const KvLayout& layout, const KvStoreParams& p) {
  if (layout.n_layer <= 0 || layout.kv_dim <= 0 || layout.block_size <= 0) return make_error("invalid KV layout");
  auto s = std::unique_ptr<KvStore>(new KvStore(layout, p));
  if (p.dram_bytes > 0) {
    if (p.dram_bytes < layout.block_bytes() / (p.dram_q8 ? 3 : 1))
      return make_error("--kv-dram of %llu bytes is less than one KV block (%zu bytes)",
                        static_cast<unsigned long long>(p.dram_bytes), layout.block_bytes());
    s->dram_ = std::make_unique<DramTier>(p.dram_bytes, p.policy, p.dram_q8, layout.group, layout.payload_format());
  }
  if (!p.disk_dir.empty()) {
    if (p.disk_bytes < 2 * (layout.block_bytes() + 64))
      return make_error("--kv-disk-size must hold at least two KV blocks (%zu bytes each)", layout.block_bytes());
    const uint64_t seg = std::clamp<uint64_t>(p.disk_bytes / 16, layout.block_bytes() + 64, 256ull << 20);
    LARDER_TRY(d, DiskTier::open(p.disk_dir, p.disk_bytes, layout.fingerprint(), seg));
    s->disk_ = std::move(d);
  }
  const int readers = std::max(1, p.readers);
  for (int i = 0; i < readers; ++i) s->readers_.emplace_back([raw = s.get()] { raw->reader_loop(); });
  if (s->disk_) s->writer_ = std::thread([raw = s.get()] { raw->writer_loop(); });
  return s;
}

KvStore::~KvStore() {
  (void)flush();
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_read_.notify_all();
  cv_write_.notify_all();
  for (auto& t : readers_) t.join();
  if (writer_.joinable()) writer_.join();
  // Jobs still queued fail (their owner is gone or will recompute).
  for (auto& [job, i] : reads_) job->state[i].store(2);
}

bool KvStore::pending(const BlockHash& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  return pending_.count(key) > 0;
}

Tier KvStore::where(const BlockHash& key) const {
  if (dram_ && dram_->exists(key)) return Tier::Dram;
  // pending() first: the writer leaves pending_ only after the block is on disk, so this
  // order never misses a block between the two.
  if (disk_ && (pending(key) || disk_->exists(key))) return Tier::Disk;
  return Tier::None;
}

void KvStore::put_evicted(const BlockHash& key, std::span<const uint8_t> payload) {
  if (dram_) dram_->put(key, payload);
}

bool KvStore::wants_write(const BlockHash& key) const {
  if (!disk_ || disk_->disabled()) return false;
  return !pending(key) && !disk_->exists(key);  // in this order: see where()
}

void KvStore::put_async(const BlockHash& key, std::vector<uint8_t> payload) {
  if (!disk_) return;
  std::lock_guard<std::mutex> lk(mu_);
  if (pending_.count(key)) {
    st_.write_skipped++;
    return;
  }
  if (write_bytes_queued_ + payload.size() > params_.write_queue_bytes) {
    st_.write_dropped++;  // the SSD cannot keep up; this block stays recomputable
    return;
  }
  write_bytes_queued_ += payload.size();
  st_.write_queued++;
  auto shared = std::make_shared<const std::vector<uint8_t>>(std::move(payload));
  pending_.emplace(key, shared);
  writes_.emplace_back(key, std::move(shared));
  cv_write_.notify_one();
}

void KvStore::writer_loop() {
  for (;;) {
    std::pair<BlockHash, Payload> w;
    bool removed = false;  // remove() came while it was queued: not written
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_write_.wait(lk, [&] { return stop_ || !writes_.empty(); });
      if (writes_.empty()) return;  // stop_ and drained
      w = std::move(writes_.front());
      writes_.pop_front();
      writes_in_flight_++;
      auto it = pending_.find(w.first);
      removed = it == pending_.end() || it->second != w.second;
    }
    const size_t n = w.second->size();
    const auto t0 = Clock::now();
    bool skipped = removed || disk_->exists(w.first);
    if (!skipped) {
      Status st = disk_->put(w.first, *w.second);
      if (!st.ok()) {
        static std::atomic<bool> logged{false};
        if (!logged.exchange(true)) std::fprintf(stderr, "larder: kv store: %s\n", st.error().c_str());
      }
    }
    const double dt = since(t0);
    std::lock_guard<std::mutex> lk(mu_);
    // On SSD now (or its write failed: then the block is gone from the tier, as if evicted).
    if (auto it = pending_.find(w.first); it != pending_.end() && it->second == w.second) pending_.erase(it);
    write_bytes_queued_ -= n;
    writes_in_flight_--;
    if (skipped) {
      st_.write_skipped++;
    } else {
      st_.disk_store_bytes += static_cast<int64_t>(n);
      st_.disk_store_seconds += dt;
    }
    if (writes_.empty() && writes_in_flight_ == 0) cv_idle_.notify_all();
  }
}

std::shared_ptr<LoadJob> KvStore::get_async(std::vector<BlockHash> keys) {
  auto job = std::make_shared<LoadJob>();
  const size_t n = keys.size();
  job->keys = std::move(keys);
  job->data.resize(n);
  job->state = std::make_unique<std::atomic<int>[]>(n);
  for (size_t i = 0; i < n; ++i) job->state[i].store(0);
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (size_t i = 0; i < n; ++i) reads_.emplace_back(job, i);
  }
  cv_read_.notify_all();
  return job;
}

void KvStore::reader_loop() {
  for (;;) {
    std::shared_ptr<LoadJob> job;
    size_t i = 0;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_read_.wait(lk, [&] { return stop_ || !reads_.empty(); });
      if (stop_) return;
      job = std::move(reads_.front().first);
      i = reads_.front().second;
      reads_.pop_front();
    }
    bool ok = false;
    Tier from = Tier::None;
    const auto t0 = Clock::now();
    if (!job->cancelled.load()) {
      // DRAM first (exclusive: the block moves up to L1), then SSD.
      Payload queued;
      const bool in_dram = dram_ && dram_->get(job->keys[i], job->data[i], /*take=*/true);
      if (!in_dram && disk_) {  // the queue before the disk: see where()
        std::lock_guard<std::mutex> lk(mu_);
        if (auto it = pending_.find(job->keys[i]); it != pending_.end()) queued = it->second;
      }
      if (in_dram) {
        ok = true;
        from = Tier::Dram;
      } else if (queued) {
        job->data[i] = *queued;  // not written yet: from memory (not a measure of the SSD's speed)
        ok = true;
        std::lock_guard<std::mutex> lk(mu_);
        st_.write_queue_hits++;
      } else if (disk_ && disk_->get(job->keys[i], job->data[i])) {
        ok = true;
        from = Tier::Disk;
      }
      ok = ok && job->data[i].size() == layout_.block_bytes();
    }
    const double dt = since(t0);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (from == Tier::Dram) {
        st_.dram_load_bytes += static_cast<int64_t>(job->data[i].size());
        st_.dram_load_seconds += dt;
      } else if (from == Tier::Disk) {
        st_.disk_load_bytes += static_cast<int64_t>(job->data[i].size());
        st_.disk_load_seconds += dt;
      }
      if (!ok && !job->cancelled.load()) st_.load_failed++;
    }
    job->state[i].store(ok ? 1 : 2);
    if (notify_) notify_();
  }
}

void KvStore::remove(const BlockHash& key) {
  if (dram_) dram_->remove(key);
  if (disk_) {
    {
      // A queued write is then not made (writer_loop); one in progress still lands.
      std::lock_guard<std::mutex> lk(mu_);
      pending_.erase(key);
    }
    disk_->remove(key);
  }
}

Status KvStore::flush() {
  if (!disk_) return Status::Ok();
  {
    std::unique_lock<std::mutex> lk(mu_);
    cv_idle_.wait(lk, [&] { return (writes_.empty() && writes_in_flight_ == 0); });
  }
  return disk_->flush();
}

double KvStore::load_seconds(Tier t) const {
  // Until measured: conservative guesses (a few GB/s from DRAM, ~0.5 GB/s from SSD).
  std::lock_guard<std::mutex> lk(mu_);
  const double bytes = static_cast<double>(layout_.block_bytes());
  if (t == Tier::Dram) {
    const double bw = st_.dram_load_seconds > 1e-4 ? st_.dram_load_bytes / st_.dram_load_seconds : params_.guess_dram_bw;
    return bytes / bw;
  }
  if (t == Tier::Disk) {
    const double bw = st_.disk_load_seconds > 1e-3 ? st_.disk_load_bytes / st_.disk_load_seconds : params_.guess_disk_bw;
    return bytes / bw;
  }
  return 1e30;
}

void KvStore::count_decision(bool load, int64_t n) {
  std::lock_guard<std::mutex> lk(mu_);
  (load ? st_.decide_load : st_.decide_recompute) += n;
}

KvStoreStats KvStore::stats() const {
  KvStoreStats s;
  {
    std::lock_guard<std::mutex> lk(mu_);
    s = st_;
  }
  s.has_dram = dram_ != nullptr;
  s.has_disk = disk_ != nullptr;
  if (dram_) s.dram = dram_->stats();
  if (disk_) s.disk = disk_->stats();
  return s;
}

void KvStore::set_listener(BlockListener* l) {
  if (dram_) dram_->set_listener(l);
  if (disk_) {
    disk_->set_listener(l);
    if (l)
      for (const auto& k : disk_->keys()) l->stored(Medium::Disk, k, nullptr, {});
  }
}

}  // namespace larder::kvcache
