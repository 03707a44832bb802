// The CUDA driver's and the runtime's versions, for lomo_kernels.backends to say why the cuda backend
// cannot run (a driver older than the runtime the kernels were built with, or none at all) before torch
// or a kernel launch fails less clearly.
#include <cuda_runtime.h>

#include "launch.h"

namespace lomo {
namespace cuda {

int driver_version() {
  int version = 0;
  // 0 when no driver is installed; an error (no usable driver) reads the same
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace cuda
}  // namespace lomo
