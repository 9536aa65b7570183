#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers (larder serve, llama.cpp's llama-server).

Replays streaming requests and reports TTFT / TPOT percentiles, output throughput and the
prefix-cache hit rate. Standard library only.

  loadgen.py --url http://127.0.0.1:8080 --scenario shared-prefix [--requests 16]
  loadgen.py --url http://127.0.0.1:8080 --scenario concurrent [--clients 16 --requests-per-client 4]
  loadgen.py --url http://127.0.0.1:8080 --scenario multiturn [--sessions 4 --turns 8 --turn-tokens 256]
  loadgen.py --url http://127.0.0.1:8080 --scenario chat [--clients 16 --requests-per-client 4]

Scenarios
  shared-prefix  a 1,024-token system prompt + 64-token user turns. Phase "cold": every
                 request has its own system prompt (nothing to reuse); phase "warm": all share
                 one (primed once). TTFT cold vs warm shows what the prefix cache saves.
  concurrent     16 clients at once, each sending requests back to back; output tokens/s.
  multiturn      chat sessions of 8 turns, 256 new tokens per turn; each turn resends the whole
                 conversation. Reports prompt tokens sent vs really new, and (from /metrics)
                 how many the server actually computed.
  chat           16 chat clients at once (/v1/chat/completions), a system prompt + a question
                 each: cold (own system prompts) then warm (one shared system prompt); output
                 tokens/s and TTFT cold vs warm.

Token counts: prompts are built from words; the words-per-token ratio of the server's own
tokenizer is measured first with a probe request (usage.prompt_tokens), so the sizes are
close to the targets. Actual counts are reported.

Cache hits: usage.prompt_tokens_details.cached_tokens when the server reports it (larder,
OpenAI); otherwise usage.prompt_tokens - timings.prompt_n (llama.cpp).
Computed prompt tokens: /metrics larder_prompt_tokens_computed_total, or
llamacpp:prompt_tokens_total (llama-server needs --metrics).
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse

WORDS = ("time little girl named lily she loved to play outside park with her friends one day saw big red ball "
         "under tree ran get it mom smiled at said you can have if share boy tim dog cat bird sun sky green happy "
         "sad went home ate cake slept dreamed about flying over hills river boat fish swim water warm cold "
         "snow rain wind leaf flower garden house door window car road town shop bread milk apple orange").split()


class Client:
    def __init__(self, url, api_key=None, timeout=600):
        u = urllib.parse.urlparse(url)
        if u.scheme != "http":
            raise SystemExit("only http:// URLs are supported")
        self.host, self.port = u.hostname, u.port or 80
        self.base = u.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, path):
        c = self._conn()
        try:
            c.request("GET", self.base + path, headers=self.headers)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, path, body):
        c = self._conn()
        try:
            c.request("POST", self.base + path, body=json.dumps(body), headers=self.headers)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def stream(self, path, body):
        """One streaming request. Returns a dict with ttft, tpot, text, usage figures."""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        c = self._conn()
        t0 = time.perf_counter()
        res = {"ok": False, "ttft": None, "tpot": None, "text": "", "completion_tokens": 0, "prompt_tokens": None,
               "cached_tokens": None, "chunks": 0, "status": None, "error": None}
        try:
            c.request("POST", self.base + path, body=json.dumps(body), headers=self.headers)
            r = c.getresponse()
            res["status"] = r.status
            if r.status != 200:
                res["error"] = r.read()[:300].decode(errors="replace")
                return res
            t_first = t_last = None
            n_chunks = 0
            usage = None
            timings = None
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                ev = json.loads(payload)
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("timings"):
                    timings = ev["timings"]
                for ch in ev.get("choices") or []:
                    piece = ch.get("text")
                    if piece is None:
                        piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if t_first is None:
                            t_first = now
                        t_last = now
                        n_chunks += 1
                        res["text"] += piece
            t_end = time.perf_counter()
            if t_first is None:
                t_first = t_last = t_end
            n_out = usage.get("completion_tokens", n_chunks) if usage else n_chunks
            res.update(ok=True, ttft=t_first - t0, chunks=n_chunks, completion_tokens=n_out, t_total=t_end - t0)
            if n_out > 1:
                res["tpot"] = (t_last - t_first) / (n_out - 1)
            if usage:
                res["prompt_tokens"] = usage.get("prompt_tokens")
                det = usage.get("prompt_tokens_details") or {}
                if det.get("cached_tokens") is not None:
                    res["cached_tokens"] = det["cached_tokens"]
            if res["cached_tokens"] is None and timings and res["prompt_tokens"] is not None and "prompt_n" in timings:
                res["cached_tokens"] = max(0, res["prompt_tokens"] - timings["prompt_n"])
        except (OSError, ValueError, http.client.HTTPException) as e:
            res["error"] = repr(e)
        finally:
            c.close()
        return res

    def metrics(self):
        try:
            st, body = self.get("/metrics")
        except OSError:
            return {}
        if st != 200:
            return {}
        out = {}
        for line in body.decode(errors="replace").splitlines():
            if line and not line.startswith("#"):
                parts = line.rsplit(" ", 1)
                if len(parts) == 2:
                    try:
                        out[parts[0]] = float(parts[1])
                    except ValueError:
                        pass
        return out

    def computed_prompt_tokens(self):
        m = self.metrics()
        for k in ("larder_prompt_tokens_computed_total", "llamacpp:prompt_tokens_total"):
            if k in m:
                return m[k]
        return None


def pct(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summarize(name, results, wall):
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    out_tokens = sum(r["completion_tokens"] for r in ok)
    prompt = sum(r["prompt_tokens"] or 0 for r in ok)
    cached = [r["cached_tokens"] for r in ok if r["cached_tokens"] is not None]
    s = {
        "phase": name,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "ttft_ms": {p: 1000 * pct(ttft, p) for p in (50, 90, 99)},
        "tpot_ms": {p: 1000 * pct(tpot, p) for p in (50, 90, 99)},
        "output_tokens": out_tokens,
        "wall_s": wall,
        "output_tok_per_s": out_tokens / wall if wall > 0 else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": sum(cached) if cached else None,
        "prefix_hit_rate": (sum(cached) / prompt) if cached and prompt else None,
    }
    errs = [r["error"] for r in results if not r["ok"]]
    if errs:
        s["errors"] = errs[:3]
    return s


def print_summary(s):
    f = lambda d: " ".join(f"p{p}={v:8.1f}" for p, v in d.items())
    hit = "n/a" if s["prefix_hit_rate"] is None else f"{100 * s['prefix_hit_rate']:.1f}%"
    print(f"  {s['phase']:<14} n={s['requests']:<4} failed={s['failed']:<3} TTFT ms {f(s['ttft_ms'])} | "
          f"TPOT ms {f(s['tpot_ms'])}")
    if s["phase"].startswith("turn "):  # per-turn rows share the sessions' wall time: no throughput
        print(f"  {'':<14} output {s['output_tokens']} tok; prompt {s['prompt_tokens']} tok, prefix hit {hit}")
    else:
        print(f"  {'':<14} output {s['output_tokens']} tok in {s['wall_s']:.2f} s = {s['output_tok_per_s']:.1f} tok/s; "
              f"prompt {s['prompt_tokens']} tok, prefix hit {hit}")
    for e in s.get("errors", []):
        print(f"  {'':<14} error: {e}")


class Words:
    """Builds texts of about N tokens for the server's tokenizer."""

    def __init__(self, client, path, model, seed):
        self.rng = random.Random(seed)
        for n_words in (200, 20):  # the shorter probe for small contexts
            probe = " ".join(self.rng.choice(WORDS) for _ in range(n_words))
            st, body = client.post(path, self._body(model, probe))
            if st == 200:
                break
        if st != 200:
            raise SystemExit(f"probe request failed: {st} {body[:300]!r}")
        n = json.loads(body)["usage"]["prompt_tokens"]
        self.tok_per_word = max(0.05, n / float(n_words))
        self.path = path

    @staticmethod
    def _body(model, text):
        b = {"max_tokens": 1, "temperature": 0}
        if model:
            b["model"] = model
        b["prompt"] = text
        return b

    def text(self, n_tokens, tag=None):
        n_words = max(1, int(round(n_tokens / self.tok_per_word)))
        words = [self.rng.choice(WORDS) for _ in range(n_words)]
        if tag:
            words[0] = tag
        return " ".join(words)


def served_model(client, given):
    if given:
        return given
    try:
        st, body = client.get("/v1/models")
        if st == 200:
            return json.loads(body)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return None


def gen_body(args, model, **kw):
    b = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.ignore_eos:
        b["ignore_eos"] = True
    if model:
        b["model"] = model
    b.update(kw)
    return b


def run_parallel(fn, jobs, concurrency):
    results = [None] * len(jobs)
    it = iter(enumerate(jobs))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                try:
                    i, job = next(it)
                except StopIteration:
                    return
            results[i] = fn(job)

    threads = [threading.Thread(target=worker) for _ in range(max(1, concurrency))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def scenario_shared_prefix(client, args, model):
    words = Words(client, "/v1/completions", model, args.seed)
    n = args.requests
    turns = [words.text(args.user_tokens, tag=f"q{i}") for i in range(n)]
    nonce = f"s{random.Random().randrange(10**9)}"

    def prompt(system, turn):
        return f"{system}\n\nUser: {turn}\nAssistant:"

    def run(p):
        return client.stream("/v1/completions", gen_body(args, model, prompt=p))

    # Cold: a different system prompt per request.
    cold_jobs = [prompt(words.text(args.system_tokens, tag=f"{nonce}c{i}"), turns[i]) for i in range(n)]
    cold, wall_c = run_parallel(run, cold_jobs, args.concurrency)
    # Warm: one shared system prompt, primed once.
    system = words.text(args.system_tokens, tag=f"{nonce}w")
    run(prompt(system, "hello"))
    warm_jobs = [prompt(system, turns[i]) for i in range(n)]
    warm, wall_w = run_parallel(run, warm_jobs, args.concurrency)
    s_cold, s_warm = summarize("cold", cold, wall_c), summarize("warm", warm, wall_w)
    out = {"scenario": "shared-prefix", "phases": [s_cold, s_warm]}
    if s_cold["ttft_ms"][50] and s_warm["ttft_ms"][50]:
        out["ttft_p50_speedup"] = s_cold["ttft_ms"][50] / s_warm["ttft_ms"][50]
    return out


def scenario_chat(client, args, model):
    """--clients chat clients at once over /v1/chat/completions, each sending --requests-per-client
    questions under a --system-tokens system prompt. Cold: every request its own system prompt;
    warm: one system prompt shared by all (primed once), so only the question is new."""
    words = Words(client, "/v1/completions", model, args.seed)
    nonce = f"s{random.Random().randrange(10**9)}"
    n = args.clients * args.requests_per_client
    questions = [words.text(args.user_tokens, tag=f"q{i}") for i in range(n)]

    def run(msgs):
        return client.stream("/v1/chat/completions", gen_body(args, model, messages=msgs))

    def msgs(system, q):
        return [{"role": "system", "content": system}, {"role": "user", "content": q}]

    cold_jobs = [msgs(words.text(args.system_tokens, tag=f"{nonce}c{i}"), questions[i]) for i in range(n)]
    cold, wall_c = run_parallel(run, cold_jobs, args.clients)
    system = words.text(args.system_tokens, tag=f"{nonce}w")
    run(msgs(system, "hello"))
    warm, wall_w = run_parallel(run, [msgs(system, q) for q in questions], args.clients)
    s_cold, s_warm = summarize("cold", cold, wall_c), summarize("warm", warm, wall_w)
    out = {"scenario": "chat", "clients": args.clients, "phases": [s_cold, s_warm]}
    if s_cold["ttft_ms"][50] and s_warm["ttft_ms"][50]:
        out["ttft_p50_speedup"] = s_cold["ttft_ms"][50] / s_warm["ttft_ms"][50]
    return out


def scenario_concurrent(client, args, model):
    words = Words(client, "/v1/completions", model, args.seed)
    jobs = [words.text(args.prompt_tokens, tag=f"c{i}") for i in range(args.clients * args.requests_per_client)]
    res, wall = run_parallel(lambda p: client.stream("/v1/completions", gen_body(args, model, prompt=p)), jobs,
                             args.clients)
    return {"scenario": "concurrent", "clients": args.clients, "phases": [summarize("concurrent", res, wall)]}


def scenario_multiturn(client, args, model):
    words = Words(client, "/v1/completions", model, args.seed)
    c0 = client.computed_prompt_tokens()
    per_turn = [[] for _ in range(args.turns)]
    sessions = []
    lock = threading.Lock()

    def session(k):
        msgs = [{"role": "system", "content": words.text(args.user_tokens, tag=f"sys{k}")}]
        sent = new = 0
        prev_total = 0
        for t in range(args.turns):
            msgs.append({"role": "user", "content": words.text(args.user_tokens, tag=f"u{k}t{t}")})
            r = client.stream("/v1/chat/completions", gen_body(args, model, messages=msgs, max_tokens=args.turn_tokens))
            with lock:
                per_turn[t].append(r)
            if not r["ok"]:
                break
            p = r["prompt_tokens"] or 0
            sent += p
            new += max(0, p - prev_total)  # tokens not seen in the previous turn's prompt + reply
            prev_total = p + r["completion_tokens"]
            msgs.append({"role": "assistant", "content": r["text"]})
        with lock:
            sessions.append({"prompt_tokens_sent": sent, "prompt_tokens_new": new})

    threads = [threading.Thread(target=session, args=(k,)) for k in range(args.sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    c1 = client.computed_prompt_tokens()
    allr = [r for rs in per_turn for r in rs]
    out = {"scenario": "multiturn", "sessions": args.sessions, "turns": args.turns,
           "phases": [summarize("all turns", allr, wall)] +
                     [summarize(f"turn {t + 1}", rs, wall) for t, rs in enumerate(per_turn) if rs],
           "prompt_tokens_sent": sum(s["prompt_tokens_sent"] for s in sessions),
           "prompt_tokens_new": sum(s["prompt_tokens_new"] for s in sessions),
           "prompt_tokens_computed": (c1 - c0) if c0 is not None and c1 is not None else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--scenario", required=True, choices=["shared-prefix", "concurrent", "multiturn", "chat"])
    ap.add_argument("--model", help="model id (default: the first of /v1/models)")
    ap.add_argument("--api-key")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="stop at end-of-sequence (default: ignore it, so every request generates --max-tokens)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the prompt words")
    ap.add_argument("--concurrency", type=int, default=1, help="shared-prefix: requests in flight at once")
    ap.add_argument("--requests", type=int, default=16, help="shared-prefix: requests per phase")
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16, help="concurrent, chat: clients")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="concurrent: prompt size")
    ap.add_argument("--sessions", type=int, default=4, help="multiturn: concurrent chat sessions")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-tokens", type=int, default=256, help="multiturn: new tokens per assistant turn")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    args = ap.parse_args()

    client = Client(args.url, args.api_key, args.timeout)
    try:
        st, _ = client.get("/health")
    except OSError as e:
        raise SystemExit(f"cannot reach {args.url}: {e}")
    if st != 200:
        raise SystemExit(f"{args.url}/health answered {st}")
    model = served_model(client, args.model)
    fn = {"shared-prefix": scenario_shared_prefix, "concurrent": scenario_concurrent,
          "multiturn": scenario_multiturn, "chat": scenario_chat}[args.scenario]
    out = fn(client, args, model)
    out["url"] = args.url
    out["model"] = model
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.scenario} against {args.url} (model {model})")
    for s in out["phases"]:
        print_summary(s)
    if "ttft_p50_speedup" in out:
        print(f"  TTFT p50 cold / warm = {out['ttft_p50_speedup']:.2f}x")
    if args.scenario == "multiturn":
        comp = out["prompt_tokens_computed"]
        print(f"  prompt tokens: sent {out['prompt_tokens_sent']}, really new {out['prompt_tokens_new']}, "
              f"computed by the server {'n/a (no /metrics)' if comp is None else int(comp)}")
    failed = sum(s["failed"] for s in out["phases"] if not s["phase"].startswith("turn "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
