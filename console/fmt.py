"""Short, fixed-width renderings of the daemon's numbers, shared by every panel."""

from djinnd import format_size, parse_ts


def size(n) -> str:
    """Binary units, as `djinn status` prints them."""
    return "–" if n is None else format_size(n)


def size_short(n) -> str:
    """At most 6 cells: 520K, 1.2M, 3.4G (binary)."""
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.0f}T"


def ms(v) -> str:
    return "–" if v is None else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def clock(ts) -> str:
    """An event's `ts` as HH:MM:SS.mmm (UTC, as the daemon stamps it)."""
    t = parse_ts(ts)
    return t.strftime("%H:%M:%S.%f")[:-3] if t else "--:--:--.---"


def duration(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def session_state(s: dict) -> str:
    """running / paused@L / idle."""
    state = s.get("state") or "?"
    return f"paused@{s.get('layer')}" if state == "paused" and s.get("layer") is not None else state


def session_bytes(s: dict) -> int:
    return s.get("device_bytes") or s.get("host_bytes") or s.get("disk_bytes") or 0
