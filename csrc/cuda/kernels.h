// CUDA influence kernels of ippo._C: torch-free host launchers (declared here, bound in kernels_bind.cu)
// and, for the .cu files only, the shared device helpers (dtype loads, the 64x64 tiled fp32 GEMM).
//
// Conventions (csrc/cuda/cuda_ops.h): pointers as std::uintptr_t, sizes/strides as int64 (row strides
// in elements, the last dimension contiguous), the stream as an integer (a cudaStream_t from
// torch.cuda.current_stream(device).cuda_stream), `device` = the CUDA ordinal of the tensors (the
// launcher makes it current for the call and restores the previous one). ippo/ops/cuda_ops.py
// validates every argument and allocates every buffer (outputs and workspaces) with torch.
//
// Every launcher checks the CUDA return codes (cudaGetLastError after each launch) and throws
// std::runtime_error on a CUDA error, std::invalid_argument (-> Python ValueError) on a bad argument
// or, for the selection ops, on NaN/Inf scores (naming the first bad episode).
//
// Determinism: no float atomics anywhere. Every output element is written by one thread block that
// reduces in a fixed order; split-K style partials are combined by a second kernel in a fixed order.
// Results are bitwise identical run to run for the same inputs, device and `split`.
// Precision: fp16/bf16/fp32 inputs are converted to fp32 on load and every product is an fp32 FFMA
// on the CUDA cores (no tensor cores, hence no TF32). fp64 only in segment_sum / selection / scoring.
#pragma once

#include <cstdint>
#include <string>

namespace ippo {
namespace cuda {

// Element type of the large inputs (X/dY, values, scores, sketches).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// "float32" | "float16" | "bfloat16" | "float64" -> DType; std::invalid_argument otherwise.
DType parse_dtype(const std::string& name);

// Selection rules of ippo.ops.reference.select_episodes.
enum class Rule : int { threshold = 0, bottom_fraction = 1, negative_bottom_fraction = 2 };

// "threshold" | "bottom_fraction" | "negative_bottom_fraction" -> Rule; std::invalid_argument otherwise.
Rule parse_rule(const std::string& name);

// Token tiles and feature tiles of the GEMM kernels (exposed for the Python side's split choice).
constexpr int kTileRows = 64;  // tokens per tile
constexpr int kTileCols = 64;  // d_out / q / k columns per tile

// out[t] = sum_o dy[t,o] * (sum_i g[o,i] x[t,i] + g_bias[o]), t < n.
//   x, dy: dt in {f32, f16, bf16}, row strides ldx, lddy. g: fp32 [d_out, d_in] row stride ldg.
//   g_bias: fp32 [d_out] or 0. out: fp32 [n].
//   split >= 1: d_out tiles are dealt to `split` blocks per token tile; with split > 1, `workspace` is
//   fp32 [split, n] (partials, summed in split order by a second kernel); with split == 1 it is unused.
void exact_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                        std::uintptr_t g, std::int64_t ldg, std::uintptr_t g_bias, std::int64_t n,
                        std::int64_t d_in, std::int64_t d_out, std::int64_t split, std::uintptr_t workspace,
                        std::uintptr_t out, std::uintptr_t stream, int device);

// out[t] = sum_j w[j] (p_out[j] . dy[t]) (p_in[j] . x[t] + p_in_bias[j]), t < n.
//   x, dy: dt in {f32, f16, bf16}. p_in fp32 [q, d_in] (row stride ldpi), p_in_bias fp32 [q] or 0,
//   p_out fp32 [q, d_out] (ldpo), weight fp32 [q]. out fp32 [n]. split/workspace as above (over q tiles).
void projected_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                            std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias, std::uintptr_t p_out,
                            std::int64_t ldpo, std::uintptr_t weight, std::int64_t n, std::int64_t d_in,
                            std::int64_t d_out, std::int64_t q, std::int64_t split, std::uintptr_t workspace,
                            std::uintptr_t out, std::uintptr_t stream, int device);

// out[e] = sum_{t in e} (p_out dy[t]) (p_in x[t] + p_in_bias)^T, fp32 [num_episodes, k_out, k_in].
//   Tokens are grouped on the Python side: order int64 [m] (token indices, episode-major, increasing
//   token order within an episode), offsets int64 [num_episodes + 1] (segment e is
//   order[offsets[e]:offsets[e+1]]). split >= 1 chunks per episode; with split > 1, `workspace` is fp32
//   [num_episodes * split, k_out, k_in], summed over the chunks in order by a second kernel.
void segment_sketch(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                    std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias, std::uintptr_t p_out,
                    std::int64_t ldpo, std::uintptr_t order, std::uintptr_t offsets, std::int64_t d_in,
                    std::int64_t d_out, std::int64_t k_in, std::int64_t k_out, std::int64_t num_episodes,
                    std::int64_t split, std::uintptr_t workspace, std::uintptr_t out, std::uintptr_t stream,
                    int device);

// out[e] = sum_{t in segment e} values[order[t]], summed in a fixed order. values: dt (any, contiguous);
// out: fp32 [num_episodes] (fp64 for f64 values).
void segment_sum(DType dt, std::uintptr_t values, std::uintptr_t order, std::uintptr_t offsets,
                 std::int64_t num_episodes, std::uintptr_t out, std::uintptr_t stream, int device);

// The I-PPO filter on scores (dt f32 or f64, contiguous [num_episodes]): keep uint8/bool [E], weights
// (dt) [E]. `value` is the threshold (already rounded to the scores' dtype) or the fraction; n_drop =
// drop_count(value, E) for the fraction rules. `flag` is an int64 [1] device scratch. Synchronises the
// stream once; throws std::invalid_argument when a score is NaN/Inf.
void select_episodes(DType dt, std::uintptr_t scores, std::int64_t num_episodes, Rule rule, double value,
                     std::int64_t n_drop, std::uintptr_t keep, std::uintptr_t weights, std::uintptr_t flag,
                     std::uintptr_t stream, int device);

// scores[e] = sum_d sketches[e, d] * target[d] (sketches: dt any, row stride ld; target: fp32, or fp64
// when dt is f64; scores: same type as target), then select_episodes on them (same contract).
void score_and_select(DType dt, std::uintptr_t sketches, std::int64_t ld, std::uintptr_t target,
                      std::int64_t num_episodes, std::int64_t dim, Rule rule, double value, std::int64_t n_drop,
                      std::uintptr_t scores, std::uintptr_t keep, std::uintptr_t weights, std::uintptr_t flag,
                      std::uintptr_t stream, int device);

}  // namespace cuda
}  // namespace ippo

// ---------------------------------------------------------------------------------------------------------
// Device helpers shared by the kernel files (nvcc only).
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>

namespace ippo {
namespace cuda {
namespace detail {

// ---- errors and device scope (host) ------------------------------------------------------------------
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string("ippo CUDA error in ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// After every <<<...>>>: launch-configuration errors surface here (asynchronous faults show up at the
// next synchronising call, e.g. the selection's flag copy or torch's next sync).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline void require(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(std::string("ippo CUDA launcher: ") + msg);
}

// Makes `device` current for the scope of a launcher and restores the previous device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) (void)cudaSetDevice(prev_);
    (void)cudaGetLastError();
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <typename T>
inline const T* cptr(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
inline T* mptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline unsigned int cdiv_u32(std::int64_t a, std::int64_t b, const char* what) {
  const std::int64_t q = (a + b - 1) / b;
  if (q > 0x7fffffffLL) throw std::invalid_argument(std::string("ippo CUDA launcher: grid too large for ") + what);
  return static_cast<unsigned int>(q);
}

// ---- dtype dispatch (host): f(Tag<T>{}) with T the element type of the large inputs -----------------------
template <typename T>
struct Tag {
  using type = T;
};

// f32 / f16 / bf16 only (the GEMM kernels; fp64 is served by the torch reference on the Python side).
template <typename F>
inline void dispatch_gemm_types(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(Tag<float>{}); break;
    case DType::f16: f(Tag<__half>{}); break;
    case DType::bf16: f(Tag<__nv_bfloat16>{}); break;
    default:
      throw std::invalid_argument(std::string("ippo CUDA ") + op +
                                  ": inputs must be float32/float16/bfloat16 (fp64 goes to the torch reference)");
  }
}

// f32 / f16 / bf16 / f64 (reductions: segment_sum, the episode scores).
template <typename F>
inline void dispatch_all_types(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(Tag<float>{}); break;
    case DType::f16: f(Tag<__half>{}); break;
    case DType::bf16: f(Tag<__nv_bfloat16>{}); break;
    case DType::f64: f(Tag<double>{}); break;
    default: throw std::invalid_argument(std::string("ippo CUDA ") + op + ": unsupported dtype");
  }
}

// ---- loads: everything is computed in fp32 (fp64 for fp64 data) -------------------------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Accumulation type of an element type (as ippo.ops.reference.acc_dtype): fp64 for fp64, else fp32.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---- the 64x64 tile GEMM: acc[i][j] += sum_k A[row(ty+16i), k] * B[b0 + tx+16j, k] --------------------------
// 256 threads; thread (tx = tid % 16, ty = tid / 16) owns output rows ty+16i and columns tx+16j (i,j < 4).
// A (activations, type T) is [*, K] with row stride lda; `arow[r]` is the global row of tile row ty+16r
// for this thread, or -1 for a padding row (read as zeros). B is fp32 [nb, K] with row stride ldb, rows
// b0.. (rows >= nb read as zeros). Both are K-contiguous ("NT" GEMM: out = A * B^T).
// Each K step stages a 64x16 slice of A and of B in shared memory (transposed, padded by one column);
// the products are fp32 FFMAs in increasing k, so the result is deterministic.
constexpr int kThreads = 256;
constexpr int kTileK = 16;

struct GemmSmem {
  float a[kTileK][64 + 1];
  float b[kTileK][64 + 1];
};

template <typename T>
__device__ __forceinline__ void tile_gemm_nt(const T* __restrict__ A, std::int64_t lda, const std::int64_t arow[4],
                                             const float* __restrict__ B, std::int64_t ldb, std::int64_t b0,
                                             std::int64_t nb, std::int64_t K, GemmSmem& sm, float acc[4][4]) {
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  // The same (row, k) slots are loaded by this thread at every K step: rows ty + 16r, column tx.
  for (std::int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const std::int64_t k = k0 + tx;
    const bool kin = k < K;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int lr = ty + 16 * r;
      float av = 0.0f;
      if (kin && arow[r] >= 0) av = to_acc(A[arow[r] * lda + k]);
      sm.a[tx][lr] = av;
      const std::int64_t brow = b0 + lr;
      float bv = 0.0f;
      if (kin && brow < nb) bv = B[brow * ldb + k];
      sm.b[tx][lr] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sm.a[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sm.b[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();  // the next step (or the next GEMM) overwrites the staging buffers
  }
}

// Sum of v over the 16 lanes sharing ty (a half warp): a fixed butterfly, deterministic. Every lane of
// the warp must call it (full mask); the result is read from lane tx == 0.
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, 16);
  return v;
}

// out[r * len + i] = sum_{c < split} parts[(r * split + c) * len + i] for r < rows, i < len, summed in
// increasing c (the deterministic combination of split partials). Defined in exact_score.cu.
void sum_partials(const float* parts, std::int64_t rows, std::int64_t split, std::int64_t len, float* out,
                  cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace ippo
#endif  // __CUDACC__
