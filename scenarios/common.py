"""Helpers the scenarios share: prompts, breakpoints, the capacity math.

The capacity math is the daemon's own charging rules (`djinnd.estimate` over the figures `status`
publishes), so that "must it swap, and from which session on" is computed, not guessed; exp3
checks it against the bytes the daemon really charged.
"""

import random
import statistics

from djinnd import estimate


class Skip(Exception):
    """The scenario cannot run here (bad parameter, no GPU, budget too small): verdict `skipped`, exit 2."""


def prompt_ids(seed: int, index: int, length: int, vocab: int) -> list[int]:
    """Deterministic token ids for session `index`, different per session, clear of the special ids 0-2."""
    rng = random.Random(f"{seed}-{index}")
    return [rng.randrange(3, vocab) for _ in range(length)]


def vocab_of(model: dict) -> int:
    """The vocabulary size from `status`; 256 (valid for every model djinnd loads) when it does not say."""
    return int(model.get("vocab_size") or 256)


def breakpoints(spec, num_layers: int) -> list[int]:
    """`auto` -> layers at 1/4, 1/2 and 3/4 of the depth ([2, 4, 6] of 8, [10, 20, 30] of 40)."""
    if spec == "auto":
        return sorted({max(0, num_layers * k // 4) for k in (1, 2, 3)})
    bad = [x for x in spec if not 0 <= x < num_layers]
    if bad:
        raise Skip(f"breakpoint {bad[0]} is past the last layer: the model has {num_layers} decoder layers"
                   f" (0..{num_layers - 1})")
    return sorted(set(spec))


def capacity_math(model: dict, sessions: int, prompt_len: int, budget: int) -> dict:
    """Weights + N x (KV slab + held activations) against the budget: whether swapping must happen, and when."""
    weights = model["weights_bytes"]
    est = estimate(model, prompt_len)
    kv_tokens, kv, act, per = est["kv_capacity_tokens"], est["kv_bytes"], est["activation_bytes"], est["paused_bytes"]
    demand = weights + sessions * per
    fit = max(0, (budget - weights) // per) if per else sessions
    expected = demand > budget
    return {"weights_bytes": weights, "kv_bytes_per_session": kv, "activation_bytes_per_session": act,
            "bytes_per_session": per, "kv_capacity_tokens": kv_tokens, "sessions": sessions,
            "demand_bytes": demand, "budget_bytes": budget, "expected_swapping": expected,
            "sessions_that_fit": min(fit, sessions),
            "swap_from_session": fit + 1 if expected else None,
            "demand_over_budget": round(demand / budget, 3) if budget else None}


def math_lines(m: dict, fmt) -> list[str]:
    """The capacity math, as printed before a run."""
    lines = [
        f"weights          {fmt(m['weights_bytes'])}",
        f"per session      KV {m['kv_capacity_tokens']} tokens = {fmt(m['kv_bytes_per_session'])}"
        f" + held activations {fmt(m['activation_bytes_per_session'])} = {fmt(m['bytes_per_session'])}",
        f"demand           {fmt(m['weights_bytes'])} + {m['sessions']} x {fmt(m['bytes_per_session'])}"
        f" = {fmt(m['demand_bytes'])}",
        f"budget           {fmt(m['budget_bytes'])}"
        + (f" ({m['demand_over_budget']:.2f}x over)" if m["expected_swapping"] else " (all fit)"),
    ]
    if m["sessions_that_fit"] == 0:
        lines.append("swapping         cannot help: not even one session fits beside the weights")
    elif m["expected_swapping"]:
        lines.append(f"swapping         must happen: {m['sessions_that_fit']} sessions fit beside the weights,"
                     f" swapping starts at session {m['swap_from_session']}")
    else:
        lines.append("swapping         not needed: every session fits")
    return lines


def median(values):
    return statistics.median(values) if values else None
