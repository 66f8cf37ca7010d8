"""Routing policy: which providers may write a task's rationale, in which order, right now.

The policy is declarative (a TOML file, see :data:`DEFAULT_POLICY_TOML`) and is loaded into
frozen msgspec Structs that refuse unknown fields. :class:`Router` turns it into a per-task
candidate list and keeps the live state the filters need: daily token/USD spend, rpm/tpm
sliding windows, latency rings, error counts, cooldowns and a circuit breaker per provider.

The broker calls, per task and attempt::

    cands = router.route(RouteRequest(request_class="deep", persona="macro", asset_class="fx",
                                      deadline_s=8.0, tokens_in=600, tokens_out=200))
    router.record_start(cands[0], 600)
    ...                                 # the adapter answers
    router.record_result(cands[0], ok=True, latency_s=1.2, tokens_in=612, tokens_out=143)

Everything here runs on the broker's single-threaded event loop: no locks, no logging, no
regular expressions and no per-call allocation beyond the returned list on the routing path.
Rule matching is memoised per ``(request_class, persona, asset_class, language)`` together
with the filters that depend only on those (asset class, persona, language), so ``route`` does
a dict lookup and a few attribute comparisons per candidate.
"""

from __future__ import annotations

import math
import operator
import os
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from ..errors import PolicyError
from .profiles import LATENCY_CLASSES, ProviderProfile

__all__ = [
    "DEFAULT_POLICY_TOML",
    "LATENCY_PRIORS_S",
    "REQUEST_CLASSES",
    "SKIP_REASONS",
    "BreakerConfig",
    "PolicyConfig",
    "ProviderLimits",
    "RouteRequest",
    "Router",
    "Rule",
    "load_policy",
    "routing_rules",
]

REQUEST_CLASSES = ("tactical", "deep", "multilingual", "regional-CN", "numeric")
"""What a task asks for: a quick take, a long analysis, a non-English text, a text for the
Chinese market (needs a provider that writes Chinese), or a numbers-heavy explanation."""

LATENCY_PRIORS_S: dict[str, float] = {"instant": 0.001, "fast": 1.5, "standard": 4.0, "slow": 10.0}
"""Expected latency (s) per latency class until a provider has 5 observed replies."""

SKIP_REASONS = ("asset_class", "persona", "language", "context_window", "breaker", "cooldown", "budget",
                "rpm", "tpm", "deadline", "pressure", "cap")
"""Why :meth:`Router.route` dropped a candidate, in the order the filters run (``stats()``)."""

_WINDOW_S = 60.0  # rpm / tpm are per sliding minute
_RING = 1024  # latencies kept per provider
_MIN_LATENCY_SAMPLES = 5
_MEMO_MAX = 4096  # distinct (class, persona, asset, language) keys before the memo is rebuilt
_NO_FAILURE = frozenset(("cancelled", "budget"))  # our own doing, not the provider's
_shed_key = operator.attrgetter("shed_key")

RequestClass = Literal["tactical", "deep", "multilingual", "regional-CN", "numeric", "*"]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
# every number has a finite upper bound: an infinity (TOML's ``inf``) would bench a provider
# forever after one failure, or disable a filter for good
_DAY_S = 86400.0
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=_DAY_S)]
Count = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
MAX_WEIGHT = 1000.0


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One routing rule: tasks it matches get ``candidates``, in this order, before filtering.

    Attributes
    ----------
    request_class : str
        One of :data:`REQUEST_CLASSES`, or ``"*"`` for any.
    persona, asset_class : str | None
        Match only this persona / asset class (``None``: any).
    max_deadline_ms : int | None
        Match only tasks whose remaining deadline is at most this (tight deadline -> fast
        providers).
    candidates : tuple[str, ...]
        Provider names, most preferred first.
    """

    request_class: RequestClass = "*"
    persona: Name | None = None
    asset_class: Name | None = None
    max_deadline_ms: Annotated[int, msgspec.Meta(ge=0, le=int(_DAY_S * 1000))] | None = None
    candidates: Annotated[tuple[Name, ...], msgspec.Meta(min_length=1, max_length=64)]

    @property
    def specificity(self) -> tuple[int, bool, int]:
        """Sort key, larger first: (how many of class/persona/asset are pinned, has a deadline
        bound, minus the bound). Among rules pinning as much, a deadline-bounded one beats an
        unbounded one and a tighter bound a looser one, whatever the file order, so "tight
        deadline" rules need not come first; remaining ties go in file order."""
        n = (self.request_class != "*") + (self.persona is not None) + (self.asset_class is not None)
        bound = self.max_deadline_ms
        return n, bound is not None, 0 if bound is None else -bound


class ProviderLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Budgets, quotas and eligibility of one provider (every field optional).

    Attributes
    ----------
    daily_tokens, daily_usd : int | float | None
        Spend allowed per UTC day (prompt plus completion tokens; USD from the profile's prices).
    rpm, tpm : int | None
        Requests / tokens allowed per sliding minute.
    asset_classes : tuple[str, ...] | None
        Asset classes it may write about (``None``: all).
    personas : tuple[str, ...] | None
        Personas it may speak as (``None``: the profile's ``personas``; ``"*"``: any).
    weight : float
        Its ensemble weight, in [0, 1000]: an ensemble reply's rerank score is multiplied by it
        (and by the weight review decisions gave the provider). Not used for routing; read with
        :meth:`Router.weight`.

    Counts are at most 10**15 and ``daily_usd`` at most 1e12 (a finite number).
    """

    daily_tokens: Count | None = None
    daily_usd: Annotated[float, msgspec.Meta(ge=0.0, le=1e12)] | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    asset_classes: tuple[Name, ...] | None = None
    personas: tuple[Name, ...] | None = None
    weight: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_WEIGHT)] = 1.0


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Circuit breaker, one per provider.

    Closed -> open when, within the last ``window_s``, at least ``min_requests`` results were
    recorded and ``failure_pct`` % or more of them failed. Open -> half-open ``open_s`` later,
    when up to ``half_open_probes`` attempts may start; the first probe result decides: success
    closes (with an empty window), failure opens again for another ``open_s``.

    ``window_s`` and ``open_s`` are at most a day (86400 s); ``min_requests`` and
    ``half_open_probes`` at most 10**6.
    """

    failure_pct: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 50.0
    min_requests: Annotated[int, msgspec.Meta(ge=1, le=10**6)] = 10
    window_s: Annotated[float, msgspec.Meta(gt=0.0, le=_DAY_S)] = 60.0
    open_s: Seconds = 30.0
    half_open_probes: Annotated[int, msgspec.Meta(ge=1, le=10**6)] = 1


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole routing policy.

    Attributes
    ----------
    rules : tuple[Rule, ...]
        Matched most specific first (see :attr:`Rule.specificity`), ties in file order.
    limits : dict[str, ProviderLimits]
        Per-provider budgets and eligibility; providers not named have none.
    fallback_cap : int
        Most candidates tried per task, ``last_resort`` not counted.
    cooldown_failures, cooldown_s : int, float
        That many consecutive failures bench a provider for ``cooldown_s`` (at most a day).
    max_retry_after_s : float
        Longest a ``Retry-After`` benches a provider (a longer one counts as this long), so a
        server asking for hours, or for a date in the year 9999, cannot disable it for good
        (at most a day itself).
    breaker : BreakerConfig
    default_candidates : tuple[str, ...]
        Candidates when no rule matches.
    last_resort : str
        Appended to every route and never filtered (no budget, breaker or cooldown applies),
        so it must name a provider of kind ``local`` (the zero-cost narrator): the
        :class:`Router` refuses any other.
    throttle_margin : float
        A candidate is dropped when the task's remaining deadline is below its expected
        latency times this (in (0, 1000]).
    """

    rules: tuple[Rule, ...] = ()
    limits: dict[Name, ProviderLimits] = msgspec.field(default_factory=dict)
    fallback_cap: Annotated[int, msgspec.Meta(ge=0, le=64)] = 3
    cooldown_failures: Annotated[int, msgspec.Meta(ge=1, le=10**6)] = 3
    cooldown_s: Seconds = 30.0
    max_retry_after_s: Seconds = 300.0
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    default_candidates: tuple[Name, ...] = ("local",)
    last_resort: Name = "local"
    throttle_margin: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] = 1.0


DEFAULT_POLICY_TOML = """\
# Default routing policy of the reasoning mesh (dynamic_core.reasoning.policy).
#
# Rules are matched most specific first: a rule pinning request_class, persona and asset_class
# beats one pinning two of them, which beats one pinning the class only, which beats "*";
# among equals a rule with max_deadline_ms beats one without (the tighter bound first), then
# file order decides. The chosen rule's candidates are filtered (breaker, cooldown, budgets,
# rpm/tpm, asset class, persona, context window, language, deadline, load shedding), capped
# to fallback_cap, and last_resort is appended.

fallback_cap = 3            # remote providers tried per task at most
cooldown_failures = 3       # consecutive failures that bench a provider ...
cooldown_s = 30.0           # ... for this long (longer when a 429 says Retry-After)
max_retry_after_s = 300.0   # a longer Retry-After counts as this long
default_candidates = ["chatgpt", "deepseek"]
last_resort = "local"       # the deterministic narrator: free, instant, never filtered
throttle_margin = 1.0       # drop a provider whose expected latency exceeds the time left

[breaker]
failure_pct = 50.0          # open when half the results in the window failed ...
min_requests = 10           # ... and there were at least this many
window_s = 60.0
open_s = 30.0               # then let one probe through after this long
half_open_probes = 1

# Quick takes. Under 2 s there is no time for a remote model: the narrator answers.
[[rules]]
request_class = "tactical"
max_deadline_ms = 2000
candidates = ["local"]

[[rules]]
request_class = "tactical"
candidates = ["grok", "chatgpt", "qwen"]

[[rules]]
request_class = "tactical"
persona = "scalper"
candidates = ["grok", "chatgpt"]

# Long analyses: the strong reasoners first, a local model as the last paid-for-nothing try.
[[rules]]
request_class = "deep"
candidates = ["deepseek", "kimi", "chatgpt", "ollama"]

[[rules]]
request_class = "deep"
persona = "macro"
candidates = ["kimi", "deepseek", "chatgpt"]

# Text in the request's language (the router drops providers that do not write it).
[[rules]]
request_class = "multilingual"
candidates = ["chatgpt", "qwen"]

# For the Chinese market: providers that write Chinese (the router requires "zh").
[[rules]]
request_class = "regional-CN"
candidates = ["qwen", "deepseek", "kimi", "zhipu", "hunyuan", "minimax"]

[[rules]]
request_class = "numeric"
candidates = ["deepseek", "chatgpt"]

[[rules]]
request_class = "*"
candidates = ["chatgpt", "deepseek"]

# Safety nets on spend; raise them to your contract. Unnamed providers have no limits.
[limits.chatgpt]
daily_usd = 25.0
rpm = 500

[limits.kimi]
daily_usd = 25.0

[limits.grok]
daily_usd = 25.0
"""
"""The built-in policy (TOML, commented): every request class routed to built-in providers."""


def _convert(data: Any) -> PolicyConfig:
    try:
        return msgspec.convert(data, PolicyConfig)
    except msgspec.ValidationError as e:
        msg = str(e)
        # msgspec writes dict values as `$.limits[...]`; name the provider instead
        limits = data.get("limits") if isinstance(data, Mapping) else None
        if "$.limits[...]" in msg and isinstance(limits, Mapping):
            for name, table in limits.items():
                try:
                    msgspec.convert(table, ProviderLimits)
                except msgspec.ValidationError as e2:
                    msg = str(e2).replace("- at `$", f"- at `$.limits.{name}")
                    if "- at `" not in msg:
                        msg += f" - at `$.limits.{name}`"
                    break
        raise PolicyError(f"routing policy: {msg}") from None


def _looks_like_path(text: str) -> bool:
    """Whether a one-line ``str`` policy source is meant as a file name rather than TOML text:
    it ends in ``.toml``, or it holds a path separator and no ``=``."""
    if text.rstrip().lower().endswith(".toml"):
        return True
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return "=" not in text and any(c in text for c in seps)


def load_policy(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> PolicyConfig:
    """Read a routing policy.

    Parameters
    ----------
    source : str | os.PathLike | Mapping | None
        ``None``: :data:`DEFAULT_POLICY_TOML`. A path (``PathLike``, or a ``str`` naming an
        existing file): that TOML file is read. A ``str`` that looks like a path (one line,
        ending in ``.toml``, or holding a path separator and no ``=``) but names no file:
        :class:`PolicyError` saying the file does not exist. Any other ``str``: parsed as TOML
        text. A mapping: the parsed document (e.g. the ``policy`` table of a larger config
        file).

    Returns
    -------
    PolicyConfig

    Raises
    ------
    PolicyError
        A file that does not exist or cannot be read, a TOML syntax error, an unknown field or
        a value of the wrong type or out of range; the message gives the path of the bad field
        (``$.rules[2].candidates``).
    """
    if source is None:
        source = DEFAULT_POLICY_TOML
    if isinstance(source, Mapping):
        return _convert(source)
    where = "policy text"
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                           and (os.path.isfile(source) or _looks_like_path(source))):
        where = os.fspath(source)
        try:
            with open(where, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise PolicyError(f"routing policy {where}: the file does not exist") from None
        except OSError as e:
            raise PolicyError(f"routing policy {where}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyError(f"routing policy {where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    elif isinstance(source, str):
        text = source
    else:
        raise PolicyError("routing policy: expected a path, TOML text or a mapping, got "
                          f"{type(source).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"routing policy {where}: TOML syntax error: {e}") from None
    return _convert(data)


class RouteRequest(msgspec.Struct, kw_only=True, gc=False):
    """What :meth:`Router.route` needs to know about one task.

    Attributes
    ----------
    request_class : str
        One of :data:`REQUEST_CLASSES`.
    persona, asset_class, language : str
        Of the task (``persona=""``: none in particular).
    deadline_s : float
        Time remaining until the task's deadline.
    tokens_in, tokens_out : int
        Estimated prompt tokens and the reply's ``max_tokens``.
    """

    request_class: str
    persona: str = ""
    asset_class: str = "fx"
    deadline_s: float = math.inf
    tokens_in: int = 0
    tokens_out: int = 0
    language: str = "en"


def routing_rules(table: Mapping[str, str]) -> tuple[Rule, ...]:
    """Rules from a routing table (the ``UpdateRouting`` control command's ``table``).

    Each key is ``CLASS[/PERSONA[/ASSET_CLASS]]``: a request class of :data:`REQUEST_CLASSES`
    or ``*``, then optionally a persona and an asset class (``*`` or empty: any). Each value is
    the providers to ask, most preferred first, separated by commas::

        {"deep": "kimi,deepseek", "tactical/macro/fx": "grok", "*": "local"}

    Raises
    ------
    PolicyError
        A key or value that does not parse, naming it (provider names are checked by
        :meth:`Router.set_overrides`, which knows the profiles).
    """
    out = []
    for key, value in table.items():
        parts = str(key).split("/")
        if len(parts) > 3 or not parts[0]:
            raise PolicyError(f"routing key {key!r}: expected CLASS[/PERSONA[/ASSET_CLASS]]")
        rclass = parts[0]
        if rclass != "*" and rclass not in REQUEST_CLASSES:
            raise PolicyError(f"routing key {key!r}: unknown request class {rclass!r}; known are "
                              f"{', '.join(REQUEST_CLASSES)} or *")
        persona = parts[1] if len(parts) > 1 and parts[1] not in ("", "*") else None
        asset = parts[2] if len(parts) > 2 and parts[2] not in ("", "*") else None
        names = tuple(n.strip() for n in str(value).split(","))
        if not value or any(not n for n in names):
            raise PolicyError(f"routing value for {key!r}: expected PROVIDER[,PROVIDER...], got {value!r}")
        try:
            out.append(msgspec.convert({"request_class": rclass, "persona": persona, "asset_class": asset,
                                        "candidates": names}, Rule))
        except msgspec.ValidationError as e:
            raise PolicyError(f"routing entry {key!r}: {e}") from None
    return tuple(out)


class _Provider:
    """Live state of one provider (attributes only: the routing loop reads them directly)."""

    __slots__ = (
        "bfails",
        "breaker",
        "bwin",
        "consecutive",
        "context_window",
        "cooldown_until",
        "errors",
        "expected_s",
        "last_resort",
        "limits",
        "name",
        "ok",
        "opened_at",
        "p_in",
        "p_out",
        "pending",
        "probes_used",
        "profile",
        "held",
        "held_tokens",
        "held_usd",
        "rate",
        "results",
        "ring",
        "ring_n",
        "rpm",
        "shed_key",
        "skipped",
        "spent_tokens",
        "spent_usd",
        "started",
        "starts",
        "tok_sum",
        "tok_win",
        "tokens_in",
        "tokens_left",
        "tokens_out",
        "tpm",
        "usd",
        "usd_left",
    )

    def __init__(self, profile: ProviderProfile, limits: ProviderLimits, last_resort: bool) -> None:
        self.name = profile.name
        self.profile = profile
        self.limits = limits
        self.last_resort = last_resort
        self.context_window = profile.context_window
        self.shed_key = (profile.unit_cost, LATENCY_CLASSES.index(profile.latency_class))
        self.p_in = profile.usd_per_m_input * 1e-6
        self.p_out = profile.usd_per_m_output * 1e-6
        self.spent_tokens = 0
        self.spent_usd = 0.0
        self.tokens_left = math.inf
        self.usd_left = math.inf
        self.rpm = math.inf if limits.rpm is None else limits.rpm
        self.tpm = math.inf if limits.tpm is None else limits.tpm
        self.rate = limits.rpm is not None or limits.tpm is not None
        self.starts: deque[float] = deque()  # start times in the last minute
        self.tok_win: deque[tuple[float, int]] = deque()  # (time, tokens) in the last minute
        self.tok_sum = 0
        self.pending: dict[Any, int] = {}  # tpm estimates awaiting their actual counts, by attempt
        # what the attempts in flight may still spend (their prompt estimate plus max_tokens),
        # held against the daily budgets until their results come: a burst of queued tasks
        # cannot all be sent on the same unspent budget
        self.held: dict[Any, tuple[int, float]] = {}  # by attempt, oldest first
        self.held_tokens = 0
        self.held_usd = 0.0
        self.expected_s = LATENCY_PRIORS_S[profile.latency_class]
        self.ring = [0.0] * _RING
        self.ring_n = 0
        self.breaker = "closed"
        self.opened_at = 0.0
        self.probes_used = 0
        self.bwin: deque[tuple[float, bool]] = deque()  # (time, failed) of breaker-relevant results
        self.bfails = 0
        self.cooldown_until = -math.inf
        self.consecutive = 0
        self.started = 0
        self.results = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.tokens_in = 0
        self.tokens_out = 0
        self.usd = 0.0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.reset_day()

    def reset_day(self) -> None:
        self.spent_tokens = 0
        self.spent_usd = 0.0
        lim = self.limits
        self.tokens_left = math.inf if lim.daily_tokens is None else float(lim.daily_tokens)
        self.usd_left = math.inf if lim.daily_usd is None else lim.daily_usd

    def latencies(self) -> list[float]:
        n = min(self.ring_n, _RING)
        return sorted(self.ring[:n])


def _over_budget(st: _Provider, tokens_in: int, tokens_out: int) -> bool:
    """Would an attempt of these tokens pass the provider's daily token or USD budget, less
    what the attempts in flight hold?"""
    return (tokens_in + tokens_out > st.tokens_left - st.held_tokens
            or tokens_in * st.p_in + tokens_out * st.p_out > st.usd_left - st.held_usd)


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (the lower median for an even count)."""
    n = len(sorted_values)
    if not n:
        return None
    return sorted_values[max(0, min(n - 1, math.ceil(q * n) - 1))]


class Router:
    """Turns a :class:`PolicyConfig` into candidate lists and keeps the state its filters need.

    Parameters
    ----------
    config : PolicyConfig
    profiles : Mapping[str, ProviderProfile]
        Every provider that may be named (e.g. :func:`~dynamic_core.reasoning.profiles.load_profiles`).
    clock : callable
        Monotonic seconds, for windows, cooldowns and the breaker (tests drive it).
    wall_clock : callable
        Epoch seconds, only to find the UTC midnight at which daily budgets reset.

    Attributes
    ----------
    pressure : float
        Load in [0, 1], set by the task manager from its queue depth. Above 0, ``route`` sheds
        the ``ceil(pressure * n)`` most expensive of the ``n`` candidates left.

    Raises
    ------
    PolicyError
        A provider named in the rules, limits, ``default_candidates`` or ``last_resort`` that
        is not in ``profiles``, or a ``last_resort`` whose profile is not of kind ``local``.

    Notes
    -----
    Not thread-safe: one router per event loop. Unknown provider names passed to
    ``record_start`` / ``record_result`` raise ``KeyError``.
    """

    def __init__(self, config: PolicyConfig, profiles: Mapping[str, ProviderProfile], *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall_clock
        self.pressure = 0.0
        named: list[tuple[str, str]] = [(n, f"rules[{i}].candidates") for i, r in enumerate(config.rules)
                                        for n in r.candidates]
        named += [(n, "limits") for n in config.limits]
        named += [(n, "default_candidates") for n in config.default_candidates]
        named.append((config.last_resort, "last_resort"))
        for name, where in named:
            if name not in profiles:
                raise PolicyError(f"routing policy: unknown provider {name!r} in {where}; known are "
                                  f"{', '.join(profiles)}")
        lr = profiles[config.last_resort]
        if lr.kind != "local":
            # the last resort bypasses budgets, breaker and cooldown: a paid one would spend
            # without limit and keep being asked while it fails
            raise PolicyError(f"routing policy: last_resort must name a provider of kind 'local' (the "
                              f"narrator), but {config.last_resort!r} is {lr.kind!r}")
        no_limits = ProviderLimits()
        self._p: dict[str, _Provider] = {
            n: _Provider(p, config.limits.get(n, no_limits), n == config.last_resort)
            for n, p in profiles.items()
        }
        self._last = self._p[config.last_resort]
        self._cap = config.fallback_cap
        self._margin = config.throttle_margin
        b = config.breaker
        self._b_pct = b.failure_pct
        self._b_min = b.min_requests
        self._b_window = b.window_s
        self._b_open = b.open_s
        self._b_probes = b.half_open_probes
        # rules sorted once: most specific first, ties in file order (sort is stable)
        self._rules = sorted(config.rules, key=lambda r: r.specificity, reverse=True)
        self._configured = self._rules
        self.overrides: tuple[Rule, ...] = ()
        self._memo: dict[tuple[str, str, str, str], tuple[tuple[float, tuple[_Provider, ...],
                                                                tuple[dict[str, int], ...],
                                                                tuple[str, ...]], ...]] = {}
        self._memo_override: dict[tuple[Any, tuple[str, ...]], tuple[Any, ...]] = {}
        self._day_end = -math.inf
        self._roll_day(self._wall())

    def check_overrides(self, rules: Sequence[Rule]) -> None:
        """Raise :class:`PolicyError` if :meth:`set_overrides` would refuse ``rules`` (a provider
        not in the profiles); changes nothing. Reads only what construction fixed: safe from any
        thread."""
        for i, r in enumerate(rules):
            for n in r.candidates:
                if n not in self._p:
                    raise PolicyError(f"routing rule {i + 1} ({r.request_class}): unknown provider "
                                      f"{n!r}; known are {', '.join(self._p)}")

    def set_overrides(self, rules: Sequence[Rule]) -> None:
        """Put ``rules`` ahead of the configured ones (replacing any set before; ``()`` drops
        them): a task that an override matches is routed by it, any other by the policy's own
        rules. Among the overrides the most specific matches first, as among the configured
        rules. Live state (budgets, breakers, latencies) is kept.

        Raises
        ------
        PolicyError
            An override names a provider that is not in the profiles (nothing is changed).
        """
        rules = tuple(rules)
        self.check_overrides(rules)
        self.overrides = rules
        self._rules = sorted(rules, key=lambda r: r.specificity, reverse=True) + self._configured
        self._memo.clear()

    # ---- routing --------------------------------------------------------------------------------

    def _static(self, names: tuple[str, ...], key: tuple[str, str, str, str]) -> tuple[
            tuple[_Provider, ...], tuple[dict[str, int], ...], tuple[str, ...]]:
        """Candidates that pass the filters depending only on ``key``, and the skip counters
        (with their reasons) of those that do not."""
        request_class, persona, asset_class, language = key
        keep: list[_Provider] = []
        skip_dicts: list[dict[str, int]] = []
        skip_reasons: list[str] = []
        seen: set[str] = set()
        # multilingual: the request's language; regional-CN: Chinese whatever the request says
        must_write = {"multilingual": language, "regional-CN": "zh"}.get(request_class)
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            st = self._p[name]
            reason = None
            if not st.last_resort:
                lim, prof = st.limits, st.profile
                if lim.asset_classes is not None and asset_class not in lim.asset_classes:
                    reason = "asset_class"
                elif not (prof.speaks(persona) if lim.personas is None
                          else (not persona or "*" in lim.personas or persona in lim.personas)):
                    reason = "persona"
                elif must_write is not None and must_write not in prof.languages:
                    reason = "language"
            if reason is None:
                keep.append(st)
            else:
                skip_dicts.append(st.skipped)
                skip_reasons.append(reason)
        return tuple(keep), tuple(skip_dicts), tuple(skip_reasons)

    def _build(self, key: tuple[str, str, str, str]) -> tuple[Any, ...]:
        request_class, persona, asset_class, _ = key
        if request_class not in REQUEST_CLASSES:
            raise PolicyError(f"unknown request class {request_class!r}; known are "
                              f"{', '.join(REQUEST_CLASSES)}")
        entries = []
        for r in self._rules:
            if ((r.request_class == "*" or r.request_class == request_class)
                    and (r.persona is None or r.persona == persona)
                    and (r.asset_class is None or r.asset_class == asset_class)):
                max_s = math.inf if r.max_deadline_ms is None else r.max_deadline_ms / 1000.0
                entries.append((max_s, *self._static(r.candidates, key)))
                if max_s == math.inf:
                    break  # matches every deadline: nothing after it can be chosen
        else:
            entries.append((math.inf, *self._static(self.config.default_candidates, key)))
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        out = tuple(entries)
        self._memo[key] = out
        return out

    def route(self, req: RouteRequest, candidates: tuple[str, ...] | None = None) -> list[str]:
        """Providers to try for ``req``, in order; always ends with ``last_resort``.

        Parameters
        ----------
        req : RouteRequest
        candidates : tuple of str, optional
            Use these instead of the matching rule's (an A/B variant); every filter still
            applies. Unknown names raise ``KeyError``.

        Returns
        -------
        list[str]
            At most ``fallback_cap`` providers that pass every filter, then ``last_resort``
            (unless the rule already listed it, in which case it keeps its place).

        Raises
        ------
        PolicyError
            ``req.request_class`` is not one of :data:`REQUEST_CLASSES`.
        """
        now = self._clock()
        wall = self._wall()
        if wall >= self._day_end:
            self._roll_day(wall)
        key = (req.request_class, req.persona, req.asset_class, req.language)
        if candidates is None:
            entries = self._memo.get(key)
            if entries is None:
                entries = self._build(key)
        else:
            okey = (key, candidates)
            entries = self._memo_override.get(okey)  # type: ignore[assignment]
            if entries is None:
                if req.request_class not in REQUEST_CLASSES:
                    self._build(key)  # raises PolicyError
                if len(self._memo_override) >= _MEMO_MAX:
                    self._memo_override.clear()
                entries = self._memo_override[okey] = ((math.inf, *self._static(candidates, key)),)
        deadline = req.deadline_s
        for entry in entries:
            if deadline <= entry[0]:
                break
        _, cands, skip_dicts, skip_reasons = entry
        for d, reason in zip(skip_dicts, skip_reasons):
            d[reason] += 1
        tin = req.tokens_in
        tout = req.tokens_out
        tot = tin + tout
        min_expected = deadline / self._margin
        out: list[_Provider] = []
        n_remote = 0
        for st in cands:
            if st.last_resort:
                out.append(st)
                continue
            sk = st.skipped
            if tot > st.context_window:
                sk["context_window"] += 1
            elif st.breaker != "closed" and not self._admits(st, now):
                sk["breaker"] += 1
            elif st.cooldown_until > now:
                sk["cooldown"] += 1
            elif _over_budget(st, tin, tout):
                sk["budget"] += 1
            elif st.rate and not self._rate_ok(st, now, tot):
                pass  # _rate_ok counted rpm or tpm
            elif st.expected_s > min_expected:
                sk["deadline"] += 1
            else:
                out.append(st)
                n_remote += 1
        if n_remote:
            p = self.pressure
            if p > 0.0:
                k = math.ceil(min(p, 1.0) * n_remote)
                # most expensive first, ties: slower first, then later in the list (sort is stable
                # under reverse=True, so walk the list backwards)
                remote = [st for st in reversed(out) if not st.last_resort]
                remote.sort(key=_shed_key, reverse=True)
                shed = remote[:k]
                for st in shed:
                    st.skipped["pressure"] += 1
                out = [st for st in out if st not in shed]
                n_remote -= k
            if n_remote > self._cap:
                kept: list[_Provider] = []
                n = 0
                for st in out:
                    if st.last_resort:
                        kept.append(st)
                    elif n < self._cap:
                        kept.append(st)
                        n += 1
                    else:
                        st.skipped["cap"] += 1
                out = kept
        names = [st.name for st in out]
        last = self._last
        if last not in out:
            names.append(last.name)
        return names

    def _rate_ok(self, st: _Provider, now: float, tokens: int) -> bool:
        self._prune_rate(st, now)
        if len(st.starts) >= st.rpm:
            st.skipped["rpm"] += 1
            return False
        if st.tok_sum + tokens > st.tpm:
            st.skipped["tpm"] += 1
            return False
        return True

    @staticmethod
    def _prune_rate(st: _Provider, now: float) -> None:
        edge = now - _WINDOW_S
        starts = st.starts
        while starts and starts[0] <= edge:
            starts.popleft()
        win = st.tok_win
        while win and win[0][0] <= edge:
            st.tok_sum -= win.popleft()[1]

    def _admits(self, st: _Provider, now: float) -> bool:
        """Breaker not closed: may a new attempt start?"""
        self._advance_breaker(st, now)
        return st.breaker == "closed" or (st.breaker == "half_open" and st.probes_used < self._b_probes)

    def _advance_breaker(self, st: _Provider, now: float) -> None:
        if st.breaker == "open" and now - st.opened_at >= self._b_open:
            st.breaker = "half_open"
            st.probes_used = 0

    def _roll_day(self, wall: float) -> None:
        day = math.floor(wall / 86400.0)
        self._day_end = (day + 1) * 86400.0
        for st in self._p.values():
            st.reset_day()

    def admits(self, provider: str) -> bool:
        """May an attempt at ``provider`` start now (breaker and cooldown only)? Checked again
        when an attempt is sent, because a candidate list can be older than a breaker's state
        (a half-open breaker lets only its probes through). Does not use a probe."""
        st = self._p.get(provider)
        if st is None or st.last_resort:
            return True
        now = self._clock()
        if st.cooldown_until > now:
            return False
        return st.breaker == "closed" or self._admits(st, now)

    def admits_send(self, provider: str, tokens_in: int, tokens_out: int) -> str:
        """Why an attempt at ``provider`` with about ``tokens_in`` prompt tokens and at most
        ``tokens_out`` reply tokens may not be sent now ('' when it may): ``budget`` (its daily
        tokens or USD, less what the attempts in flight hold) or ``rate`` (its rpm or tpm).
        :meth:`admits` answers for the breaker and the cooldown. Asked when each attempt is
        sent, since a task routed when it was queued may wait behind others that spend the
        budget or fill the minute's quota first; a refusal is counted in the provider's
        ``skipped``. Takes no quota."""
        st = self._p.get(provider)
        if st is None or st.last_resort:
            return ""
        wall = self._wall()
        if wall >= self._day_end:
            self._roll_day(wall)
        if _over_budget(st, tokens_in, tokens_out):
            st.skipped["budget"] += 1
            return "budget"
        if st.rate and not self._rate_ok(st, self._clock(), tokens_in):
            return "rate"
        return ""

    # ---- feedback -------------------------------------------------------------------------------

    def record_tokens(self, provider: str, tokens_in: int, tokens_out: int) -> None:
        """Charge tokens of an attempt whose outcome was already recorded (a reply that came
        after its timeout): budgets and totals only, not the breaker, latency or quotas."""
        st = self._p[provider]
        wall = self._wall()
        if wall >= self._day_end:
            self._roll_day(wall)
        if tokens_in + tokens_out:
            usd = st.profile.cost_usd(tokens_in, tokens_out)
            st.tokens_in += tokens_in
            st.tokens_out += tokens_out
            st.usd += usd
            st.spent_tokens += tokens_in + tokens_out
            st.spent_usd += usd
            st.tokens_left -= tokens_in + tokens_out
            st.usd_left -= usd

    def record_start(self, provider: str, tokens_in: int, tokens_out: int = 0, *, attempt: Any = None) -> None:
        """An attempt at ``provider`` is being sent with about ``tokens_in`` prompt tokens and
        at most ``tokens_out`` reply tokens.

        Counts toward its rpm and tpm windows, holds its possible spend against the daily
        budgets until its result is recorded and, when its breaker is half-open, uses one probe
        slot. ``attempt`` (any hashable, e.g. ``(task_id, attempt)``) names it, so that
        :meth:`record_result` releases this attempt's hold and estimate; a result without one
        releases the oldest attempt's.
        """
        st = self._p[provider]
        now = self._clock()
        st.started += 1
        if attempt is None:
            attempt = object()  # a name of its own, released in turn
        elif attempt in st.held or attempt in st.pending:
            raise ValueError(f"attempt {attempt!r} at {provider} was started already")
        if not st.last_resort:
            usd = tokens_in * st.p_in + tokens_out * st.p_out
            st.held[attempt] = (tokens_in + tokens_out, usd)
            st.held_tokens += tokens_in + tokens_out
            st.held_usd += usd
        if st.rate:
            self._prune_rate(st, now)
            st.starts.append(now)
            st.tok_win.append((now, tokens_in))
            st.tok_sum += tokens_in
            st.pending[attempt] = tokens_in
        if st.breaker != "closed":
            self._advance_breaker(st, now)
            if st.breaker == "half_open":
                st.probes_used += 1

    def record_result(self, provider: str, *, ok: bool, latency_s: float, tokens_in: int = 0,
                      tokens_out: int = 0, error_kind: str | None = None,
                      retry_after: float | None = None, attempt: Any = None) -> None:
        """The outcome of one attempt at ``provider``.

        Parameters
        ----------
        provider : str
        ok : bool
        latency_s : float
            Wall time of the attempt; successful ones feed the latency ring (p50 drives
            adaptive throttling once there are 5).
        tokens_in, tokens_out : int
            Actual counts (they are charged to the daily budget whatever ``ok`` is, and
            replace the tpm estimate given to :meth:`record_start`).
        error_kind : str | None
            An :attr:`~dynamic_core.errors.AdapterError.kind`. ``cancelled`` and ``budget``
            are not the provider's failures: they touch neither the breaker nor the cooldown
            (a cancelled half-open probe frees its slot).
        retry_after : float | None
            Seconds a ``rate_limited`` reply asked to wait, at most ``max_retry_after_s``: the
            provider cools down at least that long at once, and ``max(cooldown_s, retry_after)``
            after ``cooldown_failures`` consecutive failures.
        attempt : hashable, optional
            The name :meth:`record_start` was given: its hold and tpm estimate are released
            (without one, the oldest attempt's).
        """
        st = self._p[provider]
        now = self._clock()
        wall = self._wall()
        if wall >= self._day_end:
            self._roll_day(wall)
        st.results += 1
        key = attempt if attempt is not None else next(iter(st.held or st.pending), None)
        hold = st.held.pop(key, None)
        if hold is not None:  # the attempt's hold is released: what it spent is charged below
            st.held_tokens -= hold[0]
            st.held_usd = st.held_usd - hold[1] if st.held else 0.0  # (no float residue once none is held)
        tokens = tokens_in + tokens_out
        if tokens:
            usd = st.profile.cost_usd(tokens_in, tokens_out)
            st.tokens_in += tokens_in
            st.tokens_out += tokens_out
            st.usd += usd
            st.spent_tokens += tokens
            st.spent_usd += usd
            st.tokens_left -= tokens
            st.usd_left -= usd
        if st.rate:
            est = st.pending.pop(key, 0)
            delta = tokens - est
            if delta:
                self._prune_rate(st, now)
                st.tok_win.append((now, delta))
                st.tok_sum += delta
        self._advance_breaker(st, now)
        if ok:
            st.ok += 1
            st.consecutive = 0
            if latency_s >= 0.0:  # False for NaN
                st.ring[st.ring_n % _RING] = latency_s
                st.ring_n += 1
                n = st.ring_n
                # a full sort of 1,024 floats costs ~30 us: refresh the p50 every 16 samples once warm
                if n >= _MIN_LATENCY_SAMPLES and (n < 64 or n % 16 == 0):
                    st.expected_s = _quantile(st.latencies(), 0.5)  # type: ignore[assignment]
            if st.breaker == "half_open":
                self._close(st)
            elif st.breaker == "closed":
                self._breaker_sample(st, now, False)
            return
        kind = error_kind or "unknown"
        st.errors[kind] = st.errors.get(kind, 0) + 1
        if kind in _NO_FAILURE:
            if st.breaker == "half_open" and st.probes_used > 0:
                st.probes_used -= 1
            return
        st.consecutive += 1
        wait = 0.0
        if kind == "rate_limited" and retry_after is not None and retry_after > 0.0:
            wait = min(retry_after, self.config.max_retry_after_s)
        if st.consecutive >= self.config.cooldown_failures:
            wait = max(wait, self.config.cooldown_s)
        if wait > 0.0:
            st.cooldown_until = max(st.cooldown_until, now + wait)
        if st.breaker == "half_open":
            self._open(st, now)
        elif st.breaker == "closed":
            self._breaker_sample(st, now, True)

    def _breaker_sample(self, st: _Provider, now: float, failed: bool) -> None:
        win = st.bwin
        win.append((now, failed))
        st.bfails += failed
        edge = now - self._b_window
        while win and win[0][0] <= edge:
            st.bfails -= win.popleft()[1]
        n = len(win)
        if failed and n >= self._b_min and st.bfails * 100.0 >= self._b_pct * n:
            self._open(st, now)

    def _open(self, st: _Provider, now: float) -> None:
        st.breaker = "open"
        st.opened_at = now
        st.probes_used = 0
        st.bwin.clear()
        st.bfails = 0

    def _close(self, st: _Provider) -> None:
        st.breaker = "closed"
        st.probes_used = 0
        st.bwin.clear()
        st.bfails = 0

    # ---- introspection --------------------------------------------------------------------------

    def breaker_state(self, provider: str) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (open turns half-open ``open_s`` later)."""
        st = self._p[provider]
        self._advance_breaker(st, self._clock())
        return st.breaker

    def budget_left(self, provider: str) -> dict[str, int | float | None]:
        """Today's (UTC) remaining budget: ``{"tokens": int | None, "usd": float | None}``
        (``None``: unlimited; never below 0)."""
        st = self._p[provider]
        wall = self._wall()
        if wall >= self._day_end:
            self._roll_day(wall)
        lim = st.limits
        return {
            "tokens": None if lim.daily_tokens is None else max(0, lim.daily_tokens - st.spent_tokens),
            "usd": None if lim.daily_usd is None else max(0.0, lim.daily_usd - st.spent_usd),
        }

    def weight(self, provider: str) -> float:
        """The provider's ensemble weight from its limits (1.0 when none is set)."""
        return self._p[provider].limits.weight

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per provider: ``requests`` (results recorded), ``started``, ``ok``,
        ``errors`` by kind, ``tokens_in``, ``tokens_out``, ``usd``, ``p50_ms`` and ``p99_ms``
        of successful attempts (``None`` before the first), ``breaker``, ``cooldown_left_s``,
        ``budget_left`` and ``skipped`` (reason -> count, non-zero ones only)."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for name, st in self._p.items():
            self._advance_breaker(st, now)
            lat = st.latencies()
            p50 = _quantile(lat, 0.5)
            p99 = _quantile(lat, 0.99)
            out[name] = {
                "requests": st.results,
                "started": st.started,
                "ok": st.ok,
                "errors": dict(st.errors),
                "tokens_in": st.tokens_in,
                "tokens_out": st.tokens_out,
                "usd": st.usd,
                "p50_ms": None if p50 is None else p50 * 1e3,
                "p99_ms": None if p99 is None else p99 * 1e3,
                "breaker": st.breaker,
                "cooldown_left_s": max(0.0, st.cooldown_until - now),
                "budget_left": self.budget_left(name),
                "skipped": {k: v for k, v in st.skipped.items() if v},
            }
        return out
