"""The daemon's request handlers: method name -> runtime call, over parameters the server has had
checked against the wire table (wire.check)."""

import logging
import os
import time
from pathlib import Path

from . import __version__, moves, paths
from .protocol import DjinnError, RawJSON

NOT_NOW = object()
log = logging.getLogger("djinnd")


class Service:
    def __init__(self, runtime, bus, socket_path, events_path, scenarios=None, logs_dir=None, state_dir=None):
        self.rt, self.bus = runtime, bus
        self.logs_dir = str(logs_dir) if logs_dir else None
        self.socket_path, self.events_path = str(socket_path), str(events_path)
        self.scenarios = scenarios
        self.started = time.monotonic()
        self.stop_requested = False
        self.metrics_url = None  # set when the Prometheus endpoint is on
        self.listen = None  # with --listen: its addresses and the daemon's public key
        self.moves_dir = _moves_dir(paths.moves(Path(socket_path), state_dir))

    def handle(self, method: str, kw: dict):
        """The result of `method`; `kw` are its parameters as wire.check made them."""
        return self.HANDLERS[method](self, **kw)

    def now(self, method: str, kw: dict):
        """A slow method's result when it is ready without waiting, else NOT_NOW (then `handle` it on
        a worker): COMPUTE for a resident session (a no-op but for the phase)."""
        if method == "session.signal_phase" and kw["phase"] == "COMPUTE":
            s = self.rt.sessions.get(kw["session"])
            if s is not None and s.stored is None:
                return self.signal_phase(**kw)
        return NOT_NOW

    @staticmethod
    def is_step(method: str, kw: dict) -> bool:
        """A one-token decode step: `steps_now` may answer it, in one forward with the others."""
        return method == "session.generate" and kw["max_new_tokens"] == 1

    def steps_now(self, kws: list[dict]) -> list:
        """For each decode step's parameters, its result, a DjinnError, or NOT_NOW (a worker runs it):
        the steps that can start at once share one forward on the caller's thread."""
        done, left = {}, [kw["session"] for kw in kws]
        while left:  # more than a batch holds: the next batch at once, on the device just freed
            ran = self.rt.steps_now(left)
            if not ran:
                break
            done.update(ran)
            left = [sid for sid in left if sid not in ran]
        out = []
        for kw in kws:
            r = done.pop(kw["session"], NOT_NOW)  # a session's second step in the list goes to a worker
            out.append(r if r is NOT_NOW or isinstance(r, DjinnError) else {"tokens": [r]})
        return out

    # -- daemon ----------------------------------------------------------------------------------
    def ping(self):
        return {}

    def status(self):
        lm, mem = self.rt.lm, self.rt.mem
        dev = lm.device
        device = {"kind": dev.type, "name": _device_name(dev), "index": dev.index, "dtype": str(lm.dtype).removeprefix("torch."),
                  "capacity_bytes": mem.capacity}
        return {"pid": os.getpid(), "version": __version__, "uptime_s": round(time.monotonic() - self.started, 3),
                "socket": self.socket_path, "events_socket": self.events_path, "logs_dir": self.logs_dir,
                "metrics_url": self.metrics_url, "listen": self.listen, "moves_dir": str(self.moves_dir),
                "device": device,
                "model": lm.describe(), "sessions": len(self.rt.sessions), "memory": mem.figures(),
                "journal": self._journal(),
                "swap": mem.swap_figures(), "scheduler": self.rt.device_lock.figures(), "seq": self.bus.seq}

    def _journal(self) -> dict | None:
        """Where sessions are journaled, and how many of them a restart brought back (not computed since)."""
        journal = self.rt.journal
        return None if journal is None else {
            "path": str(journal.path), "restored": sum(s.restored for s in list(self.rt.sessions.values()))}

    def snapshot(self, samples: int):
        seq = self.bus.seq
        return {"seq": seq, "status": self.status(), "sessions": self.rt.list_sessions(),
                "samples": self.bus.recent(samples, samples=True), "events": self.bus.recent(500)}

    def events_since(self, seq: int):
        events, lost = self.bus.since(seq)
        return {"events": RawJSON(b"[" + b",".join(events) + b"]"), "lost": lost}  # as kept: no decoding

    def emit(self, type: str, **fields):
        reserved = {"seq", "ts", "mono_ns"} & set(fields)
        if reserved:
            raise DjinnError("bad_params", f"{', '.join(sorted(reserved))} are set by the daemon")
        return {"seq": self.bus.emit(type, **fields)["seq"]}

    def shutdown(self):
        self.stop_requested = True
        return {}

    def set_budget(self, budget: int):
        self.rt.mem.set_budget(budget)
        return self.rt.mem.figures()

    def reset_peak(self):
        self.rt.mem.reset_peak()
        return self.rt.mem.figures()

    def set_swap(self, enabled: bool):
        self.rt.mem.swap_enabled = enabled
        return {"swap_enabled": enabled}

    def scheduler_set(self, **kw):
        """Change the QoS policy live (the qos scenario compares it with first-come-first-served)."""
        from .scheduler import parse_shares
        try:
            if "shares" in kw:
                shares = kw["shares"]
                kw["shares"] = None if shares == "" else parse_shares(shares) if isinstance(shares, str) else shares
            if kw.get("max_batch", 1) > 1 and self.rt.lm.batch_error:
                raise DjinnError("unsupported", f"decode steps of this model run one at a time: {self.rt.lm.batch_error}")
            if "escalation_ms" in kw:
                ms = kw.pop("escalation_ms")
                kw["escalation_s"] = ms / 1000 if ms else None
            return self.rt.device_lock.configure(**kw)
        except (ValueError, TypeError) as e:
            raise DjinnError("bad_params", str(e)) from None

    def text(self, tokens):
        vocab = self.rt.lm.vocab_size
        if any(t >= vocab for t in tokens):
            raise DjinnError("bad_params", f"model.text: token ids must be in [0, {vocab})")
        return {"text": self.rt.lm.decode(tokens), "pieces": [self.rt.lm.decode([t]) for t in tokens]}

    # -- sessions --------------------------------------------------------------------------------
    def create(self, prompt=None, token_ids=None, qos="interactive"):
        return self.rt.create(prompt=prompt, token_ids=token_ids, qos=qos).info()

    def list(self):
        return {"sessions": self.rt.list_sessions()}

    def get(self, session):
        s = self.rt.get(session)
        return {**s.info(), "prompt_ids": list(s.prompt_ids)}

    def generate(self, session, max_new_tokens):
        return {"tokens": self.rt.generate(session, max_new_tokens)}

    def append(self, session, token_ids):
        return self.rt.append(session, token_ids)

    def run_to(self, session, layers):
        return self.rt.run_to(session, layers)

    def resume(self, session):
        return self.rt.resume(session)

    def inspect(self, session, positions=None, channels=None):
        return self.rt.inspect(session, positions, channels)

    def lens(self, session, top_k, position):
        return self.rt.lens(session, top_k, position)

    def patch(self, session, op, value, positions=None, channels=None):
        return self.rt.patch(session, op, value, positions, channels)

    def signal_phase(self, session, phase, expected_ms=None):
        return self.rt.signal_phase(session, phase, expected_ms)

    def close(self, session):
        self.rt.close(session)
        return {}

    def export(self, session):
        return self.rt.export_session(session, self.moves_dir)

    def import_(self, file, qos=None):
        return {"id": self.rt.import_session(self.moves_dir, file, qos).id}

    # -- scenarios -------------------------------------------------------------------------------
    def _runs(self):
        if self.scenarios is None:
            raise DjinnError("unknown_method", "this daemon runs no scenarios")
        return self.scenarios

    def scenario_list(self):
        return {"scenarios": self._runs().catalog()}

    def scenario_start(self, name, set):
        return self._runs().start(name, set or {})

    def scenario_abort(self, run):
        return self._runs().abort(run)

    def scenario_runs(self):
        return {"runs": self._runs().runs()}

    HANDLERS = {  # one for each method of the wire table
        "ping": ping, "status": status, "snapshot": snapshot, "events.since": events_since, "event.emit": emit,
        "shutdown": shutdown, "memory.set_budget": set_budget,
        "memory.set_swap": set_swap, "memory.reset_peak": reset_peak, "scheduler.set": scheduler_set,
        "model.text": text, "session.create": create, "session.list": list, "session.get": get,
        "session.generate": generate, "session.append": append,
        "session.run_to": run_to, "session.resume": resume, "session.inspect": inspect, "session.lens": lens, "session.patch": patch,
        "session.signal_phase": signal_phase, "session.close": close,
        "session.export": export, "session.import": import_,
        "scenario.list": scenario_list, "scenario.start": scenario_start, "scenario.abort": scenario_abort,
        "scenario.runs": scenario_runs,
    }


def _moves_dir(folder: Path) -> Path:
    """The moves folder, made 0700 at start so a fleet may put files there before any export."""
    try:
        moves.prepare(folder)
    except OSError as e:  # session.export tries again, and says why it cannot
        log.warning("cannot make the moves folder %s: %s", folder, e)
    return folder


def _device_name(dev) -> str:
    if dev.type == "cuda":
        import torch
        return torch.cuda.get_device_name(dev)
    import platform
    return platform.processor() or platform.machine() or "cpu"
