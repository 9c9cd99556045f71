"""`djinnd start | stop | status`."""

import os
import sys
from pathlib import Path

import typer

from . import paths, quickexit

app = typer.Typer(add_completion=False, no_args_is_help=True, help="djinnd: one model, many sessions, one GPU.")

SocketOpt = typer.Option(None, "--socket", help="request socket (default: $DJINN_SOCKET, $XDG_RUNTIME_DIR/djinn/djinnd.sock, /tmp/djinn-$UID/djinnd.sock)")


@app.command()
def start(
    detach: bool = typer.Option(False, "--detach", help="run in the background; return once it serves"),
    socket: str = SocketOpt,
    device: str = typer.Option("auto", help="auto | cpu | cuda:N"),
    model: str = typer.Option("tiny-llama", help="tiny-llama, llama-2-7b, llama-2-13b, or a local checkpoint path"),
    vram_budget: str = typer.Option(None, "--vram-budget", help="device-memory budget, e.g. 70GiB (CPU: an accounting limit)"),
    host_pool: str = typer.Option(None, "--host-pool", help="host swap pool size, e.g. 32GiB"),
    dtype: str = typer.Option(None, help="fp32 | fp16 | bf16 (default: fp32 on CPU, bf16 on CUDA)"),
    logs: Path = typer.Option(None, help="folder for the event log (default: ./logs)"),
    spill_dir: Path = typer.Option(None, "--spill-dir", help="disk tier folder (default: beside the socket)"),
    state_dir: Path = typer.Option(None, "--state-dir", help="folder of the session journal, which brings the sessions back at the next start (default: beside the socket)"),
    fresh: bool = typer.Option(False, "--fresh", help="start with no sessions: remove the journal instead of restoring it"),
    sample_hz: float = typer.Option(10.0, "--sample-hz", help="memory samples per second"),
    qos: str = typer.Option("on", help="on: serve realtime > interactive > batch; off: first come first served"),
    escalation_ms: float = typer.Option(None, "--escalation-ms", help="serve a request waiting this long ahead of its class"),
    qos_shares: str = typer.Option(None, "--qos-shares", help="share device time by class, e.g. realtime=0.1,interactive=0.7,batch=0.2 (default: strict priority)"),
    max_concurrency: int = typer.Option(1, "--max-concurrency", help="at most N sessions with a forward in flight"),
    max_batch: int = typer.Option(None, "--max-batch", help="decode steps of up to N sessions share one forward (1: no batching; default 32 on the CPU, 64 on CUDA)"),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="a prompt's prefill feeds at most N tokens a forward; decode steps run between chunks"),
    lifo: bool = typer.Option(False, "--lifo", help="under overload (more waiters than slots) serve the newest request of a class first"),
    metrics_port: int = typer.Option(None, "--metrics-port", help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port)"),
    busy_poll_us: float = typer.Option(1000, "--busy-poll-us", help="after a request answered on the I/O loop (a decode step, status), poll for the next this long before sleeping (0: off)"),
    listen: str = typer.Option(None, "--listen", help="also serve remote clients at tcp://HOST:PORT (events on PORT+1; 0: any free ports), encrypted with CURVE, for the keys in the authorized-keys file"),
    authorized_keys: Path = typer.Option(None, "--authorized-keys", help="clients' public keys allowed over --listen, one a line (default: authorized_keys in the keys folder beside the socket or in --state-dir)"),
    print_config: bool = typer.Option(False, "--print-config", help="print the settings as the daemon would take them, and exit"),
):
    """Start the daemon (foreground by default, as systemd Type=notify wants)."""
    from .config import DaemonConfig
    from .daemon import run_foreground, start_detached
    from .pidfile import is_locked, read_pid
    sock = paths.resolve_socket(socket)
    try:
        config = DaemonConfig.parse(
            socket=sock, logs_dir=(logs or paths.default_logs_dir()).absolute(), device=device, model=model,
            vram_budget=vram_budget, host_pool=host_pool, dtype=dtype, spill_dir=spill_dir, sample_hz=sample_hz,
            state_dir=state_dir.absolute() if state_dir else None, fresh=fresh,
            qos=qos, escalation_ms=escalation_ms, qos_shares=qos_shares, max_concurrency=max_concurrency, lifo=lifo,
            max_batch=max_batch, prefill_chunk=prefill_chunk, metrics_port=metrics_port, busy_poll_us=busy_poll_us,
            listen=listen, authorized_keys=authorized_keys.absolute() if authorized_keys else None)
    except ValueError as e:
        _fail(str(e), 2)
    if print_config:
        typer.echo(config.show())
        return
    if is_locked(sock):
        _fail(f"djinnd is already running on {sock} (pid {read_pid(sock) or '?'}); stop it with `djinnd stop` first")
    if detach:
        argv = [a for a in sys.argv[1:] if a not in ("start", "--detach")]
        if "--socket" not in argv:
            argv += ["--socket", str(sock)]
        if "--logs" not in argv:
            argv += ["--logs", str(config.logs_dir)]
        try:
            pid = start_detached(argv, sock, config.logs_dir / "daemon" / "djinnd.log")
        except RuntimeError as e:
            _fail(str(e))
        typer.echo(f"djinnd started (pid {pid}) on {sock}")
        return
    raise typer.Exit(run_foreground(config))


@app.command()
def stop(socket: str = SocketOpt, timeout: float = typer.Option(30.0, help="seconds to wait for it to go")):
    """Stop the daemon gracefully (sessions closed, logs flushed, socket removed)."""
    from .daemon import stop as stop_daemon
    try:
        typer.echo(stop_daemon(paths.resolve_socket(socket), timeout))
    except RuntimeError as e:
        _fail(str(e))


@app.command()
def status(socket: str = SocketOpt, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Show the daemon's pid, uptime, device, model, memory and swap counters."""
    from .cli import print_status
    print_status(socket, as_json)


def _fail(message: str, code: int = 1):
    typer.echo(f"djinnd: {message}", err=True)
    raise typer.Exit(code)


def prepare_env() -> None:
    """The environment torch must read before it allocates (the fork server calls it too)."""
    # Transparent huge pages for large CPU tensors (set before torch allocates): a swap-in then
    # faults in 2 MiB pages, not 4 KiB ones, several times faster.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Expandable segments on CUDA (set before CUDA starts): slabs that grow leave no stranded blocks,
    # so what the allocator reserves stays close to what the books charge.
    name = "PYTORCH_ALLOC_CONF" if "PYTORCH_ALLOC_CONF" in os.environ else "PYTORCH_CUDA_ALLOC_CONF"  # torch reads the first
    conf = os.environ.get(name, "")
    if "expandable_segments" not in conf:
        os.environ[name] = ",".join(filter(None, [conf, "expandable_segments:True"]))


def main():
    prepare_env()
    quickexit.run(lambda: app(prog_name="djinnd"))
