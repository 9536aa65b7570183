// Tokenizer tests: llama.cpp vocabulary test files (ggml-vocab-*.gguf + .inp/.out,
// reference ids from each model's own tokenizer), round trips, loaders on real and
// corrupted files, streaming decode, special tokens and speed on long inputs.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "test_util.h"
#include "model/gguf.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using namespace larder;

using larder::testing::shared_dir;
using larder::testing::shared_path;

namespace {


#define REQUIRE_FILE(p)                                                                          \
  do {                                                                                           \
    if (!fs::exists(p)) GTEST_SKIP() << "shared data missing: " << (p) << " (set LARDER_SHARED)"; \
  } while (0)

std::string read_all(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_all(const std::string& p, const std::string& data) {
  std::ofstream f(p, std::ios::binary);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

// Same parsing as llama.cpp's test-tokenizer-0: strings separated by
// "\n__ggml_vocab_test__\n", one line of space-separated ids per string.
struct VocabCase {
  std::string text;
  std::vector<int32_t> ids;
};

std::vector<VocabCase> read_cases(const std::string& inp, const std::string& out) {
  const std::string raw = read_all(inp);
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  size_t pos = 0;
  while (pos < raw.size()) {
    const size_t next = raw.find(sep, pos);
    if (next == std::string::npos) {
      texts.push_back(raw.substr(pos));
      break;
    }
    texts.push_back(raw.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::ifstream fo(out);
  std::vector<VocabCase> cases;
  std::string line;
  size_t i = 0;
  while (std::getline(fo, line) && i < texts.size()) {
    VocabCase c{texts[i++], {}};
    std::istringstream ls(line);
    int32_t id;
    while (ls >> id) c.ids.push_back(id);
    cases.push_back(std::move(c));
  }
  return cases;
}

std::unique_ptr<Tokenizer> load_gguf_tok(const std::string& path) {
  auto g = GgufFile::open(path);
  EXPECT_TRUE(g.ok()) << path << ": " << (g.ok() ? "" : g.error());
  if (!g.ok()) return nullptr;
  auto t = load_tokenizer_gguf(*g.value());
  EXPECT_TRUE(t.ok()) << path << ": " << (t.ok() ? "" : t.error());
  if (!t.ok()) return nullptr;
  return std::move(t).value();
}

std::string ids_str(const std::vector<int32_t>& v) {
  std::string s;
  for (int32_t x : v) s += std::to_string(x) + " ";
  return s;
}

std::string escape(const std::string& s) {
  std::string r;
  for (unsigned char c : s) {
    if (c == '\n') {
      r += "\\n";
    } else if (c == '\t') {
      r += "\\t";
    } else {
      r += static_cast<char>(c);
    }
  }
  return r;
}

const char* kVocabs[] = {"llama-spm", "phi-3", "gpt-2", "deepseek-coder", "deepseek-llm",
                         "falcon", "mpt", "refact", "starcoder"};

// ---------------------------------------------------------------- vocab files

class VocabFile : public ::testing::TestWithParam<const char*> {};

TEST_P(VocabFile, EncodeMatchesReferenceAndRoundTrips) {
  const std::string base = shared_path(std::string("tokenizers/ggml-vocab-") + GetParam() + ".gguf");
  REQUIRE_FILE(base);
  REQUIRE_FILE(base + ".inp");
  REQUIRE_FILE(base + ".out");
  auto tok = load_gguf_tok(base);
  ASSERT_TRUE(tok);
  const auto cases = read_cases(base + ".inp", base + ".out");
  ASSERT_GT(cases.size(), 10u);
  size_t ok = 0, rt_ok = 0;
  for (const auto& c : cases) {
    // test-tokenizer-0 tokenizes with add_special = false, parse_special = false.
    const auto got = tok->encode(c.text, false, false);
    EXPECT_EQ(ids_str(got), ids_str(c.ids)) << GetParam() << " text: '" << escape(c.text) << "'";
    ok += got == c.ids;
    // decode(encode(s)) == s: byte-level BPE is lossless; SentencePiece's decode drops
    // exactly the prefix space that encode added. (No test string holds U+2581, the one
    // character SPM normalisation does not preserve.)
    const std::string back = tok->decode(got);
    EXPECT_EQ(escape(back), escape(c.text)) << GetParam() << " round trip";
    rt_ok += back == c.text;
  }
  std::printf("[ vocab    ] %-15s encode %zu/%zu, round trip %zu/%zu\n", GetParam(), ok, cases.size(), rt_ok,
              cases.size());
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, VocabFile, ::testing::ValuesIn(kVocabs),
                         [](const ::testing::TestParamInfo<const char*>& i) {
                           std::string n = i.param;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

TEST(Tokenizer, EveryVocabTestFileIsCovered) {
  const std::string dir = shared_path("tokenizers");
  REQUIRE_FILE(dir);
  std::set<std::string> known(std::begin(kVocabs), std::end(kVocabs));
  known.insert("bert-bge");  // WordPiece: not implemented here
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("ggml-vocab-", 0) != 0 || e.path().extension() != ".gguf") continue;
    if (!fs::exists(e.path().string() + ".inp") || !fs::exists(e.path().string() + ".out")) continue;
    const std::string v = name.substr(11, name.size() - 11 - 5);
    EXPECT_TRUE(known.count(v)) << "vocabulary test file not covered by VocabFile: " << v;
  }
}

TEST(Tokenizer, UnsupportedGgufModelIsAClearError) {
  const std::string p = shared_path("tokenizers/ggml-vocab-bert-bge.gguf");
  REQUIRE_FILE(p);
  auto g = GgufFile::open(p);
  ASSERT_TRUE(g.ok());
  auto t = load_tokenizer_gguf(*g.value());
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().find("bert"), std::string::npos) << t.error();
}

TEST(Tokenizer, VocabsWithoutTestFilesLoad) {
  for (const char* n : {"baichuan", "gpt-neox"}) {
    const std::string p = shared_path(std::string("tokenizers/ggml-vocab-") + n + ".gguf");
    if (!fs::exists(p)) continue;
    auto tok = load_gguf_tok(p);
    ASSERT_TRUE(tok) << n;
    const std::string s = "Hello world, this is a test \xF0\x9F\xA6\x99 123";
    EXPECT_EQ(tok->decode(tok->encode(s, false)), s) << n;
  }
}

// ---------------------------------------------------------------- llama 2 / stories260K

std::vector<std::string> llama_spm_texts() {
  const std::string base = shared_path("tokenizers/ggml-vocab-llama-spm.gguf");
  std::vector<std::string> texts;
  if (fs::exists(base + ".inp") && fs::exists(base + ".out"))
    for (auto& c : read_cases(base + ".inp", base + ".out")) texts.push_back(c.text);
  texts.push_back("Once upon a time, there was a little girl named Lily.");
  texts.push_back("\t\tcode(x) { return x*2; }\n\n");
  return texts;
}

TEST(Tokenizer, Llama2FormatsAgree) {
  const std::string model = shared_path("models/llama2-tokenizer/tokenizer.model");
  const std::string bin = shared_path("models/llama2-tokenizer/tokenizer.bin");
  const std::string gguf = shared_path("tokenizers/ggml-vocab-llama-spm.gguf");
  REQUIRE_FILE(model);
  REQUIRE_FILE(bin);
  REQUIRE_FILE(gguf);
  auto a = load_tokenizer_spm_model(model);
  ASSERT_TRUE(a.ok()) << a.error();
  auto b = load_tokenizer_llama2c(bin, 32000);
  ASSERT_TRUE(b.ok()) << b.error();
  auto c = load_gguf_tok(gguf);
  ASSERT_TRUE(c);
  auto d = load_tokenizer_any(bin);  // read to end of file
  ASSERT_TRUE(d.ok()) << d.error();
  EXPECT_EQ((*a)->n_vocab(), 32000);
  EXPECT_EQ((*b)->n_vocab(), 32000);
  EXPECT_EQ((*d)->n_vocab(), 32000);
  for (auto* t : {a.value().get(), b.value().get(), d.value().get()}) {
    EXPECT_EQ(t->bos(), 1);
    EXPECT_EQ(t->eos(), 2);
    EXPECT_TRUE(t->vocab().add_bos);
    EXPECT_TRUE(t->vocab().add_space_prefix);
  }
  for (const auto& s : llama_spm_texts()) {
    const auto ref = c->encode(s, true);
    EXPECT_EQ(ids_str((*a)->encode(s, true)), ids_str(ref)) << escape(s);
    EXPECT_EQ(ids_str((*b)->encode(s, true)), ids_str(ref)) << escape(s);
    EXPECT_EQ(ids_str((*d)->encode(s, true)), ids_str(ref)) << escape(s);
  }
  // Known SentencePiece results.
  EXPECT_EQ(ids_str((*a)->encode("Hello world", true)), ids_str({1, 15043, 3186}));
  EXPECT_EQ(ids_str((*a)->encode("", true)), ids_str({1}));
  EXPECT_EQ(ids_str((*a)->encode("", false)), "");
  EXPECT_EQ(ids_str((*a)->encode("   ", false)), ids_str({268}));
  EXPECT_EQ(ids_str((*a)->encode("<s>hi</s>", false)), ids_str({529, 29879, 29958, 2918, 829, 29879, 29958}));
  // The one lossy case of SPM normalisation: U+2581 in the input is the space marker.
  EXPECT_EQ((*a)->decode((*a)->encode("a\xE2\x96\x81" "b", true)), "a b");
  EXPECT_EQ((*a)->decode({1, 15043, 3186, 2}), "Hello world");
  EXPECT_EQ((*a)->decode({1, 15043, 3186, 2}, true), "<s>Hello world</s>");
}

TEST(Tokenizer, Stories260K) {
  const std::string bin = shared_path("models/stories260K/tok512.bin");
  const std::string gguf = shared_path("models/stories260K/stories260K-f32.gguf");
  REQUIRE_FILE(bin);
  auto a = load_tokenizer_llama2c(bin, 512);
  ASSERT_TRUE(a.ok()) << a.error();
  // README: BOS + "Once upon a time" = 1 403 407 261 378.
  EXPECT_EQ(ids_str((*a)->encode("Once upon a time", true)), ids_str({1, 403, 407, 261, 378}));
  EXPECT_EQ((*a)->decode({1, 403, 407, 261, 378}), "Once upon a time");
  if (fs::exists(gguf)) {
    auto b = load_gguf_tok(gguf);
    ASSERT_TRUE(b);
    for (const auto& s : llama_spm_texts())
      EXPECT_EQ(ids_str((*a)->encode(s, true)), ids_str(b->encode(s, true))) << escape(s);
  }
  auto wrong = load_tokenizer_llama2c(bin, 100000);
  EXPECT_FALSE(wrong.ok());
}

// ---------------------------------------------------------------- special tokens

TEST(Tokenizer, SpecialTokens) {
  const std::string spm = shared_path("tokenizers/ggml-vocab-llama-spm.gguf");
  const std::string gpt2 = shared_path("tokenizers/ggml-vocab-gpt-2.gguf");
  REQUIRE_FILE(spm);
  REQUIRE_FILE(gpt2);
  auto s = load_gguf_tok(spm);
  auto g = load_gguf_tok(gpt2);
  ASSERT_TRUE(s && g);
  // SPM: the text after a special token gets the space prefix again (llama.cpp).
  EXPECT_EQ(ids_str(s->encode("<s>Hello</s>", false, true)), ids_str({1, 15043, 2}));
  EXPECT_EQ(ids_str(s->encode("Hello", true, true)), ids_str({1, 15043}));
  EXPECT_NE(s->encode("<s>Hello", false, false).front(), 1);
  // GPT-2 does not add BOS by default; <|endoftext|> only with parse_special.
  EXPECT_FALSE(g->vocab().add_bos);
  EXPECT_EQ(ids_str(g->encode("Hello", true)), ids_str(g->encode("Hello", false)));
  auto with = g->encode("a<|endoftext|>b", false, true);
  ASSERT_EQ(with.size(), 3u);
  EXPECT_EQ(with[1], 50256);
  auto without = g->encode("a<|endoftext|>b", false, false);
  EXPECT_GT(without.size(), 3u);
  EXPECT_EQ(std::count(without.begin(), without.end(), 50256), 0);
  EXPECT_TRUE(g->is_eog(50256));
  EXPECT_EQ(g->decode(with), "ab");
  EXPECT_EQ(g->decode(with, true), "a<|endoftext|>b");
}

// ---------------------------------------------------------------- synthetic vocab

// A small SentencePiece vocabulary with byte fallback, built in memory.
Vocab tiny_spm_vocab() {
  Vocab v;
  v.kind = TokenizerKind::SPM;
  v.tokens = {"<unk>", "<s>", "</s>"};
  v.types = {TokenType::UNKNOWN, TokenType::CONTROL, TokenType::CONTROL};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    v.tokens.push_back(buf);
    v.types.push_back(TokenType::BYTE);
  }
  for (const char* p : {"\xE2\x96\x81", "h", "e", "l", "o", "\xE2\x96\x81h", "ll", "\xE2\x96\x81he", "llo",
                        "\xE2\x96\x81hello", "\xC3\xA9"}) {
    v.tokens.push_back(p);
    v.types.push_back(TokenType::NORMAL);
  }
  v.scores.assign(v.tokens.size(), 0.0f);
  for (size_t i = 259; i < v.tokens.size(); ++i) v.scores[i] = -static_cast<float>(i);
  v.bos = 1;
  v.eos = 2;
  v.unk = 0;
  return v;
}

TEST(Tokenizer, SyntheticSpmMergesAndByteFallback) {
  auto t = make_tokenizer(tiny_spm_vocab());
  ASSERT_TRUE(t.ok()) << t.error();
  const int32_t hello = 259 + 9;
  EXPECT_EQ(ids_str((*t)->encode("hello", true)), ids_str({1, hello}));
  // "x" is not a piece: byte fallback gives <0x78>.
  EXPECT_EQ(ids_str((*t)->encode("x", false)), ids_str({259, 3 + 'x'}));
  EXPECT_EQ((*t)->decode((*t)->encode("hello x\xF0\x9F\x98\x80", true)), "hello x\xF0\x9F\x98\x80");
}

TEST(Tokenizer, SyntheticSpmWithoutBytesUsesOneUnkPerRun) {
  Vocab v;
  v.tokens = {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a"};
  v.types = {TokenType::UNKNOWN, TokenType::CONTROL, TokenType::CONTROL, TokenType::NORMAL, TokenType::NORMAL};
  v.bos = 1;
  v.eos = 2;
  v.unk = 0;
  auto t = make_tokenizer(v);
  ASSERT_TRUE(t.ok()) << t.error();
  EXPECT_EQ(ids_str((*t)->encode("axyza", false)), ids_str({3, 4, 0, 4}));
}

// SentencePiece matches user-defined pieces after escaping ' ' as U+2581, so ' ' and U+2581 are
// one symbol there. Gemma's whitespace-run pieces are written "▁▁" in tokenizer.model but "  " in
// llama.cpp's GGUFs; both must match runs of either character in the text, as SentencePiece's
// encode does, and decode to spaces. Control text (parse_special) still matches literally.
TEST(Tokenizer, SyntheticSpmUserDefinedPiecesTreatSpaceAndU2581Alike) {
  Vocab v = tiny_spm_vocab();
  v.add_space_prefix = false;  // as Gemma
  const int32_t h = 260, e = 261, lo = 259 + 8, sp = 259;
  auto add = [&](const char* text, TokenType t) {
    v.tokens.push_back(text);
    v.types.push_back(t);
    v.scores.push_back(-1000.0f);
    return static_cast<int32_t>(v.tokens.size() - 1);
  };
  const int32_t two = add("  ", TokenType::USER_DEFINED);                             // GGUF spelling
  const int32_t three = add("\xE2\x96\x81\xE2\x96\x81\xE2\x96\x81", TokenType::USER_DEFINED);  // tokenizer.model
  const int32_t pre = add("\xE2\x96\x81<PRE>", TokenType::CONTROL);                   // CodeLlama-style control
  auto t = make_tokenizer(v);
  ASSERT_TRUE(t.ok()) << t.error();
  const Tokenizer& tok = **t;
  const std::string m = "\xE2\x96\x81";
  EXPECT_EQ(ids_str(tok.encode("h  e", false)), ids_str({h, two, e}));
  EXPECT_EQ(ids_str(tok.encode("h" + m + m + "e", false)), ids_str({h, two, e}));
  EXPECT_EQ(ids_str(tok.encode("h " + m + "e", false)), ids_str({h, two, e}));
  EXPECT_EQ(ids_str(tok.encode("h   e", false)), ids_str({h, three, e}));
  EXPECT_EQ(ids_str(tok.encode("h" + m + " " + m + "e", false)), ids_str({h, three, e}));
  // Longest match first: five spaces are three + two; a single one stays an ordinary piece.
  EXPECT_EQ(ids_str(tok.encode("h     e", false)), ids_str({h, three, two, e}));
  EXPECT_EQ(ids_str(tok.encode("h e", false)), ids_str({h, sp, e}));
  EXPECT_EQ(ids_str(tok.encode("llo" + m, false)), ids_str({lo, sp}));
  // Decode: the U+2581-written piece comes back as spaces.
  EXPECT_EQ(tok.decode({h, three, e, two}), "h   e  ");
  // A control piece holding U+2581 matches only its literal text, and only with parse_special.
  EXPECT_EQ(ids_str(tok.encode(m + "<PRE>h", false, true)), ids_str({pre, h}));
  for (const auto& ids : {tok.encode(" <PRE>h", false, true), tok.encode(m + "<PRE>h", false, false)})
    EXPECT_EQ(std::count(ids.begin(), ids.end(), pre), 0) << ids_str(ids);
  // Long runs stay fast (the matcher tries both readings of each U+2581).
  std::string run;
  for (int i = 0; i < 50000; ++i) run += (i % 3 ? " " : m);
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.encode(run, false);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  EXPECT_EQ(ids.size(), 50000u / 3 + 1);  // 16666 x "▁▁▁" then "▁▁" (3 * 16666 + 2 = 50000)
}

// Byte-level BPE: a pre-tokenizer's \s is Unicode White_Space, as in HF tokenizers (Oniguruma)
// and llama.cpp; PCRE2's own \s also takes U+180E MONGOLIAN VOWEL SEPARATOR, which is not
// White_Space. And a byte without a token in the vocabulary's alphabet is dropped before the
// merges (HF's BPE with no unk token), so its neighbours still merge.
TEST(Tokenizer, SyntheticByteLevelWhitespaceAndMissingBytes) {
  // GPT-2's bytes_to_unicode: printable Latin-1 bytes are themselves, the rest U+0100 upwards.
  std::string byte_char[256];
  int next = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const uint32_t cp = printable ? b : 256 + next++;
    std::string u;
    if (cp < 0x80) {
      u += static_cast<char>(cp);
    } else {
      u += static_cast<char>(0xC0 | (cp >> 6));
      u += static_cast<char>(0x80 | (cp & 0x3F));
    }
    byte_char[b] = u;
  }
  Vocab v;
  v.kind = TokenizerKind::BPE;
  v.pre = "gpt2";
  v.add_bos = false;
  for (int b = 0; b < 256; ++b) {
    if (b == 0x04) continue;  // like SmolLM2's vocabulary, which has no token for byte 0x04
    v.tokens.push_back(byte_char[b]);
  }
  auto id_of = [&](const std::string& s) {
    return static_cast<int32_t>(std::find(v.tokens.begin(), v.tokens.end(), s) - v.tokens.begin());
  };
  const std::string G = byte_char[' '];  // "Ġ"
  v.tokens.push_back(G + "'");
  v.tokens.push_back(G + byte_char[0xE1]);  // " " + the first byte of U+180E (and of U+1680)
  v.merges = {G + " '", G + " " + byte_char[0xE1]};
  auto t = make_tokenizer(v);
  ASSERT_TRUE(t.ok()) << t.error();
  const Tokenizer& tok = **t;
  const int32_t sp_quote = id_of(G + "'"), sp_e1 = id_of(G + byte_char[0xE1]), sp = id_of(G);
  const int32_t e1 = id_of(byte_char[0xE1]), a0 = id_of(byte_char[0xA0]), x8e = id_of(byte_char[0x8E]);
  const int32_t x9a = id_of(byte_char[0x9A]), x80 = id_of(byte_char[0x80]), x = id_of("x");
  // " \x04'" -> " '" once 0x04 is gone: one merged token.
  EXPECT_EQ(ids_str(tok.encode(" \x04'", false)), ids_str({sp_quote}));
  EXPECT_EQ(tok.decode(tok.encode("a\x04z", false)), "az");
  // U+180E (E1 A0 8E) is not whitespace: " ?[^\s\p{L}\p{N}]+" takes the space along, and the
  // space merges with its first byte.
  EXPECT_EQ(ids_str(tok.encode(" \xE1\xA0\x8Ex", false)), ids_str({sp_e1, a0, x8e, x}));
  // U+1680 OGHAM SPACE MARK (E1 9A 80) is: "\s+(?!\S)" leaves the space alone, no merge.
  EXPECT_EQ(ids_str(tok.encode(" \xE1\x9A\x80x", false)), ids_str({sp, e1, x9a, x80, x}));
}

TEST(Tokenizer, StreamDecoderHoldsBackSplitUtf8) {
  auto t = make_tokenizer(tiny_spm_vocab());
  ASSERT_TRUE(t.ok());
  const Tokenizer& tok = **t;
  // U+1F999 (llama) = F0 9F A6 99 arrives one byte token at a time.
  const std::vector<int32_t> ids = tok.encode("hello \xF0\x9F\xA6\x99!", true);
  StreamDecoder sd(tok);
  std::string all;
  std::vector<std::string> parts;
  for (int32_t id : ids) {
    parts.push_back(sd.push(id));
    all += parts.back();
  }
  all += sd.flush();
  EXPECT_EQ(all, "hello \xF0\x9F\xA6\x99!");
  // Nothing partial was ever emitted: every part is valid UTF-8 on its own.
  int empties = 0;
  for (const auto& p : parts) {
    empties += p.empty();
    for (size_t i = 0; i < p.size(); ++i) {
      const unsigned char c = p[i];
      if (c >= 0xF0) {
        ASSERT_LE(i + 4, p.size());
      }
    }
  }
  EXPECT_GE(empties, 3 + 1);  // BOS + three held-back bytes

  // An incomplete sequence at the end is flushed as U+FFFD; stray bytes too.
  StreamDecoder sd2(tok);
  EXPECT_EQ(sd2.push(3 + 0xF0), "");
  EXPECT_EQ(sd2.push(3 + 0x9F), "");
  EXPECT_EQ(sd2.flush(), "\xEF\xBF\xBD");  // one U+FFFD per maximal subpart
  StreamDecoder sd2b(tok);
  EXPECT_EQ(sd2b.push(3 + 0xE0), "");
  EXPECT_EQ(sd2b.push(3 + 0x80), "\xEF\xBF\xBD\xEF\xBF\xBD");  // E0 80 can never complete
  StreamDecoder sd3(tok);
  EXPECT_EQ(sd3.push(3 + 0x80), "\xEF\xBF\xBD");
  EXPECT_EQ(sd3.push(3 + 'a'), "a");
  // A broken sequence followed by ASCII: the ASCII is not swallowed.
  StreamDecoder sd4(tok);
  EXPECT_EQ(sd4.push(3 + 0xE2), "");
  EXPECT_EQ(sd4.push(3 + 'a'), "\xEF\xBF\xBD" "a");
  EXPECT_EQ(sd4.flush(), "");
  // First-space stripping like decode(); can be turned off.
  StreamDecoder sd5(tok, false);
  EXPECT_EQ(sd5.push(259 + 9), " hello");
  StreamDecoder sd6(tok);
  EXPECT_EQ(sd6.push(1), "");
  EXPECT_EQ(sd6.push(259 + 9), "hello");
  EXPECT_EQ(sd6.push(259 + 9), " hello");
}

TEST(Tokenizer, StreamDecoderOnRealVocab) {
  const std::string p = shared_path("tokenizers/ggml-vocab-llama-spm.gguf");
  REQUIRE_FILE(p);
  auto tok = load_gguf_tok(p);
  ASSERT_TRUE(tok);
  const std::string s = " this is \xF0\x9F\xA6\x99.cpp and \xE4\xBD\xA0\xE5\xA5\xBD";
  const auto ids = tok->encode(s, true);
  StreamDecoder sd(*tok);
  std::string all;
  for (int32_t id : ids) all += sd.push(id);
  all += sd.flush();
  EXPECT_EQ(all, tok->decode(ids));
  EXPECT_EQ(all, s);
}

TEST(Tokenizer, BadIdsNeverCrash) {
  auto t = make_tokenizer(tiny_spm_vocab());
  ASSERT_TRUE(t.ok());
  const Tokenizer& tok = **t;
  for (int32_t id : {-1, -100, tok.n_vocab(), tok.n_vocab() + 1, INT32_MAX, INT32_MIN}) {
    EXPECT_EQ(tok.token_bytes(id), "");
    EXPECT_EQ(tok.token_bytes(id, true), "");
    EXPECT_FALSE(tok.is_eog(id));
  }
  EXPECT_EQ(tok.decode({-5, 259 + 9, 1 << 30}), "hello");
  StreamDecoder sd(tok);
  EXPECT_EQ(sd.push(-1), "");
  EXPECT_EQ(sd.push(1 << 30), "");
  EXPECT_EQ(sd.flush(), "");
}

TEST(Tokenizer, MakeTokenizerValidates) {
  Vocab empty;
  EXPECT_FALSE(make_tokenizer(empty).ok());
  Vocab v = tiny_spm_vocab();
  v.scores.resize(3);
  EXPECT_FALSE(make_tokenizer(v).ok());
  v = tiny_spm_vocab();
  v.bos = 100000;
  EXPECT_FALSE(make_tokenizer(v).ok());
  Vocab b;
  b.kind = TokenizerKind::BPE;
  b.tokens = {"a", "b", "ab"};
  b.merges = {"a b", "garbage", "x y"};
  b.add_bos = false;
  auto t = make_tokenizer(b);
  ASSERT_TRUE(t.ok()) << t.error();
  EXPECT_EQ(ids_str((*t)->encode("abba", true)), ids_str({2, 1, 0}));
}

// Every byte of malformed UTF-8 survives where the vocabulary can represent it: SPM via
// byte fallback, GPT-2 via its complete byte alphabet. (Other byte-level vocabularies lack
// some bytes, e.g. falcon has no token for 0x03 or 0xF5..0xFF, and deepseek maps bytes such as
// 0xFF to user-defined tokens whose text is the character U+00FF; those bytes cannot round-trip.)
TEST(Tokenizer, InvalidUtf8Input) {
  for (const char* n : {"llama-spm", "gpt-2"}) {
    const std::string p = shared_path(std::string("tokenizers/ggml-vocab-") + n + ".gguf");
    if (!fs::exists(p)) GTEST_SKIP() << "shared data missing: " << p;
    auto tok = load_gguf_tok(p);
    ASSERT_TRUE(tok);
    const std::string s = "ab\xFF\xC3 c\xE2\x82 \xF0\x9F\x98\x80\x80\xC0\xAF end\xE4";
    const auto ids = tok->encode(s, false);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok->decode(ids), s) << n;  // every byte survives (byte fallback / byte-level)
  }
}

// ---------------------------------------------------------------- corrupted files

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("larder_tok_" + std::to_string(rd()) + std::to_string(::getpid()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& n) const { return (path_ / n).string(); }

 private:
  fs::path path_;
};

TEST(Tokenizer, TruncatedTokenizerBin) {
  const std::string bin = shared_path("models/stories260K/tok512.bin");
  REQUIRE_FILE(bin);
  const std::string data = read_all(bin);
  TempDir td;
  const std::string p = td.file("tokenizer.bin");
  for (size_t cut : {size_t(0), size_t(2), size_t(4), size_t(9), size_t(20), data.size() / 2, data.size() - 1}) {
    write_all(p, data.substr(0, cut));
    auto t = load_tokenizer_llama2c(p, 512);
    EXPECT_FALSE(t.ok()) << "cut at " << cut;
    if (!t.ok()) {
      EXPECT_FALSE(t.error().empty());
    }
  }
  // Read-to-EOF mode: a cut between records gives fewer tokens, a cut inside one an error.
  std::map<size_t, int> boundary;  // offset -> tokens before it
  for (size_t off = 4, k = 0; off + 8 <= data.size(); ++k) {
    int32_t len;
    std::memcpy(&len, data.data() + off + 4, 4);
    off += 8 + static_cast<size_t>(len);
    boundary[off] = static_cast<int>(k + 1);
  }
  ASSERT_EQ(boundary.rbegin()->first, data.size());
  std::vector<size_t> cuts;
  for (size_t cut = 5; cut < data.size(); cut += 37) cuts.push_back(cut);
  for (const auto& [off, k] : boundary)
    if (k % 50 == 3 && off < data.size()) cuts.push_back(off);
  for (size_t cut : cuts) {
    write_all(p, data.substr(0, cut));
    auto t = load_tokenizer_llama2c(p, 0);
    auto it = boundary.find(cut);
    if (it != boundary.end() && it->second >= 3) {
      ASSERT_TRUE(t.ok()) << "cut at record boundary " << cut << ": " << t.error();
      EXPECT_EQ((*t)->n_vocab(), it->second);
    } else {
      EXPECT_FALSE(t.ok()) << "cut inside a record at " << cut;
    }
  }
  // Huge length field.
  std::string bad = data;
  const int32_t huge = 0x7FFFFFF0;
  std::memcpy(bad.data() + 8, &huge, 4);
  write_all(p, bad);
  EXPECT_FALSE(load_tokenizer_llama2c(p, 0).ok());
  EXPECT_FALSE(load_tokenizer_llama2c(p, 512).ok());
  // Absurd max_token_length and negative length.
  bad = data;
  const int32_t neg = -5;
  std::memcpy(bad.data() + 8, &neg, 4);
  write_all(p, bad);
  EXPECT_FALSE(load_tokenizer_llama2c(p, 0).ok());
  EXPECT_FALSE(load_tokenizer_llama2c(td.file("missing.bin"), 0).ok());
  // Random corruption: errors or a usable tokenizer, never a crash.
  std::mt19937 rng(1234);
  for (int k = 0; k < 200; ++k) {
    bad = data;
    for (int f = 0; f < 4; ++f) bad[rng() % bad.size()] = static_cast<char>(rng());
    write_all(p, bad);
    auto t = load_tokenizer_llama2c(p, 0);
    if (t.ok()) (void)(*t)->decode((*t)->encode("Once upon a time \xF0\x9F\x98\x80", true));
  }
}

TEST(Tokenizer, TruncatedTokenizerModel) {
  const std::string model = shared_path("models/llama2-tokenizer/tokenizer.model");
  REQUIRE_FILE(model);
  const std::string data = read_all(model);
  TempDir td;
  const std::string p = td.file("tokenizer.model");
  for (size_t cut : {size_t(0), size_t(1), size_t(2), size_t(7), size_t(1000), data.size() / 2, data.size() - 1}) {
    write_all(p, data.substr(0, cut));
    auto t = load_tokenizer_spm_model(p);
    EXPECT_FALSE(t.ok()) << "cut at " << cut;
    auto any = load_tokenizer_any(p);
    EXPECT_FALSE(any.ok()) << "cut at " << cut;
  }
  std::mt19937 rng(99);
  for (int k = 0; k < 100; ++k) {
    std::string bad = data;
    for (int f = 0; f < 8; ++f) bad[rng() % bad.size()] = static_cast<char>(rng());
    write_all(p, bad);
    auto t = load_tokenizer_spm_model(p);
    if (t.ok()) (void)(*t)->decode((*t)->encode("Hello world \xE4\xBD\xA0", true));
  }
}

TEST(Tokenizer, CorruptGgufVocab) {
  TempDir td;
  auto try_write = [&](GgufWriter& w) {
    const std::string p = td.file("v.gguf");
    EXPECT_TRUE(w.write(p).ok());
    auto g = GgufFile::open(p);
    EXPECT_TRUE(g.ok());
    return load_tokenizer_gguf(*g.value());
  };
  {
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "llama");
    EXPECT_FALSE(try_write(w).ok());
  }
  {
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "llama");
    w.set_arr_str("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
    w.set_arr_f32("tokenizer.ggml.scores", {0, 0});
    auto r = try_write(w);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().find("scores"), std::string::npos) << r.error();
  }
  {
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "gpt2");
    w.set_arr_str("tokenizer.ggml.tokens", {"a", "b"});
    auto r = try_write(w);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().find("merges"), std::string::npos) << r.error();
  }
  {
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "t5");
    w.set_arr_str("tokenizer.ggml.tokens", {"a", "b"});
    auto r = try_write(w);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().find("t5"), std::string::npos) << r.error();
  }
  {
    // Minimal valid SPM vocabulary with an out-of-range BOS id: falls back to the default.
    GgufWriter w;
    w.set_str("tokenizer.ggml.model", "llama");
    w.set_arr_str("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xE2\x96\x81" "a", "a"});
    w.set_arr_i32("tokenizer.ggml.token_type", {2, 3, 3, 1, 1});
    w.set_u32("tokenizer.ggml.bos_token_id", 4294967295u);
    w.set_u32("tokenizer.ggml.eos_token_id", 77);
    auto r = try_write(w);
    ASSERT_TRUE(r.ok()) << r.error();
    EXPECT_EQ((*r)->bos(), -1);
    EXPECT_EQ((*r)->eos(), 2);
    EXPECT_EQ(ids_str((*r)->encode("a", true)), ids_str({3}));
  }
}

// ---------------------------------------------------------------- HF tokenizer.json

TEST(Tokenizer, HfJsonByteLevelMatchesGguf) {
  const std::string base = shared_path("tokenizers/ggml-vocab-gpt-2.gguf");
  REQUIRE_FILE(base);
  auto g = GgufFile::open(base);
  ASSERT_TRUE(g.ok());
  const auto* toks = g.value()->get_str_array("tokenizer.ggml.tokens");
  const auto* merges = g.value()->get_str_array("tokenizer.ggml.merges");
  ASSERT_TRUE(toks && merges);
  nlohmann::json j;
  j["model"] = {{"type", "BPE"}, {"vocab", nlohmann::json::object()}, {"merges", nlohmann::json::array()}};
  for (size_t i = 0; i < toks->size(); ++i)
    if ((*toks)[i] != "<|endoftext|>") j["model"]["vocab"][(*toks)[i]] = i;
  for (size_t i = 0; i < merges->size(); ++i) {
    // Mix both merge encodings ("a b" and ["a", "b"]).
    const std::string& m = (*merges)[i];
    if (i % 2) {
      j["model"]["merges"].push_back(m);
    } else {
      const size_t sp = m.find(' ', 1);
      j["model"]["merges"].push_back({m.substr(0, sp), m.substr(sp + 1)});
    }
  }
  j["added_tokens"] = {{{"id", 50256}, {"content", "<|endoftext|>"}, {"special", true}}};
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}};
  TempDir td;
  write_all(td.file("tokenizer.json"), j.dump());
  auto h = load_tokenizer_any(td.file(""));  // directory holding tokenizer.json
  ASSERT_TRUE(h.ok()) << h.error();
  EXPECT_EQ((*h)->vocab().kind, TokenizerKind::BPE);
  EXPECT_EQ((*h)->vocab().pre, "gpt-2");
  EXPECT_EQ((*h)->eos(), 50256);
  for (const auto& c : read_cases(base + ".inp", base + ".out"))
    EXPECT_EQ(ids_str((*h)->encode(c.text, false)), ids_str(c.ids)) << escape(c.text);
  // A Llama-3 style Split regex is recognised.
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex",
            R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"}},
        {{"type", "ByteLevel"}, {"use_regex", false}}}}};
  write_all(td.file("tokenizer.json"), j.dump());
  write_all(td.file("tokenizer_config.json"), R"({"bos_token": "<|endoftext|>", "add_bos_token": true})");
  auto h3 = load_tokenizer_hf_json(td.file("tokenizer.json"));
  ASSERT_TRUE(h3.ok()) << h3.error();
  EXPECT_EQ((*h3)->vocab().pre, "llama-bpe");
  EXPECT_EQ((*h3)->bos(), 50256);
  EXPECT_EQ((*h3)->encode("hi", true).front(), 50256);
}

// Builds merges from SentencePiece pieces the way HF's converter does: every split of a
// piece into two pieces, ordered by the merged piece's score.
TEST(Tokenizer, HfJsonSentencePieceStyleMatchesReference) {
  const std::string base = shared_path("tokenizers/ggml-vocab-llama-spm.gguf");
  REQUIRE_FILE(base);
  auto ref = load_gguf_tok(base);
  ASSERT_TRUE(ref);
  const Vocab& v = ref->vocab();
  std::unordered_map<std::string, int32_t> ids;
  for (size_t i = 0; i < v.tokens.size(); ++i) ids.emplace(v.tokens[i], static_cast<int32_t>(i));
  struct M {
    float score;
    int32_t l, r;
    std::string text;
  };
  std::vector<M> ms;
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    if (v.types[i] != TokenType::NORMAL) continue;
    const std::string& t = v.tokens[i];
    for (size_t k = 1; k < t.size(); ++k) {
      auto a = ids.find(t.substr(0, k)), b = ids.find(t.substr(k));
      if (a != ids.end() && b != ids.end() && v.types[a->second] == TokenType::NORMAL &&
          v.types[b->second] == TokenType::NORMAL)
        ms.push_back({v.scores[i], a->second, b->second, t.substr(0, k) + " " + t.substr(k)});
    }
  }
  std::stable_sort(ms.begin(), ms.end(), [](const M& x, const M& y) {
    if (x.score != y.score) return x.score > y.score;
    return std::make_pair(x.l, x.r) < std::make_pair(y.l, y.r);
  });
  nlohmann::json j;
  j["model"] = {{"type", "BPE"},
                {"unk_token", "<unk>"},
                {"byte_fallback", true},
                {"vocab", nlohmann::json::object()},
                {"merges", nlohmann::json::array()}};
  for (size_t i = 0; i < v.tokens.size(); ++i) j["model"]["vocab"][v.tokens[i]] = i;
  for (const auto& m : ms) j["model"]["merges"].push_back(m.text);
  j["added_tokens"] = {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                       {{"id", 1}, {"content", "<s>"}, {"special", true}},
                       {{"id", 2}, {"content", "</s>"}, {"special", true}}};
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers",
                      {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}};
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                     {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}}};
  TempDir td;
  write_all(td.file("tokenizer.json"), j.dump());
  auto h = load_tokenizer_hf_json(td.file("tokenizer.json"));
  ASSERT_TRUE(h.ok()) << h.error();
  EXPECT_EQ((*h)->vocab().kind, TokenizerKind::SPM);
  EXPECT_TRUE((*h)->vocab().add_space_prefix);
  EXPECT_EQ((*h)->bos(), 1);
  EXPECT_EQ((*h)->eos(), 2);
  EXPECT_EQ((*h)->vocab().unk, 0);
  for (const auto& c : read_cases(base + ".inp", base + ".out"))
    EXPECT_EQ(ids_str((*h)->encode(c.text, false)), ids_str(c.ids)) << escape(c.text);
  EXPECT_EQ((*h)->encode("Hello", true).front(), 1);
}

TEST(Tokenizer, HfJsonErrors) {
  TempDir td;
  const std::string p = td.file("tokenizer.json");
  for (const char* bad : {"", "{", "[]", "{\"model\": 3}", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}",
                          "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -4}}, \"decoder\": {\"type\": \"ByteLevel\"}}",
                          "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 99999999999}}, \"decoder\": {\"type\": \"ByteLevel\"}}",
                          "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [7]}, \"decoder\": {\"type\": \"ByteLevel\"}}",
                          "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 900000}}, \"decoder\": {\"type\": \"ByteLevel\"}}",
                          "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}}"}) {
    write_all(p, bad);
    auto t = load_tokenizer_hf_json(p);
    EXPECT_FALSE(t.ok()) << bad;
  }
  EXPECT_FALSE(load_tokenizer_any(td.file("nothing-here")).ok());
  fs::remove(p);
  EXPECT_FALSE(load_tokenizer_any(td.file("")).ok());  // directory without any tokenizer file
}

// ---------------------------------------------------------------- speed / threads

std::string long_text(size_t n, uint32_t seed) {
  static const char* parts[] = {"Hello", " world", ",", " ", "  ", "\n", "\t", "123", "45678", "\xC3\xA9t\xC3\xA9",
                                "\xE4\xBD\xA0\xE5\xA5\xBD", "\xF0\x9F\xA6\x99", "'s", " don't", "!!", "...",
                                "\xD0\xBD\xD0\xB5\xD1\x89\xD0\xBE", "x = y + 1;", "    "};
  std::mt19937 rng(seed);
  std::string s;
  while (s.size() < n) s += parts[rng() % (sizeof parts / sizeof parts[0])];
  return s;
}

TEST(Tokenizer, LongInputsAreFast) {
  std::vector<std::string> inputs = {long_text(100000, 1), std::string(100000, ' '), std::string(100000, 'a'),
                                     std::string(100000, '\n'), std::string(50000, '1') + std::string(50000, ' ') + "x"};
  std::string emoji;
  while (emoji.size() < 100000) emoji += "\xF0\x9F\x98\x80";
  inputs.push_back(emoji);
  int tested = 0;
  for (const char* n : kVocabs) {
    const std::string p = shared_path(std::string("tokenizers/ggml-vocab-") + n + ".gguf");
    if (!fs::exists(p)) continue;
    auto tok = load_gguf_tok(p);
    ASSERT_TRUE(tok);
    for (size_t k = 0; k < inputs.size(); ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto ids = tok->encode(inputs[k], false);
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_LT(sec, 1.0 * larder::testing::kSanitizerSlowdown) << n << " input " << k;
      EXPECT_EQ(tok->decode(ids), inputs[k]) << n << " input " << k;
      ++tested;
    }
  }
  if (!tested) GTEST_SKIP() << "shared data missing: " << shared_path("tokenizers");
}

TEST(Tokenizer, ConcurrentEncode) {
  const std::string p = shared_path("tokenizers/ggml-vocab-deepseek-llm.gguf");
  REQUIRE_FILE(p);
  auto tok = load_gguf_tok(p);
  ASSERT_TRUE(tok);
  const std::string s = long_text(20000, 7);
  const auto ref = tok->encode(s, false);
  std::vector<std::thread> th;
  std::vector<int> ok(4, 0);
  for (int i = 0; i < 4; ++i)
    th.emplace_back([&, i] {
      for (int k = 0; k < 5; ++k) ok[i] += tok->encode(s, false) == ref;
    });
  for (auto& t : th) t.join();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ok[i], 5);
}

}  // namespace
