"""Who may talk to the daemon: its own user (and root) over the Unix sockets, and the holders of an
authorized key over TCP (remote.py), whatever the socket file's modes or the network say.

libzmq asks the context's ZAP handler about each new peer of a socket with a ZAP domain. Over a
Unix socket it gives the peer's kernel credentials (SO_PEERCRED: they cannot be forged) as the
address "localhost:UID:GID:PID"; over a CURVE endpoint, the public key the peer proved it holds.
The handler accepts the daemon's own uid and root (who can read the daemon's memory anyway), and
the keys listed in the authorized-keys file (read again when it changes); anyone else is refused
before a single request is read, each refused user or key logged once. A TCP peer that speaks
plain text or expects another server key fails the handshake before ZAP: `watch` logs each kind
of failure once (which kind a peer shows depends on who hangs up first).
"""

import logging
import os
import threading
from pathlib import Path

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from . import remote

log = logging.getLogger("djinnd.peers")

DOMAIN = b"djinnd"
_handlers: dict[int, "_Handler"] = {}  # per zmq context: its ZAP endpoint is the context's own


def guard(sock: zmq.Socket, authorized: Path | None = None) -> None:
    """Check every peer of `sock` (call before it binds); `authorized`: the authorized-keys file of its CURVE endpoints."""
    key = sock.context.underlying
    if key not in _handlers:
        _handlers[key] = _Handler(zmq.Context.shadow(key))
    if authorized is not None:
        _handlers[key].authorized_file = Path(authorized)
    sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)


def uid_of(address: str) -> int | None:
    """The uid in a ZAP address "localhost:UID:GID:PID" (None when it carries no credentials)."""
    parts = address.rsplit(":", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


class _Handler:
    def __init__(self, ctx: zmq.Context):
        self.allowed = {os.getuid(), 0}
        self.authorized_file: Path | None = None
        self._keys: tuple[float | None, set[str]] = (None, set())
        self.refused: set = set()
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("inproc://zeromq.zap.01")
        threading.Thread(target=self._run, name="djinnd-zap", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                version, rid, _domain, address, _identity, mechanism, *credentials = self.sock.recv_multipart()
            except zmq.ZMQError:  # the context is ending
                return
            address = address.decode(errors="replace")
            if mechanism == b"CURVE":
                key = z85.encode(credentials[0]).decode()
                ok = key in self.authorized()
                who, why = ("key", key), f"a key not in {self.authorized_file}"
            else:
                uid = uid_of(address)
                ok = uid in self.allowed
                who, why = ("uid", uid), f"only uid {os.getuid()} and root may connect"
            if not ok and who not in self.refused:
                self.refused.add(who)
                log.warning("refused a connection from %s %s (%s): %s", *who, address, why)
            self.sock.send_multipart([version, rid, b"200" if ok else b"400", b"OK" if ok else b"not authorized",
                                      b"", b""])

    def authorized(self) -> set[str]:
        """The authorized keys, read again when the file changed (none when there is no file)."""
        try:
            mtime = self.authorized_file.stat().st_mtime_ns
        except (OSError, AttributeError):
            return set()
        if mtime != self._keys[0]:
            try:
                self._keys = (mtime, remote.read_keys(self.authorized_file))
            except (OSError, UnicodeDecodeError) as e:
                log.error("cannot read the authorized keys %s: %s", self.authorized_file, e)
                self._keys = (mtime, set())
        return self._keys[1]


def watch(sock: zmq.Socket, url: str) -> None:
    """Log, once each, the kinds of failed handshakes on `sock`'s CURVE endpoint at `url`."""
    mon = remote.watch(sock, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def run():
        seen = set()
        while True:
            try:
                ev = parse_monitor_message(mon.recv_multipart())
            except zmq.ZMQError:
                return
            if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                mon.close(0)
                return
            if ev["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                why = "it does not speak CURVE (plain text?)"
            elif ev["value"] == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
                why = "its handshake fails the cryptography (it expects another server key?)"
            elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the peer hung up first, as both kinds above may
                why = "it hung up mid-handshake (plain text or another server key?)"
            else:
                why = f"its handshake failed (protocol error {ev['value']:#x})"
            if why not in seen:
                seen.add(why)
                log.warning("refused a connection on %s: %s", url, why)

    threading.Thread(target=run, name="djinnd-handshakes", daemon=True).start()
