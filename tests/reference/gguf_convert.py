#!/usr/bin/python3
"""Rewrites a GGUF file with chosen 2-D tensors converted to f16, bf16 (or f32), in numpy.

Independent of the Larder engine (shares no code with it): reading uses tests/reference/gguf_reader.py
(tensor infos and dequantization), and the GGUF writer below is written from the published GGUF
specification (ggml/docs/gguf.md). Used by tests/perplexity_test.py to make f16/bf16 copies of a
real f32 model whose accuracy loss can then be measured.

    gguf_convert.py IN OUT --type f16|bf16|f32 [--include REGEX] [--exclude REGEX]

Which tensors: every 2-D tensor whose name matches --include (default: all) and not --exclude;
1-D tensors (norms, biases, rope_freqs) are always copied unchanged, as are tensors not chosen.
A chosen tensor is dequantized to float32 by gguf_reader (f32, f16, bf16, q8_0, q4_0 sources)
and converted:
  f16   IEEE binary16, round-to-nearest-even (numpy's astype). Finite inputs that overflow the
        f16 range (|x| > 65504) are an error, not a silent inf.
  bf16  the top 16 bits of the float32, ROUND-TO-NEAREST-EVEN on the discarded low 16 bits:
        bits + 0x7FFF + ((bits >> 16) & 1), then >> 16. NaN stays NaN (quiet bit set); finite
        values that round past the bf16 range become +-inf (the RNE result), reported as an error.
  f32   plain float32 (e.g. to expand a quantized file).

Metadata: every key/value is copied in file order with its exact type (array element types
included), so the metadata section of OUT is byte-identical to IN's; the tool checks that. It
is copied verbatim, so e.g. a `general.file_type` key is NOT updated.

GGUF layout written (little-endian, version 3):
  "GGUF", u32 version=3, u64 n_tensors, u64 n_kv, kv..., tensor infos..., zero padding to
  `general.alignment` (default 32), data section. Tensor info: string name, u32 n_dims,
  u64 ne[n_dims] (ne[0] innermost), u32 ggml type, u64 offset from the data section start
  (each offset a multiple of the alignment; padding between tensors is zeros).
  string = u64 byte length + UTF-8 bytes.
"""

import argparse
import os
import re
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reader import (GGML_TYPES, GGUFError, GGUFFile, T_ARRAY, T_BOOL, T_STRING,  # noqa: E402
                         _SCALAR_DTYPES, _Cursor)

TYPE_IDS = {"f32": 0, "f16": 1, "bf16": 30}


# ----------------------------------------------------------------------------- float conversion

def f32_to_bf16_bits(x):
    """float32 array -> uint16 bf16 bit patterns, round-to-nearest-even; NaN stays a quiet NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)              # wide enough that the carry cannot wrap
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    nan = np.isnan(x)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint32)   # keep sign/payload, force quiet
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def convert(x, type_name, name="tensor"):
    """float32 array -> raw little-endian bytes of the target type."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if type_name == "f32":
        return x.astype("<f4").tobytes()
    if type_name == "f16":
        with np.errstate(over="ignore"):
            h = x.astype("<f2")
        bad = np.isinf(h) & np.isfinite(x)
        if bad.any():
            raise GGUFError("%s: %d values overflow f16 (max |x| = %g)" % (name, int(bad.sum()),
                                                                            float(np.abs(x).max())))
        return h.tobytes()
    if type_name == "bf16":
        b = f32_to_bf16_bits(x)
        bad = np.isinf(bf16_bits_to_f32(b)) & np.isfinite(x)
        if bad.any():
            raise GGUFError("%s: %d values overflow bf16" % (name, int(bad.sum())))
        return b.astype("<u2").tobytes()
    raise GGUFError("unsupported target type %r" % type_name)


# ----------------------------------------------------------------------------- typed metadata

def read_typed_metadata(path):
    """[(key, vtype, value)] in file order, where array values are (elem_type, [items]) with items
    typed the same way recursively -- the reader's dict loses array element types. Also returns
    the raw bytes of the kv section, for the byte-identity check."""
    buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))
    cur = _Cursor(buf)
    if bytes(cur.take(4)) != b"GGUF":
        raise GGUFError("%s: not a GGUF file" % path)
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFError("%s: unsupported GGUF version %d" % (path, version))
    cur.u64()                      # tensor count
    n_kv = cur.u64()
    start = cur.pos

    def value(vtype):
        if vtype == T_ARRAY:
            et = cur.u32()
            n = cur.u64()
            if et in _SCALAR_DTYPES:
                dt = _SCALAR_DTYPES[et]
                return (et, np.frombuffer(bytes(cur.take(n * dt.itemsize)), dtype=dt).copy())
            return (et, [value(et) for _ in range(n)])
        if vtype == T_STRING:
            return bytes(cur.take(cur.u64()))        # raw bytes: no UTF-8 round trip
        if vtype in _SCALAR_DTYPES:
            return np.frombuffer(bytes(cur.take(_SCALAR_DTYPES[vtype].itemsize)), dtype=_SCALAR_DTYPES[vtype])[0]
        raise GGUFError("unknown metadata value type %d" % vtype)

    kvs = []
    for _ in range(n_kv):
        key = bytes(cur.take(cur.u64()))
        vt = cur.u32()
        kvs.append((key, vt, value(vt)))
    return kvs, bytes(buf[start:cur.pos])


# ----------------------------------------------------------------------------- writer

def _string(b):
    if isinstance(b, str):
        b = b.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype, v):
    if vtype == T_STRING:
        return _string(v)
    if vtype == T_ARRAY:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        if et in _SCALAR_DTYPES:
            return out + np.asarray(items, dtype=_SCALAR_DTYPES[et]).tobytes()
        return out + b"".join(_value(et, it) for it in items)
    if vtype in _SCALAR_DTYPES:
        if vtype == T_BOOL:
            v = 1 if v else 0
        return np.asarray(v, dtype=_SCALAR_DTYPES[vtype]).tobytes()
    raise GGUFError("unknown metadata value type %d" % vtype)


def write_gguf(path, kvs, tensors, alignment=32):
    """kvs: [(key, vtype, value)] as read_typed_metadata gives; tensors: [(name, ne, type_id, bytes)].
    Returns the bytes of the kv section written."""
    kv_bytes = b"".join(_string(k) + struct.pack("<I", vt) + _value(vt, v) for k, vt, v in kvs)
    infos = []
    offset = 0
    for name, ne, type_id, data in tensors:
        _, blk, bsz = GGML_TYPES[type_id]
        n = int(np.prod(ne, dtype=np.int64))
        if ne[0] % blk or len(data) != n // blk * bsz:
            raise GGUFError("%s: %d bytes do not fit ne=%s of type %d" % (name, len(data), ne, type_id))
        infos.append(_string(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
                     + struct.pack("<IQ", type_id, offset))
        offset += (len(data) + alignment - 1) // alignment * alignment
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + kv_bytes + b"".join(infos)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % alignment))
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * (-len(data) % alignment))
    os.replace(tmp, path)
    return kv_bytes


def convert_file(src, dst, type_name, include=None, exclude=None, log=None):
    """Writes dst; returns {tensor name: (old type name, new type name)} for converted tensors."""
    if type_name not in TYPE_IDS:
        raise GGUFError("unsupported target type %r (f16, bf16, f32)" % type_name)
    g = GGUFFile(src)
    kvs, kv_raw = read_typed_metadata(src)
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out, changed = [], {}
    for name, t in g.tensors.items():
        chosen = (len(t.ne) == 2 and (inc is None or inc.search(name)) and not (exc and exc.search(name)))
        if chosen and t.type_id != TYPE_IDS[type_name]:
            data = convert(g.tensor(name), type_name, name)
            out.append((name, t.ne, TYPE_IDS[type_name], data))
            changed[name] = (t.type_name, type_name)
        else:
            out.append((name, t.ne, t.type_id, bytes(g.raw(name))))
    written = write_gguf(dst, kvs, out, g.alignment)
    if written != kv_raw:
        raise GGUFError("internal error: metadata of %s is not a byte-identical copy" % dst)
    if log:
        log("%s -> %s: %d of %d tensors converted to %s, %d metadata keys copied"
            % (src, dst, len(changed), len(out), type_name, len(kvs)))
    return changed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", required=True, choices=sorted(TYPE_IDS))
    ap.add_argument("--include", help="regex: convert only 2-D tensors whose name matches")
    ap.add_argument("--exclude", help="regex: never convert tensors whose name matches")
    a = ap.parse_args(argv)
    try:
        convert_file(a.src, a.dst, a.type, a.include, a.exclude, log=print)
    except (GGUFError, OSError) as e:
        print("gguf_convert: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
