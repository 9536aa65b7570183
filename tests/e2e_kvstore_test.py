#!/usr/bin/env python3
"""End-to-end test of the tiered KV store behind `larder serve` (--kv-dram, --kv-disk).

A synthesized 4-layer model (2,048-token context) and a pool too small to keep more than
one long prompt, so every resend must come from L2 (DRAM) or L3 (SSD):
1. cold outputs from a server without tiers;
2. DRAM + SSD: a prompt evicted from the pool comes back from the tiers (cached_tokens,
   per-tier metrics) with the identical answer;
3. restart on the same directory: the prefix comes from SSD, identical answer;
   `larder kv stats|verify` agree;
4. flipped bytes and 5. a truncated segment file: detected (verify fails, corrupt records
   counted), recomputed, identical answers;
6. kill -9 during heavy write-back, restart: index consistent, identical answers;
7. a full disk (RLIMIT_FSIZE): serving goes on, the SSD tier turns off, metric raised;
8. `larder kv clear`.
"""
import concurrent.futures
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_server_test as base  # noqa: E402  (Server, req, metrics helpers)

BIN = base.BIN
log, check = base.log, base.check  # one pass/fail tally (base.passed, base.failures)


class Srv(base.Server):
    """base.Server that is stopped with SIGTERM and must exit 0."""

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        check(rc == 0, f"{self.name}: exit code {rc} after SIGTERM")


def complete(port, toks, n=8):
    st, _, body = base.req(port, "POST", "/v1/completions",
                           {"prompt": toks, "max_tokens": n, "temperature": 0, "ignore_eos": True}, timeout=120)
    if st != 200:
        return None, None, st
    j = json.loads(body)
    return j["choices"][0]["text"], j["usage"]["prompt_tokens_details"]["cached_tokens"], st


def kv(*args):
    r = subprocess.run([BIN, "kv"] + list(args), capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def segments(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".lkv"))


def main():
    if not os.path.exists(BIN):
        print("larder binary missing", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="larder_kvstore_")
    try:
        model = os.path.join(tmp, "m.gguf")
        r = subprocess.run([BIN, "synth", "--shape", "custom", "--n-embd", "256", "--n-ff", "512", "--n-layer", "4",
                            "--n-head", "4", "--n-head-kv", "2", "--n-vocab", "512", "--n-ctx", "2048", "--dtype", "f32",
                            "-o", model], capture_output=True, text=True, timeout=120)
        if not check(r.returncode == 0, f"synth: {r.stderr[-300:]}"):
            return 1
        rng = random.Random(7)
        prompts = {name: [rng.randrange(3, 512) for _ in range(600)] for name in "ABC"}
        heavy = [[rng.randrange(3, 512) for _ in range(900)] for _ in range(6)]
        want_cached = (600 - 1) // 16 * 16
        base_args = ["-m", model, "-c", "1024", "-t", "2"]
        common = base_args + ["--parallel", "1", "--kv-blocks", "70"]

        # 1. Cold answers (no tiers).
        s = Srv(common, "cold")
        s.wait_ready()
        cold = {k: complete(s.port, p)[0] for k, p in prompts.items()}
        cold_heavy = [complete(s.port, p)[0] for p in heavy]
        s.stop()
        check(all(v is not None for v in cold.values()), "cold answers")

        # 2. DRAM + SSD.
        d = os.path.join(tmp, "kv")
        s = Srv(common + ["--kv-dram", "1M", "--kv-disk", d, "--kv-disk-size", "64M"], "dram+ssd")
        s.wait_ready()
        for k in "ABC":
            text, cached, _ = complete(s.port, prompts[k])
            check(text == cold[k] and cached == 0, f"dram+ssd first {k}: {cached}")
        text, cached, _ = complete(s.port, prompts["A"])
        check(text == cold["A"], "A from tiers: identical answer")
        check(cached == want_cached, f"A from tiers: cached_tokens {cached}, want {want_cached}")
        m, _ = base.metrics(s.port)
        hits = m.get('larder_kv_tier_hits_total{tier="dram"}', 0) + m.get('larder_kv_tier_hits_total{tier="disk"}', 0)
        check(hits >= want_cached // 16, f"tier hits {hits}")
        check(m.get("larder_kv_tier_hit_tokens_total", 0) == want_cached, "tier hit tokens metric")
        check(m.get('larder_kv_load_decisions_total{decision="load"}', 0) >= want_cached // 16, "load decisions")
        check(m.get('larder_kv_tier_blocks{tier="disk"}', 0) > 0, "blocks written back to SSD")
        s.stop()

        # 3. Restart on the same directory.
        rc, out = kv("verify", "--dir", d)
        check(rc == 0 and "pass their checksums" in out, f"kv verify after clean stop: {rc} {out}")
        rc, out = kv("stats", "--dir", d)
        check(rc == 0 and "block record(s)" in out, f"kv stats: {out}")
        s = Srv(common + ["--kv-disk", d, "--kv-disk-size", "64M"], "restart")
        s.wait_ready()
        text, cached, _ = complete(s.port, prompts["A"])
        check(text == cold["A"] and cached == want_cached, f"after restart: cached {cached}, identical {text == cold['A']}")
        m, _ = base.metrics(s.port)
        check(m.get('larder_kv_tier_hits_total{tier="disk"}', 0) >= want_cached // 16, "restart: SSD hits")
        s.stop()

        # 4. Flipped bytes in the middle of every segment (payload area).
        for f in segments(d):
            size = os.path.getsize(f)
            with open(f, "r+b") as fh:
                for off in (size // 3, size // 2, 2 * size // 3):
                    fh.seek(off)
                    b = fh.read(1)
                    fh.seek(off)
                    fh.write(bytes([b[0] ^ 0x5A]))
        rc, out = kv("verify", "--dir", d)
        check(rc == 1 and "corrupt" in out, f"kv verify finds flipped bytes: {rc} {out}")
        s = Srv(common + ["--kv-disk", d, "--kv-disk-size", "64M"], "flipped")
        s.wait_ready()
        for k in "ABC":
            text, cached, _ = complete(s.port, prompts[k])
            check(text == cold[k], f"flipped bytes: {k} identical (cached {cached})")
        m, _ = base.metrics(s.port)
        bad = m.get("larder_kv_disk_corrupt_records_total", 0) + m.get("larder_kv_load_failed_total", 0)
        check(bad > 0, "flipped bytes counted")
        s.stop()

        # 5. A truncated segment file.
        for f in segments(d):
            os.truncate(f, int(os.path.getsize(f) * 0.6))
        s = Srv(common + ["--kv-disk", d, "--kv-disk-size", "64M"], "truncated")
        s.wait_ready()
        for k in "ABC":
            text, cached, _ = complete(s.port, prompts[k])
            check(text == cold[k], f"truncated: {k} identical (cached {cached})")
        m, _ = base.metrics(s.port)
        check(m.get("larder_kv_disk_corrupt_records_total", 0) > 0, "truncation counted")
        s.stop()

        # 6. kill -9 during heavy write-back, then restart.
        e = os.path.join(tmp, "kv9")
        s = Srv(base_args + ["--kv-disk", e, "--kv-disk-size", "64M", "--parallel", "2", "--kv-blocks", "140"], "kill9")
        s.wait_ready()
        pool = concurrent.futures.ThreadPoolExecutor(6)
        futs = [pool.submit(complete, s.port, p) for p in heavy]
        # Kill once some blocks are on disk and requests are still running.
        t = time.time()
        while time.time() - t < 30:
            m, _ = base.metrics(s.port)
            if m.get('larder_kv_tier_blocks{tier="disk"}', 0) >= 60:
                break
            time.sleep(0.01)
        s.proc.kill()
        s.proc.wait(timeout=10)
        for f in futs:
            try:
                f.result(timeout=10)
            except Exception:
                pass
        pool.shutdown()
        rc, out = kv("stats", "--dir", e)
        log(f"after kill -9: {out.strip()}")
        s = Srv(base_args + ["--kv-disk", e, "--kv-disk-size", "64M", "--parallel", "2", "--kv-blocks", "140"], "kill9-restart")
        s.wait_ready()
        got = [complete(s.port, p) for p in heavy]
        check(all(g[0] == c for g, c in zip(got, cold_heavy)), "after kill -9: every answer identical")
        check(sum(g[1] for g in got) > 0, f"after kill -9: some prefixes from SSD ({[g[1] for g in got]})")
        s.stop()
        rc, out = kv("verify", "--dir", e)
        log(f"verify after restart + clean stop: {out.strip()}")

        # 7. Full disk: the file-size limit makes SSD writes fail; serving goes on.
        f_dir = os.path.join(tmp, "kvfull")

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

        s = Srv(common + ["--kv-disk", f_dir, "--kv-disk-size", "64M"], "full", preexec=limit)
        s.wait_ready()
        for k in "ABC":
            text, cached, st = complete(s.port, prompts[k])
            check(st == 200 and text == cold[k], f"full disk: {k} served ({st})")
        time.sleep(0.3)
        m, _ = base.metrics(s.port)
        check(m.get("larder_kv_disk_disabled", 0) == 1, "full disk: larder_kv_disk_disabled == 1")
        check(m.get("larder_kv_disk_write_errors_total", 0) >= 1, "full disk: write error counted")
        text, cached, st = complete(s.port, prompts["A"])
        check(st == 200 and text == cold["A"], "full disk: still serving")
        s.stop()
        check(any("disk tier disabled" in line for line in s.lines), "full disk: error logged")

        # 8. kv clear; errors for bad use.
        rc, out = kv("clear", "--dir", d)
        check(rc == 0 and "cleared" in out, f"kv clear: {out}")
        rc, out = kv("stats", "--dir", d)
        check(rc == 0 and " 0 block record(s)" in out, f"stats after clear: {out}")
        rc, out = kv("stats", "--dir", os.path.join(tmp, "nope"))
        check(rc == 1 and out.startswith("larder: error:") and out.count("\n") == 1, f"missing dir: {out}")
        rc, out = kv("frobnicate", "--dir", d)
        check(rc != 0 and "larder: error:" in out, f"bad action: {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{base.passed} passed, {len(base.failures)} failed")
    for f in base.failures:
        print("  " + f)
    return 1 if base.failures else 0


if __name__ == "__main__":
    sys.exit(main())
