"""Attention call variants and an independent reference, shared by the CPU and GPU tests.

The reference repeats K/V explicitly, builds the mask as a dense bool matrix and runs the
softmax in float64: written separately from every kernel it checks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

SHAPE_OF = {
    "bhsd": lambda b, h, s, d: (b, h, s, d),
    "bshd": lambda b, h, s, d: (b, s, h, d),
    "sbhd": lambda b, h, s, d: (s, b, h, d),
}
TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    layout: str = "bshd"
    out_layout: Optional[str] = None
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 4
    seqlen_q: int = 16
    seqlen_k: int = 16
    dim_qk: int = 32
    dim_v: int = 32
    is_causal: bool = False
    causal_align: str = "top_left"
    window: tuple[int, int] = (-1, -1)
    mask: Optional[str] = None  # "bool", "additive" or "key_padding" (bool [B, 1, 1, Sk])
    seqlens: Optional[tuple[int, ...]] = None  # packed thd self-attention
    seqused: Optional[tuple[int, ...]] = None  # per-batch key lengths over a partly filled cache
    softcap: float = 0.0
    heads_innermost: bool = False  # memory [..., D, H]: the head dim has stride H (view(B, S, D, H).permute(...))

    def scaled(self, **kw) -> "Variant":
        return dataclasses.replace(self, **kw)


VARIANTS = [
    Variant("bhsd", layout="bhsd"),
    Variant("bshd"),
    Variant("sbhd", layout="sbhd"),
    Variant("bshd_to_bhsd", out_layout="bhsd"),
    Variant("sbhd_to_bshd", layout="sbhd", out_layout="bshd"),
    Variant("gqa", heads_q=8, heads_kv=2, is_causal=True),
    Variant("mqa", heads_q=4, heads_kv=1),
    Variant("mla", dim_qk=48, dim_v=32, is_causal=True),
    Variant("mla_gqa", heads_q=8, heads_kv=4, dim_qk=48, dim_v=32),
    Variant("causal", is_causal=True),
    Variant("causal_top_left_cross", seqlen_q=8, seqlen_k=24, is_causal=True),
    Variant("causal_bottom_right_cross", seqlen_q=8, seqlen_k=24, is_causal=True, causal_align="bottom_right"),
    Variant("window", window=(5, 0)),
    Variant("window_two_sided", window=(4, 3), heads_q=8, heads_kv=2),
    Variant("bool_mask", mask="bool"),
    Variant("additive_mask", mask="additive", heads_q=8, heads_kv=4),
    Variant("mask_and_causal", mask="bool", is_causal=True),
    Variant("key_padding", mask="key_padding", seqlen_k=24),
    Variant("key_padding_gqa_causal", mask="key_padding", heads_q=8, heads_kv=2, is_causal=True),
    Variant("decode", seqlen_q=1, seqlen_k=33, heads_q=8, heads_kv=2, is_causal=True, causal_align="bottom_right"),
    Variant("thd", layout="thd", seqlens=(5, 11, 16), heads_q=8, heads_kv=2, is_causal=True),
    Variant("thd_window", layout="thd", seqlens=(9, 3, 20), window=(4, 0)),
    Variant("kv_cache_decode", layout="bhsd", seqlen_q=1, seqlen_k=40, heads_q=8, heads_kv=2, seqused=(17, 40)),
    Variant("kv_cache_causal", seqlen_q=3, seqlen_k=40, heads_q=8, heads_kv=2, is_causal=True,
            causal_align="bottom_right", seqused=(9, 33)),
    Variant("heads_innermost_bhsd", layout="bhsd", heads_q=8, heads_kv=2, is_causal=True, heads_innermost=True),
    Variant("heads_innermost_mask_mla", dim_qk=48, mask="additive", heads_innermost=True),
    Variant("heads_innermost_thd", layout="thd", seqlens=(5, 11, 16), heads_q=8, heads_kv=2, is_causal=True,
            heads_innermost=True),
]
# Softcapped scores (Gemma 2): only FA4 and the math kernel take them.
SOFTCAP_VARIANTS = [
    Variant("softcap_gqa_causal", heads_q=8, heads_kv=2, is_causal=True, softcap=1.5),
    Variant("softcap_window_mask", window=(5, 0), mask="additive", softcap=2.0),
    Variant("softcap_mla_bottom_right", seqlen_q=8, seqlen_k=24, dim_qk=48, is_causal=True,
            causal_align="bottom_right", softcap=1.0),
    Variant("softcap_thd", layout="thd", seqlens=(5, 11, 16), heads_q=8, heads_kv=2, is_causal=True, softcap=1.5),
]


def make_inputs(v: Variant, dtype: torch.dtype, device: str, requires_grad: bool = True, seed: int = 0):
    """q, k, v in the variant's layout (strided views where the layout implies it), kwargs."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        if v.heads_innermost:  # the same shape over memory ordered [..., D, H]
            return rnd_dim_major(shape)
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    def rnd_dim_major(shape):
        h = -3 if v.layout == "bhsd" else -2
        order = [i for i in range(len(shape)) if i != len(shape) + h] + [len(shape) + h]  # heads moved last
        buf = torch.randn(*(shape[i] for i in order), generator=g).to(device=device, dtype=dtype)
        return buf.permute(sorted(range(len(order)), key=order.__getitem__))

    kwargs: dict = dict(is_causal=v.is_causal, layout=v.layout, out_layout=v.out_layout,
                        causal_align=v.causal_align, window_size=v.window)
    if v.softcap:
        kwargs["softcap"] = v.softcap
    if v.seqused:
        kwargs["seqused_k"] = torch.tensor(v.seqused, dtype=torch.int32, device=device)
    if v.layout == "thd":
        total = sum(v.seqlens)
        q, k, val = rnd(total, v.heads_q, v.dim_qk), rnd(total, v.heads_kv, v.dim_qk), rnd(total, v.heads_kv, v.dim_v)
        cu = torch.tensor([0, *torch.tensor(v.seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        kwargs.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(v.seqlens), max_seqlen_k=max(v.seqlens),
                      causal_align="bottom_right")
    else:
        # Project-like memory: one [S*B, H*D]-style buffer viewed in the layout, so bhsd views of
        # bshd/sbhd inputs are strided exactly as in models.
        q = rnd(*SHAPE_OF[v.layout](v.batch, v.heads_q, v.seqlen_q, v.dim_qk))
        k = rnd(*SHAPE_OF[v.layout](v.batch, v.heads_kv, v.seqlen_k, v.dim_qk))
        val = rnd(*SHAPE_OF[v.layout](v.batch, v.heads_kv, v.seqlen_k, v.dim_v))
        if v.mask == "key_padding":
            keep = torch.rand(v.batch, 1, 1, v.seqlen_k, generator=g) > 0.3
            keep[..., 0] = True  # every row keeps a key, causal ones included
            kwargs["attn_mask"] = keep.to(device)
        elif v.mask:
            keep = torch.rand(v.batch, 1, v.seqlen_q, v.seqlen_k, generator=g) > 0.3
            keep[..., 0] = True  # no fully masked rows: kernels differ on those (NaN vs 0)
            if v.mask == "bool":
                kwargs["attn_mask"] = keep.to(device)
            else:
                bias = torch.randn(v.batch, 1, v.seqlen_q, v.seqlen_k, generator=g)
                kwargs["attn_mask"] = bias.masked_fill(~keep, float("-inf")).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, val):
            t.requires_grad_(True)
    return q, k, val, kwargs


def _band(sq: int, sk: int, window: tuple[int, int], causal: bool, align: str) -> Tensor:
    left, right = window
    if causal:
        right = 0
    offset = sk - sq if align == "bottom_right" else 0
    i = torch.arange(sq)[:, None] + offset
    j = torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _dense_reference(q, k, v, mask, scale, causal, window, align, softcap):
    """q,k,v: [B, H, S, D] float64 on CPU."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    keep = _band(q.shape[2], k.shape[2], window, causal, align).to(s.device)
    s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, dim=-1) @ v


def reference(q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> Tensor:
    """Output in the variant's out layout, float64 on CPU, differentiable w.r.t. q, k, v."""
    layout = kwargs["layout"]
    out_layout = kwargs.get("out_layout") or layout
    scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    mask = kwargs.get("attn_mask")
    mask = None if mask is None else mask.cpu()
    args = (scale, kwargs["is_causal"], kwargs["window_size"], kwargs["causal_align"], kwargs.get("softcap", 0.0))
    if layout == "thd":
        cu = kwargs["cu_seqlens_q"].tolist()
        outs = []
        for a, b in zip(cu, cu[1:]):
            d = lambda t: t[a:b].transpose(0, 1).unsqueeze(0)
            outs.append(_dense_reference(d(q64), d(k64), d(v64), None, *args)[0].transpose(0, 1))
        return torch.cat(outs)
    p = TO_BHSD[layout]
    q64, k64, v64 = q64.permute(p), k64.permute(p), v64.permute(p)
    if kwargs.get("seqused_k") is not None:  # each batch over its own first keys, as if sliced
        o = torch.cat([_dense_reference(q64[b:b + 1], k64[b:b + 1, :, :n], v64[b:b + 1, :, :n], None, *args)
                       for b, n in enumerate(kwargs["seqused_k"].tolist())])
    else:
        o = _dense_reference(q64, k64, v64, mask, *args)
    inv = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (2, 0, 1, 3)}[out_layout]
    return o.permute(inv)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
