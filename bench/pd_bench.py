#!/usr/bin/env python3
"""P/D disaggregation benchmarks (docs/BENCHMARKS.md, "P/D disaggregation").

  pd_bench.py interference [--model M] [--seconds S]
      The reason disaggregation exists. A steady stream of decode-bound chats (CHATS clients, each
      asking for 96 tokens after a short prompt, again and again) plus long prompts (LONG tokens,
      max_tokens 1) arriving at random (Poisson, one every GAP seconds on average). On the same 2 cores:
        colocated  one `larder serve` on both cores (taskset -c 0,1, -t 2)
        P/D        prefill on core 0, decode on core 1 (-t 1 each); requests go to decode with the
                   prefill instance named in X-Larder-Prefill (what `larder router` adds)
      each with and without the long prompts. Reports the chats' TBT (time between streamed tokens)
      p50/p99 and the long prompts' TTFT p50/p99.

  pd_bench.py ttft [--model M] [--lens 512,1024,...] [--netem 10gbit]
      1 prefill + 1 decode, one request at a time, prompts of each length: TTFT measured by the
      client, split into queue (decode: request in -> blocks reserved), prefill (reported by the
      prefill instance), transfer exposed (KV writes still running after the prompt was computed) and
      the transfer time in all (first write posted -> last complete); hidden = 1 - exposed / total.
      With --netem the two instances sit in network namespaces joined by a veth link shaped by tc
      netem (tests/netns.py; root only) and UCX is forced onto TCP so the bytes cross that link.

Larder's own commands are printed; nothing here builds or runs a peer.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import pdlib  # noqa: E402


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def stream(host, port, body, headers=None, timeout=600):
    """POSTs a streaming completion; returns (t_send, [arrival time of each chunk with text])."""
    import http.client
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    b = dict(body)
    b["stream"] = True
    t0 = time.time()
    c.request("POST", "/v1/completions", body=json.dumps(b), headers=h)
    r = c.getresponse()
    times = []
    if r.status != 200:
        r.read()
        c.close()
        raise RuntimeError("status %d" % r.status)
    buf = b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
        if not chunk:
            break
        now = time.time()
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if not ev.startswith(b"data: "):
                continue
            data = ev[6:]
            if data == b"[DONE]":
                c.close()
                return t0, times
            j = json.loads(data)
            if j.get("choices") and j["choices"][0].get("text"):
                times.append(now)
    c.close()
    return t0, times


def words(n_tokens_hint, seed):
    shared = os.environ.get("LARDER_SHARED") or os.path.join(pdlib.REPO, "..", "shared")
    base = open(os.path.join(shared, "text", "tinystories-samples.txt"), encoding="utf-8").read().split()
    rnd = random.Random(seed)
    # Shuffled words: no prefix is shared between prompts (no cache hits), ~1.3 tokens a word.
    return " ".join(rnd.choice(base) for _ in range(int(n_tokens_hint / 1.3)))


def interference(args):
    model = args.model or pdlib.model_path("smollm2")
    results = {}
    modes = args.modes.split(",")
    for mode in modes:
        for with_long in (False, True):
            procs = []
            try:
                if mode == "colocated":
                    S = pdlib.serve(model, ["-c", "4096", "--parallel", "8"], "colocated", threads="2",
                                    prefix=["taskset", "-c", "0,1"])
                    procs.append(S)
                    target, hdr = S, {}
                else:
                    P = pdlib.serve(model, ["-c", "4096", "--parallel", "4", "--role", "prefill"], "prefill", threads="1",
                                    prefix=["taskset", "-c", "0"])
                    D = pdlib.serve(model, ["-c", "4096", "--parallel", "8", "--role", "decode", "--pd-local-prefill", str(args.local_prefill)], "decode", threads="1",
                                    prefix=["taskset", "-c", "1"])
                    procs += [P, D]
                    target, hdr = D, {"X-Larder-Prefill": "127.0.0.1:%d" % P.port}
                stop = time.time() + args.seconds
                tbt, chat_ttft, long_ttft, errors = [], [], [], []
                lock = threading.Lock()

                def chat(i):
                    k = 0
                    while time.time() < stop:
                        k += 1
                        body = {"prompt": words(40, 1000 * i + k), "max_tokens": 96, "temperature": 0, "ignore_eos": True}
                        try:
                            t0, ts = stream("127.0.0.1", target.port, body, hdr)
                        except Exception as e:  # noqa: BLE001
                            with lock:
                                errors.append(str(e))
                            continue
                        with lock:
                            if ts:
                                chat_ttft.append(ts[0] - t0)
                            tbt.extend(b - a for a, b in zip(ts, ts[1:]))

                def longs():
                    rnd = random.Random(7)
                    k = 0
                    while True:
                        time.sleep(rnd.expovariate(1.0 / args.gap))
                        if time.time() > stop - 2:
                            return
                        k += 1
                        body = {"prompt": words(args.long, 99 + k), "max_tokens": 1, "temperature": 0}
                        try:
                            t0, ts = stream("127.0.0.1", target.port, body, hdr)
                            with lock:
                                if ts:
                                    long_ttft.append(ts[0] - t0)
                        except Exception as e:  # noqa: BLE001
                            with lock:
                                errors.append(str(e))

                # Warm up (first requests touch the pages of the pool).
                stream("127.0.0.1", target.port, {"prompt": words(args.long, 5), "max_tokens": 2}, hdr)
                threads = [threading.Thread(target=chat, args=(i,)) for i in range(args.chats)]
                if with_long:
                    threads.append(threading.Thread(target=longs))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                key = "%s%s" % (mode, " + long prompts" if with_long else "")
                results[key] = {
                    "tbt_p50_ms": 1e3 * pct(tbt, 50), "tbt_p99_ms": 1e3 * pct(tbt, 99), "tokens": len(tbt),
                    "chat_ttft_p50_ms": 1e3 * pct(chat_ttft, 50),
                    "long_ttft_p50_s": pct(long_ttft, 50), "long_ttft_p99_s": pct(long_ttft, 99), "longs": len(long_ttft),
                    "errors": len(errors)}
                print(key, json.dumps(results[key]), flush=True)
            finally:
                for p in procs:
                    p.kill()
    print()
    print("| setup (2 cores) | chats' TBT p50 | TBT p99 | p99 vs no long prompts | chats' TTFT p50 | long prompts' TTFT p50 / p99 | chat tokens |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        base = results[mode]["tbt_p99_ms"]
        for key in (mode, mode + " + long prompts"):
            r = results[key]
            lt = "%.2f / %.2f s (%d)" % (r["long_ttft_p50_s"], r["long_ttft_p99_s"], r["longs"]) if r["longs"] else "-"
            print("| %s | %.1f ms | %.1f ms | %.2fx | %.0f ms | %s | %d |" % (
                key, r["tbt_p50_ms"], r["tbt_p99_ms"], r["tbt_p99_ms"] / base, r["chat_ttft_p50_ms"], lt, r["tokens"]))
    return results


def ttft(args):
    model = args.model or pdlib.model_path("smollm2")
    lens = [int(x) for x in args.lens.split(",")]
    ctx = max(lens) + 64 if args.ctx <= 0 else args.ctx
    rows = []
    cl = None
    env = None
    prefix_p = prefix_d = ()
    host_p = host_d = "127.0.0.1"
    if args.netem:
        import netns  # tests/netns.py
        ok, why = netns.available()
        if not ok:
            sys.exit("--netem needs network namespaces: " + why)
        has_netem = netns.netem_supported()[0]
        cl = netns.Cluster(["prefill", "decode"], shaping="netem" if has_netem else "userspace")
        cl.__enter__()
        for h in ("prefill", "decode"):
            if has_netem:
                cl.netem(h, rate=args.netem, delay=args.delay)
            else:  # the userspace delay line tops out far below 10 Gbit/s: rate by tbf, no delay
                cl.tbf(h, rate=args.netem)
        print("link: %s" % ("tc netem rate %s delay %s" % (args.netem, args.delay) if has_netem else
                            "tc tbf rate %s (this kernel has no sch_netem: no added delay)" % args.netem), flush=True)
        prefix_p, prefix_d = cl.prefix("prefill"), cl.prefix("decode")
        host_p, host_d = cl.host("prefill"), cl.host("decode")
        env = dict(os.environ, UCX_TLS="tcp")
    procs = []
    try:
        P = pdlib.serve(model, ["-c", str(ctx), "--parallel", "1", "--role", "prefill", "--pd-timeout", "900"], "prefill", host=host_p,
                        prefix=prefix_p, env=env, threads=str(args.threads))
        D = pdlib.serve(model, ["-c", str(ctx), "--parallel", "1", "--role", "decode", "--pd-timeout", "900"], "decode", host=host_d,
                        prefix=prefix_d, env=env, threads=str(args.threads))
        procs += [P, D]
        hdr = {"X-Larder-Prefill": "%s:%d" % (host_p, P.port)}
        stream(host_d, D.port, {"prompt": words(256, 1), "max_tokens": 2}, hdr)  # warm-up
        for n in lens:
            for rep in range(args.reps):
                mp0, md0 = pdlib.metrics(P), pdlib.metrics(D)
                t0, ts = stream(host_d, D.port, {"prompt": words(n, 1000 * n + rep), "max_tokens": 2, "temperature": 0}, hdr)
                mp1, md1 = pdlib.metrics(P), pdlib.metrics(D)
                d = lambda m0, m1, k: m1.get(k, 0) - m0.get(k, 0)  # noqa: E731
                row = {"tokens": n, "ttft_s": ts[0] - t0,
                       "queue_s": d(md0, md1, "larder_pd_queue_seconds_total"),
                       "prefill_s": d(md0, md1, "larder_pd_prefill_seconds_total"),
                       "transfer_exposed_s": d(md0, md1, "larder_pd_transfer_wait_seconds_total"),
                       "transfer_total_s": d(mp0, mp1, "larder_pd_transfer_seconds_sum"),
                       "bytes": d(mp0, mp1, "larder_pd_transfer_bytes_total")}
                tot = row["transfer_total_s"]
                row["hidden"] = 1 - row["transfer_exposed_s"] / tot if tot > 0 else float("nan")
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for p in procs:
            p.kill()
        if cl:
            cl.__exit__(None, None, None)
    print()
    print("| prompt tokens | TTFT | queue | prefill | transfer exposed | transfer (first write -> last) | KV MiB | KV rate needed | hidden |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in lens:
        rs = [r for r in rows if r["tokens"] == n]
        m = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        need = m("bytes") / m("prefill_s") / 1e6 if m("prefill_s") > 0 else float("nan")
        print("| %d | %.3f s | %.4f s | %.3f s | %.4f s | %.3f s | %.1f | %.0f MB/s | %.1f%% |" % (
            n, m("ttft_s"), m("queue_s"), m("prefill_s"), m("transfer_exposed_s"), m("transfer_total_s"),
            m("bytes") / 2**20, need, 100 * m("hidden")))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("interference")
    a.add_argument("--model")
    a.add_argument("--seconds", type=float, default=45)
    a.add_argument("--chats", type=int, default=3)
    a.add_argument("--long", type=int, default=2000, help="tokens of a long prompt")
    a.add_argument("--gap", type=float, default=4.0, help="mean seconds between long prompts")
    a.add_argument("--local-prefill", type=int, default=0, help="decode: --pd-local-prefill")
    a.add_argument("--modes", default="colocated,pd")
    b = sub.add_parser("ttft")
    b.add_argument("--model")
    b.add_argument("--lens", default="512,1024,2048,4096,8192")
    b.add_argument("--reps", type=int, default=2)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--ctx", type=int, default=0, help="-c of both instances (0: longest prompt + 64)")
    b.add_argument("--netem", default="", help="e.g. 10gbit: instances in network namespaces, link shaped by netem")
    b.add_argument("--delay", default="0.1ms")
    args = ap.parse_args()
    if not os.environ.get("LARDER_BIN"):
        os.environ["LARDER_BIN"] = os.path.join(pdlib.REPO, "build", "bin", "larder")
    print("larder: %s" % os.environ["LARDER_BIN"], flush=True)
    (interference if args.cmd == "interference" else ttft)(args)


if __name__ == "__main__":
    main()
