"""Independent numpy dequantization of GGML's q4_1, q5_0, q5_1, q4_K, q5_K and q6_K blocks.

Written from the published GGML block formats (ggml-common.h), not from Larder's C++. All
arithmetic is float32 in the same order as GGML's dequantize_row_* (numpy never fuses a
multiply and an add), so the results are bit-identical to GGML's.

Block layouts (little-endian; f16 = IEEE half):
  q4_1 (32 values, 20 bytes): f16 d, f16 m, u8 qs[16]
        x[j] = (qs[j] & 15) * d + m, x[j + 16] = (qs[j] >> 4) * d + m
  q5_0 (32, 22): f16 d, u32 qh, u8 qs[16]
        q[j] = (qs[j] & 15) | bit j of qh << 4, q[j + 16] = (qs[j] >> 4) | bit (j + 16) of qh << 4
        x = (q - 16) * d
  q5_1 (32, 24): f16 d, f16 m, u32 qh, u8 qs[16]; q as q5_0; x = q * d + m
  q4_K (256, 144): f16 d, f16 dmin, u8 scales[12], u8 qs[128]
        8 sub-blocks of 32 with 6-bit scale sc[j] and minimum mn[j]:
          j < 4:  sc = scales[j] & 63,  mn = scales[j + 4] & 63
          j >= 4: sc = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4
                  mn = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4
        chunk c (64 values) uses qs[32c .. 32c + 31]: low nibbles = sub-block 2c, high = 2c + 1
        x = (d * sc) * q - (dmin * mn)
  q5_K (256, 176): f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]
        as q4_K, plus the 5th bit of value l of sub-block j = bit j of qh[l]
  q6_K (256, 210): u8 ql[128], u8 qh[64], i8 scales[16], f16 d
        half h (128 values) uses ql[64h ..], qh[32h ..]; for l < 32:
          value 32k + l: low 4 bits = ql[l + 32 (k & 1)] (low nibble if k < 2 else high nibble),
                         top 2 bits = (qh[l] >> 2k) & 3
        x = (d * scales[i // 16]) * (q - 32)

Use `install()` to make gguf_reader.GGUFFile know these types, or call `dequantize` directly.
"""

import numpy as np

import gguf_reader as gr  # tests/reference is on sys.path, as for gguf_reader users

# id -> (name, elements per block, bytes per block)
KQUANT_TYPES = {
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210),
}

F32 = np.float32


def _f16(blocks, off):
    return np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2").astype(F32)[:, 0]


def _u32(blocks, off):
    return np.ascontiguousarray(blocks[:, off:off + 4]).view("<u4")[:, 0]


def _nibbles32(qs):
    """(nb, 16) packed bytes -> (nb, 32) values: low nibbles then high nibbles."""
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)


def _fifth_bits(qh):
    """(nb,) u32 -> (nb, 32) bit j of each."""
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1).astype(np.int32)


def dequantize_q4_1(raw):
    b = raw.reshape(-1, 20)
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles32(b[:, 4:20]).astype(F32)
    return (q * d[:, None] + m[:, None]).reshape(-1)


def dequantize_q5_0(raw):
    b = raw.reshape(-1, 22)
    d = _f16(b, 0)
    q = _nibbles32(b[:, 6:22]) | (_fifth_bits(_u32(b, 2)) << 4)
    return ((q - 16).astype(F32) * d[:, None]).reshape(-1)


def dequantize_q5_1(raw):
    b = raw.reshape(-1, 24)
    d, m = _f16(b, 0), _f16(b, 2)
    q = (_nibbles32(b[:, 8:24]) | (_fifth_bits(_u32(b, 4)) << 4)).astype(F32)
    return (q * d[:, None] + m[:, None]).reshape(-1)


def _k_scales(s):
    """(nb, 12) -> sc, mn as (nb, 8) float32."""
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), dtype=np.int32)
    mn = np.empty_like(sc)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(F32), mn.astype(F32)


def _k_low4(qs):
    """(nb, 128) -> (nb, 8, 32): sub-block 2c = low nibbles of qs[32c..], 2c + 1 = high nibbles."""
    q = qs.reshape(-1, 4, 32).astype(np.int32)
    return np.stack([q & 15, q >> 4], axis=2).reshape(-1, 8, 32)


def _k_combine(d, dmin, sc, mn, q):
    d1 = d[:, None] * sc          # float32 products, rounded like GGML's d * sc
    m1 = dmin[:, None] * mn
    return (d1[:, :, None] * q.astype(F32) - m1[:, :, None]).reshape(-1)


def dequantize_q4_K(raw):
    b = raw.reshape(-1, 144)
    sc, mn = _k_scales(b[:, 4:16])
    return _k_combine(_f16(b, 0), _f16(b, 2), sc, mn, _k_low4(b[:, 16:144]))


def dequantize_q5_K(raw):
    b = raw.reshape(-1, 176)
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].astype(np.int32)                                         # (nb, 32)
    high = (qh[:, None, :] >> np.arange(8)[None, :, None]) & 1                # (nb, 8, 32)
    return _k_combine(_f16(b, 0), _f16(b, 2), sc, mn, _k_low4(b[:, 48:176]) | (high << 4))


def dequantize_q6_K(raw):
    b = raw.reshape(-1, 210)
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 64).astype(np.int32)
    qh = b[:, 128:192].reshape(nb, 2, 32).astype(np.int32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(F32)      # (nb, 16)
    d = _f16(b, 208)
    q = np.empty((nb, 2, 4, 32), dtype=np.int32)
    for k in range(4):
        lb = ql[:, :, 32 * (k & 1):32 * (k & 1) + 32]
        low = (lb & 15) if k < 2 else (lb >> 4)
        q[:, :, k, :] = low | (((qh >> (2 * k)) & 3) << 4)
    q = (q.reshape(nb, 256) - 32).astype(F32)
    ds = d[:, None] * sc                                                      # (nb, 16)
    return (np.repeat(ds, 16, axis=1) * q).reshape(-1)


_DEQUANT = {
    3: dequantize_q4_1, 6: dequantize_q5_0, 7: dequantize_q5_1,
    12: dequantize_q4_K, 13: dequantize_q5_K, 14: dequantize_q6_K,
}

_base_dequantize = gr.dequantize


def dequantize(raw, type_id, n_elements):
    """Like gguf_reader.dequantize, for every type either module knows."""
    raw = np.asarray(raw, dtype=np.uint8)
    if type_id not in _DEQUANT:
        return _base_dequantize(raw, type_id, n_elements)
    out = _DEQUANT[type_id](raw)
    if out.size != n_elements:
        raise gr.GGUFError("dequantize: got %d elements, expected %d" % (out.size, n_elements))
    return out.astype(F32, copy=False)


def install():
    """Teach gguf_reader (GGML_TYPES sizes, GGUFFile.tensor) about these types."""
    gr.GGML_TYPES.update(KQUANT_TYPES)
    gr.dequantize = dequantize
