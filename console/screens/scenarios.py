"""Scenarios: pick one, set its parameters, launch it on the daemon, watch it run, read the verdict."""

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from ..fmt import ms, size
from ..widgets.panels import StatusBar
from ..widgets.plot import VramPlot

STATUS_STYLE = {"pass": "bold green", "fail": "bold red", "error": "bold red", "skipped": "bold yellow",
                "aborted": "bold yellow", "running": "bold cyan"}


def params_of(scenario: dict) -> list[tuple[str, object]]:
    """(name, default) pairs whether the catalog gives a dict or a list of parameter specs."""
    p = scenario.get("params") or {}
    if isinstance(p, dict):
        return list(p.items())
    return [(x.get("name"), x.get("default")) for x in p if isinstance(x, dict)]


def as_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def verdict_text(run: dict) -> Text:
    """The run's status, failed criteria and headline figures from its results.json."""
    res = run.get("results") or {}
    status = res.get("status") or run.get("status") or "running"
    t = Text()
    t.append(f" {status.upper()} ", STATUS_STYLE.get(status, "bold") + " reverse")
    if run.get("exit_code") is not None:
        t.append(f"  exit {run['exit_code']}", "dim")
    if res.get("wall_s") is not None:
        t.append(f"  {res['wall_s']:.1f} s", "dim")
    t.append("\n")
    criteria = res.get("criteria") or []
    for c in criteria:  # scenarios that list their criteria: one line each, with what was measured
        mark, style = {True: ("✓", "green"), False: ("✗", "bold red")}.get(c.get("ok"), ("–", "yellow"))
        t.append(f"{mark} ", style)
        t.append(f"{c.get('text', c.get('id', '?'))}", "bold" if c.get("ok") is False else "")
        t.append(f" · {c['measured']}\n" if c.get("measured") else "\n", "dim")
    if not criteria:
        for r in res.get("reasons") or []:
            t.append(f"• {r}\n", "yellow")
    for n in res.get("notes") or []:
        t.append(f"note: {n}\n", "italic dim")
    if res.get("error"):
        t.append(f"{res['error']}\n", "red")
    vs, sw, cm = res.get("vram_stats") or {}, res.get("swap") or {}, res.get("capacity_math") or {}
    lines = []
    if "num_sessions_requested" in res:
        lines.append(f"sessions  {res.get('num_sessions_completed', '?')}/{res['num_sessions_requested']} completed"
                     f" ({res.get('num_sessions_spawned', '?')} spawned)")
    if vs:
        lines.append(f"vram      max {size(vs.get('max_bytes'))} · avg {size(vs.get('avg_bytes'))}"
                     f" · budget {size(vs.get('budget_bytes'))}")
    if cm:
        lines.append(f"demand    {size(cm.get('demand_bytes'))} vs budget {size(cm.get('budget_bytes'))}"
                     f" · swapping {'expected' if cm.get('expected_swapping') else 'not expected'}")
    if sw:
        lat = sw.get("latency_ms") or {}
        lines.append(f"swaps     {sw.get('swap_outs', 0)} out · {sw.get('swap_ins', 0)} in · "
                     f"p50 {ms(lat.get('p50'))} · p99 {ms(lat.get('p99'))}")
    if "integrity" in res:
        lines.append(f"integrity {res['integrity'].get('mismatches', '?')} mismatches in "
                     f"{res['integrity'].get('checked_sessions', '?')} sessions")
    if lines:
        t.append("\n".join(lines) + "\n")
    if run.get("output"):
        t.append("results  ", "bold")
        t.append(f"{run['output']}\n")
    return t


class Scenarios(Screen):
    AUTO_FOCUS = "#sc-list"
    BINDINGS = [
        Binding("l", "launch", "Launch"),
        Binding("a", "abort", "Abort"),
        Binding("z", "zoom", "Zoom", show=False),
    ]

    def __init__(self):
        super().__init__()
        self.catalog: list[dict] = []
        self.chosen: dict | None = None
        self.inputs: list[tuple[str, object, Input]] = []  # (parameter, default, its Input)
        self._seen = None
        self._run_seen = None

    def compose(self) -> ComposeResult:
        yield StatusBar()
        with Horizontal(id="sc-top"):
            with Vertical(id="sc-left"):
                yield OptionList(id="sc-list")
                yield Static(id="sc-error")
            with VerticalScroll(id="sc-form"):
                yield Vertical(id="sc-fields")
                yield Button("Launch (l)", id="sc-launch", variant="success")
                yield Static(id="sc-desc")
            with Vertical(id="sc-run"):
                yield ProgressBar(id="sc-progress", show_eta=False)
                yield Static(id="sc-message")
                yield VerticalScroll(Static(id="sc-verdict"), id="sc-verdict-box")
        yield VramPlot(id="sc-plot", scroll_every=1.0)  # redrawn four times a second: scroll once a second
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#sc-left").border_title = "scenarios"
        self.query_one("#sc-form").border_title = "parameters"
        self.query_one("#sc-run").border_title = "run"
        self.query_one("#sc-plot").border_title = "device memory"

    # -- drawing -----------------------------------------------------------------------------------
    def show(self, state) -> None:
        self.query_one(StatusBar).show(state)
        self.query_one(VramPlot).show(state)
        app = self.app
        key = (id(app.catalog), app.catalog_error)
        if key != self._seen:
            self._seen = key
            self._fill_catalog(app.catalog, app.catalog_error)
        if (state.v_runs, app.my_run) != self._run_seen:  # a redraw lays the screen out again: only on change
            self._run_seen = (state.v_runs, app.my_run)
            self._show_run(app.current_run(), state)

    def _fill_catalog(self, catalog: list[dict], error: str | None) -> None:
        self.catalog = catalog
        ol = self.query_one("#sc-list", OptionList)
        ol.clear_options()
        ol.add_options([Option(s["name"], id=s["name"]) for s in catalog])
        err = self.query_one("#sc-error", Static)
        err.display = bool(error) or not catalog
        err.update(Text(f"scenario.list failed: {error}" if error else "no scenarios yet", "red" if error else "dim"))
        run = self.app.current_run()
        want = (self.chosen["name"] if self.chosen else self.app.wanted_scenario) or (run or {}).get("name")
        names = [s["name"] for s in catalog]
        if catalog:
            ol.highlighted = names.index(want) if want in names else 0

    def _show_run(self, run: dict | None, state) -> None:
        box = self.query_one("#sc-run")
        bar = self.query_one("#sc-progress", ProgressBar)
        msg = self.query_one("#sc-message", Static)
        verdict = self.query_one("#sc-verdict", Static)
        bar.display = run is not None
        if run is None:
            box.border_title = "run"
            msg.update(Text("no run yet: pick a scenario and press l", "dim"))
            verdict.update("")
            return
        status = (run.get("results") or {}).get("status") or run.get("status", "running")
        box.border_title = f"run {run.get('run')} · {run.get('name')} · {status}"
        total, done = run.get("total"), run.get("done") or 0
        if status != "running" and run.get("exited"):
            total, done = total or 1, total or 1
        bar.update(total=total, progress=done)
        running = status == "running"
        msg.update(Text((run.get("message") or "starting…") if running else f"finished: {status}"))
        verdict.update(verdict_text(run) if not running else
                       Text(f"results  {run.get('output', '')}", "dim"))

    # -- choosing and launching --------------------------------------------------------------------
    async def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        chosen = next((s for s in self.catalog if s["name"] == event.option.id), None)
        if chosen is self.chosen:
            return
        self.chosen = chosen
        self.inputs = []
        fields = self.query_one("#sc-fields", Vertical)
        await fields.remove_children()
        if chosen is None:
            return
        self.query_one("#sc-form").border_title = f"{chosen['name']} parameters"
        self.query_one("#sc-desc", Static).update(Text(" ".join((chosen.get("description") or "").split()), "dim"))
        rows = []
        for name, default in params_of(chosen):
            box = Input(as_text(default), classes="param")
            self.inputs.append((name, default, box))
            rows.append(Horizontal(Label(escape(name), classes="param-name"), box, classes="param-row"))
        await fields.mount_all(rows)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_launch()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "sc-launch":
            self.action_launch()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_launch()

    def changed_params(self) -> dict:
        """Only what the operator changed goes to `--set`, as typed: the runner parses and checks it."""
        return {name: box.value.strip() for name, default, box in self.inputs if box.value.strip() != as_text(default)}

    def action_launch(self) -> None:
        if self.chosen is None:
            self.notify("no scenario chosen", severity="warning")
            return
        self.app.launch(self.chosen["name"], self.changed_params())

    def action_abort(self) -> None:
        self.app.ask_abort()

    def action_zoom(self) -> None:
        self.query_one(VramPlot).zoom()
