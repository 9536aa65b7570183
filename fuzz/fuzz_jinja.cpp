// libFuzzer target for the Jinja engine behind chat templates: parses the input as a template
// and renders it through the chat-template API with a fixed conversation, under tight output,
// step and recursion limits. Errors are expected; crashes, leaks, hangs and sanitizer reports
// are not.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "chat/chat_template.h"

namespace {

const nlohmann::ordered_json& messages() {
  static const auto m = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi \u00e9 \ud83d\ude00 <b>&"},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call12345", "type": "function",
      "function": {"name": "get_weather", "arguments": {"location": "Paris", "days": 3}}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp\": 21.5}"},
    {"role": "assistant", "content": "<think>x</think>It is 21.5 degrees."}
  ])");
  return m;
}

const nlohmann::ordered_json& extra() {
  static const auto e = nlohmann::ordered_json::parse(R"({
    "bos_token": "<s>", "eos_token": "</s>", "date_string": "26 Jul 2024",
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
      "parameters": {"type": "object", "properties": {"location": {"type": "string"},
      "days": {"type": ["integer", "null"], "default": 1}}, "required": ["location"]}}}],
    "documents": [{"title": "a", "text": "b"}], "n": 7, "f": 0.5, "empty": [], "nothing": null
  })");
  return e;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string src(reinterpret_cast<const char*>(data), size);
  auto t = larder::ChatTemplate::parse(src);
  if (!t.ok()) return 0;
  auto& o = t->render_options();
  o.max_output_bytes = 1 << 14;
  o.max_steps = 50000;
  o.max_list_items = 1 << 12;
  o.max_call_depth = 40;
  t->set_clock([] { return std::chrono::system_clock::from_time_t(1721997296); });
  auto r = t->apply(messages(), size % 2 == 0, extra());
  (void)r;
  return 0;
}
