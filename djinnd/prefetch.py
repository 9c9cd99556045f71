"""Phase hints: a session waiting on I/O leaves the device early and comes back just before it is due.

An agent whose tool is running says so with `signal_phase(IO_WAIT, expected_ms)`. Its KV is then
the first to be swapped out (MemoryManager orders IO_WAIT victims first), at once when memory is
under pressure, and a timer brings it back at

    signal time + expected_ms - lead
    lead = max(1.25 x predicted, recent prefetch durations) + max(20 ms, 5% of expected_ms)

The prediction is a swap-in of its bytes plus the swap-out that may make its room, at a slow
recent throughput (MemoryManager.latencies); the durations the prefetches themselves took (from
their planned start to done: timer lateness, lock waits and evictions included) keep the lead
honest on a loaded machine; the margin grows with the wait, whose own estimate is rough. The wake-up then finds the session resident
(a hit) instead of paying the swap-in on its critical path (a miss). `COMPUTE` brings it back now.

The prefetch only evicts sessions colder than the one it brings back and never waits for room:
when there is none it records a miss and the session's next forward swaps it in on demand as
usual. Wrong or stale signals are harmless: the worst they do is move bytes early or late.

An IO_WAIT lasts until the session computes again: a COMPUTE signal, or its next forward segment
(seen by pre-hooks on the embedding and the decoder layers), which also decides hit or miss. A
prefetched session counts as computing for eviction (its phase turns COMPUTE), or the next
reservation would send it straight back out.

Counters, in MemoryManager.counters (so `status` shows them under "swap"): prefetch_scheduled,
prefetch_done (prefetches that swapped a session in), prefetch_hits, prefetch_misses.
"""

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

from .memory import coldness
from .protocol import DjinnError
from .session import State

COUNTERS = ("prefetch_scheduled", "prefetch_done", "prefetch_hits", "prefetch_misses")
DEFAULT_GBPS = 1.0  # swap throughput assumed until one has been measured


@dataclass
class _Wait:
    """One IO_WAIT with an expected duration, until the session computes again."""
    session: object
    signalled: float  # monotonic seconds
    expected_ms: float
    at: float  # monotonic seconds the prefetch fires
    token: int
    swaps: int | None  # s.swaps when last known resident; None while swapped out. A change means it moved.


class Prefetcher:
    def __init__(self, mem, bus, margin_ms: float = 20.0, margin_frac: float = 0.05, high_water: float = 0.9):
        self.mem, self.bus = mem, bus
        self.margin_ms, self.margin_frac, self.high_water = margin_ms, margin_frac, high_water
        self._durations: deque[float] = deque(maxlen=32)  # ms from a prefetch's planned start to done
        self._waits: dict[int, _Wait] = {}
        self._heap: list[tuple[float, int, int]] = []  # (at, token, session id); stale tokens are skipped
        self._tokens = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="djinn-prefetch", daemon=True)
        for k in COUNTERS:
            mem.count(k, 0)

    def start(self) -> "Prefetcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(2)

    # -- signals ---------------------------------------------------------------------------------
    def io_wait(self, s, expected_ms, signalled: float) -> None:
        """The session waits on I/O: swap it out now under pressure, and plan its prefetch."""
        s.phase = "IO_WAIT"  # first to leave the device
        mem = self.mem
        with mem.lock:
            nbytes = s.stored.nbytes if s.stored is not None else s.charge
            lead = self.lead_ms(nbytes, expected_ms or 0)
            round_trip_pays = expected_ms is None or expected_ms > 2 * lead
            if round_trip_pays and mem.swap_enabled and self.pressure() and s.state in (State.IDLE, State.PAUSED):
                self._swap_out(s)
            swaps = s.swaps if s.stored is None else None
        with self._cond:
            self._waits.pop(s.id, None)  # a second IO_WAIT replaces the first
            if expected_ms is None or s.state == State.RUNNING:
                return
            at = signalled + max(0.0, expected_ms - lead) / 1000
            w = _Wait(s, signalled, expected_ms, at, next(self._tokens), swaps)
            self._waits[s.id] = w
            heapq.heappush(self._heap, (at, w.token, s.id))
            self._cond.notify_all()
        self.mem.count("prefetch_scheduled")
        self._emit(w, "scheduled", (at - signalled) * 1000, lead_ms=round(lead, 3), bytes=nbytes)

    def compute(self, s) -> None:
        """The session computes again: settle its IO_WAIT and bring it back now if it is out."""
        s.phase = "COMPUTE"
        self._settle(s, "compute")
        s.touch()  # about to compute: the last to be evicted of its class
        if s.stored is None:
            return  # resident: a no-op, without waiting on the memory lock (a swap may hold it)
        with self.mem.lock:
            if self.mem.sessions.get(s.id) is s and s.stored is not None:
                self._bring_in(s, "compute")

    # -- hooks and timer -------------------------------------------------------------------------
    def computing(self, s) -> None:
        """A forward segment of `s` starts (or runs on after a breakpoint): its IO_WAIT is over."""
        if s.phase != "IO_WAIT" and s.id not in self._waits:
            return
        self._settle(s, "forward")
        if s.phase == "IO_WAIT":
            s.phase = "COMPUTE"
            self._phase_event(s, "forward")

    def _settle(self, s, via: str) -> None:
        """Count a hit when the session is resident and has not moved since it was last made so."""
        with self._cond:
            w = self._waits.pop(s.id, None)
        if w is None:
            return
        hit = s.stored is None and w.swaps == s.swaps
        self.mem.count("prefetch_hits" if hit else "prefetch_misses")
        self._emit(w, "hit" if hit else "miss", (time.monotonic() - w.signalled) * 1000, via=via)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(min(self._heap[0][0] - time.monotonic(), 3600) if self._heap else None)
                if self._stop:
                    return
                _, token, sid = heapq.heappop(self._heap)
                w = self._waits.get(sid)
                if w is None or w.token != token:
                    continue  # settled or replaced meanwhile
            try:
                self._fire(w)
            except Exception as e:  # noqa: BLE001 - a prefetch must never take the daemon down
                self.bus.emit("error", where="prefetch", session=w.session.id, message=f"prefetch failed: {e!r}")

    def _fire(self, w: _Wait) -> None:
        s, mem = w.session, self.mem
        with mem.lock:
            if mem.sessions.get(s.id) is not s:
                with self._cond:
                    self._waits.pop(s.id, None)
                return
            if s.state == State.RUNNING:
                return  # woke up early: its forward settles the wait
            was_out = s.stored is not None
            ok = self._bring_in(s, "prefetch")
            if ok and was_out:
                self._durations.append((time.monotonic() - w.at) * 1000)
            with self._cond:
                current = self._waits.get(s.id) is w
                if current and ok:
                    w.swaps = s.swaps
                elif current:
                    self._waits.pop(s.id)
            if current and ok and s.phase == "IO_WAIT":
                s.phase = "COMPUTE"  # about to compute: not the first victim any more
                self._phase_event(s, "prefetch")
        at_ms = (time.monotonic() - w.signalled) * 1000
        if not current:
            return
        if ok:
            if was_out:
                self.mem.count("prefetch_done")
            self._emit(w, "done", at_ms, swapped_in=was_out)
        else:  # no room without evicting warmer sessions: the wake-up will pay the swap-in
            self.mem.count("prefetch_misses")
            self._emit(w, "miss", at_ms, via="no_room")

    # -- memory ------------------------------------------------------------------------------------
    def pressure(self) -> bool:  # holding mem.lock
        """The sessions' part of the budget (beside the weights) is fuller than the high-water mark."""
        mem = self.mem
        return mem.used - mem.fixed > self.high_water * (mem.budget - mem.fixed)

    def lead_ms(self, nbytes: int, expected_ms: float = 0) -> float:  # holding mem.lock
        """How long before the expected wake-up to start the prefetch (see the module docstring)."""
        recent = list(self.mem.latencies)[-64:]
        rate_in = _slow([g for d, _, g in recent if d == "in" and g > 0]) or DEFAULT_GBPS
        rate_out = _slow([g for d, _, g in recent if d == "out" and g > 0]) or rate_in
        predicted = nbytes / (rate_in * 1e6) + nbytes / (rate_out * 1e6)  # ms
        took = sorted(self._durations)
        slow_took = took[len(took) * 9 // 10] if took else 0.0
        return max(1.25 * predicted, slow_took) + max(self.margin_ms, self.margin_frac * expected_ms)

    def _swap_out(self, s) -> None:
        try:
            self.mem.swap_out(s, reason="io_wait")
        except DjinnError:
            pass  # reported by the memory manager; the session stays resident

    def _bring_in(self, s, reason: str) -> bool:
        """Swap `s` in, evicting only sessions colder than it and none expected to wake up before it;
        False when that leaves no room. Holds mem.lock."""
        mem = self.mem
        if s.stored is None:
            s.touch()
            return True
        need = s.stored.charge
        # its place in the eviction order as it will be: about to compute (not waiting, not queued), just used
        mine = coldness(SimpleNamespace(phase="COMPUTE", state=State.IDLE, qos=s.qos, last_used=time.monotonic()))
        with self._cond:
            wakes = {sid: w.signalled + w.expected_ms / 1000 for sid, w in self._waits.items()}
        my_wake = wakes.get(s.id, time.monotonic())
        for v in mem._victims(s):
            if mem.used + need <= mem.budget or coldness(v) >= mine:
                break
            if wakes.get(v.id, float("inf")) <= my_wake:
                continue  # back on the device for an earlier wake-up (or never left): evicting it would only cost it
            try:
                mem.swap_out(v, reason=reason)
            except DjinnError:
                continue
        if mem.used + need > mem.budget:
            return False
        try:
            mem.swap_in(s, reason=reason, make_room=False)  # it fits, unless a forward took the room meanwhile
        except DjinnError:
            return False
        s.touch()
        return True

    # -- reporting -----------------------------------------------------------------------------------
    def _emit(self, w: _Wait, action: str, at_ms: float, **extra) -> None:
        self.bus.emit("prefetch", session=w.session.id, action=action, at_ms=round(at_ms, 3),
                      expected_ms=w.expected_ms, **extra)

    def _phase_event(self, s, cause: str) -> None:
        self.bus.emit("session", session=s.id, action="phase", state=s.state, layer=s.layer, qos=s.qos,
                      location=s.location, phase=s.phase, cause=cause)


def _slow(rates):
    """The 10th percentile: a throughput most recent swaps reached."""
    return sorted(rates)[len(rates) // 10] if rates else None
