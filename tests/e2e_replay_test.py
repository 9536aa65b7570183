#!/usr/bin/env python3
"""End-to-end test of `larder replay` (trace replay against `larder serve`).

A small synthesized model (2,048-token training context) is served with -c 768 (so some
scaled requests must be clipped), a KV pool large enough never to evict during the test
(4,096 blocks) and an API key. The first 80 requests of the published trace
(shared/traces/synthetic_trace.jsonl; the first prefix hit is request 50) are replayed at
--scale 64 and --speed 100, and the test checks, against an independent Python model of
the documented scaling, clipping, token mapping and offline bounds:

- every request ok; sent/clipped counts; prompt tokens = the scaled, clipped lengths;
- dumped prompts == the documented splitmix64 mapping (ids in [3, vocab));
- reused + computed == prompt tokens; hit rate > 0 and equal to the server's /metrics
  counter deltas (as scraped by the test and as reported);
- offline unbounded hit rate (token-level longest prefix, 16-token blocks, one token
  always computed) and trace-block hit rate equal the Python ones, and the unbounded rate
  is >= the measured one;
- a second replay dumps identical prompts and reuses exactly every cacheable block;
- one-line `larder: error:` messages for a missing/corrupt trace, an unreachable server,
  a bad --scale and a missing API key.

Environment: LARDER_BIN, LARDER_SHARED (default ../shared). Exit 77 when the trace is missing.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LARDER_SHARED") or os.path.join(ROOT, "..", "shared")
TRACE = os.path.join(SHARED, "traces", "synthetic_trace.jsonl")
BIN = os.environ.get("LARDER_BIN") or os.path.join(ROOT, "build", "bin", "larder")
T_START = time.time()

SCALE, LIMIT, CTX, KEY = 64, 80, 768, "sk-replay-test"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_server_test as base  # noqa: E402  (server start, /metrics, one pass/fail tally)

log, check = base.log, base.check


def metrics(port):
    return base.metrics(port)[0]


def replay(port, *extra, key=KEY, timeout=60):
    env = dict(os.environ)
    env.pop("LARDER_API_KEY", None)
    if key:
        env["LARDER_API_KEY"] = key
    cmd = [BIN, "replay", "--url", f"http://127.0.0.1:{port}"] + list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# --- independent model of the documented mapping -------------------------------------------

M64 = (1 << 64) - 1


def splitmix_run(seed, n, vocab):
    s, out = seed & M64, []
    for _ in range(n):
        s = (s + 0x9E3779B97F4A7C15) & M64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        out.append(3 + z % (vocab - 3))
    return out


def expected_requests(trace, K, ctx, vocab):
    """(prompt tokens, max_tokens, clipped, block lengths) per request, as the README documents."""
    B = 512 // K
    out = []
    for r in trace:
        n = len(r["hash_ids"])
        rem = r["input_length"] - 512 * (n - 1)
        P = (n - 1) * B + -(-rem // K)
        M = max(1, -(-r["output_length"] // K))
        clipped = P + M > ctx
        if clipped:
            M = min(M, max(1, ctx // 2))
            P = min(P, ctx - M)
        blocks, left = [], P
        while left > 0:
            blocks.append(min(B, left))
            left -= B
        toks = []
        for h, ln in zip(r["hash_ids"], blocks):
            toks += splitmix_run(h, B, vocab)[:ln]
        out.append((toks, M, clipped, blocks))
    return out


def offline_rates(trace, reqs):
    """(unbounded hit tokens, trace-block hit tokens, prompt tokens): brute force over prompts."""
    seen_prefixes, prompts = set(), []
    ub = tb = total = 0
    for r, (toks, _, _, blocks) in zip(trace, reqs):
        P = len(toks)
        lcp = 0
        for q in prompts:
            n = 0
            m = min(len(q), P)
            while n < m and q[n] == toks[n]:
                n += 1
            lcp = max(lcp, n)
        ub += min(lcp // 16 * 16, (P - 1) // 16 * 16)
        for i, ln in enumerate(blocks):
            key = tuple(r["hash_ids"][:i + 1])
            if key in seen_prefixes:
                tb += ln
            seen_prefixes.add(key)
        prompts.append(toks)
        total += P
    return ub, tb, total


def error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return r.returncode != 0 and len(lines) == 1 and lines[0].startswith("larder: error: "), r.stderr.strip()


def main():
    if not os.path.exists(TRACE):
        print(f"skipped: {TRACE} not found (set LARDER_SHARED)")
        return 77
    if not os.path.exists(BIN):
        print(f"FAILED: larder binary not found at {BIN} (set LARDER_BIN)")
        return 1
    trace = []
    with open(TRACE) as f:
        for line in f:
            if line.strip():
                trace.append(json.loads(line))
            if len(trace) == LIMIT:
                break
    tmp = tempfile.mkdtemp(prefix="larder-e2e-replay-")
    server = None
    try:
        model = os.path.join(tmp, "small.gguf")
        r = subprocess.run([BIN, "synth", "--shape", "custom", "--n-ctx", "2048", "--seed", "7", "-o", model],
                           capture_output=True, text=True, timeout=120)
        if not check(r.returncode == 0, f"synth failed: {r.stderr[-500:]}"):
            return 1
        server = base.Server(["-m", model, "-c", str(CTX), "--kv-blocks", "4096", "--queue", "256", "-t", "2",
                              "--api-key", KEY], "replay")
        server.wait_ready()
        port = server.port
        log(f"server on port {port}")

        # 1. First replay on a cold cache.
        d1, d2 = os.path.join(tmp, "d1.jsonl"), os.path.join(tmp, "d2.jsonl")
        m0 = metrics(port)
        r = replay(port, "--trace", TRACE, "--scale", str(SCALE), "--speed", "100", "--limit", str(LIMIT), "--json",
                   "--dump-prompts", d1)
        m1 = metrics(port)
        if not check(r.returncode == 0, f"replay exit {r.returncode}: {r.stderr[-1000:]}"):
            return 1
        rep = json.loads(r.stdout)
        log(f"first replay: hit rate {rep['hit_rate']:.4f}, unbounded {rep['unbounded_hit_rate']:.4f}, "
            f"trace blocks {rep['trace_hit_rate']:.4f}, clipped {rep['clipped']}, wall {rep['wall_s']:.2f}s")
        vocab = rep["vocab"]
        check(vocab == 512, f"vocab from the server: {vocab}, want 512")
        check(rep["n_ctx"] == CTX, f"n_ctx {rep['n_ctx']}, want {CTX}")
        exp = expected_requests(trace, SCALE, CTX, vocab)
        check(rep["sent"] == LIMIT and rep["ok"] == LIMIT and rep["failed"] == 0,
              f"sent/ok/failed {rep['sent']}/{rep['ok']}/{rep['failed']}: {rep['first_error']}")
        n_clipped = sum(1 for e in exp if e[2])
        check(n_clipped > 0 and rep["clipped"] == n_clipped, f"clipped {rep['clipped']}, want {n_clipped} (> 0)")
        total_prompt = sum(len(e[0]) for e in exp)
        check(rep["prompt_tokens"] == total_prompt, f"prompt tokens {rep['prompt_tokens']}, want {total_prompt}")
        check(rep["cached_tokens"] + rep["computed_tokens"] == rep["prompt_tokens"], "reused + computed != prompt")
        check(rep["completion_tokens"] == sum(e[1] for e in exp),
              f"completion tokens {rep['completion_tokens']}, want {sum(e[1] for e in exp)} (ignore_eos)")
        check(rep["hit_rate"] > 0, f"hit rate {rep['hit_rate']} is not > 0")
        check(abs(rep["hit_rate"] - rep["cached_tokens"] / rep["prompt_tokens"]) < 1e-12, "hit_rate != cached/prompt")
        dh = m1["larder_prefix_hit_tokens_total"] - m0["larder_prefix_hit_tokens_total"]
        dp = m1["larder_prompt_tokens_total"] - m0["larder_prompt_tokens_total"]
        dc = m1["larder_prompt_tokens_computed_total"] - m0["larder_prompt_tokens_computed_total"]
        check(dh == rep["cached_tokens"] and dp == rep["prompt_tokens"],
              f"/metrics deltas hit {dh} prompt {dp} vs report {rep['cached_tokens']}/{rep['prompt_tokens']}")
        check(dc == rep["computed_tokens"], f"/metrics computed delta {dc} vs report {rep['computed_tokens']}")
        sm = rep["server_metrics"]
        check(sm and sm["prefix_hit_tokens"] == dh and sm["prompt_tokens"] == dp,
              f"report's server_metrics {sm} vs scraped {dh}/{dp}")
        ub, tb, tot = offline_rates(trace, exp)
        check(rep["planned_prompt_tokens"] == tot, f"planned prompt tokens {rep['planned_prompt_tokens']} vs {tot}")
        check(rep["unbounded_hit_tokens"] == ub, f"unbounded hit tokens {rep['unbounded_hit_tokens']}, want {ub}")
        check(abs(rep["trace_hit_rate"] - tb / tot) < 1e-12, f"trace hit rate {rep['trace_hit_rate']}, want {tb / tot}")
        # Simultaneous arrivals may reach the scheduler out of trace order, which can move a
        # 16-token block between two requests: allow a few blocks.
        check(rep["cached_tokens"] <= ub + 3 * 16,
              f"measured reuse {rep['cached_tokens']} above the unbounded bound {ub}")
        for k in ("ttft_s", "tpot_s"):
            s = rep[k]
            check(s["n"] > 0 and 0 < s["p50"] <= s["p90"] <= s["p99"], f"{k} percentiles: {s}")
        check(rep["ttft_s"]["n"] == LIMIT, f"TTFT for {rep['ttft_s']['n']} of {LIMIT} requests")
        check(rep["output_tokens_per_s"] > 0 and rep["wall_s"] > 0, "throughput / wall time")
        dumped = [json.loads(l) for l in open(d1)]
        check(len(dumped) == LIMIT, f"{len(dumped)} dumped requests")
        bad = [i for i, (d, e) in enumerate(zip(dumped, exp))
               if d["prompt"] != e[0] or d["max_tokens"] != e[1] or d["clipped"] != e[2]]
        check(not bad, f"dumped requests differ from the documented mapping at {bad[:5]}")
        check(all(3 <= t < vocab for d in dumped for t in d["prompt"]), "a token id outside [3, vocab)")

        # 2. Second replay: same prompts, and every cacheable block is reused.
        r = replay(port, "--trace", TRACE, "--scale", str(SCALE), "--speed", "100", "--limit", str(LIMIT), "--json",
                   "--dump-prompts", d2)
        if check(r.returncode == 0, f"second replay exit {r.returncode}: {r.stderr[-1000:]}"):
            rep2 = json.loads(r.stdout)
            check(open(d1, "rb").read() == open(d2, "rb").read(), "two replays dumped different prompts")
            full = sum((len(e[0]) - 1) // 16 * 16 for e in exp)
            log(f"second replay: hit rate {rep2['hit_rate']:.4f} (reused {rep2['cached_tokens']}, cacheable {full})")
            check(rep2["ok"] == LIMIT and rep2["cached_tokens"] == full,
                  f"second replay reused {rep2['cached_tokens']} tokens, want all {full} cacheable")

        # 3. Text report (few requests).
        r = replay(port, "--trace", TRACE, "--scale", str(SCALE), "--speed", "100", "--limit", "3")
        check(r.returncode == 0 and "hit rate" in r.stdout and "TTFT" in r.stdout and "sent 3  ok 3" in r.stdout,
              f"text report: {r.stdout[-800:]} {r.stderr[-300:]}")

        # 4. Errors: one `larder: error:` line each.
        bad_trace = os.path.join(tmp, "bad.jsonl")
        with open(bad_trace, "w") as f:
            f.write(json.dumps(trace[0]) + "\n{\"timestamp\": 5, \"input_length\": 10\n")
        short_trace = os.path.join(tmp, "short.jsonl")
        with open(short_trace, "w") as f:
            f.write('{"timestamp": 0, "input_length": 1000, "output_length": 3, "hash_ids": [1]}\n')
        cases = [
            (["--trace", os.path.join(tmp, "nope.jsonl")], "cannot open"),
            (["--trace", bad_trace], "line 2"),
            (["--trace", short_trace], "line 1"),
            (["--trace", TRACE, "--scale", "3"], "--scale"),
        ]
        for args, want in cases:
            r = replay(port, *args)
            ok, err = error_line(r)
            check(ok and want in err, f"replay {args}: want one error line with {want!r}, got {err!r}")
        r = replay(port, "--trace", TRACE, "--limit", "1", key=None)
        ok, err = error_line(r)
        check(ok and "API key" in err, f"no API key: {err!r}")
        server.kill()
        r = replay(port, "--trace", TRACE, "--limit", "1")
        ok, err = error_line(r)
        check(ok and "cannot reach" in err, f"unreachable server: {err!r}")
    except Exception as e:
        import traceback
        traceback.print_exc()
        base.failures.append(f"exception: {e!r}")
        if server:
            print(f"--- server stderr ---\n{''.join(server.lines)[-3000:]}")
    finally:
        if server:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.time() - T_START:.1f}s")
    for f in base.failures:
        print("FAILED: " + f)
    print(f"{base.passed} passed, {len(base.failures)} failed")
    return 0 if not base.failures else 1


if __name__ == "__main__":
    sys.exit(main())
