// What one simulated instance costs and holds: written by `larder calibrate` (measured on a
// real engine), read by `larder simulate`.
//
// File: one JSON object ("larder-calibration/1"). Required: "cost", "block_size",
// "kv_blocks", "block_bytes"; every other field has the default shown. Unknown fields are
// ignored, so the raw measurements can ride along.
//
//   {
//     "schema": "larder-calibration/1",
//     "model": "SmolLM2-135M-Instruct.Q4_1.gguf",   // what it was measured on (free text)
//     "machine": "AMD EPYC ..., 2 threads, avx512",  // (free text)
//     "measured_at": "2026-12-07T10:00:00Z",         // (free text)
//     "cost": {"a": s, "b": s/token, "c": s/token^2,  // conductor::CostModel:
//              "d0": s, "d1": s/seq, "d2": s/token},  //   prefill_s(n, p) = a + b n + c n (p + n/2)
//                                                     //   decode_step_s(B, ctx) = d0 + d1 B + d2 ctx
//     "parallel": 4,            // sequences an instance runs at once
//     "step_tokens": 256,       // per-step token budget (decode tokens + prompt chunks)
//     "block_size": 16,         // tokens per KV block
//     "max_seq_len": 0,         // prompt + completion limit; the trace is clipped to it (0 = none)
//     "kv_blocks": 1024,        // the L1 pool (blocks)
//     "block_bytes": 368640,    // one block, all layers, K and V
//     "dram_blocks": 0,         // DRAM tier capacity (0 = none)
//     "dram_load_bw": 4e9,      // bytes/s, DRAM tier -> pool
//     "disk_blocks": 0,         // SSD tier capacity (0 = none)
//     "disk_load_bw": 5e8,      // bytes/s, SSD tier -> pool
//     "transfer_bw": 3.6e8,     // bytes/s between instances (P/D handoffs, fetches)
//     "transfer_latency_s": 0.002,
//     "samples": {...}, "fit": {...}   // calibrate's raw measurements and fit quality (not read)
//   }
#pragma once
#include <cstdint>
#include <string>

#include "conductor/policy.h"
#include "core/result.h"

namespace larder::sim {

struct Calibration {
  std::string model, machine, measured_at;
  conductor::CostModel cost;
  int parallel = 4;
  int step_tokens = 256;
  int block_size = 16;
  int max_seq_len = 0;
  int64_t kv_blocks = 1024;
  int64_t block_bytes = 0;
  int64_t dram_blocks = 0;
  double dram_load_bw = 4e9;
  int64_t disk_blocks = 0;
  double disk_load_bw = 5e8;
  double transfer_bw = 3.6e8;
  double transfer_latency_s = 0.002;
  std::string extra_json;  // "samples" and "fit" as calibrate wrote them (JSON text; "" = none)
};

// Parses and checks a calibration (errors name the field).
Result<Calibration> parse_calibration(const std::string& json_text);
Result<Calibration> load_calibration(const std::string& path);
// The file's JSON text (with extra_json's fields merged in).
std::string calibration_json(const Calibration& c);

}  // namespace larder::sim
