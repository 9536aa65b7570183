// Pre-tokenizer regexes for byte-level BPE, by GGUF tokenizer.ggml.pre name.
// The lists follow the Hugging Face tokenizer.json pre_tokenizers of each model
// family (as also used by llama.cpp); regexes run in sequence and every regex
// splits each piece of the previous step into matches and the gaps between them.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>

#include "tokenizer/tokenizer_internal.h"

namespace larder::tok {
namespace {

// GPT-2 / RoBERTa / GPT-NeoX ByteLevel regex.
constexpr const char* kGpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// DeepSeek LLM: explicit Latin/Greek/Cyrillic... letter ranges, ASCII+fullwidth punctuation, CJK.
constexpr const char* kDeepseekLetters = "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";
constexpr const char* kDeepseekPunct = "\\s?[!-/:-~！-／：-～‘-‟　-。]+";
constexpr const char* kDeepseekCjk = "[一-龥ࠀ-一가-퟿]+";
constexpr const char* kDeepseekV3 =
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
constexpr const char* kBloom = R"( ?[^(\s|.,!?…。，、।۔،)]+)";
constexpr const char* kTekken =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

bool is_one_of(const std::string& s, std::initializer_list<const char*> names) {
  return std::any_of(names.begin(), names.end(), [&](const char* n) { return s == n; });
}

}  // namespace

std::vector<std::string> pre_regexes(const std::string& pre, bool* known, bool* ignore_merges) {
  if (known) *known = true;
  if (ignore_merges) *ignore_merges = false;
  if (is_one_of(pre, {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "chatglm-bpe"})) {
    // Llama 3's tokenizer.json sets ignore_merges: whole-word vocabulary hits win.
    if (ignore_merges) *ignore_merges = !is_one_of(pre, {"dbrx", "smaug-bpe", "chatglm-bpe"});
    return {kLlama3};
  }
  if (is_one_of(pre, {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"})) return {kQwen2};
  if (pre == "deepseek-llm") return {"[\r\n]", kDeepseekLetters, kDeepseekPunct, "\\s+$", kDeepseekCjk, "\\p{N}"};
  if (pre == "deepseek-v3") return {"\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", kDeepseekV3};
  if (pre == "deepseek-coder")
    return {"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", kDeepseekCjk, "\\p{N}"};
  // Falcon: Punctuation (contiguous), ByteLevel, Digits, Split of 3-digit groups.
  if (pre == "falcon") return {"[\\p{P}\\$\\+<=>\\^~\\|`]+", kGpt2, "[0-9][0-9][0-9]"};
  if (is_one_of(pre, {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"}))
    return {"\\p{N}", kGpt2};
  if (is_one_of(pre, {"poro-chat", "bloom", "gpt3-finnish"})) return {kBloom};
  if (pre == "viking") return {kBloom, "\\p{N}"};
  if (pre == "tekken") {
    if (ignore_merges) *ignore_merges = true;
    return {kTekken};
  }
  if (!is_one_of(pre, {"gpt-2", "gpt2", "default", "", "mpt", "gpt-neox", "olmo", "jais", "phi-2", "roberta-bpe",
                       "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "gigachat"})) {
    if (known) *known = false;
  }
  return {kGpt2};
}

namespace {

// PCRE2 (10.42) counts U+180E MONGOLIAN VOWEL SEPARATOR as \s in UCP mode (through \h); the
// Hugging Face tokenizers (Oniguruma) and llama.cpp use the Unicode White_Space property, which
// lacks it since Unicode 6.3. \s and \S are therefore spelled out as that property.
constexpr const char* kWhiteSpace = "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

std::string spell_out_whitespace(const std::string& re) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < re.size(); ++i) {
    const char c = re[i];
    if (c == '\\' && i + 1 < re.size()) {
      const char e = re[++i];
      if (e == 's') {
        out += in_class ? std::string(kWhiteSpace) : "[" + std::string(kWhiteSpace) + "]";
      } else if (e == 'S' && !in_class) {
        out += "[^" + std::string(kWhiteSpace) + "]";
      } else {
        out += c;  // other escapes (and \S inside a class, which has no spelling) stay
        out += e;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      if (i + 1 < re.size() && re[i + 1] == '^') out += re[++i];
      if (i + 1 < re.size() && re[i + 1] == ']') out += re[++i];  // a leading ']' is a literal
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

}  // namespace

Pretokenizer::~Pretokenizer() {
  for (void* c : codes_) pcre2_code_free(static_cast<pcre2_code*>(c));
}

Status Pretokenizer::init(const std::string& pre) {
  for (const std::string& list_re : pre_regexes(pre, nullptr, &ignore_merges_)) {
    const std::string re = spell_out_whitespace(list_re);
    int err = 0;
    PCRE2_SIZE erroff = 0;
    // MATCH_INVALID_UTF: malformed input bytes never match and end up in gap pieces.
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(re.data()), re.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &erroff, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      return make_error("tokenizer: cannot compile pre-tokenizer regex for '%s' at offset %zu: %s", pre.c_str(),
                        static_cast<size_t>(erroff), reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // best effort; falls back to the interpreter
    codes_.push_back(code);
  }
  return Status::Ok();
}

void Pretokenizer::split(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  if (text.empty()) return;
  std::vector<std::pair<size_t, size_t>> cur{{0, text.size()}}, next;
  auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  for (void* cv : codes_) {
    auto* code = static_cast<pcre2_code*>(cv);
    // Per-call match data keeps encode() thread-safe.
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
    next.clear();
    for (const auto& [off, len] : cur) {
      // Each piece is its own subject, so lookarounds and $ stop at the piece edge.
      const PCRE2_SPTR p = subject + off;
      size_t start = 0, gap = 0;
      while (start < len) {
        int rc = pcre2_match(code, p, len, start, 0, md, nullptr);
        // JIT stack exhaustion on a huge piece: retry with the (heap-based) interpreter.
        if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) rc = pcre2_match(code, p, len, start, PCRE2_NO_JIT, md, nullptr);
        if (rc < 0) break;
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        const size_t ms = ov[0], me = ov[1];
        if (me <= ms) {  // empty match: step over one character
          start = ms + utf8_len(p[ms]);
          continue;
        }
        if (ms > gap) next.emplace_back(off + gap, ms - gap);
        next.emplace_back(off + ms, me - ms);
        gap = start = me;
      }
      if (len > gap) next.emplace_back(off + gap, len - gap);
    }
    pcre2_match_data_free(md);
    cur.swap(next);
  }
  out.swap(cur);
}

}  // namespace larder::tok
