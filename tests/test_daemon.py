"""Issue 2: the daemon's lifecycle, its socket, and hostile input, over the real socket."""

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import zmq

from djinnd import paths, protocol
from djinnd.client import Client, DjinnError

from conftest import ROOT, Daemon, djinn


def test_status_then_stop_removes_socket_and_pidfile(daemon):
    st = daemon.run("djinn", "status", "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["pid"] == daemon.proc.pid
    assert status["device"]["kind"] == "cpu"
    assert status["model"]["name"] == "tiny-llama" and status["model"]["num_layers"] == 8
    assert status["sessions"] == 0 and status["socket"] == str(daemon.socket)
    assert status["memory"]["device_bytes"] == status["model"]["weights_bytes"]
    out = daemon.run("djinnd", "stop", "--socket", str(daemon.socket))
    assert out.returncode == 0, out.stderr
    assert daemon.proc.wait(10) == 0
    assert not daemon.socket.exists()
    assert not paths.pidfile(daemon.socket).exists()
    assert not paths.events_socket(daemon.socket).exists()


def test_second_start_refuses_and_first_keeps_serving(daemon):
    second = daemon.run("djinnd", "start", "--socket", str(daemon.socket), "--device", "cpu")
    assert second.returncode != 0
    assert "already running" in second.stderr and str(daemon.proc.pid) in second.stderr
    with daemon.client() as c:
        assert c.status()["pid"] == daemon.proc.pid


def test_kill_9_leaves_stale_files_that_the_next_start_cleans(make_daemon):
    first = make_daemon("--device", "cpu")
    first.proc.kill()
    first.proc.wait()
    assert first.socket.exists() and paths.pidfile(first.socket).exists()
    with pytest.raises(DjinnError) as e:
        with Client(first.socket, timeout=1) as c:
            c.status()
    assert e.value.code == "no_daemon" and "stale" in str(e.value)
    second = make_daemon("--device", "cpu", folder=first.folder)
    with second.client() as c:
        assert c.status()["pid"] == second.proc.pid
    assert paths.pidfile(second.socket).read_text().strip() == str(second.proc.pid)


def test_sigterm_stops_cleanly_with_exit_code_0(daemon):
    with daemon.client() as c:
        sid = c.create_session(prompt="The capital of France is")
        c.run_to(sid, layer=3)  # a paused forward must not hold the daemon up
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    assert not daemon.socket.exists()
    log = daemon.output()
    assert "stopped" in log


def test_a_token_by_token_stream_leaves_the_loop_to_other_clients_and_to_sigterm(daemon):
    """After each decode step the loop busy-polls for the stream's next one; meanwhile another
    client's slow requests (run on the pool, replied by the loop) and quick ones are answered, the
    streamed tokens are right, and SIGTERM stops the daemon mid-stream."""
    ids = list(range(1, 17))
    with daemon.client() as c:
        sid = c.create_session(token_ids=ids)
        reference = c.generate(sid, 41)
        c.close(sid)
    streamed, stop, started, checked = [], threading.Event(), threading.Event(), threading.Event()

    def stream():
        with daemon.client(timeout=5) as c:
            sid = c.create_session(token_ids=ids)
            for _ in range(41):
                streamed.extend(c.generate(sid, 1))
                started.set()
            checked.set()
            try:
                for _ in range(2000):  # on, until SIGTERM
                    if stop.is_set():
                        break
                    c.generate(sid, 1)
            except DjinnError:
                pass

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        assert started.wait(30)
        with daemon.client(timeout=5) as c:
            for _ in range(5):
                other = c.create_session(token_ids=ids)
                assert c.generate(other, 6) == reference[:6]
                assert c.status()["sessions"] >= 1
                c.close(other)
        assert checked.wait(30) and streamed == reference
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    finally:
        stop.set()
        streaming.join(30)


def test_socket_folder_0700_and_sockets_0600(daemon):
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.events_socket(daemon.socket).stat().st_mode) == 0o600


def test_systemd_notify_ready_and_stopping(tmp_path):
    addr = f"/tmp/djn-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(addr)
    listener.settimeout(60)
    d = Daemon("--device", "cpu", env={"NOTIFY_SOCKET": addr})
    try:
        d.start()
        assert listener.recv(256).startswith(b"READY=1")
        d.stop()
        assert b"STOPPING=1" in listener.recv(256)
    finally:
        d.remove()
        listener.close()
        os.unlink(addr)


def test_journald_style_logs_have_no_timestamps_under_journald():
    d = Daemon("--device", "cpu", env={"JOURNAL_STREAM": "8:123"})
    try:
        d.start()
        d.stop()
        lines = d.output().splitlines()
        assert lines and all(line.startswith("<") for line in lines), lines[:3]
        assert any(line.startswith("<6>djinnd") for line in lines)
    finally:
        d.remove()


def test_no_daemon_is_a_clear_error(tmp_path):
    sock = tmp_path / "none.sock"
    with pytest.raises(DjinnError) as e:
        with Client(sock) as c:
            c.status()
    assert e.value.code == "no_daemon" and str(sock) in str(e.value) and "djinnd start" in str(e.value)
    out = djinn("status", "--socket", str(sock))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_a_connected_client_gets_no_daemon_when_its_daemon_stops_and_reaches_the_next_one(daemon):
    with daemon.client(timeout=5) as c:
        c.ping()
        assert daemon.stop() == 0
        for _ in range(2):  # the connection gone, then the socket gone
            with pytest.raises(DjinnError) as e:
                c.status()
            assert e.value.code == "no_daemon" and str(daemon.socket) in str(e.value)
        daemon.start()
        assert c.ping() == {}


def _hostile_frames(rng: random.Random):
    """Garbage, wrong types, huge frames, unknown methods, wrong versions, bad params."""
    kinds = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
        lambda: b"[1,2,3]",
        lambda: b'{"v": 1}',
        lambda: json.dumps({"v": 1, "id": rng.random(), "method": "status"}).encode(),
        lambda: json.dumps({"v": 99, "id": "x", "method": "status"}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": ["status"]}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "no.such.method"}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "session.get", "params": {"session": "1; DROP"}}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "session.generate", "params": {"session": 1, "max_new_tokens": -5}}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "session.create", "params": {"token_ids": [10**12]}}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "status", "params": {"unexpected": 1}}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "session.run_to", "params": {"session": 1, "layers": [{}]}}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "memory.set_budget", "params": {"budget": "lots"}}).encode(),
        lambda: json.dumps({"v": 1, "id": "x", "method": "ping", "params": "nope"}).encode(),
        lambda: b'{"v": 1, "id": "big", "method": "ping", "params": {"pad": "' + b"a" * (protocol.MAX_FRAME + 10) + b'"}}',
    ]
    for i in range(1000):
        yield kinds[i % len(kinds)]()


def test_1000_hostile_requests_get_errors_and_the_daemon_serves_on(daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(paths.endpoint(daemon.socket))
    replies = 0
    try:
        for frame in _hostile_frames(random.Random(7)):
            s.send(frame)
            if s.poll(2000):
                reply = json.loads(s.recv())
                assert reply["ok"] is False and reply["error"]["code"] in {
                    "malformed", "oversized", "bad_version", "unknown_method", "bad_params", "unknown_session",
                    "out_of_budget"}, reply
                replies += 1
        s.send_multipart([b"one", b"two", b"three", b"four"])  # a request is one frame
        if s.poll(2000):
            assert json.loads(s.recv())["error"]["code"] == "malformed"
    finally:
        s.close(0)
    assert replies >= 900  # every frame but those dropped unread (none expected at 1 MiB + a few bytes)
    with daemon.client(timeout=5) as c:
        assert c.status()["pid"] == daemon.proc.pid
    assert daemon.proc.poll() is None


@pytest.mark.slow
def test_random_requests_from_4_clients_keep_the_daemon_serving_and_sessions_intact(daemon):
    """4 clients send 750 requests each to every method, its own parameters (now and then a stray
    one) set to random values of every JSON type, most aimed at 4 shared sessions, with budget
    changes that force swaps: each gets a reply without an internal error, and each shared
    session's tokens are still those of its prompt run straight through."""
    from djinnd.wire import METHODS

    values = [None, True, 0, 1, 2, -1, 2**70, 1.5, "x", "", [], [1], [0, 1, 2], [1, "a"], {}, {"a": 1}, "IO_WAIT",
              "COMPUTE", "set", "scale", "8MiB", "12MiB", "40MiB", [[1]]]
    methods = {name: [p.name for p in m.params] for name, m in METHODS.items() if name != "shutdown"}
    with daemon.client(timeout=60) as c:
        kept = [c.create_session(prompt="The capital of France is") for _ in range(4)]
    seen, failures = set(), []

    def client(seed):
        rng = random.Random(seed)
        with daemon.client(timeout=120) as c:
            for _ in range(750):
                method = rng.choice([*methods, "no.such"])
                names = [n for n in methods.get(method, []) if rng.random() < 0.8] + ["x"] * (rng.random() < 0.1)
                params = {n: rng.choice(kept) if n == "session" and rng.random() < 0.8 else rng.choice(values)
                          for n in names}
                if method in ("session.close", "session.patch", "session.append") and params.get("session") in kept:
                    continue  # those that end or change a session on purpose
                try:
                    c.call(method, **params)
                    seen.add("ok")
                    if method == "session.run_to":  # paused: run it on to the end, as a debugger would
                        seen.add("paused")
                        while c.resume(params["session"]) is None:
                            pass
                except DjinnError as e:
                    seen.add(e.code)
                    if e.code in ("internal", "timeout", "no_daemon", "swap_failed"):
                        failures.append((method, params, e.code, e.message))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert {"ok", "paused", "bad_params", "bad_state", "unknown_method"} <= seen, seen
    with daemon.client(timeout=120) as c:
        c.set_swap(True)
        c.set_budget("1GiB")
        assert c.status()["swap"]["swap_outs"] > 0  # the budget changes made it swap
        made = [c.session(sid)["tokens"] for sid in kept]
        assert sum(map(len, made)) >= 10  # enough made to compare (how many depends on how the threads interleave)
        for sid, tokens in zip(kept, made):
            if tokens:
                ref = c.create_session(prompt="The capital of France is")
                assert c.generate(ref, len(tokens)) == tokens, sid
    assert daemon.proc.poll() is None


def test_a_parameter_json_cannot_carry_is_a_clear_error_and_nothing_is_sent(daemon):
    with daemon.client(timeout=30) as c:
        sid = c.create_session(prompt="The capital of France is")
        for call in (lambda: c.signal_phase(sid, "IO_WAIT", expected_ms=float("nan")),
                     lambda: c.patch(sid, add=float("inf"))):
            with pytest.raises(DjinnError) as e:
                call()
            assert e.value.code == "bad_params" and "JSON" in str(e.value)
        info = c.session(sid)
        assert (info["phase"], info["state"]) == ("COMPUTE", "idle")  # the hint never left the client
        c.close(sid)


def test_detach_returns_once_serving_and_stop_ends_it(tmp_path):
    folder = Daemon().folder
    sock = folder / "run" / "d.sock"
    env = {**os.environ, "DJINN_SOCKET": str(sock)}
    try:
        out = subprocess.run([sys.executable, "-m", "djinnd", "start", "--detach", "--device", "cpu", "--logs",
                              str(folder / "logs")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "started" in out.stdout
        with Client(sock, timeout=5) as c:
            pid = c.status()["pid"]
        stop = subprocess.run([sys.executable, "-m", "djinnd", "stop"], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert not sock.exists()
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
    finally:
        subprocess.run([sys.executable, "-m", "djinnd", "stop"], capture_output=True, env=env, cwd=ROOT)


def test_a_gpt2_asked_past_its_learned_positions_gets_clear_errors_and_the_daemon_still_stops(make_daemon, tmp_path):
    """A GPT-2 with 8 learned positions, asked for a 9th: its forward would fail inside the model
    (an IndexError, which once hung the request, `status`, `djinnd stop` and SIGTERM alike; the
    runtime's tests fail forwards at every stage). The context is checked before any forward now."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=8,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path)
    d = make_daemon("--device", "cpu", "--model", str(tmp_path))
    with d.client(timeout=30) as c:
        with pytest.raises(DjinnError) as e:
            c.create_session(token_ids=list(range(3, 12)))
        assert e.value.code == "bad_params" and "past the model's context of 8" in str(e.value)
        sid = c.create_session(token_ids=list(range(3, 10)))
        assert len(c.generate(sid, 2)) == 2  # positions 0..7
        with pytest.raises(DjinnError) as e:
            c.run_to(sid, layer=0)
        assert e.value.code == "bad_state" and "context of 8 is full" in str(e.value)
        assert c.session(sid)["state"] == "idle"
        assert c.status()["sessions"] == 1
    assert d.stop(timeout=30) == 0


def test_print_config_shows_the_settings_as_the_daemon_would_take_them_and_starts_nothing(tmp_path):
    sock = tmp_path / "run" / "d.sock"
    out = djinn("start", "--socket", str(sock), "--print-config", "--vram-budget", "2GiB", "--qos", "off",
                "--max-concurrency", "2", "--max-batch", "8", program="djinnd")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["vram_budget"] == 2 << 30 and config["qos"] == "off" and config["max_concurrency"] == 2
    assert config["max_batch"] == 8 and config["prefill_chunk"] == 512
    assert config["socket"] == str(sock) and config["model"] == "tiny-llama"
    assert not sock.parent.exists()


def test_the_logit_lens_at_the_last_layer_is_the_models_own_next_token_distribution(daemon):
    import torch

    from djinnd import load_model
    lm = load_model("tiny-llama", "cpu")
    prompt = "The capital of France is"
    with torch.inference_mode():  # the reference: the model's own distribution, in this process
        ids = torch.tensor([lm.encode(prompt)])
        probs = torch.softmax(lm.model(input_ids=ids).logits[0, -1].float(), dim=-1)
    want = probs.topk(5)
    with daemon.client() as c:
        sid = c.create_session(prompt=prompt)
        c.run_to(sid, layers=[0, lm.num_layers - 1])
        early = c.lens(sid, top_k=5)
        with pytest.raises(DjinnError) as e:
            c.lens(sid, position=999)
        assert e.value.code == "bad_params" and "position" in str(e.value)
        assert c.resume(sid) is None
        last = c.lens(sid, top_k=5)
        assert last["layer"] == lm.num_layers - 1 and last["position"] == len(ids[0]) - 1
        assert [t["token"] for t in last["top"]] == want.indices.tolist()
        assert max(abs(t["prob"] - p) for t, p in zip(last["top"], want.values.tolist())) < 1e-5
        assert [t["token"] for t in early["top"]] != [t["token"] for t in last["top"]]  # layer 0 predicts otherwise
        assert c.resume(sid) == want.indices[0].item()  # and the forward's token is the lens's first
        with pytest.raises(DjinnError) as e:
            c.lens(sid)
        assert e.value.code == "bad_state"
    out = daemon.run("djinn", "session", "lens", str(sid))
    assert out.returncode == 1 and "not paused" in out.stderr


def test_append_continues_a_session_as_if_its_history_had_been_its_prompt(daemon):
    """A conversation's turns: the new input after what the session holds, over its kept KV, gives
    the tokens of a session whose prompt is the whole history; bad input changes nothing."""
    with daemon.client() as c:
        sid = c.create_session(token_ids=[5, 6, 7])
        first = c.generate(sid, 3)
        assert c.append(sid, [9, 10]) == {"pending": 3}  # the last token, not yet in the KV, and the turn
        second = c.generate(sid, 3)
        whole = c.create_session(token_ids=[5, 6, 7, *first, 9, 10])
        assert c.generate(whole, 3) == second
        assert c.session(sid)["tokens"] == [*first, 9, 10, *second]
        vocab = c.status()["model"]["vocab_size"]
        for bad, code in (([], "bad_params"), ([vocab], "bad_params"), ([-1], "bad_params")):
            with pytest.raises(DjinnError) as e:
                c.append(sid, bad)
            assert e.value.code == code, bad
        c.run_to(sid, layer=1)
        with pytest.raises(DjinnError) as e:
            c.append(sid, [11])
        assert e.value.code == "bad_state" and "paused" in str(e.value)
        c.resume(sid)
        with pytest.raises(DjinnError) as e:
            c.append(999, [11])
        assert e.value.code == "unknown_session"
        assert c.session(sid)["tokens"][:8] == [*first, 9, 10, *second]


def test_a_session_stops_at_the_models_context_with_a_clear_error(daemon):
    """Positions past the model's context do not exist: a prompt or input past it is refused, and a
    session that filled it says so, with one line, its tokens unchanged."""
    with daemon.client() as c:
        n = c.status()["model"]["context_length"]
        assert n == 4096  # tiny-llama's max_position_embeddings
        with pytest.raises(DjinnError) as e:
            c.create_session(token_ids=[5] * (n + 1))
        assert e.value.code == "bad_params" and f"past the model's context of {n}" in str(e.value)
        sid = c.create_session(token_ids=[5] * (n - 3))
        assert len(c.generate(sid, 3)) == 3  # n - 1 positions hold keys; the last token waits for position n - 1
        with pytest.raises(DjinnError) as e:
            c.append(sid, [6])
        assert e.value.code == "bad_params" and f"session {sid} would hold {n + 1} tokens" in str(e.value)
        assert len(c.generate(sid, 1)) == 1  # the last position
        with pytest.raises(DjinnError) as e:
            c.generate(sid, 1)
        assert e.value.code == "bad_state" and f"context of {n} is full" in str(e.value)
        info = c.session(sid)
        assert info["state"] == "idle" and len(info["tokens"]) == 4 and info["seq_len"] == n


def _as_user(uid: int, fn) -> str:
    """fn() in a forked child running as `uid`: what it returns, or the error it raised, as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid), os.setuid(uid)
            out = str(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_another_user_is_refused_even_where_the_socket_file_lets_them_in(daemon):
    """The socket's folder is 0700; opened up here, the daemon still refuses another uid (its peer
    credentials, from the kernel) before reading a request, and logs it; the client says why at once."""
    sock = daemon.socket
    for path in (daemon.folder, sock.parent, sock, paths.events_socket(sock)):
        os.chmod(path, 0o777)

    def raw_ping():  # what a client that skips the check sends
        s = zmq.Context().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(paths.endpoint(sock))
        s.send(protocol.request("x-1", "ping", {}))
        return "answered" if s.poll(3000) else "no answer"

    try:
        assert raw_ping() == "answered" and _as_user(65534, lambda: os.access(sock, os.W_OK)) == "True"  # it could connect
        assert _as_user(65534, raw_ping) == "no answer"
        refused = _as_user(65534, lambda: Client(sock, timeout=5).ping())
        assert refused.startswith("DjinnError: ") and "runs as uid 0: only that user and root may connect" in refused
        with daemon.client() as c:
            assert c.ping() == {}  # its own user is served as before
    finally:
        os.chmod(daemon.folder, 0o700), os.chmod(sock.parent, 0o700)
    assert "refused a connection from uid 65534" in daemon.output()


@pytest.mark.slow
def test_a_private_daemon_stops_when_the_process_that_started_it_is_killed(tmp_path):
    """A scenario run (or a fleet actor) SIGKILLed leaves no daemon serving for nobody: it gets SIGTERM
    and stops as `djinnd stop` stops it (socket removed, journal kept)."""
    import psutil
    code = ("import sys, time\nfrom pathlib import Path\nfrom djinnd import PrivateDaemon\n"
            "d = PrivateDaemon('--device', 'cpu', folder=Path(sys.argv[1])).start()\n"
            "print(d.proc.pid, flush=True)\ntime.sleep(600)\n")
    starter = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(starter.stdout.readline())
        sock = tmp_path / "run" / "djinnd.sock"
        assert sock.exists()
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the daemon served on after its starter was killed")
        assert not sock.exists() and (tmp_path / "run" / "djinnd.journal.sqlite").exists()  # a graceful stop
    finally:
        starter.kill()
