#include "kernel.hpp"

#include "population.hpp"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dynamic_core {

// The helpers below are always inlined; the ABI note about passing vectors does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 headers leave some results "undefined" on purpose (_mm512_undefined_pd),
// which -Wmaybe-uninitialized reports once inlined here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Kernels are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline, and picked
// at load time (kernel_isa; DC_X86_DISPATCH in kernel.hpp). Results are bit-identical across
// them: FMA contraction is off and every operation is the same IEEE operation in the same order.

namespace {

// The lane kernel over V lanes at a time (V a power of two dividing kWarpSize), written with
// vector types: the same operations in the same order as blend + lane_step in math.hpp (tests
// check bit equality), with every condition a 64-bit mask so that selects vectorise. Integer
// state is exact in doubles. The baseline build's kernel (sm_step_base); the x86-64-v3 and -v4
// ones are written with intrinsics below.
template <int V>
struct Lanes {
  typedef double d __attribute__((vector_size(V * 8)));
  typedef int64_t m __attribute__((vector_size(V * 8)));
  typedef int32_t i __attribute__((vector_size(V * 4)));
  typedef uint32_t u __attribute__((vector_size(V * 4)));
};

#define DC_AI inline __attribute__((always_inline))

template <int V>
DC_AI typename Lanes<V>::d ld(const double* p) {
  typename Lanes<V>::d x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
template <int V>
DC_AI void st(double* p, typename Lanes<V>::d x) {
  __builtin_memcpy(p, &x, sizeof x);
}
template <int V>
DC_AI typename Lanes<V>::d ldi(const int32_t* p) {
  typename Lanes<V>::i x;
  __builtin_memcpy(&x, p, sizeof x);
  return __builtin_convertvector(x, typename Lanes<V>::d);
}
template <int V>
DC_AI void sti(int32_t* p, typename Lanes<V>::d x) {
  const auto y = __builtin_convertvector(x, typename Lanes<V>::i);
  __builtin_memcpy(p, &y, sizeof y);
}
template <int V>
DC_AI typename Lanes<V>::d ldu(const uint32_t* p) {
  typename Lanes<V>::u x;
  __builtin_memcpy(&x, p, sizeof x);
  return __builtin_convertvector(x, typename Lanes<V>::d);
}
// p[k] += m[k] (m is 0 or 1), in 32-bit integers.
template <int V>
DC_AI void addu(uint32_t* p, typename Lanes<V>::m m) {
  typename Lanes<V>::u x;
  __builtin_memcpy(&x, p, sizeof x);
  x += __builtin_convertvector(m, typename Lanes<V>::u);
  __builtin_memcpy(p, &x, sizeof x);
}
// feat[idx[k]] for k < V (the indices read two at a time: fewer loads).
template <int V>
DC_AI typename Lanes<V>::d gather(const double* __restrict feat, const int32_t* __restrict idx) {
  static_assert(V % 2 == 0);
  typename Lanes<V>::d x;
  for (int k = 0; k < V; k += 2) {
    uint64_t q;
    __builtin_memcpy(&q, idx + k, sizeof q);
    x[k] = feat[static_cast<int32_t>(static_cast<uint32_t>(q))];
    x[k + 1] = feat[static_cast<int64_t>(q) >> 32];
  }
  return x;
}

template <int V>
DC_AI Summary sm_step_impl(const LaneView& v, int lanes, const double* __restrict feat, int32_t t, double ret,
                           int poison, uint64_t& updates, uint64_t& quarantined) {
  typedef typename Lanes<V>::d vd;
  typedef typename Lanes<V>::m vm;
  const double* __restrict w0 = v.w[0];
  const double* __restrict w1 = v.w[1];
  const double* __restrict w2 = v.w[2];
  const double* __restrict w3 = v.w[3];
  const double* __restrict w4 = v.w[4];
  const int32_t* __restrict f0 = v.fidx[0];
  const int32_t* __restrict f1 = v.fidx[1];
  const int32_t* __restrict f2 = v.fidx[2];
  const int32_t* __restrict f3 = v.fidx[3];
  const int32_t* __restrict f4 = v.fidx[4];
  const double* __restrict entry = v.entry;
  const double* __restrict cost = v.cost;
  const int32_t* __restrict lookback = v.lookback;
  const int32_t* __restrict long_short = v.long_short;
  const int32_t* __restrict active = v.active;
  double* __restrict s_score = v.score;
  double* __restrict s_equity = v.equity;
  double* __restrict s_entry_eq = v.entry_equity;
  double* __restrict s_peak = v.peak;
  double* __restrict s_max_dd = v.max_dd;
  double* __restrict s_ret_sum = v.ret_sum;
  double* __restrict s_ret_sq = v.ret_sq;
  const double* __restrict s_credit = v.credit;
  const int32_t* __restrict external = v.external;
  const double* __restrict ext_score = v.ext_score;
  const int has_external = v.has_external;
  const double* __restrict dsi = v.dsi;
  const int has_dsi = v.has_dsi;
  uint32_t* __restrict s_trades = v.trades;
  uint32_t* __restrict s_wins = v.wins;
  uint32_t* __restrict s_n_ret = v.n_ret;
  uint32_t* __restrict s_quar = v.quarantined;
  int32_t* __restrict s_pos = v.position;
  int32_t* __restrict s_action = v.action;

  alignas(64) double sw[kMaxSmLanes], sws[kMaxSmLanes], ss[kMaxSmLanes], ss2[kMaxSmLanes];
  vm vq = {}, vn = {}, vv0 = {}, vv1 = {}, vv2 = {}, vv3 = {}, vv4 = {}, vupd = {};
  const vd zero = {}, one = zero + 1.0, two = one + 1.0, neg1 = zero - 1.0;
  const vd tt = zero + static_cast<double>(t), vret = zero + ret;
  const vm m1 = vm{} + 1;
  for (int i = 0; i < lanes; i += V) {
    // blend (math.hpp): the weighted sum in feature order, then soft()
    vd x = ld<V>(w0 + i) * gather<V>(feat, f0 + i);
    x = x + ld<V>(w1 + i) * gather<V>(feat, f1 + i);
    x = x + ld<V>(w2 + i) * gather<V>(feat, f2 + i);
    x = x + ld<V>(w3 + i) * gather<V>(feat, f3 + i);
    x = x + ld<V>(w4 + i) * gather<V>(feat, f4 + i);
    if (has_dsi) {
      const vd dv = ld<V>(dsi + i);
      x = (dv != zero) ? x + dv : x;
    }
    vd score = x / (one + (x < zero ? -x : x));
    if (has_external) {
      const vm ext = ldi<V>(external + i) != zero;
      score = ext ? ld<V>(ext_score + i) : score;
    }
    if (static_cast<unsigned>(poison - i) < static_cast<unsigned>(V)) score[poison - i] = __builtin_nan("");

    // lane_step (math.hpp)
    const vm warm = tt >= ldi<V>(lookback + i);
    const vd ent = ld<V>(entry + i);
    const vd cst = ld<V>(cost + i);
    const vd ls = ldi<V>(long_short + i);
    const vm live = (ldi<V>(active + i) != zero) & (ldu<V>(s_quar + i) == zero);
    const vd prev = ldi<V>(s_pos + i);
    const vd eq0 = ld<V>(s_equity + i);
    const vd eeq0 = ld<V>(s_entry_eq + i);
    const vd peak0 = ld<V>(s_peak + i);
    const vd mdd0 = ld<V>(s_max_dd + i);
    const vd rs0 = ld<V>(s_ret_sum + i);
    const vd rq0 = ld<V>(s_ret_sq + i);
    const vd g = one + prev * vret;
    vd e = eq0 * g;
    vd pos = (score > ent) ? one : ((score < -ent) ? -ls : prev);
    pos = warm ? pos : zero;
    const vd d = (pos > prev) ? pos - prev : prev - pos;
    const vd c = cst * d;
    e = e - e * c;
    const vd r = g * (one - c) - one;
    const vm changed = pos != prev;
    const vm closing = (prev != zero) & changed;
    const vm opening = (pos != zero) & changed;
    const vm won = e > eeq0;
    const vd rs1 = warm ? rs0 + r : rs0;
    const vd rq1 = warm ? rq0 + r * r : rq0;
    const vd eeq1 = opening ? e : eeq0;
    const vd peak1 = e > peak0 ? e : peak0;
    const vd dd = (peak1 - e) / peak1;
    const vd mdd1 = dd > mdd0 ? dd : mdd0;
    const vd act = ((score >= kStrongAction) ? one : zero) + ((score >= kWeakAction) ? one : zero) -
                   ((score <= -kWeakAction) ? one : zero) - ((score <= -kStrongAction) ? one : zero);
    const vm ok = ((e - e) == zero) & ((score - score) == zero);
    const vm keep = live & ok;
    st<V>(s_score + i, keep ? score : ld<V>(s_score + i));
    st<V>(s_equity + i, keep ? e : eq0);
    st<V>(s_entry_eq + i, keep ? eeq1 : eeq0);
    st<V>(s_peak + i, keep ? peak1 : peak0);
    st<V>(s_max_dd + i, keep ? mdd1 : mdd0);
    st<V>(s_ret_sum + i, keep ? rs1 : rs0);
    st<V>(s_ret_sq + i, keep ? rq1 : rq0);
    const vm kw = keep & warm;
    addu<V>(s_n_ret + i, kw & m1);
    addu<V>(s_trades + i, keep & closing & m1);
    addu<V>(s_wins + i, keep & closing & won & m1);
    sti<V>(s_pos + i, keep ? pos : prev);
    sti<V>(s_action + i, keep ? act : ldi<V>(s_action + i));
    const vm fail = live & ~ok & m1;  // 0 -> 1: only live lanes (quarantined == 0) can fail
    addu<V>(s_quar + i, fail);
    vq += fail;
    const vd keep_dd = one - mdd1;
    const vd wgt = ((e < zero) ? zero : e) * ((keep_dd < zero) ? zero : keep_dd) * ld<V>(s_credit + i);
    st<V>(sw + i, kw ? wgt : zero);
    st<V>(sws + i, kw ? wgt * score : zero);
    st<V>(ss + i, kw ? score : zero);
    st<V>(ss2 + i, kw ? score * score : zero);
    vn += kw & m1;
    vv0 += kw & (act == -two) & m1;
    vv1 += kw & (act == neg1) & m1;
    vv2 += kw & (act == zero) & m1;
    vv3 += kw & (act == one) & m1;
    vv4 += kw & (act == two) & m1;
    vupd += live & m1;
  }
  uint32_t n = 0, v0 = 0, v1 = 0, v2 = 0, v3 = 0, v4 = 0, upd = 0;
  for (int k = 0; k < V; ++k) {
    n += static_cast<uint32_t>(vn[k]);
    v0 += static_cast<uint32_t>(vv0[k]);
    v1 += static_cast<uint32_t>(vv1[k]);
    v2 += static_cast<uint32_t>(vv2[k]);
    v3 += static_cast<uint32_t>(vv3[k]);
    v4 += static_cast<uint32_t>(vv4[k]);
    upd += static_cast<uint32_t>(vupd[k]);
    quarantined += static_cast<uint64_t>(vq[k]);
  }
  Summary total;
  summary_zero(total);
  for (int w = 0; w < lanes; w += kWarpSize) {  // warps in index order
    total.sum_w = total.sum_w + warp_tree(sw + w);
    total.sum_ws = total.sum_ws + warp_tree(sws + w);
    total.sum_s = total.sum_s + warp_tree(ss + w);
    total.sum_s2 = total.sum_s2 + warp_tree(ss2 + w);
  }
  total.n = n;
  total.votes[0] = v0;
  total.votes[1] = v1;
  total.votes[2] = v2;
  total.votes[3] = v3;
  total.votes[4] = v4;
  updates += upd;
  return total;
}

#if DC_X86_DISPATCH
// feat at the two indices packed in q (int32s, the first in the low half), as one vector.
DC_AI __m128d feat_pair(const double* __restrict feat, uint64_t q) {
  const int64_t lo = static_cast<int32_t>(static_cast<uint32_t>(q)), hi = static_cast<int64_t>(q) >> 32;
  return _mm_loadh_pd(_mm_load_sd(feat + lo), feat + hi);
}

// The counted lanes and the votes of a summary, from the lanes counted at or beyond each action
// threshold (the intrinsics kernels count those: ge_s within ge_w, le_s within le_w, and a
// counted score is finite, so ge_w and le_w are disjoint).
inline void set_votes(Summary& total, uint32_t n, uint32_t ge_s, uint32_t ge_w, uint32_t le_w, uint32_t le_s) {
  total.n = n;
  total.votes[0] = le_s;
  total.votes[1] = le_w - le_s;
  total.votes[2] = n - ge_w - le_w;
  total.votes[3] = ge_w - ge_s;
  total.votes[4] = ge_s;
}

#define DC_V4 __attribute__((target(DC_ISA_V4)))
#define DC_V4_AI DC_V4 inline __attribute__((always_inline))

// feat[idx[k]] for k < 8: scalar loads assembled into a vector (faster than vgatherdpd on the
// CPUs we measured). When no lane uses the feature (every index 0, the constant feature) that is
// feat[0] broadcast: the same values without the loads, so single-feature populations (a
// parameter sweep) skip most gathers.
DC_V4_AI __m512d gather8(const double* __restrict feat, const int32_t* __restrict idx) {
  // the indices two at a time (fewer loads: the load ports are the bottleneck here)
  uint64_t q[4];
  __builtin_memcpy(q, idx, sizeof q);
  if ((q[0] | q[1] | q[2] | q[3]) == 0) return _mm512_set1_pd(feat[0]);
  const __m128d a = feat_pair(feat, q[0]);
  const __m128d b = feat_pair(feat, q[1]);
  const __m128d c = feat_pair(feat, q[2]);
  const __m128d d = feat_pair(feat, q[3]);
  const __m256d lo = _mm256_insertf128_pd(_mm256_castpd128_pd256(a), b, 1);
  const __m256d hi = _mm256_insertf128_pd(_mm256_castpd128_pd256(c), d, 1);
  return _mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1);
}
DC_V4_AI __m256i ld8i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
DC_V4_AI __m256i ld8u(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
DC_V4_AI void st8(void* p, __m256i x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }
// The canonical tree of one warp, given as the pairwise sums of its first two steps: p02 = lanes
// 0-7 + lanes 16-23, p13 = lanes 8-15 + lanes 24-31 (stride 16). Then strides 8, 4, 2, 1, each
// step v[i] + v[i + stride], as warp_tree.
DC_V4_AI double warp_tree8(__m512d p02, __m512d p13) {
  const __m512d c = _mm512_add_pd(p02, p13);
  const __m256d d = _mm256_add_pd(_mm512_castpd512_pd256(c), _mm512_extractf64x4_pd(c, 1));
  const __m128d e = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  return _mm_cvtsd_f64(_mm_add_sd(e, _mm_unpackhi_pd(e, e)));
}

// Per-lane counts of the state pass, summed at the end.
struct Counts8 {
  __m256i n, ge_s, ge_w, le_w, le_s, live, fail;
};
// The four float sums of 8 lanes (0 for lanes that do not count).
struct Sums8 {
  __m512d w, ws, s, s2;
};

// lane_step for the 8 lanes at i, whose blended scores are at score_in + i, in two passes over
// the lanes (shorter dependency chains, so more lanes are in flight): this one everything but
// the peak and drawdown, leaving the new equity in te and the keep / keep-and-warm masks in tk /
// tkw; lane_dd8 the rest.
DC_V4_AI void lane_step8(const LaneView& v, const double* __restrict score_in, int i, __m256i vt, __m512d vret,
                         Counts8& cn, double* __restrict te, __mmask8* tk, __mmask8* tkw) {
  const __m512d one = _mm512_set1_pd(1.0);
  const __m256i izero = _mm256_setzero_si256(), ione = _mm256_set1_epi32(1);
  const __m512d score = _mm512_load_pd(score_in + i);
  const __mmask8 warm = _mm256_cmp_epi32_mask(ld8i(v.lookback + i), vt, _MM_CMPINT_LE);
  const __m512d ent = _mm512_loadu_pd(v.entry + i);
  const __m256i prev_i = ld8i(v.position + i);
  const __m256i quar = ld8u(v.quarantined + i);
  const __mmask8 live = _mm256_cmpneq_epi32_mask(ld8i(v.active + i), izero) & _mm256_cmpeq_epi32_mask(quar, izero);
  const __mmask8 up = _mm512_cmp_pd_mask(score, ent, _CMP_GT_OQ);
  const __mmask8 dn = _mm512_cmp_pd_mask(score, _mm512_xor_pd(ent, _mm512_set1_pd(-0.0)), _CMP_LT_OQ);
  __m256i pos_i = _mm256_mask_sub_epi32(prev_i, dn, izero, ld8i(v.long_short + i));
  pos_i = _mm256_mask_mov_epi32(pos_i, up, ione);
  pos_i = _mm256_maskz_mov_epi32(warm, pos_i);
  const __m512d g = _mm512_add_pd(one, _mm512_mul_pd(_mm512_cvtepi32_pd(prev_i), vret));
  const __m512d eq0 = _mm512_loadu_pd(v.equity + i);
  __m512d e = _mm512_mul_pd(eq0, g);
  // |pos - prev| is a small integer: exact in either domain
  const __m512d d = _mm512_cvtepi32_pd(_mm256_abs_epi32(_mm256_sub_epi32(pos_i, prev_i)));
  const __m512d c = _mm512_mul_pd(_mm512_loadu_pd(v.cost + i), d);
  e = _mm512_sub_pd(e, _mm512_mul_pd(e, c));
  const __m512d r = _mm512_sub_pd(_mm512_mul_pd(g, _mm512_sub_pd(one, c)), one);
  const __mmask8 changed = _mm256_cmpneq_epi32_mask(pos_i, prev_i);
  const __mmask8 closing = _mm256_mask_cmpneq_epi32_mask(changed, prev_i, izero);
  const __mmask8 opening = _mm256_mask_cmpneq_epi32_mask(changed, pos_i, izero);
  const __m512d eeq0 = _mm512_loadu_pd(v.entry_equity + i);
  const __mmask8 won = _mm512_cmp_pd_mask(e, eeq0, _CMP_GT_OQ);
  const __mmask8 ge_s = _mm512_cmp_pd_mask(score, _mm512_set1_pd(kStrongAction), _CMP_GE_OQ);
  const __mmask8 ge_w = _mm512_cmp_pd_mask(score, _mm512_set1_pd(kWeakAction), _CMP_GE_OQ);
  const __mmask8 le_w = _mm512_cmp_pd_mask(score, _mm512_set1_pd(-kWeakAction), _CMP_LE_OQ);
  const __mmask8 le_s = _mm512_cmp_pd_mask(score, _mm512_set1_pd(-kStrongAction), _CMP_LE_OQ);
  __m256i act = _mm256_maskz_mov_epi32(ge_s, ione);
  act = _mm256_mask_add_epi32(act, ge_w, act, ione);
  act = _mm256_mask_sub_epi32(act, le_w, act, ione);
  act = _mm256_mask_sub_epi32(act, le_s, act, ione);
  // finite: not NaN or +-inf (the scalar code's (x - x) == 0)
  const __mmask8 ok = static_cast<__mmask8>(~(_mm512_fpclass_pd_mask(e, 0x99) | _mm512_fpclass_pd_mask(score, 0x99)));
  const __mmask8 keep = live & ok;
  const __mmask8 kw = keep & warm;
  // The new state where kept, the old elsewhere (selects, then whole stores: cheaper than masked
  // stores).
  _mm512_storeu_pd(v.score + i, _mm512_mask_mov_pd(_mm512_loadu_pd(v.score + i), keep, score));
  _mm512_storeu_pd(v.equity + i, _mm512_mask_mov_pd(eq0, keep, e));
  _mm512_storeu_pd(v.entry_equity + i, _mm512_mask_mov_pd(eeq0, keep & opening, e));
  _mm512_store_pd(te + i, e);
  tk[i / 8] = keep;
  tkw[i / 8] = kw;
  const __m512d rs0 = _mm512_loadu_pd(v.ret_sum + i), rq0 = _mm512_loadu_pd(v.ret_sq + i);
  _mm512_storeu_pd(v.ret_sum + i, _mm512_mask_add_pd(rs0, kw, rs0, r));
  _mm512_storeu_pd(v.ret_sq + i, _mm512_mask_add_pd(rq0, kw, rq0, _mm512_mul_pd(r, r)));
  const __m256i nr0 = ld8u(v.n_ret + i), tr0 = ld8u(v.trades + i), wi0 = ld8u(v.wins + i);
  const __mmask8 kc = keep & closing;
  st8(v.n_ret + i, _mm256_mask_add_epi32(nr0, kw, nr0, ione));
  st8(v.trades + i, _mm256_mask_add_epi32(tr0, kc, tr0, ione));
  st8(v.wins + i, _mm256_mask_add_epi32(wi0, kc & won, wi0, ione));
  st8(v.position + i, _mm256_mask_mov_epi32(prev_i, keep, pos_i));
  st8(v.action + i, _mm256_mask_mov_epi32(ld8i(v.action + i), keep, act));
  const __mmask8 fail = live & static_cast<__mmask8>(~ok);  // quarantined is 0 on live lanes
  st8(v.quarantined + i, _mm256_mask_mov_epi32(quar, fail, ione));
  // Counts: votes follow from the threshold masks (ge_s within ge_w, le_s within le_w, and a
  // counted score is finite, so ge_w and le_w are disjoint).
  cn.n = _mm256_mask_add_epi32(cn.n, kw, cn.n, ione);
  cn.ge_s = _mm256_mask_add_epi32(cn.ge_s, kw & ge_s, cn.ge_s, ione);
  cn.ge_w = _mm256_mask_add_epi32(cn.ge_w, kw & ge_w, cn.ge_w, ione);
  cn.le_w = _mm256_mask_add_epi32(cn.le_w, kw & le_w, cn.le_w, ione);
  cn.le_s = _mm256_mask_add_epi32(cn.le_s, kw & le_s, cn.le_s, ione);
  cn.live = _mm256_mask_add_epi32(cn.live, live, cn.live, ione);
  cn.fail = _mm256_mask_add_epi32(cn.fail, fail, cn.fail, ione);
}

// Peak, drawdown and the consensus sums of the 8 lanes at i (second pass of lane_step8).
DC_V4_AI Sums8 lane_dd8(const LaneView& v, const double* __restrict score_in, int i, const double* __restrict te,
                        __mmask8 keep, __mmask8 kw) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d score = _mm512_load_pd(score_in + i);
  const __m512d e = _mm512_load_pd(te + i);
  const __m512d peak0 = _mm512_loadu_pd(v.peak + i);
  const __mmask8 higher = _mm512_cmp_pd_mask(e, peak0, _CMP_GT_OQ);
  const __m512d peak1 = _mm512_mask_mov_pd(peak0, higher, e);
  const __m512d dd = _mm512_div_pd(_mm512_sub_pd(peak1, e), peak1);
  const __m512d mdd0 = _mm512_loadu_pd(v.max_dd + i);
  const __mmask8 deeper = _mm512_cmp_pd_mask(dd, mdd0, _CMP_GT_OQ);
  const __m512d mdd1 = _mm512_mask_mov_pd(mdd0, deeper, dd);
  _mm512_storeu_pd(v.peak + i, _mm512_mask_mov_pd(peak0, keep & higher, e));
  _mm512_storeu_pd(v.max_dd + i, _mm512_mask_mov_pd(mdd0, keep & deeper, dd));
  // consensus weight: fitness(e, mdd1, credit)
  const __m512d e0 = _mm512_mask_mov_pd(e, _mm512_cmp_pd_mask(e, zero, _CMP_LT_OQ), zero);
  const __m512d k1 = _mm512_sub_pd(one, mdd1);
  const __m512d k0 = _mm512_mask_mov_pd(k1, _mm512_cmp_pd_mask(k1, zero, _CMP_LT_OQ), zero);
  const __m512d wgt = _mm512_mul_pd(_mm512_mul_pd(e0, k0), _mm512_loadu_pd(v.credit + i));
  return Sums8{_mm512_maskz_mov_pd(kw, wgt), _mm512_maskz_mov_pd(kw, _mm512_mul_pd(wgt, score)),
               _mm512_maskz_mov_pd(kw, score), _mm512_maskz_mov_pd(kw, _mm512_mul_pd(score, score))};
}

DC_V4_AI uint32_t hsum8(__m256i x) {
  const __m128i a = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  const __m128i b = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_add_epi32(b, _mm_shuffle_epi32(b, 0xb1))));
}

// The lane kernel with AVX-512 intrinsics, 8 lanes at a time: the operations of blend and
// lane_step in the same order, conditions as mask registers, state written with masked stores
// where the scalar code keeps the old value.
DC_V4 Summary sm_step_v4(const LaneView& view, int lanes, const double* __restrict feat, int32_t t, double ret,
                         int poison, uint64_t& updates, uint64_t& quarantined) {
  // A local copy: the compiler then knows no store through the lane arrays changes a pointer.
  const LaneView v = view;
  const double* __restrict w0 = v.w[0];
  const double* __restrict w1 = v.w[1];
  const double* __restrict w2 = v.w[2];
  const double* __restrict w3 = v.w[3];
  const double* __restrict w4 = v.w[4];
  const int32_t* __restrict f0 = v.fidx[0];
  const int32_t* __restrict f1 = v.fidx[1];
  const int32_t* __restrict f2 = v.fidx[2];
  const int32_t* __restrict f3 = v.fidx[3];
  const int32_t* __restrict f4 = v.fidx[4];
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d sign = _mm512_set1_pd(-0.0);
  const __m256i izero = _mm256_setzero_si256();

  // Blended scores first (independent iterations: the divisions overlap), then the state.
  alignas(64) double score_in[kMaxSmLanes];
  for (int i = 0; i < lanes; i += 8) {
    // blend: the weighted sum in feature order, then soft()
    __m512d x = _mm512_mul_pd(_mm512_loadu_pd(w0 + i), gather8(feat, f0 + i));
    x = _mm512_add_pd(x, _mm512_mul_pd(_mm512_loadu_pd(w1 + i), gather8(feat, f1 + i)));
    x = _mm512_add_pd(x, _mm512_mul_pd(_mm512_loadu_pd(w2 + i), gather8(feat, f2 + i)));
    x = _mm512_add_pd(x, _mm512_mul_pd(_mm512_loadu_pd(w3 + i), gather8(feat, f3 + i)));
    x = _mm512_add_pd(x, _mm512_mul_pd(_mm512_loadu_pd(w4 + i), gather8(feat, f4 + i)));
    if (v.has_dsi) {
      const __m512d dv = _mm512_loadu_pd(v.dsi + i);
      x = _mm512_mask_add_pd(x, _mm512_cmp_pd_mask(dv, zero, _CMP_NEQ_UQ), x, dv);
    }
    const __m512d ax = _mm512_mask_xor_pd(x, _mm512_cmp_pd_mask(x, zero, _CMP_LT_OQ), x, sign);
    _mm512_store_pd(score_in + i, _mm512_div_pd(x, _mm512_add_pd(one, ax)));
  }
  if (v.has_external)
    for (int i = 0; i < lanes; i += 8)
      _mm512_store_pd(score_in + i, _mm512_mask_loadu_pd(_mm512_load_pd(score_in + i),
                                                         _mm256_cmpneq_epi32_mask(ld8i(v.external + i), izero),
                                                         v.ext_score + i));
  if (poison >= 0 && poison < lanes) score_in[poison] = __builtin_nan("");

  // The state, 8 lanes at a time; then peak, drawdown and sums one warp (4 x 8 lanes) at a time,
  // its sums through the canonical tree.
  const __m256i vt = _mm256_set1_epi32(t);
  const __m512d vret = _mm512_set1_pd(ret);
  Counts8 cn{izero, izero, izero, izero, izero, izero, izero};
  Summary total;
  summary_zero(total);
  alignas(64) double te[kMaxSmLanes];
  __mmask8 tk[kMaxSmLanes / 8], tkw[kMaxSmLanes / 8];
  for (int i = 0; i < lanes; i += 8) lane_step8(v, score_in, i, vt, vret, cn, te, tk, tkw);
  for (int i = 0; i < lanes; i += kWarpSize) {
    const Sums8 a0 = lane_dd8(v, score_in, i, te, tk[i / 8], tkw[i / 8]);
    const Sums8 a1 = lane_dd8(v, score_in, i + 8, te, tk[i / 8 + 1], tkw[i / 8 + 1]);
    const Sums8 a2 = lane_dd8(v, score_in, i + 16, te, tk[i / 8 + 2], tkw[i / 8 + 2]);
    const __m512d w02 = _mm512_add_pd(a0.w, a2.w), ws02 = _mm512_add_pd(a0.ws, a2.ws);
    const __m512d s02 = _mm512_add_pd(a0.s, a2.s), s202 = _mm512_add_pd(a0.s2, a2.s2);
    const Sums8 a3 = lane_dd8(v, score_in, i + 24, te, tk[i / 8 + 3], tkw[i / 8 + 3]);
    total.sum_w = total.sum_w + warp_tree8(w02, _mm512_add_pd(a1.w, a3.w));
    total.sum_ws = total.sum_ws + warp_tree8(ws02, _mm512_add_pd(a1.ws, a3.ws));
    total.sum_s = total.sum_s + warp_tree8(s02, _mm512_add_pd(a1.s, a3.s));
    total.sum_s2 = total.sum_s2 + warp_tree8(s202, _mm512_add_pd(a1.s2, a3.s2));
  }
  set_votes(total, hsum8(cn.n), hsum8(cn.ge_s), hsum8(cn.ge_w), hsum8(cn.le_w), hsum8(cn.le_s));
  updates += hsum8(cn.live);
  quarantined += hsum8(cn.fail);
  return total;
}

// ---- the AVX2 lane kernel (x86-64-v3) ----------------------------------------------------
// The AVX-512 kernel's three passes with AVX2 intrinsics, 4 lanes at a time. AVX2 has no mask
// registers: conditions are 64-bit lane masks (all ones or zero, as the compare instructions
// give them), selects are blends, and the integer state is converted to doubles on load (it is
// exact there) and back on store.
#define DC_V3 __attribute__((target(DC_ISA_V3)))
#define DC_V3_AI DC_V3 inline __attribute__((always_inline))

// feat[idx[k]] for k < 4, as gather8 does it (feat[0] broadcast when every index is 0).
DC_V3_AI __m256d gather4(const double* __restrict feat, const int32_t* __restrict idx) {
  uint64_t q[2];
  __builtin_memcpy(q, idx, sizeof q);
  if ((q[0] | q[1]) == 0) return _mm256_broadcast_sd(feat);
  const __m128d a = feat_pair(feat, q[0]);
  const __m128d b = feat_pair(feat, q[1]);
  return _mm256_insertf128_pd(_mm256_castpd128_pd256(a), b, 1);
}
DC_V3_AI __m128i ld4i(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
DC_V3_AI void st4i(void* p, __m128i x) { _mm_storeu_si128(static_cast<__m128i*>(p), x); }
// 4 int32 (or 0/1 uint32) values as doubles (exact).
DC_V3_AI __m256d ld4d(const void* p) { return _mm256_cvtepi32_pd(ld4i(p)); }
// 64-bit lane masks -> 32-bit lane masks (the low half of each).
DC_V3_AI __m128i narrow(__m256d m) {
  const __m128 lo = _mm_castpd_ps(_mm256_castpd256_pd128(m)), hi = _mm_castpd_ps(_mm256_extractf128_pd(m, 1));
  return _mm_castps_si128(_mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
}
// p[k] += 1 where m (64-bit lane masks) is set, in 32-bit integers.
DC_V3_AI void incr4(uint32_t* p, __m256d m) { st4i(p, _mm_sub_epi32(ld4i(p), narrow(m))); }
// Counter of set 64-bit lane masks.
DC_V3_AI __m256i count4(__m256i c, __m256d m) { return _mm256_sub_epi64(c, _mm256_castpd_si256(m)); }
DC_V3_AI uint32_t hsum4(__m256i x) {
  const __m128i a = _mm_add_epi64(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  return static_cast<uint32_t>(_mm_cvtsi128_si64(_mm_add_epi64(a, _mm_unpackhi_epi64(a, a))));
}
// The canonical tree of one warp held as 8 vectors of 4 lanes (strides 16, 8, 4, 2, 1).
DC_V3_AI double warp_tree4(const double* __restrict p) {
  const __m256d c0 = _mm256_add_pd(_mm256_load_pd(p), _mm256_load_pd(p + 16));
  const __m256d c1 = _mm256_add_pd(_mm256_load_pd(p + 4), _mm256_load_pd(p + 20));
  const __m256d c2 = _mm256_add_pd(_mm256_load_pd(p + 8), _mm256_load_pd(p + 24));
  const __m256d c3 = _mm256_add_pd(_mm256_load_pd(p + 12), _mm256_load_pd(p + 28));
  const __m256d d = _mm256_add_pd(_mm256_add_pd(c0, c2), _mm256_add_pd(c1, c3));
  const __m128d e = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  return _mm_cvtsd_f64(_mm_add_sd(e, _mm_unpackhi_pd(e, e)));
}

struct Counts4 {
  __m256i n, ge_s, ge_w, le_w, le_s, live, fail;
};

// lane_step for the 4 lanes at i (first state pass; lane_dd4 is the second), as lane_step8.
DC_V3_AI void lane_step4(const LaneView& v, const double* __restrict score_in, int i, __m256d vt, __m256d vret,
                         Counts4& cn, double* __restrict te, __m256d* __restrict tk, __m256d* __restrict tkw) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0), sign = _mm256_set1_pd(-0.0);
  const __m256d score = _mm256_load_pd(score_in + i);
  const __m256d warm = _mm256_cmp_pd(vt, ld4d(v.lookback + i), _CMP_GE_OQ);
  const __m256d ent = _mm256_loadu_pd(v.entry + i);
  const __m256d prev = ld4d(v.position + i);
  const __m128i quar = ld4i(v.quarantined + i);
  const __m256d live = _mm256_and_pd(_mm256_cmp_pd(ld4d(v.active + i), zero, _CMP_NEQ_OQ),
                                     _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_cmpeq_epi32(quar, _mm_setzero_si128()))));
  const __m256d up = _mm256_cmp_pd(score, ent, _CMP_GT_OQ);
  const __m256d dn = _mm256_cmp_pd(score, _mm256_xor_pd(ent, sign), _CMP_LT_OQ);
  // (0 - long_short, not -long_short: no negative zero; the integer kernels give +0 too)
  __m256d pos = _mm256_blendv_pd(prev, _mm256_sub_pd(zero, ld4d(v.long_short + i)), dn);
  pos = _mm256_and_pd(_mm256_blendv_pd(pos, one, up), warm);
  const __m256d g = _mm256_add_pd(one, _mm256_mul_pd(prev, vret));
  const __m256d eq0 = _mm256_loadu_pd(v.equity + i);
  __m256d e = _mm256_mul_pd(eq0, g);
  // |pos - prev|, a small integer (exact)
  const __m256d d = _mm256_andnot_pd(sign, _mm256_sub_pd(pos, prev));
  const __m256d c = _mm256_mul_pd(_mm256_loadu_pd(v.cost + i), d);
  e = _mm256_sub_pd(e, _mm256_mul_pd(e, c));
  const __m256d r = _mm256_sub_pd(_mm256_mul_pd(g, _mm256_sub_pd(one, c)), one);
  const __m256d changed = _mm256_cmp_pd(pos, prev, _CMP_NEQ_OQ);
  const __m256d closing = _mm256_and_pd(changed, _mm256_cmp_pd(prev, zero, _CMP_NEQ_OQ));
  const __m256d opening = _mm256_and_pd(changed, _mm256_cmp_pd(pos, zero, _CMP_NEQ_OQ));
  const __m256d eeq0 = _mm256_loadu_pd(v.entry_equity + i);
  const __m256d won = _mm256_cmp_pd(e, eeq0, _CMP_GT_OQ);
  const __m256d ge_s = _mm256_cmp_pd(score, _mm256_set1_pd(kStrongAction), _CMP_GE_OQ);
  const __m256d ge_w = _mm256_cmp_pd(score, _mm256_set1_pd(kWeakAction), _CMP_GE_OQ);
  const __m256d le_w = _mm256_cmp_pd(score, _mm256_set1_pd(-kWeakAction), _CMP_LE_OQ);
  const __m256d le_s = _mm256_cmp_pd(score, _mm256_set1_pd(-kStrongAction), _CMP_LE_OQ);
  const __m256d act = _mm256_sub_pd(_mm256_add_pd(_mm256_and_pd(ge_s, one), _mm256_and_pd(ge_w, one)),
                                    _mm256_add_pd(_mm256_and_pd(le_w, one), _mm256_and_pd(le_s, one)));
  // finite: (x - x) == 0, as the scalar code
  const __m256d ok = _mm256_and_pd(_mm256_cmp_pd(_mm256_sub_pd(e, e), zero, _CMP_EQ_OQ),
                                   _mm256_cmp_pd(_mm256_sub_pd(score, score), zero, _CMP_EQ_OQ));
  const __m256d keep = _mm256_and_pd(live, ok);
  const __m256d kw = _mm256_and_pd(keep, warm);
  _mm256_storeu_pd(v.score + i, _mm256_blendv_pd(_mm256_loadu_pd(v.score + i), score, keep));
  _mm256_storeu_pd(v.equity + i, _mm256_blendv_pd(eq0, e, keep));
  _mm256_storeu_pd(v.entry_equity + i, _mm256_blendv_pd(eeq0, e, _mm256_and_pd(keep, opening)));
  _mm256_store_pd(te + i, e);
  tk[i / 4] = keep;
  tkw[i / 4] = kw;
  const __m256d rs0 = _mm256_loadu_pd(v.ret_sum + i), rq0 = _mm256_loadu_pd(v.ret_sq + i);
  _mm256_storeu_pd(v.ret_sum + i, _mm256_blendv_pd(rs0, _mm256_add_pd(rs0, r), kw));
  _mm256_storeu_pd(v.ret_sq + i, _mm256_blendv_pd(rq0, _mm256_add_pd(rq0, _mm256_mul_pd(r, r)), kw));
  const __m256d kc = _mm256_and_pd(keep, closing);
  incr4(v.n_ret + i, kw);
  incr4(v.trades + i, kc);
  incr4(v.wins + i, _mm256_and_pd(kc, won));
  st4i(v.position + i, _mm256_cvtpd_epi32(_mm256_blendv_pd(prev, pos, keep)));
  st4i(v.action + i, _mm256_cvtpd_epi32(_mm256_blendv_pd(ld4d(v.action + i), act, keep)));
  const __m256d fail = _mm256_andnot_pd(ok, live);  // quarantined is 0 on live lanes
  st4i(v.quarantined + i, _mm_sub_epi32(quar, narrow(fail)));
  // Counts: votes follow from the threshold masks, as in lane_step8.
  cn.n = count4(cn.n, kw);
  cn.ge_s = count4(cn.ge_s, _mm256_and_pd(kw, ge_s));
  cn.ge_w = count4(cn.ge_w, _mm256_and_pd(kw, ge_w));
  cn.le_w = count4(cn.le_w, _mm256_and_pd(kw, le_w));
  cn.le_s = count4(cn.le_s, _mm256_and_pd(kw, le_s));
  cn.live = count4(cn.live, live);
  cn.fail = count4(cn.fail, fail);
}

// Peak, drawdown and the consensus terms of the 4 lanes at i (second state pass), the terms
// stored at sums[k] + j.
DC_V3_AI void lane_dd4(const LaneView& v, const double* __restrict score_in, int i, const double* __restrict te,
                       __m256d keep, __m256d kw, double* const* sums, int j) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  const __m256d score = _mm256_load_pd(score_in + i);
  const __m256d e = _mm256_load_pd(te + i);
  const __m256d peak0 = _mm256_loadu_pd(v.peak + i);
  const __m256d higher = _mm256_cmp_pd(e, peak0, _CMP_GT_OQ);
  const __m256d peak1 = _mm256_blendv_pd(peak0, e, higher);
  const __m256d dd = _mm256_div_pd(_mm256_sub_pd(peak1, e), peak1);
  const __m256d mdd0 = _mm256_loadu_pd(v.max_dd + i);
  const __m256d deeper = _mm256_cmp_pd(dd, mdd0, _CMP_GT_OQ);
  const __m256d mdd1 = _mm256_blendv_pd(mdd0, dd, deeper);
  _mm256_storeu_pd(v.peak + i, _mm256_blendv_pd(peak0, e, _mm256_and_pd(keep, higher)));
  _mm256_storeu_pd(v.max_dd + i, _mm256_blendv_pd(mdd0, dd, _mm256_and_pd(keep, deeper)));
  // consensus weight: fitness(e, mdd1, credit)
  const __m256d e0 = _mm256_blendv_pd(e, zero, _mm256_cmp_pd(e, zero, _CMP_LT_OQ));
  const __m256d k1 = _mm256_sub_pd(one, mdd1);
  const __m256d k0 = _mm256_blendv_pd(k1, zero, _mm256_cmp_pd(k1, zero, _CMP_LT_OQ));
  const __m256d wgt = _mm256_mul_pd(_mm256_mul_pd(e0, k0), _mm256_loadu_pd(v.credit + i));
  _mm256_store_pd(sums[0] + j, _mm256_and_pd(kw, wgt));
  _mm256_store_pd(sums[1] + j, _mm256_and_pd(kw, _mm256_mul_pd(wgt, score)));
  _mm256_store_pd(sums[2] + j, _mm256_and_pd(kw, score));
  _mm256_store_pd(sums[3] + j, _mm256_and_pd(kw, _mm256_mul_pd(score, score)));
}

// The lane kernel with AVX2 intrinsics, 4 lanes at a time: blended scores first, then the two
// state passes, then each warp's sums through the canonical tree.
DC_V3 Summary sm_step_v3(const LaneView& view, int lanes, const double* __restrict feat, int32_t t, double ret,
                         int poison, uint64_t& updates, uint64_t& quarantined) {
  const LaneView v = view;  // a local copy, as in sm_step_v4
  const double* __restrict w0 = v.w[0];
  const double* __restrict w1 = v.w[1];
  const double* __restrict w2 = v.w[2];
  const double* __restrict w3 = v.w[3];
  const double* __restrict w4 = v.w[4];
  const int32_t* __restrict f0 = v.fidx[0];
  const int32_t* __restrict f1 = v.fidx[1];
  const int32_t* __restrict f2 = v.fidx[2];
  const int32_t* __restrict f3 = v.fidx[3];
  const int32_t* __restrict f4 = v.fidx[4];
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0), sign = _mm256_set1_pd(-0.0);

  alignas(64) double score_in[kMaxSmLanes];
  for (int i = 0; i < lanes; i += 4) {
    __m256d x = _mm256_mul_pd(_mm256_loadu_pd(w0 + i), gather4(feat, f0 + i));
    x = _mm256_add_pd(x, _mm256_mul_pd(_mm256_loadu_pd(w1 + i), gather4(feat, f1 + i)));
    x = _mm256_add_pd(x, _mm256_mul_pd(_mm256_loadu_pd(w2 + i), gather4(feat, f2 + i)));
    x = _mm256_add_pd(x, _mm256_mul_pd(_mm256_loadu_pd(w3 + i), gather4(feat, f3 + i)));
    x = _mm256_add_pd(x, _mm256_mul_pd(_mm256_loadu_pd(w4 + i), gather4(feat, f4 + i)));
    if (v.has_dsi) {
      const __m256d dv = _mm256_loadu_pd(v.dsi + i);
      x = _mm256_blendv_pd(x, _mm256_add_pd(x, dv), _mm256_cmp_pd(dv, zero, _CMP_NEQ_UQ));
    }
    const __m256d ax = _mm256_blendv_pd(x, _mm256_xor_pd(x, sign), _mm256_cmp_pd(x, zero, _CMP_LT_OQ));
    _mm256_store_pd(score_in + i, _mm256_div_pd(x, _mm256_add_pd(one, ax)));
  }
  if (v.has_external)
    for (int i = 0; i < lanes; i += 4) {
      const __m256d ext = _mm256_castsi256_pd(
          _mm256_cvtepi32_epi64(_mm_xor_si128(_mm_cmpeq_epi32(ld4i(v.external + i), _mm_setzero_si128()),
                                              _mm_set1_epi32(-1))));
      _mm256_store_pd(score_in + i, _mm256_blendv_pd(_mm256_load_pd(score_in + i), _mm256_loadu_pd(v.ext_score + i), ext));
    }
  if (poison >= 0 && poison < lanes) score_in[poison] = __builtin_nan("");

  const __m256d vt = _mm256_set1_pd(static_cast<double>(t));
  const __m256d vret = _mm256_set1_pd(ret);
  const __m256i izero = _mm256_setzero_si256();
  Counts4 cn{izero, izero, izero, izero, izero, izero, izero};
  alignas(64) double te[kMaxSmLanes];
  __m256d tk[kMaxSmLanes / 4], tkw[kMaxSmLanes / 4];
  for (int i = 0; i < lanes; i += 4) lane_step4(v, score_in, i, vt, vret, cn, te, tk, tkw);
  alignas(64) double sw[kWarpSize], sws[kWarpSize], ss[kWarpSize], ss2[kWarpSize];
  double* const sums[4] = {sw, sws, ss, ss2};
  Summary total;
  summary_zero(total);
  for (int w = 0; w < lanes; w += kWarpSize) {  // warps in index order
    for (int j = 0; j < kWarpSize; j += 4)
      lane_dd4(v, score_in, w + j, te, tk[(w + j) / 4], tkw[(w + j) / 4], sums, j);
    total.sum_w = total.sum_w + warp_tree4(sums[0]);
    total.sum_ws = total.sum_ws + warp_tree4(sums[1]);
    total.sum_s = total.sum_s + warp_tree4(sums[2]);
    total.sum_s2 = total.sum_s2 + warp_tree4(sums[3]);
  }
  set_votes(total, hsum4(cn.n), hsum4(cn.ge_s), hsum4(cn.ge_w), hsum4(cn.le_w), hsum4(cn.le_s));
  updates += hsum4(cn.live);
  quarantined += hsum4(cn.fail);
  return total;
}

#endif
}  // namespace

// ---- the bank: indicator updates and the feature pass ------------------------------------

namespace {

// The steady form of a bank kind is entered at the bar from which every indicator of the kind
// takes its steady branch (see Bank::resize_values); from then on these loops replace the
// structs' update(), with the same operations in the same order.
template <int V>
DC_AI void steady_indicators(Bank& b, const Bar& bar, double c, double prev, int64_t t) {
  typedef typename Lanes<V>::d vd;
  BankValues& v = b.val;
  BankSteady& s = b.st;
  const vd zero = {}, vc = zero + c;
  // The arrays are padded to whole vectors (kBankPad) with harmless constants.
  // Indicators [0, kBankPad * steady_chunks) of each kind are in the steady form.
  auto count = [&](int kind) { return kBankPad * b.steady_chunks[kind]; };
  {  // Ema::update, count >= n (k = 1 only for period 1: the close itself)
    double* __restrict val = v.ema.data();
    const double* __restrict k = s.ema_k.data();
    const int n = count(kBankEma);
    const vd one = zero + 1.0;
    for (int i = 0; i < n; i += V) {
      const vd x = ld<V>(val + i), kk = ld<V>(k + i);
      st<V>(val + i, kk == one ? vc : ((vc - x) * kk) + x);
    }
  }
  {  // Rsi::update, count > n; the difference is the same for every RSI
    double* __restrict gain = s.rsi_gain.data();
    double* __restrict loss = s.rsi_loss.data();
    double* __restrict val = v.rsi.data();
    const double* __restrict nm1 = s.rsi_nm1.data();
    const double* __restrict nn = s.rsi_n.data();
    const int n = count(kBankRsi);
    const double d = c - prev;
    const vd vd_ = zero + d, hundred = zero + 100.0;
    const bool down = d < 0;
    for (int i = 0; i < n; i += V) {
      const vd m = ld<V>(nm1 + i), q = ld<V>(nn + i);
      vd l = ld<V>(loss + i) * m, g = ld<V>(gain + i) * m;
      if (down) l = l - vd_; else g = g + vd_;
      l = l / q;
      g = g / q;
      st<V>(loss + i, l);
      st<V>(gain + i, g);
      const vd tot = g + l;
      st<V>(val + i, tot != zero ? hundred * (g / tot) : zero);
    }
  }
  if (count(kBankAtr)) {  // Atr::update, count > n; the true range is the same for every ATR
    double* __restrict val = v.atr.data();
    const double* __restrict nm1 = s.atr_nm1.data();
    const double* __restrict nn = s.atr_n.data();
    const int n = count(kBankAtr);
    const vd tr = zero + true_range(bar.high, bar.low, prev);
    for (int i = 0; i < n; i += V) st<V>(val + i, ((ld<V>(val + i) * ld<V>(nm1 + i)) + tr) / ld<V>(nn + i));
  }
  {  // Macd::update past the signal seed
    double* __restrict fast = s.macd_fast.data();
    double* __restrict slow = s.macd_slow.data();
    double* __restrict sig = s.macd_signal.data();
    double* __restrict hist = v.macd_hist.data();
    const double* __restrict kf = s.macd_kf.data();
    const double* __restrict ks = s.macd_ks.data();
    const double* __restrict ksig = s.macd_ksig.data();
    const int n = count(kBankMacd);
    for (int i = 0; i < n; i += V) {
      const vd sl0 = ld<V>(slow + i), fa0 = ld<V>(fast + i), sg0 = ld<V>(sig + i);
      const vd sl = ((vc - sl0) * ld<V>(ks + i)) + sl0;
      const vd fa = ((vc - fa0) * ld<V>(kf + i)) + fa0;
      const vd m = fa - sl;
      const vd sg = ((m - sg0) * ld<V>(ksig + i)) + sg0;
      st<V>(slow + i, sl);
      st<V>(fast + i, fa);
      st<V>(sig + i, sg);
      st<V>(hist + i, m - sg);
    }
  }
  {  // Ew::update, count >= n
    double* __restrict mean = v.ew_mean.data();
    double* __restrict var = v.ew_var.data();
    const double* __restrict alpha = s.ew_alpha.data();
    const double* __restrict om = s.ew_om.data();
    const int n = count(kBankEw);
    for (int i = 0; i < n; i += V) {
      const vd m0 = ld<V>(mean + i), a = ld<V>(alpha + i);
      const vd d = vc - m0;
      st<V>(mean + i, m0 + a * d);
      st<V>(var + i, ld<V>(om + i) * (ld<V>(var + i) + a * d * d));
    }
  }
  {  // Roc::update, count >= n: the close n bars ago
    double* __restrict val = v.roc.data();
    const int32_t* __restrict rn = s.roc_n.data();
    const double* __restrict closes = b.closes.data();
    const int64_t mask = b.closes_mask;
    const int n = count(kBankRoc);
    const vd one = zero + 1.0, hundred = zero + 100.0;
    for (int i = 0; i < n; i += V) {
      vd old;
      for (int k = 0; k < V; ++k) old[k] = closes[(t - rn[i + k]) & mask];
      st<V>(val + i, old != zero ? ((vc / old) - one) * hundred : zero);
    }
  }
}

// The feature pass: the warm features of each kind (they come first, see Bank::feat_from), the
// indicator outputs gathered straight into vectors, every condition a select (a division by a
// zero normaliser is computed and discarded). Same operations in the same order as the
// *_feature functions of math.hpp; tests compare the two bit for bit. Features that are not
// warm stay 0.
template <int V>
DC_AI typename Lanes<V>::d vsoft(typename Lanes<V>::d x) {
  const typename Lanes<V>::d zero = {};
  return x / ((zero + 1.0) + (x < zero ? -x : x));
}
// Stores the V features of chunk i of a kind with n features at out (the part below n).
template <int V>
DC_AI void put(double* out, int i, int n, typename Lanes<V>::d x) {
  if (i + V <= n) {
    st<V>(out + i, x);
  } else {
    alignas(64) double tmp[V];
    st<V>(tmp, x);
    for (int k = 0; i + k < n; ++k) out[i + k] = tmp[k];
  }
}

template <int V>
DC_AI void features(Bank& b, double close, double* feat) {
  typedef typename Lanes<V>::d vd;
  const BankValues& v = b.val;
  const BankIndex& x = b.pidx;
  const vd zero = {}, one = zero + 1.0;
  // The warm features of each kind (the first feat_warm); the others stay 0.
  {  // soft((ema_fast - ema_slow) / atr), 0 when atr == 0
    const double* __restrict ema = v.ema.data();
    const double* __restrict atr = v.atr.data();
    const int32_t* __restrict tf = x.trend_fast.data();
    const int32_t* __restrict ts = x.trend_slow.data();
    const int32_t* __restrict ta = x.trend_atr.data();
    double* out = feat + b.trend_base;
    const int n = b.feat_warm[0];
    for (int i = 0; i < n; i += V) {
      const vd a = gather<V>(ema, tf + i) - gather<V>(ema, ts + i);
      const vd d = gather<V>(atr, ta + i);
      const vd f = vsoft<V>(a / d);
      put<V>(out, i, n, d != zero ? f : zero);
    }
  }
  {  // (rsi - 50) / 50
    const double* __restrict val = v.rsi.data();
    const int32_t* __restrict r = x.rsi.data();
    double* out = feat + b.rsi_base;
    const int n = b.feat_warm[1];
    const vd fifty = zero + 50.0;
    for (int i = 0; i < n; i += V) put<V>(out, i, n, (gather<V>(val, r + i) - fifty) / fifty);
  }
  {  // soft(hist / atr), 0 when atr == 0
    const double* __restrict hist = v.macd_hist.data();
    const double* __restrict atr = v.atr.data();
    const int32_t* __restrict m = x.macd_m.data();
    const int32_t* __restrict ma = x.macd_atr.data();
    double* out = feat + b.macd_base;
    const int n = b.feat_warm[2];
    for (int i = 0; i < n; i += V) {
      const vd d = gather<V>(atr, ma + i);
      const vd f = vsoft<V>(gather<V>(hist, m + i) / d);
      put<V>(out, i, n, d != zero ? f : zero);
    }
  }
  {  // soft((close - mean) / (2 sd)), sd = sqrt(var) when var > 0, 0 when sd == 0
    const double* __restrict mean = v.ew_mean.data();
    const double* __restrict var = v.ew_var.data();
    const int32_t* __restrict e = x.bb.data();
    double* out = feat + b.bb_base;
    const int n = b.feat_warm[3];
    const vd c = zero + close, two = one + one;
    for (int i = 0; i < n; i += V) {
      vd sd = gather<V>(var, e + i);
      for (int k = 0; k < V; ++k) sd[k] = sd[k] > 0.0 ? DC_SQRT(sd[k]) : 0.0;
      const vd f = vsoft<V>((c - gather<V>(mean, e + i)) / (two * sd));
      put<V>(out, i, n, sd != zero ? f : zero);
    }
  }
  {  // soft(roc)
    const double* __restrict val = v.roc.data();
    const int32_t* __restrict r = x.mom.data();
    double* out = feat + b.mom_base;
    const int n = b.feat_warm[4];
    for (int i = 0; i < n; i += V) put<V>(out, i, n, vsoft<V>(gather<V>(val, r + i)));
  }
}

template <int V>
DC_AI void bank_update_impl(Bank& b, const Bar& bar, double* feat) {
  const double c = bar.close;
  const double prev = b.prev_close;
  b.ret = b.nbars > 0 ? bar_return(c, b.prev_close) : 0.0;
  b.prev_close = c;
  const int64_t t = b.nbars++;
  BankValues& v = b.val;
  for (int k = 0; k < kBankKinds; ++k) {
    const int32_t chunks = static_cast<int32_t>(b.chunk_at[k].size());
    while (b.steady_chunks[k] < chunks && t >= b.chunk_at[k][b.steady_chunks[k]])
      b.enter_steady_chunk(k, b.steady_chunks[k]++);
    b.steady[k] = b.steady_chunks[k] == chunks;
  }
  // Indicators still warming up: the structs.
  auto from = [&](int kind) { return static_cast<size_t>(kBankPad) * b.steady_chunks[kind]; };
  {
    for (size_t i = from(kBankEma); i < b.emas.size(); ++i) {
      v.ema_ok[i] = static_cast<double>(b.emas[i].update(c));
      v.ema[i] = b.emas[i].value;
    }
    for (size_t i = from(kBankRsi); i < b.rsis.size(); ++i) {
      v.rsi_ok[i] = static_cast<double>(b.rsis[i].update(c));
      v.rsi[i] = b.rsis[i].value;
    }
    for (size_t i = from(kBankAtr); i < b.atrs.size(); ++i) {
      v.atr_ok[i] = static_cast<double>(b.atrs[i].update(bar.high, bar.low, c));
      v.atr[i] = b.atrs[i].value;
    }
    for (size_t i = from(kBankMacd); i < b.macds.size(); ++i) {
      v.macd_ok[i] = static_cast<double>(b.macds[i].update(c));
      v.macd_hist[i] = b.macds[i].hist;
    }
    for (size_t i = from(kBankEw); i < b.ews.size(); ++i) {
      v.ew_ok[i] = static_cast<double>(b.ews[i].update(c));
      v.ew_mean[i] = b.ews[i].mean;
      v.ew_var[i] = b.ews[i].var;
    }
    for (size_t i = from(kBankRoc); i < b.rocs.size(); ++i) {
      v.roc_ok[i] = static_cast<double>(b.rocs[i].update(c, b.roc_buf.data() + b.roc_offset[i]));
      v.roc[i] = b.rocs[i].value;
    }
  }
  steady_indicators<V>(b, bar, c, prev, t);
  if (!b.closes.empty()) b.closes[static_cast<size_t>(t) & b.closes_mask] = c;

  // Features: those warm from this bar on join the computed ones (sorted by warm-up).
  for (int f = 0; f < kFeatures; ++f) {
    const int32_t nf = static_cast<int32_t>(b.feat_from[f].size());
    while (b.feat_warm[f] < nf && b.feat_from[f][b.feat_warm[f]] <= t) ++b.feat_warm[f];
  }
  features<V>(b, c, feat);
}

// ---- instruction-set variants and their selection -----------------------------------------

struct Kernels {
  int isa;
  Summary (*sm_step)(const LaneView&, int, const double*, int32_t, double, int, uint64_t&, uint64_t&);
  void (*bank_update)(Bank&, const Bar&, double*);
};

Summary sm_step_base(const LaneView& v, int lanes, const double* feat, int32_t t, double ret, int poison,
                     uint64_t& updates, uint64_t& quarantined) {
  return sm_step_impl<2>(v, lanes, feat, t, ret, poison, updates, quarantined);
}
void bank_update_base(Bank& b, const Bar& bar, double* feat) { bank_update_impl<2>(b, bar, feat); }

#if DC_X86_DISPATCH
DC_V3 void bank_update_v3(Bank& b, const Bar& bar, double* feat) { bank_update_impl<4>(b, bar, feat); }
DC_V4 void bank_update_v4(Bank& b, const Bar& bar, double* feat) { bank_update_impl<4>(b, bar, feat); }
#endif

constexpr Kernels kBase{0, sm_step_base, bank_update_base};
#if DC_X86_DISPATCH
constexpr Kernels kV3{3, sm_step_v3, bank_update_v3};
constexpr Kernels kV4{4, sm_step_v4, bank_update_v4};
#endif

int cpu_isa() {
#if DC_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 4;
  if (__builtin_cpu_supports("x86-64-v3")) return 3;
#endif
  return 0;
}
const Kernels* kernels_for(int level) {
#if DC_X86_DISPATCH
  if (level >= 4) return &kV4;
  if (level >= 3) return &kV3;
#endif
  (void)level;
  return &kBase;
}
const Kernels* active = kernels_for(cpu_isa());

}  // namespace

int kernel_isa() { return active->isa; }
int set_kernel_isa(int level) {
  const int cpu = cpu_isa();
  active = kernels_for(level < cpu ? level : cpu);
  return active->isa;
}

Summary sm_step(const LaneView& v, int lanes, const double* feat, int32_t t, double ret, int poison,
                uint64_t& updates, uint64_t& quarantined) {
  return active->sm_step(v, lanes, feat, t, ret, poison, updates, quarantined);
}

void Bank::update(const Bar& bar) { active->bank_update(*this, bar, feat.data()); }

void Bank::update_into(const Bar& bar, double* out) {
  active->bank_update(*this, bar, out);
  // The feature pass writes the warm features only; the others (and the constant) are 0.
  out[0] = 0.0;
  const uint32_t base[kFeatures] = {trend_base, rsi_base, macd_base, bb_base, mom_base};
  const size_t count[kFeatures] = {trend_fast.size(), rsi_f.size(), macd_m.size(), bb_f.size(), mom_f.size()};
  for (int f = 0; f < kFeatures; ++f)
    if (static_cast<size_t>(feat_warm[f]) < count[f])
      std::fill(out + base[f] + feat_warm[f], out + base[f] + count[f], 0.0);
}

void Bank::enter_steady_chunk(int kind, int32_t c) {
  // Every indicator of the chunk is warm from this bar on (ROC from this very bar).
  BankSteady& s = st;
  const size_t lo = static_cast<size_t>(kBankPad) * c, hi = lo + kBankPad;
  auto warm = [&](std::vector<double>& ok) { std::fill(ok.begin() + lo, ok.begin() + hi, 1.0); };
  switch (kind) {
    case kBankEma:  // values are in val.ema already
      warm(val.ema_ok);
      break;
    case kBankRsi:
      for (size_t i = lo; i < hi && i < rsis.size(); ++i) {
        s.rsi_gain[i] = rsis[i].gain;
        s.rsi_loss[i] = rsis[i].loss;
      }
      warm(val.rsi_ok);
      break;
    case kBankAtr:  // values are in val.atr already
      warm(val.atr_ok);
      break;
    case kBankMacd:
      for (size_t i = lo; i < hi && i < macds.size(); ++i) {
        s.macd_fast[i] = macds[i].fast;
        s.macd_slow[i] = macds[i].slow;
        s.macd_signal[i] = macds[i].signal;
      }
      warm(val.macd_ok);
      break;
    case kBankEw:  // mean and variance are in val already
      warm(val.ew_ok);
      break;
    case kBankRoc:  // reads the close ring
      warm(val.roc_ok);
      break;
  }
}

}  // namespace dynamic_core
