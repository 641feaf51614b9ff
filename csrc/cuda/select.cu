// The I-PPO filter on the GPU (ippo.ops.reference.select_episodes) and score_and_select (scores =
// sketches @ target, then the filter), as one host call of a few launches on the caller's stream:
//
//   score_kernel       (score_and_select only) one 256-thread block per episode: thread i sums the products
//                      d = i, i + 256, ... in order, then a fixed shared-memory tree; fp32 accumulation
//                      (fp64 for fp64 sketches). Non-finite scores record their index in the flag.
//   finite_kernel      (select_episodes only) records the smallest index of a NaN/Inf score in the flag.
//   keep_*_kernel      threshold: keep = score > value (value already rounded to the scores' dtype).
//                      bottom fractions: rank(e) = #{j : s_j < s_e or (s_j == s_e and j < e)}, i.e. the
//                      position of e in a stable ascending sort (IEEE comparisons: -0 == +0, as torch's sort);
//                      drop e when rank(e) < n_drop (and, for negative_bottom_fraction, s_e < 0). Each thread
//                      counts its rank against all scores staged in 256-wide shared tiles: O(E^2 / 256)
//                      steps, exact and order-free (E = 65,536 is ~4.3e9 comparisons, ~ms on an H100).
//   weights_kernel     one block: sum of the kept scores in fp64 and their count (fixed strided order +
//                      fixed tree), mean = (dtype)(sum / count), w = score / mean for kept, 0 otherwise (all
//                      zeros when nothing is kept): the C++ CPU kernel's formula.
//   then the flag (and the first bad score) is copied back and the stream synchronised once; a NaN/Inf
//   score raises std::invalid_argument (Python ValueError) naming the first bad episode.
//
// The flag is the only atomic: an integer atomicMin, whose result does not depend on the order. No float
// atomics anywhere: the keep mask and the weights are bitwise deterministic.
// Cost: score O(E D) FLOPs and E D s + 4 D bytes (sketches read once: memory-bound); rank O(E^2) compares;
// one host round trip (the NaN check), like the reference's torch.isfinite(...).all().
// Measured on GPU: not yet (no GPU lent to this issue).
#include "cuda/kernels.h"

#include <climits>
#include <sstream>

namespace ippo {
namespace cuda {
namespace detail {
namespace {

constexpr unsigned long long kNoBad = ULLONG_MAX;

template <typename S>
__global__ void __launch_bounds__(kThreads)
    finite_kernel(const S* __restrict__ s, std::int64_t n, unsigned long long* __restrict__ flag) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride)
    if (!isfinite(s[e])) atomicMin(flag, static_cast<unsigned long long>(e));
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    keep_threshold_kernel(const S* __restrict__ s, std::int64_t n, S value, std::uint8_t* __restrict__ keep) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride)
    keep[e] = s[e] > value ? 1 : 0;
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    keep_rank_kernel(const S* __restrict__ s, std::int64_t n, std::int64_t n_drop, bool only_negative,
                     std::uint8_t* __restrict__ keep) {
  __shared__ S tile[kThreads];
  const int tid = threadIdx.x;
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * kThreads + tid;
  const bool valid = e < n;
  const S se = valid ? s[e] : S(0);
  std::int64_t rank = 0;
  for (std::int64_t j0 = 0; j0 < n; j0 += kThreads) {  // uniform across the block
    const std::int64_t j = j0 + tid;
    tile[tid] = j < n ? s[j] : S(0);
    __syncthreads();
    const int count = static_cast<int>(n - j0 < kThreads ? n - j0 : kThreads);
    for (int k = 0; k < count; ++k) {
      const S sj = tile[k];
      rank += (sj < se || (sj == se && j0 + k < e)) ? 1 : 0;
    }
    __syncthreads();
  }
  if (valid) {
    const bool drop = rank < n_drop && (!only_negative || se < S(0));
    keep[e] = drop ? 0 : 1;
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    weights_kernel(const S* __restrict__ s, const std::uint8_t* __restrict__ keep, std::int64_t n,
                   S* __restrict__ w) {
  __shared__ double red_sum[kThreads];
  __shared__ long long red_cnt[kThreads];
  const int tid = threadIdx.x;
  double sum = 0.0;
  long long cnt = 0;
  for (std::int64_t e = tid; e < n; e += kThreads)
    if (keep[e]) {
      sum += static_cast<double>(s[e]);
      ++cnt;
    }
  red_sum[tid] = sum;
  red_cnt[tid] = cnt;
  __syncthreads();
#pragma unroll
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (tid < width) {
      red_sum[tid] += red_sum[tid + width];
      red_cnt[tid] += red_cnt[tid + width];
    }
    __syncthreads();
  }
  const long long count = red_cnt[0];
  const S mean = count ? static_cast<S>(red_sum[0] / static_cast<double>(count)) : S(0);
  for (std::int64_t e = tid; e < n; e += kThreads) w[e] = keep[e] ? s[e] / mean : S(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    score_kernel(const T* __restrict__ sk, std::int64_t ld, const typename AccOf<T>::type* __restrict__ target,
                 std::int64_t dim, typename AccOf<T>::type* __restrict__ scores,
                 unsigned long long* __restrict__ flag) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc red[kThreads];
  const int tid = threadIdx.x;
  const std::int64_t e = blockIdx.x;
  const T* row = sk + e * ld;
  Acc acc = Acc(0);
  for (std::int64_t d = tid; d < dim; d += kThreads) acc = fma(static_cast<Acc>(to_acc(row[d])), target[d], acc);
  red[tid] = acc;
  __syncthreads();
#pragma unroll
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (tid < width) red[tid] += red[tid + width];
    __syncthreads();
  }
  if (tid == 0) {
    const Acc v = red[0];
    scores[e] = v;
    if (!isfinite(v)) atomicMin(flag, static_cast<unsigned long long>(e));
  }
}

unsigned int grid_1d(std::int64_t n) {
  std::int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > (1LL << 20)) blocks = 1LL << 20;  // grid-stride loops beyond that
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// keep + weights on the device, then the (single) synchronisation and the NaN/Inf check.
template <typename S>
void select_on_device(const S* s, std::int64_t n, Rule rule, double value, std::int64_t n_drop,
                      std::uint8_t* keep, S* w, unsigned long long* flag, cudaStream_t st) {
  switch (rule) {
    case Rule::threshold:
      keep_threshold_kernel<S><<<grid_1d(n), kThreads, 0, st>>>(s, n, static_cast<S>(value), keep);
      check_launch("keep_threshold_kernel");
      break;
    case Rule::bottom_fraction:
    case Rule::negative_bottom_fraction: {
      require(n_drop >= 0 && n_drop <= n, "select_episodes: n_drop must be in [0, E]");
      require((n + kThreads - 1) / kThreads <= 0x7fffffffLL, "select_episodes: too many episodes");
      const auto blocks = static_cast<unsigned int>((n + kThreads - 1) / kThreads);
      keep_rank_kernel<S><<<blocks, kThreads, 0, st>>>(s, n, n_drop, rule == Rule::negative_bottom_fraction, keep);
      check_launch("keep_rank_kernel");
      break;
    }
    default:
      throw std::invalid_argument("select_episodes: unknown rule");
  }
  weights_kernel<S><<<1, kThreads, 0, st>>>(s, keep, n, w);
  check_launch("weights_kernel");

  unsigned long long bad = kNoBad;
  check(cudaMemcpyAsync(&bad, flag, sizeof(bad), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync (NaN flag)");
  check(cudaStreamSynchronize(st), "cudaStreamSynchronize (selection)");
  if (bad != kNoBad) {
    S v = S(0);
    std::ostringstream os;
    os << "scores contain NaN/Inf (first bad episode: " << bad;
    if (bad < static_cast<unsigned long long>(n) &&
        cudaMemcpy(&v, s + bad, sizeof(S), cudaMemcpyDeviceToHost) == cudaSuccess)
      os << ", value " << static_cast<double>(v);
    (void)cudaGetLastError();
    os << ")";
    throw std::invalid_argument(os.str());
  }
}

void reset_flag(unsigned long long* flag, cudaStream_t st) {
  check(cudaMemsetAsync(flag, 0xFF, sizeof(unsigned long long), st), "cudaMemsetAsync (NaN flag)");
}

}  // namespace
}  // namespace detail

void select_episodes(DType dt, std::uintptr_t scores, std::int64_t num_episodes, Rule rule, double value,
                     std::int64_t n_drop, std::uintptr_t keep, std::uintptr_t weights, std::uintptr_t flag,
                     std::uintptr_t stream, int device) {
  using namespace detail;
  require(num_episodes >= 0, "select_episodes: num_episodes must be non-negative");
  if (num_episodes == 0) return;
  require(scores != 0 && keep != 0 && weights != 0 && flag != 0, "select_episodes: null pointer");
  DeviceScope scope(device);
  const cudaStream_t st = as_stream(stream);
  auto* flag_p = mptr<unsigned long long>(flag);
  reset_flag(flag_p, st);
  auto run = [&](auto tag) {
    using S = typename decltype(tag)::type;
    finite_kernel<S><<<grid_1d(num_episodes), kThreads, 0, st>>>(cptr<S>(scores), num_episodes, flag_p);
    check_launch("finite_kernel");
    select_on_device<S>(cptr<S>(scores), num_episodes, rule, value, n_drop, mptr<std::uint8_t>(keep),
                        mptr<S>(weights), flag_p, st);
  };
  if (dt == DType::f32)
    run(Tag<float>{});
  else if (dt == DType::f64)
    run(Tag<double>{});
  else
    throw std::invalid_argument("select_episodes: scores must be float32 or float64 (fp16/bf16 are upcast in Python)");
}

void score_and_select(DType dt, std::uintptr_t sketches, std::int64_t ld, std::uintptr_t target,
                      std::int64_t num_episodes, std::int64_t dim, Rule rule, double value, std::int64_t n_drop,
                      std::uintptr_t scores, std::uintptr_t keep, std::uintptr_t weights, std::uintptr_t flag,
                      std::uintptr_t stream, int device) {
  using namespace detail;
  require(num_episodes >= 0 && dim >= 0, "score_and_select: sizes must be non-negative");
  if (num_episodes == 0) return;
  require(scores != 0 && keep != 0 && weights != 0 && flag != 0, "score_and_select: null pointer");
  require(dim == 0 || (sketches != 0 && target != 0), "score_and_select: null sketches or target pointer");
  require(ld >= dim, "score_and_select: row stride smaller than the row");
  require(num_episodes <= 0x7fffffffLL, "score_and_select: too many episodes for the grid");
  DeviceScope scope(device);
  const cudaStream_t st = as_stream(stream);
  auto* flag_p = mptr<unsigned long long>(flag);
  reset_flag(flag_p, st);
  dispatch_all_types(dt, "score_and_select", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    score_kernel<T><<<static_cast<unsigned int>(num_episodes), kThreads, 0, st>>>(
        cptr<T>(sketches), ld, cptr<Acc>(target), dim, mptr<Acc>(scores), flag_p);
    check_launch("score_kernel");
    select_on_device<Acc>(cptr<Acc>(scores), num_episodes, rule, value, n_drop, mptr<std::uint8_t>(keep),
                          mptr<Acc>(weights), flag_p, st);
  });
}

}  // namespace cuda
}  // namespace ippo
