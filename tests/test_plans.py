"""Issue 23: experiment plans run unattended, skip what is done, resume, refuse a second runner,
survive a broken point, and report means with intervals and figures."""

import json
import os
import signal
import time

import pytest

from conftest import ROOT, Daemon, djinn, scenario
from djinnd import ForkServer

EXP3 = "prompt_len = 32\ngen_tokens = 2\n"


@pytest.fixture(scope="module")
def djinnd(djinn_cache):
    d = Daemon("--device", "cpu").start()
    yield d
    d.remove()


@pytest.fixture
def plan(djinnd, tmp_path):
    """djinn plan ARGS... against the module's daemon, results under tmp_path/logs."""
    env = {"DJINN_SOCKET": str(djinnd.socket), "DJINN_LOGS": str(tmp_path / "logs")}

    def djinn_plan(*args, background=False):
        if background:  # a Popen-like handle; what it prints goes to tmp_path/background.log
            return ForkServer.shared().spawn(["plan", *args], {**os.environ, **env}, str(tmp_path / "background.log"),
                                             "djinn", str(ROOT))
        return djinn("plan", *args, env=env)
    djinn_plan.folder = tmp_path / "logs" / "plans"
    return djinn_plan


def write(tmp_path, name, text) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def states(plan, path) -> dict:
    out = plan("status", path, "--json")
    assert out.returncode == 0, out.stderr
    return {r["point"]: r for r in json.loads(out.stdout)}


def test_a_plan_runs_its_points_skips_them_when_done_and_force_runs_them_again(plan, tmp_path):
    path = write(tmp_path, "three", f'title = "three points"\nrepeats = 2\n[scenarios.exp3]\nsessions = [2, 3, 4]\n{EXP3}')
    first = plan("run", path)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = states(plan, path)
    assert list(rows) == ["exp3-sessions=2", "exp3-sessions=3", "exp3-sessions=4"]
    for r in rows.values():
        assert r["state"] == "done" and r["finished"] == 2 and r["verdicts"] == {"pass": 2}
        assert r["figures"]["wall_s"]["n"] == 2 and r["figures"]["wall_s"]["ci95"] is not None
    again = plan("run", path)
    assert again.returncode == 0 and again.stdout.count("skipped") == 3 and "run 1" not in again.stdout, again.stdout
    folders = lambda: sorted(p for p in plan.folder.glob("three/*/*/results.json"))  # noqa: E731
    assert len(folders()) == 6
    forced = plan("run", path, "--point", "exp3-sessions=3", "--force")
    assert forced.returncode == 0 and "run 2 of 2" in forced.stdout, forced.stdout
    assert len(folders()) == 8  # two more runs of that point; its figures are of the newest two
    out = plan("report", path)
    assert out.returncode == 0, out.stderr
    report = plan.folder / "three" / "report.md"
    png = plan.folder / "three" / "exp3.png"
    assert "| exp3-sessions=3 | done | 2/2 | 2 pass |" in report.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = json.loads((plan.folder / "three" / "report.json").read_text())
    assert [p["point"] for p in summary["points"]] == list(rows)


def test_a_broken_point_fails_with_its_reason_and_the_others_still_run(plan, tmp_path):
    path = write(tmp_path, "broken", f'repeats = 1\n[scenarios.agents]\ntimeout_s = 0.5\n'
                                     f'[scenarios.exp3]\nsessions = [2, 3]\n{EXP3}')
    out = plan("run", path)
    assert out.returncode == 2, out.stdout + out.stderr
    rows = states(plan, path)
    assert rows["agents"]["state"] == "failed" and "ran past its 0.5 s limit" in rows["agents"]["reason"]
    assert rows["exp3-sessions=2"]["state"] == rows["exp3-sessions=3"]["state"] == "done"
    shown = plan("status", path).stdout
    assert "failed" in shown and "ran past its 0.5 s limit" in shown
    bad = plan("run", write(tmp_path, "bad", "[scenarios.exp3]\nsessions = [0, 2]\n"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "sessions" in bad.stderr, bad.stderr
    assert not (plan.folder / "bad").exists()  # a plan that cannot be read runs nothing


def test_an_interrupted_plan_resumes_where_it_stopped_and_a_second_runner_is_refused(plan, tmp_path):
    path = write(tmp_path, "long", f'repeats = 1\n[scenarios.exp3]\nsessions = [2, 3, 4, 5]\n{EXP3}')
    runner = plan("run", path, background=True)
    deadline = time.monotonic() + 120
    while not list(plan.folder.glob("long/exp3-sessions=2/*/outcome.json")):
        assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "background.log").read_text()
        time.sleep(0.1)
    second = plan("run", path)
    assert second.returncode == 2 and f"plan long is already running (pid {runner.pid})" in second.stderr, second.stderr
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(60) == 130
    rows = states(plan, path)
    assert rows["exp3-sessions=2"]["state"] == "done"
    assert sum(r["state"] == "pending" for r in rows.values()) >= 2  # the one cut short does not count
    resumed = plan("run", path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "exp3-sessions=2: done (1 runs), skipped" in resumed.stdout
    assert all(r["state"] == "done" and r["finished"] == 1 for r in states(plan, path).values())


def test_a_private_daemon_point_runs_on_its_own_model_or_says_skipped(plan, tmp_path):
    """The module's daemon serves tiny-llama; each point here gets a daemon of its own on its model."""
    path = write(tmp_path, "models", 'repeats = 1\n[scenarios.exp3]\nprivate_daemon = true\ndevice = "cpu"\n'
                                     f'model = ["tiny-gpt2", "no-such-model"]\nsessions = 2\n{EXP3}')
    out = plan("run", path)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = states(plan, path)
    gpt2, missing = rows["exp3-model=tiny-gpt2"], rows["exp3-model=no-such-model"]
    assert gpt2["verdicts"] == {"pass": 1} and missing["verdicts"] == {"skipped": 1}
    assert "unknown model 'no-such-model'" in missing["reason"]
    results = json.loads(next(plan.folder.glob("models/exp3-model=tiny-gpt2/*/results.json")).read_text())
    assert results["model"]["name"] == "tiny-gpt2"


def test_a_plan_sweeps_its_private_daemons_arguments(plan, tmp_path):
    """daemon = [...] runs each point on a daemon started with those arguments: with --host-pool 0 every
    swap goes to the disk tier, with the default to the host pool (the ablation plan's host pool off)."""
    path = write(tmp_path, "pools", 'repeats = 1\n[scenarios.exp3]\nprivate_daemon = true\ndevice = "cpu"\n'
                                    f'daemon = ["", "--host-pool 0"]\nsessions = 3\n{EXP3}')
    show = plan("show", path)
    assert "exp3-daemon=--host-pool_0" in show.stdout and "(private djinnd --host-pool 0)" in show.stdout, show.stdout
    out = plan("run", path)
    assert out.returncode == 0, out.stdout + out.stderr
    for point, tier in (("exp3-daemon=default", "host"), ("exp3-daemon=--host-pool_0", "disk")):
        [run] = plan.folder.glob(f"pools/{point}/*/events.jsonl")
        tiers = {e["tier"] for e in map(json.loads, run.read_text().splitlines()) if e["type"] == "swap_out"}
        assert tiers == {tier}, (point, tiers)
    bad = write(tmp_path, "shared", f'[scenarios.exp3]\ndaemon = "--host-pool 0"\n{EXP3}')
    refused = plan("show", bad)
    assert refused.returncode == 2 and "with private_daemon = true" in refused.stderr, refused.stderr


def test_daemon_args_are_refused_when_a_daemon_answers(djinnd):
    out = scenario("run", "exp3", "--headless", "--daemon-args", "--host-pool 0", socket=djinnd.socket)
    assert out.returncode == 2 and "--daemon-args need a private daemon" in out.stderr, out.stderr
