// Run-time choice of the CPU kernels' instruction set (see isa.h). Compiled for the baseline target only.
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

namespace netmerge::cpu {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};

// The highest level built into this extension (CMakeLists.txt defines NETMERGE_BUILT_<isa>).
constexpr Isa kBuilt =
#if defined(NETMERGE_BUILT_avx512_bf16)
    Isa::kAvx512Bf16;
#elif defined(NETMERGE_BUILT_avx512)
    Isa::kAvx512;
#elif defined(NETMERGE_BUILT_avx2)
    Isa::kAvx2;
#else
    Isa::kBaseline;
#endif

Isa cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers (XGETBV).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa parse(const std::string& name, const char* what) {
  if (name == "auto") return detected_isa();
  for (int i = 0; i < 4; ++i) {
    if (name != kNames[i]) continue;
    const Isa isa = static_cast<Isa>(i);
    TORCH_CHECK(isa <= detected_isa(), what, ": this machine's CPU kernels go up to ", isa_name(detected_isa()),
                " (the CPU, or the build, lacks ", name, ")");
    return isa;
  }
  TORCH_CHECK(false, what, " must be auto, baseline, avx2, avx512 or avx512_bf16, got '", name, "'");
}

std::atomic<int> active{-1};
std::once_flag from_environment;

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

Isa detected_isa() {
  static const Isa level = std::min(cpu_level(), kBuilt);
  return level;
}

Isa active_isa() {
  std::call_once(from_environment, [] {
    const char* forced = std::getenv("NETMERGE_CPU_ISA");
    int expected = -1;
    const Isa isa = forced && *forced ? parse(forced, "NETMERGE_CPU_ISA") : detected_isa();
    active.compare_exchange_strong(expected, static_cast<int>(isa));
  });
  return static_cast<Isa>(active.load(std::memory_order_relaxed));
}

void set_cpu_isa(const std::string& name) {
  const Isa isa = parse(name, "cpu isa");
  active_isa();  // the environment is read first, so it cannot override this call later
  active.store(static_cast<int>(isa));
}

}  // namespace netmerge::cpu
