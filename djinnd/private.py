"""djinnd in a child process of its own, for one run: a scenario with no daemon to use, a test, a
benchmark. It serves on a short socket under /tmp (ipc paths must stay under ~100 bytes), writes
its output to logs/daemon/djinnd.log, and is stopped the way systemd stops it (SIGTERM): by `stop`,
or when the process that started it is gone, even by SIGKILL. It is forked from the process's fork
server (forkserver.py), which has imported torch once for them all."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .client import Client
from .forkserver import ForkServer
from .protocol import DjinnError


def wait_serving(proc, sock: Path, timeout: float) -> str | None:
    """None once the daemon `proc` answers a ping on `sock`; else why not: it exited, or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited ({proc.returncode})"
        if sock.exists():
            try:
                with Client(sock, timeout=2) as c:
                    c.ping()
                return None
            except DjinnError:
                pass
        time.sleep(0.05)
    return f"did not serve within {timeout:.0f} s"


class PrivateDaemonError(RuntimeError):
    """It could not start; the message is its last log line."""


class PrivateDaemon:
    """`with PrivateDaemon("--device", "cpu") as d: d.client()`; `start()` returns once it serves."""

    def __init__(self, *args: str, logs: Path | None = None, folder: Path | None = None, env: dict | None = None):
        self._own_folder = folder is None  # another's (a restart on its socket) is left as it is
        self.folder = folder or Path(tempfile.mkdtemp(prefix="dj", dir="/tmp"))
        self.socket = self.folder / "run" / "djinnd.sock"
        self.logs = Path(logs) if logs else self.folder / "logs"
        self.log_file = self.logs / "daemon" / "djinnd.log"
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc = None  # a forkserver.Forked, used as a subprocess.Popen is

    def start(self, timeout: float = 300.0) -> "PrivateDaemon":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.proc = ForkServer.shared().spawn(["start", "--socket", str(self.socket), "--logs", str(self.logs), *self.args],
                                              self.env, str(self.log_file), with_parent=True)
        why = wait_serving(self.proc, self.socket, timeout)
        if why is None:
            return self
        last = self._last_line()
        self.remove()
        raise PrivateDaemonError(f"djinnd {why}: {last}")

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def output(self) -> str:
        """What it printed (its log) so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _last_line(self) -> str:
        lines = [ln for ln in self.output().splitlines() if ln.strip()]
        line = lines[-1] if lines else "no output"
        return line.split(": ", 1)[-1] if "cannot start" in line else line

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and its exit code once it is gone (killed after `timeout` seconds)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def remove(self) -> None:
        """Stop it and remove its folder (if it made it)."""
        try:
            self.stop()
        finally:
            if self._own_folder:
                shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PrivateDaemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
