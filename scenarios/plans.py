"""Experiment plans: scenarios x parameter points x repeats, run unattended and resumable.

A plan is a TOML file (shipped in scenarios/plans/, or any path ending in .toml):

    title = "exp3 and agents at CPU scale"
    repeats = 3
    [scenarios.exp3]
    sessions = [8, 16, 24]       # a list: a point per value (several lists: every combination)
    budget_fraction = 0.5        # one value: set at every point
    timeout_s = 600              # (not a parameter) a run still going then is stopped, and fails
    private_daemon = true        # (not a parameter) each run starts a daemon of its own on the point's
                                 # model and device: a point that cannot have its model says skipped
    daemon = ["", "--host-pool 0"]  # (not a parameter; with private_daemon) its djinnd start arguments,
                                 # swept like a parameter: point ids say daemon=default, daemon=--host-pool_0

Each run is `djinn scenario run NAME --headless --set ... --output logs/plans/<plan>/<point>/<stamp>`
in a process of its own, so a point that breaks stops nothing else; `outcome.json` beside its
results records how the process ended. A run folder without one was interrupted and does not
count. A point is done once it holds `repeats` finished runs (a verdict: pass, fail or skipped);
a rerun runs only what is missing, `--force` runs every point's repeats anew. One runner per plan
at a time: it holds a lock on the plan's folder.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import statistics
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from djinnd import ForkServer, default_logs_dir

from . import catalog
from .figures import figure

HERE = Path(__file__).parent / "plans"
FINISHED = ("pass", "fail", "skipped")
# Student's t at 97.5% for 1..30 degrees of freedom (a 95% interval around a mean of few repeats)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class PlanError(ValueError):
    """A plan that cannot be read or run: its message is the one line the user sees."""


@dataclass
class Point:
    id: str  # scenario and swept values, e.g. "exp3-sessions=8": its folder's name
    scenario: str
    sets: dict  # key -> the value's text, as `--set key=text` takes it
    timeout_s: float | None = None
    private_daemon: bool = False
    daemon_args: str = ""  # djinnd start arguments of its private daemon


@dataclass
class Plan:
    name: str
    title: str
    repeats: int
    points: list[Point]

    @property
    def folder(self) -> Path:
        return default_logs_dir() / "plans" / self.name

    def point(self, pid: str) -> Point:
        for p in self.points:
            if p.id == pid:
                return p
        raise PlanError(f"plan {self.name} has no point {pid!r} (points: {', '.join(p.id for p in self.points)})")


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load(name: str) -> Plan:
    """The plan NAME (shipped) or at a path ending in .toml; PlanError says what is wrong with it."""
    path = Path(name) if name.endswith(".toml") else HERE / f"{name}.toml"
    if not path.is_file():
        raise PlanError(f"no plan {name!r} (shipped: {', '.join(names())}; or give a path to a .toml file)")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"cannot read plan {path}: {e}") from None
    repeats = raw.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise PlanError(f"plan {path}: repeats must be a whole number >= 1, got {repeats!r}")
    scenarios = raw.get("scenarios")
    if not isinstance(scenarios, dict) or not scenarios:
        raise PlanError(f"plan {path} names no scenarios (a [scenarios.NAME] table each)")
    points = []
    for sname, params in scenarios.items():
        points += _points(path, sname, params)
    return Plan(path.stem, str(raw.get("title", path.stem)), repeats, points)


def _points(path: Path, sname: str, params) -> list[Point]:
    sc = catalog.find(sname)
    if sc is None:
        raise PlanError(f"plan {path}: unknown scenario {sname!r}")
    if not isinstance(params, dict):
        raise PlanError(f"plan {path}: [scenarios.{sname}] must be a table of parameters")
    params = dict(params)
    timeout = params.pop("timeout_s", None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise PlanError(f"plan {path}: {sname}: timeout_s must be a number of seconds > 0, got {timeout!r}")
    private = params.pop("private_daemon", False)
    if not isinstance(private, bool):
        raise PlanError(f"plan {path}: {sname}: private_daemon must be true or false, got {private!r}")
    daemons = params.pop("daemon", [""])
    daemons = daemons if isinstance(daemons, list) else [daemons]
    if not all(isinstance(d, str) for d in daemons) or (daemons != [""] and not private):
        raise PlanError(f"plan {path}: {sname}: daemon must be djinnd start arguments (a string or a list of them), "
                        f"with private_daemon = true; got {daemons!r}")
    texts = {k: [_text(x) for x in v] if isinstance(v, list) else [_text(v)] for k, v in params.items()}
    try:
        sc.parse_sets([f"{k}={t}" for k, ts in texts.items() for t in ts])  # each value checked as --set checks it
    except catalog.ParamError as e:
        raise PlanError(f"plan {path}: {sname}: {e}") from None
    swept = [k for k, ts in texts.items() if len(ts) > 1]
    out = []
    for daemon in daemons:
        label = [f"daemon={'_'.join(daemon.split()) or 'default'}"] if len(daemons) > 1 else []
        for combo in itertools.product(*texts.values()):
            sets = dict(zip(texts, combo))
            pid = "-".join([sname] + [f"{k}={sets[k]}" for k in swept] + label)
            out.append(Point(pid, sname, sets, timeout, private, daemon))
    return out


def _text(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


# -- what is on disk ------------------------------------------------------------------------------
@dataclass
class Run:
    folder: Path
    status: str  # pass, fail, skipped: finished; error: it broke
    reason: str
    results: dict | None


def runs(plan: Plan, point: Point) -> list[Run]:
    """The point's runs that ended (interrupted ones have no outcome.json), oldest first."""
    return [r for r in map(_read_run, sorted((plan.folder / point.id).glob("*/"))) if r is not None]


def _read_run(folder: Path) -> Run | None:
    try:
        outcome = json.loads((folder / "outcome.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    status = results.get("status") if results else None
    if outcome.get("timed_out") or status not in FINISHED or outcome["exit_code"] not in (0, 1, 2):
        why = [] if outcome.get("timed_out") else (results or {}).get("reasons") or []
        return Run(folder, "error", (why or [outcome["reason"] or f"exit code {outcome['exit_code']}"])[0], results)
    return Run(folder, status, "; ".join(results.get("reasons") or []), results)


def finished(plan: Plan, every: list[Run]) -> list[Run]:
    """The newest `repeats` finished runs among a point's (what its figures are made of)."""
    return [r for r in every if r.status in FINISHED][-plan.repeats:]


def running(plan: Plan) -> dict | None:
    """{"pid", "point"} of the runner at work on this plan now, if one is."""
    try:
        with open(plan.folder / ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                return json.loads((plan.folder / "running.json").read_text())
    except (OSError, ValueError):
        return None


def status(plan: Plan) -> list[dict]:
    """Each point: state (done, failed, pending, running), runs finished of repeats, verdicts, figures."""
    now = running(plan) or {}
    rows = []
    for p in plan.points:
        every = runs(plan, p)
        done = finished(plan, every)
        last = every[-1] if every else None
        if now.get("point") == p.id:
            state = "running"
        elif len(done) >= plan.repeats:
            state = "done"
        elif last is not None and last.status == "error":
            state = "failed"
        else:
            state = "pending"
        verdicts = {}
        for r in done:
            verdicts[r.status] = verdicts.get(r.status, 0) + 1
        rows.append({"point": p.id, "scenario": p.scenario, "sets": p.sets, "state": state, "finished": len(done),
                     "repeats": plan.repeats, "verdicts": verdicts, "figures": figures(done),
                     "reason": last.reason if state == "failed" else (done[-1].reason if done else "")})
    return rows


def figures(done: list[Run]) -> dict:
    """Each compared figure (the headline's numbers; sessions completed, peak device bytes, swap-outs
    and wall seconds, which every results.json has) over the runs: n, mean, and the half-width of its
    95% confidence interval (Student's t; None for one run)."""
    values: dict[str, list[float]] = {}
    for r in done:
        res = r.results or {}
        common = {"completed": res.get("num_sessions_completed"), "peak_bytes": (res.get("vram_stats") or {}).get("max_bytes"),
                  "swap_outs": (res.get("swap") or {}).get("swap_outs"), "wall_s": res.get("wall_s")}
        for k, v in {**(res.get("headline") or {}), **common}.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, xs in values.items():
        n = len(xs)
        ci = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(xs) / math.sqrt(n) if n > 1 else None
        out[k] = {"n": n, "mean": statistics.fmean(xs), "ci95": ci}
    return out


# -- running ---------------------------------------------------------------------------------------
def run(plan: Plan, only: str | None, force: bool, socket: str | None, say) -> int:
    """Run what the plan misses (all of it with `force`); 0 every verdict pass or skipped, 1 one
    failed, 2 a run broke. Refused while another runner holds the plan."""
    points = [plan.point(only)] if only else plan.points
    plan.folder.mkdir(parents=True, exist_ok=True)
    with open(plan.folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = running(plan) or {}
            raise PlanError(f"plan {plan.name} is already running (pid {who.get('pid', '?')}); "
                            "wait for it or stop it first") from None
        try:
            return _run_points(plan, points, force, socket, say)
        finally:
            (plan.folder / "running.json").unlink(missing_ok=True)


def _run_points(plan: Plan, points: list[Point], force: bool, socket: str | None, say) -> int:
    code = 0
    for i, p in enumerate(points):
        have = 0 if force else len(finished(plan, runs(plan, p)))
        todo = plan.repeats - have
        if todo <= 0:
            say(f"[{i + 1}/{len(points)}] {p.id}: done ({have} runs), skipped")
            continue
        for r in range(todo):
            (plan.folder / "running.json").write_text(json.dumps({"pid": os.getpid(), "point": p.id}))
            say(f"[{i + 1}/{len(points)}] {p.id}: run {r + 1} of {todo}")
            outcome = _run_once(plan, p, socket)
            say(f"    {outcome['status']}" + (f": {outcome['reason']}" if outcome["reason"] else ""))
            if outcome["status"] == "error":
                code = 2
                break  # its other repeats would break the same way; the next point goes on
            if outcome["status"] == "fail":
                code = max(code, 1)
    return code


def _run_once(plan: Plan, p: Point, socket: str | None) -> dict:
    folder = plan.folder / p.id / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    folder.mkdir(parents=True)
    argv = ["scenario", "run", p.scenario, "--headless", "--output", str(folder)]
    argv += [x for k, v in p.sets.items() for x in ("--set", f"{k}={v}")]
    with tempfile.TemporaryDirectory(prefix="djp", dir="/tmp") as nowhere:
        if p.private_daemon:  # a socket where no daemon answers: the run starts its own
            socket = str(Path(nowhere) / "none.sock")
        argv += ["--socket", socket] if socket else []
        argv += ["--daemon-args", p.daemon_args] if p.daemon_args else []
        # `djinn scenario run ...` forked from a process that has imported torch once for every run
        proc = ForkServer.shared().spawn(argv, dict(os.environ), str(folder / "run.log"), "djinn",
                                         str(Path(__file__).parent.parent))
        timed_out = False
        try:
            code = proc.wait(p.timeout_s)
        except subprocess.TimeoutExpired:  # stopped as Ctrl-C stops it: its daemon and sessions are cleaned up
            timed_out = True
            code = _stop(proc)
        except BaseException:  # interrupted: the run stops too, and leaves no outcome (it does not count)
            _stop(proc)
            raise
    lines = [ln for ln in (folder / "run.log").read_text(errors="replace").splitlines() if ln.strip()]
    reason = f"ran past its {p.timeout_s:g} s limit and was stopped" if timed_out else (lines[-1] if lines else "")
    (folder / "outcome.json").write_text(json.dumps({"exit_code": code, "reason": reason, "timed_out": timed_out}))
    run = _read_run(folder)
    return {"status": run.status, "reason": run.reason}


def _stop(proc) -> int:
    proc.terminate()
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- the report ------------------------------------------------------------------------------------
def report(plan: Plan) -> list[Path]:
    """report.md, report.json and a PNG per scenario (each figure's mean and 95% interval at each
    point) in the plan's folder; the paths written."""
    rows = status(plan)
    plan.folder.mkdir(parents=True, exist_ok=True)
    written = [plan.folder / "report.json", plan.folder / "report.md"]
    written[0].write_text(json.dumps({"plan": plan.name, "title": plan.title, "repeats": plan.repeats,
                                      "points": rows}, indent=2) + "\n")
    lines = [f"# Plan {plan.name}: {plan.title}", "",
             f"{plan.repeats} repeat(s) a point; each figure is the mean over the finished runs, "
             "± the half-width of its 95% confidence interval (Student's t).", ""]
    for sname in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == sname]
        keys = list(dict.fromkeys(k for r in mine for k in r["figures"]))
        lines += [f"## {sname}", "", "| " + " | ".join(["point", "state", "runs", "verdicts", *keys]) + " |",
                  "|---" * (4 + len(keys)) + "|"]
        for r in mine:
            verdicts = ", ".join(f"{n} {v}" for v, n in r["verdicts"].items()) or "-"
            cells = [r["point"], r["state"], f"{r['finished']}/{r['repeats']}", verdicts,
                     *(_cell(r["figures"].get(k)) for k in keys)]
            lines.append("| " + " | ".join(cells) + " |")
        failed = [r for r in mine if r["state"] == "failed"]
        lines += [""] + [f"- {r['point']} failed: {r['reason']}" for r in failed] + ([""] if failed else [])
        png = _figure(plan, sname, mine, keys)
        if png:
            written.append(png)
            lines += [f"![{sname}]({png.name})", ""]
    written[1].write_text("\n".join(lines))
    return written


def _cell(f: dict | None) -> str:
    if not f:
        return "-"
    return f"{f['mean']:.4g}" + (f" ± {f['ci95']:.2g}" if f["ci95"] is not None else "")


def _figure(plan: Plan, sname: str, rows: list[dict], keys: list[str]) -> Path | None:
    """One panel per figure: its mean at each point, with the 95% interval as error bars."""
    keys = [k for k in keys if any(k in r["figures"] for r in rows)][:6]
    if not keys:
        return None
    path = plan.folder / f"{sname}.png"
    labels = [r["point"].removeprefix(sname + "-") or sname for r in rows]
    with figure(path, len(keys), 1, title=f"plan {plan.name}: {sname} (mean, 95% interval)",
                size=(max(4.0, 1.2 * len(rows) + 2), 2.4 * len(keys))) as axes:
        for ax, k in zip(axes, keys):
            means = [r["figures"].get(k, {}).get("mean", math.nan) for r in rows]
            errs = [r["figures"].get(k, {}).get("ci95") or 0.0 for r in rows]
            ax.errorbar(range(len(rows)), means, yerr=errs, fmt="o-", capsize=4)
            ax.set_xticks(range(len(rows)), labels, fontsize=8)
            ax.set_ylabel(k, fontsize=8)
            ax.grid(alpha=0.3)
    return path
