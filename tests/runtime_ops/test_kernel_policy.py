"""The kernel policy's order and the split-KV decode kernel's sizing, checked without a GPU:
a single query over per-batch key lengths (decode) tries attnopt's split-KV kernel, then FLASH;
everything else keeps the measured order. The kernel itself runs in test_attention_gpu.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attnopt.runtime_ops import kernels
from attnopt.runtime_ops.kernels import decode
from attnopt.runtime_ops.spec import AttnSpec


def _spec(**kw) -> AttnSpec:
    base = AttnSpec(layout="bhsd", out_layout="bhsd", batch=8, heads_q=32, heads_kv=8, seqlen_q=1, seqlen_k=8192,
                    dim_qk=128, dim_v=128, dtype=torch.bfloat16, device=torch.device("cuda"), scale=128 ** -0.5,
                    dropout_p=0.0, causal_align="bottom_right", window=(-1, 0), mask_dtype=None, seqused=True)
    return dataclasses.replace(base, **kw)


def test_decode_over_key_lengths_tries_split_kv_first():
    assert kernels._order(_spec())[:2] == ("decode", "flash")
    assert kernels._order(_spec(seqlen_q=4))[0] == "fa4"  # several queries: the measured order
    assert kernels._order(_spec(seqused=False))[0] == "fa4"


@pytest.mark.parametrize("change, why", [
    ({"seqlen_q": 2}, "one query"), ({"seqused": False}, "one query"), ({"dtype": torch.float32}, "float16"),
    ({"softcap": 30.0}, "softcapping"), ({"mask_dtype": torch.bool}, "explicit mask"), ({"dim_qk": 512}, "256"),
    ({"causal_align": "top_left", "window": (-1, 0)}, "bottom-right"), ({"window": (4, 2)}, "diagonal"),
])
def test_split_kv_decode_says_what_it_does_not_run(change, why):
    assert decode.DecodeKernel().unsupported(_spec()) is None
    assert why in decode.DecodeKernel().unsupported(_spec(**change))


@pytest.mark.parametrize("batch, heads_kv, cache", [(1, 8, 1024), (8, 8, 8192), (64, 8, 32768), (1, 1, 100),
                                                    (3, 2, 70000)])
def test_splits_are_whole_blocks_and_at_most_128(batch, heads_kv, cache):
    keys = decode.split_len(batch, heads_kv, cache, sms=132)
    assert keys & (keys - 1) == 0 and keys >= decode.BLOCK_N
    assert -(-cache // keys) <= 128
    full = batch * heads_kv * -(-cache // keys)  # programs over a full cache
    assert full <= 2 * decode.CTAS_PER_SM * 132 or keys == decode.BLOCK_N
