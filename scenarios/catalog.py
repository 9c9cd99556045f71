"""The scenario catalog: one TOML file per scenario in this folder, and the `--set k=v` parser.

A scenario file names its runner, its parameters (type, help, a default for the CPU and one for
CUDA) and its pass criteria. Kept data-only so that `djinn scenario list` and the daemon's
`scenario.list` never import torch.

    name = "exp3"
    title = "..."
    description = "..."
    runner = "scenarios.exp3"          # a module with run(ctx, params)

    [params.sessions]
    type = "int"                       # int, float, bool, size, str, ints
    help = "sessions to spawn"
    min = 1
    cpu = 24                           # or `default = ...` for both kinds
    cuda = 50

    [criteria.all_complete]
    text = "every session completes"
"""

from __future__ import annotations

import itertools
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from djinnd import format_size, parse_size

HERE = Path(__file__).parent
KINDS = ("cpu", "cuda")
TYPES = ("int", "float", "bool", "size", "str", "ints")
SWEEPABLE = ("int", "float", "bool", "size")
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


class ParamError(ValueError):
    """A bad `--set` or a bad scenario file: its message is the one line the user sees."""


@dataclass
class Param:
    name: str
    type: str
    help: str = ""
    defaults: dict = field(default_factory=dict)  # kind -> value
    choices: list | None = None  # allowed values (str)
    words: list | None = None  # special words besides the type's values, e.g. "auto"
    min: float | None = None
    max: float | None = None

    def parse(self, text: str):
        """One value from its command-line text; ParamError names what is wrong."""
        text = str(text).strip()
        if self.words and text in self.words:
            return text
        try:
            value = _parse_typed(self.type, text)
        except ValueError as e:
            expect = f" or one of {', '.join(self.words)}" if self.words else ""
            raise ParamError(f"bad value for '{self.name}': {e}{expect}") from None
        self.check(value)
        return value

    def check(self, value) -> None:
        if isinstance(value, str) and self.words and value in self.words:
            return
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"bad value for '{self.name}': {value!r} (choose {', '.join(map(str, self.choices))})")
        for v in value if isinstance(value, list) else [value]:
            if self.min is not None and v < self.min:
                raise ParamError(f"bad value for '{self.name}': {v} is below the minimum {self.min}")
            if self.max is not None and v > self.max:
                raise ParamError(f"bad value for '{self.name}': {v} is above the maximum {self.max}")

    def show(self, value) -> str:
        if self.type == "size" and isinstance(value, int):
            return format_size(value)
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, list):
            return "[" + ",".join(map(str, value)) + "]"
        return str(value)


def _parse_typed(kind: str, text: str):
    if kind == "int":
        if not re.fullmatch(r"[+-]?\d[\d_]*", text):
            raise ValueError(f"{text!r} is not an integer")
        return int(text)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind == "bool":
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"{text!r} is not on/off (true/false)")
    if kind == "size":
        return parse_size(text)
    if kind == "ints":
        items = [x.strip() for x in text.strip("[]").split(",") if x.strip()]
        if not items:
            raise ValueError(f"{text!r} is not a list of integers like [2,4,6]")
        return [_parse_typed("int", x) for x in items]
    return text


@dataclass
class Scenario:
    name: str
    title: str
    description: str
    runner: str
    params: dict[str, Param]
    criteria: dict[str, dict]
    path: Path

    def defaults_for(self, kind: str) -> dict:
        """The default parameters on a `cpu` or `cuda` daemon."""
        if kind not in KINDS:
            raise ValueError(f"unknown device kind {kind!r}")
        return {name: p.defaults[kind] for name, p in self.params.items()}

    def parse_sets(self, sets: list[str]) -> dict[str, list]:
        """`["k=v", ...]` -> {key: [values]}: one value, or several for a sweep (`k=[8,16,24]`)."""
        out: dict[str, list] = {}
        for item in sets:
            key, eq, text = item.partition("=")
            key, text = key.strip(), text.strip()
            if not eq or not key:
                raise ParamError(f"--set takes KEY=VALUE, got {item!r}")
            p = self.params.get(key)
            if p is None:
                raise ParamError(f"{self.name} has no parameter {key!r} (known: {', '.join(self.params)})")
            if text.startswith("[") and p.type != "ints":
                if p.type not in SWEEPABLE:
                    raise ParamError(f"'{key}' cannot be swept (only numbers, sizes and on/off can)")
                items = [x.strip() for x in text.strip("[]").split(",") if x.strip()]
                if not text.endswith("]") or not items:
                    raise ParamError(f"bad sweep for '{key}': {text!r} (write e.g. [8,16,24])")
                out[key] = [p.parse(x) for x in items]
            else:
                out[key] = [p.parse(text)]
        return out

    def points(self, kind: str, sets: dict[str, list]) -> list[dict]:
        """Every parameter point: the defaults for `kind` under the sets, one per sweep combination."""
        base = self.defaults_for(kind)
        keys = list(sets)
        return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(sets[k] for k in keys))]

    def show(self) -> str:
        lines = [f"{self.name}: {self.title}", "", self.description.strip(), "", "parameters (cpu / cuda defaults):"]
        for p in self.params.values():
            cpu, cuda = p.show(p.defaults["cpu"]), p.show(p.defaults["cuda"])
            dflt = cpu if cpu == cuda else f"{cpu} / {cuda}"
            extra = f" (one of {', '.join(map(str, p.choices))})" if p.choices else ""
            lines.append(f"  {p.name:<16} {p.type:<6} {dflt:<24} {p.help}{extra}")
        lines += ["", "pass criteria:"]
        for cid, c in self.criteria.items():
            limits = ", ".join(f"{k} = {v}" for k, v in c.items() if k != "text")
            lines.append(f"  {cid:<22} {c['text']}" + (f" ({limits})" if limits else ""))
        return "\n".join(lines)


def _load(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ParamError(f"cannot read scenario file {path}: {e}") from None
    name = data.get("name", path.stem)
    params = {}
    for pname, spec in data.get("params", {}).items():
        kind = spec.get("type", "str")
        if kind not in TYPES:
            raise ParamError(f"{path.name}: parameter {pname!r} has unknown type {kind!r}")
        p = Param(pname, kind, spec.get("help", ""), {}, spec.get("choices"), spec.get("words"),
                  spec.get("min"), spec.get("max"))
        for k in KINDS:
            raw = spec.get(k, spec.get("default"))
            if raw is None:
                raise ParamError(f"{path.name}: parameter {pname!r} has no default for {k}")
            p.defaults[k] = p.parse(raw) if isinstance(raw, str) and kind != "str" else raw
        params[pname] = p
    return Scenario(name, data.get("title", name), data.get("description", ""), data["runner"], params,
                    data.get("criteria", {}), path)


def for_daemon() -> dict:
    """What a daemon serves and how it launches a run (handed to it through the `djinn.scenarios`
    entry point, so that djinnd never imports this package)."""
    return {"scenarios": [{"name": sc.name, "description": sc.description, "params": sc.defaults_for("cpu")}
                          for sc in all_scenarios()],
            "run": [sys.executable, "-m", "scenarios.cli", "run"]}


def all_scenarios() -> list[Scenario]:
    return [_load(p) for p in sorted(HERE.glob("*.toml"))]


def find(name: str) -> Scenario | None:
    return next((s for s in all_scenarios() if s.name == name), None)
