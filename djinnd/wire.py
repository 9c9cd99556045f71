"""The wire: every method djinnd answers, its parameters and its result, in one table.

The service checks and converts a request's parameters here, at the edge, before any runtime code
runs: a wrong type, a missing or unknown parameter, or a value out of range gets `bad_params`
naming the parameter. Both clients cover every method (tests/test_wire.py checks it, and that
docs/PROTOCOL.md lists the methods as here). Adding a request: a row here, its handler in
service.py, its call in client.py.
"""

import math
from dataclasses import dataclass, field

from .protocol import DjinnError
from .scheduler import QOS_CLASSES
from .sizes import parse_size

REQUIRED = object()  # no default: the request must give it
ABSENT = object()  # optional, and left out of the handler's arguments when not given


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # int, number, str, bool, ints, size, object, shares, values
    default: object = REQUIRED
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    nullable: bool = False  # null is a value of its own (not "the default")
    doc: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    result: str
    doc: str
    client: str  # the Client / AsyncClient method
    aliases: dict = field(default_factory=dict)  # client parameter -> the wire parameters it fills
    slow: bool = False  # may block (a forward, a swap): answered from the worker pool
    extra: bool = False  # further fields pass through (event.emit)


SESSION = Param("session", "int", doc="session id")
SID = {"sid": ("session",)}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ping", (), "`{}`", "liveness", "ping"),
    Method("status", (), "the `djinn status --json` object", "the daemon's figures", "status"),
    Method("snapshot", (Param("samples", "int", 600, lo=0, hi=100_000, doc="recent `vram` samples to include"),),
           '`{"seq", "status", "sessions", "samples", "events"}`', "what a client attaching late needs", "snapshot"),
    Method("events.since", (Param("seq", "int", lo=0),), '`{"events": [...], "lost": N}`',
           "non-sample events after `seq`", "events_since"),
    Method("event.emit", (Param("type", "str", choices=("scenario", "fleet")),), '`{"seq"}`',
           "publish a scenario or fleet event (other fields pass through)", "emit", extra=True),
    Method("shutdown", (), "`{}`", "stop gracefully after replying", "shutdown"),
    Method("memory.set_budget", (Param("budget", "size"),), "the memory figures",
           "set the device budget (lowering it swaps out what no longer fits)", "set_budget", slow=True),
    Method("memory.set_swap", (Param("enabled", "bool"),), '`{"swap_enabled"}`',
           "switch swapping off (a request that does not fit then fails with `out_of_budget`) or on", "set_swap"),
    Method("memory.reset_peak", (), "the memory figures",
           "start `peak_device_bytes` (and on CUDA the allocator's peak) over", "reset_peak"),
    Method("scheduler.set", (
        Param("fcfs", "bool", ABSENT), Param("shares", "shares", ABSENT, doc='"realtime=0.1,interactive=0.7,batch=0.2"'),
        Param("max_concurrency", "int", ABSENT, lo=1, hi=1024), Param("lifo", "bool", ABSENT),
        Param("max_batch", "int", ABSENT, lo=1, hi=1024, doc="decode steps that may share one forward (1: no batching)"),
        Param("escalation_ms", "number", ABSENT, lo=0, nullable=True, doc="null: off"),
        Param("wake_first", "bool", ABSENT, doc="a session's first step after IO_WAIT before other decode steps of its class"),
    ), "the scheduler's figures", "change the QoS policy live", "set_scheduler"),
    Method("session.create", (
        Param("prompt", "str", None, lo=1), Param("token_ids", "ints", None, lo=0),
        Param("qos", "str", "interactive", choices=QOS_CLASSES),
    ), "session info", "a new session (`prompt` or `token_ids`)", "create_session", slow=True),
    Method("model.text", (Param("tokens", "ints", lo=0, doc="token ids"),), '`{"text", "pieces"}`',
           "the text of token ids, by the model's tokenizer, and each token's own", "text"),
    Method("session.list", (), '`{"sessions": [info, ...]}`', "every session", "sessions"),
    Method("session.get", (SESSION,), 'session info and `"prompt_ids"`', "one session", "session", SID),
    Method("session.generate", (SESSION, Param("max_new_tokens", "int", 1, lo=1, hi=4096)), '`{"tokens": [...]}`',
           "greedy tokens, contiguous in the session (another request's forward or append on it meanwhile "
           "gets `bad_state`)", "generate", {**SID, "n": ("max_new_tokens",)}, slow=True),
    Method("session.append", (SESSION, Param("token_ids", "ints", lo=0, doc="token ids")), '`{"pending": n}`',
           "input the next forward feeds after what the session holds (a new turn: its KV is kept)", "append", SID),
    Method("session.run_to", (SESSION, Param("layers", "ints", lo=0, doc="decoder-layer indices")),
           '`{"state": "paused", "layer": L}`', "the next forward pauses after each of these layers",
           "run_to", {**SID, "layer": ("layers",)}, slow=True),
    Method("session.resume", (SESSION,), '`{"state": "paused", "layer": L}` or `{"state": "idle", "token": T}`',
           "run on from the pause", "resume", SID, slow=True),
    Method("session.inspect", (SESSION, Param("positions", "ints", None), Param("channels", "ints", None)),
           '`{"layer", "shape", "dtype", "mean", "std", "min", "max", "norm", "per_position", "values"?}`',
           "statistics of the paused hidden state, overall and (`per_position`: lists of mean, std, min, max, "
           "norm) of each token; `values` of the selected positions and channels",
           "inspect", SID, slow=True),
    Method("session.lens", (SESSION, Param("top_k", "int", 5, lo=1, hi=1000), Param("position", "int", -1)),
           '`{"layer", "position", "top": [{"token", "text", "prob"}, ...]}`',
           "the logit lens: the paused hidden state at `position` through the model's final norm and output head",
           "lens", SID, slow=True),
    Method("session.patch", (SESSION, Param("op", "str", choices=("set", "add", "scale")), Param("value", "values"),
                             Param("positions", "ints", None), Param("channels", "ints", None)),
           "the statistics after the patch", "change the paused hidden state", "patch",
           {**SID, "scale": ("op", "value"), "set": ("op", "value"), "add": ("op", "value")}, slow=True),
    Method("session.signal_phase", (SESSION, Param("phase", "str", choices=("IO_WAIT", "COMPUTE")),
                                    Param("expected_ms", "number", None, lo=0)),
           "session info", "a phase hint: swap out early, prefetch before the expected resume",
           "signal_phase", SID, slow=True),
    Method("session.close", (SESSION,), "`{}`", "close (a forward in flight stops at its next decoder layer)",
           "close", SID, slow=True),
    Method("session.export", (SESSION,), '`{"file", "path", "bytes", "sha256"}`',
           "write an idle session's tokens and KV into a file in the moves folder (`status.moves_dir`) for "
           "`session.import` on another daemon: `bytes` the file's size, `sha256` its KV bytes'; the session stays "
           "as it was", "export_session", SID, slow=True),
    Method("session.import", (Param("file", "str", lo=1, doc="a file's bare name in the moves folder"),
                              Param("qos", "str", None, choices=QOS_CLASSES, doc="else the exported session's")),
           '`{"id"}`', "a new session holding the exported tokens and KV (its next tokens are the exporter's); "
           "the file is removed", "import_session", slow=True),
    Method("scenario.list", (), '`{"scenarios": [...]}`', "the scenario catalog", "scenarios"),
    Method("scenario.start", (Param("name", "str"), Param("set", "object", None, doc="`{key: value}`")),
           '`{"run", "output"}`', "launch a scenario run", "start_scenario", {"sets": ("set",)}),
    Method("scenario.abort", (Param("run", "int"),), "`{}`", "stop a scenario run", "abort_scenario"),
    Method("scenario.runs", (), '`{"runs": [...]}`', "the scenario runs launched here", "scenario_runs"),
)}

SLOW = frozenset(name for name, m in METHODS.items() if m.slow)


def bad(method: str, message: str) -> DjinnError:
    return DjinnError("bad_params", f"{method}: {message}")


def check(method: str, params: dict) -> dict:
    """The handler's keyword arguments for `params`, converted; DjinnError naming the parameter else."""
    m = METHODS.get(method)
    if m is None:
        raise DjinnError("unknown_method", f"unknown method {method!r}")
    names = [p.name for p in m.params]
    rest = {k: v for k, v in params.items() if k not in names}
    if rest and not m.extra:
        raise bad(method, f"unknown parameter {sorted(rest)[0]!r} (it takes {', '.join(names) or 'none'})")
    out = {}
    for p in m.params:
        v = params.get(p.name, ABSENT)
        if v is ABSENT or (v is None and not p.nullable):
            if p.default is REQUIRED:
                raise bad(method, f"'{p.name}' is required")
            if p.default is not ABSENT:
                out[p.name] = p.default
            continue
        out[p.name] = v if v is None else _convert(method, p, v)
    return {**out, **rest}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _convert(method: str, p: Param, v):
    k = p.kind
    if k == "int" and not _is_int(v) or k == "number" and not _is_number(v):
        raise bad(method, f"'{p.name}' must be {'an integer' if k == 'int' else 'a finite number'}")
    if k == "bool" and not isinstance(v, bool):
        raise bad(method, f"'{p.name}' must be true or false")
    if k == "str":
        if not isinstance(v, str) or (p.lo and len(v) < p.lo):
            raise bad(method, f"'{p.name}' must be a non-empty string")
        if p.choices and v not in p.choices:
            raise bad(method, f"'{p.name}' must be one of {', '.join(p.choices)}, not {v!r}")
    if k == "ints":
        if not isinstance(v, list) or not v or not all(_is_int(x) for x in v):
            raise bad(method, f"'{p.name}' must be a non-empty list of integers")
        if p.lo is not None and min(v) < p.lo:
            raise bad(method, f"'{p.name}' must hold integers >= {p.lo:g}")
    if k == "object" and not isinstance(v, dict):
        raise bad(method, f"'{p.name}' must be an object")
    if k == "shares" and not isinstance(v, (str, dict)):
        raise bad(method, f"'{p.name}' must be a string like \"realtime=0.1,interactive=0.7,batch=0.2\"")
    if k == "values" and not _numbers(v):
        raise bad(method, f"'{p.name}' must be a finite number or a nested list of them")
    if k == "size":
        try:
            v = parse_size(v)
        except ValueError as e:
            raise bad(method, f"'{p.name}': {e}") from None
    if k in ("int", "number") and (p.lo is not None and v < p.lo or p.hi is not None and v > p.hi):
        hi = f"{p.hi:g}" if p.hi is not None else "inf"
        raise bad(method, f"'{p.name}' must be in [{p.lo:g}, {hi}], not {v}")
    return v


def _numbers(v) -> bool:
    return _is_number(v) or (isinstance(v, list) and bool(v) and all(_numbers(x) for x in v))


def protocol_table() -> str:
    """The methods table of docs/PROTOCOL.md, as this module defines it."""
    rows = ["| method | parameters | result |", "| --- | --- | --- |"]
    for m in METHODS.values():
        params = "; ".join(_param_doc(p) for p in m.params) + ("; other fields" if m.extra else "")
        rows.append(f"| `{m.name}` | {params} | {m.result}: {m.doc} |")
    return "\n".join(rows)


KIND_WORDS = {"int": "int", "number": "number", "str": "string", "bool": "bool", "ints": "[int]",
              "size": "bytes or SIZE", "object": "object", "shares": "string or object", "values": "number or nested list"}


def _param_doc(p: Param) -> str:
    s = f"`{p.name}` {KIND_WORDS[p.kind]}"
    if p.choices:
        s = f"`{p.name}` {'/'.join(p.choices)}"
    elif p.kind in ("int", "number", "ints") and (p.lo is not None or p.hi is not None):
        s += f" {p.lo:g}..{p.hi:g}" if p.hi is not None else f" >= {p.lo:g}"
    if p.default is ABSENT or p.default is None:
        s += " (optional)"
    elif p.default is not REQUIRED:
        s += f" = {p.default!r}"
    return s + (f": {p.doc}" if p.doc else "")
