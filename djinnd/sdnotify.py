"""sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET."""

import os
import socket


def notify(state: str) -> bool:
    """Send e.g. "READY=1" to systemd; a no-op (False) when not run under Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
