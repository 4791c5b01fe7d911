// bf16 paths of the CPU kernels beside the widening one (kernels_impl.h widens bf16 tiles to float
// and runs float FMAs): detection of AVX512-BF16 and AMX at run time, the choice between the paths
// (SPARSEKERN_CPU_BF16, or cpu_bf16() for tests) and the vdpbf16ps block panel.  The AVX512-BF16
// code is compiled per function (target attribute), so the library still loads on CPUs without it.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEKERN_BF16_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace sparsekern {
namespace {

const char* const kPathNames[] = {"widen", "avx512_bf16"};

#ifdef SPARSEKERN_BF16_X86
bool cpuid_bit(unsigned leaf, unsigned sub, int reg, int bit) {
  unsigned r[4] = {0, 0, 0, 0};
  if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) return false;
  return (r[reg] >> bit) & 1u;
}
#endif

bool detect_dpbf16() {
#ifdef SPARSEKERN_BF16_X86
  // avx512f via gcc also checks that the OS saves the AVX-512 state; CPUID.(7,1):EAX[5] = AVX512_BF16
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && cpuid_bit(7, 1, 0, 5);
#else
  return false;
#endif
}

// AMX-TILE and AMX-BF16 (CPUID.(7,0):EDX[24], [22]) and Linux's permission for the tile data
// state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18), asked once; a refusal (old
// kernel, seccomp) only means no AMX.
bool detect_amx() {
#ifdef SPARSEKERN_BF16_X86
  if (!cpuid_bit(7, 0, 3, 24) || !cpuid_bit(7, 0, 3, 22)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}

struct Features {
  bool dpbf16 = detect_dpbf16();
  bool amx = detect_amx();
};
const Features& features() {
  static const Features f;
  return f;
}

bool path_ok(Bf16Path p) { return p == Bf16Path::WIDEN || (p == Bf16Path::DPBF16 && features().dpbf16); }

int find_path(const char* name) {
  for (int i = 0; i < 2; ++i)
    if (std::strcmp(name, kPathNames[i]) == 0) return i;
  return -1;
}

// The best path, or SPARSEKERN_CPU_BF16's (an unknown or unsupported value falls back to the
// best: the env var is a request, cpu_bf16() reports what runs).
int initial_path() {
  const char* v = std::getenv("SPARSEKERN_CPU_BF16");
  if (v && *v) {
    const int i = find_path(v);
    if (i >= 0 && path_ok(Bf16Path(i))) return i;
  }
  return int(features().dpbf16 ? Bf16Path::DPBF16 : Bf16Path::WIDEN);
}

std::atomic<int> g_path{-1};

}  // namespace

Bf16Path bf16_path() {
  int v = g_path.load();
  if (v < 0) {
    v = initial_path();
    g_path.store(v);
  }
  return Bf16Path(v);
}

const char* select_bf16_path(const char* request) {
  if (request && *request) {
    const int i = find_path(request);
    if (i < 0 || !path_ok(Bf16Path(i))) return nullptr;
    g_path.store(i);
    return kPathNames[i];
  }
  return kPathNames[int(bf16_path())];
}

std::vector<const char*> supported_bf16_paths() {
  std::vector<const char*> out;
  for (int i = 1; i >= 0; --i)
    if (path_ok(Bf16Path(i))) out.push_back(kPathNames[i]);
  return out;
}

std::string cpu_features() {
  std::string s;
  if (features().dpbf16) s += "avx512_bf16";
  if (features().amx) s += std::string(s.empty() ? "" : ",") + "amx_bf16";
  return s;
}

void bf16_pair_tile(const bf16* __restrict src, int64_t ld, int64_t nt, int64_t ncols, int64_t T,
                    uint32_t* __restrict dst) {
  const int64_t np = (ncols + 1) / 2;
  for (int64_t p = 0; p < np; ++p) {
    uint32_t* d = dst + p * T;
    const int64_t c = 2 * p;
    if (c + 1 < ncols)
      for (int64_t t = 0; t < nt; ++t) d[t] = uint32_t(src[t * ld + c].bits) | uint32_t(src[t * ld + c + 1].bits) << 16;
    else
      for (int64_t t = 0; t < nt; ++t) d[t] = src[t * ld + c].bits;
    std::fill(d + nt, d + T, 0u);
  }
}

void bf16_block_pairs(const int32_t* ptr, const int32_t* idx, int64_t rb, int64_t bk, int64_t ncols,
                      std::vector<int32_t>& pairs) {
  pairs.clear();
  for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
    const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, ncols);
    for (int64_t c = c0; c < c1; c += 2) pairs.push_back(int32_t(c / 2));
  }
}

#ifdef SPARSEKERN_BF16_X86
namespace {

// Rows r .. r + Q of one block row: acc[q][v] += the pair products of every column pair.  Terms
// are added pair after pair in the block row's order: the same for any split of rows.
template <int Q>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void dp_rows(
    const uint32_t* __restrict pw, int64_t bo, const int32_t* __restrict pl, int64_t np, const uint32_t* __restrict bt,
    float* __restrict o) {
  constexpr int NV = 4;
  constexpr int64_t T = NV * 16;
  __m512 acc[Q][NV];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < np; ++i) {
    const uint32_t* x = bt + int64_t(pl[i]) * T;
    __m512bh xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(x + v * 16);
    const uint32_t* w = pw + i * bo;
    for (int q = 0; q < Q; ++q) {
      const __m512bh wq = (__m512bh)_mm512_set1_epi32(int(w[q]));
      for (int v = 0; v < NV; ++v) acc[q][v] = _mm512_dpbf16_ps(acc[q][v], xv[v], wq);
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + q * T + v * 16, acc[q][v]);
}

}  // namespace

void bf16_panel_bsr_dp(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols,
                       const uint32_t* pk, const int64_t* base, int64_t r0, int64_t r1, const uint32_t* bt, float* ot,
                       std::vector<int32_t>& pairs) {
  constexpr int64_t T = kBf16PanelWidth;
  int64_t cur = -1;
  for (int64_t r = r0; r < r1;) {
    const int64_t rb = r / bo;
    if (rb != cur) {
      bf16_block_pairs(ptr, idx, rb, bk, ncols, pairs);
      cur = rb;
    }
    const int64_t rend = std::min(r1, (rb + 1) * bo);
    const uint32_t* pw = pk + base[rb] * bo + (r - rb * bo);
    const int64_t np = int64_t(pairs.size());
    for (; r + 4 <= rend; r += 4, pw += 4) dp_rows<4>(pw, bo, pairs.data(), np, bt, ot + (r - r0) * T);
    for (; r < rend; ++r, ++pw) dp_rows<1>(pw, bo, pairs.data(), np, bt, ot + (r - r0) * T);
  }
}
#else
void bf16_panel_bsr_dp(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, const uint32_t*, const int64_t*,
                       int64_t, int64_t, const uint32_t*, float*, std::vector<int32_t>&) {}
#endif

}  // namespace sparsekern
