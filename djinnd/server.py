"""The RPC adapter: a zmq ROUTER for request/reply and a PUB for events, over Unix sockets.

The asyncio loop only moves frames: handlers that may block run on a worker pool, so `status`
and `ping` are answered at once while forwards and swaps are under way. A decode step that can
start at once (see Runtime.step_now) is the exception: the loop runs it, as the hop would cost
more than the step. After such a step the loop busy-polls the socket for a moment (as Linux's
SO_BUSY_POLL does) instead of sleeping: a token-by-token client's next step comes within a fraction
of a millisecond, and taking it without a wake-up keeps the core warm and skips the event loop.
"""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from . import protocol, wire
from .protocol import DjinnError
from .service import NOT_NOW

log = logging.getLogger("djinnd.server")


class PubSink:
    """Publishes events as [type, json]; called only from the event bus's writer thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.bind(endpoint)

    def write(self, batch):
        for ev, line in batch:
            try:
                self.sock.send_multipart([ev["type"].encode(), line], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # a slow subscriber loses it and sees the gap in `seq`

    def close(self):
        self.sock.close(0)


class Server:
    def __init__(self, service, endpoint: str, workers: int = 128, busy_poll_s: float = 0.001):
        self.service, self.busy_poll_s = service, busy_poll_s
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME * 4)  # far larger frames cut the peer off
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)
        self.sync_sock = zmq.Socket.shadow(self.sock.underlying)  # the same socket, for the loop's own polls and sends
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="djinn-rpc")
        self._serving: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def stop(self):
        if self._serving is not None:
            self._serving.cancel()

    async def serve(self):
        """Receive until stopped; quick methods are answered inline, slow ones from the worker pool."""
        self._serving = asyncio.current_task()
        try:
            frames = await self.sock.recv_multipart()
            while True:
                stepped = self._dispatch(frames)
                frames = self._busy_poll() if stepped else None
                if frames is None:
                    frames = await self.sock.recv_multipart()
                else:
                    await asyncio.sleep(0)  # the loop's other work (signals, replies) between two steps
        except asyncio.CancelledError:
            pass

    def _busy_poll(self):
        """The next request if it comes within `busy_poll_s`, taken without sleeping; else None.
        Not while slow requests are in flight: their replies are sent by the loop."""
        end = time.perf_counter() + self.busy_poll_s
        while not self._tasks and time.perf_counter() < end:
            if self.sync_sock.get(zmq.EVENTS) & zmq.POLLIN:
                return self.sync_sock.recv_multipart(zmq.NOBLOCK)
        return None

    def _dispatch(self, frames) -> bool:
        """Answer or start one request; True when it was answered on the loop (a client that asks
        again at once, a decode step's next or a poll's, is then taken without sleeping)."""
        if len(frames) < 2:
            return False
        ident, body = frames[0], frames[-1]
        if len(frames) > 3:
            self._send(ident, protocol.error(None, "malformed", "a request is one frame"))
            return False
        try:
            rid, method, params = protocol.parse_request(body)
        except DjinnError as e:
            self._send(ident, protocol.error(getattr(e, "rid", None), e.code, e.message))
            return False
        try:
            kw = wire.check(method, params)  # once, here: the handlers take what it made of them
        except DjinnError as e:
            self._send(ident, protocol.error(rid, e.code, e.message))
            return True
        if method in wire.SLOW:
            reply = self._answer(rid, lambda: self.service.now(method, kw))
            if reply is not None:
                self._send(ident, reply)
                return True
            task = asyncio.ensure_future(self._answer_slow(ident, rid, method, kw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._send(ident, self._answer(rid, lambda: self.service.handle(method, kw)))
            return True
        return False

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
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close(0)


def chmod_socket(path) -> None:
    os.chmod(path, 0o600)
