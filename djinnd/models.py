"""Model loading for djinnd: one causal LM, shared by every session on the device.

What it can load: a preset (djinnd/presets.py: tiny models of several families, SmolLM2-135M, random
Llama-2 sizes), a local checkpoint folder, a ``.gguf`` file, or a model already in the Hugging Face cache
(``local_files_only``: the daemon never downloads). Whatever the family, the runtime finds the parts it
needs on the loaded model (djinnd/anatomy.py), and refuses at load a model it would serve wrongly.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass

import torch

from . import anatomy, checkpoints, presets, rows
from .charges import GRANULE, GROWTH, HELD_PER_TOKEN, held_bytes

log = logging.getLogger("djinnd.models")

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready for inference, the parts of it the runtime uses, and the sizes the memory planner needs."""

    name: str
    path: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    parts: anatomy.Anatomy
    weights_bytes: int
    load_seconds: float = 0.0
    batch_error: str | None = None  # why decode steps of several sessions cannot share a forward (rows.probe)
    # what a paused forward holds beyond its KV and the HELD_PER_TOKEN hidden vectors, measured at load
    # (held_probe): bytes per token (rotary cos/sin, ids, position embeddings) and per (query, key) pair
    # of the forward (attention masks: [1, 1, T, past + T] each)
    extra_bytes_per_token: int = 0
    mask_bytes_per_token_pair: int = 0

    @property
    def family(self) -> str:
        return anatomy.family(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def hidden_size(self) -> int:
        return self.parts.hidden_size

    @property
    def num_kv_heads(self) -> int:
        return self.parts.kv_heads

    @property
    def head_dim(self) -> int:
        return self.parts.head_dim

    @property
    def vocab_size(self) -> int:
        return self.parts.embed.num_embeddings

    @property
    def context_length(self) -> int | None:
        """The most tokens a session may hold: the positions the model was built for (None: not stated)."""
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            n = getattr(self.model.config, name, None)
            if isinstance(n, int) and n > 0:
                return n
        return None

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer, as the probe forward at load found them."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.parts.kv_dtype.itemsize

    @property
    def activation_bytes_per_token(self) -> int:
        """What a paused forward holds per token beside its KV: charges.HELD_PER_TOKEN hidden vectors
        (embeddings, layer input, output) and what the load's probe found beside them (rotary tables,
        token and position ids, a position embedding)."""
        return HELD_PER_TOKEN * self.hidden_size * self.dtype.itemsize + self.extra_bytes_per_token

    def held_bytes(self, tokens: int, past: int = 0) -> int:
        """What a forward over `tokens` new tokens, after `past` in its KV, holds at a pause beside its KV."""
        return held_bytes(tokens, self.activation_bytes_per_token, self.mask_bytes_per_token_pair, past)

    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """The last position's logits of one forward over ``ids`` [1, n] that extends the KV ``cache``."""
        keep = {"logits_to_keep": 1} if self.parts.keeps_logits else {}
        out = self.model(input_ids=ids, use_cache=True, **keep, **{self.parts.cache_kwarg: cache})
        return out.logits[0, -1]

    def forward_rows(self, tokens: list[int], caches) -> torch.Tensor:
        """Logits [B, vocab] of one batched decode step: row b feeds tokens[b] to the session of caches[b]."""
        return rows.forward(self, tokens, caches)

    def compare_batched(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, float]:
        """Each prompt's n greedy tokens decoded alone, the largest logit difference of the same steps
        batched, and the logits' scale (rows.compare: the load probe's check, at any size)."""
        return rows.compare(self, prompts, n)

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The decoder layers, where sessions hang their pause/inspect hooks."""
        return self.parts.layers

    def lens_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model's own final norm and output head make of a decoder layer's output."""
        return self.parts.lens_logits(hidden)

    def embed(self) -> torch.nn.Module:
        """The input embedding module."""
        return self.parts.embed

    def new_cache(self):
        """An empty KV slab cache of this model's layout."""
        from .kvcache import SlabCache

        return SlabCache(self.num_layers, self.num_kv_heads, self.head_dim, self.parts.kv_dtype, self.device)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids for ``text``; with no tokenizer, UTF-8 bytes mod vocab.

        No special tokens are added unless ``bos`` is set, so that the
        callers decide how prompts start.
        """
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            bos_id = self.tokenizer.bos_token_id
        else:
            ids = [b % self.vocab_size for b in text.encode("utf-8")]
            bos_id = None
        if bos and bos_id is not None:
            ids = [bos_id] + ids
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        """Text for ``ids`` (the inverse of ``encode``, special tokens dropped)."""
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        """The JSON-friendly summary that ``status`` reports."""
        return {
            "name": self.name,
            "path": self.path,
            "family": self.family,
            "num_layers": self.num_layers,
            "weights_bytes": self.weights_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "vocab_size": self.vocab_size,
            "context_length": self.context_length,
            "dtype": str(self.dtype).removeprefix("torch."),
            "hidden_size": self.hidden_size,
            "load_seconds": round(self.load_seconds, 2),
            "lens": self.parts.lens_error is None,
            "batching": self.batch_error is None,
            # the charging rules (djinnd/charges.py), so that clients' capacity math is the daemon's
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "mask_bytes_per_token_pair": self.mask_bytes_per_token_pair,
            "kv_granule_tokens": GRANULE, "slab_growth": GROWTH,
        }


# --------------------------------------------------------------------------- helpers


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` -> cuda:0 when there is a GPU, else cpu; ``cpu``; ``cuda[:N]``."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise ValueError(f"bad device {spec!r} (use auto, cpu or cuda:N)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but CUDA is not available here")
        if int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device(f"cuda:{int(index)}")
    raise ValueError(f"bad device {spec!r} (use auto, cpu or cuda:N)")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU (half precision is slow there); bf16 on GPUs that have it, else fp16."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def parse_dtype(s: str | torch.dtype | None) -> torch.dtype | None:
    """``fp32``/``fp16``/``bf16`` (and their long names) -> torch dtype; None stays None."""
    if s is None or isinstance(s, torch.dtype):
        return s
    key = s.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"bad dtype {s!r} (use fp32, fp16 or bf16)")
    return _DTYPES[key]


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers; tied weights are counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _free_bytes(device: torch.device) -> int:
    """Memory free for new weights on ``device`` (MemAvailable for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _wrap(name: str, path: str, model, tokenizer, device: torch.device, t0: float) -> LoadedModel:
    """Freeze ``model`` for inference on ``device`` and find its parts (anatomy.Unsupported if it cannot be served)."""
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    lm = LoadedModel(name=name, path=path, model=model, tokenizer=tokenizer, device=device,
                     dtype=next(model.parameters()).dtype, parts=anatomy.find(model), weights_bytes=_tensor_bytes(model))
    lm.batch_error = rows.probe(lm)
    lm.extra_bytes_per_token, lm.mask_bytes_per_token_pair = held_probe(lm)
    lm.load_seconds = time.monotonic() - t0
    return lm


def load_model(name_or_path: str = presets.TINY, device: str | torch.device = "auto", dtype=None) -> LoadedModel:
    """Load a preset, a local checkpoint folder, a ``.gguf`` file, or a model in the HF cache.

    ``dtype`` (a torch dtype or fp32/fp16/bf16) defaults to ``default_dtype(device)``. Raises ValueError
    with a one-line message for unknown names, unreadable files, bad devices and unsupported families.
    """
    t0 = time.monotonic()
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    name = str(name_or_path)
    path = pathlib.Path(name).expanduser()

    if name in presets.PRESETS:
        model = presets.build_preset(presets.PRESETS[name], device, dtype, _free_bytes(device))
        return _wrap(name, "", model, None, device, t0)
    if name in presets.TINY_MODELS or name == presets.SMOLLM2:
        folder = presets.ensure_smollm2() if name == presets.SMOLLM2 else presets.ensure_tiny(name)
        return _wrap(name, str(folder), *checkpoints.load(folder, dtype), device, t0)
    if path.suffix.lower() == ".gguf":
        return _wrap(name, str(path), *checkpoints.load_gguf(path, dtype), device, t0)
    if (path / "config.json").is_file():
        return _wrap(name, str(path), *checkpoints.load(path, dtype), device, t0)
    if name.startswith(("/", ".", "~")):  # a path, not a hub id
        raise ValueError(f"no checkpoint at {name!r}: " + ("no such file or folder" if not path.exists()
                                                           else "a checkpoint folder holds a config.json"))
    try:  # a hub id that is already in the local Hugging Face cache
        model, tokenizer = checkpoints.load(name, dtype)
    except (OSError, ValueError) as e:
        if str(e).startswith("cannot serve"):
            raise
        known = ", ".join(presets.NAMES)
        raise ValueError(f"unknown model {name!r} (known: {known}, a checkpoint folder or a .gguf file)") from e
    return _wrap(name, "", model, tokenizer, device, t0)


# --------------------------------------------------------------------------- what a paused forward holds

PROBE_SHAPES = ((16, 0), (32, 0), (48, 0), (32, 16))  # (new tokens, tokens already in the KV)


def held_probe(lm: LoadedModel) -> tuple[int, int]:
    """Bytes per token and per (query, key) pair that a forward paused after a decoder layer holds
    beyond its KV and the HELD_PER_TOKEN hidden vectors the books already charge.

    Measured, since it depends on the family and its attention: a hook on the first and the last
    decoder layer walks the Python frames of the forward (the runtime pauses in such a hook, so these
    frames are what a paused forward keeps alive) and adds up the storages of every tensor they hold
    that is not a weight, not the KV slab and not one of the three charged vectors. Found on
    transformers 5.24: the rotary cos/sin ([1, T, head_dim] each), the input and position ids
    (int64), GPT-2's position embeddings ([1, T, hidden]); an eager family's float masks
    ([1, 1, T, past + T], Gemma-2 two: full and sliding); SDPA's boolean mask, which it skips for a
    causal prefill with an empty KV but builds when the forward extends one (or a sliding window
    cuts in). The fit takes the larger mask figure of the two cases, so charges stay conservative,
    and is checked to cover every probe."""
    try:
        seen = {shape: _held_extra(lm, *shape) for shape in PROBE_SHAPES}
    except Exception as e:  # noqa: BLE001 - never fatal: a conservative rule stands in
        log.warning("held-activation probe failed (%s: %s); charging a conservative estimate", type(e).__name__, e)
        item = lm.dtype.itemsize
        return 2 * lm.head_dim * item + 16 + lm.hidden_size * item, 2 * item
    (t1, _), (t2, _), (t3, _), (tp, past) = PROBE_SHAPES
    y1, y2, y3, yp = (seen[s] for s in PROBE_SHAPES)
    s12, s23 = (y2 - y1) / (t2 - t1), (y3 - y2) / (t3 - t2)
    c0 = max(0.0, (s23 - s12) / (t3 - t1))  # a prefill's mask: quadratic in its tokens
    per_token = max(0.0, s23 - c0 * (t2 + t3))
    c1 = max(0.0, (yp - per_token * tp) / (tp * (past + tp)))  # a mask when the forward extends a KV
    per_token, mask = math.ceil(per_token), math.ceil(max(c0, c1))
    for (t, p), y in seen.items():  # a constant term, or a mask on one side only: cover every probe
        short = y - held_bytes(t, per_token, mask, p)
        if short > 0:
            per_token += -(-short // t)
    return per_token, mask


def _held_extra(lm: LoadedModel, tokens: int, past: int) -> int:
    """The extra bytes (see held_probe) of one forward of `tokens` after `past`, the most of two layers."""
    cache = lm.new_cache()
    cache.grow(cache.capacity_for(past + tokens))
    found: dict[int, int] = {}
    embeds: list = []
    here = sys._getframe()

    def on_embed(module, args, output):
        embeds.append(output)

    def on_layer(index, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        layer_input = args[0] if args else kwargs.get("hidden_states")
        charged = [t for t in (hidden, layer_input, *embeds[-1:]) if isinstance(t, torch.Tensor)]
        skip = {_storage_key(t) for t in charged} | {_storage_key(cache.slab)}
        skip |= {_storage_key(t) for t in (*lm.model.parameters(), *lm.model.buffers())}
        total, counted = 0, set()
        f = sys._getframe(1)
        while f is not None and f is not here:
            for value in list(f.f_locals.values()):
                for t in _tensors(value, 3):
                    key = _storage_key(t)
                    if key not in skip and key not in counted:
                        counted.add(key)
                        total += t.untyped_storage().nbytes()
            f = f.f_back
        found[index] = total

    ids = torch.arange(3, 3 + past + tokens, device=lm.device).remainder(lm.vocab_size).unsqueeze(0)
    layers = lm.decoder_layers()
    with torch.inference_mode():
        if past:
            lm.forward(ids[:, :past], cache.cache)
        hooks = [lm.embed().register_forward_hook(on_embed)]
        try:
            for i in sorted({0, len(layers) - 1}):
                hooks.append(layers[i].register_forward_hook(lambda *a, i=i, **k: on_layer(i, *a, **k), with_kwargs=True))
            lm.forward(ids[:, past:].clone(), cache.cache)  # its own storage, as the runtime's ids have
        finally:
            for h in hooks:
                h.remove()
    if not found:
        raise RuntimeError("the layer hooks did not run")
    return max(found.values())


def _storage_key(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return (st.device.type, st.device.index, st.data_ptr())


def _tensors(value, depth: int):
    """The tensors in a frame's local: itself, or inside containers and model outputs `depth` deep
    (modules are skipped: their tensors are the weights)."""
    if isinstance(value, torch.Tensor):
        if value.untyped_storage().nbytes():
            yield value
    elif depth and isinstance(value, dict):
        for v in list(value.values()):
            yield from _tensors(v, depth - 1)
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth - 1)
