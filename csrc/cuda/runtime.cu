// CUDA runtime probe. The module links cudart statically, so importing it needs no CUDA install;
// these functions then report why no device is usable instead of failing.
#include "cuda/runtime.h"

#include <cuda_runtime.h>

namespace ippo {
namespace cuda {

std::pair<int, std::string> device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error state for later calls
    return {0, std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err)};
  }
  if (n <= 0) return {0, "no CUDA device"};
  cudaDeviceProp prop;
  std::string msg = std::to_string(n) + " device(s)";
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    msg += ": " + std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
  else
    (void)cudaGetLastError();
  return {n, msg};
}

std::string versions() {
  int rt = 0, drv = 0;
  std::string out = "runtime ";
  out += cudaRuntimeGetVersion(&rt) == cudaSuccess ? std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10)
                                                   : std::string("?");
  out += ", driver ";
  out += (cudaDriverGetVersion(&drv) == cudaSuccess && drv > 0)
             ? std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10)
             : std::string("none");
  (void)cudaGetLastError();
  return out;
}

}  // namespace cuda
}  // namespace ippo
