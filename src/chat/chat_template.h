// Hugging Face chat templates: renders a conversation into the prompt text a model was
// trained on, with the same result transformers' apply_chat_template gives (jinja2 with
// trim_blocks/lstrip_blocks, loopcontrols, raise_exception, strftime_now, its tojson).
// apply() is const and keeps no state between calls: one parsed template may serve many
// threads at once (set the clock/options before sharing it).
#pragma once
#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "core/result.h"
#include "chat/jinja/jinja.h"

namespace larder {

struct ChatTemplate {
  static Result<ChatTemplate> parse(const std::string& source);

  // The template sees `messages`, `add_generation_prompt` and every member of `extra` (an
  // object or null): bos_token, eos_token, tools, documents, date_string, ... A key of
  // `extra` named messages/add_generation_prompt is overridden by the arguments. `tools` is
  // undefined unless given (transformers passes tools=None; pass "tools": null for that).
  // A template's raise_exception(msg) comes back as the error "chat template: msg".
  Result<std::string> apply(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                            const nlohmann::ordered_json& extra) const;

  // Clock for strftime_now() (tests fix it); the system clock by default.
  void set_clock(std::function<std::chrono::system_clock::time_point()> now) { opts_.now = std::move(now); }
  jinja::RenderOptions& render_options() { return opts_; }

 private:
  jinja::Template tmpl_;
  jinja::RenderOptions opts_;
};

// Built-in templates for models whose files carry none: "chatml" (<|im_start|>role\n...<|im_end|>)
// and "gemma" (Gemma 3's: <start_of_turn>user ... <end_of_turn>, the assistant's role written
// "model", a system prompt folded into the first user turn). Their Jinja source; empty for an
// unknown name.
std::string builtin_chat_template_source(const std::string& name);
// The built-in template for an architecture: "gemma" for gemma, gemma2, gemma3; "chatml" otherwise.
std::string builtin_chat_template_for_arch(const std::string& arch);

// The chat template a model is used with, by `larder serve` and `larder chat` alike.
struct ModelChatTemplate {
  ChatTemplate tmpl;
  std::string name;     // "the model's" or the built-in's name ("chatml", "gemma")
  bool builtin = false;
  std::string note;     // one line for stderr when a built-in is used (why, and which one)
};

// `metadata` is the model's own template (GGUF tokenizer.chat_template), if it has one. When it is
// missing, empty or does not parse, the built-in template for `arch` is used instead (and `note`
// says so). Fails only if a built-in template itself does not parse.
Result<ModelChatTemplate> model_chat_template(const std::optional<std::string>& metadata, const std::string& arch);

}  // namespace larder
