// The P/D messages' parsing and checks (pd.h): a decode instance's prefill request as the prefill side
// reads it, and the prefill instance's answer as the decode side checks it; apart from the rest of pd.cpp
// so the fuzz target (fuzz/fuzz_wire.cpp) builds them alone.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "pd/pd.h"

namespace larder::pd {

using json = nlohmann::json;

namespace {

// Integers are read only from JSON integers in range: nlohmann's get<int> of a float or of a larger
// number is a float-to-int overflow (undefined behaviour; found by fuzz_wire) or silently wraps.
int64_t int_of(const json& v, const char* what, int64_t lo = INT32_MIN, int64_t hi = INT32_MAX) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (hi >= 0 && u <= static_cast<uint64_t>(hi)) return static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    const int64_t x = v.get<int64_t>();
    if (x >= lo && x <= hi) return x;
  } else {
    throw std::invalid_argument(std::string(what) + " must be an integer");
  }
  throw std::invalid_argument(std::string(what) + " is out of range");
}

int int_or(const json& j, const char* key, int def) {
  auto it = j.find(key);
  return it == j.end() ? def : static_cast<int>(int_of(*it, key));
}

std::vector<int32_t> ints_of(const json& v, const char* what) {
  if (!v.is_array()) throw std::invalid_argument(std::string(what) + " must be an array of integers");
  std::vector<int32_t> out;
  out.reserve(v.size());
  for (const auto& x : v) out.push_back(static_cast<int32_t>(int_of(x, what)));
  return out;
}

SamplerParams sampling_from(const json& j) {
  if (!j.is_object()) throw std::invalid_argument("sampling must be an object");
  SamplerParams s;
  s.temp = j.value("temp", s.temp);
  s.top_k = int_or(j, "top_k", s.top_k);
  s.top_p = j.value("top_p", s.top_p);
  s.min_p = j.value("min_p", s.min_p);
  s.repeat_penalty = j.value("repeat_penalty", s.repeat_penalty);
  s.repeat_last_n = int_or(j, "repeat_last_n", s.repeat_last_n);
  s.freq_penalty = j.value("freq_penalty", s.freq_penalty);
  s.presence_penalty = j.value("presence_penalty", s.presence_penalty);
  if (auto it = j.find("seed"); it != j.end()) {
    if (!it->is_number_unsigned()) throw std::invalid_argument("seed must be an unsigned integer");
    s.seed = it->get<uint64_t>();
  }
  return s;
}

}  // namespace

Status parse_prefill_request(const std::string& body, PrefillRequest* out, std::string* code) {
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    *code = "invalid_json";
    return make_error("the handoff request is not JSON");
  }
  *code = "invalid_value";
  PrefillRequest r;
  try {
    r.id = j.at("id").get<std::string>();
    r.layout = j.at("layout").get<std::string>();
    r.tokens = ints_of(j.at("tokens"), "tokens");
    r.sampling = sampling_from(j.value("sampling", json::object()));
    r.n_logprobs = int_or(j, "n_logprobs", 0);
    r.ignore_eos = j.value("ignore_eos", false);
    r.salt = j.value("salt", std::string());
    const json& d = j.at("dst");
    r.peer = d.at("address").get<std::string>();
    r.k_desc = d.at("k").get<std::string>();
    r.v_desc = d.at("v").get<std::string>();
    r.d_slots = static_cast<int>(int_of(d.at("n_slots"), "dst.n_slots"));
    r.dst_table = ints_of(d.at("table"), "dst.table");
    r.skip = int_or(j, "skip", 0);
    r.fetch = j.value("fetch", false);
    if (j.contains("fetch_from")) {
      r.fetch_api = j.at("fetch_from").at("api").get<std::string>();
      r.fetch_tokens = static_cast<int>(int_of(j.at("fetch_from").at("tokens"), "fetch_from.tokens", 0));
    }
  } catch (const std::exception& e) {
    return make_error("malformed handoff request: %s", e.what());
  }
  if (r.id.empty()) return make_error("malformed handoff request: the id is empty");
  *out = std::move(r);
  return Status::Ok();
}

Status check_prefill_blocks(const PrefillRequest& r, int block_size) {
  const int64_t bs = std::max(block_size, 1), n = static_cast<int64_t>(r.tokens.size());
  bool ok = r.d_slots > 0 && r.d_slots % bs == 0 && static_cast<int64_t>(r.dst_table.size()) >= (n + bs - 1) / bs;
  const int64_t d_blocks = r.d_slots / bs;
  for (int32_t b : r.dst_table) ok &= b >= 0 && b < d_blocks;
  if (n == 0 || r.skip < 0 || r.skip >= n || r.skip % bs != 0 || !ok)
    return make_error("the handoff request's blocks do not cover its prompt");
  return Status::Ok();
}

Status verify_answer(const std::string& text, const std::string& layout, const std::vector<kvcache::BlockHash>& expected,
                     int n_prompt, int block_size, int n_vocab, RemoteFirst* first) {
  json j = json::parse(text, nullptr, false);
  if (!j.is_object()) return make_error("the answer is not JSON");
  try {
    if (j.at("layout").get<std::string>() != layout) return make_error("the KV layout differs");
    const auto names = j.at("names").get<std::vector<std::string>>();
    const int n_full = n_prompt / block_size;
    if (static_cast<int>(names.size()) < n_full || static_cast<int>(expected.size()) < n_full)
      return make_error("blocks %zu..%d came without a name", names.size(), n_full);
    for (int b = 0; b < n_full; ++b)
      if (names[b] != expected[b].hex())
        return make_error("block %d has the name %s, not %s", b, names[b].c_str(), expected[b].hex().c_str());
    const int32_t tok = static_cast<int32_t>(int_of(j.at("token"), "token"));
    if (tok < 0 || tok >= n_vocab) return make_error("the first token %d is out of range", tok);
    RemoteFirst f;
    f.token = tok;
    f.logprob = j.value("logprob", 0.0f);
    for (const auto& p : j.value("top", json::array())) f.top.emplace_back(static_cast<int32_t>(int_of(p.at(0), "top")), p.at(1).get<float>());
    *first = std::move(f);
  } catch (const std::exception& e) {
    return make_error("malformed answer: %s", e.what());
  }
  return Status::Ok();
}

}  // namespace larder::pd
