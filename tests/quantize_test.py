#!/usr/bin/python3
"""`larder quantize` checked against an independent numpy reader (tests/reference/gguf_reader.py and
tests/reference/kquants.py, written from the published GGUF / GGML block formats).

For a synthesized 2-layer model quantized to every supported type:
  * every tensor decodes (numpy) to the f32 original within the stated relative RMS error of its type;
  * tensors get llama.cpp's types (output -> q6_K, Q4_K_M's attn_v/ffn_down -> q6_K on
    "use_more_bits" layers, Q4_K_S's attn_v -> q5_K, ...), 1-D tensors are copied byte for byte,
    all metadata is copied and general.file_type is llama.cpp's LLAMA_FTYPE number;
  * larder runs the quantized file and its logits stay within a stated distance of the f32 logits.
Also: clear one-line errors and no partial output for a missing input, a non-GGUF input, an unknown
type and a full disk; and (when shared data is present) the real stories260K model with its
172-wide FFN, which needs llama.cpp's fallback types, still tells its story.

Exit 77 only if nothing could run (never the case: the synthesized part needs no shared data)."""
import os
import resource
import signal
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))
import gguf_reader as gr  # noqa: E402
import kquants  # noqa: E402

kquants.install()

ROOT = os.environ.get("LARDER_SOURCE_DIR", os.path.join(HERE, ".."))
SHARED = os.environ.get("LARDER_SHARED", os.path.join(ROOT, "..", "shared"))
BIN = os.environ.get("LARDER_BIN", os.path.join(ROOT, "build", "bin", "larder"))
STORIES = os.path.join(SHARED, "models", "stories260K", "stories260K-f32.gguf")
STORY = "Once upon a time, there was a little girl named Lily. She loved to play"

# Stated relative RMS error bounds of each tensor type on Gaussian weights,
# sqrt(sum (w - deq(q(w)))^2 / sum w^2) (measured values are ~10% lower; see tests/quants_test.cpp).
WEIGHT_RMS = {"f32": 0.0, "f16": 0.001, "bf16": 0.005, "q8_0": 0.008, "q4_0": 0.10, "q4_1": 0.086,
              "q5_0": 0.047, "q5_1": 0.042, "q4_K": 0.079, "q5_K": 0.040, "q6_K": 0.0196}
# Stated bound on the logits: relative RMS distance from the f32 model's logits at most twice the
# weight bound of the file's main type (measured: about 1.0-1.3 times).
LOGIT_FACTOR = 2.0

# CLI type -> (main tensor type, LLAMA_FTYPE)
TYPES = {"f16": ("f16", 1), "bf16": ("bf16", 32), "q8_0": ("q8_0", 7), "q4_0": ("q4_0", 2),
         "q4_1": ("q4_1", 3), "q5_0": ("q5_0", 8), "q5_1": ("q5_1", 9), "q4_K": ("q4_K", 14),
         "q5_K": ("q5_K", 16), "q6_K": ("q6_K", 18), "Q4_K_M": ("q4_K", 15), "Q5_K_M": ("q5_K", 17),
         "f32": ("f32", 0)}
N_LAYER = 2

failures = []


def check(name, cond, detail=""):
    print(f"  {'PASS' if cond else 'FAIL'}  {name}" + (f"  [{detail}]" if detail and not cond else ""))
    if not cond:
        failures.append(name)


def run(args, timeout=300, preexec_fn=None):
    p = subprocess.run([BIN] + args, capture_output=True, timeout=timeout, preexec_fn=preexec_fn)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def expected_type(cli_type, name, shape):
    """llama.cpp's llama_tensor_get_type for a dense llama model whose rows all divide into blocks."""
    main = TYPES[cli_type][0]
    if len([d for d in shape if d > 1]) < 2 or name.endswith("_norm.weight"):
        return "f32"
    if main in ("f32", "f16", "bf16"):
        return main
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        return "q8_0" if main == "q8_0" else "q6_K"
    if "attn_v.weight" in name:
        if cli_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, N_LAYER):
            return "q6_K"
        if cli_type == "q4_K" and layer < 4:
            return "q5_K"
    if "ffn_down" in name:
        if cli_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, N_LAYER):
            return "q6_K"
        if cli_type == "q4_K" and layer < N_LAYER // 8:
            return "q5_K"
    return main


def rel_rms(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    s = (a * a).sum()
    return float(np.sqrt(((a - b) ** 2).sum() / s)) if s > 0 else float(np.sqrt(((a - b) ** 2).sum()))


def logits(model, out):
    rc, _, err = run(["logits", "-m", model, "--ids", "1,2,3,100,200", "-o", out])
    if rc != 0:
        return None, err
    return np.fromfile(out, dtype=np.float32).reshape(5, -1), ""


def check_synth(d):
    f32 = os.path.join(d, "f32.gguf")
    rc, _, err = run(["synth", "--shape", "custom", "--arch", "llama", "--n-embd", "256", "--n-ff", "512",
                      "--n-layer", str(N_LAYER), "--n-head", "4", "--n-head-kv", "2", "--n-vocab", "512",
                      "--n-ctx", "128", "-o", f32])
    check("synth f32 model", rc == 0, err[-300:])
    if rc != 0:
        return
    src = gr.GGUFFile(f32)
    ref_logits, err = logits(f32, os.path.join(d, "f32.bin"))
    check("f32 logits", ref_logits is not None, err[-300:])
    for cli_type, (main, ftype) in TYPES.items():
        out = os.path.join(d, "out-" + cli_type + ".gguf")
        rc, _, err = run(["quantize", f32, out, cli_type, "-t", "2"])
        check(f"{cli_type}: quantize exits 0", rc == 0, err[-400:])
        if rc != 0:
            continue
        check(f"{cli_type}: progress on stderr", "[  21/  21]" in err and "wrote" in err, err[-300:])
        q = gr.GGUFFile(out)
        check(f"{cli_type}: general.file_type = {ftype}", q.get("general.file_type") == ftype, q.get("general.file_type"))
        lost = [k for k in src.metadata if k not in q.metadata]
        changed = [k for k, v in src.metadata.items()
                   if k in q.metadata and k not in ("general.file_type",) and q.metadata[k] != v]
        check(f"{cli_type}: all metadata copied", not lost and not changed, f"lost {lost} changed {changed}")
        check(f"{cli_type}: same tensors", list(q.tensors) == list(src.tensors))
        wrong_type, too_far, not_copied = [], [], []
        for name, t in src.tensors.items():
            qt = q.tensors[name]
            want = expected_type(cli_type, name, t.shape)
            if qt.type_name != want:
                wrong_type.append(f"{name}: {qt.type_name} (want {want})")
                continue
            if want == "f32" and t.type_name == "f32":
                if not np.array_equal(src.raw(name), q.raw(name)):
                    not_copied.append(name)
                continue
            e = rel_rms(src.tensor(name), q.tensor(name))
            if e > WEIGHT_RMS[want]:
                too_far.append(f"{name} ({want}): {e:.4f} > {WEIGHT_RMS[want]}")
        check(f"{cli_type}: tensor types follow llama.cpp's recipe", not wrong_type, "; ".join(wrong_type[:4]))
        check(f"{cli_type}: 1-D tensors copied unchanged", not not_copied, ", ".join(not_copied[:4]))
        check(f"{cli_type}: every tensor decodes within its type's RMS bound", not too_far, "; ".join(too_far[:4]))
        if ref_logits is not None:
            lg, err = logits(out, os.path.join(d, cli_type + ".bin"))
            check(f"{cli_type}: larder runs the quantized file", lg is not None, err[-300:])
            if lg is not None:
                dist = rel_rms(ref_logits, lg)
                bound = max(LOGIT_FACTOR * WEIGHT_RMS[main], 1e-6)
                check(f"{cli_type}: logits within {bound:.4f} of f32 (got {dist:.4f})", dist <= bound)
    # Q4_K_M spelled out for this 2-layer model: layer 1 is a "use_more_bits" layer (last eighth).
    q = gr.GGUFFile(os.path.join(d, "out-Q4_K_M.gguf"))
    types = {n: t.type_name for n, t in q.tensors.items()}
    want = {"token_embd.weight": "q4_K", "output.weight": "q6_K", "output_norm.weight": "f32",
            "blk.0.attn_v.weight": "q4_K", "blk.0.ffn_down.weight": "q4_K", "blk.1.attn_v.weight": "q6_K",
            "blk.1.ffn_down.weight": "q6_K", "blk.0.attn_q.weight": "q4_K", "blk.1.ffn_gate.weight": "q4_K",
            "blk.1.attn_norm.weight": "f32"}
    bad = {k: types.get(k) for k, v in want.items() if types.get(k) != v}
    check("Q4_K_M: expected per-tensor types", not bad, str(bad))
    return f32


def check_errors(d, f32):
    out = os.path.join(d, "err.gguf")

    def no_output():
        return not os.path.exists(out) and not os.path.exists(out + ".tmp")

    def one_line_error(err):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        return len(lines) >= 1 and lines[-1].startswith("larder: error: ")

    rc, _, err = run(["quantize", os.path.join(d, "missing.gguf"), out, "q4_K"])
    check("missing input: error, no output", rc != 0 and one_line_error(err) and "missing.gguf" in err and no_output(), err)
    junk = os.path.join(d, "junk.gguf")
    with open(junk, "wb") as f:
        f.write(b"PK\x03\x04 definitely not a gguf file" * 10)
    rc, _, err = run(["quantize", junk, out, "q4_K"])
    check("non-GGUF input: error, no output", rc != 0 and one_line_error(err) and "GGUF" in err and no_output(), err)
    if f32:
        rc, _, err = run(["quantize", f32, out, "q3_K"])
        check("unknown type: error listing the valid types",
              rc != 0 and one_line_error(err) and "Q4_K_M" in err and no_output(), err)

        # Disk full: cap the output size (EFBIG from write, like ENOSPC) -> error, no partial file.
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

        rc, _, err = run(["quantize", f32, out, "q8_0"], preexec_fn=limit)
        check("full disk: error, no partial output", rc != 0 and one_line_error(err) and no_output(), err[-300:])


def check_stories(d):
    if not os.path.exists(STORIES):
        print(f"  SKIP  stories260K checks (shared data not found under {SHARED})")
        return
    src = gr.GGUFFile(STORIES)
    for cli_type in ("Q4_K_M", "q8_0", "q6_K"):
        out = os.path.join(d, "stories-" + cli_type + ".gguf")
        rc, _, err = run(["quantize", STORIES, out, cli_type])
        check(f"stories260K {cli_type}: quantize exits 0", rc == 0, err[-300:])
        if rc != 0:
            continue
        q = gr.GGUFFile(out)
        types = {n: t.type_name for n, t in q.tensors.items()}
        # 172-wide ffn_down rows fit no block size: f16; 64-wide rows: q4_K -> q5_0, q6_K -> q8_0.
        check(f"stories260K {cli_type}: ffn_down falls back to f16",
              all(types[f"blk.{i}.ffn_down.weight"] == "f16" for i in range(5)), str(types))
        small = {"Q4_K_M": "q5_0", "q8_0": "q8_0", "q6_K": "q8_0"}[cli_type]
        check(f"stories260K {cli_type}: 64-wide rows use {small}", types["blk.0.attn_q.weight"] == small, str(types))
        check(f"stories260K {cli_type}: fallbacks reported", "instead" in err, err[-300:])
        bad = []
        for name, t in src.tensors.items():
            tn = types[name]
            if tn != "f32" and rel_rms(src.tensor(name), q.tensor(name)) > WEIGHT_RMS[tn] * 1.5:
                bad.append(name)
        # (real weights are not Gaussian: allow 1.5x the Gaussian bounds)
        check(f"stories260K {cli_type}: tensors decode close to f32", not bad, ", ".join(bad[:4]))
        rc, text, err = run(["run", "-m", out, "-p", "Once upon a time", "-n", "24", "--temp", "0", "-t", "2"])
        check(f"stories260K {cli_type}: greedy text still tells the story", rc == 0 and text.startswith(STORY),
              text[:120] + err[-200:])


def main():
    if not os.path.exists(BIN):
        print(f"SKIP: larder binary not found at {BIN}")
        return 77
    with tempfile.TemporaryDirectory() as d:
        f32 = check_synth(d)
        check_errors(d, f32)
        check_stories(d)
    print(f"{len(failures)} failure(s)" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
