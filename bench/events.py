"""The event stream under a flood: events/s a daemon delivers and how fast its status answers meanwhile.

Starts a private daemon (tiny-llama on the CPU, socket under /tmp) as tests/test_telemetry.py does:
a budget with room for about three sessions beside the weights, so sessions swap, and the sampler at
`--sample-hz` (10,000 unless told: a `vram` event every 100 µs). Two windows of `--seconds` each:

* samples only: the sampler's flood, nothing else asked of the daemon;
* samples + swaps: besides, a client thread drives rounds of sessions through the tight budget
  (created, run to breakpoints, resumed, closed: swap_out / swap_in events).

In each window this process asks `status` every `--interval` seconds and times each call (p50 / p99 /
max), and a `ping` after it (p50: the round trip without status's own work); the events the daemon
numbered (`seq` from the first status to the last) give events/s (samples and every other event), and
a subscriber in a process of its own (a bare zmq SUB on the daemon's event socket, counting frames)
gives the events/s delivered to it and any it lost. The daemon is then stopped and its event log read
back: every seq from 1 on, none missing, and the swap events in it.

Against the limits measured in the same run, after the daemon is gone:

* events: djinnd.telemetry.EventBus alone in this process, its file sink to a folder under /tmp, one
  thread emitting `vram` events with the fields of one of the daemon's own samples as fast as it can
  (until the writer thread has written them all): the least an event costs to be numbered, stamped,
  serialised and logged. Printed with the flood's share of it, and the flood against its target;
* status: a bare zmq REQ/REP echo of the same frame (bench/rpc.py's), its server a process of its own:
  the least a round trip over a Unix socket costs. Printed with the ratios of status p50 and ping p50 to it.

Figures only: nothing is asserted but that the daemon answered (a status unanswered within 10 s
ends the run).

    python bench/events.py [--seconds 10] [--sample-hz 10000] [--interval 0.01] [--ref-seconds 2] [-n 2000]
                           [--no-subscriber] [--json PATH]
"""

import argparse
import glob
import json
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_line, machine_line  # noqa: E402
from bench.rpc import echo_loop  # noqa: E402
from djinnd import Client, PrivateDaemon, percentile  # noqa: E402

# tiny-llama's weights are 6,333,056 B; each session driven here holds ~0.6 MB: room for about three
BUDGET = 6_333_056 + 1_800_000
PROMPT = "The capital of France is"
SEQ_AT = len(b'{"seq":')  # every event's JSON starts so (djinnd.telemetry): its seq read without decoding


def seq_of(line: bytes) -> int:
    return int(line[SEQ_AT:line.index(b",", SEQ_AT)])


# A subscriber of its own (its own GIL): counts frames, keeps the last seq; on each line read from
# stdin prints {"n", "last", "t"} so far (one JSON line); ends at EOF. "ready" once the first event came.
SUBSCRIBER = r'''
import json, os, sys, time, zmq
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 200_000)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(sys.argv[1])
at = len(b'{"seq":')
p = zmq.Poller()
p.register(s, zmq.POLLIN)
p.register(0, zmq.POLLIN)
n, last, ready = 0, None, False
while True:
    got = dict(p.poll())
    if s in got:
        while True:
            try:
                line = s.recv_multipart(zmq.NOBLOCK)[-1]
            except zmq.Again:
                break
            n += 1
            last = int(line[at:line.index(b",", at)])
        if not ready:
            ready = True
            print("ready", flush=True)
    if 0 in got:
        data = os.read(0, 4096)
        for _ in range(data.count(b"\n")):
            print(json.dumps({"n": n, "last": last, "t": time.monotonic()}), flush=True)
        if not data:
            break
'''


class Subscriber:
    """The subscriber process: `mark()` returns what it had counted by then."""

    def __init__(self, endpoint: str):
        self.proc = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, endpoint], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        try:
            self._line(30, "first event")
        except SystemExit:
            self.close()
            raise

    def _line(self, timeout: float, what: str) -> str:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise SystemExit(f"the subscriber got no {what} within {timeout:.0f} s")
        return self.proc.stdout.readline()

    def mark(self) -> dict:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self._line(30, "mark"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def drive(c: Client, n: int) -> None:
    """One round: `n` sessions paused under the tight budget (so they swap), then resumed and closed."""
    sids = [c.create_session(prompt=f"{PROMPT} {i}") for i in range(n)]
    for sid in sids:
        c.run_to(sid, layers=[1, 5])
    for sid in sids:
        while c.resume(sid) is None:
            pass
    for sid in sids:
        c.close(sid)


class Driver:
    """A client thread driving rounds of sessions until stopped; counts them, keeps its first error."""

    def __init__(self, socket: Path, sessions: int):
        self.rounds, self.error, self._stop = 0, None, threading.Event()

        def run():
            try:
                with Client(socket, timeout=60) as w:
                    while not self._stop.is_set():
                        drive(w, sessions)
                        self.rounds += 1
            except Exception as e:  # noqa: BLE001 - reported after the window
                self.error = e

        self._thread = threading.Thread(target=run, name="bench-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


def window(c: Client, seconds: float, interval: float, sub: Subscriber | None) -> dict:
    """`status` and a `ping` after it every `interval` s for `seconds`: their latencies, and the events numbered
    and delivered meanwhile."""
    lat, pings, clock = [], [], time.perf_counter
    mark0 = sub.mark() if sub else None
    t = clock()
    st0 = c.status()
    lat.append(clock() - t)
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        t = clock()
        st = c.status()
        lat.append(clock() - t)
        t = clock()
        c.ping()
        pings.append(clock() - t)
        if time.monotonic() >= end:
            break
        time.sleep(interval)
    wall = time.monotonic() - t0
    mark1 = sub.mark() if sub else None
    events = st["seq"] - st0["seq"]
    swaps = sum(st["swap"][k] - st0["swap"][k] for k in ("swap_outs", "swap_ins"))
    ms = sorted(x * 1000 for x in lat)
    out = {"seconds": round(wall, 3), "events": events, "events_per_s": round(events / wall, 1),
           "swaps": swaps, "swaps_per_s": round(swaps / wall, 1), "status_calls": len(ms),
           "status_p50_ms": percentile(ms, 50), "status_p99_ms": percentile(ms, 99), "status_max_ms": round(ms[-1], 3),
           "ping_p50_ms": percentile([x * 1000 for x in pings], 50)}
    if sub:
        got = mark1["n"] - mark0["n"]
        span = mark1["last"] - mark0["last"]  # the seqs published between the two marks
        out.update({"delivered": got, "delivered_per_s": round(got / (mark1["t"] - mark0["t"]), 1),
                    "subscriber_lost": max(0, span - got)})
    return out


def read_log(logs: Path) -> dict:
    """The daemon's event log, read back after it stopped: counts by kind, and whether every seq is there."""
    seqs, swaps, samples = [], 0, 0
    for f in sorted(glob.glob(str(logs / "daemon" / "events-*.jsonl*"))):
        with open(f, "rb") as fh:
            for line in fh:
                seqs.append(seq_of(line))
                if b'"type":"vram"' in line:
                    samples += 1
                elif b'"type":"swap_out"' in line or b'"type":"swap_in"' in line:
                    swaps += 1
    seqs.sort()
    return {"events": len(seqs), "samples": samples, "swap_events": swaps,
            "contiguous": seqs == list(range(1, len(seqs) + 1))}


def bus_limit(seconds: float, fields: dict) -> dict:
    """EventBus alone, its file sink to a folder under /tmp: `vram` events of these fields emitted by one
    thread as fast as it can for `seconds`, timed until the writer thread has written them all."""
    from djinnd.telemetry import EventBus, FileSink
    folder = Path(tempfile.mkdtemp(prefix="djev", dir="/tmp"))
    try:
        bus = EventBus()
        bus.add_sink(FileSink(folder, bus))
        n, clock = 0, time.perf_counter
        t0 = clock()
        end = t0 + seconds
        while clock() < end:
            for _ in range(100):
                bus.emit("vram", **fields)
            n += 100
        emitted = clock() - t0
        bus.close(timeout=120)
        wall = clock() - t0
        written = sum(1 for f in folder.glob("events-*.jsonl*") for _ in open(f, "rb"))
        size = sum(f.stat().st_size for f in folder.glob("events-*.jsonl*"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"events": n, "written": written, "bytes_per_event": round(size / max(written, 1), 1),
            "emit_per_s": round(n / emitted, 1), "events_per_s": round(n / wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    ap.add_argument("--sample-hz", type=float, default=10_000.0, help="the daemon's --sample-hz: the flood")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between two status calls")
    ap.add_argument("--sessions", type=int, default=4, help="sessions in each round of the swap driver")
    ap.add_argument("--ref-seconds", type=float, default=2.0, help="length of the EventBus-alone run")
    ap.add_argument("-n", type=int, default=2000, help="round trips of the bare zmq echo")
    ap.add_argument("--no-subscriber", action="store_true", help="no subscriber process (events/s numbered only)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    print(machine_line())
    print(load_line())
    daemon = PrivateDaemon("--device", "cpu", "--model", "tiny-llama", "--vram-budget", str(BUDGET),
                           "--sample-hz", f"{args.sample_hz:g}")
    sub = driver = None
    try:
        t = time.perf_counter()
        daemon.start()
        print(f"private daemon on {daemon.socket} (tiny-llama, cpu, budget {BUDGET:,} B, --sample-hz {args.sample_hz:g}),"
              f" ready in {time.perf_counter() - t:.1f} s")
        with Client(daemon.socket, timeout=10) as c:
            st = c.status()
            if not args.no_subscriber:
                sub = Subscriber(c.target.events(st))
            rows = [("samples only", window(c, args.seconds, args.interval, sub))]
            driver = Driver(daemon.socket, args.sessions)
            rows.append(("samples + swaps", window(c, args.seconds, args.interval, sub)))
            driver.stop()
            if driver.error:
                raise SystemExit(f"the swap driver failed: {driver.error!r}")
            sample = c.snapshot(samples=1)["samples"][-1]
        if sub:
            sub.close()
            sub = None
        t = time.perf_counter()
        daemon.stop()
        stopped = time.perf_counter() - t
        logged = read_log(daemon.logs)
    finally:
        if driver:
            driver.stop()
        if sub:
            sub.close()
        daemon.remove()
    fields = {k: v for k, v in sample.items() if k not in ("seq", "ts", "mono_ns", "type")}
    bus = bus_limit(args.ref_seconds, fields)
    echo_lat, _ = echo_loop(args.n, min(200, args.n))
    echo_us = sorted(x * 1e6 for x in echo_lat)
    echo = {"round_trips": len(echo_us), "p50_us": percentile(echo_us, 50), "p99_us": percentile(echo_us, 99),
            "max_us": round(echo_us[-1], 1)}

    print(f"\nunder the flood (--sample-hz {args.sample_hz:g}), {args.seconds:g} s a window, "
          f"status every {args.interval:g} s")
    print(f"{'window':<16} {'events/s':>9} {'delivered/s':>11} {'sub lost':>8} {'swaps/s':>8} {'status':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'ping p50':>8}")
    for name, r in rows:
        delivered = (f"{r['delivered_per_s']:>11.0f} {r['subscriber_lost']:>8}" if "delivered" in r
                     else f"{'-':>11} {'-':>8}")
        print(f"{name:<16} {r['events_per_s']:>9.0f} {delivered} {r['swaps_per_s']:>8.1f} {r['status_calls']:>6} "
              f"{r['status_p50_ms']:>7.2f} {r['status_p99_ms']:>7.2f} {r['status_max_ms']:>7.2f} {r['ping_p50_ms']:>8.2f}")
    print(f"event log after stop ({stopped:.1f} s to stop): {logged['events']:,} events ({logged['samples']:,} samples, "
          f"{logged['swap_events']} swap events), seqs 1..{logged['events']:,} contiguous: "
          f"{'yes' if logged['contiguous'] else 'NO'}")
    print(f"limit, EventBus alone (file sink, one emitting thread, {args.ref_seconds:g} s): "
          f"{bus['events_per_s']:,.0f} events/s written ({bus['emit_per_s']:,.0f}/s emitted; "
          f"{bus['written']:,} of {bus['events']:,} written, {bus['bytes_per_event']:.0f} B each)")
    print(f"limit, bare zmq echo ({echo['round_trips']} round trips): p50 {echo['p50_us'] / 1000:.3f} ms, "
          f"p99 {echo['p99_us'] / 1000:.3f} ms, max {echo['max_us'] / 1000:.3f} ms")
    for name, r in rows:
        print(f"{name}: events/s / --sample-hz {r['events_per_s'] / args.sample_hz:.2f} (the target: 1); "
              f"events/s / EventBus alone {r['events_per_s'] / bus['events_per_s']:.3f}; "
              f"status p50 / bare zmq echo p50 {r['status_p50_ms'] * 1000 / echo['p50_us']:.1f}, "
              f"ping p50 / bare zmq echo p50 {r['ping_p50_ms'] * 1000 / echo['p50_us']:.1f} (the limit: 1)")
    print(load_line())
    if args.json:
        figures = {"machine": machine_line(), "load": load_line(), "sample_hz": args.sample_hz, "seconds": args.seconds,
                   "interval": args.interval, "windows": dict(rows), "log": logged, "eventbus_alone": bus,
                   "bare_zmq_echo": echo}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
