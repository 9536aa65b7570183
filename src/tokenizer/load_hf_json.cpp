// Hugging Face tokenizer.json (model.type BPE): byte-level BPE when a ByteLevel
// pre-tokenizer/decoder is present, SentencePiece-style BPE (scores from merge ranks)
// when the model uses byte fallback or a U+2581 Metaspace/Prepend normalizer.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h"

namespace larder {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& m) { throw LoadError{m}; }

// Visits obj and every nested object in "normalizers"/"pretokenizers"/"processors"/"decoders".
void walk(const json& j, const std::function<void(const json&)>& f) {
  if (!j.is_object()) return;
  f(j);
  for (const char* k : {"normalizers", "pretokenizers", "processors", "decoders"}) {
    auto it = j.find(k);
    if (it != j.end() && it->is_array())
      for (const auto& e : *it) walk(e, f);
  }
}

std::string type_of(const json& j) {
  auto it = j.find("type");
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
}

std::string str_or(const json& j, const char* key, const std::string& def = {}) {
  auto it = j.find(key);
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : def;
}

// "x" or {"content": "x"} (tokenizer_config.json style).
std::string token_text(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object()) return str_or(j, "content");
  return {};
}

// Picks the pre-tokenizer name from the Split regexes etc. of a byte-level tokenizer.
std::string detect_pre(const json& pre) {
  std::string all;
  bool punct = false, digits = false, bytelevel_regex = false;
  walk(pre, [&](const json& p) {
    const std::string t = type_of(p);
    if (t == "Split") {
      auto it = p.find("pattern");
      if (it != p.end() && it->is_object()) all += str_or(*it, "Regex", str_or(*it, "String")) + "\n";
    } else if (t == "Punctuation") {
      punct = true;
    } else if (t == "Digits") {
      digits = true;
    } else if (t == "ByteLevel") {
      auto it = p.find("use_regex");
      bytelevel_regex = it == p.end() || !it->is_boolean() || it->get<bool>();
    }
  });
  auto has = [&](const char* s) { return all.find(s) != std::string::npos; };
  if (has(R"([\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*)")) return "tekken";
  if (has(R"([\p{L}\p{M}]+)") && has("\\p{N}{1,3}")) return "deepseek-v3";
  if (has(R"([^\r\n\p{L}\p{N}]?\p{L}+)")) return has("\\p{N}{1,3}") ? "llama-bpe" : "qwen2";
  if (has("\\s?[A-Za-z\xC2\xB5")) return "deepseek-llm";
  if (has("\\s?\\p{L}+") && has("\\s?\\p{P}+")) return "deepseek-coder";
  if (has(" ?[^(\\s|.,!?")) return digits ? "viking" : "bloom";
  if (all.empty() && bytelevel_regex) {
    if (punct) return "falcon";
    if (digits) return "starcoder";
    return "gpt-2";
  }
  if (!all.empty())
    std::fprintf(stderr, "larder: unrecognised pre-tokenizer regex in tokenizer.json, using gpt-2's\n");
  return "gpt-2";
}

Result<std::unique_ptr<Tokenizer>> load_impl(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return make_error("tokenizer: cannot open %s", path.c_str());
  const std::streamoff fsize = f.tellg();
  if (fsize <= 0 || fsize > (std::streamoff(1) << 31)) return make_error("tokenizer.json %s: bad file size", path.c_str());
  f.seekg(0);
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    return make_error("tokenizer.json %s: %s", path.c_str(), e.what());
  }
  if (!j.is_object()) return make_error("tokenizer.json %s: not a JSON object", path.c_str());
  const json& model = j.contains("model") ? j["model"] : json();
  if (!model.is_object()) return make_error("tokenizer.json %s: no model object", path.c_str());
  const std::string mtype = str_or(model, "type", "BPE");
  if (mtype != "BPE")
    return make_error("tokenizer.json %s: model type '%s' is not supported (only BPE)", path.c_str(), mtype.c_str());
  if (!model.contains("vocab") || !model["vocab"].is_object())
    return make_error("tokenizer.json %s: model.vocab missing", path.c_str());

  const json null_json;
  const json& pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : null_json;
  const json& norm = j.contains("normalizer") ? j["normalizer"] : null_json;
  const json& dec = j.contains("decoder") ? j["decoder"] : null_json;
  bool byte_level = false, metaspace = false, prefix = false;
  for (const json* part : {&pre, &dec}) {
    walk(*part, [&](const json& p) {
      const std::string t = type_of(p);
      if (t == "ByteLevel") byte_level = true;
      if (t == "Metaspace" || t == "ByteFallback") metaspace = true;
      if (t == "Metaspace" && part == &pre) {
        const std::string scheme = str_or(p, "prepend_scheme", "always");
        auto it = p.find("add_prefix_space");
        const bool add = it != p.end() && it->is_boolean() ? it->get<bool>() : scheme != "never";
        prefix = prefix || (add && scheme != "never");
      }
    });
  }
  walk(norm, [&](const json& p) {
    const std::string t = type_of(p);
    if (t == "Prepend" && str_or(p, "prepend") == std::string(tok::kSpaceMark)) metaspace = prefix = true;
    if (t == "Replace" && str_or(p, "content") == std::string(tok::kSpaceMark)) metaspace = true;
  });
  const bool byte_fallback = model.contains("byte_fallback") && model["byte_fallback"].is_boolean() &&
                             model["byte_fallback"].get<bool>();
  Vocab v;
  if (byte_level) {
    v.kind = TokenizerKind::BPE;
    v.pre = detect_pre(pre);
    v.add_space_prefix = false;
  } else if (byte_fallback || metaspace) {
    v.kind = TokenizerKind::SPM;
    v.add_space_prefix = prefix;
  } else {
    return make_error("tokenizer.json %s: neither byte-level nor SentencePiece-style BPE", path.c_str());
  }

  // Tokens: model.vocab plus added_tokens, by id.
  const json& jv = model["vocab"];
  const size_t limit = std::min<size_t>(static_cast<size_t>(fsize), size_t(1) << 24);
  std::vector<std::pair<std::string, int64_t>> entries;
  entries.reserve(jv.size());
  int64_t max_id = -1;
  for (auto it = jv.begin(); it != jv.end(); ++it) {
    if (!it.value().is_number_integer()) fail("vocab id is not an integer");
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || static_cast<size_t>(id) >= limit) fail("vocab id out of range");
    entries.emplace_back(it.key(), id);
    max_id = std::max(max_id, id);
  }
  struct Added {
    std::string text;
    int64_t id;
    bool special;
  };
  std::vector<Added> added;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer()) fail("bad added_tokens entry");
      const int64_t id = a["id"].get<int64_t>();
      if (id < 0 || static_cast<size_t>(id) >= limit) fail("added token id out of range");
      const bool special = a.contains("special") && a["special"].is_boolean() && a["special"].get<bool>();
      added.push_back({str_or(a, "content"), id, special});
      max_id = std::max(max_id, id);
    }
  }
  if (max_id < 0) return make_error("tokenizer.json %s: empty vocabulary", path.c_str());
  // Real vocabularies are dense; a few holes are tolerated, a huge sparse id is not.
  if (static_cast<size_t>(max_id) >= 2 * (entries.size() + added.size()) + 65536)
    return make_error("tokenizer.json %s: token id %lld is far beyond the %zu tokens listed", path.c_str(),
                      static_cast<long long>(max_id), entries.size() + added.size());
  const size_t n = static_cast<size_t>(max_id) + 1;
  v.tokens.assign(n, std::string());
  v.types.assign(n, TokenType::UNUSED);
  for (auto& [text, id] : entries) {
    v.tokens[id] = std::move(text);
    v.types[id] = TokenType::NORMAL;
  }
  const std::string unk_text = str_or(model, "unk_token");
  std::unordered_map<std::string, int32_t> by_text;
  for (size_t id = 0; id < n; ++id) {
    if (v.types[id] == TokenType::UNUSED) v.tokens[id] = "[PAD" + std::to_string(id) + "]";
    if (v.kind == TokenizerKind::SPM && v.types[id] == TokenType::NORMAL && v.tokens[id].size() == 6 &&
        v.tokens[id].compare(0, 3, "<0x") == 0 && v.tokens[id][5] == '>')
      v.types[id] = TokenType::BYTE;
  }
  for (const Added& a : added) {
    v.tokens[a.id] = a.text;
    v.types[a.id] = a.special ? TokenType::CONTROL : TokenType::USER_DEFINED;
  }
  for (size_t id = 0; id < n; ++id) by_text.emplace(v.tokens[id], static_cast<int32_t>(id));
  auto id_of = [&](const std::string& t) -> int32_t {
    auto it = by_text.find(t);
    return t.empty() || it == by_text.end() ? -1 : it->second;
  };
  if (!unk_text.empty()) {
    v.unk = id_of(unk_text);
    if (v.unk >= 0) v.types[v.unk] = TokenType::UNKNOWN;
  }

  // Merges: "a b" strings or ["a", "b"] pairs.
  std::vector<std::string> merges;
  if (model.contains("merges") && model["merges"].is_array()) {
    for (const auto& m : model["merges"]) {
      if (m.is_string()) {
        merges.push_back(m.get<std::string>());
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      } else {
        fail("bad merges entry");
      }
    }
  }
  if (v.kind == TokenizerKind::BPE) {
    v.merges = std::move(merges);
  } else {
    // Earlier merge = higher score; tokens no merge produces come last.
    v.scores.assign(n, 0.0f);
    std::vector<bool> seen(n, false);
    for (size_t r = 0; r < merges.size(); ++r) {
      const std::string& m = merges[r];
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) continue;
      const int32_t id = id_of(m.substr(0, sp) + m.substr(sp + 1));
      if (id < 0 || seen[id]) continue;
      seen[id] = true;
      v.scores[id] = -static_cast<float>(r);
    }
    for (size_t id = 0; id < n; ++id) {
      if (!seen[id]) v.scores[id] = -static_cast<float>(merges.size() + id);
    }
  }

  // BOS/EOS: tokenizer_config.json beside the file, else the post-processor template,
  // else well-known token texts.
  std::optional<bool> cfg_add_bos, cfg_add_eos;
  std::string bos_text, eos_text;
  const auto cfg_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::is_regular_file(cfg_path, ec)) {
    std::ifstream cf(cfg_path);
    json c = json::parse(cf, nullptr, false);
    if (c.is_object()) {
      if (c.contains("bos_token")) bos_text = token_text(c["bos_token"]);
      if (c.contains("eos_token")) eos_text = token_text(c["eos_token"]);
      if (c.contains("add_bos_token") && c["add_bos_token"].is_boolean()) cfg_add_bos = c["add_bos_token"].get<bool>();
      if (c.contains("add_eos_token") && c["add_eos_token"].is_boolean()) cfg_add_eos = c["add_eos_token"].get<bool>();
    }
  }
  bool tmpl_bos = false, tmpl_eos = false;
  if (j.contains("post_processor")) {
    walk(j["post_processor"], [&](const json& p) {
      if (type_of(p) != "TemplateProcessing" || !p.contains("single") || !p["single"].is_array()) return;
      const json& s = p["single"];
      auto special_id = [](const json& e) -> std::string {
        if (e.is_object() && e.contains("SpecialToken") && e["SpecialToken"].is_object())
          return str_or(e["SpecialToken"], "id");
        return {};
      };
      if (!s.empty()) {
        const std::string first = special_id(s.front()), last = special_id(s.back());
        if (!first.empty()) {
          tmpl_bos = true;
          if (bos_text.empty()) bos_text = first;
        }
        if (s.size() > 1 && !last.empty()) {
          tmpl_eos = true;
          if (eos_text.empty()) eos_text = last;
        }
      }
    });
  }
  auto first_of = [&](std::initializer_list<const char*> names) {
    for (const char* t : names) {
      const int32_t id = id_of(t);
      if (id >= 0) return id;
    }
    return int32_t(-1);
  };
  v.bos = bos_text.empty() ? first_of({"<s>", "<|begin_of_text|>", "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>",
                                       "<bos>", "<|startoftext|>"})
                           : id_of(bos_text);
  v.eos = eos_text.empty() ? first_of({"</s>", "<|end_of_text|>", "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>",
                                       "<eos>", "<|endoftext|>"})
                           : id_of(eos_text);
  v.eot = first_of({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>"});
  v.add_bos = cfg_add_bos ? *cfg_add_bos : (tmpl_bos || v.kind == TokenizerKind::SPM);
  v.add_bos = v.add_bos && v.bos >= 0;
  v.add_eos = (cfg_add_eos ? *cfg_add_eos : tmpl_eos) && v.eos >= 0;
  if (v.kind == TokenizerKind::SPM) return tok::make_spm(std::move(v), tok::SpmOptions{});
  return tok::make_bpe(std::move(v));
}

}  // namespace

Result<std::unique_ptr<Tokenizer>> load_tokenizer_hf_json(const std::string& path) {
  try {
    return load_impl(path);
  } catch (const LoadError& e) {
    return make_error("tokenizer.json %s: %s", path.c_str(), e.msg.c_str());
  } catch (const nlohmann::json::exception& e) {
    return make_error("tokenizer.json %s: %s", path.c_str(), e.what());
  } catch (const std::bad_alloc&) {
    return make_error("tokenizer.json %s: out of memory", path.c_str());
  }
}

}  // namespace larder
