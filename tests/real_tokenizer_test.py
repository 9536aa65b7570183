#!/usr/bin/python3
"""Larder's tokenizers of the two real models against independent implementations.

Both references are built here from nothing but the GGUF's own vocabulary (read with
tests/reference/gguf_reader.py), then every test string must give the same ids from
`larder tokenize` as from the reference:

* SmolLM2-135M-Instruct (tokenizer.ggml.model "gpt2", pre "smollm") -> Hugging Face
  `tokenizers` (PyPI; developed against tokenizers==0.23.3): models.BPE(vocab, merges) with the
  pre-tokenizer and decoder of SmolLM2's published tokenizer.json -- pre_tokenizer
  Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)],
  decoder ByteLevel, no normalizer, no unk token -- and the GGUF's CONTROL tokens
  (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...) as special added tokens, as in that
  tokenizer.json. A second copy without the added tokens is the reference for parsing off.
* Gemma 3 270M (tokenizer.ggml.model "llama") -> the `sentencepiece` library (Debian package
  python3-sentencepiece), loading a ModelProto serialised here from the GGUF (the protobuf wire
  format is written by hand, so python3-protobuf is not needed): model_type BPE, byte_fallback,
  the GGUF's pieces/scores/types, normalizer "identity" with add_dummy_prefix false (the GGUF's
  add_space_prefix), remove_extra_whitespaces false and escape_whitespaces true (spaces become
  U+2581 and runs are kept). SentencePiece was chosen over HF tokenizers because Gemma's tokenizer
  *is* a SentencePiece model: the library runs its own BPE, byte fallback and user-defined-symbol
  matching, whereas transformers' GemmaConverter re-creates it approximately (e.g. it maps
  <0x09> to "\\t" and matches user-defined pieces on the un-normalised text). Two GGUF details
  are undone to get the original model back: llama.cpp's converter writes user-defined pieces
  with U+2581 "pre-normalised" to ' ' (Gemma's whitespace-run pieces), and it marks <unk>
  CONTROL (SentencePiece needs it UNKNOWN). For special-token parsing on, a second model
  turns every CONTROL piece into USER_DEFINED, so SentencePiece's own prefix matcher finds
  <start_of_turn>, <bos>, <unused7>, ... in the text, as Gemma's HF added tokens do (<unk> stays
  matchable through an extra UNKNOWN piece appended after the vocabulary; byte fallback means
  that piece is never produced).

What is checked, per model, for >= 500 strings (hand-written edge cases, the strings of
../shared/tokenizers/*.inp, and seeded random mixtures of many scripts, emoji, code, whitespace
runs with tabs/CR/newlines, numbers, punctuation, contractions and the models' special tokens):
  1. loading the tokenizer (`larder tokenize -m MODEL --ids ""`) takes under 5 s (Gemma: 262k
     tokens; about 0.2-0.4 s on a busy 2-core machine);
  2. `--parse-special --no-bos`: ids == reference with special tokens parsed;
  3. `--no-bos` (parsing off): ids == reference without special tokens;
  4. `--parse-special`: ids == [BOS] + (2) when the GGUF's add_bos_token says so (Gemma: BOS 2;
     SmolLM2: add_bos false, nothing added);
  5. `--decode --parse-special` (a JSON batch of id lists): Larder's decode of its ids == the
     reference's decode of its ids == the text, except where the text cannot come back: bytes
     the vocabulary has no token for are dropped (SmolLM2 lacks 0x04 0x06 0x13 0x14 0x16 0x1D
     ...), and SentencePiece reads a literal U+2581 as ' ';
  6. re-encoding Larder's decoded text gives Larder's ids again (the reference's ids for the
     decoded text where bytes were dropped).
LARDER_TOKTEST_SEED / LARDER_TOKTEST_N change the seed / number of random strings (default
20261206 / 520) for exploring beyond the fixed set.
Exit status: 0 pass, 1 mismatch, 77 skip (a model, a reference library or the binary missing;
parts that could run are still run and reported).
"""
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("LARDER_SOURCE_DIR") or os.path.join(HERE, "..")


def venv_python():
    """The build's venv python (scripts/common.sh setup_venv), if any: tests/CMakeLists.txt runs
    the Python tests with it when it exists at configure time; this covers running by hand."""
    cands = [os.environ["LARDER_PYTHON"]] if os.environ.get("LARDER_PYTHON") else []
    dirs = [os.environ["BUILD_DIR"]] if os.environ.get("BUILD_DIR") else []
    d = os.path.dirname(os.path.abspath(os.environ.get("LARDER_BIN", "") or "/"))
    for _ in range(4):  # LARDER_BIN is BUILD/bin/larder or similar
        dirs.append(d)
        d = os.path.dirname(d)
    dirs.append(os.path.join(SRC, "build"))
    cands += [os.path.join(d, "venv", "bin", py) for d in dirs for py in ("python3", "python")]
    for c in cands:
        if os.access(c, os.X_OK) and os.path.abspath(c) != os.path.abspath(sys.executable):
            return c
    return None


try:
    import tokenizers  # noqa: F401
except ImportError:
    py = venv_python()
    if py and not os.environ.get("LARDER_TOKTEST_REEXEC"):
        os.environ["LARDER_TOKTEST_REEXEC"] = "1"
        os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])

# A venv without --system-site-packages still gets Debian's numpy and sentencepiece.
for _mod in ("numpy", "sentencepiece"):
    try:
        __import__(_mod)
    except ImportError:
        if os.path.isdir("/usr/lib/python3/dist-packages") and "/usr/lib/python3/dist-packages" not in sys.path:
            sys.path.append("/usr/lib/python3/dist-packages")
sys.path.insert(0, os.path.join(HERE, "reference"))


def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    return os.path.join(SRC, "..", "shared")


def model_path(name):
    """The cached real model (scripts/models --path NAME), or None."""
    try:
        p = subprocess.run([os.path.join(SRC, "scripts", "models"), "--path", name], capture_output=True,
                           text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
    return path if path and os.path.exists(path) else None


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_vocab(path):
    import gguf_reader
    g = gguf_reader.GGUFFile(path)
    md = g.metadata
    v = {
        "model": md["tokenizer.ggml.model"],
        "pre": md.get("tokenizer.ggml.pre", "default"),
        "tokens": md["tokenizer.ggml.tokens"],
        "types": md.get("tokenizer.ggml.token_type") or [NORMAL] * len(md["tokenizer.ggml.tokens"]),
        "scores": md.get("tokenizer.ggml.scores"),
        "merges": md.get("tokenizer.ggml.merges"),
        "bos": md.get("tokenizer.ggml.bos_token_id"),
        "eos": md.get("tokenizer.ggml.eos_token_id"),
        "unk": md.get("tokenizer.ggml.unknown_token_id"),
        "pad": md.get("tokenizer.ggml.padding_token_id"),
        "add_bos": md.get("tokenizer.ggml.add_bos_token"),
        "add_space_prefix": md.get("tokenizer.ggml.add_space_prefix"),
    }
    return v


# ---------------------------------------------------------------------------------------------
# SmolLM2: Hugging Face tokenizers

class HfReference:
    def __init__(self, v):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        assert v["model"] == "gpt2" and v["pre"] == "smollm", (v["model"], v["pre"])
        vocab = {t: i for i, t in enumerate(v["tokens"])}
        assert len(vocab) == len(v["tokens"]), "duplicate tokens"
        merges = []
        for m in v["merges"]:
            parts = m.split(" ")
            assert len(parts) == 2, "merge %r" % m  # byte-level pieces never hold a plain space
            merges.append((parts[0], parts[1]))

        def make(with_specials):
            t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                     byte_fallback=False))
            t.normalizer = None
            t.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
            t.decoder = decoders.ByteLevel()
            if with_specials:
                t.add_special_tokens([AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False,
                                                 single_word=False)
                                      for tok, ty in zip(v["tokens"], v["types"]) if ty == CONTROL])
            return t

        self.special = make(True)
        self.plain = make(False)
        self.name = "tokenizers %s" % tokenizers.__version__
        # Bytes whose GPT-2 byte-level character (bytes_to_unicode: printable Latin-1 as itself,
        # the rest from U+0100 on) is not in the vocabulary: BPE without an unk token drops them
        # (SmolLM2 lacks 0x04 0x06 0x13 0x14 0x16 0x1D 0xC0 0xC1 0xF1 0xF2 0xF5-0xFF).
        printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
        others = [b for b in range(256) if b not in printable]
        byte_char = {b: chr(b) for b in printable}
        byte_char.update({b: chr(256 + k) for k, b in enumerate(others)})
        self.missing_bytes = {b for b, c in byte_char.items() if c not in vocab}

    def expected_text(self, s):
        """What decode(encode(s)) gives: s without the bytes the vocabulary cannot spell."""
        raw = s.encode("utf-8")
        if not any(b in self.missing_bytes for b in raw):
            return s
        return bytes(b for b in raw if b not in self.missing_bytes).decode("utf-8", "replace")

    def encode(self, s, parse_special):
        return (self.special if parse_special else self.plain).encode(s, add_special_tokens=False).ids

    def decode(self, ids):
        return self.special.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Gemma 3: SentencePiece from a hand-serialised ModelProto

def _varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _f_varint(num, v):
    return _varint(num << 3) + _varint(int(v))


def _f_bytes(num, b):
    return _varint((num << 3) | 2) + _varint(len(b)) + b


def _f_float(num, x):
    return _varint((num << 3) | 5) + struct.pack("<f", x)


def spm_model_proto(pieces, unk_id, bos_id, eos_id, pad_id):
    """sentencepiece_model.proto: ModelProto{1: repeated SentencePiece{1 piece, 2 score, 3 type},
    2: TrainerSpec{3 model_type (BPE=2), 4 vocab_size, 35 byte_fallback, 40-43 unk/bos/eos/pad id},
    3: NormalizerSpec{1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces}}."""
    body = bytearray()
    for text, score, typ in pieces:
        body += _f_bytes(1, _f_bytes(1, text.encode("utf-8")) + _f_float(2, score) + _f_varint(3, typ))
    trainer = (_f_varint(3, 2) + _f_varint(4, len(pieces)) + _f_varint(35, 1) + _f_varint(40, unk_id) +
               _f_varint(41, bos_id) + _f_varint(42, eos_id) + _f_varint(43, pad_id))
    normalizer = _f_bytes(1, b"identity") + _f_varint(3, 0) + _f_varint(4, 0) + _f_varint(5, 1)
    body += _f_bytes(2, trainer) + _f_bytes(3, normalizer)
    return bytes(body)


class SpmReference:
    def __init__(self, v):
        import sentencepiece
        assert v["model"] == "llama", v["model"]
        assert v["add_space_prefix"] is False, "the reference below assumes add_space_prefix false"
        unk = v["unk"]
        plain, special = [], []
        for i, (t, ty, sc) in enumerate(zip(v["tokens"], v["types"], v["scores"])):
            if ty == USER_DEFINED:
                t = t.replace(" ", "\u2581")  # undo llama.cpp's pre-normalisation of user-defined spaces
            if i == unk:
                ty = UNKNOWN
            elif ty not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
                ty = NORMAL
            plain.append((t, sc, ty))
            special.append((t, sc, USER_DEFINED if ty in (CONTROL, UNKNOWN) else ty))
        n = len(plain)
        special.append(("<larder-reference-unk>", 0.0, UNKNOWN))
        ids = (v["bos"], v["eos"], v["pad"] if v["pad"] is not None else -1)
        self.plain = sentencepiece.SentencePieceProcessor(model_proto=spm_model_proto(plain, unk, *ids))
        self.special = sentencepiece.SentencePieceProcessor(model_proto=spm_model_proto(special, n, *ids))
        assert self.plain.get_piece_size() == n and self.special.get_piece_size() == n + 1
        self.name = "sentencepiece %s" % sentencepiece.__version__

    def encode(self, s, parse_special):
        return (self.special if parse_special else self.plain).encode(s)

    @staticmethod
    def expected_text(s):
        """What decode(encode(s)) gives: s itself, except that a U+2581 in s comes back as ' '
        (SentencePiece escapes ' ' as U+2581, so the two are one symbol); None = not compared."""
        return None if "\u2581" in s else s

    def decode(self, ids):
        return self.special.decode(ids)


# ---------------------------------------------------------------------------------------------
# Test strings

SCRIPTS = [
    "naïve café résumé Ångström straße piñata Føroyar Łódź Dvořák œuvre", "Cửa Việt, Hà Nội", "Ελληνικά: Γειά σου Κόσμε",
    "Привет, мир! Съешь же ещё этих мягких французских булок", "Բարեւ աշխարհ", "ქართული ენა", "שָׁלוֹם עוֹלָם",
    "مرحبا بالعالم، كيف حالك؟", "سلام دنیا", "ܫܠܡܐ", "नमस्ते दुनिया, क्षत्रिय", "হ্যালো বিশ্ব", "வணக்கம் உலகம்",
    "హలో ప్రపంచం", "ನಮಸ್ಕಾರ", "ഹലോ വേൾഡ്", "ਸਤਿ ਸ੍ਰੀ ਅਕਾਲ", "નમસ્તે", "ආයුබෝවන්", "สวัสดีชาวโลก", "ສະບາຍດີ",
    "བཀྲ་ཤིས་བདེ་ལེགས།", "မင်္ဂလာပါ", "សួស្តីពិភពលោក", "ᠮᠣᠩᠭᠣᠯ", "ሰላም ልዑል", "ᏣᎳᎩ", "ᐊᐃᓐᖓᐃ", "ᚠᚢᚦᚨᚱᚲ",
    "你好，世界！我想在apple工作1314151天～", "日本語のテキスト、カタカナとひらがな。", "한국어 텍스트입니다", "繁體中文與简体中文",
    "⠓⠑⠇⠇⠕", "∑∫√∞ ≤ ≥ ≠ ∀x∈ℝ: x²≥0", "→←↑↓⇒⇔", "┌─┬─┐│ │└─┴─┘", "♠♣♥♦ ♩♪♫", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𝐁𝐨𝐥𝐝",
    "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "x² y³ H₂O ½ ¾ ⅓ Ⅻ ⅷ ① ⑳", "٣٤٥ ۱۲۳ १२३ ๑๒๓ ১২৩", "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353a\u0300\u0301\u0302",
    "™ © ® § ¶ † ‡ • … ‰ ′ ″", "€100 £50 ¥1000 ₹500 ₿0.01 $9.99", "«quotes» „Anführung“ “curly” ‘single’ 「括弧」",
]
EMOJI = ["🦙", "🚀", "😀😁😂🤣", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇩🇪🇯🇵🇺🇸", "😶‍🌫️", "✅", "❤️", "1️⃣#️⃣", "🧑🏿‍💻",
         "🐍 Python 🐍", "👩‍❤️‍💋‍👨", "☕️", "🫠🫶"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world", "HELLO", "WoRlD", "Once",
         "upon", "a", "time", "tokenizer", "Gemma", "SmolLM", "don't", "DON'T", "it's", "It'S", "we'll", "We'Ve",
         "I'm", "they've", "she'd", "you're", "y'all'd've", "rock'n'roll", "it’s", "o'clock", "'tis", "co-operate",
         "U.S.A.", "e-mail", "3D", "x86_64", "iPhone", "McDonald's", "camelCase", "snake_case", "kebab-case",
         "PascalCase", "SCREAMING_CASE", "http://example.com/a?b=c&d=e#f", "user@example.org", "#hashtag",
         "@mention", "C++", "C#", "F#", ".NET", "Node.js", "1st", "2nd", "3rd", "4th"]
NUMBERS = ["0", "7", "42", "100", "1000", "12345", "1234567890", "3.14159", "-273.15", "1,234,567.89", "1e-10",
           "6.022e23", "0x7fff", "0b1010", "0o755", "2024-01-15", "12:34:56", "v1.2.3", "+1 (555) 123-4567",
           "99.9%", "1/2", "10^9", "000123", "3333333333333333333333333333"]
CODE = [
    "def f(x):\n    return x * 2\n",
    "class Foo(Bar):\n    def __init__(self, *args, **kwargs):\n        super().__init__()\n        self.x = {'a': [1, 2]}\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "template <typename T>\nstd::vector<T> v{1, 2, 3};\nauto it = v.begin(); it->x; a::b::c<<=1;",
    "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "const f = async (x) => { await fetch(`/api/${x}`); return x ?? null; };",
    "function add(a: number, b: number): number { return a + b; } // TS",
    "public static void main(String[] args) { System.out.println(\"Hello\"); }",
    "<!DOCTYPE html>\n<html><body class=\"x\"><div id='a'><p>hi</p><br/></div></body></html>",
    "<table><tr><th>a</th><td>b</td></tr></table><h1>T</h1><strong>s</strong><em>e</em><code>c</code>",
    ".a > .b:hover { color: #ff0000; margin: 0 auto; }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "#!/bin/bash\nfor f in *.txt; do echo \"$f\" | sed 's/a/b/g' >> out.log; done\nexit $?",
    "{\"key\": [1, 2.5, true, null, \"s\\u00e9\"], \"nested\": {\"a\": {}}}",
    "key: value\nlist:\n  - one\n  - two\n",
    "\\begin{equation} E = mc^2 \\frac{a}{b} \\sum_{i=0}^{n} x_i \\end{equation}",
    "main :: IO ()\nmain = mapM_ print [x | x <- [1..10], even x]",
    "(defun fact (n) (if (<= n 1) 1 (* n (fact (- n 1)))))",
    "all: build\n\nbuild:\n\t$(CC) -O2 -o $@ $^\n",
    "^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@\\w+\\.\\w{2,}$",
    "| a | b |\n|---|---|\n| 1 | 2 |\n",
    "```python\nprint('hi')\n```",
    "    indented\n        more\n\t\ttabbed\n",
    "x=1;y=2;z=x+y;i++;j--;k**=2;a&&b||!c;p->q;",
    "'''triple''' \"\"\"quotes\"\"\" '' \"\"",
    "C:\\Windows\\System32\\drivers\\etc\\hosts",
    "$HOME/.config && echo $? || true",
]
SPACES = [" ", "  ", "   ", "    ", "        ", " " * 31, " " * 32, " " * 45, "\t", "\t\t", "\t" * 33, "\n", "\n\n",
          "\n" * 31, "\n" * 40, "\r", "\r\n", "\r\n\r\n", "\r\r\n", " \n ", "\t \t", " \t\n\r", "\n \n\n \n\n\n \t",
          "\u00a0", "\u00a0\u00a0", "\u2009", "\u202f", "\u3000", "\u2028", "\u2029", "\u0085", "\u180e", "\u200b",
          "\ufeff", "\x0b", "\x0c", "\x1c\x1d\x1e\x1f", "\u1680", "\u2000\u2001\u2002\u200a", "\u205f"]
CONTROLS = ["\x00", "\x01", "\x04\x06\x13\x14\x16", "\x07", "\x1b[31mred\x1b[0m", "\x7f", "\u0080", "\u009f", "\u00ad", "\u200d", "\u200e",
            "\u2060", "\ue000", "\U000f0000", "\U0010fffd", "\ufffd", "\ufffe"]
NEAR_SPECIAL = ["<|im_start|", "<|im_start|>>", "<<|im_end|>", "|im_end|>", "<|IM_START|>", "<| im_start |>",
                "<|endoftext|", "<start_of_turn", "<start_of_turn >", "<START_OF_TURN>", "<end_of_turn>>",
                "<unused>", "<unused-1>", "<unused999999>", "<UNUSED1>", "<bos >", "< bos>", "<eos", "<s>", "</s>",
                "<unk>", "<0x0A>", "<0xZZ>", "[multimodal", "<table", "</td >", "<>", "<|>", "||", "<||>"]


def specials_of(v):
    return [t for t, ty in zip(v["tokens"], v["types"]) if ty in (CONTROL, USER_DEFINED) and t.strip(" \t\n")]


def inp_strings():
    """The strings of llama.cpp's vocabulary test inputs (all *.inp, deduplicated)."""
    d = os.path.join(shared_dir(), "tokenizers")
    out = []
    if not os.path.isdir(d):
        return out
    for name in sorted(os.listdir(d)):
        if not name.endswith(".inp"):
            continue
        with open(os.path.join(d, name), encoding="utf-8") as f:
            raw = f.read()
        parts = raw.split("\n__ggml_vocab_test__\n")
        if parts and parts[-1] == "":
            parts.pop()
        out += parts
    return list(dict.fromkeys(out))


# Blocks for random code points (assigned characters only are kept: Python's unicodedata).
BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x52F),
          (0x530, 0x58F), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0x980, 0x9FF), (0xB80, 0xBFF),
          (0xE00, 0xE7F), (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2070, 0x209F),
          (0x20A0, 0x20CF), (0x2100, 0x214F), (0x2150, 0x218F), (0x2190, 0x22FF), (0x2460, 0x24FF), (0x2500, 0x257F),
          (0x2580, 0x25FF), (0x2600, 0x26FF), (0x2700, 0x27BF), (0x3000, 0x303F), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
          (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F),
          (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x20000, 0x2A6DF)]


def random_chars(rng, n):
    lo, hi = rng.choice(BLOCKS)
    out = []
    while len(out) < n:
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
            out.append(c)
    return "".join(out)


def gen_strings(specials, n_random=520, seed=20261206):
    rng = random.Random(seed)
    sp = list(specials)
    chat = [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "<bos><start_of_turn>user\nWrite a haiku about llamas.<end_of_turn>\n<start_of_turn>model\n",
        "<|im_start|><|im_end|><|im_start|>", "<start_of_turn><end_of_turn><start_of_turn>",
        "text<|endoftext|>more text<|endoftext|>", "a<eos>b<pad>c<unk>d<mask>e<unused0>f<unused6241>g",
        " <|im_start|> spaced <|im_end|> ", "\n<start_of_turn>\n", "<start_of_image>[multimodal]<end_of_image>",
        "<|im_start|>user\n<start_of_turn>mixed<end_of_turn><|im_end|>", "<repo_name>larder<file_sep>a.py\n<jupyter_code>x=1",
        "<empty_output><gh_stars>100<issue_start>bug<issue_comment>fix<issue_closed>",
    ]
    edge = ["", " ", "a", "A", "ab", "Hello world", " Hello world", "Hello World!", "  leading", "trailing  ",
            "both  ", "x  y", "x   y", "x\ty", "x\n\ny", "x\r\ny", "x \ny", "x\n y", "   \n", "\n   ", "'", "''",
            "'s", "'S", "'ll", "''s", "s'", "'  s", "...", "!!!!!!", "?!", "---", "___", "***", "===", "//", "/*", "*/",
            "\u2581", "\u2581\u2581x", "x\u2581y", "\u2581 \u2581", "Once upon a time",
            "The year 2024 had 366 days; 1,000,000 is a million and 3.14159 is pi.",
            "I'd've thought you'd know. WE'RE here! They'LL see.", "a" * 300, "ab" * 200, "🦙" * 50,
            "1" * 100, "12" * 60, " " * 200, "\n" * 100, "\t" * 70, "a\u0301" * 20]
    out = edge + SCRIPTS + EMOJI + CODE + SPACES + CONTROLS + NEAR_SPECIAL + NUMBERS + chat
    out += [w for w in WORDS]
    out += [s for s in sp if not s.startswith("<unused")]
    out += ["<unused%d>" % i for i in (0, 1, 9, 10, 99, 100, 999, 6000)]
    pools = [WORDS, SCRIPTS, EMOJI, CODE, SPACES, NUMBERS, CONTROLS, NEAR_SPECIAL, sp]
    seps = [" ", " ", " ", ", ", ". ", "\n", "  ", "\t", "", "\r\n", " - ", "'", "’"]
    for _ in range(n_random):
        kind = rng.randrange(8)
        parts = []
        for _ in range(rng.randint(1, 14)):
            r = rng.random()
            if kind == 0 or r < 0.35:
                w = rng.choice(WORDS)
                w = rng.choice([w, w, w.upper(), w.capitalize(), w.lower()])
                parts.append(w)
                parts.append(rng.choice(seps))
            elif r < 0.5:
                parts.append(rng.choice(SCRIPTS + EMOJI))
            elif r < 0.6:
                parts.append(rng.choice(SPACES))
            elif r < 0.7:
                parts.append(rng.choice(NUMBERS) if rng.random() < 0.5 else str(rng.randint(0, 10 ** rng.randint(1, 25))))
            elif r < 0.78:
                parts.append(rng.choice(CODE))
            elif r < 0.86:
                parts.append(rng.choice(sp + NEAR_SPECIAL) if sp else rng.choice(NEAR_SPECIAL))
            elif r < 0.9:
                parts.append(rng.choice(CONTROLS))
            else:
                parts.append(random_chars(rng, rng.randint(1, 8)))
        s = "".join(parts)
        if kind == 5:
            s = rng.choice(SPACES) + s + rng.choice(SPACES)
        if kind == 6:
            s = s.replace(" ", rng.choice(["  ", "\t", "\u00a0", "   "]))
        out.append(s)
    # a few long ones
    for k in range(3):
        out.append("".join(rng.choice(rng.choice(pools) or WORDS) + rng.choice(seps) for _ in range(600 * (k + 1))))
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# Larder

def run_larder(binary, model, payload, flags):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False)
        path = f.name
    try:
        cmd = [binary, "tokenize", "-m", model, "--json-batch", path] + flags
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, timeout=600)
        dt = time.time() - t0
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (" ".join(cmd), p.returncode,
                                                      p.stderr.decode("utf-8", "replace")[-2000:]))
        res = json.loads(p.stdout.decode("utf-8"))
        if not isinstance(res, list) or len(res) != len(payload):
            raise RuntimeError("expected a JSON array of %d results from %s" % (len(payload), " ".join(cmd)))
        return res, dt
    finally:
        os.unlink(path)


def show(s, n=120):
    return repr(s if len(s) <= n else s[:n] + "...")


def check_model(name, binary, model, ref, v, strings):
    """Returns the number of failures."""
    fails = 0
    tokens = v["tokens"]

    def report(what, bad, detail):
        nonlocal fails
        fails += len(bad)
        for i in bad[:6]:
            print("MISMATCH %s %s on %s\n%s" % (name, what, show(strings[i]), detail(i)))

    def pieces(ids):
        return [tokens[t] if 0 <= t < len(tokens) else t for t in ids[:20]]

    def first_diff(a, b):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return max(0, k - 3)

    # Loading the vocabulary (Gemma: 262,144 tokens) must stay fast: `larder tokenize` of "" is
    # GGUF open + tokenizer build + exit. Best of three, generous bound for a loaded machine.
    load = []
    for _ in range(3):
        t0 = time.time()
        p = subprocess.run([binary, "tokenize", "-m", model, "--ids", ""], capture_output=True, timeout=120)
        load.append(time.time() - t0)
        if p.returncode != 0:
            raise RuntimeError("larder tokenize -m %s failed: %s" % (model, p.stderr.decode("utf-8", "replace")))
    print("%-8s %-32s %.3fs (best of 3; %d tokens)" % (name, "load + tokenize \"\"", min(load), len(tokens)))
    if min(load) > 5.0:
        print("FAIL %s: loading the tokenizer took %.1fs (bound 5s)" % (name, min(load)))
        fails += 1

    results = {}
    for parse_special in (True, False):
        want = [ref.encode(s, parse_special) for s in strings]
        got, dt = run_larder(binary, model, strings, ["--no-bos"] + (["--parse-special"] if parse_special else []))
        bad = [i for i in range(len(strings)) if got[i] != want[i]]
        what = "ids (special tokens %s)" % ("parsed" if parse_special else "not parsed")
        report(what, bad, lambda i: "  from id #%d:\n  %s: %s\n      %s\n  larder: %s\n      %s" % (
            first_diff(want[i], got[i]), ref.name, want[i][first_diff(want[i], got[i]):][:20],
            pieces(want[i][first_diff(want[i], got[i]):]), got[i][first_diff(want[i], got[i]):][:20],
            pieces(got[i][first_diff(want[i], got[i]):])))
        print("%-8s %-32s %d/%d strings equal (%d ids), larder %.2fs" %
              (name, what, len(strings) - len(bad), len(strings), sum(map(len, want)), dt))
        results[parse_special] = (want, got)

    want, got = results[True]
    # BOS as the GGUF says (add_bos_token; Larder's default when absent is not what is tested here).
    bos = [v["bos"]] if v["add_bos"] and v["bos"] is not None and v["bos"] >= 0 else []
    got_bos, _ = run_larder(binary, model, strings, ["--parse-special"])
    bad = [i for i in range(len(strings)) if got_bos[i] != bos + want[i]]
    report("with BOS", bad, lambda i: "  want %s\n  larder %s" % ((bos + want[i])[:20], got_bos[i][:20]))
    print("%-8s %-32s %d/%d strings equal (BOS %s)" % (name, "with BOS (as the GGUF says)", len(strings) - len(bad),
                                                       len(strings), bos or "none"))

    # Round trips: Larder's decode of its own ids, against the text and the reference's decode.
    decoded, _ = run_larder(binary, model, got, ["--decode", "--parse-special"])
    ref_dec = [ref.decode(w) for w in want]
    expect = [ref.expected_text(s) for s in strings]
    bad = [i for i in range(len(strings))
           if decoded[i] != ref_dec[i] or (expect[i] is not None and decoded[i] != expect[i])]
    report("decode", bad, lambda i: "  text      %s\n  expected  %s\n  reference %s\n  larder    %s" % (
        show(strings[i]), show(expect[i] or ""), show(ref_dec[i]), show(decoded[i])))
    n_changed = sum(1 for s, e in zip(strings, expect) if e != s)
    print("%-8s %-32s %d/%d decode to the text and to the reference's decode%s" % (
        name, "decode", len(strings) - len(bad), len(strings),
        " (%d: text without bytes the vocabulary lacks, or holding U+2581)" % n_changed if n_changed else ""))
    # Re-encoding the decoded text: the same ids where it is the text again (also for U+2581,
    # which SentencePiece treats as ' '), else (bytes dropped) the reference's ids for it.
    again, _ = run_larder(binary, model, decoded, ["--no-bos", "--parse-special"])
    want_again = [got[i] if decoded[i] == strings[i] or expect[i] is None else ref.encode(decoded[i], True)
                  for i in range(len(strings))]
    bad = [i for i in range(len(strings)) if again[i] != want_again[i]]
    report("re-encode", bad, lambda i: "  want %s\n  got  %s" % (want_again[i][:20], again[i][:20]))
    print("%-8s %-32s %d/%d re-encode to the same ids" % (name, "encode(decode(ids))", len(strings) - len(bad),
                                                         len(strings)))
    return fails


def main():
    binary = os.environ.get("LARDER_BIN")
    if not binary or not os.access(binary, os.X_OK):
        print("SKIP: LARDER_BIN does not name the larder binary")
        return SKIP
    try:
        import numpy  # noqa: F401  (gguf_reader)
    except ImportError:
        print("SKIP: numpy (python3-numpy) is missing, needed to read the GGUF vocabularies")
        return SKIP
    skipped, fails = [], 0
    extra = inp_strings()
    for name, lib, make in (("smollm2", "tokenizers", HfReference), ("gemma3", "sentencepiece", SpmReference)):
        try:
            __import__(lib)
        except ImportError:
            skipped.append("%s: python module %s is missing (%s)" % (
                name, lib, "pip install tokenizers, e.g. into build/venv" if lib == "tokenizers"
                else "apt-get install python3-sentencepiece"))
            continue
        model = model_path(name)
        if not model:
            skipped.append("%s: model not cached (scripts/models %s)" % (name, name))
            continue
        v = read_vocab(model)
        t0 = time.time()
        ref = make(v)
        print("%-8s reference %s built from %s in %.1fs" % (name, ref.name, os.path.basename(model), time.time() - t0))
        strings = gen_strings(specials_of(v), n_random=int(os.environ.get("LARDER_TOKTEST_N", "520")),
                              seed=int(os.environ.get("LARDER_TOKTEST_SEED", "20261206"))) + extra
        strings = list(dict.fromkeys(strings))
        fails += check_model(name, binary, model, ref, v, strings)
    for s in skipped:
        print("SKIP part: " + s)
    if fails:
        print("FAIL: %d mismatches" % fails)
        return 1
    if skipped:
        return SKIP
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
