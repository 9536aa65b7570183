#include "conductor/index.h"

#include <algorithm>
#include <cctype>
#include <mutex>
#include <variant>

#include "kvevents/events.h"

namespace larder::conductor {

uint8_t medium_bit(const std::string& medium) {
  switch (kvevents::medium_of(medium)) {
    case kvcache::Medium::Dram: return kDram;
    case kvcache::Medium::Disk: return kDisk;
    default: return kL1;
  }
}

int KvIndex::slot(const std::string& instance) {
  auto it = slots_.find(instance);
  if (it != slots_.end()) return it->second;
  int s;
  if (!free_slots_.empty()) {  // an instance that left: its slot holds no entry any more
    s = free_slots_.back();
    free_slots_.pop_back();
    names_[s] = instance;
    counts_[s] = Counts{};
  } else {
    s = static_cast<int>(names_.size());
    names_.push_back(instance);
    counts_.emplace_back();
  }
  slots_.emplace(instance, s);
  return s;
}

void KvIndex::set_bits(int inst, const kvcache::BlockHash& h, uint8_t bits, bool on) {
  auto count = [&](uint8_t b, int d) {
    Counts& c = counts_[inst];
    if (b & kL1) c.l1 += d;
    if (b & kDram) c.dram += d;
    if (b & kDisk) c.disk += d;
  };
  auto it = map_.find(h);
  if (on) {
    if (it == map_.end()) it = map_.emplace(h, std::vector<std::pair<int, uint8_t>>{}).first;
    for (auto& [s, m] : it->second)
      if (s == inst) {
        count(static_cast<uint8_t>(bits & ~m), 1);
        m |= bits;
        return;
      }
    it->second.emplace_back(inst, bits);
    count(bits, 1);
    return;
  }
  if (it == map_.end()) return;
  auto& v = it->second;
  for (size_t k = 0; k < v.size(); ++k)
    if (v[k].first == inst) {
      count(static_cast<uint8_t>(v[k].second & bits), -1);
      v[k].second &= static_cast<uint8_t>(~bits);
      if (v[k].second == 0) {
        v[k] = v.back();
        v.pop_back();
      }
      break;
    }
  if (v.empty()) map_.erase(it);
}

void KvIndex::apply(const std::string& instance, const kvevents::EventBatch& batch) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  int s = slot(instance);
  for (const auto& ev : batch.events) {
    if (const auto* st = std::get_if<kvevents::BlockStored>(&ev)) {
      const uint8_t b = medium_bit(st->medium);
      for (const auto& h : st->hashes) set_bits(s, h, b, true);
    } else if (const auto* rm = std::get_if<kvevents::BlockRemoved>(&ev)) {
      const uint8_t b = medium_bit(rm->medium);
      for (const auto& h : rm->hashes) set_bits(s, h, b, false);
    } else {
      // AllBlocksCleared: everything of this instance goes (a snapshot follows it).
      lk.unlock();
      clear(instance);
      lk.lock();
      s = slot(instance);  // clear() forgot it
    }
  }
}

void KvIndex::stored(const std::string& instance, std::span<const kvcache::BlockHash> hashes, uint8_t medium) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  const int s = slot(instance);
  for (const auto& h : hashes) set_bits(s, h, medium, true);
}

void KvIndex::removed(const std::string& instance, std::span<const kvcache::BlockHash> hashes, uint8_t medium) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  const int s = slot(instance);
  for (const auto& h : hashes) set_bits(s, h, medium, false);
}

void KvIndex::clear(const std::string& instance) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  auto it = slots_.find(instance);
  if (it == slots_.end()) return;
  const int s = it->second;
  for (auto m = map_.begin(); m != map_.end();) {
    auto& v = m->second;
    v.erase(std::remove_if(v.begin(), v.end(), [&](const auto& e) { return e.first == s; }), v.end());
    if (v.empty()) m = map_.erase(m);
    else ++m;
  }
  counts_[s] = Counts{};
  // Forgotten entirely (its metrics series go too); the slot is reused by the next newcomer.
  names_[s].clear();
  slots_.erase(it);
  free_slots_.push_back(s);
}

std::vector<Holding> KvIndex::holdings(std::span<const kvcache::BlockHash> names,
                                       const std::vector<std::string>& instances) const {
  std::vector<Holding> out(instances.size());
  std::shared_lock<std::shared_mutex> lk(mu_);
  // slot -> positions in `instances` (an id may be listed once per role)
  std::vector<std::vector<int>> pos(names_.size());
  for (size_t i = 0; i < instances.size(); ++i)
    if (auto it = slots_.find(instances[i]); it != slots_.end()) pos[it->second].push_back(static_cast<int>(i));
  std::vector<char> alive(instances.size(), 0), in_l1(instances.size(), 1);
  int n_alive = 0;
  for (size_t i = 0; i < instances.size(); ++i)
    if (slots_.count(instances[i])) {
      alive[i] = 1;
      ++n_alive;
    }
  std::vector<uint8_t> bits(instances.size());
  for (const auto& h : names) {
    if (n_alive == 0) break;
    std::fill(bits.begin(), bits.end(), 0);
    if (auto it = map_.find(h); it != map_.end())
      for (const auto& [s, m] : it->second)
        for (int i : pos[s]) bits[i] = m;
    for (size_t i = 0; i < instances.size(); ++i) {
      if (!alive[i]) continue;
      const uint8_t m = bits[i];
      // The engine reuses the leading run in its pool, then loads the next blocks from its tiers.
      if (in_l1[i] && (m & kL1)) {
        out[i].l1++;
      } else if (m & (kDram | kDisk)) {
        in_l1[i] = 0;
        if (m & kDram) out[i].dram++;
        else out[i].disk++;
      } else {
        alive[i] = 0;
        --n_alive;
      }
    }
  }
  return out;
}

std::map<std::string, KvIndex::Counts> KvIndex::counts() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::map<std::string, Counts> out;
  for (size_t s = 0; s < names_.size(); ++s)
    if (!names_[s].empty()) out[names_[s]] = counts_[s];
  return out;
}

size_t KvIndex::n_blocks() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return map_.size();
}

std::vector<std::pair<kvcache::BlockHash, uint8_t>> KvIndex::entries(const std::string& instance) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<std::pair<kvcache::BlockHash, uint8_t>> out;
  auto it = slots_.find(instance);
  if (it == slots_.end()) return out;
  for (const auto& [h, v] : map_)
    for (const auto& [s, m] : v)
      if (s == it->second) out.emplace_back(h, m);
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.first.hi != b.first.hi ? a.first.hi < b.first.hi : a.first.lo < b.first.lo;
  });
  return out;
}

}  // namespace larder::conductor
