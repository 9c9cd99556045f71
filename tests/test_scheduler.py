"""Phase signals and prefetch (through a real daemon), and the DeviceLock's policies (directly)."""

import threading
import time

import pytest

from djinnd.client import DjinnError
from djinnd.scheduler import DeviceLock, parse_shares

from conftest import Daemon, djinn

PROMPT = "The capital of France is"


# -- through the daemon ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def djinnd(djinn_cache):
    # One intra-op thread: on a busy 2-core machine torch's parallel copy of a 512 KiB slab takes
    # 10-80 ms instead of 0.05 (OpenMP threads wait on each other), which swamps swap timings.
    d = Daemon("--device", "cpu", env={"OMP_NUM_THREADS": "1"}).start()
    yield d
    d.remove()


@pytest.fixture
def c(djinnd):
    """A client on a daemon with no sessions and a roomy budget; set_slabs() squeezes it."""
    with djinnd.client(timeout=60) as client:
        _reset(client)
        yield client
        _reset(client)


def _reset(c):
    model = c.status()["model"]
    c.set_budget(model["weights_bytes"] + (1 << 30))
    for s in c.sessions():
        c.close(s["id"])


def set_slabs(c, n: float) -> int:
    """A budget of the weights plus room for `n` sessions of one short prompt; returns one's bytes."""
    (probe,) = sessions(c, 1)
    slab = c.session(probe)["device_bytes"]
    c.close(probe)
    c.set_budget(int(c.status()["model"]["weights_bytes"] + n * slab))
    return slab


def sessions(c, n: int) -> list[int]:
    """`n` sessions that each computed one token, in order (the first is the least recently used)."""
    ids = [c.create_session(prompt=PROMPT) for _ in range(n)]
    for sid in ids:
        c.generate(sid, 1)
    return ids


def events(c, seq: int, type: str, **match) -> list[dict]:
    return [e for e in c.events_since(seq)["events"]
            if e["type"] == type and all(e.get(k) == v for k, v in match.items())]


def counters(c) -> dict:
    return c.status()["swap"]


def test_io_wait_with_expected_ms_prefetches_before_the_wake_up(c):
    set_slabs(c, 3.25)
    first, *others = sessions(c, 4)  # four sessions, room for three: the first went to the host
    assert c.session(first)["location"] == "host"
    before, seq = counters(c), c.status()["seq"]

    expected_ms = 1000
    assert c.signal_phase(first, "IO_WAIT", expected_ms=expected_ms)["location"] == "host"
    time.sleep(1.2)

    (signal,) = events(c, seq, "session", session=first, action="phase", phase="IO_WAIT")
    (swap_in,) = events(c, seq, "swap_in", session=first)
    assert swap_in["reason"] == "prefetch"
    # back just before the expected resume: not at once, not late
    assert signal["mono_ns"] + 500e6 < swap_in["mono_ns"] < signal["mono_ns"] + expected_ms * 1e6, \
        (events(c, seq, "prefetch"), events(c, seq, "swap_out"), swap_in, signal)
    actions = [e["action"] for e in events(c, seq, "prefetch", session=first)]
    assert actions == ["scheduled", "done"]
    (evicted,) = events(c, seq, "swap_out", reason="prefetch")  # room made from a colder session
    assert evicted["session"] in others
    assert c.session(first)["location"] == "device"

    c.generate(first, 1)  # the wake-up finds it resident
    after = counters(c)
    assert after["prefetch_hits"] == before["prefetch_hits"] + 1
    assert after["prefetch_done"] == before["prefetch_done"] + 1
    assert after["prefetch_misses"] == before["prefetch_misses"]
    assert events(c, seq, "prefetch", session=first)[-1]["action"] == "hit"
    assert c.session(first)["phase"] == "COMPUTE"


def test_io_wait_under_pressure_swaps_out_at_once_and_compute_restores(c):
    set_slabs(c, 3.25)
    a, b, sid = sessions(c, 3)  # 3 of 3.25 slabs: above the 90% high-water mark
    seq = c.status()["seq"]

    info = c.signal_phase(sid, "IO_WAIT")
    assert (info["location"], info["phase"]) == ("host", "IO_WAIT")
    (out,) = events(c, seq, "swap_out", session=sid)
    assert out["reason"] == "io_wait"

    again = c.signal_phase(sid, "IO_WAIT")  # stale: nothing moves
    assert (again["location"], again["swaps"]) == ("host", info["swaps"])

    info = c.signal_phase(sid, "COMPUTE")
    assert (info["location"], info["phase"]) == ("device", "COMPUTE")
    (back,) = events(c, seq, "swap_in", session=sid)
    assert back["reason"] == "compute"

    again = c.signal_phase(sid, "COMPUTE")  # stale: a no-op on a resident session
    assert (again["location"], again["swaps"]) == ("device", info["swaps"])
    assert len(events(c, seq, "swap_in")) == 1 and len(events(c, seq, "swap_out")) == 1

    # woken long before it was expected: the forward swaps it in on demand, a miss
    misses = counters(c)["prefetch_misses"]
    assert c.signal_phase(a, "IO_WAIT", expected_ms=5000)["location"] == "host"
    c.generate(a, 1)
    assert counters(c)["prefetch_misses"] == misses + 1
    assert [e["action"] for e in events(c, seq, "prefetch", session=a)] == ["scheduled", "miss"]


def test_a_compute_hint_sent_without_waiting_restores_and_the_next_call_gets_its_own_reply(c):
    set_slabs(c, 3.25)
    a, b, sid = sessions(c, 3)
    assert c.signal_phase(sid, "IO_WAIT")["location"] == "host"
    assert c.signal_phase(9999, "COMPUTE", wait=False) is None  # its error reply is skipped, unseen
    assert c.signal_phase(sid, "COMPUTE", wait=False) is None
    deadline = time.monotonic() + 60
    while (info := c.session(sid))["location"] != "device":  # each call reads its own reply
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert info["id"] == sid and info["phase"] == "COMPUTE"
    assert c.generate(sid, 1)


def test_io_wait_without_pressure_keeps_the_session_resident(c):
    (sid,) = sessions(c, 1)
    seq, hits = c.status()["seq"], counters(c)["prefetch_hits"]
    assert c.signal_phase(sid, "IO_WAIT", expected_ms=50)["location"] == "device"
    time.sleep(0.2)
    done = events(c, seq, "prefetch", session=sid, action="done")
    assert len(done) == 1 and done[0]["swapped_in"] is False
    c.generate(sid, 1)
    assert counters(c)["prefetch_hits"] == hits + 1
    assert not events(c, seq, "swap_out") and not events(c, seq, "swap_in")


def test_bad_signals_are_errors(c):
    (sid,) = sessions(c, 1)
    with pytest.raises(DjinnError) as e:
        c.signal_phase(9999, "IO_WAIT")
    assert e.value.code == "unknown_session"
    for phase, ms in (("SLEEP", None), ("IO_WAIT", -1), ("IO_WAIT", "soon")):
        with pytest.raises(DjinnError) as e:
            c.signal_phase(sid, phase, expected_ms=ms)
        assert e.value.code == "bad_params"
    assert c.session(sid)["phase"] == "COMPUTE"


def test_paused_session_is_prefetched_and_resumes_with_the_same_token(djinn_cache, tmp_path):
    """Directly on a Runtime: IO_WAIT while paused at a breakpoint, swapped out, prefetched, resumed."""
    from djinnd.models import load_model
    from djinnd.runtime import Runtime
    from djinnd.telemetry import EventBus

    lm = load_model("tiny-llama", "cpu")
    rt = Runtime(lm, EventBus(), lm.weights_bytes + (64 << 20), 64 << 20, tmp_path / "spill")
    try:
        ref, paused, other = (rt.create(prompt=PROMPT).id for _ in range(3))
        (want,) = rt.generate(ref, 1)
        rt.close(ref)
        assert rt.run_to(paused, [3]) == {"state": "paused", "layer": 3}
        rt.generate(other, 1)
        held = rt.get(paused).charge + rt.get(other).charge
        rt.mem.set_budget(lm.weights_bytes + held + held // 20)  # under pressure, nothing evicted yet

        rt.signal_phase(paused, "IO_WAIT", expected_ms=300)
        assert rt.get(paused).location == "host"  # swapped out at once, mid-forward
        time.sleep(0.45)
        assert rt.get(paused).location == "device"  # prefetched before the expected resume
        assert rt.resume(paused) == {"state": "idle", "token": want}
        assert rt.mem.counters["prefetch_hits"] == 1 and rt.mem.counters["prefetch_misses"] == 0
        assert rt.get(paused).phase == "COMPUTE"
    finally:
        rt.prefetch.stop()
        rt.close_all()


def test_scheduler_flags_are_checked():
    for flag, value in (("--qos-shares", "realtime=1,batch=1"), ("--qos-shares", "realtime=x,interactive=1,batch=1"),
                        ("--max-concurrency", "0"), ("--max-batch", "0"), ("--prefill-chunk", "0")):
        r = djinn("start", "--socket", "/tmp/djinn-none/x.sock", flag, value, program="djinnd")
        assert r.returncode == 2, r.stderr
        assert flag in r.stderr


# -- the DeviceLock, directly -----------------------------------------------------------------------------
def _waiting(lock) -> int:
    return sum(lock.figures()["waiting"].values())


def grant_order(lock, classes, hold=None, short=None, waking=None) -> list[str]:
    """Queue one thread per class (in this order) behind a held slot, release it; the order served.

    `short`: whether each waiter's segment is short (a decode step); all are by default.
    `waking`: whether it is its session's first step after a tool wait; none is by default."""
    order, threads = [], []
    short = short or [True] * len(classes)
    waking = waking or [False] * len(classes)

    def run(name, qos, is_short, is_waking):
        lock.acquire(qos, short=is_short, waking=is_waking)
        order.append(name)
        if hold:
            hold()
        lock.release()

    lock.acquire("realtime")
    for i, qos in enumerate(classes):
        t = threading.Thread(target=run, args=(f"{qos}{i}", qos, short[i], waking[i]), daemon=True)
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 60
        while _waiting(lock) < i + 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    return order


def test_realtime_is_served_before_batch():
    order = grant_order(DeviceLock(), ["batch", "interactive", "batch", "realtime"])
    assert order == ["realtime3", "interactive1", "batch0", "batch2"]


def test_a_decode_step_goes_before_a_prefill_of_its_class_but_not_of_a_higher_one():
    order = grant_order(DeviceLock(), ["interactive", "interactive", "batch", "realtime"],
                        short=[False, True, True, False])
    assert order == ["realtime3", "interactive1", "interactive0", "batch2"]
    fcfs = grant_order(DeviceLock(fcfs=True), ["interactive", "interactive"], short=[False, True])
    assert fcfs == ["interactive0", "interactive1"]


def test_a_waking_decode_step_goes_before_the_other_steps_of_its_class_only():
    lock = DeviceLock()
    order = grant_order(lock, ["interactive", "interactive", "interactive", "batch", "realtime"],
                        short=[True, False, True, True, True], waking=[False, True, True, True, False])
    # the class first; in it the waking step before the older one; a waking prefill gains nothing
    assert order == ["realtime4", "interactive2", "interactive0", "interactive1", "batch3"]
    assert lock.figures()["wake_jumps"] == 1 and lock.figures()["wake_first"] is True
    assert grant_order(lock, ["interactive", "interactive"], waking=[False, True]) == ["interactive1", "interactive0"]
    lock.configure(wake_first=False)
    assert grant_order(lock, ["interactive", "interactive"], waking=[False, True]) == ["interactive0", "interactive1"]
    assert grant_order(DeviceLock(fcfs=True), ["interactive", "interactive"], waking=[False, True]) \
        == ["interactive0", "interactive1"]
    assert lock.figures()["wake_jumps"] == 2


def hand_over_to(lock, holder_qos, waiter_qos, waiter_short) -> tuple[bool, list[str]]:
    """A long segment of `holder_qos` holds the slot while one waiter queues; between two of its
    "layers" it offers the slot. Whether it handed over, and the order in which the two ran."""
    order = []

    def waiter():
        lock.acquire(waiter_qos, short=waiter_short)
        order.append("waiter")
        lock.release()

    lock.acquire(holder_qos, short=False)
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while _waiting(lock) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    handed = lock.hand_over()
    order.append("holder")
    lock.release()
    t.join(5)
    assert not t.is_alive() and lock.held_by_me() is False
    return handed, order


def test_a_prefill_hands_the_device_to_a_decode_step_or_a_higher_class_between_layers():
    assert hand_over_to(DeviceLock(), "interactive", "interactive", True) == (True, ["waiter", "holder"])
    assert hand_over_to(DeviceLock(), "batch", "realtime", False) == (True, ["waiter", "holder"])
    assert hand_over_to(DeviceLock(), "interactive", "interactive", False) == (False, ["holder", "waiter"])  # a peer
    assert hand_over_to(DeviceLock(), "realtime", "batch", True) == (False, ["holder", "waiter"])
    assert hand_over_to(DeviceLock(fcfs=True), "batch", "realtime", True) == (False, ["holder", "waiter"])
    lock = DeviceLock()
    hand_over_to(lock, "interactive", "interactive", True)
    assert lock.figures()["handovers"] == 1 and lock.figures()["in_flight"] == 0


def test_fcfs_ignores_classes():
    order = grant_order(DeviceLock(fcfs=True), ["batch", "interactive", "realtime"])
    assert order == ["batch0", "interactive1", "realtime2"]


def test_escalation_serves_an_old_batch_waiter_first():
    lock = DeviceLock(escalation_s=0.05)
    classes = iter(["batch", "realtime"])
    order, threads = [], []
    lock.acquire("realtime")
    for i in range(2):
        qos = next(classes)
        t = threading.Thread(target=lambda q=qos, n=i: (lock.acquire(q), order.append(f"{q}{n}"), lock.release()),
                             daemon=True)
        t.start()
        threads.append(t)
        while _waiting(lock) < i + 1:
            time.sleep(0.001)
        if i == 0:
            time.sleep(0.1)  # the batch waiter grows old
    lock.release()
    for t in threads:
        t.join(5)
    assert order == ["batch0", "realtime1"]
    assert grant_order(DeviceLock(escalation_s=10), ["batch", "realtime"]) == ["realtime1", "batch0"]


def test_lifo_serves_the_newest_under_overload():
    assert grant_order(DeviceLock(lifo=True), ["batch"] * 3) == ["batch2", "batch1", "batch0"]
    assert grant_order(DeviceLock(), ["batch"] * 3) == ["batch0", "batch1", "batch2"]


def test_max_concurrency_is_respected():
    lock = DeviceLock(max_concurrency=2)
    inside, peak, mu = [0], [0], threading.Lock()

    def run():
        lock.acquire("batch")
        with mu:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.03)
        with mu:
            inside[0] -= 1
        assert lock.held_by_me()
        lock.release()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert peak[0] == 2
    assert lock.figures()["served"]["batch"] == 6 and lock.figures()["in_flight"] == 0
    assert not lock.held_by_me()
    with pytest.raises(RuntimeError):
        lock.release()


def test_shares_split_device_time_by_weight():
    now = [0.0]
    lock = DeviceLock(shares=parse_shares("realtime=0.1,interactive=0.75,batch=0.25"), clock=lambda: now[0])

    def hold():  # every segment holds the device for one tick of the fake clock
        now[0] += 1.0

    order = grant_order(lock, ["batch", "interactive"] * 8, hold=hold)
    first8 = [name.rstrip("0123456789") for name in order[:8]]
    assert first8.count("interactive") == 6 and first8.count("batch") == 2
    # a class that used less than its share is served first when it comes back
    assert grant_order(lock, ["batch", "interactive", "realtime"], hold=hold)[0] == "realtime2"


def test_configure_changes_the_policy_of_a_live_lock():
    lock = DeviceLock()
    assert grant_order(lock, ["batch", "realtime"]) == ["realtime1", "batch0"]
    assert lock.configure(fcfs=True)["policy"] == "fcfs"
    assert grant_order(lock, ["batch", "realtime"]) == ["batch0", "realtime1"]
    with pytest.raises(ValueError):
        lock.configure(max_concurrency=0)
    with pytest.raises(ValueError):
        lock.configure(colour="blue")
    assert lock.figures()["max_concurrency"] == 1


def test_parse_shares():
    assert parse_shares("realtime=1,interactive=7,batch=2") == pytest.approx(
        {"realtime": 0.1, "interactive": 0.7, "batch": 0.2})
    for bad in ("realtime=1", "gold=1,realtime=1,interactive=1,batch=1", "realtime=0,interactive=1,batch=1", "x"):
        with pytest.raises(ValueError):
            parse_shares(bad)


# -- decode batches ------------------------------------------------------------------------------------
def batches_of(lock, rows: list[tuple[str, str]]) -> dict:
    """Queue each (name, class) decode step behind a held slot, in order, then release it: what each
    step's join gave (its batch when it led one, None when it rode in another's)."""
    lock.acquire()
    got, threads = {}, []
    for name, qos in rows:
        def step(n=name, q=qos):
            got[n] = mine = lock.join(n, q)
            if mine is not None:
                lock.release([q] * len(mine))
        threads.append(threading.Thread(target=step))
        threads[-1].start()
        while len(lock._waiting) < len(threads):
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    return got


def test_waiting_decode_steps_run_as_one_batch_led_by_the_first_the_policy_picks():
    lock = DeviceLock(max_batch=8, gather_s=0)
    got = batches_of(lock, [("b1", "batch"), ("i1", "interactive"), ("r1", "realtime"), ("i2", "interactive")])
    assert got == {"r1": ["r1", "i1", "i2", "b1"], "b1": None, "i1": None, "i2": None}
    f = lock.figures()
    assert f["batches"] == {"forwards": 1, "rows": 4, "largest": 4} and f["in_flight"] == 0
    assert f["served"] == {"realtime": 1, "interactive": 3, "batch": 1}  # (and the holder before them)


def test_a_full_batch_takes_the_urgent_classes_and_leaves_the_rest_for_the_next():
    got = batches_of(DeviceLock(max_batch=2, gather_s=0), [("b1", "batch"), ("b2", "batch"), ("r1", "realtime"),
                                                          ("i1", "interactive")])
    assert got == {"r1": ["r1", "i1"], "b1": ["b1", "b2"], "b2": None, "i1": None}


def test_with_shares_a_full_batch_splits_between_the_classes():
    lock = DeviceLock(max_batch=4, gather_s=0, shares=parse_shares("realtime=0.5,interactive=0.25,batch=0.25"))
    lock._row_s = 0.001  # a row's recent device time, as released batches measure it
    rows = [(f"b{i}", "batch") for i in range(4)] + [(f"r{i}", "realtime") for i in range(4)]
    first = next(v for v in batches_of(lock, rows).values() if v and v[0].startswith("r"))
    assert first == ["r0", "b0", "r1", "r2"]  # realtime has twice batch's share: three rows of four to its one


def test_a_batch_waits_a_moment_for_the_steps_of_its_last_rows_to_come_back():
    lock = DeviceLock(max_batch=8, gather_s=2.0)

    def step(name):
        rows = lock.join(name)
        if rows is not None:
            lock.release(["interactive"] * len(rows))
        return rows

    lock.acquire()  # two steps wait, run together: the two sessions are the batch's cohort
    ts = [threading.Thread(target=step, args=(n,)) for n in ("a", "b")]
    for t in ts:
        t.start()
    while len(lock._waiting) < 2:
        time.sleep(0.001)
    lock.release()
    for t in ts:
        t.join(5)
    got = {}
    t = threading.Thread(target=lambda: got.update(b=step("b")))
    t0 = time.monotonic()
    leader = threading.Thread(target=lambda: got.update(a=step("a")))
    leader.start()  # "a" alone would run at once; it waits for "b", which comes 0.2 s later
    time.sleep(0.2)
    t.start()
    leader.join(5)
    t.join(5)
    assert sorted(x for v in got.values() if v for x in v) == ["a", "b"] and time.monotonic() - t0 < 2.0
    assert lock.figures()["batches"]["forwards"] == 2
