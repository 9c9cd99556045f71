"""Issue 8's scenarios: agents (semantic scheduler against swapping on demand) and qos (classes against FCFS),
run through the real CLI against real daemons."""

import json

import pytest

from conftest import CONTRACT_KEYS, Daemon, assert_png, results, scenario


def criteria(r: dict) -> dict:
    return {c["id"]: c for c in r["criteria"]}


@pytest.fixture(scope="module")
def shared():
    """A CPU daemon with non-default scheduler settings, for the tests that check what a run leaves behind."""
    d = Daemon("--device", "cpu", "--qos-shares", "realtime=0.2,interactive=0.5,batch=0.3", "--max-concurrency", "2",
               "--lifo", "--escalation-ms", "400").start()
    yield d
    d.remove()


def test_list_show_and_parameters():
    out = scenario("list")
    assert out.returncode == 0, out.stderr
    assert "agents" in out.stdout and "qos" in out.stdout
    show = scenario("show", "agents")
    assert show.returncode == 0, show.stderr
    for word in ("arrival_rate", "24 / 80", "tool_ms", "hint", "policy", "semantic P99"):
        assert word in show.stdout
    show = scenario("show", "qos")
    assert show.returncode == 0, show.stderr
    for word in ("realtime", "think_batch_ms", "escalation_ms", "FCFS"):
        assert word in show.stdout
    bad = scenario("run", "agents", "--set", "policy=lazy")
    assert bad.returncode == 2 and "choose all, semantic, reactive, hold" in bad.stderr
    bad = scenario("run", "qos", "--set", "escalation_ms=soon")
    assert bad.returncode == 2 and "'soon' is not a number or one of none" in bad.stderr


def test_the_estimate_over_the_published_rules_is_what_the_daemon_charges(daemon):
    """The scenarios' capacity math (djinnd.estimate over status.model's charging rules) against the
    bytes sessions really hold, as their slabs grow and while paused."""
    from djinnd import estimate
    with daemon.client() as c:
        model = c.status()["model"]
        for prompt, decoded in ((60, 200), (100, 70), (7, 1), (300, 16)):
            sid = c.create_session(token_ids=[5] * prompt)
            c.generate(sid, decoded)
            assert c.session(sid)["device_bytes"] == estimate(model, prompt, decoded)["kv_bytes"], (prompt, decoded)
            c.close(sid)
        sid = c.create_session(token_ids=[5] * 100)
        c.run_to(sid, layer=2)
        assert c.session(sid)["device_bytes"] == estimate(model, 100)["paused_bytes"]


def test_the_workload_is_one_seeded_draw():
    from scenarios import agents, catalog
    p = catalog.find("agents").defaults_for("cpu")
    a, b = agents.draw(p), agents.draw(p)
    assert a == b and len(a) == p["agents"]
    assert all(x["arrival_s"] <= y["arrival_s"] for x, y in zip(a, a[1:]))
    assert all(len(x["tools_ms"]) == p["turns"] - 1 and min(x["tools_ms"]) >= p["tool_ms_min"] for x in a)
    assert agents.draw({**p, "seed": 1}) != a


@pytest.mark.slow
def test_agents_semantic_prefetches_where_reactive_swaps_on_demand(tmp_path):
    out_dir = tmp_path / "agents"
    out = scenario("run", "agents", "--headless", "--output", str(out_dir), "--set", "agents=16")
    r = results(out_dir)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    assert "starting a private one" in out.stderr and CONTRACT_KEYS <= set(r)
    assert r["reference"] == {"arrival_rate": 0.2, "time_scale": 40} and "40x the reference's 0.2/s" in out.stdout
    c = criteria(r)
    sem, rea, hold = (r["policies"][k] for k in ("semantic", "reactive", "hold"))
    s99, r99 = sem["wakeup_ms"]["p99"], rea["wakeup_ms"]["p99"]
    # The P99 wake-up criterion is judged from the figures and can fail; on two CPU cores its outcome is set
    # by which wake-ups happen to queue behind a layer of another agent's prefill (5-10 ms) rather than by
    # the swap (about 1 ms), so this test checks the verdict is honest, not which policy won (see the report).
    assert c["wakeup_p99"]["ok"] is (s99 < r99)
    failed = {k for k, v in c.items() if v["ok"] is False}
    assert failed <= {"wakeup_p99"}, r["reasons"]
    assert (out.returncode == 0) is (not failed) and (r["status"] == "pass") is (not failed)
    n = r["params"]["agents"]
    assert sem["completed"] == rea["completed"] == n
    # the budget holds a part of the agents, and more of them were live at once
    m = r["capacity_math"]
    assert m["expected_swapping"] and m["sessions_that_fit"] < min(sem["peak_live_agents"], rea["peak_live_agents"])
    assert r["vram_stats"]["max_bytes"] <= m["budget_bytes"] == r["vram_stats"]["budget_bytes"]
    assert sem["swap_outs"] > 0 and rea["swap_outs"] > 0
    # semantic: the prefetch brings agents back before they wake; reactive pays the swap-in on the wake-up
    assert sem["prefetch"]["scheduled"] == sem["wakeups"] == rea["wakeups"] == n * (r["params"]["turns"] - 1)
    assert sem["prefetch"]["hits"] >= 0.75 * sem["wakeups"] and c["prefetch_hits"]["ok"] is True
    assert rea["prefetch"]["hits"] == rea["prefetch"]["scheduled"] == 0
    assert sem["wakeups_that_swapped_in"] <= 0.25 * sem["wakeups"] < rea["wakeups_that_swapped_in"]
    assert rea["wake_jumps"] == hold["wake_jumps"] == 0  # without IO_WAIT signals no step is a wake-up
    # hold: no swapping, so only what fits is admitted (informational)
    assert hold["swap_outs"] == 0 and 1 <= hold["peak_live_agents"] <= m["sessions_that_fit"]
    assert hold["rejected"] > 0 and hold["completed"] >= 1
    assert c["hold_capacity"]["ok"] is None
    assert r["integrity"]["checked_sessions"] == n and r["integrity"]["mismatches"] == 0
    events = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    assert {"prefetch", "swap_out", "swap_in", "scenario", "vram"} <= {e["type"] for e in events}
    assert (out_dir / "vram.csv").read_text().startswith("timestamp,used,budget,capacity")
    assert_png(r, out_dir / "agents.png")


@pytest.mark.slow
def test_qos_realtime_first_with_qos_and_not_with_fcfs(tmp_path):
    out_dir = tmp_path / "qos"
    out = scenario("run", "qos", "--headless", "--output", str(out_dir))
    r = results(out_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "qos: PASS" in out.stdout and CONTRACT_KEYS <= set(r)
    on, off = r["modes"]["on"], r["modes"]["off"]
    assert on["scheduler"]["policy"] == "shares" and off["scheduler"]["policy"] == "fcfs"
    # the reference's settings, but two forwards at once on this CPU, as the results say
    assert on["scheduler"]["escalation_ms"] == 300 and on["scheduler"]["max_concurrency"] == 2
    assert r["reference"]["this_run_differs"] == {"max_concurrency": 2} and "this run differs in max_concurrency 2" in out.stdout
    for mode in (on, off):
        assert mode["requests"] == mode["requests_expected"] == 14 * 20
        assert set(mode["classes"]) == {"realtime", "interactive", "batch"}
        assert abs(sum(f["device_share"] for f in mode["classes"].values()) - 1) < 0.01
    assert on["classes"]["realtime"]["latency_ms"]["p99"] < on["classes"]["batch"]["latency_ms"]["p99"]
    assert off["classes"]["realtime"]["latency_ms"]["p99"] >= 0.8 * off["classes"]["batch"]["latency_ms"]["p99"]
    # with QoS on realtime waits less than under FCFS, and batch more
    assert on["classes"]["realtime"]["latency_ms"]["p50"] < off["classes"]["realtime"]["latency_ms"]["p50"]
    assert on["classes"]["batch"]["latency_ms"]["p99"] > off["classes"]["batch"]["latency_ms"]["p99"]
    assert r["integrity"]["checked_sessions"] == 14 and r["integrity"]["mismatches"] == 0
    assert r["num_sessions_completed"] == r["num_sessions_requested"] == 28
    assert_png(r, out_dir / "qos.png")


@pytest.mark.slow
def test_runs_put_the_daemons_settings_back(shared):
    with shared.client() as c:
        before = c.status()
    out = scenario("run", "qos", "--headless", "--json", "--set", "realtime=1", "--set", "interactive=1",
                   "--set", "batch=1", "--set", "requests=3", "--set", "shares=none", "--set", "max_concurrency=1",
                   socket=shared.socket)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["modes"]["on"]["scheduler"]["policy"] == "priority"
    assert r["modes"]["on"]["scheduler"]["max_concurrency"] == 1
    out = scenario("run", "agents", "--headless", "--json", "--set", "agents=4", "--set", "prompt_len=64",
                   "--set", "turns=2", "--set", "tool_ms=50", "--set", "hint=mean", "--set", "budget_fraction=0.5",
                   socket=shared.socket)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["policies"]["semantic"]["completed"] == r["policies"]["reactive"]["completed"] == 4, \
        {p: r["policies"][p]["errors"] for p in ("semantic", "reactive")}
    assert r["policies"]["semantic"]["prefetch"]["scheduled"] == 4 and r["policies"]["hold"]["completed"] >= 1
    with shared.client() as c:
        after = c.status()
    assert after["scheduler"]["policy"] == "shares" and after["scheduler"]["shares"] == before["scheduler"]["shares"]
    for key in ("max_concurrency", "lifo", "escalation_ms"):
        assert after["scheduler"][key] == before["scheduler"][key]
    assert after["memory"]["budget_bytes"] == before["memory"]["budget_bytes"]
    assert after["memory"]["swap_enabled"] is True and after["sessions"] == 0


@pytest.mark.parametrize("name", ["agents", "qos"])
def test_sigterm_mid_run_stops_at_once_and_puts_the_daemon_back(shared, tmp_path, name):
    """Its client threads still run when the interrupt lands; the cleanup must not share ctx's client
    with them (it waited for a reply another thread took, for the client's whole timeout)."""
    import os

    from djinnd import ForkServer
    with shared.client() as c:
        before = c.status()
        with c.subscribe(("scenario",)) as sub:
            run = ForkServer.shared().spawn(["scenario", "run", name, "--headless", "--output", str(tmp_path)],
                                            {**os.environ, "DJINN_SOCKET": str(shared.socket)},
                                            str(tmp_path / "out.log"), "djinn")
            while True:  # the first client done: the others are mid-request
                ev = sub.recv(120)
                assert ev is not None and run.poll() is None, (tmp_path / "out.log").read_text()
                if ev["action"] == "progress" and ev["done"] >= 1:
                    break
        run.terminate()
        assert run.wait(60) == 130, (tmp_path / "out.log").read_text()
        assert results(tmp_path)["reasons"] == ["aborted"]
        after = c.status()
    assert after["sessions"] == 0 and after["memory"]["budget_bytes"] == before["memory"]["budget_bytes"]
    for key in ("policy", "shares", "max_concurrency", "lifo", "escalation_ms"):
        assert after["scheduler"][key] == before["scheduler"][key]
