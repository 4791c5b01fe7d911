// sparsekern linear ops on CPU: y = x @ W^T (+ b) and its two gradients for a sparse W, through the
// panel kernels (transposed tiles of the batch) or, for unstructured patterns at large batch, the
// window-major path that keeps each column window of the tile in L1.  Conventions in common.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/common.h"

namespace sparsekern {
namespace {

// out [N, R] = b [N, C] @ A^T (+ bias), A sparse; b, A and out stored as W (S, or bf16).
template <typename S, typename W, typename AV>
void spmm_rows(const W* b, int64_t N, const SparseA<S, W, AV>& A, const S* bias, W* out) {
  const Kernels<S>& k = kernels<S>();
  const int64_t T = A.width(k), R = A.R, C = A.C;
  for_tile_row_blocks(cdiv(N, T), R, [&] {
    // + 1: a pair tile's odd last column
    return [&, bt = Buf<S>((C + 1) * T, kTile), ot = Buf<S>(kRowBlock * T, kPanel), cols = std::vector<int32_t>()](
               int64_t tile, bool fresh, int64_t rr, int64_t re) mutable {
      const int64_t n0 = tile * T, nt = std::min(T, N - n0);
      if (fresh) {
        if constexpr (std::is_same_v<W, bf16>) {
          if (A.dp)
            bf16_pair_tile(b + n0 * C, C, nt, C, T, reinterpret_cast<uint32_t*>(bt.get()));
          else if (A.udp)
            bf16_lane_tile(b + n0 * C, C, nt, C, T, reinterpret_cast<uint16_t*>(bt.get()));
          else
            tile_from(k, b + n0 * C, C, nt, C, T, bt.get());
        } else {
          tile_from(k, b + n0 * C, C, nt, C, T, bt.get());
        }
      }
      // row blocks small enough that the panel output is still in L1 when transposed out
      A.rows(k, rr, re, bt.get(), ot.get(), cols);
      tile_to(k, ot.get(), re - rr, nt, T, bias ? bias + rr : nullptr, out + n0 * R + rr, R);
    };
  });
}

// window-major CSR (the csr_windows op that builds it lives with the other metadata builders, in
// build_meta.cpp)
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
  const bool mixed = is_mixed_bf16(x_, weight_);
  if (!mixed) check_same_dtype(weight_, "weight", x_, "x");
  const auto [bo, bk] = check_block(block);
  const int64_t N = x_.size(0), K = x_.size(1), M = weight_.size(0);
  TORCH_CHECK(weight_.size(1) == K, "weight: expected shape [out_features, ", K, "] (x has ", K,
              " features), got ", weight_.sizes());
  const Tensor bias = mixed ? check_bias(bias_, x_, M, "x") : check_bias(bias_, weight_, M);
  check_compressed(crow, col, cdiv(M, bo), cdiv(K, bk), "crow_indices", "col_indices");
  Tensor x = x_.contiguous(), w = weight_.contiguous();
  Tensor y = huge_page_hint(at::empty({N, M}, x.options()));
  if (N == 0 || M == 0) return y;
  const Windows win = check_windows(win_ptr, win_idx, window, M, K, col.numel(), bo == 1 && bk == 1);
  dispatch_float(x.scalar_type(), "sparsekern::linear_fwd", [&](auto s_, auto w_) {
    using S = decltype(s_);
    using W = decltype(w_);
    std::vector<S> btmp;
    const S* bp = bias_values<S, W>(bias, btmp);
    if constexpr (std::is_same_v<S, W>) {  // bf16 runs the panels (the window path is float-only)
      if (win.on()) {
        spmm_windowed<S>(x.data_ptr<S>(), N, M, K, w.data_ptr<S>(), K, 1, win, bp, y.data_ptr<S>());
        return;
      }
    }
    if constexpr (!std::is_same_v<S, W>) {
      if (mixed) {
        SparseA<S, W, float> A{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk, M, K, w.data_ptr<float>(), K,
                               1};
        A.plan(kernels<S>(), N);
        spmm_rows(data_of<W>(x), N, A, bp, data_of<W>(y));
        return;
      }
    }
    SparseA<S, W> A{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk, M, K, data_of<W>(w), K, 1};
    A.plan(kernels<S>(), N);
    spmm_rows<S, W>(data_of<W>(x), N, A, bp, data_of<W>(y));
  });
  return y;
}

Tensor linear_dx(const Tensor& dy_, const Tensor& weight_, const Tensor& ccol, const Tensor& row,
                 at::IntArrayRef block, const c10::optional<Tensor>& win_ptr, const c10::optional<Tensor>& win_idx,
                 int64_t window) {
  check_float(dy_, "dy", 2);
  check_float(weight_, "weight", 2);
  const bool mixed = is_mixed_bf16(dy_, weight_);
  if (!mixed) check_same_dtype(weight_, "weight", dy_, "dy");
  const auto [bo, bk] = check_block(block);
  const int64_t N = dy_.size(0), M = weight_.size(0), K = weight_.size(1);
  TORCH_CHECK(dy_.size(1) == M, "dy: expected shape [N, ", M, "] (weight has ", M, " rows), got ", dy_.sizes());
  check_compressed(ccol, row, cdiv(K, bk), cdiv(M, bo), "ccol_indices", "row_indices");
  Tensor dy = dy_.contiguous(), w = weight_.contiguous();
  Tensor dx = huge_page_hint(at::empty({N, K}, dy.options()));
  if (N == 0 || K == 0) return dx;
  const Windows win = check_windows(win_ptr, win_idx, window, K, M, row.numel(), bo == 1 && bk == 1);
  dispatch_float(dy.scalar_type(), "sparsekern::linear_dx", [&](auto s_, auto w_) {
    using S = decltype(s_);
    using W = decltype(w_);
    if constexpr (std::is_same_v<S, W>) {
      if (win.on()) {
        spmm_windowed<S>(dy.data_ptr<S>(), N, K, M, w.data_ptr<S>(), 1, K, win, nullptr, dx.data_ptr<S>());
        return;
      }
    }
    // A = W^T [K, M]: rows are W's columns, blocks (bk, bo).
    if constexpr (!std::is_same_v<S, W>) {
      if (mixed) {
        SparseA<S, W, float> A{ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), bk, bo, K, M, w.data_ptr<float>(), 1,
                               K};
        A.plan(kernels<S>(), N);
        spmm_rows(data_of<W>(dy), N, A, static_cast<const S*>(nullptr), data_of<W>(dx));
        return;
      }
    }
    SparseA<S, W> A{ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), bk, bo, K, M, data_of<W>(w), 1, K};
    A.plan(kernels<S>(), N);
    spmm_rows<S, W>(data_of<W>(dy), N, A, nullptr, data_of<W>(dx));
  });
  return dx;
}

// The bf16 weight gradient on vdpbf16ps: transposed bf16 tiles of T batch columns (no widening),
// dotted in pairs of batch columns, accumulated in float in pattern order, rounded once on store.
// Writes dw (dense [M, K], zeros outside the pattern; allocated by the caller) or, with `compact`,
// allocates and writes vals (the values on the pattern).
void bf16_dw_dp(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t N, int64_t M, int64_t K,
                const bf16* dy, const bf16* x, bool compact, Tensor& dw, Tensor& vals) {
  // the widest tile the batch fills whose x tile stays in about half of L2
  int64_t T = N > 32 ? 64 : 32;
  while (T < 256 && T < N && K * (2 * T) * 2 <= (int64_t(1) << 20)) T *= 2;
  if (T == 128 && N <= 96) T = 96;  // one tile either way; the same sums without the idle quarter
  const int64_t ntiles = cdiv(N, T);
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), cdiv(M, 4));
  const auto bounds = balanced_split(row_costs(ptr, M, bo, bk), parts, 1);
  const PackedRows packed(ptr, idx, M, bo, bk, K);
  Buf<float> acc(packed.size(), kMainA);
  std::fill(acc.get(), acc.get() + packed.size(), 0.0f);
  at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
    Buf<uint16_t> bt(K * T, kTile), at_(kRowBlock * T, kPanel);
    std::vector<int32_t> cols;
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t r0 = bounds[part], r1 = bounds[part + 1];
      if (r0 >= r1 || ptr[r0 / bo] == ptr[cdiv(r1, bo)]) continue;
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t n0 = tile * T, nt = std::min(T, N - n0);
        bf16_lane_tile(x + n0 * K, K, nt, K, T, bt.get());
        for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
          const int64_t re = std::min(r1, rr + kRowBlock);
          bf16_lane_tile(dy + n0 * M + rr, M, nt, re - rr, T, at_.get());
          bf16_sddmm_dp(ptr, idx, bo, bk, K, rr, re, T, at_.get(), bt.get(), acc.get(), packed.base.data(), cols);
        }
      }
    }
  });
  if (!compact) {
    packed.scatter(ptr, idx, bo, bk, K, acc.get(), data_of<bf16>(dw));
  } else {
    vals = at::empty({packed.size()}, dw.defined() ? dw.options() : at::TensorOptions().dtype(at::kBFloat16));
    bf16* o = data_of<bf16>(vals);
    for (int64_t j = 0; j < packed.size(); ++j) store(o[j], acc[j]);
  }
}

// dW on the pattern: dense [M, K] (zeros outside it), or with `compact` only the values on it,
// [nnz], in row-major order of the pattern's positions (the order of PackedRows).
Tensor linear_dw_impl(const Tensor& dy_, const Tensor& x_, const Tensor& crow, const Tensor& col, at::IntArrayRef block,
                      const c10::optional<Tensor>& win_ptr, const c10::optional<Tensor>& win_idx, int64_t window,
                      bool compact) {
  check_float(dy_, "dy", 2);
  check_float(x_, "x", 2);
  check_same_dtype(dy_, "dy", x_, "x");
  const auto [bo, bk] = check_block(block);
  const int64_t N = dy_.size(0), M = dy_.size(1), K = x_.size(1);
  TORCH_CHECK(x_.size(0) == N, "x: expected ", N, " rows (dy has ", N, "), got shape ", x_.sizes());
  check_compressed(crow, col, cdiv(M, bo), cdiv(K, bk), "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  const int32_t* ptr0 = crow.data_ptr<int32_t>();
  const int32_t* idx0 = col.data_ptr<int32_t>();
  if (compact) {
    const PackedRows packed(ptr0, idx0, M, bo, bk, K);
    if (N == 0 || M == 0 || K == 0 || col.numel() == 0) return at::zeros({packed.size()}, x.options());
    if (packed.size() == 0) return at::zeros({0}, x.options());
  }
  if (N == 0 || M == 0 || K == 0 || col.numel() == 0) return at::zeros({M, K}, x.options());
  // compact: the values come back in `vals`; `dw` is then only the whole-block path's scratch
  Tensor dw, vals;
  if (!compact) dw = huge_page_hint(at::empty({M, K}, x.options()));  // every element is written below
  const Windows win = check_windows(win_ptr, win_idx, window, M, K, col.numel(), bo == 1 && bk == 1);
  dispatch_float(x.scalar_type(), "sparsekern::linear_dw", [&](auto s_, auto w_) {
    using S = decltype(s_);
    using W = decltype(w_);
    constexpr bool plain = std::is_same_v<S, W>;  // bf16: the tile path below, accumulated in float
    const Kernels<S>& k = kernels<S>();
    const int32_t* ptr = crow.data_ptr<int32_t>();
    const int32_t* idx = col.data_ptr<int32_t>();
    if (plain && win.on()) {
      // window-major: tiles of 64 or 128 batch columns (a window of the x tile is then 16-32 KiB
      // of float), rows in blocks whose transposed dy slice stays in L2 across the windows
      const int nv = N > 4 * k.lanes ? 1 : 0;
      const int64_t T = (int64_t(4) << nv) * k.lanes, ntiles = cdiv(N, T);
      constexpr int64_t kRows = 256;
      const int64_t parts = std::min<int64_t>(at::get_num_threads(), cdiv(M, 4));
      const auto bounds = balanced_split(row_costs(ptr, M, 1, 1), parts, 1);
      const S* xp = x.data_ptr<S>();
      const S* dyp = dy.data_ptr<S>();
      Buf<S> scratch(compact ? 1 : col.numel(), kMainA);
      if (compact) vals = at::empty({col.numel()}, x.options());
      S* acc = compact ? vals.data_ptr<S>() : scratch.data();
      std::fill(acc, acc + col.numel(), S(0));
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
              k.linear.sddmm_win[nv](win.ptr, win.idx, ptr, M, win.nw, rr, re, at_.get(), bt.get(), acc,
                                     cursor.data());
            }
          }
        }
      });
      if (compact) return;
      const PackedRows packed(ptr, idx, M, 1, 1, K);
      packed.scatter(ptr, idx, 1, 1, K, acc, data_of<W>(dw));
      return;
    }
    if (plain && bk % k.lanes == 0 && M % bo == 0 && K % bk == 0) {
      // whole blocks of whole vectors: a dense GEMM per block on column strips of x
      const int64_t nrb = M / bo;
      std::vector<int64_t> cost(nrb);
      for (int64_t rb = 0; rb < nrb; ++rb) cost[rb] = int64_t(ptr[rb + 1] - ptr[rb]);
      const auto bounds = balanced_split(cost, std::min<int64_t>(at::get_num_threads(), nrb), 1);
      const S* xp = x.data_ptr<S>();
      const S* dyp = dy.data_ptr<S>();
      if (compact) dw = at::empty({M, K}, x.options());  // written whole, then gathered below
      S* out = dw.data_ptr<S>();
      Buf<S> xs(N * K, kMainA);  // x as vector-wide column strips, each contiguous over the batch
      const int64_t nstrips = K / k.lanes;
      at::parallel_for(0, nstrips, N * K < (int64_t(1) << 16) ? std::max<int64_t>(nstrips, 1) : 4,
                       [&](int64_t b, int64_t e) {
                         k.linear.strips_from_rows(xp, K, N, b * k.lanes, e * k.lanes, xs.get());
                       });
      at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
        Buf<S> ds(N * 16, kStrip);
        for (int64_t part = pb; part < pe; ++part)
          k.linear.bsr_dw_rows(ptr, idx, bo, bk, bounds[part], bounds[part + 1], dyp, M, xs.get(), N, out, K, ds.get());
      });
      if (compact) {
        const PackedRows packed(ptr, idx, M, bo, bk, K);
        vals = at::empty({packed.size()}, x.options());
        packed.gather(ptr, idx, bo, bk, K, out, vals.data_ptr<S>());
      }
      return;
    }
    if constexpr (!plain) {
      if (bf16_path() == Bf16Path::DPBF16) {
        bf16_dw_dp(ptr, idx, bo, bk, N, M, K, data_of<W>(dy), data_of<W>(x), compact, dw, vals);
        return;
      }
    }
    const int nv = pick_width<S>(k, kSddmmVecs, K, N);
    const int64_t T = kSddmmVecs[nv] * k.lanes, ntiles = cdiv(N, T);
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), cdiv(M, 4));
    const auto bounds = balanced_split(row_costs(ptr, M, bo, bk), parts, 1);
    const W* xw = data_of<W>(x);
    const W* dyw = data_of<W>(dy);
    const PackedRows packed(ptr, idx, M, bo, bk, K);
    // plain compact: accumulate straight into the result; bf16 accumulates in float scratch
    Buf<S> scratch(compact && plain ? 1 : packed.size(), kMainA);
    if (compact) vals = at::empty({packed.size()}, x.options());
    S* acc = compact && plain ? reinterpret_cast<S*>(vals.data_ptr()) : scratch.data();
    std::fill(acc, acc + packed.size(), S(0));
    at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
      Buf<S> bt(K * T, kTile), at_(kRowBlock * T, kPanel);
      std::vector<int32_t> cols;
      for (int64_t part = pb; part < pe; ++part) {
        const int64_t r0 = bounds[part], r1 = bounds[part + 1];
        if (r0 >= r1 || ptr[r0 / bo] == ptr[cdiv(r1, bo)]) continue;
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int64_t n0 = tile * T, nt = std::min(T, N - n0);
          tile_from(k, xw + n0 * K, K, nt, K, T, bt.get());
          for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
            const int64_t re = std::min(r1, rr + kRowBlock);
            tile_from(k, dyw + n0 * M + rr, M, nt, re - rr, T, at_.get());
            k.spmm.sddmm_tile[nv](ptr, idx, bo, bk, K, rr, re, at_.get(), bt.get(), acc, packed.base.data(),
                                  cols);
          }
        }
      }
    });
    if (!compact) {
      packed.scatter(ptr, idx, bo, bk, K, acc, data_of<W>(dw));
    } else if (!plain) {
      W* v = data_of<W>(vals);
      for (int64_t j = 0; j < packed.size(); ++j) store(v[j], acc[j]);
    }
  });
  return compact ? vals : dw;
}

Tensor linear_dw(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col, at::IntArrayRef block,
                 const c10::optional<Tensor>& win_ptr, const c10::optional<Tensor>& win_idx, int64_t window) {
  return linear_dw_impl(dy, x, crow, col, block, win_ptr, win_idx, window, false);
}

Tensor linear_dw_values(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col,
                        at::IntArrayRef block, const c10::optional<Tensor>& win_ptr,
                        const c10::optional<Tensor>& win_idx, int64_t window) {
  return linear_dw_impl(dy, x, crow, col, block, win_ptr, win_idx, window, true);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("linear_fwd", &sparsekern::linear_fwd);
  m.impl("linear_dx", &sparsekern::linear_dx);
  m.impl("linear_dw", &sparsekern::linear_dw);
  m.impl("linear_dw_values", &sparsekern::linear_dw_values);
}
