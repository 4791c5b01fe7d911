// sparsekern depthwise conv2d ops on CPU (groups = C_in, weight [C_out, 1, kh, kw], C_out a multiple
// of C_in): direct loops over output planes, one plane (or weight row) per call of the dwconv2d
// kernels.  Conventions in common.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/common.h"

namespace sparsekern {
namespace {

void check_depthwise(const ConvGeom& g, int64_t w_in) {
  TORCH_CHECK(w_in == 1, "weight: expected shape [C_out, 1, kh, kw] for a depthwise conv, got ", w_in,
              " input channels per group");
  TORCH_CHECK(g.C > 0 && g.O % g.C == 0, "weight: depthwise conv needs C_out (", g.O,
              ") to be a multiple of the input channels (", g.C, ")");
}

Tensor dwconv2d_fwd(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias_, const Tensor& crow,
                    const Tensor& col, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_float(x_, "x", 4);
  check_float(weight_, "weight", 4);
  check_same_dtype(weight_, "weight", x_, "x");
  if (x_.scalar_type() == at::kBFloat16)  // widened at the boundary (no bf16 conv tiles yet)
    return dwconv2d_fwd(widen_bf16(x_), widen_bf16(weight_), widen_bf16(bias_), crow, col, stride, padding, dilation).to(at::kBFloat16);
  const ConvGeom g = make_geom(x_.sizes(), weight_.sizes(), stride, padding, dilation);
  check_depthwise(g, weight_.size(1));
  const Tensor bias = check_bias(bias_, weight_, g.O);
  check_compressed(crow, col, g.O, g.kh * g.kw, "crow_indices", "col_indices");
  Tensor x = x_.contiguous(), w = weight_.contiguous();
  Tensor y = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::dwconv2d_fwd", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const int64_t P = g.Ho * g.Wo, mult = g.O / g.C;
    const S* xp = x.data_ptr<S>();
    const S* wp = w.data_ptr<S>();
    const S* bp = bias.defined() ? bias.data_ptr<S>() : nullptr;
    S* yp = y.data_ptr<S>();
    at::parallel_for(0, g.N * g.O, 4, [&](int64_t b, int64_t e) {
      for (int64_t pl = b; pl < e; ++pl) {
        const int64_t n = pl / g.O, o = pl % g.O;
        k.dwconv2d.dw_fwd_plane(xp + (n * g.C + o / mult) * g.H * g.W, wp, crow.data_ptr<int32_t>(),
                                col.data_ptr<int32_t>(), o, g, bp ? bp[o] : S(0), yp + pl * P);
      }
    });
  });
  return y;
}

Tensor dwconv2d_dx(const Tensor& dy_, const Tensor& weight_, const Tensor& crow, const Tensor& col,
                   at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  check_float(dy_, "dy", 4);
  check_float(weight_, "weight", 4);
  check_same_dtype(weight_, "weight", dy_, "dy");
  if (dy_.scalar_type() == at::kBFloat16)  // widened at the boundary (no bf16 conv tiles yet)
    return dwconv2d_dx(widen_bf16(dy_), widen_bf16(weight_), crow, col, input_size, stride, padding, dilation).to(at::kBFloat16);
  check_size_arg(input_size, "input_size");
  const ConvGeom g = make_geom(input_size, weight_.sizes(), stride, padding, dilation);
  check_depthwise(g, weight_.size(1));
  check_dy_shape(dy_, g);
  check_compressed(crow, col, g.O, g.kh * g.kw, "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), w = weight_.contiguous();
  Tensor dx = at::zeros({g.N, g.C, g.H, g.W}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparsekern::dwconv2d_dx", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const int64_t P = g.Ho * g.Wo, mult = g.O / g.C;
    const S* dyp = dy.data_ptr<S>();
    const S* wp = w.data_ptr<S>();
    S* dxp = dx.data_ptr<S>();
    at::parallel_for(0, g.N * g.C, 4, [&](int64_t b, int64_t e) {
      for (int64_t pl = b; pl < e; ++pl) {
        const int64_t n = pl / g.C, c = pl % g.C;
        for (int64_t o = c * mult; o < (c + 1) * mult; ++o)
          k.dwconv2d.dw_dx_plane(dyp + (n * g.O + o) * P, wp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), o, g,
                                 dxp + pl * g.H * g.W);
      }
    });
  });
  return dx;
}

Tensor dwconv2d_dw(const Tensor& dy_, const Tensor& x_, const Tensor& crow, const Tensor& col,
                   at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  check_float(dy_, "dy", 4);
  check_float(x_, "x", 4);
  check_same_dtype(dy_, "dy", x_, "x");
  if (x_.scalar_type() == at::kBFloat16)  // widened at the boundary (no bf16 conv tiles yet)
    return dwconv2d_dw(widen_bf16(dy_), widen_bf16(x_), crow, col, weight_size, stride, padding, dilation).to(at::kBFloat16);
  check_size_arg(weight_size, "weight_size");
  const ConvGeom g = make_geom(x_.sizes(), weight_size, stride, padding, dilation);
  check_depthwise(g, weight_size[1]);
  check_dy_shape(dy_, g);
  check_compressed(crow, col, g.O, g.kh * g.kw, "crow_indices", "col_indices");
  Tensor dy = dy_.contiguous(), x = x_.contiguous();
  Tensor dw = at::zeros({g.O, 1, g.kh, g.kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern::dwconv2d_dw", [&] {
    using S = scalar_t;
    const Kernels<S>& k = kernels<S>();
    const S* xp = x.data_ptr<S>();
    const S* dyp = dy.data_ptr<S>();
    S* out = dw.data_ptr<S>();
    at::parallel_for(0, g.O, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o)
        k.dwconv2d.dw_dw_row(xp, dyp, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), o, g.O / g.C, g, out);
    });
  });
  return dw;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("dwconv2d_fwd", &sparsekern::dwconv2d_fwd);
  m.impl("dwconv2d_dx", &sparsekern::dwconv2d_dx);
  m.impl("dwconv2d_dw", &sparsekern::dwconv2d_dw);
}
