"""A doorbell for threads that block in ``zmq.Poller.poll``: the reasoning mesh's broker and both
ends of the MT5 bridge hand work to their socket thread through a deque and ring this."""

from __future__ import annotations

import os
import sys

__all__ = ["Doorbell"]


class Doorbell:
    """Wakes a thread blocked in ``zmq.Poller.poll`` from any other thread (an eventfd on Linux,
    a pipe elsewhere). ``ring`` is one syscall at most, and none while a ring is pending."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
        self.pending = False

    def ring(self) -> None:
        if not self.pending:
            self.pending = True
            try:
                os.write(self.wfd, (1).to_bytes(8, sys.byteorder))
            except OSError:
                pass

    def clear(self) -> None:
        try:
            os.read(self.rfd, 8 if self.rfd == self.wfd else 4096)
        except OSError:
            pass
        self.pending = False  # after the read: a ring() in between would otherwise be lost

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            try:
                os.close(fd)
            except OSError:
                pass
