"""The session screen (the console as a white-box debugger): Pilot tests against real daemons
(SmolLM2 with real weights for the lens), and snapshots of each new screen with fixed data."""

import statistics

import pytest
from textual.widgets import Input

from conftest import until

from console.app import DjinnConsole
from console.debugger import View, parse_layers
from console.screens.dialogs import Ask, NewSession, PatchDialog
from console.screens.session import SessionScreen, norm_picture

PROMPT = "The capital of France is"


def idle(screen) -> bool:
    """No request of the session screen in flight (its actions run as workers of group "debug")."""
    return not any(w.group == "debug" and not w.is_finished for w in screen.app.workers)


async def press_and_wait(pilot, screen, *keys):
    await pilot.press(*keys)
    await until(pilot, lambda: idle(screen), 120, what=f"{keys} to finish")


# -- the daemon's side: what the screen reads ----------------------------------------------------

def test_inspect_gives_each_positions_figures_and_text_each_tokens(make_daemon):
    d = make_daemon("--device", "cpu")
    with d.client() as c:
        sid = c.create_session(prompt=PROMPT)
        ids = c.session(sid)["prompt_ids"]
        pieces = c.pieces(ids)
        assert "".join(pieces) == c.text(ids) and len(pieces) == len(ids)
        c.run_to(sid, layer=2)
        st = c.inspect(sid, positions=list(range(len(ids))))
        per = st["per_position"]
        for i, row in enumerate(st["values"]):
            assert per["mean"][i] == pytest.approx(statistics.fmean(row), abs=1e-5)
            assert per["std"][i] == pytest.approx(statistics.stdev(row), rel=1e-4)
            assert (per["min"][i], per["max"][i]) == (min(row), max(row))
            assert per["norm"][i] == pytest.approx(sum(x * x for x in row) ** 0.5, rel=1e-5)


def test_layer_lists_parse_and_bad_ones_say_why():
    assert parse_layers("3 7, 10-12", 30) == {3, 7, 10, 11, 12}
    assert parse_layers("", 30) == set()
    for bad, why in (("31", "layers are 0..29"), ("x", "not a layer number"), ("5-2", "layers are 0..29")):
        with pytest.raises(ValueError, match=why):
            parse_layers(bad, 30)


def test_the_norm_picture_keeps_the_largest_of_each_group():
    assert norm_picture([1.0, 2.0, 4.0, 8.0], 4) == "▂▃▅█"
    assert norm_picture([1.0] * 9 + [8.0], 5) == "▂▂▂▂█"  # 10 positions in 5 cells: the spike stays


# -- the session screen (SmolLM2's lens: test_smollm2.py, beside its daemon) ---------------------

@pytest.mark.asyncio
async def test_new_session_generate_streams_text_and_bad_input_changes_nothing(make_daemon):
    d = make_daemon("--device", "cpu")
    app = DjinnConsole(d.socket)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.state.attached and app.state.status, what="attach")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewSession), what="the new-session dialog")
        await pilot.press(*"Once upon a time", "enter")
        await until(pilot, lambda: isinstance(app.screen, SessionScreen), what="the session screen")
        screen = app.screen
        await until(pilot, lambda: idle(screen) and screen.dbg.view.pieces, what="the session's text")
        v = screen.dbg.view
        with d.client() as c:
            assert c.session(v.sid)["qos"] == "interactive"
        await pilot.press("b")
        await until(pilot, lambda: isinstance(app.screen, Ask), what="the breakpoints question")
        await pilot.press(*"99", "enter")  # out of range: said, nothing set
        assert v.breakpoints == set() and app.screen is screen
        await press_and_wait(pilot, screen, "p")  # not paused: said, no dialog
        assert app.screen is screen
        await press_and_wait(pilot, screen, "s")
        assert v.layer == 0 and v.lens[0]["position"] == v.forward_len - 1 == len(v.pieces) - 1
        await press_and_wait(pilot, screen, "left")  # the lens reads the token before
        assert v.lens[0]["position"] == v.forward_len - 2
        assert f"position {v.forward_len - 2}" in str(screen.query_one("#dbg-lens").render())
        seen, before = [], len(v.pieces)
        screen.dbg.changed = lambda: (seen.append(len(v.pieces)), screen.redraw())
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, Ask), what="the generate question")
        await pilot.press("ctrl+a", "ctrl+k", "5", "enter")
        await until(pilot, lambda: app.screen is screen and idle(screen), what="generation")
        with d.client() as c:
            info = c.session(v.sid)
            want = c.pieces(info["prompt_ids"] + info["tokens"])
        assert len(info["tokens"]) == 6 and v.pieces == want  # the paused forward's token, then five
        assert set(range(before + 1, before + 7)) <= set(seen)  # the screen was redrawn at each token
        with d.client() as c:
            c.close(v.sid)
        await press_and_wait(pilot, screen, "s")  # the session is gone: one line, the screen stays
        assert app.screen is screen


# -- snapshots: fixed data, no daemon ------------------------------------------------------------

def fixed_view() -> View:
    pieces = ["The", " capital", " of", " France", " is"]
    norms = [41.2, 12.5, 9.8, 15.1, 22.7]
    lens = {layer: {"position": 4, "top": [{"token": 1, "text": t1, "prob": p1}, {"token": 2, "text": " the", "prob": 0.08},
                                            {"token": 3, "text": " a", "prob": 0.03}]}
            for layer, t1, p1 in [(0, " is", 0.02), (1, " is", 0.03), (2, " of", 0.04), (3, " located", 0.11),
                                  (4, " the", 0.19), (5, " Paris", 0.31), (6, " Paris", 0.64)]}
    return View(sid=3, num_layers=30, pieces=pieces, breakpoints={6, 29}, layer=6, forward_len=5, position=-1,
                lens=lens, note="paused after layer 6",
                info={"id": 3, "state": "paused", "layer": 6, "qos": "interactive", "phase": "COMPUTE",
                      "location": "device", "device_bytes": 691_200, "swaps": 1, "last_swap_ms": 2.4,
                      "prompt_ids": [1, 2, 3, 4, 5], "tokens": []},
                stats={"layer": 6, "shape": [1, 5, 576], "dtype": "float32", "mean": 0.01, "std": 1.2, "min": -9.5,
                       "max": 31.0, "norm": 54.3,
                       "per_position": {"norm": norms, "mean": [0.01, -0.02, 0.0, 0.03, 0.02],
                                        "std": [1.7, 0.52, 0.41, 0.63, 0.95], "min": [-9.5, -3.1, -2.2, -2.8, -4.0],
                                        "max": [31.0, 4.2, 3.3, 5.0, 7.1]}})


async def show_session(pilot):
    pilot.app.push_screen(SessionScreen(pilot.app.socket, 3, 30, fixed_view()))
    await pilot.pause()


def fixed_app() -> DjinnConsole:
    return DjinnConsole("/run/djinn/djinnd.sock", connect=False)


async def show_dialog(pilot, dialog) -> None:
    """Push a dialog over a drawn screen, its text cursors steady (what the redraw timer or a blinking
    cursor would change between two shots, fixed)."""
    pilot.app.redraw()
    await pilot.app.push_screen(dialog)
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_snapshot_session_paused_at_layer_6_with_the_lens_up_to_it(snap_compare, size):
    assert snap_compare(fixed_app(), terminal_size=size, run_before=show_session)


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_snapshot_patch_dialog(snap_compare, size):
    async def run_before(pilot):
        await show_dialog(pilot, PatchDialog("4"))
    assert snap_compare(fixed_app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_snapshot_new_session_dialog(snap_compare, size):
    async def run_before(pilot):
        await show_dialog(pilot, NewSession())
    assert snap_compare(fixed_app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_snapshot_breakpoints_question(snap_compare, size):
    async def run_before(pilot):
        await show_dialog(pilot, Ask("Pause after layers (0..29, e.g. 3 7 10-12; empty: none):", "6 29"))
    assert snap_compare(fixed_app(), terminal_size=size, run_before=run_before)

