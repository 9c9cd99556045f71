"""The console's one connection to djinnd, run as a Textual worker: attach, follow, reattach.

Clone pattern (zguide clonesrv5): subscribe to the PUB stream first, then take a snapshot, then
drop stream events the snapshot already held (seq ≤ its seq). Events are batched and posted at most
ten times a second, so a storm of 10,000 events/s costs the UI ten messages. A status + session
poll every second doubles as the liveness check; when it fails we say so and retry every second.
"""

import asyncio
import time
from pathlib import Path
from typing import Callable

from djinnd import AsyncClient, DjinnError, is_url

from .messages import Attached, Catalog, Detached, EventBatch, Polled, Runs

RPC_TIMEOUT = 2.0  # seconds: the daemon answers status/snapshot at once, even when busy
POLL_EVERY = 1.0
BATCH_EVERY = 0.1
MAX_DRAIN = 20_000
HISTORY_SEQS = 20_000  # how far back in seq the console reads events when it attaches


class Gone(Exception):
    """The daemon stopped answering."""


async def rpc(socket: Path, call: Callable, timeout: float = RPC_TIMEOUT):
    """`call(client)` on a fresh AsyncClient, bounded by `timeout` even when the send itself would block.

    A fresh socket per call keeps concurrent callers from reading each other's replies.
    """
    client = AsyncClient(socket, timeout=timeout)
    try:
        return await asyncio.wait_for(call(client), timeout + 0.5)
    except asyncio.TimeoutError:
        raise DjinnError("timeout", f"no reply from {socket} within {timeout:.0f} s") from None
    finally:
        client.close_socket()


class Link:
    """Follows one socket for ever; `post` receives the messages (the app's post_message)."""

    def __init__(self, socket: Path | str, post: Callable):
        self.socket = socket if is_url(socket) else Path(socket)  # a tcp:// address: a remote daemon
        self.post = post
        self.attached = False

    async def run(self):
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever went wrong, the console stays up and retries
                self.post(Detached(str(self.socket), _reason(e), self.attached))
            self.attached = False
            await asyncio.sleep(POLL_EVERY)

    async def _follow(self):
        client = AsyncClient(self.socket, timeout=RPC_TIMEOUT)  # its subscription repairs gaps with it
        try:
            sub = await asyncio.wait_for(client.subscribe(), RPC_TIMEOUT + 0.5)
        except asyncio.TimeoutError:
            raise DjinnError("timeout", f"no reply from {self.socket} within {RPC_TIMEOUT:.0f} s") from None
        try:
            await asyncio.sleep(0.05)  # let the subscription reach the publisher before the snapshot
            snap = await rpc(self.socket, lambda c: c.snapshot(samples=6000))
            snap["events"] = await self._history(snap)
            sub.last_seq = snap["seq"]  # what the snapshot held is dropped from the stream
            self.attached = True
            self.post(Attached(str(self.socket), snap))
            await self._side_info()
            await self._stream(sub)
        finally:
            sub.close()
            client.close_socket()

    async def _history(self, snap: dict) -> list[dict]:
        """The snapshot holds the last 500 seqs (under a minute at 10 samples/s): fetch more swap history."""
        try:
            got = await rpc(self.socket, lambda c: c.events_since(max(0, snap["seq"] - HISTORY_SEQS)), timeout=5)
        except DjinnError:
            return snap["events"]
        merged = {e["seq"]: e for e in got["events"] if e["seq"] <= snap["seq"]}
        merged.update((e["seq"], e) for e in snap["events"])
        return [merged[k] for k in sorted(merged)]

    async def _side_info(self):
        """Scenario catalog and runs: optional, so a failure is shown, never fatal."""
        try:
            self.post(Catalog(await rpc(self.socket, AsyncClient.scenarios)))
        except DjinnError as e:
            if e.code in ("no_daemon", "timeout"):
                raise
            self.post(Catalog(error=str(e)))
        try:
            self.post(Runs(await rpc(self.socket, AsyncClient.scenario_runs)))
        except DjinnError as e:
            if e.code in ("no_daemon", "timeout"):
                raise

    async def _stream(self, sub):
        batch: list[dict] = []
        lost = sub.lost
        sent = polled = time.monotonic()
        while True:
            ev = await sub.recv(BATCH_EVERY)
            while ev is not None:  # and whatever else is already here, up to MAX_DRAIN
                batch.append(ev)
                ev = await sub.recv(0) if len(batch) < MAX_DRAIN else None
            now = time.monotonic()
            if batch and now - sent >= BATCH_EVERY:
                self.post(EventBatch(batch, sub.lost - lost))
                batch, lost, sent = [], sub.lost, now
            if now - polled >= POLL_EVERY:
                polled = now
                await self.poll()

    async def poll(self):
        if isinstance(self.socket, Path) and self.socket.exists() and not AsyncClient(self.socket).daemon_alive():
            # the daemon holds its pidfile lock for life: unlocked means it died, whatever the socket says
            raise Gone(f"djinnd on {self.socket} is gone (it left a stale socket)")
        try:
            status = await rpc(self.socket, AsyncClient.status)
            sessions = await rpc(self.socket, AsyncClient.sessions)
        except DjinnError as e:
            raise Gone(str(e)) from None
        self.post(Polled(status, sessions))


def _reason(e: Exception) -> str:
    text = str(e)
    return text.split(" (", 1)[0] if isinstance(e, DjinnError) and e.code == "no_daemon" else text
