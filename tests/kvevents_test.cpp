// KV events: the msgpack codec against msgspec-made bytes of vLLM's layouts, the Sequencer
// against a model publisher under drops / duplicates / reordering / restarts, and
// Publisher + SubscriberSet over loopback TCP.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "kvevents/publisher.h"
#include "kvevents/subscriber.h"

using namespace larder;
using namespace larder::kvevents;

namespace {

#define BYTES(lit) std::string(lit, sizeof(lit) - 1)

bool same(const Event& a, const Event& b) {
  if (a.index() != b.index()) return false;
  if (const auto* x = std::get_if<BlockStored>(&a)) {
    const auto& y = std::get<BlockStored>(b);
    return x->hashes == y.hashes && x->parent == y.parent && x->token_ids == y.token_ids &&
           x->block_size == y.block_size && x->lora_id == y.lora_id && x->medium == y.medium;
  }
  if (const auto* x = std::get_if<BlockRemoved>(&a)) {
    const auto& y = std::get<BlockRemoved>(b);
    return x->hashes == y.hashes && x->medium == y.medium;
  }
  return true;
}

bool same(const EventBatch& a, const EventBatch& b) {
  if (a.ts != b.ts || a.dp_rank != b.dp_rank || a.events.size() != b.events.size()) return false;
  for (size_t i = 0; i < a.events.size(); ++i)
    if (!same(a.events[i], b.events[i])) return false;
  return true;
}

BlockHash H(uint64_t lo, uint64_t hi = 0) { return BlockHash{lo, hi}; }

EventBatch random_batch(std::mt19937_64& rng) {
  static const char* media[] = {"", "L1", "DRAM", "SSD", "GPU", "cpu", "a-much-longer-medium-name-than-usual"};
  auto r = [&](uint64_t n) { return rng() % n; };
  EventBatch b;
  b.ts = static_cast<double>(rng() % 1000000) / 7.0;
  if (r(2)) b.dp_rank = static_cast<int>(r(5));
  for (int i = 0, n = static_cast<int>(r(6)); i < n; ++i) {
    switch (r(3)) {
      case 0: {
        BlockStored s;
        for (int k = 0, nh = static_cast<int>(r(5)); k < nh; ++k) s.hashes.push_back(H(rng(), r(2) ? rng() : 0));
        if (r(2)) s.parent = H(rng(), rng());
        for (int k = 0, nt = static_cast<int>(r(40)); k < nt; ++k) s.token_ids.push_back(static_cast<int32_t>(rng()));
        s.block_size = static_cast<int>(r(2) ? r(200) : rng() % 0x7fffffff);
        if (r(2)) s.lora_id = static_cast<int64_t>(rng());
        s.medium = media[r(7)];
        b.events.push_back(std::move(s));
        break;
      }
      case 1: {
        BlockRemoved s;
        for (int k = 0, nh = static_cast<int>(r(300)); k < nh; ++k) s.hashes.push_back(H(rng(), rng()));
        s.medium = media[r(7)];
        b.events.push_back(std::move(s));
        break;
      }
      default: b.events.push_back(AllBlocksCleared{});
    }
  }
  return b;
}

}  // namespace

// ---------------------------------------------------------------- codec

TEST(KvEventsCodec, RoundTripEveryKind) {
  std::mt19937_64 rng(7);
  int kinds[3] = {0, 0, 0};
  for (int it = 0; it < 2000; ++it) {
    EventBatch b = random_batch(rng);
    for (const auto& e : b.events) ++kinds[e.index()];
    auto d = decode(encode(b));
    ASSERT_TRUE(d.ok()) << d.error();
    ASSERT_TRUE(same(b, *d)) << "iteration " << it;
  }
  EXPECT_GT(kinds[0], 100);
  EXPECT_GT(kinds[1], 100);
  EXPECT_GT(kinds[2], 100);
}

// Our encoder against msgspec (0.23, Python) encoding the same batch with vLLM's struct layout
// for BlockStored/BlockRemoved of 8/3 fields (array_like=True, tag=True; hashes as bytes
// lo.to_bytes(8, "little") + hi.to_bytes(8, "little")):
//   EventBatch(ts=1.5, events=[BlockStored(block_hashes=[h(1,2), h(2**64-1,7)],
//     parent_block_hash=h(0x0102030405060708,0), token_ids=[1,300,-5,70000], block_size=4,
//     lora_id=None, medium="L1", lora_name=None), BlockRemoved([h(3,0)], "SSD"), AllBlocksCleared()])
//   EventBatch(ts=0.25, events=[BlockStored([], None, [], 16, lora_id=-9, medium=None, lora_name=None)],
//     data_parallel_rank=2)
TEST(KvEventsCodec, EncodeMatchesMsgspecBytes) {
  const std::string want1 = BYTES(
      "\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x93\x98\xab\x42\x6c\x6f\x63\x6b\x53\x74\x6f\x72\x65\x64\x92\xc4"
      "\x10\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\xc4\x10\xff\xff\xff\xff\xff\xff\xff"
      "\xff\x07\x00\x00\x00\x00\x00\x00\x00\xc4\x10\x08\x07\x06\x05\x04\x03\x02\x01\x00\x00\x00\x00\x00\x00\x00"
      "\x00\x94\x01\xcd\x01\x2c\xfb\xce\x00\x01\x11\x70\x04\xc0\xa2\x4c\x31\xc0\x93\xac\x42\x6c\x6f\x63\x6b\x52"
      "\x65\x6d\x6f\x76\x65\x64\x91\xc4\x10\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xa3"
      "\x53\x53\x44\x91\xb0\x41\x6c\x6c\x42\x6c\x6f\x63\x6b\x73\x43\x6c\x65\x61\x72\x65\x64\xc0");
  EventBatch b;
  b.ts = 1.5;
  b.events.push_back(BlockStored{{H(1, 2), H(~0ull, 7)}, H(0x0102030405060708ull), {1, 300, -5, 70000}, 4, std::nullopt, "L1"});
  b.events.push_back(BlockRemoved{{H(3)}, "SSD"});
  b.events.push_back(AllBlocksCleared{});
  EXPECT_EQ(encode(b), want1);

  const std::string want2 = BYTES(
      "\x93\xcb\x3f\xd0\x00\x00\x00\x00\x00\x00\x91\x98\xab\x42\x6c\x6f\x63\x6b\x53\x74\x6f\x72\x65\x64\x90\xc0"
      "\x90\x10\xf7\xc0\xc0\x02");
  EventBatch c;
  c.ts = 0.25;
  c.dp_rank = 2;
  c.events.push_back(BlockStored{{}, std::nullopt, {}, 16, -9, ""});
  EXPECT_EQ(encode(c), want2);
}

// vLLM 0.9.0's layout (msgspec 0.23 with vLLM 0.9.0's structs): a batch of 2 fields (no
// data_parallel_rank), BlockStored of 5 fields with int hashes, BlockRemoved without medium.
//   EventBatch(ts=1.5, events=[BlockStored(block_hashes=[1, 2**64-1], parent_block_hash=-2,
//     token_ids=[7, 8], block_size=2, lora_id=None), BlockRemoved(block_hashes=[1]), AllBlocksCleared()])
TEST(KvEventsCodec, DecodesVllm090Layout) {
  const std::string in = BYTES(
      "\x92\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x93\x96\xab\x42\x6c\x6f\x63\x6b\x53\x74\x6f\x72\x65\x64\x92\x01"
      "\xcf\xff\xff\xff\xff\xff\xff\xff\xff\xfe\x92\x07\x08\x02\xc0\x92\xac\x42\x6c\x6f\x63\x6b\x52\x65\x6d\x6f"
      "\x76\x65\x64\x91\x01\x91\xb0\x41\x6c\x6c\x42\x6c\x6f\x63\x6b\x73\x43\x6c\x65\x61\x72\x65\x64");
  auto d = decode(in);
  ASSERT_TRUE(d.ok()) << d.error();
  EXPECT_EQ(d->ts, 1.5);
  EXPECT_FALSE(d->dp_rank);
  ASSERT_EQ(d->events.size(), 3u);
  const auto& s = std::get<BlockStored>(d->events[0]);
  EXPECT_EQ(s.hashes, (std::vector<BlockHash>{H(1), H(~0ull)}));
  EXPECT_EQ(s.parent, H(static_cast<uint64_t>(-2)));  // negative ints are taken as their 64 bits
  EXPECT_EQ(s.token_ids, (std::vector<int32_t>{7, 8}));
  EXPECT_EQ(s.block_size, 2);
  EXPECT_FALSE(s.lora_id);
  EXPECT_EQ(s.medium, "");
  EXPECT_EQ(medium_of(s.medium), Medium::L1);
  const auto& r = std::get<BlockRemoved>(d->events[1]);
  EXPECT_EQ(r.hashes, (std::vector<BlockHash>{H(1)}));
  EXPECT_TRUE(std::holds_alternative<AllBlocksCleared>(d->events[2]));
}

// The last array_like vLLM (<= 0.23): BlockStored of 11 fields (lora_name, extra_keys, group_idx,
// kv_cache_spec_kind, kv_cache_spec_sliding_window written even when defaulted), a 32-byte
// sha256-style hash, data_parallel_rank=1.
//   KVEventBatch(ts=1.5, events=[BlockStored(block_hashes=[1, 2**63+5], parent_block_hash=None,
//     token_ids=[7,8,9,10], block_size=4, lora_id=None, medium="GPU", lora_name=None, group_idx=0),
//     BlockRemoved(block_hashes=[b"\x01"*32], medium="CPU"), AllBlocksCleared()], data_parallel_rank=1)
TEST(KvEventsCodec, DecodesVllm023Layout) {
  const std::string in = BYTES(
      "\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x93\x9c\xab\x42\x6c\x6f\x63\x6b\x53\x74\x6f\x72\x65\x64\x92\x01"
      "\xcf\x80\x00\x00\x00\x00\x00\x00\x05\xc0\x94\x07\x08\x09\x0a\x04\xc0\xa3\x47\x50\x55\xc0\xc0\x00\xc0\xc0"
      "\x94\xac\x42\x6c\x6f\x63\x6b\x52\x65\x6d\x6f\x76\x65\x64\x91\xc4\x20\x01\x01\x01\x01\x01\x01\x01\x01\x01"
      "\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\xa3\x43\x50"
      "\x55\xc0\x91\xb0\x41\x6c\x6c\x42\x6c\x6f\x63\x6b\x73\x43\x6c\x65\x61\x72\x65\x64\x01");
  auto d = decode(in);
  ASSERT_TRUE(d.ok()) << d.error();
  EXPECT_EQ(d->dp_rank, 1);
  ASSERT_EQ(d->events.size(), 3u);
  const auto& s = std::get<BlockStored>(d->events[0]);
  EXPECT_EQ(s.hashes, (std::vector<BlockHash>{H(1), H((1ull << 63) + 5)}));
  EXPECT_FALSE(s.parent);
  EXPECT_EQ(s.token_ids, (std::vector<int32_t>{7, 8, 9, 10}));
  EXPECT_EQ(s.block_size, 4);
  EXPECT_EQ(s.medium, "GPU");
  const auto& r = std::get<BlockRemoved>(d->events[1]);
  // Bytes hashes other than our 16: vLLM's int form, the last 8 bytes big-endian.
  EXPECT_EQ(r.hashes, (std::vector<BlockHash>{H(0x0101010101010101ull)}));
  EXPECT_EQ(medium_of(r.medium), Medium::Dram);
  EXPECT_TRUE(std::holds_alternative<AllBlocksCleared>(d->events[2]));
}

// vLLM after PR 42892: events as tagged maps (omit_defaults: defaulted fields left out unless
// set), the batch still array_like; and a batch without array_like (a map).
//   the same events with extra_keys=[None, None], group_idx=0, kv_cache_spec_kind="full_attention",
//   data_parallel_rank=0; then EventBatch(ts=1.5, events=[BlockRemoved([3], "DISK")]) as a map.
TEST(KvEventsCodec, DecodesVllmMapLayouts) {
  const std::string in = BYTES(
      "\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x93\x8b\xa4\x74\x79\x70\x65\xab\x42\x6c\x6f\x63\x6b\x53\x74\x6f"
      "\x72\x65\x64\xac\x62\x6c\x6f\x63\x6b\x5f\x68\x61\x73\x68\x65\x73\x92\x01\xcf\x80\x00\x00\x00\x00\x00\x00"
      "\x05\xb1\x70\x61\x72\x65\x6e\x74\x5f\x62\x6c\x6f\x63\x6b\x5f\x68\x61\x73\x68\xc0\xa9\x74\x6f\x6b\x65\x6e"
      "\x5f\x69\x64\x73\x94\x07\x08\x09\x0a\xaa\x62\x6c\x6f\x63\x6b\x5f\x73\x69\x7a\x65\x04\xa7\x6c\x6f\x72\x61"
      "\x5f\x69\x64\xc0\xa6\x6d\x65\x64\x69\x75\x6d\xa3\x47\x50\x55\xa9\x6c\x6f\x72\x61\x5f\x6e\x61\x6d\x65\xc0"
      "\xaa\x65\x78\x74\x72\x61\x5f\x6b\x65\x79\x73\x92\xc0\xc0\xa9\x67\x72\x6f\x75\x70\x5f\x69\x64\x78\x00\xb2"
      "\x6b\x76\x5f\x63\x61\x63\x68\x65\x5f\x73\x70\x65\x63\x5f\x6b\x69\x6e\x64\xae\x66\x75\x6c\x6c\x5f\x61\x74"
      "\x74\x65\x6e\x74\x69\x6f\x6e\x83\xa4\x74\x79\x70\x65\xac\x42\x6c\x6f\x63\x6b\x52\x65\x6d\x6f\x76\x65\x64"
      "\xac\x62\x6c\x6f\x63\x6b\x5f\x68\x61\x73\x68\x65\x73\x91\xc4\x20\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01"
      "\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\x01\xa6\x6d\x65\x64"
      "\x69\x75\x6d\xa3\x43\x50\x55\x81\xa4\x74\x79\x70\x65\xb0\x41\x6c\x6c\x42\x6c\x6f\x63\x6b\x73\x43\x6c\x65"
      "\x61\x72\x65\x64\x00");
  auto d = decode(in);
  ASSERT_TRUE(d.ok()) << d.error();
  EXPECT_EQ(d->dp_rank, 0);
  ASSERT_EQ(d->events.size(), 3u);
  const auto& s = std::get<BlockStored>(d->events[0]);
  EXPECT_EQ(s.hashes, (std::vector<BlockHash>{H(1), H((1ull << 63) + 5)}));
  EXPECT_EQ(s.token_ids, (std::vector<int32_t>{7, 8, 9, 10}));
  EXPECT_EQ(s.block_size, 4);
  EXPECT_EQ(s.medium, "GPU");
  EXPECT_EQ(std::get<BlockRemoved>(d->events[1]).hashes, (std::vector<BlockHash>{H(0x0101010101010101ull)}));
  EXPECT_TRUE(std::holds_alternative<AllBlocksCleared>(d->events[2]));

  const std::string map_batch = BYTES(
      "\x82\xa2\x74\x73\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\xa6\x65\x76\x65\x6e\x74\x73\x91\x83\xa4\x74\x79\x70"
      "\x65\xac\x42\x6c\x6f\x63\x6b\x52\x65\x6d\x6f\x76\x65\x64\xac\x62\x6c\x6f\x63\x6b\x5f\x68\x61\x73\x68\x65"
      "\x73\x91\x03\xa6\x6d\x65\x64\x69\x75\x6d\xa4\x44\x49\x53\x4b");
  auto m = decode(map_batch);
  ASSERT_TRUE(m.ok()) << m.error();
  EXPECT_EQ(m->ts, 1.5);
  ASSERT_EQ(m->events.size(), 1u);
  EXPECT_EQ(std::get<BlockRemoved>(m->events[0]).hashes, (std::vector<BlockHash>{H(3)}));
  EXPECT_EQ(medium_of(std::get<BlockRemoved>(m->events[0]).medium), Medium::Disk);
}

TEST(KvEventsCodec, RejectsGarbageWithOneLine) {
  const std::pair<std::string, std::string> cases[] = {
      {"", "truncated"},
      {BYTES("\xc0"), "expected a batch"},
      {BYTES("\x91\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00"), "needs ts and events"},
      {BYTES("\x92\xa1x\x90"), "ts: expected float, got str"},
      {BYTES("\x92\x01\x91\x91\xa3" "Foo"), "unknown event type 'Foo'"},
      {BYTES("\x92\x01\x91\x93\xab" "BlockStored\x90\xc0"), "needs at least 4"},
      {BYTES("\x92\x01\x91\x95\xab" "BlockStored\x91\xa1x\xc0\x90\x01"), "event 0: block_hashes: expected a block hash"},
      {BYTES("\x92\x01\x91\x95\xab" "BlockStored\x91\xc4\x00\xc0\x90\x01"), "block hash of 0 bytes"},
      {BYTES("\x92\x01\x91\x95\xab" "BlockStored\x90\xc0\x91\xcf\x00\x00\x00\x01\x00\x00\x00\x00\x01"), "token id out of range"},
      {BYTES("\x92\x01\x91\x95\xab" "BlockStored\x90\xc0\x90\xff"), "block_size out of range"},
      {BYTES("\x92\x01\xdd\xff\xff\xff\xff"), "array of 4294967295 elements"},
      {BYTES("\x92\x01\x91\x81\xa4type\xa5Other"), "unknown event type 'Other'"},
      {BYTES("\x92\x01\x91\x91\xa4" "A\n\x00" "B"), "unknown event type 'A??B'"},  // found by the fuzzer
      {BYTES("\x92\x01\x91\x81\xa1x\x01"), "without a \"type\""},
      {BYTES("\x92\x01\x91\x82\xa4type\xab" "BlockStored\xa1x\x01"), "BlockStored without"},
      {BYTES("\x92\x01\x90\x00"), "1 bytes after the batch"},
      {BYTES("\x93\x01\x90\xa1x"), "data_parallel_rank: expected int"},
      {BYTES("\x92\x01\x91\x92\xb0""AllBlocksCleared\xc1"), "invalid byte 0xc1"},
  };
  for (const auto& [in, want] : cases) {
    auto d = decode(in);
    ASSERT_FALSE(d.ok()) << "accepted: " << want;
    EXPECT_NE(d.error().find(want), std::string::npos) << d.error();
    EXPECT_EQ(d.error().find('\n'), std::string::npos);
  }
  // Nesting: skipped unknown fields may not recurse without bound.
  std::string deep = BYTES("\x92\x01\x91\x92\xb0""AllBlocksCleared");
  deep += std::string(100000, '\x91') + BYTES("\xc0");
  auto d = decode(deep);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.error().find("nesting"), std::string::npos) << d.error();

  // Every proper prefix of a valid payload is an error; random mutations never crash.
  std::mt19937_64 rng(3);
  for (int it = 0; it < 300; ++it) {
    std::string p = encode(random_batch(rng));
    for (int k = 0; k < 40; ++k) {
      size_t n = p.size() < 200 && k < static_cast<int>(p.size()) ? static_cast<size_t>(k) * p.size() / 40 : rng() % p.size();
      EXPECT_FALSE(decode(std::string_view(p).substr(0, n)).ok()) << n << " of " << p.size();
    }
    for (int k = 0; k < 20; ++k) {
      std::string q = p;
      for (int f = 0, nf = 1 + static_cast<int>(rng() % 4); f < nf && !q.empty(); ++f) q[rng() % q.size()] = static_cast<char>(rng());
      auto r = decode(q);
      if (!r.ok()) {
        EXPECT_FALSE(r.error().empty());
      }
    }
  }
}

TEST(KvEventsCodec, MediumOf) {
  EXPECT_EQ(medium_of(""), Medium::L1);
  EXPECT_EQ(medium_of("GPU"), Medium::L1);
  EXPECT_EQ(medium_of("l1"), Medium::L1);
  EXPECT_EQ(medium_of("cpu"), Medium::Dram);
  EXPECT_EQ(medium_of("DRAM"), Medium::Dram);
  EXPECT_EQ(medium_of("Dram"), Medium::Dram);
  EXPECT_EQ(medium_of("ssd"), Medium::Disk);
  EXPECT_EQ(medium_of("DISK"), Medium::Disk);
  EXPECT_EQ(medium_of("STORAGE"), Medium::Disk);
  EXPECT_EQ(medium_of("tape"), Medium::L1);
  EXPECT_EQ(medium_of("ssd-but-much-longer-than-sixteen"), Medium::L1);
  for (Medium m : {Medium::L1, Medium::Dram, Medium::Disk}) EXPECT_EQ(medium_of(kvcache::medium_name(m)), m);
}

TEST(KvEventsCodec, HeldBlocksSnapshotReproducesState) {
  std::mt19937_64 rng(11);
  for (int it = 0; it < 200; ++it) {
    HeldBlocks a;
    for (int k = 0; k < 20; ++k) {
      EventBatch b = random_batch(rng);
      a.apply(b);
    }
    HeldBlocks b;
    b.apply(BlockStored{{H(12345)}, std::nullopt, {}, 16, std::nullopt, "SSD"});  // stale state it must wipe
    auto snap = decode(encode(a.snapshot(1.0)));
    ASSERT_TRUE(snap.ok()) << snap.error();
    b.apply(*snap);
    EXPECT_TRUE(a == b);
    EXPECT_EQ(a.size(), b.size());
  }
  HeldBlocks h;
  h.apply(BlockStored{{H(1), H(2)}, std::nullopt, {}, 16, std::nullopt, "GPU"});
  h.apply(BlockStored{{H(1)}, std::nullopt, {}, 32, std::nullopt, "DRAM"});
  h.apply(BlockRemoved{{H(1)}, "L1"});
  EXPECT_FALSE(h.holds(Medium::L1, H(1)));
  EXPECT_TRUE(h.holds(Medium::L1, H(2)));
  EXPECT_TRUE(h.holds(Medium::Dram, H(1)));
  EXPECT_EQ(h.block_size(Medium::Dram), 32);
  h.apply(AllBlocksCleared{});
  EXPECT_EQ(h.size(), 0u);
}

// ---------------------------------------------------------------- sequencer

namespace {

using Src = Sequencer::Source;

// A publisher as the Sequencer sees it: numbered payloads, a replay buffer, a snapshot.
struct ModelPublisher {
  HeldBlocks state;
  int64_t next = 0;
  std::deque<std::pair<int64_t, std::string>> ring;
  size_t cap = 8;
  bool snapshots = true;  // false: vLLM's, which replays only what its buffer has
  std::string topic = "kv";

  std::pair<int64_t, std::string> publish(EventBatch b) {
    state.apply(b);
    ring.emplace_back(next, encode(b));
    while (ring.size() > cap) ring.pop_front();
    return {next++, ring.back().second};
  }
  std::vector<std::pair<int64_t, std::string>> answer(int64_t start) const {
    std::vector<std::pair<int64_t, std::string>> out;
    if (snapshots && start <= next - 1 && (ring.empty() || start < ring.front().first)) {
      out.emplace_back(next - 1, encode(state.snapshot(0.5)));
      return out;
    }
    for (const auto& f : ring)
      if (f.first >= start) out.push_back(f);
    return out;
  }
};

// The follower's side: what the index would hold.
struct Mirror {
  HeldBlocks held;
  std::vector<int64_t> applied;
  int resets = 0;
  std::optional<int64_t> request;
  void take(Sequencer::Step s) {
    if (s.reset) held.clear(), ++resets, applied.clear();
    for (auto& [seq, b] : s.apply) held.apply(b), applied.push_back(seq);
    if (s.replay_from) request = s.replay_from;
  }
};

EventBatch stored_batch(std::initializer_list<uint64_t> hs, const char* medium = "L1", double ts = 1) {
  EventBatch b;
  b.ts = ts;
  std::vector<BlockHash> v;
  for (uint64_t h : hs) v.push_back(H(h));
  b.events.push_back(BlockStored{v, std::nullopt, {}, 16, std::nullopt, medium});
  return b;
}

// Answers the request in flight in full.
void answer(Sequencer& sq, Mirror& m, const ModelPublisher& pub) {
  ASSERT_TRUE(m.request);
  int64_t from = *m.request;
  m.request.reset();
  for (auto& [seq, p] : pub.answer(from)) m.take(sq.feed(Src::Replay, seq, p));
  m.take(sq.replay_end());
}

}  // namespace

TEST(KvEventsSequencer, StartGapDuplicateAndTail) {
  ModelPublisher pub;
  pub.cap = 100;
  Sequencer sq;
  Mirror m;
  m.take(sq.start());
  ASSERT_EQ(m.request, 0);
  EXPECT_FALSE(sq.synced());
  auto f0 = pub.publish(stored_batch({1}));
  auto f1 = pub.publish(stored_batch({2}));
  // Live frame 1 arrives during the initial replay: it waits, the answer brings 0 and 1.
  m.take(sq.feed(Src::Live, f1.first, f1.second, "kv"));
  EXPECT_TRUE(m.applied.empty());
  answer(sq, m, pub);
  EXPECT_EQ(m.applied, (std::vector<int64_t>{0, 1}));
  EXPECT_TRUE(sq.synced());
  // Late live copy of 0: a duplicate.
  m.take(sq.feed(Src::Live, f0.first, f0.second, "kv"));
  EXPECT_EQ(sq.stats().duplicates, 2);  // the answer's copy of 1, and this
  // 2 is lost, 3 arrives: gap -> replay from 2.
  pub.publish(stored_batch({3}));
  auto f3 = pub.publish(stored_batch({4}));
  m.take(sq.feed(Src::Live, f3.first, f3.second, "kv"));
  EXPECT_EQ(m.request, 2);
  EXPECT_FALSE(sq.synced());
  EXPECT_EQ(sq.stats().gaps, 1);
  answer(sq, m, pub);
  EXPECT_EQ(m.applied, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_TRUE(sq.synced());
  EXPECT_TRUE(m.held == pub.state);
  // A lost tail: nothing after it, so only the quiet-time poll finds it.
  pub.publish(stored_batch({5}));
  m.take(sq.idle());
  EXPECT_EQ(m.request, 4);
  answer(sq, m, pub);
  EXPECT_TRUE(m.held == pub.state);
  EXPECT_EQ(sq.stats().last_seq, 4);
  EXPECT_EQ(sq.stats().polls, 1);
}

TEST(KvEventsSequencer, SnapshotWhenTheBufferIsGone) {
  ModelPublisher pub;
  pub.cap = 3;
  for (uint64_t i = 0; i < 10; ++i) pub.publish(stored_batch({i, i + 100}, i % 2 ? "DRAM" : "SSD"));
  pub.publish(EventBatch{2, {BlockRemoved{{H(3)}, "DRAM"}}, std::nullopt});
  Sequencer sq;
  Mirror m;
  m.take(sq.start());
  answer(sq, m, pub);
  EXPECT_EQ(m.applied, (std::vector<int64_t>{10}));  // one snapshot under the newest seq
  EXPECT_TRUE(m.held == pub.state);
  EXPECT_EQ(sq.stats().barriers, 1);
  EXPECT_EQ(sq.stats().lost, 0);
  // The original batch 10 arriving live afterwards is a duplicate, not a new epoch.
  m.take(sq.feed(Src::Live, 10, pub.ring.back().second, "kv"));
  EXPECT_EQ(sq.stats().resets, 0);
  auto f = pub.publish(stored_batch({77}));
  m.take(sq.feed(Src::Live, f.first, f.second, "kv"));
  EXPECT_TRUE(m.held == pub.state);
}

TEST(KvEventsSequencer, VllmBufferGoneIsCountedLost) {
  ModelPublisher pub;
  pub.cap = 3;
  pub.snapshots = false;
  for (uint64_t i = 0; i < 6; ++i) pub.publish(stored_batch({i}));
  Sequencer sq;
  Mirror m;
  m.take(sq.start());
  answer(sq, m, pub);
  EXPECT_EQ(m.applied, (std::vector<int64_t>{3, 4, 5}));
  EXPECT_EQ(sq.stats().lost, 3);
  EXPECT_TRUE(sq.synced());
}

TEST(KvEventsSequencer, RestartDetectedByBytesAndByTopic) {
  ModelPublisher pub;
  pub.cap = 100;
  Sequencer sq;
  Mirror m;
  m.take(sq.start());
  answer(sq, m, pub);
  for (uint64_t i = 0; i < 5; ++i) {
    auto f = pub.publish(stored_batch({i}, "L1", 1.0 + i));
    m.take(sq.feed(Src::Live, f.first, f.second, "kv"));
  }
  // The instance restarts: seq 0 again, other bytes.
  ModelPublisher pub2;
  pub2.cap = 100;
  auto g = pub2.publish(stored_batch({50}, "L1", 9.0));
  m.take(sq.feed(Src::Live, g.first, g.second, "kv"));
  EXPECT_EQ(m.resets, 1);
  EXPECT_EQ(m.request, 0);
  answer(sq, m, pub2);
  EXPECT_TRUE(m.held == pub2.state);
  EXPECT_TRUE(sq.synced());
  // Same seqs going on, but under another topic: a new publisher too.
  ModelPublisher pub3;
  pub3.cap = 100;
  pub3.topic = "kv2";
  pub3.publish(stored_batch({60}, "L1", 10.0));
  auto h = pub3.publish(stored_batch({61}, "L1", 11.0));
  m.take(sq.feed(Src::Live, h.first, h.second, pub3.topic));
  EXPECT_EQ(m.resets, 2);
  answer(sq, m, pub3);
  EXPECT_TRUE(m.held == pub3.state);
  // A restart whose seqs are all ahead of ours is invisible in them; a reconnect check from 0 finds it.
  ModelPublisher pub4;
  pub4.cap = 100;
  pub4.topic = "kv2";
  std::pair<int64_t, std::string> last;
  for (uint64_t i = 0; i < 4; ++i) last = pub4.publish(stored_batch({70 + i}, "L1", 20.0 + i));
  m.take(sq.feed(Src::Live, last.first, last.second, pub4.topic));  // seq 3: looks like a gap
  EXPECT_EQ(m.request, 2);
  m.take(sq.reconnected());
  EXPECT_EQ(m.request, 0);
  answer(sq, m, pub4);
  EXPECT_EQ(m.resets, 3);
  EXPECT_TRUE(m.held == pub4.state);
  EXPECT_TRUE(sq.synced());
}

TEST(KvEventsSequencer, UndecodableBatchIsSkippedOnce) {
  Sequencer sq;
  Mirror m;
  m.take(sq.start());
  m.take(sq.replay_end());
  m.take(sq.feed(Src::Live, 0, encode(stored_batch({1})), "t"));
  m.take(sq.feed(Src::Live, 1, "not msgpack", "t"));
  m.take(sq.feed(Src::Live, 1, "not msgpack", "t"));
  m.take(sq.feed(Src::Live, 2, encode(stored_batch({2})), "t"));
  EXPECT_EQ(m.applied, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(sq.stats().decode_errors, 1);
  EXPECT_EQ(sq.stats().duplicates, 1);
  EXPECT_EQ(sq.expected(), 3);
}

TEST(KvEventsSequencer, WithoutReplayGapsAreSkipped) {
  SequencerParams p;
  p.can_replay = false;
  Sequencer sq(p);
  Mirror m;
  m.take(sq.start());
  EXPECT_TRUE(sq.synced());
  m.take(sq.feed(Src::Live, 3, encode(stored_batch({3})), ""));
  m.take(sq.feed(Src::Live, 4, encode(stored_batch({4})), ""));
  EXPECT_EQ(m.applied, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(sq.stats().lost, 3);
  EXPECT_FALSE(m.request);
}

// A model publisher and a lossy channel: live frames dropped, duplicated, reordered (within an
// epoch: one connection is FIFO), replay answers late or lost, restarts (sometimes with a new
// topic) followed by the reconnect the SUB socket's monitor reports, quiet-time polls. After
// the stream ends and the replays settle, the follower holds exactly the publisher's state.
// KVEVENTS_SEEDS=N runs more seeds, KVEVENTS_SEED=S only one.
TEST(KvEventsSequencer, RandomizedAgainstModel) {
  int restarts = 0, snapshots = 0, gaps = 0;
  const uint64_t only = std::getenv("KVEVENTS_SEED") ? std::strtoull(std::getenv("KVEVENTS_SEED"), nullptr, 10) : 0;
  const uint64_t seeds = std::getenv("KVEVENTS_SEEDS") ? std::strtoull(std::getenv("KVEVENTS_SEEDS"), nullptr, 10) : 4000;
  for (uint64_t seed = 1; seed <= seeds; ++seed) {
    if (only && seed != only) continue;
    std::mt19937_64 rng(seed);
    auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
    double ts = 0;
    auto pub = std::make_unique<ModelPublisher>();
    pub->cap = 2 + rng() % 12;
    SequencerParams sp;
    sp.window = 64;
    Sequencer sq(sp);
    Mirror m;
    struct Frame {
      int64_t seq;
      std::string payload, topic;
      int epoch;
    };
    std::deque<Frame> live;
    size_t epoch_start = 0;  // index in `live` where the current epoch's frames begin
    int epoch = 0;
    std::deque<std::pair<int64_t, std::string>> reply;  // frames of the answer, then END
    bool reply_ready = false, reply_lost = false;
    int reply_delay = 0, reconnect_at = -1;
    std::optional<int64_t> asked;
    auto take = [&](Sequencer::Step s) {
      if (s.replay_from) {
        asked = s.replay_from;
        reply.clear();
        reply_ready = false;
        reply_lost = chance(0.1);
        reply_delay = static_cast<int>(rng() % 6);
        s.replay_from.reset();
      }
      m.take(std::move(s));
    };
    auto random_events = [&] {
      static const char* media[] = {"L1", "GPU", "DRAM", "cpu", "SSD", "disk"};
      EventBatch b;
      b.ts = ++ts;
      for (int k = 0, n = 1 + static_cast<int>(rng() % 3); k < n; ++k) {
        int kind = static_cast<int>(rng() % 100);
        std::vector<BlockHash> hs;
        for (int j = 0, nj = 1 + static_cast<int>(rng() % 3); j < nj; ++j) hs.push_back(H(rng() % 40));
        if (kind < 55) b.events.push_back(BlockStored{hs, std::nullopt, {}, 16, std::nullopt, media[rng() % 6]});
        else if (kind < 97) b.events.push_back(BlockRemoved{hs, media[rng() % 6]});
        else b.events.push_back(AllBlocksCleared{});
      }
      return b;
    };
    // One step of the world; `publishing` false once the stream has ended.
    auto step = [&](int t, bool publishing) {
      if (publishing && chance(0.5)) {
        auto f = pub->publish(random_events());
        if (!chance(0.2)) {
          size_t back = std::min<size_t>(rng() % 4, live.size() - epoch_start);
          live.insert(live.end() - static_cast<long>(back), Frame{f.first, f.second, pub->topic, epoch});
          if (chance(0.1)) live.insert(live.end() - static_cast<long>(std::min<size_t>(rng() % 3, live.size() - epoch_start)),
                                       Frame{f.first, f.second, pub->topic, epoch});
        }
      }
      if (publishing && chance(0.01)) {  // restart: empty state, seq from 0, maybe a new topic
        ++restarts;
        auto fresh = std::make_unique<ModelPublisher>();
        fresh->cap = 2 + rng() % 12;
        fresh->topic = chance(0.3) ? "kv-" + std::to_string(t) : pub->topic;
        pub = std::move(fresh);
        ++epoch;
        epoch_start = live.size();
        reply.clear();  // the old process's answer dies with it
        reply_ready = false;
        reply_lost = asked.has_value();
        reconnect_at = -2;  // once the old connection's frames are consumed
      }
      if (!live.empty() && chance(0.6)) {
        Frame f = std::move(live.front());
        live.pop_front();
        if (epoch_start > 0) --epoch_start;
        take(sq.feed(Src::Live, f.seq, f.payload, f.topic));
      }
      if (reconnect_at == -2 && (live.empty() || live.front().epoch == epoch)) reconnect_at = t + static_cast<int>(rng() % 4);
      if (reconnect_at >= 0 && t >= reconnect_at) {
        reconnect_at = -1;
        take(sq.reconnected());
      }
      if (asked && reply_delay-- <= 0) {
        if (reply_lost) {
          asked.reset();
          take(sq.replay_failed());
        } else {
          if (!reply_ready) {  // the publisher answers with what it has when it reads the request
            for (auto& f : pub->answer(*asked)) reply.push_back(f);
            reply_ready = true;
          }
          for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n && asked; ++k) {
            if (reply.empty()) {
              asked.reset();
              take(sq.replay_end());
              break;  // a new request (if any) is answered from a later step
            } else {
              auto f = std::move(reply.front());
              reply.pop_front();
              take(sq.feed(Src::Replay, f.first, f.second));
            }
          }
        }
      }
      if (!asked && chance(0.03)) {
        take(sq.idle());
      }
    };

    take(sq.start());
    int t = 0;
    for (; t < 400; ++t) step(t, true);
    for (int guard = 0; guard < 2000 && (!live.empty() || asked || reconnect_at != -1); ++guard) step(t++, false);
    // The stream has ended: quiet-time polls answered in full until nothing is missing.
    for (int round = 0; round < 20 && !(sq.synced() && !asked && m.held == pub->state); ++round) {
      if (!asked) take(sq.idle());
      reply_lost = false;
      reply_delay = 0;
      for (int guard = 0; guard < 1000 && asked; ++guard) step(t++, false);
    }
    ASSERT_TRUE(m.held == pub->state) << "seed " << seed;
    ASSERT_TRUE(sq.synced()) << "seed " << seed;
    snapshots += static_cast<int>(sq.stats().barriers);
    gaps += static_cast<int>(sq.stats().gaps);
  }
  if (!only && seeds >= 300) {  // the run exercised what it is meant to
    EXPECT_GT(restarts, static_cast<int>(seeds / 6));
    EXPECT_GT(snapshots, static_cast<int>(seeds / 6));
    EXPECT_GT(gaps, static_cast<int>(seeds));
  }
}

// ---------------------------------------------------------------- over loopback TCP

namespace {

// What the subscriber thread handed out, per instance.
struct Follower {
  std::mutex mu;
  std::map<std::string, HeldBlocks> held;
  std::map<std::string, std::vector<int64_t>> seqs;
  std::map<std::string, int> resets;

  SubscriberSet::BatchFn on_batch() {
    return [this](const std::string& id, int64_t seq, const EventBatch& b) {
      std::lock_guard<std::mutex> lk(mu);
      held[id].apply(b);
      seqs[id].push_back(seq);
    };
  }
  SubscriberSet::ResetFn on_reset() {
    return [this](const std::string& id) {
      std::lock_guard<std::mutex> lk(mu);
      held[id].clear();
      seqs[id].clear();
      ++resets[id];
    };
  }
  bool holds(const std::string& id, const HeldBlocks& want) {
    std::lock_guard<std::mutex> lk(mu);
    return held[id] == want;
  }
  std::vector<int64_t> seqs_of(const std::string& id) {
    std::lock_guard<std::mutex> lk(mu);
    return seqs[id];
  }
  int resets_of(const std::string& id) {
    std::lock_guard<std::mutex> lk(mu);
    return resets[id];
  }
};

template <class F>
bool eventually(F f, double seconds = 10) {
  auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!f()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

SubscriberParams quick() {
  SubscriberParams p;
  p.replay_timeout_s = 0.5;
  p.idle_poll_s = 0.2;
  return p;
}

int port_of(const std::string& endpoint) { return std::stoi(endpoint.substr(endpoint.rfind(':') + 1)); }

// n batches of random stores and removals (and a clear now and then) through the publisher,
// mirrored in `model`; each batch flushed on its own so seqs advance.
void publish_some(Publisher& pub, HeldBlocks& model, std::mt19937_64& rng, int n, uint64_t salt = 0) {
  static const char* media[] = {"L1", "DRAM", "SSD"};
  for (int i = 0; i < n; ++i) {
    std::vector<BlockHash> hs;
    for (int k = 0, nk = 1 + static_cast<int>(rng() % 4); k < nk; ++k) hs.push_back(H(rng() % 64, salt));
    const char* m = media[rng() % 3];
    int kind = static_cast<int>(rng() % 100);
    if (kind < 60) {
      pub.stored(hs, std::nullopt, {1, 2, 3}, 16, m);
      model.apply(BlockStored{hs, std::nullopt, {1, 2, 3}, 16, std::nullopt, m});
    } else if (kind < 98) {
      pub.removed(hs, m);
      model.apply(BlockRemoved{hs, m});
    } else {
      pub.cleared();
      model.apply(AllBlocksCleared{});
    }
    ASSERT_TRUE(pub.flush());
  }
}

}  // namespace

TEST(KvEventsNet, BatchesArriveInOrder) {
  auto pub = Publisher::start(PublisherParams{});
  ASSERT_TRUE(pub.ok()) << pub.error();
  EXPECT_EQ((*pub)->pub_endpoint().rfind("tcp://127.0.0.1:", 0), 0u);
  EXPECT_NE((*pub)->pub_endpoint(), (*pub)->replay_endpoint());
  Follower f;
  auto subs = SubscriberSet::start(quick(), f.on_batch(), f.on_reset());
  ASSERT_TRUE(subs.ok()) << subs.error();
  ASSERT_TRUE((*subs)->add("a", (*pub)->pub_endpoint(), (*pub)->replay_endpoint()).ok());
  ASSERT_TRUE(eventually([&] { return (*subs)->synced("a"); }));
  HeldBlocks model;
  std::mt19937_64 rng(1);
  publish_some(**pub, model, rng, 60);
  // Several events queued at once share a batch (the window), in their order.
  for (uint64_t h = 1000; h < 1010; ++h) (*pub)->stored({H(h)}, std::nullopt, {}, 16, "L1");
  (*pub)->removed({H(1003)}, "L1");
  for (uint64_t h = 1000; h < 1010; ++h)
    if (h != 1003) model.apply(BlockStored{{H(h)}, std::nullopt, {}, 16, std::nullopt, "L1"});
  ASSERT_TRUE((*pub)->flush());
  ASSERT_TRUE(eventually([&] { return f.holds("a", model) && (*subs)->synced("a"); })) << "never converged";
  auto seqs = f.seqs_of("a");
  auto ps = (*pub)->stats();
  ASSERT_EQ(static_cast<int64_t>(seqs.size()), ps.batches);
  for (size_t i = 0; i < seqs.size(); ++i) ASSERT_EQ(seqs[i], static_cast<int64_t>(i));
  EXPECT_LT(ps.batches, 60 + 11);  // the last 11 events did not take 11 batches
  EXPECT_EQ(ps.events, 60 + 11);
  EXPECT_EQ(f.resets_of("a"), 0);
  auto st = (*subs)->stats("a");
  ASSERT_TRUE(st);
  EXPECT_EQ(st->last_seq, ps.last_seq);
  EXPECT_EQ(st->decode_errors, 0);
}

TEST(KvEventsNet, DroppedSendsAreReplayed) {
  PublisherParams pp;
  pp.test_drop_rate = 0.3;
  auto pub = Publisher::start(pp);
  ASSERT_TRUE(pub.ok()) << pub.error();
  Follower f;
  auto subs = SubscriberSet::start(quick(), f.on_batch(), f.on_reset());
  ASSERT_TRUE(subs.ok());
  ASSERT_TRUE((*subs)->add("a", (*pub)->pub_endpoint(), (*pub)->replay_endpoint()).ok());
  ASSERT_TRUE(eventually([&] { return (*subs)->synced("a"); }));
  HeldBlocks model;
  std::mt19937_64 rng(2);
  publish_some(**pub, model, rng, 200);
  ASSERT_TRUE(eventually([&] { return f.holds("a", model) && (*subs)->synced("a"); })) << "never converged";
  // Each once, in order; a seq is passed over only when the next batch starts with
  // AllBlocksCleared (a barrier: what came before it does not matter).
  auto seqs = f.seqs_of("a");
  auto st = (*subs)->stats("a");
  int64_t jumps = 0;
  for (size_t i = 1; i < seqs.size(); ++i) {
    ASSERT_GT(seqs[i], seqs[i - 1]);
    jumps += seqs[i] != seqs[i - 1] + 1;
  }
  EXPECT_LE(jumps, st->barriers);
  EXPECT_EQ(seqs.back(), 199);
  EXPECT_GT((*pub)->stats().dropped_sends, 20);
  EXPECT_GT(st->gaps, 0);
  EXPECT_GT(st->replays, 1);
  EXPECT_EQ(st->lost, 0);
  EXPECT_EQ(f.resets_of("a"), 0);

  // Every send dropped (from the environment): the quiet-time polls alone bring the state.
  setenv("LARDER_KV_EVENTS_DROP", "1", 1);
  auto mute = Publisher::start(PublisherParams{});
  unsetenv("LARDER_KV_EVENTS_DROP");
  ASSERT_TRUE(mute.ok());
  ASSERT_TRUE((*subs)->add("mute", (*mute)->pub_endpoint(), (*mute)->replay_endpoint()).ok());
  ASSERT_TRUE(eventually([&] { return (*subs)->synced("mute"); }));
  HeldBlocks model2;
  publish_some(**mute, model2, rng, 20);
  (*mute)->stored({H(5000)}, std::nullopt, {}, 16, "DRAM");  // not empty, whatever the dice said
  model2.apply(BlockStored{{H(5000)}, std::nullopt, {}, 16, std::nullopt, "DRAM"});
  ASSERT_TRUE((*mute)->flush());
  ASSERT_TRUE(eventually([&] { return f.holds("mute", model2) && (*subs)->synced("mute"); }));
  EXPECT_EQ((*mute)->stats().dropped_sends, 21);
  EXPECT_GT((*subs)->stats("mute")->polls, 0);
  setenv("LARDER_KV_EVENTS_DROP", "lots", 1);
  auto bad = Publisher::start(PublisherParams{});
  unsetenv("LARDER_KV_EVENTS_DROP");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().find("LARDER_KV_EVENTS_DROP"), std::string::npos);
}

TEST(KvEventsNet, LateSubscriberGetsTheSnapshot) {
  PublisherParams pp;
  pp.buffer_batches = 5;
  auto pub = Publisher::start(pp);
  ASSERT_TRUE(pub.ok());
  HeldBlocks model;
  std::mt19937_64 rng(3);
  publish_some(**pub, model, rng, 40);
  ASSERT_GT(model.size(), 0u);
  Follower f;
  auto subs = SubscriberSet::start(quick(), f.on_batch(), f.on_reset());
  ASSERT_TRUE(subs.ok());
  ASSERT_TRUE((*subs)->add("late", (*pub)->pub_endpoint(), (*pub)->replay_endpoint()).ok());
  ASSERT_TRUE(eventually([&] { return f.holds("late", model) && (*subs)->synced("late"); }));
  auto seqs = f.seqs_of("late");
  ASSERT_FALSE(seqs.empty());
  EXPECT_EQ(seqs.front(), 39);  // one snapshot under the newest seq, not 40 batches
  EXPECT_GE((*pub)->stats().snapshots_served, 1);
  EXPECT_EQ((*pub)->stats().buffered, 5u);
  EXPECT_EQ((*pub)->stats().held, model.size());
  publish_some(**pub, model, rng, 10);
  ASSERT_TRUE(eventually([&] { return f.holds("late", model); }));
  EXPECT_EQ(f.seqs_of("late").back(), 49);
}

TEST(KvEventsNet, RestartedPublisherIsANewEpoch) {
  auto first = Publisher::start(PublisherParams{});
  ASSERT_TRUE(first.ok());
  PublisherParams same;
  same.pub_port = port_of((*first)->pub_endpoint());
  same.replay_port = port_of((*first)->replay_endpoint());
  // A port in use is an error, not a crash.
  auto clash = Publisher::start(same);
  ASSERT_FALSE(clash.ok());
  EXPECT_NE(clash.error().find("cannot bind"), std::string::npos) << clash.error();

  Follower f;
  auto subs = SubscriberSet::start(quick(), f.on_batch(), f.on_reset());
  ASSERT_TRUE(subs.ok());
  ASSERT_TRUE((*subs)->add("a", (*first)->pub_endpoint(), (*first)->replay_endpoint()).ok());
  HeldBlocks model;
  std::mt19937_64 rng(4);
  publish_some(**first, model, rng, 5, 1);
  ASSERT_TRUE(eventually([&] { return f.holds("a", model) && (*subs)->synced("a"); }));
  first->reset();

  // A new process on the same ports that publishes more than the old one had: its seqs run
  // past ours, so only the reconnect check sees it.
  auto second = Publisher::start(same);
  ASSERT_TRUE(second.ok()) << second.error();
  HeldBlocks model2;
  publish_some(**second, model2, rng, 12, 2);
  ASSERT_TRUE(eventually([&] { return f.resets_of("a") >= 1 && f.holds("a", model2) && (*subs)->synced("a"); }))
      << "second epoch";
  EXPECT_GE(f.resets_of("a"), 1);
  second->reset();

  // One that publishes fewer (other bytes under seqs we have) and then one that publishes nothing.
  auto third = Publisher::start(same);
  ASSERT_TRUE(third.ok());
  HeldBlocks model3;
  publish_some(**third, model3, rng, 1, 3);
  (*third)->stored({H(7, 3)}, std::nullopt, {}, 16, "SSD");
  model3.apply(BlockStored{{H(7, 3)}, std::nullopt, {}, 16, std::nullopt, "SSD"});
  ASSERT_TRUE((*third)->flush());
  ASSERT_TRUE(eventually([&] { return f.resets_of("a") >= 2 && f.holds("a", model3) && (*subs)->synced("a"); }))
      << "third epoch";
  third->reset();
  auto fourth = Publisher::start(same);
  ASSERT_TRUE(fourth.ok());
  ASSERT_TRUE(eventually([&] { return f.resets_of("a") >= 3 && f.holds("a", HeldBlocks{}) && (*subs)->synced("a"); }))
      << "fourth epoch";
}

TEST(KvEventsNet, RemoveAndDeadPublishers) {
  auto a = Publisher::start(PublisherParams{});
  auto b = Publisher::start(PublisherParams{});
  ASSERT_TRUE(a.ok() && b.ok());
  // Endpoints where nothing listens any more.
  std::string dead_pub, dead_replay;
  {
    auto gone = Publisher::start(PublisherParams{});
    ASSERT_TRUE(gone.ok());
    dead_pub = (*gone)->pub_endpoint();
    dead_replay = (*gone)->replay_endpoint();
  }
  Follower f;
  auto subs = SubscriberSet::start(quick(), f.on_batch(), f.on_reset());
  ASSERT_TRUE(subs.ok());
  EXPECT_FALSE((*subs)->add("x", "nonsense", "").ok());
  EXPECT_FALSE((*subs)->add("x", "tcp://127.0.0.1:notaport", "").ok());
  ASSERT_TRUE((*subs)->add("dead", dead_pub, dead_replay).ok());
  ASSERT_TRUE((*subs)->add("a", (*a)->pub_endpoint(), (*a)->replay_endpoint()).ok());
  ASSERT_TRUE((*subs)->add("b", (*b)->pub_endpoint(), (*b)->replay_endpoint()).ok());
  HeldBlocks ma, mb;
  std::mt19937_64 rng(5);
  publish_some(**a, ma, rng, 10);
  publish_some(**b, mb, rng, 10);
  ASSERT_TRUE(eventually([&] { return f.holds("a", ma) && f.holds("b", mb); }));
  // The dead one keeps retrying on its own without holding the others up.
  ASSERT_TRUE(eventually([&] { return (*subs)->stats("dead")->replays >= 3; }));
  EXPECT_FALSE((*subs)->synced("dead"));
  EXPECT_TRUE((*subs)->synced("a"));

  ASSERT_TRUE((*subs)->remove("a").ok());
  const size_t before = f.seqs_of("a").size();
  EXPECT_FALSE((*subs)->stats("a"));
  EXPECT_FALSE((*subs)->synced("a"));
  EXPECT_EQ((*subs)->ids(), (std::vector<std::string>{"b", "dead"}));
  publish_some(**a, ma, rng, 5);
  publish_some(**b, mb, rng, 5);
  ASSERT_TRUE(eventually([&] { return f.holds("b", mb); }));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(f.seqs_of("a").size(), before);
  EXPECT_TRUE((*subs)->remove("dead").ok());
  EXPECT_TRUE((*subs)->remove("never-added").ok());

  // remove() from inside a callback: no further callbacks for that instance.
  std::atomic<int> after_remove{0};
  std::atomic<bool> removed{false};
  SubscriberSet* raw = nullptr;
  auto s2 = SubscriberSet::start(
      quick(),
      [&](const std::string& id, int64_t, const EventBatch&) {
        if (removed) ++after_remove;
        if (!removed) {
          removed = true;
          EXPECT_TRUE(raw->remove(id).ok());
        }
      },
      nullptr);
  ASSERT_TRUE(s2.ok());
  raw = s2->get();
  ASSERT_TRUE((*s2)->add("b", (*b)->pub_endpoint(), (*b)->replay_endpoint()).ok());  // replays 15 batches
  ASSERT_TRUE(eventually([&] { return removed.load(); }));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(after_remove.load(), 0);
  EXPECT_TRUE((*s2)->ids().empty());
}
