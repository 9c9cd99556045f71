"""One event stream: every event gets a sequence number and two clocks, goes to the subscribers
and to a JSON Lines log, and recent ones stay in memory for snapshots and gap repair."""

import datetime as dt
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

import psutil

log = logging.getLogger("djinnd.telemetry")


def utc_stamp(t: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-22T14:15:03.123Z."""
    d = dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def compact_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class EventBus:
    """Thread-safe emit(); a single writer thread feeds the sinks in sequence order."""

    def __init__(self, keep_events: int = 100_000, keep_samples: int = 6000):
        self._lock = threading.Lock()
        self.seq = 0
        self.events = deque(maxlen=keep_events)  # everything but samples: repairable after a gap
        self.samples = deque(maxlen=keep_samples)  # `vram` samples: ten minutes at 10 Hz
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks = []
        self._thread = threading.Thread(target=self._run, name="djinn-events", daemon=True)
        self._thread.start()

    def add_sink(self, sink) -> None:
        """A sink has write(events: list[dict]) and close(); it is only ever called from the writer thread."""
        self._sinks.append(sink)

    def emit(self, type: str, **fields) -> dict:
        with self._lock:
            self.seq += 1
            ev = {"seq": self.seq, "ts": utc_stamp(), "mono_ns": time.monotonic_ns(), "type": type, **fields}
            (self.samples if type == "vram" else self.events).append(ev)
            self._queue.put(ev)
        return ev

    def since(self, seq: int) -> tuple[list[dict], int]:
        """Non-sample events after `seq`, and how many of those are no longer kept."""
        with self._lock:
            kept = [e for e in self.events if e["seq"] > seq]
        oldest = self.events[0]["seq"] if self.events else self.seq + 1
        lost = max(0, oldest - seq - 1) if seq < oldest - 1 else 0
        return kept, lost

    def recent_samples(self, n: int) -> list[dict]:
        with self._lock:
            return list(self.samples)[-n:] if n > 0 else []

    def _run(self):
        while True:
            batch = [self._queue.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            batch = [e for e in batch if e is not None]
            for sink in self._sinks:
                try:
                    sink.write(batch)
                except Exception:  # a broken sink must not stop the stream
                    log.exception("event sink %s failed", sink)
            if stop:
                for sink in self._sinks:
                    sink.close()
                return

    def close(self, timeout: float = 5.0) -> None:
        """Drain what is queued into the sinks, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)


class FileSink:
    """Appends events to logs/daemon/events-<stamp>-<pid>.jsonl, starting .1, .2, ... past `max_bytes`.

    A restart starts a new file; nothing is ever truncated. A write error becomes one `error` event
    and the sink retries a minute later.
    """

    def __init__(self, folder: Path, bus: EventBus, max_bytes: int = 64 << 20):
        self.folder, self.bus, self.max_bytes = Path(folder), bus, max_bytes
        self.base = f"events-{compact_stamp()}-{os.getpid()}.jsonl"
        self.part, self._f, self._size = 0, None, 0
        self._failed_at = None
        self.path: Path | None = None

    def _open(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.base if self.part == 0 else f"{self.base}.{self.part}"
        self.path = self.folder / name
        self._f = open(self.path, "a", encoding="utf-8")
        self._size = self._f.tell()

    def write(self, events):
        if self._failed_at is not None:
            if time.monotonic() - self._failed_at < 60:
                return
            self._failed_at = None
        try:
            if self._f is None:
                self._open()
            data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)
            self._f.write(data)
            self._f.flush()
            self._size += len(data)
            if self._size >= self.max_bytes:
                self._f.close()
                self._f, self.part = None, self.part + 1
        except OSError as e:
            self._failed_at = time.monotonic()
            self._f = None
            self.bus.emit("error", where="event_log", message=f"cannot write the event log in {self.folder}: {e}")

    def close(self):
        if self._f:
            self._f.close()


class Sampler:
    """Samples memory and the daemon's own load at `hz`, emitting `vram` events."""

    def __init__(self, bus: EventBus, memory, device, hz: float = 10.0):
        self.bus, self.memory, self.device, self.period = bus, memory, device, 1.0 / hz
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._nvml = self._nvml_handle() if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="djinn-sampler", daemon=True)

    def start(self):
        self._thread.start()

    def _nvml_handle(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
        except Exception as e:  # reported once, never fatal
            self.bus.emit("error", where="nvml", message=f"NVML unavailable, device memory from the allocator only: {e}")
            return None

    def sample(self) -> dict:
        m = self.memory.figures()
        fields = {"used_bytes": m["device_bytes"], "budget_bytes": m["budget_bytes"], "capacity_bytes": m["capacity_bytes"],
                  "peak_bytes": m["peak_device_bytes"], "host_bytes": m["host_bytes"],
                  "host_capacity_bytes": m["host_capacity_bytes"], "disk_bytes": m["disk_bytes"],
                  "rss_bytes": self._proc.memory_info().rss, "cpu_percent": self._proc.cpu_percent(None)}
        if self.device.type == "cuda":
            import torch
            fields["allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            fields["reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            if self._nvml is not None:
                try:
                    import pynvml
                    fields["nvml_used_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used
                    fields["gpu_util"] = pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu
                except Exception:
                    pass
        return fields

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                self.bus.emit("vram", **self.sample())
            except Exception:
                log.exception("sampler failed")

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
