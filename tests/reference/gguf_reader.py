"""Independent GGUF (v2/v3) reader in numpy, for the reference model tests.

Written from the published GGUF specification (ggml/docs/gguf.md); shares no code with the
Larder engine. Only what the reference needs: all metadata value types (arrays included),
tensor infos, and dequantization of f32, f16, bf16, q8_0 and q4_0 tensors to float32.

File layout (little-endian):
  uint32 magic "GGUF", uint32 version, uint64 tensor_count, uint64 kv_count
  kv_count x { string key, uint32 value_type, value }
  tensor_count x { string name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml_type, uint64 offset }
  padding to `general.alignment` (default 32), then the data section; each tensor's offset is
  relative to the start of the data section. string = uint64 length + UTF-8 bytes (no NUL).
Shapes: ne[0] is the innermost (contiguous) dimension, so ne=[cols, rows] is a numpy
array of shape (rows, cols): numpy shape = reversed(ne).
"""

import struct

import numpy as np

GGUF_MAGIC = b"GGUF"

# metadata value types
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, \
    T_UINT64, T_INT64, T_FLOAT64 = range(13)

_SCALAR_DTYPES = {
    T_UINT8: np.dtype("<u1"), T_INT8: np.dtype("<i1"), T_UINT16: np.dtype("<u2"),
    T_INT16: np.dtype("<i2"), T_UINT32: np.dtype("<u4"), T_INT32: np.dtype("<i4"),
    T_FLOAT32: np.dtype("<f4"), T_BOOL: np.dtype("<u1"), T_UINT64: np.dtype("<u8"),
    T_INT64: np.dtype("<i8"), T_FLOAT64: np.dtype("<f8"),
}

# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    8: ("q8_0", 32, 34),
    30: ("bf16", 1, 2),
}


class GGUFError(Exception):
    pass


class TensorInfo:
    def __init__(self, name, ne, type_id, offset):
        self.name = name
        self.ne = list(ne)            # ne[0] innermost
        self.type_id = type_id
        self.offset = offset          # relative to the data section
        self.data_start = None        # absolute file offset, filled in later

    @property
    def type_name(self):
        t = GGML_TYPES.get(self.type_id)
        return t[0] if t else "type%d" % self.type_id

    @property
    def shape(self):
        """numpy shape (outermost first)."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self):
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def nbytes(self):
        if self.type_id not in GGML_TYPES:
            raise GGUFError("tensor %s: unsupported ggml type %d" % (self.name, self.type_id))
        _, blk, bsz = GGML_TYPES[self.type_id]
        if self.ne[0] % blk:
            raise GGUFError("tensor %s: ne[0]=%d not a multiple of block size %d"
                            % (self.name, self.ne[0], blk))
        return self.n_elements // blk * bsz

    def __repr__(self):
        return "TensorInfo(%s, ne=%s, %s, off=%d)" % (self.name, self.ne, self.type_name, self.offset)


class _Cursor:
    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise GGUFError("unexpected end of file at offset %d (need %d bytes)" % (self.pos, n))
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, bytes(self.take(size)))

    def u32(self):
        return self.unpack("<I")[0]

    def u64(self):
        return self.unpack("<Q")[0]

    def string(self):
        n = self.u64()
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype == T_STRING:
            return self.string()
        if vtype == T_ARRAY:
            etype = self.u32()
            count = self.u64()
            if etype in _SCALAR_DTYPES:
                dt = _SCALAR_DTYPES[etype]
                arr = np.frombuffer(bytes(self.take(count * dt.itemsize)), dtype=dt)
                if etype == T_BOOL:
                    return [bool(x) for x in arr]
                return arr.tolist()
            if etype in (T_STRING, T_ARRAY):
                return [self.value(etype) for _ in range(count)]
            raise GGUFError("unknown array element type %d" % etype)
        if vtype in _SCALAR_DTYPES:
            dt = _SCALAR_DTYPES[vtype]
            v = np.frombuffer(bytes(self.take(dt.itemsize)), dtype=dt)[0]
            if vtype == T_BOOL:
                return bool(v)
            if vtype in (T_FLOAT32, T_FLOAT64):
                return float(v)
            return int(v)
        raise GGUFError("unknown metadata value type %d" % vtype)


class GGUFFile:
    """Parsed GGUF file: .version, .metadata (dict, in file order), .tensors (dict name->TensorInfo)."""

    def __init__(self, path):
        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mm))
        if bytes(cur.take(4)) != GGUF_MAGIC:
            raise GGUFError("%s: not a GGUF file (bad magic)" % path)
        self.version = cur.u32()
        if self.version not in (2, 3):
            raise GGUFError("%s: unsupported GGUF version %d" % (path, self.version))
        n_tensors = cur.u64()
        n_kv = cur.u64()
        self.metadata = {}
        self.metadata_types = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.u32()
            self.metadata[key] = cur.value(vtype)
            self.metadata_types[key] = vtype
        self.tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            ne = [cur.u64() for _ in range(n_dims)]
            type_id = cur.u32()
            offset = cur.u64()
            if name in self.tensors:
                raise GGUFError("duplicate tensor name %s" % name)
            self.tensors[name] = TensorInfo(name, ne, type_id, offset)
        self.alignment = int(self.metadata.get("general.alignment", 32))
        if self.alignment <= 0:
            raise GGUFError("bad general.alignment %d" % self.alignment)
        self.data_offset = (cur.pos + self.alignment - 1) // self.alignment * self.alignment
        for t in self.tensors.values():
            if t.offset % self.alignment:
                raise GGUFError("tensor %s: offset %d not aligned" % (t.name, t.offset))
            t.data_start = self.data_offset + t.offset
            if t.type_id in GGML_TYPES and t.data_start + t.nbytes > len(self._mm):
                raise GGUFError("tensor %s: data past end of file" % t.name)

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def raw(self, name):
        t = self.tensors[name]
        return np.asarray(self._mm[t.data_start:t.data_start + t.nbytes])

    def tensor(self, name):
        """The tensor dequantized to float32, numpy shape reversed(ne)."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t.type_id, t.n_elements).reshape(t.shape)


def _f16_from_bytes(two_byte_cols):
    return np.ascontiguousarray(two_byte_cols).view("<f2").astype(np.float32)[..., 0]


def dequantize(raw, type_id, n_elements):
    """raw: uint8 array of the tensor's bytes -> flat float32 array of n_elements."""
    raw = np.asarray(raw, dtype=np.uint8)
    if type_id == 0:    # f32
        out = raw.view("<f4").astype(np.float32)
    elif type_id == 1:  # f16 (IEEE half)
        out = raw.view("<f2").astype(np.float32)
    elif type_id == 30:  # bf16: the top 16 bits of a float32
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif type_id == 8:  # q8_0: block = f16 d, int8 qs[32]; x = d * q
        blocks = raw.reshape(-1, 34)
        d = _f16_from_bytes(blocks[:, 0:2])
        q = np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).astype(np.float32)
        out = (q * d[:, None]).reshape(-1)
    elif type_id == 2:  # q4_0: block = f16 d, uint8 qs[16]; j<16: low nibble of qs[j]; j>=16: high nibble of qs[j-16]
        blocks = raw.reshape(-1, 18)
        d = _f16_from_bytes(blocks[:, 0:2])
        qs = blocks[:, 2:18]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
        out = (q * d[:, None]).reshape(-1)
    else:
        name = GGML_TYPES.get(type_id, ("type%d" % type_id,))[0]
        raise GGUFError("dequantize: unsupported tensor type %s" % name)
    if out.size != n_elements:
        raise GGUFError("dequantize: got %d elements, expected %d" % (out.size, n_elements))
    return out.astype(np.float32, copy=False)


if __name__ == "__main__":
    import sys
    f = GGUFFile(sys.argv[1])
    print("GGUF v%d, alignment %d, %d kv, %d tensors" % (f.version, f.alignment, len(f.metadata), len(f.tensors)))
    for k, v in f.metadata.items():
        s = repr(v)
        print("  %s = %s" % (k, s if len(s) < 100 else s[:100] + "... (%d items)" % len(v)))
    for t in f.tensors.values():
        print("  %-28s %-5s ne=%s" % (t.name, t.type_name, t.ne))
