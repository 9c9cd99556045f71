"""The same guarantees on CUDA (fp16, pinned host pool, copy stream); skipped without a GPU."""

import tempfile
import time

import pytest
import torch

from djinnd.models import load_model
from djinnd.runtime import Runtime
from djinnd.telemetry import EventBus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def rt():
    lm = load_model("tiny-llama", "cuda:0", torch.float16)
    runtime = Runtime(lm, EventBus(), lm.weights_bytes + (256 << 20), 64 << 20, tempfile.mkdtemp())
    yield runtime
    runtime.shutdown()


def test_breakpoints_at_every_layer_on_cuda_fp16(rt):
    ref_s = rt.create(prompt=PROMPT)
    ref = rt.generate(ref_s.id, 6)
    for layer in range(rt.lm.num_layers):
        s = rt.create(prompt=PROMPT)
        rt.run_to(s.id, [layer])
        assert rt.inspect(s.id)["dtype"] == "float16"
        rt.mem.swap_out(s)
        assert s.location == "host" and rt.mem.host.buffer.is_pinned()
        toks = [rt.resume(s.id)["token"]] + rt.generate(s.id, 5)
        assert toks == ref, f"layer {layer}"
        rt.close(s.id)


def test_swap_round_trips_are_bit_exact_on_cuda(rt):
    s = rt.create(prompt=PROMPT * 20)
    rt.run_to(s.id, [3])
    for i in range(20):
        before = [t.clone() for t in s.swappable_tensors()]
        rt.mem.swap_out(s, tier="disk" if i % 2 else "host")
        rt.mem.swap_in(s)
        assert all(torch.equal(a, b) for a, b in zip(before, s.swappable_tensors()))
    rt.resume(s.id)


def test_llama_2_13b_preset_loads_in_well_under_a_minute():
    free, _ = torch.cuda.mem_get_info()
    if free < 30 << 30:
        pytest.skip("needs 30 GB of free device memory")
    t0 = time.monotonic()
    lm = load_model("llama-2-13b", "cuda:0", torch.float16)
    took = time.monotonic() - t0
    assert lm.num_layers == 40 and lm.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert took < 30, f"{took:.1f} s"
    del lm
    torch.cuda.empty_cache()
