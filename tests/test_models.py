"""Tests for djinnd.models: everything on the CPU, nothing downloaded."""

import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from djinnd import models, presets
from djinnd.models import load_model, parse_dtype, resolve_device
from djinnd.paths import cache_dir
from djinnd.presets import PRESETS, TINY_MODELS, build_preset, ensure_tiny, estimate_weights_bytes

TINY_FOLDER = TINY_MODELS["tiny-llama"][2]

TINY_CFG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty model cache (and an empty, offline HF cache)."""
    monkeypatch.setenv("DJINN_CACHE", str(tmp_path / "djinn"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "djinn"


def test_tiny_llama_loads_from_saved_folder(cache):
    lm = load_model("tiny-llama", device="cpu")
    folder = cache / "models" / TINY_FOLDER
    assert lm.path == str(folder)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    assert [p.name for p in folder.parent.iterdir()] == [TINY_FOLDER]  # no temp folders left
    assert isinstance(lm.model, LlamaForCausalLM)
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.config._attn_implementation == "sdpa"
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert len(lm.decoder_layers()) == lm.num_layers == 8
    assert lm.embed() is lm.model.model.embed_tokens

    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = load_model("tiny-llama", device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    for a, b in zip(lm.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_build_is_deterministic(tmp_path, monkeypatch):
    states, tokenizers = [], []
    for d in ("a", "b"):
        monkeypatch.setenv("DJINN_CACHE", str(tmp_path / d))
        folder = ensure_tiny()
        tokenizers.append((folder / "tokenizer.json").read_bytes())
        states.append(load_model("tiny-llama", device="cpu").model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert tokenizers[0] == tokenizers[1]


def test_lost_build_race_uses_the_winners_folder(cache, monkeypatch):
    real_rename = os.rename

    def rename_after_someone_else(src, dst):
        shutil.copytree(src, dst)  # another process finished first
        real_rename(src, dst)  # fails: dst exists and is not empty

    monkeypatch.setattr(presets.os, "rename", rename_after_someone_else)
    folder = ensure_tiny()
    assert (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [TINY_FOLDER]


def test_tokenizer_round_trips(cache):
    lm = load_model("tiny-llama", device="cpu")
    text = "The capital of France is"
    ids = lm.encode(text)
    assert ids and all(0 <= i < lm.vocab_size for i in ids)
    assert lm.decode(ids) == text
    assert lm.encode(text, bos=True) == [1] + ids

    tok = AutoTokenizer.from_pretrained(lm.path, local_files_only=True)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= lm.vocab_size
    assert tok.decode(tok.encode("héllo 🙂", add_special_tokens=False)) == "héllo 🙂"


def test_greedy_generation_is_deterministic(cache):
    lm = load_model("tiny-llama", device="cpu")
    prompt = torch.tensor([lm.encode("The capital of France is", bos=True)])

    def greedy():
        out = lm.model.generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2
        )
        return out[0, prompt.shape[1]:].tolist()

    first = greedy()
    assert len(first) == 8
    assert greedy() == first


def test_sizes(cache):
    lm = load_model("tiny-llama", device="cpu")
    m = lm.model
    assert (lm.num_layers, lm.hidden_size, lm.num_kv_heads, lm.head_dim, lm.vocab_size) == (8, 128, 2, 32, 512)
    assert lm.kv_bytes_per_token == 2 * 8 * 2 * 32 * 4
    param_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in m.buffers())
    assert lm.weights_bytes == param_bytes + buffer_bytes
    assert buffer_bytes < 1024  # only the rotary tables: weights are the parameters
    d = lm.describe()
    assert set(d) == {"name", "path", "family", "num_layers", "weights_bytes", "kv_bytes_per_token", "vocab_size",
                      "context_length", "dtype",
                      "hidden_size", "load_seconds", "lens", "batching", "activation_bytes_per_token",
                      "mask_bytes_per_token_pair", "kv_granule_tokens", "slab_growth"}
    assert d["family"] == "llama" and d["lens"] is True and d["batching"] is True
    # embeddings, layer input, output (fp32), and what the load's probe found beside them (issue 24):
    # cos and sin of the rotary tables, ids and position ids; SDPA's mask only when a forward extends a KV
    assert d["activation_bytes_per_token"] == 3 * lm.hidden_size * 4 + 2 * lm.head_dim * 4 + 2 * 8
    assert d["mask_bytes_per_token_pair"] == 1
    assert d["dtype"] == "float32" and d["name"] == "tiny-llama"


def test_load_in_bf16_halves_the_bytes(cache):
    fp32 = load_model("tiny-llama", device="cpu")
    bf16 = load_model("tiny-llama", device="cpu", dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.kv_bytes_per_token * 2 == fp32.kv_bytes_per_token


def test_build_preset_makes_bf16_on_cpu():
    rng = torch.get_rng_state()
    m = build_preset(TINY_CFG, "cpu", torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    again = build_preset(TINY_CFG, "cpu", torch.bfloat16)
    for a, b in zip(m.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_preset_name_loads_without_tokenizer(monkeypatch):
    monkeypatch.setitem(PRESETS, "llama-2-7b", TINY_CFG)
    lm = load_model("llama-2-7b", device="cpu", dtype="bf16")
    assert lm.path == "" and lm.tokenizer is None and lm.dtype == torch.bfloat16
    assert lm.model.config._attn_implementation == "sdpa"
    assert not lm.model.training
    ids = lm.encode("héllo")
    assert ids == [b % 64 for b in "héllo".encode()]
    assert lm.kv_bytes_per_token == 2 * 2 * 2 * 8 * 2


def test_real_preset_sizes_and_memory_guard(monkeypatch):
    # Only the meta device: nothing the size of a real model is allocated.
    assert estimate_weights_bytes(PRESETS["llama-2-7b"], torch.float16) == 6_738_415_616 * 2
    assert estimate_weights_bytes(PRESETS["llama-2-13b"], torch.float16) == 13_015_864_320 * 2
    with pytest.raises(ValueError, match="GiB free"):
        build_preset(PRESETS["llama-2-13b"], "cpu", torch.bfloat16, free_bytes=1 << 30)


def test_local_checkpoint_path(cache, tmp_path):
    folder = ensure_tiny()
    lm = load_model(str(folder), device="cpu")
    assert lm.name == lm.path == str(folder) and lm.tokenizer is not None

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    lm = load_model(str(bare), device="cpu")
    assert lm.tokenizer is None and lm.num_layers == 8


def test_a_path_that_holds_no_checkpoint_raises_one_line(cache, tmp_path):
    for path, why in ((tmp_path / "missing", "no such file or folder"),
                      (tmp_path, "a checkpoint folder holds a config.json")):
        with pytest.raises(ValueError) as err:
            load_model(str(path), device="cpu")
        assert str(err.value) == f"no checkpoint at {str(path)!r}: {why}"


@pytest.mark.parametrize("name", ["no-such-model", "someone/not-cached"])
def test_unknown_model_raises_one_line(cache, name):
    with pytest.raises(ValueError) as err:
        load_model(name, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"unknown model {name!r}" in msg and "tiny-llama" in msg and "llama-2-13b" in msg


def test_devices_and_dtypes(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:99"):
        with pytest.raises(ValueError) as err:
            resolve_device(bad)
        assert "\n" not in str(err.value)
    assert models.default_dtype("cpu") == torch.float32
    assert parse_dtype(None) is None
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("BF16") is torch.bfloat16
    with pytest.raises(ValueError):
        parse_dtype("int8")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DJINN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DJINN_CACHE")
    assert cache_dir() == tmp_path / "x" / "djinn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "djinn"


@pytest.mark.parametrize("content, why", [(None, "no GGUF file at"), (b"GGUF" + bytes(64), "cannot read GGUF file"),
                                          (b"not a gguf at all", "cannot read GGUF file")])
def test_a_missing_or_corrupt_gguf_file_raises_one_line(cache, tmp_path, content, why):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_model(str(path), device="cpu")
    assert "\n" not in str(err.value) and why in str(err.value) and str(path) in str(err.value)
