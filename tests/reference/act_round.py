"""Optional "activation rounding" for the float64 references: the input of a weight product is
quantized to 8 bits and dequantized again, as an engine with integer dot products (Larder, like
llama.cpp) does before multiplying it with a quantized weight. Written from the published formats
(GGML's q8_0 and q8_K blocks); no engine code.

The format depends on the weight's type (Larder on AVX-512, where these weights are repacked and
the packed kernels quantize the activations at EVERY batch size, prefill included):
  q4_0, q4_1, q5_0, q8_0  "q8_0": per 32-value block, in float32: amax = max|x|, d = amax / 127,
                          id = 1/d (0 when d = 0), q = round-half-to-even(x * id) clamped to
                          [-127, 127]; the block's value is q * f16(d) (d rounded to half precision,
                          nearest-even). q4_1 uses the same bytes (its minimum term multiplies
                          f16(d) * sum(q), i.e. the same rounded values).
  q4_K, q6_K              "q8_K": per 256-value block, in float32: mx = the first value with the
                          largest |x| (sign kept), iscale = -127 / mx, q = round-half-to-even(
                          iscale * x) clamped to [-127, 127], d = 1 / iscale kept as float32; the
                          value is q * d. An all-zero block stays zero.
  f32, f16, bf16          none: float32 activations (the float32 rounding of the f64 reference's
                          values is below anything measured here, so the input is left as is).
Other types (q5_1, q5_K, ...) are not packed by the engine: their activation format depends on the
batch size (8-bit for decode, f32 for prefill GEMM), so they are refused here.

round_activations(x, type_name) returns a float64 tensor of x's shape: the f32 activations' 8-bit
values, exactly as the engine's quantizer produces them from float32(x). What remains between such a
reference and the engine is f32 accumulation (~1e-7 relative per product) -- and the chaos of the
rounding itself: a value that lands within an f32 ulp of a rounding boundary can round the other
way, after which the two computations drift apart by the rounding's own size.
"""

import torch

_Q8_0_WEIGHTS = ("q4_0", "q4_1", "q5_0", "q8_0")
_Q8_K_WEIGHTS = ("q4_K", "q6_K")
_FLOAT_WEIGHTS = ("f32", "f16", "bf16")


def activation_format(type_name):
    """Weight type name (gguf_reader / kquants) -> "q8_0", "q8_K" or None (float activations)."""
    if type_name in _Q8_0_WEIGHTS:
        return "q8_0"
    if type_name in _Q8_K_WEIGHTS:
        return "q8_K"
    if type_name in _FLOAT_WEIGHTS:
        return None
    raise ValueError("activation rounding: no fixed activation format for weight type %r" % type_name)


def _round_q8_0(x32):
    """x32: float32 [..., n], n a multiple of 32 -> float64 rounded values."""
    shape = x32.shape
    b = x32.reshape(-1, 32)
    amax = b.abs().amax(dim=1, keepdim=True)
    d = torch.div(amax, torch.tensor(127.0, dtype=torch.float32))                        # f32
    inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))     # f32 1/d
    q = torch.round(b * inv).clamp_(-127, 127)                     # f32 product, nearest-even
    dh = d.to(torch.float16).to(torch.float64)                     # the f16 scale
    return (q.to(torch.float64) * dh).reshape(shape)


def _round_q8_K(x32):
    """x32: float32 [..., n], n a multiple of 256 -> float64 rounded values."""
    shape = x32.shape
    b = x32.reshape(-1, 256)
    ab = b.abs()
    amax = ab.amax(dim=1, keepdim=True)
    first = (ab == amax).to(torch.uint8).argmax(dim=1, keepdim=True)   # first index of the max |x|
    mx = b.gather(1, first)
    zero = amax == 0
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = torch.div(torch.full_like(mx, -127.0), mx)            # f32
    q = torch.round(b * iscale).clamp_(-127, 127)                  # f32 product, nearest-even
    d = torch.div(torch.ones_like(iscale), iscale)                 # f32, stored as float
    out = q.to(torch.float64) * d.to(torch.float64)
    out = torch.where(zero, torch.zeros_like(out), out)
    return out.reshape(shape)


def round_activations(x, type_name):
    """x: float64 [..., n] input of a product with a weight of type `type_name` -> the values the
    engine multiplies (float64; x itself when the format is float)."""
    fmt = activation_format(type_name)
    if fmt is None:
        return x
    blk = 32 if fmt == "q8_0" else 256
    if x.shape[-1] % blk:
        raise ValueError("activation rounding: row of %d not a multiple of %d" % (x.shape[-1], blk))
    x32 = x.to(torch.float32).contiguous()
    return _round_q8_0(x32) if fmt == "q8_0" else _round_q8_K(x32)


def round_input(cfg, x, name):
    """x rounded as the input of weight `name` (GGUF tensor name without ".weight"), by that weight's
    type from cfg["tensor_types"]; the tied "output" takes the embedding matrix's type."""
    types = cfg["tensor_types"]
    t = types.get(name + ".weight")
    if t is None and name == "output":
        t = types["token_embd.weight"]
    return round_activations(x, t)
