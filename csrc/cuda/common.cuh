// Helpers shared by the .cu files: error checks, the device scope, grid sizing, the block reduction
// that adds a block's norm terms to the 2-float stats buffer.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "launch.h"

namespace lomo {
namespace cuda {

constexpr int kReduceThreads = 256;  // block size of the elementwise and reduction kernels

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lomo_kernels CUDA: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the launches in its scope and restores the previous device after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t stream_of(const Launch& launch) { return reinterpret_cast<cudaStream_t>(launch.stream); }

// Blocks for a grid-stride loop over `count` items: enough to fill any current GPU, no more.
inline unsigned grid_for(int64_t count, int threads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks));
}

// Adds the block-wide sums of `square` and `nonfinite` to stats[0] and stats[1]: one atomicAdd pair
// per block, no host synchronisation. Every thread of the block must call it.
__device__ inline void block_add_to_stats(float square, float nonfinite, float* stats) {
  __shared__ float partial[2][32];
  const unsigned lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  for (int offset = 16; offset > 0; offset /= 2) {
    square += __shfl_down_sync(0xffffffffu, square, offset);
    nonfinite += __shfl_down_sync(0xffffffffu, nonfinite, offset);
  }
  if (lane == 0) {
    partial[0][warp] = square;
    partial[1][warp] = nonfinite;
  }
  __syncthreads();
  if (warp == 0) {
    const unsigned warps = (blockDim.x + 31u) / 32u;
    square = lane < warps ? partial[0][lane] : 0.0f;
    nonfinite = lane < warps ? partial[1][lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
      square += __shfl_down_sync(0xffffffffu, square, offset);
      nonfinite += __shfl_down_sync(0xffffffffu, nonfinite, offset);
    }
    if (lane == 0) {
      atomicAdd(stats, square);
      atomicAdd(stats + 1, nonfinite);
    }
  }
}

// A thread's count of guarded elements into the counter: an atomic only from a thread that kept one.
__device__ __forceinline__ void add_count(unsigned bad, unsigned long long* nonfinite) {
  if (bad != 0 && nonfinite != nullptr) atomicAdd(nonfinite, static_cast<unsigned long long>(bad));
}

// update_element with the count of guarded elements: an atomic only for an element that was kept.
template <class T>
__device__ __forceinline__ void update_counted(T* w, float g, uint64_t flat, const Rule& rule,
                                               unsigned long long* nonfinite) {
  if (update_element(w, g, flat, rule) && nonfinite != nullptr) atomicAdd(nonfinite, 1ull);
}

// Column c of group k's gradient: its dy rows summed in token order (as the CPU kernel sums them).
template <class D>
__device__ __forceinline__ float group_column_sum(const D* __restrict__ dy, int64_t dim, const RowGroups& groups,
                                                  int64_t k, int64_t c) {
  float g = 0.0f;
  for (int64_t t = groups.starts[k]; t < groups.starts[k + 1]; ++t) g += to_float(dy[groups.order[t] * dim + c]);
  return g;
}

// Calls fn(w_elem, s_elem) for the weight's element type and the moments' (float or bf16).
template <class Fn>
inline void visit_adam(DType w_dtype, DType s_dtype, Fn&& fn) {
  if (s_dtype == DType::f16) throw std::invalid_argument("lomo_kernels CUDA AdamW: moments must be float32 or bfloat16");
  visit_dtype(w_dtype, [&](auto w_elem) {
    if (s_dtype == DType::f32) {
      fn(w_elem, float{});
    } else {
      fn(w_elem, bf16{});
    }
  });
}

}  // namespace cuda
}  // namespace lomo
