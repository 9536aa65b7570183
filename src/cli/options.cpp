#include "cli/options.h"

namespace larder::cli {

std::vector<OptSpec> option_table(Args& a) {
  return {
      {"run,logits,info,tokenize", "-m,--model", "LARDER_MODEL", "model: GGUF file, llama2.c .bin, or Hugging Face folder", &a.model},
      {"run,logits,tokenize", "--tokenizer", "LARDER_TOKENIZER", "tokenizer file for llama2.c checkpoints (default: tokenizer.bin beside the model)", &a.tokenizer},
      {"run", "-p,--prompt", "", "prompt text", &a.prompt},
      {"run", "-f,--file", "", "read the prompt from a file", &a.file},
      {"run", "-n,--n-predict", "LARDER_N_PREDICT", "number of tokens to generate (-1 = until EOS or context end)", &a.n_predict},
      {"run,logits", "-c,--ctx-size", "LARDER_CTX_SIZE", "context size in tokens (0 = model's, capped at 4096)", &a.n_ctx},
      {"run,logits", "-t,--threads", "LARDER_THREADS", "threads (0 = all cores)", &a.n_threads},
      {"run,logits", "-b,--batch-size", "LARDER_BATCH_SIZE", "max tokens per forward pass", &a.n_batch},
      {"run", "--temp", "", "temperature (0 = greedy)", &a.temp},
      {"run", "--top-k", "", "top-k sampling (0 = off)", &a.top_k},
      {"run", "--top-p", "", "top-p sampling (1 = off)", &a.top_p},
      {"run", "--min-p", "", "min-p sampling (0 = off)", &a.min_p},
      {"run", "--repeat-penalty", "", "repetition penalty (1 = off)", &a.repeat_penalty},
      {"run", "--repeat-last-n", "", "tokens considered by the penalties", &a.repeat_last_n},
      {"run", "--frequency-penalty", "", "frequency penalty (0 = off)", &a.freq_penalty},
      {"run", "--presence-penalty", "", "presence penalty (0 = off)", &a.presence_penalty},
      {"run,synth", "-s,--seed", "LARDER_SEED", "random seed (-1 = random)", &a.seed},
      {"run", "--ignore-eos", "", "keep generating after end-of-sequence", &a.ignore_eos},
      {"run", "--no-display-prompt", "", "don't echo the prompt", &a.no_display_prompt},
      {"tokenize", "--ids", "", "print only the ids, as one list like [15043, 29892]", &a.ids_only},
      {"tokenize", "--no-bos", "", "don't add the BOS token", &a.no_bos},
      {"tokenize", "--parse-special", "", "recognise special-token text such as <|eot_id|>", &a.parse_special},
      {"tokenize", "--json-batch", "", "JSON file with an array of strings; prints an array of id lists", &a.json_batch},
      {"logits", "--ids", "", "comma-separated input token ids", &a.ids},
      {"logits", "-o,--output", "", "write float32 logits [n_ids x n_vocab] to this file", &a.out},
      {"logits", "--chunk", "", "feed the input in chunks of this many tokens (0 = all at once)", &a.chunk},
      {"logits", "--greedy", "", "print a JSON array of this many greedy continuation ids", &a.greedy},
      {"synth", "--shape", "", "stories15M | stories42M | stories110M | llama-3.2-1b | qwen2.5-0.5b | custom", &a.shape},
      {"synth", "--dtype", "", "type of 2-D weights: f32 f16 bf16 q8_0 q4_0", &a.dtype},
      {"synth", "-o,--output", "", "output GGUF path", &a.out},
      {"synth", "--scale", "", "multiply the init std (larger = more peaked outputs)", &a.scale},
      {"synth", "--arch", "", "custom: llama | qwen2", &a.arch},
      {"synth", "--n-embd", "", "custom: model width", &a.n_embd},
      {"synth", "--n-ff", "", "custom: FFN width", &a.n_ff},
      {"synth", "--n-layer", "", "custom: layers", &a.n_layer},
      {"synth", "--n-head", "", "custom: attention heads", &a.n_head},
      {"synth", "--n-head-kv", "", "custom: KV heads", &a.n_head_kv},
      {"synth", "--n-vocab", "", "custom: vocabulary size", &a.n_vocab},
      {"synth", "--n-ctx", "", "custom: training context", &a.n_ctx_train},
      {"synth", "--tied", "", "custom: 1 = output shares the embedding", &a.tied},
      {"synth", "--llama3-rope", "", "custom: add llama3 RoPE scaling (rope_freqs.weight)", &a.llama3_rope},
      {"synth", "--vocab-from", "", "copy the tokenizer from this GGUF (vocab size must match)", &a.vocab_from},
  };
}

}  // namespace larder::cli
