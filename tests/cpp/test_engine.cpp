// Engine: layout, rejects, determinism across block sizes.
#include <algorithm>
#include <cmath>
#include <random>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.hpp"
#include "dynamic_core/engine.hpp"
#include "dynamic_core/evolution.hpp"

using namespace dynamic_core;

static std::vector<Genome> population(size_t n) {
  std::vector<Genome> g(n);
  for (size_t i = 0; i < n; ++i) {
    Genome x{};
    x.agent_id = static_cast<uint32_t>(i);
    x.instrument = static_cast<uint32_t>(i % 2);
    x.timeframe = 60;
    x.mode = static_cast<uint32_t>(i % 2);
    x.fast = 2 + static_cast<int32_t>(i % 7);
    x.slow = 10 + static_cast<int32_t>(i % 11);
    x.rsi_period = 3 + static_cast<int32_t>(i % 5);
    x.macd_fast = 3;
    x.macd_slow = 8;
    x.macd_signal = 4;
    x.atr_period = 5;
    x.bb_period = 6;
    x.mom_period = 4;
    x.w_trend = 1.0;
    x.w_rsi = (i % 3) ? 0.5 : 0.0;
    x.w_macd = 0.25;
    x.w_bb = -0.3;
    x.w_mom = 0.1;
    x.entry = 0.05 * static_cast<double>(i % 4);
    x.cost_bps = 1.0;
    g[i] = x;
  }
  return g;
}

static std::vector<Bar> bars(size_t n) {
  std::vector<Bar> b;
  uint64_t s = 12345;
  double px[2] = {100.0, 50.0};
  for (size_t t = 0; t < n; ++t)
    for (uint32_t k = 0; k < 2; ++k) {
      s = s * 6364136223846793005ULL + 1442695040888963407ULL;
      const double u = static_cast<double>(s >> 11) / 9007199254740992.0 - 0.5;
      const double o = px[k];
      const double c = o * (1.0 + 0.01 * u);
      px[k] = c;
      b.push_back(Bar{static_cast<int64_t>(t) * 60000000000LL, k, 60, o, std::fmax(o, c) * 1.001,
                      std::fmin(o, c) * 0.999, c, 100.0});
    }
  return b;
}

// A generation's report median (median_bucket, then the bucket's values to median_finish, as
// Engine::evolve does) against a full sort, including an even count whose lower middle value
// lies in an earlier bucket than the upper one.
static void check_median() {
  auto exact = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2.0;
  };
  auto bucketed = [](const std::vector<double>& v) {
    std::vector<uint32_t> count(kValueBuckets, 0);
    for (double x : v) ++count[value_bucket(x)];
    const MedianBucket m = median_bucket(v.size(), count.data());
    std::vector<double> tmp;
    for (double x : v)
      if (value_bucket(x) == m.b) tmp.push_back(x);
    return median_finish(m, tmp, [&](auto&& fn) {
      for (double x : v) fn(x);
    });
  };
  std::mt19937_64 g(5);
  std::normal_distribution<double> nd(0.01, 0.2);
  for (size_t n : {1, 2, 3, 4, 7, 100, 101, 5000, 5001}) {
    std::vector<double> v(n);
    for (double& x : v) x = nd(g);
    CHECK_EQ(bucketed(v), exact(v));
  }
  CHECK_EQ(bucketed({1.0, 2.0}), 1.5);            // the lower middle in an earlier bucket
  CHECK_EQ(bucketed({-3.0, -0.5, 0.25, 9.0}), -0.125);
  CHECK_EQ(bucketed({2.0, 2.0, 2.0, 5.0}), 2.0);  // ties within one bucket
}

// wait_all: every submitted bar is fused when it returns, so a poll without waiting takes them
// all (a group published its progress before its worker fused the bar: the last signals could
// still be on their way, and a set_dsi after a wait could land in an earlier bar's signal)
static void check_wait_all_fuses() {
  const auto g = population(1200);
  const auto b = bars(3000);  // 750 rounds
  EngineConfig cfg;
  cfg.cores_per_sm = 32;  // many SMs, so the last finisher of a bar is often another worker
  cfg.threads = 2;
  Engine e(g.data(), g.size(), cfg);
  std::vector<Signal> out(b.size());
  size_t short_polls = 0;
  for (size_t i = 0; i + 8 <= b.size(); i += 8) {
    size_t sent = 0;
    while (sent < 8) sent += e.submit(b.data() + i + sent, 8 - sent, 2);
    e.wait_all();
    const size_t k = e.poll(out.data(), out.size(), 0);
    short_polls += k != 8;
    if (k != 8) e.poll(out.data(), out.size(), 1'000'000'000);  // take the rest before going on
  }
  CHECK_EQ(short_polls, 0u);
  e.close();
}

int main() {
  check_median();
  check_wait_all_fuses();
  const auto g = population(300);
  const auto b = bars(400);
  EngineConfig cfg;
  cfg.cores_per_sm = 64;
  Engine e1(g.data(), g.size(), cfg);
  // 150 agents per stream -> 5 warps -> SMs of 2, 2, 1 warps
  CHECK_EQ(e1.layout().streams.size(), 2u);
  CHECK_EQ(e1.layout().sms.size(), 6u);
  CHECK_EQ(e1.layout().sms[2].n_warps, 1u);
  CHECK_EQ(e1.layout().sms[2].n_active, 22u);

  std::vector<Signal> s1, s2;
  e1.run(b.data(), b.size(), 2, s1);
  CHECK_EQ(s1.size(), b.size());
  EngineConfig cfg2 = cfg;
  cfg2.block_bars = 7;
  Engine e2(g.data(), g.size(), cfg2);
  for (size_t i = 0; i < b.size(); i += 33) e2.run(b.data() + i, std::min<size_t>(33, b.size() - i), 2, s2);
  CHECK_EQ(s1.size(), s2.size());
  CHECK(std::memcmp(s1.data(), s2.data(), s1.size() * sizeof(Signal)) == 0);
  std::vector<AgentRecord> a1(g.size()), a2(g.size());
  e1.agents(a1.data());
  e2.agents(a2.data());
  CHECK(std::memcmp(a1.data(), a2.data(), a1.size() * sizeof(AgentRecord)) == 0);
  CHECK(s1.back().n_agents > 0);
  // Bars run SM by SM in blocks (the default here) and bar by bar: the same signals and state.
  for (uint32_t ub : {1u, 5u}) {
    EngineConfig cu = cfg;
    cu.unit_block = ub;
    Engine eu(g.data(), g.size(), cu);
    std::vector<Signal> su;
    eu.run(b.data(), b.size(), 2, su);
    CHECK_EQ(su.size(), s1.size());
    CHECK(std::memcmp(su.data(), s1.data(), s1.size() * sizeof(Signal)) == 0);
    std::vector<AgentRecord> au(g.size());
    eu.agents(au.data());
    CHECK(std::memcmp(au.data(), a1.data(), a1.size() * sizeof(AgentRecord)) == 0);
  }

  // rejects: each reason counted, processing continues
  Engine e3(g.data(), g.size(), cfg);
  auto bad = bars(20);
  bad[3].close = NAN;
  bad[5].high = bad[5].low / 2;
  bad[7].volume = -1;
  bad[9].instrument = 99;
  bad[12].ts = bad[8].ts;  // same stream (instrument 0), older than its previous bar
  std::vector<Signal> s3;
  e3.run(bad.data(), bad.size(), 2, s3);
  const EngineStats& st = e3.stats();
  CHECK_EQ(st.rejected, 5u);
  CHECK_EQ(st.rejects[static_cast<int>(Reason::NonFinite)], 1u);
  CHECK_EQ(st.rejects[static_cast<int>(Reason::HighBelowLow)], 1u);
  CHECK_EQ(st.rejects[static_cast<int>(Reason::NegativeVolume)], 1u);
  CHECK_EQ(st.rejects[static_cast<int>(Reason::UnknownInstrument)], 1u);
  CHECK_EQ(st.rejects[static_cast<int>(Reason::OutOfOrder)], 1u);
  CHECK_EQ(s3.size(), bad.size() - 5);
  CHECK_EQ(e3.dead_letters().size(), 5u);

  // invalid genomes and configuration throw
  auto broken = g;
  broken[17].fast = 0;
  bool threw = false;
  try {
    Engine e4(broken.data(), broken.size(), cfg);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  try {
    EngineConfig c;
    c.cores_per_sm = 40;
    Engine e5(g.data(), g.size(), c);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  // Threads: bit-identical to one thread, in batch mode and in streaming mode with a stalled SM
  // moved to the standby worker (this test also runs under ThreadSanitizer in CI).
  {
    EngineConfig c1 = cfg;
    c1.threads = 1;
    Engine one(g.data(), g.size(), c1);
    std::vector<Signal> ref;
    one.run(b.data(), b.size(), 2, ref);
    CHECK(std::memcmp(ref.data(), s1.data(), ref.size() * sizeof(Signal)) == 0);
    for (int threads : {2, 3}) {
      EngineConfig ct = cfg;
      ct.threads = threads;
      ct.capacity = 64;
      ct.stall_deadline_ns = 5'000'000;
      ct.fault_injection = true;
      ct.backpressure = Backpressure::RejectNew;  // this thread is also the consumer
      Engine many(g.data(), g.size(), ct);
      std::vector<Signal> got(b.size());
      size_t n_got = 0, sent = 0;
      many.inject_stall(1, 200'000'000);
      while (n_got < b.size()) {
        if (sent < b.size()) sent += many.submit(b.data() + sent, std::min<size_t>(16, b.size() - sent), 2);
        n_got += many.poll(got.data() + n_got, b.size() - n_got, 1'000'000);
      }
      CHECK(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(Signal)) == 0);
      CHECK(many.failovers() >= 1);
      std::vector<AgentRecord> am(g.size());
      many.agents(am.data());
      CHECK(std::memcmp(a1.data(), am.data(), am.size() * sizeof(AgentRecord)) == 0);
      many.close();
    }
  }
  // Slot reuse under repeated failovers: a window of 8 bars and a stall on a different SM every
  // 40 bars, so workers keep meeting positions whose groups were adopted, completed and whose
  // slots were refilled (the seqlock on slot tags); still bit-identical to one thread.
  {
    EngineConfig c1 = cfg;
    c1.threads = 1;
    Engine one(g.data(), g.size(), c1);
    std::vector<Signal> ref;
    one.run(b.data(), b.size(), 2, ref);
    EngineConfig ct = cfg;
    ct.threads = 2;
    ct.capacity = 8;
    ct.stall_deadline_ns = 2'000'000;
    ct.fault_injection = true;
    ct.backpressure = Backpressure::RejectNew;
    Engine many(g.data(), g.size(), ct);
    std::vector<Signal> got(b.size());
    size_t n_got = 0, sent = 0, next_stall = 0;
    uint32_t victim = 0;
    while (n_got < b.size()) {
      if (sent >= next_stall && next_stall < b.size()) {
        many.inject_stall(victim, 6'000'000);
        victim = (victim + 1) % static_cast<uint32_t>(many.layout().sms.size());
        next_stall += 40;
      }
      if (sent < b.size()) sent += many.submit(b.data() + sent, std::min<size_t>(4, b.size() - sent), 2);
      n_got += many.poll(got.data() + n_got, b.size() - n_got, 1'000'000);
    }
    CHECK(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(Signal)) == 0);
    CHECK(many.failovers() >= 1);
    many.close();
  }
  // evolution: generations between streamed bars on 2 workers give the same children and the
  // same signals as on 1 worker in batch mode (also run under TSan)
  {
    EvolutionConfig ec;
    ec.min_age = 50;
    ec.replace_fraction = 0.25;
    ec.p_period = 1.0;
    ec.p_migrate = 0.5;
    std::vector<Signal> ref, got(b.size());
    std::vector<Genome> g_ref(g.size()), g_got(g.size());
    uint64_t births = 0;
    {
      Engine one(g.data(), g.size(), cfg);
      for (size_t i = 0; i < b.size(); i += 100) {
        one.run(b.data() + i, 100, 2, ref);
        births += one.evolve(ec, 7, static_cast<uint32_t>(i / 100 + 1)).births.size();
      }
      one.genomes(g_ref.data());
    }
    CHECK(births > 50);
    EngineConfig ct = cfg;
    ct.threads = 2;
    Engine two(g.data(), g.size(), ct);
    size_t n_got = 0;
    for (size_t i = 0; i < b.size(); i += 100) {
      size_t sent = 0;
      while (sent < 100) sent += two.submit(b.data() + i + sent, 100 - sent, 2);
      two.evolve(ec, 7, static_cast<uint32_t>(i / 100 + 1));
      while (n_got < i + 100) n_got += two.poll(got.data() + n_got, i + 100 - n_got, 1'000'000);
    }
    two.genomes(g_got.data());
    CHECK(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(Signal)) == 0);
    CHECK(std::memcmp(g_ref.data(), g_got.data(), g_ref.size() * sizeof(Genome)) == 0);
    bool threw = false;
    try {
      EvolutionConfig badc;
      badc.replace_fraction = 2.0;
      two.evolve(badc, 1, 9);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  }
  // a blocking submit waiting for room leaves ingress free for changes: the thread that is its
  // only consumer evolves and sets credit between pieces of the batch (they used to wait for the
  // whole batch, which waited for them: a deadlock); every bar is taken once (also under TSan)
  {
    EvolutionConfig ec;
    ec.min_age = 30;
    ec.replace_fraction = 0.25;
    EngineConfig ct = cfg;
    ct.threads = 2;
    ct.capacity = 16;
    ct.backpressure = Backpressure::Block;
    Engine two(g.data(), g.size(), ct);
    size_t taken = 0;
    std::thread producer([&] { taken = two.submit(b.data(), b.size(), 2); });
    std::vector<Signal> got(b.size());
    size_t n_got = 0, births = 0;
    uint32_t gen = 0;
    while (n_got < b.size()) {
      n_got += two.poll(got.data() + n_got, b.size() - n_got, 1'000'000);
      if (n_got >= 80 * (gen + 1) && gen < 4) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        births += two.evolve(ec, 11, ++gen).births.size();
        const uint32_t a = 0;
        const double credit = 1.5;
        two.set_credit(&a, &credit, 1);
      }
    }
    producer.join();
    CHECK(taken == b.size());
    CHECK(births > 0);
    CHECK(two.stats().backpressure_events > 0);
    for (size_t i = 1; i < got.size(); ++i) CHECK(got[i].seq > got[i - 1].seq);
    two.close();
  }
  // a generation large enough to run its per-SM phases on the engine's threads (>= 16,384
  // lanes) breeds the same children, ids and lineage on 1, 2 and 3 threads (also under TSan)
  {
    const auto big = population(20000);
    const auto bb = bars(220);  // 440 bars, 220 per stream
    EvolutionConfig ec;
    ec.min_age = 50;
    ec.p_migrate = 0.5;
    std::vector<Genome> ref_g(big.size());
    std::vector<Birth> ref_b;
    double ref_stats[3] = {};  // best, median, mean: the median's bucket is collected per thread
    for (int th : {1, 2, 3}) {
      EngineConfig c = cfg;
      c.threads = th;
      c.stall_deadline_ns = 60'000'000'000;  // slow under TSan: no failover here, this is about evolution
      Engine e(big.data(), big.size(), c);
      std::vector<Signal> out;
      e.run(bb.data(), 240, 2, out);
      GenerationReport r1 = e.evolve(ec, 11, 1);
      CHECK(!r1.births.empty());
      if (th > 1) {
        e.recycle(r1);  // the second report reuses the first one's births buffer
        CHECK(r1.births.empty());
      }
      e.run(bb.data() + 240, 200, 2, out);
      const GenerationReport r = e.evolve(ec, 11, 2);
      std::vector<Genome> gg(big.size());
      e.genomes(gg.data());
      if (th == 1) {
        CHECK(r.births.size() > 1000);
        ref_g = gg;
        ref_b = r.births;
        ref_stats[0] = r.best, ref_stats[1] = r.median, ref_stats[2] = r.mean;
        CHECK(std::isfinite(r.median) && r.best >= r.median);
      } else {
        const double got[3] = {r.best, r.median, r.mean};
        CHECK(std::memcmp(got, ref_stats, sizeof got) == 0);
        CHECK_EQ(r.births.size(), ref_b.size());
        CHECK(std::memcmp(r.births.data(), ref_b.data(), ref_b.size() * sizeof(Birth)) == 0);
        CHECK(std::memcmp(gg.data(), ref_g.data(), gg.size() * sizeof(Genome)) == 0);
      }
    }
  }
  return finish("test_engine");
}
