// Direct sparse conv2d on shifted views (included at the bottom of kernels_impl.h, once per
// instruction set).
//
// The op layer lays the zero-padded input out once per call as phase planes on a grid of
// positions p (images stacked along the rows, see conv2d.cpp: DirectGeom), so that every nonzero
// weight of the convolution multiplies a *contiguous* run of that copy starting at a fixed
// per-nonzero offset.  A product over a tile of T consecutive grid positions is then the CSR
// panel of kernels_impl.h with the tile row `bt + col * T` replaced by `x + off[j]`: no im2col
// copy, and the cache footprint of a tile is (channels) x (T + largest tap offset) instead of
// (channels x taps) x T.  The same two kernels serve the three ops:
//   forward      rows = output channels, x = the input planes, off = plane + tap shift;
//   input grad   rows = input (phase) planes, x = the output gradient on the grid with a leading
//                zero margin, off = output channel - tap shift (the transposed product);
//   weight grad  an SDDMM: row r of the output gradient on the grid dotted with the shifted
//                input view of each of its nonzeros.
// Loads from x + off are unaligned (offsets are arbitrary), hence the VU type.  No software
// prefetch: a tile's window is already in L1 / L2, and the prefetch loop (as in panel_csr_impl)
// measured slower here.  VUT (the unaligned vector type) is in kernels_impl.h.

// ot[(r - r0) * T + t] = sum_j val[j] * x[off[j] + t] over j in [ptr[r], ptr[r + 1]), rows
// r0 <= r < r1, T = NV vectors.  Nonzeros in metadata order per accumulator set, U sets summed
// in a fixed order: deterministic.  Like panel_csr_impl, U independent sets keep eight FMA chains
// in flight for the narrow widths.
template <typename S, int NV>
void direct_panel(const int64_t* __restrict ptr, const int64_t* __restrict off, const S* __restrict val, int64_t r0,
                  int64_t r1, const S* __restrict x, S* __restrict ot) {
  using V = typename VT<S>::v;
  using VU = typename VUT<S>::v;
  constexpr int64_t T = NV * VT<S>::L;
  constexpr int U = NV >= 8 ? 1 : 8 / NV;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = ptr[r];
    const int64_t e = ptr[r + 1];
    V acc[U][NV] = {};
    for (; j + U <= e; j += U) {
      for (int u = 0; u < U; ++u) {
        const VU* xv = reinterpret_cast<const VU*>(x + off[j + u]);
        const S w = val[j + u];
        for (int v = 0; v < NV; ++v) acc[u][v] += w * xv[v];
      }
    }
    for (; j < e; ++j) {
      const VU* xv = reinterpret_cast<const VU*>(x + off[j]);
      const S w = val[j];
      for (int v = 0; v < NV; ++v) acc[0][v] += w * xv[v];
    }
    V* o = reinterpret_cast<V*>(ot + (r - r0) * T);
    for (int v = 0; v < NV; ++v) {
      V s = acc[0][v];
      for (int u = 1; u < U; ++u) s += acc[u][v];
      o[v] = s;
    }
  }
}

// Four rows with the same offsets (rows of one block row): rows r + i * rs, i < 4, whose
// nonzeros are val[ptr[r + i * rs] + m] at offset off[ptr[r] + m]; each window load feeds four
// FMAs.  ot[i * rs * T + t] = row r + i * rs.  NV <= 4 (4 x NV accumulators in registers).
template <typename S, int NV>
void direct_panel4(const int64_t* __restrict ptr, const int64_t* __restrict off, const S* __restrict val, int64_t r,
                   int64_t rs, const S* __restrict x, S* __restrict ot) {
  using V = typename VT<S>::v;
  using VU = typename VUT<S>::v;
  const int64_t b = ptr[r], n = ptr[r + 1] - b;
  const S* v0 = val + b;
  const S* v1 = val + ptr[r + rs];
  const S* v2 = val + ptr[r + 2 * rs];
  const S* v3 = val + ptr[r + 3 * rs];
  const int64_t* ol = off + b;
  V c0[NV] = {}, c1[NV] = {}, c2[NV] = {}, c3[NV] = {};
  for (int64_t m = 0; m < n; ++m) {
    const VU* xv = reinterpret_cast<const VU*>(x + ol[m]);
    const S w0 = v0[m], w1 = v1[m], w2 = v2[m], w3 = v3[m];
    for (int v = 0; v < NV; ++v) {
      const V xx = xv[v];
      c0[v] += w0 * xx;
      c1[v] += w1 * xx;
      c2[v] += w2 * xx;
      c3[v] += w3 * xx;
    }
  }
  V* o = reinterpret_cast<V*>(ot);
  const int64_t step = rs * NV;  // output rows are rs * T scalars apart
  for (int v = 0; v < NV; ++v) {
    o[v] = c0[v];
    o[step + v] = c1[v];
    o[2 * step + v] = c2[v];
    o[3 * step + v] = c3[v];
  }
}

// acc[j] += sum_t a[r * lda + t] * x[off[j] + t] for j in [ptr[r], ptr[r + 1]), rows r0 <= r < r1,
// T = NV vectors (NV even); `a` is 64-byte aligned with lda a multiple of the vector width.  The
// row of `a` stays in registers; the dots run through dot_rows (kernels_impl.h).
template <typename S, int NV>
void direct_sddmm(const int64_t* __restrict ptr, const int64_t* __restrict off, int64_t r0, int64_t r1,
                  const S* __restrict a, int64_t lda, const S* __restrict x, S* __restrict acc) {
  using V = typename VT<S>::v;
  using VU = typename VUT<S>::v;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = ptr[r], nc = ptr[r + 1] - b;
    if (nc == 0) continue;
    const V* ar = reinterpret_cast<const V*>(a + r * lda);
    V av[NV];
    for (int v = 0; v < NV; ++v) av[v] = ar[v];
    const int64_t* ol = off + b;
    dot_rows<S, NV, false>(
        av, nc, [&](int64_t i) { return x + ol[i]; }, [](int64_t) {}, acc + b);
  }
}
