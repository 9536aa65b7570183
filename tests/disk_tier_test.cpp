// SSD tier: durability across restarts, corruption and torn writes are misses (never
// wrong data), capacity eviction, disk full, and a randomized run with restarts
// checked against an in-memory model.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "kvcache/disk_tier.h"

using namespace larder;
using namespace larder::kvcache;
namespace fs = std::filesystem;

namespace {
struct TmpDir {
  std::string path;
  explicit TmpDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("larder_disk_" + tag + "_" + std::to_string(getpid()));
    fs::remove_all(path);
  }
  ~TmpDir() { fs::remove_all(path); }
};
BlockHash key(uint64_t i) { return chain_hash(root_hash({"m", "f32", 16}), std::vector<int32_t>{static_cast<int32_t>(i)}); }
std::vector<uint8_t> payload(uint64_t i, size_t n = 1000) {
  std::vector<uint8_t> v(n);
  for (size_t j = 0; j < n; ++j) v[j] = static_cast<uint8_t>(i * 131 + j * 7);
  return v;
}
std::vector<fs::path> segments(const std::string& dir) {
  std::vector<fs::path> v;
  for (auto& e : fs::directory_iterator(dir)) v.push_back(e.path());
  std::sort(v.begin(), v.end());
  return v;
}
}  // namespace

TEST(DiskTier, RoundTripRestartAndLayoutIsolation) {
  TmpDir d("rt");
  {
    auto t = DiskTier::open(d.path, 1 << 20, 111);
    ASSERT_TRUE(t.ok()) << t.error();
    for (int i = 0; i < 20; ++i) ASSERT_TRUE((*t)->put(key(i), payload(i)).ok());
    (*t)->remove(key(3));
    std::vector<uint8_t> out;
    ASSERT_TRUE((*t)->get(key(5), out));
    EXPECT_EQ(out, payload(5));
  }
  auto t = DiskTier::open(d.path, 1 << 20, 111);
  ASSERT_TRUE(t.ok());
  std::vector<uint8_t> out;
  for (int i = 0; i < 20; ++i) {
    if (i == 3) {
      EXPECT_FALSE((*t)->get(key(i), out)) << "removed blocks stay removed after a restart";
      continue;
    }
    ASSERT_TRUE((*t)->get(key(i), out)) << i;
    EXPECT_EQ(out, payload(i));
  }
  auto other = DiskTier::open(d.path, 1 << 20, 222);  // another model/layout
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE((*other)->get(key(5), out));
  EXPECT_EQ((*other)->stats().blocks, 0);
}

TEST(DiskTier, FlippedBytesAreMissesNotWrongData) {
  TmpDir d("flip");
  {
    auto t = DiskTier::open(d.path, 1 << 20, 1);
    for (int i = 0; i < 10; ++i) ASSERT_TRUE((*t)->put(key(i), payload(i)).ok());
  }
  auto seg = segments(d.path).at(0);
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(64 + 500);  // inside the first record's payload
    char c;
    f.seekg(64 + 500);
    f.get(c);
    f.seekp(64 + 500);
    f.put(static_cast<char>(c ^ 0x5a));
  }
  auto t = DiskTier::open(d.path, 1 << 20, 1);
  std::vector<uint8_t> out;
  EXPECT_FALSE((*t)->get(key(0), out));
  EXPECT_GE((*t)->stats().corrupt_records, 1);
  for (int i = 1; i < 10; ++i) {
    ASSERT_TRUE((*t)->get(key(i), out));
    EXPECT_EQ(out, payload(i));
  }
  auto v = (*t)->verify();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->corrupt_records, 1);
  // Corruption that appears while running (after open) is caught on read too.
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(3 * (64 + 1000) + 64 + 10));
    f.put('\x01');
    f.put('\x02');
  }
  EXPECT_FALSE((*t)->get(key(3), out));
}

TEST(DiskTier, TruncationAtEveryOffsetKeepsEarlierRecords) {
  TmpDir d("trunc");
  {
    auto t = DiskTier::open(d.path, 1 << 20, 1);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE((*t)->put(key(i), payload(i, 200)).ok());
  }
  auto seg = segments(d.path).at(0);
  std::vector<char> full;
  {
    std::ifstream f(seg, std::ios::binary);
    full.assign(std::istreambuf_iterator<char>(f), {});
  }
  const size_t rec = 64 + 200;
  ASSERT_EQ(full.size(), 3 * rec);
  for (size_t cut = 2 * rec; cut < full.size(); ++cut) {  // tear the last record anywhere
    {
      std::ofstream f(seg, std::ios::binary | std::ios::trunc);
      f.write(full.data(), static_cast<std::streamsize>(cut));
    }
    auto t = DiskTier::open(d.path, 1 << 20, 1);
    ASSERT_TRUE(t.ok());
    std::vector<uint8_t> out;
    EXPECT_FALSE((*t)->get(key(2), out)) << cut;
    for (int i = 0; i < 2; ++i) {
      ASSERT_TRUE((*t)->get(key(i), out)) << cut;
      ASSERT_EQ(out, payload(i, 200));
    }
    if (cut > 2 * rec) {
      EXPECT_EQ((*t)->stats().corrupt_records, 1) << cut;
    }
    for (auto& p : segments(d.path))
      if (p != seg) fs::remove(p);  // drop the fresh segment each open created
  }
}

TEST(DiskTier, CapacityEvictsOldestSegments) {
  TmpDir d("cap");
  auto t = DiskTier::open(d.path, 20 * 1064, 1, 5 * 1064);
  ASSERT_TRUE(t.ok());
  for (int i = 0; i < 100; ++i) ASSERT_TRUE((*t)->put(key(i), payload(i)).ok());
  auto st = (*t)->stats();
  EXPECT_LE(st.bytes, 20 * 1064);
  EXPECT_GT(st.evicted_blocks, 0);
  std::vector<uint8_t> out;
  EXPECT_TRUE((*t)->get(key(99), out));
  EXPECT_FALSE((*t)->get(key(0), out));
}

TEST(DiskTier, DiskFullDisablesTheTierButReadsGoOn) {
  TmpDir d("full");
  auto t = DiskTier::open(d.path, 64 << 20, 1, 64 << 20);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->put(key(1), payload(1)).ok());
  // Simulate a full disk with a file-size limit (writes past it fail with EFBIG).
  signal(SIGXFSZ, SIG_IGN);
  struct rlimit old {};
  getrlimit(RLIMIT_FSIZE, &old);
  struct rlimit lim = old;
  lim.rlim_cur = 8 * 1064;
  setrlimit(RLIMIT_FSIZE, &lim);
  Status st;
  for (int i = 2; i < 50 && st.ok(); ++i) st = (*t)->put(key(i), payload(i));
  setrlimit(RLIMIT_FSIZE, &old);
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE((*t)->stats().disabled);
  EXPECT_GE((*t)->stats().write_errors, 1);
  EXPECT_FALSE((*t)->put(key(99), payload(99)).ok());
  std::vector<uint8_t> out;
  ASSERT_TRUE((*t)->get(key(1), out));
  EXPECT_EQ(out, payload(1));
  // Space again (the limit lifted): after the back-off the next put succeeds and the tier is back.
  (*t)->set_retry_after(std::chrono::milliseconds(50));
  EXPECT_FALSE((*t)->put(key(98), payload(98)).ok());  // the 30 s back-off set by the failure still runs
  EXPECT_TRUE((*t)->disabled());
  t->reset();
  t = DiskTier::open(d.path, 64 << 20, 1, 64 << 20);
  ASSERT_TRUE(t.ok());
  (*t)->set_retry_after(std::chrono::milliseconds(50));
  setrlimit(RLIMIT_FSIZE, &lim);
  st = Status::Ok();
  for (int i = 100; i < 150 && st.ok(); ++i) st = (*t)->put(key(i), payload(i));
  setrlimit(RLIMIT_FSIZE, &old);
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE((*t)->disabled());
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  EXPECT_FALSE((*t)->disabled());
  ASSERT_TRUE((*t)->put(key(200), payload(200)).ok());
  EXPECT_FALSE((*t)->stats().disabled);
  ASSERT_TRUE((*t)->get(key(200), out));
  EXPECT_EQ(out, payload(200));
  t->reset();
  auto again = DiskTier::open(d.path, 64 << 20, 1);  // the torn tail is skipped
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE((*again)->get(key(1), out));
}

TEST(DiskTier, UnwritableDirectoryIsAnError) {
  if (geteuid() == 0) {
    // root ignores permissions; use a path under a regular file instead
    TmpDir d("unw");
    std::ofstream(d.path) << "x";
    EXPECT_FALSE(DiskTier::open(d.path + "/kv", 1 << 20, 1).ok());
    fs::remove(d.path);
  } else {
    EXPECT_FALSE(DiskTier::open("/proc/larder-kv", 1 << 20, 1).ok());
  }
}

TEST(DiskTier, RandomizedWithRestartsAgainstModel) {
  TmpDir d("rand");
  std::mt19937 rng(7);
  std::map<uint64_t, std::vector<uint8_t>> model;
  auto t = DiskTier::open(d.path, 1ull << 30, 5, 16 * 1024);
  ASSERT_TRUE(t.ok());
  for (int step = 0; step < 3000; ++step) {
    const int op = static_cast<int>(rng() % 10);
    const uint64_t k = rng() % 60;
    if (op < 5) {
      auto p = payload(k * 1000 + step, 1 + rng() % 700);
      ASSERT_TRUE((*t)->put(key(k), p).ok());
      model[k] = p;
    } else if (op < 8) {
      std::vector<uint8_t> out;
      const bool hit = (*t)->get(key(k), out);
      ASSERT_EQ(hit, model.count(k) != 0) << "step " << step;
      if (hit) {
        ASSERT_EQ(out, model[k]);
      }
    } else if (op == 8) {
      (*t)->remove(key(k));
      model.erase(k);
    } else {
      t->reset();  // restart
      t = DiskTier::open(d.path, 1ull << 30, 5, 16 * 1024);
      ASSERT_TRUE(t.ok());
      ASSERT_EQ((*t)->stats().blocks, static_cast<int64_t>(model.size())) << "step " << step;
    }
  }
  auto v = (*t)->verify();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->corrupt_records, 0);
}
