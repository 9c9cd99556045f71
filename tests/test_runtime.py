"""Issue 3: one shared model, many sessions, real breakpoints inside the forward pass."""

import random
import tempfile
import threading
import time

import pytest
import torch

from djinnd.charges import capacity_for
from djinnd.client import DjinnError
from djinnd.models import load_model
from djinnd.runtime import Runtime
from djinnd.scheduler import DeviceLock
from djinnd.telemetry import EventBus

PROMPT = "The capital of France is"
GEN = 6


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama", "cpu")


@pytest.fixture
def rt(lm):
    bus = EventBus()
    runtime = Runtime(lm, bus, budget=lm.weights_bytes + (64 << 20), host_pool=32 << 20, spill_dir=tempfile.mkdtemp())
    yield runtime
    runtime.shutdown()
    bus.close()


def reference(rt, prompt=PROMPT, n=GEN):
    s = rt.create(prompt=prompt)
    toks = rt.generate(s.id, n)
    rt.close(s.id)
    return toks


def test_tokens_equal_when_paused_at_every_layer_in_turn(rt, lm):
    ref = reference(rt)
    assert len(set(ref)) > 1  # a degenerate model would make this test meaningless
    for layer in range(lm.num_layers):
        s = rt.create(prompt=PROMPT)
        first = rt.run_to(s.id, [layer])
        assert first == {"state": "paused", "layer": layer}
        assert s.state == "paused" and s.info()["layer"] == layer
        out = rt.resume(s.id)
        assert out["state"] == "idle"
        toks = [out["token"]] + rt.generate(s.id, GEN - 1)
        assert toks == ref, f"paused at layer {layer}"
        rt.close(s.id)


def test_pause_at_every_layer_of_one_forward_and_on_decode_steps(rt, lm):
    ref = reference(rt)
    s = rt.create(prompt=PROMPT)
    toks = []
    for _ in range(GEN):
        r = rt.run_to(s.id, list(range(lm.num_layers)))
        for layer in range(lm.num_layers):
            assert r == {"state": "paused", "layer": layer}
            r = rt.resume(s.id)
        toks.append(r["token"])
    assert toks == ref


def test_the_model_carries_hooks_only_while_a_forward_may_pause(rt, lm):
    """Hooked modules take torch's slow call path: plain decode steps run without the hooks, and a
    session paused at a breakpoint keeps them on while others decode around it."""
    layers = [*lm.decoder_layers(), lm.embed()]

    def hooks():
        return [len(m._forward_hooks) for m in layers]

    ref = reference(rt)
    assert hooks() == [0] * len(layers)
    a, b = rt.create(prompt=PROMPT), rt.create(prompt=PROMPT)
    rt.run_to(a.id, [3])
    assert hooks() == [1] * len(layers)
    assert rt.generate(b.id, GEN) == ref  # its prefill also holds them, its decode steps pass them
    assert hooks() == [1] * len(layers)
    out = rt.resume(a.id)
    assert hooks() == [0] * len(layers)
    assert [out["token"]] + rt.generate(a.id, GEN - 1) == ref
    assert rt.run_to(a.id, [0]) == {"state": "paused", "layer": 0}  # a decode step with a breakpoint
    assert hooks() == [1] * len(layers)
    rt.close(a.id)
    assert hooks() == [0] * len(layers)


def test_the_forward_really_stops_inside(rt, lm):
    """While paused at layer 2, the layers after it have not run: their KV is not written yet."""
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [2])
    n = len(s.prompt_ids)
    assert [layer.length for layer in s.cache.layers] == [n] * 3 + [0] * (lm.num_layers - 3)
    rt.resume(s.id)
    assert all(layer.length == n for layer in s.cache.layers)


def test_patch_scale_one_changes_nothing_and_zeroing_the_last_layer_does(rt, lm):
    ref = reference(rt, n=1)
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [lm.num_layers - 1])
    before = rt.inspect(s.id)
    after = rt.patch(s.id, "scale", 1.0)
    assert after == before
    assert rt.resume(s.id)["token"] == ref[0]

    s2 = rt.create(prompt=PROMPT)
    rt.run_to(s2.id, [lm.num_layers - 1])
    zeroed = rt.patch(s2.id, "set", 0.0)
    assert zeroed["norm"] == 0.0 and zeroed["max"] == 0.0
    # the final RMSNorm of zeros is zeros, so every logit is 0 and greedy picks token 0
    with torch.no_grad():
        logits = lm.model.lm_head(lm.model.model.norm(s2.hidden[:, -1:]))
    assert torch.count_nonzero(logits) == 0
    assert rt.resume(s2.id)["token"] == 0 != ref[0]


def test_patch_at_positions_and_channels(rt):
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [3])
    rt.patch(s.id, "set", 7.0, positions=[-1], channels=[0, 5])
    vals = rt.inspect(s.id, positions=[-1], channels=[0, 5, 6])["values"]
    assert vals[0][:2] == [7.0, 7.0] and vals[0][2] != 7.0
    rt.patch(s.id, "add", [1.0, 2.0], positions=[-1], channels=[0, 5])
    assert rt.inspect(s.id, positions=[-1], channels=[0, 5])["values"] == [[8.0, 9.0]]


def test_bad_requests_get_clear_errors_and_leave_the_session_usable(rt, lm):
    ref = reference(rt)
    s = rt.create(prompt=PROMPT)
    cases = [
        (lambda: rt.get(999), "unknown_session"),
        (lambda: rt.run_to(s.id, [lm.num_layers]), "bad_params"),
        (lambda: rt.run_to(s.id, [-1]), "bad_params"),
        (lambda: rt.resume(s.id), "bad_state"),
        (lambda: rt.inspect(s.id), "bad_state"),
        (lambda: rt.create(prompt=""), "bad_params"),
        (lambda: rt.create(token_ids=[lm.vocab_size]), "bad_params"),
    ]
    for call, code in cases:  # (wrong types and ranges are stopped at the wire's edge: test_wire)
        with pytest.raises(DjinnError) as e:
            call()
        assert e.value.code == code and "\n" not in str(e.value)
    rt.run_to(s.id, [4])
    for call, code in [
        (lambda: rt.patch(s.id, "set", [1.0, 2.0, 3.0], channels=[0, 1]), "bad_params"),
        (lambda: rt.patch(s.id, "set", 1.0, positions=[999]), "bad_params"),
        (lambda: rt.generate(s.id, 1), "bad_state"),
        (lambda: rt.run_to(s.id, [5]), "bad_state"),
    ]:
        with pytest.raises(DjinnError) as e:
            call()
        assert e.value.code == code
    toks = [rt.resume(s.id)["token"]] + rt.generate(s.id, GEN - 1)
    assert toks == ref


def test_close_a_paused_session_ends_its_forward_and_frees_its_memory(rt, lm):
    s = rt.create(prompt=PROMPT)
    rt.run_to(s.id, [3])
    thread = s.thread
    assert rt.mem.used > lm.weights_bytes
    rt.close(s.id)
    thread.join(5)
    assert not thread.is_alive()
    assert rt.mem.used == lm.weights_bytes
    with pytest.raises(DjinnError):
        rt.resume(s.id)


def test_weights_are_counted_once_whatever_the_number_of_sessions(rt, lm):
    sessions = [rt.create(prompt=f"{PROMPT} {i}") for i in range(5)]
    for s in sessions:
        rt.run_to(s.id, [1])
    figures = rt.mem.figures()
    assert figures["weights_bytes"] == lm.weights_bytes
    assert figures["device_bytes"] == lm.weights_bytes + sum(s.charge for s in sessions)
    # each session holds its KV slab and its activations, never a copy of the weights
    assert all(0 < s.charge < lm.weights_bytes / 4 for s in sessions)


@pytest.mark.slow
def test_50_sessions_paused_at_once_over_the_daemon(daemon, lm):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, lm.vocab_size) for _ in range(12)] for _ in range(50)]
    slow_status = []
    stop = threading.Event()

    def watch():
        with daemon.client(timeout=5) as w:
            while not stop.is_set():
                t0 = time.monotonic()
                w.status()
                slow_status.append(time.monotonic() - t0)
                time.sleep(0.05)

    with daemon.client() as c:
        refs = []
        for p in prompts[:10]:
            sid = c.create_session(token_ids=p)
            refs.append(c.generate(sid, 3))
            c.close(sid)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            sids = []
            for i, p in enumerate(prompts):
                sid = c.create_session(token_ids=p)
                assert c.run_to(sid, layer=i % 8) == {"state": "paused", "layer": i % 8}
                sids.append(sid)
            assert sum(s["state"] == "paused" for s in c.sessions()) == 50
            order = list(range(50))
            rng.shuffle(order)
            for i in order:
                tok = c.resume(sids[i])
                toks = [tok] + c.generate(sids[i], 2)
                if i < 10:
                    assert toks == refs[i], f"session {i}"
            assert all(s["state"] == "idle" for s in c.sessions())
        finally:
            stop.set()
            watcher.join()
    assert slow_status and max(slow_status) < 1.0


def _race(fn_a, fn_b):
    """Run two calls at once; return what each raised or returned (a hang fails the test)."""
    out = [None, None]

    def run(i, fn):
        try:
            out[i] = fn()
        except DjinnError as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((fn_a, fn_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a call hung"
    return out


def test_resume_racing_close_never_hangs(rt, lm):
    for _ in range(20):
        s = rt.create(prompt=PROMPT)
        rt.run_to(s.id, [2, 5])
        resumed, _ = _race(lambda: rt.resume(s.id), lambda: rt.close(s.id))
        assert s.state == "closed" and s.id not in rt.sessions
        assert isinstance(resumed, (dict, DjinnError))
    assert rt.mem.used == lm.weights_bytes


def test_close_stops_a_generate_loop_and_frees_everything(rt, lm):
    s = rt.create(prompt=PROMPT)
    generated, _ = _race(lambda: rt.generate(s.id, 400), lambda: (time.sleep(0.05), rt.close(s.id)))
    # closed between two tokens (the next does not start) or during one (it stops at its next layer)
    assert isinstance(generated, DjinnError) and generated.code in ("unknown_session", "bad_state")
    time.sleep(0.1)
    assert s.state == "closed" and s.cache.slab is None and s.charge == 0
    assert rt.mem.used == lm.weights_bytes


def test_close_stops_a_running_prefill_at_its_next_layer(rt, lm):
    """`djinnd stop` and `close` do not wait for a long forward to end: it stops between two layers."""
    s = rt.create(token_ids=[i % 500 + 1 for i in range(4000)])
    ran_after_close = []

    def count(*_):
        if s.closing:
            ran_after_close.append(1)
    counters = [layer.register_forward_hook(count) for layer in lm.decoder_layers()]

    def close_once_running():
        while s.state != "running":
            time.sleep(0.001)
        rt.close(s.id)
    try:
        generated, _ = _race(lambda: rt.generate(s.id, 1), close_once_running)
    finally:
        for h in counters:
            h.remove()
    assert isinstance(generated, DjinnError) and "closed" in str(generated)
    assert len(ran_after_close) <= 1  # the layer running when close came, and no further
    assert s.state == "closed" and s.cache.slab is None and rt.mem.used == lm.weights_bytes


def test_a_decode_step_runs_on_the_callers_thread_only_when_nothing_would_wait(rt):
    ref = reference(rt)
    s = rt.create(prompt=PROMPT)
    assert rt.steps_now([s.id]) == {}  # the prompt's prefill is no decode step
    toks = rt.generate(s.id, 1)
    held = threading.Event()
    release = threading.Event()

    def hold_the_device():
        rt.device_lock.acquire()
        held.set()
        release.wait()
        rt.device_lock.release()

    t = threading.Thread(target=hold_the_device)
    t.start()
    held.wait()
    def books():
        return s.state, s.cache.seq_len, list(s.generated), s.charge, s.pins, rt.mem.used

    before = books()
    assert rt.steps_now([s.id]) == {}  # the device is busy: nothing changes
    assert books() == before
    release.set()
    t.join()
    other = rt.create(prompt=PROMPT)
    rt.generate(other.id, 1)  # resident beside it, and idle: a swap-out could make room
    budget = rt.mem.budget
    rt.mem.set_budget(rt.mem.used + rt._act_bytes(1) - 1)  # a step's activations do not fit
    before = books()
    assert rt.steps_now([s.id]) == {}  # no room: declined, nobody swapped out on the caller's thread
    assert books() == before
    assert other.stored is None and rt.mem.counters["swap_outs"] == 0
    rt.mem.set_budget(budget)
    rt.close(other.id)
    rt.mem.swap_out(s)
    assert rt.steps_now([s.id]) == {}  # swapped out: a swap-in is for a worker, not the caller
    toks += rt.generate(s.id, 1)
    while len(toks) < GEN:
        toks.append(rt.steps_now([s.id])[s.id])
    assert toks == ref
    assert rt.steps_now([999, "1"]) == {}


def test_forwards_waiting_for_room_a_running_session_holds_wait_without_swapping_each_other_out(rt):
    """A and B idle, C running (pinned, holding room for its forward): beside C either slab fits, not
    with a step's activations. While C holds the room A and B wait, and neither swaps the other out to
    find it still too small (they did, 44,000 times a minute, until their wait ran out); once C is
    done both run, with their tokens."""
    ref = reference(rt, n=2)
    a, b, c = (rt.create(prompt=PROMPT) for _ in range(3))
    for s in (a, b, c):
        rt.generate(s.id, 1)
    rt.mem.pin(c)
    held = 4 * rt._act_bytes(1)
    rt.mem.reserve(c, held)
    rt.mem.set_budget(rt.mem.fixed + rt.mem.overhead + c.charge + a.charge + rt._act_bytes(1) - 1)
    swaps = dict(rt.mem.counters)
    got = {}
    threads = [threading.Thread(target=lambda s=s: got.setdefault(s.id, rt.generate(s.id, 1))) for s in (a, b)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    waited = {k: rt.mem.counters[k] - swaps[k] for k in ("swap_outs", "swap_ins")}
    assert not got and waited["swap_outs"] <= 1 and waited["swap_ins"] <= 1, waited
    rt.mem.unpin(c, release=held)
    for t in threads:
        t.join(30)
    assert got == {a.id: ref[1:], b.id: ref[1:]}


def test_a_step_on_the_callers_thread_grows_a_full_slab_when_the_budget_has_room(rt):
    s = rt.create(prompt=PROMPT)
    toks = rt.generate(s.id, 1)
    while s.cache.seq_len < s.cache.capacity:
        toks += rt.generate(s.id, 1)
    ref = reference(rt, n=len(toks) + 2)
    capacity, swaps = s.cache.capacity, rt.mem.counters["swap_outs"]
    toks.append(rt.steps_now([s.id])[s.id])
    assert s.cache.capacity > capacity and s.charge == s.cache.nbytes and s.pins == 0
    assert rt.mem.counters["swap_outs"] == swaps
    toks += rt.generate(s.id, 1)
    assert toks == ref


def test_a_forward_answers_its_own_caller_whatever_another_client_does_the_moment_it_ends(rt):
    """Another client may act on the session the moment a forward pauses or ends, before the
    forward's caller has read its answer: the caller still gets its own, and the other request
    comes after it (or is refused, the session busy)."""
    ref = reference(rt, n=3)
    s = rt.create(prompt=PROMPT)
    real_batch, real_wait, other = rt._run_batch, rt._wait, {}

    def act_then(call, answer):  # another client's request, given a second to come first
        t = threading.Thread(target=lambda: other.update(result=call()))
        t.start()
        t.join(1)
        other["thread"] = t
        return answer()

    def run_batch(rows):  # a decode step ends; another client's run_to comes at once
        real_batch(rows)
        if s in rows and len(s.generated) == 2 and not other:
            def run_to():
                try:
                    return rt.run_to(s.id, [2])
                except DjinnError as e:
                    return e.code
            act_then(run_to, lambda: None)

    rt._run_batch = run_batch
    assert rt.generate(s.id, 2) == ref[:2]
    other["thread"].join()
    assert other["result"] == "bad_state"  # refused: the step's caller was still to be answered
    rt._run_batch = real_batch

    def wait(sess, resumed=False):  # the run_to's forward pauses; another client resumes it at once
        if sess is s and not resumed and "resumed" not in other:
            def resume():
                while s.state != "paused":
                    time.sleep(0.001)
                return rt.resume(s.id)
            other["resumed"] = True
            return act_then(resume, lambda: real_wait(sess, resumed))
        return real_wait(sess, resumed)

    rt._wait = wait
    assert rt.run_to(s.id, [2, 5]) == {"state": "paused", "layer": 2}
    other["thread"].join()
    assert other["result"] == {"state": "paused", "layer": 5}
    assert rt.resume(s.id) == {"state": "idle", "token": ref[2]}


def test_a_long_prefill_lets_a_decode_step_through_and_its_tokens_do_not_change(rt, lm):
    long_prompt = [3 + i % 500 for i in range(1500)]
    ref = rt.create(token_ids=long_prompt)
    expected = rt.generate(ref.id, 2)
    rt.close(ref.id)
    other = rt.create(prompt=PROMPT)
    rt.generate(other.id, 1)
    s = rt.create(token_ids=long_prompt)
    done = {}

    def prefill():
        done["tokens"] = rt.generate(s.id, 2)
        done["at"] = time.monotonic()

    t = threading.Thread(target=prefill)
    t.start()
    deadline = time.monotonic() + 60
    while rt.device_lock.figures()["in_flight"] == 0 or s.state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    rt.generate(other.id, 1)  # queued behind the prefill: it is let through at the next layer
    decoded_at = time.monotonic()
    t.join()
    assert decoded_at < done["at"]
    assert rt.device_lock.figures()["handovers"] >= 1
    assert done["tokens"] == expected  # the layers ran as before, only later


def test_the_first_step_after_io_wait_goes_before_an_older_decode_step_and_only_the_first(rt):
    a, b = rt.create(prompt=PROMPT), rt.create(prompt=PROMPT)
    for s in (a, b):
        rt.generate(s.id, 1)  # the prefills, out of the way

    def queue_both(b_signals):
        """a's step queues, then b's (after its signals), behind the held device; the order served."""
        order = []
        rt.device_lock.acquire("interactive")
        threads = []
        for s, signals in ((a, []), (b, b_signals)):
            for phase in signals:
                rt.signal_phase(s.id, phase)
            threads.append(threading.Thread(target=lambda s=s: (rt.generate(s.id, 1), order.append(s.id))))
            threads[-1].start()
            deadline = time.monotonic() + 60
            while sum(rt.device_lock.figures()["waiting"].values()) < len(threads):
                assert time.monotonic() < deadline
                time.sleep(0.0005)
        rt.device_lock.release()
        for t in threads:
            t.join(10)
        return order

    assert queue_both(["IO_WAIT", "COMPUTE"]) == [b.id, a.id]  # b's tool wait ended: its step goes first
    assert queue_both([]) == [a.id, b.id]  # b's next step is an ordinary one again
    assert queue_both(["IO_WAIT"]) == [b.id, a.id]  # no COMPUTE: the step itself ends the wait
    assert rt.device_lock.figures()["wake_jumps"] == 2


class Injected(RuntimeError):
    pass


def _raise(*_a, **_k):
    raise Injected("injected failure")


@pytest.mark.parametrize("stage", ["before_hooks", "in_a_layer", "at_the_pause", "at_resume", "final_step"])
def test_a_failure_anywhere_in_a_forward_answers_its_caller_and_wedges_nothing(rt, lm, stage):
    """Whatever fails inside a forward's thread, the waiting request gets an error naming it, the
    session stays usable and shutdown finishes (a failure before the hooks once hung all three)."""
    ref = reference(rt)
    s = rt.create(prompt=PROMPT)
    undo = []
    if stage == "before_hooks":  # as a model whose layers the runtime cannot find
        rt.lm.decoder_layers = _raise
        undo.append(lambda: delattr(rt.lm, "decoder_layers"))
    elif stage == "in_a_layer":  # before the breakpoint at 2
        undo.append(lm.decoder_layers()[1].register_forward_pre_hook(_raise).remove)
    elif stage == "at_the_pause":
        rt._event = lambda s_, action, **kw: _raise() if action == "paused" else None
        undo.append(lambda: delattr(rt, "_event"))
    elif stage == "at_resume":
        rt.run_to(s.id, [2])
        undo.append(lm.decoder_layers()[3].register_forward_pre_hook(_raise).remove)
    else:  # the output head, in a forward without breakpoints, on the caller's thread
        undo.append(lm.model.get_output_embeddings().register_forward_hook(_raise).remove)
    call = {"at_resume": lambda: rt.resume(s.id), "final_step": lambda: rt.generate(s.id, 1)}.get(
        stage, lambda: rt.run_to(s.id, [2]))
    try:
        with pytest.raises(DjinnError) as e:
            call()
    finally:
        for u in undo:
            u()
    assert e.value.code == "internal" and "injected failure" in str(e.value)
    assert s.state == "idle" and s.cache.seq_len == 0 and s.pins == 0 and s.charge == s.cache.nbytes
    assert not rt.device_lock.held_by_me() and rt._hook_users == 0
    assert rt.generate(s.id, GEN) == ref  # usable: the failed forward left nothing behind
    done = threading.Thread(target=rt.shutdown)
    done.start()
    done.join(60)  # a wedged session made close wait 120 s, then hang on its thread
    assert not done.is_alive()


def test_a_prefill_in_chunks_gives_the_tokens_of_a_whole_one(lm):
    prompt = [3 + (7 * i) % 400 for i in range(23)]
    whole = Runtime(lm, EventBus(), lm.weights_bytes + (64 << 20), 32 << 20, tempfile.mkdtemp())
    chunked = Runtime(lm, EventBus(), lm.weights_bytes + (64 << 20), 32 << 20, tempfile.mkdtemp(), prefill_chunk=5)
    try:
        want = whole.generate(whole.create(token_ids=prompt).id, GEN)
        s = chunked.create(token_ids=prompt)
        assert chunked.generate(s.id, 1) == want[:1]
        assert chunked.device_lock.figures()["served"]["interactive"] == 5  # 5 + 5 + 5 + 5 + 3 tokens
        assert chunked.generate(s.id, GEN - 1) == want[1:]
        assert s.cache.seq_len == len(prompt) + GEN - 1 and s.charge == s.cache.nbytes  # activations given back
    finally:
        whole.shutdown()
        chunked.shutdown()


def test_two_prefills_with_room_for_one_at_a_time_never_wait_on_each_other_under_max_concurrency_2(lm):
    """--max-concurrency 2: two 1000-token prompts prefilled at once in chunks of 64, in a budget
    whose room holds either one's slab as it grows (the old slab and the new side by side, and a
    chunk's activations), not both slabs. With a device slot each, they wait only for room. A
    forward that found the room held by the other, running, waited for it in `reserve` holding its
    pin, its slab and its slot; the other, entering its next chunk, did the same: both pinned, each
    waiting for room the other held, 60 s (ROOM_WAIT_S), then one failed out_of_budget. Letting go
    of the pin to wait was not enough: each pinned itself again before trying, met the other's pin,
    and the two took turns so for the same 60 s (no swap either way). Both must end at once: with
    their tokens (one waits, holding nothing, for the other's forward to end), or out_of_budget.
    The joins' timeout only detects the stall; the race gets three rounds."""
    prompts = [[3 + (7 * i + k) % 500 for i in range(1000)] for k in (0, 1)]
    chunk, cap, seq, peak = 64, 0, 0, 0
    for n in [chunk] * (len(prompts[0]) // chunk) + [len(prompts[0]) % chunk, 1]:  # the prefill, a step
        new = capacity_for(cap, seq + n)
        peak, cap, seq = max(peak, cap + new if new > cap else 0), new, seq + n
    kv = lm.kv_bytes_per_token
    bus = EventBus()
    rt = Runtime(lm, bus, lm.weights_bytes + (64 << 20), 64 << 20, tempfile.mkdtemp(),  # budget set below
                 device_lock=DeviceLock(max_concurrency=2), prefill_chunk=chunk)
    threads = []
    try:
        room = peak * kv + rt._forward_bytes(chunk) + (64 << 10)
        assert 2 * cap * kv > room  # the two slabs, grown, do not fit together
        rt.mem.set_budget(rt.mem.fixed + room)
        want = []
        for p in prompts:  # alone, one after the other, each fits
            s = rt.create(token_ids=p)
            want.append(rt.generate(s.id, 2))
            rt.close(s.id)
        for _ in range(3):
            sessions = [rt.create(token_ids=p) for p in prompts]
            got, swaps = {}, rt.mem.counters["swap_outs"]

            def run(i, s):
                try:
                    got[i] = rt.generate(s.id, 2)
                except DjinnError as e:
                    got[i] = (e.code, str(e))

            threads = [threading.Thread(target=run, args=(i, s), daemon=True) for i, s in enumerate(sessions)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            stuck = [(s.id, str(s.state), s.pins, s.charge) for t, s in zip(threads, sessions) if t.is_alive()]
            assert not stuck, (f"forwards still waiting after 30 s (id, state, pins, charge): {stuck}; "
                               f"{rt.mem.used} B used of {rt.mem.budget}")
            for i, w in enumerate(want):
                r = got.get(i)
                assert r == w or (isinstance(r, tuple) and r[0] == "out_of_budget"), r
            assert got[0] == want[0] or got[1] == want[1], got  # at least one ran
            assert rt.mem.counters["swap_outs"] > swaps  # they took turns on the device
            for s in sessions:
                rt.close(s.id)
    finally:
        if any(t.is_alive() for t in threads):  # stalled: let the 60 s wait run out before shutdown
            for t in threads:
                t.join(90)
        rt.shutdown()
        bus.close()


def test_a_generates_tokens_are_contiguous_another_request_on_its_session_meanwhile_is_refused_as_busy(rt):
    ref = rt.create(prompt=PROMPT)
    want = rt.generate(ref.id, 40)
    s = rt.create(prompt=PROMPT)
    got, take_op = [], rt._take_op

    def slow_take_op(x):  # the generating thread comes late for its session: a race's window made wide
        if threading.current_thread() is t:
            time.sleep(0.005)
        take_op(x)

    rt._take_op = slow_take_op
    t = threading.Thread(target=lambda: got.extend(rt.generate(s.id, 40)))
    t.start()
    while len(s.generated) < 3 and t.is_alive():
        time.sleep(0.001)
    calls, codes, tries = [lambda: rt.append(s.id, [5, 6]), lambda: rt.generate(s.id, 1),
                           lambda: rt.run_to(s.id, [2])], set(), 0
    while t.is_alive():  # over and over, each in turn: between two of its tokens too
        tries += 1
        try:
            calls[tries % 3]()
            codes.add("answered")
        except DjinnError as e:
            codes.add(e.code)
        time.sleep(0.001)  # (the GIL for the generate)
    t.join(60)
    assert codes == {"bad_state"}  # busy with another request, or running
    assert got == want and s.generated == want  # nothing came between its tokens
    other = rt.create(prompt=PROMPT)  # a close meanwhile ends it at its next token
    ended = []

    def long_generate():
        try:
            rt.generate(other.id, 4000)
        except DjinnError as e:
            ended.append(e.code)

    t = threading.Thread(target=long_generate, daemon=True)
    t.start()
    while len(other.generated) < 2:
        time.sleep(0.001)
    rt.close(other.id)
    t.join(30)
    assert not t.is_alive() and other.id not in rt.sessions and ended == ["unknown_session"]
