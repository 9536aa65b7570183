#!/usr/bin/env python3
"""`larder serve` through the official OpenAI Python client (PyPI `openai`, pinned in tests/requirements.txt).

Run by tests/e2e_server_test.py against a server it started; can be run by hand against any server:
  openai_client.py --base-url http://127.0.0.1:PORT/v1 --model ID [--mode completions|chat] [--max-seq N]
                   [--concurrent N] [--api-key KEY] [--only NAME]

--mode completions (stories260K, 128-token context, 16-token KV blocks): every case of
  tests/e2e/openai.test.mjs (the JavaScript client's tests): shapes, streaming, prefix-cache usage,
  logprobs, stop strings, errors, N concurrent streams == sequential greedy.
--mode chat (a real chat model such as SmolLM2-135M-Instruct): the same cases through
  /v1/chat/completions only, with a question whose greedy answer must be sensible.

Prints one line per case ("ok   NAME (1.2s)" or "FAIL NAME: why") and "N passed, M failed";
exit 0 when all passed, 1 when any failed, 77 when the openai package is missing.
"""
import argparse
import concurrent.futures
import json
import random
import re
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
import http.client

try:
    import openai
    from openai import OpenAI
except ImportError as e:  # reported by the caller as a skip, naming what is missing
    print(f"skipped: Python package openai missing ({e}); install tests/requirements.txt "
          "(scripts/test does it in build/venv)")
    sys.exit(77)

BLOCK = 16  # the server's KV block size (tokens)
STORY = (" Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day, she saw a big red ball under a tree and ran to get it. Her mom smiled at her.")

A = None  # parsed arguments
client = None


def nonce():
    """A nonce at the very start keeps a prompt's first KV block unseen by earlier requests."""
    return f"{random.randrange(36 ** 6):06x} {int(time.time() * 1000) % 100000}."


class Fail(AssertionError):
    pass


def ok(cond, msg="check failed"):
    if not cond:
        raise Fail(msg)


def eq(got, want, msg=""):
    if got != want:
        raise Fail(f"{msg + ': ' if msg else ''}got {got!r}, want {want!r}")


def check_usage(u):
    ok(u is not None, "usage missing")
    ok(isinstance(u.prompt_tokens, int), f"prompt_tokens {u.prompt_tokens!r}")
    ok(isinstance(u.completion_tokens, int), f"completion_tokens {u.completion_tokens!r}")
    eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, "total_tokens")
    ok(u.prompt_tokens_details is not None and isinstance(u.prompt_tokens_details.cached_tokens, int),
       f"usage.prompt_tokens_details.cached_tokens missing: {u}")


def _stream(chat, **params):
    """One streaming request through the client; checks every chunk's shape and returns the text."""
    create = client.chat.completions.create if chat else client.completions.create
    obj, prefix = ("chat.completion.chunk", "chatcmpl-") if chat else ("text_completion", "cmpl-")
    stream = create(**params, stream=True, stream_options={"include_usage": True})
    eq(stream.response.headers.get("content-type", "").split(";")[0], "text/event-stream", "stream content-type")
    text, finish, usage, first, chunks, cid = "", None, None, True, 0, None
    for ch in stream:
        chunks += 1
        eq(ch.object, obj, "chunk object")
        ok(ch.id.startswith(prefix), f"chunk id {ch.id!r}")
        cid = cid or ch.id
        eq(ch.id, cid, "one id per stream")
        if ch.usage:
            usage = ch.usage
        if not ch.choices:
            continue
        eq(finish, None, "no text after the finish chunk")
        if chat:
            d = ch.choices[0].delta
            if first:
                eq(d.role, "assistant", "the first chunk carries the role")
                first = False
            text += d.content or ""
        else:
            text += ch.choices[0].text
        if ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    return {"text": text, "finish": finish, "usage": usage, "chunks": chunks}


def stream_completion(**params):
    return _stream(False, **params)


def stream_chat(**params):
    return _stream(True, **params)


def raw_sse(path, body):
    """One streaming request without the client: checks the SSE framing itself; returns the parsed events."""
    u = urllib.parse.urlparse(A.base_url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {A.api_key}"}
        c.request("POST", u.path.rstrip("/") + path, body=json.dumps(body), headers=h)
        r = c.getresponse()
        data = r.read().decode()
        eq(r.status, 200, f"raw stream status ({data[:200]!r})")
        eq((r.getheader("content-type") or "").split(";")[0], "text/event-stream", "content-type")
    finally:
        c.close()
    events = [e for e in data.split("\n\n") if e.strip()]
    ok(data.endswith("\n\n"), f"stream ends with a blank line: {data[-40:]!r}")
    for e in events:
        ok(e.startswith("data: ") and "\n" not in e, f"one `data: ` line per event: {e[:100]!r}")
    eq(events[-1], "data: [DONE]", "the last event")
    eq(sum(1 for e in events if e == "data: [DONE]"), 1, "[DONE] count")
    return [json.loads(e[6:]) for e in events[:-1]]


def metrics():
    url = re.sub(r"/v1/?$", "", A.base_url) + "/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()

    def num(name):
        m = re.search(rf"^{name} (\S+)", text, re.M)
        ok(m, f"/metrics has no {name}")
        return float(m.group(1))

    return {"gen": num("larder_generated_tokens_total"), "steps": num("larder_scheduler_steps_total")}


# A quantized model's logits depend slightly on how its tokens were batched: batches of 8+ tokens multiply
# dequantized weights with f32 activations, smaller ones (one sequence decoding) quantize the activations
# to 8 bits (src/kernels/kernels.h, kGemmMinTokens). So where a real Q4 model is compared across batchings
# (cold vs cached prefix, concurrent vs sequential) the greedy texts must agree up to the first token whose
# two best candidates were within NEAR_TIE nats of each other in the reference (and exactly, if no such
# token comes). A wrong KV block or a mixed-up sequence diverges at a confident token and fails.
NEAR_TIE = 0.5


def same_greedy(got, ref_text, ref_content, what):
    """ref_content: the reference's chat logprobs entries (top_logprobs >= 2). Returns True when equal, False
    when the texts part at a near tie (allowed); raises otherwise."""
    if got == ref_text:
        return True
    pos = 0
    for k, e in enumerate(ref_content):
        if not got.startswith(ref_text[:pos + len(e.token)]):
            top = e.top_logprobs
            gap = top[0].logprob - top[1].logprob if len(top) >= 2 else float("inf")
            ok(gap < NEAR_TIE, f"{what}: {got!r} parts from the reference {ref_text!r} at token {k} ({e.token!r}) "
                               f"where the reference was sure (best two {gap:.3f} nats apart, near tie < {NEAR_TIE})")
            print(f"     {what}: parts from the reference at a near tie, token {k}: "
                  f"{[(t.token, round(t.logprob, 3)) for t in top[:2]]}")
            return False
        pos += len(e.token)
    raise Fail(f"{what}: {got!r} != reference {ref_text!r} (which it extends)")


def expect_api_error(fn, status, code=None):
    try:
        fn()
    except openai.APIStatusError as e:
        eq(e.status_code, status, f"status ({e})")
        if code is not None:
            eq(e.code, code, f"error code ({e})")
        ok(isinstance(e.body, dict) and isinstance(e.body.get("message"), str) and e.body["message"],
           f"OpenAI error body with a message: {e.body!r}")
        return
    raise Fail(f"no error raised, want HTTP {status}")


# --------------------------------------------------------------------------------------
CASES = []


def case(modes):
    def deco(fn):
        CASES.append((fn.__name__, modes, fn))
        return fn
    return deco


@case({"completions", "chat"})
def models_list():
    lst = client.models.list()
    eq([m.id for m in lst.data], [A.model], "model ids")
    eq(lst.data[0].object, "model", "object")
    eq(client.models.retrieve(A.model).id, A.model, "retrieve")


@case({"completions"})
def completions_shape_and_stream():
    params = dict(model=A.model, prompt="Once upon a time", max_tokens=24, temperature=0)
    r = client.completions.create(**params)
    ok(r.id.startswith("cmpl-"), f"id {r.id!r}")
    eq(r.object, "text_completion", "object")
    ok(isinstance(r.created, int), f"created {r.created!r}")
    eq(r.model, A.model, "model")
    eq(len(r.choices), 1, "choices")
    c = r.choices[0]
    eq(c.index, 0, "index")
    ok(isinstance(c.text, str) and len(c.text) > 0, f"text {c.text!r}")
    eq(c.logprobs, None, "logprobs")
    ok(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
    check_usage(r.usage)
    ok(r.usage.completion_tokens <= 24, f"completion_tokens {r.usage.completion_tokens}")
    if c.finish_reason == "length":
        eq(r.usage.completion_tokens, 24, "completion_tokens at finish_reason length")

    s = stream_completion(**params)
    eq(s["text"], c.text, "streamed text")
    eq(s["finish"], c.finish_reason, "streamed finish_reason")
    check_usage(s["usage"])
    eq(s["usage"].completion_tokens, r.usage.completion_tokens, "streamed completion_tokens")
    eq(s["usage"].prompt_tokens, r.usage.prompt_tokens, "streamed prompt_tokens")
    ok(s["chunks"] >= 3, f"{s['chunks']} chunks")

    # Token-id prompts are accepted and equivalent to the text.
    by_ids = client.completions.create(**dict(params, prompt=[1, 403, 407, 261, 378]))
    eq(by_ids.usage.prompt_tokens, 5, "prompt_tokens of a token-id prompt")


@case({"completions", "chat"})
def chat_shape_and_stream():
    if A.mode == "chat":
        msgs = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
        max_tokens = 48
    else:
        msgs = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me about a cat."}]
        max_tokens = 20
    params = dict(model=A.model, messages=msgs, max_completion_tokens=max_tokens, temperature=0)
    r = client.chat.completions.create(**params)
    ok(r.id.startswith("chatcmpl-"), f"id {r.id!r}")
    eq(r.object, "chat.completion", "object")
    ok(isinstance(r.created, int), f"created {r.created!r}")
    eq(r.model, A.model, "model")
    eq(len(r.choices), 1, "choices")
    c = r.choices[0]
    eq(c.index, 0, "index")
    eq(c.message.role, "assistant", "role")
    ok(isinstance(c.message.content, str), f"content {c.message.content!r}")
    eq(c.logprobs, None, "logprobs")
    ok(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
    check_usage(r.usage)
    ok(r.usage.completion_tokens <= max_tokens, f"completion_tokens {r.usage.completion_tokens}")
    if A.mode == "chat":
        answer = c.message.content
        print(f"     answer: {answer!r}")
        # A real instruction-tuned model answers the question and stops by itself (end of turn).
        ok("paris" in answer.lower(), f"sensible answer mentions Paris: {answer!r}")
        eq(c.finish_reason, "stop", "finish_reason (the model ends its turn)")
        ok(r.usage.completion_tokens < max_tokens, "stopped before max_tokens")
        ok("<|im_end|>" not in answer and "<|im_start|>" not in answer, f"no special tokens in the text: {answer!r}")
        ok(r.usage.prompt_tokens > 10, f"prompt_tokens {r.usage.prompt_tokens} (the chat template was applied)")
    s = stream_chat(**params)
    eq(s["text"], c.message.content, "streamed content == non-streaming content")
    eq(s["finish"], c.finish_reason, "streamed finish_reason")
    check_usage(s["usage"])
    eq(s["usage"].completion_tokens, r.usage.completion_tokens, "streamed completion_tokens")
    eq(s["usage"].prompt_tokens, r.usage.prompt_tokens, "streamed prompt_tokens")
    # Content given as text parts is the same message.
    parts = client.chat.completions.create(**dict(params, messages=[
        msgs[0], {"role": "user", "content": [{"type": "text", "text": msgs[1]["content"]}]}]))
    eq(parts.choices[0].message.content, c.message.content, "content as text parts")


@case({"completions", "chat"})
def raw_sse_framing():
    if A.mode == "chat":
        ev = raw_sse("/chat/completions", {"model": A.model, "messages": [{"role": "user", "content": "Hi!"}],
                                           "max_tokens": 6, "temperature": 0, "stream": True,
                                           "stream_options": {"include_usage": True}})
        eq(ev[0]["choices"][0]["delta"].get("role"), "assistant", "first delta role")
    else:
        ev = raw_sse("/completions", {"model": A.model, "prompt": "Once", "max_tokens": 6, "temperature": 0,
                                      "stream": True, "stream_options": {"include_usage": True}})
    ok(len(ev) >= 3, f"{len(ev)} events")
    eq(ev[-1]["choices"], [], "the usage chunk has no choices")
    ok(ev[-1]["usage"]["completion_tokens"] == 6 or
       any(e["choices"] and e["choices"][0].get("finish_reason") == "stop" for e in ev),
       f"6 tokens or a stop: {ev[-1]}")
    for e in ev[:-1]:
        eq(e.get("usage"), None, "usage only in the last chunk")


@case({"completions", "chat"})
def prefix_cache():
    if A.mode == "chat":
        msgs = [{"role": "system", "content": nonce() + " You are a helpful assistant."},
                {"role": "user", "content": "Summarize this story in one sentence:" + STORY}]
        params = dict(model=A.model, messages=msgs, max_tokens=12, temperature=0)
        create, stream, text = client.chat.completions.create, stream_chat, lambda r: r.choices[0].message.content
    else:
        prompt = nonce() + STORY
        params = dict(model=A.model, prompt=prompt, max_tokens=12, temperature=0)
        create, stream, text = client.completions.create, stream_completion, lambda r: r.choices[0].text
    if A.mode == "chat":
        cold = create(**params, logprobs=True, top_logprobs=2)
        same = lambda got, what: same_greedy(got, text(cold), cold.choices[0].logprobs.content, what)
    else:
        cold = create(**params)
        same = lambda got, what: eq(got, text(cold), what)
    L = cold.usage.prompt_tokens
    ok(L > 3 * BLOCK and L + 12 <= A.max_seq, f"prompt has {L} tokens")
    eq(cold.usage.prompt_tokens_details.cached_tokens, 0, "cached_tokens of the cold request")
    ok(text(cold), "non-empty greedy output")
    warm = create(**params)
    eq(warm.usage.prompt_tokens, L, "warm prompt_tokens")
    # Whole blocks strictly before the last prompt token (at least one token is computed).
    want = (L - 1) // BLOCK * BLOCK
    eq(warm.usage.prompt_tokens_details.cached_tokens, want, f"warm cached_tokens ({L} prompt tokens)")
    same(text(warm), "greedy output equal cold vs cached")
    s = stream(**params)
    eq(s["usage"].prompt_tokens_details.cached_tokens, want, "streamed cached_tokens")
    eq(s["text"], text(warm), "streamed text from the cache == non-streaming text from the cache")
    # A prompt sharing the first blocks only: the shared whole blocks are reused.
    if A.mode == "chat":
        shared = create(**dict(params, messages=[msgs[0], {"role": "user", "content": "The dog barked."}]))
    else:
        shared = create(**dict(params, prompt=params["prompt"][:60] + " The dog barked."))
    got = shared.usage.prompt_tokens_details.cached_tokens
    eq(got % BLOCK, 0, f"shared-prefix cached_tokens {got} in whole blocks")
    ok(got < shared.usage.prompt_tokens, f"shared-prefix cached_tokens {got} < {shared.usage.prompt_tokens}")
    if A.mode == "chat":
        ok(got >= BLOCK, f"the shared system prompt is reused: cached_tokens {got}")


@case({"completions"})
def completions_logprobs():
    params = dict(model=A.model, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=3)
    r = client.completions.create(**params)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    eq(r.choices[0].finish_reason, "length", "finish_reason")
    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        eq(len(getattr(lp, k)), n, f"len({k})")
    eq("".join(lp.tokens), r.choices[0].text, "tokens spell the text")
    for i in range(n):
        ok(lp.token_logprobs[i] <= 0, f"token_logprobs[{i}] = {lp.token_logprobs[i]}")
        top = lp.top_logprobs[i]
        ok(1 <= len(top) <= 3, f"top_logprobs[{i}] has {len(top)} entries")
        # Greedy: the chosen token is the most likely one.
        ok(abs(max(top.values()) - lp.token_logprobs[i]) < 1e-4, f"greedy token {i} is the most likely")
        if i > 0:
            eq(lp.text_offset[i], lp.text_offset[i - 1] + len(lp.tokens[i - 1]), f"text_offset[{i}]")
    # Streaming carries the same entries spread over the chunks.
    toks = []
    for ch in client.completions.create(**params, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            toks += ch.choices[0].logprobs.tokens
    eq(toks, lp.tokens, "streamed logprob tokens")


def check_bytes(token, b, what):
    ok(isinstance(b, list) and all(isinstance(x, int) and 0 <= x < 256 for x in b), f"{what}: bytes {b!r}")
    if "\ufffd" not in token:  # a token that is only part of a UTF-8 character is shown as U+FFFD
        eq(b, list(token.encode("utf-8")), f"{what}: bytes of {token!r}")


@case({"completions", "chat"})
def chat_logprobs():
    q = "What is the capital of France?" if A.mode == "chat" else "Hello"
    params = dict(model=A.model, messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0,
                  logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**params)
    content = r.choices[0].logprobs.content
    eq(len(content), r.usage.completion_tokens, "one entry per completion token")
    for i, e in enumerate(content):
        ok(isinstance(e.token, str), f"token {e.token!r}")
        ok(e.logprob <= 0, f"logprob {e.logprob}")
        check_bytes(e.token, e.bytes, f"entry {i}")
        eq(len(e.top_logprobs), 2, f"entry {i} top_logprobs")
        for t in e.top_logprobs:
            ok(isinstance(t.token, str), f"top token {t.token!r}")
            check_bytes(t.token, t.bytes, f"entry {i} top {t.token!r}")
        ok(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob, f"entry {i}: top_logprobs in order")
        # Greedy: the chosen token is the most likely one.
        ok(abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4, f"entry {i}: greedy token is the most likely")
    if A.mode == "chat":
        eq("".join(e.token for e in content), r.choices[0].message.content, "tokens spell the content")
    # Streaming carries the same entries spread over the chunks.
    toks = []
    for ch in client.chat.completions.create(**params, stream=True):
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content:
            toks += [e.token for e in ch.choices[0].logprobs.content]
    eq(toks, [e.token for e in content], "streamed logprob tokens")


@case({"completions", "chat"})
def stop_strings():
    if A.mode == "completions":
        base = dict(model=A.model, prompt="Once upon a time", max_tokens=40, temperature=0)
        full = client.completions.create(**base).choices[0].text
        ok(len(full) > 30, f"long enough: {full!r}")
        stop = full[20:25]
        cut = full.index(stop)
        r = client.completions.create(**base, stop=stop)
        eq(r.choices[0].text, full[:cut], f"text cut at {stop!r}")
        eq(r.choices[0].finish_reason, "stop", "finish_reason")
        ok(r.usage.completion_tokens < 40, f"completion_tokens {r.usage.completion_tokens}")
        s = stream_completion(**base, stop=["@@never@@", stop])
        eq(s["text"], full[:cut], "streamed text cut")
        eq(s["finish"], "stop", "streamed finish_reason")
        # The earliest of several stop strings wins.
        early = full[5:8]
        r2 = client.completions.create(**base, stop=[stop, early])
        eq(r2.choices[0].text, full[:min(full.index(early), cut)], "earliest stop string wins")
    # Chat too.
    q = "Tell me a story about a dragon." if A.mode == "chat" else "Tell me a story."
    cbase = dict(model=A.model, messages=[{"role": "user", "content": q}], max_tokens=30, temperature=0)
    cfull = client.chat.completions.create(**cbase).choices[0].message.content
    if A.mode == "chat":
        ok(len(cfull) > 30, f"long enough: {cfull!r}")
    if len(cfull) > 12:
        cstop = cfull[8:11]
        cr = stream_chat(**cbase, stop=cstop)
        eq(cr["text"], cfull[:cfull.index(cstop)], f"streamed chat text cut at {cstop!r}")
        eq(cr["finish"], "stop", "streamed chat finish_reason")
        nr = client.chat.completions.create(**cbase, stop=[cstop])
        eq(nr.choices[0].message.content, cfull[:cfull.index(cstop)], "chat text cut")
        eq(nr.choices[0].finish_reason, "stop", "chat finish_reason")
    else:
        print(f"     (chat stop strings not checked: the greedy chat answer {cfull!r} is too short)")


@case({"completions", "chat"})
def errors():
    msgs = [{"role": "user", "content": "x"}]
    if A.mode == "completions":
        expect_api_error(lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=2), 404,
                         "model_not_found")
        expect_api_error(lambda: client.completions.create(model=A.model, prompt="x", n=2), 400)
        expect_api_error(lambda: client.completions.create(model=A.model, prompt="x", max_tokens=A.max_seq), 400,
                         "context_length_exceeded")
    else:
        expect_api_error(lambda: client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2),
                         404, "model_not_found")
        expect_api_error(lambda: client.chat.completions.create(model=A.model, messages=msgs, n=2), 400)
        expect_api_error(lambda: client.chat.completions.create(model=A.model, messages=msgs, max_tokens=A.max_seq),
                         400, "context_length_exceeded")
        expect_api_error(lambda: client.chat.completions.create(model=A.model, messages=msgs, stream=True,
                                                                max_tokens=A.max_seq), 400, "context_length_exceeded")
    expect_api_error(lambda: client.chat.completions.create(model=A.model, messages=[]), 400)
    expect_api_error(lambda: client.models.retrieve("no-such-model"), 404, "model_not_found")


@case({"completions", "chat"})
def concurrent_streams():
    n = A.concurrent
    if A.mode == "chat":
        topics = ["a cat", "the sea", "music", "the moon", "bread", "a river", "winter", "a clock"]
        prompts = [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in topics]
        params = lambda p: dict(model=A.model, messages=p, max_tokens=A.concurrent_tokens, temperature=0)
        refs = [client.chat.completions.create(**params(p), logprobs=True, top_logprobs=2) for p in prompts]
        want = [r.choices[0].message.content for r in refs]
        run = lambda p: stream_chat(**params(p))
    else:
        prompts = [f"Once upon a time, there was a {w}" for w in
                   ["cat", "dog", "bird", "girl", "boy", "fish", "tree", "car"]]
        params = lambda p: dict(model=A.model, prompt=p, max_tokens=A.concurrent_tokens, temperature=0)
        want = [client.completions.create(**params(p)).choices[0].text for p in prompts]
        run = lambda p: stream_completion(**params(p))
    ok(all(want), f"sequential greedy texts non-empty: {want}")
    before = metrics()
    start = threading.Barrier(n)  # all clients send together (Python threads would otherwise trickle in)

    def client_run(p):
        start.wait(timeout=60)
        return run(p)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
        got = list(ex.map(client_run, [prompts[i % len(prompts)] for i in range(n)]))
    dt = time.time() - t0
    after = metrics()
    # Batched: many tokens per scheduler step (one at a time would give at most 1 per step).
    per_step = (after["gen"] - before["gen"]) / max(1, after["steps"] - before["steps"])
    exact = 0
    for i, g in enumerate(got):
        j = i % len(prompts)
        if A.mode == "chat":  # a Q4 model: equal up to a near tie (see same_greedy)
            exact += same_greedy(g["text"], want[j], refs[j].choices[0].logprobs.content, f"client {i}")
        else:
            eq(g["text"], want[j], f"client {i} text == sequential greedy")
            exact += 1
        ok(g["finish"] in ("stop", "length"), f"client {i} finish_reason {g['finish']!r}")
        check_usage(g["usage"])
    ok(per_step > 2, f"sequences ran batched: {per_step:.2f} tokens per step")
    print(f"     {n} streams in {dt * 1000:.0f} ms, {per_step:.2f} generated tokens per scheduler step; "
          f"{exact}/{n} texts equal to the sequential ones")


def main():
    global A, client
    ap = argparse.ArgumentParser(description="larder serve through the official OpenAI Python client")
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["completions", "chat"], default="completions")
    ap.add_argument("--max-seq", type=int, default=128, help="the server's context (tokens per request)")
    ap.add_argument("--concurrent", type=int, default=64, help="concurrent streaming clients")
    ap.add_argument("--concurrent-tokens", type=int, default=24, help="max_tokens of each concurrent client")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--only", action="append", help="run only this case (repeatable)")
    A = ap.parse_args()
    client = OpenAI(base_url=A.base_url, api_key=A.api_key, max_retries=0, timeout=60)
    print(f"openai {openai.__version__} (Python) against {A.base_url}, model {A.model}, mode {A.mode}", flush=True)
    n_ok, failed = 0, []
    for name, modes, fn in CASES:
        if A.mode not in modes or (A.only and name not in A.only):
            continue
        t0 = time.time()
        try:
            fn()
            n_ok += 1
            print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # a failed assertion or an unexpected error: this case fails
            failed.append(name)
            tb = traceback.extract_tb(e.__traceback__)
            line = ([f.lineno for f in tb if f.name == name] or [tb[-1].lineno])[-1]
            kind = "" if isinstance(e, Fail) else type(e).__name__ + ": "
            print(f"FAIL {name}: {kind}{e} (openai_client.py line {line})", flush=True)
    print(f"{n_ok} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or n_ok == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
