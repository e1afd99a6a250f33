// CUDA kernels of the fused top-K category gather.
//
// Forward: one CTA per image, one launch. The CTA builds the keys of topk_gather_core.h (staged
// in shared memory when the row fits, otherwise recomputed from global memory on every pass),
// radix-selects the K-th largest key with 8-bit digits (shared-memory histogram + block scan),
// collects the K keys at or above it, bitonic-sorts them into output order in shared memory,
// writes the indices and copies the K embedding rows with the widest aligned vector loads.
// Nothing is read back to the host.
//
// Backward: a position map pos[b, c] (scatter of distinct slots, deterministic), then one
// thread per output element: per-image rows are copied or zeroed; shared rows are summed over
// the images in a fixed order (no atomics, bitwise deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "topk_gather/topk_gather.h"
#include "topk_gather/topk_gather_core.h"

namespace cqdino {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads >= topk::kRadixSize, "the bucket scan needs one thread per bucket");
// Shared memory for the sort buffer (next power of two >= K keys): K <= 8192 (4096 for double).
constexpr int64_t kMaxSortBytes = 64 * 1024;
// Room left for the kernel's static shared memory when deciding whether a row can be staged.
constexpr int64_t kStaticSmemReserve = 4 * 1024;

template <typename vec_t, typename key_t>
__device__ __forceinline__ void copy_rows(const char* __restrict__ src_base, int64_t stride_c,
                                          const key_t* sel, int k, int64_t row_bytes,
                                          char* __restrict__ dst_base) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t total = vecs * k;
  for (int64_t t = threadIdx.x; t < total; t += kThreads) {
    const int64_t j = t / vecs;
    const int64_t v = t - j * vecs;
    const vec_t* src =
        reinterpret_cast<const vec_t*>(src_base + topk::key_index(sel[j]) * stride_c);
    vec_t* dst = reinterpret_cast<vec_t*>(dst_base + j * row_bytes);
    dst[v] = __ldg(src + v);
  }
}

template <typename scalar_t, typename key_t, bool kStaged>
__global__ void __launch_bounds__(kThreads)
    topk_gather_kernel(const scalar_t* __restrict__ scores, const bool* __restrict__ force,
                       int64_t C, int k, int sort_n, const char* __restrict__ emb, int64_t stride_b,
                       int64_t stride_c, int64_t row_bytes, int vec_bytes,
                       int64_t* __restrict__ out_idx, char* __restrict__ out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  key_t* sel = reinterpret_cast<key_t*>(smem_raw);  // [sort_n]
  key_t* staged = sel + sort_n;                     // [C] when kStaged
  __shared__ int hist[topk::kRadixSize];
  __shared__ int warp_total[kWarps];
  __shared__ key_t prefix_s;
  __shared__ int rank_s;
  __shared__ int count_s;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const scalar_t* s = scores + b * C;
  const bool* f = force != nullptr ? force + b * C : nullptr;
  auto make = [&](int64_t i) -> key_t {
    return topk::make_key(static_cast<acc_t>(s[i]), f != nullptr && f[i], i);
  };
  if (kStaged) {
    for (int64_t i = tid; i < C; i += kThreads) staged[i] = make(i);
  }
  if (tid == 0) {
    topk::key_zero(&prefix_s);
    rank_s = k;
    count_s = 0;
  }

  // Radix select of the k-th largest key, most significant digit first.
  key_t zero_key;
  topk::key_zero(&zero_key);
  const int digits = topk::num_digits(zero_key);
  for (int d = 0; d < digits; ++d) {
    if (tid < topk::kRadixSize) hist[tid] = 0;
    __syncthreads();
    const key_t prefix = prefix_s;
    const int rank = rank_s;
    for (int64_t i = tid; i < C; i += kThreads) {
      const key_t key = kStaged ? staged[i] : make(i);
      if (topk::key_prefix_match(key, prefix, d)) atomicAdd(&hist[topk::key_digit(key, d)], 1);
    }
    __syncthreads();
    // Thread t looks at bucket 255 - t; an inclusive scan over t gives the number of matching
    // keys in buckets >= that bucket.
    const int bucket = topk::kRadixSize - 1 - tid;
    const int here = tid < topk::kRadixSize ? hist[bucket] : 0;
    int incl = here;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += v;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    if (tid < topk::kRadixSize) {
      for (int w = 0; w < warp; ++w) incl += warp_total[w];
      const int above = incl - here;
      if (topk::bucket_holds_rank(above, here, rank)) {  // exactly one bucket
        prefix_s = topk::key_with_digit(prefix, d, static_cast<uint32_t>(bucket));
        rank_s = rank - above;
      }
    }
  }
  __syncthreads();

  // Keys are unique, so exactly k keys are >= the k-th largest one.
  const key_t threshold = prefix_s;
  for (int64_t i = tid; i < C; i += kThreads) {
    const key_t key = kStaged ? staged[i] : make(i);
    if (!topk::key_greater(threshold, key)) {
      const int p = atomicAdd(&count_s, 1);
      if (p < k) sel[p] = key;
    }
  }
  for (int j = k + tid; j < sort_n; j += kThreads) topk::key_zero(&sel[j]);  // sorts last
  __syncthreads();

  // Bitonic sort of sel into output order (score descending, then index ascending).
  for (int size = 2; size <= sort_n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < (sort_n >> 1); i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const key_t x = sel[lo];
        const key_t y = sel[hi];
        const bool descending = (lo & size) == 0;
        if (descending ? topk::output_before(y, x) : topk::output_before(x, y)) {
          sel[lo] = y;
          sel[hi] = x;
        }
      }
      __syncthreads();
    }
  }

  // Indices, then the rows (their ids are read from the sorted keys in shared memory).
  for (int j = tid; j < k; j += kThreads) out_idx[b * k + j] = topk::key_index(sel[j]);
  if (row_bytes == 0) return;
  const char* src = emb + b * stride_b;
  char* dst = out_rows + b * k * row_bytes;
  switch (vec_bytes) {
    case 16:
      copy_rows<uint4>(src, stride_c, sel, k, row_bytes, dst);
      break;
    case 8:
      copy_rows<uint2>(src, stride_c, sel, k, row_bytes, dst);
      break;
    case 4:
      copy_rows<unsigned int>(src, stride_c, sel, k, row_bytes, dst);
      break;
    default:
      copy_rows<unsigned short>(src, stride_c, sel, k, row_bytes, dst);
      break;
  }
}

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Widest vector (16, 8, 4 or 2 bytes) that divides every address the copy touches.
int vector_bytes(const void* src, const void* dst, int64_t stride_b, int64_t stride_c,
                 int64_t row_bytes) {
  const auto a = reinterpret_cast<uintptr_t>(src);
  const auto o = reinterpret_cast<uintptr_t>(dst);
  for (int v : {16, 8, 4}) {
    if (a % v == 0 && o % v == 0 && stride_b % v == 0 && stride_c % v == 0 && row_bytes % v == 0) {
      return v;
    }
  }
  return 2;
}

template <typename scalar_t, typename key_t, bool kStaged>
void launch_forward(const at::Tensor& scores, const bool* force, const TopkSizes& s, int sort_n,
                    int64_t smem, const char* emb, int64_t stride_b, int64_t stride_c,
                    int64_t row_bytes, int vec_bytes, at::Tensor& indices, at::Tensor& gathered) {
  auto kernel = topk_gather_kernel<scalar_t, key_t, kStaged>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned int>(s.batch), kThreads, smem, stream>>>(
      scores.data_ptr<scalar_t>(), force, s.num_categories, static_cast<int>(s.k), sort_n, emb,
      stride_b, stride_c, row_bytes, vec_bytes, indices.data_ptr<int64_t>(),
      static_cast<char*>(gathered.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> topk_category_gather_cuda(
    const at::Tensor& scores_in, const at::Tensor& embeddings_in, int64_t k,
    const c10::optional<at::Tensor>& force_in) {
  // checks first (a clear error for a CPU tensor), then the device guard
  const TopkForwardPlan plan = plan_topk_gather_forward(scores_in, embeddings_in, k, force_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const TopkSizes& s = plan.sizes;
  const at::Tensor& scores = plan.scores;
  at::Tensor indices = plan.indices, gathered = plan.gathered;
  if (s.batch == 0) return {indices, gathered};
  TORCH_CHECK_VALUE(s.batch <= 0x7FFFFFFF, "topk_category_gather: batch too large (", s.batch, ")");
  const bool* force_ptr = plan.force_ptr;
  const int64_t row_bytes = plan.row_bytes, stride_b = plan.stride_b, stride_c = plan.stride_c;
  const char* emb = static_cast<const char*>(plan.embeddings.data_ptr());
  const int vec_bytes = vector_bytes(emb, gathered.data_ptr(), stride_b, stride_c, row_bytes);
  const int64_t sort_n = next_pow2(k);
  const int64_t max_smem =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_category_gather_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using key_t = decltype(topk::make_key(acc_t(0), false, 0));
        const int64_t key_bytes = static_cast<int64_t>(sizeof(key_t));
        const int64_t sort_bytes = sort_n * key_bytes;
        TORCH_CHECK_VALUE(
            sort_bytes <= kMaxSortBytes && sort_bytes + kStaticSmemReserve <= max_smem,
            "topk_category_gather: k = ", k, " is too large for the CUDA kernel ", "(at most ",
            kMaxSortBytes / key_bytes, " for ", scores.scalar_type(), " scores)");
        const int64_t staged_bytes = sort_bytes + s.num_categories * key_bytes;
        if (staged_bytes + kStaticSmemReserve <= max_smem) {
          launch_forward<scalar_t, key_t, true>(scores, force_ptr, s, static_cast<int>(sort_n),
                                                staged_bytes, emb, stride_b, stride_c, row_bytes,
                                                vec_bytes, indices, gathered);
        } else {
          launch_forward<scalar_t, key_t, false>(scores, force_ptr, s, static_cast<int>(sort_n),
                                                 sort_bytes, emb, stride_b, stride_c, row_bytes,
                                                 vec_bytes, indices, gathered);
        }
      });
  return {indices, gathered};
}

template <typename scalar_t>
__global__ void backward_shared_kernel(const scalar_t* __restrict__ grad,
                                       const int32_t* __restrict__ pos, int64_t B, int64_t K,
                                       int64_t C, int64_t D, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = C * D;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = t / D;
    const int64_t d = t - c * D;
    acc_t acc = 0;
    for (int64_t b = 0; b < B; ++b) {  // fixed order: deterministic
      const int32_t p = pos[b * C + c];
      if (p >= 0) acc += static_cast<acc_t>(grad[(b * K + p) * D + d]);
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_per_image_kernel(const scalar_t* __restrict__ grad,
                                          const int32_t* __restrict__ pos, int64_t B, int64_t K,
                                          int64_t C, int64_t D, scalar_t* __restrict__ out) {
  const int64_t n = B * C * D;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t bc = t / D;
    const int64_t d = t - bc * D;
    const int32_t p = pos[bc];
    out[t] = p >= 0 ? grad[((bc / C) * K + p) * D + d] : scalar_t(0);
  }
}

at::Tensor topk_category_gather_backward_cuda(const at::Tensor& grad_gathered,
                                              const at::Tensor& indices_in, int64_t num_categories,
                                              bool shared) {
  const auto grad = check_topk_gather_backward_inputs(grad_gathered, indices_in, num_categories);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto indices = indices_in.contiguous();
  const int64_t B = grad.size(0);
  const int64_t K = grad.size(1);
  const int64_t D = grad.size(2);
  const int64_t C = num_categories;
  at::Tensor out =
      shared ? at::empty({C, D}, grad.options()) : at::empty({B, C, D}, grad.options());
  if (out.numel() == 0) return out;
  const auto pos = topk_position_map(indices, C);
  const int64_t n = out.numel();
  const int threads = 256;
  const auto blocks =
      static_cast<unsigned int>(std::min<int64_t>((n + threads - 1) / threads, 1 << 20));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "topk_category_gather_backward_cuda", [&] {
        if (shared) {
          backward_shared_kernel<scalar_t>
              <<<blocks, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), pos.data_ptr<int32_t>(),
                                               B, K, C, D, out.data_ptr<scalar_t>());
        } else {
          backward_per_image_kernel<scalar_t>
              <<<blocks, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), pos.data_ptr<int32_t>(),
                                               B, K, C, D, out.data_ptr<scalar_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace
}  // namespace cqdino

TORCH_LIBRARY_IMPL(cqdino, CUDA, m) {
  m.impl("topk_category_gather", &cqdino::topk_category_gather_cuda);
  m.impl("topk_category_gather_backward", &cqdino::topk_category_gather_backward_cuda);
}
