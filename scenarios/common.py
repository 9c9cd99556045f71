"""Helpers the scenarios share: prompts, breakpoints, the capacity math, percentiles.

The capacity math mirrors what the daemon charges a paused session (djinnd/kvcache.py and
runtime._enter), so that "must it swap, and from which session on" is computed, not guessed;
exp3 checks it against the bytes the daemon really charged.
"""

import random
import statistics

GRANULE = 64  # djinnd.kvcache.GRANULE: KV capacity grows in whole granules of tokens
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


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


def _round_up(n: int) -> int:
    return -(-n // GRANULE) * GRANULE


def kv_capacity_tokens(prompt_len: int, decoded: int = 1) -> int:
    """The KV capacity a session of `prompt_len` has after decoding `decoded` tokens, as djinnd's
    SlabCache grows it: the prompt rounded up to 64 plus 64 of headroom, then a quarter more
    (rounded up) whenever a forward needs more."""
    cap = _round_up(prompt_len + GRANULE)
    for seq in range(prompt_len + 1, prompt_len + decoded):  # forward n (n >= 2) holds prompt_len + n - 1 tokens
        if seq > cap:
            cap = _round_up(max(seq, cap + cap // 4))
    return cap


def activation_bytes(model: dict, tokens: int) -> int:
    """What djinnd charges a forward over `tokens` new tokens beside its KV: embeddings, layer input, layer output."""
    return 3 * tokens * model["hidden_size"] * DTYPE_BYTES.get(model.get("dtype"), 4)


def capacity_math(model: dict, sessions: int, prompt_len: int, budget: int) -> dict:
    """Weights + N x (KV slab + held activations) against the budget: whether swapping must happen, and when."""
    weights = model["weights_bytes"]
    kv_tokens = kv_capacity_tokens(prompt_len)
    kv = kv_tokens * model["kv_bytes_per_token"]
    act = activation_bytes(model, prompt_len)
    per = kv + act
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


def pct(values, p: float):
    """The p-th percentile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))], 3)


def median(values):
    return statistics.median(values) if values else None
