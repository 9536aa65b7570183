// libFuzzer target: the KV-event wire format (src/kvevents) on arbitrary bytes; byte 0 picks:
//   even: kvevents::decode of the rest; a decoded batch must survive encode -> decode unchanged
//         and apply to a HeldBlocks whose snapshot reproduces it
//   odd:  a Sequencer driven by the rest as a script of frames (live / replay, seqs, payloads
//         that are either raw bytes or small valid batches) and replay ends / failures / idle /
//         reconnects; its bookkeeping must stay consistent
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvevents/events.h"
#include "kvevents/subscriber.h"

using namespace larder;
using namespace larder::kvevents;

namespace {

bool same(const EventBatch& a, const EventBatch& b) {
  if (!(a.ts == b.ts || (a.ts != a.ts && b.ts != b.ts)) || a.dp_rank != b.dp_rank || a.events.size() != b.events.size())
    return false;
  for (size_t i = 0; i < a.events.size(); ++i) {
    const Event& x = a.events[i];
    const Event& y = b.events[i];
    if (x.index() != y.index()) return false;
    if (const auto* s = std::get_if<BlockStored>(&x)) {
      const auto& t = std::get<BlockStored>(y);
      if (!(s->hashes == t.hashes && s->parent == t.parent && s->token_ids == t.token_ids &&
            s->block_size == t.block_size && s->lora_id == t.lora_id && s->medium == t.medium))
        return false;
    } else if (const auto* r = std::get_if<BlockRemoved>(&x)) {
      const auto& t = std::get<BlockRemoved>(y);
      if (!(r->hashes == t.hashes && r->medium == t.medium)) return false;
    }
  }
  return true;
}

void check_decode(std::string_view in) {
  auto d = decode(in);
  if (!d.ok()) {
    if (d.error().empty() || d.error().find('\n') != std::string::npos) __builtin_trap();
    return;
  }
  auto again = decode(encode(*d));
  if (!again.ok() || !same(*d, *again)) __builtin_trap();
  HeldBlocks held;
  held.apply(*d);
  HeldBlocks back;
  auto snap = decode(encode(held.snapshot(0)));
  if (!snap.ok()) __builtin_trap();
  back.apply(*snap);
  if (!(back == held)) __builtin_trap();
}

std::string batch_of(uint8_t k) {
  EventBatch b;
  b.ts = k;
  BlockHash h{k % 8u, 0};
  switch (k % 3) {
    case 0: b.events.push_back(BlockStored{{h}, std::nullopt, {1}, 16, std::nullopt, k & 8 ? "DRAM" : "L1"}); break;
    case 1: b.events.push_back(BlockRemoved{{h}, k & 8 ? "DRAM" : "L1"}); break;
    default: b.events.push_back(AllBlocksCleared{}), b.events.push_back(BlockStored{{h}, std::nullopt, {}, 16, std::nullopt, "SSD"});
  }
  return encode(b);
}

void run_sequencer(const uint8_t* p, size_t n) {
  SequencerParams sp;
  sp.window = 16;
  sp.max_pending = 32;
  sp.can_replay = n > 0 && (p[0] & 1);
  Sequencer sq(sp);
  int64_t applied_last = -1;
  auto take = [&](const Sequencer::Step& s) {
    if (s.reset) applied_last = -1;
    for (const auto& a : s.apply) {
      // In order within an epoch (a snapshot may restate the seq last applied).
      if (a.first < applied_last || a.first >= sq.expected()) __builtin_trap();
      applied_last = a.first;
    }
    if (s.replay_from && (!sp.can_replay || *s.replay_from < 0 || !sq.replay_in_flight())) __builtin_trap();
    if (sq.expected() < 0 || sq.expected() > (int64_t(1) << 62) + 1) __builtin_trap();
  };
  take(sq.start());
  size_t i = 1;
  while (i + 2 <= n) {
    const uint8_t op = p[i], arg = p[i + 1];
    i += 2;
    switch (op % 6) {
      case 0:
      case 1: {  // a frame: seq from arg, payload raw (next byte = length) or a small batch
        const int64_t seq = arg % 64 == 63 ? int64_t(1) << 62 : arg % 64;
        std::string payload;
        if (op & 0x80) {
          size_t len = i < n ? p[i++] : 0;
          len = std::min(len, n - i);
          payload.assign(reinterpret_cast<const char*>(p + i), len);
          i += len;
        } else {
          payload = batch_of(static_cast<uint8_t>(op >> 1));
        }
        if (op % 6 == 0) take(sq.feed(Sequencer::Source::Live, seq, payload, (op & 0x40) ? "b" : "a"));
        else take(sq.feed(Sequencer::Source::Replay, seq, payload));
        break;
      }
      case 2: take(sq.replay_end()); break;
      case 3: take(sq.replay_failed()); break;
      case 4: take(sq.idle()); break;
      default: take(sq.reconnected());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] % 2 == 0) check_decode(std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
  else run_sequencer(data + 1, size - 1);
  return 0;
}
