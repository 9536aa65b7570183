// GGML quantization formats q4_1, q5_0, q5_1, q4_K, q5_K, q6_K (+ activations q8_1, q8_K):
// quantize -> dequantize error bounds, exact decodes of hand-built blocks (expected values
// computed here from the published block layouts), edge cases, byte-exact agreement with
// GGML's reference quantizer (golden hashes), dot products on extreme blocks for every ISA
// path, and the model quantizer (llama.cpp recipes, errors, no partial output).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/mmap_file.h"
#include "kernels/kernels.h"
#include "kernels/quants.h"
#include "model/gguf.h"
#include "model/model.h"
#include "model/quantize.h"
#include "model/synth.h"

namespace fs = std::filesystem;
using namespace larder;
using namespace larder::kernels;

namespace {

const DType kWeightTypes[] = {DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};

std::vector<float> roundtrip(DType t, const std::vector<float>& x) {
  std::vector<uint8_t> q(row_bytes(t, static_cast<int64_t>(x.size())));
  quantize_row(t, x.data(), q.data(), static_cast<int64_t>(x.size()));
  std::vector<float> y(x.size());
  dequantize_row(t, q.data(), y.data(), static_cast<int64_t>(x.size()));
  return y;
}

double rel_rms(const std::vector<float>& x, const std::vector<float>& y) {
  double e = 0, s = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    e += (static_cast<double>(x[i]) - y[i]) * (static_cast<double>(x[i]) - y[i]);
    s += static_cast<double>(x[i]) * x[i];
  }
  return s > 0 ? std::sqrt(e / s) : std::sqrt(e);
}

std::vector<float> gaussian(size_t n, float sigma, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, sigma);
  std::vector<float> x(n);
  for (auto& v : x) v = nd(rng);
  return x;
}

// Stated bounds: relative RMS error sqrt(sum (x - deq(q(x)))^2 / sum x^2) on N(0, 1) data.
// Measured (65536 values, identical to GGML's reference quantizers): q4_1 0.0785, q5_0 0.0430,
// q5_1 0.0380, q4_K 0.0717, q5_K 0.0364, q6_K 0.0178, q8_1 0.0054, q8_K 0.0071.
// Bounds leave ~10% headroom.
double rms_bound(DType t) {
  switch (t) {
    case DType::Q4_1: return 0.086;
    case DType::Q5_0: return 0.047;
    case DType::Q5_1: return 0.042;
    case DType::Q4_K: return 0.079;
    case DType::Q5_K: return 0.040;
    case DType::Q6_K: return 0.0196;
    case DType::Q8_1: return 0.0060;
    case DType::Q8_K: return 0.0078;
    default: return 0;
  }
}

uint64_t fnv1a(const void* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<const uint8_t*>(p)[i];
    h *= 1099511628211ull;
  }
  return h;
}

struct IsaGuard {
  Isa saved = active_isa();
  ~IsaGuard() { set_isa(saved); }
};

std::vector<Isa> paths() {
  std::vector<Isa> v{Isa::Scalar};
  if (detected_isa() >= Isa::AVX2) v.push_back(Isa::AVX2);
  if (detected_isa() >= Isa::AVX512) v.push_back(Isa::AVX512);
  return v;
}

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/larder_quants_XXXXXX";
    path = mkdtemp(t);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& n) const { return path + "/" + n; }
};

}  // namespace

TEST(Quants, BlockSizesMatchGgml) {
  EXPECT_EQ(row_bytes(DType::Q4_1, 32), 20u);
  EXPECT_EQ(row_bytes(DType::Q5_0, 32), 22u);
  EXPECT_EQ(row_bytes(DType::Q5_1, 32), 24u);
  EXPECT_EQ(row_bytes(DType::Q8_1, 32), 36u);
  EXPECT_EQ(row_bytes(DType::Q4_K, 256), 144u);
  EXPECT_EQ(row_bytes(DType::Q5_K, 256), 176u);
  EXPECT_EQ(row_bytes(DType::Q6_K, 256), 210u);
  EXPECT_EQ(row_bytes(DType::Q8_K, 256), 292u);
  for (DType t : kWeightTypes) {
    ASSERT_TRUE(dtype_info(t)->computable) << dtype_name(t);
    const TypeTraits* tr = type_traits(t);
    ASSERT_TRUE(tr && tr->to_float && tr->from_float && tr->vec_dot[0]) << dtype_name(t);
    ASSERT_TRUE(type_traits(tr->vec_dot_type)->from_float) << dtype_name(t);
  }
  EXPECT_EQ(type_traits(DType::Q4_1)->vec_dot_type, DType::Q8_1);
  EXPECT_EQ(type_traits(DType::Q5_1)->vec_dot_type, DType::Q8_1);
  EXPECT_EQ(type_traits(DType::Q5_0)->vec_dot_type, DType::Q8_0);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) EXPECT_EQ(type_traits(t)->vec_dot_type, DType::Q8_K);
}

TEST(Quants, GaussianRmsErrorBounds) {
  const auto x = gaussian(65536, 1.0f, 7);
  for (DType t : {DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::Q8_1, DType::Q8_K}) {
    const double e = rel_rms(x, roundtrip(t, x));
    std::printf("  %-5s relative RMS error %.4f (bound %.4f)\n", dtype_name(t), e, rms_bound(t));
    EXPECT_LT(e, rms_bound(t)) << dtype_name(t);
    // Scale invariance: the same data times 1e4 and 1e-2 quantizes as well (f16 scales stay normal).
    for (float s : {1e4f, 1e-2f}) {
      std::vector<float> xs(x);
      for (auto& v : xs) v *= s;
      EXPECT_LT(rel_rms(xs, roundtrip(t, xs)), rms_bound(t) * 1.02) << dtype_name(t) << " scale " << s;
    }
  }
  // More bits, less error.
  EXPECT_LT(rel_rms(x, roundtrip(DType::Q5_K, x)), rel_rms(x, roundtrip(DType::Q4_K, x)));
  EXPECT_LT(rel_rms(x, roundtrip(DType::Q6_K, x)), rel_rms(x, roundtrip(DType::Q5_K, x)));
  EXPECT_LT(rel_rms(x, roundtrip(DType::Q5_1, x)), rel_rms(x, roundtrip(DType::Q4_1, x)));
}

// Same bytes and floats as GGML's quantize_row_*_ref / dequantize_row_* (hashes recorded
// from libggml-base on a deterministic input; includes an all-zero and a constant super-block).
TEST(Quants, ByteExactWithGgmlReference) {
  const int N = 2048;
  std::vector<float> x(N);
  for (int i = 0; i < N; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    const float u = static_cast<float>(h & 0xFFFFFF) / 16777216.0f;
    x[i] = (u - 0.5f) * 4;
    if (i % 37 == 0) x[i] *= 8;
    if (i / 256 == 3) x[i] = 0;
    if (i / 256 == 5) x[i] = 0.75f;
  }
  struct G {
    DType t;
    uint64_t bytes, floats;
  } golden[] = {
      {DType::Q4_1, 0xb0cceb54984d5b07ull, 0x314eb281415527e5ull},
      {DType::Q5_0, 0x94534706b6961280ull, 0xdb4fd5190874d3cbull},
      {DType::Q5_1, 0x9f1a0b947b0c7246ull, 0xe1998efaa15678d1ull},
      {DType::Q4_K, 0x673170f1f2dcbc84ull, 0x1ee9f7b1ee504fcdull},
      {DType::Q5_K, 0xb805cf6f7400b86bull, 0x60642a75a2b484b2ull},
      {DType::Q6_K, 0x7afc9899e220973bull, 0x42a47f89d410b734ull},
  };
  for (const G& g : golden) {
    std::vector<uint8_t> q(row_bytes(g.t, N));
    quantize_row(g.t, x.data(), q.data(), N);
    std::vector<float> y(N);
    dequantize_row(g.t, q.data(), y.data(), N);
    EXPECT_EQ(fnv1a(q.data(), q.size()), g.bytes) << dtype_name(g.t) << " quantized bytes differ from GGML's";
    EXPECT_EQ(fnv1a(y.data(), y.size() * 4), g.floats) << dtype_name(g.t) << " dequantized floats differ from GGML's";
  }
}

// ---------------------------------------------------------------- hand-built blocks

TEST(Quants, DecodeHandBuiltQ4_1) {
  BlockQ4_1 b{};
  b.d = fp32_to_fp16(0.5f);
  b.m = fp32_to_fp16(-1.0f);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | (15 - j) << 4);
  float y[32];
  dequantize_row(DType::Q4_1, &b, y, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * j - 1.0f) << j;
    EXPECT_EQ(y[j + 16], 0.5f * (15 - j) - 1.0f) << j;
  }
}

TEST(Quants, DecodeHandBuiltQ5_0AndQ5_1) {
  const uint32_t qh = 0xA5A5F00Fu;  // bit j = 5th bit of element j
  BlockQ5_0 a{};
  a.d = fp32_to_fp16(0.25f);
  std::memcpy(a.qh, &qh, 4);
  BlockQ5_1 b{};
  b.d = fp32_to_fp16(0.125f);
  b.m = fp32_to_fp16(2.0f);
  std::memcpy(b.qh, &qh, 4);
  for (int j = 0; j < 16; ++j) a.qs[j] = b.qs[j] = static_cast<uint8_t>((j * 7 + 3) & 0xFF);
  float ya[32], yb[32];
  dequantize_row(DType::Q5_0, &a, ya, 32);
  dequantize_row(DType::Q5_1, &b, yb, 32);
  for (int e = 0; e < 32; ++e) {
    const int nib = e < 16 ? (a.qs[e] & 15) : (a.qs[e - 16] >> 4);
    const int q = nib | static_cast<int>((qh >> e) & 1) << 4;
    EXPECT_EQ(ya[e], 0.25f * (q - 16)) << e;
    EXPECT_EQ(yb[e], 0.125f * q + 2.0f) << e;
  }
}

namespace {
// The 12-byte scale layout of q4_K/q5_K, written out from the format description:
// bytes 0..3: scale[0..3] (6 bits) | top 2 bits of scale[4..7] in bits 6..7
// bytes 4..7: min[0..3] (6 bits)   | top 2 bits of min[4..7] in bits 6..7
// bytes 8..11: low 4 bits of scale[4..7] | low 4 bits of min[4..7] << 4
void pack_k_scales(const int sc[8], const int mn[8], uint8_t out[12]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = static_cast<uint8_t>(sc[j] | (sc[j + 4] >> 4) << 6);
    out[j + 4] = static_cast<uint8_t>(mn[j] | (mn[j + 4] >> 4) << 6);
    out[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | (mn[j + 4] & 15) << 4);
  }
}
const int kSc[8] = {1, 2, 3, 4, 40, 50, 60, 63};
const int kMn[8] = {0, 5, 10, 63, 17, 33, 48, 2};
}  // namespace

TEST(Quants, DecodeHandBuiltQ4_K) {
  BlockQ4_K b{};
  b.d = fp32_to_fp16(1.0f);
  b.dmin = fp32_to_fp16(0.5f);
  pack_k_scales(kSc, kMn, b.scales);
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>((i * 7) & 0xFF);
  for (int j = 0; j < 8; ++j) {
    uint8_t s, m;
    get_scale_min_k4(j, b.scales, &s, &m);
    EXPECT_EQ(s, kSc[j]);
    EXPECT_EQ(m, kMn[j]);
  }
  float y[256];
  dequantize_row(DType::Q4_K, &b, y, 256);
  for (int e = 0; e < 256; ++e) {
    const int j = e / 32, l = e % 32, c = j / 2;  // sub-block, index, 64-element chunk
    const int q = j % 2 == 0 ? (b.qs[32 * c + l] & 15) : (b.qs[32 * c + l] >> 4);
    EXPECT_EQ(y[e], 1.0f * kSc[j] * q - 0.5f * kMn[j]) << e;
  }
}

TEST(Quants, DecodeHandBuiltQ5_K) {
  BlockQ5_K b{};
  b.d = fp32_to_fp16(0.25f);
  b.dmin = fp32_to_fp16(1.0f);
  pack_k_scales(kSc, kMn, b.scales);
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>((i * 13 + 5) & 0xFF);
  for (int i = 0; i < 32; ++i) b.qh[i] = static_cast<uint8_t>((i * 37) & 0xFF);
  float y[256];
  dequantize_row(DType::Q5_K, &b, y, 256);
  for (int e = 0; e < 256; ++e) {
    const int j = e / 32, l = e % 32, c = j / 2;
    const int nib = j % 2 == 0 ? (b.qs[32 * c + l] & 15) : (b.qs[32 * c + l] >> 4);
    const int q = nib | ((b.qh[l] >> j) & 1) << 4;  // sub-block j takes bit j of qh[l]
    EXPECT_EQ(y[e], 0.25f * kSc[j] * q - 1.0f * kMn[j]) << e;
  }
}

TEST(Quants, DecodeHandBuiltQ6_K) {
  BlockQ6_K b{};
  b.d = fp32_to_fp16(0.5f);
  const int sc[16] = {-128, -64, -1, 0, 1, 2, 3, 7, 15, 31, 63, 127, -2, -3, -100, 100};
  for (int g = 0; g < 16; ++g) b.scales[g] = static_cast<int8_t>(sc[g]);
  for (int i = 0; i < 128; ++i) b.ql[i] = static_cast<uint8_t>((i * 11) & 0xFF);
  for (int i = 0; i < 64; ++i) b.qh[i] = static_cast<uint8_t>((i * 29 + 3) & 0xFF);
  float y[256];
  dequantize_row(DType::Q6_K, &b, y, 256);
  for (int e = 0; e < 256; ++e) {
    // 128-element halves; within a half, element 32*k + l (k < 4) has its low 4 bits in
    // ql[64h + l + 32*(k & 1)] (low nibble for k < 2, high for k >= 2) and its top 2 bits in
    // bits 2k..2k+1 of qh[32h + l].
    const int h = e / 128, r = e % 128, k = r / 32, l = r % 32;
    const uint8_t lb = b.ql[64 * h + l + 32 * (k & 1)];
    const int lo = k < 2 ? (lb & 15) : (lb >> 4);
    const int hi = (b.qh[32 * h + l] >> (2 * k)) & 3;
    const int q = (lo | hi << 4) - 32;
    EXPECT_EQ(y[e], 0.5f * sc[e / 16] * q) << e;
  }
}

TEST(Quants, Q8ActivationFormats) {
  // q8_1: d = amax / 127, s = d * sum(q) (both f16).
  std::vector<float> x(64);
  for (int i = 0; i < 64; ++i) x[i] = (i % 2 ? -1.f : 1.f) * static_cast<float>(i) / 8;
  std::vector<BlockQ8_1> a(2);
  quantize_row(DType::Q8_1, x.data(), a.data(), 64);
  for (int b = 0; b < 2; ++b) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) sum += a[b].qs[j];
    const float d = fp16_to_fp32(a[b].d);
    EXPECT_NEAR(d, (32.0f * b + 31) / 8 / 127, 1e-3 * d);
    EXPECT_EQ(a[b].s, fp32_to_fp16(sum * d));
    EXPECT_EQ(std::abs(a[b].qs[31]), 127);
  }
  // Every ISA path gives the same q8_1 bytes, including exact .5 ties (rounded away from zero, as
  // GGML's reference does), NaN and an all-zero block.
  {
    std::vector<float> t = gaussian(128, 40.f, 6);
    t[0] = 127.f;  // block 0: scale exactly 1, so these are ties
    t[1] = 2.5f, t[2] = -3.5f, t[3] = 0.5f, t[4] = -0.5f, t[5] = 126.5f;
    for (int i = 32; i < 64; ++i) t[i] = 0;  // block 1: zero
    t[70] = NAN;                             // block 2
    IsaGuard guard;
    std::vector<BlockQ8_1> ref(4), got(4);
    set_isa(Isa::Scalar);
    quantize_row(DType::Q8_1, t.data(), ref.data(), 128);
    EXPECT_EQ(ref[0].qs[1], 3);
    EXPECT_EQ(ref[0].qs[2], -4);
    EXPECT_EQ(ref[0].qs[3], 1);
    EXPECT_EQ(ref[0].qs[4], -1);
    for (Isa isa : paths()) {
      set_isa(isa);
      quantize_row(DType::Q8_1, t.data(), got.data(), 128);
      EXPECT_EQ(std::memcmp(got.data(), ref.data(), sizeof(BlockQ8_1) * 4), 0) << isa_name(isa);
    }
  }
  // q8_K: float d, bsums = sums of 16 quants; every ISA path gives the same bytes (ties in
  // magnitude resolved by the first element, NaN/Inf handled alike).
  std::vector<float> xk = gaussian(1024, 3.0f, 5);
  xk[300] = -xk[40] * 4;  // block 1: largest magnitude appears twice with both signs
  xk[301] = xk[40] * 4;
  for (int i = 512; i < 768; ++i) xk[i] = 0;  // block 2: all zero
  xk[800] = NAN;                              // block 3: NaN and Inf
  xk[900] = INFINITY;
  std::vector<BlockQ8_K> k(4);
  {
    IsaGuard guard;
    std::vector<BlockQ8_K> ref(4);
    set_isa(Isa::Scalar);
    quantize_row(DType::Q8_K, xk.data(), ref.data(), 1024);
    for (Isa isa : paths()) {
      set_isa(isa);
      quantize_row(DType::Q8_K, xk.data(), k.data(), 1024);
      EXPECT_EQ(std::memcmp(k.data(), ref.data(), sizeof(BlockQ8_K) * 4), 0) << isa_name(isa);
    }
  }
  for (int b = 0; b < 2; ++b)
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int l = 0; l < 16; ++l) s += k[b].qs[16 * g + l];
      EXPECT_EQ(k[b].bsums[g], s);
    }
}

// ---------------------------------------------------------------- edge cases

TEST(Quants, ZeroConstantAndMixedBlocks) {
  const int n = 1024;
  for (DType t : kWeightTypes) {
    std::vector<float> zero(n, 0.f);
    for (float v : roundtrip(t, zero)) ASSERT_EQ(v, 0.f) << dtype_name(t);
    // Constant blocks decode close to the constant (all formats have a scale or a minimum
    // that represents it up to f16 and 6-bit scale rounding) ...
    for (float c : {0.75f, -3.5f, 0.1f, 250.f}) {
      std::vector<float> x(n, c);
      for (float v : roundtrip(t, x)) ASSERT_NEAR(v, c, 0.005 * std::fabs(c)) << dtype_name(t) << " c=" << c;
    }
    // ... less precisely once the K-quant super-block scale (about c / 1000) is an f16 subnormal
    // (GGML behaves the same).
    {
      std::vector<float> x(n, 1e-3f);
      for (float v : roundtrip(t, x)) ASSERT_NEAR(v, 1e-3f, 0.05e-3f) << dtype_name(t);
    }
    // A row mixing an all-zero block, a constant block and an outlier block: blocks are independent.
    const int bs = dtype_info(t)->block_size;
    std::vector<float> x = gaussian(4 * bs, 1.0f, 11);
    for (int i = 0; i < bs; ++i) x[i] = 0;
    for (int i = bs; i < 2 * bs; ++i) x[i] = 0.5f;
    x[2 * bs + 3] = 1000.f;
    const auto y = roundtrip(t, x);
    for (int i = 0; i < bs; ++i) ASSERT_EQ(y[i], 0.f) << dtype_name(t);
    for (int i = bs; i < 2 * bs; ++i) ASSERT_NEAR(y[i], 0.5f, 0.005f) << dtype_name(t);
    EXPECT_NEAR(y[2 * bs + 3], 1000.f, 1000.f * 0.05) << dtype_name(t) << " keeps the outlier";
    std::vector<float> last(x.begin() + 3 * bs, x.end()), ylast(y.begin() + 3 * bs, y.end());
    EXPECT_LT(rel_rms(last, ylast), rms_bound(t) * 1.5) << dtype_name(t);
  }
}

TEST(Quants, TinyHugeAndNonFiniteInputs) {
  const int n = 512;
  for (DType t : kWeightTypes) {
    // Tiny values: the f16 scales underflow to subnormals or zero, so precision is lost (as in
    // GGML), but the decode stays finite and of the input's magnitude.
    std::vector<float> tiny = gaussian(n, 1e-7f, 3);
    const auto yt = roundtrip(t, tiny);
    float amax = 0;
    for (float v : tiny) amax = std::max(amax, std::fabs(v));
    for (float v : yt) {
      ASSERT_TRUE(std::isfinite(v)) << dtype_name(t);
      ASSERT_LE(std::fabs(v), 8 * amax) << dtype_name(t);
    }
    // Large values within f16 range of the scales.
    std::vector<float> huge = gaussian(n, 3000.f, 4);
    EXPECT_LT(rel_rms(huge, roundtrip(t, huge)), rms_bound(t) * 1.5) << dtype_name(t);
    // NaN / Inf inputs must not crash the quantizer (the model quantizer rejects them earlier).
    std::vector<float> bad = gaussian(n, 1.f, 5);
    bad[3] = NAN;
    bad[40] = INFINITY;
    bad[300] = -INFINITY;
    std::vector<uint8_t> q(row_bytes(t, n));
    quantize_row(t, bad.data(), q.data(), n);
    std::vector<float> y(n);
    dequantize_row(t, q.data(), y.data(), n);
  }
}

// ---------------------------------------------------------------- dot products

// Saturation corner cases: weights at the ends of their quant range and activations at +-127,
// plus random blocks, for every ISA path, against a double-precision reference computed from
// the dequantized operands.
TEST(Quants, DotProductsExtremeBlocksAllPaths) {
  IsaGuard guard;
  std::mt19937 rng(9);
  for (DType t : kWeightTypes) {
    const DType at = type_traits(t)->vec_dot_type;
    const int n = 4 * 256 + (dtype_info(t)->block_size == 32 ? 96 : 0);
    for (int pattern = 0; pattern < 6; ++pattern) {
      std::vector<float> w(n), x(n);
      for (int i = 0; i < n; ++i) {
        switch (pattern) {
          case 0: w[i] = 1.f; x[i] = 1.f; break;                         // max quant x max activation
          case 1: w[i] = -1.f; x[i] = 1.f; break;
          case 2: w[i] = i % 2 ? 1.f : -1.f; x[i] = i % 2 ? -1.f : 1.f; break;
          case 3: w[i] = (i % 32) / 31.f; x[i] = -1.f; break;              // full ramp of quants
          case 4: w[i] = i % 7 == 0 ? 5.f : 0.01f; x[i] = i % 5 == 0 ? -3.f : 1.f; break;
          default: w[i] = std::normal_distribution<float>(0, 1)(rng); x[i] = std::normal_distribution<float>(0, 1)(rng);
        }
      }
      std::vector<uint8_t> wq(row_bytes(t, n)), xq(row_bytes(at, n));
      quantize_row(t, w.data(), wq.data(), n);
      quantize_row(at, x.data(), xq.data(), n);
      std::vector<float> wd(n), xd(n);
      dequantize_row(t, wq.data(), wd.data(), n);
      dequantize_row(at, xq.data(), xd.data(), n);
      double ref = 0, mag = 0;
      for (int i = 0; i < n; ++i) {
        ref += static_cast<double>(wd[i]) * xd[i];
        mag += std::fabs(static_cast<double>(wd[i]) * xd[i]);
      }
      for (Isa isa : paths()) {
        const float got = vec_dot_fn(t, isa)(wq.data(), xq.data(), n);
        EXPECT_LE(std::fabs(got - ref), 1e-5 * mag + 1e-6)
            << dtype_name(t) << " " << isa_name(isa) << " pattern " << pattern << " got " << got << " ref " << ref;
      }
    }
  }
}

// Every row length from one super-block up (the AVX-512 kernels have no tail code, but their
// per-block lane bookkeeping must hold for any count), with scales and minimums that vary by
// sub-block, against the scalar path of the same type.
TEST(Quants, KQuantDotsMatchScalarEveryLength) {
  IsaGuard guard;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0, 1);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    for (int nb : {1, 2, 3, 5, 8}) {
      const int n = 256 * nb;
      std::vector<float> w(n), x(n);
      for (int i = 0; i < n; ++i) {
        w[i] = nd(rng) * (1 + (i / 32) % 7) + ((i / 16) % 3 == 0 ? 2.f : 0.f);
        x[i] = nd(rng) * (1 + (i / 64) % 3);
      }
      std::vector<uint8_t> wq(row_bytes(t, n)), xq(row_bytes(DType::Q8_K, n));
      quantize_row(t, w.data(), wq.data(), n);
      quantize_row(DType::Q8_K, x.data(), xq.data(), n);
      const float ref = vec_dot_fn(t, Isa::Scalar)(wq.data(), xq.data(), n);
      for (Isa isa : paths()) {
        const float got = vec_dot_fn(t, isa)(wq.data(), xq.data(), n);
        EXPECT_NEAR(got, ref, 1e-5 * (std::fabs(ref) + 1)) << dtype_name(t) << " " << isa_name(isa) << " n " << n;
      }
    }
  }
}

// ---------------------------------------------------------------- model quantizer

namespace {
Status make_model(const std::string& path, int n_layer, int n_embd, int n_ff, bool tied = false) {
  SynthShape s;
  s.n_layer = n_layer;
  s.n_embd = n_embd;
  s.n_ff = n_ff;
  s.n_head = 4;
  s.n_head_kv = 2;
  s.n_vocab = 512;
  s.n_ctx = 64;
  s.tied = tied;
  SynthOptions o;
  o.progress = false;
  return synth_model(s, o, path);
}

std::map<std::string, DType> plan_types(const std::string& path, const char* type) {
  auto g = GgufFile::open(path);
  EXPECT_TRUE(g.ok()) << (g.ok() ? "" : g.error());
  auto ft = parse_quant_file_type(type);
  EXPECT_TRUE(ft.ok());
  std::map<std::string, DType> m;
  for (const auto& p : plan_quantization(**g, *ft)) m[p.name] = p.to;
  return m;
}
}  // namespace

TEST(Quantize, ParseFileTypes) {
  struct {
    const char* s;
    DType base;
    int ftype;
  } cases[] = {{"f32", DType::F32, 0},     {"F16", DType::F16, 1},     {"bf16", DType::BF16, 32},
               {"q8_0", DType::Q8_0, 7},   {"Q4_0", DType::Q4_0, 2},   {"q4_1", DType::Q4_1, 3},
               {"q5_0", DType::Q5_0, 8},   {"q5_1", DType::Q5_1, 9},   {"q4_K", DType::Q4_K, 14},
               {"Q4_K_S", DType::Q4_K, 14}, {"q4_k_m", DType::Q4_K, 15}, {"q5_K", DType::Q5_K, 16},
               {"Q5_K_M", DType::Q5_K, 17}, {"Q6_K", DType::Q6_K, 18}};
  for (auto& c : cases) {
    auto r = parse_quant_file_type(c.s);
    ASSERT_TRUE(r.ok()) << c.s;
    EXPECT_EQ(r->base, c.base) << c.s;
    EXPECT_EQ(r->llama_ftype, c.ftype) << c.s;
  }
  auto bad = parse_quant_file_type("q3_K");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().find("Q4_K_M"), std::string::npos) << "the error lists the valid types";
}

// llama.cpp's recipe: output -> q6_K; attn_v and ffn_down -> q6_K on "use_more_bits" layers
// (first eighth, last eighth, every third in between); Q4_K_S: attn_v of the first 4 layers and
// ffn_down of the first eighth -> q5_K; norms stay f32.
TEST(Quantize, RecipesMatchLlamaCpp) {
  TempDir d;
  const std::string f = d.file("m.gguf");
  ASSERT_TRUE(make_model(f, 16, 256, 512).ok());
  auto more = [](int i) { return i < 2 || i >= 14 || (i - 2) % 3 == 2; };  // n_layer 16
  auto m = plan_types(f, "Q4_K_M");
  EXPECT_EQ(m["output.weight"], DType::Q6_K);
  EXPECT_EQ(m["token_embd.weight"], DType::Q4_K);
  EXPECT_EQ(m["output_norm.weight"], DType::F32);
  for (int i = 0; i < 16; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    EXPECT_EQ(m[p + "attn_v.weight"], more(i) ? DType::Q6_K : DType::Q4_K) << i;
    EXPECT_EQ(m[p + "ffn_down.weight"], more(i) ? DType::Q6_K : DType::Q4_K) << i;
    for (const char* n : {"attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight"})
      EXPECT_EQ(m[p + n], DType::Q4_K) << p << n;
    EXPECT_EQ(m[p + "attn_norm.weight"], DType::F32);
  }
  auto m5 = plan_types(f, "Q5_K_M");
  EXPECT_EQ(m5["output.weight"], DType::Q6_K);
  for (int i = 0; i < 16; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    EXPECT_EQ(m5[p + "attn_v.weight"], more(i) ? DType::Q6_K : DType::Q5_K) << i;
    EXPECT_EQ(m5[p + "attn_q.weight"], DType::Q5_K) << i;
  }
  auto s = plan_types(f, "q4_K");
  for (int i = 0; i < 16; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    EXPECT_EQ(s[p + "attn_v.weight"], i < 4 ? DType::Q5_K : DType::Q4_K) << i;
    EXPECT_EQ(s[p + "ffn_down.weight"], i < 2 ? DType::Q5_K : DType::Q4_K) << i;
  }
  // Legacy types also give the output q6_K (llama.cpp does); q8_0 keeps q8_0; float types are uniform.
  EXPECT_EQ(plan_types(f, "q4_0")["output.weight"], DType::Q6_K);
  EXPECT_EQ(plan_types(f, "q5_1")["blk.3.attn_v.weight"], DType::Q5_1);
  EXPECT_EQ(plan_types(f, "q8_0")["output.weight"], DType::Q8_0);
  EXPECT_EQ(plan_types(f, "f16")["output.weight"], DType::F16);
  EXPECT_EQ(plan_types(f, "f16")["blk.0.ffn_norm.weight"], DType::F32);
}

// Rows that are not whole blocks fall back like llama.cpp: q4_K -> q5_0, q5_K -> q5_1,
// q6_K -> q8_0, then f16; a tied embedding takes the output's type.
TEST(Quantize, FallbackForRaggedRows) {
  TempDir d;
  const std::string f = d.file("m.gguf");
  ASSERT_TRUE(make_model(f, 2, 64, 172, /*tied=*/true).ok());
  auto m = plan_types(f, "Q4_K_M");
  EXPECT_EQ(m.count("output.weight"), 0u);
  EXPECT_EQ(m["token_embd.weight"], DType::Q8_0);  // output treatment; 64 % 256 != 0 -> q8_0
  EXPECT_EQ(m["blk.0.attn_q.weight"], DType::Q5_0);
  EXPECT_EQ(m["blk.0.ffn_gate.weight"], DType::Q5_0);
  EXPECT_EQ(m["blk.0.ffn_down.weight"], DType::F16);  // 172 columns: q4_K -> q5_0 -> f16
  EXPECT_EQ(m["blk.1.ffn_down.weight"], DType::F16);  // q6_K -> q8_0 -> f16
  EXPECT_EQ(m["blk.1.attn_v.weight"], DType::Q8_0);   // q6_K -> q8_0 (64 columns)
  auto q5 = plan_types(f, "q5_K");
  EXPECT_EQ(q5["blk.0.attn_k.weight"], DType::Q5_1);
  EXPECT_EQ(plan_types(f, "q4_0")["blk.0.ffn_down.weight"], DType::F16);
}

TEST(Quantize, WritesLoadableModelsAndCopiesMetadata) {
  TempDir d;
  const std::string in = d.file("f32.gguf");
  ASSERT_TRUE(make_model(in, 2, 256, 512).ok());
  auto src = GgufFile::open(in);
  ASSERT_TRUE(src.ok());
  for (const char* type : {"q4_1", "q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "Q4_K_M", "bf16"}) {
    const std::string out = d.file(std::string(type) + ".gguf");
    auto ft = parse_quant_file_type(type);
    ASSERT_TRUE(ft.ok());
    auto r = quantize_gguf(in, out, *ft);
    ASSERT_TRUE(r.ok()) << type << ": " << r.error();
    EXPECT_LT(r->bytes_out, r->bytes_in) << type;
    auto gr = GgufFile::open(out);
    ASSERT_TRUE(gr.ok()) << gr.error();
    const GgufFile* g = gr->get();
    EXPECT_EQ(g->get_int("general.file_type").value_or(-1), ft->llama_ftype) << type;
    EXPECT_EQ(g->get_int("general.quantization_version").value_or(-1), 2);
    for (const auto& kv : (*src)->kv()) {
      if (kv.first != "general.file_type") {
        EXPECT_NE(g->find(kv.first), nullptr) << type << " lost " << kv.first;
      }
    }
    ASSERT_EQ(g->tensors().size(), (*src)->tensors().size());
    auto m = load_model(out);
    ASSERT_TRUE(m.ok()) << type << ": " << m.error();
    EXPECT_FALSE(file_exists(out + ".tmp"));
  }
}

TEST(Quantize, ErrorsLeaveNoOutput) {
  TempDir d;
  auto ft = parse_quant_file_type("q4_K");
  ASSERT_TRUE(ft.ok());
  const std::string out = d.file("out.gguf");
  auto r = quantize_gguf(d.file("missing.gguf"), out, *ft);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("missing.gguf"), std::string::npos) << r.error();
  {
    FILE* f = std::fopen(d.file("junk.gguf").c_str(), "wb");
    std::fputs("this is not a gguf file at all", f);
    std::fclose(f);
  }
  r = quantize_gguf(d.file("junk.gguf"), out, *ft);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("GGUF"), std::string::npos) << r.error();
  const std::string in = d.file("f32.gguf");
  ASSERT_TRUE(make_model(in, 1, 256, 256).ok());
  r = quantize_gguf(in, d.file("no/such/dir/out.gguf"), *ft);
  ASSERT_FALSE(r.ok());
  EXPECT_FALSE(file_exists(out));
  EXPECT_FALSE(file_exists(out + ".tmp"));
}

// The SIMD dequantizers (prefill, embeddings) give the same bits as the scalar reference, for
// quantized data and for arbitrary block bytes.
TEST(Quants, DequantizeSameBitsOnEveryPath) {
  IsaGuard guard;
  std::mt19937 rng(21);
  for (DType t : kWeightTypes) {
    const int n = 8 * 256;
    std::vector<uint8_t> q(row_bytes(t, n));
    for (int mode = 0; mode < 2; ++mode) {
      if (mode == 0) {
        const auto x = gaussian(n, 0.7f, 8);
        quantize_row(t, x.data(), q.data(), n);
      } else {
        for (auto& b : q) b = static_cast<uint8_t>(rng());
      }
      set_isa(Isa::Scalar);
      std::vector<float> ref(n), got(n);
      dequantize_row(t, q.data(), ref.data(), n);
      for (Isa isa : paths()) {
        set_isa(isa);
        dequantize_row(t, q.data(), got.data(), n);
        EXPECT_EQ(std::memcmp(ref.data(), got.data(), n * 4), 0) << dtype_name(t) << " " << isa_name(isa) << " mode " << mode;
      }
    }
  }
}

// The AVX-512 scale searches of the K-quant quantizers produce the scalar reference's bytes
// (which are GGML's) on varied data: Gaussian at several scales, heavy tails, sparse rows and
// values on a coarse grid (many exact ties).
TEST(Quants, QuantizeSameBytesOnEveryPath) {
  IsaGuard guard;
  const int n = 256 * 6;
  for (int kind = 0; kind < 5; ++kind) {
    std::vector<float> x = gaussian(n, kind == 1 ? 1e-3f : kind == 2 ? 50.f : 1.f, 40 + kind);
    if (kind == 3)
      for (size_t i = 0; i < x.size(); ++i) x[i] = i % 7 ? 0.f : x[i] * x[i] * x[i];
    if (kind == 4)
      for (auto& v : x) v = std::round(v * 4) / 4;
    for (DType t : kWeightTypes) {
      std::vector<uint8_t> ref(row_bytes(t, n)), got(ref.size());
      set_isa(Isa::Scalar);
      quantize_row(t, x.data(), ref.data(), n);
      for (Isa isa : paths()) {
        set_isa(isa);
        quantize_row(t, x.data(), got.data(), n);
        EXPECT_EQ(std::memcmp(ref.data(), got.data(), ref.size()), 0) << dtype_name(t) << " " << isa_name(isa) << " kind " << kind;
      }
    }
  }
}
