"""SmolLM2-135M-Instruct (real trained weights) through the socket, the CLI and the console's session
screen, and the steering scenario on it (scaling at a breakpoint changes the output deterministically
and x1.0 changes nothing; activation addition shifts the next token). One module, one daemon's load,
run beside the tiny families' checks."""

import json

import pytest
import torch

from conftest import CONTRACT_KEYS, results, scenario, until
from djinnd import DjinnError, load_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_daemon):
    """The reference in this process (the model cache converts the GGUF once a run) and a daemon on it."""
    return load_model("smollm2-135m", "cpu"), smollm2_daemon


def _generate(lm, ids, n):
    with torch.inference_mode():
        t = torch.tensor([ids])
        return lm.model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                                 pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):].tolist()


@pytest.mark.slow
def test_smollm2_tokens_through_djinnd_equal_generate_paused_at_layer_15_or_not(smollm2):
    lm, d = smollm2
    ids = lm.encode(PROMPT)
    want = _generate(lm, ids, 8)
    assert lm.decode(want).startswith(" Paris")  # real weights: the answer a reader expects
    with d.client() as c:
        sid = c.create_session(prompt=PROMPT)
        assert c.generate(sid, 8) == want
        paused = c.create_session(prompt=PROMPT)
        assert c.run_to(paused, layer=15) == {"state": "paused", "layer": 15}
        assert [c.resume(paused)] + c.generate(paused, 7) == want
        assert c.status()["model"]["family"] == "llama" and c.status()["model"]["num_layers"] == 30


@pytest.mark.slow
def test_smollm2_logit_lens_is_the_models_own_distribution_at_the_last_layer_and_differs_early(smollm2):
    lm, d = smollm2
    ids = lm.encode(PROMPT)
    with torch.inference_mode():
        probs = torch.softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    want = probs.topk(5)
    with d.client() as c:
        sid = c.create_session(token_ids=ids)
        with pytest.raises(DjinnError) as e:
            c.lens(sid)
        assert e.value.code == "bad_state" and "not paused" in str(e.value)
        c.run_to(sid, layers=[3, 29])
        early = c.lens(sid, top_k=5)
        c.resume(sid)
        last = c.lens(sid, top_k=5)
    assert [t["token"] for t in last["top"]] == want.indices.tolist()
    assert max(abs(t["prob"] - p) for t, p in zip(last["top"], want.values.tolist())) < 1e-5
    assert last["top"][0]["text"] == " Paris"
    assert [t["token"] for t in early["top"]] != want.indices.tolist()


@pytest.mark.slow
def test_the_cli_prints_text_and_ids_with_json(smollm2):
    lm, d = smollm2

    def djinn(*args):
        out = d.run("djinn", *args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    sid = int(djinn("session", "create", PROMPT))
    assert djinn("session", "generate", str(sid), "-n", "2").startswith(" Paris")
    got = json.loads(djinn("session", "generate", str(sid), "-n", "3", "--json"))
    assert got["text"] == lm.decode(got["tokens"]) and len(got["tokens"]) == 3
    djinn("session", "run-to", str(sid), "15")
    resumed = json.loads(djinn("session", "resume", str(sid), "--json"))
    assert resumed["state"] == "idle" and resumed["text"] == lm.decode([resumed["token"]])
    out = d.run("djinn", "session", "lens", str(sid))
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "not paused" in out.stderr


@pytest.mark.slow
@pytest.mark.asyncio
async def test_step_through_layers_the_lens_finds_paris_a_patch_changes_it_and_resume_makes_its_token(
        smollm2):
    """The session screen of djinn-console on real weights (test_debugger.py holds the rest)."""
    from console.app import DjinnConsole
    from console.screens.dialogs import Ask, PatchDialog
    from console.screens.session import SessionScreen
    from test_debugger import idle, press_and_wait
    _, d = smollm2
    with d.client() as c:
        sid = c.create_session(prompt=PROMPT)
        ref = c.create_session(prompt=PROMPT)
        own, = c.generate(ref, 1)  # the model's own next token, unpaused
        c.close(ref)
        own_text = c.text([own])
    assert own_text == " Paris"
    app = DjinnConsole(d.socket)
    async with app.run_test(size=(160, 45)) as pilot:
        await until(pilot, lambda: app.state.attached and app.state.status, what="attach")
        app.open_session(sid)
        await until(pilot, lambda: isinstance(app.screen, SessionScreen), what="the session screen")
        screen = app.screen
        await until(pilot, lambda: idle(screen) and screen.dbg.view.pieces, what="the session's text")
        v = screen.dbg.view
        assert "".join(v.pieces) == PROMPT and v.layer is None
        for _ in range(3):  # layer by layer, one key each
            await press_and_wait(pilot, screen, "s")
        assert v.layer == 2 and sorted(v.lens) == [0, 1, 2]
        assert v.stats["layer"] == 2 and len(v.stats["per_position"]["norm"]) == v.forward_len == len(v.pieces)

        last = v.num_layers - 1
        await pilot.press("b")
        await until(pilot, lambda: isinstance(app.screen, Ask), what="the breakpoints question")
        await pilot.press("ctrl+a", "ctrl+k", *str(last), "enter")
        assert v.breakpoints == {last}
        await press_and_wait(pilot, screen, "n")
        assert v.layer == last and sorted(v.lens) == list(range(last + 1))  # every layer's lens up to the pause
        top = v.lens[last]["top"]
        assert top[0]["token"] == own and top[0]["text"] == " Paris"
        assert "Paris" in str(screen.query_one("#dbg-lens").render())

        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, PatchDialog), what="the patch dialog")
        await pilot.press("ctrl+a", "ctrl+k", "minus", "1", "enter")  # scale the last position by -1
        await until(pilot, lambda: app.screen is screen and idle(screen), what="the patch")
        patched = v.lens[last]["top"]
        assert patched[0]["token"] != own and "patched: scale -1" in v.note
        await press_and_wait(pilot, screen, "c")
        assert v.layer is None and v.info["tokens"] == [patched[0]["token"]]  # the patched lens's token
        assert v.pieces[-1] == patched[0]["text"]


@pytest.mark.slow
def test_steering_headless_on_smollm2(smollm2_daemon, tmp_path):
    d = smollm2_daemon
    sessions = json.loads(d.run("djinn", "status", "--json").stdout)["sessions"]  # other tests' (a shared daemon)
    out = scenario("run", "steering", "--headless", "--output", str(tmp_path / "run"),
                   "--set", "prompts=2", "--set", "tokens=6", socket=d.socket)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "steering: PASS" in out.stdout and "activation addition" in out.stdout
    r = results(tmp_path / "run")
    assert CONTRACT_KEYS <= set(r)
    assert r["status"] == "pass" and r["reasons"] == [] and r["model"]["name"] == "smollm2-135m"
    sc = r["scaling"]
    assert sc["total"] == 12 and sc["identity_changed"] == 0 and sc["repeat_differs"] == 0
    assert all(p["steered"] and p["identity_changed"] == 0 for p in sc["prompts"])
    assert 0 < r["headline"]["changed_fraction"] == sc["changed_fraction"] == round(sc["changed"] / 12, 4)
    ad = r["addition"]
    assert ad["zero_shift"] == 0 and ad["shift"] > 0 and ad["lens_top1_is_token"]
    assert r["num_sessions_completed"] == r["num_sessions_spawned"] == 2 * 4 + 5
    assert json.loads(d.run("djinn", "status", "--json").stdout)["sessions"] == sessions  # every one it made closed

    past = scenario("run", "steering", "--headless", "--output", str(tmp_path / "past"), "--set", "layer=30",
                    socket=d.socket)
    assert past.returncode == 2 and "past the last layer" in past.stdout
    assert results(tmp_path / "past")["status"] == "skipped"
