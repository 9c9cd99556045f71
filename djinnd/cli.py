"""`djinn`: the command-line client (status, sessions, scenarios, logs)."""

import json
import os
from pathlib import Path

import typer

from . import quickexit
from .cli_fleet import app as fleet_app
from .client import Client, DjinnError
from .sizes import format_size

app = typer.Typer(add_completion=False, no_args_is_help=True, help="djinn: talk to djinnd.")
session_app = typer.Typer(no_args_is_help=True, help="Create, step, pause, inspect, patch, resume and close sessions.")
logs_app = typer.Typer(no_args_is_help=True, help="Export or follow the event log.")
app.add_typer(session_app, name="session")
app.add_typer(logs_app, name="logs")
keys_app = typer.Typer(help="CURVE keys for remote clients (djinn --connect, djinnd start --listen).")
app.add_typer(keys_app, name="keys")
app.add_typer(fleet_app, name="fleet")

SocketOpt = typer.Option(None, "--socket", help="daemon socket (default: $DJINN_SOCKET or the standard path)")
JsonOpt = typer.Option(False, "--json", help="print JSON")
StateDirOpt = typer.Option(None, "--state-dir", help="the daemon's --state-dir, if it was given one")


@app.callback()
def remote_daemon(connect: str = typer.Option(None, "--connect", metavar="URL", envvar="DJINN_CONNECT",
                                              help="talk to the daemon at tcp://HOST:PORT (its --listen) instead of a socket"),
                  server_key: str = typer.Option(None, "--server-key", metavar="KEY",
                                                 help="that daemon's public key (default: the one `djinn keys trust` remembered)")):
    """djinn: talk to djinnd."""
    if connect:
        os.environ["DJINN_CONNECT"] = connect  # every client of this command goes there
    if server_key:
        os.environ["DJINN_SERVER_KEY"] = server_key


def fail(message: str, code: int = 1):
    typer.echo(f"djinn: {message}", err=True)
    raise typer.Exit(code)


def _call(socket, fn):
    """fn(client)'s result; a DjinnError is one line and exit 2 (no daemon) or 1."""
    try:
        with Client(socket) as c:
            return fn(c)
    except DjinnError as e:
        fail(str(e), 2 if e.code == "no_daemon" else 1)


def print_status(socket, as_json: bool) -> None:
    st = _call(socket, Client.status)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    m, sw, mdl = st["memory"], st["swap"], st["model"]
    lines = [
        f"djinnd {st['version']}  pid {st['pid']}  up {st['uptime_s']:.0f} s",
        f"socket   {st['socket']}",
        f"device   {st['device']['kind']} ({st['device']['name']}, {st['device']['dtype']})",
        f"model    {mdl['name']} ({mdl.get('family', '?')}): {mdl['num_layers']} layers, {format_size(mdl['weights_bytes'])} of weights, "
        f"{format_size(mdl['kv_bytes_per_token'])}/token of KV",
        f"sessions {st['sessions']}",
        f"memory   {format_size(m['device_bytes'])} of {format_size(m['budget_bytes'])} budget "
        f"(peak {format_size(m['peak_device_bytes'])}), host {format_size(m['host_bytes'])}, disk {format_size(m['disk_bytes'])}",
        f"swaps    {sw['swap_outs']} out, {sw['swap_ins']} in, p50 {sw['latency_ms']['p50']} ms",
    ]
    if st.get("listen"):
        lines.append(f"remote   {st['listen']['url']} (events {st['listen']['events_url']}), key {st['listen']['server_key']}")
    if st.get("metrics_url"):
        lines.append(f"metrics  {st['metrics_url']}")
    typer.echo("\n".join(lines))


@app.command()
def status(socket: str = SocketOpt, as_json: bool = JsonOpt):
    """Show the daemon's state."""
    print_status(socket, as_json)


# -- sessions --------------------------------------------------------------------------------------
def _out(obj, as_json=True):
    typer.echo(json.dumps(obj, indent=2) if as_json else obj)


@session_app.command("create")
def session_create(prompt: str = typer.Argument(..., help="prompt text"), qos: str = typer.Option("interactive"),
                   socket: str = SocketOpt):
    """Create a session; prints its id."""
    typer.echo(_call(socket, lambda c: c.create_session(prompt=prompt, qos=qos)))


@session_app.command("list")
def session_list(socket: str = SocketOpt, as_json: bool = JsonOpt):
    """List sessions."""
    rows = _call(socket, Client.sessions)
    if as_json:
        return _out(rows)
    typer.echo(f"{'id':>4} {'state':8} {'layer':>5} {'where':6} {'bytes':>10} {'qos':12} swaps")
    for s in rows:
        layer = "" if s["layer"] is None else s["layer"]
        nbytes = s["device_bytes"] or s["host_bytes"] or s["disk_bytes"]
        restored = "  restored" if s.get("restored") else ""  # by a restart, until its first forward since
        typer.echo(f"{s['id']:>4} {s['state']:8} {layer:>5} {s['location']:6} {format_size(nbytes):>10} {s['qos']:12} "
                   f"{s['swaps']}{restored}")


@session_app.command("show")
def session_show(sid: int, socket: str = SocketOpt):
    """Show one session."""
    _out(_call(socket, lambda c: c.session(sid)))


@session_app.command("generate")
def session_generate(sid: int, n: int = typer.Option(1, "-n", help="tokens to generate"), socket: str = SocketOpt,
                     as_json: bool = JsonOpt):
    """Generate n greedy tokens; prints their text (ids and text with --json)."""
    def generate(c):
        tokens = c.generate(sid, n)
        return {"tokens": tokens, "text": c.text(tokens)}
    got = _call(socket, generate)
    if as_json:
        return _out(got)
    typer.echo(got["text"])


@session_app.command("run-to")
def session_run_to(sid: int, layers: list[int] = typer.Argument(..., help="decoder layers to pause after"),
                   socket: str = SocketOpt):
    """Run the next forward to a breakpoint and pause there."""
    _out(_call(socket, lambda c: c.run_to(sid, layers=layers)))


@session_app.command("inspect")
def session_inspect(sid: int, socket: str = SocketOpt):
    """Statistics of the paused layer's output."""
    _out(_call(socket, lambda c: c.inspect(sid)))


@session_app.command("lens")
def session_lens(sid: int, top_k: int = typer.Option(5, "--top-k", help="how many tokens"),
                 position: int = typer.Option(-1, "--position", help="token position of the paused forward (-1: the last)"),
                 socket: str = SocketOpt, as_json: bool = JsonOpt):
    """At a pause: the next tokens the paused hidden state predicts (the logit lens)."""
    got = _call(socket, lambda c: c.lens(sid, top_k, position))
    if as_json:
        return _out(got)
    typer.echo(f"layer {got['layer']}, position {got['position']}:")
    for t in got["top"]:
        typer.echo(f"  {t['prob']:7.2%}  {t['token']:>6}  {t['text']!r}")


@session_app.command("patch")
def session_patch(sid: int, op: str = typer.Argument(..., help="set | add | scale"), value: float = typer.Argument(...),
                  positions: str = typer.Option(None, help="comma-separated token positions"),
                  channels: str = typer.Option(None, help="comma-separated channels"), socket: str = SocketOpt):
    """Patch the paused hidden state."""
    if op not in ("set", "add", "scale"):
        fail(f"unknown patch op {op!r} (choose set, add, scale)", 2)
    try:
        at = {k: [int(x) for x in v.split(",")] for k, v in (("positions", positions), ("channels", channels)) if v}
    except ValueError:
        fail("--positions and --channels take comma-separated integers", 2)
    _out(_call(socket, lambda c: c.patch(sid, **{op: value}, **at)))


@session_app.command("resume")
def session_resume(sid: int, socket: str = SocketOpt, as_json: bool = JsonOpt):
    """Resume a paused session: the next token's text, or the layer it paused at again (both with --json)."""
    def resume(c):
        token = c.resume(sid)
        if token is None:
            return {"state": "paused", "layer": c.session(sid)["layer"]}
        return {"state": "idle", "token": token, "text": c.text([token])}
    got = _call(socket, resume)
    if as_json:
        return _out(got)
    typer.echo(got["text"] if got["state"] == "idle" else f"paused at layer {got['layer']}")


@session_app.command("phase")
def session_phase(sid: int, phase: str = typer.Argument(..., help="IO_WAIT | COMPUTE"),
                  expected_ms: float = typer.Option(None, "--expected-ms"), socket: str = SocketOpt):
    """Signal a phase (IO_WAIT lets the daemon swap the session out and prefetch it back)."""
    _out(_call(socket, lambda c: c.signal_phase(sid, phase, expected_ms)))


@session_app.command("close")
def session_close(sid: int, socket: str = SocketOpt):
    """Close a session and free its memory."""
    _call(socket, lambda c: c.close(sid))
    typer.echo(f"closed {sid}")


# -- logs ------------------------------------------------------------------------------------------
@logs_app.command("export")
def logs_export(run: Path = typer.Option(None, "--run", help="a scenario run folder"),
                since: str = typer.Option(None, "--since", help="ISO time or an age like 10m"),
                fmt: str = typer.Option("jsonl", "--format", help="jsonl | csv | chrome-trace"),
                output: Path = typer.Option(None, "-o", "--output", help="file to write (default: stdout)"),
                logs: Path = typer.Option(None, "--logs", help="logs folder (default: ./logs)")):
    """Export a run's or the daemon's events."""
    from . import export, paths
    source = run or (logs or paths.default_logs_dir()) / "daemon"
    try:
        n, path = export.export(source, fmt, output, since=since)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), 2)
    if path:
        typer.echo(f"wrote {n} records to {path}", err=True)


@logs_app.command("tail")
def logs_tail(socket: str = SocketOpt, samples: bool = typer.Option(False, "--samples", help="show vram samples too")):
    """Follow the live event stream."""
    from rich.console import Console
    from .export import tail_lines
    console = Console()
    try:
        with Client(socket) as c, c.subscribe() as sub:
            while True:
                ev = sub.recv(1.0)
                if ev is not None and (samples or ev["type"] != "vram"):
                    console.print(tail_lines(ev))
    except DjinnError as e:
        fail(str(e), 2)
    except KeyboardInterrupt:
        pass


@keys_app.callback(invoke_without_command=True)
def keys(ctx: typer.Context):
    """Make (once) and show this user's public key, which a daemon's `djinn keys authorize` lets in."""
    if ctx.invoked_subcommand is None:
        from . import remote
        _show_key(remote.CLIENT, remote.config_dir())


@keys_app.command("server")
def keys_server(socket: str = SocketOpt, state_dir: Path = StateDirOpt):
    """Make (once) and show the daemon's public key, which its remote clients `djinn keys trust`."""
    from . import remote
    _show_key(remote.SERVER, _keys_folder(socket, state_dir))


# A Z85 key may begin with "-": taken as the KEY argument, not as an unknown option
KEY_ARGS = {"ignore_unknown_options": True}


@keys_app.command("authorize", context_settings=KEY_ARGS)
def keys_authorize(key: str = typer.Argument(..., help="a client's public key (what `djinn keys` shows there)"),
                   socket: str = SocketOpt, state_dir: Path = StateDirOpt):
    """Let the client holding KEY connect over the daemon's --listen (no restart needed)."""
    from . import remote
    folder = _keys_folder(socket, state_dir)
    path = folder / "authorized_keys"
    try:
        key = remote.check_key(key)
    except ValueError as e:
        fail(str(e), 2)
    if path.exists() and key in remote.read_keys(path):
        typer.echo(f"{key} is already in {path}")
        return
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
        f.write(key + "\n")
    typer.echo(f"authorized {key} in {path}")


@keys_app.command("trust", context_settings=KEY_ARGS)
def keys_trust(url: str = typer.Argument(..., help="the daemon's tcp://HOST:PORT"),
               key: str = typer.Argument(..., help="its public key (what `djinn keys server` shows there)")):
    """Remember KEY as the public key of the daemon at URL, for `djinn --connect URL`."""
    from . import remote
    try:
        typer.echo(f"trusting {key} at {url} (in {remote.trust(url, key)})")
    except ValueError as e:
        fail(str(e), 2)


def _keys_folder(socket, state_dir) -> Path:
    from . import paths
    return paths.keys(paths.resolve_socket(socket), state_dir)


def _show_key(name: str, folder: Path) -> None:
    from . import remote
    public, _ = remote.keypair(folder, name)
    typer.echo(public)
    typer.echo(f"(the {name}'s public key; its secret is in {folder / (name + '.key_secret')}, mode 0600)", err=True)


def _add_commands():
    from .plugins import commands
    for name, sub in commands():  # `djinn scenario`, from the scenarios package
        app.add_typer(sub, name=name)


_add_commands()


def main():
    quickexit.run(lambda: app(prog_name="djinn"))


if __name__ == "__main__":
    main()
