#include "engine/sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace larder {

Sampler::Sampler(const SamplerParams& p, int n_vocab) : p_(p), n_vocab_(n_vocab) {
  seed_ = p.seed != 0xFFFFFFFFu ? p.seed
                                : static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  rng_.seed(seed_);
  cands_.reserve(n_vocab);
  adjusted_.resize(n_vocab);
  counts_.assign(n_vocab, 0);
}

void Sampler::skip_draw() {
  if (p_.temp <= 0.f) return;
  std::uniform_real_distribution<double> dist(0.0, 1.0);
  (void)dist(rng_);
}

double Sampler::uniform() {
  std::uniform_real_distribution<double> dist(0.0, 1.0);
  return dist(rng_);
}

void Sampler::distribution(const float* logits, const std::vector<int32_t>& history, std::vector<TokenProb>* out) {
  out->clear();
  const int32_t g = prepare(logits, history);
  if (g >= 0) {
    out->push_back({g, 1.f});
    return;
  }
  double total = 0;
  for (auto& c : cands_) total += c.p;
  for (auto& c : cands_) out->push_back({c.id, static_cast<float>(c.p / total)});
}

int32_t Sampler::sample(const float* logits, const std::vector<int32_t>& history) {
  const int32_t g = prepare(logits, history);
  if (g >= 0) return g;
  double total = 0;
  for (auto& c : cands_) total += c.p;
  std::uniform_real_distribution<double> dist(0.0, total);
  double r = dist(rng_);
  double acc = 0;
  for (auto& c : cands_) {
    acc += c.p;
    if (r < acc) return c.id;
  }
  return cands_.back().id;
}

int32_t Sampler::prepare(const float* logits, const std::vector<int32_t>& history) {
  const float* lg = logits;
  const bool penalties = p_.repeat_penalty != 1.f || p_.freq_penalty != 0.f || p_.presence_penalty != 0.f;
  if (penalties && !history.empty()) {
    std::memcpy(adjusted_.data(), logits, n_vocab_ * sizeof(float));
    size_t start = p_.repeat_last_n < 0 || history.size() <= static_cast<size_t>(p_.repeat_last_n)
                       ? 0
                       : history.size() - p_.repeat_last_n;
    for (size_t i = start; i < history.size(); ++i)
      if (history[i] >= 0 && history[i] < n_vocab_) counts_[history[i]]++;
    for (size_t i = start; i < history.size(); ++i) {
      int32_t id = history[i];
      if (id < 0 || id >= n_vocab_ || counts_[id] == 0) continue;
      float& l = adjusted_[id];
      if (p_.repeat_penalty != 1.f) l = l > 0 ? l / p_.repeat_penalty : l * p_.repeat_penalty;
      l -= counts_[id] * p_.freq_penalty + p_.presence_penalty;
      counts_[id] = 0;  // each id once
    }
    lg = adjusted_.data();
  }
  if (p_.temp <= 0.f) {
    // Greedy; ties go to the lowest id so results are reproducible.
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab_; ++i)
      if (lg[i] > lg[best]) best = i;
    return best;
  }
  cands_.clear();
  for (int32_t i = 0; i < n_vocab_; ++i) cands_.push_back({i, lg[i], 0.f});
  auto by_logit = [](const Cand& a, const Cand& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
  const bool whole = p_.top_k <= 0 || p_.top_k >= n_vocab_;
  if (whole && p_.top_p >= 1.f) {
    // No truncation that needs an order (temperature and min-p only): the vocabulary in id order,
    // no sort (a full sort of a large vocabulary costs more than the rest of a decode step).
    float mx = cands_[0].logit;
    for (const auto& c : cands_) mx = std::max(mx, c.logit);
    double sum = 0;
    for (auto& c : cands_) sum += c.p = std::exp((c.logit - mx) / p_.temp);
    float pmax = 0;
    for (auto& c : cands_) pmax = std::max(pmax, c.p = static_cast<float>(c.p / sum));
    if (p_.min_p > 0.f) {
      const float thresh = p_.min_p * pmax;
      cands_.erase(std::remove_if(cands_.begin(), cands_.end(), [&](const Cand& c) { return c.p < thresh; }), cands_.end());
    }
    return -1;
  }
  size_t k = cands_.size();
  if (!whole) {
    k = p_.top_k;
    std::partial_sort(cands_.begin(), cands_.begin() + k, cands_.end(), by_logit);
    cands_.resize(k);
  } else {
    std::sort(cands_.begin(), cands_.end(), by_logit);
  }
  // Softmax at temperature.
  const float mx = cands_[0].logit;
  double sum = 0;
  for (auto& c : cands_) {
    c.p = std::exp((c.logit - mx) / p_.temp);
    sum += c.p;
  }
  for (auto& c : cands_) c.p = static_cast<float>(c.p / sum);
  // min-p: drop tokens less likely than min_p * the top probability.
  if (p_.min_p > 0.f) {
    float thresh = p_.min_p * cands_[0].p;
    size_t keep = 1;
    while (keep < cands_.size() && cands_[keep].p >= thresh) ++keep;
    cands_.resize(keep);
  }
  // top-p: smallest prefix whose mass reaches top_p.
  if (p_.top_p < 1.f) {
    double cum = 0;
    size_t keep = cands_.size();
    for (size_t i = 0; i < cands_.size(); ++i) {
      cum += cands_[i].p;
      if (cum >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
    cands_.resize(keep);
  }
  return -1;
}

}  // namespace larder
