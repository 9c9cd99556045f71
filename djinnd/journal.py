"""The session journal: every session's durable state in SQLite, so that `djinnd start` after a stop,
SIGTERM or kill -9 brings the sessions back (Runtime.restore).

A session is one row (QoS, phase, prompt, where its forward stands, the patches of a paused forward)
and its generated tokens are chunks appended as they come, so a write costs what changed, not the
whole history. Beside it, the last disk-tier swap file of each session's KV (name, size, CRC-32,
the tokens it covers), written as the swap-out ends, so that a start can take an idle session's KV
back from it. The runtime writes the rest at request granularity, from the thread that finished the
request, before the reply goes out. WAL mode with synchronous=NORMAL: a commit is a write into the
WAL without an fsync, which survives the daemon's death (kill -9), not a power cut.
"""

import array
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .session import State

log = logging.getLogger("djinnd.journal")
VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY, qos TEXT NOT NULL, phase TEXT NOT NULL, created_at REAL NOT NULL,
    prompt BLOB NOT NULL, pending INTEGER NOT NULL, segments TEXT NOT NULL, state TEXT NOT NULL,
    breakpoints TEXT NOT NULL, layer INTEGER, patches TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    session INTEGER NOT NULL, start INTEGER NOT NULL, ids BLOB NOT NULL, PRIMARY KEY (session, start));
CREATE TABLE IF NOT EXISTS spills (session INTEGER PRIMARY KEY, spill TEXT NOT NULL);
"""
UPSERT = """
INSERT INTO sessions (id, qos, phase, created_at, prompt, pending, segments, state, breakpoints, layer, patches)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET qos = excluded.qos, phase = excluded.phase, pending = excluded.pending,
    segments = excluded.segments, state = excluded.state, breakpoints = excluded.breakpoints,
    layer = excluded.layer, patches = excluded.patches
"""


@dataclass
class Record:
    """A session as journaled."""
    id: int
    qos: str
    phase: str
    created_at: float
    prompt: list
    generated: list
    pending: int  # its last `pending` tokens are the next forward's input; its KV held the others
    segments: list  # [[tokens, times], ...]: the forwards that built that KV, in order
    state: str  # idle or paused
    breakpoints: list  # of the paused forward
    layer: int | None  # where it is paused
    patches: list  # [{op, value, positions, channels, layer}, ...] applied during the paused forward
    spill: dict | None = None  # the last disk-tier file of its KV: {file, bytes, crc32, seq_len} (Runtime.restore)


def _pack(ids) -> bytes:
    return array.array("i", ids).tobytes()


def _unpack(blob: bytes) -> list:
    a = array.array("i")
    a.frombytes(blob)
    return a.tolist()


def _short(path: Path) -> int:
    """The size its header gives when the file is shorter (truncated), else 0."""
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        return 0
    page = int.from_bytes(head[16:18], "big")
    size = (65536 if page == 1 else page) * int.from_bytes(head[28:32], "big")
    return size if size > path.stat().st_size else 0


def remove(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


class Journal:
    """`records`: what the file held at start (a corrupt one is moved aside with one log line, keeping
    what could be read); then `save` and `delete` keep it up to date."""

    def __init__(self, path, model: str, fresh: bool = False):
        self.path, self.model = Path(path), model
        self._lock = threading.Lock()
        self._written: dict[int, int] = {}  # per session: generated tokens already in the file
        self._failing = False
        self.conn = None
        self.last_id = 0  # the largest session id ever given: ids of closed sessions are not given again
        self._deleted: set[int] = set()  # closed: a save racing with the close must not bring it back
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fresh and self.path.exists():
            remove(self.path)
            log.info("journal %s removed (--fresh): starting with no sessions", self.path)
        self.records = self._read() if self.path.exists() else []
        if self.path.exists():  # read whole: its rows stay (one moved aside leaves a fresh file to fill)
            self._written = {r.id: len(r.generated) for r in self.records}
        self.conn = self._connect()
        self._stop = threading.Event()
        self._checkpoints = threading.Thread(target=self._checkpoint, name="journal-checkpoint", daemon=True)
        self._checkpoints.start()

    def _connect(self) -> sqlite3.Connection:
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)  # the -wal and -shm files take its mode
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # not on a request's thread: its fsyncs took ~25 ms (_checkpoint)
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?), ('model', ?)", (VERSION, self.model))
        return conn

    def _read(self) -> list[Record]:
        """The records in the file; when it cannot be read whole, those it could, after one log line
        saying what was wrong, and the file is moved aside (a fresh one is written in its place)."""
        records, why = self._read_file(self.path)
        if why is not None and _short(self.path):  # truncated: SQLite reads nothing of it as it is
            with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
                copy = Path(tmp) / self.path.name
                shutil.copy(self.path, copy)
                if Path(f"{self.path}-wal").exists():
                    shutil.copy(f"{self.path}-wal", f"{copy}-wal")
                with open(copy, "r+b") as f:  # the missing pages read as damaged ones: the others are found
                    f.truncate(_short(self.path))
                records = self._read_file(copy)[0]
            why = f"{why} (the file is truncated)"
        if why is not None:
            aside = Path(f"{self.path}.bad")
            remove(aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            log.error("journal %s: %s; restoring the %d session(s) read from it (the file is kept as %s)",
                      self.path, why, len(records), aside)
        return records

    def _read_file(self, path: Path) -> tuple[list[Record], str | None]:
        records, why = [], None
        try:
            conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
        except sqlite3.Error as e:
            return [], str(e)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if meta.get("model") != self.model:
                why = f"it was written by a daemon serving {meta.get('model')!r}, not {self.model!r}"
            else:
                self.last_id = max(self.last_id, int(meta.get("last_id", 0)))
                records, why = self._rows(conn)
        except sqlite3.Error as e:
            why = str(e)
        finally:
            conn.close()
        return records, why

    def _rows(self, conn) -> tuple[list[Record], str | None]:
        """Every session that reads whole, and what was wrong with the others (None if nothing)."""
        records, bad = [], []
        try:  # (a journal older than the table has none: those sessions' KV is computed again)
            spills = {sid: json.loads(spill) for sid, spill in conn.execute("SELECT session, spill FROM spills")}
        except (sqlite3.Error, ValueError):
            spills = {}
        try:
            rows = conn.execute("SELECT * FROM sessions ORDER BY id").fetchall()
        except sqlite3.Error as e:  # a damaged table: each id looked up alone, past the damaged pages
            bad.append(str(e))
            rows = []
            for sid in range(1, self.last_id + 1):
                try:
                    rows += conn.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchall()
                except sqlite3.Error:
                    pass
        for (sid, qos, phase, created, prompt, pending, segments, state, bps, layer, patches) in rows:
            try:
                generated = []
                for start, ids in conn.execute("SELECT start, ids FROM tokens WHERE session = ? ORDER BY start", (sid,)):
                    if start != len(generated):
                        raise ValueError(f"its tokens have a gap at {len(generated)}")
                    generated += _unpack(ids)
                r = Record(sid, qos, phase, created, _unpack(prompt), generated, pending, json.loads(segments),
                           state, json.loads(bps), layer, json.loads(patches), spills.get(sid))
                if r.state not in (State.IDLE, State.PAUSED) or not 1 <= r.pending <= len(r.prompt) + len(r.generated):
                    raise ValueError("its state does not hold together")
                records.append(r)
            except (sqlite3.Error, ValueError, TypeError) as e:
                bad.append(f"session {sid}: {e}")
        return records, "; ".join(bad) or None

    def save(self, sessions) -> None:
        """Write the sessions' state as it is now, in one transaction; a session with a forward in
        flight or closing keeps what the journal had."""
        rows = [row for row in map(_snapshot, sessions) if row is not None]
        if not rows:
            return
        with self._lock:
            if self.conn is None:
                return
            try:
                self.conn.execute("BEGIN")
                for *fields, generated, n in rows:
                    sid, done = fields[0], self._written.get(fields[0])
                    if sid in self._deleted:
                        continue
                    # the prompt never changes: written with the row's first write only
                    fields[4], done = (_pack(fields[4]), 0) if done is None else (b"", done)
                    self.conn.execute(UPSERT, fields)
                    if sid > self.last_id:
                        self.last_id = sid
                        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_id', ?)", (str(sid),))
                    if n > done:
                        self.conn.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?)",
                                          (sid, done, _pack(generated[done:n])))
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e)
                return
            for *fields, _, n in rows:
                if fields[0] not in self._deleted:
                    self._written[fields[0]] = n
            if self._failing:
                self._failing = False
                log.info("journal %s: writing again", self.path)

    def spilled(self, sid: int, spill: dict) -> None:
        """Session `sid`'s KV is in a disk-tier file now (the last one written for it counts)."""
        with self._lock:
            if self.conn is None or sid in self._deleted:
                return
            try:
                self.conn.execute("INSERT OR REPLACE INTO spills VALUES (?, ?)", (sid, json.dumps(spill)))
            except sqlite3.Error as e:
                self._failed(e)

    def delete(self, sid: int) -> None:
        with self._lock:
            if self.conn is None:
                return
            try:
                self._deleted.add(sid)
                self.conn.execute("BEGIN")
                self.conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                self.conn.execute("DELETE FROM tokens WHERE session = ?", (sid,))
                self.conn.execute("DELETE FROM spills WHERE session = ?", (sid,))
                self.conn.execute("COMMIT")
                self._written.pop(sid, None)
            except sqlite3.Error as e:
                self._failed(e)

    def _failed(self, e: sqlite3.Error) -> None:  # holding _lock
        """A request never fails for its journal: the error is logged once, until a write works again."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        if not self._failing:
            self._failing = True
            log.error("journal %s: cannot write (%s): sessions changed from now on may not survive a restart",
                      self.path, e)

    def _checkpoint(self, every_s: float = 2.0) -> None:
        """Copy the WAL into the file now and then from a thread of its own (PASSIVE: never waits for
        a writer), so that the WAL stays small and no request pays for the fsyncs."""
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            while not self._stop.wait(every_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:  # busy, or the disk: the next round tries again
                    pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._checkpoints.join(10)
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


def _snapshot(s) -> tuple | None:
    """The session's journal row, then its generated tokens and how many there are now (the list only
    grows: the save slices it without a copy of the whole), read in one piece; None when a forward is
    in flight or it is closing."""
    with s.cond:
        if s.closing or s.state not in (State.IDLE, State.PAUSED):
            return None
        paused = s.state == State.PAUSED
        return (s.id, s.qos, s.phase, s.created_at, s.prompt_ids, len(s.pending),
                json.dumps(s.segments + s.replay), s.state.value, json.dumps(s.breakpoints if paused else []),
                s.layer, json.dumps(s.patches if paused else []), s.generated, len(s.generated))

