"""djinnd's lifecycle: one daemon per socket, foreground (systemd Type=notify) or detached.

The pidfile is locked for the daemon's whole life (pidfile.py).
"""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from . import heap, logsetup, paths, sdnotify
from .pidfile import AlreadyRunning, is_locked, lock_pidfile, read_pid

log = logging.getLogger("djinnd")


def prepare_folder(sock: Path) -> None:
    """The socket folder: created 0700; an existing one of ours is tightened to 0700."""
    folder = sock.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if folder.stat().st_uid == os.getuid():
        os.chmod(folder, 0o700)


def default_capacity(device) -> int:
    import psutil
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def default_budget(device, capacity: int, weights: int) -> int:
    """CUDA: the card less 10% headroom for the allocator and activations. CPU: weights + 1 GiB."""
    if device.type == "cuda":
        return int(capacity * 0.9)
    return weights + (1 << 30)


def default_host_pool(device) -> int:
    import psutil
    if device.type == "cuda":  # half the host memory, at most 96 GiB, in whole GiB (pinned exactly)
        return min(psutil.virtual_memory().total // 2, 96 << 30) >> 30 << 30
    return 1 << 30


def default_max_batch(device) -> int:
    """Decode steps per forward: a batch reads the weights once for all its rows; past these sizes a
    row's own work (its attention call) outweighs what it saves, and a realtime step waits longer."""
    return 64 if device.type == "cuda" else 32


def run_foreground(config) -> int:
    """Serve until SIGTERM/SIGINT or a `shutdown` request; 0 on a clean stop (config: a DaemonConfig)."""
    logsetup.setup()
    sys.setswitchinterval(0.001)  # hand the GIL over often: status must be answered while forwards run
    heap.limit_arenas()  # before its threads start
    sock = config.socket
    prepare_folder(sock)
    try:
        lock_fd = lock_pidfile(sock)
    except AlreadyRunning as e:
        log.error("%s", e)
        return 1
    try:
        rt, bus = _runtime(config)
    except Exception as e:  # noqa: BLE001 - a model that cannot load (a bad file, an unservable family) stops it
        first = (str(e).splitlines() or [""])[0]
        log.error("cannot start: %s", first if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {first}")
        _cleanup(sock, lock_fd)
        return 2
    try:
        journal = _restore(config, rt)
    except Exception as e:  # noqa: BLE001 - a folder it cannot write: a one-line refusal, not a traceback
        log.error("cannot start: journal %s: %s", paths.journal(sock, config.state_dir), e)
        _cleanup(sock, lock_fd)
        rt.mem.disk.cleanup()
        return 2
    try:
        return _serve(config, rt, bus)
    finally:
        journal.close()
        _cleanup(sock, lock_fd)
        rt.mem.disk.cleanup()


def _restore(config, rt):
    """The session journal opened, and the sessions it holds back in `rt` (paused ones paused again)
    before the daemon serves; --fresh removes it first."""
    from .journal import Journal
    t0 = time.monotonic()
    journal = Journal(paths.journal(config.socket, config.state_dir), rt.lm.name, fresh=config.fresh)
    restored = rt.restore(journal)
    rt.mem.disk.sweep()  # the swap files not taken back
    if restored:
        paused = sum(s.state == "paused" for s in restored)
        disk = sum(s.location == "disk" for s in restored)
        log.info("restored %d sessions (%d paused, %d with their KV in the disk tier) from %s in %.1f s",
                 len(restored), paused, disk, journal.path, time.monotonic() - t0)
    return journal


def _runtime(config):
    """The model loaded, and the runtime over it with its budget, pools and scheduler."""
    from .models import load_model, parse_dtype, resolve_device
    from .runtime import Runtime
    from .scheduler import DeviceLock
    from .telemetry import EventBus, FileSink

    dev = resolve_device(config.device)
    if dev.type == "cpu":  # sessions compute one at a time: more intra-op threads only contend, unless asked for
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))  # (a forked daemon's OpenMP read it before)
    t0 = time.monotonic()
    lm = load_model(config.model, dev, parse_dtype(config.dtype))
    capacity = default_capacity(dev)
    budget = config.vram_budget or default_budget(dev, capacity, lm.weights_bytes)
    pool = config.host_pool if config.host_pool is not None else default_host_pool(dev)
    bus = EventBus()
    bus.add_sink(FileSink(config.logs_dir / "daemon", bus))
    lock = DeviceLock(fcfs=config.qos == "off", escalation_s=config.escalation_ms / 1000 if config.escalation_ms else None,
                      shares=config.qos_shares, max_concurrency=config.max_concurrency, lifo=config.lifo,
                      max_batch=config.max_batch or default_max_batch(dev))
    rt = Runtime(lm, bus, budget, pool, config.spill_dir or paths.spill(config.socket), capacity, lock,
                 prefill_chunk=config.prefill_chunk)
    if lm.batch_error:
        log.warning("decode steps run one at a time: %s", lm.batch_error)
    log.info("model %s loaded on %s in %.1f s (%s of weights, budget %s)", lm.name, dev, time.monotonic() - t0,
             lm.weights_bytes, budget)
    return rt, bus


def _listener(config):
    """--listen's address with the daemon's key pair (made at its first start) and authorized-keys file."""
    if config.listen is None:
        return None
    from .remote import SERVER, keypair
    from .server import Listener
    folder = paths.keys(config.socket, config.state_dir)
    authorized = config.authorized_keys or folder / "authorized_keys"
    return Listener(config.listen, keypair(folder, SERVER), authorized)


def _serve(config, rt, bus) -> int:
    """The sockets, the metrics endpoint and the sampler around the runtime, until told to stop."""
    from .plugins import scenario_catalog
    from .scenario_runs import ScenarioRuns
    from .server import PubSink, Server, chmod_socket
    from .service import Service
    from .telemetry import Sampler

    sock, events_sock = config.socket, paths.events_socket(config.socket)
    tcp = _listener(config)
    old_umask = os.umask(0o077)
    try:
        pub = PubSink(zmq.Context.instance(), paths.endpoint(events_sock), tcp)
        bus.add_sink(pub)
        catalog = scenario_catalog()
        runs = ScenarioRuns(sock, config.logs_dir, bus, catalog) if catalog else None
        service = Service(rt, bus, sock, events_sock, runs, config.logs_dir, config.state_dir)
        server = Server(service, paths.endpoint(sock), busy_poll_s=config.busy_poll_us / 1e6, tcp=tcp)
    except zmq.ZMQError as e:  # the TCP address is taken or not this machine's
        log.error("cannot listen on %s: %s", config.listen, e)
        bus.close()
        return 2
    finally:
        os.umask(old_umask)
    if tcp is not None:
        service.listen = {"url": server.url, "events_url": pub.url, "server_key": tcp.keys[0],
                          "authorized_keys": str(tcp.authorized)}
        log.info("serving remote clients on %s (events on %s), CURVE key %s, authorized keys in %s",
                 server.url, pub.url, tcp.keys[0], tcp.authorized)
    chmod_socket(sock)
    chmod_socket(events_sock)
    metrics = None
    if config.metrics_port is not None:
        from .metrics import MetricsServer
        try:
            metrics = MetricsServer(service, config.metrics_port)
        except OSError as e:
            log.error("cannot serve metrics on 127.0.0.1:%d: %s", config.metrics_port, e)
            server.close()
            bus.close()
            return 2
        service.metrics_url = metrics.url
        metrics.start()
    sampler = Sampler(bus, rt.mem, rt.lm.device, config.sample_hz, rt.device_lock)
    sampler.start()

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        bus.emit("daemon", action="started", pid=os.getpid(), socket=str(sock), model=rt.lm.name, device=str(rt.lm.device))
        sdnotify.notify("READY=1\nSTATUS=serving")
        pings = loop.create_task(_watchdog(sdnotify.watchdog_interval()))
        log.info("serving on %s (events on %s)", sock, events_sock)
        await server.serve()
        pings.cancel()
        sdnotify.notify("STOPPING=1")
        log.info("stopping: closing %d sessions", len(rt.sessions))
        rt.stopping = True  # generates in flight end at their next token: the drain waits for little
        await server.drain(5)
        if service.scenarios is not None:  # none without the scenarios package's catalog
            service.scenarios.abort_all()
        rt.detach_journal()  # the sessions closed now stay in the journal: the next start restores them
        rt.keep_swap_files()  # idle sessions' KV in the disk tier: the next start takes it back
        await loop.run_in_executor(None, rt.close_all)

    try:
        asyncio.run(main())
    finally:
        if metrics is not None:
            metrics.stop()
        sampler.stop()
        bus.emit("daemon", action="stopped", pid=os.getpid())
        bus.close()
        server.close()
    log.info("stopped")
    return 0


async def _watchdog(interval: float | None) -> None:
    """Ping systemd's watchdog (WatchdogSec=) from the serving loop itself: a loop that stops turning
    stops the pings, and systemd restarts the daemon."""
    while interval is not None:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _cleanup(sock: Path, lock_fd) -> None:
    for p in (sock, paths.events_socket(sock), paths.pidfile(sock)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    os.close(lock_fd)


def start_detached(argv: list[str], sock: Path, log_file: Path, timeout: float = 120.0) -> int:
    """Start the daemon in its own session and return once it serves (its pid), or raise RuntimeError."""
    from .private import wait_serving
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "djinnd", "start", *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    why = wait_serving(proc, sock, timeout)
    if why is None:
        return proc.pid
    if proc.poll() is None:
        proc.terminate()
    tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    raise RuntimeError(f"djinnd {why} on {sock}: {tail[0]} (log: {log_file})")


def stop(sock: Path, timeout: float = 30.0) -> str:
    """Ask the daemon to stop, then wait for it to go; SIGTERM it if it does not answer."""
    from .client import Client, DjinnError
    pid = read_pid(sock)
    if not is_locked(sock):
        raise RuntimeError(f"no djinnd is running on {sock}")
    try:
        with Client(sock, timeout=5) as c:
            c.shutdown()
    except DjinnError:
        if pid:
            with contextlib.suppress(ProcessLookupError):  # it went while we waited for its answer
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_locked(sock):
            return f"djinnd (pid {pid}) stopped"
        time.sleep(0.05)
    raise RuntimeError(f"djinnd (pid {pid}) did not stop within {timeout:.0f} s")
