// The MoE layer's gated activation (moe_router/experts.py, _WeightedGatedSiLU): h = silu(g) u w
// for a fused [N, 2F] gate|up projection (g its first F columns, u the others) and a per-row
// combine weight w, one pass forward and one backward (also dL/dw = sum_f silu(g) u dL/dh),
// where the PyTorch composition makes 4 to 9 passes over [N, F] buffers and scales the [N, D]
// expert output by w instead of the narrower [N, F] hidden (F < D in fine-grained MoE).
// silu'(g) = s + silu(g) (1 - s), s = sigmoid(g). NaN in g propagates (through the factor g).
// Built with the other kernels by moe_router/ops/threshold_cpp.py.
//
// Shape legend: N rows (pairs of one expert), F expert hidden, G = 2F.
//
// Ops (schemas at the end of this file), float32 or float64, contiguous:
//   gated_silu_forward(gate_up, weight) -> h = silu(gate) * up * weight (the MoE layer's
//     experts); gated_silu_backward(gate_up, weight, grad_h) -> (grad_gate_up, grad_weight)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"

namespace moe_router_cpu {
namespace {

template <typename T>
inline T sigmoid_scalar(T g) {
  return T(1) / (T(1) + std::exp(-g));
}

template <typename T>
void gated_silu_forward_impl(const at::Tensor& gu, const at::Tensor& w, at::Tensor& h) {
  typedef Vec<T> V;
  constexpr int64_t W = kWidth<T>;
  const int64_t rows = gu.size(0), f = gu.size(1) / 2;
  const T* gu_ptr = gu.const_data_ptr<T>();
  const T* w_ptr = w.const_data_ptr<T>();
  T* h_ptr = h.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(f, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu_ptr + r * 2 * f;
      const T* u = g + f;
      T* out = h_ptr + r * f;
      const T wr = w_ptr[r];
      int64_t j = 0;
      for (; j + W <= f; j += W) {
        const V gv = load(g + j);
        store(out + j, gv * vsigmoid(gv) * load(u + j) * wr);
      }
      for (; j < f; ++j) out[j] = g[j] * sigmoid_scalar(g[j]) * u[j] * wr;
    }
  });
}

template <typename T>
void gated_silu_backward_impl(const at::Tensor& gu, const at::Tensor& w, const at::Tensor& gh,
                              at::Tensor& grad_gu, at::Tensor& grad_w) {
  typedef Vec<T> V;
  constexpr int64_t W = kWidth<T>;
  const int64_t rows = gu.size(0), f = gu.size(1) / 2;
  const T* gu_ptr = gu.const_data_ptr<T>();
  const T* w_ptr = w.const_data_ptr<T>();
  const T* gh_ptr = gh.const_data_ptr<T>();
  T* grad_gu_ptr = grad_gu.mutable_data_ptr<T>();
  T* grad_w_ptr = grad_w.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(f, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu_ptr + r * 2 * f;
      const T* u = g + f;
      const T* grad_h = gh_ptr + r * f;
      T* grad_g = grad_gu_ptr + r * 2 * f;
      T* grad_u = grad_g + f;
      const T wr = w_ptr[r];
      V acc = splat(T(0));
      int64_t j = 0;
      for (; j + W <= f; j += W) {
        const V gv = load(g + j), uv = load(u + j), dh = load(grad_h + j);
        const V sig = vsigmoid(gv);
        const V act = gv * sig;  // silu(g)
        acc += act * uv * dh;
        const V dhw = dh * wr;
        store(grad_u + j, dhw * act);
        store(grad_g + j, dhw * uv * (sig + act * (T(1) - sig)));
      }
      T total = hsum(acc);
      for (; j < f; ++j) {
        const T sig = sigmoid_scalar(g[j]);
        const T act = g[j] * sig;
        total += act * u[j] * grad_h[j];
        const T dhw = grad_h[j] * wr;
        grad_u[j] = dhw * act;
        grad_g[j] = dhw * u[j] * (sig + act * (T(1) - sig));
      }
      grad_w_ptr[r] = total;
    }
  });
}

void check_gated_silu(const at::Tensor& gu, const at::Tensor& w) {
  check_rows(gu);
  TORCH_CHECK(gu.size(1) % 2 == 0, "moe_router_cpu: gate|up needs an even width, got ",
              gu.size(1));
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == gu.scalar_type() && w.dim() == 1 &&
                  w.size(0) == gu.size(0) && w.is_contiguous(),
              "moe_router_cpu: the weights must be a contiguous [N] CPU tensor of gate|up's dtype");
}

at::Tensor gated_silu_forward(const at::Tensor& gu, const at::Tensor& w) {
  check_gated_silu(gu, w);
  at::Tensor h = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  dispatch_dtype(gu.scalar_type(), [&](auto scalar) {
    gated_silu_forward_impl<decltype(scalar)>(gu, w, h);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> gated_silu_backward(const at::Tensor& gu, const at::Tensor& w,
                                                       const at::Tensor& gh) {
  check_gated_silu(gu, w);
  check_rows(gh);
  TORCH_CHECK(gh.scalar_type() == gu.scalar_type() && gh.size(0) == gu.size(0) &&
                  gh.size(1) * 2 == gu.size(1),
              "moe_router_cpu: grad_h must be [N, F] of gate|up's dtype");
  at::Tensor grad_gu = at::empty_like(gu);
  at::Tensor grad_w = at::empty_like(w);
  dispatch_dtype(gu.scalar_type(), [&](auto scalar) {
    gated_silu_backward_impl<decltype(scalar)>(gu, w, gh, grad_gu, grad_w);
  });
  return {grad_gu, grad_w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_router_cpu, m) {
  m.def("gated_silu_forward(Tensor gate_up, Tensor weight) -> Tensor");
  m.def("gated_silu_backward(Tensor gate_up, Tensor weight, Tensor grad_h) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_router_cpu, CPU, m) {
  m.impl("gated_silu_forward", &gated_silu_forward);
  m.impl("gated_silu_backward", &gated_silu_backward);
}

}  // namespace moe_router_cpu
