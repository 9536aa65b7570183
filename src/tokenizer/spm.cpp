// SentencePiece-style BPE: merge the adjacent pair with the highest piece score,
// leftmost first, until no pair forms a piece (SentencePiece bpe_model.cc semantics).
#include <algorithm>
#include <cstdio>
#include <queue>
#include <unordered_map>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h"

namespace larder::tok {
namespace {

class SpmTokenizer final : public Tokenizer {
 public:
  SpmTokenizer(const SpmTokenizer&) = delete;  // pieces_ points into vocab_
  SpmTokenizer& operator=(const SpmTokenizer&) = delete;
  SpmTokenizer(Vocab v, SpmOptions opt) : opt_(opt) {
    vocab_ = std::move(v);
    const size_t n = vocab_.tokens.size();
    std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
    bytes_.resize(n);
    for (size_t id = 0; id < n; ++id) {
      const std::string& t = vocab_.tokens[id];
      const TokenType ty = vocab_.types[id];
      switch (ty) {
        case TokenType::NORMAL:
        case TokenType::UNUSED:
        case TokenType::UNDEFINED:
        case TokenType::USER_DEFINED:
          // Only these may be produced by merging; control/unknown/byte pieces cannot
          // (SentencePiece keeps them out of its piece table).
          pieces_.emplace(std::string_view(t), static_cast<int32_t>(id));
          break;
        case TokenType::BYTE: {
          int b = parse_byte_piece(t);
          if (b >= 0 && byte_ids_[b] < 0) byte_ids_[b] = static_cast<int32_t>(id);
          break;
        }
        default:
          break;
      }
      if (ty == TokenType::USER_DEFINED) {
        bytes_[id] = spm_piece_bytes(t, TokenType::NORMAL);  // literal text, but U+2581 is ' ' (as SentencePiece)
      } else if (ty != TokenType::CONTROL && ty != TokenType::UNKNOWN) {
        bytes_[id] = spm_piece_bytes(t, ty);
      }
    }
    special_.build(vocab_);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const override {
    std::vector<int32_t> out;
    if (add_bos && vocab_.add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
    bool prev_special = true;  // the space prefix goes on the first text and after specials
    std::string buf;
    for (const Fragment& f : special_.split(text, parse_special)) {
      if (f.id >= 0) {
        out.push_back(f.id);
        prev_special = true;
        continue;
      }
      std::string_view raw = text.substr(f.off, f.len);
      std::string collapsed;
      if (opt_.remove_extra_whitespaces) {
        collapsed = collapse_spaces(raw);
        if (collapsed.empty()) continue;
        raw = collapsed;
      }
      buf.clear();
      if (vocab_.add_space_prefix && prev_special) buf += kSpaceMark;
      for (char c : raw) {
        if (c == ' ') {
          buf += kSpaceMark;
        } else {
          buf += c;
        }
      }
      encode_text(buf, out);
      prev_special = false;
    }
    if (add_bos && vocab_.add_eos && vocab_.eos >= 0) out.push_back(vocab_.eos);
    return out;
  }

 private:
  struct Sym {
    int32_t prev, next;
    uint32_t off, n;
  };
  struct Bigram {
    float score;
    int32_t left, right;
    uint32_t size;
  };
  struct BigramLess {
    bool operator()(const Bigram& a, const Bigram& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };

  // SentencePiece remove_extra_whitespaces: drop leading/trailing spaces, collapse runs.
  static std::string collapse_spaces(std::string_view s) {
    std::string r;
    bool pending = false;
    for (char c : s) {
      if (c == ' ') {
        pending = !r.empty();
        continue;
      }
      if (pending) r += ' ';
      pending = false;
      r += c;
    }
    return r;
  }

  int32_t find_piece(std::string_view s) const {
    auto it = pieces_.find(s);
    return it == pieces_.end() ? -1 : it->second;
  }

  void encode_text(const std::string& s, std::vector<int32_t>& out) const {
    if (s.empty()) return;
    std::vector<Sym> syms;
    syms.reserve(s.size());
    for (size_t off = 0; off < s.size();) {
      // Malformed UTF-8 becomes one-byte symbols (then byte tokens), so it cannot swallow
      // the next character.
      size_t end = off;
      utf8_decode(s, end);
      const size_t n = end - off;
      const int32_t idx = static_cast<int32_t>(syms.size());
      syms.push_back({idx - 1, off + n == s.size() ? -1 : idx + 1, static_cast<uint32_t>(off), static_cast<uint32_t>(n)});
      off += n;
    }
    std::priority_queue<Bigram, std::vector<Bigram>, BigramLess> queue;
    // Unused pieces may be merged through but are split back afterwards.
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> rev_merge;
    auto try_add = [&](int32_t l, int32_t r) {
      if (l < 0 || r < 0) return;
      const std::string_view piece(s.data() + syms[l].off, syms[l].n + syms[r].n);
      const int32_t id = find_piece(piece);
      if (id < 0) return;
      queue.push({vocab_.scores[id], l, r, static_cast<uint32_t>(piece.size())});
      if (vocab_.types[id] == TokenType::UNUSED) {
        rev_merge[piece] = {std::string_view(s.data() + syms[l].off, syms[l].n),
                            std::string_view(s.data() + syms[r].off, syms[r].n)};
      }
    };
    for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) try_add(i - 1, i);
    while (!queue.empty()) {
      const Bigram b = queue.top();
      queue.pop();
      Sym& l = syms[b.left];
      Sym& r = syms[b.right];
      // Stale entry: one side has been merged since it was queued.
      if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = b.left;
      try_add(l.prev, b.left);
      try_add(b.left, l.next);
    }
    bool prev_unk = false;
    for (int32_t i = 0; i != -1; i = syms[i].next) {
      emit(std::string_view(s.data() + syms[i].off, syms[i].n), rev_merge, out, prev_unk, 0);
    }
  }

  void emit(std::string_view w,
            const std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>>& rev,
            std::vector<int32_t>& out, bool& prev_unk, int depth) const {
    const int32_t id = find_piece(w);
    if (id >= 0) {
      if (vocab_.types[id] == TokenType::UNUSED && depth < 64) {
        auto it = rev.find(w);
        if (it != rev.end()) {
          emit(it->second.first, rev, out, prev_unk, depth + 1);
          emit(it->second.second, rev, out, prev_unk, depth + 1);
          return;
        }
      }
      out.push_back(id);
      prev_unk = false;
      return;
    }
    // Byte fallback when every byte has a <0xNN> piece, otherwise one <unk> per run.
    bool all_bytes = true;
    for (unsigned char c : w) all_bytes = all_bytes && byte_ids_[c] >= 0;
    if (all_bytes) {
      for (unsigned char c : w) out.push_back(byte_ids_[c]);
      prev_unk = false;
      return;
    }
    if (vocab_.unk >= 0 && !prev_unk) out.push_back(vocab_.unk);
    prev_unk = vocab_.unk >= 0;
  }

  SpmOptions opt_;
  std::unordered_map<std::string_view, int32_t> pieces_;
  int32_t byte_ids_[256];
  SpecialMatcher special_;
};

}  // namespace

Result<std::unique_ptr<Tokenizer>> make_spm(Vocab v, SpmOptions opt) {
  v.kind = TokenizerKind::SPM;
  LARDER_CHECK_STATUS(normalize_vocab(v));
  return std::unique_ptr<Tokenizer>(new SpmTokenizer(std::move(v), opt));
}

}  // namespace larder::tok
