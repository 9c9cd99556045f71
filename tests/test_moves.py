"""Moving a session between daemons (session.export, session.import; djinnd/moves.py), over real
daemons and the real socket: the importer holds the exporter's tokens and KV bytes, and goes on
with the exporter's tokens."""

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest

from djinnd import DjinnError, paths

WEIGHTS = 6_333_056  # tiny-llama's, on the CPU in fp32


def split(path) -> tuple[dict, bytes]:
    """A session file's header and KV section."""
    data = Path(path).read_bytes()
    head, kv = data.split(b"\n", 1)
    return json.loads(head), kv


def mode(path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def refused(call, code: str) -> str:
    with pytest.raises(DjinnError) as e:
        call()
    assert e.value.code == code, e.value
    assert "\n" not in e.value.message
    return e.value.message


@pytest.mark.slow
def test_an_exported_session_goes_on_in_another_daemon_with_the_same_tokens_and_kv_bytes(make_daemon, tmp_path):
    a = make_daemon("--device", "cpu", "--state-dir", str(tmp_path / "state"))
    b = make_daemon("--device", "cpu")
    with a.client() as ca, b.client() as cb:
        moves_a, moves_b = Path(ca.status()["moves_dir"]), Path(cb.status()["moves_dir"])
        assert moves_a == tmp_path / "state" / "moves" and moves_b == paths.moves(b.socket)
        assert mode(moves_a) == mode(moves_b) == 0o700  # made at start, before any export

        sid = ca.create_session(prompt="The capital of France is")
        ca.generate(sid, 5)
        before = ca.session(sid)
        out = ca.export_session(sid)
        path = Path(out["path"])
        assert path.parent == moves_a and path.name == out["file"] and out["file"].startswith(f"session-{sid}-")
        assert out["file"].endswith(".djs") and out["bytes"] == path.stat().st_size and mode(path) == 0o600
        head, kv = split(path)
        assert out["sha256"] == head["kv"]["sha256"] == hashlib.sha256(kv).hexdigest()
        assert head["model"] == "tiny-llama" and head["qos"] == "interactive" and head["phase"] == "COMPUTE"
        assert head["prompt"] == before["prompt_ids"] and head["generated"] == before["tokens"]
        assert head["pending"] == before["tokens"][-1:] and head["kv"]["seq_len"] == before["seq_len"]
        assert len(kv) == head["kv"]["bytes"] > 0 and kv.strip(b"\0")
        assert ca.session(sid) == before  # the session stays as it was

        shutil.copy(path, moves_b)
        new = cb.import_session(out["file"])
        assert not (moves_b / out["file"]).exists()  # taken in
        got = cb.session(new)
        for k in ("prompt_ids", "tokens", "seq_len", "qos", "phase", "state", "location"):
            assert got[k] == before[k], k
        again = Path(cb.export_session(new)["path"])
        head_b, kv_b = split(again)
        assert kv_b == kv and head_b["kv"]["sha256"] == head["kv"]["sha256"]  # byte for byte
        assert head_b == head
        again.unlink()

        assert ca.generate(sid, 8) == cb.generate(new, 8)
        after_a, after_b = split(ca.export_session(sid)["path"]), split(cb.export_session(new)["path"])
        assert after_a == after_b  # and the KV the eight tokens made, bit for bit

        # the file of a session that has not computed yet (no KV), imported with a QoS of its own
        fresh = ca.create_session(token_ids=[5, 6, 7], qos="batch")
        f = ca.export_session(fresh)
        assert split(f["path"])[1] == b""
        shutil.copy(f["path"], moves_b)
        other = cb.import_session(f["file"], qos="realtime")
        assert cb.session(other)["qos"] == "realtime" and cb.session(other)["seq_len"] == 0
        assert ca.generate(fresh, 3) == cb.generate(other, 3)

    # journaled like any new session: a restart of B brings it back
    assert b.stop() == 0
    b2 = make_daemon("--device", "cpu", folder=b.folder)
    with b2.client() as cb:
        assert {s["id"] for s in cb.sessions()} >= {new, other}
        assert cb.session(new)["tokens"] == after_a[0]["generated"] and cb.session(new)["restored"]
        restored = split(cb.export_session(new)["path"])  # its KV computed again first, as its next forward would
        assert restored[0]["generated"] == after_a[0]["generated"]
        assert restored[0]["kv"]["seq_len"] == after_a[0]["kv"]["seq_len"] and len(restored[1]) == len(after_a[1])


@pytest.mark.parametrize("pool, tier", [("64MiB", "host"), ("0", "disk")])
def test_a_swapped_out_session_exports_the_bytes_it_had_resident(make_daemon, pool, tier):
    d = make_daemon("--device", "cpu", "--vram-budget", str(WEIGHTS + 3_000_000), "--host-pool", pool)
    with d.client() as c:
        sid = c.create_session(token_ids=list(range(3, 40)))
        c.generate(sid, 5)
        resident = c.export_session(sid)
        budget = c.status()["memory"]["budget_bytes"]
        c.set_budget(WEIGHTS + 1000)  # nothing fits beside the weights: out to the host pool (or disk without one)
        assert c.session(sid)["location"] == tier
        c.set_budget(budget)  # (it stays there until asked for)
        before = c.session(sid)
        assert before["location"] == tier
        swapped = c.export_session(sid)
        assert split(swapped["path"]) == split(resident["path"]) and swapped["sha256"] == resident["sha256"]
        after = c.session(sid)
        where = ("location", "device_bytes", "host_bytes", "disk_bytes", "swaps", "last_swap_ms")
        assert {k: v for k, v in after.items() if k not in where} == {k: v for k, v in before.items() if k not in where}


def test_a_paused_session_is_not_exported_and_stays_paused(make_daemon):
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        moves = Path(c.status()["moves_dir"])
        sid = c.create_session(token_ids=list(range(3, 20)))
        c.generate(sid, 2)
        c.run_to(sid, layer=2)
        before, hidden = c.session(sid), c.inspect(sid, positions=[0])
        message = refused(lambda: c.export_session(sid), "bad_state")
        assert f"session {sid}" in message and "paused" in message
        assert c.session(sid) == before and c.inspect(sid, positions=[0]) == hidden
        assert list(moves.iterdir()) == []
        refused(lambda: c.export_session(sid + 100), "unknown_session")
        while c.resume(sid) is None:
            pass
        assert c.export_session(sid)["file"]  # idle again: it goes


def test_bad_names_truncated_damaged_and_foreign_files_are_refused_and_change_nothing(make_daemon):
    a = make_daemon("--device", "cpu")
    b = make_daemon("--device", "cpu")
    q = make_daemon("--device", "cpu", "--model", "tiny-qwen2")
    with a.client() as ca, b.client() as cb, q.client() as cq:
        moves_b = Path(cb.status()["moves_dir"])
        src = ca.create_session(token_ids=list(range(3, 30)))
        ca.generate(src, 2)
        out = ca.export_session(src)
        data = Path(out["path"]).read_bytes()
        foreign = cq.export_session(cq.create_session(token_ids=list(range(3, 30))))
        kept = cb.create_session(token_ids=[4, 5, 6])
        cb.generate(kept, 2)
        outside = moves_b.parent / "outside.djs"
        shutil.copy(out["path"], outside)
        (moves_b / "link.djs").symlink_to(outside)
        (moves_b / "truncated.djs").write_bytes(data[:-10])
        (moves_b / "headless.djs").write_bytes(data[:20])
        damaged = bytearray(data)
        damaged[-3] ^= 0x01
        (moves_b / "damaged.djs").write_bytes(bytes(damaged))
        shutil.copy(foreign["path"], moves_b / "qwen.djs")
        listing = sorted(p.name for p in moves_b.iterdir())
        sessions = cb.sessions()

        cases = {"../outside.djs": "bare name", f"{moves_b}/truncated.djs": "bare name", "..": "bare name",
                 "no-such.djs": "no file", "link.djs": "", "truncated.djs": "truncated",
                 "headless.djs": "no header", "damaged.djs": "sha256", "qwen.djs": "tiny-qwen2"}
        for name, words in cases.items():
            message = refused(lambda: cb.import_session(name), "bad_params")
            assert words in message, (name, message)
        refused(lambda: cb.import_session(""), "bad_params")
        refused(lambda: cb.import_session("x.djs", qos="vip"), "bad_params")

        assert cb.sessions() == sessions and sorted(p.name for p in moves_b.iterdir()) == listing
        assert outside.exists()
        assert cb.create_session(token_ids=[1]) == kept + 1  # no id was taken

        # a good file that the budget cannot hold: out_of_budget, and the file stays for another try
        shutil.copy(out["path"], moves_b)
        budget = cb.status()["memory"]["budget_bytes"]
        cb.set_budget(WEIGHTS + 1000)
        refused(lambda: cb.import_session(out["file"]), "out_of_budget")
        assert [s["id"] for s in cb.sessions()] == [kept, kept + 1] and (moves_b / out["file"]).exists()
        cb.set_budget(budget)
        assert cb.import_session(out["file"]) == kept + 2
