// Selection keys and radix-select steps of the top-K category gather, shared by the CPU and
// CUDA kernels (the CPU tests therefore exercise the same ordering logic the GPU uses).
//
// Every candidate category i of an image gets one unique unsigned key; a larger key ranks first:
//
//   [ forced (1 bit) | order-preserving score bits | 0x7FFFFFFF - i (31 bits) ]
//
// * The score bits map floats to unsigned integers monotonically: NaN -> 0 (lowest, below -inf),
//   -0.0 and +0.0 -> the same value (they tie, as in torch.sort).
// * The index part makes equal scores rank the lower index first and makes every key unique, so
//   the K-th largest key is a threshold that selects exactly K categories.
// * The forced bit puts forced categories ahead of all others for the *selection*; the output
//   order uses the key with that bit cleared (score, then index).
// * Real keys are never 0 (the index part is >= 1 since C < 2^31 - 1), so 0 pads sort buffers.
//
// float / half / bfloat16 scores (read as float) use a 64-bit key; double scores a 96-bit key.
// A radix select looks at 8-bit digits from the most significant one down.
#pragma once

#include <cstdint>
#include <cstring>

#include "macros.h"

namespace cqdino {
namespace topk {

constexpr int64_t kMaxCategories = 0x7FFFFFFE;  // C must stay below 2^31 - 1
constexpr uint32_t kIndexBits = 0x7FFFFFFFu;
constexpr int kRadixBits = 8;
constexpr int kRadixSize = 1 << kRadixBits;

CQDINO_HOST_DEVICE CQDINO_INLINE uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

CQDINO_HOST_DEVICE CQDINO_INLINE uint64_t double_bits(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// Order-preserving unsigned image of a float: a < b  <=>  ordered(a) < ordered(b); NaN -> 0.
// Written without data-dependent branches: signs are random, and a mispredicted branch per
// score would dominate the CPU select.
CQDINO_HOST_DEVICE CQDINO_INLINE uint32_t ordered_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  const uint32_t negative = 0u - (u >> 31);                           // all ones if the sign is set
  const uint32_t flipped = u ^ (negative | 0x80000000u);              // negative: ~u, else u | sign
  const uint32_t keep = 0u - static_cast<uint32_t>(magnitude != 0u);  // -0.0 and +0.0 tie
  const uint32_t is_num = 0u - static_cast<uint32_t>(magnitude <= 0x7F800000u);  // NaN -> 0
  return ((flipped & keep) | (0x80000000u & ~keep)) & is_num;
}

CQDINO_HOST_DEVICE CQDINO_INLINE uint64_t ordered_bits(double x) {
  const uint64_t u = double_bits(x);
  const uint64_t sign = 0x8000000000000000ull;
  const uint64_t magnitude = u & ~sign;
  const uint64_t negative = 0ull - (u >> 63);
  const uint64_t flipped = u ^ (negative | sign);
  const uint64_t keep = 0ull - static_cast<uint64_t>(magnitude != 0ull);
  const uint64_t is_num = 0ull - static_cast<uint64_t>(magnitude <= 0x7FF0000000000000ull);
  return ((flipped & keep) | (sign & ~keep)) & is_num;
}

// ---------------------------------------------------------------- 64-bit key (float scores)

CQDINO_HOST_DEVICE CQDINO_INLINE uint64_t make_key(float score, bool forced, int64_t index) {
  return (static_cast<uint64_t>(forced) << 63) |
         (static_cast<uint64_t>(ordered_bits(score)) << 31) |
         static_cast<uint64_t>(kIndexBits - static_cast<uint32_t>(index));
}

CQDINO_HOST_DEVICE CQDINO_INLINE int num_digits(uint64_t) { return 8; }

CQDINO_HOST_DEVICE CQDINO_INLINE uint32_t key_digit(uint64_t key, int d) {
  return static_cast<uint32_t>(key >> (56 - kRadixBits * d)) & (kRadixSize - 1);
}

// Whether the first d digits of key and prefix agree (always true for d == 0).
CQDINO_HOST_DEVICE CQDINO_INLINE bool key_prefix_match(uint64_t key, uint64_t prefix, int d) {
  return d == 0 || ((key ^ prefix) >> (64 - kRadixBits * d)) == 0;
}

CQDINO_HOST_DEVICE CQDINO_INLINE uint64_t key_with_digit(uint64_t prefix, int d, uint32_t v) {
  const int shift = 56 - kRadixBits * d;
  return (prefix & ~(static_cast<uint64_t>(kRadixSize - 1) << shift)) |
         (static_cast<uint64_t>(v) << shift);
}

CQDINO_HOST_DEVICE CQDINO_INLINE bool key_greater(uint64_t a, uint64_t b) { return a > b; }
CQDINO_HOST_DEVICE CQDINO_INLINE bool key_equal(uint64_t a, uint64_t b) { return a == b; }
CQDINO_HOST_DEVICE CQDINO_INLINE uint64_t key_unforced(uint64_t key) {
  return key & 0x7FFFFFFFFFFFFFFFull;
}
CQDINO_HOST_DEVICE CQDINO_INLINE int64_t key_index(uint64_t key) {
  return static_cast<int64_t>(kIndexBits - static_cast<uint32_t>(key & kIndexBits));
}
CQDINO_HOST_DEVICE CQDINO_INLINE void key_zero(uint64_t* key) { *key = 0ull; }

// ---------------------------------------------------------------- 96-bit key (double scores)

struct Key96 {
  uint64_t hi;  // forced bit, then the top 63 bits of the ordered score
  uint32_t lo;  // lowest ordered-score bit, then the 31 index bits
};

CQDINO_HOST_DEVICE CQDINO_INLINE Key96 make_key(double score, bool forced, int64_t index) {
  const uint64_t s = ordered_bits(score);
  Key96 k;
  k.hi = (static_cast<uint64_t>(forced) << 63) | (s >> 1);
  k.lo = (static_cast<uint32_t>(s & 1ull) << 31) | (kIndexBits - static_cast<uint32_t>(index));
  return k;
}

CQDINO_HOST_DEVICE CQDINO_INLINE int num_digits(const Key96&) { return 12; }

CQDINO_HOST_DEVICE CQDINO_INLINE uint32_t key_digit(const Key96& key, int d) {
  if (d < 8) return static_cast<uint32_t>(key.hi >> (56 - kRadixBits * d)) & (kRadixSize - 1);
  return (key.lo >> (24 - kRadixBits * (d - 8))) & (kRadixSize - 1);
}

CQDINO_HOST_DEVICE CQDINO_INLINE bool key_prefix_match(const Key96& key, const Key96& prefix,
                                                       int d) {
  if (d <= 8) return key_prefix_match(key.hi, prefix.hi, d);
  return key.hi == prefix.hi && ((key.lo ^ prefix.lo) >> (32 - kRadixBits * (d - 8))) == 0;
}

CQDINO_HOST_DEVICE CQDINO_INLINE Key96 key_with_digit(Key96 prefix, int d, uint32_t v) {
  if (d < 8) {
    prefix.hi = key_with_digit(prefix.hi, d, v);
  } else {
    const int shift = 24 - kRadixBits * (d - 8);
    prefix.lo = (prefix.lo & ~(static_cast<uint32_t>(kRadixSize - 1) << shift)) | (v << shift);
  }
  return prefix;
}

CQDINO_HOST_DEVICE CQDINO_INLINE bool key_greater(const Key96& a, const Key96& b) {
  return a.hi > b.hi || (a.hi == b.hi && a.lo > b.lo);
}
CQDINO_HOST_DEVICE CQDINO_INLINE bool key_equal(const Key96& a, const Key96& b) {
  return a.hi == b.hi && a.lo == b.lo;
}
CQDINO_HOST_DEVICE CQDINO_INLINE Key96 key_unforced(Key96 key) {
  key.hi &= 0x7FFFFFFFFFFFFFFFull;
  return key;
}
CQDINO_HOST_DEVICE CQDINO_INLINE int64_t key_index(const Key96& key) {
  return static_cast<int64_t>(kIndexBits - (key.lo & kIndexBits));
}
CQDINO_HOST_DEVICE CQDINO_INLINE void key_zero(Key96* key) {
  key->hi = 0ull;
  key->lo = 0u;
}

// ---------------------------------------------------------------- ordering and radix steps

// Output order of two selected keys: score descending, then index ascending (forced bit ignored).
template <typename key_t>
CQDINO_HOST_DEVICE CQDINO_INLINE bool output_before(const key_t& a, const key_t& b) {
  return key_greater(key_unforced(a), key_unforced(b));
}

// One radix-select step. Among the keys matching the current prefix, `above` have a larger
// digit than bucket b and `here` have digit b; the wanted key is the `rank`-th largest
// (1-based) of those matching keys. Bucket b holds it iff above < rank <= above + here; the
// rank inside the bucket is then rank - above.
CQDINO_HOST_DEVICE CQDINO_INLINE bool bucket_holds_rank(int64_t above, int64_t here, int64_t rank) {
  return above < rank && rank <= above + here;
}

}  // namespace topk
}  // namespace cqdino
