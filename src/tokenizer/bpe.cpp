// Byte-level BPE (GPT-2 family): pre-tokenize with regexes, map bytes to the
// GPT-2 unicode alphabet, then apply merges lowest rank first (leftmost on ties).
#include <algorithm>
#include <unordered_map>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h"

namespace larder::tok {
namespace {

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const BpeTokenizer&) = delete;  // maps point into vocab_
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;
  explicit BpeTokenizer(Vocab v) { vocab_ = std::move(v); }

  Status init() {
    LARDER_CHECK_STATUS(pre_.init(vocab_.pre));
    const size_t n = vocab_.tokens.size();
    token_to_id_.reserve(n);
    for (size_t id = 0; id < n; ++id) token_to_id_.emplace(std::string_view(vocab_.tokens[id]), static_cast<int32_t>(id));
    const ByteUnicode& bu = byte_unicode();
    for (int b = 0; b < 256; ++b) byte_ids_[b] = find(bu.byte_to_utf8[b]);
    merges_.reserve(vocab_.merges.size());
    std::string joined;
    for (size_t r = 0; r < vocab_.merges.size(); ++r) {
      const std::string& m = vocab_.merges[r];
      // Split at the first space after position 0 (a part could itself be a space in odd vocabularies).
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) continue;
      const int32_t a = find(std::string_view(m).substr(0, sp));
      const int32_t b = find(std::string_view(m).substr(sp + 1));
      if (a < 0 || b < 0) continue;
      joined.assign(m, 0, sp);
      joined.append(m, sp + 1);
      const int32_t c = find(joined);
      if (c < 0) continue;
      merges_.emplace(key(a, b), Merge{static_cast<int32_t>(r), c});  // first (best) rank wins
    }
    bytes_.resize(n);
    for (size_t id = 0; id < n; ++id) {
      const TokenType t = vocab_.types[id];
      if (t == TokenType::CONTROL || t == TokenType::UNKNOWN) continue;
      bytes_[id] = t == TokenType::USER_DEFINED ? vocab_.tokens[id] : unmap(vocab_.tokens[id]);
    }
    special_.build(vocab_);
    return Status::Ok();
  }

  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const override {
    std::vector<int32_t> out;
    if (add_bos && vocab_.add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
    std::vector<std::pair<size_t, size_t>> pieces;
    Work w;
    for (const Fragment& f : special_.split(text, parse_special)) {
      if (f.id >= 0) {
        out.push_back(f.id);
        continue;
      }
      const std::string_view frag = text.substr(f.off, f.len);
      pre_.split(frag, pieces);
      for (const auto& [off, len] : pieces) encode_piece(frag.substr(off, len), w, out);
    }
    if (add_bos && vocab_.add_eos && vocab_.eos >= 0) out.push_back(vocab_.eos);
    return out;
  }

 private:
  struct Merge {
    int32_t rank, result;
  };
  struct Sym {
    int32_t prev, next, id;
    uint32_t n;  // bytes covered; 0 once merged away
  };
  struct Bigram {
    int32_t rank, left, right, result;
    uint32_t size;
  };
  struct BigramGreater {
    bool operator()(const Bigram& a, const Bigram& b) const {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    }
  };
  struct Work {
    std::vector<Sym> syms;
    std::vector<Bigram> heap;
    std::string mapped;
  };

  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  int32_t find(std::string_view s) const {
    auto it = token_to_id_.find(s);
    return it == token_to_id_.end() ? -1 : it->second;
  }

  // Undo the byte-to-unicode map; characters outside it are kept as they are.
  static std::string unmap(const std::string& t) {
    const ByteUnicode& bu = byte_unicode();
    std::string r;
    for (size_t i = 0; i < t.size();) {
      const size_t start = i;
      const uint32_t cp = utf8_decode(t, i);
      if (cp < 512 && bu.cp_to_byte[cp] >= 0) {
        r += static_cast<char>(bu.cp_to_byte[cp]);
      } else {
        r.append(t, start, i - start);
      }
    }
    return r;
  }

  void encode_piece(std::string_view piece, Work& w, std::vector<int32_t>& out) const {
    if (piece.empty()) return;
    const ByteUnicode& bu = byte_unicode();
    if (pre_.ignore_merges()) {
      w.mapped.clear();
      for (unsigned char c : piece) w.mapped += bu.byte_to_utf8[c];
      const int32_t id = find(w.mapped);
      if (id >= 0 && vocab_.types[id] == TokenType::NORMAL) {
        out.push_back(id);
        return;
      }
    }
    // One symbol per byte: in the byte-level alphabet every byte is one character. A byte with
    // no token in the vocabulary's alphabet is dropped before merging, so that its neighbours
    // can merge (as HF's BPE without an unk token does; SmolLM2 lacks 0x04, falcon 0x03, ...).
    auto& syms = w.syms;
    syms.clear();
    for (unsigned char c : piece) {
      if (byte_ids_[c] < 0) continue;
      const int32_t i = static_cast<int32_t>(syms.size());
      syms.push_back({i - 1, i + 1, byte_ids_[c], 1});
    }
    if (syms.empty()) return;
    syms.back().next = -1;
    const int32_t n = static_cast<int32_t>(syms.size());
    auto& heap = w.heap;
    heap.clear();
    const BigramGreater cmp;
    auto try_add = [&](int32_t l, int32_t r) {
      if (l < 0 || r < 0 || syms[l].id < 0 || syms[r].id < 0) return;
      auto it = merges_.find(key(syms[l].id, syms[r].id));
      if (it == merges_.end()) return;
      heap.push_back({it->second.rank, l, r, it->second.result, syms[l].n + syms[r].n});
      std::push_heap(heap.begin(), heap.end(), cmp);
    };
    for (int32_t i = 1; i < n; ++i) try_add(i - 1, i);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      const Bigram b = heap.back();
      heap.pop_back();
      Sym& l = syms[b.left];
      Sym& r = syms[b.right];
      if (l.n == 0 || r.n == 0 || l.n + r.n != b.size || l.next != b.right) continue;  // stale
      l.id = b.result;
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = b.left;
      try_add(l.prev, b.left);
      try_add(b.left, l.next);
    }
    for (int32_t i = 0; i != -1; i = syms[i].next) out.push_back(syms[i].id);
  }

  Pretokenizer pre_;
  std::unordered_map<std::string_view, int32_t> token_to_id_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t byte_ids_[256];
  SpecialMatcher special_;
};

}  // namespace

Result<std::unique_ptr<Tokenizer>> make_bpe(Vocab v) {
  v.kind = TokenizerKind::BPE;
  LARDER_CHECK_STATUS(normalize_vocab(v));
  auto t = std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(v)));
  LARDER_CHECK_STATUS(t->init());
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace larder::tok
