"""Modal screens: confirmation, export format, help, and one session's details."""

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label, Markdown, Static

from ..fmt import ms, session_bytes, session_state, size
from ..widgets.panels import SwapLog


class Confirm(ModalScreen[bool]):
    """Yes/no before anything destructive; `y` / `n` / escape."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ExportPicker(ModalScreen[str | None]):
    """Which format to export in; the caller says what will be exported."""

    BINDINGS = [Binding("j", "pick('jsonl')", "JSONL"), Binding("c", "pick('csv')", "CSV"),
                Binding("t", "pick('chrome-trace')", "Chrome trace"), Binding("escape", "pick(None)", "Cancel")]

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Export {self.what} as:")
            with Horizontal(classes="buttons"):
                yield Button("JSONL (j)", id="jsonl", variant="primary")
                yield Button("CSV (c)", id="csv")
                yield Button("Chrome trace (t)", id="chrome-trace")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_pick(self, fmt: str | None) -> None:
        self.dismiss(fmt)


HELP = """\
# djinn-console

The operator's window into **djinnd**: one model, many sessions, paused inside the forward pass and
swapped to host memory or disk so device memory stays under the budget.

## Everywhere
| key | |
|---|---|
| `1` / `2` | Overview / Scenarios |
| `e` | export the current run's log (Scenarios) or the daemon's log as JSONL, CSV or Chrome trace |
| `d` | start a daemon on this socket (when none answers) |
| `ctrl+p` | command palette: every action, sessions, scenarios, themes |
| `?` | this help · `q` quit |

## Overview
| key | |
|---|---|
| `/` | filter sessions (words such as `paused host batch`), `escape` leaves the filter |
| `s` / `r` | sort by the next column / reverse |
| `enter` | details of the session under the cursor: breakpoint, activation stats, swap history |
| `x` | close the session under the cursor (asks first) |
| `z` | plot window: 1, 2, 5, 10 minutes |

The plot shows device memory (min and max per column), the budget (──) and, when on scale, the
capacity (╌╌). ▼ marks swap-outs and ▲ swap-ins. On a CPU daemon the budget is an accounting limit.

## Scenarios
| key | |
|---|---|
| `enter` on a scenario, `l` | launch it with the parameters in the form |
| `a` | abort the running scenario (asks first) |
| `o` | open the verdict of the last run again |
"""


class Help(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Markdown(HELP)
        yield Footer()


class SessionDetail(ModalScreen):
    """One session: its info, breakpoint and activation stats (when paused), its swaps."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("i", "inspect", "Inspect"),
                Binding("x", "close_session", "Close session")]

    def __init__(self, sid: int):
        super().__init__()
        self.sid = sid
        self.stats: dict | str | None = None
        self._seen = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="detail"):
            yield Static(id="info")
            yield Static(id="stats")
            yield SwapLog(session=self.sid, id="history")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#detail").border_title = f"session {self.sid}"
        self.action_inspect()

    def show(self, state) -> None:
        s = state.sessions.get(self.sid)
        key = (state.v_sessions, str(self.stats))
        self.query_one(SwapLog).show(state)
        if key == self._seen:
            return
        self._seen = key
        info = self.query_one("#info", Static)
        if s is None:
            info.update(Text(f"session {self.sid} is closed", "bold red"))
            return
        t = Text()
        for k, v in (("state", session_state(s)), ("breakpoint", "–" if s.get("layer") is None else f"after layer {s['layer']}"),
                     ("qos", s.get("qos")), ("phase", s.get("phase") or "–"),
                     ("where", f"{s.get('location')} · {size(session_bytes(s))}"),
                     ("tokens", f"{s.get('seq_len', '?')} in cache · {len(s.get('tokens') or [])} generated"),
                     ("swaps", f"{s.get('swaps', 0)} · last {ms(s.get('last_swap_ms'))}")):
            t.append(f"{k:<11}", "bold")
            t.append(f"{v}\n")
        info.update(t)
        stats = self.query_one("#stats", Static)
        if isinstance(self.stats, dict):
            st = self.stats
            stats.update(Text.assemble(("activation ", "bold"),
                                       f"after layer {st.get('layer')} · shape {st.get('shape')} {st.get('dtype')}\n",
                                       ("           ", ""),
                                       f"mean {st.get('mean', 0):.4g}  std {st.get('std', 0):.4g}  "
                                       f"min {st.get('min', 0):.4g}  max {st.get('max', 0):.4g}  norm {st.get('norm', 0):.4g}"))
        else:
            stats.update(Text(f"activation {self.stats or 'inspecting…'}", "dim"))

    def action_inspect(self) -> None:
        self.app.inspect_session(self)

    def set_stats(self, stats) -> None:
        self.stats = stats
        self._seen = None
        self.show(self.app.state)

    def action_close_session(self) -> None:
        self.app.ask_close_session(self.sid)

