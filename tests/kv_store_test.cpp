// Tiered KV store: the 8-bit codec's error bound, the DRAM tier's eviction policies
// against a model, the store (DRAM + SSD, async write-back, reader pool) driven at
// random with restarts against a model of what must be present, and the scheduler:
// output with blocks loaded from DRAM or SSD (after a restart) equals a cold run.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <list>
#include <map>
#include <random>
#include <thread>

#include "engine/scheduler.h"
#include "kvcache/kv_store.h"
#include "model/synth.h"
#include "test_model.h"

using namespace larder;
using namespace larder::kvcache;

namespace {

BlockHash key(uint64_t i) { return BlockHash{i * 0x9E3779B97F4A7C15ull + 1, i}; }

std::vector<uint8_t> payload(uint64_t k, size_t n) {
  std::vector<uint8_t> v(n);
  std::mt19937_64 r(k * 7 + 3);
  for (auto& b : v) b = static_cast<uint8_t>(r());
  return v;
}

// An f32 layout of "test-model" (block bytes = n_layer * 2 * block_size * kv_dim * 4).
KvLayout test_layout(int n_layer, int kv_dim, int block_size) {
  KvLayout l;
  l.model_id = "test-model";
  l.n_layer = n_layer;
  l.kv_dim = kv_dim;
  l.block_size = block_size;
  return l;
}

std::string tmpdir(const char* tag) {
  auto p = std::filesystem::temp_directory_path() / (std::string("larder_kvs_") + tag + "_" + std::to_string(getpid()));
  std::filesystem::remove_all(p);
  return p.string();
}

}  // namespace

TEST(KvStore, Q8CodecErrorIsWithinHalfAStep) {
  std::mt19937 r(5);
  std::normal_distribution<float> nd(0, 2);
  for (int n : {1, 63, 64, 65, 200, 1024}) {
    for (int group : {32, 64, 128}) {
      std::vector<float> x(n), y(n);
      for (auto& v : x) v = nd(r);
      if (n > 10) x[7] = 40;  // an outlier only hurts its own group
      auto enc = q8_encode(x, group);
      EXPECT_EQ(enc.size(), static_cast<size_t>(n) + 4 * ((n + group - 1) / group));
      q8_decode(enc, y, group);
      for (int g = 0; g * group < n; ++g) {
        float amax = 0;
        for (int i = g * group; i < std::min(n, (g + 1) * group); ++i) amax = std::max(amax, std::fabs(x[i]));
        for (int i = g * group; i < std::min(n, (g + 1) * group); ++i)
          ASSERT_LE(std::fabs(x[i] - y[i]), amax / 127.0f * 0.5f + 1e-6f) << n << " " << group << " " << i;
      }
    }
  }
}

TEST(KvStore, DramLruMatchesAModelAndLfuKeepsHotBlocks) {
  const size_t B = 1000;
  DramTier lru(10 * B, EvictPolicy::LRU, false);
  std::list<uint64_t> model;  // most recent at the back
  std::mt19937 r(11);
  std::vector<uint8_t> out;
  for (int step = 0; step < 3000; ++step) {
    const uint64_t k = r() % 30;
    if (r() % 3 == 0) {
      lru.put(key(k), payload(k, B));
      model.remove(k);
      model.push_back(k);
      if (model.size() > 10) model.pop_front();
    } else {
      const bool hit = lru.get(key(k), out, /*take=*/false);
      const bool want = std::find(model.begin(), model.end(), k) != model.end();
      ASSERT_EQ(hit, want) << step;
      if (hit) {
        ASSERT_EQ(out, payload(k, B));
        model.remove(k);
        model.push_back(k);
      }
    }
  }
  // A hot block survives a scan of one-off blocks under LFU, not under LRU.
  for (auto policy : {EvictPolicy::LRU, EvictPolicy::LFU}) {
    DramTier t(10 * B, policy, false);
    t.put(key(1000), payload(1000, B));
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(t.get(key(1000), out, false));
    for (uint64_t k = 0; k < 30; ++k) t.put(key(k), payload(k, B));
    EXPECT_EQ(t.exists(key(1000)), policy == EvictPolicy::LFU);
  }
}

TEST(KvStore, RandomizedWithRestartsAgainstModel) {
  const KvLayout layout = test_layout(2, 16, 4);  // 1 KiB blocks
  const size_t BB = layout.block_bytes();
  const std::string dir = tmpdir("rand");
  KvStoreParams p;
  p.dram_bytes = 8 * BB;
  p.disk_dir = dir;
  p.disk_bytes = 64ull << 20;  // no SSD eviction here: everything flushed must survive
  std::map<uint64_t, bool> on_disk;  // key -> written (and not removed)
  std::list<uint64_t> dram;          // LRU model of the DRAM tier
  std::mt19937 r(21);
  auto store = KvStore::open(layout, p);
  ASSERT_TRUE(store.ok()) << store.error();
  for (int step = 0; step < 1500; ++step) {
    const uint64_t k = r() % 64;
    switch (r() % 6) {
      case 0:  // L1 evicted it
        (*store)->put_evicted(key(k), payload(k, BB));
        dram.remove(k);
        dram.push_back(k);
        if (dram.size() > 8) dram.pop_front();
        break;
      case 1:  // completed: write back
        if ((*store)->wants_write(key(k))) (*store)->put_async(key(k), payload(k, BB));
        on_disk[k] = true;
        break;
      case 2: {  // batched async read of a few keys
        std::vector<BlockHash> keys;
        std::vector<uint64_t> ids;
        while (ids.size() < 3) {  // distinct: readers run in parallel
          const uint64_t id = r() % 64;
          if (std::find(ids.begin(), ids.end(), id) != ids.end()) continue;
          ids.push_back(id);
          keys.push_back(key(id));
        }
        // No flush: a block whose write is still queued is read from the queue.
        auto job = (*store)->get_async(keys);
        for (size_t i = 0; i < ids.size(); ++i) {
          while (job->state[i].load() == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
          const bool in_dram = std::find(dram.begin(), dram.end(), ids[i]) != dram.end();
          const bool want = in_dram || on_disk[ids[i]];
          ASSERT_EQ(job->state[i].load() == 1, want) << "step " << step << " key " << ids[i];
          if (want) {
            ASSERT_EQ(job->data[i], payload(ids[i], BB));
          }
        }
        for (uint64_t id : ids) dram.remove(id);  // exclusive: a DRAM hit moved up to L1
        break;
      }
      case 3:
        if (r() % 4 == 0) {
          ASSERT_TRUE((*store)->flush().ok());
          (*store)->remove(key(k));
          dram.remove(k);
          on_disk[k] = false;
        }
        break;
      case 4:
        if (r() % 20 == 0) {  // restart: DRAM is gone, SSD contents come back
          store->reset();
          store = KvStore::open(layout, p);
          ASSERT_TRUE(store.ok()) << store.error();
          dram.clear();
          for (auto& [kk, present] : on_disk) ASSERT_EQ((*store)->where(key(kk)) == Tier::Disk, present) << kk;
        }
        break;
      default: {
        const bool in_dram = std::find(dram.begin(), dram.end(), k) != dram.end();
        const Tier want = in_dram ? Tier::Dram : on_disk[k] ? Tier::Disk : Tier::None;
        ASSERT_EQ((*store)->where(key(k)), want) << step;
      }
    }
  }
  auto st = (*store)->stats();
  EXPECT_GT(st.dram.hits, 0);
  EXPECT_GT(st.disk.hits, 0);
  EXPECT_EQ(st.write_dropped, 0);
  store->reset();
  std::filesystem::remove_all(dir);
}

// A burst of completed blocks: each is on the SSD tier the moment it is queued (where() says
// so and reads return its bytes) whether the writer has reached it or not, and every one
// is on the disk after a flush.
TEST(KvStore, BlocksQueuedForWritingAreOnTheSsdTierAtOnce) {
  const KvLayout layout = test_layout(4, 64, 16);  // 32 KiB blocks
  const size_t BB = layout.block_bytes();
  const std::string dir = tmpdir("queued");
  KvStoreParams p;
  p.disk_dir = dir;
  p.disk_bytes = 256ull << 20;
  auto store = KvStore::open(layout, p);
  ASSERT_TRUE(store.ok()) << store.error();
  const int n = 400;
  std::vector<BlockHash> keys;
  for (int k = 0; k < n; ++k) {
    ASSERT_TRUE((*store)->wants_write(key(k)));
    (*store)->put_async(key(k), payload(k, BB));
    EXPECT_FALSE((*store)->wants_write(key(k)));  // queued: not asked for again
    EXPECT_EQ((*store)->where(key(k)), Tier::Disk) << k;
    keys.push_back(key(k));
  }
  (*store)->put_async(key(0), payload(0, BB));  // a second offer is not written twice
  auto job = (*store)->get_async(keys);
  for (int k = 0; k < n; ++k) {
    while (job->state[k].load() == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
    ASSERT_EQ(job->state[k].load(), 1) << k;
    ASSERT_EQ(job->data[k], payload(k, BB)) << k;
  }
  ASSERT_TRUE((*store)->flush().ok());
  auto st = (*store)->stats();
  EXPECT_EQ(st.write_queue_hits + st.disk.hits, n);
  EXPECT_EQ(st.disk_store_bytes, static_cast<int64_t>(n * BB));  // each written once
  store->reset();
  store = KvStore::open(layout, p);  // all of them were written
  ASSERT_TRUE(store.ok()) << store.error();
  for (int k = 0; k < n; ++k) EXPECT_EQ((*store)->where(key(k)), Tier::Disk) << k;
  store->reset();
  std::filesystem::remove_all(dir);
}

namespace {

larder::testing::SmallModel& fx() { return larder::testing::small_model(); }

std::vector<int32_t> prompt(int n, int seed) {
  std::vector<int32_t> v(n);
  v[0] = 1;
  for (int i = 1; i < n; ++i) v[i] = 3 + (i * 37 + seed * 101 + i * i * seed) % 390;
  return v;
}

struct Result1 {
  std::vector<int32_t> tokens;
  std::vector<float> top_logprobs;  // of the first generated token
  int cached = -1;
};

Result1 run1(Scheduler& s, const std::vector<int32_t>& p, int n) {
  GenRequest r;
  r.prompt = p;
  r.sampling.temp = 0;
  r.max_tokens = n;
  r.ignore_eos = true;
  r.n_logprobs = 5;
  Result1 out;
  std::promise<void> done;
  auto st = s.submit(r, [&](const TokenEvent& ev) {
    if (ev.token >= 0) out.tokens.push_back(ev.token);
    if (out.cached < 0) {
      out.cached = ev.cached_tokens;
      for (auto& [t, lp] : ev.top) out.top_logprobs.push_back(lp);
    }
    if (ev.finish != FinishReason::None) done.set_value();
    return true;
  });
  EXPECT_TRUE(st.ok()) << st.error();
  done.get_future().wait();
  return out;
}

SchedulerParams small_pool() {
  SchedulerParams p;
  p.parallel = 1;
  p.max_seq_len = 256;
  p.kv_blocks = 18;  // one 256-token sequence + 2: every new prompt evicts the last one
  p.n_threads = 2;
  return p;
}

}  // namespace

TEST(KvStore, SchedulerOutputFromDramOrSsdEqualsColdRun) {
  const std::string dir = tmpdir("sched");
  const auto A = prompt(200, 1), B = prompt(220, 2), C = prompt(220, 5);
  std::vector<int32_t> cold;
  {
    auto s = Scheduler::create(*fx().model, small_pool());
    ASSERT_TRUE(s.ok());
    cold = run1(**s, A, 12).tokens;
  }
  SchedulerParams p = small_pool();
  p.store.dram_bytes = 64ull << 20;
  p.store.disk_dir = dir;
  {
    auto s = Scheduler::create(*fx().model, p);
    ASSERT_TRUE(s.ok()) << s.error();
    auto a1 = run1(**s, A, 12);
    EXPECT_EQ(a1.cached, 0);
    EXPECT_EQ(a1.tokens, cold);
    run1(**s, B, 12);  // together they evict all of A's blocks from the pool into DRAM
    run1(**s, C, 12);
    auto a2 = run1(**s, A, 12);
    EXPECT_EQ(a2.cached, 192);  // 12 whole blocks, at least one token left to compute
    EXPECT_EQ(a2.tokens, cold);
    auto st = (*s)->stats();
    EXPECT_GT(st.store.dram.hits, 0);
    EXPECT_EQ(st.tier_hit_tokens, st.prefix_hit_tokens);
  }
  {
    // Restart on the same directory: the prefix comes from SSD.
    SchedulerParams q = small_pool();
    q.store.disk_dir = dir;
    auto s = Scheduler::create(*fx().model, q);
    ASSERT_TRUE(s.ok()) << s.error();
    auto a3 = run1(**s, A, 12);
    EXPECT_EQ(a3.cached, 192);
    EXPECT_EQ(a3.tokens, cold);
    EXPECT_GT((*s)->stats().store.disk.hits, 0);
  }
  std::filesystem::remove_all(dir);
}

TEST(KvStore, EightBitDramStaysWithinItsBound) {
  const auto A = prompt(200, 3), B = prompt(220, 4), C = prompt(220, 6);
  SchedulerParams p = small_pool();
  auto s0 = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s0.ok());
  auto cold = run1(**s0, A, 1);
  p.store.dram_bytes = 64ull << 20;
  p.store.dram_q8 = true;
  auto s = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s.ok());
  run1(**s, A, 1);
  run1(**s, B, 1);
  run1(**s, C, 1);
  auto warm = run1(**s, A, 1);
  EXPECT_EQ(warm.cached, 192);
  ASSERT_EQ(warm.top_logprobs.size(), cold.top_logprobs.size());
  // Stated bound: top-5 log-probabilities of the next token move by < 0.01 nats.
  float worst = 0;
  for (size_t i = 0; i < cold.top_logprobs.size(); ++i)
    worst = std::max(worst, std::fabs(warm.top_logprobs[i] - cold.top_logprobs[i]));
  EXPECT_LT(worst, 0.01f);
  std::printf("8-bit DRAM tier: max |d logprob| of the top-5 next tokens = %.5f\n", worst);
}

TEST(KvStore, RecomputesWhenLoadingWouldBeSlower) {
  const std::string dir = tmpdir("decide");
  const auto A = prompt(200, 7), B = prompt(220, 8), C = prompt(220, 9);
  SchedulerParams p = small_pool();
  p.store.disk_dir = dir;
  p.store.guess_disk_bw = 1e3;  // an SSD this slow loses to recomputing any block
  auto s = Scheduler::create(*fx().model, p);
  ASSERT_TRUE(s.ok()) << s.error();
  auto cold = run1(**s, A, 8);  // also measures the prefill speed
  run1(**s, B, 8);
  run1(**s, C, 8);  // A's blocks are now only on SSD
  auto again = run1(**s, A, 8);
  EXPECT_EQ(again.tokens, cold.tokens);
  EXPECT_EQ(again.cached, 0);  // recomputed, not loaded
  auto st = (*s)->stats();
  EXPECT_GT(st.prefill_tokens_per_s, 0);
  EXPECT_EQ(st.store.decide_load, 0);
  EXPECT_EQ(st.store.decide_recompute, 12);  // every whole block of A but the last token's
  EXPECT_EQ(st.store.disk.hits, 0);
  s->reset();
  std::filesystem::remove_all(dir);
}

// The SSD tier's layout fingerprint (and the block names) include the pool's K/V cache types:
// blocks written by a pool of one type are never served to a pool of another (their bytes would
// be read as the wrong type), while a reopen with the same types still hits.
TEST(KvStore, SsdBlocksOfOneCacheTypeAreNeverServedToAnother) {
  const auto A = prompt(200, 11);
  const std::pair<DType, DType> pairs[] = {{DType::F32, DType::F16}, {DType::F16, DType::F32}, {DType::F16, DType::BF16}};
  for (auto [writer, reader] : pairs) {
    SCOPED_TRACE(std::string(dtype_name(writer)) + " -> " + dtype_name(reader));
    const std::string dir = tmpdir("types");
    SchedulerParams p = small_pool();
    p.store.disk_dir = dir;
    p.always_load = true;
    p.type_k = p.type_v = writer;
    std::vector<int32_t> cold;
    {
      auto s = Scheduler::create(*fx().model, p);
      ASSERT_TRUE(s.ok()) << s.error();
      auto r = run1(**s, A, 8);
      EXPECT_EQ(r.cached, 0);
      cold = r.tokens;
    }  // flushed: A's 12 whole blocks are on SSD
    {
      SchedulerParams q = p;
      q.type_k = q.type_v = reader;
      auto s = Scheduler::create(*fx().model, q);
      ASSERT_TRUE(s.ok()) << s.error();
      auto st0 = (*s)->stats();
      EXPECT_EQ(st0.store.disk.blocks, 0) << "records of another cache type were indexed";
      auto r = run1(**s, A, 8);
      EXPECT_EQ(r.cached, 0);
      EXPECT_EQ((*s)->stats().store.disk.hits, 0);
    }
    {
      auto s = Scheduler::create(*fx().model, p);  // the writer's types again
      ASSERT_TRUE(s.ok()) << s.error();
      EXPECT_GT((*s)->stats().store.disk.blocks, 0);
      auto r = run1(**s, A, 8);
      EXPECT_EQ(r.cached, 192);
      EXPECT_GT((*s)->stats().store.disk.hits, 0);
      EXPECT_EQ(r.tokens, cold);
    }
    std::filesystem::remove_all(dir);
  }
}

// Typed payloads in the 8-bit DRAM tier: f16/bf16/f32 parts are quantized from their type and
// rounded back to it (within half a step of the head's absmax/127 plus the type's rounding);
// q8_0 parts are already 8-bit and come back bit for bit.
TEST(KvStore, EightBitDramOfTypedPayloads) {
  std::mt19937 r(9);
  std::normal_distribution<float> nd(0, 2);
  const int n_layer = 2, group = 32, n = 4 * 64;  // values per K or V part
  for (auto [kt, vt] : {std::pair{DType::F16, DType::F16}, std::pair{DType::BF16, DType::F32},
                        std::pair{DType::Q8_0, DType::F16}, std::pair{DType::Q8_0, DType::Q8_0}}) {
    PayloadFormat f{n_layer, kt, vt, static_cast<size_t>(n), static_cast<size_t>(n)};
    std::vector<float> src(static_cast<size_t>(n_layer) * 2 * n);
    for (auto& v : src) v = nd(r);
    std::vector<uint8_t> payload;
    std::vector<std::pair<DType, const float*>> parts;
    for (int l = 0; l < n_layer; ++l)
      for (auto [t, off] : {std::pair{kt, 2 * l * n}, std::pair{vt, (2 * l + 1) * n}}) {
        std::vector<uint8_t> b(kernels::kv_row_bytes(t, n));
        kernels::kv_from_float(t, &src[off], b.data(), n, kernels::Isa::Scalar);
        payload.insert(payload.end(), b.begin(), b.end());
        parts.emplace_back(t, &src[off]);
      }
    DramTier tier(1 << 20, EvictPolicy::LRU, true, group, f);
    tier.put(key(1), payload);
    std::vector<uint8_t> out;
    ASSERT_TRUE(tier.get(key(1), out, false));
    ASSERT_EQ(out.size(), payload.size());
    const bool all_q8 = kt == DType::Q8_0 && vt == DType::Q8_0;
    if (all_q8) {
      EXPECT_EQ(out, payload) << "a q8_0 payload is kept as it is";
    }
    size_t off = 0;
    for (auto [t, x] : parts) {
      const size_t nb = kernels::kv_row_bytes(t, n);
      std::vector<float> in(n), got(n);
      kernels::kv_to_float(t, payload.data() + off, in.data(), n);
      kernels::kv_to_float(t, out.data() + off, got.data(), n);
      if (t == DType::Q8_0) {
        EXPECT_TRUE(std::equal(out.begin() + off, out.begin() + off + nb, payload.begin() + off)) << "q8_0 part changed";
      } else {
        const double rel = t == DType::F16 ? std::ldexp(1.0, -11) : t == DType::BF16 ? std::ldexp(1.0, -8) : 0;
        for (int g = 0; g < n; g += group) {
          float amax = 0;
          for (int i = g; i < g + group; ++i) amax = std::max(amax, std::fabs(in[i]));
          for (int i = g; i < g + group; ++i)
            ASSERT_LE(std::fabs(got[i] - in[i]), amax / 127.0 * 0.5 * (1 + 1e-5) + rel * std::fabs(got[i]) + 1e-6)
                << dtype_name(t) << " value " << i;
        }
      }
      off += nb;
    }
    // Bytes kept: 8-bit (+ a scale per group) for the float parts, as they are for q8_0 parts.
    EXPECT_LT(tier.stats().bytes, static_cast<int64_t>(payload.size()) * (kt == DType::F16 ? 0.6 : 1.01));
  }
}
