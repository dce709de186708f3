"""Lower recognised attention sites to ``torch.ops.attnopt.attention``.

The op reads q, k and v as produced (the layout chain and K/V repetition the site stripped are
not replayed), and writes the output in the layout its consumers read, so the transposes,
``.contiguous()`` copies and ``repeat_kv`` expansions around attention become dead and are
removed. Only nodes this pass made dead are erased.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from ..patterns.normalize import meta, same
from ..patterns.site import AttentionSite, Operand

aten = torch.ops.aten
_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "seq_nr")


@dataclass
class Lowered:
    """What one lowering did: the new op node and the nodes it removed."""

    node: Node
    removed: list[str] = field(default_factory=list)


def _meta_key(gm: GraphModule) -> str:
    for n in gm.graph.nodes:
        if "val" in n.meta:
            return "val"
        if "example_value" in n.meta:
            return "example_value"
    return "val"


def _fake_eval(node: Node, key: str, site: AttentionSite) -> None:
    """Record the node's fake value, computed with the graph's own fake mode (the site's, for a
    node such as ``arange`` that reads no tensor)."""
    args = map_arg(node.args, meta)
    kwargs = map_arg(node.kwargs, meta)
    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, FakeTensor)]
    if not flat:
        flat = [v for v in (meta(site.node),) if isinstance(v, FakeTensor)]
    if not flat:
        return
    with flat[0].fake_mode:
        node.meta[key] = node.target(*args, **kwargs)


def _in_layout(gm: GraphModule, op: Operand, layout: str, key: str, site: AttentionSite) -> Node:
    """``op.source`` viewed in ``layout`` (a permute view when its axes are ordered otherwise)."""
    if op.dims == layout:
        return op.source
    perm = [op.dims.index(axis) for axis in layout]
    node = gm.graph.call_function(aten.permute.default, (op.source, perm))
    _stamp(node, site, key)
    return node


def _stamp(node: Node, site: AttentionSite, key: str) -> None:
    for k in _COPIED_META:
        if k in site.node.meta:
            node.meta[k] = site.node.meta[k]
    _fake_eval(node, key, site)


def keep_mask(gm: GraphModule, mask: Optional[Node], site: AttentionSite, key: str) -> Optional[Node]:
    """The mask in SDPA's sense (True = attend): hand-written ``masked_fill(m, -inf)`` keeps ~m."""
    if mask is None or not site.extra.get("mask_negated"):
        return mask
    node = gm.graph.call_function(aten.logical_not.default, (mask,))
    _stamp(node, site, key)
    return node


def _key_padding_mask(gm: GraphModule, padding: Node, site: AttentionSite, key: str) -> Node:
    """[B, 1, 1, Sk] bool keep-mask from the model's [B, >= Sk] padding input (nonzero = keep)."""
    g = gm.graph
    sk = meta(site.key.source).shape[site.key.dims.index("s")]
    steps: list[Node] = []
    node = padding
    if not same(meta(padding).shape[1], sk):
        node = g.call_function(aten.slice.Tensor, (node, 1, 0, sk))
        steps.append(node)
    if meta(padding).dtype != torch.bool:
        node = g.call_function(aten.ne.Scalar, (node, 0))
        steps.append(node)
    for _ in range(2):
        node = g.call_function(aten.unsqueeze.default, (node, 1))
        steps.append(node)
    for n in steps:
        _stamp(n, site, key)
    return node


def _per_batch(gm: GraphModule, length: Node, site: AttentionSite, key: str) -> Node:
    """A one-element key length as int32 [B], B read from the query (symbolic batches stay so)."""
    g = gm.graph
    q, dims = site.query.source, site.query.dims
    steps = [q]
    for axis in reversed(range(len(dims))):  # q[:, 0, 0, 0]-like: one element per batch
        if dims[axis] != "b":
            steps.append(g.call_function(aten.select.int, (steps[-1], axis, 0)))
    steps.append(g.call_function(aten.zeros_like.default, (steps[-1],), {"dtype": torch.int32}))
    steps.append(g.call_function(aten.add.Tensor, (steps[-1], length)))
    for node in steps[1:]:
        _stamp(node, site, key)
    return steps[-1]


def _seqused(gm: GraphModule, site: AttentionSite, key: str) -> Node:
    """int32 [B] key lengths P[0] + e from the key limit k < P[q] + e of a single-query site."""
    positions, extra = site.extra["key_limit"]
    first = gm.graph.call_function(aten.slice.Tensor, (positions, 0, 0, 1))
    steps = [first]
    if extra:
        steps.append(gm.graph.call_function(aten.add.Tensor, (steps[-1], extra)))
    steps.append(gm.graph.call_function(aten._to_copy.default, (steps[-1],), {"dtype": torch.int32}))
    for node in steps:
        _stamp(node, site, key)
    return _per_batch(gm, steps[-1], site, key)


def _cache_seqused(gm: GraphModule, mask: Node, site: AttentionSite, key: str) -> Node:
    """int32 [B] key lengths for queries after L cached tokens (mask proven ``k - q <= L + c``).

    Counted from the mask itself: it is computed where the model computed it, so the count reads
    the cache length the mask saw even when the graph bumps that length in place before
    attention. Query row i keeps L + c + 1 + i keys; a device-side assert checks that the rows
    do (none empty, none cut short by the cache's end), so the inputs where the lowering and the
    mask would differ fail loudly instead.
    """
    g = gm.graph
    steps: list[Node] = []

    def add(target, *args, **kwargs) -> Node:
        steps.append(g.call_function(target, args, kwargs))
        return steps[-1]

    counts = add(aten.sum.dim_IntList, mask, [-1])  # [..., Sq] keys kept per query row
    grows = add(aten.eq.Scalar, add(aten.sub.Tensor, add(aten.slice.Tensor, counts, -1, 1),
                                    add(aten.slice.Tensor, counts, -1, 0, -1)), 1)
    first = add(aten.select.int, counts, -1, 0)
    fits = add(aten.logical_and.default, add(aten.all.default, grows),
               add(aten.all.default, add(aten.ge.Scalar, first, 1)))
    add(aten._assert_async.msg, fits, "attnopt: the KV-cache mask left a query without keys or ran past the "
        "cache; its lowering to key lengths does not hold for these inputs")
    last = add(aten.slice.Tensor, add(aten.reshape.default, add(aten.select.int, counts, -1, -1), [-1]), 0, 0, 1)
    length = add(aten._to_copy.default, last, dtype=torch.int32)
    for node in steps:
        _stamp(node, site, key)
    return _per_batch(gm, length, site, key)


def _document_offsets(gm: GraphModule, positions: Node, site: AttentionSite, key: str) -> Node:
    """int32 cu_seqlens of fixed size B*S + 1 for documents cut from [B, S] position ids.

    A document starts at each row's first token and wherever the position does not follow the
    previous one by exactly 1. Start offsets sort ahead of the filler value B*S, so the tail is
    empty sequences: no data-dependent shape anywhere. Built once per graph and position ids
    (sites are lowered in graph order, so the first one's offsets precede the rest): every layer
    then passes the op the same tensor, whose offsets it checks on the host once.
    """
    tag = ("document_offsets", positions.name)
    for node in gm.graph.nodes:
        if node.meta.get("attnopt_made") == tag:
            return node
    g = gm.graph
    b, s = meta(positions).shape
    steps: list[Node] = []

    def add(target, *args, **kwargs) -> Node:
        steps.append(g.call_function(target, args, kwargs))
        return steps[-1]

    prev = add(aten.slice.Tensor, positions, 1, 0, -1)
    nxt = add(aten.slice.Tensor, positions, 1, 1)
    jump = add(aten.ne.Scalar, add(aten.sub.Tensor, nxt, prev), 1)
    first = add(aten.new_ones.default, jump, [b, 1], dtype=torch.bool)
    starts = add(aten.reshape.default, add(aten.cat.default, [first, jump], 1), [-1])
    index = add(aten.arange.default, b * s, device=meta(positions).device)
    offsets = add(aten.where.ScalarOther, starts, index, b * s)
    ordered = add(operator.getitem, add(aten.sort.default, offsets), 0)
    total = add(aten.new_full.default, ordered, [1], b * s)
    cu = add(aten._to_copy.default, add(aten.cat.default, [ordered, total]), dtype=torch.int32)
    for node in steps:
        _stamp(node, site, key)
    cu.meta["attnopt_made"] = tag
    return cu


def _chunk_shape(t: Node, chunk: int) -> list:
    b, s, h, d = meta(t).shape
    return [b * (s // chunk), chunk, h, d]


def _reshape(gm: GraphModule, t: Node, shape: list, key: str, site: AttentionSite) -> Node:
    node = gm.graph.call_function(aten.reshape.default, (t, shape))
    _stamp(node, site, key)
    return node


def _erase_if_dead(gm: GraphModule, candidates: list[Node]) -> list[str]:
    removed = []
    for node in sorted(set(candidates), key=_order(gm), reverse=True):
        if not node.users and node.graph is gm.graph:
            removed.append(node.name)
            gm.graph.erase_node(node)
    return removed


def _order(gm: GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index.get(n, -1)


def lower_to_op(gm: GraphModule, site: AttentionSite, kernel: str = "auto") -> Lowered:
    """Replace ``site`` by one attnopt.attention call; return the new node and what was removed."""
    key = _meta_key(gm)
    chunk, documents = site.extra.get("chunk"), site.extra.get("documents")
    # chunks as batches and documents as packed sequences work on [B, S, H, D] sources
    regroup = chunk or documents is not None
    layout = "bshd" if regroup else site.query.dims
    out_use = site.output
    out_layout = "bshd" if regroup else out_use.layout
    kwargs: dict[str, Any] = {"layout": layout}
    if out_layout != layout:
        kwargs["out_layout"] = out_layout
    mask = site.attn_mask
    if isinstance(site.dropout_p, Node) or site.dropout_p:
        kwargs["dropout_p"] = site.dropout_p
    if site.is_causal:
        kwargs["is_causal"] = True
    if site.causal_align != "top_left":
        kwargs["causal_align"] = site.causal_align
    if site.window != (-1, -1):
        kwargs["window_size"] = list(site.window)
    if site.scale is not None:
        kwargs["scale"] = site.scale
    if site.softcap:
        kwargs["softcap"] = site.softcap
    if kernel != "auto":
        kwargs["kernel_name"] = kernel
    with gm.graph.inserting_before(site.node):
        mask = keep_mask(gm, mask, site, key)
        if mask is not None:
            kwargs["attn_mask"] = mask
        if site.extra.get("key_padding") is not None:
            kwargs["attn_mask"] = _key_padding_mask(gm, site.extra["key_padding"], site, key)
        if site.extra.get("key_limit"):
            kwargs["seqused_k"] = _seqused(gm, site, key)
        if site.extra.get("cache_offset"):
            kwargs["seqused_k"] = _cache_seqused(gm, keep_mask(gm, site.extra["cache_mask"], site, key), site, key)
        q, k, v = (_in_layout(gm, op, layout, key, site) for op in (site.query, site.key, site.value))
        if chunk:  # [B, S, H, D] -> [B * S/C, C, H, D]: a view for projections, else one copy
            q, k, v = (_reshape(gm, t, _chunk_shape(t, chunk), key, site) for t in (q, k, v))
        if documents is not None:  # [B, S, H, D] -> [B * S, H, D] tokens, cut into documents
            q, k, v = (_reshape(gm, t, [-1, *meta(t).shape[2:]], key, site) for t in (q, k, v))
            cu = _document_offsets(gm, documents, site, key)
            seqlen = meta(site.query.source).shape[site.query.dims.index("s")]
            kwargs.update(layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen, max_seqlen_k=seqlen)
            kwargs.pop("out_layout", None)
        call = gm.graph.call_function(torch.ops.attnopt.attention.default, (q, k, v), kwargs)
        _stamp(call, site, key)
        out = gm.graph.call_function(operator.getitem, (call, 0))
        _stamp(out, site, key)
        if regroup:
            b, s = (meta(site.query.source).shape[site.query.dims.index(a)] for a in "bs")
            heads_dim = meta(out).shape[1:] if documents is not None else meta(out).shape[2:]
            out = _reshape(gm, out, [b, s, *heads_dim], key, site)
            if out_use.layout != "bshd":
                out = gm.graph.call_function(aten.permute.default, (out, ["bshd".index(a) for a in out_use.layout]))
                _stamp(out, site, key)
        if len(meta(out_use.node).shape) == 3:  # a [B*H, Sq, Dv] product (bmm): merge the contiguous B, H
            out = gm.graph.call_function(aten.flatten.using_ints, (out, 0, 1))
            _stamp(out, site, key)
    out_use.node.replace_all_uses_with(out)
    chain = set(out_use.skipped)
    if any(u not in chain for u in site.node.users):  # something else reads [B, H, S, D]: a view
        with gm.graph.inserting_after(out):
            inverse = [out_use.layout.index(a) for a in "bhsd"]
            view = gm.graph.call_function(aten.permute.default, (out, inverse))
            _stamp(view, site, key)
        site.node.replace_all_uses_with(view, delete_user_cb=lambda u: u not in chain)
    dead = [site.node, *out_use.skipped, *site.query.skipped, *site.key.skipped, *site.value.skipped,
            *site.extra.get("chain", [])]
    return Lowered(call, _erase_if_dead(gm, dead))
