// A small random-weight model shared by the engine-level tests (scheduler, KV store):
// written once per test binary run to a temp file, loaded, removed at exit.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "model/model.h"
#include "model/synth.h"

namespace larder::testing {

struct SmallModel {
  std::string path;
  std::unique_ptr<Model> model;
  explicit SmallModel(int n_layer = 2, int n_vocab = 400, const std::string& tag = "small") {
    SynthShape s;
    s.n_embd = 64; s.n_ff = 128; s.n_layer = n_layer; s.n_head = 4; s.n_head_kv = 2; s.n_vocab = n_vocab; s.n_ctx = 512;
    path = std::filesystem::temp_directory_path() / ("larder_" + tag + "_" + std::to_string(getpid()) + ".gguf");
    SynthOptions o;
    o.progress = false;
    o.scale = 3.0f;
    EXPECT_TRUE(synth_model(s, o, path).ok());
    auto m = load_model(path);
    EXPECT_TRUE(m.ok()) << m.error();
    model = std::move(m).value();
  }
  ~SmallModel() { std::filesystem::remove(path); }
};

inline SmallModel& small_model() {
  static SmallModel f;
  return f;
}

}  // namespace larder::testing
