"""Prompt library: versioned templates, context distillation, prompt fitting and reply parsing.

A rationale is written from a *distilled* context (:func:`distill`): the signal's numbers
rounded to what a reader can use and at most 16 features, strongest first. Its :func:`digest`
is part of the narrative cache key, so two signals with the same rounded numbers share a
rationale. :func:`build_messages` renders a :class:`PromptTemplate` for one provider and fits
it into that provider's context window (weakest features dropped first, then text cut);
:func:`parse_reply` reads the direction and confidence back from whatever the model wrote.

Templates are ``str.format`` strings. The placeholders are ``instrument``, ``timeframe``,
``asset_class``, ``action_label`` (``STRONG BUY`` ...), ``direction``, ``score``,
``confidence``, ``agreement``, ``dispersion``, ``n_agents``, ``regime``, ``persona``,
``language_name``, ``features`` (one ``name = value`` line each) and ``draft`` (refinement only).
Changing a template's text means a new version (``json/2``) so cached rationales written from
the old one are not served for the new one.
"""

from __future__ import annotations

import math
import re
from hashlib import blake2b
from typing import Any, Literal

import msgspec

from ..payloads import ReasoningContext

__all__ = [
    "DIRECTIONS",
    "TEMPLATES",
    "TEMPLATE_VERSION",
    "ParsedReply",
    "PromptTemplate",
    "action_direction",
    "action_label",
    "build_messages",
    "digest",
    "distill",
    "estimate_tokens",
    "parse_reply",
    "regime_bucket",
    "template_for",
]

TEMPLATE_VERSION = 1
"""Version of the templates in :data:`TEMPLATES` (part of the narrative cache key)."""

DIRECTIONS = ("buy", "sell", "hold")

MAX_FEATURES = 16
"""Features kept by :func:`distill`, strongest (largest absolute value) first."""

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat API spends per message on roles and separators (OpenAI: 3-4)."""
REPLY_PRIMING_TOKENS = 2
"""Tokens spent priming the reply."""

AGREEMENT_EDGES = (0.5, 0.75)
"""Agreement below the first edge is ``low``, below the second ``mid``, else ``high``."""
DISPERSION_EDGES = (0.2, 0.5)
"""Dispersion below the first edge is ``low``, below the second ``mid``, else ``high``."""


class PromptTemplate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One versioned prompt.

    Attributes
    ----------
    name : str
        ``json``, ``narrative``, ``refine`` or a language variant (``json-zh``).
    version : int
    style : {"json", "narrative"}
        How the reply is parsed (:func:`parse_reply`).
    system, user : str
        ``str.format`` templates of the two messages (placeholders: see the module docstring).
    language : str
        Language the template itself is written in (ISO 639-1).
    """

    name: str
    version: int
    style: Literal["json", "narrative"]
    system: str
    user: str
    language: str = "en"

    @property
    def key(self) -> str:
        """``name/version``, the key in :data:`TEMPLATES`."""
        return f"{self.name}/{self.version}"


_JSON_SHAPE = ('{{"direction": "buy" | "sell" | "hold", "confidence": <number from 0 to 1>, '
               '"rationale": "<at most 3 sentences>"}}')

_USER_EN = ("Signal for {instrument} ({asset_class}, {timeframe}): {action_label}, score {score}, "
            "model confidence {confidence}.\n"
            "Agents: {n_agents}; agreement {agreement}; dispersion {dispersion}; regime {regime}.\n"
            "Features, strongest first:\n{features}")

_USER_ZH = ("{instrument}（{asset_class}，{timeframe}）的信号：{action_label}，得分 {score}，"
            "模型置信度 {confidence}。\n"
            "代理数 {n_agents}；一致度 {agreement}；分歧度 {dispersion}；市况 {regime}。\n"
            "主要特征（由强到弱）：\n{features}")

_TEMPLATES = (
    PromptTemplate(
        name="json", version=TEMPLATE_VERSION, style="json",
        system=("You are a concise {persona} on a trading desk. Explain the signal you are given from its "
                "numbers only; never invent data. Write the rationale in {language_name}. Reply with ONE "
                "JSON object and nothing else: " + _JSON_SHAPE + "."),
        user=_USER_EN),
    PromptTemplate(
        name="narrative", version=TEMPLATE_VERSION, style="narrative",
        system=("You are a concise {persona} on a trading desk. Explain the signal you are given in at most "
                "4 sentences of plain prose, from its numbers only; never invent data. Write in "
                "{language_name}. End with two lines: 'Direction: buy|sell|hold' and "
                "'Confidence: <number from 0 to 1>'."),
        user=_USER_EN),
    PromptTemplate(
        name="refine", version=TEMPLATE_VERSION, style="json",
        system=("You are a senior {persona} reviewing a junior's rationale for a trading signal. Keep what "
                "the numbers support, correct what they contradict, cut the rest; never invent data. Write "
                "in {language_name}. Reply with ONE JSON object and nothing else: " + _JSON_SHAPE + "."),
        user=_USER_EN + "\nDraft rationale:\n{draft}"),
    PromptTemplate(
        name="json-zh", version=TEMPLATE_VERSION, style="json", language="zh",
        system=("你是交易台上一位简洁的{persona}。只根据给出的数字解释这个信号，不要编造数据。用中文写理由。"
                "只回复一个 JSON 对象，不要其他内容：" + _JSON_SHAPE.replace("<at most 3 sentences>", "<不超过3句>")
                .replace("<number from 0 to 1>", "<0到1之间的数>") + "。"),
        user=_USER_ZH),
    PromptTemplate(
        name="narrative-zh", version=TEMPLATE_VERSION, style="narrative", language="zh",
        system=("你是交易台上一位简洁的{persona}。用不超过4句中文解释这个信号，只根据给出的数字，不要编造数据。"
                "最后写两行：“方向：买入/卖出/持有”和“置信度：<0到1之间的数>”。"),
        user=_USER_ZH),
    PromptTemplate(
        name="refine-zh", version=TEMPLATE_VERSION, style="json", language="zh",
        system=("你是一位资深{persona}，审阅一份交易信号的初稿理由。保留数字支持的内容，纠正与数字矛盾的内容，"
                "删去其余部分；不要编造数据。用中文写。只回复一个 JSON 对象，不要其他内容："
                + _JSON_SHAPE.replace("<at most 3 sentences>", "<不超过3句>")
                .replace("<number from 0 to 1>", "<0到1之间的数>") + "。"),
        user=_USER_ZH + "\n初稿理由：\n{draft}"),
)

TEMPLATES: dict[str, PromptTemplate] = {t.key: t for t in _TEMPLATES}
"""Every template by ``name/version`` (``json/1``, ``narrative/1``, ``refine/1`` and their
``-zh`` variants)."""


def template_for(profile_style: str, language: str, *, refine: bool = False) -> PromptTemplate:
    """The current template for a provider of style ``profile_style`` writing in ``language``.

    Parameters
    ----------
    profile_style : {"json", "narrative"}
        :attr:`ProviderProfile.style`.
    language : str
        ``"zh"`` selects the Chinese variant; any other language uses the English template,
        which asks for the rationale in that language.
    refine : bool
        The refinement template (a premium provider improving a draft; replies in JSON).

    Raises
    ------
    ValueError
        An unknown style.
    """
    if profile_style not in ("json", "narrative"):
        raise ValueError(f"unknown prompt style {profile_style!r}; expected 'json' or 'narrative'")
    name = "refine" if refine else profile_style
    if language == "zh":
        name += "-zh"
    return TEMPLATES[f"{name}/{TEMPLATE_VERSION}"]


# ---- distillation -------------------------------------------------------------------------------

_NAN = math.nan


def _clean(x: Any) -> float:
    """A float, with -0.0 -> 0.0 and every NaN the same NaN (stable digests)."""
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        return _NAN
    if math.isnan(v):
        return _NAN
    return v + 0.0


def _round(x: Any, decimals: int) -> float:
    if type(x) is float and -1e300 < x < 1e300:  # fast path (NaN fails the comparison)
        return round(x, decimals) + 0.0
    v = _clean(x)
    if not math.isfinite(v):
        return v
    try:
        return round(v, decimals) + 0.0
    except OverflowError:
        return v


def _sig(x: Any, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits."""
    v = _clean(x)
    if v == 0.0 or not math.isfinite(v):
        return v
    try:
        return round(v, digits - 1 - math.floor(math.log10(abs(v)))) + 0.0
    except OverflowError:
        return v


def timeframe_label(seconds: int) -> str:
    """``3600`` -> ``H1``; ``90`` -> ``90s``."""
    try:
        s = int(seconds)
    except (TypeError, ValueError, OverflowError):
        return str(seconds)
    if s > 0:
        if s % 604800 == 0:
            return f"W{s // 604800}"
        if s % 86400 == 0:
            return f"D{s // 86400}"
        if s % 3600 == 0:
            return f"H{s // 3600}"
        if s % 60 == 0:
            return f"M{s // 60}"
    return f"{s}s"


def _sig4(v: float) -> float:
    """``_sig(v, 4)`` for a finite float of sane magnitude (the fast path: one C-level format)."""
    return float(format(v, ".4g")) + 0.0 if -1e300 < v < 1e300 else _sig(v)


def _ranked_slow(features: dict[Any, Any], limit: int) -> list[tuple[str, float]]:
    items = [(str(k), _sig(v)) for k, v in features.items()]
    items.sort(key=lambda kv: (-abs(kv[1]) if math.isfinite(kv[1]) else 1.0, kv[0]))
    return items[:limit]


def ranked_features(ctx: ReasoningContext, limit: int = MAX_FEATURES) -> list[tuple[str, float]]:
    """``ctx.features`` as ``(name, value rounded to 4 significant digits)``, largest absolute
    value first (ties by name; NaN and inf last), at most ``limit``."""
    features = ctx.features
    if not features:
        return []
    try:
        # tuples sort in C; `v - v == 0` is False exactly for NaN and inf, which go last
        keyed = [(-abs(v) if v - v == 0 else 1.0, k, v) for k, v in features.items()]
        keyed.sort()
        return [(k, _sig4(v)) for _, k, v in keyed[:limit]]
    except TypeError:  # a context built by hand with non-float values or non-str names
        return _ranked_slow(features, limit)


_TF_LABELS: dict[int, str] = {}


def distill(ctx: ReasoningContext) -> dict[str, float | str]:
    """The compact context a rationale is written from.

    Returns
    -------
    dict[str, float | str]
        ``instrument``, ``timeframe`` (``H1``), ``asset_class``, ``persona``, ``language``,
        ``action`` (int), ``n_agents`` (int), ``score``, ``confidence``, ``agreement`` (3
        decimals), ``dispersion`` (4 significant digits) and ``f:<name>`` for at most
        :data:`MAX_FEATURES` features (4 significant digits), strongest first. Signal id,
        timestamp and sequence are left out: they do not change what is worth saying.

    Notes
    -----
    On the broker's per-task path (the narrative cache key), so written for speed: about
    5 us for 8 features in CPython.
    """
    tf = ctx.timeframe
    label = _TF_LABELS.get(tf)
    if label is None:
        label = timeframe_label(tf)
        if len(_TF_LABELS) < 256:
            _TF_LABELS[tf] = label
    out: dict[str, float | str] = {
        "instrument": ctx.instrument,
        "timeframe": label,
        "asset_class": ctx.asset_class,
        "persona": ctx.persona,
        "language": ctx.language,
        "action": int(ctx.action),
        "n_agents": int(ctx.n_agents),
        "score": _round(ctx.score, 3),
        "confidence": _round(ctx.confidence, 3),
        "agreement": _round(ctx.agreement, 3),
        "dispersion": _sig(ctx.dispersion),
    }
    if ctx.features:
        out.update([("f:" + name, value) for name, value in ranked_features(ctx)])
    return out


_DIGEST_ENC = msgspec.msgpack.Encoder(order="sorted")


def digest(distilled: dict[str, Any]) -> str:
    """16 hex digits: blake2b (8 bytes) of the msgpack encoding with keys sorted, so the same
    content in any dict order gives the same digest."""
    return blake2b(_DIGEST_ENC.encode(distilled), digest_size=8).hexdigest()


def _bucket(x: float, edges: tuple[float, float]) -> str:
    if not math.isfinite(x):
        return "na"
    return "low" if x < edges[0] else "mid" if x < edges[1] else "high"


def regime_bucket(ctx: ReasoningContext) -> str:
    """Coarse regime for the cache key: ``agreement/dispersion/sign`` such as ``high/low/+``
    (buckets ``low``, ``mid``, ``high``, or ``na`` for NaN; sign ``+``, ``-`` or ``0`` of the
    action). Edges: :data:`AGREEMENT_EDGES`, :data:`DISPERSION_EDGES`."""
    a = ctx.action
    sign = "+" if a > 0 else "-" if a < 0 else "0"
    agreement = _bucket(_clean(ctx.agreement), AGREEMENT_EDGES)
    dispersion = _bucket(_clean(ctx.dispersion), DISPERSION_EDGES)
    return f"{agreement}/{dispersion}/{sign}"


def action_direction(action: int) -> str:
    """-2, -1 -> ``sell``; 0 -> ``hold``; 1, 2 -> ``buy`` (by sign beyond that range)."""
    return "buy" if action > 0 else "sell" if action < 0 else "hold"


_LABELS_EN = {-2: "STRONG SELL", -1: "SELL", 0: "HOLD", 1: "BUY", 2: "STRONG BUY"}
_LABELS_ZH = {-2: "强烈卖出", -1: "卖出", 0: "持有", 1: "买入", 2: "强烈买入"}


def action_label(action: int, language: str = "en") -> str:
    """``STRONG SELL``, ``SELL``, ``HOLD``, ``BUY``, ``STRONG BUY`` (Chinese for ``"zh"``)."""
    a = max(-2, min(2, int(action)))
    return (_LABELS_ZH if language == "zh" else _LABELS_EN)[a]


# ---- fitting a prompt ---------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Upper-bound-ish token count: ``ceil(utf8_bytes / 4)``.

    English runs about 4 characters per token, so this is close for prose and generous for
    digits; a CJK character is 3 UTF-8 bytes, i.e. 0.75 token here, where real tokenizers
    spend 0.6 to 1. Prompts are fitted with this estimate, so keep some headroom in
    ``max_tokens`` when a window is tight.
    """
    if text.isascii():
        return (len(text) + 3) // 4
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


_LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "es": "Spanish",
                   "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese", "ru": "Russian"}


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def _fields(d: dict[str, Any], template: PromptTemplate) -> dict[str, Any]:
    zh = template.language == "zh"
    persona = str(d["persona"]) or ("分析师" if zh else "analyst")
    agreement = float(d["agreement"])
    pct = agreement * 100.0
    return {
        "instrument": d["instrument"],
        "timeframe": d["timeframe"],
        "asset_class": d["asset_class"],
        "action_label": action_label(int(d["action"]), template.language),
        "direction": action_direction(int(d["action"])),
        "score": _fmt(float(d["score"]), "+.3f"),
        "confidence": _fmt(float(d["confidence"]), ".3f"),
        "agreement": _fmt(pct, ".0f") + "%" if math.isfinite(pct) else "n/a",
        "dispersion": _fmt(float(d["dispersion"]), ".4g"),
        "n_agents": d["n_agents"],
        "regime": "",
        "persona": persona,
        "language_name": _LANGUAGE_NAMES.get(str(d["language"]), str(d["language"]) or "English"),
        "draft": "",
    }


def _features_text(feats: list[tuple[str, float]]) -> str:
    return "\n".join(f"- {name} = {_fmt(v, '.4g')}" for name, v in feats) if feats else "-"


def _cut(text: str, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` estimated tokens (at a UTF-8 character boundary)."""
    if estimate_tokens(text) <= max_tokens:
        return text
    raw = text.encode("utf-8", "surrogatepass")[: max(0, max_tokens) * 4]
    return raw.decode("utf-8", "ignore")


def build_messages(template: PromptTemplate, ctx: ReasoningContext, *, context_window: int, max_tokens: int,
                   draft: str | None = None) -> tuple[tuple[tuple[str, str], ...], int]:
    """Render ``template`` for ``ctx`` and fit it into ``context_window - max_tokens`` tokens.

    Parameters
    ----------
    template : PromptTemplate
    ctx : ReasoningContext
    context_window : int
        The provider's window (prompt plus reply).
    max_tokens : int
        Tokens reserved for the reply.
    draft : str | None
        The rationale to improve (refinement templates).

    Returns
    -------
    messages : tuple[tuple[str, str], ...]
        ``(("system", ...), ("user", ...))``.
    tokens : int
        Estimated prompt tokens (:func:`estimate_tokens` of each message plus
        :data:`MESSAGE_OVERHEAD_TOKENS` per message and :data:`REPLY_PRIMING_TOKENS`); never
        more than ``context_window - max_tokens``.

    Notes
    -----
    When the prompt is too long the weakest features go first, then the draft is cut, then
    the longer of the two messages is cut from its end.

    Raises
    ------
    ValueError
        ``context_window - max_tokens`` leaves less than the fixed per-message overhead.
    """
    overhead = 2 * MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS
    avail = context_window - max_tokens - overhead
    if avail < 0:
        raise ValueError(f"context_window {context_window} - max_tokens {max_tokens} leaves no room for a "
                         f"prompt (at least {overhead} tokens)")
    d = distill(ctx)
    f = _fields(d, template)
    f["regime"] = regime_bucket(ctx)
    feats = [(k[2:], float(v)) for k, v in d.items() if k.startswith("f:")]
    system = template.system.format_map(f)
    t_sys = estimate_tokens(system)
    f["draft"] = draft or ""
    user = ""
    for n in range(len(feats), -1, -1):
        f["features"] = _features_text(feats[:n])
        user = template.user.format_map(f)
        t_user = estimate_tokens(user)
        if t_sys + t_user <= avail:
            return (("system", system), ("user", user)), t_sys + t_user + overhead
    # no features left and still too long: cut the draft to the room left, if there is any
    if draft:
        f["draft"] = ""
        bare = template.user.format_map(f)
        room = 4 * (avail - t_sys) - len(bare.encode("utf-8", "surrogatepass"))
        if room > 0:
            f["draft"] = draft.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
        user = template.user.format_map(f)
    t_user = estimate_tokens(user)
    if t_sys + t_user > avail:
        half = avail // 2
        if t_user <= half:
            system = _cut(system, avail - t_user)
        elif t_sys <= half:
            user = _cut(user, avail - t_sys)
        else:
            system = _cut(system, half)
            user = _cut(user, avail - half)
    tokens = estimate_tokens(system) + estimate_tokens(user) + overhead
    return (("system", system), ("user", user)), tokens


# ---- reading replies -----------------------------------------------------------------------------


class ParsedReply(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider's reply says.

    Attributes
    ----------
    direction : {"buy", "sell", "hold"} | None
    confidence : float | None
        In [0, 1], when the reply states a number.
    rationale : str
        The explanation (the ``rationale`` field of a JSON reply, else the stripped text).
    valid : bool
        JSON style: a JSON object with a recognised direction and, if any, a confidence in
        [0, 1] (or a percentage). Narrative style: a direction was found.
    tags : tuple[str, ...]
        How it was read: ``fenced`` (JSON in a code fence), ``prose`` (JSON inside prose),
        ``heuristic`` (direction from words), ``mixed`` (as many bullish as bearish words),
        ``negated`` (a directional word after a negation, counted for hold),
        ``confidence_pct`` (a percentage), ``confidence:high|medium|low`` (a word).
    """

    direction: Literal["buy", "sell", "hold"] | None = None
    confidence: float | None = None
    rationale: str = ""
    valid: bool = False
    tags: tuple[str, ...] = ()


_SYNONYMS = {
    "buy": "buy", "long": "buy", "bullish": "buy", "strong buy": "buy", "strong_buy": "buy",
    "sell": "sell", "short": "sell", "bearish": "sell", "strong sell": "sell", "strong_sell": "sell",
    "hold": "hold", "neutral": "hold", "flat": "hold", "wait": "hold",
    "买入": "buy", "强烈买入": "buy", "看涨": "buy", "做多": "buy", "看多": "buy",
    "卖出": "sell", "强烈卖出": "sell", "看跌": "sell", "做空": "sell", "看空": "sell",
    "持有": "hold", "观望": "hold", "中性": "hold",
}

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_EXPLICIT = re.compile(
    r"\b(?:direction|action|recommendation|signal|verdict|call|stance)\b\W{0,3}?\s*[:=\-\u2013\u2014]\s*"
    r"[*_\"']*\s*(?:strong(?:ly)?[ _])?(buy|sell|hold|long|short|neutral|bullish|bearish)\b"
    r"|(?:方向|操作|建议|信号|结论)\s*[:：]\s*(?:强烈)?(买入|卖出|持有|看涨|看跌|做多|做空|观望|中性)",
    re.IGNORECASE)
_BUY = re.compile(r"\b(?:buy(?:ing)?|bullish|long(?![- ]term))\b|买入|看涨|做多|看多", re.IGNORECASE)
_SELL = re.compile(r"\b(?:sell(?:ing)?|bearish|short(?![- ]term))\b|卖出|看跌|做空|看空", re.IGNORECASE)
_HOLD = re.compile(r"\b(?:hold|neutral|stay flat)\b|持有|观望|中性", re.IGNORECASE)
# A directional word negated in its own clause ("do not buy", "not bearish", "no reason to sell",
# "I don't think we should sell", 不要买入, 不建议现在买入) is not a vote for that side; it counts
# as a vote to hold. Walking back from the word through the clause, only negations and the
# filler words below may stand between; any other word ("not only bullish", "no doubt bullish",
# "never been more bullish", "don't hesitate to buy", "cannot withstand buying") ends the walk,
# and two negations cancel ("no reason not to buy"). 不得不 ("must"), 不仅 ("not only") and the
# like are no negation.
_NEG_WORDS = frozenset("not no never nor cannot can't don't dont doesn't didn't isn't aren't wasn't won't "
                       "wouldn't shouldn't couldn't avoid avoiding against".split())
_NEG_FILLER = frozenset("to be go going get a an the too yet longer any time reason point need worth so very "
                        "overly that this it we i you they should would could will want recommend suggest "
                        "think believe now here currently still single see sign signs of".split())
_CLAUSE_WORDS = re.compile(r"[a-z']+|[^\sa-z']", re.IGNORECASE)
_ZH_NEG = re.compile(r"(?:不|别|勿|没有|未|不要|不建议|不宜|不能|不应)[\u4e00-\u9fff]{0,3}$")
_ZH_NOT_NEGATIONS = ("不得不", "不仅", "不只", "不断", "不少", "不错", "不久")  # must, not only, ...
_ZH_CLAUSE = re.compile(r"[，。；！？,.;!?\n]")


def _negated(before: str) -> bool:
    """Whether the directional word that follows ``before`` is negated in its clause."""
    tail = before[-60:]
    if tail and "\u4e00" <= tail[-1] <= "\u9fff":  # a Chinese word: the clause's last characters
        clause = _ZH_CLAUSE.split(tail)[-1]
        for w in _ZH_NOT_NEGATIONS:
            clause = clause.replace(w, "")
        return _ZH_NEG.search(clause[-6:]) is not None
    negations = 0
    for w in reversed(_CLAUSE_WORDS.findall(tail)[-8:]):
        w = w.lower().replace("\u2019", "'")
        if w in _NEG_WORDS or w.endswith("n't"):
            negations += 1
        elif w not in _NEG_FILLER:
            break
    return negations % 2 == 1


_CONF_NUM = re.compile(r"(?:\bconfidence\b[\"']?|置信度|信心)\s*(?:level|score)?\s*(?:[:=：]|\bis\b|\bof\b)?\s*"
                       r"([0-9]*\.?[0-9]+)\s*(%)?", re.IGNORECASE)
_CONF_WORD = re.compile(r"\b(high|medium|moderate|low)[ -]confidence\b|(高|中等?|低)置信度|置信度(高|中等?|低)",
                        re.IGNORECASE)
_CONF_WORDS = {"high": "high", "medium": "medium", "moderate": "medium", "low": "low",
               "高": "high", "中": "medium", "中等": "medium", "低": "low"}


def _votes(word: re.Pattern[str], text: str) -> tuple[int, int]:
    """(plain, negated) mentions of ``word`` in ``text``."""
    plain = negated = 0
    for m in word.finditer(text):
        if _negated(text[max(0, m.start() - 60):m.start()]):
            negated += 1
        else:
            plain += 1
    return plain, negated


def _direction_from_words(text: str, tags: list[str]) -> str | None:
    explicit = None
    for m in _EXPLICIT.finditer(text):  # the last explicit statement wins (a summary line)
        explicit = m.group(1) or m.group(2)
    if explicit:
        return _SYNONYMS.get(explicit.lower())
    nb, neg_b = _votes(_BUY, text)
    ns, neg_s = _votes(_SELL, text)
    nh, _ = _votes(_HOLD, text)  # "don't hold" says nothing about which side
    negated = neg_b + neg_s
    if negated:
        tags.append("negated")
        nh += negated
    if nh > max(nb, ns):
        return "hold"
    if nb > ns:
        return "buy"
    if ns > nb:
        return "sell"
    if nb:
        tags.append("mixed")
        return None
    return None


def _pct(v: float, tags: list[str]) -> float | None:
    if not math.isfinite(v) or v < 0.0:
        return None
    if v <= 1.0:
        return v
    if v <= 100.0:
        tags.append("confidence_pct")
        return v / 100.0
    return None


def _confidence_from_words(text: str, tags: list[str]) -> float | None:
    m = _CONF_WORD.search(text)
    if m:
        word = (m.group(1) or m.group(2) or m.group(3)).lower()
        tags.append("confidence:" + _CONF_WORDS.get(word, word))
    m = None
    for m in _CONF_NUM.finditer(text):  # the last statement wins, like the direction's
        pass
    if m is None:
        return None
    v = float(m.group(1))
    if m.group(2):
        tags.append("confidence_pct")
        return v / 100.0 if 0.0 <= v <= 100.0 else None
    return _pct(v, tags)


def _json_object(text: str, tags: list[str]) -> dict[str, Any] | None:
    m = _FENCE.search(text)
    if m:
        try:
            obj = msgspec.json.decode(m.group(1).strip())
        except (msgspec.DecodeError, RecursionError, ValueError):
            obj = None
        if isinstance(obj, dict):
            tags.append("fenced")
            return obj
    i = text.find("{")
    j = text.rfind("}")
    if 0 <= i < j:
        try:
            obj = msgspec.json.decode(text[i:j + 1])
        except (msgspec.DecodeError, RecursionError, ValueError):
            return None
        if isinstance(obj, dict):
            if text[:i].strip() or text[j + 1:].strip():
                tags.append("prose")
            return obj
    return None


def parse_reply(text: str, style: str) -> ParsedReply:
    """Read direction, confidence and rationale from a provider's reply.

    Parameters
    ----------
    text : str
        The reply as written.
    style : {"json", "narrative"}
        JSON: ``{"direction", "confidence", "rationale"}``, also inside a code fence or prose;
        if that fails the reply is read as narrative and marked ``valid=False``. Narrative:
        an explicit ``Direction: buy`` / ``方向：买入`` (the last one wins), else the majority of
        bullish (buy, long, bullish, 买入, 看涨, ...) against bearish (sell, short, bearish,
        卖出, 看跌, ...) against hold words, where a negated word ("do not buy", "not
        bearish", 不要买入) counts for hold; ``Confidence: 0.7``, ``confidence 70%``, ``置信度：0.7`` (the
        last one wins) and ``high/medium/low confidence`` (a tag only).

    Returns
    -------
    ParsedReply
        Never raises on any string (JSON nested too deeply to decode is read as narrative).
    """
    tags: list[str] = []
    if style == "json":
        obj = _json_object(text, tags)
        if obj is not None:
            raw_dir = obj.get("direction")
            direction = _SYNONYMS.get(raw_dir.strip().lower()) if isinstance(raw_dir, str) else None
            raw_conf = obj.get("confidence")
            conf_ok = True
            confidence: float | None = None
            if isinstance(raw_conf, (int, float)) and not isinstance(raw_conf, bool):
                confidence = _pct(float(raw_conf), tags)
                conf_ok = confidence is not None
            elif isinstance(raw_conf, str):
                try:
                    confidence = _pct(float(raw_conf.strip().rstrip("%")), tags)
                except ValueError:
                    confidence = None
                conf_ok = confidence is not None
            elif raw_conf is not None:
                conf_ok = False
            raw_rat = obj.get("rationale", "")
            rationale = raw_rat if isinstance(raw_rat, str) else ""
            if direction is not None and conf_ok and isinstance(raw_rat, str):
                return ParsedReply(direction=direction, confidence=confidence, rationale=rationale.strip(),
                                   valid=True, tags=tuple(tags))
            tags.append("heuristic")
            if direction is None:
                direction = _direction_from_words(rationale or text, tags)
            return ParsedReply(direction=direction, confidence=confidence,  # type: ignore[arg-type]
                               rationale=(rationale or text).strip(), valid=False, tags=tuple(tags))
        tags.append("heuristic")
        direction = _direction_from_words(text, tags)
        confidence = _confidence_from_words(text, tags)
        return ParsedReply(direction=direction, confidence=confidence,  # type: ignore[arg-type]
                           rationale=text.strip(), valid=False, tags=tuple(tags))
    direction = _direction_from_words(text, tags)
    confidence = _confidence_from_words(text, tags)
    return ParsedReply(direction=direction, confidence=confidence,  # type: ignore[arg-type]
                       rationale=text.strip(), valid=direction is not None, tags=tuple(tags))
