"""``dynamic-core adapter``, ``dynamic-core review`` and the reasoning options of ``run``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._argtypes import int_range, positive_float, positive_int

__all__ = ["add_commands", "add_run_options", "check_reasoning_args", "mesh_from_args", "mesh_summary",
           "reasoning_config"]

_HEARTBEAT_MIN_S, _HEARTBEAT_MAX_S = 0.01, 60.0  # worker.HEARTBEAT_MIN_S/MAX_S (not imported: no zmq at load)


def _heartbeat(text: str) -> float:
    """``--heartbeat``: what ``ReasoningMesh(heartbeat_s=...)`` takes. Far shorter intervals only
    spin the adapter's loop; a longer one than the broker's gets the adapter taken for lost."""
    v = positive_float(text)
    if not _HEARTBEAT_MIN_S <= v <= _HEARTBEAT_MAX_S:
        raise argparse.ArgumentTypeError(f"must be in [{_HEARTBEAT_MIN_S:g}, {_HEARTBEAT_MAX_S:g}] seconds, "
                                         f"got {text!r}")
    return v

_ADAPTER_EPILOG = """\
examples:
  dynamic-core adapter --provider local --connect tcp://127.0.0.1:5600
  DEEPSEEK_API_KEY=... dynamic-core adapter --provider deepseek --connect tcp://127.0.0.1:5600
  dynamic-core adapter --provider ollama --base-url http://gpu-box:11434/v1 --model qwen2.5:14b \\
      --connect tcp://127.0.0.1:5600
  dynamic-core adapter --provider my-vllm --base-url http://127.0.0.1:8000/v1 --model llama-3-70b \\
      --connect tcp://127.0.0.1:5600                 a provider that is not built in

providers: chatgpt grok dolphin ollama kimi deepseek qwen minimax zhipu hunyuan, and local (the
deterministic template narrator, no model, no cost). API keys come only from the environment
variable the profile names (e.g. DEEPSEEK_API_KEY) or a 0600 TOML secrets file (--secrets or
$DYNAMIC_CORE_SECRETS); they are never logged. 'dynamic-core run --reasoning ...' starts the
adapters it needs by itself (its broker listens on a free loopback port, printed as
'reasoning', or at run --reasoning-bind ADDR); run this command to add an adapter to it by
hand, e.g. a second worker for a busy provider or one on another machine (bind beyond loopback
with --reasoning-bind and --allow-remote: the broker does not authenticate adapters).

exit codes: 0 stopped (broker shutdown, ^C, SIGTERM); 1 failed while serving (a mesh restarts
it); 2 bad arguments or configuration: provider, secrets file, address (a mesh does not restart it).
"""

_REVIEW_EPILOG = """\
examples:
  dynamic-core review list tcp://127.0.0.1:5557 --server-key keys/server.key --client-key keys/ops.key_secret
  dynamic-core review approve tcp://127.0.0.1:5557 12 --server-key ... --client-key ...
  dynamic-core review reject tcp://127.0.0.1:5557 13 --server-key ... --client-key ...

Rationales land in the review queue when ensemble members disagree, when the chosen one states a
low confidence, or when it argues against the signal. Approving raises the answering adapter's
ensemble weight (x1.1), rejecting lowers it (x0.8). The run keeps the weights in a file
('run --reasoning-weights FILE', by default JOURNAL/reasoning_weights.json with --journal;
otherwise they last as long as the run). A journal is new every run, so to carry the weights
into the next run pass the same FILE, e.g. --reasoning-weights runs/old/reasoning_weights.json.
"""


def add_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Register ``adapter`` and ``review`` on the ``dynamic-core`` subparsers."""
    a = sub.add_parser(
        "adapter", help="run one reasoning adapter process (an LLM provider behind the mesh)",
        description="Connect one reasoning adapter to a mesh broker and serve rationale requests "
                    "for one provider until the broker says stop, ^C, or SIGTERM.",
        epilog=_ADAPTER_EPILOG, formatter_class=formatter)
    a.add_argument("--provider", required=True, metavar="NAME", help="provider profile name (see below)")
    a.add_argument("--connect", required=True, metavar="ADDR", help="the mesh broker's address (ROUTER)")
    a.add_argument("--base-url", default=None, metavar="URL", help="override the profile's API root (…/v1)")
    a.add_argument("--model", default=None, help="override the profile's model")
    a.add_argument("--concurrency", type=positive_int, default=None, metavar="N", help="requests at once [profile]")
    a.add_argument("--timeout", type=positive_float, default=None, metavar="S", help="HTTP attempt timeout [profile]")
    a.add_argument("--profile-json", default=None, metavar="JSON",
                   help="more profile overrides as a JSON object (any ProviderProfile field)")
    a.add_argument("--secrets", default=None, metavar="FILE",
                   help="0600 TOML file of API keys (NAME = \"key\") [default: $DYNAMIC_CORE_SECRETS]")
    a.add_argument("--heartbeat", type=_heartbeat, default=0.1, metavar="S",
                   help="heartbeat interval in seconds, in [0.01, 60]; use the mesh's (heartbeat_s, 0.1 unless "
                        "set): a broker takes an adapter silent for liveness (20 unless set) of its own intervals for "
                        "lost (a slower one once, with a warning, then judges it by its own interval) "
                        "[default: 0.1]")
    a.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    a.set_defaults(func=cmd_adapter)

    r = sub.add_parser(
        "review", help="list, approve or reject queued rationales over the control plane",
        description="Work the reasoning mesh's review queue of a running service (needs its CURVE "
                    "control socket).", epilog=_REVIEW_EPILOG, formatter_class=formatter)
    r.add_argument("action", choices=("list", "approve", "reject"), help="list, approve or reject")
    r.add_argument("address", metavar="ADDR", help="the service's control socket")
    r.add_argument("item", nargs="?", type=int_range(0, 2**64 - 1), default=None, metavar="ITEM",
                   help="review item number, from 'review list' (approve/reject)")
    r.add_argument("--limit", type=positive_int, default=100, help="items listed [default: 100]")
    r.add_argument("--server-key", required=True, metavar="FILE", help="the server's public key file (.key)")
    r.add_argument("--client-key", required=True, metavar="FILE", help="this client's secret key file")
    r.add_argument("--timeout", type=positive_float, default=5.0, metavar="S", help="reply timeout [default: 5]")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_review)


def add_run_options(r: argparse.ArgumentParser) -> None:
    """The reasoning options of ``dynamic-core run``."""
    g = r.add_argument_group("reasoning (rationales for signals; never delays a signal, but with --paper and "
                             "[risk] min_providers_agree each plan's decision waits for its rationales, at most "
                             "the deadline, before the next bar is taken)")
    g.add_argument("--reasoning", default=None, metavar="PROVIDERS",
                   help="start the reasoning mesh with these adapters: 'local' or a comma list, e.g. "
                        "local,grok,qwen (API keys from the environment; 'run' asks 'tactical' rationales)")
    g.add_argument("--reasoning-config", default=None, metavar="FILE",
                   help="mesh TOML: [policy] rules/limits/breaker and [providers.NAME] profile overrides")
    g.add_argument("--reasoning-deadline", type=positive_float, default=5.0, metavar="S",
                   help="seconds from a signal to its rationale, fallbacks included [default: 5]")
    g.add_argument("--reasoning-select", choices=("change", "nonhold", "all"), default="change",
                   help="which signals get a rationale: when a stream's action changes, every "
                        "non-HOLD one, or all [default: change]")
    g.add_argument("--ensemble", type=positive_int, default=1, metavar="K",
                   help="providers asked per signal [default: 1]")
    g.add_argument("--secrets", default=None, metavar="FILE", help="0600 TOML file of API keys for the adapters")
    g.add_argument("--reasoning-bind", default="tcp://127.0.0.1:*", metavar="ADDR",
                   help="where the mesh broker listens for adapters: a fixed address (e.g. "
                        "tcp://127.0.0.1:5600 or ipc:///tmp/dc-mesh) lets you add adapters by hand with "
                        "'dynamic-core adapter --connect ADDR'; beyond loopback only with --allow-remote "
                        "(the broker does not authenticate adapters) [default: a free loopback port]")
    g.add_argument("--reasoning-weights", default=None, metavar="FILE",
                   help="JSON file keeping the ensemble weights that review approve/reject adjust, read at "
                        "start and rewritten on each decision; pass the same file to every run to carry them "
                        "on [default: JOURNAL/reasoning_weights.json with --journal (a new journal: neutral "
                        "weights), else none: in memory]")


def cmd_adapter(args: argparse.Namespace) -> int:
    import logging

    from .reasoning.worker import serve

    over: dict[str, Any] = {}
    if args.profile_json:
        try:
            over = json.loads(args.profile_json)
        except ValueError as e:
            raise ValueError(f"--profile-json is not JSON: {e}") from None
        if not isinstance(over, dict):
            raise ValueError("--profile-json must be a JSON object")
    for key, val in (("base_url", args.base_url), ("model", args.model), ("max_concurrency", args.concurrency),
                     ("timeout_s", args.timeout)):
        if val is not None:
            over[key] = val
    logging.basicConfig(level=logging.INFO, format="%(asctime)s adapter[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    return serve(args.provider, args.connect, overrides=over or None, secrets_file=args.secrets,
                 heartbeat_s=args.heartbeat, parent_pid=args.parent_pid)


def cmd_review(args: argparse.Namespace) -> int:
    from . import payloads as P
    from .transport import ControlClient

    if args.action != "list" and args.item is None:
        raise ValueError(f"review {args.action} needs an ITEM number (see 'review list')")
    if args.action == "list" and args.item is not None:
        raise ValueError("review list takes no ITEM (it lists the queue; --limit N caps it)")
    for f in (args.server_key, args.client_key):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no such file: {f}")
    cmd = (P.ReviewQuery(limit=args.limit) if args.action == "list"
           else P.Review(item=args.item, approve=args.action == "approve"))
    with ControlClient(args.address, server_key=args.server_key, client_key=args.client_key,
                       timeout=args.timeout) as c:
        reply = c.request(cmd)
    if not reply.ok:
        print(f"dynamic-core: error: {reply.error}", file=sys.stderr)
        return 1
    if args.json or args.action != "list":
        print(json.dumps(reply.result, indent=2, sort_keys=True, default=str))
        return 0
    items = reply.result.get("items", [])
    if not items:
        print("review queue is empty")
    for it in items:
        conf = "n/a" if it.get("confidence") is None else f"{it['confidence']:.2f}"
        print(f"#{it['item']:<5} {it['instrument']:<10} {it['provider']:<9} {it['reason']:<14} conf {conf}  "
              f"{it['text'][:100]}")
    return 0


def reasoning_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The ``[policy]`` table (None when absent) and the ``[providers.NAME]`` tables of a
    ``--reasoning-config`` file, each checked: :class:`ValueError` naming the file (and the key)
    for a file that cannot be read, is not UTF-8 TOML, holds a top-level key other than
    ``policy`` and ``providers``, a ``policy`` or ``providers`` that is not a table, a provider
    entry that is not a table of profile fields, or contents the policy or a profile refuses
    (a field of the wrong type or out of range, an unknown provider, a ``base_url`` with
    credentials). Starts nothing."""
    import tomllib

    from .errors import PolicyError
    from .reasoning.policy import Router, load_policy
    from .reasoning.profiles import load_profiles

    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"--reasoning-config {where}: cannot be read: {e.strerror or e}") from None
    try:
        cfg = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise ValueError(f"--reasoning-config {where}: not valid TOML (not UTF-8: {e.reason} at byte {e.start})"
                         ) from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--reasoning-config {where}: not valid TOML: {e}") from None
    unknown = [k for k in cfg if k not in ("policy", "providers")]
    if unknown:
        raise ValueError(f"--reasoning-config {where}: unknown key {unknown[0]!r}: the file holds a [policy] table "
                         "and [providers.NAME] tables")
    policy = cfg.get("policy")
    if policy is not None and not isinstance(policy, dict):
        raise ValueError(f"--reasoning-config {where}: 'policy' must be a table ([policy]), got a TOML "
                         f"{type(policy).__name__}")
    providers = cfg.get("providers", {})
    if not isinstance(providers, dict):
        raise ValueError(f"--reasoning-config {where}: 'providers' must be a table of [providers.NAME] tables, "
                         f"got a TOML {type(providers).__name__}")
    for name, fields in providers.items():
        if not isinstance(fields, dict):
            raise ValueError(f"--reasoning-config {where}: 'providers.{name}' must be a table of profile fields "
                             f"([providers.{name}]), got a TOML {type(fields).__name__}")
    try:
        Router(load_policy(policy), load_profiles(providers))  # every field, and the names the rules use
    except PolicyError as e:
        raise ValueError(f"--reasoning-config {where}: {e}") from None
    return policy, providers


def reasoning_providers(args: argparse.Namespace) -> list[str]:
    """The provider names ``--reasoning`` lists (comma-separated; [] when it is not given)."""
    return [p.strip() for p in (getattr(args, "reasoning", None) or "").split(",") if p.strip()]


def check_reasoning_args(args: argparse.Namespace) -> None:
    """Check what ``run --reasoning`` will need, before anything starts (engine, broker,
    adapter processes): the ``--reasoning`` providers, the ``--secrets`` file and the
    ``--reasoning-config`` file (:func:`reasoning_config`). :class:`ValueError` naming the
    option (and file and key), or :class:`~dynamic_core.errors.SecretsError` naming the file;
    nothing when ``args.reasoning`` is not set. :func:`mesh_from_args` calls it too."""
    if not getattr(args, "reasoning", None):
        return
    from .reasoning.profiles import load_profiles

    providers = reasoning_providers(args)
    if not providers:
        raise ValueError("--reasoning needs at least one provider, e.g. --reasoning local")
    if getattr(args, "secrets", None):
        from .reasoning.secrets import load_secrets_file

        # every adapter would read it and exit with the same error: say it once, before any
        # process starts (a SecretsError names the file, never its contents)
        load_secrets_file(args.secrets)
    overrides: dict[str, dict[str, Any]] = {}
    if getattr(args, "reasoning_config", None):
        _, overrides = reasoning_config(args.reasoning_config)
    known = load_profiles(overrides)
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ValueError(f"--reasoning: unknown provider {unknown[0]!r}; known are {', '.join(known)} (a new "
                         "one needs a [providers.NAME] table with base_url and model in --reasoning-config)")


def mesh_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~dynamic_core.reasoning.ReasoningMesh` ``run --reasoning`` asks for (started).
    Checks its arguments first (:func:`check_reasoning_args`)."""
    from .reasoning import ReasoningMesh

    check_reasoning_args(args)
    providers = reasoning_providers(args)
    policy: Any = None
    profiles: dict[str, Any] = {}
    if args.reasoning_config:
        policy, profiles = reasoning_config(args.reasoning_config)
    weights = getattr(args, "reasoning_weights", None)
    if weights is None and getattr(args, "journal", None):
        weights = os.path.join(args.journal, "reasoning_weights.json")
    mesh = ReasoningMesh(providers, policy=policy, profiles=profiles, deadline_s=args.reasoning_deadline,
                         ensemble=args.ensemble, select=args.reasoning_select, secrets_file=args.secrets,
                         weights_path=weights, address=getattr(args, "reasoning_bind", "tcp://127.0.0.1:*"),
                         allow_remote=bool(getattr(args, "allow_remote", False)))
    # what the router gives the requests 'run' sends ('tactical', this deadline, any asset class)
    from .reasoning.policy import PolicyError, RouteRequest

    routed: set[str] = set()
    try:
        for ac in ("", "fx", "metal", "crypto", "index", "equity"):
            routed.update(mesh.router.route(RouteRequest(request_class="tactical", asset_class=ac,
                                                         deadline_s=args.reasoning_deadline)))
    except (PolicyError, KeyError, ValueError):  # the mesh reports a bad policy itself
        routed = set(providers)
    unrouted = [p for p in providers if p != "local" and p not in routed]
    if unrouted:  # started for nothing: run asks 'tactical' rationales only
        one = len(unrouted) == 1
        print(f"dynamic-core: warning: --reasoning {', '.join(unrouted)}: the routing policy gives 'run' "
              f"(request class 'tactical', deadline {args.reasoning_deadline:g} s) no request for "
              f"{'it' if one else 'them'}; add a [[policy.rules]] entry (request_class = \"tactical\") in "
              f"--reasoning-config, or a longer --reasoning-deadline (under 2 s the default policy asks only "
              f"the narrator)", file=sys.stderr)
    mesh.start(wait=15.0)
    if mesh.down:
        down = ", ".join(sorted(mesh.down))
        mesh.close()
        raise ValueError(f"--reasoning: the adapter of {down} could not start (a configuration error: "
                         "its message is above)")
    return mesh


def mesh_summary(console: Any, mesh: Any) -> None:
    """Print the mesh telemetry table at the end of a run."""
    from rich.table import Table

    st = mesh.stats()
    t = Table(title="Reasoning mesh", title_justify="left")
    for c in ("provider", "adapters", "requests", "answers", "errors", "tokens in/out", "USD", "p50 ms",
              "p99 ms", "cache hits", "breaker", "budget left"):
        t.add_column(c, justify="left" if c in ("provider", "breaker", "errors", "budget left") else "right")
    for name, row in st["providers"].items():
        errs = row.get("errors") or {}
        bl = row.get("budget_left") or {}
        budget = ", ".join(f"{k} {v:,.4g}" for k, v in bl.items() if v is not None) or "unlimited"
        p50, p99 = row.get("p50_ms"), row.get("p99_ms")
        t.add_row(name, str(row.get("adapters", 0)), f"{row.get('requests', 0):,}", f"{row.get('answers', 0):,}",
                  ", ".join(f"{k} {v}" for k, v in errs.items()) or "-",
                  f"{row.get('tokens_in', 0):,}/{row.get('tokens_out', 0):,}", f"{row.get('usd', 0.0):.4f}",
                  "-" if p50 is None else f"{p50:.1f}", "-" if p99 is None else f"{p99:.1f}",
                  f"{row.get('cache_hits', 0):,}", "down" if row.get("down") else str(row.get("breaker", "-")),
                  budget)
    console.print(t)
    tk = st["tasks"]
    by = ", ".join(f"{k} {v:,}" for k, v in sorted(tk["by_status"].items())) or "none"
    p50 = "-" if tk["p50_ms"] is None else f"{tk['p50_ms']:.1f} ms"
    console.print(f"Rationales: {tk['completed']:,} of {tk['submitted']:,} submitted ({by}); signal to rationale "
                  f"p50 {p50}; cache hit ratio {st['cache']['hit_ratio'] or 0:.2f}; review queue "
                  f"{st['review']['pending']} pending; queue shed {sum(st['queue']['shed'].values())}")
