// Which instruction set the CPU kernels run with. The kernels with SIMD code are compiled once per instruction
// set (CMakeLists.txt), each build in its own namespace netmerge::cpu::<isa>; the level is detected once from
// CPUID and can be capped (NETMERGE_CPU_ISA=baseline|avx2|avx512, or set_cpu_isa: the tests run the baseline
// build that way).
#pragma once

#include <string>
#include <utility>

namespace netmerge::cpu {

// Each level includes the ones below it.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

Isa detected_isa();  // the best level this CPU and OS support among the levels built
Isa active_isa();    // the level the kernels use now
const char* isa_name(Isa isa);
// "auto" (the detected level) or a level name no higher than the detected one; anything else is an error.
void set_cpu_isa(const std::string& name);

// A pointer to the function that calls the active level's build of a kernel: IsaDispatch<&baseline::f,
// &avx2::f, &avx512::f>::call. Levels that were not built pass a lower level's function.
template <auto Baseline, auto Avx2, auto Avx512>
struct IsaDispatch;

template <typename R, typename... A, R (*Baseline)(A...), R (*Avx2)(A...), R (*Avx512)(A...)>
struct IsaDispatch<Baseline, Avx2, Avx512> {
  static R call(A... args) {
    switch (active_isa()) {
      case Isa::kBaseline:
        return Baseline(std::forward<A>(args)...);
      case Isa::kAvx2:
        return Avx2(std::forward<A>(args)...);
      default:
        return Avx512(std::forward<A>(args)...);
    }
  }
};

}  // namespace netmerge::cpu
