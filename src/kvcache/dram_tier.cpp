#include "kvcache/dram_tier.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/attention_kv.h"

namespace larder::kvcache {

namespace {

bool rank_less(const std::pair<std::pair<uint64_t, uint64_t>, BlockHash>& a,
               const std::pair<std::pair<uint64_t, uint64_t>, BlockHash>& b) {
  if (a.first != b.first) return a.first < b.first;
  if (a.second.hi != b.second.hi) return a.second.hi < b.second.hi;
  return a.second.lo < b.second.lo;
}

}  // namespace

Result<EvictPolicy> parse_policy(const std::string& s) {
  if (s == "lru") return EvictPolicy::LRU;
  if (s == "lfu") return EvictPolicy::LFU;
  return make_error("unknown eviction policy '%s' (lru | lfu)", s.c_str());
}

std::vector<uint8_t> q8_encode(std::span<const float> x, int group) {
  const size_t n = x.size(), ng = (n + group - 1) / group;
  std::vector<uint8_t> out(ng * sizeof(float) + n);
  float* scales = reinterpret_cast<float*>(out.data());
  int8_t* q = reinterpret_cast<int8_t*>(out.data() + ng * sizeof(float));
  for (size_t g = 0; g < ng; ++g) {
    const size_t b = g * group, e = std::min(n, b + group);
    float amax = 0;
    for (size_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
    std::memcpy(&scales[g], &d, sizeof d);
    for (size_t i = b; i < e; ++i) q[i] = static_cast<int8_t>(std::lrintf(x[i] * id));
  }
  return out;
}

void q8_decode(std::span<const uint8_t> enc, std::span<float> x, int group) {
  const size_t n = x.size(), ng = (n + group - 1) / group;
  LARDER_ASSERT(enc.size() == ng * sizeof(float) + n);
  const int8_t* q = reinterpret_cast<const int8_t*>(enc.data() + ng * sizeof(float));
  for (size_t g = 0; g < ng; ++g) {
    float d;
    std::memcpy(&d, enc.data() + g * sizeof(float), sizeof d);
    const size_t b = g * group, e = std::min(n, b + group);
    for (size_t i = b; i < e; ++i) x[i] = d * static_cast<float>(q[i]);
  }
}

DramTier::DramTier(uint64_t capacity_bytes, EvictPolicy policy, bool q8, int group, PayloadFormat fmt)
    : capacity_(capacity_bytes), policy_(policy), q8_(q8), group_(std::max(1, group)), fmt_(fmt), order_(rank_less) {
  st_.capacity = static_cast<int64_t>(capacity_bytes);
}

// 8-bit encoding of a payload: the f32/f16/bf16 parts as one float sequence through q8_encode,
// then the q8_0 parts' bytes as they are.
std::vector<uint8_t> DramTier::encode(std::span<const uint8_t> payload) const {
  if (fmt_.n_layer == 0) {
    LARDER_ASSERT(payload.size() % sizeof(float) == 0);
    return q8_encode(std::span<const float>(reinterpret_cast<const float*>(payload.data()), payload.size() / sizeof(float)),
                     group_);
  }
  std::vector<float> vals;
  std::vector<uint8_t> raw;
  const uint8_t* p = payload.data();
  for (int l = 0; l < fmt_.n_layer; ++l)
    for (auto [t, n] : {std::pair{fmt_.k_type, fmt_.k_values}, std::pair{fmt_.v_type, fmt_.v_values}}) {
      const size_t nb = kernels::kv_row_bytes(t, static_cast<int64_t>(n));
      LARDER_ASSERT(p + nb <= payload.data() + payload.size());
      if (t == DType::Q8_0) {
        raw.insert(raw.end(), p, p + nb);
      } else {
        const size_t off = vals.size();
        vals.resize(off + n);
        kernels::kv_to_float(t, p, vals.data() + off, static_cast<int64_t>(n));
      }
      p += nb;
    }
  std::vector<uint8_t> out = q8_encode(vals, group_);
  out.insert(out.end(), raw.begin(), raw.end());
  return out;
}

void DramTier::decode(const std::vector<uint8_t>& enc, std::vector<uint8_t>& out) const {
  if (fmt_.n_layer == 0) {
    q8_decode(enc, std::span<float>(reinterpret_cast<float*>(out.data()), out.size() / sizeof(float)), group_);
    return;
  }
  size_t n_vals = 0;
  for (auto [t, n] : {std::pair{fmt_.k_type, fmt_.k_values}, std::pair{fmt_.v_type, fmt_.v_values}})
    if (t != DType::Q8_0) n_vals += n * fmt_.n_layer;
  const size_t ng = (n_vals + group_ - 1) / group_, qbytes = ng * sizeof(float) + n_vals;
  std::vector<float> vals(n_vals);
  q8_decode(std::span<const uint8_t>(enc.data(), qbytes), vals, group_);
  const uint8_t* raw = enc.data() + qbytes;
  const float* v = vals.data();
  uint8_t* p = out.data();
  for (int l = 0; l < fmt_.n_layer; ++l)
    for (auto [t, n] : {std::pair{fmt_.k_type, fmt_.k_values}, std::pair{fmt_.v_type, fmt_.v_values}}) {
      const size_t nb = kernels::kv_row_bytes(t, static_cast<int64_t>(n));
      if (t == DType::Q8_0) {
        std::memcpy(p, raw, nb);
        raw += nb;
      } else {
        kernels::kv_from_float(t, v, p, static_cast<int64_t>(n), kernels::active_isa());
        v += n;
      }
      p += nb;
    }
}

void DramTier::touch(const BlockHash& key, Entry& e, bool hit) {
  order_.erase({{e.rank_freq, e.rank_tick}, key});
  if (policy_ == EvictPolicy::LFU) {
    uint32_t& f = freq_[key];
    if (hit || f == 0) f++;
    e.rank_freq = f;
  }
  e.rank_tick = ++tick_;
  order_.insert({{e.rank_freq, e.rank_tick}, key});
}

void DramTier::erase(std::unordered_map<BlockHash, Entry, BlockHashHasher>::iterator it) {
  order_.erase({{it->second.rank_freq, it->second.rank_tick}, it->first});
  bytes_ -= it->second.data.size();
  if (listener_) listener_->removed(Medium::Dram, it->first);
  map_.erase(it);
}

void DramTier::put(const BlockHash& key, std::span<const uint8_t> payload) {
  std::vector<uint8_t> data;
  if (q8_) {
    data = encode(payload);
  } else {
    data.assign(payload.begin(), payload.end());
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (data.size() > capacity_) return;
  if (auto it = map_.find(key); it != map_.end()) erase(it);
  while (bytes_ + data.size() > capacity_ && !order_.empty()) {
    auto victim = map_.find(order_.begin()->second);
    LARDER_ASSERT(victim != map_.end());
    erase(victim);
    st_.evictions++;
  }
  Entry& e = map_[key];
  e.raw_bytes = static_cast<uint32_t>(payload.size());
  e.data = std::move(data);
  bytes_ += e.data.size();
  e.rank_freq = 0;
  e.rank_tick = 0;
  order_.insert({{0, 0}, key});
  touch(key, e, false);
  st_.puts++;
  if (listener_) listener_->stored(Medium::Dram, key, nullptr, {});
  // Ghost counts are bounded: when they outnumber the blocks 4:1, age them all.
  if (policy_ == EvictPolicy::LFU && freq_.size() > 4 * map_.size() + 1024) {
    for (auto it = freq_.begin(); it != freq_.end();) {
      it->second /= 2;
      if (it->second == 0 && !map_.count(it->first)) it = freq_.erase(it);
      else ++it;
    }
  }
}

bool DramTier::get(const BlockHash& key, std::vector<uint8_t>& out, bool take) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) {
    st_.misses++;
    return false;
  }
  st_.hits++;
  Entry& e = it->second;
  out.resize(e.raw_bytes);
  if (q8_) decode(e.data, out);
  else std::memcpy(out.data(), e.data.data(), e.raw_bytes);
  if (take) {
    if (policy_ == EvictPolicy::LFU) freq_[key]++;
    erase(it);
  } else {
    touch(key, e, true);
  }
  return true;
}

bool DramTier::exists(const BlockHash& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  return map_.count(key) != 0;
}

void DramTier::remove(const BlockHash& key) {
  std::lock_guard<std::mutex> lk(mu_);
  if (auto it = map_.find(key); it != map_.end()) erase(it);
}

DramTierStats DramTier::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  DramTierStats s = st_;
  s.blocks = static_cast<int64_t>(map_.size());
  s.bytes = static_cast<int64_t>(bytes_);
  return s;
}

}  // namespace larder::kvcache
