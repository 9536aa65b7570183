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
