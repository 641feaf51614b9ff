// ippo._C: a narrow pybind11 layer. Tensors never cross this boundary: ippo/ops/cpp_ops.py validates
// them, allocates the outputs with torch and passes data pointers (ints), sizes and row strides.
// C++ std::invalid_argument surfaces as ValueError, std::bad_alloc as MemoryError. The GIL is released
// while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cpu/dispatch.h"
#ifdef IPPO_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using ippo::cpu::parse_dtype;
using std::int64_t;
using std::uintptr_t;

#ifndef IPPO_BUILD_TYPE
#define IPPO_BUILD_TYPE "unknown"
#endif
#ifndef IPPO_CXX_COMPILER
#define IPPO_CXX_COMPILER "unknown compiler"
#endif

namespace {

std::string build_info() {
  std::string s = "ippo._C " IPPO_BUILD_TYPE ", " IPPO_CXX_COMPILER ", C++" + std::to_string(__cplusplus / 100 % 100);
  s += ippo::cpu::openmp_enabled() ? ", OpenMP (" + std::to_string(ippo::cpu::max_threads()) + " threads)"
                                   : std::string(", no OpenMP");
  s += ", CPU ISA " + ippo::cpu::current_isa() + " (available:";
  for (const auto& isa : ippo::cpu::available_isas()) s += " " + isa;
  s += ")";
#ifdef IPPO_WITH_CUDA
  s += ", CUDA " IPPO_CUDA_VERSION " (archs " IPPO_CUDA_ARCHS_STR ")";
#else
  s += ", no CUDA";
#endif
  return s;
}

constexpr bool kCudaCompiled =
#ifdef IPPO_WITH_CUDA
    true;
#else
    false;
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ippo compiled kernels (CPU, and CUDA when built with nvcc). Use through ippo.ops.get('cpp').";

  m.def("build_info", &build_info, "One line describing how this module was built.");
  m.def("cuda_compiled", [] { return kCudaCompiled; }, "Whether CUDA sources were compiled into the module.");
#ifdef IPPO_WITH_CUDA
  register_cuda_ops(m);
#else
  m.def(
      "cuda_device_count",
      [] { return std::make_pair(0, std::string("ippo._C was built without CUDA (nvcc not found or IPPO_CUDA=0)")); },
      "(number of usable CUDA devices, message); always (0, reason) in a CPU-only build.");
#endif

  // ---- CPU ISA control (tests run every variant) -----------------------------------------------------
  m.def("cpu_isa", &ippo::cpu::current_isa, "Instruction-set build the CPU kernels use now.");
  m.def("available_cpu_isas", &ippo::cpu::available_isas, "ISA builds compiled in and supported here.");
  m.def("set_cpu_isa", &ippo::cpu::set_isa, py::arg("name"),
        "Force 'base' | 'avx2' | 'avx512', or 'auto' (env IPPO_CPU_ISA sets the initial choice).");
  m.def("openmp_max_threads", &ippo::cpu::max_threads);

  // ---- CPU ops (raw pointers; see ippo/ops/cpp_ops.py) ------------------------------------------------
  m.def(
      "exact_token_scores",
      [](const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t dy, int64_t lddy, uintptr_t g, int64_t ldg,
         uintptr_t g_bias, int64_t n, int64_t d_in, int64_t d_out, uintptr_t out, int threads) {
        const auto dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        ippo::cpu::exact_token_scores(dt, x, ldx, dy, lddy, g, ldg, g_bias, n, d_in, d_out, out, threads);
      },
      py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("lddy"), py::arg("g"), py::arg("ldg"),
      py::arg("g_bias"), py::arg("n"), py::arg("d_in"), py::arg("d_out"), py::arg("out"), py::arg("threads"));
  m.def(
      "projected_token_scores",
      [](const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t dy, int64_t lddy, uintptr_t p_in,
         int64_t ldpi, uintptr_t p_in_bias, uintptr_t p_out, int64_t ldpo, uintptr_t weight, int64_t n,
         int64_t d_in, int64_t d_out, int64_t q, uintptr_t out, int threads) {
        const auto dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        ippo::cpu::projected_token_scores(dt, x, ldx, dy, lddy, p_in, ldpi, p_in_bias, p_out, ldpo, weight, n, d_in,
                                          d_out, q, out, threads);
      },
      py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("lddy"), py::arg("p_in"),
      py::arg("ldpi"), py::arg("p_in_bias"), py::arg("p_out"), py::arg("ldpo"), py::arg("weight"), py::arg("n"),
      py::arg("d_in"), py::arg("d_out"), py::arg("q"), py::arg("out"), py::arg("threads"));
  m.def(
      "segment_sketch",
      [](const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t dy, int64_t lddy, uintptr_t p_in,
         int64_t ldpi, uintptr_t p_in_bias, uintptr_t p_out, int64_t ldpo, uintptr_t ids, int64_t n, int64_t d_in,
         int64_t d_out, int64_t k_in, int64_t k_out, int64_t num_episodes, uintptr_t out, int threads) {
        const auto dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        ippo::cpu::segment_sketch(dt, x, ldx, dy, lddy, p_in, ldpi, p_in_bias, p_out, ldpo, ids, n, d_in, d_out, k_in,
                                  k_out, num_episodes, out, threads);
      },
      py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("lddy"), py::arg("p_in"),
      py::arg("ldpi"), py::arg("p_in_bias"), py::arg("p_out"), py::arg("ldpo"), py::arg("ids"), py::arg("n"),
      py::arg("d_in"), py::arg("d_out"), py::arg("k_in"), py::arg("k_out"), py::arg("num_episodes"), py::arg("out"),
      py::arg("threads"));
  m.def(
      "segment_sum",
      [](const std::string& dtype, uintptr_t values, uintptr_t ids, int64_t n, int64_t num_episodes, uintptr_t out) {
        const auto dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        ippo::cpu::segment_sum(dt, values, ids, n, num_episodes, out);
      },
      py::arg("dtype"), py::arg("values"), py::arg("ids"), py::arg("n"), py::arg("num_episodes"), py::arg("out"));
  m.def("drop_count", &ippo::cpu::drop_count, py::arg("fraction"), py::arg("n"),
        "min(n, floor(fraction * n + 1e-9)), as ippo.ops.reference.drop_count.");
  m.def(
      "select_episodes",
      [](const std::string& dtype, uintptr_t scores, int64_t num_episodes, const std::string& rule, double value,
         uintptr_t keep, uintptr_t weights) {
        const auto dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        ippo::cpu::select_episodes(dt, scores, num_episodes, rule, value, keep, weights);
      },
      py::arg("dtype"), py::arg("scores"), py::arg("num_episodes"), py::arg("rule"), py::arg("value"),
      py::arg("keep"), py::arg("weights"));
}
