#!/usr/bin/python3
"""Bad inputs must fail cleanly: the CLI exits non-zero (not by a signal), prints one
`larder: error: ...` line on stderr as its last word, finishes well within a timeout and never
grows past 200 MB of RSS (no allocation sized from a corrupt header).

Env: LARDER_BIN (the larder binary), LARDER_SHARED or LARDER_SOURCE_DIR/../shared for data.
Exit 77 (skip) only when the shared model files are missing.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading

TIMEOUT_S = 60
MAX_RSS_MB = 200


def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    src = os.environ.get("LARDER_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return os.path.join(src, "..", "shared")


def run_cli(args):
    """Runs the CLI; returns (returncode, stdout, stderr, max_rss_mb, timed_out).
    os.wait4 gives this child's own peak RSS (no dependency on /usr/bin/time)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        timed_out = []
        timer = threading.Timer(TIMEOUT_S, lambda: (timed_out.append(1), p.kill()))
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                ru.ru_maxrss / 1024.0, bool(timed_out))


# ---------------------------------------------------------------- GGUF surgery

def scan_gguf(b):
    """Byte positions of the fields the cases patch: n_tensors, each kv (key length, type,
    value), each tensor info (dims, type, offset), and where tensor infos end."""
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(t, pos):
        if t == 8:
            (n,) = struct.unpack_from("<Q", b, pos)
            return pos + 8 + n
        if t == 9:
            et, n = struct.unpack_from("<IQ", b, pos)
            pos += 12
            if et in fixed:
                return pos + n * fixed[et]
            for _ in range(n):
                pos = skip_value(et, pos)
            return pos
        return pos + fixed[t]

    kvs = {}
    for _ in range(n_kv):
        key_pos = pos
        (klen,) = struct.unpack_from("<Q", b, pos)
        key = b[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (t,) = struct.unpack_from("<I", b, pos)
        kvs[key] = {"key_pos": key_pos, "type_pos": pos, "value_pos": pos + 4, "type": t}
        pos = skip_value(t, pos + 4)
    kv_end = pos
    tensors = {}
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", b, pos)
        name = b[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        (nd,) = struct.unpack_from("<I", b, pos)
        ne = list(struct.unpack_from("<%dq" % nd, b, pos + 4))
        info = {"dims_pos": pos, "ne": ne, "type_pos": pos + 4 + 8 * nd}
        pos = info["type_pos"]
        info["type"], info["offset"] = struct.unpack_from("<IQ", b, pos)
        info["offset_pos"] = pos + 4
        pos += 12
        tensors[name] = info
    return {"kvs": kvs, "tensors": tensors, "kv_end": kv_end, "infos_end": pos}


def patched(b, pos, fmt, value):
    b = bytearray(b)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def rewrite_gguf(b, layout, replace):
    """Re-serializes a GGUF (f32 tensors only) keeping its metadata bytes verbatim; `replace`
    maps a tensor name to (ne, raw_bytes) to change its shape and data."""
    kv_start, kv_end = 24, layout["kv_end"]
    align = 32
    data_start = (layout["infos_end"] + align - 1) // align * align
    tensors = []
    for name, t in layout["tensors"].items():
        if name in replace:
            ne, raw = replace[name]
        else:
            n = 1
            for d in t["ne"]:
                n *= d
            raw = b[data_start + t["offset"]:data_start + t["offset"] + 4 * n]
            ne = t["ne"]
        tensors.append((name, ne, raw))
    out = bytearray(b[:24] + b[kv_start:kv_end])
    struct.pack_into("<Q", out, 8, len(tensors))
    off = 0
    for name, ne, raw in tensors:
        out += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(ne))
        out += struct.pack("<%dq" % len(ne), *ne) + struct.pack("<IQ", 0, off)
        off += (len(raw) + align - 1) // align * align
    out += b"\0" * (-len(out) % align)
    for _, _, raw in tensors:
        out += raw + b"\0" * (-len(raw) % align)
    return bytes(out)


def main():
    larder = os.environ.get("LARDER_BIN")
    if not larder or not os.path.exists(larder):
        print("FAIL: LARDER_BIN is not set to the larder binary")
        return 1
    sd = os.path.join(shared_dir(), "models", "stories260K")
    gguf_path = os.path.join(sd, "stories260K-f32.gguf")
    bin_path = os.path.join(sd, "stories260K.bin")
    tok_path = os.path.join(sd, "tok512.bin")
    for p in (gguf_path, bin_path, tok_path):
        if not os.path.exists(p):
            print("SKIP: shared data missing: %s" % p)
            return 77

    tmp = tempfile.mkdtemp(prefix="larder_bad_input_")
    try:
        return run_cases(larder, tmp, gguf_path, bin_path, tok_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_cases(larder, tmp, gguf_path, bin_path, tok_path):
    gguf = open(gguf_path, "rb").read()
    l2c = open(bin_path, "rb").read()
    layout = scan_gguf(gguf)
    align = 32
    data_start = (layout["infos_end"] + align - 1) // align * align
    need = max(data_start + t["offset"] + 4 * prod(t["ne"]) for t in layout["tensors"].values())

    files = []  # (label, path); each is tried with `info` and `run`

    def add(label, name, data):
        p = os.path.join(tmp, name)
        with open(p, "wb") as f:
            f.write(data)
        files.append((label, p))

    files.append(("missing file", os.path.join(tmp, "does-not-exist.gguf")))
    add("empty file", "empty.gguf", b"")
    add("empty file without extension", "empty", b"")
    add("bad magic", "badmagic.gguf", b"GGUX" + gguf[4:])
    add("GGUF version 99", "v99.gguf", patched(gguf, 4, "<I", 99))
    for cut in (3, 8, 20, 24, 100, 1000, 10000, layout["infos_end"] - 5, data_start + 1000, need // 2, need - 1):
        add("GGUF truncated at %d" % cut, "trunc%d.gguf" % cut, gguf[:cut])
    add("absurd n_tensors", "ntensors.gguf", patched(gguf, 8, "<Q", 1 << 62))
    add("absurd n_kv", "nkv.gguf", patched(gguf, 16, "<Q", 1 << 40))
    arr = next(v for v in layout["kvs"].values() if v["type"] == 9)
    add("absurd array length", "arrlen.gguf", patched(gguf, arr["value_pos"] + 4, "<Q", 1 << 61))
    first_kv = min(layout["kvs"].values(), key=lambda v: v["key_pos"])
    add("absurd key length", "keylen.gguf", patched(gguf, first_kv["key_pos"], "<Q", (1 << 64) - 2))
    strkv = layout["kvs"]["general.architecture"]
    add("absurd string length", "strlen.gguf", patched(gguf, strkv["value_pos"], "<Q", 1 << 50))
    q0 = layout["tensors"]["blk.0.attn_q.weight"]
    add("unknown dtype id", "dtype.gguf", patched(gguf, q0["type_pos"], "<I", 77))
    add("unsupported (non-computable) dtype", "q4k.gguf", patched(gguf, q0["type_pos"], "<I", 12))
    add("tensor offset past EOF", "offset.gguf", patched(gguf, q0["offset_pos"], "<Q", 1 << 40))
    add("misaligned tensor offset", "misalign.gguf", patched(gguf, q0["offset_pos"], "<Q", q0["offset"] + 4))
    add("huge tensor dims", "dims.gguf", patched(gguf, q0["dims_pos"] + 4, "<q", 1 << 40))
    # Wrong shape, consistent file: blk.0.attn_q.weight as [32 rows x 64 cols] instead of 64 x 64.
    add("tensor shape mismatch", "shape.gguf",
        rewrite_gguf(gguf, layout, {"blk.0.attn_q.weight": ([64, 32], b"\0" * (64 * 32 * 4))}))
    add("missing tensor", "missing.gguf", gguf.replace(b"blk.2.ffn_up.weight", b"blk.2.ffn_XX.weight"))
    # general.architecture = "gpt-j": same length as "llama", so patch in place.
    vpos = strkv["value_pos"]
    assert gguf[vpos + 8:vpos + 13] == b"llama"
    add("unknown architecture", "gptj.gguf", gguf[:vpos + 8] + b"gpt-j" + gguf[vpos + 13:])
    add("truncated llama2.c checkpoint", "trunc.bin", l2c[: len(l2c) // 2])
    add("llama2.c header only", "header.bin", l2c[:28])
    add("llama2.c absurd header", "absurd.bin", struct.pack("<7i", 1 << 30, 1 << 30, 1 << 20, 3, 7, -(1 << 30), 0) + l2c[28:])
    add("llama2.c v1 magic", "v1.bin", struct.pack("<Ii", 0x616B3432, 1) + l2c[8:])
    shutil.copy(tok_path, os.path.join(tmp, "tok512.bin"))  # so .bin failures are about the checkpoint
    add("random bytes", "random.bin", bytes((i * 7919 + 13) % 251 for i in range(4096)))
    # Hugging Face folders.
    for label, name, cfg in (
            ("HF folder with malformed config.json", "hf_bad_json", '{"model_type": "llama", "hidden_size": '),
            ("HF folder with unsupported architecture", "hf_gpt2", '{"model_type": "gpt2", "hidden_size": 64}'),
            ("HF folder with config but no weights", "hf_noweights",
             '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5, '
             '"num_attention_heads": 8, "vocab_size": 512}'),
            ("HF folder with a corrupt safetensors file", "hf_badst",
             '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5, '
             '"num_attention_heads": 8, "vocab_size": 512}')):
        d = os.path.join(tmp, name)
        os.mkdir(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(cfg)
        if name == "hf_badst":
            with open(os.path.join(d, "model.safetensors"), "wb") as f:
                f.write(struct.pack("<Q", 1 << 40) + b'{"a": 1}')
        files.append((label, d))
    files.append(("empty folder", tmp + "/hf_empty"))
    os.mkdir(tmp + "/hf_empty")

    cases = []
    for label, path in files:
        cases.append((label + " [info]", [larder, "info", path]))
        cases.append((label + " [run]", [larder, "run", "-m", path, "-p", "hi", "-n", "4"]))
    long_prompt = " ".join(["Once upon a time there was a little girl named Lily."] * 8)
    cases.append(("prompt longer than the context",
                  [larder, "run", "-m", gguf_path, "-c", "16", "-p", long_prompt, "-n", "4"]))
    cases.append(("logits ids past the context", [larder, "logits", "-m", gguf_path, "-c", "8",
                                                  "--ids", ",".join(["1"] * 20), "--greedy", "1"]))
    cases.append(("logits id outside the vocabulary", [larder, "logits", "-m", gguf_path, "--ids", "1,512"]))

    failures = 0
    for label, args in cases:
        rc, out, err, rss, timed_out = run_cli(args)
        lines = [l for l in err.splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("larder: error:")]
        problems = []
        if timed_out:
            problems.append("did not finish within %ds" % TIMEOUT_S)
        if rc < 0:
            problems.append("killed by signal %d" % -rc)
        elif rc == 0:
            problems.append("exit status 0")
        if len(errors) != 1:
            problems.append("%d 'larder: error:' lines on stderr" % len(errors))
        elif lines[-1] != errors[0]:
            problems.append("the error is not the last stderr line")
        if any(w in err for w in ("Sanitizer", "terminate called", "Traceback", "internal invariant")):
            problems.append("crash report on stderr")
        if rss > MAX_RSS_MB:
            problems.append("max RSS %.0f MB > %d MB" % (rss, MAX_RSS_MB))
        if problems:
            failures += 1
            print("FAIL %s: %s\n    cmd: %s\n    stderr: %s" % (label, "; ".join(problems), " ".join(args[:4]),
                                                             "\n            ".join(lines[-5:]) or "(empty)"))
        else:
            print("ok   %-55s rss %5.1f MB  %s" % (label, rss, errors[0][:110]))
    print("%d passed, %d failed" % (len(cases) - failures, failures))
    return 1 if failures else 0


def prod(xs):
    n = 1
    for x in xs:
        n *= x
    return n


if __name__ == "__main__":
    sys.exit(main())
