"""Where swapped-out session state lives: a host pool allocated once and reused, then a disk tier.

The host pool is one buffer (pinned on CUDA, since pinning per swap costs more than the copy)
carved first-fit. The disk tier writes plain files, space reserved with fallocate first: a memory
map would turn a full disk into SIGBUS, a plain write into an error we can recover from. Each file
gets a CRC-32 of its bytes as written, checked when a later run takes it back. Its files are named
session-<id>-<stamp>.swap; at a start, those a previous run left are either taken back (`adopt`: an
idle session's KV that the journal names, see Runtime.restore) or removed (`sweep`), and files of
other names in its folder are never touched.
"""

import contextlib
import logging
import os
import re
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .sizes import format_size

ALIGN = 512
BLOCK = 4 << 20  # bytes: the unit of the disk tier's copies, each checksummed beside the next (DiskTier._through_stage)
STAGES = 4  # copies to or from disk at once, each through a bounce buffer of its own (two blocks)
SWAP_FILE = re.compile(r"session-\d+-\d+\.swap")  # the disk tier's own files (DiskTier.name); nothing else is touched

log = logging.getLogger("djinnd")


def u8(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over a whole storage, for copying it as bytes."""
    t = torch.empty(0, dtype=torch.uint8, device=storage.device)
    return t.set_(storage, 0, (storage.nbytes(),))


def host_buffer(owner, n: int, device: torch.device) -> torch.Tensor:
    """`n` bytes of host memory, page-locked for a CUDA `device`, exactly: torch's pinned allocator
    rounds a request up to a power of two (48 GiB asked would pin 64). The pages are registered for
    as long as `owner` lives, under `device`, so no other GPU gets a context for them."""
    buf = torch.empty(n, dtype=torch.uint8)
    if device.type == "cuda" and n:
        cudart = torch.cuda.cudart()
        with torch.cuda.device(device):
            err = int(cudart.cudaHostRegister(buf.data_ptr(), n, 1))  # 1: portable, as torch pins
        if err:
            raise OSError(f"cannot pin {n} B of host memory (cudaHostRegister error {err})")
        weakref.finalize(owner, _unregister, device, buf.data_ptr())  # before the buffer is freed
    return buf


def _unregister(device: torch.device, ptr: int) -> None:
    with torch.cuda.device(device):
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostPool:
    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity
        self.buffer = host_buffer(self, capacity, device)
        self.pinned_bytes = capacity if device.type == "cuda" else 0
        self._free = [(0, capacity)] if capacity else []  # (offset, size), sorted, coalesced
        self.used = 0
        self._lock = threading.Lock()

    def alloc(self, n: int) -> int | None:
        size = -(-n // ALIGN) * ALIGN
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    self._free[i:i + 1] = [(off + size, free - size)] if free > size else []
                    self.used += size
                    return off
        return None

    def release(self, off: int, n: int) -> None:
        size = -(-n // ALIGN) * ALIGN
        with self._lock:
            self._free.append((off, size))
            self._free.sort()
            merged = []
            for o, s in self._free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + s)
                else:
                    merged.append((o, s))
            self._free = merged
            self.used -= size

    def largest_free(self) -> int:
        with self._lock:
            return max((size for _, size in self._free), default=0)

    def span(self) -> int:
        """Where the highest range in use ends: the pool's footprint. First-fit from offset 0 keeps it
        low; the free bytes below it are holes (1 - used / span is the pool's fragmentation)."""
        with self._lock:
            if self._free and sum(self._free[-1]) == self.capacity:
                return self._free[-1][0]
            return self.capacity

    def view(self, off: int, n: int) -> torch.Tensor:
        return self.buffer[off:off + n]


class DiskTier:
    def __init__(self, folder: Path, device: torch.device):
        self.folder = Path(folder)
        self.used = 0
        self._device = device
        self._lock = threading.Lock()  # `used`
        self._stages: list[torch.Tensor] = []  # bounce buffers not in use (pinned on CUDA)
        self._made = 0
        self._free = threading.Condition()
        self._crc = None  # threads that checksum the bounce buffers beside the copies (_through_stage)
        self.keep: set[str] = set()  # names of files the next start is to find (taken back, or left at a stop)

    @staticmethod
    def name(sid: int, stamp: int) -> str:
        """A swap file's name (less `.swap`): the session, and a stamp that keeps each copy's apart."""
        return f"session-{sid}-{stamp}"

    def _own_files(self):
        """The folder's regular files named as this tier names its own (none when there is no folder)."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return []
        return [e for e in entries if SWAP_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False)]

    def adopt(self, name: str, nbytes: int, crc: int) -> Path | None:
        """A file a previous run left, taken back as it is (its path) when it is this tier's, of
        `nbytes` bytes and their CRC-32 is `crc`; else None, with a log line saying why not."""
        path = self.folder / name
        try:
            if not SWAP_FILE.fullmatch(name) or not path.is_file() or path.is_symlink():
                raise OSError("no such swap file")
            if path.stat().st_size != nbytes:
                raise OSError(f"{path.stat().st_size} B, not {nbytes}")
            got = 0
            with open(path, "rb", buffering=0) as f, self._stage() as stage:
                view = memoryview(stage.numpy())
                while n := f.readinto(view):
                    got = zlib.crc32(view[:n], got)
            if got != crc:
                raise OSError("its checksum does not match")
        except OSError as e:
            log.warning("swap file %s not taken back (%s): that session's KV is computed again", path, e.strerror or e)
            return None
        self.keep.add(name)
        with self._lock:
            self.used += nbytes
        return path

    def sweep(self) -> tuple[int, int]:
        """Remove the swap files a previous run left (a daemon killed cannot clean up) but those
        taken back: their count and bytes, logged. Files of other names stay."""
        count = nbytes = 0
        for e in self._own_files():
            if e.name in self.keep:
                continue
            try:
                size = e.stat(follow_symlinks=False).st_size
                os.unlink(e.path)
            except OSError as err:
                log.warning("cannot remove the stale swap file %s: %s", e.path, err.strerror or err)
                continue
            count += 1
            nbytes += size
        if count:
            log.info("removed %d swap file%s (%s) that a previous run left in the disk tier %s",
                     count, "" if count == 1 else "s", format_size(nbytes), self.folder)
        return count, nbytes

    @contextlib.contextmanager
    def _stage(self):
        """A bounce buffer of this copy's own, so that copies of different sessions go at once (at
        most STAGES: then a copy waits for one to be free)."""
        with self._free:
            while not self._stages and self._made >= STAGES:
                self._free.wait()
            if self._stages:
                stage = self._stages.pop()
            else:
                self._made += 1
                stage = None
        if stage is None:
            try:
                stage = host_buffer(self, 2 * BLOCK, self._device)
            except BaseException:
                with self._free:
                    self._made -= 1
                    self._free.notify()
                raise
        try:
            yield stage
        finally:
            with self._free:
                self._stages.append(stage)
                self._free.notify()

    def write(self, name: str, parts: list[torch.Tensor], total: int) -> tuple[Path, int]:
        """Write the byte tensors in order to one file: its path and the CRC-32 of its bytes; on any
        OSError remove it and re-raise."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.swap"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if total:
                os.posix_fallocate(fd, 0, total)
            crc = self._through_stage(parts, lambda src, stage: (stage.copy_(src), _write_exact(fd, stage.numpy())))
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        with self._lock:
            self.used += total
        return path, crc

    def read(self, path: Path, parts: list[torch.Tensor]) -> None:
        """Read the file back into the byte tensors (OSError if it is short). Not checksummed: a file
        this run wrote is trusted as its host pool is (`adopt` checks those a previous run left)."""
        with open(path, "rb", buffering=0) as f:
            self._through_stage(parts, lambda dst, stage: (_read_exact(f, stage.numpy()), dst.copy_(stage)), False)

    def _through_stage(self, parts: list[torch.Tensor], move, checksum: bool = True) -> int:
        """`move(part's block, bounce buffer's block)` for each block of the parts in file order: the
        disk's bytes pass through a bounce buffer, since numpy views of a session's own storage would
        make it non-resizable. Their CRC-32 (0 without `checksum`), computed block by block on a
        thread of the tier's while the next block moves: the checksum (~3 GB/s) hides behind the copies."""
        if checksum and self._crc is None:
            self._crc = ThreadPoolExecutor(2, thread_name_prefix="djinnd-crc")
        job, reading = None, [None, None]  # the last checksum, and the one that reads each half

        def crc(block, before):  # on a thread, after the block before it
            return zlib.crc32(block.numpy(), before.result() if before else 0)

        with self._stage() as stage:
            try:
                k = 0
                for part in parts:
                    for b in range(0, part.numel(), BLOCK):
                        half = k % 2
                        if reading[half] is not None:
                            reading[half].result()  # its checksum is done before the half is filled again
                        src = part[b:b + BLOCK]
                        block = stage[half * BLOCK:half * BLOCK + src.numel()]
                        move(src, block)
                        if checksum:
                            job = reading[half] = self._crc.submit(crc, block, job)
                        k += 1
            finally:
                value = job.result() if job is not None else 0  # (whatever `move` raised: the buffer is free)
        return value

    def remove(self, path: Path, total: int) -> None:
        Path(path).unlink(missing_ok=True)
        self.keep.discard(Path(path).name)
        with self._lock:
            self.used -= total

    def cleanup(self) -> None:
        """Remove the spill folder's swap files but those kept for the next start (on shutdown, when
        no session is left), and the folder once it is empty (one holding other files stays)."""
        for e in self._own_files():
            if e.name not in self.keep:
                Path(e.path).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


def _write_exact(fd, arr: np.ndarray) -> None:
    view = memoryview(arr).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def _read_exact(f, arr: np.ndarray) -> None:
    view = memoryview(arr).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"swap file {f.name} is truncated")
        got += n


@dataclass
class Stored:
    """A swapped-out session's bytes: where they are and how they split back into storages."""
    tier: str  # "host" or "disk"
    sizes: list[int]
    charge: int  # the device bytes the session was accounted for
    offset: int = 0
    path: Path | None = None
    crc: int = 0  # the disk file's CRC-32
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(self.sizes)
