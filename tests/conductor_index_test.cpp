// The conductor's global KV index against a model: random publishers (stored / removed /
// cleared per medium), their batches delivered through the Sequencer with drops, duplicates
// and reordering, replays answered from a bounded buffer (with a snapshot when it no longer
// reaches back), publisher restarts; at the end the index holds exactly what each publisher
// holds. Holdings (leading blocks per instance and medium) are checked against a brute force.
#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <map>
#include <random>

#include "conductor/index.h"
#include "kvevents/events.h"
#include "kvevents/subscriber.h"

namespace larder {
namespace {

using conductor::KvIndex;
using kvcache::BlockHash;
using kvcache::Medium;
using kvevents::EventBatch;
using kvevents::HeldBlocks;
using kvevents::Sequencer;

uint8_t bit(Medium m) { return m == Medium::L1 ? conductor::kL1 : m == Medium::Dram ? conductor::kDram : conductor::kDisk; }

// The index's entries of one instance, as (name, bits), from a HeldBlocks model.
std::vector<std::pair<BlockHash, uint8_t>> model_entries(const HeldBlocks& h) {
  std::map<std::pair<uint64_t, uint64_t>, uint8_t> m;
  for (Medium md : {Medium::L1, Medium::Dram, Medium::Disk})
    for (const auto& b : h.blocks(md)) m[{b.hi, b.lo}] |= bit(md);
  std::vector<std::pair<BlockHash, uint8_t>> out;
  for (auto& [k, v] : m) out.push_back({BlockHash{k.second, k.first}, v});
  return out;
}

struct Pub {
  std::string topic = "kv";
  int64_t next = 0;
  std::deque<std::pair<int64_t, std::string>> buffer;  // replay buffer (bounded)
  HeldBlocks state;
  size_t cap = 8;
  std::string publish(EventBatch b) {
    for (const auto& e : b.events) state.apply(e);
    std::string payload = kvevents::encode(b);
    buffer.emplace_back(next, payload);
    if (buffer.size() > cap) buffer.pop_front();
    next++;
    return payload;
  }
  // The answer to a replay from `from`: (seq, payload) frames.
  std::vector<std::pair<int64_t, std::string>> replay(int64_t from) const {
    std::vector<std::pair<int64_t, std::string>> out;
    const int64_t oldest = buffer.empty() ? next : buffer.front().first;
    if (from < oldest && next > 0) {
      out.emplace_back(next - 1, kvevents::encode(state.snapshot(0)));
      return out;
    }
    for (const auto& [s, p] : buffer)
      if (s >= from) out.emplace_back(s, p);
    return out;
  }
};

TEST(ConductorIndex, RandomFaultsConverge) {
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    std::mt19937_64 rng(seed);
    std::vector<BlockHash> universe;
    for (int i = 0; i < 60; ++i) universe.push_back(BlockHash{rng(), rng()});
    const int n_inst = 3;
    std::vector<Pub> pubs(n_inst);
    std::vector<Sequencer> seqs(n_inst);
    KvIndex index;
    auto name = [](int i) { return "inst" + std::to_string(i); };
    struct Frame {
      int inst;
      bool replay;
      int64_t seq;
      std::string payload;
      bool end;
    };
    std::deque<Frame> wire;
    auto run = [&](int i, const Sequencer::Step& st) {
      if (st.reset) index.clear(name(i));
      for (const auto& [s, b] : st.apply) index.apply(name(i), b);
      if (st.replay_from) {
        for (auto& [s, p] : pubs[i].replay(*st.replay_from)) wire.push_back({i, true, s, p, false});
        wire.push_back({i, true, -1, "", true});
      }
    };
    for (int i = 0; i < n_inst; ++i) run(i, seqs[i].start());
    for (int step = 0; step < 400; ++step) {
      const int i = static_cast<int>(rng() % n_inst);
      // The publisher changes state.
      if (rng() % 60 == 0) {
        // Restart: a new epoch counting from 0, nothing held. The old process's frames die with
        // its connections (nothing of it arrives later); the subscriber sees the reconnect and its
        // replay in flight, if any, time out.
        pubs[i] = Pub{};
        wire.erase(std::remove_if(wire.begin(), wire.end(), [&](const Frame& f) { return f.inst == i; }), wire.end());
        if (seqs[i].replay_in_flight()) run(i, seqs[i].replay_failed());
        run(i, seqs[i].reconnected());
        EventBatch b;
        b.events.push_back(kvevents::AllBlocksCleared{});
        std::string p = pubs[i].publish(b);
        wire.push_back({i, false, 0, p, false});
      } else {
        EventBatch b;
        const int n = 1 + static_cast<int>(rng() % 4);
        for (int k = 0; k < n; ++k) {
          const Medium m = static_cast<Medium>(rng() % 3);
          const BlockHash h = universe[rng() % universe.size()];
          if (rng() % 3) {
            kvevents::BlockStored s;
            s.hashes = {h};
            s.block_size = 16;
            s.medium = kvcache::medium_name(m);
            b.events.push_back(s);
          } else {
            kvevents::BlockRemoved r;
            r.hashes = {h};
            r.medium = kvcache::medium_name(m);
            b.events.push_back(r);
          }
        }
        if (rng() % 50 == 0) b.events.insert(b.events.begin(), kvevents::AllBlocksCleared{});
        const int64_t s = pubs[i].next;
        std::string p = pubs[i].publish(b);
        // The live frame: dropped, duplicated, or delayed (reordered).
        const int fate = static_cast<int>(rng() % 10);
        if (fate == 0) {
        } else if (fate == 1) {
          wire.push_back({i, false, s, p, false});
          wire.push_back({i, false, s, p, false});
        } else if (fate == 2 && !wire.empty()) {
          wire.insert(wire.begin() + static_cast<long>(rng() % wire.size()), {i, false, s, p, false});
        } else {
          wire.push_back({i, false, s, p, false});
        }
      }
      // Deliver a few frames.
      for (int k = 0; k < 3 && !wire.empty(); ++k) {
        Frame f = wire.front();
        wire.pop_front();
        if (f.end) run(f.inst, seqs[f.inst].replay_end());
        else run(f.inst, seqs[f.inst].feed(f.replay ? Sequencer::Source::Replay : Sequencer::Source::Live, f.seq, f.payload, "kv"));
      }
    }
    // Quiesce: deliver everything, then poll for lost tails until nothing moves.
    for (int round = 0; round < 50; ++round) {
      while (!wire.empty()) {
        Frame f = wire.front();
        wire.pop_front();
        if (f.end) run(f.inst, seqs[f.inst].replay_end());
        else run(f.inst, seqs[f.inst].feed(f.replay ? Sequencer::Source::Replay : Sequencer::Source::Live, f.seq, f.payload, "kv"));
      }
      bool idle = true;
      for (int i = 0; i < n_inst; ++i)
        if (!seqs[i].replay_in_flight()) {
          run(i, seqs[i].idle());
          idle &= wire.empty();
        }
      if (idle && wire.empty()) break;
    }
    for (int i = 0; i < n_inst; ++i) {
      SCOPED_TRACE("seed " + std::to_string(seed) + " instance " + std::to_string(i));
      EXPECT_TRUE(seqs[i].synced());
      const auto& ss = seqs[i].stats();
      SCOPED_TRACE("next " + std::to_string(pubs[i].next) + " last_seq " + std::to_string(ss.last_seq) + " resets " +
                   std::to_string(ss.resets) + " gaps " + std::to_string(ss.gaps) + " lost " + std::to_string(ss.lost) +
                   " barriers " + std::to_string(ss.barriers) + " dups " + std::to_string(ss.duplicates));
      EXPECT_EQ(index.entries(name(i)), model_entries(pubs[i].state));
      auto c = index.counts()[name(i)];
      EXPECT_EQ(c.l1, static_cast<int64_t>(pubs[i].state.blocks(Medium::L1).size()));
      EXPECT_EQ(c.dram, static_cast<int64_t>(pubs[i].state.blocks(Medium::Dram).size()));
      EXPECT_EQ(c.disk, static_cast<int64_t>(pubs[i].state.blocks(Medium::Disk).size()));
    }
  }
}

TEST(ConductorIndex, HoldingsMatchBruteForce) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    KvIndex index;
    std::vector<BlockHash> chain;
    for (int j = 0; j < 12; ++j) chain.push_back(BlockHash{rng(), rng()});
    std::vector<std::string> ids = {"a", "b", "c", "d"};
    std::map<std::string, std::map<int, uint8_t>> held;
    for (const auto& id : ids)
      for (int j = 0; j < 12; ++j) {
        uint8_t bits = static_cast<uint8_t>(rng() % 8);
        if (rng() % 4 == 0) bits = 0;
        if (!bits) continue;
        held[id][j] = bits;
        for (uint8_t b : {conductor::kL1, conductor::kDram, conductor::kDisk})
          if (bits & b) index.stored(id, std::span<const BlockHash>(&chain[j], 1), b);
      }
    auto h = index.holdings(chain, ids);
    for (size_t i = 0; i < ids.size(); ++i) {
      conductor::Holding want;
      bool in_l1 = true;
      for (int j = 0; j < 12; ++j) {
        uint8_t m = held[ids[i]].count(j) ? held[ids[i]][j] : 0;
        if (in_l1 && (m & conductor::kL1)) {
          want.l1++;
        } else if (m & (conductor::kDram | conductor::kDisk)) {
          in_l1 = false;
          if (m & conductor::kDram) want.dram++;
          else want.disk++;
        } else {
          break;
        }
      }
      EXPECT_EQ(h[i].l1, want.l1);
      EXPECT_EQ(h[i].dram, want.dram);
      EXPECT_EQ(h[i].disk, want.disk);
    }
    // An instance that left holds nothing; the others are untouched.
    index.clear("a");
    auto h2 = index.holdings(chain, ids);
    EXPECT_EQ(h2[0].total(), 0);
    for (size_t i = 1; i < ids.size(); ++i) EXPECT_EQ(h2[i].total(), h[i].total());
  }
}

TEST(ConductorIndex, MediumNames) {
  EXPECT_EQ(conductor::medium_bit("L1"), conductor::kL1);
  EXPECT_EQ(conductor::medium_bit("gpu"), conductor::kL1);
  EXPECT_EQ(conductor::medium_bit(""), conductor::kL1);
  EXPECT_EQ(conductor::medium_bit("CPU"), conductor::kDram);
  EXPECT_EQ(conductor::medium_bit("DRAM"), conductor::kDram);
  EXPECT_EQ(conductor::medium_bit("ssd"), conductor::kDisk);
  EXPECT_EQ(conductor::medium_bit("DISK"), conductor::kDisk);
}

}  // namespace
}  // namespace larder
