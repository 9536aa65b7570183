#!/usr/bin/python3
"""Training-free FFN activation sparsity (CATS) in the engine against an independent float64 reference.

Run by ctest as `/usr/bin/python3 tests/ffn_sparsity_reference_test.py` with LARDER_BIN set to the larder
binary. Shared data comes from LARDER_SHARED or ../shared (relative to the repository root).

What is checked. In every layer's gated FFN, y = down(act(gate x) * up x), neuron j is active for a token
when |act(g_j)| > thr[layer] (strictly), and inactive neurons contribute nothing; thr 0 = dense. The
reference is tests/reference/llama_ref.py (SiLU) and tests/reference/gemma3_ref.py (GELU-tanh) with
their `ffn_thresholds` argument: float64 PyTorch, written from the published architectures, sharing no
code with the engine. The thresholds are read from the file `larder calibrate-sparsity` wrote (the
values the engine uses, float32); nothing the engine computed is used as an expected value.

Models
  stories260K   the real trained model (SiLU), GGUF f32; the llama2.c .bin once (same weights).
  gemma3-rand   a random-weight Gemma-3-shaped GGUF (GELU-tanh; q/k norms, post norms, 5 sliding-window
                layers of window 16 + 1 global, GQA) written here with tests/reference/gguf_convert.py's
                GGUF writer and the stories260K tokenizer (`larder synth` makes no gemma3 files).
Text: tinystories-samples.txt. Thresholds are calibrated (`calibrate-sparsity -c 64`) on its first six
lines; the logits input is BOS + the first 63 tokens of the Timmy story (lines 7-9), so calibration and
test text differ.

Checks per model
  calib    the thresholds are the level-quantiles of |act(gate)| on the calibration windows: in the
           reference's dense forward over the same windows (BOS + 63 tokens each, as calibrate-sparsity
           cuts them), the fraction of |act| <= thr[layer] is s within CALIB_TOL (5e-4; measured <= 7e-5,
           ~175k samples per layer) per layer at 0.25 and 0.5; at the interpolated 0.375 it lies strictly
           between the 0.35 and 0.4 fractions (interpolated thresholds are not quantiles).
  logits   `larder logits --ffn-sparsity S` (f32 KV cache) at S = 0 (dense through the sparse code),
           0.25, 0.5 and 0.375 (interpolated between the 0.35 and 0.4 levels, as the engine documents;
           the reference rounds the interpolated value to float32 like the engine), all at once and with
           --chunk 1 (token-by-token decode):
               max|engine - ref| <= TOL * max|ref logit|,   TOL = 1e-4,
           reference_model_test.py's f32 bound: stories260K and the Gemma file are f32, and --down-type
           auto keeps the transposed down columns f32, so the sparse path should be as exact as the dense
           one (measured: ratio <= ~7e-7 on this machine, >100x margin). Rounding: a neuron whose |act|
           lies within float32 rounding of its threshold may be decided differently by the f32 engine and
           the f64 reference, and one such flip moves the logits by up to ~1e-1 relative (this small model
           amplifies it: later neurons near their thresholds follow). So the reference collects the
           "ambiguous" neurons, | |act| - thr | <= AMBIG_REL * thr (1e-4, a wide net: the engine's act
           error is ~1e-6 relative), and when the plain comparison fails, the reference is re-run with the
           decision of one ambiguous neuron inverted (each in turn; then pairs among the 8 nearest). The
           engine passes only if one of those is within the SAME bound TOL; the inverted neurons and their
           |act|/thr - 1 are printed (measured: gemma3-rand at 0.375, all at once and --chunk 1 alike,
           one neuron at +8.7e-8).
           Any other disagreement (a flip far from the threshold, >= vs > on a whole layer, a wrong
           activation, threshold or layer) stays outside the bound.
  control  negative controls, proving the comparison can fail: the engine at 0.25 against the reference
           at 0.5 (and vice versa), against the dense reference, and against the reference with every
           threshold 1% higher (THR_NUDGE; the inverted-decision search is run for it too and must not
           explain it) must differ by >= CONTROL_FACTOR (10) x TOL (measured: 216x to 4800x).
           `--mismatch` runs the main comparisons at 0.25 / 0.5 against the other level's reference, to
           see the test fail (exit 1).
  sparsity the realized inactive fraction over the 64 input tokens in the reference is within
           SPARSITY_SLACK (0.15) of the target (the calibration text is different text), printed per
           layer (measured within 0.01 overall, 0.03 per layer).
  The llama2.c .bin (same weights, same model fingerprint) is checked once, at 0.25 all at once.

Exit status: 0 all passed, 1 any failure, 77 (skip) when the shared data is missing.
"""

import argparse
import json
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
sys.path.insert(0, HERE)

import pdlib  # noqa: E402

from gguf_convert import read_typed_metadata, write_gguf  # noqa: E402
from gguf_reader import T_FLOAT32, T_STRING, T_UINT32  # noqa: E402
from gemma3_ref import Gemma3Ref, load_gemma3  # noqa: E402
from llama_ref import LlamaRef, load_gguf_model, load_llama2c_model  # noqa: E402

THREADS = 2
os.environ["LARDER_CACHE_TYPE_K"] = "f32"   # reference comparisons at f32 precision (see perplexity_test.py)
os.environ["LARDER_CACHE_TYPE_V"] = "f32"

TOL = 1e-4              # relative to max|ref logit|, as reference_model_test.py's f32 bound
AMBIG_REL = 1e-4        # | |act| - thr | <= AMBIG_REL * thr: decision may differ between f32 and f64
MAX_AMBIG = 64          # more ambiguous neurons than this would mean the net is far too wide
EXPLAIN_PAIRS = 8       # pairs of inverted decisions are tried among this many nearest to the threshold
CONTROL_FACTOR = 10     # negative controls must exceed the bound by this factor
THR_NUDGE = 0.01        # fine-scale control: the reference with every threshold 1% higher
SPARSITY_SLACK = 0.15   # |realized inactive fraction - target| on the (different) test text
CALIB_TOL = 5e-4        # |fraction <= thr on the calibration windows - target|, calibrated levels
CALIB_CTX = 64
N_IDS = 64
LEVELS = [0.0, 0.25, 0.5]
INTERP = 0.375          # between the calibrated 0.35 and 0.4 levels
INTERP_LO, INTERP_HI = 0.35, 0.4

FAILS = []
FLIPS = []              # (case, [|act|/thr - 1 of each inverted decision]) that explained a difference


def log(msg=""):
    print(msg, flush=True)


def check(ok, case, msg):
    log("  %-36s %s  %s" % (case, msg, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append("%s: %s" % (case, msg))
    return ok


# ----------------------------------------------------------------------------- engine

def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    return os.path.join(REPO, "..", "shared")


BIN = pdlib.larder_bin()


def run_ok(args, timeout=120):
    cmd = [BIN] + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError("exit %d: %s\n%s" % (r.returncode, " ".join(cmd), r.stderr[-2000:]))
    return r


def tokenize(model, texts, tmp, extra=()):
    jb = os.path.join(tmp, "batch.json")
    with open(jb, "w", encoding="utf-8") as f:
        json.dump(texts, f)
    out = json.loads(run_ok(["tokenize", "-m", model, "--json-batch", jb] + list(extra)).stdout)
    return [[int(t) for t in ids] for ids in out]


def engine_logits(model, ids, n_vocab, tmp, sparsity, thr_file, chunk=None, extra=()):
    out = os.path.join(tmp, "logits.bin")
    args = ["logits", "-m", model, "--ids", ",".join(map(str, ids)), "-o", out, "-t", THREADS,
            "--ffn-sparsity", repr(sparsity), "--ffn-thresholds", thr_file] + list(extra)
    if chunk:
        args += ["--chunk", chunk]
    run_ok(args)
    a = np.fromfile(out, dtype="<f4")
    if a.size != len(ids) * n_vocab:
        raise RuntimeError("logits file has %d floats, expected %d x %d" % (a.size, len(ids), n_vocab))
    return a.reshape(len(ids), n_vocab).astype(np.float64)


# ----------------------------------------------------------------------------- thresholds

def level_thresholds(table, s):
    """Per-layer float32 thresholds for sparsity s, as the engine picks them: 0 -> dense; a calibrated
    level exactly; between two levels linear interpolation in double, rounded to float32."""
    if s == 0:
        return [0.0] * table["n_layer"]
    levels = table["levels"]
    for lv in levels:
        if abs(lv["sparsity"] - s) < 1e-9:
            return [float(np.float32(t)) for t in lv["thresholds"]]
    for lo, hi in zip(levels, levels[1:]):
        if lo["sparsity"] < s < hi["sparsity"]:
            w = (s - lo["sparsity"]) / (hi["sparsity"] - lo["sparsity"])
            return [float(np.float32((1 - w) * float(np.float32(a)) + w * float(np.float32(b))))
                    for a, b in zip(lo["thresholds"], hi["thresholds"])]
    raise ValueError("sparsity %g outside the calibrated levels" % s)


# ----------------------------------------------------------------------------- reference

class Probe:
    """Replaces model.ffn_sparsify for one forward: counts inactive neurons per layer, collects the
    ambiguous ones (layer, token, neuron, |act|/thr - 1), and can invert chosen neurons' decisions."""

    def __init__(self, model, thr, flip=()):
        self.model, self.thr, self.flip = model, thr, set(flip)
        self.orig = type(model).ffn_sparsify
        n_layer = len(thr)
        self.inactive = [0] * n_layer
        self.total = [0] * n_layer
        self.ambiguous = []

    def __call__(self, layer, a):
        t = self.thr[layer]
        absa = a.abs()
        self.total[layer] += a.numel()
        out = self.orig(self.model, layer, a)       # the reference's own rule
        if t > 0:
            self.inactive[layer] += int((absa <= t).sum())
            rel = absa / t - 1.0
            for tok, j in (rel.abs() <= AMBIG_REL).nonzero().tolist():
                self.ambiguous.append((layer, tok, j, float(rel[tok, j])))
        for (l, tok, j) in self.flip:
            if l == layer:
                out = out.clone()
                out[tok, j] = a[tok, j] if float(out[tok, j]) == 0.0 else 0.0
        return out


def ref_forward(model, ids, thr, flip=()):
    """-> (logits float64 numpy, Probe). thr None: the dense reference (no thresholds at all)."""
    if thr is None:
        model.ffn_thresholds = None
        return model.forward(ids).numpy(), None
    model.ffn_thresholds = list(thr)
    probe = Probe(model, thr, flip)
    model.ffn_sparsify = probe
    try:
        logits = model.forward(ids).numpy()
    finally:
        del model.ffn_sparsify
        model.ffn_thresholds = None
    return logits, probe


class RefLevel:
    """The reference at one sparsity level: logits, realized sparsity, and its ambiguous neurons
    (nearest to their threshold first), with the reference re-run with some of their decisions
    inverted on demand (`explain`)."""

    def __init__(self, model, ids, thr):
        self.model, self.ids, self.thr = model, ids, thr
        self.logits, p = ref_forward(model, ids, thr)
        self.mx = float(np.max(np.abs(self.logits)))
        self.inactive, self.total = p.inactive, p.total
        self.ambiguous = sorted(p.ambiguous, key=lambda a: abs(a[3]))
        self._flipped = {(): self.logits}

    def frac(self, layer=None):
        if layer is None:
            return sum(self.inactive) / max(1, sum(self.total))
        return self.inactive[layer] / max(1, self.total[layer])

    def flipped(self, idx):
        """Logits with the decisions of ambiguous neurons idx (indices into self.ambiguous) inverted."""
        if idx not in self._flipped:
            flip = [self.ambiguous[i][:3] for i in idx]
            self._flipped[idx] = ref_forward(self.model, self.ids, self.thr, flip)[0]
        return self._flipped[idx]

    def explain(self, eng, bound):
        """-> (max|eng - ref'|, idx) for the reference ref' with the fewest inverted ambiguous decisions
        (none; one; two of the EXPLAIN_PAIRS nearest) that is within bound, else the plain one's."""
        base = float(np.max(np.abs(eng - self.logits)))
        if base <= bound or not self.ambiguous:
            return base, ()
        cands = [(i,) for i in range(len(self.ambiguous))]
        k = min(EXPLAIN_PAIRS, len(self.ambiguous))
        cands += [(i, j) for i in range(k) for j in range(i + 1, k)]
        for idx in cands:
            d = float(np.max(np.abs(eng - self.flipped(idx))))
            if d <= bound:
                return d, idx
        return base, ()


def calib_windows(tokens, bos, C):
    """calibrate-sparsity's windows: the text's tokens (no BOS) cut into pieces of C-1, each after BOS."""
    out = []
    for off in range(0, len(tokens), C - 1):
        out.append([bos] + tokens[off:off + C - 1])
    return out


@torch.no_grad()
def calib_fractions(model, windows, table, levels):
    """Fraction of |act(gate)| <= thr per (level, layer) over the windows, in the dense reference."""
    n_layer = table["n_layer"]
    acts = [[] for _ in range(n_layer)]

    def grab(layer, a):
        acts[layer].append(a.abs().reshape(-1))
        return a

    model.ffn_thresholds = [0.0] * n_layer
    model.ffn_sparsify = grab
    try:
        for w in windows:
            model.forward(w)
    finally:
        del model.ffn_sparsify
        model.ffn_thresholds = None
    acts = [torch.cat(a) for a in acts]
    out = {}
    for s in levels:
        thr = level_thresholds(table, s)
        out[s] = [float((acts[l] <= thr[l]).double().mean()) for l in range(n_layer)]
    return out, int(acts[0].numel())


# ----------------------------------------------------------------------------- gemma3 test model

def write_gemma3(path, tok_src, seed=5):
    """A random-weight Gemma-3-shaped f32 GGUF with the tokenizer of tok_src."""
    E, F, L, H, HKV, HD, V = 64, 192, 6, 4, 2, 16, 512
    kvs = [(b"general.architecture", T_STRING, b"gemma3"), (b"general.name", T_STRING, b"ffn-sparsity-test")]
    kvs += [(k, vt, v) for k, vt, v in read_typed_metadata(tok_src)[0] if k.startswith(b"tokenizer.")]
    for k, v in (("context_length", 128), ("embedding_length", E), ("feed_forward_length", F),
                 ("block_count", L), ("attention.head_count", H), ("attention.head_count_kv", HKV),
                 ("attention.key_length", HD), ("attention.value_length", HD),
                 ("attention.sliding_window", 16)):
        kvs.append((("gemma3." + k).encode(), T_UINT32, v))
    kvs.append((b"gemma3.attention.layer_norm_rms_epsilon", T_FLOAT32, 1e-6))
    kvs.append((b"gemma3.rope.freq_base", T_FLOAT32, 1e6))
    g = np.random.default_rng(seed)
    tensors = []

    def add(name, shape, std, mean=0.0):
        a = (mean + std * g.standard_normal(shape)).astype("<f4")
        tensors.append((name, list(reversed(shape)), 0, a.tobytes()))

    add("token_embd.weight", (V, E), 0.125)
    add("output_norm.weight", (E,), 0.1, 1.0)
    for i in range(L):
        p = "blk.%d." % i
        add(p + "attn_norm.weight", (E,), 0.1, 1.0)
        add(p + "attn_q.weight", (H * HD, E), E ** -0.5)
        add(p + "attn_k.weight", (HKV * HD, E), E ** -0.5)
        add(p + "attn_v.weight", (HKV * HD, E), E ** -0.5)
        add(p + "attn_q_norm.weight", (HD,), 0.1, 1.0)
        add(p + "attn_k_norm.weight", (HD,), 0.1, 1.0)
        add(p + "attn_output.weight", (E, H * HD), (H * HD) ** -0.5)
        add(p + "post_attention_norm.weight", (E,), 0.1, 1.0)
        add(p + "ffn_norm.weight", (E,), 0.1, 1.0)
        add(p + "ffn_gate.weight", (F, E), E ** -0.5)
        add(p + "ffn_up.weight", (F, E), E ** -0.5)
        add(p + "ffn_down.weight", (E, F), F ** -0.5)
        add(p + "post_ffw_norm.weight", (E,), 0.1, 1.0)
    write_gguf(path, kvs, tensors)


# ----------------------------------------------------------------------------- one model

def compare(case, eng, ref, note=""):
    """Engine logits against the reference, allowing inverted decisions of ambiguous neurons only."""
    bound = TOL * ref.mx
    plain = float(np.max(np.abs(eng - ref.logits)))
    diff, idx = ref.explain(eng, bound)
    ok = bool(np.all(np.isfinite(eng))) and diff <= bound
    msg = "max|diff| %.2e  max|logit| %.2f  ratio %.2e <= %.0e%s" % (plain, ref.mx, plain / ref.mx, TOL, note)
    if idx:
        msg += ("\n  %-36s   ratio %.2e after inverting %d ambiguous decision(s): %s"
                % ("", diff / ref.mx, len(idx), "; ".join("layer %d token %d neuron %d |act|/thr-1 %+.1e"
                                                          % ref.ambiguous[i] for i in idx)))
        FLIPS.append((case, [ref.ambiguous[i][3] for i in idx]))
    if not ok:
        worst = np.unravel_index(np.argmax(np.abs(eng - ref.logits)), eng.shape)
        msg += "  worst at position %d token %d" % worst
    check(ok, case, msg)
    return ok, diff / ref.mx, TOL


def run_model(name, path, model, table, thr_file, ids, calib, tmp, extra=(), mismatch=False, chunk1=True):
    log("== %s (%s, activation %s, %d layers x %d neurons)" % (name, os.path.basename(path), table["activation"],
                                                              table["n_layer"], table["n_ff"]))
    n_vocab = model.cfg["n_vocab"]
    if calib is not None:
        windows, bos = calib
        fr, n_samples = calib_fractions(model, windows, table, [0.25, 0.5, INTERP])
        for s, per_layer in fr.items():
            worst = max(abs(f - s) for f in per_layer)
            if s == INTERP:   # interpolated thresholds are not quantiles: between the neighbours' fractions
                ok, tol = all(INTERP_LO < f < INTERP_HI for f in per_layer), "in (%g, %g)" % (INTERP_LO, INTERP_HI)
            else:
                ok, tol = worst <= CALIB_TOL, "<= %.0e" % CALIB_TOL
            check(ok, "%s calib s=%g" % (name, s),
                  "fraction |act| <= thr on the %d calibration windows (%d samples/layer): %s  max|frac - s| %.1e %s"
                  % (len(windows), n_samples, " ".join("%.4f" % f for f in per_layer), worst, tol))

    refs = {}
    for s in LEVELS + [INTERP]:
        refs[s] = RefLevel(model, ids, level_thresholds(table, s))
    dense_ref = RefLevel.__new__(RefLevel)
    dense_ref.logits, _ = ref_forward(model, ids, None)
    dense_ref.mx = float(np.max(np.abs(dense_ref.logits)))
    d0 = float(np.max(np.abs(refs[0.0].logits - dense_ref.logits)))
    check(d0 == 0.0, "%s reference s=0" % name, "thresholds 0 == dense reference exactly (max|diff| %.1e)" % d0)

    for s in LEVELS + [INTERP]:
        r = refs[s]
        amb = r.ambiguous
        note = ""
        if s > 0:
            if len(amb) > MAX_AMBIG:
                check(False, "%s s=%g ambiguous" % (name, s),
                      "%d neurons within %.0e of the threshold (> %d)" % (len(amb), AMBIG_REL, MAX_AMBIG))
            note = "; %d ambiguous" % len(amb)
            if amb:
                note += " (|act|/thr-1: %s)" % ", ".join("%+.1e" % a[3] for a in amb[:6])
            per = " ".join("%.3f" % r.frac(l) for l in range(len(r.total)))
            check(abs(r.frac() - s) < SPARSITY_SLACK, "%s s=%g sparsity" % (name, s),
                  "realized inactive fraction %.3f (per layer %s), |frac - s| < %.2f"
                  % (r.frac(), per, SPARSITY_SLACK))
        target = r
        if mismatch and s in (0.25, 0.5):
            target = refs[0.75 - s]
            log("  (--mismatch: engine s=%g compared with the reference at s=%g; expected to FAIL)" % (s, 0.75 - s))
        chunks = (None, 1) if chunk1 else (None,)
        for chunk in chunks:
            label = "%s s=%g %s" % (name, s, "all-at-once" if chunk is None else "--chunk 1")
            try:
                eng = engine_logits(path, ids, n_vocab, tmp, s, thr_file, chunk, extra)
            except RuntimeError as e:
                check(False, label, str(e))
                continue
            ok, ratio, bound = compare(label, eng, target, note if chunk is None else "")
            if s in (0.25, 0.5) and chunk is None and not mismatch:
                for other, oname in ((refs[0.75 - s], "reference s=%g" % (0.75 - s)), (dense_ref, "dense reference")):
                    cr = float(np.max(np.abs(eng - other.logits))) / r.mx
                    check(cr >= CONTROL_FACTOR * bound, "%s s=%g control" % (name, s),
                          "engine vs %s: ratio %.2e >= %d x bound %.2e (%.0fx)"
                          % (oname, cr, CONTROL_FACTOR, bound, cr / bound))
                # fine scale: every threshold 1% higher (a few % of the neurons near it change side)
                thr_hi = [float(np.float32(t * (1 + THR_NUDGE))) for t in r.thr]
                nudged = RefLevel(model, ids, thr_hi)
                d, idx = nudged.explain(eng, TOL * nudged.mx)
                cr = d / nudged.mx
                check(cr >= CONTROL_FACTOR * bound and not idx, "%s s=%g control" % (name, s),
                      "engine vs reference with thresholds x%g: ratio %.2e >= %d x bound %.2e (%.0fx), "
                      "not explained by inverting <= 2 of its %d ambiguous decisions"
                      % (1 + THR_NUDGE, cr, CONTROL_FACTOR, bound, cr / bound, len(nudged.ambiguous)))


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mismatch", action="store_true",
                    help="compare the engine at 0.25 / 0.5 with the reference at 0.5 / 0.25: must FAIL")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    t0 = time.time()
    shared = shared_dir()
    sdir = os.path.join(shared, "models", "stories260K")
    gguf = os.path.join(sdir, "stories260K-f32.gguf")
    llama2c = os.path.join(sdir, "stories260K.bin")
    tok512 = os.path.join(sdir, "tok512.bin")
    text_path = os.path.join(shared, "text", "tinystories-samples.txt")
    if not all(os.path.exists(p) for p in (gguf, llama2c, tok512, text_path)):
        log("SKIP: shared data (models/stories260K, text/tinystories-samples.txt) not found via LARDER_SHARED or %s"
            % shared)
        return 77
    log("engine: %s (-t %d, f32 KV cache)" % (BIN, THREADS))
    tmp = tempfile.mkdtemp(prefix="larder-ffnsparse-")
    try:
        with open(text_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        calib_text = "\n".join(lines[:6]) + "\n"
        test_text = "\n".join(lines[6:9])
        cal_path = os.path.join(tmp, "calib.txt")
        with open(cal_path, "w", encoding="utf-8") as f:
            f.write(calib_text)

        # ---- stories260K (SiLU)
        cal_tok, test_tok = tokenize(gguf, [calib_text, test_text], tmp)
        bos = cal_tok[0]
        ids = test_tok[:N_IDS]
        if len(ids) != N_IDS or ids[0] != bos or test_tok[0] != bos:
            raise RuntimeError("unexpected tokenization: %d ids, first %r" % (len(test_tok), test_tok[:3]))
        thr_file = os.path.join(tmp, "stories.sparsity.json")
        run_ok(["calibrate-sparsity", gguf, cal_path, "-o", thr_file, "-c", CALIB_CTX, "-t", THREADS])
        with open(thr_file) as f:
            table = json.load(f)
        cal_tokens = cal_tok[1:]
        check(table["activation"] == "silu" and table["tokens"] == len(cal_tokens),
              "stories260K calibration file", "activation %s, %d tokens (text has %d)"
              % (table["activation"], table["tokens"], len(cal_tokens)))
        log("  input: %d ids (BOS + Timmy story); calibration: %d tokens of lines 1-6, windows of %d"
            % (len(ids), len(cal_tokens), CALIB_CTX))
        cfg, w = load_gguf_model(gguf)
        model = LlamaRef(cfg, w)
        run_model("stories260K", gguf, model, table, thr_file, ids,
                  (calib_windows(cal_tokens, bos, CALIB_CTX), bos), tmp, mismatch=args.mismatch)
        # the llama2.c checkpoint (same weights, same fingerprint) through the same thresholds file
        cb, wb = load_llama2c_model(llama2c)
        ref = RefLevel(LlamaRef(cb, wb), ids, level_thresholds(table, 0.25))
        try:
            eng = engine_logits(llama2c, ids, cb["n_vocab"], tmp, 0.25, thr_file, extra=["--tokenizer", tok512])
            compare("stories260K.bin s=0.25 all-at-once", eng, ref, "; %d ambiguous" % len(ref.ambiguous))
        except RuntimeError as e:
            check(False, "stories260K.bin s=0.25", str(e))

        # ---- random Gemma 3 (GELU-tanh)
        gpath = os.path.join(tmp, "gemma3-rand.gguf")
        write_gemma3(gpath, gguf)
        gthr = os.path.join(tmp, "gemma3.sparsity.json")
        run_ok(["calibrate-sparsity", gpath, cal_path, "-o", gthr, "-c", CALIB_CTX, "-t", THREADS])
        with open(gthr) as f:
            gtable = json.load(f)
        gcal, gtest = tokenize(gpath, [calib_text, test_text], tmp)
        check(gtable["activation"] == "gelu_tanh" and gtable["tokens"] == len(gcal) - 1 and gtest[:N_IDS] == ids,
              "gemma3-rand calibration file", "activation %s, %d tokens (text has %d), same input ids: %s"
              % (gtable["activation"], gtable["tokens"], len(gcal) - 1, gtest[:N_IDS] == ids))
        gcfg, gw, _ = load_gemma3(gpath)
        gmodel = Gemma3Ref(gcfg, gw)
        run_model("gemma3-rand", gpath, gmodel, gtable, gthr, ids,
                  (calib_windows(gcal[1:], gcal[0], CALIB_CTX), gcal[0]), tmp, mismatch=args.mismatch)
    finally:
        if args.keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log("")
    for case, rels in FLIPS:
        log("explained by inverting near-threshold decisions: %s (|act|/thr-1 %s)"
            % (case, ", ".join("%+.1e" % r for r in rels)))
    log("total %.1fs" % (time.time() - t0))
    if FAILS:
        log("FAILED (%d):" % len(FAILS))
        for f in FAILS:
            log("  " + f)
        return 1
    log("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
