// DynamicLoRA per-parameter update, fused: one pass over a stacked layer's parameters.
//
// What python/dynamic_core/learning/lora/layer.py (DynamicLoRALayer._update_chunk_numpy) does in
// about fifteen numpy passes per matrix, done here in one: the gradient step, the phase of each
// parameter, the phase-based decay toward the initial value, the slot's free entropy (from
// line sums of the SCREENED activity) and whether all of the slot's new values are finite. The
// parameter arithmetic is the numpy reference's, operation for operation in the same order and
// precision (FMA contraction is off), so the parameters and phases are bit-identical to it; the
// entropy is float64 sums in a fixed order (numpy's pairwise sums round differently in the last
// bits).
//
// Layout: a matrix of a stacked layer is (slots, rank, dim), rank-major (A is held transposed).
// Per slot s, row j, column i:
//   v = dense*c + sum_k (R_k[j]*c) * C_k[i]    (the step, in the reference's order; c = lr*strength)
//   v = v + P                                   (P alone when there is no step)
//   phase = A: col[i] > thr/m[j]   B: m[j] > thr/col[i]   (or the row is pinned)
//   v = v + (P0 - v) * (phase ? dec_screened : dec_free)
// with m the rank-line activity trace, col the input (A) or output (B) line trace and thr the
// slot's screening threshold. Slots are independent: any split of [s0, s1) among threads gives
// the same bits.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernel.hpp"

namespace dynamic_core::lora {

// One rank-one term of a step, L (x) R per slot: rank-side factor (slots, rank), dim-side
// factor (slots, dim).
template <class T>
struct Term {
  const T* rank;
  const T* dim;
};

// One matrix (A^T or B) of a stacked layer.
template <class T>
struct Matrix {
  const T* P = nullptr;      // current values (slots, rank, dim)
  const T* P0 = nullptr;     // initial values
  T* out = nullptr;          // updated values (may not alias P)
  uint8_t* phase = nullptr;  // 1 = SCREENED, written
  const T* dense = nullptr;  // dense step (slots, rank, dim) or null
  std::vector<Term<T>> terms;
  const double* col = nullptr;      // line trace along dim (slots, dim): act_in for A, act_out for B
  const double* log_col = nullptr;  // log(max(col, tiny)), for the entropy
};

// The layer-wide inputs and the entropy outputs.
template <class T>
struct Update {
  size_t rank = 0, dim = 0;
  const T* c = nullptr;               // step scale per slot
  const double* mid = nullptr;        // rank-line trace (slots, rank)
  const double* log_mid = nullptr;    // log(max(mid, tiny))
  const double* threshold = nullptr;  // screening threshold per slot
  const uint8_t* pinned = nullptr;    // (slots, rank) or null: pinned rows are SCREENED
  T dec_screened = 0, dec_free = 0;
  double log_params = 0.0;    // log(2 * rank * dim)
  double* entropy = nullptr;  // out (slots,): free entropy, clipped to [0, 1]
  double* total = nullptr;    // out (slots,): total activity Z
  uint8_t* finite = nullptr;  // out (slots,) or null: 1 when every updated parameter is finite
};

namespace detail {

// The unsigned integer of T's width, and the exponent field's bits as 1 when all of them are set
// (v is NaN or infinite), else 0: branch-free, so the loops that use it vectorise.
template <class T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
template <class T>
[[gnu::always_inline]] inline Bits<T> nonfinite_bits(T v) {
  constexpr Bits<T> exp = static_cast<Bits<T>>(sizeof(T) == 8 ? 0x7ff0000000000000ull : 0x7f800000ull);
  return static_cast<Bits<T>>((std::bit_cast<Bits<T>>(v) & exp) == exp);
}

template <class T>
struct Scratch {
  std::vector<T> rc;
  std::vector<double> thr_col, scr_dim, f, sum_rank_a, sum_dim_a, sum_rank_b, sum_dim_b;
  Scratch(size_t nt, size_t r, size_t d)
      : rc(nt), thr_col(d), scr_dim(d), f(d), sum_rank_a(r), sum_dim_a(d), sum_rank_b(r), sum_dim_b(d) {}
};

// One matrix of slot s. Fills sum_rank[j] = m[j] * (sum col - sum_i phase[j,i] col[i]) and
// sum_dim[i] = col[i] * (sum m - sum_j m[j] phase[j,i]) (the FREE activity by line); returns
// sum col. `finite` is cleared when an updated parameter is NaN or infinite.
template <class T, bool IsA>
[[gnu::always_inline]] inline double update_one(const Update<T>& u, const Matrix<T>& mx, size_t s, Scratch<T>& w,
                                                double* sum_rank, double* sum_dim, bool& finite) {
  const size_t r = u.rank, d = u.dim, nt = mx.terms.size();
  double* f = w.f.data();
  double* scr_dim = w.scr_dim.data();
  const T cs = u.c[s];
  const double thr = u.threshold[s];
  const double* m = u.mid + s * r;
  const double* col = mx.col + s * d;
  double sum_col = 0.0, sum_m = 0.0;
  for (size_t i = 0; i < d; ++i) sum_col += col[i];
  for (size_t j = 0; j < r; ++j) sum_m += m[j];
  if constexpr (!IsA)
    for (size_t i = 0; i < d; ++i) w.thr_col[i] = thr / col[i];
  for (size_t i = 0; i < d; ++i) scr_dim[i] = 0.0;
  // set when an updated value's exponent bits are all ones (NaN or infinite): an integer OR,
  // folded into the loop that writes the values
  Bits<T> nonfin = 0;
  for (size_t j = 0; j < r; ++j) {
    const size_t row = (s * r + j) * d;
    const T* P = mx.P + row;
    const T* P0 = mx.P0 + row;
    T* out = mx.out + row;
    uint8_t* ph = mx.phase + row;
    const bool pin = u.pinned != nullptr && u.pinned[s * r + j] != 0;
    const double mj = m[j];
    // the phase of the row, as 1.0 (SCREENED) / 0.0
    if (pin) {
      for (size_t i = 0; i < d; ++i) f[i] = 1.0;
    } else if constexpr (IsA) {
      const double thr_row = thr / mj;
      for (size_t i = 0; i < d; ++i) f[i] = col[i] > thr_row ? 1.0 : 0.0;
    } else {
      for (size_t i = 0; i < d; ++i) f[i] = mj > w.thr_col[i] ? 1.0 : 0.0;
    }
    // the step
    for (size_t k = 0; k < nt; ++k) w.rc[k] = mx.terms[k].rank[s * r + j] * cs;
    if (mx.dense != nullptr) {
      const T* D = mx.dense + row;
      for (size_t i = 0; i < d; ++i) out[i] = D[i] * cs;
    }
    for (size_t k = 0; k < nt; ++k) {
      const T rk = w.rc[k];
      const T* C = mx.terms[k].dim + s * d;
      if (k == 0 && mx.dense == nullptr)
        for (size_t i = 0; i < d; ++i) out[i] = rk * C[i];
      else
        for (size_t i = 0; i < d; ++i) out[i] = out[i] + rk * C[i];
    }
    // + P, then the decay toward the initial value
    const T ds = u.dec_screened, df = u.dec_free;
    if (mx.dense != nullptr || nt > 0) {
      for (size_t i = 0; i < d; ++i) {
        const T v = out[i] + P[i];
        const T o = v + (P0[i] - v) * (f[i] != 0.0 ? ds : df);
        out[i] = o;
        nonfin |= nonfinite_bits(o);
      }
    } else {
      for (size_t i = 0; i < d; ++i) {
        const T v = P[i];
        const T o = v + (P0[i] - v) * (f[i] != 0.0 ? ds : df);
        out[i] = o;
        nonfin |= nonfinite_bits(o);
      }
    }
    for (size_t i = 0; i < d; ++i) ph[i] = static_cast<uint8_t>(static_cast<int32_t>(f[i]));
    // screened activity: along the row in 8 fixed lanes (then a fixed tree), down the column
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= d; i += 8)
      for (size_t l = 0; l < 8; ++l) acc[l] += f[i + l] * col[i + l];
    for (; i < d; ++i) acc[0] += f[i] * col[i];
    const double scr_row = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (size_t q = 0; q < d; ++q) scr_dim[q] += mj * f[q];
    sum_rank[j] = mj * (sum_col - scr_row);
  }
  for (size_t i = 0; i < d; ++i) sum_dim[i] = col[i] * (sum_m - scr_dim[i]);
  finite = finite && nonfin == 0;
  return sum_col;
}

inline double dot(const double* a, const double* b, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Slots [s0, s1): A, then B, then the slot's entropy. With p the activity normalised over the
// slot's parameters (A[i, j]: a[i] m[j], B[j, k]: m[j] o[k]), the free entropy is
// -sum_FREE p log p / log(#params) = (free_mass * log Z - F) / Z / log(#params), from line sums
// only (log of a product is a sum of logs); a slot without activity (Z = 0) counts as uniform:
// its free fraction.
template <class T>
[[gnu::always_inline]] inline void update_slots(const Update<T>& u, const Matrix<T>& ma, const Matrix<T>& mb,
                                                size_t s0, size_t s1) {
  const size_t r = u.rank, d = u.dim;
  Scratch<T> w(std::max(ma.terms.size(), mb.terms.size()), r, d);
  for (size_t s = s0; s < s1; ++s) {
    bool finite = true;
    const double sum_a = update_one<T, true>(u, ma, s, w, w.sum_rank_a.data(), w.sum_dim_a.data(), finite);
    const double sum_o = update_one<T, false>(u, mb, s, w, w.sum_rank_b.data(), w.sum_dim_b.data(), finite);
    if (u.finite != nullptr) u.finite[s] = finite;
    const double* m = u.mid + s * r;
    const double* lm = u.log_mid + s * r;
    double sum_m = 0.0;
    for (size_t j = 0; j < r; ++j) sum_m += m[j];
    const double Z = sum_a * sum_m + sum_m * sum_o;
    double ent;
    if (Z > 0.0) {
      const double F = dot(ma.log_col + s * d, w.sum_dim_a.data(), d) + dot(lm, w.sum_rank_a.data(), r) +
                       dot(lm, w.sum_rank_b.data(), r) + dot(mb.log_col + s * d, w.sum_dim_b.data(), d);
      double free_mass = 0.0;
      for (size_t i = 0; i < d; ++i) free_mass += w.sum_dim_a[i];
      double free_b = 0.0;
      for (size_t j = 0; j < r; ++j) free_b += w.sum_rank_b[j];
      free_mass += free_b;
      ent = (free_mass * std::log(Z) - F) / Z / u.log_params;
    } else {
      size_t free = 0;
      for (size_t q = 0; q < r * d; ++q) free += (ma.phase[s * r * d + q] == 0) + (mb.phase[s * r * d + q] == 0);
      ent = static_cast<double>(free) / static_cast<double>(2 * r * d);
    }
    u.entropy[s] = ent < 0.0 ? 0.0 : (ent > 1.0 ? 1.0 : ent);
    u.total[s] = Z;
  }
}

// The kernels are also compiled for x86-64-v3 (AVX2) and follow the engine's instruction-set
// choice (kernel_isa, set_kernel_isa). Without FMA contraction or reassociation both builds give
// the same bits; only the speed differs.
#if DC_X86_DISPATCH
template <class T>
[[gnu::target(DC_ISA_V3)]] void update_slots_v3(const Update<T>& u, const Matrix<T>& ma, const Matrix<T>& mb,
                                                       size_t s0, size_t s1) {
  update_slots(u, ma, mb, s0, s1);
}
#endif

}  // namespace detail

// Updates slots [s0, s1) of a stacked layer: A (ma), B (mb) and each slot's entropy.
template <class T>
void update(const Update<T>& u, const Matrix<T>& ma, const Matrix<T>& mb, size_t s0, size_t s1) {
#if DC_X86_DISPATCH
  if (kernel_isa() >= 3) return detail::update_slots_v3(u, ma, mb, s0, s1);
#endif
  detail::update_slots(u, ma, mb, s0, s1);
}

namespace detail {
// u[n, j] = sum_i x[n, i] * M[n, j, i]: each agent's (rank, dim) matrix times its row; the dot
// products run in 8 fixed lanes, then a fixed tree, then the tail in order.
template <class T>
[[gnu::always_inline]] inline void rd_dot_body(const T* x, const T* M, T* u, size_t n, size_t r, size_t d) {
  for (size_t a = 0; a < n; ++a) {
    const T* xa = x + a * d;
    for (size_t j = 0; j < r; ++j) {
      const T* row = M + (a * r + j) * d;
      T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      size_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (size_t l = 0; l < 8; ++l) acc[l] = acc[l] + xa[i + l] * row[i + l];
      T sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; i < d; ++i) sum = sum + xa[i] * row[i];
      u[a * r + j] = sum;
    }
  }
}

// out[n, i] = sum_j y[n, j] * M[n, j, i], rank by rank in order.
template <class T>
[[gnu::always_inline]] inline void r_rows_body(const T* y, const T* M, T* out, size_t n, size_t r, size_t d) {
  for (size_t a = 0; a < n; ++a) {
    T* o = out + a * d;
    const T* ya = y + a * r;
    const T* Ma = M + a * r * d;
    for (size_t i = 0; i < d; ++i) o[i] = ya[0] * Ma[i];
    for (size_t j = 1; j < r; ++j) {
      const T yj = ya[j];
      const T* row = Ma + j * d;
      for (size_t i = 0; i < d; ++i) o[i] = o[i] + yj * row[i];
    }
  }
}

// Rd: rd_dot (in = x (n, d), out (n, r)); otherwise r_rows (in = y (n, r), out (n, d)).
template <class T, bool Rd>
[[gnu::always_inline]] inline void product_body(const T* in, const T* M, T* out, size_t n, size_t r, size_t d) {
  if constexpr (Rd)
    rd_dot_body(in, M, out, n, r, d);
  else
    r_rows_body(in, M, out, n, r, d);
}

#if DC_X86_DISPATCH
template <class T, bool Rd>
[[gnu::target(DC_ISA_V3)]] void product_v3(const T* in, const T* M, T* out, size_t n, size_t r, size_t d) {
  product_body<T, Rd>(in, M, out, n, r, d);
}
#endif

template <class T, bool Rd>
void product(const T* in, const T* M, T* out, size_t n, size_t r, size_t d) {
#if DC_X86_DISPATCH
  if (kernel_isa() >= 3) return product_v3<T, Rd>(in, M, out, n, r, d);
#endif
  product_body<T, Rd>(in, M, out, n, r, d);
}
}  // namespace detail

template <class T>
void rd_dot(const T* x, const T* M, T* u, size_t n, size_t r, size_t d) {
  detail::product<T, true>(x, M, u, n, r, d);
}

template <class T>
void r_rows(const T* y, const T* M, T* out, size_t n, size_t r, size_t d) {
  detail::product<T, false>(y, M, out, n, r, d);
}

// numpy's pairwise sum (add.reduce over a contiguous run): the same rounding.
inline double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double res = 0.0;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (size_t l = 0; l < 8; ++l) r[l] = a[l];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (size_t l = 0; l < 8; ++l) r[l] += a[i + l];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// One pass's activations folded into a layer's tick accumulators (numpy's record_interaction,
// the same operations in the same order). h, delta: (n, d); u: (n, r); w: weight per row (1 or
// 0; null = all 1). Stacked layer (slots == n): t_x[s] += w * |x[s]|, t_rms[s] += w * rms(u[s]),
// t_sig[s] += w * u[s]. Shared layer (one slot): t_x += sum over rows of (w / n) * |x| (rows in
// order), t_rms += the pairwise sum of (w / n) * rms, t_sig += sum of (w / n) * u.
template <class T>
void record(const T* h, const T* u, const T* delta, const double* w, size_t n, size_t r, size_t d, bool shared,
            double* t_in, double* t_mid, double* t_out, double* t_rms, double* t_sig) {
  std::vector<double> rms(n), sq(r);
  for (size_t a = 0; a < n; ++a) {
    const T* ua = u + a * r;
    for (size_t j = 0; j < r; ++j) sq[j] = static_cast<double>(ua[j]) * static_cast<double>(ua[j]);
    rms[a] = std::sqrt(pairwise_sum(sq.data(), r) / static_cast<double>(r));
  }
  auto ab = [](T v) { return static_cast<double>(std::fabs(v)); };
  if (shared) {
    const double nn = static_cast<double>(n);
    std::vector<double> wr(n);
    for (size_t a = 0; a < n; ++a) wr[a] = ((w != nullptr ? w[a] : 1.0) / nn) * rms[a];
    // numpy reduces (w / n) * x over rows into a zeroed sum, then adds it: same here
    auto colsum = [&](const T* x, size_t width, double* t, bool absval) {
      std::vector<double> acc(width, 0.0);
      for (size_t a = 0; a < n; ++a) {
        const double wn = (w != nullptr ? w[a] : 1.0) / nn;
        const T* xa = x + a * width;
        if (absval)
          for (size_t i = 0; i < width; ++i) acc[i] += wn * ab(xa[i]);
        else
          for (size_t i = 0; i < width; ++i) acc[i] += wn * static_cast<double>(xa[i]);
      }
      for (size_t i = 0; i < width; ++i) t[i] += acc[i];
    };
    colsum(h, d, t_in, true);
    colsum(u, r, t_mid, true);
    colsum(delta, d, t_out, true);
    t_rms[0] += pairwise_sum(wr.data(), n);
    colsum(u, r, t_sig, false);
    return;
  }
  for (size_t a = 0; a < n; ++a) {
    const T *ha = h + a * d, *ua = u + a * r, *da = delta + a * d;
    double *ti = t_in + a * d, *tm = t_mid + a * r, *to = t_out + a * d, *ts = t_sig + a * r;
    if (w == nullptr) {
      for (size_t i = 0; i < d; ++i) ti[i] += ab(ha[i]);
      for (size_t j = 0; j < r; ++j) tm[j] += ab(ua[j]);
      for (size_t i = 0; i < d; ++i) to[i] += ab(da[i]);
      t_rms[a] += rms[a];
      for (size_t j = 0; j < r; ++j) ts[j] += static_cast<double>(ua[j]);
    } else {
      const double wa = w[a];
      for (size_t i = 0; i < d; ++i) ti[i] += wa * ab(ha[i]);
      for (size_t j = 0; j < r; ++j) tm[j] += wa * ab(ua[j]);
      for (size_t i = 0; i < d; ++i) to[i] += wa * ab(da[i]);
      t_rms[a] += wa * rms[a];
      for (size_t j = 0; j < r; ++j) ts[j] += wa * static_cast<double>(ua[j]);
    }
  }
}

// A tick's accumulator folded into an activity trace: out = k * act + omk * (t / c[s]) (omk is
// 1 - k), row s of width w; t is zeroed for the next tick.
inline void fold(const double* act, double* t, double* out, const double* c, size_t n, size_t w, double k,
                 double omk) {
  for (size_t s = 0; s < n; ++s) {
    const double cs = c[s];
    for (size_t i = 0; i < w; ++i) {
      const size_t q = s * w + i;
      out[q] = k * act[q] + omk * (t[q] / cs);
      t[q] = 0.0;
    }
  }
}

}  // namespace dynamic_core::lora
