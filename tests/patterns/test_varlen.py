"""``torch.nn.attention.varlen.varlen_attn`` (the op ``torch_attn._varlen_attn``) becomes one packed
("thd") site with the K/V repetition before the packing reshape gone; calls whose other outputs
are read, or that state what the op cannot (key lengths, a cache), stay as written.

torch's varlen kernels run on CUDA only: numerics are checked against ``reference_attention``
computing what the call computes.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn.attention.varlen import AuxRequest, varlen_attn

import attnopt

from .call_checks import check_compiled, check_exported, sites_of
from .flash_kernels import reference_attention
from .qkv import B, D, G, H, R, S

GQA_FLAG = "enable_gqa" in inspect.signature(varlen_attn).parameters  # torch 2.13 asks for it, 2.11 has none


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


CU = _offsets([2, 4, 5, 1])  # B * S = 12 tokens in 4 documents
CU_K = _offsets([3, 4, 6, 1])  # 14 keys: more keys than queries in some documents


def torch_call(**kw) -> Callable:
    return lambda q, k, v, cu_q, cu_k, max_q, max_k: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def reference(window=(-1, -1), scale=None) -> Callable:
    return lambda q, k, v, cu_q, cu_k, max_q, max_k: reference_attention(
        q, k, v, layout="thd", window=window, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


class Packed(nn.Module):
    """Projections viewed [B, S, heads, D], packed by ``pack`` and attended by ``attend``."""

    def __init__(self, pack: Callable, attend: Callable, cu_q=CU, cu_k=CU, max_q=5, max_k=5):
        super().__init__()
        self.pack, self.attend, self.offsets = pack, attend, (cu_q, cu_k, max_q, max_k)
        self.q, self.kv, self.out = nn.Linear(16, H * D), nn.Linear(16, 2 * G * D), nn.Linear(H * D, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, s, sk = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q(x).view(b, s, H, D)
        k, v = self.kv(memory).view(b, sk, 2 * G, D).split(G, dim=2)
        o = self.attend(*self.pack(q, k, v), *self.offsets)
        return self.out(o.view(b, s, -1))


def repeat_kv_bshd(q, k, v):
    """torchtitan: repeat_kv on [B, S, G, D], transposes both ways, reshape to [B*S, H, D]."""
    def repeat(x):
        b, s = x.shape[:2]
        return torch.unsqueeze(x, dim=3).expand(b, s, G, R, D).reshape(b, s, H, D)

    q, k, v = q.transpose(1, 2), repeat(k).transpose(1, 2), repeat(v).transpose(1, 2)
    return (t.transpose(1, 2).reshape(-1, H, D) for t in (q, k, v))


def interleave_bshd(q, k, v):
    return (t.reshape(-1, t.shape[2], D) for t in (q, k.repeat_interleave(R, dim=2), v.repeat_interleave(R, dim=2)))


def contiguous_packed(q, k, v):
    """Heads made contiguous before packing (a copy of each operand)."""
    return (t.contiguous().reshape(-1, t.shape[2], D) for t in (q, k, v))


def tiled_bshd(q, k, v):
    """``.repeat`` tiles heads: query head h reads key/value head h % G, not GQA."""
    return (t.reshape(-1, t.shape[2], D) for t in (q, k.repeat(1, 1, R, 1), v.repeat(1, 1, R, 1)))


CASES = {  # name: (pack, call, reference, offsets, key length, expected gqa group)
    "repeat_kv_causal": (repeat_kv_bshd, torch_call(window_size=(-1, 0)), reference((-1, 0)), (CU, CU, 5, 5), S, R),
    "interleaved_window": (interleave_bshd, torch_call(window_size=(2, 0), scale=0.2), reference((2, 0), 0.2),
                           (CU, CU, 5, 5), S, R),
    "copies_bottom_right": (contiguous_packed, torch_call(window_size=(-1, 0), **({"enable_gqa": True} if GQA_FLAG
                                                                                  else {})),
                            reference((-1, 0)), (CU, CU_K, 5, 6), S + 1, 1),
    "tiled_heads_kept": (tiled_bshd, torch_call(), reference(), (CU, CU, 5, 5), S, 1),
}


def _case(name: str):
    pack, call, ref, offsets, sk, _ = CASES[name]
    torch.manual_seed(0)
    model = Packed(pack, call, *offsets).double()
    twin = copy.deepcopy(model)
    twin.attend = ref
    inputs = (torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True),
              torch.randn(B, sk, 16, dtype=torch.float64, requires_grad=True))
    return model, twin, inputs


def _assert_site(sites, name: str) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    assert site.kind == "varlen" and (site.layout, site.kv_layout, site.out_layout) == ("thd", "thd", "thd")
    assert site.gqa_group == CASES[name][5]


@pytest.mark.parametrize("name", list(CASES))
def test_compiled(name):
    model, twin, inputs = _case(name)
    _assert_site(check_compiled(model, inputs, twin), name)


@pytest.mark.parametrize("name", list(CASES))
def test_exported(name):
    model, twin, inputs = _case(name)
    _assert_site(check_exported(model, inputs, twin)[1], name)


def test_offsets_and_alignment_reach_the_op():
    """The call's own offsets and longest lengths are passed through; with queries and keys cut
    differently the causal diagonal sits bottom right, with one offsets tensor top left."""
    for name, align in (("repeat_kv_causal", "top_left"), ("copies_bottom_right", "bottom_right")):
        model, _, inputs = _case(name)
        graph = attnopt.optimize(torch.export.export(model, inputs), strict=True).graph_module.graph
        (call,) = [n for n in graph.nodes if n.target is torch.ops.attnopt.attention.default]
        assert call.kwargs["layout"] == "thd" and call.kwargs["is_causal"]
        assert call.kwargs.get("causal_align", "top_left") == align
        assert (call.kwargs["max_seqlen_q"], call.kwargs["max_seqlen_k"]) == model.offsets[2:]


# --- left as written ------------------------------------------------------------------------------
def _skipped(model, inputs) -> str:
    (site,) = sites_of(model, inputs)
    assert site.status == "skipped" and site.kind == "varlen"
    return site.reason


def test_logsumexp_read_keeps_the_call():
    model, _, inputs = _case("repeat_kv_causal")

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):
        out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True))
        return out * lse.transpose(0, 1)[..., None]

    model.attend = attend
    assert "logsumexp" in _skipped(model, inputs)


@pytest.mark.skipif(not GQA_FLAG, reason="torch 2.13 lets cu_seq_k be None")
def test_keys_laid_out_by_the_cache_keep_the_call():
    model, _, inputs = _case("repeat_kv_causal")
    model.offsets = (CU, None, 5, 5)
    assert "cu_seq_k is None" in _skipped(model, inputs)


def test_int64_offsets_keep_the_call():
    model, _, inputs = _case("repeat_kv_causal")
    model.offsets = (CU.long(), CU.long(), 5, 5)
    assert "int32" in _skipped(model, inputs)


@pytest.mark.skipif("seqused_k" not in inspect.signature(varlen_attn).parameters, reason="torch 2.13's argument")
def test_key_lengths_keep_the_call():
    model, _, inputs = _case("repeat_kv_causal")
    model.attend = torch_call(seqused_k=torch.tensor([2, 4, 5, 1], dtype=torch.int32))
    with torch.no_grad():  # key lengths are for inference only
        assert "seqused_k" in _skipped(model, tuple(t.detach() for t in inputs))


def test_window_past_the_keys_where_kernels_disagree():
    """A right window of at least the longest key length: FlashAttention-2 treats it as unbounded,
    FlashAttention-3 keeps it, and rows with more queries than keys tell them apart."""
    model, _, inputs = _case("copies_bottom_right")
    model.offsets = (_offsets([9, 1, 1, 1]), _offsets([2, 4, 6, 2]), 9, 6)
    model.attend = torch_call(window_size=(-1, 6), **({"enable_gqa": True} if GQA_FLAG else {}))
    reason = _skipped(model, inputs)
    assert "FlashAttention-2" in reason and "FlashAttention-3" in reason
