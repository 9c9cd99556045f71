"""The RPC adapter: a zmq ROUTER for request/reply and a PUB for events, over Unix sockets.

The asyncio loop only moves frames: handlers that may block run on a worker pool, so `status`
and `ping` are answered at once while forwards and swaps are under way.
"""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from . import protocol
from .protocol import DjinnError
from .service import SLOW

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
                self.sock.send_multipart([ev["type"].encode(), line.encode()], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # a slow subscriber loses it and sees the gap in `seq`

    def close(self):
        self.sock.close(0)


class Server:
    def __init__(self, service, endpoint: str, workers: int = 128):
        self.service = service
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME * 4)  # far larger frames cut the peer off
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="djinn-rpc")
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def stop(self):
        self._stop.set()

    async def serve(self):
        stop = asyncio.ensure_future(self._stop.wait())
        while not self._stop.is_set():
            recv = asyncio.ensure_future(self.sock.recv_multipart(copy=True))
            done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                break
            frames = recv.result()
            task = asyncio.ensure_future(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        stop.cancel()

    async def _answer(self, frames):
        if len(frames) < 2:
            return
        ident, body = frames[0], frames[-1]
        if len(frames) > 3:
            return await self._send(ident, protocol.error(None, "malformed", "a request is one frame"))
        rid = None
        try:
            rid, method, params = protocol.parse_request(body)
            if method in SLOW:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.pool, self.service.handle, method, params)
            else:
                result = self.service.handle(method, params)
            reply = protocol.ok(rid, result)
        except DjinnError as e:
            reply = protocol.error(rid or getattr(e, "rid", None), e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a request never takes the daemon down
            log.exception("request %s failed", rid)
            reply = protocol.error(rid, "internal", f"internal error: {e!r}")
        await self._send(ident, reply)
        if self.service.stop_requested:
            self._stop.set()

    async def _send(self, ident, reply: bytes):
        try:
            await self.sock.send_multipart([ident, reply])
        except zmq.ZMQError as e:
            log.debug("reply lost: %s", e)

    async def drain(self, timeout: float):
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close(0)


def chmod_socket(path) -> None:
    os.chmod(path, 0o600)
