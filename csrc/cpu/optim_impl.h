// Per-entry optimizer updates on an index set (optim.cpp), torch-free.  Included once per
// instruction set inside a namespace, like kernels_impl.h: with FMA hardware std::fma is one
// instruction, without it a (correctly rounded) library call.
//
// Every multiply-add torch's CPU kernels fuse is written as std::fma here and nothing else is a
// multiply followed by an add, so -ffp-contract=fast cannot fuse more than torch does.
// w: the dense weight; idx[k] the flat position of compact entry k; g: the gradient, dense
// (g[idx[k]]) or, with a.compact, compact on idx (g[k]).  The scalar
// structs (SgdScalars, AdamScalars) are defined by the including file.

template <typename S, typename I>
void sgd_range(S* w, const S* g, const I* idx, S* buf, int64_t begin, int64_t end, const SgdScalars<S>& a) {
  for (int64_t k = begin; k < end; ++k) {
    const int64_t j = idx[k];
    S p = w[j];
    const S gk = a.compact ? g[k] : g[j];
    S d = a.maximize ? -gk : gk;
    if (a.decay) d = std::fma(p, a.weight_decay, d);  // grad.add(param, alpha=wd)
    if (a.use_momentum) {
      // first step: buf = grad.clone(); then buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      const S b = a.first ? d : std::fma(d, a.keep, buf[k] * a.momentum);
      buf[k] = b;
      d = a.nesterov ? std::fma(b, a.momentum, d) : b;
    }
    w[j] = std::fma(d, a.neg_lr, p);  // param.add_(grad, alpha=-lr)
  }
}

// torch.maximum: NaN if either side is NaN.
template <typename S>
inline S nan_max(S a, S b) {
  return (a > b || a != a) ? a : b;
}

// Adam in two passes around torch's own sqrt (see optim.cpp): the moments, then the weights.
template <typename S, typename I>
void adam_moments_range(const S* w, const S* g, const I* idx, S* m, S* v, S* vmax, int64_t begin, int64_t end,
                        const AdamScalars<S>& a) {
  for (int64_t k = begin; k < end; ++k) {
    const int64_t j = idx[k];
    const S gk = a.compact ? g[k] : g[j];
    S d = a.maximize ? -gk : gk;
    if (a.l2) d = std::fma(w[j], a.weight_decay, d);  // grad.add(param, alpha=wd)
    // lerp: weight < 0.5 -> m + w (d - m); else d + (w - 1) (d - m), one rounding each
    const S diff = d - m[k];
    m[k] = a.lerp_small ? std::fma(a.lerp_w, diff, m[k]) : std::fma(a.lerp_w, diff, d);
    const S vk = std::fma(a.one_minus_beta2 * d, d, v[k] * a.beta2);
    v[k] = vk;
    if (a.amsgrad) vmax[k] = nan_max(vmax[k], vk);
  }
}

// root[k - begin] = sqrt of the second moment (or its running max) of entry k.
template <typename S, typename I>
void adam_weights_range(S* w, const I* idx, const S* m, const S* root, int64_t begin, int64_t end,
                        const AdamScalars<S>& a) {
  for (int64_t k = begin; k < end; ++k) {
    const int64_t j = idx[k];
    const S p = a.decoupled ? w[j] * a.decay : w[j];  // param.mul_(1 - lr * wd)
    const S denom = root[k - begin] / a.bc2_sqrt + a.eps;
    w[j] = p + (a.neg_step_size * m[k]) / denom;
  }
}
