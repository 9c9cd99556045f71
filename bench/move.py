"""A session's move between two fleet daemons (djinnd/fleet.py): export, a Ray object, import.

Sessions of several lengths move from one daemon to the other and back; each move's time (as
`Fleet.move` records it: export, transfer and import, before the source's close) and bytes, the
medians, and beside them the physical limit measured in the same run: one copy of the same bytes
in memory (a move copies them several times: device to file, file to object, object to file, file
to device).

    python bench/move.py [--tokens 16,256,1024] [--moves 6] [--address ADDR]

With no --address it starts a Ray cluster of its own (2 CPUs) and two CPU daemons on tiny-llama.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import load_line, machine_line  # noqa: E402


def copy_gbps(nbytes: int, reps: int = 20) -> float:
    """One in-memory copy of `nbytes`, the fastest of `reps`, in GB/s."""
    src, dst = np.ones(max(nbytes, 1), np.uint8), np.empty(max(nbytes, 1), np.uint8)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def measure(fleet, names: tuple[str, str], tokens: list[int], moves: int) -> list[dict]:
    """For each length: a session moved `moves` times between the two daemons; its figures."""
    rows = []
    for n in tokens:
        fid = fleet.create_session(token_ids=[3 + i % 200 for i in range(n)], daemon=names[0])
        fleet.generate(fid, 1)  # its KV computed
        records = [fleet.move(fid, names[(i + 1) % 2]) for i in range(moves)]
        fleet.close(fid)
        ms = [r["seconds"] * 1000 for r in records]
        size = records[0]["bytes"]
        p50 = statistics.median(ms)
        gbps = size / (p50 / 1000) / 1e9
        limit = copy_gbps(size)
        rows.append({"tokens": n, "bytes": size, "p50_ms": round(p50, 2), "max_ms": round(max(ms), 2),
                     "gbps": round(gbps, 4), "copy_gbps": round(limit, 2), "ratio": round(gbps / limit, 5)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,256,1024")
    ap.add_argument("--moves", type=int, default=6)
    ap.add_argument("--address", help="a running Ray cluster with a fleet up (default: a cluster of its own)")
    a = ap.parse_args()
    import ray
    from djinnd import fleet, remote
    own = a.address is None
    if own:
        ray.init(num_cpus=2, namespace=fleet.NAMESPACE, logging_level="warning", log_to_driver=False)
        remote.keypair(remote.config_dir(), remote.CLIENT)
        fleet.up(daemons=2, gpus=False, args=("--device", "cpu"))
    try:
        f = fleet.Fleet(a.address)
        names = tuple(sorted(f.daemons()))[:2]
        print(machine_line())
        print(load_line())
        print(f"moves between {names[0]} and {names[1]} ({a.moves} each way and back), tiny-llama on the CPU")
        for r in measure(f, names, [int(x) for x in a.tokens.split(",")], a.moves):
            print(f"  {r['tokens']:5} tokens {r['bytes'] / 1024:9.1f} KiB   p50 {r['p50_ms']:7.2f} ms (max {r['max_ms']:.2f})"
                  f"   {r['gbps']:.3f} GB/s   one memory copy {r['copy_gbps']:.2f} GB/s   ratio {r['ratio']:.4f}")
    finally:
        if own:
            fleet.down()
            ray.shutdown()


if __name__ == "__main__":
    main()
