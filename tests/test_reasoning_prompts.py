"""Prompt library (distillation, digests, fitting, reply parsing) and the local narrator."""

from __future__ import annotations

import math
import re

import msgspec
import pytest
from dynamic_core.payloads import ReasoningContext
from dynamic_core.reasoning.narrator import narrate
from dynamic_core.reasoning.prompts import (
    MAX_FEATURES,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    TEMPLATE_VERSION,
    TEMPLATES,
    action_direction,
    build_messages,
    digest,
    distill,
    estimate_tokens,
    parse_reply,
    regime_bucket,
    template_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

OVERHEAD = 2 * MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ctx(**kw) -> ReasoningContext:
    base = {"signal_id": "s-1", "instrument": "EURUSD", "timeframe": 3600, "action": 1, "score": 0.4321,
            "confidence": 0.734, "agreement": 0.8, "dispersion": 0.1, "n_agents": 64,
            "features": {"atr_pct": 0.41234, "ret_20": -1.23456, "rsi": 63.14159, "vol_z": 0.05}}
    base.update(kw)
    return ReasoningContext(**base)


any_float = st.floats(allow_nan=True, allow_infinity=True)
contexts = st.builds(
    ReasoningContext,
    signal_id=st.text(max_size=8),
    instrument=st.text(min_size=1, max_size=12),
    timeframe=st.integers(1, 2**32 - 1),
    action=st.integers(-2, 2),
    score=any_float, confidence=any_float, agreement=any_float, dispersion=any_float,
    n_agents=st.integers(0, 2**32 - 1),
    asset_class=st.sampled_from(["fx", "crypto", "equity"]),
    persona=st.sampled_from(["", "macro", "scalper"]),
    language=st.sampled_from(["en", "zh", "ja"]),
    features=st.dictionaries(st.text(max_size=24), any_float, max_size=64),
)


# ---- templates --------------------------------------------------------------------------------


def test_template_library_and_selection() -> None:
    want = {"json/1", "narrative/1", "refine/1", "json-zh/1", "narrative-zh/1", "refine-zh/1"}
    assert want <= set(TEMPLATES)
    for key, t in TEMPLATES.items():
        assert key == f"{t.name}/{t.version}" == t.key
    assert template_for("json", "en").key == f"json/{TEMPLATE_VERSION}"
    assert template_for("narrative", "ja").key == "narrative/1"
    assert template_for("json", "zh").language == "zh"
    assert template_for("narrative", "zh", refine=True).key == "refine-zh/1"
    assert template_for("json", "zh", refine=True).style == "json"
    with pytest.raises(ValueError):
        template_for("xml", "en")


def test_messages_mention_the_numbers_and_the_language() -> None:
    msgs, tokens = build_messages(template_for("json", "ja"), ctx(language="ja", persona="macro"),
                                  context_window=8192, max_tokens=256)
    (r1, system), (r2, user) = msgs
    assert (r1, r2) == ("system", "user")
    assert "Japanese" in system and "macro" in system and '"direction"' in system
    for needle in ("EURUSD", "H1", "BUY", "+0.432", "0.734", "80%", "64", "rsi = 63.14", "ret_20 = -1.235"):
        assert needle in user
    assert tokens == estimate_tokens(system) + estimate_tokens(user) + OVERHEAD
    zh, _ = build_messages(template_for("narrative", "zh"), ctx(language="zh", action=-2),
                           context_window=8192, max_tokens=256)
    assert "强烈卖出" in zh[1][1] and "中文" in zh[0][1]
    draft, _ = build_messages(template_for("json", "en", refine=True), ctx(), context_window=8192,
                              max_tokens=256, draft="Momentum is up.")
    assert draft[1][1].endswith("Momentum is up.")


# ---- distillation and digests -----------------------------------------------------------------


def test_distill_rounds_and_keeps_the_strongest_features() -> None:
    feats = {f"f{i:02d}": (i - 10) * 1.000123456 for i in range(40)}
    feats["tiny"] = 1.23456e-7
    feats["nan"] = math.nan
    d = distill(ctx(features=feats, score=0.123456, dispersion=0.0123456))
    assert d["score"] == 0.123 and d["dispersion"] == 0.01235 and d["action"] == 1
    names = [k for k in d if k.startswith("f:")]
    assert len(names) == MAX_FEATURES
    assert names[0] == "f:f39" and d["f:f39"] == 29.0  # 29.00358... -> 4 significant digits
    assert names == [f"f:f{i:02d}" for i in range(39, 23, -1)]  # |29| .. |14|, strongest first
    assert "f:f00" not in d  # |-10| is 17th
    assert "signal_id" not in d and "ts" not in d


def test_digest_is_stable_across_orderings_and_sensitive_to_values() -> None:
    feats = {"a": 1.0, "b": -2.0, "c": 0.5}
    reordered = dict(reversed(list(feats.items())))
    assert digest(distill(ctx(features=feats))) == digest(distill(ctx(features=reordered)))
    d = distill(ctx(features=feats))
    assert digest(d) == digest(dict(sorted(d.items(), reverse=True)))
    assert re.fullmatch(r"[0-9a-f]{16}", digest(d))
    assert digest(distill(ctx(features=feats, score=0.4334))) != digest(d)
    # rounding makes near-identical contexts share a digest; -0.0 and 0.0 too; every NaN is one NaN
    assert digest(distill(ctx(features=feats, score=0.43209))) == digest(d)
    assert digest(distill(ctx(score=-0.0))) == digest(distill(ctx(score=0.0)))
    assert digest(distill(ctx(score=math.nan))) == digest(distill(ctx(score=-math.nan)))
    # identity fields do not matter, language does
    assert digest(distill(ctx(signal_id="other", seq=9))) == digest(distill(ctx()))
    assert digest(distill(ctx(language="zh"))) != digest(distill(ctx()))


@given(feats=st.dictionaries(st.text(max_size=6), st.floats(allow_nan=False, width=32), max_size=20),
       seed=st.randoms(use_true_random=False))
@FAST
def test_digest_ignores_feature_insertion_order(feats, seed) -> None:
    items = list(feats.items())
    seed.shuffle(items)
    assert digest(distill(ctx(features=feats))) == digest(distill(ctx(features=dict(items))))


def test_regime_bucket() -> None:
    assert regime_bucket(ctx(agreement=0.9, dispersion=0.1, action=2)) == "high/low/+"
    assert regime_bucket(ctx(agreement=0.6, dispersion=0.3, action=0)) == "mid/mid/0"
    assert regime_bucket(ctx(agreement=0.2, dispersion=0.9, action=-1)) == "low/high/-"
    assert regime_bucket(ctx(agreement=math.nan, dispersion=math.inf, action=-1)) == "na/na/-"


def test_estimate_tokens_and_action_direction() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens("买入") == 2  # 6 UTF-8 bytes
    assert [action_direction(a) for a in range(-2, 3)] == ["sell", "sell", "hold", "buy", "buy"]


# ---- fitting ----------------------------------------------------------------------------------


@given(c=contexts, window=st.integers(0, 3000), max_tokens=st.integers(0, 400),
       key=st.sampled_from(sorted(TEMPLATES)), draft=st.none() | st.text(max_size=3000))
@FAST
def test_prompt_never_exceeds_the_window(c, window, max_tokens, key, draft) -> None:
    template = TEMPLATES[key]
    if window - max_tokens < OVERHEAD:
        with pytest.raises(ValueError):
            build_messages(template, c, context_window=window, max_tokens=max_tokens, draft=draft)
        return
    msgs, tokens = build_messages(template, c, context_window=window, max_tokens=max_tokens, draft=draft)
    assert tokens <= window - max_tokens
    assert tokens == sum(estimate_tokens(text) for _, text in msgs) + OVERHEAD
    assert [r for r, _ in msgs] == ["system", "user"]


def test_truncation_drops_the_weakest_features_first() -> None:
    c = ctx(features={"strong": 50.0, "mid": -5.0, "weak": 0.001})
    t = template_for("json", "en")
    (_, full_sys), (_, full_user) = build_messages(t, c, context_window=100_000, max_tokens=0)[0]
    full = estimate_tokens(full_sys) + estimate_tokens(full_user) + OVERHEAD
    msgs, tokens = build_messages(t, c, context_window=full - 1, max_tokens=0)
    user = msgs[1][1]
    assert "strong = 50" in user and "mid = -5" in user and "weak" not in user
    assert msgs[0][1] == full_sys and tokens <= full - 1
    # a window far too small for any feature: text is cut, the window still holds
    msgs, tokens = build_messages(t, c, context_window=40, max_tokens=10)
    assert tokens <= 30 and "strong" not in msgs[1][1]


def test_truncation_cuts_the_draft_before_the_prompt() -> None:
    t = template_for("json", "en", refine=True)
    c = ctx(features={})
    base = build_messages(t, c, context_window=100_000, max_tokens=0, draft="")
    room = base[1] + 50
    msgs, tokens = build_messages(t, c, context_window=room, max_tokens=0, draft="x" * 10_000)
    assert tokens <= room
    assert msgs[0][1] == base[0][0][1]  # the system prompt is intact
    assert msgs[1][1].startswith(base[0][1][1])
    assert 197 <= msgs[1][1].count("x") <= 203  # 50 tokens, give or take rounding


# ---- parsing replies --------------------------------------------------------------------------


@pytest.mark.parametrize("text, direction, confidence, valid, tag", [
    ('{"direction": "buy", "confidence": 0.8, "rationale": "Trend up."}', "buy", 0.8, True, None),
    ('```json\n{"direction": "SELL", "confidence": 0.6, "rationale": "Weak."}\n```', "sell", 0.6, True,
     "fenced"),
    ('Sure! Here it is: {"direction": "hold", "confidence": 55, "rationale": "Mixed."} Hope it helps.',
     "hold", 0.55, True, "prose"),
    ('{"direction": "long", "rationale": "ok"}', "buy", None, True, None),
    ('{"direction": "up", "confidence": 0.7, "rationale": "The outlook is bullish."}', "buy", 0.7, False,
     "heuristic"),
    ('{"direction": "buy", "confidence": "very", "rationale": "x"}', "buy", None, False, "heuristic"),
    ('{"direction": "buy", "confidence": 0.7, "rationale": ', "buy", 0.7, False, "heuristic"),
    ("I would sell here; bearish divergence. Confidence: 0.65", "sell", 0.65, False, "heuristic"),
    ("[1, 2, 3]", None, None, False, "heuristic"),
])
def test_parse_json_replies(text, direction, confidence, valid, tag) -> None:
    r = parse_reply(text, "json")
    assert (r.direction, r.valid) == (direction, valid)
    assert r.confidence == (None if confidence is None else pytest.approx(confidence))
    if tag:
        assert tag in r.tags


@pytest.mark.parametrize("text, direction, confidence, tags", [
    ("Momentum is bullish and the breakout holds. Direction: BUY\nConfidence: 0.72", "buy", 0.72, ()),
    ("Despite a bullish open, we go short. **Recommendation**: strong sell (high confidence)", "sell", None,
     ("confidence:high",)),
    ("Bearish, bearish and more bearish; a long-term view changes nothing.", "sell", None, ()),
    ("Stay neutral: hold until the range breaks. Medium confidence.", "hold", None, ("confidence:medium",)),
    ("Bullish trend but bearish breadth.", None, None, ("mixed",)),
    ("信号显示看涨，建议买入。置信度：0.8", "buy", 0.8, ()),
    ("EURUSD 走势看跌。方向：卖出。", "sell", None, ()),
    ("市场观望情绪浓，持有为主，低置信度。", "hold", None, ("confidence:low",)),
    ("We are 70% confident... confidence 70%, direction: buy", "buy", 0.7, ("confidence_pct",)),
    ("", None, None, ()),
    ("Do not buy here.", "hold", None, ("negated",)),
    ("Don't sell, buy more.", "buy", None, ("negated",)),
    ("We are not bearish; buy the dip.", "buy", None, ("negated",)),
    ("I would never buy this, sell it", "sell", None, ("negated",)),
    ("There is no reason to sell.", "hold", None, ("negated",)),
    ("现在不要买入。", "hold", None, ("negated",)),
    ("No doubt: buy.", "buy", None, ()),
    # negations that do not negate the word: intensifiers, double negatives, another clause
    ("Not only bullish but the breakout is confirmed.", "buy", None, ()),
    ("No doubt bullish.", "buy", None, ()),
    ("There's no denying the bullish setup.", "buy", None, ()),
    ("I've never been more bullish on gold.", "buy", None, ()),
    ("Don't hesitate to buy this dip.", "buy", None, ()),
    ("There's no reason not to buy.", "buy", None, ()),
    ("Bears cannot withstand sustained buying.", "buy", None, ()),
    ("Bears cannot withstand persistent buying.", "buy", None, ()),
    ("不得不买入", "buy", None, ()),
    ("不仅看涨，而且放量", "buy", None, ()),
    ("绝不做空，逢低做多", "buy", None, ("negated",)),
    # and negations several words away in the same clause
    ("I don't think we should sell.", "hold", None, ("negated",)),
    ("Now is not the time to buy.", "hold", None, ("negated",)),
    ("I can't see a reason to sell.", "hold", None, ("negated",)),
    ("Not a single bearish signal; buy.", "buy", None, ("negated",)),
    ("不建议现在买入", "hold", None, ("negated",)),
    ("不看空", "hold", None, ("negated",)),
])
def test_parse_narrative_replies(text, direction, confidence, tags) -> None:
    r = parse_reply(text, "narrative")
    assert r.direction == direction and r.valid == (direction is not None)
    assert r.confidence == (None if confidence is None else pytest.approx(confidence))
    assert set(tags) <= set(r.tags)
    assert r.rationale == text.strip()


@pytest.mark.parametrize("wrap", ["{}", "```json\n{}\n```", "Here: {} Done."])
def test_json_nested_too_deeply_is_read_as_narrative(wrap) -> None:
    # deeper than msgspec decodes (its RecursionError must not escape: the mesh would drop the answer)
    deep = '{"direction": "sell", "confidence": 0.9, "rationale": "Bearish breakdown.", "n": ' \
           + "[" * 2000 + "]" * 2000 + "}"
    text = wrap.format(deep)
    r = parse_reply(text, "json")
    assert (r.direction, r.valid, r.rationale) == ("sell", False, text.strip())
    assert "heuristic" in r.tags


@given(st.text(max_size=300), st.sampled_from(["json", "narrative"]))
@FAST
def test_parse_reply_never_raises(text, style) -> None:
    r = parse_reply(text, style)
    assert r.direction in (None, "buy", "sell", "hold")
    assert r.confidence is None or 0.0 <= r.confidence <= 1.0


# ---- narrator ---------------------------------------------------------------------------------


def test_narrator_english_and_chinese() -> None:
    text = narrate(ctx(action=-2, confidence=0.91, agreement=0.75, dispersion=0.6, n_agents=200,
                       features={"a": 1.0, "b": -3.0, "c": 0.5, "d": 2.0}))
    assert "STRONG SELL" in text and "0.91" in text and "75% of 200 agents" in text
    assert "dispersion 0.6 (high)" in text
    assert "b -3, d 2, a 1" in text and " c 0.5" not in text  # three strongest only
    zh = narrate(ctx(language="zh", action=1))
    assert "买入" in zh and "置信度：0.73" in zh and "64 个代理中 80%" in zh
    assert narrate(ctx(features={})).count("features") == 0
    with pytest.raises(ValueError):
        narrate(ctx(), style="yaml")


def test_narrator_is_deterministic() -> None:
    a = ctx(features={"x": 1.0, "y": 2.0, "z": -2.0})
    b = ctx(features={"z": -2.0, "y": 2.0, "x": 1.0})
    assert narrate(a) == narrate(b) == narrate(msgspec.msgpack.decode(msgspec.msgpack.encode(a),
                                                                     type=ReasoningContext))
    assert narrate(a, style="json").encode() == narrate(b, style="json").encode()


@given(c=contexts)
@FAST
def test_narrator_survives_anything_and_round_trips(c) -> None:
    text = narrate(c)
    assert text == narrate(c)
    assert "nan" not in text.lower().replace("n/a", "") or "nan" in c.instrument.lower() \
        or any("nan" in k.lower() for k in c.features)
    want = action_direction(c.action)
    prose = parse_reply(text, "narrative")
    assert prose.direction == want
    if not math.isnan(c.confidence):
        assert prose.confidence == pytest.approx(min(1.0, max(0.0, c.confidence)), abs=0.0051)
    js = narrate(c, style="json")
    parsed = parse_reply(js, "json")
    assert parsed.valid and parsed.direction == want
    conf = c.confidence
    if math.isnan(conf):
        assert parsed.confidence is None
        assert "n/a" in text
    else:
        assert parsed.confidence == round(min(1.0, max(0.0, conf)), 3)
    obj = msgspec.json.decode(js)
    assert set(obj) == {"direction", "confidence", "rationale"}


def test_narrator_renders_non_finite_as_na() -> None:
    text = narrate(ctx(score=math.inf, confidence=math.nan, agreement=-math.inf, dispersion=math.nan,
                       features={"v": math.nan}))
    assert text.count("n/a") >= 4
    assert "inf" not in text and "nan" not in text
