"""Issue 24: a paused forward is charged for everything it holds beside its KV, measured against
the tensors actually found in the paused thread's stack (not the load probe's own walk)."""

import gc
import sys
import tempfile
import time

import pytest
import torch

from djinnd.charges import estimate
from djinnd.models import load_model
from djinnd.runtime import Runtime
from djinnd.telemetry import EventBus


def paused_frames(timeout: float = 10.0) -> list:
    """The frames, innermost first, of the one thread paused in the runtime's `_pause`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for top in sys._current_frames().values():
            chain, f = [], top
            while f is not None:
                chain.append(f)
                f = f.f_back
            if any(f.f_code.co_name == "_pause" for f in chain):
                return chain
        time.sleep(0.01)
    raise AssertionError("no thread is paused in the runtime")


def reachable_tensors(value, depth: int, out: list, seen: set) -> None:
    """Tensors in `value`: containers, and the attributes of transformers' objects (model outputs,
    caches) and of the paused session, `depth` levels deep. Modules are left out (their tensors are
    the weights), and so are the daemon's other objects (the runtime's host pool is not the device's)."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif depth <= 0 or isinstance(value, (torch.nn.Module, type, str, bytes, int, float)):
        return
    elif isinstance(value, dict):
        for v in list(value.values()):
            reachable_tensors(v, depth - 1, out, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in list(value):
            reachable_tensors(v, depth - 1, out, seen)
    elif type(value).__module__.startswith("transformers") or type(value).__name__ == "Session":
        for v in list(vars(value).values()):  # a model output, a cache's layers, the paused session
            reachable_tensors(v, depth - 1, out, seen)


def held_beside_kv(rt, s) -> tuple[int, list]:
    """Bytes of every storage the paused thread's frames hold, weights and the KV slab left out."""
    tensors, seen = [], set()
    for f in paused_frames():
        for v in list(f.f_locals.values()):
            reachable_tensors(v, 4, tensors, seen)
    model = rt.lm.model
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    skip.add(s.cache.slab.untyped_storage().data_ptr())
    held, total, shapes = set(), 0, []
    for t in tensors:
        st = t.untyped_storage()
        p = st.data_ptr()
        if st.nbytes() == 0 or p in skip or p in held:
            continue
        held.add(p)
        total += st.nbytes()
        shapes.append((tuple(t.shape), str(t.dtype).removeprefix("torch."), st.nbytes()))
    return total, shapes


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma2", "tiny-gpt2", "tiny-mistral"])
def rt(request):
    lm = load_model(request.param, "cpu")
    r = Runtime(lm, EventBus(), lm.weights_bytes + (256 << 20), 32 << 20, tempfile.mkdtemp())
    yield r
    r.shutdown()
    gc.collect()


def ids(n: int, k: int = 0) -> list[int]:
    return [(7 * j + k) % 200 + 3 for j in range(n)]


@pytest.mark.parametrize("tokens", [57, 300])
def test_a_paused_prefill_is_charged_what_its_frames_hold(rt, tokens):
    s = rt.create(token_ids=ids(tokens))
    layer = rt.lm.num_layers // 2
    rt.run_to(s.id, [layer])
    try:
        held, shapes = held_beside_kv(rt, s)
        charged = s.charge - s.cache.nbytes
        assert charged == rt.lm.held_bytes(tokens) == estimate(rt.lm.describe(), tokens)["activation_bytes"]
        assert charged >= held, (rt.lm.name, charged, held, shapes)
        # the three hidden vectors, and rotary tables, ids or masks beside them, all found in the stack
        assert held >= 3 * tokens * rt.lm.hidden_size * rt.lm.dtype.itemsize
        assert charged - held <= 0.1 * charged + tokens * tokens, (rt.lm.name, charged, held, shapes)  # and not far over
    finally:
        rt.resume(s.id)
        rt.close(s.id)


def test_a_paused_forward_over_a_kept_kv_is_charged_its_mask_over_every_key(rt):
    """The second forward of a conversation: T new tokens after `past` in the KV. SDPA builds a boolean
    [1, 1, T, past + T] mask here (none for the first prefill); an eager family a float one or two."""
    s = rt.create(token_ids=ids(90))
    rt.generate(s.id, 2)
    rt.append(s.id, ids(40, 1))
    past, tokens = s.cache.seq_len, len(s.pending)
    rt.run_to(s.id, [rt.lm.num_layers - 1])
    try:
        held, shapes = held_beside_kv(rt, s)
        charged = s.charge - s.cache.nbytes
        assert charged == rt.lm.held_bytes(tokens, past)
        assert charged >= held, (rt.lm.name, past, tokens, charged, held, shapes)
        masks = [sh for sh in shapes if len(sh[0]) == 4]
        assert masks and all(sh[0][-2:] == (tokens, past + tokens) for sh in masks), shapes
    finally:
        rt.resume(s.id)
        rt.close(s.id)


def test_the_published_rule_has_a_quadratic_term_where_the_family_builds_float_masks():
    lm = load_model("tiny-gemma2", "cpu")  # eager attention: a full and a sliding float mask
    d = lm.describe()
    assert d["mask_bytes_per_token_pair"] >= 2 * lm.dtype.itemsize
    assert d["activation_bytes_per_token"] >= 3 * lm.hidden_size * 4 + 2 * lm.head_dim * 4  # + cos and sin
