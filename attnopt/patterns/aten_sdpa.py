"""Recognise aten's fused attention ops: the kernels ``scaled_dot_product_attention`` dispatches
to (what a graph holds after ``run_decompositions``, in AOT graphs, or where code calls them
directly) and ``aten._flash_attention_forward``.

How each call maps onto the site (every op returns a tuple; its output is ``getitem(call, 0)``
and the call stays as written when another output is read):

- ``_scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
  return_debug_mask, *, scale)``: [B, H, S, D]; causal as FlashAttention computes it (bottom
  right, which SDPA only dispatches for equal lengths); GQA by head count;
- ``_scaled_dot_product_efficient_attention`` / ``_scaled_dot_product_cudnn_attention(query,
  key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, ..., *, scale)``: [B, H, S, D];
  ``attn_bias`` an additive mask; causal top left; equal head counts (efficient) / GQA (cuDNN);
- ``_scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, *,
  attn_mask, scale)``: [B, H, S, D]; additive ``attn_mask``; causal top left; GQA;
- ``_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
  is_causal, return_debug_mask, *, scale, window_size_left, window_size_right, seqused_k,
  alibi_slopes, block_table, num_splits)``: [B, S, H, D], or packed [T, H, D] with the offsets
  ``cum_seq_q/k`` and longest lengths ``max_q/k``; causal and windows bottom right; GQA. torch runs
  FlashAttention-2 or, once activated, FlashAttention-3: the band is taken only where the two
  agree. ``seqused_k``, ALiBi slopes, a block table and fp8 descaling stay as written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.fx import Graph, Node

from ..fx import Writes
from ..fx.normalize import meta, same
from .calls import CallSite, bind, constant_reason, lengths, make_site, number_reason, set_band, unset_reason
from .site import AttentionSite

_FP8 = {"q_descale": "fp8 descaling", "k_descale": "fp8 descaling", "v_descale": "fp8 descaling"}


@dataclass(frozen=True)
class _SdpaKernel:
    """One of SDPA's fused kernels: the name of its mask argument, the alignment of its causal
    diagonal, and whether it takes fewer key/value heads than query heads."""

    mask: Optional[str]
    align: str
    gqa: bool


_SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": _SdpaKernel(None, "bottom_right", True),
    "aten::_scaled_dot_product_efficient_attention": _SdpaKernel("attn_bias", "top_left", False),
    "aten::_scaled_dot_product_cudnn_attention": _SdpaKernel("attn_bias", "top_left", True),
    "aten::_scaled_dot_product_flash_attention_for_cpu": _SdpaKernel("attn_mask", "top_left", True),
}
_FLASH = "aten::_flash_attention_forward"


def _sdpa_kernel(node: Node, kernel: _SdpaKernel, args: dict) -> CallSite:
    cs = CallSite(node, "aten_sdpa", "bhsd", args["query"], args["key"], args["value"],
                  attn_mask=args[kernel.mask] if kernel.mask else None, dropout_p=args["dropout_p"],
                  scale=args["scale"])
    cs.reason = constant_reason(args, ("is_causal",)) or number_reason(args, ("dropout_p", "scale")) \
        or unset_reason(args, _FP8)
    if cs.reason:
        return cs
    q, k = meta(cs.query), meta(cs.key)
    if not kernel.gqa and q is not None and k is not None and not same(q.shape[1], k.shape[1]):
        cs.reason = f"{node.target} takes as many key/value heads as query heads"
    if args["is_causal"]:
        cs.is_causal = True
        equal = q is not None and k is not None and same(q.shape[2], k.shape[2])
        cs.causal_align = "top_left" if equal else kernel.align
    return cs


def _flash_forward(node: Node, args: dict) -> CallSite:
    cu_q, cu_k = args["cum_seq_q"], args["cum_seq_k"]
    layout = "bshd" if cu_q is None else "thd"
    cs = CallSite(node, "aten_sdpa", layout, args["query"], args["key"], args["value"], dropout_p=args["dropout_p"],
                  scale=args["scale"])
    cs.reason = constant_reason(args, ("is_causal", "window_size_left", "window_size_right")) \
        or number_reason(args, ("dropout_p", "scale")) \
        or unset_reason(args, {"seqused_k": "per-sequence key lengths", "alibi_slopes": "ALiBi biases",
                               "block_table": "a paged key/value cache", **_FP8})
    if (cu_q is None) != (cu_k is None):
        cs.reason = "only one of cum_seq_q and cum_seq_k is given"
    if cs.reason:
        return cs
    found = lengths(cs, cu_q, cu_k, args["max_q"], args["max_k"])
    if found is None:
        return cs
    window = tuple(-1 if w is None else w for w in (args["window_size_left"], args["window_size_right"]))
    set_band(cs, bool(args["is_causal"]), window, *found)
    return cs


def find_aten_sdpa_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """Every call of aten's fused SDPA kernels and of ``aten._flash_attention_forward``."""
    sites = []
    for node in list(graph.nodes):
        bound = bind(node)
        if bound is None:
            continue
        schema, args = bound
        if schema.name in _SDPA_KERNELS:
            cs = _sdpa_kernel(node, _SDPA_KERNELS[schema.name], args)
        elif schema.name == _FLASH:
            cs = _flash_forward(node, args)
        else:
            continue
        site = make_site(cs, [r.name or f"output {i}" for i, r in enumerate(schema.returns)], writes)
        if site is not None:
            sites.append(site)
    return sites


__all__ = ["find_aten_sdpa_sites"]
