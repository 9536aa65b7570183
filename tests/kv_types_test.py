#!/usr/bin/python3
"""KV cache types (-ctk/-ctv f32 | f16 | bf16 | q8_0) on the real models: SmolLM2-135M-Instruct Q4_1
(head_dim 64) and Gemma 3 270M Q4_K_M (head_dim 256, sliding-window layers).

Run by ctest (label: model) with LARDER_BIN set. Models come from `scripts/models --path NAME`; a model
that is not cached is SKIPPED with a message (exit 77 when nothing failed but something was skipped).
The f32 cache is the baseline (the engine's f32 path is checked against float64 references in
real_model_test.py); the other types are checked against it, on two files per model:

  f32 copy   the model's f32 copy made by real_model_test.py (tests/reference/gguf_convert.py, cached in
             $LARDER_REF_CACHE or ~/.cache/larder/ref; made here the same way when absent): f32 weights and
             activations, so what changes is the cache type alone. Tight bounds (LOGIT_TOL_F32).
  quantized  the GGUF itself (Q4_1 / Q4_K_M): its integer kernels round every activation to 8 bits, and
             any perturbation of the residual stream flips some of those roundings at practically every
             later position (see real_model_test.py's PPL_TOL comment), so f16, bf16 and q8_0 all move the
             logits by the same few percent (measured 3-6% of max|logit| on SmolLM2 Q4_1; mean KL ~4e-3,
             the same for f16 as for bf16): the bounds (LOGIT_TOL_Q) are that noise floor.

  (a) teacher-forced logits: `larder logits` over each prompt followed by the f32 cache's 64 greedy
      tokens (so every type sees the same inputs), with each cache type:
      max|logits(type) - logits(f32)| <= LOGIT_TOL[type] * max|logits(f32)| over all positions.
  (b) greedy (free running, `larder logits --greedy 64`): each type's tokens equal the f32 cache's at
      every step whose f32 top-2 margin exceeds the bound 2 * LOGIT_TOL[type] * max|logit| (a logit
      error within the bound cannot flip such a step). At the first step where the two runs differ,
      the f32 margin must be within that bound (a near tie: printed); the runs are not compared past
      it, because their prefixes differ. The decisive steps compared are printed; on the f32 copy the
      f16 cache must compare at least 32 per model.
  (c) bad type names give one error line listing the valid types.
  (d) `larder serve --kv-mem 256M` holds twice the KV blocks with f16 as with f32 (and ~3.76x with
      q8_0: 34 vs 128 bytes per 32 values), as printed on its ready line.
"""

import glob
import json
import re
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.environ.get("LARDER_SOURCE_DIR") or os.path.dirname(HERE)
THREADS = os.environ.get("LARDER_TEST_THREADS", "2")
N_GREEDY = 64
# Stated bounds on the logit error of each cache type relative to max|logit| (see the docstring).
LOGIT_TOL_F32 = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}  # measured max: 8.4e-4, 6.4e-3, 2.6e-2
LOGIT_TOL_Q = {"f16": 0.1, "bf16": 0.1, "q8_0": 0.12}  # measured max: 4.7e-2, 4.9e-2, 7.3e-2
PROMPTS = [
    "Once upon a time, there was a little girl named",
    "Question: What is the capital of France?\nAnswer:",
    "The json module in Python",
    "def fibonacci(n):\n",
]
MODELS = ["smollm2", "gemma3"]

FAILS, SKIPS = [], []


def log(msg=""):
    print(msg, flush=True)


def check(ok, case, msg):
    log("  %-40s %s  %s" % (case, msg, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append("%s: %s" % (case, msg))


def larder_bin():
    b = os.environ.get("LARDER_BIN")
    if b:
        return b
    p = os.path.join(REPO, "build", "bin", "larder")
    if os.path.exists(p):
        return p
    sys.exit("LARDER_BIN is not set and no build/bin/larder was found")


BIN = larder_bin()


def run(args, check_rc=True):
    r = subprocess.run([BIN] + [str(a) for a in args], capture_output=True, text=True, timeout=900,
                       stdin=subprocess.DEVNULL)
    if check_rc and r.returncode != 0:
        raise RuntimeError("larder %s exited %d: %s" % (args[0], r.returncode, (r.stderr or "").strip()[-300:]))
    return r


def model_path(name):
    r = subprocess.run([os.path.join(REPO, "scripts", "models"), "--path", name], capture_output=True, text=True)
    p = r.stdout.strip()
    return p if r.returncode == 0 and p and os.path.exists(p) else None


def cache(t):
    return ["-ctk", t, "-ctv", t, "-t", THREADS]


def encode(model, texts, tmp):
    jb = os.path.join(tmp, "batch.json")
    with open(jb, "w", encoding="utf-8") as f:
        json.dump(texts, f)
    return json.loads(run(["tokenize", "-m", model, "--json-batch", jb]).stdout)


def greedy(model, ids, t):
    out = run(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "--greedy", N_GREEDY] + cache(t)).stdout
    for line in reversed(out.strip().splitlines()):
        if line.strip().startswith("["):
            return [int(x) for x in json.loads(line)]
    raise RuntimeError("--greedy printed no JSON array")


def logits(model, ids, t, tmp, n_vocab=None):
    out = os.path.join(tmp, "logits.bin")
    run(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "-o", out] + cache(t))
    a = np.fromfile(out, dtype="<f4").astype(np.float64)
    os.unlink(out)
    return a.reshape(len(ids), -1)


def f32_copy(path):
    """The f32 copy real_model_test.py makes (made here if it is not cached yet, the same way)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    saved = dict(os.environ)
    try:
        import real_model_test
    except ImportError as e:  # its reference dependencies are missing: take a cached copy if any
        log("real_model_test cannot be imported (%s): looking for a cached f32 copy" % e)
        d = os.environ.get("LARDER_REF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "larder", "ref")
        stem = os.path.basename(path)[:-len(".gguf")]
        found = sorted(glob.glob(os.path.join(d, stem + ".f32-*.gguf")))
        return found[0] if found else None
    finally:  # real_model_test pins the f32 cache through the environment; the types here come by flag
        os.environ.clear()
        os.environ.update(saved)
    return real_model_test.f32_copy(path)


def run_model(name, tmp):
    path = model_path(name)
    if not path:
        SKIPS.append("model %s not cached (fetch it with scripts/models)" % name)
        log("SKIP %s: not cached" % name)
        return
    copy = f32_copy(path)
    if copy:
        run_file(name + " f32-copy", copy, LOGIT_TOL_F32, tmp, min_decisive=32)
    else:
        SKIPS.append("%s: no f32 copy (tests/reference needs numpy; see tests/requirements.txt)" % name)
        log("SKIP %s f32 copy: not found" % name)
    run_file(name, path, LOGIT_TOL_Q, tmp, min_decisive=0)


def run_file(name, path, LOGIT_TOL, tmp, min_decisive):
    log("== %s (%s)" % (name, os.path.basename(path)))
    prompts = encode(path, PROMPTS, tmp)
    decisive_f16 = 0
    for pi, ids in enumerate(prompts):
        base_toks = greedy(path, ids, "f32")
        seq = ids + base_toks
        base = logits(path, seq, "f32", tmp)
        n_p = len(ids)
        mx = float(np.max(np.abs(base)))
        rows = base[n_p - 1:n_p - 1 + N_GREEDY]  # row i predicts generated token i
        top2 = np.sort(rows, axis=1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        for t in ("f16", "bf16", "q8_0"):
            case = "%s p%d %s" % (name, pi, t)
            tol = LOGIT_TOL[t]
            other = logits(path, seq, t, tmp)
            ratio = float(np.max(np.abs(other - base))) / mx
            check(ratio <= tol, case + " logits", "max|diff|/max|logit| = %.2e <= %.0e" % (ratio, tol))
            toks = greedy(path, ids, t)
            bound = 2 * tol * mx
            first = next((i for i in range(N_GREEDY) if toks[i] != base_toks[i]), None)
            upto = N_GREEDY if first is None else first
            decisive = int(np.sum(margins[:upto] > bound))
            if t == "f16":
                decisive_f16 += decisive
            if first is None:
                check(True, case + " greedy", "identical to f32's %d tokens (%d decisive steps)" % (N_GREEDY, decisive))
            else:
                near = margins[first] <= bound
                check(near, case + " greedy",
                      "equal for %d steps (%d decisive), then differs at step %d where the f32 top-2 margin "
                      "%.4f is %s the bound %.4f" % (first, decisive, first, margins[first],
                                                      "within" if near else "ABOVE", bound))
    check(decisive_f16 >= min_decisive, "%s f16 greedy coverage" % name,
          "%d decisive steps compared (>= %d)" % (decisive_f16, min_decisive))


def serve_blocks(model, t):
    p = subprocess.Popen([BIN, "serve", "-m", model, "--port", "0", "-c", "1024", "--kv-mem", "256M", "-t", "1",
                          "-ctk", t, "-ctv", t], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            m = re.search(r"ready: .*?(\d+) KV blocks of 16 tokens \(cache (\S+), ", line)
            if m:
                return int(m.group(1)), m.group(2)
            if "error" in line:
                raise RuntimeError(line.strip())
        raise RuntimeError("serve printed no ready line")
    finally:
        p.terminate()
        p.wait(timeout=30)


def capacity(name):
    path = model_path(name)
    if not path:
        return
    n = {t: serve_blocks(path, t) for t in ("f32", "f16", "q8_0")}
    check(n["f16"][0] == 2 * n["f32"][0] and all(n[t][1] == t for t in n), "%s serve --kv-mem 256M" % name,
          "blocks: %s" % {t: v[0] for t, v in n.items()})
    check(3.7 * n["f32"][0] <= n["q8_0"][0] <= 3.77 * n["f32"][0] + 1, "%s serve --kv-mem q8_0" % name,
          "q8_0 / f32 blocks = %.3f" % (n["q8_0"][0] / n["f32"][0]))


def main():
    with tempfile.TemporaryDirectory(prefix="larder_kvtypes_") as tmp:
        # (c) bad names: one line naming the valid types, before any model is loaded.
        r = run(["run", "-m", "/nonexistent.gguf", "-p", "x", "-ctk", "f8"], check_rc=False)
        lines = r.stderr.strip().splitlines()
        check(r.returncode != 0 and len(lines) == 1 and "f32, f16, bf16, q8_0" in lines[0] and "cache-type-k" in lines[0],
              "bad -ctk value", repr(r.stderr.strip()))
        r = run(["bench", "-m", "/nonexistent.gguf", "-ctv", "f16,q4_0"], check_rc=False)
        lines = r.stderr.strip().splitlines()
        check(r.returncode != 0 and len(lines) == 1 and "q4_0" in lines[0] and "cache-type-v" in lines[0],
              "bad bench -ctv list", repr(r.stderr.strip()))
        for name in (os.environ.get("KV_TYPES_ONLY") or ",".join(MODELS)).split(","):
            try:
                capacity(name)
                run_model(name, tmp)
            except RuntimeError as e:
                check(False, name, str(e))
    if FAILS:
        log("\nFAILED (%d):" % len(FAILS))
        for f in FAILS:
            log("  " + f)
        return 1
    if SKIPS:
        log("\nSKIPPED: " + "; ".join(SKIPS))
        return 77
    log("\nall passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
