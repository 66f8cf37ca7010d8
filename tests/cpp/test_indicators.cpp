// Streaming indicators on hand-computed sequences.
#include <cmath>
#include <vector>

#include "check.hpp"
#include "dynamic_core/indicators.hpp"

using namespace dynamic_core;

int main() {
  {  // EMA(3): SMA seed of the first 3 values, then k = 0.5
    Ema e;
    e.init(3);
    CHECK(!e.update(1.0));
    CHECK(!e.update(2.0));
    CHECK(e.update(3.0));
    CHECK_EQ(e.value, 2.0);
    CHECK(e.update(6.0));
    CHECK_EQ(e.value, 4.0);
  }
  {  // RSI(2): first value after 2 differences, Wilder smoothing after
    Rsi r;
    r.init(2);
    CHECK(!r.update(10.0));
    CHECK(!r.update(11.0));  // +1
    CHECK(r.update(10.0));   // -1 -> gain 0.5, loss 0.5
    CHECK_EQ(r.value, 50.0);
    CHECK(r.update(12.0));  // +2 -> gain (0.5+2)/2 = 1.25, loss 0.25
    CHECK(std::fabs(r.value - 100.0 * 1.25 / 1.5) < 1e-12);
  }
  {  // ATR(2) from true ranges
    Atr a;
    a.init(2);
    CHECK(!a.update(11, 9, 10));
    CHECK(!a.update(12, 10, 11));  // TR 2
    CHECK(a.update(15, 11, 14));   // TR 4 -> 3
    CHECK_EQ(a.value, 3.0);
    CHECK(a.update(14, 13, 13.5));  // TR max(1, |14-14|, |14-13|) = 1 -> (3 + 1) / 2
    CHECK_EQ(a.value, 2.0);
  }
  {  // MACD(2, 3, 2): fast seeded on the 2 bars ending at bar 2
    Macd m;
    m.init(2, 3, 2);
    CHECK(!m.update(1.0));
    CHECK(!m.update(2.0));
    CHECK(!m.update(3.0));  // slow = 2, fast = 2.5, macd 0.5
    CHECK_EQ(m.macd, 0.5);
    CHECK(m.update(7.0));  // slow = 4.5, fast = 2.5 + (7 - 2.5) * 2/3 = 5.5, macd 1, signal 0.75
    CHECK_EQ(m.macd, 1.0);
    CHECK_EQ(m.signal, 0.75);
    CHECK_EQ(m.hist, 0.25);
  }
  {  // ROC(2) = (x / x[t-2] - 1) * 100
    std::vector<double> buf(2);
    Roc r;
    r.init(2);
    CHECK(!r.update(100.0, buf.data()));
    CHECK(!r.update(50.0, buf.data()));
    CHECK(r.update(110.0, buf.data()));
    CHECK(std::fabs(r.value - 10.0) < 1e-12);
    CHECK(r.update(100.0, buf.data()));
    CHECK(std::fabs(r.value - 100.0) < 1e-12);
  }
  {  // score_to_action thresholds and soft()
    CHECK_EQ(score_to_action(0.6), 2);
    CHECK_EQ(score_to_action(0.2), 1);
    CHECK_EQ(score_to_action(0.1999), 0);
    CHECK_EQ(score_to_action(-0.2), -1);
    CHECK_EQ(score_to_action(-0.7), -2);
    CHECK_EQ(soft(1.0), 0.5);
    CHECK_EQ(soft(-3.0), -0.75);
    CHECK(!dc_finite(INFINITY) && !dc_finite(NAN) && dc_finite(1e308));
  }
  {  // warp tree: pairwise order, exact on integers
    double v[32];
    for (int i = 0; i < 32; ++i) v[i] = i;
    CHECK_EQ(warp_tree(v), 496.0);
  }
  return finish("test_indicators");
}
