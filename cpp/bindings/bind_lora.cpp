// DynamicLoRA's fused per-parameter update (used by dynamic_core.learning.lora.layer).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../dynamic_core/detmath.hpp"
#include "../dynamic_core/lora.hpp"
#include "../dynamic_core/threads.hpp"
#include "common.hpp"

namespace dynamic_core::bindings {

namespace {

// Runs fn(a, b) over k ranges that split [0, n) (k threads at most).
template <class F>
void split_into(size_t n, size_t k, F fn) {
  if (k <= 1) {
    fn(size_t{0}, n);
    return;
  }
  // ranges handed out in turn: threads that could not be started leave theirs to the others
  std::atomic<size_t> next{0};
  run_threads(static_cast<int>(k), [&](int) {
    for (size_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < k;) fn(n * t / k, n * (t + 1) / k);
  }, [] {});
}

// Runs fn(a, b) over ranges that split [0, n) among at most `threads` threads and n / 64 + 1 (a
// thread is not worth fewer rows); rows are independent, so any split gives the same bits.
template <class F>
void split_rows(size_t n, int threads, F fn) {
  split_into(n, threads > 1 ? std::min<size_t>(static_cast<size_t>(threads), n / 64 + 1) : 1, fn);
}

// `h` as the numpy array it must be: never converted (a converted temporary would die while its
// data pointer is still used, and a write to it would be lost).
py::array as_array(const py::handle& h, const char* what) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(std::string(what) + ": expected a numpy array, got " +
                         py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>());
  return py::reinterpret_borrow<py::array>(h);
}

// Checks dtype, C-contiguity, writability and shape; returns the data pointer.
template <class T>
T* view(const py::handle& h, std::initializer_list<py::ssize_t> shape, const char* what, bool write = false) {
  const py::array a = as_array(h, what);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(what) + ": expected dtype " + py::str(py::dtype::of<T>()).cast<std::string>() +
                         ", got " + py::str(a.dtype()).cast<std::string>());
  if (!(a.flags() & py::array::c_style)) throw py::type_error(std::string(what) + " must be C-contiguous");
  if (write && !a.writeable()) throw py::type_error(std::string(what) + " must be writable");
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()))
    throw py::value_error(std::string(what) + ": expected " + std::to_string(shape.size()) + " dimensions");
  size_t k = 0;
  for (py::ssize_t n : shape)
    if (a.shape(k++) != n) throw py::value_error(std::string(what) + ": shape does not match the layer");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// A bool array's bytes (phase, pinned, finite flags): any other dtype is refused, not
// reinterpreted.
uint8_t* flags(const py::handle& h, std::initializer_list<py::ssize_t> shape, const char* what, bool write) {
  py::array a = as_array(h, what);
  if (a.dtype().kind() != 'b')
    throw py::type_error(std::string(what) + ": expected dtype bool, got " + py::str(a.dtype()).cast<std::string>());
  return view<uint8_t>(a.view("u1"), shape, what, write);
}

template <class T>
lora::Matrix<T> matrix(const py::tuple& t, py::ssize_t S, py::ssize_t r, py::ssize_t d) {
  if (t.size() != 8) throw py::value_error("a matrix is (P, P0, out, phase, dense, terms, col, log_col)");
  lora::Matrix<T> m;
  m.P = view<T>(t[0], {S, r, d}, "P");
  m.P0 = view<T>(t[1], {S, r, d}, "P0");
  m.out = view<T>(t[2], {S, r, d}, "out", true);
  m.phase = flags(t[3], {S, r, d}, "phase", true);
  if (m.out == m.P) throw py::value_error("out may not be P");
  if (!t[4].is_none()) m.dense = view<T>(t[4], {S, r, d}, "dense");
  // the terms' arrays are held by the caller's own list (never a copy that dies here)
  const py::object terms = t[5];
  if (!py::isinstance<py::list>(terms) && !py::isinstance<py::tuple>(terms))
    throw py::type_error("terms must be a list of (rank-side, dim-side) pairs");
  for (auto item : terms) {
    if (!py::isinstance<py::tuple>(item) || py::len(item) != 2) throw py::value_error("a term is (rank-side, dim-side)");
    const auto pair = py::reinterpret_borrow<py::tuple>(item);
    m.terms.push_back({view<T>(pair[0], {S, r}, "term rank side"), view<T>(pair[1], {S, d}, "term dim side")});
  }
  m.col = view<double>(t[6], {S, d}, "line trace");
  m.log_col = view<double>(t[7], {S, d}, "log of the line trace");
  return m;
}

template <class T>
void run(size_t s0, size_t s1, int threads, const py::array& c, const py::array& mid, const py::array& log_mid,
         const py::array& thr, const py::object& pinned, double dec_s, double dec_f, const py::tuple& A,
         const py::tuple& B, const py::array& entropy, const py::array& total, const py::object& finite) {
  const py::ssize_t S = c.ndim() == 1 ? c.shape(0) : -1;
  const py::ssize_t r = mid.ndim() == 2 ? mid.shape(1) : -1;
  const py::array P = as_array(A[0], "P");
  const py::ssize_t d = P.ndim() == 3 ? P.shape(2) : -1;
  if (S < 1 || r < 1 || d < 1) throw py::value_error("c (slots,), mid (slots, rank) and A (slots, rank, dim) expected");
  if (s0 > s1 || s1 > static_cast<size_t>(S)) throw py::value_error("slot range out of bounds");
  lora::Update<T> u;
  u.rank = static_cast<size_t>(r);
  u.dim = static_cast<size_t>(d);
  u.c = view<T>(c, {S}, "c");
  u.mid = view<double>(mid, {S, r}, "mid");
  u.log_mid = view<double>(log_mid, {S, r}, "log_mid");
  u.threshold = view<double>(thr, {S}, "threshold");
  if (!pinned.is_none()) u.pinned = flags(pinned, {S, r}, "pinned", false);
  u.dec_screened = static_cast<T>(dec_s);
  u.dec_free = static_cast<T>(dec_f);
  u.log_params = detmath::log(static_cast<double>(2 * r * d));  // the Python path's value
  u.entropy = view<double>(entropy, {S}, "entropy", true);
  u.total = view<double>(total, {S}, "total", true);
  if (!finite.is_none()) u.finite = flags(finite, {S}, "finite", true);
  const lora::Matrix<T> ma = matrix<T>(A, S, r, d), mb = matrix<T>(B, S, r, d);
  without_gil([&] {
    split_rows(s1 - s0, threads, [&](size_t a, size_t b) { lora::update(u, ma, mb, s0 + a, s0 + b); });
  });
}

// M (n, rank, dim): each row its own matrix; M (rank, dim): one matrix for every row (x's rows
// count the agents). Either way a row's result depends on that row and its matrix only.
template <class T>
py::array stacked_product(const py::array& x, const py::array& M, bool rd, int threads) {
  if (M.ndim() != 3 && M.ndim() != 2)
    throw py::value_error("M must be (n, rank, dim), or (rank, dim) shared by every row");
  const bool shared = M.ndim() == 2;
  if (shared && x.ndim() != 2) throw py::value_error(rd ? "x must be (n, dim)" : "y must be (n, rank)");
  const py::ssize_t n = shared ? x.shape(0) : M.shape(0);
  const py::ssize_t r = M.shape(shared ? 0 : 1), d = M.shape(shared ? 1 : 2);
  const T* pm = shared ? view<T>(M, {r, d}, "M") : view<T>(M, {n, r, d}, "M");
  const T* px = view<T>(x, {n, rd ? d : r}, rd ? "x (n, dim)" : "y (n, rank)");
  py::array_t<T> out(std::vector<py::ssize_t>{n, rd ? r : d});
  T* po = out.mutable_data();
  const size_t R = static_cast<size_t>(r), D = static_cast<size_t>(d), ms = shared ? 0 : R * D;
  without_gil([&] {
    split_rows(static_cast<size_t>(n), threads, [&](size_t a, size_t b) {
      if (rd)
        lora::rd_dot(px + a * D, pm + a * ms, po + a * R, b - a, R, D, ms);
      else
        lora::r_rows(px + a * R, pm + a * ms, po + a * D, b - a, R, D, ms);
    });
  });
  return out;
}

py::array dispatch_product(const py::array& x, const py::array& M, bool rd, int threads) {
  if (M.dtype().is(py::dtype::of<double>())) return stacked_product<double>(x, M, rd, threads);
  if (M.dtype().is(py::dtype::of<float>())) return stacked_product<float>(x, M, rd, threads);
  throw py::type_error("M must be float32 or float64");
}

template <class T>
py::array xty(const py::array& X, const py::array& Y, int threads) {
  if (X.ndim() != 2 || Y.ndim() != 2) throw py::value_error("X (n, p) and Y (n, q) expected");
  const py::ssize_t n = X.shape(0), p = X.shape(1), q = Y.shape(1);
  const T* px = view<T>(X, {n, p}, "X");
  const T* py_ = view<T>(Y, {n, q}, "Y (as many rows as X)");
  py::array_t<T> out(std::vector<py::ssize_t>{p, q});
  T* po = out.mutable_data();
  const size_t N = static_cast<size_t>(n), P = static_cast<size_t>(p), Q = static_cast<size_t>(q);
  // threads split the output rows p: each output's sum is the same on any split (a thread is
  // not worth fewer than 2^16 products)
  const size_t k = threads > 1 ? std::min({static_cast<size_t>(threads), P, N * P * Q / 65536 + 1}) : 1;
  without_gil([&] { split_into(P, k, [&](size_t a, size_t b) { lora::xty(px, py_, po, N, P, Q, a, b); }); });
  return out;
}

template <class T>
void record(const py::array& h, const py::array& u, const py::array& delta, const py::object& w, bool shared,
            const py::array& t_in, const py::array& t_mid, const py::array& t_out, const py::array& t_rms,
            const py::array& t_sig, int threads) {
  if (h.ndim() != 2 || u.ndim() != 2) throw py::value_error("h (n, dim) and u (n, rank) expected");
  const py::ssize_t n = h.shape(0), d = h.shape(1), r = u.shape(1);
  const py::ssize_t S = shared ? 1 : n;
  const T* ph = view<T>(h, {n, d}, "h");
  const T* pu = view<T>(u, {n, r}, "u");
  const T* pd = view<T>(delta, {n, d}, "delta");
  const double* pw = w.is_none() ? nullptr : view<double>(w, {n}, "w");
  double* ti = view<double>(t_in, {S, d}, "t_in", true);
  double* tm = view<double>(t_mid, {S, r}, "t_mid", true);
  double* to = view<double>(t_out, {S, d}, "t_out", true);
  double* tr = view<double>(t_rms, {S}, "t_rms", true);
  double* ts = view<double>(t_sig, {S, r}, "t_sig", true);
  without_gil([&] {
    if (shared) {  // sums over rows: one thread, rows in order
      lora::record(ph, pu, pd, pw, n, r, d, true, ti, tm, to, tr, ts);
      return;
    }
    const size_t R = static_cast<size_t>(r), D = static_cast<size_t>(d);
    split_rows(static_cast<size_t>(n), threads, [&](size_t a, size_t b) {
      lora::record(ph + a * D, pu + a * R, pd + a * D, pw != nullptr ? pw + a : nullptr, b - a, R, D, false,
                   ti + a * D, tm + a * R, to + a * D, tr + a, ts + a * R);
    });
  });
}

}  // namespace

void bind_lora(py::module_& m) {
  m.def("lora_rd_dot",
        [](const py::array& x, const py::array& M, int threads) { return dispatch_product(x, M, true, threads); },
        py::arg("x"), py::arg("M"), py::arg("threads") = 1,
        "u[n, j] = sum_i x[n, i] M[n, j, i] for (n, dim) x and (n, rank, dim) M (or M[j, i]: one (rank, dim) M "
        "for every row), in a fixed order (internal).");
  m.def("lora_r_rows",
        [](const py::array& y, const py::array& M, int threads) { return dispatch_product(y, M, false, threads); },
        py::arg("y"), py::arg("M"), py::arg("threads") = 1,
        "out[n, i] = sum_j y[n, j] M[n, j, i] for (n, rank) y and (n, rank, dim) M (or M[j, i]: one (rank, dim) "
        "M for every row), rank by rank (internal).");
  m.def("lora_xty",
        [](const py::array& X, const py::array& Y, int threads) {
          if (X.dtype().is(py::dtype::of<double>())) return xty<double>(X, Y, threads);
          if (X.dtype().is(py::dtype::of<float>())) return xty<float>(X, Y, threads);
          throw py::type_error("X must be float32 or float64");
        },
        py::arg("X"), py::arg("Y"), py::arg("threads") = 1,
        "X.T @ Y for (n, p) X and (n, q) Y of one dtype: rows in blocks of 32 in order, each block summed row "
        "by row, the block sums added in order (internal).");
  m.def("lora_record",
        [](const py::array& h, const py::array& u, const py::array& delta, const py::object& w, bool shared,
           const py::array& t_in, const py::array& t_mid, const py::array& t_out, const py::array& t_rms,
           const py::array& t_sig, int threads) {
          if (h.dtype().is(py::dtype::of<double>()))
            record<double>(h, u, delta, w, shared, t_in, t_mid, t_out, t_rms, t_sig, threads);
          else if (h.dtype().is(py::dtype::of<float>()))
            record<float>(h, u, delta, w, shared, t_in, t_mid, t_out, t_rms, t_sig, threads);
          else
            throw py::type_error("activations must be float32 or float64");
        },
        py::arg("h"), py::arg("u"), py::arg("delta"), py::arg("w"), py::arg("shared"), py::arg("t_in"),
        py::arg("t_mid"), py::arg("t_out"), py::arg("t_rms"), py::arg("t_sig"), py::arg("threads") = 1,
        "Fold one pass's activations into a layer's tick accumulators (internal; see "
        "DynamicLoRALayer.record_interaction).");
  m.def("lora_fold",
        [](const py::array& act, const py::array& t, const py::array& c, double k, double omk) {
          if (act.ndim() != 2) throw py::value_error("act must be (slots, width)");
          const py::ssize_t n = act.shape(0), w = act.shape(1);
          const double* pa = view<double>(act, {n, w}, "act");
          double* pt = view<double>(t, {n, w}, "t", true);
          const double* pc = view<double>(c, {n}, "c");
          if (static_cast<const void*>(pa) == static_cast<const void*>(pt)) throw py::value_error("act may not be t");
          py::array_t<double> out(std::vector<py::ssize_t>{n, w});
          double* po = out.mutable_data();
          without_gil([&] { lora::fold(pa, pt, po, pc, n, w, k, omk); });
          return out;
        },
        py::arg("act"), py::arg("t"), py::arg("c"), py::arg("k"), py::arg("omk"),
        "k * act + omk * (t / c[:, None]) as a new array; t is zeroed (internal).");
  m.def("lora_update",
        [](size_t s0, size_t s1, int threads, const py::array& c, const py::array& mid, const py::array& log_mid,
           const py::array& thr, const py::object& pinned, double dec_s, double dec_f, const py::tuple& A,
           const py::tuple& B, const py::array& entropy, const py::array& total, const py::object& finite) {
          if (A.size() != 8 || B.size() != 8)
            throw py::value_error("a matrix is (P, P0, out, phase, dense, terms, col, log_col)");
          const py::array P = as_array(A[0], "P");
          if (P.dtype().is(py::dtype::of<double>()))
            run<double>(s0, s1, threads, c, mid, log_mid, thr, pinned, dec_s, dec_f, A, B, entropy, total, finite);
          else if (P.dtype().is(py::dtype::of<float>()))
            run<float>(s0, s1, threads, c, mid, log_mid, thr, pinned, dec_s, dec_f, A, B, entropy, total, finite);
          else
            throw py::type_error("parameters must be float32 or float64");
        },
        py::arg("s0"), py::arg("s1"), py::arg("threads"), py::arg("c"), py::arg("mid"), py::arg("log_mid"),
        py::arg("threshold"), py::arg("pinned"), py::arg("dec_screened"), py::arg("dec_free"), py::arg("A"),
        py::arg("B"), py::arg("entropy"), py::arg("total"), py::arg("finite") = py::none(),
        "DynamicLoRA update of slots [s0, s1) of a stacked layer in one pass per matrix (internal; see "
        "dynamic_core.learning.lora.layer). A and B are (P, P0, out, phase, dense, terms, col, log_col); writes "
        "out, phase, each slot's entropy and total activity, and into `finite` (slots,) bool when given whether "
        "all of a slot's updated parameters are finite; `threads` splits the slots.");
}

}  // namespace dynamic_core::bindings
