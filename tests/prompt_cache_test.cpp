// PromptCache (src/server/prompt_cache.h): token-level reuse of finished requests'
// prompt + generated ids. The invariant everywhere: the ids encode() returns decode to
// exactly the new text, with special tokens where the tokenizer's own split puts them,
// and equal tok.encode() when nothing is reused. Real tokenizers from the shared data
// (Llama 2 SentencePiece, Phi-3 SentencePiece with special tokens, GPT-2 and DeepSeek
// byte-level BPE); tests skip when it is absent.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"
#include "server/prompt_cache.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using namespace larder;
using larder::server::PromptCache;
using larder::server::PromptCacheParams;

using larder::testing::shared_dir;
using larder::testing::shared_path;

namespace {


std::unique_ptr<Tokenizer> load(const std::string& rel) {
  const std::string p = shared_path(rel);
  if (!fs::exists(p)) return nullptr;
  auto t = load_tokenizer_any(p);
  if (!t.ok()) {
    ADD_FAILURE() << p << ": " << t.error();
    return nullptr;
  }
  return std::move(t.value());
}

#define LOAD_OR_SKIP(var, rel)                                                                  \
  auto var = load(rel);                                                                         \
  if (!var) GTEST_SKIP() << "shared data missing: " << shared_path(rel) << " (set LARDER_SHARED)"

const char* kLlama2 = "models/llama2-tokenizer/tokenizer.model";

// Llama 2's vocabulary plus ChatML-style special tokens (two control, one user-defined).
std::unique_ptr<Tokenizer> llama2_chatml() {
  auto base = load(kLlama2);
  if (!base) return nullptr;
  Vocab v = base->vocab();
  for (auto [text, type] : {std::pair<const char*, TokenType>{"<|im_start|>", TokenType::CONTROL},
                            {"<|im_end|>", TokenType::CONTROL},
                            {"<tool>", TokenType::USER_DEFINED}}) {
    v.tokens.push_back(text);
    v.scores.push_back(0);
    v.types.push_back(type);
  }
  auto t = make_tokenizer(std::move(v));
  if (!t.ok()) return nullptr;
  return std::move(t.value());
}

// The vocabulary `larder synth` writes (src/model/synth.cpp): <unk> <s> </s>, 256 byte
// tokens, then lower-case letter pieces with and without U+2581, and no piece for U+2581
// alone (so the encoder's spaces often fall back to its three bytes).
std::unique_ptr<Tokenizer> synth_vocab_tokenizer(int n_vocab = 512) {
  Vocab v;
  auto add = [&](std::string t, float sc, TokenType ty) {
    v.tokens.push_back(std::move(t));
    v.scores.push_back(sc);
    v.types.push_back(ty);
  };
  add("<unk>", 0, TokenType::UNKNOWN);
  add("<s>", 0, TokenType::CONTROL);
  add("</s>", 0, TokenType::CONTROL);
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    add(buf, 0, TokenType::BYTE);
  }
  for (int64_t k = 0; static_cast<int>(v.tokens.size()) < n_vocab; ++k) {
    std::string word;
    int64_t x = k / 2;
    do {
      word += static_cast<char>('a' + x % 26);
      x = x / 26 - 1;
    } while (x >= 0);
    add(k % 2 == 0 ? "\xE2\x96\x81" + word : word, -static_cast<float>(k), TokenType::NORMAL);
  }
  v.unk = 0;
  v.bos = 1;
  v.eos = 2;
  auto t = make_tokenizer(std::move(v));
  return t.ok() ? std::move(t.value()) : nullptr;
}

int32_t id_of(const Tokenizer& tok, const std::string& piece) {
  const auto& v = tok.vocab().tokens;
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] == piece) return static_cast<int32_t>(i);
  return -1;
}

// A valid but non-canonical tokenization of raw bytes (no dummy prefix): greedy longest
// match over ordinary pieces, byte tokens where none matches — like a model's output.
// With rng, pieces are capped at a random length (more unusual splits).
class Greedy {
 public:
  explicit Greedy(const Tokenizer& tok) {
    for (int32_t id = 0; id < tok.n_vocab(); ++id) {
      const TokenType t = tok.vocab().types[id];
      if (t != TokenType::NORMAL && t != TokenType::BYTE) continue;
      std::string b = tok.token_bytes(id);
      if (!b.empty()) pieces_.emplace(b, id);
    }
  }
  std::vector<int32_t> operator()(const std::string& s, std::mt19937* rng = nullptr) const {
    std::vector<int32_t> out;
    for (size_t i = 0; i < s.size();) {
      size_t best = 0;
      int32_t id = -1;
      const size_t max_len = rng ? 1 + (*rng)() % 6 : 16;
      for (size_t len = 1; len <= max_len && i + len <= s.size(); ++len) {
        auto it = pieces_.find(s.substr(i, len));
        if (it != pieces_.end()) {
          best = len;
          id = it->second;
        }
      }
      if (id < 0) {
        ADD_FAILURE() << "no piece for byte " << static_cast<int>(static_cast<unsigned char>(s[i]));
        return out;
      }
      out.push_back(id);
      i += best;
    }
    return out;
  }

 private:
  std::map<std::string, int32_t> pieces_;
};

std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::string decoded(const PromptCache& c, const std::vector<int32_t>& ids, bool add_bos, bool parse) {
  std::string s;
  EXPECT_TRUE(c.decode(ids, add_bos, parse, s));
  return s;
}

std::vector<int32_t> special_ids(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  std::vector<int32_t> r;
  for (int32_t id : ids) {
    const TokenType t = tok.vocab().types[id];
    if (t == TokenType::CONTROL || t == TokenType::USER_DEFINED || t == TokenType::UNKNOWN) r.push_back(id);
  }
  return r;
}

// The invariant, for one encode() result.
void expect_valid(const Tokenizer& tok, const PromptCache& c, const PromptCache::Encoded& r, const std::string& text,
                  bool add_bos, bool parse) {
  std::string back;
  EXPECT_TRUE(c.decode(r.ids, add_bos, parse, back));
  EXPECT_EQ(back, text);
  const auto plain = tok.encode(text, add_bos, parse);
  EXPECT_EQ(special_ids(tok, r.ids), special_ids(tok, plain));
  if (r.reused_tokens == 0) {
    EXPECT_EQ(r.ids, plain);
  }
  if (add_bos && tok.vocab().add_bos) {
    ASSERT_FALSE(r.ids.empty());
    EXPECT_EQ(r.ids[0], tok.bos());
  }
}

const std::string kPrompt = "System: You are a helpful assistant.\nUser: Tell me about the sea.\nAssistant:";

}  // namespace

TEST(PromptCache, EmptyCacheIsPlainEncode) {
  LOAD_OR_SKIP(tok, kLlama2);
  PromptCache c(*tok);
  for (const std::string& s : {kPrompt, std::string("a"), std::string(" leading space"), std::string("日本語 🙂 x")}) {
    for (bool bos : {false, true}) {
      auto r = c.encode(s, bos, false);
      EXPECT_EQ(r.reused_tokens, 0);
      EXPECT_EQ(r.ids, tok->encode(s, bos, false));
    }
  }
  EXPECT_EQ(c.encode("", true, false).ids, tok->encode("", true, false));
}

// The text convention agrees with the encoders: decode(encode(text)) == text.
TEST(PromptCache, DecodeInvertsEncode) {
  std::vector<std::unique_ptr<Tokenizer>> toks;
  for (const char* rel : {kLlama2, "tokenizers/ggml-vocab-phi-3.gguf", "tokenizers/ggml-vocab-gpt-2.gguf",
                          "tokenizers/ggml-vocab-deepseek-llm.gguf", "tokenizers/ggml-vocab-llama-spm.gguf"})
    if (auto t = load(rel)) toks.push_back(std::move(t));
  if (auto t = llama2_chatml()) toks.push_back(std::move(t));
  if (toks.empty()) GTEST_SKIP() << "shared data missing";
  const std::vector<std::string> texts = {
      kPrompt,
      "  two leading spaces, trailing  ",
      "\nnewline first\n\n",
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
      "<s>[INST] Hi [/INST] Hello </s><s>[INST] again [/INST]",
      "<|user|>\nQuestion?<|end|>\n<|assistant|>\n",
      "<|endoftext|>after",
      "Unicode: é, 日本語, emoji 🙂, tab\t.",
      "<tool> call <tool>x"};
  for (auto& tok : toks) {
    PromptCache c(*tok);
    for (const auto& s : texts)
      for (bool parse : {false, true})
        for (bool bos : {false, true}) {
          std::string back;
          EXPECT_TRUE(c.decode(tok->encode(s, bos, parse), bos, parse, back)) << s;
          EXPECT_EQ(back, s) << "parse " << parse << " bos " << bos;
        }
  }
}

// The second turn reuses the generated ids (not the canonical re-tokenization).
TEST(PromptCache, ReusesGeneratedReply) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCache c(*tok);
  auto p1 = c.encode(kPrompt, true, false);
  EXPECT_EQ(p1.reused_tokens, 0);
  // The model answered " The sea is big and blue." in an unusual split.
  const std::string reply = " The sea is big and blue.";
  const auto gen = g(reply);
  const auto gen_short = [&] {
    std::mt19937 rng(7);
    return g(reply, &rng);
  }();
  ASSERT_NE(gen_short, tok->encode(reply.substr(1), false, false));  // not the canonical split
  c.insert(cat(p1.ids, gen_short), true, false);
  EXPECT_EQ(c.stats().entries, 1u);

  // The client sends the reply back (without its leading space; the format adds one).
  const std::string text2 = kPrompt + reply + "\nUser: And the sky?\nAssistant:";
  auto r = c.encode(text2, true, false);
  expect_valid(*tok, c, r, text2, true, false);
  // Everything but the last piece of the reply ("." can't be cut after: the rest starts
  // with "\n" and a mid-text cut needs " " or a lone-space piece).
  EXPECT_GE(r.reused_tokens, static_cast<int>(p1.ids.size() + gen_short.size()) - 2);
  EXPECT_TRUE(std::equal(p1.ids.begin(), p1.ids.end(), r.ids.begin()));
  EXPECT_TRUE(std::equal(gen_short.begin(), gen_short.begin() + (r.reused_tokens - p1.ids.size()),
                         r.ids.begin() + p1.ids.size()));
  EXPECT_NE(r.ids, tok->encode(text2, true, false));
  (void)gen;

  // Third turn: the entry of turn 2 (its prompt + reply) is found.
  c.insert(cat(r.ids, g(" Blue too.")), true, false);
  const std::string text3 = text2 + " Blue too.\nUser: Thanks\nAssistant:";
  auto r3 = c.encode(text3, true, false);
  expect_valid(*tok, c, r3, text3, true, false);
  EXPECT_GE(r3.reused_tokens, static_cast<int>(r.ids.size()));
  EXPECT_EQ(c.stats().hits, 2);
}

// A stop string ends the text the client got inside the generated ids: the reuse stops at
// the last token boundary inside the common prefix.
TEST(PromptCache, StopTruncatedReply) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCache c(*tok);
  auto p1 = c.encode(kPrompt, true, false);
  // Generated " Waves come and go.\nUser: fake" ; the stop string "\nUser:" cut it.
  const auto gen = g(" Waves come and go.\nUser: fake");
  c.insert(cat(p1.ids, gen), true, false);
  const std::string text2 = kPrompt + " Waves come and go.\nUser: real question\nAssistant:";
  auto r = c.encode(text2, true, false);
  expect_valid(*tok, c, r, text2, true, false);
  EXPECT_GT(r.reused_tokens, static_cast<int>(p1.ids.size()));
  // Cut somewhere in the middle of a generated piece ("fa|ke" vs "real"), never past it.
  const std::string text3 = kPrompt + " Waves come and g";
  auto r3 = c.encode(text3, true, false);
  expect_valid(*tok, c, r3, text3, true, false);
  EXPECT_GT(r3.reused_tokens, static_cast<int>(p1.ids.size()));
}

// Token boundaries inside a UTF-8 character (byte tokens) are never cut points.
TEST(PromptCache, Utf8Boundaries) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCache c(*tok);
  auto p1 = c.encode(kPrompt, true, false);
  const int32_t c3 = id_of(*tok, "<0xC3>"), a9 = id_of(*tok, "<0xA9>"), e6 = id_of(*tok, "<0xE6>");
  ASSERT_GE(c3, 0);
  ASSERT_GE(a9, 0);
  ASSERT_GE(e6, 0);
  // " caf" + é as two byte tokens + " ok" + an incomplete 3-byte sequence at the end.
  auto gen = cat(g(" caf"), {c3, a9});
  gen = cat(gen, g(" ok"));
  gen.push_back(e6);
  c.insert(cat(p1.ids, gen), true, false);
  // The client wrote "café" then a different character where the model was cut off.
  for (const std::string& tail : {std::string(" caf\xC3\xA9 ok\xE6\x97\xA5 more"), std::string(" caf\xC3\xA8!"),
                                 std::string(" caf\xC3\xA9"), std::string(" caf\xC3\xA9 ok\xEF\xBF\xBD")}) {
    const std::string text = kPrompt + tail;
    auto r = c.encode(text, true, false);
    expect_valid(*tok, c, r, text, true, false);
    EXPECT_GE(r.reused_tokens, static_cast<int>(p1.ids.size())) << tail;
    if (r.reused_tokens > 0) {
      EXPECT_NE(r.ids[r.reused_tokens - 1], c3) << "cut inside a character: " << tail;
    }
  }
}

// SentencePiece's dummy prefix: at the start, after special tokens, and not mid-text.
TEST(PromptCache, SpmDummyPrefix) {
  auto tok = llama2_chatml();
  if (!tok) GTEST_SKIP() << "shared data missing: " << shared_path(kLlama2);
  const int32_t im_end = id_of(*tok, "<|im_end|>");
  ASSERT_GE(im_end, 0);
  Greedy g(*tok);
  PromptCache c(*tok);
  const std::string p = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
  auto p1 = c.encode(p, true, true);
  EXPECT_EQ(p1.ids, tok->encode(p, true, true));
  // Reply "Hello there" then the end token the template also writes.
  auto gen = cat(g("Hello there"), {im_end});
  c.insert(cat(p1.ids, gen), true, true);
  EXPECT_EQ(decoded(c, cat(p1.ids, gen), true, true), p + "Hello there<|im_end|>");
  // Next turn: the cut right after <|im_end|> (special: the rest gets the dummy prefix).
  const std::string text2 = p + "Hello there<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n";
  auto r = c.encode(text2, true, true);
  expect_valid(*tok, c, r, text2, true, true);
  EXPECT_EQ(r.reused_tokens, static_cast<int>(p1.ids.size() + gen.size()));
  // The client trimmed the reply: the cut is mid-text, before the special token.
  const std::string text3 = p + "Hello<|im_end|>\n";
  auto r3 = c.encode(text3, true, true);
  expect_valid(*tok, c, r3, text3, true, true);
  EXPECT_GT(r3.reused_tokens, static_cast<int>(p1.ids.size()));
  // Mid-text cut before a space: the dummy prefix of the rest stands for it.
  const std::string text4 = p + "Hello world";
  auto r4 = c.encode(text4, true, true);
  expect_valid(*tok, c, r4, text4, true, true);
  EXPECT_GT(r4.reused_tokens, static_cast<int>(p1.ids.size()));
  // Same text from the start with the template writing BOS itself: BOS is text "<s>".
  PromptCache c2(*tok);
  const std::string pb = "<s>" + p;
  auto q = c2.encode(pb, false, true);
  EXPECT_EQ(q.ids, tok->encode(pb, false, true));
  c2.insert(cat(q.ids, gen), false, true);
  auto q2 = c2.encode("<s>" + text2, false, true);
  expect_valid(*tok, c2, q2, "<s>" + text2, false, true);
  EXPECT_EQ(q2.reused_tokens, static_cast<int>(q.ids.size() + gen.size()));
}

// Plain pieces that spell a special token's text are not reused where the tokenizer would
// parse the text as that special token.
TEST(PromptCache, SpecialTokenTextInReply) {
  auto tok = llama2_chatml();
  if (!tok) GTEST_SKIP() << "shared data missing: " << shared_path(kLlama2);
  Greedy g(*tok);
  PromptCache c(*tok);
  const std::string p = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
  auto p1 = c.encode(p, true, true);
  c.insert(cat(p1.ids, g("Ok<|im_end|>\nmore")), true, true);
  const std::string text = p + "Ok<|im_end|>\nmore text";
  auto r = c.encode(text, true, true);
  expect_valid(*tok, c, r, text, true, true);
  EXPECT_LE(r.reused_tokens, static_cast<int>(p1.ids.size() + g("Ok").size()));
  // Without special parsing the same pieces are just text: reused in full.
  PromptCache c2(*tok);
  auto q = c2.encode("Hi\n", true, false);
  const auto gen = g("Ok<|im_end|>\nmore");
  c2.insert(cat(q.ids, gen), true, false);
  auto r2 = c2.encode("Hi\nOk<|im_end|>\nmore text", true, false);
  expect_valid(*tok, c2, r2, "Hi\nOk<|im_end|>\nmore text", true, false);
  EXPECT_GE(r2.reused_tokens, static_cast<int>(q.ids.size() + gen.size()) - 1);
  // The user-defined token is parsed in both modes.
  auto r3 = c2.encode("Hi\nOk<tool>", true, false);
  expect_valid(*tok, c2, r3, "Hi\nOk<tool>", true, false);
}

// A generated end-of-sequence token: text "</s>" when special tokens are parsed (the
// template writes it), an end of the entry otherwise.
TEST(PromptCache, GeneratedEos) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  const auto gen = cat(g(" Fine."), {tok->eos()});
  {
    PromptCache c(*tok);
    const std::string p = "<s>[INST] How are you? [/INST]";
    auto p1 = c.encode(p, false, true);
    c.insert(cat(p1.ids, gen), false, true);
    const std::string text = p + " Fine.</s><s>[INST] Good [/INST]";
    auto r = c.encode(text, false, true);
    expect_valid(*tok, c, r, text, false, true);
    EXPECT_EQ(r.reused_tokens, static_cast<int>(p1.ids.size() + gen.size()));
  }
  {
    PromptCache c(*tok);
    auto p1 = c.encode(kPrompt, true, false);
    c.insert(cat(p1.ids, gen), true, false);
    std::string s;
    EXPECT_FALSE(c.decode(cat(p1.ids, gen), true, false, s));
    EXPECT_EQ(s, kPrompt + " Fine.");
    const std::string text = kPrompt + " Fine.</s>";
    auto r = c.encode(text, true, false);
    expect_valid(*tok, c, r, text, true, false);
  }
}

// Entries never serve a different mode (BOS added or not, special tokens parsed or not).
TEST(PromptCache, ModesDoNotMix) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCache c(*tok);
  auto p1 = c.encode(kPrompt, true, false);
  c.insert(cat(p1.ids, g(" Yes.")), true, false);
  for (auto [bos, parse] : {std::pair{false, false}, {true, true}, {false, true}}) {
    auto r = c.encode(kPrompt + " Yes.", bos, parse);
    EXPECT_EQ(r.reused_tokens, 0);
    EXPECT_EQ(r.ids, tok->encode(kPrompt + " Yes.", bos, parse));
  }
  EXPECT_GT(c.encode(kPrompt + " Yes.", true, false).reused_tokens, 0);
}

TEST(PromptCache, EvictionAndDedup) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCacheParams pp;
  pp.max_entries = 2;
  PromptCache c(*tok, pp);
  auto ids = [&](const std::string& s) { return tok->encode(s, true, false); };
  c.insert(ids("first conversation about cats"), true, false);
  c.insert(ids("second conversation about dogs"), true, false);
  c.insert(ids("third conversation about birds"), true, false);
  auto st = c.stats();
  EXPECT_EQ(st.entries, 2u);
  EXPECT_EQ(st.evictions, 1);
  EXPECT_EQ(c.encode("first conversation about cats and more", true, false).reused_tokens, 0);
  EXPECT_GT(c.encode("third conversation about birds and more", true, false).reused_tokens, 0);
  // An entry whose ids extend another's replaces it; a covered one is not added.
  PromptCache d(*tok);
  auto a = ids("shared start");
  d.insert(a, true, false);
  d.insert(cat(a, g(" and a longer tail")), true, false);
  EXPECT_EQ(d.stats().entries, 1u);
  d.insert(a, true, false);
  EXPECT_EQ(d.stats().entries, 1u);
  // Byte budget.
  PromptCacheParams pb;
  pb.max_bytes = 4096;
  PromptCache e(*tok, pb);
  std::string big;
  for (int i = 0; i < 200; ++i) big += "word" + std::to_string(i) + " ";
  e.insert(ids(big), true, false);
  e.insert(ids("x" + big), true, false);
  EXPECT_LE(e.stats().bytes, 4096u);
  EXPECT_LE(e.stats().entries, 1u);
  // Disabled.
  PromptCacheParams off;
  off.enabled = false;
  PromptCache f(*tok, off);
  f.insert(ids(kPrompt), true, false);
  EXPECT_EQ(f.stats().entries, 0u);
  EXPECT_EQ(f.encode(kPrompt, true, false).reused_tokens, 0);
}

// Random texts, replies and edits on several real tokenizers: the invariant always holds,
// and reuse does happen.
TEST(PromptCache, RandomizedInvariant) {
  struct Tok {
    std::string name;
    std::unique_ptr<Tokenizer> tok;
  };
  std::vector<Tok> toks;
  for (const char* rel : {kLlama2, "tokenizers/ggml-vocab-phi-3.gguf", "tokenizers/ggml-vocab-gpt-2.gguf",
                          "tokenizers/ggml-vocab-deepseek-llm.gguf"})
    if (auto t = load(rel)) toks.push_back({rel, std::move(t)});
  if (auto t = llama2_chatml()) toks.push_back({"llama2+chatml", std::move(t)});
  if (toks.empty()) GTEST_SKIP() << "shared data missing";
  const std::vector<std::string> atoms = {
      "the", " sea", " is", " big", ",", ".", " ", "  ", "\n", "\n\n", "\t", "é", "日本", "🙂", "x", "123",
      "<|im_start|>", "<|im_end|>", "<tool>", "<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>",
      "<|endoftext|>", "<|im", "_end|>", "User:", " Assistant:", "[INST]", " [/INST]"};
  std::mt19937 rng(1234);
  auto rand_text = [&](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += atoms[rng() % atoms.size()];
    return s;
  };
  for (auto& [name, tok] : toks) {
    Greedy g(*tok);
    PromptCacheParams pp;
    pp.max_entries = 8;
    PromptCache c(*tok, pp);
    int hits = 0, trials = 0;
    for (int it = 0; it < 300; ++it) {
      const bool parse = rng() % 2, bos = rng() % 2;
      SCOPED_TRACE(name + " trial " + std::to_string(it) + " parse " + std::to_string(parse) + " bos " +
                   std::to_string(bos));
      const std::string a = rand_text(1 + rng() % 12);
      auto pa = c.encode(a, bos, parse);
      expect_valid(*tok, c, pa, a, bos, parse);
      // A "reply": random pieces and byte tokens, sometimes a special token id.
      std::vector<int32_t> gen = g(rand_text(1 + rng() % 10), &rng);
      if (rng() % 4 == 0) gen.push_back(static_cast<int32_t>(256 + rng() % 200));
      if (rng() % 8 == 0 && tok->eos() >= 0) gen.push_back(tok->eos());
      gen = cat(gen, g(rand_text(1 + rng() % 4), &rng));
      auto full = cat(pa.ids, gen);
      c.insert(full, bos, parse);
      std::string ft;
      c.decode(full, bos, parse, ft);
      // The next prompt: a prefix of that text (any byte), then something new.
      const size_t cut = ft.empty() ? 0 : rng() % (ft.size() + 1);
      const std::string b = ft.substr(0, cut) + (rng() % 3 ? rand_text(rng() % 6) : std::string());
      if (b.empty()) continue;
      auto r = c.encode(b, bos, parse);
      expect_valid(*tok, c, r, b, bos, parse);
      trials++;
      hits += r.reused_tokens > 0;
      if (::testing::Test::HasFailure()) return;
    }
    EXPECT_GT(hits, trials / 3) << name;
  }
}

TEST(PromptCache, ConcurrentUse) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCacheParams pp;
  pp.max_entries = 16;
  PromptCache c(*tok, pp);
  std::atomic<int> bad{0};
  std::vector<std::thread> ths;
  for (int t = 0; t < 4; ++t)
    ths.emplace_back([&, t] {
      std::string conv = "System: thread " + std::to_string(t) + "\n";
      for (int turn = 0; turn < 30; ++turn) {
        conv += "User: question " + std::to_string(turn) + "\nAssistant:";
        auto r = c.encode(conv, true, false);
        std::string back;
        if (!c.decode(r.ids, true, false, back) || back != conv) bad++;
        const std::string reply = " answer " + std::to_string(turn * 7 + t);
        c.insert(cat(r.ids, g(reply)), true, false);
        conv += reply + "\n";
      }
    });
  for (auto& th : ths) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(c.stats().hits, 60);
  EXPECT_LE(c.stats().entries, 16u);
}

namespace {

// What the server does per turn: encode the prompt, then insert it with the reply.
PromptCache::Encoded turn(PromptCache& c, const std::string& text, const std::vector<int32_t>& gen, bool add_bos,
                          bool parse, bool strip_first_space = true) {
  auto r = c.encode(text, add_bos, parse);
  c.insert(text, r, gen, add_bos, parse, strip_first_space);
  return r;
}

// Alignment sanity, and the tokenized rest decodes exactly to the rest of the text.
void expect_aligned(const Tokenizer& tok, const PromptCache& c, const PromptCache::Encoded& r, const std::string& text,
                    bool add_bos, bool parse) {
  ASSERT_EQ(r.offs.size(), r.ids.size() + 1);
  ASSERT_EQ(r.nocut.size(), r.offs.size());
  EXPECT_EQ(r.offs.back(), text.size());
  EXPECT_TRUE(std::is_sorted(r.offs.begin(), r.offs.end()));
  if (r.reused_tokens == 0) {
    EXPECT_EQ(r.ids, tok.encode(text, add_bos, parse));
    return;
  }
  const size_t k = static_cast<size_t>(r.reused_tokens);
  const std::string rest = text.substr(r.offs[k]);
  // decode(last reused id + rest ids) - decode(last reused id) is the rest: the only state
  // is whether the last id was a special token.
  std::vector<int32_t> tail(r.ids.begin() + static_cast<std::ptrdiff_t>(k) - 1, r.ids.end());
  std::string full, head;
  EXPECT_TRUE(c.decode(tail, false, parse, full));
  EXPECT_TRUE(c.decode(std::span<const int32_t>(tail).first(1), false, parse, head));
  ASSERT_GE(full.size(), head.size());
  EXPECT_EQ(full.substr(head.size()), rest);
}

}  // namespace

// The server's path (insert with the prompt's alignment) keeps the invariant over many
// chained turns, each reusing the previous one's entry.
TEST(PromptCache, ChainedTurnsKeepInvariant) {
  std::vector<std::unique_ptr<Tokenizer>> toks;
  for (const char* rel : {kLlama2, "tokenizers/ggml-vocab-gpt-2.gguf"})
    if (auto t = load(rel)) toks.push_back(std::move(t));
  if (auto t = llama2_chatml()) toks.push_back(std::move(t));
  if (toks.empty()) GTEST_SKIP() << "shared data missing";
  std::mt19937 rng(99);
  const std::vector<std::string> words = {" sun", " rain", "é", "\n", " 日本", ".", " x", "  ", "<|im_end|>", "ok"};
  for (auto& tok : toks) {
    Greedy g(*tok);
    for (bool parse : {false, true}) {
      PromptCache c(*tok);
      std::string conv = parse ? "<|im_start|>system\nHi<|im_end|>\n" : "System: Hi\n";
      int reused = 0;
      for (int t = 0; t < 12; ++t) {
        conv += parse ? "<|im_start|>user\nq" + std::to_string(t) + "<|im_end|>\n<|im_start|>assistant\n"
                      : "User: q" + std::to_string(t) + "\nAssistant:";
        std::string reply;
        for (int w = 0; w < 6; ++w) reply += words[rng() % words.size()];
        auto r = turn(c, conv, g(reply, &rng), true, parse);
        expect_valid(*tok, c, r, conv, true, parse);
        expect_aligned(*tok, c, r, conv, true, parse);
        reused += r.reused_tokens;
        conv += reply + (parse ? "<|im_end|>\n" : "\n");
      }
      EXPECT_GT(reused, 0);
    }
  }
}

// echo_replies: a reply with invalid UTF-8 (the client got U+FFFD), control tokens (the
// client got nothing) and no leading space (the format writes one) is reused as generated.
TEST(PromptCache, EchoRepliesAsGenerated) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  const int32_t e5 = id_of(*tok, "<0xE5>");
  const int32_t ib = id_of(*tok, "ib");
  ASSERT_GE(e5, 0);
  ASSERT_GE(ib, 0);
  std::vector<int32_t> gen = {ib, e5};
  gen = cat(gen, g(" xa"));
  gen.push_back(tok->bos());  // a control token
  gen = cat(gen, g(" end of it"));
  const std::string visible = "ib\xEF\xBF\xBD xa end of it";
  const std::string next = "\nUser: next\nAssistant:";
  for (bool echo : {false, true}) {
    PromptCacheParams pp;
    pp.echo_replies = echo;
    PromptCache c(*tok, pp);
    auto p1 = turn(c, kPrompt, gen, true, false);
    const std::string text2 = kPrompt + " " + visible + next;
    auto r = turn(c, text2, g(" more"), true, false);
    expect_aligned(*tok, c, r, text2, true, false);
    if (!echo) {
      expect_valid(*tok, c, r, text2, true, false);
      EXPECT_LE(r.reused_tokens, static_cast<int>(p1.ids.size()));
      continue;
    }
    // All but the last piece ("it": the rest starts with "\n" and the vocabulary has
    // "\n" only as a byte, so the lone dummy-prefix piece is dropped... or one piece more).
    EXPECT_GE(r.reused_tokens, static_cast<int>(p1.ids.size() + gen.size()) - 2);
    EXPECT_TRUE(std::equal(gen.begin(), gen.begin() + (r.reused_tokens - p1.ids.size()), r.ids.begin() + p1.ids.size()));
    // The third turn finds the second one's entry, with the first reply inside it.
    const std::string text3 = text2 + " more\nUser: again\nAssistant:";
    auto r3 = turn(c, text3, {}, true, false);
    expect_aligned(*tok, c, r3, text3, true, false);
    EXPECT_GE(r3.reused_tokens, static_cast<int>(r.ids.size()));
    EXPECT_TRUE(std::equal(r.ids.begin(), r.ids.end(), r3.ids.begin()));
    // A client that edits the reply gets the edit tokenized (the reuse stops before it).
    const std::string edited = kPrompt + " ib\xEF\xBF\xBD xa END" + next;
    auto re = c.encode(edited, true, false);
    expect_aligned(*tok, c, re, edited, true, false);
    EXPECT_LE(re.reused_tokens, static_cast<int>(p1.ids.size() + 4));
  }
}

// echo_replies with a template that trims the reply (a leading newline disappears) and
// completions (the client keeps the first space).
TEST(PromptCache, EchoRepliesWhitespace) {
  LOAD_OR_SKIP(tok, kLlama2);
  Greedy g(*tok);
  PromptCacheParams pp;
  pp.echo_replies = true;
  {
    PromptCache c(*tok, pp);
    const std::string p = "[INST] Hi [/INST]";
    const auto gen = g("\n Hello friend");
    auto p1 = turn(c, p, gen, true, true);
    const std::string text2 = p + " Hello friend [INST] Bye [/INST]";  // content | trim
    auto r = c.encode(text2, true, true);
    expect_aligned(*tok, c, r, text2, true, true);
    EXPECT_GE(r.reused_tokens, static_cast<int>(p1.ids.size() + gen.size()) - 1);
  }
  {
    PromptCache c(*tok, pp);
    const std::string p = "Once upon a time";
    const auto gen = g(" there was a cat.");
    auto p1 = turn(c, p, gen, true, false, /*strip_first_space=*/false);
    const std::string text2 = p + " there was a cat. It sat.";
    auto r = c.encode(text2, true, false);
    expect_aligned(*tok, c, r, text2, true, false);
    expect_valid(*tok, c, r, text2, true, false);  // nothing lossy here: exact
    EXPECT_EQ(r.reused_tokens, static_cast<int>(p1.ids.size() + gen.size()));
  }
}

// Random replies (byte tokens, control tokens) sent back as the client saw them, with and
// without a separator: the rest always round-trips and the reply is mostly reused.
TEST(PromptCache, EchoRandomized) {
  std::vector<std::unique_ptr<Tokenizer>> toks;
  toks.push_back(synth_vocab_tokenizer());
  for (const char* rel : {kLlama2, "tokenizers/ggml-vocab-gpt-2.gguf"})
    if (auto t = load(rel)) toks.push_back(std::move(t));
  std::mt19937 rng(5);
  for (auto& tok : toks) {
    ASSERT_TRUE(tok);
    PromptCacheParams pp;
    pp.echo_replies = true;
    PromptCache c(*tok, pp);
    std::string conv = "System: be random\n";
    size_t prev_total = 0;
    int short_turns = 0;
    for (int t = 0; t < 40; ++t) {
      conv += "User: q" + std::to_string(t) + " and Some Words\nAssistant:";
      std::vector<int32_t> gen;
      for (int i = 0; i < 40; ++i) gen.push_back(static_cast<int32_t>(rng() % std::min(tok->n_vocab(), 1000)));
      auto r = turn(c, conv, gen, true, false);
      expect_aligned(*tok, c, r, conv, true, false);
      if (::testing::Test::HasFailure()) return;
      // The previous prompt and reply, but for a few ids at the end of the reply.
      if (t > 0 && static_cast<size_t>(r.reused_tokens) + 8 < prev_total) short_turns++;
      prev_total = r.ids.size() + gen.size();
      // What the client got, as the server's StreamDecoder gives it.
      StreamDecoder dec(*tok, true);
      std::string vis;
      for (int32_t id : gen) vis += dec.push(id);
      vis += dec.flush();
      conv += " " + vis + "\n";
    }
    EXPECT_GE(c.stats().hits, 39);
    EXPECT_LE(short_turns, 2);
  }
}
