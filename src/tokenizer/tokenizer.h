// Tokenizers: SentencePiece-style BPE (scores, byte fallback) and byte-level BPE
// (merges + pre-tokenizer regex), loaded from GGUF, llama2.c tokenizer.bin,
// SentencePiece tokenizer.model and HF tokenizer.json.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.h"

namespace larder {

class GgufFile;

enum class TokenizerKind { SPM, BPE };

// Token attribute, GGUF `tokenizer.ggml.token_type` values.
enum class TokenType : int32_t {
  UNDEFINED = 0, NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6,
};

struct Vocab {
  TokenizerKind kind = TokenizerKind::SPM;
  std::string pre = "default";           // byte-level BPE pre-tokenizer name (gpt-2, llama-bpe, qwen2, ...)
  std::vector<std::string> tokens;       // [n_vocab] piece text (SPM uses U+2581 for space)
  std::vector<float> scores;             // [n_vocab] SPM merge priorities (empty for BPE)
  std::vector<TokenType> types;          // [n_vocab]
  std::vector<std::string> merges;       // BPE merges "a b", highest priority first
  int32_t bos = -1, eos = -1, unk = -1, pad = -1, eot = -1;
  bool add_bos = true;
  bool add_eos = false;
  bool add_space_prefix = true;          // SPM: prepend U+2581 to the text
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  const Vocab& vocab() const { return vocab_; }
  int32_t n_vocab() const { return static_cast<int32_t>(vocab_.tokens.size()); }
  int32_t bos() const { return vocab_.bos; }
  int32_t eos() const { return vocab_.eos; }
  // True for tokens that end generation (EOS, EOT).
  bool is_eog(int32_t id) const { return id >= 0 && (id == vocab_.eos || id == vocab_.eot); }

  // add_bos: prepend BOS if the vocabulary wants one (vocab.add_bos) and has one.
  // parse_special: recognise control/user-defined token text (e.g. "<|eot_id|>") in the input.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special = false) const = 0;

  // Raw bytes a token stands for (byte tokens become their byte; SPM U+2581 becomes ' ';
  // byte-level BPE unicode mapping undone). Control tokens give "" unless render_special.
  std::string token_bytes(int32_t id, bool render_special = false) const;

  // Whole-sequence decode. For SPM, the leading space added by the space prefix is removed
  // when the first token is after BOS/at the start (like SentencePiece's decode).
  std::string decode(const std::vector<int32_t>& ids, bool render_special = false) const;

 protected:
  Vocab vocab_;
  std::vector<std::string> bytes_;  // [n_vocab] decoded bytes of each token, filled by the subclass
};

// Streams token bytes as valid UTF-8: holds back an incomplete multi-byte sequence
// until the token that completes it arrives.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool strip_first_space = true)
      : tok_(tok), strip_first_space_(strip_first_space) {}
  // Returns the text that is complete after this token (possibly empty).
  std::string push(int32_t id);
  // Returns whatever is still held back (invalid bytes replaced by U+FFFD).
  std::string flush();

 private:
  const Tokenizer& tok_;
  std::string pending_;
  bool strip_first_space_;
  bool first_ = true;
};

Result<std::unique_ptr<Tokenizer>> make_tokenizer(Vocab vocab);
Result<std::unique_ptr<Tokenizer>> load_tokenizer_gguf(const GgufFile& gguf);
// llama2.c tokenizer.bin: int32 max_token_length, then per token: f32 score, i32 len, bytes.
Result<std::unique_ptr<Tokenizer>> load_tokenizer_llama2c(const std::string& path, int32_t n_vocab);
// SentencePiece ModelProto (tokenizer.model), parsed without the protobuf library.
Result<std::unique_ptr<Tokenizer>> load_tokenizer_spm_model(const std::string& path);
// Hugging Face tokenizer.json (+ optional tokenizer_config.json beside it for BOS/EOS flags).
Result<std::unique_ptr<Tokenizer>> load_tokenizer_hf_json(const std::string& path);

}  // namespace larder

namespace larder {
// Picks the loader from the path: *.gguf, tokenizer.model, *.json, a directory holding
// tokenizer.json or tokenizer.model, or a llama2.c tokenizer.bin (read to end of file).
Result<std::unique_ptr<Tokenizer>> load_tokenizer_any(const std::string& path);
}  // namespace larder
