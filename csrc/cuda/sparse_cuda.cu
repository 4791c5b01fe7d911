// CUDA implementations of the sparse linear trio (`sparsekern::linear_fwd/dx/dw`, schemas in
// csrc/schemas.cpp) on top of the torch-free kernels in sparse_kernels.cuh.  Built only when CUDA is
// present and asked for (setup.py, SPARSEKERN_CUDA=1).
//
// Layout: the kernels multiply a sparse operand by a row-major dense one along its rows, so the
// launchers work on transposed activations: y^T = (W.M) x^T, dx^T = (W.M)^T dy^T, and
// dW[e] = <dy^T[row_e, :], x^T[col_e, :]> for every entry e of the gradient pattern.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sparse_kernels.cuh"

namespace sparsekern_cuda {
namespace {

template <typename S> struct DevType { using type = S; };
template <> struct DevType<at::Half> { using type = __half; };
template <> struct DevType<at::BFloat16> { using type = __nv_bfloat16; };

constexpr int kRowsPerBlock = 4;  // warps per thread block in spmm_rows_kernel
constexpr int kCols = 4;          // columns per thread

void check_inputs(const char* op, const at::Tensor& dense, const at::Tensor& weight, const at::Tensor& ptr,
                  const at::Tensor& idx, at::IntArrayRef block) {
  TORCH_CHECK(dense.is_cuda() && weight.is_cuda() && ptr.is_cuda() && idx.is_cuda(), op,
              ": expected every tensor on a CUDA device");
  TORCH_CHECK(dense.dim() == 2 && weight.dim() == 2, op, ": expected 2-D activations and weight");
  TORCH_CHECK(dense.scalar_type() == weight.scalar_type(), op, ": activations and weight must share a dtype");
  TORCH_CHECK(ptr.scalar_type() == idx.scalar_type() &&
                  (ptr.scalar_type() == at::kInt || ptr.scalar_type() == at::kLong),
              op, ": metadata must be int32 or int64, both the same");
  TORCH_CHECK(ptr.dim() == 1 && idx.dim() == 1 && ptr.is_contiguous() && idx.is_contiguous(), op,
              ": metadata must be contiguous 1-D tensors");
  TORCH_CHECK(block.size() == 2 && block[0] >= 1 && block[1] >= 1, op, ": block must be two positive ints");
}

// C[rows, n] = S B where S's row r lists entries idx[ptr[r]:ptr[r+1]] (tiles when block > 1).
void spmm_rows(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& w, int64_t stride_row,
               int64_t stride_col, int64_t bo, int64_t bk, int64_t rows, int64_t inner, const at::Tensor& b,
               at::Tensor& c) {
  const int64_t n = b.size(1);
  if (rows == 0 || n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sparsekern_spmm_rows", [&] {
    using T = typename DevType<scalar_t>::type;
    AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "sparsekern_spmm_rows_index", [&] {
      const auto* pw = reinterpret_cast<const T*>(w.data_ptr<scalar_t>());
      const auto* pb = reinterpret_cast<const T*>(b.data_ptr<scalar_t>());
      auto* pc = reinterpret_cast<T*>(c.data_ptr<scalar_t>());
      if (bo == 1 && bk == 1) {
        dim3 threads(32, kRowsPerBlock);
        dim3 grid(static_cast<unsigned>((n + 32 * kCols - 1) / (32 * kCols)),
                  static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
        size_t smem = threads.x * threads.y * (sizeof(index_t) + sizeof(typename Acc<T>::type));
        spmm_rows_kernel<T, index_t, kCols><<<grid, threads, smem, stream>>>(
            ptr.data_ptr<index_t>(), idx.data_ptr<index_t>(), pw, stride_row, stride_col, pb, pc, rows, n);
      } else {
        dim3 threads(64, 4);
        dim3 grid(static_cast<unsigned>((n + 63) / 64), static_cast<unsigned>(ptr.numel() - 1));
        bsr_spmm_rows_kernel<T, index_t><<<grid, threads, 0, stream>>>(
            ptr.data_ptr<index_t>(), idx.data_ptr<index_t>(), pw, stride_row, stride_col, static_cast<int>(bo),
            static_cast<int>(bk), rows, inner, pb, pc, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& crow, const at::Tensor& col, at::IntArrayRef block) {
  check_inputs("linear_fwd", x, weight, crow, col, block);
  TORCH_CHECK(x.size(1) == weight.size(1), "linear_fwd: x.size(1) must equal weight.size(1)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = weight.size(0), K = weight.size(1);
  auto w = weight.contiguous();
  auto xt = x.t().contiguous();             // [K, N]
  auto yt = at::empty({M, x.size(0)}, x.options());
  spmm_rows(crow, col, w, K, 1, block[0], block[1], M, K, xt, yt);
  auto y = yt.t().contiguous();
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

at::Tensor linear_dx_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& ccol,
                          const at::Tensor& row, at::IntArrayRef block) {
  check_inputs("linear_dx", dy, weight, ccol, row, block);
  TORCH_CHECK(dy.size(1) == weight.size(0), "linear_dx: dy.size(1) must equal weight.size(0)");
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = weight.size(0), K = weight.size(1);
  auto w = weight.contiguous();
  auto dyt = dy.t().contiguous();           // [M, N]
  auto dxt = at::empty({K, dy.size(0)}, dy.options());
  // walking columns of W: W(r = k, c = m) = w[m * K + k]; tiles are bk x bo in this orientation
  spmm_rows(ccol, row, w, 1, K, block[1], block[0], K, M, dyt, dxt);
  return dxt.t().contiguous();
}

at::Tensor linear_dw_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          at::IntArrayRef block) {
  check_inputs("linear_dw", dy, x, crow, col, block);
  TORCH_CHECK(dy.size(0) == x.size(0), "linear_dw: dy and x must have the same number of rows");
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(1), K = x.size(1), N = dy.size(0);
  auto dw = at::zeros({M, K}, dy.options());
  // entries of the gradient pattern, one (row, col) per weight (tiles are expanded and clipped)
  auto counts = (crow.slice(0, 1) - crow.slice(0, 0, -1)).to(at::kLong);
  auto rows = at::repeat_interleave(at::arange(crow.numel() - 1, crow.options().dtype(at::kLong)), counts);
  auto cols = col.to(at::kLong);
  if (block[0] != 1 || block[1] != 1) {
    auto ii = at::arange(block[0], rows.options());
    auto jj = at::arange(block[1], rows.options());
    auto r = (rows.view({-1, 1, 1}) * block[0] + ii.view({1, -1, 1})).expand({-1, block[0], block[1]}).reshape(-1);
    auto c = (cols.view({-1, 1, 1}) * block[1] + jj.view({1, 1, -1})).expand({-1, block[0], block[1]}).reshape(-1);
    auto keep = (r < M).logical_and(c < K);
    rows = r.masked_select(keep);
    cols = c.masked_select(keep);
  }
  const int64_t nnz = rows.numel();
  if (nnz == 0 || N == 0) return dw;
  auto dyt = dy.t().contiguous();   // [M, N]
  auto xt = x.t().contiguous();     // [K, N]
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekern_sddmm", [&] {
    using T = typename DevType<scalar_t>::type;
    const int threads = 256;
    const int64_t blocks = (nnz * 32 + threads - 1) / threads;
    sddmm_kernel<T, int64_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        rows.data_ptr<int64_t>(), cols.data_ptr<int64_t>(), reinterpret_cast<const T*>(dyt.data_ptr<scalar_t>()),
        reinterpret_cast<const T*>(xt.data_ptr<scalar_t>()), reinterpret_cast<T*>(dw.data_ptr<scalar_t>()), K, nnz,
        N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dw;
}

}  // namespace
}  // namespace sparsekern_cuda

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("linear_fwd", &sparsekern_cuda::linear_fwd_cuda);
  m.impl("linear_dx", &sparsekern_cuda::linear_dx_cuda);
  m.impl("linear_dw", &sparsekern_cuda::linear_dw_cuda);
}
