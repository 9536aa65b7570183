// Calibrated per-layer thresholds on |act(gate)| (CATS) and their JSON file.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "offload/offload.h"

namespace larder::offload {

Result<SparsityTable> load_sparsity(const std::string& path) {
  std::ifstream f(path);
  if (!f) return make_error("cannot open sparsity thresholds '%s' (write them with larder calibrate-sparsity)", path.c_str());
  SparsityTable t;
  try {
    nlohmann::json j = nlohmann::json::parse(f);
    if (j.value("format", "") != "larder-ffn-sparsity" || j.value("version", 0) != 1)
      return make_error("'%s' is not a larder sparsity file (format larder-ffn-sparsity, version 1)", path.c_str());
    t.model = j.at("model").get<std::string>();
    t.activation = j.at("activation").get<std::string>();
    t.n_layer = j.at("n_layer").get<int>();
    t.n_ff = j.at("n_ff").get<int>();
    t.tokens = j.value("tokens", int64_t{0});
    t.source = j.value("source", "");
    for (const auto& lv : j.at("levels")) {
      const double s = lv.at("sparsity").get<double>();
      std::vector<float> th = lv.at("thresholds").get<std::vector<float>>();
      if (!(s > 0 && s < 1) || static_cast<int>(th.size()) != t.n_layer)
        return make_error("'%s': a level needs a sparsity in (0, 1) and %d thresholds", path.c_str(), t.n_layer);
      for (float v : th)
        if (!(v >= 0) || !std::isfinite(v)) return make_error("'%s': thresholds must be finite and >= 0", path.c_str());
      if (!t.levels.empty() && s <= t.levels.back()) return make_error("'%s': levels must be ascending", path.c_str());
      t.levels.push_back(s);
      t.thr.push_back(std::move(th));
    }
  } catch (const std::exception& e) {
    return make_error("'%s': malformed sparsity file: %s", path.c_str(), e.what());
  }
  if (t.n_layer <= 0 || t.levels.empty()) return make_error("'%s': no calibrated levels", path.c_str());
  return t;
}

Status save_sparsity(const SparsityTable& t, const std::string& path) {
  nlohmann::json j;
  j["format"] = "larder-ffn-sparsity";
  j["version"] = 1;
  j["model"] = t.model;
  j["activation"] = t.activation;
  j["n_layer"] = t.n_layer;
  j["n_ff"] = t.n_ff;
  j["tokens"] = t.tokens;
  j["source"] = t.source;
  j["levels"] = nlohmann::json::array();
  for (size_t i = 0; i < t.levels.size(); ++i) j["levels"].push_back({{"sparsity", t.levels[i]}, {"thresholds", t.thr[i]}});
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) return make_error("cannot write '%s'", tmp.c_str());
    f << j.dump(1) << "\n";
    if (!f) return make_error("writing '%s' failed", tmp.c_str());
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return make_error("cannot rename '%s' to '%s'", tmp.c_str(), path.c_str());
  return Status::Ok();
}

Result<std::vector<float>> thresholds_for(const SparsityTable& t, double s) {
  if (!(s >= 0 && s < 1)) return make_error("FFN sparsity %g is outside [0, 1)", s);
  if (s == 0) return std::vector<float>(t.n_layer, 0.f);
  for (size_t i = 0; i < t.levels.size(); ++i)
    if (std::abs(t.levels[i] - s) < 1e-9) return t.thr[i];
  if (s < t.levels.front() || s > t.levels.back())
    return make_error("FFN sparsity %g is outside the calibrated range [%g, %g]", s, t.levels.front(), t.levels.back());
  size_t i = 1;
  while (t.levels[i] < s) ++i;
  const double w = (s - t.levels[i - 1]) / (t.levels[i] - t.levels[i - 1]);
  std::vector<float> out(t.n_layer);
  for (int l = 0; l < t.n_layer; ++l) out[l] = static_cast<float>((1 - w) * t.thr[i - 1][l] + w * t.thr[i][l]);
  return out;
}

SparsityCalibrator::SparsityCalibrator(int n_layer, int n_ff, bool gelu, int64_t max_samples)
    : n_layer_(n_layer), n_ff_(n_ff), gelu_(gelu), max_(max_samples), samples_(n_layer), tokens_(n_layer, 0), seen_(n_layer, 0) {}

float activation(float g, bool gelu);  // offload.cpp

void SparsityCalibrator::add(int layer, const float* gate, int n, int64_t ld) {
  auto& s = samples_[layer];
  tokens_[layer] += n;
  for (int64_t i = 0; i < static_cast<int64_t>(n) * n_ff_; ++i) {
    const float a = std::abs(activation(gate[i / n_ff_ * ld + i % n_ff_], gelu_));
    const int64_t k = seen_[layer]++;
    if (static_cast<int64_t>(s.size()) < max_) {
      s.push_back(a);
    } else {  // reservoir sampling: every value seen so far equally likely to be kept
      rng_ ^= rng_ << 13, rng_ ^= rng_ >> 7, rng_ ^= rng_ << 17;
      const uint64_t r = rng_ % static_cast<uint64_t>(k + 1);
      if (r < static_cast<uint64_t>(max_)) s[r] = a;
    }
  }
}

SparsityTable SparsityCalibrator::finish(const std::vector<double>& levels) {
  SparsityTable t;
  t.activation = gelu_ ? "gelu_tanh" : "silu";
  t.n_layer = n_layer_;
  t.n_ff = n_ff_;
  t.tokens = tokens_.empty() ? 0 : tokens_[0];
  t.levels = levels;
  t.thr.assign(levels.size(), std::vector<float>(n_layer_, 0.f));
  for (int l = 0; l < n_layer_; ++l) {
    auto& s = samples_[l];
    if (s.empty()) continue;
    std::sort(s.begin(), s.end());
    for (size_t i = 0; i < levels.size(); ++i) {
      // The level-quantile: a fraction `level` of the samples is <= it (and so inactive).
      const size_t k = std::min(s.size() - 1, static_cast<size_t>(levels[i] * static_cast<double>(s.size())));
      t.thr[i][l] = s[k];
    }
  }
  return t;
}

}  // namespace larder::offload
