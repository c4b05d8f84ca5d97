// The per-row scratch of the soft top-k kernels and the candidate selection (the K largest
// entries of a row), shared by the soft top-k (soft_topk.cpp) and by top_values
// (selections.cpp).

#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

namespace moe_router_cpu {

// Candidate counts up to this size are selected by insertion into a sorted buffer (a few
// compares per entry); larger ones by std::nth_element and a sort of the chosen.
constexpr int64_t kInsertionMaxK = 32;
// Newton steps of the sparse solve before a row takes the exact sorted path (solve_sparse).
constexpr int64_t kSparseNewtonSteps = 12;

// ------------------------------------------------------------------------------------------
// per-row scratch and the candidate selection

template <typename T>
struct Scratch {
  explicit Scratch(int64_t n)
      : padded(round_up(n, kWidth<T>)),
        x(padded),
        y(padded),
        out(padded),
        mark(padded),
        top_val(n),
        top_idx(n),
        candidates(n),
        pairs(n) {
    std::fill(x.begin() + n, x.end(), -std::numeric_limits<T>::infinity());
    std::fill(y.begin() + n, y.end(), -std::numeric_limits<T>::infinity());
  }
  int64_t padded;
  int64_t sparse_newton_steps = kSparseNewtonSteps;  // tests set 0 to check exact_sparse
  // the row's scores; the row in the frame of its pivot (y = (x - P) / tau, then u = y - d);
  // f of it. Pads -inf.
  std::vector<T> x, y, out;
  // per entry, 1 or 0 (in T, so that masked sums are plain arithmetic): among the top K
  // candidates; pads 0
  std::vector<T> mark;
  std::vector<T> top_val;  // the K largest scores, descending; -inf pads
  std::vector<int64_t> top_idx;
  std::vector<int64_t> candidates;
  std::vector<std::pair<T, int64_t>> pairs;
  std::vector<double> tail;    // relative_tails: per candidate, the sum below it
  std::vector<double> prefix;  // sparse: prefix sums of the sorted candidates
};

// A value `cut` with at least `num` entries >= cut: the least of `cols` >= num column maxima
// of the row seen as blocks of `cols` entries (each column max is a different entry). Only the
// entries >= cut can be among the top `num`; for num << n they are a few more than num.
template <typename T>
T selection_cut(const T* x, int64_t padded, int64_t num) {
  constexpr int64_t width = kWidth<T>;
  const int64_t cols = round_up(num, width);
  const int64_t blocks = padded / cols;
  if (blocks < 2 || cols > 4 * width) return -std::numeric_limits<T>::infinity();
  Vec<T> colmax[4] = {};
  for (int64_t c = 0; c < cols / width; ++c) colmax[c] = load(x + c * width);
  for (int64_t b = 1; b < blocks; ++b) {
    for (int64_t c = 0; c < cols / width; ++c) {
      colmax[c] = vmax(colmax[c], load(x + b * cols + c * width));
    }
  }
  Vec<T> least = colmax[0];
  for (int64_t c = 1; c < cols / width; ++c) least = vmin(least, colmax[c]);
  T cut = least[0];
  for (int64_t l = 1; l < width; ++l) cut = std::min(cut, least[l]);
  return cut;
}

// The K largest of x[0..n) in descending order (ties: the earlier index first), into
// s.top_val / s.top_idx; positions past the finite entries hold -inf and index -1. Comparisons
// only: exact at any scale.
template <typename T>
void select_top(const T* x, int64_t n, int64_t num, Scratch<T>& s) {
  T* val = s.top_val.data();
  int64_t* idx = s.top_idx.data();
  if (num <= kInsertionMaxK) {
    std::fill(val, val + num, -std::numeric_limits<T>::infinity());
    std::fill(idx, idx + num, int64_t(-1));
    // branch-free compaction of the entries >= cut, then insertion of those into the buffer
    const T cut = selection_cut(x, s.padded, num);
    int64_t* cand = s.candidates.data();
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
      cand[count] = i;
      count += x[i] >= cut ? 1 : 0;
    }
    for (int64_t c = 0; c < count; ++c) {
      const int64_t i = cand[c];
      const T xi = x[i];
      if (!(xi > val[num - 1])) continue;
      int64_t j = num - 1;
      while (j > 0 && xi > val[j - 1]) {
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
        --j;
      }
      val[j] = xi;
      idx[j] = i;
    }
    return;
  }
  auto* pairs = s.pairs.data();
  for (int64_t i = 0; i < n; ++i) pairs[i] = {x[i], i};
  const auto before = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // (a strict total order: the same num entries, in the same order, as a partial sort; the
  // selection in linear time and a sort of the num chosen beat partial_sort's heap, 2.4x at
  // n = 512, num = 65)
  if (num < n) std::nth_element(pairs, pairs + num, pairs + n, before);
  std::sort(pairs, pairs + num, before);
  for (int64_t j = 0; j < num; ++j) {
    const bool finite = pairs[j].first > -std::numeric_limits<T>::infinity();
    val[j] = pairs[j].first;
    idx[j] = finite ? pairs[j].second : int64_t(-1);
  }
}

}  // namespace moe_router_cpu
