// DynamicLoRA per-parameter update, fused: one pass over a stacked layer's parameters.
//
// What python/dynamic_core/learning/lora/layer.py (DynamicLoRALayer._update_chunk_numpy) does in
// about fifteen numpy passes per matrix, done here in one: the gradient step, the phase of each
// parameter, the phase-based decay toward the initial value, and the line sums of the SCREENED
// activity that the entropy needs. The parameter arithmetic is the numpy reference's, operation
// for operation in the same order and precision (FMA contraction is off), so the parameters and
// phases are bit-identical to it; the activity sums are float64 sums in a fixed order (numpy's
// pairwise sums round differently in the last bits).
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
#include <cstddef>
#include <cstdint>
#include <vector>

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
  bool is_a = true;             // phase rule of A (input line vs rank line) or of B
  const double* col = nullptr;  // line trace along dim (slots, dim): act_in for A, act_out for B
  double* sum_rank = nullptr;   // out (slots, rank): m[j] * (sum col - sum_i phase[j,i] col[i])
  double* sum_dim = nullptr;    // out (slots, dim): col[i] * (sum m - sum_j m[j] phase[j,i])
};

// The layer-wide inputs.
template <class T>
struct Update {
  size_t rank = 0, dim = 0;
  const T* c = nullptr;               // step scale per slot
  const double* mid = nullptr;        // rank-line trace (slots, rank)
  const double* threshold = nullptr;  // screening threshold per slot
  const uint8_t* pinned = nullptr;    // (slots, rank) or null: pinned rows are SCREENED
  T dec_screened = 0, dec_free = 0;
};

namespace detail {

template <class T, bool IsA>
void update_rows(const Update<T>& u, const Matrix<T>& mx, size_t s0, size_t s1) {
  const size_t r = u.rank, d = u.dim, nt = mx.terms.size();
  std::vector<T> rc(nt);
  std::vector<double> thr_col(d), scr_dim(d), f(d);
  for (size_t s = s0; s < s1; ++s) {
    const T cs = u.c[s];
    const double thr = u.threshold[s];
    const double* m = u.mid + s * r;
    const double* col = mx.col + s * d;
    double sum_col = 0.0, sum_m = 0.0;
    for (size_t i = 0; i < d; ++i) sum_col += col[i];
    for (size_t j = 0; j < r; ++j) sum_m += m[j];
    if constexpr (!IsA)
      for (size_t i = 0; i < d; ++i) thr_col[i] = thr / col[i];
    for (size_t i = 0; i < d; ++i) scr_dim[i] = 0.0;
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
        for (size_t i = 0; i < d; ++i) f[i] = mj > thr_col[i] ? 1.0 : 0.0;
      }
      // the step
      for (size_t k = 0; k < nt; ++k) rc[k] = mx.terms[k].rank[s * r + j] * cs;
      if (mx.dense != nullptr) {
        const T* D = mx.dense + row;
        for (size_t i = 0; i < d; ++i) out[i] = D[i] * cs;
      }
      for (size_t k = 0; k < nt; ++k) {
        const T rk = rc[k];
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
          out[i] = v + (P0[i] - v) * (f[i] != 0.0 ? ds : df);
        }
      } else {
        for (size_t i = 0; i < d; ++i) {
          const T v = P[i];
          out[i] = v + (P0[i] - v) * (f[i] != 0.0 ? ds : df);
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
      mx.sum_rank[s * r + j] = mj * (sum_col - scr_row);
    }
    for (size_t i = 0; i < d; ++i) mx.sum_dim[s * d + i] = col[i] * (sum_m - scr_dim[i]);
  }
}

}  // namespace detail

// Updates slots [s0, s1) of one matrix.
template <class T>
void update_matrix(const Update<T>& u, const Matrix<T>& mx, size_t s0, size_t s1) {
  if (mx.is_a)
    detail::update_rows<T, true>(u, mx, s0, s1);
  else
    detail::update_rows<T, false>(u, mx, s0, s1);
}

}  // namespace dynamic_core::lora
