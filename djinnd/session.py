"""A session: its tokens, its KV slab, and the forward pass it may be paused inside."""

import enum
import threading
import time



class State(enum.StrEnum):
    IDLE = "idle"
    RUNNING = "running"  # a forward in flight (queued for the device, or computing)
    PAUSED = "paused"  # inside a forward, at a breakpoint
    CLOSED = "closed"


class Aborted(Exception):
    """Raised inside a paused forward to unwind it when its session is closed."""


class Session:
    """Its fields in groups, each written by one owner only (and `last_used` through `touch`)."""

    def __init__(self, sid: int, prompt_ids: list[int], qos: str, lm):
        self.id, self.qos = sid, qos
        self.created_at = time.time()
        self.last_used = time.monotonic()
        # the runtime's: tokens, the forward and its pause
        self.prompt_ids = list(prompt_ids)
        self.generated: list[int] = []
        self.pending: list[int] = list(prompt_ids)  # the next forward's input
        self.cache = lm.new_cache()
        self.state = State.IDLE
        self.layer: int | None = None  # where it is paused
        self.breakpoints: list[int] = []
        self.patches: list[dict] = []  # applied during the paused forward, journaled to redo them at a restart
        self.segments: list[list] = []  # [[tokens, times(, patches)], ...]: the forwards that built its KV (journal.py)
        self.replay: list[list[int]] = []  # restored: those to run again before its next forward (Runtime._replay)
        self.redo: list[dict] = []  # the patches of the forward it runs again, applied as it passes their layers
        self.restored = False  # brought back by a restart, until its first forward since
        self.hidden = None  # the paused layer's output, which inspect and patch act on
        self.held: list = []  # every activation the paused forward holds: swapped with the slab
        self.embeds = None
        self.act_charge = 0  # the part of `charge` that is this forward's activations
        self.forward_pinned = False
        self.long_segment = False  # the running forward is a prefill (see DeviceLock.hand_over)
        self.waking = False  # it signalled IO_WAIT and its next forward has not started (DeviceLock)
        self.cond = threading.Condition()  # the forward thread's handshake
        self.op_lock = threading.Lock()  # a forward (until its answer), resume, inspect, patch and close, one at a time
        self.closing = False
        self.resume_requested = False
        self.abort_requested = False
        self.error: Exception | None = None
        self.token: int | None = None
        self.thread: threading.Thread | None = None
        # the memory manager's: the books and where the state is
        self.charge = 0
        self.pins = 0
        self.pins_taken = 0  # ever: a swap-out whose copy spans a pin may have missed what was written
        self.stored = None
        self.device_done = None  # CUDA: an event after the last work queued for it, set at unpin
        self.swaps = 0
        self.last_swap_ms: float | None = None
        # the prefetcher's
        self.phase = "COMPUTE"  # IO_WAIT from a hint until the session computes again

    def touch(self) -> None:
        """Used now: the last of its class to be evicted."""
        self.last_used = time.monotonic()

    @property
    def location(self) -> str:
        return "device" if self.stored is None else self.stored.tier

    def swappable_tensors(self) -> list:
        return self.cache.tensors() + self.held

    def info(self) -> dict:
        stored = self.stored  # read once: a swap may move it meanwhile
        return {
            "id": self.id, "state": self.state.value, "layer": self.layer,
            "location": "device" if stored is None else stored.tier,
            "device_bytes": self.charge,
            "host_bytes": stored.nbytes if stored and stored.tier == "host" else 0,
            "disk_bytes": stored.nbytes if stored and stored.tier == "disk" else 0,
            "qos": self.qos, "phase": self.phase, "seq_len": self.cache.seq_len,
            "prompt_tokens": len(self.prompt_ids), "tokens": list(self.generated),
            "last_swap_ms": self.last_swap_ms, "swaps": self.swaps, "created_at": self.created_at,
            "restored": self.restored,
        }

