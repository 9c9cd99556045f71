"""deploy/djinnd.service: its sandbox (systemd-analyze), that its command line is one djinnd takes, and
the watchdog it asks for (WatchdogSec=), pinged by djinnd/sdnotify.py."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, Daemon, djinn
from djinnd import sdnotify

UNIT = ROOT / "deploy" / "djinnd.service"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed on this machine")


def unit_values(key: str) -> list[str]:
    """Every value of `key` in the unit, in order (comments and other keys left out)."""
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


@needs_analyze
def test_unit_exposure_at_most_2():
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for djinnd\.service: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert float(m.group(1)) <= 2.0, r.stdout


@needs_analyze
def test_unit_verifies_cleanly(tmp_path):
    """`systemd-analyze verify` with ExecStart=/ExecStop= pointed at this venv's djinnd: nothing said about
    the unit (lines about the machine, such as a missing D-Bus, are not the unit's)."""
    djinnd = shutil.which("djinnd", path=os.path.dirname(sys.executable)) or shutil.which("djinnd")
    if djinnd is None:
        pytest.skip("no djinnd executable to point ExecStart= at")
    text = UNIT.read_text()
    assert "/opt/djinn/.venv/bin/djinnd" in text
    (tmp_path / "djinnd.service").write_text(text.replace("/opt/djinn/.venv/bin/djinnd", str(djinnd)))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "djinnd.service")], capture_output=True,
                       text=True, timeout=60)
    about_unit = [line for line in (r.stdout + r.stderr).splitlines() if "djinnd.service" in line]
    assert about_unit == [], about_unit


def test_unit_command_line_is_one_djinnd_takes(tmp_path):
    """ExecStart='s options and the unit's environment, with its specifiers expanded to folders here, give
    the socket, logs, spill folder and model cache in the unit's own folders."""
    dirs = {"%t": tmp_path / "run", "%S": tmp_path / "lib", "%C": tmp_path / "cache", "%L": tmp_path / "log"}

    def expand(s: str) -> str:
        for spec, path in dirs.items():
            s = s.replace(spec, str(path))
        return s

    env = dict(expand(v).split("=", 1) for v in unit_values("Environment"))
    assert env["DJINN_SOCKET"] == f"{dirs['%t']}/djinn/djinnd.sock"
    assert env["DJINN_CACHE"] == f"{dirs['%C']}/djinn"
    [start] = unit_values("ExecStart")
    exe, command, *args = shlex.split(expand(start))
    assert exe.endswith("/djinnd") and command == "start"
    r = djinn("start", *args, "--print-config", program="djinnd", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["socket"] == env["DJINN_SOCKET"]
    assert config["logs_dir"] == f"{dirs['%L']}/djinn"
    assert config["spill_dir"] == f"{dirs['%S']}/djinn/spill"
    # The GPU stays reachable: no private /dev, the driver's nodes allowed, executable memory allowed (torch).
    assert unit_values("PrivateDevices") in ([], ["no"])
    assert unit_values("MemoryDenyWriteExecute") in ([], ["no"])
    assert unit_values("ProcSubset") in ([], ["all"])
    assert {"char-nvidiactl rw", "char-nvidia-uvm rw"} <= set(unit_values("DeviceAllow"))
    assert unit_values("WatchdogSec") == ["30"]


@pytest.fixture
def notify_listener(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    addr = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(addr)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


def drain(listener, timeout: float = 0.5) -> list[bytes]:
    """What arrives until nothing has for `timeout` seconds."""
    got, old = [], listener.gettimeout()
    listener.settimeout(timeout)
    try:
        while True:
            got.append(listener.recv(256))
    except TimeoutError:
        return got
    finally:
        listener.settimeout(old)


def test_watchdog_interval_only_when_asked_for_this_process(notify_listener, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    assert sdnotify.watchdog_interval() == 0.1
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 0.1
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.watchdog_interval() is None


def test_daemon_pings_watchdog_while_serving(notify_listener):
    d = Daemon("--device", "cpu", env={"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "WATCHDOG_USEC": "200000"})
    notify_listener.settimeout(60)
    try:
        d.start()
        assert notify_listener.recv(256).startswith(b"READY=1")
        notify_listener.settimeout(5)
        assert notify_listener.recv(256) == b"WATCHDOG=1"
        assert notify_listener.recv(256) == b"WATCHDOG=1"
        assert d.stop() == 0
        after = drain(notify_listener)
        assert any(b"STOPPING=1" in m for m in after), after
        stopping = next(i for i, m in enumerate(after) if b"STOPPING=1" in m)
        assert b"WATCHDOG=1" not in after[stopping:], after
    finally:
        d.remove()
