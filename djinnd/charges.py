"""What the books charge a session, as rules the daemon uses and publishes (`status.model`).

The runtime charges with these functions, and `estimate` composes them from the figures `status`
reports, so a client's capacity math is the daemon's own, never a copy of it.
"""

GRANULE = 64  # tokens: a KV slab's capacity grows in whole granules
GROWTH = 0.25  # a slab that must grow takes at least a quarter more (amortised growth)
HELD_PER_TOKEN = 3  # hidden-size vectors a paused forward holds per token: embeddings, layer input, output
# Beside them a paused forward holds, per token, the rotary cos/sin tables, its ids and position ids
# (and GPT-2 its position embeddings), and per (query, key) pair the attention masks its family builds
# ([1, 1, T, past + T]: eager families a float one or two, SDPA a boolean one when it cannot skip it).
# The model measures both at load (models.held_probe) and publishes them in `status.model`:
# `activation_bytes_per_token` (the vectors and the per-token part) and `mask_bytes_per_token_pair`.


def round_up(n: int, k: int = GRANULE) -> int:
    return -(-n // k) * k


def capacity_for(capacity: int, tokens: int) -> int:
    """The slab capacity that holds `tokens`: `capacity` if it does, else the prompt and a granule
    (a first slab), else a quarter more."""
    if tokens <= capacity:
        return capacity
    if capacity == 0:
        return round_up(tokens + GRANULE)
    return round_up(max(tokens, capacity + int(capacity * GROWTH)))


def held_bytes(tokens: int, activation_bytes_per_token: int, mask_bytes_per_token_pair: int = 0, past: int = 0) -> int:
    """What a forward over `tokens` new tokens, after `past` tokens already in its KV, holds at a
    pause beside its KV: per token, and per (query, key) pair for its masks."""
    return tokens * activation_bytes_per_token + tokens * (past + tokens) * mask_bytes_per_token_pair


def estimate(model: dict, prompt_len: int, decoded: int = 1) -> dict:
    """A session of `prompt_len` tokens that has decoded `decoded`, as charged: its slab's capacity
    and bytes, and (paused in its prefill) the activations it holds. `model` is `status.model`."""
    cap = capacity_for(0, prompt_len)
    for seq in range(prompt_len + 1, prompt_len + decoded):  # forward n (n >= 2) holds prompt_len + n - 1 tokens
        cap = capacity_for(cap, seq)
    kv = cap * model["kv_bytes_per_token"]
    act = held_bytes(prompt_len, model["activation_bytes_per_token"], model.get("mask_bytes_per_token_pair", 0))
    return {"kv_capacity_tokens": cap, "kv_bytes": kv, "activation_bytes": act, "paused_bytes": kv + act}
