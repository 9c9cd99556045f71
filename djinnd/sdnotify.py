"""sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET, and the watchdog's pings."""

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


def watchdog_interval() -> float | None:
    """Seconds between "WATCHDOG=1" pings (half of $WATCHDOG_USEC), or None when no watchdog is asked of
    this process (no $NOTIFY_SOCKET or $WATCHDOG_USEC, or $WATCHDOG_PID names another, as sd_watchdog_enabled(3))."""
    pid = os.environ.get("WATCHDOG_PID")
    if not os.environ.get("NOTIFY_SOCKET") or (pid and pid != str(os.getpid())):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
