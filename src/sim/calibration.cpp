#include "sim/calibration.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace larder::sim {

using json = nlohmann::ordered_json;

namespace {

constexpr const char* kSchema = "larder-calibration/1";

// Reads an optional number field into *out; false (with *err) when present but not usable.
template <class T>
bool get_num(const json& j, const char* k, T* out, bool positive, std::string* err, bool required = false) {
  if (!j.contains(k)) {
    if (required) *err = std::string("missing \"") + k + "\"";
    return !required;
  }
  const json& v = j[k];
  if (!v.is_number()) {
    *err = std::string("\"") + k + "\" must be a number";
    return false;
  }
  const double d = v.get<double>();
  if (!std::isfinite(d) || d < 0 || (positive && d <= 0)) {
    *err = std::string("\"") + k + "\" must be " + (positive ? "positive" : "non-negative");
    return false;
  }
  if constexpr (std::is_integral_v<T>) {
    if (!v.is_number_integer()) {
      *err = std::string("\"") + k + "\" must be an integer";
      return false;
    }
    *out = v.get<T>();
  } else {
    *out = static_cast<T>(d);
  }
  return true;
}

}  // namespace

Result<Calibration> parse_calibration(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Error{"calibration: not a JSON object"};
  if (j.contains("schema") && (!j["schema"].is_string() || j["schema"].get<std::string>() != kSchema))
    return Error{std::string("calibration: unknown schema (want \"") + kSchema + "\")"};
  Calibration c;
  std::string err;
  auto str = [&](const char* k, std::string* out) {
    if (j.contains(k) && j[k].is_string()) *out = j[k].get<std::string>();
  };
  str("model", &c.model);
  str("machine", &c.machine);
  str("measured_at", &c.measured_at);
  if (!j.contains("cost") || !j["cost"].is_object()) return Error{"calibration: missing \"cost\" object"};
  const json& k = j["cost"];
  bool ok = get_num(k, "a", &c.cost.a, false, &err, true) && get_num(k, "b", &c.cost.b, false, &err, true) &&
            get_num(k, "c", &c.cost.c, false, &err, true) && get_num(k, "d0", &c.cost.d0, false, &err, true) &&
            get_num(k, "d1", &c.cost.d1, false, &err, true) && get_num(k, "d2", &c.cost.d2, false, &err, true);
  if (!ok) return Error{"calibration: cost: " + err};
  ok = get_num(j, "parallel", &c.parallel, true, &err) && get_num(j, "step_tokens", &c.step_tokens, true, &err) &&
       get_num(j, "block_size", &c.block_size, true, &err, true) && get_num(j, "max_seq_len", &c.max_seq_len, false, &err) &&
       get_num(j, "kv_blocks", &c.kv_blocks, true, &err, true) && get_num(j, "block_bytes", &c.block_bytes, false, &err, true) &&
       get_num(j, "dram_blocks", &c.dram_blocks, false, &err) && get_num(j, "dram_load_bw", &c.dram_load_bw, true, &err) &&
       get_num(j, "disk_blocks", &c.disk_blocks, false, &err) && get_num(j, "disk_load_bw", &c.disk_load_bw, true, &err) &&
       get_num(j, "transfer_bw", &c.transfer_bw, true, &err) &&
       get_num(j, "transfer_latency_s", &c.transfer_latency_s, false, &err);
  if (!ok) return Error{"calibration: " + err};
  if (c.cost.b <= 0 && c.cost.c <= 0 && c.cost.a <= 0) return Error{"calibration: cost: prefill costs nothing"};
  if (c.max_seq_len > 0 && c.max_seq_len < 2) return Error{"calibration: \"max_seq_len\" must be 0 or at least 2"};
  json extra = json::object();
  for (const char* x : {"samples", "fit"})
    if (j.contains(x)) extra[x] = j[x];
  if (!extra.empty()) c.extra_json = extra.dump();
  return c;
}

Result<Calibration> load_calibration(const std::string& path) {
  std::ifstream f(path);
  if (!f) return Error{"cannot open the calibration " + path + ": " + std::strerror(errno)};
  std::stringstream ss;
  ss << f.rdbuf();
  auto c = parse_calibration(ss.str());
  if (!c.ok()) return Error{path + ": " + c.error()};
  return c;
}

std::string calibration_json(const Calibration& c) {
  json j = json::object();
  j["schema"] = kSchema;
  j["model"] = c.model;
  j["machine"] = c.machine;
  j["measured_at"] = c.measured_at;
  j["cost"] = {{"a", c.cost.a}, {"b", c.cost.b}, {"c", c.cost.c}, {"d0", c.cost.d0}, {"d1", c.cost.d1}, {"d2", c.cost.d2}};
  j["parallel"] = c.parallel;
  j["step_tokens"] = c.step_tokens;
  j["block_size"] = c.block_size;
  j["max_seq_len"] = c.max_seq_len;
  j["kv_blocks"] = c.kv_blocks;
  j["block_bytes"] = c.block_bytes;
  j["dram_blocks"] = c.dram_blocks;
  j["dram_load_bw"] = c.dram_load_bw;
  j["disk_blocks"] = c.disk_blocks;
  j["disk_load_bw"] = c.disk_load_bw;
  j["transfer_bw"] = c.transfer_bw;
  j["transfer_latency_s"] = c.transfer_latency_s;
  if (!c.extra_json.empty()) {
    json extra = json::parse(c.extra_json, nullptr, false);
    if (extra.is_object())
      for (auto& [k, v] : extra.items()) j[k] = v;
  }
  return j.dump(2) + "\n";
}

}  // namespace larder::sim
