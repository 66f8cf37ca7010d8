// Batch forms of the streaming indicators: the code the agents run, over a whole array.
#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../dynamic_core/detmath.hpp"
#include "../dynamic_core/dsi.hpp"
#include "../dynamic_core/ew.hpp"
#include "../dynamic_core/indicators.hpp"
#include "../dynamic_core/kernel.hpp"
#include "../dynamic_core/population.hpp"
#include "common.hpp"

#include <pybind11/stl.h>

namespace dynamic_core::bindings {

namespace {
using Arr = py::array_t<double, py::array::c_style | py::array::forcecast>;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

const double* in1d(const Arr& a, const char* name) {
  if (a.ndim() != 1) throw py::type_error(std::string(name) + " must be 1-dimensional");
  return a.data();
}
void check_period(int32_t n) {
  if (n < 1 || n > kMaxPeriod)
    throw std::invalid_argument("period must be in [1, " + std::to_string(kMaxPeriod) + "], got " +
                                std::to_string(n));
}
Arr out_like(py::ssize_t n) { return Arr(n); }

// Span over every element of a float64 array of any shape, into a new array of that shape.
template <void (*Span)(const double*, double*, long)>
Arr elementwise(const Arr& x) {
  Arr out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const double* in = x.data();
  double* o = out.mutable_data();
  without_gil([&] { Span(in, o, static_cast<long>(x.size())); });
  return out;
}
template <double (*F)(double)>
void each(const double* x, double* o, long n) {
  for (long i = 0; i < n; ++i) o[i] = F(x[i]);
}

// (n, k) of a 1-d (k = 1) or 2-d float64 array of series side by side.
std::pair<size_t, size_t> series_shape(const Arr& x) {
  if (x.ndim() == 1) return {static_cast<size_t>(x.shape(0)), 1};
  if (x.ndim() == 2) return {static_cast<size_t>(x.shape(0)), static_cast<size_t>(x.shape(1))};
  throw py::type_error("x must be 1- or 2-dimensional (ticks, series)");
}
// The k carried values: a scalar (every series) or k of them.
std::vector<double> carried(const Arr& v, size_t k, const char* name) {
  if (v.ndim() == 0 || (v.ndim() == 1 && v.shape(0) == 1)) return std::vector<double>(k, *v.data());
  if (v.ndim() == 1 && static_cast<size_t>(v.shape(0)) == k) return {v.data(), v.data() + k};
  throw std::invalid_argument(std::string(name) + " must be a scalar or hold one value per series (" +
                              std::to_string(k) + ")");
}
Arr like(const Arr& x) {
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  return Arr(shape);
}
// An expert's calls as (index int64, sign int8) arrays.
py::tuple calls_pair(const dsi::Calls& c) {
  py::array_t<int64_t> idx(static_cast<py::ssize_t>(c.index.size()));
  py::array_t<int8_t> sg(static_cast<py::ssize_t>(c.sign.size()));
  std::copy(c.index.begin(), c.index.end(), idx.mutable_data());
  std::copy(c.sign.begin(), c.sign.end(), sg.mutable_data());
  return py::make_tuple(idx, sg);
}
Arr state_out(const std::vector<double>& v) {
  Arr out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

template <class State, class F>
Arr unary(const Arr& x, int32_t n, F value) {
  check_period(n);
  const double* in = in1d(x, "x");
  const auto len = x.shape(0);
  Arr out = out_like(len);
  double* o = out.mutable_data();
  without_gil([&] {
    State s;
    s.init(n);
    for (py::ssize_t i = 0; i < len; ++i) o[i] = s.update(in[i]) ? value(s) : kNaN;
  });
  return out;
}
// detmath::log over an array, in its vectorisable form: an x86-64-v3 build where the CPU has it
// (the same bits: no FMA contraction, element-wise operations only).
void log_span(const double* x, double* o, long n) { detmath::log_array(x, o, n); }
#if DC_X86_DISPATCH
[[gnu::target(DC_ISA_V3)]] void log_span_v3(const double* x, double* o, long n) { detmath::log_array(x, o, n); }
#endif

void log_dispatch(const double* x, double* o, long n) {
#if DC_X86_DISPATCH
  if (kernel_isa() >= 3) return log_span_v3(x, o, n);
#endif
  log_span(x, o, n);
}

}  // namespace

void bind_indicators(py::module_& m) {
  py::module_& ind = m;  // batch indicator functions (NaN during warm-up)
  ind.def("ema", [](const Arr& x, int32_t n) { return unary<Ema>(x, n, [](const Ema& s) { return s.value; }); },
          py::arg("x"), py::arg("n"));
  ind.def("rsi", [](const Arr& x, int32_t n) { return unary<Rsi>(x, n, [](const Rsi& s) { return s.value; }); },
          py::arg("x"), py::arg("n"));
  ind.def("atr", [](const Arr& h, const Arr& l, const Arr& c, int32_t n) {
        check_period(n);
        const double *ph = in1d(h, "high"), *pl = in1d(l, "low"), *pc = in1d(c, "close");
        const auto len = c.shape(0);
        if (h.shape(0) != len || l.shape(0) != len) throw std::invalid_argument("high, low and close differ in length");
        Arr out = out_like(len);
        double* o = out.mutable_data();
        without_gil([&] {
          Atr s;
          s.init(n);
          for (py::ssize_t i = 0; i < len; ++i) o[i] = s.update(ph[i], pl[i], pc[i]) ? s.value : kNaN;
        });
        return out;
      }, py::arg("high"), py::arg("low"), py::arg("close"), py::arg("n"));
  ind.def("macd", [](const Arr& x, int32_t f, int32_t s, int32_t sig) {
        check_period(f);
        check_period(s);
        check_period(sig);
        const double* in = in1d(x, "x");
        const auto len = x.shape(0);
        Arr a = out_like(len), b = out_like(len), c = out_like(len);
        double *pa = a.mutable_data(), *pb = b.mutable_data(), *pc = c.mutable_data();
        without_gil([&] {
          Macd st;
          st.init(f, s, sig);
          for (py::ssize_t i = 0; i < len; ++i) {
            const bool w = st.update(in[i]);
            pa[i] = w ? st.macd : kNaN;
            pb[i] = w ? st.signal : kNaN;
            pc[i] = w ? st.hist : kNaN;
          }
        });
        return py::make_tuple(a, b, c);
      }, py::arg("x"), py::arg("fast"), py::arg("slow"), py::arg("signal"));
  ind.def("roc", [](const Arr& x, int32_t n) {
        check_period(n);
        const double* in = in1d(x, "x");
        const auto len = x.shape(0);
        Arr out = out_like(len);
        double* o = out.mutable_data();
        without_gil([&] {
          std::vector<double> buf(static_cast<size_t>(n));
          Roc s;
          s.init(n);
          for (py::ssize_t i = 0; i < len; ++i) o[i] = s.update(in[i], buf.data()) ? s.value : kNaN;
        });
        return out;
      }, py::arg("x"), py::arg("n"));
  ind.def("ew_bands", [](const Arr& x, int32_t n) {
        check_period(n);
        const double* in = in1d(x, "x");
        const auto len = x.shape(0);
        Arr mean = out_like(len), var = out_like(len), pos = out_like(len);
        double *pm = mean.mutable_data(), *pv = var.mutable_data(), *pp = pos.mutable_data();
        without_gil([&] {
          Ew s;
          s.init(n);
          for (py::ssize_t i = 0; i < len; ++i) {
            const bool w = s.update(in[i]);
            pm[i] = w ? s.mean : kNaN;
            pv[i] = w ? s.var : kNaN;
            pp[i] = w ? bb_feature(in[i], s.mean, s.var) : kNaN;
          }
        });
        return py::make_tuple(mean, var, pos);
      }, py::arg("x"), py::arg("n"));

  // The DSI experts' sequential passes (ew.hpp, dsi.hpp).
  ind.def("ew_moments", [](const Arr& x, double alpha, const Arr& mean0, const Arr& var0) {
        const auto [n, k] = series_shape(x);
        std::vector<double> mean = carried(mean0, k, "mean"), var = carried(var0, k, "var");
        Arr mb = like(x), vb = like(x);
        without_gil([&] {
          ew::moments(x.data(), n, k, alpha, mean.data(), var.data(), mb.mutable_data(), vb.mutable_data());
        });
        return py::make_tuple(mb, vb, state_out(mean), state_out(var));
      }, py::arg("x"), py::arg("alpha"), py::arg("mean"), py::arg("var"),
      "West's EW mean and variance of the series of x (1-d or (n, k)) before each row, from the "
      "state (mean, var); returns (mean_before, var_before, mean, var), the last two the state after x.");
  ind.def("dsi_runs", [](const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ts, const Arr& price,
                         const Arr& size, const py::array_t<int8_t, py::array::c_style | py::array::forcecast>& move,
                         const py::array_t<int8_t, py::array::c_style | py::array::forcecast>& aggressor,
                         const Arr& zsize, const std::vector<double>& params, py::array_t<double, py::array::c_style> state,
                         py::array_t<int64_t, py::array::c_style> start_ts) {
        const py::ssize_t n = price.size();
        auto column = [n](const py::array& a) {
          if (a.ndim() != 1 || a.size() != n) throw std::invalid_argument("the tick columns must be 1-d and of one length");
        };
        column(ts), column(price), column(size), column(move), column(aggressor), column(zsize);
        if (params.size() != 8) throw std::invalid_argument("params: 8 values (see RunExperts)");
        if (state.ndim() != 1 || state.size() != dsi::kRunState || !state.writeable())
          throw std::invalid_argument("state: a writeable float64 array of " + std::to_string(dsi::kRunState));
        if (start_ts.ndim() != 1 || start_ts.size() != 1 || !start_ts.writeable())
          throw std::invalid_argument("start_ts: a writeable int64 array of 1");
        const dsi::RunParams p{params[0], params[1], static_cast<int64_t>(params[2]), params[3],
                               params[4],  params[5], params[6],                      params[7]};
        dsi::Calls mo, ex, sw;
        double* st = state.mutable_data();
        int64_t* t0 = start_ts.mutable_data();
        without_gil([&] {
          dsi::runs(ts.data(), price.data(), size.data(), move.data(), aggressor.data(), zsize.data(),
                    static_cast<size_t>(n), p, st, *t0, mo, ex, sw);
        });
        return py::make_tuple(calls_pair(mo), calls_pair(ex), calls_pair(sw));
      }, py::arg("ts"), py::arg("price"), py::arg("size"), py::arg("move"), py::arg("aggressor"), py::arg("zsize"),
      py::arg("params"), py::arg("state").noconvert(), py::arg("start_ts").noconvert(),
      "The DSI run experts over one instrument's ticks (dsi.hpp); state and start_ts are "
      "carried in place. Returns ((index, sign) of momentum, exhaustion, sweep).");
  ind.def("dsi_divergence", [](const Arr& price, const std::vector<int64_t>& params,
                               py::array_t<double, py::array::c_style> state, py::array_t<double, py::array::c_style> tail) {
        if (price.ndim() != 1) throw std::invalid_argument("price must be 1-d");
        if (params.size() != 5) throw std::invalid_argument("params: rsi_period, macd_fast, macd_slow, pivot, warmup");
        const dsi::DivParams p{static_cast<int32_t>(params[0]), static_cast<int32_t>(params[1]),
                               static_cast<int32_t>(params[2]), static_cast<int32_t>(params[3]), params[4]};
        if (p.rsi_period < 1 || p.macd_fast < 1 || p.macd_slow <= p.macd_fast || p.pivot < 1 || p.pivot > 10'000)
          throw std::invalid_argument("need rsi_period >= 1, 1 <= macd_fast < macd_slow, 1 <= pivot <= 10000");
        if (state.ndim() != 1 || state.size() != dsi::kDivState || !state.writeable())
          throw std::invalid_argument("state: a writeable float64 array of " + std::to_string(dsi::kDivState));
        if (tail.ndim() != 2 || tail.shape(0) != 2 * p.pivot || tail.shape(1) != 3 || !tail.writeable())
          throw std::invalid_argument("tail: a writeable float64 array of (2 * pivot, 3)");
        dsi::Calls rc, mc;
        double* st = state.mutable_data();
        double* tl = tail.mutable_data();
        Arr rsi = out_like(price.size()), macd = out_like(price.size());
        without_gil([&] {
          dsi::divergence(price.data(), static_cast<size_t>(price.size()), p, st, tl, rc, mc, rsi.mutable_data(),
                          macd.mutable_data());
        });
        return py::make_tuple(calls_pair(rc), calls_pair(mc), rsi, macd);
      }, py::arg("price"), py::arg("params"), py::arg("state").noconvert(), py::arg("tail").noconvert(),
      "The DSI divergence verifier over one instrument's trade prices (dsi.hpp); state and "
      "tail are carried in place. Returns ((index, sign) of rsi_divergence, of macd_divergence, the RSI and "
      "the MACD line at each tick).");

  // the same bits on every machine (cpp/dynamic_core/detmath.hpp; dynamic_core.detmath wraps these)
  m.def("det_exp", &elementwise<each<detmath::exp>>, py::arg("x"),
        "e^x, elementwise, the same bits on any machine.");
  m.def("det_exp2", &elementwise<each<detmath::exp2>>, py::arg("x"),
        "2^x, elementwise, the same bits on any machine.");
  m.def("det_expm1", &elementwise<each<detmath::expm1>>, py::arg("x"),
        "e^x - 1, elementwise, the same bits on any machine.");
  m.def("det_log", &elementwise<log_dispatch>, py::arg("x"),
        "Natural log, elementwise, the same bits on any machine.");
  m.def("det_tanh", &elementwise<each<detmath::tanh>>, py::arg("x"),
        "tanh, elementwise, the same bits on any machine.");
  m.def("det_cos2pi", &elementwise<each<detmath::cos2pi>>, py::arg("u"),
        "cos(2 pi u), elementwise, the same bits on any machine.");
  // one float: a plain call, ~10x cheaper than the array path for the scalar reads of the DSI
  // and the learning agents
  m.def("det_exp1", &detmath::exp, py::arg("x"), "e^x of one float (detmath).");
  m.def("det_exp21", &detmath::exp2, py::arg("x"), "2^x of one float (detmath).");
  m.def("det_expm11", &detmath::expm1, py::arg("x"), "e^x - 1 of one float (detmath).");
  m.def("det_log1", &detmath::log, py::arg("x"), "Natural log of one float (detmath).");
  m.def("det_tanh1", &detmath::tanh, py::arg("x"), "tanh of one float (detmath).");
  m.def("det_cos2pi1", &detmath::cos2pi, py::arg("u"), "cos(2 pi u) of one float (detmath).");
}

}  // namespace dynamic_core::bindings
