// Instantiates every kernel template of sparse_kernels.cuh for each dtype and index type, so
// `nvcc -c csrc/cuda/compile_check.cu` checks the kernel bodies without torch (tests/backends/test_cuda.py).
#include "sparse_kernels.cuh"

namespace sparsekern_cuda {

#define SPARSEKERN_INSTANTIATE(T, I)                                                             \
  template __global__ void spmm_rows_kernel<T, I, 1>(const I*, const I*, const T*, int64_t,     \
                                                     int64_t, const T*, T*, int64_t, int64_t);  \
  template __global__ void spmm_rows_kernel<T, I, 4>(const I*, const I*, const T*, int64_t,     \
                                                     int64_t, const T*, T*, int64_t, int64_t);  \
  template __global__ void sddmm_kernel<T, I>(const I*, const I*, const T*, const T*, T*,       \
                                              int64_t, int64_t, int64_t);                       \
  template __global__ void bsr_spmm_rows_kernel<T, I>(const I*, const I*, const T*, int64_t,    \
                                                      int64_t, int, int, int64_t, int64_t,      \
                                                      const T*, T*, int64_t);

SPARSEKERN_INSTANTIATE(float, int32_t)
SPARSEKERN_INSTANTIATE(float, int64_t)
SPARSEKERN_INSTANTIATE(double, int32_t)
SPARSEKERN_INSTANTIATE(double, int64_t)
SPARSEKERN_INSTANTIATE(__half, int32_t)
SPARSEKERN_INSTANTIATE(__nv_bfloat16, int32_t)

#undef SPARSEKERN_INSTANTIATE

}  // namespace sparsekern_cuda
