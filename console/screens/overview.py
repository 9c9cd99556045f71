"""Overview: the VRAM plateau, gauges, daemon facts, sessions and the swap log on one screen."""

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from ..widgets.panels import Facts, Gauge, StatusBar, SwapLog
from ..widgets.plot import VramPlot
from ..widgets.sessions import SessionsTable

NO_DAEMON = """\
[b]No djinnd answers on[/b]
  {socket}

Start one in another shell:
  [b]djinnd start --detach --socket {socket}[/b]
or press [b]d[/b] to have the console start it.

The console keeps trying every second and attaches as soon as a daemon serves.
{reason}"""


class Overview(Screen):
    AUTO_FOCUS = "SessionsTable"
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse", show=False),
        Binding("enter", "details", "Details", show=False),
        Binding("x", "close_session", "Close"),
        Binding("n", "app.new_session", "New session"),
        Binding("z", "zoom", "Zoom", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield StatusBar()
        yield Static(id="nodaemon")
        with Vertical(id="main"):
            with Horizontal(id="top"):
                yield VramPlot(id="plot", scroll_every=1.0)  # redrawn four times a second: scroll once a second
                with Vertical(id="side"):
                    yield Gauge("device", id="g-device")
                    yield Gauge("host", id="g-host")
                    yield Gauge("disk", id="g-disk")
                    yield Facts(id="facts")
            with Horizontal(id="bottom"):
                with Vertical(id="sessions-pane"):
                    yield Input(placeholder="/ filter: paused host batch …", id="filter")
                    yield SessionsTable(id="sessions")
                yield SwapLog(id="swaplog")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#plot").border_title = "device memory"
        self.query_one("#side").border_title = "daemon"

    def show(self, state) -> None:
        waiting = not state.attached and not state.was_attached
        main = self.query_one("#main")
        if main.display == waiting:  # switching between the no-daemon page and the overview
            self.query_one("#nodaemon").display = waiting
            main.display = not waiting
            if not waiting:
                self.query_one(SessionsTable).focus()
        self.query_one(StatusBar).show(state)
        if waiting and not state.tried:
            self._say(f"connecting to {escape(state.socket)}…")
            return
        if waiting:
            said = state.reason and not state.reason.startswith("no djinnd answers")
            reason = f"\n[dim]last answer: {escape(state.reason)}[/dim]" if said else ""
            self._say(NO_DAEMON.format(socket=escape(state.socket), reason=reason))
            return
        self.query_one(VramPlot).show(state)
        s = state.last_sample or {}
        self.query_one("#g-device", Gauge).set(s.get("used_bytes"), s.get("budget_bytes"))
        self.query_one("#g-host", Gauge).set(s.get("host_bytes"), s.get("host_capacity_bytes"))
        self.query_one("#g-disk", Gauge).set(s.get("disk_bytes"), 0)
        self.query_one(Facts).show(state)
        self.query_one(SessionsTable).show(state)
        self.query_one(SwapLog).show(state)

    def _say(self, text: str) -> None:
        """The no-daemon page, updated only when its text changed: an update redoes the screen's layout."""
        page = self.query_one("#nodaemon", Static)
        if text != page.content:
            page.update(text)

    # -- keys --------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        """Table keys only once there is a table; closing a session only while attached."""
        state = self.app.state
        if action == "close_session":
            return state.attached
        if action in ("filter", "sort", "reverse", "details", "zoom"):
            return state.was_attached
        return True

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one(SessionsTable).set_filter(event.value)
        self.show(self.app.state)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(SessionsTable).focus()

    def on_key(self, event) -> None:
        if event.key == "escape" and self.focused is self.query_one("#filter"):
            self.query_one(SessionsTable).focus()
            event.stop()

    def action_sort(self) -> None:
        self.notify(f"sessions sorted by {self.query_one(SessionsTable).cycle_sort()}", timeout=1.5)
        self.show(self.app.state)

    def action_reverse(self) -> None:
        self.query_one(SessionsTable).flip()
        self.show(self.app.state)

    def action_zoom(self) -> None:
        window = self.query_one(VramPlot).zoom()
        self.show(self.app.state)
        self.notify(f"plot window {window // 60:g} min", timeout=1.5)

    def action_details(self) -> None:
        sid = self.query_one(SessionsTable).selected()
        if sid is not None:
            self.app.open_session(sid)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()

    def action_close_session(self) -> None:
        sid = self.query_one(SessionsTable).selected()
        if sid is None:
            self.notify("no session selected", severity="warning")
        else:
            self.app.ask_close_session(sid)
