"""Build, in the graph, the tensors a mask plan hands the op instead of the dense mask.

Each builder adds its nodes at the graph's insertion point (right before the attention call) with
``attnopt.fx.Builder``, computing from the graph inputs the plan was proven over, in the same
dtypes the model computed in, so that what the op reads equals what the mask encoded.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..fx import Builder, written_args
from ..fx.normalize import meta, same
from .blocks import check_runs
from .plan import MaskPlan

aten = torch.ops.aten


def keep_mask(build: Builder, plan: MaskPlan) -> Optional[Node]:
    """The kept mask in SDPA's sense (True = attend): ``masked_fill(m, -inf)`` keeps ~m."""
    if plan.mask is None or not plan.negated:
        return plan.mask
    return build(aten.logical_not.default, plan.mask)


def key_padding_mask(build: Builder, padding: Node, sk) -> Node:
    """[B, 1, 1, Sk] bool keep-mask from the model's [B, >= Sk] padding input (nonzero = keep)."""
    node = padding
    if not same(meta(padding).shape[1], sk):
        node = build(aten.slice.Tensor, node, 1, 0, sk)
    if meta(padding).dtype != torch.bool:
        node = build(aten.ne.Scalar, node, 0)
    for _ in range(2):
        node = build(aten.unsqueeze.default, node, 1)
    return node


def _per_batch(build: Builder, length: Node, query: Node, dims: str) -> Node:
    """A one-element key length as int32 [B], B read from the query (symbolic batches stay so)."""
    node = query
    for axis in reversed(range(len(dims))):  # q[:, 0, 0, 0]-like: one element per batch
        if dims[axis] != "b":
            node = build(aten.select.int, node, axis, 0)
    node = build(aten.zeros_like.default, node, dtype=torch.int32)
    return build(aten.add.Tensor, node, length)


def limited_lengths(build: Builder, plan: MaskPlan, query: Node, dims: str, sk) -> Node:
    """int32 [B] key lengths from the key limit ``k < P[q] + e`` of a single-query site: P[0] + e,
    clamped to [0, Sk] as the mask is (a limit past the cache keeps every key, one below zero none)."""
    limit = plan.key_limit
    node = build(aten.slice.Tensor, limit.positions, 0, 0, 1)
    if limit.extra:
        node = build(aten.add.Tensor, node, limit.extra)
    node = build(aten.clamp.default, node, 0, sk)
    node = build(aten._to_copy.default, node, dtype=torch.int32)
    return _per_batch(build, node, query, dims)


def cache_lengths(build: Builder, plan: MaskPlan, query: Node, dims: str) -> Node:
    """int32 [B] key lengths for queries after L cached tokens (mask proven ``k - q <= L + c``).

    Counted from the mask itself: it is computed where the model computed it, so the count reads
    the cache length the mask saw even when the graph bumps that length in place before
    attention. Query row i keeps L + c + 1 + i keys; a device-side assert checks that the rows
    do (none empty, none cut short by the cache's end), so the inputs where the lowering and the
    mask would differ fail loudly instead.
    """
    _, mask = plan.cache
    if plan.negated:
        mask = build(aten.logical_not.default, mask)
    counts = build(aten.sum.dim_IntList, mask, [-1])  # [..., Sq] keys kept per query row
    steps = build(aten.sub.Tensor, build(aten.slice.Tensor, counts, -1, 1), build(aten.slice.Tensor, counts, -1, 0, -1))
    grows = build(aten.eq.Scalar, steps, 1)
    first = build(aten.select.int, counts, -1, 0)
    fits = build(aten.logical_and.default, build(aten.all.default, grows),
                 build(aten.all.default, build(aten.ge.Scalar, first, 1)))
    build(aten._assert_async.msg, fits, "attnopt: the KV-cache mask left a query without keys or ran past the "
          "cache; its lowering to key lengths does not hold for these inputs")
    last = build(aten.select.int, counts, -1, -1)
    length = build(aten._to_copy.default, build(aten.slice.Tensor, build(aten.reshape.default, last, [-1]), 0, 0, 1),
                   dtype=torch.int32)
    return _per_batch(build, length, query, dims)


def document_offsets(build: Builder, plan: MaskPlan) -> Node:
    """int32 cu_seqlens of fixed size B*S + 1 for the documents (or chunks of documents) cut from
    [B, S] position ids.

    A piece starts at each row's first token, wherever the position does not follow the previous
    one by exactly 1 (computed in the positions' own dtype, as the model's ``diff`` is), and, for
    chunks, wherever the chunk index changes: ``P // C`` for chunks over positions, ``j // C`` for
    chunks over the row's indices. Start offsets sort ahead of the filler value B*S, so the tail
    is empty sequences: no data-dependent shape anywhere. Built once per graph and plan (the first
    site's offsets precede the rest): every layer then passes the op the same tensor, whose
    offsets the op checks on the host once.

    Document ids (``plan.document_ids``: [B, S], or [S] for a batch of one) cut where the id
    changes, which is their documents only when each id is one run of its row: checked on the device.
    """
    positions = plan.documents
    tag = ("document_offsets", positions, plan.chunk, plan.chunk_positions)
    for node in build.graph.nodes:
        if node.meta.get("attnopt_made") == tag:
            return node
    if plan.document_ids:
        check_runs(build, positions)
        if meta(positions).dim() == 1:
            positions = build(aten.unsqueeze.default, positions, 0)
    if plan.batch is not None and not same(meta(positions).shape[0], plan.batch):  # [1, S] for every row
        positions = build(aten.expand.default, positions, [plan.batch, -1])
    b, s = meta(positions).shape
    prev = build(aten.slice.Tensor, positions, 1, 0, -1)
    nxt = build(aten.slice.Tensor, positions, 1, 1)
    if plan.document_ids:
        jump = build(aten.ne.Tensor, nxt, prev)
    else:
        jump = build(aten.ne.Scalar, build(aten.sub.Tensor, nxt, prev), 1)
    if plan.chunk is not None:
        if plan.chunk_positions:
            bucket = build(aten.floor_divide.default, positions, plan.chunk)
            moved = build(aten.ne.Tensor, build(aten.slice.Tensor, bucket, 1, 1), build(aten.slice.Tensor, bucket, 1, 0, -1))
        else:
            column = build(aten.arange.start, 1, s, device=meta(positions).device)
            moved = build(aten.eq.Scalar, build(aten.remainder.Scalar, column, plan.chunk), 0)
        jump = build(aten.logical_or.default, jump, moved)
    first = build(aten.new_ones.default, jump, [b, 1], dtype=torch.bool)
    starts = build(aten.reshape.default, build(aten.cat.default, [first, jump], 1), [-1])
    index = build(aten.arange.default, b * s, device=meta(positions).device)
    offsets = build(aten.where.ScalarOther, starts, index, b * s)
    ordered = build(operator.getitem, build(aten.sort.default, offsets), 0)
    total = build(aten.new_full.default, ordered, [1], b * s)
    cu = build(aten._to_copy.default, build(aten.cat.default, [ordered, total]), dtype=torch.int32)
    cu.meta["attnopt_made"] = tag
    return cu


def erase_dead_masks(gm: GraphModule, masks: list[Node]) -> list[str]:
    """Erase the mask-building subgraphs that no attention call reads any more."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    pending = set()
    stack = [m for m in masks if m.graph is gm.graph]
    while stack:
        n = stack.pop()
        if n in pending or n.op not in ("call_function", "call_method"):
            continue
        pending.add(n)
        stack.extend(a for a in n.all_input_nodes)
    removed = []
    for n in sorted(pending, key=index.get, reverse=True):
        if not n.users and not written_args(n) and n.target is not aten._assert_async.msg:
            removed.append(n.name)
            gm.graph.erase_node(n)
    return removed


__all__ = ["cache_lengths", "document_offsets", "erase_dead_masks", "keep_mask", "key_padding_mask",
           "limited_lengths"]
