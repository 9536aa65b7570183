"""Independent float64 PyTorch reference of the Llama / Qwen2 decoder architecture.

Written from the published model definitions (Meta's llama `model.py`, Hugging Face
`modeling_llama.py` / `modeling_qwen2.py`) and the llama2.c checkpoint format; it shares no code
with the Larder engine. It is deliberately naive: full-precision (float64) math, explicit
per-step formulas, no fused kernels.

Architecture (pre-norm decoder):
    x = embed(ids)
    per layer:  h = x + Wo . attn(RMSNorm(x))
                x = h + W2 . (silu(W1 . n) * W3 . n),   n = RMSNorm(h)
    logits = Wout . RMSNorm(x)
    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w
Optional training-free FFN activation sparsity (CATS, Lee et al. 2024; LlamaRef(ffn_thresholds=...)):
    per layer a threshold thr; silu(W1 . n) entries with |silu| <= thr are zeroed (thr 0: dense).
Attention: grouped-query (query head h uses KV head h // (n_head / n_head_kv)), scale
1/sqrt(head_dim), causal mask. Qwen2 adds biases to the Q, K, V projections.
RoPE, rotating the first n_rot dims of each head with theta_i = base^(-2i/n_rot)
(divided by rope_freqs[i] when that tensor is present, llama3 scaling):
  * "adjacent" (Meta / GPT-J layout): pairs (x[2i], x[2i+1]) as a complex number times
    e^{i pos theta_i}. Used by llama GGUF files (the converter permuted Q/K into this layout) and
    by llama2.c checkpoints (Meta's original layout).
  * "neox" (HF rotate_half layout): pairs (x[i], x[i + n_rot/2]). Used by qwen2.
"""

import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reader import GGUFFile  # noqa: E402
from act_round import round_input  # noqa: E402

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


# ----------------------------------------------------------------------------- loading

def load_gguf_model(path, dtype=torch.float64):
    """Returns (cfg, weights) from a GGUF file; weights are dequantized, then cast to `dtype`."""
    f = GGUFFile(path)
    arch = f.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError("%s: unsupported architecture %r" % (path, arch))

    def key(k, default=None, required=True):
        full = "%s.%s" % (arch, k)
        if full in f.metadata:
            return f.metadata[full]
        if required and default is None:
            raise ValueError("%s: missing metadata key %s" % (path, full))
        return default

    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", n_embd // n_head, required=False))
    cfg = {
        "arch": arch,
        "n_embd": n_embd,
        "n_ff": int(key("feed_forward_length")),
        "n_layer": int(key("block_count")),
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_base": float(key("rope.freq_base", 10000.0, required=False)),
        "n_ctx": int(key("context_length")),
        "n_rot": int(key("rope.dimension_count", head_dim, required=False)),
        "rope_layout": "adjacent" if arch == "llama" else "neox",
    }
    w = {}
    types = {}
    for name, info in f.tensors.items():
        w[name] = torch.from_numpy(np.array(f.tensor(name), dtype=np.float32)).to(dtype)
        types[name] = info.type_name
    if "output.weight" not in w:
        w["output.weight"] = w["token_embd.weight"]      # tied embeddings
        cfg["tied"] = True
    else:
        cfg["tied"] = False
    cfg["n_vocab"] = w["token_embd.weight"].shape[0]
    cfg["tensor_types"] = types
    cfg["has_bias"] = "blk.0.attn_q.bias" in w
    _check_shapes(cfg, w)
    return cfg, w


def load_llama2c_model(path, dtype=torch.float64):
    """Returns (cfg, weights) from a llama2.c checkpoint (legacy v0 format), with GGUF tensor names."""
    with open(path, "rb") as fh:
        data = fh.read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    arr = np.frombuffer(data, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > arr.size:
            raise ValueError("%s: truncated checkpoint" % path)
        out = arr[pos:pos + n].reshape(shape)
        pos += n
        return torch.from_numpy(np.array(out, dtype=np.float32)).to(dtype)

    L = n_layers
    tok = take(vocab, dim)
    rms_att = take(L, dim)
    wq = take(L, dim, dim)
    wk = take(L, kv_dim, dim)
    wv = take(L, kv_dim, dim)
    wo = take(L, dim, dim)
    rms_ffn = take(L, dim)
    w1 = take(L, hidden, dim)
    w2 = take(L, dim, hidden)
    w3 = take(L, hidden, dim)
    rms_final = take(dim)
    freq_real = take(seq_len, head_size // 2)
    freq_imag = take(seq_len, head_size // 2)
    wcls = tok if shared else take(vocab, dim)
    if pos != arr.size:
        raise ValueError("%s: %d trailing floats" % (path, arr.size - pos))
    cfg = {
        "arch": "llama", "n_embd": dim, "n_ff": hidden, "n_layer": L, "n_head": n_heads,
        "n_head_kv": n_kv_heads, "head_dim": head_size, "eps": 1e-5, "rope_base": 10000.0,
        "n_ctx": seq_len, "n_rot": head_size, "rope_layout": "adjacent", "n_vocab": vocab,
        "tied": shared, "has_bias": False,
        "llama2c_freq_cis": (freq_real, freq_imag),
    }
    w = {"token_embd.weight": tok, "output_norm.weight": rms_final, "output.weight": wcls}
    for i in range(L):
        p = "blk.%d." % i
        w[p + "attn_norm.weight"] = rms_att[i]
        w[p + "attn_q.weight"] = wq[i]
        w[p + "attn_k.weight"] = wk[i]
        w[p + "attn_v.weight"] = wv[i]
        w[p + "attn_output.weight"] = wo[i]
        w[p + "ffn_norm.weight"] = rms_ffn[i]
        w[p + "ffn_gate.weight"] = w1[i]
        w[p + "ffn_down.weight"] = w2[i]
        w[p + "ffn_up.weight"] = w3[i]
    _check_shapes(cfg, w)
    return cfg, w


def load_model(path, dtype=torch.float64):
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return load_gguf_model(path, dtype)
    return load_llama2c_model(path, dtype)


def _check_shapes(cfg, w):
    E, F, V = cfg["n_embd"], cfg["n_ff"], cfg["n_vocab"]
    qd = cfg["n_head"] * cfg["head_dim"]
    kvd = cfg["n_head_kv"] * cfg["head_dim"]
    want = {"token_embd.weight": (V, E), "output_norm.weight": (E,), "output.weight": (V, E)}
    for i in range(cfg["n_layer"]):
        p = "blk.%d." % i
        want.update({p + "attn_norm.weight": (E,), p + "attn_q.weight": (qd, E),
                     p + "attn_k.weight": (kvd, E), p + "attn_v.weight": (kvd, E),
                     p + "attn_output.weight": (E, qd), p + "ffn_norm.weight": (E,),
                     p + "ffn_gate.weight": (F, E), p + "ffn_up.weight": (F, E),
                     p + "ffn_down.weight": (E, F)})
        if cfg.get("has_bias"):
            want.update({p + "attn_q.bias": (qd,), p + "attn_k.bias": (kvd,), p + "attn_v.bias": (kvd,)})
    if "rope_freqs.weight" in w:
        want["rope_freqs.weight"] = (cfg["n_rot"] // 2,)
    for k, s in want.items():
        if k not in w:
            raise ValueError("missing tensor %s" % k)
        if tuple(w[k].shape) != s:
            raise ValueError("tensor %s: shape %s, expected %s" % (k, tuple(w[k].shape), s))
    if cfg["n_head"] % cfg["n_head_kv"]:
        raise ValueError("n_head %d not a multiple of n_head_kv %d" % (cfg["n_head"], cfg["n_head_kv"]))


# ----------------------------------------------------------------------------- model

def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def sparsify(a, thr):
    """CATS activation sparsity: a with the entries |a| <= thr set to 0; thr <= 0 keeps all."""
    if thr <= 0:
        return a
    return torch.where(a.abs() > thr, a, torch.zeros_like(a))


def rope_frequencies(cfg, weights):
    """theta_i, i = 0 .. n_rot/2 - 1 (float64)."""
    n_rot = cfg["n_rot"]
    theta = 1.0 / (cfg["rope_base"] ** (torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot))
    if "rope_freqs.weight" in weights:
        theta = theta / weights["rope_freqs.weight"].to(torch.float64)
    return theta


def apply_rope_adjacent(x, positions, theta, n_rot):
    """Meta layout: x [n, heads, head_dim]; rotate pairs (x[2i], x[2i+1]) of the first n_rot dims."""
    angles = positions.to(torch.float64)[:, None] * theta[None, :]            # [n, n_rot/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]            # e^{i angle}, [n, 1, n_rot/2]
    xr = x[..., :n_rot].reshape(*x.shape[:-1], n_rot // 2, 2)
    xc = torch.view_as_complex(xr.contiguous())
    out = torch.view_as_real(xc * rot).reshape(*x.shape[:-1], n_rot)
    return torch.cat([out, x[..., n_rot:]], dim=-1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_neox(x, positions, theta, n_rot):
    """HF rotate_half layout: pairs (x[i], x[i + n_rot/2]) of the first n_rot dims."""
    angles = positions.to(torch.float64)[:, None] * theta[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]                     # [n, 1, n_rot]
    xr = x[..., :n_rot]
    out = xr * torch.cos(emb) + _rotate_half(xr) * torch.sin(emb)
    return torch.cat([out, x[..., n_rot:]], dim=-1)


class LlamaRef(torch.nn.Module):
    """Float64 reference forward pass. Weights use GGUF tensor names, PyTorch Linear layout [out, in]."""

    def __init__(self, cfg, weights, act_round=False, ffn_thresholds=None):
        super().__init__()
        self.cfg = cfg
        self.w = {k: v.to(torch.float64) for k, v in weights.items()}
        # act_round: round the input of every weight product to the 8-bit format an integer-kernel
        # engine uses for that weight's type (act_round.py); needs cfg["tensor_types"] (GGUF files).
        self.act_round = act_round
        # ffn_thresholds: training-free FFN activation sparsity (CATS, Lee et al. 2024), one threshold
        # per layer on |silu(gate)|; see ffn_sparsify. None (the default): the dense FFN.
        self.ffn_thresholds = None if ffn_thresholds is None else [float(t) for t in ffn_thresholds]
        if self.ffn_thresholds is not None and len(self.ffn_thresholds) != cfg["n_layer"]:
            raise ValueError("ffn_thresholds: %d values for %d layers" % (len(self.ffn_thresholds), cfg["n_layer"]))
        self.theta = rope_frequencies(cfg, self.w)
        if cfg["rope_layout"] == "adjacent":
            self._rope = apply_rope_adjacent
        elif cfg["rope_layout"] == "neox":
            self._rope = apply_rope_neox
        else:
            raise ValueError("unknown rope layout %r" % cfg["rope_layout"])

    def _act(self, x, name):
        return round_input(self.cfg, x, name) if self.act_round else x

    def _linear(self, x, name):
        y = self._act(x, name) @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y + b if b is not None else y

    def _attention(self, layer, x, start_pos, cache):
        c = self.cfg
        n = x.shape[0]
        H, Hkv, hd = c["n_head"], c["n_head_kv"], c["head_dim"]
        p = "blk.%d." % layer
        q = self._linear(x, p + "attn_q").view(n, H, hd)
        k = self._linear(x, p + "attn_k").view(n, Hkv, hd)
        v = self._linear(x, p + "attn_v").view(n, Hkv, hd)
        positions = torch.arange(start_pos, start_pos + n)
        q = self._rope(q, positions, self.theta, c["n_rot"])
        k = self._rope(k, positions, self.theta, c["n_rot"])
        if cache is not None:
            if layer in cache:
                pk, pv = cache[layer]
                k = torch.cat([pk, k], dim=0)
                v = torch.cat([pv, v], dim=0)
            cache[layer] = (k, v)
        n_keys = k.shape[0]
        assert n_keys == start_pos + n, "KV cache / start_pos mismatch"
        group = H // Hkv
        k = k.repeat_interleave(group, dim=1)                                 # [n_keys, H, hd]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)          # [H, n, n_keys]
        qpos = torch.arange(start_pos, start_pos + n)[:, None]
        kpos = torch.arange(n_keys)[None, :]
        scores = scores.masked_fill((kpos > qpos)[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, H * hd)
        return self._linear(out, p + "attn_output")

    def _ffn(self, layer, x):
        p = "blk.%d." % layer
        gate = self._linear(x, p + "ffn_gate")
        up = self._linear(x, p + "ffn_up")
        if self.ffn_thresholds is not None:
            return self._linear(self.ffn_sparsify(layer, torch.nn.functional.silu(gate)) * up, p + "ffn_down")
        return self._linear(torch.nn.functional.silu(gate) * up, p + "ffn_down")

    def ffn_sparsify(self, layer, a):
        """a = act(gate) [n, n_ff] of `layer` -> a with every inactive neuron zeroed. Neuron j is
        active for a token when |a_j| > thr[layer] (strictly); thr 0 keeps every neuron."""
        return sparsify(a, self.ffn_thresholds[layer])

    @torch.no_grad()
    def forward(self, ids, start_pos=0, cache=None):
        """ids: sequence of token ids -> logits [len(ids), n_vocab] (float64).
        With `cache` (a dict, initially empty) the ids continue a sequence at `start_pos`."""
        c = self.cfg
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c["n_vocab"]):
            raise ValueError("token id out of range")
        x = self.w["token_embd.weight"][ids]
        for layer in range(c["n_layer"]):
            p = "blk.%d." % layer
            h = x + self._attention(layer, rms_norm(x, self.w[p + "attn_norm.weight"], c["eps"]),
                                    start_pos, cache)
            x = h + self._ffn(layer, rms_norm(h, self.w[p + "ffn_norm.weight"], c["eps"]))
        x = rms_norm(x, self.w["output_norm.weight"], c["eps"])
        return self._act(x, "output") @ self.w["output.weight"].T

    def greedy(self, prompt_ids, n, return_logits=False, stop=None):
        return greedy_decode(self, prompt_ids, n, return_logits, stop)


@torch.no_grad()
def greedy_decode(model, prompt_ids, n, return_logits=False, stop=None):
    """n new token ids of model.forward(ids, start_pos, cache), argmax each step with a KV cache; stops
    early only at `stop` (included). With return_logits, also the logit rows each token was chosen from."""
    cache = {}
    prompt_ids = list(prompt_ids)
    logits = model.forward(prompt_ids, 0, cache)[-1]
    pos = len(prompt_ids)
    out, rows = [], []
    for _ in range(n):
        t = int(torch.argmax(logits))
        out.append(t)
        rows.append(logits)
        if stop is not None and t == stop:
            break
        logits = model.forward([t], pos, cache)[-1]
        pos += 1
    return (out, rows) if return_logits else out


# ----------------------------------------------------------------------------- tokenizer helpers

def load_llama2c_vocab(path):
    """llama2.c tokenizer.bin: int32 max_len, then per token float32 score, int32 len, bytes."""
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 4
    pieces = []
    while pos < len(data):
        _score, n = struct.unpack("<fi", data[pos:pos + 8])
        pos += 8
        pieces.append(data[pos:pos + n])
        pos += n
    return pieces


def decode_llama2c(pieces, ids, prev=None):
    """Concatenate pieces as llama2.c's run.c does (byte tokens <0xXX> become raw bytes;
    a leading space is dropped right after BOS)."""
    out = b""
    for t in ids:
        piece = pieces[t]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out += piece
        prev = t
    return out.decode("utf-8", errors="replace")


def decode_gguf_tokens(tokens, ids):
    """SentencePiece pieces from GGUF tokenizer.ggml.tokens: U+2581 is a space."""
    out = b""
    for t in ids:
        piece = tokens[t]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out += bytes([int(piece[3:5], 16)])
        else:
            out += piece.replace("\u2581", " ").encode("utf-8")
    return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="float64 reference forward / greedy of a Llama GGUF or llama2.c model")
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--greedy", type=int, default=0, help="print N greedy ids as JSON")
    ap.add_argument("-o", help="write float32 logits [n_ids, n_vocab] here")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg, w = load_model(a.model)
    m = LlamaRef(cfg, w)
    ids = [int(s) for s in a.ids.split(",") if s]
    if a.greedy:
        import json
        print(json.dumps(m.greedy(ids, a.greedy)))
    if a.o:
        m.forward(ids).to(torch.float32).numpy().astype("<f4").tofile(a.o)


if __name__ == "__main__":
    main()
