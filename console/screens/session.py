"""The session screen: one session as a white-box debugger.

Its text with token boundaries, where it lives, breakpoints, stepping layer by layer, the logit
lens of every layer up to the pause, the hidden state per position, patches, and generation with
the text appearing as it comes. Every action is a request through the public client (debugger.py);
a failed one says why in one line and the screen stays as it was.
"""

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from djinnd import DjinnError

from ..debugger import Debugger, View, parse_indices, parse_layers
from ..fmt import ms, session_bytes, session_state, size
from ..widgets.panels import SwapLog
from .dialogs import Ask, PatchDialog

BARS = "▁▂▃▄▅▆▇█"
PIECE_STYLES = ("on grey23", "on grey35")  # alternate, so token boundaries show
FORWARD_STYLE = "bold"  # the tokens of the paused forward
CURSOR_STYLE = "bold black on yellow"  # the position the lens reads


def prob_style(p: float) -> str:
    return "bold green" if p >= 0.5 else "green" if p >= 0.2 else "yellow" if p >= 0.05 else "dim"


def shown(piece: str) -> str:
    """A token's text made visible: a newline or tab as an escape, leading spaces as ·."""
    body = piece.lstrip(" ")
    return "·" * (len(piece) - len(body)) + body.replace("\n", "\\n").replace("\t", "\\t")


def render_text(v: View) -> Text:
    t = Text()
    n = len(v.pieces)
    start = n - v.forward_len if v.layer is not None else n
    cursor = start + v.position % v.forward_len if v.layer is not None and v.forward_len else -1
    for i, piece in enumerate(v.pieces):
        style = CURSOR_STYLE if i == cursor else PIECE_STYLES[i % 2] + (" " + FORWARD_STYLE if i >= start else "")
        t.append(shown(piece) or "∅", style)
    prompt = len(v.info.get("prompt_ids", []))
    t.append(f"\n{prompt} prompt + {n - prompt} generated tokens", "dim")
    return t


def render_info(v: View) -> Text:
    s = v.info
    t = Text()
    for k, val in (("state", session_state(s) if s else "…"), ("qos", s.get("qos", "?")),
                   ("phase", s.get("phase") or "–"),
                   ("where", f"{s.get('location', '?')} · {size(session_bytes(s))}"),
                   ("swaps", f"{s.get('swaps', 0)} · last {ms(s.get('last_swap_ms'))}"),
                   ("breakpoints", ", ".join(map(str, sorted(v.breakpoints))) or "none (b sets them)")):
        t.append(f"{k} ", "bold")
        t.append(f"{val}   ")
    if v.note:
        t.append(f"\n{v.note}", "italic")
    return t


def render_lens(v: View, width: int = 60, height: int = 40) -> Text:
    """A row a layer passed, as many of the top tokens as fit; the newest layers when not all fit."""
    if v.lens_error:
        return Text(f"no logit lens for this model: {v.lens_error}", "dim")
    if not v.lens:
        return Text("step (s) or run to a breakpoint (n): the lens of each layer shows here", "dim")
    fit = max(1, (width - 4) // 18)  # "·Paris     0.31  " a token
    layers = sorted(v.lens)
    shown_layers = layers[-max(1, height - 2):]
    t = Text()
    if len(shown_layers) < len(layers):
        t.append(f"… {len(layers) - len(shown_layers)} layers above\n", "dim")
    last = None
    for layer in shown_layers:
        row = v.lens[layer]
        if row["position"] != last:
            t.append(f"position {row['position']}\n", "dim")
            last = row["position"]
        t.append(f"{layer:>3} ", "bold" if layer == v.layer else "")
        for top in row["top"][:fit]:
            t.append(f"{(shown(top['text']) or '∅')[:10]:<10}", prob_style(top["prob"]))
            t.append(f" {top['prob']:.2f}  ", "dim")
        t.append("\n")
    return t


def norm_picture(norms: list[float], width: int) -> str:
    """One bar a position (the largest of each group when there are more positions than cells)."""
    if not norms:
        return ""
    group = -(-len(norms) // max(1, width))
    cols = [max(norms[i:i + group]) for i in range(0, len(norms), group)]
    top = max(cols) or 1.0
    return "".join(BARS[min(len(BARS) - 1, int(x / top * len(BARS)))] for x in cols)


STAT_COLUMNS = ("norm", "mean", "std", "min", "max")


def render_stats(v: View, width: int = 60, height: int = 12) -> Text:
    """The paused hidden state: its shape and norm, each position's norm as a bar, and the figures
    of the positions around the lens's (as many columns as the width takes)."""
    st = v.stats
    if not st:
        return Text("paused hidden state: none (the session is not paused)", "dim")
    per = st["per_position"]
    cols = STAT_COLUMNS[:max(1, (width - 15) // 9)]
    t = Text()
    t.append(f"after layer {st['layer']} · {st['shape']} {st['dtype']}"[:width] + "\n", "bold")
    t.append(norm_picture(per["norm"], width) + "\n", "cyan")
    t.append(f"{'pos':>4} {'token':<10}" + "".join(f"{c:>9}" for c in cols) + "\n", "bold")
    n = len(per["norm"])
    rows = max(1, height - 3)
    cur = v.position % n
    first = max(0, min(cur - rows // 2, n - rows))
    pieces = v.pieces[len(v.pieces) - n:] if len(v.pieces) >= n else [""] * n
    for i in range(first, min(n, first + rows)):
        t.append(f"{i:>4} {shown(pieces[i])[:10]:<10}" + "".join(f"{per[c][i]:>9.3g}" for c in cols) + "\n",
                 "reverse" if i == cur else "")
    return t


class SessionCommands(Provider):
    """The session screen's actions in the command palette."""

    async def search(self, query: str) -> Hits:
        screen = self.screen
        matcher = self.matcher(query)
        for name, action, help_text in SessionScreen.ACTIONS:
            text = f"session {screen.dbg.view.sid}: {name}"
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), lambda a=action: screen.run_action(a), help=help_text)


class SessionScreen(Screen):
    COMMANDS = {SessionCommands}
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("s", "go('step')", "Step layer"),
        Binding("n", "go('next')", "Next break"),
        Binding("c", "go('finish')", "Resume"),
        Binding("g", "go('generate')", "Generate"),
        Binding("b", "go('breakpoints')", "Breakpoints"),
        Binding("p", "go('patch')", "Patch"),
        Binding("left", "go('move', -1)", "Position", key_display="←→"),
        Binding("right", "go('move', 1)", "Position", show=False),
        Binding("r", "go('refresh')", "Refresh", show=False),
        Binding("x", "go('close_session')", "Close"),
    ]
    ACTIONS = [("step one layer", "step", "run the forward to the end of the next layer (s)"),
               ("run to the next breakpoint", "next", "or to the end of the forward (n)"),
               ("resume to the end of the forward", "finish", "its token joins the text (c)"),
               ("generate tokens", "generate", "N greedy tokens, shown as they come (g)"),
               ("set breakpoints", "breakpoints", "layers where the next forward pauses (b)"),
               ("patch the hidden state", "patch", "scale, set or add at positions and channels (p)"),
               ("close the session", "close_session", "its KV cache is dropped (x)")]

    def __init__(self, socket, sid: int, num_layers: int, view: View | None = None):
        """`view`: what to show at first instead of asking the daemon (a snapshot test's fixed data)."""
        super().__init__()
        self.dbg = Debugger(socket, sid, num_layers, self.redraw)
        self.fixed = view is not None
        if view is not None:
            self.dbg.view = view

    def compose(self) -> ComposeResult:
        with Vertical(id="dbg"):
            yield Static(id="dbg-info")
            with VerticalScroll(id="dbg-text-box"):
                yield Static(id="dbg-text")
            with Horizontal(id="dbg-panes"):
                yield Static(id="dbg-lens")
                yield Static(id="dbg-stats")
                yield SwapLog(session=self.dbg.view.sid, id="dbg-history")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#dbg").border_title = f"session {self.dbg.view.sid}"
        self.query_one("#dbg-text-box").border_title = "text"
        self.query_one("#dbg-lens").border_title = "logit lens: layer → top 3"
        self.query_one("#dbg-stats").border_title = "hidden state per position"
        self.redraw()
        if not self.fixed:
            self.run_action("refresh")

    def show(self, state) -> None:
        """The app's redraw: the swap history from the event stream (the rest redraws on change)."""
        self.query_one(SwapLog).show(state)

    def redraw(self) -> None:
        v = self.dbg.view
        self.query_one("#dbg-info", Static).update(render_info(v))
        self.query_one("#dbg-text", Static).update(render_text(v))
        self.query_one("#dbg-text-box").scroll_end(animate=False)  # the newest tokens in view
        for pane, render in (("#dbg-lens", render_lens), ("#dbg-stats", render_stats)):
            w = self.query_one(pane, Static)
            w.update(render(v, max(10, w.content_size.width), max(3, w.content_size.height)))

    def on_resize(self) -> None:
        self.call_after_refresh(self.redraw)

    # -- actions: each one request sequence at a time, through the debugger -----------------------
    @work(group="debug")
    async def run_action(self, name: str, *args) -> None:
        if self.dbg.busy:
            self.notify("still busy with the last request", severity="warning", timeout=2)
            return
        if name in ("generate", "breakpoints", "patch", "close_session") and not args:
            return self._ask(name)
        self.dbg.busy = True
        try:
            await getattr(self.dbg, name)(*args)
        except DjinnError as e:
            self.notify(f"{name}: {e}", severity="error", timeout=8)
            try:
                await self.dbg.refresh()  # show where the session really is now
            except DjinnError:
                pass
        finally:
            self.dbg.busy = False
            self.redraw()

    def _ask(self, name: str) -> None:
        v = self.dbg.view
        if name == "generate":
            self.app.push_screen(Ask("Generate how many tokens?", "8"), self._generate)
        elif name == "breakpoints":
            self.app.push_screen(Ask(f"Pause after layers (0..{v.num_layers - 1}, e.g. 3 7 10-12; empty: none):",
                                     " ".join(map(str, sorted(v.breakpoints)))), self._breakpoints)
        elif name == "patch":
            if v.layer is None:
                self.notify("only a paused forward can be patched: step (s) or run to a breakpoint (n) first",
                            severity="warning")
                return
            pos = v.position % v.forward_len if v.forward_len else -1
            self.app.push_screen(PatchDialog(str(pos)), self._patch)
        elif name == "close_session":
            self.app.ask_close_session(v.sid)

    def _generate(self, answer: str | None) -> None:
        if answer is None:
            return
        try:
            n = int(answer)
            if not 1 <= n <= 4096:
                raise ValueError
        except ValueError:
            self.notify(f"{answer!r}: give a number of tokens from 1 to 4096", severity="error")
            return
        self.run_action("generate", n)

    def _breakpoints(self, answer: str | None) -> None:
        if answer is None:
            return
        try:
            self.dbg.view.breakpoints = parse_layers(answer, self.dbg.view.num_layers)
        except ValueError as e:
            self.notify(str(e), severity="error")
        self.redraw()

    def _patch(self, answer: dict | None) -> None:
        if answer is None:
            return
        try:
            value = float(answer["value"])
        except ValueError:
            self.notify(f"patch: {answer['value']!r} is not a number", severity="error")
            return
        try:
            positions, channels = parse_indices(answer["positions"]), parse_indices(answer["channels"])
        except ValueError as e:
            self.notify(f"patch: {e}", severity="error")
            return
        self.run_action("patch", answer["op"], value, positions, channels)

    def action_go(self, name: str, *args) -> None:
        self.run_action(name, *args)
