"""Every SDPA spelling real models produce becomes one lowered site, at both IR levels.

Each case is a small module written the way some model writes attention; it runs under
torch.compile (Dynamo's torch-level graph) and torch.export + attnopt.optimize (ATen graph):
forward and backward must equal eager, and the copies / K/V repetition / V padding next to
attention must be gone from the graph.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnopt.demo_model import repeat_kv
from tests.models.helpers import check_compiled, check_exported

from .qkv import B, D, G, H, R, S, bshd_out, case, sdpa, split_gqa


# --- fused QKV -------------------------------------------------------------------------------
def unbind_fused(t):
    q, k, v = t.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    return bshd_out(sdpa(q, k, v, is_causal=True))


def chunk_fused(t):
    q, k, v = t.view(B, S, H, 3 * D).transpose(1, 2).chunk(3, dim=-1)
    return sdpa(q, k, v).transpose(1, 2).flatten(2)


def split_with_sizes(t):
    q, k, v = split_gqa(t, lambda x: repeat_kv(x, R))
    return sdpa(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, S, H * D)


def select_fused(t):
    qkv = t.view(B, S, H, 3, D)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    return bshd_out(sdpa(q, k, v))


def slice_fused(t):  # Phi-3: slices of one projection, then view
    q = t[..., : H * D].view(B, S, H, D).transpose(1, 2)
    k = t[..., H * D: (H + G) * D].view(B, S, G, D).transpose(1, 2)
    v = t[..., (H + G) * D:].view(B, S, G, D).transpose(1, 2)
    o = sdpa(q.contiguous(), repeat_kv(k, R).contiguous(), repeat_kv(v, R).contiguous(), is_causal=True)
    return o.transpose(1, 2).contiguous().reshape(B, S, -1)


def einops_rearrange(t):
    from einops import rearrange

    qkv = rearrange(t, "b n (three h d) -> three b h n d", three=3, h=H)
    return rearrange(sdpa(qkv[0], qkv[1], qkv[2]), "b h n d -> b n (h d)")


# --- K/V repetition ----------------------------------------------------------------------------
def repeat_interleave_method(t):
    return bshd_out(sdpa(*split_gqa(t, lambda x: x.repeat_interleave(R, dim=1)), is_causal=True))


def repeat_interleave_function(t):
    return bshd_out(sdpa(*split_gqa(t, lambda x: torch.repeat_interleave(x, R, dim=1))))


def index_broadcast_flatten(t):
    return bshd_out(sdpa(*split_gqa(t, lambda x: x[:, :, None].broadcast_to(B, G, R, S, D).flatten(1, 2))))


def repeat_kv_on_bshd(t):  # torchtitan: repeat before the transpose
    q, k, v = t.split([H * D, G * D, G * D], dim=-1)
    k, v = (x.view(B, S, G, D).unsqueeze(3).expand(B, S, G, R, D).reshape(B, S, H, D) for x in (k, v))
    o = sdpa(q.view(B, S, H, D).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2).contiguous().view(B, S, -1)


def mqa_expand(t):
    q, k, v = t.split([H * D, D, D], dim=-1)
    q = q.view(B, S, H, D).transpose(1, 2)
    k, v = (x.view(B, S, 1, D).transpose(1, 2).expand(-1, H, -1, -1) for x in (k, v))
    return bshd_out(sdpa(q, k, v, is_causal=True))


# --- MLA: V zero-padded to the q/k head dim, output sliced back ----------------------------------
def mla_pad_before_transpose(t):
    q, k, v = t.split([H * D, H * D, H * D // 2], dim=-1)
    q, k = (x.view(B, S, H, D).transpose(1, 2) for x in (q, k))
    v = F.pad(v.view(B, S, H, D // 2), [0, D // 2]).transpose(1, 2)
    return sdpa(q, k, v, is_causal=True).transpose(1, 2)[..., : D // 2].reshape(B, S, -1)


# --- outputs -----------------------------------------------------------------------------------
def sbhd_output(t):  # Megatron: permute(2, 0, 1, 3) -> contiguous -> view[S, B, H * D]
    q, k, v = t.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    return sdpa(q, k, v).permute(2, 0, 1, 3).contiguous().view(S, B, H * D)


def bhsd_output_read_twice(t):
    q, k, v = split_gqa(t, lambda x: repeat_kv(x, R))
    o = sdpa(q, k, v, is_causal=True)
    return bshd_out(o) * o.mean()


SPELLINGS = {
    # name: (function, projection width, (gqa group, q layout, output layout))
    "unbind_fused": (unbind_fused, 3 * H * D, (1, "bhsd", "bshd")),
    "chunk_fused": (chunk_fused, 3 * H * D, (1, "bhsd", "bshd")),
    "split_with_sizes": (split_with_sizes, (H + 2 * G) * D, (R, "bshd", "bshd")),
    "select_fused": (select_fused, 3 * H * D, (1, "bshd", "bshd")),
    "slice_fused": (slice_fused, (H + 2 * G) * D, (R, "bshd", "bshd")),
    "einops_rearrange": (einops_rearrange, 3 * H * D, (1, "bhsd", "bshd")),
    "repeat_interleave_method": (repeat_interleave_method, (H + 2 * G) * D, (R, "bshd", "bshd")),
    "repeat_interleave_function": (repeat_interleave_function, (H + 2 * G) * D, (R, "bshd", "bshd")),
    "index_broadcast_flatten": (index_broadcast_flatten, (H + 2 * G) * D, (R, "bshd", "bshd")),
    "repeat_kv_on_bshd": (repeat_kv_on_bshd, (H + 2 * G) * D, (R, "bshd", "bshd")),
    "mqa_expand": (mqa_expand, (H + 2) * D, (H, "bshd", "bshd")),
    "mla_pad_before_transpose": (mla_pad_before_transpose, (2 * H + H // 2) * D, (1, "bshd", "bshd")),
    "sbhd_output": (sbhd_output, 3 * H * D, (1, "bhsd", "sbhd")),
    "bhsd_output_read_twice": (bhsd_output_read_twice, (H + 2 * G) * D, (R, "bshd", "bshd")),
}


def _case(name: str):
    fn, width, expected = SPELLINGS[name]
    if name == "einops_rearrange":
        pytest.importorskip("einops")
    return (*case(fn, width), expected)


def _assert_lowered(sites, expected) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    assert (site.gqa_group, site.layout, site.out_layout) == expected


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_compiled_spelling(name):
    model, inputs, expected = _case(name)
    _assert_lowered(check_compiled(model, inputs), expected)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_exported_spelling(name):
    model, inputs, expected = _case(name)
    _assert_lowered(check_exported(model, inputs)[1], expected)
