#include <pybind11/pybind11.h>
#include "cuda_runtime.h"
void register_cuda_kernels(pybind11::module_& m);
PYBIND11_MODULE(ippo_emu, m) {
  register_cuda_kernels(m);
  m.def("set_order", [](int mode) { emu::order_mode = mode; });
  m.def("stats", [] { return std::make_pair(emu::launches, emu::barriers); });
  m.def("cuda_compiled", [] { return true; });
}
