"""The export key: the same code as `djinn logs export` (djinnd.export), run from the console.

Source, in order: the current scenario run's folder; the daemon's log folder (`logs/daemon` under
the folder `status` names as `logs_dir`); else the events this console has seen since it attached.
"""

from datetime import datetime, timezone
from pathlib import Path

from djinnd import default_logs_dir, export_events, write_events

SUFFIX = {"jsonl": "jsonl", "csv": "csv", "chrome-trace": "trace.json"}


def pick_source(run: dict | None, status: dict) -> tuple[str, Path | None]:
    """(what, folder): a description for the operator and the folder to read, None for seen events."""
    if run and run.get("output") and Path(run["output"]).is_dir():
        return f"run {run.get('run')} ({run.get('name')})", Path(run["output"])
    logs = status.get("logs_dir")
    if logs and (Path(logs) / "daemon").is_dir():
        return "the daemon's log", Path(logs) / "daemon"
    return "the events seen by the console", None


def out_dir_for(folder: Path | None) -> Path:
    """A run's export lands in its run folder; the daemon's in logs/exports; seen events in ./logs/exports."""
    if folder is None:
        return default_logs_dir() / "exports"
    return folder if (folder / "events.jsonl").is_file() else folder.parent / "exports"


def export_to(folder: Path | None, events: list[dict], fmt: str, out_dir: Path | None = None) -> tuple[int, Path]:
    """Write one export file (into `out_dir`, else where out_dir_for says); returns (records, path)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    label = "djinn-events" if folder is None else "djinn-run" if (folder / "events.jsonl").is_file() else "djinn-daemon"
    out = Path(out_dir or out_dir_for(folder)) / f"{label}-{stamp}.{SUFFIX[fmt]}"
    if folder is not None:
        return export_events(folder, fmt, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="") as f:
        return write_events(events, fmt, f), out
