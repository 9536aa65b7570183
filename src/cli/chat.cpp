// `larder chat`: an interactive chat in the terminal.
//
// Each turn renders the whole conversation with the model's chat template (src/chat; the
// built-in one for its architecture when the file has none), tokenizes it with special
// tokens parsed, keeps the longest common token prefix with what the context's KV already
// holds (Context::truncate) and prefills only the rest: the previous turns' prompt and reply
// are not recomputed. The reply streams to stdout as whole UTF-8 characters and ends at the
// model's end-of-turn token (EOS, EOT, or a template's marker such as <|im_end|> or
// <end_of_turn>), at -n tokens or when the context is full.
//
// Input: one message a line (a terminal's line editing, or a pipe: tests feed turns that
// way). /reset clears the history (the system prompt stays) and the KV; /exit, /quit or EOF
// quits. Ctrl-C while a reply is being computed stops it (the partial reply stays in the
// history) and returns to the prompt; Ctrl-C at the prompt, or a second one before the first
// was handled, quits.
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "chat/chat_template.h"
#include "cli/commands.h"
#include "core/mmap_file.h"
#include "engine/context.h"
#include "engine/sampler.h"
#include "kernels/kernels.h"
#include "model/gguf.h"
#include "model/model.h"

namespace larder::cli {

namespace {

using Clock = std::chrono::steady_clock;
using ojson = nlohmann::ordered_json;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

volatile std::sig_atomic_t g_sigint = 0;
// Self-pipe: the handler writes a byte, so a Ctrl-C that lands between printing the prompt and
// the wait for input still wakes the wait (an EINTR alone would be missed there).
int g_sigpipe[2] = {-1, -1};

void on_sigint(int) {
  if (g_sigint) {  // a second Ctrl-C before the first was handled: quit now
    const char nl = '\n';
    ssize_t r = ::write(STDERR_FILENO, &nl, 1);
    (void)r;
    ::_exit(130);
  }
  g_sigint = 1;
  if (g_sigpipe[1] >= 0) {
    const char c = 1;
    ssize_t r = ::write(g_sigpipe[1], &c, 1);
    (void)r;
  }
}

// Lines from fd 0 with read(2), waiting in poll(2) on stdin and the signal pipe, so that a
// Ctrl-C interrupts the wait for input instead of being retried by stdio.
class LineReader {
 public:
  enum Kind { Line, Eof, Interrupted };
  Kind next(std::string& line) {
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        if (!line.empty() && line.back() == '\r') line.pop_back();
        return Line;
      }
      if (eof_) {
        if (buf_.empty()) return Eof;
        line = std::move(buf_);
        buf_.clear();
        return Line;
      }
      if (g_sigint) return Interrupted;
      pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {g_sigpipe[0], POLLIN, 0}};
      const int pr = ::poll(fds, g_sigpipe[0] >= 0 ? 2 : 1, -1);
      if (pr < 0) {
        if (errno == EINTR) continue;  // g_sigint is checked at the top
        eof_ = true;
        continue;
      }
      if (g_sigpipe[0] >= 0 && (fds[1].revents & POLLIN)) {
        char drain[64];
        while (::read(g_sigpipe[0], drain, sizeof drain) > 0) {
        }
        continue;  // stale bytes from Ctrl-Cs during a reply are dropped; a new one sets g_sigint
      }
      if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char tmp[4096];
      ssize_t n = ::read(STDIN_FILENO, tmp, sizeof tmp);
      if (n > 0) buf_.append(tmp, static_cast<size_t>(n));
      else if (n == 0) eof_ = true;
      else if (errno != EINTR && errno != EAGAIN) eof_ = true;  // unreadable input ends the session like EOF
    }
  }

 private:
  std::string buf_;
  bool eof_ = false;
};

// Tokens that end a reply: the vocabulary's EOS/EOT and the end-of-turn markers of the common
// templates, where the vocabulary has them as control (or user-defined) tokens.
std::vector<char> stop_tokens(const Tokenizer& tok) {
  const Vocab& v = tok.vocab();
  std::vector<char> stop(static_cast<size_t>(tok.n_vocab()), 0);
  static const char* const kMarkers[] = {"<|im_end|>",    "<end_of_turn>", "<|eot_id|>", "<|eom_id|>",
                                         "<|end|>",       "<|endoftext|>", "<|end_of_text|>", "<eos>"};
  for (int32_t id = 0; id < tok.n_vocab(); ++id) {
    if (tok.is_eog(id)) {
      stop[id] = 1;
      continue;
    }
    const TokenType t = static_cast<size_t>(id) < v.types.size() ? v.types[id] : TokenType::NORMAL;
    if (t != TokenType::CONTROL && t != TokenType::USER_DEFINED) continue;
    for (const char* m : kMarkers)
      if (v.tokens[id] == m) stop[id] = 1;
  }
  return stop;
}

Result<ChatTemplate> template_from_option(const std::string& opt) {
  std::string src = builtin_chat_template_source(opt);
  if (src.empty()) {
    if (!file_exists(opt) || is_directory(opt))
      return make_error("--chat-template: '%s' is neither a built-in template (chatml, gemma) nor a file", opt.c_str());
    LARDER_TRY(text, read_file(opt));
    src = std::move(text);
  }
  auto t = ChatTemplate::parse(src);
  if (!t.ok()) return Error{opt + ": " + t.error()};
  return t;
}

struct Totals {
  int turns = 0;
  int64_t prompt = 0, reused = 0, prefilled = 0, generated = 0;
  double t_prefill = 0, t_gen = 0;
};

}  // namespace

int cmd_chat(Args& a) {
  if (a.model.empty()) return fail("no model given (use -m PATH or set LARDER_MODEL)");
  if (a.n_ctx < 0 || a.n_threads < 0 || a.n_batch <= 0) return fail("context size, threads and batch size must be positive");
  auto kvt = cache_types(a);
  if (!kvt.ok()) return fail(kvt.error());
  auto t_load0 = Clock::now();
  auto mr = load_model(a.model, a.tokenizer, !a.no_repack, ffn_on_disk(a));
  if (!mr.ok()) return fail(mr.error());
  Model& m = **mr;
  const Tokenizer& tok = *m.tokenizer;

  ChatTemplate tmpl;
  std::string tmpl_name;
  if (!a.chat_template.empty()) {
    auto t = template_from_option(a.chat_template);
    if (!t.ok()) return fail(t.error());
    tmpl = std::move(t).value();
    tmpl_name = a.chat_template;
  } else {
    std::optional<std::string> meta;
    if (m.gguf) meta = m.gguf->get_string("tokenizer.chat_template");
    auto t = model_chat_template(meta, m.cfg.arch);
    if (!t.ok()) return fail(t.error());
    if (!t->note.empty()) std::fprintf(stderr, "larder chat: %s\n", t->note.c_str());
    tmpl = std::move(t->tmpl);
    tmpl_name = t->builtin ? "built-in " + t->name : t->name;
  }

  ContextParams cp;
  cp.n_ctx = a.n_ctx;
  cp.n_threads = a.n_threads;
  cp.n_batch = a.n_batch;
  cp.w8a8 = a.w8a8;
  cp.type_k = kvt->first;
  cp.type_v = kvt->second;
  auto ffn = open_ffn(a, m);
  if (!ffn.ok()) return fail(ffn.error());
  cp.ffn = *ffn;
  auto cr = Context::create(m, cp);
  if (!cr.ok()) return fail(cr.error());
  Context& ctx = **cr;
  Sampler sampler(sampler_params(a), ctx.n_vocab());
  const std::vector<char> stop = stop_tokens(tok);

  const Vocab& v = tok.vocab();
  ojson extra = ojson::object();
  const std::string bos = v.bos >= 0 && v.bos < tok.n_vocab() ? v.tokens[v.bos] : "";
  extra["bos_token"] = bos;
  extra["eos_token"] = v.eos >= 0 && v.eos < tok.n_vocab() ? v.tokens[v.eos] : "";

  const bool tty = ::isatty(STDIN_FILENO) != 0;
  std::fprintf(stderr, "larder chat: model %s (%s, %d layers), chat template %s, %d threads, ctx %d, isa %s, load %.2f s\n",
               m.path.c_str(), m.cfg.arch.c_str(), m.cfg.n_layer, tmpl_name.c_str(), ctx.n_threads(), ctx.n_ctx(),
               kernels::active_isa_name(), secs(t_load0, Clock::now()));
  if (tty) std::fprintf(stderr, "larder chat: /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply\n");

  if (g_sigpipe[0] < 0 && ::pipe2(g_sigpipe, O_NONBLOCK | O_CLOEXEC) != 0) g_sigpipe[0] = g_sigpipe[1] = -1;
  struct sigaction sa = {};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a Ctrl-C must interrupt the read at the prompt
  sigaction(SIGINT, &sa, nullptr);

  ojson base = ojson::array();
  if (!a.system_prompt.empty()) base.push_back({{"role", "system"}, {"content", a.system_prompt}});
  ojson messages = base;
  std::vector<int32_t> kv;  // the tokens whose K/V the context holds, in order (kv.size() == ctx.n_past())
  Totals tot;
  LineReader reader;
  const int limit = a.chat_n_predict < 0 ? INT32_MAX : a.chat_n_predict;
  int rc = 0;

  for (;;) {
    if (tty) {
      std::fputs("> ", stdout);
      std::fflush(stdout);
    }
    std::string line;
    LineReader::Kind k = reader.next(line);
    if (k != LineReader::Line) {
      if (tty) std::fputc('\n', stdout);
      break;
    }
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      messages = base;
      ctx.reset();
      kv.clear();
      std::fprintf(stderr, "larder chat: history cleared\n");
      continue;
    }
    if (line.find_first_not_of(" \t") == std::string::npos) continue;

    messages.push_back({{"role", "user"}, {"content", line}});
    auto text = tmpl.apply(messages, /*add_generation_prompt=*/true, extra);
    if (!text.ok()) {
      messages.erase(messages.size() - 1);
      std::fprintf(stderr, "larder: error: %s\n", text.error().c_str());
      continue;
    }
    // Templates usually write the BOS text themselves; add the token only when they don't.
    const bool has_bos_text = !bos.empty() && text->rfind(bos, 0) == 0;
    std::vector<int32_t> toks = tok.encode(*text, /*add_bos=*/!has_bos_text, /*parse_special=*/true);
    if (toks.empty() || static_cast<int>(toks.size()) >= ctx.n_ctx()) {
      messages.erase(messages.size() - 1);
      std::fprintf(stderr,
                   "larder: error: the conversation is %zu tokens, which does not fit the context of %d tokens "
                   "(/reset to start over, or a larger -c)\n",
                   toks.size(), ctx.n_ctx());
      continue;
    }
    // Keep the longest common prefix with the KV; at least the last token is decoded for its logits.
    size_t keep = 0;
    while (keep < kv.size() && keep < toks.size() && kv[keep] == toks[keep]) ++keep;
    if (keep == toks.size()) --keep;
    ctx.truncate(static_cast<int>(keep));
    kv.resize(keep);
    auto t0 = Clock::now();
    Status st = ctx.decode(std::span<const int32_t>(toks.data() + keep, toks.size() - keep));
    if (!st.ok()) {
      rc = fail(st.error());
      break;
    }
    kv = toks;
    auto t1 = Clock::now();

    StreamDecoder dec(tok, /*strip_first_space=*/true);
    std::string reply;
    int n_gen = 0;
    bool interrupted = false, full = false;
    while (n_gen < limit) {
      if (g_sigint) {
        interrupted = true;
        break;
      }
      const int32_t next = sampler.sample(ctx.logits(), kv);
      if (stop[next]) break;
      ++n_gen;
      std::string piece = dec.push(next);
      if (!piece.empty()) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
        reply += piece;
      }
      if (n_gen == limit) break;
      if (ctx.n_past() >= ctx.n_ctx()) {
        full = true;
        break;
      }
      const int32_t one[1] = {next};
      st = ctx.decode(one);
      if (!st.ok()) break;
      kv.push_back(next);
    }
    // A Ctrl-C until here stopped (or came too late for) this reply; one from now on is at the
    // prompt and quits (cleared at the next prompt instead, one sent as the turn's stats print was lost).
    g_sigint = 0;
    std::string rest = dec.flush();
    reply += rest;
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
    if (!st.ok()) {
      rc = fail(st.error());
      break;
    }
    auto t2 = Clock::now();
    messages.push_back({{"role", "assistant"}, {"content", reply}});

    const size_t prefilled = toks.size() - keep;
    const double pp = secs(t0, t1), tg = secs(t1, t2);
    ++tot.turns;
    tot.prompt += static_cast<int64_t>(toks.size());
    tot.reused += static_cast<int64_t>(keep);
    tot.prefilled += static_cast<int64_t>(prefilled);
    tot.generated += n_gen;
    tot.t_prefill += pp;
    tot.t_gen += tg;
    if (interrupted) std::fprintf(stderr, "larder chat: reply interrupted\n");
    if (full)
      std::fprintf(stderr, "larder chat: the context is full (%d tokens); /reset to start over\n", ctx.n_ctx());
    if (a.verbose)
      std::fprintf(stderr,
                   "larder chat: turn %d: prompt %zu tokens, %zu reused, %zu prefilled in %.3f s (%.2f tok/s); "
                   "reply %d tokens in %.3f s (%.2f tok/s)%s\n",
                   tot.turns, toks.size(), keep, prefilled, pp, prefilled / std::max(pp, 1e-9), n_gen, tg,
                   n_gen / std::max(tg, 1e-9), interrupted ? ", interrupted" : "");
  }

  std::signal(SIGINT, SIG_DFL);
  std::fprintf(stderr,
               "larder chat: %d turn%s; prompt %lld tokens (%lld reused from the KV cache, %lld prefilled, %.2f tok/s); "
               "generation %lld tokens (%.2f tok/s)\n",
               tot.turns, tot.turns == 1 ? "" : "s", static_cast<long long>(tot.prompt), static_cast<long long>(tot.reused),
               static_cast<long long>(tot.prefilled), tot.prefilled / std::max(tot.t_prefill, 1e-9),
               static_cast<long long>(tot.generated), tot.generated / std::max(tot.t_gen, 1e-9));
  return rc;
}

}  // namespace larder::cli
