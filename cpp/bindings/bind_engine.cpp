#include "../dynamic_core/engine.hpp"
#include "common.hpp"

#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <utility>

namespace dynamic_core::bindings {

namespace {

double percentile(const std::vector<uint64_t>& h, double q) {
  uint64_t total = 0;
  for (uint64_t c : h) total += c;
  if (!total) return 0.0;
  const double want = q * static_cast<double>(total);
  uint64_t acc = 0;
  for (size_t i = 0; i < h.size(); ++i) {
    acc += h[i];
    if (static_cast<double>(acc) >= want)  // upper edge of the bucket, in seconds
      return std::exp2(static_cast<double>(i + 1) / kLatencyBucketsPerOctave) * 1e-9;
  }
  return 0.0;
}

// EvolutionConfig from a dict of its fields (unknown keys are an error).
EvolutionConfig evolution_config(const py::dict& d) {
  EvolutionConfig c;
  for (auto item : d) {
    const std::string k = py::cast<std::string>(item.first);
    const py::handle v = item.second;
    if (k == "replace_fraction") c.replace_fraction = py::cast<double>(v);
    else if (k == "tournament") c.tournament = py::cast<uint32_t>(v);
    else if (k == "min_trades") c.min_trades = py::cast<uint32_t>(v);
    else if (k == "min_age") c.min_age = py::cast<uint32_t>(v);
    else if (k == "dd_penalty") c.dd_penalty = py::cast<double>(v);
    else if (k == "p_crossover") c.p_crossover = py::cast<double>(v);
    else if (k == "p_migrate") c.p_migrate = py::cast<double>(v);
    else if (k == "sigma_weight") c.sigma_weight = py::cast<double>(v);
    else if (k == "w_max") c.w_max = py::cast<double>(v);
    else if (k == "sigma_entry") c.sigma_entry = py::cast<double>(v);
    else if (k == "entry_min") c.entry_min = py::cast<double>(v);
    else if (k == "entry_max") c.entry_max = py::cast<double>(v);
    else if (k == "p_period") c.p_period = py::cast<double>(v);
    else if (k == "period_step") c.period_step = py::cast<int32_t>(v);
    else if (k == "period_min") c.period_min = py::cast<int32_t>(v);
    else if (k == "period_max") c.period_max = py::cast<int32_t>(v);
    else if (k == "gap_share") c.gap_share = py::cast<double>(v);
    else if (k == "spawn_fraction") c.spawn_fraction = py::cast<double>(v);
    else if (k == "stream") c.stream = py::cast<int64_t>(v);
    else throw std::invalid_argument("evolution config: unknown field '" + k + "'");
  }
  return c;
}

py::dict report_dict(const GenerationReport& r) {
  py::dict d;
  d["generation"] = r.generation;
  d["judged"] = r.judged;
  d["eligible"] = r.eligible;
  d["replaced"] = r.replaced;
  d["crossovers"] = r.crossovers;
  d["migrants"] = r.migrants;
  d["spawns"] = r.spawns;
  d["period_moves"] = r.period_moves;
  d["best"] = r.best;
  d["median"] = r.median;
  d["mean"] = r.mean;
  py::list styles;
  for (uint64_t c : r.style_counts) styles.append(c);
  d["styles"] = styles;
  // one copy, into a numpy buffer Python views as BIRTH_DTYPE
  py::array_t<uint8_t> births(static_cast<py::ssize_t>(r.births.size() * sizeof(Birth)));
  if (!r.births.empty()) std::memcpy(births.mutable_data(), r.births.data(), r.births.size() * sizeof(Birth));
  d["births"] = births;
  return d;
}

py::dict stats_dict(Engine& e) {
  EngineStats s;
  s = without_gil([&] { return e.stats(); });  // stats() takes the ingress lock, which submit may hold
  const uint64_t updates = e.agent_updates();
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
  d["agent_updates"] = updates;
  d["dead_letters"] = s.dead_letters;
  d["dead_letters_dropped"] = s.dead_letters_dropped;
  d["busy_seconds"] = s.busy_seconds;
  d["uptime_seconds"] = e.uptime_s();
  // the busiest worker's time running bars: submit/poll (a service) has no run() to time, and
  // every update of a run() or a submit happened within it on the busiest worker's clock at most
  const double worker_busy = e.worker_busy_seconds();
  d["worker_busy_seconds"] = worker_busy;
  const double busy = std::max(s.busy_seconds, worker_busy);
  d["agent_updates_per_s"] = busy > 0 ? static_cast<double>(updates) / busy : 0.0;
  d["quarantined"] = e.quarantined();
  d["sequence"] = s.sequence;
  d["threads"] = e.threads();
  d["capacity"] = e.capacity();
  d["in_flight"] = s.in_flight;
  d["in_flight_high_water"] = e.in_flight_high_water();
  py::dict bp;
  bp["events"] = s.backpressure_events;
  bp["rejected"] = s.backpressure_rejected;
  bp["dropped"] = s.backpressure_dropped;
  d["backpressure"] = bp;
  d["failovers"] = e.failovers();
  const auto h = e.latency_histogram();
  uint64_t n = 0;
  size_t top = 0;
  for (size_t i = 0; i < h.size(); ++i) {
    n += h[i];
    if (h[i]) top = i;
  }
  py::dict lat;
  lat["count"] = n;
  lat["p50"] = percentile(h, 0.50);
  lat["p90"] = percentile(h, 0.90);
  lat["p99"] = percentile(h, 0.99);
  lat["max"] = n ? std::exp2(static_cast<double>(top + 1) / kLatencyBucketsPerOctave) * 1e-9 : 0.0;
  d["latency_s"] = lat;
  py::list workers;
  for (const auto& w : e.worker_health()) {
    py::dict x;
    x["queue_depth"] = w.queue_depth;
    x["queue_high_water"] = w.queue_high_water;
    x["sms"] = w.sms;
    x["heartbeat_age_s"] = w.heartbeat_age_s;
    x["standby"] = w.standby;
    x["parked"] = w.parked;
    x["agent_updates"] = w.agent_updates;
    workers.append(x);
  }
  d["workers"] = workers;
  const auto sms = e.sm_health();
  const auto n_sm = static_cast<py::ssize_t>(sms.size());
  py::array_t<int32_t> owner(n_sm);
  py::array_t<uint32_t> status(n_sm), stalls(n_sm);
  py::array_t<double> age(n_sm);
  py::array_t<uint64_t> processed(n_sm);
  for (py::ssize_t i = 0; i < n_sm; ++i) {
    const auto& x = sms[static_cast<size_t>(i)];
    owner.mutable_at(i) = x.owner;
    status.mutable_at(i) = x.status;
    stalls.mutable_at(i) = x.stalls;
    age.mutable_at(i) = x.heartbeat_age_s;
    processed.mutable_at(i) = x.processed;
  }
  py::dict smd;
  smd["owner"] = owner;
  smd["status"] = status;
  smd["stalls"] = stalls;
  smd["heartbeat_age_s"] = age;
  smd["bars"] = processed;
  d["sms"] = smd;
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

// The binding of a per-agent lane setter (set_credit, set_external_scores): (population
// indices, values, journal event bytes), checked for shape, run without the GIL.
template <void (Engine::*Set)(const uint32_t*, const double*, size_t, const std::string&)>
auto lane_setter(const char* name) {
  return [name](Engine& e, const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& agents,
                const py::array_t<double, py::array::c_style | py::array::forcecast>& values, const py::bytes& event) {
    if (agents.ndim() != 1 || values.ndim() != 1 || agents.shape(0) != values.shape(0))
      throw py::value_error(std::string(name) + ": agents and values must be 1-d arrays of the same length");
    const uint32_t* a = agents.data();
    const double* v = values.data();
    const auto n = static_cast<size_t>(agents.shape(0));
    std::string ev = event;
    without_gil([&] { (e.*Set)(a, v, n, ev); });
  };
}

}  // namespace

namespace {
// poll, step and run put what they hand out in the caller's `box` (a list) too, before they
// return: a KeyboardInterrupt that Python raises as the call returns (a ^C that came during it)
// would drop the return value, and those signals were counted and journaled as handed out. The
// caller's except clause finds them there.
void put(const std::optional<py::list>& box, const py::handle& x) {
  if (box) py::list(*box).append(x);  // a new reference to the caller's list
}

template <class T>
py::array_t<T> vec_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}
template <class T>
void array_vec(const py::dict& d, const char* key, std::vector<T>& v) {
  if (!d.contains(key)) throw py::key_error(std::string("agent state lacks '") + key + "'");
  auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(d[key]);
  if (!a || a.ndim() != 1) throw py::type_error(std::string("agent state '") + key + "' must be a 1-d array");
  v.assign(a.data(), a.data() + a.shape(0));
}
// The agent state arrays by name (lane order); the same names in both directions.
#define DC_STATE_FIELDS(X)                                                                                   \
  X(score) X(equity) X(entry_equity) X(peak) X(max_dd) X(ret_sum) X(ret_sq) X(credit) X(ext_score) X(dsi) \
  X(trades) X(wins) X(n_ret) X(quarantined) X(position) X(action)
py::dict state_dict(const StateArrays& s) {
  py::dict d;
#define DC_PUT(f) d[#f] = vec_array(s.f);
  DC_STATE_FIELDS(DC_PUT)
#undef DC_PUT
  return d;
}
StateArrays state_from(const py::dict& d) {
  StateArrays s;
#define DC_GET(f) array_vec(d, #f, s.f);
  DC_STATE_FIELDS(DC_GET)
#undef DC_GET
  return s;
}
py::dict plan_dict(const DevicePlan& p) {
  py::dict d;
#define DC_PLAN(f) d[#f] = vec_array(p.f);
  DC_PLAN(st_instrument) DC_PLAN(st_timeframe) DC_PLAN(st_sm_begin) DC_PLAN(st_sm_end) DC_PLAN(st_ind_begin)
  DC_PLAN(st_feat_begin) DC_PLAN(sm_stream) DC_PLAN(sm_lane_begin) DC_PLAN(sm_lanes) DC_PLAN(ind_kind)
  DC_PLAN(ind_p0) DC_PLAN(ind_p1) DC_PLAN(ind_p2) DC_PLAN(ind_buf) DC_PLAN(feat_kind) DC_PLAN(feat_a)
  DC_PLAN(feat_b) DC_PLAN(feat_c) DC_PLAN(feat_from)
#undef DC_PLAN
  d["buf_size"] = p.buf_size;
  return d;
}
py::dict lanes_dict(const LaneArrays& l) {
  py::dict d;
  static const char* const w[kFeatures] = {"w0", "w1", "w2", "w3", "w4"};
  static const char* const fidx[kFeatures] = {"fidx0", "fidx1", "fidx2", "fidx3", "fidx4"};
  for (int f = 0; f < kFeatures; ++f) {
    d[w[f]] = vec_array(l.w[f]);
    d[fidx[f]] = vec_array(l.fidx[f]);
  }
  d["entry"] = vec_array(l.entry);
  d["cost"] = vec_array(l.cost);
  d["lookback"] = vec_array(l.lookback);
  d["long_short"] = vec_array(l.long_short);
  d["active"] = vec_array(l.active);
  d["external"] = vec_array(l.external);
  return d;
}
}  // namespace

void bind_engine(py::module_& m) {
  m.def("kernel_isa", &kernel_isa,
        "Instruction-set level of the native kernels in use (lane kernel, bank updates, DynamicLoRA): "
        "4 (x86-64-v4), 3 (x86-64-v3) or 0 (baseline). Results are the same bits on every level.");
  m.def("set_kernel_isa", &set_kernel_isa, py::arg("level"),
        "For tests and comparisons: use the kernels of `level`, at most what the CPU supports; not while an "
        "engine runs. Returns the level in use.");
  m.def("validate_bars", [](const py::array& bars, uint32_t n_registered) {
        const Bar* b = records_of<Bar>(bars, "bar");
        const auto n = static_cast<py::ssize_t>(bars.shape(0));
        py::array_t<uint32_t> reasons(n);
        uint32_t* r = reasons.mutable_data();
        without_gil([&] { validate_bars(b, static_cast<size_t>(n), n_registered, r); });
        return reasons;
      }, py::arg("bars"), py::arg("n_registered"),
      "Reject reason of every bar: value checks and time order per (instrument, timeframe).");
  py::class_<Engine> engine(m, "Engine", "Native engine; wrapped by dynamic_core.Engine.");
  engine
      .def(py::init([](const py::array& genomes, int cores_per_sm, uint64_t population_hash,
                       uint32_t dead_letter_capacity, uint32_t block_bars, int threads, uint32_t capacity,
                       uint32_t backpressure, int64_t stall_deadline_ns, bool fault_injection) {
             const Genome* g = records_of<Genome>(genomes, "genome");
             EngineConfig cfg;
             cfg.cores_per_sm = cores_per_sm;
             cfg.population_hash = population_hash;
             cfg.dead_letter_capacity = dead_letter_capacity;
             cfg.block_bars = block_bars;
             cfg.threads = threads;
             cfg.capacity = capacity;
             if (backpressure > 2) throw std::invalid_argument("backpressure must be 0, 1 or 2");
             cfg.backpressure = static_cast<Backpressure>(backpressure);
             cfg.stall_deadline_ns = stall_deadline_ns;
             cfg.fault_injection = fault_injection;
             const auto n = static_cast<size_t>(genomes.shape(0));
             Engine* eng = nullptr;
             without_gil([&] { eng = new Engine(g, n, cfg); });
             // a blocking submit waiting for room (no consumer, say) ends on ^C: the pending
             // signal is checked about every 100 ms (PyErr_CheckSignals runs the handler, which
             // leaves KeyboardInterrupt set; Interrupted is translated to it). Only Python's
             // main thread runs signal handlers, so only it takes the GIL here: another thread
             // (a daemon one, say) coming for the GIL while the interpreter exits would be
             // ended inside this call, aborting the process.
             static const unsigned long main_ident =
                 py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
             eng->set_interrupt_check([] {
               if (PyThread_get_thread_ident() != main_ident || g_exiting.load(std::memory_order_acquire) ||
                   interpreter_finalizing())
                 return false;
               py::gil_scoped_acquire gil;
               return PyErr_CheckSignals() != 0;
             });
             return eng;
           }),
           py::arg("genomes"), py::arg("cores_per_sm") = 128, py::arg("population_hash") = 0,
           py::arg("dead_letter_capacity") = 10000, py::arg("block_bars") = 0, py::arg("threads") = 1,
           py::arg("capacity") = 0, py::arg("backpressure") = 0, py::arg("stall_deadline_ns") = 50000000,
           py::arg("fault_injection") = false)
      .def("submit", [](Engine& e, const py::array& bars, uint32_t n_registered, bool strict, int64_t timeout_ns) {
             const Bar* b = records_of<Bar>(bars, "bar");
             const auto n = static_cast<size_t>(bars.shape(0));
             return without_gil([&] { return e.submit(b, n, n_registered, strict, timeout_ns); });
           }, py::arg("bars"), py::arg("n_registered"), py::arg("strict") = false, py::arg("timeout_ns") = -1,
           "Validate, sequence and dispatch bars; returns how many were taken. strict: a batch with a bad "
           "bar raises InvalidInput and nothing is taken. timeout_ns (>= 0): how long a blocking submit "
           "waits for room before it returns the count it took.")
      .def("poll", [](Engine& e, size_t max_n, int64_t timeout_ns, const std::optional<py::list>& box) {
             // At most `capacity` signals are ever ready; gather them 256 at a time so an empty
             // or small poll does not allocate for max_n.
             const size_t n = std::min<size_t>(max_n, e.capacity());
             std::vector<Signal> out;
             Signal buf[256];
             without_gil([&] {
               int64_t wait = timeout_ns;
               while (out.size() < n) {
                 const size_t k = e.poll(buf, std::min<size_t>(256, n - out.size()), wait);
                 out.insert(out.end(), buf, buf + k);
                 if (k < 256) break;
                 wait = 0;
               }
             });
             auto raw = to_bytes(out.data(), out.size());
             if (!out.empty()) put(box, raw);
             return raw;
           }, py::arg("max_n"), py::arg("timeout_ns"), py::arg("box") = std::nullopt,
           "Up to max_n ready signals in bar order, as bytes; waits up to timeout_ns (<0: forever). "
           "A non-empty result is appended to the list `box` too.")
      .def("count_refused", [](Engine& e, size_t n) { without_gil([&] { e.count_refused(n); }); }, py::arg("n"),
           "Count n bars a feeding call gave up on before taking them: one backpressure event, n "
           "rejected bars (as a submit whose timeout ran out behind another feeder).")
      .def("step", [](Engine& e, const py::object& bar, uint32_t n_registered, int64_t timeout_ns, bool strict,
                      int64_t feed_timeout_ns, const std::optional<py::list>& box) {
             // A 1-d array of one record, or one record itself (a numpy void scalar: its bytes
             // through the buffer protocol, without an array around it).
             Bar b;
             if (py::isinstance<py::array>(bar)) {
               const auto a = py::reinterpret_borrow<py::array>(bar);
               const Bar* p = records_of<Bar>(a, "bar");
               if (a.shape(0) != 1) throw std::invalid_argument("step() takes exactly one bar");
               b = *p;
             } else {
               // Its bytes only (PyBUF_SIMPLE): asked for a format too, numpy builds the record's
               // format string on every call, ~1 us of a step.
               Py_buffer view;
               bool fits = false;
               if (PyObject_GetBuffer(bar.ptr(), &view, PyBUF_SIMPLE) == 0) {
                 fits = view.len == static_cast<Py_ssize_t>(sizeof(Bar));
                 if (fits) std::memcpy(&b, view.buf, sizeof(Bar));
                 PyBuffer_Release(&view);
               } else {
                 PyErr_Clear();  // not a buffer: the TypeError below says what is
               }
               if (!fits) throw py::type_error("step() takes one bar record (56 bytes) or a 1-d array of one");
             }
             Signal s{};
             const int r =
                 without_gil([&] { return e.step(b, n_registered, &s, timeout_ns, strict, feed_timeout_ns); });
             py::bytes raw(reinterpret_cast<const char*>(&s), r == 1 ? sizeof s : 0);
             if (r == 1) put(box, raw);
             return py::make_tuple(r, raw);
           }, py::arg("bar"), py::arg("n_registered"), py::arg("timeout_ns"), py::arg("strict") = false,
           py::arg("feed_timeout_ns") = -1, py::arg("box") = std::nullopt,
           "One bar (a record or a 1-d array of one) in, (1, signal bytes) out; (0, b'') on timeout, (-1, "
           "b'') if no signal is due, (-2, b'') if another feeder held the feed past feed_timeout_ns (<0: no "
           "limit; the bar was not taken). The signal's bytes are appended to the list `box` too.")
      .def("close", [](Engine& e) {
             without_gil([&] { e.close(); });
           }, "Join the worker and sentinel threads.")
      .def("wait_idle", [](Engine& e) {
             without_gil([&] { e.wait_all(); });
           }, "Wait until every submitted bar has been processed.")
      .def("inject_stall", &Engine::inject_stall, py::arg("sm"), py::arg("ns"), py::arg("hold") = false)
      .def("inject_poison", &Engine::inject_poison, py::arg("agent"))
      .def("set_credit", lane_setter<&Engine::set_credit>("set_credit"), py::arg("agents"), py::arg("credit"),
           py::arg("event") = py::bytes(),
           "Set the consensus-weight credit of agents (population indices), between updates.")
      .def("set_external_scores", lane_setter<&Engine::set_external_scores>("set_external_scores"),
           py::arg("agents"), py::arg("scores"), py::arg("event") = py::bytes(),
           "Set the scores of external-score agents (kind 1; population indices), between updates.")
      .def("set_dsi", [](Engine& e, const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& inst,
                         const py::array_t<double, py::array::c_style | py::array::forcecast>& evidence,
                         const py::bytes& event) {
             if (inst.ndim() != 1 || evidence.ndim() != 1 || inst.shape(0) != evidence.shape(0))
               throw py::value_error("set_dsi: instruments and evidence must be 1-d arrays of the same length");
             const uint32_t* a = inst.data();
             const double* v = evidence.data();
             const auto n = static_cast<size_t>(inst.shape(0));
             std::string ev = event;
             return without_gil([&] { return e.set_dsi(a, v, n, ev); });
           }, py::arg("instruments"), py::arg("evidence"), py::arg("event") = py::bytes(),
           "Set the DSI evidence of instruments (ids), read by lanes with w_dsi != 0; returns the streams updated.")
      .def("stream_dsi", [](const Engine& e) {
             const auto n = static_cast<py::ssize_t>(e.layout().streams.size());
             py::array_t<double> v(n);
             py::array_t<uint32_t> f(n);
             for (py::ssize_t s = 0; s < n; ++s) {
               v.mutable_at(s) = e.stream_dsi(static_cast<uint32_t>(s));
               f.mutable_at(s) = e.stream_flags(static_cast<uint32_t>(s));
             }
             return py::make_tuple(v, f);
           }, "(evidence float64, signal flags uint32) per stream, as set_dsi left them; read between updates.")
      .def("run", [](Engine& e, const py::array& bars, uint32_t n_registered, bool strict, const std::optional<py::list>& box) {
             const Bar* b = records_of<Bar>(bars, "bar");
             const auto n = static_cast<size_t>(bars.shape(0));
             std::vector<Signal> out;
             uint64_t taken = 0;
             try {
               without_gil([&] {
                 out.reserve(n);
                 e.run(b, n, n_registered, out, strict, &taken);
               });
             } catch (...) {
               // the signals of the pieces taken before the failure were handed out (journaled
               // as such): kept for the caller rather than dropped here
               put(box, py::make_tuple(to_bytes(out.data(), out.size()), taken));
               throw;
             }
             auto raw = to_bytes(out.data(), out.size());
             put(box, py::make_tuple(raw, taken));
             return raw;
           }, py::arg("bars"), py::arg("n_registered"), py::arg("strict") = false, py::arg("box") = std::nullopt,
           "Process a time-ordered bar batch; returns signal records as bytes. (signals, bars taken) are "
           "appended to the list `box` too, also when it raises: what it had handed out by then.")
      .def("validate", [](Engine& e, const py::array& bars, uint32_t n_registered) {
             const Bar* b = records_of<Bar>(bars, "bar");
             const auto n = static_cast<py::ssize_t>(bars.shape(0));
             py::array_t<uint32_t> reasons(n);
             uint32_t* r = reasons.mutable_data();
             without_gil([&] { e.validate(b, static_cast<size_t>(n), n_registered, r); });
             return reasons;
           }, py::arg("bars"), py::arg("n_registered"),
           "Reject reason of every bar as run() would see it, without changing state.")
      .def("agents", [](Engine& e) {
             // filled in place: no zeroed staging vector and no second copy (20k agents: ~2 MB each)
             py::array_t<uint8_t> out(static_cast<py::ssize_t>(e.n_agents() * sizeof(AgentRecord)));
             auto* rec = reinterpret_cast<AgentRecord*>(out.mutable_data());
             without_gil([&] { e.agents(rec); });
             return out;
           }, "Per-agent state in population order, as bytes.")
      .def("dead_letters", [](Engine& e) {
             std::vector<DeadLetter> d;
             without_gil([&] { d = e.dead_letters(); });
             return to_bytes(d.data(), d.size());
           }, "Rejected bars with reason codes, oldest first, as bytes.")
      .def("evolve", [](Engine& e, const py::dict& config, uint64_t seed, uint32_t generation,
                        const py::bytes& event, const std::vector<uint32_t>& streams) {
             const EvolutionConfig cfg = evolution_config(config);
             const std::string ev = event;
             GenerationReport r;
             r = without_gil([&] { return e.evolve(cfg, seed, generation, ev, streams); });
             py::dict d = report_dict(r);
             without_gil([&] { e.recycle(r); });  // its births buffer serves the next generation
             return d;
           }, py::arg("config"), py::arg("seed"), py::arg("generation"), py::arg("event") = py::bytes(),
           py::arg("streams") = std::vector<uint32_t>{},
           "One generation of evolution between updates; returns the report (births as a uint8 array).")
      .def("genomes", [](Engine& e) {
             std::vector<Genome> out(e.n_agents());
             without_gil([&] { e.genomes(out.data()); });
             return to_bytes(out.data(), out.size());
           }, "The current (evolved) genomes in population order, as bytes.")
      .def("lineage", [](Engine& e) {
             std::vector<Lineage> out(e.n_agents());
             without_gil([&] { e.lineage(out.data()); });
             return to_bytes(out.data(), out.size());
           }, "Lineage of the agent in each population slot, as bytes.")
      .def("in_flight", &Engine::in_flight, "Bars claimed whose signals are not yet polled (lock-free).")
      .def("stats", [](Engine& e) {
             return stats_dict(e);
           })
      .def("admit", [](Engine& e, const py::array& bars, uint32_t n_registered, bool strict) {
             const Bar* b = records_of<Bar>(bars, "bar");
             const auto n = static_cast<size_t>(bars.shape(0));
             std::vector<AdmittedBar> out;
             without_gil([&] {
               out.reserve(n);
               e.admit(b, n, n_registered, out, strict);
             });
             return to_bytes(out.data(), out.size());
           }, py::arg("bars"), py::arg("n_registered"), py::arg("strict") = false,
           "Device backends: validate, sequence and journal a batch without running it; returns "
           "the bars to run as admitted records (stream, index in batch, index in stream, seq), as bytes.")
      .def("emit_external", [](Engine& e, const py::array& signals, uint64_t updates, uint64_t quarantined,
                               double seconds) {
             const Signal* s = records_of<Signal>(signals, "signal");
             const auto n = static_cast<size_t>(signals.shape(0));
             without_gil([&] { e.emit_external(s, n, updates, quarantined, seconds); });
           }, py::arg("signals"), py::arg("updates"), py::arg("quarantined"), py::arg("seconds"),
           "Device backends: journal and count signals computed outside the workers.")
      .def("device_plan", [](const Engine& e) { return plan_dict(e.device_plan()); },
           "Streams, SMs, per-stream banks (indicators, features) for a device backend.")
      .def("lane_arrays", [](const Engine& e) { return lanes_dict(e.lane_arrays()); },
           "Per-lane parameters (structure of arrays, lane order).")
      .def("read_state", [](Engine& e) {
             StateArrays s;
             without_gil([&] { e.read_state(s); });
             return state_dict(s);
           }, "Per-lane agent state (structure of arrays, lane order).")
      .def("write_state", [](Engine& e, const py::dict& d) {
             StateArrays s = state_from(d);
             without_gil([&] { e.write_state(s); });
           }, py::arg("state"), "Replaces the per-lane agent state (as read_state returns it).")
      .def("layout", &layout_dict)
      .def_property_readonly("n_agents", &Engine::n_agents);
  bind_engine_journal(engine);
}

}  // namespace dynamic_core::bindings
