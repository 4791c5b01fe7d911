// The schemas of the sparsekern ops (torch.ops.sparsekern.*), and the two tiny ops that report on
// (or, for tests, select) how the CPU kernels run.  The tensor ops register their implementations
// beside their code: CPU in cpu/linear.cpp, cpu/conv2d.cpp (also conv2d_algo) and
// cpu/dwconv2d.cpp (conventions in cpu/common.h), CUDA in cuda/sparse_cuda.cu.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace sparsekern {
namespace {

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

// The bf16 path of the CPU kernels ("avx512_bf16" or "widen"); `request` selects one first.
std::string cpu_bf16(c10::string_view request) {
  const std::string req(request.data(), request.size());
  const char* got = select_bf16_path(req.c_str());
  if (!got) {
    std::string have;
    for (auto s : supported_bf16_paths()) have += std::string(have.empty() ? "" : ", ") + s;
    TORCH_CHECK(false, "request: unknown or unsupported bf16 path '", req, "'; this CPU supports: ", have);
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

// The torch version this library was compiled against (setup.py passes it as a bare token:
// -DSPARSEKERN_TORCH_VERSION=2.13.0+cpu); sparsekern.kernels.cpu refuses to use the library under
// any other torch, whose C++ ABI may differ.
#define SPARSEKERN_STR2(x) #x
#define SPARSEKERN_STR(x) SPARSEKERN_STR2(x)
#ifdef SPARSEKERN_TORCH_VERSION
constexpr const char* kBuiltWithTorch = SPARSEKERN_STR(SPARSEKERN_TORCH_VERSION);
#else
constexpr const char* kBuiltWithTorch = "unknown";
#endif

std::string built_with_torch() { return kBuiltWithTorch; }

// Bytes of per-thread scratch memory the CPU kernels hold now, per slot (all threads together).
std::vector<int64_t> scratch_held() {
  std::vector<int64_t> out(kSlots);
  for (int s = 0; s < kSlots; ++s) out[s] = scratch_held_bytes()[s].load();
  return out;
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
      "linear_dw_values(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int[2] block, "
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
      "conv2d_dw_values(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int[2] block, int[4] weight_size, "
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
  // Not tensor ops: report (or, for tests, select) the bf16 path, and the CPU's bf16 features.
  m.def("cpu_bf16(str request=\"\") -> str", &sparsekern::cpu_bf16);
  m.def("cpu_features() -> str", &sparsekern::cpu_features);
  // Not a tensor op: the conv2d algorithm ("direct" or "gemm") the ops pick for a shape.
  m.def(
      "conv2d_algo(str op, int[4] input_size, int[4] weight_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int[2] block, int nnz, bool bf16=False) -> str");
  // Not a tensor op: how the kernels are threaded ("openmp" or "serial").
  m.def("parallel_backend() -> str", &sparsekern::parallel_backend);
  // Not a tensor op: the torch version the library was built against.
  m.def("built_with_torch() -> str", &sparsekern::built_with_torch);
  // Not a tensor op: bytes of grow-only scratch memory the CPU kernels hold now, per slot (the
  // Slot order of cpu/common.h), all threads together.
  m.def("scratch_held() -> int[]", &sparsekern::scratch_held);
}
