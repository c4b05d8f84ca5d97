// Fused CPU kernels of the threshold soft top-k family (sigmoid, laplace, exp, sparse).
//
// The same math as moe_router/ops/threshold_torch.py (the readable reference path; read it
// first), one row at a time with the row in cache: a partial selection of the top candidates
// (a cut from column maxima, then insertion), their tail sums in each candidate's own frame,
// the segment and the closed forms in double (exp, laplace), safeguarded Newton for sigmoid
// (laplace bracket) and for sparse (on the piecewise-linear sum, with the sorted closed form as
// fallback), all in the frame of a pivot score next to the threshold (exact at any scale),
// then one final step there and p: a handful of SIMD passes over the row. Rows run in parallel
// (at::parallel_for). Built on first use by moe_router/ops/threshold_cpp.py.
//
// Shape legend: R rows, N entries per row, K candidates (top values) per row.
//
// Ops (schemas at the end of this file), scores/p/grad [R, N] contiguous, k/tau [R], float32
// or float64:
//   threshold_forward(scores, k, tau, method, sparse_newton_steps=12, narrow=True) -> (p, lam)
//   threshold_backward(p, grad, tau, method, need_tau_grad) -> (grad_scores, grad_k, grad_tau)
// method: 0 sigmoid, 1 laplace, 2 exp, 3 sparse. lam is in units of scores / tau.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "select_top.h"

namespace moe_router_cpu {
namespace {

enum Method : int64_t { kSigmoid = 0, kLaplace = 1, kExp = 2, kSparse = 3 };

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kLog2 = 0.69314718055994530942;
// Newton steps of the sigmoid solve after the laplace bracket (as SIGMOID_NEWTON_STEPS); the
// loop stops early once a step moves lam by less than kSigmoidStepTol (z units): the error
// after that step is ~ C * step^2, and the final step (one more Newton step in the threshold's
// frame) squares it again (1e-2 leaves < 1e-9 on the stress suite). (A test on |sum p - k|
// would not do: with k near N the slope is tiny and lam can be far off.)
constexpr int kSigmoidNewtonSteps = 6;
// The fast path of sigmoid (sigmoid_near_max): at most this many Newton steps from the
// log-sum-exp bound (router-like rows take 2-4), and a threshold at most kFrameReach units of
// tau below the row max (where fp32 coordinates keep ~1e-6); other rows take the exact path.
constexpr int kSigmoidFastSteps = 8;
constexpr double kFrameReach = 8.0;
// (float64 rows keep a tighter tolerance: their users expect float64 accuracy.)
template <typename T>
constexpr double kSigmoidStepTol = sizeof(T) == 4 ? 1e-2 : 1e-5;

// The method is a template argument throughout, so that each pass compiles to one loop.
template <typename T, int64_t M>
inline Vec<T> apply_f(Vec<T> u) {
  if constexpr (M == kSigmoid) {
    return vsigmoid(u);
  } else if constexpr (M == kLaplace) {
    const Vec<T> e = vexp(-vabs(u));
    return u >= T(0) ? T(1) - T(0.5) * e : T(0.5) * e;
  } else if constexpr (M == kExp) {
    return vexp(vmin(u, splat<T>(0)));
  } else {
    return vmin(vmax(u, splat<T>(0)), splat<T>(1));
  }
}

inline float exp_scalar(float x) { return std::exp(x); }
inline double exp_scalar(double x) { return std::exp(x); }

// ------------------------------------------------------------------------------------------
// the candidates' sums and the row's frame

// mark[i] = 1 for the first `count` selected entries, 0 elsewhere (pads included).
template <typename T>
void mark_top(int64_t count, Scratch<T>& s) {
  std::fill(s.mark.begin(), s.mark.end(), T(0));
  for (int64_t j = 0; j < count; ++j) {
    if (s.top_idx[j] >= 0) s.mark[s.top_idx[j]] = T(1);
  }
}

// (b - a) / tau in double: a difference of two scores in units of tau. For float rows it is
// exact before the division; it may overflow to -inf (float64 rows), where e^ gives 0.
template <typename T>
inline double scaled_gap(T b, T a, double tau) {
  return (static_cast<double>(b) - static_cast<double>(a)) / tau;
}
// e^{(b - a) / tau}, the exponential in the row's dtype (fast for float)
template <typename T>
inline double exp_gap(T b, T a, double tau) {
  return exp_scalar(static_cast<T>(scaled_gap(b, a, tau)));
}

// tail_rel[j] = sum_{rank >= j} e^{(s_rank - s_j) / tau} for j < K (each in [1, N]): the sum
// over candidate j and the entries below it, in the frame of s_j, without under- or overflow.
// The entries outside the top K enter through one masked pass in the frame of s_{K-1}.
template <typename T>
void relative_tails(const T* x, int64_t n, int64_t num, T tau, Scratch<T>& s) {
  const T* val = s.top_val.data();
  std::vector<double>& tail = s.tail;
  tail.assign(num, 1.0);
  T rest = 0;
  const T ref = val[num - 1];
  if (ref > -std::numeric_limits<T>::infinity() && num < n) {
    mark_top(num, s);
    const T* mark = s.mark.data();
    const Vec<T> ref_v = splat(ref);
    const Vec<T> tau_v = splat(tau);
    Vec<T> acc = splat<T>(0);
    for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
      const Vec<T> y = (load(x + i) - ref_v) / tau_v;  // <= 0 off the top K; -inf pads
      acc += (T(1) - load(mark + i)) * vexp(vmin(y, splat<T>(0)));
    }
    rest = hsum(acc);
  }
  tail[num - 1] = 1.0 + rest;
  for (int64_t j = num - 2; j >= 0; --j) {
    tail[j] = val[j + 1] > -std::numeric_limits<T>::infinity()
                  ? 1.0 + tail[j + 1] * exp_gap(val[j + 1], val[j], tau)
                  : 1.0;
  }
}

// The row in the frame of a pivot: y = (x - pivot) / tau, clamped to [lo, hi].
template <typename T>
void to_frame(const T* x, T pivot, T tau, T lo, T hi, Scratch<T>& s) {
  const Vec<T> pivot_v = splat(pivot);
  const Vec<T> tau_v = splat(tau);
  const Vec<T> lo_v = splat(lo);
  const Vec<T> hi_v = splat(hi);
  T* y = s.y.data();
  for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
    store(y + i, vmin(vmax((load(x + i) - pivot_v) / tau_v, lo_v), hi_v));
  }
}

// ------------------------------------------------------------------------------------------
// the solvers. Each finds the threshold as theta = pivot + tau * offset, with the pivot one of
// the row's own scores next to the threshold, and the segment (the entries above it, for
// sparse those capped and the support's end). Every quantity comes from differences of scores
// in units of tau, exact near the pivot: the solve is exact in the row's own frame at any
// scale of x or tau (as solve_threshold in threshold_torch.py).

struct Segment {
  double pivot = 0.0;   // a score of the row (exact in double for float and double rows)
  double offset = 0.0;  // (theta - pivot) / tau
  int64_t above = 0;    // entries on the "above" branch (exp, laplace) or capped (sparse)
  int64_t end = 0;      // sparse: the support is ranks [0, end)
  bool framed = false;  // s.y holds the row in the pivot's frame (sigmoid, sparse)
};

// f = min(1, e^u): the m entries above the threshold are the candidates j with
// F(s_j) = j + tail_rel[j] < k (m < k: the top ceil(k) suffice); then the closed form in the
// frame of s_m, the largest entry below: offset = log tail_rel[m] - log(k - m).
template <typename T>
Segment solve_exp(const T* x, int64_t n, double k, T tau, Scratch<T>& s) {
  const int64_t num = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(k)));
  select_top(x, n, num, s);
  relative_tails(x, n, num, tau, s);
  int64_t above = 0;
  while (above < num - 1 && s.top_val[above] > -std::numeric_limits<T>::infinity() &&
         above + s.tail[above] < k) {
    ++above;
  }
  Segment seg;
  seg.above = above;
  seg.pivot = s.top_val[above];
  seg.offset = std::log(s.tail[above] / (k - above));
  return seg;
}

// log(c + sqrt(c^2 + e^L)) for c >= 0 without overflow or cancellation for any L
// (as _log_c_plus_root): L = -inf gives log(2c), c = 0 gives L / 2.
inline double log_c_plus_root(double c, double log_prod) {
  const double half = 0.5 * log_prod;
  if (c == 0) return half;
  const double log_c = std::log(c);
  const double gap = log_prod - 2 * log_c;
  if (gap >= 0) return half + std::asinh(std::exp(log_c - half));
  return log_c + std::log1p(std::sqrt(1 + std::exp(gap)));
}

// f = 1 - e^-u/2 above, e^u/2 below: the segment from F at the breakpoints,
// F(s_j) = j - A_j / 2 + T_j / 2 with A_j = sum_{i<j} e^{(s_j - s_i) / tau} and T_j =
// tail_rel[j], counted where F(s_j) < k; then the closed form in the frame of the
// pivot on the side whose sum is >= 1 (as _solve_laplace): s_m when k >= m, else s_{m-1}.
template <typename T>
Segment solve_laplace(const T* x, int64_t n, double k, T tau, Scratch<T>& s) {
  // F(s_j) increases with j, so the count is the first j with F(s_j) >= k. It is < ceil(2k)
  // always and <= ceil(k) nearly always: try the short list first.
  const int64_t full = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(2 * k)));
  // One more than ceil(k) where that is free (the selection works in SIMD-width blocks): with
  // k >= m the entry just below the threshold is the pivot, and small k has m = ceil(k) often.
  const int64_t ceil_k = static_cast<int64_t>(std::ceil(k));
  int64_t num = std::min<int64_t>(full, ceil_k + (ceil_k % kWidth<T> != 0 ? 1 : 0));
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const T* val = s.top_val.data();
  const std::vector<double>& tail = s.tail;
  int64_t above = 0;
  while (true) {
    select_top(x, n, num, s);
    relative_tails(x, n, num, tau, s);
    above = 0;
    double a_rel = 0.0;  // A_j
    for (int64_t j = 0; j < num && val[j] > neg_inf; ++j) {
      if (j > 0) a_rel = (a_rel + 1.0) * exp_gap(val[j], val[j - 1], tau);
      if (!(j - 0.5 * a_rel + 0.5 * tail[j] < k)) break;
      ++above;
    }
    if (above < num || num == full) break;
    num = full;
  }
  // above <= ceil(2k) - 1 (F(s_{K-1}) >= K / 2 >= k), so s_above exists unless K = N, and
  // then k - above < 0.
  const double c = k - above;
  Segment seg;
  seg.above = above;
  // S_A = sum_{i < above} e^{-(s_i - P) / tau} and S_B = sum_{i >= above} e^{(s_i - P) / tau}
  // in log space (in the frame of s_above, S_A can underflow where its log does not)
  double a_top = 1.0;  // sum_{i < above} e^{(s_{above-1} - s_i) / tau} >= 1
  for (int64_t i = 0; i + 1 < above; ++i) {
    a_top += exp_gap(val[above - 1], val[i], tau);
  }
  const bool has_below = above < num && val[above] > neg_inf;  // (not when all are above)
  // (s_above - s_{above-1}) / tau <= 0: the gap between the last entry above and the first below
  const double gap = above > 0 && has_below ? scaled_gap(val[above], val[above - 1], tau) : 0.0;
  double log_a = 0.0;
  double log_b = 0.0;
  if (c >= 0 && has_below) {  // (else: only by rounding)
    seg.pivot = val[above];
    log_a = above > 0 ? gap + std::log(a_top) : -kInf;
    log_b = std::log(tail[above]);
  } else {
    seg.pivot = val[above - 1];
    log_a = std::log(a_top);
    log_b = has_below ? gap + std::log(tail[above]) : -kInf;
  }
  // e^-d = (c + sqrt(c^2 + a b)) / b for c >= 0; e^d = (|c| + sqrt(c^2 + a b)) / a for c < 0
  const double root = log_c_plus_root(std::abs(c), log_a + log_b);
  seg.offset = c >= 0 ? log_b - root : root - log_a;
  return seg;
}

// The capped-simplex threshold of a sorted list v[0..count) (prefix sums in `prefix`):
// min over capped counts a < min(k, count) of max over support ends e of
// (sum_{a <= i < e} v_i - (k - a)) / (e - a). For each a the max is found by a scan that stops
// where the value falls: lam_e rises while v_e > lam_{e-1} and falls from then on.
inline Segment capped_simplex(const std::vector<double>& prefix, int64_t count, double k) {
  Segment seg;
  seg.offset = kInf;
  for (int64_t a = 0; a < count && k - a > 0; ++a) {
    double best = -kInf;
    int64_t best_end = a + 1;
    for (int64_t e = a + 1; e <= count; ++e) {
      const double lam = (prefix[e] - prefix[a] - (k - a)) / static_cast<double>(e - a);
      if (!(lam > best)) break;
      best = lam;
      best_end = e;
    }
    if (best < seg.offset) {
      seg.offset = best;
      seg.above = a;
      seg.end = best_end;
    }
  }
  return seg;
}

// f = clip(u, 0, 1): projection onto the capped simplex, in the frame of the pivot
// t = s_{K-1} (K = ceil k): y = (x - t) / tau, where the threshold lies in [-1, 0] (F >= K at
// -1, <= K - 1 at 0). Entries with y >= 2 are capped and those with y <= -2 get 0 for every
// threshold in that bracket, so y is clamped to [-2, 2]: overflowing differences stay finite
// and the sums below cannot overflow. F is piecewise linear: on the cell of lam,
// F = c + sum_L (y - lam) with c entries capped (y >= lam + 1) and L linear
// (lam < y < lam + 1). Safeguarded Newton in the bracket jumps to the root of the current
// cell's line; when the next point lies in the same cell, that is the root. A few vector
// passes; rows that have not settled after kSparseNewtonSteps take the exact sorted path.

template <typename T>
Segment exact_sparse(const T* y, int64_t n, double k, Scratch<T>& s) {
  // the entries above -1: lam* >= -1, so the others get p = 0 and cannot move a segment root
  // below lam*
  auto* pairs = s.pairs.data();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] > T(-1)) pairs[count++] = {y[i], i};
  }
  std::sort(pairs, pairs + count, [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  s.prefix.resize(count + 1);
  s.prefix[0] = 0.0;
  for (int64_t j = 0; j < count; ++j) s.prefix[j + 1] = s.prefix[j] + pairs[j].first;
  return capped_simplex(s.prefix, count, k);
}

template <typename T>
Segment solve_sparse(const T* x, int64_t n, double k, T tau, Scratch<T>& s) {
  typedef typename Lanes<T>::ivec IVec;
  const int64_t num = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(k)));
  select_top(x, n, num, s);
  const T pivot = s.top_val[num - 1];
  to_frame(x, pivot, tau, T(-2), T(2), s);
  const T* y = s.y.data();
  double lo = -1.0;
  double hi = 0.0;
  double lam = lo;
  int64_t prev_capped = -1;
  int64_t prev_linear = -1;
  Segment seg;
  seg.framed = true;
  seg.pivot = pivot;
  for (int64_t step = 0; step < s.sparse_newton_steps; ++step) {
    const T lam_t = static_cast<T>(lam);
    IVec capped_v = {};  // counts down: a true comparison is -1
    IVec linear_v = {};
    Vec<T> linear_sum_v = splat<T>(0);
    for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
      const Vec<T> yi = load(y + i);
      const auto capped = yi >= lam_t + T(1);
      const auto linear = (yi > lam_t) & ~capped;
      capped_v += capped;
      linear_v += linear;
      linear_sum_v += linear ? yi : splat<T>(0);
    }
    int64_t num_capped = 0;
    int64_t num_linear = 0;
    for (int64_t l = 0; l < kWidth<T>; ++l) {
      num_capped -= capped_v[l];
      num_linear -= linear_v[l];
    }
    if (num_capped == prev_capped && num_linear == prev_linear) {
      // lam is the root of this cell's line: the answer
      seg.offset = lam;
      seg.above = num_capped;
      seg.end = num_capped + num_linear;
      return seg;
    }
    const double linear_sum = hsum(linear_sum_v);
    const double total = num_capped + linear_sum - num_linear * lam;
    if (total == k) {
      // an exact hit: lam is a root, the only one on a sloped cell; on a flat one (no linear
      // entry, an integer k: every lam of the cell is a root) the bracket's end where the
      // solve starts, t - 1, which is also the exact path's answer
      seg.offset = lam;
      seg.above = num_capped;
      seg.end = num_capped + num_linear;
      return seg;
    }
    if (total > k) {
      lo = lam;
    } else {
      hi = lam;
    }
    const double root = num_linear > 0 ? (linear_sum + num_capped - k) / num_linear : kInf;
    prev_capped = num_capped;
    prev_linear = num_linear;
    // strictly inside: a root on an end of the bracket is a point already taken, and stepping
    // back to it would cycle between two cells
    const bool inside = root > lo && root < hi;
    lam = inside ? root : 0.5 * (lo + hi);
    if (!inside) {
      prev_capped = -1;  // a bisection step proves nothing about the cell
      prev_linear = -1;
    }
  }
  const Segment exact = exact_sparse(y, n, k, s);
  seg.offset = exact.offset;
  seg.above = exact.above;
  seg.end = exact.end;
  return seg;
}

// sum_i sigma(y_i - lam) and sum_i sigma' over a padded row. The sum is taken as
// #(u >= 0) - sum_{u >= 0} sigma(-u) + sum_{u < 0} sigma(u): every float term is <= 1/2 and
// mostly tiny, so k in the hundreds keeps its last bits (sum_i p_i in float would not).
template <typename T>
std::pair<double, double> sigmoid_sums(const T* y, int64_t padded, double lam) {
  typedef typename Lanes<T>::ivec IVec;
  const T lam_t = static_cast<T>(lam);
  IVec positive_v = {};  // counts down: a true comparison is -1
  Vec<T> signed_tail = splat<T>(0);
  Vec<T> slope = splat<T>(0);
  for (int64_t i = 0; i < padded; i += kWidth<T>) {
    const Vec<T> u = load(y + i) - lam_t;
    const Vec<T> e = vexp(-vabs(u));
    const Vec<T> q = e / (e + T(1));  // sigma(-|u|) <= 1/2
    const auto positive = u >= T(0);
    positive_v += positive;
    signed_tail += positive ? -q : q;
    slope += q * (T(1) - q);
  }
  int64_t num_positive = 0;
  for (int64_t l = 0; l < kWidth<T>; ++l) num_positive -= positive_v[l];
  return {static_cast<double>(num_positive) + hsum(signed_tail), hsum(slope)};
}

// Fast path: Newton in w = e^-lam in the frame of the row max, from the upper bound
// lam_0 = log sum_i e^{y_i} - log k (sigma(u) <= e^u), where sum_i sigma(y_i - lam) is concave
// and increasing in w: every step stays above the root, no bracket needed, and router-like rows
// converge in 2-4 steps (no selection, no closed form). It stands when it converges within
// kSigmoidFastSteps to a threshold within kFrameReach of the max: there the coordinates of the
// entries that carry the mass are exact to ~1e-6. Returns false otherwise.
template <typename T>
bool sigmoid_near_max(const T* x, T x_max, double k, T tau, Scratch<T>& s, Segment& seg) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  to_frame(x, x_max, tau, -inf, inf, s);
  const T* y = s.y.data();
  Vec<T> acc = splat<T>(0);
  for (int64_t i = 0; i < s.padded; i += kWidth<T>) acc += vexp(load(y + i));  // y <= 0
  double lam = std::log(static_cast<double>(hsum(acc)) / k);
  for (int step = 0; step < kSigmoidFastSteps; ++step) {
    const auto [total, slope] = sigmoid_sums(y, s.padded, lam);
    if (total == k) break;
    const double move = -std::log1p(std::max((k - total) / slope, -0.5));
    if (!std::isfinite(move)) return false;
    lam += move;
    if (std::abs(move) <= kSigmoidStepTol<T>) break;
    if (step == kSigmoidFastSteps - 1) return false;
  }
  if (!(std::abs(lam) <= kFrameReach)) return false;
  seg.pivot = x_max;
  seg.offset = lam;
  seg.framed = true;
  return true;
}

// Safeguarded Newton in w = e^-lam inside the bracket lam_laplace -+ log 2 (as _solve_sigmoid),
// in the frame of laplace's pivot: exact at any scale, for the rows the fast path leaves.
template <typename T>
Segment solve_sigmoid(const T* x, int64_t n, double k, T tau, T x_max, Scratch<T>& s) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  Segment seg;
  if (sigmoid_near_max(x, x_max, k, tau, s, seg)) return seg;
  seg = solve_laplace(x, n, k, tau, s);
  to_frame(x, static_cast<T>(seg.pivot), tau, -inf, inf, s);
  seg.framed = true;
  const T* y = s.y.data();
  // (an infinite laplace offset: see forward_row)
  constexpr double big = std::numeric_limits<T>::max();
  const double laplace_offset = std::min(std::max(seg.offset, -big), big);
  double lo = laplace_offset - kLog2;
  double hi = laplace_offset + kLog2;
  double lam = hi;
  for (int step = 0; step < kSigmoidNewtonSteps; ++step) {
    const auto [total, slope] = sigmoid_sums(y, s.padded, lam);
    if (total == k) break;  // exact hit (or a flat row): stay
    if (total > k) {
      lo = lam;
    } else {
      hi = lam;
    }
    const double newton = lam - std::log1p(std::max((k - total) / slope, -0.5));
    const double next =
        (std::isfinite(newton) && newton >= lo && newton <= hi) ? newton : 0.5 * (lo + hi);
    const bool converged = std::abs(next - lam) <= kSigmoidStepTol<T>;
    lam = next;
    if (converged) break;
  }
  seg.offset = lam;
  return seg;
}

// ------------------------------------------------------------------------------------------
// the final step of sigmoid: with u = y - d in the frame of the pivot, one more Newton step e
// (it repairs the rounding of the last iterate), then p = f(u - e). The closed forms of the
// other methods are exact in that frame already.

template <typename T>
double sigmoid_final_step(const T* u, double k, const Scratch<T>& s) {
  constexpr double tiny = std::numeric_limits<T>::min();
  const auto [total, slope] = sigmoid_sums(u, s.padded, 0.0);
  if (!(slope > 0)) return 0.0;
  const double offset = (total - k) / std::max(slope, tiny);
  return std::min(std::max(offset, -1e-2), 1e-2);
}

// One row of the forward pass.
template <typename T, int64_t M>
void forward_row(const T* x_row, T* p, T* lam_out, T k_t, T tau, Scratch<T>& s, int64_t n) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  typedef typename Lanes<T>::ivec IVec;
  T* x = s.x.data();
  std::memcpy(x, x_row, n * sizeof(T));
  IVec bad_v = {};
  IVec finite_v = {};  // counts down: a true comparison is -1
  Vec<T> max_v = splat(-inf);
  for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
    const Vec<T> xi = load(x + i);
    bad_v |= (xi != xi) | (xi == inf);
    finite_v += xi > -inf;
    max_v = vmax(max_v, xi);
  }
  int64_t bad = 0;
  int64_t num_finite = 0;
  T x_max = -inf;
  for (int64_t l = 0; l < kWidth<T>; ++l) {
    bad |= bad_v[l];
    num_finite -= finite_v[l];
    x_max = std::max(x_max, max_v[l]);
  }
  const double k = static_cast<double>(k_t);
  // the same order of precedence as solve_threshold: NaN / +inf rows, k <= 0, saturated rows
  if (bad || std::isnan(k)) {
    std::fill(p, p + n, std::numeric_limits<T>::quiet_NaN());
    *lam_out = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  if (k <= 0) {
    std::fill(p, p + n, T(0));
    *lam_out = inf;
    return;
  }
  if (static_cast<double>(num_finite) <= k) {
    for (int64_t i = 0; i < n; ++i) p[i] = x[i] > -inf ? T(1) : T(0);
    *lam_out = -inf;
    return;
  }
  Segment seg;
  if constexpr (M == kSigmoid) {
    seg = solve_sigmoid(x, n, k, tau, x_max, s);
  } else if constexpr (M == kLaplace) {
    seg = solve_laplace(x, n, k, tau, s);
  } else if constexpr (M == kExp) {
    seg = solve_exp(x, n, k, tau, s);
  } else {
    seg = solve_sparse(x, n, k, tau, s);
  }
  // An offset beyond the dtype's range: the threshold lies between two groups of scores whose
  // differences overflow it (tiny tau); any finite value that far is the same threshold.
  constexpr double big = std::numeric_limits<T>::max();
  const T offset = static_cast<T>(std::min(std::max(seg.offset, -big), big));
  T* out = s.out.data();
  double correction = 0.0;
  if constexpr (M == kSigmoid) {
    // u = y - d in the pivot's frame (y exact near the pivot), one more Newton step there for
    // the rounding of the last iterate, then p
    T* u = s.y.data();
    for (int64_t i = 0; i < s.padded; i += kWidth<T>) store(u + i, load(u + i) - offset);
    correction = sigmoid_final_step(u, k, s);
    const Vec<T> shift = splat(static_cast<T>(correction));
    for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
      store(out + i, apply_f<T, M>(load(u + i) - shift));
    }
  } else if constexpr (M == kSparse) {
    // the cell's root is exact in the pivot's frame: p straight from it
    const T* y = s.y.data();
    const Vec<T> shift = splat(offset);
    for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
      store(out + i, apply_f<T, M>(load(y + i) - shift));
    }
  } else {
    // the closed form is exact in the pivot's frame (its sums were taken there): p in one
    // pass, u = (x - P) / tau - d
    const T* x_pad = s.x.data();
    const Vec<T> pivot_v = splat(static_cast<T>(seg.pivot));
    const Vec<T> tau_v = splat(tau);
    const Vec<T> shift = splat(offset);
    for (int64_t i = 0; i < s.padded; i += kWidth<T>) {
      store(out + i, apply_f<T, M>((load(x_pad + i) - pivot_v) / tau_v - shift));
    }
  }
  std::memcpy(p, out, n * sizeof(T));
  const double lam = seg.pivot / static_cast<double>(tau) + offset + correction;
  *lam_out = static_cast<T>(std::min(std::max(lam, -big), big));
}

// ------------------------------------------------------------------------------------------
// narrow rows (float32, N <= kNarrowMax, sigmoid / laplace / exp): kWidth<float> rows at a
// time, one SIMD lane per row, so the per-row scalar work of the row path (selection, scalar
// logs and exps, the loops' setup) becomes vector work shared by 8 rows. The algorithm is the
// fast path of the row path, in the frame of the row max: from the upper bound
// lam_0 = log sum e^y - log k' (k' = k for sigmoid and exp, 2k for laplace) every row takes
// Newton steps in w = e^-lam (sigmoid: the sum is concave in w) or segment steps (exp,
// laplace: the root of the equation restricted to the current split into entries above and
// below, a Newton step on that model, which walks down without overshooting and is exact once
// the split repeats). A lane whose row is special (NaN / +inf, k <= 0 or NaN, at most k finite
// scores), does not settle within the step budget, or whose threshold lies more than
// kFrameReach from the max (where fp32 coordinates would lose bits) is redone by the row path.

constexpr int64_t kNarrowMax = 16;
constexpr int kNarrowSteps = 12;

template <int64_t M>
void forward_narrow_block(const float* x, float* p, float* lam_out, const float* k_ptr,
                          const float* tau_ptr, int64_t n, bool redo[]) {
  typedef Vec<float> V;
  typedef Lanes<float>::ivec IVec;
  constexpr int64_t W = kWidth<float>;
  constexpr float inf = std::numeric_limits<float>::infinity();
  alignas(32) float buf[kNarrowMax][W];
  for (int64_t l = 0; l < W; ++l) {
    for (int64_t j = 0; j < n; ++j) buf[j][l] = x[l * n + j];
  }
  V col[kNarrowMax];
  for (int64_t j = 0; j < n; ++j) col[j] = load(buf[j]);
  const V k = load(k_ptr);
  const V tau = load(tau_ptr);
  IVec special = {};
  V count = splat(0.0f);
  V x_max = splat(-inf);
  for (int64_t j = 0; j < n; ++j) {
    special |= (col[j] != col[j]) | (col[j] == inf);
    count += col[j] > -inf ? splat(1.0f) : splat(0.0f);
    x_max = vmax(x_max, col[j]);
  }
  special |= (k != k) | (k <= 0.0f) | (count <= k);
  const V safe_max = special ? splat(0.0f) : x_max;
  V y[kNarrowMax];
  for (int64_t j = 0; j < n; ++j) {
    y[j] = (col[j] - safe_max) / tau;  // <= 0; -inf on masked entries
    y[j] = special ? splat(-1.0f) : y[j];  // (keeps the special lanes' arithmetic quiet)
  }
  const V k_eff = special ? splat(0.5f) : k;
  // sigmoid: sum_j sigma(y_j - lam) and its slope sum_j sigma (1 - sigma), per lane, from
  // q = sigma(-|u|) (no overflow): sigma(u) = 1 - q above the threshold, q below, the count of
  // entries above added last (so that the small q keep their bits)
  const auto sigmoid_sums = [&](V lam) {
    V total = splat(0.0f);
    V slope = splat(0.0f);
    V positive = splat(0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const V u = y[j] - lam;
      const V e = vexp(-vabs(u));
      const V q = e / (e + 1.0f);
      const auto pos = u >= 0.0f;
      positive += pos ? splat(1.0f) : splat(0.0f);
      total += pos ? -q : q;
      slope += q * (1.0f - q);
    }
    return std::pair<V, V>(total + positive, slope);
  };
  V lam;
  V lo;  // sparse: the bracket [t - 1, t], t the ceil(k)-th largest (as solve_sparse)
  V hi;
  V origin = splat(0.0f);  // lam and y are relative to it (sparse: t), in the max's frame
  if constexpr (M == kSparse) {
    V last;  // ceil(k) - 1 (< count <= n on the lanes that are not special)
    int64_t depth = 1;  // the largest ceil(k) of the block's lanes
    for (int64_t l = 0; l < W; ++l) {
      last[l] = std::ceil(k_eff[l]) - 1.0f;
      depth = std::max(depth, static_cast<int64_t>(last[l]) + 1);
    }
    depth = std::min(depth, n);
    // t = the ceil(k)-th largest y: every entry sifts down a buffer of the `depth` largest
    V top[kNarrowMax];
    for (int64_t c = 0; c < depth; ++c) top[c] = splat(-inf);
    for (int64_t j = 0; j < n; ++j) sift_down(top, depth, y[j]);
    V t = splat(0.0f);
    for (int64_t c = 0; c < depth; ++c) t = last == float(c) ? top[c] : t;
    // iterate in the frame of t, where the entries near the threshold are small and exact
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] - t;
    origin = t;
    lo = splat(-1.0f);
    hi = splat(0.0f);
    lam = lo;
  } else {
    V total0 = splat(0.0f);
    for (int64_t j = 0; j < n; ++j) total0 += vexp(y[j]);
    lam = vlog(total0 / (M == kLaplace ? 2.0f * k_eff : k_eff));
  }
  IVec active = ~special;
  IVec settled = {};
  V prev_above = splat(-1.0f);
  V prev_linear = splat(-1.0f);
  for (int step = 0; step < kNarrowSteps; ++step) {
    V next = lam;
    if constexpr (M == kSparse) {
      V capped = splat(0.0f);
      V linear = splat(0.0f);
      V linear_sum = splat(0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const auto is_capped = y[j] >= lam + 1.0f;
        const auto is_linear = (y[j] > lam) & ~is_capped;
        capped += is_capped ? splat(1.0f) : splat(0.0f);
        linear += is_linear ? splat(1.0f) : splat(0.0f);
        linear_sum += is_linear ? y[j] : splat(0.0f);
      }
      // lam is the root of its cell's line when the last step was a root step into this cell
      settled |= (capped == prev_above) & (linear == prev_linear) & active;
      const V total = capped + linear_sum - linear * lam;
      settled |= (total == k_eff) & active;  // an exact hit (a flat cell: see solve_sparse)
      const auto too_low = total > k_eff;
      lo = too_low ? lam : lo;
      hi = too_low ? hi : lam;
      const V root = (linear_sum + capped - k_eff) / linear;
      // strictly inside: a root on an end of the bracket is a point already taken, and
      // stepping back to it would cycle between two cells (bisect instead)
      const auto inside = (linear > 0.0f) & (root > lo) & (root < hi);
      next = inside ? root : 0.5f * lo + 0.5f * hi;
      prev_above = inside ? capped : splat(-1.0f);
      prev_linear = inside ? linear : splat(-1.0f);
    } else if constexpr (M == kSigmoid) {
      const auto [total, slope] = sigmoid_sums(lam);
      const V move = -vlog1p(vmax((k_eff - total) / slope, splat(-0.5f)));
      const auto done = (total == k_eff) | (vabs(move) <= float(kSigmoidStepTol<float>));
      next = (total == k_eff) ? lam : lam + move;
      settled |= done & active;
    } else {
      V above = splat(0.0f);
      V below_sum = splat(0.0f);  // sum_below e^(y - lam)
      V above_sum = splat(0.0f);  // sum_above e^-(y - lam) (laplace)
      for (int64_t j = 0; j < n; ++j) {
        const V u = y[j] - lam;
        const auto up = u >= 0.0f;
        above += up ? splat(1.0f) : splat(0.0f);
        if constexpr (M == kExp) {
          below_sum += up ? splat(0.0f) : vexp(u);
        } else {
          const V e = vexp(-vabs(u));
          below_sum += up ? splat(0.0f) : e;
          above_sum += up ? e : splat(0.0f);
        }
      }
      const V gap = k_eff - above;
      V inv_w;  // e^(next - lam)
      if constexpr (M == kExp) {
        inv_w = below_sum / gap;
      } else {
        // S w^2 / 2 - (k - m) w - T / 2 = 0 for w = e^-(next - lam): the positive root, in
        // whichever of its two equal forms has no cancellation
        const V root = vsqrt(gap * gap + below_sum * above_sum);
        inv_w = gap >= 0.0f ? below_sum / (gap + root) : (root - gap) / above_sum;
      }
      // the split repeated: lam is the root of its segment already (computed last step)
      settled |= (above == prev_above) & active;
      prev_above = above;
      const auto usable = (inv_w >= std::numeric_limits<float>::min()) & (inv_w < inf);
      next = usable ? lam + vlog(usable ? inv_w : splat(1.0f)) : splat(std::nanf(""));
    }
    if constexpr (M == kSigmoid) {
      lam = active ? next : lam;  // (the step that settles is taken, as on the row path)
    } else {
      lam = (active & ~settled) ? next : lam;  // (settled: lam is its segment's root)
    }
    active &= ~settled & (vabs(lam) < inf);  // (a lane gone NaN or infinite is redone)
    bool any = false;
    for (int64_t l = 0; l < W; ++l) any |= active[l] != 0;
    if (!any) break;
  }
  // the sigmoid final step, one more Newton step at the settled lam
  V shift = splat(0.0f);
  if constexpr (M == kSigmoid) {
    const auto [total, slope] = sigmoid_sums(lam);
    shift = slope > 0.0f ? vmin(vmax((total - k_eff) / slope, splat(-1e-2f)), splat(1e-2f))
                         : splat(0.0f);
  }
  const auto bad = special | active | ~(vabs(origin + lam) <= float(kFrameReach));
  V out[kNarrowMax];
  for (int64_t j = 0; j < n; ++j) out[j] = apply_f<float, M>(y[j] - lam - shift);
  for (int64_t j = 0; j < n; ++j) store(buf[j], out[j]);
  const V lam_z = safe_max / tau + origin + lam + shift;
  alignas(32) float lam_buf[W];
  store(lam_buf, vmin(vmax(lam_z, splat(-std::numeric_limits<float>::max())),
                      splat(std::numeric_limits<float>::max())));
  for (int64_t l = 0; l < W; ++l) {
    redo[l] = bad[l] != 0;
    if (redo[l]) continue;
    for (int64_t j = 0; j < n; ++j) p[l * n + j] = buf[j][l];
    lam_out[l] = lam_buf[l];
  }
}

template <typename T, int64_t M>
void forward_impl(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& tau,
                  int64_t sparse_newton_steps, bool narrow, at::Tensor& p, at::Tensor& lam) {
  const int64_t rows = scores.size(0);
  const int64_t n = scores.size(1);
  const T* x = scores.const_data_ptr<T>();
  const T* k_ptr = k.const_data_ptr<T>();
  const T* tau_ptr = tau.const_data_ptr<T>();
  T* p_ptr = p.mutable_data_ptr<T>();
  T* lam_ptr = lam.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  constexpr bool narrow_kind = std::is_same_v<T, float>;
  const bool use_narrow = narrow && narrow_kind && n >= 1 && n <= kNarrowMax;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(n);
    scratch.sparse_newton_steps = sparse_newton_steps;
    int64_t r = begin;
    if constexpr (narrow_kind) {
      constexpr int64_t W = kWidth<float>;
      for (; use_narrow && r + W <= end; r += W) {
        bool redo[W];
        forward_narrow_block<M>(x + r * n, p_ptr + r * n, lam_ptr + r, k_ptr + r, tau_ptr + r,
                                n, redo);
        for (int64_t l = 0; l < W; ++l) {
          if (!redo[l]) continue;
          const int64_t q = r + l;
          forward_row<T, M>(x + q * n, p_ptr + q * n, lam_ptr + q, k_ptr[q], tau_ptr[q],
                            scratch, n);
        }
      }
    }
    for (; r < end; ++r) {
      forward_row<T, M>(x + r * n, p_ptr + r * n, lam_ptr + r, k_ptr[r], tau_ptr[r], scratch, n);
    }
  });
}

// ------------------------------------------------------------------------------------------
// backward (threshold_backward): with w = f'(u) written through p and v = w / tau,
// dL/dx = v * (g - mean), mean = sum v g / sum v (0 when sum v = 0), dL/dk = mean,
// dL/dtau = -sum_i u_i dL/dx_i with u = f^{-1}(p) where w > 0.

template <typename T, int64_t M>
inline T f_prime(T p) {
  if constexpr (M == kSigmoid) {
    return p * (T(1) - p);
  } else if constexpr (M == kLaplace) {
    return std::min(p, T(1) - p);
  } else if constexpr (M == kExp) {
    return p < T(1) ? p : T(0);
  } else {
    return (p > T(0) && p < T(1)) ? T(1) : T(0);
  }
}

template <typename T, int64_t M>
inline T f_inverse(T p) {
  if constexpr (M == kSigmoid) {
    return std::log(p) - std::log1p(-p);
  } else if constexpr (M == kLaplace) {
    return p < T(0.5) ? std::log(T(2) * p) : -std::log(T(2) * (T(1) - p));
  } else if constexpr (M == kExp) {
    return std::log(p);
  } else {
    return p;
  }
}

// f_prime on a vector (the same expressions lane by lane, so NaN goes where the scalar sends it)
template <typename V, int64_t M>
inline V f_prime_vec(V p) {
  typedef ElemOf<V> T;
  if constexpr (M == kSigmoid) {
    return p * (T(1) - p);
  } else if constexpr (M == kLaplace) {
    return vmin(p, T(1) - p);
  } else if constexpr (M == kExp) {
    return p < T(1) ? p : T(0);
  } else {
    return (p > T(0)) & (p < T(1)) ? V{} + T(1) : V{};
  }
}

// sum_w += w and sum_wg += w g lane by lane, in double: float lanes widened in two halves.
inline void accumulate(Vec<double>& sum_w, Vec<double>& sum_wg, Vec<double> w, Vec<double> g) {
  sum_w += w;
  sum_wg += w * g;
}
inline void accumulate(Vec<double>& sum_w, Vec<double>& sum_wg, Vec<float> w, Vec<float> g) {
  Vec<double> w_low, w_high, g_low, g_high;
  for (int64_t l = 0; l < kWidth<double>; ++l) {
    w_low[l] = w[l];
    w_high[l] = w[l + kWidth<double>];
    g_low[l] = g[l];
    g_high[l] = g[l + kWidth<double>];
  }
  sum_w += w_low + w_high;
  sum_wg += w_low * g_low + w_high * g_high;
}

// dL/dx and dL/dk of one row (w = f'(u) through p, v = w / tau): mean = sum w g / sum w (0
// when sum w = 0; NaN stays NaN), dL/dx = w (g - mean) / tau, divided by tau, never times
// 1 / tau (a subnormal tau gives +-inf, never 0 * inf = NaN). SIMD vectors with a scalar tail
// for the last n % width entries, sums in double. The compiler's own vectorisation of the
// scalar loop this replaces spent more on its setup and epilogue than on the arithmetic for
// float rows of 8 or 16 (this is 1.3-1.5x faster there) and ran exp's blend at half speed
// (n = 64: 1.9x); the float results were the same bits at n = 8, 12, 16 and 64.
template <typename T, int64_t M>
inline void backward_row(const T* pr, const T* gr, T tau, T* gxr, T* gk, int64_t n) {
  typedef Vec<T> V;
  constexpr int64_t W = kWidth<T>;
  const int64_t full = n / W * W;
  Vec<double> sum_w{};
  Vec<double> sum_wg{};
  for (int64_t c = 0; c < full; c += W) {
    accumulate(sum_w, sum_wg, f_prime_vec<V, M>(load(pr + c)), load(gr + c));
  }
  double total_w = hsum(sum_w);
  double total_wg = hsum(sum_wg);
  for (int64_t i = full; i < n; ++i) {
    const T w = f_prime<T, M>(pr[i]);
    total_w += w;
    total_wg += static_cast<double>(w) * gr[i];
  }
  const T mean = static_cast<T>(total_wg / (total_w > 0 ? total_w : 1.0));
  for (int64_t c = 0; c < full; c += W) {
    store(gxr + c, f_prime_vec<V, M>(load(pr + c)) * (load(gr + c) - mean) / tau);
  }
  for (int64_t i = full; i < n; ++i) gxr[i] = f_prime<T, M>(pr[i]) * (gr[i] - mean) / tau;
  *gk = mean;
}

template <typename T, int64_t M>
void backward_impl(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& tau,
                   bool need_tau, at::Tensor& grad_x, at::Tensor& grad_k, at::Tensor& grad_tau) {
  const int64_t rows = p.size(0);
  const int64_t n = p.size(1);
  const T* p_ptr = p.const_data_ptr<T>();
  const T* g_ptr = grad.const_data_ptr<T>();
  const T* tau_ptr = tau.const_data_ptr<T>();
  T* gx_ptr = grad_x.mutable_data_ptr<T>();
  T* gk_ptr = grad_k.mutable_data_ptr<T>();
  T* gt_ptr = need_tau ? grad_tau.mutable_data_ptr<T>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* pr = p_ptr + r * n;
      const T* gr = g_ptr + r * n;
      T* gxr = gx_ptr + r * n;
      // (rows of one or two vectors, 8 and 16 float entries, the commonest router widths,
      // with n known to the compiler: their loops unroll into a few vector instructions)
      if (n == kWidth<T>) {
        backward_row<T, M>(pr, gr, tau_ptr[r], gxr, gk_ptr + r, kWidth<T>);
      } else if (n == 2 * kWidth<T>) {
        backward_row<T, M>(pr, gr, tau_ptr[r], gxr, gk_ptr + r, 2 * kWidth<T>);
      } else {
        backward_row<T, M>(pr, gr, tau_ptr[r], gxr, gk_ptr + r, n);
      }
      if (need_tau) {
        double acc = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          // u = 0 off the support (as f_inverse), so a NaN gradient still reaches the sum
          const T u = f_prime<T, M>(pr[i]) > T(0) ? f_inverse<T, M>(pr[i]) : T(0);
          acc += static_cast<double>(u) * gxr[i];
        }
        gt_ptr[r] = static_cast<T>(-acc);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// op entry points

void check_inputs(const at::Tensor& rows_RN, const at::Tensor& k, const at::Tensor& tau,
                  int64_t method) {
  check_rows(rows_RN);
  TORCH_CHECK(k.scalar_type() == rows_RN.scalar_type() && tau.scalar_type() == rows_RN.scalar_type(),
              "moe_router_cpu: k and tau must have the dtype of the rows");
  TORCH_CHECK(k.dim() == 1 && k.size(0) == rows_RN.size(0) && k.is_contiguous(),
              "moe_router_cpu: k must be a contiguous [R] tensor");
  TORCH_CHECK(tau.dim() == 1 && tau.size(0) == rows_RN.size(0) && tau.is_contiguous(),
              "moe_router_cpu: tau must be a contiguous [R] tensor");
  TORCH_CHECK(method >= 0 && method <= 3, "moe_router_cpu: method must be 0..3, got ", method);
}

// Calls fn(T{}, std::integral_constant<int64_t, method>{}) for the runtime dtype and method.
template <typename Fn>
void dispatch_method(int64_t method, Fn&& fn) {
  switch (method) {
    case kSigmoid:
      return fn(std::integral_constant<int64_t, kSigmoid>{});
    case kLaplace:
      return fn(std::integral_constant<int64_t, kLaplace>{});
    case kExp:
      return fn(std::integral_constant<int64_t, kExp>{});
    default:
      return fn(std::integral_constant<int64_t, kSparse>{});
  }
}

template <typename Fn>
void dispatch(at::ScalarType dtype, int64_t method, Fn&& fn) {
  dispatch_method(method, [&](auto method_c) {
    dispatch_dtype(dtype, [&](auto scalar) { fn(scalar, method_c); });
  });
}

std::tuple<at::Tensor, at::Tensor> threshold_forward(const at::Tensor& scores,
                                                     const at::Tensor& k, const at::Tensor& tau,
                                                     int64_t method, int64_t sparse_newton_steps,
                                                     bool narrow) {
  check_inputs(scores, k, tau, method);
  at::Tensor p = at::empty_like(scores);
  at::Tensor lam = at::empty({scores.size(0)}, scores.options());
  if (scores.numel() == 0) {  // no entries: every row is saturated (as the fallback marks it)
    lam.fill_(-std::numeric_limits<double>::infinity());
    return {p, lam};
  }
  dispatch(scores.scalar_type(), method, [&](auto scalar, auto method_c) {
    forward_impl<decltype(scalar), decltype(method_c)::value>(scores, k, tau,
                                                              sparse_newton_steps, narrow, p, lam);
  });
  return {p, lam};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_backward(const at::Tensor& p,
                                                                  const at::Tensor& grad,
                                                                  const at::Tensor& tau,
                                                                  int64_t method,
                                                                  bool need_tau_grad) {
  check_inputs(p, tau, tau, method);
  TORCH_CHECK(grad.sizes() == p.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == p.scalar_type(),
              "moe_router_cpu: grad must be a contiguous tensor like p");
  at::Tensor grad_x = at::empty_like(p);
  at::Tensor grad_k = at::empty({p.size(0)}, p.options());
  at::Tensor grad_tau = at::zeros({need_tau_grad ? p.size(0) : 0}, p.options());
  if (p.numel() == 0) {
    grad_k.zero_();
    grad_tau.zero_();
    return {grad_x, grad_k, grad_tau};
  }
  dispatch(p.scalar_type(), method, [&](auto scalar, auto method_c) {
    backward_impl<decltype(scalar), decltype(method_c)::value>(p, grad, tau, need_tau_grad,
                                                               grad_x, grad_k, grad_tau);
  });
  return {grad_x, grad_k, grad_tau};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_router_cpu, m) {
  m.def(
      "threshold_forward(Tensor scores, Tensor k, Tensor tau, int method,"
      " int sparse_newton_steps=12, bool narrow=True) -> (Tensor, Tensor)");
  m.def(
      "threshold_backward(Tensor p, Tensor grad, Tensor tau, int method, bool need_tau_grad)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_router_cpu, CPU, m) {
  m.impl("threshold_forward", &threshold_forward);
  m.impl("threshold_backward", &threshold_backward);
}

}  // namespace moe_router_cpu
