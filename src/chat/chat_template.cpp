#include "chat/chat_template.h"

namespace larder {

Result<ChatTemplate> ChatTemplate::parse(const std::string& source) {
  auto t = jinja::Template::parse(source);
  if (!t.ok()) return Error{"chat template: " + t.error()};
  ChatTemplate ct;
  ct.tmpl_ = std::move(t).value();
  return ct;
}

Result<std::string> ChatTemplate::apply(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                        const nlohmann::ordered_json& extra) const {
  if (!messages.is_array()) return Error{"chat template: messages must be a JSON array"};
  if (!extra.is_null() && !extra.is_object()) return Error{"chat template: extra context must be a JSON object"};
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  if (extra.is_object())
    for (const auto& [k, v] : extra.items())
      if (k != "messages" && k != "add_generation_prompt") ctx[k] = v;
  auto r = tmpl_.render(ctx, opts_);
  if (!r.ok()) return Error{"chat template: " + r.error()};
  return r;
}

}  // namespace larder

namespace larder {

namespace {

// ChatML, as Qwen2 / SmolLM2 write it (without their default system prompt).
const char* const kChatML = R"JINJA({%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%})JINJA";

// Gemma 3's template (google/gemma-3-*-it, text parts only): BOS, the system prompt folded into the
// first user turn, roles user/model alternating, each turn <start_of_turn>role\n...<end_of_turn>\n.
const char* const kGemma = R"JINJA({{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
)JINJA";

}  // namespace

std::string builtin_chat_template_source(const std::string& name) {
  if (name == "chatml") return kChatML;
  if (name == "gemma") return kGemma;
  return {};
}

std::string builtin_chat_template_for_arch(const std::string& arch) {
  return arch.rfind("gemma", 0) == 0 ? "gemma" : "chatml";
}

Result<ModelChatTemplate> model_chat_template(const std::optional<std::string>& metadata, const std::string& arch) {
  ModelChatTemplate out;
  std::string why = "the model has no chat template";
  if (metadata && !metadata->empty()) {
    auto t = ChatTemplate::parse(*metadata);
    if (t.ok()) {
      out.tmpl = std::move(t).value();
      out.name = "the model's";
      return out;
    }
    why = "the model's chat template is not usable (" + t.error() + ")";
  }
  out.name = builtin_chat_template_for_arch(arch);
  auto t = ChatTemplate::parse(builtin_chat_template_source(out.name));
  if (!t.ok()) return Error{"built-in " + out.name + " " + t.error()};
  out.tmpl = std::move(t).value();
  out.builtin = true;
  out.note = why + "; using the built-in " + (out.name == "gemma" ? std::string("Gemma") : std::string("ChatML")) +
             " template (architecture " + (arch.empty() ? std::string("unknown") : arch) + ")";
  return out;
}

}  // namespace larder
