#include "sim/trace.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

namespace larder::sim {

using json = nlohmann::json;

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

Result<std::vector<TraceReq>> load_trace(const std::string& path, int limit, int skip) {
  std::ifstream f(path);
  if (!f) return Error{"cannot open the trace " + path + ": " + std::strerror(errno)};
  std::vector<TraceReq> out;
  std::string line;
  int ln = 0;
  while (std::getline(f, line)) {
    ++ln;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto bad = [&](const std::string& why) { return Error{"trace " + path + " line " + std::to_string(ln) + ": " + why}; };
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return bad("not valid JSON");
    if (!j.is_object()) return bad("not a JSON object");
    TraceReq r;
    r.line = ln;
    for (const char* k : {"timestamp", "input_length", "output_length", "hash_ids"})
      if (!j.contains(k)) return bad(std::string("missing \"") + k + "\"");
    if (!j["timestamp"].is_number() || !(j["timestamp"].get<double>() >= 0))
      return bad("\"timestamp\" must be a non-negative number (ms)");
    if (!j["input_length"].is_number_integer() || j["input_length"].get<int64_t>() < 1)
      return bad("\"input_length\" must be a positive integer");
    if (!j["output_length"].is_number_integer() || j["output_length"].get<int64_t>() < 0)
      return bad("\"output_length\" must be a non-negative integer");
    if (!j["hash_ids"].is_array()) return bad("\"hash_ids\" must be an array");
    r.ts_ms = j["timestamp"].get<double>();
    r.input_length = j["input_length"].get<int64_t>();
    r.output_length = j["output_length"].get<int64_t>();
    for (auto& h : j["hash_ids"]) {
      if (!h.is_number_integer() || h.get<int64_t>() < 0) return bad("\"hash_ids\" must hold non-negative integers");
      r.hash_ids.push_back(h.get<uint64_t>());
    }
    const int64_t need = (r.input_length + kTraceBlock - 1) / kTraceBlock;
    if (static_cast<int64_t>(r.hash_ids.size()) != need)
      return bad(std::to_string(r.hash_ids.size()) + " hash_ids, but input_length " + std::to_string(r.input_length) +
                 " needs " + std::to_string(need) + " blocks of 512");
    if (skip > 0) {
      --skip;
      continue;
    }
    out.push_back(std::move(r));
    if (limit > 0 && static_cast<int>(out.size()) >= limit) break;
  }
  if (f.bad()) return Error{"cannot read the trace " + path};
  if (out.empty()) return Error{"the trace " + path + " holds no requests"};
  std::stable_sort(out.begin(), out.end(), [](const TraceReq& a, const TraceReq& b) { return a.ts_ms < b.ts_ms; });
  const double t0 = out.front().ts_ms;
  if (t0 > 0)
    for (auto& r : out) r.ts_ms -= t0;  // a slice starts at once
  return out;
}

std::string check_scale(int K) {
  if (K < 1 || K > kTraceBlock || kTraceBlock % K != 0)
    return "--scale must divide 512 (1, 2, 4, ..., 512); got " + std::to_string(K);
  return "";
}

std::vector<Planned> plan_trace(const std::vector<TraceReq>& trace, int K, int n_ctx) {
  const int B = kTraceBlock / K;
  std::vector<Planned> out(trace.size());
  for (size_t i = 0; i < trace.size(); ++i) {
    const TraceReq& r = trace[i];
    Planned& p = out[i];
    const int n = static_cast<int>(r.hash_ids.size());
    const int64_t rem = r.input_length - static_cast<int64_t>(kTraceBlock) * (n - 1);
    const int last = static_cast<int>((rem + K - 1) / K);
    int64_t P = static_cast<int64_t>(n - 1) * B + last;
    int64_t M = std::max<int64_t>(1, (r.output_length + K - 1) / K);
    if (n_ctx > 0 && P + M > n_ctx) {
      p.clipped = true;
      M = std::min<int64_t>(M, std::max(1, n_ctx / 2));
      P = std::min<int64_t>(P, n_ctx - M);
    }
    p.prompt_len = static_cast<int>(P);
    p.max_tokens = static_cast<int>(M);
    for (int64_t left = P; left > 0; left -= B) p.block_len.push_back(static_cast<int>(std::min<int64_t>(B, left)));
  }
  return out;
}

void offline_hits(const std::vector<TraceReq>& trace, std::vector<Planned>& plans, const std::vector<bool>& use,
                  int block) {
  // Trie over hash-id chains: node -> longest run of that block seen in an earlier request.
  std::map<std::pair<int, uint64_t>, int> child;  // (parent node, id) -> node
  std::vector<int> max_len{0};                    // node 0: the root
  for (size_t i = 0; i < trace.size(); ++i) {
    Planned& p = plans[i];
    p.unbounded_hit = p.trace_hit = 0;
    if (!use[i]) continue;
    const auto& ids = trace[i].hash_ids;
    int node = 0;
    int64_t lcp = 0;
    bool matching = true;
    std::vector<int> path;
    for (size_t b = 0; b < p.block_len.size(); ++b) {
      auto it = child.find({node, ids[b]});
      if (it == child.end()) {
        matching = false;
        int nn = static_cast<int>(max_len.size());
        max_len.push_back(0);
        it = child.emplace(std::make_pair(node, ids[b]), nn).first;
      } else {
        p.trace_hit += p.block_len[b];
        if (matching) {
          int m = std::min(max_len[it->second], p.block_len[b]);
          lcp += m;
          if (m < p.block_len[b]) matching = false;
        }
      }
      node = it->second;
      path.push_back(node);
    }
    for (size_t b = 0; b < path.size(); ++b) max_len[path[b]] = std::max(max_len[path[b]], p.block_len[b]);
    const int64_t G = block;
    p.unbounded_hit = std::min(lcp / G * G, (p.prompt_len - 1) / G * G);
  }
}

std::vector<int32_t> prompt_tokens(const TraceReq& r, const Planned& p, int vocab) {
  std::vector<int32_t> t;
  t.reserve(p.prompt_len);
  const uint64_t range = static_cast<uint64_t>(vocab - kFirstToken);
  for (size_t b = 0; b < p.block_len.size(); ++b) {
    uint64_t s = r.hash_ids[b];
    for (int j = 0; j < p.block_len[b]; ++j) t.push_back(static_cast<int32_t>(kFirstToken + splitmix64(s) % range));
  }
  return t;
}

std::vector<uint64_t> block_names(const TraceReq& r, const Planned& p, int K, int block_size) {
  const int B = kTraceBlock / K;
  const int n = p.prompt_len / block_size;
  std::vector<uint64_t> out;
  out.reserve(n);
  uint64_t chain = 0x6C61726465720001ull;  // "larder" + version
  size_t folded = 0;                       // hash ids folded into the chain so far
  for (int j = 0; j < n; ++j) {
    const size_t last = static_cast<size_t>((static_cast<int64_t>(j + 1) * block_size - 1) / B);
    for (; folded <= last && folded < r.hash_ids.size(); ++folded) {
      uint64_t s = chain ^ (r.hash_ids[folded] * 0x9E3779B97F4A7C15ull);
      chain = splitmix64(s);
    }
    uint64_t s = chain + 0xD1B54A32D192ED03ull * static_cast<uint64_t>(j + 1);
    out.push_back(splitmix64(s));
  }
  return out;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  double pos = q * (v.size() - 1);
  size_t i = static_cast<size_t>(pos);
  if (i + 1 >= v.size()) return v.back();
  return v[i] + (pos - i) * (v[i + 1] - v[i]);
}

}  // namespace larder::sim
