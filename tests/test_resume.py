"""The resume scenario: resume latency by depth from a swap, held, and recomputed; it fails with swapping off."""

import pytest

from djinnd import Client

from conftest import Daemon, results, scenario

SMALL = ("--set", "prompt_lens=16,64", "--set", "repeats=2", "--set", "idle_ms=0")


@pytest.fixture(scope="module")
def djinnd(djinn_cache):
    d = Daemon("--device", "cpu").start()
    yield d
    d.remove()


def test_resume_passes_with_equal_tokens_swap_ins_and_a_figure(djinnd, tmp_path):
    out = scenario("run", "resume", "--headless", "--output", str(tmp_path), *SMALL, socket=djinnd.socket)
    assert out.returncode == 0, out.stdout + out.stderr
    r = results(tmp_path)
    assert r["status"] == "pass"
    crit = {c["id"]: c for c in r["criteria"]}
    assert all(c["ok"] for c in crit.values()), crit
    assert r["integrity"]["mismatches"] == 0 and r["integrity"]["checked_sessions"] == 2 * 3 * 3 * 2
    assert r["integrity"]["hidden_checked"] == 2 * 3 and r["integrity"]["hidden_mismatches"] == 0
    swap_runs = [x for pt in r["points"] for x in pt["runs"] if x["way"] == "swap"]
    assert len(swap_runs) == 12 and all(x["swapped_in"] and x["location"] == "host" for x in swap_runs)
    assert {x["token"] for pt in r["points"] for x in pt["runs"]} == {pt["reference_token"] for pt in r["points"]}
    h = r["headline"]
    assert h["prompt_len"] == 64 and h["swap_ms"] < h["recompute_ms"] and h["held_ms"] > 0
    png = tmp_path / "resume.png"
    assert r["figure"] == str(png) and png.stat().st_size > 0


def test_with_swapping_off_no_swap_happens_and_the_verdict_fails(djinnd, tmp_path):
    out = scenario("run", "resume", "--headless", "--output", str(tmp_path), "--set", "swap=off",
                   "--set", "prompt_lens=16", "--set", "repeats=1", "--set", "idle_ms=0", socket=djinnd.socket)
    assert out.returncode == 1, out.stdout + out.stderr
    r = results(tmp_path)
    crit = {c["id"]: c for c in r["criteria"]}
    assert r["status"] == "fail" and crit["swapped"]["ok"] is False
    assert crit["swapped"]["measured"].startswith("0 swap-ins in 3 resumes")
    assert crit["all_complete"]["ok"] and crit["tokens_equal"]["ok"]  # the resumes themselves still work
    assert crit["hidden_identical"]["ok"] is None and crit["swap_beats_recompute"]["ok"] is None
    with Client(djinnd.socket) as c:  # the daemon's settings are put back
        assert c.status()["memory"]["swap_enabled"] is True
