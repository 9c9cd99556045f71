"""djinnd: one model, many sessions, one GPU.

The public face, for code outside the daemon (the console, the scenarios, users' scripts): the
clients, the event log's readers and writers, and the few helpers they share. The rest of the
package is the daemon's own. The model loader (torch) is imported on first use.
"""

__version__ = "0.1.0"

from .charges import estimate  # noqa: E402
from .client import AsyncClient, AsyncSubscription, Client, Subscription  # noqa: E402
from .daemon import default_budget, default_capacity  # noqa: E402
from .export import export as export_events, parse_ts, read_events, tail_lines, write_events  # noqa: E402
from .forkserver import ForkServer  # noqa: E402
from .paths import default_logs_dir, resolve_socket  # noqa: E402
from .private import PrivateDaemon, PrivateDaemonError  # noqa: E402
from .protocol import DjinnError  # noqa: E402
from .remote import is_url  # noqa: E402
from .scheduler import parse_shares  # noqa: E402
from .sizes import format_size, parse_size  # noqa: E402
from .stats import percentile  # noqa: E402
from .telemetry import compact_stamp, utc_stamp  # noqa: E402

__all__ = [
    "AsyncClient", "AsyncSubscription", "Client", "DjinnError", "Subscription", "PrivateDaemon", "PrivateDaemonError",
    "ForkServer",
    "export_events", "parse_ts", "read_events", "tail_lines", "write_events",
    "default_logs_dir", "resolve_socket", "is_url", "format_size", "parse_size", "parse_shares", "compact_stamp", "utc_stamp",
    "load_model", "parse_dtype", "Fleet", "default_budget", "default_capacity", "estimate", "percentile",
]



def __getattr__(name: str):
    """The model loader (it imports torch, ~2 s) and the fleet (Ray, an extra), imported when first asked for."""
    if name in ("load_model", "parse_dtype"):
        from . import models
        return getattr(models, name)
    if name == "Fleet":
        from .fleet import Fleet
        return Fleet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
