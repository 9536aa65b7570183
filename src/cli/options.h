// The CLI's one declarative option table: flag, env var, default, help, and which
// subcommands take it. Flags and env vars follow llama.cpp where they overlap.
#pragma once
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

namespace larder::cli {

struct Args {
  std::string model;
  std::string tokenizer;
  std::string prompt;
  std::string file;          // -f prompt file
  int n_predict = 128;
  int n_ctx = 0;
  int n_threads = 0;
  int n_batch = 512;
  float temp = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repeat_penalty = 1.0f;
  int repeat_last_n = 64;
  float freq_penalty = 0.0f;
  float presence_penalty = 0.0f;
  int64_t seed = -1;
  bool ignore_eos = false;
  bool w8a8 = false;
  bool no_repack = false;
  bool no_display_prompt = false;
  std::string cache_type_k = "f16";  // KV cache types (bench: comma-separated lists)
  std::string cache_type_v = "f16";
  // chat
  int chat_n_predict = -1;
  std::string system_prompt;
  std::string chat_template;  // Jinja file or built-in name
  bool verbose = false;
  // tokenize
  bool ids_only = false;
  bool no_bos = false;
  bool parse_special = false;
  std::string json_batch;
  bool decode = false;
  // logits
  std::string ids;
  std::string out;
  int chunk = 0;
  int greedy = 0;
  // synth
  std::string shape;
  std::string dtype = "f32";
  double scale = 1.0;
  std::string arch = "llama";
  int n_embd = 128, n_ff = 320, n_layer = 2, n_head = 8, n_head_kv = 8, n_vocab = 512, n_ctx_train = 256;
  int tied = 0;
  bool llama3_rope = false;
  std::string vocab_from;
  // docs (per-document KV)
  std::string doc_mode = "focus";
  float ape_t = 0.8f, ape_s = 1.0f, blend_ratio = 0.15f, focus_budget = 0.2f;
  int blend_layers = 2, link_k = 16, focus_k = 0, focus_rounds = 1;
  std::string tokens_json, dump, doc_cases, doc_methods;
  int doc_limit = 0, doc_gen = 8;
  // bench
  std::string bench_models;
  std::string bench_prompt = "512";
  std::string bench_gen = "128";
  std::string bench_depth = "0";
  std::string bench_threads = "2";
  int reps = 5;
  std::string out_format = "md";
  // perplexity
  std::string kl_base;
  std::string kl_base_cache_type;  // the base run's K and V cache type ("" = the model's)
  bool json = false;
  // quantize (positional: IN OUT TYPE)
  std::vector<std::string> quant_args;
  // serve
  std::string host = "127.0.0.1";
  int port = 8080;
  int parallel = 4;
  int kv_blocks = 0;
  std::string kv_mem;
  int queue = 64;
  std::string api_key;
  std::string alias;
  int prompt_cache = 256;
  bool prompt_cache_strict = false;
  // HTTP layer (serve, router, conductor)
  int threads_http = 0;               // handler threads (0: serve sizes it from --parallel and --queue)
  double timeout_keep_alive = 30;     // seconds an idle connection waits for its next request
  double timeout_header = 10;         // seconds from a request's first byte to the end of its header
  double timeout_body = 60;           // seconds for the body after the header
  double timeout_write = 60;          // seconds a write to a client may take (--timeout)
  int max_connections = 0;            // 0: from the open-files limit
  int max_connections_per_client = 1024;
  // cluster (serve, router): P/D disaggregation
  std::string role = "both";          // prefill | decode | both
  std::string cluster;                // etcd://HOST:PORT[,HOST:PORT] ("" = no membership)
  std::string cluster_name = "default";
  int cluster_ttl = 10;               // etcd lease TTL, seconds
  std::string advertise_host;         // address peers and the router use ("" = --host, or this host's name)
  int transfer_port = 0;              // KV transfer listener (0 = any free port)
  double pd_timeout = 120;            // a handoff's deadline, seconds (decode side)
  double pd_lease = 30;               // prefill keeps a handed-off copy until acknowledged or this long
  std::string pd_fallback = "local";  // decode when prefill fails: local (recompute) | error (5xx)
  int pd_local_prefill = 64;          // decode computes prompts with at most this many uncached tokens itself
  std::string prefill_urls;           // router: static prefill instances (host:port,...)
  std::string decode_urls;            // router: static decode instances
  // conductor (and the simulator's policies)
  std::string policy = "conductor";   // random | round-robin | least-load | cache-aware | conductor
  double ttft_slo = 0;                // ms (0 = none)
  double tbt_slo = 0;                 // ms (0 = none)
  double ramp_s = 10;                 // a (re)started instance reaches its full share after this long
  bool no_failover = false;
  double transfer_gbps = 1.0;         // KV transfer bandwidth between instances assumed by the policy
  // speculative decoding
  std::string spec;          // ngram[:N] | suffix | draft:FILE | self:skip=A-B | self:keep=K (bench: comma list, "none" = plain)
  int spec_max = 8;          // draft nodes per verify pass (upper bound; adaptive below it)
  bool spec_tree = false;    // several candidates per pass (tree attention)
  bool spec_fixed = false;   // always draft spec_max (no adaptive length)
  std::string spec_prompts;  // bench: JSONL of {"category", "prompt"} to generate from
  std::string spec_replay;   // bench: traces of (draft nodes, accepted) per pass to time on this model
  int kv_events_port = -1;            // serve: KV events PUB port (-1: on with --cluster, any port; 0 any)
  // tiered KV store (serve, kv)
  std::string kv_dram;          // L2 DRAM tier size ("" = off)
  bool kv_dram_q8 = false;      // L2 holds blocks as 8-bit (twice as many)
  std::string kv_disk;          // L3 SSD tier directory ("" = off)
  std::string kv_disk_size = "16G";
  std::string kv_policy = "lru";  // lru | lfu (eviction in L2/L3)
  bool kv_no_load_decision = false;  // always load from tiers (no load-vs-recompute check)
  std::string kv_dir;           // kv stats|verify|clear --dir
  // replay
  std::string trace;
  int replay_scale = 16;
  double replay_speed = 1.0;
  int replay_skip = 0;          // replay/simulate: start after this many requests of the trace
  int replay_limit = 0;
  std::string url = "http://127.0.0.1:8080";
  int replay_vocab = 0;            // token ids drawn from [3, N) (0 = ask the server)
  std::string replay_dump;         // --dump-prompts FILE (JSONL, one request a line)
  // simulate (also --trace --scale --speed --limit --json --pd-local-prefill --policy --ttft-slo --tbt-slo)
  std::string instances = "8";     // N (colocated) or P,D
  std::string calibration;
  int64_t sim_seed = 1;
  // calibrate (also -m -t -c --parallel --kv-blocks -o; --dram-bytes/--disk-dir/--disk-bytes fill kv_dram/kv_disk/kv_disk_size)
  double calib_transfer_gbps = 0.36;  // GB/s between instances (docs/BENCHMARKS.md, P/D: TCP, 4-16 KiB ops)
  double calib_transfer_latency_ms = 2;
  // FFN sparsity and SSD offload (run, chat, logits, perplexity, bench, serve)
  std::string ffn_offload;          // prepared layout directory
  std::string weights_budget;       // --weights-dram-budget SIZE
  double ffn_sparsity = -1;         // -1: no sparse FFN unless --ffn-offload; 0: dense through it
  std::string ffn_thresholds;
  int ffn_window = 5;
  int ffn_io_threads = 16;
  bool ffn_naive = false;
  bool ffn_no_direct = false;
  bool ffn_prefetch = false;
  std::string down_type = "auto";   // offload-prepare (and the in-memory records)
  std::vector<std::string> pos_args;  // offload-prepare MODEL DIR, calibrate-sparsity MODEL TEXT
  // positional
  std::string positional;
};

struct OptSpec {
  const char* cmds;   // comma-separated subcommands that accept it
  const char* flags;  // CLI11 flag names; a single-dash name longer than one letter (llama.cpp's -sys)
                      // is accepted as a spelling of the option's first long name
  const char* env;    // environment variable ("" = none)
  const char* help;
  std::variant<std::string*, int*, float*, double*, int64_t*, bool*> target;
};

std::vector<OptSpec> option_table(Args& a);

}  // namespace larder::cli
