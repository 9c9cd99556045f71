"""djinnd's settings in one object: what `djinnd start` checks and hands to the daemon, and what
`djinnd start --print-config` shows."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .scheduler import parse_shares
from .sizes import parse_size


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path
    logs_dir: Path
    device: str = "auto"
    model: str = "tiny-llama"
    vram_budget: int | None = None  # bytes; None: the device's default
    host_pool: int | None = None  # bytes; None: the device's default
    dtype: str | None = None  # None: fp32 on the CPU, bf16 (or fp16) on CUDA
    spill_dir: Path | None = None  # None: beside the socket
    state_dir: Path | None = None  # the session journal's folder; None: beside the socket
    fresh: bool = False  # start with no sessions: the journal is removed
    sample_hz: float = 10.0
    qos: str = "on"  # off: first come, first served
    escalation_ms: float | None = None
    qos_shares: dict | None = None
    max_concurrency: int = 1
    max_batch: int | None = None  # None: the device's default (daemon.default_max_batch)
    prefill_chunk: int = 512
    lifo: bool = False
    metrics_port: int | None = None
    busy_poll_us: float = 1000
    listen: str | None = None  # tcp://HOST:PORT: remote clients with authorized CURVE keys (remote.py)
    authorized_keys: Path | None = None  # None: `authorized_keys` in the keys folder

    @classmethod
    def parse(cls, vram_budget: str | None = None, host_pool: str | None = None, qos_shares: str | None = None,
              **options) -> "DaemonConfig":
        """Options as given on the command line; ValueError with one line naming the option."""
        sizes = {}
        for name, value in (("vram_budget", vram_budget), ("host_pool", host_pool)):
            try:
                sizes[name] = None if value is None else parse_size(value)
            except ValueError as e:
                raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        try:
            shares = None if qos_shares is None else parse_shares(qos_shares)
        except ValueError as e:
            raise ValueError(f"--qos-shares: {e}") from None
        config = cls(qos_shares=shares, **sizes, **options)
        config.check()
        return config

    def check(self) -> None:
        if self.qos not in ("on", "off"):
            raise ValueError("--qos must be on or off")
        if self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.max_batch is not None and not 1 <= self.max_batch <= 1024:
            raise ValueError("--max-batch must be 1-1024")
        if self.prefill_chunk < 1:
            raise ValueError("--prefill-chunk must be at least 1")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError("--metrics-port must be 0-65535")
        if not 0 <= self.busy_poll_us <= 100_000:
            raise ValueError("--busy-poll-us must be 0-100000")
        if self.sample_hz <= 0:
            raise ValueError("--sample-hz must be above 0")
        if self.listen is not None:
            from .remote import check_url
            try:
                check_url(self.listen)
            except ValueError as e:
                raise ValueError(f"--listen: {e}") from None

    def show(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=2)
