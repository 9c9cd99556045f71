"""The steering scenario against a real daemon on SmolLM2-135M: scaling at a breakpoint changes the
output deterministically and x1.0 changes nothing; activation addition shifts the next token."""

import json

import pytest

from conftest import CONTRACT_KEYS, results, scenario


@pytest.mark.slow
def test_steering_headless_on_smollm2(smollm2_daemon, tmp_path):
    d = smollm2_daemon
    sessions = json.loads(d.run("djinn", "status", "--json").stdout)["sessions"]  # other tests' (a shared daemon)
    out = scenario("run", "steering", "--headless", "--output", str(tmp_path / "run"),
                   "--set", "prompts=2", "--set", "tokens=6", socket=d.socket)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "steering: PASS" in out.stdout and "activation addition" in out.stdout
    r = results(tmp_path / "run")
    assert CONTRACT_KEYS <= set(r)
    assert r["status"] == "pass" and r["reasons"] == [] and r["model"]["name"] == "smollm2-135m"
    sc = r["scaling"]
    assert sc["total"] == 12 and sc["identity_changed"] == 0 and sc["repeat_differs"] == 0
    assert all(p["steered"] and p["identity_changed"] == 0 for p in sc["prompts"])
    assert 0 < r["headline"]["changed_fraction"] == sc["changed_fraction"] == round(sc["changed"] / 12, 4)
    ad = r["addition"]
    assert ad["zero_shift"] == 0 and ad["shift"] > 0 and ad["lens_top1_is_token"]
    assert r["num_sessions_completed"] == r["num_sessions_spawned"] == 2 * 4 + 5
    assert json.loads(d.run("djinn", "status", "--json").stdout)["sessions"] == sessions  # every one it made closed

    past = scenario("run", "steering", "--headless", "--output", str(tmp_path / "past"), "--set", "layer=30",
                    socket=d.socket)
    assert past.returncode == 2 and "past the last layer" in past.stdout
    assert results(tmp_path / "past")["status"] == "skipped"
