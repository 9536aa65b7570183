// Private helpers shared by the tokenizer implementation files.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace larder::tok {

// ---- UTF-8 -----------------------------------------------------------------

// Length of the UTF-8 sequence a lead byte announces (1 for invalid lead bytes,
// so that malformed input still advances).
inline size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}
std::string utf8_encode(uint32_t cp);
// Decodes one code point at s[i] (advances i); returns UINT32_MAX for malformed input
// (advancing by one byte).
uint32_t utf8_decode(std::string_view s, size_t& i);
// Number of bytes at the end of s that form an incomplete-but-so-far-valid sequence.
size_t utf8_incomplete_tail(std::string_view s);
// Replaces malformed sequences by U+FFFD.
std::string utf8_sanitize(std::string_view s);

inline constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581

// ---- special-token partition -----------------------------------------------

// A piece of input: either raw text [off, off+len) or a token id.
struct Fragment {
  size_t off = 0, len = 0;
  int32_t id = -1;  // >= 0: a special token
};

// Leftmost-longest matcher over the text of CONTROL / USER_DEFINED / UNKNOWN tokens.
// USER_DEFINED tokens always match (like llama.cpp and HF added tokens);
// CONTROL and UNKNOWN only when parse_special.
// SPM vocabularies: SentencePiece matches user-defined pieces after turning ' ' into U+2581,
// so there a user-defined piece matches with ' ' and U+2581 interchangeable, in the piece
// (tokenizer.model writes Gemma's whitespace runs as U+2581, llama.cpp's GGUFs as ' ') and in
// the text alike. CONTROL and UNKNOWN text always matches literally.
class SpecialMatcher {
 public:
  void build(const Vocab& v);
  std::vector<Fragment> split(std::string_view text, bool parse_special) const;
  bool empty() const { return nodes_.size() <= 1; }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;  // sorted by byte
    int32_t id = -1;
    bool always = false;  // USER_DEFINED
  };
  int32_t child(int32_t n, unsigned char c) const;
  int32_t insert(std::string_view key);
  // Longest match starting at text[i]: its length (0 if none) and id.
  size_t match_at(std::string_view text, size_t i, bool parse_special, int32_t& id) const;
  std::vector<Node> nodes_;
  bool spm_spaces_ = false;
};

// ---- byte-level BPE unicode map ----------------------------------------------

struct ByteUnicode {
  std::string byte_to_utf8[256];
  // code point -> byte, for code points < 512 (all mapped ones are); -1 if unmapped
  int16_t cp_to_byte[512];
  ByteUnicode();
};
const ByteUnicode& byte_unicode();

// ---- pre-tokenizer ---------------------------------------------------------

class Pretokenizer {
 public:
  Pretokenizer() = default;
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;
  // Compiles the regex list for a pre-tokenizer name (unknown names use gpt-2's).
  Status init(const std::string& pre);
  // Splits text into pieces (byte ranges). Each regex splits every piece of the
  // previous step into matches and the gaps between them.
  void split(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;
  bool ignore_merges() const { return ignore_merges_; }

 private:
  std::vector<void*> codes_;  // pcre2_code_8*
  bool ignore_merges_ = false;
};
// The regex list used for a pre-tokenizer name; *known = false when it fell back to gpt-2.
std::vector<std::string> pre_regexes(const std::string& pre, bool* known = nullptr, bool* ignore_merges = nullptr);

// ---- constructors ------------------------------------------------------------

struct SpmOptions {
  bool remove_extra_whitespaces = false;  // SentencePiece normalizer option
};
Result<std::unique_ptr<Tokenizer>> make_spm(Vocab v, SpmOptions opt);
Result<std::unique_ptr<Tokenizer>> make_bpe(Vocab v);
// Checks sizes/ids and fills defaults; shared by make_tokenizer and loaders.
Status normalize_vocab(Vocab& v);

// Piece bytes as the decoder should emit them (no special rendering).
std::string spm_piece_bytes(const std::string& text, TokenType t);

// "<0xNN>" with two hex digits -> NN (0..255); anything else -> -1.
int parse_byte_piece(const std::string& s);

}  // namespace larder::tok
