// Fused top-K category selection + gather: declarations shared by the CPU and CUDA code.
//
//   scores       [B, C]      any float dtype; not differentiated
//   embeddings   [B, C, D]   per image, or [C, D] shared by the batch (last dim contiguous)
//   force        [B, C]      optional bool: categories that must be selected
//   indices      [B, K]      int64, score descending, ties -> lower index, NaN lowest
//   gathered     [B, K, D]   embeddings' dtype
//
// Backward: grad_embeddings[b or -, indices[b, j]] += grad_gathered[b, j] (deterministic: the
// shared case sums over images in a fixed order, no atomics).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cqdino {

struct TopkSizes {
  int64_t batch, num_categories, k, dim;
  bool shared;  // embeddings are [C, D]
};

// Validates shapes, dtypes and devices; raises c10::ValueError naming the argument.
TopkSizes check_topk_gather_inputs(const at::Tensor& scores, const at::Tensor& embeddings,
                                   int64_t k, const c10::optional<at::Tensor>& force);

// What the CPU and CUDA forward share: the checked sizes, inputs made contiguous where the
// kernels need it, the allocated outputs, and the byte strides of the row gather.
struct TopkForwardPlan {
  TopkSizes sizes;
  at::Tensor scores, embeddings, force, indices, gathered;
  const bool* force_ptr;  // nullptr without a force mask
  int64_t row_bytes;      // D * element size
  int64_t stride_b;       // bytes between images (0 for shared embeddings)
  int64_t stride_c;       // bytes between categories
};

TopkForwardPlan plan_topk_gather_forward(const at::Tensor& scores, const at::Tensor& embeddings,
                                         int64_t k, const c10::optional<at::Tensor>& force);

// Validates the backward's inputs and returns grad_gathered made contiguous.
at::Tensor check_topk_gather_backward_inputs(const at::Tensor& grad_gathered,
                                             const at::Tensor& indices, int64_t num_categories);

// pos[b, c] = j if indices[b, j] == c, else -1 (int32, [B, C]); no host sync.
at::Tensor topk_position_map(const at::Tensor& indices, int64_t num_categories);

std::tuple<at::Tensor, at::Tensor> topk_category_gather_cpu(const at::Tensor& scores,
                                                            const at::Tensor& embeddings, int64_t k,
                                                            const c10::optional<at::Tensor>& force);

at::Tensor topk_category_gather_backward_cpu(const at::Tensor& grad_gathered,
                                             const at::Tensor& indices, int64_t num_categories,
                                             bool shared);

}  // namespace cqdino
