// Exponentially weighted recurrences in time order: the sequential updates the DSI experts need
// (python/dynamic_core/learning/dsi/_scan.py and dsi.hpp).
//
// Each value is the recurrence's own arithmetic in its own order (FMA contraction is off), so a
// batch split anywhere gives the same bits as the whole.
#pragma once
#include <cstddef>

namespace dynamic_core::ew {

// One step of y[t] = r * y[t-1] + x[t].
inline double step(double y, double r, double x) { return r * y + x; }

// West's exponentially weighted mean and variance (pandas' ewm(adjust=False)) of k series side
// by side (x is (n, k) row-major), giving the moments in force *before* each row:
//   mean_before[t] = mean, var_before[t] = var
//   delta = x[t] - mean
//   mean = (1 - a) * mean + a * x[t]
//   var  = (1 - a) * var + ((1 - a) * a * delta) * delta
// mean and var hold the k carried values on entry and on return.
inline void moments(const double* x, size_t n, size_t k, double a, double* mean, double* var, double* mean_before,
                    double* var_before) {
  const double r = 1.0 - a;
  const double w = r * a;
  for (size_t t = 0; t < n; ++t) {
    const double* xt = x + t * k;
    double* mb = mean_before + t * k;
    double* vb = var_before + t * k;
    for (size_t c = 0; c < k; ++c) {
      const double m = mean[c];
      mb[c] = m;
      vb[c] = var[c];
      const double delta = xt[c] - m;
      mean[c] = step(m, r, a * xt[c]);
      var[c] = step(var[c], r, (w * delta) * delta);
    }
  }
}

}  // namespace dynamic_core::ew
