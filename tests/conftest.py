"""Shared fixtures: a real djinnd in a subprocess, on its own short socket path."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from djinnd import ForkServer, PrivateDaemon

ROOT = Path(__file__).resolve().parent.parent


def raw_bytes(tensors) -> list:
    """A copy of each tensor's whole storage as bytes: a swap must return these exactly (comparing
    values would let NaN != NaN fail and -0 == +0 pass)."""
    from djinnd.swappool import u8
    return [u8(t.untyped_storage()).clone() for t in tensors]


@pytest.fixture(scope="session", autouse=True)
def djinn_cache(tmp_path_factory):
    """One model cache for the whole run, so tiny-llama is built once."""
    cache = tmp_path_factory.mktemp("djinn-cache")
    os.environ["DJINN_CACHE"] = str(cache)
    os.environ["DJINN_POISON_SPARES"] = "1"  # memory kept across a swap is overwritten: bit-exact checks prove the copy
    return cache


class Daemon(PrivateDaemon):
    """djinnd started in the foreground as a child process (djinnd.PrivateDaemon), with the CLIs at hand."""

    def run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a CLI (djinn / djinnd) against this daemon."""
        tool, *rest = argv
        return djinn(*rest, program=tool, env={**self.env, "DJINN_SOCKET": str(self.socket)}, timeout=timeout)


@pytest.fixture
def make_daemon():
    """Start daemons with given arguments; all are stopped at the end of the test."""
    started = []

    def make(*args, **kw) -> Daemon:
        d = Daemon(*args, **kw).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.remove()


@pytest.fixture(scope="session")
def smollm2_daemon() -> Daemon:
    """A daemon on SmolLM2-135M-Instruct (real weights), shared by the tests that read real text."""
    d = Daemon("--device", "cpu", "--model", "smollm2-135m").start()
    yield d
    d.remove()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A daemon on the CPU with tiny-llama and default settings."""
    return make_daemon("--device", "cpu")


def assert_png(r: dict, png) -> None:
    """The run drew its figure: a real PNG, named in results.json."""
    assert r["figure"] == str(png)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


CONTRACT_KEYS = {"scenario", "status", "reasons", "started_at", "finished_at", "device", "model", "params",
                 "capacity_math", "num_sessions_requested", "num_sessions_spawned", "num_sessions_completed",
                 "vram_stats", "vram_progression", "swapping_active", "swap", "integrity"}


def djinn(*args, program="djinn", env=None, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    """`djinn ARGS` (or `djinnd ARGS`) in a process of its own, as subprocess.run would run it, forked from
    the fork server (which has imported torch and transformers once for the whole test worker)."""
    with tempfile.TemporaryDirectory(prefix="djo") as out:
        stdout, stderr = f"{out}/stdout", f"{out}/stderr"
        proc = ForkServer.shared().spawn(list(args), {**os.environ, **(env or {})}, stdout, program, str(cwd), stderr)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(["djinn", *args], code, Path(stdout).read_text(), Path(stderr).read_text())


def scenario(*args, socket=None, timeout=300) -> subprocess.CompletedProcess:
    """`djinn scenario ...`; with no socket given, one where no daemon answers (a private one runs)."""
    sock = socket or Path(tempfile.mkdtemp(prefix="djn", dir="/tmp")) / "none.sock"
    return djinn("scenario", *args, env={"DJINN_SOCKET": str(sock)}, timeout=timeout)


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


async def until(pilot, cond, timeout: float = 60.0, what: str = "condition") -> float:
    """Let a Textual app under Pilot run until cond() holds; the seconds it took (the timeout only
    ends a test that would hang)."""
    import time
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)
    return time.monotonic() - t0
