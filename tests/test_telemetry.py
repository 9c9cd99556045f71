"""Issue 5: one event stream, to subscribers and to the log, with sequence numbers and two clocks."""

import datetime as dt
import glob
import json
import threading
import time

import pytest

from djinnd.export import read_events

from conftest import djinn

PROMPT = "The capital of France is"


def drive(c, n=6, layers=(1, 5)):
    """Sessions paused under a tight budget, so swaps happen, then resumed and closed."""
    sids = [c.create_session(prompt=f"{PROMPT} {i}") for i in range(n)]
    for sid in sids:
        c.run_to(sid, layers=list(layers))
    for sid in sids:
        while c.resume(sid) is None:
            pass
    for sid in sids:
        c.close(sid)
    return sids


def log_events(d):
    return [json.loads(line) for f in sorted(glob.glob(str(d.logs / "daemon" / "events-*.jsonl*"))) for line in open(f)]


def tight(make_daemon, *extra):
    # weights 6.3 MB; each session here holds ~0.6 MB: room for about three
    return make_daemon("--device", "cpu", "--vram-budget", str(6_333_056 + 1_800_000), *extra)


def test_every_swap_and_session_event_in_order_in_the_stream_and_the_log(make_daemon):
    d = tight(make_daemon)
    seen = []
    with d.client() as c, c.subscribe() as sub:
        time.sleep(0.3)  # the subscription is live before we drive
        sids = drive(c)
        last = c.status()["seq"]
        while not seen or seen[-1]["seq"] < last:
            ev = sub.recv(5.0)
            assert ev is not None, "the stream stopped"
            seen.append(ev)
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap in the stream"
    kinds = {e["type"] for e in seen}
    assert {"vram", "session", "swap_out", "swap_in"} <= kinds
    actions = [(e["session"], e["action"]) for e in seen if e["type"] == "session"]
    for sid in sids:
        mine = [a for s, a in actions if s == sid]
        assert mine[0] == "created" and mine[-1] == "closed" and "paused" in mine and "resumed" in mine
    d.stop()
    logged = log_events(d)
    by_seq = {e["seq"]: e for e in logged}
    assert sorted(by_seq) == list(range(1, max(by_seq) + 1)), "a gap in the log"
    for e in seen:
        assert by_seq[e["seq"]] == e


def test_timestamps_are_utc_iso8601_and_mono_ns_never_goes_back(make_daemon):
    d = tight(make_daemon)
    with d.client() as c:
        drive(c, n=3)
    d.stop()
    events = log_events(d)
    assert len(events) > 10
    prev = 0
    for e in sorted(events, key=lambda e: e["seq"]):
        assert e["ts"].endswith("Z") and len(e["ts"]) == len("2026-11-22T14:15:03.123Z")
        t = dt.datetime.fromisoformat(e["ts"])
        assert t.tzinfo == dt.timezone.utc
        assert abs((t - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 600
        assert e["mono_ns"] >= prev
        prev = e["mono_ns"]


def test_a_late_subscriber_gets_a_snapshot_and_fills_gaps_from_it(make_daemon):
    d = tight(make_daemon)
    with d.client() as c:
        drive(c)
        snap = c.snapshot(samples=50)
        assert snap["seq"] >= max(e["seq"] for e in snap["events"])
        assert 0 < len(snap["samples"]) <= 50 and all(s["type"] == "vram" for s in snap["samples"])
        assert snap["sessions"] == [] and snap["status"]["sessions"] == 0
        swaps = [e for e in snap["events"] if e["type"].startswith("swap_")]
        assert swaps and all({"session", "tier", "bytes", "ms", "gbps"} <= set(e) for e in swaps)
        again = c.events_since(snap["seq"] - 5)
        assert [e["seq"] for e in again["events"]] == sorted(e["seq"] for e in again["events"]) and again["lost"] == 0


def test_an_unwritable_log_folder_is_one_error_event_and_the_daemon_serves(make_daemon, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = make_daemon("--device", "cpu", "--logs", str(blocker / "logs"))
    with bad.client() as c:
        time.sleep(0.5)
        errors = [e for e in c.snapshot()["events"] if e["type"] == "error"]
        assert len(errors) == 1 and "event log" in errors[0]["message"]
        sid = c.create_session(prompt=PROMPT)
        assert len(c.generate(sid, 2)) == 2
        assert c.status()["pid"] == bad.proc.pid


def test_logs_export_chrome_trace_of_the_daemon_log(make_daemon, tmp_path):
    d = tight(make_daemon)
    with d.client() as c:
        drive(c, n=4)
    d.stop()
    out = tmp_path / "trace.json"
    r = djinn("logs", "export", "--logs", str(d.logs), "--format", "chrome-trace", "-o", str(out))
    assert r.returncode == 0, r.stderr
    trace = json.loads(out.read_text())
    phases = {e["ph"] for e in trace["traceEvents"]}
    assert {"C", "X", "M", "i"} <= phases
    swaps = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert swaps and all(e["dur"] >= 0 and e["name"] in ("swap_out", "swap_in") for e in swaps)
    csv_out = tmp_path / "vram.csv"
    r = djinn("logs", "export", "--logs", str(d.logs), "--format", "csv", "-o", str(csv_out))
    assert r.returncode == 0 and csv_out.read_text().startswith("ts,mono_ns,used_bytes")
    bad = djinn("logs", "export", "--logs", str(d.logs), "--format", "xml")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_thousands_of_events_a_second_leave_status_answered_and_lose_no_swap_event(make_daemon):
    # Behaviour only: how many events a second and how fast status answers are bench/events.py's figures.
    # Under a 10 kHz sampler and a client driving swaps, every status is answered (within the client's
    # timeout: a starved RPC loop raises DjinnError "timeout"), and the log holds every event, swaps among them.
    d = tight(make_daemon, "--sample-hz", "10000")
    errors, answered = [], 0
    with d.client(timeout=5) as c:
        seq0 = c.status()["seq"]
        done = threading.Event()

        def load():
            try:
                with d.client() as w:
                    while not done.is_set():
                        drive(w, n=4)
            except Exception as e:  # noqa: BLE001 - checked below
                errors.append(e)

        worker = threading.Thread(target=load)
        worker.start()
        t0 = time.monotonic()
        try:
            while True:  # until the flood has numbered 20,000 events and swapped: counts, not a clock
                st = c.status()
                answered += 1
                swaps = st["swap"]["swap_outs"] + st["swap"]["swap_ins"]
                if errors or (st["seq"] - seq0 >= 20_000 and swaps > 10 and answered >= 20):
                    break
                assert time.monotonic() - t0 < 300, f"no flood: {st['seq'] - seq0} events, {swaps} swaps"  # a hang only
                time.sleep(0.05)
        finally:
            done.set()
            worker.join()
    assert not errors, errors
    d.stop()
    events = log_events(d)
    swaps = [e for e in events if e["type"] in ("swap_out", "swap_in")]
    assert len(swaps) > 10
    all_seqs = sorted(e["seq"] for e in events)
    assert all_seqs == list(range(1, len(all_seqs) + 1))  # the log lost nothing at all
    assert len(all_seqs) >= seq0 + 20_000


def test_the_log_rotates_by_size_and_a_new_sink_never_truncates(tmp_path):
    from djinnd.telemetry import EventBus, FileSink
    bus = EventBus()
    sink = FileSink(tmp_path, bus, max_bytes=2000)
    bus.add_sink(sink)
    for i in range(100):
        bus.emit("session", session=i, action="created")
    bus.close()
    files = sorted(tmp_path.glob("events-*.jsonl*"))
    assert len(files) > 3 and all(f.stat().st_size < 2000 + 200 for f in files)
    seqs = sorted(e["seq"] for e in read_events(tmp_path))
    assert seqs == list(range(1, 101))
    before = {f: f.read_bytes() for f in files}
    bus2 = EventBus()
    bus2.add_sink(FileSink(tmp_path, bus2, max_bytes=2000))
    bus2.emit("daemon", action="started")
    bus2.close()
    assert all(f.read_bytes() == data for f, data in before.items())  # the restart wrote a file of its own
    assert len(list(tmp_path.glob("events-*.jsonl*"))) == len(files) + 1


def test_a_subscriber_that_misses_events_gets_them_back(make_daemon):
    d = tight(make_daemon)
    with d.client() as c, c.subscribe(types=("session",)) as filtered, c.subscribe() as sub:
        time.sleep(0.3)
        first = c.create_session(prompt=PROMPT)
        ev = sub.recv(5.0)
        while ev["type"] != "session":
            ev = sub.recv(5.0)
        assert filtered.recv(5.0)["session"] == first  # a type filter sees only its type
        sub.last_seq -= 3  # as if three events had been dropped on the way
        lost_seq = sub.last_seq
        c.close(first)
        got = [sub.recv(5.0) for _ in range(3)]
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got) and got[0]["seq"] > lost_seq


def test_the_async_client_speaks_the_same_protocol(make_daemon):
    import asyncio

    from djinnd.client import AsyncClient, DjinnError

    d = make_daemon("--device", "cpu")

    async def main():
        async with AsyncClient(d.socket) as c:
            sid = await c.create_session(prompt=PROMPT)
            assert await c.run_to(sid, layer=2) == {"state": "paused", "layer": 2}
            assert (await c.inspect(sid))["layer"] == 2
            tok = await c.resume(sid)
            assert isinstance(tok, int)
            try:
                await c.session(999)
            except DjinnError as e:
                assert e.code == "unknown_session"
            else:
                raise AssertionError("no error for an unknown session")
            await c.close(sid)
            return (await c.status())["sessions"]

    assert asyncio.run(main()) == 0


def test_the_prometheus_endpoint_serves_the_daemons_figures_on_loopback(make_daemon):
    import re
    import socket
    import urllib.error
    import urllib.request
    d = tight(make_daemon, "--metrics-port", "0")
    with d.client() as c:
        drive(c, n=4)
        status = c.status()
    url = status["metrics_url"]
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    values, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("#"):
            m = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[a-z_]+"(?:,[a-z_]+="[a-z_]+")*\})? (-?[0-9.e+]+)', line)
            assert m, f"not in the exposition format: {line!r}"
            assert m[1] in typed, f"{m[1]} has no TYPE line"
            values[m[1] + (m[2] or "")] = float(m[3])
    assert values['djinn_swaps_total{direction="out"}'] == status["swap"]["swap_outs"] > 0
    assert values['djinn_swap_bytes_total{direction="in"}'] == status["swap"]["bytes_in"] > 0
    assert values["djinn_vram_budget_bytes"] == status["memory"]["budget_bytes"]
    assert values['djinn_sessions{location="device"}'] == 0  # all closed
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=5)
    assert e.value.code == 404
    with socket.socket() as taken:  # the port is taken: a second daemon refuses to start, with the reason
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = djinn("start", "--device", "cpu", "--socket", str(d.folder / "b.sock"), "--logs", str(d.logs),
                  "--metrics-port", str(taken.getsockname()[1]), program="djinnd")
    assert r.returncode == 2 and "cannot serve metrics" in r.stderr + r.stdout
    assert not (d.folder / "b.sock").exists()


class _Books:
    """A MemoryManager's figures as the sampler reads them, with the allocator's set by hand."""

    def __init__(self, budget: int, used: int, baseline: int = 0):
        self.budget, self.used, self.device_baseline, self.allocated = budget, used, baseline, used + baseline

    def figures(self) -> dict:
        return {"device_bytes": self.used, "budget_bytes": self.budget, "capacity_bytes": 2 * self.budget,
                "peak_device_bytes": self.used, "host_bytes": 0, "host_capacity_bytes": 0, "disk_bytes": 0,
                "allocated_bytes": self.allocated, "reserved_bytes": self.allocated + (8 << 20)}


def test_a_drift_of_the_allocator_over_the_books_is_one_error_an_episode():
    """Issue 24 (the CUDA path, driven on the CPU with the allocator's figures given): drift is
    allocated - the load baseline - the books; over the limit it is an error event once, until it
    falls back under half the limit; the books running ahead of the allocator is never one."""
    import torch

    from djinnd.telemetry import DRIFT_FLOOR, EventBus, Sampler, drift_limit
    bus = EventBus()
    books = _Books(budget=10 << 30, used=2 << 30, baseline=300 << 20)
    sampler = Sampler(bus, books, torch.device("cpu"))
    limit = drift_limit(books.budget)
    assert limit == max(DRIFT_FLOOR, (10 << 30) // 100) and drift_limit(1 << 30) == DRIFT_FLOOR

    def sample(drift: int) -> dict:
        books.allocated = books.used + books.device_baseline + drift
        return sampler._device_figures(books.figures())

    f = sample(0)
    assert (f["drift_bytes"], f["ledger_bytes"], f["device_used_bytes"]) == (0, books.used, books.used)
    assert f["drift_limit_bytes"] == limit and f["allocated_bytes"] == books.allocated
    assert sample(-(5 << 30))["drift_bytes"] == -(5 << 30)  # the books ahead (a forward's temporaries): no error
    assert sample(limit)["drift_bytes"] == limit  # at the limit: still none
    for drift in (limit + 1, 2 * limit, limit + 5, limit // 2 + 1):  # one episode, however long
        sample(drift)
    sample(limit // 2)  # back under half the limit: it ends
    sample(3 * limit)  # a second episode
    bus.close()
    errors = [e for e in bus.recent(100) if e["type"] == "error"]
    assert [e["where"] for e in errors] == ["ledger_drift", "ledger_drift"]
    assert errors[0]["drift_bytes"] == limit + 1 and errors[1]["drift_bytes"] == 3 * limit
    assert errors[0]["limit_bytes"] == limit and "MiB more than the books" in errors[0]["message"]
    assert sampler.drift_episodes == 2


def test_the_books_are_read_on_both_sides_of_the_allocator():
    """A charge taken between the books' first read and the allocator's (reserve, then allocate) is
    no drift: the larger of the two reads of the books is compared."""
    import torch

    from djinnd.telemetry import EventBus, Sampler
    books = _Books(budget=10 << 30, used=1 << 30)
    sampler = Sampler(EventBus(), books, torch.device("cpu"))
    m = books.figures()  # read before a session reserves and allocates 1 GiB
    books.used += 1 << 30
    m["allocated_bytes"] += 1 << 30
    f = sampler._device_figures(m)
    assert f["drift_bytes"] == 0 and f["ledger_bytes"] == 2 << 30 and not sampler.drifting


def test_a_cpu_sample_has_no_device_figures(make_daemon):
    d = tight(make_daemon)
    with d.client() as c:
        samples = c.snapshot(samples=50)["samples"]
    assert samples
    for s in samples:
        assert not {"allocated_bytes", "reserved_bytes", "ledger_bytes", "drift_bytes", "nvml_used_bytes"} & set(s)


def test_exp3_judges_cuda_samples_by_the_device_and_vram_csv_carries_its_columns(tmp_path):
    """The CUDA path of exp3's verdict and of vram.csv, fed samples as a CUDA daemon sends them."""
    import csv

    from scenarios import exp3, harness
    mib = 1 << 20
    samples = [{"seq": i, "ts": f"t{i}", "mono_ns": i * 10**8, "type": "vram", "used_bytes": (40 + i) * mib,
                "budget_bytes": 100 * mib, "capacity_bytes": 1000 * mib, "allocated_bytes": (41 + i) * mib,
                "reserved_bytes": (60 + i) * mib, "ledger_bytes": (40 + i) * mib, "device_used_bytes": (40 + i) * mib,
                "drift_bytes": -i * mib, "drift_limit_bytes": 64 * mib, "nvml_used_bytes": (600 + i) * mib}
               for i in range(10)]
    errors = [{"type": "error", "where": "nvml"}, {"type": "error", "where": "ledger_drift"}]
    dev = exp3.device_figures(samples, {"allocator_peak_bytes": 55 * mib}, errors)
    assert dev["peak_bytes"] == 55 * mib and dev["peak_sampled_bytes"] == 50 * mib  # the peak counter saw more
    assert dev["peak_ledger_bytes"] == 49 * mib and dev["baseline_bytes"] == mib
    assert (dev["max_drift_bytes"], dev["min_drift_bytes"], dev["drift_limit_bytes"]) == (0, -9 * mib, 64 * mib)
    assert dev["drift_errors"] == 1 and dev["peak_nvml_used_bytes"] == 609 * mib
    assert exp3.device_figures([{k: v for k, v in s.items() if "allocated" not in k} for s in samples], {}, []) is None
    assert exp3._plot(tmp_path / "exp3.png", samples, [], 0, 100 * mib, "cuda")  # draws the device and the books

    class Log:
        def of_type(self, *types):
            return samples

    harness._write(tmp_path, {}, Log())
    rows = list(csv.DictReader((tmp_path / "vram.csv").open()))
    assert list(rows[0]) == ["timestamp", "used", "budget", "capacity", "ledger", "allocated", "reserved", "nvml_used",
                             "drift", "drift_limit"]
    assert rows[3]["used"] == rows[3]["allocated"] == str(44 * mib) and rows[3]["ledger"] == str(43 * mib)
    assert rows[3]["drift"] == str(-3 * mib)


def test_the_history_keeps_each_event_as_the_json_the_sinks_got_and_gives_it_back_the_same():
    from djinnd.telemetry import EventBus

    class Sink:
        def __init__(self):
            self.lines = []

        def write(self, batch):
            self.lines += [line for _, line in batch]

        def close(self):
            pass

    bus, sink = EventBus(), Sink()
    bus.add_sink(sink)
    sent = [bus.emit("session", session=i, action="created", location=("device", i)) for i in range(5)]
    sent.insert(2, bus.emit("vram", used_bytes=7))
    bus.close()
    assert all(isinstance(line, bytes) for line in bus.events) and len(bus.samples) == 1
    events = [e for e in sent if e["type"] != "vram"]
    assert list(bus.events) == [line for line in sink.lines if b'"vram"' not in line]  # the same bytes, made once
    assert bus.events_bytes == sum(map(len, bus.events))
    as_json = [json.loads(json.dumps(e)) for e in events]  # (a tuple comes back a list, as over the wire)
    assert bus.recent(500) == as_json and bus.recent(2) == as_json[-2:] and bus.recent(0) == []
    assert bus.recent(10, samples=True) == [json.loads(json.dumps(sent[2]))]
    assert bus.since(0) == (list(bus.events), 0)  # the JSON kept, as the reply splices it in
    assert decoded(bus.since(0)) == (as_json, 0)
    assert decoded(bus.since(3)) == ([e for e in as_json if e["seq"] > 3], 0)
    assert bus.since(6) == ([], 0) and bus.since(60) == ([], 0)


def decoded(since):
    return [json.loads(line) for line in since[0]], since[1]


def test_the_history_is_bounded_by_bytes_as_well_as_by_count_and_counts_what_it_dropped_as_lost():
    from djinnd.telemetry import EventBus
    bus = EventBus(keep_events=50, keep_bytes=4000)
    for i in range(200):
        bus.emit("session", session=i, action="created")
    bus.close()
    n = len(bus.events)
    assert n < 50 and bus.events_bytes <= 4000 < bus.events_bytes + len(bus.events[0])  # the bytes bind first
    events, lost = decoded(bus.since(0))
    assert [e["seq"] for e in events] == list(range(201 - n, 201)) and lost == 200 - n
    events, lost = decoded(bus.since(195))
    assert [e["seq"] for e in events] == [196, 197, 198, 199, 200] and lost == 0
    bus = EventBus(keep_events=10)
    for i in range(30):
        bus.emit("session", session=i, action="created")
    bus.close()
    events, lost = decoded(bus.since(5))
    assert [e["seq"] for e in events] == list(range(21, 31)) and lost == 15
