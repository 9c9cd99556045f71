"""Batched decode through a real daemon: sessions stepping at once share forwards, and each gets the
tokens it gets alone, beside paused sessions, under swap pressure, and when a client goes away."""

import threading
import time

import pytest

from djinnd import Client

N = 8  # tokens each session decodes
PROMPTS = [[11, 29, 37, 41, 53], [7, 19, 23], [101, 103, 107, 109, 113, 127, 131], [5, 3]]


@pytest.fixture(scope="module")
def djinnd(djinn_cache):
    from conftest import Daemon
    d = Daemon("--device", "cpu", "--max-batch", "8").start()
    yield d
    d.remove()


@pytest.fixture(scope="module")
def alone(djinnd):
    """Each prompt's tokens decoded with nobody else on the daemon: one row a forward."""
    with djinnd.client() as c:
        out = []
        for p in PROMPTS:
            sid = c.create_session(token_ids=p)
            out.append(c.generate(sid, 1) + [c.generate(sid, 1)[0] for _ in range(N - 1)])
            c.close(sid)
        return out


def decode_together(djinnd, sids, n=N, each_step=None) -> list[list[int]]:
    """Each session decodes n tokens token by token from a client of its own; the steps go out
    together (a barrier before each), so that the daemon batches them."""
    got = [[] for _ in sids]
    together = threading.Barrier(len(sids), action=each_step)
    errors = []

    def run(i):
        try:
            with Client(djinnd.socket, timeout=120) as c:
                for _ in range(n):
                    together.wait(60)
                    got[i] += c.generate(sids[i], 1)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            together.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return got


def batches(c) -> dict:
    return c.status()["scheduler"]["batches"]


def test_sessions_stepping_at_once_share_forwards_and_get_their_own_tokens(djinnd, alone):
    with djinnd.client() as c:
        sids = [c.create_session(token_ids=p) for p in PROMPTS]
        before = batches(c)
        got = decode_together(djinnd, sids)
        after = batches(c)
        for sid in sids:
            c.close(sid)
    assert got == alone
    steps, forwards = after["rows"] - before["rows"], after["forwards"] - before["forwards"]
    assert steps == len(PROMPTS) * (N - 1)  # the first token of each is its prefill's
    assert forwards < steps and after["largest"] >= 2  # batched: fewer forwards than steps


def test_a_paused_session_beside_running_batches_comes_back_to_its_own_tokens(djinnd, alone):
    with djinnd.client() as c:
        paused = c.create_session(token_ids=PROMPTS[0])
        assert c.run_to(paused, layers=[3]) == {"state": "paused", "layer": 3}
        before = c.inspect(paused, positions=[0, 1])["values"]
        sids = [c.create_session(token_ids=p) for p in PROMPTS[1:]]
        got = decode_together(djinnd, sids)
        assert c.session(paused)["state"] == "paused"
        assert c.inspect(paused, positions=[0, 1])["values"] == before
        tokens = [c.resume(paused)] + c.generate(paused, N - 1)
        for sid in sids + [paused]:
            c.close(sid)
    assert got == alone[1:] and tokens == alone[0]


def test_a_budget_squeezed_while_batches_run_swaps_out_only_sessions_outside_them(djinnd, alone):
    """Lowering the budget asks for swap-outs while steps run: a session inside a running batch is
    pinned, so the eviction takes another (or waits); every session keeps its tokens."""
    with djinnd.client() as c:
        budget = c.status()["memory"]["budget_bytes"]
        idle = c.create_session(token_ids=PROMPTS[0])
        c.generate(idle, 1)
        sids = [c.create_session(token_ids=p) for p in PROMPTS]
        for sid in sids:
            c.generate(sid, 1)
        mem = c.status()["memory"]
        tight = mem["device_bytes"] - c.session(idle)["device_bytes"] // 2  # one session no longer fits
        squeezes, done = [], threading.Event()

        def squeeze():  # over and over while the steps run: some land inside a batch's forward
            with Client(djinnd.socket) as c2:
                while not done.is_set():
                    c2.set_budget(tight)
                    squeezes.append(c2.session(idle)["location"])
                    c2.set_budget(budget)

        squeezer = threading.Thread(target=squeeze)
        squeezer.start()
        try:
            got = decode_together(djinnd, sids, N - 1)
        finally:
            done.set()
            squeezer.join(60)
        out = c.status()["swap"]["swap_outs"]
        tokens = c.generate(idle, N - 1)
        for sid in sids + [idle]:
            c.close(sid)
    assert [[a[0]] + g for a, g in zip(alone, got)] == alone
    assert squeezes and "device" not in squeezes and out >= 1  # the idle one, coldest, went first each time
    assert tokens == alone[0][1:]


def test_steps_whose_sessions_do_not_fit_together_run_in_turns_and_keep_their_tokens(djinnd, alone):
    """A budget with room for two of the four sessions: a batch's rows cannot all be on the device
    at once, and those that entered cannot leave before the forward, so the rest wait for the next
    batch (they did wait for room the batch itself held, then failed out_of_budget)."""
    with djinnd.client() as c:
        budget = c.status()["memory"]["budget_bytes"]
        sids = [c.create_session(token_ids=p) for p in PROMPTS]
        for sid in sids:
            c.generate(sid, 1)
        mem = c.status()["memory"]
        biggest = max(c.session(sid)["device_bytes"] for sid in sids)
        c.set_budget(mem["weights_bytes"] + mem["overhead_bytes"] + biggest * 5 // 2)
        try:
            got = decode_together(djinnd, sids, N - 1)
            swaps = c.status()["swap"]["swap_ins"]
        finally:
            c.set_budget(budget)
        for sid in sids:
            c.close(sid)
    assert [[a[0]] + g for a, g in zip(alone, got)] == alone
    assert swaps > 0  # they took turns on the device


def test_a_client_that_goes_away_mid_batch_leaves_the_others_tokens_right(djinnd, alone):
    with djinnd.client() as c:
        sids = [c.create_session(token_ids=p) for p in PROMPTS]
        gone = sids[0]
        c.generate(gone, 1)
        quitter = Client(djinnd.socket)

        def leave():  # asks for a step and closes its socket without waiting for the reply
            quitter.call("session.generate", wait=False, session=gone, max_new_tokens=1)
            quitter.close_socket()

        got = decode_together(djinnd, sids[1:], each_step=leave)
        for _ in range(100):  # its last step may still be running
            time.sleep(0.01)
            info = c.session(gone)
            if info["state"] == "idle" and len(info["tokens"]) == N + 1:
                break
        assert info["tokens"] == alone[0] + info["tokens"][N:]  # its steps ran; the replies were dropped
        assert c.ping() == {}
        for sid in sids:
            c.close(sid)
    assert got == alone[1:]
