"""`djinn plan list | show NAME | run NAME | status NAME | report NAME`: experiment plans (plans.py)."""

import json
import signal

import typer

from . import plans

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Run named plans of scenarios x points x repeats; results in logs/plans/<plan>/<point>/<stamp>/.")


def _load(name: str) -> plans.Plan:
    try:
        return plans.load(name)
    except plans.PlanError as e:
        _fail(str(e))


def _fail(message: str, code: int = 2):
    typer.echo(f"djinn plan: {message}", err=True)
    raise typer.Exit(code)


@app.command("list")
def list_():
    """List the shipped plans."""
    for name in plans.names():
        p = plans.load(name)
        typer.echo(f"{name:<14} {len(p.points):3d} points x {p.repeats}  {p.title}")


@app.command()
def show(name: str = typer.Argument(..., help="plan name, or a path to a .toml file")):
    """Its points: the scenario and the settings of each."""
    p = _load(name)
    typer.echo(f"{p.name}: {p.title}\n{len(p.points)} points, {p.repeats} repeat(s) each; results in {p.folder}")
    for pt in p.points:
        daemon = f" (private djinnd {pt.daemon_args})" if pt.daemon_args else " (private djinnd)" if pt.private_daemon else ""
        typer.echo(f"  {pt.id:<40} {pt.scenario} " + " ".join(f"{k}={v}" for k, v in pt.sets.items()) + daemon)


@app.command()
def run(
    name: str = typer.Argument(..., help="plan name, or a path to a .toml file"),
    point: str = typer.Option(None, "--point", help="run this point only"),
    force: bool = typer.Option(False, "--force", help="run the points' repeats again, done or not"),
    socket: str = typer.Option(None, "--socket", help="daemon socket (default: $DJINN_SOCKET or the standard path)"),
):
    """Run what the plan has not done yet: exit 0 all pass, 1 a verdict failed, 2 a run broke."""
    p = _load(name)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped as Ctrl-C stops it: the run in progress too
    try:
        code = plans.run(p, point, force, socket, typer.echo)
    except plans.PlanError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted: `djinn plan run` again resumes where it stopped", 130)
    raise typer.Exit(code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@app.command()
def status(name: str = typer.Argument(..., help="plan name, or a path to a .toml file"),
           as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Each point: done, failed, pending or running; its verdicts and key figures."""
    p = _load(name)
    rows = plans.status(p)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        verdicts = ", ".join(f"{n} {v}" for v, n in r["verdicts"].items()) or "-"
        figs = "  ".join(f"{k} {plans._cell(f)}" for k, f in list(r["figures"].items())[:3])
        typer.echo(f"{r['point']:<40} {r['state']:<8} {r['finished']}/{r['repeats']}  {verdicts:<16} {figs}")
        if r["state"] == "failed":
            typer.echo(f"{'':<40} {r['reason']}")


@app.command()
def report(name: str = typer.Argument(..., help="plan name, or a path to a .toml file")):
    """Write report.md, report.json and PNG figures (means and 95% intervals) in the plan's folder."""
    for path in plans.report(_load(name)):
        typer.echo(str(path))
