"""aten's fused attention ops, called as code (and graphs after decomposition) calls them, become
one lowered site with the repetition and copies around them gone; calls that compute something
else, or whose other outputs are read, stay as written with a reason.

``_scaled_dot_product_flash_attention_for_cpu`` runs here and is checked against eager; the CUDA
kernels are checked against ``reference_attention`` computing what they compute.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

import attnopt
from attnopt.demo_model import repeat_kv

from .call_checks import check_compiled, check_exported, sites_of
from .flash_kernels import reference_attention
from .qkv import B, D, G, H, R, S

aten = torch.ops.aten
WIDTH = (H + 2 * G) * D


class Attn(nn.Module):
    """One projection split into q, k, v by ``split``, attention by ``attend``, an output projection."""

    def __init__(self, split: Callable, attend: Callable):
        super().__init__()
        self.split, self.attend = split, attend
        self.proj, self.kv = nn.Linear(16, H * D), nn.Linear(16, 2 * G * D)
        self.out = nn.Linear(H * D, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(self.split(self.proj(x), self.kv(memory), self.attend))


def heads(q, kv):
    """q [B, S, H, D] and k, v [B, Sk, G, D]: views of the projections."""
    b, s, sk = q.shape[0], q.shape[1], kv.shape[1]
    k, v = kv.view(b, sk, 2 * G, D).split(G, dim=2)
    return q.view(b, s, H, D), k, v


def bhsd_repeat_kv(q, kv, attend):
    """HF style: heads via transpose, K/V through repeat_kv, output back to [B, S, H * D]."""
    q, k, v = (t.transpose(1, 2) for t in heads(q, kv))
    return attend(q, repeat_kv(k, R), repeat_kv(v, R)).transpose(1, 2).flatten(2)


def bhsd_interleave(q, kv, attend):
    """SDPA's own GQA for kernels without it: repeat_interleave of the head axis."""
    q, k, v = (t.transpose(1, 2) for t in heads(q, kv))
    return attend(q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)).transpose(1, 2).flatten(2)


def bhsd_tiled(q, kv, attend):
    """``.repeat`` tiles heads (query head h reads kv head h % G): not GQA."""
    q, k, v = (t.transpose(1, 2) for t in heads(q, kv))
    return attend(q, k.repeat(1, R, 1, 1), v.repeat(1, R, 1, 1)).transpose(1, 2).flatten(2)


def bhsd_grouped(q, kv, attend):
    """Fewer key/value heads handed over as they are."""
    q, k, v = (t.transpose(1, 2) for t in heads(q, kv))
    return attend(q, k, v).transpose(1, 2).flatten(2)


def bshd_native(q, kv, attend):
    """flash-attn's layout: [B, S, H, D] views, fewer key/value heads."""
    return attend(*heads(q, kv)).flatten(2)


def sbhd_contiguous(q, kv, attend):
    """Megatron on [S, B, hidden]: [S, B, H, D] made contiguous [B, S, H, D] for the kernel, and back."""
    s, b = q.shape[:2]
    q = q.view(s, b, H, D)
    k, v = kv.view(kv.shape[0], b, 2 * G, D).split(G, dim=2)
    q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    return attend(q, k, v).transpose(0, 1).contiguous().view(s, b, H * D)


def packed(q, kv, attend):
    """Equal-length rows packed to [B * S, H, D] for a varlen call, output viewed back."""
    b, s, sk = q.shape[0], q.shape[1], kv.shape[1]
    q, k, v = heads(q, kv)
    o = attend(q.reshape(b * s, H, D), k.reshape(b * sk, G, D), v.reshape(b * sk, G, D))
    return o.view(b, s, H * D)


def ref(**kw) -> Callable:
    return lambda q, k, v: reference_attention(q, k, v, **kw)


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


CU_Q, CU_K = _offsets([2, 4, 3, 3]), _offsets([3, 5, 2, 4])  # 12 queries and 14 keys in 4 sequences

# name: (split, call, reference call, key length)
CASES = {
    "cpu_flash_causal": (bhsd_repeat_kv, lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, True)[0], None, S),
    "efficient_interleaved": (bhsd_interleave, lambda q, k, v: aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, True)[0], ref(layout="bhsd", causal=True, align="top_left"), S),
    "flash_bottom_right": (bhsd_repeat_kv, lambda q, k, v: aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, scale=0.3)[0], ref(layout="bhsd", causal=True, scale=0.3), S + 3),
    "cudnn_top_left": (bhsd_repeat_kv, lambda q, k, v: aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True)[0], ref(layout="bhsd", causal=True, align="top_left"), S + 3),
    "flash_forward_bshd_window": (bshd_native, lambda q, k, v: aten._flash_attention_forward(
        q, k, v, None, None, S, S + 2, 0.0, True, False, window_size_left=2)[0],
        ref(causal=True, window=(2, 0)), S + 2),
    "flash_forward_sbhd": (sbhd_contiguous, lambda q, k, v: aten._flash_attention_forward(
        q, k, v, None, None, S, S, 0.0, False, False, scale=0.25)[0], ref(scale=0.25), S),
    "flash_forward_packed": (packed, lambda q, k, v: aten._flash_attention_forward(
        q, k, v, CU_Q, CU_K, 4, 5, 0.0, True, False)[0],
        ref(layout="thd", causal=True, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K), S + 1),
}
EXPECTED = {  # layout as produced (q | kv | out), K/V repetition stripped
    "cpu_flash_causal": ("bshd", "bshd", "bshd", R),
    "efficient_interleaved": ("bshd", "bshd", "bshd", R),
    "flash_bottom_right": ("bshd", "bshd", "bshd", R),
    "cudnn_top_left": ("bshd", "bshd", "bshd", R),
    "flash_forward_bshd_window": ("bshd", "bshd", "bshd", 1),
    "flash_forward_sbhd": ("sbhd", "sbhd", "sbhd", 1),
    "flash_forward_packed": ("thd", "thd", "thd", 1),
}


def _inputs(name: str, sk: int) -> tuple:
    """x and memory: [B, S, 16] and [B, Sk, 16], sequence first for the Megatron case."""
    shapes = ((S, B, 16), (sk, B, 16)) if CASES[name][0] is sbhd_contiguous else ((B, S, 16), (B, sk, 16))
    return tuple(torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes)


def _case(name: str) -> tuple[nn.Module, nn.Module, tuple]:
    split, call, reference, sk = CASES[name]
    torch.manual_seed(0)
    model = Attn(split, call).double()
    twin = None
    if reference is not None:
        twin = copy.deepcopy(model)
        twin.attend = reference
    return model, twin, _inputs(name, sk)


def _assert_site(sites, name: str) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    assert (site.layout, site.kv_layout, site.out_layout, site.gqa_group) == EXPECTED[name]


@pytest.mark.parametrize("name", list(CASES))
def test_compiled(name):
    model, twin, inputs = _case(name)
    _assert_site(check_compiled(model, inputs, twin), name)


@pytest.mark.parametrize("name", list(CASES))
def test_exported(name):
    model, twin, inputs = _case(name)
    _assert_site(check_exported(model, inputs, twin)[1], name)


def test_bottom_right_causal_is_stated():
    """flash's causal diagonal sits bottom right when keys outnumber queries; cuDNN's top left."""
    aligns = {}
    for name in ("flash_bottom_right", "cudnn_top_left"):
        model, _, inputs = _case(name)
        optimized = attnopt.optimize(torch.export.export(model, inputs), strict=True, target="op")
        (call,) = [n for n in optimized.graph_module.graph.nodes if n.target is torch.ops.attnopt.attention.default]
        assert call.kwargs["is_causal"]
        aligns[name] = call.kwargs.get("causal_align", "top_left")
    assert aligns == {"flash_bottom_right": "bottom_right", "cudnn_top_left": "top_left"}


def test_masked_cpu_flash_proves_the_mask():
    """An additive causal mask handed to the CPU kernel is proven and dropped for is_causal."""
    def split(q, kv, attend):
        b, s = q.shape[:2]
        keep = torch.arange(s)[:, None] >= torch.arange(s)[None, :]
        bias = torch.where(keep, torch.zeros((), dtype=q.dtype), float("-inf"))
        return bhsd_repeat_kv(q, kv, lambda q, k, v: attend(q, k, v, bias))

    torch.manual_seed(0)
    model = Attn(split, lambda q, k, v, m: aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=m)[0]).double()
    inputs = (torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True),
              torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True))
    (site,) = check_exported(model, inputs)[1]
    assert site.status == "lowered" and site.mask_action == "flags" and site.is_causal


# --- left as written ------------------------------------------------------------------------------
def _skipped(model, inputs) -> str:
    (site,) = sites_of(model, inputs)
    assert site.status == "skipped"
    return site.reason


def test_logsumexp_read_keeps_the_call():
    def split(q, kv, attend):
        q, k, v = (t.transpose(1, 2) for t in heads(q, kv))
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        return (o * lse.exp()[..., None]).transpose(1, 2).flatten(2)

    model, _, inputs = _case("cpu_flash_causal")
    model.split = split
    assert "logsumexp" in _skipped(model, inputs)


def test_tiled_heads_are_not_gqa():
    """``.repeat`` tiling reaches the op as the tiled heads it is."""
    model, _, inputs = _case("cpu_flash_causal")
    model.split = bhsd_tiled
    (site,) = check_exported(model, inputs)[1]
    assert site.status == "lowered" and site.gqa_group == 1 and site.heads == (H, H)


def test_efficient_takes_no_fewer_key_heads():
    model, _, inputs = _case("efficient_interleaved")
    model.split = bhsd_grouped
    assert "as many key/value heads" in _skipped(model, inputs)


def test_key_lengths_keep_the_call():
    lengths = torch.tensor([3, 6, 1, 4], dtype=torch.int32)
    model, _, inputs = _case("flash_forward_packed")
    model.attend = lambda q, k, v: aten._flash_attention_forward(q, k, v, CU_Q, CU_K, 4, 5, 0.0, True, False,
                                                                 seqused_k=lengths)[0]
    assert "seqused_k" in _skipped(model, inputs)


def test_window_fa2_and_fa3_disagree():
    """A left window with an unbounded right side over more queries than keys: FlashAttention-2
    bounds the right side at the key length, FlashAttention-3 does not; torch may run either."""
    model, _, inputs = _case("flash_forward_bshd_window")
    model.attend = lambda q, k, v: aten._flash_attention_forward(q, k, v, None, None, S, 2, 0.0, False, False,
                                                                 window_size_left=1)[0]
    reason = _skipped(model, (inputs[0], inputs[1][:, :2]))
    assert "FlashAttention-2" in reason and "FlashAttention-3" in reason
