// What the CPU kernels share (moe_router/ops/csrc/*.cpp, compiled by
// moe_router/ops/threshold_cpp.py into one extension): the SIMD vectors and their math, and
// the checks and the dtype switch of the op entry points.

#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace moe_router_cpu {

// ------------------------------------------------------------------------------------------
// SIMD: GCC/Clang vector extensions, 32 bytes (8 floats / 4 doubles), lowered to whatever the
// target has (-march=native). Rows live in scratch buffers padded to a multiple of the width
// with -inf scores and 0 masks, which every pass below maps to a zero contribution.

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t ivec __attribute__((vector_size(32)));
  static constexpr int64_t width = 8;
};
template <>
struct Lanes<double> {
  typedef double vec __attribute__((vector_size(32)));
  typedef int64_t ivec __attribute__((vector_size(32)));
  static constexpr int64_t width = 4;
};
template <typename T>
using Vec = typename Lanes<T>::vec;
template <typename T>
constexpr int64_t kWidth = Lanes<T>::width;

template <typename T>
inline Vec<T> load(const T* ptr) {
  Vec<T> v;
  std::memcpy(&v, ptr, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* ptr, Vec<T> v) {
  std::memcpy(ptr, &v, sizeof(v));
}
template <typename T>
inline Vec<T> splat(T x) {
  Vec<T> v;
  for (int64_t l = 0; l < kWidth<T>; ++l) v[l] = x;
  return v;
}
// (templates on the vector type V: Vec<T> is not deducible)
template <typename V>
using ElemOf = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
template <typename V>
inline ElemOf<V> hsum(V v) {
  ElemOf<V> total = 0;
  for (int64_t l = 0; l < kWidth<ElemOf<V>>; ++l) total += v[l];
  return total;
}
template <typename V>
inline V vmin(V a, V b) {
  return a < b ? a : b;
}
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
inline V vabs(V a) {
  return a < ElemOf<V>(0) ? -a : a;
}
// Sifts `entry` down top[0..depth), kept in descending order: top[c] stays the (c + 1)-th
// largest entry so far, per lane (depth min/max pairs, no branches).
template <typename V>
inline void sift_down(V* top, int64_t depth, V entry) {
  for (int64_t c = 0; c < depth; ++c) {
    const V larger = vmax(top[c], entry);
    entry = vmin(top[c], entry);
    top[c] = larger;
  }
}
inline int64_t round_up(int64_t n, int64_t width) { return (n + width - 1) / width * width; }

// e^x: float32 through Cody-Waite reduction by ln 2 and a degree-5 minimax polynomial (~1 ulp
// on [-87, 88]); arguments below -87 (-inf included) give 0. float64 through std::exp per
// lane. The callers never pass NaN.
inline Vec<float> vexp(Vec<float> x) {
  typedef Lanes<float>::ivec ivec;
  const Vec<float> lo = splat(-87.0f);
  const Vec<float> xc = vmin(vmax(x, lo), splat(88.0f));
  // round to nearest by adding and subtracting 1.5 * 2^23
  const Vec<float> n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> poly = splat(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const Vec<float> y = poly * r * r + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  const Vec<float> scaled = y * (Vec<float>)bits;  // same-size vector cast: the bits
  return x < lo ? splat(0.0f) : scaled;
}

inline Vec<double> vexp(Vec<double> x) {
  Vec<double> out;
  for (int64_t l = 0; l < kWidth<double>; ++l) out[l] = std::exp(x[l]);
  return out;
}

// log x for positive normal float32 x (~1 ulp): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m by the Cephes polynomial in f = m - 1, log 2 split in two parts. Callers pass only
// positive normal values (and check the results they use for finiteness).
inline Vec<float> vlog(Vec<float> x) {
  typedef Lanes<float>::ivec ivec;
  const ivec bits = (ivec)x;
  ivec e = ((bits >> 23) & 0xff) - 127;
  Vec<float> m = (Vec<float>)((bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  const auto big_m = m > 1.41421356f;
  m = big_m ? m * 0.5f : m;
  e = e - big_m;  // a true comparison is -1
  const Vec<float> f = m - 1.0f;
  const Vec<float> ef = __builtin_convertvector(e, Vec<float>);
  const Vec<float> z = f * f;
  Vec<float> y = splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + ef * -2.12194440e-4f - 0.5f * z;
  return f + y + ef * 0.693359375f;
}

inline Vec<float> vsqrt(Vec<float> x) {
  Vec<float> out;
  for (int64_t l = 0; l < kWidth<float>; ++l) out[l] = std::sqrt(x[l]);
  return out;
}

// log(1 + x) for x >= -1/2 without losing the bits of a small x: log(u) x / (u - 1), u = 1 + x.
inline Vec<float> vlog1p(Vec<float> x) {
  const Vec<float> u = x + 1.0f;
  const Vec<float> d = u - 1.0f;
  return d == 0.0f ? x : vlog(u) * (x / (d == 0.0f ? splat(1.0f) : d));
}

template <typename V>
inline V vsigmoid(V u) {
  typedef ElemOf<V> T;
  const V e = vexp(-vabs(u));
  const V r = T(1) / (e + T(1));
  return u >= T(0) ? r : e * r;
}

// ------------------------------------------------------------------------------------------
// the op entry points' checks and dtype switch

inline void check_rows(const at::Tensor& rows_RN) {
  TORCH_CHECK(rows_RN.device().is_cpu(), "moe_router_cpu: expected CPU tensors");
  TORCH_CHECK(rows_RN.dim() == 2 && rows_RN.is_contiguous(),
              "moe_router_cpu: expected a contiguous [R, N] tensor");
  TORCH_CHECK(rows_RN.scalar_type() == at::kFloat || rows_RN.scalar_type() == at::kDouble,
              "moe_router_cpu: expected float32 or float64, got ", rows_RN.scalar_type());
}

// Calls fn(T{}) for the runtime dtype (float32 or float64, checked by check_rows).
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(double{});
  }
}

}  // namespace moe_router_cpu
