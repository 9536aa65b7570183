// verify_answer (pd.h): the decode side's check of a prefill instance's answer, apart from the
// rest of pd.cpp so the fuzz target (fuzz/fuzz_wire.cpp) builds it alone.
#include <nlohmann/json.hpp>

#include "pd/pd.h"

namespace larder::pd {

using json = nlohmann::json;

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
    const int32_t tok = j.at("token").get<int32_t>();
    if (tok < 0 || tok >= n_vocab) return make_error("the first token %d is out of range", tok);
    RemoteFirst f;
    f.token = tok;
    f.logprob = j.value("logprob", 0.0f);
    for (const auto& p : j.value("top", json::array())) f.top.emplace_back(p.at(0).get<int32_t>(), p.at(1).get<float>());
    *first = std::move(f);
  } catch (const std::exception& e) {
    return make_error("malformed answer: %s", e.what());
  }
  return Status::Ok();
}

}  // namespace larder::pd
