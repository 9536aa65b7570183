#!/usr/bin/env python3
"""Decode speed with FFN weights streamed from SSD vs naive loading, in a memory-limited cgroup.

Every configuration runs `larder bench -p 0 -n N` (one warm-up run, then timed runs) inside a memory
cgroup whose limit is the same for all: the weights DRAM budget plus a fixed allowance for the KV
cache, activations and the binary. Configurations:
  mmap       the whole GGUF mapped (--no-repack); the page cache holds what fits (naive, llama.cpp's way)
  llama.cpp  llama-bench (mmap) under the same limit, when --llama-bench is given
  pread      the resident weights + the first neurons of each layer pinned; every other neuron of
             every token read with pread (--ffn-naive, dense): "pread of the missing half"
  window     ours: neurons active in the last K tokens cached, only newly active ones read, at each
             --sparsity (0 = dense through the same code)
Needs root for the cgroup (v1 memory controller or v2); without it the limit is not applied and the
table says so.

  bench/ffn_offload_bench.py --model M.gguf --layout DIR [--naive-layout DIR] --keep 0.5 \
      --sparsity 0,0.5 --tokens 8 [--llama-bench PATH] [--json out.json]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LARDER = os.environ.get("LARDER_BIN") or os.path.join(REPO, "build", "bin", "larder")


def cgroup_dir(name):
    v1 = "/sys/fs/cgroup/memory"
    if os.path.isdir(v1):
        return os.path.join(v1, name), "memory.limit_in_bytes", "cgroup.procs"
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return os.path.join("/sys/fs/cgroup", name), "memory.max", "cgroup.procs"
    return None, None, None


def drop_cached(paths):
    """Evicts the files' clean pages from the page cache (no root needed), so every run starts cold."""
    for path in paths:
        files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


COLD = []


def run_limited(cmd, limit):
    """Runs cmd in a fresh memory cgroup (removed after), so no run inherits another's page cache."""
    drop_cached(COLD)
    d, lim_file, procs = cgroup_dir(f"larder_ffn_bench_{os.getpid()}_{time.monotonic_ns()}")
    applied = False
    if d and limit:
        try:
            os.makedirs(d)
            with open(os.path.join(d, lim_file), "w") as f:
                f.write(str(int(limit)))
            applied = True
        except OSError as e:
            print(f"warning: no memory cgroup ({e}); running without a limit", file=sys.stderr)
    full = ["sh", "-c", f'echo $$ > {os.path.join(d, procs)} && exec "$@"', "sh"] + cmd if applied else cmd
    t0 = time.time()
    p = subprocess.run(full, capture_output=True, text=True)
    wall = time.time() - t0
    if applied:
        for _ in range(50):
            try:
                if os.path.basename(lim_file) == "memory.limit_in_bytes":
                    with open(os.path.join(d, "memory.force_empty"), "w") as f:
                        f.write("0")
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.1)
    return p, applied, wall


def resident_and_records(model, layout):
    p = subprocess.run([LARDER, "bench", "-m", model, "--ffn-offload", layout, "--weights-dram-budget", "1M", "-p", "0",
                        "-n", "1"], capture_output=True, text=True)
    m = re.search(r"gates: ([\d.]+) MiB", p.stderr)
    if not m:
        raise SystemExit(p.stderr)
    resident = float(m.group(1)) * 1048576
    return resident, os.path.getsize(os.path.join(layout, "ffn.bin"))


PROMPT = None  # --prompt FILE: time `larder run` on real text instead of bench's random token ids


def larder_run(model, extra, tokens, limit):
    cmd = [LARDER, "run", "-m", model, "-f", PROMPT, "-n", str(tokens), "--temp", "0", "--ignore-eos", "-t", "2",
           "--no-display-prompt"] + extra
    p, applied, wall = run_limited(cmd, limit)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"rc {p.returncode}"])[-1]}, applied
    m = re.search(r"generation (\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\)", p.stderr)
    out = {"tok_s": float(m.group(3)), "sd": 0.0, "wall": wall}
    f = re.search(r"per token: I/O wait ([\d.]+) ms, cache ([\d.]+) ms, compute ([\d.]+) ms, ([\d.]+) KiB read on demand "
                  r"\(([\d.]+) KiB of missing neurons, ([\d.]+) reads\); active ([\d.]+)%, cache hit rate ([\d.]+)%", p.stderr)
    if f:
        v = [float(g) for g in f.groups()]
        out.update({"io_wait_ms_per_token": v[0], "cache_ms_per_token": v[1], "compute_ms_per_token": v[2],
                    "bytes_per_token": v[3] * 1024, "needed_bytes_per_token": v[4] * 1024, "reads_per_token": v[5],
                    "active_fraction": v[6] / 100, "hit_rate": v[7] / 100})
    return out, applied


def larder_bench(model, extra, tokens, reps, limit):
    if PROMPT:
        return larder_run(model, extra, tokens, limit)
    cmd = [LARDER, "bench", "-m", model, "-p", "0", "-n", str(tokens), "-r", str(reps), "-t", "2", "-o", "json"] + extra
    p, applied, wall = run_limited(cmd, limit)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}, applied
    r = json.loads(p.stdout)[0]
    out = {"tok_s": r["avg_ts"], "sd": r["stddev_ts"], "rss": r["peak_rss_bytes"], "wall": wall}
    if "ffn" in r:
        out.update(r["ffn"])
    return out, applied


def llama_bench(path, model, tokens, reps, limit):
    cmd = [path, "-m", model, "-p", "0", "-n", str(tokens), "-r", str(reps), "-t", "2", "-o", "json"]
    p, applied, wall = run_limited(cmd, limit)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"rc {p.returncode}"])[-1]}, applied
    r = json.loads(p.stdout)[0]
    return {"tok_s": r["avg_ts"], "sd": r["stddev_ts"], "wall": wall}, applied


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layout", required=True, help="offload layout of the window runs")
    ap.add_argument("--naive-layout", help="layout of the pread baseline (default --layout)")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of the streamed records the budget holds")
    ap.add_argument("--sparsity", default="0,0.5")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--io-threads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--allowance", type=float, default=128, help="MiB for KV, activations, binary")
    ap.add_argument("--llama-bench")
    ap.add_argument("--skip", default="", help="comma list of configurations to skip (mmap,llama.cpp,pread)")
    ap.add_argument("--json")
    ap.add_argument("--compare-prefetch", action="store_true", help="window runs also with --ffn-prefetch (read-ahead)")
    ap.add_argument("--prompt", help="text file: time `larder run` generating --tokens after it (real activations)")
    a = ap.parse_args()
    global PROMPT
    PROMPT = a.prompt
    skip = set(a.skip.split(","))
    naive_layout = a.naive_layout or a.layout
    COLD.extend([a.model, a.layout, naive_layout])
    resident, records = resident_and_records(a.model, a.layout)
    n_records = os.path.getsize(os.path.join(naive_layout, "ffn.bin"))
    model_bytes = os.path.getsize(a.model)
    budget = int(resident + a.keep * records)
    naive_budget = int(resident + a.keep * n_records)
    limit = max(budget, naive_budget) + int(a.allowance * 1048576)
    print(f"model {a.model}: {model_bytes / 2**20:.0f} MiB; resident (attention, embeddings, gates) {resident / 2**20:.0f} MiB "
          f"({100 * resident / model_bytes:.0f}%); records {records / 2**20:.0f} MiB; budget {budget / 2**20:.0f} MiB "
          f"({100 * budget / model_bytes:.0f}% of the model); cgroup limit {limit / 2**20:.0f} MiB", flush=True)
    rows = []

    def add(name, res, applied):
        res = dict(res)
        res["config"] = name
        res["limited"] = applied
        rows.append(res)
        if "error" in res:
            print(f"{name}: error {res['error']}", flush=True)
        else:
            extra = ""
            if "bytes_per_token" in res:
                extra = (f", {res['bytes_per_token'] / 2**20:.1f} MiB/token read ({res['needed_bytes_per_token'] / 2**20:.1f} needed), io wait {res['io_wait_ms_per_token']:.0f} ms, "
                         f"cache {res['cache_ms_per_token']:.1f} ms, compute {res['compute_ms_per_token']:.0f} ms, active "
                         f"{100 * res['active_fraction']:.0f}%, hit {100 * res['hit_rate']:.0f}%")
                if res.get("prefetch_bytes_per_token"):
                    extra += (f", read ahead {res['prefetch_bytes_per_token'] / 2**20:.1f} MiB/token "
                              f"({100 * res['prefetch_used_fraction']:.0f}% used)")
            print(f"{name}: {res['tok_s']:.3f} tok/s ({1000 / max(res['tok_s'], 1e-9):.0f} ms/token){extra}", flush=True)

    if "mmap" not in skip:
        add("mmap (larder --no-repack)", *larder_bench(a.model, ["--no-repack"], a.tokens, a.reps, limit))
    if a.llama_bench and "llama.cpp" not in skip:
        add("mmap (llama.cpp)", *llama_bench(a.llama_bench, a.model, a.tokens, a.reps, limit))
    if "pread" not in skip:
        add("pread missing half (dense)", *larder_bench(
            a.model, ["--ffn-offload", naive_layout, "--ffn-naive", "--ffn-sparsity", "0", "--weights-dram-budget",
                      str(naive_budget)], a.tokens, a.reps, limit))
    for sp in a.sparsity.split(","):
        for pf in ([True, False] if a.compare_prefetch else [True]):
            add(f"window k={a.window}, sparsity {sp}{', read-ahead' if not pf else ''}", *larder_bench(
                a.model, ["--ffn-offload", a.layout, "--ffn-sparsity", sp, "--ffn-window", str(a.window),
                          "--ffn-io-threads", str(a.io_threads), "--weights-dram-budget", str(budget)] +
                ([] if pf else ["--ffn-prefetch"]), a.tokens, a.reps, limit))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "model_bytes": model_bytes, "resident": resident, "records": records,
                       "budget": budget, "limit": limit, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
