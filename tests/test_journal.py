"""Sessions survive a restart: the journal (djinnd/journal.py), over real daemons and the real socket."""

import json
import os
import random
import sqlite3
import stat

import numpy as np

from djinnd import paths

# weights 6.3 MB; each session here holds ~0.6-1 MB: a few stay on the device, the others are swapped
TIGHT = ("--device", "cpu", "--vram-budget", str(6_333_056 + 3_000_000), "--host-pool", "64MiB")
FIELDS = ("id", "state", "layer", "qos", "phase", "tokens", "prompt_tokens")


def build(c) -> None:
    """Sixteen sessions in mixed states, the same on every daemon it drives (ids 1-16, 4 closed)."""
    rng = random.Random(5)

    def new(n=20, qos="interactive"):
        return c.create_session(token_ids=[rng.randrange(3, 500) for _ in range(n)], qos=qos)

    for k in (1, 3, 6):  # idle after generate
        c.generate(new(), k)
    sid = new()  # idle after generate and append
    c.generate(sid, 2)
    c.append(sid, [7, 8, 9])
    c.close(new())  # closed: not to come back
    # paused in its first forward, at various layers, some patched
    for layer, patch in ((0, None), (3, {"scale": 0.5}), (7, {"set": 0.25, "positions": [1, 2], "channels": [0, 5]})):
        sid = new()
        assert c.run_to(sid, layer=layer) == {"state": "paused", "layer": layer}
        if patch:
            c.patch(sid, **patch)
    # paused on a decode step after tokens generated, patched at an earlier breakpoint and at this one
    sid = new()
    c.generate(sid, 4)
    c.run_to(sid, layers=[1, 4, 6])
    c.patch(sid, add=0.125)
    assert c.resume(sid) is None
    c.patch(sid, scale=2.0, channels=[3])
    # paused after an append (a forward of several tokens over its KV)
    sid = new(12)
    c.generate(sid, 2)
    c.append(sid, [11, 12, 13])
    c.run_to(sid, layer=5)
    # QoS classes and phases
    c.generate(new(qos="batch"), 2)
    sid = new(qos="realtime")
    c.generate(sid, 1)
    c.signal_phase(sid, "IO_WAIT", expected_ms=60_000)
    sid = new(qos="batch")
    c.run_to(sid, layer=2)
    c.signal_phase(sid, "IO_WAIT", expected_ms=60_000)
    for _ in range(3):  # fresh ones never computed
        new(8, qos="realtime")


def state(c) -> dict:
    """Each session's durable state, and the whole hidden state of paused ones (every value)."""
    out = {}
    for info in c.sessions():
        sid = info["id"]
        s = {k: info[k] for k in FIELDS} | {"prompt_ids": c.session(sid)["prompt_ids"]}
        if info["state"] == "paused":
            n = c.inspect(sid)["shape"][1]
            s["hidden"] = c.inspect(sid, positions=list(range(n)))
        out[sid] = s
    return out


def carry_on(c, sids) -> dict:
    """Each session to the end of its forward, then three more tokens."""
    out = {}
    for sid in sids:
        toks = []
        while c.session(sid)["state"] == "paused":
            t = c.resume(sid)
            if t is not None:
                toks.append(t)
        out[sid] = toks + c.generate(sid, 3)
    return out


def test_kill_9_restores_every_session_in_its_state_and_they_go_on_as_if_never_killed(make_daemon):
    ref = make_daemon(*TIGHT)
    with ref.client() as c:
        build(c)
    d = make_daemon(*TIGHT)
    with d.client() as c:
        build(c)
        before = state(c)
        where = [s["location"] for s in c.sessions()]
    assert len(before) == 15 and 5 not in before
    assert sum(s["state"] == "paused" for s in before.values()) == 6
    assert {"host", "disk"} & set(where) and "device" in where, where  # some were swapped out
    journal = paths.journal(d.socket)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600

    d.proc.kill()
    d.proc.wait()
    again = make_daemon(*TIGHT, folder=d.folder)
    with again.client() as c, ref.client() as r:
        after = state(c)
        assert after == before  # ids, states, layers, QoS, phases, tokens, hidden states bit for bit
        assert after == state(r)
        infos = c.sessions()
        assert all(s["restored"] for s in infos)
        st = c.status()
        assert st["journal"] == {"path": str(journal), "restored": 15}
        restored = [e for e in c.snapshot()["events"] if e["type"] == "session" and e["action"] == "restored"]
        assert sorted(e["session"] for e in restored) == sorted(before)
        assert c.create_session(token_ids=[1, 2]) == 17  # after the largest id (16), not reused
        assert r.create_session(token_ids=[1, 2]) == 17
        sids = sorted(before)
        assert carry_on(c, sids) == carry_on(r, sids)
        assert not any(s["restored"] for s in c.sessions() if s["id"] in before)
    assert "restored 15 sessions (6 paused, " in again.output()


def test_sigterm_restart_restores_and_a_closed_session_stays_closed(make_daemon):
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        a = c.create_session(token_ids=list(range(3, 19)))
        c.generate(a, 2)
        b = c.create_session(token_ids=list(range(40, 60)))
        c.run_to(b, layers=[2, 5])
        c.patch(b, scale=0.5)
        gone = c.create_session(token_ids=[5, 6])
        c.close(gone)
        before = state(c)
    assert d.stop() == 0
    d2 = make_daemon("--device", "cpu", folder=d.folder)
    listed = d2.run("djinn", "session", "list")
    assert listed.returncode == 0 and listed.stdout.count("restored") == 2, listed.stdout
    with d2.client() as c:
        assert state(c) == before and sorted(before) == [a, b]
        assert c.resume(b) is None and c.session(b)["layer"] == 5  # its breakpoints came back too
        assert c.create_session(token_ids=[1]) == gone + 1
    # a second restart, from the state the first one journaled
    assert d2.stop() == 0
    d3 = make_daemon("--device", "cpu", folder=d.folder)
    with d3.client() as c:
        assert [s["id"] for s in c.sessions()] == [a, b, gone + 1]
        assert c.session(b)["layer"] == 5


def test_a_stop_ends_a_long_generate_at_its_next_token_and_the_tokens_it_made_come_back(make_daemon):
    """SIGTERM does not wait for a generate of 3000 tokens: it ends with `stopping` at its next token,
    and the session keeps (and the next start restores) what it made."""
    import threading
    import time

    from djinnd import DjinnError
    d = make_daemon("--device", "cpu")
    errors = []
    with d.client() as c:
        sid = c.create_session(prompt="The capital of France is")

        def long_generate():
            try:
                with d.client() as cc:
                    cc.generate(sid, 3000)  # (its context holds 4096)
            except DjinnError as e:
                errors.append(e)

        t = threading.Thread(target=long_generate)
        t.start()
        deadline = time.monotonic() + 60
        while len(c.session(sid)["tokens"]) < 5:
            assert time.monotonic() < deadline and t.is_alive(), errors
            time.sleep(0.05)
    assert d.stop() == 0
    t.join(60)
    assert [e.code for e in errors] == ["stopping"] and "which it keeps" in errors[0].message
    d2 = make_daemon("--device", "cpu", folder=d.folder)
    with d2.client() as c:
        made = c.session(sid)["tokens"]
        assert 5 <= len(made) < 3000
        ref = c.create_session(prompt="The capital of France is")
        assert c.generate(ref, len(made)) == made


def test_fresh_starts_empty_and_state_dir_holds_the_journal(make_daemon, tmp_path):
    state_dir = tmp_path / "state"
    d = make_daemon("--device", "cpu", "--state-dir", str(state_dir))
    with d.client() as c:
        c.generate(c.create_session(token_ids=[3, 4, 5]), 1)
    journal = state_dir / "djinnd.journal.sqlite"
    assert journal.exists() and not paths.journal(d.socket).exists()
    d.stop()
    d2 = make_daemon("--device", "cpu", "--state-dir", str(state_dir), "--fresh", folder=d.folder)
    with d2.client() as c:
        assert c.sessions() == []
        assert c.create_session(token_ids=[1]) == 1
    assert "removed (--fresh)" in d2.output()


def journal_errors(d) -> list[str]:
    return [ln for ln in d.output().splitlines() if "ERROR" in ln and "journal" in ln]


def test_a_garbage_journal_is_one_log_line_and_the_daemon_serves(make_daemon):
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        c.create_session(token_ids=[3, 4, 5])
    d.stop()
    journal = paths.journal(d.socket)
    journal.write_bytes(os.urandom(8192))
    d2 = make_daemon("--device", "cpu", folder=d.folder)
    with d2.client() as c:
        assert c.sessions() == []
        sid = c.create_session(token_ids=[3, 4, 5])
        assert len(c.generate(sid, 2)) == 2
    [line] = journal_errors(d2)
    assert str(journal) in line and "not a database" in line
    assert journal.with_name(journal.name + ".bad").exists()
    # the fresh journal it wrote works: the session made since comes back
    d2.stop()
    d3 = make_daemon("--device", "cpu", folder=d.folder)
    with d3.client() as c:
        assert [s["id"] for s in c.sessions()] == [sid]
    assert journal_errors(d3) == [line]  # (the same log file): nothing new


def test_a_truncated_journal_restores_what_it_can_read(make_daemon):
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        for i in range(40):  # enough rows and tokens for several pages
            c.generate(c.create_session(token_ids=list(range(3, 200 + i))), 1)
        before = {s["id"]: s["tokens"] for s in c.sessions()}
    d.stop()  # a clean stop checkpoints the WAL: the data is all in the file
    journal = paths.journal(d.socket)
    size = journal.stat().st_size
    assert size > 4 * 4096
    with open(journal, "r+b") as f:
        f.truncate(size // 2)
    d2 = make_daemon("--device", "cpu", folder=d.folder)
    with d2.client() as c:
        got = {s["id"]: s["tokens"] for s in c.sessions()}
        assert 0 < len(got) < len(before)
        assert all(before[sid] == toks for sid, toks in got.items())  # each whole, or not at all
        assert len(c.generate(c.create_session(token_ids=[3]), 1)) == 1
    [line] = journal_errors(d2)
    assert str(journal) in line and "truncated" in line and f"restoring the {len(got)} session(s)" in line


def test_journal_writes_are_per_request_not_per_token(make_daemon):
    """A generate of many tokens is one journal write: its tokens go in as one chunk."""
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        sid = c.create_session(token_ids=[3, 4, 5])
        c.generate(sid, 20)
        c.generate(sid, 1)
    db = sqlite3.connect(paths.journal(d.socket))
    rows = db.execute("SELECT start, length(ids) FROM tokens WHERE session = ? ORDER BY start", (sid,)).fetchall()
    assert rows == [(0, 20 * 4), (20, 4)]
    db.close()


# no host pool and room for ~3 sessions' KV beside the weights: the others' swap out to disk files
ON_DISK = ("--device", "cpu", "--vram-budget", str(6_333_056 + 1_200_000), "--host-pool", "0")


def on_disk(c, n=6) -> dict:
    """`n` idle sessions, of which the coldest are swapped out to disk files: {id: its tokens}."""
    rng = random.Random(11)
    for _ in range(n):
        sid = c.create_session(token_ids=[rng.randrange(3, 500) for _ in range(40)])
        c.generate(sid, 2)
    return {s["id"]: s["tokens"] for s in c.sessions()}


def swap_files(d) -> dict:
    """Each swap file in the daemon's disk tier by session id: (its path, its bytes)."""
    spill = paths.spill(d.socket)
    files = sorted(spill.glob("session-*-*.swap")) if spill.exists() else []
    return {int(p.name.split("-")[1]): (p, p.read_bytes()) for p in files}


def test_after_kill_9_idle_sessions_take_their_kv_back_from_the_disk_tier_bit_for_bit(make_daemon):
    """A start takes back the swap files of idle sessions the journal names (checksum and size
    checked): the KV comes back as it was, not computed again; a damaged file is computed again."""
    ref = make_daemon(*ON_DISK)
    with ref.client() as r:
        on_disk(r)
    d = make_daemon(*ON_DISK)
    with d.client() as c:
        tokens = on_disk(c)
        where = {s["id"]: s["location"] for s in c.sessions()}
    files = swap_files(d)
    assert sorted(files) == sorted(sid for sid, loc in where.items() if loc == "disk") and len(files) >= 3, where
    damaged, *kept = sorted(files)
    path, data = files[damaged]
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit flipped
    d.proc.kill()
    d.proc.wait()

    again = make_daemon(*ON_DISK, folder=d.folder)
    with again.client() as c, ref.client() as r:
        infos = {s["id"]: s for s in c.sessions()}
        assert {sid: s["tokens"] for sid, s in infos.items()} == tokens
        assert sorted(sid for sid, s in infos.items() if s["location"] == "disk") == kept
        assert all(infos[sid]["disk_bytes"] == len(files[sid][1]) for sid in kept)
        assert c.status()["memory"]["disk_bytes"] == sum(len(files[sid][1]) for sid in kept)
        for sid in kept:  # the KV it holds is the file's, byte for byte (its first seq_len positions)
            head, kv = (paths.moves(again.socket) / c.export_session(sid)["file"]).read_bytes().split(b"\n", 1)
            head = json.loads(head)
            n, capacity = head["kv"]["seq_len"], head["kv"]["capacity"]
            slab = np.frombuffer(files[sid][1], np.uint8).reshape(*head["kv"]["shape"][:4], capacity, -1)
            assert slab[..., :n, :].tobytes() == kv
        sids = sorted(tokens)
        assert {sid: c.generate(sid, 4) for sid in sids} == {sid: r.generate(sid, 4) for sid in sids}
        for sid in sids:
            c.close(sid)
    out = again.output()
    assert f"restored 6 sessions (0 paused, {len(kept)} with their KV in the disk tier)" in out
    assert f"swap file {path} not taken back (its checksum does not match)" in out
    assert swap_files(again) == {}  # the damaged file went with the sweep, the others with their sessions


def test_a_stop_leaves_idle_sessions_swap_files_for_the_next_start_and_no_file_outlives_its_session(make_daemon):
    d = make_daemon(*ON_DISK)
    with d.client() as c:
        tokens = on_disk(c)
        c.run_to(max(tokens), layer=3)  # paused: its file (if any) is not taken back; it is paused again
        where = {s["id"]: s["location"] for s in c.sessions()}
    files = swap_files(d)
    assert d.stop() == 0
    idle = sorted(sid for sid in files if sid != max(tokens))
    assert idle and sorted(swap_files(d)) == idle  # the paused one's went at the stop
    assert {sid: data for sid, (_, data) in swap_files(d).items()} == {sid: files[sid][1] for sid in idle}, where

    again = make_daemon(*ON_DISK, folder=d.folder)
    with again.client() as c:
        assert sorted(s["id"] for s in c.sessions() if s["location"] == "disk") == idle
        assert {s["id"]: s["tokens"] for s in c.sessions()} == tokens
        assert c.session(max(tokens))["state"] == "paused"
    assert again.stop() == 0
    third = make_daemon(*ON_DISK, "--fresh", folder=d.folder)
    assert swap_files(third) == {}  # --fresh: no session, so no file of one


def test_a_patched_forward_that_finished_is_redone_with_its_patches_after_kill_9(make_daemon):
    """An idle session's KV that a patched forward built holds the patch: computed again at a restart,
    it is computed with it (the forwards as they ran, each patch at its layer)."""
    def drive(c) -> list[int]:
        done = []
        for seed in (1, 2):
            rng = random.Random(seed)
            sid = c.create_session(token_ids=[rng.randrange(3, 500) for _ in range(16)])
            c.generate(sid, 2)
            c.run_to(sid, layers=[2, 5])
            c.patch(sid, scale=-1.0, channels=list(range(0, 64, 2)))
            c.resume(sid)
            c.patch(sid, set=0.5, positions=[0])
            c.resume(sid)  # idle: the patched forward's token made, its KV holds the patches
            c.generate(sid, 2)
            done.append(sid)
        return done

    ref = make_daemon("--device", "cpu")
    with ref.client() as r:
        sids = drive(r)
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        assert drive(c) == sids
        tokens = {sid: c.session(sid)["tokens"] for sid in sids}
    d.proc.kill()
    d.proc.wait()
    again = make_daemon("--device", "cpu", folder=d.folder)
    with again.client() as c, ref.client() as r:
        assert {sid: c.session(sid)["tokens"] for sid in sids} == tokens
        assert {sid: c.generate(sid, 6) for sid in sids} == {sid: r.generate(sid, 6) for sid in sids}
    again.proc.kill()  # and again: the forwards run again were journaled with their patches too
    again.proc.wait()
    third = make_daemon("--device", "cpu", folder=d.folder)
    with third.client() as c, ref.client() as r:
        assert {sid: c.generate(sid, 3) for sid in sids} == {sid: r.generate(sid, 3) for sid in sids}
