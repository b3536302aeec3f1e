// Framework-free helpers shared by the CPU loops and the CUDA kernels.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

namespace netmerge::kernels {

HOST_DEVICE inline float neg_inf() { return -__builtin_huge_valf(); }
HOST_DEVICE inline float pos_inf() { return __builtin_huge_valf(); }

// Every op treats a NaN score as -inf: it never outranks a finite value and never reaches an output.
HOST_DEVICE inline float nan_to_neg_inf(float v) { return v != v ? neg_inf() : v; }

HOST_DEVICE inline int32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(v);
#else
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

}  // namespace netmerge::kernels
