// CUDA runtime probe (csrc/cuda/runtime.cu). Plain C++ interface: callable from any translation unit.
#pragma once

#include <string>
#include <utility>

namespace ippo {
namespace cuda {

// (number of usable devices, message). Never throws: without a driver or a GPU it returns
// (0, "cudaGetDeviceCount failed: <cudaGetErrorString>") or (0, "no CUDA device").
std::pair<int, std::string> device_count();

// "runtime X.Y, driver X.Y" (the driver part reads "none" when no driver is installed).
std::string versions();

}  // namespace cuda
}  // namespace ippo
