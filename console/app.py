"""djinn-console: the Textual operator console for djinnd.

Data in, pictures out: the link worker posts typed messages (messages.py), the app applies them
to one State, and a 4 Hz timer asks the visible screens to redraw what changed. RPCs the operator
triggers (close, inspect, launch, abort) run as workers on fresh sockets; errors become notices.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.css.query import NoMatches

from djinnd import DjinnError, is_url, resolve_socket

from . import exporting
from .link import Link, rpc
from .messages import Attached, Catalog, Detached, EventBatch, Polled, Runs
from .screens.dialogs import Confirm, ExportPicker, Help, NewSession
from .screens.overview import Overview
from .screens.scenarios import Scenarios
from .screens.session import SessionScreen
from .state import State

REDRAW_EVERY = 0.25


class ConsoleCommands(Provider):
    """Palette entries for what is on the daemon now: open a session, launch a scenario."""

    async def search(self, query: str) -> Hits:
        app = self.app
        matcher = self.matcher(query)
        items = [(f"session {sid}: debug", lambda sid=sid: app.open_session(sid), "step, lens, patch, generate")
                 for sid in sorted(app.state.sessions)]
        if app.state.attached:
            items.append(("new session", app.action_new_session, "a prompt and a QoS class, opened in the debugger"))
        items += [(f"launch scenario {s['name']}", lambda n=s["name"]: app.launch(n, {}),
                   " ".join((s.get("description") or "").split())) for s in app.catalog]
        for text, fn, help_text in items:
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), fn, help=help_text)


class DjinnConsole(App):
    TITLE = "djinn-console"
    CSS_PATH = "console.tcss"
    MODES = {"overview": Overview, "scenarios": Scenarios}
    DEFAULT_MODE = "overview"
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    BINDINGS = [
        Binding("1", "switch_mode('overview')", "Overview"),
        Binding("2", "switch_mode('scenarios')", "Scenarios"),
        Binding("e", "export", "Export"),
        Binding("d", "start_daemon", "Start daemon"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, socket=None, launch: str | None = None, connect: bool = True, export_dir=None):
        super().__init__()
        self.socket = socket if is_url(socket) else resolve_socket(socket)  # a tcp:// address: a remote daemon
        self.state = State()
        self.state.socket = str(self.socket)
        self.launch_on_attach = launch
        self.wanted_scenario = launch
        self.connect = connect
        self.export_dir = Path(export_dir) if export_dir else None
        self.catalog: list[dict] = []
        self.catalog_error: str | None = None
        self.my_run: int | None = None
        self.starting_daemon = False
        self.last_export: Path | None = None
        self._results_pending = False

    def on_mount(self) -> None:
        self.set_interval(REDRAW_EVERY, self.redraw)
        if self.connect:
            link = Link(self.socket, self.post_message)
            self.run_worker(link.run(), name="link", group="link", exclusive=True)

    def redraw(self) -> None:
        if self._results_pending:
            self.load_results()
        for screen in self.screen_stack:
            if hasattr(screen, "show") and screen.is_mounted:
                try:
                    screen.show(self.state)
                except NoMatches:  # its widgets are still mounting, or already going: the next tick redraws
                    pass

    # -- messages from the link --------------------------------------------------------------------
    def on_attached(self, msg: Attached) -> None:
        self.state.attach(msg.socket, msg.snapshot)
        self.my_run = None
        self.screen.refresh_bindings()
        if self.launch_on_attach:
            name, self.launch_on_attach = self.launch_on_attach, None
            self.launch(name, {})
        self.redraw()

    def on_detached(self, msg: Detached) -> None:
        self.state.detach(msg.socket, msg.reason)
        self.screen.refresh_bindings()
        self.redraw()

    def on_event_batch(self, msg: EventBatch) -> None:
        self.state.apply(msg.events, msg.lost)
        if any(e.get("type") == "scenario" for e in msg.events):
            self.load_results()

    def on_polled(self, msg: Polled) -> None:
        self.state.polled(msg.status, msg.sessions)

    def on_catalog(self, msg: Catalog) -> None:
        self.catalog, self.catalog_error = msg.scenarios, msg.error

    def on_runs(self, msg: Runs) -> None:
        self.state.add_runs(msg.runs)
        self.load_results()

    # -- scenario runs -------------------------------------------------------------------------------
    def current_run(self) -> dict | None:
        """The run this console launched, else the newest one the daemon told us about."""
        runs = self.state.runs
        if self.my_run in runs:
            return runs[self.my_run]
        return next(reversed(runs.values()), None)  # run labels may be ints (daemon) or "cli-PID"

    def load_results(self) -> None:
        """Read results.json of runs that ended: the verdict and its figures live there.

        The runner may say `finished` a moment before the file is complete, so a missing or partial
        file is tried again at each redraw for a few seconds (or until the daemon says it exited).
        """
        self._results_pending = False
        for r in self.state.runs.values():
            if r.get("status") == "running" or "results" in r or not r.get("output"):
                continue
            try:
                r["results"] = json.loads((Path(r["output"]) / "results.json").read_text())
                self.state.v_runs += 1
            except (OSError, ValueError) as e:
                r["tries"] = r.get("tries", 0) + 1
                if r.get("exited") or r["tries"] > 40:
                    r["results"] = {"status": r.get("status"), "error": f"no readable results.json: {e}"}
                else:
                    self._results_pending = True

    @work(group="rpc")
    async def launch(self, name: str, sets: dict) -> None:
        self.wanted_scenario = name
        if self.current_mode != "scenarios":
            self.switch_mode("scenarios")
        try:
            got = await rpc(self.socket, lambda c: c.start_scenario(name, sets))
        except DjinnError as e:
            self.notify(f"cannot launch {name}: {e}", severity="error", timeout=8)
            return
        self.my_run = got["run"]
        self.state.runs.setdefault(got["run"], {"run": got["run"], "name": name, "status": "running",
                                               "output": got.get("output")})
        self.state.v_runs += 1
        self.notify(f"launched {name} (run {got['run']}) → {got.get('output')}")
        self.redraw()

    def ask_abort(self) -> None:
        run = self.current_run()
        if not run or run.get("status") != "running":
            self.notify("no scenario is running", severity="warning")
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.call_rpc(lambda c: c.abort_scenario(run["run"]), "abort", f"abort requested for run {run['run']}")
        self.push_screen(Confirm(f"Abort run {run['run']} ({run.get('name')})?"), answer)

    # -- sessions ------------------------------------------------------------------------------------
    def open_session(self, sid: int) -> None:
        layers = (self.state.status.get("model") or {}).get("num_layers", 0)
        self.push_screen(SessionScreen(self.socket, sid, layers))

    def action_new_session(self) -> None:
        def made(answer: dict | None) -> None:
            if answer:
                self.create_session(answer["prompt"], answer["qos"])
        self.push_screen(NewSession(), made)

    @work(group="rpc")
    async def create_session(self, prompt: str, qos: str) -> None:
        try:
            sid = await rpc(self.socket, lambda c: c.create_session(prompt=prompt, qos=qos), timeout=120)
        except DjinnError as e:
            self.notify(f"cannot create the session: {e}", severity="error", timeout=8)
            return
        self.open_session(sid)

    def ask_close_session(self, sid: int) -> None:
        def answer(yes: bool | None) -> None:
            if yes:
                if isinstance(self.screen, SessionScreen):
                    self.pop_screen()
                self.call_rpc(lambda c: c.close(sid), "close", f"session {sid} closed")
        self.push_screen(Confirm(f"Close session {sid}? Its KV cache and paused forward are dropped."), answer)

    @work(group="rpc")
    async def call_rpc(self, call, what: str, done: str) -> None:
        try:
            await rpc(self.socket, call, timeout=30)
            self.notify(done)
        except DjinnError as e:
            self.notify(f"{what} failed: {e}", severity="error", timeout=8)

    # -- export --------------------------------------------------------------------------------------
    def action_export(self) -> None:
        run = self.current_run() if self.current_mode == "scenarios" else None
        what, folder = exporting.pick_source(run, self.state.status)

        def chosen(fmt: str | None) -> None:
            if fmt:  # copy the events here: the stream appends to them on this thread
                self.export(what, folder, list(self.state.events) if folder is None else [], fmt)
        self.push_screen(ExportPicker(what), chosen)

    @work(group="export", thread=True)
    def export(self, what: str, folder: Path | None, events: list[dict], fmt: str) -> None:
        try:
            n, path = exporting.export_to(folder, events, fmt, self.export_dir)
        except (OSError, ValueError) as e:
            self.call_from_thread(self.notify, f"export failed: {e}", severity="error", timeout=8)
            return
        self.last_export = path
        self.call_from_thread(self.notify, f"exported {what}: {n} records → {path}", title="export", timeout=10)

    # -- daemon --------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        if action == "start_daemon":  # a daemon on this machine's socket only
            return not self.state.attached and not self.starting_daemon and not is_url(self.socket)
        if action == "new_session":
            return self.state.attached
        if action == "switch_mode":  # the footer offers only the other screen
            return parameters[0] != self.current_mode
        return True

    @work(group="daemon", thread=True)
    def action_start_daemon(self) -> None:
        """`djinnd start --detach --socket PATH`, the same command an operator would type."""
        self.starting_daemon = True
        self.call_from_thread(self.refresh_bindings)
        self.call_from_thread(self.notify, f"starting djinnd on {self.socket}…", timeout=5)
        exe = Path(sys.executable).with_name("djinnd")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "djinnd"]
        try:
            p = subprocess.run(cmd + ["start", "--detach", "--socket", str(self.socket)], capture_output=True,
                               text=True, timeout=180, stdin=subprocess.DEVNULL)
            ok, text = p.returncode == 0, (p.stdout + p.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, text = False, str(e)
        self.starting_daemon = False
        self.call_from_thread(self.refresh_bindings)
        self.call_from_thread(self.notify, text or "djinnd started", severity="information" if ok else "error",
                              timeout=8)

    # -- chrome --------------------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, Help):
            self.push_screen(Help())

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Overview", "VRAM plot, sessions, swaps (1)", lambda: self.switch_mode("overview"))
        yield SystemCommand("Scenarios", "launch and watch scenarios (2)", lambda: self.switch_mode("scenarios"))
        yield SystemCommand("Export logs", "the run's or the daemon's log as JSONL, CSV or Chrome trace (e)",
                            self.action_export)
        yield SystemCommand("Help", "keys and what the panes show (?)", self.action_help)
        if not self.state.attached and not is_url(self.socket):
            yield SystemCommand("Start daemon", f"djinnd start --detach --socket {self.socket} (d)",
                                self.action_start_daemon)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="djinn-console", description="The operator console for djinnd.")
    ap.add_argument("--socket", help="daemon socket (default: $DJINN_SOCKET or the standard path)")
    ap.add_argument("--connect", metavar="URL", default=os.environ.get("DJINN_CONNECT"),
                    help="a daemon's tcp://HOST:PORT (its --listen) instead of a socket (default: $DJINN_CONNECT)")
    ap.add_argument("--server-key", metavar="KEY",
                    help="that daemon's public key (default: the one `djinn keys trust` remembered)")
    ap.add_argument("--launch", metavar="SCENARIO", help="launch this scenario once attached (e.g. exp3)")
    ap.add_argument("--export-dir", help="where the export key writes (default: the run folder or logs/exports)")
    ap.add_argument("--fleet", metavar="ADDRESS", nargs="?", const="auto",
                    help="the daemons of a Ray fleet (djinn fleet up) instead of one; ADDRESS: the Ray cluster's")
    ap.add_argument("--replay", metavar="PATH",
                    help="open a finished run without a daemon: its folder (logs/<scenario>/<stamp>) or an events file")
    args = ap.parse_args(argv)
    if args.replay:
        from .replay import main as replay  # a separate app: no socket, no link
        return replay(args.replay)
    if args.fleet:
        opened = _fleet(args.fleet)
        if opened is None:
            return 0
        args.connect, args.server_key = opened
    if args.server_key:
        os.environ["DJINN_SERVER_KEY"] = args.server_key
    DjinnConsole(args.connect or args.socket, launch=args.launch, export_dir=args.export_dir).run()
    return 0


def _fleet(address: str):
    """The fleet view; the (URL, server key) of the daemon opened from it, or None."""
    from djinnd import Fleet
    from .fleet import FleetConsole
    try:
        fleet = Fleet(address)  # joins the Ray cluster here, on the main thread, before the app runs
    except Exception as e:  # noqa: BLE001 - no cluster, no fleet, no Ray: one line
        print(f"djinn-console: no fleet at {address}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return FleetConsole(fleet).run()


if __name__ == "__main__":
    sys.exit(main())
