#!/usr/bin/env python3
"""Soak test of `larder serve` under faults (a bounded benchmark-style run, not a unit test).

For --minutes: --streams concurrent clients send greedy completions (streamed or not, prompts with shared
prefixes, and --fresh of them new prompts whose KV keeps flowing to the tiers) while
  - some clients hang up at a random point (mid-stream, or while a non-streamed answer is computed),
  - the server is stopped (SIGSTOP) for a few seconds and continued (SIGCONT) every --stop-every s,
  - the SSD KV directory (a tmpfs of --kv-disk-mb, root only; else a plain directory) is filled up by a
    file for a while, every --fill-every s (the tier's writes fail with ENOSPC, then it is emptied),
  - the server is killed with SIGKILL and restarted on the same port and KV directory every --restart-every s.
Afterwards (and it fails, exit 1, when one does not hold):
  - every answer that completed ([DONE] or a whole JSON body) is identical to the greedy reference,
    computed first one request at a time on a fresh server;
  - once the load stops, the KV and request gauges return to idle (no sequence, no used block, no queue,
    no active request, no connection but the probe's);
  - RSS and open file descriptors of the last server process are within the stated bound of their values
    after its warm-up (RSS <= 1.5 x start + 64 MiB, fds <= start + 32);
  - the server never died unless killed by us, and printed no sanitizer report or invariant failure.

  python3 bench/soak.py [--minutes 10] [--streams 64] [--model M] [--bin build/bin/larder] [--json]
"""
import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LARDER_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, a, port, kv_dir):
        self.a, self.port, self.kv_dir = a, port, kv_dir
        self.proc = None
        self.log = []
        self.incarnations = 0
        self.unexpected_exits = []

    def start(self):
        cmd = [self.a.bin, "serve", "-m", self.a.model, "--port", str(self.port), "-t", str(self.a.threads),
               "--parallel", str(self.a.parallel), "--queue", "256", "-c", "512",
               # A small engine pool and DRAM tier: the working set spills to the SSD tier.
               "--kv-blocks", str(self.a.kv_blocks), "--kv-dram", "1M", "--kv-disk", self.kv_dir, "--kv-disk-size", f"{self.a.kv_disk_mb * 3 // 4}M"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.incarnations += 1
        proc = self.proc

        def pump():
            for line in proc.stderr:
                self.log.append(line.rstrip())
        threading.Thread(target=pump, daemon=True).start()
        t0 = time.time()
        while time.time() - t0 < 120:
            if proc.poll() is not None:
                raise RuntimeError("server exited at start: " + "\n".join(self.log[-5:]))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 200 " in s.recv(200):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready in 120 s")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_fds(self):
        pid = self.proc.pid
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def request(port, prompt, max_tokens, stream, hangup_after=None, timeout=120):
    """Returns (status, text, complete). hangup_after: close after that many SSE events (stream) or seconds."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await w.drain()
        if not stream and hangup_after is not None:
            await asyncio.sleep(hangup_after)
            return 0, "", False
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        if not stream:
            data = await asyncio.wait_for(r.read(), timeout)
            if status != 200:
                return status, data.decode(errors="replace"), False
            j = json.loads(data)
            return status, j["choices"][0]["text"], True
        text, events, done = "", 0, False
        buf = b""
        while True:
            d = await asyncio.wait_for(r.read(65536), timeout)
            if not d:
                break
            buf += d
            # Dechunk lazily: events are "data: {...}\n\n" inside chunks; find them in the raw bytes.
            while True:
                m = re.search(rb"data: (.*?)\n\n", buf, re.S)
                if not m:
                    break
                buf = buf[m.end():]
                payload = m.group(1)
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    j = json.loads(payload)
                except ValueError:
                    continue
                if "error" in j:
                    return 500, json.dumps(j), False
                if j.get("choices"):
                    text += j["choices"][0].get("text", "")
                events += 1
                if hangup_after is not None and events >= hangup_after:
                    return status, text, False
            if done:
                break
        return status, text, done
    finally:
        w.close()


async def soak(a, server, prompts, ref, words):
    st = {"kv_disk_write_errors": 0, "kv_disk_disabled": 0, "completed": 0, "matched": 0, "mismatched": [], "hung_up": 0, "interrupted": 0, "refused": {},
          "stops": 0, "kills": 0, "fills": 0}
    end = time.time() + a.minutes * 60
    paused = asyncio.Event()
    paused.set()
    lock = asyncio.Lock()
    rnd = random.Random(a.seed)

    async def client(k):
        while time.time() < end:
            await paused.wait()
            i = rnd.randrange(len(prompts))
            stream = rnd.random() < 0.8
            if rnd.random() < a.fresh:
                # A prompt never seen before: new KV blocks keep flowing to the tiers (and hit the full disk).
                fresh = " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 40)))
                try:
                    await request(server.port, fresh, 8, False)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                    pass
                continue
            hang = None
            if rnd.random() < a.disconnect:
                hang = rnd.randint(1, 6) if stream else rnd.uniform(0.01, 0.5)
            try:
                status, text, complete = await request(server.port, prompts[i], a.max_tokens, stream, hang)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                st["interrupted"] += 1  # killed server, reset connection
                await asyncio.sleep(0.2)
                continue
            if hang is not None:
                st["hung_up"] += 1
                continue
            if status != 200:
                st["refused"][status] = st["refused"].get(status, 0) + 1
                await asyncio.sleep(0.2)
                continue
            if complete:
                st["completed"] += 1
                if text == ref[i]:
                    st["matched"] += 1
                else:
                    st["mismatched"].append({"prompt": i, "got": text[:200], "want": ref[i][:200]})
            else:
                st["interrupted"] += 1

    async def faults():
        t_stop = time.time() + a.stop_every
        t_fill = time.time() + a.fill_every
        t_kill = time.time() + a.restart_every
        while time.time() < end:
            await asyncio.sleep(0.5)
            now = time.time()
            if now >= t_stop:
                server.proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(rnd.uniform(1, 4))
                server.proc.send_signal(signal.SIGCONT)
                st["stops"] += 1
                t_stop = time.time() + a.stop_every
            if now >= t_fill:
                filler = os.path.join(server.kv_dir, "..", "filler.bin")
                try:
                    with open(filler, "wb") as f:
                        chunk = b"\0" * (1 << 20)
                        while True:
                            f.write(chunk)
                            f.flush()
                except OSError:
                    pass  # ENOSPC: the KV directory is full now
                st["fills"] += 1
                await asyncio.sleep(a.fill_seconds)
                os.remove(filler)
                t_fill = time.time() + a.fill_every
            if now >= t_kill and time.time() < end - 30:
                try:
                    collect(server, st)
                except OSError:
                    pass
                server.kill9()
                st["kills"] += 1
                paused.clear()
                await asyncio.get_running_loop().run_in_executor(None, server.start)
                paused.set()
                t_kill = time.time() + a.restart_every
            if not server.alive():
                server.unexpected_exits.append(server.proc.returncode)
                paused.clear()
                await asyncio.get_running_loop().run_in_executor(None, server.start)
                paused.set()

    await asyncio.gather(faults(), *[client(k) for k in range(a.streams)])
    return st


def collect(server, st):
    """Adds an incarnation's KV disk counters (they restart with the process) to the totals."""
    m = metrics(server.port)
    st["kv_disk_write_errors"] += int(m.get("larder_kv_disk_write_errors_total", 0))
    st["kv_disk_disabled"] += int(m.get("larder_kv_disk_disabled", 0))
    st["kv_disk_store_bytes"] = st.get("kv_disk_store_bytes", 0) + int(m.get("larder_kv_disk_store_bytes_total", 0))
    st["preemptions"] = st.get("preemptions", 0) + int(m.get("larder_preemptions_total", 0))
    st["kv_tier_hits"] = st.get("kv_tier_hits", 0) + int(sum(v for k, v in m.items()
                                                             if k.startswith("larder_kv_tier_hits_total")))


def metrics(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    out = {}
    for line in data.decode(errors="replace").splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--disconnect", type=float, default=0.15, help="share of requests whose client hangs up")
    ap.add_argument("--stop-every", type=float, default=40)
    ap.add_argument("--fill-every", type=float, default=70)
    ap.add_argument("--fill-seconds", type=float, default=15)
    ap.add_argument("--restart-every", type=float, default=150)
    ap.add_argument("--kv-disk-mb", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=160, help="engine KV pool (16-token blocks)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fresh", type=float, default=0.2, help="share of requests with a new prompt (not checked)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build/bin/larder"))
    ap.add_argument("--model", default=os.path.join(SHARED, "models/stories260K/stories260K-f32.gguf"))
    ap.add_argument("--quantize", default="q8_0",
                    help="quantize --model to this type first ('' = as it is): f32 weights are not batch-invariant "
                         "(their one-row and tiled matmuls round differently), so greedy answers under load may "
                         "differ from the one-at-a-time reference at near-ties; the quantized paths are invariant")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="larder-soak-")
    mnt = os.path.join(work, "kvfs")
    os.makedirs(mnt)
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.kv_disk_mb}m", "tmpfs", mnt],
                                 capture_output=True).returncode == 0
    if not mounted:
        print(f"soak: no tmpfs (not root?): the KV directory fills up only to the tier's own limit", file=sys.stderr)
    kv_dir = os.path.join(mnt, "kv")
    os.makedirs(kv_dir)
    if a.quantize:
        q = os.path.join(work, f"model.{a.quantize}.gguf")
        r = subprocess.run([a.bin, "quantize", a.model, q, a.quantize], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("soak: larder quantize failed: " + r.stderr.strip()[-300:])
        a.model = q

    # Prompts with shared prefixes (the prefix cache and the tiers get hits, also after restarts).
    words = open(os.path.join(ROOT, "README.md")).read().split()
    stems = ["Once upon a time, there was a little", "The cat and the dog went to the", "Lily wanted to play with",
             "One day, Tom found a big"]
    prompts = [f"{stems[i % 4]} {' '.join(words[i * 7:i * 7 + 3 + i % 5])}" for i in range(32)]
    prompts += [stems[i % 4] + " " + " ".join(words[300 + 13 * i:300 + 13 * i + 25]) for i in range(32)]

    port = free_port()
    server = Server(a, port, kv_dir)
    ok = True
    report = {}
    try:
        # The greedy reference: one request at a time on a fresh server.
        server.start()
        ref = []
        for p in prompts:
            status, text, complete = asyncio.run(request(port, p, a.max_tokens, False))
            assert status == 200 and complete, (status, text)
            ref.append(text)
        server.stop()
        shutil.rmtree(kv_dir)
        os.makedirs(kv_dir)
        server.start()
        # The start figures: after a warm-up with the same mix, no faults (pools and caches grown).
        asyncio.run(asyncio.wait_for(warmup(port, prompts, a), 600))
        rss_start, fds_start = server.rss_fds()
        t_start = time.time()
        st = asyncio.run(soak(a, server, prompts, ref, words))
        # Idle gauges once the load has stopped.
        idle_keys = ["larder_running_sequences", "larder_queue_length", "larder_kv_blocks_used",
                     "larder_requests_active"]
        m, t0 = {}, time.time()
        while time.time() - t0 < 20:
            m = metrics(port)
            if all(m.get(k, 1) == 0 for k in idle_keys) and m.get("larder_http_connections", 9) <= 1:
                break
            time.sleep(0.5)
        gauges = {k: m.get(k) for k in idle_keys + ["larder_http_connections", "larder_kv_disk_write_errors_total",
                                                    "larder_kv_disk_disabled", "larder_kv_blocks_cached"]}
        idle_ok = all(m.get(k, 1) == 0 for k in idle_keys) and m.get("larder_http_connections", 9) <= 1
        collect(server, st)
        # The last incarnation (restarted by the faults) against the warmed-up first one.
        rss_end, fds_end = server.rss_fds()
        rss_ok = rss_end <= 1.5 * rss_start + (64 << 20)
        fds_ok = fds_end <= fds_start + 32
        sanitizer = [l for l in server.log if "Sanitizer" in l or "invariant failed" in l or "runtime error" in l]
        report = {"minutes": round((time.time() - t_start) / 60, 2), **{k: v for k, v in st.items() if k != "mismatched"},
                  "mismatched": len(st["mismatched"]), "mismatch_examples": st["mismatched"][:3],
                  "idle_gauges": gauges, "idle_ok": idle_ok,
                  "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
                  "fds_start": fds_start, "fds_end": fds_end, "rss_ok": rss_ok, "fds_ok": fds_ok,
                  "unexpected_exits": server.unexpected_exits, "sanitizer_lines": sanitizer[:5],
                  "kv_dir_tmpfs": mounted, "incarnations": server.incarnations}
        ok = (st["completed"] > 0 and not st["mismatched"] and idle_ok and rss_ok and fds_ok
              and not server.unexpected_exits and not sanitizer)
    finally:
        server.stop()
        if mounted:
            subprocess.run(["umount", mnt])
        shutil.rmtree(work, ignore_errors=True)
    print(f"soak: {report.get('minutes')} min, {report.get('completed')} answers completed, "
          f"{report.get('matched')} equal to the greedy reference, {report.get('mismatched')} not; "
          f"{report.get('hung_up')} hang-ups, {report.get('interrupted')} interrupted, refused {report.get('refused')}; "
          f"{report.get('stops')} SIGSTOPs, {report.get('fills')} disk fills ({report.get('kv_disk_write_errors')} KV write "
          f"errors), {report.get('kills')} kill -9; "
          f"idle gauges {'ok' if report.get('idle_ok') else 'NOT idle'} {report.get('idle_gauges')}; "
          f"RSS {report.get('rss_start_mb')} -> {report.get('rss_end_mb')} MiB, fds {report.get('fds_start')} -> "
          f"{report.get('fds_end')} (bound: RSS <= 1.5x + 64 MiB, fds <= +32): {'PASS' if ok else 'FAIL'}")
    if a.json or report.get("mismatched"):
        print(json.dumps(report))
    sys.exit(0 if ok else 1)


async def warmup(port, prompts, a):
    """The start figures: the same mix for a short while without faults (pools and caches grown)."""
    async def one(k):
        for j in range(3):
            try:
                await request(port, prompts[(k + j) % len(prompts)], a.max_tokens, j % 2 == 0)
            except Exception:
                pass
    await asyncio.gather(*[one(k) for k in range(a.streams)])


if __name__ == "__main__":
    main()
