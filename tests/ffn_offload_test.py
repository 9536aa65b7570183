#!/usr/bin/python3
"""FFN weights streamed from SSD (issue 17): the offload layout, the neuron cache and bad input.

Run by ctest with LARDER_BIN set; shared data from LARDER_SHARED or ../shared.

Cases (stories260K f32 GGUF, the real trained model; f32 KV cache so paths compare at f32 precision)
  dense      `--ffn-sparsity 0` (every neuron, through the sparse code) equals the normal dense path:
             logits within 1e-3 of max|logit| (the scale the engine's own ISA paths differ by), identical
             greedy tokens; the same with --chunk 1 (decode).
  offload    the prepared layout streamed with a DRAM budget that holds ~30% of the neurons (window
             1 and 5, O_DIRECT and buffered, the naive pinned policy) gives bit-identical logits to the
             records built in memory, at sparsity 0 and 0.5; `larder run` reports the per-token figures.
  corrupt    a flipped byte in a record, in the header, in the index, and a truncated file: a one-line
             error naming the problem, exit 1, no logits written.
  serve      `larder serve --ffn-offload`: the same greedy completion as a dense server at sparsity 0, and
             /metrics counts the FFN's tokens, bytes read and hits (larder_ffn_*).
  mismatch   a layout of another model, thresholds of another model, a budget below the resident
             weights: one-line errors.
Exit 0 pass, 1 fail, 77 skip (no shared data).
"""

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pdlib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.environ.get("LARDER_SOURCE_DIR") or os.path.dirname(HERE)
BIN = os.environ.get("LARDER_BIN") or os.path.join(REPO, "build", "bin", "larder")
SHARED = os.environ.get("LARDER_SHARED") or os.path.join(REPO, "..", "shared")
os.environ["LARDER_CACHE_TYPE_K"] = "f32"
os.environ["LARDER_CACHE_TYPE_V"] = "f32"

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(args, ok=True):
    p = subprocess.run([BIN] + args, capture_output=True, text=True, timeout=300)
    if ok and p.returncode != 0:
        print(p.stderr)
        raise SystemExit(f"larder {' '.join(args)} failed: rc {p.returncode}")
    return p


def logits(model, ids, out, extra=()):
    run(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "-o", out, "-t", "2"] + list(extra))
    return np.fromfile(out, dtype=np.float32)


def greedy(model, ids, n, extra=()):
    p = run(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "--greedy", str(n), "-t", "2"] + list(extra))
    return json.loads(p.stdout.strip().splitlines()[-1])


def one_error(p, pattern, what):
    lines = [l for l in p.stderr.splitlines() if l.startswith("larder: error:")]
    good = p.returncode == 1 and len(lines) == 1 and re.search(pattern, lines[0]) is not None
    check(good, f"{what}: {lines[0] if lines else p.stderr.strip()[:200]!r}")


def main():
    model = os.path.join(SHARED, "models", "stories260K", "stories260K-f32.gguf")
    text = os.path.join(SHARED, "text", "tinystories-samples.txt")
    if not os.path.exists(model) or not os.path.exists(text):
        print("skip: shared data missing")
        return 77
    tmp = tempfile.mkdtemp(prefix="larder-ffn-")
    try:
        ids = json.loads(run(["tokenize", "-m", model, "--ids", open(text).read()[:600]]).stdout.strip())[:96]
        check(len(ids) >= 64, f"{len(ids)} prompt tokens")
        out = os.path.join(tmp, "l.bin")

        # dense: sparse code at threshold 0 == the normal path.
        for chunk in ([], ["--chunk", "1"]):
            d = logits(model, ids, out, chunk)
            s = logits(model, ids, out, chunk + ["--ffn-sparsity", "0"])
            rel = np.abs(d - s).max() / np.abs(d).max()
            check(rel < 1e-3, f"dense vs --ffn-sparsity 0 {'decode' if chunk else 'prefill'}: max|diff| {rel:.2e} of max|logit|")
        g_d = greedy(model, ids[:16], 48)
        g_s = greedy(model, ids[:16], 48, ["--ffn-sparsity", "0"])
        check(g_d == g_s, f"greedy 48 tokens identical (dense {g_d[:6]}..., sparse {g_s[:6]}...)")

        # calibrate, prepare
        thr = os.path.join(tmp, "sp.json")
        run(["calibrate-sparsity", model, text, "-o", thr, "-t", "2", "-c", "128"])
        t = json.load(open(thr))
        lv = [x["sparsity"] for x in t["levels"]]
        mono = all(all(a <= b for a, b in zip(t["levels"][i]["thresholds"], t["levels"][i + 1]["thresholds"]))
                   for i in range(len(lv) - 1))
        check(len(lv) == 19 and mono, f"calibrated {len(lv)} levels, thresholds ascending with sparsity: {mono}")
        lay = os.path.join(tmp, "lay")
        p = run(["offload-prepare", model, lay])
        ffn = os.path.join(lay, "ffn.bin")
        check(os.path.exists(ffn), f"offload-prepare: {p.stdout.strip()}")

        # the resident weights and the records' size, from run's description line
        p = run(["run", "-m", model, "-p", "Once", "-n", "4", "--ffn-offload", lay, "--temp", "0"])
        m = re.search(r"cache (\d+) of (\d+) neurons per layer \(([\d.]+) MiB\), resident weights ([\d.]+) MiB", p.stderr)
        check(m is not None and m.group(1) == m.group(2), "no budget: every neuron cached")
        n_ff = int(m.group(2))
        resident = float(m.group(4)) * 1048576
        records = float(m.group(3)) * 1048576
        budget = int(resident + 0.3 * records)
        rep = re.search(r"ffn: (\d+) tokens .* per token: I/O wait ([\d.]+) ms, cache ([\d.]+) ms, compute ([\d.]+) ms, "
                        r"([\d.]+) KiB read .*active ([\d.]+)%, cache hit rate ([\d.]+)%", p.stderr)
        check(rep is not None, "run reports per-token I/O wait, cache, compute, bytes, active, hit rate")

        for sp in ("0", "0.5"):
            base = logits(model, ids, out, ["--ffn-sparsity", sp, "--ffn-thresholds", thr])
            variants = [["--ffn-window", "1"], ["--ffn-window", "5"], ["--ffn-window", "5", "--ffn-prefetch"],
                        ["--ffn-window", "5", "--ffn-no-direct"], ["--ffn-window", "2", "--chunk", "1"],
                        ["--ffn-naive"], ["--ffn-window", "3", "--chunk", "7"]]
            for v in variants:
                got = logits(model, ids, out, ["--ffn-sparsity", sp, "--ffn-thresholds", thr, "--ffn-offload", lay,
                                               "--weights-dram-budget", str(budget)] + v)
                if "--chunk" in v:
                    ch = v[v.index("--chunk") + 1]
                    base_c = logits(model, ids, out, ["--ffn-sparsity", sp, "--ffn-thresholds", thr, "--chunk", ch])
                    same = np.array_equal(got, base_c)
                else:
                    same = np.array_equal(got, base)
                check(same, f"sparsity {sp}, streamed with 30% of the neurons cached {' '.join(v)}: bit-identical to in-memory")
        p = run(["run", "-m", model, "-p", "Once upon a time", "-n", "24", "--temp", "0", "--ffn-offload", lay,
                 "--weights-dram-budget", str(budget), "--ffn-sparsity", "0.5", "--ffn-thresholds", thr, "--ffn-prefetch"])
        rep = re.search(r"generation ffn: .* ([\d.]+) KiB read .*active ([\d.]+)%, cache hit rate ([\d.]+)%; read ahead ([\d.]+) KiB, "
                        r"([\d.]+)% of it used", p.stderr)
        check(rep is not None and 30 < float(rep.group(2)) < 70 and float(rep.group(1)) > 0 and float(rep.group(4)) > 0,
              f"sparsity 0.5 streamed, generation reads ahead: {rep.group(0) if rep else p.stderr[-300:]}")

        # serve: the same text at sparsity 0 as a dense server, figures on /metrics
        body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        texts = {}
        for name, extra in (("dense", []), ("offload", ["--ffn-offload", lay, "--weights-dram-budget", str(budget),
                                                         "--ffn-sparsity", "0"])):
            srv = pdlib.serve(model, ["--parallel", "2"] + extra, "ffn-" + name)
            try:
                st, _, data = pdlib.req(srv.host, srv.port, "POST", "/v1/completions", body)
                texts[name] = json.loads(data)["choices"][0]["text"] if st == 200 else f"HTTP {st}"
                if name == "offload":
                    m = pdlib.metrics(srv)
                    check(m.get("larder_ffn_tokens_total", 0) > 0 and m.get("larder_ffn_read_bytes_total", 0) > 0 and
                          m.get("larder_ffn_cache_hits_total", 0) > 0 and "larder_ffn_io_wait_seconds_total" in m,
                          "serve: /metrics has the FFN figures " +
                          str({k: v for k, v in m.items() if k.startswith("larder_ffn_")}))
            finally:
                srv.kill(signal.SIGTERM)
        check(texts["dense"] == texts["offload"], f"serve: offloaded FFN at sparsity 0 answers as the dense server: {texts}")

        # corruption: never wrong weights
        def corrupt(name, mutate, pattern):
            bad = os.path.join(tmp, "bad_" + name)
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(lay, bad)
            mutate(os.path.join(bad, "ffn.bin"))
            if os.path.exists(out):
                os.unlink(out)
            p = run(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "-o", out, "-t", "2", "--ffn-sparsity", "0",
                     "--ffn-offload", bad, "--weights-dram-budget", str(budget)], ok=False)
            one_error(p, pattern, f"corrupt {name}")
            check(not os.path.exists(out), f"corrupt {name}: no logits written")

        size = os.path.getsize(ffn)

        def flip(off):
            def f(path):
                with open(path, "r+b") as fh:
                    fh.seek(off)
                    b = fh.read(1)
                    fh.seek(off)
                    fh.write(bytes([b[0] ^ 0x5A]))
            return f

        corrupt("record", flip(size - 4096 * 3 + 17), r"checksum")
        corrupt("header", flip(20), r"corrupt")
        corrupt("index", flip(4096 + 40), r"corrupt")
        corrupt("truncated", lambda path: os.truncate(path, size - 4096), r"truncated")

        # mismatches
        other = os.path.join(tmp, "other.gguf")
        run(["synth", "--shape", "stories15M", "--dtype", "q8_0", "-o", other, "--seed", "3"])
        p = run(["logits", "-m", other, "--ids", "1,2,3", "--ffn-offload", lay], ok=False)
        one_error(p, r"another model", "layout of another model")
        p = run(["logits", "-m", other, "--ids", "1,2,3", "--ffn-sparsity", "0.5", "--ffn-thresholds", thr], ok=False)
        one_error(p, r"another model", "thresholds of another model")
        p = run(["logits", "-m", model, "--ids", "1,2,3", "--ffn-offload", lay, "--weights-dram-budget",
                 str(int(resident * 0.5))], ok=False)
        one_error(p, r"below what must stay resident", "budget below the resident weights")
        p = run(["logits", "-m", model, "--ids", "1,2,3", "--ffn-sparsity", "0.99", "--ffn-thresholds", thr], ok=False)
        one_error(p, r"outside the calibrated range", "sparsity outside the calibrated range")
        p = run(["logits", "-m", model, "--ids", "1,2,3", "--ffn-offload", os.path.join(tmp, "none")], ok=False)
        one_error(p, r"offload-prepare", "missing layout")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} failed")
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
