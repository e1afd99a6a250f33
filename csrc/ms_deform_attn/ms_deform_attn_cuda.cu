// CUDA kernels of multi-scale deformable attention.
//
// This file holds the thread-per-channel design of the 2020 Deformable-DETR kernel (one thread
// per (b, q, h, channel), scalar loads, per-channel atomics in the backward), written on top of
// the shared per-sample math in ms_deform_attn_core.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_core.h"

namespace cqdino {
namespace {

constexpr int kThreads = 256;

template <typename index_t>
struct Dims {
  index_t B, S, NH, Dh, Q, L, P;
};

template <typename index_t>
Dims<index_t> make_dims(const MsdaSizes& s) {
  return {static_cast<index_t>(s.batch),       static_cast<index_t>(s.num_keys),
          static_cast<index_t>(s.num_heads),   static_cast<index_t>(s.head_dim),
          static_cast<index_t>(s.num_queries), static_cast<index_t>(s.num_levels),
          static_cast<index_t>(s.num_points)};
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void naive_forward_kernel(const scalar_t* __restrict__ value,
                                     const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts,
                                     const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                                     scalar_t* __restrict__ out, Dims<index_t> d) {
  const index_t n = d.B * d.Q * d.NH * d.Dh;
  for (index_t t = blockIdx.x * index_t(blockDim.x) + threadIdx.x; t < n;
       t += index_t(blockDim.x) * gridDim.x) {
    const index_t c = t % d.Dh;
    const index_t i = t / d.Dh;  // (b, q, h)
    const index_t h = i % d.NH;
    const index_t b = i / (d.Q * d.NH);
    acc_t acc = 0;
    for (index_t l = 0; l < d.L; ++l) {
      const index_t H = static_cast<index_t>(shapes[2 * l]);
      const index_t W = static_cast<index_t>(shapes[2 * l + 1]);
      const index_t base =
          msda::value_index<index_t>(b, static_cast<index_t>(starts[l]), h, d.S, d.NH, d.Dh) + c;
      for (index_t p = 0; p < d.P; ++p) {
        const index_t j = (i * d.L + l) * d.P + p;
        const auto cr = msda::bilinear_corners<acc_t, index_t>(loc[2 * j], loc[2 * j + 1], H, W);
        if (!cr.any) continue;
        acc_t sample = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (cr.valid[k])
            sample += cr.weight[k] * static_cast<acc_t>(value[base + cr.offset[k] * d.NH * d.Dh]);
        }
        acc += attn[j] * sample;
      }
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void naive_backward_kernel(const scalar_t* __restrict__ grad_out,
                                      const scalar_t* __restrict__ value,
                                      const int64_t* __restrict__ shapes,
                                      const int64_t* __restrict__ starts,
                                      const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                                      acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc,
                                      acc_t* __restrict__ grad_attn, Dims<index_t> d) {
  const index_t n = d.B * d.Q * d.NH * d.Dh;
  for (index_t t = blockIdx.x * index_t(blockDim.x) + threadIdx.x; t < n;
       t += index_t(blockDim.x) * gridDim.x) {
    const index_t c = t % d.Dh;
    const index_t i = t / d.Dh;
    const index_t h = i % d.NH;
    const index_t b = i / (d.Q * d.NH);
    const acc_t g = static_cast<acc_t>(grad_out[t]);
    for (index_t l = 0; l < d.L; ++l) {
      const index_t H = static_cast<index_t>(shapes[2 * l]);
      const index_t W = static_cast<index_t>(shapes[2 * l + 1]);
      const index_t base =
          msda::value_index<index_t>(b, static_cast<index_t>(starts[l]), h, d.S, d.NH, d.Dh) + c;
      for (index_t p = 0; p < d.P; ++p) {
        const index_t j = (i * d.L + l) * d.P + p;
        const auto cr = msda::bilinear_corners<acc_t, index_t>(loc[2 * j], loc[2 * j + 1], H, W);
        if (!cr.any) continue;
        const acc_t a = attn[j];
        acc_t g_attn = 0, g_x = 0, g_y = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!cr.valid[k]) continue;
          const index_t off = base + cr.offset[k] * d.NH * d.Dh;
          const acc_t gv = g * static_cast<acc_t>(value[off]);
          g_attn += cr.weight[k] * gv;
          g_x += cr.dw_dx[k] * gv;
          g_y += cr.dw_dy[k] * gv;
          atomicAdd(grad_value + off, a * cr.weight[k] * g);
        }
        atomicAdd(grad_attn + j, g_attn);
        atomicAdd(grad_loc + 2 * j, a * g_x * static_cast<acc_t>(W));
        atomicAdd(grad_loc + 2 * j + 1, a * g_y * static_cast<acc_t>(H));
      }
    }
  }
}

int num_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto acc_type = ms_deform_attn_acc_type(value_in.scalar_type());
  const auto value = value_in.contiguous();
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const auto shapes = spatial_shapes.to(value.device()).contiguous();
  const auto starts = level_start_index.to(value.device()).contiguous();
  auto out = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  const bool wide = msda::needs_64bit_index(s.batch, s.num_keys, s.num_heads, s.head_dim,
                                            s.num_queries, s.num_levels, s.num_points);
  const int64_t n = s.batch * s.num_queries * s.num_heads * s.head_dim;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (wide) {
          naive_forward_kernel<scalar_t, acc_t, int64_t><<<num_blocks(n), kThreads, 0, stream>>>(
              value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
              loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
              make_dims<int64_t>(s));
        } else {
          naive_forward_kernel<scalar_t, acc_t, int32_t><<<num_blocks(n), kThreads, 0, stream>>>(
              value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
              loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
              make_dims<int32_t>(s));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  TORCH_CHECK_VALUE(grad_output.numel() == s.batch * s.num_queries * s.num_heads * s.head_dim,
                    "ms_deform_attn_backward: grad_output must be [B, Q, H * Dh], got ",
                    grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value_in.device(),
              "ms_deform_attn_backward: grad_output is on ", grad_output.device(),
              " but value is on ", value_in.device());
  TORCH_CHECK(!deterministic,
              "ms_deform_attn_backward: the deterministic CUDA backward is not available in "
              "this build");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto acc_type = ms_deform_attn_acc_type(value_in.scalar_type());
  const auto value = value_in.contiguous();
  const auto grad_out = grad_output.to(value.scalar_type()).contiguous();
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const auto shapes = spatial_shapes.to(value.device()).contiguous();
  const auto starts = level_start_index.to(value.device()).contiguous();
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::zeros(loc.sizes(), loc.options());
  auto grad_attn = at::zeros(attn.sizes(), attn.options());
  const bool wide = msda::needs_64bit_index(s.batch, s.num_keys, s.num_heads, s.head_dim,
                                            s.num_queries, s.num_levels, s.num_points);
  const int64_t n = s.batch * s.num_queries * s.num_heads * s.head_dim;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (wide) {
          naive_backward_kernel<scalar_t, acc_t, int64_t><<<num_blocks(n), kThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
              starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
              grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(),
              make_dims<int64_t>(s));
        } else {
          naive_backward_kernel<scalar_t, acc_t, int32_t><<<num_blocks(n), kThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
              starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
              grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(),
              make_dims<int32_t>(s));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_value.to(value_in.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace cqdino

TORCH_LIBRARY_IMPL(cqdino, CUDA, m) {
  m.impl("ms_deform_attn_forward", &cqdino::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &cqdino::ms_deform_attn_backward_cuda);
}
