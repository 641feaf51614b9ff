// CPU emulation of the CUDA subset the ippo kernels use: blocks run one after another; the threads of a
// block are ucontext fibers switched at every __syncthreads (and warp shuffle), in a configurable order.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <tuple>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::fma;
using std::isfinite;

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyDeviceToHost = 2 };
inline const char* cudaGetErrorString(cudaError_t) { return "emu error"; }
inline const char* cudaGetErrorName(cudaError_t) { return "emuError"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) { std::memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline float fmaf(float a, float b, float c) { return std::fmaf(a, b, c); }

namespace emu {
enum State { READY, BARRIER, DONE };
struct Fiber { ucontext_t ctx; std::vector<char> stack; State state; };
inline ucontext_t sched_ctx;
inline std::vector<Fiber> fibers;
inline int cur = -1;
inline int order_mode = 0;  // 0 forward, 1 reverse, 2 interleaved
inline long long barriers = 0, launches = 0;
inline std::function<void()>* body = nullptr;

inline void trampoline() {
  (*body)();
  fibers[cur].state = DONE;
  swapcontext(&fibers[cur].ctx, &sched_ctx);
}

inline void set_thread(int i) {
  threadIdx.x = i % blockDim.x;
  threadIdx.y = (i / blockDim.x) % blockDim.y;
  threadIdx.z = i / (blockDim.x * blockDim.y);
}

inline void run_block(int n, std::function<void()> fn) {
  body = &fn;
  fibers.resize(n);
  for (int i = 0; i < n; ++i) {
    fibers[i].stack.resize(256 * 1024);
    getcontext(&fibers[i].ctx);
    fibers[i].ctx.uc_stack.ss_sp = fibers[i].stack.data();
    fibers[i].ctx.uc_stack.ss_size = fibers[i].stack.size();
    fibers[i].ctx.uc_link = nullptr;
    makecontext(&fibers[i].ctx, trampoline, 0);
    fibers[i].state = READY;
  }
  std::vector<int> order(n);
  for (int k = 0; k < n; ++k) {
    if (order_mode == 0) order[k] = k;
    else if (order_mode == 1) order[k] = n - 1 - k;
    else order[k] = (k % 2 == 0) ? k / 2 : n - 1 - k / 2;
  }
  for (;;) {
    for (int k = 0; k < n; ++k) {
      int i = order[k];
      if (fibers[i].state == DONE) continue;
      fibers[i].state = READY;
      cur = i;
      set_thread(i);
      swapcontext(&sched_ctx, &fibers[i].ctx);
    }
    int done = 0, bar = 0;
    for (auto& f : fibers) (f.state == DONE ? done : bar)++;
    if (done == n) break;
    if (done > 0) { std::fprintf(stderr, "EMU: barrier divergence (%d done, %d waiting)\n", done, bar); std::abort(); }
  }
  cur = -1;
}
}  // namespace emu

inline void __syncthreads() {
  if (emu::cur < 0) { std::fprintf(stderr, "EMU: __syncthreads outside a kernel\n"); std::abort(); }
  ++emu::barriers;
  int me = emu::cur;
  emu::fibers[me].state = emu::BARRIER;
  swapcontext(&emu::fibers[me].ctx, &emu::sched_ctx);
  emu::set_thread(me);
}

// Shuffle: every thread of the block must call it (true for the ippo kernels); emulated with two barriers.
inline float __shfl_xor_sync(unsigned, float v, int off, int width = 32) {
  static float buf[1024];
  int tid = emu::cur;
  buf[tid] = v;
  __syncthreads();
  int lane = tid % 32;
  int src_lane = lane ^ off;
  if ((src_lane / width) != (lane / width)) src_lane = lane;
  float r = buf[tid - lane + src_lane];
  __syncthreads();
  return r;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}

template <class... P, class... A>
void emu_launch(void (*k)(P...), dim3 grid, dim3 block, size_t, cudaStream_t, A&&... args) {
  std::tuple<P...> tup(static_cast<P>(args)...);
  gridDim = grid;
  blockDim = block;
  ++emu::launches;
  int n = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        emu::run_block(n, [&] { std::apply(k, tup); });
      }
}
