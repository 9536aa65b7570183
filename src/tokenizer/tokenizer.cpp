// Shared tokenizer pieces: UTF-8 helpers, special-token partition, decode,
// streaming decode, vocabulary validation and the loader dispatch.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "model/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h"

namespace larder {
namespace tok {

std::string utf8_encode(uint32_t cp) {
  std::string r;
  if (cp < 0x80) {
    r += static_cast<char>(cp);
  } else if (cp < 0x800) {
    r += static_cast<char>(0xC0 | (cp >> 6));
    r += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    r += static_cast<char>(0xE0 | (cp >> 12));
    r += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    r += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    r += static_cast<char>(0xF0 | (cp >> 18));
    r += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    r += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    r += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return r;
}

uint32_t utf8_decode(std::string_view s, size_t& i) {
  const auto c0 = static_cast<unsigned char>(s[i]);
  size_t n = utf8_len(c0);
  if (n == 1) {
    ++i;
    return c0 < 0x80 ? c0 : UINT32_MAX;
  }
  if (i + n > s.size()) {
    ++i;
    return UINT32_MAX;
  }
  uint32_t cp = c0 & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if ((c & 0xC0) != 0x80) {
      ++i;
      return UINT32_MAX;
    }
    cp = (cp << 6) | (c & 0x3F);
  }
  // Reject overlong forms, surrogates and out-of-range values.
  static const uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++i;
    return UINT32_MAX;
  }
  i += n;
  return cp;
}

// Length of the longest prefix of s[i..] that could start a valid sequence (at least 1):
// a malformed sequence is replaced by one U+FFFD per such "maximal subpart" (Unicode 3.9).
static size_t maximal_subpart(std::string_view s, size_t i) {
  const auto c0 = static_cast<unsigned char>(s[i]);
  size_t need;
  unsigned lo = 0x80, hi = 0xBF;
  if (c0 >= 0xC2 && c0 <= 0xDF) {
    need = 2;
  } else if (c0 >= 0xE0 && c0 <= 0xEF) {
    need = 3;
    if (c0 == 0xE0) lo = 0xA0;
    if (c0 == 0xED) hi = 0x9F;
  } else if (c0 >= 0xF0 && c0 <= 0xF4) {
    need = 4;
    if (c0 == 0xF0) lo = 0x90;
    if (c0 == 0xF4) hi = 0x8F;
  } else {
    return 1;
  }
  size_t k = 1;
  for (; k < need && i + k < s.size(); ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if (c < lo || c > hi) break;
    lo = 0x80;
    hi = 0xBF;
  }
  return k;
}

size_t utf8_incomplete_tail(std::string_view s) {
  // A multi-byte sequence is at most 4 bytes: look at the last 3 bytes for a lead byte.
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const size_t need = utf8_len(c);
    return need > back && maximal_subpart(s, n - back) == back ? back : 0;
  }
  return 0;
}

std::string utf8_sanitize(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    const uint32_t cp = utf8_decode(s, i);
    if (cp == UINT32_MAX) {
      out += "\xEF\xBF\xBD";
      i = start + maximal_subpart(s, start);
    } else {
      out.append(s.data() + start, i - start);
    }
  }
  return out;
}

// ---- SpecialMatcher ----------------------------------------------------------

int32_t SpecialMatcher::child(int32_t n, unsigned char c) const {
  const auto& nx = nodes_[n].next;
  auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, int32_t(-1)));
  return (it != nx.end() && it->first == c) ? it->second : -1;
}

int32_t SpecialMatcher::insert(std::string_view key) {
  int32_t n = 0;
  for (unsigned char c : key) {
    int32_t m = child(n, c);
    if (m < 0) {
      m = static_cast<int32_t>(nodes_.size());
      nodes_.emplace_back();
      auto& nx = nodes_[n].next;
      nx.insert(std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, int32_t(-1))), {c, m});
    }
    n = m;
  }
  return n;
}

void SpecialMatcher::build(const Vocab& v) {
  nodes_.assign(1, Node{});
  spm_spaces_ = v.kind == TokenizerKind::SPM;
  std::string key;
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    const TokenType t = v.types[id];
    if (t != TokenType::CONTROL && t != TokenType::USER_DEFINED && t != TokenType::UNKNOWN) continue;
    const std::string& s = v.tokens[id];
    if (s.empty()) continue;
    key.clear();
    const bool spaces = spm_spaces_ && t == TokenType::USER_DEFINED;  // U+2581 -> ' ' (the text is read the same way)
    for (size_t p = 0; p < s.size();) {
      if (spaces && s.compare(p, kSpaceMark.size(), kSpaceMark) == 0) {
        key += ' ';
        p += kSpaceMark.size();
      } else {
        key += s[p++];
      }
    }
    const int32_t n = insert(key);
    // Duplicate texts: the first id wins, but "always" if any copy is user-defined.
    if (nodes_[n].id < 0) nodes_[n].id = static_cast<int32_t>(id);
    if (t == TokenType::USER_DEFINED) nodes_[n].always = true;
  }
}

size_t SpecialMatcher::match_at(std::string_view text, size_t i, bool parse_special, int32_t& id) const {
  size_t best = 0;
  id = -1;
  auto accept = [&](int32_t n, size_t end, bool via_mark) {
    const Node& nd = nodes_[n];
    if (nd.id >= 0 && (nd.always || (parse_special && !via_mark)) && end - i > best) {
      best = end - i;
      id = nd.id;
    }
  };
  if (!spm_spaces_) {
    int32_t n = 0;
    for (size_t k = i; k < text.size(); ++k) {
      n = child(n, static_cast<unsigned char>(text[k]));
      if (n < 0) break;
      accept(n, k + 1, false);
    }
    return best;
  }
  // SPM: a U+2581 in the text may also stand for ' ' (user-defined pieces only), so up to a
  // few trie walks run side by side: (node, went through a U+2581-as-space).
  if (text.compare(i, kSpaceMark.size(), kSpaceMark) != 0 && child(0, static_cast<unsigned char>(text[i])) < 0)
    return 0;  // the common case, without the allocations below
  std::vector<std::pair<int32_t, bool>> cur{{0, false}}, next;
  for (size_t k = i; k < text.size() && !cur.empty();) {
    const bool mark = text.compare(k, kSpaceMark.size(), kSpaceMark) == 0;
    const size_t step = mark ? kSpaceMark.size() : 1;
    next.clear();
    for (const auto& [n0, via] : cur) {
      int32_t n = n0;
      for (size_t b = 0; b < step && n >= 0; ++b) n = child(n, static_cast<unsigned char>(text[k + b]));
      if (n >= 0) next.emplace_back(n, via);
      if (mark && (n = child(n0, ' ')) >= 0) next.emplace_back(n, true);
    }
    k += step;
    for (const auto& [n, via] : next) accept(n, k, via);
    cur.swap(next);
  }
  return best;
}

std::vector<Fragment> SpecialMatcher::split(std::string_view text, bool parse_special) const {
  std::vector<Fragment> out;
  size_t gap = 0, i = 0;
  if (empty()) {
    if (!text.empty()) out.push_back({0, text.size(), -1});
    return out;
  }
  while (i < text.size()) {
    int32_t best_id = -1;
    const size_t best_len = match_at(text, i, parse_special, best_id);
    if (best_id < 0) {
      ++i;
      continue;
    }
    if (i > gap) out.push_back({gap, i - gap, -1});
    out.push_back({i, best_len, best_id});
    i += best_len;
    gap = i;
  }
  if (text.size() > gap) out.push_back({gap, text.size() - gap, -1});
  return out;
}

// ---- byte-level map ------------------------------------------------------------

ByteUnicode::ByteUnicode() {
  // GPT-2: printable Latin-1 bytes map to themselves, the rest to U+0100 upwards.
  std::fill(std::begin(cp_to_byte), std::end(cp_to_byte), int16_t(-1));
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
    byte_to_utf8[b] = utf8_encode(cp);
    cp_to_byte[cp] = static_cast<int16_t>(b);
  }
}

const ByteUnicode& byte_unicode() {
  static const ByteUnicode m;
  return m;
}

int parse_byte_piece(const std::string& s) {
  auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
  if (s.size() != 6 || s.compare(0, 3, "<0x") != 0 || s[5] != '>') return -1;
  int hi = hex(s[3]), lo = hex(s[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::string spm_piece_bytes(const std::string& text, TokenType t) {
  if (t == TokenType::BYTE) {
    int v = parse_byte_piece(text);
    if (v >= 0) return std::string(1, static_cast<char>(v));
    return text;
  }
  std::string r;
  r.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, 3, kSpaceMark) == 0) {
      r += ' ';
      i += 3;
    } else {
      r += text[i++];
    }
  }
  return r;
}

Status normalize_vocab(Vocab& v) {
  const size_t n = v.tokens.size();
  if (n == 0) return make_error("tokenizer: empty vocabulary");
  if (n > (size_t(1) << 30)) return make_error("tokenizer: vocabulary too large (%zu)", n);
  if (v.types.empty()) v.types.assign(n, TokenType::NORMAL);
  if (v.types.size() != n)
    return make_error("tokenizer: %zu token types for %zu tokens", v.types.size(), n);
  if (v.kind == TokenizerKind::SPM && v.scores.empty()) v.scores.assign(n, 0.0f);
  if (!v.scores.empty() && v.scores.size() != n)
    return make_error("tokenizer: %zu scores for %zu tokens", v.scores.size(), n);
  for (auto& t : v.types) {
    if (static_cast<int32_t>(t) < 0 || static_cast<int32_t>(t) > 6) t = TokenType::UNDEFINED;
  }
  for (int32_t* id : {&v.bos, &v.eos, &v.unk, &v.pad, &v.eot}) {
    if (*id < -1 || *id >= static_cast<int64_t>(n))
      return make_error("tokenizer: special token id %d out of range (n_vocab %zu)", *id, n);
  }
  return Status::Ok();
}

}  // namespace tok

// ---- Tokenizer -----------------------------------------------------------------

std::string Tokenizer::token_bytes(int32_t id, bool render_special) const {
  if (id < 0 || id >= n_vocab() || static_cast<size_t>(id) >= bytes_.size()) return {};
  const TokenType t = vocab_.types[id];
  if (t == TokenType::CONTROL || t == TokenType::UNKNOWN) return render_special ? vocab_.tokens[id] : std::string();
  return bytes_[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  std::string out;
  bool strip = vocab_.kind == TokenizerKind::SPM && vocab_.add_space_prefix;
  for (int32_t id : ids) {
    std::string b = token_bytes(id, render_special);
    if (strip && id >= 0 && id < n_vocab()) {
      const TokenType t = vocab_.types[id];
      // The prefix space belongs to the first real piece (BOS and other controls are skipped).
      if (t != TokenType::CONTROL && t != TokenType::UNKNOWN && !b.empty()) {
        if (b[0] == ' ') b.erase(0, 1);
        strip = false;
      }
    }
    out += b;
  }
  return out;
}

std::string StreamDecoder::push(int32_t id) {
  std::string b = tok_.token_bytes(id, false);
  if (b.empty()) return {};
  if (first_) {
    first_ = false;
    const Vocab& v = tok_.vocab();
    if (strip_first_space_ && v.kind == TokenizerKind::SPM && v.add_space_prefix && b[0] == ' ') b.erase(0, 1);
  }
  pending_ += b;
  const size_t tail = tok::utf8_incomplete_tail(pending_);
  std::string out = tok::utf8_sanitize(std::string_view(pending_).substr(0, pending_.size() - tail));
  pending_.erase(0, pending_.size() - tail);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = tok::utf8_sanitize(pending_);
  pending_.clear();
  return out;
}

Result<std::unique_ptr<Tokenizer>> make_tokenizer(Vocab vocab) {
  if (vocab.kind == TokenizerKind::SPM) return tok::make_spm(std::move(vocab), tok::SpmOptions{});
  return tok::make_bpe(std::move(vocab));
}

Result<std::unique_ptr<Tokenizer>> load_tokenizer_any(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer.bin"}) {
      const std::string p = (fs::path(path) / name).string();
      if (fs::is_regular_file(p, ec)) return load_tokenizer_any(p);
    }
    return make_error("tokenizer: directory %s holds no tokenizer.json, tokenizer.model or tokenizer.bin",
                      path.c_str());
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) return make_error("tokenizer: cannot open %s", path.c_str());
  char head[64] = {};
  f.read(head, sizeof head);
  const size_t got = static_cast<size_t>(f.gcount());
  if (got >= 4 && std::memcmp(head, "GGUF", 4) == 0) {
    auto g = GgufFile::open(path);
    if (!g.ok()) return g.take_error();
    return load_tokenizer_gguf(*g.value());
  }
  size_t k = 0;
  while (k < got && (head[k] == ' ' || head[k] == '\n' || head[k] == '\r' || head[k] == '\t')) ++k;
  const bool ends_json = path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0;
  if (ends_json || (k < got && head[k] == '{')) return load_tokenizer_hf_json(path);
  const bool ends_model = path.size() >= 6 && path.compare(path.size() - 6, 6, ".model") == 0;
  if (ends_model) return load_tokenizer_spm_model(path);
  auto r = load_tokenizer_llama2c(path, 0);
  // A ModelProto starts with field 1 (pieces, length-delimited): tag byte 0x0A.
  if (!r.ok() && got > 0 && head[0] == 0x0A) {
    auto m = load_tokenizer_spm_model(path);
    if (m.ok()) return m;
  }
  return r;
}

}  // namespace larder
