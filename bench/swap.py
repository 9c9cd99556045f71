"""Swap-out and swap-in throughput of djinnd's MemoryManager against the physical limit.

For each session size (1 MiB to 2 GiB, those that fit; or `--tokens`, a session of that many tokens)
a real session of the model (`--model`, tiny-llama unless told) whose KV slab is grown to that size
is swapped out and in through the real `djinnd.memory.MemoryManager` several times; the median is
compared with the physical limit measured in the same run on the same bytes (the host pool's buffer
and the slab):

* CUDA: a pinned host <-> device `copy_(non_blocking=True)` on a side stream, timed with CUDA events;
* CPU: a plain memcpy, `dst.copy_(src)` of uint8 tensors between already-touched buffers.

Swap figures are wall clock around `swap_out()` / `swap_in()` (what a caller waits for); the
manager's own figure (CUDA events on a GPU) is shown beside them. Goal (issue 4): at least 0.9 of
the limit for sessions of 64 MiB and more; with `--tokens`, for every session measured.

Concurrent swaps (`--concurrent MiB`, 64 unless told, 0 to skip): two sessions of that size swapped
out from two threads at once against one swapped out alone (the wall clock until both are out;
median of the reps), beside the same ratio for two raw copies of that size run at once against one
(two threads, each `dst.copy_(src)`; on a GPU each on a side stream of its own): the physical limit
of running two at once on this machine. Goal: two concurrent 64 MiB swap-outs take < 1.6x one on the
CPU (swaps of different sessions do not wait on each other). With `--disk`, the same for two swap-outs
to the disk tier (each disk copy has a bounce buffer of its own; no goal: the page cache decides).

    python bench/swap.py [--device cpu|cuda] [--model NAME] [--sizes MiB,... | --tokens N,...] [--reps 9]
                         [--threads N] [--disk] [--concurrent MiB] [--json PATH]

On the CPU the script runs with THP_MEM_ALLOC_ENABLE=1 unless told otherwise, as djinnd's daemon
does, and prints the minor page faults each swap takes: a swap-in that faults is not one memcpy.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# As djinnd's daemon runs (cli_daemon.main sets it before torch allocates): large CPU tensors in
# transparent huge pages, so that a CPU swap-in faults in 2 MiB pages, not 4 KiB ones. The swaps
# are measured in this process, so it needs the daemon's setting; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_line, machine_line  # noqa: E402
from djinnd.memory import MemoryManager  # noqa: E402
from djinnd.models import load_model  # noqa: E402
from djinnd.session import Session  # noqa: E402
from djinnd.swappool import u8  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
SIZES = [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB, 2 * GiB]
GOAL_FROM, GOAL = 64 * MiB, 0.9
CONCURRENT_GOAL = 1.6  # two concurrent swap-outs against one, on the CPU
CHUNK = MiB  # the test pattern repeats per MiB, with the chunk's index in its first 8 bytes


class Bus:
    """The event bus the manager reports to; the benchmark only keeps the last swap event."""

    def __init__(self):
        self.last = None

    def emit(self, type, **fields):
        if type.startswith("swap_"):
            self.last = fields


def idle_session(mgr: MemoryManager, lm, sid: int, size: int) -> Session:
    """A real session whose KV slab is `size` bytes on the model's device, charged in `mgr`'s books."""
    s = Session(sid, [0], "interactive", lm)
    s.cache.grow(size // s.cache.bytes_per_token)
    assert s.cache.nbytes == size, (s.cache.nbytes, size)
    mgr.register(s)
    mgr.reserve(s, s.cache.nbytes)
    return s


def label(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n / MiB:.1f} MiB"


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e6) if ms > 0 else 0.0


# -- memory checks --------------------------------------------------------------------------------
def host_available() -> int:
    import psutil
    return psutil.virtual_memory().available


def fitting_sizes(sizes, device: torch.device) -> tuple[list[int], list[str]]:
    """The sizes whose run fits in free memory, with the host pool sized 2x the largest of them.

    Host: the pool (2 S) plus, on the CPU, the slab, a fresh copy and a compare temporary (3 S).
    Device: the slab and the compare's temporary (2 S). 15 % is left aside either way.
    """
    host = host_available()
    dev_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host
    fit, skipped = [], []
    for s in sizes:
        host_need = 2 * s + (3 * s if device.type == "cpu" else 64 * MiB)
        dev_need = 2 * s if device.type == "cuda" else 0
        if host_need > 0.85 * host:
            skipped.append(f"{label(s)}: needs {host_need / GiB:.1f} GiB of host memory, {host / GiB:.1f} GiB available")
        elif dev_need > 0.85 * dev_free:
            skipped.append(f"{label(s)}: needs {dev_need / GiB:.1f} GiB on {device}, {dev_free / GiB:.1f} GiB free")
        else:
            fit.append(s)
    return fit, skipped


# -- the test pattern -----------------------------------------------------------------------------
def _split(slab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slab's whole MiB as rows, and the bytes after them (a session of N tokens is rarely whole MiB)."""
    n = slab.numel() // CHUNK
    return slab[:n * CHUNK].view(n, CHUNK), slab[n * CHUNK:]


def fill(slab: torch.Tensor, block: torch.Tensor) -> None:
    rows, tail = _split(slab)
    rows.copy_(block.expand_as(rows))
    rows[:, :8].copy_(_headers(rows.shape[0], slab.device))
    tail.copy_(block[:tail.numel()].flip(0))  # not what the next row would hold: a shifted copy shows


def intact(slab: torch.Tensor, block: torch.Tensor) -> bool:
    rows, tail = _split(slab)
    return (torch.equal(rows[:, :8], _headers(rows.shape[0], slab.device))
            and torch.equal(rows[:, 8:], block[8:].expand(rows.shape[0], CHUNK - 8))
            and torch.equal(tail, block[:tail.numel()].flip(0)))


def _headers(n: int, device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device).view(torch.uint8).view(n, 8)


# -- the physical limit ---------------------------------------------------------------------------
class RawCopy:
    """Times `dst.copy_(src)`: CUDA events on a side stream on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        if not self.cuda:
            t = time.perf_counter()
            dst.copy_(src)
            return (time.perf_counter() - t) * 1000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end)


def fresh_copy_ms(src: torch.Tensor) -> float:
    """CPU only: memcpy into a newly allocated buffer (page faults included), as a swap-in does."""
    t = time.perf_counter()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = (time.perf_counter() - t) * 1000
    del dst
    return ms


# -- the measurement ------------------------------------------------------------------------------
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def minor_faults() -> int:
    """This process's minor page faults so far: on the CPU, how many pages a swap touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_size(mgr: MemoryManager, bus: Bus, lm, size: int, sid: int, reps: int, limit: RawCopy | None,
               tokens: int | None = None) -> dict:
    """Median figures of `reps` swap-out/swap-in round trips of one `size`-byte slab (after one warm-up).

    With `limit`, the raw copy of the same bytes is timed in each repetition too, interleaved, in an
    order that gives each timed copy the same predecessor as its swap (the copy the other way between
    the same two buffers): limit out, limit in, swap out, swap in. At 45 MiB both buffers fit in a
    large L3, so a copy of other bytes in between (the fresh-buffer copy, timed after the loop) would
    leave the swaps a colder cache than the limit.
    """
    dev = mgr.device
    gen = torch.Generator(device=dev).manual_seed(sid)
    block = torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, device=dev, generator=gen)
    s = idle_session(mgr, lm, sid, size)
    slab = u8(s.cache.slab.untyped_storage())
    fill(slab, block)
    if mgr.cuda:
        torch.cuda.synchronize(dev)
    rec = {k: [] for k in ("out", "in", "mgr_out", "mgr_in", "limit_out", "limit_in", "fresh_in", "faults_out", "faults_in")}
    try:
        for rep in range(reps + 1):
            if limit is not None:
                host, dst = mgr.host.view(0, size), slab  # the bytes the pool uses
                lo, li = limit(host, dst), limit(dst, host)
            f0 = minor_faults()
            out = timed(lambda: mgr.swap_out(s, reason="bench"))
            f1 = minor_faults()
            assert s.stored is not None and s.stored.tier == ("host" if limit is not None else "disk"), s.stored
            mgr_out = bus.last["ms"]
            inn = timed(lambda: mgr.swap_in(s, reason="bench"))
            f2 = minor_faults()
            assert s.stored is None
            mgr_in = bus.last["ms"]
            if rep == 0:
                continue  # warm-up: first touch of the pool's pages, the allocator's first block
            for k, v in (("out", out), ("in", inn), ("mgr_out", mgr_out), ("mgr_in", mgr_in),
                         ("faults_out", f1 - f0), ("faults_in", f2 - f1)):
                rec[k].append(v)
            if limit is not None:
                rec["limit_out"].append(lo)
                rec["limit_in"].append(li)
        if limit is not None and not mgr.cuda:
            rec["fresh_in"] = [fresh_copy_ms(mgr.host.view(0, size)) for _ in range(reps + 1)][1:]
        # a last round trip with the pool's bytes cleared first, so that the raw copies above cannot
        # hide a swap that moved nothing
        if limit is not None:
            mgr.host.view(0, size).zero_()
        if mgr.spares:  # and the memory kept for the swap-in overwritten, so that only the copy can restore it
            mgr.spares.poison = True
        mgr.swap_out(s, reason="bench")
        mgr.swap_in(s, reason="bench")
        ok = intact(slab, block)
    finally:
        mgr.unregister(s)
        s.cache.release()
        del slab  # the storage goes with its last view
    med = {k: statistics.median(v) for k, v in rec.items() if v}
    row = {"size": size, "label": f"{tokens} tok" if tokens else label(size), "reps": reps, "intact": ok}
    if tokens:
        row["tokens"] = tokens
    for k, ms in med.items():
        if k.startswith("faults"):
            row[k] = int(ms)  # a count, not a time
            continue
        row[f"{k}_ms"] = round(ms, 4)
        row[f"{k}_gbps"] = round(gbps(size, ms), 3)
    if limit is not None:
        row["ratio_out"] = round(row["out_gbps"] / row["limit_out_gbps"], 3)
        row["ratio_in"] = round(row["in_gbps"] / row["limit_in_gbps"], 3)
    return row


def together(*fns) -> float:
    """Milliseconds of wall clock until every one of `fns`, each started in a thread of its own at
    the same moment (a barrier), has returned."""
    start = threading.Barrier(len(fns) + 1)
    errors = []

    def run(fn):
        start.wait()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    ms = (time.perf_counter() - t0) * 1000
    if errors:
        raise errors[0]
    return ms


class RawPair:
    """One raw copy of `size` bytes alone, and two at once from two threads (each on a side stream of
    its own on a GPU, synchronized before it returns), by the wall clock, as the swaps are timed."""

    def __init__(self, device: torch.device, size: int):
        self.cuda = device.type == "cuda"
        self.dev = [torch.empty(size, dtype=torch.uint8, device=device).fill_(1) for _ in range(2)]
        self.host = [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda).fill_(2) for _ in range(2)]
        self.streams = [torch.cuda.Stream(device) for _ in range(2)] if self.cuda else [None, None]

    def _copy(self, i: int) -> None:
        if not self.cuda:
            self.host[i].copy_(self.dev[i])
            return
        with torch.cuda.stream(self.streams[i]):
            self.host[i].copy_(self.dev[i], non_blocking=True)
        self.streams[i].synchronize()

    def one(self) -> float:
        return timed(lambda: self._copy(0))

    def two(self) -> float:
        return together(lambda: self._copy(0), lambda: self._copy(1))


def bench_concurrent(device: torch.device, lm, size: int, reps: int, spill: Path, tier: str = "host") -> dict:
    """Median wall clock of one `size`-byte session swapped out alone (to `tier`), and of two swapped
    out at once from two threads (each round swaps them back in, untimed), beside the raw copies' same ratio."""
    bus = Bus()
    mgr = make_manager(device, 2 * size if tier == "host" else 0, spill, bus)
    raw = RawPair(device, size)
    pair, slabs, blocks = [], [], []
    for sid in (1, 2):
        gen = torch.Generator(device=device).manual_seed(1000 + sid)
        blocks.append(torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, device=device, generator=gen))
        pair.append(idle_session(mgr, lm, 1000 + sid, size))
        slabs.append(u8(pair[-1].cache.slab.untyped_storage()))
        fill(slabs[-1], blocks[-1])
    a, b = pair
    if mgr.cuda:
        torch.cuda.synchronize(device)
    rec = {k: [] for k in ("one", "two", "raw_one", "raw_two")}
    try:
        for rep in range(reps + 1):
            raw_one, raw_two = raw.one(), raw.two()
            one = timed(lambda: mgr.swap_out(a, reason="bench"))
            mgr.swap_in(a, reason="bench")
            two = together(lambda: mgr.swap_out(a, reason="bench"), lambda: mgr.swap_out(b, reason="bench"))
            assert a.stored is not None and b.stored is not None and a.stored.tier == b.stored.tier == tier
            together(lambda: mgr.swap_in(a, reason="bench"), lambda: mgr.swap_in(b, reason="bench"))
            assert a.stored is None and b.stored is None
            if rep == 0:
                continue  # warm-up
            for k, v in (("one", one), ("two", two), ("raw_one", raw_one), ("raw_two", raw_two)):
                rec[k].append(v)
        # a last concurrent round trip with the pool cleared and the kept memory poisoned first:
        # only the two copies can bring each slab back, each its own bytes
        mgr.host.view(0, mgr.host.capacity).zero_()
        if mgr.spares:
            mgr.spares.poison = True
        together(lambda: mgr.swap_out(a, reason="bench"), lambda: mgr.swap_out(b, reason="bench"))
        together(lambda: mgr.swap_in(a, reason="bench"), lambda: mgr.swap_in(b, reason="bench"))
        ok = all(intact(sl, bl) for sl, bl in zip(slabs, blocks))
    finally:
        for s in pair:
            mgr.unregister(s)
            s.cache.release()
        del slabs
    med = {k: statistics.median(v) for k, v in rec.items()}
    return {"size": size, "label": label(size), "tier": tier, "reps": reps, "intact": ok,
            **{f"{k}_ms": round(v, 4) for k, v in med.items()},
            "ratio": round(med["two"] / med["one"], 3), "raw_ratio": round(med["raw_two"] / med["raw_one"], 3)}


def print_concurrent(r: dict, cuda: bool) -> str:
    raw = "two pinned D2H copies on two side streams" if cuda else "two memcpys (dst.copy_(src)) from two threads"
    print(f"\nconcurrent swap-outs to the {r['tier']} tier: two {r['label']} sessions from two threads at once "
          f"vs one alone, median of {r['reps']}, wall clock")
    print(f"  one swap-out {r['one_ms']:.3f} ms, two at once {r['two_ms']:.3f} ms: {r['ratio']:.3f}x one"
          f"  ({'intact' if r['intact'] else 'NOT intact'})")
    print(f"  physical limit: one raw copy {r['raw_one_ms']:.3f} ms, {raw} {r['raw_two_ms']:.3f} ms: "
          f"{r['raw_ratio']:.3f}x one")
    if cuda:
        return f"concurrent: {r['ratio']:.3f}x one (raw copies {r['raw_ratio']:.3f}x); the < {CONCURRENT_GOAL}x goal is the CPU's"
    met = r["ratio"] < CONCURRENT_GOAL
    return (f"concurrent goal (two {r['label']} swap-outs at once < {CONCURRENT_GOAL}x one): "
            f"{'MET' if met else 'MISSED'}, {r['ratio']:.3f}x (raw copies {r['raw_ratio']:.3f}x)")


def make_manager(device: torch.device, host_pool: int, spill: Path, bus: Bus) -> MemoryManager:
    budget = 1 << 50  # no eviction: only the swaps the benchmark asks for
    return MemoryManager(device, budget, 0, host_pool, spill, bus, capacity=budget)


def print_table(rows, cuda: bool) -> None:
    limit = "pinned H2D/D2H, CUDA events" if cuda else "memcpy, dst.copy_(src) of uint8"
    print(f"\nhost tier: median GB/s (1e9 B/s) of swap_out()/swap_in() by the wall clock; limit = {limit}")
    print(f"{'size':>8} {'out':>7} {'in':>7} {'lim out':>8} {'lim in':>7} {'ratio out':>9} {'ratio in':>8}"
          f" {'mgr out':>8} {'mgr in':>7}  {'out ms':>8} {'in ms':>8}  ok")
    for r in rows:
        print(f"{r['label']:>8} {r['out_gbps']:7.2f} {r['in_gbps']:7.2f} {r['limit_out_gbps']:8.2f} {r['limit_in_gbps']:7.2f}"
              f" {r['ratio_out']:9.3f} {r['ratio_in']:8.3f} {r['mgr_out_gbps']:8.2f} {r['mgr_in_gbps']:7.2f}"
              f"  {r['out_ms']:8.3f} {r['in_ms']:8.3f}  {'yes' if r['intact'] else 'NO'}")
    print("mgr out/in: the GB/s the manager itself reports in its swap events"
          + (" (CUDA events on its copy stream)" if cuda else " (wall clock)"))
    if not cuda:
        print("fresh in: memcpy into a newly allocated buffer, as swap_in's storage resize gives on the CPU: "
              + ", ".join(f"{r['label']} {r['fresh_in_gbps']:.2f}" for r in rows) + " GB/s")
        print("minor page faults a swap, out / in (median; 4 KiB pages, or 2 MiB with huge pages): "
              + ", ".join(f"{r['label']} {r['faults_out']} / {r['faults_in']}" for r in rows))


def verdict(rows, by_tokens: bool = False) -> str:
    """Sizes: the goal holds from GOAL_FROM; sessions sized in tokens: for each of them."""
    big = rows if by_tokens else [r for r in rows if r["size"] >= GOAL_FROM]
    if not big:
        return f"goal: no size of {label(GOAL_FROM)} or more measured"
    worst = min(min(r["ratio_out"], r["ratio_in"]) for r in big)
    met = worst >= GOAL
    scope = "for every session measured" if by_tokens else f"from {label(GOAL_FROM)}"
    return f"goal (>= {GOAL} of the limit {scope}): {'MET' if met else 'MISSED'}, worst ratio {worst:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=9,
                    help="timed round trips per size (median), after one warm-up; 3x that below 64 MiB")
    ap.add_argument("--model", default="tiny-llama",
                    help="the model whose sessions are swapped (a djinnd preset, e.g. smollm2-135m; default tiny-llama)")
    sized = ap.add_mutually_exclusive_group()
    sized.add_argument("--sizes", help="comma-separated MiB, e.g. 64,1024 (default: 1 MiB to 2 GiB)")
    sized.add_argument("--tokens", help="comma-separated session lengths in tokens, e.g. 1024: "
                       "each session's slab holds exactly that many tokens of the model's KV")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (djinnd uses 1 on the CPU; default: torch's)")
    ap.add_argument("--disk", action="store_true", help="also measure the disk tier (host pool 0)")
    ap.add_argument("--spill-dir", type=Path, help="folder for the disk tier (default: a new one under /tmp)")
    ap.add_argument("--concurrent", type=int, default=64, metavar="MiB",
                    help="two sessions of this size swapped out at once vs one alone (default 64; 0: skip)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(load_line())
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch threads {torch.get_num_threads()}, {args.reps} reps per size ({3 * args.reps} below 64 MiB)"
          + f", THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}")
    try:
        counts = [int(x) for x in (args.tokens or args.sizes or "1").split(",")]
    except ValueError as e:
        print(f"{'--tokens' if args.tokens else '--sizes'}: {e}", file=sys.stderr)
        return 2
    if min(counts) <= 0:
        print(f"{'--tokens' if args.tokens else '--sizes'}: {min(counts)} is not a size", file=sys.stderr)
        return 2
    try:
        lm = load_model(args.model, device)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    per_token = lm.new_cache().bytes_per_token  # what a session's slab holds a token (the model's KV dtype)
    print(f"model {lm.name}: {lm.num_layers} layers, {per_token:,} B of KV a token, loaded in {lm.load_seconds:.1f} s")
    tokens_of = {n * per_token: n for n in counts} if args.tokens else {}
    sizes = list(tokens_of) if args.tokens else [n * MiB for n in counts] if args.sizes else SIZES
    if any(s % per_token for s in sizes):
        print(f"sizes must be whole multiples of {lm.name}'s {per_token} B of KV a token "
              f"(or give --tokens)", file=sys.stderr)
        return 2
    for s, n in tokens_of.items():
        print(f"{n} tokens of {lm.name}: {s:,} B ({label(s)})")

    fit, skipped = fitting_sizes(sizes, device)
    for line in skipped:
        print(f"skipped {line}")
    if not fit:
        print("no size fits", file=sys.stderr)
        return 2
    spill = Path(tempfile.mkdtemp(prefix="djswap", dir=args.spill_dir or "/tmp"))
    result = {"machine": machine_line(), "load_before": load_line(), "device": str(device),
              "model": lm.name, "kv_bytes_per_token": per_token, "threads": torch.get_num_threads(),
              "thp_mem_alloc_enable": os.environ["THP_MEM_ALLOC_ENABLE"],
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "limit": "pinned copy_(non_blocking=True), CUDA events" if device.type == "cuda" else "memcpy dst.copy_(src)",
              "reps": args.reps, "skipped": skipped, "host": [], "disk": []}
    try:
        bus = Bus()
        t = time.perf_counter()
        mgr = make_manager(device, 2 * max(fit), spill, bus)  # the pool is allocated (and pinned) here
        print(f"host pool: {label(2 * max(fit))}{', pinned' if device.type == 'cuda' else ''}, "
              f"allocated in {time.perf_counter() - t:.2f} s before timing")
        limit = RawCopy(device)
        for i, size in enumerate(fit):
            reps = args.reps if size >= GOAL_FROM else 3 * args.reps  # small copies are cheap and noisy
            result["host"].append(bench_size(mgr, bus, lm, size, i + 1, reps, limit, tokens_of.get(size)))
        del mgr
        print_table(result["host"], device.type == "cuda")
        result["verdict"] = verdict(result["host"], bool(tokens_of))
        print(result["verdict"])

        if args.concurrent > 0:
            csize = args.concurrent * MiB
            csize -= csize % per_token
            cfit, cskip = fitting_sizes([2 * csize], device)  # two sessions, a pool for both
            if cfit:
                result["concurrent"] = bench_concurrent(device, lm, csize, args.reps, spill)
                result["concurrent_verdict"] = print_concurrent(result["concurrent"], device.type == "cuda")
                print(result["concurrent_verdict"])
            else:
                print(f"concurrent: skipped, two sessions of {label(csize)} {cskip[0].split(': ', 1)[1]}")

        if args.disk:
            free = shutil.disk_usage(spill).free
            disk_sizes = [s for s in fit if 1.2 * s < free]
            for s in fit:
                if s not in disk_sizes:
                    print(f"disk tier: skipped {label(s)}, {free / GiB:.1f} GiB free in {spill}")
            dmgr = make_manager(device, 0, spill, bus)
            reps = max(3, args.reps // 3)
            for i, size in enumerate(disk_sizes):
                result["disk"].append(bench_size(dmgr, bus, lm, size, 100 + i, reps, None, tokens_of.get(size)))
            print(f"\ndisk tier (host pool 0; files in {spill}, no fsync: writes land in the page cache), "
                  f"median of {reps}, wall clock")
            print(f"{'size':>8} {'out GB/s':>9} {'in GB/s':>8} {'out ms':>9} {'in ms':>9}  ok")
            for r in result["disk"]:
                print(f"{r['label']:>8} {r['out_gbps']:9.2f} {r['in_gbps']:8.2f} {r['out_ms']:9.2f} {r['in_ms']:9.2f}"
                      f"  {'yes' if r['intact'] else 'NO'}")
            if args.concurrent > 0 and cfit and 2.4 * csize < free:  # each disk copy has its bounce buffer
                result["concurrent_disk"] = bench_concurrent(device, lm, csize, reps, spill, tier="disk")
                print_concurrent(result["concurrent_disk"], device.type == "cuda")
    finally:
        shutil.rmtree(spill, ignore_errors=True)

    print(load_line())
    result["load_after"] = load_line()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"figures written to {args.json}")
    bad = [r["label"] for r in result["host"] + result["disk"] if not r["intact"]]
    for key in ("concurrent", "concurrent_disk"):
        if key in result and not result[key]["intact"]:
            bad.append(f"the concurrent pair of {result[key]['label']} ({result[key]['tier']} tier)")
    if bad:
        print(f"INTEGRITY: the slab did not come back intact for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
