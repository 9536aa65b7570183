"""Independent float64 reference of per-document KV reuse ("RAG document reuse") on top of LlamaRef.

Written from the method descriptions (APE: adaptive parallel encoding with temperature T and scale S;
CacheBlend: selective recomputation of high-deviation tokens; link tokens; plain repositioning), not
from Larder's C++. It reuses llama_ref.LlamaRef's weights, projections, RoPE and FFN unchanged and
adds what per-document reuse needs: a KV cache addressed by ENTRY (slot in the composed sequence)
that is decoupled from the RoPE POSITION of that entry, and layer-by-layer passes in which only a
subset of rows is (re)computed.

Composed sequence (entries):  prefix [0, P) | doc 0 | doc 1 | ... | query [P+N, P+N+Q)
  doc i occupies [P+off_i, P+off_i+n_i), off_i = sum of earlier doc lengths, N = sum n_i.
Causality is always by ENTRY index (a row sees entries <= its own), whatever the positions are.

Stored doc KV: each doc encoded ALONE after the prefix (prefix + doc_i, positions 0..P+n_i-1,
ordinary causal attention); per layer its post-RoPE K at positions P..P+n_i-1, its pre-RoPE K
(for re-rotation) and its V.

Modes (see DocsRef.run_mode):
  sequential   ordinary causal prefill of the whole composed sequence.
  parallel     stored doc KV as is (docs overlap at positions P..); query j at P + max n_i + j;
               query rows use APE attention (doc entries with temperature T, merged with the
               non-doc entries through their log-sum-exps, the doc side scaled by S*T).
  reposition   stored doc K re-rotated to its entry's position; query at P+N+j, plain attention.
  repair       reposition, then doc tokens recomputed in context: all of them in layers < F, only
               `recomputed` in layers >= F; each recomputed token overwrites its layer-l K/V before
               layer l's attention. blend / link / focus are repair with different (F, recomputed).
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_ref import LlamaRef, rms_norm  # noqa: E402


# ----------------------------------------------------------------------------- layout

class Layout:
    """Token ids of prefix / docs / query and the entry ranges they occupy in the composed sequence."""

    def __init__(self, prefix, docs, query):
        self.prefix = [int(t) for t in prefix]
        self.docs = [[int(t) for t in d] for d in docs]
        self.query = [int(t) for t in query]
        if not self.prefix:
            raise ValueError("the reference needs a non-empty prefix (APE's non-doc side would be empty)")
        self.P = len(self.prefix)
        self.lens = [len(d) for d in self.docs]
        self.offsets = [sum(self.lens[:i]) for i in range(len(self.docs))]
        self.N = sum(self.lens)
        self.Q = len(self.query)
        self.M = self.P + self.N + self.Q
        self.ids = self.prefix + [t for d in self.docs for t in d] + self.query

    def doc_entries(self, i):
        s = self.P + self.offsets[i]
        return list(range(s, s + self.lens[i]))

    def all_doc_entries(self):
        return list(range(self.P, self.P + self.N))

    def query_entries(self):
        return list(range(self.P + self.N, self.M))

    def doc_mask(self):
        m = torch.zeros(self.M, dtype=torch.bool)
        m[self.P:self.P + self.N] = True
        return m

    def positions(self, parallel):
        """RoPE position of every entry. Parallel: every doc restarts at P, the query follows the
        longest doc. Otherwise entry index == position."""
        if not parallel:
            return list(range(self.M))
        pos = list(range(self.P))
        for n in self.lens:
            pos += list(range(self.P, self.P + n))
        top = self.P + (max(self.lens) if self.lens else 0)
        return pos + list(range(top, top + self.Q))


# ----------------------------------------------------------------------------- KV cache by entry

class EntryCache:
    """Per layer: post-RoPE K, pre-RoPE K, V for M entries, and which entries hold a value. Reading an
    unfilled entry is a bug in the composition, so attention asserts every visible entry is filled."""

    def __init__(self, n_layer, M, n_head_kv, head_dim):
        z = lambda: torch.zeros(M, n_head_kv, head_dim, dtype=torch.float64)  # noqa: E731
        self.k = [z() for _ in range(n_layer)]
        self.k_raw = [z() for _ in range(n_layer)]
        self.v = [z() for _ in range(n_layer)]
        self.filled = [torch.zeros(M, dtype=torch.bool) for _ in range(n_layer)]

    def clone(self):
        c = EntryCache.__new__(EntryCache)
        c.k = [t.clone() for t in self.k]
        c.k_raw = [t.clone() for t in self.k_raw]
        c.v = [t.clone() for t in self.v]
        c.filled = [t.clone() for t in self.filled]
        return c


# ----------------------------------------------------------------------------- attention helpers

def _masked_attention(scores, mask, V):
    """scores [H, n, M], mask [n, M] -> (softmax(scores over mask) @ V [n, H, hd], lse [H, n]).
    A row whose mask is empty gets output 0 and lse -inf (weight 0 in the APE merge)."""
    s = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[..., None])
    return torch.einsum("hqk,khd->qhd", p, V), lse


class DocsRef(LlamaRef):
    """LlamaRef plus per-document KV reuse. All math float64; nothing here is shared with the engine."""

    def __init__(self, cfg, weights, act_round=False):
        super().__init__(cfg, weights, act_round)

    # ------------------------------------------------------------------ building blocks

    def _scale(self):
        # llama_ref's attention uses 1/sqrt(head_dim); stay identical to it.
        return 1.0 / math.sqrt(self.cfg["head_dim"])

    def _new_cache(self, M):
        c = self.cfg
        return EntryCache(c["n_layer"], M, c["n_head_kv"], c["head_dim"])

    def _rotate(self, x, positions):
        return self._rope(x, torch.as_tensor(positions), self.theta, self.cfg["n_rot"])

    def _qkv(self, layer, xn, positions):
        c = self.cfg
        n = xn.shape[0]
        p = "blk.%d." % layer
        q = self._linear(xn, p + "attn_q").view(n, c["n_head"], c["head_dim"])
        k_raw = self._linear(xn, p + "attn_k").view(n, c["n_head_kv"], c["head_dim"])
        v = self._linear(xn, p + "attn_v").view(n, c["n_head_kv"], c["head_dim"])
        return self._rotate(q, positions), k_raw, self._rotate(k_raw, positions), v

    def _attend(self, q, K, V, vis, ape):
        """q [n, H, hd] over K/V [M, Hkv, hd] with visibility vis [n, M].
        ape = None: plain softmax attention. ape = (T, S, doc_mask [M]): APE's merge of the doc and
        non-doc parts (see module docstring)."""
        c = self.cfg
        group = c["n_head"] // c["n_head_kv"]
        K = K.repeat_interleave(group, dim=1)
        V = V.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, K) * self._scale()            # [H, n, M]
        if ape is None:
            out, _ = _masked_attention(scores, vis, V)
        else:
            T, S, doc = ape
            out_o, lse_o = _masked_attention(scores, vis & ~doc[None], V)
            out_d, lse_d = _masked_attention(scores / T, vis & doc[None], V)
            w_o, w_d = lse_o, S * T * lse_d                                      # [H, n]
            m = torch.maximum(w_o, w_d)
            a, b = torch.exp(w_o - m), torch.exp(w_d - m)
            out = ((a / (a + b)).T[..., None] * out_o + (b / (a + b)).T[..., None] * out_d)
        return out.reshape(q.shape[0], -1)

    def run_pass(self, cache, entries, ids, positions, active=None, ape=None):
        """Runs rows (token `ids` at cache `entries`, RoPE `positions`) through every layer.

        In each layer the active rows first WRITE their K/V into that layer's cache, then attend over
        it (row at entry e sees entries <= e), so a row sees the current pass's values of every earlier
        entry recomputed in the same layer and the cache's old values for the rest.
        active(layer) -> bool [n] selects the rows computed in that layer; it must only shrink, since
        a row's input to layer l is its own output of layer l-1. Returns (hidden [n, E], active rows of
        the last layer)."""
        c = self.cfg
        entries = torch.as_tensor(list(entries), dtype=torch.long)
        positions = torch.as_tensor(list(positions), dtype=torch.long)
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        n = entries.numel()
        M = cache.k[0].shape[0]
        x = self.w["token_embd.weight"][ids].clone()
        live = torch.ones(n, dtype=torch.bool)
        for layer in range(c["n_layer"]):
            if active is not None:
                now = torch.as_tensor(active(layer), dtype=torch.bool)
                if bool((now & ~live).any()):
                    raise ValueError("layer %d: a row is active that was not active in the layer before" % layer)
                live = now
            idx = live.nonzero().flatten()
            if idx.numel() == 0:
                continue
            p = "blk.%d." % layer
            xs = x[idx]
            e = entries[idx]
            q, k_raw, k, v = self._qkv(layer, rms_norm(xs, self.w[p + "attn_norm.weight"], c["eps"]),
                                       positions[idx])
            cache.k[layer][e], cache.k_raw[layer][e], cache.v[layer][e] = k, k_raw, v
            cache.filled[layer][e] = True
            vis = torch.arange(M)[None, :] <= e[:, None]
            if bool((vis & ~cache.filled[layer][None]).any()):
                raise AssertionError("layer %d: a row would read an entry that holds no K/V" % layer)
            a = self._attend(q, cache.k[layer], cache.v[layer], vis, ape)
            h = xs + self._linear(a, p + "attn_output")
            x[idx] = h + self._ffn(layer, rms_norm(h, self.w[p + "ffn_norm.weight"], c["eps"]))
        return x, live

    def logits_of(self, x):
        x = rms_norm(x, self.w["output_norm.weight"], self.cfg["eps"])
        return self._act(x, "output") @ self.w["output.weight"].T

    # ------------------------------------------------------------------ stored doc KV

    @torch.no_grad()
    def encode_docs(self, layout):
        """Each doc encoded alone after the prefix. Returns a list of EntryCache (entries 0..P+n_i-1)."""
        out = []
        for d in layout.docs:
            ids = layout.prefix + d
            cache = self._new_cache(len(ids))
            self.run_pass(cache, range(len(ids)), ids, range(len(ids)))
            out.append(cache)
        return out

    def compose(self, layout, stored, reposition, via="raw"):
        """The composed cache with prefix KV and every doc's stored KV at its entries (query entries
        empty). reposition: K rotated to the entry's position, either from the pre-RoPE K ("raw") or by
        rotating the stored post-RoPE K by the position delta ("delta", what an engine that keeps only
        rotated keys does; equal in exact arithmetic because RoPE rotations compose additively)."""
        cache = self._new_cache(layout.M)
        P = layout.P
        for layer in range(self.cfg["n_layer"]):
            src0 = stored[0]
            for t in (("k", "k_raw", "v")):
                getattr(cache, t)[layer][:P] = getattr(src0, t)[layer][:P]
            cache.filled[layer][:P] = True
            for i, src in enumerate(stored):
                dst = layout.doc_entries(i)
                n = len(dst)
                k = src.k[layer][P:P + n]
                if reposition:
                    if via == "raw":
                        k = self._rotate(src.k_raw[layer][P:P + n], dst)
                    elif via == "delta":
                        k = self._rotate(k, [layout.offsets[i]] * n)
                    else:
                        raise ValueError(via)
                cache.k[layer][dst] = k
                cache.k_raw[layer][dst] = src.k_raw[layer][P:P + n]
                cache.v[layer][dst] = src.v[layer][P:P + n]
                cache.filled[layer][dst] = True
        return cache

    def _query(self, layout, cache, positions, ape=None):
        qe = layout.query_entries()
        x, _ = self.run_pass(cache, qe, layout.query, [positions[e] for e in qe], ape=ape)
        return self.logits_of(x)

    # ------------------------------------------------------------------ modes

    @torch.no_grad()
    def sequential(self, layout):
        cache = self._new_cache(layout.M)
        x, _ = self.run_pass(cache, range(layout.M), layout.ids, range(layout.M))
        return self.logits_of(x[layout.P + layout.N:])

    @torch.no_grad()
    def parallel(self, layout, T=1.0, S=1.0, plain=False, stored=None):
        """plain=True: ordinary attention over the same KV (what APE with T=S=1 must reduce to)."""
        stored = stored if stored is not None else self.encode_docs(layout)
        cache = self.compose(layout, stored, reposition=False)
        ape = None if plain else (float(T), float(S), layout.doc_mask())
        return self._query(layout, cache, layout.positions(True), ape)

    @torch.no_grad()
    def reposition(self, layout, via="raw", stored=None):
        stored = stored if stored is not None else self.encode_docs(layout)
        cache = self.compose(layout, stored, reposition=True, via=via)
        return self._query(layout, cache, layout.positions(False))

    @torch.no_grad()
    def repair(self, layout, full_layers, recomputed, stored=None):
        """Query logits after the repair: doc tokens recomputed in context, all of them in layers
        < full_layers, only `recomputed` (doc entries) in the layers after."""
        stored = stored if stored is not None else self.encode_docs(layout)
        cache = self.compose(layout, stored, reposition=True)
        doc = layout.all_doc_entries()
        rec = set(int(e) for e in recomputed)
        if not rec <= set(doc):
            raise ValueError("recomputed entries outside the docs: %s" % sorted(rec - set(doc)))
        sel = torch.tensor([e in rec for e in doc], dtype=torch.bool)
        every = torch.ones(len(doc), dtype=torch.bool)
        self.run_pass(cache, doc, [layout.ids[e] for e in doc], doc,
                      active=lambda layer: every if layer < full_layers else sel)
        return self._query(layout, cache, layout.positions(False))

    @torch.no_grad()
    def deviation(self, layout, layer, stored=None):
        """[N] per doc token: ||k_new - k_repositioned||_2 over all KV heads of `layer`, k_new computed
        in context with every doc token recomputed in layers 0..layer (CacheBlend's KV deviation).
        NOTE: layer 0's K is a function of the token's embedding and position only, so its deviation
        is zero in exact arithmetic: a selection by layer-0 deviation is rounding noise."""
        stored = stored if stored is not None else self.encode_docs(layout)
        cache = self.compose(layout, stored, reposition=True)
        before = cache.k[layer].clone()
        doc = layout.all_doc_entries()
        every = torch.ones(len(doc), dtype=torch.bool)
        none = torch.zeros(len(doc), dtype=torch.bool)
        self.run_pass(cache, doc, [layout.ids[e] for e in doc], doc,
                      active=lambda l: every if l <= layer else none)
        return (cache.k[layer][doc] - before[doc]).reshape(len(doc), -1).norm(dim=-1)

    # ------------------------------------------------------------------ selections

    @staticmethod
    def blend_count(ratio, n_doc_tokens):
        return int(math.floor(ratio * n_doc_tokens + 0.5))       # round half away from zero (C++ round)

    def blend_selection(self, layout, deviation, ratio):
        """Top round(ratio * N) doc entries by deviation, sorted by entry."""
        k = self.blend_count(ratio, layout.N)
        top = torch.argsort(deviation, descending=True, stable=True)[:k]
        return sorted(layout.P + int(i) for i in top)

    @staticmethod
    def link_selection(layout, k):
        """First k tokens of every doc but the first (the junctions a parallel encode never saw)."""
        out = []
        for i in range(1, len(layout.docs)):
            out += layout.doc_entries(i)[:k]
        return out

    # ------------------------------------------------------------------ dispatch

    def run_mode(self, layout, mode, stored=None, **kw):
        """Query logits [Q, n_vocab] of one mode. kw: T, S (parallel), full_layers, recomputed
        (repair; blend / link / focus are repair with the selection given)."""
        if mode == "sequential":
            return self.sequential(layout)
        if mode in ("parallel", "ape"):
            return self.parallel(layout, kw.get("T", 1.0), kw.get("S", 1.0), kw.get("plain", False), stored)
        if mode == "reposition":
            return self.reposition(layout, kw.get("via", "raw"), stored)
        if mode in ("repair", "blend", "link", "focus"):
            return self.repair(layout, kw["full_layers"], kw["recomputed"], stored)
        raise ValueError("unknown mode %r" % mode)
