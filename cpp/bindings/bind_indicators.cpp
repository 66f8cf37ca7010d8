// Batch forms of the streaming indicators: the code the agents run, over a whole array.
#include <limits>
#include <stdexcept>

#include "../dynamic_core/indicators.hpp"
#include "../dynamic_core/population.hpp"
#include "common.hpp"

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

template <class State, class F>
Arr unary(const Arr& x, int32_t n, F value) {
  check_period(n);
  const double* in = in1d(x, "x");
  const auto len = x.shape(0);
  Arr out = out_like(len);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    State s;
    s.init(n);
    for (py::ssize_t i = 0; i < len; ++i) o[i] = s.update(in[i]) ? value(s) : kNaN;
  }
  return out;
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
        {
          py::gil_scoped_release nogil;
          Atr s;
          s.init(n);
          for (py::ssize_t i = 0; i < len; ++i) o[i] = s.update(ph[i], pl[i], pc[i]) ? s.value : kNaN;
        }
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
        {
          py::gil_scoped_release nogil;
          Macd st;
          st.init(f, s, sig);
          for (py::ssize_t i = 0; i < len; ++i) {
            const bool w = st.update(in[i]);
            pa[i] = w ? st.macd : kNaN;
            pb[i] = w ? st.signal : kNaN;
            pc[i] = w ? st.hist : kNaN;
          }
        }
        return py::make_tuple(a, b, c);
      }, py::arg("x"), py::arg("fast"), py::arg("slow"), py::arg("signal"));
  ind.def("roc", [](const Arr& x, int32_t n) {
        check_period(n);
        const double* in = in1d(x, "x");
        const auto len = x.shape(0);
        Arr out = out_like(len);
        double* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          std::vector<double> buf(static_cast<size_t>(n));
          Roc s;
          s.init(n);
          for (py::ssize_t i = 0; i < len; ++i) o[i] = s.update(in[i], buf.data()) ? s.value : kNaN;
        }
        return out;
      }, py::arg("x"), py::arg("n"));
  ind.def("ew_bands", [](const Arr& x, int32_t n) {
        check_period(n);
        const double* in = in1d(x, "x");
        const auto len = x.shape(0);
        Arr mean = out_like(len), var = out_like(len), pos = out_like(len);
        double *pm = mean.mutable_data(), *pv = var.mutable_data(), *pp = pos.mutable_data();
        {
          py::gil_scoped_release nogil;
          Ew s;
          s.init(n);
          for (py::ssize_t i = 0; i < len; ++i) {
            const bool w = s.update(in[i]);
            pm[i] = w ? s.mean : kNaN;
            pv[i] = w ? s.var : kNaN;
            pp[i] = w ? bb_feature(in[i], s.mean, s.var) : kNaN;
          }
        }
        return py::make_tuple(mean, var, pos);
      }, py::arg("x"), py::arg("n"));
}

}  // namespace dynamic_core::bindings
