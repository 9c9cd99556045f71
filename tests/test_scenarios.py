"""Issue 6: `djinn scenario list | show | run`, exp3 and decode, against real daemons and real CLI processes."""

import csv
import json
import time
from pathlib import Path

import pytest

from conftest import CONTRACT_KEYS, Daemon, assert_png, results, scenario


@pytest.fixture(scope="module")
def shared():
    """One CPU daemon for the tests that run against an existing daemon."""
    d = Daemon("--device", "cpu").start()
    yield d
    d.remove()


def test_list_and_show():
    out = scenario("list")
    assert out.returncode == 0, out.stderr
    assert "exp3" in out.stdout and "decode" in out.stdout
    show = scenario("show", "exp3")
    assert show.returncode == 0, show.stderr
    for word in ("sessions", "24 / 50", "prompt_len", "budget", "pass criteria", "integrity"):
        assert word in show.stdout


@pytest.mark.parametrize("args, words", [
    (["run", "nope"], "unknown scenario 'nope'"),
    (["show", "nope"], "unknown scenario 'nope'"),
    (["run", "exp3", "--set", "nope=1"], "has no parameter 'nope'"),
    (["run", "exp3", "--set", "sessions=many"], "'many' is not an integer"),
    (["run", "exp3", "--set", "budget=12XB"], "not a size"),
    (["run", "exp3", "--set", "swap=maybe"], "not on/off"),
    (["run", "exp3", "--set", "sessions"], "KEY=VALUE"),
    (["run", "exp3", "--set", "model=[a,b]"], "cannot be swept"),
])
def test_bad_input_is_one_clear_line_and_exit_2(args, words):
    out = scenario(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_exp3_headless_on_a_private_daemon(tmp_path):
    out_dir = tmp_path / "exp3"
    out = scenario("run", "exp3", "--headless", "--output", str(out_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting a private one" in out.stderr
    assert "exp3: PASS" in out.stdout and "swapping starts at session" in out.stdout
    r = results(out_dir)
    assert CONTRACT_KEYS <= set(r)
    assert r["status"] == "pass" and r["reasons"] == []
    assert r["device"]["kind"] == "cpu" and r["model"]["name"] == "tiny-llama"
    assert r["swapping_active"] is True and r["swap"]["swap_outs"] > 0 and r["swap"]["latency_ms"]["p50"] > 0
    assert r["vram_stats"]["max_bytes"] <= r["vram_stats"]["budget_bytes"]
    assert r["integrity"] == {"checked_sessions": 24, "mismatches": 0}
    assert r["num_sessions_completed"] == r["num_sessions_requested"] == 24
    m = r["capacity_math"]
    assert m["expected_swapping"] and m["demand_bytes"] >= 1.3 * m["budget_bytes"]
    assert r["bytes_per_session_charged"] == m["bytes_per_session"]  # the math matches what the daemon charged
    assert [p["session"] for p in r["vram_progression"]] == list(range(1, 25))
    assert max(p["used_bytes"] for p in r["vram_progression"]) <= m["budget_bytes"]
    events = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    kinds = {e["type"] for e in events}
    assert {"vram", "swap_out", "swap_in", "session", "scenario"} <= kinds
    actions = [e["action"] for e in events if e["type"] == "scenario"]
    assert actions[0] == "started" and actions[-1] == "finished"
    rows = list(csv.reader((out_dir / "vram.csv").open()))
    assert rows[0] == ["timestamp", "used", "budget", "capacity"] and len(rows) > 5
    assert_png(r, out_dir / "exp3.png")
    log = (out_dir / "daemon" / "djinnd.log").read_text()
    sock = Path(log.split("serving on ")[1].split()[0])
    assert "stopped" in log and not sock.parent.exists()  # the private daemon was stopped and its folder removed


def test_budget_too_small_for_one_session_exits_2(shared, tmp_path):
    out = scenario("run", "exp3", "--headless", "--json", "--set", "budget=7MiB", "--output", str(tmp_path / "o"),
                   socket=shared.socket)
    assert out.returncode == 2, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "skipped" and "too small for even one session" in r["reasons"][0]
    assert results(tmp_path / "o")["status"] == "skipped"


@pytest.mark.slow
def test_swap_off_with_demand_above_budget_fails_and_the_daemon_survives(shared, tmp_path):
    with shared.client() as c:
        before = c.status()["memory"]
    out = scenario("run", "exp3", "--headless", "--set", "swap=off", "--set", "sessions=8", "--set", "prompt_len=64",
                   "--output", str(tmp_path / "o"), socket=shared.socket)
    assert out.returncode == 1, out.stdout + out.stderr
    r = results(tmp_path / "o")
    assert r["status"] == "fail"
    assert any("swapping is off" in reason for reason in r["reasons"])
    assert r["num_sessions_completed"] < r["num_sessions_requested"]
    with shared.client() as c:  # the daemon answers, as it was before the run
        st = c.status()
    assert st["sessions"] == 0
    assert st["memory"]["budget_bytes"] == before["budget_bytes"] and st["memory"]["swap_enabled"] is True


@pytest.mark.slow
def test_hold_all_baseline_needs_more_than_the_budget(tmp_path):
    out = scenario("run", "exp3", "--headless", "--set", "baseline=hold-all", "--output", str(tmp_path / "b"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "private" not in out.stderr  # an in-process baseline needs no daemon
    r = results(tmp_path / "b")
    assert r["baseline"]["kind"] == "hold-all" and "baseline" in r["baseline"]["label"]
    assert r["baseline"]["peak_bytes"] > r["capacity_math"]["budget_bytes"]
    assert r["vram_stats"]["max_bytes"] > r["vram_stats"]["budget_bytes"]
    assert r["num_sessions_requested"] == 24 and r["baseline"]["exceeds_budget_at_session"] <= 24
    assert any("budget" in reason for reason in r["reasons"])


@pytest.mark.slow
def test_sweep_writes_a_folder_per_point_and_a_summary(shared, tmp_path):
    out = scenario("run", "exp3", "--headless", "--set", "sessions=[8,16,24]", "--set", "prompt_len=128",
                   "--output", str(tmp_path / "s"), socket=shared.socket)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["status"] == "pass" and summary["sweep"] == {"sessions": [8, 16, 24]}
    assert [p["sessions"] for p in summary["points"]] == [8, 16, 24]
    for n in (8, 16, 24):
        r = results(tmp_path / "s" / f"sessions-{n}")
        assert r["num_sessions_completed"] == n and r["swapping_active"]
    assert "exp3 sweep: PASS" in out.stdout


@pytest.mark.slow
def test_decode_writes_its_ratio(shared, tmp_path):
    out = scenario("run", "decode", "--headless", "--set", "tokens=16", "--set", "repeats=2",
                   "--output", str(tmp_path / "d"), socket=shared.socket)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    r = results(tmp_path / "d")
    assert r["status"] in ("pass", "fail")
    assert r["ratio"] > 0 and r["decode"]["ratio"] == r["ratio"]
    for way in ("djinn_per_call", "djinn_one_call", "in_process", "floor"):
        assert r["decode"][way]["tokens_per_s"] > 0 and r["decode"][way]["latency_ms"]["p50"] > 0
    assert 0 < r["decode"]["ratio_floor"] and 0 < r["decode"]["ratio_of_floor"]
    assert r["integrity"]["mismatches"] == 0
    d = r["decode"]  # on the CPU, djinnd per call is judged against the bare zmq floor of the same run
    assert d["judged_against"] == "the floor" and d["min_ratio"] == 0.95
    assert (r["status"] == "pass") == (d["ratio_of_floor"] >= d["min_ratio"])


@pytest.mark.slow
def test_a_run_launched_by_the_daemon_reports_progress(shared):
    with shared.client() as c, c.subscribe(("scenario",)) as sub:
        started = c.call("scenario.start", name="exp3", set={"sessions": 4, "prompt_len": 64})
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline and "exited" not in seen:
            ev = sub.recv(1.0)
            if ev and ev.get("run") == started["run"]:
                seen.append(ev["action"])
    assert seen[0] == "started" and "progress" in seen and "finished" in seen and seen[-1] == "exited"
    assert results(Path(started["output"]))["status"] == "pass"


def test_catalog_parses_sets_as_the_daemon_and_users_write_them():
    from scenarios import catalog
    sc = catalog.find("exp3")
    assert sc.defaults_for("cpu")["sessions"] == 24 and sc.defaults_for("cuda")["prompt_len"] == 2048
    sets = sc.parse_sets(["sessions=[8, 16, 24]", "swap=false", "budget=512MiB", "breakpoints=[1,3]",
                          "budget_fraction=0.5"])
    assert sets == {"sessions": [8, 16, 24], "swap": [False], "budget": [512 << 20], "breakpoints": [[1, 3]],
                    "budget_fraction": [0.5]}
    points = sc.points("cpu", sets)
    assert [p["sessions"] for p in points] == [8, 16, 24] and all(p["breakpoints"] == [1, 3] for p in points)
    assert sc.parse_sets(["budget=auto"]) == {"budget": ["auto"]}
    with pytest.raises(catalog.ParamError, match="below the minimum"):
        sc.parse_sets(["sessions=0"])
    with pytest.raises(catalog.ParamError, match="choose none, hold-all"):
        sc.parse_sets(["baseline=hold-some"])


def test_scalability_sweeps_clients_batched_and_not_and_draws_both_curves(tmp_path):
    out_dir = tmp_path / "scal"
    out = scenario("run", "scalability", "--headless", "--output", str(out_dir),
                   "--set", "clients=1,4", "--set", "seconds=0.5")
    r = results(out_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert CONTRACT_KEYS <= set(r) and (out_dir / "scalability.png").read_bytes()[:4] == b"\x89PNG"
    on, off = r["sweeps"]["batched"], r["sweeps"]["unbatched"]
    assert [q["clients"] for q in on] == [q["clients"] for q in off] == [1, 4]
    assert all(q["tokens"] > 0 and not q["errors"] for q in on + off)
    assert on[1]["mean_batch"] > 1 and off[1]["mean_batch"] == 1.0  # four clients share forwards only when batched
    assert {c["id"]: c["ok"] for c in r["criteria"]} == {"all_complete": True, "speedup": None, "beats_unbatched": None}
