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

void bf16_lane_tile(const bf16* __restrict src, int64_t ld, int64_t nt, int64_t ncols, int64_t T,
                    uint16_t* __restrict dst) {
  // by blocks of 8 columns: each source row is read along its columns, each destination row is
  // written at 8 scattered positions per block, all inside a few cache lines
  for (int64_t c0 = 0; c0 < ncols; c0 += 8) {
    const int64_t c1 = std::min(ncols, c0 + 8);
    for (int64_t t = 0; t < nt; ++t) {
      const bf16* s = src + t * ld;
      uint16_t* d = dst + lane_pos(t);
      for (int64_t c = c0; c < c1; ++c) d[c * T] = s[c].bits;
    }
    for (int64_t t = nt; t < T; ++t) {
      uint16_t* d = dst + lane_pos(t);
      for (int64_t c = c0; c < c1; ++c) d[c * T] = 0;
    }
  }
}

#ifdef SPARSEKERN_BF16_X86
struct LaneInv {
  alignas(64) uint16_t v[32];
  LaneInv() {
    for (int t = 0; t < 32; ++t) v[lane_pos(t)] = uint16_t(t);
  }
};
const LaneInv kLaneInv;

// dst[lane_pos(t)] = src[t] by vpermw, 32 words per instruction (AVX512BW: the avx512_bf16 path
// has it).  idx[j] is the position t that lane_pos sends to j.
__attribute__((target("avx512f,avx512bw"))) void lane_order_bw(const uint16_t* __restrict src, int64_t T,
                                                               uint16_t* __restrict dst) {
  const __m512i idx = _mm512_load_si512(kLaneInv.v);
  for (int64_t t = 0; t < T; t += 32)
    _mm512_storeu_si512(dst + t, _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(src + t)));
}
#endif

#ifdef SPARSEKERN_BF16_X86
__attribute__((target("avx512f,avx512bw"))) void im2col_lane16_bw(const uint16_t* __restrict x, const ConvGeom& g,
                                                                  const Lane16Map& map, int64_t n0, int64_t T,
                                                                  uint16_t* __restrict bt) {
  const int64_t taps = g.kh * g.kw, HW = g.H * g.W;
  const __mmask32 plane = HW >= 32 ? ~__mmask32(0) : (__mmask32(1) << HW) - 1;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t m = 0; 32 * m < T; ++m) {
      const int64_t n = n0 + 2 * m;
      const __m512i a = n < g.N ? _mm512_maskz_loadu_epi16(plane, x + (n * g.C + c) * HW) : _mm512_setzero_si512();
      const __m512i b = n + 1 < g.N ? _mm512_maskz_loadu_epi16(plane, x + ((n + 1) * g.C + c) * HW)
                                    : _mm512_setzero_si512();
      uint16_t* d = bt + c * taps * T + 32 * m;
      for (int64_t tap = 0; tap < taps; ++tap, d += T) {
        const __m512i idx = _mm512_loadu_si512(map.idx + 32 * tap);
        _mm512_storeu_si512(d, _mm512_maskz_permutex2var_epi16(__mmask32(map.mask[tap]), a, idx, b));
      }
    }
}
#endif

bool bf16_im2col_lane16(const uint16_t* x, const ConvGeom& g, const Lane16Map& map, int64_t q0, int64_t T,
                        uint16_t* bt) {
#ifdef SPARSEKERN_BF16_X86
  if (bf16_path() == Bf16Path::DPBF16 && map.on && T % 32 == 0 && q0 % 32 == 0) {
    im2col_lane16_bw(x, g, map, q0 / 16, T, bt);
    return true;
  }
#endif
  (void)x, (void)g, (void)map, (void)q0, (void)T, (void)bt;
  return false;
}

#ifdef SPARSEKERN_BF16_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void col2im_lane16_bw(
    const float* __restrict ot, int64_t T, const ConvGeom& g, const Lane16Map& map, int64_t q0, int64_t nt, int64_t c0,
    int64_t c1, bf16* __restrict dx) {
  const int64_t taps = g.kh * g.kw, HW = g.H * g.W;
  const __mmask16 plane = __mmask16((uint32_t(1) << HW) - 1);
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t t = 0; t < nt; t += 16) {
      const int64_t n = (q0 + t) / 16;
      const float* o = ot + (c - c0) * taps * T + t;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t tap = 0; tap < taps; ++tap, o += T)
        acc = _mm512_add_ps(acc, _mm512_maskz_permutexvar_ps(__mmask16(map.cmask[tap]),
                                                              _mm512_load_si512(map.cidx + 16 * tap), _mm512_loadu_ps(o)));
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(dx + (n * g.C + c) * HW), plane,
                               (__m256i)_mm512_cvtneps_pbh(acc));
    }
}
#endif

bool bf16_col2im_lane16(const float* ot, int64_t T, const ConvGeom& g, const Lane16Map& map, int64_t q0, int64_t nt,
                        int64_t c0, int64_t c1, bf16* dx) {
#ifdef SPARSEKERN_BF16_X86
  if (bf16_path() == Bf16Path::DPBF16 && map.col_on && q0 % 16 == 0 && nt % 16 == 0) {
    col2im_lane16_bw(ot, T, g, map, q0, nt, c0, c1, dx);
    return true;
  }
#endif
  (void)ot, (void)T, (void)g, (void)map, (void)q0, (void)nt, (void)c0, (void)c1, (void)dx;
  return false;
}

LaneShiftMap::LaneShiftMap(const ConvGeom& g) {
  taps = g.kh * g.kw;
  P = g.Ho * g.Wo;
  on = g.sh == 1 && g.sw == 1 && g.Ho == g.H && g.Wo == g.W && P >= 32;
  if (!on) return;
  col_on = P % 16 == 0;
  words = (P + 31) / 32 + 1;
  shift.resize(taps);
  valid.assign(taps * words, 0);
  if (col_on) cmask.assign(taps * (P / 16), 0);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t tap = i * g.kw + j, di = i * g.dh - g.ph, dj = j * g.dw - g.pw;
      shift[tap] = di * g.W + dj;
      for (int64_t u = 0; u < P; ++u) {
        const int64_t oh = u / g.Wo, ow = u % g.Wo;
        if (oh + di >= 0 && oh + di < g.H && ow + dj >= 0 && ow + dj < g.W)
          valid[tap * words + u / 32] |= uint32_t(1) << (u % 32);
        const int64_t ih = u / g.W, iw = u % g.W;  // as an input entry (the planes have one size)
        if (col_on && ih - di >= 0 && ih - di < g.Ho && iw - dj >= 0 && iw - dj < g.Wo)
          cmask[tap * (P / 16) + u / 16] |= uint32_t(1) << (u % 16);
      }
    }
}

#ifdef SPARSEKERN_BF16_X86
__attribute__((target("avx512f,avx512bw"))) void im2col_shift_bw(const uint16_t* __restrict x, const ConvGeom& g,
                                                                 const LaneShiftMap& map, int64_t q0, int64_t T,
                                                                 uint16_t* __restrict bt) {
  const int64_t taps = map.taps, P = map.P;
  const __m512i perm = _mm512_load_si512(kLaneInv.v);
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t t = 0; t < T; t += 32) {
      const int64_t q = q0 + t, n = q / P, o = q % P, len = std::min<int64_t>(32, P - o);
      uint16_t* d = bt + c * taps * T + t;
      if (n >= g.N) {
        for (int64_t tap = 0; tap < taps; ++tap) _mm512_storeu_si512(d + tap * T, _mm512_setzero_si512());
        continue;
      }
      const uint16_t* plane = x + (n * g.C + c) * P + o;
      const bool next = len < 32 && n + 1 < g.N;  // the group runs into image n + 1
      const uint16_t* plane2 = next ? x + ((n + 1) * g.C + c) * P - len : nullptr;
      for (int64_t tap = 0; tap < taps; ++tap, d += T) {
        __m512i v = _mm512_maskz_loadu_epi16(__mmask32(map.bits(tap, o, len)), plane + map.shift[tap]);
        if (next)
          v = _mm512_or_si512(v, _mm512_maskz_loadu_epi16(__mmask32(map.bits(tap, 0, 32 - len) << len),
                                                         plane2 + map.shift[tap]));
        _mm512_storeu_si512(d, _mm512_permutexvar_epi16(perm, v));
      }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void col2im_shift_bw(
    const float* __restrict ot, int64_t T, const ConvGeom& g, const LaneShiftMap& map, int64_t q0, int64_t nt,
    int64_t c0, int64_t c1, bf16* __restrict dx) {
  const int64_t taps = map.taps, P = map.P, G = P / 16;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t t = 0; t < nt; t += P) {
      const int64_t n = (q0 + t) / P;
      const float* img = ot + (c - c0) * taps * T + t;
      uint16_t* d = reinterpret_cast<uint16_t*>(dx + (n * g.C + c) * P);
      for (int64_t k = 0; k < G; ++k) {
        __m512 acc = _mm512_setzero_ps();
        const float* o = img + 16 * k;
        for (int64_t tap = 0; tap < taps; ++tap, o += T)
          acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(__mmask16(map.cmask[tap * G + k]), o - map.shift[tap]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16 * k), (__m256i)_mm512_cvtneps_pbh(acc));
      }
    }
}
#endif

bool bf16_im2col_shift(const uint16_t* x, const ConvGeom& g, const LaneShiftMap& map, int64_t q0, int64_t T,
                       uint16_t* bt) {
#ifdef SPARSEKERN_BF16_X86
  if (bf16_path() == Bf16Path::DPBF16 && map.on && T % 32 == 0) {
    im2col_shift_bw(x, g, map, q0, T, bt);
    return true;
  }
#endif
  (void)x, (void)g, (void)map, (void)q0, (void)T, (void)bt;
  return false;
}

bool bf16_col2im_shift(const float* ot, int64_t T, const ConvGeom& g, const LaneShiftMap& map, int64_t q0, int64_t nt,
                       int64_t c0, int64_t c1, bf16* dx) {
#ifdef SPARSEKERN_BF16_X86
  if (bf16_path() == Bf16Path::DPBF16 && map.col_on && T % map.P == 0 && q0 % map.P == 0 && nt % map.P == 0) {
    col2im_shift_bw(ot, T, g, map, q0, nt, c0, c1, dx);
    return true;
  }
#endif
  (void)ot, (void)T, (void)g, (void)map, (void)q0, (void)nt, (void)c0, (void)c1, (void)dx;
  return false;
}

Lane16Map::Lane16Map(const ConvGeom& g) {
  const int64_t taps = g.kh * g.kw;
  on = g.Ho * g.Wo == 16 && g.H * g.W <= 32 && taps <= kMaxTaps;
  if (!on) return;
  col_on = g.H * g.W <= 16;
  if (col_on)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t tap = i * g.kw + j;
        uint32_t mk = 0;
        for (int64_t v = 0; v < 16; ++v) {
          const int64_t ih = v / g.W, iw = v % g.W, a = ih + g.ph - i * g.dh, b = iw + g.pw - j * g.dw;
          const bool ok = v < g.H * g.W && a >= 0 && b >= 0 && a % g.sh == 0 && b % g.sw == 0 && a / g.sh < g.Ho &&
                          b / g.sw < g.Wo;
          cidx[16 * tap + v] = ok ? int32_t((a / g.sh) * g.Wo + b / g.sw) : 0;
          if (ok) mk |= uint32_t(1) << v;
        }
        cmask[tap] = mk;
      }
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t tap = i * g.kw + j;
      uint32_t mk = 0;
      for (int64_t u = 0; u < 32; ++u) {
        const int64_t h = u / 16, p = u % 16, oh = p / g.Wo, ow = p % g.Wo;
        const int64_t ih = oh * g.sh - g.ph + i * g.dh, iw = ow * g.sw - g.pw + j * g.dw;
        const int64_t pos = lane_pos(u);
        const bool ok = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
        idx[32 * tap + pos] = uint16_t(ok ? h * 32 + ih * g.W + iw : 0);
        if (ok) mk |= uint32_t(1) << pos;
      }
      mask[tap] = mk;
    }
}

void bf16_lane_order(const uint16_t* __restrict src, int64_t T, uint16_t* __restrict dst) {
#ifdef SPARSEKERN_BF16_X86
  if (bf16_path() == Bf16Path::DPBF16) return lane_order_bw(src, T, dst);
#endif
  for (int64_t t = 0; t < T; ++t) dst[lane_pos(t)] = src[t];
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

// One row of an unstructured panel on a lane tile: the row's nonzeros go in pairs (a, b), the
// tile rows of a and b are interleaved word by word and dotted with the weight pair, so each
// vdpbf16ps adds two nonzeros' products.  A row with an odd count pairs its last nonzero with a
// zero weight.  Terms are added pair after pair in the row's order.
template <int NC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void csr_dp_row(
    const int32_t* __restrict cl, int64_t n, const uint32_t* __restrict w, const uint16_t* __restrict bt,
    float* __restrict o) {
  constexpr int64_t T = NC * 32;
  __m512 acc[2 * NC];
  for (int k = 0; k < 2 * NC; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t i = 0; 2 * i < n; ++i) {
    const int64_t ca = cl[2 * i], cb = 2 * i + 1 < n ? cl[2 * i + 1] : ca;
    const uint16_t* xa = bt + ca * T;
    const uint16_t* xb = bt + cb * T;
    const __m512bh wv = (__m512bh)_mm512_set1_epi32(int(w[i]));
    for (int k = 0; k < NC; ++k) {
      const __m512i a = _mm512_loadu_si512(xa + 32 * k), b = _mm512_loadu_si512(xb + 32 * k);
      acc[2 * k] = _mm512_dpbf16_ps(acc[2 * k], (__m512bh)_mm512_unpacklo_epi16(a, b), wv);
      acc[2 * k + 1] = _mm512_dpbf16_ps(acc[2 * k + 1], (__m512bh)_mm512_unpackhi_epi16(a, b), wv);
    }
  }
  for (int k = 0; k < 2 * NC; ++k) _mm512_storeu_ps(o + 16 * k, acc[k]);
}

// Four horizontal sums at once, added to out[0..3]: pairs folded before the in-register reduction.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void hsum4_add(__m512 a, __m512 b, __m512 c,
                                                                                      __m512 d, float* out) {
  // 16 -> 8 lanes each, two vectors per register
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // 8 -> 4: a, b, c, d each in one 128-bit lane
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  // 4 -> 1 inside each 128-bit lane
  __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  out[0] += t[0];
  out[1] += t[4];
  out[2] += t[8];
  out[3] += t[12];
}

// out[i] += dot(a, X_i) for i < n over NC * 32 bf16 (vdpbf16ps on pairs of positions, two
// chains), X_i = addr(i) (any alignment); four dots reduced together, the rest one by one.  Fixed
// order.  The dot loop of both bf16 weight-gradient kernels.
template <int NC, typename Addr>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void dot_rows_dp(const uint16_t* __restrict a,
                                                                                        int64_t n, Addr addr,
                                                                                        float* __restrict out) {
  __m512bh av[NC];
  for (int k = 0; k < NC; ++k) av[k] = (__m512bh)_mm512_loadu_si512(a + 32 * k);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m512 s[4], u[4];
    for (int q = 0; q < 4; ++q) {
      const uint16_t* x = addr(i + q);
      s[q] = _mm512_setzero_ps();
      u[q] = _mm512_setzero_ps();
      for (int k = 0; k + 1 < NC; k += 2) {
        s[q] = _mm512_dpbf16_ps(s[q], av[k], (__m512bh)_mm512_loadu_si512(x + 32 * k));
        u[q] = _mm512_dpbf16_ps(u[q], av[k + 1], (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
      }
      if (NC % 2) s[q] = _mm512_dpbf16_ps(s[q], av[NC - 1], (__m512bh)_mm512_loadu_si512(x + 32 * (NC - 1)));
      s[q] = _mm512_add_ps(s[q], u[q]);
    }
    hsum4_add(s[0], s[1], s[2], s[3], out + i);
  }
  for (; i < n; ++i) {
    const uint16_t* x = addr(i);
    __m512 s = _mm512_setzero_ps();
    for (int k = 0; k < NC; ++k) s = _mm512_dpbf16_ps(s, av[k], (__m512bh)_mm512_loadu_si512(x + 32 * k));
    out[i] += _mm512_reduce_add_ps(s);
  }
}

// sddmm rows on lane tiles: X_i = bt + cl[i] * T, T = NC * 32.
template <int NC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void sddmm_dp_row(
    const uint16_t* __restrict a, const int32_t* __restrict cl, int64_t n, const uint16_t* __restrict bt,
    float* __restrict out) {
  dot_rows_dp<NC>(a, n, [&](int64_t i) { return bt + int64_t(cl[i]) * (NC * 32); }, out);
}

// Direct conv2d rows on bf16 planes: pair i of a row multiplies the views at offsets off[2i] and
// off[2i + 1] (any alignment) by the weight pair w[i].  The interleave leaves the positions of
// each 32 in lane order (lane_pos); the stores put them back in order.
template <int NC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void direct_dp_row(
    const int64_t* __restrict off, int64_t np, const uint32_t* __restrict w, const uint16_t* __restrict x,
    float* __restrict o) {
  __m512 acc[2 * NC];
  for (int k = 0; k < 2 * NC; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < np; ++i) {
    const uint16_t* xa = x + off[2 * i];
    const uint16_t* xb = x + off[2 * i + 1];
    const __m512bh wv = (__m512bh)_mm512_set1_epi32(int(w[i]));
    for (int k = 0; k < NC; ++k) {
      const __m512i a = _mm512_loadu_si512(xa + 32 * k), b = _mm512_loadu_si512(xb + 32 * k);
      acc[2 * k] = _mm512_dpbf16_ps(acc[2 * k], (__m512bh)_mm512_unpacklo_epi16(a, b), wv);
      acc[2 * k + 1] = _mm512_dpbf16_ps(acc[2 * k + 1], (__m512bh)_mm512_unpackhi_epi16(a, b), wv);
    }
  }
  // lo holds positions 0-3, 8-11, 16-19, 24-27 of its 32 (one group of 4 per 128-bit lane), hi the others
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int k = 0; k < NC; ++k) {
    _mm512_storeu_ps(o + 32 * k, _mm512_permutex2var_ps(acc[2 * k], first, acc[2 * k + 1]));
    _mm512_storeu_ps(o + 32 * k + 16, _mm512_permutex2var_ps(acc[2 * k], second, acc[2 * k + 1]));
  }
}

// direct conv2d weight-gradient rows: X_i = x + off[i] (shifted views, any alignment).
template <int NC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void direct_sddmm_dp_row(
    const uint16_t* __restrict a, const int64_t* __restrict off, int64_t n, const uint16_t* __restrict x,
    float* __restrict out) {
  dot_rows_dp<NC>(a, n, [&](int64_t i) { return x + off[i]; }, out);
}

}  // namespace

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_round_row(const float* s, float add,
                                                                                    int64_t n, bf16* dst) {
  const __m512 b = _mm512_set1_ps(add);
  int64_t q = 0;
  for (; q + 16 <= n; q += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + q),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(s + q), b)));
  if (q < n) {
    const __mmask16 m = __mmask16((1u << (n - q)) - 1);
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_maskz_loadu_ps(m, s + q), b));
    _mm256_mask_storeu_epi16(dst + q, m, (__m256i)v);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_round_runs(
    const float* ot, int64_t T, int64_t rows, const float* bias, const Bf16Run* runs, int64_t nruns, bf16* y,
    int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t i = 0; i < nruns; ++i)
      bf16_round_row(ot + r * T + runs[i].t, b, runs[i].len, y + r * row_stride + runs[i].dst);
  }
}

void bf16_direct_dp(const int64_t* pptr, const int64_t* off, const uint32_t* w, int64_t r0, int64_t r1, int64_t T,
                    const uint16_t* x, float* ot) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p0 = pptr[r], np = pptr[r + 1] - p0;
    float* o = ot + (r - r0) * T;
    if (T == 128)
      direct_dp_row<4>(off + 2 * p0, np, w + p0, x, o);
    else
      direct_dp_row<2>(off + 2 * p0, np, w + p0, x, o);
  }
}

void bf16_direct_sddmm_dp(const int64_t* ptr, const int64_t* off, int64_t r0, int64_t r1, int64_t T,
                          const uint16_t* a, int64_t lda, const uint16_t* x, float* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = ptr[r], n = ptr[r + 1] - b;
    if (n == 0) continue;
    if (T == 128)
      direct_sddmm_dp_row<4>(a + r * lda, off + b, n, x, acc + b);
    else
      direct_sddmm_dp_row<2>(a + r * lda, off + b, n, x, acc + b);
  }
}

void bf16_panel_csr_dp(const int32_t* ptr, const int32_t* idx, const int64_t* pbase, const uint32_t* pk, int64_t r0,
                       int64_t r1, int64_t T, const uint16_t* bt, float* ot) {
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* cl = idx + ptr[r];
    const int64_t n = ptr[r + 1] - ptr[r];
    float* o = ot + (r - r0) * T;
    if (T == 128)
      csr_dp_row<4>(cl, n, pk + pbase[r], bt, o);
    else if (T == 96)
      csr_dp_row<3>(cl, n, pk + pbase[r], bt, o);
    else if (T == 64)
      csr_dp_row<2>(cl, n, pk + pbase[r], bt, o);
    else
      csr_dp_row<1>(cl, n, pk + pbase[r], bt, o);
  }
}

void bf16_sddmm_dp(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols, int64_t r0,
                   int64_t r1, int64_t T, const uint16_t* at, const uint16_t* bt, float* acc, const int64_t* base,
                   std::vector<int32_t>& cols) {
  const bool unstructured = bo == 1 && bk == 1;
  int64_t cur = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* cl;
    int64_t nc;
    if (unstructured) {
      cl = idx + ptr[r];
      nc = ptr[r + 1] - ptr[r];
    } else {
      const int64_t rb = r / bo;
      if (rb != cur) {
        block_row_columns(ptr, idx, rb, bk, ncols, cols);
        cur = rb;
      }
      cl = cols.data();
      nc = int64_t(cols.size());
    }
    if (nc == 0) continue;
    const uint16_t* a = at + (r - r0) * T;
    float* out = acc + base[r];
    if (T == 256)
      sddmm_dp_row<8>(a, cl, nc, bt, out);
    else if (T == 128)
      sddmm_dp_row<4>(a, cl, nc, bt, out);
    else if (T == 96)
      sddmm_dp_row<3>(a, cl, nc, bt, out);
    else if (T == 64)
      sddmm_dp_row<2>(a, cl, nc, bt, out);
    else
      sddmm_dp_row<1>(a, cl, nc, bt, out);
  }
}

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
void bf16_panel_csr_dp(const int32_t*, const int32_t*, const int64_t*, const uint32_t*, int64_t, int64_t, int64_t,
                       const uint16_t*, float*) {}
void bf16_sddmm_dp(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                   const uint16_t*, const uint16_t*, float*, const int64_t*, std::vector<int32_t>&) {}
void bf16_direct_dp(const int64_t*, const int64_t*, const uint32_t*, int64_t, int64_t, int64_t, const uint16_t*,
                    float*) {}
void bf16_round_row(const float* s, float add, int64_t n, bf16* dst) {
  for (int64_t q = 0; q < n; ++q) store(dst[q], s[q] + add);
}
void bf16_round_runs(const float* ot, int64_t T, int64_t rows, const float* bias, const Bf16Run* runs,
                     int64_t nruns, bf16* y, int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < nruns; ++i)
      bf16_round_row(ot + r * T + runs[i].t, bias ? bias[r] : 0.0f, runs[i].len, y + r * row_stride + runs[i].dst);
}
void bf16_direct_sddmm_dp(const int64_t*, const int64_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                          const uint16_t*, float*) {}
#endif

}  // namespace sparsekern
