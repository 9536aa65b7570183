#!/usr/bin/env python3
"""Damaged copies of the real model files get one clear error line, never a crash or an answer.

For SmolLM2 (Q4_1) and Gemma 3 (Q4_K_M), from the cached files (scripts/models):
  - truncated inside the header, the metadata, the tensor table and the tensor data;
  - mismatched: a hyper-parameter patched in place so tensors no longer fit the config
    (width, head count, FFN width), an architecture the file's tensors don't belong to;
  - a zero-filled tensor region is NOT an error (weights are opaque), so it is not tried.
Each run of `larder run` must exit non-zero with exactly one line on stderr that starts with
"larder: error:" and names the file, and print nothing on stdout.
Exit 77 (skipped) when the models are not cached.
"""
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("LARDER_BIN") or os.path.join(ROOT, "build", "bin", "larder")
failures = []
passed = 0


def model_path(name):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "models.py"), "--path", name],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        print("FAIL:", what, flush=True)


def run_bad(path, what):
    r = subprocess.run([BIN, "run", "-m", path, "-p", "Hello", "-n", "4", "--temp", "0", "-t", "1"],
                       capture_output=True, text=True, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = (r.returncode not in (0,) and r.returncode > 0 and len(lines) == 1 and lines[0].startswith("larder: error:")
          and path in lines[0] and r.stdout == "")
    check(ok, f"{what}: rc={r.returncode} stdout={r.stdout[:80]!r} stderr={r.stderr[-400:]!r}")
    if ok:
        print(f"ok  {what}: {lines[0][:160]}")


def metadata_value_offset(data, key):
    """Offset of the value of a scalar metadata key (after its u32 type), and the type."""
    kb = key.encode()
    i = data.find(struct.pack("<Q", len(kb)) + kb)
    assert i > 0, key
    j = i + 8 + len(kb)
    (vtype,) = struct.unpack_from("<I", data, j)
    return j + 4, vtype


def header_sizes(data):
    """(end of metadata, end of tensor table) by walking the GGUF header."""
    pos = 24
    (n_tensors, n_kv) = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(pos, t):
        if t == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n
        if t == 9:
            (et, n) = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if et == 8:
                for _ in range(n):
                    (m,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + m
                return pos
            return pos + n * sizes[et]
        return pos + sizes[t]

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (t,) = struct.unpack_from("<I", data, pos)
        pos = skip_value(pos + 4, t)
    meta_end = pos
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * nd + 4 + 8
    return meta_end, pos


def main():
    if not os.path.exists(BIN):
        print(f"skipped: {BIN} not built")
        return 77
    models = {n: model_path(n) for n in ("smollm2", "gemma3")}
    if not any(models.values()):
        print("skipped: neither SmolLM2 nor Gemma 3 is cached (run scripts/models)")
        return 77
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            if not path:
                print(f"skipped part: {name} not cached (run scripts/models)")
                continue
            with open(path, "rb") as f:
                data = f.read()
            arch = "llama" if name == "smollm2" else "gemma3"
            meta_end, table_end = header_sizes(data)
            out = os.path.join(tmp, f"{name}-bad.gguf")
            cuts = {"header": 12, "metadata": meta_end // 2, "tensor table": (meta_end + table_end) // 2,
                    "tensor data (early)": table_end + 4096, "tensor data (middle)": len(data) // 2,
                    "last byte": len(data) - 1}
            for what, n in cuts.items():
                with open(out, "wb") as f:
                    f.write(data[:n])
                run_bad(out, f"{name} truncated in the {what} ({n} of {len(data)} bytes)")
            for key, new in ((f"{arch}.embedding_length", 512), (f"{arch}.attention.head_count", 5),
                             (f"{arch}.feed_forward_length", 1000), (f"{arch}.block_count", 60)):
                off, vtype = metadata_value_offset(data, key)
                fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[vtype]
                b = bytearray(data)
                struct.pack_into(fmt, b, off, new)
                with open(out, "wb") as f:
                    f.write(b)
                run_bad(out, f"{name} with {key} = {new}")
            # The other architecture's name, same length where possible: tensors or keys won't fit.
            other = {"llama": "qwen2", "gemma3": "gemma2"}[arch]
            off, vtype = metadata_value_offset(data, "general.architecture")
            b = bytearray(data)
            (n,) = struct.unpack_from("<Q", b, off)
            assert n == len(arch)
            b[off + 8:off + 8 + n] = other.encode()[:n].ljust(n, b"x")
            with open(out, "wb") as f:
                f.write(b)
            run_bad(out, f"{name} relabelled as {other}")
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
