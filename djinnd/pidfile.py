"""The daemon's pidfile, locked with flock for its whole life: a second start finds it locked and
refuses; a daemon killed with -9 leaves it unlocked, so its files are known stale and removed."""

import fcntl
import logging
import os
from pathlib import Path

from . import paths

log = logging.getLogger("djinnd")


class AlreadyRunning(Exception):
    pass


def lock_pidfile(sock: Path):
    """Take the daemon's pidfile lock, cleaning the files of a dead daemon; AlreadyRunning if one lives."""
    pidfile = paths.pidfile(sock)
    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"djinnd is already running on {sock} (pid {read_pid(sock) or '?'}); "
                             f"stop it with `djinnd stop` first") from None
    stale = [p for p in (sock, paths.events_socket(sock)) if p.exists()]
    for p in stale:
        p.unlink()
    if stale or os.fstat(fd).st_size:
        log.info("removed stale files of a daemon that did not stop cleanly: %s",
                 ", ".join(str(p) for p in stale) or str(pidfile))
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def read_pid(sock: Path) -> int | None:
    try:
        return int(paths.pidfile(sock).read_text().strip())
    except (OSError, ValueError):
        return None


def is_locked(sock: Path) -> bool:
    try:
        fd = os.open(paths.pidfile(sock), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
