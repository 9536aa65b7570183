#pragma once
#include "http/http.h"
#include "cli/options.h"
#include <csignal>
#include <utility>

#include "core/result.h"
#include "engine/sampler.h"
#include "model/dtype.h"
#include "model/model.h"
#include "offload/offload.h"

namespace larder::cli {
int cmd_run(Args& a);
int cmd_chat(Args& a);        // src/cli/chat.cpp
int cmd_info(Args& a);
int cmd_tokenize(Args& a);
int cmd_synth(Args& a);
int cmd_logits(Args& a);
int cmd_docs(Args& a);        // src/cli/docs.cpp
// src/cli/offload.cpp: FFN sparsity and SSD offload.
int cmd_offload_prepare(Args& a);
int cmd_calibrate_sparsity(Args& a);
// Whether the FFN options ask for a sparse / offloaded FFN, and whether its up/down weights stay
// on disk (then load the model with ffn_on_disk).
bool ffn_wanted(const Args& a);
bool ffn_on_disk(const Args& a);
// The sparse FFN the options describe for this model (nullptr when none is asked for).
Result<std::shared_ptr<offload::SparseFfn>> open_ffn(const Args& a, const Model& m);
// One line of the FFN's figures per token (I/O wait, cache, compute, bytes, active, hit rate).
std::string ffn_report(const offload::SparseFfn& f);
// The model of -m (or the positional file), and a comma/space-separated id list.
Result<std::unique_ptr<Model>> open_model(const Args& a);
Result<std::vector<int32_t>> parse_ids(const std::string& s);
int cmd_bench(Args& a);
// A comma-separated list's non-empty items (bench.cpp).
std::vector<std::string> split(const std::string& s);
// bench --spec-prompts / --spec-replay (spec_bench.cpp)
int bench_spec(Args& a);
int cmd_quantize(Args& a);    // src/cli/quantize.cpp
int cmd_perplexity(Args& a);  // src/cli/perplexity.cpp
int cmd_serve(Args& a);       // src/cli/serve.cpp
// "512M", "1G", "64MiB", "1048576" -> bytes (binary units); -1 when malformed (serve, calibrate).
int64_t parse_size(const std::string& s);
int cmd_router(Args& a);      // src/cli/router.cpp
int cmd_conductor(Args& a);   // src/cli/conductor.cpp
int cmd_replay(Args& a);      // src/cli/replay.cpp
int cmd_kv(Args& a);          // src/cli/kv.cpp
int cmd_simulate(Args& a);    // src/cli/simulate.cpp
int cmd_calibrate(Args& a);   // src/cli/calibrate.cpp
// The sampling flags of run/chat as sampler settings (a negative seed = random).
SamplerParams sampler_params(const Args& a);
// The -ctk/-ctv values (a bad one: an error naming the flag and the valid types).
Result<std::pair<DType, DType>> cache_types(const Args& a);
// Blocks SIGINT and SIGTERM in this thread (and the threads it starts after), for sigwait, and ignores
// SIGPIPE (a client gone mid-write): the long-running commands (serve, router). Returns the set.
sigset_t block_stop_signals();
// The HTTP layer's deadlines and connection limits from --timeout*, --max-connections* (serve,
// router, conductor); host, port and threads are set by each command.
Result<http::ServerOptions> http_options(const Args& a);
// Prints "larder: error: <msg>" on one line and returns 1.
int fail(const std::string& msg);
}  // namespace larder::cli
