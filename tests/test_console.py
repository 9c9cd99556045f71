"""djinn-console: Pilot tests against a real daemon subprocess, and snapshots with fixed data."""

import csv
import json
from pathlib import Path

import pytest

from conftest import Daemon, until

from console.app import DjinnConsole
from console.messages import Attached, Catalog, EventBatch
from console.screens.scenarios import Scenarios
from console.widgets.panels import Facts, StatusBar, SwapLog
from console.widgets.plot import minmax_columns
from console.widgets.sessions import SessionsTable

SIZE = (100, 30)


def table_ids(app) -> set[int]:
    table = app.screen.query_one(SessionsTable)
    return {int(k.value) for k in table.rows}


def status_text(app) -> str:
    return str(app.screen.query_one(StatusBar).render())


# -- against a real daemon -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(djinn_cache):
    """One CPU daemon for this module's attach/swap/export/exp3 tests: a start costs seconds on 2 cores."""
    d = Daemon("--device", "cpu").start()
    yield d
    d.remove()


@pytest.mark.asyncio
async def test_attaches_and_shows_sessions(daemon, tmp_path):
    app = DjinnConsole(daemon.socket, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.attached, what="attach")
        assert "attached" in status_text(app)
        with daemon.client() as c:
            a = c.create_session(prompt="The capital of France is", qos="interactive")
            b = c.create_session(prompt="Once upon a time", qos="batch")
            c.run_to(b, layer=3)
        await until(pilot, lambda: {a, b} <= table_ids(app), what="sessions in the table")
        table = app.screen.query_one(SessionsTable)
        assert "paused@3" in [str(c) for c in table.get_row(str(b))]
        await pilot.press("slash", *"batch", "enter")  # filter
        await until(pilot, lambda: table_ids(app) == {b}, what="filtered table")


@pytest.mark.asyncio
async def test_the_facts_show_the_decode_batches_and_samples_count_them(daemon, tmp_path):
    with daemon.client() as c:
        sid = c.create_session(prompt="The capital of France is")
        c.generate(sid, 4)  # a prefill and three decode steps, one row each
        samples = c.snapshot(samples=5)["samples"]
    assert samples and all("decode_forwards" in e and "decode_rows" in e for e in samples)
    app = DjinnConsole(daemon.socket, export_dir=tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        facts = app.screen.query_one(Facts)
        await until(pilot, lambda: "decode batches" in str(facts.render()), what="batch figures")
        assert "mean 1.0, largest 1 (max 32)" in str(facts.render())


@pytest.mark.asyncio
async def test_a_swap_event_reaches_the_log(daemon, tmp_path):
    with daemon.client() as c:
        weights, budget = c.status()["model"]["weights_bytes"], c.status()["memory"]["budget_bytes"]
        sids = [c.create_session(prompt=f"session {i} " * 8) for i in range(3)]
        for sid in sids:
            c.run_to(sid, layer=2)
    app = DjinnConsole(daemon.socket, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.attached and table_ids(app) >= set(sids), what="attach")
        log = app.screen.query_one(SwapLog)
        assert not log.lines
        with daemon.client() as c:
            c.set_budget(weights + 1)  # every paused session must leave the device
        try:
            await until(pilot, lambda: log.lines, what="a swap in the log")
        finally:
            with daemon.client() as c:
                c.set_budget(budget)  # the module's other tests share this daemon
        ev = log.lines[0]
        assert ev["type"] == "swap_out" and ev["tier"] in ("host", "disk")
        assert f"#{ev['session']}" in str(log.render())
        await until(pilot, lambda: any(app.state.sessions[s]["location"] != "device" for s in sids), what="location")


@pytest.mark.asyncio
async def test_export_writes_files_that_parse(daemon, tmp_path):
    app = DjinnConsole(daemon.socket, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.attached, what="attach")
        with daemon.client() as c:
            c.run_to(c.create_session(prompt="hello"), layer=1)
        await until(pilot, lambda: len(app.state.samples) > 3 and app.state.sessions, what="events")
        written = {}
        for key, fmt in (("j", "jsonl"), ("c", "csv"), ("t", "chrome-trace")):
            app.last_export = None
            await pilot.press("e")
            await until(pilot, lambda: app.screen.__class__.__name__ == "ExportPicker", what="the picker")
            await pilot.press(key)
            await until(pilot, lambda: getattr(app, "last_export", None), what=f"{fmt} export")
            written[fmt] = Path(app.last_export)
    assert all(p.parent == tmp_path for p in written.values())
    events = [json.loads(line) for line in written["jsonl"].read_text().splitlines()]
    assert {"vram", "session"} <= {e["type"] for e in events}
    rows = list(csv.DictReader(written["csv"].open()))
    assert rows and int(rows[0]["used_bytes"]) > 0
    trace = json.loads(written["chrome-trace"].read_text())
    assert any(e.get("name") == "device memory" for e in trace["traceEvents"])


@pytest.mark.asyncio
async def test_survives_daemon_death_and_reattaches(make_daemon, tmp_path):
    first = make_daemon("--device", "cpu")
    app = DjinnConsole(first.socket, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.attached, what="attach")
        old_pid = app.state.status["pid"]
        first.proc.kill()  # no goodbye: the socket file stays behind
        first.proc.wait()
        await until(pilot, lambda: "disconnected" in status_text(app), timeout=8, what="'disconnected'")
        await pilot.press("1", "s", "2", "1")  # still answers keys
        for stale in first.socket.parent.glob("*.sock"):
            stale.unlink()  # conftest's readiness probe would block on a dead socket (reported)
        second = make_daemon("--device", "cpu", folder=first.folder)
        await until(pilot, lambda: app.state.attached and app.state.status.get("pid") not in (None, old_pid),
                    timeout=10, what="reattach")
        assert "attached" in status_text(app)
        with second.client() as c:
            sid = c.create_session(prompt="after the restart")
        await until(pilot, lambda: sid in table_ids(app), what="a session of the new daemon")


@pytest.mark.slow
@pytest.mark.asyncio
async def test_exp3_launched_from_the_scenarios_screen_shows_its_verdict(daemon, tmp_path):
    app = DjinnConsole(daemon.socket, export_dir=tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.state.attached and app.catalog, what="the catalog")
        await pilot.press("2")
        await until(pilot, lambda: isinstance(app.screen, Scenarios) and app.screen.chosen, what="scenarios screen")
        screen = app.screen
        while screen.chosen["name"] != "exp3":
            await pilot.press("down")
        await pilot.press("l")
        await until(pilot, lambda: app.my_run is not None, what="launch")
        run = app.state.runs[app.my_run]
        await until(pilot, lambda: "results" in run, timeout=240, what="the verdict")
        await pilot.pause(0.5)
        verdict = str(screen.query_one("#sc-verdict").render())
        status = run["results"]["status"]
        assert status in ("pass", "fail", "skipped")
        assert status.upper() in verdict and run["output"] in verdict.replace("\n", "")
        assert (Path(run["output"]) / "results.json").is_file()
        await pilot.press("e")  # on the Scenarios screen the export is the run's own log
        await until(pilot, lambda: app.screen.__class__.__name__ == "ExportPicker", what="the picker")
        await pilot.press("j")
        await until(pilot, lambda: app.last_export, what="the run's export")
    lines = Path(app.last_export).read_text().splitlines()
    assert Path(app.last_export).name.startswith("djinn-run-")
    assert any(json.loads(line).get("type") == "scenario" for line in lines)


# -- without a daemon ----------------------------------------------------------------------------

def test_minmax_downsampling_keeps_spikes():
    points = [(t / 10, 100.0) for t in range(600)]
    points[333] = (33.3, 900.0)  # one sample out of 600
    cols = minmax_columns(points, 0, 60, 20)
    assert max(c[1] for c in cols) == 900.0 and min(c[0] for c in cols) == 100.0


@pytest.mark.asyncio
async def test_an_event_storm_does_not_freeze_the_screen():
    app = DjinnConsole("/tmp/djinn-test-none/d.sock", connect=False)
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(Attached(app.state.socket, fixture_snapshot()))
        await pilot.pause()
        for k in range(10):  # 10,000 events, as the link would batch one second of them
            app.post_message(EventBatch(storm(1000 * k, 1000)))
        await pilot.press("s")
        await pilot.pause()
        app.redraw()
        assert app.state.swap_count >= 5000  # every one counted, and the screen still answers keys


# -- snapshots: fixed messages, fixed clock --------------------------------------------------------

T0 = 1_000_000_000_000  # mono_ns of the first sample
MiB = 1 << 20


def _ts(i: int) -> str:
    s = 3 + i // 10
    return f"2026-11-22T14:{15 + s // 60:02d}:{s % 60:02d}.{(i % 10) * 100:03d}Z"


def fixture_snapshot() -> dict:
    """120 s of samples climbing to the budget and staying there (the plateau), swaps and sessions."""
    budget, weights = 96 * MiB, 24 * MiB
    samples = []
    for i in range(1200):
        used = min(budget - MiB, weights + i * 0.15 * MiB) - (3 * MiB if i % 97 == 0 and i > 500 else 0)
        samples.append({"seq": i + 1, "ts": _ts(i), "mono_ns": T0 + i * 100_000_000, "type": "vram",
                        "used_bytes": int(used), "budget_bytes": budget, "capacity_bytes": 128 * MiB,
                        "peak_bytes": budget - MiB, "host_bytes": 40 * MiB, "host_capacity_bytes": 256 * MiB,
                        "disk_bytes": 0})
    events = []
    for k, i in enumerate(range(520, 1200, 70)):
        kind = "swap_in" if k % 3 == 2 else "swap_out"
        events.append({"seq": 2000 + k, "ts": _ts(i), "mono_ns": T0 + i * 100_000_000, "type": kind,
                       "session": 1 + k % 6, "tier": "disk" if k == 4 else "host", "bytes": (5 + k) * MiB,
                       "ms": 1.5 + k * 0.25, "gbps": 3.2 + k * 0.1, "reason": "evict"})
    sessions = [{"id": i, "state": st, "layer": layer, "location": loc, "qos": qos, "phase": "COMPUTE",
                 "device_bytes": b if loc == "device" else 0, "host_bytes": b if loc == "host" else 0,
                 "disk_bytes": b if loc == "disk" else 0, "seq_len": 256, "tokens": [], "swaps": sw,
                 "last_swap_ms": lm}
                for i, st, layer, loc, qos, b, sw, lm in [
                    (1, "paused", 6, "host", "interactive", 9 * MiB, 3, 2.25),
                    (2, "paused", 2, "device", "realtime", 9 * MiB, 0, None),
                    (3, "running", None, "device", "batch", 11 * MiB, 1, 1.75),
                    (4, "idle", None, "disk", "batch", 10 * MiB, 2, 7.5),
                    (5, "paused", 4, "host", "interactive", 9 * MiB, 2, 2.0),
                    (6, "idle", None, "device", "interactive", 8 * MiB, 1, 3.0)]]
    status = {"pid": 4242, "version": "0.1.0", "uptime_s": 125.0, "socket": "/run/djinn/djinnd.sock",
              "device": {"kind": "cpu", "name": "x86_64", "dtype": "float32", "capacity_bytes": 128 * MiB},
              "model": {"name": "tiny-llama", "num_layers": 8, "weights_bytes": weights, "kv_bytes_per_token": 4096},
              "sessions": 6, "memory": {"budget_bytes": budget, "device_bytes": budget - MiB,
                                        "peak_device_bytes": budget - MiB, "host_bytes": 40 * MiB, "disk_bytes": 0},
              "swap": {"swap_outs": 7, "swap_ins": 3, "bytes_out": 63 * MiB, "bytes_in": 27 * MiB,
                       "latency_ms": {"p50": 2.1, "p99": 3.4, "max": 3.5}, "throughput_gbps": {"p50": 3.6}}}
    return {"seq": 3000, "status": status, "sessions": sessions, "samples": samples, "events": events}


def storm(start: int, n: int) -> list[dict]:
    out = []
    for i in range(n):
        seq = 10_000 + start + i
        if i % 2:
            out.append({"seq": seq, "ts": _ts(1199), "mono_ns": T0 + 120_000_000_000 + seq, "type": "swap_out",
                        "session": 1 + i % 6, "tier": "host", "bytes": MiB, "ms": 0.5, "gbps": 2.0})
        else:
            out.append({"seq": seq, "ts": _ts(1199), "mono_ns": T0 + 120_000_000_000 + seq, "type": "vram",
                        "used_bytes": 90 * MiB, "budget_bytes": 96 * MiB, "capacity_bytes": 128 * MiB})
    return out


EXP3 = {"name": "exp3", "description": "Spawn N sessions through breakpoints under a budget they exceed.",
        "params": {"model": "tiny-llama", "device": "auto", "sessions": 24, "prompt_len": 256, "gen_tokens": 8,
                   "budget_fraction": 0.6, "swap": True}}
RESULTS = {"scenario": "exp3", "status": "pass", "reasons": [], "num_sessions_requested": 24,
           "num_sessions_spawned": 24, "num_sessions_completed": 24,
           "vram_stats": {"min_bytes": 24 * MiB, "max_bytes": 95 * MiB, "avg_bytes": 80 * MiB, "budget_bytes": 96 * MiB},
           "capacity_math": {"demand_bytes": 150 * MiB, "budget_bytes": 96 * MiB, "expected_swapping": True},
           "swap": {"swap_outs": 12, "swap_ins": 11, "latency_ms": {"p50": 1.2, "p99": 3.1}},
           "integrity": {"checked_sessions": 24, "mismatches": 0}, "wall_s": 41.5,
           "criteria": [{"id": "all_complete", "text": "every session completes", "measured": "24 of 24", "ok": True},
                        {"id": "peak", "text": "peak under the budget", "measured": "95.0 of 96.0 MiB", "ok": True}],
           "notes": ["fixed data for a snapshot"]}


def fixed_app() -> DjinnConsole:
    return DjinnConsole("/run/djinn/djinnd.sock", connect=False)


async def feed(pilot) -> None:
    app = pilot.app
    app.post_message(Attached("/run/djinn/djinnd.sock", fixture_snapshot()))
    app.post_message(Catalog([{"name": "decode", "description": "Decode speed.", "params": {"tokens": 64}}, EXP3]))
    await pilot.pause()


def test_snapshot_overview(snap_compare):
    async def run_before(pilot):
        await feed(pilot)
        pilot.app.redraw()
    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)


def test_snapshot_scenarios(snap_compare):
    async def run_before(pilot):
        await feed(pilot)
        app = pilot.app
        app.state.runs[7] = {"run": 7, "name": "exp3", "status": "pass", "done": 24, "total": 24, "exited": True,
                             "exit_code": 0, "output": "/srv/djinn/logs/exp3/20261122T141503Z", "results": RESULTS}
        app.wanted_scenario = "exp3"
        await pilot.press("2")
        await pilot.pause()
        app.redraw()
        await pilot.pause()
    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)


def test_snapshot_no_daemon(snap_compare):
    async def run_before(pilot):
        from console.messages import Detached
        pilot.app.post_message(Detached("/run/djinn/djinnd.sock", "no djinnd answers on /run/djinn/djinnd.sock", False))
        await pilot.pause()
    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=run_before)
