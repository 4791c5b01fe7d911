// Sparse-aware optimizer steps (sparsekern.optim): SGD and Adam / AdamW updates of the entries of
// a dense weight listed in `idx` (the flat row-major positions of the gradient mask G, strictly
// increasing), with the optimizer state kept compactly as one value per listed entry.
//
// The arithmetic is that of torch.optim's single-tensor implementations, operation by operation
// and with the same roundings as torch's CPU kernels (whose vector and scalar paths both fuse the
// multiply-adds of `add(alpha=)`, `lerp` and `addcmul`), so an entry gets bit-identical values.
// Entries are independent and each is written by one task: results do not depend on the thread
// count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace sparsekern {
namespace optim {

using at::Tensor;

template <typename S>
struct SgdScalars {
  S neg_lr, momentum, keep, weight_decay;  // keep = 1 - dampening
  bool use_momentum, nesterov, maximize, first, decay, compact;
};

template <typename S>
struct AdamScalars {
  S decay, weight_decay;           // decoupled: param *= decay; else grad += weight_decay * param
  S lerp_w;                        // exp_avg.lerp_(grad, 1 - beta1) as torch's vector path:
  bool lerp_small;                 // lerp_w = weight if |weight| < 0.5, else weight - 1
  S beta2, one_minus_beta2;        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  S bc2_sqrt, eps, neg_step_size;  // param.addcdiv_(exp_avg, sqrt(v) / bc2_sqrt + eps, value=-step_size)
  bool decoupled, l2, maximize, amsgrad, compact;
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEKERN_OPTIM_FMA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_fma {
#include "optim_impl.h"
}
#pragma GCC pop_options
#endif

namespace isa_generic {
#include "optim_impl.h"
}

namespace {

bool use_fma() {
#ifdef SPARSEKERN_OPTIM_FMA
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Entries per task: a few streams of reads and writes per entry, so tasks are large.
constexpr int64_t kGrain = 16384;
// Adam entries per call of torch's sqrt (a dispatcher call each; the block stays in L2).
constexpr int64_t kSqrtBlock = 8192;

void check_dense(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected dtype float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_like(const Tensor& t, const char* name, const Tensor& weight, int64_t numel) {
  check_dense(t, name);
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), name, ": expected dtype ", weight.scalar_type(),
              " (the weight's), got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " entries, got ", t.numel());
}

// weight, grad and idx; returns nnz.  `compact`: grad holds one value per entry of idx (a 1-D
// [nnz] tensor) rather than the weight's shape.
int64_t check_common(const Tensor& weight, const Tensor& grad, const Tensor& idx, bool& compact) {
  check_dense(weight, "weight");
  compact = grad.dim() == 1 && grad.numel() == idx.numel() && grad.sizes() != weight.sizes();
  check_like(grad, "grad", weight, compact ? idx.numel() : weight.numel());
  TORCH_CHECK(idx.device().is_cpu(), "idx: expected a CPU tensor, got one on ", idx.device());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "idx: expected dtype int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous(), "idx: expected a contiguous 1-D tensor, got shape ",
              idx.sizes());
  return idx.numel();
}

// idx[begin:end] strictly increasing (no entry twice, so no two tasks write one entry) and in
// [0, numel).  Checked per task, in cache, before the task writes anything.
template <typename I>
void check_indices(const I* idx, int64_t begin, int64_t end, int64_t numel) {
  int64_t prev = begin > 0 ? int64_t(idx[begin - 1]) : -1;
  bool ok = true;
  for (int64_t k = begin; k < end; ++k) {
    ok &= int64_t(idx[k]) > prev;
    prev = idx[k];
  }
  TORCH_CHECK(ok && (end == begin || prev < numel), "idx: must be strictly increasing flat positions in [0, ",
              numel, ")");
}

template <typename I, typename F>
void for_each_range(const Tensor& idx, int64_t numel, const F& body) {
  const I* ix = idx.data_ptr<I>();
  at::parallel_for(0, idx.numel(), kGrain, [&](int64_t begin, int64_t end) {
    check_indices(ix, begin, end, numel);
    body(ix, begin, end);
  });
}

template <typename F>
void dispatch_index(const Tensor& idx, int64_t numel, const F& body) {
  if (idx.scalar_type() == at::kInt)
    for_each_range<int32_t>(idx, numel, body);
  else
    for_each_range<int64_t>(idx, numel, body);
}

void sgd_step_masked_(const Tensor& weight, const Tensor& grad, const Tensor& idx,
                      const std::optional<Tensor>& momentum_buffer, double lr, double momentum, double dampening,
                      double weight_decay, bool nesterov, bool maximize, bool first) {
  bool compact = false;
  const int64_t nnz = check_common(weight, grad, idx, compact);
  const bool use_momentum = momentum != 0;
  TORCH_CHECK(!use_momentum || momentum_buffer.has_value(), "momentum_buffer: required when momentum != 0");
  if (use_momentum) check_like(*momentum_buffer, "momentum_buffer", weight, nnz);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_step_masked_", [&] {
    using S = scalar_t;
    const SgdScalars<S> a{S(-lr), S(momentum), S(1 - dampening), S(weight_decay), use_momentum,
                          nesterov, maximize, first, weight_decay != 0, compact};
    S* w = weight.data_ptr<S>();
    const S* g = grad.data_ptr<S>();
    S* buf = use_momentum ? momentum_buffer->data_ptr<S>() : nullptr;
    dispatch_index(idx, weight.numel(), [&](const auto* ix, int64_t begin, int64_t end) {
#ifdef SPARSEKERN_OPTIM_FMA
      if (use_fma()) return isa_fma::sgd_range(w, g, ix, buf, begin, end, a);
#endif
      isa_generic::sgd_range(w, g, ix, buf, begin, end, a);
    });
  });
}

void adam_step_masked_(const Tensor& weight, const Tensor& grad, const Tensor& idx, const Tensor& exp_avg,
                       const Tensor& exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq, double lr,
                       double beta1, double beta2, double eps, double weight_decay, double step,
                       bool decoupled_weight_decay, bool maximize) {
  bool compact = false;
  const int64_t nnz = check_common(weight, grad, idx, compact);
  check_like(exp_avg, "exp_avg", weight, nnz);
  check_like(exp_avg_sq, "exp_avg_sq", weight, nnz);
  const bool amsgrad = max_exp_avg_sq.has_value();
  if (amsgrad) check_like(*max_exp_avg_sq, "max_exp_avg_sq", weight, nnz);
  TORCH_CHECK(step >= 1, "step: expected the step count after this step (>= 1), got ", step);
  // The host scalars of torch.optim.adam, in double as Python computes them.  `volatile` keeps the
  // compiler from fusing 1 - lr * weight_decay into one rounding (Python rounds the product).
  const double bc1 = 1 - std::pow(beta1, step);
  const double bc2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::pow(bc2, 0.5);
  volatile double lr_wd = lr * weight_decay;
  const double decay = 1 - lr_wd;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "adam_step_masked_", [&] {
    using S = scalar_t;
    const S lw = S(1 - beta1);
    const bool small = std::abs(lw) < S(0.5);
    const AdamScalars<S> a{S(decay), S(weight_decay), small ? lw : lw - S(1), small, S(beta2), S(1 - beta2),
                           S(bc2_sqrt), S(eps), S(-step_size), decoupled_weight_decay && weight_decay != 0,
                           !decoupled_weight_decay && weight_decay != 0, maximize, amsgrad, compact};
    S* w = weight.data_ptr<S>();
    const S* g = grad.data_ptr<S>();
    S* m = exp_avg.data_ptr<S>();
    S* v = exp_avg_sq.data_ptr<S>();
    S* vmax = amsgrad ? max_exp_avg_sq->data_ptr<S>() : nullptr;
    S* second = amsgrad ? vmax : v;
    const auto opts = weight.options();
    dispatch_index(idx, weight.numel(), [&](const auto* ix, int64_t begin, int64_t end) {
      std::vector<S> root(std::min(end - begin, kSqrtBlock));
      for (int64_t b = begin; b < end; b += kSqrtBlock) {
        const int64_t e = std::min(end, b + kSqrtBlock);
#ifdef SPARSEKERN_OPTIM_FMA
        if (use_fma())
          isa_fma::adam_moments_range(w, g, ix, m, v, vmax, b, e, a);
        else
#endif
          isa_generic::adam_moments_range(w, g, ix, m, v, vmax, b, e, a);
        // torch's sqrt, not std::sqrt: in the x86 wheels it is MKL's, which is not correctly
        // rounded (about 1 % of entries one ulp off), and the stock step uses it.
        at::Tensor out = at::from_blob(root.data(), {e - b}, opts);
        at::sqrt_out(out, at::from_blob(second + b, {e - b}, opts));
        isa_generic::adam_weights_range(w, ix, m, root.data(), b, e, a);  // no multiply-add in it
      }
    });
  });
}

}  // namespace
}  // namespace optim
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def(
      "sgd_step_masked_(Tensor(a!) weight, Tensor grad, Tensor idx, Tensor(b!)? momentum_buffer, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first) -> ()");
  m.def(
      "adam_step_masked_(Tensor(a!) weight, Tensor grad, Tensor idx, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, float lr, float beta1, float beta2, float eps, float weight_decay, float step, "
      "bool decoupled_weight_decay, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("sgd_step_masked_", &sparsekern::optim::sgd_step_masked_);
  m.impl("adam_step_masked_", &sparsekern::optim::adam_step_masked_);
}
