"""Routing policy (rules, filters, breaker, cooldown, throttling, budgets) and the narrative cache.

Time is driven by hand: every Router and cache here gets a fake monotonic clock and a fake wall
clock, so windows, cooldowns, breaker timeouts and UTC midnights are exact.
"""

from __future__ import annotations

import math

import pytest
from dynamic_core.errors import PolicyError
from dynamic_core.reasoning.cache import NarrativeCache
from dynamic_core.reasoning.client import parse_retry_after
from dynamic_core.reasoning.policy import (
    DEFAULT_POLICY_TOML,
    REQUEST_CLASSES,
    SKIP_REASONS,
    PolicyConfig,
    Router,
    RouteRequest,
    load_policy,
    routing_rules,
)
from dynamic_core.reasoning.profiles import BUILTIN_PROFILES, ProviderProfile
from hypothesis import given, settings
from hypothesis import strategies as st

NOON = 1_795_219_200.0 + 12 * 3600.0  # 2026-11-21 12:00 UTC
assert NOON % 86400.0 == 12 * 3600.0


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def prof(name: str, **kw) -> ProviderProfile:
    kw.setdefault("latency_class", "fast")
    return ProviderProfile(name=name, base_url="http://127.0.0.1:9/v1", model="m", **kw)


PROFILES = {
    "a": prof("a", usd_per_m_input=1.0, usd_per_m_output=2.0),
    "b": prof("b", usd_per_m_input=0.5, usd_per_m_output=1.0, languages=("zh", "en"), personas=("risk",)),
    "c": prof("c", usd_per_m_input=0.1, usd_per_m_output=0.1, languages=("en", "ja")),
    "d": prof("d"),
    "e": prof("e"),
    "local": BUILTIN_PROFILES["local"],
}


def make(policy: dict, profiles: dict | None = None) -> tuple[Router, Clock, Clock]:
    clock, wall = Clock(), Clock(NOON)
    router = Router(load_policy(policy), profiles or PROFILES, clock=clock, wall_clock=wall)
    return router, clock, wall


def req(request_class: str = "deep", **kw) -> RouteRequest:
    kw.setdefault("tokens_in", 100)
    kw.setdefault("tokens_out", 50)
    return RouteRequest(request_class=request_class, **kw)


def skipped(router: Router, name: str) -> dict[str, int]:
    return router.stats()[name]["skipped"]


# ---- loading ----------------------------------------------------------------------------------


def test_default_policy_loads_and_routes_every_class() -> None:
    cfg = load_policy(None)
    assert cfg == load_policy(DEFAULT_POLICY_TOML)
    router = Router(cfg, BUILTIN_PROFILES)
    assert {r.request_class for r in cfg.rules} >= set(REQUEST_CLASSES)
    for rc in REQUEST_CLASSES:
        lang = {"regional-CN": "zh", "multilingual": "ja"}.get(rc, "en")
        route = router.route(RouteRequest(request_class=rc, persona="analyst", deadline_s=30.0,
                                          tokens_in=800, tokens_out=200, language=lang))
        assert route[-1] == "local"
        remote = route[:-1]
        assert 1 <= len(remote) <= cfg.fallback_cap, (rc, route)
        if rc == "regional-CN":
            assert all("zh" in BUILTIN_PROFILES[p].languages for p in remote)
            assert remote == ["qwen", "deepseek", "kimi"]
        if rc == "multilingual":
            assert all("ja" in BUILTIN_PROFILES[p].languages for p in remote)
    # a tight tactical deadline goes straight to the narrator
    assert router.route(RouteRequest(request_class="tactical", deadline_s=1.0)) == ["local"]


def test_routing_table_overrides_the_policy_rules_and_can_be_dropped() -> None:
    router, _, _ = make({"rules": [{"request_class": "*", "candidates": ["a", "b"]}]})
    assert router.route(req("deep")) == ["a", "b", "local"]
    router.set_overrides(routing_rules({"deep": "c, d", "tactical/risk": "b"}))
    assert router.route(req("deep")) == ["c", "d", "local"]  # the override, in its order
    assert router.route(req("numeric")) == ["a", "b", "local"]  # not overridden: the policy
    assert router.route(req("tactical", persona="risk")) == ["b", "local"]
    assert router.route(req("tactical", persona="macro")) == ["a", "local"]  # b does not speak macro
    # the most specific override first, whatever the table's order
    router.set_overrides(routing_rules({"*": "e", "deep//fx": "d"}))
    assert router.route(req("deep", asset_class="fx")) == ["d", "local"]
    assert router.route(req("deep", asset_class="crypto")) == ["e", "local"]
    assert router.overrides and router.route(req("numeric")) == ["e", "local"]
    router.set_overrides(())
    assert router.route(req("deep")) == ["a", "b", "local"] and router.overrides == ()


@pytest.mark.parametrize("table, msg", [
    ({"bogus": "a"}, "unknown request class 'bogus'"),
    ({"deep/x/y/z": "a"}, "expected CLASS"),
    ({"": "a"}, "expected CLASS"),
    ({"deep": ""}, "expected PROVIDER"),
    ({"deep": "a,,b"}, "expected PROVIDER"),
    ({"deep": "x" * 65}, "routing entry 'deep'"),
])
def test_routing_table_that_does_not_parse_is_refused(table, msg) -> None:
    with pytest.raises(PolicyError, match=msg):
        routing_rules(table)


def test_routing_override_naming_an_unknown_provider_changes_nothing() -> None:
    router, _, _ = make({"rules": [{"request_class": "*", "candidates": ["a"]}]})
    router.set_overrides(routing_rules({"deep": "b"}))
    with pytest.raises(PolicyError, match="unknown provider 'zz'"):
        router.set_overrides(routing_rules({"deep": "c", "numeric": "zz"}))
    assert router.route(req("deep")) == ["b", "local"]  # the table in force before


def test_load_policy_from_file_str_and_pathlike(tmp_path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('fallback_cap = 1\n[[rules]]\nrequest_class = "deep"\ncandidates = ["a", "b"]\n')
    assert load_policy(str(path)).fallback_cap == 1
    assert load_policy(path).rules[0].candidates == ("a", "b")
    assert load_policy({"fallback_cap": 2}).fallback_cap == 2
    with pytest.raises(PolicyError, match="missing.toml"):
        load_policy(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["missing.toml", "conf/missing", "Policy.TOML"])
def test_missing_policy_file_named_by_str_says_so(tmp_path, monkeypatch, name) -> None:
    # a str that looks like a path but names no file is a missing file, not TOML text
    monkeypatch.chdir(tmp_path)
    for source in (name, str(tmp_path / name)):
        with pytest.raises(PolicyError, match=r"file does not exist") as info:
            load_policy(source)
        assert "TOML syntax" not in str(info.value)
    # one-line TOML text is still parsed as text
    assert load_policy("fallback_cap = 2").fallback_cap == 2
    with pytest.raises(PolicyError, match="TOML syntax error"):
        load_policy("fallback_cap 2")
    (tmp_path / "conf").mkdir()
    with pytest.raises(PolicyError, match="conf") as info:
        load_policy("conf/")
    assert "TOML syntax" not in str(info.value)


@pytest.mark.parametrize("source, needle", [
    ({"rules": [{"request_class": "deep", "candidates": ["a"], "bogus": 1}]}, r"bogus.*\$\.rules\[0\]"),
    ({"fallback_cap": "three"}, r"\$\.fallback_cap"),
    ({"rules": [{"request_class": "shallow", "candidates": ["a"]}]}, r"\$\.rules\[0\]\.request_class"),
    ({"rules": [{"request_class": "deep", "candidates": []}]}, r"\$\.rules\[0\]\.candidates"),
    ({"breaker": {"failure_pct": 0.0}}, r"\$\.breaker\.failure_pct"),
    ({"limits": {"a": {"rpm": -1}}}, r"\$\.limits\.a\.rpm"),
    ({"limits": {"a": {"rmp": 5}}}, r"rmp.*\$\.limits\.a"),
    ("fallback_cap = 3\nrules = [", r"TOML syntax error"),
    ("colour = 'red'\n", r"unknown field `colour`"),
])
def test_bad_policy_names_the_field(source, needle) -> None:
    with pytest.raises(PolicyError, match=needle):
        load_policy(source)


@pytest.mark.parametrize("policy, where", [
    ({"rules": [{"request_class": "deep", "candidates": ["a", "nosuch"]}]}, r"'nosuch' in rules\[0\]"),
    ({"limits": {"ghost": {"rpm": 1}}}, "'ghost' in limits"),
    ({"default_candidates": ["zzz"]}, "'zzz' in default_candidates"),
    ({"last_resort": "narrator"}, "'narrator' in last_resort"),
])
def test_router_refuses_unknown_providers(policy, where) -> None:
    with pytest.raises(PolicyError, match=where):
        Router(load_policy(policy), PROFILES)


def test_unknown_request_class_is_refused() -> None:
    router, _, _ = make({})
    with pytest.raises(PolicyError, match="request class"):
        router.route(req("strategic"))


# ---- rule matching ----------------------------------------------------------------------------


def test_rule_specificity_beats_file_order() -> None:
    rules = [
        {"request_class": "*", "candidates": ["a"]},
        {"request_class": "deep", "persona": "macro", "asset_class": "crypto", "candidates": ["e"]},
        {"request_class": "deep", "candidates": ["b"]},
        {"request_class": "deep", "persona": "macro", "candidates": ["c"]},
        {"request_class": "deep", "asset_class": "crypto", "candidates": ["d"]},
    ]
    router, _, _ = make({"rules": rules, "default_candidates": ["d"]})
    assert router.route(req("numeric")) == ["a", "local"]
    assert router.route(req("deep")) == ["b", "local"]
    assert router.route(req("deep", persona="macro")) == ["c", "local"]
    assert router.route(req("deep", asset_class="crypto")) == ["d", "local"]
    assert router.route(req("deep", persona="macro", asset_class="crypto")) == ["e", "local"]
    assert router.route(req("deep", persona="swing", asset_class="crypto")) == ["d", "local"]


@pytest.mark.parametrize("first", ["persona", "asset"])
def test_equal_specificity_ties_in_file_order(first) -> None:
    by_persona = {"request_class": "deep", "persona": "macro", "candidates": ["c"]}
    by_asset = {"request_class": "deep", "asset_class": "crypto", "candidates": ["d"]}
    rules = [by_persona, by_asset] if first == "persona" else [by_asset, by_persona]
    router, _, _ = make({"rules": rules})
    got = router.route(req("deep", persona="macro", asset_class="crypto"))
    assert got == (["c", "local"] if first == "persona" else ["d", "local"])


def test_deadline_rules_apply_only_under_their_bound() -> None:
    rules = [
        {"request_class": "tactical", "candidates": ["a"]},
        {"request_class": "tactical", "max_deadline_ms": 2000, "candidates": ["c"]},
        {"request_class": "tactical", "max_deadline_ms": 500, "candidates": ["local"]},
    ]
    router, _, _ = make({"rules": rules, "throttle_margin": 0.01})
    assert router.route(req("tactical", deadline_s=3.0)) == ["a", "local"]
    assert router.route(req("tactical", deadline_s=2.0)) == ["c", "local"]
    assert router.route(req("tactical", deadline_s=0.5)) == ["local"]  # the tighter bound wins


def test_no_matching_rule_uses_default_candidates() -> None:
    router, _, _ = make({"rules": [{"request_class": "deep", "candidates": ["a"]}],
                         "default_candidates": ["c", "d"]})
    assert router.route(req("numeric")) == ["c", "d", "local"]
    router, _, _ = make({})
    assert router.route(req("numeric")) == ["local"]  # default_candidates = ("local",)


# ---- filters ----------------------------------------------------------------------------------

RULE_AB = {"rules": [{"request_class": "*", "candidates": ["a", "c", "b"]}]}


def test_daily_token_budget_and_utc_midnight_reset() -> None:
    router, _, wall = make({**RULE_AB, "limits": {"a": {"daily_tokens": 1000}}})
    assert router.budget_left("a") == {"tokens": 1000, "usd": None}
    assert router.route(req(tokens_in=600, tokens_out=200))[0] == "a"
    router.record_result("a", ok=True, latency_s=0.5, tokens_in=300, tokens_out=100)
    assert router.budget_left("a") == {"tokens": 600, "usd": None}
    assert router.route(req(tokens_in=500, tokens_out=100))[0] == "a"  # exactly 600: fits
    assert router.route(req(tokens_in=600, tokens_out=200)) == ["c", "b", "local"]
    assert skipped(router, "a") == {"budget": 1}
    wall.t = NOON + 12 * 3600.0 - 1.0  # 23:59:59 UTC: same day
    assert router.route(req(tokens_in=600, tokens_out=200))[0] == "c"
    wall.t = NOON + 12 * 3600.0  # midnight
    assert router.budget_left("a") == {"tokens": 1000, "usd": None}
    assert router.route(req(tokens_in=600, tokens_out=200))[0] == "a"
    assert router.stats()["a"]["tokens_in"] == 300  # lifetime counters survive the reset


def test_attempts_in_flight_hold_their_spend_and_sends_are_checked_again() -> None:
    """Routing happens when a task is queued; by the time it is sent, attempts routed on the
    same unspent budget may be in flight. Each holds its prompt plus max_tokens until its
    result comes, and admits_send refuses what would pass the budget or the quota."""
    router, _, _ = make({**RULE_AB, "limits": {"a": {"daily_tokens": 1000, "rpm": 3}}})
    assert router.route(req(tokens_in=300, tokens_out=100))[0] == "a"
    assert router.admits_send("a", 300, 100) == ""
    router.record_start("a", 300, 100)  # holds 400
    assert router.admits_send("a", 300, 100) == ""
    router.record_start("a", 300, 100)  # holds 800: 200 left to hold
    assert router.admits_send("a", 300, 100) == "budget"
    assert router.route(req(tokens_in=300, tokens_out=100))[0] == "c"  # routing sees the holds too
    router.record_result("a", ok=True, latency_s=0.1, tokens_in=250, tokens_out=50)  # spent 300, frees 400
    assert router.budget_left("a") == {"tokens": 700, "usd": None}
    assert router.admits_send("a", 150, 100) == ""  # 700 - 400 held >= 250
    router.record_start("a", 150, 100)
    assert router.admits_send("a", 10, 10) == "rate"  # the minute's third start was the last
    assert skipped(router, "a") == {"budget": 2, "rpm": 1}
    assert router.admits_send("local", 10**9, 10**9) == ""  # the last resort spends nothing


def test_a_named_attempt_releases_its_own_hold() -> None:
    # results arrive out of order: the small attempt answers first and must free its own 110,
    # not the 900 of the large one sent before it (which stays held until its own result)
    router, _, _ = make({**RULE_AB, "limits": {"a": {"daily_tokens": 2000}}})
    router.record_start("a", 800, 100, attempt=(1, 0))
    router.record_start("a", 100, 10, attempt=(2, 0))
    router.record_result("a", ok=True, latency_s=0.1, tokens_in=100, tokens_out=10, attempt=(2, 0))
    assert router.budget_left("a") == {"tokens": 1890, "usd": None}
    assert router.admits_send("a", 900, 90) == ""  # 1890 - 900 held = 990 >= 990
    assert router.admits_send("a", 900, 91) == "budget"
    router.record_result("a", ok=False, latency_s=0.1, error_kind="timeout", attempt=(1, 0))
    assert router.admits_send("a", 1800, 90) == ""  # nothing held now
    with pytest.raises(ValueError, match=r"attempt \(3, 0\) at a was started already"):
        router.record_start("a", 1, 1, attempt=(3, 0))
        router.record_start("a", 1, 1, attempt=(3, 0))


def test_daily_usd_budget() -> None:
    # a: $1 per M input, $2 per M output
    router, _, wall = make({**RULE_AB, "limits": {"a": {"daily_usd": 0.0015}}})
    router.record_result("a", ok=True, latency_s=0.1, tokens_in=500, tokens_out=250)  # $0.0010
    assert router.budget_left("a")["usd"] == pytest.approx(0.0005)
    assert router.stats()["a"]["usd"] == pytest.approx(0.001)
    assert router.route(req(tokens_in=300, tokens_out=50))[0] == "a"  # $0.0004: fits
    assert router.route(req(tokens_in=400, tokens_out=60))[0] == "c"  # $0.00052
    assert skipped(router, "a") == {"budget": 1}
    wall.advance(86400.0)
    assert router.budget_left("a")["usd"] == 0.0015


def test_rpm_quota_sliding_minute() -> None:
    router, clock, _ = make({**RULE_AB, "limits": {"a": {"rpm": 2}}})
    assert router.route(req())[0] == "a"
    router.record_start("a", 100)
    clock.advance(10.0)
    assert router.route(req())[0] == "a"
    router.record_start("a", 100)
    assert router.route(req())[0] == "c"
    assert skipped(router, "a") == {"rpm": 1}
    clock.advance(49.9)  # 59.9 s after the first start
    assert router.route(req())[0] == "c"
    clock.advance(0.2)  # the first start left the window
    assert router.route(req())[0] == "a"
    assert router.stats()["a"]["started"] == 2


def test_tpm_quota_is_corrected_by_actual_tokens() -> None:
    router, clock, _ = make({**RULE_AB, "limits": {"a": {"tpm": 1000}}})
    assert router.route(req(tokens_in=500, tokens_out=100))[0] == "a"
    router.record_start("a", 500)
    assert router.route(req(tokens_in=500, tokens_out=100))[0] == "c"  # 500 + 600 > 1000
    assert skipped(router, "a") == {"tpm": 1}
    router.record_result("a", ok=True, latency_s=0.3, tokens_in=200, tokens_out=50)  # 250 really
    assert router.route(req(tokens_in=600, tokens_out=150))[0] == "a"  # 250 + 750 = 1000
    assert router.route(req(tokens_in=600, tokens_out=151))[0] == "c"
    clock.advance(60.0)
    assert router.route(req(tokens_in=900, tokens_out=100))[0] == "a"


def test_asset_class_persona_and_language_filters() -> None:
    policy = {**RULE_AB, "limits": {"a": {"asset_classes": ["crypto"]}, "c": {"personas": ["scalper"]}}}
    router, _, _ = make(policy)
    # a: asset class; c: persona (limits say scalper only); b: persona (its profile says risk only)
    assert router.route(req(asset_class="fx", persona="macro")) == ["local"]
    assert skipped(router, "a") == {"asset_class": 1}
    assert skipped(router, "b") == {"persona": 1}
    assert skipped(router, "c") == {"persona": 1}
    assert router.route(req(asset_class="crypto", persona="risk")) == ["a", "b", "local"]
    assert router.route(req(asset_class="crypto", persona="scalper")) == ["a", "c", "local"]
    assert router.route(req(asset_class="crypto")) == ["a", "c", "b", "local"]  # no persona: anyone

    router, _, _ = make(RULE_AB)
    assert router.route(req("regional-CN", persona="risk", language="en")) == ["b", "local"]
    assert skipped(router, "a") == {"language": 1} and skipped(router, "c") == {"language": 1}
    assert router.route(req("multilingual", persona="risk", language="ja")) == ["c", "local"]
    assert router.route(req("multilingual", persona="risk", language="zh")) == ["b", "local"]
    assert router.route(req("deep", persona="risk", language="ko")) == ["a", "c", "b", "local"]  # not checked


def test_context_window_filter() -> None:
    profiles = {**PROFILES, "a": prof("a", context_window=1000)}
    router, _, _ = make(RULE_AB, profiles)
    assert router.route(req(tokens_in=800, tokens_out=200))[0] == "a"
    assert router.route(req(tokens_in=801, tokens_out=200))[0] == "c"
    assert skipped(router, "a") == {"context_window": 1}


# ---- breaker and cooldown ---------------------------------------------------------------------

BREAKER = {**RULE_AB, "cooldown_failures": 1000,
           "breaker": {"failure_pct": 50.0, "min_requests": 4, "window_s": 60.0, "open_s": 30.0}}


def fail(router: Router, name: str = "a", kind: str = "server_error", **kw) -> None:
    router.record_result(name, ok=False, latency_s=0.1, error_kind=kind, **kw)


def test_breaker_opens_half_opens_and_closes() -> None:
    router, clock, _ = make(BREAKER)
    router.record_result("a", ok=True, latency_s=0.1)
    fail(router)
    fail(router)  # 2 of 3 failed, but fewer than min_requests
    assert router.breaker_state("a") == "closed"
    fail(router)  # 3 of 4
    assert router.breaker_state("a") == "open"
    assert router.route(req())[0] == "c"
    assert skipped(router, "a") == {"breaker": 1}
    clock.advance(29.9)
    assert router.breaker_state("a") == "open"
    clock.advance(0.1)
    assert router.breaker_state("a") == "half_open"
    assert router.route(req())[0] == "a"  # the probe may go
    router.record_start("a", 100)
    assert router.route(req())[0] == "c"  # only one probe
    router.record_result("a", ok=True, latency_s=0.2)
    assert router.breaker_state("a") == "closed"
    assert router.route(req())[0] == "a"
    fail(router)
    fail(router)
    fail(router)  # the window was reset on closing: 3 results only
    assert router.breaker_state("a") == "closed"


def test_breaker_probe_failure_reopens() -> None:
    router, clock, _ = make(BREAKER)
    for _ in range(4):
        fail(router)
    assert router.breaker_state("a") == "open"
    clock.advance(30.0)
    router.record_start("a", 100)
    assert router.breaker_state("a") == "half_open"
    fail(router, kind="timeout")
    assert router.breaker_state("a") == "open"
    clock.advance(29.0)
    assert router.route(req())[0] == "c"
    clock.advance(1.0)
    assert router.route(req())[0] == "a"


def test_breaker_window_ages_out_and_ignores_cancelled() -> None:
    router, clock, _ = make(BREAKER)
    for _ in range(3):
        fail(router)
    clock.advance(60.0)  # those three leave the window
    fail(router)
    assert router.breaker_state("a") == "closed"
    for _ in range(20):
        fail(router, kind="cancelled")
        fail(router, kind="budget")
    assert router.breaker_state("a") == "closed"
    assert router.stats()["a"]["errors"] == {"server_error": 4, "cancelled": 20, "budget": 20}
    router.record_result("a", ok=True, latency_s=0.1)
    router.record_result("a", ok=True, latency_s=0.1)
    assert router.breaker_state("a") == "closed"  # 1 of 3 failed
    fail(router)  # 2 of 4: failure_pct is inclusive
    assert router.breaker_state("a") == "open"


def test_cancelled_probe_frees_its_slot() -> None:
    router, clock, _ = make(BREAKER)
    for _ in range(4):
        fail(router)
    clock.advance(30.0)
    router.record_start("a", 100)
    assert router.route(req())[0] == "c"
    fail(router, kind="cancelled")
    assert router.breaker_state("a") == "half_open"
    assert router.route(req())[0] == "a"


def test_cooldown_after_consecutive_failures() -> None:
    router, clock, _ = make({**RULE_AB, "cooldown_failures": 3, "cooldown_s": 30.0,
                             "breaker": {"min_requests": 1000}})
    fail(router)
    fail(router)
    router.record_result("a", ok=True, latency_s=0.1)  # resets the streak
    fail(router)
    fail(router)
    assert router.route(req())[0] == "a"
    fail(router)
    assert router.route(req())[0] == "c"
    assert skipped(router, "a") == {"cooldown": 1}
    assert router.stats()["a"]["cooldown_left_s"] == pytest.approx(30.0)
    clock.advance(29.9)
    assert router.route(req())[0] == "c"
    clock.advance(0.1)
    assert router.route(req())[0] == "a"
    assert router.stats()["a"]["cooldown_left_s"] == 0.0


def test_rate_limited_retry_after() -> None:
    router, clock, _ = make({**RULE_AB, "cooldown_failures": 3, "cooldown_s": 30.0,
                             "breaker": {"min_requests": 1000}})
    fail(router, kind="rate_limited", retry_after=120.0)  # one 429 is enough
    clock.advance(119.0)
    assert router.route(req())[0] == "c"
    clock.advance(1.0)
    assert router.route(req())[0] == "a"
    # after a streak the longer of cooldown_s and retry_after applies
    fail(router, kind="timeout")
    fail(router, kind="timeout")
    fail(router, kind="rate_limited", retry_after=5.0)
    clock.advance(29.0)
    assert router.route(req())[0] == "c"
    clock.advance(1.0)
    assert router.route(req())[0] == "a"
    # retry_after on other kinds is ignored
    router.record_result("a", ok=True, latency_s=0.1)
    fail(router, kind="server_error", retry_after=500.0)
    assert router.route(req())[0] == "a"


@pytest.mark.parametrize(("header", "policy", "benched_s"), [
    ("Fri, 31 Dec 9999 23:59:59 GMT", {}, 300.0),
    ("1e12", {}, 300.0),
    ("86400", {"max_retry_after_s": 60.0}, 60.0),
    ("86400", {"max_retry_after_s": 60.0, "cooldown_failures": 1, "cooldown_s": 90.0}, 90.0),
    ("45", {}, 45.0),
])
def test_retry_after_is_capped(header: str, policy: dict, benched_s: float) -> None:
    # a server asking for hours (or for the year 9999) benches the provider for the cap, not for good
    router, clock, _ = make({**RULE_AB, "breaker": {"min_requests": 1000}, **policy})
    retry_after = parse_retry_after(header, cap=math.inf)
    assert retry_after is not None and retry_after >= 45.0
    fail(router, kind="rate_limited", retry_after=retry_after)
    assert router.stats()["a"]["cooldown_left_s"] == pytest.approx(benched_s)
    clock.advance(benched_s - 0.1)
    assert router.route(req())[0] == "c" and not router.admits("a")
    clock.advance(0.1)
    assert router.route(req())[0] == "a" and router.admits("a")


# ---- throttling, cap, last resort -------------------------------------------------------------

THROTTLE_PROFILES = {
    "fast": prof("fast", latency_class="fast", usd_per_m_input=5.0),
    "std": prof("std", latency_class="standard", usd_per_m_input=1.0),
    "slow": prof("slow", latency_class="slow", usd_per_m_input=3.0),
    "slow2": prof("slow2", latency_class="slow", usd_per_m_input=3.0),
    "fast2": prof("fast2", latency_class="fast", usd_per_m_input=3.0),
    "local": BUILTIN_PROFILES["local"],
}
THROTTLE = {"fallback_cap": 10, "rules": [{"request_class": "*", "candidates": ["fast", "std", "slow"]}]}


def test_tight_deadline_drops_slow_candidates() -> None:
    router, _, _ = make(THROTTLE, THROTTLE_PROFILES)
    assert router.route(req(deadline_s=11.0)) == ["fast", "std", "slow", "local"]
    assert router.route(req(deadline_s=5.0)) == ["fast", "std", "local"]
    assert router.route(req(deadline_s=2.0)) == ["fast", "local"]
    assert router.route(req(deadline_s=1.0)) == ["local"]
    assert skipped(router, "slow") == {"deadline": 3}
    router, _, _ = make({**THROTTLE, "throttle_margin": 2.0}, THROTTLE_PROFILES)
    assert router.route(req(deadline_s=5.0)) == ["fast", "local"]  # std: 4 s x 2 > 5 s


def test_observed_latency_replaces_the_prior_after_five_samples() -> None:
    router, _, _ = make(THROTTLE, THROTTLE_PROFILES)
    for _ in range(4):
        router.record_result("slow", ok=True, latency_s=0.5)
    assert router.route(req(deadline_s=2.0)) == ["fast", "local"]
    router.record_result("slow", ok=True, latency_s=0.5)
    assert router.route(req(deadline_s=2.0)) == ["fast", "slow", "local"]
    for _ in range(10):
        router.record_result("fast", ok=True, latency_s=3.0)
    assert router.route(req(deadline_s=2.0)) == ["slow", "local"]


def test_pressure_sheds_most_expensive_first() -> None:
    router, _, _ = make(THROTTLE, THROTTLE_PROFILES)
    router.pressure = 0.3  # ceil(0.9) = 1 of 3
    assert router.route(req()) == ["std", "slow", "local"]  # fast costs most
    router.pressure = 0.5  # ceil(1.5) = 2
    assert router.route(req()) == ["std", "local"]
    router.pressure = 1.0
    assert router.route(req()) == ["local"]
    assert skipped(router, "fast") == {"pressure": 3}
    assert skipped(router, "slow") == {"pressure": 2}
    assert skipped(router, "std") == {"pressure": 1}
    # equal price: the slower goes first
    router, _, _ = make({"rules": [{"request_class": "*", "candidates": ["fast2", "slow", "std"]}]},
                        THROTTLE_PROFILES)
    router.pressure = 0.1
    assert router.route(req()) == ["fast2", "std", "local"]
    # equal price and speed: the later (less preferred) goes first
    router, _, _ = make({"rules": [{"request_class": "*", "candidates": ["slow", "slow2"]}]},
                        THROTTLE_PROFILES)
    router.pressure = 0.1
    assert router.route(req()) == ["slow", "local"]


def test_fallback_cap_does_not_count_the_last_resort() -> None:
    rules = [{"request_class": "*", "candidates": ["a", "local", "c", "d", "e"]}]
    router, _, _ = make({"rules": rules, "fallback_cap": 2})
    assert router.route(req()) == ["a", "local", "c"]
    assert skipped(router, "d") == {"cap": 1}
    router, _, _ = make({"rules": rules, "fallback_cap": 0})
    assert router.route(req()) == ["local"]


def test_last_resort_survives_everything() -> None:
    limits = {"local": {"asset_classes": ["none"], "daily_tokens": 0, "rpm": 0}, "a": {"daily_tokens": 0}}
    rules = [{"request_class": "*", "candidates": ["a", "c", "local"]}]
    router, _, _ = make({"rules": rules, "limits": limits, "cooldown_failures": 1,
                         "breaker": {"min_requests": 1}})
    fail(router, "c")
    for _ in range(3):
        fail(router, "local")
    assert router.breaker_state("c") == "open"
    router.pressure = 1.0
    assert router.route(req(tokens_in=10**7, deadline_s=0.0, asset_class="fx")) == ["local"]
    assert router.route(req()) == ["local"]
    assert skipped(router, "local") == {}


def test_stats_counters_and_latency_ring() -> None:
    router, _, _ = make(RULE_AB)
    for ms in range(1, 101):
        router.record_result("c", ok=True, latency_s=ms / 1000.0, tokens_in=10, tokens_out=5)
    fail(router, "c", kind="timeout")
    s = router.stats()["c"]
    assert (s["requests"], s["ok"], s["errors"]) == (101, 100, {"timeout": 1})
    assert (s["tokens_in"], s["tokens_out"]) == (1000, 500)
    assert s["usd"] == pytest.approx((1000 * 0.1 + 500 * 0.1) * 1e-6)
    assert s["p50_ms"] == pytest.approx(50.0)
    assert s["p99_ms"] == pytest.approx(99.0)
    assert s["breaker"] == "closed" and s["budget_left"] == {"tokens": None, "usd": None}
    # the ring keeps the last 1,024 latencies only
    for _ in range(1000):
        router.record_result("d", ok=True, latency_s=10.0)
    for _ in range(1024):
        router.record_result("d", ok=True, latency_s=0.25)
    assert router.stats()["d"]["p99_ms"] == pytest.approx(250.0)
    assert router.stats()["e"]["p50_ms"] is None
    assert set(SKIP_REASONS) >= set().union(*(v["skipped"] for v in router.stats().values()))


def test_memo_sees_config_per_key_and_weights() -> None:
    router, _, _ = make({**RULE_AB, "limits": {"a": {"weight": 2.5}}})
    assert router.weight("a") == 2.5 and router.weight("c") == 1.0
    # the same key memoised twice gives the same answer; another language changes the static filters
    assert router.route(req("multilingual", language="ja")) == ["c", "local"]
    assert router.route(req("multilingual", language="ja")) == ["c", "local"]
    assert router.route(req("multilingual", language="en")) == ["a", "c", "b", "local"]
    assert isinstance(router.config, PolicyConfig)


# ---- narrative cache --------------------------------------------------------------------------


def test_cache_lru_eviction_order() -> None:
    cache = NarrativeCache(size=3, ttl_s=100.0, clock=Clock())
    for k in "abc":
        cache.put(k, k.upper())
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("d", "D")  # evicts b, the least recently used
    assert "b" not in cache and all(k in cache for k in "acd")
    cache.put("c", "C2")  # replacing refreshes too
    cache.put("e", "E")  # evicts a
    assert cache.get("a") is None and cache.get("c") == "C2"
    assert len(cache) == 3
    assert cache.stats()["evictions"] == 2


def test_cache_ttl_with_driven_clock() -> None:
    clock = Clock(0.0)
    cache = NarrativeCache(size=8, ttl_s=10.0, clock=clock)
    cache.put("k", "v")
    clock.advance(9.99)
    assert cache.get("k") == "v"
    clock.advance(0.01)
    assert cache.get("k") is None
    assert len(cache) == 0
    s = cache.stats()
    assert (s["hits"], s["misses"], s["expired"]) == (1, 1, 1)
    cache.put("k", "v2")  # a new put starts a new ttl
    clock.advance(5.0)
    cache.put("k", "v3")
    clock.advance(9.0)
    assert cache.get("k") == "v3"


def test_cache_hit_ratio_and_clear() -> None:
    cache = NarrativeCache(size=4, clock=Clock())
    key = NarrativeCache.make_key("EURUSD", "high/low/+", 2, "deepseek", "macro", 1, "00ff")
    assert key == NarrativeCache.make_key("EURUSD", "high/low/+", 2, "deepseek", "macro", 1, "00ff")
    assert key != NarrativeCache.make_key("EURUSD", "high/low/+", 2, "kimi", "macro", 1, "00ff")
    assert cache.stats()["hit_ratio"] == 0.0
    cache.put(key, "text")
    for _ in range(3):
        assert cache.get(key) == "text"
    assert cache.get(("other",)) is None
    s = cache.stats()
    assert 0 < s.pop("bytes") < 1024
    assert s == {"size": 1, "capacity": 4, "max_bytes": 32 << 20, "hits": 3, "misses": 1, "hit_ratio": 0.75,
                 "evictions": 0, "expired": 0, "too_big": 0}
    cache.clear()
    assert len(cache) == 0 and cache.get(key) is None and cache.stats()["bytes"] == 0


def test_cache_size_zero_disables() -> None:
    cache = NarrativeCache(size=0)
    cache.put("k", "v")
    assert cache.get("k") is None and len(cache) == 0
    assert cache.stats()["misses"] == 1
    with pytest.raises(ValueError):
        NarrativeCache(size=-1)
    with pytest.raises(ValueError):
        NarrativeCache(ttl_s=0.0)


def test_default_policy_toml_is_documented() -> None:
    # the default text is what users copy: every top-level knob is present and commented
    for knob in ("fallback_cap", "cooldown_failures", "cooldown_s", "max_retry_after_s", "last_resort",
                 "throttle_margin", "[breaker]", "[[rules]]", "[limits."):
        assert knob in DEFAULT_POLICY_TOML
    assert DEFAULT_POLICY_TOML.count("#") >= 10
    assert math.isfinite(load_policy(None).cooldown_s)


# ---- invariants under random traffic ----------------------------------------------------------

events = st.lists(st.tuples(
    st.sampled_from(["route", "start", "ok", "fail", "tick"]),
    st.sampled_from(["a", "b", "c", "d", "local"]),
    st.sampled_from(REQUEST_CLASSES),
    st.floats(0.0, 20.0),
    st.sampled_from(["timeout", "rate_limited", "server_error", "cancelled", "budget"]),
), max_size=60)


@given(evs=events, cap=st.integers(0, 4), pressure=st.floats(0.0, 1.0))
@settings(max_examples=150, deadline=None)
def test_route_invariants_under_random_traffic(evs, cap, pressure) -> None:
    policy = {"fallback_cap": cap, "cooldown_failures": 2, "cooldown_s": 5.0,
              "breaker": {"min_requests": 3, "open_s": 4.0, "window_s": 10.0},
              "rules": [{"request_class": "*", "candidates": ["a", "b", "c", "d"]},
                        {"request_class": "deep", "candidates": ["d", "local", "a"]}],
              "limits": {"a": {"rpm": 3, "daily_tokens": 5000}, "c": {"tpm": 2000}}}
    router, clock, _ = make(policy)
    router.pressure = pressure
    for kind, name, rc, x, err in evs:
        if kind == "route":
            got = router.route(req(rc, deadline_s=x, language="zh", tokens_in=400, tokens_out=100))
            assert "local" in got and len(got) == len(set(got))
            assert len(got) - 1 <= cap
            allowed = {"d", "local", "a"} if rc == "deep" else {"a", "b", "c", "d", "local"}
            assert set(got) <= allowed
        elif kind == "start":
            router.record_start(name, 400)
        elif kind == "ok":
            router.record_result(name, ok=True, latency_s=x, tokens_in=300, tokens_out=80)
        elif kind == "fail":
            router.record_result(name, ok=False, latency_s=x, error_kind=err, retry_after=x)
        else:
            clock.advance(x)
        assert router.breaker_state(name) in ("closed", "open", "half_open")
    stats = router.stats()
    for name, s in stats.items():
        assert s["requests"] == s["ok"] + sum(s["errors"].values())
        assert set(s["skipped"]) <= set(SKIP_REASONS)
        assert s["cooldown_left_s"] >= 0.0


def test_explicit_candidates_replace_the_rule_but_keep_every_filter() -> None:
    rules = [{"request_class": "*", "candidates": ["a", "local"]}]
    router, _, _ = make({"rules": rules, "limits": {"d": {"daily_tokens": 10}}})
    assert router.route(req(), ("c", "d", "b")) == ["c", "b", "local"]  # d: over budget
    assert skipped(router, "d") == {"budget": 1}
    assert router.route(req(persona="calm"), ("c", "b")) == ["c", "local"]  # b speaks only "risk"
    assert router.route(req()) == ["a", "local"]  # the rule itself is untouched
    with pytest.raises(PolicyError):
        router.route(req("nope"), ("c",))


# ---- audit fixes: finite bounds, a local last resort, weights, the cache's byte budget ---------

@pytest.mark.parametrize("source, where", [
    ("cooldown_s = inf\n", r"\$\.cooldown_s"),
    ("cooldown_s = 1e9\n", r"\$\.cooldown_s"),
    ("max_retry_after_s = inf\n", r"\$\.max_retry_after_s"),
    ("throttle_margin = inf\n", r"\$\.throttle_margin"),
    ("[breaker]\nopen_s = inf\n", r"\$\.breaker\.open_s"),
    ("[breaker]\nwindow_s = inf\n", r"\$\.breaker\.window_s"),
    ("[limits.a]\nweight = inf\n", r"\$\.limits\.a\.weight"),
    ("[limits.a]\nweight = 1e6\n", r"\$\.limits\.a\.weight"),
    ("[limits.a]\ndaily_usd = inf\n", r"\$\.limits\.a\.daily_usd"),
    ("[limits.a]\nrpm = 9223372036854775807\n", r"\$\.limits\.a\.rpm"),
])
def test_every_policy_number_has_a_finite_upper_bound(source, where) -> None:
    # an infinity would bench a provider for good after one failure (or disable a filter)
    with pytest.raises(PolicyError, match=r"<= .*" + where):
        load_policy(source)


def test_the_largest_allowed_values_still_let_a_provider_back() -> None:
    router, clock, _ = make({**RULE_AB, "cooldown_failures": 1, "cooldown_s": 86400.0,
                             "breaker": {"min_requests": 1, "open_s": 86400.0, "window_s": 86400.0}})
    fail(router, "a")
    assert router.route(req())[0] == "c"
    clock.advance(86400.0)
    assert router.route(req())[0] == "a"


def test_last_resort_must_be_a_local_provider() -> None:
    # the last resort skips budgets, breaker and cooldown: a paid one would spend without limit
    with pytest.raises(PolicyError, match="last_resort must name a provider of kind 'local'.*'a'"):
        Router(load_policy({"last_resort": "a"}), PROFILES)
    narrator = ProviderProfile(name="narrator", kind="local", model="template")
    router = Router(load_policy({**RULE_AB, "last_resort": "narrator"}), {**PROFILES, "narrator": narrator})
    assert router.route(req())[-1] == "narrator"


def test_cache_byte_budget_evicts_least_recently_used_and_refuses_oversized_values() -> None:
    from dynamic_core.reasoning.cache import weigh

    cache = NarrativeCache(size=100, clock=Clock(), max_bytes=10_000)
    for i in range(10):
        cache.put(("k", i), ("t" * 2000, 1))
    s = cache.stats()
    assert s["bytes"] <= 10_000 and s["size"] == 4 and s["evictions"] == 6
    assert s["bytes"] == sum(weigh(("k", i)) + weigh(("t" * 2000, 1)) for i in range(6, 10))
    assert ("k", 9) in cache and ("k", 5) not in cache
    cache.put("huge", "x" * 20_000)  # bigger than the whole budget: not cached, nothing evicted
    assert "huge" not in cache and cache.stats()["too_big"] == 1 and len(cache) == 4
    cache.put(("k", 9), "short")  # replacing an entry gives its bytes back
    assert cache.stats()["bytes"] < s["bytes"]
    with pytest.raises(ValueError):
        NarrativeCache(max_bytes=-1)


def test_the_routing_tables_the_docs_show_name_real_providers() -> None:
    # README's ctl example and the docstrings of set_routing and routing_rules: copied as shown,
    # each must be accepted by a router that knows the built-in providers
    import ast
    import re
    from pathlib import Path

    from dynamic_core.reasoning import ReasoningMesh

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"`dynamic-core ctl ADDR routing ((?:[^`]|\n)*?) \.\.\.`", readme)
    assert m is not None, "README shows no 'ctl ADDR routing' example"
    tables = [dict(pair.split("=", 1) for pair in m.group(1).split())]
    for doc in (ReasoningMesh.set_routing.__doc__, routing_rules.__doc__):
        found = re.search(r"(\{\"[^\n]*\})", doc or "")
        assert found is not None
        tables.append(ast.literal_eval(found.group(1)))
    router = Router(load_policy(), dict(BUILTIN_PROFILES))
    for table in tables:
        router.set_overrides(routing_rules(table))  # a provider it does not know: PolicyError
        for value in table.values():
            assert all(p.strip() in BUILTIN_PROFILES for p in value.split(","))
