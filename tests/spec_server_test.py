#!/usr/bin/env python3
"""Speculative decoding in `larder serve` on the real models (greedy):

1. Every drafter (prompt lookup, suffix decoding, self-draft by skipped layers), chain and tree, with the
   cost model and with --spec-fixed (drafts on every step): answers identical to a server without
   speculation, for code, chat, summarisation and copy-heavy prompts sent four at a time (speculative
   sequences share batches with each other and with a plain one, "larder": {"spec_max": 0}).
2. Drafts were verified and accepted (larder_spec_* metrics), the accepted-length histogram is consistent,
   and KV blocks in use return to 0 after the rejected drafts and trees.
3. Prefix names stay right: the next chat turn, which reuses the accepted tokens' blocks, answers as the
   plain server does, with cached tokens reported.
4. Per request: "larder": {"spec_max": 0} drafts nothing; a bad value is a 400 naming the field.
5. Sampling (temperature 0.7, seeded) through speculation completes normally (its distribution is checked
   in tests/spec_test.cpp).
6. Gemma 3 (sliding-window layers) with a tree drafter: identical to plain.

Environment: LARDER_BIN, LARDER_SHARED. Exit 77 when SmolLM2 is not available (scripts/models).
"""
import concurrent.futures
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pdlib  # noqa: E402

SHARED = os.environ.get("LARDER_SHARED") or os.path.join(pdlib.REPO, "..", "shared")
FAILS = []


def check(ok, what):
    print("  %-92s %s" % (what, "PASS" if ok else "FAIL"), flush=True)
    if not ok:
        FAILS.append(what)
    return ok


def prompts():
    with open(os.path.join(SHARED, "text", "tinystories-samples.txt"), encoding="utf-8") as f:
        story = f.read()[:900]
    with open(os.path.join(pdlib.REPO, "src", "spec", "draft.h"), encoding="utf-8") as f:
        code = f.read()[-1100:]
    return {
        "copy": [{"role": "user", "content": "Repeat the following text exactly, word for word:\n\n" + story}],
        "summarise": [{"role": "user", "content": story + "\n\nSummarise the story above in three sentences."}],
        "code": [{"role": "user", "content": "Here is some C++ code:\n\n" + code +
                  "\n\nRewrite it with the member `tokens` renamed to `ids`. Output the whole code."}],
        "chat": [{"role": "user", "content": "What are three good habits for staying healthy?"},
                 {"role": "assistant", "content": "Sleep well, eat vegetables and walk every day."},
                 {"role": "user", "content": "Tell me more about the second one."}],
    }


def chat(p, messages, n=96, extra=None):
    body = {"messages": messages, "max_tokens": n, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    body.update(extra or {})
    st, _, data = pdlib.req(p.host, p.port, "POST", "/v1/chat/completions", body, timeout=600)
    return st, json.loads(data)


def answer(j):
    c = j["choices"][0]
    return c["message"]["content"], [t["token"] for t in (c.get("logprobs") or {}).get("content") or []]


def run_all(p, ps, plain_key="chat"):
    """All prompts at once (four concurrent requests; `plain_key` with speculation off)."""
    with concurrent.futures.ThreadPoolExecutor(len(ps)) as ex:
        futs = {k: ex.submit(chat, p, m, 96, {"larder": {"spec_max": 0}} if k == plain_key else None)
                for k, m in ps.items()}
        return {k: f.result() for k, f in futs.items()}


def spec_counts(p, settle=True):
    # A reply can reach the client just before the step that sent it ends and frees its blocks.
    for _ in range(100 if settle else 1):
        m = pdlib.metrics(p)
        if m.get("larder_kv_blocks_used", -1) == 0:
            break
        time.sleep(0.02)
    get = lambda name: sum(v for k, v in m.items() if k.startswith(name + "{"))  # noqa: E731
    return {
        "passes": get("larder_spec_passes_total"),
        "proposed": get("larder_spec_proposed_tokens_total"),
        "accepted": get("larder_spec_accepted_tokens_total"),
        "hist_count": get("larder_spec_accepted_length_count"),
        "hist_sum": get("larder_spec_accepted_length_sum"),
        "used": m.get("larder_kv_blocks_used", -1),
    }


def main():
    smol = pdlib.model_path("smollm2")
    if not smol:
        print("SmolLM2 not available (scripts/models): skipped")
        sys.exit(77)
    gemma = pdlib.model_path("gemma3")
    ps = prompts()
    procs = []
    try:
        base = pdlib.serve(smol, ["--parallel", "4"], "plain")
        procs.append(base)
        ref = run_all(base, ps, plain_key=None)
        for k, (st, j) in ref.items():
            check(st == 200, "plain server answers %s" % k)
        configs = [
            ("ngram", []), ("ngram", ["--spec-fixed"]), ("ngram", ["--spec-tree", "--spec-fixed"]),
            ("suffix", ["--spec-fixed"]), ("suffix", ["--spec-tree", "--spec-fixed"]),
            ("self:skip=8-21", ["--spec-fixed", "--spec-max", "3"]), ("self:skip=8-21", ["--spec-tree", "--spec-fixed"]),
        ]
        for name, flags in configs:
            label = " ".join([name] + flags)
            print("--spec " + label, flush=True)
            s = pdlib.serve(smol, ["--parallel", "4", "--spec", name] + flags, label)
            procs.append(s)
            got = run_all(s, ps)
            for k in ps:
                st, j = got[k]
                ok = st == 200 and answer(j) == answer(ref[k][1])
                if not ok and st == 200:
                    print("    plain: %r\n    spec:  %r" % (answer(ref[k][1])[0][:300], answer(j)[0][:300]))
                check(ok, "%s: %s identical to plain greedy%s" % (label, k, " (spec_max 0)" if k == "chat" else ""))
            c = spec_counts(s)
            fixed = "--spec-fixed" in flags
            check(c["passes"] > 0 and c["accepted"] > 0 if fixed else c["proposed"] >= 0,
                  "%s: drafts verified %d, proposed %d, accepted %d" % (label, c["passes"], c["proposed"], c["accepted"]))
            check(c["hist_count"] == c["passes"] and c["hist_sum"] == c["accepted"],
                  "%s: accepted-length histogram consistent with the counters" % label)
            check(c["used"] == 0, "%s: KV blocks in use back to 0 (%d)" % (label, c["used"]))
            if fixed and not flags.count("--spec-tree") and name == "ngram":
                # The next turn reuses the accepted tokens' blocks; answers as plain does.
                text, _ = answer(got["copy"][1])
                turn2 = ps["copy"] + [{"role": "assistant", "content": text},
                                      {"role": "user", "content": "Now say it in one line."}]
                st1, j1 = chat(base, turn2, 48)
                st2, j2 = chat(s, turn2, 48)
                check(st1 == st2 == 200 and answer(j1) == answer(j2), "%s: next turn identical to plain" % label)
                cached = (j2.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                check(cached > 100, "%s: next turn reuses the answer's blocks (%d cached)" % (label, cached))
                before = spec_counts(s)
                st3, _ = chat(s, ps["copy"], 48, {"larder": {"spec_max": 0}})
                after = spec_counts(s)
                check(st3 == 200 and after["proposed"] == before["proposed"], "%s: spec_max 0 drafts nothing" % label)
                st4, _, data = pdlib.req(s.host, s.port, "POST", "/v1/chat/completions",
                                         {"messages": ps["chat"], "larder": {"spec_max": 99}})
                check(st4 == 400 and b"larder.spec_max" in data, "%s: spec_max 99 is a 400 naming the field" % label)
                st5, j5 = chat(s, ps["summarise"], 64, {"temperature": 0.7, "seed": 11})
                check(st5 == 200 and j5["usage"]["completion_tokens"] > 0, "%s: sampling at 0.7 completes" % label)
            s.kill()
            procs.remove(s)
        if gemma:
            print("gemma 3 (sliding-window layers)", flush=True)
            g0 = pdlib.serve(gemma, ["--parallel", "2"], "gemma-plain")
            procs.append(g0)
            g1 = pdlib.serve(gemma, ["--parallel", "2", "--spec", "ngram", "--spec-tree", "--spec-fixed"], "gemma-spec")
            procs.append(g1)
            story = ps["copy"][0]["content"]
            for what, prompt in [("copy", story + "\n\nThe same text again:\n\n"), ("continue", story[:400])]:
                st1, j1 = pdlib.complete(g0.host, g0.port, prompt, 96)
                st2, j2 = pdlib.complete(g1.host, g1.port, prompt, 96)
                check(st1 == st2 == 200 and pdlib.tokens_of(j1) == pdlib.tokens_of(j2),
                      "gemma 3 %s: ngram tree identical to plain greedy" % what)
            c = spec_counts(g1)
            check(c["accepted"] > 0 and c["used"] == 0,
                  "gemma 3: drafts accepted (%d), KV blocks back to 0" % c["accepted"])
        else:
            print("gemma 3 not available: its case skipped", flush=True)
    finally:
        for p in procs:
            p.kill()
    if FAILS:
        print("FAILED: %d check(s)" % len(FAILS))
        for f in FAILS:
            print("  " + f)
        sys.exit(1)


if __name__ == "__main__":
    main()
