"""`djinn scenario list | show NAME | run NAME`: exit 0 pass, 1 fail, 2 could not run."""

import json
import shlex
import signal
from pathlib import Path

import typer

from djinnd import resolve_socket

from . import catalog

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Reproduce the reference experiments and get a verdict (results in logs/<scenario>/<stamp>/).")


def _fail(message: str, code: int = 2):
    typer.echo(f"djinn scenario: {message}", err=True)
    raise typer.Exit(code)


def _find(name: str) -> catalog.Scenario:
    try:
        sc = catalog.find(name)
    except catalog.ParamError as e:
        _fail(str(e))
    if sc is None:
        _fail(f"unknown scenario {name!r} (known: {', '.join(s.name for s in catalog.all_scenarios())})")
    return sc


@app.command("list")
def list_():
    """List the scenarios."""
    for sc in catalog.all_scenarios():
        typer.echo(f"{sc.name:<10} {sc.title}")


@app.command()
def show(name: str = typer.Argument(..., help="scenario name")):
    """Describe a scenario: its parameters (CPU / CUDA defaults) and pass criteria."""
    typer.echo(_find(name).show())


@app.command()
def run(
    name: str = typer.Argument(..., help="scenario name"),
    headless: bool = typer.Option(False, "--headless", help="no console: progress and the verdict on the terminal"),
    sets: list[str] = typer.Option(None, "--set", help="KEY=VALUE; a list like sessions=[8,16,24] runs a sweep"),
    output: Path = typer.Option(None, "--output", help="results folder (default: logs/<scenario>/<UTC stamp>/)"),
    as_json: bool = typer.Option(False, "--json", help="print results.json (a sweep: summary.json) on stdout"),
    socket: str = typer.Option(None, "--socket", help="daemon socket (default: $DJINN_SOCKET or the standard path)"),
    run_id: int = typer.Option(None, "--run-id", hidden=True, help="the daemon's id for a run it launched"),
    daemon_args: str = typer.Option("", "--daemon-args", help="djinnd start arguments for the private daemon the run "
                                    "starts, e.g. '--host-pool 0' (refused when a daemon answers on the socket)"),
):
    """Run a scenario against the daemon (a private one is started when none answers)."""
    from .harness import run_scenario
    from .report import UI

    sc = _find(name)
    try:
        parsed = sc.parse_sets(sets or [])
    except catalog.ParamError as e:
        _fail(str(e))
    extra = tuple(shlex.split(daemon_args))
    if extra:
        from .harness import connect
        answering = connect(socket)
        if answering is not None:
            answering.close_socket()
            _fail(f"--daemon-args need a private daemon, and djinnd answers on {resolve_socket(socket)}")
    signal.signal(signal.SIGTERM, _interrupt)  # an abort from the daemon: clean up like Ctrl-C
    try:
        code, out = run_scenario(sc, parsed, output, socket, run_id, UI(json_mode=as_json), extra)
    except KeyboardInterrupt:
        _fail("aborted", 130)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    raise typer.Exit(code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":  # python -m scenarios.cli: what a daemon runs, and a source tree without an install
    app(prog_name="djinn scenario")
