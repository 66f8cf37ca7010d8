"""The federated reasoning mesh: adapter processes behind a ZeroMQ broker that write rationales
for signals without ever holding a signal back.

>>> from dynamic_core.reasoning import ReasoningMesh
>>> with ReasoningMesh(["local", "deepseek"], deadline_s=3.0) as mesh:   # spawns the adapters
...     mesh.submit(ctx, request_class="deep", priority="high")
...     ...
...     mesh.take_rationales()          # RationaleUpdate payloads, after their signals
...     mesh.stats()["providers"]       # requests, tokens, USD, p50/p99, errors, breaker, budget

Modules: ``profiles`` (the ten providers + local), ``secrets`` (keys from the environment or a
0600 file, redaction), ``client`` (OpenAI-compatible HTTP), ``worker`` (the adapter process),
``policy`` (routing rules, budgets, quotas, breakers, throttling), ``tasks`` (priorities,
bounded WFQ queue), ``registry`` (adapter roster, balancing), ``cache`` (narrative LRU+TTL),
``prompts`` (versioned templates, distillation, reply parsing), ``narrator`` (the local
template narrator), ``ensemble`` (rerank, review queue, weights, A/B), ``mesh`` (the broker).
"""

from .mesh import Outcome, ReasoningMesh, asset_class_of
from .profiles import BUILTIN_PROFILES, PROVIDERS, ProviderProfile, load_profiles, profile

__all__ = ["BUILTIN_PROFILES", "PROVIDERS", "Outcome", "ProviderProfile", "ReasoningMesh", "asset_class_of",
           "load_profiles", "profile"]
