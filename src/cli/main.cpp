// `larder` — thin front end over the library modules.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>
#include <sstream>

#include "cli/commands.h"
#include "cli/options.h"

using namespace larder;
using namespace larder::cli;

namespace {

// CLI11 takes single-letter short names only; llama.cpp's multi-letter single-dash names
// (-sys) are rewritten to the option's first long name before parsing.
using DashAliases = std::map<std::string, std::string>;

std::string cli11_flags(const char* flags, DashAliases& aliases, std::vector<std::string>& multi) {
  std::vector<std::string> names;
  std::stringstream ss(flags);
  for (std::string n; std::getline(ss, n, ',');) (n.size() > 2 && n[0] == '-' && n[1] != '-' ? multi : names).push_back(n);
  std::string out, long_name;
  for (const auto& n : names) {
    out += (out.empty() ? "" : ",") + n;
    if (long_name.empty() && n.rfind("--", 0) == 0) long_name = n;
  }
  for (const auto& m : multi) aliases[m] = long_name;
  return out;
}

// with_env: only the subcommand being run reads environment variables. CLI11 (2.1) reads the env of
// every subcommand, invoked or not, and all of them write the same Args, so another subcommand's
// LARDER_CTX_SIZE would overwrite this one's -c (an explicit flag must win over the environment).
void bind_options(CLI::App* sub, const std::string& name, std::vector<OptSpec>& table, DashAliases& aliases,
                  bool with_env) {
  for (auto& o : table) {
    std::string cmds = std::string(",") + o.cmds + ",";
    if (cmds.find("," + name + ",") == std::string::npos) continue;
    std::vector<std::string> multi;
    const std::string flags = cli11_flags(o.flags, aliases, multi);
    std::string help = o.help;
    for (const auto& m : multi) help = "(also " + m + ") " + help;
    CLI::Option* opt = std::visit(
        [&](auto* p) -> CLI::Option* {
          if constexpr (std::is_same_v<decltype(p), bool*>) return sub->add_flag(flags, *p, help);
          else return sub->add_option(flags, *p, help)->capture_default_str();
        },
        o.target);
    if (with_env && o.env && *o.env) opt->envname(o.env);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Larder: LLM inference that trades storage for computation"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "larder 0.1.0");
  Args a;
  auto table = option_table(a);
  struct Cmd {
    const char* name;
    const char* help;
    int (*fn)(Args&);
  };
  const Cmd cmds[] = {
      {"run", "generate text from a prompt", cmd_run},
      {"chat", "interactive chat in the terminal with the model's chat template (/reset clears the history, /exit or Ctrl-D quits; one message a line when stdin is not a terminal)", cmd_chat},
      {"info", "show a model file's metadata, tensors and sizes", cmd_info},
      {"tokenize", "show the token ids of a text", cmd_tokenize},
      {"synth", "write a random-weight GGUF in a real model's shape", cmd_synth},
      {"quantize", "convert a model's weights: larder quantize IN OUT TYPE (f16 bf16 q8_0 q4_0 ... Q4_K_M)", cmd_quantize},
      {"perplexity", "perplexity over non-overlapping CTX-token windows (each starts with BOS; the second half of each is scored, as llama.cpp does); --kl-base adds KL(base || model)", cmd_perplexity},
      {"bench", "measure prompt and generation tokens/s (llama-bench style)", cmd_bench},
      {"serve", "OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics", cmd_serve},
      {"conductor", "KV-cache-centric front door of a cluster: routes each request to the instance that serves it soonest (cached prefixes, fetches, load), SLO admission, failover", cmd_conductor},
      {"router", "front door of a P/D cluster: OpenAI API in, each request's prompt to a prefill instance and its tokens from a decode instance", cmd_router},
      {"replay", "drive a server with a request trace (--trace FILE --scale K --speed X) and report hit rate, TTFT, TPOT", cmd_replay},
      {"kv", "look after an SSD KV tier: larder kv stats|verify|clear --dir DIR", cmd_kv},
      {"simulate", "simulate a cluster serving a trace (--trace FILE --instances N|P,D --policy NAME --calibration FILE) and report hit rate, TTFT, TBT, goodput", cmd_simulate},
      {"calibrate", "measure an instance's costs on a real engine (prefill, decode, tiers) for `larder simulate`: -m MODEL -o calib.json", cmd_calibrate},
      {"logits", "dump logits / greedy ids for token ids (for reference tests)", cmd_logits},
      {"offload-prepare", "write the FFN offload layout: larder offload-prepare MODEL DIR (up rows and transposed down columns bundled per neuron, checksummed)", cmd_offload_prepare},
      {"calibrate-sparsity", "calibrate per-layer FFN activation thresholds on a text: larder calibrate-sparsity MODEL TEXT [-o FILE]", cmd_calibrate_sparsity},
      {"docs", "per-document KV (RAG): compose one prompt from token ids (--tokens-json, --dump) or run the fidelity benchmark (--cases, --methods, -o)", cmd_docs},
  };
  std::vector<std::pair<CLI::App*, const Cmd*>> subs;
  DashAliases aliases;
  for (const Cmd& c : cmds) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    bind_options(sub, c.name, table, aliases, argc > 1 && std::string(argv[1]) == c.name);
    if (std::string(c.name) == "info") sub->add_option("file", a.positional, "model file (or use -m)");
    if (std::string(c.name) == "tokenize") sub->add_option("text", a.positional, "text to tokenize");
    if (std::string(c.name) == "kv") sub->add_option("action", a.positional, "stats | verify | clear");
    if (std::string(c.name) == "offload-prepare") sub->add_option("args", a.pos_args, "MODEL DIR (or -m MODEL DIR)")->expected(1, 2);
    if (std::string(c.name) == "calibrate-sparsity") sub->add_option("args", a.pos_args, "MODEL TEXT (or -m MODEL TEXT)")->expected(1, 2);
    if (std::string(c.name) == "quantize") sub->add_option("args", a.quant_args, "IN OUT TYPE")->expected(3);
    subs.emplace_back(sub, &c);
  }
  std::vector<std::string> args;
  for (int i = argc - 1; i >= 1; --i) {  // CLI11 wants them reversed
    std::string s = argv[i];
    for (const auto& [alias, long_name] : aliases) {
      if (s == alias) s = long_name;
      else if (s.rfind(alias + "=", 0) == 0) s = long_name + s.substr(alias.size());
    }
    args.push_back(std::move(s));
  }
  app.name(argv[0]);
  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "larder: error: %s (see larder --help)\n", e.what());
    return 2;
  }
  for (auto& [sub, c] : subs)
    if (sub->parsed()) return c->fn(a);
  return 1;
}
