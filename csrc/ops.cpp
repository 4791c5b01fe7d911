// sparsekern custom ops: schemas (TORCH_LIBRARY) and CPU implementations (TORCH_LIBRARY_IMPL).
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <memory>
#include <vector>

#include "cpu/kernels.h"

namespace sparsekern {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// checks
// ---------------------------------------------------------------------------------------------

void check_float(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected dtype float32 or float64, got ", t.scalar_type());
}

void check_same_dtype(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), bn, ": expected dtype ", a.scalar_type(), " (the dtype of ", an,
              "), got ", b.scalar_type());
}

std::pair<int64_t, int64_t> check_block(at::IntArrayRef block) {
  TORCH_CHECK(block.size() == 2, "block: expected two ints (bo, bk), got ", block.size());
  TORCH_CHECK(block[0] >= 1 && block[1] >= 1, "block: expected positive sides, got ", block);
  return {block[0], block[1]};
}

// Compressed index metadata: int32, contiguous, 1-D, ptr non-decreasing from 0 to idx.numel(),
// every idx entry in [0, n_minor).  O(rows + nnz), cheap next to the product it guards.
void check_compressed(const Tensor& ptr, const Tensor& idx, int64_t n_major, int64_t n_minor, const char* pname,
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
  int32_t lo = 0, hi = 0;
  if (nnz) {
    lo = hi = x[0];
    for (int64_t i = 0; i < nnz; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
  }
  TORCH_CHECK(nnz == 0 || (lo >= 0 && hi < n_minor), iname, ": entries must lie in [0, ", n_minor, "), got ", lo,
              " .. ", hi);
}

std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, name, ": expected two ints, got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, name, ": expected values >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// scratch buffers: 64-byte aligned, one set per task
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

// Grow-only scratch memory, one set of slots per thread (the pool's threads persist), so that
// steady-state calls do not page-fault freshly mapped allocations: with several megabytes of
// scratch per call the kernel's page clearing cost as much as the kernels themselves.
inline void* scratch_bytes(int slot, size_t bytes) {
  struct Pool {
    void* p[kSlots] = {};
    size_t n[kSlots] = {};
    ~Pool() {
      for (auto q : p) std::free(q);
    }
  };
  thread_local Pool pool;
  if (pool.n[slot] < bytes) {
    std::free(pool.p[slot]);
    const size_t want = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    pool.p[slot] = std::aligned_alloc(64, want);
    pool.n[slot] = pool.p[slot] ? want : 0;
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

constexpr int64_t kRowBlock = 32;  // panel rows per output transpose (a multiple of 4)

// Splits [0, rows) into `parts` ranges of about equal cost (cost[r] >= 0), each a multiple of
// `align` rows except the last.
std::vector<int64_t> balanced_split(const std::vector<int64_t>& cost, int64_t parts, int64_t align) {
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
std::vector<int64_t> row_costs(const int32_t* ptr, int64_t rows, int64_t bo, int64_t bk) {
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
  template <typename S>
  void scatter(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols, const S* acc, S* out) const {
    const int64_t rows = int64_t(base.size()) - 1;
    const int64_t work = rows * ncols + size();
    at::parallel_for(0, rows, work < (int64_t(1) << 18) ? std::max<int64_t>(rows, 1) : 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t rb = r / bo;
        const S* a = acc + base[r];
        S* o = out + r * ncols;
        std::fill(o, o + ncols, S(0));
        for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
          const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, ncols);
          for (int64_t c = c0; c < c1; ++c) o[c] = *a++;
        }
      }
    });
  }
};

// Tile width for an unstructured panel or a weight-gradient tile: the widest of `choices`
// (vectors, ascending) whose transposed tile of `cols` columns fits in about half of L2, and no
// wider than needed to cover `q` batch positions.  Returns the index into `choices`.
template <typename S>
int pick_width(const Kernels<S>& k, const std::vector<int64_t>& choices, int64_t cols, int64_t q) {
  constexpr int64_t kTileBytes = int64_t(1) << 20;
  int best = 0;
  for (int i = 1; i < int(choices.size()); ++i) {
    if (cols * choices[i] * k.lanes * int64_t(sizeof(S)) > kTileBytes) break;
    if (choices[i - 1] * k.lanes >= q) break;  // the narrower one already covers the batch
    best = i;
  }
  return best;
}

// A sparse matrix A [R, C] in the form the panels take: (block) CSR metadata with the values read
// from the dense weight (A[r, c] = a[r * ars + c * acs]).  An unstructured pattern's values are
// gathered once per call into CSR order of A whenever the panels would otherwise read the dense
// weight more than once (several batch tiles: each would stream the whole weight, since at
// moderate sparsity every cache line of it holds a nonzero) or down its columns (the transposed
// weight of input gradients: a cache miss per nonzero).  Values change every step, so nothing is
// kept between calls.
template <typename S>
struct SparseA {
  const int32_t* ptr;
  const int32_t* idx;
  int64_t bo, bk, R, C;
  const S* a;
  int64_t ars, acs;
  int nv = 0;  // unstructured: index into Kernels::panel_csr ({2, 4, 8} vectors)
  S* packed = nullptr;  // unstructured, if gathered: values in A's CSR order (calling thread's scratch)
                        // block: values per block row, column by column (see panel_bsr)
  std::vector<int64_t> bbase;  // block: first expanded column of each block row

  bool unstructured() const { return bo == 1 && bk == 1; }
  int64_t width(const Kernels<S>& k) const { return unstructured() ? (int64_t(2) << nv) * k.lanes : k.panel_width; }

  // Picks the tile width for `q` batch positions (call before width()).
  void plan(const Kernels<S>& k, int64_t q) {
    if (!unstructured()) {
      pack_blocks();
      return;
    }
    nv = pick_width<S>(k, {2, 4, 8}, C, q);
    // rows of the weight with one tile: read in place (one pass over the weight either way)
    if (acs == 1 && q <= width(k)) return;
    const int64_t nnz = ptr[R];
    packed = Buf<S>(nnz, kMainC).get();
    // a parallel region costs more than gathering a small pattern serially
    at::parallel_for(0, R, nnz < (int64_t(1) << 16) ? std::max<int64_t>(R, 1) : 256, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const S* ar = a + r * ars;
        for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) packed[j] = ar[int64_t(idx[j]) * acs];
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
              const S* ar = a + (rb * bo + qq) * ars;
              for (int64_t c = c0; c < c1; ++c) out[(c - c0) * bo + qq] = ar[c];
            }
          } else {
            for (int64_t c = c0; c < c1; ++c)
              for (int64_t qq = 0; qq < qn; ++qq) out[(c - c0) * bo + qq] = a[(rb * bo + qq) * ars + c * acs];
          }
          for (int64_t qq = qn; qq < bo; ++qq)
            for (int64_t c = c0; c < c1; ++c) out[(c - c0) * bo + qq] = S(0);
          out += (c1 - c0) * bo;
        }
      }
    });
  }

  // ot[(r - r0) * T + t] = sum_c A[r, c] * bt[c * T + t] for r0 <= r < r1 (T = width()).
  void rows(const Kernels<S>& k, int64_t r0, int64_t r1, const S* bt, S* ot, std::vector<int32_t>& cols) const {
    if (unstructured()) {
      if (!packed)
        k.spmm.panel_csr[nv](ptr, idx, a, ars, acs, C, r0, r1, bt, ot);
      else
        k.spmm.panel_csr_packed[nv](ptr, idx, packed, C, r0, r1, bt, ot);
    } else
      k.spmm.panel_bsr(ptr, idx, bo, bk, C, packed, bbase.data(), r0, r1, bt, ot, cols);
  }
};

// Tasks = tiles x row chunks, with enough chunks that every thread has work.
int64_t row_chunks(int64_t ntiles, int64_t rows) {
  const int64_t threads = at::get_num_threads();
  if (ntiles >= 2 * threads) return 1;
  return std::max<int64_t>(1, std::min(cdiv(2 * threads, std::max<int64_t>(ntiles, 1)), cdiv(rows, kRowBlock)));
}

// out [N, R] = b [N, C] @ A^T (+ bias), A sparse.
template <typename S>
void spmm_rows(const S* b, int64_t N, const SparseA<S>& A, const S* bias, S* out) {
  const Kernels<S>& k = kernels<S>();
  const int64_t T = A.width(k), R = A.R, C = A.C;
  const int64_t ntiles = cdiv(N, T), rch = row_chunks(ntiles, R);
  const int64_t chunk_rows = cdiv(cdiv(R, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    Buf<S> bt(C * T, kTile), ot(kRowBlock * T, kPanel);
    std::vector<int32_t> cols;
    int64_t last = -1;
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(R, r0 + chunk_rows);
      if (r0 >= r1) continue;
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      if (tile != last) {
        k.spmm.tile_from_rows(b + n0 * C, C, nt, C, T, bt.get());
        last = tile;
      }
      // row blocks small enough that the panel output is still in L1 when transposed out
      for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
        const int64_t re = std::min(r1, rr + kRowBlock);
        A.rows(k, rr, re, bt.get(), ot.get(), cols);
        k.spmm.tile_to_rows(ot.get(), re - rr, nt, T, bias ? bias + rr : nullptr, out + n0 * R + rr, R);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// window-major CSR (unstructured): the panels' L1 path
// ---------------------------------------------------------------------------------------------

// Window-major copy of a CSR pattern [R, ncols] whose columns are cut into windows of `window`:
// wptr [nw * (R + 1)] (window w, row r: entries wptr[w * (R + 1) + r] .. wptr[w * (R + 1) + r + 1]
// of widx) and widx [nnz] (the columns).  Built once per pattern (the Python side caches it with
// the pattern's metadata), so the per-call cost of the L1 path is only packing the values.
std::tuple<Tensor, Tensor> csr_windows(const Tensor& crow, const Tensor& col, int64_t ncols, int64_t window) {
  TORCH_CHECK(window > 0, "window: expected a positive number of columns, got ", window);
  TORCH_CHECK(ncols >= 0, "ncols: expected a non-negative number of columns, got ", ncols);
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, "crow_indices: expected a 1-D tensor of rows + 1 entries, got shape ",
              crow.sizes());
  const int64_t R = crow.numel() - 1;
  check_compressed(crow, col, R, ncols, "crow_indices", "col_indices");
  const int64_t nw = std::max<int64_t>(1, cdiv(ncols, window));
  TORCH_CHECK(nw * (R + 1) < (int64_t(1) << 31), "window: ", nw, " windows of ", R + 1,
              " row pointers overflow int32; use a wider window");
  const Tensor cr = crow.contiguous(), cl = col.contiguous();
  const int32_t* ptr = cr.data_ptr<int32_t>();
  const int32_t* idx = cl.data_ptr<int32_t>();
  Tensor wptr = at::empty({nw * (R + 1)}, cr.options());
  Tensor widx = at::empty({cl.numel()}, cl.options());
  int32_t* wp = wptr.data_ptr<int32_t>();
  int32_t* wi = widx.data_ptr<int32_t>();
  // cursor[r]: the first entry of row r not yet placed (columns ascend within a row)
  std::vector<int32_t> cursor(ptr, ptr + R);
  int32_t pos = 0;
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t cend = (w + 1) * window;
    int32_t* p = wp + w * (R + 1);
    for (int64_t r = 0; r < R; ++r) {
      p[r] = pos;
      int32_t j = cursor[r];
      const int32_t e = ptr[r + 1];
      for (; j < e && idx[j] < cend; ++j) wi[pos++] = idx[j];
      cursor[r] = j;
    }
    p[R] = pos;
  }
  return {wptr, widx};
}

struct Windows {
  const int32_t* ptr = nullptr;  // window-major row pointers, nw * (R + 1)
  const int32_t* idx = nullptr;
  int64_t window = 0, nw = 0;
  bool on() const { return ptr != nullptr; }
};

// Validates the optional window-major metadata of an unstructured A [R, C] with nnz entries.
Windows check_windows(const c10::optional<Tensor>& wptr, const c10::optional<Tensor>& widx, int64_t window, int64_t R,
                      int64_t C, int64_t nnz, bool unstructured) {
  Windows w;
  const bool has_p = wptr.has_value() && wptr->defined(), has_i = widx.has_value() && widx->defined();
  if (!has_p && !has_i) return w;
  TORCH_CHECK(has_p && has_i, "win_ptr, win_idx: pass both or neither");
  TORCH_CHECK(unstructured, "win_ptr: window-major metadata applies to the unstructured layout (block (1, 1)) only");
  TORCH_CHECK(window > 0, "window: expected a positive window width with win_ptr, got ", window);
  const int64_t nw = std::max<int64_t>(1, cdiv(C, window));
  for (const Tensor* t : {&*wptr, &*widx}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(),
                t == &*wptr ? "win_ptr" : "win_idx", ": expected a contiguous 1-D int32 CPU tensor, got ", t->scalar_type(),
                " of shape ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(wptr->numel() == nw * (R + 1), "win_ptr: expected ", nw * (R + 1), " entries (", nw, " windows x ", R + 1,
              " rows + 1), got ", wptr->numel());
  TORCH_CHECK(widx->numel() == nnz, "win_idx: expected ", nnz, " entries (the pattern's nonzeros), got ", widx->numel());
  w.ptr = wptr->data_ptr<int32_t>();
  w.idx = widx->data_ptr<int32_t>();
  TORCH_CHECK(w.ptr[0] == 0 && w.ptr[nw * (R + 1) - 1] == nnz, "win_ptr: does not describe ", nnz,
              " entries (first ", w.ptr[0], ", last ", w.ptr[nw * (R + 1) - 1], ")");
  bool ok = true;
  for (int64_t i = 0; i + 1 < nw * (R + 1); ++i) ok &= w.ptr[i] <= w.ptr[i + 1];
  TORCH_CHECK(ok, "win_ptr: must be non-decreasing");
  for (int64_t i = 0; i < nnz; ++i) ok &= w.idx[i] >= 0 && w.idx[i] < C;
  TORCH_CHECK(ok, "win_idx: entries must lie in [0, ", C, ")");
  w.window = window;
  w.nw = nw;
  return w;
}

// out [N, R] = b [N, C] @ A^T (+ bias) through the window-major panels.  A's values are read
// from a[r * ars + c * acs] once per call into window-major order.  The tile is T batch columns
// wide (T = 32, 64 or 128 scalars of float, by N); rows go in chunks whose panel output stays in
// L2 across the windows; every element sums its terms in column order.
template <typename S>
void spmm_windowed(const S* b, int64_t N, int64_t R, int64_t C, const S* a, int64_t ars, int64_t acs, const Windows& win,
                   const S* bias, S* out) {
  const Kernels<S>& k = kernels<S>();
  const int nv = N > 4 * k.lanes ? 2 : (N > 2 * k.lanes ? 1 : 0);
  const int64_t T = (int64_t(2) << nv) * k.lanes;
  const int64_t nnz = win.ptr[win.nw * (R + 1) - 1];
  S* val = Buf<S>(nnz, kMainC).get();
  at::parallel_for(0, win.nw, nnz < (int64_t(1) << 16) ? win.nw : 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const int32_t* p = win.ptr + w * (R + 1);
      for (int64_t r = 0; r < R; ++r) {
        const S* ar = a + r * ars;
        for (int64_t j = p[r]; j < p[r + 1]; ++j) val[j] = ar[int64_t(win.idx[j]) * acs];
      }
    }
  });
  constexpr int64_t kPanelBytes = int64_t(1) << 19;  // panel output per task kept in L2
  const int64_t max_rows = std::max<int64_t>(kRowBlock, kPanelBytes / (T * int64_t(sizeof(S))));
  const int64_t ntiles = cdiv(N, T);
  const int64_t rch = std::max(row_chunks(ntiles, R), cdiv(R, max_rows));
  const int64_t chunk_rows = cdiv(cdiv(R, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    Buf<S> bt(C * T, kTile), ot(chunk_rows * T, kPanel);
    int64_t last = -1;
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(R, r0 + chunk_rows);
      if (r0 >= r1) continue;
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      if (tile != last) {
        k.spmm.tile_from_rows(b + n0 * C, C, nt, C, T, bt.get());
        last = tile;
      }
      k.linear.panel_win[nv](win.ptr, win.idx, val, R, win.nw, r0, r1, bt.get(), ot.get());
      k.spmm.tile_to_rows(ot.get(), r1 - r0, nt, T, bias ? bias + r0 : nullptr, out + n0 * R + r0, R);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------------------

Tensor linear_fwd(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias_, const Tensor& crow,
                  const Tensor& col, at::IntArrayRef block, const c10::optional<Tensor>& win_ptr,
                  const c10::optional<Tensor>& win_idx, int64_t window) {
  check_float(x_, "x", 2);
  check_float(weight_, "weight", 2);
  check_same_dtype(weight_, "weight", x_, "x");
  const auto [bo, bk] = check_block(block);
  const int64_t N = x_.size(0), K = x_.size(1), M = weight_.size(0);
  TORCH_CHECK(weight_.size(1) == K, "weight: expected shape [out_features, ", K, "] (x has ", K,
              " features), got ", weight_.sizes());
  Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_float(*bias_, "bias", 1);
    check_same_dtype(weight_, "weight", *bias_, "bias");
    TORCH_CHECK(bias_->size(0) == M, "bias: expected shape [", M, "], got ", bias_->sizes());
    bias = bias_->contiguous();
  }
  check_compressed(crow, col, cdiv(M, bo), cdiv(K, bk), "crow_indices", "col_indices");
  Tensor x = x_.contiguous(), w = weight_.contiguous();
  Tensor y = huge_page_hint(at::empty({N, M}, x.options()));
  if (N == 0 || M == 0) return y;
  const Windows win = check_windows(win_ptr, win_idx, window, M, K, col.numel(), bo == 1 && bk == 1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::linear_fwd", [&] {
    using S = scalar_t;
    if (win.on()) {
      spmm_windowed<S>(x.data_ptr<S>(), N, M, K, w.data_ptr<S>(), K, 1, win,
                       bias.defined() ? bias.data_ptr<S>() : nullptr, y.data_ptr<S>());
      return;
    }
    SparseA<S> A{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk, M, K, w.data_ptr<S>(), K, 1};
    A.plan(kernels<S>(), N);
    spmm_rows<S>(x.data_ptr<S>(), N, A, bias.defined() ? bias.data_ptr<S>() : nullptr, y.data_ptr<S>());
  });
  return y;
}

Tensor linear_dx(const Tensor& dy_, const Tensor& weight_, const Tensor& ccol, const Tensor& row,
                 at::IntArrayRef block, const c10::optional<Tensor>& win_ptr, const c10::optional<Tensor>& win_idx,
                 int64_t window) {
  check_float(dy_, "dy", 2);
  check_float(weight_, "weight", 2);
  check_same_dtype(weight_, "weight", dy_, "dy");
  const auto [bo, bk] = check_block(block);
  const int64_t N = dy_.size(0), M = weight_.size(0), K = weight_.size(1);
  TORCH_CHECK(dy_.size(1) == M, "dy: expected shape [N, ", M, "] (weight has ", M, " rows), got ", dy_.sizes());
  check_compressed(ccol, row, cdiv(K, bk), cdiv(M, bo), "ccol_indices", "row_indices");
  Tensor dy = dy_.contiguous(), w = weight_.contiguous();
  Tensor dx = huge_page_hint(at::empty({N, K}, dy.options()));
  if (N == 0 || K == 0) return dx;
  const Windows win = check_windows(win_ptr, win_idx, window, K, M, row.numel(), bo == 1 && bk == 1);
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparsekern::linear_dx", [&] {
    using S = scalar_t;
    if (win.on()) {
      spmm_windowed<S>(dy.data_ptr<S>(), N, K, M, w.data_ptr<S>(), 1, K, win, nullptr, dx.data_ptr<S>());
      return;
    }
    // A = W^T [K, M]: rows are W's columns, blocks (bk, bo).
    SparseA<S> A{ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), bk, bo, K, M, w.data_ptr<S>(), 1, K};
    A.plan(kernels<S>(), N);
    spmm_rows<S>(dy.data_ptr<S>(), N, A, nullptr, dx.data_ptr<S>());
  });
  return dx;
}

Tensor linear_dw(const Tensor& dy_, const Tensor& x_, const Tensor& crow, const Tensor& col, at::IntArrayRef block,
                 const c10::optional<Tensor>& win_ptr, const c10::optional<Tensor>& win_idx, int64_t window) {
  check_float(dy_, "dy", 2);
  check_float(x_, "x", 2);
  check_same_dtype(dy_, "dy", x_, "x");
  const auto [bo, bk] = check_block(block);
  const int64_t N = dy_.size(0), M = dy_.size(1), K = x_.size(1);
  TORCH_CHECK(x_.size(0) == N, "x: expected ", N, " rows (dy has ", N, "), got shape ", x_.sizes());
  check_compressed(crow, col, cdiv(M, bo), cdiv(K, bk), "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  if (N == 0 || M == 0 || K == 0 || col.numel() == 0) return at::zeros({M, K}, x.options());
  Tensor dw = huge_page_hint(at::empty({M, K}, x.options()));  // every element is written below
  const Windows win = check_windows(win_ptr, win_idx, window, M, K, col.numel(), bo == 1 && bk == 1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::linear_dw", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const int32_t* ptr = crow.data_ptr<int32_t>();
    const int32_t* idx = col.data_ptr<int32_t>();
    if (win.on()) {
      // window-major: tiles of 64 or 128 batch columns (a window of the x tile is then 16-32 KiB
      // of float), rows in blocks whose transposed dy slice stays in L2 across the windows
      const int nv = N > 4 * k.lanes ? 1 : 0;
      const int64_t T = (int64_t(4) << nv) * k.lanes, ntiles = cdiv(N, T);
      constexpr int64_t kRows = 256;
      const int64_t parts = std::min<int64_t>(at::get_num_threads(), cdiv(M, 4));
      const auto bounds = balanced_split(row_costs(ptr, M, 1, 1), parts, 1);
      const S* xp = x.data_ptr<S>();
      const S* dyp = dy.data_ptr<S>();
      Buf<S> acc(col.numel(), kMainA);
      std::fill(acc.data(), acc.data() + col.numel(), S(0));
      at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
        Buf<S> bt(K * T, kTile), at_(kRows * T, kPanel);
        std::vector<int32_t> cursor(kRows);
        for (int64_t part = pb; part < pe; ++part) {
          const int64_t r0 = bounds[part], r1 = bounds[part + 1];
          if (r0 >= r1 || ptr[r0] == ptr[r1]) continue;
          for (int64_t tile = 0; tile < ntiles; ++tile) {
            const int64_t n0 = tile * T, nt = std::min(T, N - n0);
            k.spmm.tile_from_rows(xp + n0 * K, K, nt, K, T, bt.get());
            for (int64_t rr = r0; rr < r1; rr += kRows) {
              const int64_t re = std::min(r1, rr + kRows);
              k.spmm.tile_from_rows(dyp + n0 * M + rr, M, nt, re - rr, T, at_.get());
              k.linear.sddmm_win[nv](win.ptr, win.idx, ptr, M, win.nw, rr, re, at_.get(), bt.get(), acc.data(), cursor.data());
            }
          }
        }
      });
      const PackedRows packed(ptr, idx, M, 1, 1, K);
      packed.scatter(ptr, idx, 1, 1, K, acc.data(), dw.data_ptr<S>());
      return;
    }
    if (bk % k.lanes == 0 && M % bo == 0 && K % bk == 0) {
      // whole blocks of whole vectors: a dense GEMM per block on column strips of x
      const int64_t nrb = M / bo;
      std::vector<int64_t> cost(nrb);
      for (int64_t rb = 0; rb < nrb; ++rb) cost[rb] = int64_t(ptr[rb + 1] - ptr[rb]);
      const auto bounds = balanced_split(cost, std::min<int64_t>(at::get_num_threads(), nrb), 1);
      const S* xp = x.data_ptr<S>();
      const S* dyp = dy.data_ptr<S>();
      S* out = dw.data_ptr<S>();
      Buf<S> xs(N * K, kMainA);  // x as vector-wide column strips, each contiguous over the batch
      const int64_t nstrips = K / k.lanes;
      at::parallel_for(0, nstrips, N * K < (int64_t(1) << 16) ? std::max<int64_t>(nstrips, 1) : 4,
                       [&](int64_t b, int64_t e) { k.linear.strips_from_rows(xp, K, N, b * k.lanes, e * k.lanes, xs.get()); });
      at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
        Buf<S> ds(N * 16, kStrip);
        for (int64_t part = pb; part < pe; ++part)
          k.linear.bsr_dw_rows(ptr, idx, bo, bk, bounds[part], bounds[part + 1], dyp, M, xs.get(), N, out, K, ds.get());
      });
      return;
    }
    const int nv = pick_width<S>(k, {4, 8, 16}, K, N);
    const int64_t T = (int64_t(4) << nv) * k.lanes, ntiles = cdiv(N, T);
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), cdiv(M, 4));
    const auto bounds = balanced_split(row_costs(ptr, M, bo, bk), parts, 1);
    const S* xp = x.data_ptr<S>();
    const S* dyp = dy.data_ptr<S>();
    const PackedRows packed(ptr, idx, M, bo, bk, K);
    Buf<S> acc(packed.size(), kMainA);
    std::fill(acc.data(), acc.data() + packed.size(), S(0));
    at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
      Buf<S> bt(K * T, kTile), at_(kRowBlock * T, kPanel);
      std::vector<int32_t> cols;
      for (int64_t part = pb; part < pe; ++part) {
        const int64_t r0 = bounds[part], r1 = bounds[part + 1];
        if (r0 >= r1 || ptr[r0 / bo] == ptr[cdiv(r1, bo)]) continue;
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t n0 = tile * T, nt = std::min(T, N - n0);
          k.spmm.tile_from_rows(xp + n0 * K, K, nt, K, T, bt.get());
          for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
            const int64_t re = std::min(r1, rr + kRowBlock);
            k.spmm.tile_from_rows(dyp + n0 * M + rr, M, nt, re - rr, T, at_.get());
            k.spmm.sddmm_tile[nv](ptr, idx, bo, bk, K, rr, re, at_.get(), bt.get(), acc.data(), packed.base.data(), cols);
          }
        }
      }
    });
    packed.scatter(ptr, idx, bo, bk, K, acc.data(), dw.data_ptr<S>());
  });
  return dw;
}

// ---------------------------------------------------------------------------------------------
// conv2d, groups = 1 (implicit GEMM on tiles of output positions)
// ---------------------------------------------------------------------------------------------

ConvGeom make_geom(at::IntArrayRef in_size, at::IntArrayRef w_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
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
void check_dy_shape(const Tensor& dy, const ConvGeom& g) {
  TORCH_CHECK(dy.size(0) == g.N && dy.size(1) == g.O && dy.size(2) == g.Ho && dy.size(3) == g.Wo,
              "dy: expected shape [", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo, "], got ", dy.sizes());
}

void check_size_arg(at::IntArrayRef s, const char* name) {
  TORCH_CHECK(s.size() == 4, name, ": expected 4 sizes, got ", s.size());
  for (auto v : s) TORCH_CHECK(v >= 0, name, ": expected non-negative sizes, got ", s);
}

// ---------------------------------------------------------------------------------------------
// conv2d, groups = 1, direct on shifted views (kernels in cpu/conv_direct_impl.h)
// ---------------------------------------------------------------------------------------------

// Grid of the direct algorithm.  The zero-padded input Xpad is split by stride phase (a, b) into
// sh * sw planes per channel, Xq[a, b][c][n * Hq + y'][x'] = Xpad[n, c][a + sh * y'][b + sw * x'],
// each image's plane Hq x Wq, images stacked along the rows.  Output (y, x) of image n is grid
// position p = n * Hq * Wq + y * Wq + x, and tap (i, j) of channel c reads Xq at plane
// (phase(i, j), c) and position p + shift(i, j): a fixed offset per nonzero weight.  Grid
// positions with y >= Ho or x >= Wo are computed and dropped (the "grid waste").
struct DirectGeom {
  int64_t phases, Hq, Wq, HW, G, maxoff;
  const ConvGeom& g;
  explicit DirectGeom(const ConvGeom& g_) : g(g_) {
    phases = g.sh * g.sw;
    Hq = g.Ho + (g.dh * (g.kh - 1)) / g.sh;
    Wq = g.Wo + (g.dw * (g.kw - 1)) / g.sw;
    HW = Hq * Wq;
    G = g.N * HW;
    maxoff = shift(g.kh - 1, g.kw - 1);
  }
  int64_t phase(int64_t i, int64_t j) const { return ((g.dh * i) % g.sh) * g.sw + (g.dw * j) % g.sw; }
  int64_t shift(int64_t i, int64_t j) const { return ((g.dh * i) / g.sh) * Wq + (g.dw * j) / g.sw; }
  // computed grid positions per useful output position
  double waste() const { return double(HW) / double(g.Ho * g.Wo); }
  // how many of the phases some tap reads (a 1x1 kernel at stride 2 reads one of four)
  int64_t used_phases() const {
    std::vector<bool> used(phases, false);
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) used[phase(i, j)] = true;
    return std::count(used.begin(), used.end(), true);
  }
};

int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// Index into `choices` (vectors, ascending) of the tile width for the direct kernels: the widest
// whose window (rows x (T + largest shift)) stays within about half of L2 and that still leaves
// eight tiles.  From the shapes only: the width fixes the summation order, so it must not depend
// on the thread count.
template <typename S>
int direct_width(const Kernels<S>& k, const std::vector<int64_t>& choices, int64_t rows, const DirectGeom& d) {
  constexpr int64_t kWindowBytes = int64_t(1) << 20;
  int best = 0;
  for (int i = 1; i < int(choices.size()); ++i) {
    const int64_t T = choices[i] * k.lanes;
    if (rows * (T + d.maxoff) * int64_t(sizeof(S)) > kWindowBytes) break;
    if (cdiv(d.G, T) < 8) break;
    best = i;
  }
  return best;
}

// Xq (see DirectGeom) with plane stride CS >= ntiles * T + maxoff; everything past the grid is zero.
template <typename S>
void build_planes(const S* x, const DirectGeom& d, int64_t CS, S* xq) {
  const ConvGeom& g = d.g;
  at::parallel_for(0, d.phases * g.C * g.N, 8, [&](int64_t b_, int64_t e_) {
    for (int64_t task = b_; task < e_; ++task) {
      const int64_t n = task % g.N, pc = task / g.N, c = pc % g.C, ph = pc / g.C;
      const int64_t a = ph / g.sw, b = ph % g.sw;
      S* plane = xq + pc * CS;
      const S* xc = x + (n * g.C + c) * g.H * g.W;
      // valid x' range: 0 <= b + sw * x' - pw < W
      const int64_t lo = std::min(d.Wq, std::max<int64_t>(0, cdiv(std::max<int64_t>(0, g.pw - b), g.sw)));
      const int64_t hi = std::max(lo, std::min(d.Wq, cdiv(g.W + g.pw - b, g.sw)));
      for (int64_t yq = 0; yq < d.Hq; ++yq) {
        S* dst = plane + n * d.HW + yq * d.Wq;
        const int64_t u = a + g.sh * yq - g.ph;
        if (u < 0 || u >= g.H) {
          std::fill(dst, dst + d.Wq, S(0));
          continue;
        }
        const S* src = xc + u * g.W + b - g.pw;
        std::fill(dst, dst + lo, S(0));
        if (g.sw == 1)
          std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(S));
        else
          for (int64_t q = lo; q < hi; ++q) dst[q] = src[q * g.sw];
        std::fill(dst + hi, dst + d.Wq, S(0));
      }
      if (n == g.N - 1) std::fill(plane + d.G, plane + CS, S(0));
    }
  });
}

// dyg[o * DS + M + p] = dy on the grid (zero at dropped positions, in the leading margin [0, M)
// and past the grid up to DS).
template <typename S>
void build_dy_grid(const S* dy, const DirectGeom& d, int64_t M, int64_t DS, S* dyg) {
  const ConvGeom& g = d.g;
  const int64_t P = g.Ho * g.Wo;
  at::parallel_for(0, g.O * g.N, 8, [&](int64_t b_, int64_t e_) {
    for (int64_t task = b_; task < e_; ++task) {
      const int64_t o = task / g.N, n = task % g.N;
      S* row = dyg + o * DS;
      if (n == 0) std::fill(row, row + M, S(0));
      S* dst = row + M + n * d.HW;
      const S* src = dy + (n * g.O + o) * P;
      for (int64_t y = 0; y < d.Hq; ++y) {
        S* dr = dst + y * d.Wq;
        if (y >= g.Ho) {
          std::fill(dr, dr + d.Wq, S(0));
          continue;
        }
        std::memcpy(dr, src + y * g.Wo, g.Wo * sizeof(S));
        std::fill(dr + g.Wo, dr + d.Wq, S(0));
      }
      if (n == g.N - 1) std::fill(row + M + d.G, row + DS, S(0));
    }
  });
}

// Visits the runs of grid positions [q0, q0 + nt) that lie on one grid row: f(n, y, x0, t, len)
// for x0 .. x0 + len of row y in image n, starting at tile offset t.
template <typename F>
void grid_runs(const DirectGeom& d, int64_t q0, int64_t nt, F&& f) {
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / d.HW, rem = q % d.HW, y = rem / d.Wq, x0 = rem % d.Wq;
    const int64_t len = std::min(d.Wq - x0, nt - t);
    if (n >= d.g.N) break;
    f(n, y, x0, t, len);
    t += len;
  }
}

// Element-level rows of a (block) CSR pattern over a matrix [R, ncols] (blocks br x bc): the
// number of entries of each row, as exclusive prefix sums (size R + 1).
std::vector<int64_t> expanded_ptr(const int32_t* ptr, const int32_t* idx, int64_t R, int64_t br, int64_t bc,
                                  int64_t ncols) {
  std::vector<int64_t> out(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t rb = r / br;
    int64_t n = 0;
    if (bc == 1)
      n = ptr[rb + 1] - ptr[rb];
    else if (r % br == 0)
      for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) n += std::min(bc, ncols - int64_t(idx[j]) * bc);
    else
      n = out[r] - out[r - 1];
    out[r + 1] = out[r] + n;
  }
  return out;
}

// f(r, k, e) for each element (r, k) of row r of a (block) CSR pattern, e = its position in the
// expanded order (block columns in metadata order, elements ascending inside a block); rows
// split over threads.
template <typename F>
void for_expanded(const int32_t* ptr, const int32_t* idx, int64_t R, int64_t br, int64_t bc, int64_t ncols,
                  const std::vector<int64_t>& eptr, F&& f) {
  at::parallel_for(0, R, eptr[R] < (int64_t(1) << 15) ? std::max<int64_t>(R, 1) : 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t rb = r / br;
      int64_t pos = eptr[r];
      for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
        const int64_t k0 = int64_t(idx[j]) * bc, k1 = std::min(k0 + bc, ncols);
        for (int64_t kk = k0; kk < k1; ++kk) f(r, kk, pos++);
      }
    }
  });
}

template <typename S>
void direct_fwd(const ConvGeom& g, const S* xp, const S* wp, const S* bp, const int32_t* ptr, const int32_t* idx,
                int64_t bo, int64_t bk, S* yp) {
  const Kernels<S>& k = kernels<S>();
  const DirectGeom d(g);
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps, P = g.Ho * g.Wo;
  // block rows: four rows at a time share every window load (direct_panel4, up to 4 vectors wide);
  // only for bo a multiple of 4, so the groups never straddle a row chunk (kRowBlock rows)
  const bool grouped = bo % 4 == 0;
  const int nv = direct_width<S>(k, grouped ? std::vector<int64_t>{2, 4} : std::vector<int64_t>{2, 4, 8},
                                 d.phases * g.C, d);
  const int64_t T = (int64_t(2) << nv) * k.lanes, ntiles = cdiv(d.G, T);
  const int64_t CS = round_up(ntiles * T + d.maxoff, k.lanes);
  S* xq = Buf<S>(d.phases * g.C * CS, kDirX).get();
  build_planes(xp, d, CS, xq);
  // per nonzero: the weight and the offset of its shifted view
  const std::vector<int64_t> eptr = expanded_ptr(ptr, idx, g.O, bo, bk, Kc);
  const int64_t nnz = eptr[g.O];
  S* val = Buf<S>(nnz, kDirV).get();
  int64_t* off = Buf<int64_t>(nnz, kDirO).get();
  for_expanded(ptr, idx, g.O, bo, bk, Kc, eptr, [&](int64_t r, int64_t kk, int64_t e) {
    const int64_t c = kk / taps, tap = kk % taps, i = tap / g.kw, j = tap % g.kw;
    off[e] = (d.phase(i, j) * g.C + c) * CS + d.shift(i, j);
    val[e] = wp[r * Kc + kk];
  });
  const int64_t rch = row_chunks(ntiles, g.O), chunk_rows = cdiv(cdiv(g.O, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    Buf<S> ot(kRowBlock * T, kPanel);
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(g.O, r0 + chunk_rows);
      const int64_t q0 = tile * T, nt = std::min(T, d.G - q0);
      for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
        const int64_t re = std::min(r1, rr + kRowBlock);
        if (grouped) {
          for (int64_t r = rr; r < re;) {
            if (r + 4 <= re && r / bo == (r + 3) / bo) {
              k.conv2d.direct_panel4[nv](eptr.data(), off, val, r, 1, xq + q0, ot.get() + (r - rr) * T);
              r += 4;
            } else {
              k.conv2d.direct_panel[nv](eptr.data(), off, val, r, r + 1, xq + q0, ot.get() + (r - rr) * T);
              ++r;
            }
          }
        } else {
          k.conv2d.direct_panel[nv](eptr.data(), off, val, rr, re, xq + q0, ot.get());
        }
        grid_runs(d, q0, nt, [&](int64_t n, int64_t y, int64_t x0, int64_t t, int64_t len) {
          if (y >= g.Ho || x0 >= g.Wo) return;
          const int64_t m = std::min(len, g.Wo - x0);
          for (int64_t o = rr; o < re; ++o) {
            const S* s = ot.get() + (o - rr) * T + t;
            S* dst = yp + (n * g.O + o) * P + y * g.Wo + x0;
            const S b = bp ? bp[o] : S(0);
            for (int64_t q = 0; q < m; ++q) dst[q] = s[q] + b;
          }
        });
      }
    }
  });
}

// The transposed product: plane (c, phase) of the input gradient on the grid gathers, at grid
// position q, w * dyg[o][q - shift] over the nonzeros (o, c, i, j) whose tap has that phase; dyg
// has a leading zero margin of the largest shift and zeros at its dropped positions, so reads
// that wrap into a previous row or image pick up zeros.  The planes are then written into dx
// (cropping the padding); pixels that no tap reads keep the zero of the allocation.
template <typename S>
void direct_dx(const ConvGeom& g, const S* dyp, const S* wp, const int32_t* ccol, const int32_t* row, int64_t bo,
               int64_t bk, S* dxp) {
  const Kernels<S>& k = kernels<S>();
  const DirectGeom d(g);
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps, R = d.phases * g.C;
  // channels of one block row of W^T (cg of them, all taps) have the same offsets: four at a time
  // share every window load (direct_panel4) when cg is a multiple of 4 and a row chunk holds whole
  // groups of 4 channels x phases
  const int64_t cg = bk % taps == 0 ? bk / taps : 0;
  const bool grouped = cg > 0 && cg % 4 == 0 && kRowBlock % (4 * d.phases) == 0;
  const int nv = direct_width<S>(k, grouped ? std::vector<int64_t>{2, 4} : std::vector<int64_t>{2, 4, 8}, g.O, d);
  const int64_t T = (int64_t(2) << nv) * k.lanes, ntiles = cdiv(d.G, T);
  const int64_t M = round_up(d.maxoff, k.lanes), DS = M + ntiles * T;
  S* dyg = Buf<S>(g.O * DS, kDirY).get();
  build_dy_grid(dyp, d, M, DS, dyg);
  // columns k of W (rows of W^T, block (bk, bo)) expanded over the output channels
  const std::vector<int64_t> kptr = expanded_ptr(ccol, row, Kc, bk, bo, g.O);
  // rows of the product: planes (c, phase), each the taps of channel c with that phase in order;
  // the phases of a channel are neighbours, so their interleaved writes to dx meet in cache
  std::vector<int64_t> eptr(R + 1, 0), tap_start(Kc);
  {
    std::vector<int64_t> count(R, 0);
    for (int64_t kk = 0; kk < Kc; ++kk) {
      const int64_t c = kk / taps, tap = kk % taps;
      count[c * d.phases + d.phase(tap / g.kw, tap % g.kw)] += kptr[kk + 1] - kptr[kk];
    }
    for (int64_t r = 0; r < R; ++r) eptr[r + 1] = eptr[r] + count[r];
    std::vector<int64_t> fill(eptr.begin(), eptr.end() - 1);
    for (int64_t kk = 0; kk < Kc; ++kk) {
      const int64_t c = kk / taps, tap = kk % taps, pr = c * d.phases + d.phase(tap / g.kw, tap % g.kw);
      tap_start[kk] = fill[pr];
      fill[pr] += kptr[kk + 1] - kptr[kk];
    }
  }
  const int64_t nnz = eptr[R];
  S* val = Buf<S>(nnz, kDirV).get();
  int64_t* off = Buf<int64_t>(nnz, kDirO).get();
  for_expanded(ccol, row, Kc, bk, bo, g.O, kptr, [&](int64_t kk, int64_t o, int64_t e) {
    const int64_t tap = kk % taps, pos = tap_start[kk] + (e - kptr[kk]);
    off[pos] = o * DS + M - d.shift(tap / g.kw, tap % g.kw);
    val[pos] = wp[o * Kc + kk];
  });
  const int64_t rch = row_chunks(ntiles, R), chunk_rows = cdiv(cdiv(R, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    Buf<S> ot(kRowBlock * T, kPanel);
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(R, r0 + chunk_rows);
      const int64_t q0 = tile * T, nt = std::min(T, d.G - q0);
      for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
        const int64_t re = std::min(r1, rr + kRowBlock);
        if (grouped) {
          // rr is a multiple of 4 * phases rows: walk groups of 4 channels, each phase in turn
          for (int64_t r = rr; r < re; r += 4 * d.phases) {
            const int64_t c = r / d.phases;
            if (r + 4 * d.phases <= re && c / cg == (c + 3) / cg) {
              for (int64_t ph = 0; ph < d.phases; ++ph)
                k.conv2d.direct_panel4[nv](eptr.data(), off, val, r + ph, d.phases, dyg + q0, ot.get() + (r + ph - rr) * T);
            } else {
              const int64_t e = std::min(re, r + 4 * d.phases);
              k.conv2d.direct_panel[nv](eptr.data(), off, val, r, e, dyg + q0, ot.get() + (r - rr) * T);
            }
          }
        } else {
          k.conv2d.direct_panel[nv](eptr.data(), off, val, rr, re, dyg + q0, ot.get());
        }
        grid_runs(d, q0, nt, [&](int64_t n, int64_t yq, int64_t x0, int64_t t, int64_t len) {
          for (int64_t pr = rr; pr < re; ++pr) {
            const int64_t c = pr / d.phases, ph = pr % d.phases, a = ph / g.sw, b = ph % g.sw;
            const int64_t u = a + g.sh * yq - g.ph;
            if (u < 0 || u >= g.H) continue;
            // x' in [x0, x0 + len) with 0 <= b + sw * x' - pw < W
            const int64_t lo = std::max(x0, cdiv(std::max<int64_t>(0, g.pw - b), g.sw));
            const int64_t hi = std::min(x0 + len, cdiv(g.W + g.pw - b, g.sw));
            if (lo >= hi) continue;
            const S* s = ot.get() + (pr - rr) * T + t - x0;
            S* dr = dxp + ((n * g.C + c) * g.H + u) * g.W + b - g.pw;
            if (g.sw == 1)
              std::memcpy(dr + lo, s + lo, (hi - lo) * sizeof(S));
            else
              for (int64_t q = lo; q < hi; ++q) dr[q * g.sw] = s[q];
          }
        });
      }
    }
  });
}

// dW[o, c, i, j] = sum_p dyg[o][p] * Xq[(phase, c)][p + shift(i, j)] over the grid, for the
// entries of the gradient pattern.  Split over the batch into a fixed number of tile chunks (from
// the shapes only), each with its own accumulator, summed in chunk order: the same result for any
// thread count.
template <typename S>
void direct_dw(const ConvGeom& g, const S* dyp, const S* xp, const int32_t* ptr, const int32_t* idx, int64_t bo,
               int64_t bk, S* dwp) {
  const Kernels<S>& k = kernels<S>();
  const DirectGeom d(g);
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps;
  // 16-vector tiles measured slower than 8 here (64 ch at 32x32, 128 ch at 16x16)
  const int nv = direct_width<S>(k, {4, 8}, d.phases * g.C, d);
  const int64_t T = (int64_t(4) << nv) * k.lanes, ntiles = cdiv(d.G, T);
  const int64_t CS = round_up(ntiles * T + d.maxoff, k.lanes), DS = ntiles * T;
  S* xq = Buf<S>(d.phases * g.C * CS, kDirX).get();
  build_planes(xp, d, CS, xq);
  S* dyg = Buf<S>(g.O * DS, kDirY).get();
  build_dy_grid(dyp, d, 0, DS, dyg);
  const PackedRows packed(ptr, idx, g.O, bo, bk, Kc);  // the same expanded order as for_expanded
  const int64_t nnz = packed.size();
  int64_t* off = Buf<int64_t>(nnz, kDirO).get();
  for_expanded(ptr, idx, g.O, bo, bk, Kc, packed.base, [&](int64_t, int64_t kk, int64_t e) {
    const int64_t c = kk / taps, tap = kk % taps, i = tap / g.kw, j = tap % g.kw;
    off[e] = (d.phase(i, j) * g.C + c) * CS + d.shift(i, j);
  });
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(ntiles / 2, 8));
  const int64_t per = cdiv(ntiles, nchunks);
  Buf<S> part_acc(nchunks * nnz, kMainA);
  std::fill(part_acc.data(), part_acc.data() + nchunks * nnz, S(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      S* acc = part_acc.data() + ch * nnz;
      for (int64_t tile = ch * per; tile < std::min(ntiles, (ch + 1) * per); ++tile) {
        const int64_t q0 = tile * T;
        k.conv2d.direct_sddmm[nv](packed.base.data(), off, 0, g.O, dyg + q0, DS, xq + q0, acc);
      }
    }
  });
  Buf<S> acc(nnz, kMainB);
  at::parallel_for(0, nnz, nnz * nchunks < (int64_t(1) << 16) ? std::max<int64_t>(nnz, 1) : 4096,
                   [&](int64_t b, int64_t e) {
                     for (int64_t i = b; i < e; ++i) {
                       S s0 = part_acc[i];
                       for (int64_t ch = 1; ch < nchunks; ++ch) s0 += part_acc[ch * nnz + i];
                       acc[i] = s0;
                     }
                   });
  packed.scatter(ptr, idx, bo, bk, Kc, acc.data(), dwp);
}

// ---------------------------------------------------------------------------------------------
// the per-shape choice between implicit GEMM and direct
// ---------------------------------------------------------------------------------------------

enum class ConvOp { kFwd, kDx, kDw };

// SPARSEKERN_CPU_CONV_ALGO: "auto" (default, or unset), "direct" or "gemm".  Read on every call
// (cheap), so tests can switch it.
int forced_algo() {
  const char* v = std::getenv("SPARSEKERN_CPU_CONV_ALGO");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "direct") == 0) return 1;
  if (std::strcmp(v, "gemm") == 0) return 2;
  TORCH_CHECK(false, "SPARSEKERN_CPU_CONV_ALGO: expected 'auto', 'direct' or 'gemm', got '", v, "'");
}

// Deterministic choice from the shapes and the layout (never from timings: results must not
// depend on the run), fitted to `python benchmarks/bench_conv_algo.py [--block B]`; the
// measurements are in benchmarks/results/cpu_conv_algo_fit.md.  The direct kernels load every
// window row unaligned (two cache lines per vector) and compute the dropped grid positions
// (DirectGeom::waste), so they win when the im2col / col2im copies they avoid are large next to
// the products: at least 16x16 outputs with at most 1.4 grid positions per output.  Block rows
// (bo a multiple of 4) share each window load across four rows in the forward (direct_panel4) and
// their weight gradient wins as well, which moves that crossover down to 8x8 outputs with at most
// 1.6 grid positions per output; their input gradient is mixed there and keeps the first rule.
// Denser patterns favour implicit GEMM (its copies are a fixed cost per tile, the products grow
// with the density, and the direct products pay for the unaligned loads), so the direct path
// needs a density of at most 0.15.  Strides whose phases no tap reads (a 1x1 kernel at stride 2)
// make the direct path copy planes it never uses, so those stay on implicit GEMM.
bool auto_direct(ConvOp op, const ConvGeom& g, int64_t nnz, int64_t bo, int64_t bk) {
  (void)bk;
  const DirectGeom d(g);
  if (d.used_phases() < d.phases) return false;
  const int64_t size = g.O * g.C * g.kh * g.kw;
  if (size == 0 || double(nnz) > 0.15 * double(size)) return false;
  const int64_t out = g.Ho * g.Wo;
  if (out >= 256 && d.waste() <= 1.4) return true;
  return bo % 4 == 0 && op != ConvOp::kDx && out >= 64 && d.waste() <= 1.6;
}

bool use_direct(ConvOp op, const ConvGeom& g, int64_t nnz, int64_t bo, int64_t bk) {
  const int f = forced_algo();
  if (f) return f == 1;
  return auto_direct(op, g, nnz, bo, bk);
}

Tensor conv2d_fwd(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias_, const Tensor& crow,
                  const Tensor& col, at::IntArrayRef block, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  check_float(x_, "x", 4);
  check_float(weight_, "weight", 4);
  check_same_dtype(weight_, "weight", x_, "x");
  const auto [bo, bk] = check_block(block);
  TORCH_CHECK(weight_.size(1) == x_.size(1), "weight: expected ", x_.size(1),
              " input channels (groups=1; x has that many), got shape ", weight_.sizes());
  const ConvGeom g = make_geom(x_.sizes(), weight_.sizes(), stride, padding, dilation);
  const int64_t Kc = g.C * g.kh * g.kw, P = g.Ho * g.Wo;
  Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_float(*bias_, "bias", 1);
    check_same_dtype(weight_, "weight", *bias_, "bias");
    TORCH_CHECK(bias_->size(0) == g.O, "bias: expected shape [", g.O, "], got ", bias_->sizes());
    bias = bias_->contiguous();
  }
  check_compressed(crow, col, cdiv(g.O, bo), cdiv(Kc, bk), "crow_indices", "col_indices");
  Tensor x = x_.contiguous(), w = weight_.contiguous();
  Tensor y = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  if (g.N == 0 || g.O == 0) return y;
  const bool direct = use_direct(ConvOp::kFwd, g, col.numel() * bo * bk, bo, bk);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::conv2d_fwd", [&] {
    using S = scalar_t;
    if (direct) {
      direct_fwd<S>(g, x.data_ptr<S>(), w.data_ptr<S>(), bias.defined() ? bias.data_ptr<S>() : nullptr,
                    crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk, y.data_ptr<S>());
      return;
    }
    const Kernels<S>& k = kernels<S>();
    SparseA<S> A{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk, g.O, Kc, w.data_ptr<S>(), Kc, 1};
    A.plan(k, g.N * P);
    const S* xp = x.data_ptr<S>();
    const S* bp = bias.defined() ? bias.data_ptr<S>() : nullptr;
    S* yp = y.data_ptr<S>();
    const int64_t T = A.width(k), Q = g.N * P, ntiles = cdiv(Q, T), rch = row_chunks(ntiles, g.O);
    const int64_t chunk_rows = cdiv(cdiv(g.O, rch), kRowBlock) * kRowBlock;
    at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
      Buf<S> bt(Kc * T, kTile), ot(kRowBlock * T, kPanel);
      std::vector<int32_t> cols;
      int64_t last = -1;
      for (int64_t task = tb; task < te; ++task) {
        const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(g.O, r0 + chunk_rows);
        if (r0 >= r1) continue;
        const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
        if (tile != last) {
          k.conv2d.im2col_tile(xp, g, q0, nt, T, 0, g.C, bt.get());
          last = tile;
        }
        for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
          const int64_t re = std::min(r1, rr + kRowBlock);
          A.rows(k, rr, re, bt.get(), ot.get(), cols);
          k.conv2d.conv_out_tile(ot.get(), g.O, P, q0, nt, T, rr, re, bp, yp);
        }
      }
    });
  });
  return y;
}

Tensor conv2d_dx(const Tensor& dy_, const Tensor& weight_, const Tensor& ccol, const Tensor& row,
                 at::IntArrayRef block, at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation) {
  check_float(dy_, "dy", 4);
  check_float(weight_, "weight", 4);
  check_same_dtype(weight_, "weight", dy_, "dy");
  check_size_arg(input_size, "input_size");
  const auto [bo, bk] = check_block(block);
  TORCH_CHECK(weight_.size(1) == input_size[1], "weight: expected ", input_size[1],
              " input channels (groups=1; input_size has that many), got shape ", weight_.sizes());
  const ConvGeom g = make_geom(input_size, weight_.sizes(), stride, padding, dilation);
  check_dy_shape(dy_, g);
  const int64_t Kc = g.C * g.kh * g.kw, P = g.Ho * g.Wo, taps = g.kh * g.kw;
  check_compressed(ccol, row, cdiv(Kc, bk), cdiv(g.O, bo), "ccol_indices", "row_indices");
  Tensor dy = dy_.contiguous(), w = weight_.contiguous();
  if (g.N == 0 || g.C == 0 || row.numel() == 0) return at::zeros({g.N, g.C, g.H, g.W}, dy.options());
  const bool direct = use_direct(ConvOp::kDx, g, row.numel() * bo * bk, bo, bk);
  // the direct path writes every pixel at stride 1 (its grid covers the padded input)
  Tensor dx = direct && g.sh == 1 && g.sw == 1 ? huge_page_hint(at::empty({g.N, g.C, g.H, g.W}, dy.options()))
                                               : at::zeros({g.N, g.C, g.H, g.W}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparsekern::conv2d_dx", [&] {
    using S = scalar_t;
    if (direct) {
      direct_dx<S>(g, dy.data_ptr<S>(), w.data_ptr<S>(), ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), bo, bk,
                   dx.data_ptr<S>());
      return;
    }
    const Kernels<S>& k = kernels<S>();
    SparseA<S> A{ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), bk, bo, Kc, g.O, w.data_ptr<S>(), 1, Kc};
    A.plan(k, g.N * P);
    // Each task owns a range of input channels of dx: all their rows of W^T, every tile, in order.
    std::vector<int64_t> cost(g.C, 0);
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t t = c * taps; t < (c + 1) * taps; ++t)
        cost[c] += int64_t(A.ptr[t / bk + 1] - A.ptr[t / bk]) * bo;
    const auto bounds = balanced_split(cost, std::min<int64_t>(g.C, at::get_num_threads()), 1);
    const int64_t T = A.width(k), Q = g.N * P, ntiles = cdiv(Q, T);
    const int64_t cgrp = std::max<int64_t>(1, kRowBlock / taps);  // channels per panel call
    const S* dyp = dy.data_ptr<S>();
    S* dxp = dx.data_ptr<S>();
    at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
      Buf<S> bt(g.O * T, kTile), ot(cgrp * taps * T, kPanel);
      std::vector<int32_t> cols;
      for (int64_t part = pb; part < pe; ++part) {
        const int64_t c0 = bounds[part], c1 = bounds[part + 1];
        if (c0 >= c1) continue;
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
          k.conv2d.conv_in_tile(dyp, g.O, P, q0, nt, T, 0, g.O, bt.get());
          for (int64_t cc = c0; cc < c1; cc += cgrp) {
            const int64_t ce = std::min(c1, cc + cgrp);
            A.rows(k, cc * taps, ce * taps, bt.get(), ot.get(), cols);
            k.conv2d.col2im_tile(ot.get(), g, q0, nt, T, cc, ce, dxp);
          }
        }
      }
    });
  });
  return dx;
}

Tensor conv2d_dw(const Tensor& dy_, const Tensor& x_, const Tensor& crow, const Tensor& col, at::IntArrayRef block,
                 at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation) {
  check_float(dy_, "dy", 4);
  check_float(x_, "x", 4);
  check_same_dtype(dy_, "dy", x_, "x");
  check_size_arg(weight_size, "weight_size");
  const auto [bo, bk] = check_block(block);
  TORCH_CHECK(weight_size[1] == x_.size(1), "weight_size: expected ", x_.size(1),
              " input channels (groups=1; x has that many), got ", weight_size);
  const ConvGeom g = make_geom(x_.sizes(), weight_size, stride, padding, dilation);
  check_dy_shape(dy_, g);
  const int64_t Kc = g.C * g.kh * g.kw, P = g.Ho * g.Wo;
  check_compressed(crow, col, cdiv(g.O, bo), cdiv(Kc, bk), "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  if (g.N == 0 || col.numel() == 0 || g.O == 0 || Kc == 0) return at::zeros({g.O, g.C, g.kh, g.kw}, x.options());
  Tensor dw = huge_page_hint(at::empty({g.O, g.C, g.kh, g.kw}, x.options()));  // all written by the scatter
  const bool direct = use_direct(ConvOp::kDw, g, col.numel() * bo * bk, bo, bk);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::conv2d_dw", [&] {
    using S = scalar_t;
    if (direct) {
      direct_dw<S>(g, dy.data_ptr<S>(), x.data_ptr<S>(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk,
                   dw.data_ptr<S>());
      return;
    }
    const Kernels<S>& k = kernels<S>();
    const int32_t* ptr = crow.data_ptr<int32_t>();
    const int32_t* idx = col.data_ptr<int32_t>();
    const int nv = pick_width<S>(k, {4, 8, 16}, Kc, g.N * P);
    const int64_t T = (int64_t(4) << nv) * k.lanes, Q = g.N * P, ntiles = cdiv(Q, T);
    const S* xp = x.data_ptr<S>();
    const S* dyp = dy.data_ptr<S>();
    const PackedRows packed(ptr, idx, g.O, bo, bk, Kc);
    const int64_t nnz = packed.size();
    // Work is split over the batch: a fixed number of tile chunks (from the shapes only, never the
    // thread count), each accumulating into its own buffer, summed in chunk order afterwards.  So
    // each im2col tile is built once (a split over rows would rebuild every tile per thread) and the
    // result is the same for any thread count.
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(ntiles / 2, 8));
    const int64_t per = cdiv(ntiles, nchunks);
    Buf<S> part_acc(nchunks * nnz, kMainA);
    std::fill(part_acc.data(), part_acc.data() + nchunks * nnz, S(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      Buf<S> bt(Kc * T, kTile), at_(kRowBlock * T, kPanel);
      std::vector<int32_t> cols;
      for (int64_t ch = cb; ch < ce; ++ch) {
        S* acc = part_acc.data() + ch * nnz;
        for (int64_t tile = ch * per; tile < std::min(ntiles, (ch + 1) * per); ++tile) {
          const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
          k.conv2d.im2col_tile(xp, g, q0, nt, T, 0, g.C, bt.get());
          for (int64_t rr = 0; rr < g.O; rr += kRowBlock) {
            const int64_t re = std::min(g.O, rr + kRowBlock);
            if (ptr[rr / bo] == ptr[cdiv(re, bo)]) continue;
            k.conv2d.conv_in_tile(dyp, g.O, P, q0, nt, T, rr, re, at_.get());
            k.spmm.sddmm_tile[nv](ptr, idx, bo, bk, Kc, rr, re, at_.get(), bt.get(), acc, packed.base.data(), cols);
          }
        }
      }
    });
    Buf<S> acc(nnz, kMainB);
    at::parallel_for(0, nnz, nnz * nchunks < (int64_t(1) << 16) ? std::max<int64_t>(nnz, 1) : 4096,
                     [&](int64_t b, int64_t e) {
                       for (int64_t i = b; i < e; ++i) {
                         S s0 = part_acc[i];
                         for (int64_t ch = 1; ch < nchunks; ++ch) s0 += part_acc[ch * nnz + i];
                         acc[i] = s0;
                       }
                     });
    packed.scatter(ptr, idx, bo, bk, Kc, acc.data(), dw.data_ptr<S>());
  });
  return dw;
}

// ---------------------------------------------------------------------------------------------
// depthwise conv2d (groups = C_in, weight [C_out, 1, kh, kw], C_out a multiple of C_in), direct
// ---------------------------------------------------------------------------------------------

void check_depthwise(const ConvGeom& g, int64_t w_in) {
  TORCH_CHECK(w_in == 1, "weight: expected shape [C_out, 1, kh, kw] for a depthwise conv, got ", w_in,
              " input channels per group");
  TORCH_CHECK(g.C > 0 && g.O % g.C == 0, "weight: depthwise conv needs C_out (", g.O,
              ") to be a multiple of the input channels (", g.C, ")");
}

Tensor dwconv2d_fwd(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias_, const Tensor& crow,
                    const Tensor& col, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_float(x_, "x", 4);
  check_float(weight_, "weight", 4);
  check_same_dtype(weight_, "weight", x_, "x");
  const ConvGeom g = make_geom(x_.sizes(), weight_.sizes(), stride, padding, dilation);
  check_depthwise(g, weight_.size(1));
  Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_float(*bias_, "bias", 1);
    check_same_dtype(weight_, "weight", *bias_, "bias");
    TORCH_CHECK(bias_->size(0) == g.O, "bias: expected shape [", g.O, "], got ", bias_->sizes());
    bias = bias_->contiguous();
  }
  check_compressed(crow, col, g.O, g.kh * g.kw, "crow_indices", "col_indices");
  Tensor x = x_.contiguous(), w = weight_.contiguous();
  Tensor y = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::dwconv2d_fwd", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const int64_t P = g.Ho * g.Wo, mult = g.O / g.C;
    const S* xp = x.data_ptr<S>();
    const S* wp = w.data_ptr<S>();
    const S* bp = bias.defined() ? bias.data_ptr<S>() : nullptr;
    S* yp = y.data_ptr<S>();
    at::parallel_for(0, g.N * g.O, 4, [&](int64_t b, int64_t e) {
      for (int64_t pl = b; pl < e; ++pl) {
        const int64_t n = pl / g.O, o = pl % g.O;
        k.dwconv2d.dw_fwd_plane(xp + (n * g.C + o / mult) * g.H * g.W, wp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                                o, g, bp ? bp[o] : S(0), yp + pl * P);
      }
    });
  });
  return y;
}

Tensor dwconv2d_dx(const Tensor& dy_, const Tensor& weight_, const Tensor& crow, const Tensor& col,
                   at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  check_float(dy_, "dy", 4);
  check_float(weight_, "weight", 4);
  check_same_dtype(weight_, "weight", dy_, "dy");
  check_size_arg(input_size, "input_size");
  const ConvGeom g = make_geom(input_size, weight_.sizes(), stride, padding, dilation);
  check_depthwise(g, weight_.size(1));
  check_dy_shape(dy_, g);
  check_compressed(crow, col, g.O, g.kh * g.kw, "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), w = weight_.contiguous();
  Tensor dx = at::zeros({g.N, g.C, g.H, g.W}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparsekern::dwconv2d_dx", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const int64_t P = g.Ho * g.Wo, mult = g.O / g.C;
    const S* dyp = dy.data_ptr<S>();
    const S* wp = w.data_ptr<S>();
    S* dxp = dx.data_ptr<S>();
    at::parallel_for(0, g.N * g.C, 4, [&](int64_t b, int64_t e) {
      for (int64_t pl = b; pl < e; ++pl) {
        const int64_t n = pl / g.C, c = pl % g.C;
        for (int64_t o = c * mult; o < (c + 1) * mult; ++o)
          k.dwconv2d.dw_dx_plane(dyp + (n * g.O + o) * P, wp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), o, g,
                                 dxp + pl * g.H * g.W);
      }
    });
  });
  return dx;
}

Tensor dwconv2d_dw(const Tensor& dy_, const Tensor& x_, const Tensor& crow, const Tensor& col,
                   at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  check_float(dy_, "dy", 4);
  check_float(x_, "x", 4);
  check_same_dtype(dy_, "dy", x_, "x");
  check_size_arg(weight_size, "weight_size");
  const ConvGeom g = make_geom(x_.sizes(), weight_size, stride, padding, dilation);
  check_depthwise(g, weight_size[1]);
  check_dy_shape(dy_, g);
  check_compressed(crow, col, g.O, g.kh * g.kw, "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  Tensor dw = at::zeros({g.O, 1, g.kh, g.kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::dwconv2d_dw", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const S* xp = x.data_ptr<S>();
    const S* dyp = dy.data_ptr<S>();
    S* out = dw.data_ptr<S>();
    at::parallel_for(0, g.O, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o)
        k.dwconv2d.dw_dw_row(xp, dyp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), o, g.O / g.C, g, out);
    });
  });
  return dw;
}

// Which algorithm conv2d_{fwd,dx,dw} run for a shape: "direct" or "gemm" (the automatic choice,
// or the one SPARSEKERN_CPU_CONV_ALGO forces).  nnz = elements inside the pattern.
std::string conv2d_algo(c10::string_view op_, at::IntArrayRef input_size, at::IntArrayRef weight_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef block,
                        int64_t nnz) {
  const std::string op(op_.data(), op_.size());
  ConvOp o;
  if (op == "fwd")
    o = ConvOp::kFwd;
  else if (op == "dx")
    o = ConvOp::kDx;
  else if (op == "dw")
    o = ConvOp::kDw;
  else
    TORCH_CHECK(false, "op: expected 'fwd', 'dx' or 'dw', got '", op, "'");
  check_size_arg(input_size, "input_size");
  check_size_arg(weight_size, "weight_size");
  TORCH_CHECK(weight_size[1] == input_size[1], "weight_size: expected ", input_size[1],
              " input channels (groups=1; input_size has that many), got ", weight_size);
  const auto [bo, bk] = check_block(block);
  TORCH_CHECK(nnz >= 0, "nnz: expected a non-negative count, got ", nnz);
  const ConvGeom g = make_geom(input_size, weight_size, stride, padding, dilation);
  return use_direct(o, g, nnz, bo, bk) ? "direct" : "gemm";
}

std::string cpu_isa(c10::string_view request) {
  const std::string req(request.data(), request.size());
  const char* got = select_isa(req.c_str());
  if (!got) {
    std::string have;
    for (auto s : supported_isas()) have += std::string(have.empty() ? "" : ", ") + s;
    TORCH_CHECK(false, "request: unknown or unsupported instruction set '", req, "'; this CPU supports: ", have);
  }
  return got;
}

// How at::parallel_for runs in this build: "openmp" when compiled with OpenMP (torch's own
// runtime then spreads the work over torch.get_num_threads() threads), else "serial".
std::string parallel_backend() {
#ifdef _OPENMP
  return "openmp";
#else
  return "serial";
#endif
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY(sparsekern, m) {
  m.def(
      "linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor crow_indices, Tensor col_indices, int[2] block, "
      "Tensor? win_ptr=None, Tensor? win_idx=None, int window=0) -> Tensor");
  m.def(
      "linear_dx(Tensor dy, Tensor weight, Tensor ccol_indices, Tensor row_indices, int[2] block, "
      "Tensor? win_ptr=None, Tensor? win_idx=None, int window=0) -> Tensor");
  m.def("csr_windows(Tensor crow_indices, Tensor col_indices, int ncols, int window) -> (Tensor, Tensor)");
  m.def(
      "linear_dw(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int[2] block, "
      "Tensor? win_ptr=None, Tensor? win_idx=None, int window=0) -> Tensor");
  m.def(
      "conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor crow_indices, Tensor col_indices, int[2] block, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "conv2d_dx(Tensor dy, Tensor weight, Tensor ccol_indices, Tensor row_indices, int[2] block, int[4] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "conv2d_dw(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int[2] block, int[4] weight_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "dwconv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor crow_indices, Tensor col_indices, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "dwconv2d_dx(Tensor dy, Tensor weight, Tensor crow_indices, Tensor col_indices, int[4] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "dwconv2d_dw(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int[4] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  // Not a tensor op: reports (or, for tests, selects) the instruction set the kernels use.
  m.def("cpu_isa(str request=\"\") -> str", &sparsekern::cpu_isa);
  // Not a tensor op: the conv2d algorithm ("direct" or "gemm") the ops pick for a shape.
  m.def(
      "conv2d_algo(str op, int[4] input_size, int[4] weight_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int[2] block, int nnz) -> str",
      &sparsekern::conv2d_algo);
  // Not a tensor op: how the kernels are threaded ("openmp" or "serial").
  m.def("parallel_backend() -> str", &sparsekern::parallel_backend);
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("linear_fwd", &sparsekern::linear_fwd);
  m.impl("linear_dx", &sparsekern::linear_dx);
  m.impl("linear_dw", &sparsekern::linear_dw);
  m.impl("csr_windows", &sparsekern::csr_windows);
  m.impl("conv2d_fwd", &sparsekern::conv2d_fwd);
  m.impl("conv2d_dx", &sparsekern::conv2d_dx);
  m.impl("conv2d_dw", &sparsekern::conv2d_dw);
  m.impl("dwconv2d_fwd", &sparsekern::dwconv2d_fwd);
  m.impl("dwconv2d_dx", &sparsekern::dwconv2d_dx);
  m.impl("dwconv2d_dw", &sparsekern::dwconv2d_dw);
}
