"""Records a run's events: every daemon event from the stream (in a background thread) plus the
run's own, written to events.jsonl as they come and kept for the figures and vram.csv."""

import json
import threading
import time

from djinnd import Client, DjinnError, utc_stamp


class EventLog:
    """events.jsonl, appended from any thread; the events stay in memory for the figures."""

    def __init__(self, path):
        self.events: list[dict] = []
        self._f = open(path, "w", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, ev: dict) -> None:
        with self._lock:
            self.events.append(ev)
            if self._f:
                self._f.write(json.dumps(ev, separators=(",", ":")) + "\n")
                self._f.flush()

    def local(self, type: str, **fields) -> dict:
        """An event of this process (no daemon saw it): same shape, no seq."""
        ev = {"ts": utc_stamp(), "mono_ns": time.monotonic_ns(), "type": type, "origin": "scenario", **fields}
        self.write(ev)
        return ev

    def of_type(self, *types, since_ns: int = 0) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e["type"] in types and e.get("mono_ns", 0) >= since_ns]

    def close(self) -> None:
        with self._lock:
            if self._f:
                self._f.close()
                self._f = None


class Recorder:
    """Follows the daemon's event stream into an EventLog until stopped."""

    def __init__(self, socket, log: EventLog):
        self.socket, self.log = socket, log
        self.last_seq = 0
        self.lost = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="scenario-recorder", daemon=True)

    def start(self, timeout: float = 5.0) -> "Recorder":
        """Start following; return once the first event came (so none of the run's is missed)."""
        self._thread.start()
        with self._seen:
            self._seen.wait_for(lambda: self.last_seq > 0 or self.error is not None, timeout)
        return self

    def _run(self) -> None:
        try:
            with Client(self.socket, timeout=10) as c, c.subscribe() as sub:
                while not self._stop.is_set():
                    ev = sub.recv(0.2)
                    if ev is None:
                        continue
                    self.log.write(ev)
                    with self._seen:
                        self.last_seq = max(self.last_seq, ev.get("seq", 0))
                        self.lost = sub.lost
                        self._seen.notify_all()
        except (DjinnError, OSError) as e:
            self.error = str(e)
            with self._seen:
                self._seen.notify_all()

    def wait_for(self, seq: int, timeout: float = 3.0) -> bool:
        """Wait until the event numbered `seq` has been recorded."""
        with self._seen:
            return self._seen.wait_for(lambda: self.last_seq >= seq or self.error is not None, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
