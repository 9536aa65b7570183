#!/usr/bin/python3
"""Accuracy checks through `larder perplexity` (issue "Fast CPU inference").

Run by ctest as `/usr/bin/python3 tests/perplexity_test.py` with LARDER_BIN set to the larder binary.
Shared data comes from LARDER_SHARED or ../shared (relative to the repository root).

Convention checked (the engine's and the reference's): the text is tokenized WITH BOS, split into
non-overlapping windows of n_ctx tokens (trailing partial window unused), each window's first token
replaced by BOS, and only the second half of each window is scored: logits at window positions
n_ctx/2 .. n_ctx-2 against the next token (llama.cpp's perplexity convention).

Cases
  cli          bad inputs give exit 1 and exactly one `larder: error:` line on stderr.
  (a) stories260K f32 (the real trained model) on text/tinystories-samples.txt: perplexity finite and
      plausible, and equal (1e-4 relative) to an independent float64 PyTorch computation
      (tests/reference/llama_ref.py) on the same token ids and windows; at the default window (the
      model's context, 128) and at -c 48 -b 5 (odd batch chunking). Ids come from
      `larder tokenize --json-batch`.
  (b) f16 and bf16 copies of stories260K written by tests/reference/gguf_convert.py (our own numpy
      GGUF writer; bf16 by round-to-nearest-even, cross-checked bit-for-bit against torch's bf16
      cast): engine perplexity equal to the reference's on the converted weights (1e-4), and the
      change versus f32 and mean KL(f32 || copy) within CONVERT_BOUNDS.
  (c) random-weight llama (`larder synth --shape custom`, 256 wide so 32- and 256-blocks fit):
      synth's q8_0/q4_0 files hold the f32 file's weights (same seed; checked by dequantizing with
      tests/reference/gguf_reader.py), and `perplexity --kl-base f32.gguf` gives mean KL within
      KL_BOUNDS. Formats made by `larder quantize` are included when `larder quantize` works (exit
      0), and reported as skipped otherwise.

Exit status: 0 all passed, 1 any failure, 77 (skip) when the shared data is missing (the checks that
need no shared data still run first).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.environ.get("LARDER_SOURCE_DIR") or os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "reference"))

from gguf_convert import convert_file  # noqa: E402
from gguf_reader import GGUFFile  # noqa: E402
from llama_ref import LlamaRef, load_gguf_model  # noqa: E402

THREADS = 2
# The engine is compared with float64 references at f32 precision, so every larder run here uses
# the f32 KV cache (the default is f16; tests/kv_types_test.py and reference_model_test.py check the
# other cache types with their own bounds).
os.environ["LARDER_CACHE_TYPE_K"] = "f32"
os.environ["LARDER_CACHE_TYPE_V"] = "f32"
REF_REL_TOL = 1e-4          # engine vs float64 reference perplexity, relative

# (b) f16/bf16 copies of stories260K. Measured (Release, AVX2/AVX-512, 567 scored tokens at the
# default window of 128): ppl f32 3.821345; f16 3.821348 (+0.0001%), mean KL 5.6e-7;
# bf16 3.820749 (-0.016%), mean KL 5.2e-5, top-1 agreement 99.6%. f16 keeps 11 significant bits,
# bf16 8, so bf16's weight error is ~8x f16's and its KL ~64x. Bounds: |ppl change| and mean KL,
# with ~10x (bf16) to ~20-100x (f16) margin for other kernels' summation orders.
CONVERT_BOUNDS = {
    # dtype: (max |ppl/ppl_f32 - 1|, max mean KL(f32 || dtype))
    "f16": (1e-4, 1e-5),
    "bf16": (2e-3, 5e-4),
}

# (c) random-weight model, mean KL(f32 || quantized) over the scored positions (1016 tokens, 8
# windows of 256, seed 7). The model is random, so its perplexity (~706 over a 512 vocab) means nothing;
# KL measures how much the format changes its next-token distributions.
# "measured": synth files (same seed) through this engine. KL is almost exactly proportional to
# the weight MSE here: q4_0/q8_0 KL ratio 247 vs an MSE ratio of 258 for Gaussian weights. The
# formats `larder quantize` will add were not measurable when this was written; their expected KL
# is q8_0's KL times the MSE ratio of a simple round-to-nearest numpy model of each format on
# Gaussian weights (q4_1 213x, q5_0 64x, q5_1 50x, q4_K 214x, q5_K 51x, q6_K 12x). Bounds are
# ~2-3x the measured or predicted value (real k-quant quantizers search scales and beat the RTN
# model, and the engine may quantize activations to 8 bits, adding roughly a q8_0-sized term).
KL_BOUNDS = [
    # (format, how made, expected mean KL, bound)
    ("f16", "synth", 4.6e-8, 1e-6),
    ("bf16", "synth", 3.2e-6, 2e-5),
    ("q8_0", "synth", 3.0e-5, 1e-4),
    ("q4_0", "synth", 7.5e-3, 1.5e-2),
    ("q8_0", "quantize", 3.0e-5, 1e-4),
    ("q4_0", "quantize", 7.5e-3, 1.5e-2),
    ("q4_1", "quantize", 6.4e-3, 1.5e-2),
    ("q5_0", "quantize", 1.9e-3, 5e-3),
    ("q5_1", "quantize", 1.5e-3, 4e-3),
    ("q4_K", "quantize", 6.4e-3, 1.5e-2),
    ("q5_K", "quantize", 1.5e-3, 4e-3),
    ("q6_K", "quantize", 3.7e-4, 1e-3),
    ("Q4_K_M", "quantize", 6.4e-3, 1.5e-2),   # mostly q4_K, some tensors q6_K: at most q4_K's
]
RANDOM_SHAPE = ["--shape", "custom", "--arch", "llama", "--n-embd", "256", "--n-ff", "512", "--n-layer", "2",
                "--n-head", "4", "--n-head-kv", "2", "--n-vocab", "512", "--n-ctx", "256", "--scale", "3",
                "--seed", "7"]
# synth q8_0/q4_0 hold the f32 file's weights: relative RMS error of the dequantized 2-D tensors.
# Expected for Gaussian weights: q8_0 ~0.5%, q4_0 ~9%; different weights would give ~140%.
SYNTH_SAME_WEIGHTS_RMS = {"q8_0": 0.01, "q4_0": 0.15}
# ggml type ids of the quantize formats, for checking what the files hold.
GGML_TYPE_IDS = {"f16": 1, "bf16": 30, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
                 "q4_K": 12, "q5_K": 13, "q6_K": 14, "Q4_K_M": 12}

FAILS = []


def log(msg=""):
    print(msg, flush=True)


def check(ok, case, msg):
    log("  %-58s %s" % (case + ": " + msg, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append("%s: %s" % (case, msg))
    return ok


def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    return os.path.join(REPO, "..", "shared")


def larder_bin():
    b = os.environ.get("LARDER_BIN")
    if b:
        return b
    for d in ("build", "build-p"):
        p = os.path.join(REPO, d, "bin", "larder")
        if os.path.exists(p):
            return p
    sys.exit("LARDER_BIN is not set and no build/bin/larder was found")


BIN = larder_bin()


def run(args, timeout=300):
    cmd = [BIN] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_ok(args):
    r = run(args)
    if r.returncode != 0:
        raise RuntimeError("exit %d: %s\n%s" % (r.returncode, " ".join(map(str, args)), r.stderr[-2000:]))
    return r


def ppl_json(model, text, *extra):
    r = run_ok(["perplexity", "-m", model, "-f", text, "-t", THREADS, "--json"] + list(extra))
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    if len(lines) != 1:
        raise RuntimeError("--json printed %d lines: %r" % (len(lines), r.stdout[-500:]))
    return json.loads(lines[0])


def tokenize(model, text, tmp):
    jb = os.path.join(tmp, "batch.json")
    with open(jb, "w", encoding="utf-8") as f:
        json.dump([text], f)
    out = json.loads(run_ok(["tokenize", "-m", model, "--json-batch", jb]).stdout)
    return [int(t) for t in out[0]]


# ----------------------------------------------------------------------------- reference

def reference_perplexity(model_path, ids, n_ctx):
    """Float64 PyTorch perplexity with the convention in the module docstring -> (ppl, n_tokens)."""
    cfg, w = load_gguf_model(model_path)
    meta = GGUFFile(model_path).metadata
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    model = LlamaRef(cfg, w)
    first = n_ctx // 2
    nll, n = 0.0, 0
    for wi in range(len(ids) // n_ctx):
        win = list(ids[wi * n_ctx:(wi + 1) * n_ctx])
        if add_bos:
            win[0] = int(bos)
        logp = torch.log_softmax(model.forward(win), dim=-1)           # float64
        targets = torch.tensor(win[first + 1:], dtype=torch.long)
        rows = logp[first:n_ctx - 1]
        nll -= float(rows.gather(1, targets[:, None]).sum())
        n += len(targets)
    return math.exp(nll / n), n


# ----------------------------------------------------------------------------- cases

def case_cli(tmp, text_path):
    log("cli: bad inputs")
    m = os.path.join(tmp, "cli-a.gguf")
    m_other = os.path.join(tmp, "cli-b.gguf")
    common = ["--shape", "custom", "--n-embd", "64", "--n-ff", "128", "--n-layer", "1", "--n-head", "2",
              "--n-head-kv", "2", "--n-ctx", "64"]
    run_ok(["synth"] + common + ["--n-vocab", "300", "-o", m])
    run_ok(["synth"] + common + ["--n-vocab", "260", "-o", m_other])
    empty = os.path.join(tmp, "empty.txt")
    open(empty, "w").close()
    missing = os.path.join(tmp, "no-such-file.txt")
    cases = [
        ("missing text file", ["-m", m, "-f", missing], "no-such-file"),
        ("no -f", ["-m", m], "-f"),
        ("no model", ["-f", text_path], "model"),
        ("empty text", ["-m", m, "-f", empty], "fewer than one window"),
        ("window too long", ["-m", m, "-f", text_path, "-c", "100000"], "fewer than one window"),
        ("window of 2", ["-m", m, "-f", text_path, "-c", "2"], "-c 3"),
        ("bad batch", ["-m", m, "-f", text_path, "-b", "0"], "batch"),
        ("kl-base missing", ["-m", m, "-f", text_path, "--kl-base", missing], "--kl-base"),
        ("kl-base other vocab", ["-m", m, "-f", text_path, "--kl-base", m_other], "vocabular"),
    ]
    for name, args, needle in cases:
        env = dict(os.environ)
        env.pop("LARDER_MODEL", None)
        r = subprocess.run([BIN, "perplexity"] + args, capture_output=True, text=True, timeout=60, env=env,
                           stdin=subprocess.DEVNULL)
        lines = r.stderr.strip().splitlines()
        ok = (r.returncode == 1 and len(lines) == 1 and lines[0].startswith("larder: error:")
              and needle in lines[0] and not r.stdout.strip())
        check(ok, "cli " + name, "exit %d, %r" % (r.returncode, r.stderr.strip()[:150]))


def case_stories(tmp, model, text_path, text):
    log("(a) stories260K f32: engine vs float64 PyTorch reference")
    ids = tokenize(model, text, tmp)
    check(len(ids) > 256 and ids[0] == 1, "tokenize", "%d ids with BOS" % len(ids))
    res = {}
    for extra, n_ctx in (([], 128), (["-c", "48", "-b", "5"], 48)):
        j = ppl_json(model, text_path, *extra)
        ref, n_ref = reference_perplexity(model, ids, n_ctx)
        label = "stories260K f32 ctx %d%s" % (n_ctx, " -b 5" if extra else "")
        check(j["n_ctx"] == n_ctx and j["n_tokens"] == n_ref and j["n_windows"] == len(ids) // n_ctx,
              label, "window %d, %d windows, %d scored tokens" % (j["n_ctx"], j["n_windows"], j["n_tokens"]))
        p = j["perplexity"]
        # Plausible: a trained model on in-domain text is far below the uniform 512 and above 1.
        check(math.isfinite(p) and 1.0 < p < 20.0, label, "perplexity %.6f finite and in (1, 20)" % p)
        check(abs(math.log(p) - j["nll_mean"]) < 1e-9, label, "perplexity = exp(nll_mean)")
        rel = abs(p - ref) / ref
        check(rel <= REF_REL_TOL, label, "reference %.6f, rel diff %.2e <= %.0e" % (ref, rel, REF_REL_TOL))
        res[n_ctx] = j
    # The llama2.c checkpoint of the same model gives the same distributions (KL ~ 0), and a model
    # with another vocabulary of the same size is refused as a base.
    bin_path = os.path.join(os.path.dirname(model), "stories260K.bin")
    if os.path.exists(bin_path):
        j = ppl_json(bin_path, text_path, "--kl-base", model)
        check(j["kl_mean"] <= 1e-9 and j["top1_agree"] == 1.0, "stories260K .bin vs GGUF",
              "mean KL %.2e, top-1 %.2f%%" % (j["kl_mean"], 100 * j["top1_agree"]))
    other = os.path.join(tmp, "other-vocab-512.gguf")
    run_ok(["synth", "--shape", "custom", "--n-embd", "64", "--n-ff", "128", "--n-layer", "1", "--n-head", "2",
            "--n-head-kv", "2", "--n-ctx", "128", "--n-vocab", "512", "-o", other])
    r = run(["perplexity", "-m", model, "-f", text_path, "--kl-base", other])
    lines = r.stderr.strip().splitlines()
    check(r.returncode == 1 and len(lines) == 1 and "different vocabularies" in lines[0], "cli kl-base same size, other tokens",
          repr(r.stderr.strip()[-90:]))
    # Human-readable form agrees with the JSON.
    out = run_ok(["perplexity", "-m", model, "-f", text_path, "-t", THREADS]).stdout.splitlines()
    want = "perplexity: %.6f over %d tokens" % (res[128]["perplexity"], res[128]["n_tokens"])
    check(out and out[0] == want, "text output", repr(out[0] if out else ""))
    return ids, res[128]


def case_converted(tmp, model, text_path, ids, base):
    log("(b) f16 / bf16 copies of stories260K (tests/reference/gguf_convert.py)")
    src = GGUFFile(model)
    # Rewriting with nothing to convert must reproduce the file byte for byte (writer check).
    same = os.path.join(tmp, "stories-f32-copy.gguf")
    convert_file(model, same, "f32")
    with open(model, "rb") as a, open(same, "rb") as b:
        check(a.read() == b.read(), "gguf_convert f32 copy", "byte-identical to the original")
    for dt, (ppl_bound, kl_bound) in CONVERT_BOUNDS.items():
        path = os.path.join(tmp, "stories-%s.gguf" % dt)
        changed = convert_file(model, path, dt)
        g = GGUFFile(path)
        n2d = sum(1 for t in src.tensors.values() if len(t.ne) == 2)
        check(len(changed) == n2d and g.metadata == src.metadata, "convert " + dt,
              "%d 2-D tensors converted, metadata identical" % len(changed))
        # Bits: f16 = numpy's RNE cast; bf16 = torch's RNE cast (an independent implementation).
        bad = 0
        for name in changed:
            x = src.tensor(name)
            raw = g.raw(name)
            if dt == "f16":
                want = x.astype("<f2").view(np.uint16)
            else:
                want = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy()
            bad += int(np.count_nonzero(raw.view("<u2") != want.view(np.uint16).reshape(-1)))
        check(bad == 0, "convert " + dt, "bits equal the reference cast (%d differ)" % bad)
        j = ppl_json(path, text_path, "--kl-base", model)
        ref, _ = reference_perplexity(path, ids, 128)
        p = j["perplexity"]
        rel = abs(p - ref) / ref
        check(rel <= REF_REL_TOL, "stories260K " + dt, "ppl %.6f, reference on %s weights %.6f, rel diff %.2e"
              % (p, dt, ref, rel))
        change = p / base["perplexity"] - 1
        check(abs(change) <= ppl_bound, "stories260K " + dt, "ppl change vs f32 %+.4f%% (bound +-%.3g%%)"
              % (100 * change, 100 * ppl_bound))
        check(j["kl_mean"] <= kl_bound and j["kl_max"] >= j["kl_mean"], "stories260K " + dt,
              "mean KL %.3g (bound %.0e), max %.3g, top-1 %.2f%%"
              % (j["kl_mean"], kl_bound, j["kl_max"], 100 * j["top1_agree"]))
        check(abs(j["base_perplexity"] / base["perplexity"] - 1) < 1e-9, "stories260K " + dt,
              "base perplexity = f32 perplexity")


def synth_same_weights(f32_path, q_path, dt):
    a, b = GGUFFile(f32_path), GGUFFile(q_path)
    worst = 0.0
    ok = set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        if name not in b.tensors:
            continue
        x, y = a.tensor(name).astype(np.float64), b.tensor(name).astype(np.float64)
        if len(t.ne) == 2:
            ok &= b.tensors[name].type_id == GGML_TYPE_IDS[dt]
            worst = max(worst, float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))))
        else:
            ok &= bool(np.array_equal(x, y))
    bound = SYNTH_SAME_WEIGHTS_RMS[dt]
    check(ok and worst <= bound, "synth %s weights" % dt,
          "same weights as f32: worst relative RMS error %.4f <= %.2f" % (worst, bound))


def try_quantize(src, dst, fmt):
    """Returns (ok, message). A clean refusal (exit 1) is 'not available'; anything else fails."""
    last = None
    for name in dict.fromkeys([fmt, fmt.lower(), fmt.upper()]):
        r = run(["quantize", src, dst, name, "-t", THREADS])
        if r.returncode == 0 and os.path.exists(dst):
            return True, name
        last = r
    if last.returncode != 1:
        raise RuntimeError("quantize %s exited %d: %s" % (fmt, last.returncode, last.stderr[-500:]))
    return False, last.stderr.strip().splitlines()[-1] if last.stderr.strip() else "exit 1"


def case_blocks(tmp, text_path, shared_ok):
    log("(c) block formats on a random-weight model (n_embd 256, n_ff 512)")
    paths = {}
    for dt in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        paths[dt] = os.path.join(tmp, "rand-%s.gguf" % dt)
        run_ok(["synth"] + RANDOM_SHAPE + ["--dtype", dt, "-o", paths[dt]])
    for dt in ("q8_0", "q4_0"):
        synth_same_weights(paths["f32"], paths[dt], dt)
    if not shared_ok:
        return
    base = ppl_json(paths["f32"], text_path)
    log("  random f32: perplexity %.4f over %d tokens (%d windows of %d; uniform would be 512)"
        % (base["perplexity"], base["n_tokens"], base["n_windows"], base["n_ctx"]))

    probe = os.path.join(tmp, "rand-probe.gguf")
    qr = run(["quantize", paths["f32"], probe, "q8_0", "-t", THREADS])
    have_quantize = qr.returncode == 0
    if not have_quantize:
        log("  NOTE: `larder quantize` is not available yet (%s): quantize rows SKIPPED"
            % (qr.stderr.strip().splitlines() or ["exit %d" % qr.returncode])[-1])
    rows = []
    for fmt, how, expected, bound in KL_BOUNDS:
        label = "%s (%s)" % (fmt, how)
        if how == "synth":
            path = paths[fmt]
        elif not have_quantize:
            rows.append((label, expected, bound, None, "SKIP: quantize not available"))
            continue
        else:
            path = os.path.join(tmp, "rand-quant-%s.gguf" % fmt)
            ok, msg = try_quantize(paths["f32"], path, fmt)
            if not ok:
                rows.append((label, expected, bound, None, "SKIP: " + msg[:60]))
                log("  NOTE: quantize does not make %s yet: %s" % (fmt, msg))
                continue
            g = GGUFFile(path)
            types = {t.type_id for n, t in g.tensors.items() if n.endswith("ffn_gate.weight")}
            check(types == {GGML_TYPE_IDS[fmt]}, "quantize " + fmt, "ffn_gate tensors are type %s (ids %s)"
                  % (fmt, sorted(types)))
        j = ppl_json(path, text_path, "--kl-base", paths["f32"])
        kl = j["kl_mean"]
        ok = (0 < kl <= bound and j["kl_max"] >= kl and 0 <= j["top1_agree"] <= 1
              and abs(j["base_perplexity"] / base["perplexity"] - 1) < 1e-9 and j["n_tokens"] == base["n_tokens"])
        rows.append((label, expected, bound, j, "PASS" if ok else "FAIL"))
        if not ok:
            FAILS.append("%s: mean KL %.3g (bound %.1e), %r" % (label, kl, bound, j))
    log("  %-18s %10s %10s %12s %10s %8s %12s  %s" % ("format", "expected", "bound", "mean KL", "max KL",
                                                      "top-1", "ppl", "result"))
    for label, expected, bound, j, status in rows:
        if j is None:
            log("  %-18s %10.1e %10.1e %12s %10s %8s %12s  %s" % (label, expected, bound, "-", "-", "-", "-", status))
        else:
            log("  %-18s %10.1e %10.1e %12.3e %10.3e %7.2f%% %12.4f  %s"
                % (label, expected, bound, j["kl_mean"], j["kl_max"], 100 * j["top1_agree"], j["perplexity"],
                   status))


def main():
    t0 = time.time()
    shared = shared_dir()
    model = os.path.join(shared, "models", "stories260K", "stories260K-f32.gguf")
    text_path = os.path.join(shared, "text", "tinystories-samples.txt")
    shared_ok = os.path.exists(model) and os.path.exists(text_path)
    tmp = tempfile.mkdtemp(prefix="larder-ppl-")
    try:
        if shared_ok:
            with open(text_path, encoding="utf-8") as f:
                text = f.read()
            cli_text = text_path
        else:
            log("NOTE: shared data (models/stories260K, text/) not found via LARDER_SHARED or %s; "
                "running only the checks that need none" % shared)
            cli_text = os.path.join(tmp, "text.txt")
            with open(cli_text, "w") as f:
                f.write("Once upon a time there was a little cat. " * 40)
        case_cli(tmp, cli_text)
        if shared_ok:
            ids, base = case_stories(tmp, model, text_path, text)
            case_converted(tmp, model, text_path, ids, base)
        case_blocks(tmp, text_path, shared_ok)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        FAILS.append("error: %s" % e)
        log("  FAIL %s" % e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log("perplexity_test: %.1f s" % (time.time() - t0))
    if FAILS:
        log("%d FAILED:" % len(FAILS))
        for f in FAILS:
            log("  " + f)
        return 1
    if not shared_ok:
        log("SKIP: shared data missing (set LARDER_SHARED to the shared/ directory)")
        return 77
    log("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
