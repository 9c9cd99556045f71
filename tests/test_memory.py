"""Issue 4: the device budget, the host pool and disk tier, and bit-exact swapping."""

import errno
import glob
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
import torch

from djinnd.client import DjinnError
from djinnd.models import load_model
from djinnd.runtime import Runtime
from djinnd.sizes import format_size
from djinnd.swappool import SWAP_FILE
from djinnd.telemetry import EventBus

from conftest import raw_bytes

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama", "cpu")


class Recorder(EventBus):
    """An event bus that also keeps every event, for assertions."""

    def __init__(self):
        super().__init__()
        self.all = []

    def emit(self, type, **fields):
        ev = super().emit(type, **fields)
        self.all.append(ev)
        return ev


@pytest.fixture
def make_rt(lm):
    made = []

    def make(budget_extra=64 << 20, host_pool=32 << 20, spill_dir=None):
        bus = Recorder()
        rt = Runtime(lm, bus, lm.weights_bytes + budget_extra, host_pool, spill_dir or tempfile.mkdtemp())
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.shutdown()
        rt.bus.close()


def snapshot(s):
    """The bytes of every tensor a session holds (slab and paused activations)."""
    return raw_bytes(s.swappable_tensors())


def test_swapped_100_times_across_host_and_disk_is_bit_exact(make_rt):
    rt = make_rt()
    ref = rt.create(prompt=PROMPT)
    expected = rt.generate(ref.id, 8)
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [3])
    for i in range(100):
        before = snapshot(s)
        tier = "disk" if i % 2 else "host"
        rt.mem.swap_out(s, reason="test", tier=tier)
        assert s.location == tier and s.charge == 0
        assert all(t.untyped_storage().nbytes() == 0 for t in s.swappable_tensors())
        rt.mem.swap_in(s, reason="test")
        assert s.location == "device"
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(s))), f"round trip {i}"
    toks = [rt.resume(s.id)["token"]] + rt.generate(s.id, 7)
    assert toks == expected
    assert rt.mem.counters["swap_outs"] == rt.mem.counters["swap_ins"] == 100


def test_a_session_swapped_out_while_paused_resumes_from_the_host(make_rt, lm):
    rt = make_rt()
    ref = rt.create(prompt=PROMPT)
    expected = rt.generate(ref.id, 4)
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [1, 5])
    rt.mem.swap_out(s)
    assert rt.inspect(s.id)["layer"] == 1  # inspect restores on demand
    rt.mem.swap_out(s)
    assert rt.resume(s.id) is not None and s.layer == 5
    rt.mem.swap_out(s, tier="disk")
    toks = [rt.resume(s.id)["token"]] + rt.generate(s.id, 3)
    assert toks == expected


def test_1000_swap_cycles_leak_nothing(make_rt):
    rt = make_rt()
    s = rt.create(prompt=PROMPT * 8)
    rt.generate(s.id, 1)
    start_host = rt.mem.host.used
    for _ in range(50):  # warm up the allocator
        rt.mem.swap_out(s)
        rt.mem.swap_in(s)
    rss0 = psutil.Process().memory_info().rss
    for _ in range(1000):
        rt.mem.swap_out(s)
        rt.mem.swap_in(s)
    assert rt.mem.host.used == start_host
    assert rt.mem.host._free == [(0, rt.mem.host.capacity)]
    assert psutil.Process().memory_info().rss - rss0 < 32 << 20


def test_a_session_larger_than_the_budget_is_refused(make_rt, lm):
    rt = make_rt(budget_extra=600_000)  # room for one slab of 128 tokens (524,288 B), not of 160
    with pytest.raises(DjinnError) as e:
        rt.create(token_ids=[5] * 1000)
    assert e.value.code == "out_of_budget"
    s = rt.create(token_ids=[5] * 4)
    with pytest.raises(DjinnError) as e:
        rt.generate(s.id, 200)  # its slab must grow past what the budget holds
    assert e.value.code == "out_of_budget" and s.state == "idle"
    assert s.cache.seq_len == 128 and rt.mem.used <= rt.mem.budget
    assert s.charge == s.cache.nbytes  # the failed growth left no charge behind


def test_a_failed_swap_out_leaves_the_session_on_the_device(make_rt, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    rt = make_rt(host_pool=0, spill_dir=blocker / "spill")  # no host pool, and the disk tier cannot be made
    ref = rt.create(prompt=PROMPT)
    expected = rt.generate(ref.id, 4)
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [2])
    before = snapshot(s)
    with pytest.raises(DjinnError) as e:
        rt.mem.swap_out(s)
    assert e.value.code == "swap_failed"
    assert s.location == "device" and s.charge > 0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(s)))
    assert any(ev["type"] == "error" and ev["where"] == "swap_out" for ev in rt.bus.all)
    toks = [rt.resume(s.id)["token"]] + rt.generate(s.id, 3)
    assert toks == expected


def test_a_failed_swap_in_leaves_the_session_paused_on_disk(make_rt):
    rt = make_rt(host_pool=0)
    ref = rt.create(prompt=PROMPT)
    expected = rt.generate(ref.id, 4)
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [2])
    rt.mem.swap_out(s)
    path = s.stored.path
    assert s.location == "disk" and path.exists()
    shutil.move(path, str(path) + ".away")
    with pytest.raises(DjinnError) as e:
        rt.resume(s.id)
    assert e.value.code == "swap_failed"
    assert s.state == "paused" and s.location == "disk" and s.charge == 0
    assert any(ev["type"] == "error" and ev["where"] == "swap_in" for ev in rt.bus.all)
    shutil.move(str(path) + ".away", path)
    toks = [rt.resume(s.id)["token"]] + rt.generate(s.id, 3)
    assert toks == expected


def test_a_full_host_pool_demotes_the_coldest_session_to_disk(make_rt):
    rt = make_rt(host_pool=1 << 20)
    sessions = [rt.create(prompt=f"{PROMPT} {i}") for i in range(4)]
    for s in sessions:
        rt.run_to(s.id, [4])
    for s in sessions:
        rt.mem.swap_out(s)
    assert [s.location for s in sessions].count("disk") >= 2
    assert sessions[0].location == "disk" and sessions[-1].location == "host"
    assert rt.mem.counters["demotions"] >= 1
    for s in sessions:
        assert rt.resume(s.id)["state"] == "idle"


@pytest.mark.slow
def test_30_sessions_under_a_third_of_their_demand_all_finish_under_the_budget(make_daemon, lm):
    rng = random.Random(11)
    prompts = [[rng.randrange(3, lm.vocab_size) for _ in range(64)] for _ in range(30)]
    per_session = 128 * lm.kv_bytes_per_token + 3 * 64 * lm.hidden_size * 4
    budget = lm.weights_bytes + 10 * per_session
    d = make_daemon("--device", "cpu", "--vram-budget", str(budget), "--host-pool", str(12 * per_session),
                    "--sample-hz", "50")
    with d.client() as c:
        sids = []
        for p in prompts:
            sid = c.create_session(token_ids=p)
            assert c.run_to(sid, layers=[2, 6]) == {"state": "paused", "layer": 2}
            sids.append(sid)
        where = [s["location"] for s in c.sessions()]
        assert where.count("device") <= 10 and "host" in where and "disk" in where
        for sid in sids:
            assert c.resume(sid) is None  # now at layer 6
        for sid in reversed(sids):
            assert isinstance(c.resume(sid), int)
            assert len(c.generate(sid, 2)) == 2
        st = c.status()
    assert st["swap"]["swap_outs"] >= 20 and st["swap"]["swap_ins"] >= 20
    assert st["memory"]["peak_device_bytes"] <= budget
    d.stop()
    events = [json.loads(line) for f in glob.glob(str(d.logs / "daemon" / "events-*.jsonl*")) for line in open(f)]
    samples = [e for e in events if e["type"] == "vram"]
    assert len(samples) > 10
    assert all(e["used_bytes"] <= e["budget_bytes"] == budget for e in samples)
    assert max(e["used_bytes"] for e in samples) > budget * 0.8  # it really ran at the plateau


def test_a_session_larger_than_the_host_pool_goes_to_disk_and_demotes_nobody(make_rt):
    rt = make_rt(host_pool=1_500_000)
    small = [rt.create(prompt=PROMPT) for _ in range(2)]
    for s in small:
        rt.generate(s.id, 1)
        rt.mem.swap_out(s)
    big = rt.create(token_ids=[7] * 300)
    rt.generate(big.id, 1)
    rt.mem.swap_out(big)
    assert big.location == "disk" and [s.location for s in small] == ["host", "host"]
    assert rt.mem.counters["demotions"] == 0


def test_a_resident_sessions_decode_does_not_wait_behind_anothers_slow_swap(make_rt):
    rt = make_rt()
    slow, busy = rt.create(prompt=PROMPT), rt.create(prompt=PROMPT)
    rt.generate(slow.id, 1)
    rt.generate(busy.id, 1)
    write = rt.mem.disk.write
    started, release = threading.Event(), threading.Event()

    def slow_write(*args):  # a disk that holds the swap (lock and all) until the test lets it go
        started.set()
        release.wait(60)
        return write(*args)

    rt.mem.disk.write = slow_write
    t = threading.Thread(target=rt.mem.swap_out, args=(slow,), kwargs={"tier": "disk"})
    t.start()
    started.wait(60)
    step = threading.Thread(target=rt.generate, args=(busy.id, 2))  # pins, reserves and releases: the books
    step.start()
    step.join(60)  # behind the swap's lock it would still be waiting
    decoded_during_swap = not step.is_alive()
    release.set()
    t.join()
    step.join()
    assert decoded_during_swap and slow.location == "disk"
    # and a swap-out that a forward overtakes (pinned before it commits) is dropped: the forward keeps its copy
    started.clear()
    release.clear()
    t = threading.Thread(target=rt.mem.swap_out, args=(busy,), kwargs={"tier": "disk"})
    t.start()
    started.wait(60)
    rt.mem.pin(busy)
    release.set()
    t.join()
    rt.mem.unpin(busy)
    assert busy.location == "device" and rt.mem.disk.used == slow.stored.nbytes
    assert rt.generate(slow.id, 1) and slow.location == "device"


def test_a_decode_step_taken_while_its_swap_out_copies_is_not_lost(make_rt):
    """A forward that pins, computes and unpins between the swap-out's copy and its commit makes
    that copy stale: it is dropped, and the session's tokens stay those of its prompt."""
    rt = make_rt()
    ref = rt.create(prompt=PROMPT)
    expected = rt.generate(ref.id, 6)
    s = rt.create(prompt=PROMPT)
    toks = rt.generate(s.id, 2)
    write = rt.mem.disk.write
    copied, stepped = threading.Event(), threading.Event()

    def write_then_wait(*args):  # the copy is taken; the step runs before the swap-out commits
        path = write(*args)
        copied.set()
        stepped.wait(5)
        return path

    rt.mem.disk.write = write_then_wait
    t = threading.Thread(target=rt.mem.swap_out, args=(s,), kwargs={"tier": "disk"})
    t.start()
    assert copied.wait(5)
    toks += rt.generate(s.id, 1)
    stepped.set()
    t.join()
    rt.mem.disk.write = write
    assert s.location == "device" and rt.mem.disk.used == 0
    toks += rt.generate(s.id, 3)
    assert toks == expected


def test_eviction_order_leaves_a_session_queued_for_the_device_to_last_in_its_class():
    from types import SimpleNamespace as S

    from djinnd.memory import coldness
    idle_old = S(phase="COMPUTE", state="idle", qos="interactive", last_used=1.0)
    queued = S(phase="COMPUTE", state="running", qos="batch", last_used=0.0)
    waiting = S(phase="IO_WAIT", state="idle", qos="realtime", last_used=9.0)
    paused = S(phase="COMPUTE", state="paused", qos="realtime", last_used=0.5)
    order = sorted([queued, idle_old, waiting, paused], key=coldness)
    assert order == [waiting, idle_old, paused, queued]


def test_a_prefetch_does_not_evict_a_session_prefetched_for_an_earlier_wake_up(make_rt):
    import time
    rt = make_rt()
    a, b, c, d = (rt.create(prompt=f"{PROMPT} {i}") for i in range(4))
    for s in (a, b):
        rt.generate(s.id, 1)
    rt.mem.set_budget(rt.mem.weights_bytes + a.charge + b.charge + 4096)  # room for two

    def soon(cond, what):  # the wake-ups are seconds apart: a loaded machine keeps their order
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    # under pressure: out at once, back before the wake-up (c's and d's prefills first, even on a loaded machine)
    rt.signal_phase(a.id, "IO_WAIT", expected_ms=1500)
    rt.signal_phase(b.id, "IO_WAIT", expected_ms=4000)
    rt.generate(c.id, 1)  # b, waiting on I/O, is the first to make room
    rt.generate(d.id, 1)
    assert b.location == "host"
    soon(lambda: a.location == "device", "a is prefetched, evicting the colder of c and d")
    assert b.location == "host"
    gone = c if c.location == "host" else d
    stays = d if gone is c else c
    rt.generate(stays.id, 1)  # now it was used after a's prefetch: warmer than a by recency
    soon(lambda: b.location == "device", "b is prefetched")
    assert a.location == "device"  # b's prefetch took `stays`, not a
    assert stays.location == "host"


def test_fitted_temporaries_lie_over_every_probe_and_grow_with_the_square_when_attention_does():
    from djinnd.devicecosts import PROBE_TOKENS, DeviceCosts, _fit
    for peak in (lambda t: 4096 + 300 * t, lambda t: 4096 + 300 * t + t * t // 2, lambda t: 4096 + 300 * t - 900 * (t == 256)):
        costs = DeviceCosts(_fit([peak(t) for t in PROBE_TOKENS]))
        assert all(costs.work_bytes(t) >= peak(t) for t in PROBE_TOKENS)
        assert costs.work_bytes(2048) >= peak(2048)
    assert DeviceCosts().work_bytes(2048) == 0  # the CPU: the budget counts what sessions hold


def test_a_forward_is_charged_its_temporaries_while_it_computes_and_not_while_paused(lm):
    from djinnd.devicecosts import DeviceCosts
    work = DeviceCosts(work=(1 << 20, 4096, 0))  # as measured on a GPU; the CPU's are zero
    rt = Runtime(lm, EventBus(), lm.weights_bytes + (64 << 20), 32 << 20, tempfile.mkdtemp(), costs=work)
    try:
        s = rt.create(prompt=PROMPT)
        n = len(s.pending)
        held = rt._act_bytes(n)
        rt.mem.reset_peak()
        rt.run_to(s.id, [2, 5])
        assert s.charge == s.cache.nbytes + held  # paused: its held activations only
        assert rt.mem.peak == lm.weights_bytes + s.cache.nbytes + work.work_bytes(n)  # computing: the temporaries
        rt.mem.swap_out(s)
        rt.mem.reset_peak()
        rt.resume(s.id)  # swapped in, charged its temporaries again, paused at 5
        assert rt.mem.peak == lm.weights_bytes + s.cache.nbytes + work.work_bytes(n)
        assert s.layer == 5 and s.charge == s.cache.nbytes + held
        rt.resume(s.id)
        assert s.state == "idle" and s.charge == s.cache.nbytes and rt.mem.used == lm.weights_bytes + s.charge
    finally:
        rt.shutdown()


def test_each_compute_thread_alive_at_once_beyond_torchs_is_charged_a_workspace(lm):
    from djinnd.devicecosts import DeviceCosts
    ws = 1 << 20
    costs = DeviceCosts(thread_bytes=ws, handles=2, owner=threading.current_thread())  # as after measuring
    rt = Runtime(lm, EventBus(), lm.weights_bytes + (64 << 20), 32 << 20, tempfile.mkdtemp(), costs=costs)
    try:
        assert rt.mem.used == lm.weights_bytes + 2 * ws
        paused = [rt.create(prompt=PROMPT) for _ in range(3)]
        for s in paused:
            rt.run_to(s.id, [2])  # a thread each, alive while paused: this one, 3 paused, torch had 2
        assert rt.mem.overhead == 4 * ws
        for s in paused:
            rt.close(s.id)
        rt.run_to(rt.create(prompt=PROMPT).id, [2])  # their threads ended: torch hands their workspaces on
        assert rt.mem.overhead == 4 * ws and rt.mem.figures()["overhead_bytes"] == 4 * ws
    finally:
        rt.shutdown()


def test_on_the_cpu_a_swap_in_reuses_the_memory_a_swap_out_freed_within_the_budget(make_rt):
    """A fresh slab would be faulted in page by page during the swap-in's copy (~0.6 of a memcpy):
    the freed memory is kept for it, but never beyond the room the budget leaves."""
    rt = make_rt()
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [3])
    slab = s.cache.slab.untyped_storage()
    before, ptr = snapshot(s), slab.data_ptr()
    rt.mem.swap_out(s, reason="test")
    assert slab.nbytes() == 0 and rt.mem.spares.nbytes > 0
    assert rt.mem.figures()["spare_bytes"] == rt.mem.spares.nbytes
    assert rt.mem.used + rt.mem.spares.nbytes <= rt.mem.budget
    rt.mem.swap_in(s, reason="test")
    assert slab.data_ptr() == ptr and rt.mem.spares.nbytes == 0  # its own memory, back
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(s)))  # poisoned while kept: the copy restored it

    charge = s.charge
    rt.mem.swap_out(s, reason="test")
    rt.mem.set_budget(rt.mem.used + charge)  # room for it and nothing more: its swap-in's charge must not trim
    rt.mem.swap_in(s, reason="test")         # away the memory it is about to take back
    assert slab.data_ptr() == ptr and all(torch.equal(a, b) for a, b in zip(before, snapshot(s)))

    rt.mem.swap_out(s, reason="test")
    rt.mem.set_budget(rt.mem.used + 1)  # no room left beside the books: nothing may be kept
    assert rt.mem.spares.nbytes == 0
    with pytest.raises(DjinnError):
        rt.mem.swap_in(s, reason="test", make_room=False)
    assert s.location == "host"


LONG = [5 + (i * 37) % 300 for i in range(500)]  # a 512-token slab and a prefill's activations: ~2.7 MiB paused


def own_swap_files(folder):
    return sorted(p for p in folder.iterdir() if SWAP_FILE.fullmatch(p.name)) if folder.exists() else []


def test_swap_files_a_killed_daemon_left_are_removed_at_the_next_start_and_others_stay(make_daemon):
    """The disk tier's default folder is the same for every daemon on a socket (paths.spill)."""
    from djinnd import paths
    args = ("--device", "cpu", "--vram-budget", "12MiB", "--host-pool", "0")
    d = make_daemon(*args)
    spill = paths.spill(d.socket)
    with d.client() as c:
        for _ in range(8):
            assert c.run_to(c.create_session(token_ids=LONG), layer=2) == {"state": "paused", "layer": 2}
        assert [s["location"] for s in c.sessions()].count("disk") >= 4
    left = own_swap_files(spill)
    assert len(left) >= 4
    nbytes = sum(p.stat().st_size for p in left)
    d.proc.kill()  # kill -9: no cleanup
    d.proc.wait()
    assert own_swap_files(spill) == left
    (spill / "notes.swap.txt").write_text("not the tier's")
    (spill / "session-1.swap").write_text("nor this")  # not a name the tier gives

    d2 = make_daemon(*args, "--fresh", folder=d.folder)  # (--fresh: the journal's paused sessions stay gone)
    assert own_swap_files(spill) == []
    assert (spill / "notes.swap.txt").read_text() == "not the tier's" and (spill / "session-1.swap").exists()
    assert (f"removed {len(left)} swap files ({format_size(nbytes)}) that a previous run left in the disk tier {spill}"
            in d2.output())
    with d2.client() as c:  # and a clean stop removes what this run wrote, and nothing else
        for _ in range(4):
            c.run_to(c.create_session(token_ids=LONG), layer=2)
        assert own_swap_files(spill)
    assert d2.stop() == 0
    assert own_swap_files(spill) == [] and sorted(p.name for p in spill.iterdir()) == ["notes.swap.txt", "session-1.swap"]


def test_a_request_needing_room_the_full_disk_tier_cannot_make_fails_at_once_and_moves_nobody(make_rt, tmp_path):
    rt = make_rt(budget_extra=4 << 20, host_pool=0, spill_dir=tmp_path / "spill")  # room for one long session
    ref = rt.create(token_ids=LONG)
    expected = rt.generate(ref.id, 4)
    rt.close(ref.id)
    write, full = rt.mem.disk.write, threading.Event()

    def write_unless_full(name, parts, total):  # a disk with room for nothing more, as ENOSPC reports it
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rt.mem.disk.folder / f"{name}.swap"))
        return write(name, parts, total)

    rt.mem.disk.write = write_unless_full
    a, b, c = (rt.create(token_ids=LONG) for _ in range(3))
    rt.run_to(a.id, [2])
    rt.run_to(b.id, [2])  # a goes to disk
    assert a.location == "disk" and b.location == "device"
    full.set()
    before = snapshot(b)
    with pytest.raises(DjinnError) as e:
        rt.run_to(c.id, [2])  # b must go to disk to make room: it cannot
    assert e.value.code == "out_of_budget"
    assert f"the disk tier {rt.mem.disk.folder} is full (No space left on device)" in e.value.message
    assert "held by running sessions" not in e.value.message
    assert b.location == "device" and b.state == "paused" and a.location == "disk" and c.charge == 0
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(b)))
    assert own_swap_files(rt.mem.disk.folder) == [a.stored.path]
    assert any(ev["type"] == "error" and "is full" in ev["message"] for ev in rt.bus.all)
    assert [rt.resume(b.id)["token"]] + rt.generate(b.id, 3) == expected  # intact where it stayed
    full.clear()  # room again: the same request works
    assert rt.run_to(c.id, [2]) == {"state": "paused", "layer": 2} and b.location == "disk"


def test_a_full_disk_tier_is_met_once_a_request_and_its_errors_are_reported_once_a_second(make_rt, tmp_path, monkeypatch):
    """Issue 24: making room stops at the first victim the full disk tier refuses (the next ones would
    meet it too: each try is a write that fails and an error event), the request still fails at once
    naming the tier, and alike failures are one error event a second, the next saying how many were not."""
    from djinnd import memory
    monkeypatch.setattr(memory, "ERROR_EVERY_S", 3600.0)
    rt = make_rt(budget_extra=4 << 20, host_pool=0, spill_dir=tmp_path / "spill")
    small = [rt.create(token_ids=[5 + i for i in range(20)]) for _ in range(6)]
    for s in small:
        rt.run_to(s.id, [2])
    assert all(s.location == "device" for s in small)
    tries = []

    def full(name, parts, total):  # a disk with room for nothing more, as ENOSPC reports it
        tries.append(name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rt.mem.disk.folder / f"{name}.swap"))

    rt.mem.disk.write = full
    big = rt.create(token_ids=LONG)  # paused, it needs the room of 4 of the small ones
    t0 = time.monotonic()
    for _ in range(5):
        with pytest.raises(DjinnError) as e:
            rt.run_to(big.id, [2])
        assert e.value.code == "out_of_budget"
        assert f"the disk tier {rt.mem.disk.folder} is full (No space left on device)" in e.value.message
    assert time.monotonic() - t0 < 30  # at once, not after the wait for room that running sessions hold
    assert len(tries) == 5  # one victim tried a request, not each in turn
    assert all(s.location == "device" and s.state == "paused" for s in small) and big.charge == 0
    assert rt.mem.counters["failures"] == 5
    errors = [ev for ev in rt.bus.all if ev["type"] == "error"]
    assert len(errors) == 1 and errors[0]["where"] == "swap_out" and "suppressed" not in errors[0]
    assert "is full (No space left on device)" in errors[0]["message"]
    monkeypatch.setattr(memory, "ERROR_EVERY_S", 0.0)
    with pytest.raises(DjinnError):
        rt.run_to(big.id, [2])
    errors = [ev for ev in rt.bus.all if ev["type"] == "error"]
    assert len(errors) == 2 and errors[1]["suppressed"] == 4
    assert "is full (No space left on device) (4 more like it in the " in errors[1]["message"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (mounting needs root: skipped without it), unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 4 MiB tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_daemon_whose_disk_tier_is_full_fails_a_request_at_once_naming_it(make_daemon, small_disk):
    """The user's case: no host pool, a 10 MiB budget, a 4 MiB disk (one long session's file fits)."""
    spill = small_disk / "spill"
    d = make_daemon("--device", "cpu", "--vram-budget", "10MiB", "--host-pool", "0", "--spill-dir", str(spill))
    with d.client() as c:
        ref = c.create_session(token_ids=LONG)
        expected = c.generate(ref, 4)
        c.close(ref)
        a, b, x = (c.create_session(token_ids=LONG) for _ in range(3))
        c.run_to(a, layer=2)
        c.run_to(b, layer=2)  # a goes to disk, and fills it
        assert {s["id"]: s["location"] for s in c.sessions()} == {a: "disk", b: "device", x: "device"}
        with pytest.raises(DjinnError) as e:
            c.run_to(x, layer=2)  # b would have to go to disk too
        assert e.value.code == "out_of_budget"
        assert f"the disk tier {spill} is full (No space left on device)" in e.value.message
        assert "held by running sessions" not in e.value.message  # not the 60 s wait's failure
        assert len(own_swap_files(spill)) == 1  # b's failed file is gone
        assert c.session(b)["location"] == "device" and c.session(b)["state"] == "paused"
        assert [c.resume(b)] + c.generate(b, 3) == expected  # intact on the device
        c.close(a)  # room on the disk again: the request that failed now works
        assert c.run_to(x, layer=2) == {"state": "paused", "layer": 2}
        assert c.session(b)["location"] == "disk"
        st = c.status()
    assert st["swap"]["failures"] >= 1
    assert d.stop() == 0  # a clean stop, before the disk is unmounted: b, idle, keeps its file for the next start
    assert [p.name.split("-")[1] for p in own_swap_files(spill)] == [str(b)]


def books_consistent(mem, sessions):
    """The device books and the host pool's match what each session holds, and nothing is left moving."""
    from djinnd.swappool import ALIGN
    with mem.acct:
        assert not mem._moving
        assert mem.used == mem.fixed + sum(s.charge for s in mem.sessions.values())
        host = [s.stored for s in sessions if s.stored is not None and s.stored.tier == "host"]
        assert mem.host.used == sum(-(-st.nbytes // ALIGN) * ALIGN for st in host)
        disk = [s.stored for s in sessions if s.stored is not None and s.stored.tier == "disk"]
        assert mem.disk.used == sum(st.nbytes for st in disk)
        for s in sessions:
            assert (s.charge == 0) == (s.stored is not None)


def test_two_threads_swapping_different_sessions_at_once_keep_every_byte_and_the_books(make_rt):
    """No lock is held through a copy: two threads swap their own sessions out and in at once (host
    and disk), and both also move one shared session, whose moves wait for each other."""
    rt = make_rt()
    sessions = [rt.create(prompt=f"{PROMPT} {i}") for i in range(5)]
    for s in sessions[:4]:
        rt.generate(s.id, 1)
    rt.run_to(sessions[4].id, [3])  # the shared one: paused, its activations swapped with its slab
    before = {s.id: snapshot(s) for s in sessions}
    charges = {s.id: s.charge for s in sessions}
    errors = []

    def worker(mine, shared, seed):
        rng = random.Random(seed)
        try:
            for i in range(40):
                for s in mine:
                    rt.mem.swap_out(s, reason="test", tier=rng.choice(["host", "disk", None]))
                    assert s.location in ("host", "disk") and s.charge == 0
                if rng.random() < 0.5:
                    rt.mem.swap_out(shared, reason="test", tier=rng.choice(["host", "disk"]))
                else:
                    rt.mem.swap_in(shared, reason="test")
                for s in mine:
                    rt.mem.swap_in(s, reason="test")
                    assert s.location == "device" and s.charge == charges[s.id]
                    assert all(torch.equal(a, b) for a, b in zip(before[s.id], snapshot(s))), (s.id, i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(sessions[2 * k:2 * k + 2], sessions[4], k)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    books_consistent(rt.mem, sessions)
    rt.mem.swap_in(sessions[4], reason="test")
    for s in sessions:
        assert s.location == "device" and s.charge == charges[s.id]
        assert all(torch.equal(a, b) for a, b in zip(before[s.id], snapshot(s)))
    books_consistent(rt.mem, sessions)
    assert rt.mem.counters["swap_outs"] >= 160 and rt.mem.counters["failures"] == 0
    assert rt.resume(sessions[4].id)["state"] == "idle"


def test_a_swap_out_of_another_session_completes_while_the_first_ones_copy_is_blocked(make_rt):
    """Overlap without timing: A's copy (to disk) blocks until the test lets it go; meanwhile B is
    swapped out and back in, a third session is evicted to make room, and A is neither a victim nor
    swapped in by anyone. Under one lock held through the copy, B would wait for A."""
    rt = make_rt()
    a, b, c = (rt.create(prompt=f"{PROMPT} {i}") for i in range(3))
    for s in (a, b, c):
        rt.generate(s.id, 1)
    before = {s.id: snapshot(s) for s in (a, b, c)}
    write = rt.mem.disk.write
    started, release = threading.Event(), threading.Event()

    def held_write(name, parts, total):  # A's copy waits for the test; every other goes through
        if name.startswith(f"session-{a.id}-"):
            started.set()
            release.wait(60)
        return write(name, parts, total)

    rt.mem.disk.write = held_write
    ta = threading.Thread(target=rt.mem.swap_out, args=(a,), kwargs={"tier": "disk"})
    ta.start()
    try:
        assert started.wait(30)
        assert rt.mem.moving(a) and a not in rt.mem._victims(None)
        tb = threading.Thread(target=rt.mem.swap_out, args=(b,), kwargs={"reason": "test"})
        tb.start()
        tb.join(10)
        b_out_during_a = not tb.is_alive() and b.location == "host"
        rt.mem.swap_in(b, reason="test")  # and back, still beside A's copy
        b_in_during_a = b.location == "device" and ta.is_alive()
        # room for c's slab again: the eviction takes c or b, never a (moving), and does not wait for it
        rt.mem.set_budget(rt.mem.used - 1)
        moved = [s for s in (b, c) if s.location != "device"]
        assert ta.is_alive() and a.location == "device" and len(moved) == 1
    finally:
        release.set()
        ta.join(30)
        rt.mem.disk.write = write
    assert b_out_during_a and b_in_during_a
    assert a.location == "disk" and not rt.mem.moving(a)
    books_consistent(rt.mem, [a, b, c])
    rt.mem.set_budget(rt.mem.used + (64 << 20))
    for s in (a, b, c):
        rt.mem.swap_in(s, reason="test")
        assert all(torch.equal(x, y) for x, y in zip(before[s.id], snapshot(s)))
    books_consistent(rt.mem, [a, b, c])


def test_two_disk_copies_go_at_once_neither_waits_for_the_others_bytes(make_rt, monkeypatch):
    """Each disk copy has a bounce buffer of its own: A's write is held inside the tier (its bytes
    half written) while B's whole swap-out to disk and back goes through. With one buffer for the
    tier, B waited for A."""
    from djinnd import swappool
    rt = make_rt(host_pool=0)
    a, b = (rt.create(token_ids=LONG) for _ in range(2))
    for s in (a, b):
        rt.generate(s.id, 1)
    before = {s.id: snapshot(s) for s in (a, b)}
    real, started, release = swappool._write_exact, threading.Event(), threading.Event()

    def held(fd, arr):  # A's bytes wait for the test on their way to its file
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f"session-{a.id}-"):
            started.set()
            release.wait(60)
        real(fd, arr)

    monkeypatch.setattr(swappool, "_write_exact", held)
    ta = threading.Thread(target=rt.mem.swap_out, args=(a,), kwargs={"tier": "disk"})
    ta.start()
    try:
        assert started.wait(30)
        tb = threading.Thread(target=lambda: (rt.mem.swap_out(b, tier="disk"), rt.mem.swap_in(b)))
        tb.start()
        tb.join(30)
        b_beside_a = not tb.is_alive() and b.location == "device" and rt.mem.counters["swap_ins"] == 1
        assert ta.is_alive() and a.location == "device"
    finally:
        release.set()
        ta.join(30)
    assert b_beside_a and a.location == "disk"
    rt.mem.swap_in(a)
    for s in (a, b):
        assert all(torch.equal(x, y) for x, y in zip(before[s.id], snapshot(s), strict=True))
