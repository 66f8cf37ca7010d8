"""The adapter process: one provider behind a DEALER socket connected to the mesh broker.

``dynamic-core adapter --provider deepseek --connect tcp://127.0.0.1:5600`` runs
:func:`serve`. The adapter announces itself (:class:`~dynamic_core.payloads.AdapterHello`),
heartbeats every ``heartbeat_s`` (with its in-flight count), and answers each
:class:`~dynamic_core.payloads.ReasonRequest` with a :class:`~dynamic_core.payloads.ReasonReply`.

* ``openai-compatible`` providers run requests on ``max_concurrency`` threads, each with its own
  keep-alive HTTP client; a thread hands its reply back to the socket thread through an inproc
  socket (a ZeroMQ socket is only ever used by one thread).
* ``local`` (the template narrator) answers inline on the socket thread: no model, no cost.

Errors become ``ok=False`` replies with an :class:`~dynamic_core.errors.AdapterError` kind and a
message from which every secret the adapter knows has been removed; a successful reply's text and
model name are redacted the same way (a provider may echo the key it was sent), and so are the
process's log records. A request frame the adapter cannot decode (a broker of another payload
version, say) is counted in ``rejected`` and, when its task id and attempt can still be read,
answered at once with ``client_error``: the broker holds a slot per request until its reply, so a
request left unanswered would hold one for as long as the adapter lives. The adapter exits on
:class:`~dynamic_core.payloads.MeshShutdown`, SIGTERM/SIGINT, or, with ``parent_pid``, when that
process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any

import msgspec
import zmq

from ..errors import AdapterError, DynamicCoreError, PayloadError, PolicyError
from ..payloads import (
    AdapterBeat,
    AdapterBye,
    AdapterHello,
    Codec,
    MeshFromAdapter,
    MeshShutdown,
    MeshToAdapter,
    ReasonReply,
    ReasonRequest,
    batch_frames,
    split_batch,
)
from ..transport._common import readable
from .profiles import ProviderProfile, is_loopback
from .secrets import Secret, key_values, redact, redact_keys

__all__ = ["CONFIG_ERROR_EXIT", "HEARTBEAT_MAX_S", "HEARTBEAT_MIN_S", "AdapterWorker", "serve"]

log = logging.getLogger("dynamic_core.reasoning.adapter")

HELLO_EVERY_S = 2.0
"""The hello is repeated this often, so a restarted broker learns about a running adapter."""

POLL_MAX_S = 0.2
"""Longest socket wait: a SIGTERM/SIGINT handler only sets a flag, which the loop sees this soon."""

HEARTBEAT_MIN_S = 0.01
HEARTBEAT_MAX_S = 60.0
"""Heartbeat intervals ``dynamic-core adapter --heartbeat`` and ``ReasoningMesh(heartbeat_s=)``
take. A broker takes an adapter silent for ``liveness`` of its own intervals for lost; one that
beats slower than the broker is lost once, then judged by its own interval (see
:class:`~dynamic_core.reasoning.ReasoningMesh`), so start adapters with the mesh's interval."""

CONFIG_ERROR_EXIT = 2
"""Exit status of ``dynamic-core adapter`` for bad arguments or configuration (secrets file,
profile, address, API key): such an adapter is not restarted, since it would fail the same way.
(Also :data:`dynamic_core.reasoning.mesh.CONFIG_ERROR_EXIT`.)"""

REPLY_CHARS_PER_TOKEN = 16
MIN_REPLY_CHARS = 4096
"""A reply's text is cut to ``max(MIN_REPLY_CHARS, REPLY_CHARS_PER_TOKEN * max_tokens)``
characters by the broker (``truncated_replies``) before it is parsed, cached or published: a
provider that ignores ``max_tokens`` cannot make it hold megabytes per rationale. The adapter
sends at most one character more (so the broker still sees and counts the excess), redacted."""


def reply_limit(max_tokens: int) -> int:
    """Characters a reply asked for ``max_tokens`` keeps: ``max(MIN_REPLY_CHARS,
    REPLY_CHARS_PER_TOKEN * max_tokens)``."""
    return max(MIN_REPLY_CHARS, REPLY_CHARS_PER_TOKEN * max_tokens)


JOIN_S = 1.0
"""How long :meth:`AdapterWorker.close` waits for its request threads, all of them together."""


class _RequestIds(msgspec.Struct, tag_field="type", tag="reason_request"):
    """What a refused :class:`~dynamic_core.payloads.ReasonRequest` frame may still tell: which
    attempt to answer. No constraints, unknown fields ignored."""

    task_id: int
    attempt: int = 0


_ids_decoder = msgspec.msgpack.Decoder(_RequestIds)


class AdapterWorker:
    """One adapter: the socket loop plus, for HTTP providers, a pool of request threads.

    Parameters
    ----------
    profile : ProviderProfile
        What to serve.
    connect : str
        The broker's ROUTER address.
    api_key : Secret or str, optional
        The provider's key (HTTP providers that need one); error messages are scrubbed of it.
    heartbeat_s : float
        Beat interval; the broker declares an adapter lost after a few missed beats.
    parent_pid : int, optional
        Exit when this process is no longer our parent.

    Sends never block: with no broker for long enough to fill the send queue (100k messages),
    heartbeats, hellos and replies are dropped and counted in ``dropped``, and SIGTERM/SIGINT
    still stop the adapter within :data:`POLL_MAX_S`.
    """

    def __init__(self, profile: ProviderProfile, connect: str, *, api_key: Any = None,
                 heartbeat_s: float = 0.1, parent_pid: int | None = None,
                 context: zmq.Context | None = None) -> None:
        self.profile = profile
        self.connect = connect
        self.heartbeat_s = float(heartbeat_s)
        self.parent_pid = parent_pid
        self._key = api_key
        self._ctx = context or zmq.Context.instance()
        self._codec_out = Codec(MeshFromAdapter)
        self._codec_in = Codec(MeshToAdapter)
        self._no_broker = False  # an outage was reported and no handshake has succeeded since
        self._had_broker = False  # a handshake with the broker succeeded once
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(connect)
        self._done_addr = f"inproc://dc-adapter-done-{id(self)}"
        self._done_pull = self._ctx.socket(zmq.PULL)
        self._done_pull.bind(self._done_addr)
        self._jobs: deque[ReasonRequest] = deque()
        self._jobs_cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()  # tells the request threads (set by run() on its way out)
        # what stop() sets: a plain attribute, since it is called from signal handlers, which may
        # interrupt this very thread while it holds a lock (an Event's is not reentrant)
        self._stopping = False
        self.in_flight = 0
        self.served = 0
        self.rejected = 0
        # messages the broker could not take (no broker for a long time: the send queue is full);
        # a heartbeat or hello is worthless once stale, and a reply's task has timed out by then
        self.dropped = {"beats": 0, "hellos": 0, "replies": 0}
        self._send_blocked = False
        self._secrets = [Secret(api_key) if isinstance(api_key, str) else api_key] if api_key else []
        self._key_values = key_values(self._secrets)  # as redact() replaces them
        # the provider takes a key and this adapter has none: its requests are refused at once,
        # like the provider's own 401 would be (the broker's cooldown and fallback then apply),
        # instead of sent without credentials. A server on this machine (a local
        # OpenAI-compatible one under a built-in name) is asked anyway: many take no key.
        self._refuse_keyless = bool(profile.api_key_env) and not self._secrets and not is_loopback(profile.base_url)

    # ---- request execution --------------------------------------------------------------------
    def _answer_local(self, req: ReasonRequest) -> ReasonReply:
        from .narrator import narrate

        t0 = time.perf_counter()
        try:
            text = narrate(req.context, style="json" if req.json_mode else "narrative")
        except Exception as e:  # noqa: BLE001 - the narrator must not take the adapter down
            return ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=False, error_kind="malformed",
                               error=f"narrator failed: {type(e).__name__}")
        n_out = (len(text.encode()) + 3) // 4
        return ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=True, text=text, model="template",
                           tokens_in=0, tokens_out=n_out, model_ms=(time.perf_counter() - t0) * 1e3)

    def _answer_http(self, client: Any, req: ReasonRequest) -> ReasonReply:
        if self._refuse_keyless:
            return ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=False, error_kind="auth",
                               error=f"no API key: set ${self.profile.api_key_env}, put it in the secrets file, "
                                     "or set the profile's api_key_env to \"\" for a server that takes none")
        try:
            c = client.complete(req.messages, max_tokens=req.max_tokens, temperature=req.temperature,
                                timeout=min(req.timeout_ms / 1e3, self.profile.timeout_s),
                                json_mode=req.json_mode)
        except AdapterError as e:
            log.warning("%s request %d failed: %s", self.profile.name, req.task_id, redact(str(e), self._secrets))
            return ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=False, error_kind=e.kind,
                               error=redact(str(e), self._secrets)[:2000], status=e.status,
                               retry_after=e.retry_after)
        except Exception as e:  # noqa: BLE001 - a client bug must not lose the request
            return ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=False, error_kind="connection",
                               error=redact(f"{type(e).__name__}: {e}", self._secrets)[:2000])
        # a provider may echo what it was sent, the key included: no key leaves in a reply
        limit = min(1 << 20, reply_limit(req.max_tokens) + 1)
        return ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=True, text=self._clip(c.text, limit),
                           model=self._clip(c.model, 256), tokens_in=max(0, min(int(c.tokens_in), 2**32 - 1)),
                           tokens_out=max(0, min(int(c.tokens_out), 2**32 - 1)), model_ms=c.latency_s * 1e3)

    def _clip(self, text: str, n: int) -> str:
        """``text`` with every key this adapter knows replaced by ``***`` (whole, or any run of
        :data:`~dynamic_core.reasoning.secrets.FRAGMENT_CHARS` of its characters), cut to ``n``
        characters. The replacement sees a window longer than ``n`` by the longest key, so a key
        straddling the cut is replaced whole, not left half there. Only the keys themselves: the
        generic patterns :func:`~dynamic_core.reasoning.secrets.redact` adds for error messages
        (``sk-...``, ``Bearer ...``) would garble a rationale's "risk-adjusted" or "bearer bonds"."""
        keys = self._key_values
        return redact_keys(text[:n + (len(keys[0]) if keys else 0)], keys)[:n]

    def _pool_thread(self) -> None:
        from .client import OpenAICompatibleClient

        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._done_addr)
        enc = Codec(MeshFromAdapter)
        client = OpenAICompatibleClient(self.profile, self._key)
        try:
            while True:
                with self._jobs_cv:
                    while not self._jobs and not self._stop.is_set():
                        self._jobs_cv.wait(0.5)
                    if not self._jobs:
                        return
                    req = self._jobs.popleft()
                try:
                    raw = enc.encode(self._answer_http(client, req))
                except Exception as e:  # noqa: BLE001 - every request gets a reply, or its slot leaks
                    raw = enc.encode(ReasonReply(task_id=req.task_id, attempt=req.attempt, ok=False,
                                                 error_kind="connection", error=type(e).__name__))
                push.send(raw)
        finally:
            client.close()
            push.close()

    # ---- socket loop --------------------------------------------------------------------------
    def hello(self) -> AdapterHello:
        p = self.profile
        return AdapterHello(provider=p.name, kind=p.kind, model=p.model[:256], context_window=p.context_window,
                            usd_per_m_input=p.usd_per_m_input, usd_per_m_output=p.usd_per_m_output,
                            latency_class=p.latency_class, personas=tuple(p.personas)[:256],
                            languages=tuple(p.languages)[:256], style=p.style,
                            max_concurrency=p.max_concurrency, pid=os.getpid())

    def _send(self, msg: Any, what: str) -> bool:
        return self._send_frames([self._codec_out.encode(msg)], what)

    def _send_frames(self, frames: list[Any], what: str, n: int = 1) -> bool:
        """Send without blocking. A full send queue (SNDHWM: the broker has been away long) drops
        the message, counted under ``dropped[what]`` (``n`` messages), and logs once per outage:
        a blocking send would never return without a broker, and signals could not stop it."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped[what] += n
            if not self._send_blocked:
                self._send_blocked = True
                log.warning("the broker at %s takes no messages (send queue full): dropping heartbeats "
                            "and replies until it does", self.connect)
            return False
        if self._send_blocked:
            self._send_blocked = False
            log.info("the broker at %s takes messages again (dropped so far: %s)", self.connect, self._dropped_text())
        return True

    def _dropped_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.dropped.items())

    def run(self) -> int:
        """Serve until shutdown; returns the process exit code."""
        if self.profile.kind != "local":
            from .client import OpenAICompatibleClient

            OpenAICompatibleClient(self.profile, self._key).close()  # a bad profile fails here, before hello
            for i in range(self.profile.max_concurrency):
                t = threading.Thread(target=self._pool_thread, name=f"dc-adapter-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._done_pull, zmq.POLLIN)
        # the connection's events, to say when there is no broker (the adapter would otherwise
        # wait in silence: the broker sends only requests); a broker is there once a ZMTP
        # handshake succeeds, not when a TCP connect does (any listener accepts those)
        monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        reason = "shutdown"
        try:
            poller.register(monitor, zmq.POLLIN)
            self._send(self.hello(), "hellos")
            next_beat = time.monotonic() + self.heartbeat_s
            next_hello = time.monotonic() + HELLO_EVERY_S
            while not self._stopping:
                now = time.monotonic()
                timeout_ms = max(0, int(min(next_beat - now, POLL_MAX_S) * 1000))
                events = dict(poller.poll(timeout_ms))
                if monitor in events:
                    self._connection_events(monitor)
                if self._done_pull in events:
                    self._forward_done()
                if self.sock in events and self._read_broker():
                    break
                now = time.monotonic()
                if now >= next_beat:
                    if self.parent_pid is not None and os.getppid() != self.parent_pid:
                        reason = "parent gone"
                        break
                    self._send(AdapterBeat(in_flight=self.in_flight, ts=time.time_ns()), "beats")
                    next_beat = now + self.heartbeat_s
                if now >= next_hello:
                    self._send(self.hello(), "hellos")
                    next_hello = now + HELLO_EVERY_S
        finally:
            self._stop.set()
            with self._jobs_cv:
                self._jobs_cv.notify_all()
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:  # pragma: no cover - the socket is open until close() below
                pass
            monitor.close(0)
            try:
                self.sock.send(self._codec_out.encode(AdapterBye(reason=reason)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            if any(self.dropped.values()):
                log.warning("adapter stopped (%s); messages the broker never took: %s", reason, self._dropped_text())
            self.close()
        return 0

    def _connection_events(self, monitor: zmq.Socket) -> None:
        """Logs the connection to the broker: a warning while there is none (once per
        outage), then when it comes (back)."""
        from zmq.utils.monitor import recv_monitor_message

        while readable(monitor):
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._no_broker:
                    log.info("connected to the broker at %s", self.connect)
                self._no_broker, self._had_broker = False, True
            elif not self._no_broker:  # a retry, a lost connection or a failed handshake: one outage
                self._no_broker = True
                if self._had_broker:
                    log.warning("lost the broker at %s: reconnecting", self.connect)
                else:
                    log.warning("no broker at %s: retrying until one answers there (a mesh that 'run "
                                "--reasoning' starts binds a new loopback port each time: use the address it "
                                "prints)", self.connect)

    def _forward_done(self) -> None:
        while readable(self._done_pull):
            try:
                raw = self._done_pull.recv(zmq.NOBLOCK)
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return
            self.in_flight -= 1
            self._send_frames([raw], "replies")

    def _read_broker(self) -> bool:
        """Handle every waiting broker message (each may batch several requests); True on
        shutdown. The local narrator answers a batch with one batched reply."""
        for _ in range(1024):
            if not readable(self.sock):
                return False
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return False
            replies: list[bytes] = []
            for buf in (m for raw in frames for m in split_batch(raw.buffer)):
                try:
                    msg = self._codec_in.decode(buf)
                except PayloadError as e:
                    self.rejected += 1
                    refusal = self._refusal(buf, e)
                    if refusal is None:
                        log.warning("refused a broker frame: %s", e.reason)
                    else:  # answered: the broker frees the slot it holds for this request
                        log.warning("refused request %d (attempt %d) from the broker: %s", refusal.task_id,
                                    refusal.attempt, e.reason)
                        replies.append(self._codec_out.encode(refusal))
                    continue
                if isinstance(msg, MeshShutdown):
                    self._send_replies(replies)
                    return True
                self.served += 1
                if self.profile.kind == "local":
                    replies.append(self._codec_out.encode(self._answer_local(msg)))
                    continue
                self.in_flight += 1
                with self._jobs_cv:
                    self._jobs.append(msg)
                    self._jobs_cv.notify()
            self._send_replies(replies)
        return False

    def _refusal(self, buf: Any, e: PayloadError) -> ReasonReply | None:
        """The ``client_error`` reply to a request frame that did not decode, or None when the
        frame does not say which attempt it is (then nothing can be answered)."""
        try:
            ids = _ids_decoder.decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError):
            return None
        if not (0 <= ids.task_id < 2**64 and 0 <= ids.attempt <= 255):
            return None
        detail = redact(f"the adapter refused the request ({e.reason}): {e.detail}", self._secrets)
        return ReasonReply(task_id=ids.task_id, attempt=ids.attempt, ok=False, error_kind="client_error",
                           error=detail[:2000])

    def _send_replies(self, replies: list[bytes]) -> None:
        """The answers made on the socket thread to one broker message (the local narrator's,
        refusals): in batch frames when several."""
        if replies:
            self._send_frames(batch_frames(replies), "replies", len(replies))

    def stop(self) -> None:
        """Ask :meth:`run` to finish (within :data:`POLL_MAX_S`). Takes no lock: safe in a
        signal handler, whatever the interrupted code holds."""
        self._stopping = True

    def close(self) -> None:
        # one deadline for every request thread (a hung request holds its thread until its own
        # timeout; they are daemons and die with the process): not JOIN_S per thread
        end = time.monotonic() + JOIN_S
        for t in self._threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        self._done_pull.close(0)
        self.sock.close()


def serve(provider: str, connect: str, *, overrides: dict[str, Any] | None = None,
          secrets_file: str | None = None, heartbeat_s: float = 0.1, parent_pid: int | None = None) -> int:
    """Run one adapter process until shutdown (what ``dynamic-core adapter`` calls).

    Returns 0 after a shutdown and 1 when serving failed; a bad profile (a ``base_url`` the HTTP
    client refuses included), secrets file, API key or address raises before serving starts (the
    command line turns that into exit status :data:`CONFIG_ERROR_EXIT`, which a
    :class:`~dynamic_core.reasoning.ReasoningMesh` does not restart)."""
    from .._checks import check_real
    from .profiles import profile as make_profile
    from .secrets import RedactingFilter, api_key

    # (the command line takes [HEARTBEAT_MIN_S, HEARTBEAT_MAX_S]; shorter here only spins the loop)
    heartbeat_s = check_real("heartbeat_s", heartbeat_s, 0.0, HEARTBEAT_MAX_S, lo_open=True)
    prof = make_profile(provider, overrides)
    key = api_key(prof, secrets_file=secrets_file) if prof.kind != "local" else None
    if prof.kind != "local":
        from .client import OpenAICompatibleClient

        # what the client refuses (a base_url, a key no header can carry) is configuration:
        # raised here it exits 2, not 1 from inside run(), which a mesh would restart forever
        OpenAICompatibleClient(prof, key).close()
    RedactingFilter([key] if key else []).install()  # the root logger and its handlers
    if prof.kind != "local" and prof.api_key_env and not key:
        log.warning("provider %s: no API key in $%s or the secrets file; %s", prof.name, prof.api_key_env,
                    "asking its server on this machine without one" if is_loopback(prof.base_url) else
                    "its requests fail at once with 'auth' (the mesh falls back; set api_key_env to \"\" "
                    "for a server that takes none)")
    worker = AdapterWorker(prof, connect, api_key=key, heartbeat_s=heartbeat_s, parent_pid=parent_pid)

    def _term(signum: int, frame: Any) -> None:
        worker.stop()  # a plain flag: a lock here could be one the interrupted main thread holds

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
    try:
        return worker.run()
    except PolicyError as e:  # a profile the client refuses: it would fail the same way again
        log.error("adapter %s stopped: %s", prof.name, e)
        return CONFIG_ERROR_EXIT
    except (DynamicCoreError, OSError, ValueError, zmq.ZMQError) as e:
        # 1, not the command line's 2: exit 2 tells a mesh "configuration error, do not restart",
        # and a failure while serving is worth a restart
        log.error("adapter %s stopped: %s", prof.name, e)
        return 1
