// Tokenizer from GGUF metadata (tokenizer.ggml.*), with llama.cpp's defaults.
#include <cmath>
#include <cstdio>

#include "model/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_internal.h"

namespace larder {

Result<std::unique_ptr<Tokenizer>> load_tokenizer_gguf(const GgufFile& g) {
  const auto model = g.get_string("tokenizer.ggml.model");
  if (!model) return make_error("tokenizer: GGUF has no tokenizer.ggml.model key");
  Vocab v;
  if (*model == "llama") {
    v.kind = TokenizerKind::SPM;
  } else if (*model == "gpt2") {
    v.kind = TokenizerKind::BPE;
  } else {
    return make_error("tokenizer: unsupported tokenizer model '%s' (supported: 'llama' = SentencePiece BPE, "
                      "'gpt2' = byte-level BPE)", model->c_str());
  }

  const auto* tokens = g.get_str_array("tokenizer.ggml.tokens");
  if (!tokens || tokens->empty()) return make_error("tokenizer: GGUF has no tokenizer.ggml.tokens string array");
  const size_t n = tokens->size();
  v.tokens = *tokens;

  if (g.find("tokenizer.ggml.scores")) {
    const auto* scores = g.get_float_array("tokenizer.ggml.scores");
    if (!scores || scores->size() != n)
      return make_error("tokenizer: tokenizer.ggml.scores must be a float array of %zu elements", n);
    v.scores.reserve(n);
    for (double s : *scores) v.scores.push_back(std::isfinite(s) ? static_cast<float>(s) : -1e30f);
  }
  if (g.find("tokenizer.ggml.token_type")) {
    const auto* types = g.get_int_array("tokenizer.ggml.token_type");
    if (!types || types->size() != n)
      return make_error("tokenizer: tokenizer.ggml.token_type must be an integer array of %zu elements", n);
    v.types.reserve(n);
    for (int64_t t : *types) v.types.push_back(t >= 0 && t <= 6 ? static_cast<TokenType>(t) : TokenType::UNDEFINED);
  }
  if (v.kind == TokenizerKind::BPE) {
    const auto* merges = g.get_str_array("tokenizer.ggml.merges");
    if (!merges) return make_error("tokenizer: byte-level BPE GGUF has no tokenizer.ggml.merges string array");
    v.merges = *merges;
    if (auto pre = g.get_string("tokenizer.ggml.pre")) v.pre = *pre;
    bool known = true;
    tok::pre_regexes(v.pre, &known);
    if (!known)
      std::fprintf(stderr, "larder: unknown pre-tokenizer '%s', using gpt-2's regex\n", v.pre.c_str());
  }

  // Defaults as in llama.cpp: SPM has <unk>=0 <s>=1 </s>=2 and adds BOS; BPE adds BOS
  // only for pre-tokenizers whose models expect it, unless the file says otherwise.
  if (v.kind == TokenizerKind::SPM) {
    v.unk = n > 0 ? 0 : -1;
    v.bos = n > 1 ? 1 : -1;
    v.eos = n > 2 ? 2 : -1;
    v.add_bos = true;
    v.add_space_prefix = true;
  } else {
    v.add_bos = v.pre == "llama3" || v.pre == "llama-v3" || v.pre == "llama-bpe" || v.pre == "falcon3" ||
                v.pre == "tekken" || v.pre == "chameleon";
    v.add_space_prefix = false;
  }
  v.add_eos = false;
  auto read_id = [&](const char* key, int32_t& id) {
    const auto x = g.get_int(key);
    if (!x) return;
    if (*x == -1 || *x == 0xFFFFFFFFll) {
      id = -1;
    } else if (*x >= 0 && *x < static_cast<int64_t>(n)) {
      id = static_cast<int32_t>(*x);
    } else {
      std::fprintf(stderr, "larder: ignoring out-of-range %s = %lld\n", key, static_cast<long long>(*x));
    }
  };
  read_id("tokenizer.ggml.bos_token_id", v.bos);
  read_id("tokenizer.ggml.eos_token_id", v.eos);
  read_id("tokenizer.ggml.unknown_token_id", v.unk);
  read_id("tokenizer.ggml.padding_token_id", v.pad);
  read_id("tokenizer.ggml.eot_token_id", v.eot);
  if (auto b = g.get_bool("tokenizer.ggml.add_bos_token")) v.add_bos = *b;
  if (auto b = g.get_bool("tokenizer.ggml.add_eos_token")) v.add_eos = *b;
  if (auto b = g.get_bool("tokenizer.ggml.add_space_prefix")) v.add_space_prefix = *b;

  if (v.eot < 0) {
    // Like llama.cpp: recognise end-of-turn tokens by their text.
    for (const char* t : {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
                          "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"}) {
      for (size_t id = 0; id < n && v.eot < 0; ++id) {
        if (v.tokens[id] == t) v.eot = static_cast<int32_t>(id);
      }
      if (v.eot >= 0) break;
    }
  }

  tok::SpmOptions opt;
  if (auto b = g.get_bool("tokenizer.ggml.remove_extra_whitespaces")) opt.remove_extra_whitespaces = *b;
  if (v.kind == TokenizerKind::SPM) return tok::make_spm(std::move(v), opt);
  return tok::make_bpe(std::move(v));
}

}  // namespace larder
