"""VRAM over time, drawn with Unicode braille (2×4 dots a cell): no plotting dependency.

Each dot column keeps the min and the max of the samples that fall in it (as dolphie's
MetricGraph and nvitop's history do), so a short spike never vanishes when a ten-minute window
is squeezed into sixty cells. The budget and capacity are horizontal lines; swaps are marked on a
lane under the plot (▼ out, ▲ in).
"""

from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from ..fmt import size

BRAILLE = 0x2800
# dot bits by (column in cell, row in cell, top to bottom)
DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
# DOT_RUNS[column][i][j]: the dots of rows i to j of a cell's column, together
DOT_RUNS = tuple(tuple(tuple(sum(col[i:j + 1]) for j in range(4)) for i in range(4)) for col in DOT)
LABEL_W = 10
OFF_SCALE = 3  # a budget more than this many times the peak use is named, not drawn
WINDOWS = (60, 120, 300, 600)


def minmax_columns(points: Sequence[tuple[float, float]], t0: float, t1: float, n: int):
    """Downsample (t, v) points into n columns of (min, max); None where a column got no point."""
    cols: list[tuple[float, float] | None] = [None] * n
    span = (t1 - t0) or 1.0
    for t, v in points:
        if t < t0 or t > t1:
            continue
        i = min(n - 1, int((t - t0) / span * n))
        c = cols[i]
        if c is None:
            cols[i] = (v, v)
        elif v < c[0]:
            cols[i] = (v, c[1])
        elif v > c[1]:
            cols[i] = (c[0], v)
    return cols


def _paint(grid: list[list[int]], x: int, top: int, bottom: int) -> None:
    """Set the dots of dot column x from dot row top to bottom (inclusive): a cell at a time, not a dot."""
    if top > bottom:
        return
    runs, cx, first, last = DOT_RUNS[x % 2], x // 2, top // 4, bottom // 4
    if first == last:
        grid[first][cx] |= runs[top % 4][bottom % 4]
        return
    grid[first][cx] |= runs[top % 4][3]
    for r in range(first + 1, last):
        grid[r][cx] |= runs[0][3]
    grid[last][cx] |= runs[0][bottom % 4]


def _same_since(samples, drawn: list) -> bool:
    """Whether every sample newer than the last one drawn shows the same used, budget and capacity."""
    if not drawn:
        return not samples
    last = drawn[-1]
    for s in reversed(samples):
        if s.t <= last.t:
            return True
        if (s.used, s.budget, s.capacity) != (last.used, last.budget, last.capacity):
            return False
    return True


def _span(t: float) -> str:
    return f"{t / 60:g}m" if t >= 120 else f"{t:g}s"


class VramPlot(Widget):
    """Renders whatever `show()` last gave it; it never fetches anything."""

    COMPONENT_CLASSES = {"plot--used", "plot--fill", "plot--budget", "plot--capacity", "plot--out", "plot--in",
                         "plot--axis"}
    DEFAULT_CSS = """
    VramPlot { height: 1fr; min-height: 6; text-wrap: nowrap; text-overflow: clip; }
    VramPlot > .plot--used { color: $accent; text-style: bold; }
    VramPlot > .plot--fill { color: $accent 45%; }
    VramPlot > .plot--budget { color: $warning; }
    VramPlot > .plot--capacity { color: $error; }
    VramPlot > .plot--out { color: $secondary; }
    VramPlot > .plot--in { color: $success; }
    VramPlot > .plot--axis { color: $foreground 50%; }
    """

    def __init__(self, *args, window: float = 120, scroll_every: float = 0.0, **kw):
        """`scroll_every`: while only time moves on, redraw after this many seconds of it (and a dot column),
        for a plot redrawn several times a second whatever happens (the live console's)."""
        super().__init__(*args, **kw)
        self.window = window
        self.scroll_every = scroll_every
        self.samples: list = []  # state.Sample
        self.markers: list[tuple[float, str]] = []  # (t, "swap_out" | "swap_in")
        self.now = 0.0
        self._seen = -1
        self._source = None  # the state's samples drawn (a reset makes new ones)
        self._drawn = (0, 0.0)  # the swap count and the window drawn

    def show(self, state) -> None:
        """Take the state's samples when the picture changed: a sample shows something new, a swap came, the
        window changed, the state started over, or time moved back or on by a dot column (and `scroll_every`).
        An idle daemon's ten samples a second so do not redraw the plot ten times a second."""
        if state.v_samples == self._seen:
            return
        self._seen = state.v_samples
        now = state.now()
        step = self.window / (2 * max(4, self.size.width - LABEL_W))  # the time one dot column spans
        if (state.samples is self._source and self._drawn == (state.swap_count, self.window)
                and self.now <= now < self.now + max(step, self.scroll_every)
                and _same_since(state.samples, self.samples)):
            return
        self._source, self._drawn, self.now = state.samples, (state.swap_count, self.window), now
        t0 = self.now - self.window
        self.samples = [s for s in state.samples if s.t >= t0 - 1]
        self.markers = [(e.get("mono_ns", 0) / 1e9, e["type"]) for e in state.swaps if e.get("mono_ns", 0) / 1e9 >= t0]
        self.refresh()

    def zoom(self) -> float:
        """Cycle the window through 1, 2, 5 and 10 minutes."""
        self.window = WINDOWS[(WINDOWS.index(self.window) + 1) % len(WINDOWS)] if self.window in WINDOWS else 120
        self._seen = -1
        return self.window

    def render(self) -> Text:
        w, h = self.size.width, self.size.height
        st = {c.split("--")[1]: self.get_component_rich_style(c, partial=True) for c in self.COMPONENT_CLASSES}
        lines = render_plot(self.samples, self.markers, self.now, self.window, w, h, st)
        return Text("\n", no_wrap=True, overflow="crop").join(lines)


def render_plot(samples, markers, now: float, window: float, width: int, height: int,
                st: dict[str, Style]) -> list[Text]:
    """The plot as `height` lines of `width` cells: legend, plot rows, swap lane, time axis."""
    ph, pw = max(1, height - 3), max(4, width - LABEL_W)
    last = samples[-1] if samples else None
    budget, capacity = (last.budget, last.capacity) if last else (0, 0)
    t0 = now - window
    cols = minmax_columns([(s.t, s.used) for s in samples], t0, now, pw * 2)
    budgets = minmax_columns([(s.t, s.budget) for s in samples], t0, now, pw * 2)
    # Scale to the data; a budget far above it (a CPU daemon's default) would flatten the plot to a line.
    umax = max([c[1] for c in cols if c] or [1])
    near = [b[1] for b in budgets if b and b[1] <= umax * OFF_SCALE]
    top = max([umax] + near) * 1.1
    budgets = [b if b and b[1] <= top else None for b in budgets]
    budget_on_scale = 0 < budget <= top
    cap_on_scale = 0 < capacity <= top * 1.5
    if cap_on_scale:
        top = max(top, capacity * 1.04)
    rows = ph * 4

    def dot_row(v: float) -> int:
        return min(rows - 1, max(0, int(round((1 - v / top) * (rows - 1)))))

    band = [[0] * pw for _ in range(ph)]
    fill = [[0] * pw for _ in range(ph)]
    limit = [[0] * pw for _ in range(ph)]  # budget and capacity lines
    limit_kind = [[""] * pw for _ in range(ph)]
    prev = None
    for x, c in enumerate(cols):
        if c is None:
            prev = None
            continue
        hi, lo = dot_row(c[1]), dot_row(c[0])  # rows count downwards: hi <= lo
        top_row, bottom_row = hi, lo
        if prev is not None:  # join a step to the previous column so the line stays unbroken
            top_row, bottom_row = min(hi, prev[1]), max(lo, prev[0])
        _paint(band, x, top_row, bottom_row)
        _paint(fill, x, bottom_row + 1, rows - 1)  # bottom_row >= lo: the fill starts under the band
        prev = (hi, lo)
    for x in range(pw * 2):
        marks = []
        if cap_on_scale and x % 4 < 2:  # dashed
            marks.append((dot_row(capacity), "capacity"))
        if budgets[x]:
            marks.append((dot_row(budgets[x][1]), "budget"))
        for y, kind in marks:
            limit[y // 4][x // 2] |= DOT[x % 2][y % 4]
            limit_kind[y // 4][x // 2] = kind

    out = [_legend(last, budget, budget_on_scale, capacity, cap_on_scale, window, width, st)]
    labels = {dot_row(budget) // 4: size(budget)} if budget_on_scale else {}
    if cap_on_scale:
        labels.setdefault(dot_row(capacity) // 4, size(capacity))
    labels.setdefault(ph - 1, "0")
    labels.setdefault(0, size(top))
    for r in range(ph):
        line = Text(f"{labels.get(r, ''):>{LABEL_W - 1}} ", style=st["axis"], no_wrap=True)
        cells = []
        for cx in range(pw):
            b, f, lim = band[r][cx], fill[r][cx], limit[r][cx]
            if lim:  # limits drawn over the data, so a plateau shows as data pressed against the line
                cells.append((chr(BRAILLE + (lim | b | f)), limit_kind[r][cx]))
            elif b:
                cells.append((chr(BRAILLE + (b | f)), "used"))
            elif f:
                cells.append((chr(BRAILLE + f), "fill"))
            else:
                cells.append((" ", ""))
        for kind, run in groupby(cells, key=itemgetter(1)):  # one span a run: a span a cell costs 10x to render
            line.append("".join(ch for ch, _ in run), st[kind] if kind else None)
        out.append(line)
    out.append(_lane(markers, t0, now, pw, st))
    out.append(_axis(window, pw, st))
    return out[:height]


def _legend(last, budget, budget_on_scale, capacity, cap_on_scale, window, width, st) -> Text:
    """used, budget, capacity, window, swap marks: each part in its long form if it fits, else short, else left out."""
    cap = "" if cap_on_scale else " off scale"
    bmark, boff = ("  ── ", "") if budget_on_scale else ("  ↑ ", " off scale")
    parts = [
        ([("used ", "axis"), (size(last.used) if last else "–", "used")],),
        ([(bmark, "budget"), (f"budget {size(budget)}{boff}", "budget")],
         [(bmark, "budget"), (f"{size(budget)}{boff}", "budget")]),
    ]
    if capacity:
        mark = "  ╌╌ " if cap_on_scale else "  ↑ "
        parts.append(([(mark, "capacity"), (f"capacity {size(capacity)}{cap}", "capacity")],
                      [(mark, "capacity"), (f"cap {size(capacity)}{cap}", "capacity")]))
    parts.append(([(f"  last {_span(window)}", "axis")], [(f" {_span(window)}", "axis")]))
    parts.append(([("  ▼", "out"), ("out ", "axis"), ("▲", "in"), ("in", "axis")], [(" ▼", "out"), ("▲", "in")]))
    t = Text(no_wrap=True, overflow="crop")
    for forms in parts:
        for form in forms:
            if t.cell_len + sum(len(x) for x, _ in form) <= width:
                for text, style in form:
                    t.append(text, st[style])
                break
    return t


def _lane(markers, t0: float, now: float, pw: int, st) -> Text:
    marks = [""] * pw
    span = (now - t0) or 1.0
    for t, kind in markers:
        if t0 <= t <= now + 1:
            i = min(pw - 1, int((t - t0) / span * pw))
            marks[i] += "o" if kind == "swap_out" else "i"
    line = Text(" " * LABEL_W, no_wrap=True)
    for m in marks:
        if not m:
            line.append(" ")
        elif "o" in m and "i" in m:
            line.append("◆", st["used"])
        else:
            line.append("▼" if "o" in m else "▲", st["out"] if "o" in m else st["in"])
    return line


def _axis(window: float, pw: int, st) -> Text:
    cells = [" "] * pw
    for frac in (0.0, 0.25, 0.5, 0.75):
        label = f"-{_span(window * (1 - frac))}"
        i = int(frac * pw)
        if i + len(label) < pw - 4:
            cells[i:i + len(label)] = label
    cells[pw - 3:] = "now"
    return Text(" " * LABEL_W + "".join(cells), style=st["axis"], no_wrap=True)
