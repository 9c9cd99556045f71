"""Helpers shared by the benchmarks: the machine line printed with every result."""

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU model, cores, memory, GPU if any, and the Python, torch and pyzmq versions, in one line."""
    import torch
    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    try:
        import psutil
        parts.append(f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        parts.append(f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")
    try:
        import zmq
        zmq_v = f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"
    except ImportError:
        zmq_v = "pyzmq absent"
    return (f"machine: {'; '.join(parts)}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{zmq_v}; {platform.platform()}")


def load_line() -> str:
    """The load average: other work on the machine skews every figure here."""
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"
