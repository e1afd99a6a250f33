// CPU kernels of the fused top-K category gather: a radix select per image on the keys of
// topk_gather_core.h (the same keys and steps as the CUDA kernel), then a row copy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "topk_gather/topk_gather.h"
#include "topk_gather/topk_gather_core.h"

namespace cqdino {
namespace {

// Writes the k selected category ids of one image, in output order, to out_idx.
template <typename scalar_t>
void select_row(const scalar_t* scores, const bool* force, int64_t C, int64_t k, int64_t* out_idx) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = decltype(topk::make_key(acc_t(0), false, 0));
  std::vector<key_t> keys(C);
  for (int64_t i = 0; i < C; ++i) {
    keys[i] = topk::make_key(static_cast<acc_t>(scores[i]), force != nullptr && force[i], i);
  }
  // Radix select of the k-th largest key; `work` holds the keys matching the prefix so far.
  std::vector<key_t> work(keys);
  key_t prefix;
  topk::key_zero(&prefix);
  int64_t rank = k;
  const int digits = topk::num_digits(prefix);
  for (int d = 0; d < digits && work.size() > 1; ++d) {
    int64_t hist[topk::kRadixSize] = {0};
    for (const key_t& key : work) ++hist[topk::key_digit(key, d)];
    int64_t above = 0;
    uint32_t chosen = 0;
    for (int b = topk::kRadixSize - 1; b >= 0; --b) {
      if (topk::bucket_holds_rank(above, hist[b], rank)) {
        chosen = static_cast<uint32_t>(b);
        break;
      }
      above += hist[b];
    }
    rank -= above;
    prefix = topk::key_with_digit(prefix, d, chosen);
    size_t kept = 0;
    for (const key_t& key : work) {
      if (topk::key_digit(key, d) == chosen) work[kept++] = key;
    }
    work.resize(kept);
  }
  TORCH_INTERNAL_ASSERT(work.size() == 1 && rank == 1, "topk_category_gather: radix select lost ",
                        "its target (", work.size(), " candidates, rank ", rank, ")");
  const key_t threshold = work[0];
  std::vector<key_t> selected;
  selected.reserve(k);
  for (const key_t& key : keys) {
    if (!topk::key_greater(threshold, key)) selected.push_back(key);
  }
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(selected.size()) == k);
  std::sort(selected.begin(), selected.end(),
            [](const key_t& a, const key_t& b) { return topk::output_before(a, b); });
  for (int64_t j = 0; j < k; ++j) out_idx[j] = topk::key_index(selected[j]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_category_gather_cpu(
    const at::Tensor& scores_in, const at::Tensor& embeddings_in, int64_t k,
    const c10::optional<at::Tensor>& force_in) {
  const TopkSizes s = check_topk_gather_inputs(scores_in, embeddings_in, k, force_in);
  const auto scores = scores_in.contiguous();
  const auto embeddings =
      embeddings_in.stride(-1) == 1 ? embeddings_in : embeddings_in.contiguous();
  at::Tensor force;
  if (force_in.has_value()) force = force_in->contiguous();
  const bool* force_ptr = force.defined() ? force.data_ptr<bool>() : nullptr;

  auto indices = at::empty({s.batch, k}, scores.options().dtype(at::kLong));
  auto gathered = at::empty({s.batch, k, s.dim}, embeddings.options());
  if (s.batch == 0) return {indices, gathered};

  const int64_t elem = embeddings.element_size();
  const int64_t row_bytes = s.dim * elem;
  const int64_t stride_b = s.shared ? 0 : embeddings.stride(0) * elem;
  const int64_t stride_c = embeddings.stride(s.shared ? 0 : 1) * elem;
  const char* emb = static_cast<const char*>(embeddings.data_ptr());
  char* out = static_cast<char*>(gathered.data_ptr());
  int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t C = s.num_categories;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_category_gather_cpu", [&] {
        const scalar_t* sc = scores.data_ptr<scalar_t>();
        at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            int64_t* row_idx = idx + b * k;
            select_row<scalar_t>(sc + b * C, force_ptr ? force_ptr + b * C : nullptr, C, k,
                                 row_idx);
            if (row_bytes == 0) continue;
            for (int64_t j = 0; j < k; ++j) {
              std::memcpy(out + (b * k + j) * row_bytes, emb + b * stride_b + row_idx[j] * stride_c,
                          row_bytes);
            }
          }
        });
      });
  return {indices, gathered};
}

at::Tensor topk_category_gather_backward_cpu(const at::Tensor& grad_gathered,
                                             const at::Tensor& indices_in, int64_t num_categories,
                                             bool shared) {
  const auto grad = check_topk_gather_backward_inputs(grad_gathered, indices_in, num_categories);
  const auto indices = indices_in.contiguous();
  const int64_t B = grad.size(0);
  const int64_t K = grad.size(1);
  const int64_t D = grad.size(2);
  const int64_t C = num_categories;
  const auto pos_t = topk_position_map(indices, C);
  const int32_t* pos = pos_t.data_ptr<int32_t>();
  at::Tensor out =
      shared ? at::empty({C, D}, grad.options()) : at::empty({B, C, D}, grad.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "topk_category_gather_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        if (shared) {
          // Each category row is owned by one task and summed over the images in order.
          at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
            std::vector<acc_t> acc(D);
            for (int64_t c = begin; c < end; ++c) {
              std::fill(acc.begin(), acc.end(), acc_t(0));
              for (int64_t b = 0; b < B; ++b) {
                const int32_t p = pos[b * C + c];
                if (p < 0) continue;
                const scalar_t* src = g + (b * K + p) * D;
                for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]);
              }
              for (int64_t d = 0; d < D; ++d) o[c * D + d] = static_cast<scalar_t>(acc[d]);
            }
          });
        } else {
          at::parallel_for(0, B * C, 64, [&](int64_t begin, int64_t end) {
            for (int64_t bc = begin; bc < end; ++bc) {
              const int32_t p = pos[bc];
              scalar_t* dst = o + bc * D;
              if (p < 0) {
                std::fill(dst, dst + D, scalar_t(0));
              } else {
                std::memcpy(dst, g + ((bc / C) * K + p) * D, D * sizeof(scalar_t));
              }
            }
          });
        }
      });
  return out;
}

}  // namespace cqdino
