#!/usr/bin/env python3
"""Time to first token of RAG requests through `larder serve`: documents composed from stored KV vs
sequential prefill of the same prompt, with the documents in the engine's memory (DRAM) and, after a
restart, on the SSD tier.

  bench/docs_serve_bench.py [--model GGUF] [--questions 10] [--docs 8] [--doc-tokens 128]
                            [--modes focus,blend,link,reposition,parallel] [--threads 2] [--out R.json]

Each question has its own documents (--docs of about --doc-tokens tokens: templated prose with one
fact each; about docs x doc-tokens document tokens per prompt) and asks for one fact. Phase 1 (server
with --kv-disk DIR): every question's documents are stored ahead (POST /v1/documents), then per
question, interleaved: sequential (plain prefill; the prefix is cached, as in every mode), then each
mode (documents from the pool). Phase 2: the server restarts on the same DIR; per question the
first composed request loads its documents from SSD (cold), the second finds them in the pool.
TTFT is measured by the client: request sent to the first streamed token. Medians are printed
with the ratio to sequential.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import pdlib  # noqa: E402

FILL = ["The market square was rebuilt after the great fire.", "Fishing boats leave the harbour before dawn.",
        "In winter the mountain road is often closed by snow.", "The old bridge has seven stone arches.",
        "Farmers bring apples and cheese to the town every Saturday.", "A small museum keeps maps of the valley.",
        "The river turns brown after the spring rains.", "Children learn to swim in the lake near the mill.",
        "The library opens at nine and closes at five.", "Travellers often stop at the inn by the crossroads."]


def make_docs(rng, n, tokens, tag):
    docs, facts = [], []
    for i in range(n):
        name = "%s-%d" % (tag, i)
        code = rng.randint(10000, 99999)
        sents = [rng.choice(FILL) for _ in range(max(2, tokens // 11))]
        sents.insert(rng.randrange(len(sents)), "The code of %s is %d." % (name, code))
        docs.append(" ".join(sents) + "\n\n")
        facts.append((name, code))
    return docs, facts


def ttft(p, body):
    """Seconds to the first streamed token, and the usage of the request."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    c = http.client.HTTPConnection(p.host, p.port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        j = json.loads(line[6:])
        if j.get("usage"):
            usage = j["usage"]
        ch = j.get("choices") or []
        if first is None and ch and ch[0].get("delta", {}).get("content"):
            first = time.perf_counter() - t0
    c.close()
    if r.status != 200:
        raise RuntimeError("HTTP %d" % r.status)
    return first, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=128)
    ap.add_argument("--modes", default="focus,blend,link,reposition,parallel")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model = a.model or pdlib.model_path("smollm2")
    if not model:
        sys.exit("no model (scripts/models)")
    modes = [m for m in a.modes.split(",") if m]
    rng = random.Random(a.seed)
    qs = []
    for q in range(a.questions):
        docs, facts = make_docs(rng, a.docs, a.doc_tokens, "Q%dP" % q)
        name, code = rng.choice(facts)
        qs.append((docs, "What is the code of %s? Answer with the number." % name, code))
    tmp = tempfile.mkdtemp(prefix="larder-docs-bench-")
    disk = os.path.join(tmp, "kv")
    res = {"dram": {m: [] for m in ["sequential"] + modes}, "ssd": {m: [] for m in modes},
           "ssd_then_pool": {m: [] for m in modes}, "doc_tokens": []}
    flags = ["--parallel", "1", "--kv-disk", disk]
    try:
        s = pdlib.serve(model, flags, "bench-1", threads=a.threads)
        for docs, _, _ in qs:
            for d in docs:
                st, _, _ = pdlib.req(s.host, s.port, "POST", "/v1/documents", {"text": d}, timeout=600)
                assert st == 200, st
        ttft(s, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})  # warm-up, prefix cached
        for docs, question, _ in qs:
            base = {"messages": [{"role": "user", "content": question}], "max_tokens": 4, "temperature": 0,
                    "documents": [{"text": d} for d in docs]}
            t, u = ttft(s, dict(base, document_mode="sequential"))
            res["dram"]["sequential"].append(t)
            res["doc_tokens"].append(u["documents"]["tokens"])
            for m in modes:
                t, u = ttft(s, dict(base, document_mode=m))
                assert u["documents"]["reused_tokens"] == u["documents"]["tokens"], u
                res["dram"][m].append(t)
        s.kill(2)  # SIGINT: clean shutdown, SSD tier flushed
        s.proc.wait(timeout=60)
        for m in modes:
            s = pdlib.serve(model, flags, "bench-2", threads=a.threads)
            ttft(s, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
            for docs, question, _ in qs:
                base = {"messages": [{"role": "user", "content": question}], "max_tokens": 4, "temperature": 0,
                        "documents": [{"text": d} for d in docs], "document_mode": m}
                t, u = ttft(s, base)
                assert u["documents"]["reused_tokens"] == u["documents"]["tokens"], u
                res["ssd"][m].append(t)
                t, u = ttft(s, base)
                res["ssd_then_pool"][m].append(t)
            s.kill(2)
            s.proc.wait(timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seq = statistics.median(res["dram"]["sequential"])
    print("document tokens per prompt: median %d" % statistics.median(res["doc_tokens"]))
    print("%-12s %14s %14s %14s" % ("mode", "DRAM (pool)", "SSD (cold)", "after SSD"))
    print("%-12s %9.3f s     %14s %14s" % ("sequential", seq, "", ""))
    for m in modes:
        d, c, w = (statistics.median(res[k][m]) for k in ("dram", "ssd", "ssd_then_pool"))
        print("%-12s %7.3f s %4.1fx %7.3f s %4.1fx %7.3f s %4.1fx" % (m, d, seq / d, c, seq / c, w, seq / w))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
