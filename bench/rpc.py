"""Round-trip latency of a no-op request (`ping`) to djinnd over its Unix socket.

Starts a private daemon (tiny-llama on the CPU, socket under /tmp) unless `--socket` names a
running one, then times N pings with the blocking `djinnd.client.Client`, one thread and then
several threads each with its own client. Prints p50 / p99 / max in microseconds and requests/s,
and the physical limit measured in the same run: a bare zmq REQ/REP echo of the same frame, its
server a process of its own, and the ping's ratio to it.

    python bench/rpc.py [-n 5000] [--threads 4] [--socket PATH] [--json PATH]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench.common import load_line, machine_line  # noqa: E402
from djinnd import protocol  # noqa: E402
from djinnd import Client, PrivateDaemon, percentile  # noqa: E402


def ping_loop(socket, n: int, warmup: int) -> tuple[list[float], float]:
    """Latencies (seconds) of `n` pings on one client after `warmup` untimed ones, and their wall time."""
    with Client(socket, timeout=10) as c:
        for _ in range(warmup):
            c.ping()
        out = []
        clock = time.perf_counter
        t0 = clock()
        for _ in range(n):
            t = clock()
            c.ping()
            out.append(clock() - t)
        return out, clock() - t0


ECHO_SERVER = "import sys, zmq\ns = zmq.Context().socket(zmq.REP)\ns.bind(sys.argv[1])\nwhile True: s.send(s.recv())"


def echo_loop(n: int, warmup: int) -> tuple[list[float], float]:
    """Latencies of `n` round trips of a ping's frame to a bare zmq echo server: no Python but the loop."""
    folder = Path(tempfile.mkdtemp(prefix="djecho", dir="/tmp"))
    endpoint = f"ipc://{folder / 'echo.sock'}"
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, endpoint])
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        frame = protocol.request("1-1", "ping")
        for _ in range(warmup):
            sock.send(frame)
            sock.recv()
        out, clock = [], time.perf_counter
        t0 = clock()
        for _ in range(n):
            t = clock()
            sock.send(frame)
            sock.recv()
            out.append(clock() - t)
        return out, clock() - t0
    finally:
        sock.close(0)
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def summary(lat: list[float], wall: float) -> dict:
    lat = sorted(lat)
    us = [x * 1e6 for x in lat]
    return {"requests": len(lat), "p50_us": round(percentile(us, 50), 1), "p99_us": round(percentile(us, 99), 1),
            "max_us": round(us[-1], 1), "mean_us": round(statistics.fmean(us), 1),
            "req_per_s": round(len(lat) / wall, 1)}


def run_threads(socket, threads: int, n: int, warmup: int) -> dict:
    """`threads` clients pinging at once, `n` each; aggregate requests/s over the whole wall time."""
    results: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def worker(i):
        with Client(socket, timeout=10) as c:
            for _ in range(warmup):
                c.ping()
            start.wait()
            clock, out = time.perf_counter, results[i]
            for _ in range(n):
                t = clock()
                c.ping()
                out.append(clock() - t)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return summary([x for r in results for x in r], wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="timed requests (per thread in the threaded run)")
    ap.add_argument("--warmup", type=int, default=500, help="untimed requests first")
    ap.add_argument("--threads", type=int, default=4, help="concurrent clients in the second run (0: skip it)")
    ap.add_argument("--socket", help="use this running daemon instead of starting a private one")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    print(machine_line())
    print(load_line())
    daemon = None
    if args.socket:
        socket = Path(args.socket)
    else:
        daemon = PrivateDaemon("--device", "cpu", "--model", "tiny-llama")
        socket = daemon.socket
    try:
        if daemon:
            t = time.perf_counter()
            daemon.start()
            print(f"private daemon on {socket} (tiny-llama, cpu), ready in {time.perf_counter() - t:.1f} s")
        with Client(socket, timeout=10) as c:
            st = c.status()
        dev = st.get("device") or {}
        dev = f"{dev.get('kind')} {dev.get('name')}" if isinstance(dev, dict) else dev
        print(f"daemon: pid {st.get('pid')}, version {st.get('version')}, device {dev}")

        one = summary(*ping_loop(socket, args.n, args.warmup))
        rows = [("1 client", one)]
        many = None
        if args.threads > 0:
            many = run_threads(socket, args.threads, args.n, args.warmup)
            rows.append((f"{args.threads} client threads", many))
        echo = summary(*echo_loop(args.n, args.warmup))
        rows.append(("bare zmq echo", echo))
    finally:
        if daemon:
            daemon.remove()

    print(f"\nping round trip, {args.n} timed requests per client after {args.warmup} warm-up")
    print(f"{'run':<18} {'requests':>8} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>9} {'req/s':>9}")
    for name, r in rows:
        print(f"{name:<18} {r['requests']:>8} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['max_us']:>9.1f} {r['req_per_s']:>9.0f}")
    print(f"ping p50 / bare zmq echo p50: {one['p50_us'] / echo['p50_us']:.2f} (the limit: 1)")
    print(load_line())
    if args.json:
        figures = {"machine": machine_line(), "load": load_line(), "n": args.n, "warmup": args.warmup,
                   "single": one, "bare_zmq_echo": echo, "ratio_to_echo_p50": round(one["p50_us"] / echo["p50_us"], 3),
                   "threads": args.threads, "concurrent": many}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
