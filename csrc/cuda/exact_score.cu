// Exact per-token target score as one tiled GEMM with a fused epilogue (ippo.ops.reference.exact_token_scores):
//
//     s_t = sum_o dY[t, o] * ( sum_i G[o, i] X[t, i] + g_bias[o] )        t in [0, N)
//
// Inputs: X [N, d_in] and dY [N, d_out] in fp32/fp16/bf16 (converted to fp32 on load), G fp32 [d_out, d_in],
// g_bias fp32 [d_out] or none. Output fp32 [N]. X G^T is never materialised.
//
// Kernel: a 256-thread block owns 64 tokens and walks the d_out tiles by, by + split, by + 2 split, ...
// (by = blockIdx.y). Per d_out tile it computes the 64x64 fp32 tile of X G^T with the shared-memory tile
// GEMM of kernels.h (16-wide K steps, 4x4 outputs per thread, FFMA in increasing k: no tensor cores, no
// TF32), then the epilogue adds the bias, multiplies by the dY tile and reduces the 64 columns per token
// (4 columns per thread, then a fixed half-warp butterfly) into a per-token register sum, tile after tile
// in increasing order. split == 1 writes s directly; split > 1 (few token tiles: occupancy) writes
// partials [split, N] that sum_partials adds in increasing split index. No atomics: bitwise deterministic
// for a given split (ippo/ops/cuda_ops.py derives split from N, d_out and the SM count only).
//
// Cost (s = input element size):
//   * FLOPs: 2 N d_in d_out (GEMM) + 3 N d_out (epilogue); all fp32 FFMA on CUDA cores, so the roof is the
//     fp32 CUDA-core rate (~60 TFLOP/s H100 SXM), not the tensor-core one.
//   * Bytes, floor: N (d_in + d_out) s + 4 d_out d_in + 4 N (X, dY, G read once, s written once).
//     This kernel reads dY once, X once per d_out tile (ceil(d_out/64) times: L2 hits while the d_out
//     tiles of a token tile run close together, but HBM traffic for large N d_in), G once per token tile
//     (ceil(N/64) times, L2-resident up to ~40 MB of G). It is a plain 64x64 SIMT GEMM, expected well
//     below a tensor-core GEMM: a correctness-first baseline.
// Measured on GPU: not yet (no GPU lent to this issue).
#include "cuda/kernels.h"

namespace ippo {
namespace cuda {
namespace detail {
namespace {

__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ parts, std::int64_t rows, std::int64_t split, std::int64_t len,
                        float* __restrict__ out) {
  const std::int64_t total = rows * len;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const std::int64_t r = idx / len;
    const std::int64_t i = idx - r * len;
    const float* p = parts + r * split * len + i;
    float s = 0.0f;
    for (std::int64_t c = 0; c < split; ++c) s += p[c * len];
    out[idx] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    exact_score_kernel(const T* __restrict__ x, std::int64_t ldx, const T* __restrict__ dy, std::int64_t lddy,
                       const float* __restrict__ g, std::int64_t ldg, const float* __restrict__ gb, std::int64_t n,
                       std::int64_t d_in, std::int64_t d_out, std::int64_t split, float* __restrict__ dst) {
  __shared__ GemmSmem sm;
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const std::int64_t t0 = static_cast<std::int64_t>(blockIdx.x) * kTileRows;
  std::int64_t rows[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const std::int64_t t = t0 + ty + 16 * r;
    rows[r] = t < n ? t : -1;
  }
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const std::int64_t n_tiles = (d_out + kTileCols - 1) / kTileCols;
  for (std::int64_t tile = blockIdx.y; tile < n_tiles; tile += split) {  // uniform across the block
    const std::int64_t o0 = tile * kTileCols;
    float acc[4][4] = {};
    tile_gemm_nt(x, ldx, rows, g, ldg, o0, d_out, d_in, sm, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.0f;
      if (rows[i] >= 0) {
        const T* dyr = dy + rows[i] * lddy;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const std::int64_t o = o0 + tx + 16 * j;
          if (o < d_out) {
            float z = acc[i][j];
            if (gb != nullptr) z += gb[o];
            v = fmaf(to_acc(dyr[o]), z, v);
          }
        }
      }
      v = half_warp_sum(v);  // every lane calls it (no divergence around the shuffle)
      part[i] += v;
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (rows[i] >= 0) dst[static_cast<std::int64_t>(blockIdx.y) * n + rows[i]] = part[i];
  }
}

}  // namespace

void sum_partials(const float* parts, std::int64_t rows, std::int64_t split, std::int64_t len, float* out,
                  cudaStream_t stream) {
  const std::int64_t total = rows * len;
  if (total == 0) return;
  require(parts != nullptr && out != nullptr, "sum_partials: null pointer");
  require(split >= 1, "sum_partials: split must be >= 1");
  std::int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > (1LL << 20)) blocks = 1LL << 20;  // grid-stride beyond that
  sum_partials_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(parts, rows, split, len, out);
  check_launch("sum_partials_kernel");
}

}  // namespace detail

void exact_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                        std::uintptr_t g, std::int64_t ldg, std::uintptr_t g_bias, std::int64_t n,
                        std::int64_t d_in, std::int64_t d_out, std::int64_t split, std::uintptr_t workspace,
                        std::uintptr_t out, std::uintptr_t stream, int device) {
  using namespace detail;
  require(n >= 0 && d_in >= 0 && d_out >= 0, "exact_token_scores: sizes must be non-negative");
  require(split >= 1 && split <= 65535, "exact_token_scores: split must be in [1, 65535]");
  if (n == 0) return;
  require(out != 0, "exact_token_scores: null output pointer");
  require(ldx >= d_in && lddy >= d_out && ldg >= d_in, "exact_token_scores: row stride smaller than the row");
  DeviceScope scope(device);
  const cudaStream_t st = as_stream(stream);
  float* out_p = mptr<float>(out);
  if (d_out == 0) {  // empty sum
    check(cudaMemsetAsync(out_p, 0, static_cast<size_t>(n) * sizeof(float), st), "cudaMemsetAsync");
    return;
  }
  require(dy != 0, "exact_token_scores: null dy pointer");
  require(d_in == 0 || (x != 0 && g != 0), "exact_token_scores: null x or g pointer");
  const std::int64_t n_tiles = (d_out + kTileCols - 1) / kTileCols;
  if (split > n_tiles) split = n_tiles;
  require(split == 1 || workspace != 0, "exact_token_scores: split > 1 needs a workspace");
  float* dst = split == 1 ? out_p : mptr<float>(workspace);
  const dim3 grid(cdiv_u32(n, kTileRows, "exact_token_scores"), static_cast<unsigned int>(split));
  dispatch_gemm_types(dt, "exact_token_scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    exact_score_kernel<T><<<grid, kThreads, 0, st>>>(cptr<T>(x), ldx, cptr<T>(dy), lddy, cptr<float>(g), ldg,
                                                      cptr<float>(g_bias), n, d_in, d_out, split, dst);
    check_launch("exact_score_kernel");
  });
  if (split > 1) sum_partials(dst, 1, split, n, out_p, st);
}

}  // namespace cuda
}  // namespace ippo
