#include "cpu/dispatch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "cpu/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ippo {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  const IsaKernels* (*get)();
  bool (*supported)();
};

bool always() { return true; }
#if (defined(__x86_64__) || defined(_M_X64)) && defined(IPPO_HAVE_ISA_AVX2)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f");
}
#endif

const std::vector<IsaEntry>& compiled_isas() {
  static const std::vector<IsaEntry> list = {
      {"base", &isa_base::kernels, &always},
#ifdef IPPO_HAVE_ISA_AVX2
      {"avx2", &isa_avx2::kernels, &has_avx2},
#endif
#ifdef IPPO_HAVE_ISA_AVX512
      {"avx512", &isa_avx512::kernels, &has_avx512},
#endif
  };
  return list;
}

const IsaKernels* best_isa() {
  const IsaKernels* best = nullptr;
  for (const auto& e : compiled_isas())
    if (e.supported()) best = e.get();
  return best;
}

const IsaKernels* isa_by_name(const std::string& name) {
  if (name.empty() || name == "auto") return best_isa();
  for (const auto& e : compiled_isas()) {
    if (name == e.name) {
      if (!e.supported()) throw std::invalid_argument("CPU ISA '" + name + "' is not supported by this CPU");
      return e.get();
    }
  }
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected auto | base | avx2 | avx512)");
}

std::atomic<const IsaKernels*>& active() {
  static std::atomic<const IsaKernels*> k{[] {
    const char* env = std::getenv("IPPO_CPU_ISA");
    try {
      return isa_by_name(env ? env : "auto");
    } catch (const std::invalid_argument&) {
      return best_isa();
    }
  }()};
  return k;
}

const IsaKernels& K() { return *active().load(); }

template <typename T>
const T* cptr(std::uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* mptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_common(std::int64_t n, std::int64_t ld_x, std::int64_t d_in, std::int64_t ld_dy, std::int64_t d_out,
                  std::uintptr_t x, std::uintptr_t dy, std::uintptr_t out, int threads) {
  require(n >= 0 && d_in >= 0 && d_out >= 0, "sizes must be non-negative");
  require(ld_x >= d_in || n <= 1, "x: row stride smaller than d_in");
  require(ld_dy >= d_out || n <= 1, "dy: row stride smaller than d_out");
  require(n == 0 || (x && dy && out), "null data pointer");
  require(threads >= 1, "threads must be >= 1");
}

void check_ids(const std::int64_t* ids, std::int64_t n, std::int64_t E) {
  for (std::int64_t t = 0; t < n; ++t) {
    if (ids[t] < -1 || ids[t] >= E) {
      std::ostringstream os;
      os << "token_episode: id " << ids[t] << " at token " << t << " is outside [-1, " << E << ")";
      throw std::invalid_argument(os.str());
    }
  }
}

void check_rc(int rc) {
  if (rc != 0) throw std::bad_alloc();
}

}  // namespace

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float64") return DType::f64;
  throw std::invalid_argument("dtype must be 'float32' or 'float64', got '" + name + "'");
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const auto& e : compiled_isas())
    if (e.supported()) out.emplace_back(e.name);
  return out;
}

std::string current_isa() {
  const std::string ns = K().name;  // "isa_<name>"
  return ns.rfind("isa_", 0) == 0 ? ns.substr(4) : ns;
}

void set_isa(const std::string& name) { active().store(isa_by_name(name)); }

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

void exact_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                        std::uintptr_t g, std::int64_t ldg, std::uintptr_t g_bias, std::int64_t n,
                        std::int64_t d_in, std::int64_t d_out, std::uintptr_t out, int threads) {
  check_common(n, ldx, d_in, lddy, d_out, x, dy, out, threads);
  require(ldg >= d_in || d_out <= 1, "g: row stride smaller than d_in");
  require(g || d_out * d_in == 0, "g: null data pointer");
  if (dt == DType::f32) {
    ExactArgs<float> a{cptr<float>(x), ldx, cptr<float>(dy), lddy, cptr<float>(g), ldg, cptr<float>(g_bias),
                       n, d_in, d_out, mptr<float>(out), threads};
    check_rc(K().exact_f32(a));
  } else {
    ExactArgs<double> a{cptr<double>(x), ldx, cptr<double>(dy), lddy, cptr<double>(g), ldg, cptr<double>(g_bias),
                        n, d_in, d_out, mptr<double>(out), threads};
    check_rc(K().exact_f64(a));
  }
}

void projected_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                            std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias,
                            std::uintptr_t p_out, std::int64_t ldpo, std::uintptr_t weight, std::int64_t n,
                            std::int64_t d_in, std::int64_t d_out, std::int64_t q, std::uintptr_t out,
                            int threads) {
  check_common(n, ldx, d_in, lddy, d_out, x, dy, out, threads);
  require(q >= 0, "q must be non-negative");
  require(ldpi >= d_in || q <= 1, "p_in: row stride smaller than d_in");
  require(ldpo >= d_out || q <= 1, "p_out: row stride smaller than d_out");
  require(q == 0 || weight, "weight: null data pointer");
  if (dt == DType::f32) {
    ProjArgs<float> a{cptr<float>(x),    ldx,  cptr<float>(dy),     lddy, cptr<float>(p_in), ldpi,
                      cptr<float>(p_in_bias), cptr<float>(p_out), ldpo, cptr<float>(weight), n,    d_in,
                      d_out, q, mptr<float>(out), threads};
    check_rc(K().proj_f32(a));
  } else {
    ProjArgs<double> a{cptr<double>(x),    ldx,  cptr<double>(dy),     lddy, cptr<double>(p_in), ldpi,
                       cptr<double>(p_in_bias), cptr<double>(p_out), ldpo, cptr<double>(weight), n,    d_in,
                       d_out, q, mptr<double>(out), threads};
    check_rc(K().proj_f64(a));
  }
}

void segment_sketch(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                    std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias, std::uintptr_t p_out,
                    std::int64_t ldpo, std::uintptr_t ids, std::int64_t n, std::int64_t d_in,
                    std::int64_t d_out, std::int64_t k_in, std::int64_t k_out, std::int64_t num_episodes,
                    std::uintptr_t out, int threads) {
  check_common(n, ldx, d_in, lddy, d_out, x, dy, (num_episodes * k_in * k_out) != 0 ? out : 1, threads);
  require(k_in >= 0 && k_out >= 0 && num_episodes >= 0, "k_in, k_out and num_episodes must be non-negative");
  require(ldpi >= d_in || k_in <= 1, "p_in: row stride smaller than d_in");
  require(ldpo >= d_out || k_out <= 1, "p_out: row stride smaller than d_out");
  require(n == 0 || ids, "token_episode: null data pointer");
  check_ids(cptr<std::int64_t>(ids), n, num_episodes);
  if (dt == DType::f32) {
    SketchArgs<float> a{cptr<float>(x), ldx, cptr<float>(dy), lddy, cptr<float>(p_in), ldpi,
                        cptr<float>(p_in_bias), cptr<float>(p_out), ldpo, cptr<std::int64_t>(ids), n, d_in, d_out,
                        k_in, k_out, num_episodes, mptr<float>(out), threads};
    check_rc(K().sketch_f32(a));
  } else {
    SketchArgs<double> a{cptr<double>(x), ldx, cptr<double>(dy), lddy, cptr<double>(p_in), ldpi,
                         cptr<double>(p_in_bias), cptr<double>(p_out), ldpo, cptr<std::int64_t>(ids), n, d_in,
                         d_out, k_in, k_out, num_episodes, mptr<double>(out), threads};
    check_rc(K().sketch_f64(a));
  }
}

namespace {
template <typename T>
void segment_sum_impl(const T* v, const std::int64_t* ids, std::int64_t n, std::int64_t E, T* out) {
  std::fill(out, out + E, T(0));
  for (std::int64_t t = 0; t < n; ++t)
    if (ids[t] >= 0) out[ids[t]] += v[t];
}
}  // namespace

void segment_sum(DType dt, std::uintptr_t values, std::uintptr_t ids, std::int64_t n, std::int64_t num_episodes,
                 std::uintptr_t out) {
  require(n >= 0 && num_episodes >= 0, "sizes must be non-negative");
  require(n == 0 || (values && ids), "null data pointer");
  check_ids(cptr<std::int64_t>(ids), n, num_episodes);
  if (dt == DType::f32)
    segment_sum_impl(cptr<float>(values), cptr<std::int64_t>(ids), n, num_episodes, mptr<float>(out));
  else
    segment_sum_impl(cptr<double>(values), cptr<std::int64_t>(ids), n, num_episodes, mptr<double>(out));
}

std::int64_t drop_count(double fraction, std::int64_t n) {
  const double d = std::floor(fraction * static_cast<double>(n) + 1e-9);
  if (!(d < static_cast<double>(n))) return n;  // also NaN -> n, as min(n, ...) cannot see NaN
  return static_cast<std::int64_t>(d);
}

namespace {
template <typename T>
void select_impl(const T* s, std::int64_t E, const std::string& rule, double value, std::uint8_t* keep,
                 T* w) {
  for (std::int64_t e = 0; e < E; ++e) {
    if (!std::isfinite(s[e])) {
      std::ostringstream os;
      os << "scores contain NaN/Inf (first bad episode: " << e << ", value " << s[e] << ")";
      throw std::invalid_argument(os.str());
    }
  }
  if (rule == "threshold") {
    const T v = static_cast<T>(value);
    for (std::int64_t e = 0; e < E; ++e) keep[e] = s[e] > v;
  } else if (rule == "bottom_fraction" || rule == "negative_bottom_fraction") {
    if (!(0.0 <= value && value <= 1.0)) {
      std::ostringstream os;
      os << rule << " needs a fraction in [0, 1], got " << value;
      throw std::invalid_argument(os.str());
    }
    const std::int64_t n_drop = drop_count(value, E);
    std::vector<std::int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), std::int64_t(0));
    // stable: equal scores keep index order, so ties are deterministic (as torch.sort(stable=True))
    std::stable_sort(order.begin(), order.end(), [s](std::int64_t a, std::int64_t b) { return s[a] < s[b]; });
    std::fill(keep, keep + E, std::uint8_t(1));
    const bool only_negative = rule == "negative_bottom_fraction";
    for (std::int64_t i = 0; i < n_drop; ++i) {
      const std::int64_t e = order[static_cast<size_t>(i)];
      if (!only_negative || s[e] < T(0)) keep[e] = 0;
    }
  } else {
    throw std::invalid_argument("unknown rule '" + rule +
                                "': expected threshold | bottom_fraction | negative_bottom_fraction");
  }
  // weights: score / mean(score over kept), 0 for dropped; all zeros when nothing is kept.
  double sum = 0.0;
  std::int64_t count = 0;
  for (std::int64_t e = 0; e < E; ++e)
    if (keep[e]) {
      sum += static_cast<double>(s[e]);
      ++count;
    }
  const T mean = count ? static_cast<T>(sum / static_cast<double>(count)) : T(0);
  for (std::int64_t e = 0; e < E; ++e) w[e] = keep[e] ? s[e] / mean : T(0);
}
}  // namespace

void select_episodes(DType dt, std::uintptr_t scores, std::int64_t num_episodes, const std::string& rule,
                     double value, std::uintptr_t keep, std::uintptr_t weights) {
  require(num_episodes >= 0, "num_episodes must be non-negative");
  require(num_episodes == 0 || (scores && keep && weights), "null data pointer");
  if (dt == DType::f32)
    select_impl(cptr<float>(scores), num_episodes, rule, value, mptr<std::uint8_t>(keep), mptr<float>(weights));
  else
    select_impl(cptr<double>(scores), num_episodes, rule, value, mptr<std::uint8_t>(keep), mptr<double>(weights));
}

}  // namespace cpu
}  // namespace ippo
