// Index metadata from boolean masks, and the in-place mask update behind set_mask: the work a
// mask change costs before the next step (sparsekern/formats.py is the specification; its
// pure-PyTorch builders stay as the fallback and the reference the tests compare with).
//
//   csr_from_mask(mask, dtype)   CSR + CSC + transpose_perm of a 2-D bool matrix, exactly the
//                                tensors formats._build_csr_torch returns;
//   tile_any_all(mask, bo, bk)   per tile of the padded matrix: any entry set / every entry set
//                                (a tile is constant iff both agree; padding is not part of a tile);
//   update_masks_(...)           set_mask / set_grad_mask in one pass over the masks and weight.
//
// The masks are read 8 bytes at a time; all-zero words are skipped.  Work is split into row (or
// element) ranges with at::parallel_for; each output element has one writer and a fixed position,
// so the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace sparsekern {
namespace {

using at::Tensor;

constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL;
constexpr uint64_t kHigh = 0x8080808080808080ULL;
constexpr uint64_t kOnes = 0x0101010101010101ULL;

inline uint64_t load8(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

inline void store8(uint8_t* p, uint64_t w) { std::memcpy(p, &w, 8); }

// The high bit of each byte of w that is not zero (any nonzero byte counts as true).
inline uint64_t nonzero_bytes(uint64_t w) { return (((w & kLow7) + kLow7) | w) & kHigh; }

// Number of set high bits (0..8) without a popcount instruction (not in baseline x86-64).
inline int64_t count_high(uint64_t h) { return int64_t(((h >> 7) * kOnes) >> 56); }

// Nonzero bytes in p[0, n).
int64_t count_nonzero(const uint8_t* p, int64_t n) {
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t w = load8(p + i);
    if (w) c += count_high(nonzero_bytes(w));
  }
  for (; i < n; ++i) c += p[i] != 0;
  return c;
}

// Calls f(j) for each nonzero byte p[j], j ascending.
template <typename F>
inline void for_each_nonzero(const uint8_t* p, int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t h = load8(p + i);
    if (!h) continue;
    h = nonzero_bytes(h);
    while (h) {
      f(i + (__builtin_ctzll(h) >> 3));
      h &= h - 1;
    }
  }
  for (; i < n; ++i)
    if (p[i]) f(i);
}

void check_bool_matrix(const Tensor& mask, const char* name) {
  TORCH_CHECK(mask.device().is_cpu(), name, ": expected a CPU tensor, got one on ", mask.device());
  TORCH_CHECK(mask.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ", mask.layout());
  TORCH_CHECK(mask.scalar_type() == at::kBool, name, ": expected dtype torch.bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, name, ": expected a 2-D [rows, cols] tensor (conv masks viewed as [out, rest]), got shape ",
              mask.sizes());
}

// Row ranges [bounds[c], bounds[c+1]) of roughly equal cost (bytes scanned plus entries written).
std::vector<int64_t> balanced_rows(const std::vector<int64_t>& ptr, int64_t rows, int64_t cols, int64_t parts) {
  const int64_t words = (cols + 7) / 8 + 1;
  const auto cost = [&](int64_t r) { return ptr[r] + r * words; };
  std::vector<int64_t> b(parts + 1, rows);
  b[0] = 0;
  const int64_t total = cost(rows);
  int64_t r = 0;
  for (int64_t c = 1; c < parts; ++c) {
    const int64_t target = total / parts * c + (total % parts) * c / parts;
    while (r < rows && cost(r) < target) ++r;
    b[c] = r;
  }
  return b;
}

template <typename I>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> csr_impl(const uint8_t* m, int64_t R, int64_t C,
                                                            at::TensorOptions opt) {
  // 1. entries per row
  std::vector<int64_t> ptr(R + 1, 0);
  at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(C, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) ptr[r + 1] = count_nonzero(m + r * C, C);
                   });
  for (int64_t r = 0; r < R; ++r) ptr[r + 1] += ptr[r];
  const int64_t nnz = ptr[R];
  TORCH_CHECK(nnz <= int64_t(std::numeric_limits<I>::max()), "dtype: ", nnz,
              " nonzeros overflow the requested index dtype; use int64");
  Tensor crow = at::empty({R + 1}, opt), col = at::empty({nnz}, opt);
  Tensor ccol = at::empty({C + 1}, opt), rowt = at::empty({nnz}, opt), perm = at::empty({nnz}, opt);
  I* pc = crow.data_ptr<I>();
  for (int64_t r = 0; r <= R; ++r) pc[r] = I(ptr[r]);

  // Parts: one per thread, fewer when the per-part column counters would get large.
  int64_t parts = std::min<int64_t>({int64_t(at::get_num_threads()), std::max<int64_t>(R, 1),
                                     std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(C, 1))});
  parts = std::max<int64_t>(parts, 1);
  const std::vector<int64_t> bounds = balanced_rows(ptr, R, C, parts);
  // cnt[p * C + j]: entries of column j in part p; then the first CSC slot of part p in column j.
  std::vector<int64_t> cnt(size_t(parts) * size_t(C), 0);

  // 2. CSR columns, counting each part's entries per column on the way
  I* pcol = col.data_ptr<I>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* cc = cnt.data() + p * C;
      for (int64_t r = bounds[p]; r < bounds[p + 1]; ++r) {
        I* out = pcol + ptr[r];
        for_each_nonzero(m + r * C, C, [&](int64_t j) {
          *out++ = I(j);
          ++cc[j];
        });
      }
    }
  });

  // 3. column pointers and each part's starting slot per column
  I* pcc = ccol.data_ptr<I>();
  int64_t run = 0;
  for (int64_t j = 0; j < C; ++j) {
    pcc[j] = I(run);
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t k = cnt[p * C + j];
      cnt[p * C + j] = run;
      run += k;
    }
  }
  pcc[C] = I(run);

  // 4. CSC rows and the CSR position of each CSC entry: rows ascend within a column because the
  //    parts cover ascending row ranges and each walks its rows in order
  I* prow = rowt.data_ptr<I>();
  I* pperm = perm.data_ptr<I>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* slot = cnt.data() + p * C;
      for (int64_t r = bounds[p]; r < bounds[p + 1]; ++r) {
        for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
          const int64_t s = slot[pcol[k]]++;
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
          const int64_t c0 = j * bk, len = std::min(C, c0 + bk) - c0;
          const int64_t n = count_nonzero(row + c0, len);
          a[j] = a[j] || n > 0;
          l[j] = l[j] && n == len;
        }
      }
    }
  });
  return {any, all};
}

// Zeroes w[i] wherever keep[i] is 0, writing only elements that are not already +0 (so lines of
// already-pruned weights are read but not dirtied).  E: an unsigned type of the weight's size.
template <typename E>
void zero_outside(E* w, const uint8_t* keep, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const uint64_t k = load8(keep + i);
    if (k == kOnes) continue;
    E stray = 0;
    for (int b = 0; b < 8; ++b) stray |= keep[i + b] ? E(0) : w[i + b];
    if (stray)
      for (int b = 0; b < 8; ++b) w[i + b] = keep[i + b] ? w[i + b] : E(0);
  }
  for (; i < i1; ++i)
    if (!keep[i]) w[i] = 0;
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
  constexpr int64_t kGrain = int64_t(1) << 16;  // a multiple of 8: chunks start on word boundaries
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
    uint64_t diff = 0;
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      const uint64_t k = load8(nm + i), mo = load8(M + i), go = load8(G + i);
      const uint64_t g = gn ? load8(gn + i) : (k & (go | ~mo) & kOnes);
      diff |= g ^ k;
      if (g != go) store8(G + i, g);  // unchanged words are not written
      if (k != mo) store8(M + i, k);
    }
    for (; i < i1; ++i) {
      const uint8_t k = nm[i];
      const uint8_t g = gn ? gn[i] : uint8_t(k & (G[i] | !M[i]) & 1);
      diff |= uint64_t(g ^ k);
      G[i] = g;
      M[i] = k;
    }
    if (diff) differ.store(true, std::memory_order_relaxed);
    switch (esize) {
      case 2: zero_outside(static_cast<uint16_t*>(w), nm, i0, i1); break;
      case 4: zero_outside(static_cast<uint32_t*>(w), nm, i0, i1); break;
      case 8: zero_outside(static_cast<uint64_t*>(w), nm, i0, i1); break;
      default: break;
    }
  });
  return differ.load() ? 1 : 2;
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
}
