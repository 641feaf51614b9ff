// Generic CPU kernels, compiled once per instruction set (see CMakeLists.txt):
//   IPPO_ISA_NS  namespace of this build (isa_base, isa_avx2, isa_avx512)
//   IPPO_VBYTES  SIMD vector width in bytes (16, 32, 64)
// The code uses GCC vector extensions, so each build gets the instructions its flags allow.
//
// ODR hygiene: this file is compiled with different -m flags, so it must not instantiate any
// template or inline function that another translation unit could also emit (the linker would
// pick one copy, possibly the AVX-512 one for the baseline path). Hence: no std:: templates here,
// only C functions (malloc/memcpy/memset) and code inside the per-ISA namespace.
#include "cpu/kernels.h"

#include <cstdlib>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef IPPO_ISA_NS
#error "IPPO_ISA_NS must be defined"
#endif
#ifndef IPPO_VBYTES
#error "IPPO_VBYTES must be defined"
#endif

#define IPPO_STR2(x) #x
#define IPPO_STR(x) IPPO_STR2(x)
#define IPPO_INLINE inline __attribute__((always_inline))

namespace ippo {
namespace cpu {
namespace IPPO_ISA_NS {
namespace {

constexpr int kVBytes = IPPO_VBYTES;
constexpr int kNumRegs = kVBytes == 64 ? 32 : 16;
#ifndef IPPO_DIRECT_EXACT
#define IPPO_DIRECT_EXACT 1
#endif
constexpr bool kDirectExact = IPPO_DIRECT_EXACT;

IPPO_INLINE i64 imin(i64 a, i64 b) { return a < b ? a : b; }
IPPO_INLINE i64 imax(i64 a, i64 b) { return a > b ? a : b; }
IPPO_INLINE i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Scratch memory: 64-byte aligned, sizes rounded up.
struct Buf {
  void* p = nullptr;
  explicit Buf(i64 bytes) {
    i64 b = ((imax(bytes, 64) + 63) / 64) * 64;
    p = std::aligned_alloc(64, static_cast<size_t>(b));
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

// Tile geometry. Register tile of the GEMM micro-kernel: MR tokens x NR = NV vectors of outputs.
// 16 vector registers: 6 x 2 accumulators; 32 registers: 12 x 2.
template <typename T>
struct Cfg {
  typedef T vec __attribute__((vector_size(kVBytes)));
  static constexpr int L = kVBytes / static_cast<int>(sizeof(T));  // lanes
  static constexpr int NV = 2;
  static constexpr int NR = NV * L;
  static constexpr int MR = kNumRegs == 32 ? 12 : 6;
  static constexpr int MC = MR * 16;   // tokens per block (one thread's unit of work)
  static constexpr int KC = 256;       // reduction block: a KC x NR weight panel stays in L1
  static constexpr int RO = kNumRegs == 32 ? 8 : 4;  // sketch tile rows (divides NR)

  static IPPO_INLINE vec zero() { return vec{}; }
  static IPPO_INLINE vec splat(T s) { return vec{} + s; }
  static IPPO_INLINE vec loadu(const T* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
  static IPPO_INLINE vec loada(const T* p) { return *reinterpret_cast<const vec*>(p); }
  static IPPO_INLINE void storeu(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  static IPPO_INLINE T hsum(vec v) {  // fixed lane order
    T s = v[0];
    for (int i = 1; i < L; ++i) s += v[i];
    return s;
  }
};

template <typename T>
struct Kern {
  using C = Cfg<T>;
  typedef typename C::vec vec;
  static constexpr int L = C::L, NV = C::NV, NR = C::NR, MR = C::MR, MC = C::MC, KC = C::KC, RO = C::RO;

  // ---------------------------------------------------------------------------------------------
  // Micro-kernel: ct[MR x NR] = sum_k xp[k][r] * wp[k][c] over kc steps (packed panels).
  static IPPO_INLINE void micro(i64 kc, const T* __restrict xp, const T* __restrict wp, T* __restrict ct) {
    vec c[MR][NV];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = C::zero();
    for (i64 k = 0; k < kc; ++k) {
      vec b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = C::loada(wp + v * L);
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const vec a = C::splat(xp[r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
      }
      xp += MR;
      wp += NR;
    }
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) C::storeu(ct + r * NR + v * L, c[r][v]);
  }

  // Same product, reading MR rows of X in place (no packing): for narrow outputs (one or two
  // panels) packing would cost as much as the product itself. xr[r] points at row r, column k0.
  static IPPO_INLINE void micro_rows(i64 kc, const T* const* __restrict xr, const T* __restrict wp,
                                     T* __restrict ct) {
    vec c[MR][NV];
    const T* x[MR];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) x[r] = xr[r];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = C::zero();
    for (i64 k = 0; k < kc; ++k) {
      vec b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = C::loada(wp + v * L);
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const vec a = C::splat(x[r][k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
      }
      wp += NR;
    }
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) C::storeu(ct + r * NR + v * L, c[r][v]);
  }

  // Pack rows [t0, t0+mc) (through `rows` when given), columns [k0, k0+kc) of X into MR-row panels:
  // xp[p*kc*MR + k*MR + r] = X[row(t0+p*MR+r)][k0+k], zero for rows past mc.
  static void pack_x(const T* X, i64 ldx, const i64* rows, i64 t0, i64 mc, i64 k0, i64 kc, T* xp) {
    for (i64 p = 0; p < mc; p += MR) {
      T* dst = xp + p * kc;
      for (int r = 0; r < MR; ++r) {
        const i64 t = p + r;
        if (t < mc) {
          const i64 row = rows ? rows[t0 + t] : t0 + t;
          const T* src = X + row * ldx + k0;
          for (i64 k = 0; k < kc; ++k) dst[k * MR + r] = src[k];
        } else {
          for (i64 k = 0; k < kc; ++k) dst[k * MR + r] = T(0);
        }
      }
    }
  }

  // Pack W [n, K] (row stride ldw) into NR-column panels per KC block:
  // wp[k0*npan*NR + j*kc*NR + k*NR + c] = W[j*NR+c][k0+k], zero for j*NR+c >= n.
  static void pack_w(const T* W, i64 ldw, i64 n, i64 K, T* wp, int threads) {
    const i64 npan = ceil_div(n, NR);
    const i64 nkb = ceil_div(K, KC);
    const i64 tasks = nkb * npan;
#pragma omp parallel for num_threads(threads) schedule(static) if (tasks * KC * NR > 32768)
    for (i64 task = 0; task < tasks; ++task) {
      const i64 kb = task / npan, j = task % npan;
      const i64 k0 = kb * KC, kc = imin(KC, K - k0);
      T* dst = wp + k0 * npan * NR + j * kc * NR;
      for (int c = 0; c < NR; ++c) {
        const i64 o = j * NR + c;
        if (o < n) {
          const T* src = W + o * ldw + k0;
          for (i64 k = 0; k < kc; ++k) dst[k * NR + c] = src[k];
        } else {
          for (i64 k = 0; k < kc; ++k) dst[k * NR + c] = T(0);
        }
      }
    }
  }

  // A vector padded with zeros to a multiple of NR (nullptr in -> zeros).
  static void pad_vec(const T* v, i64 n, i64 npad, T* out) {
    for (i64 i = 0; i < npad; ++i) out[i] = (v && i < n) ? v[i] : T(0);
  }

  // C[r][c] (r < round_up(mc, MR), c < (j1-j0)*NR, row stride ldc) = X_rows . W^T (+ bias) for the
  // output panels [j0, j1) of a packed weight wp with npan panels. xp: MC*KC scratch.
  static void block_gemm_store(const T* X, i64 ldx, const i64* rows, i64 t0, i64 mc, i64 K, const T* wp,
                               i64 npan, i64 j0, i64 j1, const T* bias_pad, T* Cm, i64 ldc, T* xp) {
    alignas(64) T ct[MR * NR];
    const i64 nkb = imax(1, ceil_div(K, KC));
    for (i64 kb = 0; kb < nkb; ++kb) {
      const i64 k0 = kb * KC, kc = imax(0, imin(KC, K - k0));
      const bool direct = true;  // measured: in-place rows beat packing here
      if (!direct) pack_x(X, ldx, rows, t0, mc, k0, kc, xp);
      for (i64 j = j0; j < j1; ++j) {
        const T* wpj = wp + k0 * npan * NR + j * kc * NR;
        vec bias[NV];
        for (int v = 0; v < NV; ++v)
          bias[v] = (kb == 0 && bias_pad) ? C::loadu(bias_pad + j * NR + v * L) : C::zero();
        for (i64 ir = 0; ir < mc; ir += MR) {
          if (direct) {
            // rows past mc repeat the last valid row: their results land in padding rows of C
            const T* xr[MR];
            for (int r = 0; r < MR; ++r) {
              const i64 t = t0 + imin(ir + r, mc - 1);
              xr[r] = X + (rows ? rows[t] : t) * ldx + k0;
            }
            micro_rows(kc, xr, wpj, ct);
          } else {
            micro(kc, xp + ir * kc, wpj, ct);
          }
          T* dst = Cm + ir * ldc + (j - j0) * NR;
          for (int r = 0; r < MR; ++r) {
            for (int v = 0; v < NV; ++v) {
              vec val = C::loadu(ct + r * NR + v * L);
              T* d = dst + r * ldc + v * L;
              if (kb == 0)
                C::storeu(d, val + bias[v]);
              else
                C::storeu(d, C::loadu(d) + val);
            }
          }
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // exact_token_scores: s_t = sum_o dy[t,o] * (sum_i g[o,i] x[t,i] + b[o]).
  // GEMM with the epilogue fused: each MR x NR tile of x.g^T is multiplied by the matching dy tile
  // and reduced into per-token vector partial sums right away (the product is linear in each KC
  // block, so partial K blocks can be reduced separately; the bias joins in the first block).
  static int exact(const ExactArgs<T>& a) {
    const i64 n = a.n, K = a.d_in, M = a.d_out;
    if (n <= 0) return 0;
    if (M <= 0) {
      std::memset(a.out, 0, sizeof(T) * n);
      return 0;
    }
    const i64 npan = ceil_div(M, NR);
    Buf wbuf(sizeof(T) * npan * NR * imax(K, 1)), bbuf(sizeof(T) * npan * NR);
    if (!wbuf.p || !bbuf.p) return 1;
    T* wp = wbuf.as<T>();
    T* bp = bbuf.as<T>();
    pack_w(a.g, a.ldg, M, K, wp, a.threads);
    pad_vec(a.g_bias, M, npan * NR, bp);
    const bool has_bias = a.g_bias != nullptr;
    const i64 nblocks = ceil_div(n, MC);
    const i64 nkb = imax(1, ceil_div(K, KC));
    int failed = 0;
#pragma omp parallel num_threads(a.threads) if (nblocks > 1)
    {
      Buf xbuf(sizeof(T) * MC * KC), sbuf(sizeof(vec) * MC);
      const bool ok = xbuf.p && sbuf.p;
      if (!ok) {
#pragma omp atomic write
        failed = 1;
      }
      T* xp = xbuf.as<T>();
      vec* sv = sbuf.as<vec>();
      alignas(64) T ct[MR * NR];
      alignas(64) T dyt[MR * NR];
#pragma omp for schedule(static)
      for (i64 blk = 0; blk < nblocks; ++blk) {
        if (!ok) continue;
        const i64 t0 = blk * MC, mc = imin(MC, n - t0);
        for (i64 r = 0; r < mc; ++r) sv[r] = C::zero();
        for (i64 kb = 0; kb < nkb; ++kb) {
          const i64 k0 = kb * KC, kc = imax(0, imin(KC, K - k0));
          if (!kDirectExact) pack_x(a.x, a.ldx, nullptr, t0, mc, k0, kc, xp);
          for (i64 j = 0; j < npan; ++j) {
            const T* wpj = wp + k0 * npan * NR + j * kc * NR;
            const i64 o0 = j * NR;
            const i64 nrv = imin(NR, M - o0);
            vec bias[NV];
            for (int v = 0; v < NV; ++v)
              bias[v] = (kb == 0 && has_bias) ? C::loada(bp + o0 + v * L) : C::zero();
            for (i64 ir = 0; ir < mc; ir += MR) {
              if (kDirectExact) {
                const T* xr[MR];
                for (int r = 0; r < MR; ++r) xr[r] = a.x + (t0 + imin(ir + r, mc - 1)) * a.ldx + k0;
                micro_rows(kc, xr, wpj, ct);
              } else {
                micro(kc, xp + ir * kc, wpj, ct);
              }
              const i64 mrv = imin(MR, mc - ir);
              for (i64 r = 0; r < mrv; ++r) {
                const T* dyr = a.dy + (t0 + ir + r) * a.lddy + o0;
                const T* dsrc = dyr;
                if (nrv < NR) {  // ragged right edge: zero-padded copy of the dy row tile
                  T* tmp = dyt + r * NR;
                  for (int c = 0; c < NR; ++c) tmp[c] = c < nrv ? dyr[c] : T(0);
                  dsrc = tmp;
                }
                vec acc = sv[ir + r];
                for (int v = 0; v < NV; ++v)
                  acc += (C::loadu(ct + r * NR + v * L) + bias[v]) * C::loadu(dsrc + v * L);
                sv[ir + r] = acc;
              }
            }
          }
        }
        for (i64 r = 0; r < mc; ++r) a.out[t0 + r] = C::hsum(sv[r]);
      }
    }
    return failed;
  }

  // ---------------------------------------------------------------------------------------------
  // projected_token_scores: s_t = sum_j w_j (p_out_j . dy_t)(p_in_j . x_t + bias_j).
  // Per token block and block of q columns: the two projections into L2-sized tiles, then the
  // weighted row dot products; nothing of size [n, q] is materialised.
  static int proj(const ProjArgs<T>& a) {
    const i64 n = a.n, q = a.q;
    if (n <= 0) return 0;
    if (q <= 0) {
      std::memset(a.out, 0, sizeof(T) * n);
      return 0;
    }
    const i64 npan = ceil_div(q, NR);
    const i64 qp = npan * NR;
    const i64 pan_per_blk = imax(1, 256 / NR);
    const i64 nqb = ceil_div(npan, pan_per_blk);
    const i64 ldc = imin(npan, pan_per_blk) * NR;
    Buf wi(sizeof(T) * qp * imax(a.d_in, 1)), wo(sizeof(T) * qp * imax(a.d_out, 1));
    Buf bb(sizeof(T) * qp), wb(sizeof(T) * qp);
    if (!wi.p || !wo.p || !bb.p || !wb.p) return 1;
    pack_w(a.p_in, a.ldpi, q, a.d_in, wi.as<T>(), a.threads);
    pack_w(a.p_out, a.ldpo, q, a.d_out, wo.as<T>(), a.threads);
    pad_vec(a.p_in_bias, q, qp, bb.as<T>());
    pad_vec(a.weight, q, qp, wb.as<T>());
    const T* bias = a.p_in_bias ? bb.as<T>() : nullptr;
    const T* w = wb.as<T>();
    const i64 nblocks = ceil_div(n, MC);
    int failed = 0;
#pragma omp parallel num_threads(a.threads) if (nblocks > 1)
    {
      Buf xbuf(sizeof(T) * MC * KC), abuf(sizeof(T) * MC * ldc), bbuf2(sizeof(T) * MC * ldc),
          sbuf(sizeof(vec) * MC);
      const bool ok = xbuf.p && abuf.p && bbuf2.p && sbuf.p;
      if (!ok) {
#pragma omp atomic write
        failed = 1;
      }
      T* A = abuf.as<T>();
      T* B = bbuf2.as<T>();
      vec* sv = sbuf.as<vec>();
#pragma omp for schedule(static)
      for (i64 blk = 0; blk < nblocks; ++blk) {
        if (!ok) continue;
        const i64 t0 = blk * MC, mc = imin(MC, n - t0);
        for (i64 r = 0; r < mc; ++r) sv[r] = C::zero();
        for (i64 qb = 0; qb < nqb; ++qb) {
          const i64 j0 = qb * pan_per_blk, j1 = imin(npan, j0 + pan_per_blk);
          block_gemm_store(a.x, a.ldx, nullptr, t0, mc, a.d_in, wi.as<T>(), npan, j0, j1, bias, A, ldc,
                           xbuf.as<T>());
          block_gemm_store(a.dy, a.lddy, nullptr, t0, mc, a.d_out, wo.as<T>(), npan, j0, j1, nullptr, B,
                           ldc, xbuf.as<T>());
          const i64 ncol = (j1 - j0) * NR;
          const T* wq = w + j0 * NR;
          for (i64 r = 0; r < mc; ++r) {
            vec acc = sv[r];
            const T* ar = A + r * ldc;
            const T* br = B + r * ldc;
            for (i64 c = 0; c < ncol; c += L) acc += C::loadu(wq + c) * C::loadu(ar + c) * C::loadu(br + c);
            sv[r] = acc;
          }
        }
        for (i64 r = 0; r < mc; ++r) a.out[t0 + r] = C::hsum(sv[r]);
      }
    }
    return failed;
  }

  // ---------------------------------------------------------------------------------------------
  // segment_sketch: S_e = sum_{t in e} (P_out dy_t)(P_in x_t + bias)^T.
  // Tokens are counting-sorted by episode (stable: token order kept inside an episode), then
  // processed in chunks of sorted tokens: (1) both projections of the chunk (GEMMs with a gathered
  // row packing), (2) per (episode run in the chunk, RO x NR tile of S) task, the outer products
  // are accumulated in registers in token order and added to S. Every element of S is owned by one
  // task per chunk and chunks run in order: deterministic for any thread count.
  static int sketch(const SketchArgs<T>& a) {
    const i64 n = a.n, E = a.num_episodes, kin = a.k_in, kout = a.k_out;
    const i64 total = E * kout * kin;
    if (total > 0) {
#pragma omp parallel for num_threads(a.threads) schedule(static) if (total > (1 << 18))
      for (i64 e = 0; e < E; ++e) std::memset(a.out + e * kout * kin, 0, sizeof(T) * kout * kin);
    }
    if (n <= 0 || E <= 0 || kin <= 0 || kout <= 0) return 0;

    // Counting sort of the tokens by episode (ids validated by the caller: -1 <= id < E).
    Buf offb(sizeof(i64) * (E + 1));
    if (!offb.p) return 1;
    i64* off = offb.as<i64>();
    for (i64 e = 0; e <= E; ++e) off[e] = 0;
    for (i64 t = 0; t < n; ++t)
      if (a.ids[t] >= 0) off[a.ids[t] + 1]++;
    for (i64 e = 0; e < E; ++e) off[e + 1] += off[e];
    const i64 nkeep = off[E];
    if (nkeep == 0) return 0;
    Buf ordb(sizeof(i64) * nkeep), curb(sizeof(i64) * E);
    if (!ordb.p || !curb.p) return 1;
    i64* order = ordb.as<i64>();
    i64* cur = curb.as<i64>();
    for (i64 e = 0; e < E; ++e) cur[e] = off[e];
    for (i64 t = 0; t < n; ++t)
      if (a.ids[t] >= 0) order[cur[a.ids[t]]++] = t;

    const i64 npi = ceil_div(kin, NR), npo = ceil_div(kout, NR);
    const i64 ldA = npi * NR, ldB = npo * NR;
    Buf wi(sizeof(T) * ldA * imax(a.d_in, 1)), wo(sizeof(T) * ldB * imax(a.d_out, 1)), bb(sizeof(T) * ldA);
    if (!wi.p || !wo.p || !bb.p) return 1;
    pack_w(a.p_in, a.ldpi, kin, a.d_in, wi.as<T>(), a.threads);
    pack_w(a.p_out, a.ldpo, kout, a.d_out, wo.as<T>(), a.threads);
    pad_vec(a.p_in_bias, kin, ldA, bb.as<T>());
    const T* bias = a.p_in_bias ? bb.as<T>() : nullptr;

    // Chunk of sorted tokens: a multiple of MC, about 4M projected values at most.
    i64 ch = ((i64(1) << 22) / (ldA + ldB)) / MC * MC;
    ch = imax(MC, imin(ch, i64(MC) * 64));
    ch = imin(ch, ceil_div(nkeep, MC) * MC);
    Buf Ab(sizeof(T) * ch * ldA), Bb(sizeof(T) * ch * ldB);
    // Runs of one episode inside a chunk: (episode, begin, end) in sorted positions.
    Buf segb(sizeof(i64) * 3 * ch);
    if (!Ab.p || !Bb.p || !segb.p) return 1;
    T* A = Ab.as<T>();
    T* B = Bb.as<T>();
    i64* seg = segb.as<i64>();
    const i64 nto = ceil_div(kout, RO), nti = npi;
    int failed = 0;

    for (i64 c0 = 0; c0 < nkeep; c0 += ch) {
      const i64 cn = imin(ch, nkeep - c0);
      const i64* rows = order + c0;
      const i64 nblocks = ceil_div(cn, MC);
      // (1) projections of the chunk's tokens, in sorted order.
#pragma omp parallel num_threads(a.threads) if (nblocks > 1)
      {
        Buf xbuf(sizeof(T) * MC * KC);
        if (!xbuf.p) {
#pragma omp atomic write
          failed = 1;
        }
#pragma omp for schedule(static)
        for (i64 blk = 0; blk < nblocks; ++blk) {
          if (!xbuf.p) continue;
          const i64 t0 = blk * MC, mc = imin(MC, cn - t0);
          block_gemm_store(a.x, a.ldx, rows, t0, mc, a.d_in, wi.as<T>(), npi, 0, npi, bias, A + t0 * ldA, ldA,
                           xbuf.as<T>());
          block_gemm_store(a.dy, a.lddy, rows, t0, mc, a.d_out, wo.as<T>(), npo, 0, npo, nullptr, B + t0 * ldB,
                           ldB, xbuf.as<T>());
        }
      }
      if (failed) return 1;
      // (2) runs of episodes in this chunk.
      i64 nseg = 0;
      {
        i64 lo = 0, hi = E;  // first episode e with off[e+1] > c0
        while (lo < hi) {
          const i64 mid = (lo + hi) / 2;
          if (off[mid + 1] > c0) hi = mid; else lo = mid + 1;
        }
        i64 p = c0;
        for (i64 e = lo; e < E && p < c0 + cn; ++e) {
          const i64 end = imin(off[e + 1], c0 + cn);
          if (end > p) {
            seg[3 * nseg] = e;
            seg[3 * nseg + 1] = p - c0;
            seg[3 * nseg + 2] = end - c0;
            ++nseg;
            p = end;
          }
        }
      }
      const i64 ntasks = nseg * nto * nti;
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 4) if (ntasks > 1 && cn * kin * kout > 65536)
      for (i64 task = 0; task < ntasks; ++task) {
        const i64 s = task / (nto * nti);
        const i64 rem = task % (nto * nti);
        const i64 to = rem / nti, ti = rem % nti;
        const i64 e = seg[3 * s], pb = seg[3 * s + 1], pe = seg[3 * s + 2];
        vec acc[RO][NV];
        for (int r = 0; r < RO; ++r)
          for (int v = 0; v < NV; ++v) acc[r][v] = C::zero();
        const T* ap = A + pb * ldA + ti * NR;
        const T* bp = B + pb * ldB + to * RO;
        for (i64 p = pb; p < pe; ++p) {
          vec av[NV];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) av[v] = C::loada(ap + v * L);
#pragma GCC unroll 16
          for (int r = 0; r < RO; ++r) {
            const vec bv = C::splat(bp[r]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] += bv * av[v];
          }
          ap += ldA;
          bp += ldB;
        }
        alignas(64) T ct[RO * NR];
#pragma GCC unroll 16
        for (int r = 0; r < RO; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) C::storeu(ct + r * NR + v * L, acc[r][v]);
        const i64 rv = imin(RO, kout - to * RO), cv = imin(NR, kin - ti * NR);
        T* S = a.out + e * kout * kin + (to * RO) * kin + ti * NR;
        for (i64 r = 0; r < rv; ++r)
          for (i64 c = 0; c < cv; ++c) S[r * kin + c] += ct[r * NR + c];
      }
    }
    return failed;
  }
};

int exact_f32(const ExactArgs<float>& a) { return Kern<float>::exact(a); }
int exact_f64(const ExactArgs<double>& a) { return Kern<double>::exact(a); }
int proj_f32(const ProjArgs<float>& a) { return Kern<float>::proj(a); }
int proj_f64(const ProjArgs<double>& a) { return Kern<double>::proj(a); }
int sketch_f32(const SketchArgs<float>& a) { return Kern<float>::sketch(a); }
int sketch_f64(const SketchArgs<double>& a) { return Kern<double>::sketch(a); }

const IsaKernels kTable = {IPPO_STR(IPPO_ISA_NS), exact_f32, exact_f64, proj_f32, proj_f64, sketch_f32, sketch_f64};

}  // namespace

const IsaKernels* kernels() { return &kTable; }

}  // namespace IPPO_ISA_NS
}  // namespace cpu
}  // namespace ippo
