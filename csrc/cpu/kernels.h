// CPU kernels of ippo._C: argument blocks shared by the dispatch layer and the per-ISA kernel builds.
//
// Conventions (validated on the Python side, ippo/ops/cpp_ops.py, and re-checked in dispatch.cpp):
//  * matrices are row-major with inner stride 1 and an arbitrary row stride `ld*` (in elements);
//  * vectors (biases, weights, ids, outputs) are contiguous;
//  * T is float or double; float kernels accumulate in float, double kernels in double;
//  * every kernel is deterministic: the result does not depend on the number of threads.
#pragma once

#include <cstdint>

namespace ippo {
namespace cpu {

using i64 = std::int64_t;

template <typename T>
struct ExactArgs {
  const T* x; i64 ldx;        // [n, d_in]
  const T* dy; i64 lddy;      // [n, d_out]
  const T* g; i64 ldg;        // [d_out, d_in]
  const T* g_bias;            // [d_out] or nullptr
  i64 n, d_in, d_out;
  T* out;                     // [n]
  int threads;
};

template <typename T>
struct ProjArgs {
  const T* x; i64 ldx;        // [n, d_in]
  const T* dy; i64 lddy;      // [n, d_out]
  const T* p_in; i64 ldpi;    // [q, d_in]
  const T* p_in_bias;         // [q] or nullptr
  const T* p_out; i64 ldpo;   // [q, d_out]
  const T* weight;            // [q]
  i64 n, d_in, d_out, q;
  T* out;                     // [n]
  int threads;
};

template <typename T>
struct SketchArgs {
  const T* x; i64 ldx;        // [n, d_in]
  const T* dy; i64 lddy;      // [n, d_out]
  const T* p_in; i64 ldpi;    // [k_in, d_in]
  const T* p_in_bias;         // [k_in] or nullptr
  const T* p_out; i64 ldpo;   // [k_out, d_out]
  const std::int64_t* ids;    // [n], each in [-1, E)
  i64 n, d_in, d_out, k_in, k_out, num_episodes;
  T* out;                     // [E, k_out, k_in], contiguous; fully overwritten
  int threads;
};

// Entry points of one instruction-set build (csrc/cpu/kernels_isa.cpp compiled with IPPO_ISA_NS).
// Each returns 0 on success, 1 when a scratch allocation failed.
struct IsaKernels {
  const char* name;
  int (*exact_f32)(const ExactArgs<float>&);
  int (*exact_f64)(const ExactArgs<double>&);
  int (*proj_f32)(const ProjArgs<float>&);
  int (*proj_f64)(const ProjArgs<double>&);
  int (*sketch_f32)(const SketchArgs<float>&);
  int (*sketch_f64)(const SketchArgs<double>&);
};

namespace isa_base { const IsaKernels* kernels(); }
namespace isa_avx2 { const IsaKernels* kernels(); }
namespace isa_avx512 { const IsaKernels* kernels(); }

}  // namespace cpu
}  // namespace ippo
