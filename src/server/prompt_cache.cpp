#include "server/prompt_cache.h"

#include <algorithm>

#include "tokenizer/tokenizer.h"

namespace larder::server {

namespace {

constexpr int kImplicitBos = 1, kParseSpecial = 2;
constexpr size_t kFarMismatch = 64;  // bytes into the rest: an earlier cut will not help
constexpr size_t kMaxSlack = 2;      // echo_replies: whitespace bytes skipped before a reply
constexpr size_t kNone = static_cast<size_t>(-1);

bool is_utf8_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

bool all_space(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; });
}

size_t common_prefix(std::string_view a, std::string_view b) {
  const size_t n = std::min(a.size(), b.size());
  return static_cast<size_t>(std::mismatch(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(n), b.begin()).first -
                             a.begin());
}

}  // namespace

struct PromptCache::Entry {
  int mode = 0;
  std::vector<int32_t> ids;                          // implicit BOS included
  std::string text;                                  // what ids stand for
  std::vector<uint32_t> offs;                        // [ids.size() + 1]: text length after i ids
  std::vector<uint8_t> nocut;                        // [ids.size() + 1]: 1 = not a cut point
  std::vector<std::pair<uint32_t, uint32_t>> spans;  // special tokens' text [begin, end)
  size_t reply_tok = kNone;                          // echo_replies: first generated id
  size_t bytes = 0;
};

// The chosen entry, how far its text matches (in new-text offsets), and the whitespace
// skipped at its reply: `a` bytes of the new text, `b` of the entry's.
struct PromptCache::Match {
  size_t common = 0, a = 0, b = 0;
};

PromptCache::PromptCache(const Tokenizer& tok, PromptCacheParams p) : tok_(tok), p_(p) {
  const Vocab& v = tok.vocab();
  spm_ = v.kind == TokenizerKind::SPM;
  dummy_prefix_ = spm_ && v.add_space_prefix;
  // encode(add_bos) appending EOS (add_eos vocabularies) gives ids that stand for no text.
  usable_ = !(v.add_eos && v.eos >= 0);
  const int32_t n = tok.n_vocab();
  if (spm_) {
    mark_byte_.assign(static_cast<size_t>(n), 0);
    for (int32_t id = 0; id < n; ++id) {
      if (v.types[id] != TokenType::BYTE) continue;
      const std::string b = tok.token_bytes(id);
      if (b == "\xE2") mark_byte_[id] = 1;
      if (b == "\x96") mark_byte_[id] = 2;
      if (b == "\x81") mark_byte_[id] = 3;
    }
  }
  special_mode_.assign(static_cast<size_t>(n), 0);
  for (auto& s : specials_) s.by_first.assign(256, {});
  for (int32_t id = 0; id < n; ++id) {
    const TokenType t = v.types[id];
    if (t != TokenType::CONTROL && t != TokenType::USER_DEFINED && t != TokenType::UNKNOWN) continue;
    const std::string& s = v.tokens[id];
    if (s.empty()) continue;
    for (int m = 0; m < 2; ++m) {
      // Special in this mode only when the tokenizer turns its text back into it.
      std::vector<int32_t> r = tok.encode(s, /*add_bos=*/false, /*parse_special=*/m == 1);
      if (r.size() != 1 || r[0] != id) continue;
      special_mode_[id] |= static_cast<uint8_t>(1u << m);
      specials_[m].by_first[static_cast<unsigned char>(s[0])].push_back(s);
      specials_[m].empty = false;
    }
  }
  for (auto& s : specials_)
    for (auto& b : s.by_first)
      std::stable_sort(b.begin(), b.end(), [](const auto& x, const auto& y) { return x.size() > y.size(); });
}

PromptCache::~PromptCache() = default;

PromptCache::Kind PromptCache::kind(int32_t id, bool parse_special) const {
  if (id < 0 || id >= tok_.n_vocab()) return Kind::Barrier;
  if (special_mode_[id] & (1u << (parse_special ? 1 : 0))) return Kind::Special;
  const TokenType t = tok_.vocab().types[id];
  // Control / user-defined / unknown tokens the encoder would not produce here.
  if (t == TokenType::CONTROL || t == TokenType::USER_DEFINED || t == TokenType::UNKNOWN) return Kind::Barrier;
  return Kind::Text;
}

bool PromptCache::implicit_bos(bool add_bos) const {
  const Vocab& v = tok_.vocab();
  return add_bos && v.add_bos && v.bos >= 0;
}

int PromptCache::mode_of(bool add_bos, bool parse_special) const {
  return (implicit_bos(add_bos) ? kImplicitBos : 0) | (parse_special ? kParseSpecial : 0);
}

void PromptCache::special_spans(std::string_view text, bool parse_special,
                                std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  const SpecialSet& set = specials_[parse_special ? 1 : 0];
  if (set.empty) return;
  size_t i = 0;
  while (i < text.size()) {
    size_t len = 0;
    for (const auto& s : set.by_first[static_cast<unsigned char>(text[i])]) {
      if (text.compare(i, s.size(), s) == 0) {
        len = s.size();  // longest first
        break;
      }
    }
    if (len == 0) {
      ++i;
      continue;
    }
    out.emplace_back(i, i + len);
    i += len;
  }
}

size_t PromptCache::space_mark_len(std::span<const int32_t> ids, size_t i) const {
  // The encoder turns spaces into U+2581; where no piece covers it, byte fallback gives
  // its three bytes: that is a space too.
  auto mark = [&](size_t k) {
    const int32_t id = ids[k];
    return id >= 0 && static_cast<size_t>(id) < mark_byte_.size() ? mark_byte_[id] : 0;
  };
  return spm_ && i + 2 < ids.size() && mark(i) == 1 && mark(i + 1) == 2 && mark(i + 2) == 3 ? 3 : 0;
}

size_t PromptCache::decode_into(std::span<const int32_t> ids, bool parse_special, bool after_special,
                                std::string& text, std::vector<uint32_t>* offs, std::vector<uint8_t>* nocut) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (const size_t n = space_mark_len(ids, i)) {
      if (!(dummy_prefix_ && after_special)) text += ' ';
      after_special = false;
      for (size_t k = 0; k < n; ++k) {
        if (offs) offs->push_back(static_cast<uint32_t>(text.size()));
        if (nocut) nocut->push_back(k + 1 < n);  // not inside the three bytes
      }
      i += n - 1;
      continue;
    }
    switch (kind(id, parse_special)) {
      case Kind::Barrier:
        return i;
      case Kind::Special:
        text += tok_.vocab().tokens[id];
        after_special = true;
        break;
      case Kind::Text: {
        std::string b = tok_.token_bytes(id);
        if (b.empty()) break;
        // SentencePiece's dummy prefix: the encoder puts U+2581 before each text fragment.
        if (dummy_prefix_ && after_special && b[0] == ' ') b.erase(0, 1);
        text += b;
        after_special = false;
        break;
      }
    }
    if (offs) offs->push_back(static_cast<uint32_t>(text.size()));
    if (nocut) nocut->push_back(0);
  }
  return ids.size();
}

bool PromptCache::decode(std::span<const int32_t> ids, bool add_bos, bool parse_special, std::string& text) const {
  text.clear();
  size_t n0 = 0;
  if (implicit_bos(add_bos)) {
    if (ids.empty() || ids[0] != tok_.bos()) return false;
    n0 = 1;
  }
  return decode_into(ids.subspan(n0), parse_special, true, text, nullptr) == ids.size() - n0;
}

PromptCache::Encoded PromptCache::plain(std::string_view text, bool add_bos, bool parse_special) const {
  Encoded r;
  r.ids = tok_.encode(text, add_bos, parse_special);
  const size_t n0 = implicit_bos(add_bos) && !r.ids.empty() && r.ids[0] == tok_.bos() ? 1 : 0;
  if (implicit_bos(add_bos) && n0 == 0) return r;  // no alignment
  std::string back;
  r.offs.assign(n0 + 1, 0);
  r.nocut.assign(n0 + 1, 0);
  const size_t n =
      decode_into(std::span<const int32_t>(r.ids).subspan(n0), parse_special, true, back, &r.offs, &r.nocut);
  if (n0 + n != r.ids.size() || back != text) {
    // The tokenizer does not round-trip this text: align only the ids before the difference.
    const size_t m = common_prefix(back, text);
    size_t k = static_cast<size_t>(std::upper_bound(r.offs.begin(), r.offs.end(), static_cast<uint32_t>(m)) -
                                   r.offs.begin());
    while (k > n0 + 1 && r.nocut[k - 1]) --k;
    r.offs.resize(std::max<size_t>(k, 1));
    r.nocut.resize(r.offs.size());
  }
  return r;
}

std::shared_ptr<const PromptCache::Entry> PromptCache::best_entry(std::string_view text, int mode, Match& best) {
  std::lock_guard<std::mutex> lk(mu_);
  auto found = lru_.end();
  best = Match{};
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    const Entry& e = **it;
    if (e.mode != mode) continue;
    Match m;
    m.common = common_prefix(e.text, text);
    if (e.reply_tok != kNone) {
      // echo_replies: whitespace the template writes before the reply (or trims from it).
      const size_t j = e.offs[e.reply_tok];
      if (m.common >= j) {
        for (size_t a = 0; a <= kMaxSlack && j + a <= text.size(); ++a) {
          if (!all_space(text.substr(j, a))) break;
          for (size_t b = 0; b <= kMaxSlack && j + b <= e.text.size(); ++b) {
            if (!all_space(std::string_view(e.text).substr(j, b))) break;
            if (a == 0 && b == 0) continue;
            const size_t c = j + a + common_prefix(text.substr(j + a), std::string_view(e.text).substr(j + b));
            if (c > m.common) m = Match{c, a, b};
          }
        }
      }
    }
    if (m.common > best.common) {
      best = m;
      found = it;
    }
  }
  if (found == lru_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, found);
  return lru_.front();
}

PromptCache::Encoded PromptCache::encode(std::string_view text, bool add_bos, bool parse_special) {
  if (!enabled() || text.empty()) return plain(text, add_bos, parse_special);
  const int mode = mode_of(add_bos, parse_special);
  {
    std::lock_guard<std::mutex> lk(mu_);
    st_.lookups++;
  }
  Match m;
  std::shared_ptr<const Entry> e = best_entry(text, mode, m);
  if (!e) return plain(text, add_bos, parse_special);
  const size_t n0 = (mode & kImplicitBos) ? 1 : 0;

  // Entry offsets in new-text coordinates (kNone: inside whitespace skipped at the reply).
  const size_t j = e->reply_tok != kNone ? e->offs[e->reply_tok] : kNone;
  auto mapped = [&](size_t i) -> size_t {
    const size_t eo = e->offs[i];
    if (j == kNone || i <= e->reply_tok) return eo;
    if (eo < j + m.b) return kNone;
    return eo - m.b + m.a;
  };

  // Special tokens must sit where the tokenizer's own split of the new text puts them.
  std::vector<std::pair<size_t, size_t>> spans;
  special_spans(text, parse_special, spans);
  size_t same_spans = 0;  // leading spans equal in the entry and the new text
  while (same_spans < spans.size() && same_spans < e->spans.size() &&
         spans[same_spans].first == e->spans[same_spans].first &&
         spans[same_spans].second == e->spans[same_spans].second)
    ++same_spans;

  // The last cut at or before the end of the common prefix.
  const size_t target = (j != kNone && m.common > j) ? m.common - m.a + m.b : m.common;
  size_t k = static_cast<size_t>(std::upper_bound(e->offs.begin(), e->offs.end(), static_cast<uint32_t>(target)) -
                                 e->offs.begin()) - 1;
  std::vector<int32_t> rest_ids;
  std::string check;
  std::vector<uint32_t> rest_offs;
  std::vector<uint8_t> rest_nocut;
  int tries = 0;
  for (; k > n0 && tries < p_.max_back_steps; --k) {
    if (e->nocut[k]) continue;
    const size_t o = mapped(k);
    if (o == kNone || o > m.common) continue;
    if (o < text.size() && is_utf8_continuation(text[o])) continue;
    // Spans of the new text: none may straddle o; those before o must be the entry's.
    const size_t n_new = static_cast<size_t>(
        std::lower_bound(spans.begin(), spans.end(), std::make_pair(o, size_t(0))) - spans.begin());
    if (n_new > 0 && spans[n_new - 1].second > o) continue;
    const size_t n_old = static_cast<size_t>(
        std::upper_bound(e->spans.begin(), e->spans.end(), std::make_pair(uint32_t(0), static_cast<uint32_t>(o)),
                         [](const auto& x, const auto& y) { return x.second < y.second; }) -
        e->spans.begin());
    if (n_new != n_old || n_new > same_spans) continue;

    const bool after_special = kind(e->ids[k - 1], parse_special) == Kind::Special;
    std::string_view rest = text.substr(o);
    bool drop_lone_space = false;
    if (rest.empty()) {
      rest_ids.clear();
    } else if (!dummy_prefix_ || after_special || (n_new < spans.size() && spans[n_new].first == o)) {
      // No dummy prefix here, or one the encoder adds as it would after a special token
      // (and none before a special token).
      rest_ids = tok_.encode(rest, /*add_bos=*/false, parse_special);
    } else if (rest[0] == ' ') {
      // Mid-text cut before a space: the encoder's dummy prefix stands for that space.
      rest_ids = tok_.encode(rest.substr(1), false, parse_special);
    } else if (rest[0] == '\n' || rest[0] == '\r' || rest[0] == '\t') {
      // Mid-text cut before a control character: usable if the dummy prefix comes out as a
      // piece of its own (it usually does: "\n" is a byte token in SentencePiece vocabularies).
      rest_ids = tok_.encode(rest, false, parse_special);
      drop_lone_space = true;
    } else {
      continue;  // the dummy prefix would merge with what follows
    }
    ++tries;
    if (drop_lone_space) {
      size_t n = space_mark_len(rest_ids, 0);
      if (n == 0 && !rest_ids.empty() && tok_.token_bytes(rest_ids[0]) == " ") n = 1;
      if (n == 0) continue;
      rest_ids.erase(rest_ids.begin(), rest_ids.begin() + static_cast<std::ptrdiff_t>(n));
    }
    check.clear();
    rest_offs.clear();
    rest_nocut.clear();
    if (decode_into(rest_ids, parse_special, after_special, check, &rest_offs, &rest_nocut) != rest_ids.size() ||
        check != rest) {
      // A difference far from the cut (a lossy normalization, say) does not go away with
      // an earlier cut.
      if (common_prefix(check, rest) >= kFarMismatch) break;
      continue;
    }
    Encoded out;
    out.ids.reserve(k + rest_ids.size());
    out.ids.assign(e->ids.begin(), e->ids.begin() + static_cast<std::ptrdiff_t>(k));
    out.ids.insert(out.ids.end(), rest_ids.begin(), rest_ids.end());
    out.reused_tokens = static_cast<int>(k);
    out.offs.reserve(out.ids.size() + 1);
    out.nocut.reserve(out.ids.size() + 1);
    size_t prev = 0;
    for (size_t i = 0; i <= k; ++i) {
      const size_t mo = mapped(i);
      out.offs.push_back(static_cast<uint32_t>(mo == kNone ? std::max(prev, j + m.a) : mo));
      out.nocut.push_back(mo == kNone || e->nocut[i]);
      prev = out.offs.back();
    }
    for (size_t i = 0; i < rest_offs.size(); ++i) {
      out.offs.push_back(static_cast<uint32_t>(o + rest_offs[i]));
      out.nocut.push_back(rest_nocut[i]);
    }
    std::lock_guard<std::mutex> lk(mu_);
    st_.hits++;
    st_.reused_tokens += static_cast<int64_t>(k);
    return out;
  }
  return plain(text, add_bos, parse_special);
}

void PromptCache::insert(std::string_view text, const Encoded& prompt, std::span<const int32_t> generated,
                         bool add_bos, bool parse_special, bool strip_first_space) {
  if (!enabled() || p_.max_entries == 0 || prompt.offs.empty() || prompt.offs.size() > prompt.ids.size() + 1 ||
      prompt.nocut.size() != prompt.offs.size() || prompt.offs.back() > text.size())
    return;
  auto e = std::make_shared<Entry>();
  e->mode = mode_of(add_bos, parse_special);
  const size_t n0 = (e->mode & kImplicitBos) ? 1 : 0;
  const size_t n_al = prompt.offs.size() - 1;  // aligned prompt ids
  if (n_al < n0) return;
  e->ids.assign(prompt.ids.begin(), prompt.ids.begin() + static_cast<std::ptrdiff_t>(n_al));
  e->text.assign(text.substr(0, prompt.offs.back()));
  e->offs = prompt.offs;
  e->nocut = prompt.nocut;
  if (n_al == prompt.ids.size() && e->text.size() == text.size() && !generated.empty()) {
    if (p_.echo_replies) {
      // The reply as the client got it (StreamDecoder), cut only where nothing is held back.
      e->reply_tok = n_al;
      StreamDecoder dec(tok_, strip_first_space);
      for (int32_t id : generated) {
        if (id < 0 || id >= tok_.n_vocab()) break;
        e->ids.push_back(id);
        e->text += dec.push(id);
        StreamDecoder probe = dec;
        const bool clean = probe.flush().empty() && !tok_.token_bytes(id).empty();
        e->offs.push_back(static_cast<uint32_t>(e->text.size()));
        e->nocut.push_back(!clean);
      }
      e->text += dec.flush();  // no boundary after it: the last id stays uncut if held back
    } else {
      const bool after_special = n_al == n0 || kind(e->ids.back(), parse_special) == Kind::Special;
      const size_t n = decode_into(generated, parse_special, after_special, e->text, &e->offs, &e->nocut);
      e->ids.insert(e->ids.end(), generated.begin(), generated.begin() + static_cast<std::ptrdiff_t>(n));
    }
  }
  if (e->text.empty()) return;
  for (size_t i = n0; i < e->ids.size(); ++i) {
    if (kind(e->ids[i], parse_special) != Kind::Special) continue;
    const std::string& s = tok_.vocab().tokens[e->ids[i]];
    if (e->offs[i + 1] - e->offs[i] == s.size() && e->text.compare(e->offs[i], s.size(), s) == 0)
      e->spans.emplace_back(e->offs[i], e->offs[i + 1]);
  }
  add_entry(std::move(e));
}

void PromptCache::insert(std::span<const int32_t> ids, bool add_bos, bool parse_special) {
  if (!enabled() || p_.max_entries == 0) return;
  const bool implicit = implicit_bos(add_bos);
  const size_t n0 = implicit ? 1 : 0;
  if (implicit && (ids.empty() || ids[0] != tok_.bos())) return;
  Encoded p;
  std::string text;
  p.offs.assign(n0 + 1, 0);
  p.nocut.assign(n0 + 1, 0);
  const size_t n = decode_into(ids.subspan(n0), parse_special, true, text, &p.offs, &p.nocut);
  p.ids.assign(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n0 + n));
  insert(text, p, {}, add_bos, parse_special);
}

void PromptCache::add_entry(std::shared_ptr<Entry> e) {
  e->bytes = sizeof(Entry) + e->text.size() + e->ids.size() * sizeof(int32_t) +
             e->offs.size() * (sizeof(uint32_t) + 1) + e->spans.size() * sizeof(e->spans[0]);
  if (e->bytes > p_.max_bytes) return;
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    const Entry& o = **it;
    // Same ids with the same text for them (and the shorter one's reply, if it has one,
    // in the same place): the longer entry matches whatever the shorter one would.
    const size_t m = std::min(o.ids.size(), e->ids.size());
    const Entry& shorter = o.ids.size() <= e->ids.size() ? o : *e;
    const Entry& longer = o.ids.size() <= e->ids.size() ? *e : o;
    if (o.mode == e->mode && (shorter.reply_tok == kNone || shorter.reply_tok == longer.reply_tok) &&
        std::equal(o.ids.begin(), o.ids.begin() + static_cast<std::ptrdiff_t>(m), e->ids.begin()) &&
        std::equal(o.offs.begin(), o.offs.begin() + static_cast<std::ptrdiff_t>(m) + 1, e->offs.begin()) &&
        shorter.text.size() <= longer.text.size() &&
        std::string_view(longer.text).substr(0, shorter.text.size()) == shorter.text) {
      if (o.ids.size() >= e->ids.size()) {  // already covered: refresh it
        lru_.splice(lru_.begin(), lru_, it);
        return;
      }
      bytes_ -= o.bytes;  // the new entry covers it
      it = lru_.erase(it);
      continue;
    }
    ++it;
  }
  bytes_ += e->bytes;
  lru_.push_front(std::move(e));
  st_.inserts++;
  evict_locked();
}

void PromptCache::evict_locked() {
  while (!lru_.empty() && (lru_.size() > p_.max_entries || bytes_ > p_.max_bytes)) {
    bytes_ -= lru_.back()->bytes;
    lru_.pop_back();
    st_.evictions++;
  }
}

PromptCacheStats PromptCache::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  PromptCacheStats s = st_;
  s.entries = lru_.size();
  s.bytes = bytes_;
  return s;
}

void PromptCache::clear() {
  std::lock_guard<std::mutex> lk(mu_);
  lru_.clear();
  bytes_ = 0;
}

}  // namespace larder::server
