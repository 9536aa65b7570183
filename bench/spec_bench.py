#!/usr/bin/env python3
"""Speculative decoding, Spec-Bench style (docs/BENCHMARKS.md, "Speculative decoding").

  spec_bench.py [--model M] [--threads 2] [-n 128] [--reps 2] [--temps 0,0.7]
                [--specs ngram,suffix,self:skip=8-21] [--tree] [--spec-max 8]
                [--llama-bin DIR] [--replay-model FILE] [--out DIR]

Categories (prompts built here from ../shared's TinyStories text and this repository's own source, in the
model's chat template): multi-turn chat, summarisation and copy with edits (a document, then "summarise" or
"repeat it with edits"), code editing, question answering on a given text, translation-like rewriting. For each
temperature: `larder bench --spec-prompts` (every drafter and plain decoding interleaved per prompt and
repetition; greedy outputs are checked identical) -> per category mean accepted tokens per pass, tokens/s
and the speed-up over plain decoding.

--llama-bin: the same prompts through llama.cpp's n-gram lookup example (`llama-lookup`, built outside
this repository), with its own plain decoding (`--draft-max 0`, the same loop) as its baseline, greedy only.

--replay-model: the cost side on a bigger shape (random weights, e.g. `larder synth --shape llama-3.2-1b`):
`larder bench --spec-replay` times the passes the real model's runs recorded (their accepted lengths), so
the speed-ups are what the same acceptance would give on that shape. Random weights never decide
acceptance here.

Larder's commands are printed; nothing here builds or fetches a peer.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("LARDER_SHARED") or os.path.join(REPO, "..", "shared")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def larder():
    b = os.environ.get("LARDER_BIN") or os.path.join(REPO, "build", "bin", "larder")
    if not os.path.exists(b):
        sys.exit("no larder binary (set LARDER_BIN or build into build/)")
    return b


def chatml(turns):
    out = "<|im_start|>system\n%s<|im_end|>\n" % SYSTEM
    for role, text in turns:
        out += "<|im_start|>%s\n%s<|im_end|>\n" % (role, text)
    return out + "<|im_start|>assistant\n"


def prompts():
    with open(os.path.join(SHARED, "text", "tinystories-samples.txt"), encoding="utf-8") as f:
        text = f.read()
    docs = [text[i:i + 700] for i in (0, 900, 1800)]
    code = []
    for rel in ("src/spec/draft.h", "src/core/result.h", "src/engine/sampler.h"):
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            code.append(f.read()[:1200])
    p = []
    for i, d in enumerate(docs):
        p.append(("summarisation", chatml([("user", d + "\n\nSummarise the story above in three sentences.")])))
        p.append(("copy with edits", chatml([("user", "Repeat the following story, but call the main character "
                                              "Anna:\n\n" + d)])))
        p.append(("QA on a text", chatml([("user", d + "\n\nWho are the characters in this story, and what happens "
                                           "to each of them? Quote the story where you can.")])))
        p.append(("rewriting", chatml([("user", "Rewrite this text in the present tense:\n\n" + d)])))
    for c in code:
        p.append(("code editing", chatml([("user", "Here is some C++ code:\n\n" + c + "\n\nAdd a short comment above "
                                           "every function and output the whole code.")])))
    chats = [
        [("user", "What are three good habits for staying healthy?"),
         ("assistant", "1. Sleep seven to nine hours a night.\n2. Eat plenty of vegetables.\n3. Walk every day."),
         ("user", "Explain the second habit in more detail, and repeat the full list at the end.")],
        [("user", "Give me a recipe for pancakes."),
         ("assistant", "Mix 1 cup flour, 1 egg, 1 cup milk and a pinch of salt; cook on a hot pan."),
         ("user", "Now write the recipe again for a double batch.")],
        [("user", "Write a haiku about the sea."),
         ("assistant", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."),
         ("user", "Write two more in the same style.")],
    ]
    for t in chats:
        p.append(("multi-turn chat", chatml(t)))
    return p


def run(cmd, **kw):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def table(runs, specs):
    cells = {}
    for r in runs:
        c = cells.setdefault(r["category"], {}).setdefault(r["spec"], {"tok": 0, "s": 0.0, "acc": 0, "passes": 0})
        c["tok"] += r["tokens"]
        c["s"] += r["seconds"]
        c["acc"] += r["accepted"]
        c["passes"] += len(r["trace"]) if r["spec"] != "none" else r["tokens"]
    head = "| category | plain tok/s |" + "".join(" %s: accepted/pass, tok/s, speed-up |" % s for s in specs)
    lines = [head, "| --- | ---: |" + " ---: |" * len(specs)]
    ratios = {s: [] for s in specs}
    for cat in sorted(cells):
        base = cells[cat]["none"]
        b = base["tok"] / base["s"]
        row = "| %s | %.1f |" % (cat, b)
        for s in specs:
            c = cells[cat][s]
            t = c["tok"] / c["s"]
            ratios[s].append(t / b)
            row += " %.2f, %.1f, **%.2fx** |" % (c["acc"] / max(1, c["passes"]), t, t / b)
        lines.append(row)
    lines.append("| mean over categories | |" + "".join(" %.2fx |" % (sum(v) / len(v)) for v in ratios.values()))
    lines.append("| slowest category | |" + "".join(" %.2fx |" % min(v) for v in ratios.values()))
    return "\n".join(lines)


def llama_lookup(bin_dir, model, ps, n, threads, draft_max):
    rows = {}
    exe = os.path.join(bin_dir, "llama-lookup")
    for cat, text in ps:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        res = {}
        for dm in (0, draft_max, 0, draft_max):  # interleaved, two each
            r = run([exe, "-m", model, "-f", f.name, "-n", str(n), "-t", str(threads), "--temp", "0", "-c", "4096",
                     "--draft-max", str(dm), "--draft-min", "0", "-s", "1"])
            out = r.stdout + r.stderr
            m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out)
            acc = re.search(r"n_accept\s+=\s+(\d+)", out)
            drafted = re.search(r"n_drafted\s+=\s+(\d+)", out)
            if not m:
                print(out[-1500:], file=sys.stderr)
                sys.exit("llama-lookup failed")
            e = res.setdefault(dm, {"tok": 0, "s": 0.0, "acc": 0, "drafted": 0})
            e["tok"] += int(m.group(1))
            e["s"] += float(m.group(2))
            e["acc"] += int(acc.group(1)) if acc else 0
            e["drafted"] += int(drafted.group(1)) if drafted else 0
        os.unlink(f.name)
        c = rows.setdefault(cat, {"plain": [0, 0.0], "lookup": [0, 0.0], "acc": 0})
        c["plain"][0] += res[0]["tok"]
        c["plain"][1] += res[0]["s"]
        c["lookup"][0] += res[draft_max]["tok"]
        c["lookup"][1] += res[draft_max]["s"]
        c["acc"] += res[draft_max]["acc"]
    lines = ["| category | llama.cpp plain tok/s | llama-lookup tok/s | speed-up |", "| --- | ---: | ---: | ---: |"]
    ratios = []
    for cat in sorted(rows):
        c = rows[cat]
        p, l = c["plain"][0] / c["plain"][1], c["lookup"][0] / c["lookup"][1]
        ratios.append(l / p)
        lines.append("| %s | %.1f | %.1f | %.2fx |" % (cat, p, l, l / p))
    lines.append("| mean over categories | | | %.2fx |" % (sum(ratios) / len(ratios)))
    return "\n".join(lines), rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--temps", default="0,0.7")
    ap.add_argument("--specs", default="ngram,suffix,self:skip=8-21")
    ap.add_argument("--tree", action="store_true")
    ap.add_argument("--spec-max", type=int, default=8)
    ap.add_argument("--llama-bin", default=None)
    ap.add_argument("--replay-model", default=None)
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="spec_bench_"))
    a = ap.parse_args()
    model = a.model or subprocess.run([os.path.join(REPO, "scripts", "models"), "--path", "smollm2"],
                                      capture_output=True, text=True).stdout.strip()
    ps = prompts()
    os.makedirs(a.out, exist_ok=True)
    pf = os.path.join(a.out, "prompts.jsonl")
    with open(pf, "w", encoding="utf-8") as f:
        for cat, text in ps:
            f.write(json.dumps({"category": cat, "prompt": text}) + "\n")
    specs = a.specs.split(",")
    report = ["model %s, %d threads, %d tokens, %d prompts x %d repetitions, spec-max %d%s" % (
        model, a.threads, a.n, len(ps), a.reps, a.spec_max, ", tree" if a.tree else "")]
    traces = None
    for temp in [float(t) for t in a.temps.split(",")]:
        cmd = [larder(), "bench", "-m", model, "--spec-prompts", pf, "--spec", ",".join(["none"] + specs),
               "-n", str(a.n), "-r", str(a.reps), "-t", str(a.threads), "--temp", str(temp),
               "--spec-max", str(a.spec_max), "-o", "json"] + (["--spec-tree"] if a.tree else [])
        r = run(cmd)
        if r.returncode != 0:
            sys.exit(r.stderr[-2000:])
        j = json.loads(r.stdout)
        jf = os.path.join(a.out, "larder_t%.1f.json" % temp)
        with open(jf, "w") as f:
            json.dump(j, f)
        if temp == 0:
            traces = jf
        report.append("\n### temperature %.1f (`%s`)\n\n%s" % (temp, " ".join(cmd[1:]), table(j["runs"], specs)))
        print(report[-1], flush=True)
    if a.llama_bin:
        t, _ = llama_lookup(a.llama_bin, model, ps, a.n, a.threads, a.spec_max)
        report.append("\n### llama.cpp n-gram lookup, temperature 0\n\n" + t)
        print(report[-1], flush=True)
    if a.replay_model and traces:
        # The first prompt of each category (the bigger shape is ~8x slower per token).
        with open(traces) as f:
            j = json.load(f)
        first = {}
        for r in j["runs"]:
            first.setdefault(r["category"], r["prompt"])
        # Model-free drafters only: a model drafter's own passes would run on the bigger shape too.
        j["runs"] = [r for r in j["runs"] if r["prompt"] == first[r["category"]] and
                     (r["spec"] == "none" or r["spec"].split(":")[0] in ("ngram", "suffix"))]
        traces = os.path.join(a.out, "replay_traces.json")
        with open(traces, "w") as f:
            json.dump(j, f)
        cmd = [larder(), "bench", "-m", a.replay_model, "--spec-replay", traces, "-r", "1", "-t", str(a.threads)]
        r = run(cmd)
        if r.returncode != 0:
            sys.exit(r.stderr[-2000:])
        report.append("\n### cost on %s (random weights; acceptance replayed from the real model at temperature 0)"
                      "\n\n`%s`\n\n%s" % (os.path.basename(a.replay_model), " ".join(cmd[1:]), r.stdout))
        print(report[-1], flush=True)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\nreport: " + os.path.join(a.out, "report.md"), file=sys.stderr)


if __name__ == "__main__":
    main()
