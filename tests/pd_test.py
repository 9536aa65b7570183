#!/usr/bin/python3
"""Disaggregated prefill/decode on the real model (SmolLM2-135M-Instruct), on loopback.

Run by ctest (label: model) with LARDER_BIN set; SKIPS (exit 77) when the model is not cached.
Every instance is its own `larder serve` process (1 thread each); the reference is a colocated
instance (--role both, no handoff) serving the same requests.

  (a) P/D equals colocated: greedy, identical tokens (and logprobs to 1e-4) for prompts of 16 to ~2,000
      tokens through `larder router` (prefill instance P, decode instance D); again with prefix hits
      on P (a fresh decode instance D2, header X-Larder-Prefill); and the next turn of each
      conversation (prefix hits on D: only the new part is handed over). Received blocks are written
      back to decode's SSD tier like computed ones. Metrics: handoffs, bytes,
      nothing in flight and no KV block referenced when idle.
  (b) kill -9 of the prefill instance mid-transfer: decode recomputes (the answer still equals the
      colocated one); with --pd-fallback error the client gets a clean 503 JSON instead. Decode's
      gauges return to idle.
  (c) kill -9 of decode after the handoff, before its acknowledgement (LARDER_PD_TEST_ACK_DELAY_MS
      holds the ack back): prefill frees its copy after its lease (--pd-lease 3).
  (d) a handoff larger than decode's free blocks waits for room: no byte moves (the prefill
      instance sees no request) until decode has reserved the blocks; then it completes correctly.
  (e) a prefill instance with another KV layout (q8_0 cache) is refused before any transfer: decode
      recomputes; the prefill instance moved no bytes.
  (f) membership: instances register in etcd (their own etcd on free ports); the router finds them
      there; etcd stopped: serving goes on; etcd restarted: the instances register again.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pdlib  # noqa: E402
from pdlib import complete, metrics, req, serve, router  # noqa: E402

FAILS, SKIPS = [], []
N = 24


def log(msg=""):
    print(msg, flush=True)


def check(ok, what):
    log("  %-80s %s" % (what, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append(what)
    return ok


def text_prompts():
    shared = os.environ.get("LARDER_SHARED") or os.path.join(pdlib.REPO, "..", "shared")
    with open(os.path.join(shared, "text", "tinystories-samples.txt"), encoding="utf-8") as f:
        base = f.read()
    long = (base + "\n") * 4
    return [base[:60], base[:400], base[:1500], long[:4500], long[:8400]]


def addr(p):
    return "%s:%d" % (p.host, p.port)


def same(a, b, what):
    """a, b: completion JSONs. Identical text and tokens; logprobs within 1e-4."""
    ta, xa = pdlib.tokens_of(a)
    tb, xb = pdlib.tokens_of(b)
    ok = ta == tb and xa == xb
    if ok:
        la = a["choices"][0]["logprobs"]["token_logprobs"]
        lb = b["choices"][0]["logprobs"]["token_logprobs"]
        ok = all(abs(x - y) <= 1e-4 for x, y in zip(la, lb))
    if not ok:
        log("    colocated: %r\n    P/D:       %r" % (xa, xb))
        if ta == tb:
            log("    same tokens; largest logprob difference %.2e" % max(abs(x - y) for x, y in zip(
                a["choices"][0]["logprobs"]["token_logprobs"], b["choices"][0]["logprobs"]["token_logprobs"])))
        else:
            log("    tokens differ from position %d" % next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y))
    return check(ok, what)


def wait_for(cond, timeout, step=0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(step)
    return cond()


def idle(p, side="decode"):
    m = metrics(p)
    return (m.get("larder_kv_blocks_used", -1) == 0 and
            m.get('larder_pd_handoffs_in_flight{side="%s"}' % side, -1) == 0)


def main():
    model = pdlib.model_path("smollm2")
    if not model:
        log("SKIP: SmolLM2 is not cached (scripts/models smollm2)")
        sys.exit(77)
    prompts = text_prompts()
    procs = []

    def start(extra, name, **kw):
        base = [] if "-c" in extra else ["-c", "4096"]
        if "decode" in extra:  # every prompt handed over, the 16-token one too (default: 64 computed locally)
            base += ["--pd-local-prefill", "0"]
        p = serve(model, base + ["--parallel", "2"] + extra, name, threads="1", **kw)
        procs.append(p)
        return p

    try:
        C = start([], "colocated")
        P = start(["--role", "prefill"], "prefill")
        D = start(["--role", "decode"], "decode")
        R = router(["--prefill", addr(P), "--decode", addr(D)], "router")
        procs.append(R)

        log("(a) P/D equals colocated")
        ref, lens = [], []
        for i, pr in enumerate(prompts):
            st, j = complete("127.0.0.1", C.port, pr, N)
            check(st == 200, "colocated prompt %d: status %d" % (i, st))
            ref.append(j)
            lens.append(j["usage"]["prompt_tokens"])
        log("    prompt tokens: %s" % lens)
        check(min(lens) <= 20 and max(lens) >= 1800, "prompts span 16..2000 tokens (%d..%d)" % (min(lens), max(lens)))
        for i, pr in enumerate(prompts):
            st, j = complete("127.0.0.1", R.port, pr, N)
            if check(st == 200, "router prompt %d (%d tokens): status %d %s" % (i, lens[i], st, str(j)[:200] if st != 200 else "")):
                same(ref[i], j, "router prompt %d (%d tokens): same tokens as colocated" % (i, lens[i]))
        mp, md = metrics(P), metrics(D)
        check(mp.get('larder_pd_handoffs_total{side="prefill",result="ok"}') == len(prompts),
              "prefill served %d handoffs" % len(prompts))
        check(md.get('larder_pd_handoffs_total{side="decode",result="ok"}') == len(prompts),
              "decode received %d handoffs" % len(prompts))
        check(mp.get("larder_pd_transfer_bytes_total", 0) > 0, "bytes moved: %d" % mp.get("larder_pd_transfer_bytes_total", 0))
        check(md.get("larder_prompt_tokens_computed_total", -1) == 0, "decode computed no prompt token")

        # Prefix hits on the prefill side: a fresh decode instance, P has every prompt cached.
        kvdir = tempfile.mkdtemp(prefix="larder-pd-kv-")
        D2 = start(["--role", "decode", "--kv-disk", kvdir], "decode2")
        hdr = {"X-Larder-Prefill": addr(P)}
        for i, pr in enumerate(prompts):
            st, jc = complete("127.0.0.1", C.port, pr, N)  # colocated with its own prefix hits
            st2, j = complete("127.0.0.1", D2.port, pr, N, headers=hdr)
            if check(st == 200 and st2 == 200, "prefix hit on P, prompt %d: status %d" % (i, st2)):
                check(j["usage"].get("prompt_tokens") == lens[i], "  prompt %d: usage" % i)
                same(jc, j, "prefix hit on P, prompt %d: same tokens as colocated" % i)
        check(wait_for(lambda: metrics(D2).get('larder_kv_tier_blocks{tier="disk"}', 0) >= max(lens) // 16, 20),
              "received blocks are written back to decode's SSD tier (%d blocks)" %
              metrics(D2).get('larder_kv_tier_blocks{tier="disk"}', 0))
        mp2 = metrics(P)
        check(mp2.get("larder_prefix_hit_tokens_total", 0) > 0, "prefill reused its prefix cache (%d tokens)" %
              mp2.get("larder_prefix_hit_tokens_total", 0))

        # Next turn: D has the conversation's prefix; only the new part is computed by P and handed over.
        for i in (2, 4):
            nxt = prompts[i] + ref[i]["choices"][0]["text"] + "\nThe end. Then"
            st, jc = complete("127.0.0.1", C.port, nxt, N)
            b0 = metrics(P).get("larder_pd_transfer_bytes_total", 0)
            st2, j = complete("127.0.0.1", R.port, nxt, N)
            b1 = metrics(P).get("larder_pd_transfer_bytes_total", 0)
            if check(st == 200 and st2 == 200, "next turn %d: status %d" % (i, st2)):
                same(jc, j, "next turn %d: same tokens as colocated" % i)
                cached = j["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                check(cached >= lens[i] - 16, "next turn %d: decode reused %d cached tokens" % (i, cached))
                per_tok = mp.get("larder_pd_transfer_bytes_total", 0) / max(1, sum(lens))
                check(b1 - b0 < per_tok * (j["usage"]["prompt_tokens"] - cached + 32),
                      "next turn %d: only the new part moved (%d bytes)" % (i, b1 - b0))
        # The default --pd-local-prefill 64: a prompt with at most 64 uncached tokens is computed by decode.
        DL = serve(model, ["-c", "4096", "--parallel", "2", "--role", "decode"], "decode-local", threads="1")
        procs.append(DL)
        st, j = complete("127.0.0.1", DL.port, prompts[0], N, headers=hdr)
        b0 = metrics(P).get('larder_pd_handoffs_total{side="prefill",result="ok"}', 0)
        st2, j2 = complete("127.0.0.1", DL.port, prompts[1], N, headers=hdr)
        if check(st == 200 and st2 == 200, "default --pd-local-prefill: answered"):
            same(ref[0], j, "a 15-token prompt computed by decode itself: same tokens")
            check(metrics(DL).get("larder_prompt_tokens_computed_total", 0) == lens[0] and
                  metrics(P).get('larder_pd_handoffs_total{side="prefill",result="ok"}', 0) == b0 + 1,
                  "15 tokens computed locally, the 98-token prompt handed over")
        for p, side in ((D, "decode"), (D2, "decode"), (P, "prefill")):
            check(wait_for(lambda: idle(p, side), 10), "%s idle: no block referenced, nothing in flight" % p.name)

        log("(b) kill -9 of the prefill instance mid-transfer")
        P3 = start(["--role", "prefill"], "prefill3")
        hdr3 = {"X-Larder-Prefill": addr(P3)}
        out = {}
        t = threading.Thread(target=lambda: out.update(r=complete("127.0.0.1", D2.port, prompts[4] + " Again.", N, headers=hdr3)))
        t.start()
        wait_for(lambda: metrics(P3).get('larder_pd_handoffs_in_flight{side="prefill"}', 0) > 0, 10, 0.01)
        time.sleep(0.3)
        P3.kill()
        t.join(120)
        st, jc = complete("127.0.0.1", C.port, prompts[4] + " Again.", N)
        st2, j = out.get("r", (0, {}))
        if check(st2 == 200, "prefill killed: the client still gets an answer (status %d)" % st2):
            same(jc, j, "prefill killed: decode recomputed, same tokens as colocated")
        m = metrics(D2)
        check(m.get('larder_pd_handoffs_total{side="decode",result="failed"}', 0) >= 1, "decode counted the failed handoff")
        check(wait_for(lambda: idle(D2), 10), "decode idle after the failed handoff")
        D3 = start(["--role", "decode", "--pd-fallback", "error"], "decode3")
        P4 = start(["--role", "prefill"], "prefill4")
        out = {}
        t = threading.Thread(target=lambda: out.update(
            r=complete("127.0.0.1", D3.port, prompts[4] + " Once more.", N, headers={"X-Larder-Prefill": addr(P4)})))
        t.start()
        wait_for(lambda: metrics(P4).get('larder_pd_handoffs_in_flight{side="prefill"}', 0) > 0, 10, 0.01)
        time.sleep(0.3)
        P4.kill()
        t.join(120)
        st2, j = out.get("r", (0, {}))
        check(st2 >= 500 and isinstance(j.get("error"), dict), "--pd-fallback error: a clean %d JSON error" % st2)
        check(wait_for(lambda: idle(D3), 10), "decode idle after the error")

        log("(c) kill -9 of decode after the handoff, before its ack: prefill frees after the lease")
        P5 = start(["--role", "prefill", "--pd-lease", "3"], "prefill5")
        env = dict(os.environ, LARDER_PD_TEST_ACK_DELAY_MS="20000")
        D5 = start(["--role", "decode"], "decode5", env=env)
        st, _, _ = req("127.0.0.1", D5.port, "POST", "/v1/completions",
                       {"prompt": prompts[3], "max_tokens": 2, "temperature": 0},
                       headers={"X-Larder-Prefill": addr(P5)})
        check(st == 200, "handoff to the decode instance: status %d" % st)
        D5.kill()
        t_kill = time.time()
        m = metrics(P5)
        check(m.get('larder_pd_handoffs_in_flight{side="prefill"}', 0) == 1 and m.get("larder_kv_blocks_used", 0) > 0,
              "prefill holds the handed-off blocks while no ack came")
        ok = wait_for(lambda: idle(P5, "prefill"), 15)
        dt = time.time() - t_kill
        check(ok and dt >= 1.5, "prefill freed them after its lease (%.1f s after the kill)" % dt)
        check(metrics(P5).get("larder_pd_lease_expired_total", 0) == 1, "one lease expired")

        log("(d) a handoff larger than decode's free blocks waits; no byte moves before the blocks are reserved")
        D6 = start(["--role", "decode", "-c", "2048", "--kv-blocks", "140"], "decode6")
        P6 = start(["--role", "prefill"], "prefill6")
        h6 = {"X-Larder-Prefill": addr(P6)}
        first_prompt = prompts[4][:6500]
        other = prompts[4][1000:7500]
        res = {}
        ta = threading.Thread(target=lambda: res.update(a=complete("127.0.0.1", D6.port, first_prompt, 300, headers=h6,
                                                                   extra={"ignore_eos": True})))
        ta.start()
        wait_for(lambda: metrics(P6).get('larder_pd_handoffs_total{side="prefill",result="ok"}', 0) >= 1, 60)
        tb = threading.Thread(target=lambda: res.update(b=complete("127.0.0.1", D6.port, other, N, headers=h6)))
        tb.start()
        time.sleep(1.0)
        m6 = metrics(P6)
        waiting = metrics(D6).get("larder_queue_length", 0)
        check(ta.is_alive() and waiting == 1 and m6.get('larder_pd_handoffs_total{side="prefill",result="ok"}', 0) == 1 and
              m6.get('larder_pd_handoffs_in_flight{side="prefill"}', 0) == 0,
              "the second request waits at decode; the prefill instance has not been asked (queue %d)" % waiting)
        ta.join(300)
        tb.join(300)
        st, jc = complete("127.0.0.1", C.port, other, N)
        if check(res.get("b", (0,))[0] == 200, "then it completes"):
            same(jc, res["b"][1], "then it completes with the colocated tokens")

        log("(e) another KV layout is refused before any transfer")
        P7 = start(["--role", "prefill", "-ctk", "q8_0", "-ctv", "q8_0"], "prefill7-q8")
        st, jc = complete("127.0.0.1", C.port, prompts[2] + " Next.", N)
        b_before = metrics(D2).get('larder_pd_handoffs_total{side="decode",result="failed"}', 0)
        st2, j = complete("127.0.0.1", D2.port, prompts[2] + " Next.", N, headers={"X-Larder-Prefill": addr(P7)})
        if check(st2 == 200, "layout mismatch: still answered (status %d)" % st2):
            same(jc, j, "layout mismatch: decode recomputed, same tokens as colocated")
        m7 = metrics(P7)
        check(m7.get("larder_pd_transfer_bytes_total", -1) == 0 and m7.get("larder_prompt_tokens_total", -1) == 0,
              "the q8_0 prefill instance computed nothing and moved no byte")
        check(metrics(D2).get('larder_pd_handoffs_total{side="decode",result="failed"}', 0) == b_before + 1,
              "decode counted the refused handoff")

        log("(f) membership in etcd")
        if not pdlib.shutil.which("etcd"):
            SKIPS.append("etcd is not installed (apt-get install etcd-server)")
            log("  SKIP: etcd not installed")
        else:
            etcd = pdlib.Etcd()
            try:
                cl = ["--cluster", etcd.url(), "--cluster-name", "t1", "--cluster-ttl", "4"]
                PE = start(["--role", "prefill"] + cl, "prefill-etcd")
                DE = start(["--role", "decode"] + cl, "decode-etcd")
                check(wait_for(lambda: len(etcd.instances("t1") or {}) == 2, 10), "both instances registered")
                inst = etcd.instances("t1") or {}
                roles = sorted(v.get("role") for v in inst.values())
                check(roles == ["decode", "prefill"], "roles %s" % roles)
                v = next(iter(inst.values()), {})
                check(all(k in v for k in ("id", "role", "model", "kv_layout", "api_address", "transfer_address",
                                           "capacity", "load")), "registration holds %s" % sorted(v))
                RE = router(["--cluster", etcd.url(), "--cluster-name", "t1"], "router-etcd")
                procs.append(RE)
                ok = wait_for(lambda: req("127.0.0.1", RE.port, "GET", "/health", timeout=2)[0] == 200, 10)
                st, j = complete("127.0.0.1", RE.port, prompts[1], N)
                # The reference: a fresh colocated instance (the first one's prompt cache has seen
                # prompts[0], whose text starts prompts[1], and reuses its ids: another tokenization).
                CF = start([], "colocated-fresh")
                st0, jc = complete("127.0.0.1", CF.port, prompts[1], N)
                if check(ok and st == 200 and st0 == 200, "router found the instances in etcd (status %d)" % st):
                    same(jc, j, "router via etcd: same tokens as colocated")
                check(metrics(PE).get('larder_pd_handoffs_total{side="prefill",result="ok"}', 0) == 1,
                      "the request went through the registered prefill instance")
                etcd.stop()
                time.sleep(1.5)
                st, j = complete("127.0.0.1", RE.port, prompts[1], N)
                check(st == 200, "etcd down: serving goes on (status %d)" % st)
                check(wait_for(lambda: metrics(DE).get("larder_cluster_registered", 1) == 0, 5),
                      "etcd down: decode reports it is not registered")
                regs = metrics(DE).get("larder_cluster_registrations_total", 0)
                time.sleep(5)  # past the lease TTL: etcd's leases expire when it comes back
                etcd.start()
                check(wait_for(lambda: len(etcd.instances("t1") or {}) == 2, 15), "etcd back: both instances registered again")
                check(wait_for(lambda: metrics(DE).get("larder_cluster_registered", 0) == 1, 10), "decode reports registered")
                log("    registrations of decode: %d -> %d" % (regs, metrics(DE).get("larder_cluster_registrations_total", 0)))
                PE.kill(pdlib.signal.SIGTERM)
                check(wait_for(lambda: len(etcd.instances("t1") or {}) == 1, 10), "a stopped instance leaves at once")
            finally:
                etcd.close()
    finally:
        for p in procs:
            p.kill()
        if "kvdir" in locals():
            shutil.rmtree(kvdir, ignore_errors=True)
    log()
    if FAILS:
        log("FAILED: %d check(s):\n  %s" % (len(FAILS), "\n  ".join(FAILS)))
        sys.exit(1)
    if SKIPS:
        log("SKIPPED: " + "; ".join(SKIPS))
        sys.exit(77)
    log("all P/D checks passed")


if __name__ == "__main__":
    main()
