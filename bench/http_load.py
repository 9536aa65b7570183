#!/usr/bin/env python3
"""Idle and slow connections against `larder serve`: /health latency and a completion's TTFT.

Holds N_IDLE connections that never send a byte and N_SLOW that send half a request header one
byte per second (both reopened as soon as the server closes them, so the counts stay up), spread
over several loopback source addresses (127.0.1.x) so that the per-client limit is not what
stops them. Meanwhile it probes /health (a fresh connection each time) and times the first token
of streamed completions (distinct prompts: no prefix reuse) in unloaded and loaded phases that
alternate (--rounds loaded phases, each between two unloaded ones; each side's samples pooled).

  python3 bench/http_load.py [--idle 10000] [--slow 1000] [--model M] [--bin build/bin/larder]
                             [--url http://HOST:PORT (a server already running)] [--json]

Prints one summary (and --json: a JSON line). Bounded: --seconds per phase.
"""
import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


class Load:
    def __init__(self, host, port, n_idle, n_slow, n_addrs):
        self.host, self.port = host, port
        self.n_idle, self.n_slow = n_idle, n_slow
        self.addrs = [f"127.0.1.{i + 1}" for i in range(n_addrs)]
        self.open_idle = 0
        self.open_slow = 0
        self.reopened = 0
        self.failed = 0
        self.stop = False
        self.tasks = []

    async def conn(self, i, slow):
        src = self.addrs[i % len(self.addrs)]
        req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: "
        first = True
        while not self.stop:
            try:
                r, w = await asyncio.open_connection(self.host, self.port, local_addr=(src, 0))
            except OSError:
                self.failed += 1
                await asyncio.sleep(0.5)
                continue
            if not first:
                self.reopened += 1
            first = False
            if slow:
                self.open_slow += 1
            else:
                self.open_idle += 1
            try:
                if slow:
                    k = 0
                    while not self.stop and not r.at_eof() and not w.is_closing():
                        w.write(req[k:k + 1] if k < len(req) else b"a")
                        await w.drain()
                        k += 1
                        await asyncio.sleep(1.0)
                else:
                    while not self.stop:
                        if not await r.read(4096):
                            break  # closed by the server
            except (OSError, ConnectionError):
                pass
            finally:
                if slow:
                    self.open_slow -= 1
                else:
                    self.open_idle -= 1
                w.close()

    async def start(self):
        # Opened gradually (a burst of 11k SYNs would overflow any listen backlog).
        for i in range(self.n_idle + self.n_slow):
            self.tasks.append(asyncio.create_task(self.conn(i, i >= self.n_idle)))
            if i % 200 == 199:
                await asyncio.sleep(0.05)

    async def close(self):
        self.stop = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def health(host, port):
    t = time.perf_counter()
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await w.drain()
    data = await r.read()
    w.close()
    dt = time.perf_counter() - t
    return dt, data.split(b" ", 2)[1] if data.startswith(b"HTTP/") else b"?"


async def ttft(host, port, prompt, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    t = time.perf_counter()
    r, w = await asyncio.open_connection(host, port)
    w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await w.drain()
    first = None
    buf = b""
    while True:
        d = await r.read(65536)
        if not d:
            break
        buf += d
        if first is None and b'"text":"' in buf and re.search(rb'"text":"[^"]', buf):
            first = time.perf_counter() - t
    w.close()
    total = time.perf_counter() - t
    if b"[DONE]" not in buf:
        raise RuntimeError("stream did not end with [DONE]: " + buf[-200:].decode(errors="replace"))
    return first if first is not None else total, total


async def probe(host, port, seconds, n_ttft, prompt_words, max_tokens, tag):
    hs, bad = [], 0
    stop = time.perf_counter() + seconds
    tt = []
    words = open(os.path.join(ROOT, "README.md")).read().split()

    async def health_loop():
        nonlocal bad
        while time.perf_counter() < stop:
            try:
                dt, st = await asyncio.wait_for(health(host, port), 30)
                hs.append(dt)
                if st != b"200":
                    bad += 1
            except Exception:
                hs.append(30.0)
                bad += 1
            await asyncio.sleep(0.05)

    async def ttft_loop():
        for k in range(n_ttft):
            # A different first word each time: no KV prefix reuse between requests.
            prompt = f"{tag}{k} {time.time_ns()} " + " ".join(words[(k * 37) % 200:(k * 37) % 200 + prompt_words])
            try:
                f, _ = await ttft(host, port, prompt, max_tokens)
                tt.append(f)
            except Exception as e:
                print("ttft error:", e, file=sys.stderr)
            await asyncio.sleep(0.2)

    await asyncio.gather(health_loop(), ttft_loop())
    return hs, bad, tt


async def load_only(a, host, port):
    """The attacker, in its own process: prints "open IDLE SLOW REOPENED FAILED" every second."""
    load = Load(host, port, a.idle, a.slow, a.addrs)
    await load.start()
    while True:
        print(f"open {load.open_idle} {load.open_slow} {load.reopened} {load.failed}", flush=True)
        await asyncio.sleep(1)


class LoadProcess:
    def __init__(self, a, host, port):
        # Niced: on a small machine the generator's own CPU would otherwise be charged to the server.
        cmd = ["nice", "-n", "19", sys.executable, os.path.abspath(__file__), "--load-only", "--url",
               f"http://{host}:{port}", "--idle", str(a.idle), "--slow", str(a.slow), "--addrs", str(a.addrs)]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.last = (0, 0, 0, 0)
        import threading

        def pump():
            for line in self.p.stdout:
                f = line.split()
                if f and f[0] == "open":
                    self.last = tuple(int(x) for x in f[1:5])
        threading.Thread(target=pump, daemon=True).start()

    def close(self):
        self.p.terminate()
        self.p.wait()


def cpu_seconds(pid):
    if not pid:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main_async(a, host, port, server_pid):
    out = {}
    res = {}
    # Unloaded and loaded phases alternate (--rounds loaded phases, each between two unloaded ones): the
    # machine's speed drifts by the minute, so each side pools its phases' samples.
    phases = ["unloaded"]
    for k in range(1, a.rounds + 1):
        phases += [f"loaded{k}", f"unloaded{k + 1}"]
    for phase in phases:
        load = None
        if phase.startswith("loaded"):
            load = LoadProcess(a, host, port)
            t0 = time.perf_counter()
            while sum(load.last[:2]) < 0.98 * (a.idle + a.slow) and time.perf_counter() - t0 < 120:
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            print(f"load: {load.last[0]} idle + {load.last[1]} slow connections open", file=sys.stderr)
        c0 = cpu_seconds(server_pid)
        g0 = cpu_seconds(load.p.pid) if load else 0.0
        t0 = time.perf_counter()
        hs, bad, tt = await probe(host, port, a.seconds, a.ttft_requests, a.prompt_words, a.max_tokens, phase)
        server_cpu = (cpu_seconds(server_pid) - c0) / (time.perf_counter() - t0)
        r = {"health_n": len(hs), "health_p50_ms": pct(hs, 50) * 1e3, "health_p99_ms": pct(hs, 99) * 1e3,
             "health_max_ms": max(hs) * 1e3 if hs else float("nan"), "health_not_200": bad,
             "ttft_n": len(tt), "ttft_median_ms": statistics.median(tt) * 1e3 if tt else float("nan"),
             "ttft_all_ms": [round(x * 1e3, 1) for x in tt], "server_cpu_cores": server_cpu}
        if load:
            # The attacker's own CPU, taken from the same two cores (a real one runs elsewhere).
            r.update({"open_idle": load.last[0], "open_slow": load.last[1], "reopened": load.last[2],
                      "connect_failures": load.last[3],
                      "generator_cpu_cores": (cpu_seconds(load.p.pid) - g0) / (time.perf_counter() - t0)})
            load.close()
        res[phase] = r
        print(f"{phase}: /health p50 {r['health_p50_ms']:.1f} ms p99 {r['health_p99_ms']:.1f} ms max "
              f"{r['health_max_ms']:.1f} ms ({r['health_n']} probes, {bad} not 200); TTFT median "
              f"{r['ttft_median_ms']:.1f} ms over {len(tt)}; server CPU {server_cpu:.2f} cores" + (
                  f"; load generator CPU {r['generator_cpu_cores']:.2f} cores; {r['open_idle']} idle + "
                  f"{r['open_slow']} slow open at the end, {r['reopened']} reopened" if load else ""), file=sys.stderr)
        await asyncio.sleep(1)
    def pooled(prefix, key):
        return [x for p, r in res.items() if p.startswith(prefix) for x in r[key]]
    base = statistics.median(pooled("unloaded", "ttft_all_ms") or [float("nan")])
    loaded = statistics.median(pooled("loaded", "ttft_all_ms") or [float("nan")])
    out = {"phases": res, "ttft_unloaded_ms": base, "ttft_loaded_ms": loaded,
           "ttft_ratio": loaded / base if base else float("nan"),
           "health_p99_loaded_ms": max(r["health_p99_ms"] for p, r in res.items() if p.startswith("loaded"))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--slow", type=int, default=1000)
    ap.add_argument("--addrs", type=int, default=22, help="loopback source addresses the load comes from")
    ap.add_argument("--seconds", type=float, default=30, help="length of each phase")
    ap.add_argument("--ttft-requests", type=int, default=15, help="per phase")
    ap.add_argument("--rounds", type=int, default=2, help="loaded phases, each between two unloaded ones")
    ap.add_argument("--prompt-words", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build/bin/larder"))
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/larder/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--url", default="", help="use a running server instead of starting one")
    ap.add_argument("--serve-args", default="", help="extra arguments for larder serve")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.idle + a.slow + 200 > hard:
        sys.exit(f"http_load: {a.idle + a.slow} connections need more than the open-files limit {hard}")
    proc = None
    if a.url:
        m = re.match(r"http://([^:/]+):(\d+)", a.url)
        host, port = m.group(1), int(m.group(2))
        if a.load_only:
            asyncio.run(load_only(a, host, port))
            return
    else:
        cmd = [a.bin, "serve", "-m", a.model, "--port", "0", "-t", str(a.threads), "--parallel", "2",
               "--prompt-cache", "0"] + a.serve_args.split()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        host, port = "127.0.0.1", None
        for line in proc.stderr:
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            sys.exit("http_load: the server did not start")
        import threading
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        for _ in range(600):
            try:
                if asyncio.run(health(host, port))[1] == b"200":
                    break
            except Exception:
                pass
            time.sleep(0.2)
    try:
        out = asyncio.run(main_async(a, host, port, proc.pid if proc else 0))
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = out["health_p99_loaded_ms"] < 100 and out["ttft_ratio"] <= 1.10
    print(f"idle {a.idle} + slow {a.slow}: /health p99 {out['health_p99_loaded_ms']:.1f} ms (limit 100); TTFT "
          f"loaded {out['ttft_loaded_ms']:.1f} ms vs unloaded {out['ttft_unloaded_ms']:.1f} ms = "
          f"{out['ttft_ratio']:.3f}x (limit 1.10): {'PASS' if ok else 'FAIL'}")
    if a.json:
        print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
