// `larder serve`: an OpenAI-compatible HTTP server over the continuous-batching
// Scheduler (larder_http: event-driven connections, handlers on a worker pool).
//
// Endpoints
//   POST /v1/completions        prompt: string | [token ids] | [string] | [[token ids]]
//   POST /v1/chat/completions   messages -> chat template (GGUF tokenizer.chat_template) -> tokens
//   GET  /v1/models, /v1/models/{id}
//   GET  /health                200 {"status":"ok"}; 503 {"status":"loading"|"draining"}
//   GET  /metrics               Prometheus text format (see metrics.h)
//   POST /internal/pd/{prefill,ack,cancel}   the P/D handoff between instances (src/pd/pd.h)
// (/completions, /chat/completions and /models are accepted without the /v1 prefix, as llama.cpp does.)
//
// Multi-turn reuse: a finished request's prompt + generated token ids are kept with the
// text they stand for (prompt_cache.h); a later prompt that starts with that text (the
// conversation resent with the reply) reuses those ids, and so their KV blocks, instead of
// a re-tokenization of the reply that need not match what was generated.
//
// Models without a chat template (e.g. stories260K) use the built-in one for their
// architecture (model_chat_template in src/chat: Gemma's for gemma*, ChatML otherwise),
// the same that `larder chat` uses.
//
// The vendor field "larder" (openai_api.h LarderExt) serves a conductor in front of several
// instances: the prompt as token ids, token ids and text byte counts in every chunk, and the
// resumption of a reply another instance began (failover).
//
// The `model` field may be omitted; when given it must be the served id (the file
// name without extension, or --alias), the file name, the path given to -m, or the
// model's general.name; anything else is 404 model_not_found.
//
// Lifecycle: start() binds and answers /health with 503 "loading"; attach() makes it
// ready; begin_drain() answers 503 to new work while in-flight requests finish;
// wait_idle() returns when none is left; stop() closes the listener.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"
#include "http/http.h"

namespace larder {
class Scheduler;
struct Model;
}  // namespace larder
namespace larder::pd {
class PdNode;
}

namespace larder::server {

struct ServerParams {
  std::string host = "127.0.0.1";
  int port = 8080;                     // 0: any free port (see port())
  std::string api_key;                 // non-empty: /v1/* need "Authorization: Bearer KEY"
  std::string model_path;              // as given to -m (the default id and aliases derive from it)
  std::string alias;                   // served model id (default: file name without extension)
  size_t max_body_bytes = 8u << 20;    // larger request bodies get 413
  int http_threads = 0;                // handler threads; 0: parallel + queue + 32 (at least 64)
  // Deadlines and connection limits of the HTTP layer (host, port, body size and threads are
  // taken from the fields here).
  http::ServerOptions http_opts;
  int parallel = 4;                    // only used to size the HTTP thread pool
  int max_queue = 64;                  // ditto
  // Token-level reuse of finished requests' prompt + reply ids (multi-turn chat; see
  // prompt_cache.h): how many to keep, LRU (0: off, every prompt is tokenized afresh).
  size_t prompt_cache_entries = 256;
  // ... and let a reply sent back verbatim stand for the ids generated for it even where
  // they do not decode to its text (invalid UTF-8, control tokens, the template's space):
  // the model then sees its earlier turn as it produced it. On by default (a client cannot
  // send back bytes that were not valid text); --prompt-cache-strict turns it off.
  bool prompt_cache_echo = true;
  // Where /v1/documents keeps document texts across restarts (DIR/documents; serve passes its
  // --kv-disk directory); empty: in memory only.
  std::string documents_dir;
};

class Server {
 public:
  explicit Server(ServerParams p);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port and starts serving on a background thread (health: 503 loading).
  Status start();
  int port() const;
  // Makes generation endpoints live. model and sched must outlive stop().
  void attach(const Model& model, Scheduler& sched);
  // P/D disaggregation: serves /internal/pd/* and runs a request whose header
  // X-Larder-Prefill names a prefill instance as a handoff. pd must outlive stop().
  void attach_pd(pd::PdNode* pd);
  // Appends lines to /metrics (cluster membership, role).
  void set_metrics_extra(std::function<void(std::string&)> f);
  // New generation requests get 503 and /health 503 "draining"; in-flight ones go on.
  void begin_drain();
  // Requests still being generated or written (streams included).
  int active() const;
  // Cancels every in-flight request (a second SIGTERM while draining).
  void cancel_all();
  // Closes the listener and joins the HTTP threads.
  void stop();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace larder::server
