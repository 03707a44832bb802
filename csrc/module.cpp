// The Python module lomo_kernels._C. Importing it registers the compiled ops (torch.ops.lomo_kernels_C.*,
// see ops_schema.cpp); the module itself only reports how it was built. No torch header here: torch
// bundles its own pybind11, and this file uses the pybind11 the build requires.
#include <pybind11/pybind11.h>

#ifdef LOMO_WITH_CUDA
#include "cuda/launch.h"
#endif

#ifndef LOMO_CUDA_ARCHS
#define LOMO_CUDA_ARCHS ""
#endif
#ifndef LOMO_NO_CUDA_REASON
#define LOMO_NO_CUDA_REASON ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "lomo_kernels compiled kernels (ops registered as torch.ops.lomo_kernels_C)";
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef LOMO_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = LOMO_CUDA_ARCHS;
    info["no_cuda_reason"] = LOMO_NO_CUDA_REASON;
#ifdef LOMO_WITH_OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
#ifdef LOMO_WITH_CUDA
  // (driver, runtime) CUDA versions as 1000*major + 10*minor: lomo_kernels.kernels.native checks them
  m.def("cuda_versions", [] { return pybind11::make_tuple(lomo::cuda::driver_version(), lomo::cuda::runtime_version()); });
#endif
}
