"""Daemons and CLI runs forked from one process that has imported torch and transformers already.

Importing them is most of a daemon's start: several seconds of CPU each (8 s on a busy 2-core
machine), paid again by every daemon of a run that starts many (the test suite, the generality
scenario, a plan's scenario runs). The server pays it once, then forks a child per request, which
runs djinnd's or djinn's ordinary `main` with its own arguments, environment, working folder and log
file, as `python -m djinnd` would. The server starts no thread of its own, touches no device and
makes no tensor before it forks, the conditions under which torch's DataLoader forks its workers.
A `djinn` child (a scenario run, which may start private daemons of its own) gets a server of its
own, forked from itself before it runs anything.

Wire (JSON lines over the server's stdin and stdout): a request {"program", "argv", "env", "cwd",
"log", "err", "with_parent"} is answered {"pid"}; each child's end is reported {"exit": pid, "code"}.
The server ends when its stdin closes (its parent is gone); children it leaves run on, as Popen's
would, but for those asked `with_parent`: they get SIGTERM then (a private daemon of a process that
was SIGKILLed stops as `djinnd stop` stops it, instead of serving on for nobody).
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections import deque

PRELOAD = ("torch", "transformers", "djinnd.daemon", "djinnd.models", "djinnd.rows", "djinnd.runtime", "djinnd.server",
           "transformers.models.llama.modeling_llama")  # the default model's family


def main() -> None:
    from .cli_daemon import prepare_env

    prepare_env()  # before torch reads it, as djinnd's main does
    sys.stdout = sys.stderr  # stdout is the wire: what the imports print goes to stderr
    for name in PRELOAD:
        __import__(name)
    _run(_serve())  # _serve returns in a forked child only


def _run(request: dict) -> None:
    """The child: become what the request asks for and run its main."""
    if request.get("with_parent"):
        _die_with(request["server"])
    _become(request)
    if request["program"] == "djinn":
        from .cli import main
        ForkServer._shared = ForkServer(fork=True)  # while this process has no thread yet
    else:
        from .cli_daemon import main
    main()


def _serve() -> dict:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below through wake_w
    buf = b""
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 512)
            _reap()
        if 0 in ready:
            data = os.read(0, 65536)
            if not data:
                sys.exit(0)  # the parent is gone
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = {**json.loads(line), "server": os.getpid()}
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r), os.close(wake_w)
                    return request
                _send({"pid": pid})


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _die_with(server: int) -> None:
    """SIGTERM this child when the server that forked it ends (Linux's parent-death signal)."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: it runs on, as before
        return
    if os.getppid() != server:  # the server ended before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def _send(msg: dict) -> None:
    os.write(1, json.dumps(msg).encode() + b"\n")


def _become(request: dict) -> None:
    """The child: stdin from /dev/null, stdout and stderr to its log (stderr to its own file when the
    request names one), its folder, environment and argv."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # and so the server's pipes close here
    os.close(null)
    for fd, path in ((1, request["log"]), (2, request.get("err") or request["log"])):
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout = sys.__stdout__
    sys.argv = [request["program"], *request["argv"]]


class ForkServer:
    """The parent's side: `spawn` a daemon, read its exit code. One per process, shared by threads."""

    _shared: "ForkServer | None" = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "ForkServer":
        with cls._shared_lock:
            if cls._shared is None or cls._shared.gone:
                cls._shared = cls()
            return cls._shared

    def __init__(self, fork: bool = False):
        """A server process of its own (imports included), or with `fork` this process forked, when it has
        imported them and runs no thread."""
        if fork:
            self.proc = _ForkedServer()
        else:
            self.proc = subprocess.Popen([sys.executable, "-c", "from djinnd.forkserver import main; main()"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        self.cond = threading.Condition()
        self.pending: deque[list] = deque()  # a slot per spawn awaiting its pid, in order
        self.codes: dict[int, int] = {}
        self.gone = False
        threading.Thread(target=self._read, name="djinnd-forkserver", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "pid" in msg:
                    self.pending.popleft().append(msg["pid"])
                else:
                    self.codes[msg["exit"]] = msg["code"]
                self.cond.notify_all()
        with self.cond:
            self.gone = True
            self.cond.notify_all()

    def spawn(self, argv: list[str], env: dict, log: str, program: str = "djinnd", cwd: str | None = None,
              err: str | None = None, with_parent: bool = False) -> "Forked":
        """`program` ("djinnd" or "djinn") with `argv`, its output to the file `log` (stderr to `err` if
        given); `with_parent`: SIGTERM it when this process (and so its server) is gone."""
        slot: list = []
        request = {"program": program, "argv": argv, "env": env, "cwd": cwd or os.getcwd(), "log": log, "err": err,
                   "with_parent": with_parent}
        request = json.dumps(request).encode() + b"\n"
        with self.cond:
            if self.gone:
                raise RuntimeError(f"the fork server exited ({self.proc.poll()})")
            self.pending.append(slot)
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            if not self.cond.wait_for(lambda: slot or self.gone, 600) or not slot:
                raise RuntimeError(f"the fork server did not fork (exit code {self.proc.poll()})")
        return Forked(self, slot[0])

    def code(self, pid: int, timeout: float | None) -> int | None:
        """The child's exit code, or None while it runs after `timeout` seconds."""
        with self.cond:
            self.cond.wait_for(lambda: pid in self.codes or self.gone, timeout)
            if pid not in self.codes and self.gone:
                raise RuntimeError(f"the fork server exited ({self.proc.poll()}): djinnd {pid}'s exit code is lost")
            return self.codes.get(pid)


class _ForkedServer:
    """This process forked into a server, seen as Popen sees one: stdin, stdout, poll."""

    def __init__(self):
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the server; it never returns into its parent's code
            code = 0
            try:
                os.dup2(req_r, 0), os.dup2(resp_w, 1)
                for fd in (req_r, req_w, resp_r, resp_w):
                    os.close(fd)
                sys.stdout = sys.stderr
                _run(_serve())  # in a forked child only: the server itself leaves by SystemExit
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - said on stderr, as an uncaught exception is
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        os.close(req_r), os.close(resp_w)
        self.stdin, self.stdout = os.fdopen(req_w, "wb"), os.fdopen(resp_r, "rb")

    def poll(self) -> int | None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid else None


class Forked:
    """A forked child, used as a subprocess.Popen is: pid, poll, wait, send_signal, kill, returncode."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.code(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.code(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(["djinnd", str(self.pid)], timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped, so the pid is still this child's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
