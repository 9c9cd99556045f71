"""The one percentile djinn reports everywhere (swap latency, scenario figures, benchmarks)."""


def percentile(values, p: float) -> float | None:
    """The p-th percentile of `values` by nearest rank (no interpolation), rounded to 3 places; None when empty."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))], 3)
