// `larder calibrate`: what one instance of this model on this machine costs, measured on a
// real in-process engine, written as a calibration for `larder simulate` (src/sim/calibration.h).
//
//  - prefill: TTFT of one prompt alone (max_tokens 1) for a grid of (new tokens n, cached
//    prefix p): a prompt of p tokens is computed first, then one that shares those p tokens
//    and adds n fresh ones (the engine reports p cached: checked). Best of 2 per point under
//    0.5 s, in one engine pass (the step budget is raised to the largest n).
//  - decode: B requests submitted at once (ignore_eos) with short and with long contexts (a
//    cached 1,024-token prefix); once all are generating, every step yields one token each:
//    the gaps between steps, with the batch's KV tokens, are the samples.
//  - both fitted with conductor::CostFitter (non-negative least squares).
//  - tiers: a KvStore of this model's block layout, blocks put in then read back as one
//    batch (wall-clock bytes/s: what a sequence waiting for its loads sees); SSD only with
//    --disk-dir (in a scratch folder inside it, its pages dropped from the page cache
//    before the reads, removed afterwards).
//  - transfer between instances: --transfer-gbps / --transfer-latency-ms, not measured here.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "conductor/policy.h"
#include "engine/scheduler.h"
#include "kernels/attention_kv.h"
#include "kernels/kernels.h"
#include "kvcache/kv_store.h"
#include "model/model.h"
#include "sim/calibration.h"

namespace larder::cli {

namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }


// Runs requests on the engine and waits for them; token times relative to the submission.
struct Runner {
  Scheduler& s;
  int vocab;
  std::mt19937_64 rng{12345};

  std::vector<int32_t> fresh(int n) {
    std::vector<int32_t> v(n);
    for (auto& t : v) t = 3 + static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab - 3));
    return v;
  }

  struct Out {
    std::vector<double> t;  // seconds after submission, one per token
    int cached = 0;
    std::string error;
  };

  // All prompts submitted at once; returns when every one has finished.
  Result<std::vector<Out>> run(const std::vector<std::vector<int32_t>>& prompts, int max_tokens) {
    std::mutex mu;
    std::condition_variable cv;
    size_t done = 0;
    std::vector<Out> outs(prompts.size());
    const auto t0 = Clock::now();
    for (size_t i = 0; i < prompts.size(); ++i) {
      GenRequest r;
      r.prompt = prompts[i];
      r.sampling.temp = 0;
      r.max_tokens = max_tokens;
      r.ignore_eos = true;
      auto id = s.submit(std::move(r), [&, i](const TokenEvent& ev) {
        const double t = since(t0);
        std::lock_guard<std::mutex> lk(mu);
        if (ev.token >= 0) outs[i].t.push_back(t);
        outs[i].cached = ev.cached_tokens;
        if (ev.finish != FinishReason::None) {
          if (ev.finish == FinishReason::Error) outs[i].error = ev.error;
          done++;
          cv.notify_all();
        }
        return true;
      });
      if (!id.ok()) {
        // Wait for those already submitted (their callbacks use this frame).
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return done == i; });
        return Error{"the engine refused a request: " + id.error()};
      }
    }
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return done == prompts.size(); });
    for (const auto& o : outs)
      if (!o.error.empty()) return Error{"a request failed: " + o.error};
    return outs;
  }
};

// Reads `n` blocks back from a store as one batch: wall-clock bytes/s.
Result<double> read_back(kvcache::KvStore& st, const std::vector<kvcache::BlockHash>& keys, size_t block_bytes) {
  std::mutex mu;
  std::condition_variable cv;
  st.set_notify([&] {
    std::lock_guard<std::mutex> lk(mu);
    cv.notify_all();
  });
  const auto t0 = Clock::now();
  auto job = st.get_async(keys);
  std::unique_lock<std::mutex> lk(mu);
  int failed = 0;
  for (;;) {
    size_t ready = 0;
    failed = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      const int s = job->state[i].load();
      ready += s != 0;
      failed += s == 2;
    }
    if (ready == keys.size()) break;
    cv.wait_for(lk, std::chrono::milliseconds(5));
  }
  const double dt = since(t0);
  lk.unlock();
  st.set_notify({});
  if (failed) return Error{std::to_string(failed) + " of " + std::to_string(keys.size()) + " blocks could not be read back"};
  return static_cast<double>(keys.size() * block_bytes) / std::max(dt, 1e-9);
}

std::string machine_text(int threads) {
  std::string cpu = "unknown CPU";
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  return cpu + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores, " +
         (threads > 0 ? std::to_string(threads) : std::string("all")) + " threads, " + kernels::active_isa_name();
}

}  // namespace

int cmd_calibrate(Args& a) {
  if (a.model.empty()) return fail("calibrate needs -m MODEL");
  if (a.out.empty()) return fail("calibrate needs -o FILE (the calibration, JSON)");
  if (a.parallel < 1) return fail("--parallel must be at least 1");
  if (a.kv_blocks < 0) return fail("--kv-blocks must not be negative");
  if (!(a.calib_transfer_gbps > 0)) return fail("--transfer-gbps must be positive");
  if (!(a.calib_transfer_latency_ms >= 0)) return fail("--transfer-latency-ms must be >= 0");
  int64_t dram_bytes = 0, disk_bytes = 0;
  if (!a.kv_dram.empty() && (dram_bytes = parse_size(a.kv_dram)) <= 0)
    return fail("--dram-bytes: cannot read size '" + a.kv_dram + "' (e.g. 512M, 2G)");
  if (!a.kv_disk.empty() && (disk_bytes = parse_size(a.kv_disk_size)) <= 0)
    return fail("--disk-bytes: cannot read size '" + a.kv_disk_size + "' (e.g. 512M, 20G)");
  const auto t_all = Clock::now();
  auto log = [&](const char* fmt, auto... args) {
    std::fprintf(stderr, "larder calibrate: %6.1f s  ", since(t_all));
    std::fprintf(stderr, fmt, args...);
    std::fputc('\n', stderr);
  };

  auto model = load_model(a.model, "", !a.no_repack);
  if (!model.ok()) return fail(model.error());
  const Model& m = **model;
  const int vocab = m.cfg.n_vocab;
  if (vocab <= 3) return fail("the model's vocabulary is too small to make prompts from");

  // The grid, within the context. Decode batches up to the larger of --parallel and 8.
  const std::vector<int> grid_n = {16, 64, 128, 256, 512};
  const std::vector<int> grid_p = {0, 256, 1024};  // the fit's attention term extrapolates beyond
  std::vector<int> batches = {1, 2, 4, 8};
  if (a.parallel > 8) batches.push_back(std::min(a.parallel, 16));
  const int long_prefix = 1024, gen = 16;

  SchedulerParams sp;
  const int serving_step = sp.step_tokens;  // what `serve` runs with: recorded for the simulator
  sp.n_threads = a.n_threads;
  sp.max_seq_len = a.n_ctx;
  sp.parallel = std::max(a.parallel, batches.back());
  sp.step_tokens = grid_n.back();  // one pass per measured prompt
  sp.max_queue = 1024;
  sp.kv_blocks = 2048;  // the grid's prompts and the decode batches, with room to spare
  auto sched = Scheduler::create(m, sp);
  if (!sched.ok()) return fail(sched.error());
  Scheduler& S = **sched;
  const int ctx = S.max_seq_len();
  Runner run{S, vocab};
  log("model %s (%d layers), context %d, %s", a.model.c_str(), m.cfg.n_layer, ctx, machine_text(a.n_threads).c_str());

  // Warm up (thread pool, page faults of the weights).
  for (int i = 0; i < 2; ++i)
    if (auto r = run.run({run.fresh(256)}, 4); !r.ok()) return fail(r.error());

  conductor::CostFitter fitter(1024);
  json pre_samples = json::array(), dec_samples = json::array();
  // Prefill.
  for (int p : grid_p) {
    if (p + grid_n.front() + 1 > ctx) continue;
    std::vector<int32_t> prefix = run.fresh(p);
    if (p > 0)
      if (auto r = run.run({prefix}, 1); !r.ok()) return fail(r.error());
    for (int n : grid_n) {
      if (p + n + 1 > ctx) continue;
      double best = 1e30;
      for (int rep = 0; rep < 2 && (rep == 0 || best < 0.5); ++rep) {  // best of 2 where it is cheap
        std::vector<int32_t> prompt = prefix;
        const auto tail = run.fresh(n);
        prompt.insert(prompt.end(), tail.begin(), tail.end());
        auto r = run.run({prompt}, 1);
        if (!r.ok()) return fail(r.error());
        const auto& o = (*r)[0];
        if (o.cached != p)
          return fail("prefill n=" + std::to_string(n) + " p=" + std::to_string(p) + ": the engine reused " +
                      std::to_string(o.cached) + " tokens, not the " + std::to_string(p) + " of the prefix");
        if (o.t.empty()) return fail("a prefill produced no token");
        best = std::min(best, o.t[0]);
      }
      fitter.add_prefill(n, p, best);
      pre_samples.push_back({n, p, best});
      log("prefill %4d new tokens after %4d cached: %8.1f ms", n, p, 1e3 * best);
    }
  }
  // Decode.
  std::vector<int32_t> shared = run.fresh(std::min(long_prefix, std::max(16, ctx / 2)));
  if (auto r = run.run({shared}, 1); !r.ok()) return fail(r.error());
  for (int B : batches) {
    for (bool longctx : {false, true}) {
      std::vector<std::vector<int32_t>> prompts;
      std::vector<int> plen;
      for (int i = 0; i < B; ++i) {
        std::vector<int32_t> pr;
        if (longctx) pr = shared;
        const auto tail = run.fresh(longctx ? 16 : 32);
        pr.insert(pr.end(), tail.begin(), tail.end());
        plen.push_back(static_cast<int>(pr.size()));
        prompts.push_back(std::move(pr));
      }
      if (plen[0] + gen + 1 > ctx) continue;
      auto r = run.run(prompts, gen);
      if (!r.ok()) return fail(r.error());
      // Steps where every sequence generates: token k of each (k >= 1) came from one step.
      std::vector<double> gaps;
      for (int k = 2; k < gen; ++k) {
        double tk = 0, tprev = 0;
        for (const auto& o : *r) {
          if (static_cast<int>(o.t.size()) <= k) return fail("a decode request ended early");
          tk = std::max(tk, o.t[k]);
          tprev = std::max(tprev, o.t[k - 1]);
        }
        int64_t kv = 0;
        for (int i = 0; i < B; ++i) kv += plen[i] + k;  // KV tokens the step attends over
        const double dt = tk - tprev;
        if (dt > 0) {
          fitter.add_decode(B, static_cast<double>(kv), dt);
          dec_samples.push_back({B, kv, dt});
          gaps.push_back(dt);
        }
      }
      std::sort(gaps.begin(), gaps.end());
      log("decode batch %2d, %4d-token contexts: step %6.2f ms (median of %zu)", B, plen[0] + gen / 2,
          gaps.empty() ? 0.0 : 1e3 * gaps[gaps.size() / 2], gaps.size());
    }
  }
  const conductor::CostModel cost = fitter.fit(conductor::CostModel{});
  // Fit quality: relative errors on the samples.
  auto rel = [](double pred, double got) { return got > 0 ? std::fabs(pred - got) / got : 0.0; };
  double pre_err = 0, dec_err = 0;
  for (const auto& s : pre_samples) pre_err += rel(cost.prefill_s(s[0].get<double>(), s[1].get<double>()), s[2].get<double>());
  for (const auto& s : dec_samples) dec_err += rel(cost.decode_step_s(s[0].get<double>(), s[1].get<double>()), s[2].get<double>());
  pre_err /= std::max<size_t>(1, pre_samples.size());
  dec_err /= std::max<size_t>(1, dec_samples.size());
  log("fit: prefill_s(n, p) = %.3g + %.3g n + %.3g n (p + n/2)  (mean error %.1f%%)", cost.a, cost.b, cost.c, 100 * pre_err);
  log("fit: decode_step_s(B, ctx) = %.3g + %.3g B + %.3g ctx  (mean error %.1f%%)", cost.d0, cost.d1, cost.d2, 100 * dec_err);

  // Tiers, on this model's block layout (the engine pool's f16 K/V).
  kvcache::KvLayout lay;
  lay.model_id = "larder-calibrate";
  lay.k_type = sp.type_k;
  lay.v_type = sp.type_v;
  lay.n_layer = m.cfg.n_layer;
  lay.kv_dim = m.cfg.n_head_kv * m.cfg.head_dim;
  lay.block_size = sp.block_size;
  lay.group = m.cfg.head_dim;
  const size_t bb = lay.block_bytes();
  const int n_tier = static_cast<int>(std::clamp<int64_t>((64ll << 20) / static_cast<int64_t>(bb), 16, 512));
  std::vector<kvcache::BlockHash> keys(n_tier);
  std::vector<uint8_t> payload(bb);
  for (auto& x : payload) x = static_cast<uint8_t>(run.rng());
  for (int i = 0; i < n_tier; ++i) keys[i] = kvcache::BlockHash{0x5EEDull + static_cast<uint64_t>(i), 0xCA11Bull};
  json tiers = json::object();
  double dram_bw = 0, disk_bw = 0;
  {
    kvcache::KvStoreParams kp;
    kp.dram_bytes = static_cast<uint64_t>(bb) * (n_tier + 8);
    auto st = kvcache::KvStore::open(lay, kp);
    if (!st.ok()) return fail("DRAM tier: " + st.error());
    for (const auto& k : keys) (*st)->put_evicted(k, payload);
    auto bw = read_back(**st, keys, bb);
    if (!bw.ok()) return fail("DRAM tier: " + bw.error());
    dram_bw = *bw;
    tiers["dram"] = {{"blocks", n_tier}, {"bytes_per_s", dram_bw}};
    log("DRAM tier: %d blocks of %zu bytes read back at %.2f GB/s", n_tier, bb, dram_bw / 1e9);
  }
  if (!a.kv_disk.empty()) {
    namespace fs = std::filesystem;
    const fs::path dir = fs::path(a.kv_disk) / ("larder-calibrate." + std::to_string(::getpid()));
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return fail("--disk-dir: cannot create " + dir.string() + ": " + ec.message());
    std::string err;
    {
      kvcache::KvStoreParams kp;
      kp.disk_dir = dir.string();
      kp.disk_bytes = static_cast<uint64_t>(bb) * (n_tier + 64) * 2;
      auto st = kvcache::KvStore::open(lay, kp);
      if (!st.ok()) {
        err = st.error();
      } else {
        for (const auto& k : keys) (*st)->put_async(k, payload);
        if (Status f = (*st)->flush(); !f.ok()) err = f.error();
        // Written and fsynced: drop them from the page cache so the reads come from the device.
        for (const auto& e : fs::directory_iterator(dir, ec)) {
          const int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
          if (fd < 0) continue;
          ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
          ::close(fd);
        }
        if (err.empty()) {
          auto bw = read_back(**st, keys, bb);
          if (!bw.ok()) err = bw.error();
          else disk_bw = *bw;
        }
      }
    }
    fs::remove_all(dir, ec);
    if (!err.empty()) return fail("SSD tier in " + a.kv_disk + ": " + err);
    tiers["disk"] = {{"blocks", n_tier}, {"bytes_per_s", disk_bw}, {"dir", a.kv_disk}};
    log("SSD tier: %d blocks read back at %.2f GB/s (%s)", n_tier, disk_bw / 1e9, a.kv_disk.c_str());
  }

  sim::Calibration c;
  c.model = std::filesystem::path(a.model).filename().string();
  c.machine = machine_text(a.n_threads);
  {
    char b[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    c.measured_at = b;
  }
  c.cost = cost;
  c.parallel = a.parallel;
  c.step_tokens = serving_step;
  c.block_size = sp.block_size;
  c.max_seq_len = ctx;
  // As `serve`: --kv-blocks, else enough for --parallel requests of the context.
  c.kv_blocks = a.kv_blocks > 0 ? a.kv_blocks : static_cast<int64_t>(a.parallel) * ((ctx + sp.block_size - 1) / sp.block_size);
  c.block_bytes = static_cast<int64_t>(bb);
  c.dram_blocks = dram_bytes > 0 ? dram_bytes / static_cast<int64_t>(bb) : 0;
  c.dram_load_bw = dram_bw > 0 ? dram_bw : c.dram_load_bw;
  c.disk_blocks = disk_bytes > 0 && !a.kv_disk.empty() ? disk_bytes / static_cast<int64_t>(bb) : 0;
  c.disk_load_bw = disk_bw > 0 ? disk_bw : c.disk_load_bw;
  c.transfer_bw = a.calib_transfer_gbps * 1e9;
  c.transfer_latency_s = a.calib_transfer_latency_ms / 1e3;
  json extra = json::object();
  extra["samples"] = {{"prefill", pre_samples}, {"decode", dec_samples}, {"tiers", tiers}};
  extra["fit"] = {{"prefill_mean_rel_error", pre_err}, {"decode_mean_rel_error", dec_err},
                  {"threads", a.n_threads}, {"seconds", since(t_all)}};
  c.extra_json = extra.dump();
  const std::string text = sim::calibration_json(c);
  std::ofstream f(a.out);
  if (!f || !(f << text) || !(f.flush())) return fail("cannot write " + a.out);
  S.shutdown(false);
  log("wrote %s", a.out.c_str());
  return 0;
}

}  // namespace larder::cli
