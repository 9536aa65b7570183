"""Independent float64 PyTorch reference of the Gemma 3 text decoder (arch `gemma3` in GGUF).

Written from the published architecture -- Hugging Face transformers' `modeling_gemma3.py`
(Gemma3TextModel / Gemma3Attention / Gemma3MLP / Gemma3RMSNorm, `configuration_gemma3.py`,
`masking_utils.py`) and the Gemma 3 technical report -- not from Larder's C++; it shares no code
with the engine. Weights are read by tests/reference/gguf_reader.py + kquants.py (our own numpy
dequantization), so the reference runs on exactly the values a quantized file stores.

Architecture, per token position (all math float64):
    x = embd[id] * sqrt(n_embd)                 (Gemma3TextScaledWordEmbedding; HF rounds the scale
                                                 to the embedding dtype, in float64 it is just sqrt)
    per layer i:
        x = x + post_attention_norm(attn_i(attn_norm(x)))
        x = x + post_ffw_norm(ffn(ffn_norm(x)))
    logits = output_norm(x) @ embd^T            (tied output; Gemma 3 has NO final logit softcapping:
                                                 final_logit_softcapping = None in Gemma3TextConfig)
RMSNorm: y = x / sqrt(mean(x^2) + eps) * w. HF's Gemma3RMSNorm multiplies by (1 + w); the GGUF
converter (convert_hf_to_gguf.py, Gemma3Model) already added 1 to every norm weight, so the GGUF
weight is used directly. eps = gemma3.attention.layer_norm_rms_epsilon (1e-6), for all norms.
FFN (GeGLU): down(gelu_tanh(gate(x)) * up(x)); gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
(hidden_activation "gelu_pytorch_tanh").
Optional training-free FFN activation sparsity (CATS, Lee et al. 2024; Gemma3Ref(ffn_thresholds=...)):
    per layer a threshold thr; gelu_tanh(gate(x)) entries with |gelu| <= thr are zeroed (thr 0: dense).
Attention: grouped-query (query head h uses kv head h // (n_head / n_head_kv)); q = Wq x, k = Wk x,
v = Wv x; per-head RMSNorm of q with attn_q_norm and of k with attn_k_norm (weights [head_dim], same
eps) BEFORE RoPE; RoPE NeoX layout (HF rotate_half: pairs (x[i], x[i + head_dim/2]), theta_i =
base^(-2i/head_dim)); scores scaled by 1/sqrt(query_pre_attn_scalar); no attention softcapping
(attn_logit_softcapping = None in Gemma 3); softmax; out = Wo concat_heads(P v).
    query_pre_attn_scalar is not stored in GGUF. It is 256 for gemma-3-270m / 1b / 4b / 12b
    (their config.json: query_pre_attn_scalar = head_dim = 256) and hidden_size / num_heads = 168
    for 27b (5376 / 32). llama.cpp derives it the same way (f_attention_scale: 1/sqrt(n_embd/n_head)
    for the 27B type, else 1/sqrt(head_dim)). Here: head_dim, unless the cfg says otherwise
    (`query_pre_attn_scalar` argument / cfg key), and 27B-shaped files (62 layers, width 5376) get 168.
Interleaved local / global layers (sliding_window_pattern = 6, the Gemma 3 report's 5:1):
    layer i is GLOBAL iff (i + 1) % 6 == 0 (HF: layer_types[i] = "sliding_attention" if
    (i + 1) % pattern else "full_attention"); for 18 layers: 5, 11, 17 global.
    global: full causal attention, rope base = gemma3.rope.freq_base (1e6), no rope scaling for
            270M/1B (4B+ use linear scaling x8 on global layers: `rope.scaling.*` keys, honoured
            when present).
    local:  rope base rope_local_base_freq = 10000 (not in GGUF; HF default and every Gemma 3
            config), sliding window W = gemma3.attention.sliding_window (512). Mask convention,
            HF masking_utils.sliding_window_overlay: key kv visible from query q iff
            kv > q - W (and kv <= q, causal) -- i.e. the W keys q-W+1 .. q including q itself.
            (llama.cpp's is_masked_swa: masked iff q - kv >= W: the same set.)
"""

import heapq
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_reader as gr  # noqa: E402
import kquants  # noqa: E402
from act_round import round_input  # noqa: E402
from llama_ref import greedy_decode, sparsify  # noqa: E402

kquants.install()

SLIDING_WINDOW_PATTERN = 6
ROPE_LOCAL_BASE = 10000.0

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                 "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")


# ----------------------------------------------------------------------------- loading

def load_gemma3(path, dtype=torch.float64, query_pre_attn_scalar=None):
    """Returns (cfg, weights, gguf) from a gemma3 GGUF file; weights dequantized, cast to dtype."""
    f = gr.GGUFFile(path)
    arch = f.get("general.architecture")
    if arch != "gemma3":
        raise ValueError("%s: architecture %r, expected gemma3" % (path, arch))

    def key(k, default=None):
        full = "gemma3." + k
        if full in f.metadata:
            return f.metadata[full]
        if default is None:
            raise ValueError("%s: missing metadata key %s" % (path, full))
        return default

    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ValueError("key_length != value_length is not supported")
    n_layer = int(key("block_count"))
    if query_pre_attn_scalar is None:
        query_pre_attn_scalar = n_embd / n_head if (n_layer == 62 and n_embd == 5376) else head_dim
    cfg = {
        "n_embd": n_embd,
        "n_ff": int(key("feed_forward_length")),
        "n_layer": n_layer,
        "n_head": n_head,
        "n_head_kv": int(key("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_base_global": float(key("rope.freq_base", 1e6)),
        "rope_base_local": ROPE_LOCAL_BASE,
        "rope_scale_global": 1.0,
        "sliding_window": int(key("attention.sliding_window")),
        "pattern": SLIDING_WINDOW_PATTERN,
        "query_pre_attn_scalar": float(query_pre_attn_scalar),
        "n_ctx": int(key("context_length")),
    }
    st = f.get("gemma3.rope.scaling.type")
    if st is not None and st != "none":
        if st != "linear":
            raise ValueError("rope scaling %r not supported" % st)
        cfg["rope_scale_global"] = float(f.get("gemma3.rope.scaling.factor", 1.0))
    for k in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = f.get("gemma3." + k)
        if v:
            raise ValueError("%s = %r: Gemma 3 has no softcapping; not supported" % (k, v))
    w = {}
    types = {}
    for name, info in f.tensors.items():
        w[name] = torch.from_numpy(np.array(f.tensor(name), dtype=np.float32)).to(dtype)
        types[name] = info.type_name
    if "output.weight" not in w:
        w["output.weight"] = w["token_embd.weight"]
        cfg["tied"] = True
    else:
        cfg["tied"] = False
    cfg["n_vocab"] = w["token_embd.weight"].shape[0]
    cfg["tensor_types"] = types
    _check_shapes(cfg, w)
    return cfg, w, f


def _check_shapes(cfg, w):
    E, F, V, hd = cfg["n_embd"], cfg["n_ff"], cfg["n_vocab"], cfg["head_dim"]
    qd, kvd = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    want = {"token_embd.weight": (V, E), "output_norm.weight": (E,), "output.weight": (V, E)}
    for i in range(cfg["n_layer"]):
        p = "blk.%d." % i
        want.update({p + "attn_norm.weight": (E,), p + "attn_q.weight": (qd, E), p + "attn_k.weight": (kvd, E),
                     p + "attn_v.weight": (kvd, E), p + "attn_q_norm.weight": (hd,),
                     p + "attn_k_norm.weight": (hd,), p + "attn_output.weight": (E, qd),
                     p + "post_attention_norm.weight": (E,), p + "ffn_norm.weight": (E,),
                     p + "ffn_gate.weight": (F, E), p + "ffn_up.weight": (F, E), p + "ffn_down.weight": (E, F),
                     p + "post_ffw_norm.weight": (E,)})
    for k, s in want.items():
        if k not in w:
            raise ValueError("missing tensor %s" % k)
        if tuple(w[k].shape) != s:
            raise ValueError("tensor %s: shape %s, expected %s" % (k, tuple(w[k].shape), s))
    if cfg["n_head"] % cfg["n_head_kv"]:
        raise ValueError("n_head not a multiple of n_head_kv")


# ----------------------------------------------------------------------------- model

def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def is_global_layer(i, pattern=SLIDING_WINDOW_PATTERN):
    return (i + 1) % pattern == 0


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_neox(x, positions, base, head_dim, scale=1.0):
    """x [n, heads, head_dim]; HF rotate_half layout. Linear scaling divides the positions."""
    theta = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = (positions.to(torch.float64) / scale)[:, None] * theta[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    return x * torch.cos(emb) + _rotate_half(x) * torch.sin(emb)


def attention_mask(qpos, kpos, window):
    """True where the key is VISIBLE. window None = full causal."""
    vis = kpos[None, :] <= qpos[:, None]
    if window is not None:
        vis &= kpos[None, :] > qpos[:, None] - window
    return vis


class Gemma3Ref:
    """Float64 reference forward pass. Weights use GGUF tensor names, PyTorch Linear layout [out, in]."""

    def __init__(self, cfg, weights, act_round=False, ffn_thresholds=None):
        self.cfg = cfg
        self.w = {k: v.to(torch.float64) for k, v in weights.items()}
        self.embed_scale = math.sqrt(cfg["n_embd"])
        # act_round: round the input of every weight product to the 8-bit format an integer-kernel
        # engine uses for that weight's type (act_round.py).
        self.act_round = act_round
        # ffn_thresholds: CATS activation sparsity, one threshold per layer on |gelu_tanh(gate)|; see
        # ffn_sparsify. None (the default): the dense FFN.
        self.ffn_thresholds = None if ffn_thresholds is None else [float(t) for t in ffn_thresholds]
        if self.ffn_thresholds is not None and len(self.ffn_thresholds) != cfg["n_layer"]:
            raise ValueError("ffn_thresholds: %d values for %d layers" % (len(self.ffn_thresholds), cfg["n_layer"]))

    def _act(self, x, name):
        return round_input(self.cfg, x, name) if self.act_round else x

    def _lin(self, x, name):
        return self._act(x, name) @ self.w[name + ".weight"].T

    def _attention(self, layer, x, start_pos, cache):
        c = self.cfg
        n = x.shape[0]
        H, Hkv, hd = c["n_head"], c["n_head_kv"], c["head_dim"]
        p = "blk.%d." % layer
        q = self._lin(x, p + "attn_q").view(n, H, hd)
        k = self._lin(x, p + "attn_k").view(n, Hkv, hd)
        v = self._lin(x, p + "attn_v").view(n, Hkv, hd)
        q = rms_norm(q, self.w[p + "attn_q_norm.weight"], c["eps"])
        k = rms_norm(k, self.w[p + "attn_k_norm.weight"], c["eps"])
        glob = is_global_layer(layer, c["pattern"])
        base = c["rope_base_global"] if glob else c["rope_base_local"]
        scale = c["rope_scale_global"] if glob else 1.0
        positions = torch.arange(start_pos, start_pos + n)
        q = apply_rope_neox(q, positions, base, hd, scale)
        k = apply_rope_neox(k, positions, base, hd, scale)
        if cache is not None:
            if layer in cache:
                pk, pv = cache[layer]
                k = torch.cat([pk, k], dim=0)
                v = torch.cat([pv, v], dim=0)
            cache[layer] = (k, v)
        n_keys = k.shape[0]
        assert n_keys == start_pos + n, "KV cache / start_pos mismatch"
        group = H // Hkv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c["query_pre_attn_scalar"])
        vis = attention_mask(torch.arange(start_pos, start_pos + n), torch.arange(n_keys),
                             None if glob else c["sliding_window"])
        scores = scores.masked_fill(~vis[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, H * hd)
        return self._lin(out, p + "attn_output")

    def _ffn(self, layer, x):
        p = "blk.%d." % layer
        if self.ffn_thresholds is not None:
            a = self.ffn_sparsify(layer, gelu_tanh(self._lin(x, p + "ffn_gate")))
            return self._lin(a * self._lin(x, p + "ffn_up"), p + "ffn_down")
        return self._lin(gelu_tanh(self._lin(x, p + "ffn_gate")) * self._lin(x, p + "ffn_up"), p + "ffn_down")

    def ffn_sparsify(self, layer, a):
        """a = gelu_tanh(gate) [n, n_ff] of `layer` -> a with every inactive neuron zeroed. Neuron j is
        active for a token when |a_j| > thr[layer] (strictly); thr 0 keeps every neuron."""
        return sparsify(a, self.ffn_thresholds[layer])

    @torch.no_grad()
    def forward(self, ids, start_pos=0, cache=None):
        """ids -> logits [len(ids), n_vocab] float64; with `cache` (a dict) continues at start_pos."""
        c = self.cfg
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c["n_vocab"]):
            raise ValueError("token id out of range")
        x = self.w["token_embd.weight"][ids] * self.embed_scale
        eps = c["eps"]
        for layer in range(c["n_layer"]):
            p = "blk.%d." % layer
            a = self._attention(layer, rms_norm(x, self.w[p + "attn_norm.weight"], eps), start_pos, cache)
            x = x + rms_norm(a, self.w[p + "post_attention_norm.weight"], eps)
            f = self._ffn(layer, rms_norm(x, self.w[p + "ffn_norm.weight"], eps))
            x = x + rms_norm(f, self.w[p + "post_ffw_norm.weight"], eps)
        x = rms_norm(x, self.w["output_norm.weight"], eps)
        return self._act(x, "output") @ self.w["output.weight"].T

    def greedy(self, prompt_ids, n, return_logits=False, stop=None):
        return greedy_decode(self, prompt_ids, n, return_logits, stop)


# ----------------------------------------------------------------------------- tokenizer (SentencePiece BPE)

class SpmTokenizer:
    """Gemma's tokenizer from the GGUF vocabulary (tokenizer.ggml.model = "llama": SentencePiece BPE),
    written from SentencePiece's BPE model: user-defined pieces (token_type 4: "\\n", runs of
    newlines / spaces / tabs, html tags) are matched first, longest first, on the raw text (HF's
    added tokens; llama.cpp partitions on them too); every other span has spaces replaced by U+2581
    (no space prefix: tokenizer.ggml.add_space_prefix = false), starts as single characters, and the
    adjacent pair whose concatenation is a vocabulary piece with the HIGHEST score is merged
    repeatedly (leftmost on ties); a character left outside the vocabulary becomes its UTF-8 bytes
    <0xXX> (byte fallback). BOS is prepended when tokenizer.ggml.add_bos_token."""

    def __init__(self, meta):
        self.tokens = meta["tokenizer.ggml.tokens"]
        self.scores = meta["tokenizer.ggml.scores"]
        self.types = meta["tokenizer.ggml.token_type"]
        self.bos = meta.get("tokenizer.ggml.bos_token_id")
        self.eos = meta.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            raise ValueError("add_space_prefix not supported")
        self.index = {}
        for i, t in enumerate(self.tokens):
            if self.types[i] in (1, 4, 6):          # normal, user-defined, byte
                self.index.setdefault(t, i)
        self.user = sorted((t for i, t in enumerate(self.tokens) if self.types[i] == 4 and t),
                           key=len, reverse=True)
        self.user_first = {}
        for t in self.user:
            self.user_first.setdefault(t[0], []).append(t)

    def _bpe(self, text):
        syms = list(text.replace(" ", "\u2581"))
        if not syms:
            return []
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < 0:
                return
            piece = syms[i] + syms[j]
            t = self.index.get(piece)
            if t is not None and self.types[t] == 1:
                heapq.heappush(heap, (-self.scores[t], i, piece))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, piece = heapq.heappop(heap)
            if not alive[i] or nxt[i] < 0 or syms[i] + syms[nxt[i]] != piece:
                continue
            j = nxt[i]
            syms[i] = piece
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        out = []
        i = 0
        while i >= 0:
            t = self.index.get(syms[i])
            if t is not None and self.types[t] in (1, 4):
                out.append(t)
            else:
                for b in syms[i].encode("utf-8"):
                    out.append(self.index["<0x%02X>" % b])
            i = nxt[i]
        return out

    def encode(self, text, add_bos=None):
        ids = [self.bos] if (self.add_bos if add_bos is None else add_bos) and self.bos is not None else []
        start = i = 0
        while i < len(text):
            m = next((u for u in self.user_first.get(text[i], ()) if text.startswith(u, i)), None)
            if m is None:
                i += 1
                continue
            ids += self._bpe(text[start:i])
            ids.append(self.index[m])
            i += len(m)
            start = i
        ids += self._bpe(text[start:])
        return ids

    def decode(self, ids):
        out = b""
        for t in ids:
            piece = self.tokens[t]
            ty = self.types[t]
            if ty == 6:
                out += bytes([int(piece[3:5], 16)])
            elif ty in (1, 4):
                out += piece.replace("\u2581", " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    import argparse
    import json
    ap = argparse.ArgumentParser(description="float64 reference forward / greedy of a Gemma 3 GGUF model")
    ap.add_argument("model")
    ap.add_argument("--ids", help="comma-separated token ids")
    ap.add_argument("--prompt", help="text, tokenized by SpmTokenizer (with BOS)")
    ap.add_argument("--greedy", type=int, default=0, help="print N greedy ids as JSON (and their text)")
    ap.add_argument("-o", help="write float32 logits [n_ids, n_vocab] here")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg, w, f = load_gemma3(a.model)
    m = Gemma3Ref(cfg, w)
    tok = SpmTokenizer(f.metadata)
    ids = [int(s) for s in a.ids.split(",") if s] if a.ids else tok.encode(a.prompt)
    if a.greedy:
        g = m.greedy(ids, a.greedy)
        print(json.dumps(g))
        print(repr(tok.decode(g)))
    if a.o:
        m.forward(ids).to(torch.float32).numpy().astype("<f4").tofile(a.o)


if __name__ == "__main__":
    main()
