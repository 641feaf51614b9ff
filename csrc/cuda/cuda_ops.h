// Registration of everything CUDA in ippo._C. csrc/bindings.cpp calls register_cuda_ops(m) when the
// module is built with CUDA (IPPO_WITH_CUDA); without CUDA it defines a stub cuda_device_count itself.
//
// To add CUDA kernels: put them in csrc/cuda/<name>.cu (every csrc/cuda/*.cu and *.cpp is compiled
// into the module, and scripts/check_cuda_compile.sh compiles each .cu for sm_80 and sm_90), declare
// their host launchers in a header here, and bind them in register_cuda_ops (csrc/cuda/cuda_ops.cu).
// Keep the launchers torch-free: pointers as std::uintptr_t, sizes/strides as int64, the stream as
// an integer (cudaStream_t), inputs validated on the Python side.
#pragma once

#include <pybind11/pybind11.h>

// Defines in m: cuda_device_count() -> (int, str), cuda_versions() -> str, and the CUDA ops.
void register_cuda_ops(pybind11::module_& m);
