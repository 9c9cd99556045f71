"""CPU only: the memory of storages that swap-outs freed, kept for the next swap-in of the same size.

On the CPU a freed slab goes back to the kernel, and a fresh one is faulted in and zeroed page by
page as the swap-in's copy first writes it: a 1,024-token SmolLM2 swap-in ran at ~0.6 of a memcpy
(bench/results/cpu-2026-12-02.md). Kept and handed back, it runs at memcpy speed, as on CUDA, whose
caching allocator keeps freed blocks. The memory moves between storages with torch's
`UntypedStorage._swap_data_ptr_`, so every view of the session's storage stays valid; without that
(private) method storages are simply freed. The kept bytes stay within the room the budget leaves
beside what the books charge, so the process never holds more than the budget.

A kept block still holds what its storage held, so a swap-in that copied nothing would come back
right: with `poison` (or DJINN_POISON_SPARES=1, which the tests set) kept blocks are overwritten,
as glibc's MALLOC_PERTURB_ does, and a bit-exact check proves the copy.
"""

import os
import threading

import torch

from .swappool import u8

_CAN_MOVE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")
POISON = 0xA5


class Spares:
    def __init__(self):
        self._lock = threading.Lock()
        self._blocks: list[torch.UntypedStorage] = []  # oldest first
        self.nbytes = 0
        self.poison = os.environ.get("DJINN_POISON_SPARES") == "1"

    def free(self, st: torch.UntypedStorage, room: int) -> None:
        """Free `st`'s memory in place, keeping it while the kept bytes fit in `room`."""
        n = st.nbytes()
        with self._lock:
            if _CAN_MOVE and 0 < n <= room - self.nbytes:
                spare = torch.UntypedStorage(0)
                st._swap_data_ptr_(spare)
                if self.poison:
                    u8(spare).fill_(POISON)
                self._blocks.append(spare)
                self.nbytes += n
                return
        st.resize_(0)

    def take(self, n: int) -> torch.UntypedStorage | None:
        """A kept block of `n` bytes, set aside for a swap-in (so that no trim lets it go meanwhile)."""
        with self._lock:
            i = next((i for i, b in enumerate(self._blocks) if b.nbytes() == n), None)
            if i is None:
                return None
            self.nbytes -= n
            return self._blocks.pop(i)

    def put(self, block: torch.UntypedStorage, room: int) -> None:
        """Keep a block taken and not used, if it fits in `room`."""
        with self._lock:
            if block.nbytes() <= room - self.nbytes:
                self._blocks.append(block)
                self.nbytes += block.nbytes()

    @staticmethod
    def restore(st: torch.UntypedStorage, n: int, block: torch.UntypedStorage | None) -> None:
        """Give the empty `st` `n` bytes again: `block`'s memory when it is that size, else fresh memory."""
        if block is not None and block.nbytes() == n:
            st._swap_data_ptr_(block)
        else:
            st.resize_(n)

    def trim(self, room: int) -> None:
        """Let the oldest kept blocks go until the rest fit in `room`."""
        with self._lock:
            while self._blocks and self.nbytes > room:
                self.nbytes -= self._blocks.pop(0).nbytes()
