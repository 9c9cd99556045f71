"""The fleet view (`djinn-console --fleet [ADDRESS]`): every daemon of a Ray fleet (djinnd/fleet.py)
with its state, its device memory over the last minutes against its budget, sessions and swaps,
refreshed every two seconds; a dead daemon with the sessions lost with it, by id; the last moves.
Enter on a daemon opens the ordinary console attached to it over TCP."""

from collections import defaultdict, deque

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from .fmt import size

REFRESH_S = 2.0
BARS = " ▁▂▃▄▅▆▇█"
STATE_STYLE = {"up": "green", "restarted": "yellow", "moved": "yellow", "dead": "bold red"}


def plateau(values, budget: int, width: int = 24) -> str:
    """The last `width` samples of device bytes as bars, full height at the budget."""
    vals = list(values)[-width:]
    top = len(BARS) - 1
    return "".join(BARS[min(top, max(v > 0, round(v / budget * top)))] if budget else " " for v in vals)


class FleetConsole(App):
    """A table of the fleet's daemons; `exit` returns (URL, server key) of the one opened, if any."""

    TITLE = "djinn fleet"
    BINDINGS = [Binding("q", "quit", "Quit")]  # enter on a row opens that daemon's console
    CSS = "#fleet-daemons { height: 1fr; } #fleet-lost, #fleet-moves { height: auto; padding: 0 1; }"

    def __init__(self, fleet):
        super().__init__()
        self.fleet = fleet
        self.rows: dict = {}
        self.used: dict[str, deque] = defaultdict(lambda: deque(maxlen=120))

    def compose(self) -> ComposeResult:
        yield Static("fleet: reading…", id="fleet-title")
        yield DataTable(id="fleet-daemons", cursor_type="row")
        yield Static(id="fleet-lost")
        yield Static(id="fleet-moves")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("daemon", "state", "address", "device memory", "over time", "sessions",
                                              "swaps out/in", "restarts")
        self.poll()
        self.set_interval(REFRESH_S, self.poll)

    @work(thread=True, exclusive=True, group="fleet")
    def poll(self) -> None:
        try:
            got = self.fleet.status()
        except Exception as e:  # noqa: BLE001 - the view stays up and says why
            self.call_from_thread(self.query_one("#fleet-title", Static).update, f"[red]fleet: {escape(str(e))}[/]")
            return
        self.call_from_thread(self.show, got)

    def show(self, got: dict) -> None:
        daemons = got["daemons"]
        self.rows = daemons
        table = self.query_one(DataTable)
        table.clear()
        lost = []
        for name, row in sorted(daemons.items()):
            state = Text(row["state"], style=STATE_STYLE.get(row["state"], "bold"))
            st = row.get("status")
            if st is None:
                table.add_row(name, state, row.get("url", ""), "", "", "", "", "", key=name)
                lost.append(f"{name}: {', '.join(row.get('lost') or []) or 'no sessions'}")
                continue
            m, sw = st["memory"], st["swap"]
            self.used[name].append(m["device_bytes"])
            table.add_row(name, state, row["url"], f"{size(m['device_bytes'])} / {size(m['budget_bytes'])} "
                          f"(peak {size(m['peak_device_bytes'])})", plateau(self.used[name], m["budget_bytes"]),
                          str(st["sessions"]), f"{sw['swap_outs']} / {sw['swap_ins']}", str(st.get("restarts", 0)),
                          key=name)
        up = sum(r["state"] != "dead" for r in daemons.values())
        self.query_one("#fleet-title", Static).update(
            f"fleet: {len(daemons)} daemons, {up} up, {len(got['sessions'])} sessions")
        self.query_one("#fleet-lost", Static).update(
            "[bold red]lost sessions[/] " + escape("; ".join(lost)) if lost else "")
        moves = [f"{m['session']} {m['from']} → {m['to']} {m['seconds'] * 1000:.0f} ms ({size(m['bytes'])})"
                 for m in got["moves"][-3:]]
        self.query_one("#fleet-moves", Static).update(escape("moves: " + "; ".join(moves)) if moves else "")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a daemon: its own console, over TCP."""
        name = event.row_key.value
        row = self.rows.get(name, {})
        if row.get("state") == "dead":
            self.notify(f"{name} is dead", severity="error")
            return
        self.exit((row.get("url"), row.get("server_key")))
