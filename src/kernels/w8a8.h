// W8A8 prefill with shadow outliers (after "Fast On-device LLM Inference with NPUs",
// Xu et al.): weights int8 with one scale per row; activations of a whole prompt
// chunk int8 with ONE scale per tensor. The rare activation channels whose magnitude
// would wreck that shared scale ("outliers") are taken out of the int8 product and
// computed in float, then added back.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/kernels.h"

namespace larder {
class ThreadPool;
}

namespace larder::kernels {

struct W8Tensor {
  int64_t rows = 0, cols = 0;
  int64_t rows_pad = 0, k4 = 0;   // rows rounded up to 16; cols rounded up to 4, divided by 4
  // VNNI layout: [rows_pad/16][k4][16 rows][4 k] int8, so one vpdpbusd gives 16 rows.
  std::vector<int8_t> packed;
  std::vector<float> scale;       // [rows_pad] dequant scale
  std::vector<int32_t> rowsum;    // [rows_pad] sum of q (removes the +128 activation offset)
  int8_t at(int64_t r, int64_t k) const { return packed[((r / 16 * k4 + k / 4) * 16 + r % 16) * 4 + k % 4]; }
};

// Quantizes any weight type (via its traits) to per-row int8.
std::unique_ptr<W8Tensor> w8_from_tensor(const DType type, const void* data, int64_t rows, int64_t cols,
                                         ThreadPool& pool);

struct W8A8Scratch {
  std::vector<uint8_t> xu;         // [tokens][k4*4] activations + 128
  std::vector<float> xo;           // [tokens][n_outliers] outlier activations
  std::vector<float> chan_absmax;  // [cols]
  std::vector<float> keep;         // [cols] 1 = in the int8 tensor, 0 = outlier channel
  std::vector<int32_t> outliers;   // outlier channel ids
  std::vector<float> wcol;         // [rows][n_outliers] outlier weight columns, dequantized
};

struct W8A8Stats {
  int64_t calls = 0, outlier_channels = 0, channels = 0;
};

// Outlier rule: channel absmax > kOutlierRatio x the median channel absmax (at most
// cols/kMaxOutlierFrac channels, the largest first).
constexpr float kOutlierRatio = 6.0f;
constexpr int kMaxOutlierFrac = 16;

// y[t][r] (ldy stride) = W x_t, for n_tokens rows of x [n_tokens][cols] f32.
void matmul_w8a8(const W8Tensor& W, const float* x, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool,
                 W8A8Scratch& scratch, Isa isa, W8A8Stats* stats = nullptr);

}  // namespace larder::kernels
