"""Who runs on the device next.

A forward segment (a forward from its start, or from a resume, to its end or its next breakpoint)
holds one of `max_concurrency` device slots. When a slot frees, the lock itself picks the waiter
to hand it to, in this order:

1. `fcfs`: the oldest waiter, classes ignored (the baseline a QoS run is compared with).
2. escalation: a waiter older than `escalation_s`, oldest first, ahead of every class, so batch
   work is never starved.
3. the class: strict priority realtime > interactive > batch; or, with `shares`, the class with
   the least device time per unit of share (stride scheduling, below).
4. within the class: short segments (a decode step, a resume) before long ones (a prompt's
   prefill), so a session waking from a tool call does not queue behind new arrivals; among the
   short, with `wake_first`, a session's first forward after it signalled IO_WAIT before the
   other sessions' steps, as an OS scheduler favours a task that wakes from I/O: the
   wake-up is what an agent waits on, and each wake-up jumps the queue once; then oldest first;
   with `lifo`, newest first while overloaded (more waiters than slots): under overload the oldest
   are late already, and serving the newest keeps more on time.

Decode steps batch (`max_batch` > 1): a step waits as a `join`er, and when the policy hands a
slot to one, it also takes along up to `max_batch` - 1 other waiting steps, picked by the same
policy (so classes and shares decide who rides when more wait than fit), and that thread runs
them all as one forward. A step that arrives while a batch runs waits for the next grant.

Shares (stride scheduling by class): each class has a `pass`, advanced on release by the device
time its segment held divided by its share, and the class with the lowest pass goes next (ties by
priority). A class that had nothing queued starts again at the pass of the last class served, so
an idle class banks no credit. Classes that ask for less than their share are served at once;
those that ask for more split the device in proportion to their shares.
"""

import collections
import itertools
import threading
import time

QOS_CLASSES = ("realtime", "interactive", "batch")
_SETTINGS = ("fcfs", "escalation_s", "shares", "max_concurrency", "lifo", "wake_first", "max_batch")
QOS_RANK = {c: i for i, c in enumerate(QOS_CLASSES)}  # 0: the most urgent


def parse_shares(text: str) -> dict[str, float]:
    """`realtime=0.1,interactive=0.7,batch=0.2` -> shares normalised to sum 1; ValueError if bad."""
    shares = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in QOS_RANK:
            raise ValueError(f"bad share {part!r}: write CLASS=WEIGHT with CLASS one of {', '.join(QOS_CLASSES)}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"bad share {part!r}: {value.strip()!r} is not a number") from None
        if not w > 0 or w == float("inf"):
            raise ValueError(f"bad share {part!r}: the weight must be a positive number")
        shares[name] = w
    missing = [c for c in QOS_CLASSES if c not in shares]
    if missing:
        raise ValueError(f"give a share for every class (missing: {', '.join(missing)})")
    total = sum(shares.values())
    return {c: shares[c] / total for c in QOS_CLASSES}


class _Waiter:
    __slots__ = ("qos", "arrived", "n", "short", "waking", "granted", "row", "rows", "classes", "taken")

    def __init__(self, qos: str, arrived: float, n: int, short: bool, waking: bool = False, row=None):
        self.qos, self.arrived, self.n, self.short, self.granted = qos, arrived, n, short, False
        self.waking = short and waking
        self.row = row  # a decode step's payload: it may run in another's batch
        self.rows = None  # granted a joiner: the rows its batch runs, its own first
        self.classes = None  # and theirs
        self.taken = False  # run in another joiner's batch


class DeviceLock:
    """A lock of `max_concurrency` slots granted by QoS class (see the module docstring)."""

    def __init__(self, fcfs: bool = False, escalation_s: float | None = None, shares: dict | None = None,
                 max_concurrency: int = 1, lifo: bool = False, wake_first: bool = True, max_batch: int = 1,
                 gather_s: float = 0.001, clock=time.monotonic):
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError("max_concurrency must be an int >= 1")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError("max_batch must be an int >= 1")
        if not all(isinstance(v, bool) for v in (fcfs, lifo, wake_first)):
            raise ValueError("fcfs, lifo and wake_first must be true or false")
        if shares is not None and (set(shares) != set(QOS_CLASSES) or not all(v > 0 for v in shares.values())):
            raise ValueError(f"shares must give a positive weight to each of {', '.join(QOS_CLASSES)}")
        self.fcfs, self.escalation_s, self.shares = fcfs, escalation_s, shares
        self.max_concurrency, self.lifo, self.wake_first, self._clock = max_concurrency, lifo, wake_first, clock
        self.max_batch, self.gather_s = max_batch, gather_s
        self._cond = threading.Condition()
        self._waiting: list[_Waiter] = []
        self._holders: dict[int, tuple[_Waiter, float]] = {}  # thread id -> (its request, granted at)
        self._in_flight = 0  # granted slots, counted from the grant (before the thread wakes)
        self._order = itertools.count()
        self._pass = {c: 0.0 for c in QOS_CLASSES}
        self._vtime = 0.0  # the pass of the class served last
        self.served = {c: 0 for c in QOS_CLASSES}
        self.busy_s = {c: 0.0 for c in QOS_CLASSES}
        self.handovers = 0
        self.wake_jumps = 0  # grants to a waking step ahead of an older step of its class
        self.batches = {"forwards": 0, "rows": 0, "largest": 0}  # decode forwards and the steps they ran
        self._row_s = 0.0  # device time of a batch row, recently: what a rider costs its class's pass
        self._recent = collections.deque(maxlen=2)  # the rows of the last two decode batches

    def configure(self, **settings) -> dict:
        """Change any of _SETTINGS on a live lock (a scenario's A/B run); waiters already queued are
        chosen by the new policy from the next grant on."""
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise ValueError(f"unknown scheduler setting(s): {', '.join(sorted(unknown))}")
        probe = {k: getattr(self, k) for k in _SETTINGS}
        DeviceLock(**{**probe, **settings})  # validates
        with self._cond:
            for k, v in settings.items():
                setattr(self, k, v)
            self._dispatch()
        return self.figures()

    def acquire(self, qos: str = "interactive", short: bool = True, wait: bool = True, waking: bool = False) -> bool:
        """Take a slot, waiting for the policy to grant one; with wait=False only if one is free and
        nobody waits (False otherwise: the caller must not block). `waking`: the session's first
        step after a tool wait."""
        with self._cond:
            if not wait and (self._waiting or self._in_flight >= self.max_concurrency):
                return False
            self._queue(_Waiter(qos, self._clock(), next(self._order), short, waking))
        return True

    def join(self, row, qos: str = "interactive", waking: bool = False) -> list | None:
        """Queue the decode step `row`. The rows this thread is to run as one forward (its own first),
        holding a slot it must `release(classes)`; or None when another joiner's batch took it."""
        with self._cond:
            me = self._queue(_Waiter(qos, self._clock(), next(self._order), True, waking, row))
            if me.granted:
                self._gather(me)
        return me.rows if me.granted else None

    def _gather(self, me: _Waiter) -> None:  # holding _cond and the slot
        """Token-by-token clients split into cohorts that take turns: the steps that come back while
        a batch runs wait for the next one. A batch waits up to `gather_s` for the steps of the
        sessions in either of the last two batches (their replies were just sent; they are on
        their way), so that they share this forward instead of the next."""
        deadline = self._clock() + self.gather_s
        want = min(self.max_batch, len(set().union(*self._recent)))
        while len(me.rows) < want:
            left = deadline - self._clock()
            if left <= 0:
                break
            self._cond.wait(left)
            if self._take_riders(me):
                self._cond.notify_all()  # they wake to find themselves taken
        self._recent.append({id(r) for r in me.rows})

    def _queue(self, me: _Waiter) -> _Waiter:  # holding _cond
        if me.qos not in QOS_RANK:
            me.qos = "interactive"
        if self.shares and not self._active(me.qos):
            self._pass[me.qos] = max(self._pass[me.qos], self._vtime)
        self._waiting.append(me)
        self._dispatch()
        if me.row is not None:
            self._cond.notify_all()  # a leader gathering its batch takes it
        self._wait_for(me)
        return me

    def _wait_for(self, me: _Waiter) -> None:
        while not (me.granted or me.taken):
            self._cond.wait()
        if me.granted:
            self._holders[threading.get_ident()] = (me, self._clock())

    def release(self, classes: list[str] | None = None) -> None:
        """Give the slot back; `classes`: a decode batch's rows, by class, which share its device time."""
        with self._cond:
            self._release(classes)

    def _release(self, classes: list[str] | None = None) -> None:
        held = self._holders.pop(threading.get_ident(), None)
        if held is None:
            raise RuntimeError("release of a DeviceLock slot this thread does not hold")
        me, since = held
        dt = max(0.0, self._clock() - since)
        if classes:
            b = self.batches
            b["forwards"] += 1
            b["rows"] += len(classes)
            b["largest"] = max(b["largest"], len(classes))
            self._row_s = 0.8 * self._row_s + 0.2 * dt / len(classes) if self._row_s else dt / len(classes)
        for c in classes or [me.qos]:
            share = dt / len(classes or [me.qos])
            self.busy_s[c] += share
            if self.shares:
                self._pass[c] += share / self.shares[c]
        self._in_flight -= 1
        self._dispatch()

    def hand_over(self) -> bool:
        """Called between two layers of a long segment (a prefill): when a waiter that the policy
        puts first is queued (a decode step, another class; never under fcfs, the non-preemptive
        baseline), give it the slot and queue again in this segment's own place. True if it did.

        A layer is the unit of preemption: the segment's computation is unchanged, so its results
        are bit for bit the same, only later.
        """
        if self.fcfs or not self._waiting:  # an unlocked peek: a stale answer costs one layer's delay
            return False
        with self._cond:
            held = self._holders.get(threading.get_ident())
            if held is None or not self._waiting:
                return False
            me = held[0]
            me.granted, me.arrived = False, self._clock()  # it was just served: not late
            self._waiting.append(me)
            first = self._pick(self._waiting, self._pass)
            if first is me or not (first.short or first.qos != me.qos):  # never to a peer long segment
                self._waiting.remove(me)
                me.granted = True
                return False
            self.handovers += 1
            self._release()  # frees this slot and grants it to `first`; `me` waits in its place
            self._wait_for(me)
        return True

    def held_by_me(self) -> bool:
        with self._cond:
            return threading.get_ident() in self._holders

    def figures(self) -> dict:
        """The policy and its counters, for `status`."""
        with self._cond:
            policy = "fcfs" if self.fcfs else "shares" if self.shares else "priority"
            return {"policy": policy, "max_concurrency": self.max_concurrency, "max_batch": self.max_batch,
                    "batches": dict(self.batches), "lifo": self.lifo,
                    "wake_first": self.wake_first,
                    "escalation_ms": None if self.escalation_s is None else self.escalation_s * 1000,
                    "shares": dict(self.shares) if self.shares else None, "in_flight": self._in_flight,
                    "waiting": {c: sum(w.qos == c for w in self._waiting) for c in QOS_CLASSES},
                    "served": dict(self.served), "busy_s": {c: round(v, 6) for c, v in self.busy_s.items()},
                    "handovers": self.handovers, "wake_jumps": self.wake_jumps}

    # -- choosing ----------------------------------------------------------------------------------
    def _active(self, qos: str) -> bool:
        return any(w.qos == qos for w in self._waiting) or any(w.qos == qos for w, _ in self._holders.values())

    def _dispatch(self) -> None:
        """Hand free slots to the chosen waiters; they wake and find themselves granted (or taken)."""
        granted = False
        while self._in_flight < self.max_concurrency and self._waiting:
            w = self._pick(self._waiting, self._pass)
            self._serve(w)
            w.granted, granted = True, True
            self._in_flight += 1
            if w.row is not None:
                w.rows, w.classes = [w.row], [w.qos]
                self._take_riders(w)
        if granted:
            self._cond.notify_all()

    def _serve(self, w: _Waiter) -> None:
        self._waiting.remove(w)
        if w.waking and any(o.qos == w.qos and o.short and o.n < w.n for o in self._waiting):
            self.wake_jumps += 1
        self.served[w.qos] += 1
        if self.shares:
            self._vtime = max(self._vtime, self._pass[w.qos])

    def _take_riders(self, leader: _Waiter) -> bool:
        """Fill the leader's batch with waiting decode steps, in the policy's order; with shares each
        row advances its class's pass (on a copy) by a row's recent device time, so that a full batch
        splits between classes as the device does."""
        passes, taken = dict(self._pass), False
        for c in leader.classes if self.shares else ():
            passes[c] += self._row_s / self.shares[c]
        while len(leader.rows) < self.max_batch:
            ws = [w for w in self._waiting if w.row is not None]
            if not ws:
                break
            w = self._pick(ws, passes)
            self._serve(w)
            w.taken = True
            leader.rows.append(w.row)
            leader.classes.append(w.qos)
            taken = True
            if self.shares:
                passes[w.qos] += self._row_s / self.shares[w.qos]
        return taken

    def _pick(self, ws: list[_Waiter], passes: dict) -> _Waiter:
        if not self.fcfs:
            if self.escalation_s is not None:
                now = self._clock()
                late = [w for w in ws if now - w.arrived >= self.escalation_s]
                if late:
                    return min(late, key=lambda w: w.n)
            present = {w.qos for w in ws}
            if self.shares:
                cls = min(present, key=lambda c: (passes[c], QOS_RANK[c]))
            else:
                cls = min(present, key=QOS_RANK.__getitem__)
            ws = [w for w in ws if w.qos == cls]
            if any(w.short for w in ws):
                ws = [w for w in ws if w.short]
            if self.wake_first and any(w.waking for w in ws):
                ws = [w for w in ws if w.waking]
        newest_first = self.lifo and len(self._waiting) > self.max_concurrency
        return (max if newest_first else min)(ws, key=lambda w: w.n)
