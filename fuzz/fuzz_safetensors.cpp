// libFuzzer target: SafetensorsFile::parse on arbitrary bytes, then lookups and typed views.
#include <cstddef>
#include <cstdint>

#include "model/safetensors.h"

using namespace larder;

static volatile uint8_t g_sink;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = SafetensorsFile::parse(data, size);
  if (!r.ok()) {
    if (r.error().empty()) __builtin_trap();
    return 0;
  }
  const SafetensorsFile& f = *r.value();
  for (const auto& [k, v] : f.metadata()) g_sink = static_cast<uint8_t>(k.size() + v.size());
  for (const auto& t : f.tensors()) {
    if (f.find(t.name) != &t) __builtin_trap();
    if (t.nbytes) g_sink = t.data[0] ^ t.data[t.nbytes - 1];
    auto v = f.get(t.name);
    if (v.ok()) {
      const auto& s = v.value();
      // The view must describe exactly the bytes the header declared.
      if (s.ne[0] * s.ne[1] * s.ne[2] * s.ne[3] * (s.type == DType::F32 ? 4 : 2) != static_cast<int64_t>(s.nbytes))
        __builtin_trap();
    } else if (v.error().empty()) {
      __builtin_trap();
    }
  }
  (void)f.get("model.embed_tokens.weight");
  return 0;
}
