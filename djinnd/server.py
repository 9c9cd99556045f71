"""The RPC adapter: a zmq ROUTER for request/reply and a PUB for events, over Unix sockets (and,
with --listen, over TCP secured by CURVE as well: remote.py).

The asyncio loop only moves frames: handlers that may block run on a worker pool, so `status`
and `ping` are answered at once while forwards and swaps are under way. Decode steps that can
start at once (see Runtime.steps_now) are the exception: the loop runs them, those that came in
together as one batched forward, as the hop would cost more than the step. After such a step the
loop busy-polls the socket for a moment (as Linux's SO_BUSY_POLL does) instead of sleeping: a
token-by-token client's next step comes within a fraction of a millisecond, and taking it without
a wake-up keeps the core warm and skips the event loop.
"""

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from . import peers, protocol, remote, wire
from .protocol import DjinnError
from .service import NOT_NOW

log = logging.getLogger("djinnd.server")


class Listener:
    """A TCP address to serve on beside the Unix socket: its CURVE key pair and authorized-keys file."""

    def __init__(self, url: str, keys: tuple[str, str], authorized):
        self.url, self.keys, self.authorized = url, keys, authorized

    def bind(self, sock: zmq.Socket, url: str) -> str:
        """Bind `sock` at `url` (after its Unix socket); the address bound."""
        bound = remote.listen(sock, url, self.keys)
        peers.watch(sock, bound)
        return bound


class PubSink:
    """Publishes events as [type, json]; called only from the event bus's writer thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, tcp: Listener | None = None):
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        peers.guard(self.sock, tcp and tcp.authorized)
        self.sock.bind(endpoint)
        self.url = tcp and tcp.bind(self.sock, remote.events_url(tcp.url))

    def write(self, batch):
        for ev, line in batch:
            try:
                self.sock.send_multipart([ev["type"].encode(), line], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # a slow subscriber loses it and sees the gap in `seq`

    def close(self):
        self.sock.close(0)


class Server:
    def __init__(self, service, endpoint: str, workers: int = 128, busy_poll_s: float = 0.001, tcp: Listener | None = None):
        self.service, self.busy_poll_s = service, busy_poll_s
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME * 4)  # far larger frames cut the peer off
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        peers.guard(self.sock, tcp and tcp.authorized)
        self.sock.bind(endpoint)
        self.url = tcp and tcp.bind(self.sock, tcp.url)
        self.sync_sock = zmq.Socket.shadow(self.sock.underlying)  # the same socket, for the loop's own polls and sends
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="djinn-rpc")
        self._serving: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stepped = collections.deque(maxlen=2)  # sessions whose steps the last two rounds answered here

    def stop(self):
        if self._serving is not None:
            self._serving.cancel()

    async def serve(self):
        """Receive until stopped; quick methods are answered inline, slow ones from the worker pool.

        Requests that have come in meanwhile are taken together: their decode steps share a forward.
        Token-by-token clients would split into cohorts that take turns (the steps answered while a
        batch runs come back for the next one), so while clients are asking at once (the loop has
        not slept) it also waits, as long as they keep coming `busy_poll_s` apart, for the steps of
        every session that stepped in the last two rounds: one forward serves them all."""
        self._serving = asyncio.current_task()
        try:
            requests, expect = [await self.sock.recv_multipart()], 0
            while True:
                requests += self._drain()
                requests += self._busy_poll(expect - len(requests))
                self._stepped.append(set())
                answered = self._dispatch(requests)
                expect = len(set().union(*self._stepped)) or min(answered, 1)
                requests = self._busy_poll(min(answered, 1))
                if requests:
                    await asyncio.sleep(0)  # the loop's other work (signals, replies) between two steps
                else:
                    self._stepped.clear()
                    requests, expect = [await self.sock.recv_multipart()], 0
        except asyncio.CancelledError:
            pass

    def _drain(self, most: int = 4096) -> list:
        """The requests already waiting on the socket, without sleeping."""
        out = []
        while len(out) < most:
            try:
                out.append(self.sync_sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

    def _busy_poll(self, expect: int) -> list:
        """Up to `expect` requests, taken without sleeping while each comes within `busy_poll_s` of
        the last (a client answered on the loop asks again at once; a batch's clients come back one
        after another). Not while slow requests are in flight: the loop sends their replies."""
        out = []
        end = time.perf_counter() + self.busy_poll_s
        while not self._tasks and len(out) < expect and time.perf_counter() < end:
            if self.sync_sock.get(zmq.EVENTS) & zmq.POLLIN:
                out.append(self.sync_sock.recv_multipart(zmq.NOBLOCK))
                end = time.perf_counter() + self.busy_poll_s
        return out

    def _dispatch(self, requests) -> int:
        """Answer or start each request, in order; consecutive decode steps go together. How many
        were answered on the loop (clients that then ask again at once are taken without sleeping)."""
        answered, steps = 0, []
        for frames in requests:
            req = self._parse(frames)
            if req is None:
                continue
            if self.service.is_step(req[2], req[3]):
                steps.append(req)
                continue
            answered += self._steps(steps) + self._one(*req)
            steps = []
        return answered + self._steps(steps)

    def _parse(self, frames):
        """(ident, rid, method, params as wire.check made them), or None when answered with an error."""
        if len(frames) < 2:
            return None
        ident, body = frames[0], frames[-1]
        if len(frames) > 3:
            self._send(ident, protocol.error(None, "malformed", "a request is one frame"))
            return None
        try:
            rid, method, params = protocol.parse_request(body)
        except DjinnError as e:
            self._send(ident, protocol.error(getattr(e, "rid", None), e.code, e.message))
            return None
        try:
            return ident, rid, method, wire.check(method, params)  # once, here: the handlers take what it made of them
        except DjinnError as e:
            self._send(ident, protocol.error(rid, e.code, e.message))
            return None

    def _one(self, ident, rid, method, kw) -> int:
        if method == "session.close" or (method == "session.signal_phase" and kw["phase"] == "IO_WAIT"):
            for stepped in self._stepped:  # it is not coming back for a step now: no wait for it
                stepped.discard(kw["session"])
        if method in wire.SLOW:
            reply = self._answer(rid, lambda: self.service.now(method, kw))
            if reply is not None:
                self._send(ident, reply)
                return 1
            self._slow(ident, rid, method, kw)
            return 0
        self._send(ident, self._answer(rid, lambda: self.service.handle(method, kw)))
        return 1

    def _steps(self, steps) -> int:
        """Decode steps: those that can start at once run here as one forward, the rest on workers."""
        if not steps:
            return 0
        try:
            results = self.service.steps_now([kw for _, _, _, kw in steps])
        except Exception as e:  # noqa: BLE001 - a request never takes the daemon down
            log.exception("decode steps on the loop failed")
            results = [DjinnError("internal", f"internal error: {e!r}")] * len(steps)
        answered = 0
        for (ident, rid, method, kw), result in zip(steps, results):
            if result is NOT_NOW:
                self._slow(ident, rid, method, kw)
            else:
                self._send(ident, self._answer(rid, lambda: _raise_or(result)))
                self._stepped[-1].add(kw["session"])
                answered += 1
        return answered

    def _slow(self, ident, rid, method, kw) -> None:
        task = asyncio.ensure_future(self._answer_slow(ident, rid, method, kw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_slow(self, ident, rid, method, kw) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self._answer, rid, lambda: self.service.handle(method, kw))
        self._send(ident, await fut, from_task=True)

    def _answer(self, rid, call) -> bytes | None:
        """The reply to `call()`'s result or error; None when the call says NOT_NOW."""
        try:
            result = call()
            return None if result is NOT_NOW else protocol.ok(rid, result)
        except DjinnError as e:
            return protocol.error(rid, e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a request never takes the daemon down
            log.exception("request %s failed", rid)
            return protocol.error(rid, "internal", f"internal error: {e!r}")

    def _send(self, ident, reply: bytes, from_task: bool = False) -> None:
        """Reply without waiting: a ROUTER never blocks, it drops what it cannot route.

        serve() answers inline on the plain socket (the asyncio one's future costs ~30 us a reply
        on a core gone cold) and then receives, which looks for a waiting request first. A task
        replies while serve() waits to receive: on the asyncio socket, which then looks for a
        request that came meanwhile (zmq's wake-up is edge-triggered: a plain send could eat it).
        """
        if from_task:
            fut = self.sock.send_multipart([ident, reply], flags=zmq.NOBLOCK)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        else:
            try:
                self.sync_sock.send_multipart([ident, reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # the socket is closing: the reply is dropped, as an unroutable one is
                pass
        if self.service.stop_requested:
            self.stop()

    async def drain(self, timeout: float):
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    def close(self):
        """Replies already sent (the shutdown's own) get a second to leave: a ROUTER drops those to
        peers gone, so only a live, unread peer can hold the exit that long."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close(linger=1000)


def _raise_or(result):
    if isinstance(result, Exception):
        raise result
    return result


def chmod_socket(path) -> None:
    os.chmod(path, 0o600)
