#!/usr/bin/python3
"""Compares the Larder engine against an independent float64 PyTorch reference (tests/reference/).

Run by ctest as `/usr/bin/python3 tests/reference_model_test.py` with LARDER_BIN set to the larder
binary. Shared data comes from LARDER_SHARED or ../shared (relative to the repository root).

Cases
  self-checks  the reference against itself (always run, no engine): q4_0/q8_0/bf16 block decoding,
               Meta-vs-NeoX RoPE equivalence under the converter's Q/K permutation, GQA vs expanded
               MHA, KV-cache chunking; with shared data, the stories260K greedy text and GGUF vs
               llama2.c .bin agreement.
  stories260K  (shared data) the real trained model, GGUF f32 and llama2.c .bin, through the engine.
  random       models written by `larder synth --shape custom`: llama GQA untied, llama tied +
               llama3 rope_freqs, qwen2 (QKV bias, NeoX rope) GQA; each in f32, f16, bf16, q8_0,
               q4_0; plus the real stories15M shape (`synth --shape stories15M`, 32000 vocab) in
               f32 and q8_0. The reference runs on the file's DEQUANTIZED weights (read by our own
               reader); each synthesized file is checked to contain what the case claims (arch,
               GQA, tied, QKV bias, rope_freqs, tensor types).

Checks per engine case
  logits   `larder logits` for every position, all at once and with --chunk 7 (and --chunk 1 for
           f32): max|engine - ref| <= TOL[dtype] * max|ref logit|.
  greedy   `larder logits --greedy N` (N = 200, capped by the file's context length). stories260K:
           must be identical to the reference's own greedy tokens. Random models: margin-based
           TEACHER FORCING -- the reference is run on the prompt + the engine's generated tokens,
           and at every step the engine's token must be the reference argmax, except where the
           reference's top-1 minus the engine token's logit is <= 2 * TOL * max|logit| (a near tie
           within the stated tolerance; counted and printed). Because the reference is always fed
           the engine's prefix, one near tie does not end the comparison.

Exit status: 0 all passed, 1 any failure, 77 (skip) when the random cases passed but the shared
data is missing (the stories260K cases could not run).
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

from gguf_reader import GGUFFile, dequantize  # noqa: E402
from llama_ref import (LlamaRef, decode_gguf_tokens, decode_llama2c,  # noqa: E402
                       load_gguf_model, load_llama2c_model, load_llama2c_vocab)

# Relative tolerance on logits: max|engine - ref| <= TOL * max|ref logit|.
# f32/f16/bf16 weights: the engine is expected to compute in f32 on exactly these weights.
# q8_0/q4_0: the engine may quantize activations to 8 bits for the dot products, so looser.
TOL = {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-4, "q8_0": 2e-2, "q4_0": 2e-2}

PROMPT = [1, 403, 407, 261, 378]          # BOS + "Once upon a time" (stories260K vocabulary)
N_GREEDY = 200
N_LOGIT_POS = 160                           # positions for random models (>= 128)
EXPECTED_TEXT = ", there was a little girl named Lily. She loved to play outside in the park."

RANDOM_SHAPES = [
    # name, synth args, seed
    ("llama-gqa", dict(arch="llama", n_embd=128, n_ff=320, n_layer=2, n_head=8, n_head_kv=2,
                       n_vocab=512, n_ctx=256, tied=0, llama3_rope=False), 11),
    ("llama-tied-rope3", dict(arch="llama", n_embd=128, n_ff=320, n_layer=3, n_head=4, n_head_kv=4,
                              n_vocab=512, n_ctx=256, tied=1, llama3_rope=True), 12),
    ("qwen2-gqa", dict(arch="qwen2", n_embd=128, n_ff=320, n_layer=2, n_head=8, n_head_kv=2,
                       n_vocab=512, n_ctx=256, tied=0, llama3_rope=False), 13),
]
DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
# KV cache types (-ctk/-ctv): every case above runs with the f32 cache (TOL is the engine's f32
# accuracy); these run f32-weight models with the other cache types against the same reference,
# with their own stated bounds (relative to max|logit|, as TOL): f16 rounds K/V to 11 significant
# bits, bf16 to 8, q8_0 to 8 bits per 32-value block.
KV_TOL = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}
# Real shapes (`synth --shape NAME`) small enough for a float64 reference: big vocabulary (32000),
# head_dim 48. Fewer positions to stay fast.
REAL_SHAPES = [("stories15M", ["f32", "q8_0"], 21)]
N_LOGIT_POS_REAL = 128


class Failures:
    def __init__(self):
        self.items = []

    def add(self, case, msg):
        self.items.append("%s: %s" % (case, msg))
        print("  FAIL %s: %s" % (case, msg), flush=True)


FAIL = Failures()


def log(msg=""):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- engine driver

class Engine:
    def __init__(self, binary, threads, cache="f32"):
        self.bin = binary
        self.threads = str(threads)
        self.cache = cache  # KV cache type (K and V): the reference comparisons run with f32

    def with_cache(self, cache):
        return Engine(self.bin, self.threads, cache)

    def _run(self, args, timeout=300):
        cmd = [self.bin] + [str(a) for a in args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError("timed out after %ds: %s" % (timeout, " ".join(cmd)))
        if r.returncode != 0:
            raise RuntimeError("exit %d: %s\n%s" % (r.returncode, " ".join(cmd), (r.stderr or "")[-2000:]))
        return r.stdout

    def synth(self, path, dtype, seed, shape):
        if isinstance(shape, str):
            self._run(["synth", "--shape", shape, "--dtype", dtype, "-o", path, "--seed", seed])
            return
        args = ["synth", "--shape", "custom", "--dtype", dtype, "-o", path, "--seed", seed,
                "--arch", shape["arch"], "--n-embd", shape["n_embd"], "--n-ff", shape["n_ff"],
                "--n-layer", shape["n_layer"], "--n-head", shape["n_head"],
                "--n-head-kv", shape["n_head_kv"], "--n-vocab", shape["n_vocab"],
                "--n-ctx", shape["n_ctx"], "--tied", shape["tied"]]
        if shape["llama3_rope"]:
            args.append("--llama3-rope")
        self._run(args)

    def logits(self, model, ids, n_vocab, out_path, chunk=None):
        args = ["logits", "-m", model, "--ids", ",".join(map(str, ids)), "-o", out_path, "-t", self.threads,
                "-ctk", self.cache, "-ctv", self.cache]
        if chunk:
            args += ["--chunk", chunk]
        self._run(args)
        a = np.fromfile(out_path, dtype="<f4")
        if a.size != len(ids) * n_vocab:
            raise RuntimeError("logits file has %d floats, expected %d x %d" % (a.size, len(ids), n_vocab))
        return a.reshape(len(ids), n_vocab).astype(np.float64)

    def greedy(self, model, ids, n):
        out = self._run(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "--greedy", n,
                         "-t", self.threads, "-ctk", self.cache, "-ctv", self.cache])
        cands = [out.strip()] + [l.strip() for l in reversed(out.strip().splitlines())]
        for text in cands:
            if not text.startswith("["):
                continue
            try:
                toks = json.loads(text)
            except ValueError:
                continue
            if len(toks) != n:
                raise RuntimeError("--greedy %d printed %d tokens" % (n, len(toks)))
            return [int(t) for t in toks]
        raise RuntimeError("--greedy printed no JSON array; stdout: %r" % out[-500:])


# ----------------------------------------------------------------------------- comparisons

def compare_logits(case, eng, ref, tol):
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(eng)):
        FAIL.add(case, "engine logits contain NaN/Inf")
        return
    diff = float(np.max(np.abs(eng - ref)))
    mx = float(np.max(np.abs(ref)))
    ratio = diff / mx
    worst = np.unravel_index(np.argmax(np.abs(eng - ref)), ref.shape)
    ok = ratio <= tol
    log("  %-44s pos=%-4d max|diff|=%.3e max|logit|=%.3e ratio=%.2e tol=%.0e  %s%s"
        % (case, ref.shape[0], diff, mx, ratio, tol, "PASS" if ok else "FAIL",
           "" if ok else " (worst at position %d, token %d)" % worst))
    if not ok:
        FAIL.add(case, "logits ratio %.3e > %.0e" % (ratio, tol))


def compare_greedy_teacher_forced(case, model, prompt, eng_toks, tol, ref_toks=None, strict=False):
    """Reference scored on prompt + engine tokens; see module docstring. Returns True if passed."""
    logits = model.forward(prompt + eng_toks).numpy()
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(eng_toks)]
    tol_abs = tol * float(np.max(np.abs(rows)))
    agree = near = bad = 0
    first_bad = None
    for k, (row, t) in enumerate(zip(rows, eng_toks)):
        top = int(np.argmax(row))
        if t == top:
            agree += 1
        elif row[top] - row[t] <= 2 * tol_abs:
            near += 1
        else:
            bad += 1
            if first_bad is None:
                first_bad = (k, t, top, row[top] - row[t])
    sorted_rows = np.sort(rows, axis=1)
    decisive = int(np.sum(sorted_rows[:, -1] - sorted_rows[:, -2] > 2 * tol_abs))
    identical = ref_toks is not None and ref_toks == eng_toks
    status = ("identical to reference greedy %d/%d" % (len(eng_toks), len(eng_toks)) if identical else
              "differs from reference free-run greedy" if ref_toks is not None else "")
    if ref_toks is not None and not identical:
        k0 = next(i for i, (a, b) in enumerate(zip(ref_toks, eng_toks)) if a != b)
        status += " (first at step %d)" % k0
    ok = bad == 0 and (identical or not strict)
    log("  %-44s teacher-forced: %d agree, %d near-tie (<= 2*%.0e*max|logit|), %d mismatch; "
        "%d/%d steps decisive; %s  %s"
        % (case, agree, near, tol, bad, decisive, len(eng_toks), status, "PASS" if ok else "FAIL"))
    if bad:
        k, t, top, gap = first_bad
        FAIL.add(case, "greedy step %d: engine chose %d, reference argmax %d is %.4g higher"
                 % (k, t, top, gap))
    elif strict and not identical:
        FAIL.add(case, "greedy not identical to the reference (strict for this model)")
    return ok


def run_engine_case(name, engine, model_path, ref_model, logit_ids, tol, tmp, strict_greedy=False,
                    ref_greedy=None, chunks=(None, 7)):
    n_vocab = ref_model.cfg["n_vocab"]
    n_ctx = ref_model.cfg["n_ctx"]
    t0 = time.time()
    ref_logits = ref_model.forward(logit_ids).numpy()
    for chunk in chunks:
        label = "%s logits %s" % (name, "all-at-once" if chunk is None else "--chunk %d" % chunk)
        try:
            eng = engine.logits(model_path, logit_ids, n_vocab, os.path.join(tmp, "logits.bin"), chunk)
        except RuntimeError as e:
            FAIL.add(label, str(e))
            continue
        compare_logits(label, eng, ref_logits, tol)
    n_greedy = min(N_GREEDY, n_ctx - len(PROMPT))
    label = "%s greedy %d" % (name, n_greedy)
    if n_greedy < N_GREEDY:
        label += " (capped: n_ctx %d)" % n_ctx
    try:
        eng_toks = engine.greedy(model_path, PROMPT, n_greedy)
    except RuntimeError as e:
        FAIL.add(label, str(e))
        return
    if ref_greedy is None:
        ref_greedy = ref_model.greedy(PROMPT, n_greedy)
    compare_greedy_teacher_forced(label, ref_model, PROMPT, eng_toks, tol, ref_greedy[:n_greedy],
                                  strict=strict_greedy)
    log("  %-44s (%.1fs)" % (name, time.time() - t0))


# ----------------------------------------------------------------------------- reference self-checks

def _random_weights(cfg, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    E, F, V = cfg["n_embd"], cfg["n_ff"], cfg["n_vocab"]
    qd, kvd = cfg["n_head"] * cfg["head_dim"], cfg["n_head_kv"] * cfg["head_dim"]

    def r(*s, std=0.3):
        return torch.randn(*s, generator=g, dtype=torch.float64) * std

    w = {"token_embd.weight": r(V, E, std=1.0), "output_norm.weight": 1 + r(E, std=0.1),
         "output.weight": r(V, E, std=0.2)}
    for i in range(cfg["n_layer"]):
        p = "blk.%d." % i
        w.update({p + "attn_norm.weight": 1 + r(E, std=0.1), p + "ffn_norm.weight": 1 + r(E, std=0.1),
                  p + "attn_q.weight": r(qd, E, std=E ** -0.5 * 2), p + "attn_k.weight": r(kvd, E, std=E ** -0.5 * 2),
                  p + "attn_v.weight": r(kvd, E, std=E ** -0.5), p + "attn_output.weight": r(E, qd, std=qd ** -0.5),
                  p + "ffn_gate.weight": r(F, E, std=E ** -0.5), p + "ffn_up.weight": r(F, E, std=E ** -0.5),
                  p + "ffn_down.weight": r(E, F, std=F ** -0.5)})
        if bias:
            w.update({p + "attn_q.bias": r(qd), p + "attn_k.bias": r(kvd), p + "attn_v.bias": r(kvd)})
    return w


def _meta_to_neox(w, n_heads, head_dim):
    """Inverse of the GGUF converter's permutation: Meta adjacent-pair rows -> NeoX half-split rows."""
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def reference_self_checks(shared):
    log("== reference self-checks")
    case = "self-check"

    # 1. block decoding against hand-built blocks
    d = np.array([0.5], dtype="<f2").view(np.uint8)
    qs = np.array([j | ((15 - j) << 4) for j in range(16)], dtype=np.uint8)
    got = dequantize(np.concatenate([d, qs]), 2, 32)
    want = np.array([(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)])
    q8 = np.concatenate([np.array([0.25], dtype="<f2").view(np.uint8), np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    bf = np.array([1.5, -2.0, 3.140625], dtype="<f4").view("<u4") >> 16
    ok = (np.array_equal(got, want) and np.array_equal(dequantize(q8, 8, 32), np.arange(-16, 16) * 0.25)
          and np.array_equal(dequantize(bf.astype("<u2").view(np.uint8), 30, 3), [1.5, -2.0, 3.140625]))
    log("  q4_0 / q8_0 / bf16 block decoding: %s" % ("PASS" if ok else "FAIL"))
    if not ok:
        FAIL.add(case, "block decoding")

    # 2. RoPE layouts: a Meta-layout model equals the same model with Q/K (and biases) permuted to
    #    NeoX layout and run with rotate_half. Partial rotary (n_rot < head_dim) and llama3
    #    rope_freqs included.
    for n_rot, freqs in ((16, False), (16, True), (8, False)):
        cfg = dict(arch="llama", n_embd=64, n_ff=96, n_layer=2, n_head=4, n_head_kv=2, head_dim=16,
                   eps=1e-5, rope_base=10000.0, n_ctx=64, n_rot=n_rot, rope_layout="adjacent",
                   n_vocab=50, has_bias=True)
        w = _random_weights(cfg, 1, bias=True)
        if freqs:
            w["rope_freqs.weight"] = torch.linspace(1.0, 8.0, n_rot // 2, dtype=torch.float64)
        ids = [int(x) for x in torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(2))]
        a = LlamaRef(cfg, w).forward(ids)
        if n_rot == cfg["head_dim"]:
            w2 = dict(w)
            for i in range(cfg["n_layer"]):
                for t, h in (("attn_q", cfg["n_head"]), ("attn_k", cfg["n_head_kv"])):
                    for s in ("weight", "bias"):
                        k = "blk.%d.%s.%s" % (i, t, s)
                        w2[k] = _meta_to_neox(w[k], h, cfg["head_dim"])
            b = LlamaRef(dict(cfg, rope_layout="neox"), w2).forward(ids)
            diff = float((a - b).abs().max())
            log("  rope adjacent == permuted neox (rope_freqs=%s): max|diff| %.1e  %s"
                % (freqs, diff, "PASS" if diff < 1e-9 else "FAIL"))
            if diff >= 1e-9:
                FAIL.add(case, "rope layouts disagree")
        # unrotated tail dims: the model must differ when n_rot changes (partial rotary is applied)
        if n_rot < cfg["head_dim"]:
            full = LlamaRef(dict(cfg, n_rot=cfg["head_dim"]), w).forward(ids)
            ok = float((a - full).abs().max()) > 1e-6
            log("  partial rotary n_rot=%d changes the output: %s" % (n_rot, "PASS" if ok else "FAIL"))
            if not ok:
                FAIL.add(case, "partial rotary has no effect")

    # 3. GQA equals MHA with K/V heads duplicated (query head h uses KV head h // group),
    #    and 4. chunked KV-cache forward equals the full forward.
    cfg = dict(arch="llama", n_embd=64, n_ff=96, n_layer=2, n_head=8, n_head_kv=2, head_dim=8,
               eps=1e-5, rope_base=10000.0, n_ctx=64, n_rot=8, rope_layout="neox", n_vocab=50,
               has_bias=False)
    w = _random_weights(cfg, 3)
    ids = [int(x) for x in torch.randint(0, 50, (45,), generator=torch.Generator().manual_seed(4))]
    m = LlamaRef(cfg, w)
    a = m.forward(ids)
    w2 = dict(w)
    for i in range(cfg["n_layer"]):
        for t in ("attn_k", "attn_v"):
            k = "blk.%d.%s.weight" % (i, t)
            w2[k] = w[k].view(2, 8, 64).repeat_interleave(4, dim=0).reshape(64, 64)
    b = LlamaRef(dict(cfg, n_head_kv=8), w2).forward(ids)
    diff = float((a - b).abs().max())
    log("  GQA == MHA with duplicated KV heads: max|diff| %.1e  %s" % (diff, "PASS" if diff < 1e-9 else "FAIL"))
    if diff >= 1e-9:
        FAIL.add(case, "GQA grouping")
    cache, parts, pos = {}, [], 0
    for s in range(0, len(ids), 7):
        parts.append(m.forward(ids[s:s + 7], pos, cache))
        pos += len(ids[s:s + 7])
    diff = float((torch.cat(parts) - a).abs().max())
    log("  KV-cache chunks of 7 == full forward: max|diff| %.1e  %s" % (diff, "PASS" if diff < 1e-9 else "FAIL"))
    if diff >= 1e-9:
        FAIL.add(case, "KV cache")

    if shared is None:
        return None
    # 5. the trained stories260K model: greedy text, and GGUF == llama2.c .bin
    sdir = os.path.join(shared, "models", "stories260K")
    gg_path = os.path.join(sdir, "stories260K-f32.gguf")
    bin_path = os.path.join(sdir, "stories260K.bin")
    cg, wg = load_gguf_model(gg_path)
    cb, wb = load_llama2c_model(bin_path)
    mg, mb = LlamaRef(cg, wg), LlamaRef(cb, wb)
    gb = mb.greedy(PROMPT, N_GREEDY)
    gg = mg.greedy(PROMPT, N_GREEDY)
    text_bin = decode_llama2c(load_llama2c_vocab(os.path.join(sdir, "tok512.bin")), gb, prev=PROMPT[-1])
    text_gguf = decode_gguf_tokens(GGUFFile(gg_path).get("tokenizer.ggml.tokens"), gg)
    ok = text_bin.startswith(EXPECTED_TEXT) and text_gguf.startswith(EXPECTED_TEXT)
    log("  stories260K reference greedy text: %r...  %s" % (text_bin[:90], "PASS" if ok else "FAIL"))
    if not ok:
        FAIL.add(case, "stories260K greedy text %r / %r" % (text_bin[:90], text_gguf[:90]))
    la, lb = mg.forward(PROMPT + gb), mb.forward(PROMPT + gb)
    diff, mx = float((la - lb).abs().max()), float(lb.abs().max())
    ok = gg == gb and diff <= 1e-6 * mx
    log("  stories260K GGUF vs .bin in the reference: greedy %s, logits max|diff| %.1e (max|logit| %.1f)  %s"
        % ("identical" if gg == gb else "DIFFER", diff, mx, "PASS" if ok else "FAIL"))
    if not ok:
        FAIL.add(case, "GGUF and llama2.c .bin disagree in the reference")
    return (mg, mb, gb, gg_path, bin_path)


# ----------------------------------------------------------------------------- main

def find_shared():
    cands = []
    if os.environ.get("LARDER_SHARED"):
        cands.append(os.environ["LARDER_SHARED"])
    cands.append(os.path.join(REPO, "..", "shared"))
    for c in cands:
        if os.path.isfile(os.path.join(c, "models", "stories260K", "stories260K-f32.gguf")) and \
                os.path.isfile(os.path.join(c, "models", "stories260K", "stories260K.bin")):
            return os.path.abspath(c)
    return None


def find_binary():
    if os.environ.get("LARDER_BIN"):
        return os.environ["LARDER_BIN"]
    for rel in ("build/larder", "build/src/cli/larder", "build/bin/larder"):
        p = os.path.join(REPO, rel)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-only", action="store_true", help="run only the reference self-checks")
    ap.add_argument("--quick", action="store_true", help="random models: f32 and q4_0 only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_start = time.time()

    shared = find_shared()
    if shared is None:
        log("NOTE: shared data (models/stories260K) not found via LARDER_SHARED or %s; "
            "stories260K cases will be skipped" % os.path.join(REPO, "..", "shared"))
    stories = reference_self_checks(shared)

    if args.reference_only:
        return finish(shared, t_start)

    binary = find_binary()
    if binary is None or not os.path.isfile(binary):
        FAIL.add("setup", "larder binary not found (set LARDER_BIN; tried %r and build/)" % binary)
        return finish(shared, t_start)
    threads = int(os.environ.get("LARDER_TEST_THREADS", "2"))
    engine = Engine(binary, threads)
    log("engine: %s  (-t %d)" % (binary, threads))
    tmp = tempfile.mkdtemp(prefix="larder_reftest_")
    try:
        if stories is not None:
            mg, mb, gb, gg_path, bin_path = stories
            log("== stories260K (trained model; greedy must be identical)")
            for name, model, path in (("stories260K-f32.gguf", mg, gg_path), ("stories260K.bin", mb, bin_path)):
                n_pos = max(128, min(len(PROMPT) + N_GREEDY, model.cfg["n_ctx"]))
                ids = (PROMPT + gb)[:n_pos]
                run_engine_case(name, engine, path, model, ids, TOL["f32"], tmp, strict_greedy=True,
                                ref_greedy=gb, chunks=(None, 7, 1))

        log("== random-weight models (larder synth --shape custom); greedy: margin-based teacher forcing")
        dtypes = ["f32", "q4_0"] if args.quick else DTYPES
        cases = [(n, s, seed, d, N_LOGIT_POS) for n, s, seed in RANDOM_SHAPES for d in dtypes]
        if not args.quick:
            cases += [(n, n, seed, d, N_LOGIT_POS_REAL) for n, ds, seed in REAL_SHAPES for d in ds]
        for shape_name, shape, seed, dtype, n_pos in cases:
            name = "%s-%s" % (shape_name, dtype)
            path = os.path.join(tmp, name + ".gguf")
            try:
                engine.synth(path, dtype, seed, shape)
            except RuntimeError as e:
                FAIL.add(name + " synth", str(e))
                continue
            try:
                cfg, w = load_gguf_model(path)
            except Exception as e:  # noqa: BLE001
                FAIL.add(name + " reference load", repr(e))
                continue
            if not check_synth_file(name, cfg, w, shape, dtype):
                continue
            model = LlamaRef(cfg, w)
            g = torch.Generator().manual_seed(seed)
            ids = [1] + [int(x) for x in torch.randint(0, cfg["n_vocab"], (n_pos - 1,), generator=g)]
            run_engine_case(name, engine, path, model, ids, TOL[dtype], tmp,
                            chunks=(None, 7, 1) if dtype == "f32" else (None, 7))
        log("== KV cache types (-ctk/-ctv) against the same reference (f32 weights)")
        kv_cases = [("llama-tied-rope3", 32), ("llama-gqa", 16)]  # (shape, head_dim)
        if stories is not None:
            kv_cases.insert(0, ("stories260K", 8))
        for shape_name, hd in kv_cases:
            if shape_name == "stories260K":
                model, path = stories[0], stories[3]
                ids = (PROMPT + stories[2])[:128]
            else:
                shape, seed = [(s, sd) for n, s, sd in RANDOM_SHAPES if n == shape_name][0]
                path = os.path.join(tmp, "kv-%s-f32.gguf" % shape_name)
                try:
                    engine.synth(path, "f32", seed, shape)
                    cfg, w = load_gguf_model(path)
                except (RuntimeError, Exception) as e:  # noqa: BLE001
                    FAIL.add("kv %s synth" % shape_name, repr(e))
                    continue
                model = LlamaRef(cfg, w)
                g = torch.Generator().manual_seed(seed)
                ids = [1] + [int(x) for x in torch.randint(0, cfg["n_vocab"], (N_LOGIT_POS - 1,), generator=g)]
            for kv in ("f16", "bf16", "q8_0"):
                name = "%s cache %s (head_dim %d)" % (shape_name, kv, hd)
                if kv == "q8_0" and hd % 32:
                    # llama.cpp refuses this too: one clear error, not a crash or a silent fallback.
                    try:
                        engine.with_cache(kv).logits(path, ids[:8], model.cfg["n_vocab"], os.path.join(tmp, "l.bin"))
                        FAIL.add(name, "a q8_0 cache with head_dim %d was accepted" % hd)
                    except RuntimeError as e:
                        ok = "multiple of 32" in str(e)
                        log("  %-44s refused: %s" % (name, "PASS" if ok else "FAIL (%s)" % str(e)[-200:]))
                        if not ok:
                            FAIL.add(name, "unexpected error: %s" % str(e)[-300:])
                    continue
                run_engine_case(name, engine.with_cache(kv), path, model, ids, KV_TOL[kv], tmp,
                                ref_greedy=stories[2] if shape_name == "stories260K" else None)
    finally:
        if args.keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(shared, t_start)


def check_synth_file(name, cfg, w, shape, dtype):
    """The synthesized file must be what the case claims to test."""
    problems = []
    if isinstance(shape, str):  # named real shape: only the dtype is checked
        shape = dict(arch=cfg["arch"], n_embd=cfg["n_embd"], n_ff=cfg["n_ff"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_head_kv=cfg["n_head_kv"], n_vocab=cfg["n_vocab"],
                     tied=int(cfg["tied"]), llama3_rope="rope_freqs.weight" in w)
    for k, want in (("arch", shape["arch"]), ("n_embd", shape["n_embd"]), ("n_ff", shape["n_ff"]),
                    ("n_layer", shape["n_layer"]), ("n_head", shape["n_head"]),
                    ("n_head_kv", shape["n_head_kv"]), ("n_vocab", shape["n_vocab"]),
                    ("tied", bool(shape["tied"]))):
        if cfg[k] != want:
            problems.append("%s=%r, expected %r" % (k, cfg[k], want))
    if (shape["arch"] == "qwen2") != cfg["has_bias"]:
        problems.append("QKV bias present=%s for arch %s" % (cfg["has_bias"], shape["arch"]))
    if shape["llama3_rope"] != ("rope_freqs.weight" in w):
        problems.append("rope_freqs.weight present=%s, expected %s" % ("rope_freqs.weight" in w, shape["llama3_rope"]))
    types = cfg["tensor_types"]
    if types.get("blk.0.attn_q.weight") != dtype:
        problems.append("blk.0.attn_q.weight is %s, expected %s" % (types.get("blk.0.attn_q.weight"), dtype))
    summary = {}
    for k, t in types.items():
        summary.setdefault(t, 0)
        summary[t] += 1
    extra = ""
    if "rope_freqs.weight" in w:
        rf = w["rope_freqs.weight"]
        extra = " rope_freqs in [%.3g, %.3g]" % (float(rf.min()), float(rf.max()))
        if float((rf - 1).abs().max()) == 0:
            log("  WARNING %s: rope_freqs.weight is all 1.0, so llama3 scaling is not exercised" % name)
    log("  %s: %s n_ctx=%d n_rot=%d base=%g tensor types %s%s"
        % (name, cfg["arch"], cfg["n_ctx"], cfg["n_rot"], cfg["rope_base"], summary, extra))
    for p in problems:
        FAIL.add(name + " synth file", p)
    return not problems


def finish(shared, t_start):
    log("")
    log("total %.1fs" % (time.time() - t_start))
    if FAIL.items:
        log("FAILED (%d):" % len(FAIL.items))
        for f in FAIL.items:
            log("  " + f)
        return 1
    if shared is None:
        log("SKIP: random-model cases passed, but the shared data needed for the stories260K cases is "
            "missing (set LARDER_SHARED to the shared/ directory)")
        return 77
    log("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
