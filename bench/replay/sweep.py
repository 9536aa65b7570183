#!/usr/bin/python3
"""Hit rate vs KV capacity: one fresh `larder serve` per (tier config, capacity), one
`larder replay --json` against each, then plot_hitrate.py over all the reports.

    bench/replay/sweep.py -m /tmp/s110-4k.gguf --caps 2G,4G,8G,16G --out /tmp/sweep

Series (--series NAME=FLAGS, repeatable) are server flag templates in which {cap} is the
capacity and {ssd} a fresh, empty directory (created under --ssd-root for the run and removed
after it). The defaults are the issue's two curves:

    "DRAM only=--kv-dram {cap}"
    "DRAM+SSD=--kv-dram {cap} --kv-disk {ssd} --kv-disk-size 64G"

so the x axis is the DRAM tier's size and the SSD tier, when present, is large. Every server
also gets --server-args (default: -t 2 -c 4096 --queue 4096). Reports go to
OUT/<series>-<cap>.json, servers' logs to OUT/<series>-<cap>.log, the figure to
OUT/hitrate.png. Use --dry-run to see the commands.
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def slug(s):
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def start_server(larder, args, log_path, timeout=600):
    log = open(log_path, "w")
    proc = subprocess.Popen([larder, "serve", "--host", "127.0.0.1", "--port", "0"] + args, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    t0, port = time.time(), None
    while time.time() - t0 < timeout and proc.poll() is None:
        if port is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", open(log_path).read())
            if m:
                port = int(m.group(1))
        if port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, port
            except OSError:
                pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"server did not become ready; see {log_path}")


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--larder", default=os.path.join(ROOT, "build", "bin", "larder"))
    ap.add_argument("--trace", default=os.path.join(os.environ.get("LARDER_SHARED") or os.path.join(ROOT, "..", "shared"),
                                                    "traces", "synthetic_trace.jsonl"))
    ap.add_argument("--scale", default="64")
    ap.add_argument("--limit", default="0")
    ap.add_argument("--speed", default="1")
    ap.add_argument("--caps", default="2G,4G,8G,16G", help="comma-separated capacities ({cap})")
    ap.add_argument("--series", action="append", help="NAME=FLAGS template (repeatable)")
    ap.add_argument("--server-args", default="-t 2 -c 4096 --queue 4096")
    ap.add_argument("--ssd-root", default=tempfile.gettempdir(), help="where each run's {ssd} directory is made")
    ap.add_argument("--out", default="replay-sweep")
    ap.add_argument("--xlabel", default="DRAM tier size (--kv-dram)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    series = a.series or ["DRAM only=--kv-dram {cap}", "DRAM+SSD=--kv-dram {cap} --kv-disk {ssd} --kv-disk-size 64G"]
    caps = [c.strip() for c in a.caps.split(",") if c.strip()]
    os.makedirs(a.out, exist_ok=True)
    points = []
    for spec in series:
        name, _, flags = spec.partition("=")
        for cap in caps:
            base = os.path.join(a.out, f"{slug(name)}-{slug(cap)}")
            ssd = tempfile.mkdtemp(prefix="larder-sweep-ssd-", dir=a.ssd_root) if "{ssd}" in flags else None
            try:
                args = ["-m", a.model] + shlex.split(a.server_args) + shlex.split(flags.format(cap=cap, ssd=ssd or ""))
                rargs = ["--trace", a.trace, "--scale", a.scale, "--limit", a.limit, "--speed", a.speed, "--json"]
                print(f"== {name} {cap}: larder serve {' '.join(args)}", flush=True)
                if a.dry_run:
                    print(f"   larder replay --url http://127.0.0.1:PORT {' '.join(rargs)} > {base}.json")
                    continue
                proc, port = start_server(a.larder, args, base + ".log")
                try:
                    with open(base + ".json", "w") as out:
                        r = subprocess.run([a.larder, "replay", "--url", f"http://127.0.0.1:{port}"] + rargs,
                                           stdout=out)
                finally:
                    stop_server(proc)
                if r.returncode != 0:
                    print(f"   replay failed (exit {r.returncode}); skipping this point", file=sys.stderr)
                    continue
                points.append(f"{name}:{cap}={base}.json")
            finally:
                if ssd:
                    shutil.rmtree(ssd, ignore_errors=True)
    if a.dry_run or not points:
        return 0 if a.dry_run else 1
    png = os.path.join(a.out, "hitrate.png")
    return subprocess.run([sys.executable, os.path.join(HERE, "plot_hitrate.py"), "-o", png, "--table", "--xlabel", a.xlabel] + points).returncode


if __name__ == "__main__":
    sys.exit(main())
