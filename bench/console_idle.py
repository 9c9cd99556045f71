"""The console's CPU while nothing changes: djinn-console attached to a daemon holding N idle sessions.

Starts a private daemon (tiny-llama on the CPU, socket under /tmp), creates N sessions and lets
them go idle, then runs the console in this process, headless at 200x60 (everything a terminal
would cost but writing the escape sequences), attached to that socket. Over each idle window it
takes this process's CPU time (all its threads; the daemon is another process) over the wall time:
% of a core, and its ratio to the goal (5% of a core at 1,000 sessions). Windows: the Overview with
the sessions table at its top, the same table scrolled to its middle, and the Scenarios screen. The
daemon's own CPU over the same window is shown beside it. Figures only: nothing is asserted.

    python bench/console_idle.py [--sessions 1000] [--seconds 20] [--profile 25]
"""

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.common import load_line, machine_line  # noqa: E402
from console.app import DjinnConsole  # noqa: E402
from console.widgets.sessions import SessionsTable  # noqa: E402
from djinnd import PrivateDaemon  # noqa: E402

GOAL = 0.05  # of a core, at 1,000 idle sessions (the issue)
SIZE = (200, 60)


async def until(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"the console never got {what} within {timeout:.0f} s")
        await asyncio.sleep(0.1)


def rows_shown(app: DjinnConsole) -> int:
    tables = app.screen.query(SessionsTable)
    return tables.first().row_count if tables else 0


async def idle_window(seconds: float, daemon: psutil.Process, profiler: cProfile.Profile | None) -> tuple[float, float]:
    """(console, daemon) CPU over `seconds` of wall time, each as a fraction of one core."""
    d0, c0, w0 = sum(daemon.cpu_times()[:2]), time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    await asyncio.sleep(seconds)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - w0
    return (time.process_time() - c0) / wall, (sum(daemon.cpu_times()[:2]) - d0) / wall


async def measure(socket: Path, daemon: psutil.Process, n: int, seconds: float, settle: float,
                  profiler: cProfile.Profile | None) -> tuple[float, list[tuple[str, float, float]]]:
    """The seconds the console took to show every row, and (window, console CPU, daemon CPU) of each
    window (main prints them: Textual holds print() while it runs)."""
    app = DjinnConsole(socket)
    rows = []
    async with app.run_test(size=SIZE) as pilot:
        t = time.perf_counter()
        await until(lambda: rows_shown(app) == n, 120, f"{n} rows in its table")
        attached = time.perf_counter() - t
        table = app.screen.query_one(SessionsTable)
        windows = [("overview, table at its top", lambda: None),
                   ("overview, table scrolled", lambda: table.move_cursor(row=n // 2, animate=False)),
                   ("scenarios screen", lambda: app.switch_mode("scenarios"))]
        for name, go in windows:
            go()
            await pilot.pause()
            await asyncio.sleep(settle)  # the first redraws after a move are not idle
            rows.append((name, *await idle_window(seconds, daemon, profiler)))
    return attached, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1000, help="idle sessions on the daemon")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each idle window")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds let pass before each window")
    ap.add_argument("--profile", type=int, metavar="N", help="run the windows under cProfile (figures inflated) and "
                                                             "print its N most costly functions (own time)")
    args = ap.parse_args(argv)

    print(machine_line())
    print(load_line())
    daemon = PrivateDaemon("--device", "cpu", "--model", "tiny-llama")
    try:
        t = time.perf_counter()
        daemon.start()
        print(f"private daemon on {daemon.socket} (tiny-llama, cpu), ready in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        with daemon.client() as c:
            for i in range(args.sessions):
                c.create_session(prompt=f"session {i} waits", qos=("interactive", "batch", "realtime")[i % 3])
            states = {s["state"] for s in c.sessions()}
        print(f"{args.sessions} sessions created in {time.perf_counter() - t:.1f} s; their states: {sorted(states)}")
        profiler = cProfile.Profile() if args.profile else None
        attached, rows = asyncio.run(measure(daemon.socket, psutil.Process(daemon.proc.pid), args.sessions, args.seconds,
                                   args.settle, profiler))
    finally:
        daemon.remove()
    print(f"console attached: {args.sessions} rows in its table after {attached:.1f} s ({SIZE[0]}x{SIZE[1]})")

    print(f"\nconsole CPU while idle, {args.sessions} sessions, {args.seconds:g} s a window"
          + (" (under cProfile: inflated)" if profiler else ""))
    print(f"{'window':<28} {'% of a core':>11} {'/ 5% goal':>10} {'daemon % of a core':>19}")
    for name, console, daemon_cpu in rows:
        print(f"{name:<28} {console * 100:>11.2f} {console / GOAL:>10.2f} {daemon_cpu * 100:>19.1f}")
    print(load_line())
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
