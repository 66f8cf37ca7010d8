#include "../dynamic_core/engine.hpp"
#include "common.hpp"

namespace dynamic_core::bindings {

namespace {

py::dict stats_dict(const Engine& e) {
  const EngineStats& s = e.stats();
  py::dict d;
  d["batches"] = s.batches;
  d["bars_in"] = s.bars_in;
  d["accepted"] = s.accepted;
  d["skipped_unfollowed"] = s.skipped_unfollowed;
  d["rejected"] = s.rejected;
  py::dict r;
  for (uint32_t i = 1; i < kReasonCount; ++i) r[reason_name(static_cast<Reason>(i))] = s.rejects[i];
  d["rejects"] = r;
  d["signals"] = s.signals;
  d["agent_updates"] = s.agent_updates;
  d["dead_letters"] = e.dead_letters().size();
  d["dead_letters_dropped"] = s.dead_letters_dropped;
  d["busy_seconds"] = s.busy_seconds;
  d["agent_updates_per_s"] = s.busy_seconds > 0 ? static_cast<double>(s.agent_updates) / s.busy_seconds : 0.0;
  d["quarantined"] = e.quarantined();
  d["sequence"] = e.sequence();
  return d;
}

py::dict layout_dict(const Engine& e) {
  const Layout& L = e.layout();
  const auto n_sm = static_cast<py::ssize_t>(L.sms.size());
  py::array_t<uint32_t> stream(n_sm), warps(n_sm), active(n_sm), bank(n_sm), features(n_sm);
  uint64_t lanes = 0;
  for (py::ssize_t i = 0; i < n_sm; ++i) {
    const Sm& sm = L.sms[static_cast<size_t>(i)];
    stream.mutable_at(i) = sm.stream;
    warps.mutable_at(i) = sm.n_warps;
    active.mutable_at(i) = sm.n_active;
    bank.mutable_at(i) = static_cast<uint32_t>(sm.bank.distinct_indicators());
    features.mutable_at(i) = static_cast<uint32_t>(sm.bank.feat.size() - 1);
    lanes += static_cast<uint64_t>(sm.n_warps) * kWarpSize;
  }
  const auto n_st = static_cast<py::ssize_t>(L.streams.size());
  py::array_t<uint32_t> s_inst(n_st), s_tf(n_st), s_begin(n_st), s_end(n_st);
  py::array_t<uint64_t> s_bars(n_st);
  for (py::ssize_t i = 0; i < n_st; ++i) {
    const Stream& st = L.streams[static_cast<size_t>(i)];
    s_inst.mutable_at(i) = st.instrument;
    s_tf.mutable_at(i) = st.timeframe;
    s_begin.mutable_at(i) = st.sm_begin;
    s_end.mutable_at(i) = st.sm_end;
    s_bars.mutable_at(i) = st.nbars;
  }
  py::dict d;
  d["n_agents"] = L.n_agents;
  d["n_lanes"] = lanes;
  d["n_warps"] = lanes / kWarpSize;
  d["n_sms"] = L.sms.size();
  d["n_streams"] = L.streams.size();
  d["cores_per_sm"] = e.config().cores_per_sm;
  d["block_bars"] = e.block_bars();
  d["sm_stream"] = stream;
  d["sm_warps"] = warps;
  d["sm_active"] = active;
  d["sm_bank_indicators"] = bank;
  d["sm_bank_features"] = features;
  d["stream_instrument"] = s_inst;
  d["stream_timeframe"] = s_tf;
  d["stream_sm_begin"] = s_begin;
  d["stream_sm_end"] = s_end;
  d["stream_bars"] = s_bars;
  return d;
}

}  // namespace

void bind_engine(py::module_& m) {
  m.def("validate_bars", [](const py::array& bars, uint32_t n_registered) {
        const Bar* b = records_of<Bar>(bars, "bar");
        const auto n = static_cast<py::ssize_t>(bars.shape(0));
        py::array_t<uint32_t> reasons(n);
        uint32_t* r = reasons.mutable_data();
        {
          py::gil_scoped_release nogil;
          validate_bars(b, static_cast<size_t>(n), n_registered, r);
        }
        return reasons;
      }, py::arg("bars"), py::arg("n_registered"),
      "Reject reason of every bar: value checks and time order per (instrument, timeframe).");
  py::class_<Engine>(m, "Engine", "Native engine; wrapped by dynamic_core.Engine.")
      .def(py::init([](const py::array& genomes, int cores_per_sm, uint64_t population_hash,
                       uint32_t dead_letter_capacity, uint32_t block_bars) {
             const Genome* g = records_of<Genome>(genomes, "genome");
             EngineConfig cfg;
             cfg.cores_per_sm = cores_per_sm;
             cfg.population_hash = population_hash;
             cfg.dead_letter_capacity = dead_letter_capacity;
             cfg.block_bars = block_bars;
             const auto n = static_cast<size_t>(genomes.shape(0));
             py::gil_scoped_release nogil;
             return new Engine(g, n, cfg);
           }),
           py::arg("genomes"), py::arg("cores_per_sm") = 128, py::arg("population_hash") = 0,
           py::arg("dead_letter_capacity") = 10000, py::arg("block_bars") = 0)
      .def("run", [](Engine& e, const py::array& bars, uint32_t n_registered) {
             const Bar* b = records_of<Bar>(bars, "bar");
             const auto n = static_cast<size_t>(bars.shape(0));
             std::vector<Signal> out;
             {
               py::gil_scoped_release nogil;
               out.reserve(n);
               e.run(b, n, n_registered, out);
             }
             return to_bytes(out.data(), out.size());
           }, py::arg("bars"), py::arg("n_registered"),
           "Process a time-ordered bar batch; returns signal records as bytes.")
      .def("validate", [](const Engine& e, const py::array& bars, uint32_t n_registered) {
             const Bar* b = records_of<Bar>(bars, "bar");
             const auto n = static_cast<py::ssize_t>(bars.shape(0));
             py::array_t<uint32_t> reasons(n);
             uint32_t* r = reasons.mutable_data();
             {
               py::gil_scoped_release nogil;
               e.validate(b, static_cast<size_t>(n), n_registered, r);
             }
             return reasons;
           }, py::arg("bars"), py::arg("n_registered"),
           "Reject reason of every bar as run() would see it, without changing state.")
      .def("agents", [](const Engine& e) {
             std::vector<AgentRecord> out(e.n_agents());
             {
               py::gil_scoped_release nogil;
               e.agents(out.data());
             }
             return to_bytes(out.data(), out.size());
           }, "Per-agent state in population order, as bytes.")
      .def("dead_letters", [](const Engine& e) {
             auto d = e.dead_letters();
             return to_bytes(d.data(), d.size());
           }, "Rejected bars with reason codes, oldest first, as bytes.")
      .def("stats", &stats_dict)
      .def("layout", &layout_dict)
      .def_property_readonly("n_agents", &Engine::n_agents);
}

}  // namespace dynamic_core::bindings
