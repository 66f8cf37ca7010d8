"""The DynamicLoRA knobs (one frozen Struct) and the names of layers, channels and statuses."""

from __future__ import annotations

import msgspec

from ..._checks import check_int, check_real

__all__ = [
    "AGENT_LAYERS",
    "CHANNELS",
    "LAYERS",
    "MAX_AGENTS",
    "MAX_CHUNK_ELEMS",
    "MAX_DIM",
    "MAX_PENDING",
    "MAX_RANK",
    "MAX_STATE_ELEMENTS",
    "MAX_THREADS",
    "MAX_TICKS",
    "MAX_WINDOW",
    "SHARED_LAYERS",
    "LoRAConfig",
]

MAX_RANK = 1024
"""Largest LoRA rank of a layer."""
MAX_WINDOW = 1 << 16
"""Largest ``interaction_window``, ``autocorr_window`` and ``resonance_window`` (ticks)."""
MAX_TICKS = (1 << 31) - 1
"""Largest tick count or per-tick count (``min_history``, cooldowns, ``max_circuits_per_tick``)."""
MAX_PENDING = 1 << 16
"""Largest ``max_pending`` (requests queued per migration channel)."""
MAX_CHUNK_ELEMS = 1 << 26
"""Largest ``chunk_elems`` (the numpy reference update's temporaries are about this size)."""
MAX_THREADS = 256
"""Largest ``threads``: every native call starts up to that many threads."""
MAX_AGENTS = 1 << 24
"""Most agents of a hierarchy (and largest ``vertical_sample``)."""
MAX_DIM = 1 << 12
"""Widest hidden state of a hierarchy (the base is a dim x dim matrix)."""
MAX_STATE_ELEMENTS = 1 << 32
"""Most elements of a hierarchy's per-agent state: ``n_agents * (2 * dim * (rank_agent +
rank_context) + 2 * interaction_window + autocorr_window * (rank_agent + rank_context))``."""

LAYERS = ("foundation", "domain", "swarm", "agent", "context")
"""The five layers, slowest first: the order in which ``forward`` applies them."""

SHARED_LAYERS = LAYERS[:3]
"""One instance serves every agent."""

AGENT_LAYERS = LAYERS[3:]
"""One instance per agent, stored stacked (a leading agent axis)."""

CHANNELS = (("context", "agent"), ("agent", "swarm"), ("swarm", "domain"), ("domain", "foundation"))
"""Upward migration channels (from, to), fastest first; bandwidths in the same order."""


class LoRAConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the DynamicLoRA hierarchy; the defaults are the design's values.

    Tuples indexed by layer follow :data:`LAYERS` (foundation, domain, swarm, agent, context);
    tuples indexed by channel follow :data:`CHANNELS`.

    Every field is checked at construction (and when decoded): TypeError for a value of the
    wrong type (a bool or a float where an int belongs, a non-number where a number does),
    ValueError for NaN, an infinity, a value out of its range below, or a tuple of the wrong
    length (``msgspec.ValidationError``, also a ValueError, when decoding). Sizes are capped
    by the module's constants: ranks at most ``MAX_RANK`` (1024); ``interaction_window``,
    ``autocorr_window`` and ``resonance_window`` at most ``MAX_WINDOW`` (65536); tick counts
    at most ``MAX_TICKS`` (2**31 - 1); ``max_pending`` at most ``MAX_PENDING`` (65536);
    ``vertical_sample`` at most ``MAX_AGENTS`` (2**24); ``chunk_elems`` at most
    ``MAX_CHUNK_ELEMS`` (2**26); ``threads`` in [1, ``MAX_THREADS``] (256). Unless stated
    otherwise a float is finite and >= 0.

    Attributes
    ----------
    ranks : tuple[int, ...]
        LoRA rank per layer (64/32/16/8/4), each in [1, 1024].
    base_inertia : tuple[float, ...]
        Inertia of each layer at zero interaction density (0.99/0.9/0.7/0.5/0.1), each in
        [0, 1); the learning rate is ``1 - effective inertia``, at most ``1 - base_inertia``.
    inertia_gain : float
        How much of the remaining ``1 - base_inertia`` interactions can add: effective inertia is
        ``base + (1 - base) * inertia_gain * rho`` with ``rho = D / (D + density_half)`` in [0, 1),
        ``D`` the mean of the layer's interaction history. Must be < 1 so the rate stays > 0.
    density_half : float
        Interaction density at which half of that rise is reached (> 0).
    interaction_window : int
        Ticks of interaction history behind the density (a ring), in [1, 65536].
    init_scale : float
        A starts as N(0, init_scale**2 / dim); B starts at zero (standard LoRA: the hierarchy
        starts as the frozen base exactly).
    screened_decay, free_decay : float
        Per-tick drift of a parameter toward its initial value in the SCREENED (1e-4) and FREE
        (1e-2) phase: ``p = p * (1 - decay) + p_init * decay``.
    activity_decay : float
        EMA factor of the activity traces (per input line, rank component and output line).
        The decays, ``restore_rate``, ``migration_blend``, ``direction_decay`` and
        ``node_fraction`` are in [0, 1].
    screening_threshold : float
        Initial threshold: a parameter whose activity exceeds it is SCREENED (within
        ``threshold_bounds``).
    threshold_rate : float
        Homeostasis step: the threshold is multiplied (entropy below budget) or divided (above)
        by ``1 + threshold_rate`` per tick.
    threshold_bounds : tuple[float, float]
        The threshold never leaves this range (``0 < lo <= hi``).
    entropy_budget : tuple[float, float]
        (min, max) of a layer's normalised entropy; its midpoint is the optimal entropy the
        health ratio divides by.
    step_size : float
        Multiplies every layer's ``strength``: the step is ``(1 - inertia) * step_size * g``.
        The design's ``1 - inertia`` sets the layers' *relative* speeds; taken literally (1.0) on
        per-sample loss gradients it diverges (the context layer would step at up to 0.9), so
        the default is 0.1 (measured stable from dim 16 to 64 on a learnable target).
    head_learning_rate : float
        SGD rate of the backend's head vector (0.0: frozen head; only the LoRA layers learn).
    horizontal_alpha, horizontal_beta : float
        Horizontal (swarm) resonance: an agent's swarm gradient is weighted by
        ``1 + alpha * a`` when its alignment ``a`` with the swarm direction is positive and by
        ``1 + beta * |a|`` when not (0.5 / -0.3); each >= -1, so no factor turns a descent
        step into an ascent.
    direction_decay : float
        EMA factor of the swarm direction the horizontal alignment is measured against.
    vertical_gamma, vertical_delta, max_amplification : float
        Vertical resonance (0.3 / 0.2 / 2.0): gamma >= 0, delta in [0, 1], max_amplification
        >= 1.
    vertical_threshold, conflict_threshold : float
        Mean vertical alignment above ``vertical_threshold`` is FAST_TRACK, below
        ``-conflict_threshold`` is CONFLICT, NORMAL between (0.5 / 0.3). These, like
        ``stability_threshold``, ``emergency_threshold`` and ``match_threshold``, are any
        finite number (one beyond [-1, 1] switches its rule off).
    autocorr_window : int
        Ticks of activation signatures the circuit detector correlates against (100), in
        [1, 65536].
    stability_threshold : float
        Autocorrelation above which a pattern is a circuit (0.7).
    min_history : int
        Signatures a slot must have before it can report a circuit.
    node_fraction : float
        A rank component is a node of a circuit when its share of the signature is at least
        this fraction of the largest one.
    circuit_cooldown : int
        Ticks before a slot may report the same circuit again.
    max_circuits_per_tick : int
        Per source layer and tick, the most stable ones first.
    bandwidth : tuple[float, ...]
        Fraction of the source layer's parameters each channel may move per tick
        (0.01 / 0.005 / 0.001 / 0.0001).
    restore_rate : float
        Share of the used bandwidth restored per tick (``current_transfer *= 1 - restore_rate``).
    emergency_threshold : float
        Circuits more critical than this bypass the bandwidth check (counted).
    max_pending : int
        Queue length per channel, in [1, 65536]; beyond it the lowest priority request is
        dropped (counted).
    migration_blend : float
        Weight with which a migrated circuit is blended into its target (divided by the number
        of agents when many per-agent layers feed one shared layer: their mean).
    match_threshold : float
        A circuit component joins the target component whose A column it matches with
        ``|cos| >= match_threshold``; otherwise the least active free component is recruited.
    consolidation_ticks : int
        Ticks a consolidated component stays SCREENED whatever its activity.
    entropy_bands : tuple[float, float, float, float]
        Health bands of the entropy ratio: (crystallization below, healthy from, healthy to,
        amnesia above) = (0.5, 0.8, 1.2, 2.0).
    max_queue_depth, max_avg_wait, max_rejection_rate : float
        Bandwidth health: every channel strictly below each (10, 5 ticks, 0.01).
    min_alignment, fast_track_band, max_conflict_rate :
        Resonance health: ``|mean alignment| > 0.1``, fast-track rate strictly inside
        (0.05, 0.20) (``0 <= lo <= hi <= 1``), conflict rate ``< 0.05``.
    resonance_window : int
        Vertical alignments kept for the health mean, in [1, 65536].
    vertical_sample : int
        Agents (evenly spaced, always the same) whose per-agent layers enter the vertical
        alignment; 0: all. The alignment is one scalar per tick: a fixed sample of 1024 measures
        it at a tenth of the cost for 10k agents.
    chunk_elems : int
        The numpy reference update (a step in another dtype than the layer's, or
        ``DynamicLoRALayer.native = False``) runs in chunks of about this many parameters
        (at most 2**26).
    threads : int
        Threads an update's slots are split over, in the native kernel (or the reference's
        chunks), in [1, 256]: every native call may start that many; results do not depend on
        it: slots are independent.
    """

    ranks: tuple[int, ...] = (64, 32, 16, 8, 4)
    base_inertia: tuple[float, ...] = (0.99, 0.9, 0.7, 0.5, 0.1)
    inertia_gain: float = 0.5
    density_half: float = 1.0
    interaction_window: int = 32
    init_scale: float = 1.0
    screened_decay: float = 1e-4
    free_decay: float = 1e-2
    activity_decay: float = 0.9
    screening_threshold: float = 0.5
    threshold_rate: float = 0.1
    threshold_bounds: tuple[float, float] = (1e-9, 1e9)
    entropy_budget: tuple[float, float] = (0.2, 0.6)
    step_size: float = 0.1
    head_learning_rate: float = 0.0
    horizontal_alpha: float = 0.5
    horizontal_beta: float = -0.3
    direction_decay: float = 0.9
    vertical_gamma: float = 0.3
    vertical_delta: float = 0.2
    max_amplification: float = 2.0
    vertical_threshold: float = 0.5
    conflict_threshold: float = 0.3
    autocorr_window: int = 100
    stability_threshold: float = 0.7
    min_history: int = 10
    node_fraction: float = 0.5
    circuit_cooldown: int = 100
    max_circuits_per_tick: int = 64
    bandwidth: tuple[float, ...] = (0.01, 0.005, 0.001, 0.0001)
    restore_rate: float = 0.1
    emergency_threshold: float = 0.95
    max_pending: int = 1024
    migration_blend: float = 0.5
    match_threshold: float = 0.9
    consolidation_ticks: int = 100
    entropy_bands: tuple[float, float, float, float] = (0.5, 0.8, 1.2, 2.0)
    max_queue_depth: float = 10.0
    max_avg_wait: float = 5.0
    max_rejection_rate: float = 0.01
    min_alignment: float = 0.1
    fast_track_band: tuple[float, float] = (0.05, 0.20)
    max_conflict_rate: float = 0.05
    resonance_window: int = 1000
    vertical_sample: int = 1024
    chunk_elems: int = 1 << 17
    threads: int = 1

    def __post_init__(self) -> None:
        # every field, typed (bool and float are no int; NaN and infinities are no number), before
        # the relations between fields; sizes capped (the module's MAX_* constants)
        for name in ("ranks", "base_inertia", "threshold_bounds", "entropy_budget", "fast_track_band",
                     "entropy_bands", "bandwidth"):
            v = getattr(self, name)
            if isinstance(v, list):  # kept as the tuple it is declared: hashable, equal, not mutable
                msgspec.structs.force_setattr(self, name, tuple(v))
        n = len(LAYERS)
        for i, r in enumerate(_tuple("ranks", self.ranks, n)):
            check_int(f"ranks[{i}]", r, 1, MAX_RANK)
        for i, b in enumerate(_tuple("base_inertia", self.base_inertia, n)):
            _below_one(f"base_inertia[{i}]", b)
        _below_one("inertia_gain", self.inertia_gain)
        check_real("density_half", self.density_half, 0.0, lo_open=True)
        for name in ("interaction_window", "autocorr_window", "resonance_window"):
            check_int(name, getattr(self, name), 1, MAX_WINDOW)
        for name in ("min_history", "circuit_cooldown", "max_circuits_per_tick"):
            check_int(name, getattr(self, name), 1, MAX_TICKS)
        check_int("consolidation_ticks", self.consolidation_ticks, 0, MAX_TICKS)
        check_int("max_pending", self.max_pending, 1, MAX_PENDING)
        check_int("vertical_sample", self.vertical_sample, 0, MAX_AGENTS)
        check_int("chunk_elems", self.chunk_elems, 1, MAX_CHUNK_ELEMS)
        check_int("threads", self.threads, 1, MAX_THREADS)
        for name in ("screened_decay", "free_decay", "activity_decay", "restore_rate", "migration_blend",
                     "direction_decay", "node_fraction"):
            check_real(name, getattr(self, name), 0.0, 1.0)
        for name in ("init_scale", "threshold_rate", "step_size", "head_learning_rate", "vertical_gamma",
                     "max_queue_depth", "max_avg_wait", "max_rejection_rate", "min_alignment", "max_conflict_rate"):
            check_real(name, getattr(self, name), 0.0)
        for name in ("horizontal_alpha", "horizontal_beta"):
            check_real(name, getattr(self, name), -1.0)  # a factor never turns descent into ascent
        check_real("vertical_delta", self.vertical_delta, 0.0, 1.0)
        check_real("max_amplification", self.max_amplification, 1.0)
        for name in ("screening_threshold", "vertical_threshold", "conflict_threshold", "stability_threshold",
                     "emergency_threshold", "match_threshold"):
            check_real(name, getattr(self, name))
        for name, k in (("threshold_bounds", 2), ("entropy_budget", 2), ("fast_track_band", 2),
                        ("entropy_bands", 4)):
            for i, v in enumerate(_tuple(name, getattr(self, name), k)):
                check_real(f"{name}[{i}]", v)
        for i, b in enumerate(_tuple("bandwidth", self.bandwidth, len(CHANNELS))):
            check_real(f"bandwidth[{i}]", b, 0.0, 1.0, lo_open=True)
        lo, hi = self.threshold_bounds
        if not 0.0 < lo <= self.screening_threshold <= hi:
            raise ValueError("need 0 < threshold_bounds[0] <= screening_threshold <= threshold_bounds[1]")
        elo, ehi = self.entropy_budget
        if not 0.0 <= elo < ehi <= 1.0:
            raise ValueError("entropy_budget must be (min, max) with 0 <= min < max <= 1")
        b = self.entropy_bands
        if not 0.0 < b[0] <= b[1] < b[2] <= b[3]:
            raise ValueError("entropy_bands must be increasing: (crystallization, healthy lo, healthy hi, amnesia)")
        flo, fhi = self.fast_track_band
        if not 0.0 <= flo <= fhi <= 1.0:
            raise ValueError("fast_track_band must be (lo, hi) with 0 <= lo <= hi <= 1")

    def rank(self, layer: str) -> int:
        """Rank of ``layer``."""
        return self.ranks[LAYERS.index(layer)]

    def inertia(self, layer: str) -> float:
        """Base inertia of ``layer``."""
        return self.base_inertia[LAYERS.index(layer)]


def _tuple(name: str, v: object, n: int) -> tuple:
    """``v`` as a tuple of ``n`` items (a list is taken: msgspec builds tuples, callers may not)."""
    if not isinstance(v, (tuple, list)) or len(v) != n:
        raise ValueError(f"{name} needs {n} values, got {v!r}")
    return tuple(v)


def _below_one(name: str, v: object) -> float:
    x = check_real(name, v, 0.0, 1.0)
    if x == 1.0:
        raise ValueError(f"{name} must be in [0, 1) so the learning rate stays positive, got {v!r}")
    return x
