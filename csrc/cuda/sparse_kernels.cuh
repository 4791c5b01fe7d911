// Torch-free CUDA kernels for the `cuda` backend (the GPU fallback when Triton is absent or
// refuses a call).  This header compiles on its own with nvcc (csrc/cuda/compile_check.cu
// instantiates every template), so CI compile-checks it for sm_80 and sm_90 without torch.
//
// Matrices are row-major.  The weight W is a dense [M, K] array; only the entries listed by the
// metadata are read, so values stored at pruned positions never matter.
//
//   spmm_rows:   C[r, :] = sum_j  W(r, idx[j]) * B[idx[j], :]   for j in ptr[r] .. ptr[r+1]
//     forward   (y^T = (W.M) x^T):  rows = CSR rows of W,  W(r, c) = w[r * ldw + c]
//     dx        (dx^T = (W.M)^T dy^T): rows = CSC columns,  W(r, c) = w[c * ldw + r]
//   sddmm:       D[row_j, col_j] = <A[row_j, :], B[col_j, :]>  for every stored (row_j, col_j)
//     dW = (dy^T x) . G  with A = dy^T [M, N], B = x^T [K, N]
//
// Every output element is reduced by one thread (or one warp) in a fixed order: results do not
// depend on the launch configuration, and no atomics are used.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace sparsekern_cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One thread block per group of output rows (blockDim.y rows); threads along x cover the N
// columns of the dense operand, so loads of B and stores of C are coalesced.  The row's index
// list is staged through shared memory in chunks of blockDim.x.
//
// blockDim.x must be 32 (one warp per output row).  Grid: (ceil(N / (32 * COLS)),
// ceil(rows / blockDim.y)).  Shared: blockDim.y * 32
// * (sizeof(Index) + sizeof(acc)) bytes.
template <typename T, typename Index, int COLS>
__global__ void spmm_rows_kernel(
    const Index* __restrict__ ptr,      // [rows + 1]
    const Index* __restrict__ idx,      // [nnz]
    const T* __restrict__ w,            // dense weight
    int64_t w_stride_row,               // W(r, c) = w[r * w_stride_row + c * w_stride_col]
    int64_t w_stride_col,
    const T* __restrict__ b,            // [inner, n] row-major
    T* __restrict__ c,                  // [rows, n] row-major
    int64_t rows, int64_t n) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  Index* s_idx = reinterpret_cast<Index*>(smem_raw);
  A* s_val = reinterpret_cast<A*>(s_idx + blockDim.x * blockDim.y);

  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x) * COLS + threadIdx.x;
  Index* my_idx = s_idx + threadIdx.y * blockDim.x;
  A* my_val = s_val + threadIdx.y * blockDim.x;

  A acc[COLS];
#pragma unroll
  for (int i = 0; i < COLS; ++i) acc[i] = A(0);

  Index start = 0, end = 0;
  if (r < rows) {
    start = ptr[r];
    end = ptr[r + 1];
  }
  for (Index base = start; base < end; base += blockDim.x) {
    const Index j = base + threadIdx.x;
    if (j < end) {
      const Index inner = idx[j];
      my_idx[threadIdx.x] = inner;
      my_val[threadIdx.x] = to_acc<T>(w[r * w_stride_row + static_cast<int64_t>(inner) * w_stride_col]);
    }
    __syncwarp();
    const int count = static_cast<int>(min(static_cast<Index>(blockDim.x), end - base));
    for (int t = 0; t < count; ++t) {
      const A v = my_val[t];
      const T* brow = b + static_cast<int64_t>(my_idx[t]) * n;
#pragma unroll
      for (int i = 0; i < COLS; ++i) {
        const int64_t col = col0 + static_cast<int64_t>(i) * blockDim.x;
        if (col < n) acc[i] += v * to_acc<T>(brow[col]);
      }
    }
    __syncwarp();
  }
  if (r < rows) {
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
      const int64_t col = col0 + static_cast<int64_t>(i) * blockDim.x;
      if (col < n) c[r * n + col] = from_acc<T>(acc[i]);
    }
  }
}

// One warp per stored entry: a dot product of two contiguous rows of length n, reduced with
// shuffles in a fixed tree.  Entries outside the pattern are left as they are (the launcher
// zero-fills the output first).
template <typename T, typename Index>
__global__ void sddmm_kernel(
    const Index* __restrict__ row_of,   // [nnz] row of each entry
    const Index* __restrict__ col_of,   // [nnz] column of each entry
    const T* __restrict__ a,            // [rows_a, n]
    const T* __restrict__ b,            // [rows_b, n]
    T* __restrict__ d,                  // dense [rows_a, ldd]
    int64_t ldd, int64_t nnz, int64_t n) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (e >= nnz) return;
  const int64_t r = row_of[e];
  const int64_t k = col_of[e];
  const T* ar = a + r * n;
  const T* br = b + k * n;
  A acc = A(0);
  for (int64_t i = lane; i < n; i += 32) acc += to_acc<T>(ar[i]) * to_acc<T>(br[i]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) d[r * ldd + k] = from_acc<T>(acc);
}

// Block-sparse forward/dx: one thread block per (stored block row, tile of n).  Each stored
// tile of W (bo x bk) multiplies a bk-row slab of B.  Plain FMA loops: this is the fallback path,
// the fast block kernels are the Triton ones.
template <typename T, typename Index>
__global__ void bsr_spmm_rows_kernel(
    const Index* __restrict__ ptr,      // [block_rows + 1]
    const Index* __restrict__ idx,      // [nnz_blocks]
    const T* __restrict__ w, int64_t w_stride_row, int64_t w_stride_col,
    int bo, int bk,                     // tile sides in the orientation of this product
    int64_t rows, int64_t inner,        // unpadded sizes of C's rows and B's rows
    const T* __restrict__ b, T* __restrict__ c, int64_t n) {
  using A = typename Acc<T>::type;
  const int64_t brow = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int i = threadIdx.y; i < bo; i += blockDim.y) {
    const int64_t r = brow * bo + i;
    if (r >= rows || col >= n) continue;
    A acc = A(0);
    for (Index j = ptr[brow]; j < ptr[brow + 1]; ++j) {
      const int64_t k0 = static_cast<int64_t>(idx[j]) * bk;
      for (int t = 0; t < bk; ++t) {
        const int64_t k = k0 + t;
        if (k >= inner) break;
        acc += to_acc<T>(w[r * w_stride_row + k * w_stride_col]) * to_acc<T>(b[k * n + col]);
      }
    }
    c[r * n + col] = from_acc<T>(acc);
  }
}

}  // namespace sparsekern_cuda
