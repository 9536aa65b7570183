#!/usr/bin/python3
"""Disaggregated prefill/decode across network namespaces: four "hosts" (etcd, router, prefill, decode)
joined by veth links to one bridge (tests/netns.py), the prefill and decode links shaped to 10gbit with
0.2 ms of delay each way. The KV transfer goes over UCX's TCP transport (UCX_TLS=tcp: between processes
of one machine UCX would otherwise pick shared memory / CMA, which crosses namespaces and bypasses the
link).

Run by ctest (label: e2e) with LARDER_BIN (and LARDER_SOURCE_DIR) set. Exit 77 (skipped, reason
printed) when network namespaces are not usable (not root, no iproute2), etcd is not installed, or
SmolLM2 is not cached (scripts/models smollm2). Checks:

  1. both instances register in etcd, with the addresses of their namespaces; the router (found
     through etcd) answers a greedy completion (~600 prompt tokens, 16 generated, logprobs) with the
     tokens of a colocated `larder serve` on loopback in the root namespace;
  2. the prefill instance handed over once, and its KV bytes crossed decode's veth: the veth's RX
     bytes (counted inside decode's namespace) and the bytes received on decode's TCP connections from
     the prefill host (ss) each grew by at least prefill's larder_pd_transfer_bytes_total;
  3. streaming through the router across the namespaces (SSE: several chunks, then [DONE]);
  4. 20 ms of delay on decode's link (each way): a TCP connect to decode takes >= 35 ms longer; the
     time to first token of streamed requests through the router grows by at least 20 ms (short
     prompts, the least of three before and after: at ~600 tokens the prefill's compute jitter on a
     small busy machine exceeds the delay), and the answers (short and ~600 tokens) are still the
     colocated ones;
  5. teardown leaves no namespace, veth or bridge of this run.

Links are shaped with tc netem where the kernel has sch_netem, else with netns.py's userspace delay
line (the kernel of the CI's VMs is built without netem); the output says which.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netns  # noqa: E402
import pdlib  # noqa: E402
from pdlib import complete, metrics, req, router, serve  # noqa: E402

FAILS = []
N = 16
CLUSTER = "nsx"
DEADLINE_S = 300  # all of it (a run takes 15-30 s here); every wait below is bounded as well


class Overdue(Exception):
    """SIGALRM at DEADLINE_S (not an OSError: the bounded waits retry those)."""


def log(msg=""):
    print(msg, flush=True)


def check(ok, what):
    log("  %-88s %s" % (what, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append(what)
    return ok


def skip(why):
    log("SKIP: " + why)
    sys.exit(77)


def wait_for(cond, timeout, step=0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if cond():
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(step)
    try:
        return bool(cond())
    except (OSError, ValueError, KeyError):
        return False


def prompts():
    """Three ~600-token prompts and six of ~50 tokens, all with different beginnings (no prefix of one
    is cached for another)."""
    shared = os.environ.get("LARDER_SHARED") or os.path.join(pdlib.REPO, "..", "shared")
    with open(os.path.join(shared, "text", "tinystories-samples.txt"), encoding="utf-8") as f:
        base = f.read().strip()
    k = len(base) // 3
    long = [base, base[k:] + "\n" + base[:k], base[2 * k:] + "\n" + base[:2 * k]]
    short = [(base + "\n" + base)[150 + 400 * i:150 + 400 * i + 220] for i in range(6)]
    return long, short


def stream(host, port, prompt, n=N, timeout=120):
    """A greedy streamed completion. Returns (status, texts of the data chunks, [DONE] seen, seconds to
    the first chunk with text, raw tail)."""
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True})
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        texts, done, ttft, raw = [], False, None, []
        if r.status != 200:
            return r.status, [], False, None, r.read().decode(errors="replace")[:300]
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            raw.append(line)
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
            if done:
                texts.append("<data after [DONE]>")
                continue
            t = json.loads(payload)["choices"][0].get("text", "")
            if t and ttft is None:
                ttft = time.perf_counter() - t0
            texts.append(t)
        return r.status, texts, done, ttft, "\n".join(raw[-3:])
    finally:
        c.close()


def connect_ms(host, port, n=5):
    """The least of n TCP connects (SYN -> SYN-ACK: one round trip), in ms."""
    best = None
    for _ in range(n):
        t0 = time.perf_counter()
        socket.create_connection((host, port), timeout=5).close()
        dt = (time.perf_counter() - t0) * 1e3
        best = dt if best is None else min(best, dt)
    return best


def main():
    ok, why = netns.available()
    if not ok:
        skip("network namespaces are not usable here: " + why)
    if not shutil.which("etcd") or not shutil.which("etcdctl"):
        skip("etcd is not installed (apt-get install etcd-server etcd-client)")
    model = pdlib.model_path("smollm2")
    if not model:
        skip("SmolLM2 is not cached (scripts/models smollm2)")
    ps, shorts = prompts()
    base = ["-c", "2048", "--parallel", "2"]
    procs, etcd = [], None
    t_start = time.time()

    def overdue(sig, frame):
        raise Overdue("the test ran past %d s" % DEADLINE_S)
    signal.signal(signal.SIGALRM, overdue)
    signal.alarm(DEADLINE_S)
    cl = netns.Cluster(["etcd", "router", "prefill", "decode"])
    tag = cl.tag
    try:
        cl.start()  # first: SIGTERM now ends in the finally below
        if cl.stale:
            log("removed leftovers of earlier runs: %s" % cl.stale)
        # The reference (root namespace, loopback), while nothing else runs.
        C = serve(model, base, "colocated", threads="1")
        procs.append(C)
        ref = []
        for p in ps + shorts:
            st, j = complete("127.0.0.1", C.port, p, N, timeout=120)
            if st != 200:
                raise RuntimeError("colocated: status %d %s" % (st, j))
            ref.append(j)
        lens = [j["usage"]["prompt_tokens"] for j in ref]
        log("prompt tokens: %s" % lens)
        ref_short, ref = ref[len(ps):], ref[:len(ps)]
        for h in ("prefill", "decode"):
            cl.netem(h, rate="10gbit", delay="0.2ms")
        log("hosts: %s on %s; root namespace at %s; links shaped by %s" % (
            ", ".join("%s %s" % (h, cl.host(h)) for h in cl.hosts), cl.subnet, cl.root_address, cl.shaping))
        if cl.shaping != "netem":
            log("  (the kernel has no sch_netem: %s)" % netns.netem_supported()[1])

        etcd = pdlib.Etcd(host=cl.host("etcd"), prefix=cl.prefix("etcd"), port=2379, peer_port=2380)
        # UCX_TLS=tcp: see the docstring. UCX_NET_DEVICES is left alone: UCX's TCP transport would also
        # list lo, but the endpoint's lanes follow the address of the sockaddr connection (the veth).
        env = dict(os.environ, UCX_TLS="tcp")
        cluster = ["--cluster", etcd.url(), "--cluster-name", CLUSTER, "--cluster-ttl", "5"]
        P = serve(model, base + ["--role", "prefill"] + cluster, "prefill", host=cl.host("prefill"),
                  prefix=cl.prefix("prefill"), env=env, threads="1")
        procs.append(P)
        D = serve(model, base + ["--role", "decode", "--pd-local-prefill", "0"] + cluster, "decode", host=cl.host("decode"),
                  prefix=cl.prefix("decode"), env=env, threads="1")
        procs.append(D)
        R = router(cluster[:4], "router", host=cl.host("router"), prefix=cl.prefix("router"), env=env)
        procs.append(R)
        for p in (P, D):
            line = next((l.strip() for l in p.lines if "KV transfer on" in l), "?")
            log("  %s: %s" % (p.name, line))

        log("(1) membership and a greedy completion through the router")
        check(wait_for(lambda: len(etcd.instances(CLUSTER) or {}) == 2, 15), "both instances registered in etcd")
        inst = etcd.instances(CLUSTER) or {}
        by_role = {v.get("role"): v for v in inst.values()}
        for role, h in (("prefill", "prefill"), ("decode", "decode")):
            v = by_role.get(role, {})
            api, tr = v.get("api_address", ""), v.get("transfer_address", "")
            check(api.rsplit(":", 1)[0] == cl.host(h) and tr.rsplit(":", 1)[0] == cl.host(h),
                  "%s advertises its namespace's address (api %s, transfer %s)" % (role, api, tr))
        check(wait_for(lambda: req(R.host, R.port, "GET", "/health", timeout=2)[0] == 200, 15), "router healthy")
        b0, p0 = cl.link_bytes("decode"), cl.link_bytes("prefill")
        st, j = complete(R.host, R.port, ps[0], N, timeout=120)
        b1, p1 = cl.link_bytes("decode"), cl.link_bytes("prefill")
        if check(st == 200, "router: status %d %s" % (st, str(j)[:200] if st != 200 else "")):
            ta, xa = pdlib.tokens_of(ref[0])
            tb, xb = pdlib.tokens_of(j)
            if not check(ta == tb and xa == xb and ta, "router answer (%d prompt tokens) = colocated tokens" % lens[0]):
                log("    colocated: %r\n    P/D:       %r" % (xa, xb))
            la = ref[0]["choices"][0]["logprobs"]["token_logprobs"]
            lb = j["choices"][0]["logprobs"]["token_logprobs"]
            log("    max |logprob difference|: %.2g" % max(abs(x - y) for x, y in zip(la, lb)))

        log("(2) one handoff; its KV crossed decode's veth")
        mp, md = metrics(P), metrics(D)
        kv = int(mp.get("larder_pd_transfer_bytes_total", 0))
        check(mp.get('larder_pd_handoffs_total{side="prefill",result="ok"}') == 1, "prefill handoffs ok = 1 (%s)" %
              mp.get('larder_pd_handoffs_total{side="prefill",result="ok"}'))
        check(md.get('larder_pd_handoffs_total{side="decode",result="ok"}') == 1, "decode handoffs ok = 1")
        check(md.get("larder_prompt_tokens_computed_total", -1) == 0, "decode computed no prompt token")
        rx = b1["rx"] - b0["rx"]
        check(kv > 0 and rx >= kv, "decode veth RX grew %d bytes >= %d KV bytes of prefill (prefill TX %d)" % (
            rx, kv, p1["tx"] - p0["tx"]))
        # UCX's connections: decode's sockets (ip netns exec execs larder: same pid) whose peer is the
        # prefill host, other than prefill's HTTP API (decode's handoff request and its reply).
        socks = [s for s in cl.tcp_sockets("decode") if s["pid"] == D.proc.pid]
        from_p = [s for s in socks if s["peer"] != "%s:%d" % (P.host, P.port) and
                  s["peer"].rsplit(":", 1)[0] == cl.host("prefill")]
        got = sum(s["bytes_received"] for s in from_p)
        check(got >= kv, "decode's UCX connections from %s received %d bytes >= %d (%d of %d sockets)" % (
            cl.host("prefill"), got, kv, len(from_p), len(socks)))
        local = [s for s in socks if s["peer"].startswith("127.")]
        check(not local, "no loopback TCP connection of decode (%d)" % len(local))

        log("(3) streaming through the router")
        tr_first = metrics(P).get("larder_pd_transfer_seconds_sum", 0)
        st, texts, done, ttft0, tail = stream(R.host, R.port, ps[1])
        tr_first_s = metrics(P).get("larder_pd_transfer_seconds_sum", 0) - tr_first
        check(st == 200 and len(texts) >= 3 and done, "SSE: status %d, %d chunks, [DONE] %s" % (st, len(texts), done))
        if not check("".join(texts) == ref[1]["choices"][0]["text"], "streamed text = colocated text"):
            log("    colocated: %r\n    streamed:  %r\n    tail: %s" % (ref[1]["choices"][0]["text"], "".join(texts), tail))

        log("(4) 20 ms of delay on decode's link")
        # Time to first token of short prompts (~50 tokens: the prefill's compute, whose jitter on a
        # busy small machine exceeds 100 ms at 600 tokens, stays small), the least of three each.
        def short_ttfts(idx):
            out = []
            for i in idx:
                st, texts, done, t, _ = stream(R.host, R.port, shorts[i])
                ok = st == 200 and done and "".join(texts) == ref_short[i]["choices"][0]["text"] and t is not None
                check(ok, "short prompt %d (%d tokens): status %d, streamed text = colocated text" % (
                    i, ref_short[i]["usage"]["prompt_tokens"], st))
                out.append(t if ok else None)
            return out
        s0 = short_ttfts((0, 1, 2))
        rtt0 = connect_ms(D.host, D.port)
        tr0 = metrics(P).get("larder_pd_transfer_seconds_sum", 0)
        cl.netem("decode", rate="10gbit", delay="20ms")
        rtt1 = connect_ms(D.host, D.port)
        check(rtt1 - rtt0 >= 35, "TCP connect to decode %.1f ms -> %.1f ms (20 ms each way)" % (rtt0, rtt1))
        s1 = short_ttfts((3, 4, 5))
        if None in s0 + s1:
            check(False, "time to first token measured for every short prompt")
        else:
            log("    time to first token, short prompts: %s ms -> %s ms" % (
                " ".join("%.0f" % (1e3 * t) for t in s0), " ".join("%.0f" % (1e3 * t) for t in s1)))
            what = "time to first token (least of 3) %.1f ms -> %.1f ms (+%.1f ms >= +20 ms)" % (
                1e3 * min(s0), 1e3 * min(s1), 1e3 * (min(s1) - min(s0)))
            if os.environ.get("LARDER_SANITIZE"):  # instrumented binaries: their jitter dwarfs 20 ms
                log("    %s (information only: sanitizer build)" % what)
            else:
                check(min(s1) >= min(s0) + 0.020, what)
        st, texts, done, ttft1, tail = stream(R.host, R.port, ps[2])
        check(st == 200 and done, "SSE with 20 ms: status %d, %d chunks, [DONE] %s" % (st, len(texts), done))
        if not check("".join(texts) == ref[2]["choices"][0]["text"], "answer with 20 ms = colocated text"):
            log("    colocated: %r\n    streamed:  %r" % (ref[2]["choices"][0]["text"], "".join(texts)))
        log("    time to first token, %d-token prompt: %.0f ms -> %.0f ms (information only)" % (
            lens[2], 1e3 * (ttft0 or 0), 1e3 * (ttft1 or 0)))
        # The KV connection is one long-lived TCP connection that has measured ~1 ms RTTs: its congestion
        # control (BBR's 10 s min-RTT window, here) often needs seconds to fill a 40 ms RTT path.
        log("    KV transfer time, prefill side, since the delay: %.2f s (the %d-token prompt before: %.2f s)" % (
            metrics(P).get("larder_pd_transfer_seconds_sum", 0) - tr0, lens[1], tr_first_s))
        mp = metrics(P)
        n_ho = 3 + len(shorts)
        check(mp.get('larder_pd_handoffs_total{side="prefill",result="ok"}') == n_ho, "prefill handoffs ok = %d (%s)" % (
            n_ho, mp.get('larder_pd_handoffs_total{side="prefill",result="ok"}')))
        check(all(p.alive() for p in procs), "every process still alive")
    except Exception as e:  # noqa: BLE001
        check(False, "unexpected error: %s: %s" % (type(e).__name__, e))
        for p in procs:
            log("--- %s (last lines)\n%s" % (p.name, p.text()[-1500:]))
    finally:
        for p in procs:
            p.kill()
        if etcd:
            etcd.close()
        cl.close()
        signal.alarm(0)

    log("(5) teardown")
    left_ns = [n for n in netns.list_namespaces() if n.startswith(tag + "-")]
    left_links = [l for l in netns.list_links() if l.startswith(tag)]
    check(not left_ns and not left_links, "no namespace (%s) or link (%s) of %s left" % (left_ns, left_links, tag))
    log()
    log("%.0f s" % (time.time() - t_start))
    if FAILS:
        log("FAILED: %d check(s):\n  %s" % (len(FAILS), "\n  ".join(FAILS)))
        sys.exit(1)
    log("all P/D checks across namespaces passed")


if __name__ == "__main__":
    main()
