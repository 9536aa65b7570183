#!/usr/bin/env python3
"""Speculative decoding in `larder serve` under load (docs/BENCHMARKS.md, "Speculative decoding"):
throughput (completion tokens per second, all clients together) and mean per-request decode speed, with
C concurrent clients, for the server without speculation and with each drafter, interleaved by round.

  spec_serve_bench.py [--model M] [--clients 1,4,16] [--requests 32] [--specs ngram,suffix] [--rounds 2]
                      [-n 128] [--threads 2] [--parallel 16] [--temp 0]

Prompts: bench/spec_bench.py's categories (chat template applied by the server). Larder's commands are
printed.
"""
import argparse
import concurrent.futures
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import pdlib  # noqa: E402
import spec_bench  # noqa: E402


def messages():
    out = []
    for cat, text in spec_bench.prompts():
        # Back from ChatML to messages: the server applies the model's own template.
        body = text.split("<|im_start|>user\n", 1)[1]
        turns = []
        for part in ("<|im_start|>user\n" + body).split("<|im_end|>\n"):
            if part.startswith("<|im_start|>"):
                role, content = part[len("<|im_start|>"):].split("\n", 1)
                if role in ("user", "assistant") and content:
                    turns.append({"role": role, "content": content})
        out.append((cat, turns))
    return out


def load(p, msgs, clients, requests, n, temp):
    def one(i):
        cat, m = msgs[i % len(msgs)]
        body = {"messages": m, "max_tokens": n, "temperature": temp, "seed": i}
        t0 = time.time()
        st, _, data = pdlib.req(p.host, p.port, "POST", "/v1/chat/completions", body, timeout=900)
        j = json.loads(data)
        return st, j.get("usage", {}).get("completion_tokens", 0), time.time() - t0
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(one, range(requests)))
    wall = time.time() - t0
    bad = [r for r in res if r[0] != 200]
    toks = sum(r[1] for r in res)
    return {"tok_s": toks / wall, "per_req_tok_s": sum(r[1] / r[2] for r in res) / len(res), "errors": len(bad),
            "tokens": toks, "wall": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--specs", default="ngram,suffix")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--parallel", default="16")
    ap.add_argument("--temp", type=float, default=0)
    a = ap.parse_args()
    model = a.model or pdlib.model_path("smollm2")
    msgs = messages()
    configs = [("none", [])] + [(s, ["--spec", s]) for s in a.specs.split(",")]
    results = {}
    for rnd in range(a.rounds):
        for name, flags in configs:
            args = ["--parallel", a.parallel] + flags
            print("$ larder serve -m %s -t %s %s" % (model, a.threads, " ".join(args)), file=sys.stderr, flush=True)
            p = pdlib.serve(model, args, name, threads=a.threads)
            try:
                load(p, msgs, 4, 4, 16, a.temp)  # warm-up
                for c in [int(x) for x in a.clients.split(",")]:
                    r = load(p, msgs, c, max(c, a.requests if c > 1 else 8), a.n, a.temp)
                    results.setdefault((name, c), []).append(r)
                    print("round %d %-8s clients %2d: %.1f tok/s total, %.1f tok/s per request, %d errors" % (
                        rnd, name, c, r["tok_s"], r["per_req_tok_s"], r["errors"]), file=sys.stderr, flush=True)
                m = pdlib.metrics(p)
                acc = sum(v for k, v in m.items() if k.startswith("larder_spec_accepted_tokens_total"))
                prop = sum(v for k, v in m.items() if k.startswith("larder_spec_proposed_tokens_total"))
                results.setdefault((name, "spec"), []).append((prop, acc))
            finally:
                p.kill()
    clients = [int(x) for x in a.clients.split(",")]
    print("| clients | " + " | ".join("%s tok/s (per request)" % n for n, _ in configs) + " | " +
          " | ".join("%s / plain" % n for n, _ in configs[1:]) + " |")
    print("| ---: |" + " ---: |" * (2 * len(configs) - 1))
    for c in clients:
        mean = {n: sum(r["tok_s"] for r in results[(n, c)]) / len(results[(n, c)]) for n, _ in configs}
        per = {n: sum(r["per_req_tok_s"] for r in results[(n, c)]) / len(results[(n, c)]) for n, _ in configs}
        print("| %d | " % c + " | ".join("%.1f (%.1f)" % (mean[n], per[n]) for n, _ in configs) + " | " +
              " | ".join("%.2fx" % (mean[n] / mean["none"]) for n, _ in configs[1:]) + " |")
    for n, _ in configs[1:]:
        prop = sum(x[0] for x in results[(n, "spec")])
        acc = sum(x[1] for x in results[(n, "spec")])
        print("%s: %d draft tokens verified, %d accepted (%.0f%%)" % (n, prop, acc, 100.0 * acc / max(1, prop)))


if __name__ == "__main__":
    main()
