"""Rewrites that would change the result are not made: each case is left as written, or
rewritten into something equal, never wrong (forward and backward checked against eager)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnopt.fx import Writes
from attnopt.patterns import find_sdpa_sites
from tests.conftest import assert_grads_match
from tests.models.helpers import check_compiled, check_exported

from .qkv import B, D, G, H, R, S, bshd_out, case, sdpa, split_gqa


def tiled_repeat(t):  # .repeat tiles heads: head h reads kv head h % G, not h // R
    return bshd_out(sdpa(*split_gqa(t, lambda x: x.repeat(1, R, 1, 1))))


def unsqueeze_before_head(t):  # [B, 1, G, S, D] expanded over the new axis: tiling again
    return bshd_out(sdpa(*split_gqa(t, lambda x: x[:, None].expand(B, R, G, S, D).reshape(B, H, S, D))))


def repeat_interleave_over_sequence(t):  # repeats keys along S: not a head repetition
    q, k, v = split_gqa(t, lambda x: x.repeat_interleave(2, dim=2))
    return bshd_out(sdpa(q, k, v, enable_gqa=True))


def repeated_kv_read_elsewhere(t):  # the repeated K is also an output: it must survive
    q, k, v = split_gqa(t, lambda x: x.transpose(1, 2).unsqueeze(3).expand(B, S, G, R, D).reshape(B, S, H, D)
                         .transpose(1, 2))
    return bshd_out(sdpa(q, k, v, is_causal=True)) + k.transpose(1, 2).reshape(B, S, -1)


def head_dependent_mask(t):  # a different mask per query head: GQA must keep q-head order
    q, k, v = split_gqa(t, lambda x: x.repeat_interleave(R, dim=1))
    mask = torch.ones(S, S, dtype=torch.bool, device=t.device).tril()[None, None] | \
        (torch.arange(H, device=t.device) % 2 == 0)[None, :, None, None]
    return bshd_out(sdpa(q, k, v, attn_mask=mask))


def _mla(t):
    q, k, v = t.split([H * D, H * D, H * D // 2], dim=-1)
    return (*(x.view(B, S, H, D).transpose(1, 2) for x in (q, k)), v.view(B, S, H, D // 2).transpose(1, 2))


def pad_with_ones(t):  # only zero pads are proven removable: a pad of ones stays
    q, k, v = _mla(t)
    o = sdpa(q, k, F.pad(v, [0, D // 2], value=1.0), is_causal=True)
    return bshd_out(o[..., : D // 2])


def pad_without_slice(t):  # the padded columns are read: the pad must stay
    q, k, v = _mla(t)
    return bshd_out(sdpa(q, k, F.pad(v, [0, D // 2])))


def slice_not_from_zero(t):  # keeps columns 1..D/2: not the original V's columns
    q, k, v = _mla(t)
    return bshd_out(sdpa(q, k, F.pad(v, [0, D // 2]))[..., 1: D // 2 + 1])


def padded_qk_default_scale(t):  # q/k padded: SDPA's default scale reads the padded dim
    q, k, v = t.split([H * D, H * D, H * D], dim=-1)
    q, k, v = (x.view(B, S, H, D).transpose(1, 2) for x in (q, k, v))
    return bshd_out(sdpa(F.pad(q, [0, 8]), F.pad(k, [0, 8]), v, is_causal=True))


CASES = {
    # name: (function, projection width, expected (gqa group, head dims) of the lowered site)
    "tiled_repeat": (tiled_repeat, (H + 2 * G) * D, (1, (D, D))),
    "unsqueeze_before_head": (unsqueeze_before_head, (H + 2 * G) * D, (1, (D, D))),
    "repeat_interleave_over_sequence": (repeat_interleave_over_sequence, (H + 2 * G) * D, (1, (D, D))),
    "repeated_kv_read_elsewhere": (repeated_kv_read_elsewhere, (H + 2 * G) * D, (R, (D, D))),
    "head_dependent_mask": (head_dependent_mask, (H + 2 * G) * D, (R, (D, D))),
    "pad_with_ones": (pad_with_ones, (2 * H + H // 2) * D, (1, (D, D))),
    "pad_without_slice": (pad_without_slice, (2 * H + H // 2) * D, (1, (D, D))),
    "slice_not_from_zero": (slice_not_from_zero, (2 * H + H // 2) * D, (1, (D, D))),
    "padded_qk_default_scale": (padded_qk_default_scale, 3 * H * D, (1, (D + 8, D))),
}


def _case(name):
    fn, width, expected = CASES[name]
    return (*case(fn, width), expected)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("entry", ["compile", "export"])
def test_unprovable_rewrite_is_not_made(name, entry):
    model, inputs, (group, head_dims) = _case(name)
    if entry == "compile":
        sites = check_compiled(model, inputs, rewritten=False)
    else:
        sites = check_exported(model, inputs, rewritten=False)[1]
    (site,) = sites
    assert site.status == "lowered" and site.gqa_group == group and site.head_dims == head_dims


def test_non_divisible_head_count_is_left_as_written():
    """6 query heads cannot share 4 kv heads; SDPA itself rejects the call, so the recogniser
    must refuse it (checked on a graph with recorded shapes, as no model can run it)."""
    gm = torch.fx.symbolic_trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    shapes = {"q": (1, 6, 4, 8), "k": (1, 4, 4, 8), "v": (1, 4, 4, 8)}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["val"] = torch.empty(shapes[node.name], device="meta")
    (site,) = find_sdpa_sites(gm.graph, Writes(gm.graph))
    assert site.skip_reason == "6 query heads are not a multiple of 4 key/value heads"


def test_copies_are_kept_around_in_place_writes(capture):
    """Dynamo graphs keep in-place ops: a copy taken before a write must not become an in-place
    read after it, on the operand side or the output side."""

    def write_after_operand_copy(x):
        t = x * 1
        q = t.view(B, S, H, D).transpose(1, 2).contiguous()
        t.mul_(2)
        return sdpa(q, q, q)

    def write_after_output_copy(x):
        q = x.view(B, S, H, D).transpose(1, 2)
        o = sdpa(q, q, q)
        out = o.transpose(1, 2).clone()  # always a copy (.contiguous() may alias o, by strides)
        o.mul_(2)
        return out

    x = torch.randn(B, S, H * D, requires_grad=True)
    assert_grads_match(torch.compile(write_after_operand_copy, backend=capture.backend), (x,), [],
                       write_after_operand_copy)
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.layout == "bhsd"
    with torch.no_grad():
        got = torch.compile(write_after_output_copy, backend=capture.backend)(x)
        torch.testing.assert_close(got, write_after_output_copy(x))
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.out_layout == "bhsd"
