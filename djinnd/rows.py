"""One decode step of many sessions in one forward, each row attending to its own KV slab.

A decode step reads every weight once whatever the number of rows, so the steps that wait for the
device at the same moment share a forward (scheduler.DeviceLock.join picks them). Their keys and
values stay in each session's slab: the batch's cache writes row b's new key and value into
session b's slab and hands the attention function per-row views of the slabs (no gather), and
the function registered below attends each row to its own (a sliding-window layer sees its last W
keys, as the model's mask shows them to an unbatched step). On the CPU in float32 one call of the
compiled kernel (djinnd/csrc/rows_attention.cpp) does every row; elsewhere, or where it was not
built, one SDPA call a row. Any other forward goes to the model's own attention function unchanged.

`probe` checks at load that a model's batched step equals its unbatched one; a family whose
attention does not go through transformers' AttentionInterface is served one row at a time.
"""

import inspect

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

try:
    from djinnd._rows_attention import rows_attention as _kernel
except ImportError:  # not built (no compiler at install): one SDPA call a row
    _kernel = None


class _Rows:
    """What a batch's cache layer returns instead of keys and values: the rows' slab views."""

    __slots__ = ("kv", "layer")

    def __init__(self, kv, layer: int):
        self.kv, self.layer = kv, layer


class _RowsLayer(DynamicLayer):
    def __init__(self, batch: "RowsBatch", index: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """Write each row's new key and value [B, kv_heads, 1, head_dim] into its own slab."""
        i = self.index
        new = torch.stack((key_states, value_states), 1).squeeze(3)  # [B, 2, kv_heads, head_dim]
        torch._foreach_copy_([slot[i] for slot in self.batch.slots], list(new.unbind(0)))
        rows = _Rows(self.batch.kv, i)
        return rows, rows

    def get_seq_length(self) -> int:
        return 0  # the masks the model builds are [B, 1, 1, 1]: row attention needs none


class RowsBatch:
    """The cache of one batched decode step over sessions' SlabCaches, each with room for one more token.

    Views are made once a step per row (the slot the new token goes to, and the slab up to it for
    every layer), not once per row and layer: a tiny model's step is mostly such small calls."""

    def __init__(self, caches):
        self.caches = caches
        self.slots = [c.slab[:, :, 0, :, c.seq_len, :].unbind(0) for c in caches]  # per layer [2, kv_heads, head_dim]
        self.kv = [c.slab[..., :c.seq_len + 1, :].flatten(0, 1).unbind(0) for c in caches]  # keys, values of each layer
        self.cache = Cache(layers=[_RowsLayer(self, i) for i in range(caches[0].num_layers)])

    def commit(self) -> None:
        """The step succeeded: every row's slab holds one more token."""
        for c in self.caches:
            n = c.seq_len + 1
            for layer in c.layers:
                layer.length = n


def _attend_rows(query, rows: _Rows, scaling, sliding_window, base, module, kwargs):
    """Each row's query [1, heads, 1, head_dim] against its own slab: SDPA with the query heads that
    share a key/value head packed as rows of one call (exact for a single query token)."""
    B, H, _, D = query.shape
    i = 2 * rows.layer
    kvh = rows.kv[0][i].shape[1]
    exact = base is not sdpa_attention_forward or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if not exact and _kernel is not None and query.device.type == "cpu" and query.dtype == torch.float32:
        scale = D ** -0.5 if scaling is None else scaling
        return _kernel(query, [kv[i] for kv in rows.kv], [kv[i + 1] for kv in rows.kv], scale, sliding_window or 0), None
    outs = []
    for b, (q, kv) in enumerate(zip(query.reshape(B, kvh, H // kvh, D).split(1), rows.kv)):
        k, v = kv[i], kv[i + 1]
        if sliding_window and k.shape[2] > sliding_window:
            k, v = k[:, :, -sliding_window:], v[:, :, -sliding_window:]
        if exact:  # what the model's own function does (soft-capping, sinks, eager maths), a row at a time
            outs.append(base(module, query[b:b + 1], k, v, None, scaling=scaling, **kwargs)[0])
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=scaling))
    if exact:
        return torch.cat(outs), None
    return torch.cat(outs).reshape(B, H, 1, D).transpose(1, 2), None


_eager: dict[type, object] = {}


def _eager_of(module):
    """The eager attention function the module's own code names (each family has its own)."""
    fn = _eager.get(type(module))
    if fn is None:
        fn = inspect.unwrap(type(module).forward).__globals__.get("eager_attention_forward")
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} names no eager_attention_forward beside its forward")
        _eager[type(module)] = fn
    return fn


def _dispatcher(implementation: str):
    def attend(module, query, key, value, *args, **kwargs):
        base = sdpa_attention_forward if implementation == "sdpa" else _eager_of(module)
        if not isinstance(key, _Rows):
            return base(module, query, key, value, *args, **kwargs)  # exactly as called
        window = kwargs.pop("sliding_window", None)  # (the mask, args[0], is the model's [B, 1, 1, 1]: unused)
        return _attend_rows(query, key, kwargs.pop("scaling", None), window, base, module, kwargs)
    return attend


# process-wide: the two implementations the served families use, each delegating all but row batches
AttentionInterface.register("sdpa", _dispatcher("sdpa"))
AttentionInterface.register("eager", _dispatcher("eager"))


def forward(lm, tokens: list[int], caches) -> torch.Tensor:
    """Logits [B, vocab] of one decode step: row b feeds tokens[b] to the session whose cache is caches[b]."""
    batch = RowsBatch(caches)
    dev = lm.device
    ids = torch.tensor(tokens, device=dev).unsqueeze(1)
    positions = torch.tensor([c.seq_len for c in caches], device=dev).unsqueeze(1)
    keep = {"logits_to_keep": 1} if lm.parts.keeps_logits else {}
    out = lm.model(input_ids=ids, position_ids=positions, use_cache=True, **keep, **{lm.parts.cache_kwarg: batch.cache})
    batch.commit()
    return out.logits[:, -1]


def compare(lm, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, float]:
    """Each prompt's n greedy tokens decoded alone (one row a forward, the daemon's unbatched path);
    the largest logit difference of the same decode steps run as batches over other slabs of the
    same prompts (every row fed its alone token: the differences do not compound); and the largest
    logit magnitude, for scale."""

    def prefill(p):
        cache = lm.new_cache()
        cache.grow(cache.capacity_for(len(p) + n))
        return cache, lm.forward(torch.tensor([p], device=lm.device), cache.cache)

    with torch.inference_mode():
        alone, steps = [], []
        for p in prompts:
            cache, logits = prefill(p)
            tokens, seen = [int(logits.argmax())], []
            for _ in range(n - 1):
                logits = lm.forward(torch.tensor([tokens[-1:]], device=lm.device), cache.cache).float()
                seen.append(logits)
                tokens.append(int(logits.argmax()))
            alone.append(tokens)
            steps.append(seen)
        caches = [prefill(p)[0] for p in prompts]
        diff = scale = 0.0
        for i in range(n - 1):
            ref = torch.stack([s[i] for s in steps])
            batched = forward(lm, [t[i] for t in alone], caches).float()
            diff = max(diff, (batched - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return alone, diff, scale


def probe(lm) -> str | None:
    """Why this model cannot decode sessions in one batch, or None when it can: two sessions of
    different lengths, stepped together, must give the logits each gives alone."""
    tolerance = 1e-3 if lm.dtype == torch.float32 else 5e-2
    try:
        _, diff, scale = compare(lm, [[3, 5, 7], [11, 13, 17, 19, 23]], 2)
    except Exception as e:  # noqa: BLE001 - any failure means: one row at a time
        return f"its attention does not take per-session key/value rows ({type(e).__name__}: {e})"
    if not diff <= tolerance * max(1.0, scale):
        return f"a batched step differs from the unbatched one by {diff:.3g} in the logits"
    return None
