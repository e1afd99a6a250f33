// Multi-scale deformable attention: declarations shared by the CPU and CUDA implementations.
//
//   value               [B, S, H, Dh]        S = sum_l H_l * W_l, levels flattened in order
//   spatial_shapes      [L, 2] int64          (H_l, W_l)
//   level_start_index   [L] int64             offset of level l in S
//   sampling_locations  [B, Q, H, L, P, 2]    (x, y) normalised to [0, 1]
//   attention_weights   [B, Q, H, L, P]
//   output              [B, Q, H * Dh]
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace cqdino {

struct MsdaSizes {
  int64_t batch, num_keys, num_heads, head_dim, num_queries, num_levels, num_points;
};

// Validates shapes, dtypes, devices and (when they are on the CPU) the level tables.
// Raises c10::ValueError / c10::Error with a message naming the argument.
MsdaSizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// dtype in which locations and weights are read and values are accumulated.
at::ScalarType ms_deform_attn_acc_type(at::ScalarType value_type);

// `deterministic` only matters to the backward; the forward takes it so that autograd can
// pass it on (the forward itself is always deterministic).
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, bool deterministic);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic);

// Test hook: which vector ISA the CPU kernels use. "" queries; "default" forces the portable
// path; "auto" restores detection. Returns "avx2" or "default".
std::string ms_deform_attn_cpu_isa(const std::string& request);

}  // namespace cqdino
