"""One event stream: every event gets a sequence number and two clocks, goes to the subscribers
and to a JSON Lines log, and recent ones stay in memory for snapshots and gap repair."""

import bisect
import datetime as dt
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

import psutil

from . import protocol

log = logging.getLogger("djinnd.telemetry")

# The books against the device (CUDA). Like with like: the allocator's `memory_allocated` holds the
# weights, the cuBLAS workspaces and every session's slab and held tensors, as the books do, and
# besides them whatever it held at load that the books do not name (`MemoryManager.device_baseline`,
# measured before the first session: tensors of other code in the process, the rounding of the
# weights' blocks). Not compared: `memory_reserved` (it adds the caching allocator's free blocks)
# and NVML's used bytes (they add the CUDA context, memory outside torch's allocator and other
# processes); both are reported beside.
#
#   drift = (allocated - baseline) - ledger
#
# Positive: the device holds more than the books charge, so the budget no longer bounds it. That is
# the error. Negative drift is expected and not one: the books charge a forward's peak temporaries
# and a slab's growth before they are allocated, so while a forward computes they run ahead of the
# allocator by up to that. The limit: DRIFT_FLOOR, or DRIFT_FRACTION of the budget when that is more.
# Under it lies what the books cannot see, the allocator's rounding: a block of the large pool may be
# handed out unsplit, up to 1 MiB over the tensor, for each of the few tensors of each resident session.
DRIFT_FLOOR = 64 << 20
DRIFT_FRACTION = 0.01


def drift_limit(budget: int) -> int:
    """The positive drift of the books against the allocator beyond which a sample is an error."""
    return max(DRIFT_FLOOR, int(budget * DRIFT_FRACTION))


_second = (None, "")  # the last whole second, formatted: events come thousands a second


def utc_stamp(t: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-22T14:15:03.123Z."""
    global _second
    t = time.time() if t is None else t
    sec, prefix = _second
    if sec != int(t):
        sec = int(t)
        prefix = dt.datetime.fromtimestamp(sec, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        _second = (sec, prefix)
    return f"{prefix}{int((t - sec) * 1000):03d}Z"


def compact_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


KEEP_EVENTS = 100_000  # non-sample events kept in memory for `events.since` and `snapshot`, at most ...
KEEP_EVENT_BYTES = 16 << 20  # ... and at most this many bytes of their JSON (the oldest go first)
KEEP_SAMPLES = 6000  # `vram` samples: ten minutes at 10 Hz
_SEQ_AT = len(b'{"seq":')  # every event's JSON starts so: its seq is read without decoding it


def _seq_of(line: bytes) -> int:
    return int(line[_SEQ_AT:line.index(b",", _SEQ_AT)])


class EventBus:
    """Thread-safe emit(); a single writer thread feeds the sinks in sequence order.

    Each event is serialised once, in emit(): the sinks get that JSON, and the history (`events`,
    `samples`) keeps it as bytes, decoded only when `since` or `recent` asks (a kept event costs its
    JSON and ~40 B, not a dict of Python objects: ~250 B against ~700 B for a swap-failure error).
    The history keeps the last `keep_events` non-sample events and at most `keep_bytes` of their JSON.
    """

    def __init__(self, keep_events: int = KEEP_EVENTS, keep_samples: int = KEEP_SAMPLES,
                 keep_bytes: int = KEEP_EVENT_BYTES):
        self._lock = threading.Lock()
        self.seq = 0
        self.keep_events, self.keep_bytes = keep_events, keep_bytes
        self.events: deque[bytes] = deque()  # everything but samples, as JSON: repairable after a gap
        self.events_bytes = 0  # the JSON bytes in `events`
        self.samples: deque[bytes] = deque(maxlen=keep_samples)  # `vram` samples, as JSON
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks = []
        self._thread = threading.Thread(target=self._run, name="djinn-events", daemon=True)
        self._thread.start()

    def add_sink(self, sink) -> None:
        """A sink has write(batch) and close(); it is only ever called from the writer thread.

        `batch` is a list of (event, its JSON as UTF-8 bytes): each event is serialised once for every sink.
        """
        self._sinks.append(sink)

    def emit(self, type: str, **fields) -> dict:
        with self._lock:
            self.seq += 1
            ev = {"seq": self.seq, "ts": utc_stamp(), "mono_ns": time.monotonic_ns(), "type": type, **fields}
            line = json.dumps(ev, separators=(",", ":"), default=protocol._default).encode()
            if type == "vram":
                self.samples.append(line)
            else:
                self._keep(line)
            self._queue.put((ev, line))
        return ev

    def _keep(self, line: bytes) -> None:  # holding _lock
        events = self.events
        events.append(line)
        self.events_bytes += len(line)
        while len(events) > self.keep_events or (self.events_bytes > self.keep_bytes and len(events) > 1):
            self.events_bytes -= len(events.popleft())

    def since(self, seq: int) -> tuple[list[bytes], int]:
        """Non-sample events after `seq` (their JSON), and how many of those are no longer kept."""
        with self._lock:
            kept = list(self.events)
            last = self.seq
        oldest = _seq_of(kept[0]) if kept else last + 1
        lost = max(0, oldest - seq - 1) if seq < oldest - 1 else 0
        first = bisect.bisect_right(kept, seq, key=_seq_of)  # kept in sequence order
        return kept[first:], lost

    def recent(self, n: int, samples: bool = False) -> list[dict]:
        """The last `n` samples, or the last `n` other events."""
        if n <= 0:
            return []
        with self._lock:
            lines = list(itertools.islice(reversed(self.samples if samples else self.events), n))
        return [json.loads(line) for line in reversed(lines)]

    def _run(self):
        while True:
            batch = [self._queue.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            batch = [e for e in batch if e is not None]  # (event, its JSON): made once, in emit
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
        while True:
            self.path = self.folder / (self.base if self.part == 0 else f"{self.base}.{self.part}")
            try:
                self._f = open(self.path, "xb")  # never appends to, or truncates, a file
                break
            except FileExistsError:
                self.part += 1
        self._size = 0

    def write(self, batch):
        if self._failed_at is not None:
            if time.monotonic() - self._failed_at < 60:
                return
            self._failed_at = None
        try:
            for _, line in batch:
                if self._f is None:
                    self._open()
                self._f.write(line + b"\n")
                self._size += len(line) + 1
                if self._size >= self.max_bytes:
                    self._f.close()
                    self._f, self.part = None, self.part + 1
            if self._f is not None:
                self._f.flush()
        except OSError as e:
            self._failed_at = time.monotonic()
            self._f = None
            self.bus.emit("error", where="event_log", message=f"cannot write the event log in {self.folder}: {e}")

    def close(self):
        if self._f:
            self._f.close()


class Sampler:
    """Samples memory, decode batching and the daemon's own load at `hz`, emitting `vram` events.

    On CUDA each sample also compares the books with the allocator (see `drift_limit`): a drift over
    the limit is one `error` event (where `ledger_drift`) when it begins, not one per sample; it ends
    once the drift is back under half the limit, and the next one is an error again.
    """

    def __init__(self, bus: EventBus, memory, device, hz: float = 10.0, scheduler=None):
        self.bus, self.memory, self.device, self.period = bus, memory, device, 1.0 / hz
        self.scheduler = scheduler  # a DeviceLock: decode forwards and the steps they ran, so far
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._slow: dict = {}  # process and NVML figures, refreshed at most 10 times a second
        self._slow_at = 0.0
        self._nvml = self._nvml_handle() if device.type == "cuda" else None
        self._nvml0 = None  # (NVML used, allocator reserved) at the first NVML read: nvml_drift_bytes
        self.drifting = False  # a drift episode is on: its error event was emitted
        self.drift_episodes = 0
        self._thread = threading.Thread(target=self._run, name="djinn-sampler", daemon=True)

    def start(self):
        self._thread.start()

    def _nvml_handle(self):
        """The NVML handle of our device, found by UUID: NVML's indices ignore CUDA_VISIBLE_DEVICES
        and follow the PCI bus, where CUDA's may not."""
        try:
            import pynvml
            import torch
            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except pynvml.NVMLError:
                return pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")  # a MIG instance
        except Exception as e:  # reported once, never fatal
            self.bus.emit("error", where="nvml", message=f"NVML unavailable, device memory from the allocator only: {e}")
            return None

    def sample(self) -> dict:
        m = self.memory.figures()
        fields = {"used_bytes": m["device_bytes"], "budget_bytes": m["budget_bytes"], "capacity_bytes": m["capacity_bytes"],
                  "peak_bytes": m["peak_device_bytes"], "host_bytes": m["host_bytes"],
                  "host_capacity_bytes": m["host_capacity_bytes"], "disk_bytes": m["disk_bytes"]}
        if self.scheduler is not None:  # counters: a reader's deltas give the mean batch between samples
            b = self.scheduler.batches
            fields["decode_forwards"], fields["decode_rows"] = b["forwards"], b["rows"]
        if self.device.type == "cuda":
            fields.update(self._device_figures(m))
        now = time.monotonic()
        if now - self._slow_at >= 0.1:
            self._slow_at, self._slow = now, self._slow_figures()
        fields.update(self._slow)
        return fields

    def _device_figures(self, m: dict) -> dict:
        """The allocator's figures beside the books', and the drift between them (CUDA only).

        The books are read before the allocator (in `figures`) and again after, and the larger is
        compared: a charge taken before its allocation, or given back after its free, between the two
        reads would otherwise look like drift."""
        import torch
        allocated = m.get("allocated_bytes")
        if allocated is None:
            allocated = torch.cuda.memory_allocated(self.device)
        reserved = m.get("reserved_bytes")
        if reserved is None:
            reserved = torch.cuda.memory_reserved(self.device)
        ledger = max(m["device_bytes"], self.memory.used)
        baseline = int(getattr(self.memory, "device_baseline", 0) or 0)
        drift = allocated - baseline - ledger
        limit = drift_limit(m["budget_bytes"])
        out = {"allocated_bytes": allocated, "reserved_bytes": reserved, "ledger_bytes": ledger,
               "device_used_bytes": allocated - baseline, "drift_bytes": drift, "drift_limit_bytes": limit}
        self._check_drift(out)
        return out

    def _check_drift(self, f: dict) -> None:
        drift, limit = f["drift_bytes"], f["drift_limit_bytes"]
        if drift > limit and not self.drifting:
            self.drifting = True
            self.drift_episodes += 1
            mib = 1 << 20
            self.bus.emit("error", where="ledger_drift", drift_bytes=drift, limit_bytes=limit,
                          allocated_bytes=f["allocated_bytes"], ledger_bytes=f["ledger_bytes"],
                          message=f"the device holds {drift / mib:.1f} MiB more than the books charge "
                                  f"(allocator {f['device_used_bytes'] / mib:.1f} MiB net of its load baseline, "
                                  f"books {f['ledger_bytes'] / mib:.1f} MiB; limit {limit / mib:.0f} MiB)")
        elif self.drifting and drift <= limit // 2:
            self.drifting = False

    def _slow_figures(self) -> dict:
        out = {"rss_bytes": self._proc.memory_info().rss, "cpu_percent": self._proc.cpu_percent(None)}
        if self._nvml is not None:
            try:
                import pynvml
                import torch
                used = pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used
                reserved = torch.cuda.memory_reserved(self.device)
                out["nvml_used_bytes"] = used
                out["gpu_util"] = pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu
                if self._nvml0 is None:
                    self._nvml0 = (used, reserved)
                # what the device gave out since the first read beyond the allocator's own growth:
                # memory outside torch's allocator, or another process's (informational, not checked)
                out["nvml_drift_bytes"] = (used - self._nvml0[0]) - (reserved - self._nvml0[1])
            except Exception:  # noqa: BLE001 - a flaky NVML read just leaves the figure out
                pass
        return out

    def _run(self):
        """A fixed-rate timer: a late wake-up (the GIL, a busy core) is made up by sampling again at
        once, so the rate holds on average; a backlog beyond 0.1 s is dropped rather than burst."""
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self.bus.emit("vram", **self.sample())
            except Exception:
                log.exception("sampler failed")
            now = time.monotonic()
            due = max(due + self.period, now - 0.1)
            if due > now:
                self._stop.wait(due - now)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
