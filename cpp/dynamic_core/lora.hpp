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

#include "detmath.hpp"
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
      ent = (free_mass * detmath::log(Z) - F) / Z / u.log_params;
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

// Lanes of T as 32-byte vector values (GCC vector extension: each lane's + and * is the scalar
// IEEE operation, and FMA contraction is off, so a lane computes exactly what a scalar loop
// would); K of them hold 8 lanes (2 for double, 1 for float). Used only inside always-inlined
// code, never passed across a call.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <class T>
struct Lanes {
  typedef T v __attribute__((vector_size(32)));
  static constexpr size_t N = 32 / sizeof(T);  // lanes in one vector
  static constexpr size_t K = 8 / N;           // vectors in 8 lanes
};
template <class T>
using W = typename Lanes<T>::v;

template <class T>
[[gnu::always_inline]] inline W<T> ld(const T* p) {
  W<T> x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
template <class T>
[[gnu::always_inline]] inline void st(T* p, const W<T>& x) {
  __builtin_memcpy(p, &x, sizeof x);
}

// For 8 floats: even and odd lanes of a and b within each 128-bit half, (a0 a2 b0 b2 | a4 a6 b4
// b6) and (a1 a3 b1 b3 | a5 a7 b5 b7) (macros: a function returning a vector would change the
// baseline build's ABI).
#define DC_SH_EV(a, b) __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14)
#define DC_SH_OD(a, b) __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15)

// out[g] = sum_i x[i] * M[g * d + i] for G rows of M, each dot product in 8 fixed lanes (lane l
// takes i = l mod 8 over the whole blocks of 8, from zero), then the tree
// ((0+1)+(2+3))+((4+5)+(6+7)), then the tail in order. G rows run side by side in separate
// accumulators (for the instruction-level parallelism); each one's order is the same as alone.
template <class T, size_t G, size_t R = 1>
[[gnu::always_inline]] inline void lane_dots(const T* x, const T* M, T* out, size_t d, size_t xs = 0,
                                             size_t os = 0) {
  // R rows of x (stride xs) against the same G rows of M, into out (row stride os)
  constexpr size_t N = Lanes<T>::N, K = Lanes<T>::K;
  W<T> c[R][G][K];
  for (size_t rr = 0; rr < R; ++rr)
    for (size_t g = 0; g < G; ++g)
      for (size_t k = 0; k < K; ++k) c[rr][g][k] = W<T>{};
  size_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (size_t k = 0; k < K; ++k) {
      W<T> xv[R];
      for (size_t rr = 0; rr < R; ++rr) xv[rr] = ld(x + rr * xs + i + k * N);
      for (size_t g = 0; g < G; ++g) {
        const W<T> mv = ld(M + g * d + i + k * N);
        for (size_t rr = 0; rr < R; ++rr) c[rr][g][k] = c[rr][g][k] + xv[rr] * mv;
      }
    }
  for (size_t rr = 0; rr < R; ++rr) {
    const T* xr = x + rr * xs;
    T tot[G];
    if constexpr (G % 4 == 0) {
      // four trees side by side, level by level: lanes paired by shuffles, each sum the same
      // IEEE addition of the same two values as in the scalar tree
      auto tree4 = [&](size_t g) {
        const auto& cc = c[rr];
        if constexpr (N == 8) {  // float: cc[g][0] holds lanes 0..7 of row g
          // pairs within each 128-bit half: rows a, b -> (a01 a23 b01 b23 | a45 a67 b45 b67)
          const W<T> ab = DC_SH_EV(cc[g][0], cc[g + 1][0]) + DC_SH_OD(cc[g][0], cc[g + 1][0]);
          const W<T> cd = DC_SH_EV(cc[g + 2][0], cc[g + 3][0]) + DC_SH_OD(cc[g + 2][0], cc[g + 3][0]);
          // -> (a0123 b0123 c0123 d0123 | a4567 b4567 c4567 d4567)
          const W<T> q = DC_SH_EV(ab, cd) + DC_SH_OD(ab, cd);
          // low half + high half: the four totals
          const auto t = __builtin_shufflevector(q, q, 0, 1, 2, 3) + __builtin_shufflevector(q, q, 4, 5, 6, 7);
          for (size_t k = 0; k < 4; ++k) tot[g + k] = t[k];
        } else {  // double: cc[g][0] lanes 0..3, cc[g][1] lanes 4..7 of row g
          W<T> pr[4];
          for (size_t k = 0; k < 4; ++k)  // (01 45 | 23 67)
            pr[k] = __builtin_shufflevector(cc[g + k][0], cc[g + k][1], 0, 4, 2, 6) +
                    __builtin_shufflevector(cc[g + k][0], cc[g + k][1], 1, 5, 3, 7);
          // rows a, b: (a0123 a4567 | b0123 b4567)
          const W<T> ab = __builtin_shufflevector(pr[0], pr[1], 0, 1, 4, 5) +
                          __builtin_shufflevector(pr[0], pr[1], 2, 3, 6, 7);
          const W<T> cd = __builtin_shufflevector(pr[2], pr[3], 0, 1, 4, 5) +
                          __builtin_shufflevector(pr[2], pr[3], 2, 3, 6, 7);
          // (a c | b d) totals: 0123 + 4567
          const W<T> t = __builtin_shufflevector(ab, cd, 0, 4, 2, 6) + __builtin_shufflevector(ab, cd, 1, 5, 3, 7);
          tot[g] = t[0];
          tot[g + 1] = t[2];
          tot[g + 2] = t[1];
          tot[g + 3] = t[3];
        }
      };
      for (size_t g = 0; g < G; g += 4) tree4(g);
    } else {
      for (size_t g = 0; g < G; ++g) {
        T a[8];
        for (size_t k = 0; k < K; ++k)
          for (size_t l = 0; l < N; ++l) a[k * N + l] = c[rr][g][k][l];
        tot[g] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      }
    }
    for (size_t g = 0; g < G; ++g) {
      T sum = tot[g];
      for (size_t q = i; q < d; ++q) sum = sum + xr[q] * M[g * d + q];
      out[rr * os + g] = sum;
    }
  }
}

// u[n, j] = sum_i x[n, i] * M_n[j, i]: each row times its (rank, dim) matrix, M_n = M + n * ms
// (ms = rank * dim: each agent's own matrix; 0: one matrix shared by every row). Every dot
// product is lane_dots' (8 fixed lanes, a fixed tree, then the tail in order): a row's values
// depend only on that row and its matrix, not on where the row sits or how many there are.
template <class T>
[[gnu::always_inline]] inline void rd_dot_body(const T* x, const T* M, T* u, size_t n, size_t r, size_t d,
                                               size_t ms) {
  size_t a = 0;
  if constexpr (Lanes<T>::K == 1) {
    // float, one M for every row: two rows at a time against four rows of M (each M vector
    // loaded once for both rows), each output's order unchanged
    if (ms == 0)
      for (; a + 2 <= n; a += 2) {
        const T* xa = x + a * d;
        T* ua = u + a * r;
        size_t j = 0;
        for (; j + 4 <= r; j += 4) lane_dots<T, 4, 2>(xa, M + j * d, ua + j, d, d, r);
        for (; j < r; ++j) lane_dots<T, 1, 2>(xa, M + j * d, ua + j, d, d, r);
      }
  }
  for (; a < n; ++a) {
    const T* xa = x + a * d;
    const T* Ma = M + a * ms;
    T* ua = u + a * r;
    constexpr size_t G = 8 / Lanes<T>::K;  // rows side by side: 8 accumulators (4 for double, 8 for float)
    size_t j = 0;
    for (; j + G <= r; j += G) lane_dots<T, G>(xa, Ma + j * d, ua + j, d);
    for (; j + 4 <= r; j += 4) lane_dots<T, 4>(xa, Ma + j * d, ua + j, d);
    for (; j < r; ++j) lane_dots<T, 1>(xa, Ma + j * d, ua + j, d);
  }
}

// out[n, i] = sum_j y[n, j] * M_n[j, i], rank by rank in order from the first product (M_n as
// in rd_dot_body). The columns go in chunks of 32 held in four vectors; each element's order is
// the same.
template <class T>
[[gnu::always_inline]] inline void r_rows_body(const T* y, const T* M, T* out, size_t n, size_t r, size_t d,
                                               size_t ms) {
  for (size_t a = 0; a < n; ++a) {
    T* o = out + a * d;
    const T* ya = y + a * r;
    const T* Ma = M + a * ms;
    constexpr size_t N = Lanes<T>::N, C = 32 / N;  // 32 columns: C vectors
    size_t i0 = 0;
    for (; i0 + 32 <= d; i0 += 32) {
      W<T> acc[C];
      const T y0 = ya[0];
      for (size_t c = 0; c < C; ++c) acc[c] = y0 * ld(Ma + i0 + c * N);
      for (size_t j = 1; j < r; ++j) {
        const T yj = ya[j];
        const T* row = Ma + j * d + i0;
        for (size_t c = 0; c < C; ++c) acc[c] = acc[c] + yj * ld(row + c * N);
      }
      for (size_t c = 0; c < C; ++c) st(o + i0 + c * N, acc[c]);
    }
    for (; i0 + N <= d; i0 += N) {
      W<T> acc = ya[0] * ld(Ma + i0);
      for (size_t j = 1; j < r; ++j) acc = acc + ya[j] * ld(Ma + j * d + i0);
      st(o + i0, acc);
    }
    if (i0 < d) {
      for (size_t i = i0; i < d; ++i) o[i] = ya[0] * Ma[i];
      for (size_t j = 1; j < r; ++j) {
        const T yj = ya[j];
        const T* row = Ma + j * d;
        for (size_t i = i0; i < d; ++i) o[i] = o[i] + yj * row[i];
      }
    }
  }
}

// Rd: rd_dot (in = x (n, d), out (n, r)); otherwise r_rows (in = y (n, r), out (n, d)).
template <class T, bool Rd>
[[gnu::always_inline]] inline void product_body(const T* in, const T* M, T* out, size_t n, size_t r, size_t d,
                                                size_t ms) {
  if constexpr (Rd)
    rd_dot_body(in, M, out, n, r, d, ms);
  else
    r_rows_body(in, M, out, n, r, d, ms);
}

// out[p, q] = sum_a X[a, p] * Y[a, q] over the rows a of X (n, P) and Y (n, Q), for p in
// [p0, p1): the rows in blocks of XTY_BLOCK (the last one shorter), each block's sum over its
// rows in order (starting from its first product), the block sums added in order to a zeroed
// sum. Any split of p among threads gives the same bits.
inline constexpr size_t XTY_BLOCK = 32;

// Block [b, e) into out rows p .. p + G, columns [q0, q0 + N) (one vector).
template <class T, size_t G>
[[gnu::always_inline]] inline void xty_tile(const T* X, const T* Y, T* out, size_t P, size_t Q, size_t b, size_t e,
                                            size_t p, size_t q0) {
  W<T> c[G];
  const W<T> y0 = ld(Y + b * Q + q0);
  for (size_t g = 0; g < G; ++g) c[g] = X[b * P + p + g] * y0;
  for (size_t a = b + 1; a < e; ++a) {
    const W<T> ya = ld(Y + a * Q + q0);
    const T* xa = X + a * P + p;
    for (size_t g = 0; g < G; ++g) c[g] = c[g] + xa[g] * ya;
  }
  for (size_t g = 0; g < G; ++g) {
    T* o = out + (p + g) * Q + q0;
    st(o, ld(o) + c[g]);
  }
}

template <class T>
[[gnu::always_inline]] inline void xty_body(const T* X, const T* Y, T* out, size_t n, size_t P, size_t Q,
                                            size_t p0, size_t p1) {
  for (size_t p = p0; p < p1; ++p)
    for (size_t q = 0; q < Q; ++q) out[p * Q + q] = 0;
  constexpr size_t N = Lanes<T>::N;
  const size_t qv = Q - Q % N;
  for (size_t b = 0; b < n; b += XTY_BLOCK) {
    const size_t e = std::min(n, b + XTY_BLOCK);
    for (size_t q0 = 0; q0 < qv; q0 += N) {
      size_t p = p0;
      for (; p + 4 <= p1; p += 4) xty_tile<T, 4>(X, Y, out, P, Q, b, e, p, q0);
      for (; p < p1; ++p) xty_tile<T, 1>(X, Y, out, P, Q, b, e, p, q0);
    }
    for (size_t p = p0; p < p1 && qv < Q; ++p) {
      T part[N];
      const T x0 = X[b * P + p];
      for (size_t q = qv; q < Q; ++q) part[q - qv] = x0 * Y[b * Q + q];
      for (size_t a = b + 1; a < e; ++a) {
        const T xa = X[a * P + p];
        for (size_t q = qv; q < Q; ++q) part[q - qv] = part[q - qv] + xa * Y[a * Q + q];
      }
      for (size_t q = qv; q < Q; ++q) out[p * Q + q] = out[p * Q + q] + part[q - qv];
    }
  }
}
#undef DC_SH_EV
#undef DC_SH_OD
#pragma GCC diagnostic pop

#if DC_X86_DISPATCH
template <class T, bool Rd>
[[gnu::target(DC_ISA_V3)]] void product_v3(const T* in, const T* M, T* out, size_t n, size_t r, size_t d,
                                           size_t ms) {
  product_body<T, Rd>(in, M, out, n, r, d, ms);
}

template <class T>
[[gnu::target(DC_ISA_V3)]] void xty_v3(const T* X, const T* Y, T* out, size_t n, size_t P, size_t Q, size_t p0,
                                       size_t p1) {
  xty_body(X, Y, out, n, P, Q, p0, p1);
}
#endif

template <class T, bool Rd>
void product(const T* in, const T* M, T* out, size_t n, size_t r, size_t d, size_t ms) {
#if DC_X86_DISPATCH
  if (kernel_isa() >= 3) return product_v3<T, Rd>(in, M, out, n, r, d, ms);
#endif
  product_body<T, Rd>(in, M, out, n, r, d, ms);
}
}  // namespace detail

// u[n, j] = sum_i x[n, i] M_n[j, i] with M_n = M + n * ms: ms = r * d for a stacked (n, r, d)
// M (each row its own matrix), 0 for one (r, d) matrix shared by every row.
template <class T>
void rd_dot(const T* x, const T* M, T* u, size_t n, size_t r, size_t d, size_t ms) {
  detail::product<T, true>(x, M, u, n, r, d, ms);
}

// out[n, i] = sum_j y[n, j] M_n[j, i], M_n as in rd_dot.
template <class T>
void r_rows(const T* y, const T* M, T* out, size_t n, size_t r, size_t d, size_t ms) {
  detail::product<T, false>(y, M, out, n, r, d, ms);
}

// X^T Y over n rows, output rows [p0, p1) of out (P, Q) (see detail::xty_body for the order).
template <class T>
void xty(const T* X, const T* Y, T* out, size_t n, size_t P, size_t Q, size_t p0, size_t p1) {
#if DC_X86_DISPATCH
  if (kernel_isa() >= 3) return detail::xty_v3(X, Y, out, n, P, Q, p0, p1);
#endif
  detail::xty_body(X, Y, out, n, P, Q, p0, p1);
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
