"""A private djinnd for one `scenario run` when no daemon answers on the socket.

It lives on a short socket path under /tmp (ipc paths must stay under ~100 bytes), logs into
the run's folder, and is stopped (and its folder removed) when the run ends.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from djinnd import Client, DjinnError


class PrivateDaemonError(RuntimeError):
    """The private daemon could not start; the message is its last log line."""


class PrivateDaemon:
    def __init__(self, logs: Path, device: str = "auto", model: str | None = None, budget: int | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="djsc-", dir="/tmp"))
        self.socket = self.folder / "djinnd.sock"
        self.logs = Path(logs)
        self.log_file = self.logs / "daemon" / "djinnd.log"
        self.argv = ["--socket", str(self.socket), "--device", device, "--logs", str(self.logs)]
        if model:
            self.argv += ["--model", model]
        if budget is not None:
            self.argv += ["--vram-budget", str(budget)]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900.0) -> "PrivateDaemon":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "djinnd", "start", *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._remove()
                raise PrivateDaemonError(f"the private djinnd exited ({self.proc.returncode}): {self._last_line()}")
            if self.socket.exists():
                try:
                    with Client(self.socket, timeout=2) as c:
                        c.ping()
                    return self
                except DjinnError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise PrivateDaemonError(f"the private djinnd did not serve within {timeout:.0f} s (see {self.log_file})")

    def _last_line(self) -> str:
        try:
            lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        line = lines[-1] if lines else "no output"
        return line.split(": ", 1)[-1] if "cannot start" in line else line

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                with Client(self.socket, timeout=5) as c:
                    c.shutdown()
            except DjinnError:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
