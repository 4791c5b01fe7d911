// Dispatch table of the CPU tile kernels (kernels_impl.h), one per instruction set and dtype, in
// one sub-table per op family.  Torch-free: the op files (linear.cpp, conv2d.cpp, dwconv2d.cpp)
// take the table of the instruction set in use and call through it.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace sparsekern {

// bfloat16 storage (the bits of at::BFloat16): the top half of a float.  The kernels compute in
// float; bf16 is widened when a tile or a value is loaded and rounded (to nearest even, as torch
// does) when a result is stored.
struct bf16 {
  uint16_t bits;
};
inline float as_float(float v) { return v; }
inline double as_float(double v) { return v; }
inline float as_float(bf16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float& d, float v) { d = v; }
inline void store(double& d, double v) { d = v; }
inline void store(bf16& d, float v) {
  if (v != v) {
    d.bits = 0x7FC0;  // torch's NaN
    return;
  }
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  d.bits = uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Columns of block row rb of a BSR grid (block columns idx[ptr[rb]:ptr[rb+1]] of width bk,
// clipped to ncols), expanded into a list.
inline void block_row_columns(const int32_t* ptr, const int32_t* idx, int64_t rb, int64_t bk, int64_t ncols,
                              std::vector<int32_t>& cols) {
  cols.clear();
  for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
    const int64_t c0 = int64_t(idx[j]) * bk, c1 = std::min(c0 + bk, ncols);
    for (int64_t c = c0; c < c1; ++c) cols.push_back(int32_t(c));
  }
}

// Conv2d geometry, all sizes explicit.
struct ConvGeom {
  int64_t N, C, H, W;   // input
  int64_t O, kh, kw;    // weight [O, C / groups, kh, kw]
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;       // output
};

// The tables are built with designated initialisers (kernels_table.h): every entry by name.

// The sparse x dense products that linear and conv2d's implicit GEMM share: transposes between
// row-major matrices and tiles, panels (A times a tile) and weight-gradient tiles (SDDMM).
template <typename S>
struct SpmmKernels {
  void (*tile_from_rows)(const S*, int64_t, int64_t, int64_t, int64_t, S*);
  void (*tile_to_rows)(const S*, int64_t, int64_t, int64_t, const S*, S*, int64_t);
  // the same from / to bf16 rows (widened on load, rounded on store)
  void (*tile_from_bf16)(const bf16*, int64_t, int64_t, int64_t, int64_t, S*);
  void (*tile_to_bf16)(const S*, int64_t, int64_t, int64_t, const S*, bf16*, int64_t);
  // unstructured panels of width kPanelVecs[i] * lanes (common.h)
  void (*panel_csr[4])(const int32_t*, const int32_t*, const S*, int64_t, int64_t, int64_t, int64_t, int64_t, const S*,
                       S*);
  // the same with the values packed in CSR order (val[j] belongs to idx[j])
  void (*panel_csr_packed[4])(const int32_t*, const int32_t*, const S*, int64_t, int64_t, int64_t, const S*, S*);
  void (*panel_bsr)(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, const S*, const int64_t*, int64_t, int64_t,
                    const S*, S*, std::vector<int32_t>&);
  // weight-gradient tiles of width kSddmmVecs[i] * lanes (common.h)
  void (*sddmm_tile[4])(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const S*, const S*,
                        S*, const int64_t*, std::vector<int32_t>&);
};

// linear only: the whole-block weight gradient and the window-major (L1) products.
template <typename S>
struct LinearKernels {
  void (*strips_from_rows)(const S*, int64_t, int64_t, int64_t, int64_t, S*);
  void (*bsr_dw_rows)(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t, const S*, int64_t, const S*,
                      int64_t, S*, int64_t, S*);
  // unstructured window-major panels of width {2, 4, 8} * lanes
  void (*panel_win[3])(const int32_t*, const int32_t*, const S*, int64_t, int64_t, int64_t, int64_t, const S*, S*);
  // unstructured window-major weight-gradient tiles of width {4, 8, 16} * lanes
  void (*sddmm_win[3])(const int32_t*, const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t, const S*,
                       const S*, S*, int32_t*);
};

// conv2d (groups = 1): the im2col / col2im tiles of implicit GEMM, and direct conv2d on shifted
// views (conv_direct_impl.h).
template <typename S>
struct Conv2dKernels {
  void (*im2col_tile)(const S*, const ConvGeom&, int64_t, int64_t, int64_t, int64_t, int64_t, S*);
  void (*col2im_tile)(const S*, const ConvGeom&, int64_t, int64_t, int64_t, int64_t, int64_t, S*);
  void (*conv_out_tile)(const S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const S*, S*);
  void (*conv_in_tile)(const S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, S*);
  // direct panels of width {2, 4, 8} * lanes and weight-gradient tiles of width {4, 8, 16} * lanes
  void (*direct_panel[3])(const int64_t*, const int64_t*, const S*, int64_t, int64_t, const S*, S*);
  void (*direct_sddmm[3])(const int64_t*, const int64_t*, int64_t, int64_t, const S*, int64_t, const S*, S*);
  // four rows sharing their offsets (block layouts), widths {2, 4} * lanes
  void (*direct_panel4[2])(const int64_t*, const int64_t*, const S*, int64_t, int64_t, const S*, S*);
};

// depthwise conv2d: one plane or one weight row per call.
template <typename S>
struct Dwconv2dKernels {
  void (*dw_fwd_plane)(const S*, const S*, const int32_t*, const int32_t*, int64_t, const ConvGeom&, S, S*);
  void (*dw_dx_plane)(const S*, const S*, const int32_t*, const int32_t*, int64_t, const ConvGeom&, S*);
  void (*dw_dw_row)(const S*, const S*, const int32_t*, const int32_t*, int64_t, int64_t, const ConvGeom&, S*);
};

template <typename S>
struct Kernels {
  const char* isa;
  int64_t panel_width;  // T of block panel tiles
  int64_t lanes;        // scalars per vector; unstructured and weight-gradient tiles are multiples
  SpmmKernels<S> spmm;
  LinearKernels<S> linear;
  Conv2dKernels<S> conv2d;
  Dwconv2dKernels<S> dwconv2d;
};

// The table for the instruction set in use (the best the CPU supports unless overridden).
template <typename S>
const Kernels<S>& kernels();

// Names of the instruction sets this CPU can run, best first ("avx512", "avx2", "generic").
std::vector<const char*> supported_isas();
// The instruction set in use; `request` (if not empty) selects one of supported_isas() first.
// Returns nullptr if `request` is unknown or unsupported here.
const char* select_isa(const char* request);

// ---------------------------------------------------------------------------------------------
// bf16 paths (bf16_dot.cpp).  "widen": bf16 tiles widened to float, float FMAs (every CPU);
// "avx512_bf16": vdpbf16ps on bf16 tiles (pairs of bf16 products summed into float, subnormals
// read as zero) for the linear panels and weight gradients of every layout and the direct conv2d,
// where the CPU has AVX512-BF16.  The best one runs unless
// SPARSEKERN_CPU_BF16 (read once) or select_bf16_path picks another.
// ---------------------------------------------------------------------------------------------
enum class Bf16Path { WIDEN = 0, DPBF16 = 1 };
Bf16Path bf16_path();
// As select_isa, for the bf16 path; nullptr if `request` is unknown or unsupported here.
const char* select_bf16_path(const char* request);
std::vector<const char*> supported_bf16_paths();
// The bf16 features the CPU (and OS) offer, comma-separated ("avx512_bf16,amx_bf16"; "" if none).
std::string cpu_features();

// Batch width of the vdpbf16ps panels (four vectors of 16 floats).
inline constexpr int64_t kBf16PanelWidth = 64;
// Pair tile of bf16 rows: dst[p * T + t] = the bf16 pair (src[t, 2p], src[t, 2p + 1]) in one
// 32-bit word, low half first, for t < nt (zero past nt, and for a missing last column).
void bf16_pair_tile(const bf16* src, int64_t ld, int64_t nt, int64_t ncols, int64_t T, uint32_t* dst);
// The column pairs (c / 2, c even) of block row rb of a BSR grid with even bk, clipped to ncols.
void bf16_block_pairs(const int32_t* ptr, const int32_t* idx, int64_t rb, int64_t bk, int64_t ncols,
                      std::vector<int32_t>& pairs);
// panel_bsr on pair tiles: ot[(r - r0) * T + t] = sum over the pairs i of block row r / bo of
// pk[(base[rb] + i) * bo + r % bo] . bt[pairs[i] * T + t] (vdpbf16ps), T = kBf16PanelWidth.
void bf16_panel_bsr_dp(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols,
                       const uint32_t* pk, const int64_t* base, int64_t r0, int64_t r1, const uint32_t* bt, float* ot,
                       std::vector<int32_t>& pairs);

// Position of batch column t (< T, T a multiple of 32) in a lane tile row: within each chunk of
// 32, t = 16h + 4L + w sits at 8L + 4h + w, so that unpacking two rows word by word (vpunpcklwd /
// vpunpckhwd, which work inside 128-bit lanes) gives the pairs of t = 0..15 and 16..31 in order.
inline int64_t lane_pos(int64_t t) {
  const int64_t u = t & 31, h = u >> 4, L = (u & 15) >> 2, w = u & 3;
  return (t & ~int64_t(31)) + 8 * L + 4 * h + w;
}

// Lane tile of bf16 rows for the unstructured vdpbf16ps kernels (T a multiple of 32): the bits of
// src[t, c] at dst[c * T + lane_pos(t)] for t < nt (zero up to T), lane_pos a fixed permutation
// inside each 32 columns (bf16_dot.cpp) that the panels' word interleave undoes.
void bf16_lane_tile(const bf16* src, int64_t ld, int64_t nt, int64_t ncols, int64_t T, uint16_t* dst);
// One lane tile row: dst[lane_pos(t)] = src[t] for t < T (T a multiple of 32).
void bf16_lane_order(const uint16_t* src, int64_t T, uint16_t* dst);
// The im2col lane tile of a conv with 16 output positions per image (4x4) whose input planes hold at
// most 32 entries, by word permutes of two images' planes at a time (vpermt2w, zero where a tap
// reads padding).  Lane16Map holds each tap's word indices and validity mask; on is false where
// the geometry does not qualify.
struct Lane16Map {
  static constexpr int64_t kMaxTaps = 25;
  bool on = false;
  alignas(64) uint16_t idx[32 * kMaxTaps];
  uint32_t mask[kMaxTaps];
  // the adjoint (bf16_col2im_lane16), where the input planes hold at most 16 entries: per tap, the
  // output position each input entry takes its term from, and which entries take one
  bool col_on = false;
  alignas(64) int32_t cidx[16 * kMaxTaps];
  uint32_t cmask[kMaxTaps];
  explicit Lane16Map(const ConvGeom& g);
};
// dx[n, c] (the whole input plane, rounded to bf16) = the sum over taps of the tile's float rows
// ot[((c - c0) * taps + tap) * T + t] (natural position order) at the positions of image n, for the
// images of positions q0 .. q0 + nt and channels c0 <= c < c1, if map.col_on and the avx512_bf16
// path (q0 a multiple of 16); returns whether it wrote them.
bool bf16_col2im_lane16(const float* ot, int64_t T, const ConvGeom& g, const Lane16Map& map, int64_t q0, int64_t nt,
                        int64_t c0, int64_t c1, bf16* dx);
// bt[k * T + lane_pos(t)] (the layout of im2col_lane_tile in conv2d.cpp) for positions q0 .. q0 + T
// of the unpadded input x (zero past the batch), if map.on, the avx512_bf16 path and T, q0
// multiples of 32; returns whether it wrote the tile.
bool bf16_im2col_lane16(const uint16_t* x, const ConvGeom& g, const Lane16Map& map, int64_t q0, int64_t T,
                        uint16_t* bt);
// The same tiles for stride-1 convs whose output planes have the input's size and at least 32
// entries (7x7 and up): each tap reads the plane at a fixed offset from the output position, so a
// tile row's 32 positions are one masked load of the (unpadded) plane (two where they run into the
// next image), put in lane order by vpermw; the adjoint, for planes of a multiple of 16 entries
// with whole images per tile, adds masked loads of the tile rows.  Per tap: the offset, which
// output positions read inside the plane (bits, P + 32 per tap, zero past P), and for the adjoint
// which input entries of each group of 16 take a term.
struct LaneShiftMap {
  bool on = false, col_on = false;
  int64_t taps = 0, P = 0, words = 0;
  std::vector<int64_t> shift;
  std::vector<uint32_t> valid;  // [tap * words + w]: bit u % 32 of word u / 32 for output u
  std::vector<uint32_t> cmask;  // [tap * (P / 16) + group]
  explicit LaneShiftMap(const ConvGeom& g);
  // bits [o, o + n) of tap's valid bits (n <= 32), bit 0 first
  uint32_t bits(int64_t tap, int64_t o, int64_t n) const {
    const uint32_t* v = valid.data() + tap * words + o / 32;
    const uint64_t w = uint64_t(v[0]) | uint64_t(v[1]) << 32;
    const uint64_t b = w >> (o % 32);
    return n >= 32 ? uint32_t(b) : uint32_t(b) & ((uint32_t(1) << n) - 1);
  }
};
bool bf16_im2col_shift(const uint16_t* x, const ConvGeom& g, const LaneShiftMap& map, int64_t q0, int64_t T,
                       uint16_t* bt);
bool bf16_col2im_shift(const float* ot, int64_t T, const ConvGeom& g, const LaneShiftMap& map, int64_t q0, int64_t nt,
                       int64_t c0, int64_t c1, bf16* dx);
// Unstructured panel on a lane tile (T = 64 or 128): ot[(r - r0) * T + t] = sum over row r's
// nonzeros of A[r, c] . tile[c, t], the nonzeros in pairs: pk[pbase[r] + i] holds the bf16 pair
// (A[r, idx[ptr[r] + 2i]], A[r, idx[ptr[r] + 2i + 1]]) (high half zero past the row's end).
void bf16_panel_csr_dp(const int32_t* ptr, const int32_t* idx, const int64_t* pbase, const uint32_t* pk, int64_t r0,
                       int64_t r1, int64_t T, const uint16_t* bt, float* ot);
// sddmm_tile on lane tiles (T = 64, 128 or 256): acc[base[r] + i] += dot(at row r - r0, bt row c_i)
// for the i-th column c_i of row r (block rows expanded), summed by vdpbf16ps over pairs of batch
// columns (both tiles in the same lane order).
void bf16_sddmm_dp(const int32_t* ptr, const int32_t* idx, int64_t bo, int64_t bk, int64_t ncols, int64_t r0,
                   int64_t r1, int64_t T, const uint16_t* at, const uint16_t* bt, float* acc, const int64_t* base,
                   std::vector<int32_t>& cols);
// dst[q] = bf16(s[q] + add) for q < n, rounded to nearest even by vcvtneps2bf16 (on the
// avx512_bf16 path only: it reads float subnormals as zero and keeps a NaN's payload).
void bf16_round_row(const float* s, float add, int64_t n, bf16* dst);
// One run of an output row segment: ot positions [t, t + len) go to dst .. dst + len.
struct Bf16Run {
  int64_t t, len, dst;
};
// bf16_round_row over rows r < rows of ot (stride T) and every run: y[r * row_stride + dst + q] =
// bf16(ot[r * T + t + q] + bias[r]) (bias may be null).
void bf16_round_runs(const float* ot, int64_t T, int64_t rows, const float* bias, const Bf16Run* runs,
                     int64_t nruns, bf16* y, int64_t row_stride);
// Direct conv2d panel on bf16 views (T = 64 or 128): ot[(r - r0) * T + t] = sum over the pairs i in
// [pptr[r], pptr[r + 1]) of the bf16 pair w[i] . (x[off[2i] + t], x[off[2i + 1] + t]).
void bf16_direct_dp(const int64_t* pptr, const int64_t* off, const uint32_t* w, int64_t r0, int64_t r1, int64_t T,
                    const uint16_t* x, float* ot);
// Direct conv2d weight-gradient rows (T = 64 or 128): acc[j] += sum_t a[r * lda + t] * x[off[j] + t]
// for j in [ptr[r], ptr[r + 1]), summed by vdpbf16ps over pairs of positions.
void bf16_direct_sddmm_dp(const int64_t* ptr, const int64_t* off, int64_t r0, int64_t r1, int64_t T,
                          const uint16_t* a, int64_t lda, const uint16_t* x, float* acc);

}  // namespace sparsekern
