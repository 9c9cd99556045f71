"""The sessions table: sorted and filtered here, cursor kept. When the sessions change in place only the
cells that changed are updated; the table is rebuilt only when its rows or their order change."""

from rich.text import Text
from textual.widgets import DataTable

from ..fmt import ms, session_bytes, session_state, size, size_short

QOS_ORDER = {"realtime": 0, "interactive": 1, "batch": 2}
QOS_SHORT = {"realtime": "rt", "interactive": "inter", "batch": "batch"}
COMPACT_BELOW = 66  # cells: narrower than this, the table drops `swaps` and shortens QoS and sizes
LOC_STYLE = {"device": "bold", "host": "yellow", "disk": "red"}
# column label, key, sort key
COLUMNS = [
    ("id", "id", lambda s: s.get("id", 0)),
    ("QoS", "qos", lambda s: QOS_ORDER.get(s.get("qos"), 9)),
    ("state", "state", lambda s: session_state(s)),
    ("where", "location", lambda s: s.get("location") or ""),
    ("bytes", "bytes", session_bytes),
    ("swaps", "swaps", lambda s: s.get("swaps") or 0),
    ("last swap", "last_swap_ms", lambda s: s.get("last_swap_ms") or 0.0),
]


def row_cells(s: dict, compact: bool = False) -> list:
    loc = s.get("location") or "?"
    qos = s.get("qos") or "?"
    cells = [str(s.get("id")) + ("↻" if s.get("restored") else ""), QOS_SHORT.get(qos, qos) if compact else qos, session_state(s),
             Text(loc, LOC_STYLE.get(loc, "")),
             Text((size_short if compact else size)(session_bytes(s)), justify="right"),
             Text(str(s.get("swaps") or 0), justify="right"),
             Text(ms(s.get("last_swap_ms")).replace(" ms", "ms" if compact else " ms"), justify="right")]
    return [c for c, col in zip(cells, COLUMNS) if not (compact and col[1] == "swaps")]


def matches(s: dict, needle: str) -> bool:
    """Every word of the filter must appear in one of the row's columns (`paused host`, `batch`, `7`)."""
    hay = " ".join(str(c) for c in row_cells(s)).lower() + f" {s.get('phase', '')}".lower()
    return all(w in hay for w in needle.lower().split())


class SessionsTable(DataTable):
    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.sort_col, self.reverse, self.needle = 0, False, ""
        self.compact = None
        self._seen = None
        self._columns: list[str] = []  # the keys of the columns shown
        self._drawn: dict[str, tuple[dict, list]] = {}  # row key: (a copy of the session drawn, its cells)

    def on_resize(self, event) -> None:
        compact = event.size.width < COMPACT_BELOW
        if compact != self.compact:
            self.compact = compact
            self.clear(columns=True)
            self._columns = [key for _, key, _ in COLUMNS if not (compact and key == "swaps")]
            for label, key, _ in COLUMNS:
                if key in self._columns:
                    self.add_column("swap" if compact and key == "last_swap_ms" else label, key=key)
            self._seen, self._drawn = None, {}
            self.show(self.app.state)

    def cycle_sort(self) -> str:
        self.sort_col = (self.sort_col + 1) % len(COLUMNS)
        self._seen = None
        return COLUMNS[self.sort_col][0]

    def flip(self) -> None:
        self.reverse = not self.reverse
        self._seen = None

    def set_filter(self, needle: str) -> None:
        self.needle = needle
        self._seen = None

    def selected(self) -> int | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    def show(self, state) -> None:
        if self._seen == state.v_sessions or self.compact is None:
            return
        self._seen = state.v_sessions
        rows = [s for s in state.sessions.values() if not self.needle or matches(s, self.needle)]
        rows.sort(key=COLUMNS[self.sort_col][2], reverse=self.reverse)
        drawn, self._drawn = self._drawn, {}
        for s in rows:  # a session's cells are made again only when it changed
            key = str(s["id"])
            old = drawn.get(key)
            self._drawn[key] = old if old and old[0] == s else (dict(s), row_cells(s, self.compact))
        if list(self._drawn) == list(drawn):
            self._update_cells(drawn)
        else:
            self._rebuild()
        label, _, _ = COLUMNS[self.sort_col]
        shown = f"{len(rows)} of {len(state.sessions)}" if self.needle else f"{len(rows)}"
        self.border_title = f"sessions ({shown}) · sorted by {label} {'↓' if self.reverse else '↑'}"

    def _update_cells(self, drawn: dict[str, tuple[dict, list]]) -> None:
        """The same rows in the same order: only the cells that differ from those drawn are set."""
        for key, now in self._drawn.items():
            if now is not drawn[key]:
                for col, old, new in zip(self._columns, drawn[key][1], now[1]):
                    if new != old:
                        self.update_cell(key, col, new, update_width=True)

    def _rebuild(self) -> None:
        keep = self.selected()
        self.clear()
        for key, (_, cells) in self._drawn.items():
            self.add_row(*cells, key=key)
        if keep is not None and str(keep) in self.rows:
            self.move_cursor(row=self.get_row_index(str(keep)), scroll=False)
