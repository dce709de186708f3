"""Lower recognised attention sites to ``torch.ops.attnopt.attention``.

The op reads q, k and v as produced (the layout chain and K/V repetition the site stripped are
not replayed), and writes the output in the layout its consumers read, so the transposes,
``.contiguous()`` copies and ``repeat_kv`` expansions around attention become dead and are
removed. The site's mask plan decides the mask arguments. Only nodes this pass made dead are
erased.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..fx import Builder, erase_if_dead
from ..masks import lower as masks
from ..fx.normalize import meta
from ..patterns.site import AttentionSite, Operand

aten = torch.ops.aten


@dataclass
class Lowered:
    """What one lowering did: the new op node, the nodes it removed, and the nodes it replaced
    (old -> new), for sites still to be lowered that read them."""

    node: Node
    removed: list[str] = field(default_factory=list)
    replaced: dict[Node, Node] = field(default_factory=dict)


def in_layout(build: Builder, op: Operand, layout: str) -> Node:
    """``op.source`` viewed in ``layout`` (a permute view when its axes are ordered otherwise)."""
    if op.dims == layout:
        return op.source
    return build(aten.permute.default, op.source, [op.dims.index(axis) for axis in layout])


def _chunk_shape(t: Node, chunk: int) -> list:
    b, s, h, d = meta(t).shape
    return [b * (s // chunk), chunk, h, d]


def _size(op: Operand, axis: str) -> Any:
    return meta(op.source).shape[op.dims.index(axis)]


def _mask_kwargs(build: Builder, site: AttentionSite) -> dict[str, Any]:
    """The op's mask and band arguments for the site's plan."""
    plan = site.plan
    kwargs: dict[str, Any] = {}
    flags = plan.flags
    if flags.is_causal:
        kwargs["is_causal"] = True
    if flags.causal_align != "top_left":
        kwargs["causal_align"] = flags.causal_align
    if flags.window != (-1, -1):
        kwargs["window_size"] = list(flags.window)
    mask = masks.keep_mask(build, plan)
    if mask is not None:
        kwargs["attn_mask"] = mask
    if site.cu_seqlens_q is not None:  # a packed call: its own offsets
        kwargs.update(cu_seqlens_q=site.cu_seqlens_q, cu_seqlens_k=site.cu_seqlens_k,
                      max_seqlen_q=site.max_seqlen_q, max_seqlen_k=site.max_seqlen_k)
    if plan.action == "key_padding":
        kwargs["attn_mask"] = masks.key_padding_mask(build, plan.padding, _size(site.key, "s"))
    elif plan.action == "key_lengths":
        kwargs["seqused_k"] = masks.limited_lengths(build, plan, site.query.source, site.query.dims,
                                                    _size(site.key, "s"))
    elif plan.action == "cache_lengths":
        kwargs["seqused_k"] = masks.cache_lengths(build, plan, site.query.source, site.query.dims)
    if site.empty_rows != "zero":  # eager's NaNs for rows that keep no key, or whose query is NaN
        kwargs["empty_rows"] = site.empty_rows
    if site.mask_fill is not None and site.mask_fill != float("-inf"):  # masked_fill(m, -10000.0)
        kwargs["mask_fill"] = site.mask_fill
    return kwargs


def lower_to_op(gm: GraphModule, site: AttentionSite, kernel: str = "auto") -> Lowered:
    """Replace ``site`` by one attnopt.attention call; return the new node and what was removed."""
    plan = site.plan
    regroup = plan.action in ("batches", "thd")  # both work on [B, S, H, D] sources
    layout = "bshd" if regroup else site.query.dims
    out_use = site.output
    out_layout = "bshd" if regroup else out_use.layout
    kwargs: dict[str, Any] = {"layout": layout}
    if out_layout != layout:
        kwargs["out_layout"] = out_layout
    if isinstance(site.dropout_p, Node) or site.dropout_p:
        kwargs["dropout_p"] = site.dropout_p
    if site.scale is not None:
        kwargs["scale"] = site.scale
    if site.softcap:
        kwargs["softcap"] = site.softcap
    if site.sinks is not None:
        kwargs["sinks"] = site.sinks
    if kernel != "auto":
        kwargs["kernel_name"] = kernel
    build = Builder(gm, site.node)
    with gm.graph.inserting_before(site.node):
        kwargs.update(_mask_kwargs(build, site))
        q, k, v = (in_layout(build, op, layout) for op in (site.query, site.key, site.value))
        if plan.action == "batches":  # [B, S, H, D] -> [B * S/C, C, H, D]: a view for projections, else one copy
            q, k, v = (build(aten.reshape.default, t, _chunk_shape(t, plan.chunk)) for t in (q, k, v))
        if plan.action == "thd":  # [B, S, H, D] -> [B * S, H, D] tokens, cut into documents
            q, k, v = (build(aten.reshape.default, t, [-1, *meta(t).shape[2:]]) for t in (q, k, v))
            cu = masks.document_offsets(build, plan)
            seqlen = _size(site.query, "s")
            kwargs.update(layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen, max_seqlen_k=seqlen)
            kwargs.pop("out_layout", None)
        call = build(torch.ops.attnopt.attention.default, q, k, v, **kwargs)
        out = build(operator.getitem, call, 0)
        if regroup:
            b, s = _size(site.query, "b"), _size(site.query, "s")
            heads_dim = meta(out).shape[1:] if plan.action == "thd" else meta(out).shape[2:]
            out = build(aten.reshape.default, out, [b, s, *heads_dim])
            if out_use.layout != "bshd":
                out = build(aten.permute.default, out, ["bshd".index(a) for a in out_use.layout])
        whole = out  # the output in out_layout, as the op writes it
        if tuple(meta(out).shape) != tuple(meta(out_use.node).shape):  # the readers' view merges axes of it:
            out = build(aten.reshape.default, out, list(meta(out_use.node).shape))  # [B*H, Sq, Dv], [S, B, H*Dv]
        if out_use.written:  # the graph writes it in place: not the tensor the op keeps for backward, and laid
            # out as the original's output (contiguous), so that later copies of it copy as they did
            out = build(aten.clone.default, out, memory_format=torch.contiguous_format)
    out_use.node.replace_all_uses_with(out)
    replaced = {out_use.node: out}
    chain = set(out_use.skipped)
    if any(u not in chain for u in site.node.users):  # something else reads [B, H, S, D]: a view
        with gm.graph.inserting_after(out):
            view = build(aten.permute.default, whole, [out_use.layout.index(a) for a in "bhsd"])
        site.node.replace_all_uses_with(view, delete_user_cb=lambda u: u not in chain)
        replaced.setdefault(site.node, view)
    dead = [site.node, *out_use.skipped, *site.query.skipped, *site.key.skipped, *site.value.skipped, *site.chain]
    return Lowered(call, erase_if_dead(gm, dead, frozenset(site.chain)), replaced)
