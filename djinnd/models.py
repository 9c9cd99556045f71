"""Model loading for djinnd: one causal LM, shared by every session on the device.

Three kinds of model:

* ``tiny-llama``: a small Llama with a BPE tokenizer, built from a fixed seed
  the first time it is asked for and saved under ``cache_dir()``. After that it
  loads like any other checkpoint, so tests and demos use the same code path as
  real checkpoints, with nothing downloaded.
* ``llama-2-7b`` / ``llama-2-13b``: Llama-2 sizes with random weights, built
  straight on the device. They are for memory and speed tests, where only the
  shapes matter.
* A local checkpoint folder, or a model already in the Hugging Face cache
  (``local_files_only``: the daemon never downloads).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .charges import GRANULE, GROWTH, HELD_PER_TOKEN

# transformers is imported inside the functions that use it: it takes ~2 s,
# and the CLI reads PRESETS, cache_dir() and parse_dtype() without it.

TINY = "tiny-llama"
# Bump the suffix whenever the tiny config, seed, corpus or tokenizer recipe
# changes, so that old caches are not reused for a different model.
TINY_FOLDER = "tiny-llama-v2"
TINY_SEED = 0
PRESET_SEED = 0
CORPUS = pathlib.Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as in Llama

PRESETS: dict[str, dict] = {
    TINY: dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.1,  # wide enough that greedy tokens vary: equality checks then mean something
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready for inference plus the sizes the memory planner needs."""

    name: str
    path: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weights_bytes: int
    kv_bytes_per_token: int
    cache_kwarg: str = "past_key_values"  # "cache" where transformers has renamed it

    @property
    def activation_bytes_per_token(self) -> int:
        """What a paused forward holds per token beside its KV (charges.HELD_PER_TOKEN hidden vectors)."""
        return HELD_PER_TOKEN * self.hidden_size * self.dtype.itemsize

    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """The last position's logits of one forward over ``ids`` [1, n] that extends the KV ``cache``."""
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
        return out.logits[0, -1]

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The decoder layers, where sessions hang their pause/inspect hooks."""
        return self.model.model.layers

    def lens_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model's own final norm and output head make of a decoder layer's output."""
        return self.model.get_output_embeddings()(self.model.model.norm(hidden))

    def embed(self) -> torch.nn.Module:
        """The input embedding module."""
        return self.model.get_input_embeddings()

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
            "num_layers": self.num_layers,
            "weights_bytes": self.weights_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "hidden_size": self.hidden_size,
            # the charging rules (djinnd/charges.py), so that clients' capacity math is the daemon's
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "kv_granule_tokens": GRANULE, "slab_growth": GROWTH,
        }


# --------------------------------------------------------------------------- helpers


def cache_dir() -> pathlib.Path:
    """Where built models live: $DJINN_CACHE, $XDG_CACHE_HOME/djinn or ~/.cache/djinn."""
    if os.environ.get("DJINN_CACHE"):
        return pathlib.Path(os.environ["DJINN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "djinn"
    return pathlib.Path.home() / ".cache" / "djinn"


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


@contextlib.contextmanager
def _quiet():
    """Hide transformers' load/save progress bars: they would litter the daemon's log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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


def _wrap(name: str, path: str, model, tokenizer, device: torch.device) -> LoadedModel:
    """Freeze ``model`` for inference and work out its sizes."""
    model.eval()
    model.requires_grad_(False)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = cfg.num_hidden_layers
    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        num_layers=layers,
        hidden_size=cfg.hidden_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        weights_bytes=_tensor_bytes(model),
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype.itemsize,
        # the old name still works there, through a wrapper that warns on every call (~12 us a step)
        cache_kwarg="cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values",
    )


# --------------------------------------------------------------------------- building


def estimate_weights_bytes(config_kwargs: dict, dtype: torch.dtype) -> int:
    """Weight bytes of a Llama with this config, found on the meta device (no memory used)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config_kwargs))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def build_preset(config_kwargs: dict, device: torch.device | str, dtype: torch.dtype, seed: int = PRESET_SEED):
    """A randomly initialised LlamaForCausalLM made directly on ``device`` in ``dtype``.

    The tensors are created on the device in the target dtype, so a 13B model
    never has an fp32 or host copy. Weights come from ``seed`` (the global RNG
    is left as it was). Raises ValueError, before allocating, when the
    weights would not fit in the free memory of ``device``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    need, free = estimate_weights_bytes(config_kwargs, dtype), _free_bytes(device)
    if need > free:
        raise ValueError(
            f"model needs {need / 2**30:.1f} GiB of weights but {device} has {free / 2**30:.1f} GiB free"
        )
    config = LlamaConfig(**config_kwargs)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def _train_tokenizer():
    """Byte-level BPE with 512 tokens, trained on the packaged corpus (deterministic).

    Returns a ``PreTrainedTokenizerFast`` (in transformers 5 an alias of
    ``TokenizersBackend``, the class name its tokenizer_config.json records).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=PRESETS[TINY]["vocab_size"],
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=PRESETS[TINY]["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def ensure_tiny_llama() -> pathlib.Path:
    """The tiny-llama checkpoint folder, built and saved on first use.

    Built on the CPU in fp32 from a fixed seed, so every build is bit-identical
    whatever device it will later run on. Several processes may build at once:
    each writes a private temp folder and renames it into place; the first
    rename wins and the others throw their copy away.
    """
    final = cache_dir() / "models" / TINY_FOLDER
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{TINY_FOLDER}.tmp-", dir=final.parent))
    try:
        model = build_preset(PRESETS[TINY], "cpu", torch.float32, seed=TINY_SEED)
        with _quiet():
            model.save_pretrained(tmp)
            _train_tokenizer().save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- loading


def _load_checkpoint(source: str, device: torch.device, dtype: torch.dtype):
    """from_pretrained for model and tokenizer, never touching the network.

    The model is read on the host then moved: transformers 5 wants the
    ``accelerate`` package for ``device_map`` (or even a ``torch.device``
    context) and djinnd does not depend on it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a checkpoint without tokenizer files: fall back to bytes
    return model, tokenizer


def load_model(name_or_path: str = TINY, device: str | torch.device = "auto", dtype=None) -> LoadedModel:
    """Load a preset, a local checkpoint folder, or a model in the HF cache.

    ``dtype`` (a torch dtype or fp32/fp16/bf16) defaults to ``default_dtype(device)``.
    Raises ValueError with a one-line message for unknown names and bad devices.
    """
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    name = str(name_or_path)

    if name == TINY:
        folder = ensure_tiny_llama()
        model, tokenizer = _load_checkpoint(str(folder), device, dtype)
        return _wrap(name, str(folder), model, tokenizer, device)
    if name in PRESETS:
        return _wrap(name, "", build_preset(PRESETS[name], device, dtype), None, device)
    if (pathlib.Path(name).expanduser() / "config.json").is_file():
        folder = str(pathlib.Path(name).expanduser())
        model, tokenizer = _load_checkpoint(folder, device, dtype)
        return _wrap(name, folder, model, tokenizer, device)
    try:  # a hub id that is already in the local Hugging Face cache
        model, tokenizer = _load_checkpoint(name, device, dtype)
    except (OSError, ValueError) as e:
        known = ", ".join(PRESETS)
        raise ValueError(f"unknown model {name!r} (known: {known}, or a local checkpoint path)") from e
    return _wrap(name, "", model, tokenizer, device)
