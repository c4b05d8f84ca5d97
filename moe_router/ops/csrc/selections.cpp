// CPU selections for the balanced gate's alternations (gates.balance_thresholds), where
// torch.topk / sort cost about 1 us per short row and a full sort per long column. NaN entries
// count as -inf (never taken). Built with the other kernels by moe_router/ops/threshold_cpp.py.
//
// Shape legend: R rows, N entries per row, T tokens, E experts, K selected per token.
//
// Ops (schemas at the end of this file), float32 or float64, contiguous:
//   top_values(rows, num) -> the num largest entries of each row, descending (NaN never taken)
//   rank_pair(rows, rank) -> [R, 2]: the entries at descending positions rank, rank + 1
//   margin_quantiles(z, mu, lam, k, rank) -> [E, 3]: one load-balancing alternation's dispatch
//     margins of z [T, E] - mu per expert: the margins at ranks rank, rank + 1 and the load

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "select_top.h"

namespace moe_router_cpu {
namespace {

// top_values: the `num` largest entries of each row, descending. float32 rows run 8 at a time,
// one SIMD lane each, when num <= kSiftMax: every entry sifts down a buffer of the num largest
// so far (sift_down); other rows through select_top.
constexpr int64_t kSiftMax = 16;

template <typename T>
inline T nan_as_neg_inf(T v) {
  return v == v ? v : -std::numeric_limits<T>::infinity();
}

void top_values_block(const float* x, int64_t n, int64_t num, float* out) {
  typedef Vec<float> V;
  constexpr int64_t W = kWidth<float>;
  constexpr float inf = std::numeric_limits<float>::infinity();
  V top[kSiftMax];
  for (int64_t c = 0; c < num; ++c) top[c] = splat(-inf);
  for (int64_t j = 0; j < n; ++j) {
    V entry;
    for (int64_t l = 0; l < W; ++l) entry[l] = x[l * n + j];
    sift_down(top, num, entry == entry ? entry : splat(-inf));
  }
  for (int64_t l = 0; l < W; ++l) {
    for (int64_t c = 0; c < num; ++c) out[l * num + c] = top[c][l];
  }
}

template <typename T>
void top_values_impl(const at::Tensor& rows, int64_t num, at::Tensor& out) {
  const int64_t n = rows.size(1);
  const T* x = rows.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows.size(0), grain, [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    if constexpr (std::is_same_v<T, float>) {
      for (; num <= kSiftMax && r + kWidth<float> <= end; r += kWidth<float>) {
        top_values_block(x + r * n, n, num, o + r * num);
      }
    }
    if (r == end) return;
    Scratch<T> s(n);
    for (; r < end; ++r) {
      // (the selection reads the pads of s.x; NaN would poison its cut)
      std::transform(x + r * n, x + (r + 1) * n, s.x.begin(), nan_as_neg_inf<T>);
      select_top(s.x.data(), n, num, s);
      std::copy(s.top_val.begin(), s.top_val.begin() + num, o + r * num);
    }
  });
}

// rank_pair: per row, the entries at descending positions rank and min(rank + 1, N - 1)
// (0-based), by std::nth_element on a copy: O(N) per row where a sort is O(N log N).
template <typename T>
void rank_pair_impl(const at::Tensor& rows, const at::Tensor& rank, at::Tensor& out) {
  const int64_t n = rows.size(1);
  const T* x = rows.const_data_ptr<T>();
  const int64_t* rank_ptr = rank.const_data_ptr<int64_t>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      std::transform(x + r * n, x + (r + 1) * n, buf.begin(), nan_as_neg_inf<T>);
      const int64_t at = std::min(std::max<int64_t>(rank_ptr[r], 0), n - 1);
      std::nth_element(buf.begin(), buf.begin() + at, buf.end(), std::greater<T>());
      // the next position's entry: the largest of those after `at`, all <= buf[at]
      const T next = at + 1 < n ? *std::max_element(buf.begin() + at + 1, buf.end()) : buf[at];
      o[2 * r] = buf[at];
      o[2 * r + 1] = next;
    }
  });
}

// margin_quantiles: one alternation of the balanced gate's load target (gates._balance_load)
// in two passes, where the PyTorch path needs a subtraction, a top-(K+1) selection, the
// margins, a transpose and a column selection. Pass 1, over tokens: s = z - mu and each pair's
// dispatch margin (> 0 iff dispatched): s - lam_t for a support-exact gate (lam given), else
// s minus the best score it competes with (the (K+1)-th largest s of the token for a selected
// expert, the K-th for the others); -inf where s is not finite (padding, masked experts),
// written expert-major. Pass 2, over experts: the load (margins > 0), positives moved in
// front, and the margins at descending positions rank and rank + 1, selected among the
// positives or the rest only. float32 tokens run 8 at a time, one SIMD lane each.
template <typename T>
inline T dispatch_margin(T s, T kth, T next) {
  return s - (s >= kth ? next : kth);
}

void margins_block(const float* z, const float* mu, int64_t n, int64_t ld, int64_t k,
                   const float* lam, float* m) {
  typedef Vec<float> V;
  constexpr int64_t W = kWidth<float>;
  constexpr float inf = std::numeric_limits<float>::infinity();
  auto entry_at = [&](int64_t j) {
    V entry;
    for (int64_t l = 0; l < W; ++l) entry[l] = z[l * n + j];
    return entry - splat(mu[j]);
  };
  V kth = splat(0.0f), next = splat(0.0f);
  if (lam == nullptr) {
    V top[kSiftMax + 1];
    for (int64_t c = 0; c <= k; ++c) top[c] = splat(-inf);
    for (int64_t j = 0; j < n; ++j) {
      const V entry = entry_at(j);
      sift_down(top, k + 1, entry == entry ? entry : splat(-inf));
    }
    kth = top[k - 1];
    next = top[k];
  }
  const V lam_v = lam == nullptr ? splat(0.0f) : load(lam);
  for (int64_t j = 0; j < n; ++j) {
    const V entry = entry_at(j);
    const V margin = lam == nullptr ? dispatch_margin(entry, kth, next) : entry - lam_v;
    store(m + j * ld, (entry - entry) == splat(0.0f) ? margin : splat(-inf));
  }
}

template <typename T>
void margins_row(const T* z, const T* mu, int64_t n, int64_t ld, int64_t k, const T* lam, T* m,
                 std::vector<T>& s, std::vector<T>& top) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) s[j] = z[j] - mu[j];
  T kth = 0, next = 0;
  if (lam == nullptr) {
    std::fill(top.begin(), top.begin() + k + 1, -inf);
    for (int64_t j = 0; j < n; ++j) sift_down(top.data(), k + 1, nan_as_neg_inf(s[j]));
    kth = top[k - 1];
    next = top[k];
  }
  for (int64_t j = 0; j < n; ++j) {
    const T margin = lam == nullptr ? dispatch_margin(s[j], kth, next) : s[j] - *lam;
    m[j * ld] = std::isfinite(s[j]) ? margin : -inf;
  }
}

// Inserts v into buf[0..depth), kept ascending: buf holds the depth smallest entries so far.
template <typename T>
inline void insert_ascending(T* buf, int64_t depth, T v) {
  if (!(v < buf[depth - 1])) return;
  int64_t c = depth - 1;
  for (; c > 0 && buf[c - 1] > v; --c) buf[c] = buf[c - 1];
  buf[c] = v;
}

template <typename T>
void margin_quantiles_impl(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& lam,
                           int64_t k, const at::Tensor& rank, at::Tensor& out) {
  const int64_t num_tokens = z.size(0), n = z.size(1);
  const T* z_ptr = z.const_data_ptr<T>();
  const T* mu_ptr = mu.const_data_ptr<T>();
  const T* lam_ptr = lam.numel() > 0 ? lam.const_data_ptr<T>() : nullptr;
  // Expert-major, each expert's column padded off a power-of-two stride (8192 tokens would
  // put the 8 tokens' stores of one block into the same cache sets).
  const int64_t ld = round_up(num_tokens, 16) + 16;
  at::Tensor margins = at::empty({n, ld}, z.options());
  T* m = margins.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(kWidth<float>, 4096 / std::max<int64_t>(n, 1));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    int64_t t = begin;
    if constexpr (std::is_same_v<T, float>) {
      for (; k < kSiftMax && t + kWidth<float> <= end; t += kWidth<float>) {
        margins_block(z_ptr + t * n, mu_ptr, n, ld, k, lam_ptr ? lam_ptr + t : nullptr, m + t);
      }
    }
    std::vector<T> s(n), top(lam_ptr ? 0 : k + 1);
    for (; t < end; ++t) {
      margins_row(z_ptr + t * n, mu_ptr, n, ld, k, lam_ptr ? lam_ptr + t : nullptr,
                  m + t, s, top);
    }
  });
  // Pass 2a: each expert's load, its positive margins moved in front (branch-free: the signs
  // of the margins around the threshold are what a branch predictor cannot guess).
  std::vector<int64_t> load(n);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rest(num_tokens);
    for (int64_t e = begin; e < end; ++e) {
      T* col = m + e * ld;
      int64_t front = 0, back = 0;
      for (int64_t t = 0; t < num_tokens; ++t) {
        const T v = col[t];
        const bool positive = v > 0;
        col[front] = v;  // front <= t: never ahead of the read
        rest[back] = v;
        front += positive;
        back += !positive;
      }
      std::copy(rest.begin(), rest.begin() + back, col + front);
      load[e] = front;
    }
  });
  // The shared rank of a support-exact gate: its total over the experts, in equal shares
  // (in T arithmetic, as the PyTorch path's mean of the loads).
  int64_t shared_rank = 0;
  if (rank.numel() == 0) {
    T total = 0;
    for (int64_t e = 0; e < n; ++e) total += T(load[e]);
    shared_rank = int64_t(std::ceil(total / T(n))) - 1;
  }
  const int64_t* rank_ptr = rank.numel() > 0 ? rank.const_data_ptr<int64_t>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  // Pass 2b: the margins at descending positions rank and rank + 1 (clamped to the column),
  // selected in the part that holds the rank: the positives [0, load) or the rest [load, T).
  // Near balance the rank sits a few places from the load, at one end of its part: a short
  // insertion buffer of the part's smallest (positives) or largest (the rest) entries serves
  // there, a selection over the part elsewhere.
  constexpr int64_t kShort = 32;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    T buf[kShort];
    for (int64_t e = begin; e < end; ++e) {
      T* col = m + e * ld;
      const int64_t at = std::min(std::max<int64_t>(rank_ptr ? rank_ptr[e] : shared_rank, 0),
                                  num_tokens - 1);
      const bool in_front = at < load[e];
      const int64_t lo = in_front ? 0 : load[e], hi = in_front ? load[e] : num_tokens;
      T inside, next;
      if (in_front && hi - at <= kShort) {
        // positions at.. of the positives are their hi - at smallest, ascending in buf
        const int64_t depth = hi - at;
        std::fill(buf, buf + depth, std::numeric_limits<T>::infinity());
        for (int64_t t = lo; t < hi; ++t) insert_ascending(buf, depth, col[t]);
        inside = buf[depth - 1];
        next = depth >= 2 ? buf[depth - 2] : inside;
      } else if (!in_front && at - lo + 2 <= kShort) {
        // positions ..at + 1 of the rest are their at - lo + 2 largest, descending in buf
        const int64_t depth = std::min(at - lo + 2, hi - lo);
        std::fill(buf, buf + depth, std::numeric_limits<T>::infinity());
        for (int64_t t = lo; t < hi; ++t) insert_ascending(buf, depth, -col[t]);
        inside = -buf[at - lo];
        next = at + 1 < hi ? -buf[at - lo + 1] : inside;
      } else {
        std::nth_element(col + lo, col + at, col + hi, std::greater<T>());
        inside = col[at];
        next = at + 1 < hi ? *std::max_element(col + at + 1, col + hi) : inside;
      }
      // past the end of the positives, the next is the largest of the rest
      if (at + 1 == hi && hi < num_tokens) next = *std::max_element(col + hi, col + num_tokens);
      o[3 * e] = inside;
      o[3 * e + 1] = next;
      o[3 * e + 2] = T(load[e]);
    }
  });
}

at::Tensor margin_quantiles(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& lam,
                            int64_t k, const at::Tensor& rank) {
  check_rows(z);
  const int64_t num_tokens = z.size(0), n = z.size(1);
  TORCH_CHECK(num_tokens >= 1, "moe_router_cpu: margin_quantiles needs T >= 1");
  auto is_vector = [&](const at::Tensor& v, int64_t size) {
    return v.device().is_cpu() && v.dim() == 1 && v.size(0) == size && v.is_contiguous();
  };
  TORCH_CHECK(is_vector(mu, n) && mu.scalar_type() == z.scalar_type(),
              "moe_router_cpu: mu must be a contiguous [E] CPU tensor of the dtype of z");
  TORCH_CHECK((lam.numel() == 0 || is_vector(lam, num_tokens)) &&
                  lam.scalar_type() == z.scalar_type(),
              "moe_router_cpu: lam must be empty or a contiguous [T] CPU tensor of z's dtype");
  TORCH_CHECK(lam.numel() > 0 || (k >= 1 && k < n),
              "moe_router_cpu: margin_quantiles needs 1 <= k < E without lam, got k = ", k);
  TORCH_CHECK((rank.numel() == 0 || is_vector(rank, n)) && rank.scalar_type() == at::kLong,
              "moe_router_cpu: rank must be empty or a contiguous int64 [E] CPU tensor");
  at::Tensor out = at::empty({n, 3}, z.options());
  dispatch_dtype(z.scalar_type(), [&](auto scalar) {
    margin_quantiles_impl<decltype(scalar)>(z, mu, lam, k, rank, out);
  });
  return out;
}

at::Tensor rank_pair(const at::Tensor& rows, const at::Tensor& rank) {
  check_rows(rows);
  TORCH_CHECK(rows.size(1) >= 1, "moe_router_cpu: rank_pair needs N >= 1");
  TORCH_CHECK(rank.device().is_cpu() && rank.scalar_type() == at::kLong && rank.dim() == 1 &&
                  rank.size(0) == rows.size(0) && rank.is_contiguous(),
              "moe_router_cpu: rank must be a contiguous int64 [R] CPU tensor");
  at::Tensor out = at::empty({rows.size(0), 2}, rows.options());
  if (rows.size(0) == 0) return out;
  dispatch_dtype(rows.scalar_type(), [&](auto scalar) {
    rank_pair_impl<decltype(scalar)>(rows, rank, out);
  });
  return out;
}

at::Tensor top_values(const at::Tensor& rows, int64_t num) {
  check_rows(rows);
  TORCH_CHECK(num >= 1 && num <= rows.size(1), "moe_router_cpu: top_values needs 1 <= num <= ",
              rows.size(1), ", got ", num);
  at::Tensor out = at::empty({rows.size(0), num}, rows.options());
  if (rows.size(0) == 0) return out;
  dispatch_dtype(rows.scalar_type(), [&](auto scalar) {
    top_values_impl<decltype(scalar)>(rows, num, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_router_cpu, m) {
  m.def("top_values(Tensor rows, int num) -> Tensor");
  m.def("rank_pair(Tensor rows, Tensor rank) -> Tensor");
  m.def("margin_quantiles(Tensor z, Tensor mu, Tensor lam, int k, Tensor rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_router_cpu, CPU, m) {
  m.impl("top_values", &top_values);
  m.impl("rank_pair", &rank_pair);
  m.impl("margin_quantiles", &margin_quantiles);
}

}  // namespace moe_router_cpu
