#!/usr/bin/env python3
"""Per-document KV for RAG prompts through `larder serve` (SmolLM2-135M-Instruct, greedy):

1. "document_mode": "sequential" through the documents API gives the same prompt tokens and the same
   answer as an ordinary request with the same text (completions and chat).
2. Every composing mode (parallel, reposition, blend, link, focus) answers; usage.documents reports the
   document tokens, how many came from stored KV (all of them once stored, in any order and combination)
   and the recomputed tokens; no KV block stays in use afterwards.
3. /v1/documents: POST stores and encodes a text, a request naming it by id reuses every token, GET returns
   it, DELETE forgets it (then 404).
4. SSD tier: a document encoded before a restart is loaded from SSD after it (metrics: tier hits) and gives
   the same answer as a fresh encoding on a server without tiers.
5. Another model (Gemma 3) on the same SSD directory never uses SmolLM2's document KV (it encodes its own).
6. Bad input: unknown id (404, code document_not_found), empty document, documents beyond the context,
   bad mode / options / blend_layers 1, document fields without documents, no question: 400 with a JSON
   error body, and the server still answers afterwards.

Environment: LARDER_BIN. Exit 77 when SmolLM2 is not available (scripts/models).
"""
import json
import os
import shutil
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pdlib  # noqa: E402

FAILS = []


def check(ok, what):
    print("  %-96s %s" % (what, "PASS" if ok else "FAIL"), flush=True)
    if not ok:
        FAILS.append(what)
    return ok


# Segment boundaries fall before a space: the text tokenizes the same whole or in pieces.
DOCS = [
    " The code of Marta-17 is 40931. Marta-17 lives in Varno, a town by the sea with a small harbour and a"
    " lighthouse that was built in the old days.",
    " The code of Jonas-4 is 77215. Jonas-4 works at the library of Orlen, which opens at nine and closes at five"
    " every day except Sunday.",
    " The code of Ilse-9 is 12804. Ilse-9 grows apples and pears in a garden behind her house near the river.",
]
QUESTION = " Question: What is the code of Jonas-4? Answer: The code of Jonas-4 is"


def post(p, path, body, timeout=300):
    st, _, data = pdlib.req(p.host, p.port, "POST", path, body, timeout=timeout)
    try:
        return st, json.loads(data)
    except ValueError:
        return st, {"raw": data.decode(errors="replace")}


def complete(p, extra, n=8):
    body = {"prompt": QUESTION, "max_tokens": n, "temperature": 0, "logprobs": 1}
    body.update(extra)
    return post(p, "/v1/completions", body)


def chat(p, content, extra, n=12):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0}
    body.update(extra)
    return post(p, "/v1/chat/completions", body)


def settled_blocks(p):
    m = {}
    for _ in range(100):
        m = pdlib.metrics(p)
        if m.get("larder_kv_blocks_used", -1) == 0:
            break
    return m.get("larder_kv_blocks_used", -1)


def docs_field(ds):
    return [{"text": d} for d in ds]


def main():
    smol = pdlib.model_path("smollm2")
    if not smol:
        print("SmolLM2 not available (scripts/models): skipped")
        sys.exit(77)
    gemma = pdlib.model_path("gemma3")
    tmp = tempfile.mkdtemp(prefix="larder-docs-")
    procs = []
    try:
        s = pdlib.serve(smol, ["--parallel", "2"], "plain")
        procs.append(s)
        print("1. sequential = an ordinary request", flush=True)
        st, ref = complete(s, {"prompt": "Facts:" + "".join(DOCS) + QUESTION})
        st2, seq = complete(s, {"documents": docs_field(DOCS), "document_mode": "sequential", "document_prefix": "Facts:"})
        check(st == 200 and st2 == 200, "completions answer (%d, %d)" % (st, st2))
        check(ref["usage"]["prompt_tokens"] == seq["usage"]["prompt_tokens"],
              "same prompt tokens (%d, %d)" % (ref["usage"]["prompt_tokens"], seq["usage"]["prompt_tokens"]))
        check(pdlib.tokens_of(ref) == pdlib.tokens_of(seq), "same answer: %r" % seq["choices"][0]["text"])
        check(seq["usage"]["documents"]["tokens"] > 0 and seq["usage"]["documents"]["reused_tokens"] == 0,
              "usage.documents: %s" % json.dumps(seq["usage"]["documents"]))
        st, cref = chat(s, "Facts:" + "".join(DOCS) + QUESTION, {})
        st2, cseq = chat(s, "Facts:" + QUESTION, {"documents": docs_field(DOCS), "document_mode": "sequential"})
        # The documents go at the start of the user message: put the "Facts:" lead-in into the question
        # instead, so compare with the text in that order.
        st3, cref2 = chat(s, "".join(DOCS) + "Facts:" + QUESTION, {})
        check(st == 200 and st2 == 200 and st3 == 200, "chat answers")
        check(cref2["usage"]["prompt_tokens"] == cseq["usage"]["prompt_tokens"] and
              cref2["choices"][0]["message"]["content"] == cseq["choices"][0]["message"]["content"],
              "chat: same prompt tokens and answer: %r" % cseq["choices"][0]["message"]["content"])

        print("2. composing modes", flush=True)
        answers = {}
        # Composing modes store what they encode; sequential does not: the first one encodes them all.
        st, j = complete(s, {"documents": docs_field(DOCS), "document_mode": "reposition", "document_prefix": "Facts:"})
        check(st == 200 and j["usage"]["documents"]["reused_tokens"] == 0, "the first composing request encodes them")
        for mode in ["parallel", "reposition", "blend", "link", "focus"]:
            st, j = complete(s, {"documents": docs_field(DOCS), "document_mode": mode, "document_prefix": "Facts:"})
            ok = check(st == 200 and "documents" in j.get("usage", {}), "%s answers: %r" % (mode, j.get("choices", [{}])[0].get("text")))
            if not ok:
                print(j)
                continue
            u = j["usage"]["documents"]
            answers[mode] = j["choices"][0]["text"]
            check(u["mode"] == mode and u["tokens"] == seq["usage"]["documents"]["tokens"] and u["reused_tokens"] == u["tokens"],
                  "%s: all %d document tokens from stored KV (%s)" % (mode, u["tokens"], json.dumps(u)))
            if mode in ("blend", "link", "focus"):
                check(0 < u["recompute_fraction"] <= 0.5 and u["recomputed_tokens"] > 0,
                      "%s repaired a fraction %.3f" % (mode, u["recompute_fraction"]))
        # Another order and a subset: still every token reused.
        st, j = complete(s, {"documents": docs_field([DOCS[2], DOCS[0]]), "document_mode": "focus", "document_prefix": "Facts:"})
        check(st == 200 and j["usage"]["documents"]["reused_tokens"] == j["usage"]["documents"]["tokens"],
              "another order and combination reuses every document token")
        first = seq["choices"][0]["text"].split(".")[0]
        # Fidelity is measured by bench/docs_fidelity.py; here only that focus keeps sequential's answer on this
        # prompt (deterministic: greedy).
        check(answers.get("focus", "").split(".")[0] == first,
              "focus answers what sequential prefill answers: %r / %r (blend: %r)"
              % (answers.get("focus"), first, answers.get("blend")))
        m = pdlib.metrics(s)
        check(m.get("larder_document_tokens_reused_total", 0) > 0 and m.get("larder_document_requests_total", 0) >= 6,
              "metrics count document requests and reused tokens")
        check(settled_blocks(s) == 0, "no KV block left in use")

        print("3. /v1/documents", flush=True)
        new_doc = " The code of Pieter-2 is 55120. Pieter-2 keeps bees on the hill above the village."
        st, d = post(s, "/v1/documents", {"text": new_doc})
        check(st == 200 and d.get("id", "").startswith("doc-") and d.get("encoded") is True, "POST stores and encodes: %s" % d)
        st, j = chat(s, " What is the code of Pieter-2?", {"documents": [{"id": d["id"]}], "document_mode": "focus"})
        check(st == 200 and j["usage"]["documents"]["reused_tokens"] == d["tokens"],
              "chat by id: encoded ahead for the default chat prefix, every token reused (%s)"
              % json.dumps(j.get("usage", {}).get("documents")))
        st, d2 = post(s, "/v1/documents", {"text": new_doc, "document_prefix": "Facts:"})
        check(st == 200 and d2["id"] == d["id"] and d2["reused_tokens"] == 0, "POST again for another prefix: same id, encoded")
        st, j = complete(s, {"documents": [{"id": d["id"]}], "document_mode": "reposition", "document_prefix": "Facts:",
                             "prompt": " Question: What is the code of Pieter-2? Answer: The code of Pieter-2 is"})
        check(st == 200 and j["usage"]["documents"]["reused_tokens"] == j["usage"]["documents"]["tokens"] == d["tokens"],
              "by id: every token reused (%s)" % json.dumps(j.get("usage", {}).get("documents")))
        st, g, data = pdlib.req(s.host, s.port, "GET", "/v1/documents/" + d["id"])
        check(st == 200 and json.loads(data)["text"] == new_doc, "GET returns the text")
        st, _, data = pdlib.req(s.host, s.port, "DELETE", "/v1/documents/" + d["id"])
        check(st == 200 and json.loads(data).get("deleted") is True, "DELETE forgets it")
        st, j = complete(s, {"documents": [{"id": d["id"]}]})
        check(st == 404 and j.get("error", {}).get("code") == "document_not_found", "then it is unknown: %d %s" % (st, j))

        print("6. bad input", flush=True)
        bad = [
            ({"documents": [{"id": "doc-0000"}]}, 404, "unknown id"),
            ({"documents": [{"text": ""}]}, 400, "empty document"),
            ({"documents": [{"text": "x"}, 5]}, 400, "a document that is not an object"),
            ({"documents": []}, 400, "no documents"),
            ({"documents": docs_field(DOCS), "document_mode": "magic"}, 400, "unknown mode"),
            ({"documents": docs_field(DOCS), "document_options": {"warp": 1}}, 400, "unknown option"),
            ({"documents": docs_field(DOCS), "document_mode": "blend", "document_options": {"blend_layers": 1}}, 400,
             "blend_layers 1"),
            ({"documents": docs_field(DOCS), "document_options": {"blend_ratio": 2}}, 400, "blend_ratio 2"),
            ({"document_mode": "focus"}, 400, "document_mode without documents"),
            ({"documents": docs_field(DOCS), "prompt": ""}, 400, "no question after the documents"),
            ({"documents": docs_field([" word" * 9000])}, 400, "documents beyond the context"),
        ]
        for extra, want, what in bad:
            st, j = complete(s, extra)
            check(st == want and isinstance(j.get("error"), dict) and j["error"].get("message"),
                  "%s: %d %s" % (what, st, (j.get("error") or {}).get("message", j)[:80]))
        st, j = post(s, "/v1/documents", {"text": ""})
        check(st == 400, "POST /v1/documents with an empty text: %d" % st)
        st, j = post(s, "/v1/documents", "not json")
        check(st == 400, "POST /v1/documents with a bad body: %d" % st)
        st, j = complete(s, {"documents": docs_field(DOCS), "document_mode": "focus", "document_prefix": "Facts:"})
        check(st == 200 and j["choices"][0]["text"] == answers.get("focus"), "the server still answers the same")
        check(settled_blocks(s) == 0, "no KV block left in use after bad requests")
        s.kill(signal.SIGTERM)

        print("4. SSD tier across a restart", flush=True)
        disk = os.path.join(tmp, "kv")
        body = {"documents": docs_field(DOCS), "document_mode": "focus", "document_prefix": "Facts:"}
        a = pdlib.serve(smol, ["--parallel", "2", "--kv-disk", disk], "ssd-1")
        procs.append(a)
        st, d = post(a, "/v1/documents", {"text": new_doc, "document_prefix": "Facts:"})
        st1, j1 = complete(a, body)
        check(st == 200 and st1 == 200, "first server answers")
        a.kill(signal.SIGTERM)
        b = pdlib.serve(smol, ["--parallel", "2", "--kv-disk", disk, "--kv-always-load"], "ssd-2")
        procs.append(b)
        st2, j2 = complete(b, body)
        m = pdlib.metrics(b)
        check(st2 == 200 and j2["usage"]["documents"]["reused_tokens"] == j2["usage"]["documents"]["tokens"],
              "after the restart every document token is reused (%s)" % json.dumps(j2.get("usage", {}).get("documents")))
        check(m.get("larder_tier_hit_tokens_total", m.get("larder_kv_tier_hit_tokens_total", 0)) > 0 or
              any(k.startswith("larder_kv_disk_load") and v > 0 for k, v in m.items()),
              "loaded from the SSD tier (metrics)")
        st3, j3 = complete(b, {"documents": [{"id": d["id"]}], "document_mode": "focus", "document_prefix": "Facts:",
                               "prompt": " Question: What is the code of Pieter-2? Answer: The code of Pieter-2 is"})
        check(st3 == 200 and j3["usage"]["documents"]["reused_tokens"] == j3["usage"]["documents"]["tokens"],
              "a document stored by id before the restart: text and KV back (%d)" % st3)
        fresh = pdlib.serve(smol, ["--parallel", "2"], "fresh")
        procs.append(fresh)
        st4, j4 = complete(fresh, body)
        check(st4 == 200 and j4["usage"]["documents"]["reused_tokens"] == 0 and
              pdlib.tokens_of(j4) == pdlib.tokens_of(j2) == pdlib.tokens_of(j1),
              "same answer as a fresh encoding: %r / %r" % (j2["choices"][0]["text"], j4["choices"][0]["text"]))
        fresh.kill(signal.SIGTERM)
        b.kill(signal.SIGTERM)

        if gemma:
            print("5. another model on the same SSD directory", flush=True)
            g = pdlib.serve(gemma, ["--parallel", "2", "--kv-disk", disk], "gemma")
            procs.append(g)
            st, j = complete(g, body)
            check(st == 200 and j["usage"]["documents"]["reused_tokens"] == 0,
                  "Gemma encodes its own KV (reused %s)" % (j.get("usage", {}).get("documents")))
            st, j = complete(g, body)
            check(st == 200 and j["usage"]["documents"]["reused_tokens"] == j["usage"]["documents"]["tokens"],
                  "and reuses that the second time")
            g.kill(signal.SIGTERM)
        else:
            print("  (Gemma 3 not available: the other-model case was not run)")
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if FAILS:
        print("FAILED: %d checks" % len(FAILS))
        for f in FAILS:
            print("  - " + f)
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
