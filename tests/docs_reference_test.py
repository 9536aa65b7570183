#!/usr/bin/python3
"""Compares `larder docs` (per-document KV reuse) against an independent float64 reference
(tests/reference/docs_ref.py on top of tests/reference/llama_ref.py).

Run by ctest as `python3 tests/docs_reference_test.py` with LARDER_BIN set; shared data (stories260K)
from LARDER_SHARED or ../shared, as tests/reference_model_test.py finds it.

Self-checks (reference only, no engine): APE's merged attention against a scalar transcription of
the formula; then on small random models of both RoPE layouts: the entry-addressed passes reproduce LlamaRef.forward; APE with T=S=1 equals plain attention over
  the same KV (and T,S != 1 changes it); one doc: reposition == parallel == sequential; repair with
  every doc token recomputed in every layer (blend R=1 F=0, or F = n_layer) == sequential; repair with
  nothing recomputed == reposition; link with k >= every doc length == sequential; re-rotation by
  position delta == rotation of the pre-RoPE key; the K deviation is 0 in layer 0 for every token and
  in layer 1 for the first doc (its stored KV already is its in-context KV), > 0 for the others.

Engine cases: random f32 models from `larder synth --shape custom` (the RANDOM_SHAPES of
reference_model_test.py: llama GQA untied, llama tied + llama3 rope_freqs, qwen2 NeoX + QKV bias) and
stories260K f32 when the shared data is there. Per case: a seeded prefix (BOS + 4-8 ids), 3 docs of
different lengths in 7..40 (none a multiple of 16, one longer than 16), a 4-6 token query; every mode
run with an f32 KV cache:
  sequential                also against LlamaRef.forward of the concatenation
  parallel T=S=1            against the reference's parallel with PLAIN attention
  ape T=S=0.9               (the `ape` alias) against the reference's APE
  reposition
  blend R=0.3 F=1 (and F=2 on models with >= 3 layers)
                            logits with the engine's `recomputed` (near ties in the ranking cannot fail
                            the logits); the selection must have round(R*N) entries and overlap the
                            reference's own ranking by >= 90%: by the K deviation of layer F-1 (the
                            contract) for F >= 2; for F = 1 by layer F, because layer 0's K depends on
                            token and position only, so its deviation is identically 0 (check_blend)
  link k=4                  `recomputed` must be exactly the first 4 tokens of docs 1 and 2, F = 0
  focus (defaults)          the engine's selection, generic repair semantics
Each dump's structure is checked (prefix_len, doc_lens, positions, ape, full_layers, recomputed a
sorted subset of the doc entries). Logits: for every query token,
max|engine - ref| <= TOL * max|ref| of that token's row (TOL 1e-4: f32 weights, f32 cache).

Exit status: 0 passed, 1 any failure (including `larder docs` missing or failing), 77 when everything
that ran passed but the shared data for the stories260K case is missing (as reference_model_test.py).
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))
sys.path.insert(0, HERE)

from llama_ref import LlamaRef, load_gguf_model  # noqa: E402
from docs_ref import DocsRef, Layout  # noqa: E402
from reference_model_test import (RANDOM_SHAPES, TOL, Engine, _random_weights,  # noqa: E402
                                  find_binary, find_shared)

BLEND_RATIO, BLEND_LAYERS, LINK_K, APE_TS = 0.3, 2, 4, 0.9
MIN_BLEND_OVERLAP = 0.9
SELF_EPS = 1e-9          # reference-vs-reference identities, relative to max|logit| (float64)

# Doc lengths per case: different, in 7..40, none a multiple of 16, one > 16 (a link/block boundary
# inside a doc), and 0.3*N not near x.5 so round(R*N) is unambiguous.
DOC_LENS = {"llama-gqa": (23, 9, 37), "llama-tied-rope3": (17, 31, 8),
            "qwen2-gqa": (13, 29, 7), "stories260K": (19, 11, 34)}


def log(msg=""):
    print(msg, flush=True)


class Results:
    """Failures plus one table row per (case, check) for the summary."""

    def __init__(self):
        self.fail = []
        self.rows = []

    def add_fail(self, case, msg):
        self.fail.append("%s: %s" % (case, msg))
        log("  FAIL %s: %s" % (case, msg))

    def row(self, case, mode, ratio, tol, note=""):
        ok = ratio is not None and ratio <= tol
        self.rows.append((case, mode, ratio, tol, ok, note))
        if not ok:
            self.add_fail("%s %s" % (case, mode), "max|diff|/max|ref| %s > %.0e %s"
                          % ("n/a" if ratio is None else "%.3e" % ratio, tol, note))
        return ok


R = Results()


def rel_err(eng, ref):
    """Worst over query tokens of max|eng - ref| / max|ref| (per token row)."""
    eng = np.asarray(eng, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if eng.shape != ref.shape:
        raise ValueError("shape %s, expected %s" % (eng.shape, ref.shape))
    if not np.all(np.isfinite(eng)):
        raise ValueError("NaN/Inf in logits")
    return float(np.max(np.max(np.abs(eng - ref), axis=1) / np.max(np.abs(ref), axis=1)))


def make_layout(seed, n_vocab, doc_lens):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return [int(x) for x in torch.randint(2, n_vocab, (n,), generator=g)]

    n_prefix = 5 + int(torch.randint(0, 5, (1,), generator=g))           # 5..9 incl. BOS
    n_query = 4 + int(torch.randint(0, 3, (1,), generator=g))            # 4..6
    return Layout([1] + ids(n_prefix - 1), [ids(n) for n in doc_lens], ids(n_query))


# ----------------------------------------------------------------------------- self-checks

def _self_identity(name, a, b, want_equal=True):
    a, b = a.numpy(), b.numpy()
    r = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    ok = r <= SELF_EPS if want_equal else r > 1e-6
    log("  %-62s rel %.1e  %s" % (name, r, "PASS" if ok else "FAIL"))
    if not ok:
        R.add_fail("self-check", "%s (rel %.2e)" % (name, r))


def ape_scalar(q, K, V, vis, doc, T, S, scale, group):
    """APE's merged attention written out with scalar loops (no tensors), to check DocsRef._attend."""
    n, H, hd = q.shape
    out = torch.zeros(n, H, hd, dtype=torch.float64)
    for r in range(n):
        for h in range(H):
            kv = h // group
            s = {e: float(q[r, h] @ K[e, kv]) * scale for e in range(K.shape[0]) if vis[r, e]}
            O = [e for e in s if not doc[e]]
            D = [e for e in s if doc[e]]
            lse_o = math.log(sum(math.exp(s[e]) for e in O))
            lse_d = math.log(sum(math.exp(s[e] / T) for e in D))
            out_o = sum(math.exp(s[e] - lse_o) * V[e, kv] for e in O)
            out_d = sum(math.exp(s[e] / T - lse_d) * V[e, kv] for e in D)
            w_o, w_d = math.exp(lse_o), math.exp(S * T * lse_d)
            out[r, h] = (w_o * out_o + w_d * out_d) / (w_o + w_d)
    return out.reshape(n, H * hd)


def reference_self_checks():
    log("== reference self-checks (no engine)")
    # APE's merge against a scalar transcription of the formula (T, S != 1, GQA, rows seeing a
    # mix of prefix, doc and query entries).
    cfg = dict(arch="llama", n_embd=32, n_ff=48, n_layer=1, n_head=4, n_head_kv=2, head_dim=8, eps=1e-5,
               rope_base=10000.0, n_ctx=64, n_rot=8, rope_layout="adjacent", n_vocab=20, has_bias=False)
    m = DocsRef(cfg, _random_weights(cfg, 6))
    g = torch.Generator().manual_seed(8)
    M, n = 12, 3
    q = torch.randn(n, 4, 8, generator=g, dtype=torch.float64)
    K = torch.randn(M, 2, 8, generator=g, dtype=torch.float64)
    V = torch.randn(M, 2, 8, generator=g, dtype=torch.float64)
    doc = torch.tensor([False] * 3 + [True] * 6 + [False] * 3)
    vis = torch.arange(M)[None, :] <= torch.tensor([9, 10, 11])[:, None]
    for T, S in ((1.0, 1.0), (0.9, 0.9), (0.7, 1.3)):
        got = m._attend(q, K, V, vis, (T, S, doc))
        want = ape_scalar(q, K, V, vis, doc, T, S, 1 / math.sqrt(8), 2)
        _self_identity("APE merge == scalar formula (T=%g S=%g)" % (T, S), got, want)
    for layout_name, bias in (("adjacent", False), ("neox", True)):
        cfg = dict(arch="llama" if layout_name == "adjacent" else "qwen2", n_embd=64, n_ff=96, n_layer=3,
                   n_head=4, n_head_kv=2, head_dim=16, eps=1e-5, rope_base=10000.0, n_ctx=256, n_rot=16,
                   rope_layout=layout_name, n_vocab=60, has_bias=bias)
        w = _random_weights(cfg, 5 if bias else 4, bias=bias)
        m = DocsRef(cfg, w)
        tag = "[%s%s]" % (layout_name, " +bias" if bias else "")
        lay = make_layout(7, cfg["n_vocab"], (11, 19, 8))
        seq = m.sequential(lay)
        _self_identity("%s passes == LlamaRef.forward" % tag,
                       seq, LlamaRef(cfg, w).forward(lay.ids)[lay.P + lay.N:])

        stored = m.encode_docs(lay)
        # equal up to float64 rounding (matmuls of different row counts may sum differently)
        same_prefix = all(torch.allclose(s.k[l][:lay.P], stored[0].k[l][:lay.P], rtol=0, atol=1e-12)
                          and torch.allclose(s.v[l][:lay.P], stored[0].v[l][:lay.P], rtol=0, atol=1e-12)
                          for s in stored for l in range(cfg["n_layer"]))
        log("  %-62s %s" % ("%s every doc encode has the same prefix KV" % tag, "PASS" if same_prefix else "FAIL"))
        if not same_prefix:
            R.add_fail("self-check", "prefix KV differs between doc encodes")
        plain = m.parallel(lay, plain=True, stored=stored)
        _self_identity("%s APE T=S=1 == plain attention" % tag, m.parallel(lay, 1.0, 1.0, stored=stored), plain)
        _self_identity("%s APE T=S=0.9 != plain attention" % tag,
                       m.parallel(lay, APE_TS, APE_TS, stored=stored), plain, want_equal=False)
        _self_identity("%s reposition: delta rotation == pre-RoPE rotation" % tag,
                       m.reposition(lay, via="delta", stored=stored), m.reposition(lay, stored=stored))
        _self_identity("%s reposition != sequential (3 docs: context matters)" % tag,
                       m.reposition(lay, stored=stored), seq, want_equal=False)
        _self_identity("%s blend R=1 F=0 == sequential" % tag,
                       m.repair(lay, 0, m.blend_selection(lay, torch.ones(lay.N), 1.0), stored), seq)
        _self_identity("%s repair F=n_layer == sequential" % tag,
                       m.repair(lay, cfg["n_layer"], [], stored), seq)
        _self_identity("%s repair nothing (F=0, none) == reposition" % tag,
                       m.repair(lay, 0, [], stored), m.reposition(lay, stored=stored))
        _self_identity("%s link k >= every doc length == sequential" % tag,
                       m.repair(lay, 0, m.link_selection(lay, max(lay.lens)), stored), seq)
        # Deviations relative to the largest stored key norm of that layer.
        knorm = lambda l: float(stored[0].k[l].reshape(stored[0].k[l].shape[0], -1).norm(dim=-1).max())  # noqa: E731
        d_l0 = float(m.deviation(lay, 0, stored).max()) / knorm(0)
        ok = d_l0 < SELF_EPS
        log("  %-62s rel %.1e  %s" % ("%s layer-0 deviation is zero for every token" % tag, d_l0,
                                      "PASS" if ok else "FAIL"))
        if not ok:
            R.add_fail("self-check", "layer-0 deviation %.2e" % d_l0)
        dev = m.deviation(lay, 1, stored) / knorm(1)
        d0, rest = float(dev[:lay.lens[0]].max()), float(dev[lay.lens[0]:].min())
        ok = d0 < SELF_EPS and rest > 1e-6
        log("  %-62s rel %.1e / %.1e  %s" % ("%s layer-1 deviation: 0 in doc 0, > 0 in docs 1, 2" % tag, d0, rest,
                                             "PASS" if ok else "FAIL"))
        if not ok:
            R.add_fail("self-check", "layer-1 deviations (doc 0 max %.2e, others min %.2e)" % (d0, rest))

        one = Layout(lay.prefix, [lay.docs[1]], lay.query)
        seq1 = m.sequential(one)
        _self_identity("%s one doc: reposition == sequential" % tag, m.reposition(one), seq1)
        _self_identity("%s one doc: parallel (APE T=S=1) == sequential" % tag, m.parallel(one), seq1)


# ----------------------------------------------------------------------------- engine

def run_docs(engine, model, layout, mode, tmp, extra=()):
    inp = os.path.join(tmp, "docs_in.json")
    out = os.path.join(tmp, "docs_out.json")
    with open(inp, "w") as fh:
        json.dump({"prefix": layout.prefix, "docs": layout.docs, "query": layout.query}, fh)
    if os.path.exists(out):
        os.remove(out)
    engine._run(["docs", "-m", model, "-t", engine.threads, "--cache-type-k", "f32", "--cache-type-v", "f32",
                 "--tokens-json", inp, "--mode", mode] + list(extra) + ["--dump", out])
    with open(out) as fh:
        return json.load(fh)


def check_dump(case, d, layout, mode, n_vocab, n_layer):
    """Structure of one dump against the contract. Returns a list of problems (empty = fine)."""
    p = []
    parallel = mode in ("parallel", "ape")
    if d.get("mode") not in ((mode, "parallel", "ape") if parallel else (mode,)):
        p.append("mode %r, asked %r" % (d.get("mode"), mode))
    frac = d.get("recompute_fraction")
    if not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        p.append("recompute_fraction %r not in [0, 1]" % frac)
    if d.get("prefix_len") != layout.P:
        p.append("prefix_len %r, expected %d" % (d.get("prefix_len"), layout.P))
    if d.get("doc_lens") != layout.lens:
        p.append("doc_lens %r, expected %r" % (d.get("doc_lens"), layout.lens))
    want_pos = layout.positions(parallel)
    if d.get("positions") != want_pos:
        got = d.get("positions") or []
        k = next((i for i, (a, b) in enumerate(zip(got, want_pos)) if a != b), min(len(got), len(want_pos)))
        p.append("positions differ from entry %d (len %d vs %d)" % (k, len(got), len(want_pos)))
    if parallel:
        if not isinstance(d.get("ape"), dict):
            p.append("ape is %r, expected {t, s}" % d.get("ape"))
    elif d.get("ape") is not None:
        p.append("ape is %r, expected null" % d.get("ape"))
    rec = d.get("recomputed")
    if not isinstance(rec, list) or rec != sorted(set(rec)):
        p.append("recomputed not a sorted list of distinct entries")
    elif not set(rec) <= set(layout.all_doc_entries()):
        p.append("recomputed has entries outside the docs: %s" % sorted(set(rec) - set(layout.all_doc_entries()))[:8])
    F = d.get("full_layers")
    if not isinstance(F, int) or not 0 <= F <= n_layer:
        p.append("full_layers %r outside [0, %d]" % (F, n_layer))
    lg = d.get("logits")
    if not isinstance(lg, list) or len(lg) != layout.Q or any(len(r) != n_vocab for r in lg):
        p.append("logits not [%d][%d]" % (layout.Q, n_vocab))
    for s in p:
        R.add_fail("%s %s dump" % (case, mode), s)
    return not p


def engine_case(case, engine, path, cfg, w, seed, tmp):
    log("== %s" % case)
    m = DocsRef(cfg, w)
    lay = make_layout(seed, cfg["n_vocab"], DOC_LENS[case])
    log("  prefix %d, docs %s (N=%d), query %d" % (lay.P, lay.lens, lay.N, lay.Q))
    stored = m.encode_docs(lay)
    n_vocab, n_layer = cfg["n_vocab"], cfg["n_layer"]
    tol = TOL["f32"]
    runs = [  # label, engine mode, extra args
        ("sequential", "sequential", []),
        ("parallel T=S=1", "parallel", ["--ape-t", "1", "--ape-s", "1"]),
        ("ape T=S=%g" % APE_TS, "ape", ["--ape-t", str(APE_TS), "--ape-s", str(APE_TS)]),
        ("reposition", "reposition", []),
        ("blend R=%g F=%d" % (BLEND_RATIO, BLEND_LAYERS), "blend",
         ["--blend-ratio", str(BLEND_RATIO), "--blend-layers", str(BLEND_LAYERS)]),
    ]
    runs += [
        ("link k=%d" % LINK_K, "link", ["--link-k", str(LINK_K)]),
        ("focus", "focus", []),
    ]
    for label, mode, extra in runs:
        try:
            d = run_docs(engine, path, lay, mode, tmp, extra)
        except (RuntimeError, ValueError) as e:
            R.add_fail("%s %s" % (case, label), "larder docs failed: %s" % str(e)[-1500:])
            R.row(case, label, None, tol, "(engine failed)")
            continue
        if not check_dump(case, d, lay, mode, n_vocab, n_layer):
            if not isinstance(d.get("logits"), list) or len(d["logits"]) != lay.Q:
                R.row(case, label, None, tol, "(bad dump)")
                continue
        eng = np.array(d["logits"], dtype=np.float64)
        F, rec = d.get("full_layers", 0), d.get("recomputed", [])
        note = ""
        try:
            if mode == "sequential":
                plain = LlamaRef(cfg, w).forward(lay.ids)[lay.P + lay.N:].numpy()
                R.row(case, "sequential vs plain forward", rel_err(eng, plain), tol)
                ref = m.sequential(lay)
            elif mode in ("parallel", "ape"):
                T, S = float(extra[1]), float(extra[3])
                ape = d.get("ape") or {}
                if abs(ape.get("t", -1) - T) > 1e-6 or abs(ape.get("s", -1) - S) > 1e-6:
                    R.add_fail("%s %s" % (case, label), "dump ape %r, asked t=%g s=%g" % (d.get("ape"), T, S))
                if T == 1 and S == 1:   # APE must reduce to plain attention: compare with plain
                    ref = m.parallel(lay, plain=True, stored=stored)
                    note = "(ref: plain attention)"
                else:
                    ref = m.parallel(lay, T, S, stored=stored)
            elif mode == "reposition":
                ref = m.reposition(lay, stored=stored)
                if F or rec:
                    R.add_fail("%s %s" % (case, label),
                               "reposition reports a repair: F=%r, %d recomputed" % (F, len(rec)))
            else:
                ref = m.repair(lay, F, rec, stored)
                note = "(F=%d, %d/%d recomputed, fraction %s)" % (F, len(rec), lay.N, d.get("recompute_fraction"))
                if mode == "blend":
                    check_blend(case, label, m, lay, F, rec, stored, int(extra[3]))
                elif mode == "link":
                    want = m.link_selection(lay, LINK_K)
                    if F != 0 or rec != want:
                        R.add_fail("%s %s" % (case, label), "F=%r recomputed %r, expected F=0 and %r" % (F, rec, want))
            R.row(case, label, rel_err(eng, ref.numpy()), tol, note)
        except ValueError as e:
            R.add_fail("%s %s" % (case, label), str(e))
            R.row(case, label, None, tol, "(%s)" % e)


def check_blend(case, label, m, lay, F, rec, stored, F_asked):
    """The engine's blend selection against the reference's. The contract ranks doc tokens by the K
    deviation of layer F-1 (the last full layer). That is degenerate for F = 1: layer 0's K depends on
    the token's embedding and position only, so every deviation is 0 and any selection is rounding
    noise; CacheBlend itself measures layer F (the first selective layer, its inputs from the F full
    layers). So: F >= 2 checks the contract's layer F-1; F = 1 checks layer F, the only meaningful one.
    Both overlaps are printed."""
    if F != F_asked:
        R.add_fail("%s %s" % (case, label), "full_layers %r, asked %d" % (F, F_asked))
        return
    if F >= m.cfg["n_layer"]:  # every layer recomputed for every token: nothing left to select
        if rec:
            R.add_fail("%s %s" % (case, label), "F >= n_layer but %d tokens selected" % len(rec))
        return
    want = m.blend_count(BLEND_RATIO, lay.N)
    if len(rec) != want:
        R.add_fail("%s %s" % (case, label), "recomputed %d tokens, expected round(%g*%d) = %d"
                   % (len(rec), BLEND_RATIO, lay.N, want))
    n_layer = m.cfg["n_layer"]
    by_layer = {}
    for layer in (F - 1, F):
        if 0 <= layer < n_layer:
            dev = m.deviation(lay, layer, stored)
            ours = m.blend_selection(lay, dev, BLEND_RATIO)
            sd = torch.sort(dev, descending=True).values
            overlap = len(set(ours) & set(rec)) / max(1, len(ours))
            by_layer[layer] = overlap
            log("  %s: by layer-%d deviation the reference selects %d, overlap with the engine's %d: %.0f%% "
                "(deviation at the cut %.4g | %.4g, max %.4g)"
                % (label, layer, len(ours), len(rec), 100 * overlap, float(sd[want - 1]),
                   float(sd[want]) if want < lay.N else 0.0, float(sd[0])))
    checked = F - 1 if F >= 2 else F
    if checked in by_layer and by_layer[checked] < MIN_BLEND_OVERLAP:
        why = "" if F >= 2 else " (F=1: layer 0's deviation is identically 0, so layer F is the meaningful one)"
        R.add_fail("%s %s" % (case, label), "selection overlap with the layer-%d deviation ranking %.0f%% < %.0f%%%s"
                   % (checked, 100 * by_layer[checked], 100 * MIN_BLEND_OVERLAP, why))


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-only", action="store_true", help="only the reference self-checks")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    shared = find_shared()
    reference_self_checks()
    if args.reference_only:
        return finish(shared, t0, engine_ran=False)

    binary = find_binary()
    if binary is None or not os.path.isfile(binary):
        R.add_fail("setup", "larder binary not found (set LARDER_BIN)")
        return finish(shared, t0)
    engine = Engine(binary, int(os.environ.get("LARDER_TEST_THREADS", "2")))
    log("engine: %s" % binary)
    tmp = tempfile.mkdtemp(prefix="larder_docstest_")
    try:
        for name, shape, seed in RANDOM_SHAPES:
            path = os.path.join(tmp, name + "-f32.gguf")
            try:
                engine.synth(path, "f32", seed, shape)
                cfg, w = load_gguf_model(path)
            except Exception as e:  # noqa: BLE001
                R.add_fail(name + " synth", repr(e))
                continue
            engine_case(name, engine, path, cfg, w, seed, tmp)
        if shared is not None:
            path = os.path.join(shared, "models", "stories260K", "stories260K-f32.gguf")
            cfg, w = load_gguf_model(path)
            engine_case("stories260K", engine, path, cfg, w, 31, tmp)
        else:
            log("NOTE: shared data (models/stories260K) not found; stories260K case skipped")
    finally:
        if args.keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(shared, t0)


def finish(shared, t0, engine_ran=True):
    if R.rows:
        log("")
        log("%-18s %-30s %-10s %-6s %s" % ("case", "mode", "rel err", "tol", ""))
        for case, mode, ratio, tol, ok, note in R.rows:
            log("%-18s %-30s %-10s %-6.0e %s %s" % (case, mode, "n/a" if ratio is None else "%.2e" % ratio,
                                                   tol, "PASS" if ok else "FAIL", note))
    log("")
    log("total %.1fs" % (time.time() - t0))
    if R.fail:
        log("FAILED (%d):" % len(R.fail))
        for f in R.fail:
            log("  " + f)
        return 1
    if engine_ran and shared is None:
        log("SKIP: everything that ran passed, but the stories260K case needs the shared data (LARDER_SHARED)")
        return 77
    log("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
