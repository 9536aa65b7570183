// Token-level reuse of previous requests' prompts and replies (multi-turn chat).
//
// A chat client sends the whole conversation every turn. The server renders it to text
// and tokenizes it again, and the re-tokenized assistant reply need not equal the ids that
// were generated (a different split, shifted block boundaries), so the KV blocks of the
// reply and of everything after it would miss the prefix cache. Like llama.cpp's server
// keeps its slot tokens, this cache keeps, for recently finished requests, the token ids
// of prompt + generated tokens aligned with the text they stand for (a text offset at
// every token boundary). A new prompt reuses the ids of the entry sharing its longest
// text prefix, up to a token boundary inside that common prefix, and only the rest of the
// text is tokenized (no BOS, same special-token parsing).
//
// Text here means "prompt text": what the tokenizer takes as input. Token ids map to it
// as follows (decode()):
//   - ordinary pieces give their bytes (Tokenizer::token_bytes). SentencePiece: the byte
//     tokens of U+2581 together give a space (byte fallback of the encoder's space mark),
//     and with a dummy prefix the first piece at the start or after a special token loses
//     one leading space (the encoder adds it there);
//   - special tokens (control / user-defined / unknown) give their text, but only those
//     the encoder would produce from that text in this mode (parse_special or not);
//   - anything else (e.g. a generated end-of-sequence token when special tokens are not
//     parsed) cannot stand for text: an entry ends before it;
//   - the BOS that encode(add_bos) prepends stands for no text.
//
// Invariant (default): encode() returns ids whose decode() is exactly the text, whose
// special tokens sit where the tokenizer's own split (leftmost-longest) puts them, and
// which equal tok.encode(text, add_bos, parse_special) when nothing is reused. A cut is
// taken only at a UTF-8 character boundary, outside any special token's text, and the
// tokenized rest is checked to decode to the rest of the text (else an earlier cut).
//
// echo_replies (off by default) relaxes this for generated text only: a reply is also
// aligned with the text the client received for it (invalid UTF-8 shown as U+FFFD,
// control tokens shown as nothing, the first space stripped for chat), and up to two
// whitespace bytes the template writes before it (or trims from it) are skipped. A client
// that sends the reply back verbatim then gets the ids the model generated, even where
// those do not decode to its text: the model sees its own earlier turn as it produced it.
// The tokenized rest still round-trips exactly.
//
// Memory is bounded (LRU by entries and bytes). All methods are thread-safe; entries are
// immutable and shared, so the lock is held only to pick and to insert.
#pragma once
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace larder {
class Tokenizer;
}

namespace larder::server {

struct PromptCacheParams {
  bool enabled = true;
  size_t max_entries = 256;
  size_t max_bytes = 64u << 20;  // text + ids + offsets of all entries
  int max_back_steps = 8;        // earlier cuts tokenized when the rest does not round-trip
  bool echo_replies = false;     // see above
};

struct PromptCacheStats {
  int64_t lookups = 0, hits = 0;
  int64_t reused_tokens = 0;  // ids taken from entries instead of tokenized
  int64_t inserts = 0, evictions = 0;
  size_t entries = 0, bytes = 0;
};

class PromptCache {
 public:
  explicit PromptCache(const Tokenizer& tok, PromptCacheParams p = {});
  ~PromptCache();
  PromptCache(const PromptCache&) = delete;
  PromptCache& operator=(const PromptCache&) = delete;

  struct Encoded {
    std::vector<int32_t> ids;
    int reused_tokens = 0;  // leading ids taken from a cached entry (0: plain tokenization)
    // Alignment, for insert(): the text offset after each of the first offs.size() - 1
    // ids (all of them unless the tokenizer does not round-trip this text), and the
    // boundaries a later prompt may not cut at.
    std::vector<uint32_t> offs;
    std::vector<uint8_t> nocut;
  };
  // Like tok.encode(text, add_bos, parse_special), reusing a cached entry's ids for the
  // longest usable text prefix.
  Encoded encode(std::string_view text, bool add_bos, bool parse_special);

  // Remembers a finished request: its prompt text, what encode() gave for it, and its
  // generated ids. strip_first_space: the client got the reply without its first space
  // (chat; used by echo_replies).
  void insert(std::string_view text, const Encoded& prompt, std::span<const int32_t> generated, bool add_bos,
              bool parse_special, bool strip_first_space = true);
  // Remembers ids (prompt + generated) with the text they decode to.
  void insert(std::span<const int32_t> ids, bool add_bos, bool parse_special);

  // The prompt text `ids` stand for, in the same mode; false if some id cannot stand for
  // text (the text up to it is still returned).
  bool decode(std::span<const int32_t> ids, bool add_bos, bool parse_special, std::string& text) const;

  PromptCacheStats stats() const;
  void clear();
  bool enabled() const { return p_.enabled && usable_; }

 private:
  struct Entry;
  struct Match;
  enum class Kind : uint8_t { Text, Special, Barrier };
  Kind kind(int32_t id, bool parse_special) const;
  bool implicit_bos(bool add_bos) const;
  int mode_of(bool add_bos, bool parse_special) const;
  // Special-token occurrences [begin, end) of `text` as the tokenizer splits it.
  void special_spans(std::string_view text, bool parse_special, std::vector<std::pair<size_t, size_t>>& out) const;
  // Appends the text of ids to `text` (and the offset after each id to offs, if given),
  // starting in state after_special; stops at a barrier and returns the ids consumed.
  size_t decode_into(std::span<const int32_t> ids, bool parse_special, bool after_special, std::string& text,
                     std::vector<uint32_t>* offs, std::vector<uint8_t>* nocut = nullptr) const;
  // 3 if ids[i..] are the byte tokens of U+2581 (SentencePiece's space by byte fallback).
  size_t space_mark_len(std::span<const int32_t> ids, size_t i) const;
  // Plain tokenization with its alignment.
  Encoded plain(std::string_view text, bool add_bos, bool parse_special) const;
  std::shared_ptr<const Entry> best_entry(std::string_view text, int mode, Match& m);
  void add_entry(std::shared_ptr<Entry> e);
  void evict_locked();

  const Tokenizer& tok_;
  PromptCacheParams p_;
  bool usable_ = true;
  bool spm_ = false;
  bool dummy_prefix_ = false;  // SentencePiece adds U+2581 at the start of each text fragment
  // Special tokens that encode() produces from their own text, per mode (bit 0: without
  // parse_special, i.e. user-defined ones; bit 1: with it), and their texts by first byte.
  std::vector<uint8_t> special_mode_;
  std::vector<uint8_t> mark_byte_;  // SentencePiece: 1, 2, 3 for the byte tokens of U+2581
  struct SpecialSet {
    std::vector<std::vector<std::string>> by_first;  // [256], longest first
    bool empty = true;
  } specials_[2];

  mutable std::mutex mu_;
  std::list<std::shared_ptr<const Entry>> lru_;  // most recent first
  size_t bytes_ = 0;
  PromptCacheStats st_;
};

}  // namespace larder::server
