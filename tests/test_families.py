"""Any model family: the generality scenario over every tiny family through real daemons, and the
families refused at load (SmolLM2's real weights: test_smollm2.py)."""


import pytest
import torch

from conftest import djinn, results, scenario
from djinnd import DjinnError, load_model
from djinnd.presets import TINY_MODELS


def _save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """Checkpoints of families the runtime cannot serve: a state-space model, an encoder, an encoder-decoder."""
    from transformers import BertConfig, BertLMHeadModel, MambaConfig, MambaForCausalLM, T5Config, T5ForConditionalGeneration
    root = tmp_path_factory.mktemp("refused")
    torch.manual_seed(0)
    return {
        "mamba": (_save(MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, state_size=8)),
                        root / "mamba"), "is not one key/value pair per decoder layer"),
        "bert": (_save(BertLMHeadModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=128)), root / "bert"), "it is not causal"),
        "t5": (_save(T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_ff=128)),
                     root / "t5"), "no causal language model class"),
    }


@pytest.mark.parametrize("family", ["mamba", "bert", "t5"])
def test_a_family_the_runtime_cannot_serve_is_refused_at_load_with_one_line(refused, family):
    path, why = refused[family]
    with pytest.raises(ValueError) as e:
        load_model(path, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"cannot serve model family {family!r}" in msg and why in msg, msg


@pytest.mark.slow
def test_every_family_passes_the_same_checks_through_the_daemon_and_a_refused_one_fails_its_row(refused, tmp_path):
    models = [*TINY_MODELS, refused["mamba"][0]]
    out = scenario("run", "generality", "--headless", "--set", "models=" + ",".join(models), "--output", str(tmp_path),
                   timeout=600)
    r = results(tmp_path)
    assert out.returncode == 1 and r["status"] == "fail", out.stdout[-3000:]
    rows = {row["model"]: row for row in r["models"]}
    assert {rows[m]["family"] for m in TINY_MODELS} == {"llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gpt2",
                                                         "gpt_neox", "opt", "gptj"}
    for m in TINY_MODELS:
        assert all(rows[m][check]["ok"] for check in r["checks"]), rows[m]
    mamba = rows[refused["mamba"][0]]
    assert not mamba["loads"]["ok"] and "cannot serve model family 'mamba'" in mamba["loads"]["measured"]
    assert [c["id"] for c in r["criteria"] if not c["ok"]] == ["loads"]
    swap = rows["tiny-gpt2"]["swap"]["measured"]
    assert swap.startswith("out to host") and "bit-exact" in swap


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_a_corrupt_model_file_stops_djinnd_start_with_one_line_and_leaves_nothing(tmp_path, kind):
    if kind == "gguf":
        bad = tmp_path / "broken.gguf"
        bad.write_bytes(b"GGUF" + bytes(64))
        why = f"cannot start: cannot read GGUF file '{bad}'"
    else:  # a checkpoint folder whose weights file was cut short
        from transformers import GPT2Config, GPT2LMHeadModel
        bad = tmp_path / "cut"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=1,
                                   eos_token_id=2)).save_pretrained(bad)
        weights = bad / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        why = "cannot start: "
    sock = tmp_path / "run" / "d.sock"
    out = djinn("start", "--device", "cpu", "--socket", str(sock), "--model", str(bad), program="djinnd")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], out.stderr
    assert not any(sock.parent.iterdir())  # no socket, no pidfile


def test_a_model_whose_norm_and_head_do_not_give_its_logits_serves_without_a_lens_and_says_so(make_daemon, tmp_path):
    """OPT with a projection after its final norm: the lens the runtime would build is not the model's own."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=256)).save_pretrained(tmp_path)
    d = make_daemon("--device", "cpu", "--model", str(tmp_path))
    with d.client() as c:
        assert c.status()["model"]["lens"] is False
        sid = c.create_session(token_ids=[5, 6, 7])
        c.run_to(sid, layer=1)
        with pytest.raises(DjinnError) as e:
            c.lens(sid)
        assert e.value.code == "unsupported" and "no logit lens for model family 'opt'" in str(e.value)
        assert isinstance(c.resume(sid), int)  # served all the same


def test_a_family_whose_attention_takes_no_rows_decodes_one_row_at_a_time_and_says_so(make_daemon, tmp_path):
    """Bloom computes attention in its own code (ALiBi), not through transformers' AttentionInterface:
    the probe at load finds a batched step impossible, and its decode steps run one a forward."""
    import threading

    from transformers import BloomConfig, BloomForCausalLM
    from djinnd import Client
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4)).save_pretrained(tmp_path)
    d = make_daemon("--device", "cpu", "--model", str(tmp_path))
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    with d.client() as c:
        st = c.status()
        assert st["model"]["batching"] is False and st["scheduler"]["max_batch"] == 1
        with pytest.raises(DjinnError) as e:
            c.set_scheduler(max_batch=4)
        assert e.value.code == "unsupported" and "per-session key/value rows" in str(e.value)
        alone = []
        for p in prompts:
            sid = c.create_session(token_ids=p)
            alone.append(c.generate(sid, 5))
            c.close(sid)
        sids = [c.create_session(token_ids=p) for p in prompts]
        got = [[], []]

        def decode(i):
            with Client(d.socket) as ci:
                got[i] += ci.generate(sids[i], 5)
        threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == alone and c.status()["scheduler"]["batches"]["largest"] == 1
