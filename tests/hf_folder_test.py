#!/usr/bin/python3
"""Hugging Face folder loading, checked against GGUF: converts stories260K-f32.gguf into HF
folders (config.json, safetensors in HF layout, tokenizer.json) with an independent numpy
writer and requires `larder logits` on each folder to match the GGUF model.

GGUF stores Q/K rows in Meta's interleaved-pair order (RoPE rotates (2i, 2i+1)); HF
checkpoints store them in rotate_half order (RoPE rotates (i, i + d/2)). The conversion
applies the inverse of llama.cpp's convert permute, which this test also verifies numerically.

Env: LARDER_BIN, LARDER_SHARED or LARDER_SOURCE_DIR/../shared. Exit 77 only if data is missing.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
from gguf_reader import GGUFFile  # noqa: E402  (independent numpy GGUF reader)

IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 29, 13, 50]
F32_TOL = 1e-4    # relative to max |logit|: only summation order differs
F16_TOL = 5e-3    # f16 weights (11-bit mantissa); measured 8e-4
BF16_TOL = 2.5e-2  # bf16 weights (8-bit mantissa, ~0.4% per weight); measured 4.5e-3


def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    src = os.environ.get("LARDER_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return os.path.join(src, "..", "shared")


# ---------------------------------------------------------------- Q/K layout

def gguf_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf: HF rotate_half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_unpermute(w, n_head):
    """Inverse: interleaved pairs -> rotate_half. Row h*hd + j*hd/2 + i <- row h*hd + 2i + j."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope(x, pos, hd, neox, theta=10000.0):
    """x: [n_head * hd]; rotates each head's pairs by pos * theta^(-2i/hd)."""
    x = x.reshape(-1, hd).astype(np.float64).copy()
    for i in range(hd // 2):
        a = pos * theta ** (-2.0 * i / hd)
        c, s = np.cos(a), np.sin(a)
        j, k = (i, i + hd // 2) if neox else (2 * i, 2 * i + 1)
        x0, x1 = x[:, j].copy(), x[:, k].copy()
        x[:, j], x[:, k] = x0 * c - x1 * s, x0 * s + x1 * c
    return x.reshape(-1)


def check_permutation(wq, n_head, hd):
    """The converted weights must give the same attention scores under NeoX RoPE as the GGUF
    weights under interleaved RoPE, and the two permutes must be inverses."""
    assert np.array_equal(gguf_permute(hf_unpermute(wq, n_head), n_head), wq), "permute is not the inverse"
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(wq.shape[1]), rng.standard_normal(wq.shape[1])
    wh = hf_unpermute(wq, n_head)
    for p, q in ((3, 1), (17, 5)):
        a = rope(wq @ x, p, hd, neox=False).reshape(n_head, hd) * rope(wq @ y, q, hd, neox=False).reshape(n_head, hd)
        b = rope(wh @ x, p, hd, neox=True).reshape(n_head, hd) * rope(wh @ y, q, hd, neox=True).reshape(n_head, hd)
        assert np.allclose(a.sum(1), b.sum(1), rtol=1e-9, atol=1e-9), "per-head q.k differs after unpermute"
        assert not np.allclose(rope(wq @ x, p, hd, neox=True), rope(wq @ x, p, hd, neox=False)), \
            "test is vacuous: both RoPE styles agree"


# ---------------------------------------------------------------- writers

def to_bf16_bytes(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
    return u.astype("<u2").tobytes()


def encode(a, dtype):
    if dtype == "F32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(a, dtype="<f2").tobytes()
    if dtype == "BF16":
        return to_bf16_bytes(a)
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, float32 array). Layout: u64 LE header length, JSON, raw bytes."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors:
        raw = encode(a, dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def tokenizer_json(g):
    """SentencePiece-style BPE tokenizer.json (byte_fallback) from the GGUF vocabulary, the way
    transformers' LlamaConverter lays it out: merges ranked by the merged piece's score."""
    toks = g.get("tokenizer.ggml.tokens")
    scores = g.get("tokenizer.ggml.scores")
    types = g.get("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(toks)}
    merges = []
    for i, piece in enumerate(toks):
        if types[i] != 1:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if vocab.get(piece[:k]) is not None and vocab.get(piece[k:]) is not None]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(scores[i], i, l, r) for l, r in local]
    merges.sort(key=lambda m: (-m[0], m[1]))
    special = [{"id": i, "content": toks[i], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i in range(len(toks)) if types[i] in (2, 3)]
    bos = toks[g.get("tokenizer.ggml.bos_token_id")]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": toks[g.get("tokenizer.ggml.unknown_token_id", 0)],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": ["%s %s" % (l, r) for _, _, l, r in merges]},
    }


def hf_state(g, n_head, n_kv):
    """HF-named float32 tensors from the GGUF (numpy shapes are [rows, cols] like PyTorch)."""
    t = g.tensor
    out = [("model.embed_tokens.weight", t("token_embd.weight")), ("model.norm.weight", t("output_norm.weight")),
           ("lm_head.weight", t("output.weight"))]
    n_layer = g.get("llama.block_count")
    for i in range(n_layer):
        b, p = "blk.%d." % i, "model.layers.%d." % i
        out += [
            (p + "input_layernorm.weight", t(b + "attn_norm.weight")),
            (p + "self_attn.q_proj.weight", hf_unpermute(t(b + "attn_q.weight"), n_head)),
            (p + "self_attn.k_proj.weight", hf_unpermute(t(b + "attn_k.weight"), n_kv)),
            (p + "self_attn.v_proj.weight", t(b + "attn_v.weight")),
            (p + "self_attn.o_proj.weight", t(b + "attn_output.weight")),
            (p + "post_attention_layernorm.weight", t(b + "ffn_norm.weight")),
            (p + "mlp.gate_proj.weight", t(b + "ffn_gate.weight")),
            (p + "mlp.up_proj.weight", t(b + "ffn_up.weight")),
            (p + "mlp.down_proj.weight", t(b + "ffn_down.weight")),
        ]
    return out


def make_folder(d, g, state, cfg, tok, dtype, shards=1, tied=False):
    os.makedirs(d)
    cfg = dict(cfg, tie_word_embeddings=tied, torch_dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype])
    if tied:
        state = [(n, a) for n, a in state if n != "lm_head.weight"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}, f)
    if shards == 1:
        write_safetensors(os.path.join(d, "model.safetensors"), state, dtype)
        return
    per = (len(state) + shards - 1) // shards
    weight_map = {}
    for s in range(shards):
        name = "model-%05d-of-%05d.safetensors" % (s + 1, shards)
        part = state[s * per:(s + 1) * per]
        write_safetensors(os.path.join(d, name), part, dtype)
        weight_map.update({n: name for n, _ in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


# ---------------------------------------------------------------- CLI

def cli(larder, *args):
    p = subprocess.run([larder, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    if p.returncode != 0:
        raise RuntimeError("larder %s failed (%d): %s" % (" ".join(args), p.returncode, p.stderr.decode()[-500:]))
    return p.stdout.decode()


def logits(larder, model, out, n_vocab):
    cli(larder, "logits", "-m", model, "--ids", ",".join(map(str, IDS)), "-o", out)
    a = np.fromfile(out, dtype="<f4")
    assert a.size == len(IDS) * n_vocab, "logits file has %d floats, expected %d" % (a.size, len(IDS) * n_vocab)
    return a.reshape(len(IDS), n_vocab)


def main():
    larder = os.environ.get("LARDER_BIN")
    if not larder or not os.path.exists(larder):
        print("FAIL: LARDER_BIN is not set to the larder binary")
        return 1
    gguf_path = os.path.join(shared_dir(), "models", "stories260K", "stories260K-f32.gguf")
    if not os.path.exists(gguf_path):
        print("SKIP: shared data missing: %s" % gguf_path)
        return 77
    g = GGUFFile(gguf_path)
    n_embd, n_head = g.get("llama.embedding_length"), g.get("llama.attention.head_count")
    n_kv = g.get("llama.attention.head_count_kv", n_head)
    hd = n_embd // n_head
    n_vocab = len(g.get("tokenizer.ggml.tokens"))
    check_permutation(g.tensor("blk.0.attn_q.weight"), n_head, hd)
    check_permutation(g.tensor("blk.0.attn_k.weight"), n_kv, hd)
    print("ok   Q/K unpermute is the inverse of llama.cpp's permute and preserves RoPE attention scores")

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": n_embd, "intermediate_size": g.get("llama.feed_forward_length"),
        "num_hidden_layers": g.get("llama.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "rms_norm_eps": g.get("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": g.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": g.get("llama.context_length"), "vocab_size": n_vocab,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"), "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
    }
    state = hf_state(g, n_head, n_kv)
    assert np.array_equal(g.tensor("output.weight"), g.tensor("token_embd.weight")), "stories260K is tied"
    tok = tokenizer_json(g)

    tmp = tempfile.mkdtemp(prefix="larder_hf_")
    failures, checks = 0, 1  # the permutation check above passed
    try:
        ref = logits(larder, gguf_path, os.path.join(tmp, "ref.bin"), n_vocab)
        scale = float(np.abs(ref).max())
        ref_greedy = json.loads(cli(larder, "logits", "-m", gguf_path, "--ids", "1,403,407,261,378", "--greedy", "16"))
        variants = [
            ("f32, single file, lm_head", "F32", 1, False, F32_TOL),
            ("f32, 3 shards + index, tied embeddings", "F32", 3, True, F32_TOL),
            ("f16", "F16", 1, False, F16_TOL),
            ("bf16", "BF16", 1, False, BF16_TOL),
        ]
        for k, (label, dtype, shards, tied, tol) in enumerate(variants):
            d = os.path.join(tmp, "model%d" % k)
            make_folder(d, g, state, cfg, tok, dtype, shards, tied)
            try:
                got = logits(larder, d, os.path.join(tmp, "got.bin"), n_vocab)
            except (RuntimeError, AssertionError) as e:
                checks += 1
                failures += 1
                print("FAIL %s: %s" % (label, e))
                continue
            err = float(np.abs(got - ref).max()) / scale
            agree = int((got.argmax(1) == ref.argmax(1)).sum())
            checks += 1
            status = "ok  " if err <= tol else "FAIL"
            failures += err > tol
            print("%s %-40s max|diff|/max|logit| = %.2e (bound %.0e), argmax agrees at %d/%d positions"
                  % (status, label, err, tol, agree, len(IDS)))
            if dtype == "F32":
                checks += 1
                gr = json.loads(cli(larder, "logits", "-m", d, "--ids", "1,403,407,261,378", "--greedy", "16"))
                if gr != ref_greedy:
                    failures += 1
                    print("FAIL %s: greedy ids %s != GGUF %s" % (label, gr, ref_greedy))
                else:
                    print("ok   %-40s greedy continuation matches GGUF: %s" % (label, gr[:8]))

        # tokenizer.json built from the GGUF vocabulary must tokenize like the GGUF tokenizer.
        d = os.path.join(tmp, "model0")
        for text in ("Once upon a time", "Lily and Ben went to the park. They saw a big dog!",
                     "  two  spaces\nnewline", "caf\u00e9 \u2603 123"):
            checks += 1
            a = cli(larder, "tokenize", "-m", d, "--ids", text).strip()
            b = cli(larder, "tokenize", "-m", gguf_path, "--ids", text).strip()
            if a != b:
                failures += 1
                print("FAIL tokenizer.json vs GGUF on %r: %s != %s" % (text, a, b))
            else:
                print("ok   tokenizer.json matches GGUF on %-45r %s" % (text, a[:60]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (checks - failures, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
