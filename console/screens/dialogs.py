"""Modal screens: confirmation, export format, help, and the session screen's questions."""

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Markdown, Select


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
| `enter` | open the session under the cursor in the session screen (the debugger) |
| `n` | new session: a prompt and a QoS class, opened in the session screen |
| `x` | close the session under the cursor (asks first) |
| `z` | plot window: 1, 2, 5, 10 minutes |

The plot shows device memory (min and max per column), the budget (──) and, when on scale, the
capacity (╌╌). ▼ marks swap-outs and ▲ swap-ins. On a CPU daemon the budget is an accounting limit.

## Session (the debugger)
| key | |
|---|---|
| `s` | step: run the forward to the end of the next layer (an idle session starts its next forward) |
| `n` | run to the next breakpoint, or to the end of the forward |
| `c` | resume to the end of the forward: its token joins the text |
| `g` | generate N tokens, the text growing as they come |
| `b` | breakpoints: the layers where the forward stops for `n` (e.g. `3 7 10-12`) |
| `p` | patch the paused hidden state: scale, set or add, at positions and channels |
| `←` / `→` | the position the lens reads (the highlighted token) |
| `x` / `escape` | close the session (asks first) / back |

The text shows each token on its own shade; the paused forward's tokens are bold. The lens pane
lists, for every layer the forward has passed, the three tokens the model would predict from that
layer's hidden state (green: likely). Beside it: each position's norm as bars and its statistics.

## Replay
`djinn-console --replay logs/<scenario>/<stamp>` (or an exported events file) opens a finished run
without a daemon and scrubs its timeline; that screen has its own `?` help.

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


class Ask(ModalScreen[str | None]):
    """One line of input: enter answers, escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = ""):
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog form"):
            yield Label(self.question)
            yield Input(self.value, id="answer")
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PatchDialog(ModalScreen[dict | None]):
    """How to change the paused hidden state: op, value, positions and channels (blank: all)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "apply", "Apply")]

    def __init__(self, positions: str = ""):
        super().__init__()
        self.positions = positions

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog form"):
            yield Label("Patch the paused hidden state")
            yield Select([("scale by", "scale"), ("set to", "set"), ("add", "add")], value="scale", allow_blank=False,
                         id="op")
            yield Input(placeholder="value, e.g. 0.5 or -1", id="value")
            yield Input(self.positions, placeholder="positions (blank: all; -1 is the last)", id="positions")
            yield Input("", placeholder="channels (blank: all)", id="channels")
            with Horizontal(classes="buttons"):
                yield Button("Apply (ctrl+s)", id="apply", variant="primary")
                yield Button("Cancel (esc)", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#value").focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_apply() if event.button.id == "apply" else self.action_cancel()

    def action_apply(self) -> None:
        self.dismiss({"op": self.query_one("#op", Select).value,
                      **{k: self.query_one(f"#{k}", Input).value for k in ("value", "positions", "channels")}})

    def action_cancel(self) -> None:
        self.dismiss(None)


class NewSession(ModalScreen[dict | None]):
    """A prompt and a QoS class for a new session, opened in the session screen once made."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog form"):
            yield Label("New session")
            yield Input(placeholder="prompt, e.g. The capital of France is", id="prompt")
            yield Select([(q, q) for q in ("realtime", "interactive", "batch")], value="interactive",
                         allow_blank=False, id="qos")
            with Horizontal(classes="buttons"):
                yield Button("Create (enter)", id="create", variant="primary")
                yield Button("Cancel (esc)", id="cancel")
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._create()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._create() if event.button.id == "create" else self.action_cancel()

    def _create(self) -> None:
        prompt = self.query_one("#prompt", Input).value
        if not prompt.strip():
            self.notify("a session needs a prompt", severity="error")
            return
        self.dismiss({"prompt": prompt, "qos": self.query_one("#qos", Select).value})

    def action_cancel(self) -> None:
        self.dismiss(None)
