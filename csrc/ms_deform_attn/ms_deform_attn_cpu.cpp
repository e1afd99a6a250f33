// CPU kernels of multi-scale deformable attention.
//
// Forward: parallel over (b, q, h); each task accumulates its Dh output channels in a
// register-sized buffer (fp32, or fp64 for fp64 inputs), reading a corner's Dh contiguous
// channels of the [B, S, H, Dh] value.
// Backward: parallel over (b, h); a task owns value-gradient rows of its (b, h), so it
// accumulates without atomics or races, and the result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_core.h"

namespace cqdino {
namespace {

using msda::bilinear_corners;
using msda::Corners;

struct Tables {
  std::vector<int64_t> height, width, start;
};

Tables read_tables(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  Tables t;
  const int64_t L = shapes.size(0);
  for (int64_t l = 0; l < L; ++l) {
    t.height.push_back(shapes.data_ptr<int64_t>()[2 * l]);
    t.width.push_back(shapes.data_ptr<int64_t>()[2 * l + 1]);
    t.start.push_back(starts.data_ptr<int64_t>()[l]);
  }
  return t;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* value, const Tables& tab, const acc_t* loc, const acc_t* attn,
                    scalar_t* out, const MsdaSizes& s) {
  const int64_t B = s.batch, S = s.num_keys, NH = s.num_heads, Dh = s.head_dim;
  const int64_t Q = s.num_queries, L = s.num_levels, P = s.num_points;
  const int64_t pixel_stride = NH * Dh;
  const int64_t grain = std::max<int64_t>(1, 2048 / (L * P * Dh));
  at::parallel_for(0, B * Q * NH, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(Dh);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i % NH;
      const int64_t b = i / (Q * NH);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const acc_t* a_ptr = attn + i * L * P;
      const acc_t* l_ptr = loc + i * L * P * 2;
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t* v_level = value + msda::value_index<int64_t>(b, tab.start[l], h, S, NH, Dh);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t j = l * P + p;
          const auto c = bilinear_corners<acc_t, int64_t>(l_ptr[2 * j], l_ptr[2 * j + 1],
                                                          tab.height[l], tab.width[l]);
          if (!c.any) continue;
          const acc_t a = a_ptr[j];
          for (int k = 0; k < 4; ++k) {
            if (!c.valid[k]) continue;
            const acc_t aw = a * c.weight[k];
            const scalar_t* v = v_level + c.offset[k] * pixel_stride;
            for (int64_t d = 0; d < Dh; ++d) acc[d] += aw * static_cast<acc_t>(v[d]);
          }
        }
      }
      scalar_t* o = out + i * Dh;
      for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const Tables& tab,
                     const acc_t* loc, const acc_t* attn, acc_t* grad_value, acc_t* grad_loc,
                     acc_t* grad_attn, const MsdaSizes& s) {
  const int64_t S = s.num_keys, NH = s.num_heads, Dh = s.head_dim;
  const int64_t Q = s.num_queries, L = s.num_levels, P = s.num_points;
  const int64_t pixel_stride = NH * Dh;
  at::parallel_for(0, s.batch * NH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(Dh);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t i = (b * Q + q) * NH + h;  // (b, q, h)
        const scalar_t* go = grad_out + i * Dh;
        for (int64_t d = 0; d < Dh; ++d) g[d] = static_cast<acc_t>(go[d]);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t base = msda::value_index<int64_t>(b, tab.start[l], h, S, NH, Dh);
          const scalar_t* v_level = value + base;
          acc_t* gv_level = grad_value + base;
          const acc_t W = static_cast<acc_t>(tab.width[l]);
          const acc_t H = static_cast<acc_t>(tab.height[l]);
          for (int64_t p = 0; p < P; ++p) {
            const int64_t j = i * L * P + l * P + p;
            const auto c = bilinear_corners<acc_t, int64_t>(loc[2 * j], loc[2 * j + 1],
                                                            tab.height[l], tab.width[l]);
            if (!c.any) {
              grad_attn[j] = 0;
              grad_loc[2 * j] = 0;
              grad_loc[2 * j + 1] = 0;
              continue;
            }
            const acc_t a = attn[j];
            acc_t g_attn = 0, g_x = 0, g_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) continue;
              const scalar_t* v = v_level + c.offset[k] * pixel_stride;
              acc_t* gv = gv_level + c.offset[k] * pixel_stride;
              const acc_t aw = a * c.weight[k];
              acc_t gv_dot = 0;  // sum_d g[d] * v[d]
              for (int64_t d = 0; d < Dh; ++d) {
                gv_dot += g[d] * static_cast<acc_t>(v[d]);
                gv[d] += aw * g[d];
              }
              g_attn += c.weight[k] * gv_dot;
              g_x += c.dw_dx[k] * gv_dot;
              g_y += c.dw_dy[k] * gv_dot;
            }
            grad_attn[j] = g_attn;
            grad_loc[2 * j] = a * g_x * W;
            grad_loc[2 * j + 1] = a * g_y * H;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  const auto acc_type = ms_deform_attn_acc_type(value_in.scalar_type());
  const auto value = value_in.contiguous();
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const Tables tab = read_tables(spatial_shapes, level_start_index);
  auto out = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, acc_t>(value.data_ptr<scalar_t>(), tab, loc.data_ptr<acc_t>(),
                                        attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), s);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool /*deterministic: the CPU kernel always is*/) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  TORCH_CHECK_VALUE(grad_output.numel() == s.batch * s.num_queries * s.num_heads * s.head_dim,
                    "ms_deform_attn_backward: grad_output must be [B, Q, H * Dh], got ",
                    grad_output.sizes());
  const auto acc_type = ms_deform_attn_acc_type(value_in.scalar_type());
  const auto value = value_in.contiguous();
  const auto grad_out = grad_output.to(value.scalar_type()).contiguous();
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const Tables tab = read_tables(spatial_shapes, level_start_index);
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        backward_kernel<scalar_t, acc_t>(grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                                         tab, loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
                                         grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
                                         grad_attn.data_ptr<acc_t>(), s);
      });
  return {grad_value.to(value_in.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace cqdino
