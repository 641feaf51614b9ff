// pybind11 registration of the CUDA side of ippo._C (see cuda_ops.h). For now: the runtime probe.
#include "cuda/cuda_ops.h"

#include <pybind11/stl.h>

#include "cuda/runtime.h"

namespace py = pybind11;

// The CUDA influence kernels (csrc/cuda/kernels_bind.cu).
void register_cuda_kernels(py::module_& m);

void register_cuda_ops(py::module_& m) {
  m.def(
      "cuda_device_count", [] { return ippo::cuda::device_count(); },
      "(number of usable CUDA devices, message); (0, reason) when there is no driver or GPU.");
  m.def("cuda_versions", &ippo::cuda::versions, "CUDA runtime and driver versions, in words.");
  register_cuda_kernels(m);
}
