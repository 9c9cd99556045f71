"""Runs a scenario: finds (or starts) the daemon, runs each parameter point into its own folder,
and writes results.json, events.jsonl and vram.csv there.

A runner module has `needs_daemon(params) -> bool` and `run(ctx, params) -> (results, criteria)`;
everything it reports is measured during its run. The Context gives it the daemon, progress,
and settings (budget, swap) that are put back afterwards, so a shared daemon is left as found.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import statistics
import threading
import time
import traceback
from pathlib import Path

from djinnd import (Client, DjinnError, PrivateDaemon, PrivateDaemonError, compact_stamp, default_logs_dir, percentile,
                    resolve_socket, utc_stamp)

from .catalog import Scenario
from .common import Skip
from .recorder import EventLog, Recorder

EXIT = {"pass": 0, "fail": 1, "skipped": 2, "error": 2}
SIDE_TIMEOUT_S = 10.0  # a runner thread's progress event: not worth waiting longer for


class Context:
    """What a runner uses: the daemon client, progress and notes, settings restored after the run."""

    def __init__(self, scenario: Scenario, params: dict, kind: str, client: Client | None, folder: Path,
                 run_id, ui, notes: list[str] | None = None):
        self.scenario, self.params, self.kind, self.client, self.ui = scenario, params, kind, client, ui
        self.folder = folder
        self.run_label = run_id if run_id is not None else f"cli-{os.getpid()}"
        self.log = EventLog(folder / "events.jsonl")
        self.recorder: Recorder | None = None
        self.notes: list[str] = list(notes or [])
        self.budget: int | None = None
        self.capacity: int = 0
        self.sessions: set[int] = set()
        self._restore: dict = {}
        self._t0_ns = time.monotonic_ns()
        self._status0: dict | None = None
        self._done = (0, 0)  # the last progress reported
        # A runner's client threads report progress too: through a client of their own (a zmq socket
        # is one thread's: the run's thread keeps `client`), one at a time, and none once the cleanup
        # has begun (an interrupted run's threads may still run).
        self._lock = threading.RLock()
        self._owner = threading.get_ident()
        self._side: Client | None = None
        self._closing = False

    # -- lifecycle (the harness) -------------------------------------------------------------------
    def open(self) -> None:
        if self.client is None:
            return
        self.recorder = Recorder(self.client.socket_path, self.log).start()
        if self.recorder.error:
            raise Skip(f"cannot follow the daemon's event stream: {self.recorder.error}")
        self.begin()

    def close(self, last_seq: int | None) -> None:
        if self.recorder is not None:
            if last_seq:
                self.recorder.wait_for(last_seq)
            self.recorder.stop()
        with self._lock:
            if self._side is not None:
                self._side.close_socket()
        self.log.close()

    def cleanup(self) -> None:
        """Close the run's sessions and put the daemon's settings back."""
        with self._lock:
            self._closing = True
        if self.client is None:
            return
        for sid in sorted(self.sessions.copy()):  # (agent threads may still add and remove theirs)
            self.close_session(sid)
        if "swap" in self._restore:
            self._quiet(self.client.set_swap, self._restore.pop("swap"))
        if "budget" in self._restore:
            self._quiet(self.client.set_budget, self._restore.pop("budget"))

    @staticmethod
    def _quiet(fn, *args):
        try:
            fn(*args)
        except DjinnError:
            pass

    # -- output ------------------------------------------------------------------------------------
    def event(self, action: str, **fields) -> int | None:
        """A `scenario` event: through the daemon (so the console sees it) when there is one."""
        fields = {"run": self.run_label, "name": self.scenario.name, "action": action, **fields}
        with self._lock:
            if self._shut_out():
                return None
            if self.client is not None:
                try:
                    return self._client_here().emit("scenario", **fields)
                except DjinnError:
                    pass
            self.log.local("scenario", **fields)
        return None

    def _shut_out(self) -> bool:  # holding _lock
        return self._closing and threading.get_ident() != self._owner

    def _client_here(self) -> Client:  # holding _lock
        """`client` on the run's own thread; on any other, the client those threads share."""
        if threading.get_ident() == self._owner:
            return self.client
        if self._side is None:
            self._side = self.client.twin(SIDE_TIMEOUT_S)
        return self._side

    def progress(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            if self._shut_out():
                return
            self._done = (done, total)
            self.ui.progress(self.scenario.name, done, total, message)
            self.event("progress", done=done, total=total, message=message)

    def advance(self, total: int, message: str = "") -> None:
        """One more of `total` steps done, from whichever of the runner's threads."""
        with self._lock:
            self.progress(self._done[0] + 1, total, message)

    @property
    def done(self) -> int:
        return self._done[0]

    def say(self, text: str) -> None:
        self.ui.line(text)

    def note(self, text: str) -> None:
        """A fact about the run that a reader of results.json must know (kept in `notes`)."""
        self.notes.append(text)
        self.ui.warn(text)

    # -- the daemon --------------------------------------------------------------------------------
    def status(self) -> dict:
        return self.client.status()

    def check_model(self, asked: str, running: str) -> None:
        if asked != running:
            self.note(f"the daemon runs {running}; the scenario asks for {asked}: measuring {running}")

    def daemon_status(self, asked_model: str) -> dict:
        """The daemon's status, noting what a reader must know: another model, other sessions sharing the budget."""
        st = self.status()
        self.check_model(asked_model, st["model"]["name"])
        if st["sessions"]:
            self.note(f"the daemon already holds {st['sessions']} other sessions; they share the budget")
        return st

    def set_budget(self, budget: int) -> None:
        old = self.status()["memory"]["budget_bytes"]
        self.client.set_budget(budget)
        self._restore.setdefault("budget", old)
        self.budget = budget

    def set_swap(self, enabled: bool) -> None:
        was = self.status()["memory"].get("swap_enabled", True)
        try:
            self.client.set_swap(enabled)
        except DjinnError as e:
            if e.code == "unknown_method":
                raise Skip("this daemon cannot switch swapping off (no memory.set_swap)") from None
            raise
        self._restore.setdefault("swap", was)

    def create_session(self, **kw) -> int:
        sid = self.client.create_session(**kw)
        self.sessions.add(sid)
        return sid

    def close_session(self, sid: int) -> None:
        self.sessions.discard(sid)
        self._quiet(self.client.close, sid)

    # -- measuring ---------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start the measured window: figures and samples count from here."""
        self._t0_ns = time.monotonic_ns()
        if self.client is not None:
            self.client.reset_peak()  # the daemon's peak then counts this run alone
            self._status0 = self.client.status()

    def sample(self, used: int) -> None:
        """A device-memory sample taken in this process (in-process baselines have no daemon to sample)."""
        self.log.local("vram", used_bytes=used, budget_bytes=self.budget, capacity_bytes=self.capacity)

    def measure(self, local: bool = False) -> dict:
        """vram_stats, swap and swapping_active over the window, from the samples, events and counters.

        `local`: the figures are this process's own samples (an in-process baseline), not the daemon's.
        """
        done, total = self._done
        seq = self.event("progress", done=done, total=total, message="measuring")
        if self.recorder is not None and seq:
            self.recorder.wait_for(seq)
        samples = self.log.of_type("vram", since_ns=self._t0_ns)
        used = [e["used_bytes"] for e in samples if local == (e.get("origin") == "scenario")]
        peak, device_peak, reserved_peak, source = None, None, None, "samples"
        swap = {"swap_outs": 0, "swap_ins": 0, "bytes_out": 0, "bytes_in": 0}
        if not local and self.client is not None and self._status0 is not None:
            st = self.client.status()
            peak, source = st["memory"]["peak_device_bytes"], "the daemon's peak counter over the run, and samples"
            device_peak = st["memory"].get("max_allocated_bytes")  # CUDA: the allocator's own peak
            reserved_peak = st["memory"].get("max_reserved_bytes")
            swap = {k: st["swap"][k] - self._status0["swap"][k] for k in swap}
        swaps = [] if local else self.log.of_type("swap_out", "swap_in", since_ns=self._t0_ns)
        ms = [e["ms"] for e in swaps]
        swap["latency_ms"] = {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms) if ms else None}
        swap["throughput_gbps"] = {"p50": percentile([e["gbps"] for e in swaps if e.get("gbps")], 50)}
        swap["events_seen"] = len(swaps)
        if self.recorder is not None:
            swap["events_lost"] = self.recorder.lost
        tops = used + ([peak] if peak is not None else [])
        stats = {"min_bytes": min(used) if used else None, "max_bytes": max(tops) if tops else None,
                 "avg_bytes": round(statistics.fmean(used)) if used else None, "budget_bytes": self.budget,
                 "samples": len(used), "peak_device_bytes": peak, "max_source": source,
                 "allocator_peak_bytes": device_peak, "allocator_reserved_peak_bytes": reserved_peak}
        return {"vram_stats": stats, "swap": swap, "swapping_active": swap["swap_outs"] > 0}


# -- one parameter point -------------------------------------------------------------------------------
CONTRACT_KEYS = ("capacity_math", "num_sessions_requested", "num_sessions_spawned", "num_sessions_completed",
                 "vram_stats", "swapping_active", "swap", "integrity")


def device_problem(params: dict, kind: str, daemon: bool) -> str | None:
    want = params.get("device", "auto")
    if want in ("auto", kind):
        return None
    where = "the daemon runs on" if daemon else "this machine has only"
    return f"needs {want.upper() if want == 'cuda' else want}, but {where} {'the CPU' if kind == 'cpu' else 'CUDA'}"


def run_point(sc: Scenario, module, params: dict, kind: str, client: Client | None, folder: Path, run_id, ui,
              problem: str | None = None, notes: list[str] | None = None) -> dict:
    """Run one parameter point into `folder`; its results (also written there)."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = Context(sc, params, kind, client, folder, run_id, ui, notes)
    results = {"scenario": sc.name, "status": "error", "reasons": [], "started_at": utc_stamp(), "finished_at": None,
               "wall_s": None, "output": str(folder), "device": None, "model": None, "params": params,
               **{k: None for k in CONTRACT_KEYS}, "vram_progression": [], "notes": ctx.notes}
    t0 = time.perf_counter()
    interrupted = False
    try:
        problem = problem or device_problem(params, kind, client is not None)
        if problem:
            raise Skip(problem)
        if module.needs_daemon(params) and client is None:
            raise Skip("no daemon to run on")
        ctx.open()
        if client is not None:
            st = ctx.status()
            results["device"] = {k: st["device"][k] for k in ("kind", "name", "capacity_bytes")}
            results["model"] = st["model"]
            ctx.capacity = st["device"]["capacity_bytes"]
        ctx.event("started", params=params, output=str(folder))
        body, criteria = module.run(ctx, params)
        results.update(body)
        results["criteria"] = criteria
        failed = [c for c in criteria if c["ok"] is False]
        results["status"] = "fail" if failed else "pass"
        results["reasons"] = [f"{c['text']}: {c['measured']}" for c in failed]
    except Skip as e:
        results["status"], results["reasons"] = "skipped", [str(e)]
    except DjinnError as e:
        results["status"], results["reasons"] = "fail", [f"the daemon failed the run: {e.code}: {e}"]
    except KeyboardInterrupt:
        results["status"], results["reasons"], interrupted = "error", ["aborted"], True
    except Exception as e:  # a runner bug: say what, keep the trace beside the results
        (folder / "error.txt").write_text(traceback.format_exc())
        results["status"], results["reasons"] = "error", [f"{type(e).__name__}: {e} (trace in error.txt)"]
    finally:
        ctx.cleanup()
        results["finished_at"] = utc_stamp()
        results["wall_s"] = round(time.perf_counter() - t0, 3)
        last_seq = None
        try:
            last_seq = ctx.event("aborted" if interrupted else "finished", status=results["status"],
                                 output=str(folder), reasons=results["reasons"])
        finally:
            ctx.close(last_seq)
            _write(folder, results, ctx.log)
    if interrupted:
        raise KeyboardInterrupt
    return results


def _write(folder: Path, results: dict, log: EventLog) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(folder / "vram.csv", "w", newline="") as f:
        w = csv.writer(f)
        samples = log.of_type("vram")
        own = [e for e in samples if e.get("origin") == "scenario"]  # an in-process baseline's own samples
        rows = own or samples
        if rows and any(e.get("allocated_bytes") is not None for e in rows):
            # CUDA: `used` is what the device reports (the allocator's allocated bytes), the books beside;
            # drift = allocated - its load baseline - ledger (djinnd/telemetry.py)
            w.writerow(["timestamp", "used", "budget", "capacity", "ledger", "allocated", "reserved", "nvml_used",
                        "drift", "drift_limit"])
            for e in rows:
                w.writerow([e["ts"], e.get("allocated_bytes"), e.get("budget_bytes"), e.get("capacity_bytes"),
                            e.get("ledger_bytes", e.get("used_bytes")), e.get("allocated_bytes"), e.get("reserved_bytes"),
                            e.get("nvml_used_bytes"), e.get("drift_bytes"), e.get("drift_limit_bytes")])
            return
        w.writerow(["timestamp", "used", "budget", "capacity"])
        for e in rows:
            w.writerow([e["ts"], e.get("used_bytes"), e.get("budget_bytes"), e.get("capacity_bytes")])


# -- a whole run (one point or a sweep) ----------------------------------------------------------------
def connect(socket) -> Client | None:
    """A client of the daemon on `socket`, or None when none answers."""
    with Client(socket, timeout=3) as probe:  # a daemon that answers answers at once
        try:
            probe.ping()
        except DjinnError:
            return None
    return Client(socket)


def local_kind(sets: dict) -> str:
    want = (sets.get("device") or ["auto"])[0]
    if want == "cpu":
        return "cpu"
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def out_folder(output: Path | None, name: str) -> Path:
    if output is not None:
        return Path(output)
    base = default_logs_dir() / name
    stamp = compact_stamp()
    folder, n = base / stamp, 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    return folder


def point_name(point: dict, sets: dict) -> str:
    return "_".join(f"{k}-{point[k]}" for k in sets if len(sets[k]) > 1)


def run_scenario(sc: Scenario, sets: dict, output: Path | None, socket, run_id, ui,
                 daemon_args: tuple[str, ...] = ()) -> tuple[int, dict]:
    """Run every point; (exit code, results.json or summary.json). `daemon_args` go to the private daemon
    the run starts when none answers on the socket."""
    module = importlib.import_module(sc.runner)
    root = out_folder(output, sc.name)
    client = connect(socket)
    kind = client.status()["device"]["kind"] if client else local_kind(sets)
    points = sc.points(kind, sets)
    private, problem = None, None
    try:
        need = [p for p in points if module.needs_daemon(p) and not device_problem(p, kind, False)]
        if client is None and need:
            first = need[0]
            device = {"cpu": "cpu", "cuda": "cuda"}.get(first.get("device"), "auto")
            ui.warn(f"no djinnd answers on {resolve_socket(socket)}: starting a private one for this run "
                    f"({first.get('model', 'tiny-llama')} on {device})")
            try:
                args = ["--device", device] + (["--model", first["model"]] if first.get("model") else [])
                if isinstance(first.get("budget"), int):
                    args += ["--vram-budget", str(first["budget"])]
                args += daemon_args
                private = PrivateDaemon(*args, logs=root).start(timeout=900)  # a 13B model loads for minutes
                client = Client(private.socket)
            except PrivateDaemonError as e:
                problem = str(e)
        sweep = len(points) > 1
        notes = [" ".join(["ran on a private djinnd started for this run", *daemon_args])] if private is not None else []
        runs = []
        for i, p in enumerate(points):
            folder = root / point_name(p, sets) if sweep else root
            if sweep:
                ui.line(f"point {i + 1}/{len(points)}: {point_name(p, sets)}")
            res = run_point(sc, module, p, kind, client, folder, run_id, ui,
                            problem if module.needs_daemon(p) else None, notes)
            ui.verdict(res, sc)
            runs.append(res)
    finally:
        if client is not None:
            client.close_socket()
        if private is not None:
            private.remove()
    if not sweep:
        return EXIT[runs[0]["status"]], runs[0]
    summary = _summary(sc, sets, runs, root)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ui.summary(summary)
    return EXIT[summary["status"]], summary


def _summary(sc: Scenario, sets: dict, runs: list[dict], root: Path) -> dict:
    swept = [k for k in sets if len(sets[k]) > 1]
    statuses = {r["status"] for r in runs}
    status = next(s for s in ("fail", "error", "skipped", "pass") if s in statuses)
    rows = []
    for r in runs:
        vs, sw, integ = r.get("vram_stats") or {}, r.get("swap") or {}, r.get("integrity") or {}
        rows.append({**{k: r["params"][k] for k in swept}, "status": r["status"],
                     "completed": r.get("num_sessions_completed"), "requested": r.get("num_sessions_requested"),
                     "max_bytes": vs.get("max_bytes"), "budget_bytes": vs.get("budget_bytes"),
                     "swap_outs": sw.get("swap_outs"), "mismatches": integ.get("mismatches"),
                     **r.get("headline", {}), "wall_s": r["wall_s"], "folder": str(Path(r["output"]).relative_to(root)),
                     "reasons": r["reasons"]})
    return {"scenario": sc.name, "status": status, "sweep": {k: sets[k] for k in swept}, "output": str(root),
            "started_at": runs[0]["started_at"], "finished_at": runs[-1]["finished_at"], "points": rows}
