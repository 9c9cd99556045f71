"""Who runs on the device next: one forward segment at a time, highest QoS class first."""

import heapq
import itertools
import threading
import time

QOS_CLASSES = ("realtime", "interactive", "batch")
_RANK = {"realtime": 0, "interactive": 1, "batch": 2}


class DeviceLock:
    """A lock granted by QoS class, first come first served within a class.

    `fcfs=True` ignores the classes (the baseline a QoS run is compared with). A waiter older than
    `escalation_s` is served ahead of its class, so batch work is never starved.
    """

    def __init__(self, fcfs: bool = False, escalation_s: float | None = None):
        self.fcfs, self.escalation_s = fcfs, escalation_s
        self._cond = threading.Condition()
        self._held = False
        self._owner: int | None = None
        self._waiting: list = []
        self._order = itertools.count()

    def _key(self, qos: str, arrived: float, n: int):
        rank = 0 if self.fcfs else _RANK.get(qos, 1)
        return (rank, arrived, n)

    def acquire(self, qos: str = "interactive") -> None:
        with self._cond:
            me = self._key(qos, time.monotonic(), next(self._order))
            heapq.heappush(self._waiting, me)
            while self._held or self._first() != me:
                self._cond.wait(0.05 if self.escalation_s else None)
            heapq.heappop(self._waiting) if self._waiting[0] == me else self._waiting.remove(me)
            heapq.heapify(self._waiting)
            self._held, self._owner = True, threading.get_ident()

    def held_by_me(self) -> bool:
        return self._held and self._owner == threading.get_ident()

    def _first(self):
        """The waiter to serve next: an escalated one (oldest first) before the class order."""
        if self.escalation_s is not None:
            now = time.monotonic()
            late = [w for w in self._waiting if now - w[1] >= self.escalation_s]
            if late:
                return min(late, key=lambda w: w[1])
        return self._waiting[0]

    def release(self) -> None:
        with self._cond:
            self._held, self._owner = False, None
            self._cond.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
