#!/usr/bin/python3
"""Real-model correctness: Larder vs independent float64 PyTorch references on SmolLM2-135M-Instruct
(Q4_1, llama architecture: tests/reference/llama_ref.py) and Gemma 3 270M (Q4_K_M, gemma3:
tests/reference/gemma3_ref.py).

Run by ctest as `/usr/bin/python3 tests/real_model_test.py` (label: model) with LARDER_BIN set. The
models come from `scripts/models --path smollm2|gemma3` (cached by `scripts/models`); a model that is
not cached is SKIPPED with a message naming it (exit 77 when nothing failed but something was
skipped). Texts: shared/text/tinystories-samples.txt and a slice of the Python library reference
(json.html, the first PYDOC_CHARS characters of scripts/python_doc_text.py's plain text; Debian
package python3-doc).

The references read the GGUF files with tests/reference/gguf_reader.py + kquants.py (our own
numpy dequantization) and share no code with the engine. Token ids: the ENGINE's tokenization
(`larder tokenize --json-batch`) is what both sides are fed, so that the model computations are
compared on identical inputs and `larder perplexity` (which tokenizes itself) is comparable; the
tokenizers are checked separately here against independent implementations (SmolLM2: the ids must
decode, through the GGUF byte-level vocabulary, back to the exact text; Gemma: the ids must equal
gemma3_ref.SpmTokenizer's, a SentencePiece-BPE written from the published algorithm).

Per model
  f32 copy  every 2-D tensor dequantized to f32 by tests/reference/gguf_convert.py (our own writer;
            metadata byte-identical), cached in $LARDER_REF_CACHE or ~/.cache/larder/ref, keyed by
            the sha256 of the quantized file. Its weights are exactly the reference's, so the
            engine on it should match the f64 reference to f32 rounding.
  (a) logits of the f32 copy over the first perplexity window of each text (tinystories 256
      positions; python-doc 512 positions, Gemma 640 so that positions past the 512-token sliding
      window are covered): max|diff| <= 1e-4 * max|ref logit|. Greedy: 128 tokens from each of
      GREEDY_PROMPTS (`larder logits --greedy 128`) identical to the reference's greedy run --
      checked in one batched reference forward over prompt + engine tokens: every engine token must
      be the reference argmax after the same prefix, which by induction is the reference's own
      free run (the minimum top-2 margin is printed).
  (b) the quantized file itself vs the same reference (its dequantized weights): logits within
      QUANT_TOL[model] * max|logit|; greedy teacher-forced: the reference is scored on prompt +
      the engine's 128 tokens and every engine token must be the reference argmax, except where
      the reference's top-1 minus the engine token's logit is <= QUANT_MARGIN * max|logit| (the
      bound on the error of a logit difference; such steps are counted as near ties and printed).
  (c) `larder perplexity -c C --json` on both files vs the reference's perplexity computed with the
      same convention (windows of C tokens, BOS in front of each window when the tokenizer adds
      BOS, second half scored: engine/perplexity.h), scored-token counts equal. f32 copy: vs the
      plain reference, relative difference <= PPL_TOL 1e-4. Quantized file: vs the reference with
      ACTIVATION ROUNDING (tests/reference/act_round.py: the input of every weight product
      quantized and dequantized to 8 bits exactly as the engine's integer kernels do for that
      weight's type -- q8_0 blocks for q4_0/q4_1/q5_0/q8_0 weights, q8_K for q4_K/q6_K), relative
      difference <= PPL_TOL 1e-2; the difference from the plain reference is printed as
      information. Why 1e-2 and not 0.1%: see the comment above PPL_TOL.
  (d) SmolLM2 chat: the GGUF chat template rendered with jinja2 for [user "What is the capital of
      France?"] with add_generation_prompt; reference greedy answer (until <|im_end|>, at most
      CHAT_MAX tokens) decoded with the byte-level vocabulary vs the text of `larder serve`'s
      POST /v1/chat/completions with temperature 0 -- equal (f32 copy), and for the Q4_1 file
      equal or, where it differs, teacher-forced as in (b).
  sanity    reference only (no engine): the Gemma reference's greedy answer to "Question: What is
            the capital of France?\\nAnswer:" contains "Paris"; reference perplexities plausible.

Bounds for the quantized files (QUANT_TOL, QUANT_MARGIN) -- see the comment above them.
Runtime: ~6.5 minutes on 2 cores (393 s measured with OPENBLAS_NUM_THREADS=1, of which ~70 s are
(c)'s activation-rounding reference passes; more under heavy load); the float64 references spend it
in BLAS, so OpenBLAS (Debian libopenblas0-pthread, in scripts/common.sh TEST_PACKAGES) matters: Debian's
generic reference BLAS is ~10x slower. REAL_MODEL_ONLY=smollm2|gemma3 runs one model.
"""

import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.environ.get("LARDER_SOURCE_DIR") or os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "reference"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import gguf_reader as gr  # noqa: E402
import kquants  # noqa: E402
from gguf_convert import convert_file  # noqa: E402
from gemma3_ref import Gemma3Ref, SpmTokenizer, load_gemma3  # noqa: E402
from llama_ref import LlamaRef, load_gguf_model  # noqa: E402
from models import sha256  # noqa: E402  (scripts/models.py)

kquants.install()

THREADS = 2
# The engine is compared with float64 references at f32 precision, so every larder run here uses
# the f32 KV cache (the default is f16; tests/kv_types_test.py and reference_model_test.py check the
# other cache types with their own bounds).
os.environ["LARDER_CACHE_TYPE_K"] = "f32"
os.environ["LARDER_CACHE_TYPE_V"] = "f32"
F32_TOL = 1e-4              # (a) logits of the f32 copy, relative to max|ref logit|
# (c) relative perplexity difference, engine vs reference. f32 copy: the brief's 0.1% is far looser than
# needed (measured 3e-8 .. 3e-7 for SmolLM2), so 1e-4.
# Quantized files: compared with the reference that emulates the engine's 8-bit activation rounding
# (act_round.py). The emulation is exact where nothing rounds the other way: at position 0 of a window
# (no attention mixing yet) the SmolLM2 Q4_1 logits agree to 1.9e-7 of max|logit| (plain reference:
# 1.9e-2). But the engine's f32 activations differ from the f64 reference's by ~1e-7 relative, and with
# ~10^5 rounded values per position (SmolLM2: 30 layers x 3264) some value lands on the other side of a
# rounding boundary at practically every later position; one flipped quant perturbs what follows, which
# flips many more, and within a few layers the two rounding-noise realizations are
# independent (position 1 onward: 1.4e-2 .. 3.1e-2 of max|logit|, the size of the rounding effect
# itself). So the emulation reproduces the rounding's systematic effect on perplexity but not its
# realization, and the per-text perplexity difference is set by that noise.
# At position 0 of a window the Gemma Q4_K_M logits agree to 1.5e-7 too (q8_0/q5_0 and q4_K/q6_K
# formats all exercised), and the reference against ITSELF, its rounding inputs perturbed by a random
# +-2^-24 relative step (below f32 rounding), differs by 1.4e-2 .. 6.4e-2 of max|logit| from position 0
# or 1 on, like the engine does.
# Measured ((engine - reference) / reference, AVX-512, `larder perplexity`, -t 1 and -t 2 alike):
#                                  plain ref   emulating ref   emulating refs, 5 realizations (as is +
#                                                              4 perturbed as above): range; sd of ppl
#   SmolLM2 Q4_1   tinystories 254   +2.4e-3     -4.6e-3        -0.3e-3 .. -5.6e-3; 2.1e-3
#                  python-doc 1020   +3.3e-3     -1.5e-3        +1.2e-3 .. -6.0e-3; 2.7e-3
#   Gemma Q4_K_M   tinystories 254   +3.4e-3     -2.7e-3        -2.7e-3, -4.4e-3 (2 realizations)
#                  python-doc  957   +3.8e-3     -4.9e-3        -4.9e-3, -6.9e-3
# The rounding raises the perplexity by ~0.6-1% on average (the emulating refs' mean vs plain); the
# engine is one realization of it, the emulating reference another, and realizations spread by
# sd 2-3e-3 on these texts. The brief's 0.1% is therefore below what any reference can promise here
# (the emulating reference misses ITSELF by up to 7e-3 under an invisible perturbation), so the bound
# stays 1e-2 (~2x the largest difference measured); comparing with the emulating reference removes
# the rounding's systematic part, which the plain reference's difference (printed) includes.
PPL_TOL = {"f32": 1e-4, "quant": 1e-2}
# (b) Quantized files. The engine does NOT compute on dequantized weights exactly: its integer kernels
# quantize the activations to 8 bits (src/kernels/traits.cpp: q4_1/q5_1 -> q8_1, q5_0/q8_0 -> q8_0,
# q4_K/q5_K/q6_K -> q8_K), as llama.cpp does -- for decode and, since the AVX-512 repacking covers
# q8_0, q4_0, q4_1, q5_0, q4_K and q6_K, for prefill too. One 8-bit block rounds each activation by
# up to d/2, d = max|x|/127 over the block (32 values; 256 for q8_K): a relative RMS error of
# (max|x|/rms(x)) / (127 sqrt 12) of every matmul input, ~0.5-1% for tame activations and several %
# for blocks holding an outlier (Gemma's ffn_down input, gelu(gate) * up, has large ones, in 256-wide
# q8_K blocks). Through 18-30 layers this moves the logits by a few % of their range.
# The rounding is also CHAOTIC: which side of a .5 boundary a value falls on depends on the last bits
# of the f32 activations, so the engine cannot be matched by "the reference with 8-bit activations"
# either. Measured with the reference alone (SmolLM2, 64 positions, every linear input rounded to
# q8 blocks): the rounding moves the logits by 3.8e-2 of max|logit|, and a 1e-7 relative perturbation
# of those inputs (below f32 rounding) moves the rounded result by 4.1e-2 -- as much again. (With only
# one matrix quantized, the engine equals such an emulation exactly up to the first position where a
# value rounds differently, then drifts.) So the bound is on the size of the effect, not on an emulation.
# Measured (AVX-512, 2 threads, this engine), max|diff| / max|logit| over the logits windows:
#   SmolLM2 Q4_1: 3.4e-2 (tinystories, 256 positions), 5.1e-2 (python-doc, 512). (1.1e-2 / 1.3e-2
#     before q4_1 was repacked, when prefill ran q4_1 in f32 and only the q8_0 output projection
#     quantized its input; a reference rounding just that input agreed to 3.9e-4.)
#   Gemma 3 Q4_K_M: 7.1e-2 (tinystories), ~9e-2 (python-doc). Per tensor group, only it quantized:
#     token_embd 7.3e-3, attn_output (q4_K) 2.3e-2, ffn_down (q4_K/q6_K) 8.5e-2.
# QUANT_TOL bounds the logits (~2x the measured ratio). The greedy decision depends on the DIFFERENCE of
# two logits, whose error is smaller than the worst single logit's. Measured error of
# logit(top-1) - logit(top-k), k = 2..5: SmolLM2 2.4e-2 / 3.0e-2 of max|logit|, Gemma 2.5e-2 / 4.4e-2
# (1.7 logits at most, median 0.18). QUANT_MARGIN (~2x) bounds it (checked on the logits windows) and
# is the near-tie width for greedy: an engine token that is not the reference's argmax must be within
# QUANT_MARGIN * max|logit| of it (the Q4_1 chat answer starts with such a near tie: the reference's
# "The" 25.325 vs "L" 25.243, margin 0.08; the engine picks "L").
QUANT_TOL = {"smollm2": 1e-1, "gemma3": 2e-1}
QUANT_MARGIN = {"smollm2": 6e-2, "gemma3": 1e-1}
PYDOC_PAGES = ["json.html"]
PYDOC_CHARS = 9000
N_GREEDY = 128
GREEDY_PROMPTS = [
    "Once upon a time, there was a little girl named",
    "Question: What is the capital of France?\nAnswer:",
    "The json module in Python",
    "def fibonacci(n):\n",
    "The three primary colors are",
]
CHAT_MAX = 64
CHAT_QUESTION = "What is the capital of France?"

MODELS = {
    # name: (reference kind, perplexity/logits window per text)
    "smollm2": ("llama", {"tinystories": 256, "pydoc": 512}),
    "gemma3": ("gemma3", {"tinystories": 256, "pydoc": 640}),
}

FAILS = []
SKIPS = []


def log(msg=""):
    print(msg, flush=True)


def check(ok, case, msg):
    log("  %-64s %s" % (case + ": " + msg, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append("%s: %s" % (case, msg))
    return ok


def larder_bin():
    b = os.environ.get("LARDER_BIN")
    if b:
        return b
    for d in ("build", "build-ref"):
        p = os.path.join(REPO, d, "bin", "larder")
        if os.path.exists(p):
            return p
    sys.exit("LARDER_BIN is not set and no build/bin/larder was found")


BIN = larder_bin()


class EngineError(RuntimeError):
    pass


def run_engine(args, timeout=900):
    cmd = [BIN] + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = (r.stderr or "").strip().splitlines()
        raise EngineError("larder %s exited %d: %s" % (args[0], r.returncode, tail[-1] if tail else ""))
    return r.stdout


def shared_dir():
    return os.environ.get("LARDER_SHARED") or os.path.join(REPO, "..", "shared")


def model_path(name):
    r = subprocess.run([os.path.join(REPO, "scripts", "models"), "--path", name], capture_output=True, text=True)
    p = r.stdout.strip()
    return p if r.returncode == 0 and p and os.path.exists(p) else None


def f32_copy(path):
    """The f32 copy of `path` (cached, keyed by the file's sha256)."""
    cache = os.environ.get("LARDER_REF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "larder", "ref")
    os.makedirs(cache, exist_ok=True)
    stem = os.path.basename(path)[:-len(".gguf")]
    out = os.path.join(cache, "%s.f32-%s.gguf" % (stem, sha256(path)[:16]))
    if not os.path.exists(out):
        t0 = time.time()
        tmp = out + ".part%d" % os.getpid()
        changed = convert_file(path, tmp, "f32")
        os.replace(tmp, out)
        log("  wrote %s (%d tensors dequantized to f32, %.0f s)" % (out, len(changed), time.time() - t0))
    return out


# ----------------------------------------------------------------------------- tokenizers

def _gpt2_byte_decoder():
    """GPT-2's byte <-> printable-unicode table (bytes_to_unicode), inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DEC = _gpt2_byte_decoder()


def decode_bytelevel(tokens, types, ids, special=False):
    out = bytearray()
    for t in ids:
        if types[t] == 3:              # control token (<|im_end|> ...): no text unless asked
            if special:
                out += tokens[t].encode("utf-8")
            continue
        for ch in tokens[t]:
            out.append(_BYTE_DEC[ch])
    return out.decode("utf-8", errors="replace")


class Tok:
    """Engine tokenization (larder tokenize --json-batch) + independent decode."""

    def __init__(self, model, meta, kind, tmp):
        self.model, self.meta, self.kind, self.tmp = model, meta, kind, tmp
        self.tokens = meta["tokenizer.ggml.tokens"]
        self.types = meta["tokenizer.ggml.token_type"]
        self.spm = SpmTokenizer(meta) if kind == "gemma3" else None

    def engine_encode(self, texts, special=False):
        jb = os.path.join(self.tmp, "batch.json")
        with open(jb, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        args = ["tokenize", "-m", self.model, "--json-batch", jb] + (["--parse-special"] if special else [])
        return [[int(t) for t in ids] for ids in json.loads(run_engine(args))]

    def decode(self, ids):
        if self.spm:
            return self.spm.decode(ids)
        return decode_bytelevel(self.tokens, self.types, ids)


# ----------------------------------------------------------------------------- reference

class Reference:
    def __init__(self, kind, path):
        t0 = time.time()
        if kind == "gemma3":
            cfg, w, _ = load_gemma3(path)
            self.m = Gemma3Ref(cfg, w)
        else:
            cfg, w = load_gguf_model(path)
            self.m = LlamaRef(cfg, w)
        self.cfg = cfg
        log("  reference (%s) loaded from %s in %.0f s" % (kind, os.path.basename(path), time.time() - t0))

    def forward(self, ids):
        return self.m.forward(ids)

    def greedy(self, ids, n, stop=None):
        return self.m.greedy(ids, n, stop=stop)


def windows(ids, C, bos):
    out = []
    for wi in range(len(ids) // C):
        win = list(ids[wi * C:(wi + 1) * C])
        if bos is not None:
            win[0] = bos
        out.append(win)
    return out


def ref_perplexity(ref, wins, keep_first=True):
    """-> (ppl, n_tokens, logits of the first window as float64 numpy)."""
    nll, n, first = 0.0, 0, None
    for k, win in enumerate(wins):
        C = len(win)
        logits = ref.forward(win)
        if k == 0 and keep_first:
            first = logits.numpy()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(win[C // 2 + 1:], dtype=torch.long)
        nll -= float(logp[C // 2:C - 1].gather(1, targets[:, None]).sum())
        n += len(targets)
        del logits, logp
    return math.exp(nll / n), n, first


# ----------------------------------------------------------------------------- comparisons

def engine_logits(model, ids, n_vocab, tmp):
    out = os.path.join(tmp, "logits.bin")
    run_engine(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "-o", out, "-t", THREADS])
    a = np.fromfile(out, dtype="<f4")
    os.unlink(out)
    if a.size != len(ids) * n_vocab:
        raise EngineError("logits file has %d floats, expected %d x %d" % (a.size, len(ids), n_vocab))
    return a.reshape(len(ids), n_vocab)


def engine_greedy(model, ids, n):
    out = run_engine(["logits", "-m", model, "--ids", ",".join(map(str, ids)), "--greedy", n, "-t", THREADS])
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("["):
            toks = json.loads(line)
            if len(toks) != n:
                raise EngineError("--greedy %d printed %d tokens" % (n, len(toks)))
            return [int(t) for t in toks]
    raise EngineError("--greedy printed no JSON array")


def logit_ratio(eng, ref):
    diff = 0.0
    for s in range(0, ref.shape[0], 64):
        diff = max(diff, float(np.max(np.abs(eng[s:s + 64].astype(np.float64) - ref[s:s + 64]))))
    return diff, float(np.max(np.abs(ref)))


def topk_margin_error(eng, ref, k=5):
    """max over positions and j = 2..k of |(e[t1] - e[tj]) - (r[t1] - r[tj])|, t = reference ranking."""
    worst = 0.0
    for s in range(0, ref.shape[0], 64):
        r = ref[s:s + 64]
        e = eng[s:s + 64].astype(np.float64)
        o = np.argpartition(-r, k, axis=1)[:, :k]
        o = np.take_along_axis(o, np.argsort(-np.take_along_axis(r, o, 1), axis=1), 1)
        rr, ee = np.take_along_axis(r, o, 1), np.take_along_axis(e, o, 1)
        worst = max(worst, float(np.max(np.abs((ee[:, :1] - ee[:, 1:]) - (rr[:, :1] - rr[:, 1:])))))
    return worst


def teacher_forced(ref, prompt, eng_toks, tol):
    rows = ref.forward(list(prompt) + list(eng_toks)).numpy()[len(prompt) - 1:len(prompt) - 1 + len(eng_toks)]
    return teacher_forced_rows(rows, eng_toks, tol)


def teacher_forced_rows(rows, eng_toks, tol):
    """rows[k]: reference logits predicting eng_toks[k] -> (agree, near, bad, first_bad, decisive);
    see the module docstring (b)."""
    tol_abs = tol * float(np.max(np.abs(rows)))     # tol: the near-tie width (QUANT_MARGIN), relative
    agree = near = bad = 0
    first_bad = None
    for k, (row, t) in enumerate(zip(rows, eng_toks)):
        top = int(np.argmax(row))
        if t == top:
            agree += 1
        elif row[top] - row[t] <= tol_abs:
            near += 1
        else:
            bad += 1
            if first_bad is None:
                first_bad = (k, t, top, float(row[top] - row[t]))
    srt = np.sort(rows, axis=1)
    decisive = int(np.sum(srt[:, -1] - srt[:, -2] > tol_abs))
    return agree, near, bad, first_bad, decisive


# ----------------------------------------------------------------------------- server

class Server:
    """`larder serve` on 127.0.0.1 with --port 0; the chosen port is read from stderr."""

    def __init__(self, model):
        self.lines, self.port = [], None
        self.proc = subprocess.Popen([BIN, "serve", "-m", model, "--host", "127.0.0.1", "--port", "0",
                                      "-t", str(THREADS)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.time()
        while self.port is None and time.time() - t0 < 120 and self.proc.poll() is None:
            time.sleep(0.05)
        if self.port is None:
            self.kill()
            raise EngineError("server did not start: %s" % "".join(self.lines)[-500:])
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise EngineError("/health never became 200: %s" % "".join(self.lines)[-500:])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    def request(self, method, path, body=None, timeout=300):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=json.dumps(body) if body is not None else None,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ----------------------------------------------------------------------------- per model

def gemma_sanity(ref, tok):
    ids = tok.spm.encode("Question: What is the capital of France?\nAnswer:")
    out = ref.greedy(ids, 8)
    text = tok.spm.decode(out)
    check("Paris" in text, "gemma3 reference sanity", "greedy answer %r contains 'Paris'" % text)


def run_model(name, texts, tmp):
    kind, ctx = MODELS[name]
    path = model_path(name)
    if path is None:
        msg = "model %s not cached (scripts/models --path %s failed; fetch it with scripts/models)" % (name, name)
        log("SKIP %s" % msg)
        SKIPS.append(msg)
        return
    log("== %s: %s" % (name, path))
    f32 = f32_copy(path)
    meta = gr.GGUFFile(path).metadata
    ref = Reference(kind, path)
    n_vocab = ref.cfg["n_vocab"]
    tok = Tok(f32, meta, kind, tmp)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    # (label, file, logits bound, greedy near-tie / top-k margin bound), relative to max|logit|
    files = [("f32", f32, F32_TOL, F32_TOL), ("quant", path, QUANT_TOL[name], QUANT_MARGIN[name])]

    if kind == "gemma3":
        gemma_sanity(ref, tok)

    # Token ids: the engine's; checked against the independent tokenizer / decoder.
    engine_ok = True
    try:
        text_ids = dict(zip(texts, tok.engine_encode([texts[k][1] for k in texts])))
        prompt_ids = tok.engine_encode(GREEDY_PROMPTS)
    except EngineError as e:
        engine_ok = False
        check(False, name + " engine", str(e))
        text_ids = {}
        if kind == "gemma3":    # the reference-only checks still run on the independent tokenizer
            text_ids = {k: tok.spm.encode(texts[k][1]) for k in texts}
            prompt_ids = [tok.spm.encode(p) for p in GREEDY_PROMPTS]
    if engine_ok:
        for k, ids in text_ids.items():
            body = ids[1:] if add_bos and ids and ids[0] == bos else ids
            if kind == "gemma3":
                mine = tok.spm.encode(texts[k][1])
                same = mine == ids
                first = next((i for i, (a, b) in enumerate(zip(mine, ids)) if a != b), min(len(mine), len(ids)))
                check(same, "%s tokenize %s" % (name, k), "engine ids (%d) == SpmTokenizer ids (%d)%s"
                      % (len(ids), len(mine), "" if same else " first difference at %d" % first))
            else:
                check(tok.decode(body) == texts[k][1] and (ids[0] == bos) == add_bos, "%s tokenize %s" % (name, k),
                      "%d engine ids decode back to the text (BOS %s)" % (len(ids), "first" if add_bos else "absent"))

    # (c) perplexity, and (a)/(b) logits on each text's first window.
    ref_ppl = {}
    for k, ids in text_ids.items():
        C = ctx[k]
        wins = windows(ids, C, bos if add_bos else None)
        t0 = time.time()
        ppl, n_tok, first = ref_perplexity(ref, wins)
        ref_ppl[k] = ppl
        log("  reference perplexity %s: %.6f over %d tokens (%d windows of %d, %.0f s)"
            % (k, ppl, n_tok, len(wins), C, time.time() - t0))
        check(1.0 < ppl < 60.0, "%s reference ppl %s" % (name, k), "%.4f plausible (1 < ppl < 60)" % ppl)
        if not engine_ok:
            continue
        # The same windows with the engine's 8-bit activation rounding emulated (for the quantized file).
        t0 = time.time()
        ref.m.act_round = True
        try:
            ppl_ar = ref_perplexity(ref, wins, keep_first=False)[0]
        finally:
            ref.m.act_round = False
        log("  reference perplexity %s with activation rounding: %.6f (%.0f s)" % (k, ppl_ar, time.time() - t0))
        for label, mpath, tol, margin in files:
            case = "%s %s %s" % (name, label, k)
            try:
                j = json.loads(run_engine(["perplexity", "-m", mpath, "-f", texts[k][0], "-c", C, "-t", THREADS,
                                           "--json"]).strip().splitlines()[-1])
                e_ppl = j["perplexity"]
                rel = abs(e_ppl - ppl) / ppl
                if label == "f32":
                    check(j["n_tokens"] == n_tok and rel <= PPL_TOL[label], case + " ppl",
                          "engine %.6f vs reference %.6f: rel %.2e (<= %.0e), %d tokens"
                          % (e_ppl, ppl, rel, PPL_TOL[label], j["n_tokens"]))
                else:
                    rel_ar = abs(e_ppl - ppl_ar) / ppl_ar
                    check(j["n_tokens"] == n_tok and rel_ar <= PPL_TOL[label], case + " ppl",
                          "engine %.6f vs reference with activation rounding %.6f: rel %.2e (<= %.0e), %d tokens"
                          % (e_ppl, ppl_ar, rel_ar, PPL_TOL[label], j["n_tokens"]))
                    log("    (information) engine %.6f vs plain reference %.6f: rel %.2e (signed %+.2e); "
                        "reference with vs without rounding: %+.2e" % (e_ppl, ppl, rel, (e_ppl - ppl) / ppl,
                                                                      (ppl_ar - ppl) / ppl))
                t1 = time.time()
                eng = engine_logits(mpath, wins[0], n_vocab, tmp)
                diff, mx = logit_ratio(eng, first)
                perr = topk_margin_error(eng, first)
                del eng
                check(diff <= tol * mx, case + " logits", "%d pos: max|diff| %.3e, max|logit| %.2f, ratio %.2e (<= %.0e) [%.0f s]"
                      % (len(wins[0]), diff, mx, diff / mx, tol, time.time() - t1))
                check(perr <= margin * mx, case + " top-k margins", "max error of logit(top1) - logit(top2..5): "
                      "%.3e, ratio %.2e (<= %.1e)" % (perr, perr / mx, margin))
            except EngineError as e:
                check(False, case, str(e))
        del first

    # Greedy. The engine's f32 free run is checked against the reference by scoring prompt + the
    # engine's tokens in ONE reference forward: if every engine token is the reference's argmax
    # given the same prefix, then by induction the reference's own free run produces exactly these
    # tokens (identical continuations), at the cost of one batched forward instead of 128 steps.
    if engine_ok:
        for pi, (p, ids) in enumerate(zip(GREEDY_PROMPTS, prompt_ids)):
            cache = {}
            for label, mpath, tol, margin in files:
                case = "%s %s greedy %d" % (name, label, pi)
                try:
                    e = engine_greedy(mpath, ids, N_GREEDY)
                except EngineError as ex:
                    check(False, case, str(ex))
                    continue
                key = tuple(e)
                if key not in cache:
                    cache[key] = ref.forward(list(ids) + e).numpy()[len(ids) - 1:len(ids) - 1 + len(e)]
                rows = cache[key]
                if pi == 0 and label == "f32":
                    log("  engine f32 greedy %r -> %r" % (p, tok.decode(e)[:100]))
                if label == "f32":
                    top = rows.argmax(axis=1)
                    bad = [k for k in range(len(e)) if top[k] != e[k]]
                    srt = np.sort(rows, axis=1)
                    margin = float(np.min(srt[:, -1] - srt[:, -2]))
                    check(not bad, case, "%d tokens identical to the reference's greedy (min top-2 margin %.3g)%s"
                          % (N_GREEDY, margin, "" if not bad else " -- first difference at step %d: engine %d, "
                             "reference %d, margin %.3g" % (bad[0], e[bad[0]], top[bad[0]],
                                                            rows[bad[0]].max() - rows[bad[0]][e[bad[0]]])))
                else:
                    agree, near, nbad, fb, dec = teacher_forced_rows(rows, e, margin)
                    check(nbad == 0, case, "teacher-forced: %d agree, %d near ties, %d mismatches%s; %d/%d steps "
                          "decisive (top-2 margin > QUANT_MARGIN)" % (agree, near, nbad, "" if fb is None else
                          " (first: step %d engine %d ref %d margin %.3f)" % fb, dec, len(e)))

    if kind == "llama" and engine_ok:
        chat(name, ref, tok, meta, files)


def chat(name, ref, tok, meta, files):
    import jinja2
    tmpl = meta.get("tokenizer.chat_template")
    if not tmpl:
        check(False, name + " chat", "no tokenizer.chat_template in the GGUF")
        return
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    prompt = env.from_string(tmpl).render(messages=[{"role": "user", "content": CHAT_QUESTION}],
                                          add_generation_prompt=True, bos_token="", eos_token="")
    ids = tok.engine_encode([prompt], special=True)[0]
    check(decode_bytelevel(tok.tokens, tok.types, ids, special=True) == prompt, name + " chat prompt",
          "%d ids (special tokens parsed) decode back to the rendered template" % len(ids))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    r = ref.greedy(ids, CHAT_MAX, stop=eos)
    ref_text = tok.decode([t for t in r if t != eos])
    log("  reference chat answer (%d tokens%s): %r" % (len(r), ", stopped at EOS" if r[-1] == eos else "", ref_text))
    check("Paris" in ref_text and r[-1] == eos, name + " reference chat sanity", "answer names Paris and ends with EOS")
    for label, mpath, tol, margin in files:
        case = "%s %s chat" % (name, label)
        srv = None
        try:
            srv = Server(mpath)
            st, body = srv.request("POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": CHAT_QUESTION}], "temperature": 0, "max_tokens": CHAT_MAX})
            if st != 200:
                check(False, case, "HTTP %d: %r" % (st, body[:300]))
                continue
            text = json.loads(body)["choices"][0]["message"]["content"]
        except (EngineError, OSError, ValueError, KeyError) as e:
            check(False, case, "server: %s" % e)
            continue
        finally:
            if srv:
                srv.kill()
        if label == "f32" or text == ref_text:
            check(text == ref_text, case, "server text %r == reference" % text)
        else:
            etoks = tok.engine_encode([text], special=False)[0]
            agree, near, bad, fb, dec = teacher_forced(ref, ids, etoks, margin)
            check(bad == 0, case, "server text %r differs from the reference; teacher-forced on its %d tokens: "
                  "%d agree, %d near ties, %d mismatches" % (text, len(etoks), agree, near, bad))


def main():
    t0 = time.time()
    # One torch thread: the big products run in (multi-threaded) BLAS; torch's own OpenMP team on top
    # of it only oversubscribes 2 cores.
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="larder-real-")
    try:
        texts = {}
        story = os.path.join(shared_dir(), "text", "tinystories-samples.txt")
        if os.path.exists(story):
            with open(story, encoding="utf-8") as f:
                texts["tinystories"] = (story, f.read())
        else:
            SKIPS.append("shared text %s missing" % story)
        try:
            from python_doc_text import python_doc_text
            doc = python_doc_text(PYDOC_PAGES, max_chars=PYDOC_CHARS)
            p = os.path.join(tmp, "pydoc.txt")
            with open(p, "w", encoding="utf-8") as f:
                f.write(doc)
            texts["pydoc"] = (p, doc)
            log("python-doc text: %s, first %d characters" % (", ".join(PYDOC_PAGES), len(doc)))
        except FileNotFoundError as e:
            SKIPS.append("python-doc text: %s" % e)
            log("SKIP python-doc text: %s" % e)
        only = os.environ.get("REAL_MODEL_ONLY")
        for name in MODELS:
            if only and name not in only.split(","):
                continue
            try:
                run_model(name, texts, tmp)
            except (EngineError, subprocess.TimeoutExpired) as e:
                check(False, name, str(e))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log("real_model_test: %.0f s" % (time.time() - t0))
    if FAILS:
        log("%d FAILED:" % len(FAILS))
        for f in FAILS:
            log("  " + f)
        return 1
    if SKIPS:
        log("SKIP: " + "; ".join(SKIPS))
        return 77
    log("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
