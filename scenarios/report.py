"""What a headless run prints: progress (a rich bar on a terminal, plain lines otherwise), the
verdict table, and a sweep's summary table. With --json all of it goes to stderr."""

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from djinnd import format_size

LABELS = {"completed": "done", "requested": "of", "max_bytes": "peak", "budget_bytes": "budget",
          "swap_outs": "swap-outs", "first_swap_at": "1st swap", "wall_s": "wall s"}
STYLE = {"pass": "bold green", "fail": "bold red", "skipped": "bold yellow", "error": "bold red"}


def _console(stderr: bool) -> Console:
    """A rich console; logs and CI get 120 columns rather than rich's 80."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, highlight=False, width=120)
    return c


class UI:
    def __init__(self, json_mode: bool = False):
        self.console = _console(json_mode)
        self.err = _console(True)
        self._bar: Progress | None = None
        self._task = None

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.err.print(f"djinn scenario: {text}", markup=False, soft_wrap=True)

    def progress(self, name: str, done: int, total: int, message: str = "") -> None:
        if not self.console.is_terminal:
            self.console.print(f"[{name}] {done}/{total} {message}", markup=False)
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[message]}"),
                                 console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(name, total=total, message="")
        self._bar.update(self._task, completed=done, total=total, message=message)

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._task = None, None

    def verdict(self, res: dict, sc) -> None:
        self.end_progress()
        status = res["status"]
        table = Table(title=f"{sc.name}: {status.upper()}", title_style=STYLE[status])
        table.add_column("criterion")
        table.add_column("measured")
        table.add_column("verdict")
        for c in res.get("criteria") or []:
            mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[dim]n/a[/]"}[c["ok"]]
            table.add_row(c["text"], str(c["measured"]), mark)
        if res.get("criteria"):
            self.console.print(table)
        else:
            self.console.print(f"{sc.name}: {status.upper()}", style=STYLE[status])
        for r in res["reasons"]:
            self.console.print(f"  - {r}", markup=False)
        for n in res.get("notes") or []:
            self.console.print(f"  note: {n}", markup=False)
        self.console.print(f"wall {res['wall_s']} s; results in {res['output']}", markup=False)

    def summary(self, summary: dict) -> None:
        rows = summary["points"]
        table = Table(title=f"{summary['scenario']} sweep: {summary['status'].upper()}",
                      title_style=STYLE[summary["status"]])
        keys = [k for k in rows[0] if k not in ("folder", "reasons")]
        for k in keys:
            table.add_column(LABELS.get(k, k))
        for r in rows:
            table.add_row(*[_cell(k, r[k]) for k in keys])
        self.console.print(table)
        self.console.print(f"summary in {summary['output']}/summary.json", markup=False)


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes") and isinstance(value, int):
        return format_size(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
