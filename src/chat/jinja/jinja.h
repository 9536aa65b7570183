// A Jinja2 template engine for Hugging Face chat templates: the language subset those
// templates use, rendered the way transformers renders them (ImmutableSandboxedEnvironment,
// trim_blocks, lstrip_blocks, loopcontrols, its tojson/raise_exception/strftime_now).
// Errors, including the template's own raise_exception(), come back as Result errors;
// recursion (also against the calling thread's actual stack size), loop work, list and output
// sizes are bounded so hostile templates cannot crash or stall the host. Thread-safe: a parsed
// Template is immutable and render() keeps its state on the stack.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "core/result.h"

namespace larder::jinja {

struct Program;

struct RenderOptions {
  size_t max_output_bytes = 16u << 20;  // also the largest string a template may build
  uint64_t max_steps = 4'000'000;       // steps: nodes, loop iterations, list items/4, string bytes/16
  size_t max_list_items = 1u << 20;     // largest list a template may build
  int max_call_depth = 100;             // nested macro calls
  // Clock for strftime_now(); the system clock when empty. Formatted in local time, as Python's
  // datetime.now().strftime() does.
  std::function<std::chrono::system_clock::time_point()> now;
};

class Template {
 public:
  static Result<Template> parse(const std::string& source);
  // Every member of `context` (a JSON object) becomes a template variable.
  Result<std::string> render(const nlohmann::ordered_json& context, const RenderOptions& opts = {}) const;

 private:
  std::shared_ptr<const Program> prog_;
};

}  // namespace larder::jinja
