"""Soak under faults: random clients against one daemon while its budget, tiers and process are shaken.

A private daemon (tiny-llama, `--device cpu`, a small host pool, the disk tier on a 4 MiB tmpfs when
this runs as root: the disk fills) serves `--clients` client threads. Each holds up to 3 sessions of
prompts from a fixed pool and, at random, creates, generates, runs to breakpoints, inspects,
patches, resumes, signals IO_WAIT / COMPUTE, closes, sends a request and disconnects before its
reply, or has a child process send one and be killed (SIGKILL) before the reply. Meanwhile the main
thread changes the budget every second or so (`memory.set_budget`, down to little more than the
weights: swaps to the host pool, demotions to disk, a full disk tier) and kills the daemon with
kill -9 `--restarts` times, starting it again on the same folder (the sessions come back from its
journal). In-flight requests at a kill are counted apart (`killed`); the clients then re-read their
sessions.

What must hold (the verdict): no reply with code `internal`, none outside out_of_budget, bad_state,
unknown_session, swap_failed, no request unanswered within 180 s while the daemon was up (the
daemon's own wait for room is 60 s); no token the daemon once answered is missing from its session
afterwards, and no session is gone that its client did not close; each session's tokens equal the
reference (the same prompt's greedy tokens computed up front, one session at a time, without
pressure), except after a real patch (those sessions are only checked for lost tokens); identity
patches (scale 1.0, add 0.0) are checked like the others. A first differing token is accepted only
as a near-tie: a fresh session of the prompt and the agreed tokens, paused after the last layer, has
the two tokens as its lens's top two with logits within 1e-3 (batched decode rows and the prefill a
restart recomputes KV with differ from one session's steps in the last bits; a random tiny model has
near-ties). A generate whose reply nobody reads (abandoned, or its client killed) may still run after
its client has re-read the session idle, before the client's next request: its tokens then lie among
those the client was answered. The client's record counts them apart (at most the tokens it asked
for, and every token answered still there in order) and prints each session's recent history; a token
answered and then missing fails. The daemon never exits unless killed here. After every session is
closed, its fds and threads are back to the baseline (taken after a warm-up on the first daemon)
within 2, its RSS within +50 MiB (the end daemon is the one the last restart started; the events it
keeps in memory for events.since, the last 100,000 and at most 16 MiB of their JSON, are counted
from its event log and printed beside it), its host-pool and disk-tier bytes at 0 and the spill folder holds no swap file. The RPC
worker pool keeps its threads once started: baseline and end are both taken after the same burst of
concurrent requests, so the pool has the same size unless the soak outgrew it.

    python bench/soak.py [--minutes 30] [--clients 6] [--seed 1] [--restarts 2] [--host-pool 1MiB] [--tmpfs 4m]
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bench.common import load_line, machine_line  # noqa: E402
from djinnd import PrivateDaemon  # noqa: E402
from djinnd import paths, protocol  # noqa: E402
from djinnd.protocol import DjinnError  # noqa: E402
from djinnd.telemetry import KEEP_EVENT_BYTES, KEEP_EVENTS  # noqa: E402

ACCEPTED = {"out_of_budget", "bad_state", "unknown_session", "swap_failed"}
REQUEST_TIMEOUT = 180.0  # s: a request unanswered this long while the daemon is up is a hang
MAX_NEW = 40  # tokens a session generates at most; its reference has a few more
PROMPTS = 12
SESSIONS_PER_CLIENT = 3
NEAR_TIE = 1e-3  # logits closer than this may be tipped by the last bits
RSS_TOLERANCE = 50 << 20
COUNT_TOLERANCE = 2
MIB = 1 << 20
T0 = time.monotonic()  # the history of a session is timed from here

# a client killed with its request in flight: it sends the frame, says so, and waits to be killed
KILLED_CLIENT = ("import sys, zmq\ns = zmq.Context().socket(zmq.DEALER)\ns.connect(sys.argv[1])\n"
                 "s.send(sys.argv[2].encode())\nimport time\ntime.sleep(0.02)\nprint('sent', flush=True)\ntime.sleep(600)")


class Killed(Exception):
    """The daemon was killed (by the soak) while the request was in flight, or before it could go."""


@dataclass
class Tracked:
    """A session as its client knows it."""
    sid: int
    prompt: int
    confirmed: list = field(default_factory=list)  # the tokens the daemon answered, in order
    state: str = "idle"  # idle, paused, unknown (re-read it first)
    patched: bool = False  # a real patch: its tokens are not the reference's
    closing: bool = False  # a close was sent: it may be gone
    synced: int = 0  # how many of `confirmed` were read from the daemon (session.get); the rest are replies
    durable: int = 0  # how many of `confirmed` a reply to its client's own request held: journaled before it
    epoch: int = 0  # the soak's epoch (kill -9 count) when the session was last read
    maybe: int = 0  # tokens its abandoned or killed generates may still make: their replies nobody reads
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10))

    def note(self, what: str) -> None:
        self.history.append(f"{time.monotonic() - T0:.3f} {what}")


class Soak:
    def __init__(self, a, folder: Path, spill: Path):
        self.a, self.folder, self.spill = a, folder, spill
        self.rng = random.Random(a.seed)
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (method, outcome)
        self.slowest = collections.defaultdict(float)  # outcome -> slowest answer, s
        self.examples = {}  # outcome -> a message
        self.bad: list[str] = []  # what makes the verdict FAIL
        self.epoch = 0  # bumped at each kill
        self.serving = threading.Event()
        self.stop = threading.Event()
        self.daemon: PrivateDaemon | None = None
        self.args = ("--device", "cpu", "--host-pool", a.host_pool, "--spill-dir", str(spill))
        self.sessions = collections.Counter()  # exact, near_tie, patched, lost_tokens, ...
        self.divergent: list = []  # (prompt index, tokens, first differing index)
        self.incarnations: list[dict] = []  # swap figures of each daemon, last read
        self.restarts: list[str] = []
        self.died = 0
        self.peak = collections.Counter()  # host_bytes, disk_bytes seen at most
        self.full = 0  # errors that name a full disk tier
        self.unread: list[str] = []  # sessions holding tokens of an abandoned request made after a re-read
        self.undone: list[str] = []  # sessions whose tokens read from an abandoned request a kill -9 undid

    # -- bookkeeping ---------------------------------------------------------------------------------
    def count(self, method: str, outcome: str, dt: float = 0.0, message: str = "") -> None:
        with self.lock:
            self.counts[method, outcome] += 1
            self.slowest[outcome] = max(self.slowest[outcome], dt)
            self.full += "is full" in message
            if message and outcome not in self.examples:
                self.examples[outcome] = f"{method}: {message}"
            if outcome not in ACCEPTED | {"ok", "sent", "killed", "abandoned", "client_killed"}:
                self.bad.append(f"{method} answered {outcome}: {message}")

    def fail(self, why: str) -> None:
        with self.lock:
            self.bad.append(why)

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    # -- the daemon ----------------------------------------------------------------------------------
    def start_daemon(self) -> float:
        t0 = time.monotonic()
        self.daemon = PrivateDaemon(*self.args, folder=self.folder).start()
        self.incarnations.append({})
        self.serving.set()
        return time.monotonic() - t0

    def kill_and_restart(self, why: str = "kill -9") -> None:
        self.serving.clear()
        with self.lock:
            self.epoch += 1
        if why == "kill -9":
            self.daemon.proc.kill()
        self.daemon.proc.wait()
        took = self.start_daemon()
        restored = [ln.split(": ", 1)[-1] for ln in self.daemon.output().splitlines() if "restored " in ln]
        self.restarts.append(f"{why}, serving again in {took:.1f} s: {restored[-1] if restored else 'no restore line'}")


class Conn:
    """A client connection (the wire as djinnd.Client speaks it) whose wait notices the soak's kills."""

    def __init__(self, soak: Soak):
        self.soak, self.sock = soak, None
        self.epoch = 0  # the epoch of the daemon that answered the last request

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def _open(self):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.connect(paths.endpoint(self.soak.socket))
        return s

    def call(self, method: str, wait: bool = True, **params):
        soak = self.soak
        soak.serving.wait()
        epoch = soak.epoch
        if self.sock is None:
            self.sock = self._open()
        rid = f"soak-{random.getrandbits(48):x}"
        t0 = time.monotonic()
        frame = protocol.request(rid, method, params)
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            if not self.sock.poll(5000, zmq.POLLOUT):
                self.close()
                if soak.epoch != epoch or not soak.serving.is_set():
                    soak.count(method, "killed")
                    raise Killed() from None
                soak.count(method, "no_daemon", time.monotonic() - t0, "the socket did not take the request")
                raise DjinnError("no_daemon", "the socket did not take the request") from None
            self.sock.send(frame)
        if not wait:
            soak.count(method, "sent")
            return None
        while True:
            if self.sock.poll(200):
                msg = json.loads(self.sock.recv())
                if msg.get("id") != rid:
                    continue  # a reply to a request sent without waiting
                dt = time.monotonic() - t0
                self.epoch = epoch
                if msg.get("ok"):
                    soak.count(method, "ok", dt)
                    return msg.get("result")
                err = msg.get("error") or {}
                code, message = err.get("code", "?"), err.get("message", "")
                soak.count(method, code, dt, message)
                raise DjinnError(code, message)
            if soak.epoch != epoch:
                self.close()
                soak.count(method, "killed")
                raise Killed()
            if time.monotonic() - t0 > REQUEST_TIMEOUT:
                self.close()
                soak.count(method, "timeout", REQUEST_TIMEOUT, f"no reply within {REQUEST_TIMEOUT:.0f} s")
                raise DjinnError("timeout", "no reply")

    def abandon(self, method: str, **params) -> None:
        """Send a request on a connection of its own and disconnect before the reply."""
        self.soak.serving.wait()
        s = self._open()
        try:
            if not s.poll(5000, zmq.POLLOUT):
                return
            s.send(protocol.request(f"gone-{random.getrandbits(32):x}", method, params), zmq.NOBLOCK)
            self.soak.count(method, "abandoned")
            time.sleep(random.random() * 0.05)
        except zmq.Again:
            pass
        finally:
            s.close(0)

    def killed_client(self, method: str, **params) -> None:
        """A child process sends the request and is killed (SIGKILL) before its reply."""
        self.soak.serving.wait()
        frame = protocol.request(f"killed-{random.getrandbits(32):x}", method, params).decode()
        child = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, paths.endpoint(self.soak.socket), frame],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            child.stdout.readline()
            time.sleep(random.random() * 0.1)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        self.soak.count(method, "client_killed")


class Client(threading.Thread):
    """One random client: up to SESSIONS_PER_CLIENT sessions, a random request on one of them at a time."""

    def __init__(self, soak: Soak, n: int, info: dict):
        super().__init__(name=f"soak-client-{n}", daemon=True)
        self.soak, self.rng, self.info = soak, random.Random(soak.a.seed * 1000 + n), info
        self.conn = Conn(soak)
        self.tracked: list[Tracked] = []
        self.layers = info["num_layers"]

    def run(self) -> None:
        try:
            while not self.soak.stop.is_set():
                try:
                    self.step()
                except Killed:
                    for t in self.tracked:
                        t.state = "unknown"
                except DjinnError:
                    pass  # counted by Conn; the session is re-read before its next request
        except Exception as e:  # noqa: BLE001 - a bug of the soak itself: it fails the verdict
            self.soak.fail(f"{self.name} stopped: {e!r}")

    def step(self) -> None:
        soak, rng = self.soak, self.rng
        if len(self.tracked) < SESSIONS_PER_CLIENT and (not self.tracked or rng.random() < 0.3):
            p = rng.randrange(PROMPTS)
            sid = self.conn.call("session.create", token_ids=soak.prompts[p],
                                 qos=rng.choice(("interactive", "interactive", "batch", "realtime")))["id"]
            self.tracked.append(Tracked(sid, p, epoch=self.conn.epoch))
            return
        t = rng.choice(self.tracked)
        if t.state == "unknown" and not self.resync(t):
            time.sleep(0.05)
            return
        if t not in self.tracked:
            return
        if t.state == "paused":
            return self.paused(t)
        n = len(t.confirmed)
        r = rng.random()
        if n >= MAX_NEW or r < 0.03:
            return self.finish(t)
        try:
            if r < 0.40:
                k = rng.randint(1, min(4, MAX_NEW - n))
                t.note(f"generate {k} sent")
                got = self.conn.call("session.generate", session=t.sid, max_new_tokens=k)["tokens"]
                t.note(f"generate answered {got}")
                t.confirmed += got
                t.durable = len(t.confirmed)
            elif r < 0.62:
                layers = sorted(rng.sample(range(self.layers), rng.choice((1, 1, 2))))
                out = self.conn.call("session.run_to", session=t.sid, layers=layers)
                t.note(f"run_to {layers} answered {out['state']}")
                t.state = "paused" if out["state"] == "paused" else "unknown"
            elif r < 0.78:
                if rng.random() < 0.6:
                    self.conn.call("session.signal_phase", session=t.sid, phase="IO_WAIT",
                                   expected_ms=rng.choice((20, 100, 300, 2000)))
                else:
                    self.conn.call("session.signal_phase", session=t.sid, phase="COMPUTE", wait=rng.random() < 0.5)
            elif r < 0.86:
                self.conn.call("session.get", session=t.sid)
            elif r < 0.95:
                k = rng.randint(1, min(3, MAX_NEW - n))
                if rng.random() < 0.5:
                    t.maybe += k
                    t.note(f"generate {k} sent and abandoned")
                    self.conn.abandon("session.generate", session=t.sid, max_new_tokens=k)
                else:
                    t.note("run_to sent and abandoned")
                    self.conn.abandon("session.run_to", session=t.sid, layers=[rng.randrange(self.layers)])
                t.state = "unknown"
            else:
                k = rng.randint(1, min(3, MAX_NEW - n))
                t.maybe += k
                t.note(f"generate {k} sent by a child process, killed")
                self.conn.killed_client("session.generate", session=t.sid, max_new_tokens=k)
                t.state = "unknown"
        except DjinnError as e:
            t.note(f"answered {e.code}")
            t.state = "unknown"
            raise
        except Killed:
            t.note("in flight at a kill -9")
            t.state = "unknown"
            raise

    def paused(self, t: Tracked) -> None:
        rng = self.rng
        try:
            r = rng.random()
            if r < 0.25:
                self.conn.call("session.inspect", session=t.sid, **({"positions": [0, -1], "channels": [0, 1]}
                                                                  if rng.random() < 0.5 else {}))
            elif r < 0.40:
                op, value = rng.choice((("scale", 1.0), ("add", 0.0)))  # identity: the tokens stay the reference's
                self.conn.call("session.patch", session=t.sid, op=op, value=value)
            elif r < 0.45:
                t.patched = True  # before the reply: a patch in flight at a kill may still count
                self.conn.call("session.patch", session=t.sid, op="scale", value=0.9, channels=[0, 1, 2])
            elif r < 0.55:
                self.conn.call("session.signal_phase", session=t.sid, phase="IO_WAIT", expected_ms=rng.choice((50, 500)))
            else:
                out = self.conn.call("session.resume", session=t.sid)
                t.note(f"resume answered {out['state']} {out.get('token')}")
                if out["state"] == "idle":
                    t.confirmed.append(out["token"])
                    t.durable = len(t.confirmed)
                    t.state = "idle"
        except (DjinnError, Killed):
            t.state = "unknown"
            raise

    def resync(self, t: Tracked) -> bool:
        """Re-read `t` from the daemon: whether it is settled (idle or paused, or gone as it should be)."""
        try:
            info = self.conn.call("session.get", session=t.sid)
        except DjinnError as e:
            if e.code == "unknown_session":
                if not t.closing:
                    self.soak.fail(f"session {t.sid} is gone, its client never closed it: {e.message}")
                    self.soak.sessions["lost_sessions"] += 1
                self.tracked.remove(t)
                return True
            return False
        tokens = info["tokens"]
        t.note(f"get: {info['state']}, {len(tokens)} tokens")
        killed, t.epoch = t.epoch != self.conn.epoch, self.conn.epoch
        gone = len(t.confirmed) - t.durable
        if (tokens[:len(t.confirmed)] != t.confirmed and killed and 0 < gone <= t.maybe
                and tokens[:t.durable] == t.confirmed[:t.durable]):
            # a kill -9 since it was last read: tokens it read then, past the last its client was answered,
            # may be those of an abandoned generate in flight at the kill, which the restart undid (README:
            # a request in flight at a kill is lost, its session comes back as it was before it)
            t.maybe -= gone
            with self.soak.lock:
                self.soak.sessions["undone_tokens"] += gone
                self.soak.undone.append(f"session {t.sid}: had {t.confirmed} ({t.durable} of them in replies to its "
                                        f"client), now {tokens}; its history: {' | '.join(t.history)}")
            t.confirmed, t.synced = t.confirmed[:t.durable], t.durable
        if tokens[:len(t.confirmed)] != t.confirmed:
            extra = unread(t, tokens)
            if extra is None:
                self.soak.fail(f"session {t.sid}: tokens answered before are gone: had {t.confirmed} ({t.synced} of them "
                               f"read from the daemon), now {tokens}; its history: {' | '.join(t.history)}")
                self.soak.sessions["lost_tokens"] += 1
            else:
                t.maybe -= extra
                with self.soak.lock:
                    self.soak.sessions["unread_tokens"] += extra
                    self.soak.unread.append(f"session {t.sid}: had {t.confirmed} ({t.synced} of them read from the "
                                            f"daemon), now {tokens}; its history: {' | '.join(t.history)}")
        t.confirmed, t.synced = list(tokens), len(tokens)
        t.durable = min(t.durable, len(tokens))
        t.closing = False  # a close in flight at a kill was lost
        if info["state"] == "running":
            return False
        t.state = info["state"]
        return True

    def finish(self, t: Tracked, verify: bool = True) -> None:
        """Check its tokens against the reference, then close it."""
        if verify:
            if not self.resync(t) or t not in self.tracked:
                return
            self.soak.check(t)
        t.closing = True
        try:
            self.conn.call("session.close", session=t.sid)
        except DjinnError as e:
            if e.code != "unknown_session":
                t.closing = False
                t.state = "unknown"
                raise
        self.tracked.remove(t)


def unread(t: Tracked, tokens: list) -> int | None:
    """How many tokens the daemon holds among those its client was answered since it last read the
    session, when those can only be tokens of its abandoned or killed generates: everything read
    before is there as it was, every token answered since is there in order, and there are at most
    `t.maybe` others (a generate whose reply nobody read may run after the client read the session
    idle, before its next request). None when that does not explain them: a token lost."""
    if tokens[:t.synced] != t.confirmed[:t.synced]:
        return None
    rest, i = tokens[t.synced:], 0
    for tok in t.confirmed[t.synced:]:  # the earliest match leaves the fewest others before the last
        while i < len(rest) and rest[i] != tok:
            i += 1
        if i == len(rest):
            return None
        i += 1
    extra = i - (len(t.confirmed) - t.synced)
    return extra if extra <= t.maybe else None


def check(soak: Soak, t: Tracked) -> None:
    if t.patched:
        soak.sessions["patched"] += 1
        return
    ref = soak.refs[t.prompt]
    got = t.confirmed[:len(ref)]
    if got == ref[:len(got)]:
        soak.sessions["exact"] += 1
        return
    i = next(i for i, (x, y) in enumerate(zip(got, ref)) if x != y)
    soak.divergent.append((t.prompt, got, i))


Soak.check = check


def resources(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kinds = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if ":[" in target else re.sub(r"events-[^/]*\.jsonl$", "events-*.jsonl", target)] += 1
    return {"fds": sum(kinds.values()), "fd_kinds": kinds, "rss": int(status["VmRSS"].split()[0]) * 1024,
            "threads": int(status["Threads"]), "rss_by": rss_by_mapping(pid)}


def rss_by_mapping(pid: int) -> dict:
    """RSS by kind of mapping (/proc/PID/smaps): the C heap (brk), anonymous mappings (malloc's other
    arenas and large blocks, thread stacks, pymalloc's arenas), files (libraries, weights), the rest."""
    out, kind = collections.Counter(), "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            name = head[5].strip() if len(head) > 5 else ""
            kind = "heap" if name == "[heap]" else "anon" if not name else "file" if name.startswith("/") else "other"
        elif line.startswith("Rss:"):
            out[kind] += int(line.split()[1]) * 1024
    return dict(out)


def burst(soak: Soak, n: int, prompt: list) -> None:
    """n concurrent slow requests (create, generate 8), so the RPC pool has at least n threads."""
    def one():
        c = Conn(soak)
        try:
            sid = c.call("session.create", token_ids=prompt)["id"]
            c.call("session.generate", session=sid, max_new_tokens=8)
            c.call("session.close", session=sid)
        finally:
            c.close()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def figures(soak: Soak, conn: Conn, trim: int | None = None) -> dict:
    """The daemon's resources; with `trim`, after a moment's budget of `trim` bytes, which trims the
    memory it keeps from swap-outs for the next swap-in (spares.py, bounded by the budget's room)."""
    if trim is not None:
        high = conn.call("status")["memory"]["budget_bytes"]
        conn.call("memory.set_budget", budget=trim)
        conn.call("memory.set_budget", budget=high)
    st = conn.call("status")
    return {**resources(st["pid"]), "pid": st["pid"], "sessions": st["sessions"],
            "host_bytes": st["memory"]["host_bytes"], "disk_bytes": st["memory"]["disk_bytes"],
            "spare_bytes": st["memory"]["spare_bytes"],
            "spill_files": len([p for p in soak.spill.glob("*.swap")]) if soak.spill.exists() else 0}


def events_kept(soak: Soak, pid: int) -> tuple[int, int, int]:
    """The events other than `vram` samples that daemon `pid` keeps in memory for events.since, and the
    bytes of their JSON, from its event log (the same JSON, a line each): the last KEEP_EVENTS, at most
    KEEP_EVENT_BYTES of JSON (telemetry.EventBus). They are part of its RSS: their JSON and ~40 B each.
    Also how many `error` events it emitted in all."""
    kept, nbytes, errors = collections.deque(), 0, 0
    for path in sorted((soak.folder / "logs" / "daemon").glob(f"events-*-{pid}.jsonl*"), key=_log_part):
        with open(path, "rb") as f:
            for line in f:
                if b'"type":"vram"' in line:
                    continue
                errors += b'"type":"error"' in line
                kept.append(len(line) - 1)
                nbytes += kept[-1]
                while len(kept) > KEEP_EVENTS or (nbytes > KEEP_EVENT_BYTES and len(kept) > 1):
                    nbytes -= kept.popleft()
    return len(kept), nbytes, errors


def _log_part(path: Path) -> int:
    """events-....jsonl, then .jsonl.1, .jsonl.2, ...: the order they were written."""
    tail = path.name.rsplit(".jsonl", 1)[1]
    return int(tail[1:]) if tail else 0


def mount_tmpfs(folder: Path, size: str) -> str | None:
    """None when mounted, else why not."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the clients run")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--restarts", type=int, default=2, help="kill -9 and start again on the same folder, this many times")
    ap.add_argument("--host-pool", default="1MiB", help="the daemon's host pool (0: straight to disk)")
    ap.add_argument("--tmpfs", default="4m", help="size of the tmpfs the disk tier is mounted on (root only)")
    a = ap.parse_args()
    random.seed(a.seed)
    print(machine_line())
    print(load_line())
    print(f"command: python bench/soak.py {' '.join(sys.argv[1:])}")
    folder = Path(tempfile.mkdtemp(prefix="djsoak", dir="/tmp"))
    spill = folder / "spill"
    why = mount_tmpfs(spill, a.tmpfs)
    mounted = why is None
    print(f"disk tier: {spill} " + (f"on a {a.tmpfs} tmpfs" if mounted else
                                    f"on the plain filesystem: the tmpfs could not be mounted ({why}); the disk tier does not fill"))
    soak = Soak(a, folder, spill)
    try:
        return run(soak, a)
    except Exception as e:  # noqa: BLE001 - the daemon would not start again, or the soak itself broke
        import traceback
        traceback.print_exc(file=sys.stdout)
        log = soak.daemon.output().splitlines()[-5:] if soak.daemon is not None else []
        print(f"verdict: FAIL (the soak could not go on: {e!r}; the daemon's log ends: {' | '.join(log)})")
        return 1
    finally:
        soak.stop.set()
        soak.serving.set()
        if soak.daemon is not None:
            try:
                soak.daemon.stop()
            except Exception:  # noqa: BLE001
                soak.daemon.proc.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(spill)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def run(soak: Soak, a) -> int:
    soak.start_daemon()
    conn = Conn(soak)
    st = conn.call("status")
    model = st["model"]
    weights, vocab = model["weights_bytes"], model["vocab_size"]
    rng = soak.rng
    soak.prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 60))] for _ in range(PROMPTS)]
    print(f"daemon: {model['name']} ({model['num_layers']} layers, {weights:,} B of weights, "
          f"{model['kv_bytes_per_token']:,} B of KV a token), args {' '.join(soak.args)}")
    print(f"{a.clients} clients, up to {SESSIONS_PER_CLIENT} sessions each, of {PROMPTS} prompts (4-60 tokens), "
          f"{MAX_NEW} tokens a session at most; {a.minutes:g} min; {a.restarts} kill -9 restarts; seed {a.seed}")

    # references: each prompt's greedy tokens, one session at a time, no pressure
    t0 = time.monotonic()
    soak.refs = []
    for p in soak.prompts:
        sid = conn.call("session.create", token_ids=p)["id"]
        soak.refs.append(conn.call("session.generate", session=sid, max_new_tokens=MAX_NEW + 4)["tokens"])
        conn.call("session.close", session=sid)
    # warm-up: swaps to the host pool and the disk tier, a pause, then the pool burst
    sids = [conn.call("session.create", token_ids=p)["id"] for p in soak.prompts[:4]]
    for s in sids:
        conn.call("session.generate", session=s, max_new_tokens=2)
    conn.call("memory.set_budget", budget=weights + 600 * 1024)
    for s in sids:
        conn.call("session.generate", session=s, max_new_tokens=1)
    conn.call("session.run_to", session=sids[0], layers=[1])
    conn.call("session.inspect", session=sids[0])
    conn.call("session.resume", session=sids[0])
    high = weights + 256 * MIB
    conn.call("memory.set_budget", budget=high)
    for s in sids:
        conn.call("session.close", session=s)
    pool = 2 * a.clients + 4
    burst(soak, pool, soak.prompts[0])
    time.sleep(0.5)
    base = figures(soak, conn, trim=weights + MIB)
    base["events"], base["event_bytes"], base["error_events"] = events_kept(soak, base["pid"])
    print(f"references and warm-up: {time.monotonic() - t0:.1f} s; baseline (pid {base['pid']}): {base['fds']} fds, "
          f"{base['rss'] / MIB:.1f} MiB RSS, {base['threads']} threads")

    budgets = [weights + k for k in (640 * 1024, 1536 * 1024, 3 * MIB, 16 * MIB, 256 * MIB)]
    clients = [Client(soak, n, model) for n in range(a.clients)]
    for c in clients:
        c.start()
    start = time.monotonic()
    duration = a.minutes * 60
    kills = [start + duration * (k + 1) / (a.restarts + 1) for k in range(a.restarts)]
    budget_changes = 0
    while time.monotonic() < start + duration:
        time.sleep(rng.uniform(0.3, 1.5))
        if soak.daemon.proc.poll() is not None:
            soak.died += 1
            tail = soak.daemon.output().splitlines()[-5:]
            soak.fail(f"the daemon exited on its own (code {soak.daemon.proc.returncode}): {' | '.join(tail)}")
            soak.kill_and_restart(why="died on its own")
            continue
        if kills and time.monotonic() >= kills[0]:
            kills.pop(0)
            soak.kill_and_restart()
            conn.close()
            continue
        try:
            conn.call("memory.set_budget", budget=rng.choice(budgets))
            budget_changes += 1
            st = conn.call("status")
            soak.incarnations[-1] = st["swap"]
            for k in ("host_bytes", "disk_bytes"):
                soak.peak[k] = max(soak.peak[k], st["memory"][k])
        except (DjinnError, Killed):
            conn.close()
    soak.stop.set()
    for c in clients:
        c.join(REQUEST_TIMEOUT + 30)
        if c.is_alive():
            soak.fail(f"{c.name} did not stop: a request hangs")
    soak.serving.set()

    # the end: every session settled, checked and closed with room to spare
    conn.call("memory.set_budget", budget=high)
    st = conn.call("status")
    soak.incarnations[-1] = st["swap"]
    closer = Client(soak, a.clients, model)
    closer.tracked = [t for c in clients for t in c.tracked]
    for t in list(closer.tracked):
        for _ in range(600):  # a forward a disconnected client left may still run
            if closer.resync(t):
                break
            time.sleep(0.1)
        else:
            soak.fail(f"session {t.sid} is still running 60 s after the last request")
        if t in closer.tracked:
            soak.check(t)
            closer.finish(t, verify=False)
    # a create in flight at a kill may have been journaled without its reply: an empty session no client knows
    left = conn.call("session.list")["sessions"]
    creates_killed = soak.counts["session.create", "killed"]
    orphans = [s for s in left if not s["tokens"]]
    if len(left) > len(orphans) or len(orphans) > creates_killed:
        soak.fail(f"sessions left that no client holds: {[(s['id'], len(s['tokens'])) for s in left]} "
                  f"({creates_killed} creates were in flight at a kill)")
    for s in left:
        conn.call("session.close", session=s["id"])

    # a first differing token must be a near-tie of a fresh, unpressured session
    last = model["num_layers"] - 1
    for p, got, i in soak.divergent:
        ref = soak.refs[p]
        sid = conn.call("session.create", token_ids=soak.prompts[p] + got[:i])["id"]
        conn.call("session.run_to", session=sid, layers=[last])
        top = conn.call("session.lens", session=sid, top_k=2)["top"]
        conn.call("session.close", session=sid)
        gap = abs(math.log(top[0]["prob"]) - math.log(top[1]["prob"]))
        if {top[0]["token"], top[1]["token"]} == {got[i], ref[i]} and gap < NEAR_TIE:
            soak.sessions["near_tie"] += 1
        else:
            soak.sessions["mismatch"] += 1
            soak.fail(f"prompt {p}: token {i} is {got[i]}, the reference's {ref[i]}; a fresh session's top two "
                      f"{[(x['token'], x['prob']) for x in top]} (logit gap {gap:.2e})")

    for c in [*clients, closer]:
        c.conn.close()  # the daemon's side of each connection is a socket of its own
    burst(soak, pool, soak.prompts[0])
    end = None
    for _ in range(100):  # settle: closed sessions' threads join, the disk tier's files go
        end = figures(soak, conn, trim=weights + MIB)
        if (end["sessions"] == 0 and end["threads"] <= base["threads"] + COUNT_TOLERANCE and end["host_bytes"] == 0
                and end["fds"] <= base["fds"] + COUNT_TOLERANCE
                and end["disk_bytes"] == 0 and end["spill_files"] == 0):
            break
        time.sleep(0.1)
    conn.close()
    end["events"], end["event_bytes"], end["error_events"] = events_kept(soak, end["pid"])
    log_lines = soak.daemon.output().splitlines()
    tracebacks = sum("Traceback" in ln for ln in log_lines)
    errors = [ln for ln in log_lines if " ERROR " in ln]

    # -- the summary ----------------------------------------------------------------------------
    print()
    print(f"ran {duration / 60:.1f} min: {budget_changes} budget changes, {len(soak.restarts)} restarts, "
          f"daemon exits on its own: {soak.died}")
    for r in soak.restarts:
        print(f"  restart: {r}")
    outcomes = sorted({o for _, o in soak.counts})
    methods = sorted({m for m, _ in soak.counts})
    w = max(map(len, methods)) + 2
    print("requests by method and outcome:")
    print("  " + "method".ljust(w) + "".join(o.rjust(15) for o in outcomes))
    for m in methods:
        print("  " + m.ljust(w) + "".join(str(soak.counts[m, o] or "").rjust(15) for o in outcomes))
    by_code = collections.Counter()
    for (_, o), n in soak.counts.items():
        if o not in ("ok", "sent", "abandoned", "client_killed", "killed"):
            by_code[o] += n
    print("errors by code: " + (", ".join(f"{k} {v} (slowest {soak.slowest[k]:.2f} s)" for k, v in by_code.most_common())
                                or "none"))
    for k, msg in sorted(soak.examples.items()):
        print(f"  e.g. {k}: {msg[:160]}")
    full = soak.full
    print(f"in flight at a kill: {sum(n for (_, o), n in soak.counts.items() if o == 'killed')}; "
          f"disconnected before the reply: {sum(n for (_, o), n in soak.counts.items() if o == 'abandoned')}; "
          f"clients killed with a request in flight: {sum(n for (_, o), n in soak.counts.items() if o == 'client_killed')}")
    swaps = collections.Counter()
    for inc in soak.incarnations:
        for k in ("swap_outs", "swap_ins", "demotions", "failures"):
            swaps[k] += inc.get(k, 0)
    print(f"swaps (all daemons): {swaps['swap_outs']} out, {swaps['swap_ins']} in, {swaps['demotions']} demoted to disk, "
          f"{swaps['failures']} failed; host pool at most {soak.peak['host_bytes'] / MIB:.2f} MiB of {a.host_pool}, "
          f"disk tier at most {soak.peak['disk_bytes'] / MIB:.2f} MiB" + (f" of {a.tmpfs}" if spill_mounted(soak) else "")
          + (f"; {full} errors named the disk tier full" if full else ""))
    checked = sum(soak.sessions[k] for k in ("exact", "near_tie", "mismatch"))
    print(f"sessions checked against the reference: {checked} (exact {soak.sessions['exact']}, near-tie "
          f"{soak.sessions['near_tie']}, mismatches {soak.sessions['mismatch']}); really patched, checked for lost tokens "
          f"only: {soak.sessions['patched']}; lost tokens: {soak.sessions['lost_tokens']}; lost sessions: "
          f"{soak.sessions['lost_sessions']}")
    print(f"tokens made by abandoned or killed generates after their client re-read the session idle (its record "
          f"missed them, nothing lost): {soak.sessions['unread_tokens']} in {len(soak.unread)} sessions")
    for u in soak.unread[:3]:
        print(f"  e.g. {u[:700]}")
    print(f"tokens read from the daemon while an abandoned or killed generate was in flight, undone by a kill -9 "
          f"(a request in flight at a kill is lost): {soak.sessions['undone_tokens']} in {len(soak.undone)} sessions")
    for u in soak.undone[:3]:
        print(f"  e.g. {u[:900]}")
    print(f"sessions left by creates in flight at a kill (closed): {len(orphans)}")
    print(f"daemon log: {tracebacks} tracebacks, {len(errors)} ERROR lines")
    for ln in errors[:5]:
        print(f"  {ln[:200]}")
    print(f"resources   baseline (pid {base['pid']})   end (pid {end['pid']})")
    print(f"  fds       {base['fds']:>10}   {end['fds']:>10}")
    print(f"  RSS MiB   {base['rss'] / MIB:>10.1f}   {end['rss'] / MIB:>10.1f}")
    for kind in ("heap", "anon", "file", "other"):
        print(f"   {kind:<8} {base['rss_by'].get(kind, 0) / MIB:>10.1f}   {end['rss_by'].get(kind, 0) / MIB:>10.1f}")
    print(f"  threads   {base['threads']:>10}   {end['threads']:>10}")
    print(f"  spare B   {base['spare_bytes']:>10}   {end['spare_bytes']:>10}   (kept from swap-outs, trimmed to 1 MiB first)")
    print(f"  host B    {base['host_bytes']:>10}   {end['host_bytes']:>10}")
    print(f"  disk B    {base['disk_bytes']:>10}   {end['disk_bytes']:>10}   (swap files left: {end['spill_files']})")
    print(f"  events    {base['events']:>10}   {end['events']:>10}   (kept in the daemon's memory for events.since: "
          f"the last {KEEP_EVENTS:,}, {KEEP_EVENT_BYTES / MIB:.0f} MiB of JSON at most)")
    print(f"  event MiB {base['event_bytes'] / MIB:>10.1f}   {end['event_bytes'] / MIB:>10.1f}   (their JSON; "
          f"error events the daemon emitted: {base['error_events']} -> {end['error_events']})")
    if end["pid"] != base["pid"]:
        print(f"  (the baseline is the first daemon's, after the warm-up; the end is daemon {end['pid']}'s, started by "
              f"the last restart, after every session closed)")
    diff = {k: end["fd_kinds"][k] - base["fd_kinds"][k] for k in base["fd_kinds"] | end["fd_kinds"]
            if end["fd_kinds"][k] != base["fd_kinds"][k]}
    if diff:
        print(f"  fds that differ (end - baseline): {diff}")
    if abs(end["fds"] - base["fds"]) > COUNT_TOLERANCE:
        soak.fail(f"fds {base['fds']} -> {end['fds']}")
    if abs(end["threads"] - base["threads"]) > COUNT_TOLERANCE:
        soak.fail(f"threads {base['threads']} -> {end['threads']}")
    if end["rss"] - base["rss"] > RSS_TOLERANCE:
        soak.fail(f"RSS {base['rss'] / MIB:.1f} -> {end['rss'] / MIB:.1f} MiB")
    if end["host_bytes"] or end["disk_bytes"] or end["spill_files"] or end["sessions"]:
        soak.fail(f"left at the end: {end['sessions']} sessions, {end['host_bytes']} B host, "
                  f"{end['disk_bytes']} B disk, {end['spill_files']} swap files")
    if tracebacks:
        soak.fail(f"{tracebacks} tracebacks in the daemon's log")
    if len(soak.restarts) < a.restarts:
        soak.fail(f"{len(soak.restarts)} of {a.restarts} restarts done")
    bad = soak.bad
    for b in bad[:10]:
        print(f"  FAIL: {b[:1200]}")
    if len(bad) > 10:
        print(f"  ... and {len(bad) - 10} more")
    print(f"verdict: {'PASS' if not bad else 'FAIL'} (nothing lost, no internal error or hang, resources back within "
          f"fds/threads ±{COUNT_TOLERANCE}, RSS +{RSS_TOLERANCE >> 20} MiB, no unprovoked exit)")
    return 0 if not bad else 1


def spill_mounted(soak: Soak) -> bool:
    return os.path.ismount(soak.spill)


if __name__ == "__main__":
    sys.exit(main())
