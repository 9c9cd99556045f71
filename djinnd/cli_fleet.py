"""`djinn fleet up | status | down`: djinnd on every GPU of a Ray cluster (djinnd/fleet.py)."""

import json

import typer

from .protocol import DjinnError
from .sizes import format_size

app = typer.Typer(no_args_is_help=True, help="Many daemons on a Ray cluster (needs Ray: the fleet extra of djinn).")
AddressOpt = typer.Option(None, "--address", help="the Ray cluster (default: the one running here, `ray start --head`)")


def _fleet():
    try:
        from . import fleet
    except ImportError as e:
        raise _fail(f"the fleet needs Ray: pip install 'djinn[fleet]' ({e})", 2) from None
    return fleet


def _fail(message: str, code: int = 1):
    typer.echo(f"djinn fleet: {message}", err=True)
    return typer.Exit(code)


@app.command()
def up(daemons: int = typer.Option(None, "--daemons", help="how many (default: one per GPU of the cluster, else one)"),
       cpu: bool = typer.Option(False, "--cpu", help="a CPU each instead of a GPU each"),
       address: str = AddressOpt,
       djinnd_args: list[str] = typer.Argument(None, help="after --: arguments for each djinnd start (e.g. -- --vram-budget 60GiB)")):
    """Start daemons on the cluster, one per bundle of a placement group."""
    fleet = _fleet()
    try:
        for info in fleet.up(daemons, False if cpu else None, tuple(djinnd_args or ()), address):
            typer.echo(f"{info['name']}  {info['url']}  on {info['host']} (node {info['node'][:8]}, GPUs {info['gpus']})")
    except (DjinnError, ConnectionError) as e:
        raise _fail(str(e)) from None


@app.command()
def status(address: str = AddressOpt, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Every daemon: state, memory, sessions, swaps; dead ones with the sessions lost."""
    fleet = _fleet()
    try:
        got = fleet.Fleet(address).status()
    except (DjinnError, ConnectionError, ValueError) as e:
        raise _fail(f"no fleet: {e}") from None
    if as_json:
        typer.echo(json.dumps(got, indent=2, default=str))
        return
    for name, row in sorted(got["daemons"].items()):
        st = row.get("status")
        if st is None:
            typer.echo(f"{name:10} {row['state']:9} lost sessions: {', '.join(row.get('lost', [])) or 'none'}  ({row.get('why', '')})")
            continue
        m, sw = st["memory"], st["swap"]
        typer.echo(f"{name:10} {row['state']:9} {row['url']:24} {format_size(m['device_bytes'])} of "
                   f"{format_size(m['budget_bytes'])} (peak {format_size(m['peak_device_bytes'])})  "
                   f"{st['sessions']} sessions  swaps {sw['swap_outs']} out {sw['swap_ins']} in")
    for mv in got["moves"][-5:]:
        typer.echo(f"moved {mv['session']} {mv['from']} -> {mv['to']} in {mv['seconds'] * 1000:.0f} ms ({format_size(mv['bytes'])})")


@app.command()
def down(address: str = AddressOpt):
    """Stop every daemon of the fleet and its registry (their journals stay for the next up)."""
    fleet = _fleet()
    try:
        names = fleet.down(address)
    except ConnectionError as e:
        raise _fail(str(e)) from None
    typer.echo(f"stopped {len(names)} daemon(s): {', '.join(names) or 'none'}")
