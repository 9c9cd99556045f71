"""Reading checkpoints through transformers' own loaders, never touching the network.

A checkpoint folder goes through `from_pretrained`; a `.gguf` file through the same call with `gguf_file`,
which dequantizes it (transformers needs the `gguf` package for that). transformers is imported inside
the functions: it takes ~2 s, and the CLI does not need it.
"""

import contextlib
import functools
import os
import pathlib

import torch


@contextlib.contextmanager
def quiet():
    """Hide transformers' load/save progress bars (and the GGUF reader's plain tqdm one): they would litter
    the daemon's log."""
    from transformers.utils import logging as hf_logging

    was_enabled, was_tqdm = hf_logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if was_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = was_tqdm


def load(source: str | pathlib.Path, dtype: torch.dtype, gguf_file: str | None = None):
    """Model and tokenizer (None when the checkpoint has none) of a folder, hub id in the local cache, or GGUF file.

    Read on the host: transformers 5 wants the ``accelerate`` package for ``device_map``, and the caller
    moves the model. Models load with SDPA attention where the family has it, else its default.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation="sdpa", local_files_only=True, **extra)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                kind = AutoConfig.from_pretrained(source, local_files_only=True, **extra).model_type
                raise ValueError(f"cannot serve model family {kind!r}: transformers has no causal language model "
                                 "class for it (encoder-only and encoder-decoder models are not served)") from None
            if "scaled_dot_product_attention" not in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, **extra)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # a checkpoint without tokenizer files: fall back to bytes
    return model, tokenizer


@contextlib.contextmanager
def gguf_read_once():
    """transformers parses a GGUF file three times in one load (config, tokenizer, weights; ~10 s each
    for SmolLM2's vocabulary on a small CPU) and builds gguf's tensor-name map once per module (~14 s):
    within the load, each is made once."""
    import gguf

    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, names


def load_gguf(file: str | pathlib.Path, dtype: torch.dtype):
    """A GGUF file's model, dequantized, and its tokenizer; ValueError (one line) when it cannot be read."""
    file = pathlib.Path(file).expanduser()
    if not file.is_file():
        raise ValueError(f"no GGUF file at {str(file)!r}")
    try:
        with gguf_read_once():
            return load(file.parent, dtype, gguf_file=file.name)
    except ImportError as e:
        raise ValueError(f"loading {file.name} needs the gguf package ({e})") from e
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file can fail anywhere in the reader
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read GGUF file {str(file)!r}: {type(e).__name__}: {first}") from e


def plain_copy(model):
    """A fresh model of `model`'s config holding its weights: a GGUF-loaded model is marked quantized and
    refuses `save_pretrained`, though its weights are plain tensors once dequantized."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh
