// libFuzzer target: GgufFile::parse on arbitrary bytes, then everything a loader would touch:
// metadata accessors, tensor data ranges and, when the file carries a vocabulary, the tokenizer
// (built from the file and run on text taken from the input's tail).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "model/gguf.h"
#include "tokenizer/tokenizer.h"

using namespace larder;

static volatile uint8_t g_sink;
// LARDER_FUZZ_VERBOSE=1 explains what happened to each input (for reading reproducers).
static const bool g_verbose = std::getenv("LARDER_FUZZ_VERBOSE") != nullptr;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = GgufFile::parse(data, size);
  if (!r.ok()) {
    if (r.error().empty()) __builtin_trap();  // every failure must explain itself
    if (g_verbose) std::fprintf(stderr, "parse: %s\n", r.error().c_str());
    return 0;
  }
  const GgufFile& g = *r.value();
  for (const auto& [key, v] : g.kv()) {
    if (g.find(key) != &v) __builtin_trap();
    (void)v.to_string();
    (void)g.get_int(key);
    (void)g.get_float(key);
    (void)g.get_string(key);
    (void)g.get_str_array(key);
    (void)g.get_float_array(key);
    (void)g.get_int_array(key);
  }
  for (const auto& t : g.tensors()) {
    if (g.tensor(t.name) != &t) __builtin_trap();
    // ASan flags any tensor range that escapes the input buffer.
    if (t.nbytes) g_sink = t.data[0] ^ t.data[t.nbytes - 1];
  }
  if (g.find("tokenizer.ggml.tokens")) {
    auto tok = load_tokenizer_gguf(g);
    if (g_verbose) std::fprintf(stderr, "tokenizer: %s\n", tok.ok() ? "ok" : tok.error().c_str());
    if (tok.ok()) {
      const Tokenizer& tk = *tok.value();
      size_t n = size < 96 ? size : 96;
      std::string_view text(reinterpret_cast<const char*>(data + size - n), n);
      for (bool special : {false, true}) {
        auto ids = tk.encode(text, true, special);
        for (int32_t id : ids)
          if (id < 0 || id >= tk.n_vocab()) __builtin_trap();
        (void)tk.decode(ids, special);
        StreamDecoder sd(tk);
        for (int32_t id : ids) (void)sd.push(id);
        (void)sd.flush();
      }
      (void)tk.encode("Hello world! 123 <s></s> \xe2\x96\x81 \xf0\x9f\x98\x80", true, true);
      for (int32_t id = 0; id < tk.n_vocab() && id < 4096; ++id) (void)tk.token_bytes(id, true);
    }
  }
  return 0;
}
