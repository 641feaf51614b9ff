// Projected (target-aligned, rank q) per-token score (ippo.ops.reference.projected_token_scores):
//
//     s_t = sum_j w_j (P_out[j] . dY[t]) (P_in[j] . X[t] + p_in_bias[j])        t in [0, N)
//
// Inputs: X [N, d_in] and dY [N, d_out] in fp32/fp16/bf16 (fp32 after the load), P_in fp32 [q, d_in],
// p_in_bias fp32 [q] or none, P_out fp32 [q, d_out], w fp32 [q]. Output fp32 [N]. A = X P_in^T and
// B = dY P_out^T are never written to global memory.
//
// Kernel: a 256-thread block owns 64 tokens and walks the q tiles by, by + split, ... (by = blockIdx.y).
// Per q tile it computes the 64x64 tiles of A and B with the shared-memory tile GEMM of kernels.h (fp32
// FFMA, no tensor cores, no TF32) into registers (the two tiles share the thread mapping), then the
// epilogue sum_j w_j (A + bias)_tj B_tj over the tile's 64 columns (4 per thread + a fixed half-warp
// butterfly), accumulated per token tile after tile in increasing order. split > 1 (few token tiles) writes
// partials [split, N] summed in increasing split index by sum_partials. No atomics: deterministic.
//
// Cost (s = input element size):
//   * FLOPs: 2 N q (d_in + d_out) + 4 N q; fp32 FFMA on CUDA cores.
//   * Bytes, floor: N (d_in + d_out) s + 4 q (d_in + d_out + 2) + 4 N (X, dY, projections read once).
//     With q <= 64 (one q tile, the intended regime) this kernel reads X and dY exactly once from HBM and
//     the projections from L2, so it is close to that floor (memory-bound: arithmetic intensity ~ 2q/s
//     FLOP/byte); for q > 64 it re-reads X and dY once per q tile.
// Measured on GPU: not yet (no GPU lent to this issue).
#include "cuda/kernels.h"

namespace ippo {
namespace cuda {
namespace detail {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    projected_score_kernel(const T* __restrict__ x, std::int64_t ldx, const T* __restrict__ dy, std::int64_t lddy,
                           const float* __restrict__ p_in, std::int64_t ldpi, const float* __restrict__ pb,
                           const float* __restrict__ p_out, std::int64_t ldpo, const float* __restrict__ w,
                           std::int64_t n, std::int64_t d_in, std::int64_t d_out, std::int64_t q,
                           std::int64_t split, float* __restrict__ dst) {
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
  const std::int64_t n_tiles = (q + kTileCols - 1) / kTileCols;
  for (std::int64_t tile = blockIdx.y; tile < n_tiles; tile += split) {  // uniform across the block
    const std::int64_t j0 = tile * kTileCols;
    float acc_a[4][4] = {};
    float acc_b[4][4] = {};
    tile_gemm_nt(x, ldx, rows, p_in, ldpi, j0, q, d_in, sm, acc_a);
    tile_gemm_nt(dy, lddy, rows, p_out, ldpo, j0, q, d_out, sm, acc_b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.0f;
      if (rows[i] >= 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const std::int64_t jj = j0 + tx + 16 * j;
          if (jj < q) {
            float a = acc_a[i][j];
            if (pb != nullptr) a += pb[jj];
            v = fmaf(a * acc_b[i][j], w[jj], v);
          }
        }
      }
      v = half_warp_sum(v);  // every lane calls it
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
}  // namespace detail

void projected_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                            std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias, std::uintptr_t p_out,
                            std::int64_t ldpo, std::uintptr_t weight, std::int64_t n, std::int64_t d_in,
                            std::int64_t d_out, std::int64_t q, std::int64_t split, std::uintptr_t workspace,
                            std::uintptr_t out, std::uintptr_t stream, int device) {
  using namespace detail;
  require(n >= 0 && d_in >= 0 && d_out >= 0 && q >= 0, "projected_token_scores: sizes must be non-negative");
  require(split >= 1 && split <= 65535, "projected_token_scores: split must be in [1, 65535]");
  if (n == 0) return;
  require(out != 0, "projected_token_scores: null output pointer");
  require(ldx >= d_in && lddy >= d_out && ldpi >= d_in && ldpo >= d_out,
          "projected_token_scores: row stride smaller than the row");
  DeviceScope scope(device);
  const cudaStream_t st = as_stream(stream);
  float* out_p = mptr<float>(out);
  if (q == 0) {  // empty sum
    check(cudaMemsetAsync(out_p, 0, static_cast<size_t>(n) * sizeof(float), st), "cudaMemsetAsync");
    return;
  }
  require(weight != 0, "projected_token_scores: null weight pointer");
  require(d_in == 0 || (x != 0 && p_in != 0), "projected_token_scores: null x or p_in pointer");
  require(d_out == 0 || (dy != 0 && p_out != 0), "projected_token_scores: null dy or p_out pointer");
  const std::int64_t n_tiles = (q + kTileCols - 1) / kTileCols;
  if (split > n_tiles) split = n_tiles;
  require(split == 1 || workspace != 0, "projected_token_scores: split > 1 needs a workspace");
  float* dst = split == 1 ? out_p : mptr<float>(workspace);
  const dim3 grid(cdiv_u32(n, kTileRows, "projected_token_scores"), static_cast<unsigned int>(split));
  dispatch_gemm_types(dt, "projected_token_scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    projected_score_kernel<T><<<grid, kThreads, 0, st>>>(cptr<T>(x), ldx, cptr<T>(dy), lddy, cptr<float>(p_in),
                                                          ldpi, cptr<float>(p_in_bias), cptr<float>(p_out), ldpo,
                                                          cptr<float>(weight), n, d_in, d_out, q, split, dst);
    check_launch("projected_score_kernel");
  });
  if (split > 1) sum_partials(dst, 1, split, n, out_p, st);
}

}  // namespace cuda
}  // namespace ippo
