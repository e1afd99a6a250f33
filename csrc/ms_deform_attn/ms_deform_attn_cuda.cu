// CUDA kernels of multi-scale deformable attention.
//
// Two designs over the shared per-sample math in ms_deform_attn_core.h:
//  * naive_*: the 2020 Deformable-DETR design (one thread per (b, q, h, channel), scalar loads,
//    per-channel atomics in the backward), kept as the benchmark baseline and as the fallback
//    for head sizes the optimised kernels do not cover (torch.ops.cqdino._ms_deform_attn_*_naive);
//  * fast_*: the default kernels, described below.
// Both use a device guard, 32-bit index arithmetic unless a tensor can pass 2^31 elements, and
// check every launch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <type_traits>

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

at::Tensor naive_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> naive_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  TORCH_CHECK_VALUE(grad_output.numel() == s.batch * s.num_queries * s.num_heads * s.head_dim,
                    "ms_deform_attn_backward: grad_output must be [B, Q, H * Dh], got ",
                    grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value_in.device(),
              "ms_deform_attn_backward: grad_output is on ", grad_output.device(),
              " but value is on ", value_in.device());
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

// ---------------------------------------------------------------------------------------------
// Optimised kernels.
//
// A (b, q, h) item is served by G = Dh / V threads, each owning V consecutive channels read
// with one 16-byte load per corner (V = 4 fp32, 8 fp16/bf16, 2 fp64; V = 1 when the rows are
// not 16-byte aligned). G must be a power of two <= 32 so that an item's threads sit in one
// warp; other head sizes use the naive kernels.
// Sample data (corner offsets, bilinear weights) is computed once per (b, q, h, l, p) by one
// thread of the block and shared through shared memory, in chunks of samples.
// Backward: a block serves one (b, h) and a tile of queries; the value gradients of the
// coarsest levels that fit a shared-memory budget are accumulated there with shared-memory
// atomics and flushed once per block, the others go to global memory (16-byte vector atomics
// on sm_90 for fp32). grad_loc / grad_attn of a sample are reduced over the item's threads
// with warp shuffles in a fixed order and written once, without atomics.
// Deterministic backward: the value gradients are accumulated as 64-bit fixed-point integers
// (integer addition is associative, so the order of the atomics does not matter), with a
// scale 2^k chosen on the device from a bound of the largest possible sum,
//   max |grad_out| * max_(b,h) sum_(q,l,p) |attn|  <=  2^62 / scale,
// then converted back; the resolution is 2^-62 of that bound.
// ---------------------------------------------------------------------------------------------

constexpr int kMaxLevels = 16;
constexpr int kFwdThreads = 256;
constexpr int kFwdChunk = 16;
constexpr int kBwdThreads = 512;
constexpr int kBwdChunk = 8;
constexpr int kDefaultStageKB = 48;
constexpr size_t kSampleSmemBytes = 32 * 1024;  // shared sample data per block, at most

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ p, acc_t (&out)[V]) {
  const Pack<scalar_t, V> pk = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
}

// grad[0:V] += a * g[0:V] in global memory.
template <typename acc_t, int V>
__device__ __forceinline__ void global_add(acc_t* p, acc_t a, const acc_t (&g)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float> && V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i),
                make_float4(a * g[i], a * g[i + 1], a * g[i + 2], a * g[i + 3]));
    }
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, a * g[i]);
  }
}

__device__ __forceinline__ unsigned long long to_fixed(double x, double scale) {
  return static_cast<unsigned long long>(__double2ll_rn(x * scale));
}

template <typename index_t>
struct LevelTables {
  index_t height[kMaxLevels], width[kMaxLevels], start[kMaxLevels];
};

template <typename index_t>
__device__ __forceinline__ void load_tables(LevelTables<index_t>& t, const int64_t* shapes,
                                            const int64_t* starts, index_t L) {
  for (index_t l = threadIdx.x; l < L; l += blockDim.x) {
    t.height[l] = static_cast<index_t>(shapes[2 * l]);
    t.width[l] = static_cast<index_t>(shapes[2 * l + 1]);
    t.start[l] = static_cast<index_t>(starts[l]);
  }
}

// Items are (b, q, h) in memory order; block i serves items [i * ipb, (i + 1) * ipb).
template <typename scalar_t, typename acc_t, typename index_t, int V>
__global__ void __launch_bounds__(kFwdThreads)
    fast_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                        const acc_t* __restrict__ attn, scalar_t* __restrict__ out,
                        Dims<index_t> d) {
  __shared__ LevelTables<index_t> tab;
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = static_cast<int>(d.Dh) / V;
  const int ipb = blockDim.x / G;
  index_t* s_off = reinterpret_cast<index_t*>(smem);  // [ipb * kFwdChunk][4]
  acc_t* s_wt = reinterpret_cast<acc_t*>(smem + sizeof(index_t) * ipb * kFwdChunk * 4);
  load_tables(tab, shapes, starts, d.L);
  __syncthreads();

  const int local = threadIdx.x / G, lane = threadIdx.x % G;
  const index_t n_items = d.B * d.Q * d.NH;
  const index_t first = static_cast<index_t>(blockIdx.x) * ipb;
  const index_t item = first + local;
  const bool active = item < n_items;
  const index_t LP = d.L * d.P;
  const index_t row = d.NH * d.Dh;
  acc_t acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0;

  for (index_t c0 = 0; c0 < LP; c0 += kFwdChunk) {
    for (int e = threadIdx.x; e < ipb * kFwdChunk; e += blockDim.x) {
      const index_t it = first + e / kFwdChunk;
      const index_t j = c0 + e % kFwdChunk;
      index_t* o = s_off + 4 * e;
      acc_t* w = s_wt + 4 * e;
      if (it < n_items && j < LP) {
        const index_t l = j / d.P;
        const index_t h = it % d.NH, b = it / (d.Q * d.NH);
        const index_t pj = it * LP + j;
        const auto c = msda::bilinear_corners<acc_t, index_t>(loc[2 * pj], loc[2 * pj + 1],
                                                              tab.height[l], tab.width[l]);
        const acc_t a = attn[pj];
        const index_t base = msda::value_index<index_t>(b, tab.start[l], h, d.S, d.NH, d.Dh);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          o[k] = c.valid[k] ? base + c.offset[k] * row : index_t(-1);
          w[k] = a * c.weight[k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          o[k] = index_t(-1);
          w[k] = 0;
        }
      }
    }
    __syncthreads();
    if (active) {
      const int nj = static_cast<int>(LP - c0 < kFwdChunk ? LP - c0 : kFwdChunk);
      for (int jj = 0; jj < nj; ++jj) {
        const int e = local * kFwdChunk + jj;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const index_t off = s_off[4 * e + k];
          if (off < 0) continue;
          const acc_t w = s_wt[4 * e + k];
          acc_t v[V];
          load_row<scalar_t, acc_t, V>(value + off + lane * V, v);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += w * v[i];
        }
      }
    }
    __syncthreads();
  }
  if (active) {
    Pack<scalar_t, V> pk;
#pragma unroll
    for (int i = 0; i < V; ++i) pk.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<Pack<scalar_t, V>*>(out + item * d.Dh + lane * V) = pk;
  }
}

template <typename acc_t, typename index_t>
struct BwdSample {
  index_t pix[4];  // y * W + x inside the level, -1 for corners outside the map
  acc_t lx, ly, a;
  int level;
};

// Grid: (query tiles, B * H). Block (tile, (b, h)) serves queries [tile * q_tile, ...) of (b, h).
template <typename scalar_t, typename acc_t, typename index_t, int V, bool kDet>
__global__ void __launch_bounds__(kBwdThreads)
    fast_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                         const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                         const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                         acc_t* __restrict__ grad_value,
                         unsigned long long* __restrict__ grad_value_fixed,
                         const double* __restrict__ fixed_scale, acc_t* __restrict__ grad_loc,
                         acc_t* __restrict__ grad_attn, Dims<index_t> d, index_t q_tile,
                         int stage_capacity) {
  __shared__ LevelTables<index_t> tab;
  __shared__ int s_stage_off[kMaxLevels];
  __shared__ int s_first_staged, s_stage_total;
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = static_cast<int>(d.Dh) / V;
  const int ipb = blockDim.x / G;
  auto* s_samp = reinterpret_cast<BwdSample<acc_t, index_t>*>(smem);  // [ipb * kBwdChunk]
  acc_t* stage = reinterpret_cast<acc_t*>(smem + sizeof(BwdSample<acc_t, index_t>) * ipb *
                                                     kBwdChunk);  // [stage_capacity]
  load_tables(tab, shapes, starts, d.L);
  __syncthreads();
  if (threadIdx.x == 0) {
    // Stage the largest suffix of levels (the coarse ones) that fits.
    int64_t total = 0;
    int first = static_cast<int>(d.L);
    if (!kDet) {
      for (int l = static_cast<int>(d.L) - 1; l >= 0; --l) {
        const int64_t need = int64_t(tab.height[l]) * tab.width[l] * d.Dh;
        if (total + need > stage_capacity) break;
        s_stage_off[l] = static_cast<int>(total);
        total += need;
        first = l;
      }
    }
    s_first_staged = first;
    s_stage_total = static_cast<int>(total);
  }
  __syncthreads();
  const int first_staged = s_first_staged, stage_total = s_stage_total;
  for (int e = threadIdx.x; e < stage_total; e += blockDim.x) stage[e] = 0;
  __syncthreads();

  const index_t bh = blockIdx.y;
  const index_t b = bh / d.NH, h = bh % d.NH;
  const index_t q_begin = static_cast<index_t>(blockIdx.x) * q_tile;
  const index_t q_end = q_begin + q_tile < d.Q ? q_begin + q_tile : d.Q;
  const index_t LP = d.L * d.P;
  const index_t row = d.NH * d.Dh;
  const int local = threadIdx.x / G, lane = threadIdx.x % G;
  const double scale = kDet ? *fixed_scale : 1.0;

  for (index_t q0 = q_begin; q0 < q_end; q0 += ipb) {
    const index_t q = q0 + local;
    const bool active = q < q_end;
    const index_t t = (b * d.Q + q) * d.NH + h;
    acc_t g[V];
    if (active) {
      load_row<scalar_t, acc_t, V>(grad_out + t * d.Dh + lane * V, g);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) g[i] = 0;
    }
    for (index_t c0 = 0; c0 < LP; c0 += kBwdChunk) {
      for (int e = threadIdx.x; e < ipb * kBwdChunk; e += blockDim.x) {
        const index_t qq = q0 + e / kBwdChunk;
        const index_t j = c0 + e % kBwdChunk;
        BwdSample<acc_t, index_t>& sm = s_samp[e];
        if (qq < q_end && j < LP) {
          const index_t l = j / d.P;
          const index_t pj = ((b * d.Q + qq) * d.NH + h) * LP + j;
          const auto c = msda::bilinear_corners<acc_t, index_t>(loc[2 * pj], loc[2 * pj + 1],
                                                                tab.height[l], tab.width[l]);
#pragma unroll
          for (int k = 0; k < 4; ++k) sm.pix[k] = c.valid[k] ? c.offset[k] : index_t(-1);
          sm.lx = c.lx;
          sm.ly = c.ly;
          sm.a = attn[pj];
          sm.level = static_cast<int>(l);
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) sm.pix[k] = index_t(-1);
          sm.lx = sm.ly = sm.a = 0;
          sm.level = 0;
        }
      }
      __syncthreads();
      const int nj = static_cast<int>(LP - c0 < kBwdChunk ? LP - c0 : kBwdChunk);
      for (int jj = 0; jj < nj; ++jj) {
        const BwdSample<acc_t, index_t>& sm = s_samp[local * kBwdChunk + jj];
        const acc_t lx = sm.lx, ly = sm.ly, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
        const acc_t w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
        const acc_t dx[4] = {-hy, hy, -ly, ly};
        const acc_t dy[4] = {-hx, -lx, hx, lx};
        const int l = sm.level;
        const index_t base = msda::value_index<index_t>(b, tab.start[l], h, d.S, d.NH, d.Dh);
        acc_t g_attn = 0, g_x = 0, g_y = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const index_t pix = sm.pix[k];
          if (pix < 0) continue;  // also every corner of inactive items
          const index_t off = base + pix * row + lane * V;
          acc_t v[V];
          load_row<scalar_t, acc_t, V>(value + off, v);
          acc_t dot = 0;
#pragma unroll
          for (int i = 0; i < V; ++i) dot += g[i] * v[i];
          g_attn += w[k] * dot;
          g_x += dx[k] * dot;
          g_y += dy[k] * dot;
          const acc_t aw = sm.a * w[k];
          if constexpr (kDet) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
              atomicAdd(grad_value_fixed + off + i,
                        to_fixed(static_cast<double>(aw * g[i]), scale));
            }
          } else if (l >= first_staged) {
            acc_t* st = stage + s_stage_off[l] + pix * d.Dh + lane * V;
#pragma unroll
            for (int i = 0; i < V; ++i) atomicAdd(st + i, aw * g[i]);
          } else {
            global_add<acc_t, V>(grad_value + off, aw, g);
          }
        }
        // Reduce over the item's G threads (aligned lanes of one warp), in a fixed order.
        for (int m = G / 2; m > 0; m >>= 1) {
          g_attn += __shfl_xor_sync(0xffffffffu, g_attn, m);
          g_x += __shfl_xor_sync(0xffffffffu, g_x, m);
          g_y += __shfl_xor_sync(0xffffffffu, g_y, m);
        }
        if (active && lane == 0) {
          const index_t pj = t * LP + c0 + jj;
          grad_attn[pj] = g_attn;
          grad_loc[2 * pj] = sm.a * g_x * static_cast<acc_t>(tab.width[l]);
          grad_loc[2 * pj + 1] = sm.a * g_y * static_cast<acc_t>(tab.height[l]);
        }
      }
      __syncthreads();
    }
  }

  // Flush the staged levels.
  for (int l = first_staged; l < static_cast<int>(d.L); ++l) {
    const index_t n = tab.height[l] * tab.width[l] * d.Dh;
    const acc_t* st = stage + s_stage_off[l];
    const index_t base = msda::value_index<index_t>(b, tab.start[l], h, d.S, d.NH, d.Dh);
    for (index_t e = threadIdx.x; e < n; e += blockDim.x) {
      const acc_t x = st[e];
      if (x != acc_t(0)) atomicAdd(grad_value + base + (e / d.Dh) * row + e % d.Dh, x);
    }
  }
}

// Vector width (channels per thread) of the optimised kernels, or 0 when they do not apply.
int fast_vector_width(const MsdaSizes& s, int64_t elem_size,
                      std::initializer_list<const void*> rows) {
  if (s.num_levels > kMaxLevels) return 0;
  auto pow2_upto32 = [](int64_t g) { return g >= 1 && g <= 32 && (g & (g - 1)) == 0; };
  const int64_t v16 = 16 / elem_size;
  bool aligned = true;
  for (const void* p : rows) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (aligned && s.head_dim % v16 == 0 && pow2_upto32(s.head_dim / v16)) {
    return static_cast<int>(v16);
  }
  return pow2_upto32(s.head_dim) ? 1 : 0;
}

int stage_budget_bytes() {
  const char* env = std::getenv("CQDINO_MSDA_STAGE_KB");
  int kb = kDefaultStageKB;
  if (env != nullptr && *env != '\0') kb = std::max(0, std::atoi(env));
  return kb * 1024;
}

template <typename scalar_t, typename acc_t, typename index_t, int V>
void launch_fast_forward(const at::Tensor& value, const at::Tensor& shapes,
                         const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                         at::Tensor& out, const MsdaSizes& s, cudaStream_t stream) {
  const int G = static_cast<int>(s.head_dim) / V;
  // items per block: a full block, but at most 32 KB of shared sample data
  const int ipb_smem =
      static_cast<int>(kSampleSmemBytes / (kFwdChunk * 4 * (sizeof(index_t) + sizeof(acc_t))));
  const int ipb = std::min(kFwdThreads / G, ipb_smem);
  const int threads = ipb * G;
  const int64_t n_items = s.batch * s.num_queries * s.num_heads;
  const int64_t blocks = (n_items + ipb - 1) / ipb;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: too many queries");
  const size_t smem = size_t(ipb) * kFwdChunk * 4 * (sizeof(index_t) + sizeof(acc_t));
  fast_forward_kernel<scalar_t, acc_t, index_t, V>
      <<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
          value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(),
          attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), make_dims<index_t>(s));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename index_t, int V, bool kDet>
void launch_fast_backward(const at::Tensor& grad_out, const at::Tensor& value,
                          const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                          const at::Tensor& attn, at::Tensor& grad_value,
                          at::Tensor& grad_value_fixed, const at::Tensor& fixed_scale,
                          at::Tensor& grad_loc, at::Tensor& grad_attn, const MsdaSizes& s,
                          const at::Tensor& shapes_cpu, cudaStream_t stream) {
  const int G = static_cast<int>(s.head_dim) / V;
  const int ipb_smem =
      static_cast<int>(kSampleSmemBytes / (kBwdChunk * sizeof(BwdSample<acc_t, index_t>)));
  const int ipb = std::min(kBwdThreads / G, ipb_smem);
  const int threads = ipb * G;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t sample_bytes = sizeof(BwdSample<acc_t, index_t>) * ipb * kBwdChunk;
  const size_t static_bytes = sizeof(LevelTables<index_t>) + sizeof(int) * (kMaxLevels + 2);
  const size_t optin = prop->sharedMemPerBlockOptin;
  size_t stage_bytes = kDet ? 0 : size_t(stage_budget_bytes());
  if (shapes_cpu.defined()) {
    // Level sizes known without a device sync: reserve exactly the levels that will be staged.
    const int64_t* sh = shapes_cpu.const_data_ptr<int64_t>();
    size_t used = 0;
    for (int64_t l = s.num_levels - 1; l >= 0; --l) {
      const size_t need = size_t(sh[2 * l]) * sh[2 * l + 1] * s.head_dim * sizeof(acc_t);
      if (used + need > stage_bytes) break;
      used += need;
    }
    stage_bytes = used;
  }
  const size_t per_bh = size_t(s.num_keys) * s.head_dim * sizeof(acc_t);  // all levels
  stage_bytes = std::min(stage_bytes, per_bh);
  if (sample_bytes + static_bytes + stage_bytes > optin) {
    stage_bytes = optin > sample_bytes + static_bytes ? optin - sample_bytes - static_bytes : 0;
  }
  stage_bytes -= stage_bytes % 16;
  const size_t smem = sample_bytes + stage_bytes;
  auto kernel = fast_backward_kernel<scalar_t, acc_t, index_t, V, kDet>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  // Query tiles: enough blocks for a few waves, tiles a multiple of the items per pass.
  const int64_t bh = s.batch * s.num_heads;
  const int64_t target_blocks = int64_t(prop->multiProcessorCount) * 4;
  const int64_t max_tiles = (s.num_queries + ipb - 1) / ipb;
  const int64_t tiles_wanted = std::max<int64_t>(1, (target_blocks + bh - 1) / bh);
  const int64_t tiles0 = std::min(max_tiles, tiles_wanted);
  int64_t q_tile = (s.num_queries + tiles0 - 1) / tiles0;
  q_tile = (q_tile + ipb - 1) / ipb * ipb;
  const int64_t tiles = (s.num_queries + q_tile - 1) / q_tile;
  TORCH_CHECK(bh <= 65535, "ms_deform_attn_backward: batch * heads = ", bh,
              " exceeds the CUDA grid limit 65535");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(bh));
  kernel<<<grid, threads, smem, stream>>>(
      grad_out.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
      shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
      loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(),
      kDet ? nullptr : grad_value.mutable_data_ptr<acc_t>(),
      kDet ? reinterpret_cast<unsigned long long*>(grad_value_fixed.mutable_data_ptr<int64_t>())
           : nullptr,
      kDet ? fixed_scale.const_data_ptr<double>() : nullptr, grad_loc.mutable_data_ptr<acc_t>(),
      grad_attn.mutable_data_ptr<acc_t>(), make_dims<index_t>(s), static_cast<index_t>(q_tile),
      static_cast<int>(stage_bytes / sizeof(acc_t)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs `fn.template operator()<index_t, V>()` for the index width and vector width chosen.
template <typename scalar_t, typename Fn>
void dispatch_index_and_vec(bool wide, int vec, Fn&& fn) {
  constexpr int kV16 = 16 / static_cast<int>(sizeof(scalar_t));
  if (wide) {
    if (vec == 1) {
      fn.template operator()<int64_t, 1>();
    } else {
      fn.template operator()<int64_t, kV16>();
    }
  } else {
    if (vec == 1) {
      fn.template operator()<int32_t, 1>();
    } else {
      fn.template operator()<int32_t, kV16>();
    }
  }
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       bool /*deterministic: the forward always is*/) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto value = value_in.contiguous();
  const int vec = fast_vector_width(s, value.element_size(), {value.const_data_ptr()});
  if (vec == 0) {
    return naive_forward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  }
  const auto acc_type = ms_deform_attn_acc_type(value.scalar_type());
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const auto shapes = spatial_shapes.to(value.device()).contiguous();
  const auto starts = level_start_index.to(value.device()).contiguous();
  auto out = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  const bool wide = msda::needs_64bit_index(s.batch, s.num_keys, s.num_heads, s.head_dim,
                                            s.num_queries, s.num_levels, s.num_points);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_index_and_vec<scalar_t>(wide, vec, [&]<typename index_t, int V>() {
          launch_fast_forward<scalar_t, acc_t, index_t, V>(value, shapes, starts, loc, attn, out, s,
                                                           stream);
        });
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
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto grad_out = grad_output.to(value.scalar_type()).contiguous();
  const int vec = fast_vector_width(s, value.element_size(),
                                    {value.const_data_ptr(), grad_out.const_data_ptr()});
  if (vec == 0) {
    TORCH_CHECK(!deterministic,
                "ms_deform_attn_backward: the deterministic CUDA backward needs head_dim to be "
                "a power of two <= 32, or a multiple of 16 bytes of channels forming at most 32 "
                "16-byte groups, and at most ",
                kMaxLevels, " levels; got head_dim=", s.head_dim, ", levels=", s.num_levels);
    return naive_backward_cuda(grad_out, value, spatial_shapes, level_start_index,
                               sampling_locations, attention_weights);
  }
  const auto acc_type = ms_deform_attn_acc_type(value.scalar_type());
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const auto shapes = spatial_shapes.to(value.device()).contiguous();
  const auto starts = level_start_index.to(value.device()).contiguous();
  const at::Tensor shapes_cpu =
      spatial_shapes.device().is_cpu() ? spatial_shapes.contiguous() : at::Tensor();
  // Every sample's grad_loc / grad_attn is written (zeros for samples off the map).
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  at::Tensor grad_value, grad_value_fixed, fixed_scale;
  if (deterministic) {
    grad_value_fixed = at::zeros(value.sizes(), value.options().dtype(at::kLong));
    // Bound of any |sum of contributions| to one value-gradient entry, and the scale 2^k that
    // maps it to at most 2^62. Computed on the device: no host synchronisation.
    const auto gmax = grad_out.abs().amax().to(at::kDouble);
    const auto amax = attn.abs().sum(at::IntArrayRef{1, 3, 4}).amax().to(at::kDouble);
    const auto bound = at::clamp_min(gmax * amax, 1e-30);
    fixed_scale = at::exp2(62.0 - at::ceil(at::log2(bound))).contiguous();
  } else {
    grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  }
  const bool wide = msda::needs_64bit_index(s.batch, s.num_keys, s.num_heads, s.head_dim,
                                            s.num_queries, s.num_levels, s.num_points);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_index_and_vec<scalar_t>(wide, vec, [&]<typename index_t, int V>() {
          if (deterministic) {
            launch_fast_backward<scalar_t, acc_t, index_t, V, true>(
                grad_out, value, shapes, starts, loc, attn, grad_value, grad_value_fixed,
                fixed_scale, grad_loc, grad_attn, s, shapes_cpu, stream);
          } else {
            launch_fast_backward<scalar_t, acc_t, index_t, V, false>(
                grad_out, value, shapes, starts, loc, attn, grad_value, grad_value_fixed,
                fixed_scale, grad_loc, grad_attn, s, shapes_cpu, stream);
          }
        });
      });
  if (deterministic) {
    grad_value = grad_value_fixed.to(at::kDouble).div_(fixed_scale);
  }
  return {grad_value.to(value_in.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace cqdino

TORCH_LIBRARY_IMPL(cqdino, CUDA, m) {
  m.impl("ms_deform_attn_forward", &cqdino::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &cqdino::ms_deform_attn_backward_cuda);
  m.impl("_ms_deform_attn_forward_naive", &cqdino::naive_forward_cuda);
  m.impl("_ms_deform_attn_backward_naive", &cqdino::naive_backward_cuda);
}
