// Dispatch layer of the CPU ops: picks the instruction-set build at run time, re-checks the
// arguments it can check without torch, and throws std::invalid_argument (-> Python ValueError)
// or std::bad_alloc on failure. Pointers arrive as integers from ippo/ops/cpp_ops.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ippo {
namespace cpu {

enum class DType { f32, f64 };
DType parse_dtype(const std::string& name);  // "float32" | "float64"

// Instruction sets compiled into this module and supported by this CPU, best last.
std::vector<std::string> available_isas();
std::string current_isa();
// Force an instruction set ("base", "avx2", "avx512", or "auto" for the best one); throws when unknown
// or unsupported here. The environment variable IPPO_CPU_ISA sets the initial choice.
void set_isa(const std::string& name);
int max_threads();  // OpenMP's default thread count (1 without OpenMP)
bool openmp_enabled();

void exact_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                        std::uintptr_t g, std::int64_t ldg, std::uintptr_t g_bias, std::int64_t n,
                        std::int64_t d_in, std::int64_t d_out, std::uintptr_t out, int threads);

void projected_token_scores(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                            std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias,
                            std::uintptr_t p_out, std::int64_t ldpo, std::uintptr_t weight, std::int64_t n,
                            std::int64_t d_in, std::int64_t d_out, std::int64_t q, std::uintptr_t out,
                            int threads);

void segment_sketch(DType dt, std::uintptr_t x, std::int64_t ldx, std::uintptr_t dy, std::int64_t lddy,
                    std::uintptr_t p_in, std::int64_t ldpi, std::uintptr_t p_in_bias, std::uintptr_t p_out,
                    std::int64_t ldpo, std::uintptr_t ids, std::int64_t n, std::int64_t d_in,
                    std::int64_t d_out, std::int64_t k_in, std::int64_t k_out, std::int64_t num_episodes,
                    std::uintptr_t out, int threads);

// out[e] = sum of values[t] over tokens with ids[t] == e, in token order (ids == -1 skipped).
void segment_sum(DType dt, std::uintptr_t values, std::uintptr_t ids, std::int64_t n, std::int64_t num_episodes,
                 std::uintptr_t out);

// floor(fraction * n + 1e-9) clipped to n (identical to ippo.ops.reference.drop_count).
std::int64_t drop_count(double fraction, std::int64_t n);

// The I-PPO filter (ippo.ops.reference.select_episodes). `value` must already be rounded to the
// scores' dtype (torch compares a tensor with a Python float in the tensor's dtype).
// keep: bool/uint8 [E]; weights: [E] of dtype dt.
void select_episodes(DType dt, std::uintptr_t scores, std::int64_t num_episodes, const std::string& rule,
                     double value, std::uintptr_t keep, std::uintptr_t weights);

}  // namespace cpu
}  // namespace ippo
