"""Scenario runs launched through the daemon (by the console): each is a scenario-run subprocess,
a client like any other, which the daemon tracks and can abort. The catalog, and the command that
runs a scenario, are handed to the daemon (the `djinn.scenarios` entry point): it imports no scenario."""

import itertools
import json
import subprocess
import threading
import time
from pathlib import Path

from .protocol import DjinnError
from .telemetry import compact_stamp


class ScenarioRuns:
    def __init__(self, sock: Path, logs_dir: Path, bus, catalog: dict):
        self.sock, self.logs_dir, self.bus = sock, Path(logs_dir), bus
        self._catalog, self._run = catalog["scenarios"], catalog["run"]
        self._runs: dict[int, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def catalog(self) -> list[dict]:
        return self._catalog

    def start(self, name: str, sets: dict) -> dict:
        if name not in {sc["name"] for sc in self._catalog}:
            raise DjinnError("unknown_scenario", f"unknown scenario {name!r}")
        run = next(self._ids)
        out = self.logs_dir / name / compact_stamp()
        argv = [*self._run, name, "--headless", "--socket", str(self.sock), "--output", str(out), "--run-id", str(run)]
        for k, v in sets.items():
            argv += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "runner.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        rec = {"run": run, "name": name, "output": str(out), "pid": proc.pid, "started": time.time(),
               "status": "running", "proc": proc}
        with self._lock:
            self._runs[run] = rec
        threading.Thread(target=self._watch, args=(rec,), daemon=True).start()
        return {"run": run, "output": str(out)}

    def _watch(self, rec: dict) -> None:
        code = rec["proc"].wait()
        status = {0: "pass", 1: "fail", 2: "skipped"}.get(code, "error")
        if rec["status"] == "aborting":
            status = "aborted"
        try:
            status = json.loads((Path(rec["output"]) / "results.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            pass
        rec["status"] = status if rec["status"] != "aborting" else "aborted"
        rec["exit_code"] = code
        self.bus.emit("scenario", run=rec["run"], name=rec["name"], action="exited", status=rec["status"],
                      exit_code=code, output=rec["output"])

    def abort(self, run) -> dict:
        rec = self._runs.get(run)
        if rec is None:
            raise DjinnError("bad_params", f"no scenario run {run!r}")
        if rec["proc"].poll() is None:
            rec["status"] = "aborting"
            rec["proc"].terminate()
        return {}

    def abort_all(self) -> None:
        for rec in list(self._runs.values()):
            if rec["proc"].poll() is None:
                rec["status"] = "aborting"
                rec["proc"].terminate()

    def runs(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "proc"} for r in self._runs.values()]
