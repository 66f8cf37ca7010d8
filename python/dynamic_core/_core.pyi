"""
dynamic_core native engine (private; use the dynamic_core package)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['Engine', 'JOURNAL_FORMAT', 'JOURNAL_MAX_META', 'JOURNAL_MAX_RECORD', 'JOURNAL_RECORD_HEADER', 'JournalReader', 'MAX_PRICE', 'MIN_PRICE', 'RECORD_MORE', 'RecordType', 'SIGNAL_DSI', 'atr', 'crc32c', 'det_cos2pi', 'det_cos2pi1', 'det_exp', 'det_exp1', 'det_exp2', 'det_exp21', 'det_expm1', 'det_expm11', 'det_log', 'det_log1', 'det_tanh', 'det_tanh1', 'dsi_divergence', 'dsi_runs', 'ema', 'ew_bands', 'ew_moments', 'journal_bench', 'journal_locked', 'journal_progress_step', 'journal_scan', 'kernel_bench', 'kernel_isa', 'lora_fold', 'lora_r_rows', 'lora_rd_dot', 'lora_record', 'lora_update', 'lora_xty', 'macd', 'reason_names', 'record_layouts', 'ring_bench', 'roc', 'rsi', 'score_to_action', 'set_kernel_isa', 'signal_hashes', 'validate_bars']
class Engine:
    """
    Native engine; wrapped by dynamic_core.Engine.
    """
    def __init__(self, genomes: numpy.ndarray, cores_per_sm: typing.SupportsInt | typing.SupportsIndex = 128, population_hash: typing.SupportsInt | typing.SupportsIndex = 0, dead_letter_capacity: typing.SupportsInt | typing.SupportsIndex = 10000, block_bars: typing.SupportsInt | typing.SupportsIndex = 0, threads: typing.SupportsInt | typing.SupportsIndex = 1, capacity: typing.SupportsInt | typing.SupportsIndex = 0, backpressure: typing.SupportsInt | typing.SupportsIndex = 0, stall_deadline_ns: typing.SupportsInt | typing.SupportsIndex = 50000000, fault_injection: bool = False) -> None:
        ...
    def admit(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex, strict: bool = False) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Device backends: validate, sequence and journal a batch without running it; returns the bars to run as admitted records (stream, index in batch, index in stream, seq), as bytes.
        """
    def agents(self) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Per-agent state in population order, as bytes.
        """
    def close(self) -> None:
        """
        Join the worker and sentinel threads.
        """
    def close_journal(self) -> None:
        ...
    def count_refused(self, n: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Count n bars a feeding call gave up on before taking them: one backpressure event, n rejected bars (as a submit whose timeout ran out behind another feeder).
        """
    def dead_letters(self) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Rejected bars with reason codes, oldest first, as bytes.
        """
    def device_plan(self) -> dict:
        """
        Streams, SMs, per-stream banks (indicators, features) for a device backend.
        """
    def emit_external(self, signals: numpy.ndarray, updates: typing.SupportsInt | typing.SupportsIndex, quarantined: typing.SupportsInt | typing.SupportsIndex, seconds: typing.SupportsFloat | typing.SupportsIndex) -> None:
        """
        Device backends: journal and count signals computed outside the workers.
        """
    def evolve(self, config: dict, seed: typing.SupportsInt | typing.SupportsIndex, generation: typing.SupportsInt | typing.SupportsIndex, event: bytes = b'', streams: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = []) -> dict:
        """
        One generation of evolution between updates; returns the report (births as a uint8 array).
        """
    def forget_journal_after_fork(self) -> None:
        """
        In a child made by fork(): close this process's copies of the journal's files, writing nothing.
        """
    def genomes(self) -> numpy.typing.NDArray[numpy.uint8]:
        """
        The current (evolved) genomes in population order, as bytes.
        """
    def has_journal(self) -> bool:
        ...
    def in_flight(self) -> int:
        """
        Bars claimed whose signals are not yet polled (lock-free).
        """
    def inject_poison(self, agent: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def inject_stall(self, sm: typing.SupportsInt | typing.SupportsIndex, ns: typing.SupportsInt | typing.SupportsIndex, hold: bool = False) -> None:
        ...
    def journal_append(self, type: ..., data: bytes, durable: bool = True) -> int:
        ...
    def journal_stats(self) -> dict:
        ...
    def lane_arrays(self) -> dict:
        """
        Per-lane parameters (structure of arrays, lane order).
        """
    def layout(self) -> dict:
        ...
    def lineage(self) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Lineage of the agent in each population slot, as bytes.
        """
    def open_journal(self, dir: str, meta: bytes, population_hash: typing.SupportsInt | typing.SupportsIndex, config_hash: typing.SupportsInt | typing.SupportsIndex, build_id: str, fsync_level: typing.SupportsInt | typing.SupportsIndex, segment_bytes: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def poll(self, max_n: typing.SupportsInt | typing.SupportsIndex, timeout_ns: typing.SupportsInt | typing.SupportsIndex, box: list | None = None) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Up to max_n ready signals in bar order, as bytes; waits up to timeout_ns (<0: forever). A non-empty result is appended to the list `box` too.
        """
    def read_state(self) -> dict:
        """
        Per-lane agent state (structure of arrays, lane order).
        """
    def run(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex, strict: bool = False, box: list | None = None) -> numpy.typing.NDArray[numpy.uint8]:
        """
        Process a time-ordered bar batch; returns signal records as bytes. (signals, bars taken) are appended to the list `box` too, also when it raises: what it had handed out by then.
        """
    def set_credit(self, agents: typing.Annotated[numpy.typing.ArrayLike, numpy.uint32], credit: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], event: bytes = b'') -> None:
        """
        Set the consensus-weight credit of agents (population indices), between updates.
        """
    def set_dsi(self, instruments: typing.Annotated[numpy.typing.ArrayLike, numpy.uint32], evidence: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], event: bytes = b'') -> int:
        """
        Set the DSI evidence of instruments (ids), read by lanes with w_dsi != 0; returns the streams updated.
        """
    def set_external_scores(self, agents: typing.Annotated[numpy.typing.ArrayLike, numpy.uint32], scores: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], event: bytes = b'') -> None:
        """
        Set the scores of external-score agents (kind 1; population indices), between updates.
        """
    def stats(self) -> dict:
        ...
    def step(self, bar: typing.Any, n_registered: typing.SupportsInt | typing.SupportsIndex, timeout_ns: typing.SupportsInt | typing.SupportsIndex, strict: bool = False, feed_timeout_ns: typing.SupportsInt | typing.SupportsIndex = -1, box: list | None = None) -> tuple[int, bytes]:
        """
        One bar (a record or a 1-d array of one) in, (1, signal bytes) out; (0, b'') on timeout, (-1, b'') if no signal is due, (-2, b'') if another feeder held the feed past feed_timeout_ns (<0: no limit; the bar was not taken). The signal's bytes are appended to the list `box` too.
        """
    def stream_dsi(self) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.uint32]]:
        """
        (evidence float64, signal flags uint32) per stream, as set_dsi left them; read between updates.
        """
    def submit(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex, strict: bool = False, timeout_ns: typing.SupportsInt | typing.SupportsIndex = -1) -> int:
        """
        Validate, sequence and dispatch bars; returns how many were taken. strict: a batch with a bad bar raises InvalidInput and nothing is taken. timeout_ns (>= 0): how long a blocking submit waits for room before it returns the count it took.
        """
    def validate(self, bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint32]:
        """
        Reject reason of every bar as run() would see it, without changing state.
        """
    def wait_idle(self) -> None:
        """
        Wait until every submitted bar has been processed.
        """
    def write_state(self, state: dict) -> None:
        """
        Replaces the per-lane agent state (as read_state returns it).
        """
    @property
    def n_agents(self) -> int:
        ...
class RecordType:
    """
    Journal record types.
    
    Members:
    
      META
    
      BARS
    
      DEAD_LETTER
    
      CONTROL
    
      SIGNAL_HASHES
    
      INSTRUMENTS
    
      EVENT
    """
    BARS: typing.ClassVar[RecordType]
    CONTROL: typing.ClassVar[RecordType]
    DEAD_LETTER: typing.ClassVar[RecordType]
    EVENT: typing.ClassVar[RecordType]
    INSTRUMENTS: typing.ClassVar[RecordType]
    META: typing.ClassVar[RecordType]
    SIGNAL_HASHES: typing.ClassVar[RecordType]
    __members__: typing.ClassVar[dict[str, RecordType]]
    @typing.overload
    def __eq__(self, other: RecordType) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: RecordType) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class JournalReader:
    """
    Reads journal records in order.
    """
    def __init__(self, dir: str) -> None:
        ...
    def bytes_done(self) -> int:
        """
        Bytes read so far: the segments before the current one and the records of this one.
        """
    def bytes_total(self) -> int:
        """
        The segments' total size when the reader was made.
        """
    def next(self) -> typing.Any:
        """
        Next record as (type, seq, payload, segment, offset, flags), or None at the end or at a bad record.
        """
    def report(self) -> dict:
        """
        Where reading stopped and why (status ok, torn_tail, corrupt, unreadable, unsupported or empty).
        """
def _exiting() -> None:
    """
    Marks the calling thread as the one running the interpreter's exit (an atexit hook of dynamic_core; see GilRelease in cpp/bindings/common.hpp).
    """
def atr(high: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], low: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], close: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def crc32c(data: bytes, crc: typing.SupportsInt | typing.SupportsIndex = 0) -> int:
    """
    CRC32C (Castagnoli) of `data`, continuing from `crc`.
    """
def det_cos2pi(u: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """
    cos(2 pi u), elementwise, the same bits on any machine.
    """
def det_cos2pi1(u: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    cos(2 pi u) of one float (detmath).
    """
def det_exp(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """
    e^x, elementwise, the same bits on any machine.
    """
def det_exp1(x: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    e^x of one float (detmath).
    """
def det_exp2(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """
    2^x, elementwise, the same bits on any machine.
    """
def det_exp21(x: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    2^x of one float (detmath).
    """
def det_expm1(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """
    e^x - 1, elementwise, the same bits on any machine.
    """
def det_expm11(x: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    e^x - 1 of one float (detmath).
    """
def det_log(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """
    Natural log, elementwise, the same bits on any machine.
    """
def det_log1(x: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    Natural log of one float (detmath).
    """
def det_tanh(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """
    tanh, elementwise, the same bits on any machine.
    """
def det_tanh1(x: typing.SupportsFloat | typing.SupportsIndex) -> float:
    """
    tanh of one float (detmath).
    """
def dsi_divergence(price: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], params: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], state: numpy.typing.NDArray[numpy.float64], tail: numpy.typing.NDArray[numpy.float64]) -> tuple[tuple, tuple, numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """
    The DSI divergence verifier over one instrument's trade prices (dsi.hpp); state and tail are carried in place. Returns ((index, sign) of rsi_divergence, of macd_divergence, the RSI and the MACD line at each tick).
    """
def dsi_runs(ts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], price: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], size: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], move: typing.Annotated[numpy.typing.ArrayLike, numpy.int8], aggressor: typing.Annotated[numpy.typing.ArrayLike, numpy.int8], zsize: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], params: collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex], state: numpy.typing.NDArray[numpy.float64], start_ts: numpy.typing.NDArray[numpy.int64]) -> tuple[tuple, tuple, tuple]:
    """
    The DSI run experts over one instrument's ticks (dsi.hpp); state and start_ts are carried in place. Returns ((index, sign) of momentum, exhaustion, sweep).
    """
def ema(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def ew_bands(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    ...
def ew_moments(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], alpha: typing.SupportsFloat | typing.SupportsIndex, mean: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], var: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """
    West's EW mean and variance of the series of x (1-d or (n, k)) before each row, from the state (mean, var); returns (mean_before, var_before, mean, var), the last two the state after x.
    """
def journal_bench(dir: str, n: typing.SupportsInt | typing.SupportsIndex, payload: typing.SupportsInt | typing.SupportsIndex, fsync_level: typing.SupportsInt | typing.SupportsIndex, batch: typing.SupportsInt | typing.SupportsIndex) -> dict:
    """
    Append n records of `payload` bytes to a new journal in dir, committing (and syncing by fsync_level) every `batch` records; seconds taken.
    """
def journal_locked(dir: str) -> bool:
    """
    True while a writer (in any process) holds the journal directory open (its flock).
    """
def journal_progress_step(total: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Bytes between progress calls over a journal of `total` bytes: every 1%, at most 8 MB apart.
    """
def journal_scan(dir: str, repair: bool = False, progress: typing.Any = None) -> dict:
    """
    Walk a journal checking framing and CRCs; with repair, truncate a torn tail. `progress(done, total)` (bytes) is called every journal_progress_step(total) bytes and at the end.
    """
def kernel_bench(sms: typing.SupportsInt | typing.SupportsIndex = 1, features: typing.SupportsInt | typing.SupportsIndex = 300, bars: typing.SupportsInt | typing.SupportsIndex = 100000, rows: typing.SupportsInt | typing.SupportsIndex = 1, seed: typing.SupportsInt | typing.SupportsIndex = 1) -> dict:
    """
    The lane kernel alone over `sms` SMs of 128 synthetic lanes reading `features` features: ns per lane-update (no bank, ingress or consensus).
    """
def kernel_isa() -> int:
    """
    Instruction-set level of the native kernels in use (lane kernel, bank updates, DynamicLoRA): 4 (x86-64-v4), 3 (x86-64-v3) or 0 (baseline). Results are the same bits on every level.
    """
def lora_fold(act: numpy.ndarray, t: numpy.ndarray, c: numpy.ndarray, k: typing.SupportsFloat | typing.SupportsIndex, omk: typing.SupportsFloat | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    """
    k * act + omk * (t / c[:, None]) as a new array; t is zeroed (internal).
    """
def lora_r_rows(y: numpy.ndarray, M: numpy.ndarray, threads: typing.SupportsInt | typing.SupportsIndex = 1) -> numpy.ndarray:
    """
    out[n, i] = sum_j y[n, j] M[n, j, i] for (n, rank) y and (n, rank, dim) M (or M[j, i]: one (rank, dim) M for every row), rank by rank (internal).
    """
def lora_rd_dot(x: numpy.ndarray, M: numpy.ndarray, threads: typing.SupportsInt | typing.SupportsIndex = 1) -> numpy.ndarray:
    """
    u[n, j] = sum_i x[n, i] M[n, j, i] for (n, dim) x and (n, rank, dim) M (or M[j, i]: one (rank, dim) M for every row), in a fixed order (internal).
    """
def lora_record(h: numpy.ndarray, u: numpy.ndarray, delta: numpy.ndarray, w: typing.Any, shared: bool, t_in: numpy.ndarray, t_mid: numpy.ndarray, t_out: numpy.ndarray, t_rms: numpy.ndarray, t_sig: numpy.ndarray, threads: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
    """
    Fold one pass's activations into a layer's tick accumulators (internal; see DynamicLoRALayer.record_interaction).
    """
def lora_update(s0: typing.SupportsInt | typing.SupportsIndex, s1: typing.SupportsInt | typing.SupportsIndex, threads: typing.SupportsInt | typing.SupportsIndex, c: numpy.ndarray, mid: numpy.ndarray, log_mid: numpy.ndarray, threshold: numpy.ndarray, pinned: typing.Any, dec_screened: typing.SupportsFloat | typing.SupportsIndex, dec_free: typing.SupportsFloat | typing.SupportsIndex, A: tuple, B: tuple, entropy: numpy.ndarray, total: numpy.ndarray, finite: typing.Any = None) -> None:
    """
    DynamicLoRA update of slots [s0, s1) of a stacked layer in one pass per matrix (internal; see dynamic_core.learning.lora.layer). A and B are (P, P0, out, phase, dense, terms, col, log_col); writes out, phase, each slot's entropy and total activity, and into `finite` (slots,) bool when given whether all of a slot's updated parameters are finite; `threads` splits the slots.
    """
def lora_xty(X: numpy.ndarray, Y: numpy.ndarray, threads: typing.SupportsInt | typing.SupportsIndex = 1) -> numpy.ndarray:
    """
    X.T @ Y for (n, p) X and (n, q) Y of one dtype: rows in blocks of 32 in order, each block summed row by row, the block sums added in order (internal).
    """
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
def ring_bench(n: typing.SupportsInt | typing.SupportsIndex, capacity: typing.SupportsInt | typing.SupportsIndex = 4096, batch: typing.SupportsInt | typing.SupportsIndex = 64) -> dict:
    """
    ns per element moved between two threads: SpscRing one element per push/pop, SpscRing in runs of `batch` (try_push_n/try_pop_n), and a mutex-guarded std::deque, one element a lock and in runs of `batch` a lock.
    """
def roc(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def rsi(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float64]:
    ...
def score_to_action(score: typing.SupportsFloat | typing.SupportsIndex, weak: typing.SupportsFloat | typing.SupportsIndex = 0.2, strong: typing.SupportsFloat | typing.SupportsIndex = 0.6) -> int:
    """
    Map a score in (-1, 1) to an action code -2..2.
    """
def set_kernel_isa(level: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    For tests and comparisons: use the kernels of `level`, at most what the CPU supports; not while an engine runs. Returns the level in use.
    """
def signal_hashes(signals: numpy.ndarray) -> numpy.typing.NDArray[numpy.uint64]:
    """
    FNV-1a 64 of each signal record: the hash the journal keeps.
    """
def validate_bars(bars: numpy.ndarray, n_registered: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint32]:
    """
    Reject reason of every bar: value checks and time order per (instrument, timeframe).
    """
JOURNAL_FORMAT: int = 2
JOURNAL_MAX_META: int = 1073741824
JOURNAL_MAX_RECORD: int = 67108864
JOURNAL_RECORD_HEADER: int = 24
MAX_PRICE: float = 1000000000000000.0
MIN_PRICE: float = 1e-15
RECORD_MORE: int = 1
SIGNAL_DSI: int = 1
