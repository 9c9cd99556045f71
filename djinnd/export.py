"""Read djinnd event logs and export them as JSONL, CSV or a Chrome trace.

The daemon appends every event (see docs/PROTOCOL.md, "Events") as one JSON
object per line to ``events-<UTC stamp>-<pid>.jsonl`` files, rotated by size
(``...jsonl.1``, ...).  A scenario run folder holds the same format in
``events.jsonl``.  Everything here works on plain dicts so it needs neither the
daemon nor a GPU.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from rich.text import Text

from .sizes import format_size

FORMATS = ("jsonl", "csv", "chrome-trace")
CSV_COLUMNS = (
    "ts", "mono_ns", "used_bytes", "budget_bytes", "capacity_bytes",
    "peak_bytes", "host_bytes", "disk_bytes", "rss_bytes",
)

# ---------------------------------------------------------------- reading


def parse_ts(value) -> datetime | None:
    """An event's ``ts`` as an aware UTC datetime, or None if absent/garbled."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str) -> datetime:
    """Parse ``--since``: ISO-8601 (naive means UTC) or an age like 30s/10m/2h/1d.

    Always returns an aware UTC datetime so it compares with event stamps.
    """
    m = _RELATIVE.match(text or "")
    if m:
        age = timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
        return datetime.now(timezone.utc) - age
    dt = parse_ts(text.strip()) if isinstance(text, str) else None
    if dt is None:
        raise ValueError(
            f"invalid time {text!r}: use ISO-8601 (e.g. 2026-11-22T14:15:03Z) "
            "or an age like 30s, 10m, 2h, 1d"
        )
    return dt


def _read_file(path: Path) -> list[dict]:
    """All well-formed events of one file, in ``seq`` order.

    Blank and corrupt lines are skipped: a daemon killed mid-write leaves a
    partial last line, and that must not make the rest of the log unreadable.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    events = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                events.append(ev)
    # Sort by seq only when every event has one; otherwise file order is the best we know.
    if all(isinstance(e.get("seq"), int) for e in events):
        events.sort(key=lambda e: e["seq"])
    return events


def _file_key(events: list[dict]):
    """Order daemon log files by their first event: wall time, then monotonic clock."""
    first = events[0]
    ts = parse_ts(first.get("ts")) or datetime.min.replace(tzinfo=timezone.utc)
    mono = first.get("mono_ns")
    return ts, mono if isinstance(mono, (int, float)) else 0


def read_events(source: Path, since: datetime | None = None) -> Iterator[dict]:
    """Yield events from a run folder, a daemon log folder or one ``.jsonl`` file.

    A run folder is recognised by its ``events.jsonl``; otherwise a folder is
    read as a daemon log: every ``events-*.jsonl*`` file (rotations included),
    files ordered by their first event.  ``since`` keeps events with
    ``ts >= since`` (events without a readable ``ts`` are then dropped).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such event log: {source}")
    if source.is_dir():
        run_log = source / "events.jsonl"
        paths = [run_log] if run_log.is_file() else sorted(
            p for p in source.glob("events-*.jsonl*") if p.is_file()
        )
    else:
        paths = [source]
    chunks = [evs for evs in (_read_file(p) for p in paths) if evs]
    if len(chunks) > 1:
        chunks.sort(key=_file_key)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    for chunk in chunks:
        for ev in chunk:
            if since is not None:
                ts = parse_ts(ev.get("ts"))
                if ts is None or ts < since:
                    continue
            yield ev


# ---------------------------------------------------------------- writers


def to_jsonl(events: Iterable[dict], out: TextIO) -> int:
    """Write events unchanged, one JSON object per line; returns the count."""
    n = 0
    for ev in events:
        out.write(json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n")
        n += 1
    return n


def to_csv(events: Iterable[dict], out: TextIO) -> int:
    """Write the ``vram`` samples as CSV (missing fields empty); returns rows written."""
    writer = csv.DictWriter(out, CSV_COLUMNS, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    n = 0
    for ev in events:
        if ev.get("type") == "vram":
            writer.writerow({k: ("" if ev.get(k) is None else ev[k]) for k in CSV_COLUMNS})
            n += 1
    return n


PID = 1
TID_DAEMON, TID_SCENARIO, TID_FIRST_SESSION = 0, 1, 10


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _counter_args(**values) -> dict:
    """Counter args must be numbers; drop anything missing so Perfetto doesn't choke."""
    return {k: v for k, v in values.items() if _num(v)}


def to_chrome_trace(events: Iterable[dict]) -> dict:
    """Build a Trace Event Format document (Perfetto / chrome://tracing).

    Times come from ``mono_ns`` (the wall clock can jump) as microseconds from
    the earliest point in the trace, which may be a swap's start rather than
    the first event.  Events without ``mono_ns`` reuse the previous one's.
    Each session gets its own track; scenario events share a "scenario" track;
    anything else goes on the "daemon" track.
    """
    timed: list[tuple[int, int, dict]] = []  # (start_ns, dur_ns, event)
    last_ns, first_ts = 0, None
    for ev in events:
        ns = ev.get("mono_ns")
        ns = int(ns) if _num(ns) else last_ns
        last_ns = ns
        first_ts = first_ts or ev.get("ts")
        dur = 0
        if ev.get("type") in ("swap_out", "swap_in") and _num(ev.get("ms")):
            dur = max(0, int(ev["ms"] * 1e6))
        timed.append((ns - dur, dur, ev))

    base = min((t for t, _, _ in timed), default=0)
    tids: dict[str, int] = {}

    def session_tid(ev: dict) -> int:
        sid = ev.get("session")
        if sid is None:
            return TID_DAEMON
        return tids.setdefault(str(sid), TID_FIRST_SESSION + len(tids))

    trace = []
    for start, dur, ev in timed:
        typ = ev.get("type", "?")
        ts = round((start - base) / 1000, 3)
        args = {k: v for k, v in ev.items() if k not in ("type", "mono_ns")}
        base_ev = {"pid": PID, "ts": ts}
        if typ == "vram":
            for name, cargs in (
                ("device memory", _counter_args(used=ev.get("used_bytes"), budget=ev.get("budget_bytes"))),
                ("host pool", _counter_args(used=ev.get("host_bytes"), capacity=ev.get("host_capacity_bytes"))),
                ("disk tier", _counter_args(used=ev.get("disk_bytes"))),
            ):
                if cargs:
                    trace.append({**base_ev, "ph": "C", "tid": TID_DAEMON, "name": name, "args": cargs})
        elif typ in ("swap_out", "swap_in"):
            trace.append({**base_ev, "ph": "X", "dur": round(dur / 1000, 3), "tid": session_tid(ev),
                          "name": typ, "cat": "swap", "args": args})
        elif typ in ("session", "prefetch"):
            name = ev.get("action", typ) if typ == "session" else f"prefetch {ev.get('action', '')}".strip()
            trace.append({**base_ev, "ph": "i", "s": "t", "tid": session_tid(ev),
                          "name": str(name), "cat": typ, "args": args})
        elif typ == "scenario":
            name = " ".join(str(x) for x in (ev.get("name"), ev.get("action")) if x)
            trace.append({**base_ev, "ph": "i", "s": "t", "tid": TID_SCENARIO,
                          "name": name or "scenario", "cat": typ, "args": args})
        else:  # error and anything newer than this exporter
            trace.append({**base_ev, "ph": "i", "s": "t", "tid": TID_DAEMON,
                          "name": str(typ), "cat": str(typ), "args": args})
    trace.sort(key=lambda e: e["ts"])  # swap X events start before they are logged

    def meta(name: str, tid: int, value: str) -> dict:
        return {"ph": "M", "pid": PID, "tid": tid, "ts": 0, "name": name, "args": {"name": value}}

    metadata = [meta("process_name", TID_DAEMON, "djinnd"),
                meta("thread_name", TID_DAEMON, "daemon"),
                meta("thread_name", TID_SCENARIO, "scenario")]
    metadata += [meta("thread_name", tid, f"session {sid}") for sid, tid in tids.items()]
    return {
        "traceEvents": metadata + trace,
        "displayTimeUnit": "ms",
        "metadata": {"source": "djinnd", "events": len(timed), "first_ts": first_ts,
                     "base_mono_ns": base, "sessions": list(tids)},
    }


def export(source, fmt: str, out_path: Path | None, since=None) -> tuple[int, Path | None]:
    """Export ``source`` as ``fmt`` to ``out_path`` (or stdout).

    Returns (count, out_path): events for jsonl, vram rows for csv, trace
    events for chrome-trace.  ``since`` may be a datetime or ``parse_since`` text.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(since, str):
        since = parse_since(since)
    events = read_events(Path(source), since)
    if out_path is None:
        return write_events(events, fmt, sys.stdout), None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8", newline="") as f:
        return write_events(events, fmt, f), out_path


def write_events(events: Iterable[dict], fmt: str, out: TextIO) -> int:
    """Write `events` as `fmt`; the count as `export` says."""
    if fmt == "jsonl":
        return to_jsonl(events, out)
    if fmt == "csv":
        return to_csv(events, out)
    doc = to_chrome_trace(events)
    json.dump(doc, out)
    out.write("\n")
    return len(doc["traceEvents"])


# ---------------------------------------------------------------- tail

STYLES = {"vram": "dim cyan", "swap_out": "magenta", "swap_in": "green", "session": "blue",
          "scenario": "bold yellow", "prefetch": "cyan", "error": "bold red"}
_SKIP = {"seq", "ts", "mono_ns", "type"}


def _size(n) -> str:
    return format_size(n) if _num(n) else "?"


def _fmt_num(v, spec: str, suffix: str) -> str:
    return f"{v:{spec}}{suffix}" if _num(v) else f"?{suffix}"


def _details(ev: dict) -> str:
    typ = ev.get("type")
    g = ev.get
    if typ in ("swap_out", "swap_in"):
        arrow = "→" if typ == "swap_out" else "←"
        s = (f"session {g('session')} {arrow} {g('tier', '?')} {_size(g('bytes'))} "
             f"{_fmt_num(g('ms'), '.1f', ' ms')} {_fmt_num(g('gbps'), '.1f', ' GB/s')}")
        return s + (f" ({g('reason')})" if g("reason") else "")
    if typ == "vram":
        s = f"{_size(g('used_bytes'))}/{_size(g('budget_bytes'))}"
        if _num(g("peak_bytes")):
            s += f" peak {_size(g('peak_bytes'))}"
        if _num(g("host_bytes")):
            s += f" host {_size(g('host_bytes'))}"
        if g("disk_bytes"):
            s += f" disk {_size(g('disk_bytes'))}"
        return s
    if typ == "session":
        extra = " ".join(f"{k}={g(k)}" for k in ("state", "layer", "qos", "location") if g(k) is not None)
        return f"session {g('session')} {g('action', '')} {extra}".rstrip()
    if typ == "prefetch":
        s = f"session {g('session')} {g('action', '')}"
        return s + (f" at {_fmt_num(g('at_ms'), '.1f', ' ms')}" if g("at_ms") is not None else "")
    if typ == "scenario":
        s = f"{g('name', '')} {g('action', '')}"
        if g("action") == "progress":
            s += f" {g('done', '?')}/{g('total', '?')}" + (f" {g('message')}" if g("message") else "")
        elif g("action") == "finished":
            s += f" {g('status', '')}" + (f" → {g('output')}" if g("output") else "")
        return s.strip()
    if typ == "error":
        return f"{g('where')}: {g('message')}" if g("where") else str(g("message"))
    return " ".join(f"{k}={v}" for k, v in ev.items() if k not in _SKIP)


def tail_lines(event: dict) -> Text:
    """One compact, coloured line per event for ``djinn logs tail``."""
    ts = parse_ts(event.get("ts"))
    clock = ts.strftime("%H:%M:%S.%f")[:-3] if ts else "--:--:--.---"
    typ = str(event.get("type", "?"))
    line = Text()
    line.append(clock + " ", style="dim")  # not Text(style=): that would dim the whole line
    line.append(f"{typ:<9}", style=STYLES.get(typ, "white"))
    line.append(" " + _details(event), style="red" if typ == "error" else "")
    return line
