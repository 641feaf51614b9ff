// pybind11 bindings of the CUDA influence kernels (csrc/cuda/kernels.h), called from register_cuda_ops.
// Names carry a `cuda_` prefix (the CPU kernels of the same module own the plain names). Only
// ippo/ops/cuda_ops.py calls them: it validates the tensors and passes data pointers, sizes, row strides,
// the current stream of the tensors' device (an int) and the device ordinal. The GIL is released while a
// launcher runs; std::invalid_argument surfaces as ValueError, std::runtime_error (CUDA errors) as
// RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace py = pybind11;
using std::int64_t;
using std::uintptr_t;

namespace ippo {
namespace cuda {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float16") return DType::f16;
  if (name == "bfloat16") return DType::bf16;
  if (name == "float64") return DType::f64;
  throw std::invalid_argument("unknown dtype '" + name + "': expected float32 | float16 | bfloat16 | float64");
}

Rule parse_rule(const std::string& name) {
  if (name == "threshold") return Rule::threshold;
  if (name == "bottom_fraction") return Rule::bottom_fraction;
  if (name == "negative_bottom_fraction") return Rule::negative_bottom_fraction;
  throw std::invalid_argument("unknown rule '" + name +
                              "': expected threshold | bottom_fraction | negative_bottom_fraction");
}

}  // namespace cuda
}  // namespace ippo

// Names bound below (the test suite checks that a CUDA build exposes all of them).
static const std::vector<std::string> kKernelNames = {
    "cuda_exact_token_scores", "cuda_projected_token_scores", "cuda_segment_sketch",
    "cuda_segment_sum",        "cuda_select_episodes",        "cuda_score_and_select",
};

void register_cuda_kernels(py::module_& m) {
  namespace C = ippo::cuda;
  m.def("cuda_kernel_names", [] { return kKernelNames; }, "Names of the CUDA influence launchers in this module.");
  m.def("cuda_tile_sizes", [] { return std::make_pair(C::kTileRows, C::kTileCols); },
        "(tokens, columns) per tile of the CUDA GEMM kernels.");

  m.def(
      "cuda_exact_token_scores",
      [](const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t dy, int64_t lddy, uintptr_t g, int64_t ldg,
         uintptr_t g_bias, int64_t n, int64_t d_in, int64_t d_out, int64_t split, uintptr_t workspace,
         uintptr_t out, uintptr_t stream, int device) {
        const auto dt = C::parse_dtype(dtype);
        py::gil_scoped_release release;
        C::exact_token_scores(dt, x, ldx, dy, lddy, g, ldg, g_bias, n, d_in, d_out, split, workspace, out, stream,
                              device);
      },
      py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("lddy"), py::arg("g"), py::arg("ldg"),
      py::arg("g_bias"), py::arg("n"), py::arg("d_in"), py::arg("d_out"), py::arg("split"), py::arg("workspace"),
      py::arg("out"), py::arg("stream"), py::arg("device"));

  m.def(
      "cuda_projected_token_scores",
      [](const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t dy, int64_t lddy, uintptr_t p_in,
         int64_t ldpi, uintptr_t p_in_bias, uintptr_t p_out, int64_t ldpo, uintptr_t weight, int64_t n,
         int64_t d_in, int64_t d_out, int64_t q, int64_t split, uintptr_t workspace, uintptr_t out,
         uintptr_t stream, int device) {
        const auto dt = C::parse_dtype(dtype);
        py::gil_scoped_release release;
        C::projected_token_scores(dt, x, ldx, dy, lddy, p_in, ldpi, p_in_bias, p_out, ldpo, weight, n, d_in, d_out,
                                  q, split, workspace, out, stream, device);
      },
      py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("lddy"), py::arg("p_in"),
      py::arg("ldpi"), py::arg("p_in_bias"), py::arg("p_out"), py::arg("ldpo"), py::arg("weight"), py::arg("n"),
      py::arg("d_in"), py::arg("d_out"), py::arg("q"), py::arg("split"), py::arg("workspace"), py::arg("out"),
      py::arg("stream"), py::arg("device"));

  m.def(
      "cuda_segment_sketch",
      [](const std::string& dtype, uintptr_t x, int64_t ldx, uintptr_t dy, int64_t lddy, uintptr_t p_in,
         int64_t ldpi, uintptr_t p_in_bias, uintptr_t p_out, int64_t ldpo, uintptr_t order, uintptr_t offsets,
         int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, int64_t num_episodes, int64_t split,
         uintptr_t workspace, uintptr_t out, uintptr_t stream, int device) {
        const auto dt = C::parse_dtype(dtype);
        py::gil_scoped_release release;
        C::segment_sketch(dt, x, ldx, dy, lddy, p_in, ldpi, p_in_bias, p_out, ldpo, order, offsets, d_in, d_out,
                          k_in, k_out, num_episodes, split, workspace, out, stream, device);
      },
      py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("lddy"), py::arg("p_in"),
      py::arg("ldpi"), py::arg("p_in_bias"), py::arg("p_out"), py::arg("ldpo"), py::arg("order"), py::arg("offsets"),
      py::arg("d_in"), py::arg("d_out"), py::arg("k_in"), py::arg("k_out"), py::arg("num_episodes"),
      py::arg("split"), py::arg("workspace"), py::arg("out"), py::arg("stream"), py::arg("device"));

  m.def(
      "cuda_segment_sum",
      [](const std::string& dtype, uintptr_t values, uintptr_t order, uintptr_t offsets, int64_t num_episodes,
         uintptr_t out, uintptr_t stream, int device) {
        const auto dt = C::parse_dtype(dtype);
        py::gil_scoped_release release;
        C::segment_sum(dt, values, order, offsets, num_episodes, out, stream, device);
      },
      py::arg("dtype"), py::arg("values"), py::arg("order"), py::arg("offsets"), py::arg("num_episodes"),
      py::arg("out"), py::arg("stream"), py::arg("device"));

  m.def(
      "cuda_select_episodes",
      [](const std::string& dtype, uintptr_t scores, int64_t num_episodes, const std::string& rule, double value,
         int64_t n_drop, uintptr_t keep, uintptr_t weights, uintptr_t flag, uintptr_t stream, int device) {
        const auto dt = C::parse_dtype(dtype);
        const auto r = C::parse_rule(rule);
        py::gil_scoped_release release;
        C::select_episodes(dt, scores, num_episodes, r, value, n_drop, keep, weights, flag, stream, device);
      },
      py::arg("dtype"), py::arg("scores"), py::arg("num_episodes"), py::arg("rule"), py::arg("value"),
      py::arg("n_drop"), py::arg("keep"), py::arg("weights"), py::arg("flag"), py::arg("stream"), py::arg("device"));

  m.def(
      "cuda_score_and_select",
      [](const std::string& dtype, uintptr_t sketches, int64_t ld, uintptr_t target, int64_t num_episodes,
         int64_t dim, const std::string& rule, double value, int64_t n_drop, uintptr_t scores, uintptr_t keep,
         uintptr_t weights, uintptr_t flag, uintptr_t stream, int device) {
        const auto dt = C::parse_dtype(dtype);
        const auto r = C::parse_rule(rule);
        py::gil_scoped_release release;
        C::score_and_select(dt, sketches, ld, target, num_episodes, dim, r, value, n_drop, scores, keep, weights,
                            flag, stream, device);
      },
      py::arg("dtype"), py::arg("sketches"), py::arg("ld"), py::arg("target"), py::arg("num_episodes"),
      py::arg("dim"), py::arg("rule"), py::arg("value"), py::arg("n_drop"), py::arg("scores"), py::arg("keep"),
      py::arg("weights"), py::arg("flag"), py::arg("stream"), py::arg("device"));
}
