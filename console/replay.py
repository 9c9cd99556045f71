"""djinn-console --replay: a finished run's events, scrubbed with a cursor, no daemon.

The run's events are read once and kept in time order; `Replay.seek` feeds the console's own State
the events up to the cursor (forward: only the new ones; backward: from the start again, a fraction
of a second for 100k events), so the Overview's widgets draw the run as it stood at that instant.
"""

import sys
from bisect import bisect_left, bisect_right
from datetime import timedelta
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding

from djinnd import parse_ts, read_events

from .screens.replay import ReplayHelp, ReplayScreen
from .state import State

# steps and plot windows, in seconds: 1-2-5 up to a second, then what a clock shows
LADDER = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
MAX_WINDOW = 600  # State keeps ten minutes of samples


class ReplayError(Exception):
    """A path that cannot be replayed; the message is the one line the user sees."""


def load_events(path) -> list[dict]:
    """The events of a run folder (its events.jsonl), a daemon log folder or a JSONL file, in time order.

    Events without `mono_ns` cannot be placed on the timeline and are left out. The sort is stable:
    a daemon's events keep their seq order (mono_ns is stamped with seq), a scenario's own fall in
    between by time.
    """
    try:
        events = [e for e in read_events(Path(path)) if isinstance(e.get("mono_ns"), int)]
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file or folder") from None
    except (OSError, EOFError) as e:  # unreadable, or a truncated .gz
        raise ReplayError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    if not events:
        points = sorted(str(f.parent) for f in Path(path).glob("*/events.jsonl"))
        if points:
            raise ReplayError(f"{path}: a sweep; replay one of its points: {' '.join(points)}")
        raise ReplayError(f"{path}: no events to replay (give a run folder with events.jsonl, or a JSONL events file)")
    events.sort(key=lambda e: e["mono_ns"])
    return events


def fit(seconds: float, cap: float) -> float:
    """The smallest ladder value at least `seconds`, at most `cap`."""
    return min(next((v for v in LADDER if v >= seconds), LADDER[-1]), cap)


class ReplayState(State):
    """State as it stood at the cursor, plus the run-so-far figures the daemon's `status` would give live."""

    def reset(self):
        super().reset()
        self.at = 0.0  # the cursor, in seconds on the run's monotonic clock
        self.peak = 0
        self.created = 0
        self.moved = {"swap_out": [0, 0], "swap_in": [0, 0]}  # count, bytes
        self.latencies: list[float] = []

    def now(self) -> float:
        """The plot's right edge is the cursor, not the newest sample before it."""
        return self.at

    def _apply(self, ev: dict, from_snapshot: bool = False):
        kind = ev.get("type")
        sid = ev.get("session")
        if kind in ("swap_out", "swap_in") and sid is not None and sid not in self.sessions:
            # a log that starts mid-run: the swap proves the session exists, its state is unknown until it says
            self.sessions[sid] = {"id": sid, "swaps": 0, "last_swap_ms": None}
        super()._apply(ev, from_snapshot)
        if kind in ("swap_out", "swap_in"):
            self.moved[kind][0] += 1
            self.moved[kind][1] += ev.get("bytes") or 0
            if ev.get("ms") is not None:
                self.latencies.append(ev["ms"])
        elif kind == "vram":
            self.peak = max(self.peak, ev.get("used_bytes") or 0)
        elif kind == "session" and ev.get("action") == "created":
            self.created += 1


class Replay:
    """A recorded run and a cursor on it (ns from its first event); `state` is the run at the cursor.

    It opens at the end: a finished run's whole picture, scrubbed back from there.
    """

    def __init__(self, path, events: list[dict]):
        self.path = str(path)
        self.events = events
        self.times = [e["mono_ns"] for e in events]
        self.swap_times = [e["mono_ns"] for e in events if e.get("type") in ("swap_out", "swap_in")]
        self.t0 = self.times[0]
        self.end = self.times[-1] - self.t0
        self.state = ReplayState()
        self.applied = 0  # events[:applied] are in the state
        self.cursor = 0
        seconds = self.end / 1e9
        self.step = fit(seconds / 100, cap=1)  # about a hundred steps across a short run, a second on a long one
        self.window = fit(seconds, cap=MAX_WINDOW)
        self.seek(self.end)

    @classmethod
    def load(cls, path) -> "Replay":
        return cls(path, load_events(path))

    def seek(self, cursor: int) -> None:
        """Move the cursor (ns from the start, clamped to the run); the state then holds the events up to it."""
        self.cursor = min(max(round(cursor), 0), self.end)
        upto = bisect_right(self.times, self.t0 + self.cursor)
        if upto < self.applied:
            self.state.reset()
            self.applied = 0
        for ev in self.events[self.applied:upto]:
            self.state._apply(ev)
        self.applied = upto
        self.state.at = (self.t0 + self.cursor) / 1e9

    def move(self, steps: float) -> None:
        self.seek(self.cursor + steps * self.step * 1e9)

    def next_swap(self, direction: int) -> bool:
        """Put the cursor on the next (1) or previous (-1) swap; False when there is none that way."""
        here = self.t0 + self.cursor
        if direction > 0:
            i = bisect_right(self.swap_times, here)
        else:
            i = bisect_left(self.swap_times, here) - 1
        if not 0 <= i < len(self.swap_times):
            return False
        self.seek(self.swap_times[i] - self.t0)
        return True

    def change_step(self, direction: int) -> None:
        """One rung finer (-1) or coarser (1) on the ladder."""
        i = LADDER.index(self.step) + direction
        self.step = LADDER[min(max(i, 0), len(LADDER) - 1)]

    def zooms(self) -> list[float]:
        """Plot windows to cycle through: the one that fits the run, then three closer ones."""
        fitting = fit(self.end / 1e9, cap=MAX_WINDOW)
        return [fitting] + [w for w in LADDER if w < fitting][-3:][::-1]

    def zoom(self) -> float:
        ws = self.zooms()
        self.window = ws[(ws.index(self.window) + 1) % len(ws)]
        return self.window

    def wall(self) -> str:
        """The cursor as a UTC clock time: the last event's stamp before it, plus the monotonic time since."""
        ev = self.events[max(self.applied - 1, 0)]
        t = parse_ts(ev.get("ts"))
        if t is None:
            return "--:--:--.---"
        t += timedelta(microseconds=(self.t0 + self.cursor - ev["mono_ns"]) / 1000)
        return t.strftime("%H:%M:%S.%f")[:-3]

    def seconds(self, ns: int) -> str:
        """ns as seconds, with as many decimals as the step needs."""
        places = 1 if self.step >= 0.1 else 2 if self.step >= 0.01 else 3
        return f"{ns / 1e9:.{places}f} s"

    def milestones(self) -> list[tuple[int, str]]:
        """(cursor, label) of the scenario's own events: started, each progress message, finished."""
        out = []
        for e in self.events:
            if e.get("type") == "scenario" and e.get("action") in ("started", "progress", "finished"):
                label = e.get("message") or f"{e.get('name', 'run')} {e['action']}"
                out.append((e["mono_ns"] - self.t0, label + (f" ({e['status']})" if e.get("status") else "")))
        return out


class ReplayConsole(App):
    """One finished run, no daemon: the replay screen, its help, the palette."""

    TITLE = "djinn-console replay"
    CSS_PATH = "console.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    BINDINGS = [Binding("q", "quit", "quit")]

    def __init__(self, replay: Replay):
        super().__init__()
        self.replay = replay
        self.state = replay.state  # the widgets shared with the live console read app.state

    def get_default_screen(self) -> ReplayScreen:
        return ReplayScreen(self.replay)

    def action_help(self) -> None:
        if not isinstance(self.screen, ReplayHelp):
            self.push_screen(ReplayHelp())

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "the replay's keys (?)", self.action_help)


def main(path) -> int:
    """`djinn-console --replay PATH`: 2 and one line on stderr when PATH holds no run."""
    try:
        replay = Replay.load(path)
    except ReplayError as e:
        print(f"djinn-console: {e}", file=sys.stderr)
        return 2
    ReplayConsole(replay).run()
    return 0
