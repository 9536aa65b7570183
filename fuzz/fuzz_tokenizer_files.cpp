// libFuzzer target: the file-based tokenizer loaders that model folders and checkpoints pull in
// (HF tokenizer.json, llama2.c tokenizer.bin, SentencePiece tokenizer.model). Input byte 0
// picks the loader (and, for tokenizer.bin, bytes 1-2 the vocabulary size); the rest is the
// file, written to a private temp dir because these loaders take paths.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "tokenizer/tokenizer.h"

using namespace larder;

namespace {

std::string g_dir;

void cleanup() {
  for (const char* f : {"/tokenizer.json", "/tokenizer.bin", "/tokenizer.model"}) ::unlink((g_dir + f).c_str());
  ::rmdir(g_dir.c_str());
}

bool write_file(const std::string& path, const uint8_t* p, size_t n) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  bool ok = std::fwrite(p, 1, n, f) == n;
  return (std::fclose(f) == 0) && ok;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char tmpl[] = "/tmp/larder_fuzz_tok_XXXXXX";
  if (!mkdtemp(tmpl)) __builtin_trap();
  g_dir = tmpl;
  std::atexit(cleanup);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const int kind = data[0] % 3;
  const int32_t n_vocab = (data[1] | (data[2] << 8)) % 1024;  // 0 = read to end of file
  const uint8_t* body = data + 3;
  const size_t n = size - 3;
  Result<std::unique_ptr<Tokenizer>> tok = make_error("unset");
  std::string path;
  switch (kind) {
    case 0: path = g_dir + "/tokenizer.json"; break;
    case 1: path = g_dir + "/tokenizer.bin"; break;
    default: path = g_dir + "/tokenizer.model"; break;
  }
  if (!write_file(path, body, n)) __builtin_trap();
  if (kind == 0) tok = load_tokenizer_hf_json(path);
  else if (kind == 1) tok = load_tokenizer_llama2c(path, n_vocab);
  else tok = load_tokenizer_spm_model(path);
  if (std::getenv("LARDER_FUZZ_VERBOSE")) std::fprintf(stderr, "tokenizer: %s\n", tok.ok() ? "ok" : tok.error().c_str());
  if (!tok.ok()) {
    if (tok.error().empty()) __builtin_trap();
    return 0;
  }
  const Tokenizer& tk = *tok.value();
  size_t tail = n < 64 ? n : 64;
  std::string_view text(reinterpret_cast<const char*>(body + n - tail), tail);
  for (std::string_view s : {text, std::string_view("Hello world! <s> \xe2\x96\x81x 12345 caf\xc3\xa9 \xff")}) {
    for (bool special : {false, true}) {
      auto ids = tk.encode(s, true, special);
      for (int32_t id : ids)
        if (id < 0 || id >= tk.n_vocab()) __builtin_trap();
      (void)tk.decode(ids, special);
    }
  }
  for (int32_t id = 0; id < tk.n_vocab() && id < 4096; ++id) (void)tk.token_bytes(id, true);
  return 0;
}
