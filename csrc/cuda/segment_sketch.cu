// Per-episode two-sided Kronecker sketch (ippo.ops.reference.segment_sketch) and the deterministic
// segment_sum:
//
//     A = X P_in^T + 1 p_in_bias^T   [N, k_in]     B = dY P_out^T   [N, k_out]     (never in global memory)
//     S[e] = B[T_e]^T A[T_e]         [k_out, k_in] for the token set T_e of episode e
//     sum[e] = sum_{t in T_e} v[t]
//
// Inputs: X [N, d_in], dY [N, d_out] in fp32/fp16/bf16 (fp32 after the load), P_in fp32 [k_in, d_in],
// p_in_bias fp32 [k_in] or none, P_out fp32 [k_out, d_out]. Output fp32 [E, k_out, k_in].
// Tokens are grouped by episode on the Python side (ippo/ops/cuda_ops.py: stable argsort of the kept ids,
// bincount + cumsum): order[offsets[e]:offsets[e+1]] are the tokens of episode e in increasing token order;
// ids of -1 are simply absent.
//
// Sketch kernel: one 256-thread block per (episode chunk, 64-row k_out tile, 64-column k_in tile). It walks
// its chunk of the episode's token range 64 tokens at a time: gathers the X / dY rows through `order`,
// computes the 64x64 A tile (tokens x k_in, + bias on real tokens only) and B tile (tokens x k_out) with the
// shared-memory tile GEMM of kernels.h, stores both in shared memory (padding tokens are zero rows), and
// accumulates S_tile += B^T A over the 64 tokens in increasing token order, 4x4 outputs per thread in
// registers. Each output tile is written by exactly one block; empty episodes write zeros.
// Few, long episodes (occupancy): split > 1 cuts every episode into `split` contiguous chunks (multiples of
// 64 tokens), each block writes a partial [E, split, k_out, k_in] and sum_partials adds the chunks in
// increasing order. No atomics: bitwise deterministic for a given split. fp32 FFMA only (no TF32).
//
// segment_sum kernel: one 256-thread block per episode; thread i sums the segment's tokens i, i + 256, ...
// in order, then a fixed shared-memory tree. fp32 accumulation (fp64 for fp64 values).
//
// Cost, with M kept tokens, n_ko = ceil(k_out/64), n_ki = ceil(k_in/64), s = input element size:
//   * FLOPs: useful 2 M (d_in k_in + d_out k_out + k_out k_in); the kernel recomputes the A tile for each
//     k_out tile and the B tile for each k_in tile: 2 M (n_ko d_in k_in + n_ki d_out k_out + k_out k_in)
//     (= useful when k_in, k_out <= 64, the intended regime). fp32 FFMA on CUDA cores.
//   * Bytes, floor: M (d_in + d_out) s + 4 (k_in d_in + k_out d_out) + 4 E k_out k_in (+ 8 M of sort order):
//     X and dY read once, S written once. This kernel reads X n_ko times and dY n_ki times (once each when
//     both ranks fit one tile) with row gathers (rows are contiguous, so each row is a coalesced read), the
//     projections from L2; split > 1 adds 8 E split k_out k_in bytes of partials.
//   * segment_sum: M (s + 8) + 8 (E + 1) + 4 E bytes, M adds.
// Measured on GPU: not yet (no GPU lent to this issue).
#include "cuda/kernels.h"

namespace ippo {
namespace cuda {
namespace detail {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    segment_sketch_kernel(const T* __restrict__ x, std::int64_t ldx, const T* __restrict__ dy, std::int64_t lddy,
                          const float* __restrict__ p_in, std::int64_t ldpi, const float* __restrict__ pb,
                          const float* __restrict__ p_out, std::int64_t ldpo, const std::int64_t* __restrict__ order,
                          const std::int64_t* __restrict__ offsets, std::int64_t d_in, std::int64_t d_out,
                          std::int64_t k_in, std::int64_t k_out, std::int64_t split, float* __restrict__ dst) {
  __shared__ GemmSmem sm;
  __shared__ float a_s[kTileRows][kTileCols + 1];  // [token][k_in column]
  __shared__ float b_s[kTileRows][kTileCols + 1];  // [token][k_out row]
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const std::int64_t seg = blockIdx.x;  // = episode * split + chunk
  const std::int64_t e = seg / split;
  const std::int64_t c = seg - e * split;
  const std::int64_t start = offsets[e];
  const std::int64_t end = offsets[e + 1];
  // chunk length: ceil(len / split) rounded up to whole 64-token steps (0 for an empty episode)
  const std::int64_t per = ((end - start + split - 1) / split + kTileRows - 1) / kTileRows * kTileRows;
  const std::int64_t lo = start + c * per;
  const std::int64_t hi = lo + per < end ? lo + per : end;  // hi <= lo: nothing to do
  const std::int64_t ko0 = static_cast<std::int64_t>(blockIdx.y) * kTileCols;
  const std::int64_t ki0 = static_cast<std::int64_t>(blockIdx.z) * kTileCols;

  float s[4][4] = {};  // S[ko0 + ty + 16i][ki0 + tx + 16j]
  for (std::int64_t t0 = lo; t0 < hi; t0 += kTileRows) {  // uniform across the block
    std::int64_t rows[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const std::int64_t p = t0 + ty + 16 * r;
      rows[r] = p < hi ? order[p] : -1;
    }
    {
      float acc[4][4] = {};
      tile_gemm_nt(x, ldx, rows, p_in, ldpi, ki0, k_in, d_in, sm, acc);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const std::int64_t ki = ki0 + tx + 16 * j;
          float v = 0.0f;
          if (rows[i] >= 0 && ki < k_in) v = pb != nullptr ? acc[i][j] + pb[ki] : acc[i][j];
          a_s[ty + 16 * i][tx + 16 * j] = v;
        }
    }
    {
      float acc[4][4] = {};
      tile_gemm_nt(dy, lddy, rows, p_out, ldpo, ko0, k_out, d_out, sm, acc);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const std::int64_t ko = ko0 + tx + 16 * j;
          b_s[ty + 16 * i][tx + 16 * j] = (rows[i] >= 0 && ko < k_out) ? acc[i][j] : 0.0f;
        }
    }
    __syncthreads();  // a_s / b_s complete
    const int count = static_cast<int>(hi - t0 < kTileRows ? hi - t0 : kTileRows);
    for (int tt = 0; tt < count; ++tt) {
      float bv[4], av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = b_s[tt][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) av[j] = a_s[tt][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = fmaf(bv[i], av[j], s[i][j]);
    }
    __syncthreads();  // before the next step overwrites a_s / b_s
  }

  float* out = dst + seg * k_out * k_in;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t ko = ko0 + ty + 16 * i;
    if (ko >= k_out) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t ki = ki0 + tx + 16 * j;
      if (ki < k_in) out[ko * k_in + ki] = s[i][j];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const T* __restrict__ values, const std::int64_t* __restrict__ order,
                       const std::int64_t* __restrict__ offsets, typename AccOf<T>::type* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc red[kThreads];
  const int tid = threadIdx.x;
  const std::int64_t e = blockIdx.x;
  const std::int64_t start = offsets[e];
  const std::int64_t end = offsets[e + 1];
  Acc acc = Acc(0);
  for (std::int64_t p = start + tid; p < end; p += kThreads) acc += static_cast<Acc>(to_acc(values[order[p]]));
  red[tid] = acc;
  __syncthreads();
#pragma unroll
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (tid < width) red[tid] += red[tid + width];
    __syncthreads();
  }
  if (tid == 0) out[e] = red[0];
}

}  // namespace
}  // namespace detail

void segment_sketch(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                    std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias, std::uintptr_t p_out,
                    std::int64_t ldpo, std::uintptr_t order, std::uintptr_t offsets, std::int64_t d_in,
                    std::int64_t d_out, std::int64_t k_in, std::int64_t k_out, std::int64_t num_episodes,
                    std::int64_t split, std::uintptr_t workspace, std::uintptr_t out, std::uintptr_t stream,
                    int device) {
  using namespace detail;
  require(d_in >= 0 && d_out >= 0 && k_in >= 0 && k_out >= 0 && num_episodes >= 0,
          "segment_sketch: sizes must be non-negative");
  require(split >= 1, "segment_sketch: split must be >= 1");
  if (num_episodes == 0 || k_in == 0 || k_out == 0) return;  // empty output
  require(out != 0 && offsets != 0, "segment_sketch: null output or offsets pointer");
  require(ldx >= d_in && lddy >= d_out && ldpi >= d_in && ldpo >= d_out,
          "segment_sketch: row stride smaller than the row");
  require(num_episodes <= 0x7fffffffLL / split, "segment_sketch: num_episodes * split too large for the grid");
  const std::int64_t n_ko = (k_out + kTileCols - 1) / kTileCols;
  const std::int64_t n_ki = (k_in + kTileCols - 1) / kTileCols;
  require(n_ko <= 65535 && n_ki <= 65535, "segment_sketch: k_in / k_out too large for the grid");
  require(split == 1 || workspace != 0, "segment_sketch: split > 1 needs a workspace");
  DeviceScope scope(device);
  const cudaStream_t st = as_stream(stream);
  float* out_p = mptr<float>(out);
  float* dst = split == 1 ? out_p : mptr<float>(workspace);
  const dim3 grid(static_cast<unsigned int>(num_episodes * split), static_cast<unsigned int>(n_ko),
                  static_cast<unsigned int>(n_ki));
  dispatch_gemm_types(dt, "segment_sketch", [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_sketch_kernel<T><<<grid, kThreads, 0, st>>>(
        cptr<T>(x), ldx, cptr<T>(dy), lddy, cptr<float>(p_in), ldpi, cptr<float>(p_in_bias), cptr<float>(p_out),
        ldpo, cptr<std::int64_t>(order), cptr<std::int64_t>(offsets), d_in, d_out, k_in, k_out, split, dst);
    check_launch("segment_sketch_kernel");
  });
  if (split > 1) sum_partials(dst, num_episodes, split, k_out * k_in, out_p, st);
}

void segment_sum(DType dt, std::uintptr_t values, std::uintptr_t order, std::uintptr_t offsets,
                 std::int64_t num_episodes, std::uintptr_t out, std::uintptr_t stream, int device) {
  using namespace detail;
  require(num_episodes >= 0, "segment_sum: num_episodes must be non-negative");
  if (num_episodes == 0) return;
  require(out != 0 && offsets != 0, "segment_sum: null output or offsets pointer");
  require(num_episodes <= 0x7fffffffLL, "segment_sum: num_episodes too large for the grid");
  DeviceScope scope(device);
  const cudaStream_t st = as_stream(stream);
  dispatch_all_types(dt, "segment_sum", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    segment_sum_kernel<T><<<static_cast<unsigned int>(num_episodes), kThreads, 0, st>>>(
        cptr<T>(values), cptr<std::int64_t>(order), cptr<std::int64_t>(offsets), mptr<Acc>(out));
    check_launch("segment_sum_kernel");
  });
}

}  // namespace cuda
}  // namespace ippo
