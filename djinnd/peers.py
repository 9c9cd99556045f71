"""Only the daemon's own user (and root) may talk to it, whatever the socket file's modes say.

libzmq reads each new Unix-socket peer's credentials from the kernel (SO_PEERCRED: they cannot be
forged) and, on a socket with a ZAP domain, asks the context's ZAP handler whether to accept the
connection, with the peer's address given as "localhost:UID:GID:PID". The handler here accepts the
daemon's own uid and root (who can read the daemon's memory anyway) and refuses anyone else before
a single request is read, logging each refused user once.
"""

import logging
import os
import threading

import zmq

log = logging.getLogger("djinnd.peers")

DOMAIN = b"djinnd"
_handlers: dict[int, "_Handler"] = {}  # per zmq context: its ZAP endpoint is the context's own


def own_user_only(sock: zmq.Socket) -> None:
    """Check every peer of `sock` (call before it binds)."""
    key = sock.context.underlying
    if key not in _handlers:
        _handlers[key] = _Handler(zmq.Context.shadow(key))
    sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)


def uid_of(address: str) -> int | None:
    """The uid in a ZAP address "localhost:UID:GID:PID" (None when it carries no credentials)."""
    parts = address.rsplit(":", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


class _Handler:
    def __init__(self, ctx: zmq.Context):
        self.allowed = {os.getuid(), 0}
        self.refused: set = set()
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("inproc://zeromq.zap.01")
        threading.Thread(target=self._run, name="djinnd-zap", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                version, rid, _domain, address, *_ = self.sock.recv_multipart()
            except zmq.ZMQError:  # the context is ending
                return
            uid = uid_of(address.decode(errors="replace"))
            ok = uid in self.allowed
            if not ok and uid not in self.refused:
                self.refused.add(uid)
                log.warning("refused a connection from uid %s (%s): only uid %d and root may connect",
                            uid, address.decode(errors="replace"), os.getuid())
            self.sock.send_multipart([version, rid, b"200" if ok else b"400", b"OK" if ok else b"not this daemon's user",
                                      b"", b""])
