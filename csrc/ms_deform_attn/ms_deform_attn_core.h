// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// A sampling location (x, y) in [0, 1] on an H x W map is read at pixel coordinate
// (x * W - 0.5, y * H - 0.5) with bilinear interpolation and zeros outside the map
// (grid_sample with align_corners=False, padding_mode="zeros").
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace cqdino {
namespace msda {

// The four corners of one bilinear sample, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename acc_t, typename index_t>
struct Corners {
  index_t offset[4];  // pixel index y * W + x inside the level (0 for corners outside the map)
  acc_t weight[4];    // bilinear weight (0 for corners outside the map)
  acc_t dw_dx[4];     // d weight / d pixel x (0 for corners outside the map)
  acc_t dw_dy[4];     // d weight / d pixel y
  acc_t lx, ly;       // fractional position inside the cell, in [0, 1)
  bool valid[4];      // corner inside the map
  bool any;           // at least one corner inside the map
};

template <typename acc_t, typename index_t>
CQDINO_HOST_DEVICE CQDINO_INLINE Corners<acc_t, index_t> bilinear_corners(acc_t loc_x, acc_t loc_y,
                                                                          index_t height,
                                                                          index_t width) {
  Corners<acc_t, index_t> c;
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Same support as the reference kernel: a point contributes iff it lies in (-1, W) x (-1, H).
  c.any = x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) &&
          y < static_cast<acc_t>(height);
  const acc_t xf = floor(x);
  const acc_t yf = floor(y);
  const index_t x0 = static_cast<index_t>(xf);
  const index_t y0 = static_cast<index_t>(yf);
  const index_t x1 = x0 + 1;
  const index_t y1 = y0 + 1;
  const acc_t lx = x - xf, ly = y - yf;
  c.lx = lx;
  c.ly = ly;
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const index_t xs[4] = {x0, x1, x0, x1};
  const index_t ys[4] = {y0, y0, y1, y1};
  const acc_t w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t dx[4] = {-hy, hy, -ly, ly};
  const acc_t dy[4] = {-hx, -lx, hx, lx};
  CQDINO_UNROLL
  for (int k = 0; k < 4; ++k) {
    const bool v = c.any && xs[k] >= 0 && ys[k] >= 0 && xs[k] < width && ys[k] < height;
    c.valid[k] = v;
    c.offset[k] = v ? ys[k] * width + xs[k] : index_t(0);
    c.weight[k] = v ? w[k] : acc_t(0);
    c.dw_dx[k] = v ? dx[k] : acc_t(0);
    c.dw_dy[k] = v ? dy[k] : acc_t(0);
  }
  return c;
}

// Flat index of sampling point (b, q, h, l, p) in the [B, Q, H, L, P] attention tensor
// (the location tensor holds two values per point).
template <typename index_t>
CQDINO_HOST_DEVICE CQDINO_INLINE index_t point_index(index_t b, index_t q, index_t h, index_t l,
                                                     index_t p, index_t num_queries,
                                                     index_t num_heads, index_t num_levels,
                                                     index_t num_points) {
  return (((b * num_queries + q) * num_heads + h) * num_levels + l) * num_points + p;
}

// Flat index of value[b, s, h, 0] in the [B, S, H, Dh] value tensor.
template <typename index_t>
CQDINO_HOST_DEVICE CQDINO_INLINE index_t value_index(index_t b, index_t s, index_t h,
                                                     index_t num_keys, index_t num_heads,
                                                     index_t head_dim) {
  return ((b * num_keys + s) * num_heads + h) * head_dim;
}

// Whether 32-bit index arithmetic is safe for the given problem size: every flat index into
// value, output, locations and weights (and their gradients) must stay below 2^31.
CQDINO_HOST_DEVICE CQDINO_INLINE bool needs_64bit_index(int64_t batch, int64_t num_keys,
                                                        int64_t num_heads, int64_t head_dim,
                                                        int64_t num_queries, int64_t num_levels,
                                                        int64_t num_points) {
  const int64_t limit = (int64_t(1) << 31) - 1;
  const int64_t value_numel = batch * num_keys * num_heads * head_dim;
  const int64_t out_numel = batch * num_queries * num_heads * head_dim;
  const int64_t loc_numel = batch * num_queries * num_heads * num_levels * num_points * 2;
  return value_numel > limit || out_numel > limit || loc_numel > limit;
}

}  // namespace msda
}  // namespace cqdino
