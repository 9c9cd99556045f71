"""What a CUDA device holds beyond the tensors the books name, measured once from the allocator.

The budget charges each session's KV slab and the activations its paused forward holds. On a GPU
a forward also allocates temporaries while it computes (attention, MLP, norms, logits), and every
thread that runs a matmul takes a cuBLAS handle with a workspace of its own, which torch keeps
allocated after the thread ends and hands to the next new thread. Both are measured here, so the
books can charge them: a forward's temporaries while it computes, one workspace for every compute
thread beyond those torch already holds. On the CPU the budget counts what sessions hold (the
contract), so both are zero.
"""

import threading
from dataclasses import dataclass

import torch

PROBE_TOKENS = (64, 256, 1024)  # three lengths: attention's temporaries may grow with the square


@dataclass
class DeviceCosts:
    work: tuple[float, float, float] = (0, 0, 0)  # a forward's temporaries: bytes + per token + per token squared
    thread_bytes: int = 0  # what a new compute thread allocates and torch keeps (its cuBLAS workspace)
    handles: int = 0  # compute threads torch holds workspaces for after the measurement
    owner: threading.Thread | None = None  # the measuring thread, which keeps one of them

    def work_bytes(self, tokens: int) -> int:
        """Device bytes a forward over `tokens` new tokens allocates beside the KV, at its peak."""
        a, b, c = self.work
        return int(a + b * tokens + c * tokens * tokens) if a else 0


def measure(lm) -> DeviceCosts:
    if lm.device.type != "cuda":
        return DeviceCosts()

    dev = lm.device

    def peak(tokens: int) -> int:
        cache = lm.new_cache()
        cache.grow(cache.capacity_for(tokens))
        ids = torch.zeros((1, tokens), dtype=torch.long, device=dev)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            lm.forward(ids, cache.cache)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base

    # Workspaces made before (another runtime in this process) would hide a new thread's: free them
    # all (torch's CUDA-graph code does the same); each handle makes its own again at its next matmul.
    # Safe here, before anything else computes: the daemon measures once, at load.
    torch._C._cuda_clearCublasWorkspaces()
    peak(8)  # this thread's workspace and the kernels' first allocations are not a forward's cost
    before = torch.cuda.memory_allocated(dev)
    probe = threading.Thread(target=peak, args=(8,), name="djinn-probe")
    probe.start()
    probe.join()
    thread_bytes = torch.cuda.memory_allocated(dev) - before
    return DeviceCosts(_fit([peak(n) for n in PROBE_TOKENS]), thread_bytes, 2, threading.current_thread())


def _fit(ys: list[int]) -> tuple[float, float, float]:
    """a + b t + c t^2 through the probes (c >= 0, b >= 0), with `a` raised until none lies above."""
    (x1, x2, x3), (y1, y2, y3) = PROBE_TOKENS, ys
    s12, s23 = (y2 - y1) / (x2 - x1), (y3 - y2) / (x3 - x2)
    c = max(0.0, (s23 - s12) / (x3 - x1))
    b = max(0.0, s23 - c * (x2 + x3))
    a = max(y - b * x - c * x * x for x, y in zip(PROBE_TOKENS, ys))
    return max(a, 0.0) + 1, b, c
