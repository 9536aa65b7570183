#!/usr/bin/env python3
"""End-to-end test of multi-turn prompt reuse in `larder serve` (src/server/prompt_cache.h).

Each turn resends the conversation; the server must reuse the token ids of the previous
turn's prompt and reply (not a re-tokenization of the reply's text, which can differ from
what was generated), so the KV blocks of both are prefix-cache hits. On stories260K:

1. Completions continued by the client (sampled at temperature 1.5, so replies often use
   non-canonical splits that a re-tokenization would not reproduce).
2. Chat over 4 turns (the built-in ChatML template: stories260K has none), sampled, non-streaming.
3. Chat over 4 turns, greedy, streaming: each next turn is sent as soon as [DONE] arrives.

Every turn must get usage.prompt_tokens_details.cached_tokens >= the previous turn's
prompt + completion tokens minus one KV block (16), the last generated token (never
computed) and up to 3 tokens the cut may step back at the end of the reply. (A chat reply
whose first token has no leading space may not be reusable where a template writes a space before the
reply that the model never saw; then only the previous prompt must be.)

Environment: LARDER_BIN, LARDER_SHARED (default ../shared). Exit 77 when the model is missing.
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_server_test as base  # noqa: E402
from e2e_server_test import BIN, MODEL, Server, open_stream, read_events, req  # noqa: E402

BLOCK = 16
SLACK = BLOCK + 1 + 3
T_START = base.T_START
log, check = base.log, base.check  # one pass/fail tally (base.passed, base.failures)


def post(port, path, body):
    st, _, data = req(port, "POST", path, body, timeout=60)
    if st != 200:
        raise RuntimeError(f"{path}: {st} {data[:300]!r}")
    return json.loads(data)


def cached(usage):
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def completions(port):
    log("completions continued by the client (temperature 1.5)")
    for seed in range(6):
        p = "Once upon a time"
        r = post(port, "/v1/completions", {"prompt": p, "max_tokens": 100, "temperature": 1.5, "seed": seed})
        u = r["usage"]
        prev_total = u["prompt_tokens"] + u["completion_tokens"]
        text = r["choices"][0]["text"]
        r2 = post(port, "/v1/completions", {"prompt": p + text + " The end.", "max_tokens": 1, "temperature": 0})
        got = cached(r2["usage"])
        check(got >= prev_total - SLACK,
              f"completions seed {seed}: cached {got}, previous prompt + completion {prev_total} ({text[:60]!r})")


def chat_sampled(port):
    log("chat, 4 turns, sampled")
    msgs = [{"role": "system", "content": "You tell stories."}]
    prev_prompt = prev_total = 0
    for t in range(4):
        msgs.append({"role": "user", "content": f"Tell me about the cat number {t}."})
        r = post(port, "/v1/chat/completions", {"messages": msgs, "max_tokens": 40, "temperature": 1.2,
                                                "seed": 100 + t, "logprobs": True})
        u = r["usage"]
        got = cached(u)
        if t > 0:
            want = prev_total if first_space else prev_prompt
            log(f"  turn {t}: cached {got}, previous total {prev_total}, first space {first_space}")
            check(got >= want - SLACK, f"chat turn {t}: cached {got}, want >= {want} - {SLACK} "
                                       f"(reply started with a space: {first_space})")
        content = r["choices"][0]["message"]["content"]
        lp = r["choices"][0]["logprobs"]["content"]
        first_space = bool(lp) and bool(lp[0]["bytes"]) and lp[0]["bytes"][0] == 32
        prev_prompt, prev_total = u["prompt_tokens"], u["prompt_tokens"] + u["completion_tokens"]
        msgs.append({"role": "assistant", "content": content})


def chat_streaming(port):
    log("chat, 4 turns, streaming back to back")
    msgs = [{"role": "system", "content": "You tell stories."}]
    prev_total = 0
    for t in range(4):
        msgs.append({"role": "user", "content": f"What did the dog do on day {t}?"})
        c, resp = open_stream(port, "/v1/chat/completions",
                              {"messages": msgs, "max_tokens": 40, "temperature": 0, "stream": True,
                               "stream_options": {"include_usage": True}})
        text, usage = "", None
        for ev in read_events(resp):
            if ev == b"[DONE]":
                break
            j = json.loads(ev)
            if j.get("usage"):
                usage = j["usage"]
            for ch in j.get("choices") or []:
                text += (ch.get("delta") or {}).get("content") or ""
        c.close()
        if not check(usage is not None, f"streaming turn {t}: no usage chunk"):
            return
        got = cached(usage)
        if t > 0:
            check(got >= prev_total - SLACK, f"streaming turn {t}: cached {got}, previous total {prev_total}")
        prev_total = usage["prompt_tokens"] + usage["completion_tokens"]
        msgs.append({"role": "assistant", "content": text})


def main():
    if not os.path.exists(MODEL):
        print(f"skipped: {MODEL} missing (set LARDER_SHARED)")
        return 77
    if not os.access(BIN, os.X_OK):
        print(f"larder binary not found: {BIN} (set LARDER_BIN)")
        return 1
    srv = Server(["-m", MODEL, "-c", "512", "--parallel", "2", "-t", "2"], "stories260K")
    try:
        srv.wait_ready()
        completions(srv.port)
        chat_sampled(srv.port)
        chat_streaming(srv.port)
        srv.proc.send_signal(signal.SIGTERM)
        check(srv.proc.wait(timeout=30) == 0, "server exits 0 on SIGTERM")
    except Exception as e:  # a crash of the test itself is a failure, with the server's log
        import traceback
        traceback.print_exc()
        base.failures.append(f"exception: {e!r}")
        print(f"--- server stderr ---\n{''.join(srv.lines)[-3000:]}")
    finally:
        srv.kill()
    log(f"done in {time.time() - T_START:.1f}s")
    for f in base.failures:
        print("FAILED: " + f)
    print(f"{base.passed} passed, {len(base.failures)} failed")
    return 0 if not base.failures else 1


if __name__ == "__main__":
    sys.exit(main())
