"""The device-memory budget: every session's bytes are known, and room is made before allocating.

A session is charged for its KV slab and its held activations before they are allocated
(`reserve`), and sessions that are paused or idle are swapped out, coldest first, to make room.
Swapped state goes to the host pool, then to disk; it comes back bit for bit.

No lock is held through a copy, so swaps of different sessions run at once:

* `acct` guards the books (charges, pins, where a session's state is, which sessions are moving) and
  is only ever held for a moment; a forward of a resident session never waits behind a swap.
* A session whose bytes are being copied (out, in, or host pool to disk) is *moving*: claimed under
  `acct` before its copy, given back under `acct` after its commit. A moving session is no victim,
  is demoted by nobody, and whoever else wants to move it waits (`changed`) for its move to end;
  closing it waits too. Its host range or disk file is its own while it moves.
* `lock`, the room lock, serialises the choice of victims (and the prefetcher's plans): victims are
  claimed under it, so two requesters never count the same one, and copied after it is let go.
  A thread holding a claim never takes `lock`, so waiting for a claim under `lock` cannot deadlock.
* A swap-out commits under `acct`, and drops its copy if a forward pinned the session meanwhile.

On CUDA the copies run on streams of their own, one each way (a swap-out beside a swap-in uses
both copy engines), and each swap waits for its own end event with no lock held. A swap-out's copy
waits for the session's own work (an event recorded whenever it is unpinned), not for every
session's compute; a swap-in's copy waits for the default stream *after* its storage is allocated,
since the caching allocator may hand back a block that kernels queued there still use.
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
ERROR_EVERY_S = 1.0  # at most one `error` event a second for each kind of swap failure (see `_report`)


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
        self.lock = threading.RLock()  # the room lock: choosing (and claiming) victims; never held through a copy
        self.acct = threading.Lock()  # the books: charges, pins, `stored`, `_moving`; held briefly
        self.changed = threading.Condition(self.acct)
        self._moving: set = set()  # sessions whose bytes are being copied (claimed under acct)
        self._version = 0  # bumped on every change a waiting reserve may care about
        self.sessions: dict[int, object] = {}
        self.peak = self.used
        self.swap_enabled = True
        self.counters = {"swap_outs": 0, "swap_ins": 0, "bytes_out": 0, "bytes_in": 0, "demotions": 0, "failures": 0}
        self.latencies = deque(maxlen=10000)  # (direction, ms, gbps)
        self._reported: dict = {}  # (where, tier, cause) -> (when its last error event went, how many since not)
        self._report_lock = threading.Lock()
        self._streams = {"out": torch.cuda.Stream(device), "in": torch.cuda.Stream(device)} if self.cuda else {}
        self.spares = None if self.cuda else Spares()  # CUDA's caching allocator keeps freed blocks itself
        self.on_disk = lambda s, stored: None  # told when a session's bytes are in a disk file (the journal)
        # CUDA: what the allocator holds beyond the books before any session (telemetry's drift check)
        self.device_baseline = torch.cuda.memory_allocated(device) - self.fixed if self.cuda else 0

    # -- accounting ---------------------------------------------------------------------------
    @property
    def fixed(self) -> int:
        """What the device holds whatever the sessions: the weights and the cuBLAS workspaces."""
        return self.weights_bytes + self.overhead

    @property
    def used(self) -> int:
        return self.fixed + sum(s.charge for s in list(self.sessions.values()))

    # Figures are read without the locks: status and the
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
        return {"allocated_bytes": torch.cuda.memory_allocated(self.device), "baseline_bytes": self.device_baseline,
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
        with self.acct:
            while s in self._moving:  # its copy ends first: its range or file is the copy's meanwhile
                self.changed.wait()
            self.sessions.pop(s.id, None)
            self._drop_stored(s)
            s.charge = 0
            self._changed()

    def _changed(self) -> None:  # holding acct
        self._version += 1
        self.changed.notify_all()

    def _unclaim(self, s) -> None:  # holding acct
        """`s` has moved (or not): another may move it now."""
        self._moving.discard(s)
        self._changed()

    def moving(self, s) -> bool:
        """Whether `s`'s bytes are being copied right now."""
        return s in self._moving

    def reset_peak(self) -> None:
        """Start the peak over from now, the allocator's too (a scenario run measures its own)."""
        self.peak = self.used
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def set_budget(self, budget: int) -> None:
        with self.acct:
            if budget <= self.fixed:
                raise DjinnError("bad_params", f"budget {budget} B does not even hold the weights and workspaces ({self.fixed} B)")
            self.budget = budget
            self._changed()
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
            _, full = self._make_room(nbytes, s)
            with self.acct:
                if self._charge_if_fits(s, nbytes):
                    return
                if full is not None:
                    raise DjinnError("out_of_budget", f"no room for {nbytes} B more for {who}: {full.full}, so the "
                                     "sessions that would make room cannot be swapped out")
                if not self.swap_enabled and not self._pinned_others(s):
                    raise DjinnError("out_of_budget", f"{who} needs {nbytes} B more and swapping is off")
                seen = self._version  # a swap still moving others out bumps it as it commits
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
        victims could not go to a full disk tier, that failure (waiting would not make the room).

        Under the room lock the coldest victims that cover the shortfall are claimed (moving: no other
        requester counts them); their copies run after it is let go, beside other requesters' own.
        Victims another requester is moving out are not counted: their room is that requester's. Once a
        full disk tier refuses one, only victims that fit the host pool's free room as it is are tried:
        the others would meet the same tier (each try a write that fails, and an error event)."""
        full, tried = None, set()
        while full is None:
            with self.lock, self.acct:
                short = self.used + nbytes - self.budget
                picked = []
                for v in self._victims(requester):
                    if short <= 0:
                        break
                    if v not in tried:
                        self._moving.add(v)
                        picked.append((v, v.pins_taken))
                        short -= v.charge
            if not picked:
                break
            for i, (v, pins_taken) in enumerate(picked):
                tried.add(v)
                if full is not None and v.charge > self.host.largest_free():  # it would meet the full tier too
                    self._unclaim_all([(v, pins_taken)])
                    continue
                try:
                    self._swap_out_claimed(v, pins_taken, "evict", None)
                except TierFull as e:
                    full = e
                except DjinnError:
                    continue  # that one could not move; try the next
                except BaseException:
                    self._unclaim_all(picked[i + 1:])
                    raise
        with self.acct:
            if self.used + nbytes <= self.budget:
                return True, None
            if full is None:
                return False, None
            # the full tier is why, when the sessions that may move (the one that failed among them) would make the room
            movable = sum(o.charge for o in self._victims(requester))
            return False, full if self.used - movable + nbytes <= self.budget else None

    def _unclaim_all(self, picked) -> None:
        """Victims claimed and not reached: nobody's to move again."""
        with self.acct:
            for w, _ in picked:
                self._unclaim(w)

    def _victims(self, requester):  # holding acct (or reading a snapshot: each may have moved since)
        if not self.swap_enabled:
            return []
        # Whatever is not pinned may go: paused, idle, or queued for the device (it swaps back in once it
        # holds the device). Only a session computing or being inspected is pinned; one moving is on its way.
        cands = [o for o in list(self.sessions.values())
                 if o is not requester and o.charge and not o.pins and o.stored is None and o not in self._moving]
        return sorted(cands, key=coldness)

    # -- swapping -------------------------------------------------------------------------------
    def swap_out(self, s, reason: str = "evict", tier: str | None = None) -> None:
        """Copy every device tensor of `s` to the host pool (or disk), then free the device storage in place.
        Waits for a move of `s` already under way to end; swaps of other sessions run beside it."""
        with self.acct:
            while s in self._moving:
                self.changed.wait()
            if s.stored is not None or s.pins or self.sessions.get(s.id) is not s:
                return
            self._moving.add(s)
            pins_taken = s.pins_taken
        self._swap_out_claimed(s, pins_taken, reason, tier)

    def _swap_out_claimed(self, s, pins_taken: int, reason: str, tier: str | None) -> None:
        """The swap-out of `s`, claimed (moving) by the caller with `pins_taken` as it was then; no lock
        is held through the copy. Gives the claim back however it ends."""
        try:
            self._copy_out(s, pins_taken, reason, tier)
        finally:
            with self.acct:
                self._unclaim(s)

    def _copy_out(self, s, pins_taken: int, reason: str, tier: str | None) -> None:
        storages = _unique_storages(s.swappable_tensors())
        sizes = [st.nbytes() for st in storages]
        total = sum(sizes)
        stream = self._streams.get("out")
        self._fence(stream, s.device_done)  # what was queued for it is written first
        t0 = self._timer(stream)
        stored = None
        try:
            if tier != "disk":
                stored = self._to_host(storages, sizes, s.charge, stream)
            if stored is None:
                stored = Stored("disk", sizes, s.charge)
                with self._on(stream):  # its copies wait for this session's work alone
                    stored.path, stored.crc = self.disk.write(self.disk.name(s.id, time.monotonic_ns()),
                                                              [u8(st) for st in storages], total)
        except Exception as e:  # noqa: BLE001 - nothing was freed: the session stays where it was
            self._sync(stream)  # a copy queued before the failure may still read the storage
            self.count("failures")
            err = (TierFull(s.id, self.disk.folder, e) if isinstance(e, OSError) and e.errno in DISK_FULL
                   else DjinnError("swap_failed", f"swap-out of session {s.id} failed: {e}"))
            self._report("swap_out", (stored.tier if stored else "host", _cause(e)), err.message, session=s.id)
            raise err from None
        ms = self._elapsed(t0, stream, stored.tier)  # waits for the copies (no lock held): only then may the storage go
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
            ms = self._elapsed(t0, stream)  # on the CPU, giving the pages back is part of the cost
        if stored.tier == "disk":
            self.on_disk(s, stored)
        self._account("out", s, stored.tier, total, ms, reason)

    def _to_host(self, storages, sizes, charge, stream) -> Stored | None:
        total = sum(sizes)
        if total > self.host.capacity:  # it could never fit: demoting others would not help
            return None
        off = self.host.alloc(total)
        if off is None:
            self._demote_for(total)
            off = self.host.alloc(total)
        if off is None:
            return None
        dst = self.host.view(off, total)  # this swap's own range (the pool's lock gave it out)
        try:
            with self._on(stream):
                pos = 0
                for st, n in zip(storages, sizes):
                    dst[pos:pos + n].copy_(u8(st), non_blocking=True)
                    pos += n
        except BaseException:
            self._sync(stream)  # no copy may still write the range once another swap has it
            self.host.release(off, total)
            raise
        return Stored("host", sizes, charge, offset=off)

    def _demote_for(self, nbytes: int) -> None:
        """Move the coldest host-resident sessions to disk until `nbytes` fit in the host pool. Each is
        claimed (moving) through its copy: nobody swaps it in or frees its range meanwhile."""
        tried = set()
        while self.host.largest_free() < nbytes:
            with self.acct:
                cold = [o for o in self.sessions.values() if o.stored is not None and o.stored.tier == "host"
                        and o not in self._moving and o not in tried]
                if not cold:
                    return
                o = min(cold, key=coldness)
                self._moving.add(o)
                st = o.stored
            tried.add(o)
            try:
                t0 = self._timer(None)
                path, crc = self.disk.write(self.disk.name(o.id, time.monotonic_ns()),
                                            [self.host.view(st.offset, st.nbytes)], st.nbytes)
            except OSError as e:
                with self.acct:
                    self._unclaim(o)
                self._report("demote", ("disk", _cause(e)), f"demotion of session {o.id} to disk failed: {e}", session=o.id)
                return
            except BaseException:
                with self.acct:
                    self._unclaim(o)
                raise
            with self.acct:
                self._free(st)
                o.stored = disk = Stored("disk", st.sizes, st.charge, path=path, crc=crc)
                self._unclaim(o)
            self.on_disk(o, disk)
            self.count("demotions")
            ms = self._elapsed(t0, None, "disk")
            self.bus.emit("swap_out", session=o.id, tier="disk", bytes=st.nbytes, ms=round(ms, 3),
                          gbps=_gbps(st.nbytes, ms), reason="demote", **{"from": "host"})

    def adopt(self, s, name: str, nbytes: int, crc: int) -> bool:
        """At a start: `s`'s KV is the swap file `name` a previous run left (its slab holds no memory,
        see SlabCache.shell), when the file is whole and its checksum matches; else False."""
        path = self.disk.adopt(name, nbytes, crc)
        if path is None:
            return False
        with self.acct:
            s.stored = Stored("disk", [nbytes], nbytes, path=path, crc=crc)
            self._changed()
        return True

    def keep_on_disk(self, sessions) -> None:
        """At a stop: the swap files of these sessions stay for the next start, which takes them back."""
        with self.acct:
            for s in sessions:
                if s.stored is not None and s.stored.tier == "disk" and s not in self._moving:
                    self.disk.keep.add(s.stored.path.name)
                    s.stored = None  # (closing it now frees nothing of it)

    def swap_in(self, s, reason: str = "demand", make_room: bool = True, timeout: float = ROOM_WAIT_S) -> None:
        """Bring `s` back to the device, making room first (see `reserve`); the storages are restored in place.
        Claims `s` (moving) once its charge is reserved, after any move of it under way has ended."""
        while True:
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
            with self.acct:
                while s in self._moving:  # (demoted to disk, or brought back by another, meanwhile)
                    self.changed.wait()
                stored = s.stored
                same = stored is not None and stored.charge == need and self.sessions.get(s.id) is s
                if same:
                    self._moving.add(s)
                else:  # brought back (or closed) meanwhile, or swapped in and out again at another size
                    s.charge = max(0, s.charge - need)
                    self._changed()
            if same:
                break
            self._keep(blocks)
            if stored is None or self.sessions.get(s.id) is not s:
                return
        try:
            self._copy_in(s, stored, need, blocks, reason)
        finally:
            with self.acct:
                self._unclaim(s)

    def _copy_in(self, s, stored: Stored, need: int, blocks, reason: str) -> None:
        storages = _unique_storages(s.swappable_tensors())
        stream = self._streams.get("in")
        try:
            for st, n, block in zip(storages, stored.sizes, blocks):
                Spares.restore(st, n, block)  # fresh memory where no block was kept (always on CUDA)
            # after the allocation: the blocks may have been freed by kernels still queued there
            self._fence(stream, None)
            t0 = self._timer(stream)
            if stored.tier == "host":
                src = self.host.view(stored.offset, stored.nbytes)  # its own range while it moves
                with self._on(stream):
                    pos = 0
                    for st, n in zip(storages, stored.sizes):
                        u8(st).copy_(src[pos:pos + n], non_blocking=True)
                        pos += n
            else:
                with self._on(stream):
                    self.disk.read(stored.path, [u8(st) for st in storages])
        except Exception as e:  # noqa: BLE001 - roll back: the session stays swapped out, intact
            self._sync(stream)  # a copy queued before the failure may still write the storage
            for st in storages:
                st.resize_(0)
            self.release(s, need)
            self.count("failures")
            self._report("swap_in", (stored.tier, _cause(e)), f"swap-in of session {s.id} failed: {e}", session=s.id)
            raise DjinnError("swap_failed", f"swap-in of session {s.id} failed: {e}") from None
        ms = self._elapsed(t0, stream, stored.tier)  # no lock held while it waits for the copy
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

    def _report(self, where: str, kind: tuple, message: str, **fields) -> None:
        """An `error` event for a failed swap or demotion, at most one every ERROR_EVERY_S for each
        (where, tier, cause): a full disk tier fails every request that needs room, thousands a minute.
        The others are counted (`counters["failures"]` counts them all) and the next event reported
        says how many were not (`suppressed`)."""
        key, now = (where, *kind), time.monotonic()
        with self._report_lock:
            last, n = self._reported.get(key, (None, 0))
            if last is not None and now - last < ERROR_EVERY_S:
                self._reported[key] = (last, n + 1)
                return
            self._reported[key] = (now, 0)
        if n:
            fields["suppressed"] = n
            message += f" ({n} more like it in the {now - last:.1f} s since the last one reported)"
        self.bus.emit("error", where=where, message=message, **fields)

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
    # `stream`: the copy stream of a swap's direction on CUDA, None on the CPU (and for disk demotions).
    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else _Null()

    def _fence(self, stream, event) -> None:
        """Make the copy stream wait for `event`, or with None for all work queued on the stream that
        allocates (this thread's current one: the default, as the forwards run)."""
        if stream is None:
            return
        if event is None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            stream.wait_event(event)

    def _sync(self, stream) -> None:
        if stream is not None:
            stream.synchronize()

    def _timer(self, stream):
        """Start a timing: wall clock always; on a GPU a CUDA event on the copy stream (after its
        fence) marks the start, so the figure is the copy alone."""
        ev = None
        if stream is not None:
            ev = torch.cuda.Event(enable_timing=True, blocking=True)
            ev.record(stream)
        return time.perf_counter(), ev

    def _elapsed(self, t0, stream, tier: str = "host") -> float:
        """Wait for the copies and return milliseconds: CUDA events time host-pool copies on a GPU,
        the wall clock everything else (disk I/O, and all of it on the CPU). Called with no lock held."""
        wall, ev = t0
        if ev is not None:
            end = torch.cuda.Event(enable_timing=True, blocking=True)  # the host sleeps, not spins, on it
            end.record(stream)
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


def _cause(e: BaseException):
    """What a swap failure is, for counting alike ones: its errno, else the kind of exception."""
    return getattr(e, "errno", None) or type(e).__name__


def _gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / (ms * 1e6), 3) if ms > 0 else 0.0
