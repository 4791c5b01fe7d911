// sparsekern conv2d ops on CPU (groups = 1): y = conv2d(x, W) (+ b) and its two gradients for a
// sparse W, by one of two algorithms chosen per op and shape (use_direct): implicit GEMM (the
// panel kernels on im2col tiles of output positions) or direct convolution on shifted views of
// the input (cpu/conv_direct_impl.h).  Conventions in common.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/common.h"

namespace sparsekern {
namespace {

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
          std::fill(dst, dst + d.Wq, S{});
          continue;
        }
        const S* src = xc + u * g.W + b - g.pw;
        std::fill(dst, dst + lo, S{});
        if (g.sw == 1)
          std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(S));
        else
          for (int64_t q = lo; q < hi; ++q) dst[q] = src[q * g.sw];
        std::fill(dst + hi, dst + d.Wq, S{});
      }
      if (n == g.N - 1) std::fill(plane + d.G, plane + CS, S{});
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
      if (n == 0) std::fill(row, row + M, S{});
      S* dst = row + M + n * d.HW;
      const S* src = dy + (n * g.O + o) * P;
      for (int64_t y = 0; y < d.Hq; ++y) {
        S* dr = dst + y * d.Wq;
        if (y >= g.Ho) {
          std::fill(dr, dr + d.Wq, S{});
          continue;
        }
        std::memcpy(dr, src + y * g.Wo, g.Wo * sizeof(S));
        std::fill(dr + g.Wo, dr + d.Wq, S{});
      }
      if (n == g.N - 1) std::fill(row + M + d.G, row + DS, S{});
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

// The entries of the input-gradient product of the direct algorithm (direct_dx and its bf16
// twin), from W^T's metadata: rows are the planes (c, phase), each the taps of channel c with that
// phase in order (the phases of a channel are neighbours, so their interleaved writes to dx meet
// in cache); entry e of row r reads dyg at off[e] = o * DS + M - shift with weight val[e].  Returns
// the row pointers; val and off are the calling thread's scratch (kDirV, kDirO).
template <typename V>
std::vector<int64_t> dx_entries(const ConvGeom& g, const DirectGeom& d, const int32_t* ccol, const int32_t* row,
                                int64_t bo, int64_t bk, int64_t M, int64_t DS, const V* wp, V*& val, int64_t*& off) {
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps, R = d.phases * g.C;
  // columns k of W (rows of W^T, block (bk, bo)) expanded over the output channels
  const std::vector<int64_t> kptr = expanded_ptr(ccol, row, Kc, bk, bo, g.O);
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
  val = Buf<V>(nnz, kDirV).get();
  off = Buf<int64_t>(nnz, kDirO).get();
  V* v = val;
  int64_t* of = off;
  for_expanded(ccol, row, Kc, bk, bo, g.O, kptr, [&](int64_t kk, int64_t o, int64_t e) {
    const int64_t tap = kk % taps, pos = tap_start[kk] + (e - kptr[kk]);
    of[pos] = o * DS + M - d.shift(tap / g.kw, tap % g.kw);
    v[pos] = wp[o * Kc + kk];
  });
  return eptr;
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
  S* val;
  int64_t* off;
  const std::vector<int64_t> eptr = dx_entries(g, d, ccol, row, bo, bk, M, DS, wp, val, off);
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
                k.conv2d.direct_panel4[nv](eptr.data(), off, val, r + ph, d.phases, dyg + q0,
                                           ot.get() + (r + ph - rr) * T);
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

// The weight gradients are split over the batch: a fixed number of tile chunks (from the shapes
// only, never the thread count), each accumulating into its own buffer, summed in chunk order
// afterwards.  So each tile's copy of the input is built once (a split over rows would rebuild
// every tile per thread) and the result is the same for any thread count.  tiles(part, t0, t1)
// adds the terms of tiles [t0, t1) into part [nnz] (zeroed); returns the sum (nnz scalars of the
// calling thread's scratch).
template <typename S, typename F>
S* sum_tile_chunks(int64_t ntiles, int64_t nnz, F&& tiles) {
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(ntiles / 2, 8));
  const int64_t per = cdiv(ntiles, nchunks);
  Buf<S> part_acc(nchunks * nnz, kMainA);
  std::fill(part_acc.data(), part_acc.data() + nchunks * nnz, S(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) tiles(part_acc.data() + ch * nnz, ch * per, std::min(ntiles, (ch + 1) * per));
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
  return acc.data();
}

// dW[o, c, i, j] = sum_p dyg[o][p] * Xq[(phase, c)][p + shift(i, j)] over the grid, for the
// entries of the gradient pattern, split over the batch by sum_tile_chunks.
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
  const S* acc = sum_tile_chunks<S>(ntiles, nnz, [&](S* part, int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t q0 = tile * T;
      k.conv2d.direct_sddmm[nv](packed.base.data(), off, 0, g.O, dyg + q0, DS, xq + q0, part);
    }
  });
  packed.scatter(ptr, idx, bo, bk, Kc, acc, dwp);
}

// ---------------------------------------------------------------------------------------------
// direct conv2d in bf16 on vdpbf16ps (bf16_dot.cpp): the planes and the output-gradient grid stay
// bf16 (half the bytes of the float path), each panel instruction adds two nonzeros' products,
// the weight gradient dots pairs of positions; float accumulation, one rounding on store.
// ---------------------------------------------------------------------------------------------

// Tile width of the bf16 direct kernels: 128 where the window of `rows` planes still fits in about
// half of L2 and at least eight tiles remain, else 64.  From the shapes only.
int64_t direct_width_bf16(int64_t rows, const DirectGeom& d) {
  constexpr int64_t kWindowBytes = int64_t(1) << 20;
  if (rows * (128 + d.maxoff) * 2 <= kWindowBytes && cdiv(d.G, 128) >= 8) return 128;
  return 64;
}

// Each row's entries [eptr[r], eptr[r + 1]) (offsets off, weights val) as pairs of consecutive
// entries: pptr (pairs per row, prefix sums), off2 (two offsets per pair) and w2 (the bf16 pair);
// a row's odd last entry pairs with itself at weight zero.
struct DirectPairs {
  std::vector<int64_t> pptr;
  int64_t* off2;
  uint32_t* w2;
  DirectPairs(const std::vector<int64_t>& eptr, const int64_t* off, const bf16* val) {
    const int64_t R = int64_t(eptr.size()) - 1;
    pptr.assign(R + 1, 0);
    for (int64_t r = 0; r < R; ++r) pptr[r + 1] = pptr[r] + (eptr[r + 1] - eptr[r] + 1) / 2;
    off2 = Buf<int64_t>(2 * pptr[R], kStrip).get();
    w2 = Buf<uint32_t>(pptr[R], kMainC).get();
    for (int64_t r = 0; r < R; ++r) {
      int64_t p = pptr[r];
      for (int64_t e = eptr[r]; e < eptr[r + 1]; e += 2, ++p) {
        const bool two = e + 1 < eptr[r + 1];
        off2[2 * p] = off[e];
        off2[2 * p + 1] = two ? off[e + 1] : off[e];
        w2[p] = uint32_t(val[e].bits) | (two ? uint32_t(val[e + 1].bits) << 16 : 0u);
      }
    }
  }
};

void direct_fwd_bf16(const ConvGeom& g, const bf16* xp, const bf16* wp, const float* bp, const int32_t* ptr,
                     const int32_t* idx, int64_t bo, int64_t bk, bf16* yp) {
  const DirectGeom d(g);
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps, P = g.Ho * g.Wo;
  const int64_t T = direct_width_bf16(d.phases * g.C, d), ntiles = cdiv(d.G, T);
  const int64_t CS = round_up(ntiles * T + d.maxoff, 32);
  bf16* xq = Buf<bf16>(d.phases * g.C * CS, kDirX).get();
  build_planes(xp, d, CS, xq);
  const std::vector<int64_t> eptr = expanded_ptr(ptr, idx, g.O, bo, bk, Kc);
  const int64_t nnz = eptr[g.O];
  bf16* val = Buf<bf16>(nnz, kDirV).get();
  int64_t* off = Buf<int64_t>(nnz, kDirO).get();
  for_expanded(ptr, idx, g.O, bo, bk, Kc, eptr, [&](int64_t r, int64_t kk, int64_t e) {
    const int64_t c = kk / taps, tap = kk % taps, i = tap / g.kw, j = tap % g.kw;
    off[e] = (d.phase(i, j) * g.C + c) * CS + d.shift(i, j);
    val[e] = wp[r * Kc + kk];
  });
  const DirectPairs pairs(eptr, off, val);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xq);
  const int64_t rch = row_chunks(ntiles, g.O), chunk_rows = cdiv(cdiv(g.O, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    Buf<float> ot(kRowBlock * T, kPanel);
    std::vector<Bf16Run> runs;
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(g.O, r0 + chunk_rows);
      const int64_t q0 = tile * T, nt = std::min(T, d.G - q0);
      // the tile's output runs (the same for every row; dst relative to row 0 of image 0)
      runs.clear();
      grid_runs(d, q0, nt, [&](int64_t n, int64_t y, int64_t x0, int64_t t, int64_t len) {
        if (y >= g.Ho || x0 >= g.Wo) return;
        runs.push_back({t, std::min(len, g.Wo - x0), n * g.O * P + y * g.Wo + x0});
      });
      for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
        const int64_t re = std::min(r1, rr + kRowBlock);
        bf16_direct_dp(pairs.pptr.data(), pairs.off2, pairs.w2, rr, re, T, xb + q0, ot.get());
        bf16_round_runs(ot.get(), T, re - rr, bp ? bp + rr : nullptr, runs.data(), int64_t(runs.size()), yp + rr * P, P);
      }
    }
  });
}

// direct_dx in bf16 (the same rows, offsets and write-back).
void direct_dx_bf16(const ConvGeom& g, const bf16* dyp, const bf16* wp, const int32_t* ccol, const int32_t* row,
                    int64_t bo, int64_t bk, bf16* dxp) {
  const DirectGeom d(g);
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps, R = d.phases * g.C;
  const int64_t T = direct_width_bf16(g.O, d), ntiles = cdiv(d.G, T);
  const int64_t M = round_up(d.maxoff, 32), DS = M + ntiles * T;
  bf16* dyg = Buf<bf16>(g.O * DS, kDirY).get();
  build_dy_grid(dyp, d, M, DS, dyg);
  bf16* val;
  int64_t* off;
  const std::vector<int64_t> eptr = dx_entries(g, d, ccol, row, bo, bk, M, DS, wp, val, off);
  const DirectPairs pairs(eptr, off, val);
  const uint16_t* db = reinterpret_cast<const uint16_t*>(dyg);
  const int64_t rch = row_chunks(ntiles, R), chunk_rows = cdiv(cdiv(R, rch), kRowBlock) * kRowBlock;
  at::parallel_for(0, ntiles * rch, 1, [&](int64_t tb, int64_t te) {
    Buf<float> ot(kRowBlock * T, kPanel);
    for (int64_t task = tb; task < te; ++task) {
      const int64_t tile = task / rch, r0 = (task % rch) * chunk_rows, r1 = std::min(R, r0 + chunk_rows);
      const int64_t q0 = tile * T, nt = std::min(T, d.G - q0);
      for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
        const int64_t re = std::min(r1, rr + kRowBlock);
        bf16_direct_dp(pairs.pptr.data(), pairs.off2, pairs.w2, rr, re, T, db + q0, ot.get());
        grid_runs(d, q0, nt, [&](int64_t n, int64_t yq, int64_t x0, int64_t t, int64_t len) {
          for (int64_t pr = rr; pr < re; ++pr) {
            const int64_t c = pr / d.phases, ph = pr % d.phases, a = ph / g.sw, b = ph % g.sw;
            const int64_t u = a + g.sh * yq - g.ph;
            if (u < 0 || u >= g.H) continue;
            const int64_t lo = std::max(x0, cdiv(std::max<int64_t>(0, g.pw - b), g.sw));
            const int64_t hi = std::min(x0 + len, cdiv(g.W + g.pw - b, g.sw));
            if (lo >= hi) continue;
            const float* s = ot.get() + (pr - rr) * T + t - x0;
            bf16* dr = dxp + ((n * g.C + c) * g.H + u) * g.W + b - g.pw;
            if (g.sw == 1)
              bf16_round_row(s + lo, 0.0f, hi - lo, dr + lo);
            else
              for (int64_t q = lo; q < hi; ++q) store(dr[q * g.sw], s[q]);
          }
        });
      }
    }
  });
}

// direct_dw in bf16: float accumulators in pattern order (summed over the batch chunks), stored
// rounded into the dense dW (zeros outside the pattern) or, with `compact`, into vals.
void direct_dw_bf16(const ConvGeom& g, const bf16* dyp, const bf16* xp, const int32_t* ptr, const int32_t* idx,
                    int64_t bo, int64_t bk, bf16* dwp, bf16* vals) {
  const DirectGeom d(g);
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps;
  const int64_t T = direct_width_bf16(d.phases * g.C, d), ntiles = cdiv(d.G, T);
  const int64_t CS = round_up(ntiles * T + d.maxoff, 32), DS = ntiles * T;
  bf16* xq = Buf<bf16>(d.phases * g.C * CS, kDirX).get();
  build_planes(xp, d, CS, xq);
  bf16* dyg = Buf<bf16>(g.O * DS, kDirY).get();
  build_dy_grid(dyp, d, 0, DS, dyg);
  const PackedRows packed(ptr, idx, g.O, bo, bk, Kc);
  const int64_t nnz = packed.size();
  int64_t* off = Buf<int64_t>(nnz, kDirO).get();
  for_expanded(ptr, idx, g.O, bo, bk, Kc, packed.base, [&](int64_t, int64_t kk, int64_t e) {
    const int64_t c = kk / taps, tap = kk % taps, i = tap / g.kw, j = tap % g.kw;
    off[e] = (d.phase(i, j) * g.C + c) * CS + d.shift(i, j);
  });
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xq);
  const uint16_t* db = reinterpret_cast<const uint16_t*>(dyg);
  const float* acc = sum_tile_chunks<float>(ntiles, nnz, [&](float* part, int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t q0 = tile * T;
      bf16_direct_sddmm_dp(packed.base.data(), off, 0, g.O, T, db + q0, DS, xb + q0, part);
    }
  });
  if (vals) {
    for (int64_t j = 0; j < nnz; ++j) store(vals[j], acc[j]);
  } else {
    packed.scatter(ptr, idx, bo, bk, Kc, acc, dwp);
  }
}

// Implicit GEMM on a zero-padded copy of the planes: with the padding done once per call, the
// tile copies (im2col_tile / col2im_tile) run straight rows with no per-row range checks, which on
// small planes (8x8, 4x4) cost several times the products.  padded(g) is the geometry of the copy.
ConvGeom padded(const ConvGeom& g) {
  ConvGeom p = g;
  p.H += 2 * g.ph;
  p.W += 2 * g.pw;
  p.ph = p.pw = 0;
  return p;
}

// xp [N, C, H + 2 ph, W + 2 pw] = x with a zero border.
template <typename S>
void pad_planes(const S* x, const ConvGeom& g, S* xp) {
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  at::parallel_for(0, g.N * g.C, 16, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      S* d = xp + pl * Hp * Wp;
      const S* src = x + pl * g.H * g.W;
      std::fill(d, d + g.ph * Wp, S(0));
      for (int64_t y = 0; y < g.H; ++y) {
        S* r = d + (y + g.ph) * Wp;
        std::fill(r, r + g.pw, S(0));
        std::memcpy(r + g.pw, src + y * g.W, g.W * sizeof(S));
        std::fill(r + g.pw + g.W, r + Wp, S(0));
      }
      std::fill(d + (g.ph + g.H) * Wp, d + Hp * Wp, S(0));
    }
  });
}

// x [N, C, H, W] = the interior of xp (the inverse of pad_planes).
template <typename S>
void crop_planes(const S* xp, const ConvGeom& g, S* x) {
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  at::parallel_for(0, g.N * g.C, 16, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl)
      for (int64_t y = 0; y < g.H; ++y)
        std::memcpy(x + (pl * g.H + y) * g.W, xp + pl * Hp * Wp + (y + g.ph) * Wp + g.pw, g.W * sizeof(S));
  });
}

bool has_padding(const ConvGeom& g) { return g.ph > 0 || g.pw > 0; }

// ---------------------------------------------------------------------------------------------
// implicit GEMM in bf16 on vdpbf16ps (unstructured patterns): lane tiles (bf16_lane_tile's layout)
// built straight from the zero-padded bf16 planes and from dy, the linear kernels' unstructured
// panel (two nonzeros per instruction) and pair-of-positions weight gradient; float accumulation,
// one rounding on store.  For the small planes (4x4) where the direct grid wastes most of its work.
// ---------------------------------------------------------------------------------------------

// A tile's runs of consecutive output positions inside one output row (im2col) or one image (dy):
// tile positions [t, t + len) read from base + m * step.
struct LaneRun {
  int64_t t, len, base;
};

// bt[k * T + lane_pos(t)] = the im2col entry k of output position q0 + t of the unpadded geometry
// gp (k = c * taps + i * kw + j), for t < nt; zero for nt <= t < T (T <= 256).  Each row is
// gathered in position order into a scratch row, then put in lane order by bf16_lane_order.
void im2col_lane_tile(const uint16_t* __restrict x, const ConvGeom& gp, int64_t q0, int64_t nt, int64_t T,
                      std::vector<LaneRun>& runs, uint16_t* __restrict bt) {
  const int64_t P = gp.Ho * gp.Wo, plane = gp.H * gp.W;
  runs.clear();
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / P, p = q % P, oh = p / gp.Wo, ow0 = p % gp.Wo;
    const int64_t len = std::min(gp.Wo - ow0, nt - t);
    runs.push_back({t, len, n * gp.C * plane + oh * gp.sh * gp.W + ow0 * gp.sw});
    t += len;
  }
  alignas(64) uint16_t row[256];
  std::fill(row + nt, row + T, uint16_t(0));
  uint16_t* d = bt;
  for (int64_t c = 0; c < gp.C; ++c)
    for (int64_t i = 0; i < gp.kh; ++i)
      for (int64_t j = 0; j < gp.kw; ++j, d += T) {
        const uint16_t* xs = x + c * plane + i * gp.dh * gp.W + j * gp.dw;
        for (const LaneRun& r : runs) {
          const uint16_t* s = xs + r.base;
          if (gp.sw == 1)
            std::memcpy(row + r.t, s, r.len * sizeof(uint16_t));
          else
            for (int64_t m = 0; m < r.len; ++m) row[r.t + m] = s[m * gp.sw];
        }
        bf16_lane_order(row, T, d);
      }
}

// bt[(o - o0) * T + lane_pos(t)] = dy[n, o, p] of position q0 + t for o0 <= o < o1; zero past nt.
void dy_lane_tile(const uint16_t* __restrict dy, int64_t O, int64_t P, int64_t q0, int64_t nt, int64_t T, int64_t o0,
                  int64_t o1, std::vector<LaneRun>& runs, uint16_t* __restrict bt) {
  runs.clear();
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / P, p = q % P, len = std::min(P - p, nt - t);
    runs.push_back({t, len, n * O * P + p});
    t += len;
  }
  alignas(64) uint16_t row[256];
  std::fill(row + nt, row + T, uint16_t(0));
  for (int64_t o = o0; o < o1; ++o) {
    for (const LaneRun& r : runs) std::memcpy(row + r.t, dy + r.base + o * P, r.len * sizeof(uint16_t));
    bf16_lane_order(row, T, bt + (o - o0) * T);
  }
}

// The im2col lane tiles of one call: by permutes of whole small planes where Lane16Map qualifies
// (4x4 outputs), else gathered from a zero-padded copy of the planes (made once per call).
struct LaneIm2col {
  const ConvGeom& g;
  const ConvGeom gp;
  const Lane16Map map;
  const LaneShiftMap smap;
  const uint16_t* x;
  const uint16_t* xp = nullptr;
  LaneIm2col(const ConvGeom& g_, const bf16* x_)
      : g(g_), gp(padded(g_)), map(g_), smap(g_), x(reinterpret_cast<const uint16_t*>(x_)) {
    if (map.on || smap.on) return;
    xp = x;
    if (has_padding(g)) {
      uint16_t* xpad = Buf<uint16_t>(gp.N * gp.C * gp.H * gp.W, kDirX).get();
      pad_planes(x, g, xpad);
      xp = xpad;
    }
  }
  void tile(int64_t q0, int64_t nt, int64_t T, std::vector<LaneRun>& runs, uint16_t* bt) const {
    if (bf16_im2col_lane16(x, g, map, q0, T, bt) || bf16_im2col_shift(x, g, smap, q0, T, bt)) return;
    TORCH_INTERNAL_ASSERT(xp, "im2col lane tile: the small-plane path did not run");
    im2col_lane_tile(xp, gp, q0, nt, T, runs, bt);
  }
};

void gemm_fwd_bf16(const ConvGeom& g, const bf16* x, const bf16* w, const float* bp, const int32_t* ptr,
                   const int32_t* idx, bf16* y) {
  const int64_t Kc = g.C * g.kh * g.kw, P = g.Ho * g.Wo, Q = g.N * P;
  const Kernels<float>& k = kernels<float>();
  SparseA<float, bf16> A{ptr, idx, 1, 1, g.O, Kc, w, Kc, 1};
  A.plan(k, Q);
  TORCH_INTERNAL_ASSERT(A.udp, "gemm_fwd_bf16 runs on the avx512_bf16 path only");
  const LaneIm2col cols_of(g, x);
  const int64_t T = A.width(k);
  for_tile_row_blocks(cdiv(Q, T), g.O, [&] {
    return [&, bt = Buf<uint16_t>(Kc * T, kTile), ot = Buf<float>(kRowBlock * T, kPanel), cols = std::vector<int32_t>(),
            runs = std::vector<Bf16Run>(), lruns = std::vector<LaneRun>()](int64_t tile, bool fresh, int64_t rr,
                                                                           int64_t re) mutable {
      const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
      if (fresh) {
        cols_of.tile(q0, nt, T, lruns, bt.get());
        runs.clear();  // the tile's output runs (dst relative to channel 0)
        for (int64_t t = 0; t < nt;) {
          const int64_t q = q0 + t, n = q / P, p = q % P, len = std::min(P - p, nt - t);
          runs.push_back({t, len, n * g.O * P + p});
          t += len;
        }
      }
      A.rows(k, rr, re, reinterpret_cast<const float*>(bt.get()), ot.get(), cols);
      bf16_round_runs(ot.get(), T, re - rr, bp ? bp + rr : nullptr, runs.data(), int64_t(runs.size()), y + rr * P, P);
    };
  });
}

// dx: the rows of W^T (im2col entries) of each tile into a float padded accumulator by col2im, each
// task owning a range of input channels (as the float path); cropped and rounded once at the end.
void gemm_dx_bf16(const ConvGeom& g, const bf16* dy, const bf16* w, const int32_t* ccol, const int32_t* row,
                  bf16* dx) {
  const int64_t taps = g.kh * g.kw, Kc = g.C * taps, P = g.Ho * g.Wo, Q = g.N * P;
  const Kernels<float>& k = kernels<float>();
  SparseA<float, bf16> A{ccol, row, 1, 1, Kc, g.O, w, 1, Kc};
  A.plan(k, Q);
  TORCH_INTERNAL_ASSERT(A.udp, "gemm_dx_bf16 runs on the avx512_bf16 path only");
  std::vector<int64_t> cost(g.C, 0);
  for (int64_t c = 0; c < g.C; ++c) cost[c] = int64_t(ccol[(c + 1) * taps] - ccol[c * taps]);
  const auto bounds = balanced_split(cost, std::min<int64_t>(g.C, at::get_num_threads()), 1);
  const int64_t T = A.width(k), ntiles = cdiv(Q, T);
  const int64_t cgrp = std::max<int64_t>(1, kRowBlock / taps);
  const ConvGeom gp = padded(g);
  // small planes (Lane16Map::col_on, LaneShiftMap with whole images per tile): each tile's
  // images written whole, no accumulator
  const Lane16Map map(g);
  const LaneShiftMap smap(g);
  const bool small = (map.col_on && T % 16 == 0) || (smap.col_on && T % smap.P == 0);
  const int64_t nd = small ? 0 : gp.N * gp.C * gp.H * gp.W;
  float* acc = Buf<float>(nd, kDirY).get();
  std::fill(acc, acc + nd, 0.0f);
  const uint16_t* dyb = reinterpret_cast<const uint16_t*>(dy);
  at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
    Buf<uint16_t> bt(g.O * T, kTile);
    Buf<float> ot(cgrp * taps * T, kPanel);
    std::vector<int32_t> cols;
    std::vector<LaneRun> lruns;
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t c0 = bounds[part], c1 = bounds[part + 1];
      if (c0 >= c1) continue;
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
        dy_lane_tile(dyb, g.O, P, q0, nt, T, 0, g.O, lruns, bt.get());
        for (int64_t cc = c0; cc < c1; cc += cgrp) {
          const int64_t ce = std::min(c1, cc + cgrp);
          A.rows(k, cc * taps, ce * taps, reinterpret_cast<const float*>(bt.get()), ot.get(), cols);
          if (!(small && (bf16_col2im_lane16(ot.get(), T, g, map, q0, nt, cc, ce, dx) ||
                          bf16_col2im_shift(ot.get(), T, g, smap, q0, nt, cc, ce, dx))))
            k.conv2d.col2im_tile(ot.get(), gp, q0, nt, T, cc, ce, acc);
        }
      }
    }
  });
  if (small) return;
  at::parallel_for(0, g.N * g.C, 16, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl)
      for (int64_t yy = 0; yy < g.H; ++yy)
        bf16_round_row(acc + pl * gp.H * gp.W + (yy + g.ph) * gp.W + g.pw, 0.0f, g.W, dx + (pl * g.H + yy) * g.W);
  });
}

// dW on the pattern: pairs of positions of the dy and im2col lane tiles (bf16_sddmm_dp), float
// accumulators in pattern order, each task owning a range of rows over every tile (as the linear
// bf16 weight gradient: a split over the batch would leave threads idle on small planes), rounded
// once into dw (dense) or vals (compact).
void gemm_dw_bf16(const ConvGeom& g, const bf16* dy, const bf16* x, const int32_t* ptr, const int32_t* idx, bf16* dwp,
                  bf16* vals) {
  const int64_t Kc = g.C * g.kh * g.kw, P = g.Ho * g.Wo, Q = g.N * P;
  int64_t T = Q > 32 ? 64 : 32;  // the widest tile the batch fills whose im2col tile stays in about half of L2
  while (T < 256 && T < Q && Kc * (2 * T) * 2 <= (int64_t(1) << 20)) T *= 2;
  const int64_t ntiles = cdiv(Q, T);
  const LaneIm2col cols_of(g, x);
  const uint16_t* dyb = reinterpret_cast<const uint16_t*>(dy);
  const PackedRows packed(ptr, idx, g.O, 1, 1, Kc);
  const int64_t nnz = packed.size();
  Buf<float> acc(nnz, kMainA);
  std::fill(acc.get(), acc.get() + nnz, 0.0f);
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), cdiv(g.O, 4));
  const auto bounds = balanced_split(row_costs(ptr, g.O, 1, 1), parts, 1);
  at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t pb, int64_t pe) {
    Buf<uint16_t> bt(Kc * T, kTile), at_(kRowBlock * T, kPanel);
    std::vector<int32_t> cols;
    std::vector<LaneRun> lruns;
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t r0 = bounds[part], r1 = bounds[part + 1];
      if (r0 >= r1 || ptr[r0] == ptr[r1]) continue;
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
        cols_of.tile(q0, nt, T, lruns, bt.get());
        for (int64_t rr = r0; rr < r1; rr += kRowBlock) {
          const int64_t re = std::min(r1, rr + kRowBlock);
          if (ptr[rr] == ptr[re]) continue;
          dy_lane_tile(dyb, g.O, P, q0, nt, T, rr, re, lruns, at_.get());
          bf16_sddmm_dp(ptr, idx, 1, 1, Kc, rr, re, T, at_.get(), bt.get(), acc.get(), packed.base.data(), cols);
        }
      }
    }
  });
  if (vals) {
    for (int64_t j = 0; j < nnz; ++j) store(vals[j], acc[j]);
  } else {
    packed.scatter(ptr, idx, 1, 1, Kc, acc.get(), dwp);
  }
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
// depend on the run), fitted to `python benchmarks/tools/bench_conv_algo.py [--block B]`; the
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
//
// bf16 on vdpbf16ps, unstructured: both algorithms have bf16 kernels (direct_*_bf16, gemm_*_bf16),
// measured against each other on ResNet-18's layers (nf 20 and 64, batch 32, 90 %, AMD EPYC, 2
// threads).  Where the GEMM tiles come from masked loads of whole planes (LaneShiftMap: stride 1,
// output plane = input plane, at least 32 entries) GEMM takes the forward and dW up to 16x16
// outputs (nf 20 8x8: forward 0.18 vs 0.45 ms, dW 0.27 vs 0.72; 16x16: 0.20 vs 0.36, 0.25 vs 0.38;
// 14x14 (MNIST's 28x28 inputs): 0.17 vs 0.29, 0.23 vs 0.33; nf 64 16x16: 1.6 vs 2.8, 1.7 vs 2.8;
// at 32x32 direct is as fast or faster) and the input gradient where a tile holds whole images of
// a multiple of 16 entries (8x8: 0.29 vs 0.64 ms; at 16x16 its scatter-add is twice the direct
// one's time).  The strided input gradient goes to GEMM (nf 64, 16x16 stride 2: 3.9 vs 4.9
// ms; the direct one's write-back is strided); otherwise 16x16 and larger outputs keep the direct
// rule above, other 8x8 outputs go direct only for short im2col rows (C * kh * kw <= 1024) and, at
// stride 2, only for dW (nf 20 16->8 forward 0.46 vs 0.98 ms on GEMM); 4x4 outputs run GEMM
// (Lane16Map: 0.20 vs 0.84 ms forward).  Block patterns on vdpbf16ps have direct kernels only
// (GEMM widens them to float at the op boundary), so there the direct path also takes the 8x8
// outputs with at most 1.6 grid positions per output, for all three ops.
bool auto_direct(ConvOp op, const ConvGeom& g, int64_t nnz, int64_t bo, int64_t bk, bool dp_bf16) {
  const DirectGeom d(g);
  if (d.used_phases() < d.phases) return false;
  const int64_t size = g.O * g.C * g.kh * g.kw;
  if (size == 0 || double(nnz) > 0.15 * double(size)) return false;
  const int64_t out = g.Ho * g.Wo;
  if (dp_bf16 && bo == 1 && bk == 1) {
    const bool shifted = g.sh == 1 && g.sw == 1 && g.Ho == g.H && g.Wo == g.W && out >= 32;
    if (op == ConvOp::kDx) {
      if (d.phases > 1 || (shifted && out % 16 == 0 && out <= 64)) return false;
    } else if (shifted && out <= 256) {
      return false;
    }
    if (out >= 256 && d.waste() <= 1.4) return true;
    return out >= 64 && d.waste() <= 1.6 && g.C * g.kh * g.kw <= 1024 && (op == ConvOp::kDw || d.phases == 1);
  }
  if (out >= 256 && d.waste() <= 1.4) return true;
  if (dp_bf16 && out >= 64 && d.waste() <= 1.6) return true;
  return bo % 4 == 0 && op != ConvOp::kDx && out >= 64 && d.waste() <= 1.6;
}

// Whether a bf16 call runs on vdpbf16ps (direct_*_bf16, or gemm_*_bf16 for unstructured
// patterns) rather than widened to float at the op boundary.
bool bf16_dp_conv(bool direct, int64_t bo, int64_t bk) {
  return bf16_path() == Bf16Path::DPBF16 && (direct || (bo == 1 && bk == 1));
}

// bf16: whether the bf16 direct kernels run (`bf16` and the avx512_bf16 path); they replace the
// float ones, so the rule above applies with dp_bf16.
bool use_direct(ConvOp op, const ConvGeom& g, int64_t nnz, int64_t bo, int64_t bk, bool bf16 = false) {
  const int f = forced_algo();
  if (f) return f == 1;
  return auto_direct(op, g, nnz, bo, bk, bf16 && bf16_path() == Bf16Path::DPBF16);
}

// ---------------------------------------------------------------------------------------------
// the ops: implicit GEMM on tiles of output positions, or direct where use_direct says so
// ---------------------------------------------------------------------------------------------

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
  const Tensor bias = check_bias(bias_, weight_, g.O);
  check_compressed(crow, col, cdiv(g.O, bo), cdiv(Kc, bk), "crow_indices", "col_indices");
  const bool direct = use_direct(ConvOp::kFwd, g, col.numel() * bo * bk, bo, bk, x_.scalar_type() == at::kBFloat16);
  if (x_.scalar_type() == at::kBFloat16) {
    if (!bf16_dp_conv(direct, bo, bk))  // widened at the boundary (block GEMM tiles are float-only)
      return conv2d_fwd(widen_bf16(x_), widen_bf16(weight_), widen_bf16(bias_), crow, col, block, stride, padding,
                        dilation)
          .to(at::kBFloat16);
    Tensor x = x_.contiguous(), w = weight_.contiguous();
    Tensor y = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
    if (g.N == 0 || g.O == 0) return y;
    std::vector<float> btmp;
    const float* bp = bias_values<float, bf16>(bias, btmp);
    if (direct)
      direct_fwd_bf16(g, data_of<bf16>(x), data_of<bf16>(w), bp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo,
                      bk, data_of<bf16>(y));
    else
      gemm_fwd_bf16(g, data_of<bf16>(x), data_of<bf16>(w), bp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                    data_of<bf16>(y));
    return y;
  }
  Tensor x = x_.contiguous(), w = weight_.contiguous();
  Tensor y = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  if (g.N == 0 || g.O == 0) return y;
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
    const ConvGeom gp = padded(g);
    const S* xp = x.data_ptr<S>();
    if (has_padding(g)) {
      S* xpad = Buf<S>(gp.N * gp.C * gp.H * gp.W, kDirX).get();
      pad_planes(xp, g, xpad);
      xp = xpad;
    }
    const S* bp = bias.defined() ? bias.data_ptr<S>() : nullptr;
    S* yp = y.data_ptr<S>();
    const int64_t T = A.width(k), Q = g.N * P;
    for_tile_row_blocks(cdiv(Q, T), g.O, [&] {
      return [&, bt = Buf<S>(Kc * T, kTile), ot = Buf<S>(kRowBlock * T, kPanel), cols = std::vector<int32_t>()](
                 int64_t tile, bool fresh, int64_t rr, int64_t re) mutable {
        const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
        if (fresh) k.conv2d.im2col_tile(xp, gp, q0, nt, T, 0, g.C, bt.get());
        A.rows(k, rr, re, bt.get(), ot.get(), cols);
        k.conv2d.conv_out_tile(ot.get(), g.O, P, q0, nt, T, rr, re, bp, yp);
      };
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
  const bool direct = use_direct(ConvOp::kDx, g, row.numel() * bo * bk, bo, bk, dy_.scalar_type() == at::kBFloat16);
  if (dy_.scalar_type() == at::kBFloat16) {
    if (!bf16_dp_conv(direct, bo, bk))  // widened at the boundary (block GEMM tiles are float-only)
      return conv2d_dx(widen_bf16(dy_), widen_bf16(weight_), ccol, row, block, input_size, stride, padding, dilation)
          .to(at::kBFloat16);
    if (!direct) {  // writes every pixel (cropped from its padded accumulator)
      Tensor dx = huge_page_hint(at::empty({g.N, g.C, g.H, g.W}, dy.options()));
      gemm_dx_bf16(g, data_of<bf16>(dy), data_of<bf16>(w), ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(),
                   data_of<bf16>(dx));
      return dx;
    }
    Tensor dx = g.sh == 1 && g.sw == 1 ? huge_page_hint(at::empty({g.N, g.C, g.H, g.W}, dy.options()))
                                       : at::zeros({g.N, g.C, g.H, g.W}, dy.options());
    direct_dx_bf16(g, data_of<bf16>(dy), data_of<bf16>(w), ccol.data_ptr<int32_t>(), row.data_ptr<int32_t>(), bo, bk,
                   data_of<bf16>(dx));
    return dx;
  }
  // the direct path writes every pixel at stride 1 (its grid covers the padded input)
  // so does implicit GEMM on a padded copy (crop_planes)
  const bool pad = !direct && has_padding(g);
  Tensor dx = (direct && g.sh == 1 && g.sw == 1) || pad
                  ? huge_page_hint(at::empty({g.N, g.C, g.H, g.W}, dy.options()))
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
    const ConvGeom gp = padded(g);
    S* dxp = dx.data_ptr<S>();
    if (pad) {
      const int64_t n = gp.N * gp.C * gp.H * gp.W;
      dxp = Buf<S>(n, kDirY).get();
      std::fill(dxp, dxp + n, S(0));
    }
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
            k.conv2d.col2im_tile(ot.get(), gp, q0, nt, T, cc, ce, dxp);
          }
        }
      }
    });
    if (pad) crop_planes(dxp, g, dx.data_ptr<S>());
  });
  return dx;
}

// dW on the pattern: dense (zeros outside it), or with `compact` the [nnz] values on it in
// row-major order of its positions (PackedRows order; see linear_dw_values).
Tensor conv2d_dw_impl(const Tensor& dy_, const Tensor& x_, const Tensor& crow, const Tensor& col, at::IntArrayRef block,
                      at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, bool compact) {
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
  if (compact) {
    const PackedRows packed(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), g.O, bo, bk, Kc);
    if (g.N == 0 || col.numel() == 0 || g.O == 0 || Kc == 0) return at::zeros({packed.size()}, x.options());
  }
  if (g.N == 0 || col.numel() == 0 || g.O == 0 || Kc == 0) return at::zeros({g.O, g.C, g.kh, g.kw}, x.options());
  const bool direct = use_direct(ConvOp::kDw, g, col.numel() * bo * bk, bo, bk, x_.scalar_type() == at::kBFloat16);
  if (x_.scalar_type() == at::kBFloat16) {
    if (!bf16_dp_conv(direct, bo, bk))  // widened at the boundary (block GEMM tiles are float-only)
      return conv2d_dw_impl(widen_bf16(dy_), widen_bf16(x_), crow, col, block, weight_size, stride, padding, dilation,
                            compact)
          .to(at::kBFloat16);
    const PackedRows packed(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), g.O, bo, bk, Kc);
    Tensor out = compact ? at::empty({packed.size()}, x.options())
                         : huge_page_hint(at::empty({g.O, g.C, g.kh, g.kw}, x.options()));
    if (direct)
      direct_dw_bf16(g, data_of<bf16>(dy), data_of<bf16>(x), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk,
                     compact ? nullptr : data_of<bf16>(out), compact ? data_of<bf16>(out) : nullptr);
    else
      gemm_dw_bf16(g, data_of<bf16>(dy), data_of<bf16>(x), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                   compact ? nullptr : data_of<bf16>(out), compact ? data_of<bf16>(out) : nullptr);
    return out;
  }
  // compact: the direct path still writes a dense dW (gathered after), the GEMM path none
  Tensor dw, vals;
  if (!compact || direct) dw = huge_page_hint(at::empty({g.O, g.C, g.kh, g.kw}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::conv2d_dw", [&] {
    using S = scalar_t;
    if (direct) {
      direct_dw<S>(g, dy.data_ptr<S>(), x.data_ptr<S>(), crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk,
                   dw.data_ptr<S>());
      if (compact) {
        const PackedRows packed(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), g.O, bo, bk, Kc);
        vals = at::empty({packed.size()}, x.options());
        packed.gather(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), bo, bk, Kc, dw.data_ptr<S>(),
                      vals.data_ptr<S>());
      }
      return;
    }
    const Kernels<S>& k = kernels<S>();
    const int32_t* ptr = crow.data_ptr<int32_t>();
    const int32_t* idx = col.data_ptr<int32_t>();
    const int nv = pick_width<S>(k, kSddmmVecs, Kc, g.N * P);
    const int64_t T = kSddmmVecs[nv] * k.lanes, Q = g.N * P, ntiles = cdiv(Q, T);
    const ConvGeom gp = padded(g);
    const S* xp = x.data_ptr<S>();
    if (has_padding(g)) {
      S* xpad = Buf<S>(gp.N * gp.C * gp.H * gp.W, kDirX).get();
      pad_planes(xp, g, xpad);
      xp = xpad;
    }
    const S* dyp = dy.data_ptr<S>();
    const PackedRows packed(ptr, idx, g.O, bo, bk, Kc);
    const int64_t nnz = packed.size();
    const S* acc = sum_tile_chunks<S>(ntiles, nnz, [&](S* part, int64_t t0, int64_t t1) {
      Buf<S> bt(Kc * T, kTile), at_(kRowBlock * T, kPanel);
      std::vector<int32_t> cols;
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t q0 = tile * T, nt = std::min(T, Q - q0);
        k.conv2d.im2col_tile(xp, gp, q0, nt, T, 0, g.C, bt.get());
        for (int64_t rr = 0; rr < g.O; rr += kRowBlock) {
          const int64_t re = std::min(g.O, rr + kRowBlock);
          if (ptr[rr / bo] == ptr[cdiv(re, bo)]) continue;
          k.conv2d.conv_in_tile(dyp, g.O, P, q0, nt, T, rr, re, at_.get());
          k.spmm.sddmm_tile[nv](ptr, idx, bo, bk, Kc, rr, re, at_.get(), bt.get(), part, packed.base.data(), cols);
        }
      }
    });
    if (compact) {
      vals = at::empty({nnz}, x.options());
      std::copy(acc, acc + nnz, vals.data_ptr<S>());
    } else {
      packed.scatter(ptr, idx, bo, bk, Kc, acc, dw.data_ptr<S>());
    }
  });
  return compact ? vals : dw;
}

Tensor conv2d_dw(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col, at::IntArrayRef block,
                 at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation) {
  return conv2d_dw_impl(dy, x, crow, col, block, weight_size, stride, padding, dilation, false);
}

Tensor conv2d_dw_values(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col,
                        at::IntArrayRef block, at::IntArrayRef weight_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  return conv2d_dw_impl(dy, x, crow, col, block, weight_size, stride, padding, dilation, true);
}

// Which algorithm conv2d_{fwd,dx,dw} run for a shape: "direct" or "gemm" (the automatic choice,
// or the one SPARSEKERN_CPU_CONV_ALGO forces).  nnz = elements inside the pattern; bf16: for
// bfloat16 operands.
std::string conv2d_algo(c10::string_view op_, at::IntArrayRef input_size, at::IntArrayRef weight_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef block,
                        int64_t nnz, bool bf16) {
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
  return use_direct(o, g, nnz, bo, bk, bf16) ? "direct" : "gemm";
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("conv2d_fwd", &sparsekern::conv2d_fwd);
  m.impl("conv2d_dx", &sparsekern::conv2d_dx);
  m.impl("conv2d_dw", &sparsekern::conv2d_dw);
  m.impl("conv2d_dw_values", &sparsekern::conv2d_dw_values);
}

// Not a tensor op: one kernel for every backend (what m.def(schema, fn) registers).
TORCH_LIBRARY_IMPL(sparsekern, CompositeImplicitAutograd, m) { m.impl("conv2d_algo", &sparsekern::conv2d_algo); }
