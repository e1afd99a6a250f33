// Schemas, input checks and CPU registration of the fused top-K category gather.
#include "topk_gather/topk_gather.h"

#include <torch/library.h>

#include "topk_gather/topk_gather_core.h"

namespace cqdino {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

TopkSizes check_topk_gather_inputs(const at::Tensor& scores, const at::Tensor& embeddings,
                                   int64_t k, const c10::optional<at::Tensor>& force) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "topk_category_gather: scores must be [B, C], got shape ",
                    scores.sizes());
  TORCH_CHECK_VALUE(is_float_type(scores.scalar_type()),
                    "topk_category_gather: scores must be float64, float32, float16 or bfloat16, "
                    "got ",
                    scores.scalar_type());
  TORCH_CHECK_VALUE(is_float_type(embeddings.scalar_type()),
                    "topk_category_gather: embeddings must be float64, float32, float16 or "
                    "bfloat16, got ",
                    embeddings.scalar_type());
  TopkSizes s;
  s.batch = scores.size(0);
  s.num_categories = scores.size(1);
  s.k = k;
  if (embeddings.dim() == 3) {
    s.shared = false;
    TORCH_CHECK_VALUE(embeddings.size(0) == s.batch && embeddings.size(1) == s.num_categories,
                      "topk_category_gather: per-image embeddings must be [B, C, D] = [", s.batch,
                      ", ", s.num_categories, ", D], got ", embeddings.sizes());
  } else {
    TORCH_CHECK_VALUE(embeddings.dim() == 2,
                      "topk_category_gather: embeddings must be [B, C, D] or [C, D], got shape ",
                      embeddings.sizes());
    s.shared = true;
    TORCH_CHECK_VALUE(embeddings.size(0) == s.num_categories,
                      "topk_category_gather: shared embeddings must be [C, D] with C = ",
                      s.num_categories, ", got ", embeddings.sizes());
  }
  s.dim = embeddings.size(-1);
  TORCH_CHECK_VALUE(s.num_categories <= topk::kMaxCategories, "topk_category_gather: at most ",
                    topk::kMaxCategories, " categories are supported, got C = ", s.num_categories);
  TORCH_CHECK_VALUE(k >= 1 && k <= s.num_categories,
                    "topk_category_gather: k must be in [1, C=", s.num_categories, "], got ", k,
                    " (pass min(k, C) for 'k or fewer')");
  TORCH_CHECK_VALUE(embeddings.device() == scores.device(), "topk_category_gather: scores are on ",
                    scores.device(), " but embeddings on ", embeddings.device());
  if (force.has_value()) {
    const at::Tensor& f = *force;
    TORCH_CHECK_VALUE(f.scalar_type() == at::kBool && f.dim() == 2 && f.size(0) == s.batch &&
                          f.size(1) == s.num_categories,
                      "topk_category_gather: force must be a bool [B, C] = [", s.batch, ", ",
                      s.num_categories, "] mask, got ", f.scalar_type(), " ", f.sizes());
    TORCH_CHECK_VALUE(f.device() == scores.device(), "topk_category_gather: force is on ",
                      f.device(), " but scores on ", scores.device());
  }
  return s;
}

at::Tensor check_topk_gather_backward_inputs(const at::Tensor& grad_gathered,
                                             const at::Tensor& indices, int64_t num_categories) {
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.scalar_type() == at::kLong,
                    "topk_category_gather_backward: indices must be int64 [B, K], got ",
                    indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK_VALUE(grad_gathered.dim() == 3 && grad_gathered.size(0) == indices.size(0) &&
                        grad_gathered.size(1) == indices.size(1),
                    "topk_category_gather_backward: grad_gathered must be [B, K, D] with [B, K] = ",
                    indices.sizes(), ", got ", grad_gathered.sizes());
  TORCH_CHECK_VALUE(is_float_type(grad_gathered.scalar_type()),
                    "topk_category_gather_backward: grad_gathered must be a float tensor, got ",
                    grad_gathered.scalar_type());
  TORCH_CHECK_VALUE(num_categories >= indices.size(1) && num_categories <= topk::kMaxCategories,
                    "topk_category_gather_backward: num_categories must be in [K, 2^31 - 2], got ",
                    num_categories);
  TORCH_CHECK_VALUE(grad_gathered.device() == indices.device(),
                    "topk_category_gather_backward: grad_gathered is on ", grad_gathered.device(),
                    " but indices on ", indices.device());
  return grad_gathered.contiguous();
}

at::Tensor topk_position_map(const at::Tensor& indices, int64_t num_categories) {
  const int64_t B = indices.size(0);
  const int64_t K = indices.size(1);
  auto pos = at::full({B, num_categories}, -1, indices.options().dtype(at::kInt));
  // The indices of one image are distinct, so every position is written at most once.
  auto slots = at::arange(K, indices.options().dtype(at::kInt)).unsqueeze(0).expand({B, K});
  pos.scatter_(1, indices, slots);
  return pos;
}

TopkForwardPlan plan_topk_gather_forward(const at::Tensor& scores, const at::Tensor& embeddings,
                                         int64_t k, const c10::optional<at::Tensor>& force) {
  TopkForwardPlan p;
  p.sizes = check_topk_gather_inputs(scores, embeddings, k, force);
  const TopkSizes& s = p.sizes;
  p.scores = scores.contiguous();
  p.embeddings = embeddings.stride(-1) == 1 ? embeddings : embeddings.contiguous();
  if (force.has_value()) p.force = force->contiguous();
  p.force_ptr = p.force.defined() ? p.force.data_ptr<bool>() : nullptr;
  p.indices = at::empty({s.batch, k}, p.scores.options().dtype(at::kLong));
  p.gathered = at::empty({s.batch, k, s.dim}, p.embeddings.options());
  const int64_t elem = p.embeddings.element_size();
  p.row_bytes = s.dim * elem;
  p.stride_b = s.shared ? 0 : p.embeddings.stride(0) * elem;
  p.stride_c = p.embeddings.stride(s.shared ? 0 : 1) * elem;
  return p;
}

}  // namespace cqdino

TORCH_LIBRARY_FRAGMENT(cqdino, m) {
  m.def(
      "topk_category_gather(Tensor scores, Tensor embeddings, int k, Tensor? force=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "topk_category_gather_backward(Tensor grad_gathered, Tensor indices, int num_categories, "
      "bool shared) -> Tensor");
}

TORCH_LIBRARY_IMPL(cqdino, CPU, m) {
  m.impl("topk_category_gather", &cqdino::topk_category_gather_cpu);
  m.impl("topk_category_gather_backward", &cqdino::topk_category_gather_backward_cpu);
}
