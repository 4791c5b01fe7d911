// Index metadata from boolean masks, and the in-place mask update behind set_mask: the work a
// mask change costs before the next step (sparsekern/formats.py is the specification; its
// pure-PyTorch builders stay as the fallback and the reference the tests compare with).
//
//   csr_from_mask(mask, dtype)   CSR + CSC + transpose_perm of a 2-D bool matrix, exactly the
//                                tensors formats._build_csr_torch returns;
//   tile_any_all(mask, bo, bk)   per tile of the padded matrix: any entry set / every entry set
//                                (a tile is constant iff both agree; padding is not part of a tile);
//   update_masks_(...)           set_mask / set_grad_mask in one pass over the masks and weight;
//   csr_windows(crow, col, n, w) the window-major copy of a CSR pattern (the linear kernels' L1
//                                path, linear.cpp), two parallel passes over the rows.
//
// Any nonzero byte of a mask counts as True.  Work is split into row (or element) ranges with
// at::parallel_for; each output element has one writer and a fixed position, so the results do
// not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

// The byte loops below vectorize far better with AVX2 than with baseline x86-64; GCC compiles
// both versions of the functions marked so and picks one when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SPARSEKERN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPARSEKERN_CLONES
#endif
// what a cloned function calls must be inlined into it to be compiled for its target
#if defined(__GNUC__)
#define SPARSEKERN_INLINE inline __attribute__((always_inline))
#else
#define SPARSEKERN_INLINE inline
#endif

namespace sparsekern {
namespace {

using at::Tensor;

constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL;
constexpr uint64_t kHigh = 0x8080808080808080ULL;

SPARSEKERN_INLINE uint64_t load8(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// The high bit of each byte of w that is not zero.
SPARSEKERN_INLINE uint64_t nonzero_bytes(uint64_t w) { return (((w & kLow7) + kLow7) | w) & kHigh; }

// Byte k of w nonzero -> bit k of the result (the bytes' high bits gathered by one multiply).
SPARSEKERN_INLINE unsigned byte_bits(uint64_t w) {
  return unsigned(((nonzero_bytes(w) >> 7) * 0x0102040810204080ULL) >> 56);
}

// For each set of 8 lanes (a byte_bits value): how many, and their positions in ascending order.
struct LaneTable {
  uint8_t count[256];
  int32_t pos[256][8];
  LaneTable() {
    for (int v = 0; v < 256; ++v) {
      int n = 0;
      for (int k = 0; k < 8; ++k)
        if (v >> k & 1) pos[v][n++] = k;
      for (int k = n; k < 8; ++k) pos[v][k] = 0;
      count[v] = uint8_t(n);
    }
  }
};
const LaneTable kLanes;

// A 1-D output of n elements.  Fresh memory of many megabytes faults in page by page as it is
// first written, and in a virtual machine those faults can cost more than building the
// metadata: the 2 MiB-aligned interior is offered as transparent huge pages (a hint; nothing
// changes where the system declines it or the memory was already mapped).
Tensor empty_output(int64_t n, const at::TensorOptions& opt) {
  Tensor t = at::empty({n}, opt);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = uintptr_t(1) << 21;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t hi = lo + uintptr_t(n) * uintptr_t(t.element_size());
  const uintptr_t first = (lo + kPage - 1) / kPage * kPage, last = hi / kPage * kPage;
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

void check_bool_matrix(const Tensor& mask, const char* name) {
  TORCH_CHECK(mask.device().is_cpu(), name, ": expected a CPU tensor, got one on ", mask.device());
  TORCH_CHECK(mask.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ", mask.layout());
  TORCH_CHECK(mask.scalar_type() == at::kBool, name, ": expected dtype torch.bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, name,
              ": expected a 2-D [rows, cols] tensor (conv masks viewed as [out, rest]), got shape ", mask.sizes());
}

// ---------------------------------------------------------------------------------------------
// csr_from_mask
// ---------------------------------------------------------------------------------------------

// Entries of rows [r0, r1) (into nrow[r]) and of each column (added to cc[j], int32: fewer than
// 2^31 rows per call).  acc: C bytes of scratch, per-column counts of up to 255 rows.
SPARSEKERN_CLONES void count_rows(const uint8_t* m, int64_t C, int64_t r0, int64_t r1, int64_t* nrow, int32_t* cc,
                                  uint8_t* acc) {
  constexpr int kWidth = 32;  // one vector of byte counters per row, flushed before they overflow
  for (int64_t g = r0; g < r1; g += 255) {
    std::memset(acc, 0, size_t(C));
    for (int64_t r = g; r < std::min(r1, g + 255); ++r) {
      const uint8_t* p = m + r * C;
      uint8_t lanes[kWidth] = {};
      uint64_t n = 0;
      int64_t j = 0, k = 0;
      for (; j + kWidth <= C; j += kWidth) {
        for (int t = 0; t < kWidth; ++t) {
          const uint8_t v = p[j + t] != 0;
          acc[j + t] += v;
          lanes[t] += v;
        }
        if (++k == 255) {
          for (int t = 0; t < kWidth; ++t) n += lanes[t];
          std::memset(lanes, 0, sizeof(lanes));
          k = 0;
        }
      }
      for (int t = 0; t < kWidth; ++t) n += lanes[t];
      for (; j < C; ++j) {
        const uint8_t v = p[j] != 0;
        acc[j] += v;
        n += v;
      }
      nrow[r] = int64_t(n);
    }
    for (int64_t j = 0; j < C; ++j) cc[j] += acc[j];
  }
}

#if defined(__GNUC__)
// 8 int32 lanes, unaligned: one vector store (two with SSE2) in the GCC vector extension
typedef int32_t Lanes8 __attribute__((vector_size(32), aligned(4), may_alias));
SPARSEKERN_INLINE void store_lanes(int32_t* out, const int32_t* pos, int32_t base) {
  *reinterpret_cast<Lanes8*>(out) = *reinterpret_cast<const Lanes8*>(pos) + base;
}
#else
SPARSEKERN_INLINE void store_lanes(int32_t* out, const int32_t* pos, int32_t base) {
  for (int k = 0; k < 8; ++k) out[k] = base + pos[k];
}
#endif
SPARSEKERN_INLINE void store_lanes(int64_t* out, const int32_t* pos, int64_t base) {
  for (int k = 0; k < 8; ++k) out[k] = base + pos[k];
}

// Writes the columns of row p[0, C) ascending from out on, and sets bstart[b * stride], for each
// band b of `band` columns (a multiple of 8), to the position of the row's first entry in
// columns >= b * band.  Each word of 8 bytes stores 8 lanes and advances by its count, so up to 7
// entries past the row's end are scribbled on (and overwritten by the next row); `limit` is where
// that must stop.  Sparse: skip all-zero words.
template <bool Sparse, typename I>
SPARSEKERN_INLINE I* fill_row(const uint8_t* p, int64_t C, I* out, I* limit, const I* base, I* bstart,
                              int64_t stride, int64_t band, int64_t nb) {
  const int64_t C8 = C / 8 * 8;
  int64_t i = 0;
  for (int64_t b = 0; b < nb; ++b) {
    bstart[b * stride] = I(out - base);
    for (const int64_t e = std::min(C8, (b + 1) * band); i < e; i += 8) {
      const uint64_t w = load8(p + i);
      if (Sparse && !w) continue;
      const unsigned v = byte_bits(w);
      if (out + 8 <= limit) {
        store_lanes(out, kLanes.pos[v], I(i));
        out += kLanes.count[v];
      } else {
        for (unsigned h = v; h; h &= h - 1) *out++ = I(i + __builtin_ctz(h));
      }
    }
  }
  for (; i < C; ++i)  // the last bytes, in the last band
    if (p[i]) *out++ = I(i);
  return out;
}

template <typename I>
struct FillRows {
  static SPARSEKERN_INLINE void run(const uint8_t* m, int64_t C, int64_t r0, int64_t r1, const int64_t* ptr, I* col,
                                    I* bstart, int64_t R, int64_t band, int64_t nb) {
    I* const limit = col + ptr[r1];
    for (int64_t r = r0; r < r1; ++r) {
      // below 1/64 density most words are zero and skipping them pays for the branch; above,
      // the branch is a coin flip and storing zero lanes is cheaper
      if ((ptr[r + 1] - ptr[r]) * 64 < C)
        fill_row<true, I>(m + r * C, C, col + ptr[r], limit, col, bstart + r, R, band, nb);
      else
        fill_row<false, I>(m + r * C, C, col + ptr[r], limit, col, bstart + r, R, band, nb);
    }
  }
};

SPARSEKERN_CLONES void fill_rows32(const uint8_t* m, int64_t C, int64_t r0, int64_t r1, const int64_t* ptr,
                                   int32_t* col, int32_t* bstart, int64_t R, int64_t band, int64_t nb) {
  FillRows<int32_t>::run(m, C, r0, r1, ptr, col, bstart, R, band, nb);
}

template <typename I>
void fill_rows(const uint8_t* m, int64_t C, int64_t r0, int64_t r1, const int64_t* ptr, I* col, I* bstart, int64_t R,
               int64_t band, int64_t nb) {
  if constexpr (std::is_same_v<I, int32_t>)
    fill_rows32(m, C, r0, r1, ptr, col, bstart, R, band, nb);
  else
    FillRows<I>::run(m, C, r0, r1, ptr, col, bstart, R, band, nb);
}

// Row ranges [bounds[p], bounds[p+1]) of roughly equal cost (bytes scanned plus entries written).
std::vector<int64_t> balanced_rows(const std::vector<int64_t>& ptr, int64_t rows, int64_t cols, int64_t parts) {
  const int64_t words = (cols + 7) / 8 + 1;
  const auto cost = [&](int64_t r) { return ptr[r] + r * words; };
  std::vector<int64_t> b(parts + 1, rows);
  b[0] = 0;
  const int64_t total = cost(rows);
  int64_t r = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total / parts * p + (total % parts) * p / parts;
    while (r < rows && cost(r) < target) ++r;
    b[p] = r;
  }
  return b;
}

// Columns per band of the CSC pass (a multiple of 8): a band writes 2 x band output streams at a
// time, few enough pages for the TLB (one stream per column of a wide matrix thrashes it).
constexpr int64_t kBand = 64;

template <typename I>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> csr_impl(const uint8_t* m, int64_t R, int64_t C,
                                                            at::TensorOptions opt) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // 1. entries per row and per column, the columns counted per part of the rows (int32)
  const int64_t cparts = std::max<int64_t>(std::min<int64_t>(threads, std::max<int64_t>(R, 1)), (R >> 30) + 1);
  std::vector<int64_t> ptr(R + 1, 0);
  std::vector<int32_t> ccnt(size_t(cparts) * size_t(C), 0);
  at::parallel_for(0, cparts, 1, [&](int64_t q0, int64_t q1) {
    std::vector<uint8_t> acc(static_cast<size_t>(C));
    for (int64_t q = q0; q < q1; ++q)
      count_rows(m, C, R * q / cparts, R * (q + 1) / cparts, ptr.data() + 1, ccnt.data() + q * C, acc.data());
  });
  for (int64_t r = 0; r < R; ++r) ptr[r + 1] += ptr[r];
  const int64_t nnz = ptr[R];
  TORCH_CHECK(nnz <= int64_t(std::numeric_limits<I>::max()), "dtype: ", nnz,
              " nonzeros overflow the requested index dtype; use int64");
  Tensor crow = at::empty({R + 1}, opt), col = empty_output(nnz, opt);
  Tensor ccol = at::empty({C + 1}, opt), rowt = empty_output(nnz, opt), perm = empty_output(nnz, opt);
  I* pc = crow.data_ptr<I>();
  for (int64_t r = 0; r <= R; ++r) pc[r] = I(ptr[r]);
  I* pcc = ccol.data_ptr<I>();
  int64_t run = 0;
  for (int64_t j = 0; j < C; ++j) {
    pcc[j] = I(run);
    for (int64_t q = 0; q < cparts; ++q) run += ccnt[q * C + j];
  }
  pcc[C] = I(run);

  // Bands of columns, wider than kBand only where the band table would get large (2^23 entries).
  const int64_t min_band = (C + 1) / std::max<int64_t>(1, (int64_t(1) << 23) / std::max<int64_t>(R, 1)) + 1;
  const int64_t band = std::max<int64_t>(kBand, (min_band + 7) / 8 * 8);
  const int64_t nb = std::max<int64_t>(1, (C + band - 1) / band);
  // bstart[b * R + r]: CSR position of row r's first entry in band b or later
  std::vector<I> bstart(size_t(nb) * size_t(R));

  // 2. CSR columns
  I* pcol = col.data_ptr<I>();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, R));
  const std::vector<int64_t> bounds = balanced_rows(ptr, R, C, parts);
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      fill_rows<I>(m, C, bounds[q], bounds[q + 1], ptr.data(), pcol, bstart.data(), R, band, nb);
  });

  // 3. CSC rows and the CSR position of each CSC entry, band by band: walking the rows in order
  //    appends to each column of the band in ascending row order
  I* prow = rowt.data_ptr<I>();
  I* pperm = perm.data_ptr<I>();
  constexpr int64_t kAhead = 8, kLine = 64 / sizeof(I);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> slot(band);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * band;
      for (int64_t j = c0; j < std::min(C, c0 + band); ++j) slot[j - c0] = pcc[j];
      const I* start = bstart.data() + b * R;
      const I* stop = b + 1 < nb ? start + R : nullptr;
      for (int64_t r = 0; r < R; ++r) {
        // the rows' segments lie far apart and each column's output is a stream of its own:
        // fetch a few rows ahead, and each stream's next line before it is written
        if (r + kAhead < R) __builtin_prefetch(pcol + start[r + kAhead]);
        const int64_t e = stop ? int64_t(stop[r]) : ptr[r + 1];
        for (int64_t k = start[r]; k < e; ++k) {
          const int64_t s = slot[pcol[k] - c0]++;
          __builtin_prefetch(prow + s + kLine, 1);
          __builtin_prefetch(pperm + s + kLine, 1);
          prow[s] = I(r);
          pperm[s] = I(k);
        }
      }
    }
  });
  return {crow, col, ccol, rowt, perm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> csr_from_mask(const Tensor& mask, at::ScalarType dtype) {
  check_bool_matrix(mask, "mask");
  TORCH_CHECK(dtype == at::kInt || dtype == at::kLong, "dtype: expected torch.int32 or torch.int64, got ", dtype);
  const int64_t R = mask.size(0), C = mask.size(1);
  if (dtype == at::kInt) {
    TORCH_CHECK(R < std::numeric_limits<int32_t>::max() && C < std::numeric_limits<int32_t>::max(), "dtype: a ", R,
                "x", C, " matrix overflows int32 indices; use int64");
  }
  const Tensor mc = mask.contiguous();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>());
  const auto opt = at::TensorOptions().dtype(dtype).device(at::kCPU);
  return dtype == at::kInt ? csr_impl<int32_t>(m, R, C, opt) : csr_impl<int64_t>(m, R, C, opt);
}

std::tuple<Tensor, Tensor> tile_any_all(const Tensor& mask, int64_t bo, int64_t bk) {
  check_bool_matrix(mask, "mask");
  TORCH_CHECK(bo >= 1 && bk >= 1, "bo, bk: expected positive tile sides, got ", bo, ", ", bk);
  const int64_t R = mask.size(0), C = mask.size(1);
  const int64_t rb = (R + bo - 1) / bo, cb = (C + bk - 1) / bk;
  const Tensor mc = mask.contiguous();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>());
  Tensor any = at::zeros({rb, cb}, mask.options());
  Tensor all = at::ones({rb, cb}, mask.options());
  bool* pa = any.data_ptr<bool>();
  bool* pl = all.data_ptr<bool>();
  at::parallel_for(0, rb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      bool* a = pa + i * cb;
      bool* l = pl + i * cb;
      for (int64_t r = i * bo; r < std::min(R, (i + 1) * bo); ++r) {
        const uint8_t* row = m + r * C;
        for (int64_t j = 0; j < cb; ++j) {
          const int64_t c0 = j * bk, c1 = std::min(C, c0 + bk);
          uint64_t some = 0, every = kHigh;  // OR of the words; AND of their nonzero lanes
          int64_t c = c0;
          for (; c + 8 <= c1; c += 8) {
            const uint64_t w = load8(row + c);
            some |= w;
            every &= nonzero_bytes(w);
          }
          for (; c < c1; ++c) {
            some |= row[c];
            every &= row[c] ? kHigh : 0;
          }
          a[j] = a[j] || some != 0;
          l[j] = l[j] && every == kHigh;
        }
      }
    }
  });
  return {any, all};
}

// One line (64 bytes) of the masks at a time: every operation is a byte lane operation, so the
// loops vectorize; a line is stored only if it changes (a mask update usually moves a few
// connections, and lines that are not written are not dirtied).  Returns the OR of G ^ M.
template <bool HasGrad>
SPARSEKERN_INLINE uint8_t update_lines(const uint8_t* nm, uint8_t* M, uint8_t* G, const uint8_t* gn, int64_t n) {
  constexpr int64_t kL = 64;
  uint8_t diff = 0;
  int64_t i = 0;
  for (; i + kL <= n; i += kL) {
    uint8_t k[kL], g[kL], cm = 0, cg = 0;
    for (int64_t t = 0; t < kL; ++t) {
      k[t] = nm[i + t] != 0;
      const uint8_t mo = M[i + t] != 0, go = G[i + t] != 0;
      g[t] = HasGrad ? uint8_t(gn[i + t] != 0) : uint8_t(k[t] & (go | (mo ^ 1)));
      diff |= g[t] ^ k[t];
      cm |= k[t] ^ M[i + t];
      cg |= g[t] ^ G[i + t];
    }
    if (cm) std::memcpy(M + i, k, kL);
    if (cg) std::memcpy(G + i, g, kL);
  }
  for (; i < n; ++i) {
    const uint8_t k = nm[i] != 0, mo = M[i] != 0, go = G[i] != 0;
    const uint8_t g = HasGrad ? uint8_t(gn[i] != 0) : uint8_t(k & (go | (mo ^ 1)));
    diff |= g ^ k;
    M[i] = k;
    G[i] = g;
  }
  return diff;
}

// w[i] := +0 wherever keep[i] is 0, 64 elements at a time, storing only blocks that hold a
// nonzero outside keep (already-pruned weights are read, not rewritten).  E: an unsigned type of
// the weight's size (+0 is all zero bits in every floating format).
template <typename E>
SPARSEKERN_INLINE void zero_outside(E* w, const uint8_t* keep, int64_t n) {
  constexpr int64_t kB = 64;
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    E stray = 0;
    for (int64_t t = 0; t < kB; ++t) stray |= w[i + t] & (keep[i + t] ? E(0) : ~E(0));
    if (stray)
      for (int64_t t = 0; t < kB; ++t) w[i + t] &= keep[i + t] ? ~E(0) : E(0);
  }
  for (; i < n; ++i)
    if (!keep[i]) w[i] = 0;
}

SPARSEKERN_CLONES uint8_t update_range(const uint8_t* nm, uint8_t* M, uint8_t* G, const uint8_t* gn, void* w,
                                       int64_t esize, int64_t n) {
  const uint8_t diff = gn ? update_lines<true>(nm, M, G, gn, n) : update_lines<false>(nm, M, G, gn, n);
  switch (esize) {
    case 2: zero_outside(static_cast<uint16_t*>(w), nm, n); break;
    case 4: zero_outside(static_cast<uint32_t*>(w), nm, n); break;
    case 8: zero_outside(static_cast<uint64_t*>(w), nm, n); break;
    default: break;
  }
  return diff;
}

void check_flat(const Tensor& t, const char* name, int64_t numel, bool is_bool) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous(), name,
              ": expected a contiguous CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got ", t.numel());
  if (is_bool) TORCH_CHECK(t.scalar_type() == at::kBool, name, ": expected dtype torch.bool, got ", t.scalar_type());
}

// set_mask / set_grad_mask in place.  With new_grad: G := new_grad if it is a subset of mask;
// without: G := mask & (G | ~M) (kept connections keep their status, new ones are trainable).
// Then M := mask, and with zero_pruned the weight is zeroed outside mask.  Returns 0 (new_grad
// is not a subset of mask: nothing written), 1 (G != M afterwards) or 2 (G == M).
int64_t update_masks_(const Tensor& weight, const Tensor& weight_mask, const Tensor& grad_mask, const Tensor& mask,
                      const c10::optional<Tensor>& new_grad, bool zero_pruned) {
  const int64_t n = mask.numel();
  check_flat(mask, "mask", n, true);
  check_flat(weight_mask, "weight_mask", n, true);
  check_flat(grad_mask, "grad_mask", n, true);
  const bool has_grad = new_grad.has_value() && new_grad->defined();
  if (has_grad) check_flat(*new_grad, "new_grad", n, true);
  if (zero_pruned) {
    check_flat(weight, "weight", n, false);
    TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight: expected a floating dtype, got ",
                weight.scalar_type());
    const int64_t es = weight.element_size();
    TORCH_CHECK(es == 2 || es == 4 || es == 8, "weight: unsupported element size ", es);
  }
  const uint8_t* nm = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint8_t* M = reinterpret_cast<uint8_t*>(weight_mask.data_ptr<bool>());
  uint8_t* G = reinterpret_cast<uint8_t*>(grad_mask.data_ptr<bool>());
  const uint8_t* gn = has_grad ? reinterpret_cast<const uint8_t*>(new_grad->data_ptr<bool>()) : nullptr;
  constexpr int64_t kGrain = int64_t(1) << 16;
  if (gn) {
    std::atomic<bool> outside{false};
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      uint64_t acc = 0;
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) acc |= load8(gn + i) & ~load8(nm + i);
      for (; i < i1; ++i) acc |= gn[i] & ~nm[i];
      if (acc) outside.store(true, std::memory_order_relaxed);
    });
    if (outside.load()) return 0;
  }
  std::atomic<bool> differ{false};
  const int64_t esize = zero_pruned ? weight.element_size() : 0;
  void* w = zero_pruned ? weight.data_ptr() : nullptr;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    uint8_t* wi = w ? static_cast<uint8_t*>(w) + i0 * esize : nullptr;
    if (update_range(nm + i0, M + i0, G + i0, gn ? gn + i0 : nullptr, wi, esize, i1 - i0))
      differ.store(true, std::memory_order_relaxed);
  });
  return differ.load() ? 1 : 2;
}


// ---------------------------------------------------------------------------------------------
// csr_windows
// ---------------------------------------------------------------------------------------------

// Window-major copy of a CSR pattern [R, ncols] whose columns are cut into windows of `window`:
// wptr [nw * (R + 1)] (window w, row r: entries wptr[w * (R + 1) + r] .. wptr[w * (R + 1) + r + 1]
// of widx) and widx [nnz] (the columns).  Two passes over the rows, both split between threads:
// entries per (window, row), an exclusive scan of those counts in window-major order (serial,
// nw * (R + 1) adds), then each row scatters its columns to its windows' slots.
std::tuple<Tensor, Tensor> csr_windows(const Tensor& crow, const Tensor& col, int64_t ncols, int64_t window) {
  TORCH_CHECK(window > 0, "window: expected a positive number of columns, got ", window);
  TORCH_CHECK(ncols >= 0, "ncols: expected a non-negative number of columns, got ", ncols);
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, "crow_indices: expected a 1-D tensor of rows + 1 entries, got shape ",
              crow.sizes());
  const int64_t R = crow.numel() - 1;
  check_compressed(crow, col, R, ncols, "crow_indices", "col_indices");
  const int64_t nw = std::max<int64_t>(1, cdiv(ncols, window));
  const int64_t stride = R + 1;
  TORCH_CHECK(nw * stride < (int64_t(1) << 31), "window: ", nw, " windows of ", stride,
              " row pointers overflow int32; use a wider window");
  const int32_t* ptr = crow.data_ptr<int32_t>();
  const int32_t* idx = col.data_ptr<int32_t>();
  Tensor wptr = at::zeros({nw * stride}, crow.options());
  Tensor widx = empty_output(col.numel(), col.options());
  int32_t* wp = wptr.data_ptr<int32_t>();
  int32_t* wi = widx.data_ptr<int32_t>();
  constexpr int64_t kGrain = 256;
  // a row's columns ascend, so its windows are consecutive runs, found by comparing (no division)
  at::parallel_for(0, R, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int32_t j = ptr[r];
      const int32_t e = ptr[r + 1];
      for (int64_t w = 0, cend = window; j < e; ++w, cend += window) {
        const int32_t start = j;
        while (j < e && idx[j] < cend) ++j;
        wp[w * stride + r] = j - start;
      }
    }
  });
  int64_t run = 0;  // exclusive scan; slot R of each window holds 0, so it becomes the window's end
  for (int64_t i = 0; i < nw * stride; ++i) {
    const int64_t n = wp[i];
    wp[i] = int32_t(run);
    run += n;
  }
  at::parallel_for(0, R, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int32_t j = ptr[r];
      const int32_t e = ptr[r + 1];
      for (int64_t w = 0, cend = window; j < e; ++w, cend += window)
        for (int32_t* out = wi + wp[w * stride + r]; j < e && idx[j] < cend; ++j) *out++ = idx[j];
    }
  });
  return {wptr, widx};
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("csr_from_mask(Tensor mask, ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("tile_any_all(Tensor mask, int bo, int bk) -> (Tensor, Tensor)");
  m.def(
      "update_masks_(Tensor(a!) weight, Tensor(b!) weight_mask, Tensor(c!) grad_mask, Tensor mask, "
      "Tensor? new_grad, bool zero_pruned) -> int");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("csr_from_mask", &sparsekern::csr_from_mask);
  m.impl("tile_any_all", &sparsekern::tile_any_all);
  m.impl("update_masks_", &sparsekern::update_masks_);
  m.impl("csr_windows", &sparsekern::csr_windows);
}
