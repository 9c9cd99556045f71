"""djinn-console --replay: a recorded exp3 run scrubbed with the keys, bad paths, and snapshots of fixed events."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from textual.command import CommandList

from conftest import results, scenario, until

from djinnd import export_events

from console.app import main
from console.replay import Replay, ReplayConsole, load_events
from console.screens.replay import ReplayHelp, ReplaySessions, Timeline
from console.widgets.panels import SwapLog
from console.widgets.plot import VramPlot

MiB = 1 << 20


def at_cursor(events: list[dict], limit_ns: int) -> tuple[dict, list[dict]]:
    """What the events up to `limit_ns` say, worked out here and not by State: {id: (state, where)}, the swaps."""
    sessions, swaps = {}, []
    for e in events:
        if e.get("mono_ns", limit_ns + 1) > limit_ns:
            continue
        sid = e.get("session")
        if e["type"] == "session" and e["action"] == "closed":
            sessions.pop(sid, None)
        elif e["type"] == "session":
            state = f"paused@{e['layer']}" if e["state"] == "paused" else e["state"]
            sessions[sid] = (state, e["location"])
        elif e["type"] in ("swap_out", "swap_in"):
            swaps.append(e)
            sessions[sid] = (sessions[sid][0], e["tier"] if e["type"] == "swap_out" else "device")
    return sessions, swaps


def shown(app) -> tuple[dict, list[dict], VramPlot]:
    """What the screen shows: {id: (state, where)} from the table's cells, the swap log's lines, the plot."""
    table = app.screen.query_one(ReplaySessions)
    rows = {int(k.value): (str(table.get_cell(k, "state")), str(table.get_cell(k, "location"))) for k in table.rows}
    return rows, app.screen.query_one(SwapLog).lines, app.screen.query_one(VramPlot)


def check(app) -> tuple[dict, list[dict], float]:
    """The table, the swap log and the plot agree with the events up to the cursor; returns what they show."""
    r = app.replay
    limit = r.t0 + r.cursor
    want_sessions, want_swaps = at_cursor(r.events, limit)
    rows, lines, plot = shown(app)
    assert rows == want_sessions
    assert lines == want_swaps[-len(lines):] and len(lines) == min(len(want_swaps), 500)
    assert plot.now == limit / 1e9  # the plot's right edge is the cursor
    assert plot.samples and all(s.t <= plot.now for s in plot.samples)
    assert len(plot.markers) == sum(1 for e in want_swaps if e["mono_ns"] / 1e9 >= plot.now - plot.window)
    return rows, lines, plot.now


# -- a real exp3 run -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exp3_run(tmp_path_factory) -> Path:
    """A short exp3 on a private daemon: six sessions under a budget they exceed, so paused ones swap out."""
    out = tmp_path_factory.mktemp("replay") / "exp3"
    done = scenario("run", "exp3", "--headless", "--set", "sessions=6", "--set", "prompt_len=64", "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert results(out)["swap"]["swap_outs"] > 0
    return out


@pytest.mark.slow
@pytest.mark.asyncio
async def test_replay_of_exp3_moves_the_plot_and_the_tables_with_the_cursor(exp3_run):
    app = ReplayConsole(Replay.load(exp3_run))
    async with app.run_test(size=(120, 40)) as pilot:
        r = app.replay
        assert r.cursor == r.end  # it opens at the end: every session closed, every swap in the log
        rows, lines, _ = check(app)
        assert rows == {} and lines and {e["type"] for e in lines} == {"swap_out", "swap_in"}

        await pilot.press("home")
        rows, lines, now = check(app)
        assert r.cursor == 0 and not lines

        await pilot.press("right_square_bracket")  # the first swap
        rows, lines, at_swap = check(app)
        first = lines[-1]
        assert len(lines) == 1 and at_swap > now and r.t0 + r.cursor == first["mono_ns"]
        assert rows[first["session"]][1] == first["tier"] and len(rows) > 1

        await pilot.press("right", "right", "right")
        rows, lines, later = check(app)
        assert r.t0 + r.cursor == first["mono_ns"] + round(3 * r.step * 1e9) and later > at_swap

        await pilot.press("shift+right")
        rows, lines, later2 = check(app)
        assert later2 > later

        # the third swap, from the start (how many swaps lie past the steps above depends on the run's timing)
        assert len(r.swap_times) >= 3
        await pilot.press("home", *["right_square_bracket"] * 3)
        rows, lines, _ = check(app)
        assert len(lines) == 3 and r.t0 + r.cursor == lines[-1]["mono_ns"]

        await pilot.press("left_square_bracket")  # back one swap: the state is built again from the start
        rows, back, _ = check(app)
        assert back == lines[:-1]

        await pilot.press("shift+left", "left")
        check(app)

        swap_in = next(e for e in r.events if e["type"] == "swap_in")
        await pilot.press("home")
        while r.t0 + r.cursor < swap_in["mono_ns"]:
            await pilot.press("right_square_bracket")
        rows, lines, _ = check(app)  # the first swap-in brings its session back
        assert lines[-1] is swap_in and rows[swap_in["session"]][1] == "device"

        await pilot.press("end")
        rows, lines, _ = check(app)
        assert r.cursor == r.end and rows == {}


@pytest.mark.slow
def test_an_exported_events_file_replays_like_its_run_folder(exp3_run, tmp_path):
    n, path = export_events(exp3_run, "jsonl", tmp_path / "run.jsonl")
    folder, exported = Replay.load(exp3_run), Replay.load(path)
    assert n == len(folder.events) == len(exported.events) and folder.end == exported.end
    mid = folder.swap_times[len(folder.swap_times) // 2] - folder.t0
    folder.seek(mid)
    exported.seek(mid)
    assert folder.state.sessions == exported.state.sessions and list(folder.state.swaps) == list(exported.state.swaps)


# -- paths that hold no run ------------------------------------------------------------------------

def bad_path(kind: str, d: Path) -> Path:
    """A path of this kind, under the empty folder d, that holds no run."""
    if kind == "missing":
        return d / "nope"
    if kind == "not-jsonl":
        (d / "notes.txt").write_text("not events\n")
        return d / "notes.txt"
    if kind == "folder-without-events":
        (d / "results.json").write_text(json.dumps({"status": "pass"}, indent=2))
    elif kind == "sweep":
        (d / "sessions=8").mkdir()
        (d / "sessions=8" / "events.jsonl").write_text(json.dumps(_event(0, "vram", {})) + "\n")
    return d


@pytest.mark.parametrize("kind, words", [
    ("missing", "no such file or folder"),
    ("empty-folder", "no events to replay"),
    ("folder-without-events", "no events to replay"),
    ("not-jsonl", "no events to replay"),
    ("sweep", "a sweep; replay one of its points: "),
])
def test_a_path_without_a_run_is_one_line_and_exit_2(kind, words, tmp_path, capsys):
    path = bad_path(kind, tmp_path)
    assert main(["--replay", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"djinn-console: {path}:") and words in err[0]


# -- fixed events: snapshots and the keys that need no daemon ----------------------------------------

T0 = 1_000_000_000_000  # mono_ns at the start of the run
START = datetime(2026, 11, 22, 14, 15, 3, tzinfo=timezone.utc)
RUN = "logs/exp3/20261122T141503Z"
BUDGET, WEIGHTS, SLAB = 96 * MiB, 24 * MiB, 16 * MiB


def fixed_events() -> list[dict]:
    """A 112 s exp3-like run: eight sessions pause one by one, from the fifth each pushes the oldest out
    (the fourth to disk); from 70 s they resume in turn, swapped back in, and close."""
    acts = [(0.0, "scenario", {"action": "started", "name": "exp3"})]
    where = {}
    for k in range(1, 9):
        t = 4.0 + 8 * (k - 1)
        if k > 4:
            tier = "disk" if k == 8 else "host"
            acts.append((t, "swap_out", {"session": k - 4, "tier": tier, "bytes": SLAB, "ms": 2.0 + k / 4,
                                         "gbps": 6.5, "reason": "evict"}))
            where[k - 4] = tier
        where[k] = "device"
        acts.append((t, "session", {"session": k, "action": "created", "state": "idle", "layer": None,
                                    "qos": ("interactive", "batch", "realtime")[k % 3], "location": "device"}))
        layer = (2, 4, 6)[k % 3]
        acts.append((t + 0.5, "session", {"session": k, "action": "paused", "state": "paused", "layer": layer,
                                          "qos": ("interactive", "batch", "realtime")[k % 3], "location": "device"}))
        acts.append((t + 0.5, "scenario", {"action": "progress", "name": "exp3", "done": k, "total": 16,
                                           "message": f"session {k} paused at layer {layer}"}))
    for k in range(1, 9):
        t = 70.0 + 5 * (k - 1)
        if k == 1:
            acts.append((t, "swap_out", {"session": 5, "tier": "host", "bytes": SLAB, "ms": 2.5, "gbps": 6.7,
                                         "reason": "evict"}))
        if k in (1, 2, 3, 4, 5):
            acts.append((t, "swap_in", {"session": k, "tier": "host" if k != 4 else "disk", "bytes": SLAB,
                                        "ms": 1.5 + k / 2, "gbps": 9.0, "reason": "resume"}))
        for dt, action, state in ((0.1, "resumed", "running"), (1.0, "finished", "idle"), (2.0, "closed", "closed")):
            acts.append((t + dt, "session", {"session": k, "action": action, "state": state, "layer": None,
                                             "qos": ("interactive", "batch", "realtime")[k % 3], "location": "device"}))
        acts.append((t + 1.0, "scenario", {"action": "progress", "name": "exp3", "done": 8 + k, "total": 16,
                                           "message": f"session {k} completed, tokens match"}))
    acts.append((110.0, "scenario", {"action": "finished", "name": "exp3", "status": "pass"}))
    acts.sort(key=lambda a: a[0])

    events, resident, away, i = [], set(), {}, 0
    for n in range(1121):  # a sample every 0.1 s; the events of each tenth come before its sample
        t = n / 10
        while i < len(acts) and acts[i][0] <= t:
            at, kind, fields = acts[i]
            events.append(_event(at, kind, fields))
            s = fields.get("session")
            if kind == "session" and fields["action"] == "created" or kind == "swap_in":
                resident.add(s)
                away.pop(s, None)
            elif kind == "swap_out":
                resident.discard(s)
                away[s] = fields["tier"]
            elif kind == "session" and fields["action"] == "closed":
                resident.discard(s)
            i += 1
        used = WEIGHTS + SLAB * len(resident) - (2 * MiB if n % 37 == 0 else 0)
        events.append(_event(t, "vram", {"used_bytes": used, "budget_bytes": BUDGET, "capacity_bytes": 128 * MiB,
                                         "peak_bytes": used, "host_bytes": SLAB * sum(v == "host" for v in away.values()),
                                         "host_capacity_bytes": 256 * MiB,
                                         "disk_bytes": SLAB * sum(v == "disk" for v in away.values())}))
    for seq, e in enumerate((e for e in events if e["type"] != "scenario"), 1):
        e["seq"] = seq  # the scenario's own events have none, as the recorder writes them
    return events


def _event(t: float, kind: str, fields: dict) -> dict:
    ns = round(t * 1e9)
    ts = (START + timedelta(microseconds=ns // 1000)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    extra = {"run": 7, "origin": "scenario"} if kind == "scenario" else {}
    return {"ts": ts, "mono_ns": T0 + ns, "type": kind, **extra, **fields}


@pytest.fixture
def fixed_run(tmp_path, monkeypatch) -> str:
    """The fixed run's events.jsonl under a relative path, so the status line (and the SVG) never changes."""
    monkeypatch.chdir(tmp_path)
    folder = Path(RUN)
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in fixed_events()))
    return RUN


async def to_61s(pilot) -> None:
    """From the start, six jumps of ten steps and one step (a step is 1 s on this run)."""
    await pilot.press("home", *["shift+right"] * 6, "right")
    await pilot.pause()


def test_the_fixed_run_loads_in_time_order(fixed_run):
    events = load_events(fixed_run)
    assert [e["mono_ns"] for e in events] == sorted(e["mono_ns"] for e in events)
    r = Replay(fixed_run, events)
    assert r.end == 112 * 10**9 and r.step == 1 and r.window == 120


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_snapshot_replay_at_61s_four_sessions_swapped_out_memory_at_the_budget(fixed_run, size, snap_compare):
    assert snap_compare(ReplayConsole(Replay.load(fixed_run)), terminal_size=size, run_before=to_61s)


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_snapshot_replay_help_lists_the_keys(fixed_run, size, snap_compare):
    async def run_before(pilot):
        await pilot.press("question_mark")
        await pilot.pause()
    assert snap_compare(ReplayConsole(Replay.load(fixed_run)), terminal_size=size, run_before=run_before)


@pytest.mark.asyncio
async def test_fixed_run_at_61s_shows_what_the_events_say(fixed_run):
    app = ReplayConsole(Replay.load(fixed_run))
    async with app.run_test(size=(120, 35)) as pilot:
        await to_61s(pilot)
        rows, lines, now = check(app)
        assert now == (T0 + 61 * 10**9) / 1e9
        assert rows == {1: ("paused@4", "host"), 2: ("paused@6", "host"), 3: ("paused@2", "host"),
                        4: ("paused@4", "disk"), 5: ("paused@6", "device"), 6: ("paused@2", "device"),
                        7: ("paused@4", "device"), 8: ("paused@6", "device")}
        table = app.screen.query_one(ReplaySessions)
        assert str(table.get_cell("1", "bytes")) == "16.0 MiB" and str(table.get_cell("5", "bytes")) == "–"


def first_command(app) -> str | None:
    """The first line of the command palette's first hit, None while it has none."""
    hits = app.screen.query(CommandList)
    return str(hits.first().get_option_at_index(0).prompt).splitlines()[0] if hits and hits.first().option_count else None


@pytest.mark.asyncio
async def test_the_palette_help_zoom_a_click_and_play(fixed_run):
    app = ReplayConsole(Replay.load(fixed_run))
    async with app.run_test(size=(120, 35)) as pilot:
        r = app.replay
        await pilot.press("home", "ctrl+p", *"next swap")
        await until(pilot, lambda: first_command(app) == "replay: next swap", what="the palette's hit")
        await pilot.press("enter")
        await until(pilot, lambda: r.cursor > 0, what="the palette's action")
        assert r.cursor == r.swap_times[0] - r.t0 == 36 * 10**9

        await pilot.press("question_mark")
        assert isinstance(app.screen, ReplayHelp)
        await pilot.press("escape")
        assert not isinstance(app.screen, ReplayHelp)

        plot = app.screen.query_one(VramPlot)
        await pilot.press("z")
        assert plot.window == 60 and r.window == 60
        await pilot.press("z", "z", "z")
        assert plot.window == 120

        timeline = app.screen.query_one(Timeline)
        start = 1 + len(timeline.label) + 1  # padding, label, space
        await pilot.click(Timeline, offset=(start + timeline.bar_width() - 1, 0))
        assert r.cursor == r.end
        await pilot.click(Timeline, offset=(start, 0))
        assert r.cursor == 0

        await pilot.press("plus", "plus", "plus")  # 1 s → 2 → 5 → 10 s a step
        assert r.step == 10
        await pilot.press("home", "space")
        await until(pilot, lambda: r.cursor == r.end and not app.screen.playing, what="play to the end")
        check(app)
