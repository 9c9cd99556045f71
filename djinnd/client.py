"""Clients of djinnd, as one scripts a notebook kernel: `Client` (blocking) and `AsyncClient`.

Every call has a timeout and every failure raises DjinnError with a `.code`; when no daemon
answers, the error names the socket that was tried and how to start one. `url=` (or $DJINN_CONNECT)
reaches a daemon over TCP instead, encrypted and authenticated by CURVE (remote.py).
"""

import itertools
import json
import os
import time
from collections import deque
from pathlib import Path

import zmq
import zmq.asyncio

from . import paths, pidfile, protocol, remote
from .protocol import DjinnError

DEFAULT_TIMEOUT = 300.0  # seconds: a forward of a long prompt on a CPU takes a while
CONNECT_TIMEOUT_MS = 2000  # a live daemon accepts the connection at once
_ids = itertools.count(1)


def _no_daemon(sock: Path, why: str) -> DjinnError:
    return DjinnError("no_daemon", f"no djinnd answers on {sock} ({why}); start one with `djinnd start --detach`"
                      + ("" if "DJINN_SOCKET" in os.environ else " or set DJINN_SOCKET"))


def _check_socket(sock: Path) -> None:
    """There is a socket, of a daemon that would take this user's requests: it refuses every user but its
    own and root (djinnd/peers.py), and a refused request would only time out."""
    try:
        owner = sock.stat().st_uid
    except OSError:
        raise _no_daemon(sock, "no socket there") from None
    if os.getuid() not in (owner, 0):
        raise DjinnError("refused", f"djinnd on {sock} runs as uid {owner}: only that user and root may connect "
                                    f"(this is uid {os.getuid()})")


class _Api:
    """One call for every method of the wire table (djinnd/wire.py), written once over `call`
    (sync) or `acall` (async)."""

    def _do(self, method, post=None, **params):
        raise NotImplementedError

    def ping(self):
        return self._do("ping")

    def status(self):
        return self._do("status")

    def snapshot(self, samples: int = 600):
        return self._do("snapshot", samples=samples)

    def events_since(self, seq: int):
        return self._do("events.since", seq=seq)

    def emit(self, type: str, **fields):
        """Publish an event on the daemon's stream (clients may emit `scenario` events); its seq."""
        return self._do("event.emit", lambda r: r["seq"], type=type, **fields)

    def create_session(self, prompt: str | None = None, token_ids: list[int] | None = None, qos: str = "interactive"):
        params = {"qos": qos}
        if prompt is not None:
            params["prompt"] = prompt
        if token_ids is not None:
            params["token_ids"] = list(token_ids)
        return self._do("session.create", lambda r: r["id"], **params)

    def text(self, tokens: list[int]) -> str:
        """The text of token ids, by the daemon's tokenizer."""
        return self._do("model.text", lambda r: r["text"], tokens=list(tokens))

    def pieces(self, tokens: list[int]) -> list[str]:
        """Each token's own text: where one token ends and the next begins."""
        return self._do("model.text", lambda r: r["pieces"], tokens=list(tokens))

    def sessions(self):
        return self._do("session.list", lambda r: r["sessions"])

    def session(self, sid: int):
        return self._do("session.get", session=sid)

    def generate(self, sid: int, max_new_tokens: int = 1):
        return self._do("session.generate", lambda r: r["tokens"], session=sid, max_new_tokens=max_new_tokens)

    def append(self, sid: int, token_ids: list[int]):
        """Add input after what the session holds: its next forward (generate, run_to) feeds it."""
        return self._do("session.append", session=sid, token_ids=list(token_ids))

    def run_to(self, sid: int, layer: int | None = None, layers: list[int] | None = None):
        """Run the next forward until after decoder layer `layer` (or the first of `layers`) and pause there."""
        return self._do("session.run_to", session=sid, layers=layers if layers is not None else [layer])

    def resume(self, sid: int):
        """Run on from the paused layer: the token id when the forward ends, None at a further breakpoint."""
        return self._do("session.resume", lambda r: r.get("token") if r["state"] != "paused" else None, session=sid)

    def inspect(self, sid: int, positions: list[int] | None = None, channels: list[int] | None = None):
        return self._do("session.inspect", session=sid, **_sel(positions, channels))

    def lens(self, sid: int, top_k: int = 5, position: int = -1):
        """At a pause: the top-k next tokens (token, text, prob) of the hidden state at `position`."""
        return self._do("session.lens", session=sid, top_k=top_k, position=position)

    def patch(self, sid: int, scale=None, set=None, add=None, positions=None, channels=None):
        """Scale, set or add to the paused hidden state (at the given positions and channels, else all)."""
        ops = {k: v for k, v in (("scale", scale), ("set", set), ("add", add)) if v is not None}
        if len(ops) != 1:
            raise DjinnError("bad_params", "give exactly one of scale=, set=, add=")
        (op, value), = ops.items()
        return self._do("session.patch", session=sid, op=op, value=value, **_sel(positions, channels))

    def signal_phase(self, sid: int, phase: str, expected_ms: float | None = None, wait: bool = True):
        """IO_WAIT (with the expected wait) or COMPUTE. With wait=False the hint costs no round trip:
        it is sent and the call returns None at once; its reply is skipped and an error in it unseen."""
        return self._do("session.signal_phase", wait=wait, session=sid, phase=phase, expected_ms=expected_ms)

    def close(self, sid: int):
        return self._do("session.close", lambda r: None, session=sid)

    def export_session(self, sid: int) -> dict:
        """Write an idle session into a file in the daemon's moves folder, for import_session on another
        daemon: {"file", "path", "bytes", "sha256"}. The session stays; close it once the import succeeded."""
        return self._do("session.export", session=sid)

    def import_session(self, file: str, qos: str | None = None) -> int:
        """A new session from an exported file's bare name in the daemon's moves folder (the file is
        removed); its next tokens are the exporter's. Its id."""
        return self._do("session.import", lambda r: r["id"], file=file, qos=qos)

    def set_budget(self, budget):
        return self._do("memory.set_budget", budget=budget)

    def set_swap(self, enabled: bool):
        return self._do("memory.set_swap", enabled=enabled)

    def reset_peak(self):
        return self._do("memory.reset_peak")

    def set_scheduler(self, **settings):
        """Any of fcfs, shares, max_concurrency, max_batch, lifo, escalation_ms (None: off), wake_first."""
        return self._do("scheduler.set", **settings)

    def scenarios(self):
        return self._do("scenario.list", lambda r: r["scenarios"])

    def start_scenario(self, name: str, sets: dict | None = None):
        return self._do("scenario.start", name=name, set=sets or {})

    def abort_scenario(self, run: int):
        return self._do("scenario.abort", run=run)

    def scenario_runs(self):
        return self._do("scenario.runs", lambda r: r["runs"])

    def shutdown(self):
        return self._do("shutdown")

    def daemon_alive(self) -> bool:
        """Whether a djinnd holds this socket's lock: one that was killed leaves its socket, not the lock.
        (Over TCP there is no lock to see: False.)"""
        return self.socket_path is not None and pidfile.is_locked(self.socket_path)


def _sel(positions, channels) -> dict:
    out = {}
    if positions is not None:
        out["positions"] = list(positions)
    if channels is not None:
        out["channels"] = list(channels)
    return out


def _result(frame: bytes, rid: str):
    """The result of the reply to `rid`, None for a stale reply to an earlier request."""
    msg = json.loads(frame)
    if msg.get("id") != rid:
        return None, False
    if msg.get("ok"):
        return msg.get("result"), True
    err = msg.get("error") or {}
    raise DjinnError(err.get("code", "internal"), err.get("message", "unknown error"))


def _frame(rid: str, method: str, params: dict) -> bytes:
    try:
        return protocol.request(rid, method, params)
    except ValueError as e:  # NaN, infinity or a circular reference
        raise DjinnError("bad_params", f"{method}: the parameters cannot be sent as JSON ({e})") from None


class _Target:
    """Where a client's requests go: a Unix socket, or a TCP address secured by CURVE."""

    def __init__(self, socket, url: str | None, server_key: str | None):
        if remote.is_url(socket):  # what the CLI and the console take as --socket or --connect alike
            url, socket = str(socket), None
        url = url or (None if socket else os.environ.get("DJINN_CONNECT"))
        if url:
            try:
                remote.check_url(url)
            except ValueError as e:
                raise DjinnError("bad_params", str(e)) from None
        self.url = url or None
        self.socket_path = None if url else paths.resolve_socket(socket)
        self.server_key = remote.server_key_for(url, server_key) if url else None
        self.where = url or str(self.socket_path)
        self.watch = None

    def open(self, ctx, kind: int = zmq.DEALER, endpoint: str | None = None):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if kind == zmq.DEALER:
            s.setsockopt(zmq.IMMEDIATE, 1)
        if self.url:
            remote.secure(s, self.server_key)
            if kind == zmq.DEALER:
                self.watch = remote.watch(s)
        elif kind == zmq.DEALER:
            _check_socket(self.socket_path)
        s.connect(endpoint or self.url or paths.endpoint(self.socket_path))
        return s

    def unreachable(self) -> DjinnError:
        """Why the request socket could not send: no daemon, or (over TCP) a refused handshake."""
        if self.url:
            return remote.why_not(self.watch, self.url)
        return _no_daemon(self.socket_path, "nothing listens there: a stale socket?")

    def close(self, s) -> None:
        if self.url:
            remote.unwatch(s, self.watch)
            self.watch = None
        s.close(0)

    def events(self, status: dict) -> str:
        """The event stream's address, from the daemon's status."""
        if self.url:
            return remote.on_host_of(self.url, status["listen"]["events_url"])
        return paths.endpoint(Path(status["events_socket"]))


class Client(_Api):
    """Blocking client. `with Client() as c: c.status()`. The daemon: `socket` (a path; a tcp://
    address is taken as `url`), else `url` or $DJINN_CONNECT, else the default socket."""

    def __init__(self, socket=None, timeout: float = DEFAULT_TIMEOUT, url: str | None = None,
                 server_key: str | None = None):
        self.target = _Target(socket, url, server_key)
        self.socket_path = self.target.socket_path
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._sock = None

    def twin(self, timeout: float | None = None) -> "Client":
        """Another client of the same daemon with a socket of its own, for another thread (a zmq
        socket is one thread's)."""
        t = self.target
        return Client(t.socket_path, self.timeout if timeout is None else timeout, url=t.url, server_key=t.server_key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close_socket()

    def close_socket(self):
        if self._sock is not None:
            self.target.close(self._sock)
            self._sock = None

    def call(self, method: str, timeout: float | None = None, wait: bool = True, **params):
        """The request's result; with wait=False, None once it is sent (the reply is skipped later)."""
        if self._sock is None:
            self._sock = self.target.open(self._ctx)
        rid = f"{os.getpid()}-{next(_ids)}"
        frame = _frame(rid, method, params)
        try:  # connected: it goes at once (a stat and a poll per call cost ~50 us on a core that slept)
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # not yet connected, or no longer: give the daemon a moment to accept
            if not self._sock.poll(CONNECT_TIMEOUT_MS, zmq.POLLOUT):
                why = self.target.unreachable()
                self.close_socket()
                raise why
            self._sock.send(frame)
        if not wait:
            return None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000)):
                self.close_socket()  # a late reply must not be read as the next one's
                raise DjinnError("timeout", f"{method}: no reply from {self.target.where} within {timeout or self.timeout:.0f} s")
            result, mine = _result(self._sock.recv(), rid)
            if mine:
                return result

    def _do(self, method, post=None, **params):
        r = self.call(method, **params)
        return post(r) if post else r

    def subscribe(self, types: tuple[str, ...] = ()) -> "Subscription":
        return Subscription(self, types)


class AsyncClient(_Api):
    """asyncio client: `async with AsyncClient() as c: await c.status()`."""

    def __init__(self, socket=None, timeout: float = DEFAULT_TIMEOUT, url: str | None = None,
                 server_key: str | None = None):
        self.target = _Target(socket, url, server_key)
        self.socket_path = self.target.socket_path
        self.timeout = timeout
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close_socket()

    def close_socket(self):
        if self._sock is not None:
            self.target.close(self._sock)
            self._sock = None

    async def call(self, method: str, timeout: float | None = None, wait: bool = True, **params):
        if self._sock is None:
            self._sock = self.target.open(self._ctx)
        rid = f"{os.getpid()}-a{next(_ids)}"
        frame = _frame(rid, method, params)
        try:  # as Client.call
            await self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            if not await self._sock.poll(CONNECT_TIMEOUT_MS, zmq.POLLOUT):
                why = self.target.unreachable()
                self.close_socket()
                raise why
            await self._sock.send(frame)
        if not wait:
            return None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await self._sock.poll(int(left * 1000)):
                self.close_socket()
                raise DjinnError("timeout", f"{method}: no reply from {self.target.where} within {timeout or self.timeout:.0f} s")
            result, mine = _result(await self._sock.recv(), rid)
            if mine:
                return result

    async def _do(self, method, post=None, **params):
        r = await self.call(method, **params)
        return post(r) if post else r

    async def subscribe(self, types: tuple[str, ...] = ()) -> "AsyncSubscription":
        return AsyncSubscription(self, self.target.events(await self.status()), types)


class _Stream:
    """What both subscriptions share: the SUB socket, and the seq bookkeeping that finds gaps.

    Events already seen (seq at or below `last_seq`, e.g. those a snapshot held) are dropped; a gap
    in seq is filled from the daemon's memory (samples excepted); `lost` counts what could not be.
    """

    def _open(self, ctx, target: _Target, endpoint: str, types: tuple[str, ...]) -> None:
        self.endpoint = endpoint
        self._sock = target.open(ctx, zmq.SUB, endpoint)
        self._sock.setsockopt(zmq.RCVHWM, 200_000)
        for t in types or ("",):
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.types = types
        self.last_seq: int | None = None
        self.lost = 0
        self._pending: deque = deque()

    def _take(self, frames) -> tuple[dict | None, int | None]:
        """The event (None when seen already) and, when a gap comes before it, the seq it starts after."""
        ev = json.loads(frames[-1])
        last, seq = self.last_seq, ev["seq"]
        if last is not None and seq <= last:
            return None, None
        self.last_seq = seq
        return ev, (last if not self.types and last is not None and seq > last + 1 else None)

    def _fill(self, got: dict, last: int, ev: dict) -> None:
        missing = [e for e in got["events"] if last < e["seq"] < ev["seq"]]
        self.lost += (ev["seq"] - last - 1) - len(missing)
        self._pending.extend(missing)
        self._pending.append(ev)

    def close(self):
        self._sock.close(0)


class Subscription(_Stream):
    """Follows the event stream: `with client.subscribe() as sub: sub.recv()`."""

    def __init__(self, client: Client, types: tuple[str, ...] = ()):
        self.client = client
        self._open(zmq.Context.instance(), client.target, client.target.events(client.status()), types)

    def recv(self, timeout: float = 1.0) -> dict | None:
        """The next event, or None when none came within `timeout` seconds."""
        while not self._pending:
            if not self._sock.poll(int(timeout * 1000)):
                return None
            ev, gap = self._take(self._sock.recv_multipart())
            if ev is not None and gap is None:
                return ev
            if ev is not None:
                self._fill(self.client.events_since(gap), gap, ev)
        return self._pending.popleft()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncSubscription(_Stream):
    """Follows the event stream in asyncio: `sub = await client.subscribe(); await sub.recv()`."""

    def __init__(self, client: AsyncClient, endpoint: str, types: tuple[str, ...] = ()):
        self.client = client
        self._open(zmq.asyncio.Context.instance(), client.target, endpoint, types)

    async def recv(self, timeout: float = 1.0) -> dict | None:
        """The next event, or None when none came within `timeout` seconds (0: only one already here)."""
        while not self._pending:
            if not await self._sock.poll(int(timeout * 1000)):
                return None
            ev, gap = self._take(await self._sock.recv_multipart())
            if ev is not None and gap is None:
                return ev
            if ev is not None:
                self._fill(await self.client.events_since(gap), gap, ev)
        return self._pending.popleft()
