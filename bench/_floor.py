"""The transport floor under a request/reply path: a bare pyzmq ROUTER -> DEALER echo over
loopback, one message at a time, with no protocol, no encoding and no state. Shared by the
benches whose figures ride on such a hop (the MT5 bridge's round trip; the reasoning broker's
round trip to an adapter process), so they print what the hop alone costs on the same machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

__all__ = ["echo", "pingpong_floor"]


def echo(address: str, ctx=None) -> None:
    """The echo side: connect a DEALER to ``address``, say hello, echo until ``q`` (in a thread
    with the caller's context, or as ``python -m bench._floor ADDRESS`` in its own process)."""
    import zmq

    own = ctx is None
    ctx = zmq.Context() if own else ctx
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(address)
    d.send(b"hi")
    while True:
        m = d.recv()
        if m == b"q":
            break
        d.send(m)
    d.close()
    if own:
        ctx.term()


def pingpong_floor(n: int = 3000, warmup: int = 500, *, process: bool = False, size: int = 200) -> dict:
    """p50/p99 (us) of a ``size``-byte frame ROUTER -> DEALER -> ROUTER over loopback TCP, one
    at a time; the DEALER is a thread of this process, or with ``process`` another Python
    process (the reasoning adapters' layout)."""
    import numpy as np
    import zmq

    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.setsockopt(zmq.RCVTIMEO, 30_000)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    child = th = None
    if process:
        child = subprocess.Popen([sys.executable, "-m", "bench._floor", address],
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    else:
        th = threading.Thread(target=echo, args=(address, ctx), daemon=True)
        th.start()
    try:
        ident, _ = r.recv_multipart()
        out = []
        payload = b"x" * size
        for i in range(warmup + n):
            t0 = time.perf_counter_ns()
            r.send_multipart([ident, payload])
            r.recv_multipart()
            if i >= warmup:
                out.append((time.perf_counter_ns() - t0) / 1e3)
        r.send_multipart([ident, b"q"])
    finally:
        if th is not None:
            th.join(5)
        if child is not None:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        r.close()
        ctx.term()
    a = np.array(out)
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "n": n,
            "echo": "process" if process else "thread"}


if __name__ == "__main__":
    echo(sys.argv[1])
