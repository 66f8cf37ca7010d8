"""The local narrator: a deterministic rationale written from the numbers alone.

It costs nothing, answers in microseconds and cannot fail, so the mesh uses it as the last
resort of every route (``last_resort = "local"`` in the routing policy) and whenever a
deadline leaves no time for a model. The same context always gives the same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from ..payloads import ReasoningContext
from .prompts import DISPERSION_EDGES, action_direction, action_label, ranked_features, timeframe_label

__all__ = ["narrate"]

_N_FEATURES = 3
_DISP_WORDS = {"en": ("low", "moderate", "high"), "zh": ("低", "中", "高")}
_ZH_DIRECTION = {"buy": "买入", "sell": "卖出", "hold": "持有"}
_JSON = msgspec.json.Encoder()


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _fmt(x: float, spec: str) -> str:
    if not math.isfinite(x):
        return "n/a"
    s = format(x, spec)
    return "n/a" if s in ("inf", "-inf", "nan", "+inf", "+nan") else s


def _confidence(x: float) -> float | None:
    """The context's confidence clamped to [0, 1] and rounded to 3 decimals (None for NaN)."""
    if math.isnan(x):
        return None
    return round(min(1.0, max(0.0, x)), 3) + 0.0


def _action(x: Any) -> int:
    try:
        a = int(x)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(-2, min(2, a))


def narrate(ctx: ReasoningContext, *, style: str = "narrative") -> str:
    """A rationale for ``ctx``: action, confidence, agreement, dispersion, agent count and the
    three strongest features, in English or (``ctx.language == "zh"``) Chinese.

    Parameters
    ----------
    ctx : ReasoningContext
    style : {"narrative", "json"}
        ``narrative``: prose ending with ``Direction: buy. Confidence: 0.81.``
        (``方向：买入。置信度：0.81。``) so :func:`~dynamic_core.reasoning.prompts.parse_reply`
        reads both back (what the instrument or feature names say cannot override them: the
        parser takes the last statement of each). ``json``: the
        object ``{"direction", "confidence", "rationale"}`` with the confidence clamped to
        [0, 1] and rounded to 3 decimals (``null`` when NaN).

    Returns
    -------
    str
        Deterministic: the same context gives the same bytes. Non-finite numbers are written
        ``n/a``.

    Raises
    ------
    ValueError
        An unknown ``style`` (never for any context).
    """
    if style not in ("narrative", "json"):
        raise ValueError(f"unknown narrator style {style!r}; expected 'narrative' or 'json'")
    zh = ctx.language == "zh"
    lang = "zh" if zh else "en"
    action = _action(ctx.action)
    direction = action_direction(action)
    label = action_label(action, lang)
    conf = _confidence(_num(ctx.confidence))
    conf_s = "n/a" if conf is None else f"{conf:.2f}"
    score_s = _fmt(_num(ctx.score), "+.3f")
    agree = _num(ctx.agreement) * 100.0
    agree_s = _fmt(agree, ".0f") + "%" if math.isfinite(agree) else "n/a"
    disp = _num(ctx.dispersion)
    disp_s = _fmt(disp, ".3g")
    words = _DISP_WORDS[lang]
    if not math.isfinite(disp):
        disp_word = "n/a"
    else:
        disp_word = words[(disp >= DISPERSION_EDGES[0]) + (disp >= DISPERSION_EDGES[1])]
    try:
        n_agents = int(ctx.n_agents)
    except (TypeError, ValueError, OverflowError):
        n_agents = 0
    try:
        feats = ranked_features(ctx, _N_FEATURES)
    except (TypeError, ValueError, OverflowError):  # built by hand with odd feature values: leave them out
        feats = []
    head = f"{ctx.instrument} {timeframe_label(ctx.timeframe)}"
    if zh:
        parts = [f"{head}：{label}（得分 {score_s}）。",
                 f"一致度：{n_agents} 个代理中 {agree_s}；分歧度 {disp_s}（{disp_word}）。"]
        if feats:
            parts.append("主要特征：" + "，".join(f"{k} {_fmt(v, '.4g')}" for k, v in feats) + "。")
        parts.append(f"方向：{_ZH_DIRECTION[direction]}。置信度：{conf_s}。")
        text = "".join(parts)
    else:
        parts = [f"{head}: {label} (score {score_s}).",
                 f"Agreement: {agree_s} of {n_agents} agents; dispersion {disp_s} ({disp_word})."]
        if feats:
            parts.append("Strongest features: " + ", ".join(f"{k} {_fmt(v, '.4g')}" for k, v in feats) + ".")
        parts.append(f"Direction: {direction}. Confidence: {conf_s}.")
        text = " ".join(parts)
    if style == "json":
        return _JSON.encode({"direction": direction, "confidence": conf, "rationale": text}).decode()
    return text
