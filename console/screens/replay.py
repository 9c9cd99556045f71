"""The replay screen: the Overview's plot, gauges, sessions and swap log, drawn at a cursor on a finished run.

It reads `app.replay` (console/replay.py): the keys move its cursor, then `show` redraws. Facts and the
status line are its own, since a replay has no daemon `status` to show, only what the events say.
"""

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Footer, Markdown, Static

from djinnd import percentile

from ..fmt import ms, size
from ..widgets.panels import Gauge, SwapLog
from ..widgets.plot import VramPlot
from ..widgets.sessions import SessionsTable

PLAY_EVERY = 0.1  # seconds between steps while playing: ten steps a second

HELP = """\
# djinn-console --replay

A finished run, from its events alone: the plot, the sessions and the swap log as they stood at the
cursor, which is the plot's right edge. It opens at the end of the run.

- `←` `→` one step back / forward, `shift+←` `shift+→` ten steps
- `[` `]` previous / next swap
- `home` `end` start / end of the run; a click on the timeline puts the cursor there
- `space` play / pause, ten steps a second
- `-` `+` finer / coarser step (the timeline shows it)
- `z` plot window: the whole run, or closer
- `↑` `↓` scroll the sessions
- `ctrl+p` these actions, and a jump to each step the scenario reported
- `?` this help, `q` quit

A session's state is its last session event's, its place the last swap's or session event's, its
bytes the last swap's (– until it has swapped once).
"""

STEP = Binding.Group("step", compact=True)
JUMP = Binding.Group("×10", compact=True)
SWAP = Binding.Group("swap", compact=True)
ENDS = Binding.Group("")
SCALE = Binding.Group("step size", compact=True)


class ReplayBar(Static):
    """One line at the top: which run, where the cursor is on its clock and on the wall clock."""

    DEFAULT_CSS = """
    ReplayBar { dock: top; height: 1; background: $panel; color: $foreground; padding: 0 1;
                text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def show(self, replay) -> None:
        self.update(f"replay of {replay.path} · {replay.seconds(replay.cursor)} of {replay.seconds(replay.end)} · "
                    f"{replay.wall()} UTC")


class Timeline(Widget):
    """The run as one line, `▶ step 1 s ━━━━━●─────`: played part, cursor, rest. A click seeks."""

    DEFAULT_CSS = """
    Timeline { height: 1; padding: 0 1; }
    Timeline > .timeline--done { color: $accent; }
    Timeline > .timeline--rest { color: $foreground 30%; }
    """
    COMPONENT_CLASSES = {"timeline--done", "timeline--rest"}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.frac, self.label = 0.0, ""

    def set(self, frac: float, label: str) -> None:
        if (frac, label) != (self.frac, self.label):
            self.frac, self.label = frac, label
            self.refresh()

    def bar_width(self) -> int:
        return max(2, self.content_size.width - len(self.label) - 1)

    def render(self) -> Text:
        w = self.bar_width()
        at = round(self.frac * (w - 1))
        t = Text(self.label + " ", no_wrap=True)
        t.append("━" * at, self.get_component_rich_style("timeline--done"))
        t.append("●", "bold")
        t.append("─" * (w - at - 1), self.get_component_rich_style("timeline--rest"))
        return t

    def on_click(self, event) -> None:
        at = event.get_content_offset(self)
        x = -1 if at is None else at.x - len(self.label) - 1
        if 0 <= x < self.bar_width():
            self.screen.seek_fraction(x / max(1, self.bar_width() - 1))


class ReplayFacts(Static):
    """The run so far: scenario and its progress, peak, swaps and their latency, sessions, events."""

    DEFAULT_CSS = "ReplayFacts { text-wrap: nowrap; text-overflow: ellipsis; }"

    def show(self, replay) -> None:
        st = replay.state
        run = next(reversed(st.runs.values()), None)
        (outs, out_b), (ins, in_b) = st.moved["swap_out"], st.moved["swap_in"]
        rows = [("run", "no scenario events" if run is None else
                 f"{run.get('name')} · {run.get('status')}" +
                 (f" {run['done']}/{run['total']}" if run.get("total") else "")),
                ("progress", (run or {}).get("message") or "–"),
                ("peak", f"{size(st.peak)} of {size((st.last_sample or {}).get('budget_bytes'))}"),
                ("swaps", f"{outs}▼ {size(out_b)} · {ins}▲ {size(in_b)}"),
                ("latency", f"p50 {ms(percentile(st.latencies, 50))} · max {ms(max(st.latencies, default=None))}"),
                ("sessions", f"{len(st.sessions)} open · {st.created} created"),
                ("events", f"{replay.applied} of {len(replay.events)}")]
        t = Text(no_wrap=True, overflow="ellipsis")
        for i, (k, v) in enumerate(rows):
            t.append(f"{k:<9}", "bold")
            t.append(v + ("\n" if i < len(rows) - 1 else ""))
        self.update(t)


class ReplayPlot(VramPlot):
    """The VRAM plot drawn at the cursor itself. The live plot skips a redraw while time stays within one dot
    column; scrubbed a second at a time, that plot would lag the cursor and put its swap marks a cell off."""

    def show(self, state) -> None:
        self.now = state.now()
        t0 = self.now - self.window
        self.samples = [s for s in state.samples if s.t >= t0 - 1]
        self.markers = [(e["mono_ns"] / 1e9, e["type"]) for e in state.swaps if e["mono_ns"] / 1e9 >= t0]
        self.refresh()


class ReplaySessions(SessionsTable):
    """The sessions table; a session's bytes are known only from its swaps, so none yet shows –, not 0 B."""

    def show(self, state) -> None:
        super().show(state)
        for sid, s in state.sessions.items():
            key = str(sid)
            if (key in self.rows and not any(s.get(k) for k in ("device_bytes", "host_bytes", "disk_bytes"))
                    and str(self.get_cell(key, "bytes")) != "–"):
                self.update_cell(key, "bytes", Text("–", justify="right"))


class ReplayCommands(Provider):
    """Palette entries for the replay: its actions, and a jump to each step the scenario reported."""

    def entries(self) -> list[tuple[str, object, str]]:
        screen = self.screen
        if not isinstance(screen, ReplayScreen):
            return []
        replay = screen.replay
        out = [("replay: play / pause", screen.action_play, "ten steps a second (space)"),
               ("replay: go to the start", lambda: screen.action_seek(0), "home"),
               ("replay: go to the end", lambda: screen.action_seek(replay.end), "end"),
               ("replay: next swap", lambda: screen.action_swap(1), "]"),
               ("replay: previous swap", lambda: screen.action_swap(-1), "["),
               ("replay: finer step", lambda: screen.action_scale(-1), "-"),
               ("replay: coarser step", lambda: screen.action_scale(1), "+"),
               ("replay: zoom the plot", screen.action_zoom, "the whole run, or closer (z)")]
        out += [(f"replay: go to {replay.seconds(t)} · {label}", lambda t=t: screen.action_seek(t), "scenario step")
                for t, label in replay.milestones()]
        return out

    async def discover(self) -> Hits:
        for text, fn, help_text in self.entries():
            yield DiscoveryHit(text, fn, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, fn, help_text in self.entries():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), fn, help=help_text)


class ReplayScreen(Screen):
    COMMANDS = {ReplayCommands}
    BINDINGS = [
        # priority: the sessions table has focus and would take these for its own cursor
        Binding("left", "move(-1)", "back", key_display="←", priority=True, group=STEP),
        Binding("right", "move(1)", "forward", key_display="→", priority=True, group=STEP),
        Binding("shift+left", "move(-10)", "10 back", key_display="⇧←", priority=True, group=JUMP),
        Binding("shift+right", "move(10)", "10 forward", key_display="⇧→", priority=True, group=JUMP),
        Binding("left_square_bracket", "swap(-1)", "previous swap", key_display="[", group=SWAP),
        Binding("right_square_bracket", "swap(1)", "next swap", key_display="]", group=SWAP),
        Binding("home", "seek(0)", "start", priority=True, group=ENDS),
        Binding("end", "seek_end", "end", priority=True, group=ENDS),
        Binding("space", "play", "play", priority=True),
        Binding("question_mark", "app.help", "help", key_display="?"),  # here, not the app's: early in the footer
        Binding("minus", "scale(-1)", "finer", key_display="-", group=SCALE),
        Binding("plus,equals_sign", "scale(1)", "coarser", key_display="+", group=SCALE),
        Binding("z", "zoom", "zoom"),
    ]

    def __init__(self, replay):
        super().__init__()
        self.replay = replay
        self.playing = False

    def compose(self) -> ComposeResult:
        yield ReplayBar()
        with Vertical(id="main"):
            with Horizontal(id="top"):
                yield ReplayPlot(id="plot", window=self.replay.window)
                with Vertical(id="side"):
                    yield Gauge("device", id="g-device")
                    yield Gauge("host", id="g-host")
                    yield Gauge("disk", id="g-disk")
                    yield ReplayFacts(id="facts")
            with Horizontal(id="bottom"):
                yield ReplaySessions(id="sessions")
                yield SwapLog(id="swaplog")
        yield Timeline(id="timeline")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#plot").border_title = "device memory"
        self.query_one("#side").border_title = "the run so far"
        self.player = self.set_interval(PLAY_EVERY, self.play_step, pause=True)
        self.show()

    def show(self) -> None:
        r, state = self.replay, self.replay.state
        self.query_one(ReplayBar).show(r)
        plot = self.query_one(ReplayPlot)
        plot.window = r.window
        plot.show(state)
        s = state.last_sample or {}
        self.query_one("#g-device", Gauge).set(s.get("used_bytes"), s.get("budget_bytes"))
        self.query_one("#g-host", Gauge).set(s.get("host_bytes"), s.get("host_capacity_bytes"))
        self.query_one("#g-disk", Gauge).set(s.get("disk_bytes"), 0)
        self.query_one(ReplayFacts).show(r)
        self.query_one(ReplaySessions).show(state)
        self.query_one(SwapLog).show(state)
        label = f"{'▶' if self.playing else '‖'} step {r.step:g} s"
        self.query_one(Timeline).set(r.cursor / r.end if r.end else 1.0, label)

    # -- keys --------------------------------------------------------------------------------------
    def action_move(self, steps: int) -> None:
        self.replay.move(steps)
        self.show()

    def action_seek(self, cursor: int) -> None:
        self.replay.seek(cursor)
        self.show()

    def action_seek_end(self) -> None:
        self.action_seek(self.replay.end)

    def seek_fraction(self, frac: float) -> None:
        self.action_seek(round(frac * self.replay.end))

    def action_swap(self, direction: int) -> None:
        if self.replay.next_swap(direction):
            self.show()
        else:
            self.notify(f"no swap {'after' if direction > 0 else 'before'} the cursor", timeout=1.5)

    def action_scale(self, direction: int) -> None:
        self.replay.change_step(direction)
        self.show()

    def action_zoom(self) -> None:
        window = self.replay.zoom()
        self.show()
        self.notify(f"plot window {window:g} s", timeout=1.5)

    def action_play(self) -> None:
        """Toggle playing; from the end, play starts over."""
        self.playing = not self.playing
        if self.playing:
            if self.replay.cursor >= self.replay.end:
                self.replay.seek(0)
            self.player.resume()
        else:
            self.player.pause()
        self.show()

    def play_step(self) -> None:
        self.replay.move(1)
        if self.replay.cursor >= self.replay.end:
            self.playing = False
            self.player.pause()
        self.show()


class ReplayHelp(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Markdown(HELP)
        yield Footer()
