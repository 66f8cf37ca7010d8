"""Provider profiles: where each named reasoning provider lives and what it costs.

Every built-in profile can be overridden field by field from configuration (the
``[providers.NAME]`` tables of a mesh TOML file, or a mapping in Python); a name that is not
built in defines a new OpenAI-compatible provider and must then give at least ``base_url`` and
``model``. Prices are USD per one million tokens as the providers list them for their default
model (late 2026); override them when your contract differs.

API keys are never part of a profile: ``api_key_env`` names the environment variable (or the
key in a 0600 secrets file, see :mod:`dynamic_core.reasoning.secrets`) that holds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import msgspec

from ..errors import PolicyError

__all__ = ["BUILTIN_PROFILES", "LATENCY_CLASSES", "PROVIDERS", "ProviderProfile", "check_base_url",
           "check_key_transport", "is_loopback", "load_profiles", "profile"]

LATENCY_CLASSES = ("instant", "fast", "standard", "slow")
"""Latency classes, fastest first (``instant``: no model behind it, e.g. the local narrator)."""

Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class ProviderProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One reasoning provider.

    Attributes
    ----------
    name : str
        The provider's name in routing rules and telemetry (``deepseek``).
    kind : {"openai-compatible", "local"}
        ``openai-compatible``: HTTP ``POST {base_url}/chat/completions``; ``local``: the
        deterministic template narrator (no model, no cost).
    base_url : str
        API root including the version path (``https://api.deepseek.com/v1``).
    model : str
        Default model name sent in requests.
    context_window : int
        Tokens the model accepts (prompt plus reply); prompts are truncated to fit.
    usd_per_m_input, usd_per_m_output : float
        Price per one million prompt / completion tokens.
    latency_class : str
        One of :data:`LATENCY_CLASSES`; adaptive throttling sheds slow, expensive ones first.
    personas : tuple[str, ...]
        Personas this provider may speak as (``("*",)``: any).
    languages : tuple[str, ...]
        Languages it writes well (ISO 639-1).
    style : {"json", "narrative"}
        Prompt style: ask for a JSON object, or for prose.
    api_key_env : str
        Environment variable (or secrets-file key) holding the API key; empty when none is
        needed (a local Ollama).
    timeout_s : float
        Upper bound of one HTTP attempt.
    max_concurrency : int
        Requests one adapter process runs at once.
    """

    name: Name
    kind: Literal["openai-compatible", "local"] = "openai-compatible"
    base_url: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    model: Annotated[str, msgspec.Meta(max_length=256)] = ""
    context_window: Annotated[int, msgspec.Meta(ge=256, le=1 << 24)] = 8192
    usd_per_m_input: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    usd_per_m_output: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    latency_class: Literal["instant", "fast", "standard", "slow"] = "standard"
    personas: tuple[str, ...] = ("*",)
    languages: tuple[str, ...] = ("en",)
    style: Literal["json", "narrative"] = "json"
    api_key_env: Annotated[str, msgspec.Meta(pattern=r"^([A-Z_][A-Z0-9_]{0,127})?$")] = ""
    timeout_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)] = 30.0
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4

    def cost_usd(self, tokens_in: int, tokens_out: int) -> float:
        """Price of one call."""
        return (tokens_in * self.usd_per_m_input + tokens_out * self.usd_per_m_output) * 1e-6

    @property
    def unit_cost(self) -> float:
        """Price of a typical rationale (600 tokens in, 150 out): what throttling ranks by."""
        return self.cost_usd(600, 150)

    def speaks(self, persona: str) -> bool:
        return not persona or "*" in self.personas or persona in self.personas


_ANALYST = ("analyst", "risk", "scalper", "swing", "macro")

BUILTIN_PROFILES: dict[str, ProviderProfile] = {
    p.name: p
    for p in (
        ProviderProfile(name="chatgpt", base_url="https://api.openai.com/v1", model="gpt-4o-mini",
                        context_window=128_000, usd_per_m_input=0.15, usd_per_m_output=0.60,
                        latency_class="fast", personas=("*",), languages=("en", "es", "fr", "de", "ja", "zh"),
                        style="json", api_key_env="OPENAI_API_KEY"),
        ProviderProfile(name="grok", base_url="https://api.x.ai/v1", model="grok-3-mini",
                        context_window=131_072, usd_per_m_input=0.30, usd_per_m_output=0.50,
                        latency_class="fast", personas=("*",), languages=("en",), style="json",
                        api_key_env="XAI_API_KEY"),
        ProviderProfile(name="dolphin", base_url="http://127.0.0.1:11434/v1", model="dolphin3",
                        context_window=32_768, latency_class="slow", personas=("*",), languages=("en",),
                        style="narrative", timeout_s=60.0, max_concurrency=2),
        ProviderProfile(name="ollama", base_url="http://127.0.0.1:11434/v1", model="llama3.1:8b",
                        context_window=131_072, latency_class="slow", personas=_ANALYST,
                        languages=("en",), style="narrative", timeout_s=60.0, max_concurrency=2),
        ProviderProfile(name="kimi", base_url="https://api.moonshot.ai/v1", model="kimi-k2-0905-preview",
                        context_window=262_144, usd_per_m_input=0.60, usd_per_m_output=2.50,
                        latency_class="standard", personas=_ANALYST, languages=("zh", "en"), style="json",
                        api_key_env="MOONSHOT_API_KEY"),
        ProviderProfile(name="deepseek", base_url="https://api.deepseek.com/v1", model="deepseek-chat",
                        context_window=131_072, usd_per_m_input=0.28, usd_per_m_output=0.42,
                        latency_class="standard", personas=("*",), languages=("zh", "en"), style="json",
                        api_key_env="DEEPSEEK_API_KEY"),
        ProviderProfile(name="qwen", base_url="https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
                        model="qwen-plus", context_window=131_072, usd_per_m_input=0.40,
                        usd_per_m_output=1.20, latency_class="fast", personas=("*",),
                        languages=("zh", "en", "ja", "ko"), style="json", api_key_env="DASHSCOPE_API_KEY"),
        ProviderProfile(name="minimax", base_url="https://api.minimax.io/v1", model="MiniMax-M2",
                        context_window=204_800, usd_per_m_input=0.30, usd_per_m_output=1.20,
                        latency_class="standard", personas=_ANALYST, languages=("zh", "en"),
                        style="narrative", api_key_env="MINIMAX_API_KEY"),
        ProviderProfile(name="zhipu", base_url="https://open.bigmodel.cn/api/paas/v4", model="glm-4.5-air",
                        context_window=131_072, usd_per_m_input=0.20, usd_per_m_output=1.10,
                        latency_class="standard", personas=_ANALYST, languages=("zh", "en"), style="json",
                        api_key_env="ZHIPUAI_API_KEY"),
        ProviderProfile(name="hunyuan", base_url="https://api.hunyuan.cloud.tencent.com/v1",
                        model="hunyuan-turbos-latest", context_window=32_768, usd_per_m_input=0.11,
                        usd_per_m_output=0.28, latency_class="standard", personas=_ANALYST,
                        languages=("zh", "en"), style="narrative", api_key_env="HUNYUAN_API_KEY"),
        ProviderProfile(name="local", kind="local", model="template", context_window=1 << 20,
                        latency_class="instant", personas=("*",), languages=("en", "zh"), style="narrative",
                        timeout_s=1.0, max_concurrency=64),
    )
}
"""The ten named providers plus ``local``, keyed by name."""

PROVIDERS: tuple[str, ...] = tuple(n for n in BUILTIN_PROFILES if n != "local")
"""The ten named remote providers."""


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(name: str, base_url: str) -> SplitResult:
    """``base_url`` of provider ``name`` split, or :class:`~dynamic_core.errors.PolicyError`
    unless it is ``http(s)://host[:port][/path]``: no credentials in it, neither as userinfo
    (``user:pass@``) nor in a query string (``?key=...``) or fragment. A key belongs in the
    secrets file or the environment variable ``api_key_env`` names: a profile is copied onto
    the command line of every adapter process a mesh starts, which any local user can read. The
    message never quotes a URL's userinfo, query or fragment."""
    from .secrets import redact

    try:
        url = urlsplit(base_url)
        host = url.hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        url, host = None, None
    if url is None or url.scheme not in ("http", "https") or not host:
        # userinfo (before an @), query and fragment never shown
        shown = redact(base_url.rsplit("@", 1)[-1].split("?", 1)[0].split("#", 1)[0])
        raise PolicyError(f"provider {name!r}: base_url must be http(s)://host[:port][/path], got {shown!r}")
    if url.username is not None or url.password is not None:
        raise PolicyError(f"provider {name!r}: base_url must not carry credentials (user:password@); give the key "
                          "through the environment variable api_key_env names or the secrets file")
    if url.query or url.fragment or "?" in base_url or "#" in base_url:
        raise PolicyError(f"provider {name!r}: base_url must not carry a query string or fragment (not shown); "
                          "credentials belong in the environment variable api_key_env names or the secrets file")
    try:
        _ = url.port
    except ValueError:
        raise PolicyError(f"provider {name!r}: bad port in base_url") from None
    return url


def check_key_transport(name: str, base_url: str, keyed: bool) -> None:
    """:class:`~dynamic_core.errors.PolicyError` when a provider that sends an API key
    (``keyed``) would send it in cleartext: plain ``http://`` to a host that is not this
    machine."""
    if keyed and urlsplit(base_url).scheme == "http" and not is_loopback(base_url):
        raise PolicyError(f"provider {name!r}: its API key would travel in cleartext: plain http:// is allowed "
                          "only to this machine (localhost, 127.0.0.0/8, ::1); use https://, or set "
                          "api_key_env to \"\" for a server that takes no key")


def profile(name: str, overrides: Mapping[str, Any] | None = None) -> ProviderProfile:
    """The profile called ``name`` with ``overrides`` applied (validated like a config file).

    Raises :class:`~dynamic_core.errors.PolicyError` for an unknown name without ``base_url``
    and ``model``, an unknown field, a value out of range, or (``openai-compatible``) a
    ``base_url`` that is not ``http(s)://host[:port][/path]``, that carries credentials or a
    query string, or that is plain ``http://`` to another machine for a provider that takes a
    key (``api_key_env`` set: the key would travel in cleartext).
    """
    base = BUILTIN_PROFILES.get(name)
    fields: dict[str, Any] = msgspec.structs.asdict(base) if base is not None else {"name": name}
    if overrides:
        if "name" in overrides and overrides["name"] != name:
            raise PolicyError(f"provider {name!r}: a profile cannot rename itself to {overrides['name']!r}")
        fields.update(overrides)
    if base is None and (not fields.get("base_url") or not fields.get("model")) and fields.get("kind") != "local":
        known = ", ".join(BUILTIN_PROFILES)
        raise PolicyError(f"unknown provider {name!r}: built in are {known}; a new provider needs "
                          "base_url and model")
    try:
        prof = msgspec.convert(fields, ProviderProfile)
    except msgspec.ValidationError as e:
        raise PolicyError(f"provider {name!r}: {e}") from None
    if prof.kind == "openai-compatible":
        check_base_url(name, prof.base_url)  # refused here, not by every adapter process at start
        check_key_transport(name, prof.base_url, bool(prof.api_key_env))
    return prof


def load_profiles(config: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ProviderProfile]:
    """Every built-in profile, with the ``config`` tables (``{name: {field: value}}``) applied
    and any new providers they define added."""
    out = dict(BUILTIN_PROFILES)
    for name, over in (config or {}).items():
        if not isinstance(over, Mapping):
            raise PolicyError(f"providers.{name} must be a table of fields, got {type(over).__name__}")
        out[name] = profile(name, over)
    return out
