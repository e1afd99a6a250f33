// CPU kernels of multi-scale deformable attention.
//
// Work order. Both passes walk the (b, q, h) samples head-major, as (b, h, q): the rows of one
// (b, h) are S lines of Dh contiguous channels (for S = 5,440 and Dh = 32, 0.7 MB), a working
// set that stays in the core's L2 while all queries of that head are processed, whereas the
// query-major order sweeps the whole value tensor for every query.
//   forward:  at::parallel_for over the B*H*Q (b, h, q) items; each item accumulates its Dh
//             channels in registers and writes its output row once (no temporaries).
//   backward: at::parallel_for over the B*H (b, h) pairs; a task owns the value-gradient rows
//             of its (b, h), so it accumulates them without atomics, races or per-thread copies,
//             and the result is bitwise deterministic whatever the number of threads.
// Latency hiding: the corners of item i+1 are computed, and their value (and value-gradient)
// lines prefetched, before item i is accumulated.
// Vector width: the inner loops run over Dh contiguous channels with a compile-time Dh for the
// common Dh = 32, and are compiled twice, for the build's baseline ISA and with AVX2 + FMA,
// chosen at run time (the default build flags stay portable). Half inputs are widened to fp32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_core.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CQDINO_MSDA_X86 1
#define CQDINO_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CQDINO_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define CQDINO_MSDA_X86 0
#define CQDINO_ALWAYS_INLINE inline
#endif

namespace cqdino {
namespace {

using msda::bilinear_corners;
using msda::Corners;

// -1: not chosen yet; 0: portable; 1: AVX2 + FMA.
std::atomic<int> g_isa{-1};

int detect_isa() {
#if CQDINO_MSDA_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = detect_isa();
    const char* env = std::getenv("CQDINO_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "default") == 0) isa = 0;
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

struct Tables {
  std::vector<int64_t> height, width, start;
};

Tables read_tables(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  Tables t;
  const int64_t L = shapes.size(0);
  const int64_t* sh = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    t.height.push_back(sh[2 * l]);
    t.width.push_back(sh[2 * l + 1]);
    t.start.push_back(st[l]);
  }
  return t;
}

CQDINO_ALWAYS_INLINE void prefetch_row(const void* p, int64_t bytes, bool write) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write) {
      __builtin_prefetch(c + off, 1, 3);
    } else {
      __builtin_prefetch(c + off, 0, 3);
    }
  }
#else
  (void)p;
  (void)bytes;
  (void)write;
#endif
}

constexpr int64_t kPrefetchItems = 4;

// Problem description shared by the forward and backward tasks.
template <typename scalar_t, typename acc_t>
struct Problem {
  const scalar_t* value;
  const acc_t* loc;
  const acc_t* attn;
  const int64_t* height;
  const int64_t* width;
  const int64_t* start;
  int64_t S, NH, Dh, Q, L, P;

  // The locations and weights of item t (read kPrefetchItems items ahead: in head-major order
  // consecutive items are H * L * P * 2 values apart, a stride the hardware prefetchers miss).
  CQDINO_ALWAYS_INLINE void prefetch_item(int64_t t) const {
    const int64_t LP = L * P;
    prefetch_row(loc + t * LP * 2, LP * 2 * int64_t(sizeof(acc_t)), false);
    prefetch_row(attn + t * LP, LP * int64_t(sizeof(acc_t)), false);
  }

  // Corners of the L*P samples of item t = (b, q, h), with corner offsets made absolute
  // (flat index of value[b, s, h, 0]); prefetches the value rows (and `grad` rows) they read.
  CQDINO_ALWAYS_INLINE void corners(int64_t b, int64_t h, int64_t t, Corners<acc_t, int64_t>* c,
                                    const acc_t* grad_rows_base) const {
    const int64_t LP = L * P;
    const int64_t row_stride = NH * Dh;
    const acc_t* lp = loc + t * LP * 2;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t base = msda::value_index<int64_t>(b, start[l], h, S, NH, Dh);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t j = l * P + p;
        c[j] = bilinear_corners<acc_t, int64_t>(lp[2 * j], lp[2 * j + 1], height[l], width[l]);
        if (!c[j].any) continue;
        for (int k = 0; k < 4; ++k) {
          c[j].offset[k] = base + c[j].offset[k] * row_stride;
          if (!c[j].valid[k]) continue;
          prefetch_row(value + c[j].offset[k], Dh * int64_t(sizeof(scalar_t)), false);
          if (grad_rows_base != nullptr) {
            prefetch_row(grad_rows_base + c[j].offset[k], Dh * int64_t(sizeof(acc_t)), true);
          }
        }
      }
    }
  }
};

// d-loop helpers. With a compile-time Dh (kDh > 0) they work on 32-byte GCC vectors (AVX2
// registers in the AVX2 build, pairs of SSE registers in the portable one), which vectorises
// reliably where the plain loops do not (pointer aliasing, reductions). Half values are widened
// to fp32 first.
#if defined(__GNUC__)
template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
constexpr int kLanes = 32 / int(sizeof(T));

template <typename T>
CQDINO_ALWAYS_INLINE typename Vec32<T>::type vload(const T* p) {
  typename Vec32<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
CQDINO_ALWAYS_INLINE void vstore(T* p, const typename Vec32<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int kDh, typename acc_t>
constexpr bool kUseVec = kDh > 0 && kDh % kLanes<acc_t> == 0;
#else
template <int kDh, typename acc_t>
constexpr bool kUseVec = false;
#endif

// Row of kDh values as acc_t: the row itself when the types agree, else a widened copy.
template <int kDh, typename acc_t, typename scalar_t>
struct Widened {
  acc_t buf[kDh > 0 ? kDh : 1];
  const acc_t* ptr;
  CQDINO_ALWAYS_INLINE explicit Widened(const scalar_t* x) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      ptr = x;
    } else {
      for (int d = 0; d < kDh; ++d) buf[d] = static_cast<acc_t>(x[d]);
      ptr = buf;
    }
  }
};

// y[0:Dh] += a * x[0:Dh]
template <int kDh, typename acc_t, typename scalar_t>
CQDINO_ALWAYS_INLINE void axpy(acc_t* y, acc_t a, const scalar_t* x, int64_t dh) {
#if defined(__GNUC__)
  if constexpr (kUseVec<kDh, acc_t>) {
    const Widened<kDh, acc_t, scalar_t> xw(x);
    for (int d = 0; d < kDh; d += kLanes<acc_t>) {
      vstore(y + d, vload(y + d) + a * vload(xw.ptr + d));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < dh; ++d) y[d] += a * static_cast<acc_t>(x[d]);
}

// sum_d g[d] * v[d]
template <int kDh, typename acc_t, typename scalar_t>
CQDINO_ALWAYS_INLINE acc_t dot(const acc_t* g, const scalar_t* v, int64_t dh) {
#if defined(__GNUC__)
  if constexpr (kUseVec<kDh, acc_t>) {
    const Widened<kDh, acc_t, scalar_t> vw(v);
    typename Vec32<acc_t>::type s = vload(g) * vload(vw.ptr);
    for (int d = kLanes<acc_t>; d < kDh; d += kLanes<acc_t>) s += vload(g + d) * vload(vw.ptr + d);
    acc_t r = 0;
    for (int k = 0; k < kLanes<acc_t>; ++k) r += s[k];
    return r;
  }
#endif
  acc_t s = 0;
  for (int64_t d = 0; d < dh; ++d) s += g[d] * static_cast<acc_t>(v[d]);
  return s;
}

template <typename scalar_t, typename acc_t, int kDh>
struct ForwardTask {
  Problem<scalar_t, acc_t> pb;
  scalar_t* out;

  // Items [begin, end) of the (b, h, q) order.
  CQDINO_ALWAYS_INLINE void operator()(int64_t begin, int64_t end) const {
    const int64_t Q = pb.Q, NH = pb.NH, Dh = kDh > 0 ? kDh : pb.Dh, LP = pb.L * pb.P;
    std::vector<Corners<acc_t, int64_t>> buf(2 * LP);
    std::vector<acc_t> acc_heap(kDh > 0 ? 0 : Dh);
    acc_t acc_stack[kDh > 0 ? kDh : 1];
    acc_t* acc = kDh > 0 ? acc_stack : acc_heap.data();
    auto item = [&](int64_t i, int64_t& b, int64_t& h) {
      const int64_t bh = i / Q, q = i - bh * Q;
      b = bh / NH;
      h = bh - b * NH;
      return (b * Q + q) * NH + h;
    };
    int64_t b, h;
    int64_t t = item(begin, b, h);
    pb.corners(b, h, t, buf.data(), nullptr);
    for (int64_t i = begin; i < end; ++i) {
      Corners<acc_t, int64_t>* c = buf.data() + ((i - begin) & 1) * LP;
      int64_t t_next = 0;
      if (i + 1 < end) {
        int64_t bn, hn;
        t_next = item(i + 1, bn, hn);
        pb.corners(bn, hn, t_next, buf.data() + ((i + 1 - begin) & 1) * LP, nullptr);
      }
      if (i + kPrefetchItems < end) {
        int64_t bp, hp;
        pb.prefetch_item(item(i + kPrefetchItems, bp, hp));
      }
      for (int64_t d = 0; d < Dh; ++d) acc[d] = 0;
      const acc_t* a_ptr = pb.attn + t * LP;
      for (int64_t j = 0; j < LP; ++j) {
        if (!c[j].any) continue;
        const acc_t a = a_ptr[j];
        for (int k = 0; k < 4; ++k) {
          if (!c[j].valid[k]) continue;
          axpy<kDh>(acc, a * c[j].weight[k], pb.value + c[j].offset[k], Dh);
        }
      }
      scalar_t* o = out + t * Dh;
      for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      t = t_next;
    }
  }
};

template <typename scalar_t, typename acc_t, int kDh>
struct BackwardTask {
  Problem<scalar_t, acc_t> pb;
  const scalar_t* grad_out;
  acc_t* grad_value;
  acc_t* grad_loc;
  acc_t* grad_attn;

  // (b, h) pairs [begin, end); each owns grad_value[b, :, h, :].
  CQDINO_ALWAYS_INLINE void operator()(int64_t begin, int64_t end) const {
    const int64_t Q = pb.Q, NH = pb.NH, Dh = kDh > 0 ? kDh : pb.Dh, LP = pb.L * pb.P;
    std::vector<Corners<acc_t, int64_t>> buf(2 * LP);
    std::vector<acc_t> g_heap(kDh > 0 ? 0 : Dh);
    acc_t g_stack[kDh > 0 ? kDh : 1];
    acc_t* g = kDh > 0 ? g_stack : g_heap.data();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / NH, h = bh - (bh / NH) * NH;
      pb.corners(b, h, b * Q * NH + h, buf.data(), grad_value);
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t t = (b * Q + q) * NH + h;
        Corners<acc_t, int64_t>* c = buf.data() + (q & 1) * LP;
        if (q + 1 < Q) pb.corners(b, h, t + NH, buf.data() + ((q + 1) & 1) * LP, grad_value);
        if (q + kPrefetchItems < Q) {
          const int64_t tp = t + kPrefetchItems * NH;
          pb.prefetch_item(tp);
          prefetch_row(grad_out + tp * Dh, Dh * int64_t(sizeof(scalar_t)), false);
        }
        const scalar_t* go = grad_out + t * Dh;
        for (int64_t d = 0; d < Dh; ++d) g[d] = static_cast<acc_t>(go[d]);
        for (int64_t l = 0; l < pb.L; ++l) {
          const acc_t W = static_cast<acc_t>(pb.width[l]);
          const acc_t H = static_cast<acc_t>(pb.height[l]);
          for (int64_t p = 0; p < pb.P; ++p) {
            const int64_t jl = l * pb.P + p;
            const int64_t j = t * LP + jl;
            const Corners<acc_t, int64_t>& cj = c[jl];
            if (!cj.any) {
              grad_attn[j] = 0;
              grad_loc[2 * j] = 0;
              grad_loc[2 * j + 1] = 0;
              continue;
            }
            const acc_t a = pb.attn[j];
            acc_t g_attn = 0, g_x = 0, g_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (!cj.valid[k]) continue;
              const acc_t gv_dot = dot<kDh>(g, pb.value + cj.offset[k], Dh);
              axpy<kDh>(grad_value + cj.offset[k], a * cj.weight[k], g, Dh);
              g_attn += cj.weight[k] * gv_dot;
              g_x += cj.dw_dx[k] * gv_dot;
              g_y += cj.dw_dy[k] * gv_dot;
            }
            grad_attn[j] = g_attn;
            grad_loc[2 * j] = a * g_x * W;
            grad_loc[2 * j + 1] = a * g_y * H;
          }
        }
      }
    }
  }
};

template <typename Task>
void run_portable(const Task& task, int64_t begin, int64_t end) {
  task(begin, end);
}

#if CQDINO_MSDA_X86
template <typename Task>
CQDINO_TARGET_AVX2 void run_avx2(const Task& task, int64_t begin, int64_t end) {
  task(begin, end);
}
#endif

template <typename Task>
void run_parallel(const Task& task, int64_t n, int64_t grain) {
  void (*fn)(const Task&, int64_t, int64_t) = &run_portable<Task>;
#if CQDINO_MSDA_X86
  if (current_isa() == 1) fn = &run_avx2<Task>;
#endif
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(task, begin, end); });
}

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const scalar_t* value, const acc_t* loc, const acc_t* attn,
                                      const Tables& tab, const MsdaSizes& s) {
  return {
      value,      loc,         attn,       tab.height.data(), tab.width.data(), tab.start.data(),
      s.num_keys, s.num_heads, s.head_dim, s.num_queries,     s.num_levels,     s.num_points};
}

}  // namespace

std::string ms_deform_attn_cpu_isa(const std::string& request) {
  if (request == "default") {
    g_isa.store(0);
  } else if (request == "auto") {
    g_isa.store(detect_isa());
  } else {
    TORCH_CHECK_VALUE(request.empty(), "ms_deform_attn: unknown CPU ISA request '", request,
                      "' (expected '', 'auto' or 'default')");
  }
  return current_isa() == 1 ? "avx2" : "default";
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights,
                                      bool /*deterministic: the forward always is*/) {
  const MsdaSizes s = check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights);
  const auto acc_type = ms_deform_attn_acc_type(value_in.scalar_type());
  const auto value = value_in.contiguous();
  const auto loc = sampling_locations.to(acc_type).contiguous();
  const auto attn = attention_weights.to(acc_type).contiguous();
  const Tables tab = read_tables(spatial_shapes, level_start_index);
  auto out = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  const int64_t n = s.batch * s.num_heads * s.num_queries;
  const int64_t grain = std::max<int64_t>(16, 4096 / (s.num_levels * s.num_points * s.head_dim));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto pb = make_problem<scalar_t, acc_t>(value.const_data_ptr<scalar_t>(),
                                                      loc.const_data_ptr<acc_t>(),
                                                      attn.const_data_ptr<acc_t>(), tab, s);
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        if (s.head_dim == 32) {
          run_parallel(ForwardTask<scalar_t, acc_t, 32>{pb, o}, n, grain);
        } else {
          run_parallel(ForwardTask<scalar_t, acc_t, 0>{pb, o}, n, grain);
        }
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
        const auto pb = make_problem<scalar_t, acc_t>(value.const_data_ptr<scalar_t>(),
                                                      loc.const_data_ptr<acc_t>(),
                                                      attn.const_data_ptr<acc_t>(), tab, s);
        const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
        acc_t* gv = grad_value.mutable_data_ptr<acc_t>();
        acc_t* gl = grad_loc.mutable_data_ptr<acc_t>();
        acc_t* ga = grad_attn.mutable_data_ptr<acc_t>();
        const int64_t n = s.batch * s.num_heads;
        if (s.head_dim == 32) {
          run_parallel(BackwardTask<scalar_t, acc_t, 32>{pb, go, gv, gl, ga}, n, 1);
        } else {
          run_parallel(BackwardTask<scalar_t, acc_t, 0>{pb, go, gv, gl, ga}, n, 1);
        }
      });
  return {grad_value.to(value_in.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace cqdino
