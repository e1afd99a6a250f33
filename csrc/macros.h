// Portability macros shared by the CPU and CUDA code of every op.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CQDINO_HOST_DEVICE __host__ __device__
#define CQDINO_INLINE __forceinline__
#define CQDINO_UNROLL _Pragma("unroll")
#else
#define CQDINO_HOST_DEVICE
#define CQDINO_INLINE inline
#define CQDINO_UNROLL
#endif
