"""The device-memory budget: every session's bytes are known, and room is made before allocating.

A session is charged for its KV slab and its held activations before they are allocated
(`reserve`), and sessions that are paused or idle are swapped out, coldest first, to make room.
Swapped state goes to the host pool, then to disk; it comes back bit for bit.

Two locks. `lock` serialises swaps and is held through their copies. `acct` guards the books
(charges, pins, where a session's state is) and is only ever held for a moment, so a forward of a
resident session (pin, reserve what fits, release, unpin) never waits behind another's swap. A
swap-out commits under `acct`, and drops its copy if a forward pinned the session meanwhile.

On CUDA the copies run on a stream of their own. A swap-out's copy waits for the session's own
work (an event recorded whenever it is unpinned), not for every session's compute; a swap-in's
copy waits for the default stream *after* its storage is allocated, since the caching allocator
may hand back a block that kernels queued there still use.
"""

import errno
import os
import threading
import time
from collections import deque

import torch

from .protocol import DjinnError
from .scheduler import QOS_RANK
from .session import State
from .spares import Spares
from .stats import percentile
from .swappool import DiskTier, HostPool, Stored, u8

ROOM_WAIT_S = 60.0  # how long a request waits for room that running sessions hold before it fails
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a disk tier without room: waiting does not make any


class RoomHeld(DjinnError):
    """The room exists, but sessions running now hold it (it would fit once they are done)."""

    def __init__(self, nbytes: int, holders: list[int]):
        who = f" ({', '.join(map(str, holders))})" if holders else ""
        super().__init__("out_of_budget", f"no room for {nbytes} B: the budget is held by running sessions{who}")


class TierFull(DjinnError):
    """A swap-out found the disk tier full (ENOSPC, EDQUOT): the session stayed where it was."""

    def __init__(self, sid: int, folder, err: OSError):
        self.full = f"the disk tier {folder} is full ({os.strerror(err.errno)})"
        super().__init__("swap_failed", f"swap-out of session {sid} failed: {self.full}")


def coldness(s) -> tuple:
    """Eviction order, lowest first: waiting on I/O; then paused or idle before a forward queued for
    the device; then batch < interactive < realtime; then least recently used."""
    return (s.phase != "IO_WAIT", s.state == State.RUNNING, -QOS_RANK.get(s.qos, 1), s.last_used)


class MemoryManager:
    def __init__(self, device: torch.device, budget: int, weights_bytes: int, host_pool: int, spill_dir, bus,
                 capacity: int = 0, overhead: int = 0):
        self.device = device
        self.budget = budget
        self.capacity = capacity
        self.weights_bytes = weights_bytes
        self.overhead = overhead  # device bytes held outside sessions and weights (cuBLAS workspaces)
        self.cuda = device.type == "cuda"
        self.host = HostPool(host_pool, device)
        self.disk = DiskTier(spill_dir, device)
        self.bus = bus
        self.lock = threading.RLock()  # swaps, one at a time, held through the copy
        self.acct = threading.Lock()  # the books: charges, pins, `stored`; held briefly
        self.changed = threading.Condition(self.acct)
        self._version = 0  # bumped on every change a waiting reserve may care about
        self.sessions: dict[int, object] = {}
        self.peak = self.used
        self.swap_enabled = True
        self.counters = {"swap_outs": 0, "swap_ins": 0, "bytes_out": 0, "bytes_in": 0, "demotions": 0, "failures": 0}
        self.latencies = deque(maxlen=10000)  # (direction, ms, gbps)
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self.spares = None if self.cuda else Spares()  # CUDA's caching allocator keeps freed blocks itself

    # -- accounting ---------------------------------------------------------------------------
    @property
    def fixed(self) -> int:
        """What the device holds whatever the sessions: the weights and the cuBLAS workspaces."""
        return self.weights_bytes + self.overhead

    @property
    def used(self) -> int:
        return self.fixed + sum(s.charge for s in list(self.sessions.values()))

    # Figures are read without the lock, which a swap holds through its copy: status and the
    # sampler must answer at once. Each read is a consistent value; together they are a snapshot.
    def figures(self) -> dict:
        return {"budget_bytes": self.budget, "device_bytes": self.used, "peak_device_bytes": self.peak,
                "weights_bytes": self.weights_bytes, "overhead_bytes": self.overhead, "host_bytes": self.host.used,
                "host_capacity_bytes": self.host.capacity, "host_pinned_bytes": self.host.pinned_bytes,
                "host_span_bytes": self.host.span(),
                "disk_bytes": self.disk.used, "capacity_bytes": self.capacity, "swap_enabled": self.swap_enabled,
                "spare_bytes": self.spares.nbytes if self.spares else 0,
                **self.device_figures()}

    def device_figures(self) -> dict:
        """What the CUDA allocator itself reports, beside the books (nothing on the CPU)."""
        if not self.cuda:
            return {}
        return {"allocated_bytes": torch.cuda.memory_allocated(self.device),
                "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
                "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}

    def swap_figures(self) -> dict:
        out = dict(self.counters)
        latencies = list(self.latencies)
        ms = sorted(m for _, m, _ in latencies)
        gbps = sorted(g for _, _, g in latencies)
        out["latency_ms"] = {"p50": percentile(ms, 50) or 0.0, "p99": percentile(ms, 99) or 0.0, "max": ms[-1] if ms else 0.0}
        out["throughput_gbps"] = {"p50": percentile(gbps, 50) or 0.0}
        return out

    def register(self, s) -> None:
        with self.acct:
            self.sessions[s.id] = s

    def unregister(self, s) -> None:
        """Forget a closed session and free whatever it holds in every tier."""
        with self.lock, self.acct:
            self.sessions.pop(s.id, None)
            self._drop_stored(s)
            s.charge = 0
            self._changed()

    def _changed(self) -> None:  # holding acct
        self._version += 1
        self.changed.notify_all()

    def reset_peak(self) -> None:
        """Start the peak over from now, the allocator's too (a scenario run measures its own)."""
        self.peak = self.used
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def set_budget(self, budget: int) -> None:
        with self.lock:
            if budget <= self.fixed:
                raise DjinnError("bad_params", f"budget {budget} B does not even hold the weights and workspaces ({self.fixed} B)")
            self.budget = budget
            self._make_room(0, None)  # lowering it swaps out what no longer fits
            if self.spares:
                self.spares.trim(self.budget - self.used)

    def pin(self, s) -> None:
        """Keep `s` from being swapped out (it is computing, or being inspected)."""
        with self.acct:
            s.pins += 1
            s.pins_taken += 1

    def pin_resident(self, s, nbytes: int) -> bool:
        """Pin `s` and charge it `nbytes` in one step, if it is on the device and they fit without
        swapping anyone out (a decode step on the RPC loop, which must never wait for a swap)."""
        with self.acct:
            if s.stored is not None or not self._charge_if_fits(s, nbytes):
                return False
            s.pins += 1
            s.pins_taken += 1
            return True

    def unpin(self, s, release: int = 0) -> None:
        """Let `s` be swapped out again, giving back `release` bytes of its charge with the pin.

        On CUDA an event marks the end of what was queued for it: a swap-out's copy waits on that."""
        with self.acct:
            if self.cuda:
                s.device_done = torch.cuda.Event()
                s.device_done.record(torch.cuda.current_stream(self.device))
            s.pins -= 1
            s.charge = max(0, s.charge - release)
            self._changed()

    def reserve(self, s, nbytes: int, timeout: float = ROOM_WAIT_S, make_room: bool = True) -> None:
        """Charge `s` for `nbytes` more device bytes, swapping colder sessions out first; `s` None
        charges the device's own `overhead` (a new compute thread's cuBLAS workspace).

        Waits while the room is held by sessions that are running right now; fails at once when the
        request could never fit, when it does not fit now and `make_room` is False, or when the
        sessions that would make room cannot be swapped out because the disk tier is full.
        """
        if nbytes <= 0:
            return
        who = f"session {s.id}" if s is not None else "a new compute thread's workspace"
        deadline = time.monotonic() + timeout
        while True:
            with self.acct:
                held = s.charge if s is not None else 0
                if self.fixed + held + nbytes > self.budget:
                    raise DjinnError("out_of_budget", f"{who} needs {held + nbytes} B on the device; "
                                     f"the budget leaves {self.budget - self.fixed} B beside the weights")
                if self._charge_if_fits(s, nbytes):
                    return
            if not make_room:
                raise DjinnError("out_of_budget", f"no room for {nbytes} B without swapping others out")
            with self.lock:
                _, full = self._make_room(nbytes, s)
                with self.acct:
                    if self._charge_if_fits(s, nbytes):
                        return
                    if full is not None:
                        raise DjinnError("out_of_budget", f"no room for {nbytes} B more for {who}: {full.full}, so the "
                                         "sessions that would make room cannot be swapped out")
                    if not self.swap_enabled and not self._pinned_others(s):
                        raise DjinnError("out_of_budget", f"{who} needs {nbytes} B more and swapping is off")
                    seen = self._version
            left = deadline - time.monotonic()
            if left <= 0:
                with self.acct:
                    raise RoomHeld(nbytes, self._holders(s))
            self.wait_changed(seen, left)

    def check_room(self, s, nbytes: int) -> None:
        """RoomHeld at once, changing nothing, when `nbytes` more for `s` would not fit even with every
        session that may move swapped out: sessions running now hold the rest, and swapping others
        out would only make them swap back in (two waiters did so to each other thousands of times)."""
        with self.acct:
            holders = self._holders(s)
            movable = sum(o.charge for o in self._victims(s))
            if holders and self.used - movable + nbytes > self.budget:
                raise RoomHeld(nbytes, holders)

    def _holders(self, s) -> list[int]:  # holding acct
        return sorted(o.id for o in self.sessions.values() if o.pins and o is not s and o.charge)

    @property
    def version(self) -> int:
        """Bumped whenever something is unpinned, released or freed: room may have come."""
        return self._version

    def wait_changed(self, seen: int, timeout: float) -> None:
        """Wait (at most `timeout`, and half a second) for the version to move on from `seen`."""
        with self.acct:
            if self._version == seen:
                self.changed.wait(min(timeout, 0.5))

    def _charge_if_fits(self, s, nbytes: int) -> bool:  # holding acct; s None: the overhead
        used = self.used + nbytes  # (a sum over the sessions: once, a batch's rows each pin here)
        if used > self.budget:
            return False
        if s is None:
            self.overhead += nbytes
        else:
            s.charge += nbytes
        self.peak = max(self.peak, used)
        if self.spares:
            self.spares.trim(self.budget - used)
        return True

    def release(self, s, nbytes: int) -> None:
        with self.acct:
            s.charge = max(0, s.charge - nbytes)
            self._changed()

    def _pinned_others(self, s) -> bool:
        return bool(self._holders(s))

    def _make_room(self, nbytes: int, requester) -> tuple[bool, TierFull | None]:
        """Swap out victims until `nbytes` more fit: whether they do, and when they do not only because
        victims could not go to a full disk tier, that failure (waiting would not make the room)."""
        full, stuck = None, 0
        for victim in self._victims(requester):
            if self.used + nbytes <= self.budget:
                break
            try:
                self.swap_out(victim, reason="evict")
            except TierFull as e:
                full, stuck = e, stuck + victim.charge
            except DjinnError:
                continue  # that one could not move; try the next
        if self.used + nbytes <= self.budget:
            return True, None
        return False, full if full is not None and self.used - stuck + nbytes <= self.budget else None

    def _victims(self, requester):
        if not self.swap_enabled:
            return []
        # Whatever is not pinned may go: paused, idle, or queued for the device (it swaps back in once it
        # holds the device). Only a session computing or being inspected is pinned.
        cands = [o for o in self.sessions.values()
                 if o is not requester and o.charge and not o.pins and o.stored is None]
        return sorted(cands, key=coldness)

    # -- swapping -------------------------------------------------------------------------------
    def swap_out(self, s, reason: str = "evict", tier: str | None = None) -> None:
        """Copy every device tensor of `s` to the host pool (or disk), then free the device storage in place."""
        with self.lock:
            with self.acct:
                if s.stored is not None or s.pins or self.sessions.get(s.id) is not s:
                    return
                pins_taken = s.pins_taken
            storages = _unique_storages(s.swappable_tensors())
            sizes = [st.nbytes() for st in storages]
            total = sum(sizes)
            self._fence(s.device_done)  # what was queued for it is written first
            t0 = self._timer()
            stored = None
            try:
                if tier != "disk":
                    stored = self._to_host(storages, sizes, s.charge)
                if stored is None:
                    stored = Stored("disk", sizes, s.charge)
                    with self._on_copy_stream():  # its copies wait for this session's work alone
                        stored.path = self.disk.write(self.disk.name(s.id, time.monotonic_ns()),
                                                      [u8(st) for st in storages], total)
            except Exception as e:  # noqa: BLE001 - nothing was freed: the session stays where it was
                self._sync()  # a copy queued before the failure may still read the storage
                self.count("failures")
                err = (TierFull(s.id, self.disk.folder, e) if isinstance(e, OSError) and e.errno in DISK_FULL
                       else DjinnError("swap_failed", f"swap-out of session {s.id} failed: {e}"))
                self.bus.emit("error", where="swap_out", session=s.id, message=err.message)
                raise err from None
            ms = self._elapsed(t0, stored.tier)  # waits for the copies: only then may the storage go
            with self.acct:
                if s.pins_taken != pins_taken:  # a forward ran or runs meanwhile: the copy may have missed
                    self._free(stored)          # what it wrote, and the device copy stays
                    return
                room = self.budget - self.used + s.charge  # what the budget leaves once it is out
                for st in storages:  # every view the paused forward holds stays valid, now without memory
                    if self.spares:
                        self.spares.free(st, room)
                    else:
                        st.resize_(0)
                stored.charge = s.charge
                s.stored, s.charge = stored, 0
                self._changed()
            if not self.cuda:
                ms = self._elapsed(t0)  # on the CPU, giving the pages back is part of the cost
            self._account("out", s, stored.tier, total, ms, reason)

    def _to_host(self, storages, sizes, charge) -> Stored | None:
        total = sum(sizes)
        if total > self.host.capacity:  # it could never fit: demoting others would not help
            return None
        off = self.host.alloc(total)
        if off is None:
            self._demote_for(total)
            off = self.host.alloc(total)
        if off is None:
            return None
        dst = self.host.view(off, total)
        try:
            with self._on_copy_stream():
                pos = 0
                for st, n in zip(storages, sizes):
                    dst[pos:pos + n].copy_(u8(st), non_blocking=True)
                    pos += n
        except BaseException:
            self._sync()  # no copy may still write the range once another swap has it
            self.host.release(off, total)
            raise
        return Stored("host", sizes, charge, offset=off)

    def _demote_for(self, nbytes: int) -> None:
        """Move the coldest host-resident sessions to disk until `nbytes` fit in the host pool."""
        cold = sorted((o for o in self.sessions.values() if o.stored is not None and o.stored.tier == "host"),
                      key=coldness)
        for o in cold:
            if self.host.largest_free() >= nbytes:
                return
            st = o.stored
            try:
                t0 = self._timer()
                path = self.disk.write(self.disk.name(o.id, time.monotonic_ns()), [self.host.view(st.offset, st.nbytes)],
                                       st.nbytes)
            except OSError as e:
                self.bus.emit("error", where="demote", session=o.id, message=f"demotion of session {o.id} to disk failed: {e}")
                return
            with self.acct:
                self._free(st)
                o.stored = Stored("disk", st.sizes, st.charge, path=path)
            self.count("demotions")
            ms = self._elapsed(t0, "disk")
            self.bus.emit("swap_out", session=o.id, tier="disk", bytes=st.nbytes, ms=round(ms, 3),
                          gbps=_gbps(st.nbytes, ms), reason="demote", **{"from": "host"})

    def swap_in(self, s, reason: str = "demand", make_room: bool = True, timeout: float = ROOM_WAIT_S) -> None:
        """Bring `s` back to the device, making room first (see `reserve`); the storages are restored in place."""
        stored = s.stored
        if stored is None:
            return
        need = stored.charge
        # kept memory of these sizes, set aside first: the charge below would trim it away
        blocks = [self.spares.take(n) if self.spares else None for n in stored.sizes]
        try:
            self.reserve(s, need, timeout=timeout, make_room=make_room)
        except BaseException:
            self._keep(blocks)
            raise
        with self.lock:
            stored = s.stored
            if stored is None or self.sessions.get(s.id) is not s:  # brought back (or closed) meanwhile
                self.release(s, need)
                self._keep(blocks)
                return
            storages = _unique_storages(s.swappable_tensors())
            try:
                for st, n, block in zip(storages, stored.sizes, blocks):
                    Spares.restore(st, n, block)  # fresh memory where no block was kept (always on CUDA)
                # after the allocation: the blocks may have been freed by kernels still queued there
                self._fence(None)
                t0 = self._timer()
                if stored.tier == "host":
                    src = self.host.view(stored.offset, stored.nbytes)
                    with self._on_copy_stream():
                        pos = 0
                        for st, n in zip(storages, stored.sizes):
                            u8(st).copy_(src[pos:pos + n], non_blocking=True)
                            pos += n
                else:
                    with self._on_copy_stream():
                        self.disk.read(stored.path, [u8(st) for st in storages])
            except Exception as e:  # noqa: BLE001 - roll back: the session stays swapped out, intact
                self._sync()  # a copy queued before the failure may still write the storage
                for st in storages:
                    st.resize_(0)
                self.release(s, need)
                self.count("failures")
                self.bus.emit("error", where="swap_in", session=s.id, message=f"swap-in of session {s.id} failed: {e}")
                raise DjinnError("swap_failed", f"swap-in of session {s.id} failed: {e}") from None
            ms = self._elapsed(t0, stored.tier)
            with self.acct:
                self._drop_stored(s)
                self._changed()
            self._account("in", s, stored.tier, stored.nbytes, ms, reason)

    def _keep(self, blocks) -> None:
        """Blocks a swap-in set aside and did not use go back to the spares, as far as the budget allows."""
        for block in blocks:
            if block is not None:
                self.spares.put(block, self.budget - self.used)

    def _drop_stored(self, s) -> None:
        st, s.stored = s.stored, None
        if st is not None:
            self._free(st)

    def _free(self, st: Stored) -> None:
        """Give a stored copy's host-pool range or disk file back."""
        if st.tier == "host":
            self.host.release(st.offset, st.nbytes)
        else:
            self.disk.remove(st.path, st.nbytes)

    def count(self, key: str, n: int = 1) -> None:
        with self.acct:
            self.counters[key] = self.counters.get(key, 0) + n

    def _account(self, direction, s, tier, nbytes, ms, reason) -> None:
        gbps = _gbps(nbytes, ms)
        self.count("swap_outs" if direction == "out" else "swap_ins")
        self.count("bytes_out" if direction == "out" else "bytes_in", nbytes)
        self.latencies.append((direction, ms, gbps))
        s.swaps += 1
        s.last_swap_ms = round(ms, 3)
        self.bus.emit(f"swap_{direction}", session=s.id, tier=tier, bytes=nbytes, ms=round(ms, 3), gbps=gbps, reason=reason)

    # -- timing and streams ----------------------------------------------------------------------
    def _on_copy_stream(self):
        return torch.cuda.stream(self._stream) if self.cuda else _Null()

    def _fence(self, event) -> None:
        """Make the copy stream wait for `event`, or with None for all work queued on the stream that
        allocates (this thread's current one: the default, as the forwards run)."""
        if not self.cuda:
            return
        if event is None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            self._stream.wait_event(event)

    def _sync(self) -> None:
        if self.cuda:
            self._stream.synchronize()

    def _timer(self):
        """Start a timing: wall clock always; on a GPU a CUDA event on the copy stream (after its
        fence) marks the start, so the figure is the copy alone."""
        ev = None
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True, blocking=True)
            ev.record(self._stream)
        return time.perf_counter(), ev

    def _elapsed(self, t0, tier: str = "host") -> float:
        """Wait for the copies and return milliseconds: CUDA events time host-pool copies on a GPU,
        the wall clock everything else (disk I/O, and all of it on the CPU)."""
        wall, ev = t0
        if ev is not None:
            end = torch.cuda.Event(enable_timing=True, blocking=True)  # the host sleeps, not spins, on it
            end.record(self._stream)
            end.synchronize()
            if tier == "host":
                return ev.elapsed_time(end)
        return (time.perf_counter() - wall) * 1000


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _unique_storages(tensors) -> list[torch.UntypedStorage]:
    seen, out = set(), []
    for t in tensors:
        st = t.untyped_storage()
        key = st._cdata
        if key not in seen:
            seen.add(key)
            out.append(st)
    return out


def _gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / (ms * 1e6), 3) if ms > 0 else 0.0
