"""The memkernel scenario (reference experiment 3.2): a session churn under a budget, the daemon's device
bytes and host pool against plain PyTorch holding the same sessions; without pressure it fails."""

import pytest

from djinnd import Client

from conftest import Daemon, assert_png, results, scenario

SMALL = ("--set", "ops=40", "--set", "max_live=6", "--set", "prompt_min=16", "--set", "prompt_max=128",
         "--set", "grow_min=1", "--set", "grow_max=4", "--set", "check_every=2")


@pytest.fixture(scope="module")
def djinnd(djinn_cache):
    d = Daemon("--device", "cpu").start()
    yield d
    d.remove()


def test_memkernel_passes_the_daemon_plateaus_under_the_budget_the_baseline_does_not(djinnd, tmp_path):
    with Client(djinnd.socket) as c:
        budget0 = c.status()["memory"]["budget_bytes"]
    out = scenario("run", "memkernel", "--headless", "--output", str(tmp_path), *SMALL, socket=djinnd.socket)
    assert out.returncode == 0, out.stdout + out.stderr
    r = results(tmp_path)
    crit = {c["id"]: c for c in r["criteria"]}
    assert r["status"] == "pass" and all(c["ok"] for c in crit.values()), crit
    assert set(crit) == {"all_complete", "tokens_equal", "peak_under_budget", "fragmentation_bounded", "pressure"}

    h, budget = r["headline"], r["params"]["budget"]
    assert r["params"]["budget_rule"] == "auto" and h["budget_bytes"] == budget
    assert h["baseline_peak_bytes"] > budget >= h["daemon_peak_bytes"] > r["model"]["weights_bytes"]
    assert r["baseline"]["peak_bytes"] == h["baseline_peak_bytes"] and r["baseline"]["kind"] == "naive-holder"
    assert "no allocator reserve" in r["baseline"]["measured_by"]  # on the CPU: the bytes held
    assert h["swap_outs"] > 0 and h["swap_ins"] > 0 and r["swapping_active"] is True
    assert h["host_peak_bytes"] > 0 and h["host_span_peak_bytes"] >= h["host_peak_bytes"]
    assert 0 <= h["host_fragmentation"] <= r["params"]["max_fragmentation"]

    samples = r["samples"]
    assert [s["op"] for s in samples[:-1]] == list(range(41))  # before, after every operation,
    assert samples[-1]["op"] == 40  # and once the churn's last sessions are closed
    assert all(s["device_bytes"] <= s["budget_bytes"] == budget for s in samples)
    assert max(s["baseline_bytes"] for s in samples) > budget  # the naive holder goes past it, at times
    assert any(s["host_bytes"] > 0 for s in samples) and samples[-1]["host_bytes"] == 0 and samples[-1]["live"] == 0
    assert all(s["host_span_bytes"] >= s["host_bytes"] for s in samples)
    assert len(r["vram_progression"]) == len(samples)

    integ = r["integrity"]
    assert integ["mismatches"] == 0 and integ["checked_sessions"] > 0 and integ["swapped_checked"] > 0
    assert r["num_sessions_requested"] == r["num_sessions_completed"] == r["headline"]["sessions"] > 6
    assert r["capacity_math"]["expected_swapping"] is True
    assert_png(r, tmp_path / "memkernel.png")
    with Client(djinnd.socket) as c:  # the budget is put back, and no session is left
        st = c.status()
        assert st["memory"]["budget_bytes"] == budget0 and st["sessions"] == 0


def test_without_pressure_the_verdict_fails_and_says_why(djinnd, tmp_path):
    out = scenario("run", "memkernel", "--headless", "--output", str(tmp_path), "--set", "budget=1GiB",
                   "--set", "ops=12", *SMALL[2:], socket=djinnd.socket)
    assert out.returncode == 1, out.stdout + out.stderr
    r = results(tmp_path)
    crit = {c["id"]: c for c in r["criteria"]}
    assert r["status"] == "fail" and crit["pressure"]["ok"] is False
    assert "never needed more than the budget" in crit["pressure"]["measured"]
    assert r["reasons"] == [f"{crit['pressure']['text']}: {crit['pressure']['measured']}"]
    assert crit["fragmentation_bounded"]["ok"] is None  # nothing was swapped: nothing to measure
    assert crit["all_complete"]["ok"] and crit["tokens_equal"]["ok"] and crit["peak_under_budget"]["ok"]
    assert r["headline"]["swap_outs"] == 0 and r["headline"]["baseline_peak_bytes"] < r["params"]["budget"] == 1 << 30
