"""The small read-only panels: connection bar, gauges, daemon facts, swap log.

Each one redraws only when what it shows changed: the console is asked to redraw four times a second.
"""

from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from ..fmt import clock, duration, ms, size, size_short


class StatusBar(Static):
    """One line at the top: which daemon we follow, or that we are disconnected and what to do."""

    DEFAULT_CSS = """
    StatusBar { dock: top; height: 1; background: $panel; color: $foreground; padding: 0 1;
                text-wrap: nowrap; text-overflow: ellipsis; }
    StatusBar.-detached { background: $error; color: $text; text-style: bold; }
    """

    def show(self, state) -> None:
        self.set_class(state.tried and not state.attached, "-detached")
        if state.attached:
            st = state.status
            model, dev = st.get("model", {}), st.get("device", {})
            text = (f"● attached {state.socket} · pid {st.get('pid', '?')} · "
                    f"{model.get('name', '?')} on {dev.get('kind', '?')} · up {duration(st.get('uptime_s'))}")
            if state.lost:
                text += f" · {state.lost} events lost"
        elif not state.tried:
            text = f"connecting to {state.socket}…"
        elif state.was_attached:
            text = f"✖ disconnected from {state.socket} · reattaching every second (d: start a daemon)"
        else:
            text = f"✖ no daemon on {state.socket} · retrying every second (d: start a daemon)"
        if text != self.content:
            self.update(text, layout=False)  # one line, docked: no layout to redo


class Gauge(Widget):
    """`label ███████░░░░ used / total pct`, one line."""

    DEFAULT_CSS = """
    Gauge { height: 1; }
    Gauge > .gauge--bar { color: $accent; }
    Gauge > .gauge--hot { color: $warning; }
    Gauge > .gauge--empty { color: $foreground 20%; }
    """
    COMPONENT_CLASSES = {"gauge--bar", "gauge--hot", "gauge--empty"}

    def __init__(self, label: str, **kw):
        super().__init__(**kw)
        self.label, self.used, self.total = label, 0, 0

    def set(self, used, total) -> None:
        used, total = used or 0, total or 0  # a sample without the field: 0, and no redraw for it every time
        if (used, total) != (self.used, self.total):
            self.used, self.total = used, total
            self.refresh()

    def render(self) -> Text:
        tail = f" {size(self.used)}" + (f"/{size(self.total)}" if self.total else "")
        frac = min(1.0, self.used / self.total) if self.total else 0.0
        tail += f" {frac:4.0%}" if self.total else ""
        bar_w = max(4, self.size.width - 7 - len(tail))
        full = int(round(frac * bar_w))
        hot = frac >= 0.9
        t = Text(f"{self.label:<6} ", no_wrap=True)
        t.append("█" * full, self.get_component_rich_style("gauge--hot" if hot else "gauge--bar"))
        t.append("░" * (bar_w - full), self.get_component_rich_style("gauge--empty"))
        t.append(tail)
        return t


class Facts(Static):
    """Model, device, budget, uptime and the swap counters, as `djinn status` tells them."""

    DEFAULT_CSS = "Facts { text-wrap: nowrap; text-overflow: ellipsis; }"

    def show(self, state) -> None:
        st = state.status
        if not st:
            self._update("waiting for the daemon…")
            return
        m, sw, mem, dev = st.get("model", {}), st.get("swap", {}), st.get("memory", {}), st.get("device", {})
        lat, thr = sw.get("latency_ms", {}), sw.get("throughput_gbps", {})
        rows = [
            ("model", f"{m.get('name', '?')} · {m.get('num_layers', '?')} layers · {size(m.get('weights_bytes'))}"),
            ("budget", f"{size(mem.get('budget_bytes'))} · peak {size(mem.get('peak_device_bytes'))}"),
            ("swaps", f"{sw.get('swap_outs', 0)} out {size(sw.get('bytes_out', 0))} · "
                      f"{sw.get('swap_ins', 0)} in {size(sw.get('bytes_in', 0))}"),
            ("latency", f"p50 {ms(lat.get('p50'))} · p99 {ms(lat.get('p99'))} · {thr.get('p50', 0):.1f} GB/s"),
            ("sessions", f"{st.get('sessions', len(state.sessions))}" + _batches(st.get("scheduler") or {})),
            ("uptime", f"{duration(st.get('uptime_s'))} · pid {st.get('pid', '?')} · v{st.get('version', '?')}"),
            ("device", f"{dev.get('kind', '?')} {dev.get('name', '')} {dev.get('dtype', '')}".strip()),
            ("KV", f"{size(m.get('kv_bytes_per_token'))} per token"),
        ]
        t = Text(no_wrap=True, overflow="ellipsis")
        for i, (k, v) in enumerate(rows):
            t.append(f"{k:<9}", "bold")
            t.append(v + ("\n" if i < len(rows) - 1 else ""))
        self._update(t)

    def _update(self, t: Text | str) -> None:
        """Only when the text changed, and the screen's layout redone only when its number of lines did."""
        if t != self.content:
            self.update(t, layout=len(str(t).splitlines()) != len(str(self.content).splitlines()))


def _batches(sched: dict) -> str:
    """Decode steps per forward so far, beside the largest batch and the cap."""
    b = sched.get("batches")
    if not b:
        return ""
    mean = b["rows"] / b["forwards"] if b["forwards"] else 0.0
    return f" · decode batches mean {mean:.1f}, largest {b['largest']} (max {sched.get('max_batch', '?')})"


def swap_line(ev: dict, compact: bool = False) -> Text:
    """time, session, direction, tier, bytes, ms, GB/s: one swap, fixed width (30 cells when compact)."""
    out = ev.get("type") == "swap_out"
    t = Text(no_wrap=True)
    t.append(clock(ev.get("ts"))[:8 if compact else 12] + " ", "dim")
    t.append(f"#{ev.get('session', '?'):<{3 if compact else 4}}", "bold")
    if compact:
        t.append("▼" if out else "▲", "magenta" if out else "green")
        t.append(f"{ev.get('tier', '?'):<4} {size_short(ev.get('bytes')):>5}{ms(ev.get('ms')).replace(' ', ''):>6}")
        return t
    t.append("out→" if out else "in ←", "magenta" if out else "green")
    t.append(f"{ev.get('tier', '?'):<5}")
    t.append(f"{size(ev.get('bytes')):>10} {ms(ev.get('ms')):>9} {ev.get('gbps') or 0:6.2f} GB/s")
    return t


class SwapLog(Widget):
    """The newest swaps, newest last; only the lines that fit are rendered, so a storm costs nothing."""

    DEFAULT_CSS = "SwapLog { height: 1fr; text-wrap: nowrap; text-overflow: clip; }"

    def __init__(self, *args, session=None, **kw):
        super().__init__(*args, **kw)
        self.session = session
        self.lines: list[dict] = []
        self._seen = -1

    def show(self, state) -> None:
        if state.v_swaps == self._seen:
            return
        self._seen = state.v_swaps
        want = 500
        src = state.swaps if self.session is None else state.swaps_of(self.session)
        self.lines = list(src)[-want:]
        self.border_title = f"swap events ({state.swap_count if self.session is None else len(src)})"
        self.refresh()

    def render(self) -> Text:
        if not self.lines:
            return Text("no swaps yet", style="dim")
        shown = self.lines[-max(1, self.size.height):]
        compact = self.size.width < 60
        return Text("\n", no_wrap=True, overflow="crop").join(swap_line(e, compact) for e in shown)
