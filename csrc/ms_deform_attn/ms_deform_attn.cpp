// Schema, input checks and CPU registration of multi-scale deformable attention.
#include "ms_deform_attn/ms_deform_attn.h"

#include <torch/library.h>

#include "ms_deform_attn/ms_deform_attn_core.h"

namespace cqdino {

at::ScalarType ms_deform_attn_acc_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

MsdaSizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be [B, S, H, Dh], got shape ",
                    value.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must be [B, Q, H, L, P, 2], got shape ",
                    sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.dim() == 5,
                    "ms_deform_attn: attention_weights must be [B, Q, H, L, P], got shape ",
                    attention_weights.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must be [L, 2] (H_l, W_l), got shape ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1,
                    "ms_deform_attn: level_start_index must be [L], got shape ",
                    level_start_index.sizes());
  TORCH_CHECK_VALUE(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
      spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());

  MsdaSizes s;
  s.batch = value.size(0);
  s.num_keys = value.size(1);
  s.num_heads = value.size(2);
  s.head_dim = value.size(3);
  s.num_queries = sampling_locations.size(1);
  s.num_levels = spatial_shapes.size(0);
  s.num_points = sampling_locations.size(4);

  TORCH_CHECK_VALUE(s.batch > 0, "ms_deform_attn: empty batch (value.size(0) == 0)");
  TORCH_CHECK_VALUE(s.num_queries > 0,
                    "ms_deform_attn: no queries (sampling_locations.size(1) == 0)");
  TORCH_CHECK_VALUE(s.num_keys > 0 && s.num_heads > 0 && s.head_dim > 0,
                    "ms_deform_attn: value has an empty dimension: ", value.sizes());
  TORCH_CHECK_VALUE(s.num_levels > 0 && s.num_points > 0,
                    "ms_deform_attn: need at least one level and one point, got L=", s.num_levels,
                    " P=", s.num_points);
  TORCH_CHECK_VALUE(level_start_index.size(0) == s.num_levels,
                    "ms_deform_attn: level_start_index has ", level_start_index.size(0),
                    " entries but spatial_shapes has ", s.num_levels, " levels");
  const std::vector<int64_t> loc_expected = {s.batch,      s.num_queries, s.num_heads,
                                             s.num_levels, s.num_points,  2};
  TORCH_CHECK_VALUE(sampling_locations.sizes() == at::IntArrayRef(loc_expected),
                    "ms_deform_attn: sampling_locations must be [B, Q, H, L, P, 2] = ",
                    at::IntArrayRef(loc_expected),
                    " (B, H from value, L from spatial_shapes), got ", sampling_locations.sizes());
  const std::vector<int64_t> attn_expected = {s.batch, s.num_queries, s.num_heads, s.num_levels,
                                              s.num_points};
  TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef(attn_expected),
                    "ms_deform_attn: attention_weights must be [B, Q, H, L, P] = ",
                    at::IntArrayRef(attn_expected), ", got ", attention_weights.sizes());

  const auto vt = value.scalar_type();
  TORCH_CHECK_VALUE(vt == at::kDouble || vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16,
                    "ms_deform_attn: value must be float64, float32, float16 or bfloat16, got ",
                    vt);
  const auto lt = sampling_locations.scalar_type();
  TORCH_CHECK_VALUE(attention_weights.scalar_type() == lt, "ms_deform_attn: sampling_locations (",
                    lt, ") and attention_weights (", attention_weights.scalar_type(),
                    ") must have the same dtype");
  const bool half_value = vt == at::kHalf || vt == at::kBFloat16;
  TORCH_CHECK_VALUE(lt == vt || (half_value && lt == at::kFloat),
                    "ms_deform_attn: sampling_locations/attention_weights must have the value's "
                    "dtype, or float32 when the value is half precision; got value ",
                    vt, " and locations ", lt);

  const auto dev = value.device();
  TORCH_CHECK(sampling_locations.device() == dev && attention_weights.device() == dev,
              "ms_deform_attn: value (", dev, "), sampling_locations (",
              sampling_locations.device(), ") and attention_weights (", attention_weights.device(),
              ") must be on the same device");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index}) {
    TORCH_CHECK(t->device() == dev || t->device().is_cpu(),
                "ms_deform_attn: spatial_shapes/level_start_index must be on the CPU or on the "
                "value's device ",
                dev, ", got ", t->device());
  }

  // The level tables are validated when they are on the CPU; reading them from a GPU would
  // need a device-to-host sync on every call.
  if (spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu()) {
    const auto shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous();
    const int64_t* sh = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < s.num_levels; ++l) {
      TORCH_CHECK_VALUE(sh[2 * l] > 0 && sh[2 * l + 1] > 0, "ms_deform_attn: level ", l,
                        " has a non-positive size (H, W) = (", sh[2 * l], ", ", sh[2 * l + 1], ")");
      TORCH_CHECK_VALUE(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                        " but the levels before it hold ", total, " positions");
      total += sh[2 * l] * sh[2 * l + 1];
    }
    TORCH_CHECK_VALUE(total == s.num_keys, "ms_deform_attn: spatial_shapes add up to ", total,
                      " positions but value has S = ", s.num_keys);
  }
  return s;
}

}  // namespace cqdino

TORCH_LIBRARY_FRAGMENT(cqdino, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool deterministic=False) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "bool deterministic=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_ms_deform_attn_needs_64bit_index(int batch, int num_keys, int num_heads, int head_dim, "
      "int num_queries, int num_levels, int num_points) -> bool",
      [](int64_t b, int64_t s, int64_t h, int64_t d, int64_t q, int64_t l, int64_t p) {
        return cqdino::msda::needs_64bit_index(b, s, h, d, q, l, p);
      });
  m.def("_ms_deform_attn_cpu_isa(str request=\"\") -> str", [](c10::string_view request) {
    return cqdino::ms_deform_attn_cpu_isa(std::string(request));
  });
  // The 2020 design (one thread per (b, q, h, channel), per-channel atomics): CUDA only, kept as
  // the benchmark baseline.
  m.def(
      "_ms_deform_attn_forward_naive(Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "_ms_deform_attn_backward_naive(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cqdino, CPU, m) {
  m.impl("ms_deform_attn_forward", &cqdino::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &cqdino::ms_deform_attn_backward_cpu);
}
