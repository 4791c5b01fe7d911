// Compiles kernels_impl.h three times -- AVX-512, AVX2+FMA and baseline x86-64 (or whatever the
// compiler targets elsewhere) -- in separate namespaces, and picks one at run time from the CPU's
// features.  No -march flag is needed, so one build runs on any machine of the architecture.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekern {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEKERN_X86_MULTI 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define SPARSEKERN_ISA_AVX512 1
namespace isa_avx512 {
#include "kernels_impl.h"
}
#undef SPARSEKERN_ISA_AVX512
#pragma GCC pop_options
namespace isa_avx512 {
#include "kernels_table.h"
}
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "kernels_impl.h"
}
#pragma GCC pop_options
namespace isa_avx2 {
#include "kernels_table.h"
}
#endif

namespace isa_generic {
#include "kernels_impl.h"
#include "kernels_table.h"
}

namespace {

enum Isa { GENERIC = 0, AVX2 = 1, AVX512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#ifdef SPARSEKERN_X86_MULTI
  if (isa == AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (isa == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == GENERIC;
}

Isa best_isa() {
  if (cpu_has(AVX512)) return AVX512;
  if (cpu_has(AVX2)) return AVX2;
  return GENERIC;
}

std::atomic<int> g_isa{-1};

Isa current() {
  int v = g_isa.load();
  if (v < 0) {
    v = best_isa();
    g_isa.store(v);
  }
  return Isa(v);
}

template <typename S>
struct Tables {
  Kernels<S> t[3];
  Tables()
      : t{isa_generic::table<S>("generic"),
#ifdef SPARSEKERN_X86_MULTI
          isa_avx2::table<S>("avx2"), isa_avx512::table<S>("avx512")
#else
          isa_generic::table<S>("generic"), isa_generic::table<S>("generic")
#endif
        } {
  }
};

}  // namespace

template <typename S>
const Kernels<S>& kernels() {
  static const Tables<S> tables;
  return tables.t[current()];
}
template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

std::vector<const char*> supported_isas() {
  std::vector<const char*> out;
  for (int i = AVX512; i >= GENERIC; --i)
    if (cpu_has(Isa(i))) out.push_back(kIsaNames[i]);
  return out;
}

const char* select_isa(const char* request) {
  if (request && *request) {
    for (int i = GENERIC; i <= AVX512; ++i) {
      if (std::strcmp(request, kIsaNames[i]) == 0) {
        if (!cpu_has(Isa(i))) return nullptr;
        g_isa.store(i);
        return kIsaNames[i];
      }
    }
    return nullptr;
  }
  return kIsaNames[current()];
}

}  // namespace sparsekern
