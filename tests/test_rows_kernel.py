"""The compiled row attention (djinnd/csrc/rows_attention.cpp) against torch's own SDPA, row by row."""

import pytest
import torch
import torch.nn.functional as F

from djinnd import rows


def test_the_kernel_was_built_by_the_install():
    assert rows._kernel is not None, "djinnd._rows_attention is missing: make install builds it (needs a C++ compiler)"


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, 0), (8, 2, 0), (6, 3, 5), (4, 1, 40)])
def test_each_row_attends_to_its_own_slab_as_sdpa_does(heads, kv_heads, window):
    torch.manual_seed(heads * 10 + kv_heads)
    d, lengths = 16, [1, 3, 9, 17, 33]
    slabs = [torch.randn(2, 1, kv_heads, 40, d) for _ in lengths]  # keys, values; room for 40 tokens
    keys = [s[0, :, :, :n] for s, n in zip(slabs, lengths)]  # views with the slab's strides
    values = [s[1, :, :, :n] for s, n in zip(slabs, lengths)]
    query = torch.randn(len(lengths), 1, heads, d).transpose(1, 2)  # [B, heads, 1, d], not contiguous
    got = rows._kernel(query, keys, values, 0.3, window)
    for b, (k, v) in enumerate(zip(keys, values)):
        if window and k.shape[2] > window:
            k, v = k[:, :, -window:], v[:, :, -window:]
        want = F.scaled_dot_product_attention(query[b:b + 1], k.repeat_interleave(heads // kv_heads, 1),
                                              v.repeat_interleave(heads // kv_heads, 1), scale=0.3)
        torch.testing.assert_close(got[b:b + 1], want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_a_mismatched_call_is_refused_with_a_message_and_no_crash():
    q = torch.randn(2, 4, 1, 8)
    kv = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="one key and one value tensor a row"):
        rows._kernel(q, [kv], [kv], 1.0, 0)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        rows._kernel(q.double(), [kv, kv], [kv, kv], 1.0, 0)
