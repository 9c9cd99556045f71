"""Every benchmark runs here at its smallest size, so a change that breaks one fails the suite."""

import subprocess
import sys

from conftest import ROOT


def run_bench(*argv: str) -> str:
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_swap_bench_round_trips_real_sessions_intact_on_both_tiers(tmp_path):
    out = run_bench("bench/swap.py", "--sizes", "1,4", "--reps", "1", "--disk", "--json", str(tmp_path / "swap.json"))
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 MiB", "4 MiB"))]
    assert len(rows) == 4 and all(r[-1] == "yes" for r in rows), out  # host and disk tier, each size intact
