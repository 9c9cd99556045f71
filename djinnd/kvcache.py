"""A session's KV cache in one device allocation, so that a swap is one contiguous copy.

The slab has shape [layers, 2, 1, kv_heads, capacity, head_dim]; each layer's keys and values
are views of it, which transformers' attention reads like any DynamicLayer's tensors. Freeing the
slab's storage in place (resize to 0) and restoring it keeps every view valid, which is what lets a
session paused mid-forward be swapped out and back.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .charges import capacity_for


class SlabLayer(DynamicLayer):
    """One decoder layer's view of the session slab."""

    def __init__(self, owner: "SlabCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.length = 0
        self.k = self.v = None  # [1, kv_heads, capacity, head_dim] views of the slab, made once per slab
        self.is_initialized = True
        self.dtype, self.device = owner.dtype, owner.device

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        # narrow() on views made once: indexing the slab afresh cost a tiny-llama decode step ~4% on the CPU
        n, t = self.length, key_states.shape[-2]
        if self.k is None or n + t > self.owner.capacity:
            raise RuntimeError(f"KV slab too small: {n + t} tokens > capacity {self.owner.capacity}")
        self.k.narrow(2, n, t).copy_(key_states)
        self.v.narrow(2, n, t).copy_(value_states)
        self.length = n + t
        self.keys, self.values = self.k.narrow(2, 0, n + t), self.v.narrow(2, 0, n + t)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self):
        self.length = 0
        self.keys = self.values = None


class SlabCache:
    """The KV cache of one session: a transformers Cache whose layers live in one slab."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.slab: torch.Tensor | None = None
        self.capacity = 0
        self.layers = [SlabLayer(self, i) for i in range(num_layers)]
        self.cache = Cache(layers=self.layers)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_for(self, capacity: int) -> int:
        return capacity * self.bytes_per_token

    @property
    def nbytes(self) -> int:
        return self.bytes_for(self.capacity)

    @property
    def seq_len(self) -> int:
        return self.layers[0].length

    def capacity_for(self, tokens: int) -> int:
        """Capacity to hold `tokens` (charges.capacity_for: the current one if it fits, else more)."""
        return capacity_for(self.capacity, tokens)

    def grow(self, capacity: int, fill=torch.zeros) -> None:
        """Move to a larger slab (the caller has reserved its bytes), keeping the tokens held so far."""
        new = fill((self.num_layers, 2, 1, self.kv_heads, capacity, self.head_dim), dtype=self.dtype, device=self.device)
        if self.slab is not None:
            n = max(layer.length for layer in self.layers)
            new[..., :n, :].copy_(self.slab[..., :n, :])
        for i, layer in enumerate(self.layers):  # views of the old slab would keep it alive
            layer.keys = layer.values = None
            layer.k, layer.v = new[i, 0], new[i, 1]
        self.slab, self.capacity = new, capacity

    def shell(self, capacity: int, length: int) -> None:
        """A slab of `capacity` holding `length` tokens, swapped out: its views are made and its memory
        freed at once (the swap-in brings its bytes, as for any swapped-out session)."""
        self.grow(capacity, fill=torch.empty)
        self.slab.untyped_storage().resize_(0)
        for layer in self.layers:
            layer.length = length

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.slab is None else [self.slab]

    def release(self) -> None:
        for layer in self.layers:
            layer.keys = layer.values = layer.k = layer.v = None
        self.slab, self.capacity = None, 0
