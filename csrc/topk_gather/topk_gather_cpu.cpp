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

// Scratch buffers reused across calls by each thread.
template <typename key_t>
struct RowBuffers {
  std::vector<key_t> keys, work, selected;
};

template <typename key_t>
RowBuffers<key_t>& row_buffers() {
  thread_local RowBuffers<key_t> buffers;
  return buffers;
}

// Writes the k selected category ids of one image, in output order, to out_idx.
//
// Radix select with the steps of topk_gather_core.h: at each digit, the keys whose digit is
// above the bucket holding the wanted rank are certainly selected, the keys in that bucket stay
// candidates, the rest are dropped. The first digit's histogram is taken while the keys are
// built, so a row is read twice in all; later digits only see the (few) remaining candidates.
template <typename scalar_t>
void select_row(const scalar_t* scores, const bool* force, int64_t C, int64_t k, int64_t* out_idx) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = decltype(topk::make_key(acc_t(0), false, 0));
  RowBuffers<key_t>& buf = row_buffers<key_t>();
  buf.keys.resize(C);
  buf.selected.clear();
  buf.selected.reserve(k);
  // Four interleaved histograms: scores cluster in a few top-digit buckets, and a single
  // histogram would serialise on read-modify-writes of the same counter.
  int32_t hist4[4][topk::kRadixSize] = {{0}};
  key_t* keys = buf.keys.data();
  int64_t i = 0;
  for (; i + 4 <= C; i += 4) {
    for (int u = 0; u < 4; ++u) {
      const key_t key = topk::make_key(static_cast<acc_t>(scores[i + u]),
                                       force != nullptr && force[i + u], i + u);
      keys[i + u] = key;
      ++hist4[u][topk::key_digit(key, 0)];
    }
  }
  for (; i < C; ++i) {
    const key_t key =
        topk::make_key(static_cast<acc_t>(scores[i]), force != nullptr && force[i], i);
    keys[i] = key;
    ++hist4[0][topk::key_digit(key, 0)];
  }
  int64_t hist[topk::kRadixSize];
  for (int b = 0; b < topk::kRadixSize; ++b) {
    hist[b] = int64_t(hist4[0][b]) + hist4[1][b] + hist4[2][b] + hist4[3][b];
  }
  const std::vector<key_t>* source = &buf.keys;
  int64_t rank = k;
  const int digits = topk::num_digits(buf.keys[0]);
  for (int d = 0; d < digits; ++d) {
    if (d > 0) {
      std::fill(hist, hist + topk::kRadixSize, int64_t(0));
      for (const key_t& key : *source) ++hist[topk::key_digit(key, d)];
    }
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
    // Partition: above the bucket -> selected; in the bucket -> candidates (in place when the
    // source already is the candidate list, which only shrinks).
    size_t kept = 0;
    std::vector<key_t>& work = buf.work;
    if (source == &buf.keys) work.resize(hist[chosen]);
    for (const key_t& key : *source) {
      const uint32_t digit = topk::key_digit(key, d);
      if (digit > chosen) {
        buf.selected.push_back(key);
      } else if (digit == chosen) {
        work[kept++] = key;
      }
    }
    work.resize(kept);
    source = &work;
    if (kept == 1) break;
  }
  TORCH_INTERNAL_ASSERT(
      source->size() == 1 && rank == 1 && static_cast<int64_t>(buf.selected.size()) == k - 1,
      "topk_category_gather: radix select lost its target");
  buf.selected.push_back((*source)[0]);
  std::sort(buf.selected.begin(), buf.selected.end(),
            [](const key_t& a, const key_t& b) { return topk::output_before(a, b); });
  for (int64_t j = 0; j < k; ++j) out_idx[j] = topk::key_index(buf.selected[j]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_category_gather_cpu(
    const at::Tensor& scores_in, const at::Tensor& embeddings_in, int64_t k,
    const c10::optional<at::Tensor>& force_in) {
  const TopkForwardPlan plan = plan_topk_gather_forward(scores_in, embeddings_in, k, force_in);
  const TopkSizes& s = plan.sizes;
  const at::Tensor& scores = plan.scores;
  at::Tensor indices = plan.indices, gathered = plan.gathered;
  if (s.batch == 0) return {indices, gathered};
  const bool* force_ptr = plan.force_ptr;
  const int64_t row_bytes = plan.row_bytes, stride_b = plan.stride_b, stride_c = plan.stride_c;
  const char* emb = static_cast<const char*>(plan.embeddings.data_ptr());
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
