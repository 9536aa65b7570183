#!/usr/bin/python3
"""Compares `larder tokenize` with the SentencePiece library on the Llama 2 tokenizer.

For a few hundred generated strings (deterministic seed: CJK, emoji, accents, whitespace
runs, digits, code, mixed), `$LARDER_BIN tokenize -m PATH --no-bos --json-batch FILE` must
print exactly SentencePieceProcessor(tokenizer.model).encode(s) for every string, for PATH =
the Llama 2 tokenizer.model, the same vocabulary as llama2.c tokenizer.bin, and
ggml-vocab-llama-spm.gguf; without --no-bos, BOS (id 1) must come first.
Exit status: 0 pass, 1 mismatch, 77 skip (shared data, sentencepiece or binary missing).
"""
import json
import os
import random
import subprocess
import sys
import tempfile

SKIP = 77


def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    src = os.environ.get("LARDER_SOURCE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    return os.path.join(src, "..", "shared")


def skip(msg):
    print("SKIP: " + msg)
    sys.exit(SKIP)


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world", "Once", "upon", "a",
         "time", "tokenizer", "Llama", "don't", "it's", "we'll", "I'm", "they've", "naïve", "café", "Führer",
         "résumé", "piñata", "Ångström", "straße", "ﬁne", "e\u0301", "co-operate", "U.S.A.", "e-mail", "3D", "x86_64"]
UNICODE = ["你好", "世界", "我想在apple工作1314151天～", "日本語のテキスト", "한국어", "Привет, мир", "нещо на Български",
           "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "កាន់តែពិសេសអាច",
           "🦙", "🚀", "😀😁😂", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪🇯🇵", "😶‍🌫️", "✅", "❤️", "™", "©", "€100", "½", "∑∫√∞", "→←↑↓",
           "\u00a0", "\u200b", "\ufeff", "\u3000", "ｆｕｌｌｗｉｄｔｈ", "\u2581", "▁▁x", "\x01", "\x7f", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010FFFD"]
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "if (a && b || !c) { return -1; }", "#include <stdio.h>", "x = [1, 2, 3]  # list", "SELECT * FROM t WHERE id = 42;",
        "<html><body class=\"x\">hi</body></html>", "fn main() { println!(\"{}\", 1); }", "a->b->c", "i++; j--; k **= 2;",
        "    indented\n        more\n", "0x1F 0b1010 1e-9 3.14159 -273.15", "'''triple''' \"\"\"quotes\"\"\"",
        "```python\nprint('hi')\n```", "$HOME/.config && echo $?", "C:\\Windows\\System32", "<s>not special</s>",
        "<0x0A>", "<unk>"]
SPACES = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\t \t", "\n\n\n\n", "        "]


def gen_strings(n=400, seed=20240601):
    rng = random.Random(seed)
    out = ["", " ", "a", "Hello world", " Hello world", "Hello World!", "  leading", "trailing  ", "\n", "\t",
           "3", "33", "333", "3333", "33333333", "1234567890", "...", "!!!!!!", "Once upon a time"]
    out += UNICODE + CODE + SPACES
    pools = [WORDS, UNICODE, CODE, SPACES]
    while len(out) < n:
        kind = rng.randrange(6)
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if kind == 0 or r < 0.4:
                parts.append(rng.choice(WORDS))
                parts.append(rng.choice([" ", " ", " ", ", ", ". ", "\n", "  ", "\t", ""]))
            elif r < 0.6:
                parts.append(rng.choice(UNICODE))
            elif r < 0.75:
                parts.append(rng.choice(SPACES))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
            elif r < 0.95:
                parts.append(rng.choice(CODE))
            else:
                # random code points from a few blocks (no surrogates)
                lo, hi = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
                                     (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF), (0x2000, 0x206F)])
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        s = "".join(parts)
        if kind == 5:
            s = rng.choice(SPACES) + s + rng.choice(SPACES)
        out.append(s)
    # one long string too
    out.append(" ".join(rng.choice(pools[rng.randrange(4)]) for _ in range(2000)))
    return out


def run_larder(binary, model, strings, no_bos):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(strings, f, ensure_ascii=False)
        path = f.name
    try:
        cmd = [binary, "tokenize", "-m", model, "--json-batch", path] + (["--no-bos"] if no_bos else [])
        p = subprocess.run(cmd, capture_output=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (" ".join(cmd), p.returncode,
                                                      p.stderr.decode("utf-8", "replace")[-2000:]))
        res = json.loads(p.stdout.decode("utf-8"))
        if not isinstance(res, list) or len(res) != len(strings):
            raise RuntimeError("expected a JSON array of %d id lists from %s" % (len(strings), " ".join(cmd)))
        return res
    finally:
        os.unlink(path)


def main():
    shared = shared_dir()
    model = os.path.join(shared, "models", "llama2-tokenizer", "tokenizer.model")
    paths = [model, os.path.join(shared, "models", "llama2-tokenizer", "tokenizer.bin"),
             os.path.join(shared, "tokenizers", "ggml-vocab-llama-spm.gguf")]
    for p in paths:
        if not os.path.exists(p):
            skip("shared data missing: %s (set LARDER_SHARED)" % p)
    try:
        import sentencepiece
    except ImportError:
        skip("python3-sentencepiece is not installed")
    binary = os.environ.get("LARDER_BIN")
    if not binary or not os.access(binary, os.X_OK):
        skip("LARDER_BIN does not name the larder binary")

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    strings = gen_strings()
    want = [sp.encode(s) for s in strings]
    failures = 0
    for path in paths:
        name = os.path.relpath(path, shared)
        got = run_larder(binary, path, strings, no_bos=True)
        bad = [i for i in range(len(strings)) if got[i] != want[i]]
        for i in bad[:5]:
            print("MISMATCH %s on %r\n  sentencepiece: %s %s\n  larder:        %s" %
                  (name, strings[i][:200], want[i][:40], [sp.id_to_piece(t) for t in want[i][:20]], got[i][:40]))
        # With BOS: id 1 first, the rest unchanged.
        few = strings[:25]
        got_bos = run_larder(binary, path, few, no_bos=False)
        bad_bos = [i for i in range(len(few)) if got_bos[i] != [sp.bos_id()] + want[i]]
        for i in bad_bos[:3]:
            print("MISMATCH (BOS) %s on %r: %s" % (name, few[i], got_bos[i][:20]))
        print("%-45s %d/%d strings equal SentencePiece, BOS %d/%d" %
              (name, len(strings) - len(bad), len(strings), len(few) - len(bad_bos), len(few)))
        failures += len(bad) + len(bad_bos)
    total_ids = sum(len(w) for w in want)
    print("summary: %d strings (%d SentencePiece ids) x %d files, %d mismatches" %
          (len(strings), total_ids, len(paths), failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
