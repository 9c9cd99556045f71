"""Tests for djinnd.export: reading logs, the three formats, --since and tail lines."""

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest

from djinnd import export as ex

T0 = datetime(2026, 11, 22, 14, 15, 3, tzinfo=timezone.utc)
MONO0 = 5_000_000_000


def ev(seq, type_, ms_after, **fields):
    """An event `ms_after` milliseconds after T0, stamped as the daemon does."""
    ts = (T0 + timedelta(milliseconds=ms_after)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {"seq": seq, "ts": ts, "mono_ns": MONO0 + ms_after * 1_000_000, "type": type_, **fields}


def vram(seq, t, used):
    return ev(seq, "vram", t, used_bytes=used, budget_bytes=4_000_000_000, capacity_bytes=80_000_000_000,
              peak_bytes=used, host_bytes=1_000_000, host_capacity_bytes=8_000_000_000, disk_bytes=0,
              rss_bytes=2_000_000_000, cpu_percent=12.5)


def swap(seq, t, kind, session, ms=0.8):
    return ev(seq, kind, t, session=session, tier="host", bytes=1_700_000, ms=ms, gbps=2.1, reason="pause")


EVENTS = [
    ev(1, "scenario", 0, run="r1", name="two-sessions", action="started"),
    vram(2, 1, 1_000_000_000),
    ev(3, "session", 2, session=1, action="created", state="queued", layer=0, qos="normal", location="device"),
    ev(4, "session", 3, session=2, action="created", state="queued", layer=0, qos="normal", location="device"),
    swap(5, 10, "swap_out", 1),
    vram(6, 11, 900_000_000),
    swap(7, 20, "swap_out", 2, ms=2.5),
    swap(8, 30, "swap_in", 1),
    ev(9, "prefetch", 31, session=2, action="hit", at_ms=31.0),
    vram(10, 40, 1_100_000_000),
    ev(11, "session", 50, session=1, action="finished", state="done", layer=32, qos="normal", location="device"),
    ev(12, "error", 55, message="boom", where="scheduler"),
    ev(13, "scenario", 60, run="r1", name="two-sessions", action="finished", status="ok", output="logs/x"),
]


def write_log(path, events, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)
    return path


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    # shuffled lines, a blank line and a partial last line (daemon killed mid-write)
    lines = [json.dumps(e) for e in EVENTS]
    lines[3], lines[4] = lines[4], lines[3]
    (d / "events.jsonl").write_text("\n".join(lines) + "\n\nnot json\n" + '{"seq": 14, "ts": "2026-')
    return d


def test_read_events_skips_corrupt_and_sorts(run_dir):
    got = list(ex.read_events(run_dir))
    assert [e["seq"] for e in got] == list(range(1, 14))
    assert got == EVENTS
    # a single file reads the same
    assert list(ex.read_events(run_dir / "events.jsonl")) == EVENTS


def test_read_events_since(run_dir):
    got = list(ex.read_events(run_dir, since=T0 + timedelta(milliseconds=30)))
    assert [e["seq"] for e in got] == [8, 9, 10, 11, 12, 13]
    naive = (T0 + timedelta(milliseconds=50)).replace(tzinfo=None)
    assert [e["seq"] for e in ex.read_events(run_dir, since=naive)] == [11, 12, 13]


def test_daemon_log_folder_in_order(tmp_path):
    d = tmp_path / "daemon"
    d.mkdir()
    # rotated file holds the older events; a second daemon run starts later
    write_log(d / "events-20261122T141503Z-100.jsonl.1", EVENTS[:5])
    write_log(d / "events-20261122T141503Z-100.jsonl", EVENTS[5:9], tail='{"partial')
    write_log(d / "events-20261122T141503Z-200.jsonl", EVENTS[9:])
    (d / "other.jsonl").write_text(json.dumps({"seq": 99}) + "\n")
    assert [e["seq"] for e in ex.read_events(d)] == list(range(1, 14))


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(ex.read_events(tmp_path / "nope"))


def test_csv(run_dir):
    out = io.StringIO()
    assert ex.to_csv(ex.read_events(run_dir), out) == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(out.getvalue().splitlines()) == 4
    assert list(rows[0]) == list(ex.CSV_COLUMNS)
    assert [int(r["used_bytes"]) for r in rows] == [1_000_000_000, 900_000_000, 1_100_000_000]
    assert rows[0]["ts"] == EVENTS[1]["ts"]


def test_csv_missing_fields_empty():
    out = io.StringIO()
    ex.to_csv([{"type": "vram", "ts": "x", "used_bytes": 5, "disk_bytes": None}], out)
    row = next(csv.DictReader(io.StringIO(out.getvalue())))
    assert row["used_bytes"] == "5" and row["disk_bytes"] == "" and row["rss_bytes"] == ""


def test_chrome_trace(run_dir):
    doc = json.loads(json.dumps(ex.to_chrome_trace(ex.read_events(run_dir))))
    assert doc["displayTimeUnit"] == "ms"
    evs = doc["traceEvents"]
    for e in evs:
        assert {"ph", "ts", "pid", "name"} <= e.keys()
        if e["ph"] in ("X", "i", "M"):
            assert "tid" in e
    xs = [e for e in evs if e["ph"] == "X"]
    assert sorted(e["name"] for e in xs) == ["swap_in", "swap_out", "swap_out"]
    assert all(e["dur"] >= 0 for e in xs)
    long = next(e for e in xs if e["args"]["session"] == 2)
    assert long["dur"] == pytest.approx(2500)
    assert {"bytes", "tier", "gbps"} <= long["args"].keys()

    threads = {e["args"]["name"]: e["tid"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sum(name.startswith("session ") for name in threads) == 2
    assert threads["session 1"] != threads["session 2"]
    assert any(e["name"] == "process_name" for e in evs if e["ph"] == "M")
    # swaps and lifecycle events of a session share its track
    assert {e["tid"] for e in evs if e["ph"] != "M" and e.get("args", {}).get("session") == 1} == {threads["session 1"]}
    scen = [e for e in evs if e.get("cat") == "scenario"]
    assert len(scen) == 2 and all(e["tid"] == threads["scenario"] and e["s"] == "t" for e in scen)

    counters = [e for e in evs if e["ph"] == "C"]
    assert {e["name"] for e in counters} >= {"device memory", "host pool", "disk tier"}
    mem = [e for e in counters if e["name"] == "device memory"]
    assert len(mem) == 3 and mem[0]["args"] == {"used": 1_000_000_000, "budget": 4_000_000_000}

    timed = [e["ts"] for e in evs if e["ph"] != "M"]
    assert timed == sorted(timed) and timed[0] == 0
    assert min(timed) >= 0


def test_chrome_trace_swap_first_never_negative():
    doc = ex.to_chrome_trace([swap(1, 0, "swap_out", 7, ms=3.0), vram(2, 1, 10)])
    ts = [e["ts"] for e in doc["traceEvents"] if e["ph"] != "M"]
    assert ts[0] == 0 and ts == sorted(ts)


def test_export_jsonl_roundtrip(run_dir, tmp_path):
    out = tmp_path / "out" / "events.jsonl"
    n, path = ex.export(run_dir, "jsonl", out)
    assert (n, path) == (13, out)
    assert list(ex.read_events(out)) == EVENTS
    assert [json.loads(line) for line in out.read_text().splitlines()] == EVENTS


def test_export_formats(run_dir, tmp_path, capsys):
    n, _ = ex.export(run_dir, "csv", tmp_path / "v.csv", since="2026-11-22T14:15:03.011Z")
    assert n == 2
    n, path = ex.export(run_dir, "chrome-trace", None)
    assert path is None
    assert len(json.loads(capsys.readouterr().out)["traceEvents"]) == n
    with pytest.raises(ValueError, match="unknown format"):
        ex.export(run_dir, "xml", None)


def test_parse_since():
    now = datetime.now(timezone.utc)
    got = ex.parse_since("10m")
    assert got.tzinfo is not None
    assert abs((now - got) - timedelta(minutes=10)) < timedelta(seconds=5)
    assert abs((now - ex.parse_since("1d")) - timedelta(days=1)) < timedelta(seconds=5)
    assert ex.parse_since("2026-11-22T14:15:03Z") == T0
    assert ex.parse_since("2026-11-22T14:15:03.123Z") == T0 + timedelta(milliseconds=123)
    assert ex.parse_since("2026-11-22T15:15:03+01:00") == T0
    assert ex.parse_since("2026-11-22T14:15:03") == T0
    assert ex.parse_since("2026-11-22T15:15:03+01:00").utcoffset() == timedelta(0)
    for bad in ("yesterday", "", "10 parsecs"):
        with pytest.raises(ValueError, match="ISO-8601"):
            ex.parse_since(bad)


def test_tail_lines():
    line = ex.tail_lines(swap(5, 10, "swap_out", 3))
    text = str(line)
    assert text.startswith("14:15:03.010 swap_out")
    assert "session 3 → host 1.6 MiB 0.8 ms 2.1 GB/s" in text
    assert "\n" not in text
    assert "953.7 MiB/3.7 GiB" in str(ex.tail_lines(vram(2, 1, 1_000_000_000)))
    assert "←" in str(ex.tail_lines(swap(8, 30, "swap_in", 1)))
    for e in EVENTS + [{"type": "mystery", "x": 1}, {}]:
        assert str(ex.tail_lines(e)).strip()
