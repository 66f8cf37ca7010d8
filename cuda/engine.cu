// The engine's data path on the GPU: indicator banks, features, the micro-core lanes with their
// SM summaries, and the consensus. The arithmetic is the CPU's: indicators.hpp and math.hpp are
// included, not copied. Compiled at run time by NVRTC (CuPy RawModule) with --fmad=false and
// -I <the package's include dir>; `python -m dynamic_core.gpu --check` compiles it, and
// tests/test_gpu.py compiles it with nvcc where one is installed.
//
// One launch of each kernel runs a *block* of bars (1 in live mode, hundreds in backtest mode).
// The host lays a block out per stream: stream s has c_s bars (its "rows", in time order; row
// numbers index the block's bars in input order), and every per-stream region below is
// stream-major, its offset given per stream by the host:
//   ind_out  [k][indicator of s][2]   indicator outputs (value; EW: mean, variance)
//   feat     [k][feature of s]        features, 0 while not warm
//   summ     [k][SM of s]             SM summaries (math.hpp Summary)
// Agent state stays in device memory between blocks; within a block it lives in registers.
#include "dynamic_core/indicators.hpp"
#include "dynamic_core/records.hpp"

using namespace dynamic_core;

namespace {

// The close-to-close return of a stream's bars: bank "indicator" 0 of every stream.
struct RetState {
  int64_t nbars;
  double prev_close;
};

// One indicator's state, whichever kind.
union IndState {
  RetState ret;
  Ema ema;
  Rsi rsi;
  Atr atr;
  Macd macd;
  Ew ew;
  Roc roc;
};

// DevicePlan::IndKind
enum : int32_t { kRet = 0, kEma = 1, kRsi = 2, kAtr = 3, kMacd = 4, kEw = 5, kRoc = 6 };

__device__ __forceinline__ double warp_sum(double v) {
  // The canonical tree of math.hpp's warp_tree: lane i adds lane i + stride, strides 16 .. 1.
  for (int stride = kWarpSize / 2; stride > 0; stride /= 2) v = v + __shfl_down_sync(0xffffffffu, v, stride);
  return v;
}

__device__ __forceinline__ uint32_t warp_count(int pred) {
  return static_cast<uint32_t>(__popc(__ballot_sync(0xffffffffu, pred)));
}

}  // namespace

// The record sizes the host lays its buffers out with.
extern "C" __global__ void dc_sizes(uint64_t* out) {
  out[0] = sizeof(IndState);
  out[1] = sizeof(Summary);
  out[2] = sizeof(Signal);
}

// Sizes the state of every indicator (one thread each).
extern "C" __global__ void dc_ind_init(int32_t n_ind, const int32_t* __restrict__ kind,
                                       const int32_t* __restrict__ p0, const int32_t* __restrict__ p1,
                                       const int32_t* __restrict__ p2, IndState* __restrict__ st) {
  const int32_t i = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n_ind) return;
  IndState x;
  switch (kind[i]) {
    case kRet:
      x.ret.nbars = 0;
      x.ret.prev_close = 0.0;
      break;
    case kEma: x.ema.init(p0[i]); break;
    case kRsi: x.rsi.init(p0[i]); break;
    case kAtr: x.atr.init(p0[i]); break;
    case kMacd: x.macd.init(p0[i], p1[i], p2[i]); break;
    case kEw: x.ew.init(p0[i]); break;
    default: x.roc.init(p0[i]); break;
  }
  st[i] = x;
}

// Every indicator (one thread each) over the rows of its stream in this block.
extern "C" __global__ void dc_ind_block(int32_t n_ind, const int32_t* __restrict__ kind,
                                        const uint32_t* __restrict__ ind_stream,
                                        const uint32_t* __restrict__ st_ind_begin,
                                        const int64_t* __restrict__ ind_buf, double* __restrict__ buf,
                                        IndState* __restrict__ st, const double* __restrict__ high,
                                        const double* __restrict__ low, const double* __restrict__ close,
                                        const uint32_t* __restrict__ rows, const uint32_t* __restrict__ st_row_begin,
                                        const uint64_t* __restrict__ ind_base, double* __restrict__ ind_out) {
  const int32_t i = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n_ind) return;
  const uint32_t s = ind_stream[i];
  const uint32_t r0 = st_row_begin[s], r1 = st_row_begin[s + 1];
  if (r0 == r1) return;
  const uint32_t n_s = st_ind_begin[s + 1] - st_ind_begin[s];
  const uint32_t local = static_cast<uint32_t>(i) - st_ind_begin[s];
  double* out = ind_out + ind_base[s] + 2u * local;
  const uint64_t step = 2u * static_cast<uint64_t>(n_s);
  IndState x = st[i];
  const int32_t k = kind[i];
  for (uint32_t r = r0; r < r1; ++r, out += step) {
    const uint32_t row = rows[r];
    const double c = close[row];
    switch (k) {
      case kRet:
        out[0] = x.ret.nbars > 0 ? bar_return(c, x.ret.prev_close) : 0.0;
        x.ret.prev_close = c;
        ++x.ret.nbars;
        break;
      case kEma:
        x.ema.update(c);
        out[0] = x.ema.value;
        break;
      case kRsi:
        x.rsi.update(c);
        out[0] = x.rsi.value;
        break;
      case kAtr:
        x.atr.update(high[row], low[row], c);
        out[0] = x.atr.value;
        break;
      case kMacd:
        x.macd.update(c);
        out[0] = x.macd.hist;
        break;
      case kEw:
        x.ew.update(c);
        out[0] = x.ew.mean;
        out[1] = x.ew.var;
        break;
      default:
        x.roc.update(c, buf + ind_buf[i]);
        out[0] = x.roc.value;
        break;
    }
  }
  st[i] = x;
}

// The features of every stream's rows (grid.y: the stream; x: its rows x features).
extern "C" __global__ void dc_feat_block(const uint32_t* __restrict__ st_ind_begin,
                                         const uint32_t* __restrict__ st_feat_begin,
                                         const int32_t* __restrict__ feat_kind, const int32_t* __restrict__ feat_a,
                                         const int32_t* __restrict__ feat_b, const int32_t* __restrict__ feat_c,
                                         const int64_t* __restrict__ feat_from, const double* __restrict__ close,
                                         const int64_t* __restrict__ sidx, const uint32_t* __restrict__ rows,
                                         const uint32_t* __restrict__ st_row_begin,
                                         const uint64_t* __restrict__ ind_base, const double* __restrict__ ind_out,
                                         const uint64_t* __restrict__ feat_base, double* __restrict__ feat) {
  const uint32_t s = blockIdx.y;
  const uint32_t n_f = st_feat_begin[s + 1] - st_feat_begin[s];
  const uint32_t n_i = st_ind_begin[s + 1] - st_ind_begin[s];
  const uint64_t g = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t n_rows = st_row_begin[s + 1] - st_row_begin[s];
  if (g >= n_rows * n_f) return;
  const uint32_t k = static_cast<uint32_t>(g / n_f), f = static_cast<uint32_t>(g % n_f);
  const uint32_t row = rows[st_row_begin[s] + k];
  const uint32_t j = st_feat_begin[s] + f;
  const double* v = ind_out + ind_base[s] + 2u * static_cast<uint64_t>(n_i) * k;
  double x = 0.0;
  if (sidx[row] >= feat_from[j]) {
    const int32_t a = feat_a[j], b = feat_b[j], c = feat_c[j];
    switch (feat_kind[j]) {
      case 0: x = trend_feature(v[2 * a], v[2 * b], v[2 * c]); break;
      case 1: x = rsi_feature(v[2 * a]); break;
      case 2: x = macd_feature(v[2 * a], v[2 * c]); break;
      case 3: x = bb_feature(close[row], v[2 * a], v[2 * a + 1]); break;
      case 4: x = mom_feature(v[2 * a]); break;
      default: break;  // the constant 0
    }
  }
  feat[feat_base[s] + static_cast<uint64_t>(n_f) * k + f] = x;
}

// The lanes of every SM (one CUDA block per SM, one thread per lane, a CUDA warp per warp of
// 32 lanes) over the rows of its stream: blend, lane_step, and the SM summary in the canonical
// order (lanes by the warp tree, warps in index order). Masked and inactive lanes count 0.
extern "C" __global__ void dc_lanes_block(
    const uint32_t* __restrict__ sm_stream, const uint32_t* __restrict__ sm_lane_begin,
    const uint32_t* __restrict__ sm_lanes, const uint32_t* __restrict__ st_sm_begin,
    const uint32_t* __restrict__ st_sm_end, const uint32_t* __restrict__ st_ind_begin,
    const uint32_t* __restrict__ st_feat_begin,
    // lane parameters
    const double* __restrict__ w0, const double* __restrict__ w1, const double* __restrict__ w2,
    const double* __restrict__ w3, const double* __restrict__ w4, const int32_t* __restrict__ f0,
    const int32_t* __restrict__ f1, const int32_t* __restrict__ f2, const int32_t* __restrict__ f3,
    const int32_t* __restrict__ f4, const double* __restrict__ entry, const double* __restrict__ cost,
    const int32_t* __restrict__ lookback, const int32_t* __restrict__ long_short,
    const int32_t* __restrict__ active, const int32_t* __restrict__ external,
    // lane state
    double* __restrict__ s_score, double* __restrict__ s_equity, double* __restrict__ s_entry_equity,
    double* __restrict__ s_peak, double* __restrict__ s_max_dd, double* __restrict__ s_ret_sum,
    double* __restrict__ s_ret_sq, const double* __restrict__ s_credit, const double* __restrict__ s_ext_score,
    const double* __restrict__ s_dsi, uint32_t* __restrict__ s_trades, uint32_t* __restrict__ s_wins, uint32_t* __restrict__ s_n_ret,
    uint32_t* __restrict__ s_quarantined, int32_t* __restrict__ s_position, int32_t* __restrict__ s_action,
    // the block
    const int64_t* __restrict__ sidx, const uint32_t* __restrict__ rows, const uint32_t* __restrict__ st_row_begin,
    const uint64_t* __restrict__ ind_base, const double* __restrict__ ind_out,
    const uint64_t* __restrict__ feat_base, const double* __restrict__ feat, const uint64_t* __restrict__ summ_base,
    Summary* __restrict__ summ, unsigned long long* __restrict__ counters) {
  __shared__ double part[2][kMaxWarpsPerSm][4];
  __shared__ uint32_t cnt[2][kMaxWarpsPerSm][6];
  const uint32_t m = blockIdx.x;
  const uint32_t s = sm_stream[m];
  const uint32_t r0 = st_row_begin[s], r1 = st_row_begin[s + 1];
  if (r0 == r1) return;  // the whole block: no bar of its stream
  const uint32_t lanes = sm_lanes[m];
  const uint32_t tid = threadIdx.x;
  const uint32_t warp = tid / kWarpSize, lane_in_warp = tid % kWarpSize;
  const int valid = tid < lanes ? 1 : 0;
  const uint32_t l = sm_lane_begin[m] + (valid ? tid : 0);
  const uint32_t n_f = st_feat_begin[s + 1] - st_feat_begin[s];
  const uint32_t n_i = st_ind_begin[s + 1] - st_ind_begin[s];
  const uint32_t n_sm = st_sm_end[s] - st_sm_begin[s];
  const uint32_t m_local = m - st_sm_begin[s];

  double w[kFeatures] = {w0[l], w1[l], w2[l], w3[l], w4[l]};
  const int32_t fi[kFeatures] = {f0[l], f1[l], f2[l], f3[l], f4[l]};
  const double ent = entry[l], cst = cost[l], credit = s_credit[l], ext_score = s_ext_score[l], dsi = s_dsi[l];
  const int32_t lb = lookback[l], ls = long_short[l], ext = external[l];
  const int is_active = valid && active[l] != 0 ? 1 : 0;
  LaneState st;
  st.score = s_score[l];
  st.equity = s_equity[l];
  st.entry_equity = s_entry_equity[l];
  st.peak = s_peak[l];
  st.max_dd = s_max_dd[l];
  st.ret_sum = s_ret_sum[l];
  st.ret_sq = s_ret_sq[l];
  st.trades = s_trades[l];
  st.wins = s_wins[l];
  st.n_ret = s_n_ret[l];
  st.position = s_position[l];
  st.action = s_action[l];
  st.quarantined = s_quarantined[l];
  unsigned long long updates = 0, quarantined = 0;

  const double* fr = feat + feat_base[s];
  const double* ir = ind_out + ind_base[s];
  Summary* out = summ + summ_base[s] + m_local;
  for (uint32_t r = r0, k = 0; r < r1; ++r, ++k, fr += n_f, ir += 2u * n_i, out += n_sm) {
    const int64_t ti = sidx[rows[r]];
    const int32_t t = ti < 2147483647 ? static_cast<int32_t>(ti) : 2147483647;
    const double ret = ir[0];  // indicator 0: the stream's return
    const double fv[kFeatures] = {fr[fi[0]], fr[fi[1]], fr[fi[2]], fr[fi[3]], fr[fi[4]]};
    double score = blend(w, fv, dsi);
    if (ext) score = ext_score;
    const int warm = t >= lb ? 1 : 0;
    const int live = is_active & (st.quarantined == 0 ? 1 : 0);
    LaneState o;
    const int ok = lane_step(st, o, score, ret, warm, ent, ls, cst);
    const int keep = live & ok;
    const int fail = live & (ok ^ 1);
    if (keep) st = o;
    if (fail) st.quarantined = 1;
    updates += static_cast<unsigned long long>(live);
    quarantined += static_cast<unsigned long long>(fail);
    const int kw = keep & warm;
    const double wgt = fitness(st.equity, st.max_dd, credit);
    const double sw = warp_sum(kw ? wgt : 0.0);
    const double sws = warp_sum(kw ? wgt * score : 0.0);
    const double ss = warp_sum(kw ? score : 0.0);
    const double ss2 = warp_sum(kw ? score * score : 0.0);
    const int act = st.action;
    const uint32_t n = warp_count(kw);
    const uint32_t v0 = warp_count(kw & (act == -2 ? 1 : 0));
    const uint32_t v1 = warp_count(kw & (act == -1 ? 1 : 0));
    const uint32_t v2 = warp_count(kw & (act == 0 ? 1 : 0));
    const uint32_t v3 = warp_count(kw & (act == 1 ? 1 : 0));
    const uint32_t v4 = warp_count(kw & (act == 2 ? 1 : 0));
    const uint32_t b = k & 1u;
    if (lane_in_warp == 0) {
      part[b][warp][0] = sw;
      part[b][warp][1] = sws;
      part[b][warp][2] = ss;
      part[b][warp][3] = ss2;
      cnt[b][warp][0] = n;
      cnt[b][warp][1] = v0;
      cnt[b][warp][2] = v1;
      cnt[b][warp][3] = v2;
      cnt[b][warp][4] = v3;
      cnt[b][warp][5] = v4;
    }
    // Double-buffered: one barrier per bar (the buffer written next bar was read before it).
    __syncthreads();
    if (tid == 0) {
      Summary total;
      summary_zero(total);
      for (uint32_t x = 0; x < lanes / kWarpSize; ++x) {  // warps in index order
        total.sum_w = total.sum_w + part[b][x][0];
        total.sum_ws = total.sum_ws + part[b][x][1];
        total.sum_s = total.sum_s + part[b][x][2];
        total.sum_s2 = total.sum_s2 + part[b][x][3];
        total.n += cnt[b][x][0];
        for (int v = 0; v < 5; ++v) total.votes[v] += cnt[b][x][1 + v];
      }
      *out = total;
    }
  }
  if (valid) {
    s_score[l] = st.score;
    s_equity[l] = st.equity;
    s_entry_equity[l] = st.entry_equity;
    s_peak[l] = st.peak;
    s_max_dd[l] = st.max_dd;
    s_ret_sum[l] = st.ret_sum;
    s_ret_sq[l] = st.ret_sq;
    s_trades[l] = st.trades;
    s_wins[l] = st.wins;
    s_n_ret[l] = st.n_ret;
    s_position[l] = st.position;
    s_action[l] = st.action;
    s_quarantined[l] = st.quarantined;
  }
  // The counts of the warp's lanes (integers: any order), then one atomic per warp.
  for (int stride = kWarpSize / 2; stride > 0; stride /= 2) {
    updates += __shfl_down_sync(0xffffffffu, updates, stride);
    quarantined += __shfl_down_sync(0xffffffffu, quarantined, stride);
  }
  if (lane_in_warp == 0 && updates) atomicAdd(counters, updates);
  if (lane_in_warp == 0 && quarantined) atomicAdd(counters + 1, quarantined);
}

// The parameters of both consensus kernels: the block's rows (each with its stream and its
// position k among the stream's rows), the SM summaries, and what a signal record carries.
#define DC_FUSE_PARAMS                                                                                      \
  uint32_t n_rows, const uint32_t *__restrict__ row_stream, const uint32_t *__restrict__ row_k,             \
      const uint32_t *__restrict__ st_sm_begin, const uint32_t *__restrict__ st_sm_end,                     \
      const uint64_t *__restrict__ summ_base, const Summary *__restrict__ summ, const int64_t *__restrict__ ts, \
      const uint32_t *__restrict__ instrument, const uint32_t *__restrict__ timeframe,                      \
      const uint64_t *__restrict__ seq, const double *__restrict__ st_dsi,                                  \
      const uint32_t *__restrict__ st_flags, uint64_t population_hash, Signal *__restrict__ out

// The consensus of every row (one thread each, rows in input order): the SM summaries of its
// stream added in SM order, fused, written as the signal record with its stream's DSI evidence.
extern "C" __global__ void dc_fuse_block(DC_FUSE_PARAMS) {
  const uint32_t r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n_rows) return;
  const uint32_t s = row_stream[r];
  const uint32_t n_sm = st_sm_end[s] - st_sm_begin[s];
  out[r] = fused_signal(summ + summ_base[s] + static_cast<uint64_t>(n_sm) * row_k[r], n_sm, ts[r], instrument[r],
                        timeframe[r], seq[r], population_hash, st_dsi[s], st_flags[s]);
}

// The same consensus for streams of many SMs (the host launches it when a stream has more than
// a warp's worth): one CUDA block per row. The SM order of each float sum is a chain no thread
// can split, so each of the four sums is one thread's chain (lanes 0-3 of the first warp add
// sum_w, sum_ws, sum_s, sum_s2 of every SM in SM order, as summary_add does); what the block does
// is keep them fed. Every thread loads one summary of the next chunk into registers while the
// four add the current chunk out of shared memory (double-buffered, one barrier per chunk), so
// the adds wait on shared memory rather than on global memory's latency once per SM. The counts
// are integers: each thread adds those of the summaries it loaded, then the block adds those.
constexpr uint32_t kFuseChunk = 256;  // the most threads per block the host launches
constexpr int kCounts = 6;            // Summary::n and votes[5]

extern "C" __global__ void dc_fuse_wide(DC_FUSE_PARAMS) {
  __shared__ double buf[2][kFuseChunk][4];
  __shared__ uint32_t counts[kFuseChunk / kWarpSize][kCounts];
  __shared__ double sums[4];
  const uint32_t r = blockIdx.x;
  if (r >= n_rows) return;  // the whole block
  const uint32_t tid = threadIdx.x, chunk = blockDim.x;
  const uint32_t s = row_stream[r];
  const uint32_t n_sm = st_sm_end[s] - st_sm_begin[s];
  const Summary* sm = summ + summ_base[s] + static_cast<uint64_t>(n_sm) * row_k[r];
  uint32_t cnt[kCounts] = {0, 0, 0, 0, 0, 0};
  auto take = [&](const Summary& x, double* to) {
    to[0] = x.sum_w;
    to[1] = x.sum_ws;
    to[2] = x.sum_s;
    to[3] = x.sum_s2;
    cnt[0] += x.n;
    for (int v = 0; v < 5; ++v) cnt[1 + v] += x.votes[v];
  };
  if (tid < n_sm) take(sm[tid], buf[0][tid]);
  __syncthreads();
  double acc = 0.0;  // lanes 0-3: one float sum each
  uint32_t b = 0;
  for (uint32_t c = 0; c < n_sm; c += chunk, b ^= 1u) {
    const uint32_t j = c + chunk + tid;
    Summary next;
    if (j < n_sm) next = sm[j];  // in flight while lanes 0-3 add
    if (tid < 4) {
      const uint32_t e = n_sm - c < chunk ? n_sm - c : chunk;
#pragma unroll 8
      for (uint32_t x = 0; x < e; ++x) acc = acc + buf[b][x][tid];  // SM order
    }
    if (j < n_sm) take(next, buf[b ^ 1u][tid]);
    __syncthreads();
  }
  // the counts: the warp's lanes (integers: any order), then the warps
  const uint32_t warp = tid / kWarpSize;
  for (int k = 0; k < kCounts; ++k) {
    uint32_t v = cnt[k];
    for (int stride = kWarpSize / 2; stride > 0; stride /= 2) v += __shfl_down_sync(0xffffffffu, v, stride);
    if (tid % kWarpSize == 0) counts[warp][k] = v;
  }
  if (tid < 4) sums[tid] = acc;
  __syncthreads();
  if (tid == 0) {
    Summary total;
    summary_zero(total);
    total.sum_w = sums[0];
    total.sum_ws = sums[1];
    total.sum_s = sums[2];
    total.sum_s2 = sums[3];
    for (uint32_t w = 0; w < chunk / kWarpSize; ++w) {
      total.n += counts[w][0];
      for (int v = 0; v < 5; ++v) total.votes[v] += counts[w][1 + v];
    }
    out[r] = signal_of(total, ts[r], instrument[r], timeframe[r], seq[r], population_hash, st_dsi[s], st_flags[s]);
  }
}
