"""Every benchmark runs here at its smallest size, so a change that breaks one fails the suite."""

import contextlib
import importlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is no package installed: `pytest` (not `python -m pytest`) finds it so
    sys.path.insert(0, str(ROOT))


def run_bench(script: str, *args: str) -> str:
    """What the benchmark's main printed, run in this process as `python script args` would run it:
    torch is imported once for them all, and their private daemons fork from this worker's fork server."""
    module = importlib.import_module(f"bench.{Path(script).stem}")
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(out):
            code = module.main()
    finally:
        sys.argv = argv
    assert code in (None, 0), out.getvalue()[-2000:]
    return out.getvalue()


def test_swap_bench_round_trips_real_sessions_intact_on_both_tiers(tmp_path):
    out = run_bench("bench/swap.py", "--sizes", "1,4", "--reps", "1", "--disk", "--concurrent", "4",
                    "--json", str(tmp_path / "swap.json"))
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 MiB", "4 MiB"))]
    assert len(rows) == 4 and all(r[-1] == "yes" for r in rows), out  # host and disk tier, each size intact
    # two 4 MiB sessions swapped out at once vs one, beside two raw copies at once: figures, no timing asserted
    assert "two at once" in out and "(intact)" in out and "physical limit: one raw copy" in out, out
    assert "concurrent goal (two 4 MiB swap-outs at once < 1.6x one)" in out, out


def test_swap_bench_sizes_sessions_in_tokens_of_the_model_loaded():
    # 100 and 1000 tokens of tiny-llama (4,096 B a token): not whole MiB, so the pattern's tail is checked too
    out = run_bench("bench/swap.py", "--model", "tiny-llama", "--tokens", "100,1000", "--reps", "1", "--disk",
                    "--concurrent", "0")
    assert "1000 tokens of tiny-llama: 4,096,000 B" in out, out
    rows = [r for r in (line.split() for line in out.splitlines()) if r[:2] in (["100", "tok"], ["1000", "tok"])]
    assert len(rows) == 4 and all(r[-1] == "yes" for r in rows), out  # host and disk tier, each session intact
    assert "minor page faults a swap" in out and "for every session measured" in out, out


def test_rpc_bench_measures_the_ping_against_a_bare_zmq_echo():
    out = run_bench("bench/rpc.py", "-n", "200", "--warmup", "20", "--threads", "2")
    assert "ping p50 / bare zmq echo p50:" in out and "2 client threads" in out, out


def test_events_bench_measures_the_flood_against_the_event_bus_alone_and_a_bare_echo():
    out = run_bench("bench/events.py", "--seconds", "1", "--ref-seconds", "0.3", "-n", "200")
    rows = [line.split() for line in out.splitlines() if line.startswith(("samples only ", "samples + swaps "))]
    figures = [[float(x) for x in r[-9:]] for r in rows]  # events/s .. ping p50: printed, their values not asserted
    assert len(figures) == 2 and all(f[0] > 0 for f in figures), out
    assert "contiguous: " in out and "limit, EventBus alone" in out and "limit, bare zmq echo" in out, out
    assert out.count("status p50 / bare zmq echo p50") == 2, out


def test_step_bench_times_each_way_of_taking_a_decode_step():
    out = run_bench("bench/step.py", "--tokens", "4", "--runs", "2")
    ways = [line for line in out.splitlines() if "us a token" in line]
    assert len(ways) == 3, out


@pytest.mark.slow
def test_transport_bench_serves_the_same_tokens_every_way():
    out = run_bench("bench/transport.py", "--tokens", "4", "--runs", "1")
    ways = [line for line in out.splitlines() if "us a token" in line]
    assert len(ways) == 6 and all("tokens equal" in w for w in ways[1:]), out


def test_batch_bench_runs_djinnd_batches_beside_padded_generate():
    out = run_bench("bench/batch.py", "--batches", "1,4", "--tokens", "3", "--runs", "1")
    rows = [line for line in out.splitlines() if "djinnd/generate" in line]
    assert len(rows) == 2 and all("tokens equal in" in r for r in rows), out


def test_console_idle_bench_measures_the_console_beside_a_real_daemon():
    out = run_bench("bench/console_idle.py", "--sessions", "30", "--seconds", "2", "--settle", "0.5")
    assert "console attached: 30 rows in its table" in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith(("overview, ", "scenarios screen"))]
    figures = [[float(x) for x in r[-3:]] for r in rows]  # % of a core, its ratio to the goal, the daemon's %
    assert len(figures) == 3 and all(f[0] > 0 for f in figures), out


def test_soak_bench_loses_nothing_through_faults_and_a_kill_9_restart():
    # ~12 s of 3 random clients under budget changes, a full disk tier (as root), disconnects, killed
    # clients and one kill -9 restart: every session's tokens kept and equal to the reference, no
    # internal error, fds/threads/RSS back to the baseline. No timing is asserted.
    out = run_bench("bench/soak.py", "--minutes", "0.2", "--clients", "3", "--restarts", "1", "--seed", "4")
    assert "verdict: PASS" in out and "1 restarts" in out, out[-3000:]
