"""What the console knows about the daemon, built from a snapshot plus the stream (the Clone pattern).

Plain data, no Textual: the app applies messages here and widgets read it when they redraw. Every
apply is O(1) per event so a storm costs little; `version` counters tell widgets whether to redraw.
"""

from collections import deque
from dataclasses import dataclass

HISTORY_SAMPLES = 6000  # ten minutes of `vram` samples at 10 Hz
SWAP_LOG = 5000
KEEP_EVENTS = 100_000  # for exporting what we saw when the daemon's log folder is unknown


@dataclass
class Sample:
    t: float  # seconds on the daemon's monotonic clock
    used: int
    budget: int
    capacity: int


class State:
    def __init__(self):
        self.socket = ""
        self.attached = False
        self.was_attached = False
        self.tried = False  # has the link reported anything yet?
        self.reason = ""  # why we are not attached
        self.reset()

    def reset(self):
        self.seq = 0
        self.lost = 0
        self.status: dict = {}
        self.sessions: dict[int, dict] = {}
        self.samples: deque[Sample] = deque(maxlen=HISTORY_SAMPLES)
        self.last_sample: dict = {}
        self.swaps: deque[dict] = deque(maxlen=SWAP_LOG)
        self.swap_count = 0  # swaps seen since attaching (the log keeps the last SWAP_LOG)
        self.events: deque[dict] = deque(maxlen=KEEP_EVENTS)
        self.runs: dict[int, dict] = {}
        # versions only ever grow (a reset bumps them), so a widget never mistakes new data for old
        v = max(getattr(self, n, 0) for n in ("v_sessions", "v_samples", "v_swaps", "v_runs", "v_status")) + 1
        self.v_sessions = self.v_samples = self.v_swaps = self.v_runs = self.v_status = v

    # -- attaching ---------------------------------------------------------------------------------
    def attach(self, socket: str, snap: dict):
        """Start over from a snapshot: a new daemon has its own seq, so nothing old carries over."""
        self.reset()
        self.socket, self.attached, self.was_attached, self.reason, self.tried = socket, True, True, "", True
        self.seq = snap.get("seq", 0)
        self.status = snap.get("status") or {}
        self.sessions = {s["id"]: dict(s) for s in snap.get("sessions", [])}
        for ev in sorted(snap.get("samples", []) + snap.get("events", []), key=lambda e: e.get("seq", 0)):
            self._apply(ev, from_snapshot=True)
        self.v_status += 1

    def detach(self, socket: str, reason: str):
        self.socket, self.attached, self.reason, self.tried = socket, False, reason, True
        self.v_status += 1

    # -- the stream --------------------------------------------------------------------------------
    def apply(self, events: list[dict], lost: int = 0):
        self.lost += lost
        for ev in events:
            seq = ev.get("seq", 0)
            if seq and seq <= self.seq:
                continue  # the snapshot already held it
            self.seq = max(self.seq, seq)
            self._apply(ev)

    def _apply(self, ev: dict, from_snapshot: bool = False):
        self.events.append(ev)
        kind = ev.get("type")
        if kind == "vram":
            self.last_sample = ev
            self.samples.append(Sample(ev.get("mono_ns", 0) / 1e9, ev.get("used_bytes") or 0,
                                       ev.get("budget_bytes") or 0, ev.get("capacity_bytes") or 0))
            self.v_samples += 1
        elif kind in ("swap_out", "swap_in"):
            self.swaps.append(ev)
            self.swap_count += 1
            self.v_swaps += 1
            self.v_samples += 1  # the plot marks swaps
            s = self.sessions.get(ev.get("session"))
            if s is not None and not from_snapshot:
                tier = ev.get("tier", "host") if kind == "swap_out" else "device"
                s["location"] = tier
                s["last_swap_ms"] = ev.get("ms")
                s["swaps"] = s.get("swaps", 0) + 1
                for k in ("device_bytes", "host_bytes", "disk_bytes"):
                    s[k] = ev.get("bytes", 0) if k.startswith(tier) else 0
                self.v_sessions += 1
        elif kind == "session":
            self._session_event(ev, from_snapshot)
        elif kind == "scenario":
            self._scenario_event(ev)

    def _session_event(self, ev: dict, from_snapshot: bool):
        sid = ev.get("session")
        if ev.get("action") == "closed":
            self.sessions.pop(sid, None)
        elif not from_snapshot or sid in self.sessions:  # the snapshot's session list is newer than its events
            s = self.sessions.setdefault(sid, {"id": sid, "device_bytes": 0, "host_bytes": 0, "disk_bytes": 0,
                                               "swaps": 0, "last_swap_ms": None})
            for k in ("state", "layer", "qos", "location"):
                if k in ev:
                    s[k] = ev[k]
        self.v_sessions += 1

    def _scenario_event(self, ev: dict):
        run = ev.get("run")
        r = self.runs.setdefault(run, {"run": run, "name": ev.get("name"), "status": "running"})
        action = ev.get("action")
        if action == "progress":
            r.update({k: ev[k] for k in ("done", "total", "message") if k in ev})
        elif action in ("finished", "exited", "aborted"):
            r["status"] = ev.get("status") or ("aborted" if action == "aborted" else r["status"])
            if ev.get("output"):
                r["output"] = ev["output"]
            if action == "exited":
                r["exit_code"] = ev.get("exit_code")
                r["exited"] = True
        elif action == "started":
            r["status"] = "running"
            if ev.get("output"):
                r["output"] = ev["output"]
        self.v_runs += 1

    # -- polls and RPC replies ---------------------------------------------------------------------
    def polled(self, status: dict, sessions: list[dict]):
        """The poll's truth; the sessions' version moves only when it differs from what we hold (a poll of
        1,000 idle sessions must not redraw their table every second)."""
        self.status = status
        self.v_status += 1
        fresh = {s["id"]: s for s in sessions}
        if fresh != self.sessions:
            self.sessions = fresh
            self.v_sessions += 1

    def add_runs(self, runs: list[dict]):
        for r in runs:
            cur = self.runs.setdefault(r["run"], {})
            cur.update({k: r[k] for k in ("run", "name", "output", "status", "exit_code") if k in r})
        self.v_runs += 1

    # -- views ---------------------------------------------------------------------------------------
    def swaps_of(self, sid) -> list[dict]:
        return [e for e in self.swaps if e.get("session") == sid]

    def now(self) -> float:
        """The daemon's clock as far as we know it: the newest sample's time."""
        return self.samples[-1].t if self.samples else 0.0
