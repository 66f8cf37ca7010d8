#include <cstddef>

#include "../dynamic_core/evolution.hpp"
#include "../dynamic_core/math.hpp"
#include "../dynamic_core/records.hpp"
#include "common.hpp"

namespace dynamic_core::bindings {

namespace {
#define DC_F(T, f, fmt) py::make_tuple(#f, offsetof(T, f), fmt, 1)
#define DC_FN(T, f, fmt, n) py::make_tuple(#f, offsetof(T, f), fmt, n)

py::dict layouts() {
  py::dict d;
  d["bar"] = py::make_tuple(sizeof(Bar), py::make_tuple(DC_F(Bar, ts, "<i8"), DC_F(Bar, instrument, "<u4"),
                                                       DC_F(Bar, timeframe, "<u4"), DC_F(Bar, open, "<f8"),
                                                       DC_F(Bar, high, "<f8"), DC_F(Bar, low, "<f8"),
                                                       DC_F(Bar, close, "<f8"), DC_F(Bar, volume, "<f8")));
  d["genome"] = py::make_tuple(
      sizeof(Genome),
      py::make_tuple(DC_F(Genome, agent_id, "<u4"), DC_F(Genome, instrument, "<u4"),
                     DC_F(Genome, timeframe, "<u4"), DC_F(Genome, mode, "<u4"), DC_F(Genome, kind, "<u4"),
                     DC_F(Genome, fast, "<i4"), DC_F(Genome, slow, "<i4"), DC_F(Genome, rsi_period, "<i4"),
                     DC_F(Genome, macd_fast, "<i4"), DC_F(Genome, macd_slow, "<i4"),
                     DC_F(Genome, macd_signal, "<i4"), DC_F(Genome, atr_period, "<i4"),
                     DC_F(Genome, bb_period, "<i4"), DC_F(Genome, mom_period, "<i4"),
                     DC_F(Genome, w_trend, "<f8"), DC_F(Genome, w_rsi, "<f8"), DC_F(Genome, w_macd, "<f8"),
                     DC_F(Genome, w_bb, "<f8"), DC_F(Genome, w_mom, "<f8"), DC_F(Genome, entry, "<f8"),
                     DC_F(Genome, cost_bps, "<f8"), DC_F(Genome, w_dsi, "<f8")));
  d["signal"] = py::make_tuple(
      sizeof(Signal),
      py::make_tuple(DC_F(Signal, ts, "<i8"), DC_F(Signal, instrument, "<u4"), DC_F(Signal, timeframe, "<u4"),
                     DC_F(Signal, seq, "<u8"), DC_F(Signal, population_hash, "<u8"),
                     DC_F(Signal, score, "<f8"), DC_F(Signal, confidence, "<f8"),
                     DC_F(Signal, agreement, "<f8"), DC_F(Signal, dispersion, "<f8"),
                     DC_F(Signal, dsi, "<f8"), DC_F(Signal, action, "<i4"), DC_F(Signal, n_agents, "<u4"),
                     DC_FN(Signal, votes, "<u4", 5), DC_F(Signal, flags, "<u4")));
  d["agent"] = py::make_tuple(
      sizeof(AgentRecord),
      py::make_tuple(DC_F(AgentRecord, agent_id, "<u4"), DC_F(AgentRecord, instrument, "<u4"),
                     DC_F(AgentRecord, timeframe, "<u4"), DC_F(AgentRecord, position, "<i4"),
                     DC_F(AgentRecord, action, "<i4"), DC_F(AgentRecord, warm, "<u4"),
                     DC_F(AgentRecord, quarantined, "<u4"), DC_F(AgentRecord, trades, "<u4"),
                     DC_F(AgentRecord, wins, "<u4"), DC_F(AgentRecord, n_returns, "<u4"),
                     DC_F(AgentRecord, score, "<f8"), DC_F(AgentRecord, equity, "<f8"),
                     DC_F(AgentRecord, peak, "<f8"), DC_F(AgentRecord, max_drawdown, "<f8"),
                     DC_F(AgentRecord, ret_mean, "<f8"), DC_F(AgentRecord, ret_std, "<f8"),
                     DC_F(AgentRecord, sharpe, "<f8"), DC_F(AgentRecord, fitness, "<f8"),
                     DC_F(AgentRecord, credit, "<f8")));
  // A dead letter is a bar followed by where and why it was refused.
  d["dead_letter"] = py::make_tuple(
      sizeof(DeadLetter),
      py::make_tuple(py::make_tuple("ts", offsetof(DeadLetter, bar) + offsetof(Bar, ts), "<i8", 1),
                     py::make_tuple("instrument", offsetof(DeadLetter, bar) + offsetof(Bar, instrument), "<u4", 1),
                     py::make_tuple("timeframe", offsetof(DeadLetter, bar) + offsetof(Bar, timeframe), "<u4", 1),
                     py::make_tuple("open", offsetof(DeadLetter, bar) + offsetof(Bar, open), "<f8", 1),
                     py::make_tuple("high", offsetof(DeadLetter, bar) + offsetof(Bar, high), "<f8", 1),
                     py::make_tuple("low", offsetof(DeadLetter, bar) + offsetof(Bar, low), "<f8", 1),
                     py::make_tuple("close", offsetof(DeadLetter, bar) + offsetof(Bar, close), "<f8", 1),
                     py::make_tuple("volume", offsetof(DeadLetter, bar) + offsetof(Bar, volume), "<f8", 1),
                     DC_F(DeadLetter, index, "<u8"), DC_F(DeadLetter, reason, "<u4"),
                     DC_F(DeadLetter, batch, "<u4")));
  d["tick"] = py::make_tuple(sizeof(Tick), py::make_tuple(DC_F(Tick, ts, "<i8"), DC_F(Tick, instrument, "<u4"),
                                                         DC_F(Tick, side, "<u4"), DC_F(Tick, price, "<f8"),
                                                         DC_F(Tick, size, "<f8"), DC_F(Tick, bid, "<f8"),
                                                         DC_F(Tick, ask, "<f8")));
  d["lineage"] = py::make_tuple(
      sizeof(Lineage),
      py::make_tuple(DC_F(Lineage, agent_id, "<u4"), DC_F(Lineage, parent_a, "<u4"), DC_F(Lineage, parent_b, "<u4"),
                     DC_F(Lineage, generation, "<u4"), DC_F(Lineage, birth_bar, "<i8")));
  d["admitted"] = py::make_tuple(sizeof(AdmittedBar),
                                 py::make_tuple(DC_F(AdmittedBar, stream, "<u4"), DC_F(AdmittedBar, index, "<u4"),
                                                DC_F(AdmittedBar, sidx, "<u8"), DC_F(AdmittedBar, seq, "<u8")));
  d["birth"] = py::make_tuple(
      sizeof(Birth),
      py::make_tuple(DC_F(Birth, slot, "<u4"), DC_F(Birth, agent_id, "<u4"), DC_F(Birth, replaced_id, "<u4"),
                     DC_F(Birth, parent_a, "<u4"), DC_F(Birth, parent_b, "<u4"), DC_F(Birth, stream, "<u4"),
                     DC_F(Birth, sm, "<u4"), DC_F(Birth, how, "<u4"), DC_F(Birth, replaced_fitness, "<f8")));
  return d;
}
#undef DC_F
#undef DC_FN
}  // namespace

void bind_records(py::module_& m) {
  m.def("record_layouts", &layouts,
        "Size and (name, offset, numpy type, count) of every field of each native record.");
  m.attr("SIGNAL_DSI") = kSignalDsi;
  m.attr("MIN_PRICE") = kMinPrice;
  m.attr("MAX_PRICE") = kMaxPrice;
  m.def("reason_names", [] {
    py::list l;
    for (uint32_t r = 0; r < kReasonCount; ++r) l.append(reason_name(static_cast<Reason>(r)));
    return l;
  }, "Reject reason names, indexed by reason code.");
  m.def("score_to_action", [](double s, double weak, double strong) { return score_to_action(s, weak, strong); },
        py::arg("score"), py::arg("weak") = kWeakAction, py::arg("strong") = kStrongAction,
        "Map a score in (-1, 1) to an action code -2..2.");
}

}  // namespace dynamic_core::bindings
