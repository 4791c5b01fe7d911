// Tile kernels of the C++ CPU backend.  Torch-free, included once per instruction set inside a
// namespace (see kernels.cpp), so the same source compiles to AVX-512, AVX2 and baseline code.
//
// Layout convention: a *tile* holds T consecutive batch positions (rows of x for linear, output
// pixels for conv) transposed, i.e. `bt[c * T + t]`, so one nonzero weight multiplies a
// contiguous vector of T values (SparseProp's idea).  Every kernel here works on one tile and on
// a range of output rows; threading, allocation and argument checks live in the op layer.
//
// Determinism: each output element is produced by exactly one call, which sums its terms in a
// fixed order (nonzeros in metadata order, tiles in batch order), so results do not depend on
// how rows or tiles are spread over threads.
//
// Requires <cstdint>, <cstring>, <algorithm>, <vector> to be included before.

template <typename S>
struct VT;
template <>
struct VT<float> {
  typedef float v __attribute__((vector_size(64), may_alias));
  typedef int32_t m __attribute__((vector_size(64)));
  static constexpr int L = 16;
};
template <>
struct VT<double> {
  typedef double v __attribute__((vector_size(64), may_alias));
  typedef int64_t m __attribute__((vector_size(64)));
  static constexpr int L = 8;
};

// Tile widths are NV vectors of VT<S>::L lanes.  Block panels use NV_PANEL (four rows share each
// tile load, so a moderate width suffices).  Unstructured panels and the weight gradient come in
// several widths; the op layer picks the widest whose transposed tile still fits in L2 (wider
// tiles amortise the index and value loads and the horizontal sums over more batch columns).
constexpr int NV_PANEL = 4;

template <typename S>
constexpr int64_t panel_width() { return NV_PANEL * VT<S>::L; }
template <typename S>
constexpr int64_t lanes() { return VT<S>::L; }

inline float hsum(VT<float>::v x) {
  typedef VT<float>::m M;
  x += __builtin_shuffle(x, M{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += __builtin_shuffle(x, M{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x += __builtin_shuffle(x, M{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  x += __builtin_shuffle(x, M{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return x[0];
}
inline double hsum(VT<double>::v x) {
  typedef VT<double>::m M;
  x += __builtin_shuffle(x, M{4, 5, 6, 7, 0, 1, 2, 3});
  x += __builtin_shuffle(x, M{2, 3, 0, 1, 6, 7, 4, 5});
  x += __builtin_shuffle(x, M{1, 0, 3, 2, 5, 4, 7, 6});
  return x[0];
}

// ------------------------------------------------------------------------------------------
// transposes between row-major matrices and tiles
// ------------------------------------------------------------------------------------------

#if SPARSEKERN_ISA_AVX512
// In-register 16x16 transpose: rows r[i] become columns.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // widen: the bf16 bits are the top half of each float
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) {  // round to nearest even, NaN as torch's (see store())
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// dst[j * ldd + i] = src[i * lds + j] for a full 16 x 16 float block (+ bias[j] per output row);
// either side may be bf16.
template <typename I, typename O>
inline void block16(const I* src, int64_t lds, O* dst, int64_t ldd, const float* bias) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = load16(src + i * lds);
  transpose16(r);
  if (bias) {
    const __m512 b = _mm512_loadu_ps(bias);
    for (int j = 0; j < 16; ++j) store16(dst + j * ldd, _mm512_add_ps(r[j], b));
  } else {
    for (int j = 0; j < 16; ++j) store16(dst + j * ldd, r[j]);
  }
}
template <typename S>
constexpr bool fast_transpose() { return sizeof(S) == 4; }
#else
template <typename S>
constexpr bool fast_transpose() { return false; }
template <typename I, typename O>
inline void block16(const I*, int64_t, O*, int64_t, const float*) {}
#endif

// dst[c * T + t] = src[t * ld + c] for t < nt, c < ncols; zero for nt <= t < T.  W: the storage
// of src (S, or bf16 widened to S).
template <typename S, typename W = S>
void tile_from_rows(const W* __restrict src, int64_t ld, int64_t nt, int64_t ncols, int64_t T, S* __restrict dst) {
  constexpr int64_t B = 16;
  for (int64_t c0 = 0; c0 < ncols; c0 += B) {
    const int64_t c1 = std::min(c0 + B, ncols);
    int64_t t0 = 0;
    if constexpr (fast_transpose<S>())
      if (c1 - c0 == B)
        for (; t0 + B <= nt; t0 += B) block16(src + t0 * ld + c0, ld, dst + c0 * T + t0, T, nullptr);
    for (; t0 < nt; t0 += B) {
      const int64_t t1 = std::min(t0 + B, nt);
      for (int64_t c = c0; c < c1; ++c) {
        S* d = dst + c * T;
        for (int64_t t = t0; t < t1; ++t) d[t] = S(as_float(src[t * ld + c]));
      }
    }
    if (nt < T)
      for (int64_t c = c0; c < c1; ++c) std::fill(dst + c * T + nt, dst + (c + 1) * T, S(0));
  }
}

// dst[t * ld + r] = src[r * T + t] (+ bias[r]) for r < nr, t < nt; O: the storage of dst (S, or
// bf16 rounded from S).
template <typename S, typename O = S>
void tile_to_rows(const S* __restrict src, int64_t nr, int64_t nt, int64_t T, const S* __restrict bias, O* __restrict dst,
                  int64_t ld) {
  constexpr int64_t B = 16;
  int64_t r0 = 0;
  if constexpr (fast_transpose<S>()) {
    for (; r0 + B <= nr; r0 += B) {
      int64_t t0 = 0;
      for (; t0 + B <= nt; t0 += B) block16(src + r0 * T + t0, T, dst + t0 * ld + r0, ld, bias ? bias + r0 : nullptr);
      for (int64_t t = t0; t < nt; ++t) {
        O* d = dst + t * ld;
        for (int64_t r = r0; r < r0 + B; ++r) store(d[r], src[r * T + t] + (bias ? bias[r] : S(0)));
      }
    }
  }
  if (r0 < nr) {
    for (int64_t t = 0; t < nt; ++t) {
      O* d = dst + t * ld;
      if (bias)
        for (int64_t r = r0; r < nr; ++r) store(d[r], src[r * T + t] + bias[r]);
      else
        for (int64_t r = r0; r < nr; ++r) store(d[r], src[r * T + t]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// panels: ot[(r - r0) * T + t] = sum_c A[r, c] * bt[c * T + t] for rows r0 <= r < r1
// ------------------------------------------------------------------------------------------

// Unstructured A in CSR form, values read in place from the dense matrix (A[r, c] =
// a[r * ars + c * acs], so the transposed weight needs no repacking):
// ot[(r - r0) * T + t] = sum_j A[r, idx[j]] * bt[idx[j] * T + t] over the nonzeros of row r, T = NV
// lanes-vectors.  The row's accumulator stays in registers while its nonzeros stream by, so each
// nonzero costs one broadcast and NV fused multiply-adds with operands loaded from the tile (L2).
// U accumulator sets (nonzeros taken round-robin, summed in a fixed order at the end) keep at
// least eight independent FMA chains in flight for the narrow widths.
// PACKED: the values are a[j] (already in CSR order; ars and acs unused).  `ncols` is unused
// here (the whole tile is addressed; it is kept in L2 by the op layer's choice of width).  The
// L1 variant, over window-major metadata, is panel_win below.
template <typename S, int NV, bool PACKED>
void panel_csr_impl(const int32_t* __restrict ptr, const int32_t* __restrict idx, const S* __restrict a, int64_t ars,
                    int64_t acs, int64_t r0, int64_t r1, const S* __restrict bt, S* __restrict ot) {
  using V = typename VT<S>::v;
  constexpr int64_t T = NV * VT<S>::L;
  constexpr int U = NV >= 8 ? 1 : 8 / NV;
  constexpr int64_t PF = 6;  // nonzeros ahead whose tile rows (and values) are prefetched
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = ptr[r];
    const int64_t e = ptr[r + 1];
    const S* __restrict val = PACKED ? a : a + r * ars;
    V acc[U][NV] = {};
    for (; j + U <= e; j += U) {
      for (int u = 0; u < U; ++u) {
        if (j + u + PF < e) {
          const int64_t c = idx[j + u + PF];
          const char* pf = reinterpret_cast<const char*>(bt + c * T);
          for (int64_t l = 0; l < int64_t(T * sizeof(S)); l += 64) __builtin_prefetch(pf + l);
          // in place, the values of a sparse row are scattered over the weight row: fetch early
          if (!PACKED) __builtin_prefetch(val + c * acs);
        }
        const V* x = reinterpret_cast<const V*>(bt + int64_t(idx[j + u]) * T);
        const S w = PACKED ? val[j + u] : val[int64_t(idx[j + u]) * acs];
        for (int v = 0; v < NV; ++v) acc[u][v] += w * x[v];
      }
    }
    for (; j < e; ++j) {
      const V* x = reinterpret_cast<const V*>(bt + int64_t(idx[j]) * T);
      const S w = PACKED ? val[j] : val[int64_t(idx[j]) * acs];
      for (int v = 0; v < NV; ++v) acc[0][v] += w * x[v];
    }
    V* o = reinterpret_cast<V*>(ot + (r - r0) * T);
    for (int v = 0; v < NV; ++v) {
      V s = acc[0][v];
      for (int u = 1; u < U; ++u) s += acc[u][v];
      o[v] = s;
    }
  }
}

template <typename S, int NV>
void panel_csr(const int32_t* ptr, const int32_t* idx, const S* a, int64_t ars, int64_t acs, int64_t ncols, int64_t r0,
               int64_t r1, const S* bt, S* ot) {
  (void)ncols;
  panel_csr_impl<S, NV, false>(ptr, idx, a, ars, acs, r0, r1, bt, ot);
}
template <typename S, int NV>
void panel_csr_packed(const int32_t* ptr, const int32_t* idx, const S* val, int64_t ncols, int64_t r0, int64_t r1,
                      const S* bt, S* ot) {
  (void)ncols;
  panel_csr_impl<S, NV, true>(ptr, idx, val, 0, 0, r0, r1, bt, ot);
}

// Unstructured A in window-major CSR form: the columns are cut into windows of a fixed width and
// the nonzeros of window w, row r are idx/val[wp[r] .. wp[r + 1]) with wp = wptr + w * (R + 1)
// (built once per pattern by the csr_windows op; values packed in that order per call).  Windows go
// outermost, so one window of the tile (window x T scalars, sized by the caller to stay in L1)
// serves every row of the range before the next is loaded: each nonzero's tile row comes from L1
// instead of L2, at the price of reloading and storing each row's accumulator once per window
// (from the panel `ot`, which the caller keeps in L2).  Per element the terms are added in column
// order, the same for any split of rows over threads.
template <typename S, int NV>
void panel_win(const int32_t* __restrict wptr, const int32_t* __restrict idx, const S* __restrict val, int64_t R,
               int64_t nw, int64_t r0, int64_t r1, const S* __restrict bt, S* __restrict ot) {
  using V = typename VT<S>::v;
  constexpr int64_t T = NV * VT<S>::L;
  for (int64_t w = 0; w < nw; ++w) {
    const int32_t* __restrict wp = wptr + w * (R + 1);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j = wp[r];
      const int64_t e = wp[r + 1];
      V* o = reinterpret_cast<V*>(ot + (r - r0) * T);
      V acc[NV];
      if (w == 0) {
        for (int v = 0; v < NV; ++v) acc[v] = V{};
      } else {
        if (j == e) continue;  // nothing to add: the stored partial sum stands
        for (int v = 0; v < NV; ++v) acc[v] = o[v];
      }
      for (; j < e; ++j) {
        const V* x = reinterpret_cast<const V*>(bt + int64_t(idx[j]) * T);
        const S a = val[j];
        for (int v = 0; v < NV; ++v) acc[v] += a * x[v];
      }
      for (int v = 0; v < NV; ++v) o[v] = acc[v];
    }
  }
}

// Block A (tiles bo x bk over a grid in CSR form) with its values packed per block row:
// pk[(base[rb] + i) * bo + q] = A[rb * bo + q, cols_i] for the i-th expanded column of block row rb
// (SparseA::plan packs them once per call).  Four rows of a block row share every tile load and
// read their four weights from one contiguous run; with the weights in place (four rows a weight
// row apart) the same loop measured about half as fast.
template <typename S>
void panel_bsr(const int32_t* __restrict ptr, const int32_t* __restrict idx, int64_t bo, int64_t bk, int64_t ncols,
               const S* __restrict pk, const int64_t* __restrict base, int64_t r0, int64_t r1, const S* __restrict bt,
               S* __restrict ot, std::vector<int32_t>& cols) {
  using V = typename VT<S>::v;
  constexpr int NV = NV_PANEL;
  constexpr int64_t T = NV * VT<S>::L;
  int64_t cur = -1;
  int64_t r = r0;
  while (r < r1) {
    const int64_t rb = r / bo;
    if (rb != cur) {
      block_row_columns(ptr, idx, rb, bk, ncols, cols);
      cur = rb;
    }
    const int64_t rend = std::min(r1, (rb + 1) * bo);
    const int64_t nc = int64_t(cols.size());
    const int32_t* cl = cols.data();
    const S* p0 = pk + base[rb] * bo;
    for (; r + 4 <= rend; r += 4) {
      V c0[NV] = {}, c1[NV] = {}, c2[NV] = {}, c3[NV] = {};
      const S* pw = p0 + (r - rb * bo);
      for (int64_t i = 0; i < nc; ++i) {
        const V* x = reinterpret_cast<const V*>(bt + int64_t(cl[i]) * T);
        const S* w = pw + i * bo;
        const S w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        for (int v = 0; v < NV; ++v) {
          const V xv = x[v];
          c0[v] += w0 * xv;
          c1[v] += w1 * xv;
          c2[v] += w2 * xv;
          c3[v] += w3 * xv;
        }
      }
      V* o = reinterpret_cast<V*>(ot + (r - r0) * T);
      for (int v = 0; v < NV; ++v) {
        o[v] = c0[v];
        o[NV + v] = c1[v];
        o[2 * NV + v] = c2[v];
        o[3 * NV + v] = c3[v];
      }
    }
    for (; r < rend; ++r) {
      V c0[NV] = {};
      const S* pw = p0 + (r - rb * bo);
      for (int64_t i = 0; i < nc; ++i) {
        const V* x = reinterpret_cast<const V*>(bt + int64_t(cl[i]) * T);
        const S w0 = pw[i * bo];
        for (int v = 0; v < NV; ++v) c0[v] += w0 * x[v];
      }
      V* o = reinterpret_cast<V*>(ot + (r - r0) * T);
      for (int v = 0; v < NV; ++v) o[v] = c0[v];
    }
  }
}

// Horizontal sums of four vectors at once: pairs are folded together before the in-register
// reduction, so the four sums cost about as many shuffles as two single ones.  Fixed order.
inline void hsum4(VT<float>::v a, VT<float>::v b, VT<float>::v c, VT<float>::v d, float* out) {
  typedef VT<float>::m M;
  const VT<float>::v ab = __builtin_shuffle(a, b, M{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
                          __builtin_shuffle(a, b, M{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  const VT<float>::v cd = __builtin_shuffle(c, d, M{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
                          __builtin_shuffle(c, d, M{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  VT<float>::v u = __builtin_shuffle(ab, cd, M{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
                   __builtin_shuffle(ab, cd, M{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  u += __builtin_shuffle(u, M{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  u += __builtin_shuffle(u, M{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  out[0] += u[0];
  out[1] += u[4];
  out[2] += u[8];
  out[3] += u[12];
}
inline void hsum4(VT<double>::v a, VT<double>::v b, VT<double>::v c, VT<double>::v d, double* out) {
  typedef VT<double>::m M;
  const VT<double>::v ab = __builtin_shuffle(a, b, M{0, 1, 2, 3, 8, 9, 10, 11}) +
                           __builtin_shuffle(a, b, M{4, 5, 6, 7, 12, 13, 14, 15});
  const VT<double>::v cd = __builtin_shuffle(c, d, M{0, 1, 2, 3, 8, 9, 10, 11}) +
                           __builtin_shuffle(c, d, M{4, 5, 6, 7, 12, 13, 14, 15});
  VT<double>::v u = __builtin_shuffle(ab, cd, M{0, 1, 4, 5, 8, 9, 12, 13}) +
                    __builtin_shuffle(ab, cd, M{2, 3, 6, 7, 10, 11, 14, 15});
  u += __builtin_shuffle(u, M{1, 0, 3, 2, 5, 4, 7, 6});
  out[0] += u[0];
  out[1] += u[2];
  out[2] += u[4];
  out[3] += u[6];
}

// The same vectors for loads from any scalar-aligned address (VT<S>::v assumes 64 bytes).
template <typename S>
struct VUT;
template <>
struct VUT<float> {
  typedef float v __attribute__((vector_size(64), may_alias, aligned(4)));
};
template <>
struct VUT<double> {
  typedef double v __attribute__((vector_size(64), may_alias, aligned(8)));
};
// Picks one of the two.  A selector, not a type template argument: GCC drops the alignment
// attribute of a typedef passed as a template argument.
template <typename S, bool ALIGNED>
struct VLoad {
  typedef typename VT<S>::v v;
};
template <typename S>
struct VLoad<S, false> {
  typedef typename VUT<S>::v v;
};

// out[i] += dot(av, X_i) for i < n, where X_i = NV vectors at addr(i) (64-byte aligned when
// ALIGNED, else any scalar-aligned address).  Four nonzeros are dotted at a time (two chains each) and reduced
// together (hsum4); before(i) runs ahead of each group of four (prefetching, or nothing).  The one
// dot loop of every SDDMM kernel, so they all sum in the same order.
template <typename S, int NV, bool ALIGNED, typename Addr, typename Before>
inline void dot_rows(const typename VT<S>::v (&av)[NV], int64_t n, Addr addr, Before before, S* __restrict out) {
  using V = typename VT<S>::v;
  using VX = typename VLoad<S, ALIGNED>::v;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    before(i);
    const VX* x0 = reinterpret_cast<const VX*>(addr(i));
    const VX* x1 = reinterpret_cast<const VX*>(addr(i + 1));
    const VX* x2 = reinterpret_cast<const VX*>(addr(i + 2));
    const VX* x3 = reinterpret_cast<const VX*>(addr(i + 3));
    V s0 = {}, s1 = {}, s2 = {}, s3 = {}, u0 = {}, u1 = {}, u2 = {}, u3 = {};
    for (int v = 0; v < NV; v += 2) {
      s0 += av[v] * x0[v];
      s1 += av[v] * x1[v];
      s2 += av[v] * x2[v];
      s3 += av[v] * x3[v];
      u0 += av[v + 1] * x0[v + 1];
      u1 += av[v + 1] * x1[v + 1];
      u2 += av[v + 1] * x2[v + 1];
      u3 += av[v + 1] * x3[v + 1];
    }
    hsum4(s0 + u0, s1 + u1, s2 + u2, s3 + u3, out + i);
  }
  for (; i < n; ++i) {
    const VX* x0 = reinterpret_cast<const VX*>(addr(i));
    V s0 = {}, u0 = {};
    for (int v = 0; v < NV; v += 2) {
      s0 += av[v] * x0[v];
      u0 += av[v + 1] * x0[v + 1];
    }
    out[i] += hsum(s0 + u0);
  }
}

// ------------------------------------------------------------------------------------------
// sampled dense-dense: acc[base[r] + i] += dot(at[(r - r0) * T], bt[c_i * T]) for the i-th column
// c_i of row r in the pattern (block rows expanded), rows r0 <= r < r1, T = NV lanes-vectors.
// The accumulator is packed in pattern order, so its updates are sequential (the caller scatters
// it into the dense gradient at the end).  bo = bk = 1 is the unstructured layout.  The row of
// `at` is held in registers; four nonzeros are dotted against it at a time (two chains each) and
// reduced together.
// ------------------------------------------------------------------------------------------
template <typename S, int NV>
void sddmm_tile(const int32_t* __restrict ptr, const int32_t* __restrict idx, int64_t bo, int64_t bk, int64_t ncols,
                int64_t r0, int64_t r1, const S* __restrict at, const S* __restrict bt, S* __restrict acc,
                const int64_t* __restrict base, std::vector<int32_t>& cols) {
  using V = typename VT<S>::v;
  constexpr int64_t T = NV * VT<S>::L;
  constexpr int64_t PF = 4;  // nonzeros ahead whose tile rows are prefetched
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
    const V* ar = reinterpret_cast<const V*>(at + (r - r0) * T);
    V av[NV];
    for (int v = 0; v < NV; ++v) av[v] = ar[v];
    const auto addr = [&](int64_t i) { return bt + int64_t(cl[i]) * T; };
    const auto prefetch = [&](int64_t i) {
      if (i + PF + 4 <= nc) {
        for (int q = 0; q < 4; ++q) {
          const char* pf = reinterpret_cast<const char*>(addr(i + PF + q));
          for (int64_t l = 0; l < int64_t(T * sizeof(S)); l += 64) __builtin_prefetch(pf + l);
        }
      }
    };
    dot_rows<S, NV, true>(av, nc, addr, prefetch, acc + base[r]);
  }
}

// The same for an unstructured pattern in window-major form (panel_win's metadata): windows go
// outermost, so a window of the tile `bt` stays in L1 for every row of r0 <= r < r1 while each
// row's slice of `at` is reloaded once per window.  acc is in CSR order: crow[r] is row r's first
// slot and `cursor` (r1 - r0 scratch entries) tracks how far each row has got, since the windows
// visit a row's nonzeros in column order.  Per element one dot per call, as in sddmm_tile.
template <typename S, int NV>
void sddmm_win(const int32_t* __restrict wptr, const int32_t* __restrict idx, const int32_t* __restrict crow, int64_t R,
               int64_t nw, int64_t r0, int64_t r1, const S* __restrict at, const S* __restrict bt, S* __restrict acc,
               int32_t* __restrict cursor) {
  using V = typename VT<S>::v;
  constexpr int64_t T = NV * VT<S>::L;
  for (int64_t r = r0; r < r1; ++r) cursor[r - r0] = crow[r];
  for (int64_t w = 0; w < nw; ++w) {
    const int32_t* __restrict wp = wptr + w * (R + 1);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j = wp[r];
      const int64_t e = wp[r + 1];
      if (j == e) continue;
      S* out = acc + cursor[r - r0];
      cursor[r - r0] += int32_t(e - j);
      const V* ar = reinterpret_cast<const V*>(at + (r - r0) * T);
      V av[NV];
      for (int v = 0; v < NV; ++v) av[v] = ar[v];
      const int32_t* cl = idx + j;
      dot_rows<S, NV, true>(
          av, e - j, [&](int64_t i) { return bt + int64_t(cl[i]) * T; }, [](int64_t) {}, out);
    }
  }
}

// ------------------------------------------------------------------------------------------
// block weight gradient as small dense GEMMs on vector-wide column strips:
// out[r, c] = sum_n dy[n * ldy + r] * x[n, c] for every (r, c) inside the blocks of block rows
// rb0 <= rb < rb1 (zero elsewhere in those rows), with x given as strips xs[(c / L) * N * L + n * L + c % L] (strips_from_rows).
// Needs bk a multiple of the vector width L and blocks inside the matrix.  A register tile of up
// to RS rows x one vector of columns accumulates over n in order: one vector load of the strip
// and RS broadcasts of the (contiguously repacked) dy strip per n, RS independent FMA chains.
// ------------------------------------------------------------------------------------------

// xs[(c / L) * N * L + n * L + c % L] = x[n * ld + c] for c in [c0, c1) (multiples of L).
template <typename S>
void strips_from_rows(const S* __restrict x, int64_t ld, int64_t N, int64_t c0, int64_t c1, S* __restrict xs) {
  constexpr int64_t L = VT<S>::L;
  for (int64_t c = c0; c < c1; c += L) {
    S* d = xs + (c / L) * N * L;
    for (int64_t n = 0; n < N; ++n) std::memcpy(d + n * L, x + n * ld + c, L * sizeof(S));
  }
}

template <typename S>
void bsr_dw_rows(const int32_t* __restrict ptr, const int32_t* __restrict idx, int64_t bo, int64_t bk, int64_t rb0,
                 int64_t rb1, const S* __restrict dy, int64_t ldy, const S* __restrict xs, int64_t N,
                 S* __restrict out, int64_t ldo, S* __restrict ds) {
  using V = typename VT<S>::v;
  constexpr int64_t L = VT<S>::L;
  constexpr int64_t RS = 16;
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    // the block row's zeros, written by the task that owns it (no separate pass over the gradient)
    std::fill(out + rb * bo * ldo, out + (rb + 1) * bo * ldo, S(0));
    if (ptr[rb] == ptr[rb + 1]) continue;
    for (int64_t r = rb * bo; r < (rb + 1) * bo; r += RS) {
      const int64_t rs = std::min(RS, (rb + 1) * bo - r);
      // ds[n * RS + i] = dy[n, r + i]: contiguous broadcasts in the inner loop
      for (int64_t n = 0; n < N; ++n) {
        std::memcpy(ds + n * RS, dy + n * ldy + r, rs * sizeof(S));
        std::fill(ds + n * RS + rs, ds + (n + 1) * RS, S(0));
      }
      for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
        const int64_t c0 = int64_t(idx[j]) * bk;
        for (int64_t cv = c0; cv < c0 + bk; cv += L) {
          V acc[RS] = {};
          const V* xp = reinterpret_cast<const V*>(xs + (cv / L) * N * L);
          for (int64_t n = 0; n < N; ++n) {
            const V xv = xp[n];
            const S* d = ds + n * RS;
            for (int i = 0; i < RS; ++i) acc[i] += d[i] * xv;
          }
          for (int64_t i = 0; i < rs; ++i) std::memcpy(out + (r + i) * ldo + cv, &acc[i], sizeof(V));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// conv2d tiles.  A tile covers T consecutive output positions q = n * P + p (P = Ho * Wo), which
// may span images; the matrix view of the weight is [O, C * kh * kw] with k = (c * kh + i) * kw + j.
// ------------------------------------------------------------------------------------------

inline int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceildiv(int64_t a, int64_t b) { return -floordiv(-a, b); }

// Valid range [lo, hi) of i in [0, len) with 0 <= (ow0 + i) * s + off < W.
inline void valid_range(int64_t ow0, int64_t len, int64_t s, int64_t off, int64_t W, int64_t& lo, int64_t& hi) {
  lo = std::min<int64_t>(len, std::max<int64_t>(0, ceildiv(-off, s) - ow0));
  hi = std::min<int64_t>(len, ceildiv(W - off, s) - ow0);
  if (hi < lo) hi = lo;
}

// bt[(k - c0 * kh * kw) * T + t] = im2col(x)[q0 + t, k] for channels c0 <= c < c1; zero past nt.
// A run of `len` scalars; the common short widths of small planes (4, 8, 16 outputs per row) as
// fixed-size copies, one or two vector moves instead of a loop.
template <typename S>
inline void copy_run(S* __restrict d, const S* __restrict s, int64_t len) {
  switch (len) {
    case 4: std::memcpy(d, s, 4 * sizeof(S)); return;
    case 8: std::memcpy(d, s, 8 * sizeof(S)); return;
    case 16: std::memcpy(d, s, 16 * sizeof(S)); return;
    default: for (int64_t k = 0; k < len; ++k) d[k] = s[k];
  }
}

template <typename S>
void im2col_tile(const S* __restrict x, const ConvGeom& g, int64_t q0, int64_t nt, int64_t T, int64_t c0, int64_t c1,
                 S* __restrict bt) {
  const int64_t P = g.Ho * g.Wo, taps = g.kh * g.kw;
  if (g.ph == 0 && g.pw == 0) {
    // no padding (the op layer pads small planes once per call): every tap of every output reads
    // inside the plane, so each (row, tap) is one straight copy, with no range checks
    for (int64_t t = 0; t < nt;) {
      const int64_t q = q0 + t, n = q / P, p = q % P, oh = p / g.Wo, ow0 = p % g.Wo;
      const int64_t len = std::min(g.Wo - ow0, nt - t);
      for (int64_t c = c0; c < c1; ++c) {
        const S* xc = x + (n * g.C + c) * g.H * g.W + oh * g.sh * g.W + ow0 * g.sw;
        S* d = bt + (c - c0) * taps * T + t;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j, d += T) {
            const S* s = xc + i * g.dh * g.W + j * g.dw;
            if (g.sw == 1)
              copy_run(d, s, len);
            else
              for (int64_t k = 0; k < len; ++k) d[k] = s[k * g.sw];
          }
      }
      t += len;
    }
    if (nt < T)
      for (int64_t k = 0; k < (c1 - c0) * taps; ++k) std::fill(bt + k * T + nt, bt + (k + 1) * T, S(0));
    return;
  }
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / P, p = q % P, oh = p / g.Wo, ow0 = p % g.Wo;
    const int64_t len = std::min(g.Wo - ow0, nt - t);
    for (int64_t c = c0; c < c1; ++c) {
      const S* xc = x + (n * g.C + c) * g.H * g.W;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        for (int64_t j = 0; j < g.kw; ++j) {
          S* d = bt + ((c - c0) * taps + i * g.kw + j) * T + t;
          if (ih < 0 || ih >= g.H) {
            std::fill(d, d + len, S(0));
            continue;
          }
          const S* xr = xc + ih * g.W;
          const int64_t off = j * g.dw - g.pw;
          int64_t lo, hi;
          valid_range(ow0, len, g.sw, off, g.W, lo, hi);
          std::fill(d, d + lo, S(0));
          if (g.sw == 1) {
            const S* s = xr + ow0 + off;
            for (int64_t k = lo; k < hi; ++k) d[k] = s[k];
          } else {
            for (int64_t k = lo; k < hi; ++k) d[k] = xr[(ow0 + k) * g.sw + off];
          }
          std::fill(d + hi, d + len, S(0));
        }
      }
    }
    t += len;
  }
  if (nt < T)
    for (int64_t k = 0; k < (c1 - c0) * taps; ++k) std::fill(bt + k * T + nt, bt + (k + 1) * T, S(0));
}

// dx[n, c, ih, iw] += ot[(k - c0 * kh * kw) * T + t] over the tile, channels c0 <= c < c1 (the
// adjoint of im2col_tile).  Terms are added in tile order, then k order: a fixed order.
template <typename S>
void col2im_tile(const S* __restrict ot, const ConvGeom& g, int64_t q0, int64_t nt, int64_t T, int64_t c0, int64_t c1,
                 S* __restrict dx) {
  const int64_t P = g.Ho * g.Wo, taps = g.kh * g.kw;
  if (g.ph == 0 && g.pw == 0) {
    // no padding (dx is the op layer's padded copy): the same terms in the same order as below
    for (int64_t t = 0; t < nt;) {
      const int64_t q = q0 + t, n = q / P, p = q % P, oh = p / g.Wo, ow0 = p % g.Wo;
      const int64_t len = std::min(g.Wo - ow0, nt - t);
      for (int64_t c = c0; c < c1; ++c) {
        S* xc = dx + (n * g.C + c) * g.H * g.W + oh * g.sh * g.W + ow0 * g.sw;
        const S* s = ot + (c - c0) * taps * T + t;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j, s += T) {
            S* d = xc + i * g.dh * g.W + j * g.dw;
            if (g.sw == 1)
              for (int64_t k = 0; k < len; ++k) d[k] += s[k];
            else
              for (int64_t k = 0; k < len; ++k) d[k * g.sw] += s[k];
          }
      }
      t += len;
    }
    return;
  }
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / P, p = q % P, oh = p / g.Wo, ow0 = p % g.Wo;
    const int64_t len = std::min(g.Wo - ow0, nt - t);
    for (int64_t c = c0; c < c1; ++c) {
      S* xc = dx + (n * g.C + c) * g.H * g.W;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        S* xr = xc + ih * g.W;
        for (int64_t j = 0; j < g.kw; ++j) {
          const S* s = ot + ((c - c0) * taps + i * g.kw + j) * T + t;
          const int64_t off = j * g.dw - g.pw;
          int64_t lo, hi;
          valid_range(ow0, len, g.sw, off, g.W, lo, hi);
          if (g.sw == 1) {
            S* d = xr + ow0 + off;
            for (int64_t k = lo; k < hi; ++k) d[k] += s[k];
          } else {
            for (int64_t k = lo; k < hi; ++k) xr[(ow0 + k) * g.sw + off] += s[k];
          }
        }
      }
    }
    t += len;
  }
}

// y[n, o, p] = ot[(o - o0) * T + t] (+ bias[o]) for o0 <= o < o1.
template <typename S>
void conv_out_tile(const S* __restrict ot, int64_t O, int64_t P, int64_t q0, int64_t nt, int64_t T, int64_t o0,
                   int64_t o1, const S* __restrict bias, S* __restrict y) {
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / P, p = q % P, len = std::min(P - p, nt - t);
    for (int64_t o = o0; o < o1; ++o) {
      const S* s = ot + (o - o0) * T + t;
      S* d = y + (n * O + o) * P + p;
      if (bias) {
        const S b = bias[o];
        for (int64_t k = 0; k < len; ++k) d[k] = s[k] + b;
      } else {
        for (int64_t k = 0; k < len; ++k) d[k] = s[k];
      }
    }
    t += len;
  }
}

// bt[(o - o0) * T + t] = dy[n, o, p] for o0 <= o < o1; zero past nt.
template <typename S>
void conv_in_tile(const S* __restrict dy, int64_t O, int64_t P, int64_t q0, int64_t nt, int64_t T, int64_t o0, int64_t o1,
                  S* __restrict bt) {
  for (int64_t t = 0; t < nt;) {
    const int64_t q = q0 + t, n = q / P, p = q % P, len = std::min(P - p, nt - t);
    for (int64_t o = o0; o < o1; ++o) {
      const S* s = dy + (n * O + o) * P + p;
      S* d = bt + (o - o0) * T + t;
      for (int64_t k = 0; k < len; ++k) d[k] = s[k];
    }
    t += len;
  }
  if (nt < T)
    for (int64_t o = o0; o < o1; ++o) std::fill(bt + (o - o0) * T + nt, bt + (o - o0 + 1) * T, S(0));
}

// ------------------------------------------------------------------------------------------
// depthwise conv2d (groups == C, weight [O, 1, kh, kw], O = C * mult), direct; the taps of
// output channel o are the CSR row o over kh * kw columns.
// ------------------------------------------------------------------------------------------

// y[n, o] for one plane: sum over the taps of o of w * shifted x[n, o / mult] (+ bias).
template <typename S>
void dw_fwd_plane(const S* __restrict xc, const S* __restrict w, const int32_t* __restrict ptr,
                  const int32_t* __restrict idx, int64_t o, const ConvGeom& g, S bias, S* __restrict y) {
  const int64_t P = g.Ho * g.Wo, taps = g.kh * g.kw;
  std::fill(y, y + P, S(0));
  for (int64_t e = ptr[o]; e < ptr[o + 1]; ++e) {
    const int64_t tap = idx[e], i = tap / g.kw, j = tap % g.kw;
    const S wv = w[o * taps + tap];
    const int64_t off = j * g.dw - g.pw;
    int64_t lo, hi;
    valid_range(0, g.Wo, g.sw, off, g.W, lo, hi);
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t ih = oh * g.sh - g.ph + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      const S* xr = xc + ih * g.W;
      S* yr = y + oh * g.Wo;
      if (g.sw == 1) {
        const S* s = xr + off;
        for (int64_t k = lo; k < hi; ++k) yr[k] += wv * s[k];
      } else {
        for (int64_t k = lo; k < hi; ++k) yr[k] += wv * xr[k * g.sw + off];
      }
    }
  }
  if (bias != S(0))
    for (int64_t k = 0; k < P; ++k) y[k] += bias;
}

// dx[n, c] += the adjoint of dw_fwd_plane for output channel o (whose input channel is c).
template <typename S>
void dw_dx_plane(const S* __restrict dyo, const S* __restrict w, const int32_t* __restrict ptr,
                 const int32_t* __restrict idx, int64_t o, const ConvGeom& g, S* __restrict dxc) {
  const int64_t taps = g.kh * g.kw;
  for (int64_t e = ptr[o]; e < ptr[o + 1]; ++e) {
    const int64_t tap = idx[e], i = tap / g.kw, j = tap % g.kw;
    const S wv = w[o * taps + tap];
    const int64_t off = j * g.dw - g.pw;
    int64_t lo, hi;
    valid_range(0, g.Wo, g.sw, off, g.W, lo, hi);
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t ih = oh * g.sh - g.ph + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      S* xr = dxc + ih * g.W;
      const S* dr = dyo + oh * g.Wo;
      if (g.sw == 1) {
        S* d = xr + off;
        for (int64_t k = lo; k < hi; ++k) d[k] += wv * dr[k];
      } else {
        for (int64_t k = lo; k < hi; ++k) xr[k * g.sw + off] += wv * dr[k];
      }
    }
  }
}

// dW[o, tap] = sum over n, oh, ow of dy[n, o] * shifted x[n, o / mult] for the taps in row o of
// the gradient pattern.  Sixteen partial sums (a fixed lane split) keep the loop vectorisable.
template <typename S>
void dw_dw_row(const S* __restrict x, const S* __restrict dy, const int32_t* __restrict ptr,
               const int32_t* __restrict idx, int64_t o, int64_t mult, const ConvGeom& g, S* __restrict dw) {
  const int64_t taps = g.kh * g.kw, P = g.Ho * g.Wo, c = o / mult;
  for (int64_t e = ptr[o]; e < ptr[o + 1]; ++e) {
    const int64_t tap = idx[e], i = tap / g.kw, j = tap % g.kw;
    const int64_t off = j * g.dw - g.pw;
    int64_t lo, hi;
    valid_range(0, g.Wo, g.sw, off, g.W, lo, hi);
    S part[16] = {};
    for (int64_t n = 0; n < g.N; ++n) {
      const S* xc = x + (n * g.C + c) * g.H * g.W;
      const S* dyo = dy + (n * g.O + o) * P;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        const S* xr = xc + ih * g.W;
        const S* dr = dyo + oh * g.Wo;
        for (int64_t k = lo; k < hi; ++k) part[k & 15] += dr[k] * xr[k * g.sw + off];
      }
    }
    S s = 0;
    for (int k = 0; k < 16; ++k) s += part[k];
    dw[o * taps + tap] = s;
  }
}

#include "conv_direct_impl.h"
