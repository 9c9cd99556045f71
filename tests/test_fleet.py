"""The fleet on a local Ray cluster (djinnd/fleet.py): a head node and a node with two fake GPUs
(ray.cluster_utils.Cluster), one cluster and one fleet for this module's tests, which run in order:
placement, a move, a daemon's process killed, its actor killed, its node gone."""

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import djinn, until

from console.fleet import FleetConsole
from djinnd import Client, fleet, remote

pytestmark = pytest.mark.slow
PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def world(djinn_cache):
    folder = Path(tempfile.mkdtemp(prefix="djf", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("DJINN_CONFIG", "DJINN_FLEET_DIR")}
    os.environ.update(DJINN_CONFIG=str(folder / "cfg"), DJINN_FLEET_DIR=str(folder / "f"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=cluster.address, namespace=fleet.NAMESPACE, logging_level="warning", log_to_driver=False)
    remote.keypair(remote.config_dir(), remote.CLIENT)
    infos = fleet.up(gpus=True, args=("--device", "cpu"))
    w = SimpleNamespace(cluster=cluster, gpu_node=gpu_node, infos=infos, fleet=fleet.Fleet(), pids=set())
    yield w
    try:
        fleet.down()
    finally:
        ray.shutdown()
        cluster.shutdown()
        for pid in w.pids | {i["pid"] for i in infos}:  # daemons whose node went away outlive it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(folder, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _alone(w, daemon: str, tokens: int) -> list[int]:
    """What a session of PROMPT on `daemon` decodes, `tokens` at a time twice: the reference."""
    fid = w.fleet.create_session(token_ids=PROMPT, daemon=daemon)
    out = w.fleet.generate(fid, tokens) + w.fleet.generate(fid, tokens)
    w.fleet.close(fid)
    return out


def test_one_daemon_per_gpu_bundle_on_the_gpu_node_and_the_cli_shows_them(world):
    assert sorted(i["name"] for i in world.infos) == ["djinnd-0", "djinnd-1"]
    assert {i["node"] for i in world.infos} == {world.gpu_node.node_id}  # the head has no GPU
    assert sorted(g for i in world.infos for g in i["gpus"]) == [0, 1]  # one each
    out = djinn("fleet", "status", "--address", world.cluster.address, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["djinnd-0", "up"], ["djinnd-1", "up"]], out.stdout
    for info in world.infos:  # each an ordinary remote daemon (--listen), its key trusted by the fleet's user
        with Client(url=info["url"], timeout=10) as c:  # (the key from `djinn keys trust`'s file)
            assert c.status()["pid"] == info["pid"]
        assert remote.trusted()[info["url"]] == info["server_key"]


def test_a_session_goes_where_the_budget_is_freest_unless_pinned(world):
    daemons = world.fleet.daemons()
    with world.fleet.client(daemons["djinnd-0"]) as c:
        budget = c.status()["memory"]["budget_bytes"]
        c.set_budget(budget // 2)
    try:
        fid = world.fleet.create_session(token_ids=PROMPT)
        assert fid.startswith("djinnd-1/")
        pinned = world.fleet.create_session(token_ids=PROMPT, daemon="djinnd-0")
        assert pinned.startswith("djinnd-0/")
    finally:
        with world.fleet.client(daemons["djinnd-0"]) as c:
            c.set_budget(budget)
    for f in (fid, pinned):
        world.fleet.close(f)


def test_a_moved_session_decodes_on_as_if_it_had_stayed_and_the_move_is_an_event(world):
    ref = _alone(world, "djinnd-0", 5)
    fid = world.fleet.create_session(token_ids=PROMPT, daemon="djinnd-0")
    assert world.fleet.generate(fid, 5) == ref[:5]
    record = world.fleet.move(fid, "djinnd-1")
    assert record["to"] == "djinnd-1" and record["bytes"] > 0 and record["seconds"] > 0
    print(f"move of a {len(PROMPT) + 5}-token session: {record['seconds'] * 1000:.1f} ms, {record['bytes']} bytes")
    assert world.fleet.generate(fid, 5) == ref[5:]  # the same KV, bit for bit, goes on the same way
    daemons = world.fleet.daemons()
    with world.fleet.client(daemons["djinnd-0"]) as c:
        assert all(s["id"] != int(fid.split("/")[1]) for s in c.sessions())  # gone from the source
        moved = [e for e in c.events_since(0)["events"] if e.get("action") == "moved"]
    assert moved and moved[-1]["session"] == fid and moved[-1]["to"] == "djinnd-1"
    world.moved = fid


def test_the_move_bench_measures_moves_beside_a_memory_copy(world):
    """bench/move.py's smoke run, on this module's fleet (a cluster of its own would cost half a minute)."""
    from bench.move import measure
    rows = measure(world.fleet, ("djinnd-0", "djinnd-1"), [16, 64], 2)
    assert [r["tokens"] for r in rows] == [16, 64] and rows[0]["bytes"] < rows[1]["bytes"]
    assert all(0 < r["ratio"] < 1 and r["p50_ms"] > 0 for r in rows), rows


@pytest.mark.asyncio
async def test_the_console_fleet_view_shows_every_daemon_and_opens_one(world):
    from textual.widgets import DataTable
    app = FleetConsole(world.fleet)
    async with app.run_test(size=(150, 30)) as pilot:
        table = app.query_one(DataTable)
        await until(pilot, lambda: table.row_count == 2, what="the fleet's daemons")
        cells = [[str(c) for c in table.get_row(k)] for k in ("djinnd-0", "djinnd-1")]
        assert [c[1] for c in cells] == ["up", "up"] and all(c[2].startswith("tcp://") for c in cells), cells
        await pilot.press("down", "enter")
    assert app.return_value == (world.fleet.daemons()["djinnd-1"]["url"], world.fleet.daemons()["djinnd-1"]["server_key"])


def test_a_daemon_whose_process_dies_comes_back_with_its_sessions(world):
    fid = world.moved  # on djinnd-1 now, 10 tokens decoded
    before = world.fleet.session(fid)["tokens"]
    pid = world.fleet.status()["daemons"]["djinnd-1"]["status"]["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    row = world.fleet.status()["daemons"]["djinnd-1"]
    assert row["state"] == "restarted" and row["status"]["pid"] != pid
    assert remote.trusted()[row["url"]] == row["server_key"]  # its new port: `djinn --connect` reaches it
    world.pids.add(row["status"]["pid"])
    assert world.fleet.session(fid)["tokens"] == before  # its journal brought it back
    assert len(world.fleet.generate(fid, 2)) == 2


def test_a_daemon_whose_actor_dies_is_started_again_on_its_node_with_its_sessions(world):
    fid = world.fleet.create_session(token_ids=PROMPT, daemon="djinnd-0")
    tokens = world.fleet.generate(fid, 3)
    ray.kill(ray.get_actor("djinnd-0"), no_restart=True)
    row = world.fleet.status()["daemons"]["djinnd-0"]
    assert row["state"] == "moved" and row["node"] == world.gpu_node.node_id, row.get("why")
    world.pids.add(row["status"]["pid"])
    assert world.fleet.session(fid)["tokens"] == tokens
    world.kept = fid


def test_a_node_that_goes_away_reports_its_daemons_dead_and_their_sessions_lost_by_id(world):
    world.pids |= {r["status"]["pid"] for r in world.fleet.status()["daemons"].values()}
    world.cluster.remove_node(world.gpu_node, allow_graceful=False)
    deadline = time.monotonic() + 120  # its workers take a moment to notice their raylet is gone
    while True:
        got = world.fleet.status()
        states = {name: row["state"] for name, row in got["daemons"].items()}
        if set(states.values()) == {"dead"} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert states == {"djinnd-0": "dead", "djinnd-1": "dead"}, got["daemons"]
    lost = set(got["daemons"]["djinnd-0"]["lost"]) | set(got["daemons"]["djinnd-1"]["lost"])
    assert {world.kept, world.moved} <= lost  # said, by id: never silently
    out = djinn("fleet", "status", "--address", world.cluster.address, timeout=120)
    assert out.returncode == 0 and "lost sessions:" in out.stdout and world.kept in out.stdout, out.stdout


@pytest.mark.asyncio
async def test_the_console_fleet_view_names_the_sessions_lost(world):
    from textual.widgets import DataTable
    app = FleetConsole(world.fleet)
    async with app.run_test(size=(150, 30)) as pilot:
        lost = app.query_one("#fleet-lost")
        await until(pilot, lambda: world.kept in str(lost.render()), what="the lost sessions")
        assert [str(c) for c in app.query_one(DataTable).get_row("djinnd-0")][1] == "dead"
