"""What the runtime needs of a loaded causal LM, found on the model itself rather than from one family's names.

Parts: the decoder layers (the ModuleList of the model's own no-split block class), the input embeddings,
the output head and the final norm. KV layout: a probe forward with transformers' own DynamicCache shows
what each layer keeps. A model the runtime would serve wrongly (a cache that is not one key/value pair
of one shape per layer, or a model that is not causal) is refused here, with one line saying why.
"""

import inspect
from dataclasses import dataclass

import torch


class Unsupported(ValueError):
    """This model cannot be served correctly; the message names its family and why."""


@dataclass(frozen=True)
class Anatomy:
    layers: torch.nn.ModuleList
    embed: torch.nn.Module
    head: torch.nn.Module
    norm: torch.nn.Module | None
    hidden_size: int
    kv_heads: int
    head_dim: int
    kv_dtype: torch.dtype
    softcap: float | None  # Gemma-2 style final logit soft-capping, applied by the lens as by the model
    scale: float  # a final logit scale (Cohere's logit_scale, Granite's 1 / logits_scaling), else 1
    lens_error: str | None  # why head(norm(h)) does not reproduce the model's logits, if it does not
    cache_kwarg: str  # "cache" where transformers has renamed past_key_values
    keeps_logits: bool  # the forward takes logits_to_keep

    def lens_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model's own final norm and output head make of a decoder layer's output."""
        logits = self.head(self.norm(hidden) if self.norm is not None else hidden) * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def family(model) -> str:
    return getattr(model.config, "model_type", None) or type(model).__name__


def find(model) -> Anatomy:
    """The parts and KV layout of `model` (eval mode, on its device); Unsupported if it cannot be served."""
    name = family(model)

    def refuse(why: str):
        raise Unsupported(f"cannot serve model family {name!r}: {why}")

    candidates = _decoder_layer_lists(model) or refuse(
        "no ModuleList of its declared decoder block class (_no_split_modules) with one entry per layer")
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    if cache_kwarg not in params:
        refuse("its forward takes no key/value cache")
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % vocab
    seen = [[] for _ in candidates]  # each list's last layer's outputs: the decoder's are the ones that run
    hooks = [c[-1].register_forward_hook(lambda m, a, out, got=got: got.append(out[0] if isinstance(out, tuple) else out))
             for c, got in zip(candidates, seen)]
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, use_cache=True, **{cache_kwarg: cache})
            prefix = model(input_ids=ids[:, :2]).logits
    except Exception as e:  # noqa: BLE001 - whatever stops the probe stops the model from being served
        refuse(f"a probe forward with a DynamicCache failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    finally:
        for h in hooks:
            h.remove()
    ran = [(c, got[0]) for c, got in zip(candidates, seen) if got and got[0].shape[-2] == ids.shape[1]]
    if not ran:
        refuse("none of its decoder block lists ran over the probe's tokens")
    layers, hidden = ran[0]  # the probe's output after the last decoder layer, not the prefix's
    if hidden.dim() != 3 or hidden.shape[0] != 1:  # breakpoints read and patch [1, tokens, hidden]
        refuse(f"its decoder layers output {list(hidden.shape)}, not [1, tokens, hidden] (e.g. AltUp streams)")
    logits = out.logits[0]
    if not torch.allclose(prefix[0].float(), logits[:2].float(), **_tolerance(logits)):
        refuse("it is not causal: a position's logits depend on the tokens after it")
    kv = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if len(cache.layers) != len(layers) or len(kv) != len(layers) or not all(isinstance(x, DynamicLayer) for x in kv):
        kinds = sorted({type(x).__name__ for x in cache.layers})
        refuse(f"its cache ({', '.join(kinds) or 'none'}) is not one key/value pair per decoder layer")
    # a sliding-window layer keeps fewer tokens than it was given; the slab keeps them all and the model's
    # own mask hides those outside the window, so only heads, head size and dtype must agree
    shapes = {(x.keys.shape[:2] + x.keys.shape[3:], x.values.shape[:2] + x.values.shape[3:], x.keys.dtype) for x in kv}
    if len(shapes) != 1:
        refuse("its layers keep keys and values of different shapes")
    k_shape, v_shape, kv_dtype = shapes.pop()
    full = [x for x in kv if not getattr(x, "is_sliding", False)]
    if k_shape != v_shape:
        refuse(f"its keys and values differ in shape ({list(kv[0].keys.shape)} and {list(kv[0].values.shape)})")
    if k_shape[0] != 1 or any(x.keys.shape[2] != ids.shape[1] for x in full):
        refuse(f"its keys {list(kv[0].keys.shape)} are not [1, heads, tokens, head_dim]")
    config = model.config.get_text_config()
    parts = dict(layers=layers, embed=model.get_input_embeddings(), head=model.get_output_embeddings(), norm=None,
                 hidden_size=hidden.shape[-1], kv_heads=k_shape[1], head_dim=k_shape[2], kv_dtype=kv_dtype,
                 softcap=getattr(config, "final_logit_softcapping", None),
                 scale=getattr(config, "logit_scale", None) or 1 / (getattr(config, "logits_scaling", None) or 1),
                 cache_kwarg=cache_kwarg, keeps_logits="logits_to_keep" in params)
    for norm in _final_norms(model, layers):  # the one that gives the model's own logits
        anatomy = Anatomy(**{**parts, "norm": norm}, lens_error=None)
        try:
            with torch.inference_mode():
                if torch.allclose(anatomy.lens_logits(hidden[0]).float(), logits.float(), **_tolerance(logits)):
                    return anatomy
        except Exception:  # noqa: BLE001, S112 - not this one: try the next
            continue
    why = f"no logit lens for model family {name!r}: no final norm and output head of it reproduce its logits"
    return Anatomy(**{**parts, "norm": None}, lens_error=why)


def _tolerance(logits: torch.Tensor) -> dict:
    tol = 1e-4 if logits.dtype == torch.float32 else 3e-2
    return {"rtol": tol, "atol": tol * max(logits.abs().max().item(), 1.0)}


def _decoder_layer_lists(model) -> list[torch.nn.ModuleList]:
    """ModuleLists of the model's no-split block class, one entry per text layer (a multimodal model's
    vision tower may hold another such list: the probe tells which runs)."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    return [m for m in model.base_model.modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) and len(m) == (count or len(m))
            and all(type(x).__name__ in blocks for x in m)]


def _final_norms(model, layers) -> list[torch.nn.Module | None]:
    """Final-norm candidates, likeliest first: the base model's norms outside the decoder layers, last first
    (`norm`, `ln_f`, `final_layer_norm`, ...), then none."""
    inside = {id(m) for m in layers.modules()}
    norms = [m for m in model.base_model.modules() if id(m) not in inside and "norm" in type(m).__name__.lower()]
    return [*reversed(norms), None]
