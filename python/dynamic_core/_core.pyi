"""
dynamic_core native engine (private; use the dynamic_core package)
"""
from __future__ import annotations
import numpy
import numpy.typing
import typing
__all__: list[str] = ['Engine', 'atr', 'ema', 'ew_bands', 'macd', 'reason_names', 'record_layouts', 'ring_bench', 'roc', 'rsi', 'score_to_action', 'validate_bars']
class Engine:
    """
    Native engine; wrapped by dynamic_core.Engine.
    """
    def __init__(self, genomes: numpy.ndarray, cores_per_sm: typing.SupportsInt | typing.SupportsIndex = 128, population_hash: typing.SupportsInt | typing.SupportsIndex = 0, dead_letter_capacity: typing.SupportsInt | typing.SupportsIndex = 10000, block_bars: typing.SupportsInt | typing.SupportsIndex = 0, threads: typing.SupportsInt | typing.SupportsIndex = 1, capacity: typing.SupportsInt | typing.SupportsIndex = 0, backpressure: typing.SupportsInt | typing.SupportsIndex = 0, stall_deadline_ns: typing.SupportsInt | typing.SupportsIndex = 50000000, fault_injection: bool = False) -> None:
        ...
    def agents(self) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Per-agent state in population order, as bytes.
        """
    def close(self) -> None:
        """
        Join the worker and sentinel threads.
        """
    def dead_letters(self) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Rejected bars with reason codes, oldest first, as bytes.
        """
    def inject_poison(self, agent: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def inject_stall(self, sm: typing.SupportsInt | typing.SupportsIndex, ns: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def layout(self) -> dict:
        ...
    def poll(self, max_n: typing.SupportsInt | typing.SupportsIndex, timeout_ns: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Up to max_n ready signals in bar order, as bytes; waits up to timeout_ns (<0: forever).
        """
    def run(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Process a time-ordered bar batch; returns signal records as bytes.
        """
    def stats(self) -> dict:
        ...
    def step(self, bar: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex, timeout_ns: typing.SupportsInt | typing.SupportsIndex) -> tuple[int, numpy.typing.NDArray[numpy.uint8]]:
        """
        One bar in, (1, signal bytes) out; (0, b'') on timeout, (-1, b'') if no signal is due.
        """
    def submit(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        Validate, sequence and dispatch bars; returns how many were taken.
        """
    def validate(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint32]:
        """
        Reject reason of every bar as run() would see it, without changing state.
        """
    def wait_idle(self) -> None:
        """
        Wait until every submitted bar has been processed.
        """
    @property
    def n_agents(self) -> int:
        ...
def atr(high: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], low: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], close: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def ema(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def ew_bands(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    ...
def macd(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], fast: typing.SupportsInt | typing.SupportsIndex, slow: typing.SupportsInt | typing.SupportsIndex, signal: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    ...
def reason_names() -> list:
    """
    Reject reason names, indexed by reason code.
    """
def record_layouts() -> dict:
    """
    Size and (name, offset, numpy type, count) of every field of each native record.
    """
def ring_bench(n: typing.SupportsInt | typing.SupportsIndex, capacity: typing.SupportsInt | typing.SupportsIndex = 4096) -> dict:
    """
    ns per element moved between two threads: SpscRing vs a mutex-guarded std::deque.
    """
def roc(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def rsi(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def score_to_action(score: typing.SupportsFloat | typing.SupportsIndex, weak: typing.SupportsFloat | typing.SupportsIndex = 0.2, strong: typing.SupportsFloat | typing.SupportsIndex = 0.6) -> int:
    """
    Map a score in (-1, 1) to an action code -2..2.
    """
def validate_bars(bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint32]:
    """
    Reject reason of every bar: value checks and time order per (instrument, timeframe).
    """
