// The op layer shared by the CPU op files (linear.cpp, conv2d.cpp, dwconv2d.cpp): argument checks,
// per-thread scratch memory, work splitting, and the sparse operand of the panel kernels.
//
// Every op takes the dense weight plus the index metadata of its pattern (int32 CSR, see
// sparsekern/formats.py) and reads only the weight entries inside the pattern.  `block` is the
// tile (bo, bk) of a block pattern in matrix units; (1, 1) is the unstructured layout, whose
// metadata is plain CSR over elements.  For the input gradients the metadata is the transposed one
// (CSC: ccol_indices / row_indices).
//
// Threading uses at::parallel_for (so torch.set_num_threads applies).  Work is split so that each
// output element is computed by one task in a fixed order: results are bit-identical for any
// thread count.
//
// Included by several translation units: everything here is a template or `inline` (one definition
// program-wide; in particular one scratch pool per thread, shared by all ops).
#pragma once

// The per-operator ATen headers, not ATen/ATen.h: it doubles the compile time of every op file.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <utility>
#include <vector>

#include "cpu/kernels.h"

namespace sparsekern {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// checks
// ---------------------------------------------------------------------------------------------

inline void check_float(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, name,
              ": expected dtype float32, float64 or bfloat16, got ", st);
}

// Runs f(S{}, W{}) for a tensor of dtype t: S the compute type, W the storage (bf16 computes in
// float: widened on load, rounded once on store).
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kDouble:
      return f(double{}, double{});
    case at::kBFloat16:
      return f(float{}, bf16{});
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

// The data of a tensor of storage type W (bf16: the bits of at::BFloat16).
template <typename W>
W* data_of(const Tensor& t) {
  if constexpr (std::is_same_v<W, bf16>) {
    static_assert(sizeof(at::BFloat16) == sizeof(bf16));
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  } else {
    return t.data_ptr<W>();
  }
}

// A bias of storage W as S values (widened into `tmp` for bf16), nullptr when undefined.
template <typename S, typename W>
const S* bias_values(const Tensor& bias, std::vector<S>& tmp) {
  if (!bias.defined()) return nullptr;
  if constexpr (std::is_same_v<S, W>) {
    return bias.data_ptr<S>();
  } else {
    const W* b = data_of<W>(bias);
    tmp.resize(bias.numel());
    for (int64_t i = 0; i < bias.numel(); ++i) tmp[i] = S(as_float(b[i]));
    return tmp.data();
  }
}

// Tiles from / to rows of storage S or bf16 through the kernel table.
template <typename S>
void tile_from(const Kernels<S>& k, const S* src, int64_t ld, int64_t nt, int64_t ncols, int64_t T, S* dst) {
  k.spmm.tile_from_rows(src, ld, nt, ncols, T, dst);
}
template <typename S>
void tile_from(const Kernels<S>& k, const bf16* src, int64_t ld, int64_t nt, int64_t ncols, int64_t T, S* dst) {
  k.spmm.tile_from_bf16(src, ld, nt, ncols, T, dst);
}
template <typename S>
void tile_to(const Kernels<S>& k, const S* src, int64_t nr, int64_t nt, int64_t T, const S* bias, S* dst, int64_t ld) {
  k.spmm.tile_to_rows(src, nr, nt, T, bias, dst, ld);
}
template <typename S>
void tile_to(const Kernels<S>& k, const S* src, int64_t nr, int64_t nt, int64_t T, const S* bias, bf16* dst,
             int64_t ld) {
  k.spmm.tile_to_bf16(src, nr, nt, T, bias, dst, ld);
}

// bf16 ops without a bf16 path of their own run in float: the tensor widened (others as they are).
inline Tensor widen_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; }
inline c10::optional<Tensor> widen_bf16(const c10::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return widen_bf16(*t);
}

inline void check_same_dtype(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), bn, ": expected dtype ", a.scalar_type(), " (the dtype of ", an,
              "), got ", b.scalar_type());
}

// bf16 data with a float32 weight (the master weight under bf16 autocast): the linear ops read the
// weight's entries and round them to bf16, as if the weight had been cast.
inline bool is_mixed_bf16(const Tensor& data, const Tensor& weight) {
  return data.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kFloat;
}

inline std::pair<int64_t, int64_t> check_block(at::IntArrayRef block) {
  TORCH_CHECK(block.size() == 2, "block: expected two ints (bo, bk), got ", block.size());
  TORCH_CHECK(block[0] >= 1 && block[1] >= 1, "block: expected positive sides, got ", block);
  return {block[0], block[1]};
}

// Compressed index metadata: int32, contiguous, 1-D, ptr non-decreasing from 0 to idx.numel(),
// every idx entry in [0, n_minor).  O(rows + nnz), cheap next to the product it guards.
inline void check_compressed(const Tensor& ptr, const Tensor& idx, int64_t n_major, int64_t n_minor, const char* pname,
                      const char* iname) {
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{ptr, pname}, {idx, iname}}) {
    TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D tensor, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  }
  TORCH_CHECK(ptr.numel() == n_major + 1, pname, ": expected ", n_major + 1, " entries, got ", ptr.numel());
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int64_t nnz = idx.numel();
  TORCH_CHECK(p[0] == 0 && p[n_major] == nnz, pname, ": must start at 0 and end at ", iname,
              ".numel() = ", nnz, ", got ", p[0], " .. ", p[n_major]);
  bool mono = true;
  for (int64_t i = 0; i < n_major; ++i) mono &= p[i] <= p[i + 1];
  TORCH_CHECK(mono, pname, ": must be non-decreasing");
  const int32_t* x = idx.data_ptr<int32_t>();
  // a branch-free flag first (it vectorises on the baseline instruction set, and this runs on
  // every call); the range for the message only when it is set
  const int32_t n = int32_t(std::min<int64_t>(n_minor, INT32_MAX));
  int32_t bad = 0;
  for (int64_t i = 0; i < nnz; ++i) bad |= int32_t(x[i] < 0) | int32_t(x[i] >= n);
  if (bad) {
    int32_t lo = x[0], hi = x[0];
    for (int64_t i = 0; i < nnz; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    TORCH_CHECK(false, iname, ": entries must lie in [0, ", n_minor, "), got ", lo, " .. ", hi);
  }
}

inline std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, name, ": expected two ints, got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, name, ": expected values >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The optional bias of a forward op: float, the dtype of `like` (the weight, or the input of a
// mixed call), `n` entries; contiguous (or undefined when absent).
inline Tensor check_bias(const c10::optional<Tensor>& bias, const Tensor& like, int64_t n,
                         const char* like_name = "weight") {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  check_float(*bias, "bias", 1);
  check_same_dtype(like, like_name, *bias, "bias");
  TORCH_CHECK(bias->size(0) == n, "bias: expected shape [", n, "], got ", bias->sizes());
  return bias->contiguous();
}

// ---------------------------------------------------------------------------------------------
// scratch buffers: 64-byte aligned, one set per thread
// ---------------------------------------------------------------------------------------------

// A freshly allocated output of many megabytes is mapped page by page on first touch, and at 98 %
// sparsity clearing those 4 KiB pages costs more than the kernels.  Asking for transparent huge
// pages on the 2 MiB-aligned interior (where the system allows it, as torch does under
// THP_MEM_ALLOC_ENABLE) cuts the faults by 512x.  Only a hint: nothing changes if it is refused.
inline Tensor huge_page_hint(Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = size_t(t.numel()) * t.element_size();
  if (bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
    if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Scratch slots: buffers that are in use at the same time on one thread need different slots.
enum Slot { kTile = 0, kPanel, kStrip, kMainA, kMainB, kMainC, kDirX, kDirY, kDirV, kDirO, kSlots };

// Bytes held in each slot by every thread's pool together (reported by the scratch_held op).
inline std::atomic<int64_t>* scratch_held_bytes() {
  static std::atomic<int64_t> held[kSlots] = {};
  return held;
}

// Grow-only scratch memory, one set of slots per thread (the pool's threads persist), so that
// steady-state calls do not page-fault freshly mapped allocations: with several megabytes of
// scratch per call the kernel's page clearing cost as much as the kernels themselves (releasing
// the batch-sized slots after every call made a ResNet-18 training step 1.35-1.62x slower).
inline void* scratch_bytes(int slot, size_t bytes) {
  struct Pool {
    void* p[kSlots] = {};
    size_t n[kSlots] = {};
    ~Pool() {
      for (int s = 0; s < kSlots; ++s) {
        std::free(p[s]);
        scratch_held_bytes()[s] -= int64_t(n[s]);
      }
    }
  };
  thread_local Pool pool;
  if (pool.n[slot] < bytes) {
    std::free(pool.p[slot]);
    scratch_held_bytes()[slot] -= int64_t(pool.n[slot]);
    const size_t want = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    pool.p[slot] = std::aligned_alloc(64, want);
    pool.n[slot] = pool.p[slot] ? want : 0;
    scratch_held_bytes()[slot] += int64_t(pool.n[slot]);
    TORCH_CHECK(pool.p[slot], "sparsekern: out of memory allocating a ", want, "-byte scratch buffer");
  }
  return pool.p[slot];
}

// n scalars of 64-byte aligned scratch in `slot` of the calling thread (contents undefined).
template <typename S>
struct Buf {
  S* p;
  Buf(int64_t n, Slot slot) : p(static_cast<S*>(scratch_bytes(slot, size_t(std::max<int64_t>(n, 1)) * sizeof(S)))) {}
  S* get() const { return p; }
  S* data() const { return p; }
  S& operator[](int64_t i) const { return p[i]; }
};

// ---------------------------------------------------------------------------------------------
// work splitting, weight-gradient accumulators and the sparse operand of the panels
// ---------------------------------------------------------------------------------------------

inline constexpr int64_t kRowBlock = 32;  // panel rows per output transpose (a multiple of 4)

// Splits [0, rows) into `parts` ranges of about equal cost (cost[r] >= 0), each a multiple of
// `align` rows except the last.
inline std::vector<int64_t> balanced_split(const std::vector<int64_t>& cost, int64_t parts, int64_t align) {
  const int64_t rows = int64_t(cost.size());
  std::vector<int64_t> bounds{0};
  int64_t total = 0;
  for (auto c : cost) total += c + 1;
  int64_t acc = 0, next = 1;
  for (int64_t r = 0; r < rows && next < parts; ++r) {
    acc += cost[r] + 1;
    if (acc * parts >= total * next && (r + 1) % align == 0 && r + 1 < rows) {
      bounds.push_back(r + 1);
      ++next;
    }
  }
  bounds.push_back(rows);
  return bounds;
}

// Nonzeros per row of a (block) CSR pattern, expanded to element rows.
inline std::vector<int64_t> row_costs(const int32_t* ptr, int64_t rows, int64_t bo, int64_t bk) {
  std::vector<int64_t> cost(rows);
  for (int64_t r = 0; r < rows; ++r) cost[r] = int64_t(ptr[r / bo + 1] - ptr[r / bo]) * bk;
  return cost;
}

// Weight-gradient accumulator in pattern order: base[r] = first slot of row r (block rows
// expanded to their columns, clipped to ncols); scatter() writes it into the dense gradient,
// zeros included, so the gradient needs no separate zero fill.
struct PackedRows {
  std::vector<int64_t> base;
  PackedRows(const int32_t* ptr, const int32_t* idx, int64_t rows, int64_t bo, int64_t bk, int64_t ncols) : base(rows + 1) {
    base[0] = 0;
    if (bo == 1 && bk == 1) {  // unstructured: the CSR positions themselves
      for (int64_t r = 0; r <= rows; ++r) base[r] = ptr[r];
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t rb = r / bo;
      int64_t n = 0;
      if (r % bo == 0 || r == 0) {
        for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) n += std::min(bk, ncols - int64_t(idx[j]) * bk);
      } else {
        n = base[r] - base[r - 1];  // same block row as r - 1
      }
      base[r + 1] = base[r] + n;
    }
  }
  int64_t size() const { return base.back(); }
  template <typename S, typename O>
  void scatter(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols, const S* acc, O* out) const {
    const int64_t rows = int64_t(base.size()) - 1;
    const int64_t work = rows * ncols + size();
    at::parallel_for(0, rows, work < (int64_t(1) << 18) ? std::max<int64_t>(rows, 1) : 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t rb = r / bo;
        const S* a = acc + base[r];
        O* o = out + r * ncols;
        std::fill(o, o + ncols, O{});
        for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
          const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, ncols);
          for (int64_t c = c0; c < c1; ++c) store(o[c], *a++);
        }
      }
    });
  }
  // The inverse for the compact gradient: acc[base[r] + ...] = dense[r, c] on the pattern.
  template <typename S>
  void gather(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols, const S* dense, S* acc) const {
    const int64_t rows = int64_t(base.size()) - 1;
    at::parallel_for(0, rows, size() < (int64_t(1) << 18) ? std::max<int64_t>(rows, 1) : 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t rb = r / bo;
        S* a = acc + base[r];
        const S* d = dense + r * ncols;
        for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
          const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, ncols);
          for (int64_t c = c0; c < c1; ++c) *a++ = d[c];
        }
      }
    });
  }
};

// The tile widths, in vectors, of the unstructured panels (Kernels::spmm.panel_csr*) and of the
// weight-gradient tiles (spmm.sddmm_tile), ascending.  The 6-vector widths (96 float columns)
// fit a batch of 65-96 rows in one tile without the 8-vector tile's idle quarter: DER++'s
// batch plus two replay samples of 32 is 96 rows.  A batch one tile covers gets the same sums
// at either width (each tile column sums its terms in the pattern's order, and the padding
// columns add nothing to a weight gradient).
inline const std::vector<int64_t> kPanelVecs = {2, 4, 6, 8};
inline const std::vector<int64_t> kSddmmVecs = {4, 6, 8, 16};

// Tile width for an unstructured panel or a weight-gradient tile: the widest of `choices`
// (vectors, ascending) whose transposed tile of `cols` columns fits in about half of L2, and no
// wider than needed to cover `q` batch positions.  A width that is not a power of two (6) is
// taken only where it covers the batch in one tile: across several tiles it would leave a
// partial last tile where a power of two divides the usual batches (512 positions of a 4x4
// stride-2 conv at batch 32: 6 tiles of 96, the last a third full, measured 15 % slower than 8
// of 64).  Returns the index into `choices`.
template <typename S>
int pick_width(const Kernels<S>& k, const std::vector<int64_t>& choices, int64_t cols, int64_t q) {
  constexpr int64_t kTileBytes = int64_t(1) << 20;
  int best = 0;
  for (int i = 1; i < int(choices.size()); ++i) {
    if (cols * choices[i] * k.lanes * int64_t(sizeof(S)) > kTileBytes) break;
    if (choices[best] * k.lanes >= q) break;  // the narrower one already covers the batch
    const bool pow2 = (choices[i] & (choices[i] - 1)) == 0;
    if (pow2 || choices[i] * k.lanes >= q) best = i;
  }
  return best;
}

// A sparse matrix A [R, C] in the form the panels take: (block) CSR metadata with the values read
// from the dense weight (A[r, c] = a[r * ars + c * acs]).  An unstructured pattern's values are
// gathered once per call into CSR order of A whenever the panels would otherwise read the dense
// weight more than once (several batch tiles: each would stream the whole weight, since at
// moderate sparsity every cache line of it holds a nonzero) or down its columns (the transposed
// weight of input gradients: a cache miss per nonzero).  Values change every step, so nothing is
// kept between calls.  W: the weight's storage (S, or bf16: then the values are always gathered,
// widened to S, so the panels read S).
// The bits of v rounded to bf16 (a bf16 value as it is): values of a float weight read by a bf16
// op are rounded as a cast of the weight to bf16 would round them.
inline uint32_t bf16_bits(bf16 v) { return v.bits; }
inline uint32_t bf16_bits(float v) {
  bf16 h;
  store(h, v);
  return h.bits;
}
template <typename A>
inline float bf16_value(A v) {
  return as_float(bf16{uint16_t(bf16_bits(v))});
}

// AV: the storage of A's values: W, or float for bf16 data (the fp32 master weight under bf16
// autocast, read and rounded to bf16 entry by entry instead of cast whole).
template <typename S, typename W = S, typename AV = W>
struct SparseA {
  const int32_t* ptr;
  const int32_t* idx;
  int64_t bo, bk, R, C;
  const AV* a;
  int64_t ars, acs;
  int nv = 0;  // unstructured: index into Kernels::panel_csr (kPanelVecs)
  S* packed = nullptr;  // unstructured, if gathered: values in A's CSR order (calling thread's scratch)
                        // block: values per block row, column by column (see panel_bsr)
  std::vector<int64_t> bbase;  // block: first expanded column (pair, if dp) of each block row
  bool dp = false;  // bf16 block with even bk on vdpbf16ps: pair tiles, packed holds bf16 pairs
  bool udp = false;  // bf16 unstructured on vdpbf16ps: lane tiles, packed holds the rows' nonzero pairs
  int64_t udp_width = 0;  // its tile width (32, 64, 96 or 128)
  std::vector<int64_t> pbase;  // udp: first pair of each row

  bool unstructured() const { return bo == 1 && bk == 1; }
  // an entry of A as S (rounded to bf16 first when bf16 data reads float values)
  static S value(AV v) {
    if constexpr (std::is_same_v<W, bf16> && !std::is_same_v<AV, bf16>) return S(bf16_value(v));
    return S(as_float(v));
  }
  int64_t width(const Kernels<S>& k) const {
    if (dp) return kBf16PanelWidth;
    if (udp) return udp_width;
    return unstructured() ? kPanelVecs[nv] * k.lanes : k.panel_width;
  }

  // Picks the tile width for `q` batch positions (call before width()).
  void plan(const Kernels<S>& k, int64_t q) {
    if (!unstructured()) {
      if constexpr (std::is_same_v<W, bf16>) {
        if (bk % 2 == 0 && bf16_path() == Bf16Path::DPBF16) {
          dp = true;
          pack_pairs();
          return;
        }
      }
      pack_blocks();
      return;
    }
    if constexpr (std::is_same_v<W, bf16>) {
      if (bf16_path() == Bf16Path::DPBF16) {
        udp = true;
        // the narrowest of 32, 64, 96, 128 columns that covers the batch, else 128 where its bf16
        // tile fits in about half of L2, else 64 (96 only for a batch of 65-96 rows in one tile,
        // without the 128-column tile's idle quarter; the same sums: see kPanelVecs, pick_width)
        const auto fits = [&](int64_t t) { return C * t * 2 <= (int64_t(1) << 20); };
        udp_width = q > 96 ? (fits(128) ? 128 : 64) : (q > 64 && fits(96) ? 96 : (q > 32 ? 64 : 32));
        pack_row_pairs();
        return;
      }
    }
    nv = pick_width<S>(k, kPanelVecs, C, q);
    // rows of the weight with one tile: read in place (one pass over the weight either way)
    if (std::is_same_v<S, W> && acs == 1 && q <= width(k)) return;
    const int64_t nnz = ptr[R];
    packed = Buf<S>(nnz, kMainC).get();
    // a parallel region costs more than gathering a small pattern serially
    at::parallel_for(0, R, nnz < (int64_t(1) << 16) ? std::max<int64_t>(R, 1) : 256, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const AV* ar = a + r * ars;
        for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) packed[j] = value(ar[int64_t(idx[j]) * acs]);
      }
    });
  }

  // Block values into panel_bsr's order: for block row rb and its i-th expanded column c (blocks
  // clipped to C), the bo values A[rb * bo + q, c] contiguous (zero for rows past R).  One pass over
  // the pattern's values per call; the panels then read each tile's weights from one short run.
  void pack_blocks() {
    const int64_t nrb = cdiv(R, bo);
    bbase.assign(nrb + 1, 0);
    for (int64_t rb = 0; rb < nrb; ++rb) {
      int64_t n = 0;
      for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) n += std::min(bk, C - int64_t(idx[j]) * bk);
      bbase[rb + 1] = bbase[rb] + n;
    }
    packed = Buf<S>(bbase[nrb] * bo, kMainC).get();
    S* pk = packed;
    const int64_t total = bbase[nrb] * bo;
    at::parallel_for(0, nrb, total < (int64_t(1) << 16) ? std::max<int64_t>(nrb, 1) : 4, [&](int64_t b, int64_t e) {
      for (int64_t rb = b; rb < e; ++rb) {
        S* out = pk + bbase[rb] * bo;
        const int64_t qn = std::min(bo, R - rb * bo);
        for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
          const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, C);
          if (acs == 1) {  // rows of A are contiguous: read along them
            for (int64_t qq = 0; qq < qn; ++qq) {
              const AV* ar = a + (rb * bo + qq) * ars;
              for (int64_t c = c0; c < c1; ++c) out[(c - c0) * bo + qq] = value(ar[c]);
            }
          } else {
            for (int64_t c = c0; c < c1; ++c)
              for (int64_t qq = 0; qq < qn; ++qq) out[(c - c0) * bo + qq] = value(a[(rb * bo + qq) * ars + c * acs]);
          }
          for (int64_t qq = qn; qq < bo; ++qq)
            for (int64_t c = c0; c < c1; ++c) out[(c - c0) * bo + qq] = S(0);
          out += (c1 - c0) * bo;
        }
      }
    });
  }

  // pack_blocks for the vdpbf16ps panels: the bo words of column pair i of block row rb at
  // pk[(bbase[rb] + i) * bo], each the bf16 pair (A[r, c], A[r, c + 1]) (zero past R or C).
  void pack_pairs() {
    const int64_t nrb = cdiv(R, bo);
    bbase.assign(nrb + 1, 0);
    for (int64_t rb = 0; rb < nrb; ++rb) {
      int64_t n = 0;
      for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) n += cdiv(std::min(bk, C - int64_t(idx[j]) * bk), 2);
      bbase[rb + 1] = bbase[rb] + n;
    }
    static_assert(sizeof(S) == sizeof(uint32_t));
    packed = Buf<S>(bbase[nrb] * bo, kMainC).get();
    uint32_t* pk = reinterpret_cast<uint32_t*>(packed);
    const auto bits = [&](int64_t r, int64_t c) -> uint32_t {
      if (r >= R || c >= C) return 0;
      if constexpr (std::is_same_v<W, bf16>) return bf16_bits(a[r * ars + c * acs]);
      return 0;
    };
    at::parallel_for(0, nrb, bbase[nrb] * bo < (int64_t(1) << 16) ? std::max<int64_t>(nrb, 1) : 4,
                     [&](int64_t b, int64_t e) {
                       for (int64_t rb = b; rb < e; ++rb) {
                         uint32_t* out = pk + bbase[rb] * bo;
                         for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
                           const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, C);
                           for (int64_t c = c0; c < c1; c += 2, out += bo)
                             for (int64_t qq = 0; qq < bo; ++qq)
                               out[qq] = bits(rb * bo + qq, c) | bits(rb * bo + qq, c + 1) << 16;
                         }
                       }
                     });
  }

  // For the unstructured vdpbf16ps panel (bf16_panel_csr_dp): each row's nonzeros in pairs of
  // consecutive entries, as bf16 pairs in one word (a last odd entry pairs with zero).
  void pack_row_pairs() {
    pbase.assign(R + 1, 0);
    for (int64_t r = 0; r < R; ++r) pbase[r + 1] = pbase[r] + (int64_t(ptr[r + 1] - ptr[r]) + 1) / 2;
    static_assert(sizeof(S) == sizeof(uint32_t));
    packed = Buf<S>(pbase[R], kMainC).get();
    uint32_t* pk = reinterpret_cast<uint32_t*>(packed);
    at::parallel_for(0, R, pbase[R] < (int64_t(1) << 16) ? std::max<int64_t>(R, 1) : 256, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<W, bf16>) {
        for (int64_t r = b; r < e; ++r) {
          const AV* ar = a + r * ars;
          uint32_t* out = pk + pbase[r];
          const int64_t j1 = ptr[r + 1];
          for (int64_t j = ptr[r]; j < j1; j += 2) {
            const uint32_t lo = bf16_bits(ar[int64_t(idx[j]) * acs]);
            const uint32_t hi = j + 1 < j1 ? bf16_bits(ar[int64_t(idx[j + 1]) * acs]) : 0u;
            *out++ = lo | hi << 16;
          }
        }
      }
    });
  }

  // ot[(r - r0) * T + t] = sum_c A[r, c] * bt[c * T + t] for r0 <= r < r1 (T = width()); with dp,
  // bt is a pair tile (bf16_pair_tile), with udp a lane tile (bf16_lane_tile).
  void rows(const Kernels<S>& k, int64_t r0, int64_t r1, const S* bt, S* ot, std::vector<int32_t>& cols) const {
    if constexpr (std::is_same_v<S, float>) {
      if (dp)
        return bf16_panel_bsr_dp(ptr, idx, bo, bk, C, reinterpret_cast<const uint32_t*>(packed), bbase.data(), r0, r1,
                                 reinterpret_cast<const uint32_t*>(bt), ot, cols);
      if (udp)
        return bf16_panel_csr_dp(ptr, idx, pbase.data(), reinterpret_cast<const uint32_t*>(packed), r0, r1, udp_width,
                                 reinterpret_cast<const uint16_t*>(bt), ot);
    }
    if (unstructured()) {
      if constexpr (std::is_same_v<S, W> && std::is_same_v<S, AV>)
        if (!packed) return k.spmm.panel_csr[nv](ptr, idx, a, ars, acs, C, r0, r1, bt, ot);
      k.spmm.panel_csr_packed[nv](ptr, idx, packed, C, r0, r1, bt, ot);
    } else
      k.spmm.panel_bsr(ptr, idx, bo, bk, C, packed, bbase.data(), r0, r1, bt, ot, cols);
  }
};

// Tasks = tiles x row chunks, with enough chunks that every thread has work.
inline int64_t row_chunks(int64_t ntiles, int64_t rows) {
  const int64_t threads = at::get_num_threads();
  if (ntiles >= 2 * threads) return 1;
  return std::max<int64_t>(1, std::min(cdiv(2 * threads, std::max<int64_t>(ntiles, 1)), cdiv(rows, kRowBlock)));
}

// The tiles x row chunks tasks of the panel ops, in parallel: make() runs once per thread's range
// of tasks and returns its step(tile, fresh, rr, re), called for each block [rr, re) of at most
// kRowBlock rows of each task in order; fresh is true on a task's first block when the thread's
// previous task had another tile (the tile's inputs must be rebuilt).
template <typename Make>
void for_tile_row_blocks(int64_t ntiles, int64_t rows, Make&& make) {
  const int64_t rch = row_chunks(ntiles, rows);
  const int64_t chunk_rows = cdiv(cdiv(rows, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    auto step = make();
    int64_t last = -1;
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(rows, r0 + chunk_rows);
      if (r0 >= r1) continue;
      bool fresh = tile != last;
      last = tile;
      for (int64_t rr = r0; rr < r1; rr += kRowBlock, fresh = false) step(tile, fresh, rr, std::min(r1, rr + kRowBlock));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// conv2d geometry (conv2d.cpp and dwconv2d.cpp)
// ---------------------------------------------------------------------------------------------

inline ConvGeom make_geom(at::IntArrayRef in_size, at::IntArrayRef w_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto [sh, sw] = pair_arg(stride, "stride", 1);
  const auto [ph, pw] = pair_arg(padding, "padding", 0);
  const auto [dh, dw] = pair_arg(dilation, "dilation", 1);
  ConvGeom g{in_size[0], in_size[1], in_size[2], in_size[3], w_size[0], w_size[2], w_size[3], sh, sw, ph, pw, dh, dw,
             0, 0};
  g.Ho = (g.H + 2 * ph - dh * (g.kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + 2 * pw - dw * (g.kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "x: input of spatial size ", g.H, "x", g.W,
              " is too small for the kernel, padding and dilation (output would be ", g.Ho, "x", g.Wo, ")");
  return g;
}

// dy of a conv2d must have the output shape of geometry g.
inline void check_dy_shape(const Tensor& dy, const ConvGeom& g) {
  TORCH_CHECK(dy.size(0) == g.N && dy.size(1) == g.O && dy.size(2) == g.Ho && dy.size(3) == g.Wo,
              "dy: expected shape [", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo, "], got ", dy.sizes());
}

inline void check_size_arg(at::IntArrayRef s, const char* name) {
  TORCH_CHECK(s.size() == 4, name, ": expected 4 sizes, got ", s.size());
  for (auto v : s) TORCH_CHECK(v >= 0, name, ": expected non-negative sizes, got ", s);
}

}  // namespace sparsekern
