"""CPU only: the memory of storages that swap-outs freed, kept for the next swap-in of the same size.

On the CPU a freed slab goes back to the kernel, and a fresh one is faulted in and zeroed page by
page as the swap-in's copy first writes it: a 1,024-token SmolLM2 swap-in ran at ~0.6 of a memcpy
(bench/results/cpu-2026-12-02.md). Kept and handed back, it runs at memcpy speed, as on CUDA, whose
caching allocator keeps freed blocks. The memory moves between storages with torch's
`UntypedStorage._swap_data_ptr_`, so every view of the session's storage stays valid; without that
(private) method storages are simply freed. The kept bytes stay within the room the budget leaves
beside what the books charge, so the process never holds more than the budget.
"""

import threading

import torch

_CAN_MOVE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


class Spares:
    def __init__(self):
        self._lock = threading.Lock()
        self._blocks: list[torch.UntypedStorage] = []  # oldest first
        self.nbytes = 0

    def free(self, st: torch.UntypedStorage, room: int) -> None:
        """Free `st`'s memory in place, keeping it while the kept bytes fit in `room`."""
        n = st.nbytes()
        with self._lock:
            if _CAN_MOVE and 0 < n <= room - self.nbytes:
                spare = torch.UntypedStorage(0)
                st._swap_data_ptr_(spare)
                self._blocks.append(spare)
                self.nbytes += n
                return
        st.resize_(0)

    def restore(self, st: torch.UntypedStorage, n: int) -> None:
        """Give the empty `st` `n` bytes again: a kept block of that size when there is one."""
        with self._lock:
            i = next((i for i, b in enumerate(self._blocks) if b.nbytes() == n), None)
            if i is not None:
                self.nbytes -= n
                st._swap_data_ptr_(self._blocks.pop(i))
                return
        st.resize_(n)

    def trim(self, room: int) -> None:
        """Let the oldest kept blocks go until the rest fit in `room`."""
        with self._lock:
            while self._blocks and self.nbytes > room:
                self.nbytes -= self._blocks.pop(0).nbytes()
